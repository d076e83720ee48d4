//! External engines: any program that writes a dump (format v1), given as a shell
//! command template whose placeholders name the model, the prompt's tokens, the
//! selection and the output (docs/engines.md). Inputs reach it as side files.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

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
        let log_file = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
        let err_file = log_file.try_clone().map_err(|e| Error::io(&log, e))?;
        // Its own process group, so that a hung engine can be killed with every process it
        // started (a shell's children outlive the shell); resbisect passes interrupts on.
        // No terminal input: a background group reading it would stop, not fail.
        let child = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::input(format!("cannot start the engine command: {e}")))?;
        let tail = || log_tail(&log);
        let Some(status) = wait_at_most(child, self.timeout)? else {
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

/// Process groups of engines running in their own (at most one per engine of a pair, and
/// a spare), which an interrupt of resbisect must still reach.
static ENGINE_GROUPS: [AtomicI32; 3] = [AtomicI32::new(0), AtomicI32::new(0), AtomicI32::new(0)];

/// SIGINT, SIGTERM or SIGHUP while engines run in their own process groups: pass it on to
/// them, as the terminal would have, then end as the default action does.
extern "C" fn forward_signal(signal: libc::c_int) {
    for group in &ENGINE_GROUPS {
        let pgid = group.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(-pgid, signal) };
        }
    }
    // SAFETY: signal and raise are async-signal-safe; the default action ends the process.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Wait for `child`, the leader of its own process group, for at most `limit` (no limit:
/// `None`): its exit status, or `None` once it and every process it started have been
/// killed for outlasting it.
fn wait_at_most(mut child: Child, limit: Option<Duration>) -> Result<Option<ExitStatus>> {
    static FORWARDING: std::sync::Once = std::sync::Once::new();
    FORWARDING.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe { libc::signal(signal, forward_signal as *const () as libc::sighandler_t) };
        }
    });
    let pgid = child.id() as i32;
    let slot = ENGINE_GROUPS
        .iter()
        .find(|g| g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst).is_ok());
    // A limit past what the clock can count (`--engine-timeout 300000000000y`) is none.
    let deadline = limit.and_then(|l| Instant::now().checked_add(l));
    let mut pause = Duration::from_millis(1);
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(Some(status)),
            Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                kill_tree(pgid);
                let _ = child.wait();
                break Ok(None);
            }
            Ok(None) => {
                let left = deadline.map_or(pause, |d| d.saturating_duration_since(Instant::now()));
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => break Err(Error::engine(format!("waiting for the engine command: {e}"))),
        }
    };
    if let Some(slot) = slot {
        slot.store(0, Ordering::SeqCst);
    }
    outcome
}

/// Kill the engine's process group and every process below its leader that left the
/// group (`setsid`, a daemon's own group). All are stopped first, until no new one
/// appears, and only then killed: a killed parent's children move to another parent at
/// once, out of reach of a search below the leader.
fn kill_tree(pgid: i32) {
    // SAFETY (each kill): signals the engine's own process group and the processes found
    // below its leader, nothing of resbisect's.
    unsafe { libc::kill(-pgid, libc::SIGSTOP) };
    let mut tree: Vec<i32> = Vec::new();
    // A process forks no more once stopped; a few rounds reach those forked meanwhile.
    for _ in 0..8 {
        let found = descendants(pgid);
        let new: Vec<i32> = found.iter().copied().filter(|p| !tree.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        tree.extend(new);
    }
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    for &pid in &tree {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The processes below `pid` (its children, theirs, and so on) as /proc lists them now;
/// none where there is no /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|entry| {
            let child: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // Field 2, the command name, may hold spaces and parentheses: the state and
            // the parent's pid follow its last ')'.
            let parent = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|&&(_, p)| p == parent).map(|&(c, _)| c));
        next += 1;
    }
    found.split_off(1)
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
