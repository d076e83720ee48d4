//! Dump format v1 (docs/dump-format.md): the manifest and its strict parser, the format's
//! constants and the tap storage types. Every file is written under a temporary name and
//! renamed when whole ([`write`]), possibly from writer threads ([`background`]), so a
//! crashed engine leaves a readable partial dump; the reader ([`read`]) trusts nothing.

mod background;
mod read;
mod write;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Config;
use crate::taps::{PositionSpec, Selection};

pub use background::{BackgroundWriter, FileJob, InFlightRows, RowBytes};
pub use read::{Dump, DumpFile, MappedFile, TapRows, TapSlice, TapView};
pub use write::{DumpWriter, FileStream};

pub const FORMAT: &str = "resbisect.dump";
pub const VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const DATA: &str = "data";
/// Larger manifests are refused rather than read into memory.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EngineInfo {
    pub name: String,
    pub version: String,
    pub backend: String,
    pub dtype: String,
    pub device: String,
    /// The settings the engine ran with, as it records them (a JSON object: cache types,
    /// batch sizes, RoPE overrides); absent for engines without any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Value>,
    /// The numerics profile a reference imitated (`exact`, `llamacpp-cpu`, …); absent for
    /// other engines and in dumps written before profiles existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub path: String,
    /// resbisect's model fingerprint; other writers may leave it out (or null), and
    /// identity then rests on the config and the tokens.
    #[serde(default)]
    pub fingerprint: Option<String>,
    #[serde(flatten)]
    pub config: Config,
}

impl EngineInfo {
    /// An engine's identity; injected faults are part of it, so a dump says what was
    /// broken on purpose (`name+inject(spec;spec)`).
    pub fn new(name: &str, backend: &str, dtype: &str, device: String, injections: &[String]) -> Self {
        let name = if injections.is_empty() {
            name.to_string()
        } else {
            format!("{name}+inject({})", injections.join(";"))
        };
        Self {
            name,
            version: env!("CARGO_PKG_VERSION").into(),
            backend: backend.into(),
            dtype: dtype.into(),
            device,
            options: None,
            profile: None,
        }
    }

    /// One line that tells two engines apart: `name version (backend dtype; key=value, ...)`,
    /// the options sorted by key.
    pub fn describe(&self) -> String {
        let mut s = self.name.clone();
        if !self.version.is_empty() {
            s = format!("{s} {}", self.version);
        }
        if let Some(p) = &self.profile {
            s = format!("{s}, profile {p}");
        }
        let mut inner = format!("{} {}", self.backend, self.dtype).trim().to_string();
        if let Some(serde_json::Value::Object(options)) = &self.options {
            let pairs: Vec<String> = options
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(text) => format!("{k}={text}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            if !pairs.is_empty() {
                inner = format!("{inner}; {}", pairs.join(", "));
            }
        }
        if inner.is_empty() {
            s
        } else {
            format!("{s} ({inner})")
        }
    }

    /// This identity with the numerics profile the engine followed.
    pub fn with_profile(self, profile: &str) -> Self {
        Self {
            profile: Some(profile.into()),
            ..self
        }
    }
}

impl ModelInfo {
    pub fn of(model: &crate::model::Model) -> Self {
        Self {
            path: model.gguf.path.display().to_string(),
            fingerprint: Some(model.fingerprint.clone()),
            config: model.config.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Complete,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunError {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub engine: EngineInfo,
    pub model: ModelInfo,
    pub prompts: Vec<PromptRecord>,
    pub selection: Selection,
    pub status: Status,
    pub error: Option<RunError>,
    pub created: String,
}

impl Manifest {
    /// A running dump's manifest; the selection keeps only the taps `model` has (`--taps
    /// all` on a llama model lists no Gemma post norms).
    pub fn new(engine: EngineInfo, model: ModelInfo, prompts: Vec<PromptRecord>, mut selection: Selection) -> Self {
        selection
            .taps
            .retain(|name| crate::taps::LayerTap::from_name(name).is_none_or(|t| t.in_model(&model.config)));
        Self {
            format: FORMAT.into(),
            version: VERSION,
            engine,
            model,
            prompts,
            selection,
            status: Status::Running,
            error: None,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

/// Reads manifest.json by hand rather than through serde's derive, so that each refusal
/// names its field path (`model.fingerprint`) and what was expected, and so that the
/// informational `selection` accepts the spellings other writers use (`"all"`, `["all"]`,
/// a spec string or a list). Unknown keys are ignored, as a newer writer may add some.
pub fn parse_manifest(text: &[u8]) -> std::result::Result<Manifest, String> {
    use serde_json::Value;
    let root: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let top = object(&root, "the manifest")?;
    // Their values are checked by Dump::open, with its own messages.
    let format = string(top, "", "format")?;
    let version = u32::try_from(uint(top, "", "version")?).unwrap_or(u32::MAX);
    let engine = engine_info(object(required(top, "", "engine", "an object")?, "engine")?)?;
    let model = model_info(object(required(top, "", "model", "an object")?, "model")?)?;
    let prompts = prompt_records(top)?;
    let selection = match top.get("selection") {
        None | Some(Value::Null) => Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        },
        Some(v) => loose_selection(object(v, "selection")?, &model.config)?,
    };
    let status = match string(top, "", "status")?.as_str() {
        "running" => Status::Running,
        "complete" => Status::Complete,
        "failed" => Status::Failed,
        other => {
            return Err(format!(
                "status: expected \"running\", \"complete\" or \"failed\", got {other:?}"
            ))
        }
    };
    let error = match top.get("error") {
        None | Some(Value::Null) => None,
        Some(v) => Some(run_error(object(v, "error")?)?),
    };
    Ok(Manifest {
        format,
        version,
        engine,
        model,
        prompts,
        selection,
        status,
        error,
        created: opt_string(top, "", "created")?.unwrap_or_default(),
    })
}

/// `engine`: only the name identifies the engine; the rest is shown, never relied on.
fn engine_info(e: &JsonMap) -> std::result::Result<EngineInfo, String> {
    Ok(EngineInfo {
        name: string(e, "engine", "name")?,
        version: opt_string(e, "engine", "version")?.unwrap_or_default(),
        backend: opt_string(e, "engine", "backend")?.unwrap_or_default(),
        dtype: opt_string(e, "engine", "dtype")?.unwrap_or_default(),
        device: opt_string(e, "engine", "device")?.unwrap_or_default(),
        options: match e.get("options") {
            None | Some(serde_json::Value::Null) => None,
            Some(v @ serde_json::Value::Object(_)) => Some(v.clone()),
            Some(_) => return Err("engine.options: expected an object".into()),
        },
        profile: opt_string(e, "engine", "profile")?,
    })
}

/// `model`: the config, checked, since its sizes become divisors, widths and loop bounds.
fn model_info(m: &JsonMap) -> std::result::Result<ModelInfo, String> {
    let size = |key: &str| uint(m, "model", key).map(|v| v as usize);
    let config = Config {
        arch: string(m, "model", "arch")?,
        n_layer: size("n_layer")?,
        n_embd: size("n_embd")?,
        n_head: size("n_head")?,
        n_head_kv: size("n_head_kv")?,
        n_ff: size("n_ff")?,
        n_vocab: size("n_vocab")?,
        n_ctx: size("n_ctx")?,
        rope_base: float(m, "model", "rope_base")?,
        rms_eps: float(m, "model", "rms_eps")?,
        // The variant's fields sit beside the sizes (serde flatten); absent ones are llama's.
        variant: serde_json::from_value(serde_json::Value::Object(m.clone())).map_err(|e| format!("model: {e}"))?,
    };
    config.check()?;
    Ok(ModelInfo {
        path: opt_string(m, "model", "path")?.unwrap_or_default(),
        fingerprint: opt_string(m, "model", "fingerprint")?,
        config,
    })
}

/// `prompts`: ids, optional texts and token ids.
fn prompt_records(top: &JsonMap) -> std::result::Result<Vec<PromptRecord>, String> {
    let list = required(top, "", "prompts", "a list of prompts")?
        .as_array()
        .ok_or_else(|| expected("prompts", "a list of prompts", &top["prompts"]))?;
    let mut prompts = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let at = format!("prompts[{i}]");
        let p = object(v, &at)?;
        let tokens_v = required(p, &at, "tokens", "a list of token ids")?;
        let tokens_at = format!("{at}.tokens");
        let tokens = tokens_v
            .as_array()
            .ok_or_else(|| expected(&tokens_at, "a list of token ids", tokens_v))?
            .iter()
            .enumerate()
            .map(|(j, t)| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| expected(&format!("{tokens_at}[{j}]"), "a token id (an integer from 0)", t))
            })
            .collect::<std::result::Result<Vec<u32>, String>>()?;
        prompts.push(PromptRecord {
            id: string(p, &at, "id")?,
            text: opt_string(p, &at, "text")?,
            tokens,
        });
    }
    Ok(prompts)
}

/// `error`: what stopped a failed run.
fn run_error(o: &JsonMap) -> std::result::Result<RunError, String> {
    let position = match o.get("position") {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => Some(uint(o, "error", "position")? as usize),
    };
    Ok(RunError {
        message: string(o, "error", "message")?,
        tap: opt_string(o, "error", "tap")?,
        position,
    })
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn field_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn kind(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn expected(path: &str, what: &str, got: &serde_json::Value) -> String {
    format!("{path}: expected {what}, got {}", kind(got))
}

fn object<'a>(v: &'a serde_json::Value, path: &str) -> std::result::Result<&'a JsonMap, String> {
    v.as_object().ok_or_else(|| expected(path, "an object", v))
}

fn required<'a>(
    o: &'a JsonMap,
    parent: &str,
    key: &str,
    what: &str,
) -> std::result::Result<&'a serde_json::Value, String> {
    o.get(key)
        .ok_or_else(|| format!("{}: missing (expected {what})", field_path(parent, key)))
}

fn string(o: &JsonMap, parent: &str, key: &str) -> std::result::Result<String, String> {
    let v = required(o, parent, key, "a string")?;
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| expected(&field_path(parent, key), "a string", v))
}

/// A string that may be absent or null.
fn opt_string(o: &JsonMap, parent: &str, key: &str) -> std::result::Result<Option<String>, String> {
    match o.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| expected(&field_path(parent, key), "a string or null", v)),
    }
}

fn uint(o: &JsonMap, parent: &str, key: &str) -> std::result::Result<u64, String> {
    let v = required(o, parent, key, "an integer")?;
    // Writers in languages without integers (JSON from JavaScript, numpy floats) may write 30.0.
    v.as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 9.0e15)
                .map(|f| f as u64)
        })
        .ok_or_else(|| expected(&field_path(parent, key), "an integer from 0", v))
}

fn float(o: &JsonMap, parent: &str, key: &str) -> std::result::Result<f64, String> {
    let v = required(o, parent, key, "a number")?;
    v.as_f64()
        .ok_or_else(|| expected(&field_path(parent, key), "a number", v))
}

/// `selection` says what the writer meant to record; the data files are what it did
/// record, so any documented spelling is accepted: layers as a list or a spec (`"all"`,
/// `"0..4"`), taps as a list or a comma-separated string (`"all"`, aliases), positions
/// as a spec string or a list of specs and positions (`["all"]`, `[0, 1, "8.."]`).
fn loose_selection(o: &JsonMap, config: &Config) -> std::result::Result<Selection, String> {
    let n_layer = config.n_layer;
    use serde_json::Value;
    let items = |key: &str| -> std::result::Result<Option<String>, String> {
        let at = format!("selection.{key}");
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Array(list)) => list
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
                    other => Err(expected(&at, "a list of names or numbers", other)),
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(|v| Some(v.join(","))),
            Some(other) => Err(expected(&at, "a string or a list", other)),
        }
    };
    let layers = match items("layers")? {
        None => Vec::new(),
        Some(spec) if spec.is_empty() => Vec::new(),
        Some(spec) => crate::taps::parse_layers(&spec, n_layer).map_err(|e| format!("selection.layers: {e}"))?,
    };
    let taps = match items("taps")? {
        None => Vec::new(),
        Some(spec) if spec.is_empty() => Vec::new(),
        // Informational: names this build does not know are kept as written.
        Some(spec) => {
            let mut taps = crate::taps::parse_taps(&spec)
                .unwrap_or_else(|_| spec.split(',').map(|s| s.trim().to_string()).collect());
            // `all` is every tap this model has (a llama model has no Gemma post norms).
            if spec.split(',').any(|s| s.trim() == "all") {
                taps.retain(|name| crate::taps::LayerTap::from_name(name).is_none_or(|t| t.in_model(config)));
            }
            taps
        }
    };
    let positions = items("positions")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "all".into());
    let positions = if positions.split(',').any(|p| p.trim() == "all") {
        "all".to_string()
    } else {
        positions
    };
    let positions = PositionSpec::parse(&positions).map_err(|e| format!("selection.positions: {e} (expected a spec such as \"all\", \"last\", \"0..16,820..840\" or \"-8..\", or a list of them)"))?;
    Ok(Selection {
        layers,
        taps,
        positions,
    })
}

/// `[A-Za-z0-9_.-]{1,64}`, and never `.` or `..` (they would name a directory).
pub fn validate_prompt_id(id: &str) -> Result<()> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::input(format!(
            "bad prompt id {id:?}: ids are 1-64 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

/// Storage dtype of tap tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapDType {
    F32,
    F16,
    BF16,
    F64,
}

impl TapDType {
    fn safetensors(self) -> Dtype {
        match self {
            TapDType::F32 => Dtype::F32,
            TapDType::F16 => Dtype::F16,
            TapDType::BF16 => Dtype::BF16,
            TapDType::F64 => Dtype::F64,
        }
    }

    fn from_safetensors(d: Dtype) -> Option<Self> {
        Some(match d {
            Dtype::F32 => TapDType::F32,
            Dtype::F16 => TapDType::F16,
            Dtype::BF16 => TapDType::BF16,
            Dtype::F64 => TapDType::F64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            TapDType::F16 | TapDType::BF16 => 2,
            TapDType::F32 => 4,
            TapDType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TapDType::F32 => "F32",
            TapDType::F16 => "F16",
            TapDType::BF16 => "BF16",
            TapDType::F64 => "F64",
        }
    }
}

/// One tap's rows as written: little-endian bytes of `[rows, width]` in `dtype`.
#[derive(Debug, Clone)]
pub struct TapTensor {
    pub id: String,
    pub dtype: TapDType,
    pub rows: usize,
    pub width: usize,
    pub bytes: Vec<u8>,
}
