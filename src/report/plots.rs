//! The SVG plots of a diff report (plotters): max rel L2 by layer, and the rows ×
//! positions heatmap with its colour bar; with the axis helpers the other plots share.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::diff::{PromptDiff, TapDiff};
use crate::error::{Error, Result};
use crate::taps::{Tap, LAYER_TAPS};

/// Most heatmap columns; longer prompts are binned (each bin shows its worst row).
const HEATMAP_BINS: usize = 256;
/// Values below this are drawn at the floor of the log axes.
pub(super) const PLOT_FLOOR: f64 = 1e-10;

/// A plotting failure, as an error.
pub(super) fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::input(format!("drawing a plot: {e}"))
}

/// A value within the log axes' range; non-finite values at the top.
pub(super) fn clamp_log(v: f64) -> f64 {
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
pub(super) fn tick_index(v: f64, len: usize) -> Option<usize> {
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
pub(super) fn heatmap_svg(title: &str, y_desc: &str, rows: &HeatRows) -> Result<String> {
    let columns = HeatColumns::of(rows);
    let cols = columns.cols;
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
            .x_desc(columns.x_desc())
            .y_desc(y_desc)
            .x_labels(cols.min(14))
            .y_labels(n_rows.min(16))
            .x_label_formatter(&|v| {
                tick_index(*v, cols)
                    .and_then(|b| columns.bin_start(b))
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
            let cells = columns.cells(t);
            let y = y as f64;
            chart
                .draw_series(cells.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(b, &v)| {
                    let x = b as f64;
                    Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat_colour(v).filled())
                }))
                .map_err(plot_err)?;
        }
        colour_bar(&bar)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// A heatmap's columns: the positions its rows compared, binned past HEATMAP_BINS.
struct HeatColumns {
    /// Every position compared, ascending.
    positions: Vec<usize>,
    /// Columns drawn.
    cols: usize,
}

impl HeatColumns {
    fn of(rows: &HeatRows) -> Self {
        let mut positions: Vec<usize> = rows.iter().flat_map(|(_, t)| t.positions.iter().copied()).collect();
        positions.sort_unstable();
        positions.dedup();
        let cols = positions.len().clamp(1, HEATMAP_BINS);
        HeatColumns { positions, cols }
    }

    fn n_pos(&self) -> usize {
        self.positions.len().max(1)
    }

    /// The first position of column `b`.
    fn bin_start(&self, b: usize) -> Option<usize> {
        self.positions.get((b * self.n_pos()).div_ceil(self.cols)).copied()
    }

    /// The position axis' label: whether columns leave positions out, and how many
    /// positions each shows.
    fn x_desc(&self) -> String {
        let positions = &self.positions;
        let contiguous = positions
            .first()
            .zip(positions.last())
            .is_none_or(|(a, b)| b - a + 1 == positions.len());
        let per_bin = self.n_pos().div_ceil(self.cols);
        match (per_bin > 1, contiguous) {
            (false, true) => "position".to_string(),
            (true, true) => format!("position (each column: the worst of {per_bin})"),
            (false, false) => format!("the {} positions compared (others not drawn)", positions.len()),
            (true, false) => format!(
                "the {} positions compared (each column: the worst of {per_bin})",
                positions.len()
            ),
        }
    }

    /// One row's value per column (its worst row in the bin; NaN: nothing compared there).
    fn cells(&self, t: &TapDiff) -> Vec<f64> {
        let (cols, n_pos) = (self.cols, self.n_pos());
        let mut cells = vec![f64::NAN; cols];
        for (pos, r) in t.positions.iter().zip(&t.rows) {
            let Ok(i) = self.positions.binary_search(pos) else {
                continue;
            };
            let v = r.rel_l2_or_inf();
            let c = &mut cells[i * cols / n_pos];
            *c = if c.is_nan() { v } else { c.max(v) };
        }
        cells
    }
}

/// The heatmap's colour bar, with the same margins and label areas as the map, so their
/// heights match.
fn colour_bar(bar: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<()> {
    let mut scale = ChartBuilder::on(bar)
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
    Ok(())
}

pub(super) const HEATMAP_LEGEND: &str = "<p class=\"legend\">colour: rel L2 on the log scale of the bar beside the map: blue = 1e-10 or below (noise), red = 1 or above, or non-finite; grey = not compared. A vertical edge shows the position where a long-context collapse starts.</p>";

/// A heatmap's rows, each a label and the tap it shows.
pub(super) type HeatRows<'a> = Vec<(String, &'a TapDiff)>;

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
pub(super) fn prompt_plots(p: &PromptDiff) -> Result<String> {
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
