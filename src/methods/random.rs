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

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(seed: u64, layer: usize, head: usize, keys: &[f32], pos: &[u32]) -> Vec<f32> {
        let o = HeadObs {
            layer,
            n_layers: 4,
            head,
            keep: 3,
            ..HeadObs::single(keys, 2, pos)
        };
        let mut out = vec![f32::NAN; pos.len()];
        Random { seed }.score(&o, &mut Vec::new(), &mut out);
        out
    }

    #[test]
    fn seeded_uniform_and_forces_nothing() {
        let n = 64;
        let pos: Vec<u32> = (0..n as u32).collect();
        let keys = vec![0.5; 2 * n];
        let a = scores(1, 0, 0, &keys, &pos);
        assert_eq!(a, scores(1, 0, 0, &keys, &pos), "same seed, same scores");
        assert_ne!(
            a,
            scores(2, 0, 0, &keys, &pos),
            "another seed, other scores"
        );
        assert_ne!(
            a,
            scores(1, 0, 1, &keys, &pos),
            "another head, other scores"
        );
        assert_ne!(
            a,
            scores(1, 1, 0, &keys, &pos),
            "another layer, other scores"
        );
        assert!(a.iter().all(|s| (0.0..1.0).contains(s)), "{a:?}");
        let mean = a.iter().sum::<f32>() / n as f32;
        assert!((0.3..0.7).contains(&mean), "mean {mean}");
        // Not recency in disguise: the order is not monotone.
        assert!(a.windows(2).any(|w| w[0] > w[1]) && a.windows(2).any(|w| w[0] < w[1]));
        // Keys do not matter; an entry keeps its score when others are gone (it hashes its position).
        let other_keys: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
        assert_eq!(a, scores(1, 0, 0, &other_keys, &pos));
        let some = [3u32, 17, 40];
        let s = scores(1, 0, 0, &keys[..6], &some);
        assert_eq!(s, vec![a[3], a[17], a[40]]);
        assert_eq!(Random::default().needs(), Needs::default());
    }
}
