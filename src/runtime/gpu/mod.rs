//! The GPU backend, once, over two drivers: [`GpuBackend`] implements the runtime's
//! [`Backend`] trait — bounds checks, kernel arguments, grids, attention and gemv plans,
//! the decode step record, the out-of-bounds fault — and a [`Driver`] (CUDA or HIP) only
//! moves memory and launches the kernels of `kernels/ops.hip` by name. A driver may run
//! some ops its own way (cuBLAS on CUDA) and record op sequences (CUDA graphs).

pub mod cuda;
#[cfg(feature = "hip")]
pub mod hip;
pub mod kernels;
mod matvec;
mod ops;
pub mod plan;
mod quant;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use crate::dump::RowBytes;
use crate::error::{Error, Result};
use crate::runtime::backend::{AttnShape, Src, Step};
use kernels::{KernelCall, Ptr, StorageElem};
use plan::{Grid, ATTN_PART_FLOATS};

/// What a GPU backend needs of a device API: memory, copies and kernel launches on one
/// ordered stream of work. Ops a driver can do better it takes over through the
/// `vendor_*` methods; by default they run on the kernels.
pub trait Driver: Send + Sized {
    type Elem: StorageElem;
    /// A device buffer of `Elem` values.
    type Buf: Send;
    /// Untyped device memory: weights as stored, token ids, positions, scratch.
    type Bytes: Send;
    /// A recorded sequence of ops (see [`Driver::begin_record`]).
    type Graph;
    /// A 4-byte read on its way to the host (see [`Driver::queue_read_word`]).
    type QueuedWord: Send;
    /// The backend's name, which starts its error messages.
    const NAME: &'static str;
    /// Threads of a warp (a wavefront on AMD), as compat.h's RB_WARP.
    const WARP: u32;

    fn device(&self) -> String;
    /// Bytes free on the device, when it says.
    fn free_memory(&self) -> Option<u64>;
    /// Elements `buf` holds.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// The device address of `buf`'s first element.
    fn addr(&self, buf: &Self::Buf) -> u64;
    fn bytes_addr(&self, bytes: &Self::Bytes) -> u64;
    /// A zeroed buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, values: &[Self::Elem]) -> Result<Self::Buf>;
    fn upload_bytes(&self, bytes: &[u8]) -> Result<Self::Bytes>;
    /// Overwrite the start of `dst`, in order with the launches around it.
    fn write_bytes(&self, dst: &Self::Bytes, bytes: &[u8]) -> Result<()>;
    /// The start of `src`, once the work before has run.
    fn read_bytes(&self, src: &Self::Bytes, out: &mut [u8]) -> Result<()>;
    /// Queue a copy of the first 4 bytes of `src` to the host, in order with the launches
    /// before it; the host need not wait for it until [`Driver::finish_read_word`].
    fn queue_read_word(&self, src: &Self::Bytes) -> Result<Self::QueuedWord>;
    /// The bytes of a queued read, once its copy has run.
    fn finish_read_word(&self, word: Self::QueuedWord) -> Result<[u8; 4]>;
    /// Elements `offset..offset + len` (checked by the caller, `len` > 0) as stored,
    /// appended to `out`, once the work before has run.
    fn download(&self, buf: &Self::Buf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()>;
    fn launch(&self, call: KernelCall, grid: Grid) -> Result<()>;
    fn sync(&self) -> Result<()>;

    /// Runs of `buf` (checked by the caller) for a dump writer; by default downloaded now.
    fn download_rows(&self, buf: &Self::Buf, runs: &[(usize, usize)], mut spare: Vec<u8>) -> Result<RowBytes> {
        for &(offset, len) in runs.iter().filter(|r| r.1 > 0) {
            self.download(buf, offset, len, &mut spare)?;
        }
        Ok(RowBytes::Ready(spare))
    }
    /// See [`Backend::reserve_captures`](crate::runtime::backend::Backend::reserve_captures).
    fn reserve_captures(&self, _len: usize, _count: usize) -> Result<()> {
        Ok(())
    }
    /// A matmul of more than [`plan::GEMV_ROWS`] rows (shapes checked) on the driver's own
    /// library, or `None` for the tiled kernel.
    fn vendor_matmul(
        &self,
        _x: &Self::Buf,
        _w: &Self::Buf,
        _shape: (usize, usize, usize),
        _out: &mut Self::Buf,
    ) -> Option<Result<()>> {
        None
    }
    /// Prefill attention (shapes checked, not from the step record) the driver's own way,
    /// or `None` for the attention kernels.
    fn vendor_attention(
        &self,
        _q: &Self::Buf,
        _cache: (&Self::Buf, &Self::Buf),
        _s: AttnShape,
        _out: &mut Self::Buf,
    ) -> Option<Result<()>> {
        None
    }
    /// See [`Backend::begin_record`](crate::runtime::backend::Backend::begin_record).
    fn begin_record(&self) -> Result<bool> {
        Ok(false)
    }
    fn end_record(&self) -> Result<Option<Self::Graph>> {
        Ok(None)
    }
    fn replay(&self, _graph: &Self::Graph) -> Result<()> {
        Err(Error::engine(format!("{}: this backend does not record", Self::NAME)))
    }
}

/// The runtime's backend on a GPU: the ops of [`Backend`](crate::runtime::backend::Backend)
/// as launches of the kernels of ops.hip through a [`Driver`].
pub struct GpuBackend<D: Driver> {
    driver: D,
    /// The decode step record on the device — token, position, RoPE position (f32 bits),
    /// tap slot — and its host copy (for bounds checks).
    step_dev: D::Bytes,
    step: Cell<Step>,
    /// Scratch for the partial softmax states of split attention (ATTN_PART_FLOATS f32).
    attn_part: D::Bytes,
    /// The positions last uploaded for RoPE: every layer's q and k share them.
    rope_positions: RefCell<Option<(Vec<f32>, D::Bytes)>>,
    /// Prefill's transient dense copy of one quantized matrix, grown to the largest.
    dequant_workspace: RefCell<Option<D::Buf>>,
    /// Tokens [`Backend::argmax_to_step`](crate::runtime::backend::Backend::argmax_to_step)
    /// queued for the host, oldest first.
    queued_tokens: RefCell<VecDeque<D::QueuedWord>>,
}

/// Fields of the step record, in device order.
#[derive(Clone, Copy)]
enum StepField {
    Token = 0,
    Pos = 1,
    RopePos = 2,
    Slot = 3,
}

impl<D: Driver> GpuBackend<D> {
    /// The backend over an opened driver: allocates the step record and scratch.
    pub fn with_driver(driver: D) -> Result<Self> {
        let step_dev = driver.upload_bytes(&[0u8; 16])?;
        let attn_part = driver.upload_bytes(&vec![0u8; 4 * ATTN_PART_FLOATS])?;
        Ok(Self {
            driver,
            step_dev,
            step: Cell::new(Step::default()),
            attn_part,
            rope_positions: RefCell::new(None),
            dequant_workspace: RefCell::new(None),
            queued_tokens: RefCell::new(VecDeque::new()),
        })
    }

    fn check(&self, len: usize, need: usize, what: &str) -> Result<()> {
        if need > len {
            return Err(Error::engine(format!(
                "{}: {what}: needs {need} elements, the buffer holds {len}",
                D::NAME
            )));
        }
        Ok(())
    }

    fn len(&self, buf: &D::Buf) -> usize {
        self.driver.len(buf)
    }

    fn ptr(&self, buf: &D::Buf) -> Ptr {
        Ptr(self.driver.addr(buf))
    }

    /// The address of element `at` of `buf`.
    fn ptr_at(&self, buf: &D::Buf, at: usize) -> Ptr {
        Ptr(self.driver.addr(buf) + (at * std::mem::size_of::<D::Elem>()) as u64)
    }

    fn step_field(&self, field: StepField) -> Ptr {
        Ptr(self.driver.bytes_addr(&self.step_dev) + 4 * field as u64)
    }

    /// The step record's position as the optional `dyn_*` argument of a kernel.
    fn dyn_pos(&self, from_step: bool) -> Ptr {
        if from_step {
            self.step_field(StepField::Pos)
        } else {
            Ptr::NONE
        }
    }

    /// The device positions RoPE reads: the step record's, or `positions` uploaded (kept
    /// while the next call asks for the same ones: every layer's q and k share them).
    fn rope_positions(&self, positions: Src<f32>) -> Result<(usize, Ptr)> {
        Ok(match positions {
            Src::Host(positions) => {
                let mut cached = self.rope_positions.borrow_mut();
                if cached.as_ref().is_none_or(|(host, _)| host.as_slice() != positions) {
                    let dev = self.driver.upload_bytes(bytemuck::cast_slice(positions))?;
                    *cached = Some((positions.to_vec(), dev));
                }
                let dev = &cached.as_ref().expect("uploaded above").1;
                (positions.len(), Ptr(self.driver.bytes_addr(dev)))
            }
            Src::Step => (1, self.step_field(StepField::RopePos)),
        })
    }
}
