//! Dump format v1 (docs/dump-format.md): the manifest, an atomic writer and a strict reader.
//! Every file is written under a temporary name and renamed when whole, so a crashed
//! engine leaves a readable partial dump; the reader trusts nothing it reads.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Config;
use crate::taps::{PositionSpec, Selection, Tap};

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
    pub fn new(engine: EngineInfo, model: ModelInfo, prompts: Vec<PromptRecord>, selection: Selection) -> Self {
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
    let e = object(required(top, "", "engine", "an object")?, "engine")?;
    // Only the name identifies the engine; the rest is shown, never relied on.
    let engine = EngineInfo {
        name: string(e, "engine", "name")?,
        version: opt_string(e, "engine", "version")?.unwrap_or_default(),
        backend: opt_string(e, "engine", "backend")?.unwrap_or_default(),
        dtype: opt_string(e, "engine", "dtype")?.unwrap_or_default(),
        device: opt_string(e, "engine", "device")?.unwrap_or_default(),
    };
    let m = object(required(top, "", "model", "an object")?, "model")?;
    let config = Config {
        arch: string(m, "model", "arch")?,
        n_layer: uint(m, "model", "n_layer")? as usize,
        n_embd: uint(m, "model", "n_embd")? as usize,
        n_head: uint(m, "model", "n_head")? as usize,
        n_head_kv: uint(m, "model", "n_head_kv")? as usize,
        n_ff: uint(m, "model", "n_ff")? as usize,
        n_vocab: uint(m, "model", "n_vocab")? as usize,
        n_ctx: uint(m, "model", "n_ctx")? as usize,
        rope_base: float(m, "model", "rope_base")?,
        rms_eps: float(m, "model", "rms_eps")?,
    };
    // Sizes become divisors, widths and loop bounds: checked before any use.
    config.check()?;
    let model = ModelInfo {
        path: opt_string(m, "model", "path")?.unwrap_or_default(),
        fingerprint: opt_string(m, "model", "fingerprint")?,
        config,
    };
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
    let selection = match top.get("selection") {
        None | Some(Value::Null) => Selection {
            layers: Vec::new(),
            taps: Vec::new(),
            positions: PositionSpec::all(),
        },
        Some(v) => loose_selection(object(v, "selection")?, model.config.n_layer)?,
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
        Some(v) => {
            let o = object(v, "error")?;
            let position = match o.get("position") {
                None | Some(Value::Null) => None,
                Some(_) => Some(uint(o, "error", "position")? as usize),
            };
            Some(RunError {
                message: string(o, "error", "message")?,
                tap: opt_string(o, "error", "tap")?,
                position,
            })
        }
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
fn loose_selection(o: &JsonMap, n_layer: usize) -> std::result::Result<Selection, String> {
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
            crate::taps::parse_taps(&spec).unwrap_or_else(|_| spec.split(',').map(|s| s.trim().to_string()).collect())
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

fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    write(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes one dump directory. The manifest is written at creation with status
/// `running`, and rewritten (atomically) when the status changes.
pub struct DumpWriter {
    root: PathBuf,
    manifest: Manifest,
}

impl DumpWriter {
    /// Create the dump. An existing dump at `root` is replaced only with `overwrite`;
    /// any other non-empty directory is refused, so nothing unrelated is deleted.
    pub fn create(root: &Path, manifest: Manifest, overwrite: bool) -> Result<Self> {
        for p in &manifest.prompts {
            validate_prompt_id(&p.id)?;
        }
        if root.exists() {
            let is_dump = root.join(MANIFEST).is_file();
            let empty = fs::read_dir(root).map_err(|e| Error::io(root, e))?.next().is_none();
            if !(empty || is_dump && overwrite) {
                let hint = if is_dump {
                    " (it is a dump: pass --overwrite to replace it)"
                } else {
                    ""
                };
                return Err(Error::input(format!(
                    "{}: output directory exists and is not empty{hint}",
                    root.display()
                )));
            }
            if is_dump {
                fs::remove_file(root.join(MANIFEST)).map_err(|e| Error::io(root, e))?;
                let data = root.join(DATA);
                if data.exists() {
                    fs::remove_dir_all(&data).map_err(|e| Error::io(&data, e))?;
                }
            }
        }
        for p in &manifest.prompts {
            let dir = root.join(DATA).join(&p.id);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let w = Self {
            root: root.to_path_buf(),
            manifest,
        };
        w.write_manifest()?;
        Ok(w)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn write_manifest(&self) -> Result<()> {
        let path = self.root.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::input(format!("manifest: {e}")))?;
        // No fsync: the crash a dump must survive is the engine's, and the page cache
        // outlives a process. Syncing the manifest alone would promise nothing after a
        // power loss (the tap files are not synced) and costs a journal commit per status.
        write_atomic(&path, |tmp| fs::write(tmp, &json).map_err(|e| Error::io(tmp, e)))
    }

    /// Write `data/<prompt>/<stem>.safetensors` with its `positions` and tap tensors.
    pub fn write_file(&self, prompt_id: &str, stem: &str, positions: &[usize], taps: &[TapTensor]) -> Result<()> {
        validate_prompt_id(prompt_id)?;
        if !self.manifest.prompts.iter().any(|p| p.id == prompt_id) {
            return Err(Error::input(format!("prompt {prompt_id} is not in the manifest")));
        }
        let pos_bytes: Vec<u8> = positions.iter().flat_map(|&p| (p as i64).to_le_bytes()).collect();
        let mut views: Vec<(String, TensorView)> = Vec::with_capacity(taps.len() + 1);
        let view =
            |dtype, shape, data| TensorView::new(dtype, shape, data).map_err(|e| Error::input(format!("{stem}: {e}")));
        views.push(("positions".into(), view(Dtype::I64, vec![positions.len()], &pos_bytes)?));
        for t in taps {
            if t.rows != positions.len() {
                return Err(Error::input(format!(
                    "tap {} has {} rows for {} positions",
                    t.id,
                    t.rows,
                    positions.len()
                )));
            }
            views.push((
                t.id.clone(),
                view(t.dtype.safetensors(), vec![t.rows, t.width], &t.bytes)?,
            ));
        }
        let path = self.root.join(DATA).join(prompt_id).join(format!("{stem}.safetensors"));
        write_atomic(&path, |tmp| {
            safetensors::serialize_to_file(views, None, tmp)
                .map_err(|e| Error::input(format!("{}: {e}", tmp.display())))
        })
    }

    /// Start `data/<prompt>/<stem>.safetensors` as a stream of rows: `taps` are (id, dtype,
    /// width), each with a row per position.
    pub fn stream_file(
        &self,
        prompt_id: &str,
        stem: &str,
        positions: &[usize],
        taps: &[(String, TapDType, usize)],
    ) -> Result<FileStream> {
        use safetensors::tensor::{Metadata, TensorInfo};
        validate_prompt_id(prompt_id)?;
        if !self.manifest.prompts.iter().any(|p| p.id == prompt_id) {
            return Err(Error::input(format!("prompt {prompt_id} is not in the manifest")));
        }
        let n = positions.len();
        let mut infos = vec![(
            "positions".to_string(),
            TensorInfo {
                dtype: Dtype::I64,
                shape: vec![n],
                data_offsets: (0, 8 * n),
            },
        )];
        let mut end = 8 * n;
        for (id, dtype, width) in taps {
            let len = n * width * dtype.size();
            infos.push((
                id.clone(),
                TensorInfo {
                    dtype: dtype.safetensors(),
                    shape: vec![n, *width],
                    data_offsets: (end, end + len),
                },
            ));
            end += len;
        }
        let metadata = Metadata::new(None, infos).map_err(|e| Error::input(format!("{stem}: {e}")))?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| Error::input(format!("{stem}: {e}")))?;
        // Data starts 8-byte aligned, as safetensors writers pad it.
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = (8 + header.len()) as u64;
        let path = self.root.join(DATA).join(prompt_id).join(format!("{stem}.safetensors"));
        let tmp = path.with_file_name(format!(".{stem}.safetensors.tmp-{}", std::process::id()));
        let mut file = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let pos_bytes: Vec<u8> = positions.iter().flat_map(|&p| (p as i64).to_le_bytes()).collect();
        let head = [&(header.len() as u64).to_le_bytes()[..], &header, &pos_bytes].concat();
        file.write_all(&head)
            .and_then(|_| file.set_len(data_start + end as u64))
            .map_err(|e| Error::io(&tmp, e))?;
        let mut offset = data_start + 8 * n as u64;
        let taps = taps
            .iter()
            .map(|(id, dtype, width)| {
                let at = offset;
                offset += (n * width * dtype.size()) as u64;
                (id.clone(), at, width * dtype.size())
            })
            .collect();
        let stream = FileStream {
            path,
            tmp,
            file,
            prompt_id: prompt_id.to_string(),
            order: 0,
            taps,
            rows: n,
            unwritten: ((end - 8 * n) as u64).into(),
        };
        if end == 8 * n {
            // No tap rows to wait for.
            fs::rename(&stream.tmp, &stream.path).map_err(|e| Error::io(&stream.path, e))?;
        }
        Ok(stream)
    }

    pub fn finish(&mut self, status: Status, error: Option<RunError>) -> Result<()> {
        self.manifest.status = status;
        self.manifest.error = error;
        self.write_manifest()
    }
}

/// A dump file written in pieces as rows come off a device: the header (every tap, every
/// row) and the positions go first, rows land at their offsets, and the file is renamed
/// into place by the write that completes it. Dropped incomplete, it leaves nothing.
pub struct FileStream {
    path: PathBuf,
    tmp: PathBuf,
    file: fs::File,
    prompt_id: String,
    /// Creation order among the dump's files, for naming the last one written.
    order: usize,
    /// Per tap: id, byte offset of its first row, bytes per row.
    taps: Vec<(String, u64, usize)>,
    rows: usize,
    /// Tap bytes not yet written; the write that takes it to zero renames the file.
    unwritten: std::sync::atomic::AtomicU64,
}

impl FileStream {
    /// The stream's taps, in file order.
    pub fn tap_ids(&self) -> impl Iterator<Item = &str> {
        self.taps.iter().map(|(id, _, _)| id.as_str())
    }

    /// Write rows `first_row..` of tap `tap` (an index into the stream's taps); true when
    /// this completed the file (it is then in place).
    pub fn write_rows(&self, tap: usize, first_row: usize, bytes: &[u8]) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let (id, offset, row_bytes) = &self.taps[tap];
        if !bytes.len().is_multiple_of(*row_bytes) || first_row + bytes.len() / row_bytes > self.rows {
            return Err(Error::engine(format!(
                "{id}: {} bytes at row {first_row} do not fit {} rows of {row_bytes} bytes",
                bytes.len(),
                self.rows
            )));
        }
        self.file
            .write_all_at(bytes, offset + (first_row * row_bytes) as u64)
            .map_err(|e| Error::io(&self.tmp, e))?;
        if self.unwritten.fetch_sub(bytes.len() as u64, Ordering::SeqCst) != bytes.len() as u64 {
            return Ok(false);
        }
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(true)
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        if self.unwritten.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            // Never renamed: only the temporary name exists, and nothing should remain.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A tap read back from a dump, converted to f64 for comparison.
#[derive(Debug, Clone)]
pub struct TapRows {
    pub dtype: TapDType,
    pub width: usize,
    /// Row-major `[positions.len(), width]`.
    pub values: Vec<f64>,
}

/// One dump file read back and validated.
#[derive(Debug, Clone)]
pub struct DumpFile {
    pub positions: Vec<usize>,
    pub taps: BTreeMap<String, TapRows>,
}

/// A dump opened for reading: a validated manifest, files read on demand.
pub struct Dump {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// Prompt id to its index in the manifest: lookups stay O(1) however many prompts.
    prompt_index: HashMap<String, usize>,
    /// Prompts read under another id than their directory's (id, directory): diff pairs
    /// prompts whose ids differ between two dumps this way.
    renamed: Vec<(String, String)>,
}

impl Dump {
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join(MANIFEST);
        let meta = fs::metadata(&path).map_err(|e| Error::input(format!("{}: not a dump ({e})", root.display())))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(Error::input(format!(
                "{}: manifest is {} bytes, over the {} limit",
                path.display(),
                meta.len(),
                MAX_MANIFEST_BYTES
            )));
        }
        let text = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let manifest =
            parse_manifest(&text).map_err(|e| Error::input(format!("{}: bad manifest: {e}", path.display())))?;
        if manifest.format != FORMAT {
            return Err(Error::input(format!(
                "{}: format is {:?}, expected {FORMAT:?}",
                path.display(),
                manifest.format
            )));
        }
        if manifest.version != VERSION {
            return Err(Error::input(format!(
                "{}: dump format version {} is not supported (this build reads {VERSION})",
                path.display(),
                manifest.version
            )));
        }
        let mut prompt_index = HashMap::with_capacity(manifest.prompts.len());
        for (i, p) in manifest.prompts.iter().enumerate() {
            validate_prompt_id(&p.id).map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
            if prompt_index.insert(p.id.clone(), i).is_some() {
                return Err(Error::input(format!(
                    "{}: prompt id {} appears twice",
                    path.display(),
                    p.id
                )));
            }
            if let Some(&t) = p.tokens.iter().find(|&&t| t as usize >= manifest.model.config.n_vocab) {
                return Err(Error::input(format!(
                    "{}: prompt {} has token {t} outside the vocabulary",
                    path.display(),
                    p.id
                )));
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            manifest,
            prompt_index,
            renamed: Vec::new(),
        })
    }

    /// This dump with its prompt `from` read as `to` (its files stay where they are).
    pub fn with_prompt_renamed(&self, from: &str, to: &str) -> Result<Self> {
        self.prompt(from)?;
        let mut manifest = self.manifest.clone();
        manifest.prompts.retain(|p| p.id == from || p.id != to);
        for p in &mut manifest.prompts {
            if p.id == from {
                p.id = to.to_string();
            }
        }
        let mut renamed = self.renamed.clone();
        renamed.push((to.to_string(), self.directory_of(from).to_string()));
        let prompt_index = manifest
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        Ok(Self {
            root: self.root.clone(),
            manifest,
            prompt_index,
            renamed,
        })
    }

    /// The directory under data/ that holds prompt `id`'s files.
    fn directory_of<'a>(&'a self, id: &'a str) -> &'a str {
        self.renamed
            .iter()
            .rev()
            .find(|(as_id, _)| as_id == id)
            .map_or(id, |(_, dir)| dir.as_str())
    }

    pub fn prompt(&self, id: &str) -> Result<&PromptRecord> {
        self.prompt_index
            .get(id)
            .map(|&i| &self.manifest.prompts[i])
            .ok_or_else(|| Error::input(format!("{}: no prompt {id:?} in the dump", self.root.display())))
    }

    pub fn has_prompt(&self, id: &str) -> bool {
        self.prompt_index.contains_key(id)
    }

    /// Names of the files present for a prompt (stems, sorted), skipping temporaries
    /// left by a crash.
    pub fn files(&self, prompt_id: &str) -> Result<Vec<String>> {
        self.prompt(prompt_id)?;
        let dir = self.root.join(DATA).join(self.directory_of(prompt_id));
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".safetensors") {
                if !name.starts_with('.') {
                    out.push(stem.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The last tap, in topological order, of any whole file of the dump's first prompt:
    /// how far an engine that failed or was killed got.
    pub fn last_tap_on_disk(&self) -> Option<String> {
        let prompt = self.manifest.prompts.first()?;
        let mut best: Option<crate::taps::Tap> = None;
        for stem in self.files(&prompt.id).ok()? {
            if let Ok(Some(f)) = self.map_file(&prompt.id, &stem) {
                best = best.max(f.taps.keys().filter_map(|id| crate::taps::Tap::parse(id)).max());
            }
        }
        best.map(|t| t.id())
    }

    /// Map and validate one file; `None` when it was never written.
    pub fn map_file(&self, prompt_id: &str, stem: &str) -> Result<Option<MappedFile>> {
        let prompt = self.prompt(prompt_id)?;
        if !is_file_stem(stem, self.manifest.model.config.n_layer) {
            return Err(Error::input(format!(
                "{}: {stem:?} is not a dump file name",
                self.root.display()
            )));
        }
        let path = self
            .root
            .join(DATA)
            .join(self.directory_of(prompt_id))
            .join(format!("{stem}.safetensors"));
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        if !meta.is_file() {
            return Err(Error::input(format!(
                "{}: not a regular file (links out of the dump are refused)",
                path.display()
            )));
        }
        let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only map of a file the engine finished writing (renamed into place);
        // every access below is bounds-checked by the safetensors header validation.
        // Populated up front: one batched fault instead of one per page while comparing.
        let mmap = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(|e| Error::io(&path, e))?;
        MappedFile::parse(&path, mmap, stem, prompt.tokens.len(), &self.manifest.model.config).map(Some)
    }

    /// Read one file decoded to f64; `None` when it was never written.
    pub fn read_file(&self, prompt_id: &str, stem: &str) -> Result<Option<DumpFile>> {
        let Some(mapped) = self.map_file(prompt_id, stem)? else {
            return Ok(None);
        };
        let taps = mapped
            .taps
            .iter()
            .map(|(id, slice)| {
                let view = mapped.view(slice);
                let values = (0..view.rows * view.width).map(|i| view.get(i)).collect();
                (
                    id.clone(),
                    TapRows {
                        dtype: slice.dtype,
                        width: slice.width,
                        values,
                    },
                )
            })
            .collect();
        Ok(Some(DumpFile {
            positions: mapped.positions.clone(),
            taps,
        }))
    }
}

/// Where a tap's rows sit in a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TapSlice {
    pub dtype: TapDType,
    pub width: usize,
    offset: usize,
    len: usize,
}

/// A validated, memory-mapped dump file: comparing reads rows straight from the page
/// cache without decoding whole tensors.
pub struct MappedFile {
    mmap: memmap2::Mmap,
    pub positions: Vec<usize>,
    pub taps: BTreeMap<String, TapSlice>,
}

/// Rows of one tap, read element by element in their stored dtype.
#[derive(Clone, Copy)]
pub struct TapView<'a> {
    pub dtype: TapDType,
    pub rows: usize,
    pub width: usize,
    pub bytes: &'a [u8],
}

impl TapView<'_> {
    #[inline]
    pub fn get(&self, i: usize) -> f64 {
        let b = self.bytes;
        match self.dtype {
            TapDType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as f64,
            TapDType::F64 => f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")),
            TapDType::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
            TapDType::BF16 => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
        }
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> TapView<'_> {
        let n = self.width * self.dtype.size();
        TapView {
            dtype: self.dtype,
            rows: 1,
            width: self.width,
            bytes: &self.bytes[r * n..(r + 1) * n],
        }
    }

    /// Append every value as f32 (f64 rounds).
    pub fn append_f32(&self, out: &mut Vec<f32>) {
        let b = self.bytes;
        match self.dtype {
            TapDType::F32 => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            TapDType::F64 => out.extend(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
            ),
            TapDType::F16 => out.extend(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
            TapDType::BF16 => out.extend(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        }
    }
}

impl MappedFile {
    fn parse(path: &Path, mmap: memmap2::Mmap, stem: &str, seq_len: usize, config: &Config) -> Result<Self> {
        let bad = |msg: String| Error::input(format!("{}: {msg}", path.display()));
        let base = mmap.as_ptr() as usize;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| bad(format!("bad safetensors file: {e}")))?;
        let pos_view = st
            .tensor("positions")
            .map_err(|_| bad("missing the positions tensor".into()))?;
        if pos_view.dtype() != Dtype::I64 || pos_view.shape().len() != 1 {
            return Err(bad(format!(
                "positions must be I64 [n], found {:?} {:?}",
                pos_view.dtype(),
                pos_view.shape()
            )));
        }
        let mut positions = Vec::with_capacity(pos_view.shape()[0]);
        for chunk in pos_view.data().chunks_exact(8) {
            let p = i64::from_le_bytes(chunk.try_into().expect("chunks_exact gives 8 bytes"));
            if p < 0 || p as u64 >= seq_len as u64 {
                return Err(bad(format!("position {p} is outside the prompt's {seq_len} tokens")));
            }
            if positions.last().is_some_and(|&last| last >= p as usize) {
                return Err(bad("positions are not strictly increasing".into()));
            }
            positions.push(p as usize);
        }
        let mut taps = BTreeMap::new();
        for (name, view) in st.iter() {
            if name == "positions" {
                continue;
            }
            let tap = Tap::parse(name).ok_or_else(|| bad(format!("tensor {name:?} is not a canonical tap id")))?;
            if tap.file_stem().to_string() != stem {
                return Err(bad(format!("tap {name} belongs in {}.safetensors", tap.file_stem())));
            }
            let dtype = TapDType::from_safetensors(view.dtype()).ok_or_else(|| {
                bad(format!(
                    "tap {name} has dtype {:?}; F32, F16, BF16 or F64 expected",
                    view.dtype()
                ))
            })?;
            let width = tap.width(config);
            if view.shape() != [positions.len(), width] {
                return Err(bad(format!(
                    "tap {name} has shape {:?}, expected [{}, {width}]",
                    view.shape(),
                    positions.len()
                )));
            }
            let data = view.data();
            taps.insert(
                name.to_string(),
                TapSlice {
                    dtype,
                    width,
                    offset: data.as_ptr() as usize - base,
                    len: data.len(),
                },
            );
        }
        drop(st);
        Ok(Self { mmap, positions, taps })
    }

    pub fn view(&self, slice: &TapSlice) -> TapView<'_> {
        TapView {
            dtype: slice.dtype,
            rows: self.positions.len(),
            width: slice.width,
            bytes: &self.mmap[slice.offset..slice.offset + slice.len],
        }
    }

    pub fn tap(&self, id: &str) -> Option<TapView<'_>> {
        self.taps.get(id).map(|s| self.view(s))
    }
}

/// `embed`, `output` or `blk.L` with L a layer of the model, written without leading zeros.
pub fn is_file_stem(stem: &str, n_layer: usize) -> bool {
    match stem.strip_prefix("blk.") {
        Some(l) => l.parse::<usize>().is_ok_and(|n| n < n_layer && n.to_string() == l),
        None => stem == "embed" || stem == "output",
    }
}

/// One file for the background writer.
pub struct FileJob {
    pub prompt_id: String,
    pub stem: String,
    pub positions: std::sync::Arc<Vec<usize>>,
    pub taps: Vec<TapTensor>,
}

/// What the writer threads do: write a whole file, or rows of a streamed one.
enum Job {
    File(FileJob),
    Rows {
        stream: Arc<FileStream>,
        tap: usize,
        first_row: usize,
        bytes: RowBytes,
    },
}

/// Rows for a streamed file: in memory now, or still being copied off a device (the
/// engine goes on computing meanwhile).
pub enum RowBytes {
    Ready(Vec<u8>),
    InFlight(Box<dyn InFlightRows>),
}

/// Rows a device is still copying to host memory.
pub trait InFlightRows: Send {
    /// Wait until the rows are in host memory; an error when the device failed before
    /// they arrived.
    fn wait(&mut self) -> Result<&[u8]>;
}

/// Writes files on threads of their own so the engine computes while data hits the
/// disk; the bounded queue keeps at most two jobs per thread in flight, bounding memory.
pub struct BackgroundWriter {
    tx: Option<std::sync::mpsc::SyncSender<(usize, Job)>>,
    sent: std::sync::atomic::AtomicUsize,
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
    shared: Arc<WriterShared>,
}

/// What the writer threads share.
struct WriterShared {
    writer: DumpWriter,
    jobs: std::sync::Mutex<std::sync::mpsc::Receiver<(usize, Job)>>,
    /// Set by the first failed write: the other threads stop taking files.
    failed: std::sync::atomic::AtomicBool,
    /// (order, prompt id, last tap id) of the latest file (in send or creation order)
    /// that reached the disk whole: files finish out of order, the report names the last
    /// in graph order.
    last_written: std::sync::Mutex<Option<(usize, String, String)>>,
    /// Row buffers written and handed back, for reuse: fresh memory costs a page fault
    /// per page on first touch.
    spare: std::sync::Mutex<Vec<Vec<u8>>>,
    /// The first rows a device failed to deliver: the dump cannot be complete.
    lost: std::sync::Mutex<Option<Error>>,
    threads: usize,
}

/// Files written at once: a dump's files are independent, and one thread does not keep
/// a fast disk busy. Half the cores, from 2 to 8: the engine needs the others.
fn writer_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() / 2)
        .clamp(2, 8)
}

impl WriterShared {
    /// Do one job; `sent` is its place in the queue.
    fn write(&self, sent: usize, job: Job) -> Result<()> {
        let (order, prompt_id, last_tap) = match job {
            Job::File(job) => {
                self.writer
                    .write_file(&job.prompt_id, &job.stem, &job.positions, &job.taps)?;
                let Some(last) = job.taps.last() else { return Ok(()) };
                (sent, job.prompt_id, last.id.clone())
            }
            Job::Rows {
                stream,
                tap,
                first_row,
                bytes,
            } => {
                let done = match bytes {
                    RowBytes::Ready(mut bytes) => {
                        let done = stream.write_rows(tap, first_row, &bytes)?;
                        bytes.clear();
                        if let Ok(mut spare) = self.spare.lock() {
                            if spare.len() < 4 * self.threads {
                                spare.push(bytes);
                            }
                        }
                        done
                    }
                    RowBytes::InFlight(mut rows) => match rows.wait() {
                        Ok(bytes) => stream.write_rows(tap, first_row, bytes)?,
                        // The device failed before these rows came off it: their file cannot
                        // land, but every other file still can (a crash is when they matter).
                        Err(e) => {
                            if let Ok(mut lost) = self.lost.lock() {
                                lost.get_or_insert(e);
                            }
                            return Ok(());
                        }
                    },
                };
                if !done {
                    return Ok(());
                }
                (
                    stream.order,
                    stream.prompt_id.clone(),
                    stream.tap_ids().last().unwrap_or_default().to_string(),
                )
            }
        };
        if let Ok(mut slot) = self.last_written.lock() {
            if slot.as_ref().is_none_or(|(o, _, _)| *o < order) {
                *slot = Some((order, prompt_id, last_tap));
            }
        }
        Ok(())
    }
}

impl BackgroundWriter {
    pub fn spawn(writer: DumpWriter) -> Self {
        use std::sync::atomic::Ordering;
        let threads = writer_threads();
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Job)>(2 * threads);
        let shared = Arc::new(WriterShared {
            writer,
            jobs: std::sync::Mutex::new(rx),
            failed: Default::default(),
            last_written: Default::default(),
            spare: Default::default(),
            lost: Default::default(),
            threads,
        });
        let handles = (0..threads)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || -> Result<()> {
                    loop {
                        let (order, job) = match shared.jobs.lock().map(|rx| rx.recv()) {
                            Ok(Ok(next)) => next,
                            _ => return Ok(()),
                        };
                        if shared.failed.load(Ordering::SeqCst) {
                            continue; // drain, so the engine's sends never block on a dead writer
                        }
                        if let Err(e) = shared.write(order, job) {
                            shared.failed.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        Self {
            tx: Some(tx),
            sent: Default::default(),
            handles,
            shared,
        }
    }

    fn queue(&self, job: Job) -> Result<()> {
        let stopped = || Error::engine("the dump writer stopped (see the error at the end of the run)");
        if self.shared.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stopped());
        }
        let tx = self.tx.as_ref().expect("sender lives until finish");
        let order = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tx.send((order, job)).map_err(|_| stopped())
    }

    /// Queue a whole file; fails when a writer thread has stopped on an error.
    pub fn send(&self, job: FileJob) -> Result<()> {
        self.queue(Job::File(job))
    }

    /// Start a streamed file (see [`DumpWriter::stream_file`]); its rows go to
    /// [`send_rows`](Self::send_rows).
    pub fn stream_file(
        &self,
        prompt_id: &str,
        stem: &str,
        positions: &[usize],
        taps: &[(String, TapDType, usize)],
    ) -> Result<Arc<FileStream>> {
        let mut stream = self.shared.writer.stream_file(prompt_id, stem, positions, taps)?;
        stream.order = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Arc::new(stream))
    }

    /// An empty buffer for [`send_rows`](Self::send_rows), reused when one is spare.
    pub fn buffer(&self) -> Vec<u8> {
        self.shared
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_default()
    }

    /// Queue rows `first_row..` of tap `tap` of `stream`.
    pub fn send_rows(&self, stream: &Arc<FileStream>, tap: usize, first_row: usize, bytes: RowBytes) -> Result<()> {
        self.queue(Job::Rows {
            stream: stream.clone(),
            tap,
            first_row,
            bytes,
        })
    }

    /// Wait for queued files, then mark the manifest complete, or failed with the engine's
    /// error and the last tap that reached the disk. Returns the first error.
    pub fn finish(self, outcome: Result<()>) -> Result<()> {
        self.finish_with_tokens(outcome, Vec::new())
    }

    /// As [`finish`](Self::finish), first recording the tokens each prompt processed
    /// (prompt and generated), in manifest order, for as many prompts as ran.
    pub fn finish_with_tokens(self, outcome: Result<()>, tokens: Vec<Vec<u32>>) -> Result<()> {
        let Self {
            tx, handles, shared, ..
        } = self;
        drop(tx);
        let mut result = Ok(());
        for handle in handles {
            let r = handle
                .join()
                .map_err(|_| Error::engine("a dump writer thread panicked"))?;
            if result.is_ok() {
                result = r;
            }
        }
        let shared = Arc::try_unwrap(shared).map_err(|_| Error::engine("a dump writer thread outlived the dump"))?;
        if let (Ok(()), Some(lost)) = (&result, shared.lost.into_inner().unwrap_or(None)) {
            result = Err(lost);
        }
        let last_written = shared
            .last_written
            .into_inner()
            .unwrap_or(None)
            .map(|(_, prompt, tap)| (prompt, tap));
        let mut writer = shared.writer;
        for (p, t) in writer.manifest.prompts.iter_mut().zip(tokens) {
            p.tokens = t;
        }
        let failure = match (outcome, result) {
            (Ok(()), Ok(())) => None,
            (Err(e), _) | (Ok(()), Err(e)) => Some(e),
        };
        match failure {
            None => writer.finish(Status::Complete, None),
            Some(e) => {
                let message = match &last_written {
                    Some((prompt, tap)) => format!("{e} (prompt {prompt}; last tap written: {tap})"),
                    None => format!("{e} (no tap was written)"),
                };
                let error = RunError {
                    message: e.to_string(),
                    tap: last_written.map(|(_, tap)| tap),
                    position: None,
                };
                writer.finish(Status::Failed, Some(error))?;
                Err(match e {
                    Error::Input(_) => Error::Input(message),
                    Error::Engine(_) => Error::Engine(message),
                })
            }
        }
    }
}
