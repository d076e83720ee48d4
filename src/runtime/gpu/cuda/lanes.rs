//! Tap rows off a CUDA device while the compute stream goes on. Each capture is
//! snapshotted into a device slot on the compute stream (so the next op may overwrite its
//! source), copied into page-locked host memory on a copy stream, and handed to a dump
//! writer thread, which writes it once a host function on the copy stream says it arrived.
//! A lane — slot, host memory, events — returns to the pool when its writer is done; when
//! every lane is with the writers the engine waits for one, which bounds memory.
//!
//! Arrival is a host-side flag, not an event query: after a device fault every driver
//! call fails, and rows that arrived before the fault must still reach their files.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use crate::dump::{InFlightRows, RowBytes};
use crate::error::{Error, Result};
use crate::runtime::gpu::kernels::StorageElem;

/// What a lane holds: a stored value that cudarc can allocate and copy.
pub(crate) trait LaneElem: StorageElem + DeviceRepr + ValidAsZeroBits {}
impl<T: StorageElem + DeviceRepr + ValidAsZeroBits> LaneElem for T {}

/// Lanes in existence at most: enough to cover the writers' threads and the copies in
/// flight, few enough that pinned memory stays a small multiple of one tap.
const MAX_LANES: usize = 8;
/// Lane sizes are rounded up to this many elements, so taps of similar size share lanes.
const LANE_GRAIN: usize = 1 << 18;
/// Page-locked memory that [`LanePool::reserve`] sets aside at most (and at most an eighth
/// of the available memory).
const PINNED_BUDGET: u64 = 64 << 20;

struct Lane<T> {
    device: CudaSlice<T>,
    /// Owns the page-locked memory at `host_at`.
    _host: PinnedHostSlice<T>,
    /// The host memory's address, read once the rows arrived without a driver call.
    host_at: usize,
    snapped: CudaEvent,
    copied: CudaEvent,
}

pub(crate) struct LanePool<T> {
    ctx: Arc<CudaContext>,
    copy: Arc<CudaStream>,
    /// Free lanes, and how many exist.
    free: Mutex<(Vec<Lane<T>>, usize)>,
    returned: Condvar,
}

fn device_error(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::engine(format!("cuda: {what}: {e}"))
}

impl<T: LaneElem> LanePool<T> {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Result<Arc<Self>> {
        let copy = ctx.new_stream().map_err(device_error("creating the copy stream"))?;
        Ok(Arc::new(Self {
            ctx,
            copy,
            free: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
        }))
    }

    fn make(&self, compute: &Arc<CudaStream>, len: usize) -> Result<Lane<T>> {
        let len = len.div_ceil(LANE_GRAIN) * LANE_GRAIN;
        // SAFETY: the slot is only read by copies after a snapshot has written it.
        let device = unsafe { compute.alloc::<T>(len) }.map_err(device_error("allocating a tap lane"))?;
        // SAFETY: host memory is only read after a copy has filled it.
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0) }
            .map_err(device_error("allocating page-locked memory"))?;
        let host_at = host
            .as_mut_ptr()
            .map_err(device_error("allocating page-locked memory"))? as usize;
        let snapped = self.ctx.new_event(None).map_err(device_error("creating an event"))?;
        let copied = self.ctx.new_event(None).map_err(device_error("creating an event"))?;
        Ok(Lane {
            device,
            _host: host,
            host_at,
            snapped,
            copied,
        })
    }

    /// Lanes of `len` elements for `count` captures: as many as fit in a budget of
    /// page-locked memory (at least two, so that a copy overlaps a write), no more than
    /// the captures. Lanes that fit are kept from earlier dumps, as bisect's probes are;
    /// none is smaller than an even share of the budget, so that probes of a few more rows
    /// reuse them (page-locked memory costs about 1 ms per MiB to make: bisect's probes on
    /// an H200 spent 80 ms replacing lanes a few rows too small).
    pub(crate) fn reserve(self: &Arc<Self>, compute: &Arc<CudaStream>, len: usize, count: usize) -> Result<()> {
        let t0 = std::time::Instant::now();
        let budget = crate::sys::available_memory().map_or(PINNED_BUDGET, |m| (m / 8).min(PINNED_BUDGET));
        let len = len.max(budget as usize / MAX_LANES / std::mem::size_of::<T>());
        let lane_bytes = (len.div_ceil(LANE_GRAIN) * LANE_GRAIN * std::mem::size_of::<T>()) as u64;
        let want = ((budget / lane_bytes.max(1)).clamp(2, MAX_LANES as u64) as usize).min(count);
        let mut made = 0;
        loop {
            let mut free = self
                .free
                .lock()
                .map_err(|_| Error::engine("cuda: the tap lanes' lock was poisoned"))?;
            let ready = free.0.iter().filter(|lane| lane.device.len() >= len).count();
            if ready >= want || free.1 - free.0.len() + ready >= MAX_LANES {
                break;
            }
            // Too small ones are replaced; lanes with writers are left to `take`.
            if let Some(i) = free.0.iter().position(|lane| lane.device.len() < len) {
                let small = free.0.swap_remove(i);
                small
                    .copied
                    .synchronize()
                    .map_err(device_error("retiring a tap lane"))?;
                free.1 -= 1;
            }
            if free.1 >= MAX_LANES {
                break;
            }
            free.1 += 1;
            drop(free);
            let lane = self.make(compute, len);
            let mut free = self
                .free
                .lock()
                .map_err(|_| Error::engine("cuda: the tap lanes' lock was poisoned"))?;
            match lane {
                Ok(lane) => free.0.push(lane),
                Err(e) => {
                    free.1 -= 1;
                    return Err(e);
                }
            }
            made += 1;
        }
        if made > 0 {
            self.prime(compute)?;
            crate::trace::mark(|| {
                format!(
                    "cuda: {made} tap lanes of {} MiB ready in {:.1} ms",
                    lane_bytes >> 20,
                    t0.elapsed().as_secs_f64() * 1e3
                )
            });
        }
        Ok(())
    }

    /// One small capture through the whole path, waited for: the driver sets up its
    /// host-function thread and copy paths on first use, which would otherwise fall on
    /// the first tap of a run.
    fn prime(self: &Arc<Self>, compute: &Arc<CudaStream>) -> Result<()> {
        let lane = self.take(compute, 1)?;
        // From the slot's second half to its first, so source and target do not overlap.
        let (from, n) = (lane.device.len() / 2, (lane.device.len() / 2).min(1 << 12));
        let arrival = match self.issue(compute, &lane.device, &[(from, n)], &lane, n) {
            Ok(arrival) => arrival,
            Err(e) => {
                self.give_back(lane);
                return Err(e);
            }
        };
        let mut rows = InFlight {
            lane: Some(lane),
            bytes: n * std::mem::size_of::<T>(),
            arrival,
            pool: self.clone(),
        };
        rows.wait().map(drop)
    }

    /// A lane of at least `len` elements: a free one, a new one, or the next returned.
    fn take(&self, compute: &Arc<CudaStream>, len: usize) -> Result<Lane<T>> {
        let poisoned = || Error::engine("cuda: the tap lanes' lock was poisoned");
        let mut free = self.free.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(i) = free.0.iter().position(|lane| lane.device.len() >= len) {
                return Ok(free.0.swap_remove(i));
            }
            if let Some(small) = free.0.pop() {
                // Its last copy may still read the slot or fill the host memory.
                small
                    .copied
                    .synchronize()
                    .map_err(device_error("retiring a tap lane"))?;
                free.1 -= 1;
            }
            if free.1 < MAX_LANES {
                free.1 += 1;
                drop(free);
                return self.make(compute, len).inspect_err(|_| {
                    if let Ok(mut free) = self.free.lock() {
                        free.1 -= 1;
                    }
                });
            }
            let t0 = std::time::Instant::now();
            free = self.returned.wait(free).map_err(|_| poisoned())?;
            let waited = t0.elapsed();
            if waited > Duration::from_millis(1) {
                crate::trace::mark(|| {
                    format!(
                        "cuda: waited {:.1} ms for a tap lane (all {MAX_LANES} with the writers)",
                        waited.as_secs_f64() * 1e3
                    )
                });
            }
        }
    }

    fn give_back(&self, lane: Lane<T>) {
        if let Ok(mut free) = self.free.lock() {
            free.0.push(lane);
        }
        self.returned.notify_one();
    }

    /// Queue the copy of the elements `runs` (offset, length) of `src` (on `compute`) to
    /// host memory; the rows go to a writer as they are.
    pub(crate) fn capture(
        self: &Arc<Self>,
        compute: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        runs: &[(usize, usize)],
    ) -> Result<RowBytes> {
        let total: usize = runs.iter().map(|r| r.1).sum();
        let lane = self.take(compute, total)?;
        match self.issue(compute, src, runs, &lane, total) {
            Ok(arrival) => Ok(RowBytes::InFlight(Box::new(InFlight {
                lane: Some(lane),
                bytes: total * std::mem::size_of::<T>(),
                arrival,
                pool: self.clone(),
            }))),
            Err(e) => {
                self.give_back(lane);
                Err(e)
            }
        }
    }

    fn issue(
        &self,
        compute: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        runs: &[(usize, usize)],
        lane: &Lane<T>,
        total: usize,
    ) -> Result<Arc<Arrival>> {
        use cudarc::driver::result;
        let size = std::mem::size_of::<T>();
        let src_at = src.device_ptr(compute).0;
        let slot_at = lane.device.device_ptr(compute).0;
        // The slot's previous copy must be done before it is overwritten.
        compute
            .wait(&lane.copied)
            .map_err(device_error("ordering a tap copy"))?;
        let mut at = 0;
        for &(offset, len) in runs {
            // SAFETY: the caller checked every run against `src`; the lane holds `total`.
            unsafe {
                result::memcpy_dtod_async(
                    slot_at + (at * size) as u64,
                    src_at + (offset * size) as u64,
                    len * size,
                    compute.cu_stream(),
                )
            }
            .map_err(device_error("snapshotting a tap"))?;
            at += len;
        }
        lane.snapped
            .record(compute)
            .map_err(device_error("ordering a tap copy"))?;
        self.copy
            .wait(&lane.snapped)
            .map_err(device_error("ordering a tap copy"))?;
        // SAFETY: `host_at` points at the lane's pinned memory of at least `total` elements,
        // which nothing else touches until the lane is returned.
        let host = unsafe { std::slice::from_raw_parts_mut(lane.host_at as *mut T, total) };
        unsafe { result::memcpy_dtoh_async(host, slot_at, self.copy.cu_stream()) }
            .map_err(device_error("copying a tap"))?;
        lane.copied
            .record(&self.copy)
            .map_err(device_error("ordering a tap copy"))?;
        let arrival = Arc::new(Arrival::default());
        let data = Arc::into_raw(arrival.clone()) as *mut std::ffi::c_void;
        // SAFETY: `arrived` takes back the reference handed over here, and calls no CUDA API.
        if let Err(e) = unsafe { result::stream::launch_host_function(self.copy.cu_stream(), arrived, data) } {
            // SAFETY: the host function was not queued, so the reference is still ours.
            drop(unsafe { Arc::from_raw(data as *const Arrival) });
            return Err(device_error("queuing a tap copy")(e));
        }
        Ok(arrival)
    }
}

/// Set by the copy stream's host function once a lane's rows are in host memory.
#[derive(Default)]
struct Arrival {
    done: Mutex<bool>,
    signal: Condvar,
}

unsafe extern "C" fn arrived(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the reference `issue` handed over, taken back exactly once.
    let arrival = unsafe { Arc::from_raw(data as *const Arrival) };
    if let Ok(mut done) = arrival.done.lock() {
        *done = true;
    }
    arrival.signal.notify_all();
}

/// One capture on its way to host memory.
struct InFlight<T: LaneElem> {
    lane: Option<Lane<T>>,
    bytes: usize,
    arrival: Arc<Arrival>,
    pool: Arc<LanePool<T>>,
}

impl<T: LaneElem> InFlightRows for InFlight<T> {
    fn wait(&mut self) -> Result<&[u8]> {
        let lane = self.lane.as_ref().expect("a lane until dropped");
        let lost = |why: &dyn std::fmt::Display| {
            Error::engine(format!(
                "cuda: the device failed before a tap's rows were copied off it: {why}"
            ))
        };
        let poisoned = "a lock was poisoned";
        let mut done = self.arrival.done.lock().map_err(|_| lost(&poisoned))?;
        while !*done {
            let (guard, waited) = self
                .arrival
                .signal
                .wait_timeout(done, Duration::from_millis(20))
                .map_err(|_| lost(&poisoned))?;
            done = guard;
            // A failed device never runs the host function; the event says so instead.
            if !*done && waited.timed_out() {
                let _ = lane.copied.context().bind_to_thread();
                if let Err(e) = lane.copied.try_is_complete() {
                    drop(done);
                    done = self.arrival.done.lock().map_err(|_| lost(&poisoned))?;
                    if !*done {
                        return Err(lost(&e));
                    }
                }
            }
        }
        // SAFETY: the copy into the lane's pinned memory is done (the host function ran
        // after it), and the lane stays ours until this value drops.
        Ok(unsafe { std::slice::from_raw_parts(lane.host_at as *const u8, self.bytes) })
    }
}

impl<T: LaneElem> Drop for InFlight<T> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            self.pool.give_back(lane);
        }
    }
}
