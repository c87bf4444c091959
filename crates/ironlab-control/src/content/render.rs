//! Markdown → safe HTML for content pages.
//!
//! Author Markdown is untrusted. It is rendered with `pulldown-cmark` (CommonMark, GitHub
//! tables, strikethrough, task lists, `> [!NOTE]` alerts) and the whole result is cleaned by
//! `ammonia` with an allow-list: no `<script>`, `<style>`, `<iframe>`, `on*=` attributes,
//! `javascript:` or `data:` URLs survive. The components are written as plain HTML before
//! cleaning (so they pass the same filter) and only constant markup is added after it:
//!
//! - `::task{name=NAME}` on its own line → `<div class="content-task" data-task="NAME">`, a
//!   placeholder the checklist script fills with the task's live state;
//! - `:::hint TITLE` … `:::` → `<details class="hint"><summary>TITLE</summary>…</details>`;
//! - every fenced or indented code block → `<div class="code-block">` holding a toolbar with
//!   Copy and "Run in terminal" buttons (`data-action="copy" | "run"`) and the `<pre>`.
//!
//! Links and images to `__static__/…` are rewritten to `STATIC_BASE…` (the item's static route).

use std::sync::LazyLock;

use pulldown_cmark::{CodeBlockKind, CowStr, Event, Options, Parser, Tag, TagEnd};

/// The toolbar inserted into every code block after cleaning.
const CODE_TOOLBAR: &str = "<div class=\"code-block\"><div class=\"code-actions\">\
<button type=\"button\" class=\"code-copy\" data-action=\"copy\">Copy</button>\
<button type=\"button\" class=\"code-run\" data-action=\"run\">Run in terminal</button></div>";

static CLEANER: LazyLock<ammonia::Builder<'static>> = LazyLock::new(|| {
    let mut b = ammonia::Builder::default();
    b.add_tag_attributes("div", &["class", "data-task"])
        .add_tag_attributes("details", &["class"])
        .add_tag_attributes("code", &["class"])
        .add_tag_attributes("pre", &["class"])
        .add_tag_attributes("blockquote", &["class"])
        .add_tag_attributes("span", &["class"])
        .add_tag_attributes("h1", &["id"])
        .add_tag_attributes("h2", &["id"])
        .add_tag_attributes("h3", &["id"])
        .url_schemes(["http", "https", "mailto"].into_iter().collect())
        .link_rel(Some("noopener noreferrer nofollow"));
    b
});

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn is_task_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Rewrites the component lines (outside code fences) into HTML blocks.
fn components(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len() + 256);
    let mut fence: Option<(char, usize)> = None;
    let mut open_hints = 0usize;
    for line in markdown.lines() {
        let t = line.trim();
        if let Some((c, n)) = fence_of(t) {
            match fence {
                None => fence = Some((c, n)),
                Some((fc, fnn))
                    if c == fc && n >= fnn && t.trim_start_matches(c).trim().is_empty() =>
                {
                    fence = None
                }
                _ => {}
            }
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if fence.is_none() {
            if let Some(name) = t
                .strip_prefix("::task{")
                .and_then(|r| r.strip_suffix('}'))
                .and_then(|r| r.trim().strip_prefix("name="))
                .map(|n| n.trim_matches('"'))
                .filter(|n| is_task_name(n))
            {
                out.push_str(&format!(
                    "\n<div class=\"content-task\" data-task=\"{name}\"></div>\n\n"
                ));
                continue;
            }
            if let Some(rest) = t.strip_prefix(":::hint") {
                let title = rest.trim();
                let title = if title.is_empty() { "Hint" } else { title };
                out.push_str(&format!(
                    "\n<details class=\"hint\"><summary>{}</summary>\n\n",
                    escape(title)
                ));
                open_hints += 1;
                continue;
            }
            if t == ":::" && open_hints > 0 {
                out.push_str("\n</details>\n\n");
                open_hints -= 1;
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    for _ in 0..open_hints {
        out.push_str("\n</details>\n");
    }
    out
}

fn fence_of(trimmed: &str) -> Option<(char, usize)> {
    let c = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = trimmed.chars().take_while(|x| *x == c).count();
    (n >= 3).then_some((c, n))
}

fn rewrite_static<'a>(dest: CowStr<'a>, static_base: &str) -> CowStr<'a> {
    let d = dest.strip_prefix("./").unwrap_or(&dest);
    match d.strip_prefix("__static__/") {
        Some(rest) => CowStr::from(format!("{static_base}{rest}")),
        None => dest,
    }
}

/// Renders author Markdown to sanitised HTML. `static_base` is the URL prefix of the item's
/// `__static__/` files (ending in `/`).
pub fn render(markdown: &str, static_base: &str) -> String {
    let source = components(markdown);
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_GFM;
    let events = Parser::new_ext(&source, options).flat_map(|ev| -> Vec<Event<'_>> {
        match ev {
            Event::Start(Tag::CodeBlock(kind)) => {
                let lang = match &kind {
                    CodeBlockKind::Fenced(info) => {
                        info.split_whitespace().next().unwrap_or("").to_string()
                    }
                    CodeBlockKind::Indented => String::new(),
                };
                let code = if lang.is_empty() {
                    "<pre><code>".to_string()
                } else {
                    format!("<pre><code class=\"language-{}\">", escape(&lang))
                };
                vec![Event::Html(CowStr::from(format!(
                    "<div class=\"code-block\">{code}"
                )))]
            }
            Event::End(TagEnd::CodeBlock) => {
                vec![Event::Html(CowStr::from("</code></pre></div>\n"))]
            }
            Event::Start(Tag::Image {
                link_type,
                dest_url,
                title,
                id,
            }) => vec![Event::Start(Tag::Image {
                link_type,
                dest_url: rewrite_static(dest_url, static_base),
                title,
                id,
            })],
            Event::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            }) => vec![Event::Start(Tag::Link {
                link_type,
                dest_url: rewrite_static(dest_url, static_base),
                title,
                id,
            })],
            other => vec![other],
        }
    });
    // Text inside code blocks arrives as Text events, which push_html escapes.
    let mut html = String::with_capacity(source.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, events);
    let clean = CLEANER.clean(&html).to_string();
    clean.replace("<div class=\"code-block\">", CODE_TOOLBAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(md: &str) -> String {
        render(md, "/content/demo/static/")
    }

    #[test]
    fn commonmark_and_tables() {
        let html = r("# Title\n\nSome *text* and `code`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n");
        assert!(html.contains("<h1>Title</h1>"), "{html}");
        assert!(html.contains("<em>text</em>"), "{html}");
        assert!(html.contains("<table>"), "{html}");
        assert!(html.contains("<td>2</td>"), "{html}");
    }

    #[test]
    fn scripts_handlers_javascript_links_and_iframes_are_removed() {
        let md = "Hello <script>alert(1)</script>\n\n<img src=x onerror=\"alert(2)\">\n\n\
                  [click](javascript:alert(3)) <a href=\"JaVaScRiPt:alert(4)\">x</a>\n\n\
                  <iframe src=\"https://evil.example\"></iframe>\n\n<div onclick=\"alert(5)\" style=\"x\">d</div>\n\n\
                  <svg><script>alert(6)</script></svg><style>body{}</style>\n\n\
                  <a href=\"data:text/html,<script>alert(7)</script>\">d</a>\n\n\
                  <button onclick=\"alert(8)\" data-action=\"run\">b</button>\n";
        let html = r(md);
        let lower = html.to_lowercase();
        for bad in [
            "<script",
            "onerror",
            "javascript:",
            "<iframe",
            "onclick",
            "alert(",
            "<style",
            "data:text",
            "<button",
        ] {
            assert!(!lower.contains(bad), "{bad} survived: {html}");
        }
        assert!(html.contains("Hello"), "{html}");
    }

    #[test]
    fn task_placeholder_and_hint() {
        let html = r(
            "Do it.\n\n::task{name=make_file}\n\n:::hint Stuck? <b>x</b>\nTry **touch**.\n:::\n\n::task{name=\"Bad Name\"}\n",
        );
        assert!(
            html.contains("<div class=\"content-task\" data-task=\"make_file\"></div>"),
            "{html}"
        );
        assert!(
            html.contains("<details class=\"hint\"><summary>Stuck? &lt;b&gt;x&lt;/b&gt;</summary>"),
            "{html}"
        );
        assert!(html.contains("<strong>touch</strong>"), "{html}");
        assert!(html.contains("</details>"), "{html}");
        assert!(
            html.contains("::task{name=\"Bad Name\"}"),
            "left as text: {html}"
        );
    }

    #[test]
    fn components_inside_code_are_code() {
        let html = r("```md\n::task{name=a}\n:::hint\n```\n");
        assert!(!html.contains("content-task"), "{html}");
        assert!(html.contains("::task{name=a}"), "{html}");
    }

    #[test]
    fn code_blocks_get_copy_and_run_buttons() {
        let html = r("```sh\necho '<hi>' && ls\n```\n\n    indented\n");
        assert_eq!(html.matches(CODE_TOOLBAR).count(), 2, "{html}");
        assert!(
            html.contains("<pre><code class=\"language-sh\">echo &#39;&lt;hi&gt;&#39; &amp;&amp; ls\n</code></pre>")
                || html.contains("<pre><code class=\"language-sh\">echo '&lt;hi&gt;' &amp;&amp; ls\n</code></pre>"),
            "{html}"
        );
        assert!(html.contains("data-action=\"run\">Run in terminal</button>"));
        // An author cannot smuggle a toolbar with other attributes.
        let html = r("<div class=\"code-block\" onclick=\"x()\">a</div>");
        assert!(!html.contains("onclick"), "{html}");
    }

    #[test]
    fn static_files_are_rewritten_and_external_links_get_rel() {
        let html = r("![d](__static__/d.png) ![e](./__static__/e.png) [x](https://example.org)");
        assert!(
            html.contains("src=\"/content/demo/static/d.png\""),
            "{html}"
        );
        assert!(
            html.contains("src=\"/content/demo/static/e.png\""),
            "{html}"
        );
        assert!(
            html.contains("rel=\"noopener noreferrer nofollow\""),
            "{html}"
        );
    }

    #[test]
    fn alerts_keep_their_class() {
        let html = r("> [!NOTE]\n> Read this.\n");
        assert!(html.contains("markdown-alert-note"), "{html}");
    }
}
