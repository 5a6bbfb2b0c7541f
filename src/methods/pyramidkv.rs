//! PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024).
//!
//! Mechanism: attention is broad in lower layers and concentrates on a few tokens in higher ones ("pyramidal
//! information funneling"), so lower layers get larger budgets. Scores are SnapKV's; the budget of layer l falls
//! linearly from the bottom to the top layer while the total over layers stays the same as a uniform budget.
//!
//! Allocation (the PyramidKV / kvpress formula, with our budget meaning "entries kept"): every layer keeps the SnapKV
//! window w; the rest b = keep − w is spread as an arithmetic sequence from `max` (layer 0) to `min` (last layer) with
//! min = b / beta and max = 2b − min, so the mean is b. If `max` would exceed what a layer holds (seen − w), it is capped
//! there and `min` raised to keep the mean. Per-layer counts are rounded, so the total may differ from the uniform one
//! by under one entry per layer. Default beta = 20. Usable as the method `pyramidkv` or as the option `,pyramid[@beta]`
//! on any scoring method.

use anyhow::{bail, Result};

/// Pyramid steepness (paper / kvpress default).
pub const BETA: f64 = 20.0;

pub fn parse_beta(a: &str) -> Result<f64> {
    match a.parse::<f64>() {
        Ok(b) if b >= 1.0 && b.is_finite() => Ok(b),
        _ => bail!("pyramid@{a}: beta must be a number ≥ 1 (default {BETA})"),
    }
}

/// Entries each head of `layer` keeps when the uniform budget is `keep` of `seen` tokens.
pub fn layer_keep(
    beta: f64,
    layer: usize,
    n_layers: usize,
    keep: usize,
    seen: usize,
    window: usize,
) -> usize {
    if n_layers <= 1 || keep <= window || seen <= window {
        return keep;
    }
    let b = (keep - window) as f64;
    let room = (seen - window) as f64;
    let mut min = b / beta;
    let mut max = 2.0 * b - min;
    if max > room {
        max = room;
        min = 2.0 * b - max;
    }
    let step = (max - min) / (n_layers - 1) as f64;
    let per = max - step * layer as f64;
    (window + per.round() as usize).min(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_fall_with_depth_and_keep_the_total() {
        let (nl, seen, keep) = (30, 4000, 1000);
        let b: Vec<usize> = (0..nl)
            .map(|l| layer_keep(BETA, l, nl, keep, seen, 64))
            .collect();
        assert!(b.windows(2).all(|w| w[0] >= w[1]), "{b:?}");
        assert!(b[0] > keep && b[nl - 1] < keep);
        let total: usize = b.iter().sum();
        assert!(total.abs_diff(keep * nl) <= nl, "{total} vs {}", keep * nl);
        // Large budgets: the bottom layers are capped at what they hold, the total still matches.
        let b: Vec<usize> = (0..nl)
            .map(|l| layer_keep(BETA, l, nl, 3000, seen, 64))
            .collect();
        assert_eq!(b[0], seen);
        assert!(b.iter().sum::<usize>().abs_diff(3000 * nl) <= nl);
        // Everything kept stays everything kept.
        assert!((0..nl).all(|l| layer_keep(BETA, l, nl, seen, seen, 64) == seen));
        assert!(parse_beta("0.5").is_err() && parse_beta("x").is_err());
    }
}
