//! The engines `dump` and `bisect` drive, behind one trait: the built-in reference (the
//! oracle), the built-in runtime on any backend, and external programs given as a command
//! template (docs/engines.md). An [`EngineSpec`] names one and [`EngineSpec::open`] is the
//! one factory; every built-in dump goes through one [`session`] loop. Each call writes
//! one dump (format v1); weights of built-in engines load once, on first use.

mod checkpoints;
mod external;
mod oracle;
mod pair;
mod process;
mod reference;
mod reproduce;
mod runtime;
mod session;

use std::path::Path;
use std::sync::Arc;

use crate::dump::PromptRecord;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::backend::{Backend, StorageDType};
use crate::runtime::{BackendKind, RunOptions};
use crate::taps::Selection;

pub use checkpoints::BRANCH_OUTPUTS;
pub use external::{identified, model_info_json, write_token_file, ExternalEngine, PLACEHOLDERS};
pub use oracle::{Oracle, RefPrecision, RefSpec};
pub use pair::{start_pair, EnginePair};
pub use reference::ReferenceEngine;
pub use reproduce::{layers_arg, resbisect_command, shell_quote};
pub use resbisect_reference::{gemm_backend, Profile};
pub use runtime::{generate, Generation, RuntimeEngine};
pub use session::crash_report;

/// Progress reports for long steps; the CLI draws them, tests ignore them.
pub trait Progress {
    fn stage(&mut self, label: &str, total: usize);
    fn tick(&mut self);
}

/// Silent progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&mut self, _: &str, _: usize) {}
    fn tick(&mut self) {}
}

/// What to dump: prompts, the taps and positions of each, and where.
pub struct DumpRequest<'a> {
    pub prompts: &'a [PromptRecord],
    pub selection: &'a Selection,
    /// The new dump directory.
    pub out: &'a Path,
    /// Replace an existing dump at `out`.
    pub overwrite: bool,
    /// Keep the residual stream of a full run and serve later prefixes of it from there
    /// (bisect's probes; see [`checkpoints`]).
    pub checkpoints: bool,
}

impl<'a> DumpRequest<'a> {
    /// A bisect probe: one prompt into a new directory, prefix checkpoints on.
    pub fn probe(prompt: &'a [PromptRecord], selection: &'a Selection, out: &'a Path) -> Self {
        Self {
            prompts: prompt,
            selection,
            out,
            overwrite: false,
            checkpoints: true,
        }
    }
}

/// What a finished dump run reports.
pub struct DumpSummary {
    pub prompts: usize,
    /// Every token processed, generated ones included.
    pub tokens: usize,
    /// Loading and dequantizing the weights (zero when they were loaded before).
    pub load_seconds: f64,
    /// Forward passes and writing the dump.
    pub compute_seconds: f64,
    /// Of `compute_seconds`, the wait after the last op until every file was on disk.
    pub drain_seconds: f64,
}

pub trait Engine: Send {
    /// Who this is, for reports: name, backend, dtype, injected faults.
    fn label(&self) -> String;
    /// Dump `prompt` with `selection` into the new directory `out` (a bisect probe, which
    /// may use prefix checkpoints). An engine failure is an [`Error::Engine`] and leaves
    /// whatever dump the engine wrote.
    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()>;
    /// Write one dump of every prompt of `request`. Engines that write one prompt per
    /// dump keep this default, which hands a one-prompt request to [`dump`](Self::dump).
    fn dump_prompts(&mut self, request: &DumpRequest, _progress: &mut dyn Progress) -> Result<DumpSummary> {
        let [prompt] = request.prompts else {
            return Err(Error::input(format!("{} writes one prompt per dump", self.label())));
        };
        if request.overwrite {
            return Err(Error::input(format!("{} cannot replace a dump", self.label())));
        }
        let start = std::time::Instant::now();
        self.dump(prompt, request.selection, request.out)?;
        Ok(DumpSummary {
            prompts: 1,
            tokens: prompt.tokens.len(),
            load_seconds: 0.0,
            compute_seconds: start.elapsed().as_secs_f64(),
            drain_seconds: 0.0,
        })
    }
    /// Do now what the first dump of prompts of up to `longest` tokens would do first
    /// (the runtime: its checks, then loading its weights), so that it happens while the
    /// other engine of a pair starts. Errors as that dump would.
    fn prepare(&mut self, _longest: usize) -> Result<()> {
        Ok(())
    }
    /// Whether a `dump` of a prompt that extends the previous dump's prompt, asking only
    /// for positions past it, computes only those positions (resuming from a KV cache).
    /// Else it reruns the whole prompt.
    fn resumes(&self) -> bool {
        false
    }
    /// Whether this engine computes on the host's cores in this process (the reference,
    /// the `cpu` runtime): two such engines at once only contend for the same cores and
    /// caches, so bisect runs them one after the other. An external engine's program may
    /// compute anywhere, so it keeps the default.
    fn computes_on_host(&self) -> bool {
        false
    }
    /// A shell command that writes the same dump as the earlier call `dump(.., written)`
    /// into `out`; the prompt `prompt_id` is also at `suite` as a one-line JSONL suite.
    fn reproduce(&self, prompt_id: &str, suite: &Path, selection: &Selection, written: &Path, out: &Path) -> String;
}

/// Which engine, and what it computes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineKind {
    /// The oracle (candle on the CPU).
    Reference(RefSpec),
    /// The instrumented runtime (the device under test).
    Runtime { backend: BackendKind, dtype: StorageDType },
    /// An external program: a command template with placeholders (docs/engines.md), killed
    /// and counted as crashed when one run outlasts `timeout`.
    External {
        command: String,
        timeout: Option<std::time::Duration>,
    },
}

/// One engine as `dump` and `bisect` name it.
#[derive(Clone)]
pub struct EngineSpec {
    pub kind: EngineKind,
    /// Faults injected into the engine (`dump --inject` syntax); built-in engines only.
    pub injections: Vec<String>,
    /// Runtime options; the other engines ignore them.
    pub run: RunOptions,
}

impl EngineSpec {
    /// Start the engine: parse its faults, and for the runtime create its backend (a GPU
    /// context). Weights load on the first dump.
    pub fn open<'m>(&self, model: &'m Model) -> Result<Box<dyn Engine + 'm>> {
        self.open_sharing(model, None)
    }

    /// As [`open`](Self::open); a reference engine computes with `oracle` when given.
    fn open_sharing<'m>(&self, model: &'m Model, oracle: Option<Arc<Oracle>>) -> Result<Box<dyn Engine + 'm>> {
        Ok(match &self.kind {
            EngineKind::Reference(spec) => {
                Box::new(ReferenceEngine::new(model, *spec, oracle, self.injections.clone())?)
            }
            EngineKind::Runtime { backend, dtype } => on_backend(
                *backend,
                *dtype,
                runtime::Open {
                    model,
                    injections: &self.injections,
                    run: &self.run,
                },
            )?,
            EngineKind::External { command, timeout } => Box::new(ExternalEngine::new(command, model, *timeout)?),
        })
    }

    /// Whether `other` computes exactly what this one does (same built-in engine, same
    /// backend and precision, no faults), so that comparing them can find nothing.
    pub fn is_same_engine_as(&self, other: &EngineSpec) -> bool {
        let same_kind = match (&self.kind, &other.kind) {
            (EngineKind::Reference(a), EngineKind::Reference(b)) => a.profile == b.profile,
            (EngineKind::Runtime { .. }, EngineKind::Runtime { .. }) => self.kind == other.kind,
            _ => false,
        };
        let same_run = self.run.weights == other.run.weights && self.run.prefill_chunk == other.run.prefill_chunk;
        same_kind && same_run && self.injections.is_empty() && other.injections.is_empty()
    }
}

/// Work that needs the backend as a type (monomorphized per backend and storage type).
pub trait OnBackend {
    type Output;
    fn run<B: Backend + 'static>(self, backend: B) -> Result<Self::Output>;
}

/// Run `job` on a new backend of `kind` storing `dtype`: the one place a backend is chosen.
pub fn on_backend<J: OnBackend>(kind: BackendKind, dtype: StorageDType, job: J) -> Result<J::Output> {
    crate::with_backend!(kind, dtype, |b| job.run(b))
}
