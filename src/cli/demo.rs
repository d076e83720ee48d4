//! `resbisect demo`: fixed scenarios, each an injected fault in the runtime (`cpu`
//! backend, f32) bisected against the reference on a real model — SmolLM2 with a RoPE
//! position fault (the README's), Gemma 3 with a sliding window one position too wide.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use resbisect::diff::Judge;
use resbisect::engine::{EngineKind, EngineSpec, RefPrecision};
use resbisect::prompts::{read_suite, Input, PromptSource};
use resbisect::runtime::backend::StorageDType;
use resbisect::runtime::{BackendKind, RunOptions};
use resbisect::{Error, Result};

use super::args::DemoArgs;
use super::bisect::{run, BisectRun};
use super::shown;

/// Marks a directory `resbisect demo` may replace.
const DEMO_MARKER: &str = ".resbisect-demo";

/// One demo: the model, its prompt, the runtime's fault and what bisect should find.
struct Scenario {
    model: PathBuf,
    input: Input,
    fault: &'static str,
    /// Two lines: the fault, and the finding bisect should print.
    story: [String; 2],
}

const SMOLLM2: &str = "fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "fixtures/models/gemma-3-270m-q4_k_m.gguf";

/// `--model smollm2` (or a path: a SmolLM2-shaped model for the same fault) or `gemma`.
fn scenario(model: &str, prompts: &Path) -> Result<Scenario> {
    if model != "gemma" {
        // Read now, so that a bad suite is refused before the demo's banner.
        if !read_suite(prompts)
            .map_err(|e| e.for_option("--prompts", prompts))?
            .iter()
            .any(|(id, _, _)| id == "long_1652")
        {
            return Err(Error::input(format!("{}: no prompt \"long_1652\"", prompts.display())));
        }
        let fault = "blk.11.rope:shift=3@827";
        return Ok(Scenario {
            model: if model == "smollm2" {
                fixture(SMOLLM2)
            } else {
                PathBuf::from(model)
            },
            input: Input::Suite {
                path: prompts.to_path_buf(),
                only: Some("long_1652".into()),
            },
            fault,
            story: [
                format!("an injected RoPE fault in layer 11 from position 827 ({fault})"),
                "bisect should name blk.11.q at position 827 and attribute it to layer 11".into(),
            ],
        });
    }
    // Layer 7 is windowed (every 6th layer is global) with a 512-position window; one more
    // lets the query at position 512 see position 0, so nothing differs before 512.
    let fault = "blk.7.window:shift=1@0";
    Ok(Scenario {
        model: fixture(GEMMA),
        input: suite_text(prompts, "long_826")?,
        fault,
        story: [
            format!("a sliding window of 513 instead of 512 positions in layer 7 ({fault})"),
            "bisect should name blk.7.attn at position 512 (the window's edge) and attribute it to layer 7".into(),
        ],
    })
}

/// A fixture under the working directory, else under the source tree this binary was
/// built from: the demo then runs from any directory of the machine that built it.
fn fixture(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if path.is_relative() && !path.exists() && built.exists() {
        built
    } else {
        path.to_path_buf()
    }
}

/// The text of prompt `id` of a suite, to be tokenized by the model's own tokenizer (the
/// suite's stored token ids are SmolLM2's).
fn suite_text(path: &Path, id: &str) -> Result<Input> {
    let text = read_suite(path)?
        .into_iter()
        .find(|(i, _, _)| i == id)
        .and_then(|(_, text, source)| match source {
            PromptSource::Text(t) => Some(t),
            PromptSource::Tokens(_) => text,
        })
        .ok_or_else(|| Error::input(format!("{}: no prompt {id:?} with text", path.display())))?;
    Ok(Input::Text { id: id.into(), text })
}

/// What a demo writes in its directory, besides the marker.
const DEMO_OUTPUTS: [&str; 2] = ["probes", "report"];

/// An empty directory for the demo: a new one, or an earlier demo's (one carrying the
/// marker) with its outputs removed. Anything else in it is refused, never deleted.
fn fresh_output(output: &Path) -> Result<()> {
    if output.exists() {
        if !output.join(DEMO_MARKER).exists() {
            return Err(Error::input(format!(
                "{} exists and is not an earlier demo; pick another --output",
                output.display()
            )));
        }
        let entries = std::fs::read_dir(output).map_err(|e| Error::io(output, e))?;
        for entry in entries {
            let name = entry.map_err(|e| Error::io(output, e))?.file_name();
            let ours = name == DEMO_MARKER || DEMO_OUTPUTS.iter().any(|o| name == *o);
            if !ours {
                return Err(Error::input(format!(
                    "{} holds {:?}, which an earlier demo did not write: move it, or pick another --output",
                    output.display(),
                    name
                )));
            }
        }
        for dir in DEMO_OUTPUTS.map(|o| output.join(o)) {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    std::fs::write(output.join(DEMO_MARKER), "").map_err(|e| Error::io(output, e))
}

/// Run the scenario `--model` names: the faulty runtime bisected against the reference.
pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let DemoArgs { model, prompts, output } = a;
    let prompts = fixture(prompts);
    let s = scenario(&model, &prompts)?;
    if !s.model.exists() {
        let cwd = std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string());
        return Err(Error::input(match model.as_str() {
            "smollm2" | "gemma" => format!(
                "{} is missing (looked under {cwd} and under {}): run ./scripts/fetch-models.sh in the \
                 repository, or name a model file and a prompt suite with --model PATH --prompts PATH",
                s.model.display(),
                env!("CARGO_MANIFEST_DIR")
            ),
            _ => format!("--model {model}: no such file (smollm2, gemma, or the path of a SmolLM2-shaped GGUF)"),
        }));
    }
    // Opened now, so that a file that is no model is refused before the banner.
    resbisect::model::Model::open(&s.model).map_err(|e| e.for_option("--model", &s.model))?;
    fresh_output(&output)?;
    eprintln!("demo: the runtime (cpu backend, f32) carries {};", s.story[0]);
    eprintln!("      {}.\n", s.story[1]);
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
        model: s.model,
        input: s.input,
        engines: (
            engine(runtime, vec![s.fault.into()]),
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
    eprintln!("open {}/report/bisect.html", shown(&output));
    Ok(code)
}
