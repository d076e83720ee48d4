//! RoPE's rotation frequencies per layer, computed once on the host: the layer's base,
//! `rope_freqs.weight` factors, linear and YaRN scaling all fold into one inverse
//! frequency per rotated pair (angle = position × inv_freq[i]), so one table-driven
//! kernel covers every variant. Plain llama RoPE has no table: its kernel forms
//! base^(-2i/d) itself, as it always has.

use crate::model::Config;
use resbisect_taps::{RopeScaling, RopeStyle};

/// A layer's RoPE frequencies, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// Inverse frequency of pair i (radians per position), `head_dim / 2` values.
    pub inv_freq: Vec<f32>,
    /// Dims (i, i + d/2) rotate together instead of (2i, 2i+1).
    pub neox: bool,
    /// Factor on cos and sin (YaRN's attention scaling; 1 otherwise).
    pub mscale: f32,
}

/// The RoPE table of layer `layer`, or `None` when the layer's RoPE is plain llama's
/// (adjacent pairs, no scaling, no factors: the kernel's own base^(-2i/d), bit for bit as
/// before). `factors` are the values of `rope_freqs.weight` (`head_dim / 2`, checked by
/// the caller).
///
/// Each frequency follows llama.cpp's `rope_yarn` (ggml-cpu ops.cpp), with the position
/// factored out — its angle is linear in the position:
/// `theta_extrap = base^(-2i/d) / factor_i`; linear scaling multiplies by `1/factor`;
/// YaRN mixes `theta_extrap / factor` and `theta_extrap` by a ramp over the dims between
/// the correction dims of `beta_fast` and `beta_slow`, and scales cos and sin by
/// `attn_factor · (1 + 0.1 · ln factor)` (Peng et al. 2023, arXiv:2309.00071, §3.2–3.4;
/// 1 for factor ≤ 1, as HF). Sliding-window layers are never scaled.
pub fn rope_table(c: &Config, layer: usize, factors: Option<&[f32]>) -> Option<RopeTable> {
    let v = &c.variant;
    let neox = v.rope_style == RopeStyle::Neox;
    if !neox && v.rope_scaling == RopeScaling::None && factors.is_none() {
        return None;
    }
    let d = c.head_dim();
    let base = c.rope_base_of(layer);
    let theta_extrap = |i: usize| {
        let factor = factors.map_or(1.0, |f| f[i] as f64);
        base.powf(-2.0 * i as f64 / d as f64) / factor
    };
    // Sliding-window layers rotate unscaled (llama.cpp's `rope_freq_scale_train_swa` = 1;
    // HF gemma3's local rotary embedding has no scaling).
    let scaling = if c.window_of(layer).is_some() {
        RopeScaling::None
    } else {
        v.rope_scaling
    };
    let (inv_freq, mscale): (Vec<f64>, f64) = match scaling {
        RopeScaling::None => ((0..d / 2).map(theta_extrap).collect(), 1.0),
        RopeScaling::Linear { factor } => ((0..d / 2).map(|i| theta_extrap(i) / factor).collect(), 1.0),
        RopeScaling::Yarn {
            factor,
            original_context,
            attn_factor,
            beta_fast,
            beta_slow,
        } => {
            let (low, high) = yarn_correction_dims(d, original_context, base, beta_fast, beta_slow);
            let freq_scale = 1.0 / factor;
            let table = (0..d / 2)
                .map(|i| {
                    let ramp = 1.0 - ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                    theta_extrap(i) * (freq_scale * (1.0 - ramp) + ramp)
                })
                .collect();
            // HF's get_mscale: 1 for factor <= 1 (llama.cpp's formula would shrink it).
            let mscale = if factor > 1.0 { 1.0 + 0.1 * factor.ln() } else { 1.0 };
            (table, attn_factor * mscale)
        }
    };
    Some(RopeTable {
        inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        neox,
        mscale: mscale as f32,
    })
}

/// YaRN's correction dims (llama.cpp `ggml_rope_yarn_corr_dims`): the dims whose
/// wavelength spans `beta_fast` and `beta_slow` rotations over the original context,
/// floored and ceiled into `0..=d - 1`.
fn yarn_correction_dims(d: usize, original_context: usize, base: f64, beta_fast: f64, beta_slow: f64) -> (f64, f64) {
    let dim = |rotations: f64| {
        d as f64 * (original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let low = dim(beta_fast).floor().max(0.0);
    let high = dim(beta_slow).ceil().min(d as f64 - 1.0);
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use resbisect_taps::{SlidingWindow, Variant};

    fn config(variant: Variant) -> Config {
        Config {
            arch: "llama".into(),
            n_layer: 6,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_vocab: 32,
            n_ctx: 4096,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            variant,
        }
    }

    #[test]
    fn plain_llama_has_no_table() {
        assert_eq!(rope_table(&config(Variant::default()), 0, None), None);
    }

    #[test]
    fn neox_table_is_the_base_powers_and_linear_divides() {
        let mut v = Variant {
            rope_style: RopeStyle::Neox,
            ..Variant::default()
        };
        let t = rope_table(&config(v.clone()), 0, None).expect("a table");
        assert!(t.neox && t.mscale == 1.0 && t.inv_freq.len() == 8);
        assert_eq!(t.inv_freq[0], 1.0);
        assert!((t.inv_freq[1] as f64 - 10000f64.powf(-2.0 / 16.0)).abs() < 1e-7);
        v.rope_scaling = RopeScaling::Linear { factor: 4.0 };
        let lin = rope_table(&config(v), 0, Some(&[2.0; 8])).expect("a table");
        assert_eq!(lin.inv_freq[0], 1.0 / 8.0);
    }

    #[test]
    fn yarn_keeps_fast_dims_scales_slow_ones_and_sets_mscale() {
        let v = Variant {
            rope_scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_context: 256,
                attn_factor: 1.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
            ..Variant::default()
        };
        let t = rope_table(&config(v), 0, None).expect("a table");
        let plain = |i: usize| 10000f64.powf(-2.0 * i as f64 / 16.0) as f32;
        assert_eq!(t.inv_freq[0], plain(0), "the fastest dim is extrapolated");
        assert!(
            (t.inv_freq[7] - plain(7) / 4.0).abs() < 1e-9,
            "the slowest is interpolated"
        );
        assert!((t.mscale as f64 - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-6);
    }

    #[test]
    fn windowed_layers_use_the_local_base() {
        let v = Variant {
            rope_style: RopeStyle::Neox,
            sliding_window: Some(SlidingWindow {
                window: 64,
                period: 6,
                local_rope_base: 100.0,
            }),
            ..Variant::default()
        };
        let c = config(v);
        let local = rope_table(&c, 0, None).expect("a table");
        let global = rope_table(&c, 5, None).expect("a table");
        assert!((local.inv_freq[1] as f64 - 100f64.powf(-2.0 / 16.0)).abs() < 1e-7);
        assert!((global.inv_freq[1] as f64 - 10000f64.powf(-2.0 / 16.0)).abs() < 1e-7);
    }
}
