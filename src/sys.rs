//! Facts about the host that several layers size themselves by, and reading the text
//! files people write by hand.

use std::path::Path;

use crate::error::{Error, Result};

/// Bytes of memory available to this process (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// A hand-written UTF-8 file (a prompt suite, a tolerance file) without the byte order
/// mark some editors put first, which no JSON parser takes. Errors: unreadable, not
/// UTF-8 (named by the first bad byte's line, and as UTF-16 when it starts with that
/// encoding's byte order mark, as Windows editors save "Unicode").
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(Error::input(format!(
            "{}: UTF-16 text (byte order mark {:02X} {:02X}); save it as UTF-8",
            path.display(),
            bytes[0],
            bytes[1]
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        Error::input(format!(
            "{}: line {line}: not valid UTF-8 (byte {at} of the file)",
            path.display()
        ))
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}
