//! MInference — Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
//! Attention" (NeurIPS 2024), microsoft/MInference.
//!
//! Mechanism: each attention head of a long prompt follows one of three shapes — A-shape (sinks + a local band),
//! vertical-slash (a few key columns every query reads plus a few diagonals), block-sparse (a few 64×64 blocks). An
//! offline search ([`super::search`]) picks each head's shape; at run time the shape's indices are estimated from the
//! prompt itself: vertical-slash from the attention of the last 64 queries (column sums and diagonal sums; the first
//! 30 columns and last 100 diagonals always kept), block-sparse from mean-pooled 64-token query and key blocks (top
//! 100 key blocks per query block). Only the attention of the prompt changes; decoding is dense.
//!
//! Here the prompt is read in chunks, so the estimate runs per chunk: the chunk's last 64 queries against every key
//! so far. Patterns are chosen per query head as in MInference's files, but the CPU kernel's tasks are (KV head,
//! 16-query tile), so a KV head reads the union of its query heads' patterns (GQA: SmolLM2 groups 3, Gemma 3 4,
//! Qwen2.5 7): no key is missed that any head of the group wanted, at the cost of some density. Layers before
//! `from=` and chunks with less than `min=` tokens of context stay dense; sliding-window layers are never asked.

use anyhow::Result;
use rayon::prelude::*;

use super::pattern::{PatternFile, DEFAULT};
use super::plan::{add_pattern, prefill_shape, Estimator, HeadPlan};
use super::{HeadPattern, MInferenceSpec, Scope};
use crate::attention::TileSelection;
use crate::model::{ModelConfig, PrefillPattern, SelectCx};

/// One KV head's work for a chunk.
#[derive(Default)]
pub(super) struct HeadWork {
    pub est: Estimator,
    pub plan: HeadPlan,
}

pub struct MInference {
    /// [layer][query head]
    pats: Vec<Vec<HeadPattern>>,
    scope: Scope,
    scale: f32,
    work: Vec<HeadWork>,
}

impl MInference {
    pub fn new(spec: &MInferenceSpec, mc: &ModelConfig) -> Result<Self> {
        let mut pats = vec![vec![DEFAULT; mc.n_heads]; mc.n_layers];
        if let Some(path) = &spec.file {
            let f = PatternFile::load(path, mc)?;
            for (row, frow) in pats.iter_mut().zip(&f.heads) {
                for (p, e) in row.iter_mut().zip(frow) {
                    *p = e.pattern;
                }
            }
        }
        if let Some(every) = spec.every {
            pats.iter_mut().flatten().for_each(|p| *p = every);
        }
        Ok(Self::with_patterns(pats, spec.scope.clone(), mc))
    }

    /// Explicit per-(layer, query head) patterns.
    pub fn with_patterns(pats: Vec<Vec<HeadPattern>>, scope: Scope, mc: &ModelConfig) -> Self {
        Self {
            pats,
            scope,
            scale: mc.attn_scale,
            work: (0..mc.n_kv_heads).map(|_| HeadWork::default()).collect(),
        }
    }
}

impl PrefillPattern for MInference {
    fn pattern(&mut self, cx: &SelectCx, out: &mut TileSelection) -> bool {
        if cx.layer < self.scope.from || !prefill_shape(cx) {
            return false;
        }
        let len = cx.pos[cx.pos.len() - 1] as usize + 1;
        if len < self.scope.min_len {
            return false;
        }
        let g = cx.group();
        let (pats, scale) = (&self.pats[cx.layer], self.scale);
        self.work.par_iter_mut().enumerate().for_each(|(h, w)| {
            w.plan.reset(len);
            let heads = &pats[h * g..(h + 1) * g];
            if heads
                .iter()
                .any(|p| !matches!(p, HeadPattern::AShape { .. }))
            {
                w.est.load_keys(cx.cache, cx.layer, h, len);
            }
            for (i, &p) in heads.iter().enumerate() {
                add_pattern(&mut w.est, cx, h * g + i, scale, p, &mut w.plan);
            }
        });
        out.reset(cx.cache.cfg.n_kv_heads, cx.pos.len());
        for (h, w) in self.work.iter_mut().enumerate() {
            w.plan.emit(h, cx.pos, out);
        }
        out.finish();
        true
    }
}
