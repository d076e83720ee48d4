//! Resuming a forward pass from a KV cache: a prompt that extends the tokens of an
//! earlier run computes only its new rows, attending to the keys and values the earlier
//! run left. Bisect's streamed coarse probe runs a prompt chunk by chunk this way, so its
//! cost follows the first divergent position rather than the prompt's length.

use anyhow::{bail, Result};
use candle_core::Tensor;
use resbisect_taps::{Faults, Tap};

use crate::{Reference, TapSink};

/// Rows appended a pass at a time into a buffer with room for more, its capacity doubling
/// when full: a stream of n rows in chunks costs O(n) row copies, where concatenating each
/// chunk onto the rows before costs O(n²) — each copy into fresh pages that the kernel
/// zeroes first, on one thread (measured on a 2-core VM: a sixth of a streamed probe's
/// wall time for the KV cache and kept rows of 896 positions in 128-row chunks).
pub struct GrowingRows {
    /// `[capacity, ...]`; rows `0..len` hold values, the rest are not yet touched (fresh
    /// zeroed allocations are mapped lazily, so unused capacity costs no memory).
    buf: Tensor,
    len: usize,
}

impl GrowingRows {
    /// Rows starting as `first` (`[rows, ...]`, shared with the caller until they grow).
    pub fn new(first: Tensor) -> Result<Self> {
        let len = first.dim(0)?;
        Ok(Self { buf: first, len })
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` rows (`n ≤ len()`), without a copy.
    pub fn prefix(&self, n: usize) -> Result<Tensor> {
        if n > self.len {
            bail!("{n} rows asked of {} held", self.len);
        }
        Ok(self.buf.narrow(0, 0, n)?)
    }

    /// Every row held, without a copy.
    pub fn all(&self) -> Result<Tensor> {
        self.prefix(self.len)
    }

    /// Append `rows` (`[r, ...]`, the same trailing shape and dtype). Tensors earlier
    /// returned by [`prefix`](Self::prefix) keep their values: rows already held are never
    /// written again.
    pub fn push(&mut self, rows: &Tensor) -> Result<()> {
        let (held, added, capacity) = (self.len, rows.dim(0)?, self.buf.dim(0)?);
        if held + added > capacity {
            let mut shape = self.buf.dims().to_vec();
            shape[0] = (held + added).max(2 * capacity);
            let grown = Tensor::zeros(shape, self.buf.dtype(), self.buf.device())?;
            grown.slice_set(&self.buf.narrow(0, 0, held)?.contiguous()?, 0, 0)?;
            self.buf = grown;
        }
        self.buf.slice_set(&rows.contiguous()?, 0, held)?;
        self.len += added;
        Ok(())
    }
}

/// Keys (after RoPE) and values of every layer for the positions run so far.
pub struct KvCache {
    /// Positions run so far: the cache holds rows `0..tokens` of every layer.
    tokens: usize,
    /// Per layer, `(keys, values)`, each `[tokens, n_head_kv · head_dim]`.
    layers: Vec<Option<(GrowingRows, GrowingRows)>>,
}

impl KvCache {
    /// An empty cache for a model of `n_layer` layers.
    pub fn new(n_layer: usize) -> Self {
        Self {
            tokens: 0,
            layers: (0..n_layer).map(|_| None).collect(),
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
    slot: Option<&'a mut Option<(GrowingRows, GrowingRows)>>,
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
        match slot.as_mut() {
            Some((past_k, past_v)) if past_k.len() == self.start => {
                past_k.push(&k)?;
                past_v.push(&v)?;
            }
            None if self.start == 0 => *slot = Some((GrowingRows::new(k)?, GrowingRows::new(v)?)),
            _ => bail!(
                "the KV cache does not hold the {} positions before this pass",
                self.start
            ),
        }
        let (k, v) = slot.as_ref().expect("filled above");
        Ok((k.all()?, v.all()?, queries))
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::GrowingRows;

    fn rows(start: u32, n: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (0..n * width).map(|i| (start as usize * width + i) as f32).collect();
        Tensor::from_vec(values, (n, width), &Device::Cpu).unwrap()
    }

    /// Chunks pushed one after another hold what one concatenation would, through every
    /// growth; a prefix taken before a growth keeps its values; a transposed (strided)
    /// first chunk is read by value.
    #[test]
    fn pushed_chunks_equal_their_concatenation() {
        let first = rows(0, 3, 4);
        let strided = rows(0, 4, 3).t().unwrap(); // [3, 4], not contiguous
        for start in [first, strided] {
            let mut grown = GrowingRows::new(start.clone()).unwrap();
            let before = grown.prefix(2).unwrap().to_vec2::<f32>().unwrap();
            let mut all = vec![start];
            for (i, n) in [1usize, 5, 2, 17].into_iter().enumerate() {
                let chunk = rows(100 * (i as u32 + 1), n, 4);
                grown.push(&chunk).unwrap();
                all.push(chunk);
            }
            let expected = Tensor::cat(&all, 0).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(grown.len(), 28);
            assert_eq!(grown.all().unwrap().to_vec2::<f32>().unwrap(), expected);
            assert_eq!(&expected[..2], &before[..]);
            assert!(grown.prefix(29).is_err());
        }
    }
}
