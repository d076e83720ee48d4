//! Quantized matrices on the GPU (`--weights native`): the GGUF blocks uploaded as they
//! are; decode reads them in `rb_qgemv_<type>` (fused dequantization). Prefill trades
//! memory for speed: the matrix is dequantized into one transient workspace of the
//! storage dtype (the size of the largest matrix, the output head's: 131 MB for a
//! TinyLlama-shaped model in f16) and multiplied by the dense GEMM (cuBLAS tensor cores on
//! `cuda`), which costs one pass over the weights per matmul beside the GEMM's own.

use candle_core::quantized::GgmlDType;

use super::kernels::{self, Ptr};
use super::plan::{Grid, GEMV_ROWS};
use super::{Driver, GpuBackend};
use crate::error::{Error, Result};
use crate::quant::{check_layout, QuantType};
use crate::runtime::backend::Backend;

/// A `[n, k]` matrix of GGUF blocks on the device.
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
        Ok(Some(GpuQuant {
            blocks: self.driver.upload_bytes(data)?,
            ty,
            n,
            k,
        }))
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
        if (w.n, w.k) != (n, k) {
            return Err(Error::engine(format!(
                "{}: matmul_quant: a [{}, {}] matrix used as [{n}, {k}]",
                D::NAME,
                w.n,
                w.k
            )));
        }
        self.check(self.len(x), rows * k, "matmul_quant input")?;
        self.check(self.len(out), rows * n, "matmul_quant output")?;
        let (gemv, dequant) = kernels::quant_kernels(w.ty);
        let wp = Ptr(self.driver.bytes_addr(&w.blocks));
        if rows <= GEMV_ROWS {
            let call = gemv(wp, self.ptr(x), self.ptr(out), rows as i32, k as i32, n as i32);
            return self.driver.launch(call, Grid::gemv(n, D::WARP));
        }
        let mut workspace = self.dequant_workspace.borrow_mut();
        if workspace.as_ref().is_none_or(|b| self.len(b) < n * k) {
            *workspace = Some(self.driver.alloc(n * k)?);
        }
        let dense = workspace.as_ref().expect("allocated above");
        let subs = n * k / 32;
        self.driver
            .launch(dequant(wp, self.ptr(dense), subs as i64), Grid::linear(subs, 256))?;
        self.matmul(x, dense, rows, k, n, out)
    }
}
