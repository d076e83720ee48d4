//! The runtime as an engine: one backend, weights loaded on the first dump, each prompt
//! of a dump session prefilled (and decoded) with its taps streamed to the writer, and
//! prefix checkpoints for bisect's layer probes. Also `resbisect run`'s generation.

use std::path::Path;
use std::sync::Arc;

use super::checkpoints::{self, KeptRows, PrefixCheckpoints};
use super::session::{DumpSession, PromptRunner};
use super::{reproduce, DumpRequest, DumpSummary, Engine, NoProgress, OnBackend, Progress};
use crate::dump::{BackgroundWriter, EngineInfo, PromptRecord};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::Model;
use crate::runtime::backend::{Backend, StorageDType};
use crate::runtime::weights::WeightMode;
use crate::runtime::{preflight, KvCache, RunOptions, Runtime};
use crate::taps::{all_taps, PositionSpec, Selection, Tap};

/// The built-in runtime on one backend, optionally with injected faults.
pub struct RuntimeEngine<'m, B: Backend> {
    model: &'m Model,
    /// The backend until the weights load onto it.
    backend: Option<B>,
    loaded: Option<Runtime<B>>,
    /// The kept rows of the last probe with an output tap: later probes of a prefix that
    /// want only kept taps are read from them.
    checkpoints: PrefixCheckpoints<B::Buf>,
    /// The KV cache of the kept run: a prompt extending its tokens continues it
    /// (bisect's streamed coarse probe).
    kv: Option<KvCache<B>>,
    injections: Vec<String>,
    faults: RuntimeFaults,
    run: RunOptions,
    backend_name: &'static str,
    dtype: StorageDType,
}

impl<'m, B: Backend> RuntimeEngine<'m, B> {
    pub fn new(backend: B, model: &'m Model, injections: Vec<String>, run: RunOptions) -> Result<Self> {
        let faults = crate::inject::parse_runtime(&injections, model.config.n_layer)?;
        crate::inject::check_windows(&faults, &model.config)?;
        crate::inject::check_blocks(&faults, model)?;
        Ok(Self {
            model,
            backend_name: backend.name(),
            dtype: backend.dtype(),
            backend: Some(backend),
            loaded: None,
            checkpoints: PrefixCheckpoints::default(),
            kv: None,
            injections,
            faults,
            run,
        })
    }

    /// Load the weights unless they are; returns the seconds it took.
    fn load(&mut self, progress: &mut dyn Progress) -> Result<f64> {
        if self.loaded.is_some() {
            return Ok(0.0);
        }
        let start = std::time::Instant::now();
        let backend = self
            .backend
            .take()
            .ok_or_else(|| Error::engine("the runtime failed to load its weights earlier"))?;
        progress.stage("loading weights", self.model.config.n_layer);
        let (weights, faults) = (self.run.weights, &self.faults);
        self.loaded = Some(Runtime::load(backend, self.model, weights, faults, &mut |_| {
            progress.tick()
        })?);
        Ok(start.elapsed().as_secs_f64())
    }
}

/// Bytes per stored value that preflight sizes buffers by (activations are f32).
fn bytes_per_value(dtype: StorageDType) -> usize {
    dtype.bytes().max(4)
}

impl<B: Backend> Engine for RuntimeEngine<'_, B> {
    fn label(&self) -> String {
        let weights = match self.run.weights {
            WeightMode::Native => "",
            WeightMode::Dequant => " (weights dequantized at load)",
        };
        format!(
            "runtime {} {}{weights}{}",
            self.backend_name,
            self.dtype.name(),
            reproduce::injected_label(&self.injections)
        )
    }

    fn prepare(&mut self, longest: usize) -> Result<()> {
        preflight(self.model, longest, &self.run, bytes_per_value(self.dtype))?;
        self.load(&mut NoProgress).map(drop)
    }

    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()> {
        let request = DumpRequest::probe(std::slice::from_ref(prompt), selection, out);
        self.dump_prompts(&request, &mut NoProgress).map(drop)
    }

    /// Any op error stops the run: the files already written stay, the manifest says
    /// `failed` with the error and the last tap written, and the error is an engine error.
    fn dump_prompts(&mut self, request: &DumpRequest, progress: &mut dyn Progress) -> Result<DumpSummary> {
        let longest = request.prompts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
        preflight(self.model, longest, &self.run, bytes_per_value(self.dtype))?;
        let session = DumpSession::new(self.model, request, self.run.max_tokens)?;
        let load_seconds = self.load(progress)?;
        let rt = self.loaded.as_ref().expect("loaded above");
        let b = rt.backend();
        let engine = EngineInfo::new(
            "resbisect-runtime",
            b.name(),
            b.dtype().name(),
            b.device(),
            &self.injections,
        );
        let mut runner = RuntimeRunner {
            rt,
            model: self.model,
            faults: &self.faults,
            run: &self.run,
            selection: request.selection,
            checkpoints: request.checkpoints.then_some((&mut self.checkpoints, &mut self.kv)),
        };
        let summary = session.run(engine, &mut runner, progress)?;
        Ok(DumpSummary {
            load_seconds,
            ..summary
        })
    }

    /// With prefix checkpoints (bisect's probes), a prefill with an output tap keeps its
    /// KV cache.
    fn resumes(&self) -> bool {
        true
    }

    fn computes_on_host(&self) -> bool {
        self.backend_name == "cpu"
    }

    fn reproduce(&self, _prompt_id: &str, suite: &Path, selection: &Selection, _written: &Path, out: &Path) -> String {
        let command = reproduce::DumpCommand {
            model: self.model,
            suite,
            selection,
            out,
            injections: &self.injections,
        };
        command.runtime(
            self.backend_name,
            self.dtype.name(),
            self.run.prefill_chunk,
            self.run.weights,
        )
    }
}

/// Opens a runtime engine on the backend [`on_backend`](super::on_backend) creates.
pub(super) struct Open<'a, 'm> {
    pub model: &'m Model,
    pub injections: &'a [String],
    pub run: &'a RunOptions,
}

impl<'m> OnBackend for Open<'_, 'm> {
    type Output = Box<dyn Engine + 'm>;

    fn run<B: Backend + 'static>(self, backend: B) -> Result<Self::Output> {
        let engine = RuntimeEngine::new(backend, self.model, self.injections.to_vec(), self.run.clone())?;
        Ok(Box::new(engine))
    }
}

/// One dump's prompts on the loaded runtime.
struct RuntimeRunner<'a, B: Backend> {
    rt: &'a Runtime<B>,
    model: &'a Model,
    faults: &'a RuntimeFaults,
    run: &'a RunOptions,
    selection: &'a Selection,
    /// Prefix checkpoints and the KV cache of the kept run (bisect's probes only).
    checkpoints: Option<KeptRun<'a, B>>,
}

/// The kept run's residual stream and KV cache.
type KeptRun<'a, B> = (
    &'a mut PrefixCheckpoints<<B as Backend>::Buf>,
    &'a mut Option<KvCache<B>>,
);

impl<B: Backend> PromptRunner for RuntimeRunner<'_, B> {
    fn steps(&self, prompt: &PromptRecord) -> usize {
        prefill_steps(prompt, self.run) + self.run.max_tokens
    }

    /// Warm-up runs, then room for the largest capture: the selected rows of a prefill
    /// chunk, or of decode, of the widest tap; a prompt captures each tap once per chunk,
    /// and once more after decode.
    fn prepare(&mut self, session: &DumpSession) -> Result<()> {
        for (p, _) in session.prompts() {
            self.rt.warm_up(p, self.run)?;
        }
        let longest = session.prompts().map(|(p, _)| p.tokens.len()).max().unwrap_or(0);
        let chunk = self.run.prefill_chunk.unwrap_or(longest).max(1);
        let (mut capture_rows, mut captures_per_tap) = (0, 0);
        for (p, selected) in session.prompts() {
            let decode_rows = selected.iter().filter(|&&q| q >= p.tokens.len()).count();
            capture_rows = capture_rows
                .max(decode_rows)
                .max((selected.len() - decode_rows).min(chunk));
            captures_per_tap = captures_per_tap.max(p.tokens.len().div_ceil(chunk) + usize::from(decode_rows > 0));
        }
        let cfg = &self.model.config;
        let selected_taps: Vec<Tap> = all_taps(cfg.n_layer)
            .into_iter()
            .filter(|t| t.in_model(cfg) && session.selection().wants(t))
            .collect();
        let widest = selected_taps.iter().map(|t| t.width(cfg)).max().unwrap_or(0);
        self.rt
            .backend()
            .reserve_captures(widest * capture_rows, selected_taps.len() * captures_per_tap)
    }

    /// With checkpoints, a prompt that is a prefix of the kept run's tokens is served
    /// from them (recomputing only the layers whose inner taps it asks for), a run with
    /// an output tap keeps its stream and KV cache, continuing the kept run when its
    /// prompt extends it.
    fn run(
        &mut self,
        prompt: &PromptRecord,
        positions: &Arc<Vec<usize>>,
        writer: &BackgroundWriter,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<u32>> {
        let (rt, selection, run, faults) = (self.rt, self.selection, self.run, self.faults);
        // Only a run with an output tap computes every layer, so only its rows are whole.
        let keeps = run.max_tokens == 0 && (selection.wants(&Tap::FinalNorm) || selection.wants(&Tap::Logits));
        let b = self.rt.backend();
        let plan = checkpoints::plan(
            &self.model.config,
            prompt.tokens.len(),
            b.dtype().bytes(),
            0,
            b.free_memory(),
        );
        match (self.checkpoints.as_mut(), plan) {
            (Some((cp, _)), _) if run.max_tokens == 0 && cp.covering(&prompt.tokens).is_some() => {
                let kept = cp.covering(&prompt.tokens).expect("checked above");
                rt.serve(kept, prompt, selection, faults, run, writer)?;
                Ok(prompt.tokens.clone())
            }
            (Some((cp, kv)), Some(taps)) if keeps => {
                let continued = kv.take().filter(|k| {
                    cp.extended_by(&prompt.tokens) == Some(k.tokens())
                        && positions.first().is_none_or(|&p| p >= k.tokens())
                });
                let mut kept = match continued {
                    Some(_) => cp.take().unwrap_or_default(),
                    None => {
                        cp.forget();
                        KeptRows {
                            taps: taps.clone(),
                            rows: Vec::new(),
                        }
                    }
                };
                if !kept.holds(&taps) {
                    // Grown past what fits with the branch outputs: the stream goes on alone.
                    kept.stream_only();
                }
                let cache =
                    rt.prefill_continuing(prompt, selection, faults, run, writer, continued, &mut kept, on_step)?;
                cp.keep(&prompt.tokens, kept);
                **kv = Some(cache);
                Ok(prompt.tokens.clone())
            }
            _ => Ok(rt
                .run_prompt(prompt, selection, faults, run, Some(writer), None, on_step)?
                .0),
        }
    }
}

/// Prefill steps of a prompt: one per chunk.
fn prefill_steps(prompt: &PromptRecord, run: &RunOptions) -> usize {
    let chunk = run.prefill_chunk.unwrap_or(prompt.tokens.len()).max(1);
    prompt.tokens.len().div_ceil(chunk)
}

/// What `resbisect run` reports.
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// `resbisect run`: generate greedily on `backend` with no taps, timing prefill and decode.
pub fn generate(
    backend: crate::runtime::BackendKind,
    dtype: StorageDType,
    model: &Model,
    prompt: PromptRecord,
    run: &RunOptions,
    progress: &mut dyn Progress,
) -> Result<Generation> {
    super::on_backend(
        backend,
        dtype,
        Generate {
            model,
            prompt,
            run,
            progress,
        },
    )
}

struct Generate<'a> {
    model: &'a Model,
    prompt: PromptRecord,
    run: &'a RunOptions,
    progress: &'a mut dyn Progress,
}

impl OnBackend for Generate<'_> {
    type Output = Generation;

    fn run<B: Backend + 'static>(self, backend: B) -> Result<Generation> {
        let Self {
            model,
            prompt,
            run,
            progress,
        } = self;
        preflight(model, prompt.tokens.len(), run, bytes_per_value(backend.dtype()))?;
        let nothing = Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        };
        progress.stage("loading weights", model.config.n_layer);
        let rt = Runtime::load(backend, model, run.weights, &RuntimeFaults::default(), &mut |_| {
            progress.tick()
        })?;
        rt.warm_up(&prompt, run)?;
        progress.stage(
            &format!("{} ({} tokens)", prompt.id, prompt.tokens.len()),
            prefill_steps(&prompt, run) + run.max_tokens,
        );
        let (tokens, prefill_seconds, decode_seconds) = rt.run_prompt(
            &prompt,
            &nothing,
            &RuntimeFaults::default(),
            run,
            None,
            None,
            &mut || progress.tick(),
        )?;
        Ok(Generation {
            tokens,
            prompt_len: prompt.tokens.len(),
            prefill_seconds,
            decode_seconds,
        })
    }
}
