//! `resbisect selftest`: every op of a backend against the `cpu` backend on many shapes
//! (odd sizes, real model widths, long sequences), with an NMSE threshold per op and
//! storage dtype, NaN/Inf checks and guard regions after every output that catch
//! out-of-bounds writes. Inputs come from a fixed seed.

mod fused;
mod ops;
mod quant;
mod variant;

use candle_core::quantized::GgmlDType;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::backend::{AddNorm, Backend, StorageDType};
use super::cpu::CpuBackend;
use crate::error::Result;

/// Elements after each output that must keep this value (exact in f32, f16 and bf16).
const GUARD: usize = 64;
const SENTINEL: f32 = -7.0;

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpCheck {
    pub op: String,
    pub shape: String,
    pub nmse: f64,
    pub threshold: f64,
    pub max_abs: f64,
    pub nonfinite: usize,
    pub guard_ok: bool,
    pub seconds: f64,
    pub passed: bool,
}

/// NMSE threshold of an op at a storage dtype. Exact ops (copies, dequantization, fault
/// injection) must agree to rounding; computing ops differ by summation order, and in
/// f16/bf16 by one rounding of the stored result.
fn threshold(op: &str, dtype: StorageDType) -> f64 {
    let exact = matches!(op, "embed" | "copy_rows" | "perturb" | "argmax") || op.starts_with("dequant");
    match (exact, dtype) {
        (true, StorageDType::F32) => 1e-12,
        (true, StorageDType::F16) => 1e-6,
        (true, StorageDType::BF16) => 1e-4,
        (false, StorageDType::F32) => 1e-9,
        (false, StorageDType::F16) => 1e-5,
        (false, StorageDType::BF16) => 1e-3,
    }
}

fn nmse(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        max_abs = max_abs.max(d.abs());
    }
    (if den > 0.0 { num / den } else { num }, max_abs)
}

struct Checker<'a, B: Backend> {
    gpu: &'a B,
    cpu: CpuBackend,
    rng: ChaCha8Rng,
    results: Vec<OpCheck>,
}

impl<B: Backend> Checker<'_, B> {
    fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    /// An output buffer of `n` zeros followed by the guard region.
    fn guarded(&self, n: usize) -> Result<B::Buf> {
        let mut v = vec![0.0f32; n];
        v.extend(std::iter::repeat_n(SENTINEL, GUARD));
        self.gpu.upload(&v)
    }

    /// Compare `n` values of the device output with the cpu output; check the guard.
    fn record(
        &mut self,
        op: &str,
        shape: String,
        out: &B::Buf,
        expected: &[f32],
        seconds: f64,
        nan_expected: bool,
    ) -> Result<()> {
        let n = expected.len();
        let got = self.gpu.download(out, 0, n)?;
        let guard = self.gpu.download(out, n, GUARD)?;
        let guard_ok = guard.iter().all(|&g| g == SENTINEL);
        let nonfinite = got.iter().filter(|v| !v.is_finite()).count();
        let expected_nonfinite = expected.iter().filter(|v| !v.is_finite()).count();
        let (mut got_f, mut exp_f) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (&g, &e) in got.iter().zip(expected) {
            if e.is_finite() {
                got_f.push(g);
                exp_f.push(e);
            }
        }
        let (err, max_abs) = nmse(&got_f, &exp_f);
        let limit = threshold(op, self.gpu.dtype());
        let nonfinite_ok = if nan_expected {
            nonfinite == expected_nonfinite
        } else {
            nonfinite == 0
        };
        let passed = guard_ok && nonfinite_ok && err <= limit;
        self.results.push(OpCheck {
            op: op.into(),
            shape,
            nmse: err,
            threshold: limit,
            max_abs,
            nonfinite,
            guard_ok,
            seconds,
            passed,
        });
        Ok(())
    }

    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        let t0 = std::time::Instant::now();
        let v = f()?;
        self.gpu.sync()?;
        Ok((v, t0.elapsed().as_secs_f64()))
    }
}

/// Matmul shapes (rows, k, n): gemv and its scalar path, real model widths, cuBLAS.
const MATMULS: [(usize, usize, usize); 11] = [
    (1, 576, 576),
    (2, 7, 9),
    (4, 5632, 2048),
    (1, 2048, 256),
    (7, 576, 1536),
    (1, 2048, 5632),
    (33, 2048, 5632),
    (130, 5632, 2048),
    (512, 2048, 2048),
    (5, 576, 49152),
    (3, 2048, 32000),
];
/// RMSNorm shapes (rows, width); the last two are per-head q/k norms (rows × heads
/// rows of a head dim).
const RMS_NORMS: [(usize, usize); 6] = [(1, 7), (5, 576), (64, 2048), (3, 5632), (7 * 9, 128), (33 * 4, 256)];
/// RoPE shapes (rows, heads, head dim, first position).
const ROPES: [(usize, usize, usize, usize); 4] = [(1, 9, 64, 0), (17, 3, 64, 5), (64, 32, 64, 2000), (3, 8, 128, 8189)];
/// Attention shapes (heads, KV heads, head dim, first position, rows): the decode, split,
/// tiled and GEMM paths.
const ATTENTION: [(usize, usize, usize, usize, usize); 10] = [
    (9, 3, 64, 0, 1),
    (9, 3, 64, 0, 17),
    (9, 3, 64, 40, 1),
    (32, 4, 64, 0, 130),
    (32, 4, 64, 1900, 1),
    (8, 2, 128, 0, 77),
    (8, 2, 128, 500, 3),
    (9, 3, 64, 0, 2048),
    (32, 4, 64, 300, 700),
    (8, 2, 128, 0, 600),
];
/// Attention at long contexts, with `--long`.
const ATTENTION_LONG: [(usize, usize, usize, usize, usize); 3] =
    [(2, 1, 64, 0, 8192), (9, 3, 64, 8100, 92), (4, 4, 128, 8191, 1)];
/// Fused-op shapes (rows, width, KV width, FFN width, head dim, first position).
const FUSED: [(usize, usize, usize, usize, usize, usize); 3] = [
    (1, 2048, 256, 5632, 64, 300),
    (3, 576, 192, 1536, 64, 0),
    (9, 512, 256, 1024, 128, 40),
];
/// The GGUF types the device decodes.
const DEQUANT: [GgmlDType; 9] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Check every op of `gpu` against the `cpu` backend with the same storage dtype.
pub fn run<B: Backend>(gpu: &B, seed: u64, long: bool) -> Result<Vec<OpCheck>> {
    let mut c = Checker {
        gpu,
        cpu: CpuBackend::new(gpu.dtype()),
        rng: ChaCha8Rng::seed_from_u64(seed),
        results: Vec::new(),
    };
    for (rows, k, n) in MATMULS {
        c.matmul(rows, k, n)?;
    }
    for (rows, width) in RMS_NORMS {
        c.rms_norm(rows, width)?;
    }
    for (rows, heads, hd, first) in ROPES {
        c.rope(rows, heads, hd, first)?;
    }
    let long_attention = if long { &ATTENTION_LONG[..] } else { &[] };
    for &(h, kv, hd, first, rows) in ATTENTION.iter().chain(long_attention) {
        c.attention(h, kv, hd, first, rows, None)?;
    }
    for n in [1, 1000, 3 * 5632 + 1] {
        c.elementwise(n)?;
    }
    for (rows, e, kvw, ff, hd, first) in FUSED {
        c.fused(rows, e, kvw, ff, hd, first)?;
    }
    for (n_head, n_kv, head_dim) in [(9, 3, 64), (32, 4, 64), (8, 2, 128)] {
        c.decode_step(n_head, n_kv, head_dim, None)?;
    }
    variant::run(&mut c)?;
    c.embed_copy_perturb(1000, 576, 9)?;
    c.embed_copy_perturb(300, 2048, 2)?;
    for width in [7, 32000, 49152] {
        c.argmax(width)?;
    }
    c.download_rows(16, 9)?;
    c.download_rows(160, 2049)?;
    for dtype in DEQUANT {
        c.dequant(dtype, 5, 512)?;
        c.dequant(dtype, 64, 2048)?;
    }
    // Decode rows (block matvec) and prefill rows (dequantized workspace, then GEMM), odd
    // row and column counts, k three K-quant super-blocks or a TinyLlama width.
    for ty in crate::quant::QuantType::ALL {
        for (rows, k, n) in [
            (1, 768, 333),
            (3, 768, 333),
            (4, 2048, 257),
            (37, 768, 333),
            (129, 2048, 5633),
        ] {
            c.matmul_quant(ty, rows, k, n)?;
        }
        c.matmul3_quant(ty, 1, 768, [333, 65, 65])?;
        c.matmul3_quant(ty, 1, 2048, [257, 257, 0])?;
        c.matmul3_quant(ty, 3, 768, [65, 33, 0])?;
        c.add_rms_norm_project_quant(ty, 768, [333, 65, 65])?;
        c.add_rms_norm_project_quant(ty, 2048, [257, 257, 0])?;
    }
    Ok(c.results)
}

/// The residual add `a + b` and RMSNorm with weight `w` that a fused check's projections
/// take in, into `sum` and `normed`: the same operands for the cpu and the GPU side.
fn add_norm<'a, Buf>([a, b, w]: [&'a Buf; 3], eps: f32, sum: &'a mut Buf, normed: &'a mut Buf) -> AddNorm<'a, Buf> {
    AddNorm {
        a,
        b,
        w,
        eps,
        sum,
        normed,
    }
}
