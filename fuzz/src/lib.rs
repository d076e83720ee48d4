//! What the fuzz targets share: a scratch directory of their own (on tmpfs when there
//! is one) where an input becomes the file a reader opens, and the dump container format.

use std::path::{Path, PathBuf};

/// A directory private to this process, emptied for each input.
pub fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("resbisect-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Separates the entries of a dump container: the manifest, then `PATH\n` + bytes for
/// each file under `data/`. Text, so mutations that keep it find whole entries.
pub const ENTRY: &[u8] = b"\n@@@resbisect-file ";

/// Unpack a dump container into `root`: `manifest.json` and the files it names, paths
/// restricted to `data/<id>/<name>` (the container is the fuzzer's, not the reader's,
/// concern: escaping paths are the reader's test, covered elsewhere).
pub fn unpack_dump(data: &[u8], root: &Path) -> bool {
    let mut parts = split(data, ENTRY).into_iter();
    let Some(manifest) = parts.next() else { return false };
    if std::fs::write(root.join("manifest.json"), manifest).is_err() {
        return false;
    }
    for part in parts {
        let Some(nl) = part.iter().position(|&b| b == b'\n') else {
            continue;
        };
        let Ok(path) = std::str::from_utf8(&part[..nl]) else {
            continue;
        };
        let Some((id, name)) = path.split_once('/') else {
            continue;
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 80
                && s != "."
                && s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        };
        if !plain(id) || !plain(name) {
            continue;
        }
        let dir = root.join("data").join(id);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(name), &part[nl + 1..]);
    }
    true
}

fn split<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}
