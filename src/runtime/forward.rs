//! The llama forward over the ops of one backend: layer weights, activation buffers, the
//! embedding, the blocks and the output head. Each runs over a [`Pass`], the context of
//! one prefill chunk or decode step: its rows, the faults it injects, where its taps go.

use super::backend::{AttnShape, Backend, Row, Src};
use super::capture::{TapCollector, TapRoute};
use super::weights::{self, Matrix};
use super::{RunOptions, Runtime};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::model::Config;
use crate::taps::{LayerTap, Tap};

pub(super) struct LayerWeights<B: Backend> {
    attn_norm: B::Buf,
    wq: Matrix<B>,
    wk: Matrix<B>,
    wv: Matrix<B>,
    wo: Matrix<B>,
    ffn_norm: B::Buf,
    wg: Matrix<B>,
    wu: Matrix<B>,
    wd: Matrix<B>,
}

impl<B: Backend> LayerWeights<B> {
    /// Layer `l`'s weights, each uploaded from its GGUF name: vectors by `up`, matrices
    /// by `mat`.
    pub(super) fn load(
        l: usize,
        up: &dyn Fn(&str) -> Result<B::Buf>,
        mat: &dyn Fn(&str) -> Result<Matrix<B>>,
    ) -> Result<Self> {
        let w = |n: &str| up(&format!("blk.{l}.{n}.weight"));
        let m = |n: &str| mat(&format!("blk.{l}.{n}.weight"));
        Ok(Self {
            attn_norm: w("attn_norm")?,
            wq: m("attn_q")?,
            wk: m("attn_k")?,
            wv: m("attn_v")?,
            wo: m("attn_output")?,
            ffn_norm: w("ffn_norm")?,
            wg: m("ffn_gate")?,
            wu: m("ffn_up")?,
            wd: m("ffn_down")?,
        })
    }
}

/// Activation buffers for chunks of up to `rows` rows, reused from chunk to chunk: a
/// recorded decode step needs them at the same addresses every time.
pub(super) struct Workspace<B: Backend> {
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
    pub(super) keep: Vec<B::Buf>,
}

impl<B: Backend> Workspace<B> {
    pub(super) fn new(b: &B, c: &Config, rows: usize) -> Result<Self> {
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

/// One pass of the forward over the positions `start..start + rows`: a prefill chunk
/// (taps downloaded now) or a decode step (taps staged on the device).
pub(super) struct Pass<'p, 'c, B: Backend> {
    pub(super) rt: &'p Runtime<B>,
    pub(super) start: usize,
    pub(super) rows: usize,
    pub(super) faults: &'p RuntimeFaults,
    pub(super) collector: &'p mut TapCollector<'c>,
    pub(super) route: TapRoute<'p, B>,
    pub(super) opts: &'p RunOptions,
}

impl<B: Backend> Pass<'_, '_, B> {
    /// A decode step, whose token, position and tap slot come from the step record.
    fn decode(&self) -> bool {
        matches!(self.route, TapRoute::Stage { .. })
    }

    /// Run one op, named in its error.
    fn op(&self, name: &str, r: Result<()>) -> Result<()> {
        self.rt.op(name, self.opts.sync_check, r)
    }

    /// Apply the faults injected at `tap`, then send its selected rows where this pass's
    /// taps go.
    fn tap(&mut self, tap: Tap, buf: &mut B::Buf) -> Result<()> {
        let (id, width) = (tap.id(), tap.width(&self.rt.cfg));
        self.inject(&id, buf, width)?;
        if !self.collector.wants(&tap) {
            return Ok(());
        }
        let (rt, sc) = (self.rt, self.opts.sync_check);
        match &mut self.route {
            TapRoute::Stage { buffers, selected } => {
                if *selected {
                    let staged = buffers
                        .get_mut(&tap)
                        .expect("a decode tap buffer exists for every wanted tap");
                    let copy = rt.backend.copy_rows(buf, staged, Row::StepSlot, 1, width);
                    rt.op(&format!("stage({id})"), sc, copy)?;
                }
            }
            TapRoute::Download => {
                let sel = self.collector.rows_in(self.start, self.rows);
                if sel.is_empty() {
                    return Ok(());
                }
                // One copy per run of consecutive rows: a device copy per row would dominate.
                let runs: Vec<(usize, usize)> = crate::taps::consecutive_runs(&sel)
                    .map(|run| (sel[run.start] * width, run.len() * width))
                    .collect();
                let capture = self.collector.capture(&rt.backend, &tap, self.start, buf, &runs);
                rt.op(&format!("capture of {id}"), sc, capture)?;
            }
        }
        Ok(())
    }

    /// Perturb the rows of the `[rows, width]` tap `id` that a fault reaches, and fail
    /// the op there once an injected crash's position is reached.
    fn inject(&self, id: &str, buf: &mut B::Buf, width: usize) -> Result<()> {
        let (b, start, rows) = (&self.rt.backend, self.start, self.rows);
        for f in self.faults.taps.iter().filter(|f| f.tap_id == id) {
            let from_row = f.from.saturating_sub(start);
            if from_row < rows {
                self.op(
                    &format!("perturb({id})"),
                    b.perturb(buf, rows, width, from_row, f.fault),
                )?;
            }
        }
        if let Some(crash) = self.faults.crash.iter().find(|c| c.0 == id && c.1 < start + rows) {
            // A real out-of-bounds request to the backend, so the crash path is the one a
            // device error takes.
            let mut empty = b.alloc(0)?;
            self.op(
                &format!("{id} (injected out-of-bounds write at position {})", crash.1),
                b.copy_rows(buf, &mut empty, Row::At(1), rows, width),
            )?;
        }
        Ok(())
    }

    /// Whether a fault is injected at `tap` (fused ops must not hide it).
    fn touched(&self, tap: Tap) -> bool {
        let id = tap.id();
        self.faults.taps.iter().any(|f| f.tap_id == id) || self.faults.crash.iter().any(|c| c.0 == id)
    }

    /// Layers this pass runs: a dump without decoding or an output tap cannot see layers
    /// past the last tapped one, so it stops there, as the reference does (`run` always
    /// computes everything).
    fn depth(&self) -> usize {
        let (n, col) = (self.rt.cfg.n_layer, &self.collector);
        if self.decode() || col.writer.is_none() || self.opts.max_tokens > 0 || col.wants_output() {
            return n;
        }
        (0..n)
            .rev()
            .find(|&l| LayerTap::ALL.into_iter().any(|t| col.wants(&Tap::Layer(l, t))))
            .map_or(0, |l| l + 1)
    }

    /// The RoPE angle positions of layer `l` on the host — shifted where an injected RoPE
    /// fault reaches this pass — or `None` for a decode step's own position.
    fn rope_positions(&self, l: usize) -> Option<Vec<f32>> {
        let span = self.start..self.start + self.rows;
        match self.faults.rope.iter().find(|r| r.layer.is_none_or(|x| x == l)) {
            Some(r) if span.end > r.from => {
                Some(span.map(|p| r.rotated_position(p).unwrap_or(p as f64) as f32).collect())
            }
            _ if self.decode() => None,
            _ => Some(span.map(|p| p as f32).collect()),
        }
    }

    /// The KV cache row this pass appends at.
    fn kv_row(&self) -> Row {
        if self.decode() {
            Row::StepPos
        } else {
            Row::At(self.start)
        }
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.rt.cfg;
        AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim(),
            first_pos: self.start,
            rows: self.rows,
            from_step: self.decode(),
        }
    }
}

impl<B: Backend> Runtime<B> {
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

    /// Embedding and layers for the pass's rows, leaving the residual stream in `ws.x`.
    /// Prefill chunks take `ids` from the host; a decode step takes its token and
    /// position from the step record, so that the same ops can be recorded once and
    /// replayed.
    pub(super) fn layers(
        &self,
        ids: &[u32],
        ws: &mut Workspace<B>,
        kv: &mut [(B::Buf, B::Buf)],
        pass: &mut Pass<B>,
    ) -> Result<()> {
        let (b, e) = (&self.backend, self.cfg.n_embd);
        let tokens = if pass.decode() { Src::Step } else { Src::Host(ids) };
        pass.op("embed", b.embed(&self.token_embd, e, tokens, &mut ws.x))?;
        pass.tap(Tap::Embed, &mut ws.x)?;
        self.checkpoint(0, ws, pass)?;
        for (l, kv) in kv.iter_mut().enumerate().take(pass.depth()) {
            self.block(l, ws, kv, pass)?;
            self.checkpoint(l + 1, ws, pass)?;
        }
        Ok(())
    }

    /// Keep the residual stream as `ws.keep[i]` when the run keeps checkpoints.
    fn checkpoint(&self, i: usize, ws: &mut Workspace<B>, pass: &Pass<B>) -> Result<()> {
        let Some(cp) = ws.keep.get_mut(i) else { return Ok(()) };
        let copy = self
            .backend
            .copy_rows(&ws.x, cp, Row::At(pass.start), pass.rows, self.cfg.n_embd);
        pass.op("checkpoint", copy)
    }

    /// Llama block `l` on the residual stream `ws.x`: attention, then the gated FFN, each
    /// added back to the stream. Fused ops run where no injected fault sits between the
    /// ops they fuse.
    fn block(&self, l: usize, ws: &mut Workspace<B>, kv: &mut (B::Buf, B::Buf), pass: &mut Pass<B>) -> Result<()> {
        let (c, b, w) = (&self.cfg, &self.backend, &self.layers[l]);
        let (e, qw, kvw, ff, rows) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff, pass.rows);
        let (base, eps) = (c.rope_base as f32, c.rms_eps as f32);
        let at = |t: LayerTap| Tap::Layer(l, t);
        let (kc, vc) = kv;
        let shape = pass.attn_shape();

        pass.op(
            "rms_norm (attn)",
            b.rms_norm(&ws.x, &w.attn_norm, rows, e, eps, &mut ws.h),
        )?;
        pass.tap(at(LayerTap::AttnNorm), &mut ws.h)?;
        let qkv = [&mut ws.q, &mut ws.k, &mut ws.v];
        pass.op(
            "matmul q, k, v",
            weights::matmul3(b, &ws.h, [&w.wq, &w.wk, &w.wv], rows, e, [qw, kvw, kvw], qkv),
        )?;
        pass.tap(at(LayerTap::QPreRope), &mut ws.q)?;
        pass.tap(at(LayerTap::KPreRope), &mut ws.k)?;
        let host_positions = pass.rope_positions(l);
        let positions = host_positions.as_deref().map_or(Src::Step, Src::Host);
        let fuse_append = !pass.touched(at(LayerTap::K)) && !pass.touched(at(LayerTap::V));
        if fuse_append {
            let fused = b.rope_append(&mut ws.q, &mut ws.k, &ws.v, kc, vc, shape, positions, base);
            pass.op("rope q, k and kv append", fused)?;
        } else {
            pass.op("rope q", b.rope(&mut ws.q, c.n_head, c.head_dim(), positions, base))?;
            pass.op("rope k", b.rope(&mut ws.k, c.n_head_kv, c.head_dim(), positions, base))?;
        }
        pass.tap(at(LayerTap::Q), &mut ws.q)?;
        pass.tap(at(LayerTap::K), &mut ws.k)?;
        pass.tap(at(LayerTap::V), &mut ws.v)?;
        if !fuse_append {
            pass.op("kv append k", b.copy_rows(&ws.k, kc, pass.kv_row(), rows, kvw))?;
            pass.op("kv append v", b.copy_rows(&ws.v, vc, pass.kv_row(), rows, kvw))?;
        }
        pass.op("attention", b.attention(&ws.q, kc, vc, shape, &mut ws.attn))?;
        pass.tap(at(LayerTap::Attn), &mut ws.attn)?;
        pass.op("matmul attn_output", w.wo.matmul(b, &ws.attn, rows, qw, e, &mut ws.ao))?;
        pass.tap(at(LayerTap::AttnOut), &mut ws.ao)?;

        if pass.touched(at(LayerTap::ResidMid)) {
            pass.op("add (attention residual)", b.add(&ws.x, &ws.ao, rows * e, &mut ws.mid))?;
            pass.tap(at(LayerTap::ResidMid), &mut ws.mid)?;
            pass.op(
                "rms_norm (ffn)",
                b.rms_norm(&ws.mid, &w.ffn_norm, rows, e, eps, &mut ws.h),
            )?;
        } else {
            let fused = b.add_rms_norm(&ws.x, &ws.ao, &w.ffn_norm, rows, e, eps, &mut ws.mid, &mut ws.h);
            pass.op("add (attention residual) and rms_norm (ffn)", fused)?;
            pass.tap(at(LayerTap::ResidMid), &mut ws.mid)?;
        }
        pass.tap(at(LayerTap::FfnNorm), &mut ws.h)?;
        if pass.touched(at(LayerTap::FfnGate)) || pass.touched(at(LayerTap::FfnUp)) {
            pass.op("matmul ffn_gate", w.wg.matmul(b, &ws.h, rows, e, ff, &mut ws.g))?;
            pass.op("matmul ffn_up", w.wu.matmul(b, &ws.h, rows, e, ff, &mut ws.u))?;
            pass.tap(at(LayerTap::FfnGate), &mut ws.g)?;
            pass.tap(at(LayerTap::FfnUp), &mut ws.u)?;
            pass.op("silu_mul", b.silu_mul(&ws.g, &ws.u, rows * ff, &mut ws.act))?;
        } else {
            let gua = [&mut ws.g, &mut ws.u, &mut ws.act];
            let fused = weights::gate_up_silu(b, &ws.h, &w.wg, &w.wu, rows, e, ff, gua);
            pass.op("matmul ffn_gate, ffn_up and silu_mul", fused)?;
            pass.tap(at(LayerTap::FfnGate), &mut ws.g)?;
            pass.tap(at(LayerTap::FfnUp), &mut ws.u)?;
        }
        pass.tap(at(LayerTap::FfnAct), &mut ws.act)?;
        pass.op("matmul ffn_down", w.wd.matmul(b, &ws.act, rows, ff, e, &mut ws.f))?;
        pass.tap(at(LayerTap::FfnOut), &mut ws.f)?;
        pass.op("add (ffn residual)", b.add(&ws.mid, &ws.f, rows * e, &mut ws.x))?;
        pass.tap(at(LayerTap::ResidPost), &mut ws.x)
    }

    /// The output head on the rows of `ws.x` someone needs — tapped ones and, with
    /// `want_next`, the last — returning the greedy next token when asked.
    pub(super) fn head(&self, ws: &mut Workspace<B>, pass: &mut Pass<B>, want_next: bool) -> Result<Option<u32>> {
        let (c, b) = (&self.cfg, &self.backend);
        let (e, start, rows) = (c.n_embd, pass.start, pass.rows);
        let want_out = pass.collector.wants_output();
        let selected = if want_out {
            pass.collector.rows_in(start, rows)
        } else {
            Vec::new()
        };
        let mut need = selected.clone();
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
        let eps = c.rms_eps as f32;
        pass.op(
            "rms_norm (output)",
            b.rms_norm(hx, &self.output_norm, n, e, eps, &mut ws.normed),
        )?;
        let logits = self.output.matmul(b, &ws.normed, n, e, c.n_vocab, &mut ws.logits);
        pass.op("matmul output", logits)?;
        if want_out {
            // Rows of the head buffers are `need`; tap only the selected ones (the first
            // entries, the decode row may trail unselected).
            for (tap, buf) in [(Tap::FinalNorm, &mut ws.normed), (Tap::Logits, &mut ws.logits)] {
                let (id, width) = (tap.id(), tap.width(c));
                for f in pass.faults.taps.iter().filter(|f| f.tap_id == id) {
                    let from_row = need.iter().position(|&r| start + r >= f.from).unwrap_or(n);
                    pass.op(&format!("perturb({id})"), b.perturb(buf, n, width, from_row, f.fault))?;
                }
                if pass.collector.wants(&tap) && !selected.is_empty() {
                    pass.collector
                        .capture(b, &tap, start, buf, &[(0, selected.len() * width)])?;
                }
            }
        }
        if want_next {
            return Ok(Some(b.argmax(&ws.logits, n - 1, c.n_vocab)?));
        }
        Ok(None)
    }
}
