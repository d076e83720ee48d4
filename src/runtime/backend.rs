//! The one backend trait of the runtime: the ops a llama forward needs, over buffers the
//! backend owns. Every op is fallible, so a device error stops the run with a name.
//! The `cpu` backend implements it in cpu.rs; the GPU backend (gpu/) the same trait.

use candle_core::quantized::GgmlDType;
use resbisect_taps::Fault;

use crate::dump::RowBytes;
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
            other => Err(crate::Error::input(format!(
                "the runtime stores f32, f16 or bf16, not {other:?}"
            ))),
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
    /// Sliding window: the query at position i sees keys j with i - window < j <= i;
    /// `None` sees the whole prefix.
    pub window: Option<usize>,
}

/// RoPE's rotation frequencies, as a kernel takes them.
pub enum RopeFreqs<'a, T> {
    /// Plain llama: pairs (2i, 2i+1) rotate by position · base^(-2i/d), the power
    /// formed in f32 by the kernel itself (the original path, kept bit for bit).
    Base(f32),
    /// A host-computed table (see `runtime::rope`): pair i rotates by position ·
    /// `inv_freq[i]`; `neox` pairs dims (i, i + d/2) instead of (2i, 2i+1); cos and sin
    /// are multiplied by `mscale` (YaRN's attention factor, 1 otherwise).
    Table { inv_freq: &'a T, neox: bool, mscale: f32 },
}

// Manual impls: the derived ones would require `T: Copy`, and a table is only borrowed.
impl<T> Clone for RopeFreqs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for RopeFreqs<'_, T> {}

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

pub trait Backend: Send {
    type Buf: Send;
    /// f32 values kept as f32 whatever the storage dtype (RoPE frequency tables).
    type Table: Send;
    /// A recorded sequence of ops that replays with one launch (a CUDA graph).
    type Graph;
    /// A weight matrix kept in its GGUF block format (see [`super::quant`]).
    type Quant: Send;

    fn name(&self) -> &'static str;
    fn device(&self) -> String;
    fn dtype(&self) -> StorageDType;
    /// Bytes free on the device that holds the buffers; None where they live in host
    /// memory (or the device does not say).
    fn free_memory(&self) -> Option<u64>;

    /// A zeroed buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Host values rounded to the storage dtype.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Host values kept in f32 (a RoPE frequency table).
    fn upload_table(&self, data: &[f32]) -> Result<Self::Table>;
    /// A GGUF weight (any supported ggml type; `dims` in ggml order, raw bytes),
    /// dequantized by the backend into its storage dtype.
    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Self::Buf>;
    /// A GGUF matrix (`dims` = `[k, n]`) kept in its block format for
    /// [`matmul_quant`](Self::matmul_quant), or `None` when this backend does not compute
    /// on `dtype`'s blocks (the caller dequantizes it instead). Errors: a layout that is
    /// not whole blocks.
    fn upload_quant(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Option<Self::Quant>>;
    /// `len` elements from `offset`, as f32.
    fn download(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// `len` elements from `offset` exactly as stored, appended to `out`: little-endian
    /// bytes of the storage dtype (what dumps hold, at half the bytes of f32 for f16 and
    /// bf16). Appending lets a tap's rows land in one allocation, copied once.
    fn download_raw(&self, buf: &Self::Buf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()>;
    /// The elements of `runs` (offset, length) of `buf` as stored, one after another, for
    /// a dump writer. By default downloaded now into `spare`; a backend may hand them over
    /// still being copied, so that the next ops run meanwhile — `buf` may be overwritten
    /// as soon as this returns.
    fn download_rows(&self, buf: &Self::Buf, runs: &[(usize, usize)], spare: Vec<u8>) -> Result<RowBytes> {
        download_rows_now(self, buf, runs, spare)
    }
    /// Get ready for up to `count` [`download_rows`](Self::download_rows) of up to `len`
    /// elements each (the page-locked memory a GPU copies into), so that setting up falls
    /// before a run, as loading weights does; by default there is nothing to get ready.
    fn reserve_captures(&self, _len: usize, _count: usize) -> Result<()> {
        Ok(())
    }

    /// Rows `ids` of a `[vocab, width]` table.
    fn embed(&self, table: &Self::Buf, width: usize, ids: Src<u32>, out: &mut Self::Buf) -> Result<()>;
    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ`.
    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, k: usize, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ` read from `w`'s blocks (f32 accumulation).
    fn matmul_quant(
        &self,
        x: &Self::Buf,
        w: &Self::Quant,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// RoPE in place on `[rows, heads × head_dim]`; row i sits at `positions[i]`.
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        positions: Src<f32>,
        freqs: RopeFreqs<Self::Table>,
    ) -> Result<()>;
    /// Copy `rows × width` from `src` into `dst` starting at row `dst_row` (KV cache
    /// append, decode tap buffers).
    fn copy_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, dst_row: Row, rows: usize, width: usize) -> Result<()>;
    /// Causal GQA attention of `q` against cache rows `0..first_pos + rows` (within the
    /// shape's sliding window, when it has one).
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// `out = gelu_tanh(gate) · up`, GELU's tanh approximation (Hendrycks & Gimpel 2016):
    /// 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))).
    fn gelu_tanh_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    fn add(&self, a: &Self::Buf, b: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// `x[r, c] += bias[c]` in place over `rows × width` (the q, k, v biases of qwen2).
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, width: usize) -> Result<()>;
    /// `x *= factor` in place over `n` values (Gemma's embedding scale).
    fn scale(&self, x: &mut Self::Buf, n: usize, factor: f32) -> Result<()>;
    /// Fault injection: perturb rows `from_row..rows` of a `[rows, width]` buffer.
    fn perturb(&self, x: &mut Self::Buf, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()>;
    /// Index of the largest value of row `row` of a `[.., width]` buffer.
    fn argmax(&self, x: &Self::Buf, row: usize, width: usize) -> Result<u32>;
    /// Greedy decode without a round trip per token: the index of the largest value of row
    /// `row` of a `[.., width]` buffer becomes the step record's token, and the record
    /// takes `next`'s position, RoPE position and slot (its token is not used) in the same
    /// op; so the next step can be issued before the host knows its token. The token is
    /// queued for [`take_token`](Self::take_token); [`set_step`](Self::set_step) drops
    /// tokens not taken.
    fn argmax_to_step(&self, x: &Self::Buf, row: usize, width: usize, next: Step) -> Result<()>;
    /// The oldest token [`argmax_to_step`](Self::argmax_to_step) queued, once computed.
    /// Errors: none queued.
    fn take_token(&self) -> Result<u32>;
    /// Wait for queued work and surface any device error.
    fn sync(&self) -> Result<()>;

    // Fused ops: the same values as the ops they combine, in fewer launches where a
    // backend implements them (decode is launch-bound); by default, the ops in turn.

    /// Up to three projections of one input (q, k and v; gate and up with `n[2] = 0`).
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn matmul3(
        &self,
        x: &Self::Buf,
        w: [&Self::Buf; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        matmul3_by_parts(self, x, w, rows, k, n, out)
    }
    /// Up to three projections of one input on quantized matrices (q, k and v; gate and
    /// up with `n[2] = 0`): `out[i][rows, n[i]] = x[rows, k] · w[i]ᵀ`; a part with
    /// `n[i] = 0` is skipped.
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn matmul3_quant(
        &self,
        x: &Self::Buf,
        w: [&Self::Quant; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        matmul3_quant_by_parts(self, x, w, rows, k, n, out)
    }
    /// `g = x·wgᵀ`, `u = x·wuᵀ`, `act = silu(g)·u` (SiLU: Elfwing et al. 2018) for
    /// `[rows, k]` input rows and `[n, k]` weights; the input may be a residual add and
    /// RMSNorm ([`Input::AddNorm`]) that the GPU computes inside the launch for one row.
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_silu(
        &self,
        x: Input<Self>,
        wg: &Self::Buf,
        wu: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        act: &mut Self::Buf,
    ) -> Result<()> {
        gate_up_silu_by_parts(self, x, wg, wu, rows, k, n, g, u, act)
    }
    /// RoPE on `q` and `k` in place, then `k` and `v` appended to the caches at the rows of
    /// `s` (its first position, or the step's with `from_step`).
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn rope_append(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        s: AttnShape,
        positions: Src<f32>,
        freqs: RopeFreqs<Self::Table>,
    ) -> Result<()> {
        rope_append_by_parts(self, q, k, v, k_cache, v_cache, s, positions, freqs)
    }
    /// `sum = a + b`, `out = rms_norm(sum) · w`.
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        add_rms_norm_by_parts(self, a, b, w, rows, width, eps, sum, out)
    }

    /// [`add_rms_norm`](Self::add_rms_norm) of rows of width `k`, then up to three
    /// projections of its output `normed` (`out[i][rows, n[i]] = normed · w[i]ᵀ`; a part
    /// with `n[i] = 0` is skipped): the GPU computes a decode row's norm inside the launch
    /// of dense projections.
    // Every operand and shape is its own parameter, as in the unfused ops it combines.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_project(
        &self,
        norm: AddNorm<Self::Buf>,
        w: Projections<Self>,
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        add_rms_norm_project_by_parts(self, norm, w, rows, k, n, out)
    }

    /// Make `step` the step record that `Src::Step`, `Row::Step*` and `from_step` read,
    /// dropping tokens [`argmax_to_step`](Self::argmax_to_step) queued and not taken.
    fn set_step(&self, step: Step) -> Result<()>;
    /// Record the ops issued until [`end_record`](Self::end_record) instead of running
    /// them; `false` where the backend cannot record (the ops then run as issued), which
    /// is the default. (Not a tap capture: those are [`download_rows`](Self::download_rows).)
    fn begin_record(&self) -> Result<bool> {
        Ok(false)
    }
    /// The recording, or `None` when it could not be made (the ops did not run).
    fn end_record(&self) -> Result<Option<Self::Graph>> {
        Ok(None)
    }
    fn replay(&self, _graph: &Self::Graph) -> Result<()> {
        Err(crate::Error::engine(format!(
            "{}: this backend does not record",
            self.name()
        )))
    }
}

/// [`Backend::download_rows`] downloaded before it returns.
pub fn download_rows_now<B: Backend + ?Sized>(
    b: &B,
    buf: &B::Buf,
    runs: &[(usize, usize)],
    mut spare: Vec<u8>,
) -> Result<RowBytes> {
    for &(offset, len) in runs {
        b.download_raw(buf, offset, len, &mut spare)?;
    }
    Ok(RowBytes::Ready(spare))
}

/// The residual sum and RMSNorm rows of projections come from
/// ([`Backend::add_rms_norm_project`]): `sum = a + b`, `normed = rms_norm(sum) · w` with
/// `eps` inside the root, both written as [`Backend::add_rms_norm`] writes them.
pub struct AddNorm<'a, Buf> {
    pub a: &'a Buf,
    pub b: &'a Buf,
    pub w: &'a Buf,
    pub eps: f32,
    pub sum: &'a mut Buf,
    pub normed: &'a mut Buf,
}

/// What projections read: rows ready in a buffer, or the RMSNorm of a residual sum that
/// [`Backend::add_rms_norm_project`] and [`Backend::gate_up_silu`] compute on the way in.
pub enum Input<'a, B: Backend + ?Sized> {
    Rows(&'a B::Buf),
    AddNorm(AddNorm<'a, B::Buf>),
}

impl<'a, B: Backend + ?Sized> Input<'a, B> {
    /// The `[rows, k]` rows, once computed: a norm runs now by itself (for ops that cannot
    /// take it in).
    pub fn rows(self, b: &B, rows: usize, k: usize) -> Result<&'a B::Buf> {
        match self {
            Self::Rows(x) => Ok(x),
            Self::AddNorm(n) => {
                b.add_rms_norm(n.a, n.b, n.w, rows, k, n.eps, n.sum, n.normed)?;
                Ok(n.normed)
            }
        }
    }
}

/// The weights of up to three projections of one input, all dense or all in GGUF blocks.
pub enum Projections<'a, B: Backend + ?Sized> {
    Dense([&'a B::Buf; 3]),
    Quant([&'a B::Quant; 3]),
}

/// [`Backend::add_rms_norm_project`] as the norm, then [`Backend::matmul3`] or
/// [`Backend::matmul3_quant`].
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_project_by_parts<B: Backend + ?Sized>(
    b: &B,
    norm: AddNorm<B::Buf>,
    w: Projections<B>,
    rows: usize,
    k: usize,
    n: [usize; 3],
    out: [&mut B::Buf; 3],
) -> Result<()> {
    let AddNorm {
        a,
        b: delta,
        w: norm_w,
        eps,
        sum,
        normed,
    } = norm;
    b.add_rms_norm(a, delta, norm_w, rows, k, eps, sum, normed)?;
    match w {
        Projections::Dense(w) => b.matmul3(normed, w, rows, k, n, out),
        Projections::Quant(w) => b.matmul3_quant(normed, w, rows, k, n, out),
    }
}

/// [`Backend::matmul3`] as up to three matmuls.
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn matmul3_by_parts<B: Backend + ?Sized>(
    b: &B,
    x: &B::Buf,
    w: [&B::Buf; 3],
    rows: usize,
    k: usize,
    n: [usize; 3],
    out: [&mut B::Buf; 3],
) -> Result<()> {
    for ((w, n), out) in w.into_iter().zip(n).zip(out) {
        if n > 0 {
            b.matmul(x, w, rows, k, n, out)?;
        }
    }
    Ok(())
}

/// [`Backend::matmul3_quant`] as up to three quantized matmuls.
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn matmul3_quant_by_parts<B: Backend + ?Sized>(
    b: &B,
    x: &B::Buf,
    w: [&B::Quant; 3],
    rows: usize,
    k: usize,
    n: [usize; 3],
    out: [&mut B::Buf; 3],
) -> Result<()> {
    for ((w, n), out) in w.into_iter().zip(n).zip(out) {
        if n > 0 {
            b.matmul_quant(x, w, rows, k, n, out)?;
        }
    }
    Ok(())
}

/// [`Backend::gate_up_silu`] as the norm (if any), two matmuls and a SiLU product.
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn gate_up_silu_by_parts<B: Backend + ?Sized>(
    b: &B,
    x: Input<B>,
    wg: &B::Buf,
    wu: &B::Buf,
    rows: usize,
    k: usize,
    n: usize,
    g: &mut B::Buf,
    u: &mut B::Buf,
    act: &mut B::Buf,
) -> Result<()> {
    let x = x.rows(b, rows, k)?;
    b.matmul(x, wg, rows, k, n, g)?;
    b.matmul(x, wu, rows, k, n, u)?;
    b.silu_mul(g, u, rows * n, act)
}

/// [`Backend::rope_append`] as two RoPEs and two row copies.
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn rope_append_by_parts<B: Backend + ?Sized>(
    b: &B,
    q: &mut B::Buf,
    k: &mut B::Buf,
    v: &B::Buf,
    k_cache: &mut B::Buf,
    v_cache: &mut B::Buf,
    s: AttnShape,
    positions: Src<f32>,
    freqs: RopeFreqs<B::Table>,
) -> Result<()> {
    let kvw = s.n_head_kv * s.head_dim;
    let row = if s.from_step {
        Row::StepPos
    } else {
        Row::At(s.first_pos)
    };
    b.rope(q, s.n_head, s.head_dim, positions, freqs)?;
    b.rope(k, s.n_head_kv, s.head_dim, positions, freqs)?;
    b.copy_rows(k, k_cache, row, s.rows, kvw)?;
    b.copy_rows(v, v_cache, row, s.rows, kvw)
}

/// [`Backend::add_rms_norm`] as an add and an RMSNorm.
// The parameters of the trait method it implements.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_by_parts<B: Backend + ?Sized>(
    b: &B,
    a: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    rows: usize,
    width: usize,
    eps: f32,
    sum: &mut B::Buf,
    out: &mut B::Buf,
) -> Result<()> {
    b.add(a, x, rows * width, sum)?;
    b.rms_norm(sum, w, rows, width, eps, out)
}
