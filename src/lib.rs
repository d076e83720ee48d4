//! resbisect: find which tensor of an LLM inference engine diverges first from a
//! reference, where, and by how much. This library holds everything but the CLI.

pub mod bisect;
pub mod cut;
pub mod diff;
pub mod dump;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod inject;
pub mod model;
pub mod output;
pub mod prompts;
pub mod quant;
pub mod report;
pub mod runtime;
pub mod synth;
pub mod sys;
pub mod taps;
pub mod tokenizer;
pub mod tolerance;
pub mod trace;

pub use error::{Error, Result};
