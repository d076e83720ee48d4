//! Self-test checks of the quantized matmul (`--weights native`): for every block type,
//! the device's block matvec (decode rows) and its dequantize-then-GEMM prefill against
//! the `cpu` backend's fused product, on odd shapes, with the guard and NaN checks of
//! every op.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::Checker;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::runtime::backend::Backend;

impl<B: Backend> Checker<'_, B> {
    /// `[rows, k] · [n, k]ᵀ` with the weight quantized to `ty` (by candle, for test data).
    pub(super) fn matmul_quant(&mut self, ty: QuantType, rows: usize, k: usize, n: usize) -> Result<()> {
        let (x, w) = (self.random(rows * k, 1.0), self.random(n * k, 0.05));
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).map_err(|e| Error::engine(e.to_string()))?;
        let q = QTensor::quantize(&t, ty.ggml()).map_err(|e| Error::engine(format!("quantizing {ty:?}: {e}")))?;
        let data = q.data().map_err(|e| Error::engine(e.to_string()))?.into_owned();
        let dims = [k, n];
        let missing = || Error::engine(format!("{ty:?}: no quantized matmul"));
        let gw = self
            .gpu
            .upload_quant("selftest", ty.ggml(), &dims, &data)?
            .ok_or_else(missing)?;
        let cw = self
            .cpu
            .upload_quant("selftest", ty.ggml(), &dims, &data)?
            .ok_or_else(missing)?;
        let (gx, mut gout) = (self.gpu.upload(&x)?, self.guarded(rows * n)?);
        let (cx, mut cout) = (self.cpu.upload(&x)?, self.cpu.alloc(rows * n)?);
        self.cpu.matmul_quant(&cx, &cw, rows, k, n, &mut cout)?;
        let gpu = self.gpu;
        let (_, s) = self.timed(|| gpu.matmul_quant(&gx, &gw, rows, k, n, &mut gout))?;
        self.record(
            &format!("matmul_quant {}", ty.name()),
            format!("[{rows}x{k}]·[{n}x{k}]ᵀ"),
            &gout,
            &cout,
            s,
            false,
        )
    }
}
