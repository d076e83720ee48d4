//! The kernel ABI of `kernels/ops.hip`, stated once: each `rb_*` kernel's name and
//! argument list as a Rust function that builds its call (so a launch with arguments out
//! of order does not compile), the list every driver loads, the device decoders of GGUF
//! types, the fault codes of `rb_perturb`, and the storage element both drivers share.

use candle_core::quantized::GgmlDType;
use resbisect_taps::Fault;

use crate::quant::QuantType;
use crate::runtime::backend::StorageDType;

/// The kernel source, compiled by NVRTC at run time (cuda) or hipcc at build time (hip).
pub const KERNEL_SOURCE: &str = include_str!("../../../kernels/ops.hip");
pub const KERNEL_COMPAT: &str = include_str!("../../../kernels/compat.h");
/// Threads per block of the `rb_qdequant_*` kernels (`RB_DEQUANT_THREADS`: their shared
/// tile has a row per thread).
pub const DEQUANT_THREADS: u32 = 256;

/// A value the GPU backends store: arithmetic runs in f32, storage in this type.
pub trait StorageElem: Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static {
    const DTYPE: StorageDType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The value stored little-endian in `bytes` (its size).
    fn from_le(bytes: &[u8]) -> Self;
}

impl StorageElem for f32 {
    const DTYPE: StorageDType = StorageDType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl StorageElem for half::f16 {
    const DTYPE: StorageDType = StorageDType::F16;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_le(b: &[u8]) -> Self {
        half::f16::from_le_bytes([b[0], b[1]])
    }
}

impl StorageElem for half::bf16 {
    const DTYPE: StorageDType = StorageDType::BF16;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_le(b: &[u8]) -> Self {
        half::bf16::from_le_bytes([b[0], b[1]])
    }
}

/// The bytes of stored values, as the device holds them.
pub fn elem_bytes<T: StorageElem>(values: &[T]) -> &[u8] {
    // SAFETY: every StorageElem is a plain f32, f16 or bf16 value without padding, whose
    // bytes are its storage (little-endian on every GPU host).
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
}

/// The preprocessor define that selects a storage type in compat.h.
pub fn storage_define(dtype: StorageDType) -> &'static str {
    match dtype {
        StorageDType::F32 => "RB_STORE_F32",
        StorageDType::F16 => "RB_STORE_F16",
        StorageDType::BF16 => "RB_STORE_BF16",
    }
}

/// A device address as a kernel argument (0: none, for the optional `dyn_*` pointers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ptr(pub u64);

impl Ptr {
    pub const NONE: Ptr = Ptr(0);
}

/// One kernel argument, by value.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl From<Ptr> for Arg {
    fn from(p: Ptr) -> Self {
        Arg::Ptr(p.0)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::I64(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

/// The most arguments a kernel takes (rb_gemv3).
const MAX_ARGS: usize = 17;

/// A kernel and its arguments, ready for a driver to launch.
#[derive(Debug, Clone, Copy)]
pub struct KernelCall {
    pub name: &'static str,
    args: [Arg; MAX_ARGS],
    len: usize,
}

impl KernelCall {
    fn new(name: &'static str, given: &[Arg]) -> Self {
        let mut args = [Arg::I32(0); MAX_ARGS];
        args[..given.len()].copy_from_slice(given);
        Self {
            name,
            args,
            len: given.len(),
        }
    }

    pub fn args(&self) -> &[Arg] {
        &self.args[..self.len]
    }
}

/// Each kernel's signature as a function building its call, and [`KERNELS`], the list of
/// every kernel a driver loads.
macro_rules! kernels {
    ($($(#[$doc:meta])* fn $name:ident($($p:ident: $t:ty),* $(,)?);)*) => {
        $(
            $(#[$doc])*
            // A kernel's argument list is its ABI: one parameter per argument.
            #[allow(clippy::too_many_arguments)]
            pub fn $name($($p: $t),*) -> KernelCall {
                KernelCall::new(stringify!($name), &[$(Arg::from($p)),*])
            }
        )*
        /// Every kernel of ops.hip that the backends launch.
        pub const KERNELS: &[&str] = &[$(stringify!($name)),*];
    };
}

kernels! {
    fn rb_embed(table: Ptr, ids: Ptr, out: Ptr, width: i32, rows: i32);
    fn rb_add(a: Ptr, b: Ptr, out: Ptr, n: i64);
    fn rb_silu_mul(gate: Ptr, up: Ptr, out: Ptr, n: i64);
    fn rb_gelu_tanh_mul(gate: Ptr, up: Ptr, out: Ptr, n: i64);
    fn rb_add_bias(x: Ptr, bias: Ptr, n: i64, width: i64);
    /// `dyn_row`, when set, moves the destination to the step record's row.
    fn rb_copy(src: Ptr, dst: Ptr, n: i64, dyn_row: Ptr, width: i64);
    fn rb_perturb(x: Ptr, start: i64, n: i64, kind: i32, value: f32);
    fn rb_gemv(x: Ptr, w: Ptr, out: Ptr, rows: i32, k: i32, n: i32);
    /// With `norm_a` set (one row, k values of dynamic shared memory): the input is
    /// rms_norm(norm_a + norm_b) · norm_w, also stored into x, the sum into norm_sum.
    fn rb_gemv3(
        x: Ptr, w0: Ptr, w1: Ptr, w2: Ptr, o0: Ptr, o1: Ptr, o2: Ptr,
        rows: i32, k: i32, n0: i32, n1: i32, n2: i32,
        norm_a: Ptr, norm_b: Ptr, norm_w: Ptr, norm_sum: Ptr, eps: f32,
    );
    /// Gate and up columns in matching warps of a block, and act = silu(gate)·up; the
    /// norm as in rb_gemv3.
    fn rb_gemv_gate_up_silu(
        x: Ptr, wg: Ptr, wu: Ptr, g: Ptr, u: Ptr, act: Ptr, rows: i32, k: i32, n: i32,
        norm_a: Ptr, norm_b: Ptr, norm_w: Ptr, norm_sum: Ptr, eps: f32,
    );
    fn rb_matmul(x: Ptr, w: Ptr, out: Ptr, rows: i32, k: i32, n: i32);
    fn rb_rms_norm(x: Ptr, w: Ptr, out: Ptr, width: i32, eps: f32);
    fn rb_add_rms_norm(a: Ptr, b: Ptr, w: Ptr, sum: Ptr, out: Ptr, width: i32, eps: f32);
    /// `inv_freq` [`Ptr::NONE`]: base^(-2i/d) formed on the device, adjacent pairs (plain
    /// llama); otherwise the f32 table, `neox` pairing and `mscale` of
    /// [`RopeFreqs::Table`](crate::runtime::backend::RopeFreqs).
    fn rb_rope(
        x: Ptr, positions: Ptr, rows: i32, heads: i32, head_dim: i32, base: f32,
        inv_freq: Ptr, neox: i32, mscale: f32,
    );
    fn rb_rope_append(
        q: Ptr, k: Ptr, v: Ptr, k_cache: Ptr, v_cache: Ptr, positions: Ptr,
        rows: i32, n_head: i32, n_kv: i32, head_dim: i32, base: f32, dyn_row: Ptr, row0: i32,
        inv_freq: Ptr, neox: i32, mscale: f32,
    );
    fn rb_argmax(x: Ptr, width: i32, out: Ptr);
    /// The argmax into the step record's token, with the next step's other fields.
    fn rb_argmax_step(x: Ptr, width: i32, record: Ptr, pos: i32, rope_pos: f32, slot: i32);
    /// `window` 0: the whole prefix; else the sliding window (as the attention kernels).
    fn rb_softmax_causal(scores: Ptr, probs: Ptr, n_keys: i32, rows: i32, first_key: i32, window: i32);
    fn rb_attention_tiled_64(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, out: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_part_64(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, part: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_merge_64(part: Ptr, out: Ptr, n_head: i32, splits: i32);
    fn rb_attention_tiled_128(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, out: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_part_128(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, part: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_merge_128(part: Ptr, out: Ptr, n_head: i32, splits: i32);
    fn rb_attention_tiled_256(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, out: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_part_256(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, part: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, dyn_first: Ptr,
        window: i32,
    );
    fn rb_attention_merge_256(part: Ptr, out: Ptr, n_head: i32, splits: i32);
    /// Prefill attention on the tensor cores (`cuda`, f16/bf16 storage, sm_80+): blocks of
    /// 64 queries per head, 128 threads.
    fn rb_flash_attention_64(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, out: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, window: i32,
    );
    fn rb_flash_attention_128(
        q: Ptr, k_cache: Ptr, v_cache: Ptr, out: Ptr, rows: i32, n_head: i32, n_kv: i32, first_pos: i32, window: i32,
    );
    fn rb_dequant_f32(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_f16(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_bf16(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q8_0(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q4_0(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q4_1(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q4_k(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q6_k(src: Ptr, out: Ptr, blocks: i64);
    fn rb_dequant_q5_k(src: Ptr, out: Ptr, blocks: i64);
    fn rb_qgemv3_q4_0(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    fn rb_qgemv3_q4_1(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    fn rb_qgemv3_q8_0(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    fn rb_qgemv3_q4_k(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    fn rb_qgemv3_q5_k(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    fn rb_qgemv3_q6_k(w0: Ptr, w1: Ptr, w2: Ptr, x: Ptr, o0: Ptr, o1: Ptr, o2: Ptr, k: i32, n0: i32, n1: i32, n2: i32);
    /// `subs` sub-blocks of 32 values (matrix elements / 32).
    fn rb_qdequant_q4_0(w: Ptr, out: Ptr, subs: i64);
    fn rb_qdequant_q4_1(w: Ptr, out: Ptr, subs: i64);
    fn rb_qdequant_q8_0(w: Ptr, out: Ptr, subs: i64);
    fn rb_qdequant_q4_k(w: Ptr, out: Ptr, subs: i64);
    fn rb_qdequant_q5_k(w: Ptr, out: Ptr, subs: i64);
    fn rb_qdequant_q6_k(w: Ptr, out: Ptr, subs: i64);
}

/// The signature the tiled and split-keys attention kernels share (the last argument is
/// the sliding window, 0 for none).
pub type AttentionKernel = fn(Ptr, Ptr, Ptr, Ptr, i32, i32, i32, i32, Ptr, i32) -> KernelCall;
/// The merge of split attention's partial states.
pub type MergeKernel = fn(Ptr, Ptr, i32, i32) -> KernelCall;
/// A GGUF block decoder: raw blocks in, stored values out.
pub type DecodeKernel = fn(Ptr, Ptr, i64) -> KernelCall;

/// A device decoder of a GGUF type, with its block layout.
pub struct Decoder {
    pub kernel: DecodeKernel,
    pub block_values: usize,
    pub block_bytes: usize,
}

/// The device decoder of a GGUF type, where one exists.
pub fn decoder(dtype: GgmlDType) -> Option<Decoder> {
    let (kernel, block_values, block_bytes): (DecodeKernel, _, _) = match dtype {
        GgmlDType::F32 => (rb_dequant_f32, 1, 4),
        GgmlDType::F16 => (rb_dequant_f16, 1, 2),
        GgmlDType::BF16 => (rb_dequant_bf16, 1, 2),
        GgmlDType::Q8_0 => (rb_dequant_q8_0, 32, 34),
        GgmlDType::Q4_0 => (rb_dequant_q4_0, 32, 18),
        GgmlDType::Q4_1 => (rb_dequant_q4_1, 32, 20),
        GgmlDType::Q4K => (rb_dequant_q4_k, 256, 144),
        GgmlDType::Q5K => (rb_dequant_q5_k, 256, 176),
        GgmlDType::Q6K => (rb_dequant_q6_k, 256, 210),
        _ => return None,
    };
    Some(Decoder {
        kernel,
        block_values,
        block_bytes,
    })
}

/// Matvecs on up to three quantized matrices of one type and one input row: weights
/// w0..w2, x, outputs o0..o2, k, and each matrix's columns n0..n2 (0 for an unused one).
pub type QuantGemvKernel = fn(Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, i32, i32, i32, i32) -> KernelCall;
/// A quantized matrix dequantized into stored values: blocks, out, sub-blocks of 32.
pub type QuantDequantKernel = fn(Ptr, Ptr, i64) -> KernelCall;

/// The block matvec and the dequantizing kernel of a quantized type.
pub fn quant_kernels(ty: QuantType) -> (QuantGemvKernel, QuantDequantKernel) {
    match ty {
        QuantType::Q4_0 => (rb_qgemv3_q4_0, rb_qdequant_q4_0),
        QuantType::Q4_1 => (rb_qgemv3_q4_1, rb_qdequant_q4_1),
        QuantType::Q8_0 => (rb_qgemv3_q8_0, rb_qdequant_q8_0),
        QuantType::Q4K => (rb_qgemv3_q4_k, rb_qdequant_q4_k),
        QuantType::Q5K => (rb_qgemv3_q5_k, rb_qdequant_q5_k),
        QuantType::Q6K => (rb_qgemv3_q6_k, rb_qdequant_q6_k),
    }
}

/// Pieces per block of a quantized type, a piece being what one lane of
/// `rb_qgemv3_<type>` reads at a time (PIECES of its `rb_<type>` in ops.hip).
pub fn quant_gemv_pieces(ty: QuantType) -> usize {
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 => 4,
        QuantType::Q8_0 | QuantType::Q4K | QuantType::Q5K | QuantType::Q6K => 8,
    }
}

/// The fault kind and value rb_perturb takes.
pub fn fault_code(fault: Fault) -> (i32, f32) {
    match fault {
        Fault::Scale(v) => (0, v as f32),
        Fault::Offset(v) => (1, v as f32),
        Fault::Nan => (2, 0.0),
        Fault::Zero => (3, 0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::{DEQUANT_THREADS, KERNEL_SOURCE};
    use crate::runtime::gpu::plan::{ATTN_MAX_SPLITS, GEMV_ROWS, GEMV_THREADS};
    use crate::runtime::gpu::quant::Q6_K_DEVICE_BYTES;

    #[test]
    fn quantized_matvec_pieces_match_the_kernel_source() {
        use crate::quant::QuantType::*;
        for (ty, name, base) in [
            (Q4_0, "rb_q4_0", ""),
            (Q4_1, "rb_q4_1", ""),
            (Q8_0, "rb_q8_0", ""),
            (Q4K, "rb_q4_k", "rb_k_nibbles"),
            (Q5K, "rb_q5_k", "rb_k_nibbles"),
            (Q6K, "rb_q6_k", ""),
        ] {
            let (values, pieces) = (ty.block_values(), super::quant_gemv_pieces(ty));
            let declared = |name: &str| {
                let at = KERNEL_SOURCE.find(&format!("struct {name} ")).unwrap();
                let body = &KERNEL_SOURCE[at..];
                body[..body.find("\n};").unwrap()].to_string()
            };
            let text = if base.is_empty() {
                declared(name)
            } else {
                declared(base)
            };
            assert!(text.contains(&format!("VALUES = {values},")), "{name}: VALUES");
            assert!(text.contains(&format!("PIECES = {pieces},")), "{name}: PIECES");
        }
    }

    #[test]
    fn kernel_constants_match_the_launch_plans() {
        for define in [
            format!("#define RB_DEQUANT_THREADS {DEQUANT_THREADS}\n"),
            format!("#define RB_ATTN_MAX_SPLITS {ATTN_MAX_SPLITS}\n"),
            format!("#define RB_GEMV_THREADS {GEMV_THREADS}\n"),
            format!("#define RB_GEMV_ROWS {GEMV_ROWS}\n"),
            format!("#define RB_Q6_K_BYTES {Q6_K_DEVICE_BYTES}\n"),
        ] {
            assert!(
                KERNEL_SOURCE.contains(&define),
                "kernels/ops.hip lacks `{}`",
                define.trim()
            );
        }
    }

    /// The rules programmatic dependent launch rests on (compat.h): every kernel waits for
    /// the launch ahead before it touches memory. Most do it first thing; the decode
    /// matvecs do it in their shared bodies, after their first weight loads, so a kernel
    /// that writes a dequantized matrix lets the launch after it start only at its end;
    /// decode attention after its first loads of cache rows the launch ahead does not write.
    #[test]
    fn every_kernel_waits_for_the_launch_ahead_before_touching_memory() {
        let early_loaders = [
            "rb_gemv",
            "rb_gemv3",
            "rb_gemv_gate_up_silu",
            "rb_qgemv3_##T",
            "rb_attention_part_##HD",
        ];
        let mut kernels = 0;
        for (at, _) in KERNEL_SOURCE.match_indices("__global__ void ") {
            let rest = &KERNEL_SOURCE[at + "__global__ void ".len()..];
            let rest = match rest.strip_prefix("RB_LAUNCH_BOUNDS(") {
                Some(bounds) => &bounds[bounds.find(") ").unwrap() + 2..],
                None => rest,
            };
            let name = &rest[..rest.find('(').unwrap()];
            let body = &rest[rest.find('{').unwrap() + 1..];
            let first = body[..body.find(';').unwrap()]
                .trim_start_matches([' ', '\n', '\\'])
                .trim_end();
            kernels += 1;
            if early_loaders.contains(&name) {
                continue;
            }
            // A dequantized matrix is the weights of the matvec after, which loads them first.
            let wait = if name.contains("dequant") {
                "RB_WAIT_PRIOR_NEXT_AT_END()"
            } else {
                "RB_WAIT_PRIOR()"
            };
            assert_eq!(first, wait, "{name} touches memory before {wait}");
        }
        assert!(kernels >= 30, "found {kernels} kernel definitions");
        // The matvecs wait in rb_matvec_input, which computes a fused norm's row only after.
        let input = &KERNEL_SOURCE[KERNEL_SOURCE.find("rb_matvec_input(const store_t* x").unwrap()..];
        let first = input[input.find('{').unwrap() + 1..].trim_start();
        assert!(
            first.starts_with("RB_WAIT_PRIOR();"),
            "rb_matvec_input touches memory first"
        );
        for helper in ["void rb_warp_dots(", "void rb_qgemv3("] {
            let body = &KERNEL_SOURCE[KERNEL_SOURCE.find(helper).unwrap()..];
            let body = &body[..body.find("\n}").unwrap()];
            let loads = body
                .find("*(const uint4*)(wr")
                .or_else(|| body.find("Q::load("))
                .unwrap();
            let wait = body.find("rb_matvec_input(").unwrap();
            assert!(loads < wait, "{helper} waits before loading its first weights");
            assert!(!body[..wait].contains("x["), "{helper} reads x before waiting");
            assert!(!body[..wait].contains("xs("), "{helper} reads x before waiting");
        }
        // Attention loads only cache rows below the first query's position before waiting,
        // and q (which the launch ahead rotates) after.
        let body = &KERNEL_SOURCE[KERNEL_SOURCE.find("void rb_attention_part(").unwrap()..];
        let body = &body[..body.find("\n}").unwrap()];
        let wait = body.find("RB_WAIT_PRIOR();").unwrap();
        let early = &body[..wait];
        assert!(early.contains("rb_load_keys<KPW, DPL>(kr, vr, kc, vc, k0, k0, min(key_end, first_pos)"));
        assert_eq!(
            early.matches("rb_load_keys").count(),
            1,
            "attention loads more before waiting"
        );
        assert!(!early.contains("q["), "attention reads q before waiting");
    }
}
