//! Path options by what the command does with them (reads a file, writes a file, writes
//! into a directory, reads a dump directory), checked as they are parsed so that a path
//! of the wrong kind is refused in one line naming its option, before any work starts.
//! A path that does not exist yet is left to the command (it may create it, or its own
//! error names the file).

use std::path::{Path, PathBuf};

use clap::builder::{PathBufValueParser, TypedValueParser};

/// A file the command reads (a prompt suite, a tolerance file, a history).
pub fn file_to_read() -> impl TypedValueParser<Value = PathBuf> {
    not_a_directory("a directory, not a file")
}

/// A model the command reads.
pub fn model_to_read() -> impl TypedValueParser<Value = PathBuf> {
    not_a_directory("a directory; expected a GGUF model file (.gguf)")
}

fn not_a_directory(refusal: &'static str) -> impl TypedValueParser<Value = PathBuf> {
    PathBufValueParser::new().try_map(move |p| match p.is_dir() {
        true => Err(refusal.to_string()),
        false => Ok(p),
    })
}

/// A file the command writes (or appends to): not a directory, under a directory.
pub fn file_to_write() -> impl TypedValueParser<Value = PathBuf> {
    PathBufValueParser::new().try_map(|p| {
        if p.is_dir() {
            return Err("a directory; name the file to write".to_string());
        }
        under_a_directory(p)
    })
}

/// A directory the command writes into (a dump, a report, probe dumps).
pub fn dir_to_write() -> impl TypedValueParser<Value = PathBuf> {
    PathBufValueParser::new().try_map(|p| {
        if p.exists() && !p.is_dir() {
            return Err("a file, not a directory".to_string());
        }
        under_a_directory(p)
    })
}

/// A dump directory the command reads.
pub fn dump_to_read() -> impl TypedValueParser<Value = PathBuf> {
    PathBufValueParser::new().try_map(|p| match p.exists() && !p.is_dir() {
        true => Err("a file, not a dump directory".to_string()),
        false => Ok(p),
    })
}

/// `p` where its nearest existing ancestor is a directory (`out.json/x` under a file
/// would fail later as "Not a directory", naming neither the file nor the option).
fn under_a_directory(p: PathBuf) -> Result<PathBuf, String> {
    let existing = p.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists());
    match existing {
        Some(a) if !a.is_dir() => Err(format!("{} is a file, not a directory", shown(a))),
        _ => Ok(p),
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string().escape_debug().to_string()
}
