//! The `resbisect` command line: argument parsing, terminal output, progress bars and
//! exit codes (README.md, "Exit codes"). Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use resbisect::bisect::{self, BisectOptions, Outcome, Replayer};
use resbisect::diff::{self, DiffOptions, DiffReport, Judge};
use resbisect::dump::{Dump, Status};
use resbisect::engines::{Engine, ExternalEngine, ReferenceDriver, RuntimeDriver};
use resbisect::model::Model;
use resbisect::prompts::{self, PromptSource};
use resbisect::reference_engine::{self, Progress, RefPrecision, ReferenceEngine};
use resbisect::report;
use resbisect::runtime::{self, backend::StorageDType, RunOptions};
use resbisect::taps::{Selection, Tap};
use resbisect::tokenizer::Tokenizer;
use resbisect::tolerance::Tolerances;
use resbisect::{gguf, synth, Error, Result};

#[derive(Parser)]
#[command(
    name = "resbisect",
    version,
    about = "Which tensor diverges first, where, and by how much?"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an engine on prompts and write its taps as a dump (format v1).
    Dump(DumpArgs),
    /// Generate greedily with the runtime (no taps) and print the text and tokens/s.
    Run {
        /// The model: a GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt text, tokenized with the model's tokenizer.
        #[arg(long, conflicts_with = "tokens")]
        prompt: Option<String>,
        /// Explicit token ids instead of a text.
        #[arg(long)]
        tokens: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// Storage dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Prompt tokens per prefill step (default: the whole prompt at once).
        #[arg(long)]
        prefill_chunk: Option<usize>,
        /// Generate all --max-tokens tokens even past end-of-sequence (benchmarks).
        #[arg(long)]
        ignore_eos: bool,
        /// Untimed runs first (benchmarks: excludes lazy kernel loading and the like).
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// Describe a GGUF model or a dump directory.
    Inspect {
        /// A .gguf file or a dump directory.
        path: PathBuf,
        /// List every tensor of a model.
        #[arg(long)]
        tensors: bool,
    },
    /// Print the token ids of a text with the model's own tokenizer.
    Tokenize {
        /// The model (GGUF) whose tokenizer to use.
        #[arg(long)]
        model: PathBuf,
        /// Print one JSON array instead of comma-separated ids.
        #[arg(long)]
        json: bool,
        /// Decode: the argument is comma-separated ids, the output their text.
        #[arg(long)]
        decode: bool,
        text: String,
    },
    /// Compare dump A (engine under test) with dump B (reference): first divergence.
    Diff {
        /// Dump of the engine under test.
        a: PathBuf,
        /// Dump of the reference (the oracle).
        b: PathBuf,
        #[command(flatten)]
        compare: CompareArgs,
        /// Compare prompt A_ID of A with prompt B_ID of B (dumps whose prompt ids differ).
        /// Repeatable.
        #[arg(long, value_name = "A_ID=B_ID")]
        pair: Vec<String>,
        /// Print the full report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Also write report.json, report.md and report.html into this directory.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Measure the noise floor of known-good dump pairs (A B [A B ...]) and write a
    /// tolerance file for --tolerances.
    Calibrate {
        #[arg(required = true, num_args = 2..)]
        dumps: Vec<PathBuf>,
        /// Multiply each tap kind's worst measured rel L2 by this.
        #[arg(long, default_value_t = 4.0)]
        margin: f64,
        /// Never tolerate less than this rel L2.
        #[arg(long, default_value_t = 1e-7)]
        floor: f64,
        #[arg(long)]
        allow_model_mismatch: bool,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Reports: `report diff A B -o DIR` (JSON, Markdown, HTML), `report trend HISTORY -o DIR`.
    Report {
        #[command(subcommand)]
        kind: ReportKind,
    },
    /// Find the first divergent tap and position between an engine under test (A) and an
    /// oracle (B) with as few and as small dumps as possible, then replay the suspect
    /// layer on the reference from A's inputs.
    Bisect(BisectArgs),
    /// The original scenario on the real SmolLM2 model: the runtime (`cpu` backend) with a
    /// RoPE fault past position 826 of a 1652-token prompt, bisected against the reference.
    Demo {
        #[arg(long, default_value = "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        #[arg(long, default_value = "fixtures/prompts/long.jsonl")]
        prompts: PathBuf,
        /// Where the probes and the report go (replaced when it holds an earlier demo).
        #[arg(short, long, default_value = "resbisect-demo")]
        output: PathBuf,
    },
    /// Check every op of a backend against the `cpu` backend on many shapes (NMSE per op,
    /// NaN/Inf, guard regions); exit 1 on any failure.
    Selftest {
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// Storage dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also attention over 8192 positions.
        #[arg(long)]
        long: bool,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
        /// Instead of checking, time each op at a preset's decode and prefill shapes.
        #[arg(long)]
        perf: bool,
        /// Model shape for --perf: tiny, smollm2-135m or tinyllama-1.1b.
        #[arg(long, default_value = "tinyllama-1.1b")]
        preset: String,
        /// Cached positions at decode and rows at prefill for --perf.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
    },
    /// Write a model's first N layers as a model of its own (real weights, smaller file).
    Cut {
        /// The model to cut: a GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Layers to keep (the first N).
        #[arg(long)]
        layers: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a synthetic llama model with random weights at real shapes.
    Synth {
        /// tiny, smollm2-135m or tinyllama-1.1b
        #[arg(long)]
        preset: String,
        #[arg(long, default_value = "q8_0")]
        quant: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokenizer section: gpt2 (byte-level BPE) or llama (SentencePiece); default per preset.
        #[arg(long)]
        tokenizer: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Args)]
struct CompareArgs {
    /// Tolerance file (from `resbisect calibrate`).
    #[arg(long)]
    tolerances: Option<PathBuf>,
    /// Compare dumps from different model files.
    #[arg(long)]
    allow_model_mismatch: bool,
    /// What rows are judged against: `auto` uses each tap's tolerance unless an error
    /// sits systematically over the noise floor before the first tap over tolerance
    /// (then the floor, from there on); `tolerance` or `floor` force one.
    #[arg(long, value_enum, default_value_t = JudgeArg::Auto)]
    judge: JudgeArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum JudgeArg {
    Auto,
    Tolerance,
    Floor,
}

impl JudgeArg {
    fn judge(self) -> Judge {
        match self {
            JudgeArg::Auto => Judge::Auto,
            JudgeArg::Tolerance => Judge::Tolerance,
            JudgeArg::Floor => Judge::NoiseFloor,
        }
    }
}

#[derive(Subcommand)]
enum ReportKind {
    /// Diff A against B and write report.json, report.md, report.html.
    Diff {
        /// Dump of the engine under test.
        a: PathBuf,
        /// Dump of the reference (the oracle).
        b: PathBuf,
        #[command(flatten)]
        compare: CompareArgs,
        /// Compare prompt A_ID of A with prompt B_ID of B. Repeatable.
        #[arg(long, value_name = "A_ID=B_ID")]
        pair: Vec<String>,
        #[arg(short, long)]
        output: PathBuf,
        /// Append this run's verdicts to a nightly history (JSONL).
        #[arg(long)]
        history: Option<PathBuf>,
        /// Name of the run in the history.
        #[arg(long, default_value = "run")]
        run: String,
    },
    /// Turn a nightly history into trend.md and trend.html.
    Trend {
        history: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineKind {
    /// The oracle (candle, f32 or f64).
    Reference,
    /// The instrumented runtime (device under test) on --backend.
    Runtime,
}

#[derive(Clone, Copy, ValueEnum)]
enum BisectEngine {
    /// The instrumented runtime on --backend, --dtype, with --inject faults.
    Runtime,
    /// The reference (candle), with --inject faults.
    Reference,
    /// An external program: --command TEMPLATE (docs/engines.md).
    External,
}

#[derive(Args)]
struct PromptArgs {
    /// A prompt text, tokenized with the model's tokenizer.
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Explicit token ids, e.g. 1,2,3.
    #[arg(long, group = "input")]
    tokens: Option<String>,
    /// A JSONL prompt suite.
    #[arg(long, group = "input")]
    prompts: Option<PathBuf>,
    /// Prompt id: names --prompt/--tokens, or picks one prompt of --prompts.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Args)]
struct BisectArgs {
    /// The model both engines run: a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: PromptArgs,
    /// Engine A, the one under test.
    #[arg(long, value_enum, default_value = "runtime")]
    engine: BisectEngine,
    /// Command template of an external engine A.
    #[arg(long)]
    command: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// A's precision: f32, f16 or bf16 for the runtime; f32 or f64 for the reference.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Runtime A: prompt tokens per prefill step (default: the whole prompt at once).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Fault injected into engine A (see `dump --inject`). Repeatable.
    #[arg(long)]
    inject: Vec<String>,
    /// Engine B, the oracle: the reference, the runtime (--oracle-backend, --oracle-dtype:
    /// e.g. a GPU's f32 path against its f16 path), or an external program
    /// (--oracle-command). Local replay always uses the reference.
    #[arg(long, value_enum, default_value = "reference")]
    oracle: BisectEngine,
    /// Command template of an external oracle B (placeholders as for --command; docs/engines.md).
    #[arg(long)]
    oracle_command: Option<String>,
    /// Runtime oracle B's backend.
    #[arg(long, value_enum, default_value = "cpu")]
    oracle_backend: BackendKind,
    /// Runtime oracle B's storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    oracle_dtype: String,
    /// The reference's precision (oracle and local replay): f32 or f64.
    #[arg(long, default_value = "f32")]
    reference_dtype: String,
    #[command(flatten)]
    compare: CompareArgs,
    /// Probe logits at every position only while one engine's logits stay under this.
    #[arg(long, default_value_t = 64)]
    logits_budget_mib: u64,
    /// Directory for the probe dumps, kept (must be absent or empty; default: a new
    /// temporary one whose probe dumps are removed at the end unless --keep).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the probe dumps of the temporary work directory (the default removes them and
    /// keeps only the small inputs the printed reproduce commands read).
    #[arg(long)]
    keep: bool,
    /// Run A and B one after the other, not at the same time (for engines that cannot
    /// share the device or the memory).
    #[arg(long)]
    sequential: bool,
    /// Positions before the suspect layer's first divergent one at which all its taps are
    /// probed (more catches taps that leave B's long before the residual stream does).
    #[arg(long, default_value_t = 16)]
    tap_window: usize,
    /// Skip local replay: end at the first divergent tap and position.
    #[arg(long)]
    no_replay: bool,
    /// Write bisect.{json,md,html} and report.{json,md,html} here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the bisect report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    Cpu,
    /// NVIDIA GPU 0 (CUDA, NVRTC and cuBLAS loaded at run time).
    Cuda,
    /// AMD GPU 0 (builds with `--features hip`).
    Hip,
}

impl BackendKind {
    fn runtime(self) -> runtime::BackendKind {
        match self {
            Self::Cpu => runtime::BackendKind::Cpu,
            Self::Cuda => runtime::BackendKind::Cuda,
            Self::Hip => runtime::BackendKind::Hip,
        }
    }
}

#[derive(Args)]
struct DumpArgs {
    #[arg(long, value_enum, default_value = "reference")]
    engine: EngineKind,
    /// The model: a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: PromptArgs,
    /// Layers: 0,1,2,4,8 | 0..22 | all
    #[arg(long, default_value = "all")]
    layers: String,
    /// Taps: resid_post,attn_out | all (embed, final_norm, logits too)
    #[arg(long, default_value = "resid_post")]
    taps: String,
    /// Positions: all | last | 0..16,820..840 | -8..
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    positions: String,
    /// Precision: f32 or f64 for the reference; f32, f16 or bf16 storage for the runtime.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Runtime backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Runtime: prompt tokens per prefill step (default: the whole prompt at once).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Runtime: greedy tokens to generate (and process) after the prompt.
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    /// Runtime: synchronize after every op so a device error names the op.
    #[arg(long)]
    sync_check: bool,
    /// Runtime: untimed runs of each prompt first, without taps (benchmarks).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(short, long)]
    output: PathBuf,
    /// Replace an existing dump at the output path.
    #[arg(long)]
    overwrite: bool,
    /// Inject a fault: TAP:scale=V@POS, TAP:offset=V@POS, TAP:nan@POS, TAP:zero@POS,
    /// [blk.L.]rope:shift=N@POS. Repeatable.
    #[arg(long)]
    inject: Vec<String>,
}

/// indicatif bars on stderr; indicatif draws nothing when stderr is not a terminal.
struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn stage(&mut self, label: &str, total: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        // Each stage is a phase: RESBISECT_TRACE=1 shows where a dump's time goes.
        resbisect::trace::mark(|| format!("stage: {label}"));
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} layers {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        self.bar = Some(bar);
    }

    fn tick(&mut self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn cmd_dump(a: DumpArgs) -> Result<()> {
    let model = Model::open(&a.model)?;
    resbisect::trace::mark(|| "model opened".into());
    let selection = Selection::parse(&a.layers, &a.taps, &a.positions, model.config.n_layer)?;
    let records = read_prompts(&model, &a.input)?;
    resbisect::inject::check_reach(
        &a.inject,
        records.iter().map(|r| r.tokens.len()).max().unwrap_or(0) + a.max_tokens,
    )?;
    resbisect::trace::mark(|| format!("{} prompt(s) ready", records.len()));
    let summary = match a.engine {
        EngineKind::Reference => {
            let precision = RefPrecision::parse(&a.dtype)?;
            if a.max_tokens > 0 || a.prefill_chunk.is_some() || a.sync_check || a.warmup > 0 {
                return Err(Error::input(
                    "--max-tokens, --prefill-chunk, --sync-check and --warmup are runtime options (--engine runtime)",
                ));
            }
            reference_engine::dump_reference(
                &model,
                records,
                selection,
                precision,
                &a.inject,
                &a.output,
                a.overwrite,
                &mut Bars { bar: None },
            )?
        }
        EngineKind::Runtime => {
            let dtype = StorageDType::parse(&a.dtype)?;
            let opts = RunOptions {
                prefill_chunk: a.prefill_chunk,
                max_tokens: a.max_tokens,
                sync_check: a.sync_check,
                stop_token: None,
                warmup: a.warmup,
            };
            resbisect::with_backend!(a.backend.runtime(), dtype, |b| runtime::dump_runtime(
                b,
                &model,
                records,
                selection,
                &a.inject,
                &opts,
                &a.output,
                a.overwrite,
                &mut Bars { bar: None }
            )?)
        }
    };
    resbisect::trace::mark(|| {
        format!(
            "dump written (load {:.3} s, compute {:.3} s, waiting for files {:.3} s)",
            summary.load_seconds, summary.compute_seconds, summary.drain_seconds
        )
    });
    eprintln!(
        "wrote {} ({} prompt(s), {} tokens; load {:.2} s, compute {:.4} s of which {:.4} s waiting for files, {:.1} tokens/s)",
        a.output.display(),
        summary.prompts,
        summary.tokens,
        summary.load_seconds,
        summary.compute_seconds,
        summary.drain_seconds,
        summary.tokens as f64 / summary.compute_seconds.max(1e-9)
    );
    Ok(())
}

/// The prompts named by --prompt, --tokens or --prompts (one of them, --id picking from a suite).
fn read_prompts(model: &Model, input: &PromptArgs) -> Result<Vec<resbisect::dump::PromptRecord>> {
    let id = input.id.clone().unwrap_or_else(|| "prompt".into());
    let entries = match (&input.prompt, &input.tokens, &input.prompts) {
        (Some(text), _, _) => vec![(id, Some(text.clone()), PromptSource::Text(text.clone()))],
        (_, Some(list), _) => vec![(id, None, PromptSource::Tokens(prompts::parse_token_list(list)?))],
        (_, _, Some(path)) => {
            let mut all = prompts::read_suite(path)?;
            if let Some(want) = &input.id {
                all.retain(|(i, _, _)| i == want);
                if all.is_empty() {
                    return Err(Error::input(format!("{}: no prompt with id {want:?}", path.display())));
                }
            }
            all
        }
        _ => return Err(Error::input("give one of --prompt, --tokens or --prompts")),
    };
    let needs_tokenizer = entries.iter().any(|(_, _, s)| matches!(s, PromptSource::Text(_)));
    let tokenizer = if needs_tokenizer {
        Some(Tokenizer::from_gguf(&model.gguf)?)
    } else {
        None
    };
    prompts::resolve(entries, tokenizer.as_ref(), model.config.n_vocab, model.config.n_ctx)
}

/// An engine of `bisect` as the trait object the search drives.
/// How bisect builds one side: its kind, and for the runtime its backend and dtype.
#[derive(Clone)]
struct EngineSpec<'a> {
    kind: BisectEngine,
    command: Option<&'a str>,
    backend: BackendKind,
    dtype: &'a str,
    injections: Vec<String>,
}

fn bisect_engine<'m>(
    spec: EngineSpec,
    a: &BisectArgs,
    model: &'m Model,
    reference: Option<&'m ReferenceEngine>,
) -> Result<Box<dyn Engine + 'm>> {
    let EngineSpec {
        kind,
        command,
        backend,
        dtype,
        injections,
    } = spec;
    Ok(match kind {
        BisectEngine::Runtime => {
            resbisect::with_backend!(
                backend.runtime(),
                StorageDType::parse(dtype)?,
                |b| Box::new(RuntimeDriver::new(b, model, &a.model, injections, a.prefill_chunk)?)
                    as Box<dyn Engine + 'm>
            )
        }
        BisectEngine::Reference => Box::new(ReferenceDriver::new(
            model,
            &a.model,
            reference.expect("the reference is loaded when an engine is the reference"),
            injections,
        )?),
        BisectEngine::External => {
            let template = command.ok_or_else(|| {
                Error::input("an external engine needs its command template (--command / --oracle-command)")
            })?;
            Box::new(ExternalEngine::new(template, &a.model, model)?)
        }
    })
}

fn cmd_bisect(a: BisectArgs) -> Result<ExitCode> {
    let model = Model::open(&a.model)?;
    let records = read_prompts(&model, &a.input)?;
    let [prompt] = <[_; 1]>::try_from(records).map_err(|r| {
        Error::input(format!(
            "bisect takes one prompt; the suite has {} (pick one with --id)",
            r.len()
        ))
    })?;
    resbisect::inject::check_reach(&a.inject, prompt.tokens.len())?;
    let same_runtime = matches!(a.engine, BisectEngine::Runtime)
        && a.backend as u8 == a.oracle_backend as u8
        && a.dtype == a.oracle_dtype;
    if a.engine as u8 == a.oracle as u8
        && a.inject.is_empty()
        && (matches!(a.engine, BisectEngine::Reference) || same_runtime)
    {
        eprintln!("note: A and B are the same engine without injected faults");
    }
    if let Some(w) = &a.work {
        bisect::check_work_dir(w)?;
    }
    let precision = RefPrecision::parse(&a.reference_dtype)?;
    if matches!(a.engine, BisectEngine::Reference) && RefPrecision::parse(&a.dtype)? != precision {
        return Err(Error::input(
            "with --engine reference, A computes in --reference-dtype; drop --dtype",
        ));
    }
    let spec_a = EngineSpec {
        kind: a.engine,
        command: a.command.as_deref(),
        backend: a.backend,
        dtype: &a.dtype,
        injections: a.inject.clone(),
    };
    let spec_b = EngineSpec {
        kind: a.oracle,
        command: a.oracle_command.as_deref(),
        backend: a.oracle_backend,
        dtype: &a.oracle_dtype,
        injections: Vec::new(),
    };
    let is_reference = |spec: &EngineSpec| matches!(spec.kind, BisectEngine::Reference);
    // The whole reference loads only when it is an engine; local replay alone loads just
    // the layers it replays, when it gets there. Other engines start (a GPU context, its
    // kernels) at the same time.
    let (reference, started) = std::thread::scope(|scope| {
        let (args, model) = (&a, &model);
        let started = [&spec_a, &spec_b].map(|spec| {
            (!is_reference(spec)).then(|| {
                let spec = spec.clone();
                scope.spawn(move || bisect_engine(spec, args, model, None))
            })
        });
        let reference = (is_reference(&spec_a) || is_reference(&spec_b)).then(|| {
            let mut progress = Bars { bar: None };
            progress.stage("loading the reference", model.config.n_layer);
            ReferenceEngine::load(model, precision, &mut |_| progress.tick())
        });
        (
            reference.transpose(),
            started.map(|job| job.map(|j| j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))),
        )
    });
    let reference = reference?;
    let [started_a, started_b] = started;
    let mut engine_a = match started_a {
        Some(engine) => engine?,
        None => bisect_engine(spec_a, &a, &model, reference.as_ref())?,
    };
    let mut engine_b = match started_b {
        Some(engine) => engine?,
        None => bisect_engine(spec_b, &a, &model, reference.as_ref())?,
    };
    let replayer = match &reference {
        _ if a.no_replay => Replayer::Skip,
        Some(r) => Replayer::Loaded(r),
        None => Replayer::OnDemand {
            model: &model,
            precision,
        },
    };
    let tolerances = match &a.compare.tolerances {
        Some(p) => Tolerances::load(p)?,
        None => Tolerances::default(),
    };
    let work = match &a.work {
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
    let opts = BisectOptions {
        tolerances,
        allow_model_mismatch: a.compare.allow_model_mismatch,
        judge: a.compare.judge.judge(),
        logits_budget: a.logits_budget_mib << 20,
        work,
        sequential: a.sequential,
        tap_window: a.tap_window,
    };
    resbisect::trace::mark(|| "engines ready".into());
    eprintln!(
        "bisecting {} ({} tokens): A = {}, B = {}; probes in {}",
        prompt.id,
        prompt.tokens.len(),
        engine_a.label(),
        engine_b.label(),
        opts.work.display()
    );
    let temporary = a.work.is_none() && !a.keep;
    let r = match bisect::bisect(
        engine_a.as_mut(),
        engine_b.as_mut(),
        replayer,
        prompt,
        &model.config,
        &opts,
    ) {
        Ok(r) => r,
        Err(e) => {
            if temporary {
                let _ = std::fs::remove_dir_all(&opts.work);
            }
            return Err(e);
        }
    };
    if temporary {
        let freed = remove_dumps(&opts.work);
        eprintln!(
            "removed the probe dumps ({:.1} MB); the reproduce commands' inputs stay in {} (--keep keeps the dumps, --work DIR puts them where you say)",
            freed as f64 / 1e6,
            opts.work.display()
        );
    } else {
        eprintln!("probe dumps kept in {}", opts.work.display());
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| Error::input(e.to_string()))?
        );
    } else {
        print!("{}", report::bisect_summary(&r));
    }
    if let Some(dir) = &a.report {
        report::write_bisect(&r, dir)?;
        eprintln!(
            "wrote {}/bisect.{{json,md,html}} and report.{{json,md,html}}",
            dir.display()
        );
    }
    Ok(match r.outcome {
        Outcome::Clean => ExitCode::SUCCESS,
        Outcome::Diverged => ExitCode::from(1),
        Outcome::Crashed => ExitCode::from(3),
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

/// Marks a directory `resbisect demo` may replace.
const DEMO_MARKER: &str = ".resbisect-demo";

fn cmd_demo(model: PathBuf, prompts: PathBuf, output: PathBuf) -> Result<ExitCode> {
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
    let args = BisectArgs {
        model,
        input: PromptArgs {
            prompt: None,
            tokens: None,
            prompts: Some(prompts),
            id: Some("long_1652".into()),
        },
        engine: BisectEngine::Runtime,
        command: None,
        backend: BackendKind::Cpu,
        dtype: "f32".into(),
        prefill_chunk: None,
        inject: vec![fault.into()],
        oracle: BisectEngine::Reference,
        oracle_command: None,
        oracle_backend: BackendKind::Cpu,
        oracle_dtype: "f32".into(),
        reference_dtype: "f32".into(),
        compare: CompareArgs {
            tolerances: None,
            allow_model_mismatch: false,
            judge: JudgeArg::Auto,
        },
        logits_budget_mib: 64,
        work: Some(output.join("probes")),
        keep: true,
        sequential: false,
        tap_window: 16,
        no_replay: false,
        report: Some(output.join("report")),
        json: false,
    };
    let code = cmd_bisect(args)?;
    eprintln!("open {}/report/bisect.html", output.display());
    Ok(code)
}

fn cmd_perf(backend: BackendKind, dtype: &str, preset: &str, ctx: usize, json: bool) -> Result<ExitCode> {
    let dtype = StorageDType::parse(dtype)?;
    let config = resbisect::synth::preset(preset)?.config;
    if ctx == 0 || ctx >= config.n_ctx.max(8192) {
        return Err(Error::input(format!("--ctx must be 1..{}", config.n_ctx.max(8192))));
    }
    let (timings, device) = resbisect::with_backend!(backend.runtime(), dtype, |b| {
        use resbisect::runtime::backend::Backend;
        (runtime::perf::run(&b, &config, ctx)?, b.device())
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&timings).map_err(|e| Error::input(e.to_string()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "op timings of {device}, {} storage, {preset} shapes, context {ctx}",
        dtype.name()
    );
    println!(
        "{:<8} {:<22} {:<34} {:>10} {:>12} {:>8}",
        "phase", "op", "shape", "us", "bytes", "GB/s"
    );
    for t in &timings {
        println!(
            "{:<8} {:<22} {:<34} {:>10.2} {:>12} {:>8.1}",
            t.phase,
            t.op,
            t.shape,
            t.micros,
            t.bytes,
            t.gb_per_s()
        );
    }
    let decode = timings.iter().filter(|t| t.phase == "decode");
    let (layer_us, layer_bytes) = decode.clone().fold((0.0, 0), |(us, by), t| {
        (us + t.micros * t.per_layer as f64, by + t.bytes * t.per_layer)
    });
    let outside_us: f64 = decode.filter(|t| t.per_layer == 0).map(|t| t.micros).sum();
    let step_us = layer_us * config.n_layer as f64 + outside_us;
    println!(
        "decode layer {layer_us:.1} us ({:.1} GB/s over {layer_bytes} bytes); step of {} layers and the head {step_us:.0} us = {:.0} tokens/s",
        layer_bytes as f64 / (layer_us * 1e3),
        config.n_layer,
        1e6 / step_us
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect_model(path: &Path, tensors: bool) -> Result<()> {
    let model = Model::open(path)?;
    let c = &model.config;
    println!("model        {}", path.display());
    println!("fingerprint  {}", model.fingerprint);
    println!(
        "gguf         v{}, {} tensors, {} metadata keys, {} bytes",
        model.gguf.version,
        model.gguf.tensors.len(),
        model.gguf.metadata.len(),
        model.gguf.file_len()
    );
    println!("arch         {} ({} parameters)", c.arch, model.n_params());
    println!("layers       {}", c.n_layer);
    println!(
        "n_embd       {}  heads {} (kv {}, head dim {})",
        c.n_embd,
        c.n_head,
        c.n_head_kv,
        c.head_dim()
    );
    println!("n_ff         {}", c.n_ff);
    println!("vocab        {}  context {}", c.n_vocab, c.n_ctx);
    // The GGUF stores both as f32: printed as f32, 1e-5 reads as 1e-5.
    println!("rope base    {}  rms eps {:e}", c.rope_base as f32, c.rms_eps as f32);
    println!(
        "output       {}",
        if model.tied_output {
            "tied to token_embd"
        } else {
            "output.weight"
        }
    );
    match Tokenizer::from_gguf(&model.gguf) {
        Ok(t) => {
            let id = |t: Option<u32>| t.map_or_else(|| "none".to_string(), |t| t.to_string());
            println!(
                "tokenizer    {} (pre {}), {} tokens, bos {} eos {}, add_bos {}",
                t.kind,
                t.pre,
                t.vocab_size,
                id(t.bos_id),
                id(t.eos_id),
                t.add_bos
            )
        }
        Err(e) => println!("tokenizer    unusable: {e}"),
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in &model.gguf.tensors {
        *counts.entry(gguf::dtype_name(t.dtype)).or_insert(0) += 1;
    }
    println!(
        "types        {}",
        counts
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if tensors {
        for t in &model.gguf.tensors {
            println!("  {:<32} {:<6} {:?}", t.name, gguf::dtype_name(t.dtype), t.dims);
        }
    }
    Ok(())
}

fn inspect_dump(path: &Path) -> Result<()> {
    let dump = Dump::open(path)?;
    let m = &dump.manifest;
    println!("dump         {} (format {} v{})", path.display(), m.format, m.version);
    println!(
        "status       {:?}{}",
        m.status,
        m.error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default()
    );
    println!(
        "engine       {} {} backend {} dtype {} on {}",
        m.engine.name, m.engine.version, m.engine.backend, m.engine.dtype, m.engine.device
    );
    println!(
        "model        {} ({})",
        m.model.path,
        m.model.fingerprint.as_deref().unwrap_or("no fingerprint")
    );
    println!(
        "selection    layers {:?} taps {} positions {}",
        m.selection.layers,
        m.selection.taps.join(","),
        m.selection.positions
    );
    println!("created      {}", m.created);
    for p in &m.prompts {
        println!("prompt {} ({} tokens)", p.id, p.tokens.len());
        let mut stems = dump.files(&p.id)?;
        stems.sort_by_key(|s| {
            Tap::parse(&format!("{s}.attn_norm"))
                .or_else(|| Tap::parse(s))
                .or(if s == "output" { Tap::parse("final_norm") } else { None })
        });
        for stem in stems {
            let Some(file) = dump.map_file(&p.id, &stem)? else {
                continue;
            };
            let mut taps: Vec<(&String, _)> = file.taps.iter().collect();
            taps.sort_by_key(|(id, _)| Tap::parse(id));
            for (id, slice) in taps {
                println!(
                    "  {:<24} {:<5} [{}, {}]",
                    id,
                    slice.dtype.name(),
                    file.positions.len(),
                    slice.width
                );
            }
        }
    }
    Ok(())
}

fn compare(a: &Path, b: &Path, args: &CompareArgs, pairs: &[String]) -> Result<DiffReport> {
    let tolerances = match &args.tolerances {
        Some(p) => Tolerances::load(p)?,
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

/// Exit 3 when a dump's engine failed or never finished, whatever its rows say (a
/// crashed engine never passes a gate); else 1 when a divergence was found (README.md,
/// "Exit codes").
fn verdict(r: &DiffReport) -> ExitCode {
    if let Some(failure) = r.engine_failure() {
        eprintln!("error: {failure}");
        ExitCode::from(3)
    } else if r.diverged {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Diff {
            a,
            b,
            compare: args,
            pair,
            json,
            report: dir,
        } => {
            let r = compare(&a, &b, &args, &pair)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| Error::input(e.to_string()))?
                );
            } else {
                print!("{}", report::terminal_summary(&r));
            }
            if let Some(dir) = dir {
                report::write_all(&r, &dir)?;
            }
            Ok(verdict(&r))
        }
        Command::Calibrate {
            dumps,
            margin,
            floor,
            allow_model_mismatch,
            output,
        } => {
            if dumps.len() % 2 != 0 {
                return Err(Error::input("calibrate takes pairs of dumps: A B [A B ...]"));
            }
            if !(margin.is_finite() && margin >= 1.0 && floor.is_finite() && floor >= 0.0) {
                return Err(Error::input("--margin must be >= 1 and --floor >= 0"));
            }
            let args = CompareArgs {
                tolerances: None,
                allow_model_mismatch,
                judge: JudgeArg::Tolerance,
            };
            let reports = dumps
                .chunks(2)
                .map(|p| compare(&p[0], &p[1], &args, &[]))
                .collect::<Result<Vec<_>>>()?;
            // Known-good pairs only: a failed or unfinished dump is no noise floor.
            if let Some(failure) = reports.iter().find_map(DiffReport::engine_failure) {
                return Err(Error::engine(failure));
            }
            let (t, notes) = diff::calibrate(&reports, margin, floor);
            for n in &notes {
                eprintln!("note: {n}");
            }
            std::fs::write(
                &output,
                serde_json::to_string_pretty(&t).map_err(|e| Error::input(e.to_string()))? + "\n",
            )
            .map_err(|e| Error::io(&output, e))?;
            for o in &t.taps {
                println!("{:<22} rel_l2 <= {:.2e}", o.pattern, o.rel_l2);
            }
            eprintln!("wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            kind:
                ReportKind::Diff {
                    a,
                    b,
                    compare: args,
                    pair,
                    output,
                    history,
                    run,
                },
        } => {
            let r = compare(&a, &b, &args, &pair)?;
            report::write_all(&r, &output)?;
            if let Some(h) = history {
                report::append_history(&h, &report::history_entry(&r, &run))?;
            }
            print!("{}", report::terminal_summary(&r));
            eprintln!("wrote {}/report.{{json,md,html}}", output.display());
            Ok(verdict(&r))
        }
        Command::Report {
            kind: ReportKind::Trend { history, output },
        } => {
            let entries = report::read_history(&history)?;
            let (md, html) = report::trend(&entries)?;
            std::fs::create_dir_all(&output).map_err(|e| Error::io(&output, e))?;
            for (name, text) in [("trend.md", &md), ("trend.html", &html)] {
                let p = output.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            }
            print!("{md}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump(a) => cmd_dump(a).map(|_| ExitCode::SUCCESS),
        Command::Bisect(a) => cmd_bisect(a),
        Command::Selftest {
            backend,
            dtype,
            perf: true,
            preset,
            ctx,
            json,
            ..
        } => cmd_perf(backend, &dtype, &preset, ctx, json),
        Command::Selftest {
            backend,
            dtype,
            seed,
            long,
            json,
            ..
        } => {
            let dtype = StorageDType::parse(&dtype)?;
            let (checks, device) = resbisect::with_backend!(backend.runtime(), dtype, |b| {
                use resbisect::runtime::backend::Backend;
                (runtime::selftest::run(&b, seed, long)?, b.device())
            });
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&checks).map_err(|e| Error::input(e.to_string()))?
                );
            } else {
                println!(
                    "selftest of {device}, {} storage, against the cpu backend (seed {seed})",
                    dtype.name()
                );
                println!(
                    "{:<16} {:<44} {:>10} {:>10} {:>10} {:>6} {:>9}  result",
                    "op", "shape", "nmse", "threshold", "max_abs", "guard", "ms"
                );
                for c in &checks {
                    println!(
                        "{:<16} {:<44} {:>10.2e} {:>10.0e} {:>10.2e} {:>6} {:>9.3}  {}",
                        c.op,
                        c.shape,
                        c.nmse,
                        c.threshold,
                        c.max_abs,
                        if c.guard_ok { "ok" } else { "HIT" },
                        c.seconds * 1e3,
                        if c.passed { "pass" } else { "FAIL" }
                    );
                }
            }
            let failed = checks.iter().filter(|c| !c.passed).count();
            eprintln!("{} checks, {failed} failed", checks.len());
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Demo { model, prompts, output } => cmd_demo(model, prompts, output),
        Command::Run {
            model,
            prompt,
            tokens,
            max_tokens,
            backend,
            dtype,
            prefill_chunk,
            ignore_eos,
            warmup,
        } => {
            let model = Model::open(&model)?;
            let tokenizer = Tokenizer::from_gguf(&model.gguf)?;
            let source = match (prompt, tokens) {
                (Some(text), _) => PromptSource::Text(text),
                (None, Some(list)) => PromptSource::Tokens(prompts::parse_token_list(&list)?),
                (None, None) => return Err(Error::input("give --prompt or --tokens")),
            };
            let records = prompts::resolve(
                vec![("run".into(), None, source)],
                Some(&tokenizer),
                model.config.n_vocab,
                model.config.n_ctx,
            )?;
            let opts = RunOptions {
                prefill_chunk,
                max_tokens,
                sync_check: false,
                stop_token: if ignore_eos { None } else { tokenizer.eos_id },
                warmup,
            };
            let record = records.into_iter().next().expect("one prompt");
            let g = resbisect::with_backend!(backend.runtime(), StorageDType::parse(&dtype)?, |b| runtime::generate(
                b,
                &model,
                record,
                &opts,
                &mut Bars { bar: None }
            )?);
            println!("{}", tokenizer.decode(&g.tokens)?);
            eprintln!(
                "prefill {} tokens in {:.4} s ({:.1} tokens/s); decode {} tokens in {:.4} s ({:.1} tokens/s)",
                g.prompt_len,
                g.prefill_seconds,
                g.prompt_len as f64 / g.prefill_seconds.max(1e-9),
                g.tokens.len() - g.prompt_len,
                g.decode_seconds,
                (g.tokens.len() - g.prompt_len) as f64 / g.decode_seconds.max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, tensors } => {
            if path.is_dir() {
                inspect_dump(&path)?
            } else {
                inspect_model(&path, tensors)?
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokenize {
            model,
            json,
            decode,
            text,
        } => {
            let gguf = gguf::GgufFile::open(&model)?;
            let tokenizer = Tokenizer::from_gguf(&gguf)?;
            if decode {
                let ids = prompts::parse_token_list(&text)?;
                if let Some(&t) = ids.iter().find(|&&t| t as usize >= tokenizer.vocab_size) {
                    return Err(Error::input(format!(
                        "token id {t} is outside the vocabulary (size {})",
                        tokenizer.vocab_size
                    )));
                }
                println!("{}", tokenizer.decode(&ids)?);
                return Ok(ExitCode::SUCCESS);
            }
            let ids = tokenizer.encode(&text)?;
            if json {
                println!("{}", serde_json::to_string(&ids).expect("ids serialize"));
            } else {
                println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cut { model, layers, output } => {
            resbisect::cut::cut(&model, layers, &output)?;
            let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "wrote {} (the first {layers} layers of {}, {:.1} MiB)",
                output.display(),
                model.display(),
                bytes as f64 / (1 << 20) as f64
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth {
            preset,
            quant,
            seed,
            tokenizer,
            output,
        } => {
            let mut preset = synth::preset(&preset)?;
            if let Some(kind) = tokenizer {
                preset.tokenizer = synth::TokenizerKind::parse(&kind)?;
            }
            synth::write_model(&preset, synth::parse_quant(&quant)?, seed, &output)?;
            eprintln!(
                "wrote {} ({} preset, {quant}, seed {seed})",
                output.display(),
                preset.name
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`resbisect inspect D | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    resbisect::trace::init();
    let cli = Cli::parse();
    let outcome = run(cli);
    resbisect::trace::mark(|| "done; exiting".into());
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                Error::Input(_) => 2,
                Error::Engine(_) => 3,
            })
        }
    }
}
