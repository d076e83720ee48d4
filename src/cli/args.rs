//! The command line's schema (clap) and the diff judge it names; `specs.rs` turns
//! arguments into engines and inputs.

use std::path::PathBuf;

use clap::builder::{EnumValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

use super::values::{self, at_least_one, engine_timeout, run_name, whole_number};

use resbisect::diff::Judge;
use resbisect::runtime::BackendKind;

#[derive(Parser)]
#[command(
    name = "resbisect",
    version,
    about = "Which tensor diverges first, where, and by how much?"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run an engine on prompts and write its taps as a dump (format v1).
    Dump(DumpArgs),
    /// Generate greedily with the runtime (no taps) and print the text and tokens/s.
    Run(RunArgs),
    /// Describe a GGUF model or a dump directory.
    Inspect(InspectArgs),
    /// Write the manifest `model` object (path, fingerprint, config) that bisect hands an
    /// external engine as {model_info}, to run that engine by hand.
    ModelInfo(ModelInfoArgs),
    /// Print the token ids of a text with the model's own tokenizer.
    Tokenize(TokenizeArgs),
    /// Compare dump A (engine under test) with dump B (reference): first divergence.
    Diff(DiffArgs),
    /// Measure the noise floor of known-good dump pairs (A B [A B ...]) and write a
    /// tolerance file for --tolerances.
    Calibrate(CalibrateArgs),
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
    Demo(DemoArgs),
    /// Check every op of a backend against the `cpu` backend on many shapes (NMSE per op,
    /// NaN/Inf, guard regions); exit 1 on any failure.
    Selftest(SelftestArgs),
    /// Write a model's first N layers as a model of its own (real weights, smaller file).
    Cut(CutArgs),
    /// Write a synthetic model (llama, qwen2, qwen3, gemma3) with random weights at real shapes.
    Synth(SynthArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The model: a GGUF file.
    #[arg(long, value_parser = values::model_to_read())]
    pub model: PathBuf,
    /// Prompt text, tokenized with the model's tokenizer.
    #[arg(long, conflicts_with = "tokens")]
    pub prompt: Option<String>,
    /// Explicit token ids instead of a text.
    #[arg(long)]
    pub tokens: Option<String>,
    /// Greedy tokens to generate after the prompt (fewer at end-of-sequence, unless --ignore-eos).
    #[arg(long, default_value_t = 32, value_parser = whole_number::<usize>(0))]
    pub max_tokens: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Prompt tokens per prefill step (default: the whole prompt at once).
    #[arg(long, value_parser = at_least_one())]
    pub prefill_chunk: Option<usize>,
    /// Generate all --max-tokens tokens even past end-of-sequence (benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Untimed runs first (benchmarks: excludes lazy kernel loading and the like).
    #[arg(long, default_value_t = 0, value_parser = whole_number::<usize>(0))]
    pub warmup: usize,
    /// Quantized weights: native (kept in GGUF blocks, read by fused kernels) or dequant
    /// (dequantized to the storage dtype at load); bisect one against the other to tell a
    /// quantized-kernel bug from the rest.
    #[arg(long, default_value = "native")]
    pub weights: String,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .gguf file or a dump directory.
    pub path: PathBuf,
    /// List every tensor of a model.
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Args)]
pub struct ModelInfoArgs {
    /// The model (GGUF).
    #[arg(value_parser = values::model_to_read())]
    pub model: PathBuf,
    /// Write the JSON here instead of to stdout. An existing file is replaced only when
    /// it is a model-info file.
    #[arg(short, long, visible_alias = "output", value_parser = values::file_to_write())]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// The model (GGUF) whose tokenizer to use.
    #[arg(long, value_parser = values::model_to_read())]
    pub model: PathBuf,
    /// Print one JSON array instead of comma-separated ids.
    #[arg(long)]
    pub json: bool,
    /// Decode: the argument is comma-separated ids, the output their text.
    #[arg(long)]
    pub decode: bool,
    /// The text to tokenize (with --decode: the ids, `1,2,3`).
    pub text: String,
}

#[derive(Args)]
pub struct DiffArgs {
    /// Dump of the engine under test.
    #[arg(value_parser = values::dump_to_read())]
    pub a: PathBuf,
    /// Dump of the reference (the oracle).
    #[arg(value_parser = values::dump_to_read())]
    pub b: PathBuf,
    #[command(flatten)]
    pub compare: CompareArgs,
    /// Compare prompt A_ID of A with prompt B_ID of B (dumps whose prompt ids differ).
    /// Repeatable.
    #[arg(long, value_name = "A_ID=B_ID")]
    pub pair: Vec<String>,
    /// Print the full report as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Also write report.json, report.md and report.html into this directory (created;
    /// may hold only report files, which it replaces).
    #[arg(long, value_parser = values::dir_to_write())]
    pub report: Option<PathBuf>,
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// Known-good dump pairs: A (engine) then B (reference), repeated.
    #[arg(required = true, num_args = 2.., value_name = "DUMP", value_parser = values::dump_to_read())]
    pub dumps: Vec<PathBuf>,
    /// Each tap's (per layer) tolerance is this quantile of its rows' rel L2 over
    /// positions, times --margin.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.99)]
    pub quantile: f64,
    /// Multiply each tap's measured quantile by this. 8 because a p99 sits below the
    /// largest healthy rows and rows grow with position: SmolLM2's f32 runtime at position
    /// 1652 of long_1652 measured 4.05× the p99 calibrated on long_826.
    #[arg(long, allow_hyphen_values = true, default_value_t = 8.0)]
    pub margin: f64,
    /// Never tolerate less than this rel L2.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1e-7)]
    pub floor: f64,
    /// Every calibrated tap's abs: rows whose largest difference stays under it never diverge.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1e-6)]
    pub abs_floor: f64,
    /// Calibrate on pairs whose dumps come from different model files.
    #[arg(long)]
    pub allow_model_mismatch: bool,
    /// The tolerance file to write (JSON; read it back with --tolerances). An existing
    /// file is replaced only when it is a tolerance file.
    #[arg(short, long, value_parser = values::file_to_write())]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct DemoArgs {
    /// `smollm2` (a RoPE fault), `gemma` (a sliding-window fault on Gemma 3 270M), or the
    /// path of a SmolLM2-shaped GGUF for the RoPE fault.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// The prompt suite the demo's prompt comes from: `long_1652` (SmolLM2), the text of
    /// `long_826` (gemma).
    #[arg(long, default_value = "fixtures/prompts/long.jsonl", value_parser = values::file_to_read())]
    pub prompts: PathBuf,
    /// Where the probes and the report go (replaced when it holds an earlier demo).
    #[arg(short, long, default_value = "resbisect-demo", value_parser = values::dir_to_write())]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the random inputs every check runs on (not with --perf).
    #[arg(long, default_value_t = 0, value_parser = whole_number::<u64>(0), conflicts_with = "perf")]
    pub seed: u64,
    /// Also attention over 8192 positions (not with --perf).
    #[arg(long, conflicts_with = "perf")]
    pub long: bool,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead of checking, time each op at a preset's decode and prefill shapes.
    #[arg(long)]
    pub perf: bool,
    /// Model shape for --perf: any `synth --preset` (tiny, smollm2-135m, tinyllama-1.1b, ...).
    #[arg(long, default_value = "tinyllama-1.1b", requires = "perf", value_parser = values::synth_preset)]
    pub preset: String,
    /// Cached positions at decode and rows at prefill for --perf.
    #[arg(long, default_value_t = 512, value_parser = whole_number::<usize>(0), requires = "perf")]
    pub ctx: usize,
}

#[derive(Args)]
pub struct CutArgs {
    /// The model to cut: a GGUF file.
    #[arg(long, value_parser = values::model_to_read())]
    pub model: PathBuf,
    /// Layers to keep (the first N).
    #[arg(long, value_parser = whole_number::<usize>(0))]
    pub layers: usize,
    /// The GGUF file to write.
    #[arg(short, long, value_parser = values::file_to_write())]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct SynthArgs {
    // Help built from the preset table itself, so it lists exactly the names `synth` accepts.
    #[arg(long, value_parser = values::synth_preset, help = format!("The model's architecture and shapes: {}", resbisect::synth::PRESET_NAMES.join(", ")))]
    pub preset: String,
    // The list `resbisect::synth::parse_quant` accepts (and its error repeats): keep in step.
    /// GGUF type of the weight matrices: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
    /// q3_k, q4_k, q5_k or q6_k (any case).
    #[arg(long, default_value = "q8_0", value_parser = values::synth_quant)]
    pub quant: String,
    /// Seed of the random weights (the same seed writes the same file).
    #[arg(long, default_value_t = 0, value_parser = whole_number::<u64>(0))]
    pub seed: u64,
    /// Tokenizer section: gpt2 (byte-level BPE) or llama (SentencePiece); default per preset.
    #[arg(long, value_parser = values::synth_tokenizer)]
    pub tokenizer: Option<String>,
    /// The GGUF file to write.
    #[arg(short, long, value_parser = values::file_to_write())]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct CompareArgs {
    /// Tolerance file (from `resbisect calibrate`).
    #[arg(long, value_parser = values::file_to_read())]
    pub tolerances: Option<PathBuf>,
    /// Compare dumps from different model files.
    #[arg(long)]
    pub allow_model_mismatch: bool,
    /// What rows are judged against: `auto` uses each tap's tolerance unless an error
    /// sits systematically over the noise floor before the first tap over tolerance
    /// (then the floor, from there on); `tolerance` or `floor` force one.
    #[arg(long, value_enum, default_value_t = JudgeArg::Auto)]
    pub judge: JudgeArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum JudgeArg {
    Auto,
    Tolerance,
    Floor,
}

impl JudgeArg {
    pub fn judge(self) -> Judge {
        match self {
            JudgeArg::Auto => Judge::Auto,
            JudgeArg::Tolerance => Judge::Tolerance,
            JudgeArg::Floor => Judge::NoiseFloor,
        }
    }
}

#[derive(Subcommand)]
pub enum ReportKind {
    /// Diff A against B and write report.json, report.md, report.html.
    Diff {
        /// Dump of the engine under test.
        #[arg(value_parser = values::dump_to_read())]
        a: PathBuf,
        /// Dump of the reference (the oracle).
        #[arg(value_parser = values::dump_to_read())]
        b: PathBuf,
        #[command(flatten)]
        compare: CompareArgs,
        /// Compare prompt A_ID of A with prompt B_ID of B. Repeatable.
        #[arg(long, value_name = "A_ID=B_ID")]
        pair: Vec<String>,
        /// Directory for report.json, report.md and report.html (created; may hold only
        /// report files, which it replaces).
        #[arg(short, long, value_parser = values::dir_to_write())]
        output: PathBuf,
        /// Append this run's verdicts to a nightly history (JSONL).
        #[arg(long, value_parser = values::file_to_write())]
        history: Option<PathBuf>,
        /// Name of the run in the history, unique in it (default: the date and time).
        #[arg(long, requires = "history", value_parser = run_name)]
        run: Option<String>,
    },
    /// Turn a nightly history into trend.md and trend.html.
    Trend {
        /// The nightly history (JSONL) that `report diff --history` appends to.
        #[arg(value_parser = values::file_to_read())]
        history: PathBuf,
        /// Directory for trend.md and trend.html (created; may hold only report files).
        #[arg(short, long, value_parser = values::dir_to_write())]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DumpEngine {
    /// The oracle (candle, f32 or f64).
    Reference,
    /// The instrumented runtime (device under test) on --backend.
    Runtime,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BisectEngine {
    /// The instrumented runtime on --backend, --dtype, --weights, with --inject faults.
    Runtime,
    /// The reference (candle) in --reference-dtype, with --inject faults.
    Reference,
    /// An external program: --command TEMPLATE (docs/engines.md); its faults are its own options.
    External,
}

/// `--oracle`'s values: the names of [`BisectEngine`], parsed to it, described with B's own
/// options.
#[derive(Clone, Copy, ValueEnum)]
pub enum OracleEngine {
    /// The instrumented runtime on --oracle-backend, --oracle-dtype, --oracle-weights (never
    /// --inject faults).
    Runtime,
    /// The reference (candle) in --reference-dtype, imitating --profile (never --inject faults).
    Reference,
    /// An external program: --oracle-command TEMPLATE (docs/engines.md).
    External,
}

impl From<OracleEngine> for BisectEngine {
    fn from(e: OracleEngine) -> Self {
        match e {
            OracleEngine::Runtime => BisectEngine::Runtime,
            OracleEngine::Reference => BisectEngine::Reference,
            OracleEngine::External => BisectEngine::External,
        }
    }
}

#[derive(Args)]
pub struct PromptArgs {
    /// A prompt text, tokenized with the model's tokenizer.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// Explicit token ids, e.g. 1,2,3.
    #[arg(long, group = "input")]
    pub tokens: Option<String>,
    /// A JSONL prompt suite.
    #[arg(long, group = "input", value_parser = values::file_to_read())]
    pub prompts: Option<PathBuf>,
    /// Prompt id: names --prompt/--tokens, or picks one prompt of --prompts.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Args)]
pub struct BisectArgs {
    /// The model both engines run: a GGUF file.
    #[arg(long, value_parser = values::model_to_read())]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Engine A, the one under test.
    #[arg(long, value_enum, default_value = "runtime")]
    pub engine: BisectEngine,
    /// Command template of an external engine A.
    #[arg(long)]
    pub command: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Runtime A's storage dtype: f32, f16 or bf16 (a reference A computes in --reference-dtype).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Runtime A: prompt tokens per prefill step (default: the whole prompt at once); a
    /// runtime oracle B takes --oracle-prefill-chunk, so a chunked A can be bisected
    /// against a whole-prompt B.
    #[arg(long, value_parser = at_least_one())]
    pub prefill_chunk: Option<usize>,
    /// Fault injected into engine A, never into B: a runtime or reference A, forms as for
    /// `dump --inject`. Repeatable.
    #[arg(long)]
    pub inject: Vec<String>,
    /// Runtime A: quantized weights native (kept in GGUF blocks, read by fused kernels) or dequant
    /// (dequantized to the storage dtype at load); bisect one against the other to tell a
    /// quantized-kernel bug from the rest.
    #[arg(long, default_value = "native")]
    pub weights: String,
    /// Engine B, the oracle: the reference, the runtime (--oracle-backend, --oracle-dtype,
    /// --oracle-weights: e.g. a GPU's f32 path against its f16 path), or an external program
    /// (--oracle-command). --inject faults never apply to B. Local replay always uses the
    /// reference.
    #[arg(
        long,
        value_parser = EnumValueParser::<OracleEngine>::new().map(BisectEngine::from),
        default_value = "reference"
    )]
    pub oracle: BisectEngine,
    /// Command template of an external oracle B (placeholders as for --command; docs/engines.md).
    #[arg(long)]
    pub oracle_command: Option<String>,
    /// Longest one run of an external engine (A or B) may take, e.g. 90s or 10m: past it the
    /// engine and every process it started are killed and the engine counts as crashed
    /// (exit 3, its partial dump kept). Default: no limit.
    #[arg(long, allow_hyphen_values = true, value_parser = engine_timeout)]
    pub engine_timeout: Option<std::time::Duration>,
    /// Runtime oracle B's backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub oracle_backend: BackendKind,
    /// Runtime oracle B's storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub oracle_dtype: String,
    /// Runtime oracle B's quantized weights: native or dequant (see --weights).
    #[arg(long, default_value = "native")]
    pub oracle_weights: String,
    /// Runtime oracle B: prompt tokens per prefill step (default: the whole prompt at once).
    #[arg(long, value_parser = at_least_one())]
    pub oracle_prefill_chunk: Option<usize>,
    /// The reference's precision (oracle and local replay): f32 or f64.
    #[arg(long, default_value = "f32")]
    pub reference_dtype: String,
    /// The engine numerics the reference imitates (oracle and local replay): exact,
    /// llamacpp-cpu or llamacpp-cuda (docs/profiles.md).
    #[arg(long, default_value = "exact")]
    pub profile: String,
    #[command(flatten)]
    pub compare: CompareArgs,
    /// Probe logits at every position only while one engine's logits stay under this.
    #[arg(long, default_value_t = 64, value_parser = whole_number::<u64>(0))]
    pub logits_budget_mib: u64,
    /// Directory for the probe dumps, kept (must be absent or empty; default: a new
    /// temporary one whose probe dumps are removed at the end unless --keep).
    #[arg(long, value_parser = values::dir_to_write())]
    pub work: Option<PathBuf>,
    /// Keep the probe dumps of the temporary work directory (the default removes them and
    /// keeps only the small inputs the printed reproduce commands read).
    #[arg(long)]
    pub keep: bool,
    /// Run A and B one after the other, not at the same time (for engines that cannot
    /// share the device or the memory).
    #[arg(long)]
    pub sequential: bool,
    /// Positions before the suspect layer's first divergent one at which all its taps are
    /// probed (more catches taps that leave B's long before the residual stream does).
    #[arg(long, default_value_t = 16, value_parser = whole_number::<usize>(0))]
    pub tap_window: usize,
    /// Skip local replay: end at the first divergent tap and position.
    #[arg(long)]
    pub no_replay: bool,
    /// Write bisect.{json,md,html} and report.{json,md,html} here (created; may hold
    /// only report files, which it replaces).
    #[arg(long, value_parser = values::dir_to_write())]
    pub report: Option<PathBuf>,
    /// Print the bisect report as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DumpArgs {
    #[arg(long, value_enum, default_value = "reference")]
    pub engine: DumpEngine,
    /// The model: a GGUF file.
    #[arg(long, value_parser = values::model_to_read())]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Layers: 0,1,2,4,8 | 0..22 (end exclusive: layers 0 to 21) | 3.. | all
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Taps: resid_post,attn_out | all (embed, final_norm, logits too)
    #[arg(long, default_value = "resid_post")]
    pub taps: String,
    /// Positions: all | last | 0..16,820..840 (end exclusive: 0 to 15, 820 to 839) | -8.. (the last 8)
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub positions: String,
    /// Precision: f32 or f64 for the reference; f32, f16 or bf16 storage for the runtime.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Reference: the engine numerics it imitates, exact, llamacpp-cpu or llamacpp-cuda
    /// (docs/profiles.md).
    #[arg(long, default_value = "exact")]
    pub profile: String,
    /// Reference: the profile's twin, with projections and attention in f64; its
    /// distance to the plain reference is the profile's noise floor (docs/profiles.md).
    #[arg(long)]
    pub twin: bool,
    /// Runtime backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Runtime: prompt tokens per prefill step (default: the whole prompt at once).
    #[arg(long, value_parser = at_least_one())]
    pub prefill_chunk: Option<usize>,
    /// Runtime: greedy tokens to generate (and process) after the prompt, all of them even
    /// past end-of-sequence, so that two engines' dumps cover the same positions.
    #[arg(long, default_value_t = 0, value_parser = whole_number::<usize>(0))]
    pub max_tokens: usize,
    /// Runtime: synchronize after every op so a device error names the op.
    #[arg(long)]
    pub sync_check: bool,
    /// Runtime: untimed runs of each prompt first, without taps (benchmarks).
    #[arg(long, default_value_t = 0, value_parser = whole_number::<usize>(0))]
    pub warmup: usize,
    /// Runtime: quantized weights native (kept in GGUF blocks, read by fused kernels) or dequant
    /// (dequantized to the storage dtype at load); bisect one against the other to tell a
    /// quantized-kernel bug from the rest.
    #[arg(long, default_value = "native")]
    pub weights: String,
    #[arg(short, long, value_parser = values::dir_to_write())]
    pub output: PathBuf,
    /// Replace an existing dump at the output path.
    #[arg(long)]
    pub overwrite: bool,
    /// Inject a fault (repeatable): TAP:scale=V|offset=V|nan|zero|oob@POS,
    /// [blk.L.]rope:shift=N|scale=F|bf16@POS, [blk.L.]window:shift=N|global@0, norm:eps=E@POS
    /// or QUANT:swap_nibbles@0.
    ///
    /// TAP:scale=V, offset=V, nan and zero perturb the rows of a tap (blk.5.attn_out, embed,
    /// or an alias) at positions >= POS; TAP:oob (runtime only) makes the op at that tap fail
    /// with a real out-of-bounds request once the run reaches POS. [blk.L.]rope (layer L, or
    /// every layer without blk.L.) rotates queries and keys at positions >= POS as if they
    /// sat N positions later (shift=N, N a non-zero integer), at position x F (scale=F, F > 0
    /// and not 1), or with angles formed in bf16 (bf16, reference only). [blk.L.]window
    /// (runtime only) makes windowed layers attend over window + N positions (shift=N) or
    /// over all of them (global). norm:eps=E (reference only, at most one) computes every
    /// RMSNorm from POS on with epsilon E. QUANT:swap_nibbles (runtime only; QUANT one of
    /// q4_0, q4_1, q4_k, q5_k, q6_k) reads every weight block of that type with the nibbles
    /// of each byte swapped. A POS that no processed row reaches is refused.
    #[arg(long)]
    pub inject: Vec<String>,
}
