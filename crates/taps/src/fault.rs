//! Faults an engine can be told to inject (`--inject`, src/inject.rs parses them): the
//! oracle and the runtime backends apply the same types, each with its own numerics.

/// A perturbation of one tap's rows from a position on, applied in the forward pass so
/// it propagates downstream as a real bug would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Scale(f64),
    Offset(f64),
    Nan,
    Zero,
}

/// A [`Fault`] aimed at one tap (canonical id) from position `from` on.
#[derive(Debug, Clone, PartialEq)]
pub struct TapFault {
    pub tap_id: String,
    pub fault: Fault,
    pub from: usize,
}

/// How a corrupted RoPE rotates the query and key rows it hits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeCorruption {
    /// As if the row sat at `position + shift` (an off-by-N position, e.g. a chunked-prefill
    /// offset bug).
    Shift(i64),
    /// As if the row sat at `position × factor`: every frequency scaled by `factor` (a wrong
    /// RoPE frequency scaling).
    Scale(f64),
    /// Angles `position × θ_i` formed in bf16 — position, inverse frequency and product each
    /// rounded to bf16, as in a RoPE table computed in half precision. The error grows with
    /// the position.
    Bf16Angles,
}

/// RoPE corruption of the rows at positions ≥ `from`; `layer` None means every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFault {
    pub layer: Option<usize>,
    pub corruption: RopeCorruption,
    pub from: usize,
}

impl RopeFault {
    /// The position the row at `position` is rotated as, for corruptions that move the
    /// position (None for [`RopeCorruption::Bf16Angles`], which rounds angles instead).
    pub fn rotated_position(&self, position: usize) -> Option<f64> {
        let p = position as f64;
        if position < self.from {
            return Some(p);
        }
        match self.corruption {
            RopeCorruption::Shift(s) => Some(p + s as f64),
            RopeCorruption::Scale(f) => Some(p * f),
            RopeCorruption::Bf16Angles => None,
        }
    }
}

/// RMSNorm computed with `eps` instead of the model's on rows at positions ≥ `from`, in
/// every norm of the model (a wrong `rms_eps` read from the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormFault {
    pub eps: f64,
    pub from: usize,
}

/// A block-layout fault (runtime only): the blocks of every weight of GGUF type
/// `quant_type` (`q4_k`, ...) are read with the two nibbles of each 4-bit quant byte swapped.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockFault {
    pub quant_type: String,
}

/// How a corrupted sliding window masks the keys of a windowed layer (runtime only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowCorruption {
    /// A window of `window + shift` positions (at least 1): an off-by-N window bound.
    Shift(i64),
    /// No window at all: the windowed layer attends to every earlier position.
    Global,
}

/// A wrong sliding window on windowed layers (`layer` None: every windowed layer). A window
/// belongs to the layer, not to positions: its first effect shows at the window's edge
/// (position `window` for a wider or absent window, `window - 1 + shift` for a narrower one).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowFault {
    pub layer: Option<usize>,
    pub corruption: WindowCorruption,
}

impl WindowFault {
    /// The window layer `layer` attends with, given its model window (None: global).
    pub fn window_of(faults: &[WindowFault], layer: usize, window: Option<usize>) -> Option<usize> {
        let window = window?;
        match faults.iter().find(|f| f.layer.is_none_or(|l| l == layer)) {
            None => Some(window),
            Some(f) => match f.corruption {
                WindowCorruption::Shift(s) => Some((window as i64 + s).max(1) as usize),
                WindowCorruption::Global => None,
            },
        }
    }
}

/// Every fault injected into one run of the oracle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    pub taps: Vec<TapFault>,
    pub rope: Vec<RopeFault>,
    pub norm: Option<NormFault>,
}

impl Faults {
    /// The RoPE fault acting on `layer`, if any.
    pub fn rope_for(&self, layer: usize) -> Option<&RopeFault> {
        self.rope.iter().find(|r| r.layer.is_none_or(|l| l == layer))
    }
}
