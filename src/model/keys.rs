//! Every GGUF metadata key and tensor name, classified in one place: understood (it
//! changes numerics and the oracle implements it), inert (it cannot change the forward
//! pass: descriptive, tokenizer, quantizer provenance) or refused (the model is refused,
//! naming the key or tensor). An unknown key is refused: a key we do not know may change
//! numerics, and an oracle that silently ignores it is quietly wrong.
//!
//! Key names follow llama.cpp's `llama-arch.cpp` / gguf-py's `constants.py`.

/// What a metadata key or tensor means to the oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Read and implemented (its value is validated where it is read).
    Understood,
    /// Cannot change the forward pass.
    Inert,
    /// Changes numerics in a way that is not implemented; the text says what.
    Refused(&'static str),
}

/// Architectures the oracle implements.
pub const ARCHS: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// `{arch}.` keys every supported architecture understands.
const COMMON_ARCH_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scale_linear",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "rope.scaling.attn_factor",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    // Only zero is accepted (checked where read): a dense model.
    "expert_count",
    "expert_used_count",
];

/// `{arch}.` keys understood by one architecture only.
const ARCH_ONLY_KEYS: &[(&str, &str)] = &[("gemma3", "attention.sliding_window"), ("gemma3", "rope.freq_base_swa")];

/// `{arch}.` keys that cannot change the forward pass.
const INERT_ARCH_KEYS: &[&str] = &[
    // Whether the model was fine-tuned at its scaled context: informational.
    "rope.scaling.finetuned",
];

/// `{arch}.` keys known to change numerics in ways the oracle does not implement.
const REFUSED_ARCH_KEYS: &[(&str, &str)] = &[
    ("rope.scaling.yarn_ext_factor", "a YaRN extrapolation mix other than 1"),
    ("rope.scaling.yarn_attn_factor", "a separate YaRN attention factor"),
    ("rope.scaling.yarn_log_multiplier", "YaRN's log-multiplier mscale"),
    ("rope.scaling.alpha", "NTK-alpha RoPE scaling"),
    ("rope.dimension_sections", "multi-section (M-)RoPE"),
    ("attention.sliding_window_pattern", "a per-layer sliding-window pattern"),
    ("attn_logit_softcapping", "attention logit soft-capping"),
    ("final_logit_softcapping", "final logit soft-capping"),
    ("attention.scale", "a custom attention scale"),
    ("attention.causal", "non-causal attention"),
    ("attention.clamp_kqv", "clamped Q/K/V"),
    ("attention.max_alibi_bias", "ALiBi"),
    ("embedding_scale", "an embedding scale"),
    ("residual_scale", "a residual scale"),
    ("logit_scale", "a logit scale"),
    ("use_parallel_residual", "parallel residual blocks"),
    ("pooling_type", "pooled (embedding-model) output"),
];

/// Classify a metadata key of a file whose `general.architecture` is `arch`.
pub fn classify_key(arch: &str, key: &str) -> Class {
    if key == "general.architecture" {
        return Class::Understood;
    }
    // general.alignment is applied by the GGUF parser; every other general.* key
    // (name, license, file_type, quantization_version, base_model.*, sampling hints…)
    // describes the file, not the forward pass.
    if key.starts_with("general.") || key.starts_with("tokenizer.") || key.starts_with("quantize.") {
        return Class::Inert;
    }
    if key.starts_with("split.") {
        return Class::Refused("split GGUF files (merge them with llama-gguf-split --merge)");
    }
    let Some(rest) = key.strip_prefix(arch).and_then(|r| r.strip_prefix('.')) else {
        return Class::Refused("a key of another architecture or namespace");
    };
    if COMMON_ARCH_KEYS.contains(&rest) || ARCH_ONLY_KEYS.contains(&(arch, rest)) {
        return Class::Understood;
    }
    if INERT_ARCH_KEYS.contains(&rest) {
        return Class::Inert;
    }
    match REFUSED_ARCH_KEYS.iter().find(|(k, _)| *k == rest) {
        Some((_, what)) => Class::Refused(what),
        None => Class::Refused("an unknown key, which may change numerics"),
    }
}

/// The per-layer tensors (`blk.L.<name>.weight` / `.bias`) an architecture may hold,
/// beyond the llama block; `true` when required. The reading of [`crate::model`]
/// decides the optional ones from their presence.
pub fn extra_layer_tensors(arch: &str) -> &'static [(&'static str, bool)] {
    match arch {
        // Bias on Q, K and V: optional in llama (all three or none), required in qwen2.
        "llama" => &[("attn_q.bias", false), ("attn_k.bias", false), ("attn_v.bias", false)],
        "qwen2" => &[("attn_q.bias", true), ("attn_k.bias", true), ("attn_v.bias", true)],
        "qwen3" => &[("attn_q_norm.weight", true), ("attn_k_norm.weight", true)],
        "gemma3" => &[
            ("attn_q_norm.weight", true),
            ("attn_k_norm.weight", true),
            ("post_attention_norm.weight", true),
            ("post_ffw_norm.weight", true),
        ],
        _ => &[],
    }
}

/// The llama block's tensors, present in every supported architecture.
pub const LAYER_TENSORS: &[&str] = &[
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// Tensors outside the layers: `output.weight` is optional (tied to the embedding),
/// `rope_freqs.weight` (per-dim RoPE frequency factors) only in llama.
pub fn outside_tensor_known(arch: &str, name: &str) -> bool {
    matches!(name, "token_embd.weight" | "output_norm.weight" | "output.weight")
        || (arch == "llama" && name == "rope_freqs.weight")
}

/// Whether `name` is a tensor the architecture can hold; the message of a refusal
/// names it.
pub fn tensor_known(arch: &str, name: &str) -> bool {
    match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((layer, rest)) if layer.bytes().all(|b| b.is_ascii_digit()) && !layer.is_empty() => {
            LAYER_TENSORS.contains(&rest) || extra_layer_tensors(arch).iter().any(|(t, _)| *t == rest)
        }
        _ => outside_tensor_known(arch, name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys as real GGUFs carry them: SmolLM2 / Llama 3.2 (llama), Qwen2.5, Qwen3,
    // Gemma 3 and Mistral (carried as llama), per llama.cpp's gguf key constants.
    const UNDERSTOOD: &[(&str, &str)] = &[
        ("llama", "general.architecture"),
        ("llama", "llama.block_count"),
        ("llama", "llama.context_length"),
        ("llama", "llama.embedding_length"),
        ("llama", "llama.feed_forward_length"),
        ("llama", "llama.attention.head_count"),
        ("llama", "llama.attention.head_count_kv"),
        ("llama", "llama.rope.freq_base"),
        ("llama", "llama.attention.layer_norm_rms_epsilon"),
        ("llama", "llama.vocab_size"),
        ("llama", "llama.rope.dimension_count"),
        ("llama", "llama.attention.key_length"),
        ("llama", "llama.attention.value_length"),
        ("llama", "llama.rope.scaling.type"),
        ("llama", "llama.rope.scaling.factor"),
        ("llama", "llama.rope.scaling.original_context_length"),
        ("llama", "llama.rope.scale_linear"),
        ("llama", "llama.expert_count"),
        ("qwen2", "qwen2.rope.scaling.yarn_beta_fast"),
        ("qwen2", "qwen2.rope.scaling.attn_factor"),
        ("qwen3", "qwen3.attention.key_length"),
        ("gemma3", "gemma3.attention.sliding_window"),
        ("gemma3", "gemma3.rope.freq_base_swa"),
    ];
    const INERT: &[(&str, &str)] = &[
        ("llama", "general.name"),
        ("llama", "general.type"),
        ("llama", "general.organization"),
        ("llama", "general.finetune"),
        ("llama", "general.basename"),
        ("llama", "general.size_label"),
        ("llama", "general.license"),
        ("llama", "general.languages"),
        ("llama", "general.tags"),
        ("llama", "general.base_model.0.repo_url"),
        ("llama", "general.file_type"),
        ("llama", "general.quantization_version"),
        ("llama", "general.alignment"),
        ("llama", "tokenizer.ggml.model"),
        ("llama", "tokenizer.ggml.pre"),
        ("llama", "tokenizer.ggml.tokens"),
        ("llama", "tokenizer.ggml.token_type"),
        ("llama", "tokenizer.ggml.merges"),
        ("llama", "tokenizer.ggml.bos_token_id"),
        ("llama", "tokenizer.ggml.add_bos_token"),
        ("llama", "tokenizer.ggml.add_space_prefix"),
        ("gemma3", "tokenizer.ggml.scores"),
        ("llama", "tokenizer.chat_template"),
        ("llama", "quantize.imatrix.file"),
        ("llama", "quantize.imatrix.dataset"),
        ("llama", "quantize.imatrix.entries_count"),
        ("llama", "quantize.imatrix.chunks_count"),
        ("llama", "llama.rope.scaling.finetuned"),
    ];
    const REFUSED: &[(&str, &str)] = &[
        ("llama", "split.no"),
        ("llama", "split.count"),
        ("llama", "split.tensors.count"),
        ("llama", "qwen2.block_count"),
        ("qwen2", "llama.rope.freq_base"),
        ("llama", "llama.rope.scaling.yarn_ext_factor"),
        ("llama", "llama.rope.scaling.yarn_log_multiplier"),
        ("llama", "llama.rope.dimension_sections"),
        ("gemma3", "gemma3.final_logit_softcapping"),
        ("gemma3", "gemma3.attn_logit_softcapping"),
        ("gemma3", "gemma3.attention.sliding_window_pattern"),
        ("llama", "llama.attention.sliding_window"),
        ("llama", "llama.some_future_key"),
        ("llama", "mystery"),
    ];

    #[test]
    fn keys_of_real_models_are_classified() {
        for &(arch, k) in UNDERSTOOD {
            assert_eq!(classify_key(arch, k), Class::Understood, "{k}");
        }
        for &(arch, k) in INERT {
            assert_eq!(classify_key(arch, k), Class::Inert, "{k}");
        }
        for &(arch, k) in REFUSED {
            assert!(matches!(classify_key(arch, k), Class::Refused(_)), "{k}");
        }
    }

    #[test]
    fn tensors_are_known_per_architecture() {
        for name in [
            "token_embd.weight",
            "output.weight",
            "blk.0.attn_q.weight",
            "blk.12.ffn_down.weight",
        ] {
            for arch in ARCHS {
                assert!(tensor_known(arch, name), "{arch} {name}");
            }
        }
        assert!(tensor_known("llama", "rope_freqs.weight"));
        assert!(!tensor_known("gemma3", "rope_freqs.weight"));
        assert!(tensor_known("qwen2", "blk.3.attn_k.bias"));
        assert!(!tensor_known("qwen3", "blk.3.attn_k.bias"));
        assert!(tensor_known("qwen3", "blk.3.attn_k_norm.weight"));
        assert!(tensor_known("gemma3", "blk.3.post_ffw_norm.weight"));
        assert!(!tensor_known("llama", "blk.3.post_ffw_norm.weight"));
        for bad in [
            "blk.0.attn_output.bias",
            "blk.x.attn_q.weight",
            "blk..attn_q.weight",
            "rope_factors_long.weight",
        ] {
            assert!(!tensor_known("llama", bad), "{bad}");
        }
    }
}
