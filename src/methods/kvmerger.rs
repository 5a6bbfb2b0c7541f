//! KVMerger — Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"
//! (2024).
//!
//! Mechanism: keys of neighbouring tokens are often nearly identical (high cosine similarity), so instead of dropping
//! an entry, fold it into a similar neighbour that stays. Merging sets are maximal runs of consecutive entries whose
//! adjacent keys have cosine similarity above a threshold. Within a set, the pivot is its most-attended kept entry;
//! every dropped member is merged into the pivot with Gaussian-kernel weights w_i = exp(−‖k_i − k_p‖² / 2σ²) (w_p = 1),
//! applied to keys and values alike: k_p ← Σ w_i k_i / Σ w_i, v_p likewise. The pivot keeps its position.
//!
//! Choices the paper leaves open or we could not check (≈): which entries stay is decided by SnapKV scores at the
//! same budget (so the budget is exact and kept = top-scored, as for eviction; merging only changes what the kept
//! pivots hold); σ² is the mean squared distance of the set's dropped members to the pivot (scale-free); a set with no
//! kept member is dropped. Default threshold 0.8. At a 100 % budget nothing is dropped, so nothing is merged.

use super::obs::HeadBuf;
use super::snapkv::SnapKv;
use super::{HeadObs, Needs, Scorer};

/// Cosine similarity above which adjacent keys join a merging set.
pub const THRESHOLD: f32 = 0.8;

pub struct KvMerger {
    pub threshold: f32,
    pub snap: SnapKv,
}

impl Default for KvMerger {
    fn default() -> Self {
        Self {
            threshold: THRESHOLD,
            snap: SnapKv::default(),
        }
    }
}

impl Scorer for KvMerger {
    fn needs(&self) -> Needs {
        Needs {
            values: true,
            ..self.snap.needs()
        }
    }

    fn score(&self, obs: &HeadObs, tmp: &mut Vec<f32>, out: &mut [f32]) {
        self.snap.score(obs, tmp, out);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    use super::obs::dot;
    let d = (dot(a, a) * dot(b, b)).sqrt();
    if d > 0.0 {
        dot(a, b) / d
    } else {
        0.0
    }
}

impl KvMerger {
    /// Folds the dropped entries of `b` (per `b.keep`) into their sets' pivots, rewriting the pivots' keys and values in
    /// `b.g` and listing them in `b.dirty`.
    pub fn merge(&self, b: &mut HeadBuf, hk: usize, hv: usize) {
        b.dirty.clear();
        let n = b.keep.len();
        let mut start = 0;
        while start < n {
            // The run [start, end): consecutive entries whose adjacent keys are similar.
            let mut end = start + 1;
            while end < n
                && cosine(
                    &b.g.keys[(end - 1) * hk..end * hk],
                    &b.g.keys[end * hk..(end + 1) * hk],
                ) > self.threshold
            {
                end += 1;
            }
            self.merge_run(b, start, end, hk, hv);
            start = end;
        }
    }

    fn merge_run(&self, b: &mut HeadBuf, start: usize, end: usize, hk: usize, hv: usize) {
        let run = start..end;
        let pivot = run
            .clone()
            .filter(|&i| b.keep[i])
            .max_by(|&x, &y| b.scores[x].total_cmp(&b.scores[y]).then(x.cmp(&y)));
        let Some(p) = pivot else { return };
        if run.clone().all(|i| b.keep[i]) {
            return;
        }
        let kp = b.g.keys[p * hk..(p + 1) * hk].to_vec();
        let d2: Vec<(usize, f32)> = run
            .filter(|&i| !b.keep[i])
            .map(|i| {
                let k = &b.g.keys[i * hk..(i + 1) * hk];
                (i, k.iter().zip(&kp).map(|(x, y)| (x - y) * (x - y)).sum())
            })
            .collect();
        let sigma2 = d2.iter().map(|&(_, d)| d).sum::<f32>() / d2.len() as f32;
        let mut k_acc = kp.clone();
        let mut v_acc = b.g.values[p * hv..(p + 1) * hv].to_vec();
        let mut wsum = 1.0f32;
        for &(i, d) in &d2 {
            let w = if sigma2 > 0.0 {
                (-d / (2.0 * sigma2)).exp()
            } else {
                1.0
            };
            wsum += w;
            for (a, x) in k_acc.iter_mut().zip(&b.g.keys[i * hk..(i + 1) * hk]) {
                *a += w * x;
            }
            for (a, x) in v_acc.iter_mut().zip(&b.g.values[i * hv..(i + 1) * hv]) {
                *a += w * x;
            }
        }
        for (dst, a) in b.g.keys[p * hk..(p + 1) * hk].iter_mut().zip(&k_acc) {
            *dst = a / wsum;
        }
        for (dst, a) in b.g.values[p * hv..(p + 1) * hv].iter_mut().zip(&v_acc) {
            *dst = a / wsum;
        }
        b.dirty.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_neighbours_fold_into_the_kept_pivot() {
        let m = KvMerger::default();
        let mut b = HeadBuf::default();
        // Keys: 0 and 1 nearly parallel, 2 orthogonal to them. Keep 1 and 2, drop 0.
        b.g.keys = vec![1.0, 0.1, 1.0, 0.0, 0.0, 1.0];
        b.g.values = vec![10.0, 20.0, 30.0];
        b.keep = vec![false, true, true];
        b.scores = vec![0.1, 0.5, 0.9];
        m.merge(&mut b, 2, 1);
        assert_eq!(b.dirty, vec![1]);
        // One dropped member at distance d: sigma² = d², w = exp(-1/2).
        let w = (-0.5f32).exp();
        assert!((b.g.values[1] - (20.0 + w * 10.0) / (1.0 + w)).abs() < 1e-5);
        assert!((b.g.keys[3] - (w * 0.1) / (1.0 + w)).abs() < 1e-6);
        assert_eq!(b.g.values[2], 30.0);
        // Nothing dropped: nothing merged.
        b.keep = vec![true, true, true];
        m.merge(&mut b, 2, 1);
        assert!(b.dirty.is_empty());
    }
}
