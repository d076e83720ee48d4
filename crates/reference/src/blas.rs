//! The oracle's f32 GEMMs through an OpenBLAS loaded at run time (the
//! `scipy-openblas32` wheel scripts/setup.sh installs into .venv/, or any CBLAS named by
//! `RESBISECT_BLAS`), on rayon's thread count: its kernels use the CPU's widest vectors,
//! where candle's GEMM stops at AVX2. Where no library loads, candle's matmul runs
//! instead ([`backend`] says which and why); f64 products always stay on candle.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use libloading::Library;
use rayon::prelude::*;

/// CBLAS enum values (cblas.h: `CblasRowMajor`, `CblasNoTrans`, `CblasTrans`).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
/// `openblas_set_num_threads(n)`.
type SetThreads = unsafe extern "C" fn(c_int);

/// Symbol names of (sgemm, set_num_threads): the scipy wheels' prefixed ones, then plain
/// OpenBLAS's.
const SYMBOLS: [(&[u8], &[u8]); 2] = [
    (b"scipy_cblas_sgemm\0", b"scipy_openblas_set_num_threads\0"),
    (b"cblas_sgemm\0", b"openblas_set_num_threads\0"),
];

struct Blas {
    sgemm: Sgemm,
    path: PathBuf,
    /// Keeps `sgemm` mapped.
    _lib: Library,
}

static BLAS: OnceLock<Result<Blas, String>> = OnceLock::new();

fn blas() -> Result<&'static Blas, &'static str> {
    BLAS.get_or_init(open).as_ref().map_err(String::as_str)
}

/// The library the f32 GEMMs run on, or why candle's GEMM runs them instead (one line).
pub fn backend() -> Result<&'static Path, &'static str> {
    blas().map(|b| b.path.as_path())
}

/// Where to look: `RESBISECT_BLAS` when set (empty or `off`: nowhere), else the
/// scipy-openblas32 wheel of a `.venv/` in the working directory or above the executable.
fn candidates() -> Result<Vec<PathBuf>, String> {
    if let Some(v) = std::env::var_os("RESBISECT_BLAS") {
        if v.is_empty() || v == "off" {
            return Err("RESBISECT_BLAS is off".into());
        }
        return Ok(vec![PathBuf::from(v)]);
    }
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    let mut found = Vec::new();
    for root in roots {
        let Ok(dirs) = std::fs::read_dir(root.join(".venv/lib")) else {
            continue;
        };
        for python in dirs.flatten() {
            let lib = python
                .path()
                .join("site-packages/scipy_openblas32/lib/libscipy_openblas.so");
            if lib.is_file() {
                found.push(lib);
            }
        }
    }
    if found.is_empty() {
        return Err("no scipy_openblas32 in a .venv/, and RESBISECT_BLAS is unset".into());
    }
    Ok(found)
}

fn open() -> Result<Blas, String> {
    let mut why = Vec::new();
    for path in candidates()? {
        match open_at(&path) {
            Ok(b) => return Ok(b),
            Err(e) => why.push(format!("{}: {e}", path.display())),
        }
    }
    Err(why.join("; "))
}

fn open_at(path: &Path) -> Result<Blas, String> {
    // SAFETY: loading runs the library's initializers; OpenBLAS's only set up its
    // thread pool and read its environment variables.
    let lib = unsafe { Library::new(path) }.map_err(|e| e.to_string())?;
    for (gemm_name, threads_name) in SYMBOLS {
        // SAFETY: the signatures are those of cblas.h and OpenBLAS's openblas_config.h.
        let found = unsafe {
            lib.get::<Sgemm>(gemm_name)
                .and_then(|g| Ok((*g, *lib.get::<SetThreads>(threads_name)?)))
        };
        if let Ok((sgemm, set_threads)) = found {
            // One BLAS thread per call: [`matmul`] splits the rows over rayon's threads.
            // SAFETY: a plain setter, called before any GEMM.
            unsafe { set_threads(1) };
            return Ok(Blas {
                sgemm,
                path: path.to_path_buf(),
                _lib: lib,
            });
        }
    }
    Err("no cblas_sgemm and openblas_set_num_threads in it".into())
}

/// One operand's `[rows, cols]` matrices as CBLAS reads them: transposed or not, leading
/// dimension, element offset and batch stride.
struct Operand {
    trans: c_int,
    ld: usize,
    offset: usize,
    batch_stride: usize,
}

/// The operand view of `t` (`[rows, cols]` or `[batch, rows, cols]`, f32 on the CPU) when
/// one of its two last dims is unit-stride.
fn operand(t: &Tensor) -> Option<Operand> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
        return None;
    }
    let (dims, stride) = (layout.dims(), layout.stride());
    let r = dims.len();
    let (rows, cols, sr, sc) = (dims[r - 2], dims[r - 1], stride[r - 2], stride[r - 1]);
    let batch_stride = if r == 3 { stride[0] } else { 0 };
    let (trans, ld) = if sc == 1 && sr >= cols.max(1) {
        (NO_TRANS, sr)
    } else if sr == 1 && sc >= rows.max(1) {
        (TRANS, sc)
    } else {
        return None;
    };
    Some(Operand {
        trans,
        ld,
        offset: layout.start_offset(),
        batch_stride,
    })
}

/// `a · b` for `a` `[m, k]` and `b` `[k, n]`, or both batched `[batch, ·, ·]` alike:
/// candle's `matmul`, computed by the BLAS for f32 when one is loaded (f32 products
/// accumulated in f32, as candle's), else by candle.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Ok(lib) = blas() else {
        return Ok(a.matmul(b)?);
    };
    let same_rank = a.rank() == b.rank() && matches!(a.rank(), 2 | 3);
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !same_rank {
        return Ok(a.matmul(b)?);
    }
    let (a, b) = (contiguous_unless_strided(a)?, contiguous_unless_strided(b)?);
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let batch = if r == 3 { ad[0] } else { 1 };
    if bd[r - 2] != k || (r == 3 && bd[0] != batch) || k == 0 {
        return Ok(a.matmul(&b)?); // candle names a shape mismatch, and sums nothing to 0
    }
    let (Some(ao), Some(bo)) = (operand(&a), operand(&b)) else {
        return Ok(a.matmul(&b)?); // an empty dim: nothing for the BLAS to do
    };
    // Left uninitialized: with beta = 0 the BLAS writes every element without reading it.
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    if m * n > 0 {
        let (sa, _) = a.storage_and_layout();
        let (sb, _) = b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*sa, &*sb) else {
            anyhow::bail!("operand() saw f32 CPU storage");
        };
        let gemm = Gemm {
            sgemm: lib.sgemm,
            a: (av, &ao),
            b: (bv, &bo),
            k,
            n,
        };
        // Split over rayon's threads, each an sgemm on one BLAS thread (no BLAS thread
        // pool spinning against rayon's between GEMMs), along the longer side: the BLAS
        // packs its whole right-hand operand per call, so splitting a short chunk's rows
        // would pack every weight once per thread.
        let threads = rayon::current_num_threads().max(1);
        let (block_rows, block_cols) = if m >= n {
            (m.div_ceil(threads), n)
        } else {
            (m, n.div_ceil(threads))
        };
        let blocks: Vec<(usize, usize, usize)> = (0..batch)
            .flat_map(|i| (0..m).step_by(block_rows).map(move |r0| (i, r0)))
            .flat_map(|(i, r0)| (0..n).step_by(block_cols).map(move |c0| (i, r0, c0)))
            .collect();
        let c = SharedOut(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        blocks.into_par_iter().try_for_each(|(i, r0, c0)| {
            let c = &c;
            let (rows, cols) = (block_rows.min(m - r0), block_cols.min(n - c0));
            // SAFETY: out has room for batch·m·n values; this block writes rows r0.. and
            // columns c0.. of batch i's m × n product only, disjoint from every other's.
            unsafe { gemm.block(i, r0, c0, rows, cols, c.0.add(i * m * n + r0 * n + c0)) }
        })?;
    }
    // SAFETY: the GEMMs above wrote all batch·m·n values (none when m·n = 0).
    unsafe { out.set_len(batch * m * n) };
    let shape: Vec<usize> = if r == 3 { vec![batch, m, n] } else { vec![m, n] };
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// One (batched) product `a · b` for [`matmul`], `a` `[m, k]`, `b` `[k, n]` per batch.
struct Gemm<'a> {
    sgemm: Sgemm,
    a: (&'a [f32], &'a Operand),
    b: (&'a [f32], &'a Operand),
    k: usize,
    n: usize,
}

impl Gemm<'_> {
    /// Rows `r0..r0 + rows` × columns `c0..c0 + cols` of batch `i`'s product, written at
    /// `c` with row stride n.
    ///
    /// # Safety
    /// `c` must be valid for writes of `rows` rows of `cols` values `n` apart.
    unsafe fn block(&self, i: usize, r0: usize, c0: usize, rows: usize, cols: usize, c: *mut f32) -> Result<()> {
        let ((av, ao), (bv, bo)) = (self.a, self.b);
        let int =
            |v: usize| c_int::try_from(v).map_err(|_| anyhow::anyhow!("a GEMM dimension of {v} overflows BLAS int"));
        // Row r0 of op(a), column c0 of op(b): an offset along the stored rows or columns.
        let first_row = if ao.trans == NO_TRANS { r0 * ao.ld } else { r0 };
        let first_col = if bo.trans == NO_TRANS { c0 } else { c0 * bo.ld };
        let pa = &av[ao.offset + i * ao.batch_stride + first_row..];
        let pb = &bv[bo.offset + i * bo.batch_stride + first_col..];
        // SAFETY: the layouts of `a` and `b` (checked by candle against their storage)
        // put every element the call reads inside `pa` and `pb`; the caller vouches for `c`.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                ao.trans,
                bo.trans,
                int(rows)?,
                int(cols)?,
                int(self.k)?,
                1.0,
                pa.as_ptr(),
                int(ao.ld)?,
                pb.as_ptr(),
                int(bo.ld)?,
                0.0,
                c,
                int(self.n)?,
            )
        };
        Ok(())
    }
}

/// The output of [`matmul`], shared by the blocks that each write their own part of it.
struct SharedOut(*mut f32);
// SAFETY: the blocks write disjoint elements.
unsafe impl Sync for SharedOut {}

/// A row-major operand of [`sgemm_here`]: element (i, j) of its `rows × cols` matrix at
/// `data[i·row_stride + j·col_stride]`, one of the two strides 1.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Strided<'_> {
    /// (transposed?, leading dimension) as CBLAS takes them, when the layout fits in `data`.
    fn cblas(&self) -> Option<(c_int, usize)> {
        let last = (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride;
        if last >= self.data.len() {
            return None;
        }
        if self.col_stride == 1 && self.row_stride >= self.cols.max(1) {
            Some((NO_TRANS, self.row_stride))
        } else if self.row_stride == 1 && self.col_stride >= self.rows.max(1) {
            Some((TRANS, self.col_stride))
        } else {
            None
        }
    }
}

/// `c ← alpha·a·b + beta·c` for `a` `[m, k]`, `b` `[k, n]` and `c` `[m, n]` (row stride
/// `ldc`), one sgemm on the calling thread (the BLAS is set to one thread). `Ok(false)`
/// when no library is loaded (nothing computed); an error when a layout does not fit.
pub(crate) fn sgemm_here(alpha: f32, a: Strided, b: Strided, beta: f32, c: &mut [f32], ldc: usize) -> Result<bool> {
    let Ok(lib) = blas() else {
        return Ok(false);
    };
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (Some((ta, lda)), Some((tb, ldb))) = (a.cblas(), b.cblas()) else {
        anyhow::bail!("sgemm: an operand's strides do not fit its data");
    };
    if b.rows != k || ldc < n || (m > 0 && (m - 1) * ldc + n > c.len()) {
        anyhow::bail!(
            "sgemm: [{m}, {k}] · [{}, {n}] into {} values at row stride {ldc}",
            b.rows,
            c.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(true);
    }
    let int = |v: usize| c_int::try_from(v).map_err(|_| anyhow::anyhow!("a GEMM dimension of {v} overflows BLAS int"));
    // SAFETY: the checks above put every element the call reads in `a.data`, `b.data`
    // and every element it writes in `c`.
    unsafe {
        (lib.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            int(m)?,
            int(n)?,
            int(k)?,
            alpha,
            a.data.as_ptr(),
            int(lda)?,
            b.data.as_ptr(),
            int(ldb)?,
            beta,
            c.as_mut_ptr(),
            int(ldc)?,
        )
    };
    Ok(true)
}

/// `t` itself when CBLAS can read it in place, else a contiguous copy.
fn contiguous_unless_strided(t: &Tensor) -> Result<Tensor> {
    Ok(if operand(t).is_some() {
        t.clone()
    } else {
        t.contiguous()?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BLAS product equals candle's up to f32 summation order (relative 1e-5 at
    /// k = 64..300) on the layouts the oracle passes: transposed weights, narrowed
    /// columns, batched and transposed attention operands. Without a library it checks
    /// the fallback.
    #[test]
    fn blas_matmul_matches_candle() -> Result<()> {
        let dev = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 300), dev)?;
        let w = Tensor::randn(0f32, 1.0, (90, 300), dev)?.t()?;
        let q = Tensor::randn(0f32, 1.0, (3, 20, 64), dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 50, 64), dev)?;
        let cases = [
            (x.clone(), w.clone()),
            (x.clone(), w.narrow(1, 30, 40)?),
            (q.clone(), k.narrow(1, 0, 33)?.t()?),
            (q.matmul(&k.t()?)?, k.clone()),
        ];
        for (a, b) in cases {
            let (ours, candle) = (matmul(&a, &b)?, a.matmul(&b)?);
            let scale = candle.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale,
                "{:?} · {:?}: differs by {diff}",
                a.dims(),
                b.dims()
            );
        }
        Ok(())
    }
}
