//! Quantized weights read in their GGUF blocks (`--weights native`): the `cpu` backend's
//! block decoders against the reference's dequantization (candle's), its fused quantized
//! matmul against the dense product, and a bisect of the native path against the
//! dequantize-at-load path naming the first layer of a type with a block-layout fault.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resbisect::quant::{QuantMatrix, QuantType};
use resbisect::runtime::backend::{Backend, StorageDType};
use resbisect::runtime::cpu::CpuBackend;

use crate::bisect::bisect_json;

/// An odd `[n, k]` matrix (k: three K-quant super-blocks) quantized by candle, with its
/// exact dequantization by candle (what the reference computes on).
fn quantized(ty: QuantType, n: usize, k: usize, seed: u64) -> (QuantMatrix, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    let t = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ty.ggml()).unwrap();
    let data = q.data().unwrap().into_owned();
    let reference = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (QuantMatrix::new("test", ty, &[k, n], &data).unwrap(), reference)
}

#[test]
fn quant_blocks_decode_exactly_as_the_reference_dequantizes() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let (n, k) = (37, 768);
        let (m, reference) = quantized(ty, n, k, 7 + i as u64);
        let mut decoded = vec![0f32; n * k];
        for (j, row) in decoded.chunks_exact_mut(k).enumerate() {
            m.decode_row(j, row);
        }
        // Formed in f32 in ggml's order: bit-identical, not merely close.
        let differing = decoded
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{}: {differing} of {} values differ", ty.name(), n * k);
    }
}

fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    num / den
}

#[test]
fn quant_matmul_on_cpu_matches_the_dense_product() {
    let cpu = CpuBackend::new(StorageDType::F32);
    let (n, k) = (333, 768);
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let (m, dense) = quantized(ty, n, k, 100 + i as u64);
        let w = cpu.upload(&dense).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(200 + i as u64);
        // 1 and 3 rows: the fused decode path; 37 and 300: prefill's decoded tiles.
        for rows in [1, 3, 37, 300] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let x = cpu.upload(&x).unwrap();
            let (mut fused, mut plain) = (cpu.alloc(rows * n).unwrap(), cpu.alloc(rows * n).unwrap());
            cpu.matmul_quant(&x, &m, rows, k, n, &mut fused).unwrap();
            cpu.matmul(&x, &w, rows, k, n, &mut plain).unwrap();
            if rows > 4 {
                // Tiles of decoded rows through the same GEMM: each output the same sum.
                assert_eq!(fused, plain, "{} rows {rows}", ty.name());
                continue;
            }
            let e = nmse(&fused, &plain);
            // Only the summation order differs (per block, then across blocks): measured
            // NMSE ≤ 4.6e-14 in f32 on these shapes (x86-64-v3). 1e-11 leaves over two
            // decades for other CPUs' lanes and FMA.
            assert!(e <= 1e-11, "{} rows {rows}: NMSE {e:e}", ty.name());
        }
    }
}

/// In f16 and bf16 storage, prefill's tiles are rounded as a weight uploaded dense is:
/// the quantized prefill equals the dense one bit for bit.
#[test]
fn quant_prefill_on_cpu_rounds_tiles_as_dense_weights_are_rounded() {
    let (n, k, rows) = (333, 768, 37);
    for dtype in [StorageDType::F16, StorageDType::BF16] {
        let cpu = CpuBackend::new(dtype);
        for (i, ty) in QuantType::ALL.into_iter().enumerate() {
            let (m, dense) = quantized(ty, n, k, 300 + i as u64);
            let mut rng = ChaCha8Rng::seed_from_u64(400 + i as u64);
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let (x, w) = (cpu.upload(&x).unwrap(), cpu.upload(&dense).unwrap());
            let (mut fused, mut plain) = (cpu.alloc(rows * n).unwrap(), cpu.alloc(rows * n).unwrap());
            cpu.matmul_quant(&x, &m, rows, k, n, &mut fused).unwrap();
            cpu.matmul(&x, &w, rows, k, n, &mut plain).unwrap();
            assert_eq!(fused, plain, "{} in {dtype:?}", ty.name());
        }
    }
}

#[test]
fn quant_rejects_a_matrix_that_is_not_whole_blocks() {
    let err = QuantMatrix::new("blk.0.attn_q.weight", QuantType::Q4K, &[100, 3], &[0u8; 10]).unwrap_err();
    assert!(err.to_string().contains("blk.0.attn_q.weight"), "{err}");
}

/// SmolLM2's layers are all Q4_1 (its embedding Q8_0, dequantized in both modes): a
/// nibble-order fault in the native Q4_1 path diverges from the dequantize-at-load path
/// first in layer 0's first Q4_1 matmul.
#[test]
fn quant_bisect_native_against_dequant_names_the_first_layer_of_a_faulty_type() {
    let dir = tempfile::tempdir().unwrap();
    let (code, r) = bisect_json(
        &[
            "--tokens",
            "1,504,3287,282,253,1345,30,2489,314,4013,28,8420,1176,288,260,3067,282,4218,30,5640,1745,18,9,2,411,2270,30,2115,314,4582,907,198",
            "--inject",
            "q4_1:swap_nibbles@0",
            "--oracle",
            "runtime",
            "--oracle-weights",
            "dequant",
            "--no-replay",
        ],
        &dir.path().join("work"),
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["outcome"], "diverged", "{r}");
    let tap = r["first"]["tap"].as_str().unwrap();
    assert!(
        tap == "blk.0.q_pre_rope" || tap == "blk.0.k_pre_rope",
        "first divergent tap {tap}: {r}"
    );
}
