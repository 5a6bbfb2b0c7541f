//! DuoAttention — Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"
//! (2024).
//!
//! Mechanism: only a few heads ("retrieval heads") need every token; the others ("streaming heads") only look at the
//! attention sinks and recent tokens. Retrieval heads keep their whole cache, streaming heads a constant-size sink +
//! recent window. The paper learns the head roles; here they come from a JSON file of per-(layer, KV head) scores
//! (`hayloft heads` writes one with Retrieval-Head scores):
//! `{"layers": L, "kv_heads": H, "scores": [[s_00, ..., s_0H], ...], "threshold": 0.1}` ("threshold" optional).
//!
//! Budget (`duo@<budget>,heads@<file>`): the budget is the average over all heads, so memory matches any other method
//! at the same budget. Candidates are the heads scoring above the threshold (default 0.1, the Retrieval-Head paper's
//! cut), best first; they become retrieval heads while the rest can still keep at least a quarter of the average
//! budget each. Streaming heads share what is left equally, split into sinks and recent entries 1:2 (the paper's
//! 128 + 256 for 32K+ contexts, scaled to the budget). At a 100 % budget every head keeps everything.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::streamingllm::sinks_then_recent;
use super::{HeadObs, Needs, Scorer};
use crate::model::ModelConfig;

/// Retrieval-Head paper: heads scoring above this are retrieval heads.
pub const THRESHOLD: f64 = 0.1;

/// Which (layer, KV head) streams are retrieval heads, best first.
#[derive(Clone, Debug)]
pub struct Roles {
    /// Stream indices (layer · kv_heads + head) of the candidate retrieval heads, highest score first.
    pub candidates: Vec<usize>,
    pub n_streams: usize,
}

#[derive(serde::Deserialize)]
struct HeadsFile {
    layers: usize,
    kv_heads: usize,
    scores: Vec<Vec<f64>>,
    threshold: Option<f64>,
}

impl Roles {
    pub fn load(path: &Path, mc: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read head scores from {}", path.display()))?;
        let f: HeadsFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"layers\":L,\"kv_heads\":H,\"scores\":[[...],...]}}",
                path.display()
            )
        })?;
        if f.layers != mc.n_layers || f.kv_heads != mc.n_kv_heads {
            bail!(
                "{}: scores for {} layers × {} KV heads, but the model has {} × {}",
                path.display(),
                f.layers,
                f.kv_heads,
                mc.n_layers,
                mc.n_kv_heads
            );
        }
        if f.scores.len() != f.layers || f.scores.iter().any(|r| r.len() != f.kv_heads) {
            bail!(
                "{}: 'scores' must be {} rows of {} numbers",
                path.display(),
                f.layers,
                f.kv_heads
            );
        }
        Ok(Self::from_scores(
            &f.scores,
            f.threshold.unwrap_or(THRESHOLD),
        ))
    }

    /// Roles from per-layer rows of per-KV-head scores.
    pub fn from_scores(scores: &[Vec<f64>], threshold: f64) -> Self {
        let flat: Vec<f64> = scores.iter().flatten().copied().collect();
        let mut candidates: Vec<usize> = (0..flat.len()).filter(|&i| flat[i] > threshold).collect();
        candidates.sort_by(|&a, &b| flat[b].total_cmp(&flat[a]).then(a.cmp(&b)));
        Self {
            candidates,
            n_streams: flat.len(),
        }
    }

    /// Per-stream entry targets (`out`, one per stream) when the average budget is `keep` of `seen` tokens. Streams
    /// marked in `skip` (sliding-window layers, which the press leaves alone) take no part: the average is over the
    /// others, and their target is `seen`.
    pub fn targets(&self, keep: usize, seen: usize, skip: &[bool], out: &mut Vec<usize>) {
        let skipped = |si: usize| skip.get(si).copied().unwrap_or(false);
        let n = (0..self.n_streams).filter(|&si| !skipped(si)).count();
        let allowance = keep * n;
        let floor = keep.div_ceil(4);
        let candidates: Vec<usize> = self
            .candidates
            .iter()
            .copied()
            .filter(|&si| !skipped(si))
            .collect();
        // Most retrieval heads such that every streaming head still gets at least `floor`.
        let mut r = 0;
        while r < candidates.len() && r < n && (r + 1) * seen + (n - r - 1) * floor <= allowance {
            r += 1;
        }
        let streaming = if r < n {
            (allowance - r * seen) / (n - r)
        } else {
            0
        };
        out.clear();
        out.resize(self.n_streams, streaming.min(seen));
        for si in (0..self.n_streams).filter(|&si| skipped(si)) {
            out[si] = seen;
        }
        for &si in &candidates[..r] {
            out[si] = seen;
        }
    }
}

/// Streaming-head scorer: sinks (a third of the head's budget) and the most recent entries.
pub struct Streaming;

impl Scorer for Streaming {
    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn score(&self, obs: &HeadObs, _tmp: &mut Vec<f32>, out: &mut [f32]) {
        sinks_then_recent(obs.keep / 3, obs.len(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieval_heads_keep_all_and_the_total_fits_the_budget() {
        // 2 layers × 2 heads; heads (0,1) and (1,0) score above the threshold.
        let roles = Roles::from_scores(&[vec![0.0, 0.5], vec![0.3, 0.05]], THRESHOLD);
        assert_eq!(roles.candidates, vec![1, 2]);
        let mut t = Vec::new();
        roles.targets(500, 1000, &[], &mut t);
        // Allowance 2000: both candidates (2000) would leave nothing, so one retrieval head and 333 for the rest.
        assert_eq!(t, vec![333, 1000, 333, 333]);
        assert!(t.iter().sum::<usize>() <= 2000);
        roles.targets(1000, 1000, &[], &mut t);
        assert_eq!(t, vec![1000; 4]);
        roles.targets(100, 1000, &[], &mut t);
        assert_eq!(t, vec![100; 4]);
        // Layer 0 slides (its streams are skipped): the allowance is over layer 1's two heads only, 1000; the
        // remaining candidate (1, 0) would take it all and leave nothing, so no retrieval head and 500 each.
        roles.targets(500, 1000, &[true, true], &mut t);
        assert_eq!(t, vec![1000, 1000, 500, 500]);
        roles.targets(700, 1000, &[true, true], &mut t);
        // Allowance 1400: (1, 0) keeps all (1000), (1, 1) gets the 400 left (≥ the floor of 175).
        assert_eq!(t, vec![1000, 1000, 1000, 400]);
    }
}
