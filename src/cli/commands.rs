//! One function per command: the request from the arguments, the library's answer,
//! printed. (Bisect and demo in `bisect.rs`, selftest in `backend.rs`, inspect in
//! `inspect.rs`.)

use std::path::Path;
use std::process::ExitCode;

use resbisect::diff::{self, DiffOptions, DiffReport};
use resbisect::dump::PromptRecord;
use resbisect::dump::{Dump, Status};
use resbisect::engine::{self, DumpRequest};
use resbisect::model::Model;
use resbisect::prompts::{self, Input};
use resbisect::runtime::backend::StorageDType;
use resbisect::runtime::weights::WeightMode;
use resbisect::runtime::RunOptions;
use resbisect::taps::{parse_layers, parse_taps, PositionSpec, Selection};
use resbisect::tokenizer::Tokenizer;
use resbisect::tolerance::Tolerances;
use resbisect::{gguf, report, synth, Error, Result};

use super::args::{CompareArgs, CutArgs, DiffArgs, DumpArgs, ReportKind, RunArgs, SynthArgs, TokenizeArgs};
use super::progress::Bars;
use super::shown;
use super::specs::named;

pub fn dump(a: DumpArgs) -> Result<ExitCode> {
    let spec = a.engine()?;
    let mut inputs = vec![a.model.as_path()];
    inputs.extend(a.input.prompts.as_deref());
    refuse_inputs_inside_output(&a.output, "--output", &inputs)?;
    let input = a.input.input()?;
    let model = Model::open(&a.model).map_err(|e| e.for_option("--model", &a.model))?;
    resbisect::trace::mark(|| "model opened".into());
    check_run_counts(a.max_tokens, a.warmup, model.config.n_ctx)?;
    let selection = selection(&a, model.config.n_layer)?;
    // `all` means the model's taps; a tap named outright must exist in this model.
    if !a.taps.split(',').any(|t| t.trim() == "all") {
        if let Some(t) = selection
            .taps
            .iter()
            .find(|t| resbisect::taps::LayerTap::from_name(t).is_some_and(|t| !t.in_model(&model.config)))
        {
            return Err(Error::input(format!(
                "--taps: this {} model has no {t} tap (docs/taps.md: which models have which taps)",
                model.config.arch
            )));
        }
    }
    let records = input.resolve(&model, None)?;
    check_positions(&selection, &records, &input, a.max_tokens)?;
    resbisect::inject::check_reach(
        &a.inject,
        records.iter().map(|r| r.tokens.len()).max().unwrap_or(0) + a.max_tokens,
    )?;
    resbisect::trace::mark(|| format!("{} prompt(s) ready", records.len()));
    for r in &records {
        resbisect::dump::validate_prompt_id(&r.id)?;
    }
    resbisect::dump::DumpWriter::check_output(&a.output, a.overwrite)?;
    // After the input checks, so that bad input reads as one line.
    if matches!(spec.kind, engine::EngineKind::Reference(_)) {
        note_reference_gemm();
    }
    let request = DumpRequest {
        prompts: &records,
        selection: &selection,
        out: &a.output,
        overwrite: a.overwrite,
        checkpoints: false,
    };
    let summary = spec.open(&model)?.dump_prompts(&request, &mut Bars::default())?;
    resbisect::trace::mark(|| {
        format!(
            "dump written (load {:.3} s, compute {:.3} s, waiting for files {:.3} s)",
            summary.load_seconds, summary.compute_seconds, summary.drain_seconds
        )
    });
    eprintln!(
        "wrote {} ({} prompt(s), {} tokens; load {:.2} s, compute {:.4} s of which {:.4} s waiting for files, {:.1} tokens/s)",
        shown(&a.output),
        summary.prompts,
        summary.tokens,
        summary.load_seconds,
        summary.compute_seconds,
        summary.drain_seconds,
        summary.tokens as f64 / summary.compute_seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// `dump`'s selection; an error names the flag at fault (`--layers: …`).
fn selection(a: &DumpArgs, n_layer: usize) -> Result<Selection> {
    let on = |flag: &'static str| move |e: resbisect::taps::Error| Error::input(format!("{flag}: {}", e.0));
    Ok(Selection {
        layers: parse_layers(&a.layers, n_layer).map_err(on("--layers"))?,
        taps: parse_taps(&a.taps).map_err(on("--taps"))?,
        positions: PositionSpec::parse(&a.positions).map_err(on("--positions"))?,
    })
}

/// Every prompt holds the positions `dump --positions` asks for (refused here, where the
/// flag can be named, rather than by the engine).
fn check_positions(selection: &Selection, records: &[PromptRecord], input: &Input, generated: usize) -> Result<()> {
    for p in records {
        let len = p.tokens.len() + generated;
        if let Some((item, reads)) = selection.positions.empty_within(len) {
            return Err(Error::input(format!(
                "--positions {item}: selects no position of {} {len} tokens (it reads {reads} there; a range's end is exclusive)",
                input.whose(&p.id),
            )));
        }
        if let Some(item) = selection.positions.misfit(len) {
            let plus = match generated {
                0 => String::new(),
                g => format!(" and {g} generated"),
            };
            let n = p.tokens.len();
            let s = if n == 1 { "" } else { "s" };
            return Err(Error::input(format!(
                "--positions {item}: outside {} {n} token{s}{plus} (positions 0..{len}; a range's end is exclusive)",
                input.whose(&p.id),
            )));
        }
    }
    Ok(())
}

/// One line on stderr when the reference's f32 GEMMs fall back to candle's (slower on
/// CPUs with AVX-512) because no OpenBLAS loaded.
pub(super) fn note_reference_gemm() {
    if let Err(why) = engine::gemm_backend() {
        eprintln!("note: the reference's f32 GEMMs run on candle's ({why}); scripts/setup.sh installs OpenBLAS");
    }
}

/// Most untimed runs `--warmup` may ask for: a benchmark warms up once or a few times, and
/// a mistyped count would run without end.
const MAX_WARMUP: usize = 100;

/// `--max-tokens` within the model's context (`n_ctx` positions; a larger count would
/// overflow the sums of positions that follow) and `--warmup` within [`MAX_WARMUP`].
fn check_run_counts(max_tokens: usize, warmup: usize, n_ctx: usize) -> Result<()> {
    if max_tokens > n_ctx {
        return Err(Error::input(format!(
            "--max-tokens {max_tokens}: more than the model's context of {n_ctx} positions"
        )));
    }
    if warmup > MAX_WARMUP {
        return Err(Error::input(format!(
            "--warmup {warmup}: at most {MAX_WARMUP} untimed runs"
        )));
    }
    Ok(())
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    let dtype = named("--dtype", StorageDType::parse(&a.dtype))?;
    let model = Model::open(&a.model).map_err(|e| e.for_option("--model", &a.model))?;
    check_run_counts(a.max_tokens, a.warmup, model.config.n_ctx)?;
    let tokenizer = Tokenizer::from_gguf(&model.gguf)?;
    let input = match (a.prompt, a.tokens) {
        (Some(text), _) => Input::Text { id: "run".into(), text },
        (None, Some(list)) => Input::Tokens { id: "run".into(), list },
        (None, None) => return Err(Error::input("give --prompt or --tokens")),
    };
    let record = input.resolve(&model, Some(&tokenizer))?.remove(0);
    let opts = RunOptions {
        prefill_chunk: a.prefill_chunk,
        max_tokens: a.max_tokens,
        sync_check: false,
        stop_token: if a.ignore_eos { None } else { tokenizer.eos_id },
        warmup: a.warmup,
        weights: named("--weights", WeightMode::parse(&a.weights))?,
    };
    let g = engine::generate(a.backend, dtype, &model, record, &opts, &mut Bars::default())?;
    println!("{}", tokenizer.decode(&g.tokens)?);
    let generated = g.tokens.len() - g.prompt_len;
    eprintln!(
        "prefill {} tokens in {:.4} s ({:.1} tokens/s); decode {} tokens in {:.4} s ({:.1} tokens/s)",
        g.prompt_len,
        g.prefill_seconds,
        g.prompt_len as f64 / g.prefill_seconds.max(1e-9),
        generated,
        g.decode_seconds,
        generated as f64 / g.decode_seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Create the report directory `dir` (named by `flag`) before any work, so that a path
/// that cannot be one, or a directory holding files of the user's, fails at once with
/// the option's name, not after the comparison.
pub(super) fn prepare_report_dir(dir: &Path, flag: &str) -> Result<()> {
    resbisect::output::prepare_output_dir(dir, flag, &report::REPORT_FILES)
}

pub fn diff(a: DiffArgs) -> Result<ExitCode> {
    if let Some(dir) = &a.report {
        prepare_report_dir(dir, "--report")?;
    }
    let r = compare(&a.a, &a.b, &a.compare, &a.pair)?;
    refuse_unrelated(&r, !a.pair.is_empty())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| Error::input(e.to_string()))?
        );
    } else {
        print!("{}", report::terminal_summary(&r));
    }
    if let Some(dir) = a.report {
        report::write_all(&r, &dir)?;
    }
    Ok(verdict(&r))
}

/// Refuse an output path (named by `flag`) that is one of the command's inputs or lies
/// inside an input directory (a dump): writing there would destroy what is read.
pub(super) fn refuse_writing_over_inputs(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    // The output may not exist yet: its directory, resolved, and its name.
    let resolved = match (out.parent(), out.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize().map_or_else(|_| out.to_path_buf(), |d| d.join(name))
        }
        _ => out.to_path_buf(),
    };
    let resolved = resolved.canonicalize().unwrap_or(resolved);
    for input in inputs {
        let Ok(input_path) = input.canonicalize() else { continue };
        // A hard link is another path to the same file.
        let same = resolved == input_path || same_file(&resolved, &input_path);
        if same || (input_path.is_dir() && resolved.starts_with(&input_path)) {
            let place = if same { "" } else { "inside " };
            return Err(Error::input(format!(
                "{flag} {}: that is {place}the input {}; write it elsewhere",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Whether `a` and `b` are one file (the same device and inode), both existing.
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Refuse an output directory (named by `flag`) that holds one of the command's inputs:
/// `--overwrite` replaces a dump's files, and would delete that input with them.
fn refuse_inputs_inside_output(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let Ok(out_dir) = out.canonicalize() else {
        return Ok(());
    };
    for input in inputs {
        if input.canonicalize().is_ok_and(|i| i.starts_with(&out_dir)) {
            return Err(Error::input(format!(
                "{flag} {}: the input {} lies inside it, and replacing the dump would delete it; write the dump elsewhere",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

pub fn report(kind: ReportKind) -> Result<ExitCode> {
    match kind {
        ReportKind::Diff {
            a,
            b,
            compare: args,
            pair,
            output,
            history,
            run,
        } => {
            if let Some(h) = &history {
                refuse_writing_over_inputs(h, "--history", &[&a, &b])?;
                let in_output = match (std::path::absolute(h), std::path::absolute(&output)) {
                    (Ok(history), Ok(dir)) => history.starts_with(dir),
                    _ => false,
                };
                if in_output {
                    return Err(Error::input(format!(
                        "--history {}: lies in --output {}, which the report rewrites; keep the history elsewhere",
                        h.display(),
                        output.display()
                    )));
                }
                let parent = h
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    return Err(Error::input(format!(
                        "--history {}: no directory {} to keep it in",
                        h.display(),
                        parent.display()
                    )));
                }
                // Appending to a file that is not a history (a model, a report) would damage it.
                if h.exists() {
                    let past = report::read_history(h).map_err(|e| {
                        Error::input(format!("--history {}: not a resbisect history ({e})", h.display()))
                    })?;
                    // The trend has a row per run: a second row of the same name reads as one.
                    if let Some(name) = run.as_ref().filter(|name| past.iter().any(|e| &e.run == *name)) {
                        return Err(Error::input(format!(
                            "--run {name}: {} already holds a run of that name",
                            h.display()
                        )));
                    }
                }
            }
            prepare_report_dir(&output, "--output")?;
            let r = compare(&a, &b, &args, &pair)?;
            refuse_unrelated(&r, !pair.is_empty())?;
            report::write_all(&r, &output)?;
            if let Some(h) = history {
                report::append_history(&h, report::history_entry(&r, run.as_deref()), run.is_some())?;
            }
            print!("{}", report::terminal_summary(&r));
            eprintln!("wrote {}/report.{{json,md,html}}", shown(&output));
            Ok(verdict(&r))
        }
        ReportKind::Trend { history, output } => {
            prepare_report_dir(&output, "--output")?;
            let entries = report::read_history(&history)?;
            let (md, html) = report::trend(&entries)?;
            for (name, text) in [("trend.md", &md), ("trend.html", &html)] {
                resbisect::output::write_file(&output.join(name), text.as_bytes())?;
            }
            print!("{md}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn tokenize(a: TokenizeArgs) -> Result<ExitCode> {
    let gguf = gguf::GgufFile::open(&a.model).map_err(|e| e.for_option("--model", &a.model))?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    if a.decode {
        let ids = prompts::parse_token_list(&a.text, "the token list to decode")?;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= tokenizer.vocab_size) {
            return Err(Error::input(format!(
                "token id {t} is outside the vocabulary (size {})",
                tokenizer.vocab_size
            )));
        }
        println!("{}", tokenizer.decode(&ids)?);
        return Ok(ExitCode::SUCCESS);
    }
    let ids = tokenizer.encode(&a.text)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids).expect("ids serialize"));
    } else {
        println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cut(a: CutArgs) -> Result<ExitCode> {
    resbisect::cut::cut(&a.model, a.layers, &a.output)?;
    let bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} (the first {} layers of {}, {:.1} MiB)",
        shown(&a.output),
        a.layers,
        shown(&a.model),
        bytes as f64 / (1 << 20) as f64
    );
    Ok(ExitCode::SUCCESS)
}

pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    if a.output.exists() {
        return Err(Error::input(format!(
            "--output {}: exists; synth writes a new file",
            a.output.display()
        )));
    }
    let mut preset = synth::preset(&a.preset)?;
    if let Some(kind) = &a.tokenizer {
        preset.tokenizer = synth::TokenizerKind::parse(kind)?;
    }
    synth::write_model(&preset, synth::parse_quant(&a.quant)?, a.seed, &a.output)?;
    eprintln!(
        "wrote {} ({} preset, {}, seed {})",
        shown(&a.output),
        preset.name,
        a.quant,
        a.seed
    );
    Ok(ExitCode::SUCCESS)
}

pub fn compare(a: &Path, b: &Path, args: &CompareArgs, pairs: &[String]) -> Result<DiffReport> {
    let tolerances = match &args.tolerances {
        Some(p) => Tolerances::load(p).map_err(|e| e.for_option("--tolerances", p))?,
        None => Tolerances::default(),
    };
    let pairs = pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((x, y)) if !x.is_empty() && !y.is_empty() => Ok((x.to_string(), y.to_string())),
            _ => Err(Error::input(format!(
                "--pair {p:?}: expected A_ID=B_ID (a prompt id of dump A, one of dump B)"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let (da, db) = (Dump::open(a)?, Dump::open(b)?);
    let opts = DiffOptions {
        tolerances,
        allow_model_mismatch: args.allow_model_mismatch,
        judge: args.judge.judge(),
        given_tokens: None,
    };
    diff::diff_paired(&da, &db, &opts, &pairs).map_err(|e| match e {
        // A dump its engine never finished may hold a damaged file: the failure is the
        // engine's, whatever else its files say.
        Error::Input(msg) => match [(&da, "A"), (&db, "B")]
            .iter()
            .find(|(d, _)| d.manifest.status != Status::Complete)
        {
            Some((d, name)) => Error::engine(format!(
                "dump {name} is {}{}; reading it: {msg}",
                if d.manifest.status == Status::Failed {
                    "failed"
                } else {
                    "unfinished (status running)"
                },
                d.manifest
                    .error
                    .as_ref()
                    .map(|e| format!(" ({})", e.message))
                    .unwrap_or_default()
            )),
            None => Error::Input(msg),
        },
        other => other,
    })
}

/// Refuse a comparison of dumps of different prompts (`TokenMismatch::unrelated`): no
/// finding about either engine, just a wrong pair of dumps. `paired` tells whether
/// `--pair` chose the prompts.
fn refuse_unrelated(r: &DiffReport, paired: bool) -> Result<()> {
    let unrelated = r.prompts.iter().find_map(|p| {
        let m = p
            .token_mismatch
            .as_ref()
            .filter(|m| m.unrelated() && r.engine_failure().is_none())?;
        Some((&p.id, m))
    });
    let Some((id, m)) = unrelated else { return Ok(()) };
    let hint = if paired {
        "check the prompts --pair names"
    } else {
        "compare dumps of one prompt, or pair prompts with --pair A_ID=B_ID"
    };
    Err(Error::input(format!(
        "prompt {id}: A and B are dumps of different prompts ({}; they record no common text): nothing is \
         comparable; {hint}",
        m.describe()
    )))
}

/// Exit 3 when a dump's engine failed or never finished, whatever its rows say (a
/// crashed engine never passes a gate); else 1 when a divergence was found (README.md,
/// "Exit codes").
pub fn verdict(r: &DiffReport) -> ExitCode {
    if let Some(failure) = r.engine_failure() {
        eprintln!("error: {failure}");
        ExitCode::from(3)
    } else if r.diverged {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
