//! Tolerances measured from known-good dump pairs (`resbisect calibrate`).

use std::collections::BTreeMap;

use super::DiffReport;
use crate::taps::Tap;
use crate::tolerance::{TapTolerance, Tolerances};

/// Tolerances from known-good pairs: per tap kind (`blk.*.q`, `logits`, …), the largest
/// rel L2 seen, times `margin`, never below `floor`. Rows holding NaN/Inf (or an error
/// too large to scale) measure no noise floor: they are skipped, and a tap kind with
/// nothing else keeps the defaults; the notes say which, so the file always loads.
pub fn calibrate(reports: &[DiffReport], margin: f64, floor: f64) -> (Tolerances, Vec<String>) {
    // pattern -> (order key, worst finite rel L2, rows skipped)
    let mut worst: BTreeMap<String, (Tap, Option<f64>, usize)> = BTreeMap::new();
    for r in reports {
        for p in &r.prompts {
            for t in &p.taps {
                let tap = Tap::parse(&t.tap).expect("canonical");
                let pattern = match tap {
                    Tap::Layer(_, i) => format!("blk.*.{}", i.name()),
                    _ => t.tap.clone(),
                };
                let key = match tap {
                    Tap::Layer(_, i) => Tap::Layer(0, i),
                    other => other,
                };
                let e = worst.entry(pattern).or_insert((key, None, 0));
                for row in &t.rows {
                    let scaled = row.rel_l2 * margin;
                    if row.has_nonfinite() || !scaled.is_finite() {
                        e.2 += 1;
                    } else {
                        e.1 = Some(e.1.map_or(row.rel_l2, |w: f64| w.max(row.rel_l2)));
                    }
                }
            }
        }
    }
    let mut notes = Vec::new();
    let mut entries: Vec<(String, Tap, f64)> = Vec::new();
    for (pattern, (key, value, skipped)) in worst {
        match (value, skipped) {
            (Some(v), 0) => entries.push((pattern, key, v)),
            (Some(v), n) => {
                notes.push(format!(
                    "{pattern}: {n} row(s) with NaN/Inf or an unbounded error skipped"
                ));
                entries.push((pattern, key, v));
            }
            (None, 0) => entries.push((pattern, key, 0.0)),
            (None, n) => notes.push(format!(
                "{pattern}: all {n} row(s) hold NaN/Inf or an unbounded error; the defaults apply"
            )),
        }
    }
    entries.sort_by_key(|e| e.1);
    let sources: Vec<String> = reports
        .iter()
        .map(|r| format!("{} vs {}", r.a.path, r.b.path))
        .collect();
    let tolerances = Tolerances {
        taps: entries
            .into_iter()
            .map(|(pattern, _, v)| TapTolerance {
                pattern,
                rel_l2: (v * margin).max(floor),
                abs: 0.0,
            })
            .collect(),
        source: Some(format!(
            "calibrated ×{margin} (floor {floor:e}) from {}",
            sources.join(", ")
        )),
        ..Tolerances::default()
    };
    (tolerances, notes)
}
