//! The instrumented inference runtime (the device under test): the llama forward as host
//! orchestration over the ops of one [`Backend`]; the graph never changes with the backend.
//!
//! - `mod.rs`: [`Runtime`] (weights loaded once), `run_prompt` (chunked prefill, then
//!   greedy decode).
//! - `resume.rs`: runs that start from an earlier one — a prefill continuing from its
//!   KV cache, and `serve` (a prefix's dump from kept checkpoints).
//! - `forward.rs`: the blocks (every variant) and the output head, each over a `Pass`
//!   (one chunk's or step's rows, faults and tap route); `layer.rs` a layer's weights
//!   and the activation buffers; `rope.rs` the RoPE frequency table of each layer.
//! - `capture.rs`: taps only — rows streamed into their dump file in the storage dtype as
//!   each chunk comes off the device, so a file lands with its last row and a dump holds
//!   no more than the rows in flight; decode rows staged on the device, downloaded once.
//! - `decode.rs`: decode steps read token, position and tap slot from the step record, so
//!   one recording (a CUDA graph) replays at every position.
//! - `preflight.rs` (context, memory), `select.rs` (`with_backend!`: a backend kind and
//!   storage dtype become a type), `backend.rs` (the trait), `cpu.rs`, `gpu/` (one GPU
//!   backend over the CUDA and HIP drivers), `selftest/` (every op against `cpu`), `perf.rs`.
//!
//! Design notes. GPU ops run asynchronously, so a device error surfaces at a later call:
//! `--sync-check` synchronizes after every op to name it. `cuda` starts cuBLAS on a thread
//! of its own while the weights upload (joined at the first matmul or recording). Its tap
//! captures leave the device while the stream computes: a snapshot on the compute stream,
//! a copy into reused, bounded page-locked lanes on a copy stream, and arrival signalled
//! by a host function rather than an event, so rows that arrived before a device fault
//! still land (`gpu/cuda/lanes.rs`). An injected crash is a real failing op, so it takes a device error's path:
//! files kept, manifest `failed`, exit 3.

pub mod backend;
mod capture;
pub mod cpu;
mod decode;
mod forward;
pub mod gpu;
mod layer;
pub use gpu::cuda;
#[cfg(feature = "hip")]
pub use gpu::hip;
pub mod perf;
mod preflight;
mod resume;
pub mod rope;
mod select;
pub mod selftest;
pub mod weights;

use std::collections::BTreeMap;

use crate::dump::{BackgroundWriter, PromptRecord};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::{Config, Model};
use crate::taps::{PositionSpec, Selection};
use backend::Backend;
use capture::{TapCollector, TapRoute};
use forward::{Next, Pass};
use layer::{LayerWeights, Workspace};
pub use preflight::preflight;
pub use resume::{KeptRows, KvCache};
pub use select::BackendKind;
use weights::{Matrix, WeightMode};

#[derive(Clone, Default)]
pub struct RunOptions {
    /// Prompt tokens per prefill step; `None` processes the whole prompt at once.
    pub prefill_chunk: Option<usize>,
    /// Greedy tokens generated (and processed) after the prompt.
    pub max_tokens: usize,
    /// Synchronize after every op so a device error names the op that caused it.
    pub sync_check: bool,
    /// Stop decoding after this token (end of sequence); dumps always run to
    /// `max_tokens` so every selected position exists.
    pub stop_token: Option<u32>,
    /// Untimed runs of each prompt first (no taps), so timings exclude one-time costs
    /// such as the lazy loading of GPU kernels.
    pub warmup: usize,
    /// How quantized weights are held (read at load).
    pub weights: WeightMode,
}

pub struct Runtime<B: Backend> {
    backend: B,
    cfg: Config,
    token_embd: B::Buf,
    output_norm: B::Buf,
    output: Matrix<B>,
    layers: Vec<LayerWeights<B>>,
}

/// The values of `rope_freqs.weight` (one factor per rotated pair), decoded on the host
/// exactly (by the `cpu` backend's decoders, whatever backend runs the model).
fn rope_factors(model: &Model) -> Result<Vec<f32>> {
    const NAME: &str = "rope_freqs.weight";
    let info = model.weight(NAME)?;
    let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
    let host = cpu::CpuBackend::new(backend::StorageDType::F32);
    let values = host.upload_weight(NAME, info.dtype, &dims, model.weight_data(info))?;
    let pairs = model.config.head_dim() / 2;
    if values.len() != pairs {
        return Err(Error::input(format!(
            "{NAME} holds {} values; RoPE of head dim {} needs {pairs}",
            values.len(),
            model.config.head_dim()
        )));
    }
    Ok(values)
}

/// One prompt's run: what each of its passes (prefill chunks, decode steps) shares.
struct PromptRun<'r, 'c, B: Backend> {
    rt: &'r Runtime<B>,
    faults: &'r RuntimeFaults,
    opts: &'r RunOptions,
    collector: TapCollector<'c>,
    /// Keys and values of every layer, for every position of the run.
    kv: Vec<(B::Buf, B::Buf)>,
}

impl<B: Backend> Runtime<B> {
    /// The model's weights on `backend`, matrices held as `mode` says (block-layout
    /// faults of `faults` applied to the blocks they name).
    pub fn load(
        backend: B,
        model: &Model,
        mode: WeightMode,
        faults: &RuntimeFaults,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let up = |name: &str| -> Result<B::Buf> {
            let info = model.weight(name)?;
            let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
            backend.upload_weight(name, info.dtype, &dims, model.weight_data(info))
        };
        let mat = |name: &str| -> Result<Matrix<B>> {
            let info = model.weight(name)?;
            let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
            Matrix::load(&backend, name, info.dtype, &dims, model.weight_data(info), mode, faults)
        };
        let token_embd = up("token_embd.weight")?;
        let output_norm = up("output_norm.weight")?;
        let output = mat("output.weight")?;
        let rope_factors = if model.config.variant.rope_freq_factors {
            Some(rope_factors(model)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(model.config.n_layer);
        for l in 0..model.config.n_layer {
            let factors = rope_factors.as_deref();
            layers.push(LayerWeights::load(l, &model.config, factors, &backend, &up, &mat)?);
            on_layer(l);
        }
        backend.sync()?;
        crate::trace::mark(|| format!("{}: weights loaded", backend.name()));
        Ok(Self {
            backend,
            cfg: model.config.clone(),
            token_embd,
            output_norm,
            output,
            layers,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// `opts.warmup` untimed runs of a prompt with no taps.
    pub(crate) fn warm_up(&self, prompt: &PromptRecord, opts: &RunOptions) -> Result<()> {
        let none = Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        };
        for _ in 0..opts.warmup {
            self.run_prompt(prompt, &none, &RuntimeFaults::default(), opts, None, None, &mut || {})?;
        }
        Ok(())
    }

    /// Run one prompt (prefill, then greedy decode), sending taps to `writer` (none:
    /// nothing is captured). Returns every token processed and the seconds spent in
    /// prefill and in decode.
    /// With `keep`, the prefill leaves every position's rows of its taps there (prefix
    /// checkpoints).
    /// `on_step` follows each prefill chunk and decode step.
    #[allow(clippy::too_many_arguments)] // the engine wing's entry point; its callers hold these apart
    pub fn run_prompt(
        &self,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: Option<&BackgroundWriter>,
        keep: Option<&mut KeptRows<B::Buf>>,
        on_step: &mut dyn FnMut(),
    ) -> Result<(Vec<u32>, f64, f64)> {
        // Timed from here, the KV cache included, as a dump times its runs.
        let t0 = std::time::Instant::now();
        let (c, b) = (&self.cfg, &self.backend);
        let total = prompt.tokens.len() + opts.max_tokens;
        let collector = self.collector(prompt, selection, total, writer, opts.sync_check)?;
        let kv = (0..c.n_layer)
            .map(|_| Ok((b.alloc(total * c.kv_width())?, b.alloc(total * c.kv_width())?)))
            .collect::<Result<Vec<_>>>()?;
        let mut run = PromptRun {
            rt: self,
            faults,
            opts,
            collector,
            kv,
        };
        let next = run.prefill(prompt, 0, keep, on_step)?;
        b.sync()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut tokens = prompt.tokens.clone();
        if opts.max_tokens > 0 {
            run.decode(next, &mut tokens, on_step)?;
        }
        run.collector.check_complete()?;
        b.sync()?;
        Ok((tokens, prefill_s, t0.elapsed().as_secs_f64() - prefill_s))
    }

    /// A collector of `selection`'s rows of `prompt` over `total` positions.
    fn collector<'c>(
        &'c self,
        prompt: &'c PromptRecord,
        selection: &'c Selection,
        total: usize,
        writer: Option<&'c BackgroundWriter>,
        sync_check: bool,
    ) -> Result<TapCollector<'c>> {
        let positions = selection
            .positions
            .resolve(total)
            .map_err(|e| Error::input(format!("prompt {}: {e}", prompt.id)))?;
        Ok(TapCollector {
            selection,
            cfg: &self.cfg,
            positions,
            writer,
            prompt_id: &prompt.id,
            dtype: self.backend.dtype().tap_dtype(),
            streams: BTreeMap::new(),
            sync_check,
        })
    }
}

impl<B: Backend> PromptRun<'_, '_, B> {
    /// The prompt from position `start` on (the KV cache holds the positions before)
    /// in chunks of `opts.prefill_chunk` tokens, returning its greedy next token when
    /// decode follows. With `keep`, every position's rows of its taps stay there (in its
    /// buffers when it has them, else in new ones).
    fn prefill(
        &mut self,
        prompt: &PromptRecord,
        start: usize,
        keep: Option<&mut KeptRows<B::Buf>>,
        on_step: &mut dyn FnMut(),
    ) -> Result<Option<u32>> {
        let (rt, opts, len) = (self.rt, self.opts, prompt.tokens.len());
        let new = &prompt.tokens[start..];
        let chunk = opts.prefill_chunk.unwrap_or(new.len()).max(1);
        let n_chunks = new.len().div_ceil(chunk);
        let mut ws = Workspace::new(&rt.backend, &rt.cfg, chunk.min(new.len()))?;
        let mut keep = keep;
        if let Some(given) = keep.as_deref_mut() {
            if given.rows.is_empty() {
                given.rows = (given.taps.iter())
                    .map(|_| rt.backend.alloc(len * rt.cfg.n_embd))
                    .collect::<Result<_>>()?;
            }
            ws.keep = std::mem::take(given);
        }
        let mut next = None;
        for (i, ids) in new.chunks(chunk).enumerate() {
            let mut pass = Pass {
                rt,
                start: start + i * chunk,
                rows: ids.len(),
                faults: self.faults,
                collector: &mut self.collector,
                route: TapRoute::Download,
                opts,
            };
            rt.layers(ids, &mut ws, &mut self.kv, &mut pass)?;
            let wanted = if i + 1 == n_chunks && opts.max_tokens > 0 {
                Next::ToHost
            } else {
                Next::None
            };
            next = rt.head(&mut ws, &mut pass, wanted)?;
            on_step();
        }
        if let Some(keep) = keep {
            *keep = std::mem::take(&mut ws.keep);
        }
        Ok(next)
    }
}
