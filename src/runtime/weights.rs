//! Weight matrices as the forward uses them: dense in the storage dtype (dequantized at
//! load, `--weights dequant`, the only form for F32/F16/BF16 files) or kept in their
//! GGUF block format (`--weights native`, the default) and read by the backend's fused
//! quantized matmul. Bisecting one mode against the other separates a quantized-kernel
//! bug from everything else. Also the injected block-layout fault.

use candle_core::quantized::GgmlDType;

use super::backend::{Backend, Input, Projections};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::quant::{swap_nibbles, QuantType};

/// How the runtime holds quantized weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightMode {
    /// Matrices of the types in [`QuantType`] stay in blocks; others are dequantized.
    #[default]
    Native,
    /// Every weight dequantized to the storage dtype at load.
    Dequant,
}

impl WeightMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "dequant" => Ok(Self::Dequant),
            other => Err(Error::input(format!("weights are native or dequant, not {other:?}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Dequant => "dequant",
        }
    }
}

/// A weight matrix `[n, k]` on the backend.
pub(super) enum Matrix<B: Backend> {
    Dense(B::Buf),
    Quant(B::Quant),
}

impl<B: Backend> Matrix<B> {
    /// GGUF tensor `name` (`dims` in ggml order) uploaded in `mode`, with its blocks read
    /// nibble-swapped when `faults` inject a block-layout fault into its type.
    pub(super) fn load(
        b: &B,
        name: &str,
        dtype: GgmlDType,
        dims: &[usize],
        data: &[u8],
        mode: WeightMode,
        faults: &RuntimeFaults,
    ) -> Result<Self> {
        let faulty = QuantType::of(dtype).filter(|t| faults.blocks.iter().any(|f| f.quant_type == t.name()));
        let swapped;
        let data = match faulty {
            Some(t) => {
                let mut d = data.to_vec();
                swap_nibbles(t, &mut d)?;
                swapped = d;
                &swapped[..]
            }
            None => data,
        };
        if mode == WeightMode::Native && QuantType::of(dtype).is_some() {
            if let Some(q) = b.upload_quant(name, dtype, dims, data)? {
                return Ok(Self::Quant(q));
            }
        }
        Ok(Self::Dense(b.upload_weight(name, dtype, dims, data)?))
    }

    /// `out[rows, n] = x[rows, k] · selfᵀ`.
    pub(super) fn matmul(&self, b: &B, x: &B::Buf, rows: usize, k: usize, n: usize, out: &mut B::Buf) -> Result<()> {
        match self {
            Self::Dense(w) => b.matmul(x, w, rows, k, n, out),
            Self::Quant(w) => b.matmul_quant(x, w, rows, k, n, out),
        }
    }
}

/// [`Backend::matmul3`] when the three are dense, [`Backend::matmul3_quant`] when the
/// three are quantized (each through [`Backend::add_rms_norm_project`] when the input is
/// a norm), else three matmuls.
pub(super) fn matmul3<B: Backend>(
    b: &B,
    x: Input<B>,
    w: [&Matrix<B>; 3],
    rows: usize,
    k: usize,
    n: [usize; 3],
    out: [&mut B::Buf; 3],
) -> Result<()> {
    let projections = match w {
        [Matrix::Dense(w0), Matrix::Dense(w1), Matrix::Dense(w2)] => Some(Projections::Dense([w0, w1, w2])),
        [Matrix::Quant(w0), Matrix::Quant(w1), Matrix::Quant(w2)] => Some(Projections::Quant([w0, w1, w2])),
        _ => None,
    };
    match (x, projections) {
        (Input::AddNorm(norm), Some(p)) => b.add_rms_norm_project(norm, p, rows, k, n, out),
        (Input::Rows(x), Some(Projections::Dense(w))) => b.matmul3(x, w, rows, k, n, out),
        (Input::Rows(x), Some(Projections::Quant(w))) => b.matmul3_quant(x, w, rows, k, n, out),
        (x, None) => {
            let x = x.rows(b, rows, k)?;
            for ((w, n), out) in w.into_iter().zip(n).zip(out) {
                if n > 0 {
                    w.matmul(b, x, rows, k, n, out)?;
                }
            }
            Ok(())
        }
    }
}

/// `g = x·wgᵀ`, `u = x·wuᵀ`, `act = silu(g)·u`: [`Backend::gate_up_silu`] when both are
/// dense; else the two projections through [`matmul3`] and the SiLU product.
// The operands of the backend op it dispatches to.
#[allow(clippy::too_many_arguments)]
pub(super) fn gate_up_silu<B: Backend>(
    b: &B,
    x: Input<B>,
    wg: &Matrix<B>,
    wu: &Matrix<B>,
    rows: usize,
    k: usize,
    n: usize,
    [g, u, act]: [&mut B::Buf; 3],
) -> Result<()> {
    if let (Matrix::Dense(wg), Matrix::Dense(wu)) = (wg, wu) {
        return b.gate_up_silu(x, wg, wu, rows, k, n, g, u, act);
    }
    matmul3(b, x, [wg, wu, wu], rows, k, [n, n, 0], [&mut *g, &mut *u, &mut *act])?;
    b.silu_mul(g, u, rows * n, act)
}
