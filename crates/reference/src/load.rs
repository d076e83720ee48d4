//! Loading the reference: every GGUF weight dequantized exactly (layers in parallel), the
//! projections stacked as a profile needs them, a replay-only subset, and the twin.

use anyhow::{bail, Context, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use resbisect_taps::Config;

use crate::block::Extras;
use crate::project::{load_part, stack, Projection};
use crate::{IoWeights, Layer, Profile, Reference, WeightSource};

/// Dequantize a GGUF weight exactly into a candle tensor of shape `[dims reversed]`.
pub(crate) fn load(src: &dyn WeightSource, name: &str, dtype: DType) -> Result<Tensor> {
    let w = src.weight(name)?;
    let shape: Vec<usize> = w.dims.iter().rev().copied().collect();
    let q = qtensor_from_ggml(w.dtype, w.data, shape, &Device::Cpu).with_context(|| format!("loading {name}"))?;
    let t = q
        .dequantize(&Device::Cpu)
        .with_context(|| format!("dequantizing {name}"))?;
    Ok(t.to_dtype(dtype)?)
}

impl Reference {
    /// Load and dequantize every weight (layers in parallel), to compute under `profile`.
    /// `on_layer` is called as each layer finishes loading.
    pub fn load(
        cfg: Config,
        src: &(dyn WeightSource + Sync),
        dtype: DType,
        profile: Profile,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let all: Vec<usize> = (0..cfg.n_layer).collect();
        let io = IoWeights {
            token_embd: load(src, "token_embd.weight", dtype)?,
            output_norm: load(src, "output_norm.weight", dtype)?,
            output: stack(vec![load_part(src, "output.weight", dtype, profile)?])?,
        };
        Self::load_layers(cfg, src, (dtype, profile), &all, Some(io), on_layer)
    }

    /// Load only `layers`, for local replay of them ([`replay_layer`](Self::replay_layer)):
    /// a fraction of the weights of a full load.
    pub fn load_for_replay(
        cfg: Config,
        src: &(dyn WeightSource + Sync),
        dtype: DType,
        profile: Profile,
        layers: &[usize],
    ) -> Result<Self> {
        Self::load_layers(cfg, src, (dtype, profile), layers, None, &mut |_| {})
    }

    fn load_layers(
        cfg: Config,
        src: &(dyn WeightSource + Sync),
        (dtype, profile): (DType, Profile),
        which: &[usize],
        io: Option<IoWeights>,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            bail!("the reference computes in f32 or f64, not {dtype:?}");
        }
        if let Some(&l) = which.iter().find(|&&l| l >= cfg.n_layer) {
            bail!("layer {l} is outside the model's {} layers", cfg.n_layer);
        }
        // In parallel, a batch of layers at a time, so progress still moves.
        let mut loaded: Vec<(usize, Layer)> = Vec::with_capacity(which.len());
        for batch in which.chunks(rayon::current_num_threads().max(1)) {
            let done: Vec<(usize, Layer)> = batch
                .par_iter()
                .map(|&l| -> Result<(usize, Layer)> {
                    // The tensors of a layer dequantize in parallel too: replay loads only a few layers.
                    const NAMES: [&str; 9] = [
                        "attn_norm",
                        "attn_q",
                        "attn_k",
                        "attn_v",
                        "attn_output",
                        "ffn_norm",
                        "ffn_gate",
                        "ffn_up",
                        "ffn_down",
                    ];
                    let mut w: Vec<_> = NAMES
                        .par_iter()
                        .map(|n| load_part(src, &format!("blk.{l}.{n}.weight"), dtype, profile))
                        .collect::<Result<_>>()?;
                    let mut take = |n: usize| w.drain(..n).collect::<Vec<_>>();
                    let attn_norm = take(1).remove(0).0;
                    let (wqkv, wo) = (stack(take(3))?, stack(take(1))?);
                    let ffn_norm = take(1).remove(0).0;
                    let (w_gate_up, w_down) = (stack(take(2))?, stack(take(1))?);
                    let extras = Extras::load(&cfg, src, l, dtype)?;
                    let layer = Layer {
                        attn_norm,
                        wqkv,
                        wo,
                        ffn_norm,
                        w_gate_up,
                        w_down,
                        extras,
                    };
                    Ok((l, layer))
                })
                .collect::<Result<_>>()?;
            for (l, _) in &done {
                on_layer(*l);
            }
            loaded.extend(done);
        }
        let mut layers: Vec<Option<Layer>> = (0..cfg.n_layer).map(|_| None).collect();
        for (l, layer) in loaded {
            layers[l] = Some(layer);
        }
        let freq_factors = if cfg.variant.rope_freq_factors {
            Some(load(src, "rope_freqs.weight", DType::F64)?.to_vec1::<f64>()?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            dtype,
            profile,
            f64_dots: false,
            io,
            layers,
            freq_factors,
        })
    }

    /// The profile's twin: the same numerics, but every projection and the attention
    /// computed in f64 and rounded back to the compute dtype. It differs from this
    /// reference only as two sound implementations of one profile do (in the order and
    /// precision of their sums), so its distance to this reference measures the noise
    /// a sound engine shows against it: under 8-bit activation quantization a last-bit
    /// difference moves a value across a rounding step, and that noise grows with depth.
    pub fn into_twin(mut self) -> Result<Self> {
        let twin = |p: &Projection| p.to_dtype(DType::F64);
        for layer in self.layers.iter_mut().flatten() {
            layer.wqkv = twin(&layer.wqkv)?;
            layer.wo = twin(&layer.wo)?;
            layer.w_gate_up = twin(&layer.w_gate_up)?;
            layer.w_down = twin(&layer.w_down)?;
        }
        if let Some(io) = &mut self.io {
            io.output = twin(&io.output)?;
        }
        self.f64_dots = true;
        Ok(self)
    }
}
