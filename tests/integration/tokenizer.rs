//! The tokenizer reproduces HF's ids exactly on a varied text set (fixtures produced by
//! scripts/tokenizer_fixture.py) for the real gpt2-BPE model and a SentencePiece model.

use resbisect::gguf::GgufFile;
use resbisect::tokenizer::Tokenizer;
use serde_json::Value;

use crate::util::*;

fn check(model: &std::path::Path, fixture: &str) {
    let tok = Tokenizer::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(root().join(fixture)).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut mismatches = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text).unwrap();
        if got != want {
            mismatches.push(format!("{text:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn smollm2_matches_hf() {
    check(&smollm2(), "fixtures/tokenizer/smollm2_expected.json");
}

#[test]
fn sentencepiece_matches_hf() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("spm.gguf");
    let out = resbisect(&[
        "synth",
        "--preset",
        "tiny",
        "--tokenizer",
        "llama",
        "--quant",
        "f32",
        "--seed",
        "7",
        "-o",
        path_str(&model),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    check(&model, "fixtures/tokenizer/synth_spm_expected.json");
}

#[test]
fn cli_prints_ids_and_round_trips() {
    let m = smollm2();
    let out = resbisect(&["tokenize", "--model", path_str(&m), "<|im_start|>user 42"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "1,4093,216,36,34");
    let back = resbisect(&["tokenize", "--decode", "--model", path_str(&m), out.stdout.trim()]);
    assert_eq!(back.stdout, "<|im_start|>user 42\n");
}

#[test]
fn gemma3_matches_hf() {
    check(&gemma3(), "fixtures/tokenizer/gemma3_expected.json");
}
