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
