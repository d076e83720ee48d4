//! The oracle: a llama-family forward pass (llama, qwen2, qwen3, gemma3: the config's
//! `Variant`) on candle-core with exactly dequantized weights, computed in f32 (or f64),
//! with every canonical tap of docs/taps.md available.
//!
//! Independent from the runtime by construction: of resbisect it depends only on the tap
//! contract (resbisect-taps, which holds no numerics), so it cannot reuse runtime
//! numerics. It reads weights through [`WeightSource`] and hands captured rows, one dump
//! file group at a time, to a [`TapSink`]; it keeps only one layer's activations alive.
//! The numerics themselves are in [`ops`] (norm, faults), [`attention`], [`rope`] and
//! [`block`] (what differs between architectures); a numerics [`Profile`] (rounding
//! where an engine stores, [`profile`]) applies in [`project`]; [`load`] dequantizes the
//! weights.

mod attention;
mod blas;
mod block;
mod fused;
mod ggml_rope;
mod load;
mod mufu;
mod ops;
mod profile;
mod project;
pub mod rope;
mod stream;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use resbisect_taps::{Config, Faults, FileStem, LayerTap, Tap, TapFault};

use attention::{attention, Heads};
pub use blas::{backend as gemm_backend, matmul as gemm};
use block::{gated, head_rms_norm, scale_embeddings, Extras};
use load::load;
pub use ops::gather;
pub use ops::NormRule;
use ops::{apply_faults, rms_norm, row_eps, Eps, Norm};
pub use profile::{ActRounding, CacheType, Profile};
use project::{attention_inputs, Projection};
use rope::{faulty_rope_tables, frequencies, rope, rope_tables, LayerTables};
use stream::Span;
pub use stream::{GrowingRows, KvCache};

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

/// Receives captured taps, grouped by the dump file that holds them.
pub trait TapSink {
    fn wants(&self, tap: Tap) -> bool;
    /// `taps` are (tap, tensor [n_positions, width]) in topological order.
    fn emit(&mut self, group: FileStem, taps: Vec<(Tap, Tensor)>) -> Result<()>;
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections stacked along the output dim: one GEMM instead of three.
    wqkv: Projection,
    wo: Projection,
    ffn_norm: Tensor,
    /// Gate and up projections stacked along the output dim.
    w_gate_up: Projection,
    w_down: Projection,
    /// The architecture's optional weights (bias, q/k norms, post norms).
    extras: Extras,
}

pub struct Reference {
    cfg: Config,
    dtype: DType,
    /// The engine numerics the oracle imitates ([`Profile::Exact`]: none).
    profile: Profile,
    /// Projections and attention in f64 around `dtype`'s other ops ([`Reference::into_twin`]).
    f64_dots: bool,
    /// Weights outside the layers; absent in a reference loaded only for layer replay.
    io: Option<IoWeights>,
    /// `None` for layers a replay-only reference did not load.
    layers: Vec<Option<Layer>>,
    /// `rope_freqs.weight` (Llama 3.x), when the model has it.
    freq_factors: Option<Vec<f64>>,
}

struct IoWeights {
    token_embd: Tensor,
    output_norm: Tensor,
    output: Projection,
}

impl Reference {
    fn io(&self) -> Result<&IoWeights> {
        self.io
            .as_ref()
            .context("this reference was loaded for layer replay only: no embedding or output head")
    }

    /// RoPE cos/sin tables of layer `l` at `positions`: exact (angles in f64) or as the
    /// profile's engine forms them.
    fn rope_tables_of(&self, l: usize, positions: &[f64]) -> Result<(Tensor, Tensor)> {
        let factors = self.freq_factors.as_deref();
        if self.profile.rope_angles_stepwise_f32() {
            return ggml_rope::ggml_cpu_rope_tables(&self.cfg, factors, l, positions, self.dtype);
        }
        rope_tables(positions, &frequencies(&self.cfg, factors, l)?, self.dtype)
    }

    fn layer_weights(&self, l: usize) -> Result<&Layer> {
        match self.layers.get(l) {
            Some(Some(layer)) => Ok(layer),
            Some(None) => bail!("layer {l} was not loaded (replay-only reference)"),
            None => bail!("layer {l} is outside the model's {} layers", self.cfg.n_layer),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// RMSNorm with epsilons `eps` under this oracle's profile.
    fn norm(&self, eps: Eps) -> Norm {
        Norm {
            eps,
            rule: self.profile.norm_rule(),
        }
    }

    pub fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }

    pub fn n_embd(&self) -> usize {
        self.cfg.n_embd
    }

    /// Run the whole sequence through the model, capturing the taps the sink wants at
    /// `positions` (sorted absolute positions). `on_layer` is called after each layer.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<()> {
        self.forward_keeping(tokens, positions, faults, sink, &mut |tap, _| {
            if let Tap::Layer(l, LayerTap::ResidPost) = tap {
                on_layer(l)
            }
        })
    }

    /// As [`forward`](Self::forward), showing `keep(tap, x)` every position's rows of each
    /// tap it computes (`embed`, then each layer's taps in order, `resid_post` last), so
    /// that a caller can keep what it needs: resuming from the residual stream with
    /// [`run_layers`](Self::run_layers), say.
    pub fn forward_keeping(
        &self,
        tokens: &[u32],
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
        keep: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<()> {
        let cfg = &self.cfg;
        let mut x = self.embed(tokens, positions, faults, sink)?;
        keep(Tap::Embed, &x);
        // Layers past the last one anything is captured from cannot change the dump.
        let wants_output = sink.wants(Tap::FinalNorm) || sink.wants(Tap::Logits);
        let last_layer = if wants_output {
            Some(cfg.n_layer - 1)
        } else {
            (0..cfg.n_layer)
                .rev()
                .find(|&l| LayerTap::ALL.iter().any(|&t| sink.wants(Tap::Layer(l, t))))
        };
        if let Some(last) = last_layer {
            x = self.run_layers(x, 0, last, positions, faults, sink, keep)?;
        }
        if wants_output {
            self.head(&x, positions, faults, sink)?;
        }
        Ok(())
    }

    /// Embed `tokens`, capturing `embed` at `positions` when the sink wants it.
    pub fn embed(
        &self,
        tokens: &[u32],
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
    ) -> Result<Tensor> {
        self.embed_at(0, tokens, positions, faults, sink)
    }

    /// As [`embed`](Self::embed) for `tokens` at positions `start..`; `positions` are
    /// absolute, all in that span.
    fn embed_at(
        &self,
        start: usize,
        tokens: &[u32],
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
    ) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 {
            bail!("no tokens to process");
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            bail!("token id {t} is outside the vocabulary (size {})", self.cfg.n_vocab);
        }
        let local = stream::local_rows(positions, start, n)?;
        let ids = Tensor::from_vec(tokens.to_vec(), n, &Device::Cpu)?;
        let rows = scale_embeddings(&self.cfg, self.io()?.token_embd.index_select(&ids, 0)?)?;
        let x = apply_faults(faults, Tap::Embed, rows, start)?;
        if sink.wants(Tap::Embed) {
            sink.emit(FileStem::Embed, vec![(Tap::Embed, gather(&x, &local)?)])?;
        }
        Ok(x)
    }

    /// Layers `first..=last` over the residual stream `x` of positions `0..rows`
    /// (injected faults applied, wanted taps captured at `positions`); `keep(tap, t)` sees
    /// every row of each layer tap as computed, `resid_post` (the layer's output) last.
    /// Returns the stream after layer `last`.
    // Eight independent inputs of one public step (range, rows, faults, sink, observer).
    #[allow(clippy::too_many_arguments)]
    pub fn run_layers(
        &self,
        x: Tensor,
        first: usize,
        last: usize,
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
        keep: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<Tensor> {
        self.run_layers_over(x, &mut Span::whole(), first, last, positions, faults, sink, keep)
    }

    /// As [`run_layers`](Self::run_layers) over the rows of `span` (positions
    /// `span.start..`), attending to the keys and values its cache holds before them.
    #[allow(clippy::too_many_arguments)]
    fn run_layers_over(
        &self,
        mut x: Tensor,
        span: &mut Span,
        first: usize,
        last: usize,
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
        keep: &mut dyn FnMut(Tap, &Tensor),
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (start, n) = (span.start, x.dim(0)?);
        if last >= cfg.n_layer || first > last {
            bail!("layers {first}..={last} are outside the model's {} layers", cfg.n_layer);
        }
        let local = stream::local_rows(positions, start, n)?;
        let true_positions: Vec<f64> = (start..start + n).map(|p| p as f64).collect();
        let factors = self.freq_factors.as_deref();
        let tables = LayerTables::new(cfg, |l| self.rope_tables_of(l, &true_positions))?;
        let norm = self.norm(row_eps(faults, cfg.rms_eps, &(start..start + n).collect::<Vec<_>>()));
        for l in first..=last {
            let wanted = LayerTap::ALL.map(|t| sink.wants(Tap::Layer(l, t)));
            let mut captured: Vec<(Tap, Tensor)> = Vec::new();
            // Perturb (when injected), capture (when wanted), show, and hand the tensor on.
            let mut tap = |which: LayerTap, t: Tensor| -> Result<Tensor> {
                let t = apply_faults(faults, Tap::Layer(l, which), t, start)?;
                if wanted[which.index()] {
                    captured.push((Tap::Layer(l, which), gather(&t, &local)?));
                }
                keep(Tap::Layer(l, which), &t);
                Ok(t)
            };
            let faulty_rope = match faults.rope_for(l) {
                // Tables from position 0, of which the pass's rows are the last.
                Some(f) if f.from < start + n => {
                    let (cos, sin) = faulty_rope_tables(start + n, f, &frequencies(cfg, factors, l)?, self.dtype)?;
                    Some((cos.narrow(0, start, n)?, sin.narrow(0, start, n)?))
                }
                _ => None,
            };
            let (cos, sin) = faulty_rope
                .as_ref()
                .map(|(c, s)| (c, s))
                .unwrap_or_else(|| tables.of(cfg, l));
            x = self.layer(l, &x, cos, sin, &norm, &mut span.at(l), &mut tap)?;
            if !captured.is_empty() {
                sink.emit(FileStem::Layer(l), captured)?;
            }
        }
        Ok(x)
    }

    /// The output head at `positions` of the final residual stream `x`: RMSNorm and the
    /// projection are per row, so only the captured rows are computed.
    pub fn head(&self, x: &Tensor, positions: &[usize], faults: &Faults, sink: &mut dyn TapSink) -> Result<()> {
        self.head_at(x, 0, positions, faults, sink)
    }

    /// As [`head`](Self::head) when the rows of `x` hold positions `start..`.
    fn head_at(
        &self,
        x: &Tensor,
        start: usize,
        positions: &[usize],
        faults: &Faults,
        sink: &mut dyn TapSink,
    ) -> Result<()> {
        let (want_norm, want_logits) = (sink.wants(Tap::FinalNorm), sink.wants(Tap::Logits));
        if !want_norm && !want_logits {
            return Ok(());
        }
        // Faults address absolute positions; on gathered rows they apply by index.
        let gathered_faults = Faults {
            taps: faults
                .taps
                .iter()
                .map(|f| TapFault {
                    from: positions.iter().position(|&p| p >= f.from).unwrap_or(positions.len()),
                    ..f.clone()
                })
                .collect(),
            rope: Vec::new(),
            norm: None,
        };
        let io = self.io()?;
        let norm = self.norm(row_eps(faults, self.cfg.rms_eps, positions));
        let local = stream::local_rows(positions, start, x.dim(0)?)?;
        let normed = rms_norm(&gather(x, &local)?, &io.output_norm, &norm)?;
        let normed = apply_faults(&gathered_faults, Tap::FinalNorm, normed, 0)?;
        let mut out = Vec::new();
        if want_norm {
            out.push((Tap::FinalNorm, normed.clone()));
        }
        if want_logits {
            let logits = io.output.apply(&normed, self.profile)?;
            out.push((Tap::Logits, apply_faults(&gathered_faults, Tap::Logits, logits, 0)?));
        }
        sink.emit(FileStem::Output, out)
    }

    /// One transformer block over all rows of `x`, attending to the keys and values `kv`
    /// holds before them; `tap(which, t)` sees each of the layer's taps in order and hands
    /// on what the block continues with.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        norm: &Norm,
        kv: &mut stream::LayerKv,
        tap: &mut dyn FnMut(LayerTap, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (cfg, layer) = (&self.cfg, self.layer_weights(l)?);
        let (qw, kvw) = (cfg.n_head * cfg.head_dim(), cfg.n_head_kv * cfg.head_dim());
        let style = cfg.variant.rope_style;
        let h = tap(LayerTap::AttnNorm, rms_norm(x, &layer.attn_norm, norm)?)?;
        let qkv = project(layer, &h, 0, qw + 2 * kvw, self.profile)?;
        let q_in = tap(
            LayerTap::QPreRope,
            qk_norm(layer, cfg, LayerTap::QPreRope, &qkv, 0, qw, norm)?,
        )?;
        let k_in = tap(
            LayerTap::KPreRope,
            qk_norm(layer, cfg, LayerTap::KPreRope, &qkv, qw, kvw, norm)?,
        )?;
        let q = tap(LayerTap::Q, rope(&q_in, cfg.n_head, cos, sin, style)?)?;
        let k = tap(LayerTap::K, rope(&k_in, cfg.n_head_kv, cos, sin, style)?)?;
        let v = tap(LayerTap::V, qkv.narrow(1, qw + kvw, kvw)?.contiguous()?)?;
        let (k, v, positions) = kv.extend(k, v)?;
        let attn = tap(LayerTap::Attn, self.attend(&q, &k, &v, &positions, cfg.window_of(l))?)?;
        self.layer_rest(layer, x, attn, norm, tap)
    }

    /// The block after attention, for the rows of `x` that `attn` holds.
    fn layer_rest(
        &self,
        layer: &Layer,
        x: &Tensor,
        attn: Tensor,
        norm: &Norm,
        tap: &mut dyn FnMut(LayerTap, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let post = layer.extras.post_norms.as_ref();
        let mut attn_out = tap(LayerTap::AttnOut, layer.wo.apply(&attn, self.profile)?)?;
        if let Some((w, _)) = post {
            attn_out = tap(LayerTap::AttnPostNorm, rms_norm(&attn_out, w, norm)?)?;
        }
        let resid_mid = tap(LayerTap::ResidMid, (x + &attn_out)?)?;
        let h2 = tap(LayerTap::FfnNorm, rms_norm(&resid_mid, &layer.ffn_norm, norm)?)?;
        let gate_up = layer.w_gate_up.apply(&h2, self.profile)?;
        let gate = tap(LayerTap::FfnGate, gate_up.narrow(1, 0, cfg.n_ff)?)?;
        let up = tap(LayerTap::FfnUp, gate_up.narrow(1, cfg.n_ff, cfg.n_ff)?)?;
        let act = tap(
            LayerTap::FfnAct,
            gated(cfg, &gate, &up, self.profile.gelu_through_f16_table())?,
        )?;
        let mut ffn_out = tap(LayerTap::FfnOut, layer.w_down.apply(&act, self.profile)?)?;
        if let Some((_, w)) = post {
            ffn_out = tap(LayerTap::FfnPostNorm, rms_norm(&ffn_out, w, norm)?)?;
        }
        tap(LayerTap::ResidPost, (&resid_mid + &ffn_out)?)
    }

    /// Attention of queries `q` at `positions` over keys/values `k`, `v` of positions
    /// `0..` (within `window`), as stored and multiplied under the profile (KV cache and
    /// f16 rounding).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, positions: &[usize], window: Option<usize>) -> Result<Tensor> {
        let (q, k, v) = attention_inputs(self.profile, q, k, v)?;
        let dots = if self.f64_dots { DType::F64 } else { self.dtype };
        let out = attention(
            &q.to_dtype(dots)?,
            &k.to_dtype(dots)?,
            &v.to_dtype(dots)?,
            positions,
            Heads::of(&self.cfg),
            window,
            self.profile.attention_in_f16(),
        )?;
        Ok(out.to_dtype(self.dtype)?)
    }

    /// Local replay: recompute layer `l` from a given residual-stream input (`rows × n_embd`
    /// f32 values for positions `0..rows`, e.g. another engine's dumped `resid_post` of
    /// layer `l - 1`) at the positions `at` (ascending). Keys and values come from every
    /// row, everything else only from the rows asked for, so replaying a few positions of a
    /// long prompt costs a small part of the layer. Returns the layer's taps, in order, as
    /// `[at.len(), width]` f32 tensors.
    pub fn replay_layer(&self, l: usize, input: &[f32], rows: usize, at: &[usize]) -> Result<Vec<(Tap, Tensor)>> {
        let cfg = &self.cfg;
        let layer = self.layer_weights(l)?;
        if rows == 0 || input.len() != rows * cfg.n_embd {
            bail!(
                "replay of layer {l}: {} input values are not {rows} rows of {}",
                input.len(),
                cfg.n_embd
            );
        }
        if at.is_empty() || at.windows(2).any(|w| w[0] >= w[1]) || at[at.len() - 1] >= rows {
            bail!("replay of layer {l}: positions must ascend within 0..{rows}");
        }
        let (qw, kvw) = (cfg.n_head * cfg.head_dim(), cfg.n_head_kv * cfg.head_dim());
        let x = Tensor::from_slice(input, (rows, cfg.n_embd), &Device::Cpu)?.to_dtype(self.dtype)?;
        let style = cfg.variant.rope_style;
        let all: Vec<f64> = (0..rows).map(|p| p as f64).collect();
        let (cos, sin) = self.rope_tables_of(l, &all)?;
        let norm = self.norm(Eps::Model(cfg.rms_eps));
        let h = rms_norm(&x, &layer.attn_norm, &norm)?;
        let kv = project(layer, &h, qw, 2 * kvw, self.profile)?;
        let k_in = qk_norm(layer, cfg, LayerTap::KPreRope, &kv, 0, kvw, &norm)?;
        let k = rope(&k_in, cfg.n_head_kv, &cos, &sin, style)?;
        let v = kv.narrow(1, kvw, kvw)?.contiguous()?;
        let picked: Vec<f64> = at.iter().map(|&p| p as f64).collect();
        let (cos_at, sin_at) = self.rope_tables_of(l, &picked)?;
        let h_at = gather(&h, at)?;
        let q_proj = project(layer, &h_at, 0, qw, self.profile)?;
        let q_in = qk_norm(layer, cfg, LayerTap::QPreRope, &q_proj, 0, qw, &norm)?;
        let q = rope(&q_in, cfg.n_head, &cos_at, &sin_at, style)?;
        let mut out = Vec::with_capacity(LayerTap::ALL.len());
        let mut record = |which: LayerTap, t: Tensor| -> Result<Tensor> {
            out.push((Tap::Layer(l, which), t.to_dtype(DType::F32)?));
            Ok(t)
        };
        let (k_at, v_at) = (gather(&k, at)?, gather(&v, at)?);
        record(LayerTap::AttnNorm, h_at)?;
        record(LayerTap::QPreRope, q_in)?;
        record(LayerTap::KPreRope, gather(&k_in, at)?)?;
        record(LayerTap::Q, q.clone())?;
        record(LayerTap::K, k_at)?;
        record(LayerTap::V, v_at)?;
        let attn = record(LayerTap::Attn, self.attend(&q, &k, &v, at, cfg.window_of(l))?)?;
        self.layer_rest(layer, &gather(&x, at)?, attn, &norm, &mut record)?;
        Ok(out)
    }
}

/// Columns `from..from + width` of the stacked Q/K/V projection of `h`, with the bias
/// where the layer has one, under `profile`.
fn project(layer: &Layer, h: &Tensor, from: usize, width: usize, profile: Profile) -> Result<Tensor> {
    let out = layer.wqkv.apply_cols(h, profile, from, width)?;
    Ok(match &layer.extras.qkv_bias {
        Some(b) => out.broadcast_add(&b.narrow(0, from, width)?)?,
        None => out,
    })
}

/// Columns `from..from + width` of `proj`, the query or key (`which`: `QPreRope` or
/// `KPreRope`) as it enters RoPE: normed per head where the layer has Q/K norms.
// Seven plain inputs of one step; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn qk_norm(
    layer: &Layer,
    cfg: &Config,
    which: LayerTap,
    proj: &Tensor,
    from: usize,
    width: usize,
    norm: &Norm,
) -> Result<Tensor> {
    let t = proj.narrow(1, from, width)?.contiguous()?;
    match &layer.extras.qk_norm {
        Some((wq, wk)) => {
            let w = if which == LayerTap::QPreRope { wq } else { wk };
            head_rms_norm(&t, w, width / cfg.head_dim(), norm)
        }
        None => Ok(t),
    }
}
