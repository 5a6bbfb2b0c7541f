//! Chunked prefill through attention equals one pass.

use super::*;
use crate::kv::{KvConfig, KvDtype};
use crate::testutil::Rng;

/// attend() on `q_pos` split into chunks of `chunk` tokens, each attending to the whole cache (masked by position)
/// or, `incremental`, to a cache grown chunk by chunk as chunked prefill does: the outputs, and their max |Δ| from
/// the f64 reference over max |want|.
#[allow(clippy::too_many_arguments)] // the cache's contents, the queries and the chunking
fn rel_err_in_chunks(
    full: &KvCache,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    q_pos: &[u32],
    p: &AttnParams,
    chunk: usize,
    incremental: bool,
) -> (Vec<f32>, f32) {
    let (hk, hv, nq) = (full.cfg.head_dim_k, full.cfg.head_dim_v, p.n_q_heads);
    let nkv = full.cfg.n_kv_heads;
    let want = naive_attention(full, 0, q, q_pos, p);
    let mut grown = KvCache::new(full.cfg.clone());
    let scale = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    let mut scratch = AttnScratch::default();
    let mut err = 0.0f32;
    let mut all = Vec::with_capacity(want.len());
    for t0 in (0..q_pos.len()).step_by(chunk) {
        let t1 = (t0 + chunk).min(q_pos.len());
        let mut out = vec![0.0; (t1 - t0) * nq * hv];
        let qc = &q[t0 * nq * hk..t1 * nq * hk];
        let cache = if incremental {
            // Chunked prefill: the cache holds only the tokens up to this chunk's last one.
            grown.append(
                0,
                &q_pos[t0..t1],
                &k[t0 * nkv * hk..t1 * nkv * hk],
                &v[t0 * nkv * hv..t1 * nkv * hv],
            );
            &grown
        } else {
            full
        };
        attend(cache, 0, qc, &q_pos[t0..t1], &mut out, p, &mut scratch);
        let w = &want[t0 * nq * hv..t1 * nq * hv];
        err = out
            .iter()
            .zip(w)
            .fold(err, |e, (a, b)| e.max((a - b).abs()));
        all.extend_from_slice(&out);
    }
    (all, err / scale)
}

/// The same query rows give the same output, bit for bit, however the queries are chunked and tiled: one
/// call, chunks of 7 and single tokens, for head dims 16 and 64, GQA 2, several block sizes and positions.
#[test]
fn chunked_queries_match_naive_tightly() {
    for &(hd, bt, len, window) in &[
        (16, 32, 75, None),
        (16, 16, 75, None),
        (64, 32, 75, None),
        (64, 64, 140, None),
        (16, 32, 90, Some(20)),
        (64, 16, 60, Some(9)),
    ] {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut rng = Rng(0xC0FFEE ^ (hd * 1000 + bt * 7 + len) as u64);
            let (n_kv, n_q) = (2, 4);
            let cfg = KvConfig {
                n_layers: 1,
                n_kv_heads: n_kv,
                head_dim_k: hd,
                head_dim_v: hd,
                block_tokens: bt,
                dtype,
                windows: Vec::new(),
            };
            let mut cache = KvCache::new(cfg);
            let pos: Vec<u32> = (0..len as u32).collect();
            let k = rng.vec(len * n_kv * hd, 3.0);
            let v = rng.vec(len * n_kv * hd, 1.0);
            cache.append(0, &pos, &k, &v);
            let q = rng.vec(len * n_q * hd, 3.0);
            let p = AttnParams {
                n_q_heads: n_q,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                softcap: None,
            };
            let (one_shot, _) = rel_err_in_chunks(&cache, &k, &v, &q, &pos, &p, len, false);
            for chunk in [len, 16, 8, 7, 1] {
                for incremental in [false, true] {
                    let what = format!(
                        "hd {hd} bt {bt} len {len} window {window:?} {dtype:?} chunk {chunk} \
                         incremental {incremental}"
                    );
                    let (out, e) =
                        rel_err_in_chunks(&cache, &k, &v, &q, &pos, &p, chunk, incremental);
                    assert!(e < 1e-5, "{what}: relative error {e} from the reference");
                    // Chunks of a multiple of 8 tokens over a cache of at most 4 blocks (one task per tile, so
                    // no split merges): a row's output must not depend on whether its last block was full
                    // (masked) or partial, bit for bit; the model's chunked prefill ≡ one-shot rests on it.
                    if !(incremental && chunk % 8 == 0 && len.div_ceil(bt) <= 4) {
                        continue;
                    }
                    let diff = out.iter().zip(&one_shot).filter(|(a, b)| a != b).count();
                    assert_eq!(diff, 0, "{what}: {diff} outputs differ from one-shot");
                }
            }
        }
    }
}
