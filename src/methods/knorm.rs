//! Knorm — Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024).
//!
//! Mechanism: keys with a low L2 norm tend to receive high attention, so a head keeps its lowest-norm keys. No queries
//! or attention are needed: the cheapest baseline.
//!
//! Score: −‖k‖₂. No hyper-parameters.

use super::{HeadObs, Needs, Scorer};

pub struct Knorm;

impl Scorer for Knorm {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        for (i, o) in out[..obs.len()].iter_mut().enumerate() {
            let k = obs.key(i);
            *o = -super::obs::dot(k, k).sqrt();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::press::top_k;

    #[test]
    fn lower_key_norm_scores_higher() {
        // Key norms 5, 1, √2, 0, 2.
        let keys = [3.0, 4.0, 0.0, -1.0, 1.0, 1.0, 0.0, 0.0, -2.0, 0.0];
        let pos = [0, 1, 2, 3, 4];
        let o = HeadObs {
            keep: 2,
            seen: 5,
            ..HeadObs::single(&keys, 2, &pos)
        };
        let mut out = [f32::NAN; 5];
        Knorm.score(&o, &mut Vec::new(), &mut out);
        let want = [-5.0, -1.0, -(2.0f32.sqrt()), 0.0, -2.0];
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-6, "entry {i}: {g} vs {w}");
        }
        // Keeping 2: the zero key and the unit key, not the newest entry.
        let (mut order, mut keep) = (Vec::new(), Vec::new());
        top_k(&out, 2, &mut order, &mut keep);
        assert_eq!(keep, vec![false, true, false, true, false]);
        assert_eq!(Knorm.needs(), Needs::default(), "knorm reads keys only");
    }
}
