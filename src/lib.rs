//! resbisect: find which tensor of an LLM inference engine diverges first from a
//! reference, where, and by how much. This library holds everything but the CLI.

pub mod bisect;
pub mod cut;
pub mod diff;
pub mod dump;
pub mod engines;
pub mod error;
pub mod gguf;
pub mod inject;
pub mod model;
pub mod prompts;
pub mod reference_engine;
pub mod report;
pub mod runtime;
pub mod synth;
pub mod taps;
pub mod tolerance;
pub mod tokenizer;

pub use error::{Error, Result};

static PROF_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
pub fn prof(label: &str) {
    let t = PROF_START.get_or_init(std::time::Instant::now);
    if std::env::var_os("RB_PROF").is_some() {
        eprintln!("[prof {:.4}] {label}", t.elapsed().as_secs_f64());
    }
}
