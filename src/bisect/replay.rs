//! Local replay: the reference recomputes the suspect layer and its neighbours from A's
//! own dumped inputs, which separates the error a layer introduces from the error it
//! inherits. The layers load ahead while the last probes run, and replay itself starts
//! during the all-taps probe when its inputs are already dumped.

use std::thread::ScopedJoinHandle;
use std::time::Instant;

use super::search::{input_id, resid_post, Search, Suspect};
use super::{LayerAttribution, TapAttribution};
use crate::diff::{self, DiffReport, RowStat};
use crate::dump::{TapDType, TapView};
use crate::engine::{Oracle, RefSpec};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tolerance::Tolerance;

/// The reference that recomputes layers for local replay, whatever engine B is.
#[derive(Clone, Copy)]
pub enum Replayer<'r> {
    /// Already loaded (it is also one of the engines).
    Loaded(&'r Oracle),
    /// Loaded when replay starts, with only the layers it replays.
    OnDemand { model: &'r Model, reference: RefSpec },
    /// No local replay (`--no-replay`): the search ends at the first divergent tap.
    Skip,
}

/// Replay layers loaded ahead, while probes run, when they come to at most this many
/// bytes; otherwise they load when replay starts.
const PRELOAD_BYTES: u64 = 4 << 30;

/// Most divergent positions local replay recomputes; controls come on top.
const REPLAY_DIVERGENT: usize = 64;
/// Evenly spaced positions local replay also recomputes, where A and B may agree.
const REPLAY_CONTROLS: usize = 8;

/// Per replayed layer, each tap's recomputed rows.
pub(super) type Replays = Vec<Vec<(String, Vec<f32>)>>;

/// A finished replay: the recomputed rows, the seconds it took, and A's layer inputs it
/// started from.
pub(super) type ReplayRun = (Replays, f64, Vec<Vec<f32>>);

/// Reference layers loading on a thread, with the layers they hold.
pub(super) type Preload<'s> = (Vec<usize>, ScopedJoinHandle<'s, Result<Oracle>>);

/// Where replay's reference comes from: loaded already, or loading on a thread.
enum ReplaySource<'s, 'r> {
    Loaded(&'r Oracle),
    Loading(ScopedJoinHandle<'s, Result<Oracle>>),
}

/// The layers local replay recomputes for suspect layer `hi`: it and its neighbours.
pub(super) fn replay_layers(hi: usize, n_layer: usize) -> Vec<usize> {
    (hi.saturating_sub(1)..=(hi + 1).min(n_layer - 1)).collect()
}

fn join<T>(job: ScopedJoinHandle<'_, T>) -> T {
    job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl<'s, 'r: 's> Search<'s, 'r, '_> {
    /// An on-demand reference starts loading the layers replay will need for suspect
    /// layer `hi` on the CPU while the engines make the last probes. A load of the same
    /// layers already under way is kept.
    pub(super) fn preload_replay(&mut self, hi: usize) {
        if let Replayer::OnDemand { model, reference } = self.replayer {
            let layers = replay_layers(hi, self.n_layer);
            if self.preload.as_ref().is_some_and(|(loading, _)| *loading == layers) {
                return;
            }
            let bytes =
                model.n_params() / self.n_layer as u64 * layers.len() as u64 * reference.precision.bytes() as u64;
            let scope = self.scope;
            self.preload = (bytes <= PRELOAD_BYTES).then(|| {
                (
                    layers.clone(),
                    scope.spawn(move || Oracle::load_for_replay(model, reference, &layers)),
                )
            });
        }
    }

    /// Replay of suspect layer `hi` and its neighbours starts on a thread when the probes
    /// so far hold their inputs (rows `0..prefix`), to run during the all-taps probe.
    pub(super) fn start_early_replay(&mut self, hi: usize, prefix: usize, at: &[usize]) -> Result<()> {
        self.early_replay = None;
        let replayed = replay_layers(hi, self.n_layer);
        let Some(inputs) = replayed
            .iter()
            .map(|&l| self.session.rows("a", &input_id(l), prefix))
            .collect::<Result<Option<Vec<_>>>>()?
        else {
            return Ok(());
        };
        let source = match self.replayer {
            Replayer::Loaded(r) => ReplaySource::Loaded(r),
            Replayer::OnDemand { .. } => match self.preload.take() {
                Some((_, job)) => ReplaySource::Loading(job),
                None => return Ok(()),
            },
            Replayer::Skip => return Ok(()),
        };
        let at = at.to_vec();
        self.early_replay = Some(self.scope.spawn(move || {
            let t0 = Instant::now();
            let replays = match source {
                ReplaySource::Loaded(r) => replay_all(r, &replayed, &inputs, prefix, &at),
                ReplaySource::Loading(job) => join(job).and_then(|engine| {
                    crate::trace::mark(|| "replay: layers loaded".into());
                    replay_all(&engine, &replayed, &inputs, prefix, &at)
                }),
            };
            crate::trace::mark(|| "replay: done (during the all-taps probe)".into());
            replays.map(|r| (r, t0.elapsed().as_secs_f64(), inputs))
        }));
        Ok(())
    }

    /// Phase 6: local replay of the `replayed` layers around the suspect, each layer's
    /// error attributed (introduced or inherited), and each suspect tap's against its replay.
    pub(super) fn replay(&mut self, suspect: &Suspect, replayed: &[usize]) -> Result<()> {
        let (hi, prefix, at) = (suspect.layer, suspect.prefix, &suspect.at);
        let resid_tol = tolerance_of(&suspect.taps_diff, &resid_post(hi)).map_or(1e-3, |t| t.rel_l2);
        let replay_start = Instant::now();
        self.report.replay_positions = at.clone();
        self.report.replay_oracle = match self.replayer {
            Replayer::Loaded(r) => format!("reference {}", r.spec().label()),
            Replayer::OnDemand { reference, .. } => format!("reference {}", reference.label()),
            Replayer::Skip => String::new(),
        };
        // Replay started during the all-taps probe (the last loop round's, so for these
        // layers, positions and prefix), or starts now.
        let (replays, replay_seconds, inputs) = match self.early_replay.take() {
            Some(job) => join(job)?,
            None => self.replay_now(replayed, prefix, at, replay_start)?,
        };
        for ((&l, in_a), replay) in replayed.iter().zip(&inputs).zip(&replays) {
            self.attribute(l, in_a, replay, suspect, resid_tol)?;
        }
        self.report.seconds_replay = replay_seconds;
        crate::trace::mark(|| "replay: compared".into());
        Ok(())
    }

    /// Replay now, timed from `start`: with the layers loaded ahead when they are the
    /// ones needed, else loaded here.
    fn replay_now(&mut self, replayed: &[usize], prefix: usize, at: &[usize], start: Instant) -> Result<ReplayRun> {
        let loaded;
        let replayer = match self.replayer {
            Replayer::Loaded(r) => r,
            Replayer::Skip => return Err(Error::engine("local replay was skipped")),
            Replayer::OnDemand { model, reference } => {
                let ahead = self.preload.take().map(|(layers, job)| (layers, join(job)));
                loaded = match ahead {
                    Some((layers, engine)) if replayed.iter().all(|l| layers.contains(l)) => engine?,
                    _ => Oracle::load_for_replay(model, reference, replayed)?,
                };
                &loaded
            }
        };
        crate::trace::mark(|| "replay: layers loaded".into());
        let inputs = replayed
            .iter()
            .map(|&l| self.replay_rows("a", &input_id(l), prefix))
            .collect::<Result<Vec<_>>>()?;
        let replays = replay_all(replayer, replayed, &inputs, prefix, at)?;
        Ok((replays, start.elapsed().as_secs_f64(), inputs))
    }

    fn replay_rows(&self, side: &str, id: &str, prefix: usize) -> Result<Vec<f32>> {
        self.session
            .rows(side, id, prefix)?
            .ok_or_else(|| Error::engine(format!("replay: {id} missing from the {side} dumps")))
    }

    /// Layer `l`'s error, introduced against its replay from A's input `in_a` or inherited;
    /// for the suspect layer also each tap's against its replay.
    fn attribute(
        &mut self,
        l: usize,
        in_a: &[f32],
        replay: &[(String, Vec<f32>)],
        suspect: &Suspect,
        resid_tol: f64,
    ) -> Result<()> {
        let (n_embd, at) = (self.n_embd, &suspect.at);
        let in_b = self.replay_rows("b", &input_id(l), suspect.prefix)?;
        let out_id = resid_post(l);
        let (out_a, out_b) = (
            self.replay_rows("a", &out_id, suspect.prefix)?,
            self.replay_rows("b", &out_id, suspect.prefix)?,
        );
        let rep_out = &replay.last().expect("a layer has taps").1;
        // A non-finite input reaches other rows through attention, even earlier ones
        // (0·NaN in a masked tile, in the engine or in the oracle): past one, a row is
        // attributable only where both the engine's and the replay's values are finite.
        let any_nonfinite_input = in_a.iter().any(|v| !v.is_finite());
        let attributable = |i: usize, dev: &[f32], replayed: &[f32]| {
            let width = replayed.len() / at.len();
            let finite = |v: &[f32]| v[i * width..(i + 1) * width].iter().all(|x| x.is_finite());
            !any_nonfinite_input || (finite(dev) && finite(replayed))
        };
        let dev_out = pick_rows(&out_a, n_embd, at);
        let (introduced, worst, _) = worst_row(&dev_out, rep_out, n_embd, &|i| attributable(i, &dev_out, rep_out));
        let mut introducing_tap = None;
        if l == suspect.layer {
            for (id, values) in replay {
                let Some(dev) = self.session.rows_at("a", id, at)? else {
                    continue;
                };
                let width = values.len() / at.len();
                let (introduced, worst, _) = worst_row(&dev, values, width, &|i| attributable(i, &dev, values));
                let tolerance = tolerance_of(&suspect.taps_diff, id).map_or(resid_tol, |t| t.rel_l2);
                let introduces = introduced.is_nan() || introduced > tolerance;
                if introduces && introducing_tap.is_none() {
                    introducing_tap = Some(id.clone());
                }
                self.report.replay_taps.push(TapAttribution {
                    tap: id.clone(),
                    introduced,
                    at_position: at[worst],
                    tolerance,
                    introduces,
                });
            }
        }
        let inherited = worst_row(in_a, &in_b, n_embd, &|_| true).0;
        let total = worst_row(&out_a, &out_b, n_embd, &|_| true).0;
        let dumps_disagree = LayerAttribution::dumps_disagree(inherited, total, resid_tol);
        self.report.replay.push(LayerAttribution {
            layer: l,
            inherited,
            introduced,
            total,
            at_position: at[worst],
            tolerance: resid_tol,
            // The layer's verdict agrees with its own tap table: a tap off its replay
            // means the layer introduces error, whatever its output rows show.
            introduces: !dumps_disagree && (introduced.is_nan() || introduced > resid_tol || introducing_tap.is_some()),
            introducing_tap,
            dumps_disagree,
        });
        Ok(())
    }
}

/// Each layer of `layers` recomputed from its input in `inputs` (rows `0..prefix`), every
/// tap at positions `at`. The layers replay at once: each is independent, and much of a
/// layer is single-threaded.
fn replay_all(engine: &Oracle, layers: &[usize], inputs: &[Vec<f32>], prefix: usize, at: &[usize]) -> Result<Replays> {
    std::thread::scope(|scope| {
        let jobs: Vec<_> = layers
            .iter()
            .zip(inputs)
            .map(|(&l, in_a)| scope.spawn(move || engine.replay_layer(l, in_a, prefix, at)))
            .collect();
        jobs.into_iter().map(join).collect()
    })
}

/// Statistics of row `r` of `a` against `b` (rows of `width`), and its rel L2 with any
/// non-finite value counting as infinite.
pub(super) fn row_error(a: &[f32], b: &[f32], width: usize, r: usize) -> (f64, RowStat) {
    fn view(v: &[f32], width: usize, r: usize) -> TapView<'_> {
        TapView {
            dtype: TapDType::F32,
            rows: 1,
            width,
            bytes: bytemuck::cast_slice(&v[r * width..(r + 1) * width]),
        }
    }
    let s = diff::row_stat(&view(a, width, r), &view(b, width, r));
    (s.rel_l2_or_inf(), s)
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

/// The positions local replay recomputes (ascending): the first divergent one, those
/// where A's suspect-layer output leaves B's beyond `tol` (thinned evenly to
/// REPLAY_DIVERGENT), evenly spaced controls and the last. The error to attribute lives at
/// the divergent positions; recomputing only those keeps replay a small part of a layer.
pub(super) fn replay_positions(
    out_a: &[f32],
    out_b: &[f32],
    width: usize,
    tol: f64,
    first: Option<usize>,
) -> Vec<usize> {
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
fn tolerance_of(r: &DiffReport, tap: &str) -> Option<Tolerance> {
    r.prompts
        .iter()
        .flat_map(|p| &p.taps)
        .find(|t| t.tap == tap)
        .map(|t| t.tolerance)
}
