//! Sparse prefill attention: each (KV head, tile of [`Q_TILE`] query tokens) reads only its own key ranges.
//!
//! A [`TileSelection`] holds, for every KV head and query tile of one call, ascending entry ranges `[lo, hi)`.
//! Block-sparse patterns give whole 64-token key blocks, vertical lines give single columns, diagonal (slash) bands
//! give one short range per tile. [`attend_tiles`] cuts each tile's ranges at cache-block boundaries and runs the same
//! task code as dense and decode-selected attention: whole blocks take the block path, parts of blocks are gathered
//! into a block-sized tile, the causal and window masks still apply, online softmax as everywhere. The plan splits a
//! tile's pieces at the dense plan's block boundaries, so a selection of every visible entry computes exactly what
//! [`super::attend`] computes, bit for bit.

use super::{attend_impl, cut_pieces, simd_level, AttnParams, AttnScratch, Piece, Sel, Q_TILE};
use crate::kv::KvCache;

/// Key ranges per (KV head, query tile) of one attention call. Tiles are [`Q_TILE`] consecutive query rows.
#[derive(Clone, Debug, Default)]
pub struct TileSelection {
    n_tiles: usize,
    /// [kv_head · n_tiles + tile] → ranges.
    sel: super::Selection,
}

impl TileSelection {
    /// Empties every list (keeping the memory) for `n_heads` KV heads and `n_tok` query rows.
    pub fn reset(&mut self, n_heads: usize, n_tok: usize) {
        self.n_tiles = n_tok.div_ceil(Q_TILE);
        self.sel.reset(n_heads * self.n_tiles);
    }

    /// Query tiles per head.
    pub fn n_tiles(&self) -> usize {
        self.n_tiles
    }

    /// Adds entries `[lo, hi)` for (head, tile) (any order, overlaps allowed until [`Self::finish`]).
    pub fn add(&mut self, head: usize, tile: usize, lo: usize, hi: usize) {
        self.sel.add(head * self.n_tiles + tile, lo, hi);
    }

    /// Sorts and merges every list.
    pub fn finish(&mut self) {
        self.sel.finish();
    }

    /// The ranges of (head, tile).
    pub fn ranges(&self, head: usize, tile: usize) -> &[(u32, u32)] {
        self.sel.ranges(head * self.n_tiles + tile)
    }

    /// Whether entry `e` is read by (head, tile).
    pub fn contains(&self, head: usize, tile: usize, e: usize) -> bool {
        self.sel.contains(head * self.n_tiles + tile, e)
    }

    /// (query·key pairs this selection computes, pairs dense causal attention computes) for `head`, queries at
    /// `q_pos` (entry index = position, the prefill case), after [`Self::finish`].
    pub fn pairs(&self, head: usize, q_pos: &[u32]) -> (u64, u64) {
        let (mut got, mut dense) = (0u64, 0u64);
        for (tile, rows) in q_pos.chunks(Q_TILE).enumerate() {
            let first = rows.iter().copied().min().unwrap_or(0) as u64 + 1;
            dense += rows.iter().map(|&p| p as u64 + 1).sum::<u64>();
            for &(lo, hi) in self.ranges(head, tile) {
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
                for &(lo, hi) in ts.ranges(h, t / Q_TILE) {
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

    /// A mixed pattern: sink columns, scattered single columns, a block, slash bands, the local diagonal.
    fn mixed(n_kv: usize, q_pos: &[u32], shift: usize) -> TileSelection {
        let mut ts = TileSelection::default();
        ts.reset(n_kv, q_pos.len());
        for h in 0..n_kv {
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
                        assert!(
                            e < 2e-3,
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
