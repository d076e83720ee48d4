//! Numerics profiles: the oracle imitating an engine's documented, intended numerics
//! (activation quantization before quantized matmuls, KV cache storage rounding) while
//! staying an independent implementation. Each rule rounds a tensor exactly as the engine
//! stores it (quantize → dequantize, scales rounded to f16 as ggml rounds them), and the
//! oracle then runs its own exact f32/f64 GEMM on the rounded values: so the reference
//! stays GEMM-agnostic and shares no code with any engine.
//!
//! Sources (llama.cpp as vendored by llama-cpp-python 0.3.36):
//! - `ggml/src/ggml-cpu/ggml-cpu.c` `type_traits_cpu[].vec_dot_type` and
//!   `ggml_compute_forward_mul_mat` (activations converted with the vec_dot type's
//!   `from_float` before every matmul with a quantized or f16 weight);
//! - `ggml/src/ggml-cpu/arch/x86/quants.c` `quantize_row_q8_0`/`quantize_row_q8_1` (AVX2:
//!   `d = amax/127` stored as f16, `q = round_half_even(x·(127/amax))`, q8_1's block sum
//!   `s = f16(d·Σq)`) and `ggml_vec_dot_q4_1_q8_1` (`Σ d_w·d_a·Σq_w·q_a + m_w·s_a`);
//! - `ggml/src/ggml-quants.c` `quantize_row_q8_K_ref` (K-quants: `iscale = -127/max` of the
//!   signed extreme, `d = 1/iscale` kept in f32, `q = min(127, nearest_int(iscale·x))`);
//! - `src/llama-graph.cpp` `build_attn_mha` without flash attention: `kq = mul_mat(k_cache,
//!   q)` and `kqv = mul_mat(v_cache, softmax(kq))`, both with f16 caches, so q and the
//!   softmax output are converted to f16 (`ggml_cpu_fp32_to_fp16`, round half to even);
//! - `ggml/src/ggml-cuda/quantize.cu` `quantize_mmq_q8_1` (q8_1 activations for every
//!   quantized type, `q = roundf(x·d_inv)` with `d_inv = 127/amax` and `d = 1/d_inv` on
//!   the approximate units of `-use_fast_math`, [`crate::mufu`]; `s = f16(Σx)`) and cuBLAS
//!   for f16 weights (activations converted to f16); `norm.cu` `rms_norm_f32`.

use std::fmt;

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

use crate::mufu;
use crate::ops::NormRule;

/// A named set of numerics rules the oracle follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Exact dequantized weights, f32/f64 activations everywhere (the reference as such).
    #[default]
    Exact,
    /// llama.cpp's CPU backend on x86-64 with AVX2, flash attention off, f16 KV cache.
    LlamacppCpu,
    /// llama.cpp's CUDA backend (MMQ, cuBLAS for f16 weights), flash attention off, f16 KV cache.
    LlamacppCuda,
}

/// The KV cache storage type an engine rounds K and V to (llama.cpp's `--cache-type-k/-v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    F16,
    Q8_0,
    Q4_0,
}

/// How activations are rounded before a matmul with one weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActRounding {
    /// Kept as computed.
    None,
    F16,
    Bf16,
    /// ggml-cpu x86 q8_0: blocks of 32, f16 scale, round half to even of `x·127/amax`.
    Q8_0Cpu,
    /// As [`Q8_0Cpu`](Self::Q8_0Cpu), plus the block sum `s = f16(d·Σq)` the dot uses.
    Q8_1Cpu,
    /// ggml q8_K: blocks of 256, f32 scale from the signed extreme.
    Q8K,
    /// ggml-cuda MMQ q8_1: round half away from zero of `x·127/amax`, `s = f16(Σx)`.
    Q8_1Cuda,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Self::Exact, Self::LlamacppCpu, Self::LlamacppCuda];

    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::LlamacppCpu => "llamacpp-cpu",
            Self::LlamacppCuda => "llamacpp-cuda",
        }
    }

    /// The profile named `s`; the error lists the known names.
    pub fn parse(s: &str) -> Result<Self> {
        match Self::ALL.iter().find(|p| p.name() == s) {
            Some(&p) => Ok(p),
            None => bail!(
                "unknown numerics profile {s:?} (known: {})",
                Self::ALL.map(Self::name).join(", ")
            ),
        }
    }

    /// One line per rule, for reports: what is rounded and where llama.cpp does it.
    pub fn rules(self) -> &'static [&'static str] {
        match self {
            Self::Exact => &["no rounding: exact dequantized weights, activations as computed"],
            Self::LlamacppCpu => &[
                "activations before a matmul are quantized to the weight type's vec_dot_type \
                 (Q4_0/Q5_0/Q8_0 → q8_0, Q4_1/Q5_1 → q8_1 with its f16 block sum, K-quants → q8_K, \
                 F16 → f16, BF16 → bf16; ggml-cpu.c type_traits_cpu, arch/x86/quants.c)",
                "K and V rounded to the f16 KV cache, q and softmax(kq) to f16 for the two \
                 attention matmuls (llama-graph.cpp build_attn_mha, flash attention off)",
                "RoPE angles in f32, each pair's angle the previous one times powf(base, -2/n_dims) \
                 (ggml-cpu ops.cpp ggml_rope_cache_init, rope_yarn)",
                "GELU through ggml-cpu's f16 table: input and output rounded to f16 \
                 (vec.h GGML_GELU_FP16, ggml-cpu.c ggml_table_gelu_f16)",
            ],
            Self::LlamacppCuda => &[
                "activations before a quantized matmul are quantized to q8_1 (round half away \
                 from zero of x·(127/amax), the division and d = 1/(127/amax) on the GPU's \
                 approximate reciprocal, block sum f16(Σx) in the kernel's order; ggml-cuda \
                 quantize.cu quantize_mmq_q8_1 under -use_fast_math); F16 weights use cuBLAS on \
                 f16 activations",
                "RMSNorm as ggml-cuda's rms_norm_f32 sums (FMA partial sums over 256 or 1024 \
                 threads, shuffle butterflies), with sum·rcp(n) + eps in one FMA and the \
                 approximate rsqrt (norm.cu; the units measured on sm_90, crate::mufu)",
                "K and V rounded to the f16 KV cache, q and softmax(kq) to f16 (flash attention off)",
            ],
        }
    }

    /// How activations are rounded before a matmul with a `weight` of this type.
    pub fn activation_rounding(self, weight: GgmlDType) -> ActRounding {
        use GgmlDType as T;
        match self {
            Self::Exact => ActRounding::None,
            Self::LlamacppCpu => match weight {
                T::F32 => ActRounding::None,
                T::F16 => ActRounding::F16,
                T::BF16 => ActRounding::Bf16,
                T::Q4_0 | T::Q5_0 | T::Q8_0 => ActRounding::Q8_0Cpu,
                T::Q4_1 | T::Q5_1 | T::Q8_1 => ActRounding::Q8_1Cpu,
                _ => ActRounding::Q8K,
            },
            Self::LlamacppCuda => match weight {
                T::F32 => ActRounding::None,
                T::F16 => ActRounding::F16,
                T::BF16 => ActRounding::Bf16,
                _ => ActRounding::Q8_1Cuda,
            },
        }
    }

    /// The KV cache storage type, `None` for the exact profile.
    pub fn kv_cache(self) -> Option<CacheType> {
        match self {
            Self::Exact => None,
            Self::LlamacppCpu | Self::LlamacppCuda => Some(CacheType::F16),
        }
    }

    /// Whether RoPE angles are formed as ggml's CPU backend forms them (f32, each pair's
    /// angle the previous one times `theta_scale`; [`crate::ggml_rope`]). The CUDA
    /// kernel computes `pos·powf(theta_scale, i0/2)` per pair instead, not imitated.
    pub fn rope_angles_stepwise_f32(self) -> bool {
        self == Self::LlamacppCpu
    }

    /// How RMSNorm sums and scales: as ggml-cuda's kernel under the CUDA profile, else
    /// from squares summed in f64 (ggml-cpu; the closest to exact for `exact`).
    pub fn norm_rule(self) -> NormRule {
        match self {
            Self::LlamacppCuda => NormRule::GgmlCuda,
            Self::Exact | Self::LlamacppCpu => NormRule::F64Sum,
        }
    }

    /// Whether a GELU goes through ggml-cpu's f16 table ([`gelu_f16_table`]): ggml-cpu
    /// defines `GGML_GELU_FP16` (vec.h), the CUDA backend computes GELU in f32.
    pub fn gelu_through_f16_table(self) -> bool {
        self == Self::LlamacppCpu
    }

    /// Whether the query and the softmax output are rounded to f16 for the attention
    /// matmuls against an f16 cache (ggml converts src1 to the f16 weight's vec_dot_type).
    pub fn attention_in_f16(self) -> bool {
        self != Self::Exact
    }

    /// Layer 0's taps that the profile reproduces up to summation order: computed from
    /// the embedding, which both sides read exactly, with every rounding to a coarse grid
    /// (8-bit blocks, f16) applied to values that are still identical, so no rounding
    /// decision can differ. Measured against llama.cpp on SmolLM2 Q4_1, 1652 tokens, worst
    /// row rel L2: attn_norm 0 and q, k, v ≤ 7.7e-7 on CPU (AVX2 and AVX-512); on the H200
    /// attn_norm 0 and q_pre_rope, k_pre_rope, v ≤ 7.0e-7, but q and k up to 1e-4 (the
    /// fast-math RoPE is not imitated), so the CUDA list stops before RoPE
    /// (docs/validation.md). Later taps follow a rounding of unequal values: the softmax
    /// output to f16, the attention output to 8 bits.
    pub fn layer0_taps_without_rounding_flips(self) -> &'static [&'static str] {
        match self {
            Self::Exact => &[],
            Self::LlamacppCpu => &["attn_norm", "q_pre_rope", "k_pre_rope", "v", "q", "k"],
            Self::LlamacppCuda => &["attn_norm", "q_pre_rope", "k_pre_rope", "v"],
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the engine's dot product with a `weight` block uses the activation block sum
/// `s` for the weight's per-block offset (`m` of Q4_1/Q5_1) rather than `d·Σq`: then the
/// oracle adds `offset · (s - d·Σq)` per block ([`weight_block_offsets`]).
pub fn uses_block_sum(rounding: ActRounding, weight: GgmlDType) -> bool {
    matches!(rounding, ActRounding::Q8_1Cpu | ActRounding::Q8_1Cuda)
        && matches!(weight, GgmlDType::Q4_1 | GgmlDType::Q5_1)
}

/// ggml-cpu's GELU of `x` through its f16 table (vec.h `ggml_vec_gelu_f32` and
/// `ggml_vec_geglu_f32` under `GGML_GELU_FP16`; the table from ggml-cpu.c
/// `ggml_table_gelu_f16`): `x` rounded to f16, the tanh-approximated GELU of that value
/// computed in f32 and rounded to f16; inputs at or below -10 give 0, at or above 10 `x`.
pub fn gelu_f16_table(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let h = f16::from_f32(x).to_f32();
        let g = 0.5 * h * (1.0 + (SQRT_2_OVER_PI * h * (1.0 + 0.044715 * h * h)).tanh());
        f16::from_f32(g).to_f32()
    }
}

/// Per-block offsets `m` (f16 → f32) of a Q4_1/Q5_1 weight of `rows` rows and `cols`
/// columns (ggml order: a row is contiguous): `[rows, cols / 32]`, row-major. `None` for
/// other types. Layout: ggml-common.h `block_q4_1 {d, m, qs[16]}`, `block_q5_1 {d, m, qh[4], qs[16]}`.
pub fn weight_block_offsets(dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Result<Option<Vec<f32>>> {
    let block_bytes = match dtype {
        GgmlDType::Q4_1 => 20,
        GgmlDType::Q5_1 => 24,
        _ => return Ok(None),
    };
    let blocks = rows * cols / 32;
    if !cols.is_multiple_of(32) || data.len() != blocks * block_bytes {
        bail!(
            "{dtype:?} weight of {rows}×{cols}: {} bytes are not {blocks} blocks",
            data.len()
        );
    }
    Ok(Some(
        data.chunks_exact(block_bytes)
            .map(|b| f16::from_le_bytes([b[2], b[3]]).to_f32())
            .collect(),
    ))
}

/// Rows of `width` activations rounded as `rounding` stores them. Returns the rounded
/// values and, for q8_1, per block of 32 the difference `s - d·Σq` between the block sum
/// the engine's dot product uses and the sum of the rounded values (`[rows, width/32]`).
pub fn round_activations(x: &[f32], width: usize, rounding: ActRounding) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let block = match rounding {
        ActRounding::None | ActRounding::F16 | ActRounding::Bf16 => 1,
        ActRounding::Q8K => 256,
        _ => 32,
    };
    if !width.is_multiple_of(block) || !x.len().is_multiple_of(width.max(1)) {
        bail!("{rounding:?} rounds rows in blocks of {block}, not rows of {width}");
    }
    let mut out = x.to_vec();
    let sums = matches!(rounding, ActRounding::Q8_1Cpu | ActRounding::Q8_1Cuda);
    let mut corrections = if sums { vec![0f32; x.len() / 32] } else { Vec::new() };
    match rounding {
        ActRounding::None => {}
        ActRounding::F16 => out.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        ActRounding::Bf16 => out.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        ActRounding::Q8K => out.chunks_exact_mut(256).for_each(round_q8_k),
        ActRounding::Q8_0Cpu | ActRounding::Q8_1Cpu | ActRounding::Q8_1Cuda => {
            for (b, c) in out
                .chunks_exact_mut(32)
                .zip(corrections.iter_mut().map(Some).chain(std::iter::repeat_with(|| None)))
            {
                let correction = round_q8_32(b, rounding);
                if let Some(c) = c {
                    *c = correction;
                }
            }
        }
    }
    Ok((out, sums.then_some(corrections)))
}

/// One block of 32 through q8_0/q8_1 and back; returns `s - d·Σq` (0 for q8_0).
fn round_q8_32(b: &mut [f32], rounding: ActRounding) -> f32 {
    if rounding == ActRounding::Q8_1Cuda {
        return round_q8_1_cuda(b);
    }
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let d16 = f16::from_f32(d).to_f32();
    let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut q_sum = 0i32;
    for v in b.iter_mut() {
        // AVX2 `_mm256_round_ps(_MM_ROUND_NEAREST)`: ties to even.
        let q = (*v * inv).round_ties_even();
        q_sum += q as i32;
        *v = d16 * q;
    }
    match rounding {
        ActRounding::Q8_1Cpu => {
            let s = f16::from_f32(d * q_sum as f32).to_f32();
            (s as f64 - d16 as f64 * q_sum as f64) as f32
        }
        _ => 0.0,
    }
}

/// One block of 32 as ggml-cuda's `quantize_mmq_q8_1` (DS4 layout) stores it, compiled with
/// `-use_fast_math`: `d_inv = 127 ÷ amax` and `d = 1 ÷ d_inv` on the approximate reciprocal
/// ([`mufu`]), `q = roundf(x·d_inv)` (ties away from zero), `d` and the block sum `s` in
/// f16, `s` summed as the kernel sums it (four values per lane, then a shuffle butterfly
/// over eight lanes). Returns `s - d·Σq`.
fn round_q8_1_cuda(b: &mut [f32]) -> f32 {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut lanes = [0f32; 8];
    for (l, v) in lanes.iter_mut().zip(b.chunks_exact(4)) {
        *l = ((v[0] + v[1]) + v[2]) + v[3];
    }
    let s = f16::from_f32(butterfly_sum(&mut lanes)).to_f32();
    if amax < f32::MIN_POSITIVE {
        // d_inv = ∞ and every product NaN, stored as q = 0 with d = 1/∞ = 0.
        b.iter_mut().for_each(|v| *v = 0.0);
        return s;
    }
    let d_inv = mufu::div_approx(127.0, amax);
    let d16 = f16::from_f32(mufu::rcp_approx(d_inv)).to_f32();
    let mut q_sum = 0i32;
    for v in b.iter_mut() {
        let q = (*v * d_inv).round();
        q_sum += q as i32;
        *v = d16 * q;
    }
    (s as f64 - d16 as f64 * q_sum as f64) as f32
}

/// The value lane 0 holds after a CUDA XOR-shuffle reduction (`x += shfl_xor(x, o)` for
/// `o = n/2, …, 1`) of `lanes` (a power of two of them, at most 32), which it overwrites.
pub(crate) fn butterfly_sum(lanes: &mut [f32]) -> f32 {
    let n = lanes.len();
    let mut o = n / 2;
    while o > 0 {
        let mut next = [0f32; 32];
        for (l, out) in next[..n].iter_mut().enumerate() {
            *out = lanes[l] + lanes[l ^ o];
        }
        lanes.copy_from_slice(&next[..n]);
        o /= 2;
    }
    lanes[0]
}

/// One block of 256 through q8_K and back (`quantize_row_q8_K_ref`).
fn round_q8_k(b: &mut [f32]) {
    // The signed value of the first largest magnitude.
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b.iter() {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        b.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for v in b.iter_mut() {
        // nearest_int: the 1.5·2^23 trick, i.e. round half to even.
        let q = (iscale * *v).round_ties_even().min(127.0);
        *v = d * q;
    }
}

/// Values rounded through the KV cache type `cache` (rows of `width`): f16 round trip, or
/// q8_0/q4_0 blocks as `quantize_row_q8_0` (AVX2) and `quantize_row_q4_0_ref` store them.
pub fn round_cache(x: &[f32], width: usize, cache: CacheType) -> Result<Vec<f32>> {
    match cache {
        CacheType::F16 => Ok(round_activations(x, width, ActRounding::F16)?.0),
        CacheType::Q8_0 => Ok(round_activations(x, width, ActRounding::Q8_0Cpu)?.0),
        CacheType::Q4_0 => {
            if !width.is_multiple_of(32) {
                bail!("a q4_0 KV cache needs rows in blocks of 32, not rows of {width}");
            }
            let mut out = x.to_vec();
            out.chunks_exact_mut(32).for_each(round_q4_0);
            Ok(out)
        }
    }
}

/// One block of 32 through q4_0 and back (`quantize_row_q4_0_ref`: `d = max/-8` of the
/// signed extreme, `q = min(15, (int)(x/d + 8.5))`, value `f16(d)·(q - 8)`).
fn round_q4_0(b: &mut [f32]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b.iter() {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let d16 = f16::from_f32(d).to_f32();
    for v in b.iter_mut() {
        let q = ((*v * id + 8.5) as i32).min(15);
        *v = d16 * (q - 8) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block whose q8 rounding is worked out by hand: amax 2.54 → d = 0.02,
    /// f16(0.02) = 0.0200042724609375; x·127/2.54 = 50·x exactly in the decimal sense.
    fn hand_block() -> Vec<f32> {
        let mut b = vec![0f32; 32];
        b[0] = 2.54;
        b[1] = -1.27; // 50·(-1.27) = -63.5 → ties: even -64 (CPU), away -64 (CUDA)
        b[2] = 0.01; // 0.5 → 0 (even) on the CPU, 1 (away) on CUDA
        b[3] = 0.03; // 1.5 → 2 both
        b[4] = -0.5; // -25
        b
    }

    #[test]
    fn q8_0_cpu_round_trip_matches_hand_values() {
        let (out, sums) = round_activations(&hand_block(), 32, ActRounding::Q8_0Cpu).unwrap();
        let d16 = f16::from_f32(2.54f32 / 127.0).to_f32();
        assert_eq!(d16 as f64, 0.020_004_272_460_937_5);
        // x·(127/2.54) in f32 may land a hair off the decimal tie; compute it as ggml does.
        let inv = 127f32 / 2.54;
        let q: Vec<f32> = [2.54f32, -1.27, 0.01, 0.03, -0.5]
            .iter()
            .map(|x| (x * inv).round_ties_even())
            .collect();
        assert_eq!(q[0], 127.0);
        assert_eq!(q[4], -25.0);
        for (i, qi) in q.iter().enumerate() {
            assert_eq!(out[i], d16 * qi, "element {i}");
        }
        assert!(out[5..].iter().all(|&v| v == 0.0));
        assert!(sums.is_none());
    }

    #[test]
    fn q8_1_block_sum_correction_is_f16_rounding_of_d_times_sum() {
        let (out, sums) = round_activations(&hand_block(), 32, ActRounding::Q8_1Cpu).unwrap();
        let d = 2.54f32 / 127.0;
        let d16 = f16::from_f32(d).to_f32();
        let q_sum: f32 = out.iter().map(|v| (v / d16).round()).sum();
        let s = f16::from_f32(d * q_sum).to_f32();
        let c = sums.unwrap();
        assert_eq!(c.len(), 1);
        assert!((c[0] as f64 - (s as f64 - d16 as f64 * q_sum as f64)).abs() < 1e-9);
    }

    #[test]
    fn q8_1_cuda_rounds_ties_away_and_sums_the_unquantized_block() {
        let x = hand_block();
        let (out, sums) = round_activations(&x, 32, ActRounding::Q8_1Cuda).unwrap();
        let d_inv = mufu::div_approx(127.0, 2.54);
        let d16 = f16::from_f32(mufu::rcp_approx(d_inv)).to_f32();
        for (i, v) in x.iter().enumerate() {
            assert_eq!(out[i], d16 * (v * d_inv).round(), "element {i}");
        }
        let q_sum: f64 = out.iter().map(|v| (v / d16).round() as f64).sum();
        let mut lanes = [0f32; 8];
        for (l, v) in lanes.iter_mut().zip(x.chunks_exact(4)) {
            *l = ((v[0] + v[1]) + v[2]) + v[3];
        }
        let s = f16::from_f32(butterfly_sum(&mut lanes)).to_f32() as f64;
        assert!((sums.unwrap()[0] as f64 - (s - d16 as f64 * q_sum)).abs() < 1e-9);
    }

    /// Layer 0 of SmolLM2-135M at position 9 of long_1652, block 15 of attn_norm, as
    /// llama.cpp's CUDA build on an H200 computed it. With an IEEE `127/amax`, element 6
    /// scales to exactly 27.5 and rounds to 28; the GPU's approximate reciprocal gives
    /// 27.499998, so 27, and only 27 reproduces llama.cpp's q_pre_rope row.
    #[test]
    fn q8_1_cuda_divides_with_the_gpus_approximate_reciprocal() {
        const BITS: [u32; 32] = [
            0x3c0ebc51, 0xbefecd9a, 0xbd092585, 0xbb75c651, 0xbba35f41, 0xb9df8fd2, 0x3ddcb214, 0x3cbee32c, 0xb93649f2,
            0xbb54d04a, 0x3b93e50d, 0xbb2db0b9, 0x3be670cd, 0x3bd2f35c, 0xbc2bca9e, 0x3ceb74d9, 0xbbb79421, 0x3b7c393c,
            0xbce9cef3, 0x3d065a20, 0xbb3649f2, 0xba8c9603, 0x3c099395, 0xbb5e20f4, 0x3ba3f201, 0xbcb1fd56, 0x3ce6276d,
            0x3e483d00, 0xbaaf68f8, 0x80000000, 0xbcb0fc87, 0xbaadcc3d,
        ];
        let x = BITS.map(f32::from_bits);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!((x[6] * (127.0 / amax)).round(), 28.0);
        let (out, _) = round_activations(&x, 32, ActRounding::Q8_1Cuda).unwrap();
        let d16 = f16::from_f32(mufu::rcp_approx(mufu::div_approx(127.0, amax))).to_f32();
        assert_eq!(out[6], 27.0 * d16);
    }

    #[test]
    fn q8_k_uses_the_signed_extreme_and_an_f32_scale() {
        let mut x = vec![0.25f32; 256];
        x[7] = -3.0;
        let (out, _) = round_activations(&x, 256, ActRounding::Q8K).unwrap();
        // iscale = -127/-3 = 42.333..; d = 1/iscale; -3 → q = -127; 0.25 → round(10.58) = 11.
        let iscale = -127f32 / -3.0;
        assert_eq!(out[7], -127.0 * (1.0 / iscale));
        assert_eq!(out[0], 11.0 * (1.0 / iscale));
        assert!((out[7] + 3.0).abs() < 1e-6);
    }

    #[test]
    fn f16_cache_rounds_half_to_even() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10 in f16: ties to even → 1.
        let x = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65504.0, 1e-8];
        let out = round_cache(&x, 4, CacheType::F16).unwrap();
        assert_eq!(
            out,
            vec![1.0, 1.0 + 2.0 * 2f32.powi(-10), 65504.0, f16::from_f32(1e-8).to_f32()]
        );
    }

    #[test]
    fn q4_0_cache_round_trip_matches_hand_values() {
        let mut b = vec![0f32; 32];
        b[0] = -8.0; // extreme: d = 1, q = 0 → -8
        b[1] = 3.4; // 3.4 + 8.5 = 11.9 → 11 → 3
        b[2] = 7.9; // 16.4 → 16 → min 15 → 7
        let out = round_cache(&b, 32, CacheType::Q4_0).unwrap();
        assert_eq!(&out[..3], &[-8.0, 3.0, 7.0]);
        assert_eq!(out[3], 0.0);
    }

    #[test]
    fn gelu_goes_through_f16_on_both_sides_and_saturates_at_ten() {
        // 1.0001 rounds to the f16 1.0; GELU(1) = 0.841192 rounds to the f16 0.84130859375.
        assert_eq!(gelu_f16_table(1.0001), 0.841_308_6);
        assert_eq!(gelu_f16_table(-10.0), 0.0);
        assert_eq!(gelu_f16_table(12.5), 12.5);
        assert_eq!(gelu_f16_table(0.0), 0.0);
    }

    #[test]
    fn weight_types_map_to_their_vec_dot_types() {
        let cpu = Profile::LlamacppCpu;
        assert_eq!(cpu.activation_rounding(GgmlDType::Q4_0), ActRounding::Q8_0Cpu);
        assert_eq!(cpu.activation_rounding(GgmlDType::Q4_1), ActRounding::Q8_1Cpu);
        assert_eq!(cpu.activation_rounding(GgmlDType::Q6K), ActRounding::Q8K);
        assert_eq!(cpu.activation_rounding(GgmlDType::F16), ActRounding::F16);
        assert_eq!(cpu.activation_rounding(GgmlDType::F32), ActRounding::None);
        assert_eq!(Profile::Exact.activation_rounding(GgmlDType::Q4_1), ActRounding::None);
        assert_eq!(
            Profile::LlamacppCuda.activation_rounding(GgmlDType::Q4K),
            ActRounding::Q8_1Cuda
        );
        assert_eq!(Profile::parse("llamacpp-cpu").unwrap(), cpu);
        assert!(Profile::parse("llamacpp").is_err());
    }
}
