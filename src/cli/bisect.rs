//! `resbisect bisect` and `resbisect demo`: one bisect run from the arguments (or the
//! demo's fixed scenario), its probe directory, its summary and its exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use resbisect::bisect::{self, BisectOptions, Outcome, Replayer};
use resbisect::diff::Judge;
use resbisect::engine::{start_pair, EngineKind, EngineSpec, RefPrecision, RefSpec};
use resbisect::model::Model;
use resbisect::prompts::Input;
use resbisect::runtime::backend::StorageDType;
use resbisect::runtime::{BackendKind, RunOptions};
use resbisect::tolerance::Tolerances;
use resbisect::{report, Error, Result};

use super::args::{BisectArgs, DemoArgs};
use super::progress::Bars;

/// One bisect run, however the command line asked for it.
struct BisectRun {
    model: PathBuf,
    input: Input,
    /// Engine A (under test) and engine B (the oracle).
    engines: (EngineSpec, EngineSpec),
    /// The reference's precision and profile, for local replay.
    reference: RefSpec,
    tolerances: Option<PathBuf>,
    allow_model_mismatch: bool,
    judge: Judge,
    logits_budget: u64,
    /// Where the probes go; `None`: a new temporary directory.
    work: Option<PathBuf>,
    keep: bool,
    sequential: bool,
    tap_window: usize,
    no_replay: bool,
    report: Option<PathBuf>,
    json: bool,
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
        logits_budget: a.logits_budget_mib << 20,
        work: a.work,
        keep: a.keep,
        sequential: a.sequential,
        tap_window: a.tap_window,
        no_replay: a.no_replay,
        report: a.report,
        json: a.json,
    })
}

fn run(r: BisectRun) -> Result<ExitCode> {
    let model = Model::open(&r.model)?;
    let records = r.input.resolve(&model, None)?;
    let [prompt] = <[_; 1]>::try_from(records).map_err(|r| {
        Error::input(format!(
            "bisect takes one prompt; the suite has {} (pick one with --id)",
            r.len()
        ))
    })?;
    let (spec_a, spec_b) = &r.engines;
    resbisect::inject::check_reach(&spec_a.injections, prompt.tokens.len())?;
    if spec_a.is_same_engine_as(spec_b) {
        eprintln!("note: A and B are the same engine without injected faults");
    }
    if let Some(w) = &r.work {
        bisect::check_work_dir(w)?;
    }
    let mut engines = start_pair(&model, spec_a, spec_b, &mut Bars::default())?;
    let replayer = match &engines.oracle {
        _ if r.no_replay => Replayer::Skip,
        Some(oracle) => Replayer::Loaded(oracle),
        None => Replayer::OnDemand {
            model: &model,
            reference: r.reference,
        },
    };
    let opts = options(&r)?;
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
        engines.a.as_mut(),
        engines.b.as_mut(),
        replayer,
        prompt,
        &model.config,
        &opts,
    );
    if temporary {
        clean_up(&opts.work, found.is_ok());
    } else {
        eprintln!("probe dumps kept in {}", opts.work.display());
    }
    let found = found?;
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
        eprintln!(
            "wrote {}/bisect.{{json,md,html}} and report.{{json,md,html}}",
            dir.display()
        );
    }
    Ok(match found.outcome {
        Outcome::Clean => ExitCode::SUCCESS,
        Outcome::Diverged => ExitCode::from(1),
        Outcome::Crashed => ExitCode::from(3),
    })
}

/// The search's options; the work directory is checked (absent or empty).
fn options(r: &BisectRun) -> Result<BisectOptions> {
    let tolerances = match &r.tolerances {
        Some(p) => Tolerances::load(p)?,
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

/// A temporary work directory after the search: all of it after a failure; after a
/// result, the probe dumps only (the reproduce commands read what stays).
fn clean_up(work: &Path, succeeded: bool) {
    if !succeeded {
        let _ = std::fs::remove_dir_all(work);
        return;
    }
    let freed = remove_dumps(work);
    eprintln!(
        "removed the probe dumps ({:.1} MB); the reproduce commands' inputs stay in {} (--keep keeps the dumps, --work DIR puts them where you say)",
        freed as f64 / 1e6,
        work.display()
    );
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

/// Marks a directory `resbisect demo` may replace.
const DEMO_MARKER: &str = ".resbisect-demo";

/// The original scenario: the runtime with a RoPE fault, bisected against the reference.
pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let DemoArgs { model, prompts, output } = a;
    if !model.exists() {
        return Err(Error::input(format!(
            "{} is missing: run ./scripts/fetch-models.sh first",
            model.display()
        )));
    }
    if output.exists() {
        if !output.join(DEMO_MARKER).exists() {
            return Err(Error::input(format!(
                "{} exists and is not an earlier demo; pick another --output",
                output.display()
            )));
        }
        std::fs::remove_dir_all(&output).map_err(|e| Error::io(&output, e))?;
    }
    std::fs::create_dir_all(&output).map_err(|e| Error::io(&output, e))?;
    std::fs::write(output.join(DEMO_MARKER), "").map_err(|e| Error::io(&output, e))?;
    let fault = "blk.11.rope:shift=3@827";
    eprintln!(
        "demo: the runtime (cpu backend, f32) carries an injected RoPE fault in layer 11 from position 827 ({fault});"
    );
    eprintln!("      bisect should name blk.11.q at position 827 and attribute it to layer 11.\n");
    let engine = |kind, injections| EngineSpec {
        kind,
        injections,
        run: RunOptions::default(),
    };
    let runtime = EngineKind::Runtime {
        backend: BackendKind::Cpu,
        dtype: StorageDType::F32,
    };
    let code = run(BisectRun {
        model,
        input: Input::Suite {
            path: prompts,
            only: Some("long_1652".into()),
        },
        engines: (
            engine(runtime, vec![fault.into()]),
            engine(EngineKind::Reference(RefPrecision::F32.into()), Vec::new()),
        ),
        reference: RefPrecision::F32.into(),
        tolerances: None,
        allow_model_mismatch: false,
        judge: Judge::Auto,
        logits_budget: 64 << 20,
        work: Some(output.join("probes")),
        keep: true,
        sequential: false,
        tap_window: 16,
        no_replay: false,
        report: Some(output.join("report")),
        json: false,
    })?;
    eprintln!("open {}/report/bisect.html", output.display());
    Ok(code)
}
