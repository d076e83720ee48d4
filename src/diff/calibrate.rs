//! Tolerances measured from known-good dump pairs (`resbisect calibrate`): per tap and
//! per layer, from a quantile of the rows' rel L2 over positions, so that one noisy row
//! (an attention sink's) or one noisy layer does not loosen every other.

use std::collections::BTreeMap;

use super::DiffReport;
use crate::taps::Tap;
use crate::tolerance::{Calibration, TapTolerance, Tolerances};

/// Rows holding NaN/Inf (or an error too large to scale) measure no noise floor: they
/// are skipped, and a tap with nothing else keeps the defaults; the notes say which.
///
/// Each tap id measured (`blk.3.q`, `logits`) gets `rel_l2 = max(quantile × margin,
/// floor)` and `abs = abs_floor`; then each layer tap kind (`blk.*.q`) the largest of its
/// layers', for layers the pairs did not hold. The quantile is the nearest-rank one
/// over every finite row of the tap in every pair.
pub fn calibrate(reports: &[DiffReport], how: &Calibration) -> (Tolerances, Vec<String>) {
    // tap -> (finite rel L2 of every row, rows skipped)
    let mut rows: BTreeMap<Tap, (Vec<f64>, usize)> = BTreeMap::new();
    for r in reports {
        for p in &r.prompts {
            for t in &p.taps {
                let tap = Tap::parse(&t.tap).expect("canonical");
                let e = rows.entry(tap).or_default();
                for row in &t.rows {
                    if row.has_nonfinite() || !(row.rel_l2 * how.margin).is_finite() {
                        e.1 += 1;
                    } else {
                        e.0.push(row.rel_l2);
                    }
                }
            }
        }
    }
    let mut notes = Vec::new();
    let mut per_tap: Vec<TapTolerance> = Vec::new();
    // kind pattern -> (order key, largest per-layer tolerance)
    let mut per_kind: BTreeMap<Tap, (String, f64)> = BTreeMap::new();
    for (tap, (mut values, skipped)) in rows {
        let id = tap.id();
        if skipped > 0 {
            notes.push(if values.is_empty() {
                format!("{id}: all {skipped} row(s) hold NaN/Inf or an unbounded error; the defaults apply")
            } else {
                format!("{id}: {skipped} row(s) with NaN/Inf or an unbounded error skipped")
            });
        }
        let measured = match nearest_rank(&mut values, how.quantile) {
            Some(q) => q,
            None if skipped > 0 => continue,
            None => 0.0,
        };
        let rel_l2 = (measured * how.margin).max(how.floor);
        if let Tap::Layer(_, kind) = tap {
            let e = per_kind
                .entry(Tap::Layer(0, kind))
                .or_insert_with(|| (format!("blk.*.{}", kind.name()), 0.0));
            e.1 = e.1.max(rel_l2);
        }
        per_tap.push(TapTolerance {
            pattern: id,
            rel_l2,
            abs: how.abs_floor,
            measured: Some(measured),
        });
    }
    per_tap.extend(per_kind.into_values().map(|(pattern, rel_l2)| TapTolerance {
        pattern,
        rel_l2,
        abs: how.abs_floor,
        measured: None,
    }));
    let sources: Vec<String> = reports
        .iter()
        .map(|r| format!("{} vs {}", r.a.path, r.b.path))
        .collect();
    let tolerances = Tolerances {
        taps: per_tap,
        source: Some(format!("{} from {}", how.describe(), sources.join(", "))),
        calibration: Some(how.clone()),
        ..Tolerances::default()
    };
    (tolerances, notes)
}

/// The nearest-rank `q`-quantile of `values` (sorted in place); `None` when empty.
fn nearest_rank(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(nearest_rank(&mut v, 0.99), Some(99.0));
        assert_eq!(nearest_rank(&mut v, 1.0), Some(100.0));
        assert_eq!(nearest_rank(&mut v, 0.0), Some(1.0));
        assert_eq!(nearest_rank(&mut [3.0], 0.5), Some(3.0));
        assert_eq!(nearest_rank(&mut [], 0.5), None);
    }
}
