//! The bounds-checked little-endian cursor the GGUF parser reads with: every length and
//! count is checked against the bytes left before anything is allocated.

use std::path::Path;

use super::value::{Array, Value};
use crate::error::{Error, Result};

/// Deepest nesting of metadata arrays accepted; real files use one level.
const MAX_ARRAY_DEPTH: usize = 4;

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
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Cursor<'a> {
    pub(super) fn err(&self, what: &str) -> Error {
        Error::input(format!(
            "{}: bad GGUF at byte {}: {what}",
            self.path.display(),
            self.pos
        ))
    }

    pub(super) fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
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

    pub(super) fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    pub(super) fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(&format!("{what} is not valid UTF-8")))
    }

    /// The items of an array of `count` elements of `elem_type`. Every element takes at
    /// least [`min_encoded_size`] bytes, so a count the rest of the file cannot hold is
    /// refused before anything is reserved, and what is reserved stays within a small
    /// multiple of the bytes that back it.
    pub(super) fn array(&mut self, elem_type: u32, count: u64, depth: usize, what: &str) -> Result<Array> {
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

    pub(super) fn value(&mut self, type_code: u32, depth: usize, what: &str) -> Result<Value> {
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
