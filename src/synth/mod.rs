//! Synthetic models: valid GGUF files with random weights at real shapes for every
//! architecture variant the reference computes (presets.rs), any supported quant type, and
//! a small valid tokenizer section (vocab.rs), so every engine can be exercised at real
//! scale without downloading anything.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use gguf_file::Value as V;
use resbisect_taps::RopeScaling;

use crate::error::{Error, Result};
use crate::model::Config;

mod presets;
mod vocab;

pub use presets::{preset, Llama3Rope, Preset, TokenizerKind, PRESET_NAMES};
use vocab::{gpt2_vocab, sentencepiece_vocab, Vocab};

pub fn parse_quant(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => {
            return Err(Error::input(format!(
                "unknown quant type {other:?} (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k)"
            )))
        }
    })
}

/// Deterministic per-tensor seed from the user's seed and the tensor's name.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("digest has 32 bytes"))
}

/// `n` samples of mean + std·N(0,1) (Box–Muller), deterministic for a seed.
fn normal(n: usize, mean: f32, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = move || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push(mean + std * (r * t.cos()) as f32);
        out.push(mean + std * (r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

struct WeightSpec {
    name: String,
    /// ggml order
    dims: Vec<usize>,
    mean: f32,
    std: f32,
    /// Stored F32 whatever the quant (norms, biases, RoPE factors), as llama.cpp keeps
    /// one-dimensional tensors.
    keep_f32: bool,
    /// Fixed contents instead of random ones (`rope_freqs.weight`).
    values: Option<Vec<f32>>,
}

fn matrix(name: String, dims: Vec<usize>) -> WeightSpec {
    let fan_in = dims[0] as f32;
    WeightSpec {
        name,
        dims,
        mean: 0.0,
        std: fan_in.sqrt().recip(),
        keep_f32: false,
        values: None,
    }
}

/// A one-dimensional F32 tensor of `n` values around `mean` (norm weights at 1 — gemma3's
/// GGUF already holds HF's 1 + weight — biases at 0).
fn vector(name: String, n: usize, mean: f32, std: f32) -> WeightSpec {
    WeightSpec {
        name,
        dims: vec![n],
        mean,
        std,
        keep_f32: true,
        values: None,
    }
}

/// Every tensor of a preset's model, with llama.cpp's names and ggml-order shapes.
fn weight_specs(p: &Preset) -> Vec<WeightSpec> {
    let c = &p.config;
    let v = &c.variant;
    let (hd, q, kv) = (c.head_dim(), c.q_width(), c.kv_width());
    let norm = |name: String, n: usize| vector(name, n, 1.0, 0.05);
    let mut specs = vec![WeightSpec {
        std: 0.05,
        ..matrix("token_embd.weight".into(), vec![c.n_embd, c.n_vocab])
    }];
    if let Some(rope) = &p.llama3_rope {
        specs.push(WeightSpec {
            values: Some(rope.freq_factors(hd, c.rope_base)),
            ..vector("rope_freqs.weight".into(), hd / 2, 1.0, 0.0)
        });
    }
    for l in 0..c.n_layer {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        specs.extend([
            norm(b("attn_norm"), c.n_embd),
            matrix(b("attn_q"), vec![c.n_embd, q]),
            matrix(b("attn_k"), vec![c.n_embd, kv]),
            matrix(b("attn_v"), vec![c.n_embd, kv]),
            matrix(b("attn_output"), vec![q, c.n_embd]),
            norm(b("ffn_norm"), c.n_embd),
            matrix(b("ffn_gate"), vec![c.n_embd, c.n_ff]),
            matrix(b("ffn_up"), vec![c.n_embd, c.n_ff]),
            matrix(b("ffn_down"), vec![c.n_ff, c.n_embd]),
        ]);
        if v.qkv_bias {
            let bias = |s: &str, n| vector(format!("blk.{l}.{s}.bias"), n, 0.0, 0.1);
            specs.extend([bias("attn_q", q), bias("attn_k", kv), bias("attn_v", kv)]);
        }
        if v.qk_norm {
            specs.extend([norm(b("attn_q_norm"), hd), norm(b("attn_k_norm"), hd)]);
        }
        if v.post_norms {
            specs.extend([
                norm(b("post_attention_norm"), c.n_embd),
                norm(b("post_ffw_norm"), c.n_embd),
            ]);
        }
    }
    specs.push(norm("output_norm.weight".into(), c.n_embd));
    if !p.tied_output {
        specs.push(matrix("output.weight".into(), vec![c.n_embd, c.n_vocab]));
    }
    specs
}

fn make_tensor(s: &WeightSpec, quant: GgmlDType, seed: u64) -> Result<(String, QTensor)> {
    let dtype = if s.keep_f32 {
        GgmlDType::F32
    } else {
        [quant, GgmlDType::Q8_0, GgmlDType::F16]
            .into_iter()
            .find(|d| s.dims[0].is_multiple_of(d.block_size()))
            .unwrap_or(GgmlDType::F32)
    };
    let n: usize = s.dims.iter().product();
    let data = match &s.values {
        Some(values) => values.clone(),
        None => normal(n, s.mean, s.std, tensor_seed(seed, &s.name)),
    };
    let shape: Vec<usize> = s.dims.iter().rev().copied().collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| Error::input(format!("{}: {e}", s.name)))?;
    let q = QTensor::quantize(&t, dtype).map_err(|e| Error::input(format!("quantizing {}: {e}", s.name)))?;
    Ok((s.name.clone(), q))
}

/// Write a synthetic model. One-dimensional tensors stay F32 (as llama.cpp keeps them); a
/// weight whose rows do not fit the quant's block falls back to Q8_0, then F16.
pub fn write_model(preset: &Preset, quant: GgmlDType, seed: u64, out: &Path) -> Result<()> {
    let c = &preset.config;
    let vocab = match preset.tokenizer {
        TokenizerKind::Gpt2 => gpt2_vocab(c.n_vocab)?,
        TokenizerKind::SentencePiece => sentencepiece_vocab(c.n_vocab)?,
    };
    let tensors: Vec<(String, QTensor)> = weight_specs(preset)
        .par_iter()
        .map(|s| make_tensor(s, quant, seed))
        .collect::<Result<_>>()?;
    let mut meta = vec![
        ("general.architecture".into(), V::String(c.arch.clone())),
        (
            "general.name".into(),
            V::String(format!("resbisect synthetic {} seed {seed}", preset.name)),
        ),
    ];
    meta.extend(hparam_metadata(c));
    meta.extend(tokenizer_metadata(&vocab));
    write_gguf(out, &meta, &tensors)
}

/// The `{arch}.*` keys, as llama.cpp's converter writes them for such a model. Gemma 3's
/// window period, local RoPE base, embedding scale and activation have no key: llama.cpp
/// derives them from the architecture.
fn hparam_metadata(c: &Config) -> Vec<(String, V)> {
    let arch = |k: &str| format!("{}.{k}", c.arch);
    let u32_of = |n: usize| V::U32(n as u32);
    let mut meta = vec![
        (arch("block_count"), u32_of(c.n_layer)),
        (arch("context_length"), u32_of(c.n_ctx)),
        (arch("embedding_length"), u32_of(c.n_embd)),
        (arch("feed_forward_length"), u32_of(c.n_ff)),
        (arch("attention.head_count"), u32_of(c.n_head)),
        (arch("attention.head_count_kv"), u32_of(c.n_head_kv)),
        (arch("rope.freq_base"), V::F32(c.rope_base as f32)),
        (arch("rope.dimension_count"), u32_of(c.head_dim())),
        (arch("attention.layer_norm_rms_epsilon"), V::F32(c.rms_eps as f32)),
        (arch("vocab_size"), u32_of(c.n_vocab)),
    ];
    let v = &c.variant;
    if let Some(k) = v.key_length {
        meta.push((arch("attention.key_length"), u32_of(k)));
        meta.push((arch("attention.value_length"), u32_of(k)));
    }
    if let Some(w) = v.sliding_window {
        meta.push((arch("attention.sliding_window"), u32_of(w.window)));
    }
    match v.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            meta.push((arch("rope.scaling.type"), V::String("linear".into())));
            meta.push((arch("rope.scaling.factor"), V::F32(factor as f32)));
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            attn_factor,
            beta_fast,
            beta_slow,
        } => {
            meta.push((arch("rope.scaling.type"), V::String("yarn".into())));
            meta.push((arch("rope.scaling.factor"), V::F32(factor as f32)));
            meta.push((arch("rope.scaling.original_context_length"), u32_of(original_context)));
            // Written only when they differ from llama.cpp's defaults, as the converter does.
            let optional = [
                ("rope.scaling.attn_factor", attn_factor, 1.0),
                ("rope.scaling.yarn_beta_fast", beta_fast, 32.0),
                ("rope.scaling.yarn_beta_slow", beta_slow, 1.0),
            ];
            for (key, value, default) in optional {
                if value != default {
                    meta.push((arch(key), V::F32(value as f32)));
                }
            }
        }
    }
    meta
}

fn tokenizer_metadata(vocab: &Vocab) -> Vec<(String, V)> {
    let strings = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let mut meta: Vec<(String, V)> = vec![
        (
            "tokenizer.ggml.model".into(),
            V::String(if vocab.merges.is_some() { "gpt2" } else { "llama" }.into()),
        ),
        ("tokenizer.ggml.pre".into(), V::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(vocab.types.iter().map(|&t| V::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(vocab.bos)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(vocab.eos)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(vocab.add_bos)),
    ];
    if let Some(merges) = &vocab.merges {
        meta.push(("tokenizer.ggml.merges".into(), strings(merges)));
    }
    if let Some(scores) = &vocab.scores {
        meta.push((
            "tokenizer.ggml.scores".into(),
            V::Array(scores.iter().map(|&s| V::F32(s)).collect()),
        ));
    }
    if let Some(unk) = vocab.unk {
        meta.push(("tokenizer.ggml.unknown_token_id".into(), V::U32(unk)));
    }
    meta
}

/// Write a GGUF file atomically (temporary name, then rename).
pub(crate) fn write_gguf(out: &Path, meta: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::output::write_atomic(out, |tmp| {
        let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = BufWriter::new(file);
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .map_err(|e| Error::input(format!("{}: writing GGUF: {e}", out.display())))?;
        w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
        Ok(())
    })
}
