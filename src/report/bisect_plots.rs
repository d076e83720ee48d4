//! A bisect's plots: the coarse probe as a heatmap, the search path, and local replay.

use plotters::prelude::*;

use super::plots::{clamp_log, heatmap_svg, plot_err, tick_index, HeatRows, HEATMAP_LEGEND, PLOT_FLOOR};
use crate::bisect::{BisectReport, LayerAttribution};
use crate::diff::{DiffReport, TapDiff};
use crate::error::Result;
use crate::taps::{LayerTap, Tap};

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
        " (partial: an engine failed in it)"
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
    let first_layer = first_layer(r);
    r.probes
        .iter()
        .map(|p| {
            let marks = if p.purpose == "coarse" {
                p.layers
                    .iter()
                    .map(|&l| {
                        let id = Tap::Layer(l, LayerTap::ResidPost).to_string();
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

/// The layer of the first divergence, when it is a layer's tap.
fn first_layer(r: &BisectReport) -> Option<usize> {
    r.first.as_ref().and_then(|f| match Tap::parse(&f.tap) {
        Some(Tap::Layer(l, _)) => Some(l),
        _ => None,
    })
}

/// The layers still in question after each search step (coarse or layer probe), by
/// step: above the last known good, up to the first known bad.
fn questioned_bands(steps: &[(String, Vec<(usize, LayerVerdict)>)]) -> Vec<(usize, (usize, usize))> {
    let (mut lo, mut hi): (Option<usize>, Option<usize>) = (None, None);
    let mut bands = Vec::new();
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
            bands.push((i, (lo.map_or(0, |g| g + 1), h)));
        }
    }
    bands
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
    let first_layer = first_layer(r);
    let n = steps.len();
    // Row of step i, the first at the top.
    let y_of = |i: usize| (n - 1 - i) as f64;
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
                    .map(|row| format!("{}. {}", n - row, steps[n - 1 - row].0))
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
        for (i, (from, to)) in questioned_bands(&steps) {
            let y = y_of(i);
            chart
                .draw_series([Rectangle::new(
                    [(from as f64 - 0.5, y - 0.3), (to as f64 + 0.5, y + 0.3)],
                    RGBColor(229, 115, 115).mix(0.25).filled(),
                )])
                .map_err(plot_err)?;
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
pub(super) fn replay_svg(r: &BisectReport) -> Result<String> {
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
pub(super) fn bisect_plots(r: &BisectReport) -> Result<String> {
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
