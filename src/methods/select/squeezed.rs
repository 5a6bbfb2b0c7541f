//! Squeezed Attention — Hooper, Kim, Mohammadzadeh, Maheswaran, Zhao, Paik, Mahoney, Keutzer and Gholami, "Squeezed
//! Attention: Accelerating Long Context Length LLM Inference" (ACL 2025; arXiv 2411.09688).
//!
//! Mechanism: once the fixed context is prefilled ([`Selector::end_prefill`]), every (layer, KV head) clusters its keys
//! by k-means on the L2-normalised keys (cosine clustering; k-means++ seeding, Lloyd iterations with Hamerly's bounds),
//! with as many centroids as 5 % of the clustered keys; a centroid is the mean of the raw keys of its cluster, and each
//! cluster keeps the list of its entries. The fixed context's last 100 tokens (the observation window) are never
//! clustered and always read, as is everything appended later (the question, decoded tokens). At decode a cluster's
//! keys get the estimated attention `exp(q·c/√d) / Σ_c' n_c' exp(q·c'/√d)` (a softmax over the centroids, each
//! weighted by its cluster's size n), per query head; a KV head takes the **maximum** over its group's query heads.
//! Then either
//! - **budget** (default, `squeezed@B`): clusters best-first until the head's budget is filled (the last one taking its
//!   newest entries), or
//! - **threshold** (`threshold=Q`): the clusters whose estimate reaches one global number, the Q quantile of the
//!   estimates of the fixed context's keys under the observation window's queries (mean over those queries; pooled
//!   over every indexed layer and head), so the number of keys a head reads adapts to its query. The budget caps it.
//!
//! `levels=2` is the hierarchical lookup: L1 centroids (1 % of the keys) cluster the L2 centroids; scoring reads all
//! L1 centroids, and only the L2 centroids under the L1 clusters whose estimate passes the L1 threshold (the 0.7
//! quantile, computed like the L2 one), so fewer centroids are read. A key is kept only if its L1 and L2 clusters both
//! pass. The L2 softmax of that path is normalised over what it read: the L2 clusters under passing L1 clusters plus
//! the other L1 clusters (each weighted by its keys).
//!
//! Defaults from the official code (SqueezeAILab/SqueezedAttention, `offline_clustering.py`, `clustering.py`, run
//! script): 5 % centroids, observation window 100, k-means++ with a fixed seed (`random_state 0`), normalised keys,
//! raw-key means as centroids, the threshold quantile 0.9 (`run_different_prefix_offline.sh`), `percentile_lower`
//! 0.7 for L1, thresholds pooled over all layers and heads. Deviations:
//! - k-means stops after [`MAX_ITER`] iterations or once fewer than 0.1 % of the keys change cluster (cuML: up to 300
//!   iterations with tolerance 1e-4), to keep the build fast on a CPU;
//! - L1 is 1 % of the keys (the official script leaves both shares as arguments);
//! - the official code is MHA (one query per KV head): here a cluster's score is the max over the group's query heads,
//!   in the thresholds' computation as at decode;
//! - the first 2 layers stay dense (hayloft's frame; `dense=0` indexes every layer, as the official code does);
//!   sliding-window layers are not indexed;
//! - the official repository simulates the hierarchy with two one-level lookups and a mask; here it is the lookup
//!   path, and the L2 estimate's denominator uses L1 centroids for the clusters it did not expand.
//!
//! Build cost: one pass per k-means++ seed plus the Hamerly-pruned Lloyd passes, with a register-blocked distance
//! kernel; about 6 s of CPU (both cores together) for an 8K-token SmolLM2-135M prompt (28 indexed layers × 3 KV
//! heads, 393 centroids each), 1–1.5 s for 4K.
//!
//! The index lives beside the cache ([`Selector::index_bytes`]: f16 centroids, cluster sizes and the entry lists).
//! Scoring counts what it reads: centroids (f16), sizes, and the entry lists of the clusters it keeps. If the cache is
//! edited after the build (eviction, truncation), the layer's index is rebuilt over the same tokens (those before the
//! observation window's first position) before it selects again; the thresholds stay those of the last build.

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

use super::{Frame, FrameDefaults, SelectOptions, Step};
use crate::attention::Selection;
use crate::kernels::mathfn::exp_neg;
use crate::kernels::rowdot::{cols_dot_f16_next_strided, MAX_VECTORS};
use crate::kv::{prefetch_lines, KvCache};
use crate::methods::obs::dot;
use crate::methods::prefill::plan::Bits;
use crate::methods::spec::Budget;
use crate::model::{ModelConfig, QueryWindow, SelectCx, Selector};

/// Newest tokens of the fixed context never clustered, always read; also the queries the thresholds come from
/// (official `--observation_window 100`).
pub const OBS_WINDOW: usize = 100;
/// Centroids as a share of the clustered keys, in percent (official run script `PERC_CLUSTERS=5`).
pub const PERCENT_CLUSTERS: usize = 5;
/// L1 centroids of the hierarchical lookup, in percent of the clustered keys (the reference's cost table; see above).
pub const PERCENT_CLUSTERS_L1: usize = 1;
/// Quantile of the threshold mode when written without a value elsewhere (official run script: 0.90).
pub const DEFAULT_THRESHOLD: f32 = 0.9;
/// Quantile an L1 cluster's estimate must reach (official `percentile_lower` 0.7).
pub const PERCENTILE_LOWER: f32 = 0.7;
/// Lloyd iterations at most (official: cuML's 300; see the deviations above).
pub const MAX_ITER: usize = 30;
/// k-means stops once at most this share of the points changes cluster in an iteration.
pub const CHANGE_TOL: f64 = 1e-3;
/// Seed of the k-means++ draws (official `random_state 0`).
pub const SEED: u64 = 0;
/// Candidate clusters a head orders first when it takes them best-first (about twice what a 1K budget of an 8K
/// SmolLM2 context takes); more are ordered only when those do not fill the budget.
const FIRST_SLICE: usize = 96;
/// Clusters ahead whose entry lists [`HeadScratch::take`] asks for.
const TAKE_AHEAD: usize = 4;

/// Squeezed Attention's frame: no sinks, no recent window (the unclustered tail is always read instead), hayloft's 2
/// dense layers, a new lookup every step.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: 0,
    recent: 0,
    dense: 2,
    interval: 1,
};

/// Parses a quantile option value in (0, 1).
pub fn parse_quantile(name: &str, v: &str) -> Result<f32> {
    match v.parse::<f32>() {
        Ok(q) if q > 0.0 && q < 1.0 => Ok(q),
        _ => bail!("{name}={v}: expected a quantile in (0, 1), e.g. {name}={DEFAULT_THRESHOLD}"),
    }
}

/// Parses a number of centroid levels (1 or 2).
pub fn parse_levels(name: &str, v: &str) -> Result<usize> {
    match v {
        "1" => Ok(1),
        "2" => Ok(2),
        _ => bail!("{name}={v}: 1 (one level of centroids) or 2 (hierarchical lookup)"),
    }
}

/// Centroids per tile of a level's store: one tile is scored as a KV block's keys are ([`cols_dot_f16_next_strided`]).
const CENT_TILE: usize = 64;

/// Where channel `ch` of centroid `c` lies in a store of centroid tiles of `hk` channels ([`Level::tiles`]).
fn tile_index(c: usize, ch: usize, hk: usize) -> usize {
    (c / CENT_TILE) * hk * CENT_TILE + ch * CENT_TILE + c % CENT_TILE
}

/// One level of centroids and what each cluster holds.
#[derive(Clone, Debug, Default)]
struct Level {
    /// The centroids as f16, in tiles of [`CENT_TILE`] stored channel-major (tile t: hk × CENT_TILE, centroid
    /// 64t + i in column i, at [`tile_index`]; the last tile's unused columns 0): the mean of the raw keys (L1: of the L2 centroids) of each
    /// cluster. Channel-major, every centroid of a tile is scored against the query heads with one load and
    /// conversion of each channel's values (row by row, the conversion and the per-row sums took as long as the rest
    /// of the selection).
    tiles: Vec<f16>,
    /// Cluster c holds `members[start[c]..start[c + 1]]`, ascending: entry indices (L2) or L2 clusters (L1).
    start: Vec<u32>,
    members: Vec<u32>,
    /// Keys under each cluster (the weight of its centroid in the softmax estimate).
    keys: Vec<u32>,
}

impl Level {
    fn k(&self) -> usize {
        self.keys.len()
    }

    fn members(&self, c: usize) -> &[u32] {
        &self.members[self.start[c] as usize..self.start[c + 1] as usize]
    }

    fn bytes(&self) -> usize {
        2 * self.tiles.len() + 4 * (self.start.len() + self.members.len() + self.keys.len())
    }

    /// Channel `ch` of centroid `c` (hk channels).
    fn at(&self, c: usize, ch: usize, hk: usize) -> f16 {
        self.tiles[tile_index(c, ch, hk)]
    }

    /// A level from k-means labels of `n` points (`raw`: n × hk, what the centroids average), dropping empty
    /// clusters. Returns it and its centroids as f32.
    fn from_labels(labels: &[u32], k: usize, raw: &[f32], hk: usize) -> (Level, Vec<f32>) {
        let mut count = vec![0u32; k];
        for &l in labels {
            count[l as usize] += 1;
        }
        // Renumber the non-empty clusters in order.
        let mut id = vec![u32::MAX; k];
        let mut kk = 0;
        for c in 0..k {
            if count[c] > 0 {
                id[c] = kk as u32;
                kk += 1;
            }
        }
        let mut start = vec![0u32; kk + 1];
        for c in 0..k {
            if count[c] > 0 {
                start[id[c] as usize + 1] = count[c];
            }
        }
        for c in 0..kk {
            start[c + 1] += start[c];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; labels.len()];
        let mut sum = vec![0.0f32; kk * hk];
        for (i, &l) in labels.iter().enumerate() {
            let c = id[l as usize] as usize;
            members[fill[c] as usize] = i as u32;
            fill[c] += 1;
            for (s, &x) in sum[c * hk..][..hk].iter_mut().zip(&raw[i * hk..][..hk]) {
                *s += x;
            }
        }
        let mut keys = Vec::with_capacity(kk);
        for c in 0..kk {
            let n = start[c + 1] - start[c];
            keys.push(n);
            for s in &mut sum[c * hk..][..hk] {
                *s /= n as f32;
            }
        }
        let mut tiles = vec![f16::ZERO; kk.div_ceil(CENT_TILE) * CENT_TILE * hk];
        for c in 0..kk {
            for ch in 0..hk {
                tiles[tile_index(c, ch, hk)] = f16::from_f32(sum[c * hk + ch]);
            }
        }
        (
            Level {
                tiles,
                start,
                members,
                keys,
            },
            sum,
        )
    }
}

/// The index of one (layer, KV head).
#[derive(Clone, Debug, Default)]
struct HeadIndex {
    /// Entries `[0, end)` are clustered; later ones are always read.
    end: usize,
    /// L2 clusters of the entries.
    l2: Level,
    /// L1 clusters of the L2 clusters (`levels=2`).
    l1: Option<Level>,
}

impl HeadIndex {
    fn bytes(&self) -> usize {
        self.l2.bytes() + self.l1.as_ref().map_or(0, Level::bytes)
    }

    /// Clusters the entries of (layer, h) whose positions are below `pos_end`.
    fn build(cache: &KvCache, layer: usize, h: usize, pos_end: u32, levels: usize) -> Self {
        let hk = cache.cfg.head_dim_k;
        let mut raw = Vec::new();
        let mut row = vec![0.0f32; hk];
        'blocks: for b in cache.blocks(layer, h) {
            for j in 0..b.n {
                if b.pos[j] >= pos_end {
                    break 'blocks;
                }
                b.read_key(j, &mut row);
                raw.extend_from_slice(&row);
            }
        }
        let n = raw.len() / hk;
        if n == 0 {
            return Self::default();
        }
        let k = (n * PERCENT_CLUSTERS / 100).max(1);
        let labels = kmeans(&normalised(&raw, hk), hk, k, SEED, MAX_ITER);
        let (l2, cent2) = Level::from_labels(&labels, k, &raw, hk);
        let l1 = (levels == 2).then(|| {
            let k1 = (n * PERCENT_CLUSTERS_L1 / 100).clamp(1, l2.k());
            let labels = kmeans(&normalised(&cent2, hk), hk, k1, SEED, MAX_ITER);
            let (mut l1, _) = Level::from_labels(&labels, k1, &cent2, hk);
            for c in 0..l1.k() {
                l1.keys[c] = l1.members(c).iter().map(|&m| l2.keys[m as usize]).sum();
            }
            l1
        });
        Self { end: n, l2, l1 }
    }
}

/// Rows of `x` (each `d` wide) scaled to unit length (zero rows stay zero), as F.normalize does.
fn normalised(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    for r in y.chunks_exact_mut(d) {
        let n = dot(r, r).sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= n);
    }
    y
}

/// The score of every centroid of `tiles` (centroids in tiles of [`CENT_TILE`], channel-major, as [`Level::tiles`])
/// against the query rows `q` (g × hk): `scale · q_i·c` into `s` (g rows of kp = the tiles' columns; the padding
/// columns score 0).
fn scores(tiles: &[f16], q: &[f32], hk: usize, scale: f32, s: &mut Vec<f32>) {
    let (tile, g) = (hk * CENT_TILE, q.len() / hk);
    let kp = tiles.len() / hk;
    s.clear();
    s.resize(g * kp, 0.0);
    for (t, kt) in tiles.chunks_exact(tile).enumerate() {
        let next = tiles.get((t + 1) * tile..(t + 2) * tile).unwrap_or(&[]);
        // At most MAX_VECTORS query rows a call (a GQA group is fewer).
        for (j, w) in q.chunks(MAX_VECTORS * hk).enumerate() {
            // SAFETY: rows j·MAX_VECTORS.. of `s` (kp apart) hold this tile's CENT_TILE columns at t·CENT_TILE;
            // nothing else refers to `s` meanwhile.
            unsafe {
                let out = s.as_mut_ptr().add(j * MAX_VECTORS * kp + t * CENT_TILE);
                cols_dot_f16_next_strided(kt, CENT_TILE, w, out, kp, next);
            }
        }
    }
    s.iter_mut().for_each(|x| *x *= scale);
}

/// The estimated attention of one key of each cluster, `exp(s_c) / Σ_c' n_c' exp(s_c')` per query head, and the
/// maximum over the query heads into `out` (k). `s`: g rows of scores, `kp` ≥ k apart; `keys`: the clusters' sizes;
/// `e`: scratch (each row's exponentials, computed once, with the vectorizing [`exp_neg`]).
fn estimate(s: &[f32], kp: usize, keys: &[u32], e: &mut Vec<f32>, out: &mut Vec<f32>) {
    let k = keys.len();
    out.clear();
    out.resize(k, 0.0);
    for si in s.chunks_exact(kp) {
        let si = &si[..k];
        let m = si.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        e.clear();
        e.extend(si.iter().map(|&x| exp_neg(x - m)));
        let z: f32 = e.iter().zip(keys).map(|(&x, &n)| n as f32 * x).sum();
        let inv = 1.0 / z;
        for (o, &x) in out.iter_mut().zip(e.iter()) {
            *o = o.max(x * inv);
        }
    }
}

/// The mean over the observation queries `q` (t × g × hk) of each cluster's estimate, with its size: what the global
/// threshold is a quantile of (every key of a cluster has its cluster's score).
fn obs_scores(level: &Level, q: &[f32], g: usize, hk: usize, scale: f32) -> Vec<(f32, u32)> {
    let k = level.k();
    if k == 0 || q.is_empty() {
        return Vec::new();
    }
    let (mut s, mut e, mut p) = (Vec::new(), Vec::new(), Vec::new());
    let mut mean = vec![0.0f64; k];
    let t = q.len() / (g * hk);
    let kp = level.tiles.len() / hk;
    for qt in q.chunks_exact(g * hk) {
        scores(&level.tiles, qt, hk, scale, &mut s);
        estimate(&s, kp, &level.keys, &mut e, &mut p);
        for (m, &x) in mean.iter_mut().zip(&p) {
            *m += x as f64;
        }
    }
    mean.iter()
        .zip(&level.keys)
        .map(|(&m, &n)| ((m / t as f64) as f32, n))
        .collect()
}

/// The `q` quantile of values each repeated `weight` times, interpolated linearly between neighbours (numpy's
/// default), 0 for no values.
fn weighted_quantile(v: &mut [(f32, u32)], q: f32) -> f32 {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = v.iter().map(|x| x.1 as u64).sum();
    if total == 0 {
        return 0.0;
    }
    let pos = q as f64 * (total - 1) as f64;
    let lo = pos.floor() as u64;
    let frac = (pos - lo as f64) as f32;
    // The value at 0-based rank r of the expanded list.
    let at = |r: u64| {
        let mut seen = 0u64;
        for &(x, w) in v.iter() {
            seen += w as u64;
            if r < seen {
                return x;
            }
        }
        v[v.len() - 1].0
    };
    let (a, b) = (at(lo), at((lo + 1).min(total - 1)));
    a + frac * (b - a)
}

// ---------------------------------------------------------------------------------------------------------------------
// k-means

/// SplitMix64: the k-means++ draws.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Centers per register block of the distance kernel.
const LANES: usize = 16;

/// `m` (rows × d) transposed into `t` (d × `cols`, `cols` ≥ rows, the extra columns zero).
fn transpose_pad(m: &[f32], d: usize, cols: usize, t: &mut Vec<f32>) {
    t.clear();
    t.resize(d * cols, 0.0);
    for (r, row) in m.chunks_exact(d).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * cols + r] = v;
        }
    }
}

/// Dot products of `R` rows `x` (R × d) with every column of `mt` (d × `cols`, `cols` a multiple of `W`) into `out`
/// (R × cols): a register-blocked product with R × W accumulators. `dots::<4, 16>` scores points against the centers,
/// `dots::<1, 64>` a new center against the points.
fn dots<const R: usize, const W: usize>(
    x: &[f32],
    d: usize,
    mt: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature is present.
        unsafe { dots_avx512::<R, W>(x, d, mt, cols, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features are present.
        unsafe { dots_avx2::<R, W>(x, d, mt, cols, out) };
        return;
    }
    dots_impl::<false, R, W>(x, d, mt, cols, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512<const R: usize, const W: usize>(
    x: &[f32],
    d: usize,
    mt: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    dots_impl::<true, R, W>(x, d, mt, cols, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize, const W: usize>(
    x: &[f32],
    d: usize,
    mt: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    dots_impl::<true, R, W>(x, d, mt, cols, out);
}

#[inline(always)]
fn dots_impl<const FMA: bool, const R: usize, const W: usize>(
    x: &[f32],
    d: usize,
    mt: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let x = &x[..R * d];
    let mt = &mt[..d * cols];
    let out = &mut out[..R * cols];
    for j0 in (0..cols).step_by(W) {
        let mut acc = [[0.0f32; W]; R];
        for c in 0..d {
            let w = &mt[c * cols + j0..c * cols + j0 + W];
            for (p, a) in acc.iter_mut().enumerate() {
                let xv = x[p * d + c];
                for (o, &wv) in a.iter_mut().zip(w) {
                    *o = if FMA {
                        xv.mul_add(wv, *o)
                    } else {
                        xv * wv + *o
                    };
                }
            }
        }
        for (p, a) in acc.iter().enumerate() {
            out[p * cols + j0..p * cols + j0 + W].copy_from_slice(a);
        }
    }
}

/// The nearest and second-nearest centers of a point from its dot products `t` with the centers (squared norms
/// `cn`): the nearest's index (`a`, the current one, on a tie) and both values of `|c|² − 2 x·c` (the squared distance
/// less `|x|²`).
fn two_nearest(t: &[f32], cn: &[f32], a: usize) -> (usize, f32, f32) {
    let (t, cn) = (&t[..cn.len()], cn);
    // Lane-wise smallest two and the index of the smallest, then across the lanes.
    let (mut m1, mut m2, mut i1) = (
        [f32::INFINITY; LANES],
        [f32::INFINITY; LANES],
        [0u32; LANES],
    );
    let mut c0 = 0;
    for (tc, nc) in t.chunks_exact(LANES).zip(cn.chunks_exact(LANES)) {
        for j in 0..LANES {
            let v = nc[j] - 2.0 * tc[j];
            let lt = v < m1[j];
            m2[j] = if lt { m1[j] } else { m2[j].min(v) };
            i1[j] = if lt { (c0 + j) as u32 } else { i1[j] };
            m1[j] = if lt { v } else { m1[j] };
        }
        c0 += LANES;
    }
    let (mut b, mut v1, mut v2) = (usize::MAX, f32::INFINITY, f32::INFINITY);
    let rest = (c0..t.len()).map(|c| (c, cn[c] - 2.0 * t[c]));
    for (c, v) in (0..LANES).map(|j| (i1[j] as usize, m1[j])).chain(rest) {
        if v < v1 || (v == v1 && c < b) {
            v2 = v2.min(v1);
            (b, v1) = (c, v);
        } else {
            v2 = v2.min(v);
        }
    }
    for &v in &m2 {
        v2 = v2.min(v);
    }
    if cn[a] - 2.0 * t[a] <= v1 {
        b = a;
    }
    (b, v1, v2)
}

/// Points (or centers) scored together against the centers.
const TILE: usize = 4;

/// Copies rows `rows` of `m` (each d wide) into `xb` (TILE × d), zero rows after them.
fn gather_rows(m: &[f32], d: usize, rows: impl Iterator<Item = usize>, xb: &mut [f32]) {
    xb.fill(0.0);
    for (p, r) in rows.enumerate() {
        xb[p * d..(p + 1) * d].copy_from_slice(&m[r * d..(r + 1) * d]);
    }
}

/// k-means of the `n` rows of `x` (n × d, normalised: cosine clustering) into at most `k` clusters: k-means++ seeding
/// with a fixed seed, then Lloyd iterations (Euclidean, as cuML on normalised data) accelerated by Hamerly's bounds,
/// which skip the points whose nearest center cannot have changed. Stops after `max_iter` iterations or when at most
/// [`CHANGE_TOL`] of the points changed cluster. Returns each point's cluster (< k; some may stay empty).
fn kmeans(x: &[f32], d: usize, k: usize, seed: u64, max_iter: usize) -> Vec<u32> {
    let n = x.len() / d;
    let k = k.min(n);
    if n == 0 || k <= 1 {
        return vec![0; n];
    }
    let norm: Vec<f32> = x.chunks_exact(d).map(|r| dot(r, r)).collect();
    let dist2 = |nx: f32, xc: f32, nc: f32| (nx - 2.0 * xc + nc).max(0.0);
    // Seeding (k-means++): each new center is a point drawn with probability ∝ its squared distance to the nearest
    // center so far. The nearest and second-nearest distances it keeps are Hamerly's first bounds.
    let np = n.div_ceil(4 * LANES) * 4 * LANES;
    let mut xt = Vec::new();
    transpose_pad(x, d, np, &mut xt);
    let mut rng = SplitMix(seed);
    let mut cent: Vec<f32> = Vec::with_capacity(k * d);
    let (mut best1, mut best2) = (vec![f32::INFINITY; n], vec![f32::INFINITY; n]);
    let mut label = vec![0u32; n];
    let mut dot_c = vec![0.0f32; np];
    let mut pick = (rng.next() % n as u64) as usize;
    loop {
        let j = cent.len() / d;
        cent.extend_from_slice(&x[pick * d..][..d]);
        dots::<1, { 4 * LANES }>(&x[pick * d..][..d], d, &xt, np, &mut dot_c);
        let nc = norm[pick];
        for i in 0..n {
            let e = dist2(norm[i], dot_c[i], nc);
            if e < best1[i] {
                best2[i] = best1[i];
                best1[i] = e;
                label[i] = j as u32;
            } else if e < best2[i] {
                best2[i] = e;
            }
        }
        if j + 1 == k {
            break;
        }
        let total: f64 = best1.iter().map(|&e| e as f64).sum();
        if total <= 0.0 {
            break;
        }
        let r = rng.unit() * total;
        let mut acc = 0.0f64;
        pick = n - 1;
        for (i, &e) in best1.iter().enumerate() {
            acc += e as f64;
            if acc > r && e > 0.0 {
                pick = i;
                break;
            }
        }
    }
    let k = cent.len() / d;
    if k <= 1 {
        return label;
    }
    // Lloyd with Hamerly's bounds: u ≥ distance to the own center, l ≤ distance to any other.
    let mut u: Vec<f32> = best1.iter().map(|e| e.sqrt()).collect();
    let mut l: Vec<f32> = best2.iter().map(|e| e.sqrt()).collect();
    let (mut ct, mut sum, mut count) = (Vec::new(), vec![0.0f32; k * d], vec![0u32; k]);
    let (mut moved, mut half, mut cn) = (vec![0.0f32; k], vec![0.0f32; k], vec![0.0f32; k]);
    let cols = k.div_ceil(LANES) * LANES;
    let (mut xb, mut tile) = (vec![0.0f32; TILE * d], vec![0.0f32; TILE * cols]);
    let mut todo: Vec<u32> = Vec::with_capacity(n);
    for _ in 0..max_iter {
        // Move each center to the mean of its points.
        sum.fill(0.0);
        count.fill(0);
        for i in 0..n {
            let c = label[i] as usize;
            count[c] += 1;
            for (s, &v) in sum[c * d..][..d].iter_mut().zip(&x[i * d..][..d]) {
                *s += v;
            }
        }
        for c in 0..k {
            if count[c] == 0 {
                moved[c] = 0.0;
                continue;
            }
            let inv = 1.0 / count[c] as f32;
            let mut m = 0.0f32;
            for (o, &s) in cent[c * d..][..d].iter_mut().zip(&sum[c * d..][..d]) {
                let v = s * inv;
                m += (v - *o) * (v - *o);
                *o = v;
            }
            moved[c] = m.sqrt();
        }
        for (c, r) in cent.chunks_exact(d).enumerate() {
            cn[c] = dot(r, r);
        }
        transpose_pad(&cent, d, cols, &mut ct);
        // Half the distance from each center to its nearest other center.
        for c0 in (0..k).step_by(TILE) {
            let c1 = (c0 + TILE).min(k);
            gather_rows(&cent, d, c0..c1, &mut xb);
            dots::<TILE, LANES>(&xb, d, &ct, cols, &mut tile);
            for c in c0..c1 {
                let t = &tile[(c - c0) * cols..][..k];
                half[c] = (0..k)
                    .filter(|&o| o != c)
                    .map(|o| dist2(cn[c], t[o], cn[o]))
                    .fold(f32::INFINITY, f32::min)
                    .sqrt()
                    * 0.5;
            }
        }
        let (mut m1, mut m2, mut r1) = (0.0f32, 0.0f32, 0);
        for (c, &m) in moved.iter().enumerate() {
            if m > m1 {
                (m2, m1, r1) = (m1, m, c);
            } else if m > m2 {
                m2 = m;
            }
        }
        // The points whose nearest center may have changed; then their exact distances to every center, a tile of
        // points at a time.
        todo.clear();
        for i in 0..n {
            let a = label[i] as usize;
            u[i] += moved[a];
            l[i] -= if a == r1 { m2 } else { m1 };
            let bound = half[a].max(l[i]);
            if u[i] <= bound {
                continue;
            }
            u[i] = dist2(norm[i], dot(&x[i * d..][..d], &cent[a * d..][..d]), cn[a]).sqrt();
            if u[i] > bound {
                todo.push(i as u32);
            }
        }
        let mut changed = 0usize;
        for pts in todo.chunks(TILE) {
            gather_rows(x, d, pts.iter().map(|&i| i as usize), &mut xb);
            dots::<TILE, LANES>(&xb, d, &ct, cols, &mut tile);
            for (p, &i) in pts.iter().enumerate() {
                let i = i as usize;
                let a = label[i] as usize;
                let (b1, v1, v2) = two_nearest(&tile[p * cols..][..k], &cn, a);
                if b1 != a {
                    changed += 1;
                    label[i] = b1 as u32;
                }
                u[i] = (norm[i] + v1).max(0.0).sqrt();
                l[i] = (norm[i] + v2).max(0.0).sqrt();
            }
        }
        if changed as f64 <= CHANGE_TOL * n as f64 {
            break;
        }
    }
    label
}

// ---------------------------------------------------------------------------------------------------------------------
// The selector

pub struct Squeezed {
    frame: Frame,
    /// Threshold mode: the quantile; None = budget mode.
    quantile: Option<f32>,
    levels: usize,
    scale: f32,
    hk: usize,
    n_kv: usize,
    /// Query heads per KV head.
    group: usize,
    /// Per layer: whether it selects (not dense, not sliding-window), so gets an index.
    on: Vec<bool>,
    /// Per stream (layer · n_kv + head): its index and the first position not clustered.
    index: Vec<HeadIndex>,
    pos_end: Vec<u32>,
    /// Per layer: the cache's edit count its index was built at.
    edits: Vec<u64>,
    built: bool,
    /// Global thresholds on the estimate: L2 (threshold mode) and L1 (`levels=2`); 0 keeps everything.
    t2: f32,
    t1: f32,
    /// Per KV head: its choice's scratch (the heads choose in parallel).
    heads: Vec<HeadScratch>,
}

/// What one KV head's choice needs: where it chooses, and the scratch it ranks and takes clusters in.
#[derive(Default)]
struct HeadScratch {
    /// The middle's first entry, the end of its clustered part and how many of those entries to take; None: the
    /// head has nothing to rank this step.
    job: Option<(usize, usize, usize)>,
    q: Vec<f32>,
    /// Two levels: the candidate L2 centroids gathered into tiles ([`Level::tiles`]' layout).
    ct: Vec<f16>,
    s: Vec<f32>,
    s1: Vec<f32>,
    e: Vec<f32>,
    est: Vec<f32>,
    cand: Vec<u32>,
    order: Vec<u32>,
    /// The entries `take` chose, one bit each from the middle's first entry on (runs of set bits become ranges).
    chosen: Bits,
}

/// What ranking reads besides a head's index: head width, score scale and the global thresholds (L2 when a
/// quantile is set, L1).
#[derive(Clone, Copy)]
struct RankArgs {
    hk: usize,
    group: usize,
    scale: f32,
    t2: Option<f32>,
    t1: f32,
}

impl Squeezed {
    pub fn new(budget: Budget, o: &SelectOptions, mc: &ModelConfig) -> Self {
        let frame = Frame::new(budget, o, DEFAULTS, mc.n_layers);
        let on = (0..mc.n_layers)
            .map(|l| l >= frame.dense && !mc.is_local(l))
            .collect();
        let streams = mc.n_layers * mc.n_kv_heads;
        Self {
            frame,
            quantile: o.threshold,
            levels: o.levels.unwrap_or(1),
            scale: mc.attn_scale,
            hk: mc.head_dim_k,
            n_kv: mc.n_kv_heads,
            group: mc.n_heads / mc.n_kv_heads.max(1),
            on,
            index: vec![HeadIndex::default(); streams],
            pos_end: vec![0; streams],
            edits: vec![0; mc.n_layers],
            built: false,
            t2: 0.0,
            t1: 0.0,
            heads: Vec::new(),
        }
    }

    /// Builds every indexed stream's clusters and, when needed, the global thresholds from `obs`.
    fn build(&mut self, cache: &KvCache, obs: &QueryWindow) {
        let (nkv, hk, g, scale, levels) = (self.n_kv, self.hk, self.group, self.scale, self.levels);
        let (want2, want1) = (self.quantile.is_some(), levels == 2);
        let jobs: Vec<usize> = (0..self.index.len())
            .filter(|&si| self.on[si / nkv])
            .collect();
        let pos_end = &self.pos_end;
        let built: Vec<_> = jobs
            .par_iter()
            .map(|&si| {
                let (layer, h) = (si / nkv, si % nkv);
                let ix = HeadIndex::build(cache, layer, h, pos_end[si], levels);
                let (mut q, mut pos) = (Vec::new(), Vec::new());
                if want1 || want2 {
                    obs.gather(layer, h * g..(h + 1) * g, hk, OBS_WINDOW, &mut q, &mut pos);
                }
                let sc2 = if want2 {
                    obs_scores(&ix.l2, &q, g, hk, scale)
                } else {
                    Vec::new()
                };
                let sc1 = match &ix.l1 {
                    Some(l1) if want1 => obs_scores(l1, &q, g, hk, scale),
                    _ => Vec::new(),
                };
                (si, ix, sc2, sc1)
            })
            .collect();
        let (mut all2, mut all1) = (Vec::new(), Vec::new());
        for (si, ix, sc2, sc1) in built {
            self.index[si] = ix;
            all2.extend(sc2);
            all1.extend(sc1);
        }
        if let Some(q) = self.quantile {
            self.t2 = weighted_quantile(&mut all2, q);
        }
        if want1 {
            self.t1 = weighted_quantile(&mut all1, PERCENTILE_LOWER);
        }
        self.edits.fill(cache.edits());
        self.built = true;
    }

    /// Rebuilds one layer's index after the cache was edited (the thresholds stay), counting the keys it reads.
    fn rebuild_layer(&mut self, cache: &KvCache, layer: usize) {
        for h in 0..self.n_kv {
            let si = layer * self.n_kv + h;
            self.index[si] = HeadIndex::build(cache, layer, h, self.pos_end[si], self.levels);
            cache.note_read(self.index[si].end * cache.key_dims(layer, h) * 2);
        }
        self.edits[layer] = cache.edits();
    }

    fn choose(&mut self, cx: &SelectCx) {
        let (g, nkv) = (self.group, self.n_kv);
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nkv);
        self.heads.resize_with(nkv, HeadScratch::default);
        let mut any = false;
        for (h, hs) in self.heads.iter_mut().enumerate() {
            hs.job = None;
            let m = self.frame.middle(cx, h);
            if m.k == 0 {
                continue;
            }
            let si = cx.layer * nkv + h;
            // The unclustered tail of the middle is always read; the clusters share what is left of the budget.
            let end = self.index[si].end.clamp(m.lo, m.hi);
            kept.add(h, end, m.hi);
            let left = m.k.saturating_sub(m.hi - end);
            if left == 0 {
                continue;
            }
            if end - m.lo <= left {
                kept.add(h, m.lo, end);
                continue;
            }
            hs.q.clear();
            for i in 0..g {
                hs.q.extend_from_slice(cx.last_query(h * g + i));
            }
            hs.job = Some((m.lo, end, left));
            any = true;
        }
        if any {
            // The heads rank and take their clusters in parallel (each reads only its own index).
            let args = RankArgs {
                hk: self.hk,
                group: g,
                scale: self.scale,
                t2: self.quantile.map(|_| self.t2),
                t1: self.t1,
            };
            let (index, cache, layer) = (&self.index, cx.cache, cx.layer);
            crate::kernels::team::for_each_chunk_mut(&mut self.heads, 1, |h, hs| {
                let hs = &mut hs[0];
                let Some((lo, end, left)) = hs.job else {
                    return;
                };
                let ix = &index[layer * nkv + h];
                if ix.l1.is_some() {
                    hs.rank_two_levels(cache, ix, args);
                } else {
                    hs.rank_one_level(cache, ix, args);
                }
                hs.take(cache, ix, args, lo, end, left);
            });
            for (h, hs) in self.heads.iter().enumerate() {
                if let Some((lo, end, _)) = hs.job {
                    hs.chosen.runs(end - lo, |a, b| kept.add(h, lo + a, lo + b));
                }
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }
}

impl HeadScratch {
    /// One level: every L2 centroid scored and estimated.
    fn rank_one_level(&mut self, cache: &KvCache, ix: &HeadIndex, a: RankArgs) {
        let (hk, l2) = (a.hk, &ix.l2);
        let k = l2.k();
        cache.note_read(2 * l2.tiles.len() + 4 * k);
        scores(&l2.tiles, &self.q, hk, a.scale, &mut self.s);
        estimate(
            &self.s,
            l2.tiles.len() / hk,
            &l2.keys,
            &mut self.e,
            &mut self.est,
        );
        self.cand.clear();
        self.cand.extend(0..k as u32);
    }

    /// Two levels: every L1 centroid scored; the L2 centroids under the L1 clusters that pass the L1 threshold are
    /// the candidates, their estimate normalised over the expanded L2 clusters and the other L1 clusters.
    fn rank_two_levels(&mut self, cache: &KvCache, ix: &HeadIndex, a: RankArgs) {
        let (hk, g) = (a.hk, a.group);
        let (l2, Some(l1)) = (&ix.l2, &ix.l1) else {
            return;
        };
        let (k1, k1p) = (l1.k(), l1.tiles.len() / hk);
        cache.note_read(2 * l1.tiles.len() + 4 * k1);
        scores(&l1.tiles, &self.q, hk, a.scale, &mut self.s1);
        estimate(&self.s1, k1p, &l1.keys, &mut self.e, &mut self.est);
        // Expand the passing L1 clusters (marked 1 in `order`, used as scratch here).
        self.cand.clear();
        self.order.clear();
        self.order.resize(k1, 0);
        for c in 0..k1 {
            if self.est[c] >= a.t1 {
                self.order[c] = 1;
                self.cand.extend_from_slice(l1.members(c));
            }
        }
        cache.note_read(4 * self.cand.len());
        let n = self.cand.len();
        let np = n.div_ceil(CENT_TILE) * CENT_TILE;
        self.ct.clear();
        self.ct.resize(np * hk, f16::ZERO);
        for (j, &c) in self.cand.iter().enumerate() {
            for ch in 0..hk {
                self.ct[tile_index(j, ch, hk)] = l2.at(c as usize, ch, hk);
            }
        }
        cache.note_read(n * (2 * hk + 4));
        self.est.clear();
        self.est.resize(n, 0.0);
        if n == 0 {
            return;
        }
        scores(&self.ct, &self.q, hk, a.scale, &mut self.s);
        // Per query head: the softmax over the expanded L2 clusters and the unexpanded L1 ones.
        for i in 0..g {
            let (s2, s1) = (&self.s[i * np..][..n], &self.s1[i * k1p..][..k1]);
            // The largest term of the denominator (the candidates are not empty).
            let m = (0..k1)
                .filter(|&c| self.order[c] == 0)
                .map(|c| s1[c])
                .chain(s2.iter().copied())
                .fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0.0f32;
            for (j, &c) in self.cand.iter().enumerate() {
                z += l2.keys[c as usize] as f32 * (s2[j] - m).exp();
            }
            for ((&pass, &n), &x) in self.order.iter().zip(&l1.keys).zip(s1) {
                if pass == 0 {
                    z += n as f32 * (x - m).exp();
                }
            }
            for (e, &x) in self.est.iter_mut().zip(s2) {
                *e = e.max((x - m).exp() / z);
            }
        }
    }

    /// Takes the candidate clusters best-first (in threshold mode only those reaching the L2 threshold) into
    /// `chosen`: their entries inside `[lo, end)`, at most `left` in all (the last cluster gives its newest ones),
    /// as bits from `lo` on. The candidates are ordered a slice at a time (the best [`FIRST_SLICE`], then twice as
    /// many of the rest, ...): the budget is usually filled by a small share of them.
    fn take(
        &mut self,
        cache: &KvCache,
        ix: &HeadIndex,
        a: RankArgs,
        lo: usize,
        end: usize,
        mut left: usize,
    ) {
        let l2 = &ix.l2;
        self.order.clear();
        for (j, &e) in self.est.iter().enumerate() {
            if a.t2.is_none_or(|t| e >= t) {
                self.order.push(j as u32);
            }
        }
        let est = &self.est;
        let better =
            |a: &u32, b: &u32| est[*b as usize].total_cmp(&est[*a as usize]).then(a.cmp(b));
        self.chosen.reset(end - lo);
        let (mut done, mut slice) = (0, FIRST_SLICE);
        while left > 0 && done < self.order.len() {
            let upto = (done + slice).min(self.order.len());
            if upto < self.order.len() {
                self.order[done..].select_nth_unstable_by(upto - done - 1, better);
            }
            let part = &mut self.order[done..upto];
            part.sort_unstable_by(better);
            for (i, &j) in part.iter().enumerate() {
                if left == 0 {
                    break;
                }
                // The entry lists lie anywhere in the index: ask for the ones a few clusters on now, so that their
                // misses overlap (waiting on each list in turn was most of this loop's time).
                if let Some(&ja) = part.get(i + TAKE_AHEAD) {
                    prefetch_lines(l2.members(self.cand[ja as usize] as usize));
                }
                let e = l2.members(self.cand[j as usize] as usize);
                // Most clusters lie wholly inside [lo, end) (the frame's middle starts at the first entry by default).
                let (a, b) = match (e.first(), e.last()) {
                    (Some(&f), Some(&l)) if f as usize >= lo && (l as usize) < end => (0, e.len()),
                    _ => (
                        e.partition_point(|&x| (x as usize) < lo),
                        e.partition_point(|&x| (x as usize) < end),
                    ),
                };
                let take = (b - a).min(left);
                for &x in &e[b - take..b] {
                    self.chosen.set(x as usize - lo);
                }
                cache.note_read(4 * take);
                left -= take;
            }
            done = upto;
            slice *= 2;
        }
    }
}

impl Selector for Squeezed {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => {
                if self.built && self.edits[cx.layer] != cx.cache.edits() {
                    self.rebuild_layer(cx.cache, cx.layer);
                }
                self.choose(cx);
            }
        }
        self.frame.finish(cx, out);
        true
    }

    fn query_window(&self) -> usize {
        if self.quantile.is_some() || self.levels == 2 {
            OBS_WINDOW
        } else {
            0
        }
    }

    fn end_prefill(&mut self, cache: &KvCache, obs: &QueryWindow) {
        let indexed = self.index.iter().any(|x| x.end > 0);
        if indexed && self.edits.iter().all(|&e| e == cache.edits()) {
            // Later prompts (questions, turns) are not clustered: always read.
            return;
        }
        if !indexed {
            // The fixed context is what the cache holds now; its last OBS_WINDOW entries stay unclustered.
            let bt = cache.cfg.block_tokens;
            for si in 0..self.index.len() {
                let (layer, h) = (si / self.n_kv, si % self.n_kv);
                let len = cache.len(layer, h);
                let end = len.saturating_sub(OBS_WINDOW);
                self.pos_end[si] = if end < len {
                    cache.block(layer, h, end / bt).pos[end % bt]
                } else {
                    0
                };
            }
        }
        self.build(cache, obs);
    }

    fn index_bytes(&self) -> usize {
        self.index.iter().map(HeadIndex::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvDtype};
    use crate::testutil::Rng;

    /// Points around `groups` unit directions (random ones, or orthogonal ones: signed basis vectors in a random
    /// order), `per` each with noise `noise` per channel and random lengths, interleaved: point i belongs to group
    /// `i % groups`. Returns the points (n × d) and each point's group.
    fn planted(
        rng: &mut Rng,
        groups: usize,
        per: usize,
        d: usize,
        noise: f32,
        orthogonal: bool,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut axes: Vec<usize> = (0..d).collect();
        for i in (1..d).rev() {
            axes.swap(i, rng.below(i + 1));
        }
        let dirs: Vec<Vec<f32>> = (0..groups)
            .map(|gi| {
                let v = if orthogonal {
                    let mut v = vec![0.0; d];
                    v[axes[gi]] = if rng.uniform() < 0.0 { -1.0 } else { 1.0 };
                    v
                } else {
                    rng.vec(d, 1.0)
                };
                let n = dot(&v, &v).sqrt();
                v.iter().map(|x| x / n).collect()
            })
            .collect();
        let mut x = Vec::new();
        let mut grp = Vec::new();
        for i in 0..groups * per {
            let gi = i % groups;
            // Different lengths within a group: cosine clustering must not care.
            let len = 0.5 + 2.0 * (rng.uniform() + 1.0);
            x.extend(dirs[gi].iter().map(|&c| len * (c + noise * rng.uniform())));
            grp.push(gi);
        }
        (x, grp)
    }

    #[test]
    fn kmeans_recovers_planted_groups() {
        // As in the method, more centroids than groups of similar keys (here two per group): every cluster must hold
        // keys of one group only, so each group is exactly the union of its clusters. (With exactly one centroid per
        // group, k-means++ seeding can end in a local optimum that merges two groups and splits a third.)
        let (d, groups, per) = (32, 12, 50);
        for seed in 1..=4 {
            let mut rng = Rng::seeded(seed);
            let (x, grp) = planted(&mut rng, groups, per, d, 0.15, false);
            let labels = kmeans(&normalised(&x, d), d, 2 * groups, SEED, MAX_ITER);
            let mut of = vec![usize::MAX; 2 * groups];
            for (i, &l) in labels.iter().enumerate() {
                let o = &mut of[l as usize];
                if *o == usize::MAX {
                    *o = grp[i];
                }
                assert_eq!(
                    *o, grp[i],
                    "seed {seed}: cluster {l} mixes groups {} and {}",
                    *o, grp[i]
                );
            }
            // Same seed, same answer.
            assert_eq!(
                kmeans(&normalised(&x, d), d, 2 * groups, SEED, MAX_ITER),
                labels
            );
        }
    }

    #[test]
    fn kmeans_hamerly_agrees_with_plain_lloyd_assignments() {
        // After convergence every point sits with its nearest center: check it against an exhaustive search.
        let mut rng = Rng::seeded(2);
        let d = 16;
        let x = normalised(&rng.vec(400 * d, 1.0), d);
        let labels = kmeans(&x, d, 20, SEED, 200);
        let k = 20;
        let mut cent = vec![0.0f32; k * d];
        let mut cnt = vec![0usize; k];
        for (i, &l) in labels.iter().enumerate() {
            cnt[l as usize] += 1;
            for c in 0..d {
                cent[l as usize * d + c] += x[i * d + c];
            }
        }
        for c in 0..k {
            for v in &mut cent[c * d..(c + 1) * d] {
                *v /= cnt[c].max(1) as f32;
            }
        }
        let mut wrong = 0;
        for (i, &l) in labels.iter().enumerate() {
            let xi = &x[i * d..(i + 1) * d];
            let dist = |c: usize| {
                xi.iter()
                    .zip(&cent[c * d..(c + 1) * d])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
            };
            let best = (0..k).filter(|&c| cnt[c] > 0).fold(l as usize, |b, c| {
                if dist(c) < dist(b) - 1e-5 {
                    c
                } else {
                    b
                }
            });
            wrong += (best != l as usize) as usize;
        }
        // The stopping rule allows 0.1 % of the points to move in the last iteration.
        assert!(wrong <= 1, "{wrong} points not with their nearest center");
    }

    #[test]
    fn the_distance_kernel_and_the_two_nearest_match_a_plain_search() {
        let mut rng = Rng::seeded(8);
        let d = 12;
        for k in [1, 5, 16, 37] {
            let cent = rng.vec(k * d, 1.0);
            let cols = k.div_ceil(LANES) * LANES;
            let mut ct = Vec::new();
            transpose_pad(&cent, d, cols, &mut ct);
            let cn: Vec<f32> = cent.chunks_exact(d).map(|c| dot(c, c)).collect();
            let x = rng.vec(TILE * d, 1.0);
            let mut tile = vec![0.0; TILE * cols];
            dots::<TILE, LANES>(&x, d, &ct, cols, &mut tile);
            for p in 0..TILE {
                let xp = &x[p * d..(p + 1) * d];
                let mut v: Vec<(f32, usize)> = (0..k)
                    .map(|c| (cn[c] - 2.0 * dot(xp, &cent[c * d..(c + 1) * d]), c))
                    .collect();
                for c in 0..k {
                    assert!((tile[p * cols + c] - dot(xp, &cent[c * d..(c + 1) * d])).abs() < 1e-5);
                }
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (b, v1, v2) = two_nearest(&tile[p * cols..][..k], &cn, k - 1);
                assert!(
                    b == v[0].1 || (b == k - 1 && (v[0].0 - v1).abs() < 1e-6),
                    "k={k}"
                );
                assert!((v1 - v[0].0).abs() < 1e-5);
                let want2 = if k > 1 { v[1].0 } else { f32::INFINITY };
                assert!(
                    v2 == want2 || (v2 - want2).abs() < 1e-5,
                    "k={k}: {v2} vs {want2}"
                );
            }
        }
        // A tie keeps the current center.
        let (b, v1, v2) = two_nearest(&[1.0, 1.0, 0.0], &[1.0, 1.0, 1.0], 1);
        assert_eq!((b, v1, v2), (1, -1.0, -1.0));
    }

    #[test]
    fn weighted_quantile_is_numpys_on_the_expanded_values() {
        // np.quantile([1, 1, 1, 2, 5, 5], q) = 1 (q=0.4), 1.5 (q=0.5), 3.5 (q=0.7), 5 (q=1).
        let v = [(5.0, 2), (1.0, 3), (2.0, 1)];
        for (q, want) in [(0.4, 1.0), (0.5, 1.5), (0.7, 3.5), (0.9, 5.0)] {
            let mut w = v.to_vec();
            assert!((weighted_quantile(&mut w, q) - want).abs() < 1e-6, "q={q}");
        }
        assert_eq!(weighted_quantile(&mut [], 0.9), 0.0);
    }

    #[test]
    fn levels_partition_their_members_and_average_raw_keys() {
        let mut rng = Rng::seeded(3);
        let (d, n) = (8, 300);
        let raw = rng.vec(n * d, 2.0);
        let labels = kmeans(&normalised(&raw, d), d, 15, SEED, MAX_ITER);
        let (lv, cent) = Level::from_labels(&labels, 15, &raw, d);
        let mut seen = vec![false; n];
        for c in 0..lv.k() {
            let m = lv.members(c);
            assert!(!m.is_empty() && m.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(lv.keys[c] as usize, m.len());
            for ch in 0..d {
                let mean =
                    m.iter().map(|&i| raw[i as usize * d + ch]).sum::<f32>() / m.len() as f32;
                assert!((cent[c * d + ch] - mean).abs() < 1e-4);
                let f = lv.at(c, ch, d).to_f32();
                assert!((f - mean).abs() < 2e-3 * mean.abs().max(1.0));
            }
            for &i in m {
                assert!(!seen[i as usize], "entry {i} in two clusters");
                seen[i as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "an entry in no cluster");
    }

    /// A one-layer cache of one KV head holding `keys` (n × d) at positions 0..n.
    fn cache_with(keys: &[f32], d: usize, rng: &mut Rng) -> KvCache {
        let mut c = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: d,
            head_dim_v: d,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        });
        let n = keys.len() / d;
        let pos: Vec<u32> = (0..n as u32).collect();
        c.append(0, &pos, keys, &rng.vec(n * d, 1.0));
        c
    }

    fn config(d: usize, group: usize) -> ModelConfig {
        ModelConfig {
            arch: crate::model::Arch::Llama,
            name: String::new(),
            n_layers: 1,
            dim: d * group,
            n_heads: group,
            n_kv_heads: 1,
            head_dim_k: d,
            head_dim_v: d,
            ffn_dim: 0,
            vocab: 0,
            ctx_len: 1 << 16,
            rms_eps: 1e-6,
            rope_style: crate::model::RopeStyle::Norm,
            rope_dim: d,
            rope_base: 1e4,
            rope_base_local: 1e4,
            sliding_window: None,
            layer_is_local: vec![false],
            attn_scale: 1.0 / (d as f32).sqrt(),
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            residual_scale: 1.0,
            logit_scale: 1.0,
            long_rope: None,
            attn_temp: None,
            moe: None,
        }
    }

    /// Every layer indexed (no dense layers), with the threshold quantile and levels given.
    fn options(threshold: Option<f32>, levels: usize) -> SelectOptions {
        SelectOptions {
            dense: Some(0),
            threshold,
            levels: Some(levels),
            ..Default::default()
        }
    }

    /// One decode-step selection for the query rows `q` (group × d): the head's selected entries and the bytes its
    /// scoring read.
    fn select_once(
        s: &mut Squeezed,
        cache: &KvCache,
        q: &[f32],
        group: usize,
    ) -> (Vec<usize>, u64) {
        let pos = [cache.len(0, 0) as u32];
        let cx = SelectCx {
            cache,
            layer: 0,
            q,
            pos: &pos,
            n_q_heads: group,
            local: false,
        };
        cache.take_read();
        let mut out = Selection::default();
        assert!(s.select(&cx, &mut out));
        let read = cache.take_read();
        let e = out
            .ranges(0)
            .iter()
            .flat_map(|&(a, b)| a as usize..b as usize)
            .collect();
        (e, read)
    }

    /// A cache of `groups` × `per` keys around orthogonal directions (d = 64), interleaved.
    struct Setup {
        cache: KvCache,
        grp: Vec<usize>,
        n: usize,
        d: usize,
    }

    fn setup(seed: u64, groups: usize, per: usize) -> Setup {
        let mut rng = Rng::seeded(seed);
        let d = 64;
        let (x, grp) = planted(&mut rng, groups, per, d, 0.1, true);
        let cache = cache_with(&x, d, &mut rng);
        Setup {
            cache,
            grp,
            n: groups * per,
            d,
        }
    }

    impl Setup {
        /// A query of length `len` along the mean direction of group `gi`'s keys.
        fn query(&self, gi: usize, len: f32) -> Vec<f32> {
            let mut q = vec![0.0f32; self.d];
            let (mut k, mut v) = (vec![0.0f32; self.d], vec![0.0f32; self.d]);
            for i in (0..self.n).filter(|&i| self.grp[i] == gi) {
                self.cache.read(0, 0, i, &mut k, &mut v);
                let n = dot(&k, &k).sqrt();
                q.iter_mut().zip(&k).for_each(|(a, b)| *a += b / n);
            }
            let n = dot(&q, &q).sqrt();
            q.iter_mut().for_each(|a| *a *= len / n);
            q
        }

        /// Clustered entries (all but the observation window) of the groups `gs`.
        fn entries_of(&self, gs: &[usize]) -> Vec<usize> {
            (0..self.n - OBS_WINDOW)
                .filter(|&i| gs.contains(&self.grp[i]))
                .collect()
        }
    }

    /// The clustered entries of a selection.
    fn in_clusters(e: &[usize], st: &Setup) -> Vec<usize> {
        e.iter()
            .copied()
            .filter(|&i| i < st.n - OBS_WINDOW)
            .collect()
    }

    #[test]
    fn the_clusters_of_an_aligned_query_are_kept_and_the_unclustered_tail_always() {
        // 50 groups × 40 keys; 1900 clustered (38 per group): 95 centroids, so a group spans about two clusters. A
        // budget of one group plus the unclustered tail keeps exactly that group.
        let st = setup(4, 50, 40);
        let mc = config(st.d, 1);
        let mut cache = st.cache.clone();
        let mut rng = Rng::seeded(40);
        let mut s = Squeezed::new(Budget::Tokens(1), &options(None, 1), &mc);
        s.end_prefill(&cache, &QueryWindow::default());
        let clustered = st.n - OBS_WINDOW;
        assert_eq!(s.index[0].end, clustered);
        assert!(s.index[0].l2.k() >= clustered * PERCENT_CLUSTERS / 100 - 2);
        // Entries appended after the build (a question, decoded tokens) are not clustered, and a second prompt's end
        // does not rebuild the index.
        let extra = 12;
        let pos: Vec<u32> = (st.n as u32..(st.n + extra) as u32).collect();
        cache.append(
            0,
            &pos,
            &rng.vec(extra * st.d, 1.0),
            &rng.vec(extra * st.d, 1.0),
        );
        s.end_prefill(&cache, &QueryWindow::default());
        assert_eq!(s.index[0].end, clustered);
        let bytes = s.index_bytes();
        let k = s.index[0].l2.k();
        // Centroids are stored in whole tiles (the last one padded).
        let kp = k.div_ceil(CENT_TILE) * CENT_TILE;
        assert_eq!(bytes, 2 * kp * st.d + 4 * k + 4 * (k + 1) + 4 * clustered);
        for gi in [0, 17, 49] {
            let want = st.entries_of(&[gi]);
            let budget = Budget::Tokens(OBS_WINDOW + extra + want.len());
            let mut s = Squeezed::new(budget, &options(None, 1), &mc);
            s.end_prefill(&st.cache, &QueryWindow::default());
            let (e, read) = select_once(&mut s, &cache, &st.query(gi, 40.0), 1);
            assert!(
                (clustered..st.n + extra).all(|i| e.contains(&i)),
                "tail not read"
            );
            assert_eq!(in_clusters(&e, &st), want, "group {gi}");
            // Scoring read every centroid (f16, whole tiles) and its size, and the kept entry lists.
            assert_eq!(read as usize, 2 * kp * st.d + 4 * k + 4 * want.len());
        }
    }

    #[test]
    fn threshold_mode_keeps_what_the_query_attends_and_adapts_the_count() {
        // Budget mode reads the same count for any query; threshold mode reads one group for a query peaked on it and
        // three for a query spread over three.
        let st = setup(5, 20, 60);
        let mc = config(st.d, 1);
        // Observation queries, each pointed at one group, every group as often.
        let mut obs = QueryWindow::new(1, st.d, OBS_WINDOW);
        for t in 0..OBS_WINDOW {
            obs.record(0, &st.query((t * 7) % 20, 15.0), &[t as u32]);
        }
        let mut thr = Squeezed::new(Budget::Tokens(st.n - 1), &options(Some(0.9), 1), &mc);
        assert_eq!(thr.query_window(), OBS_WINDOW);
        thr.end_prefill(&st.cache, &obs);
        assert!(thr.t2 > 0.0);
        let peaked = st.query(3, 15.0);
        let mut spread = vec![0.0; st.d];
        for gi in [3, 8, 11] {
            for (a, b) in spread.iter_mut().zip(st.query(gi, 15.0)) {
                *a += b / 3f32.sqrt();
            }
        }
        let (one, _) = select_once(&mut thr, &st.cache, &peaked, 1);
        assert_eq!(in_clusters(&one, &st), st.entries_of(&[3]));
        let (three, _) = select_once(&mut thr, &st.cache, &spread, 1);
        assert_eq!(in_clusters(&three, &st), st.entries_of(&[3, 8, 11]));
        // The budget caps it.
        let per = st.entries_of(&[3]).len();
        let mut capped = Squeezed::new(
            Budget::Tokens(OBS_WINDOW + per),
            &options(Some(0.9), 1),
            &mc,
        );
        capped.end_prefill(&st.cache, &obs);
        assert_eq!(
            in_clusters(&select_once(&mut capped, &st.cache, &spread, 1).0, &st).len(),
            per
        );
        // Budget mode: the same count for both.
        let mut bud = Squeezed::new(Budget::Tokens(OBS_WINDOW + 2 * per), &options(None, 1), &mc);
        assert_eq!(bud.query_window(), 0);
        bud.end_prefill(&st.cache, &obs);
        for q in [&peaked, &spread] {
            assert_eq!(
                in_clusters(&select_once(&mut bud, &st.cache, q, 1).0, &st).len(),
                2 * per
            );
        }
    }

    #[test]
    fn two_levels_read_fewer_centroids_and_keep_the_same_group() {
        // 25 groups × 100 keys, 96 clustered each: 120 L2 centroids under 24 L1 ones. GQA group of 2 query heads.
        let st = setup(6, 25, 100);
        let mc = config(st.d, 2);
        let mut obs = QueryWindow::new(1, 2 * st.d, OBS_WINDOW);
        for t in 0..OBS_WINDOW {
            let mut q = st.query((t * 11) % 25, 60.0);
            q.extend(st.query((t * 7 + 1) % 25, 60.0));
            obs.record(0, &q, &[t as u32]);
        }
        let per = st.entries_of(&[0]).len();
        let budget = Budget::Tokens(OBS_WINDOW + per);
        let mut one = Squeezed::new(budget, &options(None, 1), &mc);
        let mut two = Squeezed::new(budget, &options(None, 2), &mc);
        assert_eq!(two.query_window(), OBS_WINDOW);
        one.end_prefill(&st.cache, &obs);
        two.end_prefill(&st.cache, &obs);
        let (l2, l1) = (&two.index[0].l2, two.index[0].l1.as_ref().unwrap());
        assert!(l1.k() < l2.k());
        // The L1 clusters partition the L2 ones, and their key counts add up.
        let mut under: Vec<u32> = (0..l1.k()).flat_map(|c| l1.members(c).to_vec()).collect();
        under.sort();
        assert_eq!(under, (0..l2.k() as u32).collect::<Vec<_>>());
        for c in 0..l1.k() {
            let n: u32 = l1.members(c).iter().map(|&m| l2.keys[m as usize]).sum();
            assert_eq!(l1.keys[c], n);
        }
        assert!(two.index_bytes() > one.index_bytes());
        assert!(two.t1 > 0.0);
        for gi in [2, 21] {
            // The group's second query head attends evenly (a zero query): the max over the group follows the first.
            let mut q = st.query(gi, 40.0);
            q.extend(vec![0.0; st.d]);
            let (a, ra) = select_once(&mut one, &st.cache, &q, 2);
            let (b, rb) = select_once(&mut two, &st.cache, &q, 2);
            assert_eq!(in_clusters(&a, &st), st.entries_of(&[gi]));
            assert_eq!(in_clusters(&b, &st), st.entries_of(&[gi]));
            assert!(rb < ra, "two levels read {rb} bytes, one level {ra}");
        }
    }

    #[test]
    fn an_edited_cache_is_reindexed_before_selecting() {
        // 10 groups × 40 keys, 30 clustered each. Evicting group 0's clustered keys shifts every later entry.
        let st = setup(7, 10, 40);
        let mc = config(st.d, 1);
        let mut cache = st.cache.clone();
        let mut s = Squeezed::new(Budget::Tokens(OBS_WINDOW + 30), &options(None, 1), &mc);
        s.end_prefill(&cache, &QueryWindow::default());
        assert_eq!(s.index[0].end, 300);
        let grp = st.grp.clone();
        cache.retain(0, 0, |i, _| i >= 300 || grp[i] != 0);
        assert_ne!(s.edits[0], cache.edits());
        let (e, read) = select_once(&mut s, &cache, &st.query(5, 40.0), 1);
        assert_eq!(s.index[0].end, 270);
        assert_eq!(s.edits[0], cache.edits());
        // The rebuild read the clustered keys.
        assert!(read as usize >= 270 * st.d * 2);
        // Group 5's keys, at their new indices.
        let (mut k, mut v) = (vec![0.0; st.d], vec![0.0; st.d]);
        let want: Vec<usize> = (0..270)
            .filter(|&i| grp[cache.read(0, 0, i, &mut k, &mut v) as usize] == 5)
            .collect();
        assert_eq!(want.len(), 30);
        let picked: Vec<usize> = e.into_iter().filter(|&i| i < 270).collect();
        assert_eq!(picked, want);
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_quantile("q", "0.9").unwrap(), 0.9);
        assert!(parse_quantile("q", "1").is_err());
        assert!(parse_quantile("q", "x").is_err());
        assert_eq!(parse_levels("l", "2").unwrap(), 2);
        assert!(parse_levels("l", "3").is_err());
    }
}
