//! The tap contract (canonical ids, file stems, aliases, selections, faults), defined
//! once in the resbisect-taps crate and re-exported here so `crate::taps::X` names it.

pub use resbisect_taps::*;
