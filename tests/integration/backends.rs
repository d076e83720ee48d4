//! One runtime test suite, stamped per backend: every test runs on `cpu` always, and on
//! `cuda` and `hip` where one is present (without one, each prints one line saying it
//! skipped, and passes). Matches the reference in every storage dtype, token-by-token
//! decode and chunked prefill equal a whole prefill, the crash path with and without
//! `--sync-check`, checkpoint-served prefixes (in runtime.rs), recorded decode equal to issued ops, the op
//! self-test and its op timings. scripts/gpu-validate.sh runs this suite and the long self-test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use resbisect::dump::{Dump, Status, TapDType};
use serde_json::Value;

use crate::runtime::{long_1652_tokens, suite_with};
use crate::util::*;

/// Each test as a module of one `#[test]` per backend (runtime.rs stamps one too).
macro_rules! per_backend {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn cpu() {
                super::$test("cpu")
            }
            #[test]
            fn cuda() {
                if crate::backends::present("cuda") {
                    super::$test("cuda")
                }
            }
            #[test]
            fn hip() {
                if crate::backends::present("hip") {
                    super::$test("hip")
                }
            }
        }
    )*};
}

per_backend!(
    matches_the_reference,
    token_by_token_decode_equals_prefill,
    chunked_prefill_matches_the_reference,
    crash_leaves_a_readable_partial_dump,
    recorded_decode_equals_issued_ops,
    selftest_passes,
    op_timings_cover_every_op_of_a_layer,
);

/// Whether `backend` runs here; where it does not, the refusal must be one clear line
/// (exit 2), and the test says it skipped.
pub(crate) fn present(backend: &str) -> bool {
    static CUDA: OnceLock<bool> = OnceLock::new();
    static HIP: OnceLock<bool> = OnceLock::new();
    let cell = if backend == "cuda" { &CUDA } else { &HIP };
    let here = *cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path(), "q8_0", 1);
        let out = resbisect(&[
            "dump",
            "--engine",
            "runtime",
            "--backend",
            backend,
            "--model",
            path_str(&model),
            "--tokens",
            "1,2",
            "-o",
            path_str(&dir.path().join("probe")),
        ]);
        let refused =
            out.code == 2 && (out.stderr.contains("no usable") || out.stderr.contains("built without the hip feature"));
        if refused {
            assert_refused(&out, &format!("--backend {backend}"));
        }
        !refused
    });
    if !here {
        eprintln!("skipped: no {backend} device here");
    }
    here
}

/// The 64 tokens the tests run.
fn tokens() -> String {
    (1..=64)
        .map(|t| (t * 7 % 1000).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn run_ok(args: &[&str]) -> Output {
    let out = resbisect(args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out
}

/// A runtime dump of `model` on `backend` into `dir/name`, all layers and taps.
fn runtime(backend: &str, model: &Path, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let args = [
        "dump",
        "--engine",
        "runtime",
        "--backend",
        backend,
        "--model",
        path_str(model),
        "--tokens",
        &tokens(),
        "--layers",
        "all",
        "--taps",
        "all",
        "-o",
        path_str(&out),
    ];
    run_ok(&[&args[..], extra].concat());
    out
}

fn reference(model: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("ref");
    let t = tokens();
    run_ok(&[
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
        path_str(&out),
    ]);
    out
}

/// (exit code, first divergence) of `diff a b`.
fn diff_first(a: &Path, b: &Path) -> (i32, Value) {
    let out = resbisect(&["diff", path_str(a), path_str(b), "--json"]);
    assert!(out.code <= 1, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    (out.code, v["prompts"][0]["first"].clone())
}

/// No divergence from the reference in f32, f16 and bf16 storage (each within its
/// default tolerances), with taps stored exactly as the backend stores values.
fn matches_the_reference(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 11);
    let reference = reference(&model, dir.path());
    for (dtype, stored) in [("f32", TapDType::F32), ("f16", TapDType::F16), ("bf16", TapDType::BF16)] {
        let run = runtime(backend, &model, dir.path(), dtype, &["--dtype", dtype]);
        let (code, first) = diff_first(&run, &reference);
        assert_eq!(code, 0, "{backend} {dtype} diverges from the reference: {first}");
        let file = Dump::open(&run).unwrap().read_file("prompt", "blk.1").unwrap().unwrap();
        assert_eq!(file.taps["blk.1.resid_post"].dtype, stored, "{backend} {dtype}");
    }
}

/// The whole 1652-token prompt one token at a time (KV cache append, the decode path at
/// every position) against a single prefill: the same greedy tokens, no divergence.
fn token_by_token_decode_equals_prefill(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let prompt = suite_with(dir.path(), "prompt.jsonl", "long_1652", &long_1652_tokens());
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
            "--prompts",
            path_str(&prompt),
            "-o",
            path_str(&out),
            "--layers",
            "0,7,15,29",
            "--taps",
            "resid_post,attn,logits",
            "--positions",
            "0..16,820..840,-8..",
            "--max-tokens",
            "3",
        ];
        run_ok(&[&args[..], extra].concat());
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

fn chunked_prefill_matches_the_reference(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 13);
    let reference = reference(&model, dir.path());
    let run = runtime(backend, &model, dir.path(), "chunked", &["--prefill-chunk", "7"]);
    let (code, first) = diff_first(&run, &reference);
    assert_eq!(code, 0, "{backend} chunked prefill diverges: {first}");
}

/// An out-of-bounds write fails the run (exit 3) with a readable partial dump that diffs
/// as correct-but-failed. With `--sync-check` (and always on the cpu) the failure names
/// the op and the last tap written; without it a GPU reports it at a later call.
fn crash_leaves_a_readable_partial_dump(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 31);
    let m = path_str(&model);
    let t = "5,6,7,8,9,10";
    let reference = dir.path().join("ref");
    run_ok(&[
        "dump",
        "--model",
        m,
        "--tokens",
        t,
        "--taps",
        "all",
        "-o",
        path_str(&reference),
    ]);
    for sync_check in [true, false] {
        let partial = dir.path().join(format!("partial-{sync_check}"));
        let mut args = vec![
            "dump",
            "--engine",
            "runtime",
            "--backend",
            backend,
            "--model",
            m,
            "--tokens",
            t,
        ];
        args.extend([
            "--taps",
            "all",
            "--inject",
            "blk.1.attn_out:oob@2",
            "-o",
            path_str(&partial),
        ]);
        if sync_check {
            args.push("--sync-check");
        }
        let out = resbisect(&args);
        assert_eq!(out.code, 3, "{backend}: {}", out.stderr);
        let d = Dump::open(&partial).unwrap();
        assert_eq!(d.manifest.status, Status::Failed);
        if sync_check || backend == "cpu" {
            let failed = format!("{backend} blk.1.attn_out (injected out-of-bounds write at position 2) failed");
            assert!(out.stderr.contains(&failed), "{}", out.stderr);
            assert!(
                out.stderr.contains("last tap written: blk.0.resid_post"),
                "{}",
                out.stderr
            );
            let err = d.manifest.error.as_ref().unwrap();
            assert_eq!(err.tap.as_deref(), Some("blk.0.resid_post"));
            assert_eq!(d.files("prompt").unwrap(), vec!["blk.0", "embed"]);
        }
        let diff = resbisect(&["diff", path_str(&partial), path_str(&reference)]);
        // What was written is correct, yet a failed engine never passes: exit 3.
        assert_eq!(diff.code, 3, "{}", diff.stdout);
        assert!(diff.stdout.contains("no divergence over"), "{}", diff.stdout);
        assert!(
            diff.stdout.contains("dump A is partial: its engine failed"),
            "{}",
            diff.stdout
        );
    }
}

/// Decode recorded once and replayed (where the backend records: CUDA graphs) against
/// the same ops issued one by one (`--sync-check` turns recording off): equal to the bit.
fn recorded_decode_equals_issued_ops(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 14);
    let generate = ["--max-tokens", "12"];
    let recorded = runtime(backend, &model, dir.path(), "recorded", &generate);
    let issued = runtime(
        backend,
        &model,
        dir.path(),
        "issued",
        &[&generate[..], &["--sync-check"]].concat(),
    );
    let (a, b) = (Dump::open(&recorded).unwrap(), Dump::open(&issued).unwrap());
    assert_eq!(a.manifest.prompts[0].tokens, b.manifest.prompts[0].tokens, "{backend}");
    for stem in b.files("prompt").unwrap() {
        let (fa, fb) = (
            a.read_file("prompt", &stem).unwrap().unwrap(),
            b.read_file("prompt", &stem).unwrap().unwrap(),
        );
        assert_eq!(fa.positions, fb.positions, "{stem}");
        for (id, t) in &fb.taps {
            assert_eq!(fa.taps[id].values, t.values, "{backend}: {id} recorded vs issued");
        }
    }
}

/// Every op against the cpu backend at the same storage dtype.
fn selftest_passes(backend: &str) {
    for dtype in ["f32", "f16"] {
        let out = resbisect(&["selftest", "--backend", backend, "--dtype", dtype]);
        assert_eq!(out.code, 0, "{backend} {dtype} selftest:\n{}{}", out.stdout, out.stderr);
    }
}

/// `selftest --perf` times every op of a layer and adds them up to a decode step; bad
/// shapes are one line.
fn op_timings_cover_every_op_of_a_layer(backend: &str) {
    let args = [
        "selftest",
        "--perf",
        "--backend",
        backend,
        "--preset",
        "tiny",
        "--ctx",
        "24",
        "--json",
    ];
    let out = resbisect(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let timings: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let ops: Vec<(String, String)> = timings
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["phase"].as_str().unwrap().to_string(),
                t["op"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for phase in ["decode", "prefill"] {
        for op in [
            "rms_norm",
            "matmul3 (q, k, v)",
            "rope_append",
            "attention",
            "matmul (attn_output)",
            "add_rms_norm",
            "gate_up_silu",
            "matmul (ffn_down)",
            "add",
        ] {
            assert!(
                ops.contains(&(phase.to_string(), op.to_string())),
                "{backend}: {phase} {op} not timed"
            );
        }
    }
    assert!(timings
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["micros"].as_f64().unwrap() > 0.0 && t["bytes"].as_u64().unwrap() > 0));
    if backend != "cpu" {
        return;
    }
    let table = resbisect(&["selftest", "--perf", "--preset", "tiny", "--ctx", "8"]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(
        table.stdout.contains("step of 2 layers and the head"),
        "{}",
        table.stdout
    );
    assert_refused(
        &resbisect(&["selftest", "--perf", "--preset", "tiny", "--ctx", "0"]),
        "--ctx must be",
    );
    assert_refused(
        &resbisect(&["selftest", "--perf", "--preset", "huge"]),
        "unknown preset",
    );
}
