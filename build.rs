//! Build script: with the `hip` feature, compile kernels/ops.hip with hipcc into one code
//! object per storage dtype for the gfx targets in RESBISECT_HIP_ARCHS (default gfx90a),
//! which the `hip` backend embeds. Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=RESBISECT_HIP_ARCHS");
    println!("cargo:rerun-if-env-changed=HIPCC");
    if std::env::var_os("CARGO_FEATURE_HIP").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let hipcc = std::env::var("HIPCC").unwrap_or_else(|_| "hipcc".into());
    let archs = std::env::var("RESBISECT_HIP_ARCHS").unwrap_or_else(|_| "gfx90a".into());
    for (define, name) in [
        ("RB_STORE_F32", "f32"),
        ("RB_STORE_F16", "f16"),
        ("RB_STORE_BF16", "bf16"),
    ] {
        let target = out.join(format!("ops-{name}.hsaco"));
        let mut cmd = Command::new(&hipcc);
        cmd.arg("--genco")
            .arg(format!("-D{define}"))
            .args(["-O3", "-Werror", "-Ikernels", "kernels/ops.hip", "-o"])
            .arg(&target);
        for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            cmd.arg(format!("--offload-arch={arch}"));
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("the hip feature needs hipcc ({hipcc}): {e}"));
        assert!(
            status.success(),
            "hipcc failed to compile kernels/ops.hip ({define}, {archs})"
        );
    }
}
