//! Fuzz smoke on stable: replays every saved input (`fuzz/corpus/<target>/*`, `fuzz/regressions/<target>/*`)
//! through the same harness functions the cargo-fuzz targets run (fuzz/harness.rs), plus one test per bug the
//! fuzzer found, asserting the clear error that replaced the panic. See fuzz/README.md.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

/// A harness: one input, panics on a bug.
type Harness = fn(&[u8]);

const TARGETS: &[(&str, Harness)] = &[
    ("gguf", harness::run_gguf),
    ("tokenizer", harness::run_tokenizer),
    ("chat", harness::run_chat),
    ("kvspec", harness::run_kvspec),
    ("longbench", harness::run_longbench),
];

fn replay(target: &str, run: Harness) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{target}: {} panics", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn saved_fuzz_inputs_replay_without_panics() {
    let mut total = 0;
    for &(target, run) in TARGETS {
        let n = replay(target, run);
        assert!(n > 0, "no saved inputs for fuzz target {target}");
        total += n;
    }
    eprintln!("replayed {total} saved fuzz inputs");
}

#[test]
fn harness_vocabularies_load() {
    let v = harness::vocabs();
    assert_eq!(v.toks.len(), 6);
    assert_eq!(v.chats.len(), 4);
}

/// Writes the seed inputs the corpora were grown from into fuzz/corpus/<target>/seed-*:
/// `cargo test --release --test fuzz_corpus -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    use hayloft::gguf::writer::GgufWriter;
    use hayloft::gguf::{GgmlType, Value};
    use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, TinySpec};

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
    };

    // GGUF: the harness's vocabularies, tiny models, and a file with every value type and odd tensors.
    put(
        "gguf",
        "bpe",
        &harness::bpe_gguf("smollm", Some(harness::SMOLLM_TEMPLATE)),
    );
    put("gguf", "spm", &harness::spm_gguf(true));
    let tiny = TinySpec {
        n_layers: 1,
        dim: 32,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        ffn_dim: 32,
        ctx_len: 64,
        weight_type: GgmlType::Q8_0,
        seed: 3,
    };
    let tmp = std::env::temp_dir().join(format!("hayloft-seed-{}.gguf", std::process::id()));
    write_tiny_llama(&tmp, &tiny).unwrap();
    put("gguf", "tiny-llama", &std::fs::read(&tmp).unwrap());
    write_tiny_gemma3(&tmp, &tiny, 8).unwrap();
    put("gguf", "tiny-gemma3", &std::fs::read(&tmp).unwrap());
    let _ = std::fs::remove_file(&tmp);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("general.alignment", Value::U32(64))
        .meta("a.u8", Value::U8(1))
        .meta("a.i8", Value::I8(-1))
        .meta("a.u16", Value::U16(2))
        .meta("a.i16", Value::I16(-2))
        .meta("a.i32", Value::I32(-3))
        .meta("a.f32", Value::F32(0.5))
        .meta("a.bool", Value::Bool(true))
        .meta("a.u64", Value::U64(u64::MAX))
        .meta("a.i64", Value::I64(i64::MIN))
        .meta("a.f64", Value::F64(-0.25))
        .meta(
            "a.nested",
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::U8(2)])]),
        )
        .meta("a.empty", Value::Array(vec![]))
        .tensor_f32("t.f32", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .tensor("t.q8", &[32], GgmlType::Q8_0, vec![0; 34])
        .tensor("t.q4k", &[256], GgmlType::Q4K, vec![0; 144])
        .tensor("t.unknown", &[3], GgmlType::Other(99), vec![]);
    put("gguf", "types", &w.to_bytes());

    // Tokenizer: byte 0 = vocabulary (>> 2) and flags (bit 0 add_bos, bit 1 parse_special).
    let texts = [
        "hello the world 12345",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>",
        "<bos><start_of_turn>user\nabc<end_of_turn>\n<start_of_turn>model\n",
        "<tool> <b>bold</b>\n\n\n  spaces  ",
        "héllo wörld — 日本語 🦙👩‍💻 ½ ٣",
        "\u{0}\u{1}\u{7f}\r\n\t",
    ];
    for (i, t) in texts.iter().enumerate() {
        for sel in [0u8, 3, 4 + 2, 4 * 4 + 3, 4 * 5 + 1, 4 * 3] {
            let mut d = vec![sel.wrapping_add(4 * i as u8)];
            d.extend_from_slice(t.as_bytes());
            put("tokenizer", &format!("{i}-{sel}"), &d);
        }
    }

    // Chat: byte 0 = template (>> 1) and add_generation_prompt (bit 0); NUL-separated role, content pairs.
    let convs: [&[&str]; 5] = [
        &["user", "hello"],
        &[
            "system",
            "be brief",
            "user",
            "hi",
            "assistant",
            "hello",
            "user",
            "again",
        ],
        &[
            "user",
            "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}",
            "assistant",
            "<|im_end|><end_of_turn>",
        ],
        &["tool", "<tool>a<tool>b", "user", "  padded  "],
        &["model", "", "", "x"],
    ];
    for (i, c) in convs.iter().enumerate() {
        for sel in 0u8..8 {
            let mut d = vec![sel];
            d.extend_from_slice(c.join("\0").as_bytes());
            put("chat", &format!("{i}-{sel}"), &d);
        }
    }

    // --kv specs.
    let specs = [
        "full",
        "snapkv@0.25",
        "h2o@1024t,chunked,every@32",
        "pyramidkv@0.1,think@0.5",
        "snapkv@0.2,pyramid@20,kivi4@128t",
        "adakv@512t,adakv@0.2",
        "duo@0.5,heads@scores.json",
        "kivi2@64",
        "think",
        "streamingllm@256t",
        "tova@1e-3,every@0",
        "window@0.5 , chunked",
    ];
    for (i, s) in specs.iter().enumerate() {
        put("kvspec", &i.to_string(), s.as_bytes());
    }

    // LongBench: a few records of different datasets, one with a long context that must be cut.
    let long_ctx = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let recs = [
        serde_json::json!({"input": "Who?", "context": "Alice met Bob.", "answers": ["Alice"], "length": 3,
            "dataset": "hotpotqa", "_id": "a1", "all_classes": null}),
        serde_json::json!({"input": "What type?", "context": long_ctx, "answers": ["LOC"],
            "all_classes": ["LOC", "HUM"], "dataset": "trec_e", "length": 400}),
        serde_json::json!({"input": "", "context": "def f():\n    return 1\n", "answers": ["f()"],
            "dataset": "lcc"}),
        serde_json::json!({"input": "问题", "context": "文章", "answers": ["答案"], "dataset": "dureader"}),
    ];
    let lines: Vec<String> = recs.iter().map(|r| r.to_string()).collect();
    for (i, l) in lines.iter().enumerate() {
        put("longbench", &i.to_string(), format!("{l}\n").as_bytes());
    }
    put("longbench", "all", (lines.join("\n") + "\n\n").as_bytes());
}

/// Found in review for the `gguf` target (it runs Model::from_gguf on every file that parses): a huge `llama.block_count` (or `gemma3.block_count`) made the loader allocate
/// per-layer tables of that size before looking for a single layer tensor (capacity overflow panic or OOM abort).
#[test]
fn huge_block_count_is_an_error_before_allocating() {
    use hayloft::gguf::writer::GgufWriter;
    use hayloft::gguf::{GgufFile, Value};
    use hayloft::model::Model;
    for arch in ["llama", "gemma3"] {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String(arch.into()))
            .meta(&format!("{arch}.block_count"), Value::U64(u64::MAX / 2))
            .meta(&format!("{arch}.embedding_length"), Value::U32(32))
            .meta(&format!("{arch}.attention.head_count"), Value::U32(2))
            .meta(&format!("{arch}.feed_forward_length"), Value::U32(32))
            .meta(&format!("{arch}.context_length"), Value::U32(64))
            .meta(
                &format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            )
            .tensor_f32("token_embd.weight", &[32, 1], &[0.0; 32]);
        let g = GgufFile::from_bytes(w.to_bytes(), "huge-layers.gguf").unwrap();
        let err = format!("{:#}", Model::from_gguf(&g).err().expect("must fail"));
        assert!(
            err.contains("block_count") && err.contains("holds only 1 tensors"),
            "{err}"
        );
    }
}
