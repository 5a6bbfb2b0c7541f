//! RetrievalAttention — Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
//! (arXiv 2409.10516, 2024).
//!
//! Mechanism: a static set (the first and the newest tokens) is always read; every other key sits in a vector index
//! per KV head, and each decode step reads only the keys the index retrieves for the query. Because queries are
//! out-of-distribution for an index built over keys, the paper's index is attention-aware (a RoarGraph): at the end of
//! the prefill, each recorded prompt query finds its exact top-`N_q` keys by inner product; that query→key bipartite
//! graph is projected onto the keys (each query's top key, its pivot, links to the query's other top keys), the
//! pivot's links are pruned to a bounded out-degree (RNG occlusion with the inner product, as RoarGraph does for
//! MIPS) and mirrored where room is left. A decode query then runs a greedy best-first search with a bounded candidate
//! queue over that graph (the paper reports touching 1–3 % of the keys at 128K tokens).
//!
//! Here, per (layer, KV head), over the keys cached at `end_prefill`:
//! - build queries: every [`BUILD_STRIDE`]-th of the prompt's last [`QUERY_WINDOW`] queries, of all the group's query
//!   heads; their top lists cover the middle region only (sinks and the recent window are read anyway);
//! - the first [`PIVOTS`] keys of each top list are pivots (RoarGraph projects onto the first only, but it trains on
//!   more queries than keys; here a few hundred queries index thousands of keys);
//! - entry points: the [`ENTRIES`] keys most often in the top lists and the top [`SEED_KEYS`] keys of the prompt's
//!   last query of each head of the group;
//! - besides the projected edges every key links to its predecessor and successor in the stream (implicit, not
//!   stored), so every key is reachable from every entry point (RoarGraph adds links for this by searching instead);
//! - search: one greedy search per query head of the group (queue [`QUEUE`], less below 4096 keys: [`default_queue`];
//!   `queue=N`), all of them sharing the key
//!   reads of the step (a key is read once and scored for every head); the step keeps the top keys of the middle
//!   region among every key touched, by the maximum over the group's heads. With fewer KV heads than threads the
//!   group is split into parts searched side by side (each part's heads share their reads), and the KV head keeps the
//!   best of the parts' choices by the same maximum;
//! - keys appended after the build (decode tokens), and the keys the build left to the recent window, are read there,
//!   or scanned exactly once they leave it (the graph has no projected edges for them: a needle just before the
//!   question at 2K was found by the exact scan and missed by the search when only keys appended later were scanned);
//! - after an edit of the cache (eviction, merging) the graph's entry indices are stale: the layer scans its middle
//!   region exactly (every key read and counted) until the next prefill builds a new graph.
//!
//! - the index keeps its own copy of the keys it covers, row-major, 8-bit with one scale per key (as a vector index
//!   holds its vectors): a search reads a key as one 68-byte row (hk 64) instead of gathering its channels from the
//!   cache's channel-major blocks, which spreads one key over 64 cache lines. With the graph the copy only steers the
//!   search and ranks the touched keys; attention then reads the chosen keys exactly from the cache. A flat scan
//!   (`index=flat`) scores every key of the middle anyway, so by default it hands those scores (8-bit keys against
//!   the 8-bit query) to attention, which reads only the chosen entries' values (`rescore=on`: their keys are read
//!   and scored again exactly). SmolLM2 8K, 1024 tokens per head, 2 threads: KV read per token 105.6 → 71.0 MB,
//!   attention outside the selection 9.6 → 6.5 ms; RULER 4K at 12.5 % with `dense=2` gave the same score in each of
//!   its 35 cases (the text after the answers differs in 11; see the README). An offloaded cache's blocks stay on
//!   disk during the search.
//!
//! Reads counted: every touched key (its bytes in the copy, or its stored bytes for a key past the graph) and every
//! adjacency list expanded (4 bytes an edge plus the offsets). The graphs' bytes (copy included) are
//! [`Selector::index_bytes`].
//!
//! Defaults. Official integration (MInference `minference/modules/retr_attn.py`): static set `start_size` 128 +
//! `recent_size` 512, `top_k` 2000 per query head, all layers (`from_layer` 0), retrieval every step; its default index
//! is an exact flat scan. hayloft's budget is the total per KV head, so below 128 + 512 + 2000 entries the static set
//! shrinks in the official proportions (at `@0.125` of 4K tokens: 24 sinks + 99 recent + 389 retrieved) instead of
//! eating the whole budget; `sink=`/`recent=` fix it. Graph parameters: RoarGraph README `M_sq` (N_q) 100 and
//! `M_pjbp` (degree) 35 — whether RetrievalAttention used these is not confirmed; the degree here is 32 (on the data
//! below the RNG pruning leaves most pivots under 32 anyway). The queue length, the pivots, the entry points and the
//! build window are hayloft's, chosen on the measurements given with each constant. Build time: about 30–40 ms per
//! (layer, KV head) at 8K keys on one core (the unit test `build_time_of_an_8k_stream`), streams built in parallel.

use std::ops::Range;
use std::time::Instant;

use rayon::prelude::*;

use super::{top_k, Frame, FrameDefaults, Middle, SelectOptions, Step};
use crate::attention::Selection;
use crate::kernels::{matmul, GgmlType, MatmulScratch, QMatrix};
use crate::kv::{BlockData, BlockView, KvCache};
use crate::methods::spec::Budget;
use crate::model::{ModelConfig, QueryWindow, SelectCx, Selector};

/// Static set of the official integration: `start_size` and `recent_size`.
pub const SINK: usize = 128;
pub const RECENT: usize = 512;
/// Keys retrieved per query head in the official integration (`top_k`).
pub const TOP_K: usize = 2000;
/// Exact top keys per build query (RoarGraph `M_sq`).
pub const N_Q: usize = 100;
/// Out-degree bound of the projected graph (RoarGraph `M_pjbp` is 35).
pub const DEGREE: usize = 32;
/// Candidate queue of the greedy search, per query head (hayloft's; RoarGraph sweeps `L_pq`). Measured on SmolLM2-135M's
/// layer 20 after an 8K-token NIAH prompt (12 decode queries, 3 KV heads): a decode query's exact top 16 keys are found
/// at 79 % with a queue of 64 (5.1 % of the keys touched per head), 87 % with 128 (7.3 %), 91 % with 256 (10.7 %).
pub const QUEUE: usize = 128;
/// The default queue never exceeds the searched keys / [`QUEUE_SHARE`] (nor falls below [`MIN_QUEUE`]): each expanded
/// key reads its adjacency (about as many bytes as a key) and adds up to [`DEGREE`] + 2 keys, so a queue near that
/// share touches about every key and reads more than an exact scan of the keys. Only short contexts are affected (the
/// cap is 128 from 4096 keys on).
pub const QUEUE_SHARE: usize = 32;
pub const MIN_QUEUE: usize = 8;

/// The default queue for a search over `keys` keys.
pub fn default_queue(keys: usize) -> usize {
    QUEUE.min((keys / QUEUE_SHARE).max(MIN_QUEUE))
}

/// Leading keys of each build query's top list that get the list's other keys as candidate neighbours. RoarGraph
/// projects onto the first only, but it trains on more queries than keys; here a few hundred queries index thousands
/// of keys, and most keys would get no projected edge. Same measurement: only 50 % of a decode query's top 16 keys
/// have a projected edge with 1 pivot, 72 % with 4, 80 % with 8, 84 % with 16; recall 80 / 86 / 87 / 89 %.
pub const PIVOTS: usize = 8;
/// Entry points besides: the top keys of the prompt's last query, per query head (the first decode queries resemble
/// it most: in the same layer 5–16 of a decode query's top 16 keys are in that query's top 100, against 0–14 for a
/// query 64 tokens earlier). Without these seeds the recall above is 79 % instead of 87 %.
pub const SEED_KEYS: usize = 64;
/// Entry points: the keys most often in the build queries' top lists.
pub const ENTRIES: usize = 4;
/// Prompt queries recorded per layer, and the stride the build takes them at (128 rows × the group's heads).
pub const QUERY_WINDOW: usize = 512;
pub const BUILD_STRIDE: usize = 4;

/// The official frame: 128 sinks, 512 recent, no dense layers, retrieval every step.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: SINK,
    recent: RECENT,
    dense: 0,
    interval: 1,
};

/// Sinks and recent window for a total budget of `b` entries: the official 128 + 512, shrunk in proportion when the
/// budget cannot also hold the official 2000 retrieved keys.
pub fn static_set(b: usize) -> (usize, usize) {
    let full = SINK + RECENT + TOP_K;
    if b >= full {
        (SINK, RECENT)
    } else {
        (SINK * b / full, RECENT * b / full)
    }
}

/// Graph parameters.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Exact top keys per build query ([`N_Q`]).
    pub n_q: usize,
    /// Out-degree bound of the stored edges ([`DEGREE`]).
    pub degree: usize,
    /// Entry points taken by frequency in the top lists ([`ENTRIES`]).
    pub entries: usize,
    /// Leading keys of each query's top list that act as pivots (RoarGraph: 1).
    pub pivots: usize,
    /// The first `seed_queries` build queries (the newest) give their top `seed_keys` keys as entry points too.
    pub seed_queries: usize,
    pub seed_keys: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            n_q: N_Q,
            degree: DEGREE,
            entries: ENTRIES,
            pivots: PIVOTS,
            seed_queries: 0,
            seed_keys: SEED_KEYS,
        }
    }
}

/// An attention-aware graph over keys `[0, n)` of one stream: CSR adjacency (the projected edges) plus the implicit
/// links of each key to its stream neighbours `i − 1` and `i + 1`.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    n: usize,
    /// End of the range the graph was built over: keys from here on (the recent window at the build) have no
    /// projected edges, so a search reaches them only along the stream links; they are scanned exactly once they
    /// leave the recent window.
    end: usize,
    offsets: Vec<u32>,
    edges: Vec<u32>,
    entries: Vec<u32>,
}

/// The index's own copy of the keys `[0, n)` of one stream, row-major, 8-bit with one scale per key: a search reads a
/// key as one contiguous row instead of gathering it from the cache's channel-major blocks, where one key's channels
/// lie in as many cache lines as it has channels (a block's whole key half); a flat scan reads the rows in order.
#[derive(Clone, Debug, Default)]
pub struct KeyCopy {
    n: usize,
    hk: usize,
    /// n × hk codes, and n scales (a key's largest magnitude / 127).
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl KeyCopy {
    /// The copy of `keys` (n × hk, row-major).
    pub fn new(keys: &[f32], hk: usize) -> Self {
        let n = keys.len() / hk.max(1);
        let mut c = KeyCopy {
            n,
            hk,
            codes: vec![0; n * hk],
            scales: vec![0.0; n],
        };
        for ((row, code), s) in keys
            .chunks_exact(hk)
            .zip(c.codes.chunks_exact_mut(hk))
            .zip(&mut c.scales)
        {
            *s = crate::kernels::quantize_i8(row, code);
        }
        c
    }

    /// Keys the copy holds.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Bytes one key takes (what reading it costs).
    pub fn key_bytes(&self) -> usize {
        self.hk + 4
    }

    /// Asks for key `k`'s row ahead of its read (a hint; nothing for a key past the copy).
    #[inline]
    pub fn prefetch_key(&self, k: u32) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(row), Some(s)) = (
            self.codes.get(k as usize * self.hk..),
            self.scales.get(k as usize),
        ) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = row.as_ptr();
            // SAFETY: prefetches are hints; the addresses lie inside live slices.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(self.hk.saturating_sub(1)));
                _mm_prefetch::<_MM_HINT_T0>(s as *const f32 as *const i8);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = k;
    }

    /// Key `k` (< [`Self::len`]) as f32 into `out` (hk); returns the bytes read.
    #[inline]
    pub fn read_key(&self, k: u32, out: &mut [f32]) -> usize {
        let k = k as usize;
        let s = self.scales[k];
        for (o, &c) in out.iter_mut().zip(&self.codes[k * self.hk..][..self.hk]) {
            *o = c as f32 * s;
        }
        self.key_bytes()
    }

    /// `out[i]` = the best score of key `lo + i` over the query heads `qs` (g × hk), for keys `lo..lo + out.len()`
    /// (all inside the copy), and with `each` every head's own: `each[j · n + i]` for head j (n = `out.len()`;
    /// `each` holds g · n); returns the bytes read.
    pub fn scan(&self, lo: usize, qs: &[f32], out: &mut [f32], each: Option<&mut [f32]>) -> usize {
        let (n, hk) = (out.len(), self.hk);
        crate::kernels::rows_dot_max_i8(
            &self.codes[lo * hk..(lo + n) * hk],
            &self.scales[lo..lo + n],
            hk,
            qs,
            out,
            each,
        );
        n * self.key_bytes()
    }
}

/// How a stream's index finds keys (`index=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexKind {
    /// RetrievalAttention's attention-aware graph, searched greedily (the paper's index).
    #[default]
    Graph,
    /// An exact scan of the 8-bit copy (the official integration's default index is an exact flat scan).
    Flat,
}

/// Parses the value of option `name` (`graph` or `flat`).
pub fn parse_index(name: &str, v: &str) -> anyhow::Result<IndexKind> {
    match v {
        "graph" => Ok(IndexKind::Graph),
        "flat" => Ok(IndexKind::Flat),
        _ => anyhow::bail!(
            "{name}={v}: expected graph (the paper's attention-aware graph) or flat (an exact scan of the index's 8-bit \
             key copy)"
        ),
    }
}

pub fn index_name(k: IndexKind) -> &'static str {
    match k {
        IndexKind::Graph => "graph",
        IndexKind::Flat => "flat",
    }
}

/// One stream's index: the key copy, and the graph over it (None: a flat scan of the copy).
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub keys: KeyCopy,
    pub graph: Option<Graph>,
}

impl Index {
    pub fn bytes(&self) -> usize {
        self.keys.bytes() + self.graph.as_ref().map_or(0, Graph::bytes)
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

/// Whether (score, index) `a` ranks below `b` (a higher score wins, then the later index).
#[inline]
fn below(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// The `n` best entries of `row` as (score, index), best first: a bounded min-heap over one pass (most entries cost
/// one comparison).
fn top_sorted(row: &[f32], n: usize, heap: &mut Vec<(f32, u32)>) {
    heap.clear();
    if n == 0 {
        return;
    }
    let sift_down = |h: &mut Vec<(f32, u32)>, mut i: usize| loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut m = i;
        if l < h.len() && below(h[l], h[m]) {
            m = l;
        }
        if r < h.len() && below(h[r], h[m]) {
            m = r;
        }
        if m == i {
            break;
        }
        h.swap(i, m);
        i = m;
    };
    for (i, &x) in row.iter().enumerate() {
        let e = (x, i as u32);
        if heap.len() < n {
            heap.push(e);
            let mut c = heap.len() - 1;
            while c > 0 && below(heap[c], heap[(c - 1) / 2]) {
                heap.swap(c, (c - 1) / 2);
                c = (c - 1) / 2;
            }
        } else if below(heap[0], e) {
            heap[0] = e;
            sift_down(heap, 0);
        }
    }
    heap.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
}

impl Graph {
    /// Builds the graph over `keys` (n × hk, row-major) from `queries` (m × hk): each query's exact top-`n_q` keys
    /// inside `range`, projected onto its top key.
    pub fn build(
        keys: &[f32],
        hk: usize,
        queries: &[f32],
        range: Range<usize>,
        p: Params,
    ) -> Graph {
        let n = keys.len() / hk;
        let m = queries.len() / hk;
        let range = range.start.min(n)..range.end.min(n);
        let width = range.len();
        let mut g = Graph {
            n,
            end: range.end,
            offsets: vec![0; n + 1],
            edges: Vec::new(),
            entries: Vec::new(),
        };
        if n == 0 {
            return g;
        }
        if width == 0 || m == 0 || p.n_q == 0 {
            g.entries.push(range.start.min(n - 1) as u32);
            return g;
        }
        let nq = p.n_q.min(width);
        // Exact scores of every query against every key of the range, a slab of queries at a time.
        let kmat: Vec<u8> = keys[range.start * hk..range.end * hk]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let lists = match QMatrix::from_gguf(GgmlType::F32, width, hk, &kmat) {
            Ok(w) => {
                let mut lists = vec![0u32; m * nq];
                let mut ms = MatmulScratch::default();
                let slab = 64;
                let mut y = vec![0.0f32; slab * width];
                let mut heap = Vec::with_capacity(nq);
                for q0 in (0..m).step_by(slab) {
                    let q1 = (q0 + slab).min(m);
                    let ys = &mut y[..(q1 - q0) * width];
                    matmul(&w, &queries[q0 * hk..q1 * hk], q1 - q0, ys, &mut ms);
                    for (j, row) in ys.chunks_exact(width).enumerate() {
                        top_sorted(row, nq, &mut heap);
                        let out = &mut lists[(q0 + j) * nq..][..nq];
                        for (o, &(_, i)) in out.iter_mut().zip(&heap) {
                            *o = (range.start + i as usize) as u32;
                        }
                    }
                }
                lists
            }
            Err(_) => return g,
        };
        // Entry points: the keys most often in the top lists.
        let mut freq = vec![0u32; n];
        for &k in &lists {
            freq[k as usize] += 1;
        }
        let mut by_freq: Vec<u32> = (range.start as u32..range.end as u32)
            .filter(|&k| freq[k as usize] > 0)
            .collect();
        by_freq.sort_unstable_by(|a, b| freq[*b as usize].cmp(&freq[*a as usize]).then(a.cmp(b)));
        g.entries = by_freq.into_iter().take(p.entries.max(1)).collect();
        // Seeds: the top keys of the newest queries (the next decode query resembles them most).
        for j in 0..p.seed_queries.min(m) {
            for &k in &lists[j * nq..j * nq + p.seed_keys.min(nq)] {
                if !g.entries.contains(&k) {
                    g.entries.push(k);
                }
            }
        }
        // Projection: each query's pivots (its first keys) get the query's other top keys as candidates.
        let pv = p.pivots.clamp(1, nq);
        let mut by_pivot: Vec<(u32, u32)> = (0..m)
            .flat_map(|j| (0..pv).map(move |r| (j, r)))
            .map(|(j, r)| (lists[j * nq + r], j as u32))
            .collect();
        by_pivot.sort_unstable();
        let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut stamp = vec![u32::MAX; n];
        let mut cands: Vec<(f32, u32)> = Vec::new();
        let key = |i: u32| &keys[i as usize * hk..][..hk];
        let mut a = 0;
        while a < by_pivot.len() {
            let piv = by_pivot[a].0;
            let mut b = a;
            cands.clear();
            while b < by_pivot.len() && by_pivot[b].0 == piv {
                let j = by_pivot[b].1 as usize;
                for &c in &lists[j * nq..(j + 1) * nq] {
                    if c != piv && stamp[c as usize] != piv {
                        stamp[c as usize] = piv;
                        cands.push((dot(key(piv), key(c)), c));
                    }
                }
                b += 1;
            }
            cands.sort_unstable_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            // RNG occlusion with the inner product: c is dropped when a kept neighbour r is closer to it than the pivot.
            let kept = &mut adj[piv as usize];
            for &(s, c) in &cands {
                if kept.len() >= p.degree {
                    break;
                }
                if kept.iter().all(|&r| dot(key(r), key(c)) <= s) {
                    kept.push(c);
                }
            }
            a = b;
        }
        // Reverse edges where the degree bound leaves room.
        let forward: Vec<(u32, u32)> = adj
            .iter()
            .enumerate()
            .flat_map(|(v, l)| l.iter().map(move |&c| (v as u32, c)))
            .collect();
        for (v, c) in forward {
            let l = &mut adj[c as usize];
            if l.len() < p.degree && !l.contains(&v) {
                l.push(v);
            }
        }
        g.edges.reserve(adj.iter().map(Vec::len).sum());
        for (i, l) in adj.iter().enumerate() {
            g.edges.extend_from_slice(l);
            g.offsets[i + 1] = g.edges.len() as u32;
        }
        g
    }

    /// Keys the graph covers.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes held (adjacency, offsets, entry points).
    pub fn bytes(&self) -> usize {
        4 * (self.offsets.len() + self.edges.len() + self.entries.len())
    }

    /// Stored (projected) out-edges of key `i`.
    pub fn edges(&self, i: usize) -> &[u32] {
        &self.edges[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// Calls `f` on every neighbour of `i` (stored edges, then `i − 1`, `i + 1`); returns the bytes of adjacency read.
    #[inline]
    pub fn for_each_neighbour(&self, i: u32, mut f: impl FnMut(u32)) -> usize {
        let e = self.edges(i as usize);
        for &c in e {
            f(c);
        }
        if i > 0 {
            f(i - 1);
        }
        if (i as usize) + 1 < self.n {
            f(i + 1);
        }
        4 * (e.len() + 2)
    }
}

/// A set of key indices emptied in O(1) at each step: a key is in it while its stamp equals the current epoch.
#[derive(Default)]
struct Marks {
    stamp: Vec<u32>,
    epoch: u32,
}

impl Marks {
    /// Empties the set, for keys `[0, n)`.
    fn clear(&mut self, n: usize) {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.fill(0);
            self.epoch = 1;
        }
    }

    /// Adds key `i`; whether it was not in the set yet.
    #[inline]
    fn insert(&mut self, i: usize) -> bool {
        let new = self.stamp[i] != self.epoch;
        self.stamp[i] = self.epoch;
        new
    }
}

/// Scratch of the greedy search (reused; allocates only when a stream grows).
#[derive(Default)]
pub struct Search {
    visit: Marks,
    /// Candidate queue, best first: (score, key, expanded).
    pool: Vec<(f32, u32, bool)>,
    /// The unvisited neighbours of the node being expanded.
    fresh: Vec<u32>,
}

impl Search {
    /// Greedy best-first search for the keys of `g` with the highest `score`, with a candidate queue of `l`: expands
    /// the best unexpanded candidate until every queued one is expanded. `prefetch(k)` is called on each new key a
    /// step meets before any of them is scored. Returns the adjacency bytes read.
    pub fn run(
        &mut self,
        g: &Graph,
        l: usize,
        prefetch: impl Fn(u32),
        mut score: impl FnMut(u32) -> f32,
    ) -> usize {
        let l = l.max(1);
        self.visit.clear(g.n);
        let (visit, pool, fresh) = (&mut self.visit, &mut self.pool, &mut self.fresh);
        pool.clear();
        pool.reserve(l + 1);
        let insert = |pool: &mut Vec<(f32, u32, bool)>, k: u32, s: f32| -> usize {
            // Most keys met late in a search rank below a full queue: one comparison instead of a binary search.
            if pool.len() >= l && pool.last().is_some_and(|c| c.0 >= s) {
                return l;
            }
            let at = pool.partition_point(|c| c.0 >= s);
            if at < l {
                pool.insert(at, (s, k, false));
                pool.truncate(l);
            }
            at
        };
        for &e in &g.entries {
            if visit.insert(e as usize) {
                let s = score(e);
                insert(pool, e, s);
            }
        }
        let mut read = 0;
        let mut cur = 0;
        while cur < pool.len() {
            if pool[cur].2 {
                cur += 1;
                continue;
            }
            pool[cur].2 = true;
            let node = pool[cur].1;
            let mut lowest = usize::MAX;
            // The unvisited neighbours first, their keys asked for at once: scoring them one after the other would
            // wait for each key's row in turn (rows are scattered over the copy).
            fresh.clear();
            read += g.for_each_neighbour(node, |c| {
                if visit.insert(c as usize) {
                    prefetch(c);
                    fresh.push(c);
                }
            });
            for &c in fresh.iter() {
                let s = score(c);
                lowest = lowest.min(insert(pool, c, s));
            }
            cur = cur.min(lowest);
        }
        read
    }
}

/// The keys one step has read, each scored against every query head of the group (reused across steps).
#[derive(Default)]
pub struct Touch {
    seen: Marks,
    /// n × g scores of the touched keys.
    sc: Vec<f32>,
    /// Keys read this step, in reading order.
    pub touched: Vec<u32>,
    key: Vec<f32>,
    /// Bytes of keys read this step.
    pub bytes: usize,
}

impl Touch {
    /// Starts a step over a stream of `n` keys scored for `g` query heads of `hk` channels.
    pub fn begin(&mut self, n: usize, g: usize, hk: usize) {
        self.seen.clear(n);
        if self.sc.len() < n * g {
            self.sc.resize(n * g, 0.0);
        }
        self.key.resize(hk, 0.0);
        self.touched.clear();
        self.bytes = 0;
    }

    /// Score of key `k` for query head `i` of `qs` (g × hk), reading the key through `read` (which returns the bytes
    /// it read) the first time this step.
    #[inline]
    pub fn score(
        &mut self,
        k: u32,
        i: usize,
        qs: &[f32],
        read: &mut impl FnMut(u32, &mut [f32]) -> usize,
    ) -> f32 {
        let hk = self.key.len();
        let g = qs.len() / hk;
        let ki = k as usize;
        if self.seen.insert(ki) {
            self.bytes += read(k, &mut self.key);
            for (j, q) in qs.chunks_exact(hk).enumerate() {
                self.sc[ki * g + j] = dot(q, &self.key);
            }
            self.touched.push(k);
        }
        self.sc[ki * g + i]
    }

    /// Best score of key `k` over the group's heads (touched keys only).
    pub fn best(&self, k: u32, g: usize) -> f32 {
        self.sc[k as usize * g..][..g]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

/// Scratch of one retrieval.
#[derive(Default)]
pub struct Retrieve {
    pub search: Search,
    pub touch: Touch,
    /// The keys chosen by the last [`Self::run`], and their scores (the maximum over the heads).
    pub chosen: Vec<u32>,
    pub chosen_scores: Vec<f32>,
    /// Whether a flat scan keeps each query head's scores of the middle ([`Self::given`]).
    pub want_scores: bool,
    /// After a flat scan with [`Self::want_scores`]: g × (hi − lo) raw scores of the middle's keys, query head j's at
    /// `given[j · (hi − lo)..]` (the copy's for keys it holds, exact for keys past it), and `gave` set.
    pub given: Vec<f32>,
    pub gave: bool,
    /// Keys the last flat scan scored (0 after a search or an exact scan, which list theirs in [`Touch::touched`]).
    scanned: usize,
    scores: Vec<f32>,
    ids: Vec<u32>,
    idx: Vec<u32>,
}

impl Retrieve {
    /// Chooses up to `mid.k` keys of `mid.lo..mid.hi` for the queries `qs` (g × hk) into [`Self::chosen`], scored by
    /// the maximum over the heads: with an index holding a graph, a graph search per query head (the keys touched
    /// compete); with a flat index, a scan of its copy; without an index, an exact scan through `read`. Keys past the
    /// index are scanned exactly through `read` (which returns the bytes it read). Returns (key bytes read, adjacency
    /// bytes read).
    pub fn run(
        &mut self,
        index: Option<&Index>,
        queue: usize,
        qs: &[f32],
        hk: usize,
        mid: Middle,
        read: &mut impl FnMut(u32, &mut [f32]) -> usize,
    ) -> (usize, usize) {
        let g = qs.len() / hk;
        self.gave = false;
        self.scanned = 0;
        if let Some(Index {
            keys: copy,
            graph: None,
        }) = index
        {
            return (self.scan(copy, qs, hk, mid, read), 0);
        }
        let graph = index.and_then(|ix| ix.graph.as_ref().map(|gr| (gr, &ix.keys)));
        self.touch
            .begin(mid.hi.max(graph.map_or(0, |(gr, _)| gr.n)), g, hk);
        let mut adj = 0;
        let scan_from = match graph {
            Some((gr, copy)) => {
                for i in 0..g {
                    let touch = &mut self.touch;
                    adj += self.search.run(
                        gr,
                        queue,
                        |k| copy.prefetch_key(k),
                        |k| touch.score(k, i, qs, read),
                    );
                }
                gr.end.max(mid.lo)
            }
            None => mid.lo,
        };
        for k in scan_from..mid.hi {
            self.touch.score(k as u32, 0, qs, read);
        }
        self.scores.clear();
        self.ids.clear();
        for &k in &self.touch.touched {
            if (mid.lo..mid.hi).contains(&(k as usize)) {
                self.ids.push(k);
                self.scores.push(self.touch.best(k, g));
            }
        }
        let n = self.ids.len();
        self.keep_best(mid.k, n, None);
        (self.touch.bytes, adj)
    }

    /// The flat index: every key of the middle scored from the copy (keys past it through `read`); returns the key
    /// bytes read.
    fn scan(
        &mut self,
        copy: &KeyCopy,
        qs: &[f32],
        hk: usize,
        mid: Middle,
        read: &mut impl FnMut(u32, &mut [f32]) -> usize,
    ) -> usize {
        let in_copy = mid.lo..mid.hi.min(copy.len()).max(mid.lo);
        let (n, nc, g) = (mid.hi.saturating_sub(mid.lo), in_copy.len(), qs.len() / hk);
        // Every buffer is written whole below: grown, never cleared.
        grow(&mut self.scores, n);
        let each = if self.want_scores {
            grow(&mut self.given, g * n);
            Some(&mut self.given[..g * nc])
        } else {
            None
        };
        let mut bytes = copy.scan(in_copy.start, qs, &mut self.scores[..nc], each);
        if self.want_scores {
            // Rows from stride nc to stride n (the last row first, so no row overwrites one still to move).
            if nc < n {
                for j in (1..g).rev() {
                    self.given.copy_within(j * nc..(j + 1) * nc, j * n);
                }
            }
            self.gave = true;
        }
        let key = &mut self.touch.key;
        key.resize(hk, 0.0);
        for k in in_copy.end..mid.hi {
            bytes += read(k as u32, key);
            let mut best = f32::NEG_INFINITY;
            for (j, q) in qs.chunks_exact(hk).enumerate() {
                let s = dot(q, key);
                if self.want_scores {
                    self.given[j * n + k - mid.lo] = s;
                }
                best = best.max(s);
            }
            self.scores[k - mid.lo] = best;
        }
        self.touch.touched.clear();
        self.scanned = n;
        self.keep_best(mid.k, n, Some(mid.lo as u32));
        bytes
    }

    /// Keys the last [`Self::run`] scored (searched, scanned exactly or from the copy).
    pub fn keys_touched(&self) -> usize {
        self.scanned + self.touch.touched.len()
    }

    /// [`Self::chosen`] ← the `k` of the first `n` keys with the best `scores`: key i is `ids[i]`, or `lo + i` after
    /// a scan of the keys from `lo` in order (which keeps no id list).
    fn keep_best(&mut self, k: usize, n: usize, lo: Option<u32>) {
        top_k(&self.scores[..n], k, &mut self.idx);
        self.chosen.clear();
        let ids = &self.ids;
        self.chosen.extend(
            self.idx
                .iter()
                .map(|&i| lo.map_or_else(|| ids[i as usize], |lo| lo + i)),
        );
        self.chosen_scores.clear();
        self.chosen_scores
            .extend(self.idx.iter().map(|&i| self.scores[i as usize]));
    }
}

/// Makes `v` at least `n` long, keeping what it holds (a buffer about to be overwritten needs no clearing).
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Bytes of one stored key of a block (what reading it costs).
fn key_bytes(v: &BlockView, bt: usize) -> usize {
    match v.data {
        BlockData::F16 { .. } => 2 * v.hk,
        BlockData::F32 { .. } => 4 * v.hk,
        BlockData::Quant(q) => (q.k.len() + 2 * q.k_ms.len()).div_ceil(bt),
        // An offloaded block's read is counted when it comes from disk.
        BlockData::Disk(_) => 0,
    }
}

/// One task of a step's search: a KV head's middle (None: nothing to choose), the queries of some of its query heads
/// (a part of the group × hk), the search and the bytes it read.
#[derive(Default)]
struct HeadSearch {
    /// The KV head's middle, and the part of it this task chooses from (all of it but for a split scan).
    whole: Option<Middle>,
    m: Option<Middle>,
    qs: Vec<f32>,
    retrieve: Retrieve,
    read: usize,
}

/// The union of a KV head's tasks' choices, each key at its best score (reused across steps).
#[derive(Default)]
struct Merge {
    /// Whether the tasks chose from disjoint parts of the middle (a split scan): then no key comes twice and the
    /// union is the concatenation.
    disjoint: bool,
    added: Marks,
    best: Vec<f32>,
    ids: Vec<u32>,
    scores: Vec<f32>,
    idx: Vec<u32>,
}

impl Merge {
    /// Starts a union over keys `[0, n)`.
    fn begin(&mut self, n: usize, disjoint: bool) {
        self.disjoint = disjoint;
        if !disjoint {
            self.added.clear(n);
            if self.best.len() < n {
                self.best.resize(n, 0.0);
            }
        }
        self.ids.clear();
        self.scores.clear();
    }

    fn add(&mut self, keys: &[u32], scores: &[f32]) {
        if self.disjoint {
            self.ids.extend_from_slice(keys);
            self.scores.extend_from_slice(scores);
            return;
        }
        for (&k, &sc) in keys.iter().zip(scores) {
            let i = k as usize;
            if self.added.insert(i) {
                self.best[i] = sc;
                self.ids.push(k);
            } else if sc > self.best[i] {
                self.best[i] = sc;
            }
        }
    }

    /// The `k` keys of the union with the best scores (any order).
    fn top(&mut self, k: usize) -> impl Iterator<Item = u32> + '_ {
        if !self.disjoint {
            self.scores.clear();
            self.scores
                .extend(self.ids.iter().map(|&i| self.best[i as usize]));
        }
        top_k(&self.scores, k, &mut self.idx);
        self.idx.iter().map(|&i| self.ids[i as usize])
    }
}

/// Parts per KV head of a scan over `threads` threads: at least two tasks per thread in all, so three KV heads do not
/// leave one of two threads idle for a third of the step.
fn scan_parts(nh: usize, threads: usize) -> usize {
    if threads <= 1 {
        1
    } else {
        (2 * threads).div_ceil(nh.max(1))
    }
}

/// Tasks per KV head for `nh` KV heads of `g` query heads each on `threads` threads: one per KV head when there are
/// at least as many KV heads as threads (a task's query heads share their key reads), else the group split so every
/// thread has a search (Gemma 3 270M has one KV head).
fn tasks_per_head(nh: usize, g: usize, threads: usize) -> usize {
    if nh >= threads {
        1
    } else {
        threads.div_ceil(nh.max(1)).min(g.max(1))
    }
}

pub struct Retrieval {
    frame: Frame,
    /// Sinks / recent window given as options (None: [`static_set`] of the budget).
    sink: Option<usize>,
    recent: Option<usize>,
    /// `queue=N` if given (else [`default_queue`]).
    queue: Option<usize>,
    params: Params,
    n_layers: usize,
    n_kv: usize,
    /// Layers that get an index (not dense, not sliding-window).
    indexed: Vec<bool>,
    /// `index=`: a graph (the paper's) or a flat scan of the key copy.
    kind: IndexKind,
    /// Whether a flat scan's scores go to the kernel in place of the chosen keys ([`Self::hand_scores`]).
    give_scores: bool,
    /// indexes[layer · n_kv + head], and the cache's edit count when built.
    indexes: Vec<Option<Index>>,
    built_edits: u64,
    /// The step's search tasks, [`tasks_per_head`] per KV head (KV head after KV head).
    heads: Vec<HeadSearch>,
    merge: Merge,
    /// Keys touched and middle-region keys searched over, since the last build (the touched share).
    pub touched: u64,
    pub searched: u64,
    /// Seconds the last build took.
    pub build_secs: f64,
}

impl Retrieval {
    pub fn new(budget: Budget, o: &SelectOptions, mc: &ModelConfig) -> Self {
        Self::with_layers(budget, o, mc.n_kv_heads, &mc.layer_is_local, mc.n_layers)
    }

    /// A selector for `n_layers` layers of `n_kv` KV heads; `local[l]`: layer l is a sliding-window layer.
    pub fn with_layers(
        budget: Budget,
        o: &SelectOptions,
        n_kv: usize,
        local: &[bool],
        n_layers: usize,
    ) -> Self {
        let frame = Frame::new(budget, o, DEFAULTS, n_layers);
        let indexed = (0..n_layers)
            .map(|l| l >= frame.dense && !local.get(l).copied().unwrap_or(false))
            .collect();
        Self {
            frame,
            sink: o.sink,
            recent: o.recent,
            queue: o.queue,
            params: Params::default(),
            n_layers,
            n_kv,
            indexed,
            kind: o.index.unwrap_or_default(),
            give_scores: o.index == Some(IndexKind::Flat) && o.rescore != Some(true),
            indexes: Vec::new(),
            built_edits: 0,
            heads: Vec::new(),
            merge: Merge::default(),
            touched: 0,
            searched: 0,
            build_secs: 0.0,
        }
    }

    /// Sets the frame's sinks and recent window for a stream of `len` entries.
    fn fit_static(&mut self, len: usize) {
        let (s, r) = static_set(self.frame.budget.keep(len));
        self.frame.sink = self.sink.unwrap_or(s);
        self.frame.recent = self.recent.unwrap_or(r);
    }

    /// Share of the middle region's keys the searches touched since the last build.
    pub fn touched_share(&self) -> f64 {
        self.touched as f64 / self.searched.max(1) as f64
    }

    fn choose(&mut self, cx: &SelectCx) {
        let (g, hk) = (cx.group(), cx.cache.cfg.head_dim_k);
        let (nh, bt) = (cx.cache.cfg.n_kv_heads, cx.cache.cfg.block_tokens);
        let fresh = self.built_edits == cx.cache.edits();
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nh);
        // `per` tasks per KV head (task j: KV head j / per). A graph search is split by query heads: task j searches for
        // the group's part j % per (each part's heads share their key reads). A scan (flat index, or exact after an
        // edit) reads every key for all the heads at once, so it is split by keys instead: task j scans part j % per
        // of the middle; the parts' choices are merged either way.
        let searched = fresh
            && (0..nh).all(|h| {
                matches!(self.indexes.get(cx.layer * nh + h), Some(Some(ix)) if ix.graph.is_some())
            });
        let threads = rayon::current_num_threads();
        let per = if searched {
            tasks_per_head(nh, g, threads)
        } else {
            scan_parts(nh, threads)
        };
        let part = |i: usize, n: usize| (i * n / per)..((i + 1) * n / per);
        self.heads.resize_with(nh * per, HeadSearch::default);
        for (j, s) in self.heads.iter_mut().enumerate() {
            let (h, i) = (j / per, j % per);
            let m = self.frame.middle(cx, h);
            s.whole = (m.k > 0).then_some(m);
            s.m = s.whole.map(|m| {
                if searched {
                    m
                } else {
                    let r = part(i, m.hi - m.lo);
                    Middle {
                        lo: m.lo + r.start,
                        hi: m.lo + r.end,
                        k: m.k,
                    }
                }
            });
            s.retrieve.want_scores = self.give_scores && !searched;
            s.qs.clear();
            if s.m.is_some() {
                let heads = if searched { part(i, g) } else { 0..g };
                for q in heads {
                    s.qs.extend_from_slice(cx.last_query(h * g + q));
                }
            }
        }
        // The searches over the pool: each is a chain of dependent key reads, but the tasks are independent. (One task
        // per query head also where there are enough KV heads, without the shared key reads, measured 2-6 % slower
        // on SmolLM2 at 8K.)
        let (indexes, queue) = (&self.indexes, self.queue);
        crate::kernels::team::for_each_chunk_mut(&mut self.heads[..nh * per], 1, |j, s| {
            let (s, h) = (&mut s[0], j / per);
            let Some(m) = s.m else {
                return;
            };
            let len = cx.cache.len(cx.layer, h);
            let index = match indexes.get(cx.layer * nh + h) {
                Some(Some(ix)) if fresh && ix.keys.len() <= len => Some(ix),
                _ => None,
            };
            let queue = queue.unwrap_or_else(|| default_queue(m.hi - m.lo));
            let (cache, layer) = (cx.cache, cx.layer);
            // Keys the index covers come from its 8-bit copy; keys appended since come from the cache.
            let mut read = |k: u32, out: &mut [f32]| match index {
                Some(ix) if (k as usize) < ix.keys.len() => ix.keys.read_key(k, out),
                _ => {
                    let v = cache.block(layer, h, k as usize / bt);
                    v.read_key(k as usize % bt, out);
                    key_bytes(&v, bt)
                }
            };
            let (keys, adj) = s.retrieve.run(index, queue, &s.qs, hk, m, &mut read);
            s.read = keys + adj;
        });
        for h in 0..nh {
            let tasks = &self.heads[h * per..(h + 1) * per];
            let Some(m) = tasks[0].whole else {
                continue;
            };
            for s in tasks {
                let part = s.m.unwrap_or(m);
                cx.cache.note_read(s.read);
                self.touched += s.retrieve.keys_touched() as u64;
                self.searched += (part.hi - part.lo) as u64;
            }
            if per == 1 {
                for &k in &tasks[0].retrieve.chosen {
                    kept.add(h, k as usize, k as usize + 1);
                }
                continue;
            }
            // The best of the parts' choices, a key at its best score over the group's heads.
            self.merge.begin(m.hi, !searched);
            for s in tasks {
                self.merge
                    .add(&s.retrieve.chosen, &s.retrieve.chosen_scores);
            }
            for k in self.merge.top(m.k) {
                kept.add(h, k as usize, k as usize + 1);
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }
}

impl Retrieval {
    /// Hands the kernel the scores a flat scan just computed for this query over each KV head's middle (its parts in
    /// order, swapping buffers), so it reads the chosen entries' values and not their keys again (one key of an f16
    /// block stored channel-major touches the block's whole key half). Heads whose scan did not keep them (a graph
    /// search, an exact scan after an edit) give none, and the kernel reads their keys.
    fn hand_scores(&mut self, cx: &SelectCx, out: &mut Selection) {
        let nh = cx.cache.cfg.n_kv_heads;
        if !self.give_scores || nh == 0 || self.heads.len() < nh {
            return;
        }
        let per = self.heads.len() / nh;
        for h in 0..nh {
            let tasks = &mut self.heads[h * per..(h + 1) * per];
            if tasks[0].whole.is_none() || !tasks.iter().all(|s| s.retrieve.gave) {
                continue;
            }
            let given = out.scores_mut(h);
            given.clear();
            for s in tasks {
                if let Some(m) = s.m.filter(|m| m.lo < m.hi) {
                    given.push_swap(m.lo, m.hi, &mut s.retrieve.given);
                }
            }
        }
    }
}

impl Selector for Retrieval {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        self.fit_static(cx.cache.len(cx.layer, 0));
        let chose = match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => false,
            Step::Choose => {
                self.choose(cx);
                true
            }
        };
        self.frame.finish(cx, out);
        if chose {
            self.hand_scores(cx, out);
        }
        true
    }

    fn query_window(&self) -> usize {
        QUERY_WINDOW
    }

    fn end_prefill(&mut self, cache: &KvCache, obs: &QueryWindow) {
        let t0 = Instant::now();
        let (nh, hk, bt) = (self.n_kv, cache.cfg.head_dim_k, cache.cfg.block_tokens);
        let g = obs.row() / hk / nh.max(1);
        let jobs: Vec<usize> = (0..self.n_layers * nh)
            .filter(|&i| self.indexed[i / nh] && g > 0 && cache.len(i / nh, i % nh) > 0)
            .collect();
        let mut ranges = Vec::with_capacity(jobs.len());
        for &i in &jobs {
            let len = cache.len(i / nh, i % nh);
            self.fit_static(len);
            let total = self.frame.budget.keep(len);
            let sink = self.frame.sink.min(total);
            let recent = self.frame.recent.min(total - sink);
            ranges.push(sink..len.saturating_sub(recent).max(sink));
        }
        // The newest row's queries come first in the build set (rows are taken newest first).
        let params = Params {
            seed_queries: g,
            ..self.params
        };
        let kind = self.kind;
        let built: Vec<(usize, Index)> = jobs
            .par_iter()
            .zip(ranges)
            .map(|(&i, range)| {
                let (layer, h) = (i / nh, i % nh);
                let n = cache.len(layer, h);
                let mut keys = vec![0.0f32; n * hk];
                for (b, v) in cache.blocks(layer, h).enumerate() {
                    for j in 0..v.n {
                        v.read_key(j, &mut keys[(b * bt + j) * hk..][..hk]);
                    }
                }
                let copy = KeyCopy::new(&keys, hk);
                if kind == IndexKind::Flat {
                    return (
                        i,
                        Index {
                            keys: copy,
                            graph: None,
                        },
                    );
                }
                let (mut q, mut pos) = (Vec::new(), Vec::new());
                obs.gather(
                    layer,
                    h * g..(h + 1) * g,
                    hk,
                    QUERY_WINDOW,
                    &mut q,
                    &mut pos,
                );
                let rows = q.len() / (g * hk);
                let picked: Vec<f32> = (0..rows)
                    .rev()
                    .step_by(BUILD_STRIDE)
                    .flat_map(|r| q[r * g * hk..(r + 1) * g * hk].iter().copied())
                    .collect();
                // Without recorded queries there is no graph to build: the layer scans its copy.
                let graph =
                    (!picked.is_empty()).then(|| Graph::build(&keys, hk, &picked, range, params));
                (i, Index { keys: copy, graph })
            })
            .collect();
        self.indexes = vec![None; self.n_layers * nh];
        for (i, ix) in built {
            self.indexes[i] = Some(ix);
        }
        self.built_edits = cache.edits();
        self.touched = 0;
        self.searched = 0;
        self.build_secs = t0.elapsed().as_secs_f64();
    }

    fn index_bytes(&self) -> usize {
        self.indexes.iter().flatten().map(Index::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift generator of roughly normal numbers.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            let mut s = 0.0;
            for _ in 0..4 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                s += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 1.7
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    const HK: usize = 64;

    /// Keys with a shared offset and slowly drifting topics (like keys along a text), queries from another
    /// distribution (queries are out-of-distribution for keys): returns (keys, build queries).
    fn data(n: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng(seed);
        let offset = r.vec(HK);
        let topics: Vec<Vec<f32>> = (0..16).map(|_| r.vec(HK)).collect();
        let mut keys = Vec::with_capacity(n * HK);
        for i in 0..n {
            let t = &topics[i * 16 / n];
            for c in 0..HK {
                keys.push(offset[c] + 0.8 * t[c] + r.next());
            }
        }
        let qdir = r.vec(HK);
        let queries = (0..m * HK).map(|c| 0.5 * qdir[c % HK] + r.next()).collect();
        (keys, queries)
    }

    fn read_from(keys: &[f32]) -> impl FnMut(u32, &mut [f32]) -> usize + '_ {
        |k, out| {
            out.copy_from_slice(&keys[k as usize * HK..][..HK]);
            2 * HK
        }
    }

    fn exact_top(keys: &[f32], q: &[f32], r: Range<usize>) -> u32 {
        r.max_by(|&a, &b| dot(q, &keys[a * HK..][..HK]).total_cmp(&dot(q, &keys[b * HK..][..HK])))
            .unwrap() as u32
    }

    #[test]
    fn graph_search_finds_the_true_top_key_for_queries_like_the_build_queries() {
        let (n, m) = (4096, 384);
        let (keys, queries) = data(n, m, 7);
        let g = Graph::build(&keys, HK, &queries, 0..n, Params::default());
        let ix = Index {
            keys: KeyCopy::new(&keys, HK),
            graph: Some(g.clone()),
        };
        // Measured (200 queries): queue 128 finds the top key for 195 touching 22.9 % of the keys, queue 32 for
        // 164 at 9.2 %; with the 8-bit copy, queue 128: 195 at 22.9 %.
        let cases = [
            (QUEUE, 185, 0.30, false),
            (32, 155, 0.12, false),
            (QUEUE, 185, 0.30, true),
        ];
        for (queue, min_hits, max_share, copy) in cases {
            let mut rt = Retrieve::default();
            let mut r = Rng(99);
            let (mut hits, mut touched, trials) = (0, 0, 200);
            for t in 0..trials {
                // A query near a build query (the decode query resembles the prompt's last queries).
                let base = &queries[(t * 7 % m) * HK..][..HK];
                let q: Vec<f32> = base.iter().map(|x| x + 0.3 * r.next()).collect();
                let mid = Middle {
                    lo: 0,
                    hi: n,
                    k: 32,
                };
                // `copy`: the search reads the index's 8-bit keys, as the selector does.
                if copy {
                    rt.run(Some(&ix), queue, &q, HK, mid, &mut |k, out| {
                        ix.keys.read_key(k, out)
                    });
                } else {
                    rt.run(Some(&ix), queue, &q, HK, mid, &mut read_from(&keys));
                }
                touched += rt.touch.touched.len();
                if rt.chosen.contains(&exact_top(&keys, &q, 0..n)) {
                    hits += 1;
                }
            }
            let share = touched as f64 / (trials * n) as f64;
            eprintln!(
                "queue {queue} (8-bit copy: {copy}): top-1 recall {hits}/{trials}, touched share {share:.3}, graph {} B",
                g.bytes()
            );
            assert!(
                hits >= min_hits,
                "queue {queue}: top-1 recall {hits}/{trials}"
            );
            assert!(share < max_share, "queue {queue}: touched share {share:.3}");
        }
    }

    #[test]
    fn every_key_is_reachable_and_the_degree_is_bounded() {
        let (n, m) = (3000, 256);
        let (keys, queries) = data(n, m, 3);
        let p = Params::default();
        let g = Graph::build(&keys, HK, &queries, 100..2900, p);
        assert_eq!(g.len(), n);
        assert!(!g.entries.is_empty());
        assert!(g
            .entries
            .iter()
            .all(|&e| (100..2900).contains(&(e as usize))));
        for i in 0..n {
            assert!(
                g.edges(i).len() <= p.degree,
                "key {i}: degree {}",
                g.edges(i).len()
            );
            assert!(g
                .edges(i)
                .iter()
                .all(|&c| (c as usize) < n && c as usize != i));
        }
        // Keys outside the build range have no projected edges.
        assert!((0..100).chain(2900..n).all(|i| g.edges(i).is_empty()));
        assert!(
            g.edges.len() > n / 4,
            "too few projected edges: {}",
            g.edges.len()
        );
        let mut seen = vec![false; n];
        let mut stack: Vec<u32> = g.entries.clone();
        for &e in &g.entries {
            seen[e as usize] = true;
        }
        while let Some(v) = stack.pop() {
            g.for_each_neighbour(v, |c| {
                if !seen[c as usize] {
                    seen[c as usize] = true;
                    stack.push(c);
                }
            });
        }
        assert!(seen.iter().all(|&s| s), "unreachable keys");
        assert_eq!(g.bytes(), 4 * (n + 1 + g.edges.len() + g.entries.len()));
    }

    #[test]
    fn the_key_copy_holds_each_key_within_half_a_step_and_scans_like_its_reads() {
        let (n, m) = (3000, 8);
        let (keys, queries) = data(n, m, 5);
        let copy = KeyCopy::new(&keys, HK);
        assert_eq!((copy.len(), copy.bytes()), (n, n * (HK + 4)));
        let mut out = vec![0.0; HK];
        for i in [0, 1234, n - 1] {
            assert_eq!(copy.read_key(i as u32, &mut out), HK + 4);
            let key = &keys[i * HK..][..HK];
            let step = key.iter().fold(0.0f32, |a, &x| a.max(x.abs())) / 127.0;
            for (a, b) in out.iter().zip(key) {
                assert!((a - b).abs() <= 0.5 * step * 1.0001, "key {i}: {a} vs {b}");
            }
        }
        // A scan of keys 100..2100 for three query heads: each key's best score over the heads, as its read gives up to
        // the query's rounding.
        let qs = &queries[..3 * HK];
        let qstep = qs.iter().fold(0.0f32, |a, &x| a.max(x.abs())) / 127.0;
        let mut scores = vec![0.0; 2000];
        assert_eq!(copy.scan(100, qs, &mut scores, None), 2000 * (HK + 4));
        for (i, &got) in scores.iter().enumerate() {
            copy.read_key((100 + i) as u32, &mut out);
            let want = qs
                .chunks_exact(HK)
                .map(|q| dot(q, &out))
                .fold(f32::NEG_INFINITY, f32::max);
            // The scan quantizes each query head to 8 bits: half its step per channel.
            let l1: f32 = out.iter().map(|x| x.abs()).sum();
            let bound = l1 * qstep / 2.0 + 1e-4 * (1.0 + want.abs());
            assert!(
                (got - want).abs() <= bound,
                "key {}: {got} vs {want} (bound {bound})",
                100 + i
            );
        }
    }

    #[test]
    fn retrieval_touches_a_small_share_and_scans_keys_past_the_graph() {
        let (n, m) = (4000, 256);
        let (keys, queries) = data(n, m, 11);
        let g = Graph::build(
            &keys[..3500 * HK],
            HK,
            &queries[..200 * HK],
            0..3500,
            Params::default(),
        );
        let ix = Index {
            keys: KeyCopy::new(&keys[..3500 * HK], HK),
            graph: Some(g),
        };
        let mut rt = Retrieve::default();
        // Three query heads in the group; keys 3500.. were appended after the build and lie in the middle.
        let qs = queries[200 * HK..203 * HK].to_vec();
        let mid = Middle {
            lo: 16,
            hi: 3800,
            k: 64,
        };
        let (kb, adj) = rt.run(Some(&ix), 64, &qs, HK, mid, &mut read_from(&keys));
        let touched = rt.touch.touched.len();
        eprintln!("three heads, queue 64: touched {touched}");
        assert_eq!(kb, touched * 2 * HK);
        assert!(adj > 0);
        // Three searches and the 300 keys past the graph: 1565 measured.
        assert!(touched < n / 2, "touched {touched} of {n}");
        assert!(
            (3500..3800).all(|k| rt.touch.touched.contains(&k)),
            "keys past the graph must be scanned"
        );
        assert_eq!(rt.chosen.len(), 64);
        assert!(rt
            .chosen
            .iter()
            .all(|&k| (16..3800).contains(&(k as usize))));
        // Without a graph (stale index) the whole middle is scanned and the choice is the exact top.
        let (kb, adj) = rt.run(None, QUEUE, &qs, HK, mid, &mut read_from(&keys));
        assert_eq!((kb, adj), ((3800 - 16) * 2 * HK, 0));
        let best = |k: usize| {
            qs.chunks_exact(HK)
                .map(|q| dot(q, &keys[k * HK..][..HK]))
                .fold(f32::NEG_INFINITY, f32::max)
        };
        let mut all: Vec<usize> = (16..3800).collect();
        all.sort_by(|&a, &b| best(b).total_cmp(&best(a)));
        let mut got: Vec<usize> = rt.chosen.iter().map(|&k| k as usize).collect();
        got.sort_by(|&a, &b| best(b).total_cmp(&best(a)));
        assert_eq!(got, all[..64]);
        // A flat index scores every key of the middle: the copy's for keys it holds, `read`'s past it. Its choice
        // is the exact top up to the copy's rounding: at least 60 of the exact 64.
        let flat = Index {
            keys: ix.keys.clone(),
            graph: None,
        };
        let (kb, adj) = rt.run(Some(&flat), QUEUE, &qs, HK, mid, &mut read_from(&keys));
        assert_eq!((kb, adj), ((3500 - 16) * (HK + 4) + 300 * 2 * HK, 0));
        assert_eq!(rt.chosen.len(), 64);
        let exact: std::collections::HashSet<usize> = all[..64].iter().copied().collect();
        let same = rt
            .chosen
            .iter()
            .filter(|&&k| exact.contains(&(k as usize)))
            .count();
        assert!(same >= 60, "flat index: {same} of the exact top 64");
    }

    #[test]
    fn keys_the_build_left_to_the_recent_window_are_scanned_once_they_leave_it() {
        let (n, m) = (4000, 256);
        let (mut keys, queries) = data(n, m, 12);
        let qs = queries[200 * HK..203 * HK].to_vec();
        // A key just past the build's range (in its recent window then) that the second query head wants most.
        let planted = 3600;
        for (c, x) in keys[planted * HK..][..HK].iter_mut().enumerate() {
            *x = 4.0 * qs[HK + c];
        }
        // The graph holds every key, but its projected edges cover 0..3500 only.
        let g = Graph::build(&keys, HK, &queries[..200 * HK], 0..3500, Params::default());
        assert!((3500..n).all(|i| g.edges(i).is_empty()));
        let ix = Index {
            keys: KeyCopy::new(&keys, HK),
            graph: Some(g),
        };
        let mut rt = Retrieve::default();
        // Decoding moved the middle's end from 3500 to 3800.
        let mid = Middle {
            lo: 16,
            hi: 3800,
            k: 64,
        };
        rt.run(Some(&ix), 64, &qs, HK, mid, &mut read_from(&keys));
        assert!(
            (3500..3800).all(|k| rt.touch.touched.contains(&k)),
            "keys the build left to the recent window must be scanned"
        );
        assert!(rt.chosen.contains(&(planted as u32)));
        assert!(rt
            .chosen
            .iter()
            .all(|&k| (16..3800).contains(&(k as usize))));
    }

    #[test]
    fn top_sorted_matches_a_full_sort() {
        let mut r = Rng(5);
        let mut row = r.vec(1000);
        row[10] = row[20];
        let mut heap = Vec::new();
        for n in [0, 1, 7, 100, 1000, 2000] {
            top_sorted(&row, n, &mut heap);
            let mut all: Vec<(f32, u32)> = row
                .iter()
                .enumerate()
                .map(|(i, &x)| (x, i as u32))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
            assert_eq!(heap, all[..n.min(1000)]);
        }
    }

    #[test]
    fn the_selector_finds_a_planted_key_and_scans_exactly_after_an_edit() {
        use crate::kv::{KvConfig, KvDtype};
        let (n, g) = (3000, 2);
        let (mut keys, queries) = data(n, 512 * g, 13);
        // The decode query and a key planted at 1500 that it scores far above every other.
        let q: Vec<f32> = (0..g * HK).map(|c| queries[c] * 0.5).collect();
        for c in 0..HK {
            keys[1500 * HK + c] = 4.0 * q[c];
        }
        let mut cache = KvCache::new(KvConfig {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim_k: HK,
            head_dim_v: HK,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        });
        let pos: Vec<u32> = (0..n as u32).collect();
        let zeros = vec![0.0; n * HK];
        let mut obs = QueryWindow::new(2, g * HK, QUERY_WINDOW);
        for layer in 0..2 {
            cache.append(layer, &pos, &keys, &zeros);
            obs.record(layer, &queries, &pos[n - 512..]);
        }
        // Layer 1 is a sliding-window layer: no graph there.
        let mut sel = Retrieval::with_layers(
            Budget::Tokens(400),
            &SelectOptions::default(),
            1,
            &[false, true],
            2,
        );
        sel.end_prefill(&cache, &obs);
        assert!(
            sel.indexes[0].as_ref().is_some_and(|ix| ix.graph.is_some())
                && sel.indexes[1].is_none()
        );
        let ix0 = sel.indexes[0].as_ref().unwrap();
        assert_eq!(sel.index_bytes(), ix0.bytes());
        assert_eq!(
            ix0.bytes(),
            ix0.graph.as_ref().unwrap().bytes() + n * (HK + 4)
        );
        let step = |cache: &mut KvCache, sel: &mut Retrieval, p: u32| {
            cache.append(0, &[p], &q[..HK], &zeros[..HK]);
            let cx = SelectCx {
                cache,
                layer: 0,
                q: &q,
                pos: &[p],
                n_q_heads: g,
                local: false,
            };
            cache.take_read();
            let mut out = Selection::default();
            assert!(sel.select(&cx, &mut out));
            let m = sel.frame.middle(&cx, 0);
            (out, cache.take_read() as usize, m)
        };
        // On two threads the one KV head's group (2 query heads) is searched in two parts, merged.
        assert_eq!(tasks_per_head(1, g, 2), 2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (out, read, m) = pool.install(|| step(&mut cache, &mut sel, n as u32));
        assert_eq!(sel.heads.len(), 2);
        let (sink, recent) = static_set(400);
        assert_eq!(
            (m.lo, m.hi, m.k),
            (sink, n + 1 - recent, 400 - sink - recent)
        );
        assert_eq!(out.count(0), 400);
        assert!(out.ranges(0).iter().any(|&(a, b)| (a..b).contains(&1500)));
        let scan = (m.hi - m.lo) * 2 * HK;
        assert!(
            read < scan / 2,
            "the search read {read} bytes, an exact scan {scan}"
        );
        // index=flat: no graph, every middle key scored from the copy (built over the n + 1 keys the cache now holds).
        let mut flat = Retrieval::with_layers(
            Budget::Tokens(400),
            &SelectOptions {
                index: Some(IndexKind::Flat),
                ..Default::default()
            },
            1,
            &[false, true],
            2,
        );
        flat.end_prefill(&cache, &obs);
        let ix0 = flat.indexes[0].as_ref().unwrap();
        assert!(ix0.graph.is_none() && ix0.keys.len() == n + 1);
        assert_eq!(flat.index_bytes(), (n + 1) * (HK + 4));
        // Its scores of the middle go to the kernel (in the scan's parts, one per task: 4 on two threads), each
        // query head's within the two 8-bit roundings (key and query) of the exact q·k; keys appended after the
        // build that have left the recent window are scored exactly.
        let given_ok = |out: &Selection, cache: &KvCache, m: Middle, parts: usize| {
            let gs = out
                .scores(0)
                .expect("a flat scan hands its scores to the kernel");
            assert_eq!((gs.lo(), gs.hi(), gs.parts().len()), (m.lo, m.hi, parts));
            let mut key = vec![0.0f32; HK];
            for part in gs.parts() {
                let (lo, hi) = (part.lo as usize, part.hi as usize);
                for j in 0..g {
                    let qj = &q[j * HK..][..HK];
                    for e in lo..hi {
                        cache.block(0, 0, e / 32).read_key(e % 32, &mut key);
                        let exact = dot(qj, &key);
                        let amax = |v: &[f32]| v.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                        let l1 = |v: &[f32]| v.iter().map(|x| x.abs()).sum::<f32>();
                        let bound = if e < n + 1 {
                            1.01 * (l1(qj) * amax(&key) + l1(&key) * amax(qj)) / 254.0 + 1e-4
                        } else {
                            1e-4 * (1.0 + exact.abs())
                        };
                        let got = part.rows[j * (hi - lo) + e - lo];
                        assert!(
                            (got - exact).abs() <= bound,
                            "head {j} entry {e}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        };
        let (out, read, m) = pool.install(|| step(&mut cache, &mut flat, n as u32 + 1));
        assert_eq!(read, (m.hi - m.lo) * (HK + 4));
        assert!(out.ranges(0).iter().any(|&(a, b)| (a..b).contains(&1500)));
        assert_eq!(out.count(0), 400);
        given_ok(&out, &cache, m, scan_parts(1, 2));
        // One thread, one part; 100 steps later the first keys appended after the build are in the middle.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for p in n as u32 + 2..n as u32 + 102 {
            one.install(|| step(&mut cache, &mut flat, p));
        }
        let (out, _, m) = one.install(|| step(&mut cache, &mut flat, n as u32 + 102));
        assert!(m.hi > n + 1, "keys past the copy in the middle");
        given_ok(&out, &cache, m, 1);
        // The graph search hands no scores (it scores only the keys it touched).
        let (out, _, _) = step(&mut cache, &mut sel, n as u32 + 103);
        assert!(out.scores(0).is_none());
        // An eviction moves entry indices: the stale graph is not used, the middle is scanned exactly (every key read),
        // and no scores are handed over.
        cache.retain(0, 0, |i, _| i != 10);
        let (out, read, m) = step(&mut cache, &mut sel, n as u32 + 104);
        assert!(out.scores(0).is_none());
        assert_eq!(read, (m.hi - m.lo) * 2 * HK);
        assert!(out.ranges(0).iter().any(|&(a, b)| (a..b).contains(&1499)));
        assert_eq!(out.count(0), 400);
    }

    #[test]
    fn few_kv_heads_split_their_group_over_the_threads() {
        assert_eq!(tasks_per_head(3, 3, 2), 1);
        assert_eq!(tasks_per_head(2, 7, 2), 1);
        assert_eq!(tasks_per_head(1, 4, 2), 2);
        assert_eq!(tasks_per_head(1, 4, 16), 4);
        assert_eq!(tasks_per_head(2, 7, 16), 7);
        assert_eq!(tasks_per_head(3, 3, 4), 2);
        assert_eq!(scan_parts(3, 2), 2);
        assert_eq!(scan_parts(1, 2), 4);
        assert_eq!(scan_parts(8, 2), 1);
        assert_eq!(scan_parts(1, 1), 1);
    }

    #[test]
    fn static_set_keeps_the_official_proportions_and_the_queue_shrinks_for_short_contexts() {
        assert_eq!(static_set(4000), (SINK, RECENT));
        assert_eq!(static_set(2640), (SINK, RECENT));
        assert_eq!(static_set(512), (24, 99));
        assert_eq!(static_set(0), (0, 0));
        assert_eq!(default_queue(100), MIN_QUEUE);
        assert_eq!(default_queue(600), 18);
        assert_eq!(default_queue(4096), QUEUE);
        assert_eq!(default_queue(100_000), QUEUE);
    }

    #[test]
    fn build_time_of_an_8k_stream() {
        // One (layer, KV head) of SmolLM2 at 8K tokens: 8192 keys, 128 rows × 3 query heads.
        let (keys, queries) = data(8192, 384, 5);
        let t0 = Instant::now();
        let g = Graph::build(&keys, HK, &queries, 128..7680, Params::default());
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "8K stream: build {dt:.3} s, {} edges, {} B",
            g.edges.len(),
            g.bytes()
        );
        assert!(g.bytes() < 8192 * 4 * (DEGREE + 2));
    }
}
