//! The streamed coarse probe: both engines run the prompt chunk by chunk, each chunk's
//! rows are compared as soon as both wrote them, and the stream stops after the first
//! chunk where a coarse tap leaves tolerance (judged automatically, once the prefix also
//! shows what the whole prompt would be judged against, or both judgements agree on it). Engines that resume from their KV cache
//! compute each chunk's rows only; any other engine gets the prefix as its prompt. The
//! chunks' dumps are then joined into one dump per engine over the prefix run, as if one
//! run had written it, so that every later phase reads it like any probe.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::probe::{selection, ProbeRecord, ProbeResult, Rows, Session};
use super::readings::first_bad_position;
use crate::diff::{DiffReport, Judge, Judgement};
use crate::dump::{Dump, DumpWriter, Manifest, MappedFile, Status, TapTensor};
use crate::error::{Error, Result};
use crate::taps::PositionSpec;

/// Positions per chunk when both engines resume from their KV cache and one computes on
/// the host's cores: small enough that a divergence stops the stream soon after it, large
/// enough for efficient GEMMs on a CPU.
pub const HOST_CHUNK: usize = 128;

/// Positions per chunk when both engines resume and neither computes on the host: a GPU
/// runs 128 rows far below its throughput. Measured on an H200 (TinyLlama-1.1B shape,
/// two `cuda` runtimes at once, `RESBISECT_TRACE`): seven 128-row chunks to 896 tokens
/// took 0.39 s, two 512-row chunks to 1024 tokens 0.25 s; one engine computes all 1652
/// tokens in one run in 0.13 s.
pub const DEVICE_CHUNK: usize = 512;

/// The ends of the chunks a prompt of `n` tokens streams in. When both engines resume,
/// a chunk costs its own rows: every `step` positions. Otherwise (`step` None) each chunk
/// reruns its prefix, so the prefixes double from [`HOST_CHUNK`], keeping the total
/// within twice the last prefix.
pub fn chunk_ends(n: usize, step: Option<usize>) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut end = step.unwrap_or(HOST_CHUNK);
    while end < n {
        ends.push(end);
        end = step.map_or(2 * end, |step| end + step);
    }
    ends.push(n);
    ends
}

impl Session<'_> {
    /// The probe `purpose` of `layers` × `taps` over the prompt's first `n` tokens,
    /// streamed: chunks run until one diverges (judged by tolerance) and the prefix run
    /// so far is judged as the whole prompt would be, and the probe's comparison covers
    /// every position of that prefix. Returns the prefix and the comparison; after a
    /// crash, the crashed chunk's.
    ///
    /// Judged automatically, an error counts as systematic when it is over the noise
    /// floor on a quarter of the rows: a prefix that ends soon after the error's onset
    /// could not show it, so the stream goes on until the prefix is judged by the noise
    /// floor (more rows cannot undo that for an error that persists), or until both
    /// judgements name the same first divergence in the prefix, or the prompt ends.
    ///
    /// Where the chunks are prefixes run anew (an engine that does not resume), a first
    /// divergence on the first row of a later chunk or on the last row of a prefix shorter
    /// than the prompt may come from where the prompt ends rather than from the tokens: a
    /// row of a causal engine does not depend on it, but an engine that scales RoPE by
    /// the prompt's length or treats its last row apart does. The whole prompt then runs
    /// in one probe, which stands for the stream; the note says when its first divergence
    /// moved.
    pub(super) fn streamed_probe(
        &mut self,
        purpose: &str,
        layers: Vec<usize>,
        taps: &[&str],
        n: usize,
    ) -> Result<Streamed> {
        let resumed = self.a.resumes() && self.b.resumes();
        let on_host = self.a.computes_on_host() || self.b.computes_on_host();
        let step = resumed.then_some(if on_host { HOST_CHUNK } else { DEVICE_CHUNK });
        let ends = chunk_ends(n, step);
        let whole = |s: &mut Self, layers: Vec<usize>| s.probe(purpose, n, selection(layers, taps, &Rows::All, n));
        if ends.len() == 1 {
            return Ok(Streamed {
                prefix: n,
                result: whole(self, layers)?,
                boundary_note: None,
            });
        }
        let dir = self.probe_dir(purpose);
        // A forced judgement judges chunks too; an automatic one stops on tolerance.
        let chunk_judge = match self.judge {
            Judge::Auto => Judge::Tolerance,
            forced => forced,
        };
        let (mut parts, mut record) = (Vec::new(), None::<ProbeRecord>);
        let mut from = 0;
        for (k, &end) in ends.iter().enumerate() {
            let chunk_from = from;
            // An engine that runs each prefix anew runs the whole prompt in its last chunk:
            // that chunk dumps every row, and stands for the stream (no edge to check, no
            // rerun of the same prompt).
            let whole_last = !resumed && end == n;
            let rows_from = if whole_last { 0 } else { from };
            let sel = selection(layers.clone(), taps, &Rows::At((rows_from..end).collect()), end);
            let dirs = self.prepare(&dir.join(format!("chunk-{:02}", k + 1)), end)?;
            let (result, chunk) = self.run_probe(purpose, end, &sel, &dirs, chunk_judge)?;
            self.reproduce = self.reproduce_commands(&sel, &dirs);
            let mut sum = match record.take() {
                Some(r) => r.followed_by(chunk),
                None => chunk,
            };
            from = end;
            let diverged = match result {
                ProbeResult::Compared(r) => r.diverged,
                crashed @ ProbeResult::Crashed(..) => {
                    sum.finding = format!("chunk {} of {} failed", k + 1, ends.len());
                    self.probes.push(sum);
                    self.dirs.push(dirs.dir);
                    return Ok(Streamed {
                        prefix: end,
                        result: crashed,
                        boundary_note: None,
                    });
                }
            };
            parts.push(dirs.dir);
            if diverged || end == n {
                let t0 = Instant::now();
                let joined_parts = if whole_last { &parts[k..] } else { &parts[..] };
                let (joined, r) = self.join(purpose, joined_parts, &dir.join(format!("joined-{:02}", k + 1)), end)?;
                sum.seconds_diff += t0.elapsed().as_secs_f64();
                // An engine that ran other tokens than it was given is the finding: more rows
                // cannot undo it.
                let settled = end == n
                    || r.prompts.iter().any(|p| p.token_mismatch.is_some())
                    || self.judge != Judge::Auto
                    || r.prompts.iter().any(|p| p.judged == Judgement::NoiseFloor)
                    || self.floor_agrees(purpose, &joined, &r, end)?;
                if settled {
                    sum.positions = PositionSpec::all().to_string();
                    sum.dump_a = joined.join("a").display().to_string();
                    sum.dump_b = joined.join("b").display().to_string();
                    self.probes.push(sum);
                    self.dirs.push(joined);
                    let first = first_bad_position(&r);
                    if whole_last {
                        // Rows the shorter prefixes showed clean diverge in the whole prompt.
                        let boundary_note = first.filter(|&q| q < chunk_from).map(|q| {
                            format!(
                                "on the whole prompt of {n} tokens the first divergence is position {q}, which runs of \
                                 up to {chunk_from} tokens computed within tolerance: an engine's rows depend on \
                                 where its prompt ends (not causal; e.g. RoPE scaled by the prompt's length, a last \
                                 row computed apart, or a kernel or precision chosen by the number of rows), so the \
                                 search runs the whole prompt"
                            )
                        });
                        return Ok(Streamed {
                            prefix: end,
                            result: ProbeResult::Compared(r),
                            boundary_note,
                        });
                    }
                    let at_edge = first.filter(|&p| (p == chunk_from && k > 0) || (p + 1 == end && end < n));
                    let (Some(p), false) = (at_edge, resumed) else {
                        return Ok(Streamed {
                            prefix: end,
                            result: ProbeResult::Compared(r),
                            boundary_note: None,
                        });
                    };
                    // The first row of a chunk follows rows that an earlier, shorter run ended on.
                    let edge = if p == chunk_from {
                        format!("the row after the end of a run of {chunk_from} tokens")
                    } else {
                        format!("the last row of a run of {end} tokens")
                    };
                    if let Some(stream) = self.probes.last_mut() {
                        stream.finding = format!(
                            "first divergence at position {p}, {edge}: the whole prompt runs next, in case the \
                             engine's rows depend on where its prompt ends"
                        );
                    }
                    // The joined rows come from runs of other lengths: the whole prompt's run
                    // stands for them (in later lookups, and in the check of reruns).
                    self.dirs.pop();
                    let result = whole(self, layers)?;
                    let moved = match &result {
                        ProbeResult::Compared(w) => match first_bad_position(w) {
                            Some(q) if q == p => None,
                            Some(q) => Some(format!("position {q}")),
                            None => Some("none".to_string()),
                        },
                        ProbeResult::Crashed(..) => None,
                    };
                    let boundary_note = moved.map(|q| {
                        format!(
                            "the streamed probe's first divergence, position {p}, is {edge}, but on the whole \
                             prompt of {n} tokens it is {q}: an engine's rows depend on where \
                             its prompt ends (not causal; e.g. RoPE scaled by the prompt's length, a last row \
                             computed apart, or a kernel or precision chosen by the number of rows), so the search runs the whole prompt"
                        )
                    });
                    return Ok(Streamed {
                        prefix: n,
                        result,
                        boundary_note,
                    });
                }
            }
            record = Some(sum);
        }
        unreachable!("the last chunk ends the stream")
    }

    /// Whether the joined prefix at `joined`, judged against tolerance as `r`, finds its
    /// first divergence at the same tap and position when judged against the noise floor
    /// from the first tap on: then the whole prompt's judgement, whichever it is, cannot
    /// move the answer within the prefix, and the stream need not go on to learn it.
    fn floor_agrees(&self, purpose: &str, joined: &Path, r: &DiffReport, end: usize) -> Result<bool> {
        let floor = self.compare_measured(
            purpose,
            &joined.join("a"),
            &joined.join("b"),
            Judge::NoiseFloor,
            None,
            end,
        )?;
        let at = |r: &DiffReport| {
            r.prompts
                .iter()
                .map(|p| p.first.as_ref().map(|f| (f.tap.clone(), f.position)))
                .collect::<Vec<_>>()
        };
        Ok(at(r).iter().all(Option::is_some) && at(r) == at(&floor))
    }

    /// The chunk dumps `parts` joined into one dump per engine under `dir`, compared as
    /// the session judges (both engines given the prompt's first `end` tokens).
    fn join(&self, purpose: &str, parts: &[PathBuf], dir: &Path, end: usize) -> Result<(PathBuf, DiffReport)> {
        for side in ["a", "b"] {
            let chunks: Vec<PathBuf> = parts.iter().map(|p| p.join(side)).collect();
            join_chunks(&chunks, &self.prompt.id, &dir.join(side))?;
        }
        // The twin measured each chunk as it came: its joined rows would add nothing.
        let r = self.compare_measured(purpose, &dir.join("a"), &dir.join("b"), self.judge, None, end)?;
        Ok((dir.to_path_buf(), r))
    }
}

/// What a streamed probe ran and found.
pub(super) struct Streamed {
    /// The prefix of the prompt its comparison covers.
    pub prefix: usize,
    pub result: ProbeResult,
    /// Set when the whole prompt ran after a first divergence on a chunk's edge and put
    /// it elsewhere: later probes must not cut the prompt.
    pub boundary_note: Option<String>,
}

impl ProbeRecord {
    /// This record of the chunks so far, with the next chunk's run added.
    fn followed_by(self, next: ProbeRecord) -> ProbeRecord {
        ProbeRecord {
            seconds_a: self.seconds_a + next.seconds_a,
            seconds_b: self.seconds_b + next.seconds_b,
            seconds_diff: self.seconds_diff + next.seconds_diff,
            bytes_a: self.bytes_a + next.bytes_a,
            bytes_b: self.bytes_b + next.bytes_b,
            chunks: self.chunks + next.chunks,
            ..next
        }
    }
}

/// Join one engine's chunk dumps of prompt `prompt_id` (consecutive positions, each
/// over a longer prefix) into one dump at `out` over the last chunk's prefix: each file
/// holds the rows of every chunk, in order; a file or tap some chunk lacks is left out
/// (the comparison reports it missing).
fn join_chunks(chunks: &[PathBuf], prompt_id: &str, out: &Path) -> Result<()> {
    let dumps: Vec<Dump> = chunks.iter().map(|c| Dump::open(c)).collect::<Result<_>>()?;
    let last = &dumps.last().expect("at least one chunk").manifest;
    let mut sel = last.selection.clone();
    sel.positions = PositionSpec::all();
    let manifest = Manifest::new(last.engine.clone(), last.model.clone(), last.prompts.clone(), sel);
    let mut writer = DumpWriter::create(out, manifest, false)?;
    for stem in dumps[0].files(prompt_id)? {
        let files: Option<Vec<MappedFile>> = dumps
            .iter()
            .map(|d| d.map_file(prompt_id, &stem))
            .collect::<Result<_>>()?;
        let Some(files) = files else { continue };
        // An engine may write more rows than a chunk asked for (every row of its prefix):
        // each position is taken from the first chunk that holds it.
        let mut last = None;
        let keep: Vec<Vec<usize>> = files
            .iter()
            .map(|f| {
                let rows: Vec<usize> = (0..f.positions.len())
                    .filter(|&i| last.is_none_or(|l| f.positions[i] > l))
                    .collect();
                last = rows.last().map(|&i| f.positions[i]).or(last);
                rows
            })
            .collect();
        let positions: Vec<usize> = files
            .iter()
            .zip(&keep)
            .flat_map(|(f, rows)| rows.iter().map(|&i| f.positions[i]))
            .collect();
        let taps = files[0]
            .taps
            .keys()
            .filter(|id| files.iter().all(|f| f.taps.contains_key(*id)))
            .map(|id| joined_tap(&files, &keep, id))
            .collect::<Result<Vec<_>>>()?;
        writer.write_file(prompt_id, &stem, &positions, &taps)?;
    }
    writer.finish(Status::Complete, None)
}

/// Tap `id`'s rows `keep[f]` of every file `f`, in order.
fn joined_tap(files: &[MappedFile], keep: &[Vec<usize>], id: &str) -> Result<TapTensor> {
    let missing = || Error::engine(format!("{id}: a chunk of the stream has no such tap"));
    let first = files[0].tap(id).ok_or_else(missing)?;
    let mut bytes = Vec::new();
    let mut rows = 0;
    for (f, keep) in files.iter().zip(keep) {
        let view = f.tap(id).ok_or_else(missing)?;
        if (view.dtype, view.width) != (first.dtype, first.width) {
            return Err(Error::engine(format!(
                "{id}: chunks of one stream disagree on dtype or width"
            )));
        }
        let row_bytes = view.bytes.len() / view.rows.max(1);
        for &i in keep {
            bytes.extend_from_slice(&view.bytes[i * row_bytes..(i + 1) * row_bytes]);
        }
        rows += keep.len();
    }
    Ok(TapTensor {
        id: id.to_string(),
        dtype: first.dtype,
        rows,
        width: first.width,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_step_when_resumed_and_double_otherwise() {
        assert_eq!(chunk_ends(100, Some(HOST_CHUNK)), vec![100]);
        assert_eq!(chunk_ends(128, None), vec![128]);
        assert_eq!(chunk_ends(300, Some(HOST_CHUNK)), vec![128, 256, 300]);
        assert_eq!(chunk_ends(1652, None), vec![128, 256, 512, 1024, 1652]);
        let ends = chunk_ends(1652, Some(HOST_CHUNK));
        assert_eq!((ends.len(), ends[6], *ends.last().unwrap()), (13, 896, 1652));
        assert_eq!(chunk_ends(1652, Some(DEVICE_CHUNK)), vec![512, 1024, 1536, 1652]);
    }
}
