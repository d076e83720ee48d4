//! `resbisect selftest --perf`: each op of a backend timed at one model preset's decode and
//! prefill shapes, with the bytes it must move and the bandwidth that implies — where the
//! time of a decode step goes, kernel by kernel. Short ops are recorded many times into
//! one graph where the backend records, so launch cost does not hide kernel time; weights
//! rotate over copies larger than the GPU's L2 cache, so they stream as in a real step.

use std::time::Instant;

use super::backend::{AttnShape, Backend, Input, RopeFreqs, Src, Step};
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

/// A layer's weights, each in copies that defeat the L2 cache, and its norm weight.
struct LayerWeights<B: Backend> {
    wq: Vec<B::Buf>,
    wk: Vec<B::Buf>,
    wv: Vec<B::Buf>,
    wo: Vec<B::Buf>,
    wg: Vec<B::Buf>,
    wu: Vec<B::Buf>,
    wd: Vec<B::Buf>,
    norm: B::Buf,
}

/// The activations of `rows` rows through one layer.
struct Activations<B: Backend> {
    rows: usize,
    x: B::Buf,
    h: B::Buf,
    sum: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    ao: B::Buf,
    g: B::Buf,
    u: B::Buf,
    act: B::Buf,
    f: B::Buf,
}

impl<B: Backend> Timer<'_, B> {
    fn layer_weights(&self, c: &Config) -> Result<LayerWeights<B>> {
        let (e, qw, kvw, ff) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff);
        Ok(LayerWeights {
            wq: self.weights(qw, e)?,
            wk: self.weights(kvw, e)?,
            wv: self.weights(kvw, e)?,
            wo: self.weights(e, qw)?,
            wg: self.weights(ff, e)?,
            wu: self.weights(ff, e)?,
            wd: self.weights(e, ff)?,
            norm: self.activations(e)?,
        })
    }

    fn layer_activations(&self, c: &Config, rows: usize) -> Result<Activations<B>> {
        let (e, qw, kvw, ff) = (c.n_embd, c.q_width(), c.kv_width(), c.n_ff);
        Ok(Activations {
            rows,
            x: self.activations(rows * e)?,
            h: self.activations(rows * e)?,
            sum: self.activations(rows * e)?,
            q: self.activations(rows * qw)?,
            k: self.activations(rows * kvw)?,
            v: self.activations(rows * kvw)?,
            attn: self.activations(rows * qw)?,
            ao: self.activations(rows * e)?,
            g: self.activations(rows * ff)?,
            u: self.activations(rows * ff)?,
            act: self.activations(rows * ff)?,
            f: self.activations(rows * e)?,
        })
    }

    /// The attention half of a layer: norm, q/k/v, RoPE and cache append, attention, output
    /// projection. Decode reads its position from the step record (at `ctx`).
    fn attention_half(
        &mut self,
        c: &Config,
        w: &LayerWeights<B>,
        a: &mut Activations<B>,
        cache: (&mut B::Buf, &mut B::Buf),
        ctx: usize,
    ) -> Result<()> {
        let b = self.b;
        let (e, qw, kvw, rows) = (c.n_embd, c.q_width(), c.kv_width(), a.rows);
        let (eps, base, sz) = (c.rms_eps as f32, c.rope_base as f32, b.dtype().bytes());
        let act_bytes = |n: usize| rows * n * sz;
        let mm = |n: usize, k: usize| n * k * sz + act_bytes(k) + act_bytes(n);
        let decode = rows == 1;
        let positions: Vec<f32> = (0..rows).map(|p| p as f32).collect();
        let pos_src = if decode { Src::Step } else { Src::Host(&positions) };
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim(),
            first_pos: if decode { ctx } else { 0 },
            rows,
            from_step: decode,
            window: None,
        };
        let keys = shape.first_pos + rows;
        let (kc, vc) = cache;
        let Activations {
            x,
            h,
            q,
            k,
            v,
            attn,
            ao,
            ..
        } = a;
        self.time("rms_norm", format!("[{rows}x{e}]"), 2 * act_bytes(e), 1, |_| {
            b.rms_norm(x, &w.norm, rows, e, eps, h)
        })?;
        let qkv_shape = format!("[{rows}x{e}]·[{qw}+{kvw}+{kvw}]");
        self.time("matmul3 (q, k, v)", qkv_shape, mm(qw + 2 * kvw, e), 1, |i| {
            let ws = [&w.wq[i % w.wq.len()], &w.wk[i % w.wk.len()], &w.wv[i % w.wv.len()]];
            b.matmul3(h, ws, rows, e, [qw, kvw, kvw], [&mut *q, &mut *k, &mut *v])
        })?;
        let rope_bytes = 2 * act_bytes(qw) + 4 * act_bytes(kvw);
        self.time(
            "rope_append",
            format!("[{rows}x{qw}], [{rows}x{kvw}]"),
            rope_bytes,
            1,
            |_| b.rope_append(q, k, v, kc, vc, shape, pos_src, RopeFreqs::Base(base)),
        )?;
        let attn_bytes = 2 * keys * kvw * sz + 2 * act_bytes(qw);
        self.time(
            "attention",
            format!("{rows} rows over {keys} keys"),
            attn_bytes,
            1,
            |_| b.attention(q, kc, vc, shape, attn),
        )?;
        let out_shape = format!("[{rows}x{qw}]·[{e}x{qw}]ᵀ");
        self.time("matmul (attn_output)", out_shape, mm(e, qw), 1, |i| {
            b.matmul(attn, &w.wo[i % w.wo.len()], rows, qw, e, ao)
        })
    }

    /// The feed-forward half of a layer: residual add and norm, gate/up and SiLU, down
    /// projection, residual add.
    fn ffn_half(&mut self, c: &Config, w: &LayerWeights<B>, a: &mut Activations<B>) -> Result<()> {
        let b = self.b;
        let (e, ff, rows) = (c.n_embd, c.n_ff, a.rows);
        let (eps, sz) = (c.rms_eps as f32, b.dtype().bytes());
        let act_bytes = |n: usize| rows * n * sz;
        let mm = |n: usize, k: usize| n * k * sz + act_bytes(k) + act_bytes(n);
        let Activations {
            x,
            h,
            sum,
            ao,
            g,
            u,
            act,
            f,
            ..
        } = a;
        self.time("add_rms_norm", format!("[{rows}x{e}]"), 5 * act_bytes(e), 1, |_| {
            b.add_rms_norm(x, ao, &w.norm, rows, e, eps, sum, h)
        })?;
        let gate_up_shape = format!("[{rows}x{e}]·[{ff}x{e}]ᵀ x2");
        self.time("gate_up_silu", gate_up_shape, 2 * mm(ff, e) + act_bytes(ff), 1, |i| {
            b.gate_up_silu(
                Input::Rows(h),
                &w.wg[i % w.wg.len()],
                &w.wu[i % w.wu.len()],
                rows,
                e,
                ff,
                g,
                u,
                act,
            )
        })?;
        let down_shape = format!("[{rows}x{ff}]·[{e}x{ff}]ᵀ");
        self.time("matmul (ffn_down)", down_shape, mm(e, ff), 1, |i| {
            b.matmul(act, &w.wd[i % w.wd.len()], rows, ff, e, f)
        })?;
        self.time("add", format!("[{rows}x{e}]"), 3 * act_bytes(e), 1, |_| {
            b.add(sum, f, rows * e, h)
        })
    }

    /// The output head and the greedy pick.
    fn head(&mut self, c: &Config) -> Result<()> {
        let b = self.b;
        let (e, v) = (c.n_embd, c.n_vocab);
        let head = self.weights(v, e)?;
        let (x, mut logits) = (self.activations(e)?, self.activations(v)?);
        (self.phase, self.record) = ("decode", true);
        self.time(
            "matmul (output)",
            format!("[1x{e}]·[{v}x{e}]ᵀ"),
            v * e * b.dtype().bytes(),
            0,
            |i| b.matmul(&x, &head[i % head.len()], 1, e, v, &mut logits),
        )?;
        // argmax returns to the host: it cannot be recorded.
        self.record = false;
        self.time("argmax", format!("[1x{v}]"), v * b.dtype().bytes(), 0, |_| {
            b.argmax(&logits, 0, v).map(drop)
        })
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
    let weights = t.layer_weights(c)?;
    let cache_values = (ctx + 1) * c.kv_width();
    let (mut kc, mut vc) = (t.activations(cache_values)?, t.activations(cache_values)?);
    b.set_step(Step {
        token: 0,
        pos: ctx,
        rope_pos: ctx as f32,
        slot: 0,
    })?;
    for (phase, rows) in [("decode", 1usize), ("prefill", ctx)] {
        (t.phase, t.record) = (phase, rows == 1);
        let mut a = t.layer_activations(c, rows)?;
        t.attention_half(c, &weights, &mut a, (&mut kc, &mut vc), ctx)?;
        t.ffn_half(c, &weights, &mut a)?;
    }
    // The layer's weights go before the head's arrive, as in the run before.
    drop(weights);
    t.head(c)?;
    Ok(t.results)
}
