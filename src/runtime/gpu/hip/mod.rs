//! The HIP driver of the GPU backend (AMD, behind the `hip` feature): the same
//! kernels/ops.hip, compiled by hipcc at build time (build.rs) into one code object per
//! storage dtype, loaded with hipModuleLoadData and launched through hip-runtime-sys on
//! the null stream. Matmuls use the source's own tiled kernel (no vendor BLAS), attention
//! its tiled and split kernels; nothing is recorded (HIP graphs exist, but without an AMD
//! GPU to validate them decode runs op by op).

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::marker::PhantomData;

use hip_runtime_sys as hip;

use super::kernels::{elem_bytes, Arg, KernelCall, StorageElem, KERNELS};
use super::plan::Grid;
use super::{Driver, GpuBackend};
use crate::error::{Error, Result};
use crate::runtime::backend::StorageDType;

const CODE_F32: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-f32.hsaco"));
const CODE_F16: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-f16.hsaco"));
const CODE_BF16: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops-bf16.hsaco"));

/// The `hip` backend storing `T`.
pub type HipBackend<T> = GpuBackend<Hip<T>>;

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

/// Device memory of `len` units: storage values (a buffer) or bytes (raw memory).
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

/// GPU 0 with the code object of storage type `T` loaded.
pub struct Hip<T> {
    functions: HashMap<&'static str, hip::hipFunction_t>,
    device: String,
    _storage: PhantomData<T>,
}

// SAFETY: as for HipBuf: loaded functions are process-wide, and the HIP runtime is
// thread-safe; the backend itself is used by one thread at a time.
unsafe impl<T> Send for Hip<T> {}

impl<T: StorageElem> GpuBackend<Hip<T>> {
    /// Open GPU 0 and load the code object of this storage dtype.
    pub fn new() -> Result<Self> {
        Self::with_driver(Hip::open()?)
    }
}

/// The device's name, or a generic one.
fn device_name() -> String {
    let mut name = [0 as libc::c_char; 256];
    // SAFETY: the buffer is 256 bytes as passed.
    if unsafe { hip::hipDeviceGetName(name.as_mut_ptr(), 256, 0) } == hip::hipError_t::hipSuccess {
        // SAFETY: hipDeviceGetName wrote a NUL-terminated name.
        unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
    } else {
        "AMD GPU".into()
    }
}

impl<T: StorageElem> Hip<T> {
    fn open() -> Result<Self> {
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
        Ok(Self {
            functions,
            device: device_name(),
            _storage: PhantomData,
        })
    }

    /// `bytes` bytes of device memory (at least one), `len` units long.
    fn malloc(&self, bytes: usize, len: usize) -> Result<HipBuf> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: an allocation of `bytes` bytes, owned by the HipBuf.
        check(unsafe { hip::hipMalloc(&mut ptr, bytes.max(1)) }, "allocating")?;
        Ok(HipBuf { ptr, len })
    }

    /// Copy `bytes` bytes between host and device, waiting for the work before.
    fn copy(
        &self,
        to: *mut c_void,
        from: *const c_void,
        bytes: usize,
        kind: hip::hipMemcpyKind,
        what: &str,
    ) -> Result<()> {
        // SAFETY: the callers pass ranges inside their allocations.
        check(unsafe { hip::hipMemcpy(to, from, bytes, kind) }, what)
    }
}

impl<T: StorageElem> Driver for Hip<T> {
    type Elem = T;
    type Buf = HipBuf;
    type Bytes = HipBuf;
    type Graph = ();
    type QueuedWord = [u8; 4];
    const NAME: &'static str = "hip";
    const WARP: u32 = 64;

    fn device(&self) -> String {
        self.device.clone()
    }

    fn free_memory(&self) -> Option<u64> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both pointers are to live locals the call writes.
        let e = unsafe { hip::hipMemGetInfo(&mut free, &mut total) };
        check(e, "querying free memory").ok().map(|()| free as u64)
    }

    fn len(&self, buf: &HipBuf) -> usize {
        buf.len
    }

    fn addr(&self, buf: &HipBuf) -> u64 {
        buf.ptr as u64
    }

    fn bytes_addr(&self, bytes: &HipBuf) -> u64 {
        bytes.ptr as u64
    }

    fn alloc(&self, len: usize) -> Result<HipBuf> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let buf = self.malloc(bytes, len)?;
        // SAFETY: zeroing the allocation just made.
        check(unsafe { hip::hipMemset(buf.ptr, 0, bytes) }, "zeroing")?;
        Ok(buf)
    }

    fn upload(&self, values: &[T]) -> Result<HipBuf> {
        let mut buf = self.upload_bytes(elem_bytes(values))?;
        buf.len = values.len();
        Ok(buf)
    }

    fn upload_bytes(&self, bytes: &[u8]) -> Result<HipBuf> {
        let buf = self.malloc(bytes.len(), bytes.len())?;
        self.write_bytes(&buf, bytes)?;
        Ok(buf)
    }

    fn write_bytes(&self, dst: &HipBuf, bytes: &[u8]) -> Result<()> {
        if bytes.len() > dst.len {
            return Err(Error::engine("hip: writing past device memory"));
        }
        let kind = hip::hipMemcpyKind::hipMemcpyHostToDevice;
        self.copy(dst.ptr, bytes.as_ptr() as *const c_void, bytes.len(), kind, "uploading")
    }

    /// Read now: HIP's stream-ordered copies to pageable memory wait anyway.
    fn queue_read_word(&self, src: &HipBuf) -> Result<[u8; 4]> {
        let mut word = [0u8; 4];
        self.read_bytes(src, &mut word)?;
        Ok(word)
    }

    fn finish_read_word(&self, word: [u8; 4]) -> Result<[u8; 4]> {
        Ok(word)
    }

    fn read_bytes(&self, src: &HipBuf, out: &mut [u8]) -> Result<()> {
        if out.len() > src.len {
            return Err(Error::engine("hip: reading past device memory"));
        }
        let kind = hip::hipMemcpyKind::hipMemcpyDeviceToHost;
        self.copy(out.as_mut_ptr() as *mut c_void, src.ptr, out.len(), kind, "downloading")
    }

    fn download(&self, buf: &HipBuf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        let el = std::mem::size_of::<T>();
        let at = out.len();
        out.resize(at + len * el, 0);
        // SAFETY: the caller checked the range against the buffer.
        let src = unsafe { (buf.ptr as *const u8).add(offset * el) } as *const c_void;
        let kind = hip::hipMemcpyKind::hipMemcpyDeviceToHost;
        self.copy(
            out[at..].as_mut_ptr() as *mut c_void,
            src,
            len * el,
            kind,
            "downloading",
        )
    }

    fn launch(&self, call: KernelCall, grid: Grid) -> Result<()> {
        let f = *self
            .functions
            .get(call.name)
            .ok_or_else(|| Error::engine(format!("hip: kernel {} is not loaded", call.name)))?;
        // hipModuleLaunchKernel takes a pointer to each argument's value.
        let mut args: Vec<*mut c_void> = call
            .args()
            .iter()
            .map(|arg| match arg {
                Arg::Ptr(v) => v as *const u64 as *mut c_void,
                Arg::I32(v) => v as *const i32 as *mut c_void,
                Arg::I64(v) => v as *const i64 as *mut c_void,
                Arg::F32(v) => v as *const f32 as *mut c_void,
            })
            .collect();
        let ((bx, by, bz), (tx, ty, tz)) = (grid.blocks, grid.threads);
        // SAFETY: the call's arguments follow the kernel's signature (kernels.rs), and the
        // op that built it checked every range the kernel touches.
        let e = unsafe {
            hip::hipModuleLaunchKernel(
                f,
                bx,
                by,
                bz,
                tx,
                ty,
                tz,
                grid.shared_bytes,
                std::ptr::null_mut(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check(e, &format!("launching {}", call.name))
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: waits for all queued work.
        check(unsafe { hip::hipDeviceSynchronize() }, "device error")
    }
}
