//! The `cuda` backend: the kernels of `kernels/ops.hip` compiled at run time by NVRTC
//! (with `kernels/compat.h`), cached on disk by source and GPU architecture, and cuBLAS
//! for the matmuls. CUDA, NVRTC and cuBLAS are loaded dynamically (cudarc), so the binary
//! builds without CUDA and reports one clear line where no driver is found.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use resbisect_taps::Fault;
use sha2::{Digest, Sha256};

use super::backend::{self, AttnShape, Backend, Row, Src, Step, StorageDType};
use crate::error::{Error, Result};

/// The kernel source, shared with the `hip` backend.
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/ops.hip");
pub const KERNEL_COMPAT: &str = include_str!("../../kernels/compat.h");

/// A storage dtype of the GPU backends.
pub trait Storage:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static
{
    const DTYPE: StorageDType;
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Storage for f32 {
    const DTYPE: StorageDType = StorageDType::F32;
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_32F;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Storage for half::f16 {
    const DTYPE: StorageDType = StorageDType::F16;
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_16F;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl Storage for half::bf16 {
    const DTYPE: StorageDType = StorageDType::BF16;
    const CUDA_TYPE: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The preprocessor define that selects a storage type in compat.h.
pub fn storage_define(dtype: StorageDType) -> &'static str {
    match dtype {
        StorageDType::F32 => "RB_STORE_F32",
        StorageDType::F16 => "RB_STORE_F16",
        StorageDType::BF16 => "RB_STORE_BF16",
    }
}

/// The one translation unit NVRTC compiles: the storage define, compat.h, ops.hip.
fn nvrtc_source(dtype: StorageDType) -> String {
    let ops: String = KERNEL_SOURCE
        .lines()
        .filter(|l| !l.starts_with("#include \"compat.h\""))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("#define {}\n{KERNEL_COMPAT}\n{ops}", storage_define(dtype))
}

const KERNELS: &[&str] = &[
    "rb_gemv",
    "rb_gemv3",
    "rb_add_rms_norm",
    "rb_rope_append",
    "rb_embed",
    "rb_add",
    "rb_silu_mul",
    "rb_copy",
    "rb_perturb",
    "rb_rms_norm",
    "rb_rope",
    "rb_argmax",
    "rb_softmax_causal",
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

/// The device decoder of a GGUF type: kernel, values per block, bytes per block.
pub(crate) fn decoder(dtype: GgmlDType) -> Option<(&'static str, usize, usize)> {
    Some(match dtype {
        GgmlDType::F32 => ("rb_dequant_f32", 1, 4),
        GgmlDType::F16 => ("rb_dequant_f16", 1, 2),
        GgmlDType::BF16 => ("rb_dequant_bf16", 1, 2),
        GgmlDType::Q8_0 => ("rb_dequant_q8_0", 32, 34),
        GgmlDType::Q4_0 => ("rb_dequant_q4_0", 32, 18),
        GgmlDType::Q4_1 => ("rb_dequant_q4_1", 32, 20),
        GgmlDType::Q4K => ("rb_dequant_q4_k", 256, 144),
        GgmlDType::Q6K => ("rb_dequant_q6_k", 256, 210),
        _ => return None,
    })
}

/// How a backend runs an attention call.
pub(crate) enum AttnPlan {
    /// Query tiles of RB_ATTN_QB rows per block: many rows.
    Tiled {
        kernel: &'static str,
        grid: (u32, u32),
        block: u32,
    },
    /// Few rows: keys split over `splits` blocks per (row, head) whose partial softmax
    /// states (head dim + 2 floats each, in the backend's scratch) the merge kernel combines.
    Split {
        part: &'static str,
        merge: &'static str,
        grid: (u32, u32, u32),
        block: u32,
    },
}

/// Below this many (row, head) pairs attention splits keys over blocks; also the most
/// partial states the scratch holds.
const ATTN_SPLIT_PAIRS: usize = 4096;
/// Most key splits per (row, head): 16 × 32 heads fills an H100 at one row.
const ATTN_MAX_SPLITS: usize = 16;
/// Floats of the partial-state scratch a backend allocates once: max, weight sum and the
/// largest head dim of values, for every state.
pub(crate) const ATTN_PART_FLOATS: usize = ATTN_SPLIT_PAIRS * (128 + 2);

/// The attention kernels for a shape, with grids and block sizes; refuses shapes the
/// kernels do not cover.
pub(crate) fn attention_plan(s: &AttnShape, backend: &str) -> Result<AttnPlan> {
    if s.n_head_kv == 0 || !s.n_head.is_multiple_of(s.n_head_kv) {
        return Err(Error::engine(format!(
            "{backend}: attention: {} heads do not group over {} KV heads",
            s.n_head, s.n_head_kv
        )));
    }
    if s.head_dim != 64 && s.head_dim != 128 {
        return Err(Error::input(format!(
            "{backend}: attention kernels exist for head dim 64 and 128, not {}",
            s.head_dim
        )));
    }
    let pairs = s.rows * s.n_head;
    let wide = s.head_dim == 128;
    Ok(if pairs < ATTN_SPLIT_PAIRS {
        let splits = (ATTN_SPLIT_PAIRS / pairs).min(ATTN_MAX_SPLITS);
        let (part, merge) = if wide {
            ("rb_attention_part_128", "rb_attention_merge_128")
        } else {
            ("rb_attention_part_64", "rb_attention_merge_64")
        };
        AttnPlan::Split {
            part,
            merge,
            grid: (s.rows as u32, s.n_head as u32, splits as u32),
            block: 128,
        }
    } else {
        let kernel = if wide {
            "rb_attention_tiled_128"
        } else {
            "rb_attention_tiled_64"
        };
        AttnPlan::Tiled {
            kernel,
            grid: ((s.rows as u32).div_ceil(64), s.n_head as u32),
            block: 64,
        }
    })
}

/// Up to this many rows a matmul runs as rb_gemv (RB_GEMV_ROWS in ops.hip).
pub(crate) const GEMV_ROWS: usize = 4;

/// The fault kind and value rb_perturb takes.
pub(crate) fn fault_code(fault: Fault) -> (i32, f32) {
    match fault {
        Fault::Scale(v) => (0, v as f32),
        Fault::Offset(v) => (1, v as f32),
        Fault::Nan => (2, 0.0),
        Fault::Zero => (3, 0.0),
    }
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir)
        .join("resbisect")
        .join("kernels")
}

thread_local! {
    /// Set while this thread runs [`quietly`]: its panics are not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic of a dynamic library loader into `None` without printing it.
/// Per thread: engines start their backends at the same time, and a process-wide swap of
/// the panic hook would race.
fn quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let printing = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|quiet| quiet.get()) {
                printing(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let r = std::panic::catch_unwind(f).ok();
    QUIET.with(|quiet| quiet.set(false));
    r
}

fn device_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::engine(format!("cuda: {what}: {e}"))
}

pub struct CudaBackend<T: Storage> {
    stream: Arc<CudaStream>,
    /// The decode step record on the device — token, position, RoPE position (f32 bits),
    /// tap slot — and its host copy (for bounds checks).
    _step_dev: CudaSlice<u32>,
    step_at: u64,
    step: std::cell::Cell<Step>,
    /// Scratch for the partial softmax states of split attention (ATTN_PART_FLOATS).
    _attn_part: CudaSlice<f32>,
    attn_part_at: u64,
    /// Where tap rows leave the device without stopping the stream.
    lanes: Arc<super::cuda_lanes::LanePool<T>>,
    /// Page-locked host memory that downloads pass through, grown as needed.
    download_staging: std::cell::RefCell<Option<cudarc::driver::PinnedHostSlice<T>>>,
    /// The positions last uploaded for RoPE: every layer's q and k share them.
    rope_positions: std::cell::RefCell<Option<(Vec<f32>, CudaSlice<f32>)>>,
    /// cuBLAS, ready on first use: created on a thread of its own while weights load.
    blas: std::cell::OnceCell<CudaBlas>,
    blas_pending: std::cell::RefCell<Option<std::thread::JoinHandle<Result<CudaBlas>>>>,
    functions: std::collections::HashMap<&'static str, CudaFunction>,
    device: String,
    _module: Arc<CudaModule>,
    _storage: std::marker::PhantomData<T>,
}

impl<T: Storage> CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    /// Open GPU `ordinal`, compile (or load from the cache) the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        let no_gpu = |e: &dyn std::fmt::Display| {
            Error::input(format!("--backend cuda: no usable NVIDIA GPU or CUDA driver ({e})"))
        };
        // SAFETY: only probes whether libcuda can be loaded.
        if !quietly(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false) {
            return Err(no_gpu(&"libcuda.so was not found"));
        }
        let ctx = quietly(|| CudaContext::new(ordinal))
            .ok_or_else(|| no_gpu(&"libcuda could not be loaded"))?
            .map_err(|e| no_gpu(&e))?;
        crate::trace::mark(|| "cuda: context".into());
        let (major, minor) = ctx.compute_capability().map_err(device_error("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let source = nvrtc_source(T::DTYPE);
        let key = {
            let mut h = Sha256::new();
            h.update(source.as_bytes());
            h.update(arch.as_bytes());
            h.finalize()
                .iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let cached = cache_dir().join(format!("ops-{arch}-{key}.ptx"));
        let ptx = match std::fs::read_to_string(&cached) {
            Ok(text) => cudarc::nvrtc::Ptx::from_src(text),
            Err(_) => {
                let opts = cudarc::nvrtc::CompileOptions {
                    options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
                    ..Default::default()
                };
                let ptx = quietly(|| cudarc::nvrtc::compile_ptx_with_opts(&source, opts))
                    .ok_or_else(|| Error::input("--backend cuda: NVRTC (libnvrtc) could not be loaded"))?
                    .map_err(|e| {
                        Error::engine(format!("cuda: compiling kernels/ops.hip with NVRTC for {arch}: {e}"))
                    })?;
                // The cache is an optimisation: a failure to write it only costs the next compile.
                if std::fs::create_dir_all(cache_dir()).is_ok() {
                    let tmp = cached.with_extension(format!("tmp-{}", std::process::id()));
                    if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                        let _ = std::fs::rename(&tmp, &cached);
                    }
                }
                ptx
            }
        };
        let module = ctx.load_module(ptx).map_err(device_error("loading the kernels"))?;
        crate::trace::mark(|| "cuda: kernels loaded".into());
        let mut functions = std::collections::HashMap::new();
        for &name in KERNELS {
            functions.insert(name, module.load_function(name).map_err(device_error(name))?);
        }
        // One stream does all the work, so cudarc's per-buffer events (for ordering across
        // streams) would only add two driver calls to every launch.
        // SAFETY: no buffer of this context is ever used from another stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be recorded into a graph.
        let stream = ctx.new_stream().map_err(device_error("creating a stream"))?;
        let step_dev = stream
            .alloc_zeros::<u32>(4)
            .map_err(device_error("allocating the step record"))?;
        let step_at = {
            use cudarc::driver::DevicePtr;
            step_dev.device_ptr(&stream).0
        };
        let attn_part = stream
            .alloc_zeros::<f32>(ATTN_PART_FLOATS)
            .map_err(device_error("allocating attention scratch"))?;
        let attn_part_at = {
            use cudarc::driver::DevicePtr;
            attn_part.device_ptr(&stream).0
        };
        // Loading cuBLAS takes about 0.1 s, and nothing needs it before the first matmul.
        let blas_stream = stream.clone();
        let blas_pending = std::thread::spawn(move || {
            let blas = quietly(|| CudaBlas::new(blas_stream))
                .ok_or_else(|| Error::input("--backend cuda: cuBLAS (libcublas) could not be loaded"))?
                .map_err(|e| Error::engine(format!("cuda: cuBLAS: {e}")))?;
            crate::trace::mark(|| "cuda: cuBLAS ready".into());
            Ok(blas)
        });
        let device = format!("{} ({arch})", ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into()));
        let lanes = super::cuda_lanes::LanePool::new(ctx.clone())?;
        Ok(Self {
            stream,
            lanes,
            _step_dev: step_dev,
            step_at,
            step: Default::default(),
            _attn_part: attn_part,
            attn_part_at,
            download_staging: Default::default(),
            rope_positions: std::cell::RefCell::new(None),
            blas: Default::default(),
            blas_pending: std::cell::RefCell::new(Some(blas_pending)),
            functions,
            device,
            _module: module,
            _storage: std::marker::PhantomData,
        })
    }

    /// The cuBLAS handle, waiting for its creation the first time.
    fn blas(&self) -> Result<&CudaBlas> {
        if let Some(blas) = self.blas.get() {
            return Ok(blas);
        }
        let pending = self
            .blas_pending
            .borrow_mut()
            .take()
            .ok_or_else(|| Error::engine("cuda: cuBLAS failed to start earlier"))?;
        let blas = pending
            .join()
            .map_err(|_| Error::engine("cuda: the thread loading cuBLAS panicked"))??;
        Ok(self.blas.get_or_init(|| blas))
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    fn grid(n: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check(len: usize, need: usize, what: &str) -> Result<()> {
        if need > len {
            return Err(Error::engine(format!(
                "cuda: {what}: needs {need} elements, the buffer holds {len}"
            )));
        }
        Ok(())
    }

    /// Device address of field `i` of the step record (token, pos, rope_pos, slot).
    fn step_field(&self, i: u64) -> u64 {
        self.step_at + 4 * i
    }

    /// Blocks of eight warps, one output column per warp (the rb_gemv kernels).
    fn gemv_grid(columns: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((columns as u32).div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The device positions RoPE reads: the step record's, or `positions` uploaded (kept
    /// while the next call asks for the same ones: every layer's q and k share them).
    fn rope_positions(&self, positions: Src<f32>) -> Result<(usize, u64)> {
        Ok(match positions {
            Src::Host(positions) => {
                let mut cached = self.rope_positions.borrow_mut();
                if cached.as_ref().is_none_or(|(host, _)| host.as_slice() != positions) {
                    let dev = self
                        .stream
                        .clone_htod(positions)
                        .map_err(device_error("uploading positions"))?;
                    *cached = Some((positions.to_vec(), dev));
                }
                use cudarc::driver::DevicePtr;
                let at = cached.as_ref().expect("uploaded above").1.device_ptr(&self.stream).0;
                (positions.len(), at)
            }
            Src::Step => (1, self.step_field(2)),
        })
    }

    fn launched(r: std::result::Result<(), cudarc::driver::DriverError>, what: &str) -> Result<()> {
        r.map_err(|e| Error::engine(format!("cuda: launching {what}: {e}")))
    }
}

/// From this many query rows, attention runs as GEMMs on the matrix units.
const GEMM_ATTENTION_ROWS: usize = 256;

/// Queries per chunk of the GEMM attention: bounds the score buffer to
/// `heads per KV head × ATTN_CHUNK × keys` f32 values.
const ATTN_CHUNK: usize = 512;

impl<T: Storage> CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    /// One strided batched GEMM in column-major terms (cuBLAS), f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    unsafe fn batched(
        &self,
        ta: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (u64, usize, i64),
        a_type: cudarc::cublas::sys::cudaDataType,
        b: (u64, usize, i64),
        b_type: cudarc::cublas::sys::cudaDataType,
        c: (u64, usize, i64),
        c_type: cudarc::cublas::sys::cudaDataType,
        batch: usize,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
        let beta = 0.0f32;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        cudarc::cublas::result::gemm_strided_batched_ex(
            *self.blas()?.handle(),
            op(ta),
            cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            a.0 as *const _,
            a_type,
            a.1 as i32,
            a.2,
            b.0 as *const _,
            b_type,
            b.1 as i32,
            b.2,
            (&beta) as *const f32 as *const _,
            c.0 as *mut _,
            c_type,
            c.1 as i32,
            c.2,
            batch as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| Error::engine(format!("cuda: cuBLAS batched gemm in attention: {e}")))
    }

    /// Prefill attention on the matrix units: per chunk of queries and per KV head,
    /// S = Q·Kᵀ (batched over the heads that share the KV head), causal softmax, O = P·V.
    fn attention_gemm(
        &self,
        q: &CudaSlice<T>,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        s: AttnShape,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (hd, g) = (s.head_dim, s.n_head / s.n_head_kv);
        let (qw, kvw) = (s.n_head * hd, s.n_head_kv * hd);
        let el = std::mem::size_of::<T>() as u64;
        let f32t = cudarc::cublas::sys::cudaDataType::CUDA_R_32F;
        let max_keys = s.first_pos + s.rows;
        let mut scores = self
            .stream
            .alloc_zeros::<f32>(g * ATTN_CHUNK.min(s.rows) * max_keys)
            .map_err(device_error("allocating attention scores"))?;
        let mut probs = self
            .stream
            .alloc_zeros::<T>(g * ATTN_CHUNK.min(s.rows) * max_keys)
            .map_err(device_error("allocating attention probabilities"))?;
        let (qp, _) = q.device_ptr(&self.stream);
        let (kp, _) = k_cache.device_ptr(&self.stream);
        let (vp, _) = v_cache.device_ptr(&self.stream);
        let (sp, _) = scores.device_ptr_mut(&self.stream);
        let (pp, _) = probs.device_ptr_mut(&self.stream);
        let (op, _) = out.device_ptr_mut(&self.stream);
        let scale = 1.0 / (hd as f32).sqrt();
        for c0 in (0..s.rows).step_by(ATTN_CHUNK) {
            let n = ATTN_CHUNK.min(s.rows - c0);
            let nk = s.first_pos + c0 + n;
            for kvh in 0..s.n_head_kv {
                let h0 = kvh * g;
                let k_at = kp + (kvh * hd) as u64 * el;
                let v_at = vp + (kvh * hd) as u64 * el;
                let q_at = qp + ((c0 * qw + h0 * hd) as u64) * el;
                let o_at = op + ((c0 * qw + h0 * hd) as u64) * el;
                // SAFETY: every operand lies inside its buffer: keys < first_pos + rows
                // (cache rows), queries c0..c0 + n, heads h0..h0 + g, scores/probs sized for
                // g × n × nk.
                unsafe {
                    self.batched(
                        true,
                        nk,
                        n,
                        hd,
                        scale,
                        (k_at, kvw, 0),
                        T::CUDA_TYPE,
                        (q_at, qw, hd as i64),
                        T::CUDA_TYPE,
                        (sp, nk, (n * nk) as i64),
                        f32t,
                        g,
                    )?;
                }
                let (rows_i, nk_i, first) = (n as i32, nk as i32, (s.first_pos + c0) as i32);
                let mut b = self.stream.launch_builder(self.f("rb_softmax_causal"));
                b.arg(&scores).arg(&mut probs).arg(&nk_i).arg(&rows_i).arg(&first);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, g as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: scores and probs hold g × n × nk values.
                Self::launched(unsafe { b.launch(cfg) }.map(drop), "softmax_causal")?;
                // SAFETY: as above; the output rows c0..c0 + n of heads h0..h0 + g.
                unsafe {
                    self.batched(
                        false,
                        hd,
                        n,
                        nk,
                        1.0,
                        (v_at, kvw, 0),
                        T::CUDA_TYPE,
                        (pp, nk, (n * nk) as i64),
                        T::CUDA_TYPE,
                        (o_at, qw, hd as i64),
                        T::CUDA_TYPE,
                        g,
                    )?;
                }
            }
        }
        Ok(())
    }
}

impl<T: Storage> Backend for CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    type Buf = CudaSlice<T>;
    type Graph = CudaGraph;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn dtype(&self) -> StorageDType {
        T::DTYPE
    }

    fn alloc(&self, len: usize) -> Result<Self::Buf> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(device_error("allocating"))
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        let host: Vec<T> = data.iter().map(|&v| T::from_f32(v)).collect();
        if host.is_empty() {
            return self.alloc(0);
        }
        self.stream.clone_htod(&host).map_err(device_error("uploading"))
    }

    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Self::Buf> {
        let n: usize = dims.iter().product();
        let (kernel, block_values, block_bytes) = decoder(dtype).ok_or_else(|| {
            Error::input(format!(
                "cuda: {name}: no device decoder for {dtype:?} (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q4_k q6_k)"
            ))
        })?;
        if !n.is_multiple_of(block_values) || data.len() != n / block_values * block_bytes {
            return Err(Error::input(format!(
                "cuda: {name}: {} bytes are not {n} values of {dtype:?}",
                data.len()
            )));
        }
        let out = self.alloc(n)?;
        let raw = self
            .stream
            .clone_htod(data)
            .map_err(device_error("uploading a weight"))?;
        let blocks = (n / block_values) as i64;
        let mut out = out;
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(&raw).arg(&mut out).arg(&blocks);
        // SAFETY: the kernel reads `blocks` blocks of `raw` and writes `n` values of `out`.
        Self::launched(unsafe { b.launch(Self::grid(blocks as usize, 256)) }.map(drop), kernel)?;
        Ok(out)
    }

    fn download(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>> {
        Self::check(buf.len(), offset + len, "download")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let host = self
            .stream
            .clone_dtoh(&buf.slice(offset..offset + len))
            .map_err(device_error("downloading"))?;
        Ok(host.into_iter().map(T::to_f32).collect())
    }

    fn download_raw(&self, buf: &Self::Buf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        Self::check(buf.len(), offset + len, "download")?;
        if len == 0 {
            return Ok(());
        }
        // Through page-locked memory, reused: copies from pageable memory run at a fraction
        // of the bus speed, and tap downloads are what a dump adds to a run.
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
        // SAFETY: T is f32, f16 or bf16, plain values whose bytes are the stored value
        // (little-endian on every CUDA host).
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
        });
        Ok(())
    }

    fn download_rows(&self, buf: &Self::Buf, runs: &[(usize, usize)], spare: Vec<u8>) -> Result<crate::dump::RowBytes> {
        for &(offset, len) in runs {
            Self::check(buf.len(), offset + len, "download")?;
        }
        if runs.iter().all(|r| r.1 == 0) {
            return Ok(crate::dump::RowBytes::Ready(spare));
        }
        self.lanes.capture(&self.stream, buf, runs)
    }

    fn reserve_captures(&self, len: usize, count: usize) -> Result<()> {
        self.lanes.reserve(&self.stream, len, count)
    }

    fn embed(&self, table: &Self::Buf, width: usize, ids: Src<u32>, out: &mut Self::Buf) -> Result<()> {
        let step = [self.step.get().token];
        let host = match ids {
            Src::Host(ids) => ids,
            Src::Step => &step,
        };
        Self::check(out.len(), host.len() * width, "embed")?;
        let vocab = table.len() / width.max(1);
        if let Some(&bad) = host.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::engine(format!(
                "cuda: embed: token {bad} is outside the table of {vocab} rows"
            )));
        }
        let uploaded;
        let dev_ids = match ids {
            Src::Host(ids) => {
                uploaded = self.stream.clone_htod(ids).map_err(device_error("uploading ids"))?;
                use cudarc::driver::DevicePtr;
                uploaded.device_ptr(&self.stream).0
            }
            Src::Step => self.step_field(0),
        };
        let (w, rows) = (width as i32, host.len() as i32);
        let mut b = self.stream.launch_builder(self.f("rb_embed"));
        b.arg(table).arg(&dev_ids).arg(out).arg(&w).arg(&rows);
        let cfg = LaunchConfig {
            grid_dim: (host.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every id was checked against the table; `out` holds rows × width.
        Self::launched(unsafe { b.launch(cfg) }.map(drop), "embed")
    }

    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        Self::check(x.len().min(out.len()), rows * width, "rms_norm")?;
        Self::check(w.len(), width, "rms_norm weight")?;
        let wi = width as i32;
        let mut b = self.stream.launch_builder(self.f("rb_rms_norm"));
        b.arg(x).arg(w).arg(out).arg(&wi).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(cfg) }.map(drop), "rms_norm")
    }

    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, k: usize, n: usize, out: &mut Self::Buf) -> Result<()> {
        Self::check(x.len(), rows * k, "matmul input")?;
        Self::check(w.len(), n * k, "matmul weight")?;
        Self::check(out.len(), rows * n, "matmul output")?;
        if rows <= GEMV_ROWS {
            let (r, ki, ni) = (rows as i32, k as i32, n as i32);
            let mut b = self.stream.launch_builder(self.f("rb_gemv"));
            b.arg(x).arg(w).arg(out).arg(&r).arg(&ki).arg(&ni);
            // SAFETY: shapes checked above.
            return Self::launched(unsafe { b.launch(Self::gemv_grid(n)) }.map(drop), "gemv");
        }
        // Row-major out[rows, n] = x · wᵀ is column-major outᵀ[n, rows] = wᵀ[n, k] · xᵀ[k, rows].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: k as i32,
            alpha: T::from_f32(1.0),
            lda: k as i32,
            ldb: k as i32,
            beta: T::from_f32(0.0),
            ldc: n as i32,
        };
        // SAFETY: shapes checked above.
        unsafe { self.blas()?.gemm(cfg, w, x, out) }
            .map_err(|e| Error::engine(format!("cuda: cuBLAS gemm [{rows}x{k}]·[{k}x{n}]: {e}")))
    }

    fn rope(&self, x: &mut Self::Buf, heads: usize, head_dim: usize, positions: Src<f32>, base: f32) -> Result<()> {
        let (n, pos) = self.rope_positions(positions)?;
        Self::check(x.len(), n * heads * head_dim, "rope")?;
        let pairs = n * heads * head_dim / 2;
        let (rows, h, d) = (n as i32, heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(self.f("rb_rope"));
        b.arg(x).arg(&pos).arg(&rows).arg(&h).arg(&d).arg(&base);
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(Self::grid(pairs, 256)) }.map(drop), "rope")
    }

    fn copy_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, row: Row, rows: usize, width: usize) -> Result<()> {
        Self::check(src.len(), rows * width, "copy_rows source")?;
        let n = (rows * width) as i64;
        let dst_row = row.resolve(&self.step.get());
        let none = 0u64;
        let dyn_row = match row {
            Row::At(_) => none,
            Row::StepPos => self.step_field(1),
            Row::StepSlot => self.step_field(3),
        };
        let w = width as i64;
        if (dst_row + rows) * width > dst.len() {
            // A destination past the buffer: launch the copy anyway, aimed at an unmapped
            // address, so the fault is a real device error (the `oob` fault injection uses
            // this; a host check would never show how the device reports it).
            let unmapped: u64 = 0x10;
            let mut b = self.stream.launch_builder(self.f("rb_copy"));
            b.arg(src).arg(&unmapped).arg(&n).arg(&none).arg(&w);
            // SAFETY: deliberately faulting; the device reports an illegal address.
            return Self::launched(unsafe { b.launch(Self::grid(n as usize, 256)) }.map(drop), "copy_rows");
        }
        // A row from the step record moves the destination on the device.
        let first = if dyn_row == none { dst_row } else { 0 };
        let mut view = dst.slice_mut(first * width..);
        let mut b = self.stream.launch_builder(self.f("rb_copy"));
        b.arg(src).arg(&mut view).arg(&n).arg(&dyn_row).arg(&w);
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(Self::grid(n as usize, 256)) }.map(drop), "copy_rows")
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        s: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let (qw, kvw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let dyn_first = if s.from_step { self.step_field(1) } else { 0u64 };
        if s.from_step && (s.rows != 1 || s.first_pos != self.step.get().pos) {
            return Err(Error::engine(
                "cuda: attention from the step record takes one row at the step's position",
            ));
        }
        Self::check(q.len().min(out.len()), s.rows * qw, "attention")?;
        Self::check(
            k_cache.len().min(v_cache.len()),
            (s.first_pos + s.rows) * kvw,
            "attention cache",
        )?;
        let plan = attention_plan(&s, "cuda")?;
        if s.rows >= GEMM_ATTENTION_ROWS && !s.from_step {
            return self.attention_gemm(q, k_cache, v_cache, s, out);
        }
        let (rows, nh, nkv, first) = (s.rows as i32, s.n_head as i32, s.n_head_kv as i32, s.first_pos as i32);
        match plan {
            AttnPlan::Tiled { kernel, grid, block } => {
                let cfg = LaunchConfig {
                    grid_dim: (grid.0, grid.1, 1),
                    block_dim: (block, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(self.f(kernel));
                b.arg(q)
                    .arg(k_cache)
                    .arg(v_cache)
                    .arg(out)
                    .arg(&rows)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&first)
                    .arg(&dyn_first);
                // SAFETY: bounds checked above.
                Self::launched(unsafe { b.launch(cfg) }.map(drop), kernel)
            }
            AttnPlan::Split {
                part,
                merge,
                grid,
                block,
            } => {
                let cfg = LaunchConfig {
                    grid_dim: grid,
                    block_dim: (block, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(self.f(part));
                b.arg(q)
                    .arg(k_cache)
                    .arg(v_cache)
                    .arg(&self.attn_part_at)
                    .arg(&rows)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&first)
                    .arg(&dyn_first);
                // SAFETY: bounds checked above; the plan keeps the states within the scratch.
                Self::launched(unsafe { b.launch(cfg) }.map(drop), part)?;
                let splits = grid.2 as i32;
                let cfg = LaunchConfig {
                    grid_dim: (grid.0, grid.1, 1),
                    block_dim: (s.head_dim as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(self.f(merge));
                b.arg(&self.attn_part_at).arg(out).arg(&nh).arg(&splits);
                // SAFETY: as above.
                Self::launched(unsafe { b.launch(cfg) }.map(drop), merge)
            }
        }
    }

    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        Self::check(gate.len().min(up.len()).min(out.len()), n, "silu_mul")?;
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("rb_silu_mul"));
        b.arg(gate).arg(up).arg(out).arg(&nn);
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(Self::grid(n, 256)) }.map(drop), "silu_mul")
    }

    fn add(&self, a: &Self::Buf, b_: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        Self::check(a.len().min(b_.len()).min(out.len()), n, "add")?;
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("rb_add"));
        b.arg(a).arg(b_).arg(out).arg(&nn);
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(Self::grid(n, 256)) }.map(drop), "add")
    }

    fn perturb(&self, x: &mut Self::Buf, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()> {
        Self::check(x.len(), rows * width, "perturb")?;
        if from_row >= rows {
            return Ok(());
        }
        let (kind, value) = fault_code(fault);
        let (start, n) = ((from_row * width) as i64, ((rows - from_row) * width) as i64);
        let mut b = self.stream.launch_builder(self.f("rb_perturb"));
        b.arg(x).arg(&start).arg(&n).arg(&kind).arg(&value);
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(Self::grid(n as usize, 256)) }.map(drop), "perturb")
    }

    fn argmax(&self, x: &Self::Buf, row: usize, width: usize) -> Result<u32> {
        Self::check(x.len(), (row + 1) * width, "argmax")?;
        let mut out = self.stream.alloc_zeros::<u32>(1).map_err(device_error("allocating"))?;
        let view = x.slice(row * width..(row + 1) * width);
        let w = width as i32;
        let mut b = self.stream.launch_builder(self.f("rb_argmax"));
        b.arg(&view).arg(&w).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(cfg) }.map(drop), "argmax")?;
        Ok(self
            .stream
            .clone_dtoh(&out)
            .map_err(device_error("downloading argmax"))?[0])
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::engine(format!("cuda: device error: {e}")))
    }

    fn matmul3(
        &self,
        x: &Self::Buf,
        w: [&Self::Buf; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        if rows > GEMV_ROWS {
            return backend::matmul3_by_parts(self, x, w, rows, k, n, out);
        }
        Self::check(x.len(), rows * k, "matmul3 input")?;
        for i in 0..3 {
            Self::check(w[i].len(), n[i] * k, "matmul3 weight")?;
            Self::check(out[i].len(), rows * n[i], "matmul3 output")?;
        }
        let [o0, o1, o2] = out;
        let (r, ki, n0, n1, n2) = (rows as i32, k as i32, n[0] as i32, n[1] as i32, n[2] as i32);
        let mut b = self.stream.launch_builder(self.f("rb_gemv3"));
        b.arg(x)
            .arg(w[0])
            .arg(w[1])
            .arg(w[2])
            .arg(o0)
            .arg(o1)
            .arg(o2)
            .arg(&r)
            .arg(&ki)
            .arg(&n0)
            .arg(&n1)
            .arg(&n2);
        // SAFETY: shapes checked above.
        Self::launched(unsafe { b.launch(Self::gemv_grid(n.iter().sum())) }.map(drop), "gemv3")
    }

    fn gate_up_silu(
        &self,
        x: &Self::Buf,
        wg: &Self::Buf,
        wu: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        act: &mut Self::Buf,
    ) -> Result<()> {
        if rows > GEMV_ROWS {
            return backend::gate_up_silu_by_parts(self, x, wg, wu, rows, k, n, g, u, act);
        }
        // Gate and up as one launch of 2n columns (as fast as one projection of 2n), then
        // the product: a warp computing both dots of a column streams at half the rate.
        self.matmul3(x, [wg, wu, wu], rows, k, [n, n, 0], [&mut *g, &mut *u, &mut *act])?;
        self.silu_mul(g, u, rows * n, act)
    }

    fn rope_append(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        s: AttnShape,
        positions: Src<f32>,
        base: f32,
    ) -> Result<()> {
        let (qw, kvw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let first = if s.from_step { self.step.get().pos } else { s.first_pos };
        Self::check(q.len(), s.rows * qw, "rope_append q")?;
        Self::check(k.len().min(v.len()), s.rows * kvw, "rope_append k, v")?;
        Self::check(
            k_cache.len().min(v_cache.len()),
            (first + s.rows) * kvw,
            "rope_append cache",
        )?;
        let (n, pos) = self.rope_positions(positions)?;
        if n != s.rows {
            return Err(Error::engine(format!(
                "cuda: rope_append: {n} positions for {} rows",
                s.rows
            )));
        }
        let dyn_row = if s.from_step { self.step_field(1) } else { 0u64 };
        let (rows, nh, nkv, hd, row0) = (
            s.rows as i32,
            s.n_head as i32,
            s.n_head_kv as i32,
            s.head_dim as i32,
            s.first_pos as i32,
        );
        let threads = s.rows * (qw / 2 + kvw / 2 + kvw);
        let mut b = self.stream.launch_builder(self.f("rb_rope_append"));
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(k_cache)
            .arg(v_cache)
            .arg(&pos)
            .arg(&rows)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&base)
            .arg(&dyn_row)
            .arg(&row0);
        // SAFETY: bounds checked above; the step record's position is the one checked.
        Self::launched(unsafe { b.launch(Self::grid(threads, 256)) }.map(drop), "rope_append")
    }

    fn add_rms_norm(
        &self,
        a: &Self::Buf,
        b_: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        Self::check(
            a.len().min(b_.len()).min(sum.len()).min(out.len()),
            rows * width,
            "add_rms_norm",
        )?;
        Self::check(w.len(), width, "add_rms_norm weight")?;
        let wi = width as i32;
        let mut b = self.stream.launch_builder(self.f("rb_add_rms_norm"));
        b.arg(a).arg(b_).arg(w).arg(sum).arg(out).arg(&wi).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bounds checked above.
        Self::launched(unsafe { b.launch(cfg) }.map(drop), "add_rms_norm")
    }

    fn set_step(&self, step: Step) -> Result<()> {
        let words = [step.token, step.pos as u32, step.rope_pos.to_bits(), step.slot as u32];
        // SAFETY: 16 bytes into the 16-byte record; a copy from pageable memory has read
        // `words` by the time it returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.step_at, &words, self.stream.cu_stream()) }
            .map_err(device_error("writing the step record"))?;
        self.step.set(step);
        Ok(())
    }

    fn begin_capture(&self) -> Result<bool> {
        // Recorded matmuls need the handle; it must not be created while recording.
        self.blas()?;
        self.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(device_error("starting a graph capture"))?;
        Ok(true)
    }

    fn end_capture(&self) -> Result<Option<CudaGraph>> {
        // A capture that an op broke ends with an error and no graph: the caller runs the
        // step's ops directly instead.
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
