//! The runtime on the `cpu` backend against the reference on the real SmolLM2 model: no
//! divergence in f32 under default and calibrated tolerances, f16/bf16 within theirs, the
//! same with chunked prefill; preflight refusals; checkpoint-served prefixes on every
//! backend. The other tests every backend must pass are in backends.rs.

use std::path::{Path, PathBuf};

use resbisect::dump::{Dump, TapDType};
use serde_json::Value;

use resbisect::runtime::backend::Backend;

use crate::util::*;

pub(crate) fn suite_with(dir: &Path, file: &str, id: &str, tokens: &[u64]) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, format!("{}\n", serde_json::json!({"id": id, "tokens": tokens}))).unwrap();
    p
}

pub(crate) fn long_1652_tokens() -> Vec<u64> {
    let text = std::fs::read_to_string(root().join("fixtures/prompts/long.jsonl")).unwrap();
    let line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["id"] == "long_1652")
        .unwrap();
    line["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn run_ok(args: &[&str]) -> Output {
    let out = resbisect(args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out
}

/// (exit code, first divergence) of `diff a b`.
fn diff_first(a: &Path, b: &Path) -> (i32, Value) {
    let out = resbisect(&["diff", path_str(a), path_str(b), "--json"]);
    assert!(out.code <= 1, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    (out.code, v["prompts"][0]["first"].clone())
}

#[test]
fn cpu_runtime_matches_the_reference_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let m = path_str(&model);
    let prompt = suite_with(dir.path(), "prompt.jsonl", "long_1652", &long_1652_tokens());
    let sel = [
        "--layers",
        "0,1,2,4,8,16,24,29",
        "--taps",
        "all",
        "--positions",
        "0..32,800..880,-8..",
    ];
    let runtime = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "dump",
            "--engine",
            "runtime",
            "--model",
            m,
            "--prompts",
            path_str(&prompt),
            "--max-tokens",
            "5",
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(&sel);
        args.extend_from_slice(extra);
        run_ok(&args);
        out
    };
    let f32_run = runtime("rt-f32", &[]);
    // The reference replays exactly the tokens the runtime processed (prompt + 5 generated).
    let processed: Vec<u64> = Dump::open(&f32_run).unwrap().manifest.prompts[0]
        .tokens
        .iter()
        .map(|&t| t as u64)
        .collect();
    assert_eq!(processed.len(), 1657);
    let replay = suite_with(dir.path(), "replay.jsonl", "long_1652", &processed);
    let reference = dir.path().join("ref");
    run_ok(
        &[
            &[
                "dump",
                "--model",
                m,
                "--prompts",
                path_str(&replay),
                "-o",
                path_str(&reference),
            ][..],
            &sel,
        ]
        .concat(),
    );
    // f32 under tolerances calibrated on another healthy prompt (long_826: runtime vs
    // reference, ×4), then under the default F32 tolerance (1e-3; measured gap ~3e-5).
    let healthy = root().join("fixtures/prompts/long.jsonl");
    let text = std::fs::read_to_string(&healthy).unwrap();
    let line = text.lines().find(|l| l.contains("\"long_826\"")).unwrap();
    let cal_prompt = dir.path().join("cal.jsonl");
    std::fs::write(&cal_prompt, format!("{line}\n")).unwrap();
    let (cal_rt, cal_ref) = (dir.path().join("cal-rt"), dir.path().join("cal-ref"));
    let cal_sel = ["--layers", "0,1,2,4,8,16,24,29", "--taps", "all", "--positions", "all"];
    run_ok(
        &[
            &[
                "dump",
                "--engine",
                "runtime",
                "--model",
                m,
                "--prompts",
                path_str(&cal_prompt),
                "-o",
                path_str(&cal_rt),
            ][..],
            &cal_sel,
        ]
        .concat(),
    );
    run_ok(
        &[
            &[
                "dump",
                "--model",
                m,
                "--prompts",
                path_str(&cal_prompt),
                "-o",
                path_str(&cal_ref),
            ][..],
            &cal_sel,
        ]
        .concat(),
    );
    let tol = dir.path().join("tol.json");
    run_ok(&[
        "calibrate",
        path_str(&cal_rt),
        path_str(&cal_ref),
        // The default margin (8 × each tap's p99 on long_826): rows here run to position
        // 1652, where blk.16.q_pre_rope measured 4.05× its p99.
        "-o",
        path_str(&tol),
    ]);
    let calibrated = resbisect(&[
        "diff",
        path_str(&f32_run),
        path_str(&reference),
        "--tolerances",
        path_str(&tol),
    ]);
    assert_eq!(
        calibrated.code, 0,
        "f32 runtime diverges under calibrated tolerances: {}",
        calibrated.stdout
    );
    let (code, first) = diff_first(&f32_run, &reference);
    assert_eq!(code, 0, "f32 runtime diverges: {first}");
    for (name, extra) in [
        ("rt-chunked", &["--prefill-chunk", "256"][..]),
        ("rt-f16", &["--dtype", "f16"][..]),
        ("rt-bf16", &["--dtype", "bf16"][..]),
    ] {
        let run = runtime(name, extra);
        let (code, first) = diff_first(&run, &reference);
        assert_eq!(code, 0, "{name} diverges beyond its tolerance: {first}");
        // Taps are stored as the runtime stores values: f16 and bf16 exactly, at 2 bytes.
        let stored = Dump::open(&run)
            .unwrap()
            .read_file("long_1652", "blk.8")
            .unwrap()
            .unwrap()
            .taps["blk.8.resid_post"]
            .dtype;
        let want = match name {
            "rt-f16" => TapDType::F16,
            "rt-bf16" => TapDType::BF16,
            _ => TapDType::F32,
        };
        assert_eq!(stored, want, "{name}");
    }
}

#[test]
fn preflight_refuses_before_any_op() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 32);
    let out_dir = dir.path().join("never");
    // A prompt 4 positions short of the preset's context, plus 10 generated, overflows it.
    let n_ctx = resbisect::synth::preset("tiny").unwrap().config.n_ctx;
    let prompt_len = n_ctx - 4;
    let tokens: Vec<String> = (0..prompt_len).map(|i| (i % 900 + 3).to_string()).collect();
    let out = resbisect(&[
        "dump",
        "--engine",
        "runtime",
        "--model",
        path_str(&model),
        "--tokens",
        &tokens.join(","),
        "--max-tokens",
        "10",
        "-o",
        path_str(&out_dir),
    ]);
    assert_refused(
        &out,
        &format!(
            "preflight: {prompt_len} prompt tokens + 10 generated = {} positions exceed the model's context of {n_ctx}",
            prompt_len + 10
        ),
    );
    assert!(!out_dir.exists());
    let out = resbisect(&[
        "dump",
        "--engine",
        "runtime",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2",
        "--prefill-chunk",
        "0",
        "-o",
        path_str(&out_dir),
    ]);
    assert_refused(&out, "invalid value '0' for '--prefill-chunk");
    let out = resbisect(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2",
        "--inject",
        "blk.0.q:oob@0",
        "-o",
        path_str(&out_dir),
    ]);
    assert_refused(&out, "is for the runtime");

    // The original failure class: a scheduler's idea of the model that the weights do not
    // back. Each is named before any op runs and nothing is written.
    use candle_core::quantized::gguf_file::Value;
    let bad = dir.path().join("bad.gguf");
    let all = |n: &str| Some(n.to_string());
    type EditMeta = Box<dyn Fn(&mut Vec<(String, Value)>)>;
    type Rename = Box<dyn Fn(&str) -> Option<String>>;
    let cases: Vec<(EditMeta, Rename, &str)> = vec![
        (
            Box::new(|m| set_meta(m, "llama.block_count", Value::U32(32))),
            Box::new(all),
            "missing tensor blk.2.attn_norm.weight (block_count says 32 layers)",
        ),
        (
            Box::new(|_| {}),
            Box::new(|n: &str| (!n.starts_with("blk.1.")).then(|| n.to_string())),
            "missing tensor blk.1.attn_norm.weight",
        ),
        (
            Box::new(|m| set_meta(m, "llama.attention.head_count_kv", Value::U32(3))),
            Box::new(all),
            "head_count 4 is not a multiple of head_count_kv 3",
        ),
        (
            Box::new(|m| set_meta(m, "llama.feed_forward_length", Value::U32(500))),
            Box::new(all),
            "tensor blk.0.ffn_gate.weight has shape [256, 512], expected [256, 500]",
        ),
        (
            Box::new(|m| set_meta(m, "llama.context_length", Value::U32(4))),
            Box::new(all),
            "exceed the model's context of 4",
        ),
    ];
    for (edit, keep, needle) in cases {
        rewrite_gguf(&model, &bad, edit, keep);
        let out = resbisect(&[
            "dump",
            "--engine",
            "runtime",
            "--model",
            path_str(&bad),
            "--tokens",
            "1,2,3,4,5,6",
            "-o",
            path_str(&out_dir),
        ]);
        assert_refused(&out, needle);
        assert!(!out_dir.exists(), "{needle}: nothing is written");
    }
}

// In-process (the library API, with SmolLM2's weights in this test process): stamped
// here, not in backends.rs, so that it runs after hostile.rs's tests, whose children
// would otherwise inherit this process's resident memory in their measured peak.
per_backend!(checkpoint_served_prefixes_equal_computed_ones);

/// Bisect's probes read resid_post and branch-output rows of a prefix from what the
/// coarse run kept, and recompute a layer with other inner taps (or the output head) from
/// its input rows there: they must be the rows a run of that prefix computes, to the last
/// bit — the injected fault included.
fn checkpoint_served_prefixes_equal_computed_ones(backend: &str) {
    use resbisect::runtime::backend::StorageDType;
    match backend {
        "cpu" => served_prefixes_equal_computed(|| resbisect::runtime::cpu::CpuBackend::new(StorageDType::F32)),
        "cuda" => served_prefixes_equal_computed(|| resbisect::runtime::cuda::CudaBackend::<f32>::new(0).unwrap()),
        #[cfg(feature = "hip")]
        "hip" => served_prefixes_equal_computed(|| resbisect::runtime::hip::HipBackend::<f32>::new().unwrap()),
        _ => unreachable!("{backend} is present only with the hip feature"),
    }
}

fn served_prefixes_equal_computed<B: Backend>(backend: impl Fn() -> B) {
    use resbisect::dump::PromptRecord;
    use resbisect::engine::{Engine, RuntimeEngine};
    use resbisect::taps::Selection;
    let dir = tempfile::tempdir().unwrap();
    let path = smollm2();
    let model = resbisect::model::Model::open(&path).unwrap();
    let tokens: Vec<u32> = long_1652_tokens()[..300].iter().map(|&t| t as u32).collect();
    let full = PromptRecord {
        id: "p".into(),
        text: None,
        tokens: tokens.clone(),
    };
    let prefix = PromptRecord {
        tokens: tokens[..201].to_vec(),
        ..full.clone()
    };
    let sel = |layers: &str, taps: &str, positions: &str| {
        Selection::parse(layers, taps, positions, model.config.n_layer).unwrap()
    };
    let faults = || vec!["blk.7.ffn_up:scale=1.5@150".to_string()];
    let driver = || RuntimeEngine::new(backend(), &model, faults(), Default::default()).unwrap();
    let mut kept = driver();
    let coarse = sel("0,8", "resid_post,final_norm", "all");
    kept.dump(&full, &coarse, &dir.path().join("coarse")).unwrap();
    for (name, probe) in [
        ("stream", sel("6,7,29", "embed,resid_post", "0..40,150,160..201")),
        ("layers", sel("6,7", "all", "0..40,150,160..201")),
        (
            "branches",
            sel("0..7", "attn_out,ffn_out,resid_post", "0..40,150,160..201"),
        ),
        ("head", sel("7", "resid_post,ffn_up,final_norm,logits", "150,200")),
    ] {
        let (served, computed) = (
            dir.path().join(format!("served-{name}")),
            dir.path().join(format!("computed-{name}")),
        );
        kept.dump(&prefix, &probe, &served).unwrap();
        driver().dump(&prefix, &probe, &computed).unwrap();
        let (served, computed) = (Dump::open(&served).unwrap(), Dump::open(&computed).unwrap());
        let stems = computed.files("p").unwrap();
        assert_eq!(served.files("p").unwrap(), stems, "{name}");
        for stem in &stems {
            let a = served.read_file("p", stem).unwrap().unwrap();
            let b = computed.read_file("p", stem).unwrap().unwrap();
            assert_eq!(a.positions, b.positions, "{name} {stem}");
            for (id, t) in &b.taps {
                assert_eq!(a.taps[id].values, t.values, "{name} {id}");
            }
        }
    }
}

/// `q_pre_rope`/`k_pre_rope` (q and k as they enter RoPE) through the whole stack: the
/// runtime's rows agree with the reference's over chunked prefill and decode; a RoPE fault
/// shows at `q` and `k` but not before RoPE; a fault injected before RoPE shows there.
#[test]
fn q_and_k_before_rope_agree_with_the_reference_and_isolate_a_rope_fault() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let m = path_str(&model);
    let sel = ["--layers", "0,1,2", "--taps", "q_pre_rope,k_pre_rope,q,k,v"];
    let dump = |name: &str, args: &[&str]| {
        let out = dir.path().join(name);
        run_ok(&[&["dump", "--model", m, "-o", path_str(&out)][..], &sel, args].concat());
        out
    };
    let prompt = "The quick brown fox jumps over the lazy dog because it was in a hurry";
    let runtime = dump(
        "rt",
        &[
            "--engine",
            "runtime",
            "--prompt",
            prompt,
            "--prefill-chunk",
            "5",
            "--max-tokens",
            "3",
        ],
    );
    let tokens: Vec<String> = Dump::open(&runtime).unwrap().manifest.prompts[0]
        .tokens
        .iter()
        .map(u32::to_string)
        .collect();
    let tokens = tokens.join(",");
    let reference = dump("ref", &["--tokens", &tokens]);
    let (code, first) = diff_first(&runtime, &reference);
    assert_eq!(
        code, 0,
        "the runtime's taps before RoPE disagree with the reference's: {first}"
    );
    let file = Dump::open(&runtime)
        .unwrap()
        .read_file("prompt", "blk.1")
        .unwrap()
        .unwrap();
    assert!(file.taps.contains_key("blk.1.q_pre_rope") && file.taps.contains_key("blk.1.k_pre_rope"));

    // Rows (per tap) that diverge from the reference, for a runtime with `inject`.
    let diverged = |name: &str, inject: &str| {
        let faulty = dump(name, &["--engine", "runtime", "--tokens", &tokens, "--inject", inject]);
        let out = resbisect(&["diff", path_str(&faulty), path_str(&reference), "--json"]);
        assert_eq!(out.code, 1, "{inject} went unseen: {}", out.stdout);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        let at = &v["prompts"][0]["first"];
        let first = format!("{}@{}", at["tap"].as_str().unwrap(), at["position"]);
        let rows = move |tap: &str| {
            let taps = v["prompts"][0]["taps"].as_array().unwrap();
            let t = taps.iter().find(|t| t["tap"] == tap).unwrap();
            t["diverged_rows"].as_u64().unwrap()
        };
        (first, rows)
    };
    let (first, rows) = diverged("rt-rope", "blk.1.rope:shift=3@4");
    assert_eq!(first, "blk.1.q@4");
    assert_eq!((rows("blk.1.q_pre_rope"), rows("blk.1.k_pre_rope")), (0, 0));
    assert!(rows("blk.1.q") > 0 && rows("blk.1.k") > 0);
    let (first, rows) = diverged("rt-k", "blk.1.k_pre_rope:scale=1.5@2");
    assert_eq!(first, "blk.1.k_pre_rope@2");
    assert_eq!(rows("blk.1.q_pre_rope"), 0);
    assert!(rows("blk.1.k") > 0);
}
