//! The command line as a new user meets it: help that matches the commands, printed
//! reproduce commands that run as printed, temporary probe dumps cleaned up, faults that
//! could never fire refused, and plain output from inspect, tokenize and the trace.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::*;

const TOKENS: &str = "5,17,99,300,41,7,250,12";

fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_named(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

#[test]
fn help_names_the_real_forms_and_explains_options() {
    let top = resbisect(&["--help"]).stdout;
    assert!(top.contains("`report diff A B -o DIR`"), "{top}");
    assert!(!top.contains("`report A B"), "{top}");
    let diff = resbisect(&["diff", "--help"]).stdout;
    assert!(
        diff.contains("Dump of the engine under test") && diff.contains("Dump of the reference"),
        "{diff}"
    );
    assert!(diff.contains("--pair <A_ID=B_ID>"), "{diff}");
    let bisect = resbisect(&["bisect", "--help"]).stdout;
    for (option, help) in [
        ("--model <MODEL>", "The model both engines run"),
        ("--prefill-chunk", "Runtime A: prompt tokens per prefill step"),
        ("--oracle-command", "Command template of an external oracle B"),
        ("--keep", "Keep the probe dumps"),
    ] {
        let line = bisect
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(option))
            .take(2)
            .collect::<String>();
        assert!(line.contains(help), "bisect --help: {option} lacks {help:?}:\n{bisect}");
    }
    let dump = resbisect(&["dump", "--help"]).stdout;
    assert!(dump.contains("The model: a GGUF file"), "{dump}");
}

#[test]
fn bad_model_paths_and_unreachable_faults_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 5);
    assert_refused(
        &resbisect(&["dump", "--model", path_str(dir.path()), "--tokens", "1,2", "-o", "x"]),
        "'--model <MODEL>': a directory; expected a GGUF model file",
    );
    assert_refused(&resbisect(&["inspect", path_str(dir.path())]), "not a dump");
    let out = dir.path().join("d");
    let fault = "blk.0.resid_post:scale=2@50";
    let msg = "--inject \"blk.0.resid_post:scale=2@50\" starts at position 50, but the prompt has 5 positions (0..5): it would never fire";
    assert_refused(
        &resbisect(&[
            "dump",
            "--model",
            path_str(&model),
            "--tokens",
            "1,2,3,4,5",
            "--inject",
            fault,
            "-o",
            path_str(&out),
        ]),
        msg,
    );
    assert_refused(
        &resbisect(&[
            "dump",
            "--engine",
            "runtime",
            "--model",
            path_str(&model),
            "--tokens",
            "1,2,3,4,5",
            "--inject",
            fault,
            "-o",
            path_str(&out),
        ]),
        msg,
    );
    // Also a block-layout fault into a type the model has no weights of (an f32 model).
    let no_blocks = "--inject q4_k:swap_nibbles@0: the model has no Q4_K weights; the fault would never fire";
    for (fault, msg) in [(fault, msg), ("q4_k:swap_nibbles@0", no_blocks)] {
        let args = [
            "bisect",
            "--model",
            path_str(&model),
            "--tokens",
            "1,2,3,4,5",
            "--inject",
            fault,
        ];
        assert_refused(&resbisect(&args), msg);
    }
    assert!(!out.exists());
    // Generated tokens count: 5 prompt tokens and 46 generated reach position 50.
    let o = resbisect(&[
        "dump",
        "--engine",
        "runtime",
        "--model",
        path_str(&model),
        "--tokens",
        "1,2,3,4,5",
        "--max-tokens",
        "46",
        "--inject",
        fault,
        "-o",
        path_str(&out),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn inspect_and_tokenize_print_plain_values() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 6);
    let info = resbisect(&["inspect", path_str(&model)]).stdout;
    assert!(info.contains("bos 1 eos 2"), "{info}");
    assert!(info.contains("rms eps 1e-5"), "{info}");
    assert!(!info.contains("Some("), "{info}");
    let text = resbisect(&["tokenize", "--model", path_str(&model), "--decode", "40,41,42"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.ends_with('\n') && !text.stdout.ends_with("\n\n"),
        "{:?}",
        text.stdout
    );
}

#[test]
fn dump_traces_its_phases() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 7);
    let out = Command::new(env!("CARGO_BIN_EXE_resbisect"))
        .args([
            "dump",
            "--model",
            path_str(&model),
            "--tokens",
            TOKENS,
            "-o",
            path_str(&dir.path().join("d")),
        ])
        .env("RESBISECT_TRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for phase in [
        "model opened",
        "1 prompt(s) ready",
        "stage: loading weights",
        "stage: prompt (8 tokens)",
        "dump written",
        "done; exiting",
    ] {
        assert!(stderr.contains(phase), "no {phase:?} in the trace:\n{stderr}");
    }
}

/// Without --work, bisect removes its probe dumps but keeps what the reproduce commands
/// read; those commands run as printed, again and again, with no `resbisect` on PATH.
#[test]
fn bisect_cleans_up_and_its_reproduce_commands_run_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 8);
    let report = dir.path().join("report");
    let args = [
        "bisect",
        "--model",
        path_str(&model),
        "--tokens",
        TOKENS,
        "--inject",
        "blk.1.ffn_out:scale=1.5@3",
        "--json",
        "--report",
        path_str(&report),
    ];
    let out = resbisect(&args);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("removed the probe dumps"))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    let work = PathBuf::from(
        line.split("inputs stay in ")
            .nth(1)
            .unwrap()
            .split(" (--keep")
            .next()
            .unwrap(),
    );
    assert!(work.is_dir(), "{}", work.display());
    assert!(
        files_named(&work, "manifest.json").is_empty(),
        "probe dumps left in {}",
        work.display()
    );
    assert!(!files_named(&work, "prompt.jsonl").is_empty());

    let reproduce = reproduce_commands(&r);
    assert_eq!(reproduce.len(), 3, "{reproduce:?}");
    // Twice: a second run replaces the first one's dumps rather than refusing to write
    // and leaving the diff to compare the old ones.
    for (cmd, want) in reproduce.iter().chain(&reproduce).zip([0, 0, 1, 0, 0, 1]) {
        assert!(!cmd.starts_with("resbisect "), "{cmd}");
        let status = Command::new("sh")
            .args(["-c", cmd])
            .env("PATH", "/usr/bin:/bin")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            status.status.code(),
            Some(want),
            "{cmd}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    std::fs::remove_dir_all(&work).unwrap();
    // The page wraps those long commands and explains its marker.
    let html = std::fs::read_to_string(report.join("bisect.html")).unwrap();
    assert!(
        html.contains("<pre class=\"reproduce\">") && html.contains("pre.reproduce{white-space:pre-wrap"),
        "reproduce lines do not wrap"
    );
    assert!(
        html.contains(" ◀") && html.contains("◀ marks the taps"),
        "the ◀ marker is missing or unexplained"
    );

    let mut kept = args.to_vec();
    kept.push("--keep");
    let out = resbisect(&kept);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let work = kept_work_dir(&out.stderr);
    assert!(!files_named(&work, "manifest.json").is_empty());
    std::fs::remove_dir_all(&work).unwrap();
}

/// The work directory bisect says it kept the probe dumps in.
fn kept_work_dir(stderr: &str) -> PathBuf {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("probe dumps kept in "))
        .unwrap_or_else(|| panic!("{stderr}"));
    PathBuf::from(line.trim_start_matches("probe dumps kept in "))
}

/// An engine that crashed leaves its partial dump as evidence (exit 3, README): bisect
/// keeps the probe dumps then, even without `--work` or `--keep`, and says where.
#[test]
fn bisect_keeps_the_partial_dump_of_a_crashed_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 8);
    let out = resbisect(&[
        "bisect",
        "--model",
        path_str(&model),
        "--tokens",
        TOKENS,
        "--inject",
        "blk.1.attn_out:oob@2",
    ]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    let work = kept_work_dir(&out.stderr);
    let failed: Vec<PathBuf> = files_named(&work, "manifest.json")
        .into_iter()
        .filter(|m| std::fs::read_to_string(m).unwrap().contains("\"failed\""))
        .collect();
    assert!(!failed.is_empty(), "no failed manifest kept in {}", work.display());
    std::fs::remove_dir_all(&work).unwrap();
}
