//! Numerics profiles: a fault injected into a reference that follows `llamacpp-cpu` is
//! still found exactly against the same profile (by diff, and by bisect under the
//! twin's tolerances), the reports and the manifest name the profile, and the profile is
//! not the exact reference (its rounding is visible).

use serde_json::Value;

use crate::util::*;

/// Every tap at layers 0..=2 of a tiny Q4_1 model (q8_1 activations with their block-sum
/// correction), 40 tokens, under `profile`, with `inject` when given.
fn dump(
    dir: &std::path::Path,
    model: &std::path::Path,
    name: &str,
    profile: &str,
    inject: &[&str],
) -> std::path::PathBuf {
    let out = dir.join(name);
    let tokens: Vec<String> = (0..40).map(|i| (3 + 7 * i % 200).to_string()).collect();
    let tokens = tokens.join(",");
    let mut args = vec![
        "dump",
        "--model",
        path_str(model),
        "--tokens",
        &tokens,
        "--taps",
        "all",
        "--profile",
        profile,
        "-o",
        path_str(&out),
    ];
    for i in inject {
        args.extend(["--inject", i]);
    }
    let r = resbisect(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    out
}

#[test]
fn a_small_fault_is_found_exactly_under_the_llamacpp_cpu_profile() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_1", 18);
    let healthy = dump(dir.path(), &model, "healthy", "llamacpp-cpu", &[]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(healthy.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["engine"]["profile"], "llamacpp-cpu");
    // 1e-2 on one tap from position 17: smaller than the profile's own distance from the
    // exact reference downstream (below), found because two runs of one profile are
    // bit-identical (rel L2 0 before the fault).
    let faulty = dump(
        dir.path(),
        &model,
        "faulty",
        "llamacpp-cpu",
        &["blk.1.attn_out:scale=1.01@17"],
    );
    let report = dir.path().join("report");
    let d = resbisect(&[
        "diff",
        path_str(&faulty),
        path_str(&healthy),
        "--report",
        path_str(&report),
    ]);
    assert_eq!(d.code, 1, "{}{}", d.stdout, d.stderr);
    assert!(
        d.stdout.contains("FIRST DIVERGENCE at blk.1.attn_out, position 17"),
        "{}",
        d.stdout
    );
    assert!(
        d.stdout
            .contains("resbisect-reference+inject(blk.1.attn_out:scale=1.01@17) 0.1.0, profile llamacpp-cpu"),
        "{}",
        d.stdout
    );
    for file in ["report.md", "report.html"] {
        let text = std::fs::read_to_string(report.join(file)).unwrap();
        assert!(
            text.contains("profile llamacpp-cpu"),
            "{file} does not name the profile"
        );
    }
    // Against the exact reference the profile's own rounding shows from the first
    // matmul on: 8-bit activations cost ~3e-3 rel L2 (SmolLM2: 3.1e-3 at blk.0.q_pre_rope).
    let exact = dump(dir.path(), &model, "exact", "exact", &[]);
    let d = resbisect(&["diff", path_str(&healthy), path_str(&exact), "--json"]);
    assert_eq!(d.code, 1, "{}", d.stderr);
    let r: Value = serde_json::from_str(&d.stdout).unwrap();
    let first = &r["prompts"][0]["first"];
    assert_eq!(first["tap"], "blk.0.q_pre_rope", "{first}");
    assert_eq!(first["position"], 0, "{first}");
}

#[test]
fn an_unknown_profile_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_1", 18);
    let out = resbisect(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2,3",
        "--profile",
        "llamacpp",
        "-o",
        path_str(&dir.path().join("x")),
    ]);
    assert_refused(
        &out,
        "--profile: unknown numerics profile \"llamacpp\" (known: exact, llamacpp-cpu, llamacpp-cuda)",
    );
}

/// Under a rounding profile bisect measures each tap's tolerance with the oracle's twin:
/// deep in SmolLM2 those tolerances are the 8-bit noise a sound engine makes there (4.7e-2
/// rel L2 at blk.8.ffn_out on this prompt, × 4), and a fault past them is still named at
/// its own tap and position, with replay agreeing.
#[test]
fn bisect_under_a_profile_finds_a_deep_fault_against_the_twin_tolerances() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = root().join("fixtures/prompts/bisect.jsonl").display().to_string();
    let (code, r) = crate::bisect::bisect_json(
        &[
            "--prompts",
            &prompts,
            "--id",
            "p6_len_128",
            "--engine",
            "reference",
            "--inject",
            "blk.8.ffn_out:scale=1.5@60",
            "--profile",
            "llamacpp-cpu",
        ],
        &dir.path().join("work"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["first"]["tap"], "blk.8.ffn_out", "{}", r["first"]);
    assert_eq!(r["first"]["position"], 60, "{}", r["first"]);
    assert!(r["twin"].as_str().is_some_and(|t| t.contains("twin")), "{r}");
    // The twin loosened the deep tap (its own tolerance is 1e-3) but not below the fault.
    let tolerance = r["first"]["tolerance"]["rel_l2"].as_f64().unwrap_or_default();
    assert!(tolerance > 1e-3 && tolerance < 0.5, "{}", r["first"]);
    let introduced: Vec<u64> = r["replay"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["introduces"] == true)
        .map(|l| l["layer"].as_u64().unwrap())
        .collect();
    assert_eq!(introduced, vec![8], "{}", r["replay"]);
}

/// Rows of layer 0 that llama.cpp's CUDA build wrote on an H200 (SmolLM2-135M Q4_1,
/// long_1652; fixtures/llamacpp/, picked where earlier rules of the profile disagreed)
/// dumped by the reference under `profile`: (the fixture, its positions, the dump).
fn cuda_rows(dir: &std::path::Path, profile: &str) -> (Vec<u8>, Vec<i64>, resbisect::dump::Dump) {
    let bytes = std::fs::read(root().join("fixtures/llamacpp/smollm2-cuda-h200_long_1652_layer0.safetensors")).unwrap();
    let fx = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (tokens, positions, spec) = fixture_prompt(&fx);
    let (out, model) = (dir.join(profile), smollm2());
    let args = [
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        &tokens,
        "--layers",
        "0",
        "--taps",
        "attn_norm,q_pre_rope,k_pre_rope,v",
        "--positions",
        &spec,
        "--profile",
        profile,
        "-o",
        path_str(&out),
    ];
    let r = resbisect(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (bytes, positions, resbisect::dump::Dump::open(&out).unwrap())
}

/// Per tap, the worst row rel L2 of the dump against llama.cpp's rows.
fn worst_rows(bytes: &[u8], positions: &[i64], d: &resbisect::dump::Dump) -> Vec<(String, f64)> {
    let fx = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let file = d.read_file("prompt", "blk.0").unwrap().unwrap();
    ["attn_norm", "q_pre_rope", "k_pre_rope", "v"]
        .iter()
        .map(|tap| {
            let ours = &file.taps[&format!("blk.0.{tap}")];
            let theirs = f32s(fx.tensor(&format!("blk.0.{tap}")).unwrap().data());
            let w = ours.width;
            let worst = (0..positions.len())
                .map(|row| rel_l2(&ours.values[row * w..(row + 1) * w], &theirs[row * w..(row + 1) * w]))
                .fold(0f64, f64::max);
            (tap.to_string(), worst)
        })
        .collect()
}

/// The `llamacpp-cuda` profile imitates ggml-cuda's fast-math code bit for bit where it
/// can: layer 0's RMSNorm exactly, and q, k, v up to the order its own GEMM sums in (on
/// all 1652 rows of the H200 run, ≤ 5.6e-7 rel L2; the bound 2e-6 leaves 3.5×). The
/// CPU rules on the same rows miss by whole 8-bit steps (≥ 1e-4), so the rows tell them
/// apart: a CUDA rule that regresses fails here.
#[test]
fn the_llamacpp_cuda_profile_reproduces_llamacpp_cuda_layer_0_rows() {
    const GEMM_ORDER_BOUND: f64 = 2e-6;
    let dir = tempfile::tempdir().unwrap();
    let (bytes, positions, cuda) = cuda_rows(dir.path(), "llamacpp-cuda");
    for (tap, worst) in worst_rows(&bytes, &positions, &cuda) {
        let bound = if tap == "attn_norm" { 0.0 } else { GEMM_ORDER_BOUND };
        assert!(
            worst <= bound,
            "llamacpp-cuda {tap}: worst row rel L2 {worst:.3e} > {bound:.0e}"
        );
    }
    let (_, _, cpu) = cuda_rows(dir.path(), "llamacpp-cpu");
    let cpu = worst_rows(&bytes, &positions, &cpu);
    assert!(cpu[0].1 > 0.0, "the CPU RMSNorm differs on some row: {cpu:?}");
    assert!(
        cpu[1..].iter().all(|(_, w)| *w > 1e-4),
        "the CPU rules miss by whole q8 steps: {cpu:?}"
    );
}
