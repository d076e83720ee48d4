//! Engines that bisect can drive: the built-in reference, the built-in runtime on any
//! backend, and external programs given as a command template (docs/engines.md). Each
//! writes one dump (format v1) per call; weights of built-in engines load once.

use std::path::{Path, PathBuf};
use std::process::Command;

use resbisect_taps::Faults;

use crate::dump::{Dump, PromptRecord, RunError, Status};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::Model;
use crate::reference_engine::{Checkpoints, NoProgress, ReferenceEngine};
use crate::runtime::backend::Backend;
use crate::runtime::{RunOptions, Runtime};
use crate::taps::Selection;

pub trait Engine: Send {
    /// Who this is, for reports: name, backend, dtype, injected faults.
    fn label(&self) -> String;
    /// Dump `prompt` with `selection` into the new directory `out`. An engine failure is
    /// an [`Error::Engine`] and leaves whatever dump the engine wrote.
    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()>;
    /// A shell command that writes the same dump as the earlier call `dump(.., written)`
    /// into `out`; the prompt `prompt_id` is also at `suite` as a one-line JSONL suite.
    fn reproduce(&self, prompt_id: &str, suite: &Path, selection: &Selection, written: &Path, out: &Path) -> String;
}

/// How printed commands invoke resbisect: this binary's own path, so that they run as
/// printed whether or not `resbisect` is on PATH (after `cargo run`, for one).
pub fn resbisect_command() -> String {
    match std::env::current_exe() {
        Ok(exe) => shell_quote(&exe.to_string_lossy()),
        Err(_) => "resbisect".to_string(),
    }
}

/// Quote one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./,:=@+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `--layers` syntax for a selection's layer list.
pub fn layers_arg(layers: &[usize]) -> String {
    if layers.is_empty() {
        "none".into()
    } else {
        layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The `resbisect dump` arguments for a selection and a one-prompt suite.
fn dump_args(model: &Path, suite: &Path, selection: &Selection, out: &Path) -> String {
    format!(
        "--model {} --prompts {} --layers {} --taps {} --positions {} -o {}",
        shell_quote(&model.display().to_string()),
        shell_quote(&suite.display().to_string()),
        layers_arg(&selection.layers),
        shell_quote(&selection.taps.join(",")),
        shell_quote(selection.positions.as_str()),
        shell_quote(&out.display().to_string())
    )
}

fn inject_args(injections: &[String]) -> String {
    injections
        .iter()
        .map(|i| format!(" --inject {}", shell_quote(i)))
        .collect()
}

/// The built-in reference (candle, f32 or f64), optionally with injected faults. It
/// borrows loaded weights, so local replay can share them.
pub struct ReferenceDriver<'r> {
    model: &'r Model,
    model_path: PathBuf,
    engine: &'r ReferenceEngine,
    injections: Vec<String>,
    faults: Faults,
    /// Checkpoints of the last full run: probes of a prefix resume from them.
    checkpoints: Option<Checkpoints>,
}

impl<'r> ReferenceDriver<'r> {
    pub fn new(
        model: &'r Model,
        model_path: &Path,
        engine: &'r ReferenceEngine,
        injections: Vec<String>,
    ) -> Result<Self> {
        let faults = crate::inject::parse_all(&injections, model.config.n_layer)?;
        Ok(Self {
            model,
            model_path: model_path.to_path_buf(),
            engine,
            injections,
            faults,
            checkpoints: None,
        })
    }
}

impl Engine for ReferenceDriver<'_> {
    fn label(&self) -> String {
        format!(
            "reference {}{}",
            self.engine.precision().name(),
            injected(&self.injections)
        )
    }

    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()> {
        self.engine.dump(
            self.model,
            vec![prompt.clone()],
            selection,
            &self.faults,
            &self.injections,
            out,
            false,
            &mut NoProgress,
            Some(&mut self.checkpoints),
        )?;
        Ok(())
    }

    fn reproduce(&self, _prompt_id: &str, suite: &Path, selection: &Selection, _written: &Path, out: &Path) -> String {
        format!(
            "{} dump --engine reference --dtype {} {}{}",
            resbisect_command(),
            self.engine.precision().name(),
            dump_args(&self.model_path, suite, selection, out),
            inject_args(&self.injections)
        )
    }
}

fn injected(injections: &[String]) -> String {
    if injections.is_empty() {
        String::new()
    } else {
        format!(" +inject({})", injections.join(";"))
    }
}

/// The built-in runtime on one backend, optionally with injected faults.
pub struct RuntimeDriver<'m, B: Backend> {
    model: &'m Model,
    model_path: PathBuf,
    backend: Option<B>,
    loaded: Option<Runtime<B>>,
    /// The residual stream of the last run with an output tap: later probes of a prefix
    /// that want only `resid_post` rows are read from it.
    checkpoints: Option<crate::runtime::Checkpoints<B>>,
    injections: Vec<String>,
    faults: RuntimeFaults,
    prefill_chunk: Option<usize>,
    backend_dtype: (&'static str, &'static str),
    label: String,
}

impl<'m, B: Backend> RuntimeDriver<'m, B> {
    pub fn new(
        backend: B,
        model: &'m Model,
        model_path: &Path,
        injections: Vec<String>,
        prefill_chunk: Option<usize>,
    ) -> Result<Self> {
        let faults = crate::inject::parse_runtime(&injections, model.config.n_layer)?;
        let label = format!(
            "runtime {} {}{}",
            backend.name(),
            backend.dtype().name(),
            injected(&injections)
        );
        let backend_dtype = (backend.name(), backend.dtype().name());
        Ok(Self {
            model,
            model_path: model_path.to_path_buf(),
            backend: Some(backend),
            loaded: None,
            checkpoints: None,
            injections,
            faults,
            prefill_chunk,
            backend_dtype,
            label,
        })
    }
}

impl<B: Backend> Engine for RuntimeDriver<'_, B> {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()> {
        let opts = RunOptions {
            prefill_chunk: self.prefill_chunk,
            max_tokens: 0,
            sync_check: false,
            stop_token: None,
            warmup: 0,
        };
        if self.loaded.is_none() {
            crate::runtime::preflight(self.model, prompt.tokens.len(), &opts, 4)?;
            let backend = self
                .backend
                .take()
                .ok_or_else(|| Error::engine("the runtime failed to load its weights earlier"))?;
            self.loaded = Some(Runtime::load(backend, self.model, &mut |_| {})?);
        }
        let rt = self.loaded.as_ref().expect("loaded above");
        rt.dump(
            self.model,
            vec![prompt.clone()],
            selection,
            &self.faults,
            &self.injections,
            &opts,
            out,
            false,
            &mut NoProgress,
            Some(&mut self.checkpoints),
        )?;
        Ok(())
    }

    fn reproduce(&self, _prompt_id: &str, suite: &Path, selection: &Selection, _written: &Path, out: &Path) -> String {
        let chunk = self
            .prefill_chunk
            .map(|c| format!(" --prefill-chunk {c}"))
            .unwrap_or_default();
        let (backend, dtype) = &self.backend_dtype;
        format!(
            "{} dump --engine runtime --backend {backend} --dtype {dtype}{chunk} {}{}",
            resbisect_command(),
            dump_args(&self.model_path, suite, selection, out),
            inject_args(&self.injections)
        )
    }
}

/// An external engine: a shell command template with placeholders (docs/engines.md).
pub struct ExternalEngine {
    template: String,
    model_path: PathBuf,
    /// The manifest's `model` object, for engines to copy (fingerprint and config).
    model_info: serde_json::Value,
    n_layer: usize,
}

/// Placeholders an external command template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "{model}",
    "{model_info}",
    "{tokens}",
    "{prompt_id}",
    "{layers}",
    "{taps}",
    "{positions}",
    "{selection}",
    "{out}",
];

impl ExternalEngine {
    pub fn new(template: &str, model_path: &Path, model: &Model) -> Result<Self> {
        if !template.contains("{out}") {
            return Err(Error::input(format!(
                "the engine command {template:?} has no {{out}} placeholder for the dump directory"
            )));
        }
        // Catch misspelt placeholders before any run.
        let mut rest = template;
        while let Some(i) = rest.find('{') {
            let tail = &rest[i..];
            let end = tail.find('}').map_or(tail.len(), |e| e + 1);
            let word = &tail[..end];
            if word.len() > 2
                && word[1..word.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
                && !PLACEHOLDERS.contains(&word)
            {
                return Err(Error::input(format!(
                    "unknown placeholder {word} in the engine command; known: {}",
                    PLACEHOLDERS.join(" ")
                )));
            }
            rest = &tail[1..];
        }
        let model_info =
            serde_json::to_value(crate::dump::ModelInfo::of(model)).map_err(|e| Error::input(e.to_string()))?;
        Ok(Self {
            template: template.to_string(),
            model_path: model_path.to_path_buf(),
            model_info,
            n_layer: model.config.n_layer,
        })
    }

    /// The template with every placeholder replaced by a shell-quoted value; the side
    /// files are those of the dump directory `written`.
    fn expand(&self, prompt_id: &str, selection: &Selection, written: &Path, out: &Path) -> String {
        let path = |p: &Path| shell_quote(&p.display().to_string());
        let values = [
            ("{model}", path(&self.model_path)),
            ("{model_info}", path(&side_file(written, ".model.json"))),
            ("{tokens}", path(&side_file(written, ".tokens"))),
            ("{prompt_id}", shell_quote(prompt_id)),
            ("{layers}", shell_quote(&layers_arg(&selection.layers))),
            ("{taps}", shell_quote(&selection.taps.join(","))),
            ("{positions}", shell_quote(selection.positions.as_str())),
            ("{selection}", path(&side_file(written, ".selection.json"))),
            ("{out}", path(out)),
        ];
        values
            .iter()
            .fold(self.template.clone(), |cmd, (k, v)| cmd.replace(k, v))
    }
}

/// Side files an external engine reads: `<out>.tokens` and `<out>.selection.json`.
fn side_file(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// Write the token file (ids separated by commas, one line) for an engine.
pub fn write_token_file(path: &Path, tokens: &[u32]) -> Result<()> {
    let text = tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",") + "\n";
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

impl Engine for ExternalEngine {
    fn label(&self) -> String {
        // The program and its first argument (often the script an interpreter runs).
        let words: Vec<&str> = self
            .template
            .split_whitespace()
            .filter(|w| !w.contains('='))
            .take(2)
            .collect();
        format!("external {}", words.join(" "))
    }

    fn dump(&mut self, prompt: &PromptRecord, selection: &Selection, out: &Path) -> Result<()> {
        write_token_file(&side_file(out, ".tokens"), &prompt.tokens)?;
        let positions = selection.positions.resolve(prompt.tokens.len())?;
        let sel_json = serde_json::json!({
            "prompt_id": prompt.id, "n_layer": self.n_layer, "layers": selection.layers, "taps": selection.taps,
            "positions": selection.positions, "resolved_positions": positions,
        });
        for (suffix, value) in [(".selection.json", sel_json), (".model.json", self.model_info.clone())] {
            let file = side_file(out, suffix);
            std::fs::write(&file, value.to_string() + "\n").map_err(|e| Error::io(&file, e))?;
        }
        let cmd = self.expand(&prompt.id, selection, out, out);
        let log = side_file(out, ".log");
        let log_file = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
        let err_file = log_file.try_clone().map_err(|e| Error::io(&log, e))?;
        let status = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdout(log_file)
            .stderr(err_file)
            .status()
            .map_err(|e| Error::input(format!("cannot start the engine command: {e}")))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let mut last: Vec<&str> = text.lines().rev().filter(|l| !l.trim().is_empty()).take(3).collect();
            last.reverse();
            let tail = if last.is_empty() {
                "no output".to_string()
            } else {
                last.join(" | ")
            };
            return Err(Error::engine(format!(
                "external engine {status}: {tail} (log: {})",
                log.display()
            )));
        }
        let dump = Dump::open(out)
            .map_err(|e| Error::engine(format!("external engine exited 0 but its dump is unreadable: {e}")))?;
        if dump.manifest.status != Status::Complete {
            return Err(Error::engine(format!(
                "external engine exited 0 but its manifest says {:?}",
                dump.manifest.status
            )));
        }
        Ok(())
    }

    fn reproduce(&self, prompt_id: &str, _suite: &Path, selection: &Selection, written: &Path, out: &Path) -> String {
        self.expand(prompt_id, selection, written, out)
    }
}

/// Why an engine stopped: its manifest's error if it wrote one, else `message`, with
/// the last tap that reached the disk.
pub fn crash_report(out: &Path, message: &str) -> RunError {
    match Dump::open(out) {
        Ok(d) => {
            let recorded = d.manifest.error.clone();
            let last_tap = recorded
                .as_ref()
                .and_then(|e| e.tap.clone())
                .or_else(|| d.last_tap_on_disk());
            RunError {
                message: recorded.map_or_else(|| message.to_string(), |e| e.message),
                tap: last_tap,
                position: None,
            }
        }
        Err(_) => RunError {
            message: message.to_string(),
            tap: None,
            position: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{layers_arg, shell_quote};

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(shell_quote("blk.11.rope:shift=3@827"), "blk.11.rope:shift=3@827");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(layers_arg(&[]), "none");
        assert_eq!(layers_arg(&[0, 4, 8]), "0,4,8");
    }
}
