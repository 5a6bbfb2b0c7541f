//! The `gpt-4o` pre-tokenizer (Phi-4-mini, Llama 4: `tokenizer.ggml.pre` = gpt-4o, llama4, kanana2 or talkie) and its
//! `tekken` variant (Mistral Nemo, Mistral Small 3, Ministral) against llama.cpp. No real vocabulary of that kind is at hand, so tests/fixtures/gen_tokenizer_gpt4o.py makes one (the 256
//! GPT-2 byte characters, every pair of them as a merge, `<|endoftext|>`) and stores llama.cpp's ids for 311 texts:
//! every pair of neighbouring bytes inside a word merges and no token spans two words, so equal ids mean equal splits.
//! This test builds the same vocabulary and must give the same ids (with the llama3 split in place of gpt-4o's, 105 of
//! the 311 texts differ: the test can fail).

use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::{GgufFile, Value};
use hayloft::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    n_vocab: usize,
    /// Per `tokenizer.ggml.pre`.
    cases: std::collections::BTreeMap<String, Vec<Case>>,
}

/// GPT-2's printable stand-in for each byte.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

fn pair_vocab(dir: &std::path::Path, pre: &str) -> GgufFile {
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::with_capacity(256 * 256);
    for a in &chars {
        for b in &chars {
            tokens.push(format!("{a}{b}"));
            merges.push(Value::String(format!("{a} {b}")));
        }
    }
    tokens.push("<|endoftext|>".into());
    let n = tokens.len();
    let mut types = vec![Value::I32(1); n];
    types[n - 1] = Value::I32(3);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String(pre.into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.merges", Value::Array(merges))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 1))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let path = dir.join(format!("{pre}.gguf"));
    w.write(&path).unwrap();
    GgufFile::open(&path).unwrap()
}

fn check(pre: &str) {
    let fx: Fixture = serde_json::from_str(include_str!("fixtures/tokenizer_gpt4o.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g = pair_vocab(dir.path(), pre);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), fx.n_vocab, "the fixture's vocabulary");
    let cases = &fx.cases[pre];
    let mut bad = Vec::new();
    for c in cases {
        let got = tok.encode(&c.text, false, false).unwrap();
        if got != c.ids {
            bad.push(format!("{:?}: got {got:?}, llama.cpp {:?}", c.text, c.ids));
        }
        assert_eq!(tok.decode(&got), c.text, "round trip");
    }
    assert!(
        bad.is_empty(),
        "{pre}: {} of {} texts differ from llama.cpp, first: {}",
        bad.len(),
        cases.len(),
        bad[0]
    );
}

#[test]
fn gpt4o_split_gives_llama_cpps_ids() {
    check("gpt-4o");
}

/// Tekken (Mistral Nemo, Mistral Small 3, Ministral): the gpt-4o split without contractions, one digit a word, and
/// whole words looked up before merging.
#[test]
fn tekken_split_gives_llama_cpps_ids() {
    check("tekken");
}
