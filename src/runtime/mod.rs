//! The instrumented inference runtime (the device under test): the llama forward as host
//! orchestration over the ops of one [`Backend`]; the graph never changes with the backend.
//!
//! - `mod.rs`: [`Runtime`] (weights loaded once) and `run_prompt` (chunked prefill, then
//!   greedy decode).
//! - `forward.rs`: layer weights, activation buffers, the llama blocks and the output head,
//!   each over a `Pass` (one chunk's or step's rows, faults and tap route).
//! - `capture.rs`: taps only — rows streamed into their dump file in the storage dtype as
//!   each chunk comes off the device, so a file lands with its last row and a dump holds
//!   no more than the rows in flight; decode rows staged on the device, downloaded once.
//! - `decode.rs`: decode steps read token, position and tap slot from the step record, so
//!   one recording (a CUDA graph) replays at every position.
//! - `preflight.rs` (context, memory), `select.rs` (`with_backend!`: a backend kind and
//!   storage dtype become a type), `backend.rs` (the trait), `cpu.rs`, `cuda.rs` with
//!   `cuda_lanes.rs`, `hip.rs`, `selftest.rs` (every op against `cpu`), `perf.rs`.
//!
//! Design notes. GPU ops run asynchronously, so a device error surfaces at a later call:
//! `--sync-check` synchronizes after every op to name it. `cuda` starts cuBLAS on a thread
//! of its own while the weights upload (joined at the first matmul or recording). Its tap
//! captures leave the device while the stream computes: a snapshot on the compute stream,
//! a copy into reused, bounded page-locked lanes on a copy stream, and arrival signalled
//! by a host function rather than an event, so rows that arrived before a device fault
//! still land. An injected crash is a real failing op, so it takes a device error's path:
//! files kept, manifest `failed`, exit 3.

pub mod backend;
mod capture;
pub mod cpu;
pub mod cuda;
mod cuda_lanes;
mod decode;
mod forward;
#[cfg(feature = "hip")]
pub mod hip;
pub mod perf;
mod preflight;
mod select;
pub mod selftest;

use std::collections::BTreeMap;

use crate::dump::{BackgroundWriter, DumpWriter, EngineInfo, Manifest, ModelInfo, PromptRecord};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::{Config, Model};
use crate::reference_engine::{DumpSummary, Progress};
use crate::taps::{all_taps, LayerTap, PositionSpec, Selection, Tap};
use backend::Backend;
use capture::{TapCollector, TapRoute};
use forward::{LayerWeights, Pass, Workspace};
pub(crate) use preflight::available_memory;
pub use preflight::preflight;
pub use select::BackendKind;

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
}

pub struct Runtime<B: Backend> {
    backend: B,
    cfg: Config,
    token_embd: B::Buf,
    output_norm: B::Buf,
    output: B::Buf,
    layers: Vec<LayerWeights<B>>,
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
    pub fn load(backend: B, model: &Model, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let up = |name: &str| -> Result<B::Buf> {
            let info = model.weight(name)?;
            let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
            backend.upload_weight(name, info.dtype, &dims, model.weight_data(info))
        };
        let token_embd = up("token_embd.weight")?;
        let output_norm = up("output_norm.weight")?;
        let output = up("output.weight")?;
        let mut layers = Vec::with_capacity(model.config.n_layer);
        for l in 0..model.config.n_layer {
            layers.push(LayerWeights::load(l, &up)?);
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
    fn warm_up(&self, prompt: &PromptRecord, opts: &RunOptions) -> Result<()> {
        let none = Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        };
        for _ in 0..opts.warmup {
            self.run_prompt(
                prompt,
                &none,
                &RuntimeFaults::default(),
                opts,
                None,
                None,
                &mut crate::reference_engine::NoProgress,
            )?;
        }
        Ok(())
    }

    /// Run one prompt (prefill, then greedy decode), sending taps to `writer` (none:
    /// nothing is captured). Returns every token processed and the seconds spent in
    /// prefill and in decode.
    /// With `keep`, the prefill leaves its residual stream there ([`Checkpoints`]).
    #[allow(clippy::too_many_arguments)] // called by the dump orchestration, which moves to engine/ with its own context
    pub fn run_prompt(
        &self,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: Option<&BackgroundWriter>,
        keep: Option<&mut Vec<B::Buf>>,
        progress: &mut dyn Progress,
    ) -> Result<(Vec<u32>, f64, f64)> {
        // Timed from here, the KV cache included, as a dump times its runs.
        let t0 = std::time::Instant::now();
        let (c, b) = (&self.cfg, &self.backend);
        let total = prompt.tokens.len() + opts.max_tokens;
        let positions = selection
            .positions
            .resolve(total)
            .map_err(|e| Error::input(format!("prompt {}: {e}", prompt.id)))?;
        let collector = TapCollector {
            selection,
            cfg: c,
            positions,
            writer,
            prompt_id: &prompt.id,
            dtype: b.dtype().tap_dtype(),
            streams: BTreeMap::new(),
            sync_check: opts.sync_check,
        };
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
        let next = run.prefill(prompt, keep, progress)?;
        b.sync()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut tokens = prompt.tokens.clone();
        if opts.max_tokens > 0 {
            run.decode(next, &mut tokens, progress)?;
        }
        run.collector.check_complete()?;
        b.sync()?;
        Ok((tokens, prefill_s, t0.elapsed().as_secs_f64() - prefill_s))
    }
}

impl<B: Backend> PromptRun<'_, '_, B> {
    /// The prompt in chunks of `opts.prefill_chunk` tokens, returning its greedy next
    /// token when decode follows. With `keep`, the residual stream of every position
    /// after every layer stays there.
    fn prefill(
        &mut self,
        prompt: &PromptRecord,
        keep: Option<&mut Vec<B::Buf>>,
        progress: &mut dyn Progress,
    ) -> Result<Option<u32>> {
        let (rt, opts, len) = (self.rt, self.opts, prompt.tokens.len());
        let chunk = opts.prefill_chunk.unwrap_or(len).max(1);
        let n_chunks = len.div_ceil(chunk);
        progress.stage(&format!("{} ({len} tokens)", prompt.id), n_chunks + opts.max_tokens);
        let mut ws = Workspace::new(&rt.backend, &rt.cfg, chunk.min(len))?;
        if keep.is_some() {
            ws.keep = (0..=rt.cfg.n_layer)
                .map(|_| rt.backend.alloc(len * rt.cfg.n_embd))
                .collect::<Result<_>>()?;
        }
        let mut next = None;
        for (i, ids) in prompt.tokens.chunks(chunk).enumerate() {
            let mut pass = Pass {
                rt,
                start: i * chunk,
                rows: ids.len(),
                faults: self.faults,
                collector: &mut self.collector,
                route: TapRoute::Download,
                opts,
            };
            rt.layers(ids, &mut ws, &mut self.kv, &mut pass)?;
            next = rt.head(&mut ws, &mut pass, i + 1 == n_chunks && opts.max_tokens > 0)?;
            progress.tick();
        }
        if let Some(keep) = keep {
            *keep = std::mem::take(&mut ws.keep);
        }
        Ok(next)
    }
}

impl<B: Backend> Runtime<B> {
    /// Write one dump of `prompts` with the loaded weights. Any op error stops the run:
    /// the files already written stay, the manifest says `failed` with the error and the
    /// last tap written, and the error is an engine error.
    #[allow(clippy::too_many_arguments)]
    pub fn dump(
        &self,
        model: &Model,
        prompts: Vec<PromptRecord>,
        selection: &Selection,
        faults: &RuntimeFaults,
        injections: &[String],
        opts: &RunOptions,
        out: &std::path::Path,
        overwrite: bool,
        progress: &mut dyn Progress,
        mut cache: Option<&mut Option<Checkpoints<B>>>,
    ) -> Result<DumpSummary> {
        let longest = prompts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
        preflight(model, longest, opts, self.backend.dtype().bytes().max(4))?;
        let spec = &selection.positions;
        // Every prompt's positions resolve; the largest capture is the selected rows of a
        // prefill chunk, or of decode, of the widest tap; a prompt captures each tap once
        // per chunk, and once more after decode.
        let chunk = opts.prefill_chunk.unwrap_or(longest).max(1);
        let (mut capture_rows, mut captures_per_tap) = (0, 0);
        for p in &prompts {
            let selected = spec
                .resolve(p.tokens.len() + opts.max_tokens)
                .map_err(|e| Error::input(format!("prompt {}: {e}", p.id)))?;
            let decode_rows = selected.iter().filter(|&&q| q >= p.tokens.len()).count();
            capture_rows = capture_rows
                .max(decode_rows)
                .max((selected.len() - decode_rows).min(chunk));
            captures_per_tap = captures_per_tap.max(p.tokens.len().div_ceil(chunk) + usize::from(decode_rows > 0));
        }
        let selected_taps: Vec<Tap> = all_taps(self.cfg.n_layer)
            .into_iter()
            .filter(|t| selection.wants(t))
            .collect();
        let widest = selected_taps.iter().map(|t| t.width(&self.cfg)).max().unwrap_or(0);
        let b = &self.backend;
        let engine = EngineInfo::new("resbisect-runtime", b.name(), b.dtype().name(), b.device(), injections);
        // Tokens generated by decode are only known after the run: the manifest is first
        // written with the prompts, and completed with every processed token at the end.
        let manifest = Manifest::new(engine, ModelInfo::of(model), prompts.clone(), selection.clone());
        let writer = BackgroundWriter::spawn(DumpWriter::create(out, manifest, overwrite)?);
        for p in &prompts {
            self.warm_up(p, opts)?;
        }
        b.reserve_captures(widest * capture_rows, selected_taps.len() * captures_per_tap)?;
        let start = std::time::Instant::now();
        let mut processed: Vec<Vec<u32>> = Vec::new();
        let outcome = prompts.iter().try_for_each(|p| {
            let keeps = opts.max_tokens == 0 && (selection.wants(&Tap::FinalNorm) || selection.wants(&Tap::Logits));
            let tokens = match cache.as_deref_mut() {
                Some(Some(cp)) if self.serves(cp, p, selection, opts) => {
                    self.serve(cp, p, selection, &writer)?;
                    p.tokens.clone()
                }
                Some(slot) if keeps && self.checkpoint_bytes(p.tokens.len()) <= checkpoint_budget() => {
                    let mut keep = Vec::new();
                    let tokens = self
                        .run_prompt(p, selection, faults, opts, Some(&writer), Some(&mut keep), progress)?
                        .0;
                    *slot = Some(Checkpoints {
                        tokens: p.tokens.clone(),
                        stream: keep,
                    });
                    tokens
                }
                _ => {
                    self.run_prompt(p, selection, faults, opts, Some(&writer), None, progress)?
                        .0
                }
            };
            processed.push(tokens);
            Ok(())
        });
        let tokens: usize = processed.iter().map(Vec::len).sum();
        crate::trace::mark(|| format!("{}: computed {tokens} tokens", b.name()));
        let drain = std::time::Instant::now();
        writer.finish_with_tokens(outcome, processed)?;
        crate::trace::mark(|| format!("{}: dump written", b.name()));
        let drain_seconds = drain.elapsed().as_secs_f64();
        Ok(DumpSummary {
            prompts: prompts.len(),
            tokens,
            load_seconds: 0.0,
            compute_seconds: start.elapsed().as_secs_f64(),
            drain_seconds,
        })
    }
}

/// Memory the checkpoints of one run may take: 4 GiB, and at most a quarter of the
/// host's available memory (all of it, for the `cpu` backend).
fn checkpoint_budget() -> u64 {
    available_memory().map_or(4 << 30, |m| (m / 4).min(4 << 30))
}

/// The residual stream of every position after embedding and after each layer of one
/// prefill with an output tap (so every layer ran). A later dump of a prefix of the same
/// tokens that asks only for `embed` and `resid_post` rows reads them from here: by
/// causality they do not depend on the tokens after the prefix. (Bisect's layer probes;
/// its all-taps probe always runs the engine on the cut prompt, so a prompt whose cut
/// does not reproduce the divergence is still caught.)
pub struct Checkpoints<B: Backend> {
    tokens: Vec<u32>,
    /// `stream[0]` after embedding, `stream[l + 1]` after layer `l`, every token's row.
    stream: Vec<B::Buf>,
}

impl<B: Backend> Runtime<B> {
    fn checkpoint_bytes(&self, tokens: usize) -> u64 {
        ((self.cfg.n_layer + 1) * tokens * self.cfg.n_embd * self.backend.dtype().bytes()) as u64
    }

    /// Whether `cp` holds everything a dump of `prompt` with `selection` asks for.
    fn serves(&self, cp: &Checkpoints<B>, prompt: &PromptRecord, selection: &Selection, opts: &RunOptions) -> bool {
        let servable = |t: &Tap| matches!(t, Tap::Embed | Tap::Layer(_, LayerTap::ResidPost));
        !prompt.tokens.is_empty()
            && opts.max_tokens == 0
            && cp.tokens.starts_with(&prompt.tokens)
            && all_taps(self.cfg.n_layer)
                .iter()
                .all(|t| !selection.wants(t) || servable(t))
    }

    /// Write the dump of `prompt` with `selection` from `cp` (see [`serves`](Self::serves)).
    fn serve(
        &self,
        cp: &Checkpoints<B>,
        prompt: &PromptRecord,
        selection: &Selection,
        writer: &BackgroundWriter,
    ) -> Result<()> {
        let positions = selection
            .positions
            .resolve(prompt.tokens.len())
            .map_err(|e| Error::input(format!("prompt {}: {e}", prompt.id)))?;
        let mut col = TapCollector {
            selection,
            cfg: &self.cfg,
            positions,
            writer: Some(writer),
            prompt_id: &prompt.id,
            dtype: self.backend.dtype().tap_dtype(),
            streams: BTreeMap::new(),
            sync_check: false,
        };
        let e = self.cfg.n_embd;
        for (tap, buf) in std::iter::once(Tap::Embed)
            .chain((0..self.cfg.n_layer).map(|l| Tap::Layer(l, LayerTap::ResidPost)))
            .zip(&cp.stream)
        {
            if !col.wants(&tap) {
                continue;
            }
            let runs: Vec<(usize, usize)> = crate::taps::consecutive_runs(&col.positions)
                .map(|run| (col.positions[run.start] * e, run.len() * e))
                .collect();
            col.capture(&self.backend, &tap, 0, buf, &runs)?;
        }
        col.check_complete()
    }
}

/// `resbisect dump --engine runtime`: preflight, load, run every prompt, write the dump.
#[allow(clippy::too_many_arguments)]
pub fn dump_runtime<B: Backend>(
    backend: B,
    model: &Model,
    prompts: Vec<PromptRecord>,
    selection: Selection,
    injections: &[String],
    opts: &RunOptions,
    out: &std::path::Path,
    overwrite: bool,
    progress: &mut dyn Progress,
) -> Result<DumpSummary> {
    let faults = crate::inject::parse_runtime(injections, model.config.n_layer)?;
    let longest = prompts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
    preflight(model, longest, opts, backend.dtype().bytes().max(4))?;
    let start = std::time::Instant::now();
    progress.stage("loading weights", model.config.n_layer);
    let rt = Runtime::load(backend, model, &mut |_| progress.tick())?;
    let load_seconds = start.elapsed().as_secs_f64();
    let summary = rt.dump(
        model, prompts, &selection, &faults, injections, opts, out, overwrite, progress, None,
    )?;
    Ok(DumpSummary {
        load_seconds,
        ..summary
    })
}

/// What `resbisect run` reports.
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// `resbisect run`: generate greedily with no taps and time prefill and decode.
pub fn generate<B: Backend>(
    backend: B,
    model: &Model,
    prompt: PromptRecord,
    opts: &RunOptions,
    progress: &mut dyn Progress,
) -> Result<Generation> {
    preflight(model, prompt.tokens.len(), opts, backend.dtype().bytes().max(4))?;
    let selection = Selection {
        layers: Vec::new(),
        taps: Vec::new(),
        positions: PositionSpec::all(),
    };
    progress.stage("loading weights", model.config.n_layer);
    let rt = Runtime::load(backend, model, &mut |_| progress.tick())?;
    rt.warm_up(&prompt, opts)?;
    let (tokens, prefill_seconds, decode_seconds) = rt.run_prompt(
        &prompt,
        &selection,
        &RuntimeFaults::default(),
        opts,
        None,
        None,
        progress,
    )?;
    Ok(Generation {
        tokens,
        prompt_len: prompt.tokens.len(),
        prefill_seconds,
        decode_seconds,
    })
}
