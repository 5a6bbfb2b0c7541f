//! The validation pass a model file goes through when it is opened (issue 13, findings 1, 2 and 5): tiny GGUFs built
//! here with one offending field each are refused with an error naming the file, the key or tensor and what is wrong,
//! while the unmodified files load and run. `info` and `generate` refuse the same file the same way.

use std::process::Command;

use hayloft::engine::{Session, SessionConfig};
use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::{GgufFile, Value};
use hayloft::model::testutil::{tiny_gemma3, tiny_llama, TinySpec};
use hayloft::model::Model;
use hayloft::tokenizer::Tokenizer;

const FILE: &str = "bad.gguf";

fn llama() -> GgufWriter {
    tiny_llama(&TinySpec::default())
}

fn gemma3() -> GgufWriter {
    tiny_gemma3(&TinySpec::default(), 16)
}

/// Opens `bytes` as a model the way every command does (container, model, tokenizer), then runs two tokens.
fn open_and_run(bytes: Vec<u8>) -> Result<(), String> {
    let e = |e: anyhow::Error| format!("{e:#}");
    // In the order `hayloft generate` and `serve` load: the architecture, the tokenizer, then the vocabulary's arrays
    // shed (its size kept for the checks) before the model.
    let mut g = GgufFile::from_bytes(bytes, FILE).map_err(|e| e.to_string())?;
    Model::check_architecture(&g).map_err(e)?;
    let tok = Tokenizer::from_gguf(&g).map_err(e)?;
    let n_tokens = g.token_count();
    g.shed_vocabulary();
    assert!(g.get("tokenizer.ggml.tokens").is_none() && g.get("tokenizer.ggml.merges").is_none());
    assert_eq!(
        g.token_count(),
        n_tokens,
        "the shed vocabulary keeps its size"
    );
    let model = Model::from_gguf(&g).map_err(e)?;
    let ids = tok.encode("the", false, false).map_err(e)?;
    let mut cfg = SessionConfig::for_model(&model);
    cfg.chunk_size = 2;
    cfg.max_context = 8;
    let mut s = Session::new(&model, cfg).map_err(e)?;
    let toks = [ids[0], 1];
    s.feed(&toks, 1..2, |_, l| assert!(l.iter().all(|v| v.is_finite())))
        .map_err(e)?;
    Ok(())
}

/// The file must be refused, with an error that names the file and contains every needle.
fn refused(bytes: Vec<u8>, needles: &[&str]) {
    let err = match open_and_run(bytes) {
        Ok(()) => panic!("accepted a file that should be refused ({needles:?})"),
        Err(e) => e,
    };
    assert!(err.contains(FILE), "error does not name the file: {err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}: {err}");
    }
}

fn with(mut w: GgufWriter, key: &str, v: Value) -> Vec<u8> {
    w.set_meta(key, v);
    w.to_bytes()
}

#[test]
fn unmodified_tiny_models_load_and_run() {
    open_and_run(llama().to_bytes()).unwrap();
    open_and_run(gemma3().to_bytes()).unwrap();
    // A file that sets general.alignment (to 64) is written and read with it.
    open_and_run(with(llama(), "general.alignment", Value::U32(64))).unwrap();
    // Valid partial RoPE: any even count up to the head dimension (16).
    for rd in [2, 8, 16] {
        open_and_run(with(llama(), "llama.rope.dimension_count", Value::U32(rd))).unwrap();
    }
}

/// Finding 1: a RoPE dimension count past the head dimension panicked in generate (index out of bounds) while info
/// accepted it; odd or tiny counts were accepted silently.
#[test]
fn rope_dimension_count_must_be_even_positive_and_within_the_head() {
    for rd in [0u32, 1, 3, 15, 17, 18, 32, 1000] {
        refused(
            with(llama(), "llama.rope.dimension_count", Value::U32(rd)),
            &[
                "llama.rope.dimension_count",
                &format!("is {rd}"),
                "head dimension 16",
            ],
        );
    }
}

/// Finding 2: a huge RoPE dimension count made the scratch allocate RoPE tables of that size (abort on a 2 TB
/// allocation). It is refused before anything is sized from it.
#[test]
fn huge_rope_dimension_count_is_refused_before_allocating() {
    for v in [
        Value::U32(1 << 31),
        Value::U64(1 << 40),
        Value::U64(u64::MAX),
    ] {
        refused(
            with(llama(), "llama.rope.dimension_count", v),
            &["llama.rope.dimension_count", "head dimension 16"],
        );
    }
}

/// Finding 5, container: duplicate tensor names and metadata keys.
#[test]
fn duplicate_tensors_and_keys_are_refused() {
    let mut w = llama();
    w.tensor_f32("blk.0.attn_norm.weight", &[64], &[1.0; 64]);
    refused(
        w.to_bytes(),
        &["duplicate tensor name blk.0.attn_norm.weight"],
    );
    let mut w = llama();
    w.meta("llama.block_count", Value::U32(2));
    refused(w.to_bytes(), &["duplicate metadata key llama.block_count"]);
    // Even with different values (which one would win is exactly the ambiguity).
    let mut w = llama();
    w.meta("llama.attention.head_count_kv", Value::U32(4));
    refused(
        w.to_bytes(),
        &["duplicate metadata key llama.attention.head_count_kv"],
    );
}

/// Rewrites the data offset of tensor `i` in a written file.
fn set_offset(w: &GgufWriter, i: usize, offset: u64) -> Vec<u8> {
    let (mut bytes, lay) = w.to_bytes_with_layout();
    let at = lay.tensors[i].offset_at;
    bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
    bytes
}

/// Finding 5, container: misaligned and overlapping tensor data, alignment of the wrong value or type.
#[test]
fn misaligned_overlapping_and_bad_alignment_are_refused() {
    let w = llama();
    let (_, lay) = w.to_bytes_with_layout();
    let (t1, t2) = (&lay.tensors[1], &lay.tensors[2]);
    for delta in [1u64, 4, 16] {
        refused(
            set_offset(&w, 2, t2.offset as u64 + delta),
            &[&t2.name, "not a multiple of the alignment 32"],
        );
    }
    // Tensor 2 moved onto tensor 1 (same start; and 32 bytes in, still aligned).
    refused(
        set_offset(&w, 2, t1.offset as u64),
        &["overlap", &t1.name, &t2.name],
    );
    assert!(t1.n_bytes > 32);
    refused(
        set_offset(&w, 2, t1.offset as u64 + 32),
        &["overlap", &t1.name, &t2.name],
    );
    // Tensor data past the end of the file.
    refused(
        set_offset(&w, 2, 1 << 40),
        &[&t2.name, "past the end of the file"],
    );
    for a in [0u32, 3, 48] {
        refused(
            with(llama(), "general.alignment", Value::U32(a)),
            &["general.alignment", "power of two"],
        );
    }
    refused(
        with(llama(), "general.alignment", Value::U64(32)),
        &["general.alignment has type u64, expected u32"],
    );
}

/// Finding 5, hyper-parameters: NaN, infinite, zero or negative norm epsilon and RoPE base; block_count 0 or not
/// matching the layers' tensors; heads that do not divide; a window past the context.
#[test]
fn out_of_range_hyper_parameters_are_refused() {
    let eps = "llama.attention.layer_norm_rms_epsilon";
    let base = "llama.rope.freq_base";
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-5, 0.0] {
        refused(with(llama(), eps, Value::F32(v)), &[eps, "positive finite"]);
        refused(
            with(llama(), base, Value::F32(v)),
            &[base, "positive finite"],
        );
    }
    let g_base = "gemma3.rope.freq_base";
    refused(
        with(gemma3(), g_base, Value::F32(f32::NAN)),
        &[g_base, "positive finite"],
    );
    refused(
        with(llama(), "llama.block_count", Value::U32(0)),
        &["llama.block_count is 0"],
    );
    // Two layers of tensors, one declared: the second layer's tensors belong to no layer.
    refused(
        with(llama(), "llama.block_count", Value::U32(1)),
        &["blk.1.", "llama.block_count is 1"],
    );
    refused(
        with(llama(), "llama.attention.head_count_kv", Value::U32(3)),
        &["4 heads, 3 KV heads"],
    );
    refused(
        with(llama(), "llama.context_length", Value::U32(0)),
        &["llama.context_length is 0"],
    );
    refused(
        with(llama(), "llama.context_length", Value::U64(1 << 40)),
        &["llama.context_length is 1099511627776"],
    );
    for w in [0u32, 513] {
        refused(
            with(gemma3(), "gemma3.attention.sliding_window", Value::U32(w)),
            &["gemma3.attention.sliding_window", "context length 512"],
        );
    }
    // A vocabulary with more tokens than the embedding has rows would index past it.
    let mut w = llama();
    let lay = llama().to_bytes_with_layout().1;
    let vocab = lay
        .metadata
        .iter()
        .find(|m| m.key == "tokenizer.ggml.tokens");
    let mut tokens = vocab.unwrap().value.as_array().unwrap().to_vec();
    tokens.push(Value::String("extra".into()));
    w.set_meta("tokenizer.ggml.tokens", Value::Array(tokens));
    // The tokenizer's own arrays agree (one type per token), so it is the model that refuses the file.
    let types = lay
        .metadata
        .iter()
        .find(|m| m.key == "tokenizer.ggml.token_type");
    let mut types = types.unwrap().value.as_array().unwrap().to_vec();
    types.push(Value::I32(1));
    w.set_meta("tokenizer.ggml.token_type", Value::Array(types));
    refused(w.to_bytes(), &["tokenizer has 263 tokens", "262 rows"]);
}

/// Finding 5, metadata types: a key of the wrong type used to be replaced by a default (a string head_count_kv meant
/// "as many KV heads as query heads"). Now it is an error naming the key, its type and the one expected.
#[test]
fn wrong_typed_metadata_is_refused() {
    let cases: Vec<(GgufWriter, &str, Value, &str)> = vec![
        (
            llama(),
            "llama.attention.head_count_kv",
            Value::String("2".into()),
            "type string, expected a non-negative integer",
        ),
        (
            llama(),
            "llama.rope.dimension_count",
            Value::F32(16.0),
            "type f32, expected a non-negative integer",
        ),
        (
            llama(),
            "llama.rope.freq_base",
            Value::String("1e4".into()),
            "type string, expected a number",
        ),
        (
            llama(),
            "llama.block_count",
            Value::Bool(true),
            "type bool, expected a non-negative integer",
        ),
        (
            llama(),
            "tokenizer.ggml.add_bos_token",
            Value::U8(1),
            "type u8, expected bool",
        ),
        (
            llama(),
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::U32(1)]),
            "type array of u32, expected an array of strings",
        ),
        (
            llama(),
            "general.name",
            Value::U32(7),
            "type u32, expected a string",
        ),
        (
            gemma3(),
            "gemma3.attention.sliding_window",
            Value::F64(16.0),
            "type f64, expected a non-negative integer",
        ),
    ];
    for (w, key, v, what) in cases {
        refused(
            with(w, key, v),
            &[&format!("metadata key {key} has {what}")],
        );
    }
    // Negative where a count is meant.
    refused(
        with(llama(), "llama.attention.head_count", Value::I32(-4)),
        &["llama.attention.head_count has the value -4 (i32), expected a non-negative integer"],
    );
    // Another integer width, or an integer for a float, is still the declared kind.
    open_and_run(with(llama(), "llama.block_count", Value::U64(2))).unwrap();
    open_and_run(with(llama(), "llama.rope.freq_base", Value::U32(10000))).unwrap();
}

/// Tensor shapes are checked against the config before use: a norm vector of the right element count in the wrong
/// shape, and a projection of the wrong width.
#[test]
fn tensor_shapes_must_match_the_config() {
    let mut w = GgufWriter::new();
    let src = llama();
    let (bytes, lay) = src.to_bytes_with_layout();
    let g = GgufFile::from_bytes(bytes, "ok.gguf").unwrap();
    for m in &lay.metadata {
        w.meta(&m.key, m.value.clone());
    }
    for t in &g.tensors {
        let mut dims = t.dims.clone();
        if t.name == "blk.0.attn_norm.weight" {
            dims = vec![32, 2];
        }
        w.tensor(&t.name, &dims, t.ty, g.tensor_bytes(t).to_vec());
    }
    refused(
        w.to_bytes(),
        &["blk.0.attn_norm.weight has shape [32, 2], expected [64]"],
    );
}

/// `info` goes through the same validation as the commands that run a model: a file that `generate` refuses,
/// `info` refuses with the same message (it used to list it and let generate panic).
#[test]
fn info_and_generate_refuse_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rope18.gguf");
    std::fs::write(
        &path,
        with(llama(), "llama.rope.dimension_count", Value::U32(18)),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let mut errors = Vec::new();
    for args in [
        vec!["info", p],
        vec!["generate", "--model", p, "-p", "hi", "-n", "2"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hayloft"))
            .args(&args)
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("rope.dimension_count"))
            .unwrap_or_else(|| panic!("{args:?}: no RoPE error in {err}"))
            .to_string();
        assert!(line.contains("rope18.gguf"), "{line}");
        errors.push(line);
    }
    assert_eq!(errors[0], errors[1]);
}
