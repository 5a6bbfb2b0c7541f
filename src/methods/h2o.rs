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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::press::top_k;

    fn score(acc: &[f32], keep: usize) -> Vec<f32> {
        let n = acc.len();
        let pos: Vec<u32> = (0..n as u32).collect();
        let keys = vec![1.0; 2 * n];
        let o = HeadObs {
            acc,
            keep,
            seen: n,
            ..HeadObs::single(&keys, 2, &pos)
        };
        let mut out = vec![f32::NAN; n];
        H2o.score(&o, &mut Vec::new(), &mut out);
        out
    }

    #[test]
    fn accumulated_attention_with_the_recent_half_forced() {
        // Heavy hitters at 1, 4 and 5; the newest entries have little attention of their own.
        let acc = [0.1, 2.0, 0.3, 0.2, 1.5, 3.0, 0.05, 0.01, 0.02, 0.0];
        let out = score(&acc, 6);
        // keep 6: the 3 newest are forced, the others score their accumulated attention exactly.
        assert_eq!(&out[..7], &acc[..7]);
        assert!(out[7..].iter().all(|&s| s == f32::INFINITY), "{out:?}");
        let (mut order, mut keep) = (Vec::new(), Vec::new());
        top_k(&out, 6, &mut order, &mut keep);
        let kept: Vec<usize> = (0..acc.len()).filter(|&i| keep[i]).collect();
        assert_eq!(kept, vec![1, 4, 5, 7, 8, 9]);
        // An odd budget forces its smaller half; a budget of 1 forces nothing.
        let out = score(&acc, 5);
        assert_eq!(out.iter().filter(|s| s.is_infinite()).count(), 2);
        assert_eq!(&out[..8], &acc[..8]);
        assert_eq!(score(&acc, 1), acc.to_vec());
        assert!(H2o.needs().accumulate);
    }
}
