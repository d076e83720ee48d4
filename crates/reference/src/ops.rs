//! The oracle's numerics on candle-core: RMSNorm, causal (optionally sliding-window)
//! grouped-query attention in query chunks, and the injected tap faults (RoPE is in
//! [`crate::rope`]). Nothing here is shared with the runtime.

use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, D};
use rayon::prelude::*;
use resbisect_taps::{Config, Fault, Faults, Tap};

use crate::blas;
use crate::fused::{self, Exp};

/// Queries processed together in attention: bounds the score matrix to
/// `n_head × ATTN_QUERY_CHUNK × seq` whatever the sequence length.
/// Small enough that the causal chunks skip most masked scores, large enough for
/// efficient GEMMs.
const ATTN_QUERY_CHUNK: usize = 128;

/// Apply the faults aimed at `tap` to its rows, row `r` holding position `start + r`.
pub(crate) fn apply_faults(faults: &Faults, tap: Tap, t: Tensor, start: usize) -> Result<Tensor> {
    let mut t = t;
    let id = tap.id();
    for f in faults.taps.iter().filter(|f| f.tap_id == id) {
        let (n, _) = t.dims2()?;
        if f.from >= start + n {
            continue;
        }
        let hit: Vec<f64> = (start..start + n)
            .map(|p| if p >= f.from { 1.0 } else { 0.0 })
            .collect();
        let hit = Tensor::from_vec(hit, (n, 1), &Device::Cpu)?.to_dtype(t.dtype())?;
        t = match f.fault {
            Fault::Scale(s) => t.broadcast_mul(&((hit * (s - 1.0))? + 1.0)?)?,
            Fault::Offset(o) => t.broadcast_add(&(hit * o)?)?,
            Fault::Zero => t.broadcast_mul(&(1.0 - hit)?)?,
            Fault::Nan => {
                let nan: Vec<f64> = (start..start + n)
                    .map(|p| if p >= f.from { f64::NAN } else { 0.0 })
                    .collect();
                t.broadcast_add(&Tensor::from_vec(nan, (n, 1), &Device::Cpu)?.to_dtype(t.dtype())?)?
            }
        };
    }
    Ok(t)
}

/// The RMSNorm epsilon of each of the rows at `positions`.
pub(crate) fn row_eps(faults: &Faults, model_eps: f64, positions: &[usize]) -> Eps {
    match faults.norm {
        Some(f) if positions.iter().any(|&p| p >= f.from) => Eps::Rows(
            positions
                .iter()
                .map(|&p| if p >= f.from { f.eps } else { model_eps })
                .collect(),
        ),
        _ => Eps::Model(model_eps),
    }
}

/// RMSNorm's epsilon: the model's, or one per row where a [`NormFault`](resbisect_taps::NormFault) acts.
pub(crate) enum Eps {
    Model(f64),
    Rows(Vec<f64>),
}

/// Rows `positions` of `t`.
pub fn gather(t: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let idx = Tensor::from_vec(
        positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        positions.len(),
        &Device::Cpu,
    )?;
    Ok(t.contiguous()?.index_select(&idx, 0)?)
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: &Eps) -> Result<Tensor> {
    let eps_of = |r: usize| match eps {
        Eps::Model(e) => *e,
        Eps::Rows(e) => e[r],
    };
    if let Some(out) = fused::rms_norm(x, w, &eps_of)? {
        return Ok(out);
    }
    // Squares summed in f64 and the mean rounded back, as ggml's rms_norm does (ops.cpp
    // ggml_compute_forward_rms_norm_f32): closer to exact than an f32 sum, and the same
    // f32 scale as llama.cpp's for the `llamacpp-*` profiles.
    let mean_sq = x
        .sqr()?
        .to_dtype(DType::F64)?
        .mean_keepdim(D::Minus1)?
        .to_dtype(x.dtype())?;
    let with_eps = match eps {
        Eps::Model(e) => (mean_sq + *e)?,
        Eps::Rows(e) => {
            mean_sq.broadcast_add(&Tensor::from_slice(e, (e.len(), 1), &Device::Cpu)?.to_dtype(x.dtype())?)?
        }
    };
    let scale = with_eps.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&scale)?.broadcast_mul(w)?)
}

/// Causal grouped-query attention of queries at `positions` (ascending) over keys and
/// values of positions `0..`; with a `window`, the query at i sees keys j with
/// i - window < j <= i. Runs of consecutive positions go in chunks, so the score
/// matrix stays small. q: [positions.len(), n_head·hd], k/v: [n, n_head_kv·hd] →
/// [positions.len(), n_head·hd]. `probs_in_f16`: the softmax output is rounded to f16
/// before it multiplies V (an engine's f16 V cache matmul converting it).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &[usize],
    cfg: &Config,
    window: Option<usize>,
    probs_in_f16: bool,
) -> Result<Tensor> {
    let n = q.dim(0)?;
    let (hd, h, hkv) = (cfg.head_dim(), cfg.n_head, cfg.n_head_kv);
    let group = h / hkv;
    // [h, n, hd] with heads of one kv group adjacent, then [hkv, group, n, hd].
    let q = q
        .reshape((n, h, hd))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((hkv, group, n, hd))?;
    let keys_total = k.dim(0)?;
    let k = k.reshape((keys_total, hkv, hd))?.transpose(0, 1)?.contiguous()?;
    let v = v.reshape((keys_total, hkv, hd))?.transpose(0, 1)?.contiguous()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let mut len = 1;
        while start + len < n && len < ATTN_QUERY_CHUNK && positions[start + len] == positions[start] + len {
            len += 1;
        }
        let first_pos = positions[start];
        let keys = first_pos + len;
        let qc = q.narrow(2, start, len)?.contiguous()?.reshape((hkv, group * len, hd))?;
        let kc = k.narrow(1, 0, keys)?;
        let vc = v.narrow(1, 0, keys)?;
        let scores = blas::matmul(&qc, &kc.t()?)?;
        // In place: the scores are a fresh tensor that nothing else holds.
        scores.inplace_op1(&CausalSoftmax {
            scale,
            rows: len,
            first_pos,
            window,
        })?;
        let probs = scores;
        let probs = if probs_in_f16 {
            probs.to_dtype(DType::F16)?.to_dtype(q.dtype())?
        } else {
            probs
        };
        let out = blas::matmul(&probs.reshape((hkv, group * len, keys))?, &vc)?;
        // [hkv, group·len, hd] → [h, len, hd] → [len, h·hd]
        outs.push(
            out.reshape((h, len, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((len, h * hd))?,
        );
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Scaled, causally masked softmax over the last dim of `[.., rows, keys]` scores, where
/// row i is the query at absolute position p = `first_pos + i` and sees keys 0..=p, or
/// with a window only keys p - window < j <= p.
/// One pass per row instead of a chain of broadcast ops; masked entries are exact zeros.
struct CausalSoftmax {
    scale: f64,
    rows: usize,
    first_pos: usize,
    window: Option<usize>,
}

impl CausalSoftmax {
    /// The softmax of each row of `x` (`keys` wide), in place.
    fn apply<T: Exp + Send + Sync>(&self, x: &mut [T], keys: usize) {
        let scale = T::from(self.scale).unwrap_or_else(T::one);
        x.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
            let end = (self.first_pos + r % self.rows + 1).min(keys);
            let start = self.window.map_or(0, |w| end.saturating_sub(w));
            let max = lanes(&row[start..end], T::neg_infinity(), |m, v| m.max(v * scale), T::max);
            // The exponentials in their own loop, which vectorizes.
            for v in &mut row[start..end] {
                *v = (*v * scale - max).exp_vectorizable();
            }
            let sum = lanes(&row[start..end], T::zero(), |s, v| s + v, |a, b| a + b);
            let inv = T::one() / sum;
            row[start..end].iter_mut().for_each(|v| *v = *v * inv);
            row[..start].fill(T::zero());
            row[end..].fill(T::zero());
        });
    }
}

/// A reduction of `xs` over eight interleaved lanes (lane i takes elements i, i + 8, …),
/// so that it vectorizes: `step(acc, x)` folds an element in, `merge` joins the lanes in
/// order. Exact for max; for a float sum it is another rounding order, as accurate as
/// the sequential one.
fn lanes<T: Copy>(xs: &[T], init: T, step: impl Fn(T, T) -> T, merge: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = step(*a, x);
        }
    }
    let joined = acc.into_iter().fold(init, &merge);
    rest.iter().fold(joined, |a, &x| step(a, x))
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("causal-softmax needs contiguous scores".into()))?;
        let keys = layout.dims()[layout.dims().len() - 1];
        match storage {
            CpuStorage::F32(v) => self.apply(&mut v[start..end], keys),
            CpuStorage::F64(v) => self.apply(&mut v[start..end], keys),
            _ => return Err(candle_core::Error::Msg("causal-softmax computes in f32 or f64".into())),
        }
        Ok(())
    }
}
