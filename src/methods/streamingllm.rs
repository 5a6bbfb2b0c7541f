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
