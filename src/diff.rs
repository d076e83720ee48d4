//! Comparing two dumps: align by prompt, tap and position; refuse mismatched tokens or
//! models; compute per-row metrics (docs/report-format.md) straight from the mapped files, one file
//! pair at a time, rows in parallel; find the first divergence in topological order.

use rayon::prelude::*;
use serde::Serialize;
use wide::{f32x8, i32x8};

use crate::dump::{Dump, EngineInfo, MappedFile, RunError, Status, TapDType, TapView};
use crate::error::{Error, Result};
use crate::taps::Tap;
use crate::tolerance::{coarsest, engine_dtype, Tolerance, Tolerances};

const TOP_CHANNELS: usize = 8;

/// The compact per-row record kept for every compared (tap, position).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RowStat {
    pub rel_l2: f64,
    pub max_abs: f64,
    pub cosine: f64,
    pub norm_b: f64,
    pub nonfinite_a: u32,
    pub nonfinite_b: u32,
}

impl RowStat {
    pub fn nmse(&self) -> f64 {
        self.rel_l2 * self.rel_l2
    }

    pub fn sqnr_db(&self) -> f64 {
        -20.0 * self.rel_l2.log10()
    }

    pub fn diverges(&self, tol: &Tolerance) -> bool {
        self.nonfinite_a + self.nonfinite_b > 0
            || (self.rel_l2 > tol.rel_l2 && self.max_abs > tol.abs)
            || self.rel_l2.is_nan()
    }
}

/// KL(P_b ‖ P_a) over softmaxed logits, top-1 agreement and top-5 overlap.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LogitStat {
    pub kl: f64,
    pub top1_agree: bool,
    pub top5_overlap: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub max_abs: f64,
    pub rel_l2: f64,
    pub cosine: f64,
    pub nmse: f64,
    pub sqnr_db: f64,
    pub nonfinite_a: u32,
    pub nonfinite_b: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<LogitStat>,
}

impl Metrics {
    fn new(s: &RowStat, logits: Option<LogitStat>) -> Self {
        Self {
            max_abs: s.max_abs,
            rel_l2: s.rel_l2,
            cosine: s.cosine,
            nmse: s.nmse(),
            sqnr_db: s.sqnr_db(),
            nonfinite_a: s.nonfinite_a,
            nonfinite_b: s.nonfinite_b,
            logits,
        }
    }
}

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
        self.rows
            .iter()
            .map(|r| {
                if r.nonfinite_a + r.nonfinite_b > 0 {
                    f64::INFINITY
                } else {
                    r.rel_l2
                }
            })
            .fold(0.0, f64::max)
    }

    fn rel_at(&self, position: usize) -> Option<f64> {
        self.positions
            .binary_search(&position)
            .ok()
            .map(|i| self.rows[i].rel_l2)
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
    /// Each tap's noise-floor threshold: the first tap over tolerance sits on an error
    /// that is systematically over the noise floor from that tap or an earlier one on, so
    /// the floor, not the tolerance, shows where the error begins.
    NoiseFloor,
}

/// How `diff` chooses the [`Judgement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// Against the noise floor (from the onset on) when a systematic error over the floor
    /// begins at or before the first tap over tolerance; else against tolerance.
    Auto,
    Tolerance,
    NoiseFloor,
}

/// The tokens two dumps ran differ: the engines did not process the same input (e.g. a
/// doubled BOS). Rows before `position` are still compared (causality).
#[derive(Debug, Clone, Serialize)]
pub struct TokenMismatch {
    pub position: usize,
    /// The token at `position` (None past the end of that side's tokens).
    pub a: Option<u32>,
    pub b: Option<u32>,
    /// A's tokens from `position` on equal B's shifted by this many positions (+1: A
    /// holds one extra token at `position`; −1: A lacks B's token there).
    pub shift: Option<i64>,
}

impl TokenMismatch {
    pub fn describe(&self) -> String {
        let tok = |t: Option<u32>| t.map_or("nothing".to_string(), |t| format!("token {t}"));
        let shift = match self.shift {
            Some(k) if k > 0 => format!("; A has {k} extra token(s) there and is B's input shifted by +{k}"),
            Some(k) => format!("; A lacks {} of B's tokens there and is B's input shifted by {k}", -k),
            None => String::new(),
        };
        format!(
            "the engines ran different tokens from position {}: A has {}, B has {}{shift}",
            self.position,
            tok(self.a),
            tok(self.b)
        )
    }
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
            let last = last.map(|t| format!(" (last tap written: {t})")).unwrap_or_default();
            match side.status {
                Status::Complete => None,
                Status::Failed => Some(format!("engine {name} failed: {}{last}", side.error.as_ref().map_or("no error recorded", |e| e.message.as_str()))),
                Status::Running => Some(format!("dump {name} is unfinished: its manifest still says running (the engine was killed or is still running){last}")),
            }
        };
        let v: Vec<String> = [why("A", &self.a), why("B", &self.b)].into_iter().flatten().collect();
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

/// What the noise floor says of prompt `p`, when it says anything.
pub fn judgement_note(p: &PromptDiff) -> Option<String> {
    let onset = p.taps.iter().find(|t| Some(&t.tap) == p.drift_onset.as_ref())?;
    let over = format!(
        "{} sits over its noise floor (rel_l2 {:.1e}) on {} of {} rows",
        onset.tap,
        onset.floor.rel_l2,
        onset.rows_over_floor,
        onset.rows.len()
    );
    Some(match (p.judged, &p.first) {
        (Judgement::NoiseFloor, _) => format!("prompt {}: judged against the noise floor from {}: {over}, and every later residual-stream tap too", p.id, onset.tap),
        (Judgement::Tolerance, None) => format!("prompt {}: within tolerance, but {over}, and every later residual-stream tap too: a systematic error below tolerance? (--judge floor judges against the floor)", p.id),
        (Judgement::Tolerance, Some(_)) => return None,
    })
}

/// Compare dump `a` (engine under test) with dump `b` (the reference).
pub fn diff(a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<DiffReport> {
    diff_paired(a, b, opts, &[])
}

/// The fields two model configs disagree on, as `model.FIELD: A x vs B y`.
pub fn config_differences(a: &crate::model::Config, b: &crate::model::Config) -> Vec<String> {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let show = |v: &serde_json::Value| match v {
        // 1e-5 and 100000 rather than 0.000009999999747378752 and 100000.0.
        serde_json::Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or_default() as f32),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = Vec::new();
    if let (Some(oa), Some(ob)) = (va.as_object(), vb.as_object()) {
        for (key, x) in oa {
            let y = &ob[key.as_str()];
            if x != y {
                out.push(format!("model.{key}: A {} vs B {}", show(x), show(y)));
            }
        }
    }
    out
}

/// Which prompt of A is compared with which of B: the `pairs` given (`A_ID`, `B_ID`),
/// else the ids both dumps hold, else — one prompt on each side whose tokens agree —
/// those two, with a note.
fn prompt_pairs(
    ma: &crate::dump::Manifest,
    mb: &crate::dump::Manifest,
    pairs: &[(String, String)],
    notes: &mut Vec<String>,
) -> Result<Vec<(String, String)>> {
    let ids = |m: &crate::dump::Manifest| m.prompts.iter().map(|p| p.id.clone()).collect::<Vec<_>>().join(", ");
    if !pairs.is_empty() {
        for (ia, ib) in pairs {
            for (m, side, id) in [(ma, "A", ia), (mb, "B", ib)] {
                if !m.prompts.iter().any(|p| &p.id == id) {
                    return Err(Error::input(format!(
                        "--pair {ia}={ib}: dump {side} has no prompt {id:?} (it has: {})",
                        ids(m)
                    )));
                }
            }
        }
        return Ok(pairs.to_vec());
    }
    fn ids_of(m: &crate::dump::Manifest) -> std::collections::HashSet<&str> {
        m.prompts.iter().map(|p| p.id.as_str()).collect()
    }
    let (in_a, in_b) = (ids_of(ma), ids_of(mb));
    let mut out = Vec::new();
    for pa in &ma.prompts {
        if in_b.contains(pa.id.as_str()) {
            out.push((pa.id.clone(), pa.id.clone()));
        } else {
            notes.push(format!("prompt {} is only in A", pa.id));
        }
    }
    for pb in &mb.prompts {
        if !in_a.contains(pb.id.as_str()) {
            notes.push(format!("prompt {} is only in B", pb.id));
        }
    }
    if !out.is_empty() {
        return Ok(out);
    }
    if let ([pa], [pb]) = (ma.prompts.as_slice(), mb.prompts.as_slice()) {
        let n = pa.tokens.len().min(pb.tokens.len());
        if n > 0 && pa.tokens[..n] == pb.tokens[..n] {
            notes.retain(|n| !n.starts_with("prompt ") || !n.contains(" is only in "));
            notes.push(format!(
                "prompt ids differ (A {}, B {}); compared as the one prompt of each dump, whose tokens agree",
                pa.id, pb.id
            ));
            return Ok(vec![(pa.id.clone(), pb.id.clone())]);
        }
    }
    Err(Error::input(format!(
        "the dumps share no prompt id (A has: {}; B has: {}); name the pairs with --pair A_ID=B_ID",
        ids(ma),
        ids(mb)
    )))
}

/// [`diff`] with explicit prompt pairs (`A_ID`, `B_ID`); empty pairs the shared ids.
pub fn diff_paired(a: &Dump, b: &Dump, opts: &DiffOptions, pairs: &[(String, String)]) -> Result<DiffReport> {
    let (ma, mb) = (&a.manifest, &b.manifest);
    let mut notes = Vec::new();
    match (&ma.model.fingerprint, &mb.model.fingerprint) {
        (Some(fa), Some(fb)) if fa != fb => {
            if !opts.allow_model_mismatch {
                return Err(Error::input(format!("the dumps come from different models (fingerprints {fa} and {fb}); pass --allow-model-mismatch to compare anyway")));
            }
            notes.push(format!("model fingerprints differ ({fa} vs {fb}), compared on request"));
        }
        (Some(_), Some(_)) => {}
        (fa, fb) => {
            let which = if fa.is_none() && fb.is_none() {
                "neither dump has".to_string()
            } else {
                format!("dump {} has no", if fa.is_none() { "A" } else { "B" })
            };
            notes.push(format!(
                "{which} model.fingerprint: that both ran the same model rests on their config and tokens"
            ));
        }
    }
    let differences = config_differences(&ma.model.config, &mb.model.config);
    if !differences.is_empty() {
        return Err(Error::input(format!(
            "the dumps disagree on the model config: {}",
            differences.join(", ")
        )));
    }
    for (d, name) in [(ma, "A"), (mb, "B")] {
        match d.status {
            Status::Complete => {}
            Status::Running => notes.push(format!(
                "dump {name} is partial: its engine was still running or was killed"
            )),
            Status::Failed => notes.push(format!(
                "dump {name} is partial: its engine failed: {}",
                d.error
                    .as_ref()
                    .map(|e| format!(
                        "{}{}",
                        e.message,
                        e.tap
                            .as_ref()
                            .map(|t| format!(" (last tap written: {t})"))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default()
            )),
        }
    }
    let engine_dtypes: Vec<TapDType> = [&ma.engine.dtype, &mb.engine.dtype]
        .iter()
        .filter_map(|d| engine_dtype(d))
        .collect();
    let mut prompts = Vec::new();
    let mut bytes = 0u64;
    for (ia, ib) in prompt_pairs(ma, mb, pairs, &mut notes)? {
        // B's prompt is read under A's id, so the comparison below sees one id.
        let renamed = if ia == ib {
            None
        } else {
            Some(b.with_prompt_renamed(&ib, &ia)?)
        };
        let (pd, n) = diff_prompt(a, renamed.as_ref().unwrap_or(b), &ia, &engine_dtypes, opts)?;
        bytes += n;
        prompts.push(pd);
    }
    for p in &prompts {
        notes.extend(judgement_note(p));
        if let Some(m) = &p.token_mismatch {
            notes.push(format!(
                "prompt {}: {}; rows from there on are not compared",
                p.id,
                m.describe()
            ));
        }
    }
    let diverged = prompts.iter().any(PromptDiff::diverged);
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

/// The dump files either side holds for a prompt, in graph order: the loop runs over
/// files that exist, never over the layer count a manifest declares.
fn file_stems(a: &Dump, b: &Dump, id: &str, n_layer: usize) -> Result<Vec<String>> {
    let mut stems: Vec<String> = a.files(id)?;
    stems.extend(b.files(id)?);
    stems.retain(|s| crate::dump::is_file_stem(s, n_layer));
    let order = |s: &String| match s.strip_prefix("blk.") {
        Some(l) => l.parse::<usize>().map_or(usize::MAX, |l| l.saturating_add(1)),
        None if s == "embed" => 0,
        None => usize::MAX,
    };
    stems.sort_by_key(order);
    stems.dedup();
    Ok(stems)
}

/// What one file pair contributes to a prompt's diff.
#[derive(Default)]
struct FileDiff {
    taps: Vec<TapDiff>,
    missing_in_a: Vec<String>,
    missing_in_b: Vec<String>,
    max_pos: Option<usize>,
    bytes: u64,
}

/// Compare one file pair of prompt `id` at the positions both hold below `limit`.
#[allow(clippy::too_many_arguments)]
fn diff_file(
    a: &Dump,
    b: &Dump,
    id: &str,
    stem: &str,
    limit: usize,
    engine_dtypes: &[TapDType],
    opts: &DiffOptions,
) -> Result<FileDiff> {
    let mut out = FileDiff::default();
    let (fa, fb) = match (a.map_file(id, stem)?, b.map_file(id, stem)?) {
        (Some(fa), Some(fb)) => (fa, fb),
        (Some(fa), None) => {
            out.missing_in_b.extend(fa.taps.keys().cloned());
            return Ok(out);
        }
        (None, Some(fb)) => {
            out.missing_in_a.extend(fb.taps.keys().cloned());
            return Ok(out);
        }
        (None, None) => return Ok(out),
    };
    out.missing_in_b
        .extend(fa.taps.keys().filter(|k| !fb.taps.contains_key(*k)).cloned());
    out.missing_in_a
        .extend(fb.taps.keys().filter(|k| !fa.taps.contains_key(*k)).cloned());
    let (mut ia, mut ib): (Vec<usize>, Vec<usize>) = common_rows(&fa.positions, &fb.positions);
    let below = ia.iter().take_while(|&&i| fa.positions[i] < limit).count();
    ia.truncate(below);
    ib.truncate(below);
    if ia.is_empty() {
        return Ok(out);
    }
    let positions: Vec<usize> = ia.iter().map(|&i| fa.positions[i]).collect();
    out.max_pos = positions.last().copied();
    let mut ids: Vec<&String> = fa.taps.keys().filter(|k| fb.taps.contains_key(*k)).collect();
    ids.sort_by_key(|k| Tap::parse(k));
    for tap_id in ids {
        let (va, vb) = (fa.tap(tap_id).expect("listed"), fb.tap(tap_id).expect("listed"));
        let mut dtypes = engine_dtypes.to_vec();
        dtypes.extend([va.dtype, vb.dtype]);
        let tolerance = opts.tolerances.for_tap(tap_id, coarsest(&dtypes));
        let floor = opts.tolerances.floor_for(tap_id, coarsest(&dtypes));
        let rows: Vec<RowStat> = ia
            .par_iter()
            .zip(&ib)
            .map(|(&i, &j)| row_stat(&va.row(i), &vb.row(j)))
            .collect();
        let logits = if tap_id == "logits" {
            ia.par_iter()
                .zip(&ib)
                .map(|(&i, &j)| logit_stat(&va.row(i), &vb.row(j)))
                .collect()
        } else {
            Vec::new()
        };
        out.bytes += ((va.dtype.size() + vb.dtype.size()) * va.width * rows.len()) as u64;
        let diverged: Vec<bool> = rows.iter().map(|r| r.diverges(&tolerance)).collect();
        out.taps.push(TapDiff {
            tap: tap_id.clone(),
            dtype_a: va.dtype.name(),
            dtype_b: vb.dtype.name(),
            tolerance,
            floor,
            rows_over_floor: rows.iter().filter(|r| r.diverges(&floor)).count(),
            positions: positions.clone(),
            first_bad: diverged.iter().position(|&d| d),
            diverged_rows: diverged.iter().filter(|&&d| d).count(),
            rel_l2: rows
                .iter()
                .map(|r| {
                    if r.nonfinite_a + r.nonfinite_b > 0 {
                        f32::INFINITY
                    } else {
                        r.rel_l2 as f32
                    }
                })
                .collect(),
            max_abs: TapDiff::worst_abs(&rows),
            rows,
            logits,
        });
    }
    Ok(out)
}

fn diff_prompt(
    a: &Dump,
    b: &Dump,
    id: &str,
    engine_dtypes: &[TapDType],
    opts: &DiffOptions,
) -> Result<(PromptDiff, u64)> {
    let (pa, pb) = (a.prompt(id)?, b.prompt(id)?);
    let n_layer = a.manifest.model.config.n_layer;
    // Causality: rows before the first differing token saw the same input.
    let token_mismatch = token_mismatch(&pa.tokens, &pb.tokens);
    let limit = token_mismatch.as_ref().map_or(usize::MAX, |m| m.position);
    // File pairs in parallel (their mapping and page-table work is serial per file), in
    // order; at most one pair per worker thread is mapped at a time.
    let files = file_stems(a, b, id, n_layer)?
        .par_iter()
        .map(|stem| diff_file(a, b, id, stem, limit, engine_dtypes, opts))
        .collect::<Result<Vec<_>>>()?;
    let (mut taps, mut missing_in_a, mut missing_in_b) = (Vec::new(), Vec::new(), Vec::new());
    let (mut max_pos, mut bytes) = (None, 0u64);
    for f in files {
        taps.extend(f.taps);
        missing_in_a.extend(f.missing_in_a);
        missing_in_b.extend(f.missing_in_b);
        max_pos = max_pos.max(f.max_pos);
        bytes += f.bytes;
    }
    if let Some(max) = max_pos {
        if pa.tokens.len() <= max || pb.tokens.len() <= max {
            return Err(Error::input(format!(
                "prompt {id}: a dump has rows past the end of its tokens (position {max})"
            )));
        }
    }
    for missing in [&mut missing_in_a, &mut missing_in_b] {
        missing.sort_by_key(|t| Tap::parse(t));
    }
    let drift_onset = systematic_onset(&taps);
    let first_over_tolerance = taps.iter().position(|t| t.first_bad.is_some());
    let judged = match (opts.judge, drift_onset, first_over_tolerance) {
        (Judge::Tolerance, ..) => Judgement::Tolerance,
        (Judge::NoiseFloor, ..) => Judgement::NoiseFloor,
        // The first tap over tolerance sits on a systematic error over the floor that
        // began there or earlier: the floor shows where it began.
        (Judge::Auto, Some(onset), Some(first)) if onset <= first => Judgement::NoiseFloor,
        (Judge::Auto, ..) => Judgement::Tolerance,
    };
    if judged == Judgement::NoiseFloor {
        // Automatically, only from the onset on: earlier taps sit within their floor on
        // most rows, and a stray row there is not the origin.
        let from = if opts.judge == Judge::Auto {
            drift_onset.unwrap_or(0)
        } else {
            0
        };
        for t in &mut taps[from..] {
            let floor = t.floor;
            t.rejudge(floor);
        }
    }
    let first = first_divergence(a, b, id, &taps, &pa.tokens, n_layer)?;
    let drift_onset = drift_onset.map(|i| taps[i].tap.clone());
    Ok((
        PromptDiff {
            id: id.to_string(),
            text: pa.text.clone(),
            n_tokens: pa.tokens.len(),
            taps,
            first,
            judged,
            drift_onset,
            token_mismatch,
            missing_in_a,
            missing_in_b,
        },
        bytes,
    ))
}

/// The first position where the token lists differ (within the shorter one), and whether
/// A's tokens from there are B's shifted by a few positions. Different lengths over a
/// common prefix are not a mismatch (an engine may have generated more).
fn token_mismatch(a: &[u32], b: &[u32]) -> Option<TokenMismatch> {
    let position = a.iter().zip(b).position(|(x, y)| x != y)?;
    // Compared over at most this many tokens: enough to tell a shift from chance.
    const SPAN: usize = 64;
    let same = |x: &[u32], y: &[u32]| {
        let n = x.len().min(y.len()).min(SPAN);
        n > 0 && x[..n] == y[..n]
    };
    let shift = (1..=4i64).find_map(|k| {
        let k_us = k as usize;
        if a.len() > position + k_us && same(&a[position + k_us..], &b[position..]) {
            Some(k)
        } else if b.len() > position + k_us && same(&a[position..], &b[position + k_us..]) {
            Some(-k)
        } else {
            None
        }
    });
    Some(TokenMismatch {
        position,
        a: a.get(position).copied(),
        b: b.get(position).copied(),
        shift,
    })
}

/// Index of the first tap (output head excluded) that is systematically over its noise
/// floor and from which every later residual-stream tap (`embed`, `blk.L.resid_post`)
/// stays so: where a sub-tolerance error that the residual stream carries begins.
fn systematic_onset(taps: &[TapDiff]) -> Option<usize> {
    let mut later_stream_over = true;
    let mut onset = None;
    for (i, t) in taps.iter().enumerate().rev() {
        if t.tap == "final_norm" || t.tap == "logits" {
            continue;
        }
        let over = t.systematically_over_floor();
        if over && later_stream_over {
            onset = Some(i);
        }
        if t.tap == "embed" || t.tap.ends_with(".resid_post") {
            later_stream_over &= over;
        }
    }
    onset
}

/// Row indices (into each file) of the positions both files hold.
fn common_rows(pa: &[usize], pb: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut i, mut j) = (0, 0);
    let (mut ia, mut ib) = (Vec::new(), Vec::new());
    while i < pa.len() && j < pb.len() {
        match pa[i].cmp(&pb[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                ia.push(i);
                ib.push(j);
                i += 1;
                j += 1;
            }
        }
    }
    (ia, ib)
}

/// Generic over the two stored dtypes so each combination gets a tight loop.
trait Elem {
    fn read(b: &[u8], i: usize) -> f64;
}
struct EF32;
struct EF64;
struct EF16;
struct EBF16;
impl Elem for EF32 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as f64
    }
}
impl Elem for EF64 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
    }
}
impl Elem for EF16 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64()
    }
}
impl Elem for EBF16 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64()
    }
}

fn stat_typed<A: Elem, B: Elem>(a: &[u8], b: &[u8], n: usize) -> RowStat {
    let (mut d2, mut b2, mut a2, mut ab, mut max_abs) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut nf_a, mut nf_b) = (0u32, 0u32);
    // The largest |a−b| of a row holding Inf is inf, of one holding NaN NaN.
    let mut nonfinite_abs = 0.0f64;
    for i in 0..n {
        let (x, y) = (A::read(a, i), B::read(b, i));
        if !x.is_finite() || !y.is_finite() {
            nf_a += u32::from(!x.is_finite());
            nf_b += u32::from(!y.is_finite());
            let d = (x - y).abs();
            nonfinite_abs = if nonfinite_abs.is_nan() || d.is_nan() {
                f64::NAN
            } else {
                f64::INFINITY
            };
            continue;
        }
        let d = x - y;
        d2 += d * d;
        b2 += y * y;
        a2 += x * x;
        ab += x * y;
        max_abs = max_abs.max(d.abs());
    }
    let norm_b = b2.sqrt();
    // Non-finite values make the row's error unbounded, whatever its finite part says.
    let rel_l2 = if nf_a + nf_b > 0 {
        f64::INFINITY
    } else if norm_b > 0.0 {
        d2.sqrt() / norm_b
    } else if d2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cosine = if nf_a + nf_b > 0 {
        f64::NAN
    } else if a2 > 0.0 && b2 > 0.0 {
        ab / (a2.sqrt() * norm_b)
    } else if a2 == b2 {
        1.0
    } else {
        0.0
    };
    let max_abs = if nf_a + nf_b > 0 { nonfinite_abs } else { max_abs };
    RowStat {
        rel_l2,
        max_abs,
        cosine,
        norm_b,
        nonfinite_a: nf_a,
        nonfinite_b: nf_b,
    }
}

macro_rules! dispatch {
    ($f:ident, $a:expr, $b:expr, $n:expr) => {{
        use TapDType::*;
        match ($a.dtype, $b.dtype) {
            (F32, F32) => $f::<EF32, EF32>($a.bytes, $b.bytes, $n),
            (F32, F64) => $f::<EF32, EF64>($a.bytes, $b.bytes, $n),
            (F32, F16) => $f::<EF32, EF16>($a.bytes, $b.bytes, $n),
            (F32, BF16) => $f::<EF32, EBF16>($a.bytes, $b.bytes, $n),
            (F64, F32) => $f::<EF64, EF32>($a.bytes, $b.bytes, $n),
            (F64, F64) => $f::<EF64, EF64>($a.bytes, $b.bytes, $n),
            (F64, F16) => $f::<EF64, EF16>($a.bytes, $b.bytes, $n),
            (F64, BF16) => $f::<EF64, EBF16>($a.bytes, $b.bytes, $n),
            (F16, F32) => $f::<EF16, EF32>($a.bytes, $b.bytes, $n),
            (F16, F64) => $f::<EF16, EF64>($a.bytes, $b.bytes, $n),
            (F16, F16) => $f::<EF16, EF16>($a.bytes, $b.bytes, $n),
            (F16, BF16) => $f::<EF16, EBF16>($a.bytes, $b.bytes, $n),
            (BF16, F32) => $f::<EBF16, EF32>($a.bytes, $b.bytes, $n),
            (BF16, F64) => $f::<EBF16, EF64>($a.bytes, $b.bytes, $n),
            (BF16, F16) => $f::<EBF16, EF16>($a.bytes, $b.bytes, $n),
            (BF16, BF16) => $f::<EBF16, EBF16>($a.bytes, $b.bytes, $n),
        }
    }};
}

pub fn row_stat(a: &TapView, b: &TapView) -> RowStat {
    if let (TapDType::F32, TapDType::F32, Ok(x), Ok(y)) = (
        a.dtype,
        b.dtype,
        bytemuck::try_cast_slice::<u8, f32>(a.bytes),
        bytemuck::try_cast_slice::<u8, f32>(b.bytes),
    ) {
        if let Some(stat) = stat_f32_finite(x, y) {
            return stat;
        }
    }
    dispatch!(stat_typed, a, b, a.width)
}

/// The common case (both f32, aligned, all finite) in 8-wide SIMD (`wide::f32x8`);
/// lanes accumulate in f32 over blocks of 256 values, blocks in f64. `None` when a
/// value is non-finite: the generic path then counts them.
fn stat_f32_finite(a: &[f32], b: &[f32]) -> Option<RowStat> {
    const BLOCK: usize = 256;
    let (mut d2, mut b2, mut a2, mut ab, mut max_abs) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f32);
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let zero = f32x8::splat(0.0);
        let (mut sd, mut sb, mut sa, mut sab, mut mx) = (zero, zero, zero, zero, zero);
        let mut ia = ca.chunks_exact(8);
        let mut ib = cb.chunks_exact(8);
        for (x, y) in (&mut ia).zip(&mut ib) {
            let x = f32x8::from(<[f32; 8]>::try_from(x).expect("exact chunk"));
            let y = f32x8::from(<[f32; 8]>::try_from(y).expect("exact chunk"));
            let d = x - y;
            sd = d.mul_add(d, sd);
            sb = y.mul_add(y, sb);
            sa = x.mul_add(x, sa);
            sab = x.mul_add(y, sab);
            mx = mx.fast_max(d.abs());
        }
        let (mut rd, mut rb, mut ra, mut rab, mut rmx) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
            let d = x - y;
            rd += d * d;
            rb += y * y;
            ra += x * x;
            rab += x * y;
            rmx = rmx.max(d.abs());
        }
        d2 += sd.reduce_add() as f64 + rd as f64;
        b2 += sb.reduce_add() as f64 + rb as f64;
        a2 += sa.reduce_add() as f64 + ra as f64;
        ab += sab.reduce_add() as f64 + rab as f64;
        max_abs = mx.to_array().iter().fold(max_abs.max(rmx), |m, &v| m.max(v));
    }
    // A NaN or Inf anywhere shows up in the sums.
    if !(d2.is_finite() && b2.is_finite() && a2.is_finite() && ab.is_finite()) {
        return None;
    }
    let norm_b = b2.sqrt();
    let rel_l2 = if norm_b > 0.0 {
        d2.sqrt() / norm_b
    } else if d2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cosine = if a2 > 0.0 && b2 > 0.0 {
        ab / (a2.sqrt() * norm_b)
    } else if a2 == b2 {
        1.0
    } else {
        0.0
    };
    Some(RowStat {
        rel_l2,
        max_abs: max_abs as f64,
        cosine,
        norm_b,
        nonfinite_a: 0,
        nonfinite_b: 0,
    })
}

/// A row as f32: borrowed when stored as aligned f32, converted otherwise.
fn f32_row<'a>(v: &TapView<'a>) -> std::borrow::Cow<'a, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(v.bytes) {
        Ok(x) if v.dtype == TapDType::F32 => std::borrow::Cow::Borrowed(x),
        _ => std::borrow::Cow::Owned((0..v.width).map(|i| v.get(i) as f32).collect()),
    }
}

/// Indices of the `K` largest values, largest first, in one pass; chunks of 8 with no
/// value above the current K-th best are skipped with one SIMD compare.
fn top<const K: usize>(x: &[f32]) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(K + 1);
    let mut threshold = f32::NEG_INFINITY;
    let consider = |i: usize, v: f32, best: &mut Vec<usize>, threshold: &mut f32| {
        if best.len() == K && v <= *threshold {
            return;
        }
        let at = best.iter().position(|&j| v > x[j]).unwrap_or(best.len());
        best.insert(at, i);
        best.truncate(K);
        if best.len() == K {
            *threshold = x[best[K - 1]];
        }
    };
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let lanes = f32x8::from(<[f32; 8]>::try_from(chunk).expect("exact chunk"));
        if best.len() == K && !lanes.simd_gt(f32x8::splat(threshold)).any() {
            continue;
        }
        for (k, &v) in chunk.iter().enumerate() {
            consider(c * 8 + k, v, &mut best, &mut threshold);
        }
    }
    let base = x.len() - tail.len();
    for (k, &v) in tail.iter().enumerate() {
        consider(base + k, v, &mut best, &mut threshold);
    }
    best
}

/// exp(x) for x ≤ 0 (softmax after subtracting the max), 8 lanes: 2^k·p(r) with
/// Cody–Waite reduction and a degree-6 polynomial, no special cases left to branch on
/// (inputs are clamped at −87); relative error below 5e-7 (test below). wide's general
/// `exp` handles the whole range and measured 3× slower here.
#[inline(always)]
fn exp_nonpositive(x: f32x8) -> f32x8 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.fast_max(f32x8::splat(-87.0));
    let k = (x * f32x8::splat(std::f32::consts::LOG2_E)).round();
    let r = (x - k * f32x8::splat(LN2_HI)) - k * f32x8::splat(LN2_LO);
    let mut p = f32x8::splat(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, f32x8::splat(c));
    }
    // 2^k from the exponent bits; a multiply stands in for the shift.
    let bits = (k.round_int() + i32x8::splat(127)) * i32x8::splat(1 << 23);
    p * bytemuck::cast::<i32x8, f32x8>(bits)
}

/// Σ exp(x − max), and Σ exp(x − max)·(x − y) over the same elements, 8-wide;
/// f32 within blocks of 256, f64 across.
fn exp_sums(x: &[f32], max: f32, y: &[f32]) -> (f64, f64) {
    let (mut total, mut weighted) = (0.0f64, 0.0f64);
    let m = f32x8::splat(max);
    for (bx, by) in x.chunks(256).zip(y.chunks(256)) {
        let (mut s, mut w) = (f32x8::splat(0.0), f32x8::splat(0.0));
        let mut ix = bx.chunks_exact(8);
        let mut iy = by.chunks_exact(8);
        for (cx, cy) in (&mut ix).zip(&mut iy) {
            let cx = f32x8::from(<[f32; 8]>::try_from(cx).expect("exact chunk"));
            let cy = f32x8::from(<[f32; 8]>::try_from(cy).expect("exact chunk"));
            let e = exp_nonpositive(cx - m);
            s += e;
            w = e.mul_add(cx - cy, w);
        }
        let (mut rs, mut rw) = (0f32, 0f32);
        for (&v, &u) in ix.remainder().iter().zip(iy.remainder()) {
            let e = (v - max).exp();
            rs += e;
            rw += e * (v - u);
        }
        total += s.reduce_add() as f64 + rs as f64;
        weighted += w.reduce_add() as f64 + rw as f64;
    }
    (total, weighted)
}

/// KL(P_b ‖ P_a) = Σ p_b·(x_b − x_a) − (lse_b − lse_a).
pub fn logit_stat(a: &TapView, b: &TapView) -> LogitStat {
    let (xa, xb) = (f32_row(a), f32_row(b));
    let max = |x: &[f32]| x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (max_a, max_b) = (max(&xa), max(&xb));
    let (sum_a, _) = exp_sums(&xa, max_a, &xa);
    let (sum_b, cross) = exp_sums(&xb, max_b, &xa);
    let (lse_a, lse_b) = (max_a as f64 + sum_a.ln(), max_b as f64 + sum_b.ln());
    let kl = cross / sum_b - (lse_b - lse_a);
    let kl = if kl.is_finite() { kl.max(0.0) } else { f64::INFINITY };
    let (ta, tb) = (top::<5>(&xa), top::<5>(&xb));
    LogitStat {
        kl,
        top1_agree: ta.first() == tb.first(),
        top5_overlap: ta.iter().filter(|i| tb.contains(i)).count() as u8,
    }
}

fn head_count(tap: &Tap, a: &Dump) -> Option<usize> {
    let c = &a.manifest.model.config;
    match tap {
        Tap::Layer(_, i) => match i.name() {
            "q" | "attn" => Some(c.n_head),
            "k" | "v" => Some(c.n_head_kv),
            _ => None,
        },
        _ => None,
    }
}

/// Whether A's rows of `tap` from `position` on equal B's rows shifted by a few positions
/// (A at p holds B's p − k), judged on up to 64 rows that have a partner.
fn row_shift(fa: &MappedFile, fb: &MappedFile, tap: &str, position: usize, tol: &Tolerance) -> Option<i64> {
    let (va, vb) = (fa.tap(tap)?, fb.tap(tap)?);
    let from = fa.positions.partition_point(|&p| p < position);
    [1i64, -1, 2, -2, 3, -3, 4, -4].into_iter().find(|&k| {
        let pairs: Vec<(usize, usize)> = (from..fa.positions.len())
            .filter_map(|i| {
                let q = fa.positions[i] as i64 - k;
                let j = usize::try_from(q)
                    .ok()
                    .and_then(|q| fb.positions.binary_search(&q).ok())?;
                Some((i, j))
            })
            .take(64)
            .collect();
        let matching = pairs
            .iter()
            .filter(|&&(i, j)| !row_stat(&va.row(i), &vb.row(j)).diverges(tol))
            .count();
        !pairs.is_empty() && 4 * matching >= 3 * pairs.len()
    })
}

fn first_divergence(
    a: &Dump,
    b: &Dump,
    id: &str,
    taps: &[TapDiff],
    tokens: &[u32],
    n_layer: usize,
) -> Result<Option<FirstDivergence>> {
    let Some((k, td)) = taps.iter().enumerate().find(|(_, t)| t.first_bad.is_some()) else {
        return Ok(None);
    };
    let row = td.first_bad.expect("found above");
    let position = td.positions[row];
    let tap = Tap::parse(&td.tap).expect("taps in dumps are canonical");
    let stem = tap.file_stem();
    let load = |d: &Dump| -> Result<MappedFile> {
        d.map_file(id, &stem.to_string())?
            .ok_or_else(|| Error::input(format!("{stem} vanished while comparing")))
    };
    let (fa, fb) = (load(a)?, load(b)?);
    let pick = |f: &MappedFile| -> Result<Vec<f64>> {
        let r = f
            .positions
            .binary_search(&position)
            .map_err(|_| Error::input(format!("{stem} changed while comparing")))?;
        let v = f
            .tap(&td.tap)
            .ok_or_else(|| Error::input(format!("{} vanished while comparing", td.tap)))?;
        let v = v.row(r);
        Ok((0..v.width).map(|i| v.get(i)).collect())
    };
    let (ra, rb) = (pick(&fa)?, pick(&fb)?);
    let shift = row_shift(&fa, &fb, &td.tap, position, &td.tolerance);
    let diff_of = |i: usize| {
        let d = (ra[i] - rb[i]).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let mut order: Vec<usize> = (0..ra.len()).collect();
    order.sort_by(|&i, &j| diff_of(j).total_cmp(&diff_of(i)));
    let top_channels = order
        .iter()
        .take(TOP_CHANNELS)
        .map(|&i| Channel {
            index: i,
            a: ra[i],
            b: rb[i],
        })
        .collect();
    let heads = match head_count(&tap, a) {
        Some(h) => {
            let hd = ra.len() / h;
            let mut v: Vec<HeadError> = (0..h)
                .map(|head| {
                    let s = head * hd..(head + 1) * hd;
                    let d: f64 = s.clone().map(|i| (ra[i] - rb[i]).powi(2)).sum();
                    let n: f64 = s.map(|i| rb[i] * rb[i]).sum();
                    HeadError {
                        head,
                        rel_l2: if n > 0.0 { (d / n).sqrt() } else { d.sqrt() },
                    }
                })
                .collect();
            v.sort_by(|x, y| y.rel_l2.total_cmp(&x.rel_l2));
            v
        }
        None => Vec::new(),
    };
    // How the error grows: the same tap in later layers, every later resid_post, logits.
    let same_kind = |t: &Tap| match (t, &tap) {
        (Tap::Layer(_, i), Tap::Layer(_, j)) => i == j,
        _ => false,
    };
    let growth = taps[k + 1..]
        .iter()
        .filter(|t| {
            let p = Tap::parse(&t.tap).expect("canonical");
            same_kind(&p) || t.tap.ends_with(".resid_post") || t.tap == "logits" || t.tap == "final_norm"
        })
        .take(3 * n_layer + 2)
        .map(|t| Growth {
            tap: t.tap.clone(),
            at_position: t.rel_at(position),
            max_rel_l2: t.max_rel_l2(),
        })
        .collect();
    let logits = td.logits.get(row).copied();
    Ok(Some(FirstDivergence {
        tap: td.tap.clone(),
        position,
        token: tokens[position],
        metrics: Metrics::new(&td.rows[row], logits),
        tolerance: td.tolerance,
        shift,
        top_channels,
        heads,
        growth,
    }))
}

/// Tolerances from known-good pairs: per tap kind (`blk.*.q`, `logits`, …), the largest
/// rel L2 seen, times `margin`, never below `floor`. Rows holding NaN/Inf (or an error
/// too large to scale) measure no noise floor: they are skipped, and a tap kind with
/// nothing else keeps the defaults; the notes say which, so the file always loads.
pub fn calibrate(reports: &[DiffReport], margin: f64, floor: f64) -> (Tolerances, Vec<String>) {
    // pattern -> (order key, worst finite rel L2, rows skipped)
    let mut worst: std::collections::BTreeMap<String, (Tap, Option<f64>, usize)> = std::collections::BTreeMap::new();
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
                    if row.nonfinite_a + row.nonfinite_b > 0 || !scaled.is_finite() {
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
            .map(|(pattern, _, v)| crate::tolerance::TapTolerance {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..25_000 {
            let xs: [f32; 8] = std::array::from_fn(|j| -((i * 8 + j) as f32) * 87.0 / 200_000.0);
            let got = exp_nonpositive(f32x8::from(xs)).to_array();
            for (x, g) in xs.iter().zip(got) {
                let want = (*x as f64).exp();
                worst = worst.max(((g as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        for n in [1usize, 5, 7, 8, 9, 100, 49_157] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 10_007) as f32).sin()).collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&i, &j| x[j].total_cmp(&x[i]));
            order.truncate(5);
            assert_eq!(top::<5>(&x), order, "n = {n}");
        }
    }

    #[test]
    fn kl_matches_the_definition() {
        let a: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i % 7) as f32 - 3.0) * 0.05)
            .collect();
        let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let (ba, bb) = (bytes(&a), bytes(&b));
        let view = |d: &[u8]| TapView {
            dtype: TapDType::F32,
            rows: 1,
            width: 1000,
            bytes: unsafe { std::slice::from_raw_parts(d.as_ptr(), d.len()) },
        };
        let got = logit_stat(&view(&ba), &view(&bb)).kl;
        let lsm = |x: &[f32]| {
            let m = x.iter().copied().fold(f32::MIN, f32::max) as f64;
            let l = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - l).collect::<Vec<f64>>()
        };
        let (la, lb) = (lsm(&a), lsm(&b));
        let want: f64 = la.iter().zip(&lb).map(|(qa, pb)| pb.exp() * (pb - qa)).sum();
        // f32 block sums of a cancelling difference: measured gap below 1e-4 relative.
        assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
    }
}
