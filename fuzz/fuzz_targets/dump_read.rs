//! A dump from anywhere (a manifest and safetensors files, packed as in
//! `resbisect_fuzz::unpack_dump`): open, list and map every file as `inspect` does,
//! decode them, diff the dump with itself and calibrate from that.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resbisect::diff::{calibrate, diff, DiffOptions, Judge};
use resbisect::dump::Dump;
use resbisect::tolerance::{Calibration, Tolerances};

fuzz_target!(|data: &[u8]| {
    let root = resbisect_fuzz::scratch();
    if !resbisect_fuzz::unpack_dump(data, &root) {
        return;
    }
    let Ok(dump) = Dump::open(&root) else { return };
    for p in &dump.manifest.prompts {
        let Ok(stems) = dump.files(&p.id) else { continue };
        for stem in stems {
            if let Ok(Some(file)) = dump.map_file(&p.id, &stem) {
                for slice in file.taps.values() {
                    let v = file.view(slice);
                    assert_eq!(v.bytes.len(), v.rows * v.width * v.dtype.size());
                }
            }
            let _ = dump.read_file(&p.id, &stem);
        }
    }
    let opts = DiffOptions {
        tolerances: Tolerances::default(),
        allow_model_mismatch: false,
        judge: Judge::Auto,
        given_tokens: None,
    };
    if let Ok(report) = diff(&dump, &dump, &opts) {
        // What calibrate writes, its loader reads back (NaN rows once made `null`).
        let how = Calibration {
            quantile: 0.99,
            margin: 8.0,
            floor: 1e-7,
            abs_floor: 1e-6,
        };
        let (tolerances, _notes) = calibrate(std::slice::from_ref(&report), &how);
        let path = root.join("tolerances.json");
        std::fs::write(&path, serde_json::to_string(&tolerances).expect("tolerances serialize"))
            .expect("scratch write");
        if let Err(e) = Tolerances::load(&path) {
            panic!("calibrate wrote a file its own loader refuses: {e}");
        }
    }
});
