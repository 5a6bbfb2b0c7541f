//! Decode-time selectors: keep the whole cache, read only what each decode step needs.
//!
//! Each method is one file implementing [`crate::model::Selector`], built from its row in the
//! [registry](super::registry::SELECTORS). What every selector shares is here, in [`Frame`]:
//! - **when to select**: only for single-token (decode) steps, never on sliding-window layers, never on the first
//!   `dense` layers (default 2), and only when some head holds more entries than its budget (below that every
//!   selector reads everything, which is full attention exactly);
//! - **the budget**: `B` entries read per KV head in all, a share of the head's entries (`@0.125`) or a count
//!   (`@1024t`), always-kept parts included;
//! - **always-kept parts**: the first `sink` entries and the newest `recent` entries of every head;
//! - **reuse**: a layer's chosen entries are reused for `interval` decode steps (1 = reselect every step) unless the
//!   cache was edited (eviction) in between;
//! - page scoring over the cache's page summaries, shared by the page-based methods: [`LayerPages`] scores every
//!   page of a layer's heads for their groups' queries in one kernel pass over the team ([`crate::kernels::rowdot`]);
//!   [`page_bound`] is the per-page definition it equals (and what its tests check it against).
//!
//! A selector's own scoring reads go into the cache's read counter, next to attention's.

pub mod hip;
pub mod longheads;
pub mod lserve;
pub mod quest;
pub mod retrieval;
pub mod squeezed;
pub mod tokenselect;

use anyhow::{bail, Result};

use super::spec::Budget;
use crate::attention::Selection;
use crate::kernels::pick;
use crate::kernels::rowdot as rows_dot;
use crate::kv::{BlockData, BlockView, KvCache, PageStat};
use crate::model::SelectCx;

/// Defaults of the options every selector has (each method's row states its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameDefaults {
    pub sink: usize,
    pub recent: usize,
    pub dense: usize,
    pub interval: usize,
}

/// The options every selector has, typed; None = the method's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelectOptions {
    /// Leading entries every head always reads.
    pub sink: Option<usize>,
    /// Newest entries every head always reads.
    pub recent: Option<usize>,
    /// First layers that stay dense.
    pub dense: Option<usize>,
    /// Decode steps a selection is reused for.
    pub interval: Option<usize>,
    /// Page score of the page-based methods.
    pub score: Option<PageStat>,
    /// Tokens per page (page-based methods), per chunk (chunk-based methods).
    pub page: Option<usize>,
    /// DuoAttention head scores (`hayloft heads`): streaming heads read sinks + recent only (LServe).
    pub heads: Option<String>,
    /// Reuse threshold: a layer's previous selection is reused while the query's cosine similarity to the one it was
    /// chosen with stays at or above this (TokenSelect's Selection Cache).
    pub reuse: Option<f32>,
    /// Squeezed Attention's threshold mode: keep the clusters whose estimated attention reaches this quantile of the
    /// observation window's estimates (None = fill the budget best-first).
    pub threshold: Option<f32>,
    /// Squeezed Attention's centroid levels: 1, or 2 for the hierarchical lookup.
    pub levels: Option<usize>,
    /// Candidate queue length of a graph search (RetrievalAttention).
    pub queue: Option<usize>,
    /// RetrievalAttention's index: the graph or a flat scan of its key copy.
    pub index: Option<retrieval::IndexKind>,
    /// With a flat index: whether attention scores the chosen keys again from the cache (true) or takes the scan's
    /// scores (false, the default).
    pub rescore: Option<bool>,
}

/// Parses a whole number option value.
pub fn parse_count(name: &str, v: &str) -> Result<usize> {
    let v = v.strip_suffix('t').unwrap_or(v);
    v.parse()
        .map_err(|_| anyhow::anyhow!("{name}={v}: expected a whole number, e.g. {name}=64"))
}

/// Parses a page score name.
pub fn parse_score(v: &str) -> Result<PageStat> {
    match v {
        "minmax" => Ok(PageStat::MinMax),
        "meanstd" => Ok(PageStat::MeanStd),
        _ => bail!("page score '{v}': expected minmax (Quest's channel min/max bound) or meanstd (mean + std per channel)"),
    }
}

pub fn score_name(s: PageStat) -> &'static str {
    match s {
        PageStat::MinMax => "minmax",
        PageStat::MeanStd => "meanstd",
    }
}

/// The shared part of every selector: budget, always-kept parts, dense layers and reuse.
pub struct Frame {
    pub budget: Budget,
    pub sink: usize,
    pub recent: usize,
    pub dense: usize,
    pub interval: usize,
    /// Per layer: the last chosen entries (always-kept parts excluded), the decode steps since, and the cache's edit
    /// count when chosen.
    kept: Vec<Selection>,
    age: Vec<usize>,
    edits: Vec<u64>,
    /// Per layer, per KV head: the head's length when the layer last chose; entries appended since are always read.
    chosen_len: Vec<Vec<usize>>,
}

/// What a layer does this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read everything (prefill, dense or local layer, context within budget).
    Dense,
    /// Reuse the layer's last choice.
    Reuse,
    /// Choose again.
    Choose,
}

/// The part of one head's stream a method chooses from, and how many entries it may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Middle {
    /// Entries `[lo, hi)`: after the sinks, before the recent window.
    pub lo: usize,
    pub hi: usize,
    /// Entries to choose there.
    pub k: usize,
}

impl Frame {
    pub fn new(budget: Budget, o: &SelectOptions, d: FrameDefaults, n_layers: usize) -> Self {
        Self {
            budget,
            sink: o.sink.unwrap_or(d.sink),
            recent: o.recent.unwrap_or(d.recent),
            dense: o.dense.unwrap_or(d.dense),
            interval: o.interval.unwrap_or(d.interval).max(1),
            kept: vec![Selection::default(); n_layers],
            age: vec![usize::MAX; n_layers],
            edits: vec![0; n_layers],
            chosen_len: vec![Vec::new(); n_layers],
        }
    }

    /// Decides what `cx.layer` does this step (and counts the step toward reuse).
    pub fn step(&mut self, cx: &SelectCx) -> Step {
        let nh = cx.cache.cfg.n_kv_heads;
        if cx.pos.len() != 1 || cx.local || cx.layer < self.dense {
            return Step::Dense;
        }
        let over = (0..nh).any(|h| {
            let len = cx.cache.len(cx.layer, h);
            len > self.budget.keep(len)
        });
        if !over {
            return Step::Dense;
        }
        let l = cx.layer;
        let fresh = self.age[l] != usize::MAX
            && self.age[l] + 1 < self.interval
            && self.edits[l] == cx.cache.edits()
            && self.kept[l].n_heads() == nh;
        if fresh {
            self.age[l] += 1;
            Step::Reuse
        } else {
            self.age[l] = 0;
            self.edits[l] = cx.cache.edits();
            let lens = &mut self.chosen_len[l];
            lens.clear();
            lens.extend((0..nh).map(|h| cx.cache.len(l, h)));
            Step::Choose
        }
    }

    /// Head `h`'s middle region and how many entries to choose in it.
    pub fn middle(&self, cx: &SelectCx, h: usize) -> Middle {
        let len = cx.cache.len(cx.layer, h);
        let total = self.budget.keep(len);
        let sink = self.sink.min(total);
        let recent = self.recent.min(total - sink);
        let (lo, hi) = (sink.min(len), len.saturating_sub(recent).max(sink.min(len)));
        Middle {
            lo,
            hi,
            k: (total - sink - recent).min(hi - lo),
        }
    }

    /// The layer's remembered choice, to be filled by a method on [`Step::Choose`].
    pub fn kept_mut(&mut self, layer: usize) -> &mut Selection {
        &mut self.kept[layer]
    }

    /// Writes the layer's answer: its chosen (or reused) entries plus every head's sinks and recent window.
    pub fn finish(&self, cx: &SelectCx, out: &mut Selection) {
        let nh = cx.cache.cfg.n_kv_heads;
        let kept = &self.kept[cx.layer];
        out.reset(nh);
        for h in 0..nh {
            let len = cx.cache.len(cx.layer, h);
            let m = self.middle(cx, h);
            // In ascending order as a rule (the kept ranges are sorted), so `finish` only merges.
            out.add(h, 0, m.lo);
            for &(a, b) in kept.ranges(h) {
                out.add(h, a as usize, (b as usize).min(len));
            }
            out.add(h, m.hi, len);
            // Entries appended since the layer chose (the current token among them) are always read.
            let since = self.chosen_len[cx.layer].get(h).copied().unwrap_or(len);
            out.add(h, since.min(len), len);
        }
        out.finish();
    }
}

/// Upper bound (min/max summaries) or mean+std estimate of q·k over one page: `meta` is the page's 2 × hk summary,
/// as f32. The definition [`LayerPages`] computes for every page at once.
#[inline]
pub fn page_bound(stat: PageStat, q: &[f32], meta: &[f32]) -> f32 {
    let hk = q.len();
    let (a, b) = meta.split_at(hk);
    let (a, b) = (&a[..hk], &b[..hk]);
    // Eight partial sums so the loop vectorizes.
    let mut acc = [0.0f32; 8];
    match stat {
        PageStat::MinMax => {
            for c in 0..hk {
                let (x, y) = (q[c] * a[c], q[c] * b[c]);
                acc[c % 8] += if x > y { x } else { y };
            }
        }
        PageStat::MeanStd => {
            for c in 0..hk {
                acc[c % 8] += q[c] * a[c] + q[c].abs() * b[c];
            }
        }
    }
    acc.iter().sum()
}

/// Pages `[p0, p1)` of KV head `h` scored for the query heads of its group, one head on the calling thread: the
/// reference [`LayerPages`] is tested against (`out[p − p0]` is the best over the group of [`page_bound`], up to f32
/// summation order).
#[cfg(test)]
fn page_scores(
    stat: PageStat,
    cx: &SelectCx,
    h: usize,
    (p0, p1): (usize, usize),
    w: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let d = 2 * cx.cache.cfg.head_dim_k;
    w.clear();
    scoring_vectors(stat, cx, h, w);
    out.clear();
    out.resize(p1 - p0, f32::NEG_INFINITY);
    let (codes, scales) = cx.cache.page_codes(cx.layer, h);
    score_rows(&codes[p0 * d..p1 * d], &scales[p0..p1], d, w, out);
}

/// Appends the scoring vectors of KV head `h`'s group (group × 2·hk) to `w`. Both page scores are linear in the
/// summary once the query is known: the min/max bound is `q⁺·max + q⁻·min` (a channel's larger product is the max's
/// when q_c ≥ 0, the min's otherwise), the mean+std estimate `q·mean + |q|·std`; so every page is one dot product per
/// query head with these vectors, computed from the summaries' 8-bit copy in place.
fn scoring_vectors(stat: PageStat, cx: &SelectCx, h: usize, w: &mut Vec<f32>) {
    for i in 0..cx.group() {
        let q = cx.last_query(h * cx.group() + i);
        match stat {
            PageStat::MinMax => {
                w.extend(q.iter().map(|&x| x.max(0.0)));
                w.extend(q.iter().map(|&x| x.min(0.0)));
            }
            PageStat::MeanStd => {
                w.extend_from_slice(q);
                w.extend(q.iter().map(|x| x.abs()));
            }
        }
    }
}

/// `out[i]` = the largest dot product of summary row `i` (its 8-bit copy: `codes` out.len() × d, one scale each)
/// with the vectors of `w` (any number of them, d each), on the calling thread (the vectors quantized to 8 bits, see
/// [`rows_dot::rows_dot_max_i8`]); groups of more than [`rows_dot::MAX_VECTORS`] vectors go in passes through a stack
/// buffer.
fn score_rows(codes: &[i8], scales: &[f32], d: usize, w: &[f32], out: &mut [f32]) {
    let per = rows_dot::MAX_VECTORS * d;
    if w.len() <= per {
        return rows_dot::rows_dot_max_i8(codes, scales, d, w, out, None);
    }
    rows_dot::rows_dot_max_i8(codes, scales, d, &w[..per], out, None);
    const RUN: usize = 256;
    let mut part = [0.0f32; RUN];
    for (r, o) in out.chunks_mut(RUN).enumerate() {
        let (codes, scales) = (
            &codes[r * RUN * d..][..o.len() * d],
            &scales[r * RUN..][..o.len()],
        );
        for wj in w[per..].chunks(per) {
            let part = &mut part[..o.len()];
            rows_dot::rows_dot_max_i8(codes, scales, d, wj, part, None);
            for (o, &x) in o.iter_mut().zip(part.iter()) {
                *o = o.max(x);
            }
        }
    }
}

/// One layer's page scoring for the page-based selectors: every selecting head's pages scored in one region of the
/// forward pass's team (the pages of all heads cut into one run per thread), then each head's best units chosen in a
/// second region, a head per task. Scoring head by head, in a region each, left a thread waiting at the end of every
/// head's region and ran every head's top-k on one thread. Each page's score is the best over the group of
/// [`page_bound`] (up to f32 summation order).
#[derive(Default)]
pub struct LayerPages {
    /// Per KV head: which pages it scores and where their scores and its scoring vectors are.
    spans: Vec<Span>,
    /// The scoring vectors of every scored head's group, one head after another (group × 2·hk each).
    w: Vec<f32>,
    /// Every scored head's scores (one per page, or per unit after [`LayerPages::units_max`]), head after head.
    scores: Vec<f32>,
    /// Per KV head: the chosen units (indices into its scores), and how many to choose.
    idx: Vec<Vec<u32>>,
    want: Vec<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Span {
    /// First page scored; pages (then units) scored, 0 = the head is not scored.
    p0: usize,
    n: usize,
    /// Offset of its scores in `scores`, of its vectors in `w`.
    at: usize,
    w_at: usize,
}

impl LayerPages {
    /// Starts a layer of `nh` KV heads, none scored yet.
    pub fn reset(&mut self, nh: usize) {
        self.spans.clear();
        self.spans.resize(nh, Span::default());
        self.idx.resize_with(nh.max(self.idx.len()), Vec::new);
        self.want.clear();
        self.want.resize(nh, 0);
        self.w.clear();
        self.scores.clear();
    }

    /// Head `h` will score its pages `[p0, p1)` with statistic `stat`.
    pub fn add(&mut self, stat: PageStat, cx: &SelectCx, h: usize, (p0, p1): (usize, usize)) {
        let (at, w_at) = (self.scores.len(), self.w.len());
        scoring_vectors(stat, cx, h, &mut self.w);
        self.scores.resize(at + (p1 - p0), f32::NEG_INFINITY);
        self.spans[h] = Span {
            p0,
            n: p1 - p0,
            at,
            w_at,
        };
    }

    /// Scores every added head's pages, over the current pool's threads.
    pub fn score(&mut self, cx: &SelectCx) {
        const PAR_ROWS: usize = 64;
        let total = self.scores.len();
        let threads = rayon::current_num_threads().max(1);
        let chunk = total.div_ceil(threads).max(PAR_ROWS);
        let d = 2 * cx.cache.cfg.head_dim_k;
        let wn = cx.group() * d;
        let (spans, w) = (&self.spans, &self.w);
        crate::kernels::team::for_each_chunk_mut(&mut self.scores, chunk, |i, out| {
            let (a, b) = (i * chunk, i * chunk + out.len());
            for (h, s) in spans.iter().enumerate() {
                let (lo, hi) = (s.at.max(a), (s.at + s.n).min(b));
                if lo >= hi {
                    continue;
                }
                let (codes, scales) = cx.cache.page_codes(cx.layer, h);
                let (p0, p1) = (s.p0 + lo - s.at, s.p0 + hi - s.at);
                score_rows(
                    &codes[p0 * d..p1 * d],
                    &scales[p0..p1],
                    d,
                    &w[s.w_at..][..wn],
                    &mut out[lo - a..hi - a],
                );
            }
        });
    }

    /// Head `h`'s scores (pages, or units after [`LayerPages::units_max`]).
    pub fn scores(&self, h: usize) -> &[f32] {
        let s = self.spans[h];
        &self.scores[s.at..s.at + s.n]
    }

    /// Replaces head `h`'s page scores by their maxima over runs of `per` pages (a unit of `per` pages scores as its
    /// best page; the last run may be shorter).
    pub fn units_max(&mut self, h: usize, per: usize) {
        let s = &mut self.spans[h];
        let v = &mut self.scores[s.at..s.at + s.n];
        let units = s.n.div_ceil(per.max(1));
        for u in 0..units {
            // Unit u reads pages [u·per, …) and writes slot u ≤ u·per: no later unit reads a slot written earlier.
            let best = v[u * per..((u + 1) * per).min(v.len())]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            v[u] = best;
        }
        s.n = units;
    }

    /// Chooses each scored head's `k(h)` best units (see [`top_k`]), the heads split over the current pool.
    pub fn choose(&mut self, k: impl Fn(usize) -> usize) {
        for (h, s) in self.spans.iter().enumerate() {
            self.want[h] = if s.n > 0 { k(h) } else { 0 };
        }
        let nh = self.spans.len();
        let (spans, want, scores) = (&self.spans, &self.want, &self.scores);
        let pick = |h: usize, idx: &mut Vec<u32>| {
            let s = spans[h];
            top_k(&scores[s.at..s.at + s.n], want[h], idx);
        };
        // A region costs a few microseconds: not worth it for a few hundred scores.
        if self.scores.len() < 512 {
            for (h, idx) in self.idx[..nh].iter_mut().enumerate() {
                pick(h, idx);
            }
        } else {
            crate::kernels::team::for_each_chunk_mut(&mut self.idx[..nh], 1, |h, idx| {
                pick(h, &mut idx[0])
            });
        }
    }

    /// Head `h`'s chosen units, unordered (empty when it was not scored).
    pub fn chosen(&self, h: usize) -> &[u32] {
        &self.idx[h]
    }
}

/// Adds head `h`'s chosen units to `kept`: unit `i` of `idx` covers entries `[(u0 + i)·unit, (u0 + i + 1)·unit)`,
/// clipped to the middle region `m`.
pub fn keep_units(
    kept: &mut Selection,
    h: usize,
    m: Middle,
    idx: &[u32],
    (u0, unit): (usize, usize),
) {
    for &i in idx {
        let u = u0 + i as usize;
        kept.add(h, (u * unit).max(m.lo), ((u + 1) * unit).min(m.hi));
    }
}

/// How many units of `unit` entries the middle region `m`'s `k` entries fill (at least one).
pub fn units_for(m: Middle, unit: usize) -> usize {
    (m.k / unit).max(1)
}

/// Indices of the `k` largest scores (ties to the later index), in `idx` (reused), in ascending order. The scores
/// are mapped to integers of the same order (`f32::total_cmp`'s) and the `k`-th largest of those, `t`, is found in
/// linear time ([`kth_largest`]); one branch-free pass then collects every index above `t` and, of those equal to it,
/// the latest ones. Ranges built from the indices come out sorted and nothing sorts them again.
pub fn top_k(scores: &[f32], k: usize, idx: &mut Vec<u32>) {
    idx.clear();
    let n = scores.len();
    if k >= n {
        idx.extend(0..n as u32);
        return;
    }
    if k == 0 {
        return;
    }
    let Kth { t, above, ties } = kth_largest(scores, k, idx);
    // Of the `ties` scores equal to `t`, the last `k − above` are kept: the first `ties − (k − above)` are not. (Every
    // slot read back is written first: the buffer is sized, not cleared.)
    idx.resize(n + pick::PAD, 0);
    let w = pick::keep_indices(scores, t, ties - (k - above), idx);
    debug_assert_eq!(w, k);
    idx.truncate(k);
}

/// The `k`-th largest order key of a row (`t`), how many keys lie above it and how many equal it.
struct Kth {
    t: u32,
    above: usize,
    ties: usize,
}

/// Rows at least this long find their `k`-th largest from a sample first ([`kth_largest`]).
const SAMPLED_FROM: usize = 1024;
/// Keys in that sample.
const SAMPLE: usize = 256;

/// [`Kth`] of `scores` for 0 < k < n, with `scratch` as working memory. A long row first takes an evenly spaced
/// sample of its keys and from it a band of keys that holds the `k`-th largest unless the sample misled (3.5
/// standard deviations of the sample's rank on either side); one pass counts the keys above the band and copies
/// those inside it ([`pick::band_keys`]), and the selection runs over the band alone (about a fifth of the row).
/// When the count shows the `k`-th largest outside the band, the whole row is selected over instead: the result is
/// the same either way.
fn kth_largest(scores: &[f32], k: usize, scratch: &mut Vec<u32>) -> Kth {
    let n = scores.len();
    if n >= SAMPLED_FROM {
        if let Some(kth) = kth_in_band(scores, k, scratch) {
            return kth;
        }
    }
    scratch.clear();
    scratch.extend(scores.iter().map(|&x| pick::order_key(x)));
    let t = *scratch.select_nth_unstable(n - k).1;
    count_around(t, scratch, 0)
}

/// [`Kth`] for the key `t` of `keys`, with `over` more keys above it than `keys` holds.
fn count_around(t: u32, keys: &[u32], over: usize) -> Kth {
    let (mut above, mut ties) = (over, 0);
    for &key in keys {
        above += (key > t) as usize;
        ties += (key == t) as usize;
    }
    Kth { t, above, ties }
}

/// [`kth_largest`] through a sampled band; None when the `k`-th largest lies outside it.
fn kth_in_band(scores: &[f32], k: usize, scratch: &mut Vec<u32>) -> Option<Kth> {
    let n = scores.len();
    let mut sample = [0u32; SAMPLE];
    let stride = n / SAMPLE;
    for (j, s) in sample.iter_mut().enumerate() {
        *s = pick::order_key(scores[j * stride + stride / 2]);
    }
    // The k-th largest is the key of ascending rank n − k; about that share of the sample lies below it, give or take
    // a binomial spread. Only the band's two ends are needed from the sample.
    let q = (n - k) as f64 / n as f64;
    let margin = (3.5 * (SAMPLE as f64 * q * (1.0 - q)).sqrt()).ceil() as usize + 2;
    let at = (n - k) * SAMPLE / n;
    let hi = if at + margin < SAMPLE {
        *sample.select_nth_unstable(at + margin).1
    } else {
        u32::MAX
    };
    let lo = if at >= margin {
        *sample[..(at + margin).min(SAMPLE)]
            .select_nth_unstable(at - margin)
            .1
    } else {
        0
    };
    scratch.resize(n + pick::PAD, 0);
    let (over, b) = pick::band_keys(scores, lo, hi, scratch);
    if over >= k || over + b < k {
        return None;
    }
    let band = &mut scratch[..b];
    let t = *band.select_nth_unstable(b - (k - over)).1;
    Some(count_around(t, band, over))
}

/// Bytes of `pages` page summaries of a cache (what scoring them reads).
pub fn meta_read_bytes(cache: &KvCache, pages: usize) -> usize {
    pages * crate::kv::meta::code_bytes(cache.cfg.head_dim_k)
}

/// Bytes reading one key of `block` costs (its share of the block's key data and key scales, not values): what a
/// selector that scores keys directly pays per key (0 for a block on disk, see [`BlockView::entry_bytes`]).
pub fn key_read_bytes(block: &BlockView, block_tokens: usize) -> usize {
    match block.data {
        BlockData::F16 { k, .. } => 2 * k.len() / block_tokens,
        BlockData::F32 { k, .. } => 4 * k.len() / block_tokens,
        BlockData::Quant(q) => (q.k.len() + 2 * q.k_ms.len()).div_ceil(block_tokens),
        // Offloaded: the read from disk is counted where it happens, a whole block at a time.
        BlockData::Disk(_) => 0,
    }
}

/// The timing harnesses' cache (tests only): `HAYLOFT_HARNESS_LAYERS` layers (else `default_layers`) of `n_kv` KV
/// heads × `hd`, f16 in 32-token blocks, each layer holding the same `len` random entries drawn from `rng` (keys,
/// then values), with page summaries when `meta` is given.
#[cfg(test)]
pub(crate) fn harness_cache(
    default_layers: usize,
    (n_kv, hd, len): (usize, usize, usize),
    meta: Option<crate::kv::MetaConfig>,
    rng: &mut crate::testutil::Rng,
) -> KvCache {
    use crate::kv::{KvConfig, KvDtype};
    let layers: usize = std::env::var("HAYLOFT_HARNESS_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_layers);
    let k = rng.vec(len * n_kv * hd, 1.0);
    let v = rng.vec(len * n_kv * hd, 1.0);
    let pos: Vec<u32> = (0..len as u32).collect();
    let mut c = KvCache::new(KvConfig {
        n_layers: layers,
        n_kv_heads: n_kv,
        head_dim_k: hd,
        head_dim_v: hd,
        block_tokens: 32,
        dtype: KvDtype::F16,
        windows: Vec::new(),
    });
    if let Some(m) = meta {
        c.enable_meta(m);
    }
    for layer in 0..layers {
        c.append(layer, &pos, &k, &v);
    }
    c
}

/// One timed decode step of the timing harnesses (tests only): `sel` selects for the query `q` (`n_q` heads) at the
/// position after `c`'s entries in every layer of `c`; returns the seconds per layer.
#[cfg(test)]
pub(crate) fn harness_step(
    sel: &mut dyn crate::model::Selector,
    c: &KvCache,
    (q, n_q): (&[f32], usize),
    out: &mut Selection,
) -> f64 {
    let pos = [c.len(0, 0) as u32 - 1];
    let t0 = std::time::Instant::now();
    for layer in 0..c.cfg.n_layers {
        let cx = SelectCx {
            cache: c,
            layer,
            q,
            pos: &pos,
            n_q_heads: n_q,
            local: false,
        };
        assert!(sel.select(&cx, out));
    }
    t0.elapsed().as_secs_f64() / c.cfg.n_layers as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page summaries `[p0, p1)` of a stream (`meta`: pages × 2 × hk f16) as f32, for [`page_bound`].
    fn summaries_f32(meta: &[half::f16], hk: usize, p0: usize, p1: usize, out: &mut Vec<f32>) {
        use half::slice::HalfFloatSliceExt;
        let src = &meta[p0 * 2 * hk..p1 * 2 * hk];
        out.resize(src.len(), 0.0);
        src.convert_to_f32_slice(out);
    }

    /// A one-layer f16 cache of `nkv` KV heads × `hk` channels holding `len` random entries with page summaries
    /// (`page` tokens, `stat`), the positions, and one decode step's random queries for groups of `g`.
    fn summarized_cache(
        (nkv, g, hk, len): (usize, usize, usize, usize),
        (page, stat): (usize, PageStat),
        seed: u64,
    ) -> (KvCache, Vec<u32>, Vec<f32>) {
        use crate::kv::{KvConfig, KvDtype, MetaConfig};
        use crate::testutil::Rng;
        let mut cache = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: nkv,
            head_dim_k: hk,
            head_dim_v: hk,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        });
        cache.enable_meta(MetaConfig {
            page_tokens: page,
            stat,
            first_layer: 0,
        });
        let mut rng = Rng(seed);
        let pos: Vec<u32> = (0..len as u32).collect();
        cache.append(
            0,
            &pos,
            &rng.vec(len * nkv * hk, 2.0),
            &rng.vec(len * nkv * hk, 1.0),
        );
        let q = rng.vec(nkv * g * hk, 1.5); // 1 × n_q_heads·hk
        (cache, pos, q)
    }

    /// The decode step of [`summarized_cache`]'s last position, for `n_q_heads` query heads.
    fn decode_cx<'a>(
        cache: &'a KvCache,
        pos: &'a [u32],
        q: &'a [f32],
        n_q_heads: usize,
    ) -> SelectCx<'a> {
        SelectCx {
            cache,
            layer: 0,
            q,
            pos: &pos[pos.len() - 1..],
            n_q_heads,
            local: false,
        }
    }

    /// The linear page scores equal the best of [`page_bound`] over the group, for both statistics, on every
    /// kernel path: of the 8-bit copy's bound within the query's rounding, of the f16 summary's within one step of
    /// the copy more (and never below it for min/max).
    #[test]
    fn page_scores_equal_the_group_best_page_bound() {
        for stat in [PageStat::MinMax, PageStat::MeanStd] {
            let (nkv, g, hk, len) = (2, 3, 64, 200);
            let (cache, pos, q) = summarized_cache((nkv, g, hk, len), (16, stat), 11);
            let cx = decode_cx(&cache, &pos, &q, nkv * g);
            let n_pages = len.div_ceil(16);
            let (mut w, mut got, mut mf) = (Vec::new(), Vec::new(), Vec::new());
            for h in 0..nkv {
                page_scores(stat, &cx, h, (1, n_pages), &mut w, &mut got);
                summaries_f32(cache.page_meta(0, h), hk, 1, n_pages, &mut mf);
                let (codes, scales) = cache.page_codes(0, h);
                // The query heads' rounding to 8 bits: a step of max|q| / 127 each.
                let qstep = (0..g)
                    .map(|i| {
                        cx.last_query(h * g + i)
                            .iter()
                            .fold(0.0f32, |m, x| m.max(x.abs()))
                    })
                    .fold(0.0f32, f32::max)
                    / 127.0;
                assert_eq!(got.len(), n_pages - 1);
                for (p, &s) in got.iter().enumerate() {
                    let row = &codes[(p + 1) * 2 * hk..][..2 * hk];
                    let copy: Vec<f32> = row.iter().map(|&c| scales[p + 1] * c as f32).collect();
                    let best = |m: &[f32]| {
                        (0..g)
                            .map(|i| page_bound(stat, cx.last_query(h * g + i), m))
                            .fold(f32::NEG_INFINITY, f32::max)
                    };
                    // Against the copy's own bound: only the query's rounding (rows_dot_max_i8's error bound).
                    let want = best(&copy);
                    let l1: f32 = row.iter().map(|&c| (c as f32).abs()).sum();
                    let tol = scales[p + 1] * qstep / 2.0 * l1 + 1e-4 * (1.0 + want.abs());
                    assert!(
                        (s - want).abs() <= tol,
                        "{stat:?} head {h} page {p}: {s} vs {want} (±{tol})"
                    );
                    // Against the f16 summary: the copy's own step too; min/max stays an upper bound.
                    let exact = best(&mf[p * 2 * hk..][..2 * hk]);
                    let qsum = (0..g)
                        .map(|i| {
                            cx.last_query(h * g + i)
                                .iter()
                                .map(|x| x.abs())
                                .sum::<f32>()
                        })
                        .fold(0.0f32, f32::max);
                    let tol2 = tol + scales[p + 1] * qsum;
                    assert!(
                        (s - exact).abs() <= tol2,
                        "{stat:?} head {h} page {p}: {s} vs {exact}"
                    );
                    if stat == PageStat::MinMax {
                        assert!(
                            s >= exact - tol,
                            "head {h} page {p}: {s} below the bound {exact}"
                        );
                    }
                }
            }
        }
    }

    /// [`LayerPages`] gives every head the scores [`page_scores`] gives it alone, bit for bit, on one thread and on
    /// a pool of three (runs that cut heads in the middle), for groups within and beyond one kernel pass of vectors;
    /// `units_max` and `choose` agree with the per-head definitions.
    #[test]
    fn layer_pages_equal_per_head_scoring() {
        for (stat, g) in [
            (PageStat::MinMax, 3),
            (PageStat::MeanStd, 3),
            (PageStat::MeanStd, 17),
        ] {
            let (nkv, hk, len) = (3, 16, 1500);
            let (cache, pos, q) = summarized_cache((nkv, g, hk, len), (8, stat), 5);
            let cx = decode_cx(&cache, &pos, &q, nkv * g);
            let n_pages = len.div_ceil(8);
            // Head 1 is not scored; heads 0 and 2 score different ranges.
            let spans = [Some((3, n_pages)), None, Some((0, n_pages - 5))];
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut lp = LayerPages::default();
                pool.install(|| {
                    lp.reset(nkv);
                    for (h, sp) in spans.iter().enumerate() {
                        if let Some(r) = sp {
                            lp.add(stat, &cx, h, *r);
                        }
                    }
                    lp.score(&cx);
                });
                let (mut w, mut want) = (Vec::new(), Vec::new());
                for (h, sp) in spans.iter().enumerate() {
                    let Some(r) = sp else {
                        assert!(lp.scores(h).is_empty());
                        continue;
                    };
                    page_scores(stat, &cx, h, *r, &mut w, &mut want);
                    let got = lp.scores(h);
                    assert_eq!(got.len(), want.len());
                    for (p, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{stat:?} g {g} head {h} page {p}");
                    }
                }
                // Units of 4 pages score as their best page; the chosen units are the per-head top-k.
                let before: Vec<Vec<f32>> = (0..nkv).map(|h| lp.scores(h).to_vec()).collect();
                for h in 0..nkv {
                    lp.units_max(h, 4);
                }
                pool.install(|| lp.choose(|h| 5 + h));
                for h in [0, 2] {
                    let units: Vec<f32> = before[h]
                        .chunks(4)
                        .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
                        .collect();
                    assert_eq!(lp.scores(h), &units[..]);
                    let mut idx = Vec::new();
                    top_k(&units, 5 + h, &mut idx);
                    let (mut a, mut b) = (idx, lp.chosen(h).to_vec());
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "head {h}");
                }
                assert!(lp.chosen(1).is_empty());
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_prefers_later_ties() {
        let mut idx = Vec::new();
        top_k(&[1.0, 5.0, 3.0, 5.0, 0.0], 2, &mut idx);
        assert_eq!(idx, [1, 3]);
        top_k(&[4.0, 1.0, 4.0, 9.0, 4.0, 0.0], 3, &mut idx);
        assert_eq!(idx, [2, 3, 4]);
        top_k(&[4.0, 1.0], 0, &mut idx);
        assert!(idx.is_empty());
        top_k(&[2.0, 2.0, 2.0], 1, &mut idx);
        assert_eq!(idx, [2]);
        top_k(&[1.0], 4, &mut idx);
        assert_eq!(idx, [0]);
        top_k(&[-0.0, 0.0, -1.0, f32::NEG_INFINITY, -0.0], 2, &mut idx);
        assert_eq!(idx, [1, 4]);
    }

    /// The first `k` indices sorted by (score, index), best first, in ascending order: what `top_k` must give.
    fn sorted_top(scores: &[f32], k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..scores.len() as u32).collect();
        all.sort_by(|&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(b.cmp(&a))
        });
        all.truncate(k);
        all.sort_unstable();
        all
    }

    /// The same indices as sorting every index by (score, index), best first, and keeping the first `k`: scores
    /// with many ties, negatives and both zeros.
    #[test]
    fn top_k_equals_a_full_sort() {
        let mut rng = crate::testutil::Rng::seeded(7);
        let mut idx = Vec::new();
        for case in 0..300 {
            let n = 1 + case % 97;
            let levels = 1 + case % 9;
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.below(12) {
                    0 => -0.0,
                    1 => 0.0,
                    _ => (rng.below(levels) as f32 - levels as f32 / 2.0) * 0.75,
                })
                .collect();
            for k in [0, 1, n / 3, n / 2, n.saturating_sub(1), n, n + 2] {
                let want = sorted_top(&scores, k.min(n));
                top_k(&scores, k, &mut idx);
                assert_eq!(idx, want, "case {case}, k {k}, {scores:?}");
            }
        }
        // Long rows of spread scores (many histogram buckets, the k-th largest inside a crowded one).
        for case in 0..20 {
            let n = 3000 + 500 * case;
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    (rng.below(1_000_000) as f32 / 1000.0 - 300.0)
                        * if case % 2 == 0 { 1.0 } else { 0.01 }
                })
                .collect();
            for k in [1, n / 10, n / 2, n - 1] {
                let want = sorted_top(&scores, k);
                top_k(&scores, k, &mut idx);
                assert_eq!(idx, want, "long case {case}, k {k}");
            }
        }
        // Long rows through the sampled band: few distinct values (the k-th largest tied many times over, the band
        // bounds on ties), sorted rows, and a row whose evenly spaced sample sees only its rare large scores, so
        // the band misses and the whole row is selected over.
        for case in 0..12 {
            let n = SAMPLED_FROM + 777 * case;
            let stride = n / SAMPLE;
            let scores: Vec<f32> = (0..n)
                .map(|i| match case % 4 {
                    0 => rng.below(5) as f32,
                    1 => i as f32 * 0.5 - 100.0,
                    2 => -(i as f32),
                    _ if i % stride == stride / 2 => 50.0,
                    _ => rng.below(1000) as f32 / 7.0,
                })
                .collect();
            for k in [1, 7, n / 5, n / 2, n - 300, n - 1] {
                let want = sorted_top(&scores, k);
                top_k(&scores, k, &mut idx);
                assert_eq!(idx, want, "banded case {case}, k {k}");
                let band = kth_in_band(&scores, k, &mut idx);
                if case % 4 == 3 && k == n / 2 {
                    assert!(band.is_none(), "the misleading sample is caught");
                }
                if case % 4 == 1 {
                    assert!(
                        band.is_some(),
                        "an even row keeps its k-th largest in the band"
                    );
                }
            }
        }
    }

    /// Timing of `top_k` at retrieval's shapes (SmolLM2 8K, 1024 tokens per head: a split scan's part and the merge
    /// of two parts) against selecting over the whole row:
    /// `cargo test --release --lib top_k_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn top_k_timing() {
        let mut rng = crate::testutil::Rng::seeded(5);
        for (n, k) in [(3450, 900), (1800, 900), (30000, 900)] {
            let rows: Vec<Vec<f32>> = (0..64)
                .map(|_| {
                    (0..n)
                        .map(|_| rng.below(1 << 20) as f32 / 4096.0 - 100.0)
                        .collect()
                })
                .collect();
            let (mut idx, mut keys) = (Vec::new(), Vec::new());
            for name in ["top_k", "whole-row select"] {
                let mut best = f64::INFINITY;
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    for r in &rows {
                        if name == "top_k" {
                            top_k(r, k, &mut idx);
                        } else {
                            keys.clear();
                            keys.extend(r.iter().map(|&x| pick::order_key(x)));
                            keys.select_nth_unstable(n - k);
                        }
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                eprintln!(
                    "n {n} k {k} {name}: {:.2} us per row",
                    best * 1e6 / rows.len() as f64
                );
            }
        }
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_count("sink", "128").unwrap(), 128);
        assert_eq!(parse_count("sink", "128t").unwrap(), 128);
        assert!(parse_count("sink", "x").is_err());
        assert_eq!(parse_score("meanstd").unwrap(), PageStat::MeanStd);
        assert!(parse_score("max").is_err());
    }
}
