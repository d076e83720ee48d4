//! `resbisect bisect`: drives an engine under test (A) and an oracle (B) with as few and
//! as small dumps as it can — a coarse probe over sparse layers at every
//! position, truncation of the prompt after the first divergent position (causality),
//! binary search over layers, all taps of the suspect layer — then replays the suspect
//! layer and its neighbours on the reference from A's own inputs to separate the error a
//! layer introduces from the error it inherits. A crash of either engine is a result.

mod labels;
mod probe;
mod readings;
mod replay;
mod reruns;
mod search;
mod stream;
mod twin;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use self::probe::{dir_bytes, ProbeRecord};
pub use self::replay::Replayer;
pub use self::twin::TWIN_MIN_ROWS;
use crate::diff::{DiffReport, FirstDivergence, Judge, Judgement, TokenMismatch};
use crate::dump::{PromptRecord, RunError};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::Config;
use crate::tolerance::Tolerances;

pub struct BisectOptions {
    pub tolerances: Tolerances,
    pub allow_model_mismatch: bool,
    /// How the coarse probe is judged (`Auto`: against the noise floor when it shows a
    /// systematic error over the floor before any tap over tolerance); later probes
    /// keep to what it decided.
    pub judge: Judge,
    /// Logits join the coarse probe at every position only while one engine's logits
    /// stay under this many bytes; otherwise a last-rows probe checks the head.
    pub logits_budget: u64,
    /// Probe dumps go here (created; must be absent or empty).
    pub work: PathBuf,
    /// Run A and B one after the other instead of at the same time (engines that cannot
    /// share a device or memory). Two engines that compute on the host's cores always
    /// run one after the other ([`Engine::computes_on_host`](crate::engine::Engine)).
    pub sequential: bool,
    /// Positions before the suspect layer's first divergent one at which all its taps are
    /// probed; a tap already off at the first of them gets a probe of its own.
    pub tap_window: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Clean,
    Diverged,
    Crashed,
}

/// A crash of one engine, as a result.
#[derive(Debug, Clone, Serialize)]
pub struct Crash {
    /// `A` (engine under test) or `B` (oracle).
    pub engine: String,
    pub label: String,
    pub error: RunError,
    pub probe: String,
    /// The engine ran to its end but its dump breaks the dump contract (no last tap).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
}

impl Crash {
    /// Where the engine stopped: its last tap written, or that it finished.
    pub fn stopped_at(&self) -> String {
        match (&self.error.tap, self.finished) {
            (_, true) => "the engine finished; its dump breaks the dump contract".into(),
            (Some(tap), false) => format!("last tap written: {tap}"),
            (None, false) => "last tap written: none".into(),
        }
    }
}

/// Local replay of one layer on the reference from A's own input.
#[derive(Debug, Clone, Serialize)]
pub struct LayerAttribution {
    pub layer: usize,
    /// rel L2 of A's input to the layer against B's (max over positions).
    pub inherited: f64,
    /// rel L2 of A's output against the reference layer applied to A's input.
    pub introduced: f64,
    /// rel L2 of A's output against B's.
    pub total: f64,
    /// Position of the largest introduced error.
    pub at_position: usize,
    pub tolerance: f64,
    pub introduces: bool,
    /// A tap of this layer is further from its replay than its tolerance (the suspect
    /// layer only, whose taps were dumped): the layer introduces error even where its
    /// output's rows hide it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introducing_tap: Option<String>,
    /// A's own dumps of the layer disagree: its input is off B's, yet its output is
    /// within a tenth of that of B's ([`LayerAttribution::dumps_disagree`]); then
    /// `introduces` is false, as nothing about the layer can be told.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dumps_disagree: bool,
}

impl LayerAttribution {
    /// Whether A's input and output rows of the layer cannot both be what A computed: a
    /// layer adds to its residual input, so an error there over tolerance stays in its
    /// output unless the layer cancels it; an output more than 10× closer to B's than
    /// the input was read from another probe of an engine that is not deterministic, or
    /// from taps that are not what the engine computes.
    pub fn dumps_disagree(inherited: f64, total: f64, tolerance: f64) -> bool {
        inherited > tolerance && total * 10.0 < inherited
    }
}

/// Within the suspect layer: each tap of A against the replay from A's layer input.
#[derive(Debug, Clone, Serialize)]
pub struct TapAttribution {
    pub tap: String,
    pub introduced: f64,
    pub at_position: usize,
    pub tolerance: f64,
    pub introduces: bool,
}

/// One coarse tap's error against its noise floor.
#[derive(Debug, Clone, Serialize)]
pub struct NoiseLevel {
    pub tap: String,
    /// The 75th-percentile row's rel L2 (non-finite rows count as infinite).
    pub p75_rel_l2: f64,
    /// The expected noise floor of a sound engine for the tap's dtype (tolerance file's
    /// `floors`, or the built-ins).
    pub floor: f64,
    /// What a row is judged against under the noise floor: `floor` × the margin, at most
    /// the tolerance. (Before `threshold` existed, `floor` held this value.)
    pub threshold: f64,
    pub tolerance: f64,
    pub rows_over_floor: usize,
    pub rows: usize,
}

#[derive(Debug, Serialize)]
pub struct BisectReport {
    pub version: u32,
    pub model: String,
    pub fingerprint: String,
    pub prompt: String,
    pub n_tokens: usize,
    pub engine_a: String,
    pub engine_b: String,
    pub outcome: Outcome,
    pub first: Option<FirstDivergence>,
    /// The engines ran different tokens (an engine bug: a doubled BOS, a dropped token).
    pub token_mismatch: Option<TokenMismatch>,
    /// What the search judged rows against: tolerances, or the noise floor when the
    /// coarse probe showed a systematic error over the floor before any tap crossed its
    /// tolerance.
    pub judged: Judgement,
    /// The noise floor as the coarse probe measured it, per residual-stream tap.
    pub noise: Vec<NoiseLevel>,
    /// Tokens the final probes ran: the cut prompt (first divergent position + 1, at
    /// least 32), or, with non-finite values, every token the coarse probe streamed.
    pub prefix: usize,
    pub crash: Option<Crash>,
    pub replay: Vec<LayerAttribution>,
    pub replay_taps: Vec<TapAttribution>,
    /// The positions local replay recomputed.
    pub replay_positions: Vec<usize>,
    /// What replayed: `reference f32, profile llamacpp-cpu` (empty without replay).
    pub replay_oracle: String,
    pub probes: Vec<ProbeRecord>,
    /// Probes, each one dump of each engine's (`⌈log2 L⌉ + 4` at most by design).
    pub runs_a: usize,
    pub runs_b: usize,
    /// Times each engine ran: a probe streamed in chunks runs an engine that does not
    /// resume from its KV cache once per chunk (a prefix run anew, its model loaded
    /// again), one that resumes continues one run.
    pub engine_runs_a: usize,
    pub engine_runs_b: usize,
    pub bytes_dumped: u64,
    pub seconds: f64,
    /// Of `seconds`, local replay (loading the replayed layers and running them).
    pub seconds_replay: f64,
    pub reproduce: Vec<String>,
    /// Why a divergence is expected of these two engines' numerics (see
    /// [`numerics_note`]); absent when nothing explains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics_note: Option<String>,
    /// How the oracle's twin set the tolerances, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    /// A divergence local replay does not place in any replayed layer (see
    /// [`replay_note`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_note: Option<String>,
    /// What the search noticed that changes how the answer reads: an engine that is not
    /// causal, taps an engine left out before the first divergent one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(skip)]
    pub final_diff: Option<DiffReport>,
    /// The coarse probe's comparison, for the report's layers × positions plot.
    #[serde(skip)]
    pub coarse_diff: Option<DiffReport>,
}

impl BisectReport {
    /// The report of a search that has not probed yet: clean until a probe says otherwise.
    fn new(prompt: &PromptRecord, engine_a: String, engine_b: String) -> Self {
        let n = prompt.tokens.len();
        BisectReport {
            version: 1,
            model: String::new(),
            fingerprint: String::new(),
            prompt: prompt.id.clone(),
            n_tokens: n,
            engine_a,
            engine_b,
            outcome: Outcome::Clean,
            first: None,
            token_mismatch: None,
            judged: Judgement::Tolerance,
            noise: Vec::new(),
            prefix: n,
            crash: None,
            replay: Vec::new(),
            replay_taps: Vec::new(),
            replay_positions: Vec::new(),
            replay_oracle: String::new(),
            probes: Vec::new(),
            runs_a: 0,
            runs_b: 0,
            engine_runs_a: 0,
            engine_runs_b: 0,
            bytes_dumped: 0,
            seconds: 0.0,
            seconds_replay: 0.0,
            reproduce: Vec::new(),
            numerics_note: None,
            twin: None,
            replay_note: None,
            notes: Vec::new(),
            final_diff: None,
            coarse_diff: None,
        }
    }
}

/// The probe directory must be new or empty: bisect never mixes in old dumps.
pub fn check_work_dir(work: &Path) -> Result<()> {
    if work.exists()
        && std::fs::read_dir(work)
            .map_err(|e| Error::io(work, e))?
            .next()
            .is_some()
    {
        return Err(Error::input(format!(
            "the work directory {} is not empty",
            work.display()
        )));
    }
    Ok(())
}

/// Coarse layers: 0, 1, 2, 4, 8, …, and the last.
pub fn coarse_layers(n_layer: usize) -> Vec<usize> {
    let mut out = vec![0];
    let mut l = 1;
    while l < n_layer {
        out.push(l);
        l *= 2;
    }
    if *out.last().expect("non-empty") != n_layer - 1 {
        out.push(n_layer - 1);
    }
    out
}

/// The engines of one search: A (under test), the oracle B, and B's twin when B is the
/// reference under a rounding profile (every probe then measures each tap's tolerance
/// against it).
pub struct Engines<'e> {
    pub a: &'e mut dyn Engine,
    pub b: &'e mut dyn Engine,
    pub twin: Option<Twin<'e>>,
}

/// B's twin and what B's profile reproduces exactly enough that the twin's distance,
/// not the tap's generic tolerance, bounds its noise.
pub struct Twin<'e> {
    pub engine: &'e mut dyn Engine,
    /// Layer 0's taps (names like `q`) B's profile computes without a rounding decision
    /// that could differ from the engine's
    /// (`resbisect_reference::Profile::layer0_taps_without_rounding_flips`).
    pub flip_free_layer0_taps: &'static [&'static str],
}

/// Run the search on one prompt: A against the oracle B over the model of `config`,
/// local replay on `replayer`.
pub fn bisect<'e>(
    engines: Engines<'e>,
    replayer: Replayer,
    prompt: PromptRecord,
    config: &Config,
    opts: &'e BisectOptions,
) -> Result<BisectReport> {
    std::thread::scope(|scope| search::search(scope, engines, replayer, prompt, config, opts))
}

/// For a divergence whose local replay finds every replayed layer computing its output
/// from A's own inputs within tolerance (no layer, and no tap of the suspect layer,
/// introduces error): the error was carried in from below the replayed layers and grew
/// on the way. A bug shows as a layer introducing error; rounding noise of an engine that
/// computes differently by design (8-bit activations) grows like this at sensitive
/// positions, beyond what the twin met. Or, first, for a layer whose dumps disagree with
/// each other ([`LayerAttribution::dumps_disagree`]). None when replay did not run or
/// places the error.
pub fn replay_note(r: &BisectReport) -> Option<String> {
    if let Some(l) = r.replay.iter().find(|l| l.dumps_disagree) {
        return Some(format!(
            "local replay: A's dumps of layer {} disagree with each other: its input is off B's by rel L2 {:.2e}, \
             yet its output is within {:.2e} of B's, and a layer carries its input's error into its output. \
             The rows came from probes that computed differently (an engine that is not deterministic) or are not \
             what the engine computed; the search compares probes, so its answer may not hold",
            l.layer, l.inherited, l.total
        ));
    }
    let (first, lowest) = (r.first.as_ref()?, r.replay.iter().map(|l| l.layer).min()?);
    // Only a divergence inside a replayed layer: the embedding and the output head are
    // not what replay recomputes.
    let layer = crate::taps::Tap::parse(&first.tap).and_then(|t| t.layer())?;
    if r.outcome != Outcome::Diverged
        || !r.replay.iter().any(|l| l.layer == layer)
        || r.replay.iter().any(|l| l.introduces)
        || r.replay_taps.iter().any(|t| t.introduces)
    {
        return None;
    }
    let largest = r.replay.iter().map(|l| l.introduced).fold(0.0f64, f64::max);
    Some(format!(
        "local replay finds no replayed layer introducing error (at most {largest:.2e}): {} at position {} is \
         error carried in from below layer {lowest} and grown on the way; rounding noise does this at \
         sensitive positions, a bug shows as a layer introducing error. To tell them apart, bisect against a \
         healthy build of the same engine with the same settings (--oracle external)",
        first.tap, first.position
    ))
}

/// A note for a report whose A is llama.cpp and whose B does not imitate its numerics
/// ([`crate::diff::profile_note`]), or, when B is not the reference, whose local replay
/// ran on the exact reference: llama.cpp quantizes each matmul's activations to 8 bits and
/// stores K and V in f16 by design (docs/profiles.md), so it departs from an exact
/// reference from layer 0 on whether or not it has a bug. Followed by the settings A ran
/// with that B's profile does not imitate ([`crate::diff::unimitated_settings_note`]).
/// None for any other pair.
pub fn numerics_note(a: &crate::dump::EngineInfo, b: &crate::dump::EngineInfo, replay_oracle: &str) -> Option<String> {
    if a.name != "llama.cpp" {
        return None;
    }
    let exact_replay = !replay_oracle.is_empty() && !replay_oracle.contains("profile");
    let numerics = crate::diff::profile_note(a, b).or_else(|| {
        exact_replay.then(|| {
            format!(
                "A is llama.cpp and local replay ran on the exact reference: llama.cpp's own 8-bit activations \
                 and f16 KV cache show in every replayed tap, so replay's first tap off may precede the bug; \
                 rerun with --profile {} (docs/profiles.md) to replay through those numerics",
                crate::diff::llamacpp_profile(a)
            )
        })
    });
    let notes: Vec<String> = numerics
        .into_iter()
        .chain(crate::diff::unimitated_settings_note(a, b))
        .collect();
    (!notes.is_empty()).then(|| notes.join(". "))
}

#[cfg(test)]
mod tests {
    use super::{coarse_layers, numerics_note};
    use crate::dump::EngineInfo;

    fn engine(name: &str, backend: &str, profile: Option<&str>) -> EngineInfo {
        EngineInfo {
            name: name.into(),
            version: String::new(),
            backend: backend.into(),
            dtype: "f32".into(),
            device: String::new(),
            options: None,
            profile: profile.map(str::to_string),
        }
    }

    #[test]
    fn a_profile_of_the_other_llamacpp_backend_is_named_as_such() {
        let reference = |p| engine("resbisect-reference", "cpu", Some(p));
        let cpu_build = engine("llama.cpp", "cpu", None);
        let note = numerics_note(&cpu_build, &reference("llamacpp-cuda"), "").unwrap();
        assert!(
            note.contains("llama.cpp's cpu build") && note.contains("--profile llamacpp-cpu"),
            "{note}"
        );
        let cuda_build = engine("llama.cpp", "cuda", None);
        let note = numerics_note(&cuda_build, &reference("llamacpp-cpu"), "").unwrap();
        assert!(note.contains("--profile llamacpp-cuda"), "{note}");
        let replayed = "reference f32, profile llamacpp-cpu";
        assert_eq!(numerics_note(&cpu_build, &reference("llamacpp-cpu"), replayed), None);
        assert_eq!(numerics_note(&cuda_build, &reference("llamacpp-cuda"), replayed), None);
        // Against the exact reference, each build is pointed at its own profile.
        let exact = engine("resbisect-reference", "cpu", None);
        for (build, profile) in [(&cpu_build, "llamacpp-cpu"), (&cuda_build, "llamacpp-cuda")] {
            let note = numerics_note(build, &exact, "").unwrap();
            assert!(note.contains("profile exact") && note.contains(profile), "{note}");
            // A diff may hold the reference as A: the note names llama.cpp's side.
            let reversed = crate::diff::profile_note(&exact, build).unwrap();
            assert!(
                reversed.starts_with("B is llama.cpp") && reversed.contains(profile),
                "{reversed}"
            );
        }
    }

    #[test]
    fn settings_no_profile_imitates_are_named() {
        let with = |options: serde_json::Value| crate::dump::EngineInfo {
            options: Some(options),
            ..engine("llama.cpp", "cpu", None)
        };
        let profiled = engine("resbisect-reference", "cpu", Some("llamacpp-cpu"));
        let plain = with(serde_json::json!({"flash_attn": "off", "cache_type_k": "f16", "cache_type_v": "f16"}));
        assert_eq!(numerics_note(&plain, &profiled, ""), None);
        let fa = with(serde_json::json!({"flash_attn": "on", "cache_type_k": "f16", "cache_type_v": "q8_0"}));
        let note = numerics_note(&fa, &profiled, "").unwrap();
        assert!(
            note.contains("flash_attn=on, cache_type_v=q8_0") && note.contains("--oracle external"),
            "{note}"
        );
        // Against the exact reference the profile note comes first, then the settings
        // are not named (no profile ran to leave them out).
        let exact = engine("resbisect-reference", "cpu", None);
        let note = numerics_note(&fa, &exact, "").unwrap();
        assert!(note.contains("profile exact") && !note.contains("flash_attn"), "{note}");
        // Against another llama.cpp, its own settings are the oracle's business.
        assert_eq!(numerics_note(&fa, &with(serde_json::json!({})), ""), None);
    }

    #[test]
    fn a_diff_against_a_profile_without_twin_tolerances_points_to_the_twin() {
        let llama = engine("llama.cpp", "cpu", None);
        let profiled = engine("resbisect-reference", "cpu", Some("llamacpp-cpu"));
        assert_eq!(crate::diff::profile_note(&llama, &profiled), None);
        let note = crate::diff::twin_note(&llama, &profiled).unwrap();
        assert!(
            note.contains("--profile llamacpp-cpu --twin") && note.starts_with("B imitates"),
            "{note}"
        );
        let reversed = crate::diff::twin_note(&profiled, &llama).unwrap();
        assert!(
            reversed.starts_with("A imitates") && reversed.contains("TWIN A"),
            "{reversed}"
        );
        // The twin itself is not the oracle to compare llama.cpp with.
        let twin = EngineInfo {
            options: Some(serde_json::json!({"twin": "projections and attention in f64"})),
            ..profiled.clone()
        };
        let note = crate::diff::twin_note(&llama, &twin).unwrap();
        assert!(note.starts_with("B is the profile's twin"), "{note}");
        let exact = engine("resbisect-reference", "cpu", None);
        assert_eq!(crate::diff::twin_note(&llama, &exact), None);
        let runtime = engine("resbisect-runtime", "cpu", None);
        assert_eq!(crate::diff::twin_note(&runtime, &profiled), None);
    }

    #[test]
    fn coarse_layers_double_up_to_the_last() {
        assert_eq!(coarse_layers(1), vec![0]);
        assert_eq!(coarse_layers(2), vec![0, 1]);
        assert_eq!(coarse_layers(22), vec![0, 1, 2, 4, 8, 16, 21]);
        assert_eq!(coarse_layers(30), vec![0, 1, 2, 4, 8, 16, 29]);
        assert_eq!(coarse_layers(17), vec![0, 1, 2, 4, 8, 16]);
    }
}
