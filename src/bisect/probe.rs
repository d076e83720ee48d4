//! One probe of the search: both engines dump the same selection over the same prefix of
//! the prompt, the two dumps are compared, and the probe leaves a record, the commands
//! that reproduce it and its dumps for the later phases (and local replay) to read rows from.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use serde::Serialize;

use super::readings::first_bad_position;
use super::{BisectOptions, Crash, Engines};
use crate::diff::{self, DiffOptions, DiffReport, Judge};
use crate::dump::{Dump, MappedFile, PromptRecord, RunError, Status, TapView};
use crate::engine::{crash_report, Engine};
use crate::error::{Error, Result};
use crate::taps::{LayerTap, PositionSpec, Selection, Tap};
use crate::tolerance::Tolerances;

/// One probe: both engines dumped the same selection over the same prefix.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    pub purpose: String,
    /// Prompt tokens run (the prompt is cut after the first divergent position).
    pub tokens: usize,
    pub layers: Vec<usize>,
    pub taps: Vec<String>,
    pub positions: String,
    /// Runs of each engine the probe took: more than one when it streamed the prompt in
    /// chunks (each a run over a longer prefix, resumed where the engine can).
    pub chunks: usize,
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

/// What one probe produced.
pub(super) enum ProbeResult {
    Compared(DiffReport),
    Crashed(Crash, Option<DiffReport>),
}

/// The rows a probe dumps: every position of its prefix, or some of them.
pub(super) enum Rows {
    All,
    At(Vec<usize>),
}

/// A probe's selection over a `tokens`-token prefix. Positions past the prefix are
/// dropped here, so every probe the search issues is valid for its prompt by construction.
pub(super) fn selection(layers: Vec<usize>, taps: &[&str], rows: &Rows, tokens: usize) -> Selection {
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

/// Dump files mapped for replay, by dump directory and file stem (`None`: not there).
type MappedFiles = HashMap<(PathBuf, String), Option<Rc<MappedFile>>>;

/// Where one probe's files go.
pub(super) struct ProbeDirs {
    pub(super) dir: PathBuf,
    /// The cut prompt as a one-line JSONL suite (the reproduce commands read it).
    suite: PathBuf,
    a: PathBuf,
    b: PathBuf,
    /// The oracle's twin, beside B.
    twin: PathBuf,
}

/// An engine's result of one probe and the seconds it took.
type Timed = (Result<()>, f64);

/// The probes of one search so far, and the engines they run.
pub(super) struct Session<'e> {
    pub(super) a: &'e mut dyn Engine,
    pub(super) b: &'e mut dyn Engine,
    pub(super) opts: &'e BisectOptions,
    pub(super) prompt: PromptRecord,
    pub(super) probes: Vec<ProbeRecord>,
    /// Each probe's directory.
    pub(super) dirs: Vec<PathBuf>,
    /// The commands that reproduce the latest probe.
    pub(super) reproduce: Vec<String>,
    /// Dump files mapped for replay, by path and stem: replay asks for every tap of a
    /// file in turn, and opening a file once is enough.
    mapped: RefCell<MappedFiles>,
    /// How probes are judged: automatically for the coarse probe, then as it decided.
    pub(super) judge: Judge,
    /// The oracle's twin when B's profile rounds: it dumps what B dumps on every probe,
    /// and its distance to B sets each tap's tolerance (`twin.rs`).
    pub(super) twin: Option<&'e mut dyn Engine>,
    /// The twin's worst row rel L2 against B so far, per tap.
    pub(super) twin_noise: RefCell<BTreeMap<String, f64>>,
    /// Tap ids whose tolerance the twin sets without the generic floor (`twin.rs`).
    pub(super) flip_free_taps: Vec<String>,
    /// Whether both engines have written a probe's dumps: after that, an engine that
    /// refuses a probe failed on input it must take.
    engines_accepted: bool,
}

impl<'e> Session<'e> {
    pub(super) fn new(engines: Engines<'e>, opts: &'e BisectOptions, prompt: PromptRecord) -> Self {
        let Engines { a, b, twin } = engines;
        let flip_free_taps = twin.as_ref().map_or(Vec::new(), |t| {
            let names = t.flip_free_layer0_taps.iter();
            names
                .filter_map(|n| LayerTap::from_name(n))
                .map(|t| Tap::Layer(0, t).id())
                .collect()
        });
        let twin = twin.map(|t| t.engine);
        Session {
            a,
            b,
            opts,
            prompt,
            probes: Vec::new(),
            dirs: Vec::new(),
            reproduce: Vec::new(),
            mapped: Default::default(),
            // The twin measures the noise floor itself: rows are judged by the tolerances
            // it sets.
            judge: if twin.is_some() { Judge::Tolerance } else { opts.judge },
            twin,
            twin_noise: Default::default(),
            flip_free_taps,
            engines_accepted: false,
        }
    }

    /// Run both engines on the first `tokens` tokens with `sel`, then diff.
    pub(super) fn probe(&mut self, purpose: &str, tokens: usize, sel: Selection) -> Result<ProbeResult> {
        let dirs = self.prepare(&self.probe_dir(purpose), tokens)?;
        let (result, record) = self.run_probe(purpose, tokens, &sel, &dirs, self.judge)?;
        self.reproduce = self.reproduce_commands(&sel, &dirs);
        self.probes.push(record);
        self.dirs.push(dirs.dir);
        Ok(result)
    }

    /// The directory of the next probe.
    pub(super) fn probe_dir(&self, purpose: &str) -> PathBuf {
        self.opts.work.join(format!("{:02}-{purpose}", self.probes.len() + 1))
    }

    /// Both engines' dumps of the first `tokens` tokens with `sel` into `dirs`, compared
    /// as `judge` says, and the probe's record.
    pub(super) fn run_probe(
        &mut self,
        purpose: &str,
        tokens: usize,
        sel: &Selection,
        dirs: &ProbeDirs,
        judge: Judge,
    ) -> Result<(ProbeResult, ProbeRecord)> {
        // A cut prompt's dump must not carry the whole prompt's text as its own.
        let cut = tokens < self.prompt.tokens.len();
        let prompt = PromptRecord {
            tokens: self.prompt.tokens[..tokens].to_vec(),
            text: if cut { None } else { self.prompt.text.clone() },
            ..self.prompt.clone()
        };
        let (result_a, (result_b, seconds_b), twin) = self.run_engines(purpose, &prompt, sel, dirs);
        // The twin is part of the oracle's side: its failure is B's.
        let (result_b, seconds_twin) = match (result_b, twin) {
            (Ok(()), Some((Err(Error::Engine(msg)), secs))) => {
                (Err(Error::Engine(format!("the oracle's twin: {msg}"))), secs)
            }
            (Ok(()), Some((Err(e), _))) => return Err(e),
            (result_b, twin) => (result_b, twin.map_or(0.0, |t| t.1)),
        };
        let result_b = (result_b, seconds_b);
        // A crash of either engine wins over the other's refusal of its input: a crashed
        // engine must never read as a usage error. The other's failure joins its message.
        let mut seconds = [0.0; 2];
        let mut failures: Vec<(&str, &dyn Engine, &PathBuf, Error)> = Vec::new();
        for (i, ((result, secs), engine, out, name)) in
            [(result_a, &*self.a, &dirs.a, "A"), (result_b, &*self.b, &dirs.b, "B")]
                .into_iter()
                .enumerate()
        {
            seconds[i] = secs;
            match result {
                Ok(()) => {}
                // A cut prompt or a smaller selection is input the engine must take once it
                // took the search's first probe: its refusal is a finding about the engine,
                // and the search so far is kept (a usage error would lose it).
                Err(Error::Input(msg)) if self.engines_accepted => failures.push((
                    name,
                    engine,
                    out,
                    Error::Engine(format!("refused a probe after accepting the earlier ones: {msg}")),
                )),
                Err(e) => failures.push((name, engine, out, e)),
            }
        }
        let crashed = failures.iter().position(|f| matches!(f.3, Error::Engine(_)));
        let crash = match crashed {
            None => match failures.into_iter().next() {
                Some((.., refusal)) => return Err(refusal),
                None => None,
            },
            Some(i) => {
                let (name, engine, out, Error::Engine(msg)) = failures.swap_remove(i) else {
                    unreachable!("position() found an engine error")
                };
                let mut error = crash_report(out, &msg);
                if let Some((other, .., e)) = failures.first() {
                    error.message = format!("{}; engine {other} also failed: {e}", error.message);
                }
                Some(Crash {
                    engine: name.into(),
                    label: engine.label(),
                    error,
                    probe: purpose.into(),
                    finished: false,
                })
            }
        };
        self.engines_accepted |= crash.is_none();
        let mut record = ProbeRecord {
            purpose: purpose.into(),
            tokens,
            layers: sel.layers.clone(),
            taps: sel.taps.clone(),
            positions: sel.positions.to_string(),
            chunks: 1,
            seconds_a: seconds[0],
            seconds_b: seconds[1] + seconds_twin,
            seconds_diff: 0.0,
            bytes_a: dir_bytes(&dirs.a),
            bytes_b: dir_bytes(&dirs.b),
            finding: String::new(),
            layer_diverged: None,
            dump_a: dirs.a.display().to_string(),
            dump_b: dirs.b.display().to_string(),
        };
        let t0 = Instant::now();
        // What both engines wrote, compared as far as it reads.
        let partial = || match (Dump::open(&dirs.a), Dump::open(&dirs.b)) {
            (Ok(da), Ok(db)) => diff::diff(&da, &db, &self.diff_options(judge, tokens)).ok(),
            _ => None,
        };
        let result = match crash {
            Some(c) => {
                record.finding = format!("engine {} failed: {}", c.engine, c.error.message);
                ProbeResult::Crashed(c, partial())
            }
            None => {
                let asked = sel.positions.resolve(tokens).ok();
                self.measure_twin(&dirs.b)?;
                match self.compare_checked(purpose, &dirs.a, &dirs.b, judge, asked.as_deref(), tokens)? {
                    Ok(r) => ProbeResult::Compared(r),
                    Err(breach) => {
                        let engine = if breach.engine == "A" { &self.a } else { &self.b };
                        let c = Crash {
                            engine: breach.engine.into(),
                            label: engine.label(),
                            error: RunError {
                                message: breach.message,
                                tap: None,
                                position: None,
                            },
                            probe: purpose.into(),
                            finished: true,
                        };
                        record.finding = format!("engine {} failed: {}", c.engine, c.error.message);
                        ProbeResult::Crashed(c, partial())
                    }
                }
            }
        };
        record.seconds_diff = t0.elapsed().as_secs_f64();
        crate::trace::mark(|| format!("probe {purpose}: compared"));
        Ok((result, record))
    }

    /// The probe's directory `dir` and its prompt suite (the first `tokens` tokens), written.
    pub(super) fn prepare(&self, dir: &Path, tokens: usize) -> Result<ProbeDirs> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let suite = dir.join("prompt.jsonl");
        let line = serde_json::json!({"id": self.prompt.id, "tokens": &self.prompt.tokens[..tokens]});
        std::fs::write(&suite, line.to_string() + "\n").map_err(|e| Error::io(&suite, e))?;
        Ok(ProbeDirs {
            a: dir.join("a"),
            b: dir.join("b"),
            twin: dir.join("twin"),
            suite,
            dir: dir.to_path_buf(),
        })
    }

    /// Both engines' dumps of `prompt` with `sel`, and the twin's after B's, each with
    /// the seconds it took.
    fn run_engines(
        &mut self,
        purpose: &str,
        prompt: &PromptRecord,
        sel: &Selection,
        dirs: &ProbeDirs,
    ) -> (Timed, Timed, Option<Timed>) {
        let timed = |engine: &mut dyn Engine, out: &Path| {
            let t0 = Instant::now();
            let result = engine.dump(prompt, sel, out);
            crate::trace::mark(|| format!("probe {purpose}: {} done", engine.label()));
            (result, t0.elapsed().as_secs_f64())
        };
        let on_host = self.a.computes_on_host() && self.b.computes_on_host();
        let (a, b, twin) = (&mut *self.a, &mut *self.b, self.twin.as_deref_mut());
        let oracle_side = move || (timed(b, &dirs.b), twin.map(|t| timed(t, &dirs.twin)));
        if self.opts.sequential || on_host {
            let result_a = timed(a, &dirs.a);
            let (result_b, result_twin) = oracle_side();
            return (result_a, result_b, result_twin);
        }
        // Both engines at once: they are independent, and one often waits on a device or
        // a disk while the other computes.
        std::thread::scope(|scope| {
            let job_b = scope.spawn(oracle_side);
            let result_a = timed(a, &dirs.a);
            let (result_b, result_twin) = job_b.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (result_a, result_b, result_twin)
        })
    }

    /// Comparison options for a probe of the prompt's first `given` tokens; the
    /// tolerances include what the twin measured.
    fn diff_options(&self, judge: Judge, given: usize) -> DiffOptions {
        let tolerances = self.tolerances();
        DiffOptions {
            tolerances,
            allow_model_mismatch: self.opts.allow_model_mismatch,
            judge,
            given_tokens: Some(self.prompt.tokens[..given.min(self.prompt.tokens.len())].to_vec()),
        }
    }

    /// As [`compare_checked`](Self::compare_checked) (a probe of the prompt's first
    /// `given` tokens), an engine's breach of the dump contract an engine error.
    pub(super) fn compare_measured(
        &self,
        purpose: &str,
        a: &Path,
        b: &Path,
        judge: Judge,
        asked: Option<&[usize]>,
        given: usize,
    ) -> Result<DiffReport> {
        self.compare_checked(purpose, a, b, judge, asked, given)?
            .map_err(|breach| Error::engine(breach.to_string()))
    }

    /// The dumps at `a` and `b` compared as `judge` says, with the twin's rows already
    /// measured (a streamed probe's joined dumps: every chunk was); each must hold the
    /// residual stream it was asked for, at the positions `asked` (None: every position
    /// either holds); both were given the prompt's first `given` tokens. Or the engine
    /// that ran to its end but broke that contract: an
    /// unreadable dump, no tap it was asked for, rows left out that the search needs.
    fn compare_checked(
        &self,
        purpose: &str,
        a: &Path,
        b: &Path,
        judge: Judge,
        asked: Option<&[usize]>,
        given: usize,
    ) -> Result<std::result::Result<DiffReport, Breach>> {
        // A dump an engine wrote that does not read (a tap of the wrong width, a bad
        // manifest) is that engine's failure to keep the contract, not bad input.
        let read = |dir: &Path| -> Result<Dump> {
            let d = Dump::open(dir)?;
            for stem in d.files(&self.prompt.id)? {
                d.map_file(&self.prompt.id, &stem)?;
            }
            Ok(d)
        };
        let open = |engine: &'static str, dir: &Path| {
            read(dir).map_err(|e| Breach {
                engine,
                message: format!("wrote an unreadable dump for the {purpose} probe: {e}"),
            })
        };
        let (da, db) = match (open("A", a), open("B", b)) {
            (Ok(da), Ok(db)) => (da, db),
            (Err(breach), _) | (_, Err(breach)) => return Ok(Err(breach)),
        };
        // An engine that ran to the end and captured nothing it was asked for is broken,
        // not a pair sharing no tap.
        for (engine, d) in [("A", &da), ("B", &db)] {
            if d.manifest.status == Status::Complete && d.wrote_no_tap() {
                return Ok(Err(Breach {
                    engine,
                    message: format!(
                        "({}) finished the {purpose} probe without writing any tap it was asked for",
                        d.manifest.engine.describe()
                    ),
                }));
            }
        }
        let r = diff::diff(&da, &db, &self.diff_options(judge, given))?;
        Ok(check_stream_written(&r, purpose, asked).map(|()| r))
    }

    /// The commands that write the probe's dumps again and compare them. Fresh output
    /// directories: `dump -o` refuses to overwrite the probe's own.
    pub(super) fn reproduce_commands(&self, sel: &Selection, dirs: &ProbeDirs) -> Vec<String> {
        let prompt_id = &self.prompt.id;
        let (repro_a, repro_b) = (
            dirs.dir.join("reproduce").join("a"),
            dirs.dir.join("reproduce").join("b"),
        );
        let quote = |p: &Path| crate::engine::shell_quote(&p.display().to_string());
        // The tolerances the probe was judged by (a file given, what a twin measured), as
        // the probe's own file; the defaults need none.
        let tolerances = self.tolerances();
        let file = dirs.dir.join("tolerances.json");
        let written = tolerances != Tolerances::default()
            && serde_json::to_string_pretty(&tolerances).is_ok_and(|text| std::fs::write(&file, text + "\n").is_ok());
        let tol = if written {
            format!(" --tolerances {}", quote(&file))
        } else {
            String::new()
        };
        let mismatch = if self.opts.allow_model_mismatch {
            " --allow-model-mismatch"
        } else {
            ""
        };
        let mut commands = vec![
            self.a.reproduce(prompt_id, &dirs.suite, sel, &dirs.a, &repro_a),
            self.b.reproduce(prompt_id, &dirs.suite, sel, &dirs.b, &repro_b),
        ];
        if let Some(twin) = &self.twin {
            let repro_twin = dirs.dir.join("reproduce").join("twin");
            commands.push(twin.reproduce(prompt_id, &dirs.suite, sel, &dirs.twin, &repro_twin));
        }
        // The rows are judged as this probe judged them (diff's default is auto).
        let judge = match self.judge {
            Judge::Auto => "",
            Judge::Tolerance => " --judge tolerance",
            Judge::NoiseFloor => " --judge floor",
        };
        commands.push(format!(
            "{} diff {} {}{tol}{mismatch}{judge}",
            crate::engine::resbisect_command(),
            quote(&repro_a),
            quote(&repro_b)
        ));
        commands
    }

    /// Set the latest probe's finding.
    pub(super) fn note(&mut self, finding: String) {
        if let Some(p) = self.probes.last_mut() {
            p.finding = finding;
        }
    }

    /// Rows `0..rows` of tap `id` as f32, from the newest probe of side `a`/`b` that holds them.
    pub(super) fn rows(&self, side: &str, id: &str, rows: usize) -> Result<Option<Vec<f32>>> {
        self.rows_at(side, id, &(0..rows).collect::<Vec<_>>())
    }

    /// The newest probe file of side `a`/`b` that holds tap `id` at every position of
    /// `at`, and the row index of each.
    pub(super) fn locate(&self, side: &str, id: &str, at: &[usize]) -> Result<Option<(Rc<MappedFile>, Vec<usize>)>> {
        for dir in self.dirs.iter().rev() {
            let Some(file) = self.probe_file(dir, side, id)? else {
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

    /// The file of probe directory `dir`'s dump of side `a`/`b` that holds tap `id`
    /// (mapped once per search).
    pub(super) fn probe_file(&self, dir: &Path, side: &str, id: &str) -> Result<Option<Rc<MappedFile>>> {
        let tap = Tap::parse(id).ok_or_else(|| Error::input(format!("bad tap {id}")))?;
        let key = (dir.join(side), tap.file_stem().to_string());
        let cached = self.mapped.borrow().get(&key).cloned();
        let file = match cached {
            Some(file) => file,
            None => {
                // The dump was read whole when its probe was compared: a file that no
                // longer reads was changed since by the engine (a process it left behind).
                let file = match Dump::open(&key.0) {
                    Ok(dump) => dump
                        .map_file(&self.prompt.id, &key.1)
                        .map_err(|e| {
                            Error::engine(format!(
                                "engine {}'s dump changed after it was read (a process the engine left running?): {e}",
                                side.to_uppercase()
                            ))
                        })?
                        .map(Rc::new),
                    Err(_) => None,
                };
                self.mapped.borrow_mut().insert(key, file.clone());
                file
            }
        };
        Ok(file.filter(|f| f.taps.contains_key(id)))
    }

    /// Rows of tap `id` at positions `at` as f32, from the newest probe that holds them.
    pub(super) fn rows_at(&self, side: &str, id: &str, at: &[usize]) -> Result<Option<Vec<f32>>> {
        let Some((file, index)) = self.locate(side, id, at)? else {
            return Ok(None);
        };
        let view = file.tap(id).expect("located files hold the tap");
        let row_bytes = view.width * view.dtype.size();
        let mut out = Vec::with_capacity(at.len() * view.width);
        // Runs of consecutive rows convert in one go.
        for run in crate::taps::consecutive_runs(&index) {
            let bytes = &view.bytes[index[run.start] * row_bytes..(index[run.end - 1] + 1) * row_bytes];
            TapView {
                rows: run.len(),
                bytes,
                ..view
            }
            .append_f32(&mut out);
        }
        Ok(Some(out))
    }
}

/// Layers are judged by their residual stream, the head by final_norm and logits, at the
/// positions asked for: a probe whose engine left some out cannot rule a layer (or the
/// head) in or out, and must not read as agreement.
fn check_stream_written(r: &DiffReport, purpose: &str, asked: Option<&[usize]>) -> std::result::Result<(), Breach> {
    for (name, missing) in r
        .prompts
        .iter()
        .flat_map(|p| [("A", &p.missing_in_a), ("B", &p.missing_in_b)])
    {
        let stream: Vec<&str> = missing
            .iter()
            .map(String::as_str)
            .filter(|t| Tap::parse(t).is_some_and(|tap| tap.is_stream()))
            .collect();
        if !stream.is_empty() {
            return Err(Breach {
                engine: name,
                message: format!(
                    "wrote no {} for the {purpose} probe, which asked for it: layers it leaves out cannot be judged",
                    stream.join(", ")
                ),
            });
        }
    }
    // Both engines are asked for the same positions: one that leaves some out would hide
    // a divergence there. (An engine may write more than asked.) Not past where the tokens
    // differ or the first divergent position: the search cuts the prompt there, so the
    // finding stands (an engine that dropped a token writes one row fewer).
    let first_bad = first_bad_position(r).map_or(usize::MAX, |p| p + 1);
    for (name, missing, mismatch) in r.prompts.iter().flat_map(|p| {
        let mismatch = p.token_mismatch.as_ref().map_or(usize::MAX, |m| m.position);
        [
            ("A", &p.rows_missing_in_a, mismatch),
            ("B", &p.rows_missing_in_b, mismatch),
        ]
    }) {
        for rows in missing {
            let positions: Vec<usize> = (rows.positions.iter().copied())
                .filter(|&p| p < mismatch.min(first_bad))
                .filter(|p| asked.is_none_or(|asked| asked.binary_search(p).is_ok()))
                .collect();
            if !positions.is_empty() {
                return Err(Breach {
                    engine: name,
                    message: format!(
                        "wrote no rows of {} at positions {} for the {purpose} probe, which asked for them",
                        crate::report::abbreviate(&rows.taps),
                        crate::taps::positions_spec(&positions)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// An engine (`A` or `B`) that ran to its end but broke the dump contract: a failure of
/// that engine, reported as a crash is (exit 3, the search so far and the dumps kept).
pub(super) struct Breach {
    engine: &'static str,
    message: String,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "engine {} {}", self.engine, self.message)
    }
}
