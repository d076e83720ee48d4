//! Blocked attention against a textbook per-row attention on odd shapes.
use super::*;
use crate::attention::element::Element;

/// Uniform values in [-2, 2) from a fixed-seed xorshift, as an `[rows, cols]` tensor.
fn random(rows: usize, cols: usize, seed: &mut u64) -> Tensor {
    let values: Vec<f64> = (0..rows * cols)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("shape fits")
}

/// The textbook attention, one query row and head at a time in f64: scores over the
/// visible keys, max-subtracted exponentials, normalized (through f16 when asked),
/// times V.
fn per_row(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    positions: &[usize],
    h: Heads,
    window: Option<usize>,
    f16: bool,
) -> Vec<f64> {
    let (hd, group) = (h.head_dim, h.n_head / h.n_head_kv);
    let (qw, kvw) = (h.n_head * hd, h.n_head_kv * hd);
    let mut out = vec![0.0; positions.len() * qw];
    for (i, &p) in positions.iter().enumerate() {
        let keys = window.map_or(0, |w| (p + 1).saturating_sub(w))..p + 1;
        for head in 0..h.n_head {
            let (qi, kv) = (&q[i * qw + head * hd..][..hd], head / group * hd);
            let dot = |j: usize| (0..hd).map(|d| qi[d] * k[j * kvw + kv + d]).sum::<f64>() / (hd as f64).sqrt();
            let scores: Vec<f64> = keys.clone().map(dot).collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (s, j) in scores.iter().zip(keys.clone()) {
                let prob = (s - max).exp() / sum;
                let prob = if f16 { prob.through_f16() } else { prob };
                for d in 0..hd {
                    out[i * qw + head * hd + d] += prob * v[j * kvw + kv + d];
                }
            }
        }
    }
    out
}

/// The worst per-row relative L2 distance between two `[rows, width]` outputs.
fn worst_row_rel_l2(got: &[f64], want: &[f64], width: usize) -> f64 {
    got.chunks(width)
        .zip(want.chunks(width))
        .map(|(g, w)| {
            let diff: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum();
            (diff / w.iter().map(|b| b * b).sum::<f64>()).sqrt()
        })
        .fold(0.0, f64::max)
}

/// Blocked attention against [`per_row`] on odd shapes: GQA groups of 3, head size
/// 12, 700 keys (two full key blocks and a partial one), windows narrower and wider
/// than a block, runs of consecutive queries longer than a query block, and scattered
/// positions (replay's). Measured worst per-row rel L2 against the f64 rows: f64
/// 2.3e-15 (1.4e-15 with probabilities through f16: the f16 rounding is applied to
/// the same normalized values), f32 7.2e-7 (f32 sums and exp), f32 through f16
/// 1.3e-4 (an f32 probability near an f16 rounding boundary rounds the other way
/// from f64's); the bounds leave 7× (f64: 40×) headroom.
#[test]
fn blocked_attention_matches_per_row_attention() -> Result<()> {
    let heads = Heads {
        n_head: 6,
        n_head_kv: 2,
        head_dim: 12,
    };
    let keys = 700;
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let (k, v) = (random(keys, 24, &mut seed), random(keys, 24, &mut seed));
    let scattered = vec![0, 3, 4, 5, 255, 256, 257, 300, 511, 512, 699];
    let all: Vec<usize> = (0..keys).collect();
    let tail: Vec<usize> = (390..keys).collect();
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f64>();
    for positions in [&all, &tail, &scattered] {
        let q = random(positions.len(), 72, &mut seed);
        for window in [None, Some(1), Some(100), Some(300)] {
            for (dtype, f16, bound) in [
                (DType::F64, false, 1e-13),
                (DType::F64, true, 1e-13),
                (DType::F32, false, 5e-6),
                (DType::F32, true, 1e-3),
            ] {
                let (qt, kt, vt) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                let got = attention(&qt, &kt, &vt, positions, heads, window, f16)?.to_dtype(DType::F64)?;
                let (q, k, v) = (
                    flat(&qt.to_dtype(DType::F64)?)?,
                    flat(&kt.to_dtype(DType::F64)?)?,
                    flat(&vt.to_dtype(DType::F64)?)?,
                );
                let want = per_row(&q, &k, &v, positions, heads, window, f16);
                let worst = worst_row_rel_l2(&flat(&got)?, &want, 72);
                assert!(
                    worst <= bound,
                    "{dtype:?}, f16 {f16}, window {window:?}, {} positions: rel L2 {worst:e}",
                    positions.len()
                );
            }
        }
    }
    Ok(())
}
