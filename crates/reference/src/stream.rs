//! Resuming a forward pass from a KV cache: a prompt that extends the tokens of an
//! earlier run computes only its new rows, attending to the keys and values the earlier
//! run left. Bisect's streamed coarse probe runs a prompt chunk by chunk this way, so its
//! cost follows the first divergent position rather than the prompt's length.

use anyhow::{bail, Result};
use candle_core::Tensor;
use resbisect_taps::{Faults, Tap};

use crate::{Reference, TapSink};

/// Keys (after RoPE) and values of every layer for the positions run so far.
pub struct KvCache {
    /// Positions run so far: the cache holds rows `0..tokens` of every layer.
    tokens: usize,
    /// Per layer, `(keys, values)`, each `[tokens, n_head_kv · head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model of `n_layer` layers.
    pub fn new(n_layer: usize) -> Self {
        Self {
            tokens: 0,
            layers: vec![None; n_layer],
        }
    }

    /// Positions the cache holds (rows `0..tokens()`).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The rows a pass runs: positions `start..`, attending to the cached positions before.
pub(crate) struct Span<'a> {
    pub(crate) start: usize,
    cache: Option<&'a mut KvCache>,
}

impl Span<'static> {
    /// Every row of a sequence from position 0, with no cache.
    pub(crate) fn whole() -> Self {
        Span { start: 0, cache: None }
    }
}

impl Span<'_> {
    /// Layer `l`'s part of the cache.
    pub(crate) fn at(&mut self, l: usize) -> LayerKv<'_> {
        LayerKv {
            start: self.start,
            slot: self.cache.as_deref_mut().map(|c| &mut c.layers[l]),
        }
    }
}

/// One layer's keys and values before the rows of a pass.
pub(crate) struct LayerKv<'a> {
    start: usize,
    slot: Option<&'a mut Option<(Tensor, Tensor)>>,
}

impl LayerKv<'_> {
    /// The keys and values of positions `0..start + rows` (cached, then the pass's `k`
    /// and `v` of `rows` rows), kept for the next pass, and the positions of the pass's
    /// queries.
    pub(crate) fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let rows = k.dim(0)?;
        let queries: Vec<usize> = (self.start..self.start + rows).collect();
        let Some(slot) = self.slot.as_deref_mut() else {
            return Ok((k, v, queries));
        };
        let (k, v) = match slot.take() {
            Some((past_k, past_v)) if past_k.dim(0)? == self.start => {
                (Tensor::cat(&[&past_k, &k], 0)?, Tensor::cat(&[&past_v, &v], 0)?)
            }
            None if self.start == 0 => (k, v),
            _ => bail!(
                "the KV cache does not hold the {} positions before this pass",
                self.start
            ),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v, queries))
    }
}

/// `positions` (absolute) as row indices of a pass over positions `start..start + rows`.
pub(crate) fn local_rows(positions: &[usize], start: usize, rows: usize) -> Result<Vec<usize>> {
    positions
        .iter()
        .map(|&p| match p.checked_sub(start) {
            Some(r) if r < rows => Ok(r),
            Some(_) => bail!("position {p} is outside the {}-token sequence", start + rows),
            None => bail!("position {p} precedes the {start} positions run before"),
        })
        .collect()
}

impl Reference {
    /// Run the tokens after those `cache` holds (`tokens[cache.tokens()..]`, the earlier
    /// ones being the tokens of the runs that filled it) through every layer and the
    /// output head, capturing the taps the sink wants at `positions` (absolute, sorted,
    /// all past the cached ones); `keep(tap, x)` sees the new rows of each tap computed,
    /// as in [`forward_keeping`](Self::forward_keeping). Numerically the rows of one whole
    /// run: each row attends to the same keys, and per-row ops see the same rows. After
    /// an error the cache is partly extended and must be dropped.
    pub fn forward_resuming(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
        keep: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<()> {
        let start = cache.tokens;
        if tokens.len() <= start {
            bail!("no tokens past the {start} positions run before");
        }
        if cache.layers.len() != self.n_layer() {
            bail!(
                "a KV cache of {} layers for a model of {}",
                cache.layers.len(),
                self.n_layer()
            );
        }
        let x = self.embed_at(start, &tokens[start..], positions, faults, sink)?;
        keep(Tap::Embed, &x);
        let mut span = Span {
            start,
            cache: Some(cache),
        };
        let last = self.n_layer() - 1;
        let x = self.run_layers_over(x, &mut span, 0, last, positions, faults, sink, keep)?;
        self.head_at(&x, start, positions, faults, sink)?;
        cache.tokens = tokens.len();
        Ok(())
    }
}
