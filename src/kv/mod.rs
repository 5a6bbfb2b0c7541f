//! The KV cache: paged, per layer and KV head, with a byte counter that is the truth about memory.
//!
//! Every (layer, KV head) pair owns a *stream*: an ordered list of fixed-size blocks ("pages") of `block_tokens` entries.
//! An entry is one cached token of that head: its key (after RoPE), its value, and its absolute position.
//! Streams are independent, so later work can drop tokens from one head only, give heads different lengths,
//! swap a block's storage format (quantized blocks) or move pages elsewhere, without touching the attention interface:
//! attention walks a stream block by block through [`KvCache::blocks`].
//!
//! Blocks come from a pool. A block is allocated the first time a stream needs one and returned to the pool's free list
//! when a stream is truncated or cleared; [`KvCache::trim`] gives free blocks back to the allocator. The byte counter
//! counts every block that exists (in use or free), so it is the memory this cache really holds.

use half::f16;

/// Storage type of cached keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            _ => anyhow::bail!("unknown KV cache type '{s}' (valid: f16, f32)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct KvConfig {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub block_tokens: usize,
    pub dtype: KvDtype,
}

impl KvConfig {
    /// Bytes of one cached token in one stream (key + value + position).
    pub fn entry_bytes(&self) -> usize {
        (self.head_dim_k + self.head_dim_v) * self.dtype.bytes() + 4
    }
    /// Bytes one token costs across all layers and heads.
    pub fn bytes_per_token(&self) -> usize {
        self.entry_bytes() * self.n_layers * self.n_kv_heads
    }
    pub fn block_bytes(&self) -> usize {
        self.entry_bytes() * self.block_tokens
    }
}

/// Keys and values of one block. Keys are stored transposed, `k[d · block_tokens + slot]`, so attention scores a whole
/// block with contiguous vector loads; values are row-major, `v[slot · head_dim_v + d]`.
#[derive(Clone)]
pub enum BlockData {
    F16 { k: Box<[f16]>, v: Box<[f16]> },
    F32 { k: Box<[f32]>, v: Box<[f32]> },
}

#[derive(Clone)]
pub struct Block {
    pub data: BlockData,
    /// Absolute position of each entry (what RoPE was applied with), for masks.
    pub pos: Box<[u32]>,
}

/// A view of one block of a stream: `n` valid entries.
pub struct BlockView<'a> {
    pub data: &'a BlockData,
    pub pos: &'a [u32],
    pub n: usize,
}

#[derive(Clone, Default)]
struct Stream {
    blocks: Vec<u32>,
    len: usize,
}

#[derive(Clone)]
pub struct KvCache {
    pub cfg: KvConfig,
    blocks: Vec<Option<Block>>,
    free: Vec<u32>,
    streams: Vec<Stream>,
    live_blocks: usize,
    peak_bytes: usize,
}

/// Block sizes the attention kernel is compiled for.
pub const BLOCK_TOKEN_CHOICES: [usize; 5] = [4, 8, 16, 32, 64];

impl KvCache {
    /// Panics if `cfg.block_tokens` is not one of [`BLOCK_TOKEN_CHOICES`] (a programming error, not user input).
    pub fn new(cfg: KvConfig) -> Self {
        assert!(
            BLOCK_TOKEN_CHOICES.contains(&cfg.block_tokens),
            "block_tokens {} not in {BLOCK_TOKEN_CHOICES:?}",
            cfg.block_tokens
        );
        let streams = vec![Stream::default(); cfg.n_layers * cfg.n_kv_heads];
        Self {
            cfg,
            blocks: Vec::new(),
            free: Vec::new(),
            streams,
            live_blocks: 0,
            peak_bytes: 0,
        }
    }

    /// Allocates blocks up front for `tokens` entries in every stream, so that filling them later allocates nothing.
    pub fn reserve(&mut self, tokens: usize) {
        let per_stream = tokens.div_ceil(self.cfg.block_tokens);
        let have: usize =
            self.streams.iter().map(|s| s.blocks.len()).sum::<usize>() + self.free.len();
        let want = per_stream * self.streams.len();
        for _ in have..want {
            let id = self.new_block();
            self.free.push(id);
        }
        for s in &mut self.streams {
            s.blocks.reserve(per_stream.saturating_sub(s.blocks.len()));
        }
    }

    fn new_block(&mut self) -> u32 {
        let bt = self.cfg.block_tokens;
        let data = match self.cfg.dtype {
            KvDtype::F16 => BlockData::F16 {
                k: vec![f16::ZERO; bt * self.cfg.head_dim_k].into_boxed_slice(),
                v: vec![f16::ZERO; bt * self.cfg.head_dim_v].into_boxed_slice(),
            },
            KvDtype::F32 => BlockData::F32 {
                k: vec![0.0; bt * self.cfg.head_dim_k].into_boxed_slice(),
                v: vec![0.0; bt * self.cfg.head_dim_v].into_boxed_slice(),
            },
        };
        let block = Block {
            data,
            pos: vec![0; bt].into_boxed_slice(),
        };
        self.live_blocks += 1;
        self.peak_bytes = self.peak_bytes.max(self.bytes());
        // Reuse a hole left by trim() if any.
        if let Some(i) = self.blocks.iter().position(Option::is_none) {
            self.blocks[i] = Some(block);
            i as u32
        } else {
            self.blocks.push(Some(block));
            (self.blocks.len() - 1) as u32
        }
    }

    fn take_block(&mut self) -> u32 {
        match self.free.pop() {
            Some(id) => id,
            None => self.new_block(),
        }
    }

    fn stream_index(&self, layer: usize, head: usize) -> usize {
        layer * self.cfg.n_kv_heads + head
    }

    /// Number of entries cached for (layer, KV head).
    pub fn len(&self, layer: usize, head: usize) -> usize {
        self.streams[self.stream_index(layer, head)].len
    }

    /// Largest stream length (= tokens seen, while nothing has been evicted).
    pub fn max_len(&self) -> usize {
        self.streams.iter().map(|s| s.len).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.max_len() == 0
    }

    /// Appends `n` entries to every KV head of `layer`.
    /// `k`: n × (n_kv_heads · head_dim_k) row-major (the layout the K projection produces); `v` likewise.
    pub fn append(&mut self, layer: usize, pos: &[u32], k: &[f32], v: &[f32]) {
        let (hk, hv, nh, bt) = (
            self.cfg.head_dim_k,
            self.cfg.head_dim_v,
            self.cfg.n_kv_heads,
            self.cfg.block_tokens,
        );
        let n = pos.len();
        debug_assert_eq!(k.len(), n * nh * hk);
        debug_assert_eq!(v.len(), n * nh * hv);
        for h in 0..nh {
            let si = self.stream_index(layer, h);
            for t in 0..n {
                let len = self.streams[si].len;
                if len.is_multiple_of(bt) && len / bt == self.streams[si].blocks.len() {
                    let id = self.take_block();
                    self.streams[si].blocks.push(id);
                }
                let id = self.streams[si].blocks[len / bt] as usize;
                let slot = len % bt;
                let block = self.blocks[id]
                    .as_mut()
                    .expect("stream points at a live block");
                block.pos[slot] = pos[t];
                let krow = &k[(t * nh + h) * hk..][..hk];
                let vrow = &v[(t * nh + h) * hv..][..hv];
                write_entry(block, slot, bt, krow, vrow);
                self.streams[si].len += 1;
            }
        }
    }

    /// The blocks of (layer, KV head), in order, each with its count of valid entries.
    pub fn blocks(&self, layer: usize, head: usize) -> impl Iterator<Item = BlockView<'_>> + '_ {
        let s = &self.streams[self.stream_index(layer, head)];
        let bt = self.cfg.block_tokens;
        s.blocks.iter().enumerate().map(move |(i, &id)| {
            let b = self.blocks[id as usize]
                .as_ref()
                .expect("stream points at a live block");
            let n = (s.len - i * bt).min(bt);
            BlockView {
                data: &b.data,
                pos: &b.pos[..n],
                n,
            }
        })
    }

    /// Number of blocks of (layer, KV head).
    pub fn n_blocks(&self, layer: usize, head: usize) -> usize {
        self.streams[self.stream_index(layer, head)].blocks.len()
    }

    /// Keeps the first `len` entries of every stream; whole blocks past the end go back to the free list.
    pub fn truncate(&mut self, len: usize) {
        let bt = self.cfg.block_tokens;
        for si in 0..self.streams.len() {
            let s = &mut self.streams[si];
            if s.len <= len {
                continue;
            }
            s.len = len;
            let keep = len.div_ceil(bt);
            let freed: Vec<u32> = s.blocks.drain(keep..).collect();
            self.free.extend(freed);
        }
    }

    /// Drops every entry whose position is ≥ `pos` (entries of a stream are in position order), in every stream.
    pub fn truncate_pos(&mut self, pos: u32) {
        let bt = self.cfg.block_tokens;
        for si in 0..self.streams.len() {
            let s = &self.streams[si];
            // Entries are sorted by position: binary search over the stream.
            let (mut lo, mut hi) = (0usize, s.len);
            while lo < hi {
                let mid = (lo + hi) / 2;
                let id = s.blocks[mid / bt] as usize;
                let p = self.blocks[id].as_ref().expect("live block").pos[mid % bt];
                if p < pos {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let s = &mut self.streams[si];
            if lo < s.len {
                s.len = lo;
                let freed: Vec<u32> = s.blocks.drain(lo.div_ceil(bt)..).collect();
                self.free.extend(freed);
            }
        }
    }

    /// Keeps only the entries of (layer, KV head) for which `keep(index, position)` is true, in order, and returns
    /// whole blocks emptied at the end to the free list. Other heads are untouched, so heads can hold different
    /// numbers of tokens: this is how eviction methods drop entries from one head only.
    pub fn retain(&mut self, layer: usize, head: usize, mut keep: impl FnMut(usize, u32) -> bool) {
        let (hk, hv, bt) = (
            self.cfg.head_dim_k,
            self.cfg.head_dim_v,
            self.cfg.block_tokens,
        );
        let si = self.stream_index(layer, head);
        let len = self.streams[si].len;
        let mut kbuf = vec![0.0f32; hk];
        let mut vbuf = vec![0.0f32; hv];
        let mut w = 0;
        for i in 0..len {
            let (src_id, src_slot) = (self.streams[si].blocks[i / bt] as usize, i % bt);
            let pos = self.blocks[src_id].as_ref().expect("live block").pos[src_slot];
            if !keep(i, pos) {
                continue;
            }
            if w != i {
                let src = self.blocks[src_id].as_ref().expect("live block");
                read_entry(src, src_slot, bt, &mut kbuf, &mut vbuf);
                let dst_id = self.streams[si].blocks[w / bt] as usize;
                let dst = self.blocks[dst_id].as_mut().expect("live block");
                write_entry(dst, w % bt, bt, &kbuf, &vbuf);
                dst.pos[w % bt] = pos;
            }
            w += 1;
        }
        let s = &mut self.streams[si];
        s.len = w;
        let freed: Vec<u32> = s.blocks.drain(w.div_ceil(bt)..).collect();
        self.free.extend(freed);
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Reads entry `idx` of (layer, KV head) as f32 (`k`: head_dim_k, `v`: head_dim_v) and returns its position.
    pub fn read(&self, layer: usize, head: usize, idx: usize, k: &mut [f32], v: &mut [f32]) -> u32 {
        let bt = self.cfg.block_tokens;
        let s = &self.streams[self.stream_index(layer, head)];
        assert!(
            idx < s.len,
            "entry {idx} past the stream's {} entries",
            s.len
        );
        let b = self.blocks[s.blocks[idx / bt] as usize]
            .as_ref()
            .expect("live block");
        read_entry(b, idx % bt, bt, k, v);
        b.pos[idx % bt]
    }

    /// Overwrites the key and value of entry `idx` of (layer, KV head); its position stays. Merging methods use this
    /// to fold dropped entries into kept ones.
    pub fn write(&mut self, layer: usize, head: usize, idx: usize, k: &[f32], v: &[f32]) {
        let bt = self.cfg.block_tokens;
        let si = self.stream_index(layer, head);
        let s = &self.streams[si];
        assert!(
            idx < s.len,
            "entry {idx} past the stream's {} entries",
            s.len
        );
        let id = s.blocks[idx / bt] as usize;
        let b = self.blocks[id].as_mut().expect("live block");
        write_entry(b, idx % bt, bt, k, v);
    }

    /// Gives free blocks back to the allocator (the byte counter drops accordingly).
    pub fn trim(&mut self) {
        for id in self.free.drain(..) {
            self.blocks[id as usize] = None;
            self.live_blocks -= 1;
        }
    }

    /// Bytes this cache holds right now (all existing blocks, used or free).
    pub fn bytes(&self) -> usize {
        self.live_blocks * self.cfg.block_bytes()
    }

    /// Bytes of the entries in use.
    pub fn used_bytes(&self) -> usize {
        self.streams.iter().map(|s| s.len).sum::<usize>() * self.cfg.entry_bytes()
    }

    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    pub fn reset_peak(&mut self) {
        self.peak_bytes = self.bytes();
    }
}

fn read_entry(b: &Block, slot: usize, bt: usize, k: &mut [f32], v: &mut [f32]) {
    let hv = v.len();
    match &b.data {
        BlockData::F16 { k: bk, v: bv } => {
            for (d, x) in k.iter_mut().enumerate() {
                *x = bk[d * bt + slot].to_f32();
            }
            for (x, y) in v.iter_mut().zip(&bv[slot * hv..][..hv]) {
                *x = y.to_f32();
            }
        }
        BlockData::F32 { k: bk, v: bv } => {
            for (d, x) in k.iter_mut().enumerate() {
                *x = bk[d * bt + slot];
            }
            v.copy_from_slice(&bv[slot * hv..][..hv]);
        }
    }
}

/// Writes one entry; f16 → f32 → f16 round trips exactly, so moving entries loses nothing.
fn write_entry(b: &mut Block, slot: usize, bt: usize, k: &[f32], v: &[f32]) {
    let hv = v.len();
    match &mut b.data {
        BlockData::F16 { k: bk, v: bv } => {
            for (d, x) in k.iter().enumerate() {
                bk[d * bt + slot] = f16::from_f32(*x);
            }
            for (y, x) in bv[slot * hv..][..hv].iter_mut().zip(v) {
                *y = f16::from_f32(*x);
            }
        }
        BlockData::F32 { k: bk, v: bv } => {
            for (d, x) in k.iter().enumerate() {
                bk[d * bt + slot] = *x;
            }
            bv[slot * hv..][..hv].copy_from_slice(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dtype: KvDtype) -> KvConfig {
        KvConfig {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim_k: 4,
            head_dim_v: 3,
            block_tokens: 4,
            dtype,
        }
    }

    #[test]
    fn append_read_back_and_count_bytes() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let mut c = KvCache::new(cfg(dtype));
            assert_eq!(c.bytes(), 0);
            let n = 6;
            let pos: Vec<u32> = (10..10 + n as u32).collect();
            let k: Vec<f32> = (0..n * 2 * 4).map(|i| i as f32 * 0.5).collect();
            let v: Vec<f32> = (0..n * 2 * 3).map(|i| -(i as f32)).collect();
            c.append(1, &pos, &k, &v);
            assert_eq!(c.len(1, 0), 6);
            assert_eq!(c.len(0, 0), 0);
            // 2 heads × 2 blocks each.
            assert_eq!(c.bytes(), 4 * c.cfg.block_bytes());
            let mut seen = 0;
            for b in c.blocks(1, 1) {
                for i in 0..b.n {
                    let t = seen + i;
                    assert_eq!(b.pos[i], 10 + t as u32);
                    let (k0, v0) = match b.data {
                        BlockData::F16 { k, v } => (k[i].to_f32(), v[i * 3 + 2].to_f32()),
                        BlockData::F32 { k, v } => (k[i], v[i * 3 + 2]),
                    };
                    assert_eq!(k0, ((t * 2 + 1) * 4) as f32 * 0.5);
                    assert_eq!(v0, -(((t * 2 + 1) * 3 + 2) as f32));
                }
                seen += b.n;
            }
            assert_eq!(seen, 6);
            c.truncate(3);
            assert_eq!(c.len(1, 1), 3);
            let before = c.bytes();
            c.trim();
            assert_eq!(c.bytes(), before - 2 * c.cfg.block_bytes());
            assert!(c.peak_bytes() >= before);
        }
    }

    #[test]
    fn retain_drops_entries_from_one_head_only() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let mut c = KvCache::new(cfg(dtype));
            let n = 11;
            let pos: Vec<u32> = (0..n as u32).collect();
            let k: Vec<f32> = (0..n * 2 * 4).map(|i| i as f32).collect();
            let v: Vec<f32> = (0..n * 2 * 3).map(|i| 1000.0 + i as f32).collect();
            c.append(0, &pos, &k, &v);
            let before = c.bytes();
            // Keep positions 0, 3, 6, 9 of head 1.
            c.retain(0, 1, |_, p| p % 3 == 0);
            assert_eq!(c.len(0, 1), 4);
            assert_eq!(c.len(0, 0), 11);
            let mut got = Vec::new();
            for b in c.blocks(0, 1) {
                for i in 0..b.n {
                    let (k1, v2) = match b.data {
                        BlockData::F16 { k, v } => (k[4 + i].to_f32(), v[i * 3 + 2].to_f32()),
                        BlockData::F32 { k, v } => (k[4 + i], v[i * 3 + 2]),
                    };
                    got.push((b.pos[i], k1, v2));
                }
            }
            let want: Vec<(u32, f32, f32)> = [0u32, 3, 6, 9]
                .iter()
                .map(|&p| {
                    (
                        p,
                        ((p as usize * 2 + 1) * 4 + 1) as f32,
                        1000.0 + ((p as usize * 2 + 1) * 3 + 2) as f32,
                    )
                })
                .collect();
            assert_eq!(got, want);
            // Head 1 went from 3 blocks to 1: two blocks are free, and trim returns them.
            c.trim();
            assert_eq!(c.bytes(), before - 2 * c.cfg.block_bytes());
        }
    }

    #[test]
    fn truncate_pos_cuts_each_stream_at_a_position() {
        let mut c = KvCache::new(cfg(KvDtype::F32));
        let pos: Vec<u32> = (0..11).collect();
        c.append(0, &pos, &[1.0; 11 * 2 * 4], &[2.0; 11 * 2 * 3]);
        c.retain(0, 1, |_, p| p % 2 == 0); // head 1 holds 0, 2, 4, 6, 8, 10
        c.truncate_pos(7);
        assert_eq!(c.len(0, 0), 7);
        assert_eq!(c.len(0, 1), 4);
        let kept: Vec<u32> = c.blocks(0, 1).flat_map(|b| b.pos.to_vec()).collect();
        assert_eq!(kept, vec![0, 2, 4, 6]);
        c.truncate_pos(0);
        assert!(c.is_empty());
    }

    #[test]
    fn reserve_then_fill_allocates_nothing_more() {
        let mut c = KvCache::new(cfg(KvDtype::F16));
        c.reserve(8);
        let reserved = c.bytes();
        assert_eq!(reserved, 2 * 2 * 2 * c.cfg.block_bytes());
        for layer in 0..2 {
            let pos: Vec<u32> = (0..8).collect();
            c.append(layer, &pos, &[0.0; 8 * 2 * 4], &[0.0; 8 * 2 * 3]);
        }
        assert_eq!(c.bytes(), reserved);
    }
}
