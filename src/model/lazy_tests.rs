//! LazyLLM on tiny random models: share 1.0 is the dense chunked prefill bit for bit; pruning leaves later layers
//! fewer entries; revival computes the dense entries of the tokens it brings back; bad schedules are clear errors.

use super::*;
use crate::gguf::{GgmlType, Value};
use crate::kv::KvDtype;
use crate::model::testutil::{tiny_gemma3, tiny_llama, TinySpec};

fn spec(n_layers: usize) -> TinySpec {
    TinySpec {
        n_layers,
        weight_type: GgmlType::F32,
        ..TinySpec::default()
    }
}

fn llama(dir: &std::path::Path, n_layers: usize) -> Model {
    let p = dir.join("llama.gguf");
    tiny_llama(&spec(n_layers)).write(&p).unwrap();
    Model::load(&p).unwrap()
}

/// Gemma 3 with a 16-token window on even layers (odd layers global).
fn gemma(dir: &std::path::Path, n_layers: usize) -> Model {
    let p = dir.join("gemma3.gguf");
    let mut w = tiny_gemma3(&spec(n_layers), 16);
    w.set_meta("gemma3.attention.sliding_window_pattern", Value::U32(2));
    w.write(&p).unwrap();
    Model::load(&p).unwrap()
}

fn toks(m: &Model, n: usize, seed: usize) -> Vec<u32> {
    let v = m.config().vocab - 1;
    (0..n)
        .map(|i| ((i * 37 + seed * 11 + 3) % v) as u32 + 1)
        .collect()
}

fn cache(m: &Model) -> KvCache {
    KvCache::new(m.config().kv_config(KvDtype::F16, 8))
}

/// The dense chunked prefill of `tokens` (chunks of `s.cap`), leaving the last token's stream in s.x row 0 as the
/// lazy pass does.
fn dense_prefill(m: &Model, tokens: &[u32], kv: &mut KvCache, s: &mut Scratch) {
    let dim = m.config().dim;
    let mut last = 0;
    for (ci, ch) in tokens.chunks(s.cap).enumerate() {
        let p0 = (ci * s.cap) as u32;
        let pos: Vec<u32> = (p0..p0 + ch.len() as u32).collect();
        m.forward(ch, &pos, kv, s);
        last = ch.len() - 1;
    }
    s.x.copy_within(last * dim..(last + 1) * dim, 0);
}

fn logits(m: &Model, s: &mut Scratch) -> Vec<f32> {
    m.logits(s, 0..1);
    s.logits[..m.config().vocab].to_vec()
}

/// Every (layer, head) stream as (position → key and value bits), sorted by position.
fn entries(kv: &KvCache, layer: usize, head: usize) -> Vec<(u32, Vec<f32>)> {
    let c = &kv.cfg;
    let (mut k, mut v) = (vec![0f32; c.head_dim_k], vec![0f32; c.head_dim_v]);
    let mut out: Vec<(u32, Vec<f32>)> = (0..kv.len(layer, head))
        .map(|i| {
            let p = kv.read(layer, head, i, &mut k, &mut v);
            (p, k.iter().chain(&v).copied().collect())
        })
        .collect();
    out.sort_by_key(|e| e.0);
    out
}

fn plan(stages: &[(usize, f32)], revive_every: usize) -> LazyPlan {
    LazyPlan {
        stages: stages
            .iter()
            .map(|&(layer, keep)| Stage { layer, keep })
            .collect(),
        revive_every,
    }
}

#[test]
fn share_one_equals_the_dense_chunked_prefill_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for (m, stages) in [
        (llama(dir.path(), 4), vec![(2, 1.0), (3, 1.0)]),
        (gemma(dir.path(), 4), vec![(2, 1.0)]),
    ] {
        let c = m.config();
        let t = toks(&m, 45, 1); // three chunks of 16, the last partial; past the 16-token window
        let (mut kd, mut sd) = (cache(&m), Scratch::new(c, 16, 1));
        dense_prefill(&m, &t, &mut kd, &mut sd);
        let (mut kl, mut sl) = (cache(&m), Scratch::new(c, 16, 1));
        let p = plan(&stages, 1);
        p.check(c).unwrap();
        let mut lz = LazyState::new(p);
        lz.prefill(&m, &t, 0, &mut kl, &mut sl);
        assert_eq!(lz.aux_bytes(), 0);
        for l in 0..c.n_layers {
            for h in 0..c.n_kv_heads {
                assert_eq!(
                    entries(&kd, l, h),
                    entries(&kl, l, h),
                    "{} layer {l}",
                    c.name
                );
            }
        }
        assert_eq!(logits(&m, &mut sd), logits(&m, &mut sl), "{}", c.name);
    }
}

#[test]
fn pruned_tokens_have_no_later_entries_and_bytes_fall() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 4);
    let c = m.config();
    let n = 64;
    let t = toks(&m, n, 2);
    let (mut kd, mut sd) = (cache(&m), Scratch::new(c, 16, 1));
    dense_prefill(&m, &t, &mut kd, &mut sd);
    let (mut kl, mut sl) = (cache(&m), Scratch::new(c, 16, 1));
    let mut lz = LazyState::new(plan(&[(1, 0.5), (3, 0.25)], 0));
    lz.prefill(&m, &t, 0, &mut kl, &mut sl);
    let want = [n, n / 2, n / 2, n / 4];
    for (l, &w) in want.iter().enumerate() {
        for h in 0..c.n_kv_heads {
            let e = entries(&kl, l, h);
            assert_eq!(e.len(), w, "layer {l}");
            assert_eq!(
                e.last().map(|x| x.0),
                Some(n as u32 - 1),
                "the last token is kept"
            );
        }
    }
    // Entries of layers before the first stage are the dense ones (the same rows computed the same way).
    assert_eq!(entries(&kd, 0, 0), entries(&kl, 0, 0));
    assert!(kl.bytes() < kd.bytes(), "{} vs {}", kl.bytes(), kd.bytes());
    assert_eq!(lz.aux_tokens(), vec![n / 2, n / 4]);
    assert_eq!(lz.aux_bytes(), 4 * (c.dim + 1) * (n / 2 + n / 4));
    assert_eq!(lz.counts.skipped, 2 * (n / 2) + 3 * n / 4);
    // Kept tokens at the later stage are a subset of those kept at the earlier one.
    let l1: Vec<u32> = entries(&kl, 1, 0).iter().map(|e| e.0).collect();
    assert!(entries(&kl, 3, 0).iter().all(|e| l1.contains(&e.0)));
    // Without revival a decode step is the ordinary one: it appends one entry everywhere, the aux cache stays.
    lz.decode(&m, t[0], n as u32, &mut kl, &mut sl);
    assert_eq!(kl.len(3, 0), n / 4 + 1);
    assert_eq!(lz.aux_tokens(), vec![n / 2, n / 4]);
    assert_eq!(lz.counts.revived, 0);
}

#[test]
fn revival_computes_the_dense_entries_of_the_tokens_it_brings_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 4);
    let c = m.config();
    let n = 24;
    let t = toks(&m, n, 3);
    let next = t[5];
    let (mut kd, mut sd) = (cache(&m), Scratch::new(c, 16, 1));
    dense_prefill(&m, &t, &mut kd, &mut sd);
    m.forward(&[next], &[n as u32], &mut kd, &mut sd);

    let (mut kl, mut sl) = (cache(&m), Scratch::new(c, 16, 1));
    let mut lz = LazyState::new(plan(&[(2, 0.5)], 1));
    lz.prefill(&m, &t, 0, &mut kl, &mut sl);
    assert_eq!(kl.len(3, 0), n / 2);
    let kept: Vec<u32> = entries(&kl, 3, 0).iter().map(|e| e.0).collect();
    // The decode step selects every token (share 1.0): the 12 pruned ones fit one tile beside the new token, so all
    // come back at once and each finds every token before it present at layer 2 with its dense entry (nothing was
    // pruned before layer 2), as in the dense pass. The kept tokens' layer-3 entries are not dense (they attended
    // at layer 2 without the pruned tokens), so layer 3 is compared for the revived tokens and the new one.
    lz.plan = Some(plan(&[(2, 1.0)], 1));
    lz.decode(&m, next, n as u32, &mut kl, &mut sl);
    assert_eq!(lz.counts.revived, n / 2);
    assert_eq!(lz.aux_bytes(), 0);
    let tol = 2e-3;
    let mut compared = 0;
    for l in 0..c.n_layers {
        for h in 0..c.n_kv_heads {
            let (d, z) = (entries(&kd, l, h), entries(&kl, l, h));
            assert_eq!(
                d.len(),
                z.len(),
                "layer {l}: every token has its entry again"
            );
            for ((pd, ed), (pz, ez)) in d.iter().zip(&z) {
                assert_eq!(pd, pz);
                if l == 3 && kept.contains(pd) {
                    continue;
                }
                let err = ed
                    .iter()
                    .zip(ez)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let scale = ed.iter().map(|a| a.abs()).fold(1f32, f32::max);
                assert!(
                    err <= tol * scale,
                    "layer {l} head {h} pos {pd}: off by {err}"
                );
                compared += (l >= 2 && !kept.contains(pd)) as usize;
            }
        }
    }
    assert_eq!(compared, 2 * c.n_kv_heads * (n / 2 + 1));
    // Revived entries came after newer ones: truncation still finds every entry past the cut.
    truncate(&mut kl, 10).unwrap();
    lz.truncate_pos(10, c.dim);
    for l in 0..c.n_layers {
        assert_eq!(kl.len(l, 0), 10, "layer {l}");
        assert!(entries(&kl, l, 0).iter().all(|e| e.0 < 10));
    }
}

#[test]
fn revival_rule_brings_back_only_selected_tokens_and_sends_others_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 4);
    let c = m.config();
    let n = 48;
    let t = toks(&m, n, 4);
    let (mut kl, mut sl) = (cache(&m), Scratch::new(c, 16, 1));
    let mut lz = LazyState::new(plan(&[(1, 0.5), (3, 0.25)], 2));
    lz.prefill(&m, &t, 0, &mut kl, &mut sl);
    let before: usize = lz.aux_tokens().iter().sum();
    for (i, &tok) in t.iter().enumerate().take(4) {
        let revived = lz.counts.revived;
        let held_before: Vec<usize> = (0..c.n_layers).map(|l| kl.len(l, 0)).collect();
        lz.decode(&m, tok, (n + i) as u32, &mut kl, &mut sl);
        let added: usize = (0..c.n_layers).map(|l| kl.len(l, 0) - held_before[l]).sum();
        // Every layer gains the new token; revived tokens add entries only at layers they had none.
        assert!(added >= c.n_layers);
        if i % 2 == 1 {
            assert_eq!(
                added, c.n_layers,
                "step {i}: no revival between revival steps"
            );
            assert_eq!(lz.counts.revived, revived);
        } else {
            assert!(
                lz.counts.revived > revived,
                "step {i}: some pruned token is selected again"
            );
            assert!(
                added > c.n_layers,
                "step {i}: revived tokens add their missing entries"
            );
        }
    }
    let after: usize = lz.aux_tokens().iter().sum();
    // A token revived at stage 1 either stays in the pass past stage 2 or goes into its aux cache: the aux total
    // never grows, and entries are never duplicated.
    assert!(after <= before);
    for l in 0..c.n_layers {
        let e = entries(&kl, l, 0);
        assert!(
            e.windows(2).all(|w| w[0].0 < w[1].0),
            "layer {l}: one entry per token"
        );
    }
    assert!(sl.x[..c.dim].iter().all(|x| x.is_finite()));
}

#[test]
fn bad_schedules_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 4);
    let c = m.config();
    let err = |st: &[(usize, f32)]| format!("{:#}", plan(st, 1).check(c).unwrap_err());
    assert!(err(&[(2, 1.5)]).contains("keep share 1.5"));
    assert!(err(&[(2, 0.0)]).contains("(0, 1]"));
    assert!(err(&[(4, 0.5)]).contains("out of range"));
    assert!(err(&[(0, 0.5)]).contains("out of range"));
    assert!(err(&[(3, 0.5), (2, 0.4)]).contains("must ascend"));
    assert!(err(&[(1, 0.4), (2, 0.5)]).contains("must not grow"));
    plan(&[(1, 0.5), (3, 0.2)], 1).check(c).unwrap();
    // Gemma 3: a stage right after a sliding-window layer reads importance at the global layer before it; two
    // stages with only a window layer between... the second reads before the first.
    let g = gemma(dir.path(), 6);
    let gc = g.config();
    plan(&[(2, 0.5), (4, 0.3)], 0).check(gc).unwrap();
    assert!(format!(
        "{:#}",
        plan(&[(2, 0.5), (3, 0.3)], 0).check(gc).unwrap_err()
    )
    .contains("before the previous stage"));
    assert!(format!("{:#}", plan(&[(1, 0.5)], 0).check(gc).unwrap_err())
        .contains("no global-attention layer"));
}

#[test]
fn default_stages_follow_global_layers() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 30);
    let st = LazyPlan::default_stages(m.config());
    let layers: Vec<usize> = st.iter().map(|s| s.layer).collect();
    assert_eq!(layers, vec![8, 15, 23]);
    plan(&[], 0).check(m.config()).unwrap();
    let g = gemma(dir.path(), 8);
    let gs = LazyPlan::default_stages(g.config());
    assert!(!gs.is_empty());
    for s in &gs {
        assert!(g.config().layer_window(s.layer - 1).is_none(), "{s:?}");
    }
    LazyPlan {
        stages: gs,
        revive_every: 0,
    }
    .check(g.config())
    .unwrap();
}

/// The importance scores (`score_last`, a block of keys at a time) equal the last query's attention computed entry by
/// entry (its key read alone, a dot product, a softmax per query head, the mean over heads), on an f16 cache (whole
/// blocks converted at once) and an f32 one (key by key), with a partial last block and entries past the query's
/// position masked.
#[test]
fn importance_equals_the_last_querys_attention_entry_by_entry() {
    let dir = tempfile::tempdir().unwrap();
    let m = llama(dir.path(), 2);
    let c = m.config();
    let (n, l, qpos) = (37, 1, 30u32);
    let t = toks(&m, n, 5);
    let pos: Vec<u32> = (0..n as u32).collect();
    for dtype in [KvDtype::F16, KvDtype::F32] {
        let mut kv = KvCache::new(c.kv_config(dtype, 8));
        let mut s = Scratch::new(c, 64, 1);
        m.forward(&t, &pos, &mut kv, &mut s);
        let mut p = pos.clone();
        p[n - 1] = qpos;
        let mut lz = LazyState {
            p,
            ..Default::default()
        };
        lz.score_last(&m, l, &kv, &s, n);
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim_k);
        let q = &s.q[(n - 1) * nh * hd..n * nh * hd];
        let len = kv.len(l, 0);
        let mut want = vec![0f32; len];
        let (mut k, mut v) = (vec![0f32; hd], vec![0f32; c.head_dim_v]);
        for g in 0..nkv {
            let keys: Vec<(u32, Vec<f32>)> = (0..len)
                .map(|e| (kv.read(l, g, e, &mut k, &mut v), k.clone()))
                .collect();
            assert_eq!(lz.entry_pos, keys.iter().map(|e| e.0).collect::<Vec<_>>());
            for h in 0..nh / nkv {
                let qh = &q[(g * nh / nkv + h) * hd..][..hd];
                let z: Vec<f32> = keys
                    .iter()
                    .map(|(p, key)| {
                        let d: f32 = qh.iter().zip(key).map(|(a, b)| a * b).sum();
                        if *p <= qpos {
                            d * c.attn_scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = z.iter().map(|x| (x - mx).exp()).sum();
                for (w, x) in want.iter_mut().zip(&z) {
                    *w += (x - mx).exp() / sum / nh as f32;
                }
            }
        }
        assert!(want[qpos as usize + 1..].iter().all(|&w| w == 0.0));
        assert!(want.iter().any(|&w| w > 0.0));
        for (e, (a, b)) in lz.entry_score.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.max(1e-3),
                "{dtype:?} entry {e}: {a} vs {b}"
            );
        }
    }
}
