//! RoPE cos/sin tables computed as ggml's CPU backend computes them, for the
//! `llamacpp-cpu` profile: angles in f32, each pair's angle the previous one times
//! `theta_scale` (so the angle error grows with the pair index and the position), cos/sin
//! by the C library's `cosf`/`sinf`. At position 1000 an f32 angle is off by up to
//! ~6e-5 rad, a relative error of ~1e-5 in q and k that the exact f64 tables do not have.
//!
//! Source (llama-cpp-python 0.3.36's llama.cpp): ggml/src/ggml-cpu/ops.cpp
//! `ggml_compute_forward_rope_flt` (`theta_scale = powf(freq_base, -2.0f/n_dims)`),
//! `ggml_rope_cache_init` (`theta = p; … theta *= theta_scale`), `rope_yarn`,
//! `rope_yarn_ramp`; ggml/src/ggml.c `ggml_rope_yarn_corr_dims`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use resbisect_taps::{Config, RopeScaling};

/// ggml's RoPE parameters for one layer, all f32 as ggml holds them.
struct GgmlRope {
    theta_scale: f32,
    freq_scale: f32,
    ext_factor: f32,
    attn_factor: f32,
    corr_dims: [f32; 2],
}

impl GgmlRope {
    /// The parameters llama.cpp passes for layer `layer` of `cfg`: sliding-window layers
    /// use the local base unscaled (as [`crate::rope::frequencies`] does); YaRN sets
    /// `ext_factor` 1 (llama.cpp's default for `LLAMA_ROPE_SCALING_TYPE_YARN`).
    fn of(cfg: &Config, layer: usize) -> Self {
        let n_dims = cfg.head_dim() as f32;
        let base = cfg.rope_base_of(layer) as f32;
        let scaling = if cfg.window_of(layer).is_some() {
            RopeScaling::None
        } else {
            cfg.variant.rope_scaling
        };
        let mut rope = Self {
            theta_scale: base.powf(-2.0 / n_dims),
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            corr_dims: [0.0, 0.0],
        };
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => rope.freq_scale = 1.0 / factor as f32,
            RopeScaling::Yarn {
                factor,
                original_context,
                attn_factor,
                beta_fast,
                beta_slow,
            } => {
                rope.freq_scale = 1.0 / factor as f32;
                rope.ext_factor = 1.0;
                rope.attn_factor = attn_factor as f32;
                // ggml_rope_yarn_corr_dim: n_dims·ln(n_ctx_orig / (β·2π)) / (2 ln base).
                let dim = |beta: f64| {
                    n_dims * (original_context as f32 / (beta as f32 * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                rope.corr_dims = [dim(beta_fast).floor().max(0.0), dim(beta_slow).ceil().min(n_dims - 1.0)];
            }
        }
        rope
    }

    /// (cos, sin) of pair `i0/2` at angle `theta_extrap` (ggml's `rope_yarn`).
    fn cos_sin(&self, theta_extrap: f32, i0: usize) -> (f32, f32) {
        let theta_interp = self.freq_scale * theta_extrap;
        let mut theta = theta_interp;
        let mut mscale = self.attn_factor;
        if self.ext_factor != 0.0 {
            let [low, high] = self.corr_dims;
            let y = ((i0 / 2) as f32 - low) / (high - low).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
            mscale *= 1.0 + 0.1 * (1.0 / self.freq_scale).ln();
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }
}

/// cos/sin tables of layer `layer` at `positions`, shaped [n, 1, head_dim/2, 1] like
/// [`crate::rope::rope_tables`], computed as ggml's CPU RoPE computes them.
/// `factors`: `rope_freqs.weight` (ggml divides the angle by the factor, in f32).
pub(crate) fn ggml_cpu_rope_tables(
    cfg: &Config,
    factors: Option<&[f64]>,
    layer: usize,
    positions: &[f64],
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let rope = GgmlRope::of(cfg, layer);
    let half = cfg.head_dim() / 2;
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        // ggml's positions are int32 converted to float.
        let mut theta = p as f32;
        for i in 0..half {
            let factor = factors.map_or(1.0, |f| f[i] as f32);
            let (c, s) = rope.cos_sin(theta / factor, 2 * i);
            cos.push(c);
            sin.push(s);
            theta *= rope.theta_scale;
        }
    }
    let shape = (positions.len(), 1, half, 1);
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use resbisect_taps::Variant;

    fn smollm2_like() -> Config {
        Config {
            arch: "llama".into(),
            n_layer: 1,
            n_embd: 128,
            n_head: 2,
            n_head_kv: 1,
            n_ff: 8,
            n_vocab: 8,
            n_ctx: 8192,
            rope_base: 100_000.0,
            rms_eps: 1e-5,
            variant: Variant::default(),
        }
    }

    /// The last pair's angle is p·theta_scale^(half-1) formed by repeated f32
    /// multiplication: at a long position it differs from the f64 angle by more than one
    /// f32 rounding of the product would, and matches the same loop written out.
    #[test]
    fn angles_are_the_stepwise_f32_product() {
        let cfg = smollm2_like();
        let p = 1500.0;
        let (cos, _) = ggml_cpu_rope_tables(&cfg, None, 0, &[p], DType::F32).unwrap();
        let cos: Vec<f32> = cos.flatten_all().unwrap().to_vec1().unwrap();
        let theta_scale = 100_000f32.powf(-2.0 / 64.0);
        let mut theta = p as f32;
        for want in &cos {
            assert_eq!(*want, theta.cos());
            theta *= theta_scale;
        }
        // Pair 3 at p = 1500 (angle ~1037 rad): the stepwise f32 angle is not the exact one.
        let exact = (p * 100_000f64.powf(-6.0 / 64.0)).cos();
        assert!((cos[3] as f64 - exact).abs() > 1e-6, "{} {exact}", cos[3]);
        assert!((cos[3] as f64 - exact).abs() < 1e-3, "{} {exact}", cos[3]);
    }
}
