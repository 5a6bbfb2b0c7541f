//! AdaKV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
//! Inference" (2024).
//!
//! Mechanism: heads differ in how concentrated their attention is, so a uniform per-head budget wastes entries on
//! heads that need few and starves heads that need many. AdaKV keeps one budget per layer (the sum of its heads'
//! budgets) and fills it by a single top-k over the scores of *all* heads of the layer; a safeguard guarantees each
//! head a floor share `alpha` of its uniform budget (kvpress `alpha_safeguard`, default 0.2).
//!
//! Scores are compared across heads as the scorer gives them; the attention-based ones (SnapKV, the default here; H2O;
//! TOVA) are per-head attention distributions and so already on one scale. Each head then keeps its own top entries,
//! which is exactly the layer-wide selection. Usable as the method `adakv` (SnapKV scores) or the option `,adakv[@alpha]`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use anyhow::{bail, Result};

/// Floor share of each head's uniform budget (kvpress default).
pub const ALPHA: f32 = 0.2;

pub fn parse_alpha(a: &str) -> Result<f32> {
    match a.parse::<f32>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => bail!("adakv@{a}: alpha must be a share in [0, 1] (default {ALPHA})"),
    }
}

/// A candidate entry in the layer-wide selection: its score, head and index.
struct Cand(f32, usize, u32);

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0
            .total_cmp(&o.0)
            .then(self.2.cmp(&o.2))
            .then(o.1.cmp(&self.1))
    }
}

/// Replaces the per-head `targets` of one layer by an adaptive split of their sum: each head first gets
/// floor(alpha · target) of its best entries, the rest of the layer's budget goes to the best remaining entries of any
/// head. `scores[h]` are head h's scores. A head holding fewer entries than its share leaves the rest to the others.
pub fn redistribute(alpha: f32, scores: &[&[f32]], targets: &mut [usize]) {
    // The layer's budget: a head that holds less than its share leaves the rest to the others.
    let total = targets
        .iter()
        .sum::<usize>()
        .min(scores.iter().map(|s| s.len()).sum());
    // Each head's entries, best first (ties to the more recent entry, as the press breaks them).
    let sorted: Vec<Vec<u32>> = scores
        .iter()
        .map(|s| {
            let mut o: Vec<u32> = (0..s.len() as u32).collect();
            o.sort_unstable_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(b.cmp(&a)));
            o
        })
        .collect();
    let mut taken: Vec<usize> = targets
        .iter()
        .zip(scores)
        .map(|(&t, s)| ((alpha * t as f32) as usize).min(s.len()))
        .collect();
    let mut left = total - taken.iter().sum::<usize>();
    let mut heap: BinaryHeap<Cand> = BinaryHeap::new();
    for (h, o) in sorted.iter().enumerate() {
        if let Some(&i) = o.get(taken[h]) {
            heap.push(Cand(scores[h][i as usize], h, i));
        }
    }
    while left > 0 {
        let Some(Cand(_, h, _)) = heap.pop() else {
            break;
        };
        taken[h] += 1;
        left -= 1;
        if let Some(&i) = sorted[h].get(taken[h]) {
            heap.push(Cand(scores[h][i as usize], h, i));
        }
    }
    targets.copy_from_slice(&taken);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_moves_to_the_head_with_the_higher_scores_above_the_floor() {
        let a: Vec<f32> = (0..10).map(|i| 1.0 + i as f32).collect(); // all high
        let b: Vec<f32> = (0..10).map(|i| i as f32 * 0.01).collect(); // all low
        let mut t = [5, 5];
        redistribute(0.2, &[&a, &b], &mut t);
        assert_eq!(t, [9, 1]);
        let mut t = [5, 5];
        redistribute(0.0, &[&a, &b], &mut t);
        assert_eq!(t, [10, 0]);
        let mut t = [5, 5];
        redistribute(1.0, &[&a, &b], &mut t);
        assert_eq!(t, [5, 5]);
        assert!(parse_alpha("1.5").is_err());
    }
}
