//! Quantized matrices on the GPU (`--weights native`): the GGUF blocks uploaded as they
//! are (Q6_K's padded to 16-byte alignment); a decode step's row reads them in `rb_qgemv3_<type>` (fused dequantization; q, k
//! and v or gate and up in one launch when they share a type). More rows (prefill) trade
//! memory for speed: the matrix is dequantized into one transient workspace of the
//! storage dtype (the size of the largest matrix, the output head's: 131 MB for a
//! TinyLlama-shaped model in f16) and multiplied by the dense GEMM (cuBLAS tensor cores on
//! `cuda`), which costs one pass over the weights per matmul beside the GEMM's own.

use candle_core::quantized::GgmlDType;

use super::kernels::{self, Ptr};
use super::plan::Grid;
use super::{Driver, GpuBackend};
use crate::error::{Error, Result};
use crate::quant::{check_layout, QuantType};
use crate::runtime::backend::{self, Backend};

/// Bytes between Q6_K blocks on the device (RB_Q6_K_BYTES in ops.hip): each 210-byte
/// block is followed by 14 zero bytes so that the matvec reads it in 16-byte words.
pub const Q6_K_DEVICE_BYTES: usize = 224;

/// A `[n, k]` matrix of GGUF blocks on the device (Q6_K's padded to
/// [`Q6_K_DEVICE_BYTES`]).
pub struct GpuQuant<D: Driver> {
    blocks: D::Bytes,
    ty: QuantType,
    n: usize,
    k: usize,
}

impl<D: Driver> GpuBackend<D> {
    /// See [`Backend::upload_quant`]: every type of [`QuantType`] has device kernels.
    pub(super) fn upload_blocks(
        &self,
        name: &str,
        dtype: GgmlDType,
        dims: &[usize],
        data: &[u8],
    ) -> Result<Option<GpuQuant<D>>> {
        let Some(ty) = QuantType::of(dtype) else {
            return Ok(None);
        };
        let (k, n) = check_layout(name, ty, dims, data.len())?;
        let blocks = if ty == QuantType::Q6K {
            let mut padded = vec![0u8; data.len() / ty.block_bytes() * Q6_K_DEVICE_BYTES];
            for (to, from) in padded
                .chunks_exact_mut(Q6_K_DEVICE_BYTES)
                .zip(data.chunks_exact(ty.block_bytes()))
            {
                to[..from.len()].copy_from_slice(from);
            }
            self.driver.upload_bytes(&padded)?
        } else {
            self.driver.upload_bytes(data)?
        };
        Ok(Some(GpuQuant { blocks, ty, n, k }))
    }

    /// See [`Backend::matmul_quant`].
    pub(super) fn matmul_blocks(
        &self,
        x: &D::Buf,
        w: &GpuQuant<D>,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut D::Buf,
    ) -> Result<()> {
        self.check_blocks(x, w, rows, k, n, out)?;
        let (gemv, dequant) = kernels::quant_kernels(w.ty);
        let wp = Ptr(self.driver.bytes_addr(&w.blocks));
        if rows == 1 {
            let (xp, op) = (self.ptr(x), self.ptr(out));
            let call = gemv(wp, wp, wp, xp, op, op, op, k as i32, n as i32, 0, 0);
            return self
                .driver
                .launch(call, Grid::quant_gemv([n, 0, 0], row_pieces(w.ty, k), D::WARP));
        }
        let mut workspace = self.dequant_workspace.borrow_mut();
        if workspace.as_ref().is_none_or(|b| self.len(b) < n * k) {
            *workspace = Some(self.driver.alloc(n * k)?);
        }
        let dense = workspace.as_ref().expect("allocated above");
        let subs = n * k / 32;
        self.driver.launch(
            dequant(wp, self.ptr(dense), subs as i64),
            Grid::linear(subs, kernels::DEQUANT_THREADS),
        )?;
        self.matmul(x, dense, rows, k, n, out)
    }

    /// See [`Backend::matmul3_quant`]: one launch for a decode step's row when the
    /// matrices share a block type, else a matmul per part.
    pub(super) fn matmul3_blocks(
        &self,
        x: &D::Buf,
        w: [&GpuQuant<D>; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut D::Buf; 3],
    ) -> Result<()> {
        if rows > 1 || w.iter().zip(n).any(|(wi, ni)| ni > 0 && wi.ty != w[0].ty) {
            return backend::matmul3_quant_by_parts(self, x, w, rows, k, n, out);
        }
        for i in 0..3 {
            if n[i] > 0 {
                self.check_blocks(x, w[i], rows, k, n[i], out[i])?;
            }
        }
        let (gemv, _) = kernels::quant_kernels(w[0].ty);
        let [w0, w1, w2] = w.map(|wi| Ptr(self.driver.bytes_addr(&wi.blocks)));
        let [o0, o1, o2] = out.map(|o| self.ptr(o));
        let [n0, n1, n2] = n.map(|n| n as i32);
        let call = gemv(w0, w1, w2, self.ptr(x), o0, o1, o2, k as i32, n0, n1, n2);
        self.driver
            .launch(call, Grid::quant_gemv(n, row_pieces(w[0].ty, k), D::WARP))
    }

    /// `w` is `[n, k]` and `x`, `out` hold `rows` rows of it.
    fn check_blocks(&self, x: &D::Buf, w: &GpuQuant<D>, rows: usize, k: usize, n: usize, out: &D::Buf) -> Result<()> {
        if (w.n, w.k) != (n, k) {
            return Err(Error::engine(format!(
                "{}: matmul_quant: a [{}, {}] matrix used as [{n}, {k}]",
                D::NAME,
                w.n,
                w.k
            )));
        }
        self.check(self.len(x), rows * k, "matmul_quant input")?;
        self.check(self.len(out), rows * n, "matmul_quant output")
    }
}

/// Pieces of a row of `k` values of a quantized type, as the block matvec cuts it.
fn row_pieces(ty: QuantType, k: usize) -> usize {
    k / ty.block_values() * kernels::quant_gemv_pieces(ty)
}
