//! The block pool: every block the cache holds, its free lists and the byte counter.
//!
//! A block is named by its id, an index into the pool. Streams [`take`](BlockPool::take) a block of the
//! [`Shape`] they need and [`release`](BlockPool::release) it when they no longer do; a released block goes on the free
//! list of its shape and is handed out again before any new block is allocated. [`trim`](BlockPool::trim) gives free
//! blocks back to the allocator; their ids become holes, filled first by later allocations. The byte counter counts
//! every block that exists, in use or free, so it is the memory the cache really holds.
//!
//! With offload on ([`super::offload`]), the pool also owns the offload store: [`spill`](BlockPool::spill) writes a
//! block's keys and values to the file and frees them (the block keeps its positions, and counts only those),
//! [`promote`](BlockPool::promote) reads them back; a released block on disk frees its slot and its id.

use anyhow::Result;
use half::f16;

use super::format::{Block, BlockData, Shape};
use super::offload::Offload;
use super::KvConfig;

pub(super) struct BlockPool {
    cfg: KvConfig,
    blocks: Vec<Option<Block>>,
    /// Indices of `blocks` left empty by trim(), reused first.
    holes: Vec<u32>,
    /// Free blocks by shape.
    free: Vec<(Shape, Vec<u32>)>,
    bytes: usize,
    peak_bytes: usize,
    /// The offload store, when offload is on.
    pub(super) off: Option<Offload>,
}

impl Clone for BlockPool {
    /// Panics if the offload file cannot be copied; [`BlockPool::try_clone`] returns the error.
    fn clone(&self) -> Self {
        self.try_clone()
            .unwrap_or_else(|e| panic!("cloning the KV cache: {e:#}"))
    }
}

impl BlockPool {
    /// An empty pool for blocks laid out as `cfg` says.
    pub(super) fn new(cfg: &KvConfig) -> Self {
        BlockPool {
            cfg: cfg.clone(),
            blocks: Vec::new(),
            holes: Vec::new(),
            free: Vec::new(),
            bytes: 0,
            peak_bytes: 0,
            off: None,
        }
    }

    /// A copy; an offloaded pool gets its own file holding the same blocks.
    pub(super) fn try_clone(&self) -> Result<Self> {
        Ok(BlockPool {
            cfg: self.cfg.clone(),
            blocks: self.blocks.clone(),
            holes: self.holes.clone(),
            free: self.free.clone(),
            bytes: self.bytes,
            peak_bytes: self.peak_bytes,
            off: self.off.as_ref().map(|o| o.try_clone()).transpose()?,
        })
    }

    pub(super) fn get(&self, id: u32) -> &Block {
        self.blocks[id as usize].as_ref().expect("live block")
    }

    pub(super) fn get_mut(&mut self, id: u32) -> &mut Block {
        self.blocks[id as usize].as_mut().expect("live block")
    }

    pub(super) fn shape(&self, id: u32) -> Shape {
        self.get(id).shape(self.cfg.block_tokens)
    }

    /// A block of `shape`: a free one if there is one, else a new one. Its contents are whatever it last held.
    pub(super) fn take(&mut self, shape: Shape) -> u32 {
        if let Some((_, list)) = self.free.iter_mut().find(|(s, _)| *s == shape) {
            if let Some(id) = list.pop() {
                if let Some(o) = &mut self.off {
                    o.fresh(id);
                }
                return id;
            }
        }
        self.alloc(shape)
    }

    /// Puts a block on the free list of its shape. A block on disk frees its slot and its id instead.
    pub(super) fn release(&mut self, id: u32) {
        if let BlockData::Disk(r) = &self.get(id).data {
            let r = *r;
            self.off
                .as_mut()
                .expect("a disk block has a store")
                .release(&r);
            self.bytes -= 4 * self.cfg.block_tokens;
            self.blocks[id as usize] = None;
            self.holes.push(id);
            return;
        }
        let shape = self.shape(id);
        match self.free.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, list)) => list.push(id),
            None => self.free.push((shape, vec![id])),
        }
    }

    /// Makes at least `n` blocks of `shape` exist (in use or free): the missing ones are allocated onto the free list.
    pub(super) fn ensure(&mut self, shape: Shape, n: usize) {
        let bt = self.cfg.block_tokens;
        let have = self
            .blocks
            .iter()
            .filter(|b| b.as_ref().is_some_and(|b| b.shape(bt) == shape))
            .count();
        for _ in have..n {
            let id = self.alloc(shape);
            self.release(id);
        }
    }

    /// Shrinks block `id`'s keys to the stored rows `rows` (see [`Block::keep_key_rows`]); the byte counter drops by
    /// what they held.
    pub(super) fn keep_key_rows(&mut self, id: u32, rows: &[usize]) {
        let before = self.shape(id).bytes(&self.cfg);
        let bt = self.cfg.block_tokens;
        self.get_mut(id).keep_key_rows(rows, bt);
        self.bytes = self.bytes - before + self.shape(id).bytes(&self.cfg);
    }

    /// Gives free blocks back to the allocator (the byte counter drops accordingly).
    pub(super) fn trim(&mut self) {
        for (shape, list) in std::mem::take(&mut self.free) {
            for id in list {
                self.blocks[id as usize] = None;
                self.holes.push(id);
                self.bytes -= shape.bytes(&self.cfg);
            }
        }
    }

    /// Counts `added` bytes held beside the blocks (page summaries), or frees `removed`.
    pub(super) fn account(&mut self, added: usize, removed: usize) {
        self.bytes = self.bytes + added - removed;
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }

    /// Bytes of an f16 block's keys and values with `hk` key channels (what spilling frees).
    fn data_bytes(&self, hk: usize) -> usize {
        2 * (hk + self.cfg.head_dim_v) * self.cfg.block_tokens
    }

    /// Writes block `id` (f16, every key channel, in RAM) to the offload file and frees its keys and values.
    pub(super) fn spill(&mut self, id: u32) -> Result<()> {
        let off = self.off.as_mut().expect("spilling needs offload");
        let block = self.blocks[id as usize].as_mut().expect("live block");
        let BlockData::F16 { k, v } = &block.data else {
            unreachable!("only f16 blocks in RAM are spilled")
        };
        let hk = k.len() / self.cfg.block_tokens;
        let r = off.write(k, v, &block.pos)?;
        block.data = BlockData::Disk(r);
        self.bytes -= self.data_bytes(hk);
        Ok(())
    }

    /// Reads block `id` back from the offload file into RAM (and frees its slot). On failure the block reads as zeros
    /// and the error is returned.
    pub(super) fn promote(&mut self, id: u32) -> Result<()> {
        let bt = self.cfg.block_tokens;
        let off = self.off.as_mut().expect("promoting needs offload");
        let block = self.blocks[id as usize].as_mut().expect("live block");
        let BlockData::Disk(r) = block.data else {
            return Ok(());
        };
        let hk = r.hk as usize;
        let mut k = vec![f16::ZERO; hk * bt].into_boxed_slice();
        let mut v = vec![f16::ZERO; bt * self.cfg.head_dim_v].into_boxed_slice();
        let res = off.take(&r, &mut k, &mut v, &mut block.pos);
        block.data = BlockData::F16 { k, v };
        self.bytes += self.data_bytes(hk);
        self.peak_bytes = self.peak_bytes.max(self.bytes);
        res
    }

    /// Bytes of every block that exists, used or free.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    pub(super) fn reset_peak(&mut self) {
        self.peak_bytes = self.bytes;
    }

    fn alloc(&mut self, shape: Shape) -> u32 {
        let block = Block::new(&self.cfg, shape);
        self.bytes += shape.bytes(&self.cfg);
        self.peak_bytes = self.peak_bytes.max(self.bytes);
        let id = self.place(block);
        if let Some(o) = &mut self.off {
            o.fresh(id);
        }
        id
    }

    fn place(&mut self, block: Block) -> u32 {
        match self.holes.pop() {
            Some(i) => {
                self.blocks[i as usize] = Some(block);
                i
            }
            None => {
                self.blocks.push(Some(block));
                (self.blocks.len() - 1) as u32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    fn cfg() -> KvConfig {
        KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: 8,
            head_dim_v: 4,
            block_tokens: 4,
            dtype: KvDtype::Kivi {
                bits: 4,
                residual: 4,
            },
            windows: Vec::new(),
        }
    }

    #[test]
    fn released_blocks_are_reused_by_shape_and_trim_frees_them() {
        let c = cfg();
        let mut p = BlockPool::new(&c);
        let full = Shape {
            quant: false,
            hk: 8,
        };
        let quant = Shape { quant: true, hk: 8 };
        let (a, b) = (p.take(full), p.take(quant));
        assert_eq!((p.shape(a), p.shape(b)), (full, quant));
        let both = full.bytes(&c) + quant.bytes(&c);
        assert_eq!(p.bytes(), both);
        p.release(a);
        // A free block of another shape is not handed out; one of the same shape is.
        let q2 = p.take(quant);
        assert_ne!(q2, a);
        assert_eq!(p.take(full), a);
        assert_eq!(p.bytes(), both + quant.bytes(&c));
        p.release(a);
        p.release(q2);
        p.trim();
        assert_eq!(p.bytes(), quant.bytes(&c));
        assert_eq!(p.peak_bytes(), both + quant.bytes(&c));
        // Trimmed ids are holes, filled before the pool grows.
        let mut again = [p.take(full), p.take(full)];
        again.sort();
        let mut freed = [a, q2];
        freed.sort();
        assert_eq!(again, freed);
        p.reset_peak();
        assert_eq!(p.peak_bytes(), p.bytes());
    }

    #[test]
    fn ensure_counts_blocks_in_use_and_pruning_keys_drops_bytes() {
        let c = cfg();
        let mut p = BlockPool::new(&c);
        let full = Shape {
            quant: false,
            hk: 8,
        };
        let id = p.take(full);
        p.ensure(full, 3);
        assert_eq!(p.bytes(), 3 * full.bytes(&c));
        p.ensure(full, 2);
        assert_eq!(p.bytes(), 3 * full.bytes(&c));
        // Keep stored key rows 1 and 5: the block becomes a 2-channel block.
        p.keep_key_rows(id, &[1, 5]);
        let small = Shape {
            quant: false,
            hk: 2,
        };
        assert_eq!(p.shape(id), small);
        assert_eq!(p.bytes(), 2 * full.bytes(&c) + small.bytes(&c));
    }
}
