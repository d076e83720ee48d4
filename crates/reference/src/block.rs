//! The parts of a transformer block that differ between architectures: the optional
//! weights of a layer (Q/K/V bias, per-head Q/K RMSNorm, post-attention and post-FFN
//! norms), per-head RMSNorm, the gated FFN's activation (SiLU or GELU-tanh) and the
//! embedding scale.

use anyhow::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use resbisect_taps::{Activation, Config};

use crate::ops::{rms_norm, Eps, Norm};
use crate::{fused, load, WeightSource};

/// A layer's weights beyond the llama block; each present when the variant has it.
pub(crate) struct Extras {
    /// Q, K and V biases concatenated, [q_width + 2·kv_width] (qwen2).
    pub qkv_bias: Option<Tensor>,
    /// Per-head RMSNorm weights of Q and K, [head_dim] each (qwen3, gemma3).
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// RMSNorm weights of the attention and FFN outputs, [n_embd] each (gemma3).
    pub post_norms: Option<(Tensor, Tensor)>,
}

impl Extras {
    pub fn load(cfg: &Config, src: &dyn WeightSource, l: usize, dtype: DType) -> Result<Self> {
        let v = &cfg.variant;
        let w = |name: &str| load(src, &format!("blk.{l}.{name}"), dtype);
        let qkv_bias = if v.qkv_bias {
            Some(Tensor::cat(
                &[w("attn_q.bias")?, w("attn_k.bias")?, w("attn_v.bias")?],
                0,
            )?)
        } else {
            None
        };
        let qk_norm = if v.qk_norm {
            Some((w("attn_q_norm.weight")?, w("attn_k_norm.weight")?))
        } else {
            None
        };
        let post_norms = if v.post_norms {
            Some((w("post_attention_norm.weight")?, w("post_ffw_norm.weight")?))
        } else {
            None
        };
        Ok(Self {
            qkv_bias,
            qk_norm,
            post_norms,
        })
    }
}

/// RMSNorm over each head of `x` ([n, n_heads·head_dim]) with weight `w` [head_dim]; the
/// row epsilons of `eps` apply to every head of their row.
pub(crate) fn head_rms_norm(x: &Tensor, w: &Tensor, n_heads: usize, norm: &Norm) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let eps = match &norm.eps {
        Eps::Model(e) => Eps::Model(*e),
        Eps::Rows(rows) => Eps::Rows(rows.iter().flat_map(|&e| std::iter::repeat_n(e, n_heads)).collect()),
    };
    let per_head = Norm { eps, rule: norm.rule };
    let heads = x.contiguous()?.reshape((n * n_heads, width / n_heads))?;
    Ok(rms_norm(&heads, w, &per_head)?.reshape((n, width))?)
}

/// The gated FFN's product `activation(gate) · up` (fused for SiLU). `gelu_table`: a GELU
/// goes through ggml-cpu's f16 table ([`crate::profile::gelu_f16_table`]), as the
/// `llamacpp-cpu` profile says.
pub(crate) fn gated(cfg: &Config, gate: &Tensor, up: &Tensor, gelu_table: bool) -> Result<Tensor> {
    if gelu_table && matches!(cfg.variant.ffn_activation, Activation::GeluTanh) {
        let values = gate.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let act: Vec<f32> = values.par_iter().map(|&x| crate::profile::gelu_f16_table(x)).collect();
        let act = Tensor::from_vec(act, gate.shape(), gate.device())?.to_dtype(gate.dtype())?;
        return Ok((act * up)?);
    }
    if matches!(cfg.variant.ffn_activation, Activation::Silu) {
        if let Some(out) = fused::swiglu(gate, up)? {
            return Ok(out);
        }
    }
    Ok((activation(cfg, gate)? * up)?)
}

/// The gated FFN's activation of `gate`: SiLU(x) = x·σ(x), or GELU with the tanh
/// approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Hendrycks & Gimpel 2016;
/// HF `gelu_pytorch_tanh`, llama.cpp `ggml_gelu`).
fn activation(cfg: &Config, gate: &Tensor) -> Result<Tensor> {
    Ok(match cfg.variant.ffn_activation {
        Activation::Silu => gate.silu()?,
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let cube = (gate.sqr()? * gate)?;
            let inner = ((gate + (cube * 0.044715)?)? * c)?;
            ((gate * 0.5)? * (inner.tanh()? + 1.0)?)?
        }
    })
}

/// The embedding rows as the first layer sees them: × sqrt(n_embd) where the variant
/// scales embeddings (gemma3; computed in f64, then cast).
pub(crate) fn scale_embeddings(cfg: &Config, x: Tensor) -> Result<Tensor> {
    if cfg.variant.scale_embeddings {
        Ok((x * (cfg.n_embd as f64).sqrt())?)
    } else {
        Ok(x)
    }
}
