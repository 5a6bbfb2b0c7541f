//! What the prefix store keeps, taken from a session and put back into a fresh one.
//!
//! - [`BlockEntry`]: one [`BLOCK`]-token block of every (layer, KV head) stream of a cache that keeps every entry
//!   (f16, f32 or KIVI storage). Full-precision blocks go back through [`KvCache::append`], so KIVI quantizes them
//!   exactly where a recomputed prefix would; quantized blocks go back as they were ([`KvCache::push_quant_block`]).
//! - [`Snapshot`]: a whole session state (cache, recorded queries, accumulated attention) after an exact token
//!   prefix, for caches a method compressed (a compressed cache of a prefix is not a prefix of a longer prompt's
//!   compressed cache) or whose sliding-window layers dropped their oldest entries.

use anyhow::{bail, Result};

use super::key::BLOCK;
use crate::engine::Session;
use crate::kv::{Block, BlockData, KvCache, KvDtype};
use crate::methods::obs::{AttnAcc, QueryWindow};

/// How a session's cache can be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Block by block: every entry kept, no windows, blocks of [`BLOCK`] tokens.
    Blocks,
    /// Whole snapshots of exact prefixes only.
    Snapshot,
}

/// How `s`'s cache can be reused.
pub fn mode(s: &Session) -> Mode {
    let spec = &s.cfg.kv;
    let plain = spec.method.build.is_none()
        && spec.select.is_none()
        && crate::methods::spec::Options {
            kivi: None,
            ..spec.options.clone()
        } == Default::default();
    let c = &s.cache.cfg;
    let blocks = plain
        && c.block_tokens == BLOCK
        && (0..c.n_layers).all(|l| c.window(l).is_none())
        && s.cfg.offload.is_none()
        && s.cfg.observe == Default::default();
    if blocks {
        Mode::Blocks
    } else {
        Mode::Snapshot
    }
}

/// One block of every stream, layer-major: `blocks[layer · n_kv_heads + head]`.
pub struct BlockEntry {
    pub(super) blocks: Vec<Block>,
    /// The blocks are KIVI-quantized (else full precision).
    pub(super) quant: bool,
    /// KIVI's residual of the cache they came from (0 otherwise): which blocks a prefix of some length quantizes.
    pub(super) residual: usize,
    pub(super) bytes: usize,
}

impl BlockEntry {
    /// Block `b` of every stream of `cache`; None if some stream does not hold that whole block.
    pub fn capture(cache: &KvCache, b: usize) -> Option<Self> {
        let c = &cache.cfg;
        let mut blocks = Vec::with_capacity(c.n_layers * c.n_kv_heads);
        let mut bytes = 0;
        for layer in 0..c.n_layers {
            for head in 0..c.n_kv_heads {
                if cache.len(layer, head) < (b + 1) * c.block_tokens {
                    return None;
                }
                let view = cache.block(layer, head, b);
                if matches!(view.data, BlockData::Disk(_)) {
                    return None;
                }
                bytes += data_bytes(view.data) + 4 * view.pos.len();
                blocks.push(Block {
                    data: view.data.clone(),
                    pos: view.pos.into(),
                });
            }
        }
        let quant = matches!(blocks.first()?.data, BlockData::Quant(_));
        let residual = match c.dtype {
            KvDtype::Kivi { residual, .. } => residual,
            _ => 0,
        };
        Some(Self {
            blocks,
            quant,
            residual,
            bytes,
        })
    }
}

/// Bytes a block's data holds.
fn data_bytes(d: &BlockData) -> usize {
    match d {
        BlockData::F16 { k, v } => 2 * (k.len() + v.len()),
        BlockData::F32 { k, v } => 4 * (k.len() + v.len()),
        BlockData::Quant(q) => q.k.len() + q.v.len() + 2 * (q.k_ms.len() + q.v_ms.len()),
        BlockData::Disk(_) => 0,
    }
}

/// Blocks of a prefix restorable bit for bit, out of `m` matched ones whose quantized flags are `quant` (KIVI,
/// residual `residual`): a recomputed prefix of m′ blocks quantizes its first (m′·BLOCK − residual) / BLOCK blocks, and
/// a quantized block cannot go back to full precision, so m′ is the longest prefix whose quantized blocks come first
/// and number no more than that.
pub fn restorable(quant: &[bool], residual: usize) -> usize {
    let lead = quant.iter().take_while(|&&q| q).count();
    let mut m = quant.len();
    if quant[lead..m].iter().any(|&q| q) {
        // A quantized block after a full-precision one: stop before it.
        m = lead + quant[lead..].iter().take_while(|&&q| !q).count();
    }
    while m > 0 {
        let q = lead.min(m);
        if q <= (m * BLOCK).saturating_sub(residual) / BLOCK || q == 0 {
            return m;
        }
        m -= 1;
    }
    0
}

/// Appends `entries` (blocks 0, 1, … of a prefix) to the empty cache of `s`.
pub fn restore_blocks(s: &mut Session, entries: &[&BlockEntry]) -> Result<()> {
    let c = s.cache.cfg.clone();
    let (nh, hk, hv, bt) = (c.n_kv_heads, c.head_dim_k, c.head_dim_v, c.block_tokens);
    // Shapes: bt × (nh · hk) keys and bt × (nh · hv) values, the layout the K/V projections produce.
    let mut k = vec![0f32; bt * nh * hk];
    let mut v = vec![0f32; bt * nh * hv];
    let mut pos = vec![0u32; bt];
    for (b, e) in entries.iter().enumerate() {
        if e.blocks.len() != c.n_layers * nh {
            bail!(
                "prefix block {b} holds {} streams, this cache has {}",
                e.blocks.len(),
                c.n_layers * nh
            );
        }
        for layer in 0..c.n_layers {
            if e.quant {
                for head in 0..nh {
                    s.cache
                        .push_quant_block(layer, head, &e.blocks[layer * nh + head])?;
                }
                continue;
            }
            for head in 0..nh {
                let blk = &e.blocks[layer * nh + head];
                let fits = match &blk.data {
                    BlockData::F16 { k, v } => k.len() == hk * bt && v.len() == hv * bt,
                    BlockData::F32 { k, v } => k.len() == hk * bt && v.len() == hv * bt,
                    _ => false,
                } && blk.pos.len() == bt;
                if !fits {
                    bail!("prefix block {b}: a stored block does not fit this cache's shape");
                }
                for j in 0..bt {
                    read_entry(
                        blk,
                        bt,
                        j,
                        &mut k[(j * nh + head) * hk..][..hk],
                        &mut v[(j * nh + head) * hv..][..hv],
                    );
                }
                pos.copy_from_slice(&blk.pos);
            }
            s.cache.append(layer, &pos, &k, &v);
        }
    }
    Ok(())
}

/// Entry `j` of a full-precision block as f32 (every key channel stored).
fn read_entry(b: &Block, bt: usize, j: usize, k: &mut [f32], v: &mut [f32]) {
    let hv = v.len();
    match &b.data {
        BlockData::F16 { k: bk, v: bv } => {
            k.iter_mut()
                .enumerate()
                .for_each(|(d, x)| *x = bk[d * bt + j].to_f32());
            v.iter_mut()
                .zip(&bv[j * hv..][..hv])
                .for_each(|(x, y)| *x = y.to_f32());
        }
        BlockData::F32 { k: bk, v: bv } => {
            k.iter_mut()
                .enumerate()
                .for_each(|(d, x)| *x = bk[d * bt + j]);
            v.copy_from_slice(&bv[j * hv..][..hv]);
        }
        _ => unreachable!("checked by the caller"),
    }
}

/// A session's whole state after an exact token prefix.
pub struct Snapshot {
    pub(super) cache: KvCache,
    pub(super) tokens: Vec<u32>,
    pub(super) obs: QueryWindow,
    pub(super) acc: AttnAcc,
    pub(super) since_compress: usize,
    pub(super) bytes: usize,
}

impl Snapshot {
    pub fn capture(s: &Session) -> Result<Self> {
        let acc_bytes: usize = s.acc.acc.iter().map(|a| 4 * a.len()).sum();
        let obs = &s.scratch.seq.obs;
        let obs_bytes = 4 * s.model.config().n_layers * obs.capacity() * (obs.row() + 1);
        Ok(Self {
            cache: s.cache.try_clone()?,
            tokens: s.tokens.clone(),
            obs: s.scratch.seq.obs.clone(),
            acc: s.acc.clone(),
            since_compress: s.since_compress,
            bytes: s.cache.bytes() + acc_bytes + obs_bytes,
        })
    }

    /// Puts this state into the empty session `s` (made with the same configuration: the namespace says so).
    pub fn restore(&self, s: &mut Session) -> Result<()> {
        if s.scratch.seq.obs.capacity() != self.obs.capacity() || s.acc.is_on() != self.acc.is_on()
        {
            bail!("the snapshot was taken from a session that records different observations");
        }
        s.cache = self.cache.try_clone()?;
        s.tokens = self.tokens.clone();
        s.scratch.seq.obs = self.obs.clone();
        s.acc = self.acc.clone();
        s.since_compress = self.since_compress;
        s.end_prefill();
        s.cache.rebalance()?;
        Ok(())
    }
}
