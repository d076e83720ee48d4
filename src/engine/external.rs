//! External engines: any program that writes a dump (format v1), given as a shell
//! command template whose placeholders name the model, the prompt's tokens, the
//! selection and the output (docs/engines.md). Inputs reach it as side files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{layers_arg, shell_quote, Engine};
use crate::dump::{Dump, EngineInfo, PromptRecord, Status};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::taps::Selection;

/// An external engine: a shell command template with placeholders (docs/engines.md).
pub struct ExternalEngine {
    template: String,
    model_path: PathBuf,
    /// The manifest's `model` object, for engines to copy (fingerprint and config).
    model_info: serde_json::Value,
    n_layer: usize,
    /// Longest one run may take before it is killed and counts as crashed.
    timeout: Option<Duration>,
    /// Where the command runs (resbisect's own directory): its reproduce line goes there
    /// first, so that a relative program or path means what it meant.
    cwd: Option<PathBuf>,
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
    pub fn new(template: &str, model: &Model, timeout: Option<Duration>) -> Result<Self> {
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
        let model_info = model_info_value(model)?;
        Ok(Self {
            template: template.to_string(),
            model_path: model.gguf.path.clone(),
            model_info,
            n_layer: model.config.n_layer,
            timeout,
            cwd: std::env::current_dir().ok(),
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

/// The manifest's `model` object for `model` (path, fingerprint, config), as an external
/// engine receives it in the {model_info} file.
fn model_info_value(model: &Model) -> Result<serde_json::Value> {
    serde_json::to_value(crate::dump::ModelInfo::of(model)).map_err(|e| Error::input(e.to_string()))
}

/// [`model_info_value`] as the one-line JSON text of the {model_info} file.
pub fn model_info_json(model: &Model) -> Result<String> {
    Ok(model_info_value(model)?.to_string())
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

/// How every external engine's label starts.
const LABEL_PREFIX: &str = "external ";

/// An engine label once the engine's dump said who it is: an external engine's command
/// words give way to the identity in its manifest (name, version, backend, options), so
/// two runs of one program with different options read apart. Other labels stay.
pub fn identified(label: &str, engine: &EngineInfo) -> String {
    if label.starts_with(LABEL_PREFIX) {
        format!("{LABEL_PREFIX}{}", engine.describe())
    } else {
        label.to_string()
    }
}

impl Engine for ExternalEngine {
    fn label(&self) -> String {
        // The program and the arguments that are not the protocol's placeholders (with
        // their option names): the knobs that tell two runs of one program apart.
        let mut words: Vec<&str> = Vec::new();
        // Leading `VAR=value` words set the environment; the program comes after them.
        for w in self.template.split_whitespace().skip_while(|w| w.contains('=')) {
            if w.contains('{') {
                if words.len() > 1 && words.last().is_some_and(|last| last.starts_with('-')) {
                    words.pop();
                }
            } else {
                words.push(w);
            }
        }
        format!("{LABEL_PREFIX}{}", words.join(" "))
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
        let tail = || log_tail(&log);
        let Some(status) = super::process::run(&cmd, &log, self.timeout)? else {
            let limit = self.timeout.map(humantime::format_duration);
            return Err(Error::engine(format!(
                "{} did not finish within {} (--engine-timeout): killed it and every process it started; \
                 last output: {} (log: {})",
                self.label(),
                limit.map_or_else(String::new, |l| l.to_string()),
                tail(),
                log.display()
            )));
        };
        if !status.success() {
            let tail = tail();
            // Exit 2 is the usage error of resbisect's contract (and of argparse, getopt
            // tools): the engine refused its options or input, it did not crash. 126 and
            // 127 are the shell's: the command is not executable or not found.
            match status.code() {
                Some(2) => {
                    return Err(Error::input(format!(
                        "{} refused its input (exit 2): {tail} (log: {})",
                        self.label(),
                        log.display()
                    )))
                }
                Some(code @ (126 | 127)) => {
                    return Err(Error::input(format!(
                        "{}: the command could not run (shell exit {code}): {tail}",
                        self.label()
                    )))
                }
                _ => {}
            }
            return Err(Error::engine(format!(
                "external engine {status}: {tail} (log: {})",
                log.display()
            )));
        }
        let dump = Dump::open(out)
            .map_err(|e| Error::engine(format!("external engine exited 0 but its dump is unreadable: {e}")))?;
        if dump.manifest.status != Status::Complete {
            return Err(Error::engine(format!(
                "external engine exited 0 but its manifest still says status {}: it never marked the dump complete",
                serde_json::to_value(dump.manifest.status).map_or_else(|_| "?".into(), |v| v.to_string())
            )));
        }
        Ok(())
    }

    /// The run again, in the directory it ran in, into `out` emptied first (engines
    /// refuse a directory that holds a dump), so the line runs as often as wanted.
    fn reproduce(&self, prompt_id: &str, _suite: &Path, selection: &Selection, written: &Path, out: &Path) -> String {
        let path = |p: &Path| shell_quote(&p.display().to_string());
        let cd = self
            .cwd
            .as_deref()
            .map_or_else(String::new, |d| format!("cd {} && ", path(d)));
        format!(
            "{cd}rm -rf {} && ( {} )",
            path(out),
            self.expand(prompt_id, selection, written, out)
        )
    }
}

/// Bytes of an engine's log that its tail is taken from, and characters kept per line.
const TAIL_BYTES: u64 = 64 * 1024;
const TAIL_LINE_CHARS: usize = 300;

/// The last three non-empty lines of an engine's log, joined, or "no output": read from
/// its end only, control characters (terminal escapes) dropped and long lines shortened,
/// so that a report's line stays one readable line whatever the engine printed.
fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let _ = f.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let clean = |line: &str| -> String {
        let kept: String = line.chars().filter(|c| !c.is_control()).collect();
        match kept.char_indices().nth(TAIL_LINE_CHARS) {
            Some((cut, _)) => format!("{}…", &kept[..cut]),
            None => kept,
        }
    };
    let mut last: Vec<String> = text
        .lines()
        .rev()
        .map(clean)
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    last.reverse();
    if last.is_empty() {
        "no output".to_string()
    } else {
        last.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_is_one_readable_line_whatever_the_engine_printed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let huge = "z".repeat(3_000_000);
        std::fs::write(&log, format!("start\n{huge}\n\x1b]0;pwned\x07\x1b[2J done\r\n\n")).unwrap();
        let tail = log_tail(&log);
        assert!(!tail.chars().any(char::is_control), "{tail:?}");
        assert!(tail.len() < 1000 && tail.ends_with("]0;pwned[2J done"), "{tail:?}");
        assert_eq!(log_tail(&dir.path().join("absent.log")), "no output");
    }
}
