//! The one integration-test binary: the CLI and the library end to end, on synthetic
//! models made here and on the real SmolLM2 fixture (fetched by scripts/fetch-models.sh).

mod util;

#[macro_use]
mod backends;
mod bad_input;
mod bisect;
mod bug_classes;
mod c_header;
mod cli;
mod diff;
mod dump_format;
mod hf_fixtures;
mod hostile;
mod llamacpp;
mod profiles;
mod quant;
mod reference;
mod report;
mod runtime;
mod runtime_variants;
mod search;
mod synth_presets;
mod third_party;
mod tokenizer;
mod variants;
