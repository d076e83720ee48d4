//! The HTML reports draw what was measured: bisect.html plots the coarse probe, the
//! search path and local replay; a diff report's by-layer plot spans the layers compared,
//! its heatmap carries a colour bar, and a run that crashed before dumping anything still
//! renders.

use std::path::Path;

use crate::util::*;

const COARSE_TITLE: &str = "coarse probe: resid_post rel L2 by layer and position";
const SEARCH_TITLE: &str = "search path: the layers each probe judged";
const REPLAY_TITLE: &str = "local replay: error introduced vs inherited, per layer";
const COLOUR_BAR: &str = "rel L2 (log)";

/// `resbisect bisect` on SmolLM2's 32-token prompt with a fault, reports written to `report`.
fn bisect_with_report(inject: &str, work: &Path, report: &Path) -> Output {
    let prompts = root().join("fixtures/prompts/bisect.jsonl");
    let model = smollm2();
    let args = [
        "bisect",
        "--model",
        path_str(&model),
        "--prompts",
        path_str(&prompts),
        "--id",
        "p6_len_32",
        "--inject",
        inject,
        "--work",
        path_str(work),
        "--report",
        path_str(report),
    ];
    resbisect(&args)
}

/// Whether an SVG in `html` holds a text element of exactly `label` (plotters writes
/// the text on its own line).
fn has_svg_label(html: &str, label: &str) -> bool {
    html.contains(&format!(">\n{label}\n</text>"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn bisect_html_plots_the_probes_and_the_diff_report_spans_the_layers_compared() {
    let dir = tempfile::tempdir().unwrap();
    let (work, report) = (dir.path().join("work"), dir.path().join("report"));
    let out = bisect_with_report("blk.5.ffn_up:scale=1.5@10", &work, &report);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let html = read(&report.join("bisect.html"));
    for title in [COARSE_TITLE, SEARCH_TITLE, REPLAY_TITLE, COLOUR_BAR] {
        assert!(html.contains(title), "bisect.html lacks {title:?}");
    }
    // Heatmap, search path and replay: three plots, no script.
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(!html.contains("<script"));
    // The coarse heatmap labels its rows with the coarse layers, embed first.
    assert!(
        has_svg_label(&html, "embed") && has_svg_label(&html, "29"),
        "coarse rows unlabelled"
    );

    // The last probe compared one layer: its report says why there is no by-layer plot
    // and maps that layer's taps instead.
    let last = read(&report.join("report.html"));
    assert!(
        last.contains("One layer compared (layer 5)"),
        "single-layer report not recognised"
    );
    assert!(!last.contains("by layer ("), "a by-layer plot of one layer");
    assert!(last.contains("layer 5: rel L2 by tap and position") && last.contains(COLOUR_BAR));
    assert!(has_svg_label(&last, "ffn_up"), "tap rows unlabelled");

    // The coarse probe's own diff: seven layers on the axis, a colour bar, and the
    // downstream table collapsed below the verdict.
    let coarse = work.join("01-coarse");
    let diff_dir = dir.path().join("diff");
    let out = resbisect(&[
        "report",
        "diff",
        path_str(&coarse.join("a")),
        path_str(&coarse.join("b")),
        "-o",
        path_str(&diff_dir),
    ]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let diff = read(&diff_dir.join("report.html"));
    assert!(
        diff.contains("by layer (7 layers compared)"),
        "by-layer plot missing or over the wrong layers"
    );
    assert!(diff.contains("resid_post: rel L2 by layer and position") && diff.contains(COLOUR_BAR));
    assert!(
        diff.contains("<details class=\"growth\"><summary>Downstream:"),
        "downstream table not collapsed"
    );
}

#[test]
fn a_crash_before_any_tap_still_renders_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let out = bisect_with_report("embed:oob@0", &dir.path().join("work"), &report);
    assert_eq!(out.code, 3, "{}", out.stderr);
    let html = read(&report.join("bisect.html"));
    assert!(html.contains("failed</b> during the coarse probe"), "{html}");
    assert!(
        html.contains("The coarse probe compared nothing"),
        "no word on the missing heatmap"
    );
    assert!(
        html.contains("No layer was judged"),
        "no word on the missing search path"
    );
    assert!(html.trim_end().ends_with("</body></html>"));
    let last = read(&report.join("report.html"));
    assert!(last.contains("No layer taps were compared"), "{last}");
}
