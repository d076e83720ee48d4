//! diff, calibrate and reports: injected faults on the real model are named exactly,
//! clean pairs pass, bad pairs are refused, partial dumps are compared, HTML is safe.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

struct Suite {
    dir: tempfile::TempDir,
}

impl Suite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// One prompt of a committed suite as its own suite file.
    fn prompt_file(&self, suite: &str, id: &str) -> PathBuf {
        let text = std::fs::read_to_string(root().join("fixtures/prompts").join(suite)).unwrap();
        let line = text
            .lines()
            .find(|l| serde_json::from_str::<Value>(l).unwrap()["id"] == id)
            .unwrap();
        let p = self.path(&format!("{id}.jsonl"));
        std::fs::write(&p, format!("{line}\n")).unwrap();
        p
    }
}

fn dump_ok(args: &[&str]) {
    let out = resbisect(args);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn diff_json(a: &Path, b: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["diff", path_str(a), path_str(b), "--json"];
    args.extend_from_slice(extra);
    let out = resbisect(&args);
    assert!(out.code == 0 || out.code == 1, "exit {}: {}", out.code, out.stderr);
    (out.code, serde_json::from_str(&out.stdout).unwrap())
}

/// The first divergence of one prompt as (tap, position).
fn first(report: &Value, prompt: &str) -> Option<(String, u64)> {
    let p = report["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == prompt)
        .unwrap();
    p["first"]
        .as_object()
        .map(|f| (f["tap"].as_str().unwrap().to_string(), f["position"].as_u64().unwrap()))
}

#[test]
fn injected_faults_on_smollm2_are_named_exactly() {
    let s = Suite::new();
    let model = smollm2();
    let m = path_str(&model);
    // 1652 tokens; positions around and past the 826 collapse point, layers that hold
    // the injections and their neighbours.
    let long = s.prompt_file("long.jsonl", "long_1652");
    let long_sel = [
        "--layers",
        "0,2,3,9,10,19,20",
        "--taps",
        "all",
        "--positions",
        "780..1000,-2..",
    ];
    let short = root().join("fixtures/prompts/bisect.jsonl");
    let short_sel = ["--layers", "all", "--taps", "all", "--positions", "all"];
    let run = |name: &str, prompts: &Path, sel: &[&str], inject: &[&str]| {
        let out = s.path(name);
        let mut args = vec![
            "dump",
            "--model",
            m,
            "--prompts",
            path_str(prompts),
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(sel);
        for i in inject {
            args.extend(["--inject", i]);
        }
        dump_ok(&args);
        out
    };
    let long_clean = run("long-clean", &long, &long_sel, &[]);
    let short_clean = run("short-clean", &short, &short_sel, &[]);
    let cases: [(&str, bool, &str, (&str, u64)); 8] = [
        ("long", true, "blk.3.attn_out:scale=1.1@826", ("blk.3.attn_out", 826)),
        ("long", true, "blk.10.ffn_act:nan@900", ("blk.10.ffn_act", 900)),
        ("long", true, "blk.20.q:offset=0.5@950", ("blk.20.q", 950)),
        ("long", true, "rope:shift=5@826", ("blk.0.q", 826)),
        ("p6_len_32", false, "blk.0.resid_post:zero@10", ("blk.0.resid_post", 10)),
        (
            "p6_len_128",
            false,
            "blk.29.resid_mid:scale=0.9@0",
            ("blk.29.resid_mid", 0),
        ),
        ("p6_len_16", false, "embed:offset=0.01@5", ("embed", 5)),
        ("chat_turn", false, "blk.14.v:scale=1.02@3", ("blk.14.v", 3)),
    ];
    for (i, (prompt, is_long, inject, (tap, pos))) in cases.iter().enumerate() {
        let (inj, clean) = if *is_long {
            (run(&format!("inj{i}"), &long, &long_sel, &[inject]), &long_clean)
        } else {
            (run(&format!("inj{i}"), &short, &short_sel, &[inject]), &short_clean)
        };
        let (code, report) = diff_json(&inj, clean, &[]);
        assert_eq!(code, 1, "{inject}");
        let prompt_id = if *is_long { "long_1652" } else { prompt };
        assert_eq!(first(&report, prompt_id), Some((tap.to_string(), *pos)), "{inject}");
        // A fault from position P reaches every prompt of the suite longer than P, at
        // the same tap and position, and no shorter one.
        for p in report["prompts"].as_array().unwrap() {
            let id = p["id"].as_str().unwrap();
            if p["n_tokens"].as_u64().unwrap() > *pos {
                assert_eq!(first(&report, id), Some((tap.to_string(), *pos)), "{inject} on {id}");
            } else {
                assert!(p["first"].is_null(), "{inject}: prompt {id} is too short to be touched");
            }
        }
    }
    // Clean pair: f32 reference against f64 reference — no divergence under the f32
    // defaults (measured gap ~1e-6 rel L2, tolerance 1e-3).
    let long_f64 = run("long-f64", &long, &[&long_sel[..], &["--dtype", "f64"]].concat(), &[]);
    let (code, report) = diff_json(&long_clean, &long_f64, &[]);
    assert_eq!(code, 0, "{}", report["prompts"][0]["first"]);
    assert!(report["bytes_compared"].as_u64().unwrap() > 100_000_000);
}

/// What one side left out is said, never compared silently: positions only one dump
/// holds are listed as not compared, and a finished dump without a single tap file is
/// named as the side that wrote nothing.
#[test]
fn what_one_side_left_out_is_named() {
    let s = Suite::new();
    let model = tiny_model(s.dir.path(), "q8_0", 23);
    let dump_taps = |name: &str, taps: &str, positions: &str| {
        let out = s.path(name);
        dump_ok(&[
            "dump",
            "--model",
            path_str(&model),
            "--tokens",
            "5,6,7,8,9,10,11,12",
            "--taps",
            taps,
            "--positions",
            positions,
            "-o",
            path_str(&out),
        ]);
        out
    };
    let dump = |name: &str, positions: &str| dump_taps(name, "resid_post", positions);
    let a = dump("a", "0..8");
    let b = dump("b", "0..3,5");
    let (code, r) = diff_json(&a, &b, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(
        r["prompts"][0]["positions_missing_in_b"],
        serde_json::json!([3, 4, 6, 7])
    );
    assert_eq!(
        r["prompts"][0]["rows_missing_in_b"][0]["positions"],
        serde_json::json!([3, 4, 6, 7])
    );
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert!(
        out.stdout
            .contains("rows missing in B (not compared): blk.0.resid_post")
            && out.stdout.contains("resid_post at positions 3..5,6..8"),
        "{}",
        out.stdout
    );
    // Logits of the last position only (an engine that computes the head for the
    // token it samples): the taps short of rows are named, not every position.
    let full = dump_taps("head-full", "resid_post,logits", "0..8");
    let last = dump_taps("head-last", "resid_post,logits", "7");
    let pruned = dump_taps("head-pruned", "resid_post,logits", "0..8");
    let output = "data/prompt/output.safetensors";
    std::fs::copy(last.join(output), pruned.join(output)).unwrap();
    let out = resbisect(&["diff", path_str(&pruned), path_str(&full)]);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("dump A lacks rows that its manifest selects and the other dump holds: logits at positions 0..7"),
        "{}",
        out.stdout
    );
    // A finished dump whose tap files are gone: an engine failure, never a pass.
    let empty = dump("empty", "0..8");
    std::fs::remove_dir_all(empty.join("data")).unwrap();
    let out = resbisect(&["diff", path_str(&empty), path_str(&b)]);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("ENGINE FAILURE: dump A lacks rows that its manifest selects and the other dump holds: taps"),
        "{}",
        out.stdout
    );
    // A finished dump that holds fewer layers or positions than its manifest selects
    // (files removed, rows cut) fails the same way, whatever agrees in what it kept.
    for damage in ["layer", "rows"] {
        let short = if damage == "layer" {
            let short = dump("short-layer", "0..8");
            std::fs::remove_file(short.join("data/prompt/blk.1.safetensors")).unwrap();
            short
        } else {
            // The manifest of a full run, the rows of a cut one.
            let full = dump("full-rows", "0..8");
            let short = dump("short-rows", "0..4");
            std::fs::copy(full.join("manifest.json"), short.join("manifest.json")).unwrap();
            short
        };
        let out = resbisect(&["diff", path_str(&short), path_str(&a), "--json"]);
        assert_eq!(out.code, 3, "{damage}: {}", out.stderr);
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(
            r["prompts"][0]["undelivered"][0]
                .as_str()
                .is_some_and(|u| u.starts_with("dump A lacks rows")),
            "{damage}: {r}"
        );
    }
}

#[test]
fn mismatched_inputs_are_refused() {
    let s = Suite::new();
    let m1 = tiny_model(s.dir.path(), "q8_0", 21);
    let m2 = tiny_model(s.dir.path(), "q8_0", 22);
    let dump = |name: &str, model: &Path, tokens: &str| {
        let out = s.path(name);
        dump_ok(&[
            "dump",
            "--model",
            path_str(model),
            "--tokens",
            tokens,
            "--taps",
            "all",
            "-o",
            path_str(&out),
        ]);
        out
    };
    let a = dump("a", &m1, "5,6,7,8");
    let b = dump("b", &m1, "5,6,9,8");
    // Different inputs are an engine bug, not bad input: a finding, rows before it compared.
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("TOKENS DIFFER: the engines ran different tokens from position 2: A has token 7, B has token 9"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("no divergence before the tokens differ over"),
        "{}",
        out.stdout
    );
    let c = dump("c", &m2, "5,6,7,8");
    assert_refused(&resbisect(&["diff", path_str(&a), path_str(&c)]), "different models");
    let out = resbisect(&["diff", path_str(&a), path_str(&c), "--allow-model-mismatch"]);
    assert_eq!(out.code, 1, "random weights differ everywhere: {}", out.stdout);
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at embed, position 0"),
        "{}",
        out.stdout
    );
    assert_refused(&resbisect(&["diff", path_str(&a), "/nonexistent"]), "not a dump");
    let bad_tol = s.path("tol.json");
    std::fs::write(
        &bad_tol,
        r#"{"version": 1, "defaults": {"F32": {"rel_l2": -1, "abs": 0}}}"#,
    )
    .unwrap();
    assert_refused(
        &resbisect(&["diff", path_str(&a), path_str(&a), "--tolerances", path_str(&bad_tol)]),
        "defaults.F32.rel_l2 is -1",
    );
    // Tokens apart from the first, no shift of each other, no common text: dumps of two
    // prompts, not a finding. A doubled first token is a finding (exit 1), and so is one
    // text that the engines tokenized apart.
    let unrelated = dump("u", &m1, "1,2,3,4");
    for (x, y) in [(&a, &unrelated), (&unrelated, &a)] {
        let out = resbisect(&["diff", path_str(x), path_str(y)]);
        assert_refused(&out, "A and B are dumps of different prompts");
        assert_refused(&out, "from position 0");
    }
    let report_dir = s.path("report");
    assert_refused(
        &resbisect(&[
            "report",
            "diff",
            path_str(&a),
            path_str(&unrelated),
            "-o",
            path_str(&report_dir),
        ]),
        "different prompts",
    );
    let doubled = dump("doubled", &m1, "5,5,6,7,8");
    assert_eq!(resbisect(&["diff", path_str(&doubled), path_str(&a)]).code, 1);
    // A wrong first token (a BOS id) with the rest the same: a finding too.
    let wrong_bos = dump("wrong-bos", &m1, "9,6,7,8");
    let out = resbisect(&["diff", path_str(&wrong_bos), path_str(&a)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains("agree again after 1 replaced token(s)"),
        "{}",
        out.stdout
    );
    // A's tokens a prefix of B's: a prompt truncated to a context or batch size, a
    // finding. B's a prefix of A's is not: A may have generated past what B replayed.
    let truncated = dump("truncated", &m1, "5,6,7");
    let out = resbisect(&["diff", path_str(&truncated), path_str(&a)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("A ran 3 tokens where B ran 4"), "{}", out.stdout);
    assert_eq!(resbisect(&["diff", path_str(&a), path_str(&truncated)]).code, 0);
    // The head of a prompt dropped (an engine keeping the tail on context overflow): a
    // shift of more than a few tokens is named, not taken for another prompt.
    let whole: Vec<String> = (10..30).map(|t| t.to_string()).collect();
    let long = dump("long", &m1, &whole.join(","));
    let tail = dump("tail", &m1, &whole[6..].join(","));
    let out = resbisect(&["diff", path_str(&tail), path_str(&long)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains("shifted by -6, a span of the prompt dropped"),
        "{}",
        out.stdout
    );
    let text = |name: &str, tokens: &[u32]| {
        let dir = dump(name, &m1, "5,6,7,8");
        edit_manifest(&dir, |manifest| {
            manifest["prompts"][0]["text"] = "one text".into();
            manifest["prompts"][0]["tokens"] = tokens.into();
        });
        dir
    };
    let (t1, t2) = (text("t1", &[5, 6, 7, 8]), text("t2", &[9, 10, 11, 12]));
    let out = resbisect(&["diff", path_str(&t1), path_str(&t2)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("TOKENS DIFFER"), "{}", out.stdout);
    // calibrate takes pairs that ran the same tokens, and writes nothing otherwise.
    let tolerances = s.path("t.json");
    for (x, y) in [(&a, &b), (&t1, &t2), (&doubled, &a)] {
        assert_refused(
            &resbisect(&["calibrate", path_str(x), path_str(y), "-o", path_str(&tolerances)]),
            "the engines ran different tokens from position",
        );
    }
    assert!(!tolerances.exists());
}

#[test]
fn partial_dump_of_a_crashed_engine_is_compared() {
    let s = Suite::new();
    let m = tiny_model(s.dir.path(), "q4_0", 23);
    let full = s.path("full");
    dump_ok(&[
        "dump",
        "--model",
        path_str(&m),
        "--tokens",
        "3,4,5,6,7",
        "--taps",
        "all",
        "-o",
        path_str(&full),
    ]);
    let partial = s.path("partial");
    dump_ok(&[
        "dump",
        "--model",
        path_str(&m),
        "--tokens",
        "3,4,5,6,7",
        "--taps",
        "all",
        "--inject",
        "blk.0.ffn_out:nan@3",
        "-o",
        path_str(&partial),
    ]);
    // What a crash in layer 1 leaves: layer 0 on disk, later files never written.
    std::fs::remove_file(partial.join("data/prompt/blk.1.safetensors")).unwrap();
    std::fs::remove_file(partial.join("data/prompt/output.safetensors")).unwrap();
    edit_manifest(&partial, |v| {
        v["status"] = "failed".into();
        v["error"] = serde_json::json!({"message": "illegal memory access", "tap": "blk.0.resid_post"});
    });
    // What was compared is reported; a failed engine still ends the diff with exit 3.
    let out = resbisect(&["diff", path_str(&partial), path_str(&full)]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("engine A failed: illegal memory access (last tap written: blk.0.resid_post)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains(
            "dump A is partial: its engine failed: illegal memory access (last tap written: blk.0.resid_post)"
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at blk.0.ffn_out, position 3"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("non-finite A/B 256/0"), "{}", out.stdout);
    assert!(
        out.stdout.contains("missing in A (17): blk.1.attn_norm"),
        "{}",
        out.stdout
    );
}

#[test]
fn calibrated_tolerances_from_f32_vs_f64() {
    let s = Suite::new();
    let m = tiny_model(s.dir.path(), "q6_k", 24);
    let run = |name: &str, dtype: &str, inject: Option<&str>| {
        let out = s.path(name);
        let mut args = vec![
            "dump",
            "--model",
            path_str(&m),
            "--tokens",
            "9,8,7,6,5,4,3,200,201",
            "--taps",
            "all",
            "--dtype",
            dtype,
            "-o",
            path_str(&out),
        ];
        if let Some(i) = inject {
            args.extend(["--inject", i]);
        }
        dump_ok(&args);
        out
    };
    let (f32d, f64d) = (run("f32", "f32", None), run("f64", "f64", None));
    let tol = s.path("tol.json");
    let out = resbisect(&[
        "calibrate",
        path_str(&f32d),
        path_str(&f64d),
        "--margin",
        "10",
        "-o",
        path_str(&tol),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&tol).unwrap()).unwrap();
    let patterns: Vec<&str> = t["taps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["pattern"].as_str().unwrap())
        .collect();
    // Per tap and layer, then per kind (for layers not calibrated), then embed and output.
    let n_layer = t_layers(&f32d);
    // The layer taps this model has (post norms are gemma's).
    let kinds = patterns.iter().filter(|p| p.starts_with("blk.0.")).count();
    assert_eq!(patterns.len(), kinds * n_layer + kinds + 3, "{patterns:?}");
    for p in ["blk.0.resid_post", "blk.1.q", "blk.*.resid_post", "logits"] {
        assert!(patterns.contains(&p), "{p} missing: {patterns:?}");
    }
    let per_layer = patterns.iter().position(|p| *p == "blk.0.q").unwrap();
    let per_kind = patterns.iter().position(|p| *p == "blk.*.q").unwrap();
    assert!(
        per_layer < per_kind,
        "per-layer entries first (first match wins): {patterns:?}"
    );
    assert!(t["calibration"]["quantile"].as_f64() == Some(0.99), "{t}");
    for o in t["taps"].as_array().unwrap() {
        assert!(
            o["rel_l2"].as_f64().unwrap() < 1e-4,
            "{o}: f32 vs f64 noise is far below 1e-4"
        );
    }
    // A fault far below the default f32 tolerance (1e-3): judged by that tolerance alone it
    // passes; the calibrated tolerances find it, and so does the default judgement, as an
    // error over the f32 noise floor to the last layer.
    let subtle = run("subtle", "f32", Some("blk.1.ffn_up:scale=1.0002@4"));
    let (a, b) = (path_str(&subtle), path_str(&f64d));
    assert_eq!(resbisect(&["diff", a, b, "--judge", "tolerance"]).code, 0);
    for extra in [&["--tolerances", path_str(&tol)][..], &[]] {
        let (code, report) = diff_json(&subtle, &f64d, extra);
        assert_eq!(code, 1, "{extra:?}");
        assert_eq!(
            first(&report, "prompt"),
            Some(("blk.1.ffn_up".to_string(), 4)),
            "{extra:?}"
        );
    }
}

#[test]
fn reports_are_self_contained_and_escape_prompt_text() {
    let s = Suite::new();
    let m = smollm2();
    let suite = s.path("xss.jsonl");
    let text = "</pre><script>document.title='pwned'</script><img src=x onerror=alert(1)> & \"quotes\"";
    std::fs::write(&suite, format!("{}\n", serde_json::json!({"id": "xss", "text": text}))).unwrap();
    let (a, b) = (s.path("a"), s.path("b"));
    let sel = ["--layers", "0,1,2", "--taps", "resid_post,attn_out,logits"];
    dump_ok(
        &[
            &[
                "dump",
                "--model",
                path_str(&m),
                "--prompts",
                path_str(&suite),
                "-o",
                path_str(&a),
                "--inject",
                "blk.1.attn_out:scale=2@4",
            ][..],
            &sel,
        ]
        .concat(),
    );
    dump_ok(
        &[
            &[
                "dump",
                "--model",
                path_str(&m),
                "--prompts",
                path_str(&suite),
                "-o",
                path_str(&b),
            ][..],
            &sel,
        ]
        .concat(),
    );
    let dir = s.path("report");
    let history = s.path("history.jsonl");
    for (run_name, x, y) in [("night-1", &b, &b), ("night-2", &a, &b), ("night-3", &a, &b)] {
        let out = resbisect(&[
            "report",
            "diff",
            path_str(x),
            path_str(y),
            "-o",
            path_str(&dir),
            "--history",
            path_str(&history),
            "--run",
            run_name,
        ]);
        assert!(out.code <= 1, "{}", out.stderr);
    }
    // A run name the history holds is refused, and the history is left as it was; without
    // --run, a run is named by its date.
    let before = std::fs::read_to_string(&history).unwrap();
    let diff_into_history = |run: &[&str]| {
        let mut args = vec!["report", "diff", path_str(&a), path_str(&b), "-o", path_str(&dir)];
        args.extend_from_slice(&["--history", path_str(&history)]);
        args.extend_from_slice(run);
        resbisect(&args)
    };
    let out = diff_into_history(&["--run", "night-3"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--run night-3:") && out.stderr.contains("already holds a run of that name"));
    assert_eq!(std::fs::read_to_string(&history).unwrap(), before);
    assert_eq!(diff_into_history(&[]).code, 1);
    let last = std::fs::read_to_string(&history).unwrap();
    let entry: Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(entry["run"], entry["date"], "{entry}");
    // Two runs in one second are still two names; a blank, padded or control-character name
    // is refused, as is a history the report directory would rewrite or that has no directory.
    assert_eq!(diff_into_history(&[]).code, 1);
    let runs: Vec<String> = std::fs::read_to_string(&history)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["run"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        runs.iter().all(|r| runs.iter().filter(|o| *o == r).count() == 1),
        "{runs:?}"
    );
    let before = std::fs::read_to_string(&history).unwrap();
    for bad in ["", " ", " night-9", "a\nb", "\u{1b}[31mred"] {
        let out = diff_into_history(&["--run", bad]);
        assert_eq!(
            (out.code, out.stderr.lines().count()),
            (2, 1),
            "{bad:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("--run"), "{}", out.stderr);
    }
    let inside = dir.join("history.jsonl");
    let missing = s.path("no-such-dir/history.jsonl");
    for (h, says) in [(&inside, "lies in --output"), (&missing, "no directory")] {
        let args = [
            "report",
            "diff",
            path_str(&a),
            path_str(&b),
            "-o",
            path_str(&dir),
            "--history",
            path_str(h),
        ];
        let out = resbisect(&args);
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert!(
            out.stderr.contains("--history") && out.stderr.contains(says),
            "{}",
            out.stderr
        );
        assert!(!h.exists());
    }
    assert_eq!(std::fs::read_to_string(&history).unwrap(), before);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(!html.contains("<script"), "prompt text must stay text");
    assert!(!html.contains("<img"), "prompt text must stay text");
    assert!(html.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"));
    assert!(html.contains("First divergence: blk.1.attn_out at position 4"));
    assert!(
        !html.contains("http://") && !html.contains("https://") || html.contains("xmlns"),
        "no external resources"
    );
    assert_eq!(html.matches("<svg").count(), 2, "error-vs-layer plot and heatmap");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| xss |") && md.contains("**blk.1.attn_out**"), "{md}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["prompts"][0]["first"]["tap"], "blk.1.attn_out");

    let trend_dir = s.path("trend");
    let out = resbisect(&["report", "trend", path_str(&history), "-o", path_str(&trend_dir)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("**xss** has diverged since run night-2"),
        "{}",
        out.stdout
    );
    assert!(trend_dir.join("trend.html").is_file());

    // A real browser renders the report; the prompt's script never runs.
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        eprintln!("skipping the browser check: /usr/bin/chromium is not installed (.ci/run installs it)");
        return;
    }
    let shot = s.path("shot.png");
    let profile = s.path("profile");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    let url = format!("file://{}", dir.join("report.html").display());
    let dom = std::process::Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &url])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("<title>resbisect: divergence found</title>"),
        "title changed or page did not load"
    );
    assert!(!dom.contains("pwned</title>"));
    let status = std::process::Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args([
            "--window-size=1000,1400",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 20_000,
        "a screenshot with plots is not tiny"
    );
}

/// Layers of a dump's model, from its manifest.
fn t_layers(dump: &Path) -> usize {
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dump.join("manifest.json")).unwrap()).unwrap();
    m["model"]["n_layer"].as_u64().unwrap() as usize
}

/// What a diff reads beyond the first divergence: a later tap that diverges at an
/// earlier position (a second origin, which the first divergence alone would hide), and
/// an engine whose generated token is not its own logits' top one.
#[test]
fn a_second_origin_and_a_pick_that_is_not_the_top_token_are_named() {
    let s = Suite::new();
    let m = tiny_model(s.dir.path(), "q8_0", 29);
    let dump = |name: &str, extra: &[&str]| {
        let out = s.path(name);
        let mut args = vec![
            "dump",
            "--model",
            path_str(&m),
            "--tokens",
            "3,4,5,6,7,8",
            "--taps",
            "all",
        ];
        args.extend_from_slice(extra);
        args.extend(["-o", path_str(&out)]);
        dump_ok(&args);
        out
    };
    // attn from position 1 (the first divergence in graph order) and ffn_gate from
    // position 0, where attn still agrees.
    let clean = dump("clean", &["--engine", "reference"]);
    let two = dump(
        "two",
        &[
            "--engine",
            "reference",
            "--inject",
            "blk.0.attn:scale=1.05@1",
            "--inject",
            "blk.0.ffn_gate:scale=1.05@0",
        ],
    );
    let out = resbisect(&["diff", path_str(&two), path_str(&clean)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at blk.0.attn, position 1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("blk.0.ffn_gate@0 diverges too (rel_l2 5.00e-2) before blk.0.attn does (from position 1)"),
        "{}",
        out.stdout
    );

    // Greedy decoding, then A's last generated token replaced: its own logits one
    // position before still put B's token first.
    let b = dump("gen", &["--engine", "runtime", "--max-tokens", "2"]);
    let a = dump("gen-a", &["--engine", "runtime", "--max-tokens", "2"]);
    let (mut last, mut token) = (0, 0);
    edit_manifest(&a, |v| {
        last = v["prompts"][0]["tokens"].as_array().unwrap().len() - 1;
        token = v["prompts"][0]["tokens"][last].as_u64().unwrap();
        v["prompts"][0]["tokens"][last] = (if token > 3 { token - 1 } else { token + 1 }).into();
    });
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "A's own logits at position {} put token {token} first, as B's do",
            last - 1
        )),
        "{}",
        out.stdout
    );
    // Replaced in the prompt instead, where B's logits put another token first: no such note.
    edit_manifest(&a, |v| {
        v["prompts"][0]["tokens"][last] = token.into();
        v["prompts"][0]["tokens"][2] = 9.into();
    });
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("from position 2"), "{}", out.stdout);
    assert!(!out.stdout.contains("did not pick greedily"), "{}", out.stdout);

    // An engine killed before it generated: its manifest lists the prompt only. That
    // its tokens end early is its failure, not a second finding.
    let killed = dump("killed", &[]);
    edit_manifest(&killed, |v| v["status"] = "running".into());
    let out = resbisect(&["diff", path_str(&killed), path_str(&b)]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(!out.stdout.contains("TOKENS DIFFER"), "{}", out.stdout);
    assert!(
        out.stdout.contains("result: ENGINE FAILURE: dump A is unfinished") && !out.stdout.contains("(and "),
        "{}",
        out.stdout
    );
}

/// Rewrites the manifest of dump `dir` through `edit`.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("manifest.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}
