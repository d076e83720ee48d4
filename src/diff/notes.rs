//! The notes a comparison's report carries beside its first divergence: what the noise
//! floor says, an error under its tolerance, a second origin, and why a llama.cpp dump
//! departs from a reference's by design (its profile, its unimitated settings, the twin).

use super::{FirstDivergence, Judgement, PromptDiff};
use crate::dump::EngineInfo;

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
pub(crate) fn llamacpp_profile(e: &EngineInfo) -> &'static str {
    if e.backend == "cuda" {
        "llamacpp-cuda"
    } else {
        "llamacpp-cpu"
    }
}

/// Of a pair, the llama.cpp dump and the reference dump with their sides' names (A first
/// or reversed), when the pair is one.
fn llamacpp_against_reference<'d>(
    a: &'d EngineInfo,
    b: &'d EngineInfo,
) -> Option<(&'d EngineInfo, &'d EngineInfo, &'static str, &'static str)> {
    let reference = |e: &EngineInfo| e.name.starts_with("resbisect-reference");
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
pub fn profile_note(a: &EngineInfo, b: &EngineInfo) -> Option<String> {
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
pub fn unimitated_settings_note(a: &EngineInfo, b: &EngineInfo) -> Option<String> {
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
pub(crate) fn twin_note(a: &EngineInfo, b: &EngineInfo) -> Option<String> {
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
