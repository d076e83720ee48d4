//! What the blocked attention needs of its element type (f32 or f64): a GEMM on the
//! calling thread (OpenBLAS for f32 when loaded, else the `gemm` crate), the row
//! kernels of the online softmax (16-wide AVX-512 versions for f32 where the CPU has
//! them), and the f16 rounding of `probs_in_f16`.

use anyhow::{bail, Result};
use candle_core::CpuStorage;

use crate::blas::{self, Strided};
use crate::fused::Exp;

/// A row-major matrix view: element (i, j) at `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
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

    /// `x ← e^(x - shift)` for each x of `xs`; returns the sum of the new values.
    fn exp_sum(xs: &mut [Self], shift: Self) -> Self {
        exp_sum_in_lanes(xs, shift)
    }
}

/// [`Element::max_of`] over eight interleaved lanes (lane i takes elements i, i + 8, …),
/// so that it vectorizes; `x > m` keeps NaNs out as `Float::max` does, in one
/// compare-and-select (the `max` instruction) per element.
#[inline(always)]
fn max_in_lanes<T: Exp>(xs: &[T]) -> T {
    let pick = |m: T, x: T| if x > m { x } else { m };
    let mut acc = [T::neg_infinity(); 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = pick(*a, x);
        }
    }
    rest.iter().chain(&acc).fold(T::neg_infinity(), |m, &x| pick(m, x))
}

/// [`Element::exp_sum`] in one pass over 32 lanes (lane i takes elements i, i + 32, …,
/// the lanes summed in order, then the tail): the compiler unrolls each run of 32 into
/// independent vectors whose long exp dependency chains overlap.
#[inline(always)]
fn exp_sum_in_lanes<T: Exp>(xs: &mut [T], shift: T) -> T {
    let mut acc = [T::zero(); 32];
    let mut runs = xs.chunks_exact_mut(32);
    for run in &mut runs {
        for (a, x) in acc.iter_mut().zip(run) {
            *x = (*x - shift).exp_nonpositive();
            *a = *a + *x;
        }
    }
    let mut sum = acc.into_iter().fold(T::zero(), |s, a| s + a);
    for x in runs.into_remainder() {
        *x = (*x - shift).exp_nonpositive();
        sum = sum + *x;
    }
    sum
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

    fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
        if wide_vectors() {
            // SAFETY: as above.
            return unsafe { avx512::exp_sum(xs, shift) };
        }
        exp_sum_in_lanes(xs, shift)
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
    pub(super) fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
        super::exp_sum_in_lanes(xs, shift)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn max_of(xs: &[f32]) -> f32 {
        super::max_in_lanes(xs)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
        super::exp_sum_in_lanes(xs, shift)
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
