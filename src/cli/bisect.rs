//! `resbisect bisect`: one bisect run from the arguments (or a demo scenario, see
//! `demo.rs`), its probe directory, its summary and its exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use resbisect::bisect::{self, BisectOptions, Outcome, Replayer};
use resbisect::diff::Judge;
use resbisect::engine::{start_pair, EngineKind, EngineSpec, RefSpec};
use resbisect::model::Model;
use resbisect::prompts::Input;
use resbisect::tolerance::Tolerances;
use resbisect::{report, Error, Result};

use super::args::BisectArgs;
use super::progress::Bars;
use super::shown;

/// One bisect run, however the command line asked for it.
pub(super) struct BisectRun {
    pub(super) model: PathBuf,
    pub(super) input: Input,
    /// Engine A (under test) and engine B (the oracle).
    pub(super) engines: (EngineSpec, EngineSpec),
    /// The reference's precision and profile, for local replay.
    pub(super) reference: RefSpec,
    pub(super) tolerances: Option<PathBuf>,
    pub(super) allow_model_mismatch: bool,
    pub(super) judge: Judge,
    pub(super) logits_budget: u64,
    /// Where the probes go; `None`: a new temporary directory.
    pub(super) work: Option<PathBuf>,
    pub(super) keep: bool,
    pub(super) sequential: bool,
    pub(super) tap_window: usize,
    pub(super) no_replay: bool,
    pub(super) report: Option<PathBuf>,
    pub(super) json: bool,
}

pub fn bisect(a: BisectArgs) -> Result<ExitCode> {
    run(BisectRun {
        engines: a.engines()?,
        reference: a.reference_spec()?,
        input: a.input.input()?,
        model: a.model,
        tolerances: a.compare.tolerances,
        allow_model_mismatch: a.compare.allow_model_mismatch,
        judge: a.compare.judge.judge(),
        // Past 16 EiB the budget holds any head: no limit, rather than a wrapped one.
        logits_budget: a.logits_budget_mib.saturating_mul(1 << 20),
        work: a.work,
        keep: a.keep,
        sequential: a.sequential,
        tap_window: a.tap_window,
        no_replay: a.no_replay,
        report: a.report,
        json: a.json,
    })
}

/// The reference computes when it is an engine or when replay runs.
fn reference_computes(r: &BisectRun) -> bool {
    let is_reference = |s: &EngineSpec| matches!(s.kind, EngineKind::Reference(_));
    !r.no_replay || is_reference(&r.engines.0) || is_reference(&r.engines.1)
}

/// A backend that cannot start names itself by `--backend`; when only the oracle runs on
/// it, the flag to fix is `--oracle-backend`.
fn name_oracle_backend(e: Error, a: &EngineSpec, b: &EngineSpec) -> Error {
    let backend = |s: &EngineSpec| match s.kind {
        EngineKind::Runtime { backend, .. } => Some(backend),
        _ => None,
    };
    match (e, backend(a), backend(b)) {
        (Error::Input(msg), a_backend, Some(b_backend)) if a_backend != Some(b_backend) => {
            use clap::ValueEnum;
            let name = b_backend
                .to_possible_value()
                .map_or(String::new(), |v| v.get_name().to_string());
            match msg.strip_prefix(&format!("--backend {name}:")) {
                Some(rest) => Error::input(format!("--oracle-backend {name}:{rest}")),
                None => Error::Input(msg),
            }
        }
        (e, ..) => e,
    }
}

pub(super) fn run(mut r: BisectRun) -> Result<ExitCode> {
    // The reproduce commands name these paths: absolute, they run from any directory.
    // (A missing one keeps the name it was given, for the error that names it.)
    let absolute = |p: &mut PathBuf| {
        if let Ok(a) = std::path::absolute(&*p) {
            *p = a;
        }
    };
    for path in [Some(&mut r.model), r.tolerances.as_mut()].into_iter().flatten() {
        if path.exists() {
            absolute(path);
        }
    }
    if let Some(work) = r.work.as_mut() {
        absolute(work);
    }
    let model = Model::open(&r.model).map_err(|e| e.for_option("--model", &r.model))?;
    let records = r.input.resolve(&model, None)?;
    let [prompt] = <[_; 1]>::try_from(records).map_err(|r| {
        Error::input(format!(
            "bisect takes one prompt; the suite has {} (pick one with --id)",
            r.len()
        ))
    })?;
    // A suite's token ids belong to the tokenizer they were written with; on another
    // model they are still a valid comparison of two engines, but not of its text.
    let foreign_tokens = prompt.text.as_ref().is_some_and(|text| {
        resbisect::tokenizer::Tokenizer::from_gguf(&model.gguf)
            .and_then(|t| t.encode(text))
            .is_ok_and(|own| own != prompt.tokens)
    });
    let prompt_id = prompt.id.clone();
    let (spec_a, spec_b) = &r.engines;
    resbisect::inject::check_reach(&spec_a.injections, prompt.tokens.len())?;
    if spec_a.is_same_engine_as(spec_b) {
        eprintln!("note: A and B are the same engine without injected faults");
    }
    // Two external programs run at once; on a small machine two CPU engines that each
    // take every core (llama.cpp's default) measured 8× slower than one after the other.
    let external = |s: &EngineSpec| matches!(s.kind, EngineKind::External { .. });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !r.sequential && external(spec_a) && external(spec_b) && cores <= 4 {
        eprintln!(
            "note: A and B are external programs and run at the same time on {cores} cores; if both compute \
             on the CPU with every core (llama.cpp's --threads) they slow each other down many times over: \
             --sequential runs them one after the other"
        );
    }
    if let Some(w) = &r.work {
        bisect::check_work_dir(w)?;
        // The probes fill the work directory and the report directory holds reports alone.
        let (work, report) = (std::path::absolute(w), r.report.as_ref().map(std::path::absolute));
        if let (Ok(work), Some(Ok(report))) = (work, report) {
            if report.starts_with(&work) || work.starts_with(&report) {
                return Err(Error::input(format!(
                    "--report {}: overlaps --work {}, which the probes fill; keep them apart",
                    report.display(),
                    work.display()
                )));
            }
        }
    }
    if let Some(dir) = &r.report {
        super::commands::prepare_report_dir(dir, "--report")?;
    }
    // After the input checks, so that bad input reads as one line.
    if reference_computes(&r) {
        super::commands::note_reference_gemm();
    }
    let mut engines = start_pair(&model, spec_a, spec_b, prompt.tokens.len(), &mut Bars::default())
        .map_err(|e| name_oracle_backend(e, spec_a, spec_b))?;
    let replayer = match &engines.oracle {
        _ if r.no_replay => Replayer::Skip,
        Some(oracle) => Replayer::Loaded(oracle),
        None => Replayer::OnDemand {
            model: &model,
            reference: r.reference,
        },
    };
    let opts = options(&r)?;
    let (twin_spec, flip_free_layer0_taps) = twin_of(spec_b).unzip();
    let mut twin = twin_spec.map(|spec| spec.open(&model)).transpose()?;
    resbisect::trace::mark(|| "engines ready".into());
    eprintln!(
        "bisecting {} ({} tokens): A = {}, B = {}; probes in {}",
        prompt.id,
        prompt.tokens.len(),
        engines.a.label(),
        engines.b.label(),
        opts.work.display()
    );
    let temporary = r.work.is_none() && !r.keep;
    let found = bisect::bisect(
        bisect::Engines {
            a: engines.a.as_mut(),
            b: engines.b.as_mut(),
            // An Option does not shorten its trait object's lifetime by itself.
            twin: twin.as_deref_mut().map(|t| bisect::Twin {
                engine: t as &mut dyn resbisect::engine::Engine,
                flip_free_layer0_taps: flip_free_layer0_taps.unwrap_or_default(),
            }),
        },
        replayer,
        prompt,
        &model.config,
        &opts,
    );
    // A crashed engine's partial dump is evidence (exit 3 keeps it, README): kept.
    let crashed = matches!(&found, Ok(r) if r.outcome == Outcome::Crashed);
    if temporary && !crashed {
        clean_up(&opts.work, found.is_ok());
    } else {
        eprintln!("probe dumps kept in {}", shown(&opts.work));
    }
    let mut found = found?;
    if foreign_tokens {
        eprintln!(
            "note: prompt {prompt_id}: its token ids are not this model's tokenization of its text (written for \
             another tokenizer?); both engines ran them as given"
        );
    }
    // A search that ended before any comparison (an engine crashed in the first probe)
    // read no dump to name the model from.
    if found.model.is_empty() {
        found.model = model.gguf.path.display().to_string();
        found.fingerprint = model.fingerprint.clone();
    }
    if r.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&found).map_err(|e| Error::input(e.to_string()))?
        );
    } else {
        print!("{}", report::bisect_summary(&found));
    }
    if let Some(dir) = &r.report {
        report::write_bisect(&found, dir)?;
        // The full comparison exists only where a probe compared the suspect layer.
        let comparison = if dir.join("report.json").is_file() {
            " and report.{json,md,html}"
        } else {
            ""
        };
        eprintln!("wrote {}/bisect.{{json,md,html}}{comparison}", shown(dir));
    }
    Ok(match found.outcome {
        Outcome::Clean => ExitCode::SUCCESS,
        Outcome::Diverged => ExitCode::from(1),
        Outcome::Crashed => ExitCode::from(3),
    })
}

/// The twin of an oracle B that is the reference under a rounding profile (it loads
/// on its first probe), and layer 0's taps that profile reproduces up to summation order.
fn twin_of(b: &EngineSpec) -> Option<(EngineSpec, &'static [&'static str])> {
    match &b.kind {
        EngineKind::Reference(spec) => spec.twin().map(|twin| {
            let twin_spec = EngineSpec {
                kind: EngineKind::Reference(twin),
                ..b.clone()
            };
            (twin_spec, spec.profile.layer0_taps_without_rounding_flips())
        }),
        _ => None,
    }
}

/// The search's options; the work directory is checked (absent or empty).
fn options(r: &BisectRun) -> Result<BisectOptions> {
    let tolerances = match &r.tolerances {
        Some(p) => Tolerances::load(p).map_err(|e| e.for_option("--tolerances", p))?,
        None => Tolerances::default(),
    };
    let work = match &r.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!(
            "resbisect-bisect-{}-{}",
            std::process::id(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace(':', "")
        )),
    };
    bisect::check_work_dir(&work)?;
    Ok(BisectOptions {
        tolerances,
        allow_model_mismatch: r.allow_model_mismatch,
        judge: r.judge,
        logits_budget: r.logits_budget,
        work,
        sequential: r.sequential,
        tap_window: r.tap_window,
    })
}

/// A temporary work directory after the search: the probe dumps (the reproduce commands
/// read what stays). After a failure, all of it unless an engine left a log there, which
/// the error names.
fn clean_up(work: &Path, succeeded: bool) {
    if !succeeded {
        remove_dumps(work);
        if !holds_log(work) {
            let _ = std::fs::remove_dir_all(work);
        }
        return;
    }
    let freed = remove_dumps(work);
    eprintln!(
        "removed the probe dumps ({:.1} MB); the reproduce commands' inputs stay in {} (--keep keeps the dumps, --work DIR puts them where you say)",
        freed as f64 / 1e6,
        work.display()
    );
}

/// Whether a `.log` file lies anywhere under `dir`.
fn holds_log(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|it| {
        it.flatten().any(|e| {
            let p = e.path();
            p.extension().is_some_and(|x| x == "log") || (p.is_dir() && holds_log(&p))
        })
    })
}

/// Remove every dump directory (one holding manifest.json) under `dir`, keeping the small
/// files beside them (prompt suites, token and model files, logs) that the printed
/// reproduce commands read; returns the bytes freed.
fn remove_dumps(dir: &Path) -> u64 {
    fn size(p: &Path) -> u64 {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|it| it.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut freed = 0;
    for e in entries.flatten() {
        let p = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if p.join("manifest.json").is_file() {
            freed += size(&p);
            let _ = std::fs::remove_dir_all(&p);
        } else {
            freed += remove_dumps(&p);
        }
    }
    freed
}
