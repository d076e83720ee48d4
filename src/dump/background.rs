//! The background writer: files written on threads of their own while the engine
//! computes, whole ([`FileJob`]) or as streamed rows ([`RowBytes`]), some still in flight
//! from a device; on finish the manifest records the outcome and the last tap written.

use std::sync::Arc;

use super::write::{DumpWriter, FileStream};
use super::{RunError, Status, TapDType, TapTensor};
use crate::error::{Error, Result};

/// One file for the background writer.
pub struct FileJob {
    pub prompt_id: String,
    pub stem: String,
    pub positions: std::sync::Arc<Vec<usize>>,
    pub taps: Vec<TapTensor>,
}

/// What the writer threads do: write a whole file, or rows of a streamed one.
enum Job {
    File(FileJob),
    Rows {
        stream: Arc<FileStream>,
        tap: usize,
        first_row: usize,
        bytes: RowBytes,
    },
}

/// Rows for a streamed file: in memory now, or still being copied off a device (the
/// engine goes on computing meanwhile).
pub enum RowBytes {
    Ready(Vec<u8>),
    InFlight(Box<dyn InFlightRows>),
}

/// Rows a device is still copying to host memory.
pub trait InFlightRows: Send {
    /// Wait until the rows are in host memory; an error when the device failed before
    /// they arrived.
    fn wait(&mut self) -> Result<&[u8]>;
}

/// Writes files on threads of their own so the engine computes while data hits the
/// disk; the bounded queue keeps at most two jobs per thread in flight, bounding memory.
pub struct BackgroundWriter {
    tx: Option<std::sync::mpsc::SyncSender<(usize, Job)>>,
    sent: std::sync::atomic::AtomicUsize,
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
    shared: Arc<WriterShared>,
}

/// What the writer threads share.
struct WriterShared {
    writer: DumpWriter,
    jobs: std::sync::Mutex<std::sync::mpsc::Receiver<(usize, Job)>>,
    /// Set by the first failed write: the other threads stop taking files.
    failed: std::sync::atomic::AtomicBool,
    /// (order, prompt id, last tap id) of the latest file (in send or creation order)
    /// that reached the disk whole: files finish out of order, the report names the last
    /// in graph order.
    last_written: std::sync::Mutex<Option<(usize, String, String)>>,
    /// Row buffers written and handed back, for reuse: fresh memory costs a page fault
    /// per page on first touch.
    spare: std::sync::Mutex<Vec<Vec<u8>>>,
    /// The first rows a device failed to deliver: the dump cannot be complete.
    lost: std::sync::Mutex<Option<Error>>,
    threads: usize,
}

/// Files written at once: a dump's files are independent, and one thread does not keep
/// a fast disk busy. Half the cores, from 2 to 8: the engine needs the others.
fn writer_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() / 2)
        .clamp(2, 8)
}

impl WriterShared {
    /// Do one job; `sent` is its place in the queue.
    fn write(&self, sent: usize, job: Job) -> Result<()> {
        let (order, prompt_id, last_tap) = match job {
            Job::File(job) => {
                self.writer
                    .write_file(&job.prompt_id, &job.stem, &job.positions, &job.taps)?;
                let Some(last) = job.taps.last() else { return Ok(()) };
                (sent, job.prompt_id, last.id.clone())
            }
            Job::Rows {
                stream,
                tap,
                first_row,
                bytes,
            } => {
                let done = match bytes {
                    RowBytes::Ready(mut bytes) => {
                        let done = stream.write_rows(tap, first_row, &bytes)?;
                        bytes.clear();
                        if let Ok(mut spare) = self.spare.lock() {
                            if spare.len() < 4 * self.threads {
                                spare.push(bytes);
                            }
                        }
                        done
                    }
                    RowBytes::InFlight(mut rows) => match rows.wait() {
                        Ok(bytes) => stream.write_rows(tap, first_row, bytes)?,
                        // The device failed before these rows came off it: their file cannot
                        // land, but every other file still can (a crash is when they matter).
                        Err(e) => {
                            if let Ok(mut lost) = self.lost.lock() {
                                lost.get_or_insert(e);
                            }
                            return Ok(());
                        }
                    },
                };
                if !done {
                    return Ok(());
                }
                (
                    stream.order,
                    stream.prompt_id.clone(),
                    stream.tap_ids().last().unwrap_or_default().to_string(),
                )
            }
        };
        if let Ok(mut slot) = self.last_written.lock() {
            if slot.as_ref().is_none_or(|(o, _, _)| *o < order) {
                *slot = Some((order, prompt_id, last_tap));
            }
        }
        Ok(())
    }
}

impl BackgroundWriter {
    pub fn spawn(writer: DumpWriter) -> Self {
        use std::sync::atomic::Ordering;
        let threads = writer_threads();
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Job)>(2 * threads);
        let shared = Arc::new(WriterShared {
            writer,
            jobs: std::sync::Mutex::new(rx),
            failed: Default::default(),
            last_written: Default::default(),
            spare: Default::default(),
            lost: Default::default(),
            threads,
        });
        let handles = (0..threads)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || -> Result<()> {
                    loop {
                        let (order, job) = match shared.jobs.lock().map(|rx| rx.recv()) {
                            Ok(Ok(next)) => next,
                            _ => return Ok(()),
                        };
                        if shared.failed.load(Ordering::SeqCst) {
                            continue; // drain, so the engine's sends never block on a dead writer
                        }
                        if let Err(e) = shared.write(order, job) {
                            shared.failed.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        Self {
            tx: Some(tx),
            sent: Default::default(),
            handles,
            shared,
        }
    }

    fn queue(&self, job: Job) -> Result<()> {
        let stopped = || Error::engine("the dump writer stopped (see the error at the end of the run)");
        if self.shared.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stopped());
        }
        let tx = self.tx.as_ref().expect("sender lives until finish");
        let order = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tx.send((order, job)).map_err(|_| stopped())
    }

    /// Queue a whole file; fails when a writer thread has stopped on an error.
    pub fn send(&self, job: FileJob) -> Result<()> {
        self.queue(Job::File(job))
    }

    /// Start a streamed file (see [`DumpWriter::stream_file`]); its rows go to
    /// [`send_rows`](Self::send_rows).
    pub fn stream_file(
        &self,
        prompt_id: &str,
        stem: &str,
        positions: &[usize],
        taps: &[(String, TapDType, usize)],
    ) -> Result<Arc<FileStream>> {
        let mut stream = self.shared.writer.stream_file(prompt_id, stem, positions, taps)?;
        stream.order = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Arc::new(stream))
    }

    /// An empty buffer for [`send_rows`](Self::send_rows), reused when one is spare.
    pub fn buffer(&self) -> Vec<u8> {
        self.shared
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_default()
    }

    /// Queue rows `first_row..` of tap `tap` of `stream`.
    pub fn send_rows(&self, stream: &Arc<FileStream>, tap: usize, first_row: usize, bytes: RowBytes) -> Result<()> {
        self.queue(Job::Rows {
            stream: stream.clone(),
            tap,
            first_row,
            bytes,
        })
    }

    /// Wait for queued files, then mark the manifest complete, or failed with the engine's
    /// error and the last tap that reached the disk. Returns the first error.
    pub fn finish(self, outcome: Result<()>) -> Result<()> {
        self.finish_with_tokens(outcome, Vec::new())
    }

    /// As [`finish`](Self::finish), first recording the tokens each prompt processed
    /// (prompt and generated), in manifest order, for as many prompts as ran.
    pub fn finish_with_tokens(self, outcome: Result<()>, tokens: Vec<Vec<u32>>) -> Result<()> {
        let Self {
            tx, handles, shared, ..
        } = self;
        drop(tx);
        let mut result = Ok(());
        for handle in handles {
            let r = handle
                .join()
                .map_err(|_| Error::engine("a dump writer thread panicked"))?;
            if result.is_ok() {
                result = r;
            }
        }
        let shared = Arc::try_unwrap(shared).map_err(|_| Error::engine("a dump writer thread outlived the dump"))?;
        if let (Ok(()), Some(lost)) = (&result, shared.lost.into_inner().unwrap_or(None)) {
            result = Err(lost);
        }
        let last_written = shared
            .last_written
            .into_inner()
            .unwrap_or(None)
            .map(|(_, prompt, tap)| (prompt, tap));
        let mut writer = shared.writer;
        for (p, t) in writer.manifest.prompts.iter_mut().zip(tokens) {
            p.tokens = t;
        }
        let failure = match (outcome, result) {
            (Ok(()), Ok(())) => None,
            (Err(e), _) | (Ok(()), Err(e)) => Some(e),
        };
        match failure {
            None => writer.finish(Status::Complete, None),
            Some(e) => {
                let message = match &last_written {
                    Some((prompt, tap)) => format!("{e} (prompt {prompt}; last tap written: {tap})"),
                    None => format!("{e} (no tap was written)"),
                };
                let error = RunError {
                    message: e.to_string(),
                    tap: last_written.map(|(_, tap)| tap),
                    position: None,
                };
                writer.finish(Status::Failed, Some(error))?;
                Err(match e {
                    Error::Input(_) => Error::Input(message),
                    Error::Engine(_) => Error::Engine(message),
                })
            }
        }
    }
}
