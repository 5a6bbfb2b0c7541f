//! Decode-time selectors on the real SmolLM2: a needle in ~2K tokens of essays that full attention finds is still
//! found by the best selectors while they read less of the KV cache (every spec decodes from a copy of one
//! prefill).

mod common;

use hayloft::engine::{Session, SessionConfig};
use hayloft::gguf::GgufFile;
use hayloft::methods::{KvSpec, Needs};
use hayloft::model::Model;
use hayloft::tokenizer::Tokenizer;

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

#[test]
fn selectors_find_the_needle_full_attention_finds_reading_less() {
    let path = common::model("smollm2-135m");
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let essays = std::fs::read_to_string(common::essays()).unwrap();
    let words: Vec<&str> = essays.split_whitespace().take(1500).collect();
    let (a, b) = words.split_at(700);
    let text = format!(
        "{} The special magic number is 7342. {}\n\nWhat is the special magic number? The special magic number is",
        a.join(" "),
        b.join(" ")
    );
    let toks = tok.encode(&text, true, false).unwrap();
    let mut cfg = SessionConfig::for_model(&model);
    // RetrievalAttention builds its graph from the prompt's last 512 queries.
    cfg.observe = Needs {
        window: 512,
        ..Default::default()
    };
    let mut base = Session::new(&model, cfg).unwrap();
    let first = base.prefill(&toks).unwrap().to_vec();
    let answer = |spec: &str| -> (String, f64) {
        let mut s = base.fork(&KvSpec::parse(spec).unwrap()).unwrap();
        let (mut next, mut out) = (argmax(&first), Vec::new());
        for _ in 0..6 {
            out.push(next);
            next = argmax(s.decode(next).unwrap());
        }
        s.stats.finish();
        (tok.decode(&out), s.stats.kv_read_bytes_per_token)
    };
    let (full, full_read) = answer("full");
    assert!(full.contains("7342"), "full attention answered {full:?}");
    for spec in ["quest@0.25,score=meanstd", "retrieval@0.25"] {
        let (got, read) = answer(spec);
        assert!(
            got.contains("7342"),
            "{spec} answered {got:?} (full: {full:?})"
        );
        assert!(
            read < 0.75 * full_read,
            "{spec}: read {read:.0} bytes per token, full attention {full_read:.0}"
        );
    }
}
