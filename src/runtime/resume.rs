//! Runs that start from an earlier run (bisect's probes). A prefill continues when a
//! prompt extends the tokens of the run before: only its new positions are computed,
//! attending to the KV cache that run left (the streamed coarse probe runs a prompt chunk
//! by chunk this way); the cache and the kept residual stream grow by doubling when a
//! continuation outgrows them. A prompt that is a prefix of the kept run is served from
//! its residual stream, recomputing only the layers whose inner taps are asked for.

use super::backend::{Backend, Row};
use super::capture::TapRoute;
use super::forward::{Next, Pass, Seam};
use super::layer::Workspace;
use super::{PromptRun, Runtime};
use crate::dump::{BackgroundWriter, PromptRecord};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::taps::{LayerTap, Selection, Tap};

use super::RunOptions;

/// Every position's rows of a run's kept taps, one `S` buffer (host tensor or device
/// buffer) per tap. `taps` opens with the residual stream — `embed`, then `resid_post`
/// of layers 0, 1, … — so `rows[i]` is the stream after `i` layers; branch outputs,
/// when kept, follow.
pub struct KeptRows<S> {
    pub taps: Vec<Tap>,
    pub rows: Vec<S>,
}

impl<S> Default for KeptRows<S> {
    fn default() -> Self {
        Self {
            taps: Vec::new(),
            rows: Vec::new(),
        }
    }
}

impl<S> KeptRows<S> {
    /// The kept rows of `tap`.
    pub fn of(&self, tap: Tap) -> Option<&S> {
        self.taps.iter().position(|&t| t == tap).map(|i| &self.rows[i])
    }

    /// The kept residual stream: `[i]` after `i` layers (every layer, unless the run
    /// stopped after the last one it was asked about).
    pub fn stream(&self) -> &[S] {
        &self.rows[..self.stream_len()]
    }

    fn stream_len(&self) -> usize {
        (self.taps.iter())
            .take_while(|t| matches!(t, Tap::Embed | Tap::Layer(_, LayerTap::ResidPost)))
            .count()
    }

    /// Whether every tap of `wanted` is kept.
    pub fn holds(&self, wanted: &[Tap]) -> bool {
        wanted.iter().all(|t| self.taps.contains(t))
    }

    /// Keep only the residual stream.
    pub fn stream_only(&mut self) {
        let n = self.stream_len();
        self.taps.truncate(n);
        self.rows.truncate(n);
    }
}

/// Keys and values of each layer.
type KvBuffers<B> = Vec<(<B as Backend>::Buf, <B as Backend>::Buf)>;

/// The keys and values of every layer for the positions run so far.
pub struct KvCache<B: Backend> {
    /// Positions run so far: rows `0..tokens` of every buffer hold them.
    tokens: usize,
    /// Rows every buffer has room for (and the kept stream's buffers too).
    capacity: usize,
    kv: KvBuffers<B>,
}

impl<B: Backend> KvCache<B> {
    /// Positions the cache holds.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

impl<B: Backend> Runtime<B> {
    /// Prefill `prompt` past the positions `cache` holds (from position 0 without one),
    /// sending `selection`'s rows to `writer`, with every position's rows of the taps
    /// `kept` names kept there (its first rows are the earlier runs'; none without a
    /// cache). Returns the cache for the next continuation. A selected
    /// position before the cached ones is an input error; nothing is decoded.
    #[allow(clippy::too_many_arguments)] // run_prompt's inputs, plus the cache and rows it continues
    pub(crate) fn prefill_continuing(
        &self,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: &BackgroundWriter,
        cache: Option<KvCache<B>>,
        kept: &mut KeptRows<B::Buf>,
        on_step: &mut dyn FnMut(),
    ) -> Result<KvCache<B>> {
        let len = prompt.tokens.len();
        let start = cache.as_ref().map_or(0, |k| k.tokens);
        let collector = self.collector(prompt, selection, len, Some(writer), opts.sync_check)?;
        if start >= len || collector.positions.first().is_some_and(|&p| p < start) {
            return Err(Error::input(format!(
                "prompt {}: a continuation past {start} positions runs positions {start}..{len} only",
                prompt.id
            )));
        }
        let (kv, capacity) = self.room_for(len, cache, &mut kept.rows)?;
        let mut run = PromptRun {
            rt: self,
            faults,
            opts: &RunOptions {
                max_tokens: 0,
                ..opts.clone()
            },
            collector,
            kv,
        };
        run.prefill(prompt, start, Some(kept), on_step)?;
        run.collector.check_complete()?;
        self.backend.sync()?;
        Ok(KvCache {
            tokens: len,
            capacity,
            kv: run.kv,
        })
    }

    /// KV buffers with room for `len` positions, and the kept `rows` grown to match: the
    /// cache's own when they fit, else twice as large with the cached rows copied.
    fn room_for(&self, len: usize, cache: Option<KvCache<B>>, rows: &mut Vec<B::Buf>) -> Result<(KvBuffers<B>, usize)> {
        let (b, c) = (&self.backend, &self.cfg);
        let (kvw, e) = (c.kv_width(), c.n_embd);
        let Some(cache) = cache else {
            rows.clear();
            let kv = (0..c.n_layer)
                .map(|_| Ok((b.alloc(len * kvw)?, b.alloc(len * kvw)?)))
                .collect::<Result<Vec<_>>>()?;
            return Ok((kv, len));
        };
        if cache.capacity >= len {
            return Ok((cache.kv, cache.capacity));
        }
        let capacity = len.max(2 * cache.capacity);
        let grown = |old: &B::Buf, width: usize| -> Result<B::Buf> {
            let mut new = b.alloc(capacity * width)?;
            b.copy_rows(old, &mut new, Row::At(0), cache.tokens, width)?;
            Ok(new)
        };
        let kv = cache
            .kv
            .iter()
            .map(|(k, v)| Ok((grown(k, kvw)?, grown(v, kvw)?)))
            .collect::<Result<Vec<_>>>()?;
        *rows = rows.iter().map(|s| grown(s, e)).collect::<Result<_>>()?;
        Ok((kv, capacity))
    }
}

impl<B: Backend> Runtime<B> {
    /// Write the dump of `prompt` with `selection` from `kept`, the rows of a run over
    /// tokens that `prompt`'s are a prefix of. Kept taps (`embed`, `resid_post`, any
    /// branch outputs) are read from it; a layer with a selected tap it lacks is
    /// recomputed from its input rows there (its KV cache rebuilt from them, in
    /// `opts.prefill_chunk` chunks, with `faults`), and the output head runs on the last
    /// layer's rows. By causality these are the rows a full run over `prompt` computes;
    /// nothing is decoded.
    pub(crate) fn serve(
        &self,
        kept: &KeptRows<B::Buf>,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: &BackgroundWriter,
    ) -> Result<()> {
        let (n, e, b) = (prompt.tokens.len(), self.cfg.n_embd, &self.backend);
        let stream = kept.stream();
        if stream.len() != self.cfg.n_layer + 1 {
            // The runtime keeps only runs of every layer (those with an output tap).
            return Err(Error::engine(format!(
                "kept rows hold the residual stream of {} of {} layers",
                stream.len().saturating_sub(1),
                self.cfg.n_layer
            )));
        }
        let mut collector = self.collector(prompt, selection, n, Some(writer), opts.sync_check)?;
        let recomputed = |collector: &super::capture::TapCollector, l: usize| {
            LayerTap::ALL.into_iter().any(|t| {
                let tap = Tap::Layer(l, t);
                collector.wants(&tap) && kept.of(tap).is_none()
            })
        };
        let computes = collector.wants_output() || (0..self.cfg.n_layer).any(|l| recomputed(&collector, l));
        let chunk = opts.prefill_chunk.unwrap_or(n).clamp(1, n);
        let mut ws = if computes {
            Some(Workspace::new(b, &self.cfg, chunk)?)
        } else {
            None
        };
        let runs: Vec<(usize, usize)> = crate::taps::consecutive_runs(&collector.positions)
            .map(|run| (collector.positions[run.start] * e, run.len() * e))
            .collect();
        if collector.wants(&Tap::Embed) {
            collector.capture(b, &Tap::Embed, 0, &stream[0], &runs)?;
        }
        // Layer `l`'s input is the stream before it.
        for (l, input) in stream[..self.cfg.n_layer].iter().enumerate() {
            if let (true, Some(ws)) = (recomputed(&collector, l), ws.as_mut()) {
                // Its block taps what it wants.
                let kvw = self.cfg.kv_width();
                let mut kv = (b.alloc(n * kvw)?, b.alloc(n * kvw)?);
                self.chunks_from(input, n, ws, faults, opts, &mut collector, |rt, ws, pass| {
                    rt.block(l, ws, &mut kv, pass, Seam::default())
                })?;
                continue;
            }
            for t in LayerTap::ALL {
                let tap = Tap::Layer(l, t);
                if let (true, Some(rows)) = (collector.wants(&tap), kept.of(tap)) {
                    collector.capture(b, &tap, 0, rows, &runs)?;
                }
            }
        }
        if let (true, Some(ws)) = (collector.wants_output(), ws.as_mut()) {
            let last = stream.last().expect("the stream holds the embedding");
            self.chunks_from(last, n, ws, faults, opts, &mut collector, |rt, ws, pass| {
                rt.head(ws, pass, Next::None).map(|_| ())
            })?;
        }
        collector.check_complete()?;
        b.sync()
    }

    /// Run `step` over rows `0..n` of the residual stream `input`, in prefill chunks:
    /// each chunk's rows are loaded into `ws.x` and `step` runs on a pass over them.
    #[allow(clippy::too_many_arguments)] // a pass's parts, and what runs on it
    fn chunks_from(
        &self,
        input: &B::Buf,
        n: usize,
        ws: &mut Workspace<B>,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        collector: &mut super::capture::TapCollector,
        mut step: impl FnMut(&Self, &mut Workspace<B>, &mut Pass<B>) -> Result<()>,
    ) -> Result<()> {
        let (e, b) = (self.cfg.n_embd, &self.backend);
        let chunk = opts.prefill_chunk.unwrap_or(n).clamp(1, n);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            // Through the host: a few MB per layer, and no backend op reads at an offset.
            ws.x = b.upload(&b.download(input, start * e, rows * e)?)?;
            let mut pass = Pass {
                rt: self,
                start,
                rows,
                faults,
                collector,
                route: TapRoute::Download,
                opts,
            };
            step(self, ws, &mut pass)?;
        }
        Ok(())
    }
}
