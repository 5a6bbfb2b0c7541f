//! SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024).
//!
//! Mechanism: the last `window` queries of the prompt (the "observation window", which holds the question when the
//! prompt ends with one) already attend to the entries generation will need. Each entry's score is the attention it
//! receives from the window's queries, averaged over those queries and over the query heads sharing the KV head (GQA),
//! then smoothed by a 1-D average pool along positions so that neighbours of a hit survive with it. The window's own
//! entries are always kept.
//!
//! Defaults (paper and kvpress): window 64, pooling kernel 5 (zero-padded at both ends, divisor always 5).
//! Attention is the model's own softmax over the entries each query can see (causal; sliding window on local layers).

use super::obs::attn_row;
use super::{HeadObs, Needs, Scorer};

/// Observation window (queries).
pub const WINDOW: usize = 64;
/// Average-pooling kernel.
pub const KERNEL: usize = 5;

pub struct SnapKv {
    pub window: usize,
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self {
            window: WINDOW,
            kernel: KERNEL,
        }
    }
}

impl Scorer for SnapKv {
    fn needs(&self) -> Needs {
        Needs {
            window: self.window,
            ..Needs::default()
        }
    }

    fn score(&self, obs: &HeadObs, tmp: &mut Vec<f32>, out: &mut [f32]) {
        let n = obs.len();
        let nq = obs.n_queries();
        window_attention(obs, 0..nq, tmp);
        // Entries at or after the first window query are the window itself.
        let first = obs.q_pos.first().copied().unwrap_or(u32::MAX);
        let m = obs.pos.partition_point(|&p| p < first);
        let (sum, _) = tmp.split_at(n);
        let half = self.kernel / 2;
        let norm = 1.0 / (self.kernel * nq.max(1) * obs.group) as f32;
        for (i, o) in out[..m].iter_mut().enumerate() {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(m));
            *o = sum[lo..hi].iter().sum::<f32>() * norm;
        }
        out[m..n].iter_mut().for_each(|o| *o = f32::INFINITY);
    }
}

/// `tmp[..n]` ← attention every entry receives, summed over query rows `rows` and the group's query heads;
/// `tmp[n..2n]` is scratch.
pub fn window_attention(obs: &HeadObs, rows: std::ops::Range<usize>, tmp: &mut Vec<f32>) {
    let n = obs.len();
    tmp.clear();
    tmp.resize(2 * n, 0.0);
    let (sum, p) = tmp.split_at_mut(n);
    for r in rows {
        for g in 0..obs.group {
            attn_row(
                obs.query(r, g),
                obs.q_pos[r],
                obs.keys,
                obs.pos,
                obs.hk,
                obs.scale,
                obs.window,
                p,
            );
            for (s, x) in sum.iter_mut().zip(p.iter()) {
                *s += x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(
        keys: &'a [f32],
        pos: &'a [u32],
        q: &'a [f32],
        q_pos: &'a [u32],
        window: Option<u32>,
    ) -> HeadObs<'a> {
        HeadObs {
            queries: q,
            q_pos,
            group: 2,
            scale: 0.5,
            window,
            keep: 4,
            ..HeadObs::single(keys, 2, pos)
        }
    }

    #[test]
    fn scores_are_pooled_window_attention_and_the_window_stays() {
        // 20 entries; entry 5 stands out for query head 0, entry 9 for query head 1.
        let n = 20;
        let mut keys = vec![0.1f32; 2 * n];
        keys[10] = 8.0;
        keys[19] = 6.0;
        let pos: Vec<u32> = (0..n as u32).collect();
        // 4 window queries (positions 16..20), 2 query heads each: head 0 = [1, 0], head 1 = [0, 1].
        let q: Vec<f32> = (0..4).flat_map(|_| [1.0, 0.0, 0.0, 1.0]).collect();
        let q_pos = [16, 17, 18, 19];
        let o = obs(&keys, &pos, &q, &q_pos, None);
        let mut out = vec![0.0; n];
        SnapKv::default().score(&o, &mut Vec::new(), &mut out);
        // Reference: plain softmax per (query, head) over the keys it can see, summed, pooled, averaged.
        let mut sum = vec![0.0f64; n];
        for &qp in &q_pos {
            for g in 0..2 {
                let s: Vec<f64> = (0..=qp as usize)
                    .map(|j| 0.5 * keys[2 * j + g] as f64)
                    .collect();
                let z: f64 = s.iter().map(|x| x.exp()).sum();
                for (j, x) in s.iter().enumerate() {
                    sum[j] += x.exp() / z;
                }
            }
        }
        for (i, &got) in out[..16].iter().enumerate() {
            let pooled: f64 = (i.saturating_sub(2)..(i + 3).min(16)).map(|j| sum[j]).sum();
            let want = pooled / (5.0 * 4.0 * 2.0);
            assert!(
                (got as f64 - want).abs() < 1e-6,
                "entry {i}: {got} vs {want}"
            );
        }
        assert!(out[16..].iter().all(|x| *x == f32::INFINITY));
        // Pooling lifts the neighbours of both hits above everything else outside the window.
        let low = out[..16]
            .iter()
            .enumerate()
            .filter(|(i, _)| !(3..=11).contains(i))
            .map(|(_, x)| *x);
        assert!(out[3..=11].iter().all(|&x| low.clone().all(|y| x > y)));
        // On a sliding-window layer (window 3) the window queries cannot see entries 5 and 9 at all.
        let o = obs(&keys, &pos, &q, &q_pos, Some(3));
        SnapKv::default().score(&o, &mut Vec::new(), &mut out);
        assert!(
            out[..12].iter().all(|&x| x == 0.0) && out[12] > 0.0,
            "{out:?}"
        );
    }
}
