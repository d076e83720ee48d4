//! Synthetic llama models: valid GGUF files with random weights at real shapes, any
//! supported quant type, and a small valid tokenizer section, so every engine can be
//! exercised at TinyLlama scale without downloading anything.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::Config;

/// Words whose spellings become merges (gpt2) or pieces (SentencePiece) of the synthetic
/// vocabularies, so that ordinary text tokenizes into more than single bytes.
const WORDS: &[&str] = &[
    "the",
    "and",
    "of",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
    "layer",
    "token",
    "model",
    "tensor",
    "error",
    "first",
    "where",
    "which",
    "how",
    "much",
    "engine",
    "kernel",
    "position",
    "attention",
    "residual",
    "stream",
    "reference",
    "divergence",
    "memory",
    "long",
    "context",
    "prompt",
    "value",
    "query",
    "key",
    "norm",
    "hello",
    "world",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    Gpt2,
    SentencePiece,
}

#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub config: Config,
    pub tied_output: bool,
    pub tokenizer: TokenizerKind,
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

pub const PRESET_NAMES: &[&str] = &["micro", "tiny", "smollm2-135m", "tinyllama-1.1b"];

pub fn preset(name: &str) -> Result<Preset> {
    let cfg = |n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx, rope_base| Config {
        arch: "llama".into(),
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        n_ff,
        n_vocab,
        n_ctx,
        rope_base,
        rms_eps: 1e-5,
        variant: Default::default(),
    };
    Ok(match name {
        // A few tens of KB: seeds for the fuzz targets, where every input byte costs time.
        "micro" => Preset {
            name: "micro",
            config: cfg(2, 32, 4, 2, 64, 640, 256, 10_000.0),
            tied_output: false,
            tokenizer: TokenizerKind::Gpt2,
        },
        "tiny" => Preset {
            name: "tiny",
            config: cfg(2, 256, 4, 2, 512, 1024, 1024, 10_000.0),
            tied_output: false,
            tokenizer: TokenizerKind::Gpt2,
        },
        "smollm2-135m" => Preset {
            name: "smollm2-135m",
            config: cfg(30, 576, 9, 3, 1536, 49152, 8192, 100_000.0),
            tied_output: true,
            tokenizer: TokenizerKind::Gpt2,
        },
        "tinyllama-1.1b" => Preset {
            name: "tinyllama-1.1b",
            config: cfg(22, 2048, 32, 4, 5632, 32000, 2048, 10_000.0),
            tied_output: false,
            tokenizer: TokenizerKind::SentencePiece,
        },
        other => {
            return Err(Error::input(format!(
                "unknown preset {other:?} (known: {})",
                PRESET_NAMES.join(", ")
            )))
        }
    })
}

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

/// GPT-2's reversible byte → printable character map.
pub fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1 is valid")
            } else {
                let c = char::from_u32(next).expect("below surrogates");
                next += 1;
                c
            }
        })
        .collect()
}

/// Metadata of the tokenizer section.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Option<Vec<f32>>,
    merges: Option<Vec<String>>,
    bos: u32,
    eos: u32,
    unk: Option<u32>,
    add_bos: bool,
}

fn pad_vocab(tokens: &mut Vec<String>, types: &mut Vec<i32>, n_vocab: usize) -> Result<()> {
    if tokens.len() > n_vocab {
        return Err(Error::input(format!(
            "synthetic vocabulary needs {} tokens but n_vocab is {n_vocab}",
            tokens.len()
        )));
    }
    for i in tokens.len()..n_vocab {
        tokens.push(format!("<unused_{i}>"));
        types.push(5);
    }
    Ok(())
}

fn gpt2_vocab(n_vocab: usize) -> Result<Vocab> {
    let byte_chars = bytes_to_unicode();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3, 3, 3];
    tokens.extend(byte_chars.iter().map(|c| c.to_string()));
    types.extend(std::iter::repeat_n(1, 256));
    let mut merges = Vec::new();
    let mut known: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let space = byte_chars[b' ' as usize];
    for word in WORDS {
        for spelled in [format!("{space}{word}"), word.to_string()] {
            let chars: Vec<char> = spelled.chars().collect();
            let mut left = chars[0].to_string();
            for c in &chars[1..] {
                let merged = format!("{left}{c}");
                if known.insert(merged.clone()) {
                    merges.push(format!("{left} {c}"));
                    tokens.push(merged.clone());
                    types.push(1);
                }
                left = merged;
            }
        }
    }
    pad_vocab(&mut tokens, &mut types, n_vocab)?;
    Ok(Vocab {
        tokens,
        types,
        scores: None,
        merges: Some(merges),
        bos: 1,
        eos: 2,
        unk: None,
        add_bos: false,
    })
}

fn sentencepiece_vocab(n_vocab: usize) -> Result<Vocab> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    types.extend(std::iter::repeat_n(6, 256));
    let mut pieces: Vec<String> = vec!["▁".into()];
    pieces.extend(('a'..='z').chain('A'..='Z').chain('0'..='9').map(|c| c.to_string()));
    for word in WORDS {
        let spelled = format!("▁{word}");
        let chars: Vec<char> = spelled.chars().collect();
        for end in 2..=chars.len() {
            let piece: String = chars[..end].iter().collect();
            if !pieces.contains(&piece) {
                pieces.push(piece);
            }
        }
    }
    let n_fixed = tokens.len();
    tokens.extend(pieces);
    types.extend(std::iter::repeat_n(1, tokens.len() - n_fixed));
    pad_vocab(&mut tokens, &mut types, n_vocab)?;
    let scores = (0..n_vocab)
        .map(|i| {
            if i < n_fixed {
                0.0
            } else if types[i] == 5 {
                -1e9
            } else {
                -((i - n_fixed) as f32)
            }
        })
        .collect();
    Ok(Vocab {
        tokens,
        types,
        scores: Some(scores),
        merges: None,
        bos: 1,
        eos: 2,
        unk: Some(0),
        add_bos: true,
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
    is_norm: bool,
}

fn weight_specs(p: &Preset) -> Vec<WeightSpec> {
    let c = &p.config;
    let hd = c.n_embd / c.n_head;
    let w = |name: String, dims: Vec<usize>| {
        let fan_in = dims[0] as f32;
        WeightSpec {
            name,
            dims,
            mean: 0.0,
            std: fan_in.sqrt().recip(),
            is_norm: false,
        }
    };
    let norm = |name: String, n: usize| WeightSpec {
        name,
        dims: vec![n],
        mean: 1.0,
        std: 0.05,
        is_norm: true,
    };
    let mut specs = vec![WeightSpec {
        name: "token_embd.weight".into(),
        dims: vec![c.n_embd, c.n_vocab],
        mean: 0.0,
        std: 0.05,
        is_norm: false,
    }];
    for l in 0..c.n_layer {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        specs.extend([
            norm(b("attn_norm"), c.n_embd),
            w(b("attn_q"), vec![c.n_embd, c.n_head * hd]),
            w(b("attn_k"), vec![c.n_embd, c.n_head_kv * hd]),
            w(b("attn_v"), vec![c.n_embd, c.n_head_kv * hd]),
            w(b("attn_output"), vec![c.n_head * hd, c.n_embd]),
            norm(b("ffn_norm"), c.n_embd),
            w(b("ffn_gate"), vec![c.n_embd, c.n_ff]),
            w(b("ffn_up"), vec![c.n_embd, c.n_ff]),
            w(b("ffn_down"), vec![c.n_ff, c.n_embd]),
        ]);
    }
    specs.push(norm("output_norm.weight".into(), c.n_embd));
    if !p.tied_output {
        specs.push(w("output.weight".into(), vec![c.n_embd, c.n_vocab]));
    }
    specs
}

/// Write a synthetic model. Norm weights stay F32 (as llama.cpp keeps them); a weight
/// whose rows do not fit the quant's block falls back to Q8_0, then F16.
pub fn write_model(preset: &Preset, quant: GgmlDType, seed: u64, out: &Path) -> Result<()> {
    let c = &preset.config;
    let vocab = match preset.tokenizer {
        TokenizerKind::Gpt2 => gpt2_vocab(c.n_vocab)?,
        TokenizerKind::SentencePiece => sentencepiece_vocab(c.n_vocab)?,
    };
    let specs = weight_specs(preset);
    let tensors: Vec<(String, QTensor)> = specs
        .par_iter()
        .map(|s| {
            let dtype = if s.is_norm {
                GgmlDType::F32
            } else {
                [quant, GgmlDType::Q8_0, GgmlDType::F16]
                    .into_iter()
                    .find(|d| s.dims[0] % d.block_size() == 0)
                    .unwrap_or(GgmlDType::F32)
            };
            let n: usize = s.dims.iter().product();
            let data = normal(n, s.mean, s.std, tensor_seed(seed, &s.name));
            let shape: Vec<usize> = s.dims.iter().rev().copied().collect();
            let t =
                Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| Error::input(format!("{}: {e}", s.name)))?;
            let q = QTensor::quantize(&t, dtype).map_err(|e| Error::input(format!("quantizing {}: {e}", s.name)))?;
            Ok((s.name.clone(), q))
        })
        .collect::<Result<_>>()?;

    use gguf_file::Value as V;
    let arch = |k: &str| format!("llama.{k}");
    let strings = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        (
            "general.name".into(),
            V::String(format!("resbisect synthetic {} seed {seed}", preset.name)),
        ),
        (arch("block_count"), V::U32(c.n_layer as u32)),
        (arch("context_length"), V::U32(c.n_ctx as u32)),
        (arch("embedding_length"), V::U32(c.n_embd as u32)),
        (arch("feed_forward_length"), V::U32(c.n_ff as u32)),
        (arch("attention.head_count"), V::U32(c.n_head as u32)),
        (arch("attention.head_count_kv"), V::U32(c.n_head_kv as u32)),
        (arch("rope.freq_base"), V::F32(c.rope_base as f32)),
        (arch("rope.dimension_count"), V::U32((c.n_embd / c.n_head) as u32)),
        (arch("attention.layer_norm_rms_epsilon"), V::F32(c.rms_eps as f32)),
        (arch("vocab_size"), V::U32(c.n_vocab as u32)),
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
    write_gguf(out, &meta, &tensors)
}

/// Write a GGUF file atomically (temporary name, then rename).
pub(crate) fn write_gguf(out: &Path, meta: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        std::process::id()
    ));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs)
        .map_err(|e| Error::input(format!("{}: writing GGUF: {e}", out.display())))?;
    w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}
