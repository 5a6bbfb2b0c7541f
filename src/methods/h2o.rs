//! H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
//! (NeurIPS 2023); SinkLoRA applies it at inference.
//!
//! Mechanism: a few "heavy hitter" tokens receive most of the attention over time. A head keeps the entries with the
//! largest attention accumulated over every query seen since they were cached (summed over the query heads of the
//! group), plus a window of the most recent entries, half and half (the paper's 1:1 heavy:recent split).
//!
//! Score: +∞ for the `keep / 2` most recent entries, else the accumulated attention. The accumulation is maintained by
//! the session ([`super::obs::AttnAcc`]): after every forward chunk it adds the new queries' attention over the
//! current cache, recomputed from the cached keys, and it is compacted with the cache's keep masks.

use super::{HeadObs, Needs, Scorer};

pub struct H2o;

impl Scorer for H2o {
    fn needs(&self) -> Needs {
        Needs {
            accumulate: true,
            ..Needs::default()
        }
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        let n = obs.len();
        debug_assert_eq!(
            obs.acc.len(),
            n,
            "H2O needs accumulated attention for every entry"
        );
        let recent = obs.keep / 2;
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = if i + recent >= n {
                f32::INFINITY
            } else {
                obs.acc.get(i).copied().unwrap_or(0.0)
            };
        }
    }
}
