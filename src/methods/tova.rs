//! TOVA — Oren et al., "Transformers are Multi-State RNNs" (2024): Token Omission Via Attention.
//!
//! Mechanism: treat the cache as a bounded multi-state RNN; at each compression drop the entries the *current* (last)
//! query attends to least. The paper (and kvpress) average the last query's attention over all heads of a layer and
//! drop the same tokens in every head; here every KV head has its own stream, so the average is over the query heads
//! sharing that KV head, and heads may keep different tokens.
//!
//! Score: the last query's softmax attention, averaged over the group's query heads. No hyper-parameters.

use super::snapkv::window_attention;
use super::{HeadObs, Needs, Scorer};

pub struct Tova;

impl Scorer for Tova {
    fn needs(&self) -> Needs {
        Needs {
            window: 1,
            ..Needs::default()
        }
    }

    fn score(&self, obs: &HeadObs, tmp: &mut Vec<f32>, out: &mut [f32]) {
        let n = obs.len();
        let nq = obs.n_queries();
        window_attention(obs, nq.saturating_sub(1)..nq, tmp);
        let inv = 1.0 / obs.group as f32;
        for (o, s) in out[..n].iter_mut().zip(&tmp[..n]) {
            *o = s * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_query_counts() {
        // Three entries; the last query (position 2) looks at entry 0, an earlier one at entry 1.
        let keys = [4.0, 0.0, 0.0, 4.0, 0.0, 0.0];
        let pos = [0, 1, 2];
        let q = [0.0, 1.0, 1.0, 0.0];
        let q_pos = [1, 2];
        let o = HeadObs {
            queries: &q,
            q_pos: &q_pos,
            keep: 1,
            seen: 3,
            ..HeadObs::single(&keys, 2, &pos)
        };
        let mut out = [0.0; 3];
        Tova.score(&o, &mut Vec::new(), &mut out);
        let z = 4.0f32.exp() + 2.0;
        assert!(
            (out[0] - 4.0f32.exp() / z).abs() < 1e-6 && (out[1] - 1.0 / z).abs() < 1e-6,
            "{out:?}"
        );
    }
}
