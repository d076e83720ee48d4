//! The f32 GEMM rate candle reaches on this machine at the reference's shapes (the
//! ceiling `scripts/bench-reference.sh` prints beside its figures): best of 10 timed
//! products `[m, k] · [k, n]` after one warm-up, in GFLOP/s, on rayon's thread count.
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
    if dims.is_empty() || dims.len() % 3 != 0 {
        anyhow::bail!("usage: gemm_rate M K N [M K N ...]");
    }
    for s in dims.chunks(3) {
        let (m, k, n) = (s[0], s[1], s[2]);
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        // Weights are stored transposed ([n, k] viewed as [k, n]), as the reference keeps them.
        let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()?;
        a.matmul(&b)?;
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let t0 = Instant::now();
            a.matmul(&b)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("{m} {k} {n} {:.2}", 2.0 * (m * k * n) as f64 / best / 1e9);
    }
    Ok(())
}
