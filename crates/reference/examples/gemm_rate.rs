//! The f32 GEMM rates on this machine at the reference's shapes (the ceilings
//! `scripts/bench-reference.sh` prints beside its figures): candle's and the reference's
//! own (OpenBLAS when it loads, else candle's again); best of 10 timed products
//! `[m, k] · [k, n]` after one warm-up, in GFLOP/s, on rayon's thread count. Prints
//! `M K N candle_gflops reference_gflops` per shape.
//!
//!     cargo run --release -p resbisect-reference --example gemm_rate -- M K N [M K N ...]

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let dims: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("shapes are integers M K N: {e}"))?;
    if dims.is_empty() || !dims.len().is_multiple_of(3) {
        anyhow::bail!("usage: gemm_rate M K N [M K N ...]");
    }
    for s in dims.chunks(3) {
        let (m, k, n) = (s[0], s[1], s[2]);
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        // Weights are stored transposed ([n, k] viewed as [k, n]), as the reference keeps them.
        let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()?;
        let rate = |gemm: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<f64> {
            gemm()?;
            let mut best = f64::INFINITY;
            for _ in 0..10 {
                let t0 = Instant::now();
                gemm()?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(2.0 * (m * k * n) as f64 / best / 1e9)
        };
        let candle = rate(&|| Ok(a.matmul(&b)?))?;
        let reference = rate(&|| resbisect_reference::gemm(&a, &b))?;
        println!("{m} {k} {n} {candle:.2} {reference:.2}");
    }
    Ok(())
}
