//! Reports from a diff: the terminal summary, JSON (the `DiffReport` schema, see
//! docs/report-format.md), Markdown for a CI comment, and one self-contained HTML file
//! with plots (plotters, SVG inline); plus the nightly history and its trend table.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bisect::BisectReport;
use crate::diff::{DiffReport, Judgement, PromptDiff, TapDiff};
use crate::error::{Error, Result};
use crate::taps::{Tap, LAYER_TAPS};

/// Most heatmap columns; longer prompts are binned (each bin shows its worst row).
const HEATMAP_BINS: usize = 256;
/// Values below this are drawn at the floor of the log axes.
const PLOT_FLOOR: f64 = 1e-10;

fn sci(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else if v.is_nan() {
        "nan".into()
    } else {
        format!("{v:.2e}")
    }
}

fn worst_tap(p: &PromptDiff) -> Option<&TapDiff> {
    p.taps.iter().max_by(|a, b| a.max_rel_l2().total_cmp(&b.max_rel_l2()))
}

/// The compact summary printed by `resbisect diff`.
pub fn terminal_summary(r: &DiffReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "A: {} ({}, {} {}, {:?})", r.a.path, r.a.engine.name, r.a.engine.backend, r.a.engine.dtype, r.a.status);
    let _ = writeln!(s, "B: {} ({}, {} {}, {:?})", r.b.path, r.b.engine.name, r.b.engine.backend, r.b.engine.dtype, r.b.status);
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for p in &r.prompts {
        let compared: usize = p.taps.iter().map(|t| t.rows.len()).sum();
        match &p.first {
            None => {
                let w = worst_tap(p).map(|t| format!("; max rel_l2 {} at {}", sci(t.max_rel_l2()), t.tap)).unwrap_or_default();
                let _ = writeln!(s, "\nprompt {} ({} tokens): no divergence over {} taps, {compared} rows{w}", p.id, p.n_tokens, p.taps.len());
            }
            Some(f) => {
                let m = &f.metrics;
                let _ = writeln!(s, "\nprompt {} ({} tokens): FIRST DIVERGENCE at {}, position {} (token {})", p.id, p.n_tokens, f.tap, f.position, f.token);
                if p.judged == Judgement::NoiseFloor {
                    let _ = writeln!(s, "  judged against the noise floor (threshold rel_l2 {}) from {}, where a systematic error begins", sci(f.tolerance.rel_l2), p.drift_onset.as_deref().unwrap_or("the first tap"));
                }
                if let Some(k) = f.shift {
                    let _ = writeln!(s, "  A's rows equal B's shifted by {k:+} positions (A at p holds B's p{:+})", -k);
                }
                let _ = writeln!(
                    s,
                    "  rel_l2 {}  max_abs {}  cosine {:.6}  nmse {}  sqnr {:.1} dB  non-finite A/B {}/{}  (tolerance rel_l2 {}, abs {})",
                    sci(m.rel_l2), sci(m.max_abs), m.cosine, sci(m.nmse), m.sqnr_db, m.nonfinite_a, m.nonfinite_b, sci(f.tolerance.rel_l2), sci(f.tolerance.abs)
                );
                if let Some(l) = &m.logits {
                    let _ = writeln!(s, "  logits: KL {}  top-1 {}  top-5 overlap {}/5", sci(l.kl), if l.top1_agree { "agrees" } else { "differs" }, l.top5_overlap);
                }
                let ch: Vec<String> = f.top_channels.iter().take(5).map(|c| format!("[{}] A {:.4} B {:.4}", c.index, c.a, c.b)).collect();
                let _ = writeln!(s, "  top channels by |A-B|: {}", ch.join(", "));
                if !f.heads.is_empty() {
                    let h: Vec<String> = f.heads.iter().take(4).map(|h| format!("head {} {}", h.head, sci(h.rel_l2))).collect();
                    let _ = writeln!(s, "  heads by rel_l2: {}", h.join(", "));
                }
                let g: Vec<String> = f.growth.iter().take(8).map(|g| format!("{} {}", g.tap, g.at_position.map(sci).unwrap_or_else(|| "-".into()))).collect();
                if !g.is_empty() {
                    let _ = writeln!(s, "  downstream at position {}: {}", f.position, g.join(", "));
                }
                let bad: usize = p.taps.iter().filter(|t| t.first_bad.is_some()).count();
                let _ = writeln!(s, "  {bad} of {} taps diverge somewhere", p.taps.len());
            }
        }
        if let Some(m) = &p.token_mismatch {
            let _ = writeln!(s, "  TOKENS DIFFER: {}", m.describe());
        }
        if !p.missing_in_a.is_empty() {
            let _ = writeln!(s, "  missing in A ({}): {}", p.missing_in_a.len(), abbreviate(&p.missing_in_a));
        }
        if !p.missing_in_b.is_empty() {
            let _ = writeln!(s, "  missing in B ({}): {}", p.missing_in_b.len(), abbreviate(&p.missing_in_b));
        }
    }
    let result = match r.engine_failure() {
        Some(f) => format!("result: ENGINE FAILURE: {f}{}", if r.diverged { " (and a divergence in what was compared)" } else { "" }),
        None if r.diverged => "result: DIVERGENCE".into(),
        None => "result: no divergence".into(),
    };
    let _ = writeln!(s, "\n{result}");
    s
}

fn abbreviate(v: &[String]) -> String {
    if v.len() <= 6 {
        v.join(", ")
    } else {
        format!("{}, … {}", v[..3].join(", "), v[v.len() - 2..].join(", "))
    }
}

/// Markdown for a CI comment.
pub fn markdown(r: &DiffReport) -> String {
    let mut s = String::new();
    let verdict = match r.engine_failure() {
        Some(f) => format!("engine failure — {}", md_text(&f)),
        None if r.diverged => "divergence found".into(),
        None => "no divergence".into(),
    };
    let _ = writeln!(s, "## resbisect: {verdict}\n");
    let _ = writeln!(s, "- A: `{}` — {} ({} {}), {:?}", md_code(&r.a.path), md_text(&r.a.engine.name), md_text(&r.a.engine.backend), md_text(&r.a.engine.dtype), r.a.status);
    let _ = writeln!(s, "- B: `{}` — {} ({} {}), {:?}", md_code(&r.b.path), md_text(&r.b.engine.name), md_text(&r.b.engine.backend), md_text(&r.b.engine.dtype), r.b.status);
    for n in &r.notes {
        let _ = writeln!(s, "- note: {}", md_text(n));
    }
    let _ = writeln!(s, "\n| prompt | tokens | first divergence | position | rel_l2 | max_abs | worst tap |\n|---|---|---|---|---|---|---|");
    for p in &r.prompts {
        let worst = worst_tap(p).map(|t| format!("{} {}", t.tap, sci(t.max_rel_l2()))).unwrap_or_default();
        match &p.first {
            Some(f) => {
                let _ = writeln!(s, "| {} | {} | **{}** | {} | {} | {} | {} |", md_text(&p.id), p.n_tokens, f.tap, f.position, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), worst);
            }
            None => {
                let _ = writeln!(s, "| {} | {} | none | | | | {} |", md_text(&p.id), p.n_tokens, worst);
            }
        }
    }
    s
}

fn md_code(s: &str) -> String {
    s.replace('`', "'")
}

fn md_text(s: &str) -> String {
    s.chars().flat_map(|c| match c {
        '|' | '*' | '_' | '`' | '<' | '>' | '[' | ']' | '\\' => vec!['\\', c],
        '\n' | '\r' => vec![' '],
        c => vec![c],
    }).collect()
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

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::input(format!("drawing a plot: {e}"))
}

fn clamp_log(v: f64) -> f64 {
    if v.is_nan() || v.is_infinite() {
        1e3
    } else {
        v.clamp(PLOT_FLOOR, 1e3)
    }
}

/// Max rel L2 over positions against layer, one line per layer tap kind.
fn error_vs_layer_svg(p: &PromptDiff, n_layer: usize) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("max rel L2 over positions, by layer", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n_layer as f64 - 0.5).max(0.5), (PLOT_FLOOR..1e3f64).log_scale())
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc("layer").y_desc("rel L2").x_label_formatter(&|v| format!("{v:.0}")).y_label_formatter(&|v| format!("{v:.0e}")).draw().map_err(plot_err)?;
        for (k, name) in LAYER_TAPS.iter().enumerate() {
            let pts: Vec<(f64, f64)> = p
                .taps
                .iter()
                .filter_map(|t| match Tap::parse(&t.tap) {
                    Some(Tap::Layer(l, i)) if i == k => Some((l as f64, clamp_log(t.max_rel_l2()))),
                    _ => None,
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|(x, y)| Circle::new((x, y), 3, color.filled()))).map_err(plot_err)?;
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.85)).position(SeriesLabelPosition::UpperLeft).draw().map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Layer × position heatmap of one tap kind's rel L2 (log colour scale).
fn heatmap_svg(p: &PromptDiff, kind: &str) -> Result<Option<String>> {
    let rows: Vec<(usize, &TapDiff)> = p
        .taps
        .iter()
        .filter_map(|t| match Tap::parse(&t.tap) {
            Some(Tap::Layer(l, i)) if LAYER_TAPS[i] == kind => Some((l, t)),
            _ => None,
        })
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let max_pos = rows.iter().filter_map(|(_, t)| t.positions.last()).max().copied().unwrap_or(0) + 1;
    let bins = max_pos.min(HEATMAP_BINS);
    let bin_of = |pos: usize| pos * bins / max_pos;
    let n_layers = rows.iter().map(|(l, _)| l + 1).max().unwrap_or(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{kind}: log10 rel L2, layer x position (worst per bin of {} positions)", max_pos.div_ceil(bins)), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..max_pos as f64, 0f64..n_layers as f64)
            .map_err(plot_err)?;
        chart.configure_mesh().disable_mesh().x_desc("position").y_desc("layer").x_label_formatter(&|v| format!("{v:.0}")).y_label_formatter(&|v| format!("{v:.0}")).draw().map_err(plot_err)?;
        for (layer, t) in &rows {
            let mut cells = vec![f64::NAN; bins];
            for (pos, r) in t.positions.iter().zip(&t.rows) {
                let v = if r.nonfinite_a + r.nonfinite_b > 0 { f64::INFINITY } else { r.rel_l2 };
                let c = &mut cells[bin_of(*pos)];
                *c = if c.is_nan() { v } else { c.max(v) };
            }
            let width = max_pos as f64 / bins as f64;
            chart
                .draw_series(cells.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(b, &v)| {
                    // -10 (blue, noise) .. 0 and above (red, wrong)
                    let x = ((clamp_log(v).log10() + 10.0) / 10.0).clamp(0.0, 1.0);
                    let color = HSLColor(0.66 * (1.0 - x), 0.85, 0.5);
                    Rectangle::new([(b as f64 * width, *layer as f64), ((b + 1) as f64 * width, *layer as f64 + 1.0)], color.filled())
                }))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;max-width:1000px;color:#222}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
.callout{padding:12px 16px;border-radius:6px;margin:12px 0}.bad{background:#fde2e2;border:1px solid #e57373}\
.good{background:#e3f6e5;border:1px solid #81c784}pre.prompt{white-space:pre-wrap;background:#f6f6f6;padding:8px;max-height:200px;overflow:auto}\
pre.reproduce{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:8px;font-size:12px}\
.legend{font-size:12px;color:#555}";

/// One self-contained HTML file: no script, no external resource; every piece of text
/// from the dumps is escaped.
pub fn html(r: &DiffReport) -> Result<String> {
    let mut s = String::new();
    let title = if r.diverged { "divergence found" } else { "no divergence" };
    let _ = write!(s, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect: {title}</title><style>{STYLE}</style></head><body>");
    let _ = write!(s, "<h1>resbisect: {title}</h1><table>");
    for (name, side) in [("A", &r.a), ("B", &r.b)] {
        let _ = write!(
            s,
            "<tr><th>{name}</th><td>{}</td><td>{} · {} · {}</td><td>{:?}{}</td></tr>",
            html_escape(&side.path),
            html_escape(&side.engine.name),
            html_escape(&side.engine.backend),
            html_escape(&side.engine.dtype),
            side.status,
            side.error.as_ref().map(|e| format!(": {}", html_escape(&e.message))).unwrap_or_default()
        );
    }
    s.push_str("</table>");
    for n in &r.notes {
        let _ = write!(s, "<p class=\"legend\">note: {}</p>", html_escape(n));
    }
    for p in &r.prompts {
        let _ = write!(s, "<h2>prompt {} <small>({} tokens)</small></h2>", html_escape(&p.id), p.n_tokens);
        match &p.first {
            Some(f) => {
                let _ = write!(
                    s,
                    "<div class=\"callout bad\"><b>First divergence: {} at position {}</b> (token {})<br>rel L2 {} · max |A−B| {} · cosine {:.6} · SQNR {:.1} dB · non-finite A/B {}/{} · tolerance rel L2 {}",
                    html_escape(&f.tap), f.position, f.token, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), f.metrics.cosine, f.metrics.sqnr_db, f.metrics.nonfinite_a, f.metrics.nonfinite_b, sci(f.tolerance.rel_l2)
                );
                if let Some(l) = &f.metrics.logits {
                    let _ = write!(s, "<br>logits: KL {} · top-1 {} · top-5 overlap {}/5", sci(l.kl), if l.top1_agree { "agrees" } else { "differs" }, l.top5_overlap);
                }
                s.push_str("<table><tr><th>channel</th><th>A</th><th>B</th></tr>");
                for c in &f.top_channels {
                    let _ = write!(s, "<tr><td>{}</td><td>{:.6}</td><td>{:.6}</td></tr>", c.index, c.a, c.b);
                }
                s.push_str("</table>");
                if !f.growth.is_empty() {
                    s.push_str("<p>Downstream:</p><table><tr><th>tap</th><th>rel L2 at this position</th><th>max rel L2</th></tr>");
                    for g in f.growth.iter().take(40) {
                        let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", html_escape(&g.tap), g.at_position.map(sci).unwrap_or_default(), sci(g.max_rel_l2));
                    }
                    s.push_str("</table>");
                }
                s.push_str("</div>");
            }
            None => {
                let w = worst_tap(p).map(|t| format!(" — max rel L2 {} at {}", sci(t.max_rel_l2()), html_escape(&t.tap))).unwrap_or_default();
                let _ = write!(s, "<div class=\"callout good\"><b>No divergence</b> over {} taps{w}</div>", p.taps.len());
            }
        }
        if let Some(text) = &p.text {
            let _ = write!(s, "<details><summary>prompt text</summary><pre class=\"prompt\">{}</pre></details>", html_escape(text));
        }
        s.push_str(&error_vs_layer_svg(p, r.n_layer)?);
        if let Some(svg) = heatmap_svg(p, "resid_post")? {
            s.push_str(&svg);
            s.push_str("<p class=\"legend\">colour: blue = rel L2 ≤ 1e-10, red = rel L2 ≥ 1; a vertical edge shows the position where a long-context collapse starts.</p>");
        }
        if !p.missing_in_a.is_empty() || !p.missing_in_b.is_empty() {
            let _ = write!(s, "<p>missing in A: {} · missing in B: {}</p>", html_escape(&abbreviate(&p.missing_in_a)), html_escape(&abbreviate(&p.missing_in_b)));
        }
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// Write report.json, report.md and report.html into `dir`.
pub fn write_all(r: &DiffReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_vec(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [("report.json", json), ("report.md", markdown(r).into_bytes()), ("report.html", html(r)?.into_bytes())] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// One line of the nightly history (JSONL): a run's verdict per prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub run: String,
    pub date: String,
    pub prompts: Vec<HistoryPrompt>,
    /// The run's engine failed or never finished: no prompt of it counts as clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPrompt {
    pub id: String,
    pub diverged: bool,
    pub first_tap: Option<String>,
    pub first_position: Option<usize>,
    pub max_rel_l2: f64,
}

pub fn history_entry(r: &DiffReport, run: &str) -> HistoryEntry {
    HistoryEntry {
        run: run.to_string(),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        prompts: r
            .prompts
            .iter()
            .map(|p| HistoryPrompt {
                id: p.id.clone(),
                diverged: p.diverged(),
                first_tap: p.first.as_ref().map(|f| f.tap.clone()),
                first_position: p.first.as_ref().map(|f| f.position),
                max_rel_l2: worst_tap(p).map(|t| if t.max_rel_l2().is_finite() { t.max_rel_l2() } else { 1e3 }).unwrap_or(0.0),
            })
            .collect(),
        engine_failure: r.engine_failure(),
    }
}

pub fn append_history(path: &Path, entry: &HistoryEntry) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(entry).map_err(|e| Error::input(format!("history: {e}")))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

pub fn read_history(path: &Path) -> Result<Vec<HistoryEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::input(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

/// Per prompt, the run where its current divergence streak began (None if it is
/// healthy in the latest run).
pub fn first_bad_runs(history: &[HistoryEntry]) -> Vec<(String, Option<String>)> {
    let mut ids: Vec<String> = Vec::new();
    for e in history {
        for p in &e.prompts {
            if !ids.contains(&p.id) {
                ids.push(p.id.clone());
            }
        }
    }
    ids.into_iter()
        .map(|id| {
            let mut start = None;
            for e in history {
                match e.prompts.iter().find(|p| p.id == id) {
                    Some(p) if p.diverged && start.is_none() => start = Some(e.run.clone()),
                    Some(p) if p.diverged => {}
                    Some(_) => start = None,
                    None => {}
                }
            }
            (id, start)
        })
        .collect()
}

/// A prompt's verdict in one run: (diverged, `tap@position` or `ok <worst rel L2>`).
fn trend_cell(e: &HistoryEntry, id: &str) -> Option<(bool, String)> {
    e.prompts.iter().find(|p| p.id == id).map(|p| match &p.first_tap {
        Some(tap) if p.diverged => (true, format!("{tap}@{}", p.first_position.map(|v| v.to_string()).unwrap_or_default())),
        _ if p.diverged => (true, "diverged".into()),
        _ if e.engine_failure.is_some() => (true, "engine failed".into()),
        _ => (false, format!("ok {}", sci(p.max_rel_l2))),
    })
}

/// Trend table (Markdown) and HTML page with one line per prompt of max rel L2 per run.
pub fn trend(history: &[HistoryEntry]) -> Result<(String, String)> {
    if history.is_empty() {
        return Err(Error::input("the history is empty"));
    }
    let firsts = first_bad_runs(history);
    let ids: Vec<&String> = firsts.iter().map(|(id, _)| id).collect();
    let mut md = String::from("## resbisect trend\n\n| run |");
    for id in &ids {
        let _ = write!(md, " {} |", md_text(id));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(ids.len()));
    md.push('\n');
    for e in history {
        let _ = write!(md, "| {} |", md_text(&e.run));
        for id in &ids {
            let cell = match trend_cell(e, id) {
                Some((true, text)) => format!(" **{}** |", md_text(&text)),
                Some((false, text)) => format!(" {text} |"),
                None => " |".into(),
            };
            md.push_str(&cell);
        }
        md.push('\n');
    }
    md.push('\n');
    for (id, first) in &firsts {
        if let Some(run) = first {
            let _ = writeln!(md, "- **{}** has diverged since run {}", md_text(id), md_text(run));
        }
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("worst rel L2 per run", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(history.len() as f64 - 0.5).max(0.5), (PLOT_FLOOR..1e3f64).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("run")
            .x_label_formatter(&|x| history.get(x.round() as usize).map(|e| e.run.clone()).unwrap_or_default())
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_err)?;
        for (k, id) in ids.iter().enumerate() {
            let pts: Vec<(f64, f64)> = history.iter().enumerate().filter_map(|(i, e)| e.prompts.iter().find(|p| &&p.id == id).map(|p| (i as f64, clamp_log(p.max_rel_l2)))).collect();
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(plot_err)?
                .label(id.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.85)).draw().map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    let mut html = format!("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect trend</title><style>{STYLE}</style></head><body><h1>resbisect trend</h1><table><tr><th>run</th>");
    for id in &ids {
        let _ = write!(html, "<th>{}</th>", html_escape(id));
    }
    html.push_str("</tr>");
    for e in history {
        let _ = write!(html, "<tr><td>{}</td>", html_escape(&e.run));
        for id in &ids {
            let cell = match trend_cell(e, id) {
                Some((true, text)) => format!("<td style=\"background:#fde2e2\">{}</td>", html_escape(&text)),
                Some((false, text)) => format!("<td>{text}</td>"),
                None => "<td></td>".into(),
            };
            html.push_str(&cell);
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><ul>");
    for (id, first) in &firsts {
        if let Some(run) = first {
            let _ = write!(html, "<li><b>{}</b> has diverged since run {}</li>", html_escape(id), html_escape(run));
        }
    }
    html.push_str("</ul>");
    html.push_str(&svg);
    html.push_str("</body></html>\n");
    Ok((md, html))
}

/// The terminal summary of `resbisect bisect`.
pub fn bisect_summary(r: &BisectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "A: {}\nB: {}\nprompt {} ({} tokens)", r.engine_a, r.engine_b, r.prompt, r.n_tokens);
    let _ = writeln!(s, "\nsearch path:");
    for (i, p) in r.probes.iter().enumerate() {
        let _ = writeln!(s, "  {:>2}. {:<14} {:>5} tok  {:>6.2}s + {:>6.2}s  {:>9}  {}", i + 1, p.purpose, p.tokens, p.seconds_a, p.seconds_b, bytes(p.bytes_a + p.bytes_b), p.finding);
    }
    let _ = writeln!(s);
    if let Some(c) = &r.crash {
        let _ = writeln!(s, "ENGINE {} CRASHED ({}) during the {} probe: {}", c.engine, c.label, c.probe, c.error.message);
        let _ = writeln!(s, "  last tap written: {}", c.error.tap.as_deref().unwrap_or("none"));
    }
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "TOKENS DIFFER: {}", m.describe());
    }
    match &r.first {
        Some(f) => {
            let m = &f.metrics;
            let _ = writeln!(s, "FIRST DIVERGENCE: {} at position {} (token {})", f.tap, f.position, f.token);
            let _ = writeln!(s, "  rel_l2 {}  max_abs {}  cosine {:.6}  ({} rel_l2 {})", sci(m.rel_l2), sci(m.max_abs), m.cosine, judged_name(r.judged), sci(f.tolerance.rel_l2));
            if let Some(k) = f.shift {
                let _ = writeln!(s, "  A's rows equal B's shifted by {k:+} positions (A at p holds B's p{:+})", -k);
            }
        }
        None if r.crash.is_none() && r.token_mismatch.is_none() => {
            let _ = writeln!(s, "no divergence");
        }
        None => {}
    }
    if !r.noise.is_empty() {
        let _ = writeln!(s, "{}", noise_line(r));
    }
    if !r.replay.is_empty() {
        let _ = writeln!(s, "\nlocal replay on the reference from A's own inputs (max rel_l2 over positions; introduced at the {} replayed positions):", r.replay_positions.len());
        let _ = writeln!(s, "  layer  inherited   introduced  total       verdict");
        for l in &r.replay {
            let verdict = if l.introduces { "INTRODUCES error" } else if l.inherited > l.tolerance { "inherits error" } else { "clean" };
            let _ = writeln!(s, "  {:>5}  {:<10}  {:<10}  {:<10}  {verdict}", l.layer, sci(l.inherited), sci(l.introduced), sci(l.total));
        }
        if let Some(t) = r.replay_taps.iter().find(|t| t.introduces) {
            let _ = writeln!(s, "  within the layer, the first tap off its replay: {} (rel_l2 {} at position {})", t.tap, sci(t.introduced), t.at_position);
        }
    }
    let _ = writeln!(s, "\n{} runs of A, {} of B, {} dumped, {:.1} s", r.runs_a, r.runs_b, bytes(r.bytes_dumped), r.seconds);
    if !r.reproduce.is_empty() {
        let _ = writeln!(s, "reproduce:");
        for c in &r.reproduce {
            let _ = writeln!(s, "  {c}");
        }
    }
    s
}

fn judged_name(j: Judgement) -> &'static str {
    match j {
        Judgement::Tolerance => "tolerance",
        Judgement::NoiseFloor => "noise-floor threshold",
    }
}

/// What rows were judged against, and the floor against the level the coarse probe
/// measured along the residual stream.
fn noise_line(r: &BisectReport) -> String {
    let Some(n0) = r.noise.first() else { return format!("judged against {}", judged_name(r.judged)) };
    let levels: Vec<String> = r.noise.iter().map(|n| format!("{} {}", n.tap.trim_end_matches(".resid_post"), sci(n.p75_rel_l2))).collect();
    format!(
        "judged against the {}; noise-floor threshold rel_l2 {} (tolerance {}); coarse residual stream, 75th-percentile row rel_l2: {}",
        judged_name(r.judged),
        sci(n0.floor),
        sci(n0.tolerance),
        levels.join(", ")
    )
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn bisect_title(r: &BisectReport) -> String {
    match (&r.crash, &r.first) {
        (Some(c), _) => format!("engine {} crashed", c.engine),
        (None, Some(f)) => format!("first divergence at {}, position {}", f.tap, f.position),
        (None, None) => "no divergence".into(),
    }
}

/// Markdown for a CI comment.
pub fn bisect_markdown(r: &BisectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## resbisect bisect: {}\n", md_text(&bisect_title(r)));
    let _ = writeln!(s, "- A: {}\n- B: {}\n- prompt {} ({} tokens, final probes on {})", md_text(&r.engine_a), md_text(&r.engine_b), md_text(&r.prompt), r.n_tokens, r.prefix);
    if let Some(c) = &r.crash {
        let _ = writeln!(s, "- crash of {} in the {} probe: {} (last tap written: {})", c.engine, md_text(&c.probe), md_text(&c.error.message), md_text(c.error.tap.as_deref().unwrap_or("none")));
    }
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "- **tokens differ**: {}", md_text(&m.describe()));
    }
    if let Some(f) = &r.first {
        let _ = writeln!(s, "- first divergence **{}** at position {}: rel_l2 {}, max_abs {}", f.tap, f.position, sci(f.metrics.rel_l2), sci(f.metrics.max_abs));
    }
    let _ = writeln!(s, "- {}", md_text(&noise_line(r)));
    if !r.replay.is_empty() {
        let _ = writeln!(s, "\n| layer | inherited | introduced | total | introduces |\n|---|---|---|---|---|");
        for l in &r.replay {
            let _ = writeln!(s, "| {} | {} | {} | {} | {} |", l.layer, sci(l.inherited), sci(l.introduced), sci(l.total), if l.introduces { "**yes**" } else { "no" });
        }
    }
    let _ = writeln!(s, "\n| probe | tokens | layers | taps | seconds A/B | bytes | finding |\n|---|---|---|---|---|---|---|");
    for p in &r.probes {
        let _ = writeln!(s, "| {} | {} | {:?} | {} | {:.2}/{:.2} | {} | {} |", md_text(&p.purpose), p.tokens, p.layers, md_text(&p.taps.join(",")), p.seconds_a, p.seconds_b, bytes(p.bytes_a + p.bytes_b), md_text(&p.finding));
    }
    let _ = writeln!(s, "\nReproduce:\n\n```sh\n{}\n```", r.reproduce.iter().map(|c| md_code(c)).collect::<Vec<_>>().join("\n"));
    s
}

/// Self-contained HTML: verdict, local replay, the search path, reproduce commands.
pub fn bisect_html(r: &BisectReport) -> String {
    let mut s = String::new();
    let title = html_escape(&bisect_title(r));
    let _ = write!(s, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect bisect: {title}</title><style>{STYLE}</style></head><body>");
    let _ = write!(s, "<h1>resbisect bisect: {title}</h1><table>");
    let _ = write!(s, "<tr><th>A</th><td>{}</td></tr><tr><th>B</th><td>{}</td></tr>", html_escape(&r.engine_a), html_escape(&r.engine_b));
    let _ = write!(s, "<tr><th>prompt</th><td>{} ({} tokens; final probes on the first {})</td></tr></table>", html_escape(&r.prompt), r.n_tokens, r.prefix);
    if let Some(c) = &r.crash {
        let _ = write!(
            s,
            "<div class=\"callout bad\"><b>Engine {} ({}) crashed</b> during the {} probe: {}<br>last tap written: {}</div>",
            html_escape(&c.engine), html_escape(&c.label), html_escape(&c.probe), html_escape(&c.error.message), html_escape(c.error.tap.as_deref().unwrap_or("none"))
        );
    }
    if let Some(m) = &r.token_mismatch {
        let _ = write!(s, "<div class=\"callout bad\"><b>Tokens differ</b>: {}</div>", html_escape(&m.describe()));
    }
    match &r.first {
        Some(f) => {
            let _ = write!(
                s,
                "<div class=\"callout bad\"><b>First divergence: {} at position {}</b> (token {})<br>rel L2 {} · max |A−B| {} · cosine {:.6} · {} rel L2 {}</div>",
                html_escape(&f.tap), f.position, f.token, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), f.metrics.cosine, judged_name(r.judged), sci(f.tolerance.rel_l2)
            );
        }
        None if r.crash.is_none() => s.push_str("<div class=\"callout good\"><b>No divergence</b></div>"),
        None => {}
    }
    let _ = write!(s, "<p>{}</p>", html_escape(&noise_line(r)));
    if !r.replay.is_empty() {
        s.push_str(&format!("<h2>Local replay</h2><p class=\"legend\">The reference recomputes each layer from A's own dumped input: <i>introduced</i> is A's output against that replay, <i>inherited</i> A's input against B's, <i>total</i> A's output against B's (max rel L2 over positions; <i>introduced</i> over the {} positions replayed: every divergent one, thinned to 64, and evenly spaced controls).</p>", r.replay_positions.len()));
        s.push_str("<table><tr><th>layer</th><th>inherited</th><th>introduced</th><th>total</th><th>verdict</th></tr>");
        for l in &r.replay {
            let verdict = if l.introduces { "<b>introduces error</b>" } else if l.inherited > l.tolerance { "inherits error" } else { "clean" };
            let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{verdict}</td></tr>", l.layer, sci(l.inherited), sci(l.introduced), sci(l.total));
        }
        s.push_str("</table>");
        if !r.replay_taps.is_empty() {
            s.push_str("<p>Taps of the suspect layer against their replay:</p><table><tr><th>tap</th><th>introduced</th><th>at position</th><th>tolerance</th></tr>");
            for t in &r.replay_taps {
                let _ = write!(s, "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", html_escape(&t.tap), if t.introduces { " ◀" } else { "" }, sci(t.introduced), t.at_position, sci(t.tolerance));
            }
            s.push_str("</table><p class=\"legend\">◀ marks the taps whose error this layer introduces: over tolerance against the reference replayed on A's own input.</p>");
        }
    }
    s.push_str("<h2>Search path</h2><table><tr><th>#</th><th>probe</th><th>tokens</th><th>layers</th><th>taps</th><th>positions</th><th>seconds A / B</th><th>bytes</th><th>finding</th></tr>");
    for (i, p) in r.probes.iter().enumerate() {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2} / {:.2}</td><td>{}</td><td>{}</td></tr>",
            i + 1, html_escape(&p.purpose), p.tokens, html_escape(&crate::engines::layers_arg(&p.layers)), html_escape(&p.taps.join(", ")), html_escape(&p.positions), p.seconds_a, p.seconds_b, bytes(p.bytes_a + p.bytes_b), html_escape(&p.finding)
        );
    }
    let _ = write!(s, "</table><p>{} runs of A, {} of B, {} dumped, {:.1} s.</p>", r.runs_a, r.runs_b, bytes(r.bytes_dumped), r.seconds);
    // One command a line, wrapped: they hold long paths.
    let _ = write!(s, "<h2>Reproduce</h2><pre class=\"reproduce\">{}</pre>", html_escape(&r.reproduce.join("\n")));
    if r.final_diff.is_some() {
        s.push_str("<p>The full comparison of the last probe: <a href=\"report.html\">report.html</a>.</p>");
    }
    s.push_str("</body></html>\n");
    s
}

/// Write bisect.{json,md,html} and the last probe's report.{json,md,html} into `dir`.
pub fn write_bisect(r: &BisectReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(d) = &r.final_diff {
        write_all(d, dir)?;
    }
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [("bisect.json", json), ("bisect.md", bisect_markdown(r).into_bytes()), ("bisect.html", bisect_html(r).into_bytes())] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
