//! Splitting a long answer into the parts a platform takes (WhatsApp: 4096
//! characters a message; Slack: a few thousand for readability), at the best
//! boundary before the limit: a blank line, a line end, a space, else anywhere
//! between two characters.

/// `text` in parts of at most `max_chars` characters each, in order, none empty;
/// the whitespace at a cut is dropped.
pub(crate) fn split(text: &str, max_chars: usize) -> Vec<String> {
    assert!(max_chars > 0, "a part holds at least one character");
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        // Byte offset just past `max_chars` characters, or the end.
        let Some((limit, _)) = rest.char_indices().nth(max_chars) else {
            parts.push(rest.to_owned());
            break;
        };
        let window = &rest[..limit];
        // A boundary in the first half would make tiny parts: cut hard then.
        let half = window.len() / 2;
        let cut = ["\n\n", "\n", " "]
            .iter()
            .find_map(|sep| window.rfind(sep).filter(|at| *at > half))
            .unwrap_or(limit);
        parts.push(rest[..cut].trim_end().to_owned());
        rest = rest[cut..].trim_start();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split("  hello  ", 10), ["hello"]);
        assert!(split("   ", 10).is_empty());
    }

    #[test]
    fn cuts_at_paragraphs_then_lines_then_spaces() {
        assert_eq!(split("aaaa bbbb\n\ncc dd", 12), ["aaaa bbbb", "cc dd"]);
        assert_eq!(split("aaaa\nbbbb cc", 11), ["aaaa\nbbbb", "cc"]);
        assert_eq!(split("aaaa bbbb cccc", 10), ["aaaa bbbb", "cccc"]);
    }

    #[test]
    fn a_word_longer_than_the_limit_is_cut_between_characters() {
        let parts = split(&"é".repeat(10), 4);
        assert_eq!(parts, ["éééé", "éééé", "éé"]);
    }

    #[test]
    fn no_part_is_over_the_limit_and_nothing_is_lost() {
        let text = "word ".repeat(3000) + &"x".repeat(5000);
        let parts = split(&text, 4096);
        assert!(parts.iter().all(|p| p.chars().count() <= 4096));
        let joined: String = parts.concat().split_whitespace().collect();
        let original: String = text.split_whitespace().collect();
        assert_eq!(joined, original);
    }
}
