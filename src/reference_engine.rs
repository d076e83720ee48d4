//! Drives the reference crate (the oracle) over prompts and writes its taps as a dump:
//! weights come from [`Model`], captured rows go to the background dump writer.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use resbisect_reference::{RawWeight, Reference, TapSink, WeightSource};

use crate::dump::{BackgroundWriter, FileJob, TapDType, TapTensor};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::taps::{Faults, FileStem, LayerTap, Selection, Tap};

/// Precision the reference computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefPrecision {
    F32,
    F64,
}

impl RefPrecision {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            other => Err(Error::input(format!(
                "the reference computes in f32 or f64, not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
        }
    }

    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
}

impl WeightSource for Model {
    fn weight(&self, name: &str) -> anyhow::Result<RawWeight<'_>> {
        let info = Model::weight(self, name)?;
        Ok(RawWeight {
            dtype: info.dtype,
            dims: info.dims.iter().map(|&d| d as usize).collect(),
            data: self.weight_data(info),
        })
    }
}

/// Reference weights loaded once, reusable across prompts.
pub struct ReferenceEngine {
    inner: Reference,
    precision: RefPrecision,
}

impl ReferenceEngine {
    pub fn load(model: &Model, precision: RefPrecision, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let inner = Reference::load(model.config.clone(), model, precision.candle(), on_layer)
            .map_err(|e| Error::engine(format!("reference: loading weights: {e:#}")))?;
        Ok(Self { inner, precision })
    }

    /// Only `layers`, for local replay ([`replay_layer`](Self::replay_layer)).
    pub fn load_for_replay(model: &Model, precision: RefPrecision, layers: &[usize]) -> Result<Self> {
        let inner = Reference::load_for_replay(model.config.clone(), model, precision.candle(), layers)
            .map_err(|e| Error::engine(format!("reference: loading layers {layers:?} for replay: {e:#}")))?;
        Ok(Self { inner, precision })
    }

    pub fn precision(&self) -> RefPrecision {
        self.precision
    }

    /// Local replay: layer `l` recomputed from `rows` rows of residual-stream input
    /// (positions `0..rows`) at positions `at` (ascending); every tap of the layer as f32
    /// rows of those positions, in order.
    pub fn replay_layer(&self, l: usize, input: &[f32], rows: usize, at: &[usize]) -> Result<Vec<(String, Vec<f32>)>> {
        let fail = |e: anyhow::Error| Error::engine(format!("reference: replaying layer {l}: {e:#}"));
        self.inner
            .replay_layer(l, input, rows, at)
            .map_err(fail)?
            .into_iter()
            .map(|(id, t)| {
                Ok((
                    id.id(),
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| fail(e.into()))?,
                ))
            })
            .collect()
    }

    /// Run one prompt, sending each completed file to `writer`. With `cache`, a prompt
    /// that is a prefix of the cached run's tokens resumes from its checkpoints, and any
    /// other prompt runs in full and leaves its checkpoints there (when they fit).
    #[allow(clippy::too_many_arguments)]
    pub fn run_prompt(
        &self,
        prompt_id: &str,
        tokens: &[u32],
        positions: Arc<Vec<usize>>,
        selection: &Selection,
        faults: &Faults,
        n_layer: usize,
        writer: &BackgroundWriter,
        on_layer: &mut dyn FnMut(usize),
        cache: Option<&mut Option<Checkpoints>>,
    ) -> Result<()> {
        let mut sink = DumpSink {
            prompt_id,
            positions: positions.clone(),
            selection,
            n_layer,
            writer,
            send_error: None,
        };
        let result = match cache {
            Some(Some(cp)) if !tokens.is_empty() && cp.tokens.starts_with(tokens) => {
                self.resume(cp, tokens.len(), &positions, faults, &mut sink)
            }
            Some(slot) if self.checkpoint_bytes(tokens.len(), n_layer) <= checkpoint_budget() => {
                let mut stream = Vec::with_capacity(n_layer + 1);
                let r = self
                    .inner
                    .forward_keeping(tokens, &positions, faults, &mut sink, &mut |i, x| {
                        stream.push(x.clone());
                        if i > 0 {
                            on_layer(i - 1);
                        }
                    });
                *slot = r.is_ok().then(|| Checkpoints {
                    tokens: tokens.to_vec(),
                    stream,
                });
                r
            }
            _ => self.inner.forward(tokens, &positions, faults, &mut sink, on_layer),
        };
        if let Some(e) = sink.send_error {
            return Err(e);
        }
        result.map_err(|e| Error::engine(format!("reference failed on prompt {prompt_id}: {e:#}")))
    }
}

/// The residual stream of every position after embedding and after each layer of one
/// forward pass. A later run over a prefix of the same tokens reads its rows from here and
/// recomputes only the layers whose inner taps it wants: by causality, rows of a prefix
/// do not depend on the tokens after it.
pub struct Checkpoints {
    tokens: Vec<u32>,
    /// `stream[0]` after embedding, `stream[l + 1]` after layer `l`, all tokens' rows.
    stream: Vec<Tensor>,
}

/// Memory the checkpoints of one run may take: half of what is available (2 GiB when
/// unknown).
fn checkpoint_budget() -> u64 {
    crate::runtime::available_memory().map_or(2 << 30, |m| m / 2)
}

impl ReferenceEngine {
    fn checkpoint_bytes(&self, tokens: usize, n_layer: usize) -> u64 {
        let width = self.inner.n_embd() as u64;
        let bytes = if self.precision == RefPrecision::F64 { 8 } else { 4 };
        (n_layer as u64 + 1) * tokens as u64 * width * bytes
    }

    /// Serve a run over the first `n` cached tokens from the checkpoints.
    fn resume(
        &self,
        cp: &Checkpoints,
        n: usize,
        positions: &[usize],
        faults: &Faults,
        sink: &mut DumpSink,
    ) -> anyhow::Result<()> {
        let rows = |i: usize| cp.stream[i].narrow(0, 0, n);
        if sink.wants(Tap::Embed) {
            sink.emit(
                FileStem::Embed,
                vec![(Tap::Embed, resbisect_reference::gather(&rows(0)?, positions)?)],
            )?;
        }
        let layers = cp.stream.len() - 1;
        let n_layer = self.inner.n_layer();
        let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
        let wants_any =
            |sink: &DumpSink, l: usize, taps: &[LayerTap]| taps.iter().any(|&t| sink.wants(Tap::Layer(l, t)));
        for l in 0..n_layer {
            let inner = wants_any(sink, l, &LayerTap::ALL[..LayerTap::ALL.len() - 1]);
            let post = sink.wants(Tap::Layer(l, LayerTap::ResidPost));
            if l >= layers {
                // Past the checkpointed layers: continue the forward from the last one.
                let wanted_after = (l..n_layer).rev().find(|&m| wants_any(sink, m, &LayerTap::ALL));
                let last = if wants_output { Some(n_layer - 1) } else { wanted_after };
                let Some(last) = last else { return Ok(()) };
                let x = self
                    .inner
                    .run_layers(rows(layers)?, layers, last, positions, faults, sink, &mut |_, _| {})?;
                return if wants_output {
                    self.inner.head(&x, positions, faults, sink)
                } else {
                    Ok(())
                };
            }
            if inner {
                self.inner
                    .run_layers(rows(l)?, l, l, positions, faults, sink, &mut |_, _| {})?;
            } else if post {
                let tap = Tap::Layer(l, LayerTap::ResidPost);
                sink.emit(
                    FileStem::Layer(l),
                    vec![(tap, resbisect_reference::gather(&rows(l + 1)?, positions)?)],
                )?;
            }
        }
        if wants_output {
            self.inner.head(&rows(n_layer)?, positions, faults, sink)?;
        }
        Ok(())
    }
}

struct DumpSink<'a> {
    prompt_id: &'a str,
    positions: Arc<Vec<usize>>,
    selection: &'a Selection,
    n_layer: usize,
    writer: &'a BackgroundWriter,
    /// A writer failure, kept so it is reported as itself rather than as a reference error.
    send_error: Option<Error>,
}

fn tensor_to_tap(id: String, t: &Tensor) -> anyhow::Result<TapTensor> {
    let (rows, width) = t.dims2()?;
    let (dtype, bytes) = match t.dtype() {
        DType::F64 => (
            TapDType::F64,
            t.flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            TapDType::F32,
            t.to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    Ok(TapTensor {
        id,
        dtype,
        rows,
        width,
        bytes,
    })
}

impl TapSink for DumpSink<'_> {
    fn wants(&self, tap: Tap) -> bool {
        tap.layer().is_none_or(|l| l < self.n_layer) && self.selection.wants(&tap)
    }

    fn emit(&mut self, group: FileStem, taps: Vec<(Tap, Tensor)>) -> anyhow::Result<()> {
        let taps = taps
            .into_iter()
            .map(|(tap, t)| tensor_to_tap(tap.id(), &t))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let job = FileJob {
            prompt_id: self.prompt_id.to_string(),
            stem: group.to_string(),
            positions: self.positions.clone(),
            taps,
        };
        if let Err(e) = self.writer.send(job) {
            let msg = e.to_string();
            self.send_error = Some(e);
            anyhow::bail!(msg);
        }
        Ok(())
    }
}

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

/// What a finished dump run reports.
pub struct DumpSummary {
    pub prompts: usize,
    pub tokens: usize,
    /// Loading and dequantizing the weights.
    pub load_seconds: f64,
    /// Forward passes and writing the dump.
    pub compute_seconds: f64,
    /// Of `compute_seconds`, the wait after the last op until every file was on disk.
    pub drain_seconds: f64,
}

impl ReferenceEngine {
    /// Write one dump of `prompts` with the loaded weights. On an engine error the
    /// partial dump stays, with status `failed`.
    #[allow(clippy::too_many_arguments)]
    pub fn dump(
        &self,
        model: &Model,
        prompts: Vec<crate::dump::PromptRecord>,
        selection: &Selection,
        faults: &Faults,
        injections: &[String],
        out: &std::path::Path,
        overwrite: bool,
        progress: &mut dyn Progress,
        mut cache: Option<&mut Option<Checkpoints>>,
    ) -> Result<DumpSummary> {
        let positions: Vec<Arc<Vec<usize>>> = prompts
            .iter()
            .map(|p| {
                selection
                    .positions
                    .resolve(p.tokens.len())
                    .map(Arc::new)
                    .map_err(|e| Error::input(format!("prompt {}: {e}", p.id)))
            })
            .collect::<Result<_>>()?;
        let engine_info = crate::dump::EngineInfo::new(
            "resbisect-reference",
            "candle-cpu",
            self.precision.name(),
            "cpu".into(),
            injections,
        );
        let manifest = crate::dump::Manifest::new(
            engine_info,
            crate::dump::ModelInfo::of(model),
            prompts.clone(),
            selection.clone(),
        );
        let writer = BackgroundWriter::spawn(crate::dump::DumpWriter::create(out, manifest, overwrite)?);
        let start = std::time::Instant::now();
        let n_layer = model.config.n_layer;
        let outcome = prompts.iter().zip(&positions).try_for_each(|(p, pos)| {
            progress.stage(&format!("{} ({} tokens)", p.id, p.tokens.len()), n_layer);
            self.run_prompt(
                &p.id,
                &p.tokens,
                pos.clone(),
                selection,
                faults,
                n_layer,
                &writer,
                &mut |_| progress.tick(),
                cache.as_deref_mut(),
            )
        });
        let drain = std::time::Instant::now();
        writer.finish(outcome)?;
        Ok(DumpSummary {
            prompts: prompts.len(),
            tokens: prompts.iter().map(|p| p.tokens.len()).sum(),
            load_seconds: 0.0,
            compute_seconds: start.elapsed().as_secs_f64(),
            drain_seconds: drain.elapsed().as_secs_f64(),
        })
    }
}

/// `resbisect dump --engine reference`: load the model on the reference, run every
/// prompt, write dump format v1 to `out`.
#[allow(clippy::too_many_arguments)]
pub fn dump_reference(
    model: &Model,
    prompts: Vec<crate::dump::PromptRecord>,
    selection: Selection,
    precision: RefPrecision,
    injections: &[String],
    out: &std::path::Path,
    overwrite: bool,
    progress: &mut dyn Progress,
) -> Result<DumpSummary> {
    let faults = crate::inject::parse_all(injections, model.config.n_layer)?;
    for p in &prompts {
        selection
            .positions
            .resolve(p.tokens.len())
            .map_err(|e| Error::input(format!("prompt {}: {e}", p.id)))?;
    }
    let start = std::time::Instant::now();
    progress.stage("loading weights", model.config.n_layer);
    let engine = ReferenceEngine::load(model, precision, &mut |_| progress.tick())?;
    let load_seconds = start.elapsed().as_secs_f64();
    let summary = engine.dump(
        model, prompts, &selection, &faults, injections, out, overwrite, progress, None,
    )?;
    Ok(DumpSummary {
        load_seconds,
        ..summary
    })
}
