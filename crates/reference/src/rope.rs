//! Rotary position embedding: the per-dim inverse-frequency table of a layer (base,
//! `rope_freqs.weight` factors, linear or YaRN scaling), cos/sin tables (angles in f64,
//! or corrupted by an injected fault) and the rotation itself, on adjacent pairs
//! ("normal", llama GGUFs) or on halves (NeoX: qwen2, qwen3, gemma3).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use resbisect_taps::{Config, RopeFault, RopeScaling, RopeStyle};

/// Inverse frequencies of a layer's RoPE, one per rotated pair, and the magnitude scale
/// applied to cos and sin (YaRN's mscale; 1 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Frequencies {
    pub inv_freq: Vec<f64>,
    pub mscale: f64,
}

/// The RoPE frequencies of layer `layer`, for head dim d = `cfg.head_dim()`:
/// θ_i = base^(-2i/d) / factor_i (`rope_freqs.weight`, Llama 3.x), then scaled.
///
/// - Linear: θ_i / factor (positions divided by the factor).
/// - YaRN (Peng et al. 2023, arXiv:2309.00071), as llama.cpp's `rope_yarn` (ggml-cpu
///   ops.cpp) with ext_factor 1: with low = ⌊d·ln(L/(2π·β_fast)) / (2 ln base)⌋ and high =
///   ⌈…β_slow…⌉ clamped to [0, d-1] (L = original context), ramp_i = 1 - clamp((i - low) /
///   max(0.001, high - low), 0, 1), θ'_i = θ_i/factor·(1 - ramp_i) + θ_i·ramp_i, and
///   mscale = attn_factor·(1 + 0.1·ln factor). HF's `_compute_yarn_parameters` mixes the
///   same inverse frequencies (its ramp is the same function of i); it differs only when
///   the config gives `attention_factor`, which HF uses *instead of* 0.1·ln(factor) + 1
///   where llama.cpp multiplies the two. The GGUF's `rope.scaling.attn_factor` follows
///   llama.cpp's meaning.
///
/// Sliding-window layers use `local_rope_base` and no scaling (llama.cpp's
/// `rope_freq_scale_train_swa = 1`; HF gemma3's local rotary embedding is unscaled).
pub fn frequencies(cfg: &Config, factors: Option<&[f64]>, layer: usize) -> Result<Frequencies> {
    let d = cfg.head_dim();
    let half = d / 2;
    let base = cfg.rope_base_of(layer);
    if let Some(f) = factors {
        if f.len() != half {
            bail!(
                "rope_freqs.weight has {} factors, expected head_dim/2 = {half}",
                f.len()
            );
        }
        if let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            bail!("rope_freqs.weight holds {bad}; every factor must be finite and > 0");
        }
    }
    let theta: Vec<f64> = (0..half)
        .map(|i| base.powf(-2.0 * i as f64 / d as f64) / factors.map_or(1.0, |f| f[i]))
        .collect();
    let scaling = if cfg.window_of(layer).is_some() {
        RopeScaling::None
    } else {
        cfg.variant.rope_scaling
    };
    Ok(match scaling {
        RopeScaling::None => Frequencies {
            inv_freq: theta,
            mscale: 1.0,
        },
        RopeScaling::Linear { factor } => Frequencies {
            inv_freq: theta.iter().map(|t| t / factor).collect(),
            mscale: 1.0,
        },
        RopeScaling::Yarn {
            factor,
            original_context,
            attn_factor,
            beta_fast,
            beta_slow,
        } => {
            let (low, high) = yarn_correction_range(d, base, original_context as f64, beta_fast, beta_slow);
            let inv_freq = theta
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let extrapolate = 1.0 - ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                    t / factor * (1.0 - extrapolate) + t * extrapolate
                })
                .collect();
            // HF's get_mscale: 1 for factor <= 1, where llama.cpp would shrink (ln < 0).
            let mscale = if factor > 1.0 { 1.0 + 0.1 * factor.ln() } else { 1.0 };
            Frequencies {
                inv_freq,
                mscale: attn_factor * mscale,
            }
        }
    })
}

/// YaRN's dims where interpolation starts and ends: the pair index whose wavelength
/// makes `beta` rotations over the original context, floored / ceiled and clamped to
/// [0, d-1] (llama.cpp `ggml_rope_yarn_corr_dims`, HF `find_correction_range`).
fn yarn_correction_range(d: usize, base: f64, original: f64, beta_fast: f64, beta_slow: f64) -> (f64, f64) {
    let dim = |beta: f64| d as f64 * (original / (beta * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let low = dim(beta_fast).floor().max(0.0);
    let high = dim(beta_slow).ceil().min(d as f64 - 1.0);
    (low, high)
}

/// cos/sin of position × frequency (× mscale), shaped [n, 1, half, 1] for broadcasting.
/// Angles are formed in f64 so that f32 runs carry no angle error at long positions.
pub(crate) fn rope_tables(positions: &[f64], f: &Frequencies, dtype: DType) -> Result<(Tensor, Tensor)> {
    tables_by(positions.len(), f, dtype, |r, inv_freq| positions[r] * inv_freq)
}

/// RoPE tables for rows `0..n` under a RoPE fault (the fault's corruption from its position on).
pub(crate) fn faulty_rope_tables(
    n: usize,
    fault: &RopeFault,
    f: &Frequencies,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let bf16 = |v: f64| half::bf16::from_f64(v).to_f64();
    tables_by(n, f, dtype, |p, inv_freq| match fault.rotated_position(p) {
        Some(at) => at * inv_freq,
        None => bf16(bf16(p as f64) * bf16(inv_freq)),
    })
}

/// cos/sin of `angle(row, inverse frequency)` × mscale for rows `0..n`, shaped [n, 1, half, 1].
fn tables_by(n: usize, f: &Frequencies, dtype: DType, angle: impl Fn(usize, f64) -> f64) -> Result<(Tensor, Tensor)> {
    let half = f.inv_freq.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for r in 0..n {
        for &inv in &f.inv_freq {
            let a = angle(r, inv);
            cos.push(a.cos() * f.mscale);
            sin.push(a.sin() * f.mscale);
        }
    }
    let shape = (n, 1, half, 1);
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?.to_dtype(dtype)?,
    ))
}

/// Rotate each head of `x` ([n, n_heads·head_dim]) by the tables' angles: pairs (2i, 2i+1)
/// in the normal style, (i, i + head_dim/2) in the NeoX style.
pub(crate) fn rope(x: &Tensor, n_heads: usize, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    if let Some(out) = crate::fused::rope(x, n_heads, cos, sin, matches!(style, RopeStyle::Neox))? {
        return Ok(out);
    }
    let (n, width) = x.dims2()?;
    let hd = width / n_heads;
    let (x, cos, sin, pair_dim) = match style {
        RopeStyle::Normal => (x.reshape((n, n_heads, hd / 2, 2))?, cos.clone(), sin.clone(), 3),
        RopeStyle::Neox => (
            x.reshape((n, n_heads, 2, hd / 2))?,
            cos.reshape((n, 1, 1, hd / 2))?,
            sin.reshape((n, 1, 1, hd / 2))?,
            2,
        ),
    };
    let x0 = x.narrow(pair_dim, 0, 1)?;
    let x1 = x.narrow(pair_dim, 1, 1)?;
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[r0, r1], pair_dim)?.reshape((n, width))?)
}

/// The cos/sin tables of every layer of a forward over positions `0..n`: at most two
/// distinct sets (global and sliding-window layers), built once.
pub(crate) struct LayerTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

impl LayerTables {
    /// `table(l)`: the tables of layer `l` (exact or as a profile computes them).
    pub fn new(cfg: &Config, table: impl Fn(usize) -> Result<(Tensor, Tensor)>) -> Result<Self> {
        let global_layer = (0..cfg.n_layer).find(|&l| cfg.window_of(l).is_none());
        let local_layer = (0..cfg.n_layer).find(|&l| cfg.window_of(l).is_some());
        Ok(Self {
            global: table(global_layer.unwrap_or(0))?,
            local: local_layer.map(table).transpose()?,
        })
    }

    /// (cos, sin) of layer `l`.
    pub fn of(&self, cfg: &Config, l: usize) -> (&Tensor, &Tensor) {
        match (&self.local, cfg.window_of(l)) {
            (Some((c, s)), Some(_)) => (c, s),
            _ => (&self.global.0, &self.global.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resbisect_taps::{SlidingWindow, Variant};

    fn config(head_dim: usize, rope_base: f64, variant: Variant) -> Config {
        Config {
            arch: "llama".into(),
            n_layer: 6,
            n_embd: head_dim * 2,
            n_head: 2,
            n_head_kv: 1,
            n_ff: 8,
            n_vocab: 8,
            n_ctx: 4096,
            rope_base,
            rms_eps: 1e-6,
            variant,
        }
    }

    fn theta(base: f64, d: usize) -> Vec<f64> {
        (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64)).collect()
    }

    #[test]
    fn plain_linear_and_factor_tables() {
        let plain = frequencies(&config(64, 10_000.0, Variant::default()), None, 0).unwrap();
        assert_eq!(plain.mscale, 1.0);
        for (a, b) in plain.inv_freq.iter().zip(theta(10_000.0, 64)) {
            assert!((a - b).abs() <= 1e-15 * b, "{a} {b}");
        }
        let linear = Variant {
            rope_scaling: RopeScaling::Linear { factor: 4.0 },
            ..Variant::default()
        };
        let scaled = frequencies(&config(64, 10_000.0, linear), None, 0).unwrap();
        let factors: Vec<f64> = (0..32).map(|i| 1.0 + i as f64).collect();
        let divided = frequencies(&config(64, 10_000.0, Variant::default()), Some(&factors), 0).unwrap();
        for (i, factor) in factors.iter().enumerate() {
            assert!((scaled.inv_freq[i] * 4.0 - plain.inv_freq[i]).abs() <= 1e-15);
            assert!((divided.inv_freq[i] * factor - plain.inv_freq[i]).abs() <= 1e-15);
        }
        assert!(frequencies(&config(64, 10_000.0, Variant::default()), Some(&factors[1..]), 0).is_err());
    }

    /// YaRN against the paper's definition (arXiv:2309.00071 §3.2, eq. 17-19): with
    /// r_i = L / λ_i, λ_i = 2π/θ_i, dims with r_i > β_fast keep θ_i, dims with r_i < β_slow
    /// take θ_i / s, and the attention temperature is √(1/t) = 0.1·ln s + 1. Between them
    /// llama.cpp and HF ramp linearly in i between the floored/ceiled crossing dims, which
    /// the test recomputes from the crossing condition r_i = β.
    #[test]
    fn yarn_follows_the_paper_at_both_ends_and_ramps_between() {
        let (d, base, s, l) = (128, 500_000.0, 8.0, 8192.0);
        let v = Variant {
            rope_scaling: RopeScaling::Yarn {
                factor: s,
                original_context: l as usize,
                attn_factor: 1.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
            ..Variant::default()
        };
        let f = frequencies(&config(d, base, v), None, 0).unwrap();
        assert!((f.mscale - (0.1 * s.ln() + 1.0)).abs() < 1e-15);
        let th = theta(base, d);
        let r = |i: usize| l / (2.0 * std::f64::consts::PI / th[i]);
        // First dim with r_i <= β: the crossing, by direct search rather than a formula.
        let cross = |beta: f64| (0..d / 2).find(|&i| r(i) <= beta).unwrap() as f64;
        let (low, high) = (cross(32.0) - 1.0, cross(1.0));
        let mut seen_ramp = false;
        for (i, &t) in th.iter().enumerate().take(d / 2) {
            let got = f.inv_freq[i];
            if r(i) > 32.0 && (i as f64) <= low {
                assert!((got - t).abs() <= 1e-12 * t, "dim {i}: {got} vs {}", t);
            } else if r(i) < 1.0 && (i as f64) >= high {
                assert!((got - t / s).abs() <= 1e-12 * t, "dim {i}");
            } else {
                seen_ramp = true;
                let ramp = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let want = t / s * (1.0 - ramp) + t * ramp;
                assert!((got - want).abs() <= 1e-12 * t, "dim {i}: {got} vs {want}");
            }
        }
        assert!(seen_ramp);
    }

    #[test]
    fn windowed_layers_use_the_local_base_unscaled() {
        let v = Variant {
            rope_scaling: RopeScaling::Linear { factor: 8.0 },
            sliding_window: Some(SlidingWindow {
                window: 4,
                period: 6,
                local_rope_base: 10_000.0,
            }),
            ..Variant::default()
        };
        let c = config(16, 1_000_000.0, v);
        let local = frequencies(&c, None, 0).unwrap();
        let global = frequencies(&c, None, 5).unwrap();
        for (l, t) in local.inv_freq.iter().zip(theta(10_000.0, 16)) {
            assert!((l - t).abs() <= 1e-15 * t, "{l} {t}");
        }
        assert_eq!(local.mscale, 1.0);
        for (g, t) in global.inv_freq.iter().zip(theta(1_000_000.0, 16)) {
            assert!((g * 8.0 - t).abs() <= 1e-15);
        }
    }

    #[test]
    fn normal_and_neox_rotate_different_pairs() {
        // One head of 4 dims at angle a for pair 0 and b for pair 1.
        let (a, b) = (0.3f64, 1.1f64);
        let cos = Tensor::from_vec(vec![a.cos(), b.cos()], (1, 1, 2, 1), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(vec![a.sin(), b.sin()], (1, 1, 2, 1), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], (1, 4), &Device::Cpu).unwrap();
        let rot = |x0: f64, x1: f64, t: f64| (x0 * t.cos() - x1 * t.sin(), x0 * t.sin() + x1 * t.cos());
        let normal: Vec<f64> = rope(&x, 1, &cos, &sin, RopeStyle::Normal)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ((n0, n1), (n2, n3)) = (rot(1.0, 2.0, a), rot(3.0, 4.0, b));
        let neox: Vec<f64> = rope(&x, 1, &cos, &sin, RopeStyle::Neox)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ((m0, m2), (m1, m3)) = (rot(1.0, 3.0, a), rot(2.0, 4.0, b));
        for (got, want) in normal
            .iter()
            .zip([n0, n1, n2, n3])
            .chain(neox.iter().zip([m0, m1, m2, m3]))
        {
            assert!((got - want).abs() < 1e-15, "{got} {want}");
        }
    }
}
