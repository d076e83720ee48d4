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
