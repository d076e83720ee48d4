//! What is compared with what: the two dumps must come from the same model, and each
//! prompt of A is paired with one of B.

use std::collections::HashSet;

use crate::dump::{Manifest, Status};
use crate::error::{Error, Result};
use crate::model::Config;

/// The fields two model configs disagree on, as `model.FIELD: A x vs B y`.
pub fn config_differences(a: &Config, b: &Config) -> Vec<String> {
    let (va, vb) = (
        serde_json::to_value(canonical(a)).unwrap_or_default(),
        serde_json::to_value(canonical(b)).unwrap_or_default(),
    );
    let show = |v: &serde_json::Value| match v {
        // 1e-5 and 100000 rather than 0.000009999999747378752 and 100000.0.
        serde_json::Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or_default() as f32),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let shown = |v: Option<&serde_json::Value>| v.map_or_else(|| "(absent)".to_string(), show);
    let mut out = Vec::new();
    if let (Some(oa), Some(ob)) = (va.as_object(), vb.as_object()) {
        // Optional fields may be in one config only: each side's keys, A's order first.
        let keys = oa.keys().chain(ob.keys().filter(|k| !oa.contains_key(*k)));
        for key in keys {
            let (x, y) = (oa.get(key), ob.get(key));
            if x != y {
                out.push(format!("model.{key}: A {} vs B {}", shown(x), shown(y)));
            }
        }
    }
    out
}

/// `c` as resbisect writes it: a `key_length` equal to n_embd / n_head is the default,
/// which manifests leave out (an engine that writes it describes the same model).
fn canonical(c: &Config) -> Config {
    let mut c = c.clone();
    if c.variant.key_length == Some(c.n_embd / c.n_head.max(1)) {
        c.variant.key_length = None;
    }
    c
}

/// Refuse dumps of different models (by fingerprint unless `allow_model_mismatch`, and
/// by config always); note what the check rests on.
pub(super) fn check_same_model(
    ma: &Manifest,
    mb: &Manifest,
    allow_model_mismatch: bool,
    notes: &mut Vec<String>,
) -> Result<()> {
    match (&ma.model.fingerprint, &mb.model.fingerprint) {
        (Some(fa), Some(fb)) if fa != fb => {
            if !allow_model_mismatch {
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
    Ok(())
}

/// A note for each dump whose engine failed or never finished.
pub(super) fn partial_dump_notes(ma: &Manifest, mb: &Manifest, notes: &mut Vec<String>) {
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
}

/// Which prompt of A is compared with which of B: the `pairs` given (`A_ID`, `B_ID`),
/// else the ids both dumps hold, else — one prompt on each side whose tokens agree —
/// those two, with a note.
pub(super) fn prompt_pairs(
    ma: &Manifest,
    mb: &Manifest,
    pairs: &[(String, String)],
    notes: &mut Vec<String>,
) -> Result<Vec<(String, String)>> {
    let ids = |m: &Manifest| m.prompts.iter().map(|p| p.id.clone()).collect::<Vec<_>>().join(", ");
    if !pairs.is_empty() {
        // The report keys a comparison by A's prompt: one A prompt, one comparison.
        for (k, (ia, ib)) in pairs.iter().enumerate() {
            if let Some((_, earlier)) = pairs[..k].iter().find(|(a, _)| a == ia) {
                return Err(Error::input(format!(
                    "--pair {ia}={ib}: prompt {ia:?} of A is already paired (--pair {ia}={earlier})"
                )));
            }
        }
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
    fn ids_of(m: &Manifest) -> HashSet<&str> {
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
            let agree = if pa.tokens.len() == pb.tokens.len() {
                "whose tokens agree"
            } else {
                "whose tokens agree as far as both go"
            };
            notes.push(format!(
                "prompt ids differ (A {}, B {}); compared as the one prompt of each dump, {agree}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> Config {
        serde_json::from_value(serde_json::json!({
            "arch": "llama", "n_layer": 30, "n_embd": 576, "n_head": 9, "n_head_kv": 3, "n_ff": 1536,
            "n_vocab": 49152, "n_ctx": 8192, "rope_base": 100000.0, "rms_eps": 1e-5
        }))
        .unwrap()
    }

    #[test]
    fn a_field_in_one_config_only_is_a_difference_or_its_default() {
        let (a, mut b) = (smollm2(), smollm2());
        b.variant.key_length = Some(64);
        assert!(config_differences(&a, &b).is_empty(), "64 is SmolLM2's head dim");
        b.variant.key_length = Some(128);
        assert_eq!(config_differences(&a, &b), ["model.key_length: A (absent) vs B 128"]);
        assert_eq!(config_differences(&b, &a), ["model.key_length: A 128 vs B (absent)"]);
    }
}
