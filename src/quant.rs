//! GGUF block formats the runtime computes on directly (`--weights native`): Q4_0, Q4_1,
//! Q8_0, Q4_K, Q5_K and Q6_K, with the `cpu` backend's block decoders and its fused
//! quantized matrix product. Layouts and decoding order follow ggml's `ggml-common.h`
//! (block structs) and `ggml-quants.c` (`dequantize_row_*`): every value is formed in f32
//! exactly as ggml forms it, so a decoded block equals the reference's dequantization.
//! The GPU kernels (`kernels/ops.hip`, `rb_qgemv_*`) decode the same layouts.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// A GGUF block type the runtime reads without dequantizing at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Values of a K-quant super-block.
const QK_K: usize = 256;

impl QuantType {
    /// Every type, in the order selftest checks them.
    pub const ALL: [QuantType; 6] = [Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Q4K, Self::Q5K, Self::Q6K];

    /// The block type of a GGUF dtype, `None` for dense and unsupported types.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The lower-case name `--inject` and messages use (`q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18, // f16 d, 16 bytes of nibbles
            Self::Q4_1 => 20, // f16 d, f16 m, 16 bytes of nibbles
            Self::Q8_0 => 34, // f16 d, 32 int8
            Self::Q4K => 144, // f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
            Self::Q5K => 176, // as Q4_K plus 32 bytes of fifth bits before the nibbles
            Self::Q6K => 210, // 128 low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d
        }
    }

    /// The bytes of a block that hold 4-bit quants (two values a byte), where an injected
    /// nibble-order fault swaps them; `None` for Q8_0, which has no nibbles.
    pub fn nibble_bytes(self) -> Option<std::ops::Range<usize>> {
        match self {
            Self::Q4_0 => Some(2..18),
            Self::Q4_1 => Some(4..20),
            Self::Q8_0 => None,
            Self::Q4K => Some(16..144),
            Self::Q5K => Some(48..176),
            Self::Q6K => Some(0..128),
        }
    }

    /// Decode one block (`block_bytes` bytes) into `out` (`block_values` values), as
    /// ggml's `dequantize_row_*` does.
    pub fn decode_block(self, b: &[u8], out: &mut [f32]) {
        match self {
            Self::Q4_0 => {
                let d = f16_at(b, 0);
                let (lo, hi) = out[..32].split_at_mut(16);
                for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
                    *lo = ((q & 15) as i32 - 8) as f32 * d;
                    *hi = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            Self::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = out[..32].split_at_mut(16);
                for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[4..20]) {
                    *lo = (q & 15) as f32 * d + m;
                    *hi = (q >> 4) as f32 * d + m;
                }
            }
            Self::Q8_0 => {
                let d = f16_at(b, 0);
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
            Self::Q4K => decode_q4k(b, out),
            Self::Q5K => decode_q5k(b, out),
            Self::Q6K => decode_q6k(b, out),
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: 6 bits each, packed in 12
/// bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K: sub-blocks of 32 in pairs; a pair's 32 bytes hold the first's low nibbles and
/// the second's high nibbles. `value = d·scale·q − dmin·min`.
fn decode_q4k(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144]);
    // Zipped slices rather than indices: no bounds checks, so the loops vectorize.
    for (pair, (o, qs)) in out.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (lo, hi) = o.split_at_mut(32);
        for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(qs) {
            *lo = d1 * (q & 15) as f32 - min1;
            *hi = d2 * (q >> 4) as f32 - min2;
        }
    }
}

/// Q5_K: Q4_K's layout with a fifth bit per value; sub-block `j`'s fifth bits are bit `j`
/// of the 32 `qh` bytes.
fn decode_q5k(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qh, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..48], &b[48..176]);
    for (pair, (o, qs)) in out.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (shift1, shift2) = (2 * pair, 2 * pair + 1);
        let (lo, hi) = o.split_at_mut(32);
        for (((lo, hi), &q), &h) in lo.iter_mut().zip(hi).zip(qs).zip(qh) {
            *lo = d1 * ((q & 15) | (((h >> shift1) & 1) << 4)) as f32 - min1;
            *hi = d2 * ((q >> 4) | (((h >> shift2) & 1) << 4)) as f32 - min2;
        }
    }
}

/// Q6_K: two halves of 128; in each, value `l + 32·quarter` takes a nibble of `ql` and a
/// bit pair of `qh`, minus 32, times `d · scale[l / 16 + 2·quarter]`.
fn decode_q6k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 15) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (quarter, &q) in q.iter().enumerate() {
                y[l + 32 * quarter] = d * (sc[is + 2 * quarter] as i8) as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}

/// A `[n, k]` weight matrix kept as GGUF blocks (row `j`: `k / block_values` blocks).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub ty: QuantType,
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
}

impl QuantMatrix {
    /// The matrix of GGUF tensor `name` (`dims` in ggml order: `[k, n]`), checked: two
    /// dimensions, rows a whole number of blocks, the byte count exact.
    pub fn new(name: &str, ty: QuantType, dims: &[usize], data: &[u8]) -> Result<Self> {
        let (k, n) = check_layout(name, ty, dims, data.len())?;
        Ok(Self {
            ty,
            n,
            k,
            data: data.to_vec(),
        })
    }

    /// Bytes of one weight row.
    pub fn row_bytes(&self) -> usize {
        self.k / self.ty.block_values() * self.ty.block_bytes()
    }

    /// Row `j` decoded into `out` (`k` values).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let (rb, bv, bb) = (self.row_bytes(), self.ty.block_values(), self.ty.block_bytes());
        for (block, o) in self.data[j * rb..(j + 1) * rb]
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(bv))
        {
            self.ty.decode_block(block, o);
        }
    }

    /// `Σ_c w[j, c] · x[c]` read from the blocks (fused dequantization, f32 accumulation
    /// in 8 lanes per block, blocks summed in order).
    pub fn dot_row(&self, j: usize, x: &[f32], dot: impl Fn(&[f32], &[f32]) -> f32) -> f32 {
        let (rb, bv, bb) = (self.row_bytes(), self.ty.block_values(), self.ty.block_bytes());
        let mut values = [0f32; QK_K];
        let mut acc = 0f32;
        for (block, xs) in self.data[j * rb..(j + 1) * rb].chunks_exact(bb).zip(x.chunks_exact(bv)) {
            self.ty.decode_block(block, &mut values[..bv]);
            acc += dot(&values[..bv], xs);
        }
        acc
    }
}

/// `(k, n)` of a quantized matrix whose layout is whole, or an input error naming it.
pub fn check_layout(name: &str, ty: QuantType, dims: &[usize], bytes: usize) -> Result<(usize, usize)> {
    let &[k, n] = dims else {
        return Err(Error::input(format!(
            "{name}: a {} matrix must have two dimensions, not {dims:?}",
            ty.name()
        )));
    };
    let bv = ty.block_values();
    if !k.is_multiple_of(bv) || bytes != n * (k / bv) * ty.block_bytes() {
        return Err(Error::input(format!(
            "{name}: {bytes} bytes are not a [{n}, {k}] matrix of {} blocks ({bv} values, {} bytes each)",
            ty.name(),
            ty.block_bytes()
        )));
    }
    Ok((k, n))
}

/// Swap the two nibbles of every 4-bit quant byte of `data` (blocks of `ty`): what a
/// kernel reading a block's nibbles in the wrong order computes. Errors for Q8_0.
pub fn swap_nibbles(ty: QuantType, data: &mut [u8]) -> Result<()> {
    let range = ty.nibble_bytes().ok_or_else(|| {
        Error::input(format!(
            "--inject {}:swap_nibbles: {} has no nibbles",
            ty.name(),
            ty.name()
        ))
    })?;
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for q in &mut block[range.clone()] {
            *q = q.rotate_left(4);
        }
    }
    Ok(())
}
