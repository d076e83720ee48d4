//! The dense decode matvecs (one warp per output column, up to [`GEMV_ROWS`] rows): q, k,
//! v in one launch (rb_gemv3) and gate, up and their SiLU product in one launch
//! (rb_gemv_gate_up_silu), each optionally computing its input — a residual add and
//! RMSNorm of one row — in shared memory on the way in.

use super::kernels::{self, Ptr};
use super::plan::{Grid, GEMV_ROWS};
use super::{Driver, GpuBackend};
use crate::error::Result;
use crate::runtime::backend::{self, Input};

/// The most bytes of a row whose norm a decode matvec computes in shared memory (a
/// block's static limit; 8192 f32 values or 24576 f16).
const FUSED_NORM_BYTES: usize = 48 * 1024;

/// The norm arguments of the matvec kernels (the residual sum's terms, the norm weight,
/// where the sum goes, eps) and the shared memory it needs; [`NormArgs::NONE`] for none.
#[derive(Debug, Clone, Copy)]
struct NormArgs {
    a: Ptr,
    b: Ptr,
    w: Ptr,
    sum: Ptr,
    eps: f32,
    shared_bytes: usize,
}

impl NormArgs {
    const NONE: NormArgs = NormArgs {
        a: Ptr::NONE,
        b: Ptr::NONE,
        w: Ptr::NONE,
        sum: Ptr::NONE,
        eps: 0.0,
        shared_bytes: 0,
    };
}

impl<D: Driver> GpuBackend<D> {
    /// The `[rows, k]` input of a matvec (rows ≤ [`GEMV_ROWS`]) and the norm it computes
    /// on the way in: one row whose 16-byte pieces fit [`FUSED_NORM_BYTES`]; any other
    /// norm runs first as its own launch.
    fn matvec_input(&self, x: Input<Self>, rows: usize, k: usize) -> Result<(Ptr, NormArgs)> {
        let elem = std::mem::size_of::<D::Elem>();
        let fits = rows == 1 && (k * elem).is_multiple_of(16) && k * elem <= FUSED_NORM_BYTES;
        let norm = match x {
            Input::AddNorm(norm) if fits => norm,
            x => {
                let x = x.rows(self, rows, k)?;
                self.check(self.len(x), rows * k, "matvec input")?;
                return Ok((self.ptr(x), NormArgs::NONE));
            }
        };
        let smallest = [norm.a, norm.b, &*norm.sum, &*norm.normed].map(|buf| self.len(buf));
        self.check(
            smallest.into_iter().min().unwrap_or(0),
            k,
            "add_rms_norm (matvec input)",
        )?;
        self.check(self.len(norm.w), k, "add_rms_norm weight (matvec input)")?;
        let args = NormArgs {
            a: self.ptr(norm.a),
            b: self.ptr(norm.b),
            w: self.ptr(norm.w),
            sum: self.ptr(norm.sum),
            eps: norm.eps,
            shared_bytes: k * elem,
        };
        Ok((self.ptr(norm.normed), args))
    }

    /// Up to three dense projections of one input (`out[i][rows, n[i]] = x · w[i]ᵀ`).
    pub(super) fn dense_projections(
        &self,
        x: Input<Self>,
        w: [&D::Buf; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut D::Buf; 3],
    ) -> Result<()> {
        if rows > GEMV_ROWS {
            let x = x.rows(self, rows, k)?;
            return backend::matmul3_by_parts(self, x, w, rows, k, n, out);
        }
        let (x, norm) = self.matvec_input(x, rows, k)?;
        for i in 0..3 {
            self.check(self.len(w[i]), n[i] * k, "matmul3 weight")?;
            self.check(self.len(out[i]), rows * n[i], "matmul3 output")?;
        }
        let [w0, w1, w2] = w.map(|w| self.ptr(w));
        let [o0, o1, o2] = out.map(|o| self.ptr(o));
        let [n0, n1, n2] = n.map(|n| n as i32);
        let (rows, k) = (rows as i32, k as i32);
        let call = kernels::rb_gemv3(
            x, w0, w1, w2, o0, o1, o2, rows, k, n0, n1, n2, norm.a, norm.b, norm.w, norm.sum, norm.eps,
        );
        let grid = Grid::gemv(n.iter().sum(), D::WARP).with_shared(norm.shared_bytes);
        self.driver.launch(call, grid)
    }

    /// `g = x·wgᵀ`, `u = x·wuᵀ` and `act = silu(g)·u` in one launch.
    // The operands of the trait method it implements.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dense_gate_up_silu(
        &self,
        x: Input<Self>,
        wg: &D::Buf,
        wu: &D::Buf,
        rows: usize,
        k: usize,
        n: usize,
        [g, u, act]: [&mut D::Buf; 3],
    ) -> Result<()> {
        if rows > GEMV_ROWS {
            return backend::gate_up_silu_by_parts(self, x, wg, wu, rows, k, n, g, u, act);
        }
        let (x, norm) = self.matvec_input(x, rows, k)?;
        for w in [wg, wu] {
            self.check(self.len(w), n * k, "gate_up_silu weight")?;
        }
        for out in [&*g, &*u, &*act] {
            self.check(self.len(out), rows * n, "gate_up_silu output")?;
        }
        let [g, u, act] = [&*g, &*u, &*act].map(|o| self.ptr(o));
        let call = kernels::rb_gemv_gate_up_silu(
            x,
            self.ptr(wg),
            self.ptr(wu),
            g,
            u,
            act,
            rows as i32,
            k as i32,
            n as i32,
            norm.a,
            norm.b,
            norm.w,
            norm.sum,
            norm.eps,
        );
        // A block holds as many gate columns as up columns: 2n warps in all.
        let grid = Grid::gemv(2 * n, D::WARP).with_shared(norm.shared_bytes);
        self.driver.launch(call, grid)
    }
}
