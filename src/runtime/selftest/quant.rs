//! Self-test checks of the quantized matmul (`--weights native`): for every block type,
//! the device's block matvec (decode rows) and its dequantize-then-GEMM prefill against
//! the `cpu` backend's fused product, on odd shapes, with the guard and NaN checks of
//! every op; and the decode matvec of three matrices in one launch.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::{add_norm, Checker};
use crate::error::{Error, Result};
use crate::quant::{QuantMatrix, QuantType};
use crate::runtime::backend::{Backend, Projections};

impl<B: Backend> Checker<'_, B> {
    /// A random `[n, k]` matrix quantized to `ty` (by candle, for test data), on the device
    /// and on the `cpu` backend.
    fn quant_pair(&mut self, ty: QuantType, k: usize, n: usize) -> Result<(B::Quant, QuantMatrix)> {
        let w = self.random(n * k, 0.05);
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
        Ok((gw, cw))
    }

    /// `[rows, k] · [n, k]ᵀ` with the weight quantized to `ty`.
    pub(super) fn matmul_quant(&mut self, ty: QuantType, rows: usize, k: usize, n: usize) -> Result<()> {
        let x = self.random(rows * k, 1.0);
        let (gw, cw) = self.quant_pair(ty, k, n)?;
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

    /// Three projections of one input on matrices of `ty` in one op (q, k and v; gate and
    /// up with `n[2] = 0`), each part against the `cpu` backend's matmul.
    pub(super) fn matmul3_quant(&mut self, ty: QuantType, rows: usize, k: usize, n: [usize; 3]) -> Result<()> {
        let x = self.random(rows * k, 1.0);
        let mut pairs = Vec::new();
        for ni in n {
            pairs.push(self.quant_pair(ty, k, ni.max(1))?);
        }
        let (gx, cx) = (self.gpu.upload(&x)?, self.cpu.upload(&x)?);
        let mut gout = [
            self.guarded(rows * n[0])?,
            self.guarded(rows * n[1])?,
            self.guarded(rows * n[2])?,
        ];
        let [g0, g1, g2] = &mut gout;
        let gw = [&pairs[0].0, &pairs[1].0, &pairs[2].0];
        let gpu = self.gpu;
        let (_, s) = self.timed(|| gpu.matmul3_quant(&gx, gw, rows, k, n, [g0, g1, g2]))?;
        for (i, ni) in n.into_iter().enumerate().filter(|&(_, ni)| ni > 0) {
            let mut cout = self.cpu.alloc(rows * ni)?;
            self.cpu.matmul_quant(&cx, &pairs[i].1, rows, k, ni, &mut cout)?;
            let shape = format!("[{rows}x{k}]·{n:?} part {i}");
            self.record(
                &format!("matmul3_quant {}", ty.name()),
                shape,
                &gout[i],
                &cout,
                s,
                false,
            )?;
        }
        Ok(())
    }

    /// The residual add and RMSNorm of one row, then up to three projections on matrices
    /// of `ty` (decode's q, k, v or gate and up) as one op: sum, normed row and each part
    /// against the `cpu` backend's ops in turn.
    pub(super) fn add_rms_norm_project_quant(&mut self, ty: QuantType, k: usize, n: [usize; 3]) -> Result<()> {
        let inputs = [self.random(k, 1.0), self.random(k, 1.0), self.random(k, 1.0)];
        let mut pairs = Vec::new();
        for ni in n {
            pairs.push(self.quant_pair(ty, k, ni.max(1))?);
        }
        let c_in: Vec<Vec<f32>> = inputs.iter().map(|v| self.cpu.upload(v)).collect::<Result<_>>()?;
        let mut c_out = [k, k, n[0], n[1], n[2]].map(|n| vec![0.0f32; n]);
        let [csum, cnorm, c0, c1, c2] = &mut c_out;
        let norm = add_norm([&c_in[0], &c_in[1], &c_in[2]], 1e-6, csum, cnorm);
        let cw = Projections::Quant([&pairs[0].1, &pairs[1].1, &pairs[2].1]);
        self.cpu.add_rms_norm_project(norm, cw, 1, k, n, [c0, c1, c2])?;
        let g_in: Vec<B::Buf> = inputs.iter().map(|v| self.gpu.upload(v)).collect::<Result<_>>()?;
        let mut g_out = Vec::new();
        for len in [k, k, n[0], n[1], n[2]] {
            g_out.push(self.guarded(len)?);
        }
        let [gsum, gnorm, g0, g1, g2] = &mut g_out[..] else {
            unreachable!("five buffers")
        };
        let gpu = self.gpu;
        let (_, s) = self.timed(|| {
            let norm = add_norm([&g_in[0], &g_in[1], &g_in[2]], 1e-6, gsum, gnorm);
            let gw = Projections::Quant([&pairs[0].0, &pairs[1].0, &pairs[2].0]);
            gpu.add_rms_norm_project(norm, gw, 1, k, n, [g0, g1, g2])
        })?;
        let op = format!("add_rms_norm_project {}", ty.name());
        let parts = (0..3).filter(|&i| n[i] > 0).map(|i| (format!("part {i}"), 2 + i));
        for (name, at) in [("sum".to_string(), 0), ("normed".to_string(), 1)]
            .into_iter()
            .chain(parts)
        {
            let shape = format!("[1x{k}]·{n:?} ({name})");
            self.record(&op, shape, &g_out[at], &c_out[at], s, false)?;
        }
        Ok(())
    }
}
