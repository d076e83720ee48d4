//! What a probe's comparison says about the search: where the residual stream diverges,
//! from which position, and how far over its noise floor the coarse probe sits.

use super::search::resid_post;
use super::NoiseLevel;
use crate::diff::{DiffReport, FirstDivergence};
use crate::taps::{LayerTap, Tap};

/// Each coarse residual-stream tap's level against its noise floor.
pub(super) fn noise_levels(r: &DiffReport) -> Vec<NoiseLevel> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .filter(|t| t.tap == "embed" || t.tap.ends_with(".resid_post"))
        .map(|t| {
            let mut rel: Vec<f64> = t.rows.iter().map(|r| r.rel_l2_or_inf()).collect();
            rel.sort_by(f64::total_cmp);
            let p75 = rel
                .get((rel.len() * 3).div_ceil(4).saturating_sub(1))
                .copied()
                .unwrap_or(0.0);
            NoiseLevel {
                tap: t.tap.clone(),
                p75_rel_l2: p75,
                floor: t.noise_floor,
                threshold: t.floor.rel_l2,
                tolerance: t.tolerance.rel_l2,
                rows_over_floor: t.rows_over_floor,
                rows: t.rows.len(),
            }
        })
        .collect()
}

/// Each divergent coarse layer with its own first divergent position, for the search path.
pub(super) fn bad_layers_line(r: &DiffReport, coarse: &[usize]) -> String {
    let v: Vec<String> = coarse
        .iter()
        .filter_map(|&l| first_bad_of(r, &resid_post(l)).map(|(p, _)| format!("{l} (from position {p})")))
        .collect();
    v.join(", ")
}

/// Smallest position any tap of the diff diverges at.
pub(super) fn first_bad_position(r: &DiffReport) -> Option<usize> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .filter_map(|t| t.first_bad.map(|i| t.positions[i]))
        .min()
}

/// Whether any compared row holds NaN or Inf on either side.
pub(super) fn has_nonfinite(r: &DiffReport) -> bool {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .flat_map(|t| &t.rows)
        .any(|row| row.has_nonfinite())
}

/// A note for each engine that wrote a NaN or an infinity in `r`, naming the first tap
/// (in `r`'s order, the layer order) that holds one, and at how many positions: the first
/// divergence may be a small error well before the values blow up.
pub(super) fn nonfinite_notes(r: &DiffReport, probe: &str) -> Vec<String> {
    let taps: Vec<_> = r.prompts.iter().flat_map(|p| &p.taps).collect();
    let first = |count: fn(&crate::diff::RowStat) -> u32| {
        taps.iter().find_map(|t| {
            let at: Vec<usize> = (0..t.rows.len()).filter(|&i| count(&t.rows[i]) > 0).collect();
            let row = *at.first()?;
            Some((t.tap.clone(), at.len(), t.positions[row], count(&t.rows[row])))
        })
    };
    [("A", first(|row| row.nonfinite_a)), ("B", first(|row| row.nonfinite_b))]
        .into_iter()
        .filter_map(|(side, at)| {
            let (tap, rows, position, values) = at?;
            Some(format!(
                "engine {side} wrote NaN or infinite values: the first {probe} tap that holds them is {tap}, at {rows} \
                 position(s) from {position} ({values} of the values there; masked attention can carry a NaN to \
                 earlier positions, 0·NaN); later taps carry them"
            ))
        })
        .collect()
}

/// Whether tap `id` diverges anywhere in `r`.
pub(super) fn tap_diverged(r: &DiffReport, id: &str) -> bool {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .any(|t| t.tap == id && t.first_bad.is_some())
}

/// The first position tap `id` diverges at in `r`, and the rel L2 tolerance applied.
pub(super) fn first_bad_of(r: &DiffReport, id: &str) -> Option<(usize, f64)> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .find(|t| t.tap == id)
        .and_then(|t| t.first_bad.map(|i| (t.positions[i], t.tolerance.rel_l2)))
}

/// The rel L2 tolerance tap `id` was judged against in `r` (0 when `r` lacks it).
pub(super) fn tolerance_in(r: &DiffReport, id: &str) -> f64 {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .find(|t| t.tap == id)
        .map_or(0.0, |t| t.tolerance.rel_l2)
}

/// The first divergence of `r`'s (only) prompt.
pub(super) fn first_of(r: &DiffReport) -> Option<FirstDivergence> {
    r.prompts.first().and_then(|p| p.first.clone())
}

/// A note for each engine that wrote none of the layer's taps before `first` in the
/// layer's order (an external engine may not capture q and k): the divergence can begin
/// in a tap it left out, so `first` is only the first one observed. A left-out tap is
/// not named when a tap that reads it (through the layer's computation) was observed
/// before `first` and agrees up to `first`'s position: the query is read by `attn`, so an
/// `attn` that agrees rules it out. A tap of `asked` (the probe's selection) that neither
/// engine wrote (two external engines that both skip q and k) is named the same way.
/// Nor are the query and key before a finite `attn` at position 0: a causal query there
/// sees key 0 alone, whose softmax weight is 1 whatever the score, so its output is value
/// row 0 (only a non-finite score, which shows as a non-finite output, involves them).
pub(super) fn unobserved_notes(taps: &DiffReport, first: &FirstDivergence, asked: &[String]) -> Vec<String> {
    let Some(first_tap) = Tap::parse(&first.tap) else {
        return Vec::new();
    };
    let query_and_key_moot = matches!(first_tap, Tap::Layer(_, LayerTap::Attn))
        && first.position == 0
        && first.metrics.nonfinite_a == 0
        && first.metrics.nonfinite_b == 0;
    let moot = |t: Tap| {
        query_and_key_moot
            && matches!(
                t,
                Tap::Layer(_, LayerTap::QPreRope | LayerTap::KPreRope | LayerTap::Q | LayerTap::K)
            )
    };
    let mut notes = Vec::new();
    for p in &taps.prompts {
        let agreeing: Vec<Tap> = p
            .taps
            .iter()
            .filter(|t| t.first_bad.is_none_or(|i| t.positions[i] > first.position))
            .filter_map(|t| Tap::parse(&t.tap))
            .collect();
        let ruled_out = |m: Tap| agreeing.iter().any(|&u| u < first_tap && u > m && u >= reader_of(m));
        let written =
            |t: &String| p.taps.iter().any(|d| &d.tap == t) || p.missing_in_a.contains(t) || p.missing_in_b.contains(t);
        let in_neither: Vec<String> = asked.iter().filter(|t| !written(t)).cloned().collect();
        for (side, missing) in [("A", &p.missing_in_a), ("B", &p.missing_in_b), ("neither", &in_neither)] {
            let before: Vec<&str> = missing
                .iter()
                .filter(|m| Tap::parse(m).is_some_and(|t| t < first_tap && !ruled_out(t) && !moot(t)))
                .map(String::as_str)
                .collect();
            if !before.is_empty() {
                let who = if side == "neither" {
                    "neither engine wrote".to_string()
                } else {
                    format!("engine {side} wrote no")
                };
                notes.push(format!(
                    "{who} {}, which come before {} in the layer: the divergence may begin in one of them",
                    before.join(", "),
                    first.tap
                ));
            }
        }
    }
    notes
}

/// The first tap of `t`'s layer that reads it: the attention reads the query, key and
/// value branches, the FFN activation both projections; others are read by the next tap.
fn reader_of(t: Tap) -> Tap {
    match t {
        Tap::Layer(l, LayerTap::QPreRope | LayerTap::KPreRope | LayerTap::Q | LayerTap::K | LayerTap::V) => {
            Tap::Layer(l, LayerTap::Attn)
        }
        Tap::Layer(l, LayerTap::FfnGate | LayerTap::FfnUp) => Tap::Layer(l, LayerTap::FfnAct),
        other => other,
    }
}

/// Growth of the coarse residual stream's error between neighbouring coarse taps past the
/// first divergent layer from which a note suspects a second, larger divergence. The
/// eighth trial's 24 single bugs grew at most 7.4× between neighbouring coarse taps; two
/// bugs (a rounding in layer 3, a zeroed head in layer 15) grew 392× across layer 15.
const SECOND_FAULT_GROWTH: f64 = 30.0;

/// A note when the coarse residual stream's error (75th-percentile row) grows by
/// [`SECOND_FAULT_GROWTH`] or more between two neighbouring coarse taps after
/// `first_layer`, from a level already over its noise-floor threshold: a second, larger
/// divergence may begin between them, which the search (it stops at the first) did not
/// look at.
pub(super) fn second_fault_note(noise: &[NoiseLevel], first_layer: usize) -> Option<String> {
    let layer_of = |n: &NoiseLevel| Tap::parse(&n.tap).and_then(|t| t.layer());
    let after: Vec<(usize, &NoiseLevel)> = noise
        .iter()
        .filter_map(|n| layer_of(n).filter(|&l| l >= first_layer).map(|l| (l, n)))
        .collect();
    let (lo, hi, growth) = after
        .windows(2)
        .filter(|w| w[0].1.p75_rel_l2 > w[0].1.threshold && w[0].1.p75_rel_l2.is_finite())
        .map(|w| (w[0], w[1], w[1].1.p75_rel_l2 / w[0].1.p75_rel_l2))
        .filter(|&(_, _, g)| g >= SECOND_FAULT_GROWTH)
        .max_by(|a, b| a.2.total_cmp(&b.2))?;
    Some(format!(
        "the residual stream's error grows {growth:.0}× between {} ({:.2e}) and {} ({:.2e}, 75th-percentile rows), \
         far more than one divergence grows on its way down the layers: a second, larger divergence may begin in \
         layers {}–{}; once the first is fixed, bisect again",
        lo.1.tap,
        lo.1.p75_rel_l2,
        hi.1.tap,
        hi.1.p75_rel_l2,
        lo.0 + 1,
        hi.0
    ))
}
