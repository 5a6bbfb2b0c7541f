//! Sparse prefill attention: each (KV head, tile of [`Q_TILE`] query tokens) reads only its own key ranges.
//!
//! A [`TileSelection`] holds, for every KV head and query tile of one call, ascending entry ranges `[lo, hi)`.
//! Block-sparse patterns give whole 64-token key blocks, vertical lines give single columns, diagonal (slash) bands
//! give one short range per tile. [`attend_tiles`] cuts each tile's ranges at cache-block boundaries and runs the same
//! task code as dense and decode-selected attention: whole blocks take the block path, parts of blocks are gathered
//! into a block-sized tile, the causal and window masks still apply, online softmax as everywhere. The plan splits a
//! tile's pieces at the dense plan's block boundaries, so a selection of every visible entry computes exactly what
//! [`super::attend`] computes, bit for bit.
//!
//! Entries that every tile of a KV head reads (MInference's vertical lines: scattered single columns) can be given
//! once per head as *shared* entries instead ([`TileSelection::add_shared`]): the kernel gathers them once per call
//! into contiguous block-sized tiles ([`gather_shared`]) that every query tile of the head folds, rather than
//! gathering the same scattered columns again for each 16-query tile. A tile's own ranges never repeat a shared entry
//! ([`TileSelection::finish`] takes them out).

use super::{attend_impl, cut_pieces, simd_level, AttnParams, AttnScratch, Piece, Sel, Q_TILE};
use crate::kv::KvCache;
use rayon::prelude::*;

/// Key ranges per (KV head, query tile) of one attention call. Tiles are [`Q_TILE`] consecutive query rows.
#[derive(Clone, Debug, Default)]
pub struct TileSelection {
    n_tiles: usize,
    /// [kv_head · n_tiles + tile] → ranges.
    sel: super::Selection,
    /// [kv_head] → entries every tile of the head reads.
    shared: super::Selection,
    /// Scratch of [`Self::finish`].
    tmp: Vec<(u32, u32)>,
}

impl TileSelection {
    /// Empties every list (keeping the memory) for `n_heads` KV heads and `n_tok` query rows.
    pub fn reset(&mut self, n_heads: usize, n_tok: usize) {
        self.n_tiles = n_tok.div_ceil(Q_TILE);
        self.sel.reset(n_heads * self.n_tiles);
        self.shared.reset(n_heads);
    }

    /// Query tiles per head.
    pub fn n_tiles(&self) -> usize {
        self.n_tiles
    }

    /// Adds entries `[lo, hi)` for (head, tile) (any order, overlaps allowed until [`Self::finish`]).
    pub fn add(&mut self, head: usize, tile: usize, lo: usize, hi: usize) {
        self.sel.add(head * self.n_tiles + tile, lo, hi);
    }

    /// Adds entries `[lo, hi)` that every tile of `head` reads (gathered once per call; meant for scattered
    /// columns). Any order, overlaps allowed until [`Self::finish`].
    pub fn add_shared(&mut self, head: usize, lo: usize, hi: usize) {
        self.shared.add(head, lo, hi);
    }

    /// Sorts and merges every list, and takes each head's shared entries out of its tiles' ranges.
    pub fn finish(&mut self) {
        self.sel.finish();
        self.shared.finish();
        for h in 0..self.shared.n_heads() {
            let minus = self.shared.ranges(h);
            if minus.is_empty() {
                continue;
            }
            for t in 0..self.n_tiles {
                let list = self.sel.list_mut(h * self.n_tiles + t);
                subtract(list, minus, &mut self.tmp);
                std::mem::swap(list, &mut self.tmp);
            }
        }
    }

    /// The ranges of (head, tile), shared entries not included.
    pub fn ranges(&self, head: usize, tile: usize) -> &[(u32, u32)] {
        self.sel.ranges(head * self.n_tiles + tile)
    }

    /// The entries every tile of `head` reads besides its own ranges (disjoint from them after [`Self::finish`]).
    pub fn shared(&self, head: usize) -> &[(u32, u32)] {
        self.shared.ranges(head)
    }

    /// Whether entry `e` is read by (head, tile).
    pub fn contains(&self, head: usize, tile: usize, e: usize) -> bool {
        self.sel.contains(head * self.n_tiles + tile, e) || self.shared.contains(head, e)
    }

    /// (query·key pairs this selection computes, pairs dense causal attention computes) for `head`, queries at
    /// `q_pos` (entry index = position, the prefill case), after [`Self::finish`].
    pub fn pairs(&self, head: usize, q_pos: &[u32]) -> (u64, u64) {
        let (mut got, mut dense) = (0u64, 0u64);
        for (tile, rows) in q_pos.chunks(Q_TILE).enumerate() {
            let first = rows.iter().copied().min().unwrap_or(0) as u64 + 1;
            dense += rows.iter().map(|&p| p as u64 + 1).sum::<u64>();
            for &(lo, hi) in self.ranges(head, tile).iter().chain(self.shared(head)) {
                let (lo, hi) = (lo as u64, hi as u64);
                if hi <= first {
                    // Visible to every row of the tile.
                    got += (hi - lo) * rows.len() as u64;
                } else {
                    got += rows
                        .iter()
                        .map(|&p| hi.min(p as u64 + 1).saturating_sub(lo))
                        .sum::<u64>();
                }
            }
        }
        (got, dense)
    }
}

/// `out` ← `a` minus `b` (both sorted, disjoint ranges).
fn subtract(a: &[(u32, u32)], b: &[(u32, u32)], out: &mut Vec<(u32, u32)>) {
    out.clear();
    let mut j = 0;
    for &(lo, hi) in a {
        let mut lo = lo;
        while j < b.len() && b[j].1 <= lo {
            j += 1;
        }
        let mut k = j;
        while lo < hi {
            match b.get(k) {
                Some(&(blo, bhi)) if blo < hi => {
                    if blo > lo {
                        out.push((lo, blo));
                    }
                    lo = lo.max(bhi);
                    k += 1;
                }
                _ => {
                    out.push((lo, hi));
                    lo = hi;
                }
            }
        }
    }
}

/// Every KV head's shared entries, gathered once per call into tiles of `bt` entries.
#[derive(Default)]
pub(super) struct SharedTiles {
    /// Per tile: keys transposed (hk × bt, every channel, pruned ones 0) then values (bt × hv).
    pub kv: Vec<f32>,
    /// Per tile: positions (bt).
    pub pos: Vec<u32>,
    /// Per tile: entries held.
    pub n: Vec<usize>,
    /// Per KV head: its tiles `[first, end)`.
    pub heads: Vec<(usize, usize)>,
    /// Bytes the gather read from the cache.
    pub read: usize,
}

impl SharedTiles {
    /// Floats of one tile's keys and values.
    pub fn stride(hk: usize, hv: usize, bt: usize) -> usize {
        bt * (hk + hv)
    }
}

/// Gathers the shared entries of every KV head of `sel` for `layer` into `st` (a head without any gets no tiles).
pub(super) fn gather_shared(
    cache: &KvCache,
    layer: usize,
    sel: &TileSelection,
    st: &mut SharedTiles,
) {
    let (hk, hv, bt) = (
        cache.cfg.head_dim_k,
        cache.cfg.head_dim_v,
        cache.cfg.block_tokens,
    );
    let stride = SharedTiles::stride(hk, hv, bt);
    let n_kv = cache.cfg.n_kv_heads;
    st.heads.clear();
    st.n.clear();
    st.read = 0;
    for h in 0..n_kv {
        let len = cache.len(layer, h) as u32;
        let count: usize = sel
            .shared(h)
            .iter()
            .map(|&(lo, hi)| hi.min(len).saturating_sub(lo) as usize)
            .sum();
        let first = st.n.len();
        let nt = count.div_ceil(bt);
        st.n.extend((0..nt).map(|t| bt.min(count - t * bt)));
        st.heads.push((first, first + nt));
    }
    let total = st.n.len();
    if st.kv.len() < total * stride {
        st.kv.resize(total * stride, 0.0);
        st.pos.resize(total * bt, 0);
    }
    // One head's tiles at a time, its entries in order; the tiles of a head are filled in parallel.
    for h in 0..n_kv {
        let (t0, t1) = st.heads[h];
        if t0 == t1 {
            continue;
        }
        let ranges = sel.shared(h);
        let kv = &mut st.kv[t0 * stride..t1 * stride];
        let pos = &mut st.pos[t0 * bt..t1 * bt];
        kv.par_chunks_mut(stride)
            .zip(pos.par_chunks_mut(bt))
            .enumerate()
            .for_each_init(
                || (vec![0.0f32; hk], vec![0.0f32; hv]),
                |(key, val), (t, (tkv, tpos))| {
                    let (kt, vb) = tkv.split_at_mut(hk * bt);
                    // Entries t·bt .. of the head's shared list.
                    let mut skip = t * bt;
                    let mut i = 0;
                    for &(lo, hi) in ranges {
                        let n = (hi - lo) as usize;
                        if skip >= n {
                            skip -= n;
                            continue;
                        }
                        let mut e = lo as usize + skip;
                        skip = 0;
                        while e < hi as usize && i < bt {
                            let blk = cache.block(layer, h, e / bt);
                            blk.mark_read();
                            let j = e % bt;
                            blk.read_key(j, key);
                            for (c, &x) in key.iter().enumerate() {
                                kt[c * bt + i] = x;
                            }
                            blk.read_value(j, val);
                            vb[i * hv..][..hv].copy_from_slice(val);
                            tpos[i] = blk.pos[j];
                            i += 1;
                            e += 1;
                        }
                        if i == bt {
                            break;
                        }
                    }
                    // Unused columns of the last tile: zero keys (scores are cut to the held entries anyway).
                    for c in 0..hk {
                        kt[c * bt + i..(c + 1) * bt].fill(0.0);
                    }
                },
            );
        let entries: usize = st.n[t0..t1].iter().sum();
        st.read += entries * cache.cfg.entry_bytes();
    }
}

/// Attention for `layer` where each (KV head, query tile) reads only the entries `sel` lists for it (the causal and
/// window masks still apply). Shapes as [`super::attend`]; `sel` was reset for this call's KV heads and rows.
#[allow(clippy::too_many_arguments)] // attend's arguments plus the selection
pub fn attend_tiles(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    out: &mut [f32],
    p: &AttnParams,
    sel: &TileSelection,
    scratch: &mut AttnScratch,
) {
    assert_eq!(sel.n_tiles(), q_pos.len().div_ceil(Q_TILE));
    attend_impl(
        cache,
        layer,
        q,
        q_pos,
        out,
        p,
        Sel::Tiles(sel),
        simd_level(),
        scratch,
    )
}

/// Cuts one tile's ranges into pieces; a piece whose block's remaining entries all lie past the tile's last query
/// (`max_qpos`) is widened to the block's end, so the block path (not the gather path) takes it.
pub(super) fn tile_pieces(
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    ranges: &[(u32, u32)],
    max_qpos: u32,
    pieces: &mut Vec<Piece>,
) {
    let first = pieces.len();
    cut_pieces(cache, layer, kv_head, ranges, pieces);
    for pc in &mut pieces[first..] {
        let blk = cache.block(layer, kv_head, pc.block as usize);
        let j1 = pc.j1 as usize;
        if j1 < blk.n && blk.pos[j1] > max_qpos {
            pc.j1 = blk.n as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{attend, naive_attention, Selection};
    use super::*;
    use crate::kv::{KvConfig, KvDtype};
    use crate::testutil::Rng;

    /// A cache of `len` random entries and the last `n_new` rows as queries.
    fn case(
        n_q: usize,
        n_kv: usize,
        len: usize,
        n_new: usize,
        bt: usize,
        dtype: KvDtype,
    ) -> (KvCache, Vec<f32>, Vec<u32>, AttnParams) {
        let (hk, hv) = (32, 32);
        let mut rng = Rng(0x5151 + len as u64 * 7 + n_new as u64);
        let cfg = KvConfig {
            n_layers: 1,
            n_kv_heads: n_kv,
            head_dim_k: hk,
            head_dim_v: hv,
            block_tokens: bt,
            dtype,
            windows: Vec::new(),
        };
        let mut cache = KvCache::new(cfg);
        let pos: Vec<u32> = (0..len as u32).collect();
        cache.append(
            0,
            &pos,
            &rng.vec(len * n_kv * hk, 1.0),
            &rng.vec(len * n_kv * hv, 1.0),
        );
        let q_pos: Vec<u32> = ((len - n_new) as u32..len as u32).collect();
        let q = rng.vec(n_new * n_q * hk, 2.0);
        let p = AttnParams {
            n_q_heads: n_q,
            scale: 1.0 / (hk as f32).sqrt(),
            window: None,
            softcap: None,
        };
        (cache, q, q_pos, p)
    }

    /// Naive attention where row t of KV head h sees exactly the entries of its tile's ranges.
    fn naive_tiles(
        cache: &KvCache,
        q: &[f32],
        q_pos: &[u32],
        p: &AttnParams,
        ts: &TileSelection,
    ) -> Vec<f32> {
        let n_kv = cache.cfg.n_kv_heads;
        let hv = cache.cfg.head_dim_v;
        let hk = cache.cfg.head_dim_k;
        let mut out = vec![0.0; q_pos.len() * p.n_q_heads * hv];
        // One row at a time through the per-head reference with that tile's ranges as a head selection.
        for (t, &qp) in q_pos.iter().enumerate() {
            let mut sel = Selection::default();
            sel.reset(n_kv);
            for h in 0..n_kv {
                for &(lo, hi) in ts.ranges(h, t / Q_TILE).iter().chain(ts.shared(h)) {
                    sel.add(h, lo as usize, hi as usize);
                }
            }
            sel.finish();
            let qr = &q[t * p.n_q_heads * hk..][..p.n_q_heads * hk];
            let o = super::super::naive_attention_over(cache, 0, qr, &[qp], p, Some(&sel));
            out[t * p.n_q_heads * hv..][..p.n_q_heads * hv].copy_from_slice(&o);
        }
        out
    }

    /// A mixed pattern: sink columns, scattered single columns, a block, slash bands, the local diagonal; with
    /// `shift` 1 also shared columns (some inside the tiles' own ranges, some past the first query).
    fn mixed(n_kv: usize, q_pos: &[u32], shift: usize) -> TileSelection {
        let mut ts = TileSelection::default();
        ts.reset(n_kv, q_pos.len());
        for h in 0..n_kv {
            if shift == 1 {
                for c in (3 + h..q_pos[0] as usize + 20).step_by(19) {
                    ts.add_shared(h, c, c + 1);
                }
                ts.add_shared(h, 60, 70);
            }
            for (tile, rows) in q_pos.chunks(Q_TILE).enumerate() {
                let (p0, p1) = (rows[0] as usize, *rows.last().unwrap() as usize);
                ts.add(h, tile, 0, 4);
                for c in (7 + h + shift..p1).step_by(23) {
                    ts.add(h, tile, c, c + 1);
                }
                ts.add(h, tile, 64, 128.min(p1 + 1));
                for off in [40 + shift, 97] {
                    ts.add(
                        h,
                        tile,
                        p0.saturating_sub(off),
                        (p1 + 1).saturating_sub(off),
                    );
                }
                ts.add(h, tile, p0.saturating_sub(8), p1 + 1);
            }
        }
        ts.finish();
        ts
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn tile_selection_equals_naive_over_the_same_entries_every_simd_path() {
        let kivi = KvDtype::Kivi {
            bits: 4,
            residual: 32,
        };
        for (dtype, bt) in [(KvDtype::F16, 32), (KvDtype::F32, 16), (kivi, 32)] {
            for &(n_q, n_kv, len, n_new) in &[(6, 2, 300, 77), (4, 4, 200, 200), (3, 1, 129, 33)] {
                let (cache, q, q_pos, p) = case(n_q, n_kv, len, n_new, bt, dtype);
                for shift in 0..2 {
                    let ts = mixed(n_kv, &q_pos, shift);
                    let want = naive_tiles(&cache, &q, &q_pos, &p, &ts);
                    for simd in super::super::simd_levels() {
                        let mut out = vec![0.0; want.len()];
                        let mut scratch = AttnScratch::default();
                        attend_impl(
                            &cache,
                            0,
                            &q,
                            &q_pos,
                            &mut out,
                            &p,
                            Sel::Tiles(&ts),
                            simd,
                            &mut scratch,
                        );
                        let e = max_err(&out, &want);
                        // The integer fold's query rounding: at most a fifth of what 4-bit storage does.
                        let tol = if super::super::integer_fold(simd, dtype, bt) {
                            let (exact, ..) = case(n_q, n_kv, len, n_new, bt, KvDtype::F32);
                            2e-3f32.max(
                                0.2 * max_err(&want, &naive_tiles(&exact, &q, &q_pos, &p, &ts)),
                            )
                        } else {
                            2e-3
                        };
                        assert!(
                            e < tol,
                            "{dtype:?} {simd:?} n_q {n_q} len {len} new {n_new}: err {e}"
                        );
                    }
                    let (got, dense) = ts.pairs(0, &q_pos);
                    assert!(
                        got < dense,
                        "a sparse pattern computes fewer pairs: {got} / {dense}"
                    );
                }
            }
        }
    }

    #[test]
    fn shared_entries_leave_the_tiles_ranges() {
        let mut out = Vec::new();
        subtract(
            &[(0, 10), (20, 30), (40, 41)],
            &[(2, 3), (5, 22), (29, 45)],
            &mut out,
        );
        assert_eq!(out, vec![(0, 2), (3, 5), (22, 29)]);
        subtract(&[(0, 10)], &[], &mut out);
        assert_eq!(out, vec![(0, 10)]);
        let mut ts = TileSelection::default();
        ts.reset(1, 32);
        ts.add(0, 0, 0, 64);
        ts.add(0, 1, 10, 20);
        ts.add_shared(0, 5, 6);
        ts.add_shared(0, 15, 17);
        ts.finish();
        assert_eq!(ts.ranges(0, 0), &[(0, 5), (6, 15), (17, 64)]);
        assert_eq!(ts.ranges(0, 1), &[(10, 15), (17, 20)]);
        assert!(ts.contains(0, 1, 5) && ts.contains(0, 0, 16) && !ts.contains(0, 1, 30));
        let pos: Vec<u32> = (100..132).collect();
        // Every key lies below the first row (100): tile 0 reads 61 + 3 shared keys, tile 1 8 + 3, 16 rows each.
        assert_eq!(ts.pairs(0, &pos).0, 16 * 64 + 16 * 11);
    }

    #[test]
    fn every_visible_entry_is_dense_attention_bit_for_bit() {
        for (dtype, bt) in [(KvDtype::F16, 32), (KvDtype::F32, 8)] {
            for &(len, n_new) in &[(300, 77), (64, 64), (1000, 16), (37, 5)] {
                let (cache, q, q_pos, p) = case(6, 2, len, n_new, bt, dtype);
                let mut ts = TileSelection::default();
                ts.reset(2, n_new);
                for h in 0..2 {
                    for (tile, rows) in q_pos.chunks(Q_TILE).enumerate() {
                        ts.add(h, tile, 0, *rows.last().unwrap() as usize + 1);
                    }
                }
                ts.finish();
                let mut scratch = AttnScratch::default();
                let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
                attend(&cache, 0, &q, &q_pos, &mut a, &p, &mut scratch);
                let dense_read = cache.take_read();
                attend_tiles(&cache, 0, &q, &q_pos, &mut b, &p, &ts, &mut scratch);
                assert_eq!(a, b, "{dtype:?} len {len} new {n_new}");
                assert_eq!(cache.take_read(), dense_read);
                assert_eq!(ts.pairs(1, &q_pos).0, ts.pairs(1, &q_pos).1);
                let want = naive_attention(&cache, 0, &q, &q_pos, &p);
                assert!(max_err(&a, &want) < 1e-4);
            }
        }
    }
}
