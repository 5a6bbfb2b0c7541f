//! GGUF files: the container llama.cpp writes models in.
//!
//! Layout (little endian): magic "GGUF", version (u32, 2 or 3), tensor count (u64), metadata count (u64),
//! metadata key/value pairs, tensor infos (name, dims, type, offset), padding to `general.alignment`,
//! then the tensor data. We memory-map the file and hand out byte slices of tensors; nothing is copied.
//!
//! Every read is bounds-checked: a truncated or corrupt file is an error naming what was wrong, never a panic. Opening
//! also validates the container as llama.cpp's loader does: metadata keys and tensor names unique, `general.alignment`
//! a nonzero power of two, tensor data aligned, inside the file and not overlapping, the keys hayloft reads of the
//! type it reads them as ([`keys`]). Counts read from the file are checked against the bytes left before anything
//! is allocated for them.

pub mod keys;
pub mod writer;

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// The tensor element types GGUF files use (ggml's `ggml_type` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    Other(u32),
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            o => Self::Other(o),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
            Self::Other(o) => o,
        }
    }

    /// (elements per block, bytes per block); None for types we do not know the layout of.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8K => (256, 292),
            Self::Other(_) => return None,
        })
    }

    /// Bytes taken by `n` elements, or None if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (bs, bb) = self.block_layout()?;
        if !n.is_multiple_of(bs as u64) {
            return None;
        }
        (n / bs as u64).checked_mul(bb as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => write!(f, "F32"),
            Self::F16 => write!(f, "F16"),
            Self::BF16 => write!(f, "BF16"),
            Self::Q4_0 => write!(f, "Q4_0"),
            Self::Q4_1 => write!(f, "Q4_1"),
            Self::Q5_0 => write!(f, "Q5_0"),
            Self::Q5_1 => write!(f, "Q5_1"),
            Self::Q8_0 => write!(f, "Q8_0"),
            Self::Q8_1 => write!(f, "Q8_1"),
            Self::Q2K => write!(f, "Q2_K"),
            Self::Q3K => write!(f, "Q3_K"),
            Self::Q4K => write!(f, "Q4_K"),
            Self::Q5K => write!(f, "Q5_K"),
            Self::Q6K => write!(f, "Q6_K"),
            Self::Q8K => write!(f, "Q8_K"),
            Self::Other(o) => write!(f, "ggml type {o}"),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
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
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
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
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The value's GGUF type, with the element type for arrays ("array of u32").
    pub fn type_desc(&self) -> String {
        match self {
            Value::Array(a) => match a.first() {
                Some(e) => format!("array of {}", e.type_name()),
                None => "empty array".to_string(),
            },
            v => v.type_name().to_string(),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// Where a tensor lives in the file and what it holds. `dims[0]` is the fastest-varying (row length).
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (expected magic \"GGUF\", found {found:?})")]
    NotGguf { path: PathBuf, found: String },
    #[error("{path}: unsupported GGUF version {version} (hayloft reads versions 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what} at byte {offset} runs past the end of the file ({len} bytes)")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },
    #[error("{path}: corrupt GGUF: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: metadata key {key} has {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        found: String,
        expected: &'static str,
    },
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    /// Per tensor: whether a loader has looked it up ([`GgufFile::unused_tensors`]).
    looked_up: Vec<AtomicBool>,
    /// The vocabulary's size once its arrays were dropped ([`GgufFile::shed_vocabulary`]).
    shed_tokens: Option<usize>,
    data: Data,
    data_offset: u64,
}

/// The file's bytes: memory-mapped from disk, or owned (a file read from memory, e.g. by the fuzzer).
enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.truncated(what.to_string())),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// Bytes not yet read.
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    /// `what`, starting here, does not fit in the rest of the file.
    fn truncated(&self, what: String) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
            len: self.buf.len() as u64,
        }
    }
    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what,
        }
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > self.left() {
            return Err(self.truncated(format!("{what} of {n} bytes")));
        }
        let bytes = self.take(n as usize, what)?;
        // Some converters wrote vocabularies with invalid UTF-8; keep them readable instead of refusing the file.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => Value::Bool(self.arr::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt(format!("metadata {key}: arrays nested too deeply")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                let Some(min) = min_value_size(elem_ty) else {
                    return Err(self.corrupt(format!(
                        "metadata {key}: unknown array element type {elem_ty}"
                    )));
                };
                if n > self.left() / min {
                    return Err(self.truncated(format!(
                        "metadata {key}: array of {n} elements (at least {} bytes)",
                        n.saturating_mul(min)
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.corrupt(format!("metadata {key}: unknown value type {t}"))),
        })
    }
}

impl Cursor<'_> {
    /// One tensor info (name, dimensions, type, data offset), checked on its own: 1 to 4 dimensions whose product fits
    /// ggml's int64, rows a whole number of the type's blocks, the offset a multiple of `alignment`.
    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(self.corrupt(format!("tensor {name}: {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&name)?);
        }
        let ty = GgmlType::from_u32(self.u32(&name)?);
        let offset = self.u64(&name)?;
        // Element counts fit ggml's int64 (as llama.cpp checks), so products of them never overflow later.
        let n_el = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| self.corrupt(format!("tensor {name}: dimensions {dims:?} overflow")))?;
        // Unknown types get size 0 here; using such a tensor is refused later with a clear message.
        let n_bytes = match ty.block_layout() {
            Some((bs, _)) => {
                if !dims[0].is_multiple_of(bs as u64) {
                    return Err(self.corrupt(format!(
                        "tensor {name}: row length {} is not a multiple of the {ty} block size {bs}",
                        dims[0]
                    )));
                }
                ty.bytes_for(n_el).ok_or_else(|| {
                    self.corrupt(format!("tensor {name}: {n_el} elements overflow"))
                })?
            }
            None => 0,
        };
        if !offset.is_multiple_of(alignment) {
            return Err(self.corrupt(format!(
                "tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        })
    }
}

/// Tensors' data regions (all inside the file already) must not share a byte: sorted by offset, each ends before the
/// next begins. (Tensors of unknown type have no known size and no region.)
fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), String> {
    let mut regions: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    regions.sort_by_key(|t| t.offset);
    for w in regions.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(format!(
                "tensors {} (data bytes {}..{}) and {} (from byte {}) overlap",
                a.name,
                a.offset,
                a.offset + a.n_bytes,
                b.name,
                b.offset
            ));
        }
    }
    Ok(())
}

/// Smallest encoding of a metadata value of GGUF type `ty` (u8 … string, array), or None for an unknown type. An
/// array of n values needs at least n times this, which bounds its length by the bytes left before allocating.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Smallest metadata entry (key length, type, one byte of value) and tensor info (name length, dimension count, one
/// dimension, type, offset).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// The metadata arrays a tokenizer is built from ([`GgufFile::shed_vocabulary`]).
const VOCABULARY_ARRAYS: [&str; 4] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
];

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| GgufError::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a model file changed under a running process is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, Data::Mapped(mmap))
    }

    /// Parses a GGUF file held in memory; `name` stands in for the path in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<Self, GgufError> {
        Self::parse(name.into(), Data::Owned(bytes))
    }

    fn parse(path: PathBuf, data: Data) -> Result<Self, GgufError> {
        let mut c = Cursor {
            buf: &data,
            pos: 0,
            path: &path,
        };
        let magic = match c.take(4, "magic") {
            Ok(m) => m,
            Err(_) => {
                return Err(GgufError::NotGguf {
                    path: path.clone(),
                    found: String::from_utf8_lossy(&data[..data.len().min(4)]).into_owned(),
                })
            }
        };
        if magic != MAGIC {
            return Err(GgufError::NotGguf {
                path: path.clone(),
                found: String::from_utf8_lossy(magic).into_owned(),
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > c.left() / MIN_TENSOR_INFO_BYTES || n_kv > c.left() / MIN_KV_BYTES {
            let need = n_tensors
                .saturating_mul(MIN_TENSOR_INFO_BYTES)
                .saturating_add(n_kv.saturating_mul(MIN_KV_BYTES));
            return Err(c.truncated(format!(
                "{n_tensors} tensor infos and {n_kv} metadata entries (at least {need} bytes)"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            match metadata.entry(key) {
                Entry::Vacant(e) => {
                    e.insert(v);
                }
                Entry::Occupied(e) => {
                    return Err(c.corrupt(format!("duplicate metadata key {}", e.key())))
                }
            }
        }
        if let Some((key, kind)) = keys::check(&metadata) {
            return Err(GgufError::WrongType {
                path: path.clone(),
                key: key.to_string(),
                found: kind.shortfall(&metadata[key]),
                expected: kind.describe(),
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&Value::U32(a)) if a.is_power_of_two() => a as u64,
            Some(v) => {
                return Err(c.corrupt(format!(
                    "general.alignment is {v:?}, must be a nonzero power of two"
                )))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors as usize {
            let t = c.tensor_info(alignment)?;
            let name = t.name.clone();
            match index.entry(name.clone()) {
                Entry::Vacant(e) => {
                    e.insert(i);
                }
                Entry::Occupied(e) => {
                    return Err(c.corrupt(format!(
                        "duplicate tensor name {name} (tensor infos {} and {i})",
                        e.get()
                    )))
                }
            }
            tensors.push(t);
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let len = data.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|o| o.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > len) {
                return Err(GgufError::Truncated {
                    path: path.clone(),
                    what: format!("data of tensor {} ({} bytes)", t.name, t.n_bytes),
                    offset: data_offset.saturating_add(t.offset),
                    len,
                });
            }
        }
        check_overlaps(&tensors).map_err(|what| GgufError::Corrupt {
            path: path.clone(),
            what,
        })?;
        let looked_up = tensors.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Self {
            path,
            version,
            looked_up,
            shed_tokens: None,
            metadata,
            tensors,
            index,
            data,
            data_offset,
        })
    }

    /// The number of tokens of the vocabulary (`tokenizer.ggml.tokens`), also after [`GgufFile::shed_vocabulary`].
    pub fn token_count(&self) -> Option<usize> {
        self.get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(<[Value]>::len)
            .or(self.shed_tokens)
    }

    /// Drops the vocabulary's arrays (tokens, scores, token types, merges) from the parsed metadata, keeping their
    /// count ([`GgufFile::token_count`]): once the tokenizer is built they are only memory, tens of MB for a large
    /// vocabulary, and a loader that sheds them before reading the weights does not peak with both.
    pub fn shed_vocabulary(&mut self) {
        self.shed_tokens = self.token_count();
        for key in VOCABULARY_ARRAYS {
            self.metadata.remove(key);
        }
    }

    /// The tensor called `name`; the lookup marks it as read by a loader ([`GgufFile::unused_tensors`]).
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| {
            self.looked_up[i].store(true, Ordering::Relaxed);
            &self.tensors[i]
        })
    }

    /// Names of the tensors no [`GgufFile::tensor_info`] call has asked for, in file order. After a model's loader
    /// has run, these are tensors the architecture would ignore (llama.cpp refuses such a file: its loader counts
    /// the tensors it created against the file's).
    pub fn unused_tensors(&self) -> Vec<&str> {
        self.tensors
            .iter()
            .zip(&self.looked_up)
            .filter(|(_, u)| !u.load(Ordering::Relaxed))
            .map(|(t, _)| t.name.as_str())
            .collect()
    }

    /// Raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.data[start..start + t.n_bytes as usize]
    }

    /// Tells the OS that this process is done with a tensor's bytes: the pages of the mapped file wholly inside
    /// them leave the resident set (the page cache keeps them; a later [`GgufFile::tensor_bytes`] reads them again,
    /// the same bytes). Loaders call it as a tensor is repacked into memory of its own, so that loading holds about
    /// one copy of the weights instead of the file's pages and the copy both. Nothing for a file read into memory;
    /// an OS that refuses the advice changes nothing but the resident set.
    pub fn release(&self, t: &TensorInfo) {
        self.release_range(t, 0..t.n_bytes as usize);
    }

    /// [`GgufFile::release`] for the bytes `range` of tensor `t` (offsets into its [`GgufFile::tensor_bytes`]).
    #[cfg(unix)]
    pub fn release_range(&self, t: &TensorInfo, range: std::ops::Range<usize>) {
        let Data::Mapped(m) = &self.data else {
            return;
        };
        let end = range.end.min(t.n_bytes as usize);
        let start = (self.data_offset + t.offset) as usize;
        let page = page_size();
        let (lo, hi) = (
            (start + range.start).next_multiple_of(page),
            (start + end) / page * page,
        );
        if hi > lo {
            // SAFETY: the map is read-only and backed by the file, so dropping its pages loses nothing: a slice
            // into them stays valid, its next read faulting the same bytes in from the file again.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// [`GgufFile::release_range`] where the OS takes no such advice: nothing.
    #[cfg(not(unix))]
    pub fn release_range(&self, _t: &TensorInfo, _range: std::ops::Range<usize>) {}

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    // Typed metadata. `get_*`: None when the key is absent, an error naming the key when it holds another type (or,
    // for integers, a negative number); `req_*`: the key must be there. The keys hayloft reads are type-checked when
    // the file is opened ([`keys`]), so for them the type errors here are a second line of defence.

    fn wrong_type(&self, key: &str, v: &Value, expected: keys::Kind) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: metadata key {key} has {}, expected {}",
            self.path.display(),
            expected.shortfall(v),
            expected.describe()
        )
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: metadata key {key} is missing", self.path.display())
    }

    pub fn get_u64(&self, key: &str) -> anyhow::Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if keys::Kind::Int.matches(v) => Ok(v.as_u64()),
            Some(v) => Err(self.wrong_type(key, v, keys::Kind::Int)),
        }
    }
    pub fn get_f64(&self, key: &str) -> anyhow::Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if keys::Kind::Float.matches(v) => Ok(v.as_f64()),
            Some(v) => Err(self.wrong_type(key, v, keys::Kind::Float)),
        }
    }
    pub fn get_str(&self, key: &str) -> anyhow::Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, v, keys::Kind::Str)),
        }
    }
    pub fn get_bool(&self, key: &str) -> anyhow::Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(&Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.wrong_type(key, v, keys::Kind::Bool)),
        }
    }

    pub fn req_u64(&self, key: &str) -> anyhow::Result<u64> {
        self.get_u64(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn req_f64(&self, key: &str) -> anyhow::Result<f64> {
        self.get_f64(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn req_str(&self, key: &str) -> anyhow::Result<&str> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    // `opt_*`: like `get_*` with a wrong type read as absent. Only for keys listed in [`keys`] (checked at open, so
    // for them the two agree); anything else should use `get_*` and pass the error on.
    pub fn opt_u64(&self, key: &str) -> Option<u64> {
        self.get_u64(key).ok().flatten()
    }
    pub fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get_f64(key).ok().flatten()
    }
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get_str(key).ok().flatten()
    }
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get_bool(key).ok().flatten()
    }

    pub fn architecture(&self) -> anyhow::Result<&str> {
        self.req_str("general.architecture")
    }

    pub fn file_len(&self) -> u64 {
        self.data.len() as u64
    }
}

/// The size of a memory page (4096 where the OS does not say).
#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

#[cfg(all(test, target_os = "linux"))]
mod release_tests {
    use super::*;

    /// Resident kB of the mapping that starts at `addr`, from /proc/self/smaps.
    fn mapping_rss_kb(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, _)) = range.split_once('-') {
                    if let Ok(lo) = usize::from_str_radix(lo, 16) {
                        inside = lo == addr;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("Rss:") {
                    return v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .expect("Rss value");
                }
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    /// Once a loader is done with a tensor, its pages leave the resident set, and its bytes read the same after.
    #[test]
    fn a_released_tensor_leaves_the_resident_set_and_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.gguf");
        let data: Vec<f32> = (0..1usize << 20).map(|i| (i % 977) as f32).collect();
        let mut w = writer::GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        w.tensor_f32("big", &[1 << 20], &data);
        w.write(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let t = g.tensor_info("big").unwrap().clone();
        let addr = g.data.as_ptr() as usize;
        let sum = |g: &GgufFile| g.tensor_bytes(&t).iter().map(|&b| b as u64).sum::<u64>();
        let before = sum(&g);
        let touched = mapping_rss_kb(addr);
        assert!(touched >= 4000, "reading 4 MiB left {touched} kB resident");
        g.release_range(&t, 0..t.n_bytes as usize / 2);
        let half = mapping_rss_kb(addr);
        assert!(
            half <= touched - 1900 && half >= 1900,
            "releasing half of 4 MiB: {touched} → {half} kB"
        );
        g.release(&t);
        let after = mapping_rss_kb(addr);
        assert!(after <= 100, "released 4 MiB, {after} kB still resident");
        assert_eq!(sum(&g), before, "the bytes changed after release");
    }
}
