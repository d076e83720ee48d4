//! The instrumented inference runtime (the device under test): host orchestration —
//! weights, preflight, chunked prefill, greedy decode, KV cache, taps, fault injection,
//! crash-tolerant dumps — over the ops of one [`Backend`]. The graph never changes with
//! the backend; `cpu` lives in `cpu.rs`, GPU backends slot in beside it.

pub mod backend;
pub mod cpu;
pub mod gpu;
pub use gpu::cuda;
#[cfg(feature = "hip")]
pub use gpu::hip;
pub mod perf;
pub mod selftest;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::dump::{BackgroundWriter, FileStream, PromptRecord, TapDType};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::{Config, Model};
use crate::sys::available_memory;
use crate::taps::{all_taps, LayerTap, PositionSpec, Selection, Tap};
use backend::{AttnShape, Backend, Row, Src, Step};

#[derive(Clone, Default)]
pub struct RunOptions {
    /// Prompt tokens per prefill step; `None` processes the whole prompt at once.
    pub prefill_chunk: Option<usize>,
    /// Greedy tokens generated (and processed) after the prompt.
    pub max_tokens: usize,
    /// Synchronize after every op so a device error names the op that caused it.
    pub sync_check: bool,
    /// Stop decoding after this token (end of sequence); dumps always run to
    /// `max_tokens` so every selected position exists.
    pub stop_token: Option<u32>,
    /// Untimed runs of each prompt first (no taps), so timings exclude one-time costs
    /// such as the lazy loading of GPU kernels.
    pub warmup: usize,
}

struct LayerWeights<B: Backend> {
    attn_norm: B::Buf,
    wq: B::Buf,
    wk: B::Buf,
    wv: B::Buf,
    wo: B::Buf,
    ffn_norm: B::Buf,
    wg: B::Buf,
    wu: B::Buf,
    wd: B::Buf,
}

pub struct Runtime<B: Backend> {
    backend: B,
    cfg: Config,
    token_embd: B::Buf,
    output_norm: B::Buf,
    output: B::Buf,
    layers: Vec<LayerWeights<B>>,
}

/// Checks that need no op to run: the sequence fits the context, and the weights, KV
/// cache and activations fit in memory. (Tensor presence, shapes, types and head
/// arithmetic are checked when the model opens.)
pub fn preflight(model: &Model, longest: usize, opts: &RunOptions, bytes_per_value: usize) -> Result<()> {
    let c = &model.config;
    let total = longest + opts.max_tokens;
    if total > c.n_ctx {
        return Err(Error::input(format!(
            "preflight: {longest} prompt tokens + {} generated = {total} positions exceed the model's context of {}",
            opts.max_tokens, c.n_ctx
        )));
    }
    if opts.prefill_chunk == Some(0) {
        return Err(Error::input("preflight: --prefill-chunk must be at least 1"));
    }
    let rows = opts.prefill_chunk.unwrap_or(longest).min(longest).max(1) as u64;
    let weights = model.n_params() * bytes_per_value as u64;
    let kv = 2 * (c.n_layer * total * c.kv_width()) as u64 * bytes_per_value as u64;
    let acts = rows * (6 * c.n_embd + 3 * c.n_ff + c.n_vocab) as u64 * 4;
    let need = weights + kv + acts;
    if let Some(avail) = available_memory() {
        if need > avail {
            return Err(Error::input(format!(
                "preflight: the run needs about {} MiB (weights {} MiB, KV cache {} MiB for {total} positions, activations {} MiB) but {} MiB are available",
                need >> 20, weights >> 20, kv >> 20, acts >> 20, avail >> 20
            )));
        }
    }
    Ok(())
}

/// Where one prompt's selected tap rows go: each file is streamed to the dump as its
/// rows come off the device, and lands whole when the last of them is written.
struct TapCollector<'a> {
    selection: &'a Selection,
    cfg: &'a Config,
    positions: Vec<usize>,
    /// `None` for runs that dump nothing.
    writer: Option<&'a BackgroundWriter>,
    prompt_id: &'a str,
    dtype: TapDType,
    /// Per file stem: its stream and, per tap of it, the rows sent so far.
    streams: BTreeMap<String, (Arc<FileStream>, Vec<usize>)>,
    sync_check: bool,
}

impl<'a> TapCollector<'a> {
    fn wants(&self, tap: &Tap) -> bool {
        match tap {
            Tap::Layer(l, _) if *l >= self.cfg.n_layer => false,
            t => self.writer.is_some() && self.selection.wants(t),
        }
    }

    /// Rows of the chunk `[start, start + rows)` that are selected, as (row in chunk).
    fn rows_in(&self, start: usize, rows: usize) -> Vec<usize> {
        let lo = self.positions.partition_point(|&p| p < start);
        let hi = self.positions.partition_point(|&p| p < start + rows);
        self.positions[lo..hi].iter().map(|p| p - start).collect()
    }

    /// Send the elements `runs` (offset, length) of `buf` — the selected rows of `tap`
    /// from position `start` on — to its file (started on first use, with every selected
    /// tap of the file).
    fn capture<B: Backend>(
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
        let stem = tap.file_stem().to_string();
        if !self.streams.contains_key(&stem) {
            let taps: Vec<(String, TapDType, usize)> = all_taps(self.cfg.n_layer)
                .into_iter()
                .filter(|t| t.file_stem() == tap.file_stem() && self.wants(t))
                .map(|t| (t.id(), self.dtype, t.width(self.cfg)))
                .collect();
            let stream = writer.stream_file(self.prompt_id, &stem, &self.positions, &taps)?;
            self.streams.insert(stem.clone(), (stream, vec![0; taps.len()]));
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
    fn check_complete(&self) -> Result<()> {
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

impl<B: Backend> Runtime<B> {
    pub fn load(backend: B, model: &Model, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let up = |name: &str| -> Result<B::Buf> {
            let info = model.weight(name)?;
            let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
            backend.upload_weight(name, info.dtype, &dims, model.weight_data(info))
        };
        let token_embd = up("token_embd.weight")?;
        let output_norm = up("output_norm.weight")?;
        let output = up("output.weight")?;
        let mut layers = Vec::with_capacity(model.config.n_layer);
        for l in 0..model.config.n_layer {
            let w = |n: &str| up(&format!("blk.{l}.{n}.weight"));
            layers.push(LayerWeights {
                attn_norm: w("attn_norm")?,
                wq: w("attn_q")?,
                wk: w("attn_k")?,
                wv: w("attn_v")?,
                wo: w("attn_output")?,
                ffn_norm: w("ffn_norm")?,
                wg: w("ffn_gate")?,
                wu: w("ffn_up")?,
                wd: w("ffn_down")?,
            });
            on_layer(l);
        }
        backend.sync()?;
        crate::trace::mark(|| format!("{}: weights loaded", backend.name()));
        Ok(Self {
            backend,
            cfg: model.config.clone(),
            token_embd,
            output_norm,
            output,
            layers,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Run one op; with `sync_check`, synchronize right after so an error names it.
    fn op(&self, name: &str, sync_check: bool, r: Result<()>) -> Result<()> {
        // GPU ops run asynchronously: without sync checks a device error shows at a later call.
        let hint = if sync_check || self.backend.name() == "cpu" {
            ""
        } else {
            " (--sync-check names the op that caused a device error)"
        };
        let named = |e: Error| Error::engine(format!("{} {name} failed: {e}{hint}", self.backend.name()));
        r.map_err(named)?;
        if sync_check {
            self.backend.sync().map_err(named)?;
        }
        Ok(())
    }

    /// Apply injected faults and capture selected rows of a `[rows, width]` buffer.
    #[allow(clippy::too_many_arguments)]
    fn tap(
        &self,
        id: &str,
        buf: &mut B::Buf,
        start: usize,
        rows: usize,
        width: usize,
        faults: &RuntimeFaults,
        col: &mut TapCollector,
        route: &mut TapRoute<B>,
        opts: &RunOptions,
    ) -> Result<()> {
        for f in faults.taps.iter().filter(|f| f.tap_id == id) {
            let from_row = f.from.saturating_sub(start);
            if from_row < rows {
                self.op(
                    &format!("perturb({id})"),
                    opts.sync_check,
                    self.backend.perturb(buf, rows, width, from_row, f.fault),
                )?;
            }
        }
        if let Some(crash) = faults.crash.iter().find(|c| c.0 == id && c.1 < start + rows) {
            // A real out-of-bounds request to the backend, so the crash path is the one a
            // device error takes.
            let mut empty = self.backend.alloc(0)?;
            self.op(
                &format!("{id} (injected out-of-bounds write at position {})", crash.1),
                opts.sync_check,
                self.backend.copy_rows(buf, &mut empty, Row::At(1), rows, width),
            )?;
        }
        let tap = Tap::parse(id).expect("the graph names canonical taps");
        if !col.wants(&tap) {
            return Ok(());
        }
        match route {
            TapRoute::Stage { buffers, selected } => {
                if *selected {
                    let staged = buffers
                        .get_mut(id)
                        .expect("a decode tap buffer exists for every wanted tap");
                    self.op(
                        &format!("stage({id})"),
                        opts.sync_check,
                        self.backend.copy_rows(buf, staged, Row::StepSlot, 1, width),
                    )?;
                }
            }
            TapRoute::Download => {
                let sel = col.rows_in(start, rows);
                if sel.is_empty() {
                    return Ok(());
                }
                // One copy per run of consecutive rows: a device copy per row would dominate.
                let runs: Vec<(usize, usize)> = crate::taps::consecutive_runs(&sel)
                    .map(|run| (sel[run.start] * width, run.len() * width))
                    .collect();
                self.op(
                    &format!("capture of {id}"),
                    opts.sync_check,
                    col.capture(&self.backend, &tap, start, buf, &runs),
                )?;
            }
        }
        Ok(())
    }

    /// Embedding and layers for positions `start..start + rows`, leaving the residual
    /// stream in `ws.x`. Prefill chunks take `ids` from the host; a decode step (tap route
    /// `Stage`) takes its token and position from the step record, so that the same ops
    /// can be recorded once and replayed.
    #[allow(clippy::too_many_arguments)]
    fn layers(
        &self,
        ids: &[u32],
        start: usize,
        ws: &mut Workspace<B>,
        kv: &mut [(B::Buf, B::Buf)],
        faults: &RuntimeFaults,
        col: &mut TapCollector,
        route: &mut TapRoute<B>,
        opts: &RunOptions,
    ) -> Result<()> {
        let c = &self.cfg;
        let b = &self.backend;
        let sc = opts.sync_check;
        let rows = ids.len();
        let decode = matches!(route, TapRoute::Stage { .. });
        let (e, qw, kvw, ff) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff);
        let Workspace {
            x,
            h,
            q,
            k,
            v,
            attn,
            ao,
            mid,
            g,
            u,
            act,
            f,
            keep,
            ..
        } = ws;
        self.op(
            "embed",
            sc,
            b.embed(&self.token_embd, e, if decode { Src::Step } else { Src::Host(ids) }, x),
        )?;
        self.tap("embed", x, start, rows, e, faults, col, route, opts)?;
        if let Some(cp) = keep.first_mut() {
            self.op("checkpoint", sc, b.copy_rows(x, cp, Row::At(start), rows, e))?;
        }
        let true_positions: Vec<f32> = (start..start + rows).map(|p| p as f32).collect();
        // A dump without decoding or an output tap cannot see layers past the last tapped
        // one: stop there, as the reference does (`run` always computes everything).
        let want_out = col.wants(&Tap::FinalNorm) || col.wants(&Tap::Logits);
        let depth = if !decode && col.writer.is_some() && opts.max_tokens == 0 && !want_out {
            (0..c.n_layer)
                .rev()
                .find(|&l| LayerTap::ALL.into_iter().any(|t| col.wants(&Tap::Layer(l, t))))
                .map_or(0, |l| l + 1)
        } else {
            c.n_layer
        };
        let kv_row = if decode { Row::StepPos } else { Row::At(start) };
        for (l, w) in self.layers.iter().enumerate().take(depth) {
            let id = |t: &str| format!("blk.{l}.{t}");
            let shifted: Vec<f32>;
            let rope_positions = match faults.rope.iter().find(|r| r.layer.is_none_or(|x| x == l)) {
                Some(r) if start + rows > r.from => {
                    shifted = (start..start + rows)
                        .map(|p| r.rotated_position(p).unwrap_or(p as f64) as f32)
                        .collect();
                    Src::Host(&shifted)
                }
                _ if decode => Src::Step,
                _ => Src::Host(&true_positions),
            };
            // Fused ops where no injected fault sits between the ops they fuse.
            let touched =
                |t: &str| faults.taps.iter().any(|f| f.tap_id == id(t)) || faults.crash.iter().any(|c| c.0 == id(t));
            let (base, eps) = (c.rope_base as f32, c.rms_eps as f32);
            self.op("rms_norm (attn)", sc, b.rms_norm(x, &w.attn_norm, rows, e, eps, h))?;
            self.tap(&id("attn_norm"), h, start, rows, e, faults, col, route, opts)?;
            self.op(
                "matmul q, k, v",
                sc,
                b.matmul3(
                    h,
                    [&w.wq, &w.wk, &w.wv],
                    rows,
                    e,
                    [qw, kvw, kvw],
                    [&mut *q, &mut *k, &mut *v],
                ),
            )?;
            let (kc, vc) = &mut kv[l];
            let shape = AttnShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: c.head_dim(),
                first_pos: start,
                rows,
                from_step: decode,
            };
            let fuse_append = !touched("k") && !touched("v");
            if fuse_append {
                self.op(
                    "rope q, k and kv append",
                    sc,
                    b.rope_append(q, k, v, kc, vc, shape, rope_positions, base),
                )?;
            } else {
                self.op("rope q", sc, b.rope(q, c.n_head, c.head_dim(), rope_positions, base))?;
                self.op("rope k", sc, b.rope(k, c.n_head_kv, c.head_dim(), rope_positions, base))?;
            }
            self.tap(&id("q"), q, start, rows, qw, faults, col, route, opts)?;
            self.tap(&id("k"), k, start, rows, kvw, faults, col, route, opts)?;
            self.tap(&id("v"), v, start, rows, kvw, faults, col, route, opts)?;
            if !fuse_append {
                self.op("kv append k", sc, b.copy_rows(k, kc, kv_row, rows, kvw))?;
                self.op("kv append v", sc, b.copy_rows(v, vc, kv_row, rows, kvw))?;
            }
            self.op("attention", sc, b.attention(q, kc, vc, shape, attn))?;
            self.tap(&id("attn"), attn, start, rows, qw, faults, col, route, opts)?;
            self.op("matmul attn_output", sc, b.matmul(attn, &w.wo, rows, qw, e, ao))?;
            self.tap(&id("attn_out"), ao, start, rows, e, faults, col, route, opts)?;
            if touched("resid_mid") {
                self.op("add (attention residual)", sc, b.add(x, ao, rows * e, mid))?;
                self.tap(&id("resid_mid"), mid, start, rows, e, faults, col, route, opts)?;
                self.op("rms_norm (ffn)", sc, b.rms_norm(mid, &w.ffn_norm, rows, e, eps, h))?;
            } else {
                self.op(
                    "add (attention residual) and rms_norm (ffn)",
                    sc,
                    b.add_rms_norm(x, ao, &w.ffn_norm, rows, e, eps, mid, h),
                )?;
                self.tap(&id("resid_mid"), mid, start, rows, e, faults, col, route, opts)?;
            }
            self.tap(&id("ffn_norm"), h, start, rows, e, faults, col, route, opts)?;
            if touched("ffn_gate") || touched("ffn_up") {
                self.op("matmul ffn_gate", sc, b.matmul(h, &w.wg, rows, e, ff, g))?;
                self.op("matmul ffn_up", sc, b.matmul(h, &w.wu, rows, e, ff, u))?;
                self.tap(&id("ffn_gate"), g, start, rows, ff, faults, col, route, opts)?;
                self.tap(&id("ffn_up"), u, start, rows, ff, faults, col, route, opts)?;
                self.op("silu_mul", sc, b.silu_mul(g, u, rows * ff, act))?;
            } else {
                self.op(
                    "matmul ffn_gate, ffn_up and silu_mul",
                    sc,
                    b.gate_up_silu(h, &w.wg, &w.wu, rows, e, ff, g, u, act),
                )?;
                self.tap(&id("ffn_gate"), g, start, rows, ff, faults, col, route, opts)?;
                self.tap(&id("ffn_up"), u, start, rows, ff, faults, col, route, opts)?;
            }
            self.tap(&id("ffn_act"), act, start, rows, ff, faults, col, route, opts)?;
            self.op("matmul ffn_down", sc, b.matmul(act, &w.wd, rows, ff, e, f))?;
            self.tap(&id("ffn_out"), f, start, rows, e, faults, col, route, opts)?;
            self.op("add (ffn residual)", sc, b.add(mid, f, rows * e, x))?;
            self.tap(&id("resid_post"), x, start, rows, e, faults, col, route, opts)?;
            if let Some(cp) = keep.get_mut(l + 1) {
                self.op("checkpoint", sc, b.copy_rows(x, cp, Row::At(start), rows, e))?;
            }
        }
        Ok(())
    }

    /// The output head on the rows of `ws.x` someone needs — tapped ones and, with
    /// `want_next`, the last — returning the greedy next token when asked.
    #[allow(clippy::too_many_arguments)]
    fn head(
        &self,
        start: usize,
        rows: usize,
        ws: &mut Workspace<B>,
        faults: &RuntimeFaults,
        col: &mut TapCollector,
        opts: &RunOptions,
        want_next: bool,
    ) -> Result<Option<u32>> {
        let c = &self.cfg;
        let b = &self.backend;
        let sc = opts.sync_check;
        let e = c.n_embd;
        let want_out = col.wants(&Tap::FinalNorm) || col.wants(&Tap::Logits);
        let mut need: Vec<usize> = if want_out { col.rows_in(start, rows) } else { Vec::new() };
        if want_next && need.last() != Some(&(rows - 1)) {
            need.push(rows - 1);
        }
        if need.is_empty() {
            return Ok(None);
        }
        let n = need.len();
        if ws.head_rows < n {
            ws.normed = b.alloc(n * e)?;
            ws.logits = b.alloc(n * c.n_vocab)?;
            ws.head_rows = n;
        }
        let gathered;
        let hx = if n == rows {
            &ws.x
        } else {
            let mut rows_x = Vec::with_capacity(n * e);
            for &r in &need {
                rows_x.extend(b.download(&ws.x, r * e, e)?);
            }
            gathered = b.upload(&rows_x)?;
            &gathered
        };
        self.op(
            "rms_norm (output)",
            sc,
            b.rms_norm(hx, &self.output_norm, n, e, c.rms_eps as f32, &mut ws.normed),
        )?;
        self.op(
            "matmul output",
            sc,
            b.matmul(&ws.normed, &self.output, n, e, c.n_vocab, &mut ws.logits),
        )?;
        if want_out {
            // Rows of the head buffers are `need`; tap only the selected ones (the first
            // entries, the decode row may trail unselected).
            let sel = col.rows_in(start, rows).len();
            for (tap, buf, width) in [
                (Tap::FinalNorm, &mut ws.normed, e),
                (Tap::Logits, &mut ws.logits, c.n_vocab),
            ] {
                let tid = tap.id();
                for fl in faults.taps.iter().filter(|fl| fl.tap_id == tid) {
                    let from_row = need.iter().position(|&r| start + r >= fl.from).unwrap_or(n);
                    self.op(
                        &format!("perturb({tid})"),
                        sc,
                        b.perturb(buf, n, width, from_row, fl.fault),
                    )?;
                }
                if col.wants(&tap) && sel > 0 {
                    col.capture(b, &tap, start, buf, &[(0, sel * width)])?;
                }
            }
        }
        if want_next {
            return Ok(Some(b.argmax(&ws.logits, n - 1, c.n_vocab)?));
        }
        Ok(None)
    }

    /// One decode step at `pos`: its layers replayed from a recording when the backend
    /// can record and nothing about the step's ops differs from the recorded one, else
    /// issued op by op.
    #[allow(clippy::too_many_arguments)]
    fn decode_layers(
        &self,
        token: u32,
        pos: usize,
        ws: &mut Workspace<B>,
        kv: &mut [(B::Buf, B::Buf)],
        faults: &RuntimeFaults,
        col: &mut TapCollector,
        staged: &mut Staged<B>,
        opts: &RunOptions,
    ) -> Result<()> {
        let slot = staged.positions.binary_search(&pos).ok();
        self.backend.set_step(Step {
            token,
            pos,
            rope_pos: pos as f32,
            slot: slot.unwrap_or(0),
        })?;
        let mut route = TapRoute::Stage {
            buffers: &mut staged.buffers,
            selected: slot.is_some(),
        };
        // The ops of a step depend on the position only through the step record, except
        // where an injected fault starts acting.
        let key: Vec<bool> = faults
            .taps
            .iter()
            .map(|f| pos >= f.from)
            .chain([slot.is_some()])
            .collect();
        let recordable = staged.record && faults.rope.iter().all(|r| pos < r.from);
        if recordable && staged.graph.as_ref().is_none_or(|(k, _)| *k != key) {
            staged.graph = None;
            if self.backend.begin_record()? {
                let issued = self.layers(&[token], pos, ws, kv, faults, col, &mut route, opts);
                match (issued, self.backend.end_record()?) {
                    (Ok(()), Some(graph)) => staged.graph = Some((key.clone(), graph)),
                    // Something in the step cannot be recorded: issue ops from now on.
                    _ => staged.record = false,
                }
            } else {
                staged.record = false;
            }
        }
        match &staged.graph {
            Some((k, graph)) if recordable && *k == key => self.backend.replay(graph),
            _ => self.layers(&[token], pos, ws, kv, faults, col, &mut route, opts),
        }
    }

    /// `opts.warmup` untimed runs of a prompt with no taps.
    pub(crate) fn warm_up(&self, prompt: &PromptRecord, opts: &RunOptions) -> Result<()> {
        let none = Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        };
        for _ in 0..opts.warmup {
            self.run_prompt(prompt, &none, &RuntimeFaults::default(), opts, None, None, &mut || {})?;
        }
        Ok(())
    }

    /// Run one prompt (prefill, then greedy decode), sending taps to `writer` (none:
    /// nothing is captured). Returns every token processed and the seconds spent in
    /// prefill and in decode.
    /// With `keep`, the prefill leaves its residual stream there (prefix checkpoints).
    /// `on_step` follows each prefill chunk and decode step.
    #[allow(clippy::too_many_arguments)]
    pub fn run_prompt(
        &self,
        prompt: &PromptRecord,
        selection: &Selection,
        faults: &RuntimeFaults,
        opts: &RunOptions,
        writer: Option<&BackgroundWriter>,
        keep: Option<&mut Vec<B::Buf>>,
        on_step: &mut dyn FnMut(),
    ) -> Result<(Vec<u32>, f64, f64)> {
        // Timed from here, the KV cache included, as a dump times its runs.
        let t0 = std::time::Instant::now();
        let c = &self.cfg;
        let b = &self.backend;
        let total = prompt.tokens.len() + opts.max_tokens;
        let positions = selection
            .positions
            .resolve(total)
            .map_err(|e| Error::input(format!("prompt {}: {e}", prompt.id)))?;
        let mut col = TapCollector {
            selection,
            cfg: c,
            positions,
            writer,
            prompt_id: &prompt.id,
            dtype: b.dtype().tap_dtype(),
            streams: BTreeMap::new(),
            sync_check: opts.sync_check,
        };
        let mut kv = (0..c.n_layer)
            .map(|_| Ok((b.alloc(total * c.kv_width())?, b.alloc(total * c.kv_width())?)))
            .collect::<Result<Vec<_>>>()?;
        let chunk = opts.prefill_chunk.unwrap_or(prompt.tokens.len()).max(1);
        let mut tokens = prompt.tokens.clone();
        let mut next = None;
        let n_chunks = prompt.tokens.len().div_ceil(chunk);
        let mut ws = Workspace::new(b, c, chunk.min(prompt.tokens.len()))?;
        if keep.is_some() {
            ws.keep = (0..=c.n_layer)
                .map(|_| b.alloc(prompt.tokens.len() * c.n_embd))
                .collect::<Result<_>>()?;
        }
        for (i, ids) in prompt.tokens.chunks(chunk).enumerate() {
            let want_next = i + 1 == n_chunks && opts.max_tokens > 0;
            self.layers(
                ids,
                i * chunk,
                &mut ws,
                &mut kv,
                faults,
                &mut col,
                &mut TapRoute::Download,
                opts,
            )?;
            next = self.head(i * chunk, ids.len(), &mut ws, faults, &mut col, opts, want_next)?;
            on_step();
        }
        b.sync()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        if let Some(keep) = keep {
            *keep = std::mem::take(&mut ws.keep);
        }
        if opts.max_tokens > 0 {
            drop(ws);
            let mut ws = Workspace::new(b, c, 1)?;
            let mut staged = Staged::new(
                self,
                &col,
                prompt.tokens.len(),
                !opts.sync_check && faults.crash.is_empty(),
            )?;
            for step in 0..opts.max_tokens {
                let token = next.ok_or_else(|| Error::engine("decode: no next token"))?;
                tokens.push(token);
                if opts.stop_token == Some(token) && col.writer.is_none() {
                    break;
                }
                let pos = tokens.len() - 1;
                self.decode_layers(token, pos, &mut ws, &mut kv, faults, &mut col, &mut staged, opts)?;
                next = self.head(pos, 1, &mut ws, faults, &mut col, opts, step + 1 < opts.max_tokens)?;
                on_step();
            }
            // The decode rows of every tap come off the device at once, completing the files.
            if let Some(&first) = staged.positions.first() {
                for (id, buf) in &staged.buffers {
                    let tap = Tap::parse(id).expect("staged taps are canonical");
                    col.capture(b, &tap, first, buf, &[(0, staged.positions.len() * tap.width(c))])?;
                }
            }
        }
        col.check_complete()?;
        b.sync()?;
        Ok((tokens, prefill_s, t0.elapsed().as_secs_f64() - prefill_s))
    }
}

/// Activation buffers for chunks of up to `rows` rows, reused from chunk to chunk: a
/// recorded decode step needs them at the same addresses every time.
struct Workspace<B: Backend> {
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    ao: B::Buf,
    mid: B::Buf,
    g: B::Buf,
    u: B::Buf,
    act: B::Buf,
    f: B::Buf,
    /// Output head buffers, grown to the most rows the head has needed.
    normed: B::Buf,
    logits: B::Buf,
    head_rows: usize,
    /// When a run keeps checkpoints: the residual stream of every position after
    /// embedding (`keep[0]`) and after each layer (`keep[l + 1]`); empty otherwise.
    keep: Vec<B::Buf>,
}

impl<B: Backend> Workspace<B> {
    fn new(b: &B, c: &Config, rows: usize) -> Result<Self> {
        let (e, qw, kvw, ff) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff);
        Ok(Self {
            x: b.alloc(rows * e)?,
            h: b.alloc(rows * e)?,
            q: b.alloc(rows * qw)?,
            k: b.alloc(rows * kvw)?,
            v: b.alloc(rows * kvw)?,
            attn: b.alloc(rows * qw)?,
            ao: b.alloc(rows * e)?,
            mid: b.alloc(rows * e)?,
            g: b.alloc(rows * ff)?,
            u: b.alloc(rows * ff)?,
            act: b.alloc(rows * ff)?,
            f: b.alloc(rows * e)?,
            normed: b.alloc(0)?,
            logits: b.alloc(0)?,
            head_rows: 0,
            keep: Vec::new(),
        })
    }
}

/// Where a chunk's selected tap rows go.
enum TapRoute<'s, B: Backend> {
    /// Downloaded now (prefill chunks).
    Download,
    /// Copied on the device into the decode tap buffers at the step's slot: a decode step
    /// never waits for the host, so it can be recorded and replayed.
    Stage {
        buffers: &'s mut BTreeMap<String, B::Buf>,
        selected: bool,
    },
}

/// Decode state that outlives a step: the device buffers collecting the decode rows of
/// each wanted tap, and the recorded step.
struct Staged<B: Backend> {
    /// Selected positions past the prompt; a step's slot is its index here.
    positions: Vec<usize>,
    buffers: BTreeMap<String, B::Buf>,
    /// Whether steps may be recorded (off under sync checks, crash injection, or once
    /// recording failed).
    record: bool,
    graph: Option<(Vec<bool>, B::Graph)>,
}

impl<B: Backend> Staged<B> {
    fn new(rt: &Runtime<B>, col: &TapCollector, prompt_len: usize, record: bool) -> Result<Self> {
        let positions: Vec<usize> = col.positions.iter().copied().filter(|&p| p >= prompt_len).collect();
        let mut buffers = BTreeMap::new();
        if !positions.is_empty() {
            let c = &rt.cfg;
            let taps =
                std::iter::once(Tap::Embed).chain((0..c.n_layer).flat_map(|l| LayerTap::ALL.map(|t| Tap::Layer(l, t))));
            for tap in taps.filter(|t| col.wants(t)) {
                buffers.insert(tap.id(), rt.backend.alloc(positions.len() * tap.width(c))?);
            }
        }
        Ok(Self {
            positions,
            buffers,
            record,
            graph: None,
        })
    }
}

impl<B: Backend> Runtime<B> {
    /// Write the dump of `prompt` with `selection` from `stream`, the residual stream
    /// (after embedding, after each layer) of a run over tokens it is a prefix of; the
    /// selection asks only for `embed` and `resid_post` rows.
    pub(crate) fn serve(
        &self,
        stream: &[B::Buf],
        prompt: &PromptRecord,
        selection: &Selection,
        writer: &BackgroundWriter,
    ) -> Result<()> {
        let positions = selection
            .positions
            .resolve(prompt.tokens.len())
            .map_err(|e| Error::input(format!("prompt {}: {e}", prompt.id)))?;
        let mut col = TapCollector {
            selection,
            cfg: &self.cfg,
            positions,
            writer: Some(writer),
            prompt_id: &prompt.id,
            dtype: self.backend.dtype().tap_dtype(),
            streams: BTreeMap::new(),
            sync_check: false,
        };
        let e = self.cfg.n_embd;
        for (tap, buf) in std::iter::once(Tap::Embed)
            .chain((0..self.cfg.n_layer).map(|l| Tap::Layer(l, LayerTap::ResidPost)))
            .zip(stream)
        {
            if !col.wants(&tap) {
                continue;
            }
            let runs: Vec<(usize, usize)> = crate::taps::consecutive_runs(&col.positions)
                .map(|run| (col.positions[run.start] * e, run.len() * e))
                .collect();
            col.capture(&self.backend, &tap, 0, buf, &runs)?;
        }
        col.check_complete()
    }
}

/// Which backend runs the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    /// NVIDIA GPU 0 (CUDA, NVRTC and cuBLAS loaded at run time).
    Cuda,
    /// AMD GPU 0 (builds with `--features hip`).
    Hip,
}

/// Evaluate `$body` with `$b` bound to a new backend of `$kind` storing `$dtype`
/// (monomorphized per backend and storage type).
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, $dtype:expr, |$b:ident| $body:expr) => {{
        use $crate::runtime::backend::StorageDType as __D;
        use $crate::runtime::BackendKind as __K;
        match ($kind, $dtype) {
            (__K::Cpu, d) => {
                let $b = $crate::runtime::cpu::CpuBackend::new(d);
                $body
            }
            (__K::Cuda, __D::F32) => {
                let $b = $crate::runtime::cuda::CudaBackend::<f32>::new(0)?;
                $body
            }
            (__K::Cuda, __D::F16) => {
                let $b = $crate::runtime::cuda::CudaBackend::<half::f16>::new(0)?;
                $body
            }
            (__K::Cuda, __D::BF16) => {
                let $b = $crate::runtime::cuda::CudaBackend::<half::bf16>::new(0)?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::F32) => {
                let $b = $crate::runtime::hip::HipBackend::<f32>::new()?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::F16) => {
                let $b = $crate::runtime::hip::HipBackend::<half::f16>::new()?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::BF16) => {
                let $b = $crate::runtime::hip::HipBackend::<half::bf16>::new()?;
                $body
            }
            #[cfg(not(feature = "hip"))]
            (__K::Hip, _) => {
                return Err($crate::Error::input(
                    "--backend hip: this resbisect was built without the hip feature (cargo build --features hip)",
                ))
            }
        }
    }};
}
