//! Sliding-window caches on a tiny random Gemma 3 (5 local layers with a small window, 1 global): a cache that keeps
//! only each local layer's window gives the logits of one that keeps every entry (one-shot, chunked, token by token,
//! decoding, with KIVI storage), holds about a window per local layer, leaves local layers out of compression, and
//! goes back (truncate) only where it kept what that needs.

use hayloft::engine::{Session, SessionConfig};
use hayloft::methods::KvSpec;
use hayloft::model::testutil::{write_tiny_gemma3, TinySpec};
use hayloft::model::Model;

const WINDOW: u32 = 16;

fn tiny_gemma(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny-gemma3.gguf");
    let spec = TinySpec {
        n_layers: 6,
        n_kv_heads: 2,
        head_dim: 16,
        ..Default::default()
    };
    write_tiny_gemma3(&p, &spec, WINDOW).unwrap();
    Model::load(&p).unwrap()
}

fn session<'m>(m: &'m Model, chunk: usize, bt: usize, kv: &str, swa_full: bool) -> Session<'m> {
    let mut cfg = SessionConfig::for_model(m);
    cfg.chunk_size = chunk;
    cfg.block_tokens = bt;
    cfg.kv = KvSpec::parse(kv).unwrap();
    cfg.swa_full = swa_full;
    Session::new(m, cfg).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11 + seed * 101) % vocab) as u32)
        .collect()
}

/// Logits of every fed token.
fn feed_all(s: &mut Session, toks: &[u32]) -> Vec<f32> {
    let v = s.model.config().vocab;
    let mut out = vec![0.0; toks.len() * v];
    s.feed(toks, 0..toks.len(), |i, l| {
        out[i * v..(i + 1) * v].copy_from_slice(l)
    })
    .unwrap();
    out
}

/// Prefill `toks`, then `steps` greedy decode steps: every logit row seen.
fn run(s: &mut Session, toks: &[u32], steps: usize) -> Vec<f32> {
    let mut out = feed_all(s, toks);
    let v = s.model.config().vocab;
    for _ in 0..steps {
        let last = &out[out.len() - v..];
        let next = argmax(last);
        let l = s.decode(next).unwrap().to_vec();
        out.extend_from_slice(&l);
    }
    out
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Bit for bit: a sliding-window layer attends in the same steps whether or not its cache slides, and attention plans
/// its work over the blocks its queries can see, so both caches add up the same partial sums in the same order.
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "{what}: degenerate logits");
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(a == b, "{what}: max |Δ| {err} vs scale {scale}");
}

/// Entries held by every stream of `layer`.
fn lens(s: &Session, layer: usize) -> Vec<usize> {
    (0..s.cache.cfg.n_kv_heads)
        .map(|h| s.cache.len(layer, h))
        .collect()
}

/// Positions held by (layer, head).
fn positions(s: &Session, layer: usize, head: usize) -> Vec<u32> {
    s.cache
        .blocks(layer, head)
        .flat_map(|b| b.pos.to_vec())
        .collect()
}

#[test]
fn a_windowed_cache_gives_the_same_logits_as_the_full_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gemma(dir.path());
    let c = m.config();
    assert_eq!(c.layer_is_local, vec![true, true, true, true, true, false]);
    // 25 windows long: the one-shot prefill goes through local layers in several steps.
    let toks = tokens(400, c.vocab, 1);
    for bt in [8, 32] {
        for chunk in [512, 7, 1] {
            let what = format!("block {bt}, chunk {chunk}");
            let mut win = session(&m, chunk, bt, "full", false);
            let mut full = session(&m, chunk, bt, "full", true);
            let (a, b) = (run(&mut win, &toks, 12), run(&mut full, &toks, 12));
            assert_same(&a, &b, &what);
            let n = toks.len() + 12;
            for l in 0..c.n_layers {
                let bound = win.cache.cfg.stream_len(l, n, 1);
                if c.layer_is_local[l] {
                    // Decoding: the window plus at most one block, and what the last query reads is there.
                    assert!(lens(&win, l).iter().all(|&x| x <= bound), "{what}");
                    assert!(
                        lens(&win, l).iter().all(|&x| x >= WINDOW as usize),
                        "{what}"
                    );
                    assert_eq!(bound, WINDOW as usize + bt - 1);
                } else {
                    assert_eq!(lens(&win, l), lens(&full, l), "{what}");
                }
                assert_eq!(lens(&full, l), vec![n; 2]);
            }
            // The byte counter (stats, eval's peak) shows the freed blocks: never above the per-layer bound.
            let cfg = &win.cache.cfg;
            let slack = cfg.n_layers * cfg.n_kv_heads * cfg.block_bytes();
            assert!(
                win.cache.peak_bytes() <= cfg.bytes_at(n, chunk) + slack,
                "{what}: peak {} over the bound {}",
                win.cache.peak_bytes(),
                cfg.bytes_at(n, chunk)
            );
            assert!(win.stats.peak_kv_bytes <= win.cache.peak_bytes(), "{what}");
            assert!(
                3 * win.cache.bytes() < full.cache.bytes(),
                "{what}: {} vs {}",
                win.cache.bytes(),
                full.cache.bytes()
            );
        }
    }
}

#[test]
fn kivi_storage_and_compression_compose_with_windows() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gemma(dir.path());
    let c = m.config();
    let toks = tokens(300, c.vocab, 2);
    // KIVI: blocks are cut and quantized at the same places whether or not older ones slid out.
    for kv in ["kivi4@8", "kivi2@8", "kivi4"] {
        let mut win = session(&m, 64, 8, kv, false);
        let mut full = session(&m, 64, 8, kv, true);
        assert_same(&run(&mut win, &toks, 10), &run(&mut full, &toks, 10), kv);
        assert!(win.cache.bytes() < full.cache.bytes(), "{kv}");
        if kv.ends_with("@8") {
            assert!(
                win.cache.quantized_blocks(0, 0) > 0,
                "{kv}: nothing quantized on a local layer"
            );
        }
    }
    // Compression touches the global layer only: its heads keep their budget, local layers keep their window.
    for kv in [
        "snapkv@0.25",
        "streamingllm@64t,every@4",
        "snapkv@0.25,kivi4",
        "tova@0.2,chunked",
    ] {
        let mut s = session(&m, 64, 8, kv, false);
        let out = run(&mut s, &toks, 9);
        assert!(out.iter().all(|x| x.is_finite()), "{kv}");
        let seen = toks.len() + 9;
        for l in 0..c.n_layers {
            for h in 0..c.n_kv_heads {
                let p = positions(&s, l, h);
                if c.layer_is_local[l] {
                    // Contiguous up to the newest token, at least the window: nothing evicted.
                    let want: Vec<u32> = (seen as u32 - p.len() as u32..seen as u32).collect();
                    assert_eq!(p, want, "{kv}: layer {l} head {h}");
                    assert!(p.len() >= WINDOW as usize);
                } else {
                    assert!(
                        p.len() < seen / 3,
                        "{kv}: the global layer was not compressed"
                    );
                }
            }
        }
    }
}

#[test]
fn going_back_needs_what_the_window_read_and_a_hold_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_gemma(dir.path());
    let v = m.config().vocab;
    let (ctx, q1, q2) = (tokens(200, v, 3), tokens(20, v, 4), tokens(15, v, 5));

    // Held at the end of the shared context: answer one query, go back, answer another = a fresh session.
    let mut held = session(&m, 64, 8, "full", false);
    held.hold(ctx.len());
    feed_all(&mut held, &ctx);
    run(&mut held, &q1, 30);
    held.truncate(ctx.len()).unwrap();
    assert_eq!(held.n_past(), ctx.len());
    let again = feed_all(&mut held, &q2);
    let mut fresh = session(&m, 64, 8, "full", false);
    feed_all(&mut fresh, &ctx);
    assert_same(&again, &feed_all(&mut fresh, &q2), "after going back");

    // Not held: the local layers dropped what position 200 reads; going back is refused and changes nothing.
    let mut a = session(&m, 64, 8, "full", false);
    let mut b = session(&m, 64, 8, "full", false);
    for s in [&mut a, &mut b] {
        feed_all(s, &ctx);
        run(s, &q1, 30);
    }
    let before = (a.n_past(), a.cache.bytes(), positions(&a, 0, 1));
    let err = format!("{:#}", a.truncate(ctx.len()).unwrap_err());
    assert!(
        err.contains("sliding-window layer") && err.contains("hold"),
        "{err}"
    );
    assert_eq!((a.n_past(), a.cache.bytes(), positions(&a, 0, 1)), before);
    let (la, lb) = (a.decode(7).unwrap().to_vec(), b.decode(7).unwrap().to_vec());
    assert!(la == lb, "a refused truncation changed the session");
    // Going back within the window is fine, and so is starting over.
    let n = a.n_past();
    a.truncate(n - 3).unwrap();
    a.reset();
    assert!(a.cache.is_empty());
    feed_all(&mut a, &q2);

    // A fork copies the window: decoding on it matches the source.
    let mut base = session(&m, 64, 8, "full", false);
    feed_all(&mut base, &ctx);
    let mut fork = base.fork(&KvSpec::parse("full").unwrap()).unwrap();
    assert_eq!(fork.cache.bytes(), base.cache.bytes());
    let (x, y) = (
        fork.decode(9).unwrap().to_vec(),
        base.decode(9).unwrap().to_vec(),
    );
    assert!(x == y);
}

#[test]
fn a_window_of_zero_tokens_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zero-window.gguf");
    write_tiny_gemma3(&p, &TinySpec::default(), 0).unwrap();
    let err = format!("{:#}", Model::load(&p).err().unwrap());
    assert!(err.contains("sliding_window is 0"), "{err}");
}
