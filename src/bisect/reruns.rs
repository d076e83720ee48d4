//! Whether an engine agrees with itself: a search compares probes, so it assumes each
//! engine gives the same rows for the same tokens; at its end it checks that on the rows
//! two probes of the same tokens both hold.

use std::path::PathBuf;

use super::probe::Session;
use crate::dump::{Dump, TapDType, TapView};
use crate::error::Result;

/// One engine's rows of a tap at a position, different in two probes of the same tokens.
pub(super) struct RerunDisagreement {
    pub tap: String,
    pub position: usize,
    /// Prompt tokens both probes ran.
    pub tokens: usize,
    pub rel_l2: f64,
    /// The two probes' directories.
    pub probes: [PathBuf; 2],
}

/// A note in `notes` for each engine whose rows of `taps` differ between two probes of
/// the same tokens by more than the tap's tolerance and 1e-3: such an engine can make a
/// divergence come and go between probes. A note that the engine is not causal (a row
/// that moved when the prompt was cut) is qualified, as nondeterminism moves rows too.
pub(super) fn rerun_notes(session: &Session, taps: &[String], notes: &mut Vec<String>) -> Result<()> {
    let tolerances = session.tolerances();
    let threshold = |tap: &str| tolerances.for_tap(tap, TapDType::F32).rel_l2.max(1e-3);
    for side in ["a", "b"] {
        let Some(d) = session.rerun_disagreement(side, taps, &threshold)? else {
            continue;
        };
        let name = |dir: &std::path::Path| {
            dir.file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned())
        };
        let engine = format!("engine {}", side.to_uppercase());
        for note in notes.iter_mut() {
            if note.starts_with(&format!("{engine} is not causal:")) {
                note.push_str(" (unless that is the nondeterminism the next note shows)");
            }
        }
        notes.push(format!(
            "{engine} gave different values for the same {} tokens: its {} at position {} differs by rel L2 {:.2e} \
             between probes {} and {}; it is not deterministic (or computes a row differently depending on the rows \
             asked for), and a search that compares probes may find a divergence that comes and goes",
            d.tokens,
            d.tap,
            d.position,
            d.rel_l2,
            name(&d.probes[0]),
            name(&d.probes[1]),
        ));
    }
    Ok(())
}

impl Session<'_> {
    /// The largest disagreement of one engine with itself: over probes that ran the same
    /// number of tokens, the rows of each of `taps` that two of them hold at the same
    /// position, compared (rel L2). A deterministic engine gives the same rows for the same
    /// tokens; `threshold(tap)` is what counts as different. Reads only dumps already
    /// written.
    fn rerun_disagreement(
        &self,
        side: &str,
        taps: &[String],
        threshold: &dyn Fn(&str) -> f64,
    ) -> Result<Option<RerunDisagreement>> {
        let runs: Vec<(&PathBuf, usize)> = self
            .dirs
            .iter()
            .filter_map(|dir| {
                let dump = Dump::open(&dir.join(side)).ok()?;
                let prompt = dump.manifest.prompts.iter().find(|p| p.id == self.prompt.id)?;
                Some((dir, prompt.tokens.len()))
            })
            .collect();
        let mut worst: Option<RerunDisagreement> = None;
        for tap in taps {
            for (i, &(first, tokens)) in runs.iter().enumerate() {
                for &(second, _) in runs[i + 1..].iter().filter(|r| r.1 == tokens) {
                    let (Some(x), Some(y)) = (self.probe_file(first, side, tap)?, self.probe_file(second, side, tap)?)
                    else {
                        continue;
                    };
                    let (vx, vy) = (x.tap(tap).expect("held"), y.tap(tap).expect("held"));
                    for (rx, &position) in x.positions.iter().enumerate() {
                        let Ok(ry) = y.positions.binary_search(&position) else {
                            continue;
                        };
                        let rel_l2 = rerun_rel_l2(&vx.row(rx), &vy.row(ry));
                        let over = rel_l2 > threshold(tap) && !rel_l2.is_nan();
                        if over && worst.as_ref().is_none_or(|w| rel_l2 > w.rel_l2) {
                            worst = Some(RerunDisagreement {
                                tap: tap.clone(),
                                position,
                                tokens,
                                rel_l2,
                                probes: [first.clone(), second.clone()],
                            });
                        }
                    }
                }
            }
        }
        Ok(worst)
    }
}

/// Rel L2 between one engine's rows of a tap in two probes of the same tokens. Where
/// either holds a NaN or an infinity: over the finite values when both hold their NaNs
/// and infinities at the same places (an engine that writes the same NaN every run agrees
/// with itself), else infinite.
fn rerun_rel_l2(x: &TapView, y: &TapView) -> f64 {
    let stat = crate::diff::row_stat(x, y);
    if !stat.has_nonfinite() {
        return stat.rel_l2;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    x.append_f32(&mut a);
    y.append_f32(&mut b);
    let same = |p: f32, q: f32| {
        if p.is_nan() {
            q.is_nan()
        } else {
            p.is_finite() == q.is_finite() && (p.is_finite() || p == q)
        }
    };
    if !a.iter().zip(&b).all(|(&p, &q)| same(p, q)) {
        return f64::INFINITY;
    }
    let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
    for (&p, &q) in a.iter().zip(&b).filter(|(p, _)| p.is_finite()) {
        diff2 += (p as f64 - q as f64).powi(2);
        norm2 += (q as f64).powi(2);
    }
    match (diff2 > 0.0, norm2 > 0.0) {
        (false, _) => 0.0,
        (true, true) => (diff2 / norm2).sqrt(),
        (true, false) => f64::INFINITY,
    }
}
