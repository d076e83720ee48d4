//! A projection (matmul by a stacked weight) under a numerics [`Profile`]: the
//! activations are rounded per stacked part as the engine rounds them for that part's
//! weight type, then multiplied by the exactly dequantized weight in the oracle's own
//! GEMM; for q8_1 activations the block-sum correction `m_w·(s - d·Σq)` is one more small
//! GEMM (see [`crate::profile::uses_block_sum`]).

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use anyhow::{bail, Context};

use crate::profile::{round_activations, round_cache, uses_block_sum, weight_block_offsets, ActRounding, Profile};
use crate::{blas, load, WeightSource};

/// One stacked part of a projection: its weight type, output columns and, when the
/// profile's dot product uses the activation block sum, the weight's per-block offsets
/// `[in/32, cols]`.
pub(crate) struct Part {
    pub dtype: GgmlDType,
    pub cols: usize,
    pub offsets: Option<Tensor>,
}

/// A weight `[in, out]` (transposed for `x.matmul`) made of stacked parts.
pub(crate) struct Projection {
    pub w: Tensor,
    pub parts: Vec<Part>,
}

impl Projection {
    /// The whole projection of `x` (`[rows, in]` → `[rows, out]`).
    pub fn apply(&self, x: &Tensor, profile: Profile) -> Result<Tensor> {
        self.apply_cols(x, profile, 0, self.w.dim(1)?)
    }

    /// Output columns `start..start + len` of the projection of `x`; the range must cover
    /// whole parts.
    /// The product accumulates in the weight's dtype: f64 weights (the twin,
    /// [`Projection::to_dtype`]) take `x` to f64 and the result back to `x`'s dtype.
    pub fn apply_cols(&self, x: &Tensor, profile: Profile, start: usize, len: usize) -> Result<Tensor> {
        let (dtype, dots) = (x.dtype(), self.w.dtype());
        let x = &x.to_dtype(dots)?;
        let w = self.w.narrow(1, start, len)?;
        if profile == Profile::Exact {
            return Ok(blas::matmul(x, &w)?.to_dtype(dtype)?);
        }
        let mut outs = Vec::new();
        let mut cached: Vec<(ActRounding, Tensor, Option<Tensor>)> = Vec::new();
        let mut col = 0;
        for part in &self.parts {
            let (lo, hi) = (col, col + part.cols);
            col = hi;
            if hi <= start || lo >= start + len {
                continue;
            }
            if lo < start || hi > start + len {
                anyhow::bail!("columns {start}..{} split a stacked weight part", start + len);
            }
            let rounding = profile.activation_rounding(part.dtype);
            if !cached.iter().any(|c| c.0 == rounding) {
                let (xr, corr) = rounded(x, rounding)?;
                cached.push((rounding, xr, corr));
            }
            let (_, xr, corr) = cached.iter().find(|c| c.0 == rounding).expect("cached above");
            let mut y = blas::matmul(xr, &self.w.narrow(1, lo, part.cols)?)?;
            if let (Some(corr), Some(off), true) = (corr, &part.offsets, uses_block_sum(rounding, part.dtype)) {
                y = (y + blas::matmul(corr, off)?)?;
            }
            outs.push(y);
        }
        Ok(Tensor::cat(&outs, 1)?.to_dtype(dtype)?)
    }

    /// The same projection with its weight (and block offsets) in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            w: self.w.to_dtype(dtype)?,
            parts: self
                .parts
                .iter()
                .map(|p| -> Result<Part> {
                    Ok(Part {
                        dtype: p.dtype,
                        cols: p.cols,
                        offsets: p.offsets.as_ref().map(|o| o.to_dtype(dtype)).transpose()?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// A matmul weight loaded as the part of a projection: dequantized (`[out, in]`), with
/// its type and the per-block offsets `profile` needs.
pub(crate) fn load_part(src: &dyn WeightSource, name: &str, dtype: DType, profile: Profile) -> Result<(Tensor, Part)> {
    let t = load(src, name, dtype)?;
    let w = src.weight(name)?;
    // Norm vectors load as parts too (and are taken apart again): one row per value.
    let (out, cols) = match *t.dims() {
        [out, cols] => (out, cols),
        [out] => (out, 1),
        _ => bail!("{name}: expected a matrix or a vector, not shape {:?}", t.dims()),
    };
    let offsets = if uses_block_sum(profile.activation_rounding(w.dtype), w.dtype) {
        weight_block_offsets(w.dtype, w.data, out, cols)
            .with_context(|| format!("reading the block offsets of {name}"))?
            .map(|m| -> Result<Tensor> {
                Ok(Tensor::from_vec(m, (out, cols / 32), &Device::Cpu)?
                    .t()?
                    .contiguous()?
                    .to_dtype(dtype)?)
            })
            .transpose()?
    } else {
        None
    };
    Ok((
        t,
        Part {
            dtype: w.dtype,
            cols: out,
            offsets,
        },
    ))
}

/// Parts stacked along the output dim into one projection `[in, Σ out]`.
pub(crate) fn stack(parts: Vec<(Tensor, Part)>) -> Result<Projection> {
    let (ws, parts): (Vec<Tensor>, Vec<Part>) = parts.into_iter().unzip();
    Ok(Projection {
        w: Tensor::cat(&ws, 0)?.t()?,
        parts,
    })
}

/// `x` (`[rows, in]`) rounded as `rounding` stores it, in `x`'s dtype, and the q8_1
/// block-sum corrections `[rows, in/32]` when there are any.
fn rounded(x: &Tensor, rounding: ActRounding) -> Result<(Tensor, Option<Tensor>)> {
    if rounding == ActRounding::None {
        return Ok((x.clone(), None));
    }
    let (rows, width) = x.dims2()?;
    let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (values, corr) = round_activations(&flat, width, rounding)?;
    let values = Tensor::from_vec(values, (rows, width), &Device::Cpu)?.to_dtype(x.dtype())?;
    let corr = corr
        .map(|c| Tensor::from_vec(c, (rows, width / 32), &Device::Cpu)?.to_dtype(x.dtype()))
        .transpose()?;
    Ok((values, corr))
}

/// Query, keys and values as the profile's attention multiplies them: K and V through
/// the KV cache type, the query in f16 when the cache matmul converts it.
pub(crate) fn attention_inputs(
    profile: Profile,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Some(cache) = profile.kv_cache() else {
        return Ok((q.clone(), k.clone(), v.clone()));
    };
    let through_cache = |t: &Tensor| -> Result<Tensor> {
        let (rows, width) = t.dims2()?;
        let flat = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let stored = round_cache(&flat, width, cache)?;
        Ok(Tensor::from_vec(stored, (rows, width), &Device::Cpu)?.to_dtype(t.dtype())?)
    };
    let q = if profile.attention_in_f16() {
        q.to_dtype(DType::F16)?.to_dtype(q.dtype())?
    } else {
        q.clone()
    };
    Ok((q, through_cache(k)?, through_cache(v)?))
}
