//! Drives the reference crate (the oracle) over prompts and writes its taps as a dump:
//! weights come from [`Model`], captured rows go to the background dump writer.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use resbisect_reference::{Config as RefConfig, Faults, RawWeight, Reference, TapSink, WeightSource};

use crate::dump::{BackgroundWriter, FileJob, TapDType, TapTensor};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::taps::{Selection, Tap};

/// Precision the reference computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefPrecision {
    F32,
    F64,
}

impl RefPrecision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            other => Err(Error::input(format!("the reference computes in f32 or f64, not {other:?}"))),
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
        Ok(RawWeight { dtype: info.dtype, dims: info.dims.iter().map(|&d| d as usize).collect(), data: self.weight_data(info) })
    }
}

/// Reference weights loaded once, reusable across prompts.
pub struct ReferenceEngine {
    inner: Reference,
    precision: RefPrecision,
}

impl ReferenceEngine {
    pub fn load(model: &Model, precision: RefPrecision, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let c = &model.config;
        let cfg = RefConfig {
            n_layer: c.n_layer,
            n_embd: c.n_embd,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            n_ff: c.n_ff,
            n_vocab: c.n_vocab,
            rope_base: c.rope_base,
            rms_eps: c.rms_eps,
        };
        let inner = Reference::load(cfg, model, precision.candle(), on_layer).map_err(|e| Error::engine(format!("reference: loading weights: {e:#}")))?;
        Ok(Self { inner, precision })
    }

    pub fn precision(&self) -> RefPrecision {
        self.precision
    }

    /// Local replay: layer `l` recomputed from `rows` rows of residual-stream input
    /// (positions `0..rows`); every tap of the layer as f32 rows, in order.
    pub fn replay_layer(&self, l: usize, input: &[f32], rows: usize) -> Result<Vec<(String, Vec<f32>)>> {
        let fail = |e: anyhow::Error| Error::engine(format!("reference: replaying layer {l}: {e:#}"));
        self.inner
            .replay_layer(l, input, rows)
            .map_err(fail)?
            .into_iter()
            .map(|(id, t)| Ok((id, t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| fail(e.into()))?)))
            .collect()
    }

    /// Run one prompt, sending each completed file to `writer`.
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
    ) -> Result<()> {
        let mut sink = DumpSink { prompt_id, positions: positions.clone(), selection, n_layer, writer, send_error: None };
        let result = self.inner.forward(tokens, &positions, faults, &mut sink, on_layer);
        if let Some(e) = sink.send_error {
            return Err(e);
        }
        result.map_err(|e| Error::engine(format!("reference failed on prompt {prompt_id}: {e:#}")))
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
        DType::F64 => (TapDType::F64, t.flatten_all()?.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        _ => (TapDType::F32, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
    };
    Ok(TapTensor { id, dtype, rows, width, bytes })
}

impl TapSink for DumpSink<'_> {
    fn wants(&self, tap_id: &str) -> bool {
        match Tap::parse(tap_id) {
            Some(Tap::Layer(l, _)) if l >= self.n_layer => false,
            Some(tap) => self.selection.wants(&tap),
            None => false,
        }
    }

    fn emit(&mut self, group: &str, taps: Vec<(String, Tensor)>) -> anyhow::Result<()> {
        let taps = taps.into_iter().map(|(id, t)| tensor_to_tap(id, &t)).collect::<anyhow::Result<Vec<_>>>()?;
        let job = FileJob { prompt_id: self.prompt_id.to_string(), stem: group.to_string(), positions: self.positions.clone(), taps };
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
    ) -> Result<DumpSummary> {
        let spec = crate::taps::PositionSpec::parse(&selection.positions)?;
        let positions: Vec<Arc<Vec<usize>>> = prompts
            .iter()
            .map(|p| spec.resolve(p.tokens.len()).map(Arc::new).map_err(|e| Error::input(format!("prompt {}: {e}", p.id))))
            .collect::<Result<_>>()?;
        let engine_info = crate::dump::EngineInfo::new("resbisect-reference", "candle-cpu", self.precision.name(), "cpu".into(), injections);
        let manifest = crate::dump::Manifest::new(engine_info, crate::dump::ModelInfo::of(model), prompts.clone(), selection.clone());
        let writer = BackgroundWriter::spawn(crate::dump::DumpWriter::create(out, manifest, overwrite)?);
        let start = std::time::Instant::now();
        let n_layer = model.config.n_layer;
        let outcome = prompts.iter().zip(&positions).try_for_each(|(p, pos)| {
            progress.stage(&format!("{} ({} tokens)", p.id, p.tokens.len()), n_layer);
            self.run_prompt(&p.id, &p.tokens, pos.clone(), selection, faults, n_layer, &writer, &mut |_| progress.tick())
        });
        writer.finish(outcome)?;
        Ok(DumpSummary {
            prompts: prompts.len(),
            tokens: prompts.iter().map(|p| p.tokens.len()).sum(),
            load_seconds: 0.0,
            compute_seconds: start.elapsed().as_secs_f64(),
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
    let spec = crate::taps::PositionSpec::parse(&selection.positions)?;
    for p in &prompts {
        spec.resolve(p.tokens.len()).map_err(|e| Error::input(format!("prompt {}: {e}", p.id)))?;
    }
    let start = std::time::Instant::now();
    progress.stage("loading weights", model.config.n_layer);
    let engine = ReferenceEngine::load(model, precision, &mut |_| progress.tick())?;
    let load_seconds = start.elapsed().as_secs_f64();
    let summary = engine.dump(model, prompts, &selection, &faults, injections, out, overwrite, progress)?;
    Ok(DumpSummary { load_seconds, ..summary })
}
