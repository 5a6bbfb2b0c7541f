//! CacheBlend on tiny random-weight models: re-rotation against direct computation, the two ends of the recompute
//! ratio against full recompute and naive reuse, and the choice of tokens.

use super::*;
use crate::engine::SessionConfig;
use crate::gguf::Value;
use crate::model::testutil::{
    tiny_gemma3, tiny_llama, tiny_mistral3, tiny_smollm3, write_tiny_qwen2, TinySpec,
};

/// The architectures and RoPE variants blending must handle: Llama with interleaved pairs and rope_dim < head_dim,
/// Qwen2 with NeoX pairs, biases and YaRN scaling, Gemma 3 with QK-norm, two RoPE bases and a 16-token window, SmolLM3
/// with an unrotated (NoPE) 4th layer.
fn models(dir: &std::path::Path) -> Vec<(&'static str, Model)> {
    models_n(dir, 2)
}

/// [`models`] with `layers` layers (Gemma 3: one more).
fn models_n(dir: &std::path::Path, layers: usize) -> Vec<(&'static str, Model)> {
    let spec = TinySpec {
        weight_type: crate::gguf::GgmlType::F32,
        n_layers: layers,
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
            n_layers: layers + 1,
            ..spec.clone()
        },
        16,
    );
    g.set_meta("gemma3.attention.sliding_window_pattern", Value::U32(2));
    g.write(&gemma).unwrap();
    let smollm3 = dir.join("smollm3.gguf");
    tiny_smollm3(&TinySpec {
        n_layers: layers.max(4),
        ..spec.clone()
    })
    .write(&smollm3)
    .unwrap();
    // Mistral 3: queries scaled by position in steps of 16 (recomputed rows must take their own factors).
    let mistral3 = dir.join("mistral3.gguf");
    tiny_mistral3(&spec, 4.0, 16, Some(0.4))
        .write(&mistral3)
        .unwrap();
    let m = Model::load(&llama).unwrap();
    assert_eq!(m.config().rope_dim, 8);
    vec![
        ("llama", m),
        ("qwen2", Model::load(&qwen).unwrap()),
        ("gemma3", Model::load(&gemma).unwrap()),
        ("smollm3", Model::load(&smollm3).unwrap()),
        ("mistral3", Model::load(&mistral3).unwrap()),
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
fn blend_recomputing_nothing_is_naive_reuse_past_the_check_layer() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in models(dir.path()) {
        let r = rag(&m);
        // Checking at layer 0: only layer 0's K/V are rewritten, with fresh ones equal to the re-rotated ones up to f16
        // rounding; every later layer is naive reuse's, bit for bit, and so is the answer, far from full recompute's.
        let (naive_s, _) = prepare(&r.prefix, &r.refs(), Reuse::Naive).unwrap();
        let (none, out) = prepare(
            &r.prefix,
            &r.refs(),
            Reuse::Blend(BlendOptions::new(0.0, 0).unwrap()),
        )
        .unwrap();
        let out = out.unwrap();
        assert!(out.recomputed.is_empty());
        assert_eq!(
            out.layer_rows,
            vec![0],
            "{name}: no query runs from the check layer on"
        );
        for layer in 1..m.config().n_layers {
            for h in 0..m.config().n_kv_heads {
                assert_eq!(
                    entries(&none.cache, layer, h),
                    entries(&naive_s.cache, layer, h),
                    "{name} layer {layer}"
                );
            }
        }
        let (full, _) = r.answer(Reuse::Full);
        let (naive, _) = r.answer(Reuse::Naive);
        let (zero0, _) = r.answer(Reuse::Blend(BlendOptions::new(0.0, 0).unwrap()));
        let (d0, dn) = (max_diff(&zero0, &naive), max_diff(&naive, &full));
        assert!(
            d0 * 50.0 < dn,
            "{name}: blend@0 is {d0} from naive reuse, which is {dn} from full"
        );
        // At check layer 1 the layers up to it get every token's fresh K/V: on a two-layer model that is all of them,
        // and the answer is full recompute's.
        if m.config().n_layers == 2 {
            let (zero1, _) = r.answer(Reuse::Blend(BlendOptions::new(0.0, 1).unwrap()));
            let d1 = max_diff(&zero1, &full);
            assert!(
                d1 * 50.0 < dn,
                "{name}: blend@0 checking the last layer is {d1} from full, naive {dn}"
            );
        }
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
        // At the check layer every reused token's K/V are the fresh ones, full recompute's (the layers before ran in
        // full); after it exactly the chosen tokens changed.
        for h in 0..nkv {
            for (b, f) in entries(&blend.cache, 1, h)
                .iter()
                .zip(entries(&full.cache, 1, h))
            {
                assert_eq!(b.0, f.0);
                for (x, y) in [(&b.1, &f.1), (&b.2, &f.2)] {
                    let scale = y.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
                    assert!(
                        max_diff(x, y) <= 2e-3 * scale,
                        "{name} check layer pos {}: not the fresh K/V",
                        b.0
                    );
                }
            }
        }
        for layer in 2..m.config().n_layers {
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
fn gradual_filtering_narrows_the_carried_tokens_to_those_that_keep_deviating() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in models_n(dir.path(), 5) {
        let r = rag(&m);
        let n = 61;
        let opt = BlendOptions::new(0.1, 1).unwrap().gradual(0.4, 2).unwrap();
        assert_eq!(
            (opt.kept_at(0, n), opt.kept_at(1, n), opt.kept_at(2, n)),
            (24, 15, 6)
        );
        let (naive, _) = prepare(&r.prefix, &r.refs(), Reuse::Naive).unwrap();
        let (blend, out) = prepare(&r.prefix, &r.refs(), Reuse::Blend(opt)).unwrap();
        let out = out.unwrap();
        let layers = m.config().n_layers;
        let mut want = vec![24, 15];
        want.resize(layers - 1, 6);
        assert_eq!(out.layer_rows, want, "{name}");
        assert_eq!(out.recomputed.len(), 6);
        // The tokens each layer carried: the K/V that differ from naive reuse's on the next layer (check layers write
        // every carried token's fresh K/V, so layer 2 shows the 24 carried out of layer 1, layer 3 the 15 out of 2).
        let changed = |layer: usize| -> Vec<u32> {
            let mut v: Vec<u32> = (0..m.config().n_kv_heads)
                .flat_map(|h| {
                    entries(&blend.cache, layer, h)
                        .into_iter()
                        .zip(entries(&naive.cache, layer, h))
                        .filter(|(b, nv)| b.1 != nv.1 || b.2 != nv.2)
                        .map(|(b, _)| b.0)
                        .collect::<Vec<_>>()
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (l2, l3, last) = (changed(2), changed(3), changed(layers - 1));
        assert_eq!(changed(4), out.recomputed, "{name}");
        assert_eq!((l2.len(), l3.len()), (24, 15), "{name}");
        assert!(l3.iter().all(|p| l2.contains(p)), "{name}: not nested");
        assert_eq!(last, out.recomputed, "{name}");
        assert!(out.recomputed.iter().all(|p| l3.contains(p)), "{name}");
    }
    // Gradual filtering needs a wider first check and a layer to taper over, inside the model.
    let o = BlendOptions::new(0.1, 1).unwrap();
    assert!(o.gradual(0.05, 2).is_err());
    assert!(o.gradual(0.3, 0).is_err());
    assert!(o.gradual(0.1, 2).is_err());
    let (_, m) = models(dir.path()).remove(0);
    let r = rag(&m);
    let mut s = assemble(&r.prefix, &r.refs()).unwrap();
    let e = recompute(&mut s, 6, &o.gradual(0.3, 1).unwrap()).unwrap_err();
    assert!(format!("{e}").contains("past the model"), "{e}");
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
