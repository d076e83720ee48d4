//! A prefill that a later run continues: when a prompt extends the tokens of the run
//! before, only its new positions are computed, attending to the KV cache that run left
//! (bisect's streamed coarse probe runs a prompt chunk by chunk this way). The cache and
//! the kept residual stream grow by doubling when a continuation outgrows them.

use super::backend::{Backend, Row};
use super::{PromptRun, Runtime};
use crate::dump::{BackgroundWriter, PromptRecord};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::taps::Selection;

use super::RunOptions;

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
    /// sending `selection`'s rows to `writer`, with the residual stream after embedding
    /// and after each layer kept in `stream` (whose first rows are the earlier runs';
    /// empty without a cache). Returns the cache for the next continuation. A selected
    /// position before the cached ones is an input error; nothing is decoded.
    #[allow(clippy::too_many_arguments)] // run_prompt's inputs, plus the cache and stream it continues
    pub(crate) fn prefill_continuing(
        &self,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: &BackgroundWriter,
        cache: Option<KvCache<B>>,
        stream: &mut Vec<B::Buf>,
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
        let (kv, capacity) = self.room_for(len, cache, stream)?;
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
        run.prefill(prompt, start, Some(stream), on_step)?;
        run.collector.check_complete()?;
        self.backend.sync()?;
        Ok(KvCache {
            tokens: len,
            capacity,
            kv: run.kv,
        })
    }

    /// KV buffers with room for `len` positions, and `stream` grown to match: the
    /// cache's own when they fit, else twice as large with the cached rows copied.
    fn room_for(
        &self,
        len: usize,
        cache: Option<KvCache<B>>,
        stream: &mut Vec<B::Buf>,
    ) -> Result<(KvBuffers<B>, usize)> {
        let (b, c) = (&self.backend, &self.cfg);
        let (kvw, e) = (c.kv_width(), c.n_embd);
        let Some(cache) = cache else {
            stream.clear();
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
        *stream = stream.iter().map(|s| grown(s, e)).collect::<Result<_>>()?;
        Ok((kv, capacity))
    }
}
