//! Dumps from writers that are not resbisect: tests/python/loose_writer.py (numpy and
//! safetensors only, written from docs/dump-format.md) writes the runtime's numbers with
//! other writers' spellings — null fingerprint, its own prompt id, `taps: "all"`,
//! `positions: ["all"]` — and `diff` against the reference must pair, compare and name
//! an injected divergence exactly; config and prompt-id mismatches are explained.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::*;

const TOKENS: &str = "5,17,99,300,41,7,250,12";

/// A reference dump and a runtime dump (the "engine" the writer reports) of one prompt.
fn dumps(dir: &Path) -> (PathBuf, PathBuf) {
    let model = tiny_model(dir, "f32", 11);
    let (reference, runtime) = (dir.join("reference"), dir.join("runtime"));
    for (engine, out) in [("reference", &reference), ("runtime", &runtime)] {
        let o = resbisect(&[
            "dump",
            "--engine",
            engine,
            "--model",
            path_str(&model),
            "--tokens",
            TOKENS,
            "--layers",
            "all",
            "--taps",
            "all",
            "--positions",
            "all",
            "-o",
            path_str(out),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    (reference, runtime)
}

fn loose_writer(source: &Path, out: &Path, extra: &[&str]) {
    let script = root().join("tests/python/loose_writer.py");
    let status = Command::new(venv_python())
        .arg(script)
        .args(["--source", path_str(source), "--out", path_str(out)])
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success(), "loose_writer.py failed");
}

fn diff_json(a: &Path, b: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["diff", path_str(a), path_str(b), "--json"];
    args.extend_from_slice(extra);
    let out = resbisect(&args);
    assert!(matches!(out.code, 0 | 1), "exit {}: {}", out.code, out.stderr);
    (out.code, serde_json::from_str(&out.stdout).unwrap())
}

fn notes(r: &Value) -> String {
    r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_third_party_python_writer_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, runtime) = dumps(dir.path());

    // Same numbers as the runtime: within tolerance of the reference, ids paired.
    let clean = dir.path().join("clean");
    loose_writer(&runtime, &clean, &[]);
    let (code, r) = diff_json(&clean, &reference, &[]);
    assert_eq!(code, 0, "{r}");
    let n = notes(&r);
    assert!(n.contains("prompt ids differ (A p0, B prompt)"), "{n}");
    assert!(n.contains("dump A has no model.fingerprint"), "{n}");
    assert_eq!(
        r["prompts"][0]["taps"].as_array().unwrap().len(),
        // Every layer tap of this llama model (no Gemma post norms) in 2 layers, plus embed,
        // final_norm and logits.
        2 * resbisect::taps::LAYER_TAPS
            .iter()
            .filter(|t| !t.ends_with("_post_norm"))
            .count()
            + 3,
        "every tap compared"
    );

    // A bug from position 3 of layer 1's output is named exactly.
    let buggy = dir.path().join("buggy");
    loose_writer(&runtime, &buggy, &["--scale", "blk.1.resid_post@3=1.5"]);
    let (code, r) = diff_json(&buggy, &reference, &[]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(
        r["prompts"][0]["first"]["tap"], "blk.1.resid_post",
        "{}",
        r["prompts"][0]["first"]
    );
    assert_eq!(r["prompts"][0]["first"]["position"], 3);
}

#[test]
fn config_and_prompt_id_mismatches_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, runtime) = dumps(dir.path());

    let misread = dir.path().join("misread");
    loose_writer(&runtime, &misread, &["--rope-base", "0"]);
    let out = resbisect(&["diff", path_str(&misread), path_str(&reference)]);
    assert_refused(
        &out,
        "the dumps disagree on the model config: model.rope_base: A 0 vs B 10000",
    );
    assert!(!out.stderr.contains("Config {"), "{}", out.stderr);

    // Two prompts on one side: no guessing; both sides' ids and the --pair option named.
    let two = dir.path().join("two");
    loose_writer(&runtime, &two, &["--prompt-id", "q1"]);
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(two.join("manifest.json")).unwrap()).unwrap();
    let mut second = m["prompts"][0].clone();
    second["id"] = "q2".into();
    m["prompts"].as_array_mut().unwrap().push(second);
    std::fs::write(two.join("manifest.json"), m.to_string()).unwrap();
    let out = resbisect(&["diff", path_str(&two), path_str(&reference)]);
    assert_refused(
        &out,
        "the dumps share no prompt id (A has: q1, q2; B has: prompt); name the pairs with --pair A_ID=B_ID",
    );
    let (code, r) = diff_json(&two, &reference, &["--pair", "q1=prompt"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["prompts"].as_array().unwrap().len(), 1);
    assert_refused(
        &resbisect(&["diff", path_str(&two), path_str(&reference), "--pair", "q3=prompt"]),
        "--pair q3=prompt: dump A has no prompt \"q3\" (it has: q1, q2)",
    );
    assert_refused(
        &resbisect(&["diff", path_str(&two), path_str(&reference), "--pair", "q1"]),
        "--pair \"q1\": expected A_ID=B_ID",
    );
}
