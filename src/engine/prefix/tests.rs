//! Prefix store tests on tiny random-weight models: a restored prefix continues exactly as the session it came from.

use super::*;
use crate::engine::SessionConfig;
use crate::kv::KvDtype;
use crate::methods::KvSpec;
use crate::model::testutil::{write_tiny_llama, TinySpec};
use crate::model::Model;

pub(super) fn tiny(dir: &std::path::Path) -> (Model, ModelId) {
    let p = dir.join("m.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    (Model::load(&p).unwrap(), ModelId::of_file(&p).unwrap())
}

pub(super) fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 11) % 250).collect()
}

fn cfg(model: &Model, dtype: KvDtype) -> SessionConfig {
    SessionConfig {
        kv_dtype: dtype,
        ..SessionConfig::for_model(model)
    }
}

fn store(bytes: usize) -> PrefixStore {
    PrefixStore::new(&StoreConfig::ram(bytes))
}

/// Feeds `rest` and returns the logits after it.
fn continue_with(s: &mut Session, rest: &[u32]) -> Vec<f32> {
    s.prefill(rest).unwrap().to_vec()
}

/// A session prefills `split` tokens, stores them and continues; a fresh session restores the prefix from the store
/// and continues: same logits, bit for bit. Returns the hit's length.
fn restore_matches(
    model: &Model,
    id: ModelId,
    c: &SessionConfig,
    split: usize,
    total: usize,
) -> usize {
    let toks = tokens(total, 3);
    let st = store(1 << 30);
    let mut a = Session::new(model, c.clone()).unwrap();
    let ns = Namespace::of_session(id, &a);
    a.prefill(&toks[..split]).unwrap();
    assert!(st.insert(&ns, &a).unwrap() > 0);
    let want = continue_with(&mut a, &toks[split..]);

    let mut b = Session::new(model, c.clone()).unwrap();
    assert_eq!(Namespace::of_session(id, &b), ns);
    let hit = st.lookup(&ns, &toks);
    hit.restore(&mut b, &toks).unwrap();
    assert_eq!(b.n_past(), hit.tokens);
    assert_eq!(b.cache.used_bytes(), {
        let mut r = Session::new(model, c.clone()).unwrap();
        r.prefill(&toks[..hit.tokens]).unwrap();
        r.cache.used_bytes()
    });
    let got = continue_with(&mut b, &toks[hit.tokens..]);
    if hit.tokens == split {
        assert!(want == got, "logits differ after restoring {split} tokens");
    }
    hit.tokens
}

#[test]
fn full_caches_restore_block_by_block_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    for dtype in [KvDtype::F16, KvDtype::F32] {
        // 96 tokens: three whole blocks, all reused.
        assert_eq!(
            restore_matches(&model, id, &cfg(&model, dtype), 96, 150),
            96
        );
    }
}

#[test]
fn restored_prefix_matches_a_recomputed_one() {
    // Entries stored from a longer prompt serve a shorter request: block 0..2 of a 130-token prefill, then the
    // continuation, against recomputing the 64-token prefix: within the kernels' chunking tolerance.
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let c = cfg(&model, KvDtype::F32);
    let toks = tokens(130, 5);
    let st = store(1 << 30);
    let mut a = Session::new(&model, c.clone()).unwrap();
    let ns = Namespace::of_session(id, &a);
    a.prefill(&toks).unwrap();
    assert_eq!(st.insert(&ns, &a).unwrap(), 4);
    let req = [&toks[..64], &tokens(20, 9)[..]].concat();
    let hit = st.lookup(&ns, &req);
    assert_eq!(hit.tokens, 64);
    let mut b = Session::new(&model, c.clone()).unwrap();
    hit.restore(&mut b, &req).unwrap();
    let got = continue_with(&mut b, &req[64..]);
    let mut r = Session::new(&model, c).unwrap();
    let want = r.prefill(&req).unwrap().to_vec();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = want
        .iter()
        .zip(&got)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= 1e-4 * scale, "max error {err} of scale {scale}");
}

#[test]
fn kivi_caches_restore_exactly_where_quantization_allows() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let q = KvDtype::Kivi {
        bits: 4,
        residual: 32,
    };
    // 192 tokens: blocks 0-4 quantized, 5 in the residual window; all six come back.
    assert_eq!(restore_matches(&model, id, &cfg(&model, q), 192, 230), 192);
    // A request sharing only 4 quantized blocks: a recomputed 128-token prefix would hold 3 quantized blocks and
    // one full-precision; quantized block 3 cannot go back, and no shorter prefix works either: nothing reused.
    let toks = tokens(192, 3);
    let st = store(1 << 30);
    let mut a = Session::new(&model, cfg(&model, q)).unwrap();
    let ns = Namespace::of_session(id, &a);
    a.prefill(&toks).unwrap();
    st.insert(&ns, &a).unwrap();
    let req = [&toks[..128], &tokens(10, 1)[..]].concat();
    assert_eq!(st.lookup(&ns, &req).tokens, 0);
    assert_eq!(st.counters().misses, 1);
}

#[test]
fn restorable_prefixes() {
    use entry::restorable;
    assert_eq!(restorable(&[false; 5], 0), 5);
    assert_eq!(restorable(&[], 128), 0);
    // residual 64 (2 blocks): m blocks may hold m − 2 quantized.
    assert_eq!(restorable(&[true, true, false, false], 64), 4);
    assert_eq!(restorable(&[true, true, false], 64), 0);
    assert_eq!(restorable(&[true, false, false, false], 64), 4);
    assert_eq!(restorable(&[false, false, true], 64), 2);
}

/// The first compression method of the registry with a budget, as a spec.
pub(super) fn some_method() -> KvSpec {
    crate::methods::registry::METHODS
        .iter()
        .filter(|m| m.build.is_some())
        .find_map(|m| KvSpec::parse(&format!("{}@0.5", m.name)).ok())
        .expect("a compression method with a budget")
}

#[test]
fn compressed_caches_restore_only_as_exact_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let c = SessionConfig {
        kv: some_method(),
        ..cfg(&model, KvDtype::F16)
    };
    let toks = tokens(150, 2);
    let st = store(1 << 30);
    let mut a = Session::new(&model, c.clone()).unwrap();
    assert_eq!(entry::mode(&a), Mode::Snapshot);
    let ns = Namespace::of_session(id, &a);
    assert_ne!(
        ns,
        Namespace::of_session(
            id,
            &Session::new(&model, cfg(&model, KvDtype::F16)).unwrap()
        )
    );
    a.prefill(&toks[..70]).unwrap();
    assert_eq!(st.insert(&ns, &a).unwrap(), 1);
    assert_eq!(st.insert(&ns, &a).unwrap(), 0, "stored once");
    let want = continue_with(&mut a, &toks[70..]);
    let hit = st.lookup(&ns, &toks);
    assert_eq!(hit.tokens, 70);
    let mut b = Session::new(&model, c.clone()).unwrap();
    hit.restore(&mut b, &toks).unwrap();
    assert!(want == continue_with(&mut b, &toks[70..]));
    // Sharing 64 of the 70 tokens is not enough: no block-wise reuse of a compressed cache.
    let mut other = toks.clone();
    other[65] += 1;
    assert_eq!(st.lookup(&ns, &other).tokens, 0);
    // Exactly the 70 tokens: nothing left to feed, so no hit either.
    assert_eq!(st.lookup(&ns, &toks[..70]).tokens, 0);
    let n = st.counters();
    assert_eq!((n.hits, n.misses, n.hit_tokens), (1, 2, 70));
}

#[test]
fn lru_evicts_unreferenced_tails_first() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let c = cfg(&model, KvDtype::F16);
    let mut a = Session::new(&model, c.clone()).unwrap();
    let ns = Namespace::of_session(id, &a);
    let toks = tokens(129, 4);
    a.prefill(&toks).unwrap();
    // Room for three of the four blocks.
    let one = BlockEntry::capture(&a.cache, 0).unwrap().bytes;
    let st = store(3 * one + one / 2);
    st.insert(&ns, &a).unwrap();
    assert_eq!(st.counters().evictions, 1);
    assert_eq!(st.ram_usage(), (3 * one, 3));
    // The last block went first: the three leading ones still serve.
    let hit = st.lookup(&ns, &toks);
    assert_eq!(hit.tokens, 96);
    // While the hit holds them, another prompt's blocks cannot push them out.
    let mut b = Session::new(&model, c.clone()).unwrap();
    let other = tokens(65, 8);
    b.prefill(&other).unwrap();
    st.insert(&ns, &b).unwrap();
    assert_eq!(st.lookup(&ns, &toks).tokens, 96, "referenced entries stay");
    drop(hit);
    // Unreferenced now: the next insert evicts down to the budget again.
    st.insert(&ns, &b).unwrap();
    assert!(st.ram_usage().0 <= 3 * one + one / 2);
    assert_eq!(st.lookup(&ns, &other).tokens, 64);
}

#[test]
fn the_store_is_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<PrefixStore>();
    // Lookups from several threads at once see one consistent store.
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let mut a = Session::new(&model, cfg(&model, KvDtype::F16)).unwrap();
    let ns = Namespace::of_session(id, &a);
    let toks = tokens(100, 1);
    a.prefill(&toks).unwrap();
    let st = store(1 << 30);
    st.insert(&ns, &a).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(st.lookup(&ns, &toks).tokens, 96));
        }
    });
    assert_eq!(st.counters().hits, 4);
}
