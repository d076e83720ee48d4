//! The reference as an engine: the oracle run over each prompt of a dump session, its
//! captured rows sent to the dump writer, with prefix checkpoints for bisect's probes.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use resbisect_reference::{GrowingRows, KvCache, TapSink};

use super::checkpoints::{self, KeptRows, PrefixCheckpoints};
use super::session::{DumpSession, PromptRunner};
use super::{reproduce, DumpRequest, DumpSummary, Engine, NoProgress, Oracle, Progress, RefSpec};
use crate::dump::{BackgroundWriter, EngineInfo, FileJob, PromptRecord, TapDType, TapTensor};
use crate::error::{Error, Result};
use crate::model::{Config, Model};
use crate::taps::{Faults, FileStem, LayerTap, Selection, Tap};

/// The built-in reference (candle, f32 or f64), optionally with injected faults. Its
/// oracle may be shared (bisect's other engine, local replay) or load on first use.
pub struct ReferenceEngine<'m> {
    model: &'m Model,
    spec: RefSpec,
    oracle: Option<Arc<Oracle>>,
    injections: Vec<String>,
    faults: Faults,
    checkpoints: PrefixCheckpoints<GrowingRows>,
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
            config: &self.model.config,
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
    config: &'a Config,
    /// Prefix checkpoints and the KV cache of the kept run (bisect's probes only).
    checkpoints: Option<(&'a mut PrefixCheckpoints<GrowingRows>, &'a mut Option<KvCache>)>,
}

impl PromptRunner for OracleRunner<'_> {
    fn steps(&self, _prompt: &PromptRecord) -> usize {
        self.config.n_layer
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
            n_layer: self.config.n_layer,
            writer,
            send_error: None,
        };
        let (oracle, faults) = (self.oracle, self.faults);
        // The kept run's KV cache is at most as large as its residual stream.
        let stream_bytes = ((self.config.n_layer + 1) * tokens.len() * self.config.n_embd) as u64;
        let value_bytes = oracle.precision().bytes();
        let plan = checkpoints::plan(
            self.config,
            tokens.len(),
            value_bytes,
            stream_bytes * value_bytes as u64,
            None,
        );
        let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
        let result = match (self.checkpoints.as_mut(), plan) {
            (Some((cp, _)), _) if cp.covering(tokens).is_some() => {
                let kept = cp.covering(tokens).expect("checked above");
                resume(oracle, faults, kept, tokens.len(), positions, &mut sink)
            }
            (Some((cp, kv)), Some(taps))
                if kv.is_some()
                    && cp
                        .extended_by(tokens)
                        .is_some_and(|k| positions.first().is_none_or(|&p| p >= k)) =>
            {
                extend(oracle, faults, tokens, positions, &taps, cp, kv, &mut sink, on_step)
            }
            (Some((cp, kv)), Some(taps)) => {
                // A run of every layer keeps its KV cache too, for a prompt extending it.
                let mut cache = wants_output.then(|| KvCache::new(self.config.n_layer));
                let mut rows: Vec<Option<Tensor>> = vec![None; taps.len()];
                let mut keep = |tap: Tap, x: &Tensor| {
                    if let Some(i) = taps.iter().position(|&t| t == tap) {
                        rows[i] = Some(x.clone());
                    }
                    if let Tap::Layer(_, LayerTap::ResidPost) = tap {
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
                        // A run that stopped after the last layer it was asked about
                        // keeps the layers it ran.
                        let kept = taps
                            .into_iter()
                            .zip(rows)
                            .filter_map(|(t, x)| Some((t, GrowingRows::new(x?))));
                        let (taps, rows): (Vec<Tap>, Vec<anyhow::Result<GrowingRows>>) = kept.unzip();
                        match rows.into_iter().collect() {
                            Ok(rows) => cp.keep(tokens, KeptRows { taps, rows }),
                            Err(_) => cp.forget(),
                        }
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
/// rows grow by the new ones (the residual stream alone when `taps`, what now fits, lacks
/// the branch outputs). After a failure nothing stays kept.
#[allow(clippy::too_many_arguments)]
fn extend(
    oracle: &Oracle,
    faults: &Faults,
    tokens: &[u32],
    positions: &[usize],
    taps: &[Tap],
    cp: &mut PrefixCheckpoints<GrowingRows>,
    kv: &mut Option<KvCache>,
    sink: &mut DumpSink,
    on_step: &mut dyn FnMut(),
) -> anyhow::Result<()> {
    let (Some(mut kept), Some(mut cache)) = (cp.take(), kv.take()) else {
        anyhow::bail!("no kept run to extend");
    };
    if !kept.holds(taps) {
        kept.stream_only();
    }
    let mut pushed: Vec<Option<anyhow::Result<()>>> = (0..kept.rows.len()).map(|_| None).collect();
    oracle
        .inner
        .forward_resuming(tokens, &mut cache, positions, faults, sink, &mut |tap, x| {
            if let Some(i) = kept.taps.iter().position(|&t| t == tap) {
                pushed[i] = Some(kept.rows[i].push(x));
            }
            if let Tap::Layer(_, LayerTap::ResidPost) = tap {
                on_step();
            }
        })?;
    for done in pushed {
        done.ok_or_else(|| anyhow::anyhow!("a kept tap was not computed"))??;
    }
    cp.keep(tokens, kept);
    *kv = Some(cache);
    Ok(())
}

/// Serve a run over the first `n` kept tokens from their kept rows: the taps they hold
/// read from them, the layers with a wanted tap they lack recomputed from the stream.
fn resume(
    oracle: &Oracle,
    faults: &Faults,
    kept: &KeptRows<GrowingRows>,
    n: usize,
    positions: &[usize],
    sink: &mut DumpSink,
) -> anyhow::Result<()> {
    let stream = kept.stream();
    let rows = |x: &GrowingRows| resbisect_reference::gather(&x.prefix(n)?, positions);
    if sink.wants(Tap::Embed) {
        sink.emit(FileStem::Embed, vec![(Tap::Embed, rows(&stream[0])?)])?;
    }
    let layers = stream.len() - 1;
    let n_layer = oracle.inner.n_layer();
    let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
    let wanted = |sink: &DumpSink, l: usize| -> Vec<Tap> {
        (LayerTap::ALL.iter())
            .map(|&t| Tap::Layer(l, t))
            .filter(|&t| sink.wants(t))
            .collect()
    };
    for l in 0..n_layer {
        if l >= layers {
            // Past the checkpointed layers: continue the forward from the last one.
            let wanted_after = (l..n_layer).rev().find(|&m| !wanted(sink, m).is_empty());
            let last = if wants_output { Some(n_layer - 1) } else { wanted_after };
            let Some(last) = last else { return Ok(()) };
            let x = oracle.inner.run_layers(
                stream[layers].prefix(n)?,
                layers,
                last,
                positions,
                faults,
                sink,
                &mut |_, _| {},
            )?;
            return if wants_output {
                oracle.inner.head(&x, positions, faults, sink)
            } else {
                Ok(())
            };
        }
        let taps = wanted(sink, l);
        if kept.holds(&taps) {
            if !taps.is_empty() {
                let read = taps.iter().map(|&t| Ok((t, rows(kept.of(t).expect("held"))?)));
                sink.emit(FileStem::Layer(l), read.collect::<anyhow::Result<_>>()?)?;
            }
        } else {
            let input = stream[l].prefix(n)?;
            oracle
                .inner
                .run_layers(input, l, l, positions, faults, sink, &mut |_, _| {})?;
        }
    }
    if wants_output {
        oracle
            .inner
            .head(&stream[n_layer].prefix(n)?, positions, faults, sink)?;
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
