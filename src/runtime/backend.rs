//! The one backend trait of the runtime: the ops a llama forward needs, over buffers the
//! backend owns. Every op is fallible, so a device error stops the run with a name.
//! The `cpu` backend implements it here; GPU backends implement the same trait.

use candle_core::quantized::GgmlDType;
use resbisect_reference::Fault;

use crate::error::Result;

/// Storage dtype of activations and weights; arithmetic accumulates in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F16,
    BF16,
}

impl StorageDType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(crate::Error::input(format!("the runtime stores f32, f16 or bf16, not {other:?}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// The dump dtype that holds stored values exactly.
    pub fn tap_dtype(self) -> crate::dump::TapDType {
        match self {
            Self::F32 => crate::dump::TapDType::F32,
            Self::F16 => crate::dump::TapDType::F16,
            Self::BF16 => crate::dump::TapDType::BF16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Shape of a causal attention call over the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Absolute position of the first query row.
    pub first_pos: usize,
    pub rows: usize,
    /// One row whose position the kernel reads from the step record (equal to
    /// `first_pos` now), so a recorded step replays at later positions.
    pub from_step: bool,
}

/// The position-dependent inputs of a one-row decode step. [`Backend::set_step`] keeps
/// them where the device reads them, so the ops of a step can be recorded once and
/// replayed at every later position.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Step {
    pub token: u32,
    /// Absolute position: the KV cache row written and the last key attended.
    pub pos: usize,
    /// The angle position of RoPE (differs from `pos` only under an injected RoPE fault).
    pub rope_pos: f32,
    /// The row of the decode tap buffers this step fills.
    pub slot: usize,
}

/// Per-row inputs given by the host now, or the step record's (one row).
#[derive(Debug, Clone, Copy)]
pub enum Src<'a, T> {
    Host(&'a [T]),
    Step,
}

/// A destination row given by the host now, or the step record's position or tap slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    At(usize),
    StepPos,
    StepSlot,
}

impl Row {
    /// The row number, with step fields read from `step`.
    pub fn resolve(self, step: &Step) -> usize {
        match self {
            Row::At(r) => r,
            Row::StepPos => step.pos,
            Row::StepSlot => step.slot,
        }
    }
}

pub trait Backend {
    type Buf;
    /// A recorded sequence of ops that replays with one launch (a CUDA graph).
    type Graph;

    fn name(&self) -> &'static str;
    fn device(&self) -> String;
    fn dtype(&self) -> StorageDType;

    /// A zeroed buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Host values rounded to the storage dtype.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A GGUF weight (any supported ggml type; `dims` in ggml order, raw bytes),
    /// dequantized by the backend into its storage dtype.
    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Self::Buf>;
    /// `len` elements from `offset`, as f32.
    fn download(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// `len` elements from `offset` exactly as stored: little-endian bytes of the storage
    /// dtype (what dumps hold, at half the bytes of f32 for f16 and bf16).
    fn download_raw(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<u8>>;

    /// Rows `ids` of a `[vocab, width]` table.
    fn embed(&self, table: &Self::Buf, width: usize, ids: Src<u32>, out: &mut Self::Buf) -> Result<()>;
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, width: usize, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ`.
    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, k: usize, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// Interleaved RoPE in place; row i sits at `positions[i]`.
    fn rope(&self, x: &mut Self::Buf, heads: usize, head_dim: usize, positions: Src<f32>, base: f32) -> Result<()>;
    /// Copy `rows × width` from `src` into `dst` starting at row `dst_row` (KV cache
    /// append, decode tap buffers).
    fn copy_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, dst_row: Row, rows: usize, width: usize) -> Result<()>;
    /// Causal GQA attention of `q` against cache rows `0..first_pos + rows`.
    fn attention(&self, q: &Self::Buf, k_cache: &Self::Buf, v_cache: &Self::Buf, shape: AttnShape, out: &mut Self::Buf) -> Result<()>;
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    fn add(&self, a: &Self::Buf, b: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// Fault injection: perturb rows `from_row..rows` of a `[rows, width]` buffer.
    fn perturb(&self, x: &mut Self::Buf, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()>;
    /// Index of the largest value of row `row` of a `[.., width]` buffer.
    fn argmax(&self, x: &Self::Buf, row: usize, width: usize) -> Result<u32>;
    /// Wait for queued work and surface any device error.
    fn sync(&self) -> Result<()>;

    /// Make `step` the step record that `Src::Step`, `Row::Step*` and `from_step` read.
    fn set_step(&self, step: Step) -> Result<()>;
    /// Record the ops issued until [`end_capture`](Self::end_capture) instead of running
    /// them; `false` where the backend cannot record (the ops then run as issued).
    fn begin_capture(&self) -> Result<bool>;
    /// The recording, or `None` when it could not be made (the ops did not run).
    fn end_capture(&self) -> Result<Option<Self::Graph>>;
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
}
