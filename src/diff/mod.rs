//! Comparing two dumps: align by prompt, tap and position; refuse mismatched tokens or
//! models; compute per-row metrics (docs/report-format.md) straight from the mapped files, one file
//! pair at a time, rows in parallel; find the first divergence in topological order.

mod calibrate;
mod compare;
mod first;
mod metrics;
mod notes;
mod pairing;
mod tokens;

use serde::Serialize;

pub use self::calibrate::calibrate;
use self::compare::diff_prompt;
pub use self::metrics::{logit_stat, row_stat, LogitStat, Metrics, RowStat};
pub use self::notes::{
    judgement_note, profile_note, second_origin_note, under_tolerance_note, unimitated_settings_note,
};
pub(crate) use self::notes::{llamacpp_profile, twin_note};
pub use self::pairing::config_differences;
use self::pairing::{check_same_model, partial_dump_notes, prompt_pairs};
pub use self::tokens::TokenMismatch;
use crate::dump::{Dump, EngineInfo, RunError, Status, TapDType};
use crate::error::Result;
use crate::taps::Tap;
use crate::tolerance::{engine_dtype, Tolerance, Tolerances};

#[derive(Debug, Clone, Serialize)]
pub struct TapDiff {
    pub tap: String,
    pub dtype_a: &'static str,
    pub dtype_b: &'static str,
    /// The threshold `first_bad` and `diverged_rows` were judged against: the tap's
    /// tolerance, or `floor` when the prompt was judged against the noise floor.
    pub tolerance: Tolerance,
    /// The noise-floor threshold of this tap: the expected floor of its dtype × margin,
    /// never above the tolerance (`Tolerances::floor_for`).
    pub floor: Tolerance,
    /// The tap's own tolerance, whatever the rows were judged against.
    #[serde(skip)]
    pub tap_tolerance: Tolerance,
    /// The expected noise floor `floor` was made from (before the margin and the cap at
    /// tolerance); the bisect report's noise levels show it.
    #[serde(skip)]
    pub noise_floor: f64,
    /// Rows over `floor`.
    pub rows_over_floor: usize,
    pub positions: Vec<usize>,
    /// rel L2 per compared position (the report's heatmap data).
    pub rel_l2: Vec<f32>,
    /// Full statistics per row; kept in memory, summarized in JSON.
    #[serde(skip)]
    pub rows: Vec<RowStat>,
    #[serde(skip)]
    pub logits: Vec<LogitStat>,
    pub max_abs: f64,
    /// Index into `positions` of the first row over tolerance.
    pub first_bad: Option<usize>,
    pub diverged_rows: usize,
}

impl TapDiff {
    pub fn max_rel_l2(&self) -> f64 {
        self.rows.iter().map(|r| r.rel_l2_or_inf()).fold(0.0, f64::max)
    }

    fn rel_at(&self, position: usize) -> Option<f64> {
        self.positions
            .binary_search(&position)
            .ok()
            .map(|i| self.rows[i].rel_l2)
    }

    /// From the first divergent row on, more than a stray row over the noise floor: a row
    /// over the tap's own tolerance or not finite, or a quarter of those rows over the
    /// floor. (A single row of a Gemma 3 post norm sits 1.35× over the f32 floor's
    /// threshold between the `cpu` runtime and the reference, with no bug anywhere.)
    pub fn beyond_stray_rows(&self) -> bool {
        let Some(first) = self.first_bad else { return false };
        let rows = &self.rows[first..];
        rows.iter().any(|r| r.diverges(&self.tap_tolerance))
            || 4 * rows.iter().filter(|r| r.diverges(&self.floor)).count() >= rows.len()
    }

    /// Over the noise floor on at least a quarter of its rows: a systematic error, not
    /// a stray row (the 75th-percentile row is over the floor).
    pub fn systematically_over_floor(&self) -> bool {
        !self.rows.is_empty() && 4 * self.rows_over_floor >= self.rows.len()
    }

    /// Judge the rows again against `tol`.
    fn rejudge(&mut self, tol: Tolerance) {
        self.tolerance = tol;
        let diverged: Vec<bool> = self.rows.iter().map(|r| r.diverges(&tol)).collect();
        self.first_bad = diverged.iter().position(|&d| d);
        self.diverged_rows = diverged.iter().filter(|&&d| d).count();
    }

    /// The tap's largest max_abs: non-finite when any row holds NaN (NaN) or Inf (inf).
    fn worst_abs(rows: &[RowStat]) -> f64 {
        rows.iter().map(|r| r.max_abs).fold(
            0.0,
            |m: f64, v| if m.is_nan() || v.is_nan() { f64::NAN } else { m.max(v) },
        )
    }
}

/// What a prompt's rows were judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Judgement {
    /// Each tap's tolerance.
    Tolerance,
    /// Each tap's noise-floor threshold: an error systematically over the noise floor
    /// to the last layer begins at or before the first tap over tolerance (or no tap is
    /// over tolerance at all), so the floor, not the tolerance, shows where it begins.
    NoiseFloor,
}

/// How `diff` chooses the [`Judgement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// Against the noise floor (from the onset on) when a systematic error over the floor
    /// begins at or before the first tap over tolerance, or when it stays below tolerance
    /// everywhere and no profile replaces the generic floor; else against tolerance.
    Auto,
    Tolerance,
    NoiseFloor,
}

#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    pub index: usize,
    pub a: f64,
    pub b: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadError {
    pub head: usize,
    pub rel_l2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    pub tap: String,
    /// rel L2 at the first divergent position (None when that position was not dumped).
    pub at_position: Option<f64>,
    pub max_rel_l2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FirstDivergence {
    pub tap: String,
    pub position: usize,
    pub token: u32,
    pub metrics: Metrics,
    pub tolerance: Tolerance,
    /// A's rows of this tap equal B's shifted by this many positions (A at p holds
    /// B's p − shift): an engine writing or computing rows at the wrong positions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shift: Option<i64>,
    pub top_channels: Vec<Channel>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<HeadError>,
    pub growth: Vec<Growth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptDiff {
    pub id: String,
    pub text: Option<String>,
    pub n_tokens: usize,
    pub taps: Vec<TapDiff>,
    pub first: Option<FirstDivergence>,
    /// What the rows were judged against.
    pub judged: Judgement,
    /// The first tap systematically over its noise floor (a quarter of its rows or
    /// more) from which every later residual-stream tap stays over it.
    pub drift_onset: Option<String>,
    /// The engines ran different tokens: a finding of its own.
    pub token_mismatch: Option<TokenMismatch>,
    /// Taps one dump has and the other lacks (a crashed engine's partial dump).
    pub missing_in_a: Vec<String>,
    pub missing_in_b: Vec<String>,
    /// Positions one dump holds in a file and the other's same file lacks (below a token
    /// mismatch): not compared.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub positions_missing_in_a: Vec<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub positions_missing_in_b: Vec<usize>,
    /// The same rows by tap: which taps lack which positions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows_missing_in_a: Vec<MissingRows>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows_missing_in_b: Vec<MissingRows>,
    /// Per dump, the residual-stream taps and positions its manifest selects that it
    /// does not hold (and the other does): an engine that wrote less than asked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undelivered: Vec<String>,
}

/// Taps one dump holds at positions the other's same taps lack (an engine that computed
/// some rows only, such as the logits of the last position): not compared there.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MissingRows {
    pub taps: Vec<String>,
    pub positions: Vec<usize>,
}

impl MissingRows {
    /// `final_norm, logits at positions 0..53`.
    pub fn describe(&self) -> String {
        format!(
            "{} at positions {}",
            crate::report::abbreviate(&self.taps),
            crate::taps::positions_spec(&self.positions)
        )
    }

    /// Adds one file's missing rows to `all`, joining taps that lack the same positions.
    fn merge(all: &mut Vec<MissingRows>, rows: Option<MissingRows>) {
        let Some(rows) = rows else { return };
        match all.iter_mut().find(|r| r.positions == rows.positions) {
            Some(r) => {
                r.taps.extend(rows.taps);
                r.taps.sort_by_key(|t| Tap::parse(t));
            }
            None => all.push(rows),
        }
    }
}

impl PromptDiff {
    /// Diverged: a tap over its threshold, or different tokens.
    pub fn diverged(&self) -> bool {
        self.first.is_some() || self.token_mismatch.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DumpSide {
    pub path: String,
    pub engine: EngineInfo,
    pub status: Status,
    pub error: Option<RunError>,
    pub fingerprint: String,
    /// The last tap, in topological order, of any whole file (for unfinished dumps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_tap: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub version: u32,
    pub a: DumpSide,
    pub b: DumpSide,
    pub n_layer: usize,
    pub prompts: Vec<PromptDiff>,
    pub notes: Vec<String>,
    pub bytes_compared: u64,
    pub diverged: bool,
}

pub struct DiffOptions {
    pub tolerances: Tolerances,
    pub allow_model_mismatch: bool,
    pub judge: Judge,
    /// The tokens both engines were given (bisect's probes, one prompt): each side's are
    /// checked against them, so a side that ran more, fewer or other tokens is named, and
    /// both running the same wrong tokens is caught. Without them A may run past B's end
    /// (A may have generated past the tokens B replayed).
    pub given_tokens: Option<Vec<u32>>,
}

impl DiffReport {
    /// Why this comparison cannot pass whatever its rows say: a dump whose engine failed
    /// or never finished (status `failed` or `running`), with the failing op and the last
    /// tap written.
    pub fn engine_failure(&self) -> Option<String> {
        let why = |name: &str, side: &DumpSide| -> Option<String> {
            let last = side
                .error
                .as_ref()
                .and_then(|e| e.tap.clone())
                .or_else(|| side.last_tap.clone());
            let last = last.map_or_else(
                || " (no tap written)".to_string(),
                |t| format!(" (last tap written: {t})"),
            );
            match side.status {
                Status::Complete => None,
                Status::Failed => Some(format!("engine {name} failed: {}{last}", side.error.as_ref().map_or("no error recorded", |e| e.message.as_str()))),
                Status::Running => Some(format!("dump {name} is unfinished: its manifest still says running (the engine was killed or is still running){last}")),
            }
        };
        // A dump short of what it selects fails only where the rest agrees: a divergence
        // in what it holds is already no pass (rows written one position late leave the
        // first position out, and the shift is the finding).
        let short = self
            .prompts
            .iter()
            .filter(|p| !p.diverged())
            .flat_map(|p| p.undelivered.iter().map(move |u| format!("{u} (prompt {})", p.id)));
        let v: Vec<String> = [why("A", &self.a), why("B", &self.b)]
            .into_iter()
            .flatten()
            .chain(short)
            .collect();
        (!v.is_empty()).then(|| v.join("; "))
    }
}

fn side(d: &Dump) -> DumpSide {
    DumpSide {
        path: d.root.display().to_string(),
        engine: d.manifest.engine.clone(),
        status: d.manifest.status,
        error: d.manifest.error.clone(),
        fingerprint: d.manifest.model.fingerprint.clone().unwrap_or_else(|| "(none)".into()),
        last_tap: (d.manifest.status != Status::Complete)
            .then(|| d.last_tap_on_disk())
            .flatten(),
    }
}

/// Compare dump `a` (engine under test) with dump `b` (the reference).
pub fn diff(a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<DiffReport> {
    diff_paired(a, b, opts, &[])
}

/// [`diff`] with explicit prompt pairs (`A_ID`, `B_ID`); empty pairs the shared ids.
pub fn diff_paired(a: &Dump, b: &Dump, opts: &DiffOptions, pairs: &[(String, String)]) -> Result<DiffReport> {
    let (ma, mb) = (&a.manifest, &b.manifest);
    let mut notes = Vec::new();
    // Calibrated tolerances say how they were made, floors included.
    notes.extend(
        opts.tolerances
            .calibration
            .as_ref()
            .map(|c| format!("tolerances {}", c.describe())),
    );
    check_same_model(ma, mb, opts.allow_model_mismatch, &mut notes)?;
    partial_dump_notes(ma, mb, &mut notes);
    let engine_dtypes: Vec<TapDType> = [&ma.engine.dtype, &mb.engine.dtype]
        .iter()
        .filter_map(|d| engine_dtype(d))
        .collect();
    for (side, m) in [("A", ma), ("B", mb)] {
        if !m.engine.dtype.is_empty() && engine_dtype(&m.engine.dtype).is_none() {
            notes.push(format!(
                "engine {side}'s dtype {:?} is none of f64, f32, f16, bf16: its tolerances follow the dtypes its taps \
                 were dumped in, which may be finer than it computes",
                m.engine.dtype
            ));
        }
    }
    // Under a profile the generic f32 noise floor does not apply (its twin's tolerances
    // do): that floor then neither judges nor hints at a systematic error below tolerance.
    let profiled = [&ma.engine, &mb.engine]
        .iter()
        .any(|e| e.profile.as_deref().is_some_and(|p| p != "exact"));
    let mut prompts = Vec::new();
    let mut bytes = 0u64;
    for (ia, ib) in prompt_pairs(ma, mb, pairs, &mut notes)? {
        // B's prompt is read under A's id, so the comparison below sees one id.
        let renamed = if ia == ib {
            None
        } else {
            Some(b.with_prompt_renamed(&ib, &ia)?)
        };
        let (pd, n) = diff_prompt(a, renamed.as_ref().unwrap_or(b), &ia, &engine_dtypes, !profiled, opts)?;
        bytes += n;
        prompts.push(pd);
    }
    // Two finished dumps that share no tap compared nothing: that is no verdict. A dump
    // that lacks what its manifest selects is an engine failure, reported below.
    let complete = ma.status == Status::Complete && mb.status == Status::Complete;
    let nothing = prompts
        .iter()
        .all(|p| p.taps.is_empty() && p.token_mismatch.is_none() && p.undelivered.is_empty());
    if complete && nothing {
        let empty: Vec<&str> = [("A", a), ("B", b)]
            .into_iter()
            .filter(|(_, d)| d.wrote_no_tap())
            .map(|(name, _)| name)
            .collect();
        return Err(match empty.as_slice() {
            [] => crate::error::Error::input(
                "A and B share no tap at the same layer: nothing was compared (dump both with the same --layers and --taps)",
            ),
            // An engine that captured none of the taps it was asked for failed.
            [side] => crate::error::Error::engine(format!(
                "{side} ({}) finished without writing any tap: nothing was compared (its engine captured none of the taps it was asked for)",
                if *side == "A" { &ma.engine } else { &mb.engine }.describe()
            )),
            _ => crate::error::Error::engine("neither A nor B wrote any tap: nothing was compared"),
        });
    }
    for p in &prompts {
        if !(profiled && p.judged == Judgement::Tolerance) {
            notes.extend(judgement_note(p));
        }
        if p.diverged() {
            notes.extend(p.undelivered.iter().map(|u| format!("prompt {}: {u}", p.id)));
        }
        if let Some(f) = &p.first {
            notes.extend(second_origin_note(p, f).map(|n| format!("prompt {}: {n}", p.id)));
        }
        if let (Judgement::NoiseFloor, Some(f)) = (p.judged, &p.first) {
            notes.extend(under_tolerance_note(p, f).map(|n| format!("prompt {}: {n}", p.id)));
        }
        if let Some(overflow) = p.first.as_ref().and_then(first::f16_overflow_note) {
            notes.push(format!("prompt {}: {overflow}", p.id));
        }
        if let Some(m) = &p.token_mismatch {
            notes.push(format!(
                "prompt {}: {}; rows from there on are not compared",
                p.id,
                m.describe()
            ));
        }
    }
    let diverged = prompts.iter().any(PromptDiff::diverged);
    if diverged {
        let uncalibrated = opts.tolerances.calibration.is_none();
        let (ea, eb) = (&ma.engine, &mb.engine);
        notes.extend(profile_note(ea, eb).or_else(|| uncalibrated.then(|| twin_note(ea, eb)).flatten()));
        notes.extend(unimitated_settings_note(ea, eb));
    }
    Ok(DiffReport {
        version: 1,
        a: side(a),
        b: side(b),
        n_layer: ma.model.config.n_layer,
        prompts,
        notes,
        bytes_compared: bytes,
        diverged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tap judged against its floor, whose rows read `rel` (max_abs 1, all finite).
    fn judged_on_floor(rel: &[f64]) -> TapDiff {
        let (tap_tolerance, floor) = (
            Tolerance { rel_l2: 1e-3, abs: 0.0 },
            Tolerance { rel_l2: 4e-5, abs: 0.0 },
        );
        let rows: Vec<RowStat> = rel
            .iter()
            .map(|&rel_l2| RowStat {
                rel_l2,
                max_abs: 1.0,
                ..RowStat::default()
            })
            .collect();
        let mut diff = TapDiff {
            tap: "blk.4.ffn_post_norm".into(),
            dtype_a: "f32",
            dtype_b: "f32",
            tolerance: tap_tolerance,
            floor,
            tap_tolerance,
            noise_floor: 1e-5,
            rows_over_floor: rows.iter().filter(|r| r.diverges(&floor)).count(),
            positions: (0..rows.len()).collect(),
            rel_l2: rel.iter().map(|&r| r as f32).collect(),
            rows,
            logits: Vec::new(),
            max_abs: 1.0,
            first_bad: None,
            diverged_rows: 0,
        };
        diff.rejudge(floor);
        diff
    }

    #[test]
    fn a_single_row_over_the_floor_is_stray() {
        let mut rel = vec![2e-5; 40];
        rel[12] = 5.4e-5;
        assert!(!judged_on_floor(&rel).beyond_stray_rows());
    }

    #[test]
    fn rows_over_tolerance_or_not_finite_are_never_stray() {
        let mut rel = vec![2e-5; 40];
        rel[12] = 2e-3;
        assert!(judged_on_floor(&rel).beyond_stray_rows());
        rel[12] = f64::NAN;
        assert!(judged_on_floor(&rel).beyond_stray_rows());
    }

    /// A bug under tolerance that starts at a position shows on most rows from there on,
    /// however many clean rows come before it.
    #[test]
    fn an_error_over_the_floor_from_its_onset_on_is_not_stray() {
        let rel: Vec<f64> = (0..400).map(|i| if i < 300 { 2e-5 } else { 9e-5 }).collect();
        assert!(judged_on_floor(&rel).beyond_stray_rows());
        assert!(!judged_on_floor(&vec![2e-5; 400]).beyond_stray_rows());
    }
}
