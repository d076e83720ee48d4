//! Command-line selection and fault syntax from anywhere: layers, taps, positions
//! (resolved against a length, and round-tripped through their shortest spec), tap
//! aliases and `--inject`. Input lines: layers, taps, positions, then inject specs; the
//! first byte picks the model depth and the sequence length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resbisect::inject::parse_runtime;
use resbisect::taps::{canonical_tap_id, positions_spec, PositionSpec, Selection};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let n_layer = 1 + (first & 0x3f) as usize;
    let len = 1 + first as usize * 3;
    let mut lines = text.split('\n');
    let (layers, taps, positions) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    if let Ok(sel) = Selection::parse(layers, taps, positions, n_layer) {
        assert!(sel.layers.iter().all(|&l| l < n_layer));
        assert!(sel.layers.windows(2).all(|w| w[0] < w[1]));
        let _ = sel.taps_in_order(n_layer);
    }
    if let Ok(spec) = PositionSpec::parse(positions) {
        if let Ok(resolved) = spec.resolve(len) {
            assert!(resolved.windows(2).all(|w| w[0] < w[1]) && resolved.iter().all(|&p| p < len));
            let again = PositionSpec::parse(&positions_spec(&resolved))
                .expect("own spec parses")
                .resolve(len)
                .expect("own spec resolves");
            assert_eq!(again, resolved);
        }
    }
    let specs: Vec<String> = lines.map(str::to_string).collect();
    for s in &specs {
        if let Ok(id) = canonical_tap_id(s, n_layer) {
            assert!(
                resbisect::taps::Tap::parse(&id).is_some(),
                "{s} -> {id} is not canonical"
            );
        }
    }
    let _ = parse_runtime(&specs, n_layer);
});
