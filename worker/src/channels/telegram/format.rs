//! The model's Markdown as Telegram HTML (`parse_mode: HTML`), and long texts cut into
//! messages Telegram takes.
//!
//! Telegram's HTML knows a few inline tags (`b`, `i`, `s`, `code`, `pre`, `a`,
//! `blockquote`), no paragraphs, headings or lists, and refuses a message whose tags
//! do not balance. So blocks become line breaks, headings bold, list items bullets;
//! all text is escaped (`<`, `>`, `&`), HTML the model wrote is shown as text, and a
//! link keeps its target only for `http`, `https`, `mailto` and `tg`.
//!
//! [`split`] cuts on the best boundary it finds (a paragraph, a line, a word; a hard
//! cut only inside a word longer than a message), never inside a tag or an entity,
//! and closes the tags open at the cut (reopening them in the next part), so every
//! part is valid on its own.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};

/// Longest message text Telegram takes, in UTF-16 code units (how it counts).
pub(crate) const MAX_MESSAGE: usize = 4096;

const SCHEMES: [&str; 4] = ["http", "https", "mailto", "tg"];

pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// `markdown` as Telegram HTML.
pub(crate) fn to_telegram_html(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len() * 5 / 4);
    // For each open list: the next item's number (`None`: bullets).
    let mut lists: Vec<Option<u64>> = Vec::new();
    // For each open link or image: whether its tag is kept.
    let mut links: Vec<bool> = Vec::new();
    let mut in_code_block = false;
    for event in Parser::new_ext(markdown, Options::ENABLE_STRIKETHROUGH) {
        match event {
            Event::Start(tag) => match tag {
                Tag::Paragraph => {}
                Tag::Heading { .. } => out.push_str("<b>"),
                Tag::BlockQuote(_) => out.push_str("<blockquote>"),
                Tag::CodeBlock(kind) => {
                    in_code_block = true;
                    match kind {
                        CodeBlockKind::Fenced(lang) if is_language(&lang) => {
                            out.push_str(&format!("<pre><code class=\"language-{lang}\">"))
                        }
                        _ => out.push_str("<pre><code>"),
                    }
                }
                Tag::List(first) => {
                    if !lists.is_empty() && !out.ends_with('\n') {
                        out.push('\n');
                    }
                    lists.push(first);
                }
                Tag::Item => {
                    out.push_str(&"  ".repeat(lists.len().saturating_sub(1)));
                    match lists.last_mut() {
                        Some(Some(n)) => {
                            out.push_str(&format!("{n}. "));
                            *n += 1;
                        }
                        _ => out.push_str("• "),
                    }
                }
                Tag::Emphasis => out.push_str("<i>"),
                Tag::Strong => out.push_str("<b>"),
                Tag::Strikethrough => out.push_str("<s>"),
                Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => {
                    let kept = is_allowed(&dest_url);
                    if kept {
                        out.push_str(&format!("<a href=\"{}\">", escape(&dest_url)));
                    }
                    links.push(kept);
                }
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Paragraph => end_block(&mut out, &lists),
                TagEnd::Heading(level) => {
                    out.push_str("</b>");
                    if level == HeadingLevel::H1 {
                        out.push('\n');
                    }
                    end_block(&mut out, &lists);
                }
                TagEnd::BlockQuote(_) => {
                    trim_end_in_place(&mut out);
                    out.push_str("</blockquote>");
                    end_block(&mut out, &lists);
                }
                TagEnd::CodeBlock => {
                    in_code_block = false;
                    trim_end_in_place(&mut out);
                    out.push_str("</code></pre>");
                    end_block(&mut out, &lists);
                }
                TagEnd::List(_) => {
                    lists.pop();
                    if lists.is_empty() {
                        end_block(&mut out, &lists);
                    }
                }
                TagEnd::Item => {
                    trim_end_in_place(&mut out);
                    out.push('\n');
                }
                TagEnd::Emphasis => out.push_str("</i>"),
                TagEnd::Strong => out.push_str("</b>"),
                TagEnd::Strikethrough => out.push_str("</s>"),
                TagEnd::Link | TagEnd::Image if links.pop().unwrap_or(false) => {
                    out.push_str("</a>")
                }
                _ => {}
            },
            Event::Text(text) => out.push_str(&escape(&text)),
            Event::Code(code) => {
                out.push_str("<code>");
                out.push_str(&escape(&code));
                out.push_str("</code>");
            }
            // Shown as written, never interpreted.
            Event::Html(raw) | Event::InlineHtml(raw) => out.push_str(&escape(&raw)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => {
                out.push_str("———");
                end_block(&mut out, &lists);
            }
            Event::FootnoteReference(name) => out.push_str(&escape(&format!("[{name}]"))),
            Event::TaskListMarker(done) => out.push_str(if done { "☑ " } else { "☐ " }),
            _ => {}
        }
    }
    debug_assert!(!in_code_block);
    trim_end_in_place(&mut out);
    out
}

/// A paragraph (or any block) ends: a blank line, or a line break inside a list item.
fn end_block(out: &mut String, lists: &[Option<u64>]) {
    trim_end_in_place(out);
    out.push_str(if lists.is_empty() { "\n\n" } else { "\n" });
}

fn trim_end_in_place(out: &mut String) {
    let len = out.trim_end().len();
    out.truncate(len);
}

/// A code block's language goes into an attribute: only plain names.
fn is_language(lang: &str) -> bool {
    !lang.is_empty()
        && lang.len() <= 32
        && lang
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'_' | b'#'))
}

fn is_allowed(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|url| SCHEMES.contains(&url.scheme()))
}

/// One piece of HTML the splitter never cuts: a tag, an entity or a character.
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    Open { name: &'a str, tag: &'a str },
    Close { name: &'a str, tag: &'a str },
    Text(&'a str),
}

impl<'a> Piece<'a> {
    fn text(self) -> &'a str {
        match self {
            Piece::Open { tag, .. } | Piece::Close { tag, .. } => tag,
            Piece::Text(text) => text,
        }
    }
}

fn pieces(html: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::with_capacity(html.len());
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        let len = match c {
            '<' => rest.find('>').map(|end| end + 1),
            '&' => rest
                .char_indices()
                .take(12)
                .find(|(_, c)| *c == ';')
                .map(|(end, _)| end + 1),
            _ => None,
        }
        .unwrap_or(c.len_utf8());
        let (piece, tail) = rest.split_at(len);
        rest = tail;
        pieces.push(if piece.len() > 1 && piece.starts_with("</") {
            Piece::Close {
                name: tag_name(&piece[2..]),
                tag: piece,
            }
        } else if piece.len() > 1 && piece.starts_with('<') {
            Piece::Open {
                name: tag_name(&piece[1..]),
                tag: piece,
            }
        } else {
            Piece::Text(piece)
        });
    }
    pieces
}

fn tag_name(after_bracket: &str) -> &str {
    let end = after_bracket
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(after_bracket.len());
    &after_bracket[..end]
}

fn units(text: &str) -> usize {
    text.encode_utf16().count()
}

/// The length of the closing tags of `open`.
fn closing_units(open: &[(&str, &str)]) -> usize {
    open.iter().map(|(name, _)| name.len() + 3).sum()
}

/// Tags open at a point: (name, opening tag).
type OpenTags<'a> = Vec<(&'a str, &'a str)>;

/// A place a part may end: its kind, the piece it ends before, the tags open there,
/// the units used up to it.
type Cut<'a> = (Boundary, usize, OpenTags<'a>, usize);

/// Where a part may end, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Boundary {
    Word,
    Line,
    Paragraph,
}

/// `html` cut into parts of at most `limit` UTF-16 units each, every one valid HTML.
pub(crate) fn split(html: &str, limit: usize) -> Vec<String> {
    let pieces = pieces(html);
    let mut parts = Vec::new();
    // Tags open where the current part starts: (name, opening tag).
    let mut open: Vec<(&str, &str)> = Vec::new();
    let mut start = 0;
    while start < pieces.len() {
        let prefix: String = open.iter().map(|(_, tag)| *tag).collect();
        let mut used = units(&prefix);
        let mut stack = open.clone();
        // The best cut of each kind so far: (end, tags open there, units used there).
        let mut cuts: Vec<Cut<'_>> = Vec::new();
        let mut end = start;
        while end < pieces.len() {
            let piece = pieces[end];
            let mut next = stack.clone();
            match piece {
                Piece::Open { name, tag } => next.push((name, tag)),
                Piece::Close { name, .. } => {
                    if let Some(at) = next.iter().rposition(|(open, _)| *open == name) {
                        next.truncate(at);
                    }
                }
                Piece::Text(_) => {}
            }
            let grown = used + units(piece.text());
            if grown + closing_units(&next) > limit && end > start {
                break;
            }
            used = grown;
            stack = next;
            end += 1;
            let boundary = match piece {
                Piece::Text("\n") if end >= 2 && pieces[end - 2].text() == "\n" => {
                    Some(Boundary::Paragraph)
                }
                Piece::Text("\n") => Some(Boundary::Line),
                Piece::Text(" ") => Some(Boundary::Word),
                _ => None,
            };
            if let Some(boundary) = boundary {
                cuts.retain(|(kind, ..)| *kind != boundary);
                cuts.push((boundary, end, stack.clone(), used));
            }
        }
        let (cut, open_at_cut) = if end == pieces.len() {
            (end, stack)
        } else {
            // The best kind of boundary in the second half of the part; else the
            // latest boundary of any kind; else a hard cut here.
            let half = limit / 2;
            let best = cuts
                .iter()
                .filter(|(_, _, _, used)| *used >= half)
                .max_by_key(|(kind, ..)| *kind)
                .or_else(|| cuts.iter().max_by_key(|(_, end, ..)| *end));
            match best {
                Some((_, end, open, _)) => (*end, open.clone()),
                None => (end, stack),
            }
        };
        let mut part = prefix;
        for piece in &pieces[start..cut] {
            part.push_str(piece.text());
        }
        trim_end_in_place(&mut part);
        for (name, _) in open_at_cut.iter().rev() {
            part.push_str(&format!("</{name}>"));
        }
        if !is_blank(&part) {
            parts.push(part);
        }
        start = cut;
        // The next part does not start with the whitespace it was cut at.
        while start < pieces.len() && matches!(pieces[start], Piece::Text(" " | "\n")) {
            start += 1;
        }
        open = open_at_cut;
    }
    parts
}

/// Whether `part` shows nothing (only tags and whitespace).
fn is_blank(part: &str) -> bool {
    pieces(part).iter().all(|piece| {
        matches!(piece, Piece::Open { .. } | Piece::Close { .. }) || piece.text().trim().is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every tag of `html` is closed in order, and no `<`/`&` is loose.
    fn balanced(html: &str) -> bool {
        let mut stack = Vec::new();
        for piece in pieces(html) {
            match piece {
                Piece::Open { name, .. } => stack.push(name),
                Piece::Close { name, .. } => {
                    if stack.pop() != Some(name) {
                        return false;
                    }
                }
                Piece::Text(text) => {
                    if text == "<" || text == ">" || text == "&" {
                        return false;
                    }
                }
            }
        }
        stack.is_empty()
    }

    #[test]
    fn markdown_becomes_telegram_html() {
        let html = to_telegram_html(
            "# Title\n\nSome **bold**, *it*, ~~gone~~ and `a<b`.\n\n- one\n- two\n\n1. first\n2. second\n\n```rust\nlet a = 1 < 2 && b;\n```\n\n> quoted",
        );
        assert_eq!(
            html,
            "<b>Title</b>\n\nSome <b>bold</b>, <i>it</i>, <s>gone</s> and <code>a&lt;b</code>.\n\n\
             • one\n• two\n\n1. first\n2. second\n\n\
             <pre><code class=\"language-rust\">let a = 1 &lt; 2 &amp;&amp; b;</code></pre>\n\n\
             <blockquote>quoted</blockquote>"
        );
        assert!(balanced(&html));
    }

    #[test]
    fn html_of_the_model_is_text_and_links_are_filtered() {
        let html = to_telegram_html(
            "hi <script>x</script> [ok](https://example.com/?a=1&b=2) [bad](javascript:alert(1)) ![p](https://example.com/p.png)",
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(
            html.contains("<a href=\"https://example.com/?a=1&amp;b=2\">ok</a>"),
            "{html}"
        );
        assert!(!html.contains("javascript"), "{html}");
        assert!(
            html.contains("<a href=\"https://example.com/p.png\">p</a>"),
            "{html}"
        );
        assert!(balanced(&html));
    }

    #[test]
    fn a_short_text_is_one_part() {
        assert_eq!(split("<b>hi</b> there", 4096), ["<b>hi</b> there"]);
    }

    #[test]
    fn parts_end_at_paragraphs_first() {
        let first = "a".repeat(60);
        let second = "b ".repeat(30);
        let html = format!("{first}\n\nline one\n{second}");
        let parts = split(&html, 80);
        assert_eq!(parts[0], first);
        assert!(parts.iter().all(|p| units(p) <= 80), "{parts:?}");
        assert_eq!(
            parts.concat().replace([' ', '\n'], ""),
            html.replace([' ', '\n'], "")
        );
    }

    #[test]
    fn parts_end_at_lines_then_words() {
        let html = format!(
            "{}\n{}",
            "x ".repeat(30).trim_end(),
            "y ".repeat(30).trim_end()
        );
        let parts = split(&html, 70);
        assert_eq!(parts[0], "x ".repeat(30).trim_end());
        let words = "word ".repeat(40);
        for part in split(words.trim_end(), 33) {
            assert!(units(&part) <= 33);
            assert!(part.split(' ').all(|w| w == "word"), "{part}");
        }
    }

    #[test]
    fn a_cut_inside_tags_closes_and_reopens_them_and_never_splits_an_entity() {
        let body = "&lt;tag&gt; and more &amp; words ".repeat(20);
        let html = format!("<pre><code class=\"language-rust\">{body}</code></pre>");
        let parts = split(&html, 100);
        assert!(parts.len() > 2);
        for part in &parts {
            assert!(units(part) <= 100, "{part}");
            assert!(balanced(part), "{part}");
            assert!(
                part.starts_with("<pre><code class=\"language-rust\">"),
                "{part}"
            );
            assert!(part.ends_with("</code></pre>"), "{part}");
        }
    }

    #[test]
    fn a_word_longer_than_a_message_is_cut_hard() {
        let html = "é".repeat(250);
        let parts = split(&html, 100);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| units(p) <= 100));
        assert_eq!(parts.concat(), html);
    }

    #[test]
    fn every_part_of_a_long_answer_fits_telegram() {
        let markdown = (0..300)
            .map(|i| format!("Paragraph {i} with **bold** text & <angle> brackets and `code`."))
            .collect::<Vec<_>>()
            .join("\n\n");
        let parts = split(&to_telegram_html(&markdown), MAX_MESSAGE);
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(units(part) <= MAX_MESSAGE);
            assert!(balanced(part), "{part}");
            assert!(part.ends_with('.'), "a part ends at a paragraph: {part}");
        }
    }
}
