//! A JSONL prompt suite from anywhere: the reader (ids, duplicates, text or tokens), the
//! `--tokens` list syntax, and resolution against a vocabulary and a context.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resbisect::prompts::{parse_token_list, read_suite, resolve};

fuzz_target!(|data: &[u8]| {
    let path = resbisect_fuzz::scratch().join("suite.jsonl");
    std::fs::write(&path, data).expect("scratch write");
    if let Ok(entries) = read_suite(&path) {
        let n = entries.len();
        let mut ids: Vec<&str> = entries.iter().map(|(id, _, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "the reader let a duplicate id through");
        // No tokenizer: text prompts are refused, token prompts checked.
        if let Ok(records) = resolve(entries, None, 1024, 64, &|id| format!("prompt {id}")) {
            assert!(records
                .iter()
                .all(|r| !r.tokens.is_empty() && r.tokens.len() <= 64 && r.tokens.iter().all(|&t| t < 1024)));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ids) = parse_token_list(text, "--tokens") {
            assert!(!ids.is_empty());
        }
    }
});
