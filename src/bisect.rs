//! `resbisect bisect`: drives an engine under test (A) and an oracle (B) with as few and
//! as small dumps as it can (DESIGN §6) — a coarse probe over sparse layers at every
//! position, truncation of the prompt after the first divergent position (causality),
//! binary search over layers, all taps of the suspect layer — then replays the suspect
//! layer and its neighbours on the reference from A's own inputs to separate the error a
//! layer introduces from the error it inherits. A crash of either engine is a result.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::diff::{self, DiffOptions, DiffReport, FirstDivergence, Judge, Judgement, RowStat, TokenMismatch};
use crate::dump::{Dump, PromptRecord, RunError, TapDType, TapView};
use crate::engines::{crash_report, Engine};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::reference_engine::{RefPrecision, ReferenceEngine};
use crate::taps::{PositionSpec, Selection, LAYER_TAPS};
use crate::tolerance::Tolerances;

pub struct BisectOptions {
    pub tolerances: Tolerances,
    pub allow_model_mismatch: bool,
    /// How the coarse probe is judged (`Auto`: against the noise floor when it shows a
    /// systematic error over the floor before any tap over tolerance); later probes
    /// keep to what it decided.
    pub judge: Judge,
    /// Logits join the coarse probe at every position only while one engine's logits
    /// stay under this many bytes; otherwise a last-rows probe checks the head.
    pub logits_budget: u64,
    /// Probe dumps go here (created; must be absent or empty).
    pub work: PathBuf,
    /// Run A and B one after the other instead of at the same time (engines that cannot
    /// share a device or memory).
    pub sequential: bool,
    /// Positions before the suspect layer's first divergent one at which all its taps are
    /// probed; a tap already off at the first of them gets a probe of its own.
    pub tap_window: usize,
}

/// Rows of the head probe when logits were too large for the coarse probe.
const HEAD_ROWS: usize = 64;

/// Fewest rows a cut prompt keeps: a layer is judged on many rows, since one row (an
/// attention sink's, whose residual norm can be 100× the others') can hide an error
/// that every other row shows.
const MIN_JUDGED_ROWS: usize = 32;

/// One probe: both engines dumped the same selection over the same prefix.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    pub purpose: String,
    /// Prompt tokens run (the prompt is cut after the first divergent position).
    pub tokens: usize,
    pub layers: Vec<usize>,
    pub taps: Vec<String>,
    pub positions: String,
    pub seconds_a: f64,
    pub seconds_b: f64,
    /// Comparing the two dumps.
    pub seconds_diff: f64,
    pub bytes_a: u64,
    pub bytes_b: u64,
    /// What the probe showed, and what it ruled out.
    pub finding: String,
    /// For a layer-search probe (`layer-L`): whether layer L's `resid_post` diverged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_diverged: Option<bool>,
    pub dump_a: String,
    pub dump_b: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Clean,
    Diverged,
    Crashed,
}

/// A crash of one engine, as a result.
#[derive(Debug, Clone, Serialize)]
pub struct Crash {
    /// `A` (engine under test) or `B` (oracle).
    pub engine: String,
    pub label: String,
    pub error: RunError,
    pub probe: String,
}

/// Local replay of one layer on the reference from A's own input.
#[derive(Debug, Clone, Serialize)]
pub struct LayerAttribution {
    pub layer: usize,
    /// rel L2 of A's input to the layer against B's (max over positions).
    pub inherited: f64,
    /// rel L2 of A's output against the reference layer applied to A's input.
    pub introduced: f64,
    /// rel L2 of A's output against B's.
    pub total: f64,
    /// Position of the largest introduced error.
    pub at_position: usize,
    pub tolerance: f64,
    pub introduces: bool,
    /// A tap of this layer is further from its replay than its tolerance (the suspect
    /// layer only, whose taps were dumped): the layer introduces error even where its
    /// output's rows hide it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introducing_tap: Option<String>,
}

/// Within the suspect layer: each tap of A against the replay from A's layer input.
#[derive(Debug, Clone, Serialize)]
pub struct TapAttribution {
    pub tap: String,
    pub introduced: f64,
    pub at_position: usize,
    pub tolerance: f64,
    pub introduces: bool,
}

/// One coarse tap's error against its noise floor.
#[derive(Debug, Clone, Serialize)]
pub struct NoiseLevel {
    pub tap: String,
    /// The 75th-percentile row's rel L2 (non-finite rows count as infinite).
    pub p75_rel_l2: f64,
    /// The noise-floor threshold (expected floor × margin, at most the tolerance).
    pub floor: f64,
    pub tolerance: f64,
    pub rows_over_floor: usize,
    pub rows: usize,
}

#[derive(Debug, Serialize)]
pub struct BisectReport {
    pub version: u32,
    pub model: String,
    pub fingerprint: String,
    pub prompt: String,
    pub n_tokens: usize,
    pub engine_a: String,
    pub engine_b: String,
    pub outcome: Outcome,
    pub first: Option<FirstDivergence>,
    /// The engines ran different tokens (an engine bug: a doubled BOS, a dropped token).
    pub token_mismatch: Option<TokenMismatch>,
    /// What the search judged rows against: tolerances, or the noise floor when the
    /// coarse probe showed a systematic error over the floor before any tap crossed its
    /// tolerance.
    pub judged: Judgement,
    /// The noise floor as the coarse probe measured it, per residual-stream tap.
    pub noise: Vec<NoiseLevel>,
    /// Tokens the final probes ran (first divergent position + 1).
    pub prefix: usize,
    pub crash: Option<Crash>,
    pub replay: Vec<LayerAttribution>,
    pub replay_taps: Vec<TapAttribution>,
    /// The positions local replay recomputed.
    pub replay_positions: Vec<usize>,
    pub probes: Vec<ProbeRecord>,
    pub runs_a: usize,
    pub runs_b: usize,
    pub bytes_dumped: u64,
    pub seconds: f64,
    /// Of `seconds`, local replay (loading the replayed layers and running them).
    pub seconds_replay: f64,
    pub reproduce: Vec<String>,
    #[serde(skip)]
    pub final_diff: Option<DiffReport>,
    /// The coarse probe's comparison, for the report's layers × positions plot.
    #[serde(skip)]
    pub coarse_diff: Option<DiffReport>,
}

/// Sum of file sizes under a directory (0 when absent).
pub fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// The probe directory must be new or empty: bisect never mixes in old dumps.
pub fn check_work_dir(work: &Path) -> Result<()> {
    if work.exists()
        && std::fs::read_dir(work)
            .map_err(|e| Error::io(work, e))?
            .next()
            .is_some()
    {
        return Err(Error::input(format!(
            "the work directory {} is not empty",
            work.display()
        )));
    }
    Ok(())
}

/// Coarse layers: 0, 1, 2, 4, 8, …, and the last.
pub fn coarse_layers(n_layer: usize) -> Vec<usize> {
    let mut out = vec![0];
    let mut l = 1;
    while l < n_layer {
        out.push(l);
        l *= 2;
    }
    if *out.last().expect("non-empty") != n_layer - 1 {
        out.push(n_layer - 1);
    }
    out
}

/// What one probe produced.
enum ProbeResult {
    Compared(DiffReport),
    Crashed(Crash, Option<DiffReport>),
}

/// Dump files mapped for replay, by dump directory and file stem (`None`: not there).
type MappedFiles = std::collections::HashMap<(PathBuf, String), Option<std::rc::Rc<crate::dump::MappedFile>>>;

struct Session<'e> {
    a: &'e mut dyn Engine,
    b: &'e mut dyn Engine,
    opts: &'e BisectOptions,
    prompt: PromptRecord,
    probes: Vec<ProbeRecord>,
    /// Each probe's directory.
    dirs: Vec<PathBuf>,
    reproduce: Vec<String>,
    /// Dump files mapped for replay, by path and stem: replay asks for every tap of a
    /// file in turn, and opening a file once is enough.
    mapped: std::cell::RefCell<MappedFiles>,
    /// How probes are judged: automatically for the coarse probe, then as it decided.
    judge: Judge,
}

/// The rows a probe dumps: every position of its prefix, or some of them.
enum Rows {
    All,
    At(Vec<usize>),
}

/// A probe's selection over a `tokens`-token prefix. Positions past the prefix are
/// dropped here, so every probe the search issues is valid for its prompt by construction.
fn selection(layers: Vec<usize>, taps: &[&str], rows: &Rows, tokens: usize) -> Selection {
    let positions = match rows {
        Rows::All => PositionSpec::all(),
        Rows::At(at) => {
            let mut at: Vec<usize> = at.iter().copied().filter(|&p| p < tokens).collect();
            at.sort_unstable();
            at.dedup();
            if at.is_empty() {
                PositionSpec::all()
            } else {
                PositionSpec::exactly(&at)
            }
        }
    };
    Selection {
        layers,
        taps: taps.iter().map(|t| t.to_string()).collect(),
        positions,
    }
}

/// Each coarse residual-stream tap's level against its noise floor.
fn noise_levels(r: &DiffReport) -> Vec<NoiseLevel> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .filter(|t| t.tap == "embed" || t.tap.ends_with(".resid_post"))
        .map(|t| {
            let mut rel: Vec<f64> = t
                .rows
                .iter()
                .map(|r| {
                    if r.nonfinite_a + r.nonfinite_b > 0 {
                        f64::INFINITY
                    } else {
                        r.rel_l2
                    }
                })
                .collect();
            rel.sort_by(f64::total_cmp);
            let p75 = rel
                .get((rel.len() * 3).div_ceil(4).saturating_sub(1))
                .copied()
                .unwrap_or(0.0);
            NoiseLevel {
                tap: t.tap.clone(),
                p75_rel_l2: p75,
                floor: t.floor.rel_l2,
                tolerance: t.tolerance.rel_l2,
                rows_over_floor: t.rows_over_floor,
                rows: t.rows.len(),
            }
        })
        .collect()
}

/// Each divergent coarse layer with its own first divergent position, for the search path.
fn bad_layers_line(r: &DiffReport, coarse: &[usize]) -> String {
    let v: Vec<String> = coarse
        .iter()
        .filter_map(|&l| {
            first_bad_of(r, &format!("blk.{l}.resid_post")).map(|(p, _)| format!("{l} (from position {p})"))
        })
        .collect();
    v.join(", ")
}

/// Smallest position any tap of the diff diverges at.
fn first_bad_position(r: &DiffReport) -> Option<usize> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .filter_map(|t| t.first_bad.map(|i| t.positions[i]))
        .min()
}

fn has_nonfinite(r: &DiffReport) -> bool {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .flat_map(|t| &t.rows)
        .any(|row| row.nonfinite_a + row.nonfinite_b > 0)
}

fn tap_diverged(r: &DiffReport, id: &str) -> bool {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .any(|t| t.tap == id && t.first_bad.is_some())
}

/// The first position tap `id` diverges at in `r`, and the rel L2 tolerance applied.
fn first_bad_of(r: &DiffReport, id: &str) -> Option<(usize, f64)> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .find(|t| t.tap == id)
        .and_then(|t| t.first_bad.map(|i| (t.positions[i], t.tolerance.rel_l2)))
}

fn first_of(r: &DiffReport) -> Option<FirstDivergence> {
    r.prompts.first().and_then(|p| p.first.clone())
}

impl Session<'_> {
    /// Run both engines on the first `tokens` tokens with `sel`, then diff.
    fn probe(&mut self, purpose: &str, tokens: usize, sel: Selection) -> Result<ProbeResult> {
        let dir = self.opts.work.join(format!("{:02}-{purpose}", self.probes.len() + 1));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let prompt = PromptRecord {
            tokens: self.prompt.tokens[..tokens].to_vec(),
            ..self.prompt.clone()
        };
        let suite = dir.join("prompt.jsonl");
        let line = serde_json::json!({"id": prompt.id, "tokens": prompt.tokens});
        std::fs::write(&suite, line.to_string() + "\n").map_err(|e| Error::io(&suite, e))?;
        let (out_a, out_b) = (dir.join("a"), dir.join("b"));
        // Both engines at once unless asked otherwise: they are independent, and one
        // often waits on a device or a disk while the other computes.
        let (result_a, result_b) = {
            let timed = |engine: &mut dyn Engine, out: &Path| {
                let t0 = Instant::now();
                let result = engine.dump(&prompt, &sel, out);
                crate::trace::mark(|| format!("probe {purpose}: {} done", engine.label()));
                (result, t0.elapsed().as_secs_f64())
            };
            let (a, b) = (&mut *self.a, &mut *self.b);
            if self.opts.sequential {
                (timed(a, &out_a), timed(b, &out_b))
            } else {
                std::thread::scope(|scope| {
                    let job_b = scope.spawn(|| timed(b, &out_b));
                    let result_a = timed(a, &out_a);
                    (
                        result_a,
                        job_b.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    )
                })
            }
        };
        let mut crash = None;
        let mut seconds = [0.0; 2];
        for (i, ((result, secs), engine, out, name)) in
            [(result_a, &*self.a, &out_a, "A"), (result_b, &*self.b, &out_b, "B")]
                .into_iter()
                .enumerate()
        {
            seconds[i] = secs;
            match result {
                Ok(()) => {}
                Err(Error::Engine(msg)) => {
                    if crash.is_none() {
                        crash = Some(Crash {
                            engine: name.into(),
                            label: engine.label(),
                            error: crash_report(out, &msg),
                            probe: purpose.into(),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut record = ProbeRecord {
            purpose: purpose.into(),
            tokens,
            layers: sel.layers.clone(),
            taps: sel.taps.clone(),
            positions: sel.positions.to_string(),
            seconds_a: seconds[0],
            seconds_b: seconds[1],
            seconds_diff: 0.0,
            bytes_a: dir_bytes(&out_a),
            bytes_b: dir_bytes(&out_b),
            finding: String::new(),
            layer_diverged: None,
            dump_a: out_a.display().to_string(),
            dump_b: out_b.display().to_string(),
        };
        let diff_opts = DiffOptions {
            tolerances: self.opts.tolerances.clone(),
            allow_model_mismatch: self.opts.allow_model_mismatch,
            judge: self.judge,
        };
        let t0 = Instant::now();
        let result = match crash {
            Some(c) => {
                record.finding = format!("engine {} failed: {}", c.engine, c.error.message);
                // Whatever both engines wrote before the failure, compared.
                let partial = match (Dump::open(&out_a), Dump::open(&out_b)) {
                    (Ok(da), Ok(db)) => diff::diff(&da, &db, &diff_opts).ok(),
                    _ => None,
                };
                ProbeResult::Crashed(c, partial)
            }
            None => {
                let r = diff::diff(&Dump::open(&out_a)?, &Dump::open(&out_b)?, &diff_opts)?;
                // Layers are judged by their residual stream: a probe whose engine left it
                // out cannot rule a layer in or out, and must not read as agreement.
                for (name, missing) in r
                    .prompts
                    .iter()
                    .flat_map(|p| [("A", &p.missing_in_a), ("B", &p.missing_in_b)])
                {
                    let stream: Vec<&str> = missing
                        .iter()
                        .map(String::as_str)
                        .filter(|t| *t == "embed" || t.ends_with(".resid_post"))
                        .collect();
                    if !stream.is_empty() {
                        return Err(Error::engine(format!(
                            "engine {name} wrote no {} for the {purpose} probe, which asked for it: layers it leaves out cannot be judged",
                            stream.join(", ")
                        )));
                    }
                }
                ProbeResult::Compared(r)
            }
        };
        record.seconds_diff = t0.elapsed().as_secs_f64();
        crate::trace::mark(|| format!("probe {purpose}: compared"));
        // Fresh output directories: `dump -o` refuses to overwrite the probe's own.
        let (repro_a, repro_b) = (dir.join("reproduce").join("a"), dir.join("reproduce").join("b"));
        let tol = self
            .opts
            .tolerances
            .source
            .as_ref()
            .map(|p| format!(" --tolerances {}", crate::engines::shell_quote(p)))
            .unwrap_or_default();
        let quote = |p: &Path| crate::engines::shell_quote(&p.display().to_string());
        self.reproduce = vec![
            self.a.reproduce(&prompt.id, &suite, &sel, &out_a, &repro_a),
            self.b.reproduce(&prompt.id, &suite, &sel, &out_b, &repro_b),
            format!(
                "{} diff {} {}{tol}",
                crate::engines::resbisect_command(),
                quote(&repro_a),
                quote(&repro_b)
            ),
        ];
        self.probes.push(record);
        self.dirs.push(dir);
        Ok(result)
    }

    fn note(&mut self, finding: String) {
        if let Some(p) = self.probes.last_mut() {
            p.finding = finding;
        }
    }

    /// Rows `0..rows` of tap `id` as f32, from the newest probe of side `a`/`b` that holds them.
    fn rows(&self, side: &str, id: &str, rows: usize) -> Result<Option<Vec<f32>>> {
        self.rows_at(side, id, &(0..rows).collect::<Vec<_>>())
    }

    /// The newest probe file of side `a`/`b` that holds tap `id` at every position of
    /// `at`, and the row index of each.
    fn locate(
        &self,
        side: &str,
        id: &str,
        at: &[usize],
    ) -> Result<Option<(std::rc::Rc<crate::dump::MappedFile>, Vec<usize>)>> {
        let tap = crate::taps::Tap::parse(id).ok_or_else(|| Error::input(format!("bad tap {id}")))?;
        for dir in self.dirs.iter().rev() {
            let key = (dir.join(side), tap.file_stem().to_string());
            let cached = self.mapped.borrow().get(&key).cloned();
            let file = match cached {
                Some(file) => file,
                None => {
                    let file = match Dump::open(&key.0) {
                        Ok(dump) => dump.map_file(&self.prompt.id, &key.1)?.map(std::rc::Rc::new),
                        Err(_) => None,
                    };
                    self.mapped.borrow_mut().insert(key, file.clone());
                    file
                }
            };
            let Some(file) = file.filter(|f| f.taps.contains_key(id)) else {
                continue;
            };
            if let Some(index) = at
                .iter()
                .map(|p| file.positions.binary_search(p).ok())
                .collect::<Option<Vec<usize>>>()
            {
                return Ok(Some((file, index)));
            }
        }
        Ok(None)
    }

    /// Rows of tap `id` at positions `at` as f32, from the newest probe that holds them.
    fn rows_at(&self, side: &str, id: &str, at: &[usize]) -> Result<Option<Vec<f32>>> {
        let Some((file, index)) = self.locate(side, id, at)? else {
            return Ok(None);
        };
        let view = file.tap(id).expect("located files hold the tap");
        let row_bytes = view.width * view.dtype.size();
        let mut out = Vec::with_capacity(at.len() * view.width);
        // Runs of consecutive rows convert in one go.
        for run in crate::taps::consecutive_runs(&index) {
            let bytes = &view.bytes[index[run.start] * row_bytes..(index[run.end - 1] + 1) * row_bytes];
            crate::dump::TapView {
                rows: run.len(),
                bytes,
                ..view
            }
            .append_f32(&mut out);
        }
        Ok(Some(out))
    }
}

/// Statistics of row `r` of `a` against `b` (rows of `width`), and its rel L2 with any
/// non-finite value counting as infinite.
fn row_error(a: &[f32], b: &[f32], width: usize, r: usize) -> (f64, RowStat) {
    fn view(v: &[f32], width: usize, r: usize) -> TapView<'_> {
        TapView {
            dtype: TapDType::F32,
            rows: 1,
            width,
            bytes: bytemuck::cast_slice(&v[r * width..(r + 1) * width]),
        }
    }
    let s = diff::row_stat(&view(a, width, r), &view(b, width, r));
    (
        if s.nonfinite_a + s.nonfinite_b > 0 {
            f64::INFINITY
        } else {
            s.rel_l2
        },
        s,
    )
}

/// Largest per-row rel L2 of `a` against `b` (rows of `width`) and its row, over the
/// rows `counted` accepts.
fn worst_row(a: &[f32], b: &[f32], width: usize, counted: &dyn Fn(usize) -> bool) -> (f64, usize, RowStat) {
    let mut worst = (0.0, 0, RowStat::default());
    for r in (0..a.len() / width).filter(|&r| counted(r)) {
        let (rel, s) = row_error(a, b, width, r);
        if rel > worst.0 || (r == 0 && rel.is_nan()) {
            worst = (rel, r, s);
        }
    }
    worst
}

/// Most divergent positions local replay recomputes; controls come on top.
const REPLAY_DIVERGENT: usize = 64;
/// Evenly spaced positions local replay also recomputes, where A and B may agree.
const REPLAY_CONTROLS: usize = 8;

/// The positions local replay recomputes (ascending): the first divergent one, those
/// where A's suspect-layer output leaves B's beyond `tol` (thinned evenly to
/// REPLAY_DIVERGENT), evenly spaced controls and the last. The error to attribute lives at
/// the divergent positions; recomputing only those keeps replay a small part of a layer.
fn replay_positions(out_a: &[f32], out_b: &[f32], width: usize, tol: f64, first: Option<usize>) -> Vec<usize> {
    let rows = out_a.len() / width;
    let divergent: Vec<usize> = (0..rows)
        .filter(|&r| {
            let rel = row_error(out_a, out_b, width, r).0;
            rel.is_nan() || rel > tol
        })
        .collect();
    let step = divergent.len().div_ceil(REPLAY_DIVERGENT).max(1);
    let mut at: Vec<usize> = divergent.iter().copied().step_by(step).collect();
    at.extend((0..REPLAY_CONTROLS).map(|i| i * rows / REPLAY_CONTROLS));
    at.extend(first.filter(|&p| p < rows));
    at.push(rows - 1);
    at.sort_unstable();
    at.dedup();
    at
}

/// Rows `at` of a `[.., width]` buffer.
fn pick_rows(v: &[f32], width: usize, at: &[usize]) -> Vec<f32> {
    at.iter()
        .flat_map(|&r| v[r * width..(r + 1) * width].iter().copied())
        .collect()
}

/// The tolerance the final diff applied to `tap` (rel L2), if it compared it.
fn tolerance_of(r: &DiffReport, tap: &str) -> Option<crate::tolerance::Tolerance> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .find(|t| t.tap == tap)
        .map(|t| t.tolerance)
}

/// The reference that recomputes layers for local replay, whatever engine B is.
pub enum Replayer<'r> {
    /// Already loaded (it is also one of the engines).
    Loaded(&'r ReferenceEngine),
    /// Loaded when replay starts, with only the layers it replays.
    OnDemand { model: &'r Model, precision: RefPrecision },
    /// No local replay (`--no-replay`): the search ends at the first divergent tap.
    Skip,
}

/// Run the search on one prompt.
#[allow(clippy::too_many_arguments)]
pub fn bisect(
    a: &mut dyn Engine,
    b: &mut dyn Engine,
    replayer: Replayer,
    prompt: PromptRecord,
    n_layer: usize,
    n_vocab: usize,
    n_embd: usize,
    opts: &BisectOptions,
) -> Result<BisectReport> {
    std::thread::scope(|scope| search(scope, a, b, replayer, prompt, n_layer, n_vocab, n_embd, opts))
}

/// The layers local replay recomputes for suspect layer `hi`: it and its neighbours.
fn replay_layers(hi: usize, n_layer: usize) -> Vec<usize> {
    (hi.saturating_sub(1)..=(hi + 1).min(n_layer - 1)).collect()
}

/// Where replay's reference comes from: loaded already, or loading on a thread.
enum ReplaySource<'s, 'r> {
    Loaded(&'r ReferenceEngine),
    Loading(std::thread::ScopedJoinHandle<'s, Result<ReferenceEngine>>),
}

/// Per replayed layer, each tap's recomputed rows.
type Replays = Vec<Vec<(String, Vec<f32>)>>;

/// Each layer of `layers` recomputed from its input in `inputs` (rows `0..prefix`), every
/// tap at positions `at`. The layers replay at once: each is independent, and much of a
/// layer is single-threaded.
fn replay_all(
    engine: &ReferenceEngine,
    layers: &[usize],
    inputs: &[Vec<f32>],
    prefix: usize,
    at: &[usize],
) -> Result<Replays> {
    std::thread::scope(|scope| {
        let jobs: Vec<_> = layers
            .iter()
            .zip(inputs)
            .map(|(&l, in_a)| scope.spawn(move || engine.replay_layer(l, in_a, prefix, at)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

/// Replay layers loaded ahead, while probes run, when they come to at most this many
/// bytes; otherwise they load when replay starts.
const PRELOAD_BYTES: u64 = 4 << 30;

#[allow(clippy::too_many_arguments)]
fn search<'s, 'r: 's>(
    scope: &'s std::thread::Scope<'s, 'r>,
    a: &mut dyn Engine,
    b: &mut dyn Engine,
    replayer: Replayer<'r>,
    prompt: PromptRecord,
    n_layer: usize,
    n_vocab: usize,
    n_embd: usize,
    opts: &BisectOptions,
) -> Result<BisectReport> {
    let start = Instant::now();
    check_work_dir(&opts.work)?;
    let (label_a, label_b) = (a.label(), b.label());
    let n = prompt.tokens.len();
    let mut s = Session {
        a,
        b,
        opts,
        prompt: prompt.clone(),
        probes: Vec::new(),
        dirs: Vec::new(),
        reproduce: Vec::new(),
        mapped: Default::default(),
        judge: opts.judge,
    };
    let mut report = BisectReport {
        version: 1,
        model: String::new(),
        fingerprint: String::new(),
        prompt: prompt.id.clone(),
        n_tokens: n,
        engine_a: label_a,
        engine_b: label_b,
        outcome: Outcome::Clean,
        first: None,
        token_mismatch: None,
        judged: Judgement::Tolerance,
        noise: Vec::new(),
        prefix: n,
        crash: None,
        replay: Vec::new(),
        replay_taps: Vec::new(),
        replay_positions: Vec::new(),
        probes: Vec::new(),
        runs_a: 0,
        runs_b: 0,
        bytes_dumped: 0,
        seconds: 0.0,
        seconds_replay: 0.0,
        reproduce: Vec::new(),
        final_diff: None,
        coarse_diff: None,
    };
    let finish = |mut report: BisectReport, s: Session| {
        report.runs_a = s.probes.len();
        report.runs_b = s.probes.len();
        report.bytes_dumped = s.probes.iter().map(|p| p.bytes_a + p.bytes_b).sum();
        report.probes = s.probes;
        report.reproduce = s.reproduce;
        report.seconds = start.elapsed().as_secs_f64();
        if let Some(d) = &report.final_diff {
            report.model = d.a.path.clone();
            report.fingerprint = d.a.fingerprint.clone();
        }
        Ok(report)
    };
    let crashed = |mut report: BisectReport, c: Crash, partial: Option<DiffReport>| {
        report.outcome = Outcome::Crashed;
        report.first = partial.as_ref().and_then(first_of);
        report.crash = Some(c);
        report.final_diff = partial;
        report
    };

    // 1. Coarse probe over the whole prompt: sparse layers at every position, which also
    //    finds the first divergent position for the cut.
    let coarse = coarse_layers(n_layer);
    let logits_here = (n * n_vocab * 4) as u64 <= opts.logits_budget;
    let mut taps = vec!["embed", "resid_post", "final_norm"];
    if logits_here {
        taps.push("logits");
    }
    let r = match s.probe("coarse", n, selection(coarse.clone(), &taps, &Rows::All, n))? {
        ProbeResult::Compared(r) => r,
        ProbeResult::Crashed(c, partial) => return finish(crashed(report, c, partial), s),
    };
    report.coarse_diff = Some(r.clone());
    // The coarse probe decided what rows are judged against; later probes keep to it.
    report.noise = noise_levels(&r);
    report.judged = r.prompts.first().map_or(Judgement::Tolerance, |p| p.judged);
    s.judge = match report.judged {
        Judgement::Tolerance => Judge::Tolerance,
        Judgement::NoiseFloor => Judge::NoiseFloor,
    };
    let drift = r.prompts.first().and_then(diff::judgement_note).unwrap_or_default();
    if let Some(m) = r.prompts.first().and_then(|p| p.token_mismatch.clone()) {
        // Different inputs: the finding is the token difference (and whatever diverged
        // before it); no layer search can explain it.
        s.note(m.describe());
        report.outcome = Outcome::Diverged;
        report.first = first_of(&r);
        report.token_mismatch = Some(m);
        report.final_diff = Some(r);
        return finish(report, s);
    }
    let Some(first_pos) = first_bad_position(&r) else {
        if !logits_here {
            let from = n.saturating_sub(HEAD_ROWS);
            let head = match s.probe(
                "head",
                n,
                selection(Vec::new(), &["final_norm", "logits"], &Rows::At((from..n).collect()), n),
            )? {
                ProbeResult::Compared(r) => r,
                ProbeResult::Crashed(c, partial) => return finish(crashed(report, c, partial), s),
            };
            if let Some(f) = first_of(&head) {
                s.note(format!(
                    "the output head diverges: {} at position {}",
                    f.tap, f.position
                ));
                report.outcome = Outcome::Diverged;
                report.first = Some(f);
            } else {
                s.note(format!(
                    "final_norm and logits agree on the last {} positions",
                    n - from
                ));
            }
            report.final_diff = Some(head);
            return finish(report, s);
        }
        let drift = if drift.is_empty() {
            String::new()
        } else {
            format!("; {drift}")
        };
        s.note(format!(
            "no divergence at embed, resid_post of layers {:?}, final_norm or logits{drift}",
            coarse
        ));
        report.final_diff = Some(r);
        return finish(report, s);
    };
    let bad_coarse = coarse
        .iter()
        .copied()
        .find(|l| tap_diverged(&r, &format!("blk.{l}.resid_post")));
    // Causality lets the probes after the layer search stop after the position where
    // the first divergent layer first diverges. Not when values are non-finite: 0·NaN in
    // masked attention tiles can carry a NaN to earlier positions.
    let mut whole_prompt = has_nonfinite(&r);
    let cut = if whole_prompt {
        "; non-finite values: the prompt will not be cut"
    } else {
        ""
    };
    let Some(coarse_hi) = bad_coarse.filter(|_| !tap_diverged(&r, "embed")) else {
        // The divergence starts at embed or only in the output head: already narrowed.
        let f = first_of(&r);
        s.note(format!(
            "first divergence {} at position {first_pos}",
            f.as_ref().map_or("?", |f| f.tap.as_str())
        ));
        report.outcome = Outcome::Diverged;
        report.first = f;
        report.final_diff = Some(r);
        return finish(report, s);
    };
    // `lo` is the last layer known good (None: only embed is known good).
    let coarse_lo = coarse.iter().copied().take_while(|&l| l < coarse_hi).last();
    let drift = if report.judged == Judgement::NoiseFloor {
        format!("; {drift}")
    } else {
        String::new()
    };
    s.note(format!(
        "resid_post good through {}, bad at layer {}{cut}{drift}",
        coarse_lo.map_or("embed".to_string(), |l| format!("layer {l}")),
        bad_layers_line(&r, &coarse)
    ));
    // A replay-only reference loads the layers replay needs on the CPU while the engines
    // make the last probes; replay itself runs during the all-taps probe when its inputs
    // are already dumped.
    let input_id = |l: usize| {
        if l == 0 {
            "embed".to_string()
        } else {
            format!("blk.{}.resid_post", l - 1)
        }
    };
    let mut preload = None;
    let mut early_replay;
    let mut prefix;
    let (hi, at, taps_diff, mut first, window) = loop {
        let (mut lo, mut hi) = (coarse_lo, coarse_hi);
        // Where the first bad layer's resid_post first leaves B's, and its tolerance.
        let mut hi_first = first_bad_of(&r, &format!("blk.{hi}.resid_post"));
        // 2. Binary search over the layers between the last good and the first bad.
        loop {
            let first_unknown = lo.map_or(0, |l| l + 1);
            if first_unknown >= hi {
                break;
            }
            let mid = (first_unknown + hi - 1) / 2;
            let id = format!("blk.{mid}.resid_post");
            // The layer before comes along: it is a replay input later, and costs no compute
            // (the built-in engines stop at the last tapped layer). Every position is
            // judged: an error that grows with depth crosses tolerance earlier in later
            // layers, so a cut made from a later layer could hide where an earlier one
            // first diverges (the built-in engines serve these from their checkpoints).
            let layers = (mid.saturating_sub(1)..=mid).collect();
            match s.probe(
                &format!("layer-{mid}"),
                n,
                selection(layers, &["resid_post"], &Rows::All, n),
            )? {
                ProbeResult::Compared(r) => {
                    let diverged = tap_diverged(&r, &id);
                    if let Some(p) = s.probes.last_mut() {
                        p.layer_diverged = Some(diverged);
                    }
                    if diverged {
                        s.note(format!(
                            "layer {mid} diverges: the first bad layer is in {first_unknown}..={mid}"
                        ));
                        hi = mid;
                        hi_first = first_bad_of(&r, &id);
                    } else {
                        s.note(format!("layer {mid} agrees: layers up to {mid} are ruled out"));
                        lo = Some(mid);
                    }
                }
                ProbeResult::Crashed(c, partial) => return finish(crashed(report, c, partial), s),
            }
        }
        let (hi_pos, resid_tol) = hi_first.ok_or_else(|| {
            Error::engine(format!(
                "blk.{hi}.resid_post was judged divergent but has no divergent row"
            ))
        })?;
        // The cut keeps at least MIN_JUDGED_ROWS rows to judge the layer's taps on.
        prefix = if whole_prompt {
            n
        } else {
            (hi_pos + 1).max(MIN_JUDGED_ROWS).min(n)
        };
        if let Replayer::OnDemand { model, precision } = replayer {
            let layers = replay_layers(hi, n_layer);
            let bytes = model.n_params() / n_layer as u64 * layers.len() as u64 * precision.bytes() as u64;
            preload = (bytes <= PRELOAD_BYTES).then(|| {
                (
                    layers.clone(),
                    scope.spawn(move || ReferenceEngine::load_for_replay(model, precision, &layers)),
                )
            });
        }
        // 3. All taps of the suspect layer, at the positions that matter: those local replay
        //    recomputes and a window before the first divergent one.
        let hi_out = |side: &str| {
            s.rows(side, &format!("blk.{hi}.resid_post"), prefix)?
                .ok_or_else(|| Error::engine(format!("blk.{hi}.resid_post missing from the {side} dumps")))
        };
        let at = replay_positions(&hi_out("a")?, &hi_out("b")?, n_embd, resid_tol, Some(hi_pos));
        let window = hi_pos.saturating_sub(opts.tap_window);
        early_replay = None;
        let replayed = replay_layers(hi, n_layer);
        if let Some(inputs) = replayed
            .iter()
            .map(|&l| s.rows("a", &input_id(l), prefix))
            .collect::<Result<Option<Vec<_>>>>()?
        {
            let source = match replayer {
                Replayer::Loaded(r) => Some(ReplaySource::Loaded(r)),
                Replayer::OnDemand { .. } => preload.take().map(|(_, job)| ReplaySource::Loading(job)),
                Replayer::Skip => None,
            };
            if let Some(source) = source {
                let at = at.clone();
                early_replay = Some(scope.spawn(move || {
                    let t0 = Instant::now();
                    let replays = match source {
                        ReplaySource::Loaded(r) => replay_all(r, &replayed, &inputs, prefix, &at),
                        ReplaySource::Loading(job) => job
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                            .and_then(|engine| {
                                crate::trace::mark(|| "replay: layers loaded".into());
                                replay_all(&engine, &replayed, &inputs, prefix, &at)
                            }),
                    };
                    crate::trace::mark(|| "replay: done (during the all-taps probe)".into());
                    replays.map(|r| (r, t0.elapsed().as_secs_f64(), inputs))
                }));
            }
        }
        let mut probed: Vec<usize> = at.iter().copied().chain(window..=hi_pos).collect();
        probed.sort_unstable();
        probed.dedup();
        let all: Vec<&str> = LAYER_TAPS.to_vec();
        let taps_diff = match s.probe(
            &format!("taps-{hi}"),
            prefix,
            selection(vec![hi], &all, &Rows::At(probed.clone()), prefix),
        )? {
            ProbeResult::Compared(r) => r,
            ProbeResult::Crashed(c, partial) => return finish(crashed(report, c, partial), s),
        };
        let first = match first_of(&taps_diff) {
            Some(f) => f,
            None if prefix < n => {
                // The cut prompt does not reproduce: the engine is not causal here.
                s.note(format!("no tap of layer {hi} diverges on the cut prompt: the engine is not causal here; searching the whole prompt"));
                whole_prompt = true;
                continue;
            }
            None => {
                s.note("no tap of the layer diverges on this run (is the engine deterministic?)".into());
                break (hi, at, taps_diff, None, 0);
            }
        };
        let on = if prefix < n {
            format!(", the prompt cut to {prefix} tokens")
        } else {
            String::new()
        };
        s.note(format!(
            "first divergent tap {} at position {} (of {} positions probed{on})",
            first.tap,
            first.position,
            probed.len()
        ));
        break (hi, at, taps_diff, Some(first), window);
    };
    report.prefix = prefix;
    report.outcome = Outcome::Diverged;
    // The commands that reproduce the finding: the probe whose comparison the report shows.
    let mut suspect_reproduce = s.reproduce.clone();

    // 4. The first position: a tap already off at the window's start (or before it) may
    //    have left B's earlier still. 5. Local replay needs the inputs and outputs of the
    //    suspect layer and its neighbours at every position. Whatever of these earlier
    //    probes did not dump comes in one more probe.
    let replayed = if matches!(replayer, Replayer::Skip) {
        Vec::new()
    } else {
        replay_layers(hi, n_layer)
    };
    let mut needed: Vec<String> = replayed
        .iter()
        .flat_map(|&l| [input_id(l), format!("blk.{l}.resid_post")])
        .collect();
    needed.dedup();
    let mut missing = Vec::new();
    let all: Vec<usize> = (0..prefix).collect();
    for id in &needed {
        if s.locate("a", id, &all)?.is_none() || s.locate("b", id, &all)?.is_none() {
            missing.push(id.clone());
        }
    }
    let early = first
        .as_ref()
        .filter(|f| f.position <= window && window > 0)
        .map(|f| f.tap.clone());
    let mut layers: Vec<usize> = missing
        .iter()
        .filter_map(|id| match crate::taps::Tap::parse(id) {
            Some(crate::taps::Tap::Layer(l, _)) => Some(l),
            _ => None,
        })
        .collect();
    let mut taps = vec!["resid_post"];
    if missing.iter().any(|m| m == "embed") {
        taps.insert(0, "embed");
    }
    if let Some(tap) = &early {
        layers.push(hi);
        let short = tap.rsplit('.').next().expect("a tap id has a name");
        if !taps.contains(&short) {
            taps.push(short);
        }
    }
    layers.sort_unstable();
    layers.dedup();
    let mut position_diff = None;
    if early.is_some() || !missing.is_empty() {
        let purpose = if early.is_some() { "position" } else { "replay-inputs" };
        let r = match s.probe(purpose, prefix, selection(layers, &taps, &Rows::All, prefix))? {
            ProbeResult::Compared(r) => r,
            ProbeResult::Crashed(c, partial) => return finish(crashed(report, c, partial), s),
        };
        let mut found = Vec::new();
        if let Some(tap) = &early {
            first = first_of(&r).filter(|f| &f.tap == tap).or(first);
            found.push(format!(
                "{tap} first diverges at position {}",
                first.as_ref().map_or(0, |f| f.position)
            ));
            position_diff = Some(r);
            suspect_reproduce = s.reproduce.clone();
        }
        if !missing.is_empty() {
            found.push(format!("inputs for local replay: {}", missing.join(", ")));
        }
        s.note(found.join("; "));
    }
    report.first = first;
    if replayed.is_empty() {
        report.final_diff = Some(position_diff.unwrap_or(taps_diff));
        let mut r = finish(report, s)?;
        r.reproduce = suspect_reproduce;
        return Ok(r);
    }

    let resid_tol = tolerance_of(&taps_diff, &format!("blk.{hi}.resid_post")).map_or(1e-3, |t| t.rel_l2);
    let replay_start = Instant::now();
    report.replay_positions = at.clone();
    let get = |side: &str, id: &str| -> Result<Vec<f32>> {
        s.rows(side, id, prefix)?
            .ok_or_else(|| Error::engine(format!("replay: {id} missing from the {side} dumps")))
    };
    // Replay started during the all-taps probe (the last loop round's, so for these
    // layers, positions and prefix), or starts now.
    let (replays, replay_seconds, inputs) = match early_replay {
        Some(job) => job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?,
        None => {
            let loaded;
            let replayer = match replayer {
                Replayer::Loaded(r) => r,
                Replayer::Skip => return Err(Error::engine("local replay was skipped")),
                Replayer::OnDemand { model, precision } => {
                    let ahead = preload.map(|(layers, job)| {
                        (
                            layers,
                            job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                        )
                    });
                    loaded = match ahead {
                        Some((layers, engine)) if replayed.iter().all(|l| layers.contains(l)) => engine?,
                        _ => ReferenceEngine::load_for_replay(model, precision, &replayed)?,
                    };
                    &loaded
                }
            };
            crate::trace::mark(|| "replay: layers loaded".into());
            let inputs = replayed
                .iter()
                .map(|&l| get("a", &input_id(l)))
                .collect::<Result<Vec<_>>>()?;
            (
                replay_all(replayer, &replayed, &inputs, prefix, &at)?,
                replay_start.elapsed().as_secs_f64(),
                inputs,
            )
        }
    };
    for ((&l, in_a), replay) in replayed.iter().zip(&inputs).zip(&replays) {
        let in_b = get("b", &input_id(l))?;
        let out_id = format!("blk.{l}.resid_post");
        let (out_a, out_b) = (get("a", &out_id)?, get("b", &out_id)?);
        let rep_out = &replay.last().expect("a layer has taps").1;
        // A row whose input is already non-finite cannot show what the layer adds.
        let finite_input = |i: usize| in_a[at[i] * n_embd..(at[i] + 1) * n_embd].iter().all(|v| v.is_finite());
        let (introduced, worst, _) = worst_row(&pick_rows(&out_a, n_embd, &at), rep_out, n_embd, &finite_input);
        let mut introducing_tap = None;
        if l == hi {
            for (id, values) in replay {
                let Some(dev) = s.rows_at("a", id, &at)? else { continue };
                let width = values.len() / at.len();
                let (introduced, worst, _) = worst_row(&dev, values, width, &finite_input);
                let tolerance = tolerance_of(&taps_diff, id).map_or(resid_tol, |t| t.rel_l2);
                let introduces = introduced.is_nan() || introduced > tolerance;
                if introduces && introducing_tap.is_none() {
                    introducing_tap = Some(id.clone());
                }
                report.replay_taps.push(TapAttribution {
                    tap: id.clone(),
                    introduced,
                    at_position: at[worst],
                    tolerance,
                    introduces,
                });
            }
        }
        report.replay.push(LayerAttribution {
            layer: l,
            inherited: worst_row(in_a, &in_b, n_embd, &|_| true).0,
            introduced,
            total: worst_row(&out_a, &out_b, n_embd, &|_| true).0,
            at_position: at[worst],
            tolerance: resid_tol,
            // The layer's verdict agrees with its own tap table: a tap off its replay
            // means the layer introduces error, whatever its output rows show.
            introduces: introduced.is_nan() || introduced > resid_tol || introducing_tap.is_some(),
            introducing_tap,
        });
    }
    report.seconds_replay = replay_seconds;
    crate::trace::mark(|| "replay: compared".into());
    report.final_diff = Some(position_diff.unwrap_or(taps_diff));
    let mut r = finish(report, s)?;
    r.reproduce = suspect_reproduce;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::coarse_layers;

    #[test]
    fn coarse_layers_double_up_to_the_last() {
        assert_eq!(coarse_layers(1), vec![0]);
        assert_eq!(coarse_layers(2), vec![0, 1]);
        assert_eq!(coarse_layers(22), vec![0, 1, 2, 4, 8, 16, 21]);
        assert_eq!(coarse_layers(30), vec![0, 1, 2, 4, 8, 16, 29]);
        assert_eq!(coarse_layers(17), vec![0, 1, 2, 4, 8, 16]);
    }
}
