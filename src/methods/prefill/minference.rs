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
//!
//! Per chunk: each KV head's keys are converted once (in parallel over KV heads), each query head's estimate runs on
//! its own (in parallel over query heads: Gemma 3 has one KV head and four query heads), then a KV head's plan is the
//! union of its query heads' plans; its columns before the chunk go to the kernel as shared entries, gathered once.

use anyhow::Result;
use rayon::prelude::*;

use super::pattern::{PatternFile, DEFAULT};
use super::plan::{add_pattern, prefill_shape, Estimator, HeadPlan, Keys};
use super::{HeadPattern, MInferenceSpec, Scope};
use crate::attention::TileSelection;
use crate::model::{ModelConfig, PrefillPattern, SelectCx};

/// One query head's work for a chunk.
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
    /// Per KV head: its keys (this layer, this chunk) and the union plan.
    keys: Vec<Keys>,
    plans: Vec<HeadPlan>,
    /// Per query head.
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
            keys: (0..mc.n_kv_heads).map(|_| Keys::default()).collect(),
            plans: (0..mc.n_kv_heads).map(|_| HeadPlan::default()).collect(),
            work: (0..mc.n_heads).map(|_| HeadWork::default()).collect(),
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
        self.keys.par_iter_mut().enumerate().for_each(|(h, k)| {
            if pats[h * g..(h + 1) * g]
                .iter()
                .any(|p| !matches!(p, HeadPattern::AShape { .. }))
            {
                k.load(cx.cache, cx.layer, h, len);
            }
        });
        let keys = &self.keys;
        self.work.par_iter_mut().enumerate().for_each(|(qh, w)| {
            w.plan.reset(len);
            w.est.forget_means();
            add_pattern(
                &mut w.est,
                &keys[qh / g],
                cx,
                qh,
                scale,
                pats[qh],
                &mut w.plan,
            );
        });
        out.reset(cx.cache.cfg.n_kv_heads, cx.pos.len());
        for (h, plan) in self.plans.iter_mut().enumerate() {
            plan.reset(len);
            for w in &self.work[h * g..(h + 1) * g] {
                plan.merge(&w.plan);
            }
            plan.emit(h, cx.pos, out);
        }
        out.finish();
        true
    }
}
