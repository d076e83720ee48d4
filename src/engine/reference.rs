//! The reference as an engine: the oracle run over each prompt of a dump session, its
//! captured rows sent to the dump writer, with prefix checkpoints for bisect's probes.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use resbisect_reference::{KvCache, TapSink};

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
    /// The keys and values of the kept run, when it ran every layer: a prompt that
    /// extends its tokens resumes from here (bisect's streamed coarse probe).
    kv: Option<KvCache>,
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
            kv: None,
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
        let engine = match self.spec.twin {
            true => EngineInfo {
                options: Some(serde_json::json!({"twin": "projections and attention in f64"})),
                ..engine
            },
            false => engine,
        };
        let mut runner = OracleRunner {
            oracle: &oracle,
            faults: &self.faults,
            selection: request.selection,
            n_layer: self.model.config.n_layer,
            checkpoints: request.checkpoints.then_some((&mut self.checkpoints, &mut self.kv)),
        };
        let summary = session.run(engine, &mut runner, progress)?;
        Ok(DumpSummary {
            load_seconds,
            ..summary
        })
    }

    /// With prefix checkpoints (bisect's probes), a run that computed every layer keeps
    /// its KV cache.
    fn resumes(&self) -> bool {
        true
    }

    fn computes_on_host(&self) -> bool {
        true
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
    /// Prefix checkpoints and the KV cache of the kept run (bisect's probes only).
    checkpoints: Option<(&'a mut PrefixCheckpoints<Tensor>, &'a mut Option<KvCache>)>,
}

impl PromptRunner for OracleRunner<'_> {
    fn steps(&self, _prompt: &PromptRecord) -> usize {
        self.n_layer
    }

    /// With checkpoints, a prompt that is a prefix of the kept run's tokens resumes from
    /// them, one that extends them (asking only for later positions) continues the kept
    /// run from its KV cache, and any other prompt runs in full and keeps its own (when
    /// they fit).
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
        let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
        let result = match self.checkpoints.as_mut() {
            Some((cp, _)) if cp.covering(tokens).is_some() => {
                let stream = cp.covering(tokens).expect("checked above");
                resume(oracle, faults, stream, tokens.len(), positions, &mut sink)
            }
            Some((cp, kv))
                if kv.is_some()
                    && fits
                    && cp
                        .extended_by(tokens)
                        .is_some_and(|k| positions.first().is_none_or(|&p| p >= k)) =>
            {
                extend(oracle, faults, tokens, positions, cp, kv, &mut sink, on_step)
            }
            Some((cp, kv)) if fits => {
                // A run of every layer keeps its KV cache too, for a prompt extending it.
                let mut cache = wants_output.then(|| KvCache::new(self.n_layer));
                let mut stream = Vec::with_capacity(self.n_layer + 1);
                let mut keep = |i: usize, x: &Tensor| {
                    stream.push(x.clone());
                    if i > 0 {
                        on_step();
                    }
                };
                let r = match cache.as_mut() {
                    Some(cache) => oracle
                        .inner
                        .forward_resuming(tokens, cache, positions, faults, &mut sink, &mut keep),
                    None => oracle
                        .inner
                        .forward_keeping(tokens, positions, faults, &mut sink, &mut keep),
                };
                match r {
                    Ok(()) => {
                        cp.keep(tokens, stream);
                        **kv = cache;
                    }
                    Err(_) => {
                        cp.forget();
                        **kv = None;
                    }
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

/// Continue the kept run over the tokens of `tokens` past it, from its KV cache; the kept
/// stream grows by the new rows. After a failure nothing stays kept.
#[allow(clippy::too_many_arguments)]
fn extend(
    oracle: &Oracle,
    faults: &Faults,
    tokens: &[u32],
    positions: &[usize],
    cp: &mut PrefixCheckpoints<Tensor>,
    kv: &mut Option<KvCache>,
    sink: &mut DumpSink,
    on_step: &mut dyn FnMut(),
) -> anyhow::Result<()> {
    let (Some(mut stream), Some(mut cache)) = (cp.take(), kv.take()) else {
        anyhow::bail!("no kept run to extend");
    };
    let mut grown: Vec<anyhow::Result<Tensor>> = Vec::with_capacity(stream.len());
    oracle
        .inner
        .forward_resuming(tokens, &mut cache, positions, faults, sink, &mut |i, x| {
            grown.push(Tensor::cat(&[&stream[i], x], 0).map_err(Into::into));
            if i > 0 {
                on_step();
            }
        })?;
    for (kept, new) in stream.iter_mut().zip(grown) {
        *kept = new?;
    }
    cp.keep(tokens, stream);
    *kv = Some(cache);
    Ok(())
}

impl OracleRunner<'_> {
    /// The kept stream and, at most as large again, its KV cache.
    fn checkpoint_bytes(&self, tokens: usize) -> u64 {
        let width = self.oracle.inner.n_embd() as u64;
        2 * (self.n_layer as u64 + 1) * tokens as u64 * width * self.oracle.precision().bytes() as u64
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
