//! How a model departs from plain llama ([`Variant`]), read from GGUF metadata and
//! tensor presence per architecture (llama, qwen2, qwen3, gemma3), following llama.cpp's
//! loader for key names and defaults. Every value is range-checked; what the oracle does
//! not implement is refused with the key named.

use resbisect_taps::{Activation, RopeScaling, RopeStyle, SlidingWindow, Variant};

use super::{meta_f64, meta_u64, MAX_DIM};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Gemma 3's period of sliding-window layers (llama.cpp `set_swa_pattern(6)`: every
/// sixth layer attends globally) and its local RoPE base when the file has no
/// `rope.freq_base_swa` (llama.cpp `rope_freq_base_train_swa = 10000`).
const GEMMA3_SWA_PERIOD: usize = 6;
const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;
/// Gemma 3 27B (62 layers) scales attention by 1/sqrt(n_embd/n_head), not by
/// 1/sqrt(head_dim) (llama.cpp `f_attention_scale`); not implemented.
const GEMMA3_27B_LAYERS: usize = 62;
/// YaRN's defaults where the file leaves them out (llama.cpp, HF `_compute_yarn_parameters`).
const YARN_BETA_FAST: f64 = 32.0;
const YARN_BETA_SLOW: f64 = 1.0;

/// The sizes [`read_variant`] needs from the rest of the config.
pub(super) struct Sizes {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub n_ctx: usize,
}

/// The architecture's [`Variant`]. Errors name the key or tensor.
pub(super) fn read_variant(gguf: &GgufFile, arch: &str, s: &Sizes) -> Result<Variant> {
    let p = gguf.path.display();
    let key = |k: &str| format!("{arch}.{k}");
    for k in ["expert_count", "expert_used_count"] {
        if meta_u64(gguf, &key(k))?.is_some_and(|n| n > 0) {
            return Err(Error::input(format!(
                "{p}: metadata {}: mixture-of-experts models are not supported",
                key(k)
            )));
        }
    }
    let key_length = read_key_length(gguf, &key, s)?;
    let gemma = arch == "gemma3";
    if gemma && s.n_layer == GEMMA3_27B_LAYERS {
        return Err(Error::input(format!(
            "{p}: gemma3 with {} layers (27B) scales attention by 1/sqrt(n_embd/n_head), which is not supported",
            s.n_layer
        )));
    }
    let has = |name: &str| gguf.tensor(name).is_some();
    let variant = Variant {
        key_length,
        rope_style: if arch == "llama" {
            RopeStyle::Normal
        } else {
            RopeStyle::Neox
        },
        rope_scaling: read_rope_scaling(gguf, &key, s.n_ctx)?,
        rope_freq_factors: has("rope_freqs.weight"),
        qkv_bias: arch == "qwen2" || (arch == "llama" && has("blk.0.attn_q.bias")),
        qk_norm: arch == "qwen3" || gemma,
        post_norms: gemma,
        ffn_activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        scale_embeddings: gemma,
        sliding_window: if gemma {
            Some(read_sliding_window(gguf, &key)?)
        } else {
            None
        },
    };
    if gemma && matches!(variant.rope_scaling, RopeScaling::Yarn { .. }) {
        return Err(Error::input(format!(
            "{p}: metadata {}: YaRN on gemma3 is not supported",
            key("rope.scaling.type")
        )));
    }
    Ok(variant)
}

/// `attention.key_length` = `value_length` (each defaulting to n_embd / n_head), as
/// `Some` only when it differs from n_embd / n_head; it must be even and fully rotated.
fn read_key_length(gguf: &GgufFile, key: &dyn Fn(&str) -> String, s: &Sizes) -> Result<Option<usize>> {
    let p = gguf.path.display();
    let natural = s.n_embd.is_multiple_of(s.n_head).then_some(s.n_embd / s.n_head);
    let length = |k: &str| -> Result<Option<usize>> {
        let v = meta_u64(gguf, &key(k))?;
        Ok(v.map(|v| usize::try_from(v).unwrap_or(usize::MAX)).or(natural))
    };
    let (k, v) = (length("attention.key_length")?, length("attention.value_length")?);
    let Some(head_dim) = k else {
        return Err(Error::input(format!(
            "{p}: embedding_length {} is not divisible by head_count {} and {} is missing",
            s.n_embd,
            s.n_head,
            key("attention.key_length")
        )));
    };
    if v != Some(head_dim) {
        return Err(Error::input(format!(
            "{p}: {} {head_dim} differs from {} {}; different key and value head sizes are not supported",
            key("attention.key_length"),
            key("attention.value_length"),
            v.map_or("(n_embd/n_head, not an integer)".to_string(), |v| v.to_string())
        )));
    }
    if !(2..=MAX_DIM).contains(&head_dim) || !head_dim.is_multiple_of(2) {
        return Err(Error::input(format!(
            "{p}: head dim {head_dim} ({}) must be even and in 2..={MAX_DIM}; RoPE needs pairs",
            key("attention.key_length")
        )));
    }
    if let Some(rope_dim) = meta_u64(gguf, &key("rope.dimension_count"))? {
        if rope_dim != head_dim as u64 {
            return Err(Error::input(format!(
                "{p}: {} {rope_dim} differs from head dim {head_dim}; partial RoPE is not supported",
                key("rope.dimension_count")
            )));
        }
    }
    Ok((Some(head_dim) != natural).then_some(head_dim))
}

/// `rope.scaling.*` as llama.cpp reads them: the type defaults to linear, the factor
/// comes from `rope.scaling.factor` or the older `rope.scale_linear`, and a factor of 1
/// (or none) means no scaling.
fn read_rope_scaling(gguf: &GgufFile, key: &dyn Fn(&str) -> String, n_ctx: usize) -> Result<RopeScaling> {
    let p = gguf.path.display();
    let kind_key = key("rope.scaling.type");
    let kind = match gguf.get(&kind_key) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| Error::input(format!("{p}: metadata {kind_key} = {} is not a string", v.summary())))?,
        ),
    };
    let factor_key = key("rope.scaling.factor");
    let factor = match meta_f64(gguf, &factor_key)? {
        Some(f) => Some(f),
        None => meta_f64(gguf, &key("rope.scale_linear"))?,
    };
    if let Some(f) = factor {
        if !(f.is_finite() && f > 0.0) {
            return Err(Error::input(format!(
                "{p}: {factor_key} = {f} must be a finite number > 0"
            )));
        }
    }
    let positive = |k: &str, default: f64| -> Result<f64> {
        let v = meta_f64(gguf, &key(k))?.unwrap_or(default);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::input(format!(
                "{p}: {} = {v} must be a finite number > 0",
                key(k)
            )))
        }
    };
    match (kind.unwrap_or("linear"), factor) {
        ("none", _) | ("linear", None) => Ok(RopeScaling::None),
        ("linear", Some(1.0)) => Ok(RopeScaling::None),
        ("linear", Some(factor)) => Ok(RopeScaling::Linear { factor }),
        ("yarn", factor) => {
            let factor =
                factor.ok_or_else(|| Error::input(format!("{p}: {kind_key} is yarn but {factor_key} is missing")))?;
            let original = meta_u64(gguf, &key("rope.scaling.original_context_length"))?
                .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
                .unwrap_or(n_ctx);
            if !(1..=MAX_DIM).contains(&original) {
                return Err(Error::input(format!(
                    "{p}: {} = {original} is out of range (1..={MAX_DIM})",
                    key("rope.scaling.original_context_length")
                )));
            }
            let (beta_fast, beta_slow) = (
                positive("rope.scaling.yarn_beta_fast", YARN_BETA_FAST)?,
                positive("rope.scaling.yarn_beta_slow", YARN_BETA_SLOW)?,
            );
            Ok(RopeScaling::Yarn {
                factor,
                original_context: original,
                attn_factor: positive("rope.scaling.attn_factor", 1.0)?,
                beta_fast,
                beta_slow,
            })
        }
        (other, _) => Err(Error::input(format!(
            "{p}: metadata {kind_key} = {other:?}: RoPE scaling {other:?} is not supported (none, linear, yarn)"
        ))),
    }
}

/// Gemma 3's sliding window: `attention.sliding_window` (required), every sixth layer
/// global, local RoPE base `rope.freq_base_swa` or 10000.
fn read_sliding_window(gguf: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<SlidingWindow> {
    let p = gguf.path.display();
    let window_key = key("attention.sliding_window");
    let window = meta_u64(gguf, &window_key)?
        .ok_or_else(|| Error::input(format!("{p}: metadata key {window_key} is missing")))?;
    let window = usize::try_from(window)
        .ok()
        .filter(|w| (1..=MAX_DIM).contains(w))
        .ok_or_else(|| Error::input(format!("{p}: {window_key} = {window} is out of range (1..={MAX_DIM})")))?;
    let local_rope_base = meta_f64(gguf, &key("rope.freq_base_swa"))?.unwrap_or(GEMMA3_LOCAL_ROPE_BASE);
    if !(local_rope_base.is_finite() && local_rope_base > 1.0) {
        return Err(Error::input(format!(
            "{p}: {} = {local_rope_base} must be a finite number > 1",
            key("rope.freq_base_swa")
        )));
    }
    Ok(SlidingWindow {
        window,
        period: GEMMA3_SWA_PERIOD,
        local_rope_base,
    })
}
