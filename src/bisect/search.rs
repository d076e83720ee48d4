//! The search as explicit phases — coarse probe → layer search → cut → all taps of the
//! suspect layer → first position → local replay — each a method of [`Search`] returning a
//! [`Flow`]: the phase's result, or a [`Stop`] (a finding that ends the search early, an
//! engine's crash, an error), which `?` carries to the one place that ends the search.

use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use super::labels::label_shift_note;
use super::probe::{selection, ProbeRecord, ProbeResult, Rows, Session};
use super::readings::{
    bad_layers_line, first_bad_of, first_bad_position, first_of, has_nonfinite, noise_levels, nonfinite_notes,
    second_fault_note, tap_diverged, tolerance_in, unobserved_notes,
};
use super::replay::{replay_layers, replay_positions, row_error, Preload, ReplayRun, Replayer};
use super::reruns::rerun_notes;
use super::{check_work_dir, coarse_layers, BisectOptions, BisectReport, Crash, Engines, Outcome};
use crate::diff::{self, DiffReport, FirstDivergence, Judge, Judgement};
use crate::dump::PromptRecord;
use crate::error::{Error, Result};
use crate::model::Config;
use crate::taps::{LayerTap, Selection, Tap, LAYER_TAPS};

mod inside;
mod taps;

/// Rows of the head probe when logits were too large for the coarse probe.
const HEAD_ROWS: usize = 64;

/// Fewest rows a cut prompt keeps: a layer is judged on many rows, since one row (an
/// attention sink's, whose residual norm can be 100× the others') can hide an error
/// that every other row shows.
const MIN_JUDGED_ROWS: usize = 32;

/// Why the search ends before its last phase.
pub(super) enum Stop {
    /// The finding is in the report already.
    Done,
    /// An engine crashed in a probe: the crash, and what both engines wrote before it,
    /// compared (boxed: a comparison is large, and every phase returns this).
    Crashed(Box<(Crash, Option<DiffReport>)>),
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// A phase's result, or why the search stops.
pub(super) type Flow<T> = std::result::Result<T, Stop>;

/// `blk.L.resid_post`.
pub(super) fn resid_post(l: usize) -> String {
    Tap::Layer(l, LayerTap::ResidPost).to_string()
}

/// The tap that holds layer `l`'s input.
pub(super) fn input_id(l: usize) -> String {
    if l == 0 {
        Tap::Embed.to_string()
    } else {
        resid_post(l - 1)
    }
}

/// What the coarse probe narrowed the search to.
struct Coarse {
    diff: DiffReport,
    /// The last coarse layer known good (None: only embed is known good).
    lo: Option<usize>,
    /// The first coarse layer known bad.
    hi: usize,
    /// Non-finite values: later probes run every token the coarse probe streamed, not a
    /// cut after the first divergent position.
    whole_prompt: bool,
}

/// What the coarse probe, and under a twin the taps of each attention kind's first layer,
/// narrowed the search to.
enum Narrowed {
    /// The first coarse layer whose residual stream diverges: the layers below it are
    /// searched.
    Layers(Box<Coarse>),
    /// A tap inside the first layer of an attention kind (layer 0, Gemma 3's first global
    /// layer) diverges while the residual stream stays within tolerance.
    FirstLayers(Box<Suspect>),
    /// A tap inside some layer diverges while the coarse residual stream stays within
    /// tolerance (an error that fades with depth): that layer's taps are probed next.
    Layer(SuspectLayer),
}

/// The first divergent layer and where its residual stream first leaves B's.
struct SuspectLayer {
    layer: usize,
    position: usize,
    /// The rel L2 tolerance its resid_post was judged against.
    resid_tolerance: f64,
}

/// The suspect layer after its all-taps probe.
pub(super) struct Suspect {
    pub(super) layer: usize,
    /// Tokens the final probes run.
    pub(super) prefix: usize,
    /// The positions local replay recomputes.
    pub(super) at: Vec<usize>,
    /// Positions from here up to the first divergent one were probed at every tap.
    window: usize,
    pub(super) taps_diff: DiffReport,
    first: Option<FirstDivergence>,
}

/// One search: the probes so far, the report it fills in, and replay's reference.
pub(super) struct Search<'s, 'r, 'e> {
    pub(super) scope: &'s Scope<'s, 'r>,
    pub(super) session: Session<'e>,
    pub(super) replayer: Replayer<'r>,
    opts: &'e BisectOptions,
    /// Prompt tokens the search runs on: the prompt's, then the coarse probe's prefix.
    n: usize,
    pub(super) n_layer: usize,
    n_vocab: usize,
    pub(super) n_embd: usize,
    /// The layer taps this model has (a llama model has no Gemma post norms): what the
    /// suspect layer's probe asks for, so its reproduce commands ask for no more.
    layer_taps: Vec<&'static str>,
    /// The first layer of each attention kind (see [`first_layer_of_each_kind`]).
    kind_firsts: Vec<usize>,
    pub(super) report: BisectReport,
    start: Instant,
    /// The commands that reproduce the finding: the probe whose comparison the report shows.
    suspect_reproduce: Option<Vec<String>>,
    /// Replay's layers, loading while the last probes run.
    pub(super) preload: Option<Preload<'s>>,
    /// Replay, running during the all-taps probe.
    pub(super) early_replay: Option<ScopedJoinHandle<'s, Result<ReplayRun>>>,
}

/// The first layer of each attention kind (its sliding window and RoPE base): layer 0
/// alone for most models, 0 and 5 for Gemma 3 270M (five local layers, then a global one).
fn first_layer_of_each_kind(config: &Config) -> Vec<usize> {
    let mut kinds = Vec::new();
    let mut firsts = Vec::new();
    for layer in 0..config.n_layer {
        let kind = (config.window_of(layer), config.rope_base_of(layer).to_bits());
        if !kinds.contains(&kind) {
            kinds.push(kind);
            firsts.push(layer);
        }
    }
    firsts
}

/// Run the search on one prompt; replay's threads run in `scope`.
pub(super) fn search<'s, 'r: 's, 'e>(
    scope: &'s Scope<'s, 'r>,
    engines: Engines<'e>,
    replayer: Replayer<'r>,
    prompt: PromptRecord,
    config: &Config,
    opts: &'e BisectOptions,
) -> Result<BisectReport> {
    let start = Instant::now();
    check_work_dir(&opts.work)?;
    let mut report = BisectReport::new(&prompt, engines.a.label(), engines.b.label());
    report.twin = engines.twin.as_ref().map(|t| {
        let flip_free = match t.flip_free_layer0_taps {
            [] => String::new(),
            taps => format!(
                "; layer 0's {}, which the profile reproduces up to summation order, max({:e}, that)",
                taps.join(", "),
                super::twin::FLIP_FREE_FLOOR
            ),
        };
        format!(
            "tolerances measured by the oracle's twin ({}): each tap max(its tolerance, {} × the twin's worst row against the oracle){flip_free}",
            t.engine.label(),
            super::twin::TWIN_MARGIN
        )
    });
    let mut search = Search {
        scope,
        session: Session::new(engines, opts, prompt.clone()),
        replayer,
        opts,
        n: prompt.tokens.len(),
        n_layer: config.n_layer,
        n_vocab: config.n_vocab,
        n_embd: config.n_embd,
        layer_taps: LAYER_TAPS
            .iter()
            .copied()
            .filter(|t| LayerTap::from_name(t).is_some_and(|t| t.in_model(config)))
            .collect(),
        kind_firsts: first_layer_of_each_kind(config),
        report,
        start,
        suspect_reproduce: None,
        preload: None,
        early_replay: None,
    };
    let flow = search.run();
    search.finish(flow)
}

impl<'s, 'r: 's> Search<'s, 'r, '_> {
    /// The phases in order; the loop searches again on the whole prompt when the cut
    /// prompt does not reproduce the divergence.
    fn run(&mut self) -> Flow<()> {
        let mut suspect = match self.coarse()? {
            Narrowed::FirstLayers(suspect) => *suspect,
            Narrowed::Layers(coarse) => self.suspect_below(&coarse)?,
            Narrowed::Layer(layer) => self.suspect_at(&layer)?,
        };
        self.report.prefix = suspect.prefix;
        self.report.outcome = Outcome::Diverged;
        self.suspect_reproduce = Some(self.session.reproduce.clone());
        let replayed = match self.replayer {
            Replayer::Skip => Vec::new(),
            _ => replay_layers(suspect.layer, self.n_layer),
        };
        let position_diff = self.first_position(&mut suspect, &replayed)?;
        self.report.first = suspect.first.take();
        if !replayed.is_empty() {
            self.replay(&suspect, &replayed)?;
        }
        self.report.final_diff = Some(position_diff.unwrap_or(suspect.taps_diff));
        Ok(())
    }

    /// The layer search below the first bad coarse layer, then its all-taps probe; again
    /// on the whole prompt when the cut prompt does not reproduce the divergence.
    fn suspect_below(&mut self, coarse: &Coarse) -> Flow<Suspect> {
        let mut whole_prompt = coarse.whole_prompt;
        loop {
            let found = self.layers(coarse)?;
            let (n, cut_after) = (self.n, self.cut_after());
            let cut = |position: usize| match whole_prompt {
                true => n,
                false => cut_after(position),
            };
            // Most often the branches probe keeps the layer: its replay loads meanwhile.
            self.preload_replay(found.layer);
            let layer = match self.branches_below(&found, cut(found.position))? {
                Some(earlier) => earlier,
                None => found,
            };
            let prefix = cut(layer.position);
            self.preload_replay(layer.layer);
            match self.suspect_taps(&layer, prefix)? {
                Some(suspect) => return Ok(suspect),
                None => whole_prompt = true,
            }
        }
    }

    /// Tokens a prompt cut after `position` keeps: at least MIN_JUDGED_ROWS rows to judge
    /// a layer's taps on, at most the coarse probe's tokens.
    fn cut_after(&self) -> impl Fn(usize) -> usize {
        let n = self.n;
        move |position| (position + 1).max(MIN_JUDGED_ROWS).min(n)
    }

    /// The taps of `layer`, found by a probe inside the layers over the coarse probe's
    /// tokens: on the prompt cut after its first divergent position, else on those tokens.
    fn suspect_at(&mut self, layer: &SuspectLayer) -> Flow<Suspect> {
        self.preload_replay(layer.layer);
        if let Some(suspect) = self.suspect_taps(layer, self.cut_after()(layer.position))? {
            return Ok(suspect);
        }
        let n = self.n;
        self.suspect_taps(layer, n)?
            .ok_or_else(|| Stop::from(Error::engine("the taps probe over every token gave no suspect")))
    }

    /// The report, however the search ended.
    fn finish(mut self, flow: Flow<()>) -> Result<BisectReport> {
        let reproduce = match flow {
            Ok(()) | Err(Stop::Done) => {
                let latest = std::mem::take(&mut self.session.reproduce);
                self.suspect_reproduce.take().unwrap_or(latest)
            }
            Err(Stop::Crashed(crash)) => {
                let (c, partial) = *crash;
                self.report.outcome = Outcome::Crashed;
                self.report.first = partial.as_ref().and_then(first_of);
                self.report.crash = Some(c);
                self.report.final_diff = partial;
                std::mem::take(&mut self.session.reproduce)
            }
            Err(Stop::Failed(e)) => return Err(e),
        };
        if self.report.outcome != Outcome::Crashed {
            self.note_reruns()?;
        }
        let first_layer = (self.report.first.as_ref())
            .and_then(|f| Tap::parse(&f.tap))
            .and_then(|t| t.layer());
        if let (Outcome::Diverged, Some(layer)) = (self.report.outcome, first_layer) {
            let note = label_shift_note(&self.session, layer, self.n_layer, self.n)?;
            self.report.notes.extend(note);
            self.report.notes.extend(second_fault_note(&self.report.noise, layer));
        }
        // Under a twin the tolerances are the measured rounding noise already.
        if let (Outcome::Diverged, Judgement::NoiseFloor, None, Some(first), Some(diff)) = (
            self.report.outcome,
            self.report.judged,
            &self.report.twin,
            &self.report.first,
            &self.report.final_diff,
        ) {
            let note = (diff.prompts.iter()).find_map(|p| crate::diff::under_tolerance_note(p, first));
            self.report.notes.extend(note);
        }
        let mut report = self.report;
        report.runs_a = self.session.probes.len();
        report.runs_b = self.session.probes.len();
        let runs = |resumes: bool| -> usize {
            let per_probe = |p: &ProbeRecord| if resumes { 1 } else { p.chunks };
            self.session.probes.iter().map(per_probe).sum()
        };
        report.engine_runs_a = runs(self.session.a.resumes());
        report.engine_runs_b = runs(self.session.b.resumes());
        report.bytes_dumped = self.session.probes.iter().map(|p| p.bytes_a + p.bytes_b).sum();
        report.probes = self.session.probes;
        report.reproduce = reproduce;
        report.seconds = self.start.elapsed().as_secs_f64();
        if let Some(d) = &report.final_diff {
            // The model A's last dump names (the probe directory is not the model).
            report.model = crate::dump::Dump::open(std::path::Path::new(&d.a.path))
                .map(|dump| dump.manifest.model.path.clone())
                .unwrap_or_default();
            report.fingerprint = d.a.fingerprint.clone();
            // External engines say who they are only in their dumps.
            report.engine_a = crate::engine::identified(&report.engine_a, &d.a.engine);
            report.engine_b = crate::engine::identified(&report.engine_b, &d.b.engine);
            if report.outcome == Outcome::Diverged {
                report.numerics_note = super::numerics_note(&d.a.engine, &d.b.engine, &report.replay_oracle);
            }
            report.replay_note = super::replay_note(&report);
            // A rounding flip is a rare event per row: a short prompt gives the twin few
            // chances to show the noise the engine makes (a 1-token prompt of SmolLM2 under
            // llamacpp-cpu: the twin 1e-7 where llama.cpp flipped to 4.7e-3 at blk.28.v).
            let n_tokens = report.n_tokens;
            if let (Some(twin), Outcome::Diverged, true) =
                (&mut report.twin, report.outcome, n_tokens < super::twin::TWIN_MIN_ROWS)
            {
                twin.push_str(&format!(
                    "; only {n_tokens} row(s) measured, too few to meet the engine's rare rounding flips: \
                     a finding past layer 0 may be such a flip"
                ));
            }
        }
        Ok(report)
    }

    /// A note for each engine that gave different rows for the same tokens in two probes
    /// ([`rerun_notes`]), over the residual stream, the final norm and the finding's tap.
    fn note_reruns(&mut self) -> Result<()> {
        let mut taps: Vec<String> = std::iter::once("embed".to_string())
            .chain((0..self.n_layer).map(resid_post))
            .chain(std::iter::once("final_norm".to_string()))
            .collect();
        taps.extend(self.report.first.as_ref().map(|f| f.tap.clone()));
        rerun_notes(&self.session, &taps, &mut self.report.notes)
    }

    /// One probe; an engine's crash in it stops the search.
    fn probe(&mut self, purpose: &str, tokens: usize, sel: Selection) -> Flow<DiffReport> {
        match self.session.probe(purpose, tokens, sel)? {
            ProbeResult::Compared(r) => Ok(r),
            ProbeResult::Crashed(c, partial) => Err(Stop::Crashed(Box::new((c, partial)))),
        }
    }

    /// Stop with `final_diff` as the comparison the report shows.
    fn done<T>(&mut self, final_diff: DiffReport) -> Flow<T> {
        self.report.final_diff = Some(final_diff);
        Err(Stop::Done)
    }

    /// Phase 1: the coarse probe — sparse layers at every position, which also finds the
    /// first divergent position for the cut — streamed over the prompt until a chunk
    /// diverges, and what it decides: what rows are judged against, and the layers left
    /// to search. Later phases run on the prefix it ran: by causality the rows of a prefix
    /// are those of the whole prompt (an engine for which they are not is caught when the
    /// cut prompt does not reproduce the divergence).
    fn coarse(&mut self) -> Flow<Narrowed> {
        let (n, coarse) = (self.n, coarse_layers(self.n_layer));
        let logits_here = (n * self.n_vocab * 4) as u64 <= self.opts.logits_budget;
        let mut taps = vec!["embed", "resid_post", "final_norm"];
        if logits_here {
            taps.push("logits");
        }
        let streamed = self.session.streamed_probe("coarse", coarse.clone(), &taps, n)?;
        self.n = streamed.prefix;
        let length_dependent = streamed.boundary_note.is_some();
        self.report.notes.extend(streamed.boundary_note);
        let r = match streamed.result {
            ProbeResult::Compared(r) => r,
            ProbeResult::Crashed(c, partial) => return Err(Stop::Crashed(Box::new((c, partial)))),
        };
        self.report.coarse_diff = Some(r.clone());
        self.judge_as_coarse(&r);
        // Under a twin the tolerances already are the rounding noise: rows over the generic
        // noise floor say nothing there.
        let drift = match self.session.twin {
            Some(_) => String::new(),
            None => r.prompts.first().and_then(diff::judgement_note).unwrap_or_default(),
        };
        if let Some(m) = r.prompts.first().and_then(|p| p.token_mismatch.clone()) {
            // A divergence on the tokens given, far enough before the engines' inputs part
            // that a cut prompt excludes where they do: the search goes on over that prefix.
            let before = first_bad_position(&r).is_some_and(|p| self.cut_after()(p) <= m.position);
            if before {
                self.report.notes.push(format!(
                    "{}; the search went on over the first {} tokens, which both engines ran as given",
                    m.describe(),
                    m.position
                ));
                self.n = m.position;
                self.report.token_mismatch = Some(m);
            } else {
                // Different inputs: the finding is the token difference (and whatever diverged
                // before it); no layer search can explain it.
                self.session.note(m.describe());
                self.report.outcome = Outcome::Diverged;
                self.report.first = first_of(&r);
                self.report.token_mismatch = Some(m);
                return self.done(r);
            }
        }
        let Some(first_pos) = first_bad_position(&r) else {
            let head = match logits_here {
                true => "final_norm or logits",
                false => "or final_norm (logits over --logits-budget-mib: the head is probed apart)",
            };
            self.session.note(format!(
                "no divergence at embed, resid_post of layers {coarse:?}, {head}"
            ));
            if let Some(layer) = self.inside_fading_error(&r, &coarse)? {
                return Ok(Narrowed::Layer(layer));
            }
            if let Some(suspect) = self.inside_first_layers(self.n_layer)? {
                return Ok(Narrowed::FirstLayers(Box::new(suspect)));
            }
            return self.coarse_clean(r, &coarse, logits_here, &drift);
        };
        let bad_coarse = coarse.iter().copied().find(|&l| tap_diverged(&r, &resid_post(l)));
        // Causality lets the probes after the layer search stop after the position where
        // the first divergent layer first diverges. Not when values are non-finite: 0·NaN in
        // masked attention tiles can carry a NaN to earlier positions.
        let nonfinite = has_nonfinite(&r);
        let whole_prompt = nonfinite || length_dependent;
        self.report.notes.extend(nonfinite_notes(&r, "coarse"));
        let Some(hi) = bad_coarse.filter(|_| !tap_diverged(&r, "embed")) else {
            // The divergence starts at embed or only in the output head: already narrowed.
            let f = first_of(&r);
            self.session.note(format!(
                "first divergence {} at position {first_pos}",
                f.as_ref().map_or("?", |f| f.tap.as_str())
            ));
            // Only the head: unless the residual stream holds an error that faded there.
            if !tap_diverged(&r, "embed") {
                if let Some(layer) = self.inside_fading_error(&r, &coarse)? {
                    return Ok(Narrowed::Layer(layer));
                }
            }
            self.report.outcome = Outcome::Diverged;
            self.report.first = f;
            return self.done(r);
        };
        let lo = coarse.iter().copied().take_while(|&l| l < hi).last();
        let cut = if nonfinite {
            format!("; non-finite values: {}", self.uncut_note())
        } else if length_dependent {
            format!("; rows depend on where the prompt ends: {}", self.uncut_note())
        } else {
            String::new()
        };
        let drift = if self.report.judged == Judgement::NoiseFloor {
            format!("; {drift}")
        } else {
            String::new()
        };
        self.session.note(format!(
            "resid_post good through {}, bad at layer {}{cut}{drift}",
            lo.map_or("embed".to_string(), |l| format!("layer {l}")),
            bad_layers_line(&r, &coarse)
        ));
        if hi > 0 {
            if let Some(suspect) = self.inside_first_layers(hi)? {
                return Ok(Narrowed::FirstLayers(Box::new(suspect)));
            }
        }
        Ok(Narrowed::Layers(Box::new(Coarse {
            diff: r,
            lo,
            hi,
            whole_prompt,
        })))
    }

    /// Why later probes run no cut prompt, and on what: every token the coarse probe's
    /// stream covered, which stops after its first divergent chunk (so maybe not all).
    fn uncut_note(&self) -> String {
        let what = if self.n < self.report.n_tokens {
            format!(
                "the {} tokens the coarse probe streamed (of {})",
                self.n, self.report.n_tokens
            )
        } else {
            "the whole prompt".to_string()
        };
        format!("later probes run {what}, not a prompt cut after the first divergent position")
    }

    /// The coarse probe decided what rows are judged against; later probes keep to it.
    fn judge_as_coarse(&mut self, r: &DiffReport) {
        self.report.noise = noise_levels(r);
        self.report.judged = r.prompts.first().map_or(Judgement::Tolerance, |p| p.judged);
        self.session.judge = match self.report.judged {
            Judgement::Tolerance => Judge::Tolerance,
            Judgement::NoiseFloor => Judge::NoiseFloor,
        };
    }

    /// No layer of the coarse probe diverges: the search ends, after a probe of the
    /// output head's last rows when logits were too large for the coarse probe.
    fn coarse_clean<T>(&mut self, r: DiffReport, coarse: &[usize], logits_here: bool, drift: &str) -> Flow<T> {
        if logits_here {
            let drift = if drift.is_empty() {
                String::new()
            } else {
                format!("; {drift}")
            };
            let layer_0 = match self.session.twin.is_some() {
                true => ", nor at any tap of layer 0",
                false => "",
            };
            self.session.note(format!(
                "no divergence at embed, resid_post of layers {coarse:?}, final_norm or logits{layer_0}{drift}"
            ));
            return self.done(r);
        }
        // The head's row at a position reads only final_norm's row there, which agrees
        // everywhere: a head bug may start at any position (one that acts on part of the
        // vocabulary starts at 0), so the first rows are probed with the last, and the
        // rows between them when the first divergent row lies past them.
        let n = self.n;
        let (start, from) = (HEAD_ROWS.min(n), n.saturating_sub(HEAD_ROWS).max(HEAD_ROWS.min(n)));
        let rows: Vec<usize> = (0..start).chain(from..n).collect();
        let mut head = self.probe(
            "head",
            n,
            selection(Vec::new(), &["final_norm", "logits"], &Rows::At(rows), n),
        )?;
        if first_of(&head).is_some_and(|f| f.position >= from) && from > start {
            let between = self.probe(
                "head-between",
                from,
                selection(
                    Vec::new(),
                    &["final_norm", "logits"],
                    &Rows::At((start..from).collect()),
                    from,
                ),
            )?;
            if first_of(&between).is_some() {
                head = between;
            }
        }
        if let Some(f) = first_of(&head) {
            self.session.note(format!(
                "the output head diverges: {} at position {}",
                f.tap, f.position
            ));
            self.report.notes.extend(nonfinite_notes(&head, "head"));
            self.report.outcome = Outcome::Diverged;
            self.report.first = Some(f);
        } else {
            self.session.note(format!(
                "final_norm and logits agree on the first {start} and the last {} positions",
                n - from
            ));
        }
        self.done(head)
    }

    /// Phase 2: binary search over the layers between the last good and the first bad
    /// coarse layer, every position judged: an error that grows with depth crosses
    /// tolerance earlier in later layers, so a cut made from a later layer could hide
    /// where an earlier one first diverges.
    fn layers(&mut self, coarse: &Coarse) -> Flow<SuspectLayer> {
        let (n, mut lo, mut hi) = (self.n, coarse.lo, coarse.hi);
        // Where the first bad layer's resid_post first leaves B's, and its tolerance.
        let mut hi_first = first_bad_of(&coarse.diff, &resid_post(hi));
        loop {
            let first_unknown = lo.map_or(0, |l| l + 1);
            if first_unknown >= hi {
                break;
            }
            let mid = (first_unknown + hi - 1) / 2;
            let id = resid_post(mid);
            // The layer before comes along: it is a replay input later, and costs no
            // compute (the built-in engines stop at the last tapped layer, and serve
            // these from their checkpoints).
            let layers = (mid.saturating_sub(1)..=mid).collect();
            let r = self.probe(
                &format!("layer-{mid}"),
                n,
                selection(layers, &["resid_post"], &Rows::All, n),
            )?;
            let diverged = tap_diverged(&r, &id);
            if let Some(p) = self.session.probes.last_mut() {
                p.layer_diverged = Some(diverged);
            }
            if diverged {
                // In words, not `a..=b`: a reader of `--layers` knows `a..b` as end-exclusive.
                let left = match first_unknown {
                    f if f == mid => format!("is layer {mid}"),
                    f => format!("is one of layers {f} to {mid}"),
                };
                self.session
                    .note(format!("layer {mid} diverges: the first bad layer {left}"));
                hi = mid;
                hi_first = first_bad_of(&r, &id);
            } else {
                self.session
                    .note(format!("layer {mid} agrees: layers up to {mid} are ruled out"));
                lo = Some(mid);
            }
        }
        let (position, resid_tolerance) = hi_first.ok_or_else(|| {
            Error::engine(format!(
                "{} was judged divergent but has no divergent row",
                resid_post(hi)
            ))
        })?;
        Ok(SuspectLayer {
            layer: hi,
            position,
            resid_tolerance,
        })
    }
}
