//! `resbisect selftest --perf`: each op of a backend timed at one model preset's decode and
//! prefill shapes, with the bytes it must move and the bandwidth that implies — where the
//! time of a decode step goes, kernel by kernel. Short ops are recorded many times into
//! one graph where the backend records, so launch cost does not hide kernel time; weights
//! rotate over copies larger than the GPU's L2 cache, so they stream as in a real step.

use std::time::Instant;

use super::backend::{AttnShape, Backend, Src, Step};
use crate::error::Result;
use crate::model::Config;

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTiming {
    /// `decode` (one row at position `ctx`) or `prefill` (`ctx` rows).
    pub phase: &'static str,
    pub op: String,
    pub shape: String,
    pub micros: f64,
    /// Bytes the op must read and write at least (weights, KV cache, activations).
    pub bytes: usize,
    /// Times per decode layer (`0` for ops outside the layers).
    pub per_layer: usize,
}

impl OpTiming {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / (self.micros * 1e3)
    }
}

/// Weight copies cycled through: together past this many bytes, larger than any GPU's L2.
const ROTATE_BYTES: usize = 160 << 20;
/// Issues of an op per recording (or per timing without recording).
const REPS: usize = 24;
const TIMED_REPLAYS: usize = 5;

struct Timer<'a, B: Backend> {
    b: &'a B,
    /// The phase the next timings belong to, and whether their ops may be recorded.
    phase: &'static str,
    record: bool,
    results: Vec<OpTiming>,
}

impl<B: Backend> Timer<'_, B> {
    /// Time `issue(i)` for i = 0.. (one op each): recorded and replayed where `self.record`
    /// and the backend allow, otherwise issued back to back and synchronized.
    fn time(
        &mut self,
        op: &str,
        shape: String,
        bytes: usize,
        per_layer: usize,
        mut issue: impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        issue(0)?;
        self.b.sync()?;
        let mut micros = None;
        if self.record && self.b.begin_record()? {
            let mut issued = Ok(());
            for i in 0..REPS {
                issued = issued.and_then(|_| issue(i));
            }
            let graph = self.b.end_record()?;
            issued?;
            if let Some(graph) = graph {
                self.b.replay(&graph)?;
                self.b.sync()?;
                let t0 = Instant::now();
                for _ in 0..TIMED_REPLAYS {
                    self.b.replay(&graph)?;
                }
                self.b.sync()?;
                micros = Some(t0.elapsed().as_secs_f64() * 1e6 / (REPS * TIMED_REPLAYS) as f64);
            }
        }
        let micros = match micros {
            Some(m) => m,
            None => {
                let t0 = Instant::now();
                for i in 0..REPS {
                    issue(i)?;
                }
                self.b.sync()?;
                t0.elapsed().as_secs_f64() * 1e6 / REPS as f64
            }
        };
        self.results.push(OpTiming {
            phase: self.phase,
            op: op.into(),
            shape,
            micros,
            bytes,
            per_layer,
        });
        Ok(())
    }

    /// Copies of an `[n, k]` weight, enough that cycling through them defeats the L2 cache.
    fn weights(&self, n: usize, k: usize) -> Result<Vec<B::Buf>> {
        let bytes = n * k * self.b.dtype().bytes();
        let copies = ROTATE_BYTES.div_ceil(bytes).clamp(1, 16);
        let host: Vec<f32> = (0..n * k).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        (0..copies).map(|_| self.b.upload(&host)).collect()
    }

    fn activations(&self, n: usize) -> Result<B::Buf> {
        let host: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        self.b.upload(&host)
    }
}

/// Time every op of a llama layer of shape `c` at decode (one row after `ctx` cached
/// positions) and at prefill (`ctx` rows), plus the output head.
pub fn run<B: Backend>(b: &B, c: &Config, ctx: usize) -> Result<Vec<OpTiming>> {
    let mut t = Timer {
        b,
        phase: "decode",
        record: true,
        results: Vec::new(),
    };
    let (e, qw, kvw, ff, hd) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff, c.head_dim());
    let (eps, base) = (c.rms_eps as f32, c.rope_base as f32);
    let sz = b.dtype().bytes();
    let (wq, wk, wv) = (t.weights(qw, e)?, t.weights(kvw, e)?, t.weights(kvw, e)?);
    let (wo, wg, wu, wd) = (
        t.weights(e, qw)?,
        t.weights(ff, e)?,
        t.weights(ff, e)?,
        t.weights(e, ff)?,
    );
    let norm_w = t.activations(e)?;
    let cache_rows = ctx + 1;
    let (mut kc, mut vc) = (t.activations(cache_rows * kvw)?, t.activations(cache_rows * kvw)?);
    b.set_step(Step {
        token: 0,
        pos: ctx,
        rope_pos: ctx as f32,
        slot: 0,
    })?;

    for (phase, rows) in [("decode", 1usize), ("prefill", ctx)] {
        let decode = rows == 1;
        (t.phase, t.record) = (phase, decode);
        let x = t.activations(rows * e)?;
        let (mut h, mut sum) = (t.activations(rows * e)?, t.activations(rows * e)?);
        let (mut q, mut k, mut v) = (
            t.activations(rows * qw)?,
            t.activations(rows * kvw)?,
            t.activations(rows * kvw)?,
        );
        let (mut attn, mut ao) = (t.activations(rows * qw)?, t.activations(rows * e)?);
        let (mut g, mut u, mut act, mut f) = (
            t.activations(rows * ff)?,
            t.activations(rows * ff)?,
            t.activations(rows * ff)?,
            t.activations(rows * e)?,
        );
        let act_bytes = |n: usize| rows * n * sz;
        let mm = |n: usize, k: usize| n * k * sz + act_bytes(k) + act_bytes(n);
        let positions: Vec<f32> = (0..rows).map(|p| p as f32).collect();
        let pos_src = if decode { Src::Step } else { Src::Host(&positions) };
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: hd,
            first_pos: if decode { ctx } else { 0 },
            rows,
            from_step: decode,
        };
        let keys = shape.first_pos + rows;

        t.time("rms_norm", format!("[{rows}x{e}]"), 2 * act_bytes(e), 1, |_| {
            b.rms_norm(&x, &norm_w, rows, e, eps, &mut h)
        })?;
        t.time(
            "matmul3 (q, k, v)",
            format!("[{rows}x{e}]·[{qw}+{kvw}+{kvw}]"),
            mm(qw + 2 * kvw, e),
            1,
            |i| {
                let w = [&wq[i % wq.len()], &wk[i % wk.len()], &wv[i % wv.len()]];
                b.matmul3(&h, w, rows, e, [qw, kvw, kvw], [&mut q, &mut k, &mut v])
            },
        )?;
        t.time(
            "rope_append",
            format!("[{rows}x{qw}], [{rows}x{kvw}]"),
            2 * act_bytes(qw) + 4 * act_bytes(kvw),
            1,
            |_| b.rope_append(&mut q, &mut k, &v, &mut kc, &mut vc, shape, pos_src, base),
        )?;
        t.time(
            "attention",
            format!("{rows} rows over {keys} keys"),
            2 * keys * kvw * sz + 2 * act_bytes(qw),
            1,
            |_| b.attention(&q, &kc, &vc, shape, &mut attn),
        )?;
        t.time(
            "matmul (attn_output)",
            format!("[{rows}x{qw}]·[{e}x{qw}]ᵀ"),
            mm(e, qw),
            1,
            |i| b.matmul(&attn, &wo[i % wo.len()], rows, qw, e, &mut ao),
        )?;
        t.time("add_rms_norm", format!("[{rows}x{e}]"), 5 * act_bytes(e), 1, |_| {
            b.add_rms_norm(&x, &ao, &norm_w, rows, e, eps, &mut sum, &mut h)
        })?;
        t.time(
            "gate_up_silu",
            format!("[{rows}x{e}]·[{ff}x{e}]ᵀ x2"),
            2 * mm(ff, e) + act_bytes(ff),
            1,
            |i| {
                b.gate_up_silu(
                    &h,
                    &wg[i % wg.len()],
                    &wu[i % wu.len()],
                    rows,
                    e,
                    ff,
                    &mut g,
                    &mut u,
                    &mut act,
                )
            },
        )?;
        t.time(
            "matmul (ffn_down)",
            format!("[{rows}x{ff}]·[{e}x{ff}]ᵀ"),
            mm(e, ff),
            1,
            |i| b.matmul(&act, &wd[i % wd.len()], rows, ff, e, &mut f),
        )?;
        t.time("add", format!("[{rows}x{e}]"), 3 * act_bytes(e), 1, |_| {
            b.add(&sum, &f, rows * e, &mut h)
        })?;
    }
    drop((wq, wk, wv, wo, wg, wu, wd));

    let head = t.weights(c.n_vocab, e)?;
    let (x, mut logits) = (t.activations(e)?, t.activations(c.n_vocab)?);
    let v = c.n_vocab;
    (t.phase, t.record) = ("decode", true);
    t.time(
        "matmul (output)",
        format!("[1x{e}]·[{v}x{e}]ᵀ"),
        v * e * b.dtype().bytes(),
        0,
        |i| b.matmul(&x, &head[i % head.len()], 1, e, v, &mut logits),
    )?;
    // argmax returns to the host: it cannot be recorded.
    t.record = false;
    t.time("argmax", format!("[1x{v}]"), v * b.dtype().bytes(), 0, |_| {
        b.argmax(&logits, 0, v).map(drop)
    })?;
    Ok(t.results)
}
