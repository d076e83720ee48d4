//! Prompt inputs: a single text, an explicit token list, or a JSONL suite whose lines
//! are `{"id": ..., "text": ...}` and/or `{"id": ..., "tokens": [...]}`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dump::{validate_prompt_id, PromptRecord};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a prompt: an object with \"id\" and \"text\" or \"tokens\""
)]
struct SuiteLine {
    id: String,
    #[serde(default)]
    text: Option<String>,
    /// Read wide so that a negative or too-large id is named, not a serde type error.
    #[serde(default)]
    tokens: Option<Vec<i64>>,
    /// Free-form notes for people reading the suite; ignored.
    #[serde(default, rename = "note")]
    _note: Option<String>,
}

/// Where a prompt's tokens come from before tokenization.
pub enum PromptSource {
    Text(String),
    Tokens(Vec<u32>),
}

/// Parse `1,2,3` (spaces allowed); errors name `flag`, where the list came from.
pub fn parse_token_list(spec: &str, flag: &str) -> Result<Vec<u32>> {
    let ids = spec
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| Error::input(format!("bad token id {s:?} in {flag}")))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        return Err(Error::input(format!("{flag} is empty")));
    }
    Ok(ids)
}

/// Read a JSONL prompt suite; blank lines are skipped, ids must be unique.
pub fn read_suite(path: &Path) -> Result<Vec<(String, Option<String>, PromptSource)>> {
    let text = crate::sys::read_text(path)?;
    let mut out: Vec<(String, Option<String>, PromptSource)> = Vec::new();
    // Ids seen so far: a set, so a long suite costs linear time, not quadratic.
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let entry: SuiteLine = serde_json::from_str(line).map_err(|e| Error::input(format!("{}: {e}", at())))?;
        validate_prompt_id(&entry.id).map_err(|e| Error::input(format!("{}: {e}", at())))?;
        if !seen.insert(entry.id.clone()) {
            return Err(Error::input(format!("{}: prompt id {} appears twice", at(), entry.id)));
        }
        let source = match (&entry.tokens, &entry.text) {
            (Some(t), _) if t.is_empty() => return Err(Error::input(format!("{}: tokens is empty", at()))),
            (Some(t), _) => {
                let ids = t.iter().enumerate().map(|(k, &id)| {
                    u32::try_from(id).map_err(|_| {
                        Error::input(format!(
                            "{}: tokens[{k}] is {id}; a token id is 0 or more, below 2^32",
                            at()
                        ))
                    })
                });
                PromptSource::Tokens(ids.collect::<Result<_>>()?)
            }
            (None, Some(s)) => PromptSource::Text(s.clone()),
            (None, None) => return Err(Error::input(format!("{}: a prompt needs text or tokens", at()))),
        };
        out.push((entry.id, entry.text, source));
    }
    if out.is_empty() {
        return Err(Error::input(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

/// Resolve prompts to token ids, tokenizing text with the model's own tokenizer, and
/// check every id against the vocabulary and the sequence against the context. `origin`
/// names where a prompt of that id came from, to open an error with (`--tokens`).
pub fn resolve(
    entries: Vec<(String, Option<String>, PromptSource)>,
    tokenizer: Option<&Tokenizer>,
    n_vocab: usize,
    n_ctx: usize,
    origin: &dyn Fn(&str) -> String,
) -> Result<Vec<PromptRecord>> {
    entries
        .into_iter()
        .map(|(id, text, source)| {
            let tokens = match source {
                PromptSource::Tokens(t) => t,
                PromptSource::Text(s) => tokenizer
                    .ok_or_else(|| Error::input("text prompts need the model's tokenizer"))?
                    .encode(&s)?,
            };
            let refuse = |why: String| Err(Error::input(format!("{}: {why}", origin(&id))));
            if tokens.is_empty() {
                return refuse("no tokens".into());
            }
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
                return refuse(format!("token id {t} is outside the vocabulary (size {n_vocab})"));
            }
            if tokens.len() > n_ctx {
                return refuse(format!("{} tokens exceed the model's context of {n_ctx}", tokens.len()));
            }
            Ok(PromptRecord { id, text, tokens })
        })
        .collect()
}

/// Where a command's prompts come from.
pub enum Input {
    /// One text, tokenized with the model's tokenizer.
    Text { id: String, text: String },
    /// One explicit token list, `1,2,3`.
    Tokens { id: String, list: String },
    /// A JSONL suite; with `only`, just its prompt of that id.
    Suite { path: PathBuf, only: Option<String> },
}

impl Input {
    /// The prompts as token ids checked against `model` (vocabulary, context); text is
    /// tokenized with `tokenizer`, or the model's own when none is given.
    pub fn resolve(&self, model: &Model, tokenizer: Option<&Tokenizer>) -> Result<Vec<PromptRecord>> {
        let entries = match self {
            Input::Text { id, text } => vec![(id.clone(), Some(text.clone()), PromptSource::Text(text.clone()))],
            Input::Tokens { id, list } => vec![(
                id.clone(),
                None,
                PromptSource::Tokens(parse_token_list(list, "--tokens")?),
            )],
            Input::Suite { path, only } => {
                let mut all = read_suite(path).map_err(|e| e.for_option("--prompts", path))?;
                if let Some(want) = only {
                    all.retain(|(i, _, _)| i == want);
                    if all.is_empty() {
                        return Err(Error::input(format!(
                            "--id {want}: no such prompt in {}",
                            path.display()
                        )));
                    }
                }
                all
            }
        };
        let needs_tokenizer = entries.iter().any(|(_, _, s)| matches!(s, PromptSource::Text(_)));
        let own = match tokenizer {
            None if needs_tokenizer => Some(Tokenizer::from_gguf(&model.gguf)?),
            _ => None,
        };
        resolve(
            entries,
            tokenizer.or(own.as_ref()),
            model.config.n_vocab,
            model.config.n_ctx,
            &|id| self.origin(id),
        )
    }

    /// Where the prompt `id` came from, as an error names it: the flag that gave it, or
    /// the suite and its id (`--prompt`, `--tokens`, `suite.jsonl: prompt p0_short`).
    pub fn origin(&self, id: &str) -> String {
        match self {
            Input::Text { .. } => "--prompt".into(),
            Input::Tokens { .. } => "--tokens".into(),
            Input::Suite { path, .. } => format!("{}: prompt {id}", path.display()),
        }
    }

    /// The prompt `id` as a message says whose tokens it means: `the prompt` when there is
    /// one, `prompt p0_short` in a suite.
    pub fn whose(&self, id: &str) -> String {
        match self {
            Input::Suite { .. } => format!("prompt {id}'s"),
            _ => "the prompt's".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_saved_with_a_byte_order_mark_reads_as_without() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.jsonl");
        std::fs::write(
            &path,
            "\u{feff}{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"b\", \"text\": \"hi\"}\n",
        )
        .unwrap();
        let Ok(suite) = read_suite(&path) else {
            panic!("a leading mark refused")
        };
        assert_eq!(suite.len(), 2);
        assert_eq!(suite[0].0, "a");
        assert!(matches!(&suite[0].2, PromptSource::Tokens(t) if t == &[1, 2]));
        // Only a leading mark is the file's: one inside a line is that line's content.
        std::fs::write(
            &path,
            "{\"id\": \"a\", \"tokens\": [1]}\n\u{feff}{\"id\": \"b\", \"tokens\": [1]}\n",
        )
        .unwrap();
        let Err(err) = read_suite(&path) else {
            panic!("a mark inside a line accepted")
        };
        let err = err.to_string();
        assert!(err.contains("suite.jsonl:2"), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_named_by_encoding_or_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.jsonl");
        let line = "{\"id\": \"a\", \"tokens\": [1]}\n";
        let utf16: Vec<u8> = [0xff, 0xfe]
            .into_iter()
            .chain(line.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        std::fs::write(&path, utf16).unwrap();
        let err = read_suite(&path).err().expect("UTF-16 accepted").to_string();
        assert!(
            err.contains("UTF-16 text (byte order mark FF FE); save it as UTF-8"),
            "{err}"
        );
        let latin1 = [line.as_bytes(), b"{\"id\": \"caf\xe9\", \"tokens\": [1]}\n"].concat();
        std::fs::write(&path, latin1).unwrap();
        let err = read_suite(&path).err().expect("Latin-1 accepted").to_string();
        assert!(err.contains("suite.jsonl: line 2: not valid UTF-8"), "{err}");
    }
}
