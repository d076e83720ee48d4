//! A projection (matmul by a stacked weight) under a numerics [`Profile`]: the
//! activations are rounded per stacked part as the engine rounds them for that part's
//! weight type, then multiplied by the exactly dequantized weight in the oracle's own
//! GEMM; for q8_1 activations the block-sum correction `m_w·(s - d·Σq)` is one more small
//! GEMM (see [`crate::profile::uses_block_sum`]).

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use anyhow::{bail, Context};
use rayon::prelude::*;

use crate::load::{dequantize_into, load};
use crate::profile::{round_activations, round_cache, uses_block_sum, weight_block_offsets, ActRounding, Profile};
use crate::{blas, RawWeight, WeightSource};

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
fn load_part(src: &dyn WeightSource, name: &str, dtype: DType, profile: Profile) -> Result<(Tensor, Part)> {
    let t = load(src, name, dtype)?;
    let (out, cols) = t.dims2().with_context(|| format!("{name}: expected a matrix"))?;
    Ok((t, part(&src.weight(name)?, name, out, cols, dtype, profile)?))
}

/// The part record of weight `w` (`[out, cols]`): its type and the per-block offsets
/// `profile` needs, in `dtype`.
fn part(w: &RawWeight, name: &str, out: usize, cols: usize, dtype: DType, profile: Profile) -> Result<Part> {
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
    Ok(Part {
        dtype: w.dtype,
        cols: out,
        offsets,
    })
}

/// The matmul weights `names` (GGUF dims `[in, out]` each) stacked along the output dim
/// into one projection `[in, Σ out]`. In f32 each is dequantized straight into its rows
/// of the stacked matrix ([`dequantize_into`]), in parallel; in f64, dequantized apart
/// and concatenated.
pub(crate) fn load_stacked(
    src: &(dyn WeightSource + Sync),
    names: &[String],
    dtype: DType,
    profile: Profile,
) -> Result<Projection> {
    if dtype != DType::F32 {
        let parts = names.iter().map(|n| load_part(src, n, dtype, profile));
        let (ws, parts): (Vec<Tensor>, Vec<Part>) = parts.collect::<Result<Vec<_>>>()?.into_iter().unzip();
        return Ok(Projection {
            w: Tensor::cat(&ws, 0)?.t()?,
            parts,
        });
    }
    let weights = names
        .iter()
        .map(|name| Ok((name, src.weight(name)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut width = None;
    let mut outs = Vec::with_capacity(weights.len());
    for (name, w) in &weights {
        let [cols, out] = w.dims[..] else {
            bail!("{name}: expected a matrix, not dims {:?}", w.dims)
        };
        if *width.get_or_insert(cols) != cols {
            bail!("{name}: {cols} inputs, where the parts stacked with it have {width:?}");
        }
        outs.push(out);
    }
    let cols = width.unwrap_or(0);
    let mut values = vec![0.0f32; outs.iter().sum::<usize>() * cols];
    let mut rest = &mut values[..];
    let mut slices = Vec::with_capacity(outs.len());
    for &out in &outs {
        let (rows, tail) = rest.split_at_mut(out * cols);
        slices.push(rows);
        rest = tail;
    }
    weights
        .par_iter()
        .zip(slices)
        .try_for_each(|((name, w), rows)| dequantize_into(src, name, w, rows))?;
    let parts = weights
        .iter()
        .zip(&outs)
        .map(|((name, w), &out)| part(w, name, out, cols, dtype, profile))
        .collect::<Result<_>>()?;
    let total = values.len() / cols.max(1);
    Ok(Projection {
        w: Tensor::from_vec(values, (total, cols), &Device::Cpu)?.t()?,
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
