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
