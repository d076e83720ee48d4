//! GGUF container parsing: header, metadata and tensor table, every length and offset
//! checked against the file before use, so that a truncated or hostile file gives an
//! error instead of a panic or a huge allocation. Knows nothing about llama or compute.

mod cursor;
mod value;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{Error, Result};

use cursor::Cursor;
pub use value::{Array, Value};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// One row of the tensor table, validated against the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub dtype: GgmlDType,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// Metadata keys in file order (for stable printing and fingerprinting).
    pub metadata_order: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Bytes of header, metadata and tensor table: the cheap part of the fingerprint.
    pub header_len: usize,
    mmap: Mmap,
}

/// Name of a ggml type as GGUF tools print it.
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

fn dtype_from_u32(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(Error::input(format!(
                "{} is a directory; expected a GGUF model file (.gguf)",
                path.display()
            )));
        }
        // SAFETY: the map is read-only; a file changed underneath us while mapped can give
        // wrong numbers but every access stays inside the mapped length checked below.
        let mmap =
            unsafe { Mmap::map(&file) }.map_err(|e| Error::input(format!("{}: cannot map: {e}", path.display())))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        let (version, n_kv, n_tensors) = read_header(&mut c)?;
        let (metadata, metadata_order) = read_metadata(&mut c, n_kv)?;
        let alignment = alignment_of(&c, &metadata)?;
        let entries = read_tensor_table(&mut c, n_tensors)?;
        let header_len = c.pos;
        let data_start = (header_len as u64).div_ceil(alignment) * alignment;
        let layout = DataLayout {
            path,
            data_start,
            alignment,
            file_len: mmap.len() as u64,
        };
        let mut tensors = Vec::with_capacity(entries.len());
        let mut tensor_index = HashMap::new();
        for entry in entries {
            let info = layout.place(entry)?;
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(Error::input(format!(
                    "{}: tensor {}: appears twice in the tensor table",
                    path.display(),
                    info.name
                )));
            }
            tensors.push(info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            metadata_order,
            tensors,
            tensor_index,
            header_len,
            mmap,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor, exactly `info.len` long (checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }

    /// The whole mapped file, for the fingerprint's sampled bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// Magic, version and the two counts, refused when the rest of the file cannot hold them.
fn read_header(c: &mut Cursor) -> Result<(u32, u64, u64)> {
    let magic = c.fixed::<4>("magic")?;
    if &magic != MAGIC {
        return Err(Error::input(format!(
            "{}: not a GGUF file (magic {:?})",
            c.path.display(),
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::input(format!(
            "{}: unsupported GGUF version {version} (2 and 3 are read)",
            c.path.display()
        )));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    let remaining = (c.bytes.len() - c.pos) as u64;
    // A key-value pair takes at least 12 bytes and a tensor entry at least 24.
    if n_kv.saturating_mul(12) > remaining || n_tensors.saturating_mul(24) > remaining {
        return Err(c.err(&format!(
            "header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold"
        )));
    }
    Ok((version, n_kv, n_tensors))
}

/// The metadata table, keyed and in file order; a repeated key is refused.
fn read_metadata(c: &mut Cursor, n_kv: u64) -> Result<(HashMap<String, Value>, Vec<String>)> {
    let mut metadata = HashMap::new();
    let mut order = Vec::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let type_code = c.u32(&format!("type of {key}"))?;
        let value = c.value(type_code, 0, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.err(&format!("metadata key {key} appears twice")));
        }
        order.push(key);
    }
    Ok((metadata, order))
}

fn alignment_of(c: &Cursor, metadata: &HashMap<String, Value>) -> Result<u64> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && (8..=1 << 20).contains(&a) => Ok(a),
            _ => Err(c.err(&format!(
                "general.alignment {} is not a power of two in 8..=1M",
                v.summary()
            ))),
        },
    }
}

/// One tensor-table entry as read, before its data range is checked.
struct TensorEntry {
    name: String,
    dims: Vec<u64>,
    dtype: GgmlDType,
    offset: u64,
}

fn read_tensor_table(c: &mut Cursor, n_tensors: u64) -> Result<Vec<TensorEntry>> {
    let mut entries = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor name #{i}"))?;
        let n_dims = c.u32(&format!("dimension count of {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(&format!("tensor {name} has {n_dims} dimensions (1..=4 allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("dimensions of {name}"))?);
        }
        let type_code = c.u32(&format!("type of {name}"))?;
        let dtype = dtype_from_u32(type_code)
            .ok_or_else(|| c.err(&format!("tensor {name} has unknown ggml type {type_code}")))?;
        let offset = c.u64(&format!("offset of {name}"))?;
        entries.push(TensorEntry {
            name,
            dims,
            dtype,
            offset,
        });
    }
    Ok(entries)
}

/// Where tensor data may lie: after the aligned header, inside the file.
struct DataLayout<'a> {
    path: &'a Path,
    data_start: u64,
    alignment: u64,
    file_len: u64,
}

impl DataLayout<'_> {
    /// Checks an entry's size and range with checked arithmetic and places it in the file.
    fn place(&self, entry: TensorEntry) -> Result<TensorInfo> {
        let TensorEntry {
            name,
            dims,
            dtype,
            offset,
        } = entry;
        let bad = |msg: String| Error::input(format!("{}: tensor {name}: {msg}", self.path.display()));
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        if dims.contains(&0) {
            return Err(bad(format!("has a zero dimension {dims:?}")));
        }
        let block = dtype.block_size() as u64;
        if dims[0] % block != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of the {} block size {block}",
                dims[0],
                dtype_name(dtype)
            )));
        }
        // Checked: a wrapped size would pass the bounds check below and later ask the
        // loaders for an impossible buffer.
        let len = (n_elements / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| bad(format!("byte size of dimensions {dims:?} overflows")))?;
        if offset % self.alignment != 0 {
            return Err(bad(format!(
                "data offset {offset} is not aligned to {}",
                self.alignment
            )));
        }
        let start = self
            .data_start
            .checked_add(offset)
            .ok_or_else(|| bad("data offset overflows".into()))?;
        let end = start.checked_add(len).ok_or_else(|| bad("data end overflows".into()))?;
        if end > self.file_len {
            return Err(bad(format!(
                "data [{start}, {end}) runs past the end of the file ({} bytes; truncated?)",
                self.file_len
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            dtype,
            start: start as usize,
            len: len as usize,
        })
    }
}
