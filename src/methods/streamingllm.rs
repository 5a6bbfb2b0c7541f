//! StreamingLLM — Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024); sinks studied
//! further in "When Attention Sink Emerges in Language Models".
//!
//! Mechanism: the first few tokens soak up attention mass whatever their content ("attention sinks"); dropping them
//! breaks window attention, keeping them with a window of recent tokens does not. A head keeps its first `n_sink`
//! entries and its most recent ones, nothing else.
//!
//! Score: +∞ for the first `n_sink` entries of the stream (the sinks: eviction never drops them, so they stay first),
//! otherwise the entry's index (more recent = higher). Default `n_sink` = 4, as in the paper.

use super::{HeadObs, Needs, Scorer};

/// Sink tokens kept (paper default).
pub const N_SINK: usize = 4;

pub struct StreamingLlm {
    pub n_sink: usize,
}

impl Default for StreamingLlm {
    fn default() -> Self {
        Self { n_sink: N_SINK }
    }
}

impl Scorer for StreamingLlm {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        sinks_then_recent(self.n_sink, obs.len(), out);
    }
}

/// +∞ for the first `n_sink` entries, then the index: top-k keeps the sinks and the most recent entries.
pub fn sinks_then_recent(n_sink: usize, n: usize, out: &mut [f32]) {
    for (i, o) in out[..n].iter_mut().enumerate() {
        *o = if i < n_sink { f32::INFINITY } else { i as f32 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::press::top_k;

    fn obs<'a>(keys: &'a [f32], pos: &'a [u32]) -> HeadObs<'a> {
        HeadObs {
            keep: 7,
            ..HeadObs::single(keys, 2, pos)
        }
    }

    #[test]
    fn the_four_sinks_stay_and_the_rest_ranks_by_recency() {
        let n = 12;
        let pos: Vec<u32> = (0..n as u32).collect();
        // Keys do not matter: a large key late, tiny keys early.
        let keys: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
        let mut out = vec![f32::NAN; n];
        StreamingLlm::default().score(&obs(&keys, &pos), &mut Vec::new(), &mut out);
        assert_eq!(N_SINK, 4);
        for (i, &s) in out.iter().enumerate() {
            assert_eq!(s == f32::INFINITY, i < 4, "entry {i}: {s}");
        }
        assert!(out[4..].iter().all(|s| s.is_finite()), "{out:?}");
        assert!(out[4..].windows(2).all(|w| w[0] < w[1]), "{out:?}");
        let mut zero_keys = vec![0.0; 2 * n];
        zero_keys[0] = 9.0;
        let mut again = vec![f32::NAN; n];
        StreamingLlm::default().score(&obs(&zero_keys, &pos), &mut Vec::new(), &mut again);
        assert_eq!(out, again, "scores must not depend on the keys");
        // Keeping 7: the 4 sinks and the 3 newest entries.
        let (mut order, mut keep) = (Vec::new(), Vec::new());
        top_k(&out, 7, &mut order, &mut keep);
        let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        assert_eq!(kept, vec![0, 1, 2, 3, 9, 10, 11]);
    }

    #[test]
    fn sinks_count_and_short_streams() {
        // Fewer entries than sinks: everything stays.
        let keys = [0.0; 6];
        let mut out = [0.0; 3];
        StreamingLlm::default().score(&obs(&keys, &[0, 1, 2]), &mut Vec::new(), &mut out);
        assert!(out.iter().all(|&s| s == f32::INFINITY), "{out:?}");
        // Another sink count: exactly that many.
        let pos: Vec<u32> = (0..8).collect();
        let keys = [0.0; 16];
        let mut out = [0.0; 8];
        StreamingLlm { n_sink: 2 }.score(&obs(&keys, &pos), &mut Vec::new(), &mut out);
        assert_eq!(out.iter().filter(|s| s.is_infinite()).count(), 2);
        assert!(out[0].is_infinite() && out[1].is_infinite() && out[2].is_finite());
    }
}
