//! The model's Markdown as HTML a page can insert: CommonMark (with tables and
//! strikethrough) rendered by pulldown-cmark, which escapes all text, with what could
//! run or load something taken out. HTML the model wrote is shown as text, never
//! parsed; a link keeps its target only for `http`, `https` and `mailto` (anything
//! else, `javascript:` or a relative path, leaves the link's text alone); an image
//! becomes a link to it, so a reply never makes the page load anything by itself.

use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd, html};

const SCHEMES: [&str; 3] = ["http", "https", "mailto"];

pub(crate) fn to_safe_html(markdown: &str) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    // For each open link or image: whether its tags are kept.
    let mut kept = Vec::new();
    let events = Parser::new_ext(markdown, options).filter_map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Some(Event::Text(raw)),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        })
        | Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            let allowed = is_allowed(&dest_url);
            kept.push(allowed);
            allowed.then_some(Event::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            }))
        }
        Event::End(TagEnd::Link | TagEnd::Image) => kept
            .pop()
            .unwrap_or(false)
            .then_some(Event::End(TagEnd::Link)),
        other => Some(other),
    });
    let mut out = String::with_capacity(markdown.len() * 3 / 2);
    html::push_html(&mut out, events);
    // The newline after the last block would show at the end of a bubble.
    out.truncate(out.trim_end().len());
    out
}

fn is_allowed(url: &CowStr<'_>) -> bool {
    url::Url::parse(url).is_ok_and(|url| SCHEMES.contains(&url.scheme()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_html() {
        let html = to_safe_html("# Title\n\n- one\n- **two**\n\n```rust\nlet a = 1 < 2;\n```\n");
        assert!(html.contains("<h1>Title</h1>"), "{html}");
        assert!(html.contains("<li><strong>two</strong></li>"), "{html}");
        assert!(
            html.contains("<pre><code class=\"language-rust\">let a = 1 &lt; 2;\n</code></pre>"),
            "{html}"
        );
    }

    #[test]
    fn raw_html_is_shown_as_text() {
        let html = to_safe_html("hi <script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
    }

    #[test]
    fn only_web_and_mail_links_keep_their_target() {
        let html = to_safe_html(
            "[ok](https://example.com/a?b=1&c=2) [mail](mailto:a@example.com) \
             [bad](javascript:alert(1)) [rel](/admin) ![pic](https://example.com/p.png)",
        );
        assert!(
            html.contains(r#"<a href="https://example.com/a?b=1&amp;c=2">ok</a>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<a href="mailto:a@example.com">mail</a>"#),
            "{html}"
        );
        assert!(!html.contains("javascript"), "{html}");
        assert!(html.contains(" bad "), "{html}");
        assert!(!html.contains("/admin"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains(r#"<a href="https://example.com/p.png">pic</a>"#),
            "{html}"
        );
    }
}
