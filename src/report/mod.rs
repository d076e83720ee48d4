//! Reports from a diff: the terminal summary, JSON (the `DiffReport` schema, see
//! docs/report-format.md), Markdown for a CI comment, and one self-contained HTML file
//! with plots (plotters, SVG inline); plus the nightly history and its trend table, and
//! the same for a bisect.

mod bisect;
mod bisect_plots;
mod diff;
mod html;
mod plots;
mod trend;

pub use self::bisect::{bisect_html, bisect_markdown, bisect_summary, write_bisect};
pub use self::diff::{markdown, terminal_summary, write_all};
pub use self::html::html;
pub use self::trend::{
    append_history, first_bad_runs, history_entry, read_history, trend, HistoryEntry, HistoryPrompt,
};
use crate::diff::{PromptDiff, TapDiff};

/// The files of a report directory: a diff's, a bisect's, a trend's. A directory named
/// for reports may hold these alone ([`crate::output::prepare_output_dir`]); a new report
/// replaces them.
pub const REPORT_FILES: [&str; 8] = [
    "report.json",
    "report.md",
    "report.html",
    "bisect.json",
    "bisect.md",
    "bisect.html",
    "trend.md",
    "trend.html",
];

/// A value in the reports' scientific notation (`inf`, `nan` spelled out).
fn sci(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else if v.is_nan() {
        "nan".into()
    } else {
        format!("{v:.2e}")
    }
}

/// The tap with the largest rel L2 of a prompt.
fn worst_tap(p: &PromptDiff) -> Option<&TapDiff> {
    p.taps.iter().max_by(|a, b| a.max_rel_l2().total_cmp(&b.max_rel_l2()))
}

/// A list of tap ids, shortened past six.
pub(crate) fn abbreviate(v: &[String]) -> String {
    if v.len() <= 6 {
        v.join(", ")
    } else {
        format!("{}, … {}", v[..3].join(", "), v[v.len() - 2..].join(", "))
    }
}

/// Text for inside a Markdown code span.
/// What a first divergence's `shift` means: A's rows are B's at other positions.
fn shift_text(k: i64) -> String {
    format!(
        "A's rows equal B's shifted by {k:+} positions (A at p holds B's p{:+})",
        -k
    )
}

fn md_code(s: &str) -> String {
    s.replace('`', "'")
}

/// Text with Markdown's special characters escaped, on one line.
fn md_text(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '|' | '*' | '_' | '`' | '<' | '>' | '[' | ']' | '\\' => vec!['\\', c],
            '\n' | '\r' => vec![' '],
            c => vec![c],
        })
        .collect()
}

/// Escape text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
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

const STYLE: &str = "body{font-family:sans-serif;margin:24px;max-width:1000px;color:#222}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
.callout{padding:12px 16px;border-radius:6px;margin:12px 0}.bad{background:#fde2e2;border:1px solid #e57373}\
.good{background:#e3f6e5;border:1px solid #81c784}pre.prompt{white-space:pre-wrap;background:#f6f6f6;padding:8px;max-height:200px;overflow:auto}\
pre.reproduce{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:8px;font-size:12px}\
.legend{font-size:12px;color:#555}";
