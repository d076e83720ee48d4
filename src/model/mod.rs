//! A llama-family model (llama, qwen2, qwen3, gemma3) from a GGUF file: the
//! configuration and its [`Variant`](resbisect_taps::Variant) read from metadata (never
//! hard-coded), every metadata key and tensor classified ([`keys`]: what the oracle does
//! not implement is refused), every layer's tensors checked for presence, shape and type
//! before any compute, and a cheap stable fingerprint. Shared by every engine (reference,
//! runtime, preflight, inspect all open models here); holds no numerics.

mod keys;
mod variant;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::{dtype_name, GgufFile, TensorInfo};

/// The model configuration is part of the tap contract; its home is resbisect-taps.
pub use resbisect_taps::{Config, MAX_DIM};

pub use keys::{classify_key, Class};
/// Bytes sampled from the tensor data for the fingerprint, and how many samples.
const FINGERPRINT_SAMPLE: usize = 4096;
const FINGERPRINT_SAMPLES: usize = 64;

/// Weight types the loader accepts: everything candle dequantizes exactly.
pub fn is_supported_dtype(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

pub struct Model {
    pub gguf: GgufFile,
    pub config: Config,
    pub fingerprint: String,
    /// True when the file has no `output.weight` and the output projection reuses the
    /// token embedding.
    pub tied_output: bool,
}

/// One expected weight: name and shape in ggml order.
struct Expected {
    name: String,
    dims: Vec<u64>,
}

impl Model {
    pub fn open(path: &Path) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let arch = read_arch(&gguf)?;
        check_keys(&gguf, &arch)?;
        check_tensor_names(&gguf, &arch)?;
        let config = read_config(&gguf, arch)?;
        let tied_output = gguf.tensor("output.weight").is_none();
        validate_tensors(&gguf, &config, tied_output)?;
        let fingerprint = fingerprint(&gguf);
        Ok(Self {
            gguf,
            config,
            fingerprint,
            tied_output,
        })
    }

    /// The tensor behind a weight name, with the tied output resolved.
    pub fn weight(&self, name: &str) -> Result<&TensorInfo> {
        let resolved = if name == "output.weight" && self.tied_output {
            "token_embd.weight"
        } else {
            name
        };
        self.gguf
            .tensor(resolved)
            .ok_or_else(|| Error::input(format!("{}: missing tensor {resolved}", self.gguf.path.display())))
    }

    pub fn weight_data(&self, info: &TensorInfo) -> &[u8] {
        self.gguf.tensor_data(info)
    }

    /// Parameter count of the llama weights (for memory estimates and `inspect`).
    pub fn n_params(&self) -> u64 {
        // Saturating: tensors may share data, so the sum is not bounded by the file size.
        self.gguf
            .tensors
            .iter()
            .map(TensorInfo::n_elements)
            .fold(0u64, u64::saturating_add)
    }
}

pub(crate) fn meta_u64(gguf: &GgufFile, key: &str) -> Result<Option<u64>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::input(format!(
                "{}: metadata {key} = {} is not a non-negative integer",
                gguf.path.display(),
                v.summary()
            ))
        }),
    }
}

pub(crate) fn meta_f64(gguf: &GgufFile, key: &str) -> Result<Option<f64>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            Error::input(format!(
                "{}: metadata {key} = {} is not a number",
                gguf.path.display(),
                v.summary()
            ))
        }),
    }
}

fn required(gguf: &GgufFile, key: &str) -> Result<usize> {
    let v = meta_u64(gguf, key)?
        .ok_or_else(|| Error::input(format!("{}: metadata key {key} is missing", gguf.path.display())))?;
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0 && v <= MAX_DIM)
        .ok_or_else(|| {
            Error::input(format!(
                "{}: metadata {key} = {v} is out of range (1..=16M)",
                gguf.path.display()
            ))
        })
}

fn read_config(gguf: &GgufFile, arch: String) -> Result<Config> {
    let key = |k: &str| format!("{arch}.{k}");
    let n_layer = required(gguf, &key("block_count"))?;
    let n_embd = required(gguf, &key("embedding_length"))?;
    let n_ff = required(gguf, &key("feed_forward_length"))?;
    let n_head = required(gguf, &key("attention.head_count"))?;
    let n_head_kv = match gguf.get(&key("attention.head_count_kv")) {
        Some(_) => required(gguf, &key("attention.head_count_kv"))?,
        None => n_head,
    };
    let n_ctx = required(gguf, &key("context_length"))?;
    let (rope_base, rms_eps) = read_rope_base_and_eps(gguf, &key)?;
    let sizes = variant::Sizes {
        n_embd,
        n_head,
        n_layer,
        n_ctx,
    };
    let variant = variant::read_variant(gguf, &arch, &sizes)?;
    if !n_head.is_multiple_of(n_head_kv) {
        return Err(Error::input(format!(
            "{}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}",
            gguf.path.display()
        )));
    }
    let n_vocab = read_vocab(gguf, &key("vocab_size"))?;
    Ok(Config {
        arch,
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        n_ff,
        n_vocab,
        n_ctx,
        rope_base,
        rms_eps,
        variant,
    })
}

/// `general.architecture`, which must be one whose tensors follow the llama layout.
fn read_arch(gguf: &GgufFile) -> Result<String> {
    let p = gguf.path.display();
    let arch = gguf
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::input(format!("{p}: metadata general.architecture is missing")))?;
    if !keys::ARCHS.contains(&arch) {
        return Err(Error::input(format!(
            "{p}: architecture {arch:?} is not supported (supported: {})",
            keys::ARCHS.join(", ")
        )));
    }
    Ok(arch.to_string())
}

/// Every metadata key is understood or inert ([`keys::classify_key`]); the first that
/// is neither refuses the model, named.
fn check_keys(gguf: &GgufFile, arch: &str) -> Result<()> {
    for key in &gguf.metadata_order {
        if let Class::Refused(what) = classify_key(arch, key) {
            return Err(Error::input(format!(
                "{}: metadata {key}: {what} is not supported",
                gguf.path.display()
            )));
        }
    }
    Ok(())
}

/// Every tensor is one a model of `arch` can hold ([`keys::tensor_known`]).
fn check_tensor_names(gguf: &GgufFile, arch: &str) -> Result<()> {
    match gguf.tensors.iter().find(|t| !keys::tensor_known(arch, &t.name)) {
        Some(t) => Err(Error::input(format!(
            "{}: tensor {} is not part of a supported {arch} model; refusing rather than ignoring it",
            gguf.path.display(),
            t.name
        ))),
        None => Ok(()),
    }
}

/// RoPE's frequency base (10000 when absent) and RMSNorm's epsilon (required), in range.
fn read_rope_base_and_eps(gguf: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<(f64, f64)> {
    let p = gguf.path.display();
    let rope_base = meta_f64(gguf, &key("rope.freq_base"))?.unwrap_or(10_000.0);
    let rms_eps = meta_f64(gguf, &key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
        Error::input(format!(
            "{p}: metadata key {} is missing",
            key("attention.layer_norm_rms_epsilon")
        ))
    })?;
    if !(rope_base.is_finite() && rope_base > 1.0) {
        return Err(Error::input(format!(
            "{p}: {} = {rope_base} must be a finite number > 1",
            key("rope.freq_base")
        )));
    }
    if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
        return Err(Error::input(format!(
            "{p}: {} = {rms_eps} must be in (0, 1)",
            key("attention.layer_norm_rms_epsilon")
        )));
    }
    Ok((rope_base, rms_eps))
}

/// The vocabulary size (metadata `vocab_size`, else the tokenizer's token count), which
/// must agree with the token embedding.
fn read_vocab(gguf: &GgufFile, vocab_key: &str) -> Result<usize> {
    let p = gguf.path.display();
    let embd = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::input(format!("{p}: missing tensor token_embd.weight")))?;
    let n_vocab_from_tensor = usize::try_from(embd.dims.get(1).copied().unwrap_or(0)).unwrap_or(usize::MAX);
    let n_vocab = match meta_u64(gguf, vocab_key)? {
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
        None => gguf
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .unwrap_or(n_vocab_from_tensor),
    };
    if n_vocab == 0 || n_vocab > MAX_DIM || n_vocab != n_vocab_from_tensor {
        return Err(Error::input(format!(
            "{p}: vocab size {n_vocab} disagrees with token_embd.weight {:?}",
            embd.dims
        )));
    }
    Ok(n_vocab)
}

/// The expected weights, made one layer at a time as the check goes: the check stops
/// at the first missing one, so a hostile `block_count` costs no more than the tensors
/// the file really holds.
fn expected_tensors(c: &Config, tied_output: bool) -> impl Iterator<Item = Expected> + '_ {
    let e = |name: String, dims: &[usize]| Expected {
        name,
        dims: dims.iter().map(|&d| d as u64).collect(),
    };
    let mut outside = vec![
        e("token_embd.weight".into(), &[c.n_embd, c.n_vocab]),
        e("output_norm.weight".into(), &[c.n_embd]),
    ];
    if !tied_output {
        outside.push(e("output.weight".into(), &[c.n_embd, c.n_vocab]));
    }
    if c.variant.rope_freq_factors {
        outside.push(e("rope_freqs.weight".into(), &[c.head_dim() / 2]));
    }
    outside.into_iter().chain((0..c.n_layer).flat_map(move |l| {
        let b = |s: &str| format!("blk.{l}.{s}");
        let mut layer = vec![
            e(b("attn_norm.weight"), &[c.n_embd]),
            e(b("attn_q.weight"), &[c.n_embd, c.q_width()]),
            e(b("attn_k.weight"), &[c.n_embd, c.kv_width()]),
            e(b("attn_v.weight"), &[c.n_embd, c.kv_width()]),
            e(b("attn_output.weight"), &[c.q_width(), c.n_embd]),
            e(b("ffn_norm.weight"), &[c.n_embd]),
            e(b("ffn_gate.weight"), &[c.n_embd, c.n_ff]),
            e(b("ffn_up.weight"), &[c.n_embd, c.n_ff]),
            e(b("ffn_down.weight"), &[c.n_ff, c.n_embd]),
        ];
        let v = &c.variant;
        if v.qkv_bias {
            layer.push(e(b("attn_q.bias"), &[c.q_width()]));
            layer.push(e(b("attn_k.bias"), &[c.kv_width()]));
            layer.push(e(b("attn_v.bias"), &[c.kv_width()]));
        }
        if v.qk_norm {
            layer.push(e(b("attn_q_norm.weight"), &[c.head_dim()]));
            layer.push(e(b("attn_k_norm.weight"), &[c.head_dim()]));
        }
        if v.post_norms {
            layer.push(e(b("post_attention_norm.weight"), &[c.n_embd]));
            layer.push(e(b("post_ffw_norm.weight"), &[c.n_embd]));
        }
        layer
    }))
}

fn validate_tensors(gguf: &GgufFile, c: &Config, tied_output: bool) -> Result<()> {
    let p = gguf.path.display();
    let mut expected = std::collections::HashSet::new();
    for exp in expected_tensors(c, tied_output) {
        let info = gguf.tensor(&exp.name).ok_or_else(|| {
            Error::input(format!(
                "{p}: missing tensor {} (block_count says {} layers)",
                exp.name, c.n_layer
            ))
        })?;
        if info.dims != exp.dims {
            return Err(Error::input(format!(
                "{p}: tensor {} has shape {:?}, expected {:?} from the metadata",
                exp.name, info.dims, exp.dims
            )));
        }
        if !is_supported_dtype(info.dtype) {
            return Err(Error::input(format!(
                "{p}: tensor {} has type {}, which is not supported for weights",
                exp.name,
                dtype_name(info.dtype)
            )));
        }
        expected.insert(exp.name);
    }
    // Tensors of layers beyond block_count mean the metadata and the weights disagree
    // about the depth of the model: refuse rather than silently ignore half of it.
    for t in &gguf.tensors {
        if let Some(layer) = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            if layer >= c.n_layer {
                return Err(Error::input(format!(
                    "{p}: tensor {} belongs to layer {layer} but block_count is {}",
                    t.name, c.n_layer
                )));
            }
        }
        // A tensor the architecture knows but this model's layout does not use (a bias
        // on some layers only) would be silently ignored.
        if !expected.contains(&t.name) {
            return Err(Error::input(format!(
                "{p}: tensor {} is not used by this model's layout (e.g. present on some layers only); refusing rather than ignoring it",
                t.name
            )));
        }
    }
    Ok(())
}

/// Hash of metadata, tensor table, file size and sampled tensor data: cheap (reads
/// about 256 KiB whatever the model size) and stable across copies of the same file.
fn fingerprint(gguf: &GgufFile) -> String {
    let bytes = gguf.bytes();
    let mut h = Sha256::new();
    h.update(b"resbisect-fingerprint-v1");
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes[..gguf.header_len]);
    let data_start = gguf.header_len;
    let span = bytes.len() - data_start;
    for i in 0..FINGERPRINT_SAMPLES {
        let start = data_start + span / FINGERPRINT_SAMPLES * i;
        let end = (start + FINGERPRINT_SAMPLE).min(bytes.len());
        h.update(&bytes[start..end]);
    }
    let digest = h.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
