//! GGUF container parsing: header, metadata and tensor table, every length and offset
//! checked against the file before use, so that a truncated or hostile file gives an
//! error instead of a panic or a huge allocation. Knows nothing about llama or compute.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of metadata arrays accepted; real files use one level.
const MAX_ARRAY_DEPTH: usize = 4;
const MAX_DIMS: u32 = 4;

/// A metadata value as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, stored by element type: a u8 array costs a byte per element in
/// memory as in the file (one `Value` per element would cost 32).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a [`Value`] (strings and nested arrays are cloned).
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::String(v) => Value::String(v.get(i)?.clone()),
            Array::Array(v) => Value::Array(v.get(i)?.clone()),
        })
    }

    /// The elements when they are strings.
    pub fn strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// Every element as a number (`None` for an element that is not one).
    pub fn numbers(&self) -> impl Iterator<Item = Option<f64>> + '_ {
        (0..self.len()).map(|i| match self {
            Array::String(_) | Array::Array(_) => None,
            _ => self.get(i).and_then(|v| v.as_f64()),
        })
    }

    /// Every element as a signed integer (`None` for an element that is not one).
    pub fn integers(&self) -> impl Iterator<Item = Option<i64>> + '_ {
        (0..self.len()).map(|i| match self {
            Array::String(_) | Array::Array(_) => None,
            _ => self.get(i).and_then(|v| v.as_i64()),
        })
    }
}

impl Value {
    /// The value as an unsigned integer, whatever integer type the writer chose.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short human form for `inspect`: long arrays are summarized.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!(
                    "{:?}… ({} chars)",
                    s.chars().take(60).collect::<String>(),
                    s.chars().count()
                )
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 8 => format!("[{} items]", a.len()),
            Value::Array(a) => format!(
                "[{}]",
                (0..a.len())
                    .filter_map(|i| a.get(i))
                    .map(|v| v.summary())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

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

/// Fewest bytes one metadata value of a type takes in the file (a string or an array
/// is at least its length field); `None` for an unknown type.
fn min_encoded_size(type_code: u32) -> Option<u64> {
    Some(match type_code {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Bounds-checked little-endian cursor over the mapped file.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::input(format!(
            "{}: bad GGUF at byte {}: {what}",
            self.path.display(),
            self.pos
        ))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(&format!(
                "{what} needs {n} bytes but the file has {remaining} left (truncated?)"
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(&format!("{what} is not valid UTF-8")))
    }

    /// The items of an array of `count` elements of `elem_type`. Every element takes at
    /// least [`min_encoded_size`] bytes, so a count the rest of the file cannot hold is
    /// refused before anything is reserved, and what is reserved stays within a small
    /// multiple of the bytes that back it.
    fn array(&mut self, elem_type: u32, count: u64, depth: usize, what: &str) -> Result<Array> {
        let min = min_encoded_size(elem_type)
            .ok_or_else(|| self.err(&format!("{what}: unknown array element type {elem_type}")))?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if count > remaining / min {
            return Err(self.err(&format!(
                "{what}: array claims {count} items of at least {min} bytes but only {remaining} bytes remain"
            )));
        }
        let n = count as usize;
        macro_rules! numbers {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let bytes = self.take(count * SIZE as u64, what)?;
                Array::$variant(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                        .collect(),
                )
            }};
        }
        Ok(match elem_type {
            0 => numbers!(U8, u8),
            1 => numbers!(I8, i8),
            2 => numbers!(U16, u16),
            3 => numbers!(I16, i16),
            4 => numbers!(U32, u32),
            5 => numbers!(I32, i32),
            6 => numbers!(F32, f32),
            10 => numbers!(U64, u64),
            11 => numbers!(I64, i64),
            12 => numbers!(F64, f64),
            7 => {
                let bytes = self.take(count, what)?;
                if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                    return Err(self.err(&format!("{what}: bool byte {b} is neither 0 nor 1")));
                }
                Array::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            8 => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.string(what)?);
                }
                Array::String(items)
            }
            _ => {
                if depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(self.err(&format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let elem_type = self.u32(what)?;
                    let count = self.u64(what)?;
                    items.push(self.array(elem_type, count, depth + 1, what)?);
                }
                Array::Array(items)
            }
        })
    }

    fn value(&mut self, type_code: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match type_code {
            0 => Value::U8(self.fixed::<1>(what)?[0]),
            1 => Value::I8(self.fixed::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.fixed(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.fixed(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(what)?)),
            7 => match self.fixed::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(&format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_type = self.u32(what)?;
                let count = self.u64(what)?;
                Value::Array(self.array(elem_type, count, depth, what)?)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.fixed(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(what)?)),
            other => return Err(self.err(&format!("{what}: unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::input(format!("{}: cannot open: {e}", path.display())))?;
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
