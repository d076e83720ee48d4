//! Checks before any op runs: the sequence fits the model's context, and the weights, KV
//! cache and activations fit in memory. (Tensor presence, shapes, types and head
//! arithmetic are checked when the model opens.)

use super::RunOptions;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sys::available_memory;

/// Refuse a run of `longest` prompt tokens plus `opts.max_tokens` that cannot fit, in one
/// line naming what does not.
pub fn preflight(model: &Model, longest: usize, opts: &RunOptions, bytes_per_value: usize) -> Result<()> {
    let c = &model.config;
    let total = longest + opts.max_tokens;
    if total > c.n_ctx {
        return Err(Error::input(format!(
            "preflight: {longest} prompt tokens + {} generated = {total} positions exceed the model's context of {}",
            opts.max_tokens, c.n_ctx
        )));
    }
    if opts.prefill_chunk == Some(0) {
        return Err(Error::input("preflight: --prefill-chunk must be at least 1"));
    }
    let rows = opts.prefill_chunk.unwrap_or(longest).min(longest).max(1) as u64;
    let weights = model.n_params() * bytes_per_value as u64;
    let kv = 2 * (c.n_layer * total * c.kv_width()) as u64 * bytes_per_value as u64;
    let acts = rows * (6 * c.n_embd + 3 * c.n_ff + c.n_vocab) as u64 * 4;
    let need = weights + kv + acts;
    if let Some(avail) = available_memory() {
        if need > avail {
            return Err(Error::input(format!(
                "preflight: the run needs about {} MiB (weights {} MiB, KV cache {} MiB for {total} positions, activations {} MiB) but {} MiB are available",
                need >> 20, weights >> 20, kv >> 20, acts >> 20, avail >> 20
            )));
        }
    }
    Ok(())
}
