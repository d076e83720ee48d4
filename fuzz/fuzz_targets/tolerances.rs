//! A tolerance file from anywhere: the loader, then lookups for every kind of tap and
//! dtype (glob matching of its patterns).
#![no_main]

use libfuzzer_sys::fuzz_target;
use resbisect::dump::TapDType;
use resbisect::tolerance::{glob_match, Tolerances};

const TAPS: &[&str] = &[
    "embed",
    "blk.0.q",
    "blk.12.resid_post",
    "blk.3.ffn_act",
    "final_norm",
    "logits",
];

fuzz_target!(|data: &[u8]| {
    let path = resbisect_fuzz::scratch().join("t.json");
    std::fs::write(&path, data).expect("scratch write");
    if let Ok(t) = Tolerances::load(&path) {
        for tap in TAPS {
            for dtype in [TapDType::F32, TapDType::F16, TapDType::BF16, TapDType::F64] {
                let tol = t.for_tap(tap, dtype);
                assert!(tol.rel_l2.is_finite() && tol.rel_l2 >= 0.0 && tol.abs.is_finite() && tol.abs >= 0.0);
            }
        }
    }
    // The glob on its own, over arbitrary text: pattern and text split at the first newline.
    if let Ok(text) = std::str::from_utf8(data) {
        let (pattern, subject) = text.split_once('\n').unwrap_or((text, "blk.1.q"));
        let m = glob_match(pattern, subject);
        if !pattern.contains('*') {
            assert_eq!(m, pattern == subject);
        }
        if pattern.chars().all(|c| c == '*') && !pattern.is_empty() {
            assert!(m);
        }
    }
});
