//! The model's hyper-parameters, as read from GGUF metadata and recorded in a dump's
//! manifest (docs/dump-format.md); every tap width derives from them.

use serde::{Deserialize, Serialize};

/// Model hyper-parameters, as recorded in a dump's manifest (docs/dump-format.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    /// How this architecture departs from plain llama. Every field defaults to llama's
    /// behaviour and is left out of a manifest when it has it, so llama manifests are
    /// unchanged and older manifests still load.
    #[serde(default, flatten)]
    pub variant: Variant,
}

/// The architecture's departures from the plain llama block (pre-norm RMSNorm, RoPE on
/// adjacent pairs, SiLU-gated FFN, causal attention over the whole prefix). Each field
/// names the GGUF metadata key or tensor it comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// `{arch}.attention.key_length` (= `value_length`) when it is not n_embd / n_head
    /// (Gemma 3: 256 with n_embd 640 and 4 heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_length: Option<usize>,
    /// Which dims RoPE rotates together: llama GGUFs store Q/K permuted for adjacent
    /// pairs; qwen2, qwen3 and gemma3 rotate dim i with dim i + head_dim/2 (NeoX).
    #[serde(default, skip_serializing_if = "is_default")]
    pub rope_style: RopeStyle,
    /// `{arch}.rope.scaling.*`: position scaling of the rotary frequencies.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rope_scaling: RopeScaling,
    /// Tensor `rope_freqs.weight` is present: each frequency is divided by its factor
    /// (Llama 3.x "llama3" scaling, precomputed by the converter).
    #[serde(default, skip_serializing_if = "is_default")]
    pub rope_freq_factors: bool,
    /// `blk.L.attn_{q,k,v}.bias` (qwen2).
    #[serde(default, skip_serializing_if = "is_default")]
    pub qkv_bias: bool,
    /// `blk.L.attn_{q,k}_norm.weight`: RMSNorm over each head of Q and K before RoPE
    /// (qwen3, gemma3).
    #[serde(default, skip_serializing_if = "is_default")]
    pub qk_norm: bool,
    /// `blk.L.post_attention_norm.weight` and `blk.L.post_ffw_norm.weight`: RMSNorm of the
    /// attention and FFN outputs before they join the residual stream (gemma3).
    #[serde(default, skip_serializing_if = "is_default")]
    pub post_norms: bool,
    /// The gate's activation in the gated FFN.
    #[serde(default, skip_serializing_if = "is_default")]
    pub ffn_activation: Activation,
    /// Token embeddings are multiplied by sqrt(n_embd) (gemma3).
    #[serde(default, skip_serializing_if = "is_default")]
    pub scale_embeddings: bool,
    /// Sliding-window attention on some layers (gemma3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Dims (2i, 2i+1) rotate together (llama.cpp `LLAMA_ROPE_TYPE_NORM`).
    #[default]
    Normal,
    /// Dims (i, i + head_dim/2) rotate together (llama.cpp `LLAMA_ROPE_TYPE_NEOX`, HF).
    Neox,
}

/// `{arch}.rope.scaling.type` and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (`rope.scaling.factor`).
    Linear { factor: f64 },
    /// YaRN (Peng et al. 2023, arXiv:2309.00071): `factor`, `original_context`
    /// (`rope.scaling.original_context_length`), `attn_factor`
    /// (`rope.scaling.attn_factor`, default 1), `beta_fast`/`beta_slow` (`rope.scaling.
    /// yarn_beta_fast`/`_slow`, defaults 32 and 1).
    Yarn {
        factor: f64,
        original_context: usize,
        attn_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Silu,
    /// GELU, tanh approximation (gemma3).
    GeluTanh,
}

/// Sliding-window attention: on a windowed layer, position i attends to positions j
/// with i - window < j <= i.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// `{arch}.attention.sliding_window`.
    pub window: usize,
    /// Every `period`-th layer (layer index % period == period - 1) attends globally;
    /// the others are windowed (gemma3: 6).
    pub period: usize,
    /// RoPE base on windowed layers (gemma3: 10000, the global layers use `rope_base`).
    pub local_rope_base: f64,
}

impl SlidingWindow {
    /// True when layer `layer` is windowed.
    pub fn applies_to(&self, layer: usize) -> bool {
        layer % self.period != self.period - 1
    }
}

/// Largest value of any size in a config (layers, widths, vocabulary, context): far
/// beyond real models, small enough that products of two stay within 64 bits.
pub const MAX_DIM: usize = 1 << 24;

impl Config {
    /// Checks that make the derived sizes safe to compute: every size in 1..=MAX_DIM,
    /// heads dividing the width and the KV heads dividing the heads. The message names
    /// the field (as a dump manifest spells it).
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("n_ff", self.n_ff),
            ("n_vocab", self.n_vocab),
            ("n_ctx", self.n_ctx),
        ];
        for (name, v) in sizes {
            if !(1..=MAX_DIM).contains(&v) {
                return Err(format!("model.{name} = {v} is out of range (1..={MAX_DIM})"));
            }
        }
        if let Some(k) = self.variant.key_length {
            if !(2..=MAX_DIM).contains(&k) || !k.is_multiple_of(2) {
                return Err(format!("model.key_length = {k} must be even and in 2..={MAX_DIM}"));
            }
        } else if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "model.n_embd {} is not divisible by model.n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if let Some(w) = self.variant.sliding_window {
            if !(1..=MAX_DIM).contains(&w.window) || !(1..=MAX_DIM).contains(&w.period) {
                return Err(format!(
                    "model.sliding_window {{ window {}, period {} }} is out of range (1..={MAX_DIM})",
                    w.window, w.period
                ));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "model.n_head {} is not a multiple of model.n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        Ok(())
    }

    /// Width of one attention head: `attention.key_length`, else n_embd / n_head.
    pub fn head_dim(&self) -> usize {
        self.variant.key_length.unwrap_or(self.n_embd / self.n_head)
    }

    /// The window of layer `layer`, when it is a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.variant
            .sliding_window
            .filter(|w| w.applies_to(layer))
            .map(|w| w.window)
    }

    /// RoPE's frequency base on layer `layer`.
    pub fn rope_base_of(&self, layer: usize) -> f64 {
        match self.variant.sliding_window {
            Some(w) if w.applies_to(layer) => w.local_rope_base,
            _ => self.rope_base,
        }
    }

    /// Width of the query rows (and of the attention output before its projection).
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim()
    }

    /// Width of the key and value rows.
    pub fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim()
    }
}
