//! Prefix checkpoints, the one policy both built-in engines follow: a run keeps the
//! residual stream of every position after embedding and after each layer, and a later
//! run over a prefix of the same tokens reads rows from it instead of recomputing them.
//! By causality, rows of a prefix do not depend on the tokens after it. (Bisect's probes:
//! a coarse run over the prompt, streamed in chunks that each extend the kept run, then
//! many runs over prefixes of it.)

use crate::sys::available_memory;

/// The residual stream of one run, as `S` buffers (host tensors or device buffers).
pub struct PrefixCheckpoints<S> {
    kept: Option<Kept<S>>,
}

struct Kept<S> {
    tokens: Vec<u32>,
    /// `stream[0]` after embedding, `stream[l + 1]` after layer `l`, all tokens' rows.
    stream: Vec<S>,
}

impl<S> Default for PrefixCheckpoints<S> {
    fn default() -> Self {
        Self { kept: None }
    }
}

impl<S> PrefixCheckpoints<S> {
    /// The kept stream, when `tokens` is a non-empty prefix of the tokens it was kept for.
    pub fn covering(&self, tokens: &[u32]) -> Option<&[S]> {
        self.kept
            .as_ref()
            .filter(|k| !tokens.is_empty() && k.tokens.starts_with(tokens))
            .map(|k| k.stream.as_slice())
    }

    /// How many positions the kept stream holds when `tokens` extends the tokens it was
    /// kept for by at least one (a run over `tokens` may resume from it).
    pub fn extended_by(&self, tokens: &[u32]) -> Option<usize> {
        self.kept
            .as_ref()
            .filter(|k| tokens.len() > k.tokens.len() && tokens.starts_with(&k.tokens))
            .map(|k| k.tokens.len())
    }

    /// Take the kept stream out (to extend it and keep it again).
    pub fn take(&mut self) -> Option<Vec<S>> {
        self.kept.take().map(|k| k.stream)
    }

    /// Whether a stream of `bytes` may be kept: at most a quarter of the memory available
    /// and 4 GiB (2 GiB when the available memory is unknown), so that checkpoints never
    /// crowd out the runs they serve.
    pub fn fits(bytes: u64) -> bool {
        bytes <= available_memory().map_or(2 << 30, |m| (m / 4).min(4 << 30))
    }

    /// Keep `stream`, the residual stream of a run over `tokens`, replacing any earlier one.
    pub fn keep(&mut self, tokens: &[u32], stream: Vec<S>) {
        self.kept = Some(Kept {
            tokens: tokens.to_vec(),
            stream,
        });
    }

    /// Drop the kept stream (its run failed part way).
    pub fn forget(&mut self) {
        self.kept = None;
    }
}
