//! Per-row statistics of A against B (rel L2, max |A−B|, cosine, non-finite counts) for
//! every pair of stored dtypes, SIMD in the common all-f32 case; and logit statistics
//! (KL, top-1, top-5).

use serde::Serialize;
use wide::{f32x8, i32x8};

use crate::dump::{TapDType, TapView};
use crate::tolerance::Tolerance;

/// The compact per-row record kept for every compared (tap, position).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RowStat {
    pub rel_l2: f64,
    pub max_abs: f64,
    pub cosine: f64,
    pub norm_b: f64,
    pub nonfinite_a: u32,
    pub nonfinite_b: u32,
}

impl RowStat {
    pub fn nmse(&self) -> f64 {
        self.rel_l2 * self.rel_l2
    }

    pub fn sqnr_db(&self) -> f64 {
        // 0 − x, not −x: a rel L2 of exactly 1 reads 0 dB, not −0.
        0.0 - 20.0 * self.rel_l2.log10()
    }

    /// Whether either side holds a NaN or an infinity in this row.
    pub fn has_nonfinite(&self) -> bool {
        self.nonfinite_a + self.nonfinite_b > 0
    }

    /// The row's rel L2, infinite when either side is not finite: a NaN row is the worst
    /// row, never a quiet one.
    pub fn rel_l2_or_inf(&self) -> f64 {
        if self.has_nonfinite() {
            f64::INFINITY
        } else {
            self.rel_l2
        }
    }

    pub fn diverges(&self, tol: &Tolerance) -> bool {
        self.has_nonfinite() || (self.rel_l2 > tol.rel_l2 && self.max_abs > tol.abs) || self.rel_l2.is_nan()
    }
}

/// KL(P_b ‖ P_a) over softmaxed logits, top-1 agreement and top-5 overlap.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LogitStat {
    pub kl: f64,
    pub top1_agree: bool,
    pub top5_overlap: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub max_abs: f64,
    pub rel_l2: f64,
    pub cosine: f64,
    pub nmse: f64,
    pub sqnr_db: f64,
    pub nonfinite_a: u32,
    pub nonfinite_b: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<LogitStat>,
}

impl Metrics {
    pub(super) fn new(s: &RowStat, logits: Option<LogitStat>) -> Self {
        Self {
            max_abs: s.max_abs,
            rel_l2: s.rel_l2,
            cosine: s.cosine,
            nmse: s.nmse(),
            sqnr_db: s.sqnr_db(),
            nonfinite_a: s.nonfinite_a,
            nonfinite_b: s.nonfinite_b,
            logits,
        }
    }
}

/// Generic over the two stored dtypes so each combination gets a tight loop.
trait Elem {
    fn read(b: &[u8], i: usize) -> f64;
}
struct EF32;
struct EF64;
struct EF16;
struct EBF16;
impl Elem for EF32 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as f64
    }
}
impl Elem for EF64 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
    }
}
impl Elem for EF16 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64()
    }
}
impl Elem for EBF16 {
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> f64 {
        half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64()
    }
}

fn stat_typed<A: Elem, B: Elem>(a: &[u8], b: &[u8], n: usize) -> RowStat {
    let (mut d2, mut b2, mut a2, mut ab, mut max_abs) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut nf_a, mut nf_b) = (0u32, 0u32);
    // The largest |a−b| of a row holding Inf is inf, of one holding NaN NaN.
    let mut nonfinite_abs = 0.0f64;
    for i in 0..n {
        let (x, y) = (A::read(a, i), B::read(b, i));
        if !x.is_finite() || !y.is_finite() {
            nf_a += u32::from(!x.is_finite());
            nf_b += u32::from(!y.is_finite());
            let d = (x - y).abs();
            nonfinite_abs = if nonfinite_abs.is_nan() || d.is_nan() {
                f64::NAN
            } else {
                f64::INFINITY
            };
            continue;
        }
        let d = x - y;
        d2 += d * d;
        b2 += y * y;
        a2 += x * x;
        ab += x * y;
        max_abs = max_abs.max(d.abs());
    }
    let norm_b = b2.sqrt();
    // Non-finite values make the row's error unbounded, whatever its finite part says.
    let rel_l2 = if nf_a + nf_b > 0 {
        f64::INFINITY
    } else if norm_b > 0.0 {
        d2.sqrt() / norm_b
    } else if d2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cosine = if nf_a + nf_b > 0 { f64::NAN } else { cosine(ab, a2, b2) };
    let max_abs = if nf_a + nf_b > 0 { nonfinite_abs } else { max_abs };
    RowStat {
        rel_l2,
        max_abs,
        cosine,
        norm_b,
        nonfinite_a: nf_a,
        nonfinite_b: nf_b,
    }
}

/// Cosine similarity a·b / (‖a‖‖b‖) from the sums Σab, Σa², Σb², clamped to [−1, 1],
/// which Cauchy–Schwarz bounds it by and rounding in the sums need not. One square root
/// of the product: for a row against itself (Σab = Σa² = Σb²) that is exactly Σa², so the
/// cosine is exactly 1 (two roots multiplied missed it by an ulp either way). Two zero
/// rows are alike (1), one zero row is not (0). The sums of f32 values cannot overflow
/// the product in f64.
fn cosine(ab: f64, a2: f64, b2: f64) -> f64 {
    if a2 > 0.0 && b2 > 0.0 {
        (ab / (a2 * b2).sqrt()).clamp(-1.0, 1.0)
    } else if a2 == b2 {
        1.0
    } else {
        0.0
    }
}

macro_rules! dispatch {
    ($f:ident, $a:expr, $b:expr, $n:expr) => {{
        use TapDType::*;
        match ($a.dtype, $b.dtype) {
            (F32, F32) => $f::<EF32, EF32>($a.bytes, $b.bytes, $n),
            (F32, F64) => $f::<EF32, EF64>($a.bytes, $b.bytes, $n),
            (F32, F16) => $f::<EF32, EF16>($a.bytes, $b.bytes, $n),
            (F32, BF16) => $f::<EF32, EBF16>($a.bytes, $b.bytes, $n),
            (F64, F32) => $f::<EF64, EF32>($a.bytes, $b.bytes, $n),
            (F64, F64) => $f::<EF64, EF64>($a.bytes, $b.bytes, $n),
            (F64, F16) => $f::<EF64, EF16>($a.bytes, $b.bytes, $n),
            (F64, BF16) => $f::<EF64, EBF16>($a.bytes, $b.bytes, $n),
            (F16, F32) => $f::<EF16, EF32>($a.bytes, $b.bytes, $n),
            (F16, F64) => $f::<EF16, EF64>($a.bytes, $b.bytes, $n),
            (F16, F16) => $f::<EF16, EF16>($a.bytes, $b.bytes, $n),
            (F16, BF16) => $f::<EF16, EBF16>($a.bytes, $b.bytes, $n),
            (BF16, F32) => $f::<EBF16, EF32>($a.bytes, $b.bytes, $n),
            (BF16, F64) => $f::<EBF16, EF64>($a.bytes, $b.bytes, $n),
            (BF16, F16) => $f::<EBF16, EF16>($a.bytes, $b.bytes, $n),
            (BF16, BF16) => $f::<EBF16, EBF16>($a.bytes, $b.bytes, $n),
        }
    }};
}

/// Statistics of one row of A against the same row of B (`width` values each, any stored
/// dtype, read as f64 or, both f32, summed in f32 blocks).
pub fn row_stat(a: &TapView, b: &TapView) -> RowStat {
    if let (TapDType::F32, TapDType::F32, Ok(x), Ok(y)) = (
        a.dtype,
        b.dtype,
        bytemuck::try_cast_slice::<u8, f32>(a.bytes),
        bytemuck::try_cast_slice::<u8, f32>(b.bytes),
    ) {
        if let Some(stat) = stat_f32_finite(x, y) {
            return stat;
        }
    }
    dispatch!(stat_typed, a, b, a.width)
}

/// The common case (both f32, aligned, all finite, not tiny) in 8-wide SIMD
/// (`wide::f32x8`); lanes accumulate in f32 over blocks of 256 values, blocks in f64.
/// `None` when a value is non-finite (the generic path then counts them) or a row's
/// squares may have underflowed in f32.
fn stat_f32_finite(a: &[f32], b: &[f32]) -> Option<RowStat> {
    const BLOCK: usize = 256;
    let (mut d2, mut b2, mut a2, mut ab, mut max_abs) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f32);
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let zero = f32x8::splat(0.0);
        let (mut sd, mut sb, mut sa, mut sab, mut mx) = (zero, zero, zero, zero, zero);
        let mut ia = ca.chunks_exact(8);
        let mut ib = cb.chunks_exact(8);
        for (x, y) in (&mut ia).zip(&mut ib) {
            let x = f32x8::from(<[f32; 8]>::try_from(x).expect("exact chunk"));
            let y = f32x8::from(<[f32; 8]>::try_from(y).expect("exact chunk"));
            let d = x - y;
            sd = d.mul_add(d, sd);
            sb = y.mul_add(y, sb);
            sa = x.mul_add(x, sa);
            sab = x.mul_add(y, sab);
            mx = mx.fast_max(d.abs());
        }
        let (mut rd, mut rb, mut ra, mut rab, mut rmx) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
            let d = x - y;
            rd += d * d;
            rb += y * y;
            ra += x * x;
            rab += x * y;
            rmx = rmx.max(d.abs());
        }
        d2 += sd.reduce_add() as f64 + rd as f64;
        b2 += sb.reduce_add() as f64 + rb as f64;
        a2 += sa.reduce_add() as f64 + ra as f64;
        ab += sab.reduce_add() as f64 + rab as f64;
        max_abs = mx.to_array().iter().fold(max_abs.max(rmx), |m, &v| m.max(v));
    }
    // A NaN or Inf anywhere shows up in the sums. Squares of values below about 1e-19
    // underflow in f32: a row whose sum of squares is that small goes to the f64 path
    // (one at 1e-25 read as cosine 0, and its negation as rel L2 0).
    const TINY: f64 = 1e-24;
    if !(d2.is_finite() && b2.is_finite() && a2.is_finite() && ab.is_finite()) || a2 < TINY || b2 < TINY {
        return None;
    }
    let norm_b = b2.sqrt();
    let rel_l2 = if norm_b > 0.0 {
        d2.sqrt() / norm_b
    } else if d2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cosine = cosine(ab, a2, b2);
    Some(RowStat {
        rel_l2,
        max_abs: max_abs as f64,
        cosine,
        norm_b,
        nonfinite_a: 0,
        nonfinite_b: 0,
    })
}

/// A row as f32: borrowed when stored as aligned f32, converted otherwise.
fn f32_row<'a>(v: &TapView<'a>) -> std::borrow::Cow<'a, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(v.bytes) {
        Ok(x) if v.dtype == TapDType::F32 => std::borrow::Cow::Borrowed(x),
        _ => std::borrow::Cow::Owned((0..v.width).map(|i| v.get(i) as f32).collect()),
    }
}

/// Indices of the `K` largest values, largest first, in one pass; chunks of 8 with no
/// value above the current K-th best are skipped with one SIMD compare.
fn top<const K: usize>(x: &[f32]) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(K + 1);
    let mut threshold = f32::NEG_INFINITY;
    let consider = |i: usize, v: f32, best: &mut Vec<usize>, threshold: &mut f32| {
        if best.len() == K && v <= *threshold {
            return;
        }
        let at = best.iter().position(|&j| v > x[j]).unwrap_or(best.len());
        best.insert(at, i);
        best.truncate(K);
        if best.len() == K {
            *threshold = x[best[K - 1]];
        }
    };
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let lanes = f32x8::from(<[f32; 8]>::try_from(chunk).expect("exact chunk"));
        if best.len() == K && !lanes.simd_gt(f32x8::splat(threshold)).any() {
            continue;
        }
        for (k, &v) in chunk.iter().enumerate() {
            consider(c * 8 + k, v, &mut best, &mut threshold);
        }
    }
    let base = x.len() - tail.len();
    for (k, &v) in tail.iter().enumerate() {
        consider(base + k, v, &mut best, &mut threshold);
    }
    best
}

/// exp(x) for x ≤ 0 (softmax after subtracting the max), 8 lanes: 2^k·p(r) with
/// Cody–Waite reduction and a degree-6 polynomial, no special cases left to branch on
/// (inputs are clamped at −87); relative error below 5e-7 (test below). wide's general
/// `exp` handles the whole range and measured 3× slower here.
#[inline(always)]
fn exp_nonpositive(x: f32x8) -> f32x8 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.fast_max(f32x8::splat(-87.0));
    let k = (x * f32x8::splat(std::f32::consts::LOG2_E)).round();
    let r = (x - k * f32x8::splat(LN2_HI)) - k * f32x8::splat(LN2_LO);
    let mut p = f32x8::splat(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, f32x8::splat(c));
    }
    // 2^k from the exponent bits; a multiply stands in for the shift.
    let bits = (k.round_int() + i32x8::splat(127)) * i32x8::splat(1 << 23);
    p * bytemuck::cast::<i32x8, f32x8>(bits)
}

/// Σ exp(x − max), and Σ exp(x − max)·(x − y) over the same elements, 8-wide;
/// f32 within blocks of 256, f64 across.
fn exp_sums(x: &[f32], max: f32, y: &[f32]) -> (f64, f64) {
    let (mut total, mut weighted) = (0.0f64, 0.0f64);
    let m = f32x8::splat(max);
    for (bx, by) in x.chunks(256).zip(y.chunks(256)) {
        let (mut s, mut w) = (f32x8::splat(0.0), f32x8::splat(0.0));
        let mut ix = bx.chunks_exact(8);
        let mut iy = by.chunks_exact(8);
        for (cx, cy) in (&mut ix).zip(&mut iy) {
            let cx = f32x8::from(<[f32; 8]>::try_from(cx).expect("exact chunk"));
            let cy = f32x8::from(<[f32; 8]>::try_from(cy).expect("exact chunk"));
            let e = exp_nonpositive(cx - m);
            s += e;
            w = e.mul_add(cx - cy, w);
        }
        let (mut rs, mut rw) = (0f32, 0f32);
        for (&v, &u) in ix.remainder().iter().zip(iy.remainder()) {
            let e = (v - max).exp();
            rs += e;
            rw += e * (v - u);
        }
        total += s.reduce_add() as f64 + rs as f64;
        weighted += w.reduce_add() as f64 + rw as f64;
    }
    (total, weighted)
}

/// KL(P_b ‖ P_a) = Σ p_b·(x_b − x_a) − (lse_b − lse_a).
pub fn logit_stat(a: &TapView, b: &TapView) -> LogitStat {
    let (xa, xb) = (f32_row(a), f32_row(b));
    let max = |x: &[f32]| x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (max_a, max_b) = (max(&xa), max(&xb));
    let (sum_a, _) = exp_sums(&xa, max_a, &xa);
    let (sum_b, cross) = exp_sums(&xb, max_b, &xa);
    let (lse_a, lse_b) = (max_a as f64 + sum_a.ln(), max_b as f64 + sum_b.ln());
    let kl = cross / sum_b - (lse_b - lse_a);
    let kl = if kl.is_finite() { kl.max(0.0) } else { f64::INFINITY };
    let (ta, tb) = (top::<5>(&xa), top::<5>(&xb));
    LogitStat {
        kl,
        top1_agree: ta.first() == tb.first(),
        top5_overlap: ta.iter().filter(|i| tb.contains(i)).count() as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqnr_of_a_row_as_far_off_as_its_norm_reads_plus_zero() {
        let stat = RowStat {
            rel_l2: 1.0,
            ..RowStat::default()
        };
        assert!(stat.sqnr_db() == 0.0 && stat.sqnr_db().is_sign_positive());
        assert_eq!(format!("{:.1}", stat.sqnr_db()), "0.0");
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..25_000 {
            let xs: [f32; 8] = std::array::from_fn(|j| -((i * 8 + j) as f32) * 87.0 / 200_000.0);
            let got = exp_nonpositive(f32x8::from(xs)).to_array();
            for (x, g) in xs.iter().zip(got) {
                let want = (*x as f64).exp();
                worst = worst.max(((g as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }

    /// A row against itself has cosine exactly 1 on both paths (f32 SIMD, and the
    /// generic one through f16): Σab / (√Σa²·√Σb²) lands an ulp off 1, either way, on
    /// some of these rows.
    #[test]
    fn cosine_of_a_row_with_itself_is_one() {
        let mut state = 0x2545_f491_u64;
        for width in [3usize, 64, 576, 2048] {
            for _ in 0..50 {
                let row: Vec<f32> = (0..width)
                    .map(|_| {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
                    })
                    .collect();
                let f32_bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                let f16_bytes: Vec<u8> = row.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
                for (dtype, bytes) in [(TapDType::F32, &f32_bytes), (TapDType::F16, &f16_bytes)] {
                    let view = TapView {
                        dtype,
                        rows: 1,
                        width,
                        bytes,
                    };
                    let cos = row_stat(&view, &view).cosine;
                    assert_eq!(cos, 1.0, "{dtype:?}, width {width}");
                }
            }
        }
    }

    /// Rows of values near 1e-25, whose f32 squares underflow: A = B·1e-25 against B·1e-25
    /// is alike (cosine 1, rel L2 0), against −B·1e-25 opposite (cosine −1, rel L2 2).
    #[test]
    fn tiny_rows_keep_their_metrics() {
        let row: Vec<f32> = (0..64).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-25).collect();
        let neg: Vec<f32> = row.iter().map(|v| -v).collect();
        // Aligned f32 storage, so the SIMD path is the one asked first.
        fn view(x: &[f32]) -> TapView<'_> {
            TapView {
                dtype: TapDType::F32,
                rows: 1,
                width: x.len(),
                bytes: bytemuck::cast_slice(x),
            }
        }
        let same = row_stat(&view(&row), &view(&row));
        assert_eq!((same.cosine, same.rel_l2), (1.0, 0.0));
        let opposite = row_stat(&view(&neg), &view(&row));
        assert_eq!(opposite.cosine, -1.0);
        assert!((opposite.rel_l2 - 2.0).abs() < 1e-12, "{}", opposite.rel_l2);
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        for n in [1usize, 5, 7, 8, 9, 100, 49_157] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 10_007) as f32).sin()).collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&i, &j| x[j].total_cmp(&x[i]));
            order.truncate(5);
            assert_eq!(top::<5>(&x), order, "n = {n}");
        }
    }

    #[test]
    fn kl_matches_the_definition() {
        let a: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i % 7) as f32 - 3.0) * 0.05)
            .collect();
        let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let (ba, bb) = (bytes(&a), bytes(&b));
        let view = |d: &[u8]| TapView {
            dtype: TapDType::F32,
            rows: 1,
            width: 1000,
            bytes: unsafe { std::slice::from_raw_parts(d.as_ptr(), d.len()) },
        };
        let got = logit_stat(&view(&ba), &view(&bb)).kl;
        let lsm = |x: &[f32]| {
            let m = x.iter().copied().fold(f32::MIN, f32::max) as f64;
            let l = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - l).collect::<Vec<f64>>()
        };
        let (la, lb) = (lsm(&a), lsm(&b));
        let want: f64 = la.iter().zip(&lb).map(|(qa, pb)| pb.exp() * (pb - qa)).sum();
        // f32 block sums of a cancelling difference: measured gap below 1e-4 relative.
        assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
    }
}
