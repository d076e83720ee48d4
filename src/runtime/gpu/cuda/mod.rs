//! The CUDA driver of the GPU backend: the kernels compiled at run time by NVRTC
//! ([`nvrtc`]), launched on one stream of our own (which CUDA graphs can record), cuBLAS
//! for wide matmuls and f32 prefill attention ([`blas`]; f16/bf16 prefill attention runs
//! on the tensor cores, `rb_flash_attention_*`), and tap rows copied off the device
//! while the stream goes on ([`lanes`]). CUDA, NVRTC and cuBLAS are loaded dynamically
//! (cudarc), so the binary builds without CUDA and reports one clear line where no driver
//! is found.

mod blas;
mod lanes;
mod nvrtc;
mod quiet;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys::cudaDataType;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    PinnedHostSlice, ValidAsZeroBits,
};

use super::kernels::{self, Arg, KernelCall, Ptr, StorageElem, KERNELS};
use super::plan::Grid;
use super::{Driver, GpuBackend};
use crate::dump::RowBytes;
use crate::error::{Error, Result};
use crate::runtime::backend::{AttnShape, StorageDType};
use blas::Blas;
use lanes::LanePool;
use quiet::quietly;

/// The `cuda` backend storing `T`.
pub type CudaBackend<T> = GpuBackend<Cuda<T>>;

/// A storage element of the `cuda` backend: what cudarc copies and cuBLAS multiplies.
pub trait CudaElem: StorageElem + DeviceRepr + ValidAsZeroBits {
    const CUDA_TYPE: cudaDataType;
}

impl CudaElem for f32 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}
impl CudaElem for half::f16 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16F;
}
impl CudaElem for half::bf16 {
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

/// Queries per block of `rb_flash_attention_*` (RB_FLASH_Q in ops.hip).
const FLASH_QUERIES: usize = 64;

fn device_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::engine(format!("cuda: {what}: {e}"))
}

/// A 4-byte copy into page-locked memory, and the event recorded after it.
pub struct QueuedWord {
    host: PinnedHostSlice<u8>,
    copied: CudaEvent,
}

/// One GPU: its stream, kernels, cuBLAS and tap lanes.
pub struct Cuda<T: CudaElem> {
    stream: Arc<CudaStream>,
    /// Where tap rows leave the device without stopping the stream.
    lanes: Arc<LanePool<T>>,
    /// Page-locked host memory that downloads pass through, grown as needed.
    download_staging: RefCell<Option<PinnedHostSlice<T>>>,
    /// Page-locked words that queued token reads use, kept for reuse.
    spare_words: RefCell<Vec<QueuedWord>>,
    blas: Blas,
    functions: HashMap<&'static str, CudaFunction>,
    /// Whether kernels start before the launch ahead has finished (sm_90 and later).
    early_start: bool,
    /// Whether prefill attention runs on the tensor cores (`rb_flash_attention_*`: f16 or
    /// bf16 storage, sm_80 and later).
    tensor_cores: bool,
    device: String,
    _module: Arc<CudaModule>,
}

impl<T: CudaElem> GpuBackend<Cuda<T>>
where
    CudaBlas: Gemm<T>,
{
    /// Open GPU `ordinal`, compile (or load from the cache) the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_driver(Cuda::open(ordinal)?)
    }
}

/// The context of GPU `ordinal`, or one clear line why there is none.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let no_gpu =
        |e: &dyn std::fmt::Display| Error::input(format!("--backend cuda: no usable NVIDIA GPU or CUDA driver ({e})"));
    // SAFETY: only probes whether libcuda can be loaded.
    if !quietly(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false) {
        return Err(no_gpu(&"libcuda.so was not found"));
    }
    let ctx = quietly(|| CudaContext::new(ordinal))
        .ok_or_else(|| no_gpu(&"libcuda could not be loaded"))?
        .map_err(|e| no_gpu(&e))?;
    crate::trace::mark(|| "cuda: context".into());
    Ok(ctx)
}

impl<T: CudaElem> Cuda<T>
where
    CudaBlas: Gemm<T>,
{
    fn open(ordinal: usize) -> Result<Self> {
        let ctx = open_context(ordinal)?;
        let (major, minor) = ctx.compute_capability().map_err(device_error("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let ptx = nvrtc::kernels_ptx(&arch, T::DTYPE)?;
        let module = ctx.load_module(ptx).map_err(device_error("loading the kernels"))?;
        crate::trace::mark(|| "cuda: kernels loaded".into());
        let mut functions = HashMap::new();
        for &name in KERNELS {
            functions.insert(name, module.load_function(name).map_err(device_error(name))?);
        }
        // One stream does all the work, so cudarc's per-buffer events (for ordering across
        // streams) would only add two driver calls to every launch.
        // SAFETY: no buffer of this context is ever used from another stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be recorded into a graph.
        let stream = ctx.new_stream().map_err(device_error("creating a stream"))?;
        let device = format!("{} ({arch})", ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into()));
        crate::trace::mark(|| "cuda: functions and stream ready".into());
        Ok(Self {
            blas: Blas::start(stream.clone()),
            lanes: LanePool::new(ctx)?,
            stream,
            download_staging: RefCell::new(None),
            spare_words: RefCell::new(Vec::new()),
            functions,
            early_start: major >= 9,
            tensor_cores: major >= 8 && T::DTYPE != StorageDType::F32,
            device,
            _module: module,
        })
    }

    /// Page-locked host memory for at least `len` values.
    fn staging(&self, len: usize) -> Result<std::cell::RefMut<'_, Option<PinnedHostSlice<T>>>> {
        let mut staging = self.download_staging.borrow_mut();
        if staging.as_ref().is_none_or(|s| s.len() < len) {
            *staging = None;
            let size = len.next_power_of_two().max(1 << 20);
            // SAFETY: the memory is only read after a copy has filled it.
            *staging = Some(
                unsafe { self.stream.context().alloc_pinned_with_flags::<T>(size, 0) }
                    .map_err(device_error("allocating page-locked memory"))?,
            );
        }
        Ok(staging)
    }
}

impl<T: CudaElem> Driver for Cuda<T>
where
    CudaBlas: Gemm<T>,
{
    type Elem = T;
    type Buf = CudaSlice<T>;
    type Bytes = CudaSlice<u8>;
    type Graph = CudaGraph;
    type QueuedWord = QueuedWord;
    const NAME: &'static str = "cuda";
    const WARP: u32 = 32;

    fn device(&self) -> String {
        self.device.clone()
    }

    fn free_memory(&self) -> Option<u64> {
        self.stream.context().bind_to_thread().ok()?;
        let (free, _total) = cudarc::driver::result::mem_get_info().ok()?;
        Some(free as u64)
    }

    fn len(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn addr(&self, buf: &CudaSlice<T>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    fn bytes_addr(&self, bytes: &CudaSlice<u8>) -> u64 {
        bytes.device_ptr(&self.stream).0
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(device_error("allocating"))
    }

    fn upload(&self, values: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(values).map_err(device_error("uploading"))
    }

    fn upload_bytes(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream.clone_htod(bytes).map_err(device_error("uploading"))
    }

    fn write_bytes(&self, dst: &CudaSlice<u8>, bytes: &[u8]) -> Result<()> {
        if bytes.len() > dst.len() {
            return Err(Error::engine("cuda: writing past device memory"));
        }
        // SAFETY: within `dst` (checked); a copy from pageable memory has read `bytes` by
        // the time it returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.bytes_addr(dst), bytes, self.stream.cu_stream()) }
            .map_err(device_error("writing the step record"))
    }

    fn queue_read_word(&self, src: &CudaSlice<u8>) -> Result<QueuedWord> {
        if src.len() < 4 {
            return Err(Error::engine("cuda: reading past device memory"));
        }
        let spare = self.spare_words.borrow_mut().pop();
        let mut word = match spare {
            Some(word) => word,
            None => QueuedWord {
                // SAFETY: the host reads the word only after a copy has filled it.
                host: unsafe { self.stream.context().alloc_pinned_with_flags::<u8>(4, 0) }
                    .map_err(device_error("allocating page-locked memory"))?,
                copied: self
                    .stream
                    .context()
                    .new_event(None)
                    .map_err(device_error("creating an event"))?,
            },
        };
        let host = word.host.as_mut_ptr().map_err(device_error("queuing a read"))?;
        // SAFETY: `host` is the word's 4 bytes of page-locked memory, untouched until
        // `finish_read_word` has waited for the event recorded after the copy.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                std::slice::from_raw_parts_mut(host, 4),
                self.bytes_addr(src),
                self.stream.cu_stream(),
            )
        }
        .map_err(device_error("queuing a read"))?;
        word.copied
            .record(&self.stream)
            .map_err(device_error("queuing a read"))?;
        Ok(word)
    }

    fn finish_read_word(&self, word: QueuedWord) -> Result<[u8; 4]> {
        word.copied.synchronize().map_err(device_error("reading a token"))?;
        let bytes = word.host.as_slice().map_err(device_error("reading a token"))?;
        let value = [bytes[0], bytes[1], bytes[2], bytes[3]];
        self.spare_words.borrow_mut().push(word);
        Ok(value)
    }

    fn read_bytes(&self, src: &CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
        let host = self
            .stream
            .clone_dtoh(&src.slice(..out.len()))
            .map_err(device_error("downloading"))?;
        out.copy_from_slice(&host);
        Ok(())
    }

    fn download(&self, buf: &CudaSlice<T>, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        // Through page-locked memory, reused: copies from pageable memory run at a fraction
        // of the bus speed, and tap downloads are what a dump adds to a run.
        let mut staging = self.staging(len)?;
        // A slice of exactly `len` (the copy takes the destination's length); with event
        // tracking off the copy is asynchronous, so the stream is waited for.
        let values = &mut staging
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(device_error("downloading"))?[..len];
        self.stream
            .memcpy_dtoh(&buf.slice(offset..offset + len), values)
            .map_err(device_error("downloading"))?;
        self.stream.synchronize().map_err(device_error("downloading"))?;
        out.extend_from_slice(super::kernels::elem_bytes(values));
        Ok(())
    }

    fn launch(&self, call: KernelCall, grid: Grid) -> Result<()> {
        use cudarc::driver::sys;
        let f = self
            .functions
            .get(call.name)
            .ok_or_else(|| Error::engine(format!("cuda: kernel {} is not loaded", call.name)))?;
        let mut params: Vec<*mut std::ffi::c_void> = call
            .args()
            .iter()
            .map(|arg| match arg {
                Arg::Ptr(v) => v as *const u64 as *mut std::ffi::c_void,
                Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
                Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
                Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
            })
            .collect();
        // Programmatic stream serialization: the kernel may start once the launch ahead has
        // passed its RB_WAIT_PRIOR (compat.h), and waits for it there itself, so launch
        // latency and a matvec's first weight loads overlap the kernel before. cudarc's
        // launch builder takes no launch attributes, hence the driver call.
        // SAFETY: all-zero bytes are a valid value of this plain C union.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut early = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.blocks.0,
            gridDimY: grid.blocks.1,
            gridDimZ: grid.blocks.2,
            blockDimX: grid.threads.0,
            blockDimY: grid.threads.1,
            blockDimZ: grid.threads.2,
            sharedMemBytes: grid.shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut early,
            numAttrs: self.early_start as u32,
        };
        let failed = |e: cudarc::driver::DriverError| Error::engine(format!("cuda: launching {}: {e}", call.name));
        self.stream.context().bind_to_thread().map_err(failed)?;
        // SAFETY: `params` points at the call's arguments, which follow the kernel's
        // signature (kernels.rs) and outlive the launch; the op that built the call checked
        // every range the kernel touches; function and stream belong to this context.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(failed)
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::engine(format!("cuda: device error: {e}")))
    }

    fn download_rows(&self, buf: &CudaSlice<T>, runs: &[(usize, usize)], _spare: Vec<u8>) -> Result<RowBytes> {
        self.lanes.capture(&self.stream, buf, runs)
    }

    fn reserve_captures(&self, len: usize, count: usize) -> Result<()> {
        self.lanes.reserve(&self.stream, len, count)
    }

    fn vendor_matmul(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        shape: (usize, usize, usize),
        out: &mut CudaSlice<T>,
    ) -> Option<Result<()>> {
        Some(self.gemm(x, w, shape, out))
    }

    fn vendor_attention(
        &self,
        q: &CudaSlice<T>,
        cache: (&CudaSlice<T>, &CudaSlice<T>),
        s: AttnShape,
        out: &mut CudaSlice<T>,
    ) -> Option<Result<()>> {
        if s.rows < blas::GEMM_ATTENTION_ROWS {
            return None;
        }
        let flash = match s.head_dim {
            64 => kernels::rb_flash_attention_64,
            128 => kernels::rb_flash_attention_128,
            _ => return Some(self.attention_gemm(q, cache, s, out)),
        };
        if !self.tensor_cores {
            return Some(self.attention_gemm(q, cache, s, out));
        }
        let ptr = |b: &CudaSlice<T>| Ptr(b.device_ptr(&self.stream).0);
        let window = s.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let call = flash(
            ptr(q),
            ptr(cache.0),
            ptr(cache.1),
            ptr(out),
            s.rows as i32,
            s.n_head as i32,
            s.n_head_kv as i32,
            s.first_pos as i32,
            window,
        );
        let grid = Grid {
            blocks: (s.rows.div_ceil(FLASH_QUERIES) as u32, s.n_head as u32, 1),
            threads: (128, 1, 1),
            shared_bytes: 0,
        };
        Some(self.launch(call, grid))
    }

    fn begin_record(&self) -> Result<bool> {
        // Recorded matmuls need the handle; it must not be created while recording.
        self.blas.handle()?;
        self.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(device_error("starting a graph recording"))?;
        Ok(true)
    }

    fn end_record(&self) -> Result<Option<CudaGraph>> {
        // A recording that an op broke ends with an error and no graph: the caller runs
        // the step's ops directly instead.
        Ok(self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .ok()
            .flatten())
    }

    fn replay(&self, graph: &CudaGraph) -> Result<()> {
        graph.launch().map_err(device_error("launching the decode graph"))
    }
}
