//! LServe — Yang et al., "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention" (MLSys 2025).
//!
//! Mechanism: hierarchical paging. Each physical page (here: a cache block) holds several 16-token logical pages,
//! each with its channel-wise key min/max; a physical page scores the maximum of its logical pages' Quest bounds, and
//! attention reads the top physical pages plus the newest one, so reads stay block-contiguous while the score keeps a
//! 16-token resolution. The selection is reused for 4 decode steps (LServe's reusable page selector). Streaming heads
//! (DuoAttention roles, from a `hayloft heads` file given as `heads=FILE`) read only 128 sink + 256 recent tokens;
//! the other half, the retrieval heads, select pages.
//!
//! Defaults as in the official code (mit-han-lab/omniserve): 16-token logical pages, newest page always read,
//! `selector_update_interval` 4, streaming heads sink 128 + local 256, the lowest-scoring half of the KV heads
//! streaming. LServe's physical page is 64 tokens; here it is the cache block (`--block-tokens`, default 32). LServe
//! has no dense layers; hayloft's default keeps its 2 (`dense=0` turns them off). Without `heads=FILE` every head is a
//! retrieval head. Selection is per KV head (LServe's kernel selects per query head): a block's score is the maximum
//! over the query heads of the group.

use anyhow::Result;

use super::{
    keep_units, meta_read_bytes, units_for, Frame, FrameDefaults, LayerPages, SelectOptions, Step,
};
use crate::attention::Selection;
use crate::kv::{MetaConfig, PageStat};
use crate::methods::duo::Roles;
use crate::methods::spec::Budget;
use crate::model::{ModelConfig, SelectCx, Selector};

/// Tokens per logical page.
pub const LOGICAL_PAGE: usize = 16;
/// Streaming heads: sink and recent tokens (LServe's `dec_sink_token`, `dec_local_token`).
pub const STREAMING_SINK: usize = 128;
pub const STREAMING_RECENT: usize = 256;

/// LServe's frame for retrieval heads: no sinks, the newest block, 2 dense layers, reselect every 4 steps.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: 0,
    recent: 32,
    dense: 2,
    interval: 4,
};

pub struct LServe {
    frame: Frame,
    stat: PageStat,
    logical: usize,
    /// streaming[layer · n_kv_heads + head]: reads sinks + recent only.
    streaming: Vec<bool>,
    /// The layer's logical-page scores, block scores and choices (see [`LayerPages`]).
    pages: LayerPages,
}

impl LServe {
    pub fn new(budget: Budget, o: &SelectOptions, mc: &ModelConfig) -> Result<Self> {
        let n = mc.n_layers * mc.n_kv_heads;
        let streaming = match &o.heads {
            None => vec![false; n],
            Some(path) => {
                let roles = Roles::load(std::path::Path::new(path), mc)?;
                // The better-scoring half of the streams (and only heads above the threshold) select pages.
                let mut s = vec![true; n];
                for &i in roles.candidates.iter().take(n.div_ceil(2)) {
                    s[i] = false;
                }
                s
            }
        };
        Ok(Self {
            frame: Frame::new(budget, o, DEFAULTS, mc.n_layers),
            stat: o.score.unwrap_or(PageStat::MinMax),
            logical: o.page.unwrap_or(LOGICAL_PAGE),
            streaming,
            pages: LayerPages::default(),
        })
    }

    fn choose(&mut self, cx: &SelectCx) {
        let lp = self.logical;
        let (nh, bt) = (cx.cache.cfg.n_kv_heads, cx.cache.cfg.block_tokens);
        let per_block = bt / lp;
        self.pages.reset(nh);
        for h in 0..nh {
            if self.streaming[cx.layer * nh + h] {
                continue;
            }
            let m = self.frame.middle(cx, h);
            if m.k == 0 {
                continue;
            }
            let (b0, b1) = (m.lo / bt, m.hi.div_ceil(bt));
            let n_pages = cx.cache.len(cx.layer, h).div_ceil(lp);
            let (p0, p1) = (b0 * per_block, (b1 * per_block).min(n_pages));
            self.pages.add(self.stat, cx, h, (p0, p1));
            cx.cache.note_read(meta_read_bytes(cx.cache, p1 - p0));
        }
        self.pages.score(cx);
        // A physical block scores as its best logical page.
        for h in 0..nh {
            self.pages.units_max(h, per_block);
        }
        let frame = &self.frame;
        self.pages.choose(|h| units_for(frame.middle(cx, h), bt));
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nh);
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            if !self.streaming[cx.layer * nh + h] && m.k > 0 {
                keep_units(&mut kept, h, m, self.pages.chosen(h), (m.lo / bt, bt));
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }
}

impl Selector for LServe {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => self.choose(cx),
        }
        self.frame.finish(cx, out);
        // Streaming heads read their sinks and recent window only, not the frame's parts.
        let nh = cx.cache.cfg.n_kv_heads;
        let mut changed = false;
        for h in 0..nh {
            if self.streaming[cx.layer * nh + h] {
                let len = cx.cache.len(cx.layer, h);
                out.clear_head(h);
                out.add(h, 0, STREAMING_SINK.min(len));
                out.add(h, len.saturating_sub(STREAMING_RECENT), len);
                changed = true;
            }
        }
        if changed {
            out.finish();
        }
        true
    }

    fn meta(&self) -> Option<MetaConfig> {
        Some(MetaConfig {
            page_tokens: self.logical,
            stat: self.stat,
            first_layer: self.frame.dense,
        })
    }
}
