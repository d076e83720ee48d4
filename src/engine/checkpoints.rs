//! Prefix checkpoints, the one policy both built-in engines follow: a run keeps every
//! position's rows of the residual stream (after embedding and after each layer) and,
//! where memory allows, of each layer's branch outputs (what attention and the FFN add
//! to the stream); a later run over a prefix of the same tokens reads rows from them
//! instead of recomputing. By causality, rows of a prefix do not depend on the tokens
//! after it. (Bisect's probes: a coarse run over the prompt, streamed in chunks that each
//! extend the kept run, then many runs over prefixes of it — among them one that asks
//! for the branch outputs of every layer below the one the search found.)

use crate::model::Config;
pub use crate::runtime::KeptRows;
use crate::sys::available_memory;
use crate::taps::{LayerTap, Tap};

/// The taps through which a layer's output enters the residual stream: attention's and
/// the FFN's, after their post norms in models that have them.
pub const BRANCH_OUTPUTS: [LayerTap; 4] = [
    LayerTap::AttnOut,
    LayerTap::AttnPostNorm,
    LayerTap::FfnOut,
    LayerTap::FfnPostNorm,
];

/// The kept rows of one run.
pub struct PrefixCheckpoints<S> {
    kept: Option<Kept<S>>,
}

struct Kept<S> {
    tokens: Vec<u32>,
    rows: KeptRows<S>,
}

impl<S> Default for PrefixCheckpoints<S> {
    fn default() -> Self {
        Self { kept: None }
    }
}

impl<S> PrefixCheckpoints<S> {
    /// The kept rows, when `tokens` is a non-empty prefix of the tokens they were kept for.
    pub fn covering(&self, tokens: &[u32]) -> Option<&KeptRows<S>> {
        self.kept
            .as_ref()
            .filter(|k| !tokens.is_empty() && k.tokens.starts_with(tokens))
            .map(|k| &k.rows)
    }

    /// How many positions the kept rows hold when `tokens` extends the tokens they were
    /// kept for by at least one (a run over `tokens` may resume from them).
    pub fn extended_by(&self, tokens: &[u32]) -> Option<usize> {
        self.kept
            .as_ref()
            .filter(|k| tokens.len() > k.tokens.len() && tokens.starts_with(&k.tokens))
            .map(|k| k.tokens.len())
    }

    /// Take the kept rows out (to extend them and keep them again).
    pub fn take(&mut self) -> Option<KeptRows<S>> {
        self.kept.take().map(|k| k.rows)
    }

    /// Keep `rows`, those of a run over `tokens`, replacing any kept before.
    pub fn keep(&mut self, tokens: &[u32], rows: KeptRows<S>) {
        self.kept = Some(Kept {
            tokens: tokens.to_vec(),
            rows,
        });
    }

    /// Drop the kept rows (their run failed part way).
    pub fn forget(&mut self) {
        self.kept = None;
    }
}

/// The taps a run over `tokens` positions keeps, or None when not even the residual
/// stream fits: with the branch outputs when they fit too. Every kept tap is `n_embd`
/// wide, of `value_bytes` a value; `beside` is what the run keeps with them (its KV cache);
/// `device_free` is the memory free on the device that holds them, if not the host's.
pub fn plan(c: &Config, tokens: usize, value_bytes: usize, beside: u64, device_free: Option<u64>) -> Option<Vec<Tap>> {
    let mut taps = vec![Tap::Embed];
    taps.extend((0..c.n_layer).map(|l| Tap::Layer(l, LayerTap::ResidPost)));
    let stream = taps.len();
    for l in 0..c.n_layer {
        taps.extend(
            BRANCH_OUTPUTS
                .iter()
                .filter(|t| t.in_model(c))
                .map(|&t| Tap::Layer(l, t)),
        );
    }
    let bytes = |n: usize| (n * tokens * c.n_embd * value_bytes) as u64 + beside;
    // At most a quarter of the memory available and 4 GiB (2 GiB when the available
    // memory is unknown), so that checkpoints never crowd out the runs they serve.
    let free = device_free.or_else(available_memory);
    let fits = |bytes: u64| bytes <= free.map_or(2 << 30, |m| (m / 4).min(4 << 30));
    if !fits(bytes(taps.len())) {
        taps.truncate(stream);
    }
    fits(bytes(taps.len())).then_some(taps)
}
