//! The synthetic model presets: one per architecture variant the reference computes, each
//! at a small CI shape (`*-tiny`) and, where a public model has that architecture, at its
//! real shape (for GPU runs). Every hyper-parameter is the one llama.cpp's converter would
//! write for such a model; the weights are random (src/synth/mod.rs).

use resbisect_taps::{Activation, RopeScaling, RopeStyle, SlidingWindow, Variant};

use crate::error::{Error, Result};
use crate::model::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    Gpt2,
    SentencePiece,
}

impl TokenizerKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "gpt2" => Ok(Self::Gpt2),
            "llama" | "spm" => Ok(Self::SentencePiece),
            other => Err(Error::input(format!("unknown tokenizer kind {other:?} (gpt2, llama)"))),
        }
    }
}

/// Llama 3.x "llama3" RoPE scaling as HF's `rope_scaling` states it. llama.cpp's converter
/// bakes it into the `rope_freqs.weight` tensor (one divisor per rotated pair); the preset
/// keeps the parameters so an independent implementation can recompute the tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_context: usize,
}

impl Llama3Rope {
    /// The divisor of each RoPE frequency base^(-2i/head_dim), i in 0..head_dim/2:
    /// 1 for wavelengths shorter than original_context / high_freq_factor, `factor` for
    /// wavelengths longer than original_context / low_freq_factor, and a smooth blend
    /// between (Meta's Llama 3.1 reference code, `apply_scaling`; llama.cpp's converter
    /// stores these divisors).
    pub fn freq_factors(&self, head_dim: usize, rope_base: f64) -> Vec<f32> {
        let ctx = self.original_context as f64;
        let (low_wavelen, high_wavelen) = (ctx / self.low_freq_factor, ctx / self.high_freq_factor);
        (0..head_dim / 2)
            .map(|i| {
                let freq = rope_base.powf(-((2 * i) as f64) / head_dim as f64);
                let wavelen = std::f64::consts::TAU / freq;
                let divisor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth =
                        (ctx / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                };
                divisor as f32
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub config: Config,
    pub tied_output: bool,
    pub tokenizer: TokenizerKind,
    /// Present when the model carries a `rope_freqs.weight` tensor (config.variant.
    /// rope_freq_factors): the parameters it is computed from.
    pub llama3_rope: Option<Llama3Rope>,
}

pub const PRESET_NAMES: &[&str] = &[
    "micro",
    "tiny",
    "smollm2-135m",
    "tinyllama-1.1b",
    "llama3-tiny",
    "llama3.2-1b",
    "yarn-tiny",
    "linear-tiny",
    "qwen2-tiny",
    "qwen2.5-0.5b",
    "qwen3-tiny",
    "qwen3-0.6b",
    "gemma3-tiny",
    "gemma3-270m",
];

/// Sizes of a preset, in Config's order.
struct Sizes {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    n_head_kv: usize,
    n_ff: usize,
    n_vocab: usize,
    n_ctx: usize,
    rope_base: f64,
}

fn config(arch: &str, s: Sizes, rms_eps: f64, variant: Variant) -> Config {
    Config {
        arch: arch.into(),
        n_layer: s.n_layer,
        n_embd: s.n_embd,
        n_head: s.n_head,
        n_head_kv: s.n_head_kv,
        n_ff: s.n_ff,
        n_vocab: s.n_vocab,
        n_ctx: s.n_ctx,
        rope_base: s.rope_base,
        rms_eps,
        variant,
    }
}

/// The CI shape shared by the llama-family `*-tiny` presets: 2 layers, GQA 4:2, 2048
/// positions so a >= 1000-token prompt fits.
fn tiny_sizes(rope_base: f64) -> Sizes {
    Sizes {
        n_layer: 2,
        n_embd: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 512,
        n_vocab: 1024,
        n_ctx: 2048,
        rope_base,
    }
}

fn llama(name: &'static str, s: Sizes, tied_output: bool, tokenizer: TokenizerKind) -> Preset {
    Preset {
        name,
        config: config("llama", s, 1e-5, Variant::default()),
        tied_output,
        tokenizer,
        llama3_rope: None,
    }
}

/// Llama 3.1's scaling parameters (factor 8, low 1, high 4); `original_context` 512 on the
/// tiny preset so the scaled and the blended bands both matter within 2048 positions.
fn llama3(name: &'static str, s: Sizes, original_context: usize, factor: f64) -> Preset {
    let mut p = llama(name, s, true, TokenizerKind::Gpt2);
    p.config.variant.rope_freq_factors = true;
    p.llama3_rope = Some(Llama3Rope {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context,
    });
    p
}

fn scaled(name: &'static str, rope_scaling: RopeScaling) -> Preset {
    let mut p = llama(name, tiny_sizes(10_000.0), false, TokenizerKind::Gpt2);
    p.config.variant.rope_scaling = rope_scaling;
    p
}

fn qwen(name: &'static str, arch: &str, s: Sizes, key_length: Option<usize>) -> Preset {
    let qwen3 = arch == "qwen3";
    let variant = Variant {
        key_length,
        rope_style: RopeStyle::Neox,
        qkv_bias: !qwen3,
        qk_norm: qwen3,
        ..Variant::default()
    };
    Preset {
        name,
        config: config(arch, s, 1e-6, variant),
        tied_output: true,
        tokenizer: TokenizerKind::Gpt2,
        llama3_rope: None,
    }
}

/// Gemma 3: every 6th layer global (llama.cpp's fixed pattern for gemma3), the others
/// windowed with RoPE base 10000; embeddings scaled, GELU-tanh, q/k and post norms.
fn gemma3(name: &'static str, s: Sizes, key_length: usize, window: usize) -> Preset {
    let variant = Variant {
        key_length: Some(key_length),
        rope_style: RopeStyle::Neox,
        qk_norm: true,
        post_norms: true,
        ffn_activation: Activation::GeluTanh,
        scale_embeddings: true,
        sliding_window: Some(SlidingWindow {
            window,
            period: 6,
            local_rope_base: 10_000.0,
        }),
        ..Variant::default()
    };
    Preset {
        name,
        config: config("gemma3", s, 1e-6, variant),
        tied_output: true,
        tokenizer: TokenizerKind::SentencePiece,
        llama3_rope: None,
    }
}

/// Sizes from (n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx, rope_base), so the
/// preset table stays one line per preset.
type SizeRow = (usize, usize, usize, usize, usize, usize, usize, f64);

fn sizes((n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx, rope_base): SizeRow) -> Sizes {
    Sizes {
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        n_ff,
        n_vocab,
        n_ctx,
        rope_base,
    }
}

/// The preset called `name`; an unknown name is an input error listing the known ones.
pub fn preset(name: &str) -> Result<Preset> {
    use TokenizerKind::{Gpt2, SentencePiece};
    Ok(match name {
        // A few tens of KB: seeds for the fuzz targets, where every input byte costs time.
        "micro" => llama("micro", sizes((2, 32, 4, 2, 64, 640, 256, 10_000.0)), false, Gpt2),
        "tiny" => llama("tiny", tiny_sizes(10_000.0), false, Gpt2),
        "smollm2-135m" => llama(
            "smollm2-135m",
            sizes((30, 576, 9, 3, 1536, 49152, 8192, 100_000.0)),
            true,
            Gpt2,
        ),
        "tinyllama-1.1b" => llama(
            "tinyllama-1.1b",
            sizes((22, 2048, 32, 4, 5632, 32000, 2048, 10_000.0)),
            false,
            SentencePiece,
        ),
        "llama3-tiny" => llama3("llama3-tiny", tiny_sizes(500_000.0), 512, 8.0),
        // Llama 3.2 1B: factor 32 over an original 8192 positions.
        "llama3.2-1b" => llama3(
            "llama3.2-1b",
            sizes((16, 2048, 32, 8, 8192, 128256, 131072, 500_000.0)),
            8192,
            32.0,
        ),
        "yarn-tiny" => scaled(
            "yarn-tiny",
            RopeScaling::Yarn {
                factor: 4.0,
                original_context: 512,
                attn_factor: 1.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
        ),
        "linear-tiny" => scaled("linear-tiny", RopeScaling::Linear { factor: 4.0 }),
        "qwen2-tiny" => qwen("qwen2-tiny", "qwen2", tiny_sizes(1_000_000.0), None),
        "qwen2.5-0.5b" => qwen(
            "qwen2.5-0.5b",
            "qwen2",
            sizes((24, 896, 14, 2, 4864, 151936, 32768, 1_000_000.0)),
            None,
        ),
        // key_length 128 with n_embd / n_head = 64, as Qwen3-0.6B (128 vs 1024 / 16).
        "qwen3-tiny" => qwen("qwen3-tiny", "qwen3", tiny_sizes(1_000_000.0), Some(128)),
        "qwen3-0.6b" => qwen(
            "qwen3-0.6b",
            "qwen3",
            sizes((28, 1024, 16, 8, 3072, 151936, 40960, 1_000_000.0)),
            Some(128),
        ),
        // 6 layers: five windowed (window 128) and one global, key_length 64 vs 128 / 4.
        "gemma3-tiny" => gemma3(
            "gemma3-tiny",
            sizes((6, 128, 4, 1, 512, 1024, 2048, 1_000_000.0)),
            64,
            128,
        ),
        "gemma3-270m" => gemma3(
            "gemma3-270m",
            sizes((18, 640, 4, 1, 2048, 262144, 32768, 1_000_000.0)),
            256,
            512,
        ),
        other => {
            return Err(Error::input(format!(
                "unknown preset {other:?} (known: {})",
                PRESET_NAMES.join(", ")
            )))
        }
    })
}
