//! Truncated, corrupted and hostile GGUF files, models whose metadata and tensors
//! disagree, and bad selections: each is exit 2 with one clear line, never a panic.

use candle_core::quantized::gguf_file::Value;

use crate::util::*;

fn inspect_refused(path: &std::path::Path, needle: &str) {
    assert_refused(&resbisect(&["inspect", path_str(path)]), needle);
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

#[test]
fn truncated_and_corrupted_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 1);
    let bytes = std::fs::read(&model).unwrap();

    let cut = dir.path().join("cut.gguf");
    for len in [0, 3, 20, 1000, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let out = resbisect(&["inspect", path_str(&cut)]);
        assert_eq!(out.code, 2, "truncated at {len}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
    }
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    inspect_refused(&cut, "runs past the end of the file");

    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    std::fs::write(&cut, &bad).unwrap();
    inspect_refused(&cut, "not a GGUF file");

    let mut bad = bytes.clone();
    bad[4..8].copy_from_slice(&9u32.to_le_bytes());
    std::fs::write(&cut, &bad).unwrap();
    inspect_refused(&cut, "unsupported GGUF version 9");
}

#[test]
fn hostile_lengths_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hostile.gguf");

    std::fs::write(&p, header(0, u64::MAX)).unwrap();
    inspect_refused(&p, "more than the file can hold");

    let mut b = header(0, 1);
    b.extend((1u64 << 62).to_le_bytes()); // key length
    b.extend([b'k'; 64]);
    std::fs::write(&p, &b).unwrap();
    inspect_refused(&p, "truncated?");

    let mut b = header(0, 1);
    b.extend(1u64.to_le_bytes());
    b.extend(b"a");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(4u32.to_le_bytes()); // of u32
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 64]);
    std::fs::write(&p, &b).unwrap();
    inspect_refused(&p, "array claims");

    let mut b = header(0, 1);
    b.extend(1u64.to_le_bytes());
    b.extend(b"a");
    b.extend(77u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    inspect_refused(&p, "unknown metadata value type 77");

    // A tensor whose dims multiply past u64.
    let mut b = header(1, 0);
    b.extend(1u64.to_le_bytes());
    b.extend(b"t");
    b.extend(2u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    inspect_refused(&p, "overflow");
}

#[test]
fn metadata_and_tensors_that_disagree_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f16", 2);
    let bad = dir.path().join("bad.gguf");
    let all = |n: &str| Some(n.to_string());

    // The original failure class: the scheduler's layer count is not the model's.
    rewrite_gguf(&model, &bad, |m| set_meta(m, "llama.block_count", Value::U32(3)), all);
    inspect_refused(
        &bad,
        "missing tensor blk.2.attn_norm.weight (block_count says 3 layers)",
    );

    rewrite_gguf(&model, &bad, |m| set_meta(m, "llama.block_count", Value::U32(1)), all);
    inspect_refused(&bad, "belongs to layer 1 but block_count is 1");

    rewrite_gguf(
        &model,
        &bad,
        |_| {},
        |n| (n != "blk.1.ffn_down.weight").then(|| n.to_string()),
    );
    inspect_refused(&bad, "missing tensor blk.1.ffn_down.weight");

    rewrite_gguf(
        &model,
        &bad,
        |_| {},
        |n| {
            Some(match n {
                "blk.0.attn_q.weight" => "blk.0.attn_k.weight".into(),
                "blk.0.attn_k.weight" => "blk.0.attn_q.weight".into(),
                other => other.into(),
            })
        },
    );
    inspect_refused(
        &bad,
        "tensor blk.0.attn_q.weight has shape [256, 128], expected [256, 256]",
    );

    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "llama.attention.head_count", Value::U32(5)),
        all,
    );
    inspect_refused(&bad, "embedding_length 256 is not divisible by head_count 5");

    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "llama.attention.head_count_kv", Value::U32(3)),
        all,
    );
    inspect_refused(&bad, "head_count 4 is not a multiple of head_count_kv 3");

    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "llama.rope.dimension_count", Value::U32(32)),
        all,
    );
    inspect_refused(&bad, "partial RoPE is not supported");

    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "general.architecture", Value::String("mamba".into())),
        all,
    );
    inspect_refused(&bad, "architecture \"mamba\" is not supported");

    rewrite_gguf(&model, &bad, |m| m.retain(|(k, _)| k != "llama.embedding_length"), all);
    inspect_refused(&bad, "metadata key llama.embedding_length is missing");

    // Context too short for the prompt: refused before any compute.
    rewrite_gguf(
        &model,
        &bad,
        |m| set_meta(m, "llama.context_length", Value::U32(8)),
        all,
    );
    let out_dir = dir.path().join("dump");
    let out = resbisect(&[
        "dump",
        "--model",
        path_str(&bad),
        "--tokens",
        "1,2,3,4,5,6,7,8,9",
        "-o",
        path_str(&out_dir),
    ]);
    assert_refused(&out, "--tokens: 9 tokens exceed the model's context of 8");
    assert!(!out_dir.exists(), "nothing is written for a refused run");
}

/// `resbisect dump --model model -o out` with `extra` arguments.
fn dump_to(model: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["dump", "--model", model, "-o", out];
    args.extend_from_slice(extra);
    resbisect(&args)
}

#[test]
fn bad_selections_and_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 3);
    let m = path_str(&model);
    let o = dir.path().join("out");
    let o = path_str(&o);
    let dump = |extra: &[&str]| dump_to(m, o, extra);
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--taps", "resid_pots"]),
        "unknown tap \"resid_pots\"",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--engine", "runtime", "--twin"]),
        "--profile and --twin are reference options",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--twin"]),
        "--twin needs a rounding --profile",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--backend", "cuda"]),
        "--backend, --max-tokens, --prefill-chunk, --sync-check, --warmup and --weights are runtime options",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--taps", "resid_post,ffn_post_norm"]),
        "this llama model has no ffn_post_norm tap",
    );
    assert_refused(&dump(&["--tokens", "1,,2"]), "bad token id");
    assert_refused(&dump(&["--tokens", "1,2", "--id", "../escape"]), "bad prompt id");
    assert_refused(
        &dump(&["--tokens", "1,2", "--dtype", "f16"]),
        "the reference computes in f32 or f64",
    );

    let suite = dir.path().join("suite.jsonl");
    for (content, needle) in [
        (
            "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"a\", \"text\": \"y\"}\n",
            "appears twice",
        ),
        ("{\"id\": \"a/b\", \"text\": \"x\"}\n", "bad prompt id"),
        ("{\"id\": \"a\"}\n", "needs text or tokens"),
        ("{\"id\": \"a\", \"text\": \"x\"\n", "suite.jsonl:1"),
        ("\n\n", "no prompts"),
    ] {
        std::fs::write(&suite, content).unwrap();
        assert_refused(&dump(&["--prompts", path_str(&suite)]), needle);
    }
    assert_refused(
        &dump(&["--prompts", "/nonexistent/suite.jsonl"]),
        "/nonexistent/suite.jsonl",
    );
    assert_refused(
        &resbisect(&["inspect", "/nonexistent/model.gguf"]),
        "/nonexistent/model.gguf: no such file or directory",
    );
    assert_refused(&resbisect(&["synth", "--preset", "huge", "-o", o]), "unknown preset");
    assert_refused(
        &resbisect(&["synth", "--preset", "tiny", "--quant", "q9_9", "-o", o]),
        "unknown quant type",
    );
}

/// Selection and prompt errors name the flag at fault and exit 2.
#[test]
fn selection_and_prompt_errors_name_the_flag_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 3);
    let m = path_str(&model);
    let o = dir.path().join("out");
    let o = path_str(&o);
    let dump = |extra: &[&str]| dump_to(m, o, extra);
    // Each error names the flag at fault, and a range's end is exclusive (2..3 fits 3
    // tokens, 2..4 does not).
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--layers", "0..32"]),
        "--layers: layer selection \"0..32\" goes past the model's 2 layers",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--layers", "1..1"]),
        "--layers: empty layer range",
    );
    // A negative value is the option's value, named by its own check, not an unknown flag.
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--layers", "-1"]),
        "--layers: bad layer \"-1\": expected a non-negative integer",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--max-tokens", "-3"]),
        "'--max-tokens <MAX_TOKENS>'",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--positions", "2..4"]),
        "--positions 2..4: outside the prompt's 3 tokens (positions 0..3; a range's end is exclusive)",
    );
    // A range empty whatever the prompt's length is named as such, as --layers does.
    for empty in ["2..1", "1..1", "-1..-3"] {
        assert_refused(
            &dump(&["--tokens", "1,2,3", "--positions", empty]),
            &format!("empty position range \"{empty}\""),
        );
    }
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--positions", "0,-5.."]),
        "--positions -5..: outside the prompt's 3 tokens",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--positions", "5000"]),
        "--positions 5000: outside the prompt's 3 tokens",
    );
    assert_refused(
        &dump(&[
            "--tokens",
            "1,2,3",
            "--engine",
            "runtime",
            "--max-tokens",
            "2",
            "--positions",
            "5",
        ]),
        "--positions 5: outside the prompt's 3 tokens and 2 generated (positions 0..5;",
    );
    assert_refused(
        &dump(&["--tokens", "1,2,3", "--positions", "x..y"]),
        "--positions: bad position \"x..y\"",
    );
    assert_refused(&dump(&["--tokens", "1,2,3", "--taps", "nope"]), "--taps: unknown tap");
    assert_refused(
        &dump(&["--tokens", "1,99999"]),
        "--tokens: token id 99999 is outside the vocabulary",
    );
    assert_refused(
        &resbisect(&["run", "--model", m, "--tokens", "1,99999"]),
        "--tokens: token id 99999 is outside the vocabulary",
    );
    let suite = dir.path().join("suite.jsonl");
    // In a suite, the prompt at fault is named by its id.
    std::fs::write(
        &suite,
        "{\"id\": \"p1\", \"tokens\": [1, 2]}\n{\"id\": \"p2\", \"tokens\": [1, 99999]}\n",
    )
    .unwrap();
    let s = path_str(&suite);
    assert_refused(
        &dump(&["--prompts", s]),
        &format!("{s}: prompt p2: token id 99999 is outside the vocabulary"),
    );
    assert_refused(
        &dump(&["--prompts", s, "--id", "p1", "--positions", "2"]),
        "--positions 2: outside prompt p1's 2 tokens",
    );
    assert_refused(&dump(&["--prompts", s, "--id", "p9"]), "--id p9: no such prompt in");
    // The end is exclusive: 0..3 is every position of 3 tokens.
    let ok = dump(&["--tokens", "1,2,3", "--positions", "0..3"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
}

/// A bisect option for an engine that was not chosen is refused, never silently ignored:
/// `--command` without `--engine external` would run the runtime and report it clean.
#[test]
fn bisect_options_for_engines_not_chosen_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 3);
    let bisect = |extra: &[&str]| {
        let mut args = vec!["bisect", "--model", path_str(&model), "--tokens", "1,2,3"];
        args.extend_from_slice(extra);
        resbisect(&args)
    };
    for (extra, needle) in [
        (&["--command", "x"][..], "--command applies only with --engine external"),
        (
            &[
                "--engine",
                "external",
                "--command",
                "x",
                "--inject",
                "blk.0.q:scale=2@0",
            ],
            "--inject applies only with --engine runtime or reference",
        ),
        (
            &["--engine", "external", "--command", "x", "--dtype", "f16"],
            "--dtype applies only",
        ),
        (
            &["--oracle-command", "x"],
            "--oracle-command applies only with --oracle external",
        ),
        (
            &["--engine", "reference", "--weights", "dequant"],
            "--weights applies only with --engine runtime",
        ),
        (
            &["--oracle-dtype", "f16"],
            "--oracle-dtype applies only with --oracle runtime",
        ),
        (&["--engine", "external"], "--command for A"),
        (
            &["--engine-timeout", "5s"],
            "--engine-timeout applies only with --engine external or --oracle external",
        ),
        (
            &["--engine", "reference", "--dtype", "f32x", "--reference-dtype", "f64"],
            "--dtype: the reference computes in f32 or f64, not \"f32x\"",
        ),
        (
            &["--engine", "reference", "--dtype", "f64"],
            "A computes in --reference-dtype (f32); drop --dtype f64",
        ),
    ] {
        assert_refused(&bisect(extra), needle);
    }
    // The reference against itself in f64, --dtype left at its default: no conflict.
    let ok = bisect(&[
        "--engine",
        "reference",
        "--reference-dtype",
        "f64",
        "--work",
        path_str(&dir.path().join("w")),
    ]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
}

/// An external engine that exits 2 refused its options or input (the usage error of
/// resbisect's own contract and of argparse): bisect exits 2, not 3, and the log it names
/// is still there.
#[test]
fn an_external_engine_refusing_its_input_is_a_usage_error_with_its_log_kept() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 3);
    let out = resbisect(&[
        "bisect",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2,3",
        "--engine",
        "external",
        "--command",
        "echo {out}: unknown option --frobnicate >&2; exit 2",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let error = out.stderr.lines().last().unwrap_or_default();
    // The engine is named by its program and knobs, so A can be told from B.
    assert!(
        error.starts_with("error: external echo unknown option --frobnicate")
            && error.contains("refused its input (exit 2)"),
        "{}",
        out.stderr
    );
    let log = error.rsplit("(log: ").next().unwrap().trim_end_matches(')');
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(text.contains("unknown option --frobnicate"), "{text}");
    let _ = std::fs::remove_dir_all(std::path::Path::new(log).parent().unwrap().parent().unwrap());
    // A command that does not exist is bad input too, not an engine crash.
    let out = resbisect(&[
        "bisect",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2,3",
        "--engine",
        "external",
        "--command",
        "/nonexistent/engine --out {out}",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let error = out.stderr.lines().last().unwrap_or_default();
    assert!(
        error.starts_with("error: external /nonexistent/engine: the command could not run (shell exit 127)"),
        "{}",
        out.stderr
    );
}

/// An output path that is one of the command's inputs, or lies inside an input dump, is
/// refused before anything is written; so is a `synth` over an existing file.
#[test]
fn outputs_never_overwrite_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 2);
    let dump = dir.path().join("d");
    let o = resbisect(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2,3",
        "-o",
        path_str(&dump),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let manifest = dump.join("manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let model_bytes = std::fs::read(&model).unwrap();
    let d = path_str(&dump);
    assert_refused(
        &resbisect(&["calibrate", d, d, "-o", path_str(&manifest)]),
        "that is inside the input",
    );
    let history = dump.join("history.jsonl");
    let report = dir.path().join("report");
    let with_history = |h: &std::path::Path| {
        resbisect(&[
            "report",
            "diff",
            d,
            d,
            "-o",
            path_str(&report),
            "--history",
            path_str(h),
        ])
    };
    assert_refused(&with_history(&history), "--history");
    assert_refused(
        &resbisect(&["model-info", path_str(&model), "-o", path_str(&model)]),
        "that is the input",
    );
    assert_refused(
        &resbisect(&["synth", "--preset", "tiny", "-o", path_str(&manifest)]),
        "exists; synth writes a new file",
    );
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    assert_eq!(std::fs::read(&model).unwrap(), model_bytes);
    assert!(!history.exists());
    // A report directory that cannot be one is named before any work.
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "mine").unwrap();
    let f = path_str(&file);
    assert_refused(&resbisect(&["diff", d, d, "--report", f]), "--report");
    // The probes fill the work directory; a report directory in it (or it) is refused.
    let work = dir.path().join("w");
    for report in [work.join("rep"), work.clone()] {
        let args = ["bisect", "--model", path_str(&model), "--tokens", "1,2,3"];
        let mut args = args.to_vec();
        args.extend(["--work", path_str(&work), "--report", path_str(&report)]);
        assert_refused(&resbisect(&args), "overlaps --work");
        assert!(!work.exists());
    }
    let m = path_str(&model);
    assert_refused(
        &resbisect(&["bisect", "--model", m, "--tokens", "1,2,3", "--report", f]),
        "--report",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // A hard link is the same file under another name.
    let alias = dir.path().join("alias.gguf");
    std::fs::hard_link(&model, &alias).unwrap();
    assert_refused(
        &resbisect(&["model-info", m, "-o", path_str(&alias)]),
        "that is the input",
    );
    // A history is appended to only when it is one: not a model, not a text file.
    for not_history in [&alias, &file] {
        assert_refused(&with_history(not_history), "not a resbisect history");
    }
    assert_eq!(std::fs::read(&model).unwrap(), model_bytes);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // --overwrite replaces a dump's files: inputs kept inside it would go with them.
    let suite = dump.join("data/suite.jsonl");
    std::fs::write(&suite, "{\"id\": \"p\", \"tokens\": [1, 2, 3]}\n").unwrap();
    let inner_model = dump.join("data/model.gguf");
    std::fs::copy(&model, &inner_model).unwrap();
    for (model, input) in [
        (m, ["--prompts", path_str(&suite)]),
        (path_str(&inner_model), ["--tokens", "1,2"]),
    ] {
        assert_refused(
            &resbisect(&["dump", "--model", model, input[0], input[1], "-o", d, "--overwrite"]),
            "lies inside it, and replacing the dump would delete it",
        );
    }
    assert!(suite.exists() && inner_model.exists());
    // An option that only works with another, or a value out of range, names itself.
    assert_refused(
        &resbisect(&["report", "diff", d, d, "-o", path_str(&report), "--run", "x"]),
        "--history",
    );
    let tolerances = dir.path().join("t.json");
    let tolerances = path_str(&tolerances);
    for (flag, value) in [("--floor", "-1"), ("--abs-floor", "NaN"), ("--margin", "0.5")] {
        assert_refused(
            &resbisect(&["calibrate", d, d, "-o", tolerances, &format!("{flag}={value}")]),
            &format!("{flag} {value}: must be"),
        );
    }
    // A value that starts with a hyphen is the option's value, named by its own check.
    assert_refused(
        &resbisect(&["calibrate", d, d, "-o", tolerances, "--floor", "-1e-3"]),
        "--floor -0.001: must be",
    );
}

/// Counts that would overflow or never end, a parser error, a manifest that is a FIFO,
/// and an option of the oracle: each one line naming the flag or file, exit 2, at once.
#[test]
fn counts_parser_errors_and_special_files_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 2);
    let m = path_str(&model);
    let out_dir = dir.path().join("out");
    let out = path_str(&out_dir);
    let huge = u64::MAX.to_string();
    let runtime_dump = |extra: &[&str]| {
        let mut args = vec![
            "dump", "--engine", "runtime", "--model", m, "--tokens", "1,2,3", "-o", out,
        ];
        args.extend_from_slice(extra);
        resbisect(&args)
    };
    assert_refused(&runtime_dump(&["--max-tokens", &huge]), "--max-tokens");
    assert_refused(&runtime_dump(&["--warmup", &huge]), "--warmup");
    assert_refused(
        &runtime_dump(&["--prefill-chunk", "0"]),
        "--prefill-chunk <PREFILL_CHUNK>': must be 1 or more",
    );
    assert_refused(
        &runtime_dump(&["--max-tokens", "-1"]),
        "--max-tokens <MAX_TOKENS>': must be 0 or more",
    );
    assert_refused(
        &runtime_dump(&["--warmup", "1.5"]),
        "--warmup <WARMUP>': not a whole number",
    );
    assert_refused(
        &runtime_dump(&["--warmup", "99999999999999999999"]),
        "--warmup <WARMUP>': too large (at most 18446744073709551615)",
    );
    assert_refused(
        &runtime_dump(&["--prefill-chunk", "-0"]),
        "--prefill-chunk <PREFILL_CHUNK>': must be 1 or more",
    );
    // An empty value lists no possible values (a path option has none).
    let empty = resbisect(&["dump", "--model", "", "--tokens", "1", "-o", out]);
    assert_refused(&empty, "a value is required for '--model <MODEL>'");
    assert!(!empty.stderr.contains("possible values"), "{}", empty.stderr);
    // An enum option's values are on the one line.
    assert_refused(
        &runtime_dump(&["--backend", "gpu"]),
        "'--backend <BACKEND>' (possible values: cpu, cuda, hip)",
    );
    assert_refused(
        &resbisect(&["run", "--model", m, "--tokens", "1,2", "--max-tokens", &huge]),
        "--max-tokens",
    );
    // Parser errors: clap's usage and tip lines are left out.
    assert_refused(&resbisect(&["dump", "--tokens", "1"]), "--model");
    assert_refused(&runtime_dump(&["--warmup", "many"]), "--warmup");
    // An option that takes hyphen-led values, its value left out, is named: not the
    // next option's value, leaving a stray argument behind.
    assert_refused(
        &runtime_dump(&["--positions", "--taps", "all"]),
        "a value is required for '--positions' (found the option '--taps' instead)",
    );
    let work = dir.path().join("work");
    let bisect = |extra: &[&str]| {
        let mut args = vec![
            "bisect", "--model", m, "--tokens", "1,2,3,4", "--oracle", "runtime", "--work",
        ];
        args.push(path_str(&work));
        args.extend_from_slice(extra);
        resbisect(&args)
    };
    assert_refused(&bisect(&["--oracle-prefill-chunk", "0"]), "--oracle-prefill-chunk");
    assert!(!work.exists(), "a refused bisect leaves no work folder");
    // A limit past what the clock can count is no limit: the engine's failure is the
    // answer (exit 3), not an overflow.
    let failing = [
        "--engine",
        "external",
        "--command",
        ": {out}; exit 1",
        "--engine-timeout",
        "300000000000y",
    ];
    let o = bisect(&failing);
    assert_eq!(o.code, 3, "{}", o.stderr);
    let negative = [
        "--engine",
        "external",
        "--command",
        ": {out}",
        "--engine-timeout",
        "-1s",
    ];
    assert_refused(&bisect(&negative), "for '--engine-timeout <ENGINE_TIMEOUT>'");
    // A FIFO would block the read for ever.
    let dump = dir.path().join("d");
    let o = resbisect(&["dump", "--model", m, "--tokens", "1,2,3", "-o", path_str(&dump)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let manifest = dump.join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&manifest).status().unwrap();
    assert!(made.success());
    assert_refused(&resbisect(&["inspect", path_str(&dump)]), "not a regular file");
    // The reference's note on its GEMM comes only once the input is known good.
    let no_blas = [("RESBISECT_BLAS", "off")];
    let reference_dump = |id: &str, out: &str| {
        resbisect_with(
            &no_blas,
            &["dump", "--model", m, "--tokens", "1,2", "--id", id, "-o", out],
        )
    };
    assert_refused(&reference_dump("../escape", out), "bad prompt id");
    assert_refused(&reference_dump("p", path_str(&dump)), "output directory exists");
}

/// A path of the wrong kind (a directory where a file is read or written, a file where a
/// directory is, a file inside a file) is refused in one line naming its option, before
/// any work; a directory that is not a dump says what it lacks.
#[test]
fn path_options_of_the_wrong_kind_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 2);
    let m = path_str(&model);
    let a_dir = dir.path().join("adir");
    std::fs::create_dir(&a_dir).unwrap();
    let d = path_str(&a_dir);
    let file = dir.path().join("afile");
    std::fs::write(&file, "").unwrap();
    let f = path_str(&file);
    let inside = file.join("x");
    let inside = path_str(&inside);
    let dump = dir.path().join("dump");
    let o = resbisect(&["dump", "--model", m, "--tokens", "1,2,3", "-o", path_str(&dump)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let dp = path_str(&dump);
    let tokens = ["--tokens", "1,2,3"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["dump", "--model", d, "-o", inside], "--model"),
        (vec!["dump", "--model", m, "--prompts", d, "-o", inside], "--prompts"),
        (vec!["dump", "--model", m, "--tokens", "1", "-o", f], "--output"),
        (
            vec!["dump", "--model", m, "--tokens", "1", "-o", inside],
            "afile is a file, not a directory",
        ),
        (vec!["diff", dp, dp, "--tolerances", d], "--tolerances"),
        (vec!["diff", dp, dp, "--report", f], "--report"),
        (vec!["diff", dp, f], "<B>"),
        (vec!["calibrate", dp, dp, "-o", d], "--output"),
        (vec!["model-info", m, "-o", d], "--out"),
        (vec!["report", "trend", d, "-o", inside], "<HISTORY>"),
        (
            vec!["bisect", "--model", m, tokens[0], tokens[1], "--work", f],
            "--work",
        ),
        (vec!["cut", "--model", m, "--layers", "1", "-o", d], "--output"),
    ];
    for (args, needle) in cases {
        let out = resbisect(&args);
        assert_refused(&out, needle);
    }
    assert!(!dir.path().join("afile").is_dir());
    // A directory without a manifest is not a dump, and says why.
    assert_refused(&resbisect(&["diff", d, dp]), "not a dump (no manifest.json in it)");
    // The demo refuses a bad suite before its banner, so the error is the one line.
    let suite = dir.path().join("suite.jsonl");
    std::fs::write(&suite, "{\"id\": \"x\"}\n").unwrap();
    let demo_out = dir.path().join("demo");
    assert_refused(
        &resbisect(&["demo", "--prompts", path_str(&suite), "-o", path_str(&demo_out)]),
        "a prompt needs text or tokens",
    );
}

/// An output replaces only what resbisect wrote there before: a tolerance or model-info
/// file, the report files of a report directory, a dump's own files. Anything else of
/// the user's at the path (a model, notes, a symlinked file) is refused or left untouched.
#[test]
fn outputs_replace_only_what_resbisect_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let model = tiny_model(dir.path(), "f32", 2);
    let dump = at("d");
    let (m, d) = (path_str(&model), path_str(&dump));
    let o = resbisect(&["dump", "--model", m, "--tokens", "1,2,3", "-o", d]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mine = at("notes.txt");
    std::fs::write(&mine, "mine").unwrap();
    let other_model = at("other.gguf");
    std::fs::copy(&model, &other_model).unwrap();
    let model_bytes = std::fs::read(&model).unwrap();
    // Single files: refused over a file of another kind, replaced over their own kind.
    let link = at("link.json");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    for target in [&other_model, &mine, &link] {
        let t = path_str(target);
        assert_refused(
            &resbisect(&["calibrate", d, d, "-o", t]),
            &format!("--output {t}: exists and is not a tolerance file"),
        );
        assert_refused(
            &resbisect(&["model-info", m, "-o", t]),
            &format!("--out {t}: exists and is not a model-info file"),
        );
    }
    // A dump against itself differs nowhere: no pair to calibrate on.
    assert_refused(
        &resbisect(&["calibrate", d, d, "-o", path_str(&at("t.json"))]),
        "is paired with itself",
    );
    let runtime = at("r");
    let r = path_str(&runtime);
    let o = resbisect(&[
        "dump", "--engine", "runtime", "--model", m, "--tokens", "1,2,3", "-o", r,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for args in [
        vec!["calibrate", r, d, "-o", path_str(&at("t.json"))],
        vec!["model-info", m, "-o", path_str(&at("info.json"))],
    ] {
        for _ in 0..2 {
            let o = resbisect(&args);
            assert_eq!(o.code, 0, "{:?}: {}", args, o.stderr);
        }
    }
    // A symlink to an earlier output is replaced by the file; what it pointed to stays.
    let info_link = at("info-link.json");
    std::os::unix::fs::symlink(at("info.json"), &info_link).unwrap();
    let info_before = std::fs::read(at("info.json")).unwrap();
    let o = resbisect(&["model-info", m, "-o", path_str(&info_link)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!info_link.symlink_metadata().unwrap().is_symlink());
    assert_eq!(std::fs::read(at("info.json")).unwrap(), info_before);
    // Report directories: refused when they hold a file of the user's; their own files
    // replaced, a symlinked report file replaced without writing through it.
    let user_dir = at("home");
    std::fs::create_dir(&user_dir).unwrap();
    std::fs::copy(&mine, user_dir.join("notes.txt")).unwrap();
    let u = path_str(&user_dir);
    let history = at("history.jsonl");
    let h = path_str(&history);
    for args in [
        vec!["diff", d, d, "--report", u],
        vec!["report", "diff", d, d, "-o", u],
        vec!["bisect", "--model", m, "--tokens", "1,2,3", "--report", u],
    ] {
        assert_refused(
            &resbisect(&args),
            &format!("{u}: holds \"notes.txt\", which resbisect does not write"),
        );
    }
    let reports = at("reports");
    let r = path_str(&reports);
    let o = resbisect(&["report", "diff", d, d, "-o", r, "--history", h]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_refused(
        &resbisect(&["report", "trend", h, "-o", u]),
        "which resbisect does not write",
    );
    std::fs::remove_file(reports.join("report.md")).unwrap();
    std::os::unix::fs::symlink(&mine, reports.join("report.md")).unwrap();
    for args in [vec!["diff", d, d, "--report", r], vec!["report", "trend", h, "-o", r]] {
        let o = resbisect(&args);
        assert_eq!(o.code, 0, "{:?}: {}", args, o.stderr);
    }
    assert!(std::fs::read_to_string(reports.join("report.md"))
        .unwrap()
        .contains('#'));
    assert!(reports.join("trend.html").is_file());
    assert_eq!(std::fs::read_dir(&user_dir).unwrap().count(), 1);
    // A dump is replaced only when its data/ holds nothing a dump does not write.
    let kept = at("d/data/notes.txt");
    std::fs::copy(&mine, &kept).unwrap();
    let replace = ["dump", "--model", m, "--tokens", "1,2", "-o", d, "--overwrite"];
    assert_refused(
        &resbisect(&replace),
        "not part of a dump, and replacing the dump would delete it",
    );
    std::fs::remove_file(&kept).unwrap();
    let prompt_dir = std::fs::read_dir(at("d/data")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&mine, prompt_dir.join("notes.txt")).unwrap();
    assert_refused(&resbisect(&replace), "notes.txt: not part of a dump");
    std::fs::remove_file(prompt_dir.join("notes.txt")).unwrap();
    let o = resbisect(&replace);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "mine");
    assert_eq!(std::fs::read(&other_model).unwrap(), model_bytes);
    // A manifest.json that is no dump's makes no dump of its directory; a data/ that is
    // a file is refused before anything is removed.
    let webapp = at("webapp");
    std::fs::create_dir_all(webapp.join("data/ckpt")).unwrap();
    std::fs::write(webapp.join("manifest.json"), r#"{"name": "app"}"#).unwrap();
    std::fs::write(webapp.join("data/ckpt/model.safetensors"), "weights").unwrap();
    let w = path_str(&webapp);
    assert_refused(
        &resbisect(&["dump", "--model", m, "--tokens", "1,2", "-o", w, "--overwrite"]),
        "its manifest.json is no resbisect dump's",
    );
    assert!(webapp.join("data/ckpt/model.safetensors").is_file() && webapp.join("manifest.json").is_file());
    std::fs::remove_dir_all(dump.join("data")).unwrap();
    std::fs::write(dump.join("data"), "mine").unwrap();
    assert_refused(&resbisect(&replace), "data: not part of a dump");
    assert!(dump.join("manifest.json").is_file());
    // What cannot be a file of resbisect's is refused without being read (a FIFO would
    // block), and an output directory that cannot be written before any work.
    let fifo = at("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    assert_refused(
        &resbisect(&["model-info", m, "-o", path_str(&fifo)]),
        "is not a model-info file",
    );
    let f = path_str(&fifo);
    assert_refused(&resbisect(&["calibrate", d, d, "-o", f]), "is not a tolerance file");
    assert_refused(
        &resbisect(&["calibrate", d, d, "-o", path_str(&at("nowhere/t.json"))]),
        "--output",
    );
}

/// A dump's files get the mode a new file gets (0666 less the umask), whichever engine
/// wrote them: a library writer's private temporary file (0600) is not left behind.
#[test]
fn dump_files_are_readable_as_any_new_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 2);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    let umask = u32::from_str_radix(umask["Umask:".len()..].trim(), 8).unwrap();
    for engine in ["reference", "runtime"] {
        let out = dir.path().join(engine);
        let o = resbisect(&[
            "dump",
            "--engine",
            engine,
            "--model",
            path_str(&model),
            "--tokens",
            "1,2",
            "-o",
            path_str(&out),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        for file in std::fs::read_dir(out.join("data/prompt")).unwrap() {
            let mode = file.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o666 & !umask, "{engine}: mode {mode:o}");
        }
    }
}

/// A file read for an option that is bad names the option before the file; a field of
/// it that is bad is named by its place; a path holding a line break or a terminal escape
/// is shown escaped, so the error stays on one line.
#[test]
fn errors_in_files_name_the_option_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let model = tiny_model(dir.path(), "f32", 2);
    let m = path_str(&model);
    let junk = at("junk.txt");
    std::fs::write(&junk, "junk").unwrap();
    let j = path_str(&junk);
    let out = at("out");
    let o = path_str(&out);
    for args in [
        vec!["dump", "--model", j, "--tokens", "1", "-o", o],
        vec!["bisect", "--model", j, "--tokens", "1,2"],
        vec!["tokenize", "--model", j, "hi"],
        vec!["run", "--model", j, "--tokens", "1"],
    ] {
        assert_refused(&resbisect(&args), "--model ");
        assert_refused(&resbisect(&args), "junk.txt: not a GGUF file");
    }
    let demo = resbisect(&["demo", "--model", j, "--output", o]);
    assert_refused(&demo, "junk.txt: not a GGUF file");
    assert_refused(&demo, "--model ");
    assert!(
        !demo.stderr.contains("demo:"),
        "the banner came before the refusal: {}",
        demo.stderr
    );
    let suite = at("suite.jsonl");
    let s = path_str(&suite);
    for (line, needle) in [
        ("{bad", "--prompts "),
        (
            r#"{"id": "p", "tokens": [1, -2]}"#,
            "suite.jsonl:1: tokens[1] is -2; a token id is 0 or more",
        ),
        (r#"{"id": "p", "tokens": [1, 4294967296]}"#, "tokens[1] is 4294967296"),
    ] {
        std::fs::write(&suite, format!("{line}\n")).unwrap();
        assert_refused(&resbisect(&["dump", "--model", m, "--prompts", s, "-o", o]), needle);
    }
    let dump = at("d");
    let d = path_str(&dump);
    assert_eq!(resbisect(&["dump", "--model", m, "--tokens", "1,2", "-o", d]).code, 0);
    let tolerances = at("t.json");
    std::fs::write(&tolerances, "{bad").unwrap();
    let t = path_str(&tolerances);
    assert_refused(&resbisect(&["diff", d, d, "--tolerances", t]), "--tolerances ");
    assert_refused(
        &resbisect(&["bisect", "--model", m, "--tokens", "1,2", "--tolerances", t]),
        "--tolerances ",
    );
    for (flag, value) in [("--preset", "nope"), ("--quant", "q9"), ("--tokenizer", "bpe")] {
        let args = ["synth", "--preset", "tiny", "-o", o];
        let mut args: Vec<&str> = args.to_vec();
        args.retain(|a| *a != "--preset" && *a != "tiny");
        args.extend([flag, value]);
        if flag != "--preset" {
            args.extend(["--preset", "tiny"]);
        }
        assert_refused(&resbisect(&args), &format!("invalid value '{value}' for '{flag} "));
    }
    // A line break and an escape in a path: one line, shown as Rust escapes them.
    let o = resbisect(&["diff", "a\nb\x1b[31m", d]);
    assert_refused(&o, r"a\nb\u{1b}[31m");
    assert!(!out.exists());
}

/// Options that would do nothing or do one thing twice are refused by name: a prompt of
/// A paired twice, `selftest --ctx/--preset` without `--perf` (and `--long`/`--seed`
/// with it), a position range that selects nothing of the prompt.
#[test]
fn options_that_would_do_nothing_or_twice_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 2);
    let m = path_str(&model);
    let dump = dir.path().join("d");
    let d = path_str(&dump);
    assert_eq!(resbisect(&["dump", "--model", m, "--tokens", "1,2,3", "-o", d]).code, 0);
    let pairs = ["diff", d, d, "--pair", "prompt=prompt", "--pair", "prompt=prompt"];
    assert_refused(
        &resbisect(&pairs),
        "--pair prompt=prompt: prompt \"prompt\" of A is already paired",
    );
    for args in [
        vec!["selftest", "--ctx", "16"],
        vec!["selftest", "--preset", "tiny"],
        vec!["selftest", "--perf", "--long"],
        vec!["selftest", "--perf", "--seed", "3"],
    ] {
        assert_refused(&resbisect(&args), "--perf");
    }
    let tokens = "1,2,3,4,5,6";
    let out = dir.path().join("e");
    let e = path_str(&out);
    assert_refused(
        &resbisect(&[
            "dump",
            "--model",
            m,
            "--tokens",
            tokens,
            "--positions",
            "5..-1",
            "-o",
            e,
        ]),
        "--positions 5..-1: selects no position of the prompt's 6 tokens (it reads 5..5 there",
    );
    assert_refused(
        &resbisect(&["dump", "--model", m, "--tokens", tokens, "--positions", "9", "-o", e]),
        "--positions 9: outside the prompt's 6 tokens",
    );
    assert!(!out.exists());
}
