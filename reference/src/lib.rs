//! The oracle: a llama forward pass on candle-core with exactly dequantized weights,
//! computed in f32 (or f64), with every canonical tap of DESIGN §3 available.
//!
//! Independent from the runtime by construction: this crate depends on nothing of
//! resbisect, so it cannot reuse runtime numerics. It reads weights through
//! [`WeightSource`] and hands captured rows, one dump file group at a time, to a
//! [`TapSink`]; it keeps only one layer's activations alive.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

/// Layer taps in topological order (DESIGN §3), as the reference computes them.
const LAYER_TAPS: [&str; 13] = [
    "attn_norm", "q", "k", "v", "attn", "attn_out", "resid_mid", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "resid_post",
];

/// Queries processed together in attention: bounds the score matrix to
/// `n_head × ATTN_QUERY_CHUNK × seq` whatever the sequence length.
/// Small enough that the causal chunks skip most masked scores, large enough for
/// efficient GEMMs.
const ATTN_QUERY_CHUNK: usize = 128;

#[derive(Debug, Clone)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
}

impl Config {
    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// A weight as stored in GGUF: ggml type, dims in ggml order (`dims[0]` contiguous) and
/// its raw bytes.
pub struct RawWeight<'a> {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub data: &'a [u8],
}

pub trait WeightSource {
    /// The weight under its GGUF name; `output.weight` resolves ties itself.
    fn weight(&self, name: &str) -> Result<RawWeight<'_>>;
}

/// Receives captured taps. Group names are dump file stems: `embed`, `blk.L`, `output`.
pub trait TapSink {
    fn wants(&self, tap_id: &str) -> bool;
    /// `taps` are (canonical id, tensor [n_positions, width]) in topological order.
    fn emit(&mut self, group: &str, taps: Vec<(String, Tensor)>) -> Result<()>;
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections stacked along the output dim: one GEMM instead of three.
    wqkv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    /// Gate and up projections stacked along the output dim.
    w_gate_up: Tensor,
    w_down: Tensor,
}

pub struct Reference {
    cfg: Config,
    dtype: DType,
    token_embd: Tensor,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Tensor,
}

/// Dequantize a GGUF weight exactly into a candle tensor of shape `[dims reversed]`.
fn load(src: &dyn WeightSource, name: &str, dtype: DType) -> Result<Tensor> {
    let w = src.weight(name)?;
    let shape: Vec<usize> = w.dims.iter().rev().copied().collect();
    let q = qtensor_from_ggml(w.dtype, w.data, shape, &Device::Cpu).with_context(|| format!("loading {name}"))?;
    let t = q.dequantize(&Device::Cpu).with_context(|| format!("dequantizing {name}"))?;
    Ok(t.to_dtype(dtype)?)
}

impl Reference {
    /// Load and dequantize every weight. `on_layer` is called after each layer loads.
    pub fn load(cfg: Config, src: &dyn WeightSource, dtype: DType, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            bail!("the reference computes in f32 or f64, not {dtype:?}");
        }
        let token_embd = load(src, "token_embd.weight", dtype)?;
        let output_norm = load(src, "output_norm.weight", dtype)?;
        let output = load(src, "output.weight", dtype)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let w = |n: &str| load(src, &format!("blk.{l}.{n}.weight"), dtype);
            layers.push(Layer {
                attn_norm: w("attn_norm")?,
                wqkv: Tensor::cat(&[w("attn_q")?, w("attn_k")?, w("attn_v")?], 0)?.t()?,
                wo: w("attn_output")?.t()?,
                ffn_norm: w("ffn_norm")?,
                w_gate_up: Tensor::cat(&[w("ffn_gate")?, w("ffn_up")?], 0)?.t()?,
                w_down: w("ffn_down")?.t()?,
            });
            on_layer(l);
        }
        Ok(Self { cfg, dtype, token_embd, layers, output_norm, output })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Run the whole sequence through the model, capturing the taps the sink wants at
    /// `positions` (sorted absolute positions). `on_layer` is called after each layer.
    pub fn forward(&self, tokens: &[u32], positions: &[usize], sink: &mut dyn TapSink, on_layer: &mut dyn FnMut(usize)) -> Result<()> {
        let cfg = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            bail!("no tokens to process");
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            bail!("token id {t} is outside the vocabulary (size {})", cfg.n_vocab);
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= n) {
            bail!("position {p} is outside the {n}-token sequence");
        }
        let pos_idx = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), positions.len(), &Device::Cpu)?;
        let gather = |t: &Tensor| -> Result<Tensor> { Ok(t.contiguous()?.index_select(&pos_idx, 0)?) };

        let ids = Tensor::from_vec(tokens.to_vec(), n, &Device::Cpu)?;
        let mut x = self.token_embd.index_select(&ids, 0)?;
        if sink.wants("embed") {
            sink.emit("embed", vec![("embed".into(), gather(&x)?)])?;
        }
        let (cos, sin) = rope_tables(n, cfg.head_dim(), cfg.rope_base, self.dtype)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let ids: Vec<String> = LAYER_TAPS.iter().map(|t| format!("blk.{l}.{t}")).collect();
            let wanted: Vec<bool> = ids.iter().map(|id| sink.wants(id)).collect();
            let mut captured: Vec<(String, Tensor)> = Vec::new();
            let mut capture = |i: usize, t: &Tensor| -> Result<()> {
                if wanted[i] {
                    captured.push((ids[i].clone(), gather(t)?));
                }
                Ok(())
            };
            let (qw, kvw) = (cfg.n_head * cfg.head_dim(), cfg.n_head_kv * cfg.head_dim());
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            capture(0, &h)?;
            let qkv = h.matmul(&layer.wqkv)?;
            let q = rope(&qkv.narrow(1, 0, qw)?, cfg.n_head, &cos, &sin)?;
            let k = rope(&qkv.narrow(1, qw, kvw)?, cfg.n_head_kv, &cos, &sin)?;
            let v = qkv.narrow(1, qw + kvw, kvw)?.contiguous()?;
            capture(1, &q)?;
            capture(2, &k)?;
            capture(3, &v)?;
            let attn = attention(&q, &k, &v, cfg)?;
            capture(4, &attn)?;
            let attn_out = attn.matmul(&layer.wo)?;
            capture(5, &attn_out)?;
            let resid_mid = (&x + &attn_out)?;
            capture(6, &resid_mid)?;
            let h2 = rms_norm(&resid_mid, &layer.ffn_norm, cfg.rms_eps)?;
            capture(7, &h2)?;
            let gate_up = h2.matmul(&layer.w_gate_up)?;
            let gate = gate_up.narrow(1, 0, cfg.n_ff)?;
            let up = gate_up.narrow(1, cfg.n_ff, cfg.n_ff)?;
            capture(8, &gate)?;
            capture(9, &up)?;
            let act = (gate.silu()? * &up)?;
            capture(10, &act)?;
            let ffn_out = act.matmul(&layer.w_down)?;
            capture(11, &ffn_out)?;
            x = (&resid_mid + &ffn_out)?;
            capture(12, &x)?;
            if !captured.is_empty() {
                sink.emit(&format!("blk.{l}"), captured)?;
            }
            on_layer(l);
        }
        // The output head only at the captured positions: RMSNorm and the projection are
        // per row, so this equals computing everything and gathering afterwards.
        let (want_norm, want_logits) = (sink.wants("final_norm"), sink.wants("logits"));
        if want_norm || want_logits {
            let normed = rms_norm(&gather(&x)?, &self.output_norm, cfg.rms_eps)?;
            let mut out = Vec::new();
            if want_norm {
                out.push(("final_norm".to_string(), normed.clone()));
            }
            if want_logits {
                out.push(("logits".to_string(), normed.matmul(&self.output.t()?)?));
            }
            sink.emit("output", out)?;
        }
        Ok(())
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&scale)?.broadcast_mul(w)?)
}

/// cos/sin of position × frequency, shaped [n, 1, head_dim/2, 1] for broadcasting.
/// Angles are formed in f64 so that f32 runs carry no angle error at long positions.
fn rope_tables(n: usize, head_dim: usize, base: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for i in 0..half {
            let angle = p as f64 * base.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = (n, 1, half, 1);
    Ok((Tensor::from_vec(cos, shape, &Device::Cpu)?.to_dtype(dtype)?, Tensor::from_vec(sin, shape, &Device::Cpu)?.to_dtype(dtype)?))
}

/// Interleaved ("normal") RoPE: pairs (2i, 2i+1) of each head rotate by angle i.
fn rope(x: &Tensor, n_heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let hd = width / n_heads;
    let x = x.reshape((n, n_heads, hd / 2, 2))?;
    let x0 = x.narrow(3, 0, 1)?;
    let x1 = x.narrow(3, 1, 1)?;
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    Ok(Tensor::cat(&[r0, r1], 3)?.reshape((n, width))?)
}

/// Causal grouped-query attention, queries in chunks so the score matrix stays small.
/// q: [n, n_head·hd], k/v: [n, n_head_kv·hd] → [n, n_head·hd].
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &Config) -> Result<Tensor> {
    let (n, _) = q.dims2()?;
    let (hd, h, hkv) = (cfg.head_dim(), cfg.n_head, cfg.n_head_kv);
    let group = h / hkv;
    // [h, n, hd] with heads of one kv group adjacent, then [hkv, group, n, hd].
    let q = q.reshape((n, h, hd))?.transpose(0, 1)?.contiguous()?.reshape((hkv, group, n, hd))?;
    let k = k.reshape((n, hkv, hd))?.transpose(0, 1)?.contiguous()?;
    let v = v.reshape((n, hkv, hd))?.transpose(0, 1)?.contiguous()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::new();
    for start in (0..n).step_by(ATTN_QUERY_CHUNK) {
        let len = ATTN_QUERY_CHUNK.min(n - start);
        let keys = start + len;
        let qc = q.narrow(2, start, len)?.contiguous()?.reshape((hkv, group * len, hd))?;
        let kc = k.narrow(1, 0, keys)?;
        let vc = v.narrow(1, 0, keys)?;
        let scores = qc.matmul(&kc.t()?)?;
        let probs = scores.apply_op1_no_bwd(&CausalSoftmax { scale, rows: len, first_pos: start })?;
        let out = probs.reshape((hkv, group * len, keys))?.matmul(&vc)?;
        // [hkv, group·len, hd] → [h, len, hd] → [len, h·hd]
        outs.push(out.reshape((h, len, hd))?.transpose(0, 1)?.contiguous()?.reshape((len, h * hd))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Scaled, causally masked softmax over the last dim of `[.., rows, keys]` scores, where
/// row i is the query at absolute position `first_pos + i` and sees keys 0..=that.
/// One pass per row instead of a chain of broadcast ops; masked entries are exact zeros.
struct CausalSoftmax {
    scale: f64,
    rows: usize,
    first_pos: usize,
}

impl CausalSoftmax {
    fn apply<T: Float + Send + Sync>(&self, x: &[T], keys: usize) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        let scale = T::from(self.scale).unwrap_or_else(T::one);
        out.par_chunks_mut(keys).zip(x.par_chunks(keys)).enumerate().for_each(|(r, (o, s))| {
            let visible = (self.first_pos + r % self.rows + 1).min(keys);
            let max = s[..visible].iter().fold(T::neg_infinity(), |m, &v| m.max(v * scale));
            let mut sum = T::zero();
            for (oi, &si) in o[..visible].iter_mut().zip(&s[..visible]) {
                *oi = (si * scale - max).exp();
                sum = sum + *oi;
            }
            let inv = T::one() / sum;
            o[..visible].iter_mut().for_each(|v| *v = *v * inv);
        });
        out
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("causal-softmax needs contiguous scores".into()))?;
        let keys = layout.dims()[layout.dims().len() - 1];
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&v[start..end], keys)),
            CpuStorage::F64(v) => CpuStorage::F64(self.apply(&v[start..end], keys)),
            _ => return Err(candle_core::Error::Msg("causal-softmax computes in f32 or f64".into())),
        };
        Ok((out, layout.shape().clone()))
    }
}
