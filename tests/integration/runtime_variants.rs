//! The runtime on every architecture variant (synthetic presets of Llama 3.x, YaRN and
//! linear RoPE scaling, qwen2, qwen3 and Gemma 3), stamped per backend like backends.rs:
//! it agrees with the reference at 1100 positions — past Gemma's sliding window of 128
//! on its windowed layers — and its windowed decode (the KV cache path, one token at a
//! time) equals its windowed prefill.

use std::path::{Path, PathBuf};

use resbisect::dump::Dump;
use resbisect::synth;
use serde_json::Value;

use crate::util::*;

per_backend!(each_architecture_matches_the_reference, windowed_decode_equals_prefill);

/// Every variant preset; gemma3-tiny has 6 layers, five windowed (window 128).
const PRESETS: [&str; 6] = [
    "llama3-tiny",
    "yarn-tiny",
    "linear-tiny",
    "qwen2-tiny",
    "qwen3-tiny",
    "gemma3-tiny",
];

/// Positions each comparison runs: past 1000, and far past the window of 128.
const POSITIONS: usize = 1100;

fn preset_model(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    let preset = synth::preset(name).unwrap();
    synth::write_model(&preset, synth::parse_quant("q8_0").unwrap(), 17, &path).unwrap();
    path
}

/// `n` token ids below 1000 (every preset's vocabulary holds them).
fn tokens(n: usize) -> String {
    (0..n)
        .map(|i| (1 + i * 7 % 997).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn dump(model: &Path, out: &Path, extra: &[&str]) {
    let t = tokens(POSITIONS);
    let args = [
        "dump",
        "--model",
        path_str(model),
        "--tokens",
        &t,
        "--layers",
        "all",
        "--taps",
        "all",
        "-o",
        path_str(out),
    ];
    let out = resbisect(&[&args[..], extra].concat());
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// (exit code, first divergence) of `diff a b`.
fn diff_first(a: &Path, b: &Path) -> (i32, Value) {
    let out = resbisect(&["diff", path_str(a), path_str(b), "--json"]);
    assert!(out.code <= 1, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    (out.code, v["prompts"][0]["first"].clone())
}

/// Every tap of every layer at every one of 1100 positions within `diff`'s default f32
/// tolerances (rel L2 4e-5 over the noise floor `diff` measures at the residual stream).
/// Measured on the cpu backend (2026-11-29, q8_0 presets, seed 17), the largest rel L2
/// of any row: llama3-tiny 1.7e-5 (blk.1.ffn_act), yarn-tiny 2.9e-5 (blk.1.ffn_out),
/// linear-tiny 4.8e-6 (blk.1.k), qwen2-tiny 1.2e-5 (blk.0.q), qwen3-tiny 1.4e-5
/// (blk.1.ffn_out), gemma3-tiny 2.1e-5 (blk.1.ffn_post_norm): f32 summation order and
/// RoPE angles formed in f32 (the reference forms them in f64).
fn each_architecture_matches_the_reference(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    for name in PRESETS {
        let model = preset_model(dir.path(), name);
        let reference = dir.path().join(format!("{name}-ref"));
        dump(&model, &reference, &[]);
        let run = dir.path().join(format!("{name}-{backend}"));
        dump(&model, &run, &["--engine", "runtime", "--backend", backend]);
        let (code, first) = diff_first(&run, &reference);
        assert_eq!(code, 0, "{backend} {name} diverges from the reference: {first}");
    }
}

/// Gemma's windowed layers one token at a time from the KV cache (the decode path, at
/// positions on both sides of the window) against one prefill: the same greedy tokens
/// and no divergence.
fn windowed_decode_equals_prefill(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = preset_model(dir.path(), "gemma3-tiny");
    let t = tokens(300);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let args = [
            "dump",
            "--engine",
            "runtime",
            "--backend",
            backend,
            "--model",
            path_str(&model),
            "--tokens",
            &t,
            "--layers",
            "all",
            "--taps",
            "q,k,attn,resid_post,logits",
            "--positions",
            "0..8,120..136,250..",
            "--max-tokens",
            "3",
            "-o",
            path_str(&out),
        ];
        let o = resbisect(&[&args[..], extra].concat());
        assert_eq!(o.code, 0, "{}", o.stderr);
        out
    };
    let (whole, stepwise) = (run("whole", &[]), run("stepwise", &["--prefill-chunk", "1"]));
    let (a, b) = (Dump::open(&whole).unwrap(), Dump::open(&stepwise).unwrap());
    assert_eq!(
        a.manifest.prompts[0].tokens, b.manifest.prompts[0].tokens,
        "{backend}: same greedy continuation"
    );
    let (code, first) = diff_first(&stepwise, &whole);
    assert_eq!(code, 0, "{backend}: {first}");
}
