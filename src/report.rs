//! Reports from a diff: the terminal summary, JSON (the `DiffReport` schema, see
//! docs/report-format.md), Markdown for a CI comment, and one self-contained HTML file
//! with plots (plotters, SVG inline); plus the nightly history and its trend table.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bisect::{BisectReport, LayerAttribution};
use crate::diff::{DiffReport, Judgement, PromptDiff, TapDiff};
use crate::error::{Error, Result};
use crate::taps::{LayerTap, Tap, LAYER_TAPS};

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
    let _ = writeln!(
        s,
        "A: {} ({}, {} {}, {:?})",
        r.a.path, r.a.engine.name, r.a.engine.backend, r.a.engine.dtype, r.a.status
    );
    let _ = writeln!(
        s,
        "B: {} ({}, {} {}, {:?})",
        r.b.path, r.b.engine.name, r.b.engine.backend, r.b.engine.dtype, r.b.status
    );
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for p in &r.prompts {
        let compared: usize = p.taps.iter().map(|t| t.rows.len()).sum();
        match &p.first {
            None => {
                let w = worst_tap(p)
                    .map(|t| format!("; max rel_l2 {} at {}", sci(t.max_rel_l2()), t.tap))
                    .unwrap_or_default();
                let before = if p.token_mismatch.is_some() {
                    " before the tokens differ"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "\nprompt {} ({} tokens): no divergence{before} over {} taps, {compared} rows{w}",
                    p.id,
                    p.n_tokens,
                    p.taps.len()
                );
            }
            Some(f) => {
                let m = &f.metrics;
                let _ = writeln!(
                    s,
                    "\nprompt {} ({} tokens): FIRST DIVERGENCE at {}, position {} (token {})",
                    p.id, p.n_tokens, f.tap, f.position, f.token
                );
                if p.judged == Judgement::NoiseFloor {
                    let _ = writeln!(s, "  judged against the noise floor (threshold rel_l2 {}) from {}, where a systematic error begins", sci(f.tolerance.rel_l2), p.drift_onset.as_deref().unwrap_or("the first tap"));
                }
                if let Some(k) = f.shift {
                    let _ = writeln!(
                        s,
                        "  A's rows equal B's shifted by {k:+} positions (A at p holds B's p{:+})",
                        -k
                    );
                }
                let _ = writeln!(
                    s,
                    "  rel_l2 {}  max_abs {}  cosine {:.6}  nmse {}  sqnr {:.1} dB  non-finite A/B {}/{}  (tolerance rel_l2 {}, abs {})",
                    sci(m.rel_l2), sci(m.max_abs), m.cosine, sci(m.nmse), m.sqnr_db, m.nonfinite_a, m.nonfinite_b, sci(f.tolerance.rel_l2), sci(f.tolerance.abs)
                );
                if let Some(l) = &m.logits {
                    let _ = writeln!(
                        s,
                        "  logits: KL {}  top-1 {}  top-5 overlap {}/5",
                        sci(l.kl),
                        if l.top1_agree { "agrees" } else { "differs" },
                        l.top5_overlap
                    );
                }
                let ch: Vec<String> = f
                    .top_channels
                    .iter()
                    .take(5)
                    .map(|c| format!("[{}] A {:.4} B {:.4}", c.index, c.a, c.b))
                    .collect();
                let _ = writeln!(s, "  top channels by |A-B|: {}", ch.join(", "));
                if !f.heads.is_empty() {
                    let h: Vec<String> = f
                        .heads
                        .iter()
                        .take(4)
                        .map(|h| format!("head {} {}", h.head, sci(h.rel_l2)))
                        .collect();
                    let _ = writeln!(s, "  heads by rel_l2: {}", h.join(", "));
                }
                let g: Vec<String> = f
                    .growth
                    .iter()
                    .take(8)
                    .map(|g| format!("{} {}", g.tap, g.at_position.map(sci).unwrap_or_else(|| "-".into())))
                    .collect();
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
            let _ = writeln!(
                s,
                "  missing in A ({}): {}",
                p.missing_in_a.len(),
                abbreviate(&p.missing_in_a)
            );
        }
        if !p.missing_in_b.is_empty() {
            let _ = writeln!(
                s,
                "  missing in B ({}): {}",
                p.missing_in_b.len(),
                abbreviate(&p.missing_in_b)
            );
        }
    }
    let result = match r.engine_failure() {
        Some(f) => format!(
            "result: ENGINE FAILURE: {f}{}",
            if r.diverged {
                " (and a divergence in what was compared)"
            } else {
                ""
            }
        ),
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
    let _ = writeln!(
        s,
        "- A: `{}` — {} ({} {}), {:?}",
        md_code(&r.a.path),
        md_text(&r.a.engine.name),
        md_text(&r.a.engine.backend),
        md_text(&r.a.engine.dtype),
        r.a.status
    );
    let _ = writeln!(
        s,
        "- B: `{}` — {} ({} {}), {:?}",
        md_code(&r.b.path),
        md_text(&r.b.engine.name),
        md_text(&r.b.engine.backend),
        md_text(&r.b.engine.dtype),
        r.b.status
    );
    for n in &r.notes {
        let _ = writeln!(s, "- note: {}", md_text(n));
    }
    let _ = writeln!(s, "\n| prompt | tokens | first divergence | position | rel_l2 | max_abs | worst tap |\n|---|---|---|---|---|---|---|");
    for p in &r.prompts {
        let worst = worst_tap(p)
            .map(|t| format!("{} {}", t.tap, sci(t.max_rel_l2())))
            .unwrap_or_default();
        match &p.first {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | **{}** | {} | {} | {} | {} |",
                    md_text(&p.id),
                    p.n_tokens,
                    f.tap,
                    f.position,
                    sci(f.metrics.rel_l2),
                    sci(f.metrics.max_abs),
                    worst
                );
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

/// The layers a prompt's comparison holds layer taps of, ascending.
fn compared_layers(p: &PromptDiff) -> Vec<usize> {
    let mut layers: Vec<usize> = p
        .taps
        .iter()
        .filter_map(|t| match Tap::parse(&t.tap) {
            Some(Tap::Layer(l, _)) => Some(l),
            _ => None,
        })
        .collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// The integer a tick value stands for, when it is one (axes of rows or columns label
/// only their centres).
fn tick_index(v: f64, len: usize) -> Option<usize> {
    let i = v.round();
    ((v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < len).then_some(i as usize)
}

/// Max rel L2 over positions against layer, one line per layer tap kind; the axis spans
/// the layers compared only.
fn error_vs_layer_svg(p: &PromptDiff, layers: &[usize]) -> Result<String> {
    let (lo, hi) = (
        layers.first().copied().unwrap_or(0) as f64,
        layers.last().copied().unwrap_or(0) as f64,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("max rel L2 over positions, by layer ({} layers compared)", layers.len()),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((lo - 0.5)..(hi + 0.5), (PLOT_FLOOR..1e3f64).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc("rel L2")
            .x_labels(layers.len().min(16) + 1)
            .x_label_formatter(&|v| tick_index(*v, usize::MAX).map(|l| l.to_string()).unwrap_or_default())
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_err)?;
        for (k, name) in LAYER_TAPS.iter().enumerate() {
            let pts: Vec<(f64, f64)> = p
                .taps
                .iter()
                .filter_map(|t| match Tap::parse(&t.tap) {
                    Some(Tap::Layer(l, i)) if i.index() == k => Some((l as f64, clamp_log(t.max_rel_l2()))),
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
            chart
                .draw_series(pts.into_iter().map(|(x, y)| Circle::new((x, y), 3, color.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// log10 rel L2 at the blue end of the heatmap colour scale (the red end is 0: rel L2 1).
const HEAT_LOG_MIN: f64 = -10.0;
/// Heatmap cells of positions no row compared.
const NOT_COMPARED: RGBColor = RGBColor(228, 228, 228);

/// A rel L2 on the heatmaps' log colour scale: blue at 1e-10 and below (noise), red at
/// 1 and above and for non-finite rows.
fn heat_colour(v: f64) -> HSLColor {
    let x = ((clamp_log(v).log10() - HEAT_LOG_MIN) / -HEAT_LOG_MIN).clamp(0.0, 1.0);
    HSLColor(0.66 * (1.0 - x), 0.85, 0.5)
}

/// Rows × positions heatmap of rel L2 (log colour scale) with its colour bar. Columns
/// are the positions compared (a sparse probe's gaps are left out, not drawn as empty
/// space); past HEATMAP_BINS of them each column shows the worst row of its bin. Row
/// heights grow when there are few rows, so one layer's taps stay readable.
fn heatmap_svg(title: &str, y_desc: &str, rows: &HeatRows) -> Result<String> {
    let mut positions: Vec<usize> = rows.iter().flat_map(|(_, t)| t.positions.iter().copied()).collect();
    positions.sort_unstable();
    positions.dedup();
    let n_pos = positions.len().max(1);
    let cols = n_pos.min(HEATMAP_BINS);
    let bin_start = |b: usize| positions.get((b * n_pos).div_ceil(cols)).copied();
    let contiguous = positions
        .first()
        .zip(positions.last())
        .is_none_or(|(a, b)| b - a + 1 == positions.len());
    let per_bin = n_pos.div_ceil(cols);
    let x_desc = match (per_bin > 1, contiguous) {
        (false, true) => "position".to_string(),
        (true, true) => format!("position (each column: the worst of {per_bin})"),
        (false, false) => format!("the {} positions compared (others not drawn)", positions.len()),
        (true, false) => format!(
            "the {} positions compared (each column: the worst of {per_bin})",
            positions.len()
        ),
    };
    let n_rows = rows.len().max(1);
    let row_px = (300 / n_rows).clamp(12, 40) as u32;
    let label_px = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(2) as u32 * 8 + 20;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, row_px * n_rows as u32 + 110)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let body = root.titled(title, ("sans-serif", 16)).map_err(plot_err)?;
        let (left, bar) = body.split_horizontally(770);
        let mut chart = ChartBuilder::on(&left)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(label_px.max(45))
            .build_cartesian_2d(-0.5f64..cols as f64 - 0.5, -0.5f64..n_rows as f64 - 0.5)
            .map_err(plot_err)?;
        chart.plotting_area().fill(&NOT_COMPARED).map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols.min(14))
            .y_labels(n_rows.min(16))
            .x_label_formatter(&|v| {
                tick_index(*v, cols)
                    .and_then(bin_start)
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            })
            .y_label_formatter(&|v| {
                tick_index(*v, rows.len())
                    .map(|i| rows[i].0.clone())
                    .unwrap_or_default()
            })
            .draw()
            .map_err(plot_err)?;
        for (y, (_, t)) in rows.iter().enumerate() {
            let mut cells = vec![f64::NAN; cols];
            for (pos, r) in t.positions.iter().zip(&t.rows) {
                let Ok(i) = positions.binary_search(pos) else { continue };
                let v = if r.nonfinite_a + r.nonfinite_b > 0 {
                    f64::INFINITY
                } else {
                    r.rel_l2
                };
                let c = &mut cells[i * cols / n_pos];
                *c = if c.is_nan() { v } else { c.max(v) };
            }
            let y = y as f64;
            chart
                .draw_series(cells.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(b, &v)| {
                    let x = b as f64;
                    Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat_colour(v).filled())
                }))
                .map_err(plot_err)?;
        }
        // The colour bar: same margins and label areas as the map, so their heights match.
        let mut scale = ChartBuilder::on(&bar)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..1f64, HEAT_LOG_MIN..0f64)
            .map_err(plot_err)?;
        scale
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            // Explicit sizes: the defaults scale with the narrow bar's area and come out unreadable.
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .y_desc("rel L2 (log)")
            .y_labels(6)
            .y_label_formatter(&|v| format!("1e{v:.0}"))
            .draw()
            .map_err(plot_err)?;
        let steps = 60;
        let step = -HEAT_LOG_MIN / steps as f64;
        scale
            .draw_series((0..steps).map(|i| {
                let lo = HEAT_LOG_MIN + i as f64 * step;
                Rectangle::new(
                    [(0.0, lo), (1.0, lo + step)],
                    heat_colour(10f64.powf(lo + step / 2.0)).filled(),
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

const HEATMAP_LEGEND: &str = "<p class=\"legend\">colour: rel L2 on the log scale of the bar beside the map: blue = 1e-10 or below (noise), red = 1 or above, or non-finite; grey = not compared. A vertical edge shows the position where a long-context collapse starts.</p>";

/// A heatmap's rows, each a label and the tap it shows.
type HeatRows<'a> = Vec<(String, &'a TapDiff)>;

/// The heatmap rows of a comparison: resid_post by layer over several layers, or every
/// tap of the layer when only one was compared; with the plot's title and row axis.
fn heatmap_rows<'a>(p: &'a PromptDiff, layers: &[usize]) -> Option<(String, &'static str, HeatRows<'a>)> {
    let mut rows: Vec<(usize, usize, &TapDiff)> = p
        .taps
        .iter()
        .filter_map(|t| match Tap::parse(&t.tap) {
            Some(Tap::Layer(l, i)) => Some((l, i.index(), t)),
            _ => None,
        })
        .collect();
    rows.sort_by_key(|(l, i, _)| (*l, *i));
    match layers {
        [] => None,
        [l] => Some((
            format!("layer {l}: rel L2 by tap and position"),
            "tap",
            rows.into_iter()
                .map(|(_, i, t)| (LAYER_TAPS[i].to_string(), t))
                .collect(),
        )),
        _ => {
            let resid = rows
                .into_iter()
                .filter(|(_, i, _)| LAYER_TAPS[*i] == "resid_post")
                .map(|(l, _, t)| (l.to_string(), t))
                .collect::<Vec<_>>();
            (!resid.is_empty()).then(|| ("resid_post: rel L2 by layer and position".to_string(), "layer", resid))
        }
    }
}

/// The by-layer plot and the heatmap of one prompt, or a line saying why one is left out.
fn prompt_plots(p: &PromptDiff) -> Result<String> {
    let layers = compared_layers(p);
    let mut s = String::new();
    match layers.as_slice() {
        [] => s.push_str("<p class=\"legend\">No layer taps were compared: no by-layer plot or heatmap.</p>"),
        [l] => {
            let _ = write!(s, "<p class=\"legend\">One layer compared (layer {l}): no by-layer plot; the heatmap shows each of its taps.</p>");
        }
        _ => s.push_str(&error_vs_layer_svg(p, &layers)?),
    }
    if let Some((title, y_desc, rows)) = heatmap_rows(p, &layers) {
        s.push_str(&heatmap_svg(&title, y_desc, &rows)?);
        s.push_str(HEATMAP_LEGEND);
    }
    Ok(s)
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
    let title = if r.diverged {
        "divergence found"
    } else {
        "no divergence"
    };
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
            side.error
                .as_ref()
                .map(|e| format!(": {}", html_escape(&e.message)))
                .unwrap_or_default()
        );
    }
    s.push_str("</table>");
    for n in &r.notes {
        let _ = write!(s, "<p class=\"legend\">note: {}</p>", html_escape(n));
    }
    for p in &r.prompts {
        let _ = write!(
            s,
            "<h2>prompt {} <small>({} tokens)</small></h2>",
            html_escape(&p.id),
            p.n_tokens
        );
        match &p.first {
            Some(f) => {
                let _ = write!(
                    s,
                    "<div class=\"callout bad\"><b>First divergence: {} at position {}</b> (token {})<br>rel L2 {} · max |A−B| {} · cosine {:.6} · SQNR {:.1} dB · non-finite A/B {}/{} · tolerance rel L2 {}",
                    html_escape(&f.tap), f.position, f.token, sci(f.metrics.rel_l2), sci(f.metrics.max_abs), f.metrics.cosine, f.metrics.sqnr_db, f.metrics.nonfinite_a, f.metrics.nonfinite_b, sci(f.tolerance.rel_l2)
                );
                if let Some(l) = &f.metrics.logits {
                    let _ = write!(
                        s,
                        "<br>logits: KL {} · top-1 {} · top-5 overlap {}/5",
                        sci(l.kl),
                        if l.top1_agree { "agrees" } else { "differs" },
                        l.top5_overlap
                    );
                }
                s.push_str("<table><tr><th>channel</th><th>A</th><th>B</th></tr>");
                for c in &f.top_channels {
                    let _ = write!(s, "<tr><td>{}</td><td>{:.6}</td><td>{:.6}</td></tr>", c.index, c.a, c.b);
                }
                s.push_str("</table>");
                if !f.growth.is_empty() {
                    // Collapsed: up to 40 rows would push the plots far down the page.
                    let shown = f.growth.len().min(40);
                    let _ = write!(s, "<details class=\"growth\"><summary>Downstream: {shown} taps after {} (rel L2 at this position and max)</summary><table><tr><th>tap</th><th>rel L2 at this position</th><th>max rel L2</th></tr>", html_escape(&f.tap));
                    for g in f.growth.iter().take(40) {
                        let _ = write!(
                            s,
                            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                            html_escape(&g.tap),
                            g.at_position.map(sci).unwrap_or_default(),
                            sci(g.max_rel_l2)
                        );
                    }
                    s.push_str("</table></details>");
                }
                s.push_str("</div>");
            }
            None => {
                let w = worst_tap(p)
                    .map(|t| format!(" — max rel L2 {} at {}", sci(t.max_rel_l2()), html_escape(&t.tap)))
                    .unwrap_or_default();
                let _ = write!(
                    s,
                    "<div class=\"callout good\"><b>No divergence</b> over {} taps{w}</div>",
                    p.taps.len()
                );
            }
        }
        if let Some(text) = &p.text {
            let _ = write!(
                s,
                "<details><summary>prompt text</summary><pre class=\"prompt\">{}</pre></details>",
                html_escape(text)
            );
        }
        s.push_str(&prompt_plots(p)?);
        if !p.missing_in_a.is_empty() || !p.missing_in_b.is_empty() {
            let _ = write!(
                s,
                "<p>missing in A: {} · missing in B: {}</p>",
                html_escape(&abbreviate(&p.missing_in_a)),
                html_escape(&abbreviate(&p.missing_in_b))
            );
        }
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// Write report.json, report.md and report.html into `dir`.
pub fn write_all(r: &DiffReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_vec(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [
        ("report.json", json),
        ("report.md", markdown(r).into_bytes()),
        ("report.html", html(r)?.into_bytes()),
    ] {
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
                max_rel_l2: worst_tap(p)
                    .map(|t| {
                        if t.max_rel_l2().is_finite() {
                            t.max_rel_l2()
                        } else {
                            1e3
                        }
                    })
                    .unwrap_or(0.0),
            })
            .collect(),
        engine_failure: r.engine_failure(),
    }
}

pub fn append_history(path: &Path, entry: &HistoryEntry) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
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
        Some(tap) if p.diverged => (
            true,
            format!("{tap}@{}", p.first_position.map(|v| v.to_string()).unwrap_or_default()),
        ),
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
            .build_cartesian_2d(
                -0.5f64..(history.len() as f64 - 0.5).max(0.5),
                (PLOT_FLOOR..1e3f64).log_scale(),
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("run")
            .x_label_formatter(&|x| {
                history
                    .get(x.round() as usize)
                    .map(|e| e.run.clone())
                    .unwrap_or_default()
            })
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_err)?;
        for (k, id) in ids.iter().enumerate() {
            let pts: Vec<(f64, f64)> = history
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.prompts
                        .iter()
                        .find(|p| &&p.id == id)
                        .map(|p| (i as f64, clamp_log(p.max_rel_l2)))
                })
                .collect();
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(plot_err)?
                .label(id.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(plot_err)?;
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
            let _ = write!(
                html,
                "<li><b>{}</b> has diverged since run {}</li>",
                html_escape(id),
                html_escape(run)
            );
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
    let _ = writeln!(
        s,
        "A: {}\nB: {}\nprompt {} ({} tokens)",
        r.engine_a, r.engine_b, r.prompt, r.n_tokens
    );
    let _ = writeln!(s, "\nsearch path:");
    for (i, p) in r.probes.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:>2}. {:<14} {:>5} tok  {:>6.2}s + {:>6.2}s  {:>9}  {}",
            i + 1,
            p.purpose,
            p.tokens,
            p.seconds_a,
            p.seconds_b,
            bytes(p.bytes_a + p.bytes_b),
            p.finding
        );
    }
    let _ = writeln!(s);
    if let Some(c) = &r.crash {
        let _ = writeln!(
            s,
            "ENGINE {} CRASHED ({}) during the {} probe: {}",
            c.engine, c.label, c.probe, c.error.message
        );
        let _ = writeln!(s, "  last tap written: {}", c.error.tap.as_deref().unwrap_or("none"));
    }
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "TOKENS DIFFER: {}", m.describe());
    }
    match &r.first {
        Some(f) => {
            let m = &f.metrics;
            let _ = writeln!(
                s,
                "FIRST DIVERGENCE: {} at position {} (token {})",
                f.tap, f.position, f.token
            );
            let _ = writeln!(
                s,
                "  rel_l2 {}  max_abs {}  cosine {:.6}  ({} rel_l2 {})",
                sci(m.rel_l2),
                sci(m.max_abs),
                m.cosine,
                judged_name(r.judged),
                sci(f.tolerance.rel_l2)
            );
            if let Some(k) = f.shift {
                let _ = writeln!(
                    s,
                    "  A's rows equal B's shifted by {k:+} positions (A at p holds B's p{:+})",
                    -k
                );
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
            let verdict = if l.introduces {
                "INTRODUCES error"
            } else if l.inherited > l.tolerance {
                "inherits error"
            } else {
                "clean"
            };
            let _ = writeln!(
                s,
                "  {:>5}  {:<10}  {:<10}  {:<10}  {verdict}",
                l.layer,
                sci(l.inherited),
                sci(l.introduced),
                sci(l.total)
            );
        }
        if let Some(t) = r.replay_taps.iter().find(|t| t.introduces) {
            let _ = writeln!(
                s,
                "  within the layer, the first tap off its replay: {} (rel_l2 {} at position {})",
                t.tap,
                sci(t.introduced),
                t.at_position
            );
        }
    }
    let _ = writeln!(
        s,
        "\n{} runs of A, {} of B, {} dumped, {:.1} s",
        r.runs_a,
        r.runs_b,
        bytes(r.bytes_dumped),
        r.seconds
    );
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
    let Some(n0) = r.noise.first() else {
        return format!("judged against {}", judged_name(r.judged));
    };
    let levels: Vec<String> = r
        .noise
        .iter()
        .map(|n| format!("{} {}", n.tap.trim_end_matches(".resid_post"), sci(n.p75_rel_l2)))
        .collect();
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
    let _ = writeln!(
        s,
        "- A: {}\n- B: {}\n- prompt {} ({} tokens, final probes on {})",
        md_text(&r.engine_a),
        md_text(&r.engine_b),
        md_text(&r.prompt),
        r.n_tokens,
        r.prefix
    );
    if let Some(c) = &r.crash {
        let _ = writeln!(
            s,
            "- crash of {} in the {} probe: {} (last tap written: {})",
            c.engine,
            md_text(&c.probe),
            md_text(&c.error.message),
            md_text(c.error.tap.as_deref().unwrap_or("none"))
        );
    }
    if let Some(m) = &r.token_mismatch {
        let _ = writeln!(s, "- **tokens differ**: {}", md_text(&m.describe()));
    }
    if let Some(f) = &r.first {
        let _ = writeln!(
            s,
            "- first divergence **{}** at position {}: rel_l2 {}, max_abs {}",
            f.tap,
            f.position,
            sci(f.metrics.rel_l2),
            sci(f.metrics.max_abs)
        );
    }
    let _ = writeln!(s, "- {}", md_text(&noise_line(r)));
    if !r.replay.is_empty() {
        let _ = writeln!(
            s,
            "\n| layer | inherited | introduced | total | introduces |\n|---|---|---|---|---|"
        );
        for l in &r.replay {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                l.layer,
                sci(l.inherited),
                sci(l.introduced),
                sci(l.total),
                if l.introduces { "**yes**" } else { "no" }
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| probe | tokens | layers | taps | seconds A/B | bytes | finding |\n|---|---|---|---|---|---|---|"
    );
    for p in &r.probes {
        let _ = writeln!(
            s,
            "| {} | {} | {:?} | {} | {:.2}/{:.2} | {} | {} |",
            md_text(&p.purpose),
            p.tokens,
            p.layers,
            md_text(&p.taps.join(",")),
            p.seconds_a,
            p.seconds_b,
            bytes(p.bytes_a + p.bytes_b),
            md_text(&p.finding)
        );
    }
    let _ = writeln!(
        s,
        "\nReproduce:\n\n```sh\n{}\n```",
        r.reproduce.iter().map(|c| md_code(c)).collect::<Vec<_>>().join("\n")
    );
    s
}

/// The coarse probe's comparison: kept by bisect, or the partial one of a run that
/// crashed in it (None when nothing was compared).
fn coarse_comparison(r: &BisectReport) -> Option<&DiffReport> {
    let crashed_there = r.crash.as_ref().is_some_and(|c| c.probe == "coarse");
    r.coarse_diff
        .as_ref()
        .or(r.final_diff.as_ref().filter(|_| crashed_there))
}

/// Layers of the model, from whichever comparison the report holds.
fn bisect_n_layer(r: &BisectReport) -> Option<usize> {
    r.coarse_diff
        .as_ref()
        .or(r.final_diff.as_ref())
        .map(|d| d.n_layer)
        .filter(|&n| n > 0)
}

/// The coarse probe as a heatmap: embed and resid_post of the coarse layers over the
/// prompt's positions.
fn coarse_heatmap(r: &BisectReport) -> Result<Option<String>> {
    let Some(p) = coarse_comparison(r).and_then(|d| d.prompts.first()) else {
        return Ok(None);
    };
    let mut rows: Vec<(usize, String, &TapDiff)> = p
        .taps
        .iter()
        .filter_map(|t| match Tap::parse(&t.tap) {
            Some(Tap::Layer(l, LayerTap::ResidPost)) => Some((l + 1, l.to_string(), t)),
            Some(Tap::Embed) => Some((0, "embed".to_string(), t)),
            _ => None,
        })
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_by_key(|(k, _, _)| *k);
    let rows: HeatRows = rows.into_iter().map(|(_, l, t)| (l, t)).collect();
    let partial = if r.coarse_diff.is_none() {
        " (partial: an engine crashed in it)"
    } else {
        ""
    };
    heatmap_svg(
        &format!("coarse probe{partial}: resid_post rel L2 by layer and position"),
        "layer",
        &rows,
    )
    .map(Some)
}

/// What one probe found at one layer, for the search-path plot.
#[derive(Clone, Copy, PartialEq)]
enum LayerVerdict {
    Agrees,
    Diverges,
    /// Dumped for another purpose (replay inputs, a position probe) or never judged.
    Dumped,
}

/// Each probe's layers with their verdicts: the coarse probe's from its comparison, a
/// layer-search probe's as it judged, the all-taps probe's layer when it holds the first
/// divergence.
fn search_verdicts(r: &BisectReport) -> Vec<(String, Vec<(usize, LayerVerdict)>)> {
    let coarse = r.coarse_diff.as_ref().and_then(|d| d.prompts.first());
    let first_layer = r.first.as_ref().and_then(|f| match Tap::parse(&f.tap) {
        Some(Tap::Layer(l, _)) => Some(l),
        _ => None,
    });
    r.probes
        .iter()
        .map(|p| {
            let marks = if p.purpose == "coarse" {
                p.layers
                    .iter()
                    .map(|&l| {
                        let id = format!("blk.{l}.resid_post");
                        let v = match coarse.and_then(|c| c.taps.iter().find(|t| t.tap == id)) {
                            Some(t) if t.first_bad.is_some() => LayerVerdict::Diverges,
                            Some(_) => LayerVerdict::Agrees,
                            None => LayerVerdict::Dumped,
                        };
                        (l, v)
                    })
                    .collect()
            } else if let Some(mid) = p.purpose.strip_prefix("layer-").and_then(|l| l.parse::<usize>().ok()) {
                let v = match p.layer_diverged {
                    Some(true) => LayerVerdict::Diverges,
                    Some(false) => LayerVerdict::Agrees,
                    None => LayerVerdict::Dumped,
                };
                vec![(mid, v)]
            } else if let Some(l) = p.purpose.strip_prefix("taps-").and_then(|l| l.parse::<usize>().ok()) {
                vec![(
                    l,
                    if first_layer == Some(l) {
                        LayerVerdict::Diverges
                    } else {
                        LayerVerdict::Dumped
                    },
                )]
            } else {
                p.layers.iter().map(|&l| (l, LayerVerdict::Dumped)).collect()
            };
            (p.purpose.clone(), marks)
        })
        .collect()
}

/// The search path: one row per probe, its layers marked agreeing or diverging, the
/// layers still in question after each search step shaded, and the first divergent
/// layer highlighted.
fn search_path_svg(r: &BisectReport, n_layer: usize) -> Result<Option<String>> {
    let steps = search_verdicts(r);
    if steps
        .iter()
        .flat_map(|(_, m)| m)
        .all(|(_, v)| *v == LayerVerdict::Dumped)
    {
        return Ok(None);
    }
    let first_layer = r.first.as_ref().and_then(|f| match Tap::parse(&f.tap) {
        Some(Tap::Layer(l, _)) => Some(l),
        _ => None,
    });
    let n = steps.len();
    // Row of step i, the first at the top.
    let y_of = |i: usize| (n - 1 - i) as f64;
    let labels: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, (p, _))| format!("{}. {p}", i + 1))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 36 * n as u32 + 110)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("search path: the layers each probe judged", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(130)
            .build_cartesian_2d(-0.5f64..n_layer as f64 - 0.5, -0.5f64..n as f64 - 0.5)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_desc("layer")
            .x_labels(n_layer.min(30) + 1)
            .y_labels(n.min(20))
            .x_label_formatter(&|v| tick_index(*v, n_layer).map(|l| l.to_string()).unwrap_or_default())
            .y_label_formatter(&|v| {
                tick_index(*v, n)
                    .map(|row| labels[n - 1 - row].clone())
                    .unwrap_or_default()
            })
            .draw()
            .map_err(plot_err)?;
        if let Some(l) = first_layer {
            let l = l as f64;
            chart
                .draw_series([Rectangle::new(
                    [(l - 0.5, -0.5), (l + 0.5, n as f64 - 0.5)],
                    RGBColor(255, 170, 60).mix(0.35).filled(),
                )])
                .map_err(plot_err)?;
        }
        // The layers still in question: above the last known good, up to the first known bad.
        let (mut lo, mut hi): (Option<usize>, Option<usize>) = (None, None);
        for (i, (purpose, marks)) in steps.iter().enumerate() {
            let searched = purpose == "coarse" || purpose.starts_with("layer-");
            if !searched {
                continue;
            }
            for &(l, v) in marks {
                match v {
                    LayerVerdict::Diverges if hi.is_none_or(|h| l < h) => hi = Some(l),
                    LayerVerdict::Agrees if hi.is_none_or(|h| l < h) && lo.is_none_or(|g| l > g) => lo = Some(l),
                    _ => {}
                }
            }
            if let Some(h) = hi {
                let from = lo.map_or(0, |g| g + 1) as f64;
                let y = y_of(i);
                chart
                    .draw_series([Rectangle::new(
                        [(from - 0.5, y - 0.3), (h as f64 + 0.5, y + 0.3)],
                        RGBColor(229, 115, 115).mix(0.25).filled(),
                    )])
                    .map_err(plot_err)?;
            }
        }
        for (i, (_, marks)) in steps.iter().enumerate() {
            let y = y_of(i);
            for &(l, v) in marks {
                let x = l as f64;
                match v {
                    LayerVerdict::Agrees => chart.draw_series([Circle::new((x, y), 6, RGBColor(46, 125, 50).filled())]),
                    LayerVerdict::Diverges => {
                        chart.draw_series([Cross::new((x, y), 7, RGBColor(198, 40, 40).stroke_width(3))])
                    }
                    LayerVerdict::Dumped => {
                        chart.draw_series([Circle::new((x, y), 4, RGBColor(150, 150, 150).filled())])
                    }
                }
                .map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

/// Local replay per layer: the error a layer introduces (its output against the
/// reference replayed on its own input) and the error it inherits, with the tolerance.
fn replay_svg(r: &BisectReport) -> Result<String> {
    let (lo, hi) = (
        r.replay.iter().map(|l| l.layer).min().unwrap_or(0) as f64,
        r.replay.iter().map(|l| l.layer).max().unwrap_or(0) as f64,
    );
    let values = r
        .replay
        .iter()
        .flat_map(|l| [l.introduced, l.inherited, l.tolerance])
        .map(clamp_log);
    let (vmin, vmax) = values.fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (ymin, ymax) = ((vmin / 10.0).max(PLOT_FLOOR / 10.0), (vmax * 10.0).min(1e4));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "local replay: error introduced vs inherited, per layer",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lo - 0.7)..(hi + 0.7), (ymin..ymax).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("layer")
            .y_desc("max rel L2")
            .x_labels(r.replay.len() + 2)
            .x_label_formatter(&|v| tick_index(*v, usize::MAX).map(|l| l.to_string()).unwrap_or_default())
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_err)?;
        let bar = |l: &LayerAttribution, v: f64, left: bool, colour: RGBColor| {
            let x = l.layer as f64;
            let (x0, x1) = if left { (x - 0.3, x) } else { (x, x + 0.3) };
            Rectangle::new([(x0, ymin), (x1, clamp_log(v))], colour.filled())
        };
        let (red, blue, grey) = (RGBColor(211, 47, 47), RGBColor(100, 149, 237), RGBColor(66, 66, 66));
        chart
            .draw_series(r.replay.iter().map(|l| bar(l, l.inherited, true, blue)))
            .map_err(plot_err)?
            .label("inherited (A's input against B's)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], blue.filled()));
        chart
            .draw_series(r.replay.iter().map(|l| bar(l, l.introduced, false, red)))
            .map_err(plot_err)?
            .label("introduced (A's output against the replay)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], red.filled()));
        let tol: Vec<(f64, f64)> = r
            .replay
            .iter()
            .flat_map(|l| {
                [
                    (l.layer as f64 - 0.5, clamp_log(l.tolerance)),
                    (l.layer as f64 + 0.5, clamp_log(l.tolerance)),
                ]
            })
            .collect();
        chart
            .draw_series(DashedLineSeries::new(tol, 6, 4, grey.stroke_width(2)))
            .map_err(plot_err)?
            .label("tolerance")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], grey.stroke_width(2)));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The plots of what the probes measured, or why there are none.
fn bisect_plots(r: &BisectReport) -> Result<String> {
    let mut s = String::from("<h2>What the probes measured</h2>");
    match coarse_heatmap(r)? {
        Some(svg) => {
            s.push_str(&svg);
            s.push_str(HEATMAP_LEGEND);
        }
        None => s.push_str("<p class=\"legend\">The coarse probe compared nothing (an engine failed before writing a tap both sides hold): no heatmap.</p>"),
    }
    match bisect_n_layer(r).map(|n| search_path_svg(r, n)).transpose()?.flatten() {
        Some(svg) => {
            s.push_str(&svg);
            s.push_str("<p class=\"legend\">green dot: resid_post agrees; red cross: it diverges (for the all-taps probe: the layer holding the first divergence); grey dot: dumped for another purpose or not judged; shaded band: the layers still in question after that probe; orange column: the first divergent layer.</p>");
        }
        None => s.push_str(
            "<p class=\"legend\">No layer was judged (nothing of the layers was compared): no search-path plot.</p>",
        ),
    }
    Ok(s)
}

/// Self-contained HTML: verdict, plots of what the probes measured, local replay, the
/// search path, reproduce commands.
pub fn bisect_html(r: &BisectReport) -> Result<String> {
    let mut s = String::new();
    let title = html_escape(&bisect_title(r));
    let _ = write!(s, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>resbisect bisect: {title}</title><style>{STYLE}</style></head><body>");
    let _ = write!(s, "<h1>resbisect bisect: {title}</h1><table>");
    let _ = write!(
        s,
        "<tr><th>A</th><td>{}</td></tr><tr><th>B</th><td>{}</td></tr>",
        html_escape(&r.engine_a),
        html_escape(&r.engine_b)
    );
    let _ = write!(
        s,
        "<tr><th>prompt</th><td>{} ({} tokens; final probes on the first {})</td></tr></table>",
        html_escape(&r.prompt),
        r.n_tokens,
        r.prefix
    );
    if let Some(c) = &r.crash {
        let _ = write!(
            s,
            "<div class=\"callout bad\"><b>Engine {} ({}) crashed</b> during the {} probe: {}<br>last tap written: {}</div>",
            html_escape(&c.engine), html_escape(&c.label), html_escape(&c.probe), html_escape(&c.error.message), html_escape(c.error.tap.as_deref().unwrap_or("none"))
        );
    }
    if let Some(m) = &r.token_mismatch {
        let _ = write!(
            s,
            "<div class=\"callout bad\"><b>Tokens differ</b>: {}</div>",
            html_escape(&m.describe())
        );
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
    s.push_str(&bisect_plots(r)?);
    if !r.replay.is_empty() {
        s.push_str(&format!("<h2>Local replay</h2><p class=\"legend\">The reference recomputes each layer from A's own dumped input: <i>introduced</i> is A's output against that replay, <i>inherited</i> A's input against B's, <i>total</i> A's output against B's (max rel L2 over positions; <i>introduced</i> over the {} positions replayed: every divergent one, thinned to 64, and evenly spaced controls).</p>", r.replay_positions.len()));
        s.push_str(&replay_svg(r)?);
        s.push_str("<table><tr><th>layer</th><th>inherited</th><th>introduced</th><th>total</th><th>verdict</th></tr>");
        for l in &r.replay {
            let verdict = if l.introduces {
                "<b>introduces error</b>"
            } else if l.inherited > l.tolerance {
                "inherits error"
            } else {
                "clean"
            };
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{verdict}</td></tr>",
                l.layer,
                sci(l.inherited),
                sci(l.introduced),
                sci(l.total)
            );
        }
        s.push_str("</table>");
        if !r.replay_taps.is_empty() {
            s.push_str("<p>Taps of the suspect layer against their replay:</p><table><tr><th>tap</th><th>introduced</th><th>at position</th><th>tolerance</th></tr>");
            for t in &r.replay_taps {
                let _ = write!(
                    s,
                    "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    html_escape(&t.tap),
                    if t.introduces { " ◀" } else { "" },
                    sci(t.introduced),
                    t.at_position,
                    sci(t.tolerance)
                );
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
    let _ = write!(
        s,
        "</table><p>{} runs of A, {} of B, {} dumped, {:.1} s.</p>",
        r.runs_a,
        r.runs_b,
        bytes(r.bytes_dumped),
        r.seconds
    );
    // One command a line, wrapped: they hold long paths.
    let _ = write!(
        s,
        "<h2>Reproduce</h2><pre class=\"reproduce\">{}</pre>",
        html_escape(&r.reproduce.join("\n"))
    );
    if r.final_diff.is_some() {
        s.push_str("<p>The full comparison of the last probe: <a href=\"report.html\">report.html</a>.</p>");
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// Write bisect.{json,md,html} and the last probe's report.{json,md,html} into `dir`.
pub fn write_bisect(r: &BisectReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(d) = &r.final_diff {
        write_all(d, dir)?;
    }
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::input(format!("report: {e}")))?;
    for (name, bytes) in [
        ("bisect.json", json),
        ("bisect.md", bisect_markdown(r).into_bytes()),
        ("bisect.html", bisect_html(r)?.into_bytes()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}
