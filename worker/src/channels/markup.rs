//! The model's Markdown in a chat platform's own markup: WhatsApp's (`*bold*`,
//! `_italic_`, `~strike~`, `` `code` ``, ```` ``` ```` blocks) and Slack's mrkdwn
//! (the same marks, `<url|text>` links, `&`, `<`, `>` escaped). Parsed by
//! pulldown-cmark, so what is not markup stays text; headings become bold lines,
//! lists `•` / `1.` lines, images links, HTML the model wrote plain text.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Whatsapp,
    Slack,
}

pub(crate) fn convert(markdown: &str, dialect: Dialect) -> String {
    let options = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES;
    let mut out = String::with_capacity(markdown.len());
    // Per open list: the next item's number, or `None` for bullets.
    let mut lists: Vec<Option<u64>> = Vec::new();
    // Per open link or image: its target.
    let mut links: Vec<String> = Vec::new();
    // Where each open link's text starts in `out` (Slack puts the target first).
    let mut link_starts: Vec<usize> = Vec::new();
    let text = |out: &mut String, raw: &str| match dialect {
        Dialect::Whatsapp => out.push_str(raw),
        Dialect::Slack => escape_slack(out, raw),
    };
    for event in Parser::new_ext(markdown, options) {
        match event {
            Event::Start(Tag::Paragraph) | Event::Start(Tag::TableRow | Tag::TableHead) => {
                block_break(&mut out, lists.is_empty())
            }
            Event::End(TagEnd::Paragraph | TagEnd::TableRow | TagEnd::TableHead) => {}
            Event::Start(Tag::Heading { .. }) => {
                block_break(&mut out, true);
                out.push('*');
            }
            Event::End(TagEnd::Heading(_)) => out.push('*'),
            Event::Start(Tag::Strong) => out.push('*'),
            Event::End(TagEnd::Strong) => out.push('*'),
            Event::Start(Tag::Emphasis) => out.push('_'),
            Event::End(TagEnd::Emphasis) => out.push('_'),
            Event::Start(Tag::Strikethrough) => out.push('~'),
            Event::End(TagEnd::Strikethrough) => out.push('~'),
            Event::Start(Tag::BlockQuote(_)) => {
                block_break(&mut out, true);
                out.push_str("> ");
            }
            Event::End(TagEnd::BlockQuote(_)) => {}
            // A fence's language tag means nothing on either platform.
            Event::Start(Tag::CodeBlock(_)) => {
                block_break(&mut out, true);
                out.push_str("```\n");
            }
            Event::End(TagEnd::CodeBlock) => {
                if !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str("```");
            }
            Event::Start(Tag::List(first)) => {
                if lists.is_empty() {
                    block_break(&mut out, true);
                }
                lists.push(first);
            }
            Event::End(TagEnd::List(_)) => {
                lists.pop();
            }
            Event::Start(Tag::Item) => {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&"  ".repeat(lists.len().saturating_sub(1)));
                match lists.last_mut() {
                    Some(Some(number)) => {
                        out.push_str(&format!("{number}. "));
                        *number += 1;
                    }
                    _ => out.push_str("• "),
                }
            }
            Event::End(TagEnd::Item) => {}
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                links.push(dest_url.to_string());
                link_starts.push(out.len());
            }
            Event::End(TagEnd::Link | TagEnd::Image) => {
                let (Some(url), Some(start)) = (links.pop(), link_starts.pop()) else {
                    continue;
                };
                let label = out.split_off(start);
                match dialect {
                    Dialect::Slack if is_web_link(&url) => {
                        out.push('<');
                        escape_slack(&mut out, &url);
                        if !label.is_empty() && label != url {
                            out.push('|');
                            out.push_str(&label);
                        }
                        out.push('>');
                    }
                    _ if label.is_empty() || label == url => text(&mut out, &url),
                    _ => {
                        out.push_str(&label);
                        out.push_str(" (");
                        text(&mut out, &url);
                        out.push(')');
                    }
                }
            }
            Event::Start(Tag::TableCell) => {
                if !out.ends_with('\n') && !out.is_empty() && !out.ends_with("| ") {
                    out.push_str(" | ");
                }
            }
            Event::End(TagEnd::TableCell) => {}
            Event::Start(_) | Event::End(_) => {}
            Event::Text(raw) => text(&mut out, &raw),
            Event::Code(code) => {
                out.push('`');
                text(&mut out, &code);
                out.push('`');
            }
            Event::Html(raw) | Event::InlineHtml(raw) => text(&mut out, &raw),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => {
                block_break(&mut out, true);
                out.push_str("———");
            }
            Event::TaskListMarker(done) => out.push_str(if done { "[x] " } else { "[ ] " }),
            Event::FootnoteReference(name) => text(&mut out, &format!("[{name}]")),
            Event::InlineMath(math) | Event::DisplayMath(math) => text(&mut out, &math),
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// A blank line before a new block (a line end only inside lists).
fn block_break(out: &mut String, blank_line: bool) {
    if out.is_empty() {
        return;
    }
    let trimmed = out.trim_end_matches(' ').len();
    out.truncate(trimmed);
    if blank_line {
        while !out.ends_with("\n\n") {
            out.push('\n');
        }
    } else if !out.ends_with('\n') {
        out.push('\n');
    }
}

/// The three characters Slack wants escaped in text
/// (api.slack.com/reference/surfaces/formatting#escaping).
fn escape_slack(out: &mut String, raw: &str) {
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

fn is_web_link(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https" | "mailto"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whatsapp_marks() {
        let text = convert(
            "# Plan\n\nThis is **bold**, *italic*, ~~gone~~ and `x`.\n\n- one\n- two\n\n```rust\nlet a = 1;\n```",
            Dialect::Whatsapp,
        );
        assert_eq!(
            text,
            "*Plan*\n\nThis is *bold*, _italic_, ~gone~ and `x`.\n\n• one\n• two\n\n```\nlet a = 1;\n```"
        );
    }

    #[test]
    fn numbered_lists_and_links() {
        let text = convert(
            "1. [docs](https://example.com/a)\n2. <https://example.com/b>",
            Dialect::Whatsapp,
        );
        assert_eq!(
            text,
            "1. docs (https://example.com/a)\n2. https://example.com/b"
        );
    }

    #[test]
    fn slack_links_and_escapes() {
        let text = convert(
            "a < b & **c** see [the docs](https://example.com/?a=1&b=2) <script>",
            Dialect::Slack,
        );
        assert_eq!(
            text,
            "a &lt; b &amp; *c* see <https://example.com/?a=1&amp;b=2|the docs> &lt;script&gt;"
        );
        // A link that is not to the web stays text.
        assert_eq!(
            convert("[x](javascript:alert(1))", Dialect::Slack),
            "x (javascript:alert(1))"
        );
    }
}
