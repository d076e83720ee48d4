//! The reference as an engine: the oracle run over each prompt of a dump session, its
//! captured rows sent to the dump writer, with prefix checkpoints for bisect's probes.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use resbisect_reference::TapSink;

use super::checkpoints::PrefixCheckpoints;
use super::session::{DumpSession, PromptRunner};
use super::{reproduce, DumpRequest, DumpSummary, Engine, NoProgress, Oracle, Progress, RefSpec};
use crate::dump::{BackgroundWriter, EngineInfo, FileJob, PromptRecord, TapDType, TapTensor};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::taps::{Faults, FileStem, LayerTap, Selection, Tap};

/// The built-in reference (candle, f32 or f64), optionally with injected faults. Its
/// oracle may be shared (bisect's other engine, local replay) or load on first use.
pub struct ReferenceEngine<'m> {
    model: &'m Model,
    spec: RefSpec,
    oracle: Option<Arc<Oracle>>,
    injections: Vec<String>,
    faults: Faults,
    checkpoints: PrefixCheckpoints<Tensor>,
}

impl<'m> ReferenceEngine<'m> {
    /// With `oracle`, computes with it (and in its precision and profile); else loads one
    /// on first use.
    pub fn new(model: &'m Model, spec: RefSpec, oracle: Option<Arc<Oracle>>, injections: Vec<String>) -> Result<Self> {
        let faults = crate::inject::parse_all(&injections, model.config.n_layer)?;
        Ok(Self {
            model,
            spec: oracle.as_ref().map_or(spec, |o| o.spec()),
            oracle,
            injections,
            faults,
            checkpoints: PrefixCheckpoints::default(),
        })
    }
}

impl Engine for ReferenceEngine<'_> {
    fn label(&self) -> String {
        format!(
            "reference {}{}",
            self.spec.label(),
            reproduce::injected_label(&self.injections)
        )
    }

    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()> {
        let request = DumpRequest::probe(std::slice::from_ref(prompt), selection, out);
        self.dump_prompts(&request, &mut NoProgress).map(drop)
    }

    fn dump_prompts(&mut self, request: &DumpRequest, progress: &mut dyn Progress) -> Result<DumpSummary> {
        let session = DumpSession::new(self.model, request, 0)?;
        let start = std::time::Instant::now();
        let oracle = match &self.oracle {
            Some(oracle) => oracle.clone(),
            None => {
                progress.stage("loading weights", self.model.config.n_layer);
                let loaded = Arc::new(Oracle::load(self.model, self.spec, &mut |_| progress.tick())?);
                self.oracle = Some(loaded.clone());
                loaded
            }
        };
        let load_seconds = start.elapsed().as_secs_f64();
        let engine = EngineInfo::new(
            "resbisect-reference",
            "candle-cpu",
            self.spec.precision.name(),
            "cpu".into(),
            &self.injections,
        )
        .with_profile(self.spec.profile.name());
        let mut runner = OracleRunner {
            oracle: &oracle,
            faults: &self.faults,
            selection: request.selection,
            n_layer: self.model.config.n_layer,
            checkpoints: request.checkpoints.then_some(&mut self.checkpoints),
        };
        let summary = session.run(engine, &mut runner, progress)?;
        Ok(DumpSummary {
            load_seconds,
            ..summary
        })
    }

    fn reproduce(&self, _prompt_id: &str, suite: &Path, selection: &Selection, _written: &Path, out: &Path) -> String {
        let command = reproduce::DumpCommand {
            model: self.model,
            suite,
            selection,
            out,
            injections: &self.injections,
        };
        command.reference(self.spec)
    }
}

/// One dump's prompts on the oracle.
struct OracleRunner<'a> {
    oracle: &'a Oracle,
    faults: &'a Faults,
    selection: &'a Selection,
    n_layer: usize,
    checkpoints: Option<&'a mut PrefixCheckpoints<Tensor>>,
}

impl PromptRunner for OracleRunner<'_> {
    fn steps(&self, _prompt: &PromptRecord) -> usize {
        self.n_layer
    }

    /// With checkpoints, a prompt that is a prefix of the kept run's tokens resumes from
    /// them, and any other prompt runs in full and keeps its own (when they fit).
    fn run(
        &mut self,
        prompt: &PromptRecord,
        positions: &Arc<Vec<usize>>,
        writer: &BackgroundWriter,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<u32>> {
        let tokens = &prompt.tokens;
        let mut sink = DumpSink {
            prompt_id: &prompt.id,
            positions: positions.clone(),
            selection: self.selection,
            n_layer: self.n_layer,
            writer,
            send_error: None,
        };
        let (oracle, faults) = (self.oracle, self.faults);
        let fits = PrefixCheckpoints::<Tensor>::fits(self.checkpoint_bytes(tokens.len()));
        let result = match self.checkpoints.as_deref_mut() {
            Some(cp) if cp.covering(tokens).is_some() => {
                let stream = cp.covering(tokens).expect("checked above");
                resume(oracle, faults, stream, tokens.len(), positions, &mut sink)
            }
            Some(cp) if fits => {
                let mut stream = Vec::with_capacity(self.n_layer + 1);
                let r = oracle
                    .inner
                    .forward_keeping(tokens, positions, faults, &mut sink, &mut |i, x| {
                        stream.push(x.clone());
                        if i > 0 {
                            on_step();
                        }
                    });
                match r {
                    Ok(()) => cp.keep(tokens, stream),
                    Err(_) => cp.forget(),
                }
                r
            }
            _ => oracle
                .inner
                .forward(tokens, positions, faults, &mut sink, &mut |_| on_step()),
        };
        if let Some(e) = sink.send_error {
            return Err(e);
        }
        result.map_err(|e| Error::engine(format!("reference failed on prompt {}: {e:#}", prompt.id)))?;
        Ok(tokens.clone())
    }
}

impl OracleRunner<'_> {
    fn checkpoint_bytes(&self, tokens: usize) -> u64 {
        let width = self.oracle.inner.n_embd() as u64;
        (self.n_layer as u64 + 1) * tokens as u64 * width * self.oracle.precision().bytes() as u64
    }
}

/// Serve a run over the first `n` kept tokens from their checkpoints: rows of `stream`
/// where they suffice, the layers whose inner taps are wanted recomputed from them.
fn resume(
    oracle: &Oracle,
    faults: &Faults,
    stream: &[Tensor],
    n: usize,
    positions: &[usize],
    sink: &mut DumpSink,
) -> anyhow::Result<()> {
    let rows = |i: usize| stream[i].narrow(0, 0, n);
    if sink.wants(Tap::Embed) {
        sink.emit(
            FileStem::Embed,
            vec![(Tap::Embed, resbisect_reference::gather(&rows(0)?, positions)?)],
        )?;
    }
    let layers = stream.len() - 1;
    let n_layer = oracle.inner.n_layer();
    let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
    let wants_any = |sink: &DumpSink, l: usize, taps: &[LayerTap]| taps.iter().any(|&t| sink.wants(Tap::Layer(l, t)));
    for l in 0..n_layer {
        let inner = wants_any(sink, l, &LayerTap::ALL[..LayerTap::ALL.len() - 1]);
        let post = sink.wants(Tap::Layer(l, LayerTap::ResidPost));
        if l >= layers {
            // Past the checkpointed layers: continue the forward from the last one.
            let wanted_after = (l..n_layer).rev().find(|&m| wants_any(sink, m, &LayerTap::ALL));
            let last = if wants_output { Some(n_layer - 1) } else { wanted_after };
            let Some(last) = last else { return Ok(()) };
            let x = oracle
                .inner
                .run_layers(rows(layers)?, layers, last, positions, faults, sink, &mut |_, _| {})?;
            return if wants_output {
                oracle.inner.head(&x, positions, faults, sink)
            } else {
                Ok(())
            };
        }
        if inner {
            oracle
                .inner
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
        oracle.inner.head(&rows(n_layer)?, positions, faults, sink)?;
    }
    Ok(())
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
