//! Fused row-wise kernels for the oracle's elementwise hot spots (RMSNorm, the SwiGLU
//! product): one rayon pass per op instead of a chain of candle ops, each a pass over
//! memory and a thread-pool barrier. They compute the same expressions, in the same
//! order and precision, as the candle chains they replace ([`crate::ops::rms_norm`],
//! `silu(gate) * up`).

use anyhow::Result;
use candle_core::{CpuStorage, Device, Storage, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::mufu;
use crate::ops::NormRule;
use crate::profile::butterfly_sum;

/// A 2-D operand's rows in its storage: element offset of row 0 and the row stride.
#[derive(Clone, Copy)]
struct Rows {
    offset: usize,
    stride: usize,
}

/// The rows of `t` (`[rows, width]`) when each row is contiguous in memory.
fn rows_of(t: &Tensor) -> Option<Rows> {
    let layout = t.layout();
    match (layout.dims(), layout.stride()) {
        ([_, w], [s, 1]) if *s >= *w => Some(Rows {
            offset: layout.start_offset(),
            stride: *s,
        }),
        _ => None,
    }
}

/// RMSNorm of the rows of `x` (`[rows, width]`, f32 or f64) with weight `w` (`[width]`)
/// and one epsilon per row (`eps_of(r)`): `x·w / sqrt(mean(x²) + eps)`, the squares
/// summed in f64 and the mean rounded back to `x`'s dtype (ggml's rms_norm), or for f32 rows
/// under [`NormRule::GgmlCuda`] as ggml-cuda computes it. `None` when the operands are not
/// in a form this kernel takes (the caller falls back to candle).
pub(crate) fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps_of: &(dyn Fn(usize) -> f64 + Sync),
    rule: NormRule,
) -> Result<Option<Tensor>> {
    let (Some(xr), Ok(w)) = (rows_of(x), w.contiguous()) else {
        return Ok(None);
    };
    let (rows, width) = x.dims2()?;
    if w.dims() != [width] || x.dtype() != w.dtype() {
        return Ok(None);
    }
    let (sx, _) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let out = match (&*sx, &*sw) {
        (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) => {
            let w = &wv[lw.start_offset()..];
            let out = match rule {
                NormRule::F64Sum => rms_norm_rows(xv, xr, w, rows, width, eps_of),
                NormRule::GgmlCuda => rms_norm_rows_ggml_cuda(xv, xr, w, rows, width, eps_of),
            };
            Tensor::from_vec(out, (rows, width), &Device::Cpu)?
        }
        (Storage::Cpu(CpuStorage::F64(xv)), Storage::Cpu(CpuStorage::F64(wv))) => Tensor::from_vec(
            rms_norm_rows(xv, xr, &wv[lw.start_offset()..], rows, width, eps_of),
            (rows, width),
            &Device::Cpu,
        )?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn rms_norm_rows<T: Float + Send + Sync>(
    x: &[T],
    xr: Rows,
    w: &[T],
    rows: usize,
    width: usize,
    eps_of: &(dyn Fn(usize) -> f64 + Sync),
) -> Vec<T> {
    let mut out = vec![T::zero(); rows * width];
    let inv_width = 1.0 / width as f64;
    out.par_chunks_mut(width).enumerate().for_each(|(r, o)| {
        let row = &x[xr.offset + r * xr.stride..][..width];
        // Squares in T, summed in f64; as candle's sqr → to_dtype(f64) → mean.
        let sum: f64 = row.iter().map(|&v| (v * v).to_f64().unwrap_or(f64::NAN)).sum();
        let mean = T::from(sum * inv_width).unwrap_or_else(T::nan);
        let eps = T::from(eps_of(r)).unwrap_or_else(T::nan);
        let scale = T::one() / (mean * T::one() + eps).sqrt();
        for ((o, &v), &wi) in o.iter_mut().zip(row).zip(&w[..width]) {
            *o = v * scale * wi;
        }
    });
    out
}

/// [`rms_norm_rows`] as ggml-cuda's `rms_norm_f32` kernel computes it (norm.cu, with
/// common.cuh `block_reduce`; see [`NormRule::GgmlCuda`]).
fn rms_norm_rows_ggml_cuda(
    x: &[f32],
    xr: Rows,
    w: &[f32],
    rows: usize,
    width: usize,
    eps_of: &(dyn Fn(usize) -> f64 + Sync),
) -> Vec<f32> {
    const WARP: usize = 32;
    let threads = if width < 1024 { 256 } else { 1024 };
    let mut out = vec![0f32; rows * width];
    out.par_chunks_mut(width).enumerate().for_each(|(r, o)| {
        let row = &x[xr.offset + r * xr.stride..][..width];
        let mut partial = [0f32; 1024];
        for (t, p) in partial[..threads].iter_mut().enumerate() {
            // `tmp += xi * xi` contracted to an FMA by -use_fast_math (--fmad=true).
            *p = row[t.min(width)..]
                .iter()
                .step_by(threads)
                .fold(0f32, |acc, &v| v.mul_add(v, acc));
        }
        let mut warps = [0f32; WARP];
        for (s, lanes) in warps.iter_mut().zip(partial[..threads].chunks_exact_mut(WARP)) {
            *s = butterfly_sum(lanes);
        }
        // Warps beyond the block's count contribute the sum's identity, 0.
        let sum = butterfly_sum(&mut warps);
        // `tmp / ncols + eps`: the division is `tmp × rcp(ncols)`, and ptxas fuses that
        // product with the add into one FMA (measured: it reproduces every H200 row).
        let mean_eps = sum.mul_add(mufu::rcp_approx(width as f32), eps_of(r) as f32);
        let scale = mufu::rsqrt_approx(mean_eps);
        for ((o, &v), &wi) in o.iter_mut().zip(row).zip(&w[..width]) {
            *o = scale * v * wi;
        }
    });
    out
}

/// `silu(gate) · up` (SiLU(x) = x / (1 + e^-x)) of two `[rows, width]` operands, f32 or
/// f64; `None` when the operands are not in a form this kernel takes.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let (Some(gr), Some(ur)) = (rows_of(gate), rows_of(up)) else {
        return Ok(None);
    };
    let (rows, width) = gate.dims2()?;
    if up.dims() != [rows, width] || gate.dtype() != up.dtype() {
        return Ok(None);
    }
    let (sg, _) = gate.storage_and_layout();
    let (su, _) = up.storage_and_layout();
    let out = match (&*sg, &*su) {
        (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(u))) => {
            Tensor::from_vec(swiglu_rows((g, gr), (u, ur), rows, width), (rows, width), &Device::Cpu)?
        }
        (Storage::Cpu(CpuStorage::F64(g)), Storage::Cpu(CpuStorage::F64(u))) => {
            Tensor::from_vec(swiglu_rows((g, gr), (u, ur), rows, width), (rows, width), &Device::Cpu)?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn swiglu_rows<T: Exp + Send + Sync>(
    (g, gr): (&[T], Rows),
    (u, ur): (&[T], Rows),
    rows: usize,
    width: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); rows * width];
    out.par_chunks_mut(width).enumerate().for_each(|(r, o)| {
        let g = &g[gr.offset + r * gr.stride..][..width];
        let u = &u[ur.offset + r * ur.stride..][..width];
        for ((o, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
            *o = gi / (T::one() + (-gi).exp_vectorizable()) * ui;
        }
    });
    out
}

/// RoPE of each head of `x` (`[n, n_heads·head_dim]`, f32 or f64) by tables `cos`,
/// `sin` holding `[n, head_dim/2]` values (any shape of that many, contiguous): pairs
/// (2i, 2i+1), or (i, i + head_dim/2) when `neox`, rotated as
/// `(x0·cos - x1·sin, x0·sin + x1·cos)`, each product rounded as candle's chain rounds it
/// ([`crate::rope::rope`]). `None` when the operands are not in a form this kernel takes.
pub(crate) fn rope(x: &Tensor, n_heads: usize, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Option<Tensor>> {
    let (n, width) = x.dims2()?;
    let half = width / n_heads.max(1) / 2;
    let tables_fit = |t: &Tensor| t.is_contiguous() && t.elem_count() == n * half && t.dtype() == x.dtype();
    let (Some(xr), true, true) = (rows_of(x), tables_fit(cos), tables_fit(sin)) else {
        return Ok(None);
    };
    if half == 0 || n_heads * 2 * half != width {
        return Ok(None);
    }
    let shape = RopeShape { n_heads, half, neox };
    let ((sx, _), (sc, lc), (ss, ls)) = (
        x.storage_and_layout(),
        cos.storage_and_layout(),
        sin.storage_and_layout(),
    );
    let out = match (&*sx, &*sc, &*ss) {
        (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(c)), Storage::Cpu(CpuStorage::F32(s))) => {
            let tables = (&c[lc.start_offset()..][..n * half], &s[ls.start_offset()..][..n * half]);
            Tensor::from_vec(shape.rotate((x, xr), tables, n), (n, width), &Device::Cpu)?
        }
        (Storage::Cpu(CpuStorage::F64(x)), Storage::Cpu(CpuStorage::F64(c)), Storage::Cpu(CpuStorage::F64(s))) => {
            let tables = (&c[lc.start_offset()..][..n * half], &s[ls.start_offset()..][..n * half]);
            Tensor::from_vec(shape.rotate((x, xr), tables, n), (n, width), &Device::Cpu)?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// How [`rope`] pairs a row's values: heads of `2·half` values, NeoX or normal pairs.
struct RopeShape {
    n_heads: usize,
    half: usize,
    neox: bool,
}

impl RopeShape {
    fn rotate<T: Float + Send + Sync>(&self, (x, xr): (&[T], Rows), (cos, sin): (&[T], &[T]), n: usize) -> Vec<T> {
        let (half, hd) = (self.half, 2 * self.half);
        let width = self.n_heads * hd;
        let mut out = vec![T::zero(); n * width];
        out.par_chunks_mut(width).enumerate().for_each(|(r, o)| {
            let row = &x[xr.offset + r * xr.stride..][..width];
            let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
            for (o, row) in o.chunks_exact_mut(hd).zip(row.chunks_exact(hd)) {
                for i in 0..half {
                    let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (row[a], row[b]);
                    o[a] = x0 * c[i] - x1 * s[i];
                    o[b] = x0 * s[i] + x1 * c[i];
                }
            }
        });
        out
    }
}

/// e^x for the oracle's softmax and SiLU: `f64::exp` for f64; for f32 a branch-free
/// Cephes `expf` (range reduction by ln 2 in two parts, degree-6 polynomial; relative
/// error under 2·10⁻⁷, about 1.5 ulp) that the compiler vectorizes, where glibc's expf is
/// a scalar call per element. NaN stays NaN, x > 88.72 gives +inf and x < -87.33 (below
/// f32's smallest normal) gives 0.
pub(crate) trait Exp: Float {
    fn exp_vectorizable(self) -> Self;

    /// [`Exp::exp_vectorizable`] of an x ≤ 0, -inf or NaN (a softmax's x - max): the same
    /// value, in fewer operations where the overflow checks can go.
    fn exp_nonpositive(self) -> Self {
        self.exp_vectorizable()
    }
}

impl Exp for f64 {
    fn exp_vectorizable(self) -> Self {
        self.exp()
    }
}

impl Exp for f32 {
    #[inline(always)]
    fn exp_vectorizable(self) -> Self {
        let y = cephes_exp(self.clamp(-87.33, 88.72));
        if self.is_nan() {
            self
        } else if self > 88.72 {
            f32::INFINITY
        } else if self < -87.33 {
            0.0
        } else {
            y
        }
    }

    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        // Nothing here exceeds 88.72; a NaN fails the comparison and stays NaN through
        // the arithmetic.
        let y = cephes_exp(if self < -87.33 { -87.33 } else { self });
        if self < -87.33 {
            0.0
        } else {
            y
        }
    }
}

/// Cephes' expf of an x in [-87.33, 88.72] (NaN in, NaN out): e^x = 2^n·e^r with
/// n = round(x·log2 e) and |r| ≤ ln2/2, e^r by a degree-6 polynomial.
#[inline(always)]
fn cephes_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI exact in few bits so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5, // Cephes: 5.0000001201e-1, the same f32
    ];
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    // Horner from the leading coefficient (what a fold from 0 computes, without 0·r + P[0]).
    let p = P[1..].iter().fold(P[0], |p, &c| p * r + c);
    let e = p * r * r + r + 1.0;
    // 2^n as two powers of two built in the exponent field, each a normal number
    // for every n of the clamped range (-126..=128).
    // n as an integer through the bits of n + 1.5·2^23 (exact for |n| < 2^22), a
    // bit cast that vectorizes where `as i32` (saturating) goes scalar.
    let n = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let half = n >> 1;
    e * pow2(half) * pow2(n - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 exp against f64's over the whole finite range, in steps of about 1e-3:
    /// Cephes documents a peak relative error of 1.7e-7 for its expf; measured here 8.0e-8.
    #[test]
    fn f32_exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in -87_300..=88_700 {
            let x = i as f32 * 1e-3 + 1.3e-4;
            let exact = (x as f64).exp();
            worst = worst.max(((x.exp_vectorizable() as f64) - exact).abs() / exact);
        }
        assert!(worst < 2.0e-7, "worst relative error {worst:e}");
        assert!(f32::NAN.exp_vectorizable().is_nan());
        assert_eq!(100f32.exp_vectorizable(), f32::INFINITY);
        assert_eq!((-100f32).exp_vectorizable(), 0.0);
        assert_eq!(0f32.exp_vectorizable(), 1.0);
    }

    /// The softmax's exp gives exp_vectorizable's bits for every x ≤ 0 on a fine grid,
    /// -inf and NaN.
    #[test]
    fn exp_nonpositive_is_exp_vectorizable() {
        for i in 0..=1_000_000 {
            let x = -(i as f32) * 1e-4 - 1.7e-6 * (i % 7) as f32;
            assert_eq!(x.exp_nonpositive().to_bits(), x.exp_vectorizable().to_bits(), "{x}");
        }
        for x in [0.0, -0.0, -87.33, -87.34, -1e30, f32::NEG_INFINITY] {
            assert_eq!(x.exp_nonpositive().to_bits(), x.exp_vectorizable().to_bits(), "{x}");
        }
        assert!(f32::NAN.exp_nonpositive().is_nan());
    }

    /// RMSNorm and SwiGLU give the candle chains' values on strided rows.
    #[test]
    fn fused_kernels_match_the_candle_chains() -> Result<()> {
        let both = Tensor::randn(0f32, 1.0, (7, 24), &Device::Cpu)?;
        let (gate, up) = (both.narrow(1, 0, 12)?, both.narrow(1, 12, 12)?);
        let fused = swiglu(&gate, &up)?.expect("strided rows are taken");
        let chain = (gate.silu()? * &up)?;
        let diff = (fused - chain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6, "swiglu differs by {diff}");
        let w = Tensor::randn(0f32, 1.0, 12, &Device::Cpu)?;
        let fused = rms_norm(&gate, &w, &|r| 1e-5 * (r + 1) as f64, NormRule::F64Sum)?.expect("strided rows are taken");
        let eps = Tensor::from_vec((1..=7).map(|r| 1e-5 * r as f32).collect(), (7, 1), &Device::Cpu)?;
        let mean_sq = gate
            .sqr()?
            .to_dtype(candle_core::DType::F64)?
            .mean_keepdim(1)?
            .to_dtype(candle_core::DType::F32)?;
        let chain = gate
            .broadcast_mul(&mean_sq.broadcast_add(&eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&w)?;
        let diff = (fused - chain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6, "rms_norm differs by {diff}");
        Ok(())
    }
}
