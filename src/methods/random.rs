//! Random eviction: a control. Any method worth its cost must beat it.
//!
//! Score: a uniform number in [0, 1) hashed from (seed, layer, head, position), so runs are reproducible and an entry
//! keeps its score across repeated compressions. Default seed 0.

use super::{HeadObs, Needs, Scorer};

#[derive(Default)]
pub struct Random {
    pub seed: u64,
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Scorer for Random {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        let base = mix(self.seed ^ mix(((obs.layer as u64) << 32) | obs.head as u64));
        for (o, &p) in out.iter_mut().zip(obs.pos) {
            *o = (mix(base ^ p as u64) >> 40) as f32 / (1u64 << 24) as f32;
        }
    }
}
