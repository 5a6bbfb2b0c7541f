//! The press: turns a [`KvSpec`] into real evictions. For each layer it gathers every KV head's entries, asks the
//! method's [`Scorer`] for scores, decides how many entries each head keeps (uniform budget, or per-layer / per-head
//! allocation), optionally merges dropped entries into kept ones, and calls `KvCache::retain` per head. Freed blocks
//! are trimmed at the end, so the cache's byte counter falls by what was dropped.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::obs::{AttnAcc, HeadBuf, QueryWindow};
use super::{
    adakv, duo, kvmerger, pyramidkv, snapkv, think, Budget, HeadObs, KvSpec, Needs, Scorer,
};
use crate::kv::KvCache;
use crate::model::ModelConfig;

pub struct Press {
    pub spec: KvSpec,
    budget: Budget,
    /// Ranks entries for eviction; None when the spec keeps every entry (a press only for ThinK's channel pruning).
    scorer: Option<Box<dyn Scorer>>,
    /// PyramidKV's beta when per-layer budgets are on.
    pyramid: Option<pyramidkv::Pyramid>,
    /// AdaKV's floor share when head-adaptive budgets are on.
    ada: Option<f32>,
    duo: Option<duo::Roles>,
    merger: Option<kvmerger::KvMerger>,
    /// Compress after every prefill chunk, not only at the end of prefill.
    pub chunked: bool,
    /// Compress every this many decode steps (0 = never).
    pub every: usize,
    /// ThinK: share of key channels each head prunes, once, at its first compression (later entries store only the
    /// kept channels).
    pub think: Option<f64>,
    needs: Needs,
    bufs: Vec<HeadBuf>,
    targets: Vec<usize>,
}

impl Press {
    /// The press for `spec` on a model shaped like `mc`; None when there is nothing to do (every entry kept, channels
    /// untouched).
    pub fn new(spec: &KvSpec, mc: &ModelConfig) -> Result<Option<Press>> {
        let o = &spec.options;
        let (parts, budget) = match (spec.method.build, spec.budget) {
            (None, _) if o.think.is_none() => return Ok(None),
            // Every entry kept, ThinK prunes key channels: a press that evicts nothing.
            (None, _) => (None, Budget::Ratio(1.0)),
            (Some(build), Some(b)) => (Some(build(spec, mc)?), b),
            (Some(_), None) => bail!("KV method '{}' needs a budget", spec.method.name),
        };
        let mut needs = parts
            .as_ref()
            .map_or(Needs::default(), |p| p.scorer.needs());
        if o.think.is_some() {
            needs.window = needs.window.max(think::DEFAULT_WINDOW);
        }
        let (scorer, roles, merger, pyramid, ada) = match parts {
            Some(p) => (
                Some(p.scorer),
                p.roles,
                p.merger,
                o.pyramid.or(p.pyramid),
                p.adakv.or(o.adakv),
            ),
            None => (None, None, None, None, None),
        };
        Ok(Some(Press {
            spec: spec.clone(),
            budget,
            scorer,
            pyramid,
            ada,
            duo: roles,
            merger,
            chunked: o.chunked,
            every: o.every(),
            think: o.think,
            needs,
            bufs: Vec::new(),
            targets: Vec::new(),
        }))
    }

    pub fn needs(&self) -> Needs {
        self.needs
    }

    /// Entries every head may keep on average after seeing `seen` tokens.
    pub fn keep(&self, seen: usize) -> usize {
        self.budget.keep(seen)
    }

    /// Compresses every stream of `cache` to its budget for `seen` tokens, then returns freed blocks to the allocator.
    pub fn compress(
        &mut self,
        cache: &mut KvCache,
        obs: &QueryWindow,
        acc: &mut AttnAcc,
        mc: &ModelConfig,
        seen: usize,
    ) {
        self.bufs.resize_with(mc.n_kv_heads, HeadBuf::default);
        if self.scorer.is_some() {
            self.evict(cache, obs, acc, mc, seen);
        }
        if let Some(ratio) = self.think {
            self.prune_channels(cache, obs, mc, ratio);
        }
        cache.trim();
    }

    /// Drops every head's lowest-scored entries down to its target (merging them first for KVMerger).
    fn evict(
        &mut self,
        cache: &mut KvCache,
        obs: &QueryWindow,
        acc: &mut AttnAcc,
        mc: &ModelConfig,
        seen: usize,
    ) {
        let (nl, nkv, hk, hv) = (mc.n_layers, mc.n_kv_heads, mc.head_dim_k, mc.head_dim_v);
        let group = mc.n_heads / nkv;
        let k = self.budget.keep(seen);
        // Layers whose cache keeps only a sliding window are left alone: the window is their budget. Allocation
        // across layers (pyramid, duo) shares the budget among the other, global, layers.
        let windowed: Vec<bool> = (0..nl).map(|l| cache.window(l).is_some()).collect();
        let n_global = windowed.iter().filter(|&&w| !w).count();
        self.targets.clear();
        match &self.duo {
            Some(roles) => {
                let skip: Vec<bool> = (0..nl * nkv).map(|si| windowed[si / nkv]).collect();
                roles.targets(k, seen, &skip, &mut self.targets)
            }
            None => {
                let mut g = 0;
                for &w in &windowed {
                    let t = match self.pyramid {
                        Some(p) if !w => p.layer_keep(g, n_global, k, seen, snapkv::WINDOW),
                        _ => k,
                    };
                    g += !w as usize;
                    self.targets.extend(std::iter::repeat_n(t, nkv));
                }
            }
        }
        let Press {
            scorer,
            ada,
            merger,
            needs,
            bufs,
            targets,
            ..
        } = self;
        let (ada, needs, merger) = (*ada, *needs, merger.as_ref());
        let Some(scorer) = scorer.as_deref() else {
            return;
        };
        for layer in (0..nl).filter(|&l| !windowed[l]) {
            let t = &mut targets[layer * nkv..(layer + 1) * nkv];
            let lens: Vec<usize> = (0..nkv).map(|h| cache.len(layer, h)).collect();
            let over = |h: usize, t: &[usize]| lens[h] > t[h];
            let work = match ada {
                Some(_) => lens.iter().sum::<usize>() > t.iter().sum::<usize>(),
                None => (0..nkv).any(|h| over(h, t)),
            };
            if !work {
                continue;
            }
            let window = if mc.is_local(layer) {
                mc.sliding_window
            } else {
                None
            };
            let cache_ro: &KvCache = cache;
            let acc_ro: &AttnAcc = acc;
            let t_ro: &[usize] = t;
            bufs.par_iter_mut().enumerate().for_each(|(h, b)| {
                if ada.is_none() && !over(h, t_ro) {
                    return;
                }
                b.g.gather(cache_ro, layer, h, needs.values);
                obs.gather(
                    layer,
                    h * group..(h + 1) * group,
                    hk,
                    needs.window,
                    &mut b.g.q,
                    &mut b.g.q_pos,
                );
                let acc_h: &[f32] = if needs.accumulate && acc_ro.is_on() {
                    &acc_ro.acc[layer * nkv + h]
                } else {
                    &[]
                };
                let o = HeadObs {
                    layer,
                    n_layers: nl,
                    head: h,
                    hk,
                    hv,
                    keys: &b.g.keys,
                    values: &b.g.values,
                    pos: &b.g.pos,
                    queries: &b.g.q,
                    q_pos: &b.g.q_pos,
                    group,
                    acc: acc_h,
                    scale: mc.attn_scale,
                    window,
                    keep: t_ro[h].min(lens[h]),
                    seen,
                };
                b.scores.resize(lens[h], 0.0);
                scorer.score(&o, &mut b.tmp, &mut b.scores);
            });
            if let Some(alpha) = ada {
                let scores: Vec<&[f32]> = bufs.iter().map(|b| b.scores.as_slice()).collect();
                adakv::redistribute(alpha, &scores, t);
            }
            for (h, b) in bufs.iter_mut().enumerate() {
                if !over(h, t) {
                    continue;
                }
                top_k(&b.scores, t[h], &mut b.order, &mut b.keep);
                if let Some(m) = merger {
                    m.merge(b, hk, hv);
                    for &i in &b.dirty {
                        cache.write(
                            layer,
                            h,
                            i,
                            &b.g.keys[i * hk..(i + 1) * hk],
                            &b.g.values[i * hv..(i + 1) * hv],
                        );
                    }
                }
                let keep = &b.keep;
                cache.retain(layer, h, |i, _| keep[i]);
                acc.retain(layer * nkv + h, keep);
            }
        }
    }

    /// ThinK: prunes the key channels of every head not pruned yet, scored against its recent queries. Layers whose
    /// cache keeps only a sliding window are left alone (like evictions).
    fn prune_channels(
        &mut self,
        cache: &mut KvCache,
        obs: &QueryWindow,
        mc: &ModelConfig,
        ratio: f64,
    ) {
        let (nkv, hk) = (mc.n_kv_heads, mc.head_dim_k);
        let group = mc.n_heads / nkv;
        let b = &mut self.bufs[0];
        for layer in 0..mc.n_layers {
            if cache.window(layer).is_some() {
                continue;
            }
            for h in 0..nkv {
                if cache.key_channels(layer, h).is_some() || cache.len(layer, h) == 0 {
                    continue;
                }
                obs.gather(
                    layer,
                    h * group..(h + 1) * group,
                    hk,
                    think::DEFAULT_WINDOW,
                    &mut b.g.q,
                    &mut b.g.q_pos,
                );
                if !b.g.q.is_empty() {
                    think::prune(cache, layer, h, &b.g.q, ratio);
                }
            }
        }
    }
}

/// Marks the `k` best entries of `scores` in `keep`: higher score first, ties to the higher index (the more recent
/// entry). `order` is scratch.
pub fn top_k(scores: &[f32], k: usize, order: &mut Vec<u32>, keep: &mut Vec<bool>) {
    let n = scores.len();
    keep.clear();
    if k >= n {
        keep.resize(n, true);
        return;
    }
    keep.resize(n, false);
    if k == 0 {
        return;
    }
    order.clear();
    order.extend(0..n as u32);
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(b.cmp(&a))
    });
    for &i in &order[..k] {
        keep[i as usize] = true;
    }
}
