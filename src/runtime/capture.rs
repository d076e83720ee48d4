//! Tap capture: which rows of which taps a prompt's run records, and how they reach the
//! dump — streamed file by file as prefill chunks come off the device, or staged on the
//! device through decode and downloaded once.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::backend::{self, Backend};
use super::Runtime;
use crate::dump::{BackgroundWriter, FileStream, TapDType};
use crate::error::{Error, Result};
use crate::model::Config;
use crate::taps::{all_taps, FileStem, LayerTap, Selection, Tap};

/// Where one prompt's selected tap rows go: each file is streamed to the dump as its
/// rows come off the device, and lands whole when the last of them is written.
pub(super) struct TapCollector<'a> {
    pub(super) selection: &'a Selection,
    pub(super) cfg: &'a Config,
    pub(super) positions: Vec<usize>,
    /// `None` for runs that dump nothing.
    pub(super) writer: Option<&'a BackgroundWriter>,
    pub(super) prompt_id: &'a str,
    pub(super) dtype: TapDType,
    /// Per file stem: its stream and, per tap of it, the rows sent so far.
    pub(super) streams: BTreeMap<FileStem, (Arc<FileStream>, Vec<usize>)>,
    pub(super) sync_check: bool,
}

impl<'a> TapCollector<'a> {
    /// Whether `tap` is captured: selected, and a tap this model has (a selection of
    /// `all` names Gemma's post-norm taps in a llama model too), so that prefill streams,
    /// decode staging and the pass depth agree on one set.
    pub(super) fn wants(&self, tap: &Tap) -> bool {
        match tap {
            Tap::Layer(l, _) if *l >= self.cfg.n_layer => false,
            t => self.writer.is_some() && t.in_model(self.cfg) && self.selection.wants(t),
        }
    }

    /// Whether either output-head tap is wanted.
    pub(super) fn wants_output(&self) -> bool {
        self.wants(&Tap::FinalNorm) || self.wants(&Tap::Logits)
    }

    /// Rows of the chunk `[start, start + rows)` that are selected, as (row in chunk).
    pub(super) fn rows_in(&self, start: usize, rows: usize) -> Vec<usize> {
        let lo = self.positions.partition_point(|&p| p < start);
        let hi = self.positions.partition_point(|&p| p < start + rows);
        self.positions[lo..hi].iter().map(|p| p - start).collect()
    }

    /// Send the elements `runs` (offset, length) of `buf` — the selected rows of `tap`
    /// from position `start` on — to its file (started on first use, with every selected
    /// tap of the file).
    pub(super) fn capture<B: Backend>(
        &mut self,
        backend: &B,
        tap: &Tap,
        start: usize,
        buf: &B::Buf,
        runs: &[(usize, usize)],
    ) -> Result<()> {
        let Some(writer) = self.writer else { return Ok(()) };
        // Under sync checks every tap is off the device before the next op, so a device
        // error leaves every tap before the failing op on disk.
        let bytes = if self.sync_check {
            backend::download_rows_now(backend, buf, runs, writer.buffer())?
        } else {
            backend.download_rows(buf, runs, writer.buffer())?
        };
        let stem = tap.file_stem();
        if !self.streams.contains_key(&stem) {
            let taps: Vec<(String, TapDType, usize)> = all_taps(self.cfg.n_layer)
                .into_iter()
                .filter(|t| t.file_stem() == stem && self.wants(t))
                .map(|t| (t.id(), self.dtype, t.width(self.cfg)))
                .collect();
            let stream = writer.stream_file(self.prompt_id, &stem.to_string(), &self.positions, &taps)?;
            self.streams.insert(stem, (stream, vec![0; taps.len()]));
        }
        let (stream, sent) = self.streams.get_mut(&stem).expect("started above");
        let id = tap.id();
        let index = stream
            .tap_ids()
            .position(|t| t == id)
            .expect("streams hold every selected tap of their file");
        sent[index] += runs.iter().map(|r| r.1).sum::<usize>() / tap.width(self.cfg);
        writer.send_rows(stream, index, self.positions.partition_point(|&p| p < start), bytes)
    }

    /// Every selected row of every started file was sent (a missing one is a bug here).
    pub(super) fn check_complete(&self) -> Result<()> {
        for (stem, (stream, sent)) in &self.streams {
            if let Some((id, n)) = stream.tap_ids().zip(sent).find(|(_, &n)| n != self.positions.len()) {
                return Err(Error::engine(format!(
                    "{stem}: {id} got {n} of {} rows",
                    self.positions.len()
                )));
            }
        }
        Ok(())
    }
}

/// Where a pass's selected tap rows go.
pub(super) enum TapRoute<'s, B: Backend> {
    /// Downloaded now (prefill chunks).
    Download,
    /// Copied on the device into the decode tap buffers at the step's slot: a decode step
    /// never waits for the host, so it can be recorded and replayed.
    Stage {
        buffers: &'s mut BTreeMap<Tap, B::Buf>,
        selected: bool,
    },
}

/// Decode state that outlives a step: the device buffers collecting the decode rows of
/// each wanted tap, and the recorded step.
pub(super) struct Staged<B: Backend> {
    /// Selected positions past the prompt; a step's slot is its index here.
    pub(super) positions: Vec<usize>,
    pub(super) buffers: BTreeMap<Tap, B::Buf>,
    /// Whether steps may be recorded (off under sync checks, crash injection, or once
    /// recording failed).
    pub(super) record: bool,
    /// The recorded step and the fault key it was recorded under.
    pub(super) graph: Option<(Vec<bool>, B::Graph)>,
}

impl<B: Backend> Staged<B> {
    pub(super) fn new(rt: &Runtime<B>, col: &TapCollector, prompt_len: usize, record: bool) -> Result<Self> {
        let positions: Vec<usize> = col.positions.iter().copied().filter(|&p| p >= prompt_len).collect();
        let mut buffers = BTreeMap::new();
        if !positions.is_empty() {
            let c = &rt.cfg;
            let layers = (0..c.n_layer).flat_map(|l| LayerTap::ALL.map(|t| Tap::Layer(l, t)));
            for tap in std::iter::once(Tap::Embed).chain(layers).filter(|t| col.wants(t)) {
                buffers.insert(tap, rt.backend.alloc(positions.len() * tap.width(c))?);
            }
        }
        Ok(Self {
            positions,
            buffers,
            record,
            graph: None,
        })
    }

    /// The decode rows of every tap come off the device at once, completing the files.
    pub(super) fn download(&self, backend: &B, col: &mut TapCollector) -> Result<()> {
        let Some(&first) = self.positions.first() else {
            return Ok(());
        };
        for (tap, buf) in &self.buffers {
            col.capture(
                backend,
                tap,
                first,
                buf,
                &[(0, self.positions.len() * tap.width(col.cfg))],
            )?;
        }
        Ok(())
    }
}
