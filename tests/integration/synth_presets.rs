//! The per-architecture synthetic presets: each writes a GGUF whose metadata keys and
//! tensors are the ones llama.cpp's converter writes for that architecture, so the
//! reference, the runtime and HF read them as they would a real model.

use resbisect::gguf::GgufFile;
use resbisect::synth;

fn write(name: &str) -> (tempfile::TempDir, GgufFile) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.gguf"));
    let preset = synth::preset(name).unwrap();
    synth::write_model(&preset, synth::parse_quant("q8_0").unwrap(), 7, &path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    (dir, gguf)
}

fn number(g: &GgufFile, key: &str) -> f64 {
    g.get(key)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{key} missing"))
}

#[test]
fn every_tiny_preset_has_its_architectures_keys_and_tensors() {
    // (preset, arch, tensors it must have in layer 0, tensors it must not have)
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        ("llama3-tiny", "llama", &[], &["attn_q.bias", "attn_q_norm.weight"]),
        ("yarn-tiny", "llama", &[], &["attn_q.bias"]),
        ("linear-tiny", "llama", &[], &["attn_q.bias"]),
        (
            "qwen2-tiny",
            "qwen2",
            &["attn_q.bias", "attn_k.bias", "attn_v.bias"],
            &["attn_q_norm.weight"],
        ),
        (
            "qwen3-tiny",
            "qwen3",
            &["attn_q_norm.weight", "attn_k_norm.weight"],
            &["attn_q.bias"],
        ),
        (
            "gemma3-tiny",
            "gemma3",
            &[
                "attn_q_norm.weight",
                "attn_k_norm.weight",
                "post_attention_norm.weight",
                "post_ffw_norm.weight",
            ],
            &["attn_q.bias"],
        ),
    ];
    for &(name, arch, present, absent) in cases {
        let (_dir, g) = write(name);
        let config = synth::preset(name).unwrap().config;
        assert_eq!(
            g.get("general.architecture").and_then(|v| v.as_str()),
            Some(arch),
            "{name}"
        );
        assert_eq!(
            number(&g, &format!("{arch}.block_count")) as usize,
            config.n_layer,
            "{name}"
        );
        assert_eq!(
            number(&g, &format!("{arch}.rope.dimension_count")) as usize,
            config.head_dim(),
            "{name}"
        );
        for t in present {
            assert!(g.tensor(&format!("blk.0.{t}")).is_some(), "{name}: blk.0.{t} missing");
        }
        for t in absent {
            assert!(
                g.tensor(&format!("blk.0.{t}")).is_none(),
                "{name}: blk.0.{t} unexpected"
            );
        }
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.dims, [config.n_embd as u64, config.q_width() as u64], "{name}");
    }
}

#[test]
fn scaled_presets_carry_their_rope_scaling() {
    let (_d, g) = write("yarn-tiny");
    assert_eq!(g.get("llama.rope.scaling.type").and_then(|v| v.as_str()), Some("yarn"));
    assert_eq!(number(&g, "llama.rope.scaling.factor"), 4.0);
    assert_eq!(number(&g, "llama.rope.scaling.original_context_length"), 512.0);
    let (_d, g) = write("linear-tiny");
    assert_eq!(
        g.get("llama.rope.scaling.type").and_then(|v| v.as_str()),
        Some("linear")
    );
    assert_eq!(number(&g, "llama.rope.scaling.factor"), 4.0);
}

#[test]
fn llama3_rope_freqs_blend_between_one_and_the_factor() {
    let (_d, g) = write("llama3-tiny");
    let info = g.tensor("rope_freqs.weight").unwrap().clone();
    let bytes = g.tensor_data(&info);
    let factors: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let config = synth::preset("llama3-tiny").unwrap().config;
    assert_eq!(factors.len(), config.head_dim() / 2);
    // High frequencies are untouched, low ones divided by the factor (8), and the band
    // between rises monotonically: with base 500000, head_dim 64 and an original context
    // of 512 all three bands are present (checked against HF's llama3 rope init in
    // scripts/compare_hf.py).
    assert_eq!(factors[0], 1.0);
    assert_eq!(*factors.last().unwrap(), 8.0);
    assert!(factors.windows(2).all(|w| w[0] <= w[1]));
    assert!(factors.iter().any(|&f| f > 1.0 && f < 8.0));
}

#[test]
fn gemma3_preset_has_a_window_and_a_key_length_unlike_its_width() {
    let (_d, g) = write("gemma3-tiny");
    let config = synth::preset("gemma3-tiny").unwrap().config;
    assert_ne!(config.head_dim(), config.n_embd / config.n_head);
    assert_eq!(number(&g, "gemma3.attention.key_length") as usize, config.head_dim());
    assert_eq!(number(&g, "gemma3.attention.sliding_window"), 128.0);
    assert!(
        g.tensor("output.weight").is_none(),
        "gemma3 ties its output to the embedding"
    );
    // Layers 0..=4 are windowed and layer 5 is global, as in every Gemma 3.
    assert_eq!(
        (0..6).map(|l| config.window_of(l).is_some()).collect::<Vec<_>>(),
        [true, true, true, true, true, false]
    );
}

/// README's command table names every preset `synth` accepts, in the table's order.
#[test]
fn readme_lists_every_synth_preset() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.contains("resbisect synth --preset "))
        .expect("README's command table has a synth line");
    let listed: Vec<&str> = line
        .split("--preset ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("presets after --preset")
        .split("\\|")
        .collect();
    assert_eq!(listed, resbisect::synth::PRESET_NAMES);
}
