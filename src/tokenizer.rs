//! The model's own tokenizer, assembled from GGUF metadata on top of the `tokenizers`
//! crate: byte-level BPE (`gpt2`, with the `smollm`, `llama3` or default pre-tokenizer)
//! and SentencePiece BPE (`llama`, merges recovered from scores, byte fallback).

use tokenizers::decoders::{byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse, sequence::Sequence as DecoderSequence, strip::Strip};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer split used by llama3-style byte-level vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: HfTokenizer,
    pub kind: String,
    pub pre: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub vocab_size: usize,
}

fn meta_err(gguf: &GgufFile, msg: String) -> Error {
    Error::input(format!("{}: tokenizer: {msg}", gguf.path.display()))
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = gguf.get(key).and_then(Value::as_array).ok_or_else(|| meta_err(gguf, format!("metadata {key} is missing or not an array")))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| meta_err(gguf, format!("{key} holds a non-string"))))
        .collect()
}

fn token_id(gguf: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n => Ok(Some(id as u32)),
            _ => Err(meta_err(gguf, format!("{key} = {} is not a token id below {n}", v.summary()))),
        },
    }
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let kind = gguf.get("tokenizer.ggml.model").and_then(Value::as_str).ok_or_else(|| meta_err(gguf, "tokenizer.ggml.model is missing".into()))?.to_string();
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err(meta_err(gguf, "the vocabulary is empty".into()));
        }
        let types: Vec<i64> = match gguf.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(a) => return Err(meta_err(gguf, format!("token_type has {} entries for {n} tokens", a.len()))),
            None => vec![1; n],
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bos_id = token_id(gguf, "tokenizer.ggml.bos_token_id", n)?;
        let eos_id = token_id(gguf, "tokenizer.ggml.eos_token_id", n)?;
        let unk_id = token_id(gguf, "tokenizer.ggml.unknown_token_id", n)?;
        let pre = gguf.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default").to_string();
        let add_bos_default = kind == "llama";
        let add_bos = gguf.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(add_bos_default);
        if add_bos && bos_id.is_none() {
            return Err(meta_err(gguf, "add_bos_token is set but bos_token_id is missing".into()));
        }
        let build_err = |e: Box<dyn std::error::Error + Send + Sync>| meta_err(gguf, e.to_string());

        let mut inner = match kind.as_str() {
            "gpt2" => {
                let merges = string_array(gguf, "tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| meta_err(gguf, format!("merge {m:?} has no space"))))
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(build_err)?;
                let mut t = HfTokenizer::new(bpe);
                let byte_level = ByteLevel::new(false, true, true);
                let pre_tok: PreTokenizerWrapper = match pre.as_str() {
                    "default" | "gpt2" | "gpt-2" => byte_level.into(),
                    // Every digit on its own, then the GPT-2 split.
                    "smollm" => PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
                    "llama3" | "llama-v3" | "llama-bpe" => {
                        let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false).map_err(build_err)?;
                        PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
                    }
                    other => return Err(meta_err(gguf, format!("pre-tokenizer {other:?} is not supported (smollm, llama3, llama-bpe, default)"))),
                };
                t.with_pre_tokenizer(Some(pre_tok));
                t.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
                t
            }
            "llama" => {
                let scores: Vec<f64> = match gguf.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                    Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                    _ => return Err(meta_err(gguf, "tokenizer.ggml.scores is missing or has the wrong length".into())),
                };
                let merges = sentencepiece_merges(&tokens, &scores, &vocab);
                let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
                if let Some(unk) = unk_id {
                    builder = builder.unk_token(tokens[unk as usize].clone());
                }
                let bpe = builder.build().map_err(build_err)?;
                let mut t = HfTokenizer::new(bpe);
                let add_space = gguf.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
                let scheme = if add_space { PrependScheme::First } else { PrependScheme::Never };
                t.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
                let mut decoders: Vec<DecoderWrapper> = vec![Replace::new("▁", " ").map_err(build_err)?.into(), ByteFallback::default().into(), Fuse::default().into()];
                if add_space {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                t.with_decoder(Some(DecoderSequence::new(decoders)));
                t
            }
            other => return Err(meta_err(gguf, format!("tokenizer model {other:?} is not supported (gpt2, llama)"))),
        };
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &ty)| AddedToken::from(tok.clone(), ty == TOKEN_TYPE_CONTROL).normalized(false))
            .collect();
        inner.add_special_tokens(added).map_err(|e| meta_err(gguf, e.to_string()))?;
        Ok(Self { inner, kind, pre, bos_id, eos_id, add_bos, vocab_size: n })
    }

    /// Token ids for `text`, with BOS when the model asks for it. Special tokens written
    /// in the text (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::input(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::input(format!("tokenizer: {e}")))
    }
}

/// SentencePiece vocabularies carry scores, not merges. A pair (a, b) merges with the
/// rank of the piece a+b, best score first; ties keep longer left, then longer right
/// parts first, then vocabulary order — the order HF's converter uses.
fn sentencepiece_merges(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String, f64)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(String, String)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&piece[..i], &piece[i..]))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[l], vocab[r]));
        merges.extend(local.into_iter().map(|(l, r)| (l, r, score)));
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2).then_with(|| chars(&b.0).cmp(&chars(&a.0))).then_with(|| chars(&b.1).cmp(&chars(&a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}
