//! The command line's parts: the argument schema, one function per command, progress
//! bars. `main.rs` parses, dispatches and maps errors to exit codes.

pub mod args;
pub mod backend;
pub mod bisect;
pub mod calibrate;
pub mod commands;
pub mod demo;
pub mod inspect;
pub mod progress;
pub mod specs;
pub mod values;

use std::path::Path;

/// `text` on one line: a control character in it (a line break or a terminal escape in
/// a path the user typed) is shown escaped, as Rust writes it in a string.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A path as messages show it: on one line (see [`one_line`]).
pub fn shown(path: &Path) -> String {
    one_line(&path.display().to_string())
}
