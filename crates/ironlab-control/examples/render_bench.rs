//! Benchmark client of `bench/content.sh`: server-side render (Markdown → sanitised HTML with
//! the components) of a generated 2,000-line tutorial, N times; prints one JSON line with the
//! median, p90, min and max in milliseconds.
//!
//!   cargo run --release -p ironlab-control --example render_bench -- [N] [LINES]

use std::time::Instant;

fn tutorial(lines: usize) -> String {
    let mut out = String::from("# A long tutorial\n\n");
    let mut n = 0;
    let mut section = 0;
    while out.lines().count() < lines {
        section += 1;
        out.push_str(&format!(
            "## Section {section}\n\nThis paragraph explains step {section} with *emphasis*, **strong words**, \
             `inline code` and a [link](https://example.org/{section}).\nIt continues on a second line \
             so that paragraphs are realistic.\n\n"
        ));
        out.push_str(&format!(
            "```sh\nmkdir -p /tmp/s{section}\ncd /tmp/s{section} && ls -la | grep -v total\necho \"done {section}\"\n```\n\n"
        ));
        out.push_str("| command | what it does |\n|---|---|\n| `ls` | lists |\n| `cd` | changes directory |\n\n");
        out.push_str(&format!(
            ":::hint Stuck on step {section}?\nRead the **manual**: `man mkdir`.\n:::\n\n::task{{name=step_{section}}}\n\n"
        ));
        out.push_str("- one point\n- another point with `code`\n  - nested\n\n> [!NOTE]\n> A note for the reader.\n\n<span>raw html</span> <b onclick=\"x()\">bold</b>\n\n");
        n += 1;
    }
    let _ = n;
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let lines: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let text = tutorial(lines);
    let actual_lines = text.lines().count();
    // Warm-up (the sanitiser's allow-list is built once per process).
    let html = ironlab_control::content::render::render(&text, "/content/x/static/v1/");
    let mut ms: Vec<f64> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let h = ironlab_control::content::render::render(&text, "/content/x/static/v1/");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(h.len(), html.len());
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{{\"runs\":{runs},\"lines\":{actual_lines},\"markdown_bytes\":{},\"html_bytes\":{},\"median_ms\":{:.2},\"p90_ms\":{:.2},\"min_ms\":{:.2},\"max_ms\":{:.2}}}",
        text.len(),
        html.len(),
        at(0.5),
        at(0.9),
        ms[0],
        ms[ms.len() - 1]
    );
}
