//! cuBLAS in the CUDA driver: matmuls of more than a few rows, and prefill attention as
//! batched GEMMs on the matrix units (with rb_softmax_causal between them). The handle is
//! created on a thread of its own while weights load, since loading cuBLAS takes ~0.1 s.

use std::cell::{OnceCell, RefCell};
use std::sync::Arc;
use std::thread::JoinHandle;

use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::quiet::quietly;
use super::{device_error, Cuda, CudaElem};
use crate::error::{Error, Result};
use crate::runtime::backend::AttnShape;
use crate::runtime::gpu::kernels::{rb_softmax_causal, Ptr};
use crate::runtime::gpu::plan::Grid;
use crate::runtime::gpu::Driver;

/// From this many query rows, attention runs as GEMMs on the matrix units.
pub(super) const GEMM_ATTENTION_ROWS: usize = 256;

/// Queries per chunk of the GEMM attention: bounds the score buffer to
/// `heads per KV head × ATTN_CHUNK × keys` f32 values.
const ATTN_CHUNK: usize = 512;

/// The cuBLAS handle, ready on first use.
pub(super) struct Blas {
    handle: OnceCell<CudaBlas>,
    pending: RefCell<Option<JoinHandle<Result<CudaBlas>>>>,
}

impl Blas {
    /// Start creating the handle on a thread of its own.
    pub(super) fn start(stream: Arc<CudaStream>) -> Self {
        let pending = std::thread::spawn(move || {
            let blas = quietly(|| CudaBlas::new(stream))
                .ok_or_else(|| Error::input("--backend cuda: cuBLAS (libcublas) could not be loaded"))?
                .map_err(|e| Error::engine(format!("cuda: cuBLAS: {e}")))?;
            crate::trace::mark(|| "cuda: cuBLAS ready".into());
            Ok(blas)
        });
        Self {
            handle: OnceCell::new(),
            pending: RefCell::new(Some(pending)),
        }
    }

    /// The handle, waiting for its creation the first time.
    pub(super) fn handle(&self) -> Result<&CudaBlas> {
        if let Some(blas) = self.handle.get() {
            return Ok(blas);
        }
        let pending = self
            .pending
            .borrow_mut()
            .take()
            .ok_or_else(|| Error::engine("cuda: cuBLAS failed to start earlier"))?;
        let blas = pending
            .join()
            .map_err(|_| Error::engine("cuda: the thread loading cuBLAS panicked"))??;
        Ok(self.handle.get_or_init(|| blas))
    }
}

/// One operand of a strided batched GEMM: device address, leading dimension, stride
/// between batches, element type.
#[derive(Clone, Copy)]
struct Operand(u64, usize, i64, cudaDataType);

/// One strided batched GEMM in column-major terms: `C = alpha · op(A) · B` per batch.
struct Batched {
    transpose_a: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    c: Operand,
    batch: usize,
}

impl<T: CudaElem> Cuda<T>
where
    CudaBlas: Gemm<T>,
{
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ` (shapes checked by the caller).
    pub(super) fn gemm(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        (rows, k, n): (usize, usize, usize),
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        // Row-major out[rows, n] = x · wᵀ is column-major outᵀ[n, rows] = wᵀ[n, k] · xᵀ[k, rows].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: k as i32,
            alpha: T::from_f32(1.0),
            lda: k as i32,
            ldb: k as i32,
            beta: T::from_f32(0.0),
            ldc: n as i32,
        };
        // SAFETY: shapes checked by the caller.
        unsafe { self.blas.handle()?.gemm(cfg, w, x, out) }
            .map_err(|e| Error::engine(format!("cuda: cuBLAS gemm [{rows}x{k}]·[{k}x{n}]: {e}")))
    }

    /// # Safety
    /// Every operand's batches lie inside device memory of the right type.
    unsafe fn batched(&self, g: Batched) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
        let beta = 0.0f32;
        let op_a = if g.transpose_a {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        let (a, b, c) = (g.a, g.b, g.c);
        cudarc::cublas::result::gemm_strided_batched_ex(
            *self.blas.handle()?.handle(),
            op_a,
            cublasOperation_t::CUBLAS_OP_N,
            g.m as i32,
            g.n as i32,
            g.k as i32,
            (&g.alpha) as *const f32 as *const _,
            a.0 as *const _,
            a.3,
            a.1 as i32,
            a.2,
            b.0 as *const _,
            b.3,
            b.1 as i32,
            b.2,
            (&beta) as *const f32 as *const _,
            c.0 as *mut _,
            c.3,
            c.1 as i32,
            c.2,
            g.batch as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| Error::engine(format!("cuda: cuBLAS batched gemm in attention: {e}")))
    }

    /// Prefill attention on the matrix units: per chunk of queries and per KV head,
    /// S = Q·Kᵀ (batched over the heads that share the KV head), causal softmax, O = P·V.
    /// Shapes checked by the caller.
    pub(super) fn attention_gemm(
        &self,
        q: &CudaSlice<T>,
        (k_cache, v_cache): (&CudaSlice<T>, &CudaSlice<T>),
        s: AttnShape,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let group = s.n_head / s.n_head_kv;
        let chunk_values = group * ATTN_CHUNK.min(s.rows) * (s.first_pos + s.rows);
        let mut scores = self
            .stream
            .alloc_zeros::<f32>(chunk_values)
            .map_err(device_error("allocating attention scores"))?;
        let mut probs = self
            .stream
            .alloc_zeros::<T>(chunk_values)
            .map_err(device_error("allocating attention probabilities"))?;
        let at = AttnBuffers {
            q: q.device_ptr(&self.stream).0,
            k: k_cache.device_ptr(&self.stream).0,
            v: v_cache.device_ptr(&self.stream).0,
            scores: scores.device_ptr_mut(&self.stream).0,
            probs: probs.device_ptr_mut(&self.stream).0,
            out: out.device_ptr_mut(&self.stream).0,
        };
        for c0 in (0..s.rows).step_by(ATTN_CHUNK) {
            for kv_head in 0..s.n_head_kv {
                self.attention_chunk(&at, s, c0, kv_head)?;
            }
        }
        Ok(())
    }

    /// Queries `c0..c0 + ATTN_CHUNK` of the heads that share `kv_head`.
    fn attention_chunk(&self, at: &AttnBuffers, s: AttnShape, c0: usize, kv_head: usize) -> Result<()> {
        let (hd, group) = (s.head_dim, s.n_head / s.n_head_kv);
        let (qw, kvw) = (s.n_head * hd, s.n_head_kv * hd);
        let el = std::mem::size_of::<T>() as u64;
        let f32t = cudaDataType::CUDA_R_32F;
        let n = ATTN_CHUNK.min(s.rows - c0);
        let nk = s.first_pos + c0 + n;
        let h0 = kv_head * group;
        let k_at = at.k + (kv_head * hd) as u64 * el;
        let v_at = at.v + (kv_head * hd) as u64 * el;
        let q_at = at.q + ((c0 * qw + h0 * hd) as u64) * el;
        let o_at = at.out + ((c0 * qw + h0 * hd) as u64) * el;
        let batch_stride = (n * nk) as i64;
        // SAFETY: every operand lies inside its buffer: keys < first_pos + rows (cache
        // rows), queries c0..c0 + n, heads h0..h0 + group, scores and probs sized for
        // group × n × nk.
        unsafe {
            self.batched(Batched {
                transpose_a: true,
                m: nk,
                n,
                k: hd,
                alpha: 1.0 / (hd as f32).sqrt(),
                a: Operand(k_at, kvw, 0, T::CUDA_TYPE),
                b: Operand(q_at, qw, hd as i64, T::CUDA_TYPE),
                c: Operand(at.scores, nk, batch_stride, f32t),
                batch: group,
            })?;
        }
        let first = (s.first_pos + c0) as i32;
        let window = s.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let call = rb_softmax_causal(Ptr(at.scores), Ptr(at.probs), nk as i32, n as i32, first, window);
        let grid = Grid {
            blocks: (n as u32, group as u32, 1),
            threads: (256, 1, 1),
            shared_bytes: 0,
        };
        self.launch(call, grid)?;
        // SAFETY: as above; the output rows c0..c0 + n of heads h0..h0 + group.
        unsafe {
            self.batched(Batched {
                transpose_a: false,
                m: hd,
                n,
                k: nk,
                alpha: 1.0,
                a: Operand(v_at, kvw, 0, T::CUDA_TYPE),
                b: Operand(at.probs, nk, batch_stride, T::CUDA_TYPE),
                c: Operand(o_at, qw, hd as i64, T::CUDA_TYPE),
                batch: group,
            })
        }
    }
}

/// Device addresses of the operands of GEMM attention.
struct AttnBuffers {
    q: u64,
    k: u64,
    v: u64,
    scores: u64,
    probs: u64,
    out: u64,
}
