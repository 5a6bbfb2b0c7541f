//! When compression runs (`--compress-at`, the spec option `at@context|prompt`, `turns`, `every@N`): under `context`
//! the method runs once, at the end of the context, and the question after it is never evicted and continues at the
//! context's positions; under `prompt` every prompt feed compresses, as before the switch; decoding compresses only
//! with every@N; a session's copy leaves the session unchanged.

use hayloft::engine::{Session, SessionConfig};
use hayloft::methods::{CompressAt, KvSpec};
use hayloft::model::testutil::{write_tiny_llama, TinySpec};
use hayloft::model::Model;

fn tiny(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    Model::load(&p).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11 + seed * 101) % vocab) as u32)
        .collect()
}

fn session<'m>(model: &'m Model, kv: &str) -> Session<'m> {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = 64;
    cfg.kv = KvSpec::parse(kv).unwrap();
    Session::new(model, cfg).unwrap()
}

/// Positions held by (layer, head), in cache order.
fn positions(s: &Session, layer: usize, head: usize) -> Vec<u32> {
    let c = &s.cache.cfg;
    let (mut k, mut v) = (vec![0f32; c.head_dim_k], vec![0f32; c.head_dim_v]);
    (0..s.cache.len(layer, head))
        .map(|i| s.cache.read(layer, head, i, &mut k, &mut v))
        .collect()
}

fn heads(m: &Model) -> Vec<(usize, usize)> {
    let c = m.config();
    (0..c.n_layers)
        .flat_map(|l| (0..c.n_kv_heads).map(move |h| (l, h)))
        .collect()
}

#[test]
fn context_compresses_once_and_never_evicts_the_question() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let vocab = m.config().vocab;
    let (ctx, q) = (tokens(300, vocab, 0), tokens(20, vocab, 1));
    for kv in ["snapkv@40t,at@context", "h2o@0.2,at@context,chunked"] {
        let mut s = session(&m, kv);
        s.prefill(&ctx).unwrap();
        assert_eq!(s.compressions, if kv.contains("chunked") { 5 } else { 1 });
        let after_ctx = s.compressions;
        let kept: Vec<Vec<u32>> = heads(&m)
            .iter()
            .map(|&(l, h)| positions(&s, l, h))
            .collect();
        // The question, then decoding: nothing more is compressed, and every question token stays, at the positions
        // after the context's 300 (not after the cache's shorter length).
        s.prefill_uncompressed(&q).unwrap();
        for t in 0..10 {
            s.decode(t).unwrap();
        }
        assert_eq!(s.compressions, after_ctx, "{kv}");
        assert_eq!(s.context_end(), Some(300));
        for (i, &(l, h)) in heads(&m).iter().enumerate() {
            let p = positions(&s, l, h);
            let want: Vec<u32> = kept[i].iter().copied().chain(300..330).collect();
            assert_eq!(p, want, "{kv}: layer {l} head {h}");
        }
        // A later prompt feed (a second chat turn) is not compressed either, without `turns`.
        s.prefill(&tokens(30, vocab, 2)).unwrap();
        assert_eq!(s.compressions, after_ctx, "{kv}");
    }
    // With `turns` every later prompt compresses again; `prefill_uncompressed` never does.
    let mut s = session(&m, "snapkv@40t,at@context,turns");
    s.prefill(&ctx).unwrap();
    s.prefill_uncompressed(&q).unwrap();
    assert_eq!(s.compressions, 1);
    s.prefill(&tokens(30, vocab, 2)).unwrap();
    assert_eq!(s.compressions, 2);
    assert_eq!(s.cache.max_len(), 40);
    // Going back before the end of the context makes the next prompt a new context.
    let mut s = session(&m, "snapkv@40t,at@context");
    s.prefill(&ctx).unwrap();
    s.reset();
    s.prefill(&ctx).unwrap();
    assert_eq!(s.compressions, 2);
}

#[test]
fn prompt_compresses_every_prompt_feed_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let vocab = m.config().vocab;
    let (ctx, q) = (tokens(300, vocab, 0), tokens(20, vocab, 1));
    // `at@prompt` is what a spec without `at` does in a session: the same caches, feed by feed.
    let mut a = session(&m, "snapkv@40t,at@prompt");
    let mut b = session(&m, "snapkv@40t");
    for (i, feed) in [&ctx, &q, &tokens(30, vocab, 2)].into_iter().enumerate() {
        a.prefill(feed).unwrap();
        b.prefill(feed).unwrap();
        assert_eq!(a.compressions, i + 1);
        assert_eq!(a.fingerprint(), b.fingerprint(), "feed {i}");
        assert_eq!(
            a.cache.max_len(),
            40,
            "feed {i}: question-aware, compressed with the prompt"
        );
    }
    // Under `prompt` the question is compressed with the context: the cache differs from `context`'s, where it is
    // fed after the compression and kept whole.
    let mut c = session(&m, "snapkv@40t,at@context");
    c.prefill(&ctx).unwrap();
    c.prefill_uncompressed(&q).unwrap();
    assert_eq!(c.cache.max_len(), 60);
    let mut p = session(&m, "snapkv@40t");
    let whole: Vec<u32> = ctx.iter().chain(&q).copied().collect();
    p.prefill(&whole).unwrap();
    assert_eq!(p.cache.max_len(), 40);
}

#[test]
fn decoding_compresses_only_with_every() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let prompt = tokens(100, m.config().vocab, 3);
    for kv in ["snapkv@20t", "snapkv@20t,at@context", "tova@20t"] {
        let mut s = session(&m, kv);
        s.prefill(&prompt).unwrap();
        for i in 0..80 {
            s.decode((i * 7 % 50) as u32).unwrap();
        }
        assert_eq!(s.compressions, 1, "{kv}: decoding compressed by default");
        assert_eq!(s.cache.max_len(), 100, "{kv}");
    }
    let mut s = session(&m, "snapkv@20t,every@8,at@context");
    s.prefill(&prompt).unwrap();
    for i in 0..16 {
        s.decode((i * 7 % 50) as u32).unwrap();
    }
    assert_eq!(s.compressions, 3);
}

#[test]
fn a_duplicate_leaves_its_source_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let vocab = m.config().vocab;
    for kv in ["snapkv@40t,at@context", "snapkv@40t,at@prompt", "full"] {
        let mut shared = session(&m, kv);
        shared.prefill(&tokens(200, vocab, 4)).unwrap();
        let before = shared.fingerprint();
        for seed in 0..3 {
            let mut q = shared.duplicate().unwrap();
            assert_eq!(q.fingerprint(), before, "{kv}: a copy starts equal");
            q.prefill(&tokens(25, vocab, seed)).unwrap();
            q.decode(5).unwrap();
            assert_ne!(q.fingerprint(), before);
        }
        assert_eq!(shared.fingerprint(), before, "{kv}");
        assert_eq!(shared.n_past(), 200);
    }
}

#[test]
fn protocol_values_parse_or_name_the_allowed_ones() {
    assert_eq!(
        "context".parse::<CompressAt>().unwrap(),
        CompressAt::Context
    );
    assert_eq!("prompt".parse::<CompressAt>().unwrap(), CompressAt::Prompt);
    let e = format!("{:#}", "question".parse::<CompressAt>().unwrap_err());
    assert!(e.contains("context") && e.contains("prompt"), "{e}");
    let e = format!("{:#}", KvSpec::parse("snapkv@0.5,at@later").unwrap_err());
    assert!(e.contains("later") && e.contains("context, prompt"), "{e}");
    let e = format!("{:#}", KvSpec::parse("snapkv@0.5,at").unwrap_err());
    assert!(e.contains("at@context"), "{e}");
    // Specs that compress nothing have no protocol.
    for bad in ["full,at@context", "kivi4,turns", "quest@0.1,at@prompt"] {
        let e = format!("{:#}", KvSpec::parse(bad).unwrap_err());
        assert!(e.contains("compresses nothing"), "{bad}: {e}");
    }
    assert!(KvSpec::parse("full,think,at@context").is_ok());
    // The flag over the spec's own option over the command's default; written into specs that compress only.
    let mut s = KvSpec::parse("snapkv@0.5,at@prompt").unwrap();
    assert_eq!(
        s.resolve_compress_at(None, CompressAt::Context),
        CompressAt::Prompt
    );
    assert_eq!(
        s.resolve_compress_at(Some(CompressAt::Context), CompressAt::Prompt),
        CompressAt::Context
    );
    assert_eq!(s.to_string(), "snapkv@0.5,at@context");
    let mut full = KvSpec::full();
    assert_eq!(
        full.resolve_compress_at(None, CompressAt::Context),
        CompressAt::Context
    );
    assert_eq!(full.to_string(), "full");
}
