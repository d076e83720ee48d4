//! Strictness and the architecture variants in the reference: every formerly silently
//! ignored GGUF key or tensor is refused (exit 2, naming it) by every command that opens a
//! model, or computed — linear RoPE scaling (both keys) and `rope_freqs.weight` change
//! the rotation as their definitions say, and a gemma3-style model's sliding window, post
//! norms, GELU-tanh FFN and embedding scale act where and as they should.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use resbisect::dump::Dump;

use crate::util::*;

use gguf_file::Value as V;

/// Rewrite `src` into `dst`: metadata edited, every tensor kept, `extra` tensors added.
fn rewrite_adding(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit_meta: impl Fn(&mut Vec<(String, V)>),
    rename: impl Fn(&str) -> String,
    extra: Vec<(String, QTensor)>,
) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, V)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    edit_meta(&mut meta);
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (rename(n), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    tensors.extend(extra);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &meta_refs, &tensor_refs).unwrap();
}

fn f32_tensor(values: Vec<f32>) -> QTensor {
    let n = values.len();
    QTensor::quantize(&Tensor::from_vec(values, n, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
}

fn with_meta(key: &str, value: V) -> impl Fn(&mut Vec<(String, V)>) + '_ {
    move |m: &mut Vec<(String, V)>| m.push((key.to_string(), value.clone()))
}

fn dump_all(model: &std::path::Path, tokens: &[u32], out: &std::path::Path) -> Dump {
    let tokens: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let run = resbisect(&[
        "dump",
        "--model",
        path_str(model),
        "--tokens",
        &tokens.join(","),
        "--taps",
        "all",
        "-o",
        path_str(out),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    Dump::open(out).unwrap()
}

/// Row `p` of tap `id` (e.g. `blk.0.q`) in a dump.
fn row(d: &Dump, id: &str, p: usize) -> Vec<f64> {
    let stem = id.rsplit_once('.').map_or(id, |(s, _)| s);
    let stem = if id.starts_with("blk.") { stem } else { "embed" };
    let file = d.read_file("prompt", stem).unwrap().unwrap();
    let t = &file.taps[id];
    t.values[p * t.width..(p + 1) * t.width].to_vec()
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300)
}

/// A defect written into the tiny model: name, metadata edit, tensor renaming, and what
/// the refusal must name.
type Case = (
    &'static str,
    Box<dyn Fn(&mut Vec<(String, V)>)>,
    Box<dyn Fn(&str) -> String>,
    &'static str,
);

/// One case per formerly silently ignored (or newly reachable) kind of GGUF content.
fn refusal_cases() -> Vec<Case> {
    let same = |n: &str| n.to_string();
    vec![
        (
            "unknown-key",
            Box::new(with_meta("llama.mystery_knob", V::F32(2.0))),
            Box::new(same),
            "llama.mystery_knob",
        ),
        (
            "split",
            Box::new(with_meta("split.count", V::U16(2))),
            Box::new(same),
            "split.count",
        ),
        (
            "longrope",
            Box::new(with_meta("llama.rope.scaling.type", V::String("longrope".into()))),
            Box::new(same),
            "llama.rope.scaling.type",
        ),
        (
            "yarn-ext-factor",
            Box::new(with_meta("llama.rope.scaling.yarn_ext_factor", V::F32(0.5))),
            Box::new(same),
            "yarn_ext_factor",
        ),
        (
            "key-value-length",
            Box::new(with_meta("llama.attention.value_length", V::U32(32))),
            Box::new(same),
            "value_length",
        ),
        (
            "partial-rope",
            Box::new(|m: &mut Vec<(String, V)>| set_meta(m, "llama.rope.dimension_count", V::U32(32))),
            Box::new(same),
            "partial RoPE",
        ),
        (
            "other-arch-key",
            Box::new(with_meta("qwen2.rope.freq_base", V::F32(1e6))),
            Box::new(same),
            "qwen2.rope.freq_base",
        ),
        (
            "unknown-tensor",
            Box::new(|_: &mut Vec<(String, V)>| {}),
            Box::new(|n: &str| {
                if n == "output.weight" {
                    "output_extra.weight".into()
                } else {
                    n.into()
                }
            }),
            "output_extra.weight",
        ),
        (
            "qwen2-without-bias",
            Box::new(|m: &mut Vec<(String, V)>| {
                for (k, v) in m.iter_mut() {
                    if let Some(rest) = k.strip_prefix("llama.") {
                        *k = format!("qwen2.{rest}");
                    }
                    if k == "general.architecture" {
                        *v = V::String("qwen2".into());
                    }
                }
            }),
            Box::new(same),
            "blk.0.attn_q.bias",
        ),
    ]
}

#[test]
fn formerly_ignored_keys_and_tensors_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 3);
    let cases = refusal_cases();
    for (name, edit, rename, needle) in cases {
        let bad = dir.path().join(format!("{name}.gguf"));
        rewrite_adding(&model, &bad, edit, rename, Vec::new());
        // inspect, the reference and the runtime all open models through Model::open.
        assert_refused(&resbisect(&["inspect", path_str(&bad)]), needle);
        for engine in ["reference", "runtime"] {
            let out = dir.path().join(format!("{name}-{engine}"));
            let run = resbisect(&[
                "dump",
                "--model",
                path_str(&bad),
                "--engine",
                engine,
                "--tokens",
                "1,2,3",
                "-o",
                path_str(&out),
            ]);
            assert_refused(&run, needle);
        }
    }
}

/// Linear scaling divides positions by the factor, so on a prompt of one repeated token
/// (every row of `q_pre_rope` equal at layer 0) the scaled model's `q` at position 2m is
/// the unscaled model's at m, and at odd positions it is no unscaled row. Both the
/// current and the older key, and `rope_freqs.weight` holding the factor for every pair,
/// say the same. 1e-6: f32 rows of the same values rotated by equal f64 angles (the
/// measured difference is at f32 rounding, ~1e-7).
#[test]
fn linear_scaling_and_freq_factors_rotate_as_positions_divided() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 4);
    let tokens = vec![7u32; 16];
    let base = dump_all(&model, &tokens, &dir.path().join("base"));
    let linear = dir.path().join("linear.gguf");
    rewrite_adding(
        &model,
        &linear,
        |m| {
            m.push(("llama.rope.scaling.type".into(), V::String("linear".into())));
            m.push(("llama.rope.scaling.factor".into(), V::F32(2.0)));
        },
        str::to_string,
        Vec::new(),
    );
    let old_key = dir.path().join("scale_linear.gguf");
    rewrite_adding(
        &model,
        &old_key,
        with_meta("llama.rope.scale_linear", V::F32(2.0)),
        str::to_string,
        Vec::new(),
    );
    let factors = dir.path().join("rope_freqs.gguf");
    let head_dim = 256 / 4;
    let ff = vec![("rope_freqs.weight".to_string(), f32_tensor(vec![2.0; head_dim / 2]))];
    rewrite_adding(&model, &factors, |_| {}, str::to_string, ff);
    for (name, path) in [
        ("linear", &linear),
        ("scale_linear", &old_key),
        ("rope_freqs", &factors),
    ] {
        let scaled = dump_all(path, &tokens, &dir.path().join(name));
        for m in 0..8 {
            let d = rel_diff(&row(&scaled, "blk.0.q", 2 * m), &row(&base, "blk.0.q", m));
            assert!(d < 1e-6, "{name}: q at {} vs unscaled at {m}: {d}", 2 * m);
        }
        let odd = rel_diff(&row(&scaled, "blk.0.q", 3), &row(&base, "blk.0.q", 1));
        assert!(
            odd > 1e-3,
            "{name}: position 3 should not equal unscaled position 1 ({odd})"
        );
        // q_pre_rope is untouched by RoPE scaling.
        let pre = rel_diff(&row(&scaled, "blk.0.q_pre_rope", 5), &row(&base, "blk.0.q_pre_rope", 5));
        assert!(pre < 1e-7, "{name}: {pre}");
    }
}

const WINDOW: usize = 4;

/// A 6-layer gemma3-style model from the tiny llama's weights: gemma3 keys, a sliding
/// window of 4 (layers 0-4 windowed, layer 5 global), per-head Q/K norms and post norms.
fn gemma_like(dir: &std::path::Path) -> std::path::PathBuf {
    let mut preset = resbisect::synth::preset("tiny").unwrap();
    preset.config.n_layer = 6;
    let llama = dir.join("six-layer-llama.gguf");
    resbisect::synth::write_model(&preset, GgmlDType::Q8_0, 11, &llama).unwrap();
    let (n_embd, head_dim) = (256, 64);
    let weights = |n: usize, seed: usize| -> QTensor {
        f32_tensor((0..n).map(|i| 1.0 + 0.3 * ((i * 7 + seed) as f32).sin()).collect())
    };
    let mut extra = Vec::new();
    for l in 0..6 {
        extra.push((format!("blk.{l}.attn_q_norm.weight"), weights(head_dim, l)));
        extra.push((format!("blk.{l}.attn_k_norm.weight"), weights(head_dim, l + 10)));
        extra.push((format!("blk.{l}.post_attention_norm.weight"), weights(n_embd, l + 20)));
        extra.push((format!("blk.{l}.post_ffw_norm.weight"), weights(n_embd, l + 30)));
    }
    let gemma = dir.join("gemma-like.gguf");
    rewrite_adding(
        &llama,
        &gemma,
        |m| {
            for (k, v) in m.iter_mut() {
                if let Some(rest) = k.strip_prefix("llama.") {
                    *k = format!("gemma3.{rest}");
                }
                if k == "general.architecture" {
                    *v = V::String("gemma3".into());
                }
            }
            m.push(("gemma3.attention.sliding_window".into(), V::U32(WINDOW as u32)));
        },
        str::to_string,
        extra,
    );
    gemma
}

/// Changing the token at position 2 changes a windowed layer's attention at positions
/// 2..=2+window-1 and not at 2+window (the window's edge, both sides). Stacked windows
/// reach back window-1 positions per layer, so layer l's output at p depends on tokens
/// from p - (l+1)·(window-1) on: layer 4 (windowed) at 23 reaches back to 8 only, while
/// the global layer 5 at 23 sees position 2. Unchanged rows are bitwise equal: masked
/// keys weigh exactly 0.
#[test]
fn sliding_window_hides_tokens_past_the_window_and_the_global_layer_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = gemma_like(dir.path());
    let a: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 1000 + 3).collect();
    let mut b = a.clone();
    b[2] = 999;
    let (da, db) = (
        dump_all(&model, &a, &dir.path().join("a")),
        dump_all(&model, &b, &dir.path().join("b")),
    );
    let diff = |id: &str, p: usize| rel_diff(&row(&db, id, p), &row(&da, id, p));
    for p in 2..2 + WINDOW {
        assert!(diff("blk.0.attn", p) > 1e-4, "layer 0 at {p} sees position 2");
    }
    for p in 2 + WINDOW..24 {
        assert_eq!(diff("blk.0.attn", p), 0.0, "layer 0 at {p} is past the window");
    }
    assert!(diff("blk.3.resid_post", 14) > 1e-4, "layer 3 at 14 reaches back to 2");
    assert_eq!(diff("blk.3.resid_post", 15), 0.0, "layer 3 at 15 reaches back to 3");
    assert_eq!(
        diff("blk.4.attn", 23),
        0.0,
        "windowed layer 4 at 23 cannot reach position 2"
    );
    assert!(diff("blk.5.attn", 23) > 1e-4, "the global layer sees position 2");
}

/// The gemma3-style block, tap by tap from the dumped values: embed = token row ×
/// sqrt(n_embd) (against the llama twin's), attn_post_norm = RMSNorm(attn_out)·w,
/// resid_mid = embed + attn_post_norm, ffn_act = GELU-tanh(gate)·up, q_pre_rope heads
/// RMS-normed. 1e-5: f32 values recomputed in f64 from f32 dumps (measured ≤ 1e-6).
#[test]
fn gemma_style_block_taps_follow_their_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let model = gemma_like(dir.path());
    let tokens: Vec<u32> = (0..8).map(|i| i * 91 % 1000 + 3).collect();
    let g = dump_all(&model, &tokens, &dir.path().join("g"));
    let l = dump_all(&dir.path().join("six-layer-llama.gguf"), &tokens, &dir.path().join("l"));
    let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
    for p in [0, 5] {
        let scaled: Vec<f64> = row(&l, "embed", p).iter().map(|v| v * 16.0).collect();
        assert!(rel_diff(&row(&g, "embed", p), &scaled) < 1e-6);
        let attn_out = row(&g, "blk.0.attn_out", p);
        let post = row(&g, "blk.0.attn_post_norm", p);
        let w: Vec<f64> = (0..256)
            .map(|i| 1.0 + 0.3 * ((i * 7 + 20) as f32).sin() as f64)
            .collect();
        let want: Vec<f64> = attn_out.iter().zip(&w).map(|(x, w)| x / rms(&attn_out) * w).collect();
        assert!(rel_diff(&post, &want) < 1e-5);
        let mid: Vec<f64> = row(&g, "embed", p).iter().zip(&post).map(|(e, a)| e + a).collect();
        assert!(rel_diff(&row(&g, "blk.0.resid_mid", p), &mid) < 1e-5);
        let (gate, up) = (row(&g, "blk.0.ffn_gate", p), row(&g, "blk.0.ffn_up", p));
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| gelu(*g) * u).collect();
        assert!(rel_diff(&row(&g, "blk.0.ffn_act", p), &act) < 1e-5);
        let q = row(&g, "blk.0.q_pre_rope", p);
        let qw: Vec<f64> = (0..64).map(|i| 1.0 + 0.3 * ((i * 7) as f32).sin() as f64).collect();
        for head in q.chunks(64) {
            let unweighted: Vec<f64> = head.iter().zip(&qw).map(|(v, w)| v / w).collect();
            assert!(
                (rms(&unweighted) - 1.0).abs() < 1e-4,
                "per-head RMS {}",
                rms(&unweighted)
            );
        }
    }
    assert!(!l
        .read_file("prompt", "blk.0")
        .unwrap()
        .unwrap()
        .taps
        .contains_key("blk.0.attn_post_norm"));
}

/// The real Gemma 3 270M (scripts/fetch-models.sh) opens with every metadata key and
/// tensor classified, and reads as llama.cpp's gemma3 loader would.
#[test]
fn the_real_gemma3_reads_as_gemma3() {
    use resbisect::taps::{Activation, RopeStyle, SlidingWindow};

    let path = root().join("fixtures/models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    let m = resbisect::model::Model::open(&path).unwrap();
    let (c, v) = (&m.config, &m.config.variant);
    assert_eq!(
        (c.arch.as_str(), c.n_layer, c.head_dim(), c.q_width()),
        ("gemma3", 18, 256, 1024)
    );
    assert_eq!(
        v.sliding_window,
        Some(SlidingWindow {
            window: 512,
            period: 6,
            local_rope_base: 10_000.0
        })
    );
    assert_eq!(
        (c.window_of(4), c.window_of(5), c.rope_base_of(5)),
        (Some(512), None, 1e6)
    );
    assert_eq!(
        (v.rope_style, v.ffn_activation),
        (RopeStyle::Neox, Activation::GeluTanh)
    );
    assert!(v.qk_norm && v.post_norms && v.scale_embeddings && !v.qkv_bias && m.tied_output);
}
