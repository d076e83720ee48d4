//! The llama-family forward over the ops of one backend: the embedding, the blocks and
//! the output head over a layer's weights and buffers (layer.rs). Each runs over a [`Pass`], the
//! context of one prefill chunk or decode step: its rows, the faults it injects, where its
//! taps go. A model's variant (`Config.variant`: biases, q/k norms, post norms, GELU,
//! RoPE tables, sliding windows) is decided once per layer from the weights it loaded;
//! plain llama runs exactly the ops it always has.

use super::backend::{AddNorm, AttnShape, Backend, Input, Row, Src, Step};
use super::capture::{TapCollector, TapRoute};
use super::layer::Workspace;
use super::weights;
use super::KeptRows;
use super::{RunOptions, Runtime};
use crate::error::{Error, Result};
use crate::inject::RuntimeFaults;
use crate::taps::{Activation, LayerTap, Tap, WindowFault};

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

/// What the output head does with its last row's logits.
#[derive(Debug, Clone, Copy)]
pub(super) enum Next {
    /// Nothing: no token follows.
    None,
    /// The greedy next token, returned to the host.
    ToHost,
    /// The greedy next token into the step record, which becomes this step's (token
    /// aside): see [`Backend::argmax_to_step`].
    ToStep(Step),
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

    fn attn_shape(&self, layer: usize) -> AttnShape {
        let c = &self.rt.cfg;
        AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim(),
            first_pos: self.start,
            rows: self.rows,
            from_step: self.decode(),
            // An injected window fault (`--inject blk.L.window:…`) widens, narrows or lifts it.
            window: WindowFault::window_of(&self.faults.window, layer, c.window_of(layer)),
        }
    }
}

/// How one block's FFN residual add and the next block's attn_norm run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Join {
    /// The add at the end of the one, the norm at the start of the next (an injected fault
    /// acts between them, or no next block runs).
    #[default]
    Apart,
    /// One `add_rms_norm` launch at the end of the first block (several rows).
    Fused,
    /// Inside the next block's q, k, v projections ([`Backend::add_rms_norm_project`]; one
    /// row, where the GPU's decode matvec computes the norm on its way in), after which
    /// that block taps and keeps the first one's `resid_post`.
    InProjections,
}

/// Where block `l` meets its neighbours: how its attn_norm comes (`entry`) and how block
/// `l + 1`'s goes (`exit`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Seam {
    pub entry: Join,
    pub exit: Join,
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
        if self.cfg.variant.scale_embeddings {
            // Gemma: embeddings × √n_embd (llama.cpp `ggml_scale(inpL, sqrtf(n_embd))`).
            let factor = (e as f32).sqrt();
            pass.op("scale (embeddings)", b.scale(&mut ws.x, pass.rows * e, factor))?;
        }
        pass.tap(Tap::Embed, &mut ws.x)?;
        self.keep(Tap::Embed, &ws.x, &mut ws.keep, pass)?;
        let depth = pass.depth();
        let mut entry = Join::Apart;
        for (l, kv) in kv.iter_mut().enumerate().take(depth) {
            // The next block's attn_norm goes with this block's last add unless a fault
            // injected into the residual stream between them must act first; for one row,
            // into the next block's projections unless a fault acts on the normed row.
            let exit = if l + 1 >= depth || pass.touched(Tap::Layer(l, LayerTap::ResidPost)) {
                Join::Apart
            } else if pass.rows == 1 && !pass.touched(Tap::Layer(l + 1, LayerTap::AttnNorm)) {
                Join::InProjections
            } else {
                Join::Fused
            };
            self.block(l, ws, kv, pass, Seam { entry, exit })?;
            entry = exit;
            if exit != Join::InProjections {
                self.keep(Tap::Layer(l, LayerTap::ResidPost), &ws.x, &mut ws.keep, pass)?;
            }
        }
        Ok(())
    }

    /// Copy the pass's rows of `buf` into the run's kept rows of `tap`, when it keeps them.
    fn keep(&self, tap: Tap, buf: &B::Buf, kept: &mut KeptRows<B::Buf>, pass: &Pass<B>) -> Result<()> {
        let Some(i) = kept.taps.iter().position(|&t| t == tap) else {
            return Ok(());
        };
        let copy = self
            .backend
            .copy_rows(buf, &mut kept.rows[i], Row::At(pass.start), pass.rows, self.cfg.n_embd);
        pass.op("checkpoint", copy)
    }

    /// Block `l` on the residual stream `ws.x`: attention, then the gated FFN, each
    /// (post-normed in models with post norms) added back to the stream. Fused ops run
    /// where no injected fault sits between the ops they fuse; `seam` says which of the
    /// attn_norms on either side ran or run fused with the FFN residual add.
    pub(super) fn block(
        &self,
        l: usize,
        ws: &mut Workspace<B>,
        kv: &mut (B::Buf, B::Buf),
        pass: &mut Pass<B>,
        seam: Seam,
    ) -> Result<()> {
        let (c, b, w) = (&self.cfg, &self.backend, &self.layers[l]);
        let (e, qw, kvw, rows) = (c.n_embd, c.q_width(), c.kv_width(), pass.rows);
        let eps = c.rms_eps as f32;
        let at = |t: LayerTap| Tap::Layer(l, t);
        let (kc, vc) = kv;
        let shape = pass.attn_shape(l);

        match seam.entry {
            Join::Apart => {
                pass.op(
                    "rms_norm (attn)",
                    b.rms_norm(&ws.x, &w.attn_norm, rows, e, eps, &mut ws.h),
                )?;
                pass.tap(at(LayerTap::AttnNorm), &mut ws.h)?;
                self.project_qkv(l, ws, pass, false)?;
            }
            Join::Fused => {
                pass.tap(at(LayerTap::AttnNorm), &mut ws.h)?;
                self.project_qkv(l, ws, pass, false)?;
            }
            Join::InProjections => {
                self.project_qkv(l, ws, pass, true)?;
                let resid = Tap::Layer(l - 1, LayerTap::ResidPost);
                pass.tap(resid, &mut ws.x)?;
                self.keep(resid, &ws.x, &mut ws.keep, pass)?;
                pass.tap(at(LayerTap::AttnNorm), &mut ws.h)?;
            }
        }
        let host_positions = pass.rope_positions(l);
        let positions = host_positions.as_deref().map_or(Src::Step, Src::Host);
        let freqs = w.freqs();
        let fuse_append = !pass.touched(at(LayerTap::K)) && !pass.touched(at(LayerTap::V));
        if fuse_append {
            let fused = b.rope_append(&mut ws.q, &mut ws.k, &ws.v, kc, vc, shape, positions, freqs);
            pass.op("rope q, k and kv append", fused)?;
        } else {
            pass.op("rope q", b.rope(&mut ws.q, c.n_head, c.head_dim(), positions, freqs))?;
            pass.op("rope k", b.rope(&mut ws.k, c.n_head_kv, c.head_dim(), positions, freqs))?;
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
        self.keep(at(LayerTap::AttnOut), &ws.ao, &mut ws.keep, pass)?;
        if let Some([post_attn, _]) = &w.post_norms {
            pass.op(
                "rms_norm (post attention)",
                b.rms_norm(&ws.ao, post_attn, rows, e, eps, &mut ws.post),
            )?;
            pass.tap(at(LayerTap::AttnPostNorm), &mut ws.post)?;
            self.keep(at(LayerTap::AttnPostNorm), &ws.post, &mut ws.keep, pass)?;
        }
        // For one row, the FFN's gate and up projections compute the attention residual
        // add and ffn_norm on their way in, unless a fault acts between them.
        let gate_up_fused = c.variant.ffn_activation != Activation::GeluTanh
            && !pass.touched(at(LayerTap::FfnGate))
            && !pass.touched(at(LayerTap::FfnUp));
        let ffn_norm_in =
            rows == 1 && gate_up_fused && !pass.touched(at(LayerTap::ResidMid)) && !pass.touched(at(LayerTap::FfnNorm));
        if ffn_norm_in {
            return self.ffn(l, ws, pass, seam.exit, true);
        }
        let attn_delta = if w.post_norms.is_some() { &ws.post } else { &ws.ao };
        if pass.touched(at(LayerTap::ResidMid)) {
            pass.op(
                "add (attention residual)",
                b.add(&ws.x, attn_delta, rows * e, &mut ws.mid),
            )?;
            pass.tap(at(LayerTap::ResidMid), &mut ws.mid)?;
            pass.op(
                "rms_norm (ffn)",
                b.rms_norm(&ws.mid, &w.ffn_norm, rows, e, eps, &mut ws.h),
            )?;
        } else {
            let fused = b.add_rms_norm(&ws.x, attn_delta, &w.ffn_norm, rows, e, eps, &mut ws.mid, &mut ws.h);
            pass.op("add (attention residual) and rms_norm (ffn)", fused)?;
            pass.tap(at(LayerTap::ResidMid), &mut ws.mid)?;
        }
        pass.tap(at(LayerTap::FfnNorm), &mut ws.h)?;
        self.ffn(l, ws, pass, seam.exit, false)
    }

    /// Q, K and V of the normed rows `ws.h` into `ws.q`, `ws.k`, `ws.v`, with the
    /// variant's biases and per-head norms (in that order, as qwen2 and qwen3/gemma3
    /// apply them); taps `q_pre_rope` and `k_pre_rope`. With `norm_in`, the rows are
    /// computed on the way in: block `l − 1`'s FFN residual add into `ws.x` and this
    /// block's attn_norm into `ws.h` ([`Join::InProjections`]).
    fn project_qkv(&self, l: usize, ws: &mut Workspace<B>, pass: &mut Pass<B>, norm_in: bool) -> Result<()> {
        let (c, b, w) = (&self.cfg, &self.backend, &self.layers[l]);
        let (e, qw, kvw, rows, hd) = (c.n_embd, c.q_width(), c.kv_width(), pass.rows, c.head_dim());
        let at = |t: LayerTap| Tap::Layer(l, t);
        let normed = w.qk_norm.is_some();
        {
            let (q, k) = if normed {
                (&mut ws.q_raw, &mut ws.k_raw)
            } else {
                (&mut ws.q, &mut ws.k)
            };
            let out = [&mut *q, &mut *k, &mut ws.v];
            let (input, name) = if norm_in {
                let before = &self.layers[l - 1];
                let delta = if before.post_norms.is_some() { &ws.post } else { &ws.f };
                let norm = AddNorm {
                    a: &ws.mid,
                    b: delta,
                    w: &w.attn_norm,
                    eps: c.rms_eps as f32,
                    sum: &mut ws.x,
                    normed: &mut ws.h,
                };
                (
                    Input::AddNorm(norm),
                    "add (ffn residual), rms_norm (attn) and matmul q, k, v",
                )
            } else {
                (Input::Rows(&ws.h), "matmul q, k, v")
            };
            let qkv = weights::matmul3(b, input, [&w.wq, &w.wk, &w.wv], rows, e, [qw, kvw, kvw], out);
            pass.op(name, qkv)?;
            if let Some([bq, bk, bv]) = &w.qkv_bias {
                pass.op("add bias q", b.add_bias(q, bq, rows, qw))?;
                pass.op("add bias k", b.add_bias(k, bk, rows, kvw))?;
                pass.op("add bias v", b.add_bias(&mut ws.v, bv, rows, kvw))?;
            }
        }
        if let Some([q_norm, k_norm]) = &w.qk_norm {
            let eps = c.rms_eps as f32;
            let (q_rows, k_rows) = (rows * c.n_head, rows * c.n_head_kv);
            pass.op(
                "rms_norm (q heads)",
                b.rms_norm(&ws.q_raw, q_norm, q_rows, hd, eps, &mut ws.q),
            )?;
            pass.op(
                "rms_norm (k heads)",
                b.rms_norm(&ws.k_raw, k_norm, k_rows, hd, eps, &mut ws.k),
            )?;
        }
        pass.tap(at(LayerTap::QPreRope), &mut ws.q)?;
        pass.tap(at(LayerTap::KPreRope), &mut ws.k)
    }

    /// The gated FFN on `ws.h` (SiLU or GELU-tanh gate), post-normed where the model has
    /// post norms, added to `ws.mid` into the residual stream `ws.x` as `exit` says (with
    /// block `l + 1`'s attn_norm, or left to that block). With `norm_in`, gate and up
    /// compute their input on the way in: the attention residual add into `ws.mid` and
    /// ffn_norm into `ws.h` (tapped after them).
    fn ffn(&self, l: usize, ws: &mut Workspace<B>, pass: &mut Pass<B>, exit: Join, norm_in: bool) -> Result<()> {
        let (c, b, w) = (&self.cfg, &self.backend, &self.layers[l]);
        let (e, ff, rows) = (c.n_embd, c.n_ff, pass.rows);
        let at = |t: LayerTap| Tap::Layer(l, t);
        let gelu = c.variant.ffn_activation == Activation::GeluTanh;
        if norm_in {
            let attn_delta = if w.post_norms.is_some() { &ws.post } else { &ws.ao };
            let norm = AddNorm {
                a: &ws.x,
                b: attn_delta,
                w: &w.ffn_norm,
                eps: c.rms_eps as f32,
                sum: &mut ws.mid,
                normed: &mut ws.h,
            };
            let gua = [&mut ws.g, &mut ws.u, &mut ws.act];
            let fused = weights::gate_up_silu(b, Input::AddNorm(norm), &w.wg, &w.wu, rows, e, ff, gua);
            pass.op(
                "add (attention residual), rms_norm (ffn), matmul ffn_gate, ffn_up and silu_mul",
                fused,
            )?;
            pass.tap(at(LayerTap::ResidMid), &mut ws.mid)?;
            pass.tap(at(LayerTap::FfnNorm), &mut ws.h)?;
            pass.tap(at(LayerTap::FfnGate), &mut ws.g)?;
            pass.tap(at(LayerTap::FfnUp), &mut ws.u)?;
        } else if gelu || pass.touched(at(LayerTap::FfnGate)) || pass.touched(at(LayerTap::FfnUp)) {
            pass.op("matmul ffn_gate", w.wg.matmul(b, &ws.h, rows, e, ff, &mut ws.g))?;
            pass.op("matmul ffn_up", w.wu.matmul(b, &ws.h, rows, e, ff, &mut ws.u))?;
            pass.tap(at(LayerTap::FfnGate), &mut ws.g)?;
            pass.tap(at(LayerTap::FfnUp), &mut ws.u)?;
            if gelu {
                pass.op("gelu_tanh_mul", b.gelu_tanh_mul(&ws.g, &ws.u, rows * ff, &mut ws.act))?;
            } else {
                pass.op("silu_mul", b.silu_mul(&ws.g, &ws.u, rows * ff, &mut ws.act))?;
            }
        } else {
            let gua = [&mut ws.g, &mut ws.u, &mut ws.act];
            let fused = weights::gate_up_silu(b, Input::Rows(&ws.h), &w.wg, &w.wu, rows, e, ff, gua);
            pass.op("matmul ffn_gate, ffn_up and silu_mul", fused)?;
            pass.tap(at(LayerTap::FfnGate), &mut ws.g)?;
            pass.tap(at(LayerTap::FfnUp), &mut ws.u)?;
        }
        pass.tap(at(LayerTap::FfnAct), &mut ws.act)?;
        pass.op("matmul ffn_down", w.wd.matmul(b, &ws.act, rows, ff, e, &mut ws.f))?;
        pass.tap(at(LayerTap::FfnOut), &mut ws.f)?;
        self.keep(at(LayerTap::FfnOut), &ws.f, &mut ws.keep, pass)?;
        if let Some([_, post_ffn]) = &w.post_norms {
            let eps = c.rms_eps as f32;
            pass.op(
                "rms_norm (post ffn)",
                b.rms_norm(&ws.f, post_ffn, rows, e, eps, &mut ws.post),
            )?;
            pass.tap(at(LayerTap::FfnPostNorm), &mut ws.post)?;
            self.keep(at(LayerTap::FfnPostNorm), &ws.post, &mut ws.keep, pass)?;
        }
        let ffn_delta = if w.post_norms.is_some() { &ws.post } else { &ws.f };
        match exit {
            Join::Apart => pass.op("add (ffn residual)", b.add(&ws.mid, ffn_delta, rows * e, &mut ws.x))?,
            Join::Fused => {
                let (next, eps) = (&self.layers[l + 1].attn_norm, c.rms_eps as f32);
                let fused = b.add_rms_norm(&ws.mid, ffn_delta, next, rows, e, eps, &mut ws.x, &mut ws.h);
                pass.op("add (ffn residual) and rms_norm (next attn)", fused)?;
            }
            // Block l + 1 adds, and taps resid_post once it has.
            Join::InProjections => return Ok(()),
        }
        pass.tap(at(LayerTap::ResidPost), &mut ws.x)
    }

    /// The output head on the rows of `ws.x` someone needs — tapped ones and, unless
    /// `next` is [`Next::None`], the last — returning the greedy next token when
    /// [`Next::ToHost`].
    pub(super) fn head(&self, ws: &mut Workspace<B>, pass: &mut Pass<B>, next: Next) -> Result<Option<u32>> {
        let want_next = !matches!(next, Next::None);
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
        match next {
            Next::None => Ok(None),
            Next::ToHost => Ok(Some(b.argmax(&ws.logits, n - 1, c.n_vocab)?)),
            Next::ToStep(step) => {
                pass.op("argmax", b.argmax_to_step(&ws.logits, n - 1, c.n_vocab, step))?;
                Ok(None)
            }
        }
    }
}
