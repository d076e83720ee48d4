//! Causal (optionally sliding-window) grouped-query attention in key blocks with an
//! online softmax (FlashAttention, Dao et al. 2022, Algorithm 1; the running max and sum
//! of Milakov & Gimelshein 2018): per (KV head, query block), the score block against
//! each key block is a GEMM that stays in cache, fully masked key blocks are never
//! computed, and K/V are read in place from the projections (no per-block copies).
//! Generic over f32 (OpenBLAS, one thread per task) and f64 (the twin; the `gemm` crate).

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;
use resbisect_taps::Config;

use element::{Element, Mat};

mod element;
#[cfg(test)]
mod tests;

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
    let runs = query_runs(positions);
    let blocks: Vec<Block> = runs
        .iter()
        .flat_map(|&(first, len)| (0..heads.n_head_kv).map(move |kv_head| Block { kv_head, first, len }))
        .collect();
    let results: Vec<Vec<T>> = blocks
        .par_iter()
        .map_init(Scratch::default, |scratch, b| problem.block(b, scratch))
        .collect::<Result<_>>()?;
    // Each run's output rows, filled in parallel from its KV heads' blocks.
    let mut out = vec![T::zero(); n * qw];
    let mut run_rows = Vec::with_capacity(runs.len());
    let mut rest = &mut out[..];
    for &(_, len) in &runs {
        let (rows, tail) = rest.split_at_mut(len * qw);
        run_rows.push(rows);
        rest = tail;
    }
    let (hd, group) = (heads.head_dim, heads.n_head / heads.n_head_kv);
    run_rows
        .into_par_iter()
        .zip(
            blocks
                .par_chunks(heads.n_head_kv)
                .zip(results.par_chunks(heads.n_head_kv)),
        )
        .for_each(|(out, (blocks, results))| {
            for (b, rows) in blocks.iter().zip(results) {
                for (r, row) in rows.chunks_exact(hd).enumerate() {
                    let (head, i) = (b.kv_head * group + r / b.len, r % b.len);
                    out[i * qw + head * hd..][..hd].copy_from_slice(row);
                }
            }
        });
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

/// Buffers a rayon task reuses from block to block: the stacked queries and a score
/// block.
struct Scratch<T> {
    queries: Vec<T>,
    scores: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            queries: Vec::new(),
            scores: Vec::new(),
        }
    }
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
    fn block(&self, b: &Block, scratch: &mut Scratch<T>) -> Result<Vec<T>> {
        let Heads {
            n_head,
            n_head_kv,
            head_dim: hd,
        } = self.heads;
        let (group, rows) = (n_head / n_head_kv, n_head / n_head_kv * b.len);
        let qw = n_head * hd;
        // The group's query rows stacked into one [rows, hd] operand (GQA: one GEMM per
        // KV head), copied once per block and reused for every key block.
        let queries = &mut scratch.queries;
        queries.resize(rows * hd, T::zero());
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
        let scores = &mut scratch.scores;
        scores.resize(rows * KEY_BLOCK, T::zero());
        let key_blocks = || {
            keys.clone()
                .step_by(KEY_BLOCK)
                .map(|s| s..(s + KEY_BLOCK).min(keys.end))
        };
        if self.probs_in_f16 {
            for kb in key_blocks() {
                self.scores(b, &queries[..rows * hd], kb.clone(), scores)?;
                self.fold_block(b, kb, scores, &mut state, false);
            }
            for kb in key_blocks() {
                self.scores(b, &queries[..rows * hd], kb.clone(), scores)?;
                self.normalized_probs(b, kb.clone(), scores, &state);
                self.add_pv(b, kb, scores, &mut state.acc)?;
            }
            return Ok(state.acc);
        }
        for kb in key_blocks() {
            self.scores(b, &queries[..rows * hd], kb.clone(), scores)?;
            self.fold_block(b, kb.clone(), scores, &mut state, true);
            self.add_pv(b, kb, scores, &mut state.acc)?;
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
            T::exp_sum(&mut row[seen.clone()], max);
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
    let block_sum = T::exp_sum(&mut row[seen.clone()], new_max);
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
