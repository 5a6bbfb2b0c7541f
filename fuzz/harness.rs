//! Fuzz harnesses: one `run_*(data: &[u8])` per target. Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`)
//! and by the stable replay test (`tests/fuzz_corpus.rs`), both of which include this file with `#[path]`.
//!
//! A harness must never panic on any input: errors are fine (they are the parsers' answer to bad input), panics,
//! hangs and allocations out of proportion to the input are bugs. Where a parser promises a property (a `--kv` spec
//! label parses back to the same spec, decoding what was encoded gives the text back, streaming decode equals
//! decode), the harness asserts it.

#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use hayloft::eval::longbench;
use hayloft::eval::Prompter;
use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::{GgufFile, Value};
use hayloft::methods::KvSpec;
use hayloft::model::Model;
use hayloft::tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer};

// ---------------------------------------------------------------------------------------------------------------------
// Small vocabularies, built once

fn strs<S: AsRef<str>>(v: &[S]) -> Value {
    Value::Array(
        v.iter()
            .map(|s| Value::String(s.as_ref().to_string()))
            .collect(),
    )
}

/// GPT-2's byte → printable char map (what byte-level BPE vocabularies are spelled in).
fn byte_chars() -> Vec<char> {
    hayloft::model::testutil::byte_to_unicode()
}

/// A byte-level BPE vocabulary (pre-tokenizer `pre`): the 256 byte chars, a few merges, ChatML and Llama-3
/// control tokens, and one user-defined token. No chat template: ChatML is the built-in one.
pub fn bpe_gguf(pre: &str, template: Option<&str>) -> Vec<u8> {
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let merges = [
        "Ġ t", "l l", "e ll", "h ell", "hell o", "h e", "t he", "Ġt he", "1 2", "Ġ Ġ", "ĊĊ Ċ",
        "Ċ Ċ",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|fim_prefix|>",
    ];
    let first_special = tokens.len();
    tokens.extend(specials.iter().map(|s| s.to_string()));
    tokens.push("<tool>".into());
    let n = tokens.len();
    let mut types = vec![Value::I32(1); n];
    for t in &mut types[first_special..n - 1] {
        *t = Value::I32(3);
    }
    types[n - 1] = Value::I32(4);
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String(pre.into()))
        .meta("tokenizer.ggml.tokens", strs(&tokens))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.merges", strs(&merges))
        .meta(
            "tokenizer.ggml.bos_token_id",
            Value::U32(first_special as u32 + 3),
        )
        .meta(
            "tokenizer.ggml.eos_token_id",
            Value::U32(first_special as u32 + 2),
        )
        .meta(
            "tokenizer.ggml.add_bos_token",
            Value::Bool(pre == "llama-bpe"),
        );
    if let Some(t) = template {
        w.meta("tokenizer.chat_template", Value::String(t.into()));
    }
    w.to_bytes()
}

/// A Gemma-style SentencePiece vocabulary: <pad> <eos> <bos> <unk>, turn markers, byte-fallback tokens, scored
/// pieces, user-defined newline runs and an HTML tag. No chat template: Gemma's turn format is the built-in one.
pub fn spm_gguf(add_space_prefix: bool) -> Vec<u8> {
    let mut tokens: Vec<String> = vec![
        "<pad>".into(),
        "<eos>".into(),
        "<bos>".into(),
        "<unk>".into(),
        "<start_of_turn>".into(),
        "<end_of_turn>".into(),
    ];
    let mut types = vec![
        Value::I32(3),
        Value::I32(3),
        Value::I32(3),
        Value::I32(2),
        Value::I32(3),
        Value::I32(3),
    ];
    let mut scores = vec![Value::F32(0.0); tokens.len()];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    let pieces: &[(&str, f32, i32)] = &[
        ("\u{2581}", -1.0, 1),
        ("a", -2.0, 1),
        ("b", -2.0, 1),
        ("c", -2.0, 1),
        ("e", -2.0, 1),
        ("u", -2.0, 1),
        ("s", -2.0, 1),
        ("r", -2.0, 1),
        ("\u{2581}a", -3.0, 1),
        ("ab", -1.5, 1),
        ("bc", -1.0, 1),
        ("\u{2581}ab", -0.5, 1),
        ("us", -1.2, 1),
        ("er", -1.1, 1),
        ("user", -0.7, 1),
        ("\u{2581}\u{2581}", -0.9, 1),
        ("日本", -0.8, 1),
        ("\n", 0.0, 4),
        ("\n\n", 0.0, 4),
        ("<b>", 0.0, 4),
        ("", 0.0, 1),
    ];
    for &(p, s, t) in pieces {
        tokens.push(p.into());
        types.push(Value::I32(t));
        scores.push(Value::F32(s));
    }
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta("tokenizer.ggml.tokens", strs(&tokens))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.scores", Value::Array(scores))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(2))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.unknown_token_id", Value::U32(3))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .meta(
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(add_space_prefix),
        );
    w.to_bytes()
}

fn gguf(bytes: Vec<u8>, name: &str) -> GgufFile {
    GgufFile::from_bytes(bytes, name).expect("the harness's own vocabularies parse")
}

/// SmolLM2-Instruct's template (ChatML with a default system prompt).
pub const SMOLLM_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A Llama-3-style template: BOS, header tokens, `.strip()`, a system message split off, `raise_exception`.
pub const LLAMA3_TEMPLATE: &str = "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {%- if message.role not in ['user', 'assistant', 'tool'] %}\n        {{- raise_exception('unknown role ' + message.role) }}\n    {%- endif %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- if message.content.startswith('<tool>') %}{{- message.content.split('<tool>')|length }}{%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

pub struct Vocabs {
    /// smollm (digit-split GPT-2), llama-bpe, qwen2, gpt-2 BPE; SentencePiece with and without the space prefix.
    pub toks: Vec<Tokenizer>,
    /// ChatML (built in), Gemma (built in), SmolLM2's, a Llama-3-style one; each with the tokenizer it goes with.
    pub chats: Vec<(ChatTemplate, usize)>,
}

pub fn vocabs() -> &'static Vocabs {
    static V: OnceLock<Vocabs> = OnceLock::new();
    V.get_or_init(|| {
        let files = [
            gguf(bpe_gguf("smollm", None), "smollm.gguf"),
            gguf(bpe_gguf("llama-bpe", None), "llama-bpe.gguf"),
            gguf(bpe_gguf("qwen2", None), "qwen2.gguf"),
            gguf(bpe_gguf("gpt-2", None), "gpt-2.gguf"),
            gguf(spm_gguf(true), "spm.gguf"),
            gguf(spm_gguf(false), "spm-nospace.gguf"),
        ];
        let toks = files
            .iter()
            .map(|g| Tokenizer::from_gguf(g).expect("the harness's vocabularies load"))
            .collect();
        let chats = vec![
            (ChatTemplate::from_gguf(&files[0]).unwrap(), 0),
            (ChatTemplate::from_gguf(&files[4]).unwrap(), 4),
            (
                ChatTemplate::from_gguf(&gguf(
                    bpe_gguf("smollm", Some(SMOLLM_TEMPLATE)),
                    "smollm-chat.gguf",
                ))
                .unwrap(),
                0,
            ),
            (
                ChatTemplate::from_source(
                    LLAMA3_TEMPLATE,
                    "<|begin_of_text|>",
                    "<|eot_id|>",
                    true,
                    false,
                )
                .unwrap(),
                1,
            ),
        ];
        Vocabs { toks, chats }
    })
}

/// Encodes and decodes `text` with `tok` and checks the documented properties.
fn exercise_tokenizer(tok: &Tokenizer, text: &str, add_bos: bool, parse_special: bool) {
    let ids = match tok.encode(text, add_bos, parse_special) {
        Ok(ids) => ids,
        Err(_) => return,
    };
    assert!(
        ids.iter().all(|&i| (i as usize) < tok.vocab_size()),
        "encode gave an id outside the vocabulary: {ids:?}"
    );
    let decoded = tok.decode(&ids);
    // SentencePiece spells a space "\u{2581}", so a "\u{2581}" in the text decodes as a space (as in llama.cpp).
    let spm_space = tok.token_id("<0x00>").is_some() && text.contains('\u{2581}');
    if !add_bos && !parse_special && !spm_space {
        assert_eq!(decoded, text, "decode(encode(text)) != text; ids {ids:?}");
    }
    let mut sd = StreamDecoder::new();
    let mut streamed: String = ids.iter().map(|&i| sd.push(tok, i)).collect();
    streamed.push_str(&sd.flush());
    assert_eq!(streamed, decoded, "streamed decode != decode; ids {ids:?}");
}

// ---------------------------------------------------------------------------------------------------------------------
// Targets

/// Bytes as a GGUF file; what parses goes through the model, tokenizer and chat-template loaders.
pub fn run_gguf(data: &[u8]) {
    let Ok(g) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    for t in &g.tensors {
        assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes);
        let _ = g.tensor_info(&t.name);
    }
    let _ = g.architecture();
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        for text in [
            "Hello world 123",
            "<|im_start|>user\nhi<|im_end|>",
            "<bos><start_of_turn>x",
        ] {
            let _ = tok.encode(text, true, true);
        }
        let ids: Vec<u32> = (0..tok.vocab_size().min(64) as u32)
            .chain([u32::MAX])
            .collect();
        let _ = tok.decode(&ids);
    }
    if let Ok(ct) = ChatTemplate::from_gguf(&g) {
        let _ = ct.render(
            &[
                ChatMessage::new("system", "s"),
                ChatMessage::new("user", "u"),
                ChatMessage::new("assistant", "a"),
            ],
            true,
        );
    }
    let _ = Model::from_gguf(&g);
}

/// Byte 0 picks the vocabulary and the encode flags; the rest is text. Then the same bytes as token ids
/// (little-endian u32s, some past the vocabulary) through decode and the streaming decoder.
pub fn run_tokenizer(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let v = vocabs();
    let tok = &v.toks[(sel as usize >> 2) % v.toks.len()];
    let text = String::from_utf8_lossy(rest);
    exercise_tokenizer(tok, &text, sel & 1 != 0, sel & 2 != 0);
    let ids: Vec<u32> = rest
        .chunks(2)
        .map(|c| {
            let x = u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
            // Mostly ids in range, some past it (and u32::MAX).
            match x >> 14 {
                3 if x & 1 == 1 => u32::MAX,
                3 => x,
                _ => x % tok.vocab_size() as u32,
            }
        })
        .collect();
    let decoded = tok.decode(&ids);
    let mut sd = StreamDecoder::new();
    let mut streamed: String = ids.iter().map(|&i| sd.push(tok, i)).collect();
    streamed.push_str(&sd.flush());
    assert_eq!(streamed, decoded, "streamed decode != decode; ids {ids:?}");
}

/// Byte 0 picks the template and `add_generation_prompt`; the rest, split at NUL bytes, is role, content, role,
/// content, ... The rendered prompt is then encoded with special tokens, as the chat command does.
pub fn run_chat(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let v = vocabs();
    let (ct, ti) = &v.chats[(sel as usize >> 1) % v.chats.len()];
    let text = String::from_utf8_lossy(rest);
    let fields: Vec<&str> = text.split('\0').collect();
    let msgs: Vec<ChatMessage> = fields
        .chunks(2)
        .map(|c| ChatMessage::new(c[0], c.get(1).copied().unwrap_or("")))
        .collect();
    if let Ok(prompt) = ct.render(&msgs, sel & 1 != 0) {
        // Message text is data, never template code: every content must come out verbatim (Gemma and the
        // Llama-3 template trim it).
        // A lone system message has no user turn to be put in front of in Gemma's format, so only the contents of
        // the other messages are checked.
        for m in msgs.iter().filter(|m| m.role != "system") {
            let c = m.content.trim();
            assert!(
                prompt.contains(c),
                "content {c:?} missing from the prompt {prompt:?}"
            );
        }
        let _ = v.toks[*ti].encode(&prompt, true, true);
    }
}

/// A `--kv` spec string; a spec that parses must parse back from its label to the same spec.
pub fn run_kvspec(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = KvSpec::parse(s) {
        let label = spec.to_string();
        let again = KvSpec::parse(&label)
            .unwrap_or_else(|e| panic!("label {label:?} of spec {s:?} does not parse: {e:#}"));
        assert_eq!(
            again, spec,
            "spec {s:?} -> label {label:?} -> a different spec"
        );
    }
}

/// Bytes as a LongBench JSONL file; each record (up to 8) is made into a case with a small BPE tokenizer, with and
/// without the chat template, at a small length limit that forces the middle of long contexts to be cut.
pub fn run_longbench(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(samples) = longbench::parse(text, Path::new("fuzz.jsonl")) else {
        return;
    };
    let v = vocabs();
    let (ct, ti) = &v.chats[2];
    let tok = &v.toks[*ti];
    for (i, s) in samples.iter().take(8).enumerate() {
        for p in [
            Prompter::new(tok, Ok(ct), false),
            Prompter::new(tok, Err(String::new()), true),
        ] {
            for (max_length, max_context) in [(None, 200), (Some(64), 600), (Some(600), 400)] {
                for chat in [false, true] {
                    let _ = longbench::case(&p, s, i, max_length, max_context, 0, chat);
                }
            }
        }
    }
}
