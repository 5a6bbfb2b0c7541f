//! HiP attention — Lee et al., "A Training-free Sub-quadratic Cost Transformer Model Serving Framework with
//! Hierarchically Pruned Attention" (ICLR 2025, arXiv 2406.09827); the representative key and the mask refresh follow
//! its staged successor InfiniteHiP (Lee et al., "InfiniteHiP: Extending Language Model Context Up to 3 Million Tokens
//! on a Single GPU", arXiv 2502.08910, 2025).
//!
//! Mechanism, per KV head over the middle region (between the sinks and the recent window), keeping `K` final chunks:
//! cut the region into `2K` equal pieces; score every piece by one representative key; keep the top `K`; split each
//! survivor in two and score the halves; keep the top `K` again; repeat until every survivor is one final chunk
//! (8 tokens). About log2(T/K) rounds of 2K scores: no pass over every key. A piece's representative is found by a
//! binary descent (InfiniteHiP): compare q·k at the middle of the piece's left half and of its right half, descend
//! into the winner, a few steps; the piece scores its last winner. It relies on attention locality (scores vary
//! smoothly with position), HiP's premise. Every key the descents read is counted as read; on an f16 block (keys
//! stored channel-major, so one key touches all of the block's key lines) the first read scores the whole block and
//! the selection keeps those scores ([`BlockScores`]): each block's keys are read and counted at most once per
//! selection. The mask is reused for `interval` decode steps.
//!
//! Defaults, and where they come from (DeepAuto-AI/hip-attention at fea42c7792):
//! - final chunk 8 tokens: InfiniteHiP's last stage (`v1_2/hip_config.py`, chunk 8); HiP v1.0 goes down to
//!   `block_size_k` 2 (`page=` sets it);
//! - the representative by binary descent (InfiniteHiP `attention_extend.py`, which descends to a terminate size;
//!   v1.0's code samples one random token, its paper the centre token). Ours stops after 3 steps (6 keys read): a
//!   final chunk is resolved to one key, a larger piece to an eighth of it;
//! - sinks 16 [code: `v1_1` test, `sink_token_size=16` beside `mask_k=512` at 4K]; recent 64, where HiP v1 has a
//!   128-token sliding window and InfiniteHiP 256 sinks + 1024 recent: **scaled down** for the budgets of a few hundred
//!   tokens our small models run at (128 would be a quarter of a 512-token budget);
//! - reselection every 8 decode steps: InfiniteHiP's `mask_refresh_interval` of its finest stage (its coarser stages
//!   refresh every 16 and 32; here the whole mask refreshes at once);
//! - 2 dense layers (hayloft's default; InfiniteHiP keeps layers 0–3 and the last one dense, `dense=4` gets the first
//!   part of that).
//!
//! Selection is per KV head (HiP's kernels select per query head): a key's score is the maximum over the query heads
//! of the group of q·k, so the bytes attention reads are exactly the budget.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use smallvec::SmallVec;

use super::{key_read_bytes, top_k, Frame, FrameDefaults, Middle, SelectOptions, Step};
use crate::attention::Selection;
use crate::kernels::rowdot::{cols_dot_f16, MAX_VECTORS};
use crate::kv::BlockData;
use crate::methods::spec::Budget;
use crate::model::{SelectCx, Selector};

/// Tokens per final chunk (InfiniteHiP's last stage).
pub const FINAL_CHUNK: usize = 8;
/// Most steps of a representative's binary descent (2 keys read per step).
pub const DESCENT_STEPS: usize = 3;
/// Pieces a task of a round scores (about 6 key reads each).
const PIECES_PER_TASK: usize = 8;

/// HiP's frame: 16 sinks, 64 recent (scaled down, see above), 2 dense layers, the mask refreshed every 8 steps.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: 16,
    recent: 64,
    dense: 2,
    interval: 8,
};

/// A run of final chunks `[u0, u1)` of the middle region, and its score once scored.
#[derive(Clone, Copy, Debug)]
struct Piece {
    u0: u32,
    u1: u32,
    score: Option<f32>,
}

/// Scores of one KV head's f16 blocks, filled as the descents of one selection first reach each block.
///
/// An f16 block stores its keys channel-major, so reading one key gathers from every channel's row of the block: the
/// same cache lines as all of its keys. A descent's first read in a block therefore scores every key of it
/// ([`cols_dot_f16`], against the group's queries) and keeps them here for the rest of the selection's rounds, so a
/// block's keys are read (and counted) once per selection however many pieces and rounds come back to it. Tasks of a
/// round fill it side by side: a block two of them reach at once may be scored twice (and counted twice); the
/// scores are the same.
#[derive(Default)]
struct BlockScores {
    /// Per block: 0 not scored, 1 scored.
    done: Vec<AtomicU8>,
    /// Per entry: its score's bits (max over the group's query heads of q·k).
    bits: Vec<AtomicU32>,
}

impl BlockScores {
    fn reset(&mut self, blocks: usize, bt: usize) {
        self.done.resize_with(blocks, Default::default);
        self.bits.resize_with(blocks * bt, Default::default);
        self.done[..blocks]
            .iter()
            .for_each(|d| d.store(0, Ordering::Relaxed));
    }
}

/// Reads keys of one KV head for the descents and counts what it read.
struct KeyReader<'a> {
    cx: &'a SelectCx<'a>,
    head: usize,
    key: &'a mut [f32],
    /// Where f16 blocks are scored whole (None: every key read alone).
    table: Option<&'a BlockScores>,
    /// Per-query scores of a block (g × bt).
    rows: SmallVec<[f32; 256]>,
    bytes: usize,
    /// Keys whose bytes were read.
    keys: u64,
}

impl<'a> KeyReader<'a> {
    fn new(
        cx: &'a SelectCx<'a>,
        head: usize,
        key: &'a mut [f32],
        table: Option<&'a BlockScores>,
    ) -> Self {
        Self {
            cx,
            head,
            key,
            table,
            rows: SmallVec::new(),
            bytes: 0,
            keys: 0,
        }
    }

    /// max over the group's query heads of q·k for entry `e`.
    fn score(&mut self, e: usize) -> f32 {
        let cx = self.cx;
        let (g, bt) = (cx.group(), cx.cache.cfg.block_tokens);
        let b = e / bt;
        if let Some(t) = self.table {
            if t.done[b].load(Ordering::Acquire) == 1 {
                return f32::from_bits(t.bits[e].load(Ordering::Relaxed));
            }
        }
        let block = cx.cache.block(cx.layer, self.head, b);
        if let (Some(t), BlockData::F16 { k, .. }, None, true) =
            (self.table, block.data, block.channels, g <= MAX_VECTORS)
        {
            let hk = cx.cache.cfg.head_dim_k;
            self.rows.resize(g * bt, 0.0);
            cols_dot_f16(
                &k[..hk * bt],
                bt,
                cx.group_queries(self.head),
                &mut self.rows,
            );
            for (j, out) in t.bits[b * bt..][..bt].iter().enumerate() {
                let s = (0..g)
                    .map(|i| self.rows[i * bt + j])
                    .fold(f32::NEG_INFINITY, f32::max);
                out.store(s.to_bits(), Ordering::Relaxed);
            }
            t.done[b].store(1, Ordering::Release);
            self.bytes += bt * key_read_bytes(&block, bt);
            self.keys += bt as u64;
            return f32::from_bits(t.bits[e].load(Ordering::Relaxed));
        }
        self.keys += 1;
        block.read_key(e % bt, self.key);
        self.bytes += key_read_bytes(&block, bt);
        let mut best = f32::NEG_INFINITY;
        for i in 0..g {
            let q = cx.last_query(self.head * g + i);
            let s: f32 = q.iter().zip(self.key.iter()).map(|(a, b)| a * b).sum();
            best = best.max(s);
        }
        best
    }

    /// The score of entries `[a, b)` (non-empty): a binary descent to a representative key.
    fn represent(&mut self, mut a: usize, mut b: usize) -> f32 {
        if b - a == 1 {
            return self.score(a);
        }
        let mut best = f32::NEG_INFINITY;
        for _ in 0..DESCENT_STEPS {
            if b - a <= 1 {
                break;
            }
            let m = (a + b) / 2;
            let (sl, sr) = (self.score((a + m) / 2), self.score((m + b) / 2));
            if sl >= sr {
                (b, best) = (m, sl);
            } else {
                (a, best) = (m, sr);
            }
        }
        best
    }
}

pub struct Hip {
    frame: Frame,
    /// Tokens per final chunk.
    unit: usize,
    /// This round's candidate pieces and the next round's.
    pieces: Vec<Piece>,
    next: Vec<Piece>,
    scores: Vec<f32>,
    idx: Vec<u32>,
    /// Keys the descents read, all steps together.
    keys_read: u64,
    /// The head being pruned: its blocks' scores as the descents reach them.
    table: BlockScores,
}

impl Hip {
    pub fn new(budget: Budget, o: &SelectOptions, n_layers: usize) -> Self {
        Self {
            frame: Frame::new(budget, o, DEFAULTS, n_layers),
            unit: o.page.unwrap_or(FINAL_CHUNK).max(1),
            pieces: Vec::new(),
            next: Vec::new(),
            scores: Vec::new(),
            idx: Vec::new(),
            keys_read: 0,
            table: BlockScores::default(),
        }
    }

    fn choose(&mut self, cx: &SelectCx) {
        let nh = cx.cache.cfg.n_kv_heads;
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nh);
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            if m.k > 0 {
                self.prune(cx, h, m, &mut kept);
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }

    /// Hierarchical pruning of head `h`'s middle region down to at most `m.k` entries, into `kept`.
    fn prune(&mut self, cx: &SelectCx, h: usize, m: Middle, kept: &mut Selection) {
        let unit = self.unit.min(m.k);
        let n_units = (m.hi - m.lo).div_ceil(unit);
        let kc = m.k / unit;
        if n_units <= kc {
            kept.add(h, m.lo, m.hi);
            return;
        }
        let hk = cx.cache.cfg.head_dim_k;
        let (bytes, keys) = (AtomicUsize::new(0), AtomicU64::new(0));
        let span = |p: &Piece| {
            (
                m.lo + p.u0 as usize * unit,
                (m.lo + p.u1 as usize * unit).min(m.hi),
            )
        };
        let bt = cx.cache.cfg.block_tokens;
        self.table.reset(cx.cache.n_blocks(cx.layer, h), bt);
        let table = &self.table;
        let p0 = (2 * kc).min(n_units);
        self.pieces.clear();
        self.pieces.extend((0..p0).map(|j| Piece {
            u0: (j * n_units / p0) as u32,
            u1: ((j + 1) * n_units / p0) as u32,
            score: None,
        }));
        loop {
            // The round's new pieces, PIECES_PER_TASK to a task over the pool: each descent is a chain of dependent
            // key reads (each read a gather from head_dim_k cache lines of a block), but the pieces are independent.
            crate::kernels::team::for_each_chunk_mut(&mut self.pieces, PIECES_PER_TASK, |_, ps| {
                let mut key: SmallVec<[f32; 256]> = SmallVec::from_elem(0.0, hk);
                let mut rd = KeyReader::new(cx, h, &mut key, Some(table));
                for p in ps.iter_mut().filter(|p| p.score.is_none()) {
                    let (a, b) = span(p);
                    p.score = Some(rd.represent(a, b));
                }
                bytes.fetch_add(rd.bytes, Ordering::Relaxed);
                keys.fetch_add(rd.keys, Ordering::Relaxed);
            });
            self.scores.clear();
            self.scores.extend(
                self.pieces
                    .iter()
                    .map(|p| p.score.unwrap_or(f32::NEG_INFINITY)),
            );
            top_k(&self.scores, kc, &mut self.idx);
            self.next.clear();
            let mut split = false;
            for &i in &self.idx {
                let p = self.pieces[i as usize];
                if p.u1 - p.u0 >= 2 {
                    let mid = (p.u0 + p.u1) / 2;
                    self.next.push(Piece {
                        u1: mid,
                        score: None,
                        ..p
                    });
                    self.next.push(Piece {
                        u0: mid,
                        score: None,
                        ..p
                    });
                    split = true;
                } else {
                    self.next.push(p);
                }
            }
            if !split {
                break;
            }
            std::mem::swap(&mut self.pieces, &mut self.next);
        }
        for p in &self.next {
            let (a, b) = span(p);
            kept.add(h, a, b);
        }
        cx.cache.note_read(bytes.into_inner());
        self.keys_read += keys.into_inner();
    }
}

impl Selector for Hip {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => self.choose(cx),
        }
        self.frame.finish(cx, out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCache, KvConfig, KvDtype};
    use crate::testutil::Rng;

    const HK: usize = 16;

    /// One layer, `nh` KV heads of `len` entries: small random keys, plus a smooth bump of keys aligned with `dir`
    /// around entry `peak` of head 0 (scores fall off with distance, as attention locality has them).
    fn cache(nh: usize, len: usize, peak: usize, dir: &[f32]) -> KvCache {
        let mut c = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: nh,
            head_dim_k: HK,
            head_dim_v: HK,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        });
        let mut rng = Rng::seeded(7);
        let mut k = rng.vec(len * nh * HK, 0.5);
        for t in 0..len {
            let w = 8.0 * (-(t.abs_diff(peak) as f32) / 24.0).exp();
            for (c, d) in dir.iter().enumerate() {
                k[t * nh * HK + c] += w * d;
            }
        }
        let v = rng.vec(len * nh * HK, 1.0);
        let pos: Vec<u32> = (0..len as u32).collect();
        c.append(0, &pos, &k, &v);
        c
    }

    fn opts() -> SelectOptions {
        SelectOptions {
            dense: Some(0),
            ..Default::default()
        }
    }

    fn cx<'a>(cache: &'a KvCache, q: &'a [f32], pos: &'a [u32], nq: usize) -> SelectCx<'a> {
        SelectCx {
            cache,
            layer: 0,
            q,
            pos,
            n_q_heads: nq,
            local: false,
        }
    }

    #[test]
    fn finds_a_planted_peak_and_reads_within_budget() {
        let mut rng = Rng::seeded(3);
        let dir = rng.vec(HK, 1.0);
        let len = 2000;
        for peak in [300, 1111, 1800] {
            let c = cache(2, len, peak, &dir);
            // Two query heads per KV head; only the second one looks at the peak.
            let mut q = rng.vec(4 * HK, 0.1);
            q[HK..2 * HK].copy_from_slice(&dir);
            let pos = [len as u32 - 1];
            let mut sel = Hip::new(Budget::Tokens(200), &opts(), 1);
            let mut out = Selection::default();
            assert!(sel.select(&cx(&c, &q, &pos, 4), &mut out));
            assert!(out.contains(0, peak), "peak {peak}: {:?}", out.ranges(0));
            for h in 0..2 {
                assert!(out.count(h) <= 200, "head {h} reads {}", out.count(h));
                assert!(out.contains(h, 0) && out.contains(h, len - 1));
            }
            // Fewer keys read than the heads hold, and exactly what was counted.
            assert!(sel.keys_read > 0 && sel.keys_read < 2 * len as u64);
            assert_eq!(c.take_read(), sel.keys_read * 2 * HK as u64);
        }
    }

    #[test]
    fn chooses_whole_final_chunks_and_reuses_for_the_interval() {
        let mut rng = Rng::seeded(4);
        let dir = rng.vec(HK, 1.0);
        let len = 1500;
        let c = cache(1, len, 700, &dir);
        let q = dir.clone();
        let pos = [len as u32 - 1];
        let o = SelectOptions {
            interval: Some(3),
            ..opts()
        };
        let mut sel = Hip::new(Budget::Ratio(0.1), &o, 1);
        let mut out = Selection::default();
        assert!(sel.select(&cx(&c, &q, &pos, 1), &mut out));
        let m = sel.frame.middle(&cx(&c, &q, &pos, 1), 0);
        // Kept ranges inside the middle region are unions of whole 8-token chunks counted from its start.
        for &(a, b) in sel.frame.kept_mut(0).ranges(0) {
            let (a, b) = (a as usize, b as usize);
            assert!(a >= m.lo && b <= m.hi);
            assert!((a - m.lo).is_multiple_of(FINAL_CHUNK));
            assert!((b - m.lo).is_multiple_of(FINAL_CHUNK) || b == m.hi);
        }
        assert!(out.count(0) <= 150);
        c.take_read();
        let before = sel.keys_read;
        let first = out.clone();
        // The next two steps reuse the mask: no key read, the same entries.
        for _ in 0..2 {
            assert!(sel.select(&cx(&c, &q, &pos, 1), &mut out));
            assert_eq!(out.ranges(0), first.ranges(0));
        }
        assert_eq!((sel.keys_read, c.take_read()), (before, 0));
        assert!(sel.select(&cx(&c, &q, &pos, 1), &mut out));
        assert!(sel.keys_read > before);
    }

    #[test]
    fn the_descent_climbs_to_the_best_key_of_a_smooth_piece() {
        let mut rng = Rng::seeded(5);
        let dir = rng.vec(HK, 1.0);
        let c = cache(1, 256, 77, &dir);
        let q = dir.clone();
        let pos = [255];
        let cx = cx(&c, &q, &pos, 1);
        let mut key = Vec::new();
        key.resize(HK, 0.0);
        let mut rd = KeyReader::new(&cx, 0, &mut key, None);
        let near = rd.represent(64, 96);
        let far = rd.represent(192, 224);
        assert!(near > far, "{near} vs {far}");
        // 32 entries: the capped number of steps, 2 keys each.
        assert_eq!(rd.keys, 2 * 2 * DESCENT_STEPS as u64);
        assert_eq!(rd.represent(10, 11), rd.score(10));
    }
}
