//! Comparing two dumps: align by prompt, tap and position; refuse mismatched tokens or
//! models; compute per-row metrics (docs/report-format.md) straight from the mapped files, one file
//! pair at a time, rows in parallel; find the first divergence in topological order.

mod calibrate;
mod compare;
mod first;
mod metrics;
mod pairing;

use serde::Serialize;

pub use self::calibrate::calibrate;
use self::compare::diff_prompt;
pub use self::metrics::{logit_stat, row_stat, LogitStat, Metrics, RowStat};
pub use self::pairing::config_differences;
use self::pairing::{check_same_model, partial_dump_notes, prompt_pairs};
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
    /// A's tokens equal B's again after this many tokens from `position` on, which
    /// differ (a wrong BOS id): replaced tokens rather than a shift.
    pub replaced: Option<usize>,
    /// Both dumps record the same prompt text: the engines tokenized one text apart.
    pub same_text: bool,
    /// How many tokens each side ran.
    pub a_tokens: usize,
    pub b_tokens: usize,
    /// Set where the tokens both engines were given are known (bisect): the engine that
    /// ran other tokens than those ("A", "B" or "A and B"). Its tokens then stand as A's
    /// above, the tokens given as B's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Both dumps' logits at `position − 1` put B's token first, yet A ran another: A did
    /// not pick its top token there (set by `diff` where both hold those
    /// logits).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub a_not_top: bool,
}

impl TokenMismatch {
    /// The dumps are of different prompts rather than of one prompt run differently: the
    /// tokens differ from the first on, are no shift of each other, do not agree again
    /// after a few replaced tokens, and no common text explains them. Nothing of such a pair is comparable; `diff` refuses it.
    pub fn unrelated(&self) -> bool {
        self.position == 0 && self.shift.is_none() && self.replaced.is_none() && !self.same_text
    }

    pub fn describe(&self) -> String {
        let (na, nb, p) = (self.a_tokens, self.b_tokens, self.position);
        // Who ran what: A against B, or an engine against the tokens it was given.
        let (ours, ran_where) = match &self.engine {
            None => ("A".to_string(), format!("A ran {na} tokens where B ran {nb}")),
            Some(e) => {
                let (who, they) = if e.contains(" and ") {
                    (format!("engines {e}"), "they were")
                } else {
                    (format!("engine {e}"), "it was")
                };
                let ran = format!("{who} ran {na} tokens where {they} given {nb}");
                (who, ran)
            }
        };
        let (theirs_tokens, theirs_input) = if self.engine.is_some() {
            ("the prompt's tokens", "the prompt")
        } else {
            ("B's tokens", "B's input")
        };
        // Equal up to where one side ends: one ran a truncated or extended input.
        if self.shift.is_none() && (self.a.is_none() || self.b.is_none()) {
            let why = if self.a.is_none() {
                format!("{ours}'s input ends early (a prompt truncated to a context or batch size, or fewer tokens generated?)")
            } else {
                format!(
                    "{ours} ran {} more from position {p} on (token {} appended: an EOS or BOS added to the prompt?)",
                    na - nb,
                    self.a.unwrap_or_default()
                )
            };
            return format!("{ran_where}, the same up to position {p}: {why}");
        }
        let tok = |t: Option<u32>| t.map_or("nothing".to_string(), |t| format!("token {t}"));
        let shift = match self.shift {
            Some(k) if k > 0 => format!("; {ours} has {k} extra token(s) there and is {theirs_input} shifted by +{k}"),
            Some(k) => {
                // More than a few tokens gone: a span dropped, as an engine that keeps the head
                // and the tail of a prompt over its context does.
                let span = if k < -4 {
                    ", a span of the prompt dropped (context overflow?)"
                } else {
                    ""
                };
                format!(
                    "; {ours} lacks {} of {theirs_tokens} there and is {theirs_input} shifted by {k}{span}",
                    -k
                )
            }
            None => match self.replaced {
                Some(n) if p == 0 => format!("; they agree again after {n} replaced token(s), as with a wrong BOS id"),
                Some(n) => format!("; they agree again after {n} replaced token(s)"),
                None => String::new(),
            },
        };
        let counts = if na == nb {
            String::new()
        } else {
            format!(" ({ran_where})")
        };
        let (has_a, has_b) = (tok(self.a), tok(self.b));
        let not_top = if self.a_not_top {
            format!(
                "; A's own logits at position {} put {has_b} first, as B's do, yet A ran {has_a}: if A generated \
                 it, A did not pick greedily (a repetition penalty, a temperature, or a token taken from another row)",
                p - 1
            )
        } else {
            String::new()
        };
        match &self.engine {
            None => format!("the engines ran different tokens from position {p}{counts}: A has {has_a}, B has {has_b}{shift}{not_top}"),
            Some(_) => format!(
                "{ours} ran other tokens than {} given from position {p}{counts}: {has_a} where the prompt has {has_b}{shift}",
                if ours.starts_with("engines") { "they were" } else { "it was" }
            ),
        }
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

/// What the noise floor says of prompt `p`, when it says anything.
pub fn judgement_note(p: &PromptDiff) -> Option<String> {
    let onset = p.taps.iter().find(|t| Some(&t.tap) == p.drift_onset.as_ref())?;
    let over = format!(
        "{} sits over its noise floor (threshold {:.1e}) on {} of {} rows",
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

/// A note when the first divergence is under its tap's own tolerance (rows were judged
/// against the noise floor because the error stays over it to the last layer). When later
/// rows of the tap exceed the tolerance, the error grows along the prompt, as a logic
/// bug's does (a wrong RoPE base grows with the distance between positions), and the
/// note says so with the largest row: the first row alone would understate it. When none
/// does, an error of that size is as often reduced-precision arithmetic that engine A
/// uses on purpose as a logic bug, and the note says how to judge by tolerance instead.
pub fn under_tolerance_note(p: &PromptDiff, first: &FirstDivergence) -> Option<String> {
    let tap = p.taps.iter().find(|t| t.tap == first.tap)?;
    let tolerance = tap.tap_tolerance.rel_l2;
    if first.metrics.rel_l2 >= tolerance {
        return None;
    }
    let head = format!(
        "{}@{} is off by rel_l2 {:.2e}, under its tolerance {:.2e}",
        first.tap, first.position, first.metrics.rel_l2, tolerance
    );
    let over = tap.rows.iter().filter(|row| row.rel_l2_or_inf() >= tolerance).count();
    let worst = tap
        .rows
        .iter()
        .zip(&tap.positions)
        .max_by(|a, b| a.0.rel_l2_or_inf().total_cmp(&b.0.rel_l2_or_inf()));
    Some(match worst {
        Some((row, position)) if over > 0 => format!(
            "{head}, but {over} of the tap's {} rows compared exceed it (largest rel_l2 {:.2e}, at position \
             {position}): the error grows along the prompt, as a logic bug's does (a wrong RoPE base or scale \
             grows with the distance between positions), not as reduced precision's",
            tap.rows.len(),
            row.rel_l2_or_inf(),
        ),
        _ => format!(
            "{head}: it was found against the noise floor, over which the error stays to the last layer. An \
             error this small comes as often from reduced-precision arithmetic (TF32, bf16 or f16 rounding, \
             another exp, GELU or softmax approximation) as from a logic bug; if engine A computes so on purpose, \
             --judge tolerance (or tolerances from resbisect calibrate) judges it by tolerance"
        ),
    })
}

/// A note when a tap after the first divergent one diverges at an earlier position than
/// it: at positions up to that one every tap before it agrees, so its error has an origin
/// of its own (a second faulty op, or one fault in what both read, such as a weight
/// decoder), which the first divergence alone would hide. Taps are in topological order
/// (`p.taps`), rows judged as the first divergence was; that row must also be over its
/// tap's tolerance, so a stray row over a noise floor is not called an origin.
pub fn second_origin_note(p: &PromptDiff, first: &FirstDivergence) -> Option<String> {
    let (tap, row) = p
        .taps
        .iter()
        .filter_map(|t| t.first_bad.map(|row| (t, row)))
        .min_by_key(|(t, row)| t.positions[*row])?;
    let position = tap.positions[row];
    (position < first.position && tap.rows[row].diverges(&tap.tap_tolerance)).then(|| {
        format!(
            "{}@{position} diverges too (rel_l2 {:.2e}) before {} does (from position {}): every tap before it agrees \
             at positions up to {position}, so its error has an origin of its own, a second fault or one both share \
             (a weight's decoding, a kernel used by several ops)",
            tap.tap, tap.rel_l2[row], first.tap, first.position
        )
    })
}

/// The profile that imitates llama.cpp engine `e`'s numerics: `llamacpp-cuda` for its
/// CUDA build, `llamacpp-cpu` for every other.
pub(crate) fn llamacpp_profile(e: &crate::dump::EngineInfo) -> &'static str {
    if e.backend == "cuda" {
        "llamacpp-cuda"
    } else {
        "llamacpp-cpu"
    }
}

/// Of a pair, the llama.cpp dump and the reference dump with their sides' names (A first
/// or reversed), when the pair is one.
fn llamacpp_against_reference<'d>(
    a: &'d crate::dump::EngineInfo,
    b: &'d crate::dump::EngineInfo,
) -> Option<(
    &'d crate::dump::EngineInfo,
    &'d crate::dump::EngineInfo,
    &'static str,
    &'static str,
)> {
    let reference = |e: &crate::dump::EngineInfo| e.name.starts_with("resbisect-reference");
    if a.name == "llama.cpp" && reference(b) {
        Some((a, b, "A", "B"))
    } else if b.name == "llama.cpp" && reference(a) {
        Some((b, a, "B", "A"))
    } else {
        None
    }
}

/// Why a llama.cpp dump departs from a reference dump (either side) from layer 0 on without
/// any bug: the reference computed exactly (profile `exact`), where llama.cpp by design
/// quantizes each matmul's activations to 8 bits and keeps K and V in f16; or it imitated
/// the other llama.cpp backend's numerics (`llamacpp-cuda` against a CPU build, or the
/// reverse). Names the profile to use instead; `None` for every other pair.
pub fn profile_note(a: &crate::dump::EngineInfo, b: &crate::dump::EngineInfo) -> Option<String> {
    let (engine, oracle, side, _) = llamacpp_against_reference(a, b)?;
    let profile = oracle.profile.as_deref().unwrap_or("exact");
    let own = llamacpp_profile(engine);
    if profile == "exact" {
        return Some(format!(
            "{side} is llama.cpp, which by design quantizes each matmul's activations to 8 bits and keeps K and V \
             in f16, and the reference computed exactly (profile exact): it departs from layer 0 on even without \
             a bug; rerun with --profile {own} (docs/profiles.md) to compare against those numerics"
        ));
    }
    let imitated = profile.strip_prefix("llamacpp-")?;
    (matches!(engine.backend.as_str(), "cpu" | "cuda") && profile != own).then(|| {
        format!(
            "{side} is llama.cpp's {backend} build, but the reference imitated its {imitated} numerics (profile \
             {profile}): the two round differently from layer 0 on even without a bug; rerun with \
             --profile {own} (docs/profiles.md)",
            backend = engine.backend
        )
    })
}

/// For llama.cpp against a reference imitating its numerics (a profile other than
/// exact): the settings llama.cpp recorded that no profile imitates, which move its rows
/// by design. Flash attention: its CPU kernel rounds q to f16 and accumulates V in f16
/// below 64-row micro-batches, and keeps q and the softmax in f32 above (ggml-cpu ops.cpp
/// `ggml_compute_forward_flash_attn_ext_f16`), where the profile follows the unfused
/// graph. A quantized KV cache: rounded to its type, and Hadamard-rotated first
/// (llama-kv-cache.cpp `attn_rot_k`/`attn_rot_v`), where the profile keeps K and V in f16.
/// `None` when there are none.
pub fn unimitated_settings_note(a: &crate::dump::EngineInfo, b: &crate::dump::EngineInfo) -> Option<String> {
    let (engine, oracle, side, _) = llamacpp_against_reference(a, b)?;
    oracle.profile.as_deref().filter(|p| *p != "exact")?;
    let options = engine.options.as_ref()?;
    let option = |key: &str| options.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    let mut settings = Vec::new();
    if matches!(option("flash_attn"), "on" | "auto") {
        settings.push(format!("flash_attn={}", option("flash_attn")));
    }
    for key in ["cache_type_k", "cache_type_v"] {
        if !matches!(option(key), "" | "f16") {
            settings.push(format!("{key}={}", option(key)));
        }
    }
    (!settings.is_empty()).then(|| {
        format!(
            "{side} (llama.cpp) ran with {}, which the reference's profile does not imitate (it follows llama.cpp \
             without flash attention, with an f16 KV cache): attention and what follows may diverge by that \
             setting alone; to tell it from a bug, bisect against a healthy llama.cpp with the same settings \
             (--oracle external --oracle-command ...; docs/llamacpp.md)",
            settings.join(", ")
        )
    })
}

/// For a divergent diff of llama.cpp against a reference that imitates its rounding (a
/// profile other than exact) judged at uncalibrated tolerances: 8-bit rounding flips land on other
/// rows in the engine than in the reference past layer 0, which only tolerances from the
/// profile's twin take in (what bisect uses). `None` otherwise.
pub(crate) fn twin_note(a: &crate::dump::EngineInfo, b: &crate::dump::EngineInfo) -> Option<String> {
    let (_, oracle, _, side) = llamacpp_against_reference(a, b)?;
    let profile = oracle.profile.as_deref().filter(|p| *p != "exact")?;
    if oracle.options.as_ref().is_some_and(|o| o.get("twin").is_some()) {
        return Some(format!(
            "{side} is the profile's twin (dump --twin), which measures the profile's own rounding noise: \
             compare llama.cpp with the profiled reference (dump --profile {profile}) under tolerances \
             calibrated from the twin against it (calibrate TWIN REFERENCE --quantile 1 --margin 4 \
             --floor 1e-3; docs/profiles.md)"
        ));
    }
    Some(format!(
        "{side} imitates an engine's rounding (profile {profile}) at uncalibrated tolerances: 8-bit rounding \
         flips (from layer 0's first quantized matmul on) land on other rows than the engine's and read as \
         divergence; judge against \
         tolerances from the reference's twin (dump --profile {profile} --twin, then calibrate TWIN {side} \
         --quantile 1 --margin 4 --floor 1e-3; docs/profiles.md), as bisect does"
    ))
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
