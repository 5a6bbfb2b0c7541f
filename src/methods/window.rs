//! Window attention — the baseline StreamingLLM (Xiao et al., ICLR 2024) shows failing: each head keeps only its most
//! recent entries, no attention sinks. Once the first tokens leave the window, perplexity blows up; keeping 4 sinks
//! (`streamingllm`) prevents it. Kept as its own method so that finding can be measured (`perplexity --stream`).
//!
//! Score: the entry's index (more recent = higher).

use super::streamingllm::sinks_then_recent;
use super::{HeadObs, Needs, Scorer};

pub struct Window;

impl Scorer for Window {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        sinks_then_recent(0, obs.len(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::press::top_k;

    #[test]
    fn no_sinks_only_the_newest_entries() {
        let n = 10;
        let pos: Vec<u32> = (0..n as u32).collect();
        let keys: Vec<f32> = (0..2 * n).map(|i| (i % 3) as f32).collect();
        let o = HeadObs {
            keep: 3,
            seen: n,
            ..HeadObs::single(&keys, 2, &pos)
        };
        let mut out = vec![f32::NAN; n];
        Window.score(&o, &mut Vec::new(), &mut out);
        assert!(
            out.iter().all(|s| s.is_finite()),
            "no entry is forced: {out:?}"
        );
        assert!(out.windows(2).all(|w| w[0] < w[1]), "{out:?}");
        let (mut order, mut keep) = (Vec::new(), Vec::new());
        top_k(&out, 3, &mut order, &mut keep);
        let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        assert_eq!(kept, vec![7, 8, 9], "the first entries (sinks) go too");
    }
}
