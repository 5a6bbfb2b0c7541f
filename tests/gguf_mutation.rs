//! Mutation test of the model-file loader (issue 13): 18,000 mutants of three tiny GGUF models, made by this
//! file's own seeded generator, each opened the way every command opens a model (`GgufFile::from_bytes`,
//! `Model::from_gguf`, `Tokenizer::from_gguf`) and, when it loads, run for two tokens.
//!
//! It asserts that no mutant panics; that no single allocation is out of proportion to the file (a counting global
//! allocator watches every request); and that mutants the generator knows to be invalid are refused with the right
//! error: duplicate tensor names or metadata keys, overlapping, misaligned or out-of-file tensor data, metadata of the
//! wrong type, a RoPE dimension count that is odd, zero or past the head, a norm epsilon or RoPE base that is not a
//! positive finite number, a block count that does not match the layers, a file cut short of its tensor data.
//!
//! Mutations: byte flips (mostly in the header), overwrites of one field with boundary values (counts, lengths, type
//! ids, dimensions, offsets, metadata values), truncations, structural edits made by re-writing the file (a duplicate
//! tensor or key, a tensor moved onto another or off the alignment, a known key re-typed, `general.alignment` and
//! hyper-parameters set to boundary values), and stacks of two or three of the byte-level ones.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use hayloft::engine::{Session, SessionConfig};
use hayloft::gguf::keys::{self, Kind};
use hayloft::gguf::writer::{GgufWriter, Layout};
use hayloft::gguf::{GgmlType, GgufFile, Value};
use hayloft::model::testutil::{tiny_gemma3, tiny_llama, Rng, TinySpec};
use hayloft::model::{Model, MAX_CONTEXT};
use hayloft::tokenizer::Tokenizer;

// ---------------------------------------------------------------------------------------------------------------------
// The largest single allocation request (of any thread: the forward pass runs on rayon's workers; reset per mutant,
// and this binary runs one test, so every request belongs to the mutant being run). A request past
// HARD_CAP is refused outright, after naming the mutant on stderr: the test then aborts at once instead of letting a
// regression (say RoPE tables sized by a corrupt field) eat the machine's memory.

struct Counting;

const HARD_CAP: usize = 256 << 20;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Seed index and mutant number being run.
static SEED: AtomicUsize = AtomicUsize::new(0);
static MUTANT: AtomicUsize = AtomicUsize::new(0);

/// Records a request; false when it is past HARD_CAP (and then says so on stderr, without allocating).
fn note(size: usize) -> bool {
    LARGEST.fetch_max(size, Relaxed);
    if size <= HARD_CAP {
        return true;
    }
    let (seed, n) = (SEED.load(Relaxed), MUTANT.load(Relaxed));
    let mut buf = [0u8; 160];
    let mut len = 0;
    for part in [
        Part::Text("gguf_mutation: seed "),
        Part::Num(seed),
        Part::Text(" mutant "),
        Part::Num(n),
        Part::Text(" asked for "),
        Part::Num(size),
        Part::Text(" bytes at once; refused\n"),
    ] {
        len += part.write(&mut buf[len..]);
    }
    use std::io::Write;
    let _ = std::io::stderr().write_all(&buf[..len]);
    false
}

enum Part {
    Text(&'static str),
    Num(usize),
}

impl Part {
    /// Writes itself into `out` (which is long enough), returning the bytes written.
    fn write(&self, out: &mut [u8]) -> usize {
        match self {
            Part::Text(t) => {
                out[..t.len()].copy_from_slice(t.as_bytes());
                t.len()
            }
            Part::Num(mut v) => {
                let mut digits = [0u8; 20];
                let mut n = 0;
                loop {
                    digits[n] = b'0' + (v % 10) as u8;
                    n += 1;
                    v /= 10;
                    if v == 0 {
                        break;
                    }
                }
                for i in 0..n {
                    out[i] = digits[n - 1 - i];
                }
                n
            }
        }
    }
}

// SAFETY: requests within HARD_CAP are forwarded to the system allocator unchanged (only their size is recorded);
// larger ones get null, which the caller handles as an allocation failure.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        if !note(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: AllocLayout) -> *mut u8 {
        if !note(l.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, new: usize) -> *mut u8 {
        if !note(new) {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A mutant may allocate at most this much at once: a small multiple of its own size (metadata values take ~32
/// bytes per encoded element, a u8 array's worst case) plus a fixed allowance for the run's scratch and KV blocks.
fn allocation_limit(file_len: usize) -> usize {
    48 * file_len + (4 << 20)
}

// ---------------------------------------------------------------------------------------------------------------------
// Seeds

/// A seed model as editable parts: metadata in file order and tensors (name, dims, type, encoded data).
#[derive(Clone)]
struct Parts {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Parts {
    fn of(w: &GgufWriter) -> Self {
        let (bytes, lay) = w.to_bytes_with_layout();
        let g = GgufFile::from_bytes(bytes, "seed.gguf").expect("seed parses");
        Parts {
            meta: lay
                .metadata
                .iter()
                .map(|m| (m.key.clone(), m.value.clone()))
                .collect(),
            tensors: g
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        t.dims.clone(),
                        t.ty,
                        g.tensor_bytes(t).to_vec(),
                    )
                })
                .collect(),
        }
    }

    fn writer(&self) -> GgufWriter {
        let mut w = GgufWriter::new();
        for (k, v) in &self.meta {
            w.meta(k, v.clone());
        }
        for (n, d, ty, b) in &self.tensors {
            w.tensor(n, d, *ty, b.clone());
        }
        w
    }

    fn set(&self, key: &str, v: Value) -> Vec<u8> {
        let mut w = self.writer();
        w.set_meta(key, v);
        w.to_bytes()
    }
}

struct Seed {
    name: &'static str,
    arch: &'static str,
    parts: Parts,
    bytes: Vec<u8>,
    lay: Layout,
    n_layers: usize,
    head_dim: usize,
    /// Sliding window (Gemma 3), which the context length may not go below.
    window: Option<u64>,
}

fn seeds() -> Vec<Seed> {
    let spec = TinySpec {
        n_layers: 2,
        dim: 32,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        ffn_dim: 32,
        ctx_len: 64,
        weight_type: GgmlType::Q8_0,
        seed: 5,
    };
    let mut f16_64 = tiny_llama(&TinySpec {
        weight_type: GgmlType::F16,
        ..spec.clone()
    });
    f16_64.set_meta("general.alignment", Value::U32(64));
    let list = [
        ("llama-q8", "llama", tiny_llama(&spec), None),
        ("llama-f16-align64", "llama", f16_64, None),
        ("gemma3-q8", "gemma3", tiny_gemma3(&spec, 16), Some(16)),
    ];
    list.into_iter()
        .map(|(name, arch, w, window)| {
            let (bytes, lay) = w.to_bytes_with_layout();
            Seed {
                name,
                arch,
                parts: Parts::of(&w),
                bytes,
                lay,
                n_layers: spec.n_layers,
                head_dim: spec.head_dim,
                window,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------------
// Running one file

enum Outcome {
    /// Refused at some stage; the errors of every stage that ran.
    Refused(String),
    /// Model and tokenizer loaded and two tokens ran.
    Ran,
}

fn exercise(bytes: Vec<u8>) -> Outcome {
    let g = match GgufFile::from_bytes(bytes, "mutant.gguf") {
        Ok(g) => g,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    for t in &g.tensors {
        assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes);
    }
    let tok = Tokenizer::from_gguf(&g);
    let model = Model::from_gguf(&g);
    let mut errors = String::new();
    if let Err(e) = &tok {
        errors += &format!("tokenizer: {e:#}; ");
    }
    let model = match model {
        Ok(m) => m,
        Err(e) => return Outcome::Refused(errors + &format!("model: {e:#}")),
    };
    // The tokenizer's own ids (validation guarantees they index the embedding), else the first two ids.
    let ids = match &tok {
        Ok(t) => t.encode("the cat", true, false).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let vocab = model.config().vocab as u32;
    let toks = [
        ids.first().copied().unwrap_or(0),
        ids.get(1).copied().unwrap_or(1 % vocab),
    ];
    let mut cfg = SessionConfig::for_model(&model);
    cfg.chunk_size = 2;
    cfg.max_context = 8;
    let mut s = match Session::new(&model, cfg) {
        Ok(s) => s,
        Err(e) => return Outcome::Refused(errors + &format!("session: {e:#}")),
    };
    if let Err(e) = s.feed(&toks, 1..2, |_, l| assert_eq!(l.len(), vocab as usize)) {
        return Outcome::Refused(errors + &format!("feed: {e:#}"));
    }
    match tok {
        Ok(_) => Outcome::Ran,
        Err(_) => Outcome::Refused(errors),
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// The generator

/// What the generator knows about a mutant.
#[derive(Clone, Debug)]
enum Expect {
    /// Anything but a panic.
    Any,
    /// Must be refused, with an error containing this.
    Refuse(String),
    /// Must be refused (any error).
    RefuseAny,
}

struct Mutant {
    kind: &'static str,
    what: String,
    bytes: Vec<u8>,
    expect: Expect,
}

const BOUNDARY: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    17,
    18,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    1000,
    4096,
    65535,
    65536,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 62,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

const FLOATS: &[f32] = &[
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    -1.0,
    0.0,
    -0.0,
    1e-45,
    1e-6,
    1.0,
    1e38,
];

fn put(bytes: &mut [u8], at: usize, v: u64, width: usize) {
    let le = v.to_le_bytes();
    if at + width <= bytes.len() {
        bytes[at..at + width].copy_from_slice(&le[..width]);
    }
}

fn pick<'a, T>(rng: &mut Rng, xs: &'a [T]) -> &'a T {
    &xs[rng.below(xs.len())]
}

/// Where tensor `i`'s data would sit at data offset `off`: refused as misaligned, out of the file, overlapping
/// another tensor, or fine.
fn classify_offset(seed: &Seed, i: usize, off: u64) -> Expect {
    let lay = &seed.lay;
    let t = &lay.tensors[i];
    let data_len = (seed.bytes.len() - lay.data_start) as u64;
    if !off.is_multiple_of(lay.alignment as u64) {
        return Expect::Refuse(format!(
            "{}: data offset {off} is not a multiple of the alignment",
            t.name
        ));
    }
    let end = off.checked_add(t.n_bytes as u64);
    if end.is_none_or(|e| e > data_len) {
        return Expect::Refuse(format!("data of tensor {}", t.name));
    }
    let end = end.unwrap_or(u64::MAX);
    let overlaps = lay
        .tensors
        .iter()
        .enumerate()
        .any(|(j, u)| j != i && off < (u.offset + u.n_bytes) as u64 && (u.offset as u64) < end);
    if overlaps {
        Expect::Refuse("overlap".into())
    } else {
        Expect::Any
    }
}

/// What setting metadata `key` of `seed` to `v` must do (for the hyper-parameters the issue names).
fn classify_value(seed: &Seed, key: &str, v: &Value) -> Expect {
    let Some(suffix) = key
        .strip_prefix(seed.arch)
        .and_then(|k| k.strip_prefix('.'))
    else {
        return Expect::Any;
    };
    let int = v.as_u64().filter(|_| keys::Kind::Int.matches(v));
    let float = v.as_f64().filter(|_| keys::Kind::Float.matches(v));
    let refuse = || Expect::Refuse(key.to_string());
    match suffix {
        "rope.dimension_count" => match int {
            Some(r) if r > 0 && r.is_multiple_of(2) && r <= seed.head_dim as u64 => Expect::Any,
            _ => refuse(),
        },
        "attention.layer_norm_rms_epsilon" | "rope.freq_base" => match float {
            // The config holds f32: a finite f64 past f32's range becomes infinite.
            Some(x) if x > 0.0 && (x as f32).is_finite() && x as f32 > 0.0 => Expect::Any,
            _ => refuse(),
        },
        "block_count" => match int {
            Some(n) if n == seed.n_layers as u64 => Expect::Any,
            _ => Expect::RefuseAny,
        },
        "context_length" => match int {
            Some(n) if n == 0 || n > MAX_CONTEXT as u64 => refuse(),
            // A context shorter than the sliding window is refused as a window past the context.
            Some(n) if seed.window.is_some_and(|w| n < w) => {
                Expect::Refuse(format!("{}.attention.sliding_window", seed.arch))
            }
            Some(_) => Expect::Any,
            None => refuse(),
        },
        _ => Expect::Any,
    }
}

/// A value of another kind than `kind` (or None when every candidate matches).
fn wrong_value(rng: &mut Rng, kind: Kind) -> Option<Value> {
    let candidates = [
        Value::String("12".into()),
        Value::U8(1),
        Value::I32(-1),
        Value::F32(1.0),
        Value::F64(2.0),
        Value::Bool(true),
        Value::U64(32),
        Value::Array(vec![Value::U32(1), Value::U32(2)]),
        Value::Array(vec![Value::String("a".into())]),
        Value::Array(vec![Value::F32(0.5)]),
    ];
    let wrong: Vec<&Value> = candidates.iter().filter(|v| !kind.matches(v)).collect();
    (!wrong.is_empty()).then(|| wrong[rng.below(wrong.len())].clone())
}

/// Positions of fixed-width fields: (byte position, width, label).
fn fields(seed: &Seed) -> Vec<(usize, usize, String)> {
    let mut f = vec![
        (4, 4, "version".to_string()),
        (8, 8, "tensor count".into()),
        (16, 8, "metadata count".into()),
    ];
    for m in &seed.lay.metadata {
        f.push((m.key_at, 8, format!("key length of {}", m.key)));
        f.push((m.type_at, 4, format!("type of {}", m.key)));
        match &m.value {
            Value::String(_) => f.push((m.value_at, 8, format!("string length of {}", m.key))),
            Value::Array(_) => {
                f.push((m.value_at, 4, format!("element type of {}", m.key)));
                f.push((m.value_at + 4, 8, format!("element count of {}", m.key)));
            }
            _ => f.push((
                m.value_at,
                m.end - m.value_at,
                format!("value of {}", m.key),
            )),
        }
    }
    for t in &seed.lay.tensors {
        f.push((t.name_at, 8, format!("name length of {}", t.name)));
        f.push((t.n_dims_at, 4, format!("dimension count of {}", t.name)));
        f.push((t.n_dims_at + 4, 8, format!("dimension 0 of {}", t.name)));
        f.push((t.type_at, 4, format!("type of {}", t.name)));
    }
    f
}

/// End of the last tensor's data: a file cut before it is missing data.
fn data_end(seed: &Seed) -> usize {
    let lay = &seed.lay;
    lay.data_start
        + lay
            .tensors
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap_or(0)
}

fn flip(rng: &mut Rng, seed: &Seed, bytes: &mut [u8]) -> String {
    // Three in four land in the header (metadata and tensor infos), where a flip changes structure.
    let span = if rng.below(4) < 3 {
        seed.lay.data_start
    } else {
        bytes.len()
    };
    let at = rng.below(span);
    let x = rng.byte() | 1;
    bytes[at] ^= x;
    format!("byte {at} ^= {x:#04x}")
}

fn overwrite(
    rng: &mut Rng,
    seed: &Seed,
    fields: &[(usize, usize, String)],
    bytes: &mut [u8],
) -> (String, Expect) {
    // One in five overwrites a tensor's data offset (classified exactly), the rest any field.
    if rng.below(5) == 0 {
        let i = rng.below(seed.lay.tensors.len());
        let t = &seed.lay.tensors[i];
        let off = match rng.below(3) {
            0 => *pick(rng, BOUNDARY),
            1 => seed.lay.tensors[rng.below(seed.lay.tensors.len())].offset as u64,
            _ => (t.offset as u64).wrapping_add(rng.below(2 * seed.lay.alignment) as u64),
        };
        put(bytes, t.offset_at, off, 8);
        return (
            format!("offset of {} = {off}", t.name),
            classify_offset(seed, i, off),
        );
    }
    let (at, width, label) = pick(rng, fields);
    // A metadata value: a boundary value of its own type, which the generator can judge.
    if let Some(m) = seed
        .lay
        .metadata
        .iter()
        .find(|m| m.value_at == *at && label.starts_with("value of"))
    {
        let v = match &m.value {
            Value::F32(_) => Value::F32(*pick(rng, FLOATS)),
            Value::U32(_) => Value::U32(*pick(rng, BOUNDARY) as u32),
            Value::Bool(_) => Value::Bool(rng.below(2) == 1),
            _ => Value::U8(0),
        };
        match v {
            Value::F32(x) => bytes[*at..*at + 4].copy_from_slice(&x.to_le_bytes()),
            Value::U32(x) => put(bytes, *at, x as u64, 4),
            Value::Bool(b) => bytes[*at] = b as u8,
            _ => put(bytes, *at, 0, *width),
        }
        return (format!("{label} = {v:?}"), classify_value(seed, &m.key, &v));
    }
    let v = *pick(rng, BOUNDARY);
    put(bytes, *at, v, *width);
    (format!("{label} = {v}"), Expect::Any)
}

/// One mutant of `seed`.
fn mutate(rng: &mut Rng, seed: &Seed, fields: &[(usize, usize, String)]) -> Mutant {
    let lay = &seed.lay;
    let mut bytes = seed.bytes.clone();
    let r = rng.below(100);
    let (kind, what, expect) = if r < 25 {
        let what = flip(rng, seed, &mut bytes);
        ("byte flip", what, Expect::Any)
    } else if r < 50 {
        let (what, expect) = overwrite(rng, seed, fields, &mut bytes);
        ("field overwrite", what, expect)
    } else if r < 57 {
        // Cut at a field boundary (give or take a few bytes) or anywhere.
        let len = if rng.below(2) == 0 {
            let (at, _, _) = pick(rng, fields);
            (at + rng.below(4)).min(bytes.len())
        } else {
            rng.below(bytes.len())
        };
        bytes.truncate(len);
        let expect = if len < data_end(seed) {
            Expect::RefuseAny
        } else {
            Expect::Any
        };
        ("truncation", format!("cut to {len} bytes"), expect)
    } else if r < 62 {
        let mut p = seed.parts.clone();
        let i = rng.below(p.tensors.len());
        let dup = p.tensors[i].clone();
        let at = rng.below(p.tensors.len() + 1);
        let name = dup.0.clone();
        p.tensors.insert(at, dup);
        bytes = p.writer().to_bytes();
        (
            "duplicate tensor",
            format!("{name} again at {at}"),
            Expect::Refuse(format!("duplicate tensor name {name}")),
        )
    } else if r < 67 {
        let mut p = seed.parts.clone();
        let i = rng.below(p.meta.len());
        let (key, mut v) = p.meta[i].clone();
        if rng.below(2) == 0 {
            v = Value::U32(rng.below(100) as u32);
        }
        let at = rng.below(p.meta.len() + 1);
        p.meta.insert(at, (key.clone(), v));
        bytes = p.writer().to_bytes();
        (
            "duplicate key",
            format!("{key} again at {at}"),
            Expect::Refuse(format!("duplicate metadata key {key}")),
        )
    } else if r < 72 {
        // Tensor i moved (aligned) into tensor j's data, kept inside the file.
        let n = lay.tensors.len();
        let i = rng.below(n);
        let j = (i + 1 + rng.below(n - 1)) % n;
        let (ti, tj) = (&lay.tensors[i], &lay.tensors[j]);
        let steps = tj.n_bytes.div_ceil(lay.alignment);
        let off = (tj.offset + lay.alignment * rng.below(steps)) as u64;
        put(&mut bytes, ti.offset_at, off, 8);
        let expect = classify_offset(seed, i, off);
        (
            "overlapping tensor",
            format!("{} moved to {off} (inside {})", ti.name, tj.name),
            expect,
        )
    } else if r < 77 {
        let i = rng.below(lay.tensors.len());
        let t = &lay.tensors[i];
        let off = (t.offset + 1 + rng.below(lay.alignment - 1)) as u64;
        put(&mut bytes, t.offset_at, off, 8);
        (
            "misaligned tensor",
            format!("{} moved to {off}", t.name),
            classify_offset(seed, i, off),
        )
    } else if r < 84 {
        // A key hayloft reads, given a value of another kind.
        let known: Vec<&(String, Value)> = seed
            .parts
            .meta
            .iter()
            .filter(|(k, _)| keys::expected(k, Some(seed.arch)).is_some())
            .collect();
        let (key, _) = pick(rng, &known);
        let kind = keys::expected(key, Some(seed.arch)).unwrap_or(Kind::Int);
        match wrong_value(rng, kind) {
            Some(v) => {
                let what = format!("{key} = {v:?}");
                bytes = seed.parts.set(key, v);
                (
                    "wrong-typed metadata",
                    what,
                    Expect::Refuse(format!("metadata key {key} has ")),
                )
            }
            None => ("wrong-typed metadata", "none possible".into(), Expect::Any),
        }
    } else if r < 88 {
        let a = *pick(rng, BOUNDARY);
        let v = match rng.below(4) {
            0 => Value::U64(a),
            1 => Value::I32(a as i32),
            _ => Value::U32(a as u32),
        };
        let expect = match v {
            // (The writer lays data out with alignments up to 64 KiB; a larger one leaves it misaligned.)
            Value::U32(x) if x.is_power_of_two() => Expect::Any,
            Value::U32(_) => Expect::Refuse("general.alignment".into()),
            _ => Expect::Refuse("metadata key general.alignment has type".into()),
        };
        let what = format!("general.alignment = {v:?}");
        bytes = seed.parts.set("general.alignment", v);
        ("alignment", what, expect)
    } else if r < 94 {
        // A hyper-parameter set to a boundary value (some of another integer width, floats for the float keys).
        let suffixes = [
            "rope.dimension_count",
            "attention.layer_norm_rms_epsilon",
            "rope.freq_base",
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.sliding_window",
            "attention.sliding_window_pattern",
            "rope.scaling.factor",
        ];
        let key = format!("{}.{}", seed.arch, pick(rng, &suffixes));
        let v = if key.ends_with("epsilon") || key.ends_with("base") || key.ends_with("factor") {
            match rng.below(3) {
                0 => Value::F64(*pick(rng, FLOATS) as f64 * 1e300),
                _ => Value::F32(*pick(rng, FLOATS)),
            }
        } else {
            match rng.below(3) {
                0 => Value::U64(*pick(rng, BOUNDARY)),
                1 => Value::I64(*pick(rng, BOUNDARY) as i64),
                _ => Value::U32(*pick(rng, BOUNDARY) as u32),
            }
        };
        let what = format!("{key} = {v:?}");
        let expect = match (&v, classify_value(seed, &key, &v)) {
            // A negative integer is refused as such, whatever the key.
            (Value::I64(x), _) if *x < 0 => {
                Expect::Refuse(format!("metadata key {key} has the value {x}"))
            }
            (_, e) => e,
        };
        bytes = seed.parts.set(&key, v);
        ("hyper-parameter", what, expect)
    } else {
        let n = 2 + rng.below(2);
        let mut what = Vec::new();
        for _ in 0..n {
            if rng.below(2) == 0 {
                what.push(flip(rng, seed, &mut bytes));
            } else {
                what.push(overwrite(rng, seed, fields, &mut bytes).0);
            }
        }
        ("stacked", what.join(", "), Expect::Any)
    };
    Mutant {
        kind,
        what,
        bytes,
        expect,
    }
}

// ---------------------------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    made: usize,
    refused: usize,
    ran: usize,
    must_refuse: usize,
}

#[test]
fn mutated_tiny_models_never_panic_and_invalid_ones_are_refused() {
    const PER_SEED: usize = 6_000;
    let seeds = seeds();
    let t0 = Instant::now();
    let mut tally: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut largest_ratio = 0.0f64;
    for (si, seed) in seeds.iter().enumerate() {
        // Control: the seed itself loads and runs.
        assert!(
            matches!(exercise(seed.bytes.clone()), Outcome::Ran),
            "seed {} does not run",
            seed.name
        );
        let fields = fields(seed);
        let mut rng = Rng::seeded(0x5EED_0000 + si as u64);
        for n in 0..PER_SEED {
            let m = mutate(&mut rng, seed, &fields);
            let len = m.bytes.len();
            LARGEST.store(0, Relaxed);
            SEED.store(si, Relaxed);
            MUTANT.store(n, Relaxed);
            let r = catch_unwind(AssertUnwindSafe(|| exercise(m.bytes)));
            let largest = LARGEST.load(Relaxed);
            largest_ratio = largest_ratio.max(largest as f64 / len.max(1) as f64);
            let t = tally.entry(m.kind).or_default();
            t.made += 1;
            let id = format!("{} mutant {n} ({}: {})", seed.name, m.kind, m.what);
            if largest > allocation_limit(len) {
                failures.push(format!(
                    "{id}: allocated {largest} bytes at once for a {len}-byte file"
                ));
            }
            let outcome = match r {
                Ok(o) => o,
                Err(_) => {
                    failures.push(format!("{id}: panicked"));
                    continue;
                }
            };
            match &outcome {
                Outcome::Ran => t.ran += 1,
                Outcome::Refused(_) => t.refused += 1,
            }
            match (&m.expect, &outcome) {
                (Expect::Any, _) => {}
                (Expect::RefuseAny, Outcome::Refused(_)) => t.must_refuse += 1,
                (Expect::Refuse(needle), Outcome::Refused(e)) if e.contains(needle.as_str()) => {
                    t.must_refuse += 1
                }
                (Expect::Refuse(needle), Outcome::Refused(e)) => failures.push(format!(
                    "{id}: refused, but the error lacks {needle:?}: {e}"
                )),
                (e, Outcome::Ran) => failures.push(format!("{id}: accepted, expected {e:?}")),
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let total: usize = tally.values().map(|t| t.made).sum();
    eprintln!("{total} mutants in {secs:.1} s; largest allocation {largest_ratio:.1}× the file");
    eprintln!(
        "{:<22} {:>6} {:>8} {:>6} {:>12}",
        "kind", "made", "refused", "ran", "must-refuse"
    );
    for (k, t) in &tally {
        eprintln!(
            "{k:<22} {:>6} {:>8} {:>6} {:>12}",
            t.made, t.refused, t.ran, t.must_refuse
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {total} mutants failed; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(total >= 10_000);
    // The generator reaches both ends: mutants that run a forward pass, and the invalid classes it refuses.
    let ran: usize = tally.values().map(|t| t.ran).sum();
    assert!(ran * 10 >= total, "only {ran} of {total} mutants ran");
    for k in [
        "duplicate tensor",
        "duplicate key",
        "overlapping tensor",
        "misaligned tensor",
        "wrong-typed metadata",
    ] {
        let t = &tally[k];
        assert!(
            t.must_refuse * 10 >= t.made * 9 && t.made > 100,
            "{k}: {} made, {} refused as expected",
            t.made,
            t.must_refuse
        );
    }
}
