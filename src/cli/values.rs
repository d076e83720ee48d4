//! The command line's value parsers: counts, durations and run names, and path options
//! by what the command does with them (reads a file, writes a file, writes into a
//! directory, reads a dump directory). A value is checked as it is parsed, so that a bad
//! one is refused in one line naming its option, before any work starts. A path that
//! does not exist yet is left to the command (it may create it, or its own error names
//! the file).

use std::path::PathBuf;

use clap::builder::{PathBufValueParser, TypedValueParser};

use super::shown;

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

/// A count that must be at least 1 (a chunk of 0 rows computes nothing): refused by the
/// parser, which names the flag.
pub fn at_least_one() -> impl TypedValueParser<Value = usize> {
    whole_number(1)
}

/// A count or a seed: a whole number of at least `min`, refused in words (`-1`: "must be
/// 0 or more", not the integer parser's "invalid digit").
pub fn whole_number<T>(min: u64) -> impl TypedValueParser<Value = T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    clap::builder::StringValueParser::new().try_map(move |s: String| {
        let least = || format!("must be {min} or more");
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let n: u64 = match s.parse() {
            Ok(n) => n,
            // `-0` is 0, as in the integer parsers of most languages.
            Err(_)
                if s.strip_prefix('-')
                    .is_some_and(|t| digits(t) && t.bytes().all(|b| b == b'0')) =>
            {
                0
            }
            Err(_) if s.strip_prefix('-').is_some_and(digits) => return Err(least()),
            Err(_) if digits(&s) => return Err(format!("too large (at most {})", u64::MAX)),
            Err(_) => return Err("not a whole number".to_string()),
        };
        if n < min {
            return Err(least());
        }
        T::try_from(n).map_err(|_| "too large for this machine".to_string())
    })
}

/// `--engine-timeout`: a duration with its unit, above zero (a zero limit would kill every
/// run and read as a crash).
pub fn engine_timeout(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be above zero (e.g. 90s or 10m)".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (e.g. 90s or 10m)")),
    }
}

/// `--run`: a name a trend table shows as one cell: not blank, no control characters, no
/// spaces around it (names that differ only there would look alike), at most 100 characters.
pub fn run_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("a run needs a name that is not blank".into());
    }
    if s.chars().any(char::is_control) || s.trim() != s {
        return Err("a run name has no control characters and no spaces at either end".into());
    }
    if s.chars().count() > 100 {
        return Err("a run name has at most 100 characters".into());
    }
    Ok(s.to_string())
}

/// A `synth --preset` name the preset table holds.
pub fn synth_preset(s: &str) -> Result<String, String> {
    resbisect::synth::preset(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// A `synth --quant` GGUF type `synth` writes.
pub fn synth_quant(s: &str) -> Result<String, String> {
    resbisect::synth::parse_quant(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// A `synth --tokenizer` kind.
pub fn synth_tokenizer(s: &str) -> Result<String, String> {
    resbisect::synth::TokenizerKind::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}
