//! Retrieval-head detection, training-free (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
//! Factuality", 2024): the copy-paste criterion.
//!
//! On needle-in-a-haystack instances decoded greedily, at every decode step and for every (layer, query head), take the
//! cached key with the highest q·k for the current query (top-1 of q·k is top-1 of the softmax). If that key lies inside
//! the needle span and the prompt token there equals the token the model just generated, the head "copied" it: add
//! 1/len(needle) to the head's score for this instance. An instance counts only if the answer recovered the needle
//! (ROUGE-1 recall > 0.5); a head's score is the mean over counted instances. The paper calls heads scoring > 0.1
//! retrieval heads. With GQA, a KV head's score is the max over its query heads (what a KV-cache policy can act on).

use serde::{Deserialize, Serialize};

use crate::kv::KvCache;

/// Copy-paste tallies of one instance, per (layer, query head).
pub struct InstanceTally {
    n_q_heads: usize,
    group: usize,
    hits: Vec<f64>,
    /// Needle span in positions, `start..end`, and the prompt tokens (position = index).
    span: std::ops::Range<usize>,
    prompt: Vec<u32>,
}

impl InstanceTally {
    pub fn new(
        n_layers: usize,
        n_q_heads: usize,
        n_kv_heads: usize,
        prompt: &[u32],
        span: std::ops::Range<usize>,
    ) -> Self {
        Self {
            n_q_heads,
            group: n_q_heads / n_kv_heads.max(1),
            hits: vec![0.0; n_layers * n_q_heads],
            span,
            prompt: prompt.to_vec(),
        }
    }

    /// One decode step of one layer: `q` holds this step's query (n_q_heads × head_dim, after RoPE) and `generated` is
    /// the token the model produced from it. Scans every cached key of each head's KV stream for the top q·k.
    pub fn observe(&mut self, cache: &KvCache, layer: usize, q: &[f32], generated: u32) {
        let hd = cache.cfg.head_dim_k;
        let mut key = vec![0.0f32; hd];
        let weight = 1.0 / self.span.len().max(1) as f64;
        for h in 0..self.n_q_heads {
            let qh = &q[h * hd..(h + 1) * hd];
            let kv_head = h / self.group;
            let (mut best, mut best_pos) = (f32::NEG_INFINITY, u32::MAX);
            for b in cache.blocks(layer, kv_head) {
                for slot in 0..b.n {
                    b.read_key(slot, &mut key);
                    let s: f32 = qh.iter().zip(&key).map(|(a, k)| a * k).sum();
                    if s > best {
                        best = s;
                        best_pos = b.pos[slot];
                    }
                }
            }
            let p = best_pos as usize;
            if self.span.contains(&p) && self.prompt.get(p) == Some(&generated) {
                self.hits[layer * self.n_q_heads + h] += weight;
            }
        }
    }
}

/// Scores over many instances.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadScores {
    pub model: String,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Instances run and instances counted (needle recovered).
    pub instances: usize,
    pub counted: usize,
    /// Mean copy-paste score per layer × query head.
    pub q_scores: Vec<Vec<f64>>,
    /// Per layer × KV head: max over the query heads of its group. This is what `--kv duo` reads.
    pub scores: Vec<Vec<f64>>,
    /// Heads scoring above `threshold`, as [layer, kv_head].
    pub threshold: f64,
    pub retrieval_heads: Vec<[usize; 2]>,
}

/// Accumulates instance tallies into mean scores.
pub struct HeadScorer {
    n_layers: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    sum: Vec<f64>,
    instances: usize,
    counted: usize,
}

impl HeadScorer {
    pub fn new(n_layers: usize, n_q_heads: usize, n_kv_heads: usize) -> Self {
        Self {
            n_layers,
            n_q_heads,
            n_kv_heads,
            sum: vec![0.0; n_layers * n_q_heads],
            instances: 0,
            counted: 0,
        }
    }

    /// Adds an instance; it counts only if the answer recovered the needle (ROUGE-1 recall > 0.5).
    pub fn add(&mut self, t: &InstanceTally, recall: f64) -> bool {
        self.instances += 1;
        if recall <= 0.5 {
            return false;
        }
        self.counted += 1;
        for (s, h) in self.sum.iter_mut().zip(&t.hits) {
            *s += h;
        }
        true
    }

    pub fn finish(&self, model: &str, threshold: f64) -> HeadScores {
        let n = self.counted.max(1) as f64;
        let group = self.n_q_heads / self.n_kv_heads.max(1);
        let q_scores: Vec<Vec<f64>> = (0..self.n_layers)
            .map(|l| {
                (0..self.n_q_heads)
                    .map(|h| self.sum[l * self.n_q_heads + h] / n)
                    .collect()
            })
            .collect();
        let scores: Vec<Vec<f64>> = q_scores
            .iter()
            .map(|row| {
                (0..self.n_kv_heads)
                    .map(|k| {
                        row[k * group..(k + 1) * group]
                            .iter()
                            .copied()
                            .fold(0.0, f64::max)
                    })
                    .collect()
            })
            .collect();
        let mut retrieval_heads = Vec::new();
        for (l, row) in scores.iter().enumerate() {
            for (k, &s) in row.iter().enumerate() {
                if s > threshold {
                    retrieval_heads.push([l, k]);
                }
            }
        }
        HeadScores {
            model: model.to_string(),
            layers: self.n_layers,
            q_heads: self.n_q_heads,
            kv_heads: self.n_kv_heads,
            instances: self.instances,
            counted: self.counted,
            q_scores,
            scores,
            threshold,
            retrieval_heads,
        }
    }
}

/// ROUGE-1 recall of `answer` against `reference`: share of the reference's words (lower-cased, split on anything not
/// alphanumeric, counted with multiplicity) found in the answer.
pub fn rouge1_recall(answer: &str, reference: &str) -> f64 {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let refw = words(reference);
    if refw.is_empty() {
        return 0.0;
    }
    let mut ans = words(answer);
    let mut hit = 0;
    for w in &refw {
        if let Some(i) = ans.iter().position(|a| a == w) {
            ans.swap_remove(i);
            hit += 1;
        }
    }
    hit as f64 / refw.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvDtype};

    #[test]
    fn a_head_whose_top_key_is_the_copied_needle_token_scores() {
        // One layer, 2 query heads sharing 1 KV head, head_dim 2. Keys: position p has key (p, 1) except the needle.
        let cfg = KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: 2,
            head_dim_v: 1,
            block_tokens: 4,
            dtype: KvDtype::F32,
            windows: Vec::new(),
        };
        let mut c = KvCache::new(cfg);
        let n = 10;
        let pos: Vec<u32> = (0..n as u32).collect();
        let mut k = vec![0.0f32; n * 2];
        for p in 0..n {
            k[p * 2] = if p == 6 { 100.0 } else { p as f32 };
            k[p * 2 + 1] = 1.0;
        }
        c.append(0, &pos, &k, &vec![0.0; n]);
        let prompt: Vec<u32> = (100..110).collect();
        let mut t = InstanceTally::new(1, 2, 1, &prompt, 5..8);
        // Head 0 looks along +x (top key: position 6, the needle); head 1 along −x (top key: position 0).
        let q = [1.0, 0.0, -1.0, 0.0];
        t.observe(&c, 0, &q, 106); // generated the needle token at position 6: head 0 copies
        t.observe(&c, 0, &q, 999); // a token that is not there: nobody copies
        assert_eq!(t.hits, vec![1.0 / 3.0, 0.0]);
        let mut s = HeadScorer::new(1, 2, 1);
        assert!(s.add(&t, 1.0));
        assert!(!s.add(&t, 0.5), "recall 0.5 is not > 0.5");
        let r = s.finish("m", 0.1);
        assert_eq!(r.counted, 1);
        assert_eq!(r.scores, vec![vec![1.0 / 3.0]]);
        assert_eq!(r.retrieval_heads, vec![[0, 0]]);
    }

    #[test]
    fn rouge1_recall_counts_reference_words() {
        assert_eq!(
            rouge1_recall("eat a sandwich", "Eat a sandwich in the park"),
            0.5
        );
        assert_eq!(rouge1_recall("", "x"), 0.0);
        assert_eq!(rouge1_recall("the the", "the the the"), 2.0 / 3.0);
    }
}
