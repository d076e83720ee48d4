//! Causal (optionally sliding-window) grouped-query attention in key blocks with an
//! online softmax (FlashAttention, Dao et al. 2022, Algorithm 1; the running max and sum
//! of Milakov & Gimelshein 2018): per (KV head, query block), the score block against
//! each key block is a GEMM that stays in cache, fully masked key blocks are never
//! computed, and K/V are read in place from the projections (no per-block copies).
//! Generic over f32 (OpenBLAS, one thread per task) and f64 (the twin; the `gemm` crate).

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;
use resbisect_taps::Config;

use crate::blas::{self, Strided};
use crate::fused::Exp;

/// Queries of consecutive positions processed together: with the GQA group stacked,
/// `group × QUERY_BLOCK` rows per GEMM.
const QUERY_BLOCK: usize = 128;
/// Keys per score block: `group × QUERY_BLOCK × KEY_BLOCK` scores (384 KiB in f32 at
/// group 3) stay in a core's L2 between the QKᵀ GEMM, the softmax and the PV GEMM.
const KEY_BLOCK: usize = 256;

/// The head layout of one attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl Heads {
    pub fn of(cfg: &Config) -> Self {
        Self {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim(),
        }
    }
}

/// Causal grouped-query attention of queries at `positions` (ascending) over keys and
/// values of positions `0..`; with a `window`, the query at i sees keys j with
/// i - window < j <= i. Scores are scaled by 1/√head_dim. q: [positions.len(),
/// n_head·hd], k/v: [keys, n_head_kv·hd], f32 or f64 → [positions.len(), n_head·hd].
/// `probs_in_f16`: the normalized softmax output is rounded to f16 before it multiplies
/// V (an engine's f16 V cache matmul converting it); that takes a second pass over the
/// keys, since the normalization is known only after the first.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &[usize],
    heads: Heads,
    window: Option<usize>,
    probs_in_f16: bool,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (n, keys) = (q.dim(0)?, k.dim(0)?);
    let (qw, kvw) = (heads.n_head * heads.head_dim, heads.n_head_kv * heads.head_dim);
    if heads.n_head_kv == 0 || !heads.n_head.is_multiple_of(heads.n_head_kv) {
        bail!(
            "attention: {} query heads do not group over {} KV heads",
            heads.n_head,
            heads.n_head_kv
        );
    }
    if q.dims() != [n, qw] || k.dims() != [keys, kvw] || v.dims() != [keys, kvw] || positions.len() != n {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} for {} positions do not fit {heads:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            positions.len()
        );
    }
    if positions.windows(2).any(|w| w[0] >= w[1]) || positions.last().is_some_and(|&p| p >= keys) {
        bail!("attention: positions must ascend within the {keys} keys");
    }
    let out = match q.dtype() {
        DType::F32 => Tensor::from_vec(
            run::<f32>(&q, &k, &v, positions, heads, window, probs_in_f16)?,
            (n, qw),
            &Device::Cpu,
        )?,
        DType::F64 => Tensor::from_vec(
            run::<f64>(&q, &k, &v, positions, heads, window, probs_in_f16)?,
            (n, qw),
            &Device::Cpu,
        )?,
        other => bail!("attention computes in f32 or f64, not {other:?}"),
    };
    Ok(out)
}

/// [`attention`] on the values of `q`, `k`, `v` (contiguous, checked shapes).
fn run<T: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &[usize],
    heads: Heads,
    window: Option<usize>,
    probs_in_f16: bool,
) -> Result<Vec<T>> {
    let (n, keys) = (positions.len(), k.dim(0)?);
    let (qw, kvw) = (heads.n_head * heads.head_dim, heads.n_head_kv * heads.head_dim);
    let (sq, sk, sv) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
    let (Some(q), Some(k), Some(v)) = (
        values::<T>(&sq.0, sq.1, n * qw),
        values::<T>(&sk.0, sk.1, keys * kvw),
        values::<T>(&sv.0, sv.1, keys * kvw),
    ) else {
        bail!("attention: q, k and v must be CPU tensors of one dtype");
    };
    let problem = Problem {
        q,
        k,
        v,
        positions,
        heads,
        window,
        probs_in_f16,
        scale: T::from(1.0 / (heads.head_dim as f64).sqrt()).unwrap_or_else(T::one),
    };
    let blocks: Vec<Block> = query_runs(positions)
        .into_iter()
        .flat_map(|(first, len)| (0..heads.n_head_kv).map(move |kv_head| Block { kv_head, first, len }))
        .collect();
    let results: Vec<Vec<T>> = blocks.par_iter().map(|b| problem.block(b)).collect::<Result<_>>()?;
    let mut out = vec![T::zero(); n * qw];
    let (hd, group) = (heads.head_dim, heads.n_head / heads.n_head_kv);
    for (b, rows) in blocks.iter().zip(&results) {
        for (r, row) in rows.chunks_exact(hd).enumerate() {
            let (head, i) = (b.kv_head * group + r / b.len, b.first + r % b.len);
            out[i * qw + head * hd..][..hd].copy_from_slice(row);
        }
    }
    Ok(out)
}

/// The `count` values of a contiguous tensor's `storage` from its layout's offset.
fn values<'s, T: Element>(storage: &'s Storage, layout: &Layout, count: usize) -> Option<&'s [T]> {
    match storage {
        Storage::Cpu(c) => T::values(c).and_then(|v| v.get(layout.start_offset()..)?.get(..count)),
        _ => None,
    }
}

/// Runs of consecutive positions, at most [`QUERY_BLOCK`] long: (first index, length).
fn query_runs(positions: &[usize]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut first = 0;
    while first < positions.len() {
        let mut len = 1;
        while first + len < positions.len() && len < QUERY_BLOCK && positions[first + len] == positions[first] + len {
            len += 1;
        }
        runs.push((first, len));
        first += len;
    }
    runs
}

/// One task: the queries `first..first + len` (indices into the positions) of the query
/// heads that share KV head `kv_head`.
struct Block {
    kv_head: usize,
    first: usize,
    len: usize,
}

/// The operands of one [`attention`], as slices.
struct Problem<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    positions: &'a [usize],
    heads: Heads,
    window: Option<usize>,
    probs_in_f16: bool,
    scale: T,
}

/// A block's running state: per row (`r = head_in_group·len + i`) the running max of
/// the scores and sum of their exponentials, and the unnormalized output `[rows, hd]`.
struct Running<T> {
    max: Vec<T>,
    sum: Vec<T>,
    acc: Vec<T>,
}

impl<'a, T: Element> Problem<'a, T> {
    /// The keys query `i` sees: `p - window < j <= p` for its position p.
    fn visible(&self, i: usize) -> Range<usize> {
        let end = self.positions[i] + 1;
        self.window.map_or(0, |w| end.saturating_sub(w))..end
    }

    /// The attention output of block `b`: `[group·len, hd]`, row `r·len + i` for query
    /// head `kv_head·group + r` at query `first + i`.
    fn block(&self, b: &Block) -> Result<Vec<T>> {
        let Heads {
            n_head,
            n_head_kv,
            head_dim: hd,
        } = self.heads;
        let (group, rows) = (n_head / n_head_kv, n_head / n_head_kv * b.len);
        let qw = n_head * hd;
        // The group's query rows stacked into one [rows, hd] operand (GQA: one GEMM per
        // KV head), copied once per block and reused for every key block.
        let mut queries = vec![T::zero(); rows * hd];
        for (r, row) in queries.chunks_exact_mut(hd).enumerate() {
            let (head, i) = (b.kv_head * group + r / b.len, b.first + r % b.len);
            row.copy_from_slice(&self.q[i * qw + head * hd..][..hd]);
        }
        let keys = self.visible(b.first).start..self.visible(b.first + b.len - 1).end;
        let mut state = Running {
            max: vec![T::neg_infinity(); rows],
            sum: vec![T::zero(); rows],
            acc: vec![T::zero(); rows * hd],
        };
        let mut scores = vec![T::zero(); rows * KEY_BLOCK];
        let key_blocks = || {
            keys.clone()
                .step_by(KEY_BLOCK)
                .map(|s| s..(s + KEY_BLOCK).min(keys.end))
        };
        if self.probs_in_f16 {
            for kb in key_blocks() {
                self.scores(b, &queries, kb.clone(), &mut scores)?;
                self.fold_block(b, kb, &mut scores, &mut state, false);
            }
            for kb in key_blocks() {
                self.scores(b, &queries, kb.clone(), &mut scores)?;
                self.normalized_probs(b, kb.clone(), &mut scores, &state);
                self.add_pv(b, kb, &scores, &mut state.acc)?;
            }
            return Ok(state.acc);
        }
        for kb in key_blocks() {
            self.scores(b, &queries, kb.clone(), &mut scores)?;
            self.fold_block(b, kb.clone(), &mut scores, &mut state, true);
            self.add_pv(b, kb, &scores, &mut state.acc)?;
        }
        for (row, &sum) in state.acc.chunks_exact_mut(hd).zip(&state.sum) {
            let inv = T::one() / sum;
            row.iter_mut().for_each(|x| *x = *x * inv);
        }
        Ok(state.acc)
    }

    /// The visible part of score row `r` within key block `kb`, relative to `kb.start`.
    fn seen(&self, b: &Block, r: usize, kb: &Range<usize>) -> Range<usize> {
        let vis = self.visible(b.first + r % b.len);
        let (lo, hi) = (vis.start.max(kb.start), vis.end.min(kb.end));
        if lo >= hi {
            0..0
        } else {
            lo - kb.start..hi - kb.start
        }
    }

    /// `scores[rows, kb.len()] = scale · queries · K[kb]ᵀ`, K read in place.
    fn scores(&self, b: &Block, queries: &[T], kb: Range<usize>, scores: &mut [T]) -> Result<()> {
        let hd = self.heads.head_dim;
        let kvw = self.heads.n_head_kv * hd;
        let rows = queries.len() / hd;
        let a = Mat::dense(queries, rows, hd);
        // Kᵀ of the block: element (d, j) at k[(kb.start + j)·kvw + kv_head·hd + d].
        let kt = Mat {
            data: &self.k[kb.start * kvw + b.kv_head * hd..],
            rows: hd,
            cols: kb.len(),
            row_stride: 1,
            col_stride: kvw,
        };
        T::gemm(self.scale, a, kt, false, scores, kb.len())
    }

    /// `acc[rows, hd] += probs[rows, kb.len()] · V[kb]`, V read in place.
    fn add_pv(&self, b: &Block, kb: Range<usize>, probs: &[T], acc: &mut [T]) -> Result<()> {
        let hd = self.heads.head_dim;
        let kvw = self.heads.n_head_kv * hd;
        let rows = acc.len() / hd;
        let p = Mat::dense(&probs[..rows * kb.len()], rows, kb.len());
        let vb = Mat {
            data: &self.v[kb.start * kvw + b.kv_head * hd..],
            rows: kb.len(),
            cols: hd,
            row_stride: kvw,
            col_stride: 1,
        };
        T::gemm(T::one(), p, vb, true, acc, hd)
    }

    /// Folds a score block into the running max and sum of each row; the block becomes
    /// exp(score - new max) where visible and 0 elsewhere. With `rescale`, each row's
    /// accumulator is multiplied by exp(old max - new max) to stay on the new max.
    fn fold_block(&self, b: &Block, kb: Range<usize>, scores: &mut [T], state: &mut Running<T>, rescale: bool) {
        let (width, hd) = (kb.len(), self.heads.head_dim);
        for (r, row) in scores.chunks_exact_mut(width).take(state.max.len()).enumerate() {
            let seen = self.seen(b, r, &kb);
            let factor = fold_row(row, seen, &mut state.max[r], &mut state.sum[r]);
            if rescale && factor != T::one() {
                state.acc[r * hd..][..hd].iter_mut().for_each(|x| *x = *x * factor);
            }
        }
    }

    /// The block's final probabilities exp(score - max) / sum, rounded through f16, 0
    /// where masked (the second pass of `probs_in_f16`).
    fn normalized_probs(&self, b: &Block, kb: Range<usize>, scores: &mut [T], state: &Running<T>) {
        let width = kb.len();
        for (r, row) in scores.chunks_exact_mut(width).take(state.max.len()).enumerate() {
            let seen = self.seen(b, r, &kb);
            let (max, inv) = (state.max[r], T::one() / state.sum[r]);
            T::exp_shifted(&mut row[seen.clone()], max);
            for x in &mut row[seen.clone()] {
                *x = (*x * inv).through_f16();
            }
            row[..seen.start].fill(T::zero());
            row[seen.end..].fill(T::zero());
        }
    }
}

/// One row of the online softmax: the visible scores `row[seen]` raise the running
/// `max` (where larger) and become exp(score - max), the rest of the row 0; `sum` is
/// rescaled to the new max and takes the row's exponentials. Returns the rescale
/// factor exp(old max - new max) (0 for the first visible block, 1 when the max held).
fn fold_row<T: Element>(row: &mut [T], seen: Range<usize>, max: &mut T, sum: &mut T) -> T {
    if seen.is_empty() {
        row.fill(T::zero());
        return T::one();
    }
    let block_max = T::max_of(&row[seen.clone()]);
    let new_max = max.max(block_max);
    T::exp_shifted(&mut row[seen.clone()], new_max);
    let block_sum = lanes(&row[seen.clone()], T::zero(), |s, x| s + x, |a, b| a + b);
    row[..seen.start].fill(T::zero());
    row[seen.end..].fill(T::zero());
    let factor = if *max == new_max {
        T::one()
    } else {
        (*max - new_max).exp_vectorizable()
    };
    *sum = *sum * factor + block_sum;
    *max = new_max;
    factor
}

/// A reduction of `xs` over eight interleaved lanes (lane i takes elements i, i + 8, …),
/// so that it vectorizes: `step(acc, x)` folds an element in, `merge` joins the lanes in
/// order. Exact for max; for a float sum it is another rounding order, as accurate as
/// the sequential one.
#[inline(always)]
fn lanes<T: Copy>(xs: &[T], init: T, step: impl Fn(T, T) -> T, merge: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = step(*a, x);
        }
    }
    let joined = acc.into_iter().fold(init, &merge);
    rest.iter().fold(joined, |a, &x| step(a, x))
}

/// A row-major matrix view: element (i, j) at `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

impl<'a> Mat<'a, f32> {
    fn strided(self) -> Strided<'a> {
        Strided {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// What the attention needs of its element type: a GEMM on the calling thread, the
/// values of a CPU storage, and the rounding through f16 of `probs_in_f16`.
pub(crate) trait Element: Exp + Send + Sync + 'static {
    /// `c ← alpha·a·b (+ c when accumulate)`, `c` `[a.rows, b.cols]` at row stride `ldc`.
    fn gemm(alpha: Self, a: Mat<Self>, b: Mat<Self>, accumulate: bool, c: &mut [Self], ldc: usize) -> Result<()>;
    fn values(storage: &CpuStorage) -> Option<&[Self]>;
    fn through_f16(self) -> Self;

    /// The largest of `xs` ignoring NaNs (-inf when none).
    fn max_of(xs: &[Self]) -> Self {
        max_in_lanes(xs)
    }

    /// `x ← e^(x - shift)` for each x of `xs`.
    fn exp_shifted(xs: &mut [Self], shift: Self) {
        exp_shifted_in_blocks(xs, shift)
    }
}

/// [`Element::max_of`] over eight lanes: `x > m` keeps NaNs out as `Float::max` does, in
/// one compare-and-select (the `max` instruction) per element.
#[inline(always)]
fn max_in_lanes<T: Exp>(xs: &[T]) -> T {
    let pick = |m: T, x: T| if x > m { x } else { m };
    lanes(xs, T::neg_infinity(), pick, pick)
}

/// [`Element::exp_shifted`] in runs of 32 values: the compiler unrolls each run into
/// independent vectors whose long exp dependency chains overlap.
#[inline(always)]
fn exp_shifted_in_blocks<T: Exp>(xs: &mut [T], shift: T) {
    let mut runs = xs.chunks_exact_mut(32);
    for run in &mut runs {
        for x in run {
            *x = (*x - shift).exp_vectorizable();
        }
    }
    for x in runs.into_remainder() {
        *x = (*x - shift).exp_vectorizable();
    }
}

impl Element for f32 {
    fn gemm(alpha: f32, a: Mat<f32>, b: Mat<f32>, accumulate: bool, c: &mut [f32], ldc: usize) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        if blas::sgemm_here(alpha, a.strided(), b.strided(), beta, c, ldc)? {
            return Ok(());
        }
        portable_gemm(alpha, a, b, accumulate, c, ldc)
    }

    fn values(storage: &CpuStorage) -> Option<&[f32]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }

    fn through_f16(self) -> f32 {
        half::f16::from_f32(self).to_f32()
    }

    fn max_of(xs: &[f32]) -> f32 {
        if wide_vectors() {
            // SAFETY: the CPU has the features `avx512` is compiled for.
            return unsafe { avx512::max_of(xs) };
        }
        max_in_lanes(xs)
    }

    fn exp_shifted(xs: &mut [f32], shift: f32) {
        if wide_vectors() {
            // SAFETY: as above.
            return unsafe { avx512::exp_shifted(xs, shift) };
        }
        exp_shifted_in_blocks(xs, shift)
    }
}

/// Whether this CPU runs the [`avx512`] versions of the f32 row kernels.
fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The f32 row kernels compiled for 16-wide AVX-512 vectors (the build targets AVX2):
/// the same IEEE operations in the same order per element, so the same values.
mod avx512 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) fn max_of(xs: &[f32]) -> f32 {
        super::max_in_lanes(xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) fn exp_shifted(xs: &mut [f32], shift: f32) {
        super::exp_shifted_in_blocks(xs, shift)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn max_of(xs: &[f32]) -> f32 {
        super::max_in_lanes(xs)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn exp_shifted(xs: &mut [f32], shift: f32) {
        super::exp_shifted_in_blocks(xs, shift)
    }
}

impl Element for f64 {
    fn gemm(alpha: f64, a: Mat<f64>, b: Mat<f64>, accumulate: bool, c: &mut [f64], ldc: usize) -> Result<()> {
        portable_gemm(alpha, a, b, accumulate, c, ldc)
    }

    fn values(storage: &CpuStorage) -> Option<&[f64]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }

    fn through_f16(self) -> f64 {
        half::f16::from_f64(self).to_f64()
    }
}

/// [`Element::gemm`] on the `gemm` crate (candle's CPU GEMM), single-threaded.
fn portable_gemm<T: Element>(alpha: T, a: Mat<T>, b: Mat<T>, accumulate: bool, c: &mut [T], ldc: usize) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_fits = m == 0 || n == 0 || (ldc >= n && (m - 1) * ldc + n <= c.len());
    if b.rows != k || !a.fits() || !b.fits() || !c_fits {
        bail!("gemm: [{m}, {k}] · [{}, {n}] does not fit its operands", b.rows);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let signed = |s: usize| s as isize;
    // SAFETY: the checks above put every element read inside `a.data`, `b.data` and
    // every element written inside `c`. gemm's dst = alpha·dst + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            signed(ldc),
            accumulate,
            a.data.as_ptr(),
            signed(a.col_stride),
            signed(a.row_stride),
            b.data.as_ptr(),
            signed(b.col_stride),
            signed(b.row_stride),
            T::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
