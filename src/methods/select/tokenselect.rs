//! TokenSelect — Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via
//! Dynamic Token-Level KV Cache Selection" (arXiv 2411.02886, 2024).
//!
//! Mechanism: token-level selection. At every decode step each query head scores **every** candidate key (the entries
//! between the always-kept first `n_init` and last `n_local`) by raw q·k, takes a softmax over the candidates, and the
//! softmaxes of **all** query heads of the layer are summed ("soft voting"). One top-k of the summed scores is taken per
//! layer and every KV head reads the same tokens. The Selection Cache skips the scoring while queries stay alike: a
//! layer keeps the query its last selection was made with, and while the current query's cosine similarity to it is at
//! least a threshold, the previous top-k is reused.
//!
//! Defaults from the official code (pzs19/TokenSelect, `config/*-token-retrieval.yaml`, `patcher/token_retrieval.py`):
//! `n_init` 128 sinks and `n_local` 512 recent entries always read; selection in every layer (no dense layers) and at
//! every step; scores are raw q·k (no 1/√d) softmaxed per query head. The official `top_k` is a count (2048); here the
//! total budget B is hayloft's (sinks and recent window included), so top-k = B − 128 − 512: at 4K tokens `@0.125`
//! (B = 512) leaves **no** top-k (the method is then sinks + recent window only), `@0.25` leaves 384, at 8K `@0.125`
//! leaves 384, at 32K `@0.125` leaves 3456; `sink=`, `recent=` change the split. Selection runs only when the budget
//! is below the context (the official `n_init + top_k + n_local < cached tokens`, [`Frame`]'s dense rule).
//!
//! Selection Cache (`reuse=T`, cosine threshold T, default 0.9 = the paper's; `reuse=off` turns it off): the query
//! kept per layer is the **concatenation of all query heads** of the layer (the official `query_fingerprints_cache`,
//! num_heads × head_dim, compared by one cosine similarity), taken from the step that last scored and replaced only
//! when the layer scores again. A hit reads no key. The released code has `QUERY_CACHE = False` and its cache branch
//! calls `get_topk_tokens` without its `indices` argument (it would raise), so it was never run; the paper uses 0.9.
//! The kept query is forgotten at the end of each prompt's prefill (the official retriever is per request) and a
//! cache edit (eviction) since the selection forces a miss. [`TokenSelect::counts`] exposes hits and misses.
//!
//! Deviations: hayloft caches keys **after** RoPE; TokenSelect caches them before RoPE and rotates the scoring query
//! to positions `n_local…` (`QUERY_ROTATE`), so its scores are position-agnostic at a fixed distance of about
//! `n_local`. Here the scoring query is the step's real (rotated) query against the rotated keys, i.e. the model's own
//! q·k logits at their true distances. For the Selection Cache the query is rotated back to position 0 first, so
//! consecutive steps compare as the official rotated-to-a-fixed-position queries do (without it, RoPE's fast channel
//! pairs turn by about a radian per step and the similarity would mostly measure the position change); the inverse
//! RoPE uses the model's base and dimension without linear scaling (Gemma 3's global-layer scaling factor is not in
//! `ModelConfig`). The official Triton kernel maps query head h to KV head `h % n_kv` (modulo); hayloft uses the
//! model's grouping `h / group`. The optional max-pool of the scores (`KERNEL_SIZE`, off by default) is not built.
//! When eviction has left the KV heads of a layer with different entries, votes are summed per token position (each
//! head's entries carry their position), the top-k is over positions, and a head reads the chosen positions it holds
//! (never more than its own budget); positions read for that are counted too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;

use super::{top_k, Frame, FrameDefaults, SelectOptions, Step};
use crate::attention::Selection;
use crate::kernels::{
    add_softmax, merge_softmax_parts,
    rowdot::{cols_dot_f16_next, cols_dot_f16_next_strided, MAX_VECTORS},
    softmax_part,
};
use crate::kv::{BlockData, BlockView, KvCache};
use crate::methods::spec::Budget;
use crate::model::{ModelConfig, QueryWindow, RopeStyle, SelectCx, Selector};

/// Always-kept first entries (official `n_init`).
pub const N_INIT: usize = 128;
/// Always-kept newest entries (official `n_local`).
pub const N_LOCAL: usize = 512;
/// Selection Cache cosine threshold (the paper's 0.9; the official code's `similarity_threshold`).
pub const SIMILARITY_THRESHOLD: f32 = 0.9;
/// The Selection Cache is on by default, at [`SIMILARITY_THRESHOLD`].
pub const REUSE_DEFAULT: Option<f32> = Some(SIMILARITY_THRESHOLD);

/// TokenSelect's frame: 128 sinks, 512 recent, no dense layers, reselect every step.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: N_INIT,
    recent: N_LOCAL,
    dense: 0,
    interval: 1,
};

/// Parses a Selection Cache threshold: a cosine similarity in (0, 1], or `off` (stored as +∞: no query reaches it).
pub fn parse_reuse(name: &str, v: &str) -> Result<f32> {
    if v == "off" {
        return Ok(f32::INFINITY);
    }
    match v.parse::<f32>() {
        Ok(t) if t > 0.0 && t <= 1.0 => Ok(t),
        _ => bail!("{name}={v}: expected a cosine similarity threshold in (0, 1], e.g. {name}=0.9, or {name}=off"),
    }
}

/// A threshold as written in a spec.
pub fn reuse_text(t: f32) -> String {
    if t.is_finite() {
        t.to_string()
    } else {
        "off".to_string()
    }
}

/// Selection Cache outcomes, shared with whoever asked for them ([`TokenSelect::counts`]).
#[derive(Debug, Default)]
pub struct CacheCounts {
    /// Layer steps that reused the previous selection (no key read).
    pub hits: AtomicU64,
    /// Layer steps that scored every candidate key.
    pub misses: AtomicU64,
}

impl CacheCounts {
    /// (hits, misses).
    pub fn get(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// Not a candidate in the vote array.
const ABSENT: f32 = f32::NEG_INFINITY;
/// Chosen, in the vote array.
const CHOSEN: f32 = f32::INFINITY;

pub struct TokenSelect {
    frame: Frame,
    /// Cosine threshold of the Selection Cache (None or +∞ = off).
    reuse: Option<f32>,
    counts: Arc<CacheCounts>,
    /// RoPE of the model, to rotate the kept query back to position 0.
    rope_style: RopeStyle,
    rope_dim: usize,
    inv_freq: Vec<f64>,
    /// Per layer: the query (all heads, rotated back) its kept selection was made with, whether there is one, and the
    /// cache's edit count then.
    anchor: Vec<f32>,
    anchored: Vec<bool>,
    anchor_edits: Vec<u64>,
    /// The current query rotated back, and the cos/sin it used (for `trig_pos`).
    fp: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    trig_pos: Option<u32>,
    /// Per KV head: its scoring work, and (votes by position only) per query head of its group the softmax over its
    /// candidates (g × n).
    work: Vec<HeadWork>,
    probs: Vec<Vec<f32>>,
    /// Per KV head: the raw scores q·k behind `probs` (g × n), handed to the attention kernel with the selection made
    /// from them ([`crate::attention::GivenScores`]: it then reads no key of the chosen entries); `scored`: whether
    /// this step scored (the voting heads did).
    raw: Vec<Vec<f32>>,
    scored: bool,
    /// Per (KV head, query head of its group): the softmax's max and inverse sum over the raw scores.
    stats: Vec<(f32, f32)>,
    /// Scoring tasks of a step: (KV head, first block, end block), and one scratch per task.
    plan: Vec<(usize, usize, usize)>,
    bufs: Vec<ScoreBuf>,
    /// Votes by entry index (aligned heads) or position, ABSENT where not a candidate; the keys touched this step.
    vote: Vec<f32>,
    touched: Vec<u32>,
    scores: Vec<f32>,
    idx: Vec<u32>,
}

impl TokenSelect {
    pub fn new(budget: Budget, o: &SelectOptions, mc: &ModelConfig) -> Self {
        Self::build(
            budget,
            o,
            mc.n_layers,
            mc.n_heads * mc.head_dim_k,
            (mc.rope_style, mc.rope_dim, mc.rope_base),
        )
    }

    /// `q_width`: query heads × head_dim_k; `rope`: (style, rotated dimensions, base) of the model.
    pub fn build(
        budget: Budget,
        o: &SelectOptions,
        n_layers: usize,
        q_width: usize,
        rope: (RopeStyle, usize, f32),
    ) -> Self {
        let (rope_style, rope_dim, base) = rope;
        let half = rope_dim / 2;
        let inv_freq = (0..half)
            .map(|i| (base as f64).powf(-2.0 * i as f64 / rope_dim as f64))
            .collect();
        Self {
            frame: Frame::new(budget, o, DEFAULTS, n_layers),
            reuse: o.reuse.or(REUSE_DEFAULT).filter(|t| t.is_finite()),
            counts: Arc::default(),
            rope_style,
            rope_dim,
            inv_freq,
            anchor: vec![0.0; n_layers * q_width],
            anchored: vec![false; n_layers],
            anchor_edits: vec![0; n_layers],
            fp: vec![0.0; q_width],
            cos: vec![0.0; half],
            sin: vec![0.0; half],
            trig_pos: None,
            work: Vec::new(),
            probs: Vec::new(),
            raw: Vec::new(),
            scored: false,
            stats: Vec::new(),
            plan: Vec::new(),
            bufs: Vec::new(),
            vote: Vec::new(),
            touched: Vec::new(),
            scores: Vec::new(),
            idx: Vec::new(),
        }
    }

    /// The Selection Cache's hit and miss counters (shared: they keep counting after the selector moves into a session).
    pub fn counts(&self) -> Arc<CacheCounts> {
        self.counts.clone()
    }

    /// The last token's query, every head, rotated back to position 0, into `self.fp`.
    fn fingerprint(&mut self, cx: &SelectCx) {
        let hk = cx.cache.cfg.head_dim_k;
        let t = cx.pos.len() - 1;
        let p = cx.pos[t];
        let width = cx.n_q_heads * hk;
        self.fp.copy_from_slice(&cx.q[t * width..][..width]);
        let half = self.rope_dim / 2;
        if half == 0 {
            return;
        }
        if self.trig_pos != Some(p) {
            for i in 0..half {
                let a = p as f64 * self.inv_freq[i];
                self.cos[i] = a.cos() as f32;
                self.sin[i] = a.sin() as f32;
            }
            self.trig_pos = Some(p);
        }
        for head in self.fp.chunks_exact_mut(hk) {
            for i in 0..half {
                let (ia, ib) = match self.rope_style {
                    RopeStyle::Norm => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (a, b, c, s) = (head[ia], head[ib], self.cos[i], self.sin[i]);
                head[ia] = a * c + b * s;
                head[ib] = b * c - a * s;
            }
        }
    }

    /// Whether the layer's kept selection can be reused for this query (and, if not, keeps this query as the anchor
    /// of the selection about to be made).
    fn cache_hit(&mut self, cx: &SelectCx) -> bool {
        let Some(threshold) = self.reuse else {
            return false;
        };
        let l = cx.layer;
        let w = self.fp.len();
        if cx.n_q_heads * cx.cache.cfg.head_dim_k != w {
            return false;
        }
        self.fingerprint(cx);
        let anchor = &mut self.anchor[l * w..][..w];
        let valid = self.anchored[l]
            && self.anchor_edits[l] == cx.cache.edits()
            && self.frame.kept_mut(l).n_heads() == cx.cache.cfg.n_kv_heads;
        if valid {
            let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
            for (&x, &y) in self.fp.iter().zip(anchor.iter()) {
                dot += x as f64 * y as f64;
                na += x as f64 * x as f64;
                nb += y as f64 * y as f64;
            }
            if na > 0.0 && nb > 0.0 && dot / (na * nb).sqrt() >= threshold as f64 {
                return true;
            }
        }
        anchor.copy_from_slice(&self.fp);
        self.anchored[l] = true;
        self.anchor_edits[l] = cx.cache.edits();
        false
    }

    /// Whether some KV head of the layer has to choose among its candidates (room for a top-k, and fewer than all).
    fn voting(&self, cx: &SelectCx) -> bool {
        (0..cx.cache.cfg.n_kv_heads).any(|h| {
            let m = self.frame.middle(cx, h);
            m.k > 0 && m.k < m.hi - m.lo
        })
    }

    /// Scores every candidate of every KV head that has to choose (the heads in parallel), sums the query heads'
    /// softmaxes, and keeps one top-k for the layer.
    fn choose(&mut self, cx: &SelectCx) {
        let nh = cx.cache.cfg.n_kv_heads;
        let (g, l) = (cx.group(), cx.layer);
        // Heads hold the same entries in the same order unless the cache was edited (eviction) or their lengths
        // differ: then an entry index names the same token in every head, and no position needs reading.
        let len0 = cx.cache.len(l, 0);
        let aligned = cx.cache.edits() == 0 && (0..nh).all(|h| cx.cache.len(l, h) == len0);
        // One top-k for the layer, within every choosing head's budget.
        self.work.resize_with(nh, HeadWork::default);
        let mut k = usize::MAX;
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            let w = &mut self.work[h];
            w.m = (m.lo, m.hi, m.k);
            w.votes = m.k > 0 && m.k < m.hi - m.lo;
            if w.votes {
                k = k.min(m.k);
            }
        }
        let mut kept = std::mem::take(self.frame.kept_mut(l));
        kept.reset(nh);
        self.touched.clear();
        // Whether every voting head has the same candidates, entries lo..hi in order (the top-k is then added as
        // runs to every one of them at once).
        let mut same = false;
        if k != usize::MAX {
            self.score(cx, aligned);
            // Soft voting: every query head's softmax over its candidates, summed per token.
            let mut read = 0;
            let mut middles = self.work.iter().filter(|w| w.votes).map(|w| (w.m.0, w.m.1));
            let first = middles.next();
            same = aligned && first.is_some() && middles.all(|m| Some(m) == first);
            if let (true, Some((lo, hi))) = (same, first) {
                // Every voting head has the same candidates, entries lo..hi in order: the votes are plain sums of
                // the rows (the same additions, in the same order, as the general path below), and the chosen
                // entries are marked for the reading loop.
                let n = hi - lo;
                self.scores.clear();
                self.scores.resize(n, 0.0);
                // Summed straight from the raw scores and each row's softmax stats, split over the team by tokens
                // (no row's softmax is written out).
                let (work, raw, stats) = (&self.work, &self.raw, &self.stats);
                crate::kernels::team::for_each_chunk_mut(&mut self.scores, VOTE_CHUNK, |c, out| {
                    let j0 = c * VOTE_CHUNK;
                    for (h, _) in work.iter().enumerate().filter(|(_, w)| w.votes) {
                        for i in 0..g {
                            let row = &raw[h][i * n + j0..][..out.len()];
                            add_softmax(out, row, stats[h * g + i]);
                        }
                    }
                });
                read += work
                    .iter()
                    .filter(|w| w.votes)
                    .map(|w| w.read)
                    .sum::<usize>();
                top_k(&self.scores, k, &mut self.idx);
                // The chosen entries (ascending) as runs, once for every voting head.
                for_each_run(&self.idx, |a, b| {
                    for (h, w) in self.work.iter().enumerate().filter(|(_, w)| w.votes) {
                        debug_assert_eq!((w.m.0, w.m.1), (lo, hi));
                        kept.add(h, lo + a as usize, lo + b as usize);
                    }
                });
            }
            if !same {
                if aligned {
                    // The candidates of a head are its entries lo..hi (`prepare` leaves them out when aligned).
                    for w in self.work.iter_mut().filter(|w| w.votes) {
                        w.cand.clear();
                        w.cand.extend(w.m.0 as u32..w.m.1 as u32);
                    }
                }
                self.fill_probs(g);
            }
            for (w, probs) in self
                .work
                .iter()
                .zip(&self.probs)
                .filter(|(w, _)| w.votes && !same)
            {
                read += w.read;
                let need = w.cand.iter().max().map_or(0, |&x| x as usize + 1);
                if self.vote.len() < need {
                    self.vote.resize(need, ABSENT);
                }
                let n = w.cand.len();
                for i in 0..g {
                    for (&p, &c) in probs[i * n..][..n].iter().zip(&w.cand) {
                        let v = &mut self.vote[c as usize];
                        if *v == ABSENT {
                            *v = 0.0;
                            self.touched.push(c);
                        }
                        *v += p;
                    }
                }
            }
            cx.cache.note_read(read);
            if !same {
                self.scores.clear();
                self.scores
                    .extend(self.touched.iter().map(|&c| self.vote[c as usize]));
                top_k(&self.scores, k, &mut self.idx);
                for &i in &self.idx {
                    self.vote[self.touched[i as usize] as usize] = CHOSEN;
                }
            }
        }
        // Every head reads the chosen tokens it holds (a head whose whole middle fits reads it all).
        for (h, w) in self.work.iter().enumerate() {
            let (lo, hi, mk) = w.m;
            if mk == 0 {
                continue;
            }
            if !w.votes {
                kept.add(h, lo, hi);
                continue;
            }
            if same {
                continue; // added with the top-k above
            }
            if aligned {
                // The candidates are entries lo..hi, their votes in place: the runs from 64-entry masks.
                chosen_runs(&self.vote[lo..hi], |a, b| kept.add(h, lo + a, lo + b));
                continue;
            }
            let mut run: Option<usize> = None;
            for (j, &c) in w.cand.iter().enumerate() {
                let on = self.vote[c as usize] == CHOSEN;
                match (on, run) {
                    (true, None) => run = Some(lo + j),
                    (false, Some(a)) => {
                        kept.add(h, a, lo + j);
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(a) = run {
                kept.add(h, a, hi);
            }
        }
        for &c in &self.touched {
            self.vote[c as usize] = ABSENT;
        }
        kept.finish();
        *self.frame.kept_mut(l) = kept;
    }

    /// Scores every candidate of every voting head into `self.raw`, and each query head's softmax stats over them
    /// into `self.stats` (each task's piece of every row while its scores are in cache, merged in column order after).
    /// The heads' blocks are cut into pieces of [`SCORE_BLOCKS`] that run over the pool: a model with one KV head
    /// (Gemma 3 270M) has a single head to score, and one task per head left every other thread idle. The pieces are
    /// fixed by the candidates alone, never by the threads, so neither the scores nor the stats depend on the pool.
    fn score(&mut self, cx: &SelectCx, aligned: bool) {
        let (bt, g) = (cx.cache.cfg.block_tokens, cx.group());
        self.raw.resize_with(self.work.len(), Vec::new);
        self.scored = true;
        self.plan.clear();
        for (h, (w, raw)) in self.work.iter_mut().zip(&mut self.raw).enumerate() {
            if !w.votes {
                continue;
            }
            w.prepare(cx, h, aligned);
            let (lo, hi, _) = w.m;
            // Every entry is written by the scoring tasks below: only a longer row set needs new (zeroed) room.
            raw.resize(g * (hi - lo), 0.0);
            let (mut b, b1) = (lo / bt, hi.div_ceil(bt));
            while b < b1 {
                let e = (b + SCORE_BLOCKS).min(b1);
                self.plan.push((h, b, e));
                b = e;
            }
        }
        if self.bufs.len() < self.plan.len() {
            self.bufs.resize_with(self.plan.len(), ScoreBuf::default);
        }
        struct Out(*mut f32);
        // SAFETY: each task writes only its own columns (its blocks' candidates) of its head's rows.
        unsafe impl Sync for Out {}
        unsafe impl Send for Out {}
        let outs: smallvec::SmallVec<[Out; 8]> =
            self.raw.iter_mut().map(|p| Out(p.as_mut_ptr())).collect();
        let outs = &outs;
        let (work, plan) = (&self.work, &self.plan);
        crate::kernels::team::for_each_chunk_mut(&mut self.bufs[..plan.len()], 1, |i, buf| {
            let (h, b0, b1) = plan[i];
            let (w, buf) = (&work[h], &mut buf[0]);
            let (lo, hi, _) = w.m;
            // A block's keys or scores (hk or g rows of bt); a key, then the scores of a block read key by key.
            buf.row.resize(cx.cache.cfg.head_dim_k.max(g) * bt, 0.0);
            buf.key
                .resize(cx.cache.cfg.head_dim_k.max(g * bt) + g * bt, 0.0);
            buf.key_bytes = 0;
            let (c0, c1) = (lo.max(b0 * bt) - lo, hi.min(b1 * bt) - lo);
            for b in b0..b1 {
                let view = cx.cache.block(cx.layer, h, b);
                // Blocks are separate allocations: ask for the next one's keys while this one is scored (an f16
                // block's a line per channel as the kernel goes, any other kind at once).
                let mut next: &[half::f16] = &[];
                if b + 1 < b1 {
                    let nv = cx.cache.block(cx.layer, h, b + 1);
                    match nv.data {
                        BlockData::F16 { k, .. } if nv.channels.is_none() => next = k,
                        _ => nv.prefetch_keys(),
                    }
                }
                let (s0, s1) = (lo.max(b * bt) - b * bt, hi.min((b + 1) * bt) - b * bt);
                if aligned {
                    buf.key_bytes += (s1 - s0) * block_key_bytes(&view);
                }
                // SAFETY: head h's g rows of hi − lo scores; this block's columns b·bt + s0 − lo .. + (s1 − s0) lie
                // inside every row, and only this task writes them.
                unsafe {
                    let dst = (outs[h].0.add(b * bt + s0 - lo), hi - lo);
                    score_block(
                        &view,
                        bt,
                        (s0, s1),
                        (&w.qg, g),
                        dst,
                        (&mut buf.row, &mut buf.key),
                        next,
                    );
                }
            }
            // This task's piece of each row's softmax stats, while its scores are in cache.
            buf.parts.clear();
            for i in 0..g {
                // SAFETY: this task's columns c0..c1 of head h's row i, written above by this task alone.
                let z = unsafe {
                    std::slice::from_raw_parts(outs[h].0.add(i * (hi - lo) + c0), c1 - c0)
                };
                buf.parts.push(softmax_part(z));
            }
        });
        if aligned {
            // The key bytes (× bt) the tasks counted, per head (`prepare` left `read` at 0).
            for (&(h, _, _), buf) in self.plan.iter().zip(&self.bufs) {
                self.work[h].read += buf.key_bytes;
            }
            for w in self.work.iter_mut().filter(|w| w.votes) {
                w.read /= bt;
            }
        }
        // Each query head's softmax stats over its candidates, from the tasks' pieces in column order.
        self.stats.clear();
        self.stats
            .resize(self.work.len() * g, (f32::NEG_INFINITY, 0.0));
        let (plan, bufs) = (&self.plan, &self.bufs);
        for (h, w) in self.work.iter().enumerate() {
            if !w.votes || w.m.0 == w.m.1 {
                continue;
            }
            for i in 0..g {
                let parts = plan
                    .iter()
                    .zip(bufs)
                    .filter(|(t, _)| t.0 == h)
                    .map(|(_, b)| b.parts[i]);
                self.stats[h * g + i] = merge_softmax_parts(parts);
            }
        }
    }

    /// Each voting head's query heads' softmaxes over its candidates into `self.probs` (g × n), from the raw scores
    /// and their stats: for the votes by position, when the heads' candidates differ.
    fn fill_probs(&mut self, g: usize) {
        self.probs.resize_with(self.work.len(), Vec::new);
        for (h, (w, probs)) in self.work.iter().zip(&mut self.probs).enumerate() {
            let n = w.m.1 - w.m.0;
            probs.clear();
            probs.resize(g * n, 0.0);
            if !w.votes || n == 0 {
                continue;
            }
            for (i, row) in probs.chunks_exact_mut(n).enumerate() {
                add_softmax(row, &self.raw[h][i * n..][..n], self.stats[h * g + i]);
            }
        }
    }
}

/// Calls `add(a, b)` for each maximal run `[a, b)` of consecutive values in `idx` (ascending).
fn for_each_run(idx: &[u32], mut add: impl FnMut(u32, u32)) {
    debug_assert!(idx.is_sorted());
    let Some(&first) = idx.first() else {
        return;
    };
    let (mut a, mut b) = (first, first + 1);
    for &i in &idx[1..] {
        if i != b {
            add(a, b);
            a = i;
        }
        b = i + 1;
    }
    add(a, b);
}

/// Calls `add(a, b)` for each maximal run `[a, b)` of CHOSEN entries of `vote`, in order: 64 entries to a mask
/// (the comparison vectorizes), then the runs' edges by counting zeros, so the work follows the runs, not the entries.
fn chosen_runs(vote: &[f32], mut add: impl FnMut(usize, usize)) {
    let mut start: Option<usize> = None;
    for (ci, chunk) in vote.chunks(64).enumerate() {
        let mut m = 0u64;
        for (i, &x) in chunk.iter().enumerate() {
            m |= ((x == CHOSEN) as u64) << i;
        }
        let (base, len) = (ci * 64, chunk.len() as u32);
        let mut at = 0u32;
        while at < len {
            match start {
                None => {
                    let rest = m >> at;
                    if rest == 0 {
                        break;
                    }
                    at += rest.trailing_zeros();
                    start = Some(base + at as usize);
                }
                Some(a) => {
                    let rest = !m >> at;
                    if rest == 0 {
                        break;
                    }
                    at += rest.trailing_zeros();
                    if at >= len {
                        break;
                    }
                    add(a, base + at as usize);
                    start = None;
                }
            }
        }
    }
    if let Some(a) = start {
        add(a, vote.len());
    }
}

/// Tokens per task of the soft vote's sum.
const VOTE_CHUNK: usize = 2048;

/// Blocks per scoring task (512 keys at 32-token blocks).
const SCORE_BLOCKS: usize = 16;

/// One scoring task's scratch: a block's scores or keys as f32, a key; and the key bytes it read × block tokens.
#[derive(Default)]
struct ScoreBuf {
    row: Vec<f32>,
    key: Vec<f32>,
    key_bytes: usize,
    /// Per query row of the group: its softmax piece over this task's columns ([`softmax_part`]).
    parts: Vec<(f32, f32)>,
}

/// One KV head's scoring: its middle (lo, hi, k), whether it votes, its queries and candidates.
#[derive(Default)]
struct HeadWork {
    m: (usize, usize, usize),
    votes: bool,
    /// The group's queries (g × hk).
    qg: Vec<f32>,
    /// The candidates' vote keys (entry indices when the heads are aligned, else positions), in entry order.
    cand: Vec<u32>,
    /// Bytes read for it (keys, and positions when not aligned).
    read: usize,
}

impl HeadWork {
    /// The group's queries, the candidates and the bytes their scoring reads.
    fn prepare(&mut self, cx: &SelectCx, h: usize, aligned: bool) {
        let (bt, g, l) = (cx.cache.cfg.block_tokens, cx.group(), cx.layer);
        let (lo, hi, _) = self.m;
        self.qg.clear();
        for i in 0..g {
            self.qg.extend_from_slice(cx.last_query(h * g + i));
        }
        self.cand.clear();
        self.read = 0;
        if aligned {
            // Candidates are entries lo..hi (filled in only if a vote by entry needs them); the scoring tasks count
            // the key bytes as they visit the blocks.
            return;
        }
        let (mut key_bytes, mut pos_bytes) = (0, 0); // key bytes × bt
        for b in lo / bt..hi.div_ceil(bt) {
            let view = cx.cache.block(l, h, b);
            let (s0, s1) = (lo.max(b * bt) - b * bt, hi.min((b + 1) * bt) - b * bt);
            key_bytes += (s1 - s0) * block_key_bytes(&view);
            if aligned {
                self.cand.extend((b * bt + s0) as u32..(b * bt + s1) as u32);
            } else {
                self.cand.extend_from_slice(&view.pos[s0..s1]);
                pos_bytes += 4 * (s1 - s0);
            }
        }
        self.read = key_bytes / bt + pos_bytes;
    }
}

/// Bytes of one block's keys (codes and scales for a quantized block), per `block_tokens` entries.
fn block_key_bytes(view: &BlockView) -> usize {
    match view.data {
        BlockData::F16 { k, .. } => 2 * k.len(),
        BlockData::F32 { k, .. } => 4 * k.len(),
        BlockData::Quant(q) => q.k.len() + 2 * q.k_ms.len(),
        // Offloaded: the read from disk is counted where it happens.
        BlockData::Disk(_) => 0,
    }
}

/// Raw q·k of slots `[s0, s1)` of a block for the `g` queries in `qg` (g × hk): query i's score of slot s goes to
/// `dst.0[i · dst.1 + s − s0]`.
///
/// # Safety
/// `dst.0` must be valid for writes at `i · dst.1 + j` for i < g, j < s1 − s0, and nothing else may access those
/// elements meanwhile.
unsafe fn score_block(
    view: &BlockView,
    bt: usize,
    (s0, s1): (usize, usize),
    (qg, g): (&[f32], usize),
    dst: (*mut f32, usize),
    (row, key): (&mut [f32], &mut [f32]),
    next: &[half::f16],
) {
    let hk = qg.len() / g;
    let w = s1 - s0;
    let channel = |ci: usize| view.channels.map_or(ci, |ch| ch[ci] as usize);
    // The g rows of w scores computed into `out` (g × w) are copied to their place.
    let place = |out: &[f32]| {
        for (i, r) in out.chunks_exact(w).enumerate().take(g) {
            // SAFETY: the caller's rows (above).
            unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), dst.0.add(i * dst.1), w) };
        }
    };
    match view.data {
        BlockData::F16 { k, .. } if view.channels.is_none() && g <= MAX_VECTORS => {
            // Every key of the block against the g queries in one pass over its channels (SIMD kernel): a whole
            // block straight into the rows, part of one through the scratch.
            let next = if next.len() >= hk * bt {
                &next[..hk * bt]
            } else {
                &[]
            };
            if w == bt {
                // SAFETY: the caller's rows, bt wide here.
                unsafe { cols_dot_f16_next_strided(&k[..hk * bt], bt, qg, dst.0, dst.1, next) };
            } else {
                let all = &mut row[..g * bt];
                cols_dot_f16_next(&k[..hk * bt], bt, qg, all, next);
                for i in 0..g {
                    // SAFETY: the caller's rows (above).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            all[i * bt + s0..].as_ptr(),
                            dst.0.add(i * dst.1),
                            w,
                        )
                    };
                }
            }
        }
        BlockData::F16 { k, .. } => {
            // The block's keys at once (one conversion call, vectorized), then as the f32 case.
            let rows = &mut row[..view.hk * bt];
            k[..view.hk * bt].convert_to_f32_slice(rows);
            let out = &mut key[..g * w];
            out.fill(0.0);
            for ci in 0..view.hk {
                let c = channel(ci);
                let src = &rows[ci * bt + s0..ci * bt + s1];
                for i in 0..g {
                    let qc = qg[i * hk + c];
                    for (o, r) in out[i * w..][..w].iter_mut().zip(src) {
                        *o += qc * r;
                    }
                }
            }
            place(out);
        }
        BlockData::F32 { k, .. } => {
            let out = &mut row[..g * w];
            out.fill(0.0);
            for ci in 0..view.hk {
                let c = channel(ci);
                let src = &k[ci * bt + s0..ci * bt + s1];
                for i in 0..g {
                    let qc = qg[i * hk + c];
                    for (o, r) in out[i * w..][..w].iter_mut().zip(src) {
                        *o += qc * r;
                    }
                }
            }
            place(out);
        }
        // Quantized, or offloaded to disk (read whole once, through the per-entry reader's buffer).
        BlockData::Quant(_) | BlockData::Disk(_) => {
            let (key, out) = key.split_at_mut(hk);
            let out = &mut out[..g * w];
            for s in s0..s1 {
                view.read_key(s, key);
                for i in 0..g {
                    let q = &qg[i * hk..][..hk];
                    out[i * w + s - s0] = q.iter().zip(key.iter()).map(|(a, b)| a * b).sum();
                }
            }
            place(out);
        }
    }
}

impl Selector for TokenSelect {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        self.scored = false;
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => {
                if !self.voting(cx) {
                    // No room for a top-k (the budget holds only sinks and recent entries): nothing to score.
                    self.choose(cx);
                } else if self.cache_hit(cx) {
                    self.counts.hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counts.misses.fetch_add(1, Ordering::Relaxed);
                    self.choose(cx);
                }
            }
        }
        self.frame.finish(cx, out);
        // The scores just computed for this query go with the selection: the kernel takes them instead of reading
        // the chosen keys again (a key scattered in a block stored channel-major touches the whole block's keys).
        if self.scored {
            for (h, (w, raw)) in self.work.iter().zip(&mut self.raw).enumerate() {
                let (lo, hi, _) = w.m;
                if w.votes && lo < hi {
                    let given = out.scores_mut(h);
                    given.clear();
                    given.push_swap(lo, hi, raw);
                }
            }
        }
        true
    }

    fn end_prefill(&mut self, _cache: &KvCache, _obs: &QueryWindow) {
        self.anchored.fill(false);
    }

    fn index_bytes(&self) -> usize {
        // The kept queries, one per layer (the official `query_fingerprints_cache`), when the cache is on.
        if self.reuse.is_some() {
            self.anchor.len() * 4
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvDtype};
    use crate::model::{apply_rope, rope_tables};
    use crate::testutil::Rng;

    const HK: usize = 8;
    const NH: usize = 2;
    const NQ: usize = 4; // group 2
    const LEN: usize = 200;
    const ROPE: (RopeStyle, usize, f32) = (RopeStyle::Norm, HK, 10000.0);

    #[test]
    fn chosen_runs_are_the_maximal_runs_of_chosen_entries() {
        let mut rng = Rng::seeded(3);
        for n in [0, 1, 5, 63, 64, 65, 127, 128, 129, 300] {
            for density in [0.0f32, 0.05, 0.5, 0.95, 1.0] {
                let vote: Vec<f32> = (0..n)
                    .map(|_| {
                        if (rng.below(1000) as f32) < density * 1000.0 {
                            CHOSEN
                        } else {
                            0.5
                        }
                    })
                    .collect();
                let mut want = Vec::new();
                let mut run = None;
                for (i, &x) in vote.iter().enumerate() {
                    match (x == CHOSEN, run) {
                        (true, None) => run = Some(i),
                        (false, Some(a)) => {
                            want.push((a, i));
                            run = None;
                        }
                        _ => {}
                    }
                }
                if let Some(a) = run {
                    want.push((a, n));
                }
                let mut got = Vec::new();
                chosen_runs(&vote, |a, b| got.push((a, b)));
                assert_eq!(got, want, "{n} entries at density {density}");
                // The same runs from the chosen indices, ascending (the top-k's order).
                let idx: Vec<u32> = (0..n as u32)
                    .filter(|&i| vote[i as usize] == CHOSEN)
                    .collect();
                let mut from_idx = Vec::new();
                for_each_run(&idx, |a, b| from_idx.push((a as usize, b as usize)));
                assert_eq!(from_idx, want, "{n} indices at density {density}");
            }
        }
    }

    /// One layer, two KV heads of 200 small random keys; `planted` entries of KV head 1 get a large key along `u`.
    fn cache(dtype: KvDtype, planted: &[usize], u: &[f32]) -> KvCache {
        let mut c = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: NH,
            head_dim_k: HK,
            head_dim_v: 4,
            block_tokens: 8,
            dtype,
            windows: Vec::new(),
        });
        let mut rng = Rng::seeded(7);
        let mut k = rng.vec(LEN * NH * HK, 0.3);
        for &e in planted {
            k[(e * NH + 1) * HK..][..HK].copy_from_slice(u);
        }
        let pos: Vec<u32> = (0..LEN as u32).collect();
        c.append(0, &pos, &k, &vec![0.5; LEN * NH * 4]);
        c
    }

    /// Query heads: small random, except head `strong` = 3·`u`, all rotated to `pos`.
    fn query(seed: u64, strong: usize, u: &[f32], pos: u32) -> Vec<f32> {
        let mut q = Rng::seeded(seed).vec(NQ * HK, 0.3);
        for (x, &y) in q[strong * HK..][..HK].iter_mut().zip(u) {
            *x = 3.0 * y;
        }
        rotate(&mut q, pos);
        q
    }

    fn rotate(q: &mut [f32], pos: u32) {
        let (mut c, mut s) = (vec![0.0; HK / 2], vec![0.0; HK / 2]);
        rope_tables(&[pos], HK, ROPE.2, 1.0, &mut c, &mut s);
        apply_rope(q, NQ, HK, ROPE.0, &c, &s, HK);
    }

    fn selector(reuse: Option<f32>) -> TokenSelect {
        let o = SelectOptions {
            sink: Some(4),
            recent: Some(8),
            reuse: Some(reuse.unwrap_or(f32::INFINITY)),
            ..Default::default()
        };
        // 4 sinks + 8 recent + a top-3.
        TokenSelect::build(Budget::Tokens(15), &o, 1, NQ * HK, ROPE)
    }

    fn select(t: &mut TokenSelect, c: &KvCache, q: &[f32], pos: u32) -> (Selection, u64) {
        let cx = SelectCx {
            cache: c,
            layer: 0,
            q,
            pos: &[pos],
            n_q_heads: NQ,
            local: false,
        };
        let mut out = Selection::default();
        c.take_read();
        assert!(t.select(&cx, &mut out));
        (out, c.take_read())
    }

    fn unit() -> Vec<f32> {
        let u = [1.0, 0.5, -0.8, 0.2, 0.7, -0.3, 0.4, 0.9];
        let n = u.iter().map(|x| x * x).sum::<f32>().sqrt();
        u.iter().map(|x| 2.0 * x / n).collect()
    }

    #[test]
    fn one_heads_planted_tokens_are_chosen_for_every_kv_head() {
        let u = unit();
        // 25 blocks of 8: entries 50 and 51 are scored by the first task (16 blocks), 170 by the second.
        let planted = [50, 51, 170];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let c = cache(dtype, &planted, &u);
            let mut t = selector(None);
            // Query head 2 belongs to KV head 1 (2 / group); the official modulo map would send it to KV head 0.
            let (out, read) = select(&mut t, &c, &query(1, 2, &u, LEN as u32), LEN as u32);
            let want = [(0, 4), (50, 52), (170, 171), (192, 200)];
            assert_eq!(out.ranges(1), &want[..], "{dtype:?}");
            assert_eq!(
                out.ranges(0),
                out.ranges(1),
                "{dtype:?}: one top-k for every KV head"
            );
            // Scoring read every candidate key of both KV heads: 188 entries × 8 channels × bytes.
            let b = if dtype == KvDtype::F32 { 4 } else { 2 };
            assert_eq!(read as usize, NH * (LEN - 12) * HK * b);
        }
    }

    /// A scoring step hands its raw scores q·k over each head's middle to the kernel with the selection; a step that
    /// reuses the selection (Selection Cache hit) hands none, since they would be the previous query's.
    #[test]
    fn a_scoring_step_hands_its_scores_to_the_kernel() {
        let u = unit();
        let c = cache(KvDtype::F16, &[50, 51, 170], &u);
        let mut t = selector(Some(0.9));
        let p = LEN as u32;
        let q = query(1, 2, &u, p);
        let (out, _) = select(&mut t, &c, &q, p);
        let mut key = vec![0.0f32; HK];
        for h in 0..NH {
            let given = out.scores(h).expect("a scoring step gives its scores");
            let (lo, hi) = (given.lo(), given.hi());
            assert_eq!(given.parts().len(), 1, "one part");
            assert_eq!(
                (lo, hi),
                (4, LEN - 8),
                "the middle, sinks and recent entries left out"
            );
            let n = hi - lo;
            for i in 0..NQ / NH {
                let qr = &q[(h * NQ / NH + i) * HK..][..HK];
                for e in lo..hi {
                    c.block(0, h, e / 8).read_key(e % 8, &mut key);
                    let want: f32 = qr.iter().zip(&key).map(|(a, b)| a * b).sum();
                    let got = given.parts()[0].rows[i * n + e - lo];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "head {h} row {i} entry {e}: {got} vs {want}"
                    );
                }
            }
        }
        // The hit answers into the same selection (as a model's scratch keeps one): the old scores are dropped.
        let mut again = out;
        let cx = SelectCx {
            cache: &c,
            layer: 0,
            q: &q,
            pos: &[p],
            n_q_heads: NQ,
            local: false,
        };
        assert!(t.select(&cx, &mut again));
        assert_eq!(t.counts().get(), (1, 1), "a hit");
        assert!(again.scores(0).is_none() && again.scores(1).is_none());
    }

    #[test]
    fn query_heads_of_different_kv_heads_vote_into_one_top_k() {
        // Query head 0 (KV head 0) is sure of entry 140, query head 2 (KV head 1) of entries 60 and 61: the layer's one
        // top-3 takes all three for both KV heads (a top-3 per KV head would fill each with its own head's picks).
        let u = unit();
        let mut c = cache(KvDtype::F32, &[60, 61], &u);
        let v = [0.5; 4];
        c.write(0, 0, 140, &u, &v);
        let mut q = Rng::seeded(3).vec(NQ * HK, 0.3);
        q[2 * HK..3 * HK]
            .iter_mut()
            .zip(&u)
            .for_each(|(x, y)| *x = 3.0 * y);
        q[..HK].iter_mut().zip(&u).for_each(|(x, y)| *x = 3.0 * y);
        rotate(&mut q, LEN as u32);
        let mut t = selector(None);
        let (out, _) = select(&mut t, &c, &q, LEN as u32);
        assert_eq!(out.ranges(0), &[(0, 4), (60, 62), (140, 141), (192, 200)]);
        assert_eq!(out.ranges(0), out.ranges(1));
    }

    #[test]
    fn a_repeated_query_hits_the_selection_cache_and_reads_no_key() {
        let u = unit();
        let c = cache(KvDtype::F16, &[50, 51, 120], &u);
        let mut t = selector(Some(0.9));
        let counts = t.counts();
        let p = LEN as u32;
        let (first, read) = select(&mut t, &c, &query(1, 2, &u, p), p);
        assert!(read > 0);
        assert_eq!(counts.get(), (0, 1));
        // The same query again, and the same query three positions later (compared with RoPE undone): hits, no read.
        let (again, read) = select(&mut t, &c, &query(1, 2, &u, p), p);
        assert_eq!(read, 0);
        assert_eq!(again.ranges(1), first.ranges(1));
        let (q0, q3) = (query(1, 2, &u, p), query(1, 2, &u, p + 3));
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!(
            dot(&q0, &q3) / dot(&q0, &q0) < 0.9,
            "RoPE alone would make this a miss"
        );
        let (_, read) = select(&mut t, &c, &q3, p + 3);
        assert_eq!(read, 0);
        assert_eq!(counts.get(), (2, 1));
        // Another query misses and scores again.
        let (_, read) = select(&mut t, &c, &query(9, 0, &u, p), p);
        assert!(read > 0);
        assert_eq!(counts.get(), (2, 2));
        // A new prompt forgets the kept query.
        t.end_prefill(&c, &QueryWindow::default());
        let (_, read) = select(&mut t, &c, &query(9, 0, &u, p), p);
        assert!(read > 0);
        assert_eq!(counts.get(), (2, 3));
        // Off: every step scores.
        let mut off = selector(None);
        for _ in 0..2 {
            let (_, read) = select(&mut off, &c, &query(1, 2, &u, p), p);
            assert!(read > 0);
        }
        assert_eq!(off.counts().get(), (0, 2));
    }

    #[test]
    fn after_per_head_eviction_the_same_tokens_are_chosen_by_position() {
        let u = unit();
        let mut c = cache(KvDtype::F32, &[50, 51, 120], &u);
        // KV head 0 loses 40 early entries: its entry indices no longer name the same tokens as head 1's.
        c.retain(0, 0, |i, _| !(10..50).contains(&i));
        let mut t = selector(None);
        let (out, read) = select(&mut t, &c, &query(1, 2, &u, LEN as u32), LEN as u32);
        assert_eq!(out.ranges(1), &[(0, 4), (50, 52), (120, 121), (192, 200)]);
        // Head 0 holds 160 entries: positions 50, 51 and 120 are its entries 10, 11 and 80.
        assert_eq!(out.ranges(0), &[(0, 4), (10, 12), (80, 81), (152, 160)]);
        // Keys and positions of both heads' candidates.
        assert_eq!(read as usize, (148 + 188) * (HK * 4 + 4));
    }

    #[test]
    fn reuse_option_parses() {
        assert_eq!(parse_reuse("reuse", "0.9").unwrap(), 0.9);
        assert_eq!(parse_reuse("reuse", "off").unwrap(), f32::INFINITY);
        for bad in ["0", "1.5", "x", "-0.2"] {
            assert!(parse_reuse("reuse", bad).is_err());
        }
        assert_eq!(reuse_text(0.9), "0.9");
        assert_eq!(reuse_text(f32::INFINITY), "off");
    }

    /// Timing harness, not a check (ignored; run by hand): one decode step's TokenSelect selection at an 8K context of
    /// SmolLM2's shapes (3 KV heads of 64, 9 query heads, 32-token f16 blocks, 1024 tokens per head, Selection Cache
    /// off), over `HAYLOFT_HARNESS_LAYERS` layers (default 30, so the keys come from memory), best of many steps.
    /// `cargo test --release --lib tokenselect_decode_8k -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn tokenselect_decode_8k() {
        let (n_q, n_kv, hd, len) = (9usize, 3usize, 64usize, 8192usize);
        let mut rng = Rng::seeded(8);
        let c = super::super::harness_cache(30, (n_kv, hd, len), None, &mut rng);
        let layers = c.cfg.n_layers;
        let q = rng.vec(n_q * hd, 2.0);
        let o = SelectOptions {
            reuse: Some(f32::INFINITY),
            ..Default::default()
        };
        let rope = (RopeStyle::Norm, hd, 10000.0);
        let mut t = TokenSelect::build(Budget::Tokens(1024), &o, layers, n_q * hd, rope);
        let mut out = Selection::default();
        let mut best = f64::INFINITY;
        for _ in 0..(3000 / layers).max(40) {
            best = best.min(super::super::harness_step(&mut t, &c, (&q, n_q), &mut out));
        }
        eprintln!(
            "tokenselect: {:.1} µs per layer call (30 layers: {:.2} ms per token); {} ranges in head 0",
            best * 1e6,
            best * 30e3,
            out.ranges(0).len()
        );
        assert!(best.is_finite() && !out.ranges(0).is_empty());
    }
}
