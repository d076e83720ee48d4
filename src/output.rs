//! Writing what resbisect produces without losing what was there. Files are written whole
//! under a temporary name and renamed into place, so a crash leaves the old file or the
//! new one, and a symbolic link at the path is replaced, never written through. An output
//! replaces only what resbisect itself wrote there before.

use std::path::Path;

use crate::error::{Error, Result};

/// Write `path` by `write` into a temporary sibling, then rename it over `path`. The
/// temporary file is removed when `write` fails. Errors: those of `write`, or the rename.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        // The temporary file is ours, not the user's: name what they asked for.
        return Err(match e {
            Error::Input(msg) => Error::Input(msg.replace(&tmp.display().to_string(), &path.display().to_string())),
            engine => engine,
        });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// [`write_atomic`] of `bytes`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e)))
}

/// Give the file at `path` the mode a newly created file gets (0666 less the umask, read
/// from /proc/self/status without changing it; 022 where unknown). A writer that goes
/// through a private temporary file (mode 0600, as safetensors' `serialize_to_file` does)
/// would otherwise leave dump files that the owner's group and CI jobs cannot read.
pub fn set_default_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let umask = *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
            })
            .unwrap_or(0o022)
    });
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask)).map_err(|e| Error::io(path, e))
}

/// Whether `name` is a temporary file [`write_atomic`] leaves behind when killed.
pub fn is_temporary(name: &str) -> bool {
    // Ours (`.<name>.tmp-<pid>`), and the `tempfile` crate's (`.tmpXXXXXX`) that a
    // library writer renames into ours.
    name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".tmp"))
}

/// The largest file [`check_replaceable_file`] reads to tell its kind: resbisect's own
/// small outputs (tolerance and model-info files) are far below it.
const MAX_CHECKED_BYTES: u64 = 16 << 20;

/// Whether this process may create files in `dir` (an existing directory).
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Refuse, before any work, an output file (named by `flag`) that exists and is not a
/// `kind` (say "a tolerance file"): `is_kind` reads the existing file and tells whether
/// resbisect wrote it, so running a command again replaces its own output, never a model
/// or a file of the user's. A symbolic link is judged by what it points to; the write
/// then replaces the link itself. Errors: bad input (exit 2) naming `flag`.
pub fn check_replaceable_file(path: &Path, flag: &str, kind: &str, is_kind: impl FnOnce(&Path) -> bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !writable(dir) {
        return Err(Error::input(format!(
            "{flag} {}: cannot write into {} (no such directory, or permission denied)",
            path.display(),
            dir.display()
        )));
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(Error::input(format!(
            "{flag} {}: a directory, not a file",
            path.display()
        )));
    }
    // Not opened at all (a FIFO would block the read) or not read whole (a huge file).
    if !meta.is_file() || meta.len() > MAX_CHECKED_BYTES || !is_kind(path) {
        return Err(Error::input(format!(
            "{flag} {}: exists and is not {kind}; remove it or write elsewhere",
            path.display()
        )));
    }
    Ok(())
}

/// Create the output directory `dir` (named by `flag`) before any work, refusing one that
/// holds anything but files named in `ours` (what resbisect writes there, which a new run
/// replaces) and temporary files: pointed at a directory of the user's, it writes nothing.
/// Errors: bad input (exit 2) naming `flag` and the first foreign entry.
pub fn prepare_output_dir(dir: &Path, flag: &str, ours: &[&str]) -> Result<()> {
    let named = |e| Error::input(format!("{flag} {}", Error::io(dir, e)));
    std::fs::create_dir_all(dir).map_err(named)?;
    let entries = std::fs::read_dir(dir).map_err(named)?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let known = name.to_str().is_some_and(|n| ours.contains(&n) || is_temporary(n));
        if !known || !entry.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()) {
            return Err(Error::input(format!(
                "{flag} {}: holds {:?}, which resbisect does not write there; pick a new or empty directory",
                dir.display(),
                name
            )));
        }
    }
    Ok(())
}
