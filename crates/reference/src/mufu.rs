//! NVIDIA's approximate reciprocal and reciprocal square root, bit for bit, so that the
//! `llamacpp-cuda` profile rounds as llama.cpp's CUDA build does. ggml-cuda is compiled
//! with `-use_fast_math`, so `127.0f / amax` is PTX `div.approx.ftz.f32` (= `127 ×
//! rcp.approx(amax)`), `1.0f / d_inv` is `rcp.approx.ftz.f32` and `rsqrtf` is
//! `rsqrt.approx.ftz.f32`: the GPU's special-function unit, up to 1 ulp (rcp) or 2 ulp
//! (rsqrt) off the correctly rounded result. An 8-bit activation quantizer turns that ulp
//! into a whole quantization step wherever `x·127/amax` lies near a half-integer, which
//! happens in about a quarter of SmolLM2's layer-0 rows.
//!
//! The unit's results are not documented, so they were measured: `scripts/mufu-tables.sh`
//! ran every f32 mantissa through the instructions on an H200 (sm_90) and stored, per
//! input, the result's offset in ulps from the correctly rounded value, 2 bits each
//! (code 0 → -1, 1 → 0, 2 → +1, 3 → -2), zlib-compressed in `data/`. The same run checked
//! that the offset depends on the mantissa alone (rcp) or on the mantissa and the
//! exponent's parity (rsqrt), across exponents -30..30, and that `div.approx.ftz(a, b)`
//! equals `a × rcp.approx(b)` rounded to nearest for every `b` tried.

use std::sync::OnceLock;

use flate2::read::ZlibDecoder;
use std::io::Read;

const RCP_TABLE: &[u8] = include_bytes!("../data/sm90-rcp-approx.zz");
const RSQRT_TABLE: &[u8] = include_bytes!("../data/sm90-rsqrt-approx.zz");

/// Entries: 2^23 mantissas of [1, 2) for rcp, 2^24 values of [1, 4) for rsqrt.
const RCP_ENTRIES: usize = 1 << 23;
const RSQRT_ENTRIES: usize = 1 << 24;

fn unpack(compressed: &[u8], entries: usize) -> Vec<u8> {
    let mut packed = Vec::with_capacity(entries / 4);
    // The tables are compiled in: a failure here is a corrupt build, not bad input.
    ZlibDecoder::new(compressed)
        .read_to_end(&mut packed)
        .expect("the compiled-in MUFU table is a valid zlib stream");
    assert_eq!(packed.len(), entries / 4, "MUFU table length");
    packed
}

fn rcp_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| unpack(RCP_TABLE, RCP_ENTRIES))
}

fn rsqrt_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| unpack(RSQRT_TABLE, RSQRT_ENTRIES))
}

/// The offset in ulps stored for entry `i` of a packed table.
fn offset(table: &[u8], i: usize) -> i32 {
    match (table[i / 4] >> (2 * (i % 4))) & 3 {
        0 => -1,
        1 => 0,
        2 => 1,
        _ => -2,
    }
}

/// `x` with subnormals flushed to a zero of the same sign (the `.ftz` of the instructions).
fn flush(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `rcp.approx.ftz.f32` of `x` as sm_90 computes it. Zero gives an infinity of its sign, an
/// infinity zero, NaN NaN; a result that would be subnormal is flushed to zero.
pub fn rcp_approx(x: f32) -> f32 {
    let x = flush(x);
    if x == 0.0 || !x.is_finite() {
        return flush(1.0 / x);
    }
    let mantissa = (x.to_bits() & 0x7f_ffff) as usize;
    let exact = 1.0 / x; // IEEE division: correctly rounded, the table's base
    if exact.abs() < f32::MIN_POSITIVE {
        return 0.0f32.copysign(x);
    }
    f32::from_bits((exact.to_bits() as i32 + offset(rcp_table(), mantissa)) as u32)
}

/// `div.approx.ftz.f32 a, b` (what `a / b` compiles to under `-use_fast_math`): `a ×
/// rcp.approx(b)`, rounded to nearest and flushed.
pub fn div_approx(a: f32, b: f32) -> f32 {
    flush(flush(a) * rcp_approx(b))
}

/// `rsqrt.approx.ftz.f32` of `x` as sm_90 computes it, for `x ≥ 0`; a negative `x` gives NaN,
/// zero an infinity, an infinity zero.
pub fn rsqrt_approx(x: f32) -> f32 {
    let x = flush(x);
    if x <= 0.0 || !x.is_finite() {
        return flush(1.0 / x.sqrt());
    }
    // Index within [1, 4): the mantissa, plus 2^23 when the unbiased exponent is odd.
    let odd = ((x.to_bits() >> 23) as i32 - 127).rem_euclid(2) as usize;
    let index = odd << 23 | (x.to_bits() & 0x7f_ffff) as usize;
    f32::from_bits((rsqrt_rn(x).to_bits() as i32 + offset(rsqrt_table(), index)) as u32)
}

/// The correctly rounded `1/√x` of a positive normal `x` (what `__frsqrt_rn` gives, the
/// tables' base): the f64 estimate, then moved to whichever neighbour its rounding
/// midpoints say, decided in exact integer arithmetic (`m²·x < 1` ⇔ `1/√x > m`).
fn rsqrt_rn(x: f32) -> f32 {
    let mut r = (1.0 / (x as f64).sqrt()) as f32;
    loop {
        let up = f32::from_bits(r.to_bits() + 1);
        if square_times_below_one((r as f64 + up as f64) / 2.0, x) {
            r = up;
            continue;
        }
        let down = f32::from_bits(r.to_bits() - 1);
        // A midpoint is never exactly 1/√x: its square has more than 24 significant bits.
        if !square_times_below_one((r as f64 + down as f64) / 2.0, x) {
            r = down;
            continue;
        }
        return r;
    }
}

/// Whether `m²·x < 1`, exactly, for positive normal `m` (at most 25 significant bits, as a
/// midpoint between two f32s has) and `x`.
fn square_times_below_one(m: f64, x: f32) -> bool {
    let (mm, em) = integer_and_exponent(m);
    let (mx, ex) = integer_and_exponent(x as f64);
    // m²·x = mm²·mx · 2^(2·em + ex), with mm²·mx below 2^75.
    let product = (mm as u128) * (mm as u128) * (mx as u128);
    let k = -(2 * em + ex);
    match k {
        ..=0 => false,
        128.. => true,
        _ => product < 1u128 << k,
    }
}

/// `v = n · 2^e` with `n` odd (or zero), for a positive normal f64 `v`.
fn integer_and_exponent(v: f64) -> (u64, i32) {
    let bits = v.to_bits();
    let n = (bits & ((1 << 52) - 1)) | 1 << 52;
    let e = ((bits >> 52) & 0x7ff) as i32 - 1075;
    let tz = n.trailing_zeros();
    (n >> tz, e + tz as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(table: &[u8], entries: usize) -> [usize; 4] {
        let mut h = [0; 4];
        for i in 0..entries {
            h[(offset(table, i) + 2) as usize] += 1;
        }
        h
    }

    #[test]
    fn tables_hold_what_the_h200_measured() {
        // Counts printed by scripts/mufu-tables.cu on the H200 (offsets -2, -1, 0, +1).
        assert_eq!(histogram(rcp_table(), RCP_ENTRIES), [0, 374_723, 7_280_086, 733_799]);
        assert_eq!(
            histogram(rsqrt_table(), RSQRT_ENTRIES),
            [8, 2_344_391, 13_143_086, 1_289_731]
        );
    }

    #[test]
    fn results_scale_with_the_exponent_and_stay_within_their_bounds() {
        for bits in (0x3f80_0000u32..0x4080_0000).step_by(9973) {
            let x = f32::from_bits(bits);
            let r = rcp_approx(x);
            assert_eq!(rcp_approx(x * 1024.0), r / 1024.0, "rcp {x}");
            assert!((r as f64 - 1.0 / x as f64).abs() <= 1.0 * ulp(r), "rcp {x}");
            let s = rsqrt_approx(x);
            assert_eq!(rsqrt_approx(x * 16.0), s / 4.0, "rsqrt {x}");
            assert!((s as f64 - 1.0 / (x as f64).sqrt()).abs() <= 2.0 * ulp(s), "rsqrt {x}");
        }
        assert_eq!(rcp_approx(1.0), 1.0);
        assert_eq!(rcp_approx(0.0), f32::INFINITY);
        assert_eq!(rcp_approx(f32::INFINITY), 0.0);
        assert_eq!(rsqrt_approx(1.0), 1.0);
        assert_eq!(rsqrt_approx(0.0), f32::INFINITY);
        assert!(rsqrt_approx(-1.0).is_nan());
    }

    fn ulp(x: f32) -> f64 {
        (f32::from_bits(x.to_bits() + 1) - x) as f64
    }
}
