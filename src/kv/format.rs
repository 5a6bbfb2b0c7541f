//! Block formats: what one block holds, how attention and readers see it, and how entries move between formats.
//!
//! A block holds `block_tokens` entries of one stream in one of three formats ([`BlockData`]): f16, f32, or
//! KIVI-quantized ([`QBlock`]; the math is in [`quant`]). Independently, its keys may keep only some channels
//! (ThinK's compact format), which changes their row count, not their layout. The pair (quantized or not, stored key
//! channels) is a block's [`Shape`]: blocks of the same shape are interchangeable in the pool.
//!
//! Entries change format through the [`Stage`]: up to one block's entries are loaded from any format (keys as f32,
//! values as f32 rows or still-encoded rows of a quantized block) and stored into a block of any format.

use half::f16;

use super::offload::{DiskRef, Offload, OffloadBuf, THREAD_BUF};
use super::quant::{self, QBlock};
use super::{KvConfig, KvDtype};

/// Keys and values of one block. Keys are stored transposed, `k[d · block_tokens + slot]`, so attention scores a whole
/// block with contiguous vector loads; values are row-major, `v[slot · head_dim_v + d]`. A stream with pruned key
/// channels stores only its kept channels (`d` indexes [`BlockView::channels`]).
#[derive(Clone)]
pub enum BlockData {
    F16 {
        k: Box<[f16]>,
        v: Box<[f16]>,
    },
    F32 {
        k: Box<[f32]>,
        v: Box<[f32]>,
    },
    /// A KIVI-quantized full block.
    Quant(QBlock),
    /// An f16 block offloaded to the cache's file (see [`super::offload`]): read it with
    /// [`BlockView::read_offloaded`] (or the per-entry readers). Its positions stay in RAM.
    Disk(DiskRef),
}

#[derive(Clone)]
pub struct Block {
    pub data: BlockData,
    /// Absolute position of each entry (what RoPE was applied with), for masks.
    pub pos: Box<[u32]>,
}

/// What a block holds: quantized or not, and how many key channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) quant: bool,
    pub(super) hk: usize,
}

impl Shape {
    /// Bytes of a block of this shape (keys, values and positions).
    pub(super) fn bytes(self, cfg: &KvConfig) -> usize {
        if self.quant {
            cfg.quant_block_bytes(self.hk)
        } else {
            ((self.hk + cfg.head_dim_v) * cfg.dtype.bytes() + 4) * cfg.block_tokens
        }
    }
}

impl Block {
    /// Asks for the cache lines a write of entry `slot` touches in a full-precision block: its key (stored
    /// channel-major, one line per channel at 32 entries), its value row and its position. Nothing for other blocks.
    pub(super) fn prefetch_slot(&self, slot: usize, bt: usize) {
        fn entry<T>(k: &[T], v: &[T], slot: usize, bt: usize) {
            for i in (slot..k.len()).step_by(bt) {
                prefetch_lines(&k[i..i + 1]);
            }
            let hv = v.len() / bt;
            prefetch_lines(&v[slot * hv..(slot + 1) * hv]);
        }
        match &self.data {
            BlockData::F16 { k, v } => entry(k, v, slot, bt),
            BlockData::F32 { k, v } => entry(k, v, slot, bt),
            _ => return,
        }
        if let Some(p) = self.pos.get(slot..slot + 1) {
            prefetch_lines(p);
        }
    }

    /// A zeroed block of `shape`, full precision in `cfg.dtype` or quantized with its bits.
    pub(super) fn new(cfg: &KvConfig, shape: Shape) -> Self {
        let (bt, hv) = (cfg.block_tokens, cfg.head_dim_v);
        let data = if shape.quant {
            let bits = cfg.dtype.quant_bits().expect("quantized shape needs KIVI");
            BlockData::Quant(QBlock::new(bits, shape.hk, hv, bt))
        } else if cfg.dtype == KvDtype::F32 {
            BlockData::F32 {
                k: vec![0.0; bt * shape.hk].into_boxed_slice(),
                v: vec![0.0; bt * hv].into_boxed_slice(),
            }
        } else {
            BlockData::F16 {
                k: vec![f16::ZERO; bt * shape.hk].into_boxed_slice(),
                v: vec![f16::ZERO; bt * hv].into_boxed_slice(),
            }
        };
        Block {
            data,
            pos: vec![0; bt].into_boxed_slice(),
        }
    }

    /// The shape this block was made with (or pruned to), for blocks of `bt` entries.
    pub(super) fn shape(&self, bt: usize) -> Shape {
        match &self.data {
            BlockData::F16 { k, .. } => Shape {
                quant: false,
                hk: k.len() / bt,
            },
            BlockData::F32 { k, .. } => Shape {
                quant: false,
                hk: k.len() / bt,
            },
            BlockData::Quant(q) => Shape {
                quant: true,
                hk: q.k_ms.len() / 2,
            },
            BlockData::Disk(r) => Shape {
                quant: false,
                hk: r.hk as usize,
            },
        }
    }

    /// Writes entry `slot`: its position and its (key, value) rows, as [`Block::write_entry`] does.
    pub(super) fn write_at(
        &mut self,
        slot: usize,
        bt: usize,
        pos: u32,
        (k, v): (&[f32], &[f32]),
        channels: Option<&[u16]>,
    ) {
        self.pos[slot] = pos;
        self.write_entry(slot, bt, k, v, channels);
    }

    /// Writes one full-precision entry at `slot` (its position is the caller's); f16 → f32 → f16 round trips exactly,
    /// so moving entries loses nothing. `k` holds every channel; a stream with pruned channels stores only `channels`.
    pub(super) fn write_entry(
        &mut self,
        slot: usize,
        bt: usize,
        k: &[f32],
        v: &[f32],
        channels: Option<&[u16]>,
    ) {
        let hv = v.len();
        match &mut self.data {
            BlockData::F16 { k: bk, v: bv } => {
                use half::slice::HalfFloatSliceExt;
                // Whole rows convert with the vector instructions (the same rounding as f16::from_f32); a prefill
                // chunk appends thousands of entries per layer.
                const ROW: usize = 512;
                match channels {
                    None if k.len() <= ROW => {
                        let mut kh = [0u16; ROW];
                        crate::kernels::f32_to_f16_slice(k, &mut kh[..k.len()]);
                        for (d, &h) in kh[..k.len()].iter().enumerate() {
                            bk[d * bt + slot] = f16::from_bits(h);
                        }
                    }
                    None => k
                        .iter()
                        .enumerate()
                        .for_each(|(d, x)| bk[d * bt + slot] = f16::from_f32(*x)),
                    Some(ch) => ch
                        .iter()
                        .enumerate()
                        .for_each(|(d, &c)| bk[d * bt + slot] = f16::from_f32(k[c as usize])),
                }
                crate::kernels::f32_to_f16_slice(v, bv[slot * hv..][..hv].reinterpret_cast_mut());
            }
            BlockData::F32 { k: bk, v: bv } => {
                match channels {
                    None => k
                        .iter()
                        .enumerate()
                        .for_each(|(d, x)| bk[d * bt + slot] = *x),
                    Some(ch) => ch
                        .iter()
                        .enumerate()
                        .for_each(|(d, &c)| bk[d * bt + slot] = k[c as usize]),
                }
                bv[slot * hv..][..hv].copy_from_slice(v);
            }
            BlockData::Quant(_) | BlockData::Disk(_) => {
                unreachable!("entries are appended to full-precision blocks in RAM only")
            }
        }
    }

    /// Keeps only the stored key rows `rows` (indices into the stored channels, ascending), in a new smaller key
    /// buffer: the memory of the others is freed. Quantized keys keep their codes and per-channel (min, scale).
    pub(super) fn keep_key_rows(&mut self, rows: &[usize], bt: usize) {
        match &mut self.data {
            BlockData::F16 { k, .. } => *k = gather_rows(k, rows, bt),
            BlockData::F32 { k, .. } => *k = gather_rows(k, rows, bt),
            BlockData::Quant(q) => {
                let kb = bt * q.bits as usize / 8;
                q.k = gather_rows(&q.k, rows, kb);
                q.k_ms = gather_rows(&q.k_ms, rows, 2);
            }
            BlockData::Disk(_) => unreachable!("blocks are edited in RAM only"),
        }
    }
}

/// Copies rows `rows` (each `width` elements) of `src` into a new, smaller box.
fn gather_rows<T: Copy>(src: &[T], rows: &[usize], width: usize) -> Box<[T]> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&src[r * width..][..width]);
    }
    out.into_boxed_slice()
}

/// Asks for every cache line of `s` (a hint: nothing is loaded into registers, nothing faults).
#[inline]
pub(crate) fn prefetch_lines<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (p, n) = (s.as_ptr() as *const i8, std::mem::size_of_val(s));
        let mut o = 0;
        while o < n {
            // SAFETY: a prefetch is a hint; the address lies inside the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(o)) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// A view of one block of a stream: `n` valid entries.
pub struct BlockView<'a> {
    pub data: &'a BlockData,
    pub pos: &'a [u32],
    pub n: usize,
    /// Key channels stored per entry (`head_dim_k` unless the stream's key channels were pruned).
    pub hk: usize,
    /// Which of the model's key channels are stored, in order; None = all.
    pub channels: Option<&'a [u16]>,
    pub(super) bt: usize,
    pub(super) hv: usize,
    /// The cache's offload store (when offload is on): where a [`BlockData::Disk`] block is read from.
    pub(super) off: Option<&'a Offload>,
    /// The block's id in the pool (offload's LRU stamps it).
    pub(super) id: u32,
}

impl<'a> BlockView<'a> {
    /// Bytes one entry of this block takes (its share of the block's keys, values, scales and positions): what reading
    /// it costs. 0 for a block on disk: reading it is counted where the read happens, a whole slot at a time.
    pub fn entry_bytes(&self) -> usize {
        let data = match self.data {
            BlockData::F16 { k, v } => 2 * (k.len() + v.len()),
            BlockData::F32 { k, v } => 4 * (k.len() + v.len()),
            BlockData::Quant(q) => q.bytes(),
            BlockData::Disk(_) => return 0,
        };
        data / self.bt + 4
    }

    /// Asks the CPU to start loading the block's keys, values, scales and positions into its caches (a hint: no
    /// effect on results, nothing on other architectures). Blocks are separate allocations, so the hardware
    /// prefetchers, which follow one address stream, stop at every block's edge; the attention kernel calls this for
    /// the block after the one it folds, so the next block's bytes arrive while it computes.
    #[inline]
    pub fn prefetch(&self) {
        self.prefetch_parts(true)
    }

    /// [`BlockView::prefetch`] for a read of part of the block: an f16 block's keys whole (stored channel-major, a
    /// key touches every channel's line) and positions, but only the value rows of entries `[j0, j1)` of each of
    /// `parts`; any other block whole. A selection's 8-token page in a 32-entry block reads a quarter of its values,
    /// and asking for all of them spent bandwidth on rows no one reads.
    #[inline]
    pub fn prefetch_entries(&self, parts: impl Iterator<Item = (usize, usize)>) {
        match self.data {
            BlockData::F16 { k, v } => {
                prefetch_lines(&k[..]);
                prefetch_lines(self.pos);
                for (j0, j1) in parts {
                    prefetch_lines(&v[j0 * self.hv..j1 * self.hv]);
                }
            }
            _ => self.prefetch(),
        }
    }

    /// The scales and minima of a quantized block and the block's positions (what a 4-bit fold's preparation reads
    /// first); nothing for other blocks.
    #[inline]
    pub fn prefetch_scales(&self) {
        if let BlockData::Quant(q) = self.data {
            prefetch_lines(&q.k_ms[..]);
            prefetch_lines(&q.v_ms[..]);
            prefetch_lines(self.pos);
        }
    }

    /// Key and value codes of a quantized block (None otherwise).
    #[inline]
    pub fn quant_codes(&self) -> Option<(&'a [u8], &'a [u8])> {
        match self.data {
            BlockData::Quant(q) => Some((&q.k[..], &q.v[..])),
            _ => None,
        }
    }

    /// [`BlockView::prefetch`] of the keys (and their scales) only: for a selector that scores keys.
    #[inline]
    pub fn prefetch_keys(&self) {
        self.prefetch_parts(false)
    }

    /// [`BlockView::prefetch`] of the positions only: for a fold that prefetches the keys and values itself, a
    /// line at a time as it works ([`BlockView::f16_parts`]).
    #[inline]
    pub fn prefetch_pos(&self) {
        prefetch_lines(self.pos)
    }

    /// Keys and values of an f16 block in RAM (None otherwise).
    #[inline]
    pub fn f16_parts(&self) -> Option<(&'a [f16], &'a [f16])> {
        match self.data {
            BlockData::F16 { k, v } => Some((&k[..], &v[..])),
            _ => None,
        }
    }

    #[inline]
    fn prefetch_parts(&self, values: bool) {
        match self.data {
            BlockData::F16 { k, v } => {
                prefetch_lines(&k[..]);
                if values {
                    prefetch_lines(&v[..]);
                }
            }
            BlockData::F32 { k, v } => {
                prefetch_lines(&k[..]);
                if values {
                    prefetch_lines(&v[..]);
                }
            }
            BlockData::Quant(q) => {
                // The scales first: a 4-bit fold's preparation reads them before any code (measured on 1 and 8
                // streams of kivi4 decode: attention 14.8 -> 13.6 ms per 8-stream step, 3 alternations).
                prefetch_lines(&q.k_ms[..]);
                if values {
                    prefetch_lines(&q.v_ms[..]);
                }
                prefetch_lines(&q.k[..]);
                if values {
                    prefetch_lines(&q.v[..]);
                }
            }
            BlockData::Disk(_) => {}
        }
        if values {
            prefetch_lines(self.pos);
        }
    }

    /// Marks the block as read by attention in this step, for offload's LRU (nothing without offload): the attention
    /// kernel calls it for every block it folds. Other readers (selectors scoring keys, compression) do not: the
    /// blocks kept in RAM are the ones attention reads.
    #[inline]
    pub fn mark_read(&self) {
        if let Some(o) = self.off {
            o.touch(self.id);
        }
    }

    /// Keys (hk × block_tokens, transposed as in an f16 block) and values (block_tokens × hv) of a block on disk,
    /// read into `buf` (nothing is read if `buf` already holds this block); None for a block in RAM. A failed read
    /// reads as zeros and is recorded in the cache, whose next [`super::KvCache::rebalance`] reports it.
    pub fn read_offloaded<'b>(&self, buf: &'b mut OffloadBuf) -> Option<(&'b [f16], &'b [f16])> {
        match self.data {
            BlockData::Disk(r) => Some(buf.load(self.off.expect("a disk block has a store"), r)),
            _ => None,
        }
    }

    /// Runs `f` on this disk block's (keys, values), read through this thread's one-block buffer.
    fn with_disk<R>(&self, r: &DiskRef, f: impl FnOnce(&[f16], &[f16]) -> R) -> R {
        let off = self.off.expect("a disk block has a store");
        THREAD_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let (k, v) = b.load(off, r);
            f(k, v)
        })
    }

    /// Key of entry `j` as f32, all `head_dim_k` channels (pruned channels read as 0).
    pub fn read_key(&self, j: usize, out: &mut [f32]) {
        let bt = self.bt;
        if let BlockData::Disk(r) = self.data {
            return self.with_disk(r, |k, _| {
                out.iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x = k[c * bt + j].to_f32())
            });
        }
        if let (BlockData::F16 { k, .. }, None) = (self.data, self.channels) {
            // The strided halves gathered first, then converted in one vector call: selectors read keys one by one
            // from the middle of the cache, and a per-element conversion (a feature check and a call each) was most
            // of their cost.
            let mut bits = [0u16; 64];
            for (c0, chunk) in (0..out.len()).step_by(64).zip(out.chunks_mut(64)) {
                let b = &mut bits[..chunk.len()];
                for (i, x) in b.iter_mut().enumerate() {
                    *x = k[(c0 + i) * bt + j].to_bits();
                }
                crate::kernels::f16_to_f32_slice(b, chunk);
            }
            return;
        }
        let stored = |c: usize| match self.data {
            BlockData::F16 { k, .. } => k[c * bt + j].to_f32(),
            BlockData::F32 { k, .. } => k[c * bt + j],
            BlockData::Quant(q) => {
                let kb = bt * q.bits as usize / 8;
                quant::decode_one(
                    &q.k[c * kb..][..kb],
                    q.bits,
                    q.k_ms[2 * c],
                    q.k_ms[2 * c + 1],
                    j,
                )
            }
            BlockData::Disk(_) => unreachable!("read above"),
        };
        match self.channels {
            None => out.iter_mut().enumerate().for_each(|(c, x)| *x = stored(c)),
            Some(ch) => {
                out.fill(0.0);
                for (i, &c) in ch.iter().enumerate() {
                    out[c as usize] = stored(i);
                }
            }
        }
    }

    /// Value row of entry `j` as f32.
    pub fn read_value(&self, j: usize, out: &mut [f32]) {
        let hv = self.hv;
        match self.data {
            BlockData::F16 { v, .. } => out
                .iter_mut()
                .zip(&v[j * hv..][..hv])
                .for_each(|(o, x)| *o = x.to_f32()),
            BlockData::F32 { v, .. } => out.copy_from_slice(&v[j * hv..][..hv]),
            BlockData::Quant(q) => q.value(j, out),
            BlockData::Disk(r) => self.with_disk(r, |_, v| {
                out.iter_mut()
                    .zip(&v[j * hv..][..hv])
                    .for_each(|(o, x)| *o = x.to_f32())
            }),
        }
    }
}

/// One block's entries in flux (moving between blocks or changing format): keys as f32 (transposed like a block's,
/// `k[c · block_tokens + slot]`), values as f32 rows or as the codes of a quantized row (copied unchanged into another
/// quantized block). Sized once for a whole block with every key channel, so staging allocates nothing.
#[derive(Clone, Default)]
pub(super) struct Stage {
    k: Vec<f32>,
    v: Vec<f32>,
    vq: Vec<u8>,
    vms: Vec<f16>,
    /// Slot `w` holds its value as codes (`vq`, `vms`) rather than as an f32 row.
    coded: Vec<bool>,
    pos: Vec<u32>,
}

impl Stage {
    pub(super) fn new(cfg: &KvConfig) -> Self {
        let (bt, hk, hv) = (cfg.block_tokens, cfg.head_dim_k, cfg.head_dim_v);
        Stage {
            k: vec![0.0; hk * bt],
            v: vec![0.0; bt * hv],
            vq: vec![0; bt * quant::row_bytes(hv, 8)],
            vms: vec![f16::ZERO; 2 * bt * quant::value_groups(hv)],
            coded: vec![false; bt],
            pos: vec![0; bt],
        }
    }

    /// Loads entry `j` of `b` (keys with `hk` stored channels) into slot `w`.
    pub(super) fn load(&mut self, cfg: &KvConfig, hk: usize, b: &Block, j: usize, w: usize) {
        let (bt, hv) = (cfg.block_tokens, cfg.head_dim_v);
        self.pos[w] = b.pos[j];
        match &b.data {
            BlockData::F16 { k, v } => {
                for c in 0..hk {
                    self.k[c * bt + w] = k[c * bt + j].to_f32();
                }
                for (x, y) in self.v[w * hv..][..hv].iter_mut().zip(&v[j * hv..][..hv]) {
                    *x = y.to_f32();
                }
                self.coded[w] = false;
            }
            BlockData::F32 { k, v } => {
                for c in 0..hk {
                    self.k[c * bt + w] = k[c * bt + j];
                }
                self.v[w * hv..][..hv].copy_from_slice(&v[j * hv..][..hv]);
                self.coded[w] = false;
            }
            BlockData::Quant(q) => {
                let kb = bt * q.bits as usize / 8;
                for c in 0..hk {
                    let (m, s) = (q.k_ms[2 * c], q.k_ms[2 * c + 1]);
                    self.k[c * bt + w] = quant::decode_one(&q.k[c * kb..][..kb], q.bits, m, s, j);
                }
                let rb = quant::row_bytes(hv, q.bits);
                let ng = quant::value_groups(hv);
                self.vq[w * rb..][..rb].copy_from_slice(&q.v[j * rb..][..rb]);
                self.vms[2 * w * ng..][..2 * ng].copy_from_slice(&q.v_ms[2 * j * ng..][..2 * ng]);
                self.coded[w] = true;
            }
            BlockData::Disk(_) => unreachable!("blocks are staged from RAM only"),
        }
    }

    /// Replaces slot `slot`'s key and value (its position stays) with a new entry: `k` holds every channel, of which
    /// a stream with pruned channels keeps `channels`.
    pub(super) fn put(
        &mut self,
        cfg: &KvConfig,
        slot: usize,
        k: &[f32],
        v: &[f32],
        channels: Option<&[u16]>,
    ) {
        let (bt, hv) = (cfg.block_tokens, cfg.head_dim_v);
        match channels {
            None => k
                .iter()
                .enumerate()
                .for_each(|(c, &x)| self.k[c * bt + slot] = x),
            Some(ch) => ch
                .iter()
                .enumerate()
                .for_each(|(i, &c)| self.k[i * bt + slot] = k[c as usize]),
        }
        self.v[slot * hv..][..hv].copy_from_slice(v);
        self.coded[slot] = false;
    }

    /// Stores slots `[0, n)` into `b` (keys with `hk` stored channels), in `b`'s format: f16/f32 blocks take the
    /// values decoded, a quantized block (only ever a full one) quantizes the keys per channel over the block and
    /// takes coded value rows unchanged.
    pub(super) fn store(&mut self, cfg: &KvConfig, hk: usize, b: &mut Block, n: usize) {
        let (bt, hv) = (cfg.block_tokens, cfg.head_dim_v);
        b.pos[..n].copy_from_slice(&self.pos[..n]);
        let bits = cfg.dtype.quant_bits().unwrap_or(8);
        let (rb, ng) = (quant::row_bytes(hv, bits), quant::value_groups(hv));
        // Coded value rows going into a full-precision block: decode them into the f32 rows first.
        if !matches!(b.data, BlockData::Quant(_)) {
            for w in 0..n {
                if self.coded[w] {
                    let vq = &self.vq[w * rb..][..rb];
                    let ms = &self.vms[2 * w * ng..][..2 * ng];
                    let row = &mut self.v[w * hv..][..hv];
                    for g in 0..ng {
                        let d0 = g * quant::VALUE_GROUP;
                        let d1 = (d0 + quant::VALUE_GROUP).min(hv);
                        let b0 = d0 * bits as usize / 8;
                        quant::decode_group(
                            &vq[b0..],
                            bits,
                            ms[2 * g],
                            ms[2 * g + 1],
                            &mut row[d0..d1],
                        );
                    }
                }
            }
        }
        match &mut b.data {
            BlockData::F16 { k, v } => {
                for c in 0..hk {
                    for w in 0..n {
                        k[c * bt + w] = f16::from_f32(self.k[c * bt + w]);
                    }
                }
                for (y, x) in v[..n * hv].iter_mut().zip(&self.v[..n * hv]) {
                    *y = f16::from_f32(*x);
                }
            }
            BlockData::F32 { k, v } => {
                for c in 0..hk {
                    k[c * bt..][..n].copy_from_slice(&self.k[c * bt..][..n]);
                }
                v[..n * hv].copy_from_slice(&self.v[..n * hv]);
            }
            BlockData::Disk(_) => unreachable!("blocks are stored into RAM only"),
            BlockData::Quant(q) => {
                debug_assert_eq!(n, bt, "only full blocks are quantized");
                let kb = bt * q.bits as usize / 8;
                for c in 0..hk {
                    let (m, s) = quant::encode_group(
                        &self.k[c * bt..][..bt],
                        q.bits,
                        &mut q.k[c * kb..][..kb],
                    );
                    q.k_ms[2 * c] = m;
                    q.k_ms[2 * c + 1] = s;
                }
                for w in 0..n {
                    if self.coded[w] {
                        q.v[w * rb..][..rb].copy_from_slice(&self.vq[w * rb..][..rb]);
                        q.v_ms[2 * w * ng..][..2 * ng]
                            .copy_from_slice(&self.vms[2 * w * ng..][..2 * ng]);
                    } else {
                        q.encode_value(w, &self.v[w * hv..][..hv]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn cfg(dtype: KvDtype, hk: usize, hv: usize) -> KvConfig {
        KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: hk,
            head_dim_v: hv,
            block_tokens: 4,
            dtype,
            windows: Vec::new(),
        }
    }

    fn view<'a>(cfg: &KvConfig, b: &'a Block, channels: Option<&'a [u16]>) -> BlockView<'a> {
        BlockView {
            data: &b.data,
            pos: &b.pos,
            n: cfg.block_tokens,
            hk: b.shape(cfg.block_tokens).hk,
            channels,
            bt: cfg.block_tokens,
            hv: cfg.head_dim_v,
            off: None,
            id: 0,
        }
    }

    /// Key and value of entry `j`, all channels, through the public readers.
    fn entry(v: &BlockView, hk: usize, j: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut k, mut x) = (vec![0.0; hk], vec![0.0; v.hv]);
        v.read_key(j, &mut k);
        v.read_value(j, &mut x);
        (k, x)
    }

    #[test]
    fn compact_key_channels_store_only_the_kept_ones() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let c = cfg(dtype, 4, 3);
            let shape = Shape {
                quant: false,
                hk: 2,
            };
            let mut b = Block::new(&c, shape);
            assert_eq!(b.shape(4), shape);
            let ch = [1u16, 3];
            b.write_entry(1, 4, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0], Some(&ch));
            let (k, v) = entry(&view(&c, &b, Some(&ch)), 4, 1);
            assert_eq!(k, [0.0, 2.0, 0.0, 4.0]);
            assert_eq!(v, [5.0, 6.0, 7.0]);
            let bytes = shape.bytes(&c);
            assert_eq!(bytes, (2 + 3) * dtype.bytes() * 4 + 4 * 4);
        }
    }

    #[test]
    fn stage_converts_between_formats() {
        let (hk, hv) = (4, 70);
        let c = cfg(
            KvDtype::Kivi {
                bits: 4,
                residual: 0,
            },
            hk,
            hv,
        );
        let (full, quant) = (Shape { quant: false, hk }, Shape { quant: true, hk });
        let mut rng = Rng(7);
        let mut f1 = Block::new(&c, full);
        for j in 0..4 {
            f1.pos[j] = 10 + j as u32;
            f1.write_entry(j, 4, &rng.vec(hk, 1.0), &rng.vec(hv, 1.0), None);
        }
        let mut st = Stage::new(&c);
        // f16 → quantized.
        let mut q1 = Block::new(&c, quant);
        (0..4).for_each(|j| st.load(&c, hk, &f1, j, j));
        st.store(&c, hk, &mut q1, 4);
        assert_eq!(&q1.pos[..], &f1.pos[..]);
        // Quantized → quantized: value rows move as codes, unchanged.
        let mut q2 = Block::new(&c, quant);
        (0..4).for_each(|j| st.load(&c, hk, &q1, j, j));
        st.store(&c, hk, &mut q2, 4);
        let (BlockData::Quant(a), BlockData::Quant(b)) = (&q1.data, &q2.data) else {
            unreachable!()
        };
        assert_eq!((&a.v, &a.v_ms), (&b.v, &b.v_ms));
        // Quantized → f16: every entry reads back as its dequantized value, rounded to f16.
        let mut f2 = Block::new(&c, full);
        (0..4).for_each(|j| st.load(&c, hk, &q1, j, j));
        st.store(&c, hk, &mut f2, 4);
        let (vq, vf) = (view(&c, &q1, None), view(&c, &f2, None));
        for j in 0..4 {
            let (kq, xq) = entry(&vq, hk, j);
            let (kf, xf) = entry(&vf, hk, j);
            let r = |x: &Vec<f32>| {
                x.iter()
                    .map(|&y| f16::from_f32(y).to_f32())
                    .collect::<Vec<_>>()
            };
            assert_eq!((r(&kq), r(&xq)), (kf, xf), "entry {j}");
        }
        // A new entry put into a staged slot replaces its coded value.
        (0..4).for_each(|j| st.load(&c, hk, &q1, j, j));
        let (k, v) = (rng.vec(hk, 1.0), rng.vec(hv, 1.0));
        st.put(&c, 2, &k, &v, None);
        st.store(&c, hk, &mut f2, 4);
        let (_, x) = entry(&view(&c, &f2, None), hk, 2);
        assert_eq!(
            x,
            v.iter()
                .map(|&y| f16::from_f32(y).to_f32())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn keeping_key_rows_keeps_their_values() {
        let (hk, hv) = (8, 4);
        for dtype in [
            KvDtype::F16,
            KvDtype::Kivi {
                bits: 2,
                residual: 0,
            },
        ] {
            let c = cfg(dtype, hk, hv);
            let shape = Shape {
                quant: dtype != KvDtype::F16,
                hk,
            };
            let mut rng = Rng(9);
            let mut src = Block::new(&c, Shape { quant: false, hk });
            for j in 0..4 {
                src.write_entry(j, 4, &rng.vec(hk, 1.0), &rng.vec(hv, 1.0), None);
            }
            let mut b = Block::new(&c, shape);
            let mut st = Stage::new(&c);
            (0..4).for_each(|j| st.load(&c, hk, &src, j, j));
            st.store(&c, hk, &mut b, 4);
            let before: Vec<_> = (0..4).map(|j| entry(&view(&c, &b, None), hk, j)).collect();
            b.keep_key_rows(&[2, 5], 4);
            assert_eq!(b.shape(4), Shape { hk: 2, ..shape });
            let ch = [2u16, 5];
            for (j, (k0, v0)) in before.iter().enumerate() {
                let (k, v) = entry(&view(&c, &b, Some(&ch)), hk, j);
                assert_eq!(&v, v0);
                for d in 0..hk {
                    assert_eq!(k[d], if ch.contains(&(d as u16)) { k0[d] } else { 0.0 });
                }
            }
        }
    }
}
