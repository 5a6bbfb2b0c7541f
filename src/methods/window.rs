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
