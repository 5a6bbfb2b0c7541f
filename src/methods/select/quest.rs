//! Quest — Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024).
//!
//! Mechanism: the cache is cut into pages of 16 tokens; each page keeps the channel-wise maximum and minimum of its
//! keys (kept as the cache grows). At every decode step the query scores each page by the upper bound
//! `Σ_c max(q_c·max_c, q_c·min_c)` of any q·k inside it, and attention reads only the top-scoring pages plus the newest
//! one. Prefill and the first two layers stay dense (Quest's `q_len > 1` and `layer_id < 2`).
//!
//! Defaults as in the official code (mit-han-lab/Quest): page 16, newest page always read, 2 dense layers, reselection
//! every step. hayloft selects once per KV head (Quest's code selects per query head): a page's score is the maximum
//! over the query heads of the group, so the bytes read are exactly the budget. `score=meanstd` scores a page by
//! `Σ_c q_c·mean_c + |q_c|·std_c` instead (reported to keep needles on GQA models where the min/max bound loses them).
//! Quest keeps its summaries in f16; hayloft keeps them too but scores the pages from an 8-bit copy (rounded outward,
//! see [`crate::kv::meta`]), which reads half the bytes: the same NIAH answers in total on SmolLM2 1K–4K.

use super::{
    keep_units, meta_read_bytes, units_for, Frame, FrameDefaults, LayerPages, SelectOptions, Step,
};
use crate::attention::Selection;
use crate::kv::{MetaConfig, PageStat};
use crate::methods::spec::Budget;
use crate::model::{SelectCx, Selector};

/// Tokens per page (Quest's `page_size`).
pub const PAGE: usize = 16;

/// Quest's frame: no sinks, the newest page, 2 dense layers, reselect every step.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: 0,
    recent: PAGE,
    dense: 2,
    interval: 1,
};

pub struct Quest {
    frame: Frame,
    stat: PageStat,
    page: usize,
    /// The layer's page scores and choices (see [`LayerPages`]).
    pages: LayerPages,
}

impl Quest {
    pub fn new(budget: Budget, o: &SelectOptions, n_layers: usize) -> Self {
        let page = o.page.unwrap_or(PAGE);
        let d = FrameDefaults {
            recent: page,
            ..DEFAULTS
        };
        Self {
            frame: Frame::new(budget, o, d, n_layers),
            stat: o.score.unwrap_or(PageStat::MinMax),
            page,
            pages: LayerPages::default(),
        }
    }

    fn choose(&mut self, cx: &SelectCx) {
        let pt = self.page;
        let nh = cx.cache.cfg.n_kv_heads;
        self.pages.reset(nh);
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            if m.k > 0 {
                let pages = (m.lo / pt, m.hi.div_ceil(pt));
                self.pages.add(self.stat, cx, h, pages);
                cx.cache
                    .note_read(meta_read_bytes(cx.cache, pages.1 - pages.0));
            }
        }
        self.pages.score(cx);
        let frame = &self.frame;
        self.pages.choose(|h| units_for(frame.middle(cx, h), pt));
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nh);
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            if m.k > 0 {
                keep_units(&mut kept, h, m, self.pages.chosen(h), (m.lo / pt, pt));
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }
}

impl Selector for Quest {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => self.choose(cx),
        }
        self.frame.finish(cx, out);
        true
    }

    fn meta(&self) -> Option<MetaConfig> {
        Some(MetaConfig {
            page_tokens: self.page,
            stat: self.stat,
            first_layer: self.frame.dense,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{harness_cache, harness_step};
    use super::*;
    use crate::testutil::Rng;

    /// Timing harness, not a check (ignored; run by hand): one decode step's Quest selection (1024 tokens, min/max)
    /// at 32K of Gemma 3 270M's global-layer shapes (1 KV head of 256, 4 query heads, 32-token f16 blocks) over
    /// `HAYLOFT_HARNESS_LAYERS` layers (default 3, its global layers), best and median of many steps. `HL_FLUSH_MB=256`
    /// reads that many MiB between steps, so the summaries come from memory as they do after a step's weights.
    /// `cargo test --release --lib quest_decode_32k -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn quest_decode_32k() {
        let (n_q, n_kv, hd, len) = (4usize, 1usize, 256usize, 32000usize);
        let o = SelectOptions {
            dense: Some(0),
            ..Default::default()
        };
        let meta = MetaConfig {
            page_tokens: PAGE,
            stat: PageStat::MinMax,
            first_layer: 0,
        };
        let mut rng = Rng::seeded(9);
        let c = harness_cache(3, (n_kv, hd, len), Some(meta), &mut rng);
        let layers = c.cfg.n_layers;
        let mut t = Quest::new(Budget::Tokens(1024), &o, layers);
        let q = rng.vec(n_q * hd, 2.0);
        let mut out = Selection::default();
        let mut times = Vec::new();
        let flush_mb: usize = std::env::var("HL_FLUSH_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let junk = vec![1u8; flush_mb << 20];
        let mut sum = 0u8;
        for _ in 0..400 {
            if flush_mb > 0 {
                for x in junk.iter().step_by(64) {
                    sum = sum.wrapping_add(*x);
                }
            }
            times.push(harness_step(&mut t, &c, (&q, n_q), &mut out));
        }
        std::hint::black_box(sum);
        times.sort_by(f64::total_cmp);
        eprintln!(
            "quest: {:.1} µs per layer call best, {:.1} median; {} ranges in head 0",
            times[0] * 1e6,
            times[times.len() / 2] * 1e6,
            out.ranges(0).len()
        );
        assert!(!out.ranges(0).is_empty());
    }
}
