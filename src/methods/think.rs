//! ThinK (Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", 2024): drop the key channels that contribute
//! least to q·k, per KV head, chosen from the most recent queries.
//!
//! Mechanism: over an observation window of the last W queries of every query head that shares the KV head (W·g rows),
//! channel c's part of q·k, Σ q_c·k_c, is bounded by ‖Q_c‖₂·‖K_c‖₂ (Cauchy–Schwarz over the columns of the window's
//! queries Q and the cached keys K). Score each channel by that product and keep the highest-scoring
//! `head_dim − ⌊head_dim · λ⌋` channels; queries drop the same channels at attention time. Only keys are pruned (the
//! paper's main setting); values keep every channel.
//!
//! Defaults: pruning ratio λ = 0.4 (the paper's headline setting, 40 % of key channels dropped; 0.5 also reported),
//! window W = 32 (kvpress's ThinKPress). kvpress scores mean(q_c²) · mean(k_c²), the square of our product divided by
//! constants, so both rank channels identically. kvpress only zeroes the pruned channels; here
//! [`crate::kv::KvCache::prune_key_channels`] stores the kept ones compactly, so the memory is really freed.

use crate::kv::KvCache;

/// Share of key channels pruned (λ).
pub const DEFAULT_PRUNE_RATIO: f64 = 0.4;
/// Queries in the observation window.
pub const DEFAULT_WINDOW: usize = 32;

/// Per-channel importance ‖Q_c‖₂ · ‖K_c‖₂. `queries`: rows × `hd` (the window's queries of the KV head's group, any
/// order); `keys`: rows × `hd` (the head's cached keys).
pub fn channel_scores(queries: &[f32], keys: &[f32], hd: usize) -> Vec<f32> {
    let mut q2 = vec![0.0f64; hd];
    let mut k2 = vec![0.0f64; hd];
    for row in queries.chunks_exact(hd) {
        for (a, &x) in q2.iter_mut().zip(row) {
            *a += x as f64 * x as f64;
        }
    }
    for row in keys.chunks_exact(hd) {
        for (a, &x) in k2.iter_mut().zip(row) {
            *a += x as f64 * x as f64;
        }
    }
    q2.iter()
        .zip(&k2)
        .map(|(q, k)| (q * k).sqrt() as f32)
        .collect()
}

/// The same scores with the keys read from (layer, KV head)'s stream (channels pruned earlier score 0).
pub fn stream_channel_scores(
    cache: &KvCache,
    layer: usize,
    head: usize,
    queries: &[f32],
) -> Vec<f32> {
    let hd = cache.cfg.head_dim_k;
    let mut k2 = vec![0.0f64; hd];
    let mut key = vec![0.0f32; hd];
    for blk in cache.blocks(layer, head) {
        for j in 0..blk.n {
            blk.read_key(j, &mut key);
            for (a, &x) in k2.iter_mut().zip(&key) {
                *a += x as f64 * x as f64;
            }
        }
    }
    let mut q2 = vec![0.0f64; hd];
    for row in queries.chunks_exact(hd) {
        for (a, &x) in q2.iter_mut().zip(row) {
            *a += x as f64 * x as f64;
        }
    }
    q2.iter()
        .zip(&k2)
        .map(|(q, k)| (q * k).sqrt() as f32)
        .collect()
}

/// Which channels to keep when pruning `ratio` of them (λ in [0, 1)): the `len − ⌊len · λ⌋` highest scores, ties
/// going to the lower channel index.
pub fn keep_set(scores: &[f32], ratio: f64) -> Vec<bool> {
    let hd = scores.len();
    let n_keep = hd - ((hd as f64 * ratio.clamp(0.0, 1.0)).floor() as usize).min(hd);
    let mut order: Vec<usize> = (0..hd).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep = vec![false; hd];
    for &c in &order[..n_keep] {
        keep[c] = true;
    }
    keep
}

/// Parses the `think@<ratio>` argument: the share of key channels to prune, in [0, 1).
pub fn parse_ratio(a: &str) -> anyhow::Result<f64> {
    match a.parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => anyhow::bail!(
            "think@{a}: expected the share of key channels to prune, in [0, 1), e.g. think@0.4"
        ),
    }
}

/// Scores (layer, KV head)'s channels against `queries` and prunes the cache's stream to the kept set.
pub fn prune(cache: &mut KvCache, layer: usize, head: usize, queries: &[f32], ratio: f64) {
    let scores = stream_channel_scores(cache, layer, head, queries);
    let keep = keep_set(&scores, ratio);
    cache.prune_key_channels(layer, head, &keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvDtype};

    #[test]
    fn scores_pick_the_channels_that_carry_q_dot_k() {
        // 8 channels. Queries are large on 1, 4, 6; keys large on 1, 2, 6. Channel 2 has big keys but no query weight,
        // channel 4 big queries but tiny keys: only 1 and 6 carry q·k, then 7 (moderate on both).
        let hd = 8;
        let qrow = [0.1f32, 3.0, 0.1, 0.1, 5.0, 0.1, 2.0, 1.0];
        let krow = [0.1f32, 2.0, 9.0, 0.1, 0.01, 0.1, 3.0, 1.0];
        let queries: Vec<f32> = (0..6)
            .flat_map(|i| qrow.map(|x| x * (1.0 + 0.1 * i as f32)))
            .collect();
        let keys: Vec<f32> = (0..20)
            .flat_map(|i| krow.map(|x| if i % 2 == 0 { x } else { -x }))
            .collect();
        let s = channel_scores(&queries, &keys, hd);
        let keep = keep_set(&s, 0.625); // drop 5 of 8
        let kept: Vec<usize> = (0..hd).filter(|&c| keep[c]).collect();
        assert_eq!(kept, vec![1, 6, 7]);
        // λ = 0.4 of 8 drops ⌊3.2⌋ = 3 channels.
        assert_eq!(keep_set(&s, 0.4).iter().filter(|&&k| k).count(), 5);
        assert!(keep_set(&s, 0.0).iter().all(|&k| k));

        // The stream version reads the same keys out of a cache and agrees; pruning frees the channels.
        let mut cache = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: hd,
            head_dim_v: 4,
            block_tokens: 8,
            dtype: KvDtype::F32,
            windows: Vec::new(),
        });
        let pos: Vec<u32> = (0..20).collect();
        cache.append(0, &pos, &keys, &vec![1.0; 20 * 4]);
        let s2 = stream_channel_scores(&cache, 0, 0, &queries);
        for (a, b) in s.iter().zip(&s2) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0));
        }
        let before = cache.bytes();
        prune(&mut cache, 0, 0, &queries, 0.625);
        assert_eq!(cache.key_channels(0, 0), Some(&[1u16, 6, 7][..]));
        assert_eq!(before - cache.bytes(), 3 * 5 * 8 * 4); // 3 blocks × 5 channels × 8 slots × 4 bytes
    }
}
