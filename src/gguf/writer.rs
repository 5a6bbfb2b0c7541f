//! Writes GGUF files. Tests use it to build tiny random-weight models; it writes what `GgufFile::open` reads.

use std::io::Write;
use std::path::Path;

use super::{GgmlType, Value};

pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

/// Alignment of tensor data when the metadata does not set `general.alignment` (the GGUF default).
const ALIGN: usize = 32;

/// Byte positions of what [`GgufWriter::to_bytes_with_layout`] wrote.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub metadata: Vec<MetaField>,
    pub tensors: Vec<TensorField>,
    /// Start of the data section (tensor offsets count from here).
    pub data_start: usize,
    pub alignment: usize,
}

/// One metadata entry: its key's length prefix, type id and value start at these byte positions; it ends before `end`.
#[derive(Clone, Debug)]
pub struct MetaField {
    pub key: String,
    pub value: Value,
    pub key_at: usize,
    pub type_at: usize,
    pub value_at: usize,
    pub end: usize,
}

/// One tensor info: its name's length prefix, dimension count (then the u64 dimensions), type id and data offset
/// field start at these byte positions; its data is `n_bytes` at `offset` in the data section.
#[derive(Clone, Debug)]
pub struct TensorField {
    pub name: String,
    pub name_at: usize,
    pub n_dims_at: usize,
    pub type_at: usize,
    pub offset_at: usize,
    pub offset: usize,
    pub n_bytes: usize,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Appends a metadata entry (a key given twice is written twice: tests use that to build invalid files).
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Sets `key` to `v`: replaces its first entry in place, or appends it.
    pub fn set_meta(&mut self, key: &str, v: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.metadata.push((key.to_string(), v)),
        }
        self
    }

    /// The value of `key`, if set (a copy).
    pub fn meta_value(&self, key: &str) -> Option<Value> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|e| e.1.clone())
    }

    /// Removes every entry of `key`.
    pub fn remove_meta(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// Adds a tensor: `dims[0]` is the row length; `bytes` is already in `ty`'s block format.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, bytes));
        self
    }

    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with_layout().0
    }

    /// The file, and where each field went (for tests that corrupt one field on purpose). Tensor data is aligned to
    /// `general.alignment` when the metadata sets it to a power-of-two u32 up to 64 KiB, else to 32 bytes.
    pub fn to_bytes_with_layout(&self) -> (Vec<u8>, Layout) {
        let align = self
            .metadata
            .iter()
            .find_map(|(k, v)| match v {
                Value::U32(a)
                    if k == "general.alignment" && a.is_power_of_two() && *a <= 1 << 16 =>
                {
                    Some(*a as usize)
                }
                _ => None,
            })
            .unwrap_or(ALIGN);
        let mut lay = Layout {
            alignment: align,
            ..Default::default()
        };
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            let key_at = out.len();
            write_str(&mut out, k);
            let type_at = out.len();
            out.extend_from_slice(&type_id(v).to_le_bytes());
            let value_at = out.len();
            write_value(&mut out, v);
            lay.metadata.push(MetaField {
                key: k.clone(),
                value: v.clone(),
                key_at,
                type_at,
                value_at,
                end: out.len(),
            });
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            let name_at = out.len();
            write_str(&mut out, name);
            let n_dims_at = out.len();
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            let type_at = out.len();
            out.extend_from_slice(&ty.to_u32().to_le_bytes());
            let offset_at = out.len();
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            lay.tensors.push(TensorField {
                name: name.clone(),
                name_at,
                n_dims_at,
                type_at,
                offset_at,
                offset,
                n_bytes: bytes.len(),
            });
            offset += bytes.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        lay.data_start = out.len();
        for ((_, _, _, bytes), t) in self.tensors.iter().zip(&lay.tensors) {
            out.resize(lay.data_start + t.offset, 0);
            out.extend_from_slice(bytes);
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        (out, lay)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(&self.to_bytes())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            let elem = a.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                write_value(out, x);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
