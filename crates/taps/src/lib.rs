//! The tap contract of resbisect (docs/taps.md), typed once and shared by the oracle
//! (resbisect-reference) and the main crate: canonical tap ids and their order, dump file
//! stems, the aliases other tools use, the command-line selection syntax, the faults an
//! engine can be told to inject, and the model configuration the widths derive from.
//! It holds no numerics, so depending on it never couples the oracle to the runtime.

mod alias;
mod config;
mod error;
mod fault;
mod selection;
mod tap;

pub use alias::{canonical_tap, canonical_tap_id, canonical_tap_name};
pub use config::{Activation, Config, RopeScaling, RopeStyle, SlidingWindow, Variant, MAX_DIM};
pub use error::Error;
pub use fault::{
    BlockFault, Fault, Faults, NormFault, RopeCorruption, RopeFault, TapFault, WindowCorruption, WindowFault,
};
pub use selection::{consecutive_runs, parse_layers, parse_taps, positions_spec, PositionSpec, Selection};
pub use tap::{all_taps, model_taps, FileStem, LayerTap, Tap, EMBED_TAP, LAYER_TAPS, OUTPUT_TAPS};
