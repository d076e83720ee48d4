//! Launch shapes of the GPU backends: grids per op, the attention plan (tiled or split
//! keys, by how many query rows there are) and the row count below which a matmul is a
//! gemv. Shared by both drivers; only the warp width differs between them.

use super::kernels::{self, AttentionKernel, MergeKernel};
use crate::error::{Error, Result};
use crate::runtime::backend::AttnShape;

/// Blocks and threads per block of one launch, and the bytes of dynamic shared memory
/// each block gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub blocks: (u32, u32, u32),
    pub threads: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Grid {
    /// `n` threads in blocks of `threads`.
    pub fn linear(n: usize, threads: u32) -> Self {
        Self {
            blocks: ((n as u32).div_ceil(threads).max(1), 1, 1),
            threads: (threads, 1, 1),
            shared_bytes: 0,
        }
    }

    /// One block of `threads` per row.
    pub fn per_row(rows: usize, threads: u32) -> Self {
        Self {
            blocks: (rows as u32, 1, 1),
            threads: (threads, 1, 1),
            shared_bytes: 0,
        }
    }

    /// Blocks of [`GEMV_THREADS`], one output column per warp (the rb_gemv kernels).
    pub fn gemv(columns: usize, warp: u32) -> Self {
        Self {
            blocks: ((columns as u32).div_ceil(GEMV_THREADS / warp), 1, 1),
            threads: (GEMV_THREADS, 1, 1),
            shared_bytes: 0,
        }
    }

    /// One block per [`QUANT_COLUMNS`] output columns of each of up to three matrices (the
    /// rb_qgemv3 kernels), of [`QUANT_WARPS`] warps or as few as give every lane one of
    /// the row's `pieces` (a Q4_K row of 2048 values has 64: two warps, not four with two
    /// idle, so twice as many blocks fit an SM).
    pub fn quant_gemv(columns: [usize; 3], pieces: usize, warp: u32) -> Self {
        let blocks: usize = columns.iter().map(|n| n.div_ceil(QUANT_COLUMNS)).sum();
        let warps = pieces.div_ceil(warp as usize).clamp(1, QUANT_WARPS);
        Self {
            blocks: (blocks as u32, 1, 1),
            threads: (warps as u32 * warp, 1, 1),
            shared_bytes: 0,
        }
    }

    /// The same launch with `bytes` of dynamic shared memory per block.
    pub fn with_shared(self, bytes: usize) -> Self {
        Self {
            shared_bytes: bytes as u32,
            ..self
        }
    }

    /// 16×16 tiles of the output (rb_matmul).
    pub fn tiles(rows: usize, n: usize) -> Self {
        Self {
            blocks: ((n as u32).div_ceil(16), (rows as u32).div_ceil(16), 1),
            threads: (16, 16, 1),
            shared_bytes: 0,
        }
    }
}

/// Up to this many rows a matmul runs as rb_gemv (RB_GEMV_ROWS in ops.hip).
pub const GEMV_ROWS: usize = 4;
/// Threads of a block of the rb_gemv kernels (RB_GEMV_THREADS in ops.hip).
pub const GEMV_THREADS: u32 = 256;
/// Output columns per block of the quantized matvecs (RB_QCOLS in ops.hip): the x values a
/// weight piece multiplies are read once for all of them.
pub const QUANT_COLUMNS: usize = 4;
/// Threads of the one block per row of the RMSNorms: a decode row's norm is a chain of
/// dependent loads per thread, so more threads make it shorter (4.0 µs at 256 threads on
/// an H200, TinyLlama width); the same count for every row count keeps one summation order.
pub const NORM_THREADS: u32 = 1024;
/// Warps per block of the quantized matvecs (RB_QWARPS in ops.hip), splitting each row.
pub const QUANT_WARPS: usize = 6;

/// Below this many (row, head) pairs attention splits keys over blocks; also the most
/// partial states the scratch holds.
const ATTN_SPLIT_PAIRS: usize = 4096;
/// Most key splits per (row, head): 16 × 32 heads fills an H100 at one row
/// (RB_ATTN_MAX_SPLITS in ops.hip, which the merge kernel unrolls over).
pub const ATTN_MAX_SPLITS: usize = 16;
/// The head dims the attention kernels are instantiated for (RB_ATTENTION in ops.hip).
pub const ATTN_HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Floats of the partial-state scratch a backend allocates once: max, weight sum and the
/// largest head dim of values, for every state.
pub const ATTN_PART_FLOATS: usize = ATTN_SPLIT_PAIRS * (256 + 2);

/// How a backend runs an attention call.
pub enum AttnPlan {
    /// Query tiles of RB_ATTN_QB rows per block: many rows.
    Tiled { kernel: AttentionKernel, grid: Grid },
    /// Few rows: keys split over blocks per (row, head) whose partial softmax states
    /// (head dim + 2 floats each, in the backend's scratch) the merge kernel combines.
    Split {
        part: AttentionKernel,
        part_grid: Grid,
        merge: MergeKernel,
        merge_grid: Grid,
        splits: i32,
    },
}

/// The attention kernels for a shape, with grids; refuses shapes the kernels do not cover.
pub fn attention_plan(s: &AttnShape, backend: &str) -> Result<AttnPlan> {
    if s.n_head_kv == 0 || !s.n_head.is_multiple_of(s.n_head_kv) {
        return Err(Error::engine(format!(
            "{backend}: attention: {} heads do not group over {} KV heads",
            s.n_head, s.n_head_kv
        )));
    }
    if !ATTN_HEAD_DIMS.contains(&s.head_dim) {
        return Err(Error::input(format!(
            "{backend}: attention kernels exist for head dims {ATTN_HEAD_DIMS:?}, not {}",
            s.head_dim
        )));
    }
    let pairs = s.rows * s.n_head;
    let (rows, heads) = (s.rows as u32, s.n_head as u32);
    Ok(if pairs < ATTN_SPLIT_PAIRS {
        let splits = (ATTN_SPLIT_PAIRS / pairs).min(ATTN_MAX_SPLITS);
        let (part, merge): (AttentionKernel, MergeKernel) = match s.head_dim {
            64 => (kernels::rb_attention_part_64, kernels::rb_attention_merge_64),
            128 => (kernels::rb_attention_part_128, kernels::rb_attention_merge_128),
            _ => (kernels::rb_attention_part_256, kernels::rb_attention_merge_256),
        };
        AttnPlan::Split {
            part,
            part_grid: Grid {
                blocks: (rows, heads, splits as u32),
                threads: (128, 1, 1),
                shared_bytes: 0,
            },
            merge,
            merge_grid: Grid {
                blocks: (rows, heads, 1),
                threads: (s.head_dim as u32, 1, 1),
                shared_bytes: 0,
            },
            splits: splits as i32,
        }
    } else {
        let kernel: AttentionKernel = match s.head_dim {
            64 => kernels::rb_attention_tiled_64,
            128 => kernels::rb_attention_tiled_128,
            _ => kernels::rb_attention_tiled_256,
        };
        AttnPlan::Tiled {
            kernel,
            grid: Grid {
                blocks: (rows.div_ceil(64), heads, 1),
                threads: (64, 1, 1),
                shared_bytes: 0,
            },
        }
    })
}
