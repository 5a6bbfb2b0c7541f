//! Turning per-head patterns into per-tile key ranges, and estimating vertical-slash and block-sparse patterns from
//! a chunk's own queries and the cached keys.
//!
//! For one KV head and one chunk, a [`HeadPlan`] is the union of what its query heads' patterns read: key columns,
//! diagonals (query − key offsets), an A-shape, kept key blocks per 64-row query block, or everything. [`HeadPlan::emit`]
//! writes it for every 16-query tile as ascending key ranges: a tile reads the union of its rows' keys (a diagonal
//! becomes one 16-key range per tile), the kernel's causal mask does the rest. Bit sets over key positions keep
//! this linear in the context.
//!
//! The prefill case only: the chunk's positions are consecutive and every KV head's entry `e` is position `e`
//! ([`prefill_shape`] checks; anything else stays dense).

use crate::attention::{exp_neg, TileSelection, Q_TILE};
use crate::kv::{BlockData, KvCache};
use crate::model::SelectCx;

use super::HeadPattern;

/// Queries whose attention estimates vertical-slash patterns (MInference's `last_q`).
pub const LAST_Q: usize = 64;
/// Columns and diagonals every vertical-slash pattern keeps (MInference's runtime: first 30 columns, last 100
/// diagonals), and the least diagonals a pattern takes (`max(s, 50)`).
pub const FORCED_COLUMNS: usize = 30;
pub const FORCED_DIAGONALS: usize = 100;
pub const MIN_SLASH: usize = 50;
/// Block-sparse blocks, query and key (MInference: 64).
pub const BLOCK: usize = 64;

/// Whether `cx` is a prefill chunk of consecutive positions over a cache whose entries are its positions.
pub fn prefill_shape(cx: &SelectCx) -> bool {
    let (Some(&first), Some(&last)) = (cx.pos.first(), cx.pos.last()) else {
        return false;
    };
    (last - first) as usize + 1 == cx.pos.len()
        && (0..cx.cache.cfg.n_kv_heads).all(|h| cx.cache.len(cx.layer, h) == last as usize + 1)
}

/// Key groups (a default cache block) and how many selected keys make a group read whole.
pub const GROUP: usize = 32;
pub const GROUP_FILL: usize = GROUP / 4;

/// Bits over key positions.
#[derive(Clone, Default, Debug)]
pub struct Bits {
    w: Vec<u64>,
}

impl Bits {
    /// All clear, room for `len` bits.
    pub fn reset(&mut self, len: usize) {
        self.w.clear();
        self.w.resize(len.div_ceil(64), 0);
    }

    pub fn set(&mut self, i: usize) {
        self.w[i / 64] |= 1 << (i % 64);
    }

    pub fn get(&self, i: usize) -> bool {
        self.w.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Sets `[lo, hi)` (clipped to the room).
    pub fn set_range(&mut self, lo: usize, hi: usize) {
        let hi = hi.min(self.w.len() * 64);
        let mut i = lo;
        while i < hi {
            if i.is_multiple_of(64) && i + 64 <= hi {
                self.w[i / 64] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Sets every aligned group of [`GROUP`] bits that has at least [`GROUP_FILL`] set: the kernel folds a whole
    /// cache block at about the cost of gathering a quarter of it, so a quarter-selected block is read whole.
    pub fn fill_dense_groups(&mut self) {
        for w in &mut self.w {
            for half in [0u32, 32] {
                let mask = (u32::MAX as u64) << half;
                if (*w & mask).count_ones() as usize >= GROUP_FILL {
                    *w |= mask;
                }
            }
        }
    }

    /// Clears every bit below `n`.
    pub fn clear_below(&mut self, n: usize) {
        let n = n.min(self.w.len() * 64);
        self.w[..n / 64].fill(0);
        if !n.is_multiple_of(64) {
            self.w[n / 64] &= u64::MAX << (n % 64);
        }
    }

    /// self |= other over self's room.
    pub fn or(&mut self, other: &Bits) {
        for (a, b) in self.w.iter_mut().zip(&other.w) {
            *a |= b;
        }
    }

    /// Calls `f(lo, hi)` for every run of set bits below `limit`, ascending.
    pub fn runs(&self, limit: usize, mut f: impl FnMut(usize, usize)) {
        let n = limit.min(self.w.len() * 64);
        let mut i = 0;
        let mut start: Option<usize> = None;
        while i < n {
            let (wi, off) = (i / 64, i % 64);
            let w = self.w[wi] >> off;
            // Bits of the word from `off` on that continue the current state (set in a run, clear outside one).
            let same = if start.is_some() {
                (!w).trailing_zeros()
            } else {
                w.trailing_zeros()
            };
            let step = (same as usize).min(64 - off);
            let next = (i + step).min(n);
            if next < n && step < 64 - off {
                // The state flips at `next`.
                match start.take() {
                    Some(a) => f(a, next),
                    None => start = Some(next),
                }
            }
            i = if step == 0 { i + 1 } else { next };
        }
        if let Some(a) = start {
            f(a, n);
        }
    }

    /// Dilates by `w` toward higher positions: bit x is set if any of bits x − w ..= x was.
    pub fn dilate(&mut self, w: usize) {
        let mut done = 0; // bits x−done ..= x are covered
        while done < w {
            let s = (done + 1).min(w - done);
            self.or_shl(s);
            done += s;
        }
    }

    /// self |= self shifted up by `s` bits (0 < s < 64).
    fn or_shl(&mut self, s: usize) {
        for i in (0..self.w.len()).rev() {
            let lo = if i > 0 { self.w[i - 1] >> (64 - s) } else { 0 };
            self.w[i] |= (self.w[i] << s) | lo;
        }
    }

    /// `out` ← these bits in reverse order over the whole room (bit x ↦ room − 1 − x).
    pub fn reverse_into(&self, out: &mut Bits) {
        out.w.clear();
        out.w.extend(self.w.iter().rev().map(|w| w.reverse_bits()));
    }

    /// self |= `src` shifted down by `s` bits (bit k takes src's bit k + s).
    pub fn or_shr(&mut self, src: &Bits, s: usize) {
        let (q, r) = (s / 64, s % 64);
        for i in 0..self.w.len() {
            let a = src.w.get(i + q).copied().unwrap_or(0);
            let b = src.w.get(i + q + 1).copied().unwrap_or(0);
            self.w[i] |= if r == 0 {
                a
            } else {
                (a >> r) | (b << (64 - r))
            };
        }
    }
}

/// What one KV head reads in one chunk (the union over its query heads).
#[derive(Default)]
pub struct HeadPlan {
    /// Every visible key.
    pub dense: bool,
    /// Key columns (context bits).
    pub cols: Bits,
    /// Diagonals: offset o = query pos − key pos (context bits).
    pub offs: Bits,
    /// A-shape: first `init` keys and last `local` keys of each query (0, 0 = none).
    pub init: usize,
    pub local: usize,
    /// Rows per query block and keys per key block of `blocks`.
    pub block: usize,
    /// Per query block of the chunk (rows `b·block..`): kept key blocks; empty = no block pattern.
    pub blocks: Vec<Bits>,
    /// The tile being emitted (scratch).
    tile: Bits,
    /// Diagonals dilated by a tile's rows, then reversed (see [`Self::emit_with`]).
    dil: Bits,
    rev: Bits,
}

impl HeadPlan {
    /// Nothing read yet, for a context of `len` keys.
    pub fn reset(&mut self, len: usize) {
        self.dense = false;
        self.cols.reset(len);
        self.offs.reset(len);
        self.init = 0;
        self.local = 0;
        self.blocks.clear();
    }

    /// Adds an A-shape.
    pub fn add_a_shape(&mut self, init: usize, local: usize) {
        self.init = self.init.max(init);
        self.local = self.local.max(local);
    }

    /// Query block `qb`'s kept key blocks, for `n_rows` rows in blocks of `block` (created empty on first use).
    pub fn blocks_of(&mut self, qb: usize, n_rows: usize, block: usize, len: usize) -> &mut Bits {
        if self.blocks.is_empty() {
            self.block = block;
            self.blocks
                .resize_with(n_rows.div_ceil(block), Bits::default);
            for b in &mut self.blocks {
                b.reset(len.div_ceil(block));
            }
        }
        &mut self.blocks[qb]
    }

    /// Writes the tile ranges of KV head `h` for the chunk at consecutive positions `pos` into `out`. Columns before
    /// the chunk (every row sees them) go in as the head's shared entries, gathered once for all tiles; the plan's
    /// columns are cleared below the chunk's first position on the way.
    pub fn emit(&mut self, h: usize, pos: &[u32], out: &mut TileSelection) {
        if !self.dense {
            let first = pos.first().map_or(0, |&p| p as usize);
            self.cols.runs(first, |lo, hi| out.add_shared(h, lo, hi));
            self.cols.clear_below(first);
        }
        self.emit_with(pos, |tile, lo, hi| out.add(h, tile, lo, hi));
    }

    /// Adds what `o` reads (a query head of the same KV head, same chunk).
    pub fn merge(&mut self, o: &HeadPlan) {
        self.dense |= o.dense;
        self.cols.or(&o.cols);
        self.offs.or(&o.offs);
        self.add_a_shape(o.init, o.local);
        if o.blocks.is_empty() {
            return;
        }
        if self.blocks.is_empty() {
            self.block = o.block;
            self.blocks.resize_with(o.blocks.len(), Bits::default);
            for (a, b) in self.blocks.iter_mut().zip(&o.blocks) {
                a.w.clear();
                a.w.extend_from_slice(&b.w);
            }
        } else if self.block == o.block && self.blocks.len() == o.blocks.len() {
            for (a, b) in self.blocks.iter_mut().zip(&o.blocks) {
                a.or(b);
            }
        } else {
            // Block patterns of two sizes: read everything rather than miss one.
            self.dense = true;
        }
    }

    /// The tiles' ranges as `f(tile, lo, hi)`, ascending within a tile.
    ///
    /// Diagonals: tile rows p0 ..= p1 reach key k through offset o when p0 ≤ k + o ≤ p1. With the offsets dilated by
    /// the tile's span (bit x set if an offset lies in x − 15 ..= x), k is reached iff bit p1 − k is set: the keys
    /// are the dilated offsets reversed and shifted, a few word operations per tile however many diagonals there are.
    pub fn emit_with(&mut self, pos: &[u32], mut f: impl FnMut(usize, usize, usize)) {
        let len = pos.last().map_or(0, |&p| p as usize + 1);
        self.dil.w.clear();
        self.dil.w.extend_from_slice(&self.offs.w);
        self.dil.dilate(Q_TILE - 1);
        self.dil.reverse_into(&mut self.rev);
        let room = self.dil.w.len() * 64;
        for (tile, rows) in pos.chunks(Q_TILE).enumerate() {
            let p1 = rows[rows.len() - 1] as usize;
            let p0 = rows[0] as usize;
            let end = p1 + 1;
            if self.dense {
                f(tile, 0, end);
                continue;
            }
            let m = &mut self.tile;
            m.reset(len);
            m.or(&self.cols);
            // Key k ↔ dilated bit p1 − k ↔ reversed bit room − 1 − p1 + k.
            m.or_shr(&self.rev, room - 1 - p1);
            if self.init + self.local > 0 {
                m.set_range(0, self.init.min(end));
                m.set_range((p0 + 1).saturating_sub(self.local), end);
            }
            if !self.blocks.is_empty() {
                let bs = self.block;
                let kept = &self.blocks[tile * Q_TILE / bs];
                kept.runs(len.div_ceil(bs), |a, b| m.set_range(a * bs, b * bs));
            }
            m.fill_dense_groups();
            m.runs(end, |lo, hi| f(tile, lo, hi));
        }
    }
}

/// One KV head's keys of one layer as f32, shared by the estimates of its query heads.
#[derive(Default)]
pub struct Keys {
    /// Keys in the cache's block layout, as f32: block b's channel c, entry j at `(b·hk + c)·bt + j`.
    keys: Vec<f32>,
    hk: usize,
    bt: usize,
    /// One key (hk), for blocks read entry by entry.
    one: Vec<f32>,
}

/// The work buffers of one query head's estimates, reused.
#[derive(Default)]
pub struct Estimator {
    /// One key (hk).
    one: Vec<f32>,
    /// Scores of one query row (len), or of [`ROWS`] rows (ROWS × len).
    row: Vec<f32>,
    /// [`ROWS`] query rows (ROWS × hk).
    qrows: Vec<f32>,
    /// Column and diagonal sums of the last queries' attention (len each).
    pub vert: Vec<f32>,
    pub slash: Vec<f32>,
    idx: Vec<u32>,
    /// Mean key of each key block, and mean query of each query block (hk each).
    kmean: Vec<f32>,
    qmean: Vec<f32>,
    bscore: Vec<f32>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Softmax of `s` in place (every entry finite), with the attention kernel's vectorizable exp.
pub fn softmax(s: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for x in s.iter_mut() {
        *x = exp_neg(*x - m);
        z += *x;
    }
    let inv = 1.0 / z;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// s[e] = scale · q·k_e for the `s.len()` first entries of keys in block layout (`kt`, blocks of `bt`).
#[inline(always)]
fn scores_blocked(q: &[f32], kt: &[f32], bt: usize, scale: f32, s: &mut [f32]) {
    let hk = q.len();
    for (b, sb) in s.chunks_mut(bt).enumerate() {
        let kb = &kt[b * hk * bt..][..hk * bt];
        let n = sb.len();
        if bt == 32 && n == 32 {
            // The default block: the 32 scores stay in registers over the channels.
            let mut acc = [0.0f32; 32];
            for (c, &qc) in q.iter().enumerate() {
                let k: &[f32; 32] = kb[c * 32..][..32].try_into().expect("32 keys");
                for j in 0..32 {
                    acc[j] += qc * k[j];
                }
            }
            for (x, a) in sb.iter_mut().zip(acc) {
                *x = a * scale;
            }
            continue;
        }
        sb.fill(0.0);
        for (c, &qc) in q.iter().enumerate() {
            for (x, k) in sb.iter_mut().zip(&kb[c * bt..][..n]) {
                *x += qc * k;
            }
        }
        sb.iter_mut().for_each(|x| *x *= scale);
    }
    softmax(s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], kt: &[f32], bt: usize, scale: f32, s: &mut [f32]) {
    scores_blocked(q, kt, bt, scale, s)
}

/// The same, 16 lanes wide: the estimate's scores are half of a sparse chunk's attention work at 10-20 % density.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn scores_avx512(q: &[f32], kt: &[f32], bt: usize, scale: f32, s: &mut [f32]) {
    scores_blocked(q, kt, bt, scale, s)
}

/// Softmax of `scale · q·k` over the first `s.len()` keys of `kt` (block layout, blocks of `bt`), with the code
/// compiled for `k` (a kernel this CPU runs).
fn scores_with(
    k: crate::kernels::Kernel,
    q: &[f32],
    kt: &[f32],
    bt: usize,
    scale: f32,
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::Kernel;
    #[cfg(target_arch = "x86_64")]
    match k {
        // SAFETY: `k` is a kernel the selection found this CPU able to run (AVX-512F/BW/VL with AVX2 and FMA).
        Kernel::Avx512 => return unsafe { scores_avx512(q, kt, bt, scale, s) },
        // SAFETY: as above, AVX2 and FMA.
        Kernel::Avx2 => return unsafe { scores_avx2(q, kt, bt, scale, s) },
        Kernel::Scalar => {}
    }
    let _ = k;
    scores_blocked(q, kt, bt, scale, s)
}

impl Keys {
    /// Reads KV head `h`'s keys of `layer` (`len` entries).
    pub fn load(&mut self, cache: &KvCache, layer: usize, h: usize, len: usize) {
        use half::slice::HalfFloatSliceExt;
        let (hk, bt) = (cache.cfg.head_dim_k, cache.cfg.block_tokens);
        (self.hk, self.bt) = (hk, bt);
        let nb = len.div_ceil(bt);
        self.keys.resize(nb * hk * bt, 0.0);
        self.one.resize(hk, 0.0);
        for b in 0..nb {
            let blk = cache.block(layer, h, b);
            let dst = &mut self.keys[b * hk * bt..][..hk * bt];
            match (blk.data, blk.channels) {
                (BlockData::F16 { k, .. }, None) => k[..hk * bt].convert_to_f32_slice(dst),
                (BlockData::F32 { k, .. }, None) => dst.copy_from_slice(&k[..hk * bt]),
                _ => {
                    for j in 0..blk.n {
                        blk.read_key(j, &mut self.one);
                        for (c, &x) in self.one.iter().enumerate() {
                            dst[c * bt + j] = x;
                        }
                    }
                }
            }
        }
        cache.note_read(len * hk * 2);
    }

    /// Key `e` (hk) into `out`.
    fn key(&self, e: usize, out: &mut [f32]) {
        let (b, j) = (e / self.bt, e % self.bt);
        for (c, x) in out.iter_mut().enumerate() {
            *x = self.keys[(b * self.hk + c) * self.bt + j];
        }
    }

    /// Probabilities of query row `q` at position `p` over keys `0..=p` into `row`.
    fn probs_into(&self, q: &[f32], p: usize, scale: f32, row: &mut Vec<f32>) {
        row.resize(p + 1, 0.0);
        scores_with(crate::kernels::kernel(), q, &self.keys, self.bt, scale, row);
    }

    /// Raw scores `scale · q_r·k_e` of [`ROWS`] query rows (`q`, ROWS × hk; rows past the real ones may hold
    /// anything) over the first `n` keys into `s` (ROWS × n, row r at `r · n`).
    fn scores_rows(&self, q: &[f32], n: usize, scale: f32, s: &mut [f32]) {
        scores_rows_with(
            crate::kernels::kernel(),
            q,
            &self.keys,
            self.bt,
            scale,
            n,
            s,
        );
    }
}

/// One estimate row's share of the column and diagonal sums: the softmax `w` of `row` (its raw scores, over keys
/// 0..=p, p = row.len() − 1; left holding w), then vert[j] += w[j] and slash[p − j] += w[j]. Written so LLVM
/// vectorizes it (the exp is [`exp_neg`], the diagonal sums run over a reversed slice).
#[inline(always)]
fn accumulate_row(row: &mut [f32], vert: &mut [f32], slash: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = [0.0f32; 16];
    for c in row.chunks_mut(16) {
        for (x, zi) in c.iter_mut().zip(z.iter_mut()) {
            *x = exp_neg(*x - m);
            *zi += *x;
        }
    }
    let inv = 1.0 / z.iter().sum::<f32>();
    for ((x, v), d) in row
        .iter_mut()
        .zip(vert.iter_mut())
        .zip(slash.iter_mut().rev())
    {
        *x *= inv;
        *v += *x;
        *d += *x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(row: &mut [f32], vert: &mut [f32], slash: &mut [f32]) {
    accumulate_row(row, vert, slash)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn accumulate_avx512(row: &mut [f32], vert: &mut [f32], slash: &mut [f32]) {
    accumulate_row(row, vert, slash)
}

/// [`accumulate_row`] compiled for `k` (a kernel this CPU runs); `vert` and `slash` hold row.len() entries.
fn accumulate_with(
    k: crate::kernels::Kernel,
    row: &mut [f32],
    vert: &mut [f32],
    slash: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::Kernel;
    debug_assert!(vert.len() == row.len() && slash.len() == row.len());
    #[cfg(target_arch = "x86_64")]
    match k {
        // SAFETY: `k` is a kernel the selection found this CPU able to run.
        Kernel::Avx512 => return unsafe { accumulate_avx512(row, vert, slash) },
        // SAFETY: as above.
        Kernel::Avx2 => return unsafe { accumulate_avx2(row, vert, slash) },
        Kernel::Scalar => {}
    }
    let _ = k;
    accumulate_row(row, vert, slash)
}

/// Query rows the estimate scores together: each block's keys are read once for all of them instead of once per
/// row (the keys of a long context do not stay in cache between rows).
pub const ROWS: usize = 8;

/// s[r · n + e] = scale · q_r·k_e for the [`ROWS`] rows of `q` (ROWS × hk) and the first `n` keys of `kt` (block
/// layout, blocks of `bt`): full 32-key blocks in passes of KB keys with R rows' accumulators in registers (each
/// key channel loaded once per pass for R rows), the rest row by row. `F`: fused multiply-adds (a CPU with FMA).
#[inline(always)]
fn scores_rows_blocked<const R: usize, const KB: usize, const F: bool>(
    q: &[f32],
    kt: &[f32],
    bt: usize,
    scale: f32,
    n: usize,
    s: &mut [f32],
) {
    let hk = q.len() / ROWS;
    let mad = |a: f32, b: f32, c: f32| if F { a.mul_add(b, c) } else { c + a * b };
    for b in 0..n.div_ceil(bt) {
        let kb = &kt[b * hk * bt..][..hk * bt];
        let (e0, m) = (b * bt, bt.min(n - b * bt));
        if bt == 32 && m == 32 {
            for r0 in (0..ROWS).step_by(R) {
                for j0 in (0..32).step_by(KB) {
                    let mut acc = [[0.0f32; KB]; R];
                    for c in 0..hk {
                        let k: &[f32; KB] = kb[c * 32 + j0..][..KB].try_into().expect("KB keys");
                        for (r, a) in acc.iter_mut().enumerate() {
                            let qc = q[(r0 + r) * hk + c];
                            for j in 0..KB {
                                a[j] = mad(qc, k[j], a[j]);
                            }
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        for (x, &y) in s[(r0 + r) * n + e0 + j0..][..KB].iter_mut().zip(a) {
                            *x = y * scale;
                        }
                    }
                }
            }
            continue;
        }
        for r in 0..ROWS {
            let qr = &q[r * hk..][..hk];
            for j in 0..m {
                let mut a = 0.0f32;
                for (c, &qc) in qr.iter().enumerate() {
                    a = mad(qc, kb[c * bt + j], a);
                }
                s[r * n + e0 + j] = a * scale;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_rows_avx2(q: &[f32], kt: &[f32], bt: usize, scale: f32, n: usize, s: &mut [f32]) {
    // 4 rows × 16 keys = 8 ymm accumulators.
    scores_rows_blocked::<4, 16, true>(q, kt, bt, scale, n, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn scores_rows_avx512(
    q: &[f32],
    kt: &[f32],
    bt: usize,
    scale: f32,
    n: usize,
    s: &mut [f32],
) {
    // 8 rows × 32 keys = 16 zmm accumulators.
    scores_rows_blocked::<8, 32, true>(q, kt, bt, scale, n, s)
}

/// [`scores_rows_blocked`] with the code compiled for `k` (a kernel this CPU runs).
fn scores_rows_with(
    k: crate::kernels::Kernel,
    q: &[f32],
    kt: &[f32],
    bt: usize,
    scale: f32,
    n: usize,
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    use crate::kernels::Kernel;
    debug_assert!(q.len().is_multiple_of(ROWS) && s.len() >= ROWS * n);
    #[cfg(target_arch = "x86_64")]
    match k {
        // SAFETY: `k` is a kernel the selection found this CPU able to run (AVX-512F/BW/VL with AVX2 and FMA).
        Kernel::Avx512 => return unsafe { scores_rows_avx512(q, kt, bt, scale, n, s) },
        // SAFETY: as above, AVX2 and FMA.
        Kernel::Avx2 => return unsafe { scores_rows_avx2(q, kt, bt, scale, n, s) },
        Kernel::Scalar => {}
    }
    let _ = k;
    scores_rows_blocked::<2, 8, false>(q, kt, bt, scale, n, s)
}

impl Estimator {
    /// Probabilities of query row `q` at position `p` over keys `0..=p` into the row buffer, returned.
    pub fn probs(&mut self, keys: &Keys, q: &[f32], p: usize, scale: f32) -> &[f32] {
        keys.probs_into(q, p, scale, &mut self.row);
        &self.row
    }

    /// Column and diagonal sums of the attention of query head `qh`'s last [`LAST_Q`] rows of the chunk.
    pub fn vertical_slash_scores(&mut self, keys: &Keys, cx: &SelectCx, qh: usize, scale: f32) {
        let hk = cx.cache.cfg.head_dim_k;
        let n = cx.pos.len();
        let len = cx.pos[n - 1] as usize + 1;
        self.vert.clear();
        self.vert.resize(len, 0.0);
        self.slash.clear();
        self.slash.resize(len, 0.0);
        // The rows go ROWS at a time: one pass over the keys scores them all, then each row's softmax over the
        // keys it sees (positions ascend, so a group's last row sees the most).
        for g0 in (n - n.min(LAST_Q)..n).step_by(ROWS) {
            let group = g0..(g0 + ROWS).min(n);
            self.qrows.clear();
            self.qrows.resize(ROWS * hk, 0.0);
            for (r, t) in group.clone().enumerate() {
                self.qrows[r * hk..][..hk]
                    .copy_from_slice(&cx.q[(t * cx.n_q_heads + qh) * hk..][..hk]);
            }
            let m = cx.pos[group.end - 1] as usize + 1;
            self.row.resize(ROWS * m, 0.0);
            keys.scores_rows(&self.qrows, m, scale, &mut self.row);
            for (r, t) in group.enumerate() {
                let p = cx.pos[t] as usize;
                accumulate_with(
                    crate::kernels::kernel(),
                    &mut self.row[r * m..][..p + 1],
                    &mut self.vert[..p + 1],
                    &mut self.slash[..p + 1],
                );
            }
        }
    }

    /// Sets in `bits` the `k` highest of `score`, the first `forced` always.
    fn top(&mut self, which: Which, forced: usize, k: usize, bits: &mut Bits) {
        let score = match which {
            Which::Vert => &self.vert,
            Which::Slash => &self.slash,
        };
        let len = score.len();
        let k = k.min(len);
        let forced = forced.min(k);
        bits.set_range(0, forced);
        self.idx.clear();
        self.idx.extend(forced as u32..len as u32);
        let rest = k - forced;
        if rest == 0 {
            return;
        }
        if rest < self.idx.len() {
            self.idx.select_nth_unstable_by(rest - 1, |&a, &b| {
                score[b as usize].total_cmp(&score[a as usize])
            });
        }
        for &i in &self.idx[..rest.min(self.idx.len())] {
            bits.set(i as usize);
        }
    }

    /// Adds query head `qh`'s vertical-slash pattern (estimated now) to `plan`.
    pub fn add_vertical_slash(
        &mut self,
        keys: &Keys,
        cx: &SelectCx,
        qh: usize,
        scale: f32,
        (vertical, slash): (usize, usize),
        plan: &mut HeadPlan,
    ) {
        self.vertical_slash_scores(keys, cx, qh, scale);
        self.add_vs_from_scores(vertical, slash, plan);
    }

    /// Adds a vertical-slash pattern of these sizes from the last computed scores.
    pub fn add_vs_from_scores(&mut self, vertical: usize, slash: usize, plan: &mut HeadPlan) {
        let v = vertical.max(FORCED_COLUMNS);
        let s = slash.max(MIN_SLASH);
        self.top(Which::Vert, FORCED_COLUMNS, v, &mut plan.cols);
        self.top(Which::Slash, FORCED_DIAGONALS, s, &mut plan.offs);
    }

    /// Adds query head `qh`'s block-sparse pattern: per `block`-row query block of the chunk, the key blocks whose
    /// mean key scores highest against the block's mean query, `keep(visible blocks)` of them, with the first block
    /// and the blocks holding the query block's own positions always.
    pub fn add_block_sparse(
        &mut self,
        keys: &Keys,
        cx: &SelectCx,
        qh: usize,
        block: usize,
        keep: impl Fn(usize) -> usize,
        plan: &mut HeadPlan,
    ) {
        let hk = cx.cache.cfg.head_dim_k;
        let n = cx.pos.len();
        let len = cx.pos[n - 1] as usize + 1;
        let nkb = len.div_ceil(block);
        if self.kmean.len() != nkb * hk {
            // Key block means are the same for every query head of this KV head: computed once per chunk (the
            // caller resets `kmean` with [`Self::forget_means`] when the keys change; a length change resets too).
            self.kmean.clear();
            self.kmean.resize(nkb * hk, 0.0);
            for kb in 0..nkb {
                let (a, b) = (kb * block, ((kb + 1) * block).min(len));
                self.one.resize(hk, 0.0);
                for e in a..b {
                    let mut one = std::mem::take(&mut self.one);
                    keys.key(e, &mut one);
                    for (x, y) in self.kmean[kb * hk..][..hk].iter_mut().zip(&one) {
                        *x += y;
                    }
                    self.one = one;
                }
                let inv = 1.0 / (b - a) as f32;
                self.kmean[kb * hk..][..hk]
                    .iter_mut()
                    .for_each(|x| *x *= inv);
            }
        }
        self.qmean.resize(hk, 0.0);
        for qb in 0..n.div_ceil(block) {
            let (t0, t1) = (qb * block, ((qb + 1) * block).min(n));
            self.qmean.fill(0.0);
            for t in t0..t1 {
                let q = &cx.q[(t * cx.n_q_heads + qh) * hk..][..hk];
                for (x, y) in self.qmean.iter_mut().zip(q) {
                    *x += y;
                }
            }
            let (first, last) = (cx.pos[t0] as usize / block, cx.pos[t1 - 1] as usize / block);
            let visible = last + 1;
            self.bscore.clear();
            self.bscore
                .extend((0..visible).map(|kb| dot(&self.qmean, &self.kmean[kb * hk..][..hk])));
            let k = keep(visible).min(visible);
            self.idx.clear();
            self.idx.extend(0..visible as u32);
            if k < visible && k > 0 {
                let sc = &self.bscore;
                self.idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    sc[b as usize].total_cmp(&sc[a as usize])
                });
            }
            let bits = plan.blocks_of(qb, n, block, len);
            for &kb in &self.idx[..k] {
                bits.set(kb as usize);
            }
            bits.set(0);
            bits.set_range(first, last + 1);
        }
    }

    /// Drops the cached key-block means (new keys or another block size).
    pub fn forget_means(&mut self) {
        self.kmean.clear();
    }
}

#[derive(Clone, Copy)]
enum Which {
    Vert,
    Slash,
}

/// Adds one query head's pattern to its KV head's plan (estimating it from the chunk where it needs to).
pub fn add_pattern(
    est: &mut Estimator,
    keys: &Keys,
    cx: &SelectCx,
    qh: usize,
    scale: f32,
    pat: HeadPattern,
    plan: &mut HeadPlan,
) {
    match pat {
        HeadPattern::VerticalSlash { vertical, slash } => {
            est.add_vertical_slash(keys, cx, qh, scale, (vertical, slash), plan)
        }
        HeadPattern::BlockSparse { top_k } => {
            if !plan.blocks.is_empty() && plan.block != BLOCK {
                plan.blocks.clear();
            }
            est.add_block_sparse(keys, cx, qh, BLOCK, |_| top_k, plan)
        }
        HeadPattern::AShape { init, local } => plan.add_a_shape(init, local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_scores_equal_the_plain_softmax_on_every_simd_path() {
        let mut rng = crate::testutil::Rng(77);
        for (bt, n) in [(32usize, 100usize), (32, 64), (16, 37), (8, 5)] {
            let hk = 24;
            let kt = rng.vec(n.div_ceil(bt) * hk * bt, 1.0);
            let q = rng.vec(hk, 1.0);
            // Plain reference: key e's channel c at (e / bt · hk + c) · bt + e % bt.
            let mut want: Vec<f32> = (0..n)
                .map(|e| {
                    (0..hk)
                        .map(|c| q[c] * kt[((e / bt) * hk + c) * bt + e % bt])
                        .sum::<f32>()
                        * 0.3
                })
                .collect();
            let m = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            want.iter_mut().for_each(|x| *x = (*x - m).exp());
            let z: f32 = want.iter().sum();
            want.iter_mut().for_each(|x| *x /= z);
            for k in crate::kernels::available() {
                let mut got = vec![0.0; n];
                scores_with(k, &q, &kt, bt, 0.3, &mut got);
                let e = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(e < 1e-5, "{k:?} bt {bt} n {n}: err {e}");
            }
        }
    }

    #[test]
    fn row_group_scores_equal_one_row_at_a_time_on_every_simd_path() {
        let mut rng = crate::testutil::Rng(78);
        for (bt, n, hk) in [
            (32usize, 100usize, 24usize),
            (32, 64, 64),
            (32, 33, 16),
            (16, 37, 24),
            (8, 5, 8),
        ] {
            let kt = rng.vec(n.div_ceil(bt) * hk * bt, 1.0);
            let q = rng.vec(ROWS * hk, 1.0);
            for k in crate::kernels::available() {
                let mut got = vec![f32::NAN; ROWS * n];
                scores_rows_with(k, &q, &kt, bt, 0.3, n, &mut got);
                for r in 0..ROWS {
                    for e in 0..n {
                        let want = (0..hk)
                            .map(|c| {
                                q[r * hk + c] as f64 * kt[((e / bt) * hk + c) * bt + e % bt] as f64
                            })
                            .sum::<f64>()
                            * 0.3;
                        let d = (got[r * n + e] as f64 - want).abs();
                        assert!(
                            d < 1e-4,
                            "{k:?} bt {bt} n {n} row {r} key {e}: {} vs {want}",
                            got[r * n + e]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn row_sums_equal_the_plain_softmax_on_every_simd_path() {
        let mut rng = crate::testutil::Rng(79);
        for n in [1usize, 15, 16, 17, 100] {
            let raw = rng.vec(n, 8.0);
            let (v0, s0) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
            let m = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = raw.iter().map(|&x| ((x - m) as f64).exp()).collect();
            let z: f64 = e.iter().sum();
            for k in crate::kernels::available() {
                let (mut row, mut v, mut s) = (raw.clone(), v0.clone(), s0.clone());
                accumulate_with(k, &mut row, &mut v, &mut s);
                for j in 0..n {
                    let w = e[j] / z;
                    assert!((row[j] as f64 - w).abs() < 1e-6, "{k:?} n {n}: w[{j}]");
                    assert!(
                        (v[j] as f64 - v0[j] as f64 - w).abs() < 1e-6,
                        "{k:?} n {n}: vert[{j}]"
                    );
                    let d = n - 1 - j;
                    assert!(
                        (s[d] as f64 - s0[d] as f64 - w).abs() < 1e-6,
                        "{k:?} n {n}: slash[{d}]"
                    );
                }
            }
        }
    }

    #[test]
    fn bit_runs_cover_exactly_the_set_bits() {
        let mut b = Bits::default();
        b.reset(300);
        b.set_range(3, 7);
        b.set_range(64, 200);
        b.set(250);
        b.set_range(299, 400);
        let mut got = Vec::new();
        b.runs(300, |lo, hi| got.push((lo, hi)));
        assert_eq!(got, vec![(3, 7), (64, 200), (250, 251), (299, 300)]);
        let mut got = Vec::new();
        b.runs(100, |lo, hi| got.push((lo, hi)));
        assert_eq!(got, vec![(3, 7), (64, 100)]);
        assert!(b.get(250) && !b.get(251));
        let mut d = Bits::default();
        d.reset(200);
        d.set(10);
        d.set(100);
        d.dilate(15);
        let mut got = Vec::new();
        d.runs(200, |lo, hi| got.push((lo, hi)));
        assert_eq!(got, vec![(10, 26), (100, 116)]);
        let mut r = Bits::default();
        d.reverse_into(&mut r);
        assert!(r.get(255 - 10) && r.get(255 - 25) && !r.get(255 - 26));
    }

    #[test]
    fn diagonals_and_a_shape_become_tile_ranges() {
        let pos: Vec<u32> = (100..132).collect();
        let mut plan = HeadPlan::default();
        plan.reset(132);
        plan.offs.set_range(0, 2); // the main diagonal and the one below
        plan.offs.set(50);
        plan.cols.set(7);
        let mut got: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 2];
        plan.emit_with(&pos, |t, lo, hi| got[t].push((lo, hi)));
        // Tile 0: rows 100..=115; offset 50 → keys 50..=65; offsets 0,1 → keys 99..=115; then groups of 32 keys with
        // at least 8 selected are read whole (32..64 holds 14, 96..128 holds 17; 0..32 and 64..96 stay as they are).
        assert_eq!(got[0], vec![(7, 8), (32, 66), (96, 116)]);
        // Tile 1: rows 116..=131; keys 66..=81 and 115..=131: 64..128 filled, 128..132 (4 keys) as is.
        assert_eq!(got[1], vec![(7, 8), (64, 132)]);
        plan.reset(132);
        plan.add_a_shape(4, 10);
        got = vec![Vec::new(); 2];
        plan.emit_with(&pos, |t, lo, hi| got[t].push((lo, hi)));
        assert_eq!(got[0], vec![(0, 4), (91, 116)]);
    }
}
