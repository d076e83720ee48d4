//! The `hip` backend (AMD, behind the `hip` feature): the same kernels/ops.hip, compiled
//! by hipcc at build time (build.rs) into one code object per storage dtype, loaded with
//! hipModuleLoadData and launched through hip-runtime-sys. Matmuls use the source's own
//! tiled kernel (no vendor BLAS), attention its tiled and split kernels.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};

use candle_core::quantized::GgmlDType;
use hip_runtime_sys as hip;
use resbisect_taps::Fault;

use super::backend::{AttnShape, Backend, Row, Src, Step, StorageDType};
use super::cuda::{AttnPlan, Storage, ATTN_PART_FLOATS};
use crate::error::{Error, Result};

const CODE_F32: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-f32.hsaco"));
const CODE_F16: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-f16.hsaco"));
const CODE_BF16: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-bf16.hsaco"));

const KERNELS: &[&str] = &[
    "rb_gemv",
    "rb_embed",
    "rb_add",
    "rb_silu_mul",
    "rb_copy",
    "rb_perturb",
    "rb_rms_norm",
    "rb_rope",
    "rb_argmax",
    "rb_matmul",
    "rb_attention_tiled_64",
    "rb_attention_part_64",
    "rb_attention_merge_64",
    "rb_attention_tiled_128",
    "rb_attention_part_128",
    "rb_attention_merge_128",
    "rb_dequant_f32",
    "rb_dequant_f16",
    "rb_dequant_bf16",
    "rb_dequant_q8_0",
    "rb_dequant_q4_0",
    "rb_dequant_q4_1",
    "rb_dequant_q4_k",
    "rb_dequant_q6_k",
];

fn check(e: hip::hipError_t, what: &str) -> Result<()> {
    if e == hip::hipError_t::hipSuccess {
        return Ok(());
    }
    // SAFETY: hipGetErrorString returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(hip::hipGetErrorString(e)) }
        .to_string_lossy()
        .into_owned();
    Err(Error::engine(format!("hip: {what}: {msg}")))
}

/// A device buffer of `len` storage values.
pub struct HipBuf {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: a device allocation belongs to the process, not to a thread: the HIP runtime
// takes its pointers from any thread (every thread starts on device 0, the one used).
unsafe impl Send for HipBuf {}

impl Drop for HipBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from hipMalloc and is freed once.
        unsafe { hip::hipFree(self.ptr) };
    }
}

pub struct HipBackend<T: Storage> {
    functions: HashMap<&'static str, hip::hipFunction_t>,
    /// The decode step record on the device (token, pos, rope_pos bits, slot) and its host copy.
    step_dev: HipBuf,
    step: std::cell::Cell<Step>,
    /// Scratch for the partial softmax states of split attention (ATTN_PART_FLOATS f32).
    attn_part: HipBuf,
    device: String,
    _storage: std::marker::PhantomData<T>,
}

// SAFETY: as for HipBuf: loaded functions and device memory are process-wide, and the
// HIP runtime is thread-safe; the backend itself is used by one thread at a time.
unsafe impl<T: Storage> Send for HipBackend<T> {}

/// Kernel arguments: pointers to each value, as hipModuleLaunchKernel takes them.
macro_rules! args {
    ($($v:expr),* $(,)?) => { [$(&$v as *const _ as *mut c_void),*] };
}

impl<T: Storage> HipBackend<T> {
    /// Open GPU 0 and load the code object of this storage dtype.
    pub fn new() -> Result<Self> {
        let mut count = 0;
        // SAFETY: plain queries of the HIP runtime.
        if unsafe { hip::hipGetDeviceCount(&mut count) } != hip::hipError_t::hipSuccess || count == 0 {
            return Err(Error::input("--backend hip: no usable AMD GPU or HIP runtime"));
        }
        let code = match T::DTYPE {
            StorageDType::F32 => CODE_F32,
            StorageDType::F16 => CODE_F16,
            StorageDType::BF16 => CODE_BF16,
        };
        let mut module: hip::hipModule_t = std::ptr::null_mut();
        // SAFETY: `code` is a code object hipcc produced for this source.
        check(
            unsafe { hip::hipModuleLoadData(&mut module, code.as_ptr() as *const c_void) },
            "loading the kernels (built for RESBISECT_HIP_ARCHS)",
        )?;
        let mut functions = HashMap::new();
        for &name in KERNELS {
            let c_name = std::ffi::CString::new(name).expect("kernel names have no NUL");
            let mut f: hip::hipFunction_t = std::ptr::null_mut();
            // SAFETY: module is loaded; the name is NUL-terminated.
            check(
                unsafe { hip::hipModuleGetFunction(&mut f, module, c_name.as_ptr()) },
                name,
            )?;
            functions.insert(name, f);
        }
        let mut name = [0 as libc::c_char; 256];
        // SAFETY: the buffer is 256 bytes as passed.
        let device = if unsafe { hip::hipDeviceGetName(name.as_mut_ptr(), 256, 0) } == hip::hipError_t::hipSuccess {
            // SAFETY: hipDeviceGetName wrote a NUL-terminated name.
            unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
        } else {
            "AMD GPU".into()
        };
        let none = || HipBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        let mut backend = Self {
            functions,
            device,
            step_dev: none(),
            step: Default::default(),
            attn_part: none(),
            _storage: std::marker::PhantomData,
        };
        backend.step_dev = backend.raw(&[0u8; 16])?;
        backend.attn_part = backend.raw(&vec![0u8; 4 * ATTN_PART_FLOATS])?;
        Ok(backend)
    }

    /// Device address of field `i` of the step record (token, pos, rope_pos, slot).
    fn step_field(&self, i: usize) -> *mut c_void {
        // SAFETY: the record holds four 4-byte fields.
        unsafe { (self.step_dev.ptr as *mut u8).add(4 * i) as *mut c_void }
    }

    fn launch(&self, name: &str, grid: (u32, u32), block: (u32, u32), args: &mut [*mut c_void]) -> Result<()> {
        self.launch_3d(name, (grid.0, grid.1, 1), block, args)
    }

    fn launch_3d(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32), args: &mut [*mut c_void]) -> Result<()> {
        // SAFETY: every kernel's arguments are built by the op that launches it, matching
        // the kernel's signature, with bounds checked beforehand.
        let e = unsafe {
            hip::hipModuleLaunchKernel(
                self.functions[name],
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                1,
                0,
                std::ptr::null_mut(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check(e, &format!("launching {name}"))
    }

    fn blocks(n: usize, threads: u32) -> (u32, u32) {
        ((n as u32).div_ceil(threads).max(1), 1)
    }

    fn need(len: usize, need: usize, what: &str) -> Result<()> {
        if need > len {
            return Err(Error::engine(format!(
                "hip: {what}: needs {need} elements, the buffer holds {len}"
            )));
        }
        Ok(())
    }

    fn raw(&self, bytes: &[u8]) -> Result<HipBuf> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: allocation and copy of exactly bytes.len() bytes.
        check(unsafe { hip::hipMalloc(&mut ptr, bytes.len().max(1)) }, "allocating")?;
        let buf = HipBuf { ptr, len: bytes.len() };
        // SAFETY: as above.
        check(
            unsafe {
                hip::hipMemcpy(
                    ptr,
                    bytes.as_ptr() as *const c_void,
                    bytes.len(),
                    hip::hipMemcpyKind::hipMemcpyHostToDevice,
                )
            },
            "uploading",
        )?;
        Ok(buf)
    }
}

impl<T: Storage> Backend for HipBackend<T> {
    type Buf = HipBuf;
    // HIP graphs exist, but without an AMD GPU to validate them decode runs op by op
    // (the trait's default: no recording).
    type Graph = ();

    fn name(&self) -> &'static str {
        "hip"
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn dtype(&self) -> StorageDType {
        T::DTYPE
    }

    fn alloc(&self, len: usize) -> Result<HipBuf> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let mut ptr = std::ptr::null_mut();
        // SAFETY: allocation then zeroing of `bytes` bytes.
        check(unsafe { hip::hipMalloc(&mut ptr, bytes) }, "allocating")?;
        let buf = HipBuf { ptr, len };
        // SAFETY: as above.
        check(unsafe { hip::hipMemset(ptr, 0, bytes) }, "zeroing")?;
        Ok(buf)
    }

    fn upload(&self, data: &[f32]) -> Result<HipBuf> {
        let host: Vec<T> = data.iter().map(|&v| T::from_f32(v)).collect();
        // SAFETY: T is a plain value type (f32, f16, bf16); its bytes are its storage.
        let bytes =
            unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, std::mem::size_of_val(host.as_slice())) };
        let mut buf = self.raw(bytes)?;
        buf.len = data.len();
        Ok(buf)
    }

    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<HipBuf> {
        let n: usize = dims.iter().product();
        let (kernel, block_values, block_bytes) = super::cuda::decoder(dtype)
            .ok_or_else(|| Error::input(format!("hip: {name}: no device decoder for {dtype:?}")))?;
        if !n.is_multiple_of(block_values) || data.len() != n / block_values * block_bytes {
            return Err(Error::input(format!(
                "hip: {name}: {} bytes are not {n} values of {dtype:?}",
                data.len()
            )));
        }
        let raw = self.raw(data)?;
        let out = self.alloc(n)?;
        let blocks = (n / block_values) as i64;
        self.launch(
            kernel,
            Self::blocks(blocks as usize, 256),
            (256, 1),
            &mut args!(raw.ptr, out.ptr, blocks),
        )?;
        Ok(out)
    }

    fn download(&self, buf: &HipBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        Self::need(buf.len, offset + len, "download")?;
        let mut host = vec![T::default(); len];
        let el = std::mem::size_of::<T>();
        // SAFETY: the source range lies inside the buffer (checked); host holds len values.
        let src = unsafe { (buf.ptr as *const u8).add(offset * el) } as *const c_void;
        check(
            unsafe {
                hip::hipMemcpy(
                    host.as_mut_ptr() as *mut c_void,
                    src,
                    len * el,
                    hip::hipMemcpyKind::hipMemcpyDeviceToHost,
                )
            },
            "downloading",
        )?;
        Ok(host.into_iter().map(T::to_f32).collect())
    }

    fn download_raw(&self, buf: &HipBuf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        Self::need(buf.len, offset + len, "download")?;
        let el = std::mem::size_of::<T>();
        let at = out.len();
        out.resize(at + len * el, 0);
        // SAFETY: the source range lies inside the buffer (checked); out has len values of room at `at`.
        let src = unsafe { (buf.ptr as *const u8).add(offset * el) } as *const c_void;
        check(
            unsafe {
                hip::hipMemcpy(
                    out[at..].as_mut_ptr() as *mut c_void,
                    src,
                    len * el,
                    hip::hipMemcpyKind::hipMemcpyDeviceToHost,
                )
            },
            "downloading",
        )
    }

    fn embed(&self, table: &HipBuf, width: usize, ids: Src<u32>, out: &mut HipBuf) -> Result<()> {
        let step = [self.step.get().token];
        let host = match ids {
            Src::Host(ids) => ids,
            Src::Step => &step,
        };
        Self::need(out.len, host.len() * width, "embed")?;
        if let Some(&bad) = host.iter().find(|&&i| (i as usize + 1) * width > table.len) {
            return Err(Error::engine(format!("hip: embed: token {bad} is outside the table")));
        }
        let uploaded;
        let dev_ids = match ids {
            Src::Host(ids) => {
                uploaded = self.raw(bytemuck::cast_slice(ids))?;
                uploaded.ptr
            }
            Src::Step => self.step_field(0),
        };
        let (w, rows) = (width as i32, host.len() as i32);
        self.launch(
            "rb_embed",
            (host.len() as u32, 1),
            (256, 1),
            &mut args!(table.ptr, dev_ids, out.ptr, w, rows),
        )
    }

    fn rms_norm(&self, x: &HipBuf, w: &HipBuf, rows: usize, width: usize, eps: f32, out: &mut HipBuf) -> Result<()> {
        Self::need(x.len.min(out.len), rows * width, "rms_norm")?;
        Self::need(w.len, width, "rms_norm weight")?;
        let wi = width as i32;
        self.launch(
            "rb_rms_norm",
            (rows as u32, 1),
            (256, 1),
            &mut args!(x.ptr, w.ptr, out.ptr, wi, eps),
        )
    }

    fn matmul(&self, x: &HipBuf, w: &HipBuf, rows: usize, k: usize, n: usize, out: &mut HipBuf) -> Result<()> {
        Self::need(x.len, rows * k, "matmul input")?;
        Self::need(w.len, n * k, "matmul weight")?;
        Self::need(out.len, rows * n, "matmul output")?;
        let (r, ki, ni) = (rows as i32, k as i32, n as i32);
        if rows <= super::cuda::GEMV_ROWS {
            // Four wavefronts of 64 per block, one output column per wavefront.
            return self.launch(
                "rb_gemv",
                ((n as u32).div_ceil(4), 1),
                (256, 1),
                &mut args!(x.ptr, w.ptr, out.ptr, r, ki, ni),
            );
        }
        self.launch(
            "rb_matmul",
            ((n as u32).div_ceil(16), (rows as u32).div_ceil(16)),
            (16, 16),
            &mut args!(x.ptr, w.ptr, out.ptr, r, ki, ni),
        )
    }

    fn rope(&self, x: &mut HipBuf, heads: usize, head_dim: usize, positions: Src<f32>, base: f32) -> Result<()> {
        let uploaded;
        let (n, pos) = match positions {
            Src::Host(p) => {
                uploaded = self.raw(bytemuck::cast_slice(p))?;
                (p.len(), uploaded.ptr)
            }
            Src::Step => (1, self.step_field(2)),
        };
        Self::need(x.len, n * heads * head_dim, "rope")?;
        let (rows, h, d) = (n as i32, heads as i32, head_dim as i32);
        self.launch(
            "rb_rope",
            Self::blocks(n * heads * head_dim / 2, 256),
            (256, 1),
            &mut args!(x.ptr, pos, rows, h, d, base),
        )
    }

    fn copy_rows(&self, src: &HipBuf, dst: &mut HipBuf, row: Row, rows: usize, width: usize) -> Result<()> {
        Self::need(src.len, rows * width, "copy_rows source")?;
        let n = (rows * width) as i64;
        let dst_row = row.resolve(&self.step.get());
        let (dyn_row, first) = match row {
            Row::At(r) => (std::ptr::null_mut(), r),
            Row::StepPos => (self.step_field(1), 0),
            Row::StepSlot => (self.step_field(3), 0),
        };
        let w = width as i64;
        // Past the end: aim the copy at an unmapped address so the device faults for real
        // (the `oob` fault injection), as in the cuda backend.
        let target = if (dst_row + rows) * width > dst.len {
            0x10usize as *mut c_void
        } else {
            // SAFETY: the destination range lies inside the buffer.
            unsafe { (dst.ptr as *mut u8).add(first * width * std::mem::size_of::<T>()) as *mut c_void }
        };
        self.launch(
            "rb_copy",
            Self::blocks(n as usize, 256),
            (256, 1),
            &mut args!(src.ptr, target, n, dyn_row, w),
        )
    }

    fn attention(&self, q: &HipBuf, k_cache: &HipBuf, v_cache: &HipBuf, s: AttnShape, out: &mut HipBuf) -> Result<()> {
        let (qw, kvw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        Self::need(q.len.min(out.len), s.rows * qw, "attention")?;
        Self::need(
            k_cache.len.min(v_cache.len),
            (s.first_pos + s.rows) * kvw,
            "attention cache",
        )?;
        let (rows, nh, nkv, first) = (s.rows as i32, s.n_head as i32, s.n_head_kv as i32, s.first_pos as i32);
        let dyn_first = if s.from_step {
            self.step_field(1)
        } else {
            std::ptr::null_mut()
        };
        match super::cuda::attention_plan(&s, "hip")? {
            AttnPlan::Tiled { kernel, grid, block } => self.launch(
                kernel,
                grid,
                (block, 1),
                &mut args!(
                    q.ptr,
                    k_cache.ptr,
                    v_cache.ptr,
                    out.ptr,
                    rows,
                    nh,
                    nkv,
                    first,
                    dyn_first
                ),
            ),
            AttnPlan::Split {
                part,
                merge,
                grid,
                block,
            } => {
                let scratch = self.attn_part.ptr;
                self.launch_3d(
                    part,
                    grid,
                    (block, 1),
                    &mut args!(
                        q.ptr,
                        k_cache.ptr,
                        v_cache.ptr,
                        scratch,
                        rows,
                        nh,
                        nkv,
                        first,
                        dyn_first
                    ),
                )?;
                let splits = grid.2 as i32;
                self.launch(
                    merge,
                    (grid.0, grid.1),
                    (s.head_dim as u32, 1),
                    &mut args!(scratch, out.ptr, nh, splits),
                )
            }
        }
    }

    fn silu_mul(&self, gate: &HipBuf, up: &HipBuf, n: usize, out: &mut HipBuf) -> Result<()> {
        Self::need(gate.len.min(up.len).min(out.len), n, "silu_mul")?;
        let nn = n as i64;
        self.launch(
            "rb_silu_mul",
            Self::blocks(n, 256),
            (256, 1),
            &mut args!(gate.ptr, up.ptr, out.ptr, nn),
        )
    }

    fn add(&self, a: &HipBuf, b: &HipBuf, n: usize, out: &mut HipBuf) -> Result<()> {
        Self::need(a.len.min(b.len).min(out.len), n, "add")?;
        let nn = n as i64;
        self.launch(
            "rb_add",
            Self::blocks(n, 256),
            (256, 1),
            &mut args!(a.ptr, b.ptr, out.ptr, nn),
        )
    }

    fn perturb(&self, x: &mut HipBuf, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()> {
        Self::need(x.len, rows * width, "perturb")?;
        if from_row >= rows {
            return Ok(());
        }
        let (kind, value) = super::cuda::fault_code(fault);
        let (start, n) = ((from_row * width) as i64, ((rows - from_row) * width) as i64);
        self.launch(
            "rb_perturb",
            Self::blocks(n as usize, 256),
            (256, 1),
            &mut args!(x.ptr, start, n, kind, value),
        )
    }

    fn argmax(&self, x: &HipBuf, row: usize, width: usize) -> Result<u32> {
        Self::need(x.len, (row + 1) * width, "argmax")?;
        let out = self.raw(&[0u8; 4])?;
        // SAFETY: the row lies inside the buffer (checked).
        let at = unsafe { (x.ptr as *const u8).add(row * width * std::mem::size_of::<T>()) } as *mut c_void;
        let w = width as i32;
        self.launch("rb_argmax", (1, 1), (1024, 1), &mut args!(at, w, out.ptr))?;
        let mut idx = 0u32;
        // SAFETY: four bytes from a four-byte buffer.
        check(
            unsafe {
                hip::hipMemcpy(
                    &mut idx as *mut u32 as *mut c_void,
                    out.ptr,
                    4,
                    hip::hipMemcpyKind::hipMemcpyDeviceToHost,
                )
            },
            "downloading argmax",
        )?;
        Ok(idx)
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: waits for all queued work.
        check(unsafe { hip::hipDeviceSynchronize() }, "device error")
    }

    fn set_step(&self, step: Step) -> Result<()> {
        let words = [step.token, step.pos as u32, step.rope_pos.to_bits(), step.slot as u32];
        // SAFETY: 16 bytes into the 16-byte record.
        check(
            unsafe {
                hip::hipMemcpy(
                    self.step_dev.ptr,
                    words.as_ptr() as *const c_void,
                    16,
                    hip::hipMemcpyKind::hipMemcpyHostToDevice,
                )
            },
            "writing the step record",
        )?;
        self.step.set(step);
        Ok(())
    }
}
