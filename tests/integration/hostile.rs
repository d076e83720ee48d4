//! Files from other people's machines (issue 21): each input that once panicked, hung or
//! ate memory, run through the CLI under a clock and a memory meter. Every one ends in a
//! one-line refusal naming the field (exit 2), or the right answer, in under a second of
//! CPU and bounded memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::quantized::gguf_file::Value as GValue;
use resbisect::dump::{
    BackgroundWriter, DumpWriter, EngineInfo, FileJob, Manifest, ModelInfo, PromptRecord, TapDType, TapTensor,
};
use resbisect::synth;
use resbisect::taps::Selection;
use serde_json::Value;

use crate::util::*;

/// CPU seconds and peak resident memory any hostile input may cost.
const CPU_LIMIT_S: f64 = 1.0;
const RSS_LIMIT_MB: f64 = 400.0;

struct Measured {
    out: Output,
    cpu_s: f64,
    max_rss_mb: f64,
}

/// Run the CLI and read its CPU time from `wait4` (the child's own rusage) and its peak
/// RSS from `/proc/PID/status` `VmHWM`, polled while it runs: `ru_maxrss` also counts the
/// memory image the child was spawned from, which is this test binary's (hundreds of MB
/// while other tests hold data), so it measured 354 MB for a 105 MB `inspect` under load.
/// `wait4` reaps the child, so `Child::wait` is never called.
#[allow(clippy::zombie_processes)]
fn measured(args: &[&str]) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let (so, se) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let child = Command::new(env!("CARGO_BIN_EXE_resbisect"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&so).unwrap())
        .stderr(std::fs::File::create(&se).unwrap())
        .spawn()
        .expect("the binary runs");
    let pid = child.id() as libc::pid_t;
    let started = std::time::Instant::now();
    let mut status = 0;
    // SAFETY: plain syscall on our own child; rusage is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut peak_kb = 0f64;
    loop {
        // SAFETY: as above; WNOHANG returns 0 while the child runs.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4 failed");
        let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()));
        peak_kb = peak_kb.max(hwm.unwrap_or(0.0));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(started.elapsed().as_secs() < 60, "ran {:?}", started.elapsed());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Measured {
        out: Output {
            code,
            stdout: std::fs::read_to_string(&so).unwrap(),
            stderr: std::fs::read_to_string(&se).unwrap(),
        },
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_mb: peak_kb / 1024.0,
    }
}

fn assert_cheap(m: &Measured, what: &str) {
    assert!(m.cpu_s < CPU_LIMIT_S, "{what}: {:.2} s of CPU", m.cpu_s);
    assert!(m.max_rss_mb < RSS_LIMIT_MB, "{what}: {:.0} MB resident", m.max_rss_mb);
}

/// Exit 2, one line naming `needle`, cheaply.
fn refused_cheaply(args: &[&str], needle: &str) {
    let m = measured(args);
    assert_refused(&m.out, needle);
    assert_cheap(&m, &args.join(" "));
}

// ---- dumps with hostile manifests ----

fn small_dump(root: &Path) {
    let config = synth::preset("tiny").unwrap().config;
    let manifest = Manifest::new(
        EngineInfo {
            name: "test".into(),
            version: "0".into(),
            backend: "none".into(),
            dtype: "f32".into(),
            device: "none".into(),
            options: None,
            profile: None,
        },
        ModelInfo {
            path: "m.gguf".into(),
            fingerprint: Some("00".into()),
            config,
        },
        vec![PromptRecord {
            id: "p".into(),
            text: None,
            tokens: vec![1, 2, 3],
        }],
        Selection::parse("all", "resid_post", "all", 2).unwrap(),
    );
    let writer = BackgroundWriter::spawn(DumpWriter::create(root, manifest, false).unwrap());
    let positions = std::sync::Arc::new(vec![0, 1, 2]);
    for layer in 0..2 {
        let values: Vec<f32> = (0..3 * 256).map(|i| (i % 17) as f32 * 0.25 + layer as f32).collect();
        let taps = vec![TapTensor {
            id: format!("blk.{layer}.resid_post"),
            dtype: TapDType::F32,
            rows: 3,
            width: 256,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }];
        writer
            .send(FileJob {
                prompt_id: "p".into(),
                stem: format!("blk.{layer}"),
                positions: positions.clone(),
                taps,
            })
            .unwrap();
    }
    writer.finish(Ok(())).unwrap();
}

/// A copy of a small valid dump with one manifest field replaced.
fn dump_with(dir: &Path, name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let root = dir.join(name);
    small_dump(&root);
    let path = root.join("manifest.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    root
}

#[test]
fn manifest_sizes_are_checked_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Value, &str); 5] = [
        ("n_head0", "n_head", 0.into(), "model.n_head = 0 is out of range"),
        (
            "n_layer_huge",
            "n_layer",
            (1u64 << 62).into(),
            "model.n_layer = 4611686018427387904 is out of range",
        ),
        (
            "n_layer_100m",
            "n_layer",
            100_000_000.into(),
            "model.n_layer = 100000000 is out of range",
        ),
        (
            "n_head_kv3",
            "n_head_kv",
            3.into(),
            "model.n_head 4 is not a multiple of model.n_head_kv 3",
        ),
        (
            "n_head5",
            "n_head",
            5.into(),
            "model.n_embd 256 is not divisible by model.n_head 5",
        ),
    ];
    for (name, field, value, needle) in cases {
        let d = dump_with(dir.path(), name, |v| v["model"][field] = value.clone());
        let d = path_str(&d);
        refused_cheaply(&["inspect", d], needle);
        refused_cheaply(&["diff", d, d], needle);
    }
    let d = dump_with(dir.path(), "sel", |v| {
        v["selection"]["layers"] = serde_json::json!([0, 1, 7])
    });
    refused_cheaply(
        &["inspect", path_str(&d)],
        "selection.layers: layer selection \"7\" goes past the model's 2 layers",
    );
}

#[test]
fn a_declared_layer_count_costs_only_the_files_present() {
    // The largest n_layer accepted: diff and inspect walk the two files that exist.
    let dir = tempfile::tempdir().unwrap();
    let d = dump_with(dir.path(), "deep", |v| v["model"]["n_layer"] = (1u64 << 24).into());
    let d = path_str(&d);
    let m = measured(&["diff", d, d]);
    assert_eq!(m.out.code, 0, "{}", m.out.stderr);
    assert!(m.out.stdout.contains("no divergence"), "{}", m.out.stdout);
    assert_cheap(&m, "diff of a 16M-layer manifest");
    let m = measured(&["inspect", d]);
    assert_eq!(m.out.code, 0, "{}", m.out.stderr);
    assert!(m.out.stdout.contains("blk.1.resid_post"), "{}", m.out.stdout);
    assert_cheap(&m, "inspect of a 16M-layer manifest");
}

// ---- hostile GGUF files ----

fn gguf_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

#[test]
fn a_tensor_size_that_wraps_is_refused() {
    // F32 [2^62, 1]: 2^62 elements of 4 bytes is 2^64 bytes, which wraps to 0 and once
    // passed the bounds check.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wrap.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    gguf_string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    refused_cheaply(
        &["inspect", path_str(&p)],
        "tensor token_embd.weight: byte size of dimensions [4611686018427387904, 1] overflows",
    );
    let out = dir.path().join("out");
    refused_cheaply(
        &["dump", "--model", path_str(&p), "--tokens", "1", "-o", path_str(&out)],
        "overflows",
    );
}

#[test]
fn a_lying_block_count_costs_only_the_tensors_present() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_0", 5);
    let bad = dir.path().join("deep.gguf");
    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "llama.block_count", GValue::U32(1 << 24)),
        |n| Some(n.to_string()),
    );
    refused_cheaply(
        &["inspect", path_str(&bad)],
        "missing tensor blk.2.attn_norm.weight (block_count says 16777216 layers)",
    );
}

#[test]
fn a_huge_metadata_array_costs_its_own_bytes() {
    // 50 MB of u8 metadata spliced in front of a valid model's metadata; the splice is a
    // multiple of the alignment, so every tensor offset still holds.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_0", 6);
    let bytes = std::fs::read(&model).unwrap();
    // An inert key (general.*): any other unknown key is refused before its cost shows.
    const N: u64 = 49_999_996;
    let mut kv = Vec::new();
    gguf_string(&mut kv, "general.junk");
    kv.extend(9u32.to_le_bytes());
    kv.extend(0u32.to_le_bytes());
    kv.extend(N.to_le_bytes());
    kv.resize(kv.len() + N as usize, 7);
    assert_eq!(kv.len() % 32, 0);
    let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let mut b = bytes[..16].to_vec();
    b.extend((n_kv + 1).to_le_bytes());
    b.extend(&kv);
    b.extend(&bytes[24..]);
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, &b).unwrap();
    let m = measured(&["inspect", path_str(&p)]);
    assert_eq!(m.out.code, 0, "{}", m.out.stderr);
    assert!(m.out.stdout.contains("layers       2"), "{}", m.out.stdout);
    assert_cheap(&m, "inspect of a 50 MB metadata array");
    assert!(m.max_rss_mb < 250.0, "{:.0} MB for a 50 MB array", m.max_rss_mb);
}

/// A SentencePiece tiny model whose vocabulary entries `edit` rewrites (same count).
fn spm_with(dir: &Path, name: &str, edit: impl Fn(&mut Vec<String>)) -> PathBuf {
    let base = dir.join("spm.gguf");
    if !base.exists() {
        let out = resbisect(&[
            "synth",
            "--preset",
            "tiny",
            "--tokenizer",
            "llama",
            "--quant",
            "q4_0",
            "--seed",
            "8",
            "-o",
            path_str(&base),
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let dst = dir.join(name);
    rewrite_gguf(
        &base,
        &dst,
        |m| {
            let tokens = m.iter_mut().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap();
            let GValue::Array(items) = &tokens.1 else {
                panic!("tokens")
            };
            let mut v: Vec<String> = items.iter().map(|i| i.to_string().unwrap().clone()).collect();
            edit(&mut v);
            tokens.1 = GValue::Array(v.into_iter().map(GValue::String).collect());
        },
        |n| Some(n.to_string()),
    );
    dst
}

#[test]
fn hostile_sentencepiece_vocabularies_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let long = spm_with(dir.path(), "long.gguf", |v| v[1000] = "x".repeat(200_000));
    let stairs = spm_with(dir.path(), "stairs.gguf", |v| {
        (1..=700).for_each(|k| v[300 + k - 1] = "q".repeat(k))
    });
    let nested = spm_with(dir.path(), "nested.gguf", |v| {
        (1..=250).for_each(|k| v[300 + k - 1] = "q".repeat(k))
    });
    for (model, needle) in [
        (&long, "tokenizer.ggml.tokens[1000] is 200000 characters long"),
        (&stairs, "tokenizer.ggml.tokens[556] is 257 characters long"),
        (&nested, "recovering SentencePiece merges needs over"),
    ] {
        let m = path_str(model);
        refused_cheaply(&["tokenize", "--model", m, "hello world"], needle);
        let out = dir.path().join("out");
        refused_cheaply(
            &["dump", "--model", m, "--prompt", "hello world", "-o", path_str(&out)],
            needle,
        );
        // inspect reports the model and says the tokenizer is unusable.
        let i = measured(&["inspect", m]);
        assert_eq!(i.out.code, 0, "{}", i.out.stderr);
        assert!(
            i.out.stdout.contains("tokenizer    unusable:") && i.out.stdout.contains(needle),
            "{}",
            i.out.stdout
        );
        assert_cheap(&i, "inspect");
    }
}

// ---- prompt suites, selections, tolerances ----

#[test]
fn a_long_suite_with_a_late_duplicate_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_0", 9);
    let suite = dir.path().join("suite.jsonl");
    let mut text = String::new();
    for i in 0..200_000 {
        text.push_str(&format!("{{\"id\": \"p{i}\", \"tokens\": [1, 2]}}\n"));
    }
    text.push_str("{\"id\": \"p0\", \"tokens\": [3]}\n");
    std::fs::write(&suite, text).unwrap();
    let out = dir.path().join("out");
    refused_cheaply(
        &[
            "dump",
            "--model",
            path_str(&model),
            "--prompts",
            path_str(&suite),
            "-o",
            path_str(&out),
        ],
        "suite.jsonl:200001: prompt id p0 appears twice",
    );
}

#[test]
fn extreme_selections_are_refused_without_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_0", 10);
    let out = dir.path().join("out");
    let dump = |extra: &[&str]| {
        let mut args = vec![
            "dump",
            "--model",
            path_str(&model),
            "--tokens",
            "1,2,3",
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], needle: &str| {
        let args = dump(extra);
        refused_cheaply(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };
    run(
        &["--layers", "18446744073709551615"],
        "layer selection \"18446744073709551615\" goes past the model's 2 layers",
    );
    run(&["--layers", "18446744073709551615.."], "empty layer range");
    run(
        &["--layers", "0..18446744073709551615"],
        "goes past the model's 2 layers",
    );
    run(
        &["--positions", "9223372036854775807"],
        "--positions 9223372036854775807: outside the prompt's 3 tokens",
    );
    run(
        &["--positions", "-9223372036854775808.."],
        "--positions -9223372036854775808..: outside the prompt's 3 tokens",
    );
    run(
        &["--positions", "0..9223372036854775807"],
        "--positions 0..9223372036854775807: outside the prompt's 3 tokens",
    );
    run(&["--inject", "blk.18446744073709551615.q:nan@0"], "bad --inject");
    run(
        &["--inject", "embed:nan@18446744073709551616"],
        "POS is not a non-negative integer",
    );
}

#[test]
fn calibration_over_nan_rows_writes_a_file_its_loader_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_0", 11);
    let m = path_str(&model);
    let dump = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "dump",
            "--model",
            m,
            "--tokens",
            "5,6,7,8",
            "--taps",
            "all",
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        let r = resbisect(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        out
    };
    let (good, nan) = (dump("good", &[]), dump("nan", &["--inject", "blk.1.ffn_up:nan@2"]));
    let tol = dir.path().join("t.json");
    let c = resbisect(&["calibrate", path_str(&nan), path_str(&good), "-o", path_str(&tol)]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert!(
        c.stderr.contains("note: blk.1.ffn_up: 2 row(s) with NaN/Inf"),
        "{}",
        c.stderr
    );
    let text = std::fs::read_to_string(&tol).unwrap();
    assert!(!text.contains("null"), "{text}");
    // The file loads, and the NaN rows still diverge under it.
    let d = resbisect(&["diff", path_str(&nan), path_str(&good), "--tolerances", path_str(&tol)]);
    assert_eq!(d.code, 1, "{}{}", d.stdout, d.stderr);
    assert!(
        d.stdout.contains("FIRST DIVERGENCE at blk.1.ffn_up, position 2"),
        "{}",
        d.stdout
    );
}

#[test]
fn hostile_tolerance_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    small_dump(&d);
    let d = path_str(&d);
    let tol = dir.path().join("t.json");
    for (content, needle) in [
        (
            r#"{"version": 1, "defaults": {"F32": {"rel_l2": null}}}"#,
            "bad tolerance file",
        ),
        (
            r#"{"version": 1, "defaults": {}, "taps": [{"pattern": "*", "rel_l2": -1, "abs": 0}]}"#,
            r#"t.json: taps["*"].rel_l2 is -1; a tolerance is a finite number >= 0"#,
        ),
        (
            r#"{"version": 1, "defaults": {"F16": {"rel_l2": 0, "abs": -0.5}}}"#,
            "defaults.F16.abs is -0.5",
        ),
        (r#"{"version": 7, "defaults": {}}"#, "version 7"),
        (
            r#"{"version": 1, "defaults": {"F32": {"rel_l2": 1e999}}}"#,
            "bad tolerance file",
        ),
        // Keys that would be ignored are refused: a lower-case dtype, an unknown field, a
        // pattern that matches no tap of any model.
        (
            r#"{"version": 1, "defaults": {"f32": {"rel_l2": 1e9, "abs": 0}}}"#,
            "\"f32\" is not a dtype",
        ),
        // The first match wins: a second entry of a pattern would be ignored unseen.
        (
            r#"{"version": 1, "defaults": {}, "taps": [{"pattern": "logits", "rel_l2": 1, "abs": 0}, {"pattern": "logits", "rel_l2": 2, "abs": 0}]}"#,
            r#"taps[1]: pattern "logits" appears twice"#,
        ),
        (
            r#"{"version": 1, "defaults": {}, "floor": {}}"#,
            "unknown field `floor`",
        ),
        // A missing `abs` would silently be 0, a key given twice silently the last.
        (
            r#"{"version": 1, "defaults": {"F32": {"rel_l2": 1e-3}}}"#,
            "missing field `abs`",
        ),
        (
            r#"{"version": 1, "defaults": {"F32": {"rel_l2": 0, "abs": 0}, "F32": {"rel_l2": 1, "abs": 1}}}"#,
            "duplicate key \"F32\"",
        ),
        (
            r#"{"version": 1, "defaults": {}, "taps": [{"pattern": "blk.99.zzz", "rel_l2": 1, "abs": 0}]}"#,
            "matches no tap",
        ),
    ] {
        std::fs::write(&tol, content).unwrap();
        refused_cheaply(&["diff", d, d, "--tolerances", path_str(&tol)], needle);
    }
    // Many stars over every tap: linear work, the right answer.
    let pattern = "*".repeat(100_000);
    std::fs::write(
        &tol,
        format!(
            r#"{{"version": 1, "defaults": {{}}, "taps": [{{"pattern": "{pattern}k", "rel_l2": 0.5, "abs": 0}}]}}"#
        ),
    )
    .unwrap();
    let m = measured(&["diff", d, d, "--tolerances", path_str(&tol)]);
    assert_eq!(m.out.code, 0, "{}", m.out.stderr);
    assert_cheap(&m, "a pattern of 100k stars");
}

// ---- a dump killed at a random moment ----

/// Files a dump holds for a prompt, by name, temporaries (a crash's leftovers) excluded.
fn dump_files(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("data/prompt"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_dump_killed_at_random_moments_is_read_as_unfinished() {
    // SmolLM2 (30 layers, one file per layer, written as each is computed), all taps of
    // the last 4 of 48 positions: a run long enough to be killed in the middle.
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let tokens: String = (0..48)
        .map(|i| (100 + i * 37).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let args = |out: &Path| -> Vec<String> {
        [
            "dump",
            "--model",
            path_str(&model),
            "--tokens",
            &tokens,
            "--taps",
            "all",
            "--positions",
            "-4..",
            "-o",
            path_str(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = dir.path().join("full");
    let started = std::time::Instant::now();
    let out = resbisect(&args(&full).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let run_time = started.elapsed().as_secs_f64();
    let complete = dump_files(&full);
    assert_eq!(complete.len(), 32, "{complete:?}");

    // Fixed-seed delays (xorshift), as fractions of the run measured above.
    let mut state = 0x2121_2121_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f64 / 1000.0
    };
    let mut killed_mid_run = 0;
    for repeat in 0..5 {
        let root = dir.path().join(format!("killed{repeat}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_resbisect"))
            .args(args(&root))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        // Kill only once the manifest exists (before it, there is no dump to read).
        while !root.join("manifest.json").exists() {
            assert!(t0.elapsed().as_secs() < 60, "no manifest after a minute");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let remaining = (run_time - t0.elapsed().as_secs_f64()).max(0.05);
        std::thread::sleep(std::time::Duration::from_secs_f64(next() * 0.9 * remaining));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
        let running = manifest["status"] == "running";
        // inspect maps and validates every file present: a torn file would be exit 2.
        let inspect = resbisect(&["inspect", path_str(&root)]);
        assert_eq!(inspect.code, 0, "repeat {repeat}: {}", inspect.stderr);
        // Every file present is whole: byte for byte the file of the complete run.
        let present = dump_files(&root);
        for name in &present {
            let (a, b) = (
                std::fs::read(root.join("data/prompt").join(name)).unwrap(),
                std::fs::read(full.join("data/prompt").join(name)).unwrap(),
            );
            assert!(a == b, "repeat {repeat}: {name} differs from the complete run's");
        }
        if running {
            killed_mid_run += 1;
            assert!(present.len() < complete.len() || present == complete, "repeat {repeat}");
            // An unfinished dump is reported as such: exit 3 (the engine did not finish).
            let d = resbisect(&["diff", path_str(&root), path_str(&full)]);
            assert_eq!(
                d.code,
                3,
                "repeat {repeat} ({} of {} files): diff of a killed dump\n{}{}",
                present.len(),
                complete.len(),
                d.stdout,
                d.stderr
            );
        }
    }
    assert!(killed_mid_run >= 3, "only {killed_mid_run} of 5 kills landed mid-run");
}
