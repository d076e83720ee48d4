//! The `cpu` backend: plain Rust (matrixmultiply for GEMM, rayon across rows and heads),
//! mirroring what a GPU kernel does — values stored in the storage dtype after every op,
//! arithmetic accumulated in f32, RoPE angles formed in f32. Not the oracle: the same
//! runtime on another device.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QStorage};
use candle_core::{CpuStorage, Device};
use half::{bf16, f16};
use rayon::prelude::*;
use resbisect_taps::Fault;

use super::backend::{AttnShape, Backend, RopeFreqs, Row, Src, Step, StorageDType};
use crate::error::{Error, Result};
use crate::quant::{QuantMatrix, QuantType};

/// Query rows per attention block: bounds the per-head score matrix to 256 × keys.
const ATTN_BLOCK: usize = 256;

/// An output buffer shared by tasks that write disjoint parts of it (attention heads,
/// matmul blocks).
struct SharedOut(*mut f32);
// SAFETY: its users write disjoint ranges of the buffer, never the same element.
unsafe impl Sync for SharedOut {}

/// Fewest values a task of a parallel copy moves (64 KiB of f32): below that, handing
/// the piece to another thread costs more than copying it.
const COPY_PIECE: usize = 1 << 14;

/// Up to this many rows a matmul is done as dot products instead of a packed GEMM.
const SMALL_ROWS: usize = 4;

/// Dot product in 8 f32 lanes (a sequential float sum would not vectorize).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = wide::f32x8::splat(0.0);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        let x = wide::f32x8::from(<[f32; 8]>::try_from(x).expect("exact chunk"));
        let y = wide::f32x8::from(<[f32; 8]>::try_from(y).expect("exact chunk"));
        acc = x.mul_add(y, acc);
    }
    acc.reduce_add() + tail
}

pub struct CpuBackend {
    dtype: StorageDType,
    step: std::cell::Cell<Step>,
    /// Tokens `argmax_to_step` computed and `take_token` has not yet returned.
    queued_tokens: std::cell::RefCell<std::collections::VecDeque<u32>>,
}

/// Weight values a prefill tile of a quantized matmul decodes at once (2 MiB of f32):
/// small enough to stay in the last-level cache between being decoded and being
/// multiplied, large enough that the activations are packed only every few hundred
/// output columns.
const QUANT_TILE_VALUES: usize = 1 << 19;

impl CpuBackend {
    pub fn new(dtype: StorageDType) -> Self {
        Self {
            dtype,
            step: Default::default(),
            queued_tokens: Default::default(),
        }
    }

    /// Round to the storage dtype (a no-op for f32).
    fn store(&self, v: &mut [f32]) {
        if self.dtype != StorageDType::F32 {
            let dtype = self.dtype;
            v.par_chunks_mut(1 << 14).for_each(|c| round_to(dtype, c));
        }
    }
}

/// Round `v` to `dtype` in place, on the calling thread.
fn round_to(dtype: StorageDType, v: &mut [f32]) {
    match dtype {
        StorageDType::F32 => {}
        StorageDType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        StorageDType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
    }
}

/// `c[i, j] = Σ_c a[i, c] · b[j, c]` for `a` `[m, k]` and `b` `[nb, k]` (row-major, so
/// `b` is read as its transpose), written at `c` with row stride `ldc`: one matrixmultiply
/// sgemm on the calling thread. Each output is the same k-ordered sum however a product
/// is split into such calls by rows or columns.
///
/// # Safety
/// `a` must hold `m·k` values, `b` `nb·k`, and `c` must be valid for writes of `m` rows
/// of `nb` values `ldc` apart that no other thread touches.
unsafe fn sgemm_nt(a: *const f32, m: usize, k: usize, b: *const f32, nb: usize, c: *mut f32, ldc: usize) {
    matrixmultiply::sgemm(
        m,
        k,
        nb,
        1.0,
        a,
        k as isize,
        1,
        b,
        1,
        k as isize,
        0.0,
        c,
        ldc as isize,
        1,
    );
}

fn check(len: usize, need: usize, what: &str) -> Result<()> {
    if len < need {
        return Err(Error::engine(format!(
            "cpu {what}: buffer of {len} elements, {need} needed"
        )));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Table = Vec<f32>;
    type Graph = ();
    type Quant = QuantMatrix;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn free_memory(&self) -> Option<u64> {
        None
    }

    fn dtype(&self) -> StorageDType {
        self.dtype
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut v = data.to_vec();
        self.store(&mut v);
        Ok(v)
    }

    fn upload_table(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    /// Dequantized on the host by candle's ggml block decoders (exact for every type).
    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Vec<f32>> {
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let elements = shape.iter().product();
        let err = |e: candle_core::Error| Error::engine(format!("dequantizing {name}: {e}"));
        // The tensor checks the data's size against the type and shape; its blocks then
        // decode into a vector of our own. Through a `Tensor` the values would be copied
        // once more, a page fault per page of every weight.
        let q = qtensor_from_ggml(dtype, data, shape, &Device::Cpu).map_err(err)?;
        let blocks = match QStorage::from_data(q.data().map_err(err)?, &Device::Cpu, dtype).map_err(err)? {
            QStorage::Cpu(blocks) => blocks,
            _ => return Err(Error::engine(format!("dequantizing {name}: not host storage"))),
        };
        let mut values = match blocks.dequantize(elements).map_err(err)? {
            CpuStorage::F32(values) => values,
            _ => {
                return Err(Error::engine(format!(
                    "dequantizing {name}: decoded to something other than f32"
                )))
            }
        };
        self.store(&mut values);
        Ok(values)
    }

    fn upload_quant(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Option<QuantMatrix>> {
        let blocks = QuantType::of(dtype).map(|ty| QuantMatrix::new(name, ty, dims, data));
        blocks.transpose()
    }

    /// Decode (rows ≤ 4): each output is one pass over a weight row's blocks, decoded
    /// into f32 as read. Prefill: tiles of whole weight rows decoded into a per-thread
    /// buffer, rounded to the storage dtype (as the GPU's prefill workspace is), and
    /// multiplied at once: the weights are read as blocks and no decoded copy of a matrix
    /// is ever made, so a 128-row chunk costs its product, not a pass over 4-8× the
    /// blocks' bytes in fresh memory.
    fn matmul_quant(
        &self,
        x: &Vec<f32>,
        w: &QuantMatrix,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if (w.n, w.k) != (n, k) {
            return Err(Error::engine(format!(
                "cpu matmul_quant: a [{}, {}] matrix used as [{n}, {k}]",
                w.n, w.k
            )));
        }
        check(x.len(), rows * k, "matmul_quant input")?;
        check(out.len(), rows * n, "matmul_quant output")?;
        if rows <= SMALL_ROWS {
            out[..rows * n]
                .par_chunks_mut(n)
                .zip(x[..rows * k].par_chunks(k))
                .for_each(|(o, xr)| {
                    o.par_iter_mut()
                        .enumerate()
                        .for_each(|(j, o)| *o = w.dot_row(j, xr, dot))
                });
            self.store(&mut out[..rows * n]);
            return Ok(());
        }
        // At least four tiles per thread, so that the threads finish together.
        let threads = rayon::current_num_threads().max(1);
        let per_tile = (QUANT_TILE_VALUES / k).min(n.div_ceil(4 * threads)).max(1);
        let starts: Vec<usize> = (0..n).step_by(per_tile).collect();
        let (out_ptr, dtype) = (SharedOut(out.as_mut_ptr()), self.dtype);
        starts
            .into_par_iter()
            .for_each_init(Vec::new, |tile: &mut Vec<f32>, c0| {
                let out_ptr = &out_ptr;
                let nb = per_tile.min(n - c0);
                tile.resize(nb * k, 0.0);
                for (j, row) in tile.chunks_exact_mut(k).enumerate() {
                    w.decode_row(c0 + j, row);
                }
                round_to(dtype, tile);
                // SAFETY: x holds rows×k values and tile nb×k (checked and sized above); this
                // task writes columns c0..c0 + nb of out's rows×n only, disjoint from others'.
                unsafe { sgemm_nt(x.as_ptr(), rows, k, tile.as_ptr(), nb, out_ptr.0.add(c0), n) };
            });
        self.store(&mut out[..rows * n]);
        Ok(())
    }

    fn download(&self, buf: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        check(buf.len(), offset + len, "download")?;
        Ok(buf[offset..offset + len].to_vec())
    }

    fn download_raw(&self, buf: &Vec<f32>, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        check(buf.len(), offset + len, "download")?;
        let values = &buf[offset..offset + len];
        match self.dtype {
            StorageDType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            StorageDType::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            StorageDType::BF16 => out.extend(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
        }
        Ok(())
    }

    fn embed(&self, table: &Vec<f32>, width: usize, ids: Src<u32>, out: &mut Vec<f32>) -> Result<()> {
        let step = [self.step.get().token];
        let ids = match ids {
            Src::Host(ids) => ids,
            Src::Step => &step,
        };
        check(out.len(), ids.len() * width, "embed")?;
        for (row, &id) in ids.iter().enumerate() {
            let start = id as usize * width;
            check(table.len(), start + width, "embed table")?;
            out[row * width..(row + 1) * width].copy_from_slice(&table[start..start + width]);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check(x.len().min(out.len()), rows * width, "rms_norm")?;
        check(w.len(), width, "rms_norm weight")?;
        out[..rows * width]
            .par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .for_each(|(o, xr)| {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let scale = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w.iter()) {
                    *o = v * scale * g;
                }
            });
        self.store(&mut out[..rows * width]);
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, w: &Vec<f32>, rows: usize, k: usize, n: usize, out: &mut Vec<f32>) -> Result<()> {
        check(x.len(), rows * k, "matmul input")?;
        check(w.len(), n * k, "matmul weight")?;
        check(out.len(), rows * n, "matmul output")?;
        if rows <= SMALL_ROWS {
            // Decode: packing the weight for a GEMM would cost more than the product;
            // each output is one dot product over a contiguous weight row.
            out[..rows * n]
                .par_chunks_mut(n)
                .zip(x[..rows * k].par_chunks(k))
                .for_each(|(o, xr)| {
                    o.par_iter_mut()
                        .zip(w[..n * k].par_chunks(k))
                        .for_each(|(o, wr)| *o = dot(xr, wr));
                });
            self.store(&mut out[..rows * n]);
            return Ok(());
        }
        // One sgemm per thread over a block of the longer side: matrixmultiply packs its
        // whole right-hand operand per call, so splitting the rows of a short chunk would
        // pack every weight once per thread (bisect's 128-row chunks); splitting the
        // columns packs each weight row once.
        let threads = rayon::current_num_threads().max(1);
        let (o_rows, o_cols) = if rows >= n {
            (rows.div_ceil(threads), n)
        } else {
            (rows, n.div_ceil(threads))
        };
        let blocks: Vec<(usize, usize)> = (0..rows)
            .step_by(o_rows)
            .flat_map(|r0| (0..n).step_by(o_cols).map(move |c0| (r0, c0)))
            .collect();
        let out_ptr = SharedOut(out.as_mut_ptr());
        blocks.into_par_iter().for_each(|(r0, c0)| {
            let (m, nb) = (o_rows.min(rows - r0), o_cols.min(n - c0));
            let out_ptr = &out_ptr;
            // SAFETY: x holds rows×k, w n×k and out rows×n elements (checked above); each
            // block reads x rows r0.., w rows c0.. and writes only its own rows × columns
            // of out, disjoint from every other's.
            unsafe {
                sgemm_nt(
                    x.as_ptr().add(r0 * k),
                    m,
                    k,
                    w.as_ptr().add(c0 * k),
                    nb,
                    out_ptr.0.add(r0 * n + c0),
                    n,
                )
            };
        });
        self.store(&mut out[..rows * n]);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        positions: Src<f32>,
        freqs: RopeFreqs<Vec<f32>>,
    ) -> Result<()> {
        let step = [self.step.get().rope_pos];
        let positions = match positions {
            Src::Host(p) => p,
            Src::Step => &step,
        };
        let width = heads * head_dim;
        check(x.len(), positions.len() * width, "rope")?;
        let half = head_dim / 2;
        let base_freqs: Vec<f32>;
        // Which dims pair up, and the scale of cos and sin.
        let (inv_freq, neox, mscale) = match freqs {
            RopeFreqs::Base(base) => {
                base_freqs = (0..half)
                    .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
                    .collect();
                (&base_freqs, false, None)
            }
            RopeFreqs::Table { inv_freq, neox, mscale } => {
                check(inv_freq.len(), half, "rope frequency table")?;
                (inv_freq, neox, Some(mscale))
            }
        };
        let pair = |i: usize| if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        x[..positions.len() * width]
            .par_chunks_mut(width)
            .zip(positions)
            .for_each(|(row, &p)| {
                for head in row.chunks_mut(head_dim) {
                    for (i, f) in inv_freq[..half].iter().enumerate() {
                        let (mut s, mut c) = (p * f).sin_cos();
                        if let Some(m) = mscale {
                            (s, c) = (s * m, c * m);
                        }
                        let (ia, ib) = pair(i);
                        let (a, b) = (head[ia], head[ib]);
                        head[ia] = a * c - b * s;
                        head[ib] = a * s + b * c;
                    }
                }
            });
        self.store(&mut x[..positions.len() * width]);
        Ok(())
    }

    fn copy_rows(&self, src: &Vec<f32>, dst: &mut Vec<f32>, dst_row: Row, rows: usize, width: usize) -> Result<()> {
        let dst_row = dst_row.resolve(&self.step.get());
        check(src.len(), rows * width, "copy_rows source")?;
        check(dst.len(), (dst_row + rows) * width, "copy_rows destination")?;
        // In pieces for every thread, four each: a checkpoint's copy lands in fresh pages,
        // which the kernel zeroes on first touch, and one thread alone (a 128-row chunk's
        // rows were one piece of a fixed size) left the others idle meanwhile.
        let piece = (rows * width)
            .div_ceil(4 * rayon::current_num_threads())
            .max(COPY_PIECE);
        (dst[dst_row * width..(dst_row + rows) * width].par_chunks_mut(piece))
            .zip(src[..rows * width].par_chunks(piece))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        mut s: AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if s.from_step {
            s.first_pos = self.step.get().pos;
        }
        let (hd, qw, kvw) = (s.head_dim, s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let keys = s.first_pos + s.rows;
        check(q.len().min(out.len()), s.rows * qw, "attention")?;
        check(k_cache.len().min(v_cache.len()), keys * kvw, "attention KV cache")?;
        let group = s.n_head / s.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let out_ptr = SharedOut(out.as_mut_ptr());
        // Heads in parallel; queries in blocks so the score matrix stays ATTN_BLOCK × keys.
        (0..s.n_head).into_par_iter().for_each(|head| {
            let out_ptr = &out_ptr;
            let kv = head / group;
            let mut scores = vec![0f32; ATTN_BLOCK.min(s.rows) * keys];
            for r0 in (0..s.rows).step_by(ATTN_BLOCK) {
                let m = ATTN_BLOCK.min(s.rows - r0);
                let visible_keys = s.first_pos + r0 + m;
                // SAFETY: q holds rows × qw, the caches keys × kvw (checked above); scores
                // holds m × visible_keys; each head writes only its own hd columns of out.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        hd,
                        visible_keys,
                        scale,
                        q.as_ptr().add(r0 * qw + head * hd),
                        qw as isize,
                        1,
                        k_cache.as_ptr().add(kv * hd),
                        1,
                        kvw as isize,
                        0.0,
                        scores.as_mut_ptr(),
                        visible_keys as isize,
                        1,
                    );
                }
                for (i, row) in scores[..m * visible_keys].chunks_mut(visible_keys).enumerate() {
                    let visible = s.first_pos + r0 + i + 1;
                    causal_softmax(row, s.window.map_or(0, |w| visible.saturating_sub(w)), visible);
                }
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        visible_keys,
                        hd,
                        1.0,
                        scores.as_ptr(),
                        visible_keys as isize,
                        1,
                        v_cache.as_ptr().add(kv * hd),
                        kvw as isize,
                        1,
                        0.0,
                        out_ptr.0.add(r0 * qw + head * hd),
                        qw as isize,
                        1,
                    );
                }
            }
        });
        self.store(&mut out[..s.rows * qw]);
        Ok(())
    }

    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        check(gate.len().min(up.len()).min(out.len()), n, "silu_mul")?;
        out[..n]
            .par_iter_mut()
            .zip(&gate[..n])
            .zip(&up[..n])
            .for_each(|((o, &g), &u)| *o = g / (1.0 + (-g).exp()) * u);
        self.store(&mut out[..n]);
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        check(gate.len().min(up.len()).min(out.len()), n, "gelu_tanh_mul")?;
        out[..n]
            .par_iter_mut()
            .zip(&gate[..n])
            .zip(&up[..n])
            .for_each(|((o, &g), &u)| *o = gelu_tanh(g) * u);
        self.store(&mut out[..n]);
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, width: usize) -> Result<()> {
        check(x.len(), rows * width, "add_bias")?;
        check(bias.len(), width, "add_bias bias")?;
        x[..rows * width].par_chunks_mut(width).for_each(|row| {
            row.iter_mut().zip(bias.iter()).for_each(|(v, &b)| *v += b);
        });
        self.store(&mut x[..rows * width]);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, n: usize, factor: f32) -> Result<()> {
        check(x.len(), n, "scale")?;
        x[..n].par_iter_mut().for_each(|v| *v *= factor);
        self.store(&mut x[..n]);
        Ok(())
    }

    fn add(&self, a: &Vec<f32>, b: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        check(a.len().min(b.len()).min(out.len()), n, "add")?;
        out[..n]
            .par_iter_mut()
            .zip(&a[..n])
            .zip(&b[..n])
            .for_each(|((o, &x), &y)| *o = x + y);
        self.store(&mut out[..n]);
        Ok(())
    }

    fn perturb(&self, x: &mut Vec<f32>, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()> {
        check(x.len(), rows * width, "perturb")?;
        if from_row >= rows {
            return Ok(());
        }
        for v in &mut x[from_row * width..rows * width] {
            *v = match fault {
                Fault::Scale(s) => *v * s as f32,
                Fault::Offset(o) => *v + o as f32,
                Fault::Nan => f32::NAN,
                Fault::Zero => 0.0,
            };
        }
        self.store(&mut x[from_row * width..rows * width]);
        Ok(())
    }

    fn argmax(&self, x: &Vec<f32>, row: usize, width: usize) -> Result<u32> {
        check(x.len(), (row + 1) * width, "argmax")?;
        let r = &x[row * width..(row + 1) * width];
        Ok(r.iter()
            .enumerate()
            .fold(
                (0usize, f32::NEG_INFINITY),
                |best, (i, &v)| if v > best.1 { (i, v) } else { best },
            )
            .0 as u32)
    }

    fn argmax_to_step(&self, x: &Vec<f32>, row: usize, width: usize, next: Step) -> Result<()> {
        let token = self.argmax(x, row, width)?;
        self.step.set(Step { token, ..next });
        self.queued_tokens.borrow_mut().push_back(token);
        Ok(())
    }

    fn take_token(&self) -> Result<u32> {
        let token = self.queued_tokens.borrow_mut().pop_front();
        token.ok_or_else(|| Error::engine("cpu: no token queued"))
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn set_step(&self, step: Step) -> Result<()> {
        self.step.set(step);
        self.queued_tokens.borrow_mut().clear();
        Ok(())
    }
}

/// Softmax over scores `first..visible` of a row in place; the keys outside get 0.
fn causal_softmax(row: &mut [f32], first: usize, visible: usize) {
    let max = row[first..visible].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in &mut row[first..visible] {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row[first..visible].iter_mut().for_each(|v| *v *= inv);
    row[..first].iter_mut().for_each(|v| *v = 0.0);
    row[visible..].iter_mut().for_each(|v| *v = 0.0);
}

/// GELU with the tanh approximation (Hendrycks & Gimpel 2016, eq. in §2), in f32.
fn gelu_tanh(g: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)).tanh())
}
