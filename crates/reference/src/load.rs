//! Loading the reference: every GGUF weight dequantized exactly (layers in parallel), the
//! projections stacked as a profile needs them, a replay-only subset, and the twin.

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, BlockQ8_1,
    GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use resbisect_taps::Config;

use crate::block::Extras;
use crate::project::{load_stacked, Projection};
use crate::{IoWeights, Layer, Profile, RawWeight, Reference, WeightSource};

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

/// Dequantize `w` exactly into `out` (its values in GGUF order, f32) with candle's block
/// decoders, reading the blocks where they lie: no copy of them and no tensor of its own,
/// so a load touches each weight's memory once. Blocks not aligned for their type (a
/// GGUF with `general.alignment` below it, weights in a byte buffer) go through
/// [`load`] instead.
pub(crate) fn dequantize_into(src: &dyn WeightSource, name: &str, w: &RawWeight, out: &mut [f32]) -> Result<()> {
    let decoded = match w.dtype {
        GgmlDType::F32 => decode::<f32>(w.data, out),
        GgmlDType::F16 => decode::<half::f16>(w.data, out),
        GgmlDType::BF16 => decode::<half::bf16>(w.data, out),
        GgmlDType::Q4_0 => decode::<BlockQ4_0>(w.data, out),
        GgmlDType::Q4_1 => decode::<BlockQ4_1>(w.data, out),
        GgmlDType::Q5_0 => decode::<BlockQ5_0>(w.data, out),
        GgmlDType::Q5_1 => decode::<BlockQ5_1>(w.data, out),
        GgmlDType::Q8_0 => decode::<BlockQ8_0>(w.data, out),
        GgmlDType::Q8_1 => decode::<BlockQ8_1>(w.data, out),
        GgmlDType::Q2K => decode::<BlockQ2K>(w.data, out),
        GgmlDType::Q3K => decode::<BlockQ3K>(w.data, out),
        GgmlDType::Q4K => decode::<BlockQ4K>(w.data, out),
        GgmlDType::Q5K => decode::<BlockQ5K>(w.data, out),
        GgmlDType::Q6K => decode::<BlockQ6K>(w.data, out),
        // candle's loader refuses Q8_K weights (an activation type); so does the fallback.
        GgmlDType::Q8K => Ok(false),
    }
    .with_context(|| format!("dequantizing {name}"))?;
    if !decoded {
        let t = load(src, name, DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        ensure!(
            t.len() == out.len(),
            "{name}: {} values, expected {}",
            t.len(),
            out.len()
        );
        out.copy_from_slice(&t);
    }
    Ok(())
}

/// `data` as blocks of `B` decoded into `out`; false when `data` is not aligned for `B`
/// (or the type is one to leave to candle's loader).
fn decode<B: GgmlType>(data: &[u8], out: &mut [f32]) -> Result<bool> {
    let size = std::mem::size_of::<B>();
    let blocks = out.len() / B::BLCK_SIZE;
    ensure!(
        out.len().is_multiple_of(B::BLCK_SIZE) && data.len() == blocks * size,
        "{} bytes of {:?} blocks do not hold {} values",
        data.len(),
        B::DTYPE,
        out.len()
    );
    if !data.as_ptr().cast::<B>().is_aligned() {
        return Ok(false);
    }
    // SAFETY: candle's block types (and f32, f16, bf16) are `repr(C)` plain data, valid
    // for any bytes, and candle's own GGUF loader views file bytes as them the same way;
    // `data` holds exactly `blocks` of them and is aligned for `B` (checked above).
    let blocks = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<B>(), blocks) };
    B::to_float(blocks, out);
    Ok(true)
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
            output: load_stacked(src, &["output.weight".to_string()], dtype, profile)?,
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
                    // The projections of a layer dequantize in parallel too: replay loads only a few layers.
                    let names = |names: &[&str]| -> Vec<String> {
                        names.iter().map(|n| format!("blk.{l}.{n}.weight")).collect()
                    };
                    let groups = [
                        names(&["attn_q", "attn_k", "attn_v"]),
                        names(&["attn_output"]),
                        names(&["ffn_gate", "ffn_up"]),
                        names(&["ffn_down"]),
                    ];
                    let mut projections: Vec<Projection> = groups
                        .par_iter()
                        .map(|group| load_stacked(src, group, dtype, profile))
                        .collect::<Result<_>>()?;
                    let mut take = || projections.remove(0);
                    let (wqkv, wo, w_gate_up, w_down) = (take(), take(), take(), take());
                    let attn_norm = load(src, &format!("blk.{l}.attn_norm.weight"), dtype)?;
                    let ffn_norm = load(src, &format!("blk.{l}.ffn_norm.weight"), dtype)?;
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

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::{dequantize_into, load, DType, RawWeight, Result, WeightSource};

    /// One weight's GGUF bytes, `offset` bytes into an 8-byte aligned buffer.
    struct OneWeight {
        dtype: GgmlDType,
        dims: Vec<usize>,
        buf: Vec<u64>,
        offset: usize,
        len: usize,
    }

    impl WeightSource for OneWeight {
        fn weight(&self, _name: &str) -> anyhow::Result<RawWeight<'_>> {
            let bytes: &[u8] = bytemuck_bytes(&self.buf);
            Ok(RawWeight {
                dtype: self.dtype,
                dims: self.dims.clone(),
                data: &bytes[self.offset..self.offset + self.len],
            })
        }
    }

    fn bytemuck_bytes(words: &[u64]) -> &[u8] {
        // SAFETY: u64 has no padding; any u8 view of it is valid.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
    }

    /// Every GGUF type candle quantizes: the direct decode (aligned blocks) and its
    /// fallback (blocks one byte off) give exactly candle's dequantized tensor, bit for bit.
    #[test]
    fn dequantize_into_matches_candles_dequantize() -> Result<()> {
        let (rows, cols) = (3, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        use GgmlDType::*;
        for dtype in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            let data = QTensor::quantize(&t, dtype)?.data()?.into_owned();
            for offset in [0, 1] {
                let mut buf = vec![0u64; (data.len() + offset).div_ceil(8)];
                let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) };
                bytes[offset..offset + data.len()].copy_from_slice(&data);
                let src = OneWeight {
                    dtype,
                    dims: vec![cols, rows],
                    buf,
                    offset,
                    len: data.len(),
                };
                let expected = load(&src, "w", DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut got = vec![f32::NAN; rows * cols];
                dequantize_into(&src, "w", &src.weight("w")?, &mut got)?;
                let same = got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} at offset {offset}");
            }
        }
        Ok(())
    }
}
