//! CacheBlend on tiny random-weight models: re-rotation against direct computation, the two ends of the recompute
//! ratio against full recompute and naive reuse, and the choice of tokens.

use super::*;
use crate::engine::SessionConfig;
use crate::gguf::Value;
use crate::model::testutil::{tiny_gemma3, tiny_llama, write_tiny_qwen2, TinySpec};

/// The architectures and RoPE variants blending must handle: Llama with interleaved pairs and rope_dim < head_dim,
/// Qwen2 with NeoX pairs, biases and YaRN scaling, Gemma 3 with QK-norm, two RoPE bases and a 16-token window.
fn models(dir: &std::path::Path) -> Vec<(&'static str, Model)> {
    let spec = TinySpec {
        weight_type: crate::gguf::GgmlType::F32,
        ..TinySpec::default()
    };
    let llama = dir.join("llama.gguf");
    let mut w = tiny_llama(&spec);
    w.set_meta("llama.rope.dimension_count", Value::U32(8));
    w.write(&llama).unwrap();
    let qwen = dir.join("qwen2.gguf");
    write_tiny_qwen2(&qwen, &spec, Some(("yarn", 4.0, 128))).unwrap();
    let gemma = dir.join("gemma3.gguf");
    let mut g = tiny_gemma3(
        &TinySpec {
            n_layers: 3,
            ..spec.clone()
        },
        16,
    );
    g.set_meta("gemma3.attention.sliding_window_pattern", Value::U32(2));
    g.write(&gemma).unwrap();
    let m = Model::load(&llama).unwrap();
    assert_eq!(m.config().rope_dim, 8);
    vec![
        ("llama", m),
        ("qwen2", Model::load(&qwen).unwrap()),
        ("gemma3", Model::load(&gemma).unwrap()),
    ]
}

fn session(m: &Model) -> Session<'_> {
    let mut cfg = SessionConfig::for_model(m);
    cfg.chunk_size = 16; // smaller than the chunks: the recompute runs its rows a part at a time
    cfg.max_context = 512;
    Session::new(m, cfg).unwrap()
}

fn toks(m: &Model, seed: usize, n: usize) -> Vec<u32> {
    let v = m.config().vocab - 1;
    (0..n)
        .map(|i| ((i * 31 + seed * 17 + 5) % v) as u32 + 1)
        .collect()
}

/// A system prefix, three chunks each cached right after it, and a question.
struct Rag<'m> {
    prefix: Session<'m>,
    chunks: Vec<ChunkKv>,
    question: Vec<u32>,
}

fn rag(m: &Model) -> Rag<'_> {
    let mut prefix = session(m);
    prefix.prefill(&toks(m, 0, 6)).unwrap();
    let chunks = [(1, 20), (2, 23), (3, 18)]
        .iter()
        .map(|&(seed, n)| ChunkKv::compute(&prefix, &toks(m, seed, n)).unwrap())
        .collect();
    Rag {
        prefix,
        chunks,
        question: toks(m, 9, 5),
    }
}

impl Rag<'_> {
    fn refs(&self) -> Vec<&ChunkKv> {
        self.chunks.iter().collect()
    }
    /// The session `how` prepares, and the logits after the question.
    fn answer(&self, how: Reuse) -> (Vec<f32>, Option<BlendOutcome>) {
        let (mut s, out) = prepare(&self.prefix, &self.refs(), how).unwrap();
        (s.prefill(&self.question).unwrap().to_vec(), out)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every entry of (layer, head) as (position, key, value).
fn entries(c: &KvCache, layer: usize, head: usize) -> Vec<(u32, Vec<f32>, Vec<f32>)> {
    (0..c.len(layer, head))
        .map(|i| {
            let (mut k, mut v) = (vec![0.0; c.cfg.head_dim_k], vec![0.0; c.cfg.head_dim_v]);
            let p = c.read(layer, head, i, &mut k, &mut v);
            (p, k, v)
        })
        .collect()
}

#[test]
fn rerotated_layer_0_equals_the_cache_computed_at_the_new_position() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in models(dir.path()) {
        // A chunk cached from position 0, moved behind a 13-token prefix, against the chunk computed there.
        let empty = session(&m);
        let chunk = ChunkKv::compute(&empty, &toks(&m, 1, 40)).unwrap();
        assert_eq!(chunk.start(), 0);
        let mut prefix = session(&m);
        prefix.prefill(&toks(&m, 0, 13)).unwrap();
        let moved = assemble(&prefix, &[&chunk]).unwrap();
        let direct = ChunkKv::compute(&prefix, chunk.tokens()).unwrap();
        let nkv = m.config().n_kv_heads;
        let mut layer1_differs = false;
        for layer in [0, 1] {
            for h in 0..nkv {
                let got: Vec<_> = entries(&moved.cache, layer, h)
                    .into_iter()
                    .filter(|e| e.0 >= 13)
                    .collect();
                let want = entries(direct.cache(), layer, h);
                let unmoved = entries(chunk.cache(), layer, h);
                assert_eq!(got.len(), 40, "{name}");
                for ((g, w), u) in got.iter().zip(&want).zip(&unmoved) {
                    assert_eq!(g.0, w.0, "{name}: positions");
                    let scale = w.1.iter().fold(1e-3f32, |a, x| a.max(x.abs()));
                    let (dk, dv) = (max_diff(&g.1, &w.1), max_diff(&g.2, &w.2));
                    if layer == 0 {
                        // Two f16 roundings (cached at 0, stored again after the rotation) apart at most.
                        assert!(
                            dk <= 2e-3 * scale,
                            "{name} head {h} pos {}: key off by {dk} (scale {scale})",
                            g.0
                        );
                        assert!(
                            dv <= 1e-6,
                            "{name}: layer 0 values depend on the token only"
                        );
                        // Without the rotation the keys would not match (rope_dim > 0 rotates something).
                        if g.0 > 13 {
                            assert!(
                                max_diff(&u.1, &w.1) > 10.0 * dk.max(1e-4),
                                "{name}: the shift rotated nothing"
                            );
                        }
                    } else if dv > 1e-2 {
                        layer1_differs = true;
                    }
                }
            }
        }
        assert!(
            layer1_differs,
            "{name}: layer 1 sees the prefix, reused values cannot all match"
        );
    }
}

#[test]
fn blend_recomputing_everything_equals_full_recompute_and_naive_reuse_differs() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in models(dir.path()) {
        let r = rag(&m);
        let (full, _) = r.answer(Reuse::Full);
        let (naive, _) = r.answer(Reuse::Naive);
        let (all, out) = r.answer(Reuse::Blend(BlendOptions::new(1.0, 1).unwrap()));
        let out = out.unwrap();
        assert_eq!(out.recomputed.len(), 61, "{name}");
        let scale = full.iter().fold(0f32, |a, x| a.max(x.abs()));
        let (d_all, d_naive) = (max_diff(&all, &full), max_diff(&naive, &full));
        assert!(
            d_all <= 1e-4 * scale,
            "{name}: blend@100% is {d_all} off full recompute (scale {scale})"
        );
        assert!(
            d_naive > 100.0 * d_all.max(1e-6 * scale),
            "{name}: naive reuse {d_naive} vs {d_all}"
        );
    }
}

#[test]
fn blend_recomputing_nothing_is_naive_reuse() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in models(dir.path()) {
        let r = rag(&m);
        // Checking at layer 0: no layer runs in full before it, so nothing at all changes.
        let (naive, _) = prepare(&r.prefix, &r.refs(), Reuse::Naive).unwrap();
        let (none, out) = prepare(
            &r.prefix,
            &r.refs(),
            Reuse::Blend(BlendOptions::new(0.0, 0).unwrap()),
        )
        .unwrap();
        assert!(out.unwrap().recomputed.is_empty());
        assert_eq!(none.fingerprint(), naive.fingerprint(), "{name}");
        // At the default check layer 1, layer 0 runs in full, and its fresh K/V equal the re-rotated ones up to f16
        // rounding: the answer is naive reuse's, far from full recompute's.
        let (full, _) = r.answer(Reuse::Full);
        let (naive, _) = r.answer(Reuse::Naive);
        let (zero, _) = r.answer(Reuse::Blend(BlendOptions::new(0.0, 1).unwrap()));
        let (d0, dn) = (max_diff(&zero, &naive), max_diff(&naive, &full));
        assert!(
            d0 * 50.0 < dn,
            "{name}: blend@0 is {d0} from naive reuse, which is {dn} from full"
        );
    }
}

#[test]
fn blend_recomputes_the_tokens_that_deviate_most() {
    let dir = tempfile::tempdir().unwrap();
    let all = models(dir.path());
    for ((name, m), what) in all
        .iter()
        .flat_map(|m| [(m, Deviation::Value), (m, Deviation::Key)])
    {
        let (name, m) = (*name, m);
        let r = rag(m);
        let mut opt = BlendOptions::new(0.25, 1).unwrap();
        opt.deviation = what;
        let (naive, _) = prepare(&r.prefix, &r.refs(), Reuse::Naive).unwrap();
        let (full, _) = prepare(&r.prefix, &r.refs(), Reuse::Full).unwrap();
        let (blend, out) = prepare(&r.prefix, &r.refs(), Reuse::Blend(opt)).unwrap();
        let out = out.unwrap();
        let (from, n) = (6usize, 61usize);
        assert_eq!((out.from, out.deviation.len()), (from, n));
        assert_eq!(out.recomputed.len(), opt.picks(n));
        assert_eq!(opt.picks(n), 15);
        // Layer 0 ran in full, so the fresh layer-1 values (keys) are full recompute's: the deviation, measured here
        // from the two caches, must be what the blend ranked by.
        let nkv = m.config().n_kv_heads;
        let mut dev = vec![0f32; n];
        for h in 0..nkv {
            for (f, nv) in entries(&full.cache, 1, h)
                .iter()
                .zip(entries(&naive.cache, 1, h))
            {
                assert_eq!(f.0, nv.0);
                let (fresh, reused) = match what {
                    Deviation::Value => (&f.2, &nv.2),
                    Deviation::Key => (&f.1, &nv.1),
                };
                if f.0 as usize >= from {
                    dev[f.0 as usize - from] += fresh
                        .iter()
                        .zip(reused)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>();
                }
            }
        }
        for (a, b) in out.deviation.iter().zip(&dev) {
            assert!(
                (a - b).abs() <= 1e-2 * b.max(1e-3),
                "{name} {what:?}: deviation {a} vs {b}"
            );
        }
        let chosen: Vec<usize> = out.recomputed.iter().map(|&p| p as usize - from).collect();
        let lowest_chosen = chosen.iter().map(|&i| dev[i]).fold(f32::INFINITY, f32::min);
        let highest_other = (0..n)
            .filter(|i| !chosen.contains(i))
            .map(|i| dev[i])
            .fold(0f32, f32::max);
        assert!(
            lowest_chosen >= highest_other * 0.99,
            "{name}: picked {lowest_chosen} below {highest_other}"
        );
        // From the check layer on, exactly the chosen tokens changed.
        for layer in 1..m.config().n_layers {
            for h in 0..nkv {
                for (b, nv) in
                    entries(&blend.cache, layer, h)
                        .iter()
                        .zip(entries(&naive.cache, layer, h))
                {
                    let changed = b.1 != nv.1 || b.2 != nv.2;
                    assert_eq!(
                        changed,
                        out.recomputed.contains(&b.0),
                        "{name} layer {layer} pos {}",
                        b.0
                    );
                }
            }
        }
    }
}

#[test]
fn bad_settings_and_sessions_are_refused() {
    assert!(BlendOptions::new(1.5, 1).is_err());
    assert!(BlendOptions::new(-0.1, 1).is_err());
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = models(dir.path()).remove(0);
    let r = rag(&m);
    let mut s = assemble(&r.prefix, &r.refs()).unwrap();
    let e = recompute(&mut s, 6, &BlendOptions::new(0.15, 9).unwrap()).unwrap_err();
    assert!(format!("{e}").contains("check layer 9"), "{e}");
    let mut small = session(&m);
    small.cfg.max_context = 30;
    small.prefill(&toks(&m, 0, 6)).unwrap();
    let Err(e) = assemble(&small, &r.refs()) else {
        panic!("a blend over the context budget was accepted")
    };
    assert!(format!("{e}").contains("too long"), "{e}");
}
