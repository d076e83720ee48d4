//! Self-test checks of decode's launches: the fused ops against the cpu backend's ops in
//! turn, and a decode step driven by the step record, recorded and replayed where the
//! backend records.

use super::{add_norm, Checker};
use crate::error::Result;
use crate::runtime::backend::{AttnShape, Backend, Input, Projections, RopeFreqs, Row, Src, Step};
use crate::runtime::rope::RopeTable;

/// The (token, position) of each checked decode step; its index is its tap slot.
const DECODE_STEPS: [(u32, usize); 3] = [(7, 40), (3, 41), (9, 63)];
/// Rows of the KV cache of the decode-step check, and of its embedding table.
const DECODE_CACHE_ROWS: usize = 64;
const DECODE_VOCAB: usize = 50;

/// Heads of an attention check: query heads, KV heads, head dim, sliding window.
#[derive(Clone, Copy)]
struct Heads(usize, usize, usize, Option<usize>);

impl Heads {
    fn shape(self, first_pos: usize, from_step: bool) -> AttnShape {
        AttnShape {
            n_head: self.0,
            n_head_kv: self.1,
            head_dim: self.2,
            first_pos,
            rows: 1,
            from_step,
            window: self.3,
        }
    }
}

/// Inputs of the decode-step check: embedding table, K and V caches, the new K row.
struct DecodeInputs {
    table: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    k_new: Vec<f32>,
}

/// One fused-op check: its shape and inputs (x, wq, wk, wv, wg, wu, norm) on both backends.
struct FusedCase<B: Backend> {
    rows: usize,
    e: usize,
    kvw: usize,
    ff: usize,
    gw: Vec<B::Buf>,
    cw: Vec<Vec<f32>>,
    shape: String,
}

/// q, k and v projections on the cpu (c*) and the checked backend (g*).
struct Qkv<B: Backend> {
    cq: Vec<f32>,
    ck: Vec<f32>,
    cv: Vec<f32>,
    gq: B::Buf,
    gk: B::Buf,
    gv: B::Buf,
}

impl<B: Backend> Checker<'_, B> {
    /// A decode step whose token, position and tap slot come from the step record: embed,
    /// RoPE, KV append, attention and a staged tap copy, recorded once where the backend
    /// records (else issued each time) and run at several positions; the cpu backend gets
    /// the same values from the host. With a `window` (Gemma-style), attention is
    /// windowed and RoPE runs from a NeoX table (the later steps lie past the window).
    pub(super) fn decode_step(
        &mut self,
        n_head: usize,
        n_kv: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let (qw, kvw) = (n_head * head_dim, n_kv * head_dim);
        let inputs = DecodeInputs {
            table: self.random(DECODE_VOCAB * qw, 1.0),
            k: self.random(DECODE_CACHE_ROWS * kvw, 1.0),
            v: self.random(DECODE_CACHE_ROWS * kvw, 1.0),
            k_new: self.random(kvw, 1.0),
        };
        let heads = Heads(n_head, n_kv, head_dim, window);
        let table = window.map(|_| super::variant::yarn_table(head_dim, true));
        let expected = self.decode_on_cpu(heads, &inputs, table.as_ref())?;
        let t0 = std::time::Instant::now();
        let (staged, recorded) = self.decode_on_device(heads, &inputs, table.as_ref())?;
        let how = if recorded { "recorded once, replayed" } else { "issued" };
        let op = if window.is_some() {
            "decode_step windowed"
        } else {
            "decode_step"
        };
        let window = window.map_or(String::new(), |w| format!(", window {w}, NeoX RoPE table"));
        self.record(
            op,
            format!("heads {n_head}/{n_kv} x {head_dim} at positions 40, 41, 63{window} ({how})"),
            &staged,
            &expected,
            t0.elapsed().as_secs_f64(),
            false,
        )
    }

    /// The decode steps' attention outputs, one row per step, from host-given inputs.
    fn decode_on_cpu(&self, heads: Heads, inputs: &DecodeInputs, rope: Option<&RopeTable>) -> Result<Vec<f32>> {
        let Heads(n_head, n_kv, head_dim, _) = heads;
        let (qw, kvw) = (n_head * head_dim, n_kv * head_dim);
        let cpu = &self.cpu;
        let (mut k, v, k_new, table) = (
            cpu.upload(&inputs.k)?,
            cpu.upload(&inputs.v)?,
            cpu.upload(&inputs.k_new)?,
            cpu.upload(&inputs.table)?,
        );
        let inv_freq = rope.map(|t| cpu.upload_table(&t.inv_freq)).transpose()?;
        let freqs = super::variant::freqs(rope.zip(inv_freq.as_ref()));
        let (mut q, mut attn, mut staged) = (cpu.alloc(qw)?, cpu.alloc(qw)?, cpu.alloc(DECODE_STEPS.len() * qw)?);
        for (slot, &(token, pos)) in DECODE_STEPS.iter().enumerate() {
            cpu.embed(&table, qw, Src::Host(&[token]), &mut q)?;
            cpu.rope(&mut q, n_head, head_dim, Src::Host(&[pos as f32]), freqs)?;
            cpu.copy_rows(&k_new, &mut k, Row::At(pos), 1, kvw)?;
            cpu.attention(&q, &k, &v, heads.shape(pos, false), &mut attn)?;
            cpu.copy_rows(&attn, &mut staged, Row::At(slot), 1, qw)?;
        }
        Ok(staged)
    }

    /// The same steps on the checked backend from the step record, and whether they were
    /// recorded once and replayed.
    fn decode_on_device(
        &self,
        heads: Heads,
        inputs: &DecodeInputs,
        rope: Option<&RopeTable>,
    ) -> Result<(B::Buf, bool)> {
        let Heads(n_head, n_kv, head_dim, _) = heads;
        let (qw, kvw) = (n_head * head_dim, n_kv * head_dim);
        let g = self.gpu;
        let (mut k, v, k_new, table) = (
            g.upload(&inputs.k)?,
            g.upload(&inputs.v)?,
            g.upload(&inputs.k_new)?,
            g.upload(&inputs.table)?,
        );
        let inv_freq = rope.map(|t| g.upload_table(&t.inv_freq)).transpose()?;
        let freqs = super::variant::freqs(rope.zip(inv_freq.as_ref()));
        let (mut q, mut attn, mut staged) = (g.alloc(qw)?, g.alloc(qw)?, self.guarded(DECODE_STEPS.len() * qw)?);
        let mut graph = None;
        for (slot, &(token, pos)) in DECODE_STEPS.iter().enumerate() {
            let rope_pos = pos as f32;
            g.set_step(Step {
                token,
                pos,
                rope_pos,
                slot,
            })?;
            let mut issue = || -> Result<()> {
                g.embed(&table, qw, Src::Step, &mut q)?;
                g.rope(&mut q, n_head, head_dim, Src::Step, freqs)?;
                g.copy_rows(&k_new, &mut k, Row::StepPos, 1, kvw)?;
                g.attention(&q, &k, &v, heads.shape(pos, true), &mut attn)?;
                g.copy_rows(&attn, &mut staged, Row::StepSlot, 1, qw)
            };
            if slot == 0 && g.begin_record()? {
                let issued = issue();
                graph = g.end_record()?;
                issued?;
            }
            match &graph {
                Some(recorded) => g.replay(recorded)?,
                None => issue()?,
            }
        }
        g.sync()?;
        Ok((staged, graph.is_some()))
    }

    /// The fused ops (decode's launches) against the cpu backend's ops in turn.
    pub(super) fn fused(
        &mut self,
        rows: usize,
        e: usize,
        kvw: usize,
        ff: usize,
        head_dim: usize,
        first_pos: usize,
    ) -> Result<()> {
        let inputs = [
            self.random(rows * e, 1.0),
            self.random(e * e, 0.05),
            self.random(kvw * e, 0.05),
            self.random(kvw * e, 0.05),
            self.random(ff * e, 0.05),
            self.random(ff * e, 0.05),
            self.random(e, 1.0),
        ];
        let case = FusedCase::<B> {
            rows,
            e,
            kvw,
            ff,
            gw: inputs.iter().map(|v| self.gpu.upload(v)).collect::<Result<Vec<_>>>()?,
            cw: inputs.iter().map(|v| self.cpu.upload(v)).collect::<Result<Vec<_>>>()?,
            shape: format!("{rows} rows, {e} → {e}/{kvw}/{ff}"),
        };
        let mut qkv = self.fused_qkv(&case)?;
        self.fused_rope_append(&case, &mut qkv, head_dim, first_pos)?;
        self.fused_gate_up(&case, &qkv)?;
        self.fused_add_rms_norm(&case, &qkv)?;
        self.fused_norm_project(&case, &qkv)
    }

    fn fused_qkv(&mut self, c: &FusedCase<B>) -> Result<Qkv<B>> {
        let (rows, e, kvw, g) = (c.rows, c.e, c.kvw, self.gpu);
        let (cw, gw) = (&c.cw, &c.gw);
        let (mut cq, mut ck, mut cv) = (
            self.cpu.alloc(rows * e)?,
            self.cpu.alloc(rows * kvw)?,
            self.cpu.alloc(rows * kvw)?,
        );
        let widths = [e, kvw, kvw];
        self.cpu.matmul3(
            &cw[0],
            [&cw[1], &cw[2], &cw[3]],
            rows,
            e,
            widths,
            [&mut cq, &mut ck, &mut cv],
        )?;
        let (mut gq, mut gk, mut gv) = (
            self.guarded(rows * e)?,
            self.guarded(rows * kvw)?,
            self.guarded(rows * kvw)?,
        );
        let (_, s) = self.timed(|| {
            g.matmul3(
                &gw[0],
                [&gw[1], &gw[2], &gw[3]],
                rows,
                e,
                widths,
                [&mut gq, &mut gk, &mut gv],
            )
        })?;
        self.record("matmul3", format!("{} (q)", c.shape), &gq, &cq, s, false)?;
        self.record("matmul3", format!("{} (v)", c.shape), &gv, &cv, s, false)?;
        Ok(Qkv { cq, ck, cv, gq, gk, gv })
    }

    fn fused_rope_append(
        &mut self,
        c: &FusedCase<B>,
        qkv: &mut Qkv<B>,
        head_dim: usize,
        first_pos: usize,
    ) -> Result<()> {
        let (rows, e, kvw, g) = (c.rows, c.e, c.kvw, self.gpu);
        let shape = AttnShape {
            n_head: e / head_dim,
            n_head_kv: kvw / head_dim,
            head_dim,
            first_pos,
            rows,
            from_step: false,
            window: None,
        };
        let positions: Vec<f32> = (first_pos..first_pos + rows).map(|p| p as f32).collect();
        let cache = (first_pos + rows) * kvw;
        let (mut ckc, mut cvc) = (self.cpu.upload(&vec![0.5; cache])?, self.cpu.upload(&vec![0.5; cache])?);
        let at = Src::Host(&positions);
        let Qkv { cq, ck, cv, gq, gk, gv } = qkv;
        self.cpu
            .rope_append(cq, ck, cv, &mut ckc, &mut cvc, shape, at, RopeFreqs::Base(10000.0))?;
        let (mut gkc, mut gvc) = (self.guarded(cache)?, self.guarded(cache)?);
        for c in [&mut gkc, &mut gvc] {
            g.copy_rows(&g.upload(&vec![0.5; cache])?, c, Row::At(0), 1, cache)?;
        }
        let (_, s) =
            self.timed(|| g.rope_append(gq, gk, gv, &mut gkc, &mut gvc, shape, at, RopeFreqs::Base(10000.0)))?;
        let mut q_out = self.guarded(rows * e)?;
        g.copy_rows(gq, &mut q_out, Row::At(0), rows, e)?;
        let (heads, kv_heads) = (e / head_dim, kvw / head_dim);
        let at = format!("{rows} rows at {first_pos}");
        self.record("rope_append", format!("{at}, {heads} heads (q)"), &q_out, cq, s, false)?;
        self.record(
            "rope_append",
            format!("{at}, {kv_heads} kv heads (k cache)"),
            &gkc,
            &ckc,
            s,
            false,
        )?;
        self.record("rope_append", format!("{at} (v cache)"), &gvc, &cvc, s, false)
    }

    /// Gate, up and their SiLU product in one launch: from ready rows, and from a residual
    /// add and RMSNorm computed on the way in (inside the launch on the GPU for one row).
    fn fused_gate_up(&mut self, c: &FusedCase<B>, qkv: &Qkv<B>) -> Result<()> {
        let (rows, e, ff, g) = (c.rows, c.e, c.ff, self.gpu);
        let (cw, gw) = (&c.cw, &c.gw);
        let sizes = [rows * e, rows * e, rows * ff, rows * ff, rows * ff];
        for norm_in in [false, true] {
            let mut cbufs = sizes.map(|n| vec![0.0f32; n]);
            let [csum, cnorm, cg, cu, cact] = &mut cbufs;
            let x = match norm_in {
                true => Input::AddNorm(add_norm([&cw[0], &qkv.cq, &cw[6]], 1e-5, csum, cnorm)),
                false => Input::Rows(&cw[0]),
            };
            self.cpu.gate_up_silu(x, &cw[4], &cw[5], rows, e, ff, cg, cu, cact)?;
            let mut gbufs = Vec::new();
            for n in sizes {
                gbufs.push(self.guarded(n)?);
            }
            let [gsum, gnorm, gg, gu, gact] = &mut gbufs[..] else {
                unreachable!("five buffers")
            };
            let (_, s) = self.timed(|| {
                let x = match norm_in {
                    true => Input::AddNorm(add_norm([&gw[0], &qkv.gq, &gw[6]], 1e-5, gsum, gnorm)),
                    false => Input::Rows(&gw[0]),
                };
                g.gate_up_silu(x, &gw[4], &gw[5], rows, e, ff, gg, gu, gact)
            })?;
            let shape = format!(
                "{rows} rows, {e} → {ff}{}",
                if norm_in { ", add_rms_norm input" } else { "" }
            );
            let checked = [("sum", 0), ("normed", 1), ("gate", 2), ("act", 4)];
            for (name, i) in checked.into_iter().filter(|&(_, i)| norm_in || i >= 2) {
                self.record(
                    "gate_up_silu",
                    format!("{shape} ({name})"),
                    &gbufs[i],
                    &cbufs[i],
                    s,
                    false,
                )?;
            }
        }
        Ok(())
    }

    fn fused_add_rms_norm(&mut self, c: &FusedCase<B>, qkv: &Qkv<B>) -> Result<()> {
        let (rows, e, g) = (c.rows, c.e, self.gpu);
        let (cw, gw) = (&c.cw, &c.gw);
        let (mut csum, mut cnorm) = (self.cpu.alloc(rows * e)?, self.cpu.alloc(rows * e)?);
        self.cpu
            .add_rms_norm(&cw[0], &qkv.cq, &cw[6], rows, e, 1e-5, &mut csum, &mut cnorm)?;
        let (mut gsum, mut gnorm) = (self.guarded(rows * e)?, self.guarded(rows * e)?);
        let (_, s) = self.timed(|| g.add_rms_norm(&gw[0], &qkv.gq, &gw[6], rows, e, 1e-5, &mut gsum, &mut gnorm))?;
        self.record("add_rms_norm", format!("[{rows}x{e}] (sum)"), &gsum, &csum, s, false)?;
        self.record(
            "add_rms_norm",
            format!("[{rows}x{e}] (normed)"),
            &gnorm,
            &cnorm,
            s,
            false,
        )
    }

    /// The residual add and RMSNorm computed inside the q, k, v projections' launch (on
    /// the GPU for one row; in turn otherwise): sum, normed row and two projections.
    fn fused_norm_project(&mut self, c: &FusedCase<B>, qkv: &Qkv<B>) -> Result<()> {
        let (rows, e, kvw, g) = (c.rows, c.e, c.kvw, self.gpu);
        let (cw, gw) = (&c.cw, &c.gw);
        let widths = [e, kvw, kvw];
        let mut cbufs = [rows * e, rows * e, rows * e, rows * kvw, rows * kvw].map(|n| vec![0.0f32; n]);
        let [csum, cnorm, cq, ck, cv] = &mut cbufs;
        let norm = add_norm([&cw[0], &qkv.cq, &cw[6]], 1e-5, csum, cnorm);
        let projections = Projections::Dense([&cw[1], &cw[2], &cw[3]]);
        self.cpu
            .add_rms_norm_project(norm, projections, rows, e, widths, [cq, ck, cv])?;
        let mut gbufs = Vec::new();
        for n in [rows * e, rows * e, rows * e, rows * kvw, rows * kvw] {
            gbufs.push(self.guarded(n)?);
        }
        let [gsum, gnorm, gq, gk, gv] = &mut gbufs[..] else {
            unreachable!("five buffers")
        };
        let (_, s) = self.timed(|| {
            let norm = add_norm([&gw[0], &qkv.gq, &gw[6]], 1e-5, gsum, gnorm);
            let projections = Projections::Dense([&gw[1], &gw[2], &gw[3]]);
            g.add_rms_norm_project(norm, projections, rows, e, widths, [gq, gk, gv])
        })?;
        let op = "add_rms_norm_project";
        for (name, got, expected) in [
            ("sum", &gbufs[0], &cbufs[0]),
            ("normed", &gbufs[1], &cbufs[1]),
            ("q", &gbufs[2], &cbufs[2]),
            ("v", &gbufs[4], &cbufs[4]),
        ] {
            self.record(op, format!("{} ({name})", c.shape), got, expected, s, false)?;
        }
        Ok(())
    }
}
