//! Shared helpers: running the CLI, locating fixtures, making synthetic models, and
//! rewriting a valid GGUF with chosen defects.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file;
use resbisect::synth;

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn resbisect(args: &[&str]) -> Output {
    resbisect_with(&[], args)
}

/// [`resbisect`] with environment variables `env` set.
pub fn resbisect_with(env: &[(&str, &str)], args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_resbisect"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Assert a clean refusal: exit 2, one `error:` line naming `needle`, no panic.
pub fn assert_refused(out: &Output, needle: &str) {
    assert_eq!(
        out.code, 2,
        "expected exit 2 mentioning {needle:?}; stderr:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "panic:\n{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{}", out.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "error line {:?} does not mention {needle:?}",
        lines[0]
    );
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real fixture model; CI fetches it before the tests run.
pub fn smollm2() -> PathBuf {
    fixture_model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real Gemma 3 270M Q4_K_M fixture (scripts/fetch-models.sh).
pub fn gemma3() -> PathBuf {
    fixture_model("gemma-3-270m-q4_k_m.gguf")
}

fn fixture_model(name: &str) -> PathBuf {
    let p = root().join("fixtures/models").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

/// The project virtualenv's Python (scripts/setup.sh makes it, with torch, transformers,
/// gguf, safetensors and numpy pinned in scripts/requirements.txt).
pub fn venv_python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh first (the README's test command does)",
        p.display()
    );
    let probe = Command::new(&p)
        .args(["-c", "import torch, transformers, gguf, safetensors, numpy"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "{} cannot import torch, transformers, gguf, safetensors and numpy: run scripts/setup.sh",
        p.display()
    );
    p
}

pub fn tiny_model(dir: &Path, quant: &str, seed: u64) -> PathBuf {
    let path = dir.join(format!("tiny-{quant}-{seed}.gguf"));
    let preset = synth::preset("tiny").unwrap();
    synth::write_model(&preset, synth::parse_quant(quant).unwrap(), seed, &path).unwrap();
    path
}

/// Rewrite a (trusted) GGUF with its metadata and tensor list edited.
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit_meta: impl Fn(&mut Vec<(String, gguf_file::Value)>),
    keep_tensor: impl Fn(&str) -> Option<String>,
) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    edit_meta(&mut meta);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = names
        .into_iter()
        .filter_map(|n| {
            keep_tensor(n).map(|new_name| (new_name, content.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap()))
        })
        .collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

pub fn set_meta(meta: &mut [(String, gguf_file::Value)], key: &str, value: gguf_file::Value) {
    meta.iter_mut()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no key {key}"))
        .1 = value;
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// rel L2 = ‖a − b‖₂ / ‖b‖₂ (b the reference side).
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Little-endian f32 values, widened.
pub fn f32s(data: &[u8]) -> Vec<f64> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

/// Little-endian i64 values.
pub fn i64s(data: &[u8]) -> Vec<i64> {
    data.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A fixture's prompt: its `tokens` as `--tokens` takes them, and its `positions`, as
/// numbers and as `--positions` takes them.
pub fn fixture_prompt(fx: &safetensors::SafeTensors) -> (String, Vec<i64>, String) {
    let tokens: Vec<String> = i64s(fx.tensor("tokens").unwrap().data())
        .iter()
        .map(|t| t.to_string())
        .collect();
    let positions = i64s(fx.tensor("positions").unwrap().data());
    let spec: Vec<String> = positions.iter().map(|p| p.to_string()).collect();
    (tokens.join(","), positions, spec.join(","))
}

/// The reproduce commands of a bisect's JSON report `r`.
pub fn reproduce_commands(r: &serde_json::Value) -> Vec<&str> {
    r["reproduce"]
        .as_array()
        .expect("a reproduce list")
        .iter()
        .map(|c| c.as_str().expect("a command"))
        .collect()
}
