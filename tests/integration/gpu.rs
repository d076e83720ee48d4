//! The GPU backends from the CLI, and op timings on any backend. Where a GPU exists, the
//! op self-test must pass and the runtime must match the reference; without one,
//! `--backend cuda|hip` is one clear line (exit 2) and the GPU checks skip, saying so.

use crate::util::*;

/// Some(output) when the backend ran; None (after checking the refusal) without a GPU.
fn on_gpu(backend: &str, args: &[&str]) -> Option<Output> {
    let out = resbisect(args);
    if out.code == 2 && (out.stderr.contains("no usable") || out.stderr.contains("built without the hip feature")) {
        assert_refused(&out, &format!("--backend {backend}"));
        eprintln!("skipped: no {backend} device here ({})", out.stderr.trim());
        return None;
    }
    Some(out)
}

#[test]
fn gpu_selftest_passes_or_refuses_in_one_line() {
    for backend in ["cuda", "hip"] {
        for dtype in ["f32", "f16"] {
            if let Some(out) = on_gpu(backend, &["selftest", "--backend", backend, "--dtype", dtype]) {
                assert_eq!(
                    out.code, 0,
                    "{backend} {dtype} selftest failed:\n{}{}",
                    out.stdout, out.stderr
                );
            }
        }
    }
}

#[test]
fn gpu_runtime_matches_the_reference_or_refuses_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 11);
    let tokens = (1..=64)
        .map(|t| (t * 7 % 1000).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let reference = dir.path().join("ref");
    let out = resbisect(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        &tokens,
        "--layers",
        "all",
        "--taps",
        "all",
        "-o",
        path_str(&reference),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for backend in ["cuda", "hip"] {
        let a = dir.path().join(backend);
        let args = [
            "dump",
            "--engine",
            "runtime",
            "--backend",
            backend,
            "--model",
            path_str(&model),
            "--tokens",
            &tokens,
            "--layers",
            "all",
            "--taps",
            "all",
            "-o",
            path_str(&a),
        ];
        if on_gpu(backend, &args).is_some_and(|o| o.code == 0) {
            let diff = resbisect(&["diff", path_str(&a), path_str(&reference)]);
            assert_eq!(
                diff.code, 0,
                "{backend} runtime diverges from the reference:\n{}",
                diff.stdout
            );
        }
    }
}

/// `selftest --perf` times every op of a layer on any backend (the `cpu` one here; a GPU
/// one where it exists) and adds them up to a decode step; bad shapes are one line.
#[test]
fn op_timings_cover_every_op_of_a_layer() {
    for backend in ["cpu", "cuda"] {
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
        let Some(out) = on_gpu(backend, &args) else { continue };
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
