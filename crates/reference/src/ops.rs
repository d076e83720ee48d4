//! The oracle's numerics on candle-core: RMSNorm and the injected tap faults (RoPE is in
//! [`crate::rope`], attention in [`crate::attention`]). Nothing here is shared with the
//! runtime.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use resbisect_taps::{Fault, Faults, Tap};

use crate::fused;

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

/// How RMSNorm sums a row's squares and forms its scale ([`crate::Profile::norm_rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormRule {
    /// Squares summed in f64, the mean rounded back, an exact `1/sqrt` (ggml-cpu ops.cpp
    /// `ggml_compute_forward_rms_norm_f32`).
    F64Sum,
    /// As ggml-cuda's `rms_norm_f32` under `-use_fast_math`, for f32 rows: per-thread FMA
    /// sums of a strided slice over 256 threads (1024 from 1024 columns on), XOR-shuffle
    /// butterflies within and then across warps, `sum × rcp(n) + eps` in one FMA and
    /// `rsqrtf` on the approximate units ([`crate::mufu`]), `scale·x·w` left to right.
    GgmlCuda,
}

/// A forward's RMSNorm: the epsilons and the summation rule.
pub(crate) struct Norm {
    pub eps: Eps,
    pub rule: NormRule,
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

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, norm: &Norm) -> Result<Tensor> {
    let eps = &norm.eps;
    let eps_of = |r: usize| match eps {
        Eps::Model(e) => *e,
        Eps::Rows(e) => e[r],
    };
    if let Some(out) = fused::rms_norm(x, w, &eps_of, norm.rule)? {
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
