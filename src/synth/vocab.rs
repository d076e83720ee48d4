//! The tokenizer sections of synthetic models: a byte-level BPE (gpt2) vocabulary with
//! merges, or a SentencePiece (llama) vocabulary with scores and byte fallback, both
//! built from a fixed word list so ordinary text tokenizes into more than single bytes.

use crate::error::{Error, Result};

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

/// GPT-2's reversible byte → printable character map.
pub(super) fn bytes_to_unicode() -> Vec<char> {
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
pub(super) struct Vocab {
    pub(super) tokens: Vec<String>,
    pub(super) types: Vec<i32>,
    pub(super) scores: Option<Vec<f32>>,
    pub(super) merges: Option<Vec<String>>,
    pub(super) bos: u32,
    pub(super) eos: u32,
    pub(super) unk: Option<u32>,
    pub(super) add_bos: bool,
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

pub(super) fn gpt2_vocab(n_vocab: usize) -> Result<Vocab> {
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

pub(super) fn sentencepiece_vocab(n_vocab: usize) -> Result<Vocab> {
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
