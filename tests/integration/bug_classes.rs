//! Bisect and diff on the classes of real engine bugs that defeat a naive search, on the
//! real SmolLM2 model: errors that are small at their origin and grow with depth, an
//! attention-sink row that hides an error, a systematic error below tolerance, crashed
//! and unfinished engines, non-finite rows, different tokens, rows at shifted positions.
//! Each answer is asserted exactly (tap, position, introducing layer).

use std::path::Path;

use resbisect::dump::{Dump, DumpWriter, Manifest, Status, TapTensor};
use serde_json::Value;

use crate::bisect::bisect_json as bisect;
use crate::util::*;

fn bisect_prompts() -> String {
    root().join("fixtures/prompts/bisect.jsonl").display().to_string()
}

fn first(r: &Value) -> (&str, u64) {
    (
        r["first"]["tap"]
            .as_str()
            .unwrap_or_else(|| panic!("no first divergence: {r}")),
        r["first"]["position"].as_u64().unwrap(),
    )
}

/// Layers local replay says introduce error.
fn introducing(r: &Value) -> Vec<u64> {
    r["replay"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["introduces"] == true)
        .map(|l| l["layer"].as_u64().unwrap())
        .collect()
}

/// Engine runs allowed for SmolLM2's 30 layers: ⌈log2 30⌉ + 4.
const MAX_RUNS: u64 = 9;

#[test]
fn an_error_small_at_its_origin_and_growing_with_depth_is_found_at_its_origin() {
    // RoPE angles formed in bf16 in every layer: layer 0's q is off by ~1e-3 from
    // position 1, deeper layers cross tolerance at earlier positions than layer 0 does.
    // The search must neither plan a probe past its cut (exit 2 before) nor stop at a
    // deeper layer: the origin is layer 0's q, where the rotation first differs.
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = bisect(
        &[
            "--prompts",
            &bisect_prompts(),
            "--id",
            "p6_len_32",
            "--engine",
            "reference",
            "--inject",
            "rope:bf16@0",
        ],
        &dir.path().join("w"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.q", 1));
    assert_eq!(introducing(&r).first(), Some(&0), "{}", r["replay"]);
    assert!(r["runs_a"].as_u64().unwrap() <= MAX_RUNS);
}

#[test]
fn a_slightly_wrong_rope_scaling_is_found_at_its_origin_on_a_long_prompt() {
    // Every frequency 0.1% too high in every layer, on the runtime, over 1652 tokens.
    let dir = tempfile::tempdir().unwrap();
    let long = root().join("fixtures/prompts/long.jsonl").display().to_string();
    let (code, r) = bisect(
        &[
            "--prompts",
            &long,
            "--id",
            "long_1652",
            "--inject",
            "rope:scale=1.001@0",
        ],
        &dir.path().join("w"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["n_tokens"], 1652);
    assert_eq!(first(&r), ("blk.0.q", 1));
    assert_eq!(introducing(&r).first(), Some(&0), "{}", r["replay"]);
    assert!(r["runs_a"].as_u64().unwrap() <= MAX_RUNS);
}

#[test]
fn an_attention_sink_row_does_not_hide_an_error_in_later_layers() {
    // ffn_down wrong in layers 20–29: position 0's residual norm is ~100× the others',
    // so its rows barely move; every other row is 30–80% off from layer 20 on.
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--prompts".to_string(),
        bisect_prompts(),
        "--id".into(),
        "p6_len_128".into(),
        "--engine".into(),
        "reference".into(),
    ];
    for l in 20..30 {
        args.extend(["--inject".to_string(), format!("blk.{l}.ffn_out:scale=1.3@0")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, r) = bisect(&args, &dir.path().join("w"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.20.ffn_out", 0));
    // Layer 19 is clean; 20 introduces the error (and 21, which is faulty too).
    assert_eq!(introducing(&r), vec![20, 21], "{}", r["replay"]);
    // Replay's verdict agrees with its own tap table.
    let off: Vec<&Value> = r["replay_taps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["introduces"] == true)
        .collect();
    assert_eq!(off[0]["tap"], "blk.20.ffn_out", "{}", r["replay_taps"]);
}

/// The floor and its threshold are in the report, and every coarse residual-stream tap
/// sits over the threshold (f32: floor 4e-6 × margin 10, under the tolerance 1e-3).
fn assert_over_f32_threshold(r: &Value) {
    let val = |n: &Value, k: &str| n[k].as_f64().unwrap_or_else(|| panic!("{k}: {n}"));
    for n in r["noise"].as_array().unwrap() {
        assert_eq!(val(n, "floor"), 4e-6, "{n}");
        assert!((val(n, "threshold") - 4e-5).abs() < 1e-12, "{n}");
        assert!(n["tap"] == "embed" || val(n, "p75_rel_l2") > val(n, "threshold"), "{n}");
    }
}

/// Non-finite values: the prompt is not cut, and no note says it was.
fn assert_not_cut(r: &Value) {
    let coarse = r["probes"][0]["finding"].as_str().unwrap();
    assert!(
        coarse.contains("non-finite values: later probes run the whole prompt"),
        "{coarse}"
    );
    assert_eq!(r["prefix"], r["n_tokens"]);
    for p in r["probes"].as_array().unwrap() {
        assert!(!p["finding"].as_str().unwrap().contains("cut to"), "{p}");
    }
}

/// Bisect of the reference with `fault` injected against the reference, on prompt `id`.
fn reference_with_fault(fault: &str, id: &str, judge: &str, work: &Path) -> (i32, Value) {
    let args = [
        "--prompts",
        &bisect_prompts(),
        "--id",
        id,
        "--engine",
        "reference",
        "--inject",
        fault,
        "--judge",
        judge,
    ];
    bisect(&args, work)
}

#[test]
fn an_error_under_tolerance_at_its_first_row_that_grows_past_it_is_not_called_precision() {
    // Every RoPE frequency 0.1% too high: q is off by 1.8e-4 at position 1 (under the
    // f32 tolerance 1e-3) and by up to 6.6e-3 at position 30 (measured). The note must
    // not offer reduced precision as the likely cause, and names the largest row.
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = reference_with_fault("rope:scale=1.001@0", "p6_len_128", "auto", &dir.path().join("w"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.q", 1));
    let notes = r["notes"].to_string();
    assert!(notes.contains("blk.0.q@1 is off by rel_l2"), "{notes}");
    assert!(notes.contains("rows compared exceed it (largest rel_l2"), "{notes}");
    assert!(!notes.contains("reduced-precision arithmetic"), "{notes}");
}

#[test]
fn a_systematic_error_under_every_tolerance_is_a_finding() {
    // Layer 5's attention RMSNorm scaled by 1.0004: 4e-4 where it starts and at most
    // 7.3e-4 anywhere (the logits; measured), under every f32 tolerance (1e-3), yet the
    // residual stream's 75th-percentile row sits at 7.8e-5..1.2e-4 from layer 8 to the
    // last, 2-3x the f32 floor's threshold (4e-5) that no healthy f32 engine reaches: a
    // bug, not a pass.
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = reference_with_fault(
        "blk.5.attn_norm:scale=1.0004@0",
        "p6_len_128",
        "auto",
        &dir.path().join("w"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.5.attn_norm", 0));
    assert_eq!(r["judged"], "noise_floor");
    assert_eq!(introducing(&r), vec![5], "{}", r["replay"]);
    // The report says the error is under tolerance, and how to judge by tolerance.
    let notes = r["notes"].to_string();
    assert!(notes.contains("blk.5.attn_norm@0 is off by rel_l2"), "{notes}");
    assert!(notes.contains("under its tolerance 1.00e-3"), "{notes}");
    assert!(!notes.contains("second, larger divergence"), "{notes}");

    // A second, larger bug below it (layer 15's FFN output ×1.5) leaves the answer where
    // the first begins, and a note points at the layers where the second enters: the
    // coarse stream's error grows from ~1e-4 at layer 8 to ~1e-1 at layer 16.
    let args = [
        "--prompts",
        &bisect_prompts(),
        "--id",
        "p6_len_128",
        "--engine",
        "reference",
        "--inject",
        "blk.5.attn_norm:scale=1.0004@0",
        "--inject",
        "blk.15.ffn_out:scale=1.5@0",
    ];
    let (code, r) = bisect(&args, &dir.path().join("two"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.5.attn_norm", 0));
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("a second, larger divergence may begin in layers 9–16"),
        "{notes}"
    );
}

/// The residual stream carries a layer's error diluted by everything summed into it, so
/// the layer search (on `resid_post`) can pass the layer where an error starts. Each case's
/// answer is what `diff --judge floor` says of full dumps of every tap (measured).
#[test]
fn an_error_the_residual_stream_dilutes_is_found_in_the_layer_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    // RoPE frequencies 1.0001× in every layer: blk.0.resid_post's 75th-percentile row
    // reads 2.5e-5, under the f32 floor's threshold (4e-5); blk.1's is over it. The layer
    // search named layer 1; its branches below show layer 0's.
    let (code, r) = reference_with_fault("rope:scale=1.0001@0", "p6_len_128", "auto", &dir.path().join("every"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.q", 3));
    assert_eq!(introducing(&r).first(), Some(&0), "{}", r["replay"]);
    // RoPE 1.0005× in layer 5 alone: the stream's error fades with depth (blk.29's row
    // over the threshold on 29 of 128 rows, under a quarter), and final_norm was the
    // first tap the floor judged.
    let (code, r) = reference_with_fault(
        "blk.5.rope:scale=1.0005@0",
        "p6_len_128",
        "auto",
        &dir.path().join("one"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.5.q", 1));
    assert_eq!(introducing(&r), vec![5], "{}", r["replay"]);
}

#[test]
fn a_systematic_error_of_the_final_norm_alone_is_a_finding() {
    // The final norm 1.0004× too large from position 3 (its eps or weight wrong): 4e-4 on
    // every row from there, under the 1e-3 tolerance, while the residual stream is exact.
    // The floor rule covers the final norm as it covers the stream (an HF engine with the
    // final eps at 0.1 passed clean before it; docs/validation.md).
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = reference_with_fault("final_norm:scale=1.0004@3", "p6_len_128", "auto", &dir.path().join("w"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("final_norm", 3));
    assert_eq!(r["judged"], "noise_floor");
}

#[test]
fn a_systematic_error_below_tolerance_is_found_where_it_starts() {
    // RMSNorm eps 1e-6 instead of 1e-5 puts ~3e-4 on every norm of every layer: far
    // over the f32 noise floor (~1e-6), under the f32 tolerance (1e-3) until the head.
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = reference_with_fault("norm:eps=1e-6@0", "p6_len_128", "auto", &dir.path().join("w"));
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.attn_norm", 0));
    assert_eq!(r["judged"], "noise_floor");
    assert_eq!(introducing(&r), vec![0], "{}", r["replay"]);
    assert_over_f32_threshold(&r);

    // diff says the same of full dumps, and says why.
    let model = smollm2();
    let prompts = bisect_prompts();
    let dump = |name: &str, inject: &[&str]| {
        let out_dir = dir.path().join(name);
        let mut args = vec![
            "dump",
            "--model",
            path_str(&model),
            "--prompts",
            &prompts,
            "--id",
            "p6_len_128",
            "--layers",
            "0..4",
            "--taps",
            "all",
            "-o",
            path_str(&out_dir),
        ];
        args.extend_from_slice(inject);
        let out = resbisect(&args);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out_dir
    };
    let (a, b) = (dump("a", &["--inject", "norm:eps=1e-6@0"]), dump("b", &[]));
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at blk.0.attn_norm, position 0"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("judged against the noise floor"), "{}", out.stdout);
    // Judged by tolerance alone, a downstream tap is blamed, far from where it starts.
    let out = resbisect(&["diff", path_str(&a), path_str(&b), "--judge", "tolerance"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at blk.0.ffn_norm, position 34"),
        "{}",
        out.stdout
    );
    // On 32 tokens no residual-stream tap crosses tolerance: the error over the floor to
    // the last layer is still the finding, named where it starts. Judged by tolerance
    // alone, the stream's drift sends the search inside the layers, where blk.0.ffn_gate
    // crosses it on 3 rows from position 9: what `diff --judge tolerance` of full dumps
    // of every tap names (measured).
    let run =
        |judge: &str, work: &str| reference_with_fault("norm:eps=1e-6@0", "p6_len_32", judge, &dir.path().join(work));
    let (code, r) = run("auto", "w32");
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.attn_norm", 0));
    assert_eq!(r["judged"], "noise_floor");
    let (code, r) = run("tolerance", "w32-tolerance");
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.0.ffn_gate", 9));
    assert_eq!(r["judged"], "tolerance");
    assert_eq!(r["probes"][1]["purpose"], "inside-0-29", "{r}");
}

#[test]
fn a_crashed_or_unfinished_engine_never_passes_diff() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let m = path_str(&model);
    let b = dir.path().join("b");
    let out = resbisect(&[
        "dump",
        "--model",
        m,
        "--tokens",
        "5,6,7,8,9,10",
        "--layers",
        "all",
        "--taps",
        "all",
        "-o",
        path_str(&b),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let a = dir.path().join("a");
    let out = resbisect(&[
        "dump",
        "--engine",
        "runtime",
        "--model",
        m,
        "--tokens",
        "5,6,7,8,9,10",
        "--layers",
        "all",
        "--taps",
        "all",
        "--inject",
        "blk.3.attn_out:oob@2",
        "-o",
        path_str(&a),
    ]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    // What both dumps hold agrees, yet the comparison ends with the engine failure.
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("no divergence over"), "{}", out.stdout);
    assert!(
        out.stdout.contains("result: ENGINE FAILURE: engine A failed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("out-of-bounds") && out.stderr.contains("last tap written: blk.2.resid_post"),
        "{}",
        out.stderr
    );
    // The nightly path: the report and the trend say so too.
    let (report, history) = (dir.path().join("report"), dir.path().join("history.jsonl"));
    let nightly = |run: &str| {
        resbisect(&[
            "report",
            "diff",
            path_str(&a),
            path_str(&b),
            "-o",
            path_str(&report),
            "--history",
            path_str(&history),
            "--run",
            run,
        ])
    };
    let out = nightly("night-1");
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("engine failure"));
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("<title>resbisect: engine failure</title>"), "{html}");
    // A history edited by hand may lose its last newline: the next record starts its own line.
    let text = std::fs::read_to_string(&history).unwrap();
    std::fs::write(&history, text.trim_end()).unwrap();
    assert_eq!(nightly("night-2").code, 3);
    assert_eq!(std::fs::read_to_string(&history).unwrap().lines().count(), 2);
    let out = resbisect(&[
        "report",
        "trend",
        path_str(&history),
        "-o",
        path_str(&dir.path().join("trend")),
    ]);
    assert!(out.stdout.contains("**engine failed**"), "{}", out.stdout);
    // After kill -9 a manifest still says running: unfinished is a failure too.
    let manifest = a.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["status"] = "running".into();
    m["error"] = Value::Null;
    std::fs::write(&manifest, m.to_string()).unwrap();
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 3, "{}", out.stdout);
    assert!(
        out.stderr.contains("dump A is unfinished") && out.stderr.contains("last tap written: blk.2.resid_post"),
        "{}",
        out.stderr
    );
    // A killed engine may leave a damaged file too: still its failure, exit 3, not bad input.
    let file = a.join("data/prompt/blk.1.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("dump A is unfinished (status running); reading it:"),
        "{}",
        out.stderr
    );
    // Killed before its first write: nothing compared is never "no divergence".
    std::fs::remove_dir_all(a.join("data")).unwrap();
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stdout.contains("nothing compared") && !out.stdout.contains("no divergence"),
        "{}",
        out.stdout
    );
}

#[test]
fn an_engine_that_leaves_out_layers_cannot_pass_the_layer_search() {
    // An external engine that writes only layers below 10: the coarse probe's layers 16
    // and 29 are missing on its side, so no verdict on them may read as agreement. One
    // that leaves out the head (final_norm, logits), with a bug there, cannot pass either.
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_resbisect");
    let model = smollm2();
    let run = |command: &str, work: &str| {
        resbisect(&[
            "bisect",
            "--model",
            path_str(&model),
            "--prompts",
            &bisect_prompts(),
            "--id",
            "p6_len_32",
            "--engine",
            "external",
            "--command",
            command,
            "--work",
            path_str(&dir.path().join(work)),
        ])
    };
    let dump = format!(
        "{exe} dump --engine runtime --model {{model}} --tokens \"$(cat {{tokens}})\" --id {{prompt_id}} --positions {{positions}} -o {{out}}"
    );
    for (filter, rest, work, left_out) in [
        (
            "L=$(echo {layers} | tr , '\\n' | awk '$1 < 10' | paste -sd, -)",
            "--inject blk.14.ffn_out:scale=1.05@3 --layers ${L:-none} --taps {taps}",
            "w",
            "blk.16.resid_post, blk.29.resid_post",
        ),
        (
            "T=$(echo {taps} | tr , '\\n' | grep -v -e final_norm -e logits | paste -sd, -)",
            "--inject final_norm:scale=1.05@5 --layers {layers} --taps ${T:-embed}",
            "head",
            "final_norm, logits",
        ),
    ] {
        let out = run(&format!("{filter}; {dump} {rest}"), work);
        // A failure of engine A, reported as a crash is: the search so far and the dumps kept.
        assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("ENGINE A FAILED"), "{}", out.stdout);
        // It ran to its end: no "last tap written: none", as for an engine that wrote nothing.
        assert!(
            out.stdout
                .contains("the engine finished; its dump breaks the dump contract"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("wrote no {left_out} for the coarse probe")),
            "{}",
            out.stdout
        );
    }
}

/// Dump A as a copy of dump B (prompt `id`, files `stems`) with each file's positions and
/// f32 rows changed by `edit`: what an engine with a bug in its own bookkeeping writes.
fn rewrite(b: &Path, a: &Path, id: &str, stems: &[&str], edit: impl Fn(&mut Vec<usize>, &mut Vec<f32>, usize)) {
    let src = Dump::open(b).unwrap();
    let mut manifest: Manifest = src.manifest.clone();
    manifest.status = Status::Running;
    let mut w = DumpWriter::create(a, manifest, false).unwrap();
    for stem in stems {
        let f = src.read_file(id, stem).unwrap().unwrap();
        let mut taps = Vec::new();
        let mut positions = f.positions.clone();
        for (tap, rows) in &f.taps {
            let mut p = f.positions.clone();
            let mut values: Vec<f32> = rows.values.iter().map(|&v| v as f32).collect();
            edit(&mut p, &mut values, rows.width);
            positions = p;
            taps.push(TapTensor {
                id: tap.clone(),
                dtype: rows.dtype,
                rows: positions.len(),
                width: rows.width,
                bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
        }
        w.write_file(id, stem, &positions, &taps).unwrap();
    }
    w.finish(Status::Complete, None).unwrap();
}

fn reference_dump(dir: &Path, id: &str, layers: &str) -> std::path::PathBuf {
    let b = dir.join("b");
    let out = resbisect(&[
        "dump",
        "--model",
        path_str(&smollm2()),
        "--prompts",
        &bisect_prompts(),
        "--id",
        id,
        "--layers",
        layers,
        "--taps",
        "resid_post",
        "-o",
        path_str(&b),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    b
}

#[test]
fn non_finite_rows_show_as_such_and_each_layer_keeps_its_own_first_position() {
    let dir = tempfile::tempdir().unwrap();
    let b = reference_dump(dir.path(), "p6_len_32", "0,1");
    // One value of row 7 is +inf; row 9 holds a NaN.
    let a = dir.path().join("a");
    rewrite(&b, &a, "p6_len_32", &["blk.0", "blk.1"], |_, values, width| {
        values[7 * width + 3] = f32::INFINITY;
        values[9 * width + 5] = f32::NAN;
    });
    let out = resbisect(&["diff", path_str(&a), path_str(&b)]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("FIRST DIVERGENCE at blk.0.resid_post, position 7"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("rel_l2 inf  max_abs inf"), "{}", out.stdout);
    let out = resbisect(&["diff", path_str(&a), path_str(&b), "--json"]);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    let tap = &r["prompts"][0]["taps"][0];
    assert_eq!(
        (
            tap["rel_l2"][7].clone(),
            tap["rel_l2"][9].clone(),
            tap["max_abs"].clone()
        ),
        (Value::Null, Value::Null, Value::Null),
        "{tap}"
    );
    assert!(
        resbisect(&[
            "diff",
            path_str(&a),
            path_str(&b),
            "--report",
            path_str(&dir.path().join("r"))
        ])
        .code
            == 1
    );
    let md = std::fs::read_to_string(dir.path().join("r/report.md")).unwrap();
    assert!(md.contains("| inf | inf |") || md.contains("| inf | nan |"), "{md}");

    // A NaN at 77 in layer 13 leaks to earlier positions of later layers (0·NaN in masked
    // attention tiles): the coarse line gives each bad layer its own first position.
    let (code, r) = bisect(
        &[
            "--prompts",
            &bisect_prompts(),
            "--id",
            "p6_len_128",
            "--inject",
            "blk.13.attn_out:nan@77",
        ],
        &dir.path().join("w"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.13.attn_out", 77));
    // Later layers inherit the NaN: replayed from A's inputs, they see it through
    // attention, so only rows before the first non-finite input can accuse a layer.
    assert_eq!(introducing(&r), vec![13], "{}", r["replay"]);
    let coarse = r["probes"][0]["finding"].as_str().unwrap();
    assert_not_cut(&r);
    let d = Dump::open(Path::new(r["probes"][0]["dump_a"].as_str().unwrap())).unwrap();
    for l in [16, 29] {
        let f = d.read_file("p6_len_128", &format!("blk.{l}")).unwrap().unwrap();
        let rows = &f.taps[&format!("blk.{l}.resid_post")];
        let first_nan = (0..f.positions.len())
            .find(|&i| {
                rows.values[i * rows.width..(i + 1) * rows.width]
                    .iter()
                    .any(|v| !v.is_finite())
            })
            .unwrap();
        assert!(
            coarse.contains(&format!("{l} (from position {})", f.positions[first_nan])),
            "layer {l}: {coarse}"
        );
    }
}

#[test]
fn an_engine_that_ran_different_tokens_is_a_finding() {
    // Engines that ran another input than the 32 tokens they were given, each a kind of
    // reported bug: a doubled BOS; a prompt truncated to a context or batch size; an EOS
    // appended to the prompt; the head of a prompt dropped on context overflow; a token
    // dropped at a micro-batch edge by an engine whose manifest still lists the tokens it
    // was given (its rows from there on are the next token's, and it writes one row fewer).
    // The engine that ran other tokens is named against the tokens given: the oracle too,
    // or both engines alike.
    let exe = env!("CARGO_BIN_EXE_resbisect");
    let dump = |tokens: &str| {
        format!("{exe} dump --model {{model}} --id {{prompt_id}} --tokens \"{tokens}\" --layers {{layers}} --taps {{taps}} -o {{out}}")
    };
    let claim_given_tokens = "python3 -c \"import json, sys; p = sys.argv[1] + '/manifest.json'; m = json.load(open(p)); \
         m['prompts'][0]['tokens'] = [int(t) for t in open(sys.argv[2]).read().split(',')]; json.dump(m, open(p, 'w'))\" \
         {out} {tokens}";
    let (clean, truncated) = (dump("$(cat {tokens})"), dump("$(cut -d, -f1-20 {tokens})"));
    let a_is = |command: String| vec!["--engine".to_string(), "external".into(), "--command".into(), command];
    let b_is = |command: &str| {
        vec![
            "--oracle".to_string(),
            "external".into(),
            "--oracle-command".into(),
            command.into(),
        ]
    };
    let cases = [
        (
            "doubled-bos",
            a_is(dump("$(cut -d, -f1 {tokens}),$(cat {tokens})")),
            "position 1",
            Some(1),
        ),
        (
            "truncated",
            a_is(truncated.clone()),
            "engine A ran 20 tokens where it was given 32",
            None,
        ),
        (
            "eos-appended",
            a_is(dump("$(cat {tokens}),2")),
            "engine A ran 33 tokens where it was given 32",
            None,
        ),
        (
            "head-dropped",
            a_is(dump("$(cut -d, -f9- {tokens})")),
            "shifted by -8, a span of the prompt dropped",
            Some(-8),
        ),
        (
            "oracle-truncated",
            [a_is(clean.clone()), b_is(&truncated)].concat(),
            "engine B ran 20 tokens where it was given 32",
            None,
        ),
        (
            "both-truncated",
            [a_is(truncated.clone()), b_is(&truncated)].concat(),
            "engines A and B ran 20 tokens where they were given 32",
            None,
        ),
        (
            "dropped-hidden",
            a_is(format!(
                "{} && {claim_given_tokens}",
                dump("$(cut -d, -f1-16 {tokens}),$(cut -d, -f18- {tokens})")
            )),
            "",
            None,
        ),
    ];
    for (name, engines, says, shift) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--prompts".to_string(),
            bisect_prompts(),
            "--id".into(),
            "p6_len_32".into(),
        ];
        args.extend(engines);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, r) = bisect(&args, &dir.path().join("w"));
        assert_eq!(code, 1, "{name}: {r}");
        assert_eq!(r["outcome"], "diverged", "{name}");
        if name == "dropped-hidden" {
            // The same tokens by the manifest: the rows say it, shifted from position 16 on.
            assert_eq!(r["first"]["tap"], "embed", "{name}: {r}");
            assert_eq!(r["first"]["position"], 16, "{name}: {r}");
            assert_eq!(r["first"]["shift"], -1, "{name}: {r}");
            continue;
        }
        // The coarse probe's finding says what the engine ran.
        let findings = r["probes"].to_string();
        assert!(findings.contains(says), "{name}: {findings}");
        assert_eq!(
            r["token_mismatch"]["shift"],
            shift.map_or(Value::Null, Value::from),
            "{name}: {r}"
        );
        if name == "doubled-bos" {
            // Position 0 ran the same token in the same context: nothing diverges before it.
            assert_eq!(r["token_mismatch"]["position"], 1, "{r}");
            assert_eq!(r["first"], Value::Null);
        }
    }
}

#[test]
fn streamed_chunks_keep_a_token_mismatch_and_join_engines_that_write_every_row() {
    // Engines that run each prefix of a 300-token prompt anew (128, 256, then 300 tokens)
    // and write every row of it, more than a chunk asks for.
    let exe = env!("CARGO_BIN_EXE_resbisect");
    let tokens: Vec<String> = (0..300).map(|i| (100 + (7 * i) % 4000).to_string()).collect();
    let tokens = tokens.join(",");
    let dump = |tokens: &str, extra: &str| {
        format!("{exe} dump --engine runtime --model {{model}} --id {{prompt_id}} --tokens \"{tokens}\" --layers {{layers}} --taps {{taps}} {extra} -o {{out}}")
    };
    let run = |command: String| {
        let dir = tempfile::tempdir().unwrap();
        bisect(
            &["--tokens", &tokens, "--engine", "external", "--command", &command],
            &dir.path().join("w"),
        )
    };
    // A token dropped only in prompts shorter than 200 tokens (a bug of one batch size):
    // the first chunk shows it, and that ends the stream with the finding, though the
    // whole prompt would run as given.
    let short_drops = format!(
        "if [ \"$(tr , '\\n' < {{tokens}} | wc -l)\" -lt 200 ]; then T=\"$(cut -d, -f1-10 {{tokens}}),$(cut -d, -f12- {{tokens}})\"; \
         else T=\"$(cat {{tokens}})\"; fi; {}",
        dump("$T", "")
    );
    let (code, r) = run(short_drops);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["token_mismatch"]["position"], 10, "{r}");
    assert_eq!(r["token_mismatch"]["engine"], "A", "{r}");
    assert_eq!(r["token_mismatch"]["shift"], -1, "{r}");
    // A fault at 200: the second chunk diverges, and its rows 0..128 (the first chunk's
    // already) are not joined twice.
    let faulty = format!(
        "F=; [ \"$(tr , '\\n' < {{tokens}} | wc -l)\" -ge 200 ] && F='--inject blk.3.ffn_out:scale=1.05@200'; {}",
        dump("$(cat {tokens})", "$F")
    );
    let (code, r) = run(faulty);
    assert_eq!(code, 1, "{r}");
    assert_eq!(first(&r), ("blk.3.ffn_out", 200), "{r}");
}

#[test]
fn rows_written_one_position_late_are_named_as_a_shift() {
    let dir = tempfile::tempdir().unwrap();
    let b = reference_dump(dir.path(), "p6_len_32", "0,1");
    // A writes the row of position p at position p + 1 (its position counter is one ahead).
    let a = dir.path().join("a");
    rewrite(&b, &a, "p6_len_32", &["blk.0", "blk.1"], |positions, values, width| {
        positions.pop();
        positions.iter_mut().for_each(|p| *p += 1);
        values.truncate(positions.len() * width);
    });
    let out = resbisect(&["diff", path_str(&a), path_str(&b), "--json"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["prompts"][0]["first"]["shift"], 1, "{}", r["prompts"][0]["first"]);
    let report = dir.path().join("report");
    let out = resbisect(&["diff", path_str(&a), path_str(&b), "--report", path_str(&report)]);
    let shift = "A's rows equal B's shifted by +1 positions";
    assert!(out.stdout.contains(shift), "{}", out.stdout);
    // The reports say it too, not only the terminal.
    for file in ["report.md", "report.html"] {
        let text = std::fs::read_to_string(report.join(file)).unwrap();
        assert!(
            text.contains(shift) || text.contains("A&#39;s rows equal B&#39;s shifted by +1"),
            "{file}"
        );
    }
}

/// An f16 engine overflowing where the f32 reference holds values past f16's largest
/// (65504) is named as an f16 overflow, and the other way round a finite A is not.
#[test]
fn an_f16_overflow_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 5);
    let m = path_str(&model);
    // Both engines scale ffn_out by 1e6 from position 2: the reference's residual stream
    // passes 65504 there (4.5e5 on this model), the f16 runtime's turns infinite.
    let fault = "blk.0.ffn_out:scale=1e6@2";
    let dump = |name: &str, engine: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "dump",
            "--model",
            m,
            "--tokens",
            "1,2,3,4,5",
            "--inject",
            fault,
            "-o",
            path_str(&out),
        ];
        args.extend_from_slice(engine);
        let o = resbisect(&args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        out
    };
    let f16 = dump("f16", &["--engine", "runtime", "--dtype", "f16"]);
    let f32 = dump("f32", &["--engine", "reference"]);
    let o = resbisect(&["diff", path_str(&f16), path_str(&f32)]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stdout.contains("A is infinite at blk.0.resid_post@2")
            && o.stdout
                .contains("past f16's largest value (65504): an f16 overflow in A"),
        "{}",
        o.stdout
    );
    let o = resbisect(&["diff", path_str(&f32), path_str(&f16)]);
    assert!(o.stdout.contains("an f16 overflow in B"), "{}", o.stdout);
    let runtime_f32 = dump("runtime-f32", &["--engine", "runtime"]);
    let o = resbisect(&["diff", path_str(&runtime_f32), path_str(&f32)]);
    assert!(!o.stdout.contains("f16 overflow"), "{}", o.stdout);
}
