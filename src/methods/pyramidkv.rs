//! PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024).
//!
//! Mechanism: attention is broad in lower layers and concentrates on a few tokens in higher ones ("pyramidal
//! information funneling"), so lower layers get larger budgets. Scores are SnapKV's; the budget of layer l falls
//! linearly from the bottom to the top layer while the total over layers stays the same as a uniform budget.
//!
//! Two allocations, both from public code, with our budget `keep` = entries a head keeps under the uniform budget
//! and `w` the SnapKV window:
//! - [`Formula::Kvpress`] (default; kvpress's `PyramidKVPress`, commit 8bb29b9): the kept entries b = keep (window
//!   included) spread as an arithmetic sequence from `max` (layer 0) to `min` (last layer), min = b / beta and
//!   max = 2b − min; if max ≥ seen − w it is set to seen − w and min = 2b − max. Unless seen ≥ max ≥ min ≥ w the
//!   pyramid is dropped for SnapKV's uniform budget: with w = 64 and beta = 20 any keep under 1,280 entries is
//!   uniform (at 25 % every prompt under about 5K tokens).
//! - [`Formula::Factory`] (option `pyramid_factory`; KVCache-Factory's `PyramidKVCluster`, which kvpress cites): the
//!   window is kept apart and b = keep − w is spread, in integers (min = b // beta, steps = (max − min) // (L − 1));
//!   a prompt shorter than keep is kept whole and one shorter than 2b gets the uniform budget.
//!
//! Per-layer counts are rounded, so a total may differ from the uniform one by under one entry per layer. Default
//! beta = 20. Usable as the method `pyramidkv` or as an option on any scoring method.

use anyhow::{bail, Result};

/// Pyramid steepness (paper / kvpress default).
pub const BETA: f64 = 20.0;

/// Which published allocation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Formula {
    Kvpress,
    Factory,
}

/// Per-layer budgets: the formula and its beta.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pyramid {
    pub beta: f64,
    pub formula: Formula,
}

impl Pyramid {
    pub const DEFAULT: Pyramid = Pyramid {
        beta: BETA,
        formula: Formula::Kvpress,
    };

    /// Entries each head of `layer` keeps when the uniform budget is `keep` of `seen` tokens.
    pub fn layer_keep(
        &self,
        layer: usize,
        n_layers: usize,
        keep: usize,
        seen: usize,
        window: usize,
    ) -> usize {
        if n_layers <= 1 || keep >= seen {
            return keep;
        }
        match self.formula {
            Formula::Kvpress => kvpress(self.beta, layer, n_layers, keep, seen, window),
            Formula::Factory => factory(self.beta, layer, n_layers, keep, seen, window),
        }
    }
}

fn kvpress(beta: f64, layer: usize, n_layers: usize, keep: usize, seen: usize, w: usize) -> usize {
    let b = keep as f64;
    let (seen_f, w_f) = (seen as f64, w as f64);
    let mut min = b / beta;
    let mut max = 2.0 * b - min;
    if max >= seen_f - w_f {
        max = seen_f - w_f;
        min = 2.0 * b - max;
    }
    if !(seen_f >= max && max >= min && min >= w_f) {
        return keep;
    }
    let steps = (max - min) / (n_layers - 1) as f64;
    (max - layer as f64 * steps).round_ties_even().max(0.0) as usize
}

fn factory(beta: f64, layer: usize, n_layers: usize, keep: usize, seen: usize, w: usize) -> usize {
    if keep <= w {
        return keep;
    }
    let b = (keep - w) as i64;
    if (seen as i64) < 2 * b {
        return keep;
    }
    let mut min = (b as f64 / beta).floor() as i64;
    let mut max = 2 * b - min;
    if max >= seen as i64 - w as i64 {
        max = seen as i64 - w as i64;
        min = 2 * b - max;
    }
    let steps = (max - min).div_euclid(n_layers as i64 - 1);
    let per = (max - layer as i64 * steps).clamp(0, (seen - w) as i64) as usize;
    per + w
}

/// `pyramid[@beta]` / `pyramid_factory[@beta]`'s argument.
pub fn parse(a: Option<&str>, formula: Formula) -> Result<Pyramid> {
    let beta = match a {
        None => BETA,
        Some(a) => match a.parse::<f64>() {
            Ok(b) if b >= 1.0 && b.is_finite() => b,
            _ => bail!("pyramid@{a}: beta must be a number ≥ 1 (default {BETA})"),
        },
    };
    Ok(Pyramid { beta, formula })
}

/// The uniform-budget fallback of [`Formula::Kvpress`] and the pyramid otherwise, per layer (tests, docs).
pub fn layer_keep(
    beta: f64,
    layer: usize,
    n_layers: usize,
    keep: usize,
    seen: usize,
    window: usize,
) -> usize {
    Pyramid {
        beta,
        formula: Formula::Kvpress,
    }
    .layer_keep(layer, n_layers, keep, seen, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(f: Formula, nl: usize, keep: usize, seen: usize) -> Vec<usize> {
        let p = Pyramid {
            beta: BETA,
            formula: f,
        };
        (0..nl)
            .map(|l| p.layer_keep(l, nl, keep, seen, 64))
            .collect()
    }

    #[test]
    fn kvpress_budgets_fall_with_depth_and_keep_the_total() {
        let (nl, seen, keep) = (30, 8000, 2000);
        let b = budgets(Formula::Kvpress, nl, keep, seen);
        assert!(b.windows(2).all(|w| w[0] >= w[1]), "{b:?}");
        // kvpress: max = 2·2000 − 100 = 3900 at layer 0, min = 100 at the top.
        assert_eq!((b[0], b[nl - 1]), (3900, 100));
        let total: usize = b.iter().sum();
        assert!(total.abs_diff(keep * nl) <= nl, "{total} vs {}", keep * nl);
        // Large budgets: max capped at seen − window, min raised, the total kept.
        let b = budgets(Formula::Kvpress, nl, 5000, seen);
        assert_eq!(b[0], seen - 64);
        assert!(b.iter().sum::<usize>().abs_diff(5000 * nl) <= nl);
        assert!(parse(Some("0.5"), Formula::Kvpress).is_err());
        assert!(parse(Some("x"), Formula::Factory).is_err());
    }

    #[test]
    fn kvpress_falls_back_to_uniform_when_the_top_would_drop_below_the_window() {
        // 25 % of 4K: min = 1024 / 20 = 51.2 < 64, so every layer keeps SnapKV's 1024.
        assert!(budgets(Formula::Kvpress, 30, 1024, 4096)
            .iter()
            .all(|&b| b == 1024));
        // 1280 / 20 = 64 = the window: the pyramid holds.
        let b = budgets(Formula::Kvpress, 30, 1280, 5120);
        assert_eq!((b[0], b[29]), (2496, 64));
        // Everything kept stays everything kept.
        assert!(budgets(Formula::Kvpress, 30, 4000, 4000)
            .iter()
            .all(|&b| b == 4000));
    }

    #[test]
    fn factory_spreads_beyond_the_window_in_integers() {
        // keep 1024 of 4096: b = 960, min = 48, max = 1872, steps = 1824 // 29 = 62.
        let b = budgets(Formula::Factory, 30, 1024, 4096);
        assert_eq!(b[0], 1872 + 64);
        assert_eq!(b[1], 1872 - 62 + 64);
        assert_eq!(b[29], 1872 - 29 * 62 + 64);
        // Shorter than 2b: uniform.
        assert!(budgets(Formula::Factory, 30, 1024, 1900)
            .iter()
            .all(|&b| b == 1024));
        // A budget within the window: uniform.
        assert!(budgets(Formula::Factory, 30, 64, 4096)
            .iter()
            .all(|&b| b == 64));
    }
}
