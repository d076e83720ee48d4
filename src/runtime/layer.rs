//! What a layer of the forward reads and writes: its weights (with those of the model's
//! variant and its RoPE table, uploaded once) and the activation buffers every chunk and
//! decode step reuses.

use super::backend::{Backend, RopeFreqs};
use super::weights::Matrix;
use super::KeptRows;
use crate::error::{Error, Result};
use crate::model::Config;

pub(super) struct LayerWeights<B: Backend> {
    pub(super) attn_norm: B::Buf,
    pub(super) wq: Matrix<B>,
    pub(super) wk: Matrix<B>,
    pub(super) wv: Matrix<B>,
    pub(super) wo: Matrix<B>,
    pub(super) ffn_norm: B::Buf,
    pub(super) wg: Matrix<B>,
    pub(super) wu: Matrix<B>,
    pub(super) wd: Matrix<B>,
    /// `attn_{q,k,v}.bias` (qwen2).
    pub(super) qkv_bias: Option<[B::Buf; 3]>,
    /// `attn_{q,k}_norm.weight`, `head_dim` each (qwen3, gemma3).
    pub(super) qk_norm: Option<[B::Buf; 2]>,
    /// `post_attention_norm.weight`, `post_ffw_norm.weight` (gemma3).
    pub(super) post_norms: Option<[B::Buf; 2]>,
    /// The layer's RoPE table; `None` for plain llama RoPE at `base`.
    pub(super) rope: Option<LayerRope<B>>,
    pub(super) base: f32,
}

/// A layer's RoPE table on the device (see [`super::rope::rope_table`]).
pub(super) struct LayerRope<B: Backend> {
    pub(super) inv_freq: B::Table,
    pub(super) neox: bool,
    pub(super) mscale: f32,
}

impl<B: Backend> LayerWeights<B> {
    /// Layer `l`'s weights, each uploaded from its GGUF name (vectors by `up`, matrices
    /// by `mat`), with those of the model's variant; `rope_factors` are
    /// `rope_freqs.weight`'s values, when it has them.
    pub(super) fn load(
        l: usize,
        c: &Config,
        rope_factors: Option<&[f32]>,
        b: &B,
        up: &dyn Fn(&str) -> Result<B::Buf>,
        mat: &dyn Fn(&str) -> Result<Matrix<B>>,
    ) -> Result<Self> {
        let w = |n: &str| up(&format!("blk.{l}.{n}.weight"));
        let m = |n: &str| mat(&format!("blk.{l}.{n}.weight"));
        let v = &c.variant;
        let rope = match super::rope::rope_table(c, l, rope_factors) {
            Some(t) => Some(LayerRope {
                inv_freq: b.upload_table(&t.inv_freq)?,
                neox: t.neox,
                mscale: t.mscale,
            }),
            None => None,
        };
        let bias = |n: &str| up(&format!("blk.{l}.{n}.bias"));
        Ok(Self {
            attn_norm: w("attn_norm")?,
            wq: m("attn_q")?,
            wk: m("attn_k")?,
            wv: m("attn_v")?,
            wo: m("attn_output")?,
            ffn_norm: w("ffn_norm")?,
            wg: m("ffn_gate")?,
            wu: m("ffn_up")?,
            wd: m("ffn_down")?,
            qkv_bias: v
                .qkv_bias
                .then(|| Ok::<_, Error>([bias("attn_q")?, bias("attn_k")?, bias("attn_v")?]))
                .transpose()?,
            qk_norm: v
                .qk_norm
                .then(|| Ok::<_, Error>([w("attn_q_norm")?, w("attn_k_norm")?]))
                .transpose()?,
            post_norms: v
                .post_norms
                .then(|| Ok::<_, Error>([w("post_attention_norm")?, w("post_ffw_norm")?]))
                .transpose()?,
            rope,
            base: c.rope_base_of(l) as f32,
        })
    }

    /// The RoPE frequencies of this layer as the backend takes them.
    pub(super) fn freqs(&self) -> RopeFreqs<'_, B::Table> {
        match &self.rope {
            Some(r) => RopeFreqs::Table {
                inv_freq: &r.inv_freq,
                neox: r.neox,
                mscale: r.mscale,
            },
            None => RopeFreqs::Base(self.base),
        }
    }
}

/// Activation buffers for chunks of up to `rows` rows, reused from chunk to chunk: a
/// recorded decode step needs them at the same addresses every time.
pub(super) struct Workspace<B: Backend> {
    pub(super) x: B::Buf,
    pub(super) h: B::Buf,
    pub(super) q: B::Buf,
    pub(super) k: B::Buf,
    pub(super) v: B::Buf,
    pub(super) attn: B::Buf,
    pub(super) ao: B::Buf,
    pub(super) mid: B::Buf,
    pub(super) g: B::Buf,
    pub(super) u: B::Buf,
    pub(super) act: B::Buf,
    pub(super) f: B::Buf,
    /// Q and K before their per-head norms (models with q/k norms; empty otherwise).
    pub(super) q_raw: B::Buf,
    pub(super) k_raw: B::Buf,
    /// Attention or FFN output after its post norm (models with post norms; else empty).
    pub(super) post: B::Buf,
    /// Output head buffers, grown to the most rows the head has needed.
    pub(super) normed: B::Buf,
    pub(super) logits: B::Buf,
    pub(super) head_rows: usize,
    /// When a run keeps checkpoints: every position's rows of the kept taps (the
    /// residual stream, and maybe the branch outputs); none otherwise.
    pub(super) keep: KeptRows<B::Buf>,
}

impl<B: Backend> Workspace<B> {
    pub(super) fn new(b: &B, c: &Config, rows: usize) -> Result<Self> {
        let (e, qw, kvw, ff) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff);
        let (qk_norm, post_norms) = (c.variant.qk_norm, c.variant.post_norms);
        Ok(Self {
            x: b.alloc(rows * e)?,
            h: b.alloc(rows * e)?,
            q: b.alloc(rows * qw)?,
            k: b.alloc(rows * kvw)?,
            v: b.alloc(rows * kvw)?,
            attn: b.alloc(rows * qw)?,
            ao: b.alloc(rows * e)?,
            mid: b.alloc(rows * e)?,
            g: b.alloc(rows * ff)?,
            u: b.alloc(rows * ff)?,
            act: b.alloc(rows * ff)?,
            f: b.alloc(rows * e)?,
            q_raw: b.alloc(if qk_norm { rows * qw } else { 0 })?,
            k_raw: b.alloc(if qk_norm { rows * kvw } else { 0 })?,
            post: b.alloc(if post_norms { rows * e } else { 0 })?,
            normed: b.alloc(0)?,
            logits: b.alloc(0)?,
            head_rows: 0,
            keep: KeptRows::default(),
        })
    }
}
