//! The model's own tokenizer, assembled from GGUF metadata on top of the `tokenizers`
//! crate: byte-level BPE (`gpt2`, with the `smollm`, `llama3` or default pre-tokenizer)
//! and SentencePiece BPE (`llama`, merges recovered from scores, byte fallback).

use tokenizers::decoders::{
    byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse,
    sequence::Sequence as DecoderSequence, strip::Strip,
};
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

fn string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<&'a [String]> {
    let arr = gguf
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| meta_err(gguf, format!("metadata {key} is missing or not an array")))?;
    arr.strings()
        .ok_or_else(|| meta_err(gguf, format!("{key} is not an array of strings")))
}

fn token_id(gguf: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n => Ok(Some(id as u32)),
            _ => Err(meta_err(
                gguf,
                format!("{key} = {} is not a token id below {n}", v.summary()),
            )),
        },
    }
}

/// GGUF token types, one per token; absent means all normal (1).
fn token_types(gguf: &GgufFile, n: usize) -> Result<Vec<i64>> {
    match gguf.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) if a.len() == n => Ok(a.integers().map(|v| v.unwrap_or(1)).collect()),
        Some(a) => Err(meta_err(
            gguf,
            format!("token_type has {} entries for {n} tokens", a.len()),
        )),
        None => Ok(vec![1; n]),
    }
}

fn build_err(gguf: &GgufFile) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |e| meta_err(gguf, e.to_string())
}

/// Byte-level BPE (`tokenizer.ggml.model = gpt2`) with the merges stored in the file and the
/// pre-tokenizer named by `tokenizer.ggml.pre`.
fn byte_level_bpe(gguf: &GgufFile, vocab: Vocab, pre: &str) -> Result<HfTokenizer> {
    let merges = string_array(gguf, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| meta_err(gguf, format!("merge {m:?} has no space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(build_err(gguf))?;
    let mut t = HfTokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tok: PreTokenizerWrapper = match pre {
        "default" | "gpt2" | "gpt-2" => byte_level.into(),
        // Every digit on its own, then the GPT-2 split.
        "smollm" => PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "llama3" | "llama-v3" | "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(build_err(gguf))?;
            PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        other => {
            return Err(meta_err(
                gguf,
                format!("pre-tokenizer {other:?} is not supported (smollm, llama3, llama-bpe, default)"),
            ))
        }
    };
    t.with_pre_tokenizer(Some(pre_tok));
    t.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
    Ok(t)
}

/// SentencePiece BPE (`tokenizer.ggml.model = llama`): merges recovered from the scores,
/// byte fallback, `▁` for spaces.
fn sentencepiece_bpe(gguf: &GgufFile, tokens: &[String], vocab: Vocab, unk_id: Option<u32>) -> Result<HfTokenizer> {
    let n = tokens.len();
    let scores: Vec<f64> = match gguf.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(a) if a.len() == n => a.numbers().map(|v| v.unwrap_or(0.0)).collect(),
        _ => {
            return Err(meta_err(
                gguf,
                "tokenizer.ggml.scores is missing or has the wrong length".into(),
            ))
        }
    };
    let merges = sentencepiece_merges(tokens, &scores, &vocab).map_err(|e| meta_err(gguf, e))?;
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk_id {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(build_err(gguf))?;
    let mut t = HfTokenizer::new(bpe);
    let add_space = gguf
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let scheme = if add_space {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    t.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(build_err(gguf))?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    t.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(t)
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let kind = gguf
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| meta_err(gguf, "tokenizer.ggml.model is missing".into()))?
            .to_string();
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err(meta_err(gguf, "the vocabulary is empty".into()));
        }
        let types = token_types(gguf, n)?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bos_id = token_id(gguf, "tokenizer.ggml.bos_token_id", n)?;
        let eos_id = token_id(gguf, "tokenizer.ggml.eos_token_id", n)?;
        let unk_id = token_id(gguf, "tokenizer.ggml.unknown_token_id", n)?;
        let pre = gguf
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let add_bos_default = kind == "llama";
        let add_bos = gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(add_bos_default);
        if add_bos && bos_id.is_none() {
            return Err(meta_err(
                gguf,
                "add_bos_token is set but bos_token_id is missing".into(),
            ));
        }
        let mut inner = match kind.as_str() {
            "gpt2" => byte_level_bpe(gguf, vocab, &pre)?,
            "llama" => sentencepiece_bpe(gguf, tokens, vocab, unk_id)?,
            other => {
                return Err(meta_err(
                    gguf,
                    format!("tokenizer model {other:?} is not supported (gpt2, llama)"),
                ))
            }
        };
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &ty)| AddedToken::from(tok.clone(), ty == TOKEN_TYPE_CONTROL).normalized(false))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| meta_err(gguf, e.to_string()))?;
        Ok(Self {
            inner,
            kind,
            pre,
            bos_id,
            eos_id,
            add_bos,
            vocab_size: n,
        })
    }

    /// Token ids for `text`, with BOS when the model asks for it. Special tokens written
    /// in the text (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::input(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::input(format!("tokenizer: {e}")))
    }
}

/// Longest SentencePiece piece, in characters, whose merges are recovered. Real
/// vocabularies stay within a few dozen; every split point of a piece is looked up, so
/// the cost of a piece grows with the square of its length.
const MAX_PIECE_CHARS: usize = 256;
/// The recovered merges may hold at most this many bytes per byte of vocabulary (real
/// vocabularies need 2 to 5: most pieces have a few valid splits), or the allowance
/// below, whichever is larger; a vocabulary built to need more (every prefix and suffix
/// of every piece present) is refused rather than costing memory cubic in its length.
const MERGE_BYTES_PER_VOCAB_BYTE: usize = 32;
const MERGE_BYTES_ALLOWANCE: usize = 1 << 20;

/// SentencePiece vocabularies carry scores, not merges. A pair (a, b) merges with the
/// rank of the piece a+b, best score first; ties keep longer left, then longer right
/// parts first, then vocabulary order — the order HF's converter uses. Candidates are
/// held as (piece, split) indices and sorted on precomputed keys; strings are built
/// only for the final list. The error names the field and the limit.
fn sentencepiece_merges(
    tokens: &[String],
    scores: &[f64],
    vocab: &Vocab,
) -> std::result::Result<Vec<(String, String)>, String> {
    let mut vocab_bytes = 0usize;
    for (i, piece) in tokens.iter().enumerate() {
        let n = piece.chars().count();
        if n > MAX_PIECE_CHARS {
            return Err(format!("tokenizer.ggml.tokens[{i}] is {n} characters long; SentencePiece pieces over {MAX_PIECE_CHARS} characters are refused"));
        }
        vocab_bytes += piece.len();
    }
    let budget = vocab_bytes
        .saturating_mul(MERGE_BYTES_PER_VOCAB_BYTE)
        .max(MERGE_BYTES_ALLOWANCE);
    // (piece, split byte, left chars, right chars); pieces are at most 256 characters.
    let mut candidates: Vec<(u32, u16, u16, u16)> = Vec::new();
    let mut merge_bytes = 0usize;
    for (i, piece) in tokens.iter().enumerate() {
        let n = piece.chars().count();
        for (left_chars, (split, _)) in piece.char_indices().enumerate().skip(1) {
            let (l, r) = piece.split_at(split);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merge_bytes += piece.len();
                if merge_bytes > budget {
                    return Err(format!(
                        "tokenizer.ggml.tokens: recovering SentencePiece merges needs over {budget} bytes for a {vocab_bytes}-byte vocabulary (pieces nest too deeply)"
                    ));
                }
                // Lengths are bounded by MAX_PIECE_CHARS (bytes by 4x that), so they fit.
                candidates.push((i as u32, split as u16, left_chars as u16, (n - left_chars) as u16));
            }
        }
    }
    candidates.sort_unstable_by(|a, b| {
        scores[b.0 as usize]
            .total_cmp(&scores[a.0 as usize])
            .then(b.2.cmp(&a.2))
            .then(b.3.cmp(&a.3))
            .then(a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
    });
    Ok(candidates
        .into_iter()
        .map(|(i, split, _, _)| {
            let (l, r) = tokens[i as usize].split_at(split as usize);
            (l.to_string(), r.to_string())
        })
        .collect())
}
