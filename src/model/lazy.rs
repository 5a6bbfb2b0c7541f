//! LazyLLM (Fu et al., "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference", Apple, arXiv
//! 2407.14057): progressive token pruning in prefill, with an auxiliary cache from which pruned tokens are revived.
//!
//! **Importance.** A token's importance before pruning layer L is the attention the prompt's last token (the one that
//! generates the next token) pays it at the layer before, averaged over query heads. hayloft reads it at the last
//! layer before L whose attention is global (every layer for Llama/Qwen2; on Gemma 3 a sliding-window layer has already
//! dropped what lies outside its window, so a stage must follow a global layer), and a stage's importance layer may
//! not come before the previous stage's layer.
//!
//! **Schedule** ([`LazyPlan`]): stages (layer, keep share), layers ascending, shares non-increasing. At a stage's
//! layer the prompt keeps its top `ceil(keep · n)` tokens by importance (n = the prompt's tokens; the last token is
//! always kept); the paper's schedule is not published, so it is a configuration (see `methods::prefill`).
//!
//! **Prefill.** The pass runs layer by layer over the rows still active (not chunk by chunk over all layers): the
//! whole prompt is known, so at each layer every active row is computed in chunks of at most the scratch's capacity,
//! each chunk appending its keys and values before attending (a chunk sees the earlier chunks of the same layer, as in
//! a chunked dense prefill). With every share 1.0 that is the dense chunked prefill bit for bit: the same rows meet
//! the same cache contents in the same order. At a stage the pruned rows leave the pass: their hidden state (the
//! input of the stage's layer) goes into the stage's aux cache, and from that layer on they append nothing, so later
//! layers' streams hold fewer entries (positions stay the original ones). Only the last token's logits come out.
//!
//! **Revival** (every `revive_every` decode steps, 0 = never): the decode step runs as a pass whose rows are the new
//! token plus revived tokens. At each stage the new token's head-averaged attention at the stage's importance layer
//! scores every entry there; an entry is *selected* if it ranks in the top `ceil(keep · N)` (N = tokens held), the
//! stage's share of the whole context, as in prefill. A selected token in the stage's aux cache joins the pass (best
//! scores first, at most [`Q_TILE`] − 1 rows beside the new token); a token that joined at an earlier stage and is
//! no longer selected leaves again into this stage's aux cache. A joined row is computed from its aux hidden state
//! with its own position: it appends its keys and values at each layer, then attends causally (the cache's
//! visibility is by position), so a revived token's entries are exactly what a dense pass computes for it when every
//! token before it is present at those layers, and each (token, layer) entry is computed at most once. Revived
//! entries are appended after newer ones, so a stream is no longer in position order: the new token is the last row
//! of the single attention tile every row shares, whose causal bound is then the newest position (see [`Q_TILE`]);
//! truncation of such a cache uses [`truncate`]. Caches that keep only a sliding window cannot recompute an old
//! token's window, so revival needs every layer global (or `--swa-full`).

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;

use super::blend::{attn_params, RowRope};
use super::{Model, ModelConfig, Scratch};
use crate::attention::{attend, Q_TILE};
use crate::kv::{KvCache, WINDOW_STEP};

/// One pruning stage: from `layer` on, the prompt keeps a `keep` share of its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stage {
    pub layer: usize,
    pub keep: f32,
}

/// A LazyLLM schedule and its revival rule, checked against a model by [`LazyPlan::check`].
#[derive(Clone, Debug, PartialEq)]
pub struct LazyPlan {
    pub stages: Vec<Stage>,
    /// Revival runs every this many decode steps (0 = never: pruning is then one-shot eviction).
    pub revive_every: usize,
}

impl LazyPlan {
    /// A clear error for a schedule this model cannot run: a layer out of range (the first layer cannot prune: no
    /// attention precedes it), layers not strictly ascending, a share outside (0, 1] or growing, a stage with no
    /// global layer to read importance from after the previous stage, revival on a model whose cache slides.
    pub fn check(&self, c: &ModelConfig) -> Result<()> {
        let mut prev: Option<Stage> = None;
        for st in &self.stages {
            if st.layer == 0 || st.layer >= c.n_layers {
                bail!(
                    "lazyllm: stage at layer {} is out of range: the model has {} layers, stages go from 1 to {}",
                    st.layer,
                    c.n_layers,
                    c.n_layers - 1
                );
            }
            if !(st.keep > 0.0 && st.keep <= 1.0) {
                bail!(
                    "lazyllm: keep share {} at layer {} must be in (0, 1]",
                    st.keep,
                    st.layer
                );
            }
            let Some(li) = importance_layer(c, st.layer) else {
                bail!(
                    "lazyllm: stage at layer {} has no global-attention layer before it to read importance from",
                    st.layer
                );
            };
            if let Some(p) = prev {
                if st.layer <= p.layer {
                    bail!(
                        "lazyllm: stage layers must ascend: {} comes after {}",
                        st.layer,
                        p.layer
                    );
                }
                if st.keep > p.keep {
                    bail!(
                        "lazyllm: keep shares must not grow: {} at layer {} after {} at layer {}",
                        st.keep,
                        st.layer,
                        p.keep,
                        p.layer
                    );
                }
                if li < p.layer {
                    bail!(
                        "lazyllm: stage at layer {} reads importance at global layer {li}, before the previous stage \
                         at layer {} (sliding-window layers in between)",
                        st.layer,
                        p.layer
                    );
                }
            }
            prev = Some(*st);
        }
        Ok(())
    }

    /// The default stages for a model: keep 0.7, 0.4, 0.2 of the prompt from about a quarter, a half and three
    /// quarters of the depth on, each moved to the first layer after a global one (and dropped past the end).
    pub fn default_stages(c: &ModelConfig) -> Vec<Stage> {
        let mut out: Vec<Stage> = Vec::new();
        for (num, keep) in [(1, 0.7), (2, 0.4), (3, 0.2)] {
            let target = (c.n_layers * num).div_ceil(4).max(1);
            let Some(layer) = (target..c.n_layers).find(|&l| {
                c.layer_window(l - 1).is_none() && out.last().is_none_or(|s| l > s.layer)
            }) else {
                continue;
            };
            out.push(Stage { layer, keep });
        }
        out
    }
}

/// The last global-attention layer before `layer`.
fn importance_layer(c: &ModelConfig, layer: usize) -> Option<usize> {
    (0..layer).rev().find(|&l| c.layer_window(l).is_none())
}

/// The tokens one stage pruned: their hidden states at the input of the stage's layer.
#[derive(Clone, Default)]
struct Aux {
    pos: Vec<u32>,
    /// len × dim
    h: Vec<f32>,
}

impl Aux {
    fn push(&mut self, pos: u32, h: &[f32]) {
        self.pos.push(pos);
        self.h.extend_from_slice(h);
    }

    /// Removes entry i (the last one takes its place).
    fn swap_remove(&mut self, i: usize, dim: usize) {
        let last = self.pos.len() - 1;
        self.pos.swap_remove(i);
        if i != last {
            self.h.copy_within(last * dim..(last + 1) * dim, i * dim);
        }
        self.h.truncate(last * dim);
    }
}

/// Figures of a session's LazyLLM runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyCounts {
    /// (token, layer) computations prefill skipped.
    pub skipped: usize,
    /// Tokens revived at decode (a token revived at two stages counts twice).
    pub revived: usize,
}

/// One sequence's LazyLLM state: the plan, the aux cache of every stage and the pass's buffers (reused).
#[derive(Clone, Default)]
pub struct LazyState {
    pub plan: Option<LazyPlan>,
    aux: Vec<Aux>,
    pub counts: LazyCounts,
    /// Decode steps seen (revival runs when a multiple of `revive_every`).
    steps: usize,
    /// m × dim: the active rows' residual stream, in position order.
    h: Vec<f32>,
    /// m: their positions.
    p: Vec<u32>,
    /// Their RoPE tables (m rows).
    rope: RowRope,
    /// n_heads·hd_k: the last row's query at the importance layer.
    qlast: Vec<f32>,
    /// n_heads × entries: one head's scores, then probabilities.
    probs: Vec<f32>,
    /// Per entry of the importance layer: position and head-averaged attention.
    entry_pos: Vec<u32>,
    entry_score: Vec<f32>,
    /// Score by position (prefill: offset by the prompt's first position; decode: absolute), −1 = none.
    by_pos: Vec<f32>,
    /// Scratch: row indices, key row, keep flags, sort buffers.
    idx: Vec<u32>,
    /// hd_k × block_tokens: one block's keys, channel by channel (`kt[c · bt + j]`).
    kt: Vec<f32>,
    kbuf: Vec<f32>,
    flags: Vec<bool>,
    tmp_h: Vec<f32>,
    tmp_p: Vec<u32>,
    /// Selection threshold of the stage being scored (decode).
    tau: f32,
}

impl LazyState {
    pub fn new(plan: LazyPlan) -> Self {
        Self {
            aux: vec![Aux::default(); plan.stages.len()],
            plan: Some(plan),
            ..Default::default()
        }
    }

    /// Bytes the aux cache holds (hidden states and positions).
    pub fn aux_bytes(&self) -> usize {
        self.aux.iter().map(|a| 4 * (a.h.len() + a.pos.len())).sum()
    }

    /// Tokens waiting in the aux cache of each stage.
    pub fn aux_tokens(&self) -> Vec<usize> {
        self.aux.iter().map(|a| a.pos.len()).collect()
    }

    /// Forgets every pruned token at position ≥ n (the cache's side: [`truncate`]).
    pub fn truncate_pos(&mut self, n: u32, dim: usize) {
        for a in &mut self.aux {
            let mut i = 0;
            while i < a.pos.len() {
                if a.pos[i] >= n {
                    a.swap_remove(i, dim);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Prefills `tokens` at positions `pos0..` with pruning, appending their keys and values to `cache` (each layer
    /// only for the rows still active there). The last token's final residual stream is left in `s.x[..dim]` for
    /// `model.logits(s, 0..1)`.
    pub fn prefill(
        &mut self,
        model: &Model,
        tokens: &[u32],
        pos0: u32,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) {
        let Some(plan) = self.plan.take() else {
            return;
        };
        let c = model.config();
        let (n, dim, cap) = (tokens.len(), c.dim, s.cap);
        self.p.clear();
        self.p.extend(pos0..pos0 + n as u32);
        self.h.resize(n * dim, 0.0);
        for a in (0..n).step_by(cap) {
            let b = (a + cap).min(n);
            model.embed_rows(&tokens[a..b], &self.p[a..b], s);
            self.h[a * dim..b * dim].copy_from_slice(&s.x[..(b - a) * dim]);
        }
        model.rope_rows(&self.p, &mut self.rope);
        let mut stage = 0;
        for l in 0..c.n_layers {
            if stage < plan.stages.len() && plan.stages[stage].layer == l {
                let k = ((plan.stages[stage].keep as f64 * n as f64).ceil() as usize).max(1);
                self.prune_prefill(stage, k, pos0, dim);
                stage += 1;
            }
            let m = self.p.len();
            self.counts.skipped += n - m;
            for a in (0..m).step_by(cap) {
                let b = (a + cap).min(m);
                self.run_rows(model, l, a..b, cache, s);
            }
            let next = plan.stages.get(stage).map(|st| st.layer);
            if next.is_some_and(|nl| importance_layer(c, nl) == Some(l)) {
                self.score_last(model, l, cache, s, (m - 1) % cap + 1); // rows of the last chunk
                self.by_pos.clear();
                self.by_pos.resize(n, -1.0);
                for (&p, &v) in self.entry_pos.iter().zip(&self.entry_score) {
                    if p >= pos0 && p < pos0 + n as u32 {
                        self.by_pos[(p - pos0) as usize] = v;
                    }
                }
            }
        }
        let m = self.p.len();
        s.x[..dim].copy_from_slice(&self.h[(m - 1) * dim..m * dim]);
        self.plan = Some(plan);
    }

    /// One decode step of `token` at `pos`; with revival due (every `revive_every` steps, when some stage holds
    /// pruned tokens) the step runs as a LazyLLM pass, else as the model's ordinary forward. The token's final residual
    /// stream is left in `s.x[..dim]`.
    pub fn decode(
        &mut self,
        model: &Model,
        token: u32,
        pos: u32,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) {
        let every = self.plan.as_ref().map_or(0, |p| p.revive_every);
        let due = every > 0 && self.steps.is_multiple_of(every);
        self.steps += 1;
        if !due || self.aux.iter().all(|a| a.pos.is_empty()) {
            model.forward(&[token], &[pos], cache, s);
            return;
        }
        let Some(plan) = self.plan.take() else {
            return;
        };
        let c = model.config();
        let dim = c.dim;
        self.p.clear();
        self.p.push(pos);
        model.embed_rows(&[token], &self.p, s);
        self.h.clear();
        self.h.extend_from_slice(&s.x[..dim]);
        model.rope_rows(&self.p, &mut self.rope);
        let held = pos as usize + 1;
        let room = Q_TILE.min(s.cap);
        let mut stage = 0;
        for l in 0..c.n_layers {
            if stage < plan.stages.len() && plan.stages[stage].layer == l {
                self.revive(model, stage, room, dim);
                stage += 1;
            }
            let m = self.p.len();
            self.run_rows(model, l, 0..m, cache, s);
            let next = plan.stages.get(stage);
            if let Some(st) = next.filter(|st| importance_layer(c, st.layer) == Some(l)) {
                self.score_last(model, l, cache, s, m);
                let k = ((st.keep as f64 * held as f64).ceil() as usize).max(1);
                self.threshold(k, held);
            }
        }
        let m = self.p.len();
        s.x[..dim].copy_from_slice(&self.h[(m - 1) * dim..m * dim]);
        self.plan = Some(plan);
    }

    /// Layer `l` for active rows `rows` (at most `s.cap`): embeds nothing, reads and writes `self.h`.
    fn run_rows(
        &mut self,
        model: &Model,
        l: usize,
        rows: std::ops::Range<usize>,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) {
        let c = model.config();
        let (dim, n) = (c.dim, rows.len());
        let (a, b) = (rows.start, rows.end);
        s.x[..n * dim].copy_from_slice(&self.h[a * dim..b * dim]);
        model.layer_qkv(l, &self.rope, rows, s);
        attend_rows(c, l, &self.p[a..b], cache, s);
        model.layer_out(l, n, s);
        self.h[a * dim..b * dim].copy_from_slice(&s.x[..n * dim]);
    }

    /// The last active row's head-averaged attention over every entry of layer `l` (its query is row `last_rows − 1`
    /// of the scratch's q, from the last chunk just run) into `entry_pos` / `entry_score`.
    fn score_last(
        &mut self,
        model: &Model,
        l: usize,
        cache: &KvCache,
        s: &Scratch,
        last_rows: usize,
    ) {
        let c = model.config();
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim_k);
        let qr = nh * hd;
        let r = last_rows - 1;
        self.qlast.clear();
        self.qlast.extend_from_slice(&s.q[r * qr..(r + 1) * qr]);
        let qpos = self.p[self.p.len() - 1];
        let len = cache.len(l, 0);
        let group = nh / nkv;
        self.entry_pos.clear();
        self.entry_pos.resize(len, 0);
        self.entry_score.clear();
        self.entry_score.resize(len, 0.0);
        self.probs.clear();
        self.probs.resize(group * len, 0.0);
        self.kbuf.resize(hd, 0.0);
        let bt = cache.cfg.block_tokens;
        self.kt.resize(hd * bt, 0.0);
        let scale = c.attn_scale;
        for g in 0..nkv {
            debug_assert_eq!(cache.len(l, g), len, "every KV head holds the same tokens");
            for (bi, blk) in cache.blocks(l, g).enumerate() {
                let (n, e0) = (blk.n, bi * bt);
                // The block's keys as f32, channel-major: an f16 block converts in one vector call, any other
                // storage key by key.
                match blk.f16_parts() {
                    Some((k, _)) if k.len() == hd * bt => {
                        crate::kernels::f16_to_f32_slice(k.reinterpret_cast(), &mut self.kt)
                    }
                    _ => {
                        for j in 0..n {
                            blk.read_key(j, &mut self.kbuf);
                            for (ch, &x) in self.kbuf.iter().enumerate() {
                                self.kt[ch * bt + j] = x;
                            }
                        }
                    }
                }
                self.entry_pos[e0..e0 + n].copy_from_slice(&blk.pos[..n]);
                // Each head's dot products for the block's entries at once, channel by channel (the same sums, in
                // the same order, as one entry at a time).
                for h in 0..group {
                    let q = &self.qlast[(g * group + h) * hd..][..hd];
                    let out = &mut self.probs[h * len + e0..][..n];
                    out.fill(0.0);
                    for (ch, &qc) in q.iter().enumerate() {
                        for (o, &k) in out.iter_mut().zip(&self.kt[ch * bt..][..n]) {
                            *o += qc * k;
                        }
                    }
                    for (o, &p) in out.iter_mut().zip(&blk.pos[..n]) {
                        *o = if p <= qpos {
                            *o * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
            }
            for row in self.probs.chunks_exact_mut(len.max(1)).take(group) {
                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - mx).exp();
                    z += *x;
                }
                let w = 1.0 / (z * nh as f32);
                for (acc, x) in self.entry_score.iter_mut().zip(row.iter()) {
                    *acc += x * w;
                }
            }
        }
    }

    /// Prefill stage `stage`: keeps the `k` active rows of highest importance (`by_pos`, offset by `pos0`; the last
    /// row always), in position order; the others go to the stage's aux cache.
    fn prune_prefill(&mut self, stage: usize, k: usize, pos0: u32, dim: usize) {
        let m = self.p.len();
        if k >= m {
            return;
        }
        let score = |st: &Self, i: u32| -> f32 {
            if i as usize == m - 1 {
                f32::INFINITY
            } else {
                st.by_pos[(st.p[i as usize] - pos0) as usize]
            }
        };
        self.idx.clear();
        self.idx.extend(0..m as u32);
        let mut idx = std::mem::take(&mut self.idx);
        idx.select_nth_unstable_by(k - 1, |&a, &b| score(self, b).total_cmp(&score(self, a)));
        self.flags.clear();
        self.flags.resize(m, false);
        for &i in &idx[..k] {
            self.flags[i as usize] = true;
        }
        self.idx = idx;
        for i in 0..m {
            if !self.flags[i] {
                self.aux[stage].push(self.p[i], &self.h[i * dim..(i + 1) * dim]);
            }
        }
        self.compact(dim);
    }

    /// Keeps the rows `flags` marks, in order: h, p and the RoPE tables.
    fn compact(&mut self, dim: usize) {
        let half = self.rope.cos.len() / self.p.len().max(1);
        let mut w = 0;
        for r in 0..self.p.len() {
            if !self.flags[r] {
                continue;
            }
            if w != r {
                self.p[w] = self.p[r];
                self.h.copy_within(r * dim..(r + 1) * dim, w * dim);
                for t in [
                    &mut self.rope.cos,
                    &mut self.rope.sin,
                    &mut self.rope.cos_local,
                    &mut self.rope.sin_local,
                ] {
                    if !t.is_empty() {
                        t.copy_within(r * half..(r + 1) * half, w * half);
                    }
                }
            }
            w += 1;
        }
        self.p.truncate(w);
        self.h.truncate(w * dim);
        for t in [
            &mut self.rope.cos,
            &mut self.rope.sin,
            &mut self.rope.cos_local,
            &mut self.rope.sin_local,
        ] {
            t.truncate(w * half);
        }
    }

    /// Decode: the k-th largest entry score becomes the threshold; scores by absolute position into `by_pos`.
    fn threshold(&mut self, k: usize, held: usize) {
        self.by_pos.clear();
        self.by_pos.resize(held, -1.0);
        for (&p, &v) in self.entry_pos.iter().zip(&self.entry_score) {
            if let Some(x) = self.by_pos.get_mut(p as usize) {
                *x = v;
            }
        }
        let len = self.entry_score.len();
        self.tau = if k >= len {
            f32::NEG_INFINITY
        } else {
            self.probs.clear();
            self.probs.extend_from_slice(&self.entry_score);
            let (_, kth, _) = self
                .probs
                .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        };
    }

    /// Decode stage `stage`: rows that joined earlier and are no longer selected leave into the stage's aux cache;
    /// selected aux tokens join (best first, up to `room` rows in all); rows back in position order.
    fn revive(&mut self, model: &Model, stage: usize, room: usize, dim: usize) {
        if self.by_pos.is_empty() {
            return;
        }
        let m = self.p.len();
        self.flags.clear();
        self.flags.resize(m, true);
        for i in 0..m - 1 {
            if self.by_pos[self.p[i] as usize] < self.tau {
                self.flags[i] = false;
                self.aux[stage].push(self.p[i], &self.h[i * dim..(i + 1) * dim]);
            }
        }
        self.compact(dim);
        let aux = &self.aux[stage];
        self.idx.clear();
        self.idx.extend(
            (0..aux.pos.len() as u32)
                .filter(|&i| self.by_pos[aux.pos[i as usize] as usize] >= self.tau),
        );
        let free = room.saturating_sub(self.p.len());
        if self.idx.is_empty() || free == 0 {
            self.by_pos.clear();
            return;
        }
        let by_pos = &self.by_pos;
        self.idx.sort_unstable_by(|&a, &b| {
            by_pos[aux.pos[b as usize] as usize].total_cmp(&by_pos[aux.pos[a as usize] as usize])
        });
        self.idx.truncate(free);
        self.counts.revived += self.idx.len();
        // New rows: the joiners, then the rows already in the pass, sorted by position (the new token stays last).
        self.tmp_p.clear();
        self.tmp_h.clear();
        for &i in &self.idx {
            let i = i as usize;
            self.tmp_p.push(aux.pos[i]);
            self.tmp_h.extend_from_slice(&aux.h[i * dim..(i + 1) * dim]);
        }
        self.tmp_p.extend_from_slice(&self.p);
        self.tmp_h.extend_from_slice(&self.h);
        self.idx.sort_unstable_by(|a, b| b.cmp(a));
        for k in 0..self.idx.len() {
            let i = self.idx[k] as usize;
            self.aux[stage].swap_remove(i, dim);
        }
        let n = self.tmp_p.len();
        self.idx.clear();
        self.idx.extend(0..n as u32);
        let tp = &self.tmp_p;
        self.idx.sort_unstable_by_key(|&i| tp[i as usize]);
        self.p.clear();
        self.h.clear();
        for &i in &self.idx {
            let i = i as usize;
            self.p.push(self.tmp_p[i]);
            self.h
                .extend_from_slice(&self.tmp_h[i * dim..(i + 1) * dim]);
        }
        model.rope_rows(&self.p, &mut self.rope);
        self.by_pos.clear();
    }
}

/// Appends the rows' keys and values (in `s.k`, `s.v`) to layer `l` and writes their attention output into `s.att`,
/// as the ordinary pass does: a sliding-window layer takes the rows [`WINDOW_STEP`] at a time.
fn attend_rows(c: &ModelConfig, l: usize, pos: &[u32], cache: &mut KvCache, s: &mut Scratch) {
    let params = attn_params(c, l);
    let n = pos.len();
    let (qr, kr, vr) = (
        c.n_heads * c.head_dim_k,
        c.n_kv_heads * c.head_dim_k,
        c.n_kv_heads * c.head_dim_v,
    );
    let ar = c.n_heads * c.head_dim_v;
    let step = if params.window.is_some() {
        WINDOW_STEP
    } else {
        n
    };
    let mut a = 0;
    while a < n {
        let b = (a + step).min(n);
        cache.append(l, &pos[a..b], &s.k[a * kr..b * kr], &s.v[a * vr..b * vr]);
        let t0 = std::time::Instant::now();
        attend(
            cache,
            l,
            &s.q[a * qr..b * qr],
            &pos[a..b],
            &mut s.att[a * ar..b * ar],
            &params,
            &mut s.attn,
        );
        s.seq.attn_ns += t0.elapsed().as_nanos() as u64;
        a = b;
    }
}

/// Forgets every entry of `cache` at position ≥ n, whatever the order of a stream's entries (revival appends old
/// positions after new ones, which [`KvCache::truncate_pos`]'s search does not expect).
pub fn truncate(cache: &mut KvCache, n: u32) -> anyhow::Result<()> {
    cache.check_truncate_pos(n)?;
    for l in 0..cache.cfg.n_layers {
        for h in 0..cache.cfg.n_kv_heads {
            cache.retain(l, h, |_, p| p < n);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "lazy_tests.rs"]
mod tests;
