//! The streams API: [`KvCache`], one stream per (layer, KV head), each a block table over the [`BlockPool`].
//!
//! A stream is the ordered list of its blocks' ids, its length, how many of its leading blocks are quantized, and the
//! key channels it keeps. Everything callers do to the cache happens here: append a chunk's keys and values, read or
//! overwrite one entry, retain some entries of one head (eviction), truncate, prune key channels (ThinK). When an
//! entry must change block or format, it goes through the [`Stage`] (see [`super::format`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use half::f16;

use super::format::{Block, BlockData, BlockView, Shape, Stage};
use super::meta::{self, MetaConfig};
use super::offload::{self, Cand, Offload, OffloadConfig};
use super::pool::BlockPool;
use super::quant;
use super::{KvConfig, BLOCK_TOKEN_CHOICES};

#[derive(Clone, Default)]
struct Stream {
    /// Block ids in the pool, in entry order.
    blocks: Vec<u32>,
    len: usize,
    /// Blocks `[0, n_quant)` are quantized, the rest full precision.
    n_quant: usize,
    /// Kept key channels (ThinK), ascending; None = all.
    channels: Option<Box<[u16]>>,
    /// Page summaries (see [`meta`]): page p at `[p · 2 · hk, (p + 1) · 2 · hk)`; empty when off.
    meta: Vec<f16>,
    /// Their 8-bit copy, what selectors score ([`meta::quantize_page`]): page p's codes at `[p · 2 · hk, …)`, its scale
    /// at `meta_scales[p]`.
    meta_codes: Vec<i8>,
    meta_scales: Vec<f32>,
    /// Sliding-window streams: one past the position of the newest entry dropped by sliding (0 = none dropped).
    slid_to: u32,
}

/// Entries appended at once below which [`KvCache::append`] stays on the calling thread (a decode step's few entries
/// are not worth a parallel region).
const PAR_APPEND_MIN: usize = 64;

/// Bytes read by attention and selectors since the cache was made (or [`KvCache::take_read`] last ran).
#[derive(Default)]
struct ReadCounter(AtomicU64);

impl Clone for ReadCounter {
    fn clone(&self) -> Self {
        ReadCounter(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

pub struct KvCache {
    pub cfg: KvConfig,
    pool: BlockPool,
    /// Stream of (layer, KV head) at `layer · n_kv_heads + head`.
    streams: Vec<Stream>,
    stage: Stage,
    /// Page summaries kept for selectors; None = off.
    meta_cfg: Option<MetaConfig>,
    /// Bytes of every stream's page summaries (also in the pool's counter).
    meta_bytes: usize,
    /// Keys of one page as f32 (page × hk), for recomputing its summary, and room for one summary as f32 (2 × hk)
    /// after them, for folding new keys into a partly filled page.
    meta_keys: Vec<f32>,
    read: ReadCounter,
    /// Changes other than appends (evictions, overwrites, truncations, pruned channels): entry indices may have moved.
    edits: u64,
    /// Offload: the blocks the last rebalance weighed (reused).
    cands: Vec<Cand>,
    /// Sliding-window streams keep what a query at this position reads (see [`KvCache::hold`]); None = only what the
    /// next appended entries read.
    hold: Option<u32>,
}

impl Clone for KvCache {
    /// Panics if an offloaded cache's file cannot be copied; [`KvCache::try_clone`] returns the error.
    fn clone(&self) -> Self {
        self.try_clone()
            .unwrap_or_else(|e| panic!("cloning the KV cache: {e:#}"))
    }
}

impl KvCache {
    /// Panics if `cfg.block_tokens` is not one of [`BLOCK_TOKEN_CHOICES`], or quantization bits are not one of
    /// [`quant::BITS_CHOICES`] (programming errors: user input is checked where it is parsed).
    pub fn new(cfg: KvConfig) -> Self {
        assert!(
            BLOCK_TOKEN_CHOICES.contains(&cfg.block_tokens),
            "block_tokens {} not in {BLOCK_TOKEN_CHOICES:?}",
            cfg.block_tokens
        );
        if let Some(b) = cfg.dtype.quant_bits() {
            assert!(quant::BITS_CHOICES.contains(&b), "KV quantization bits {b}");
        }
        Self {
            pool: BlockPool::new(&cfg),
            streams: vec![Stream::default(); cfg.n_layers * cfg.n_kv_heads],
            stage: Stage::new(&cfg),
            meta_cfg: None,
            meta_bytes: 0,
            meta_keys: Vec::new(),
            read: ReadCounter::default(),
            edits: 0,
            cands: Vec::new(),
            hold: None,
            cfg,
        }
    }

    /// A copy of the cache; an offloaded cache's copy gets its own file with the same blocks.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            pool: self.pool.try_clone()?,
            streams: self.streams.clone(),
            stage: self.stage.clone(),
            meta_cfg: self.meta_cfg,
            meta_bytes: self.meta_bytes,
            meta_keys: self.meta_keys.clone(),
            read: self.read.clone(),
            edits: self.edits,
            cands: Vec::new(),
            hold: self.hold,
        })
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Offload (see [`offload`])

    /// Keeps at most `oc.resident` bytes in RAM from now on, the other blocks in a new file under `oc.dir` (removed
    /// when the cache is dropped). Blocks move at [`Self::rebalance`]. Fails for storage other than f16 (KIVI, f32),
    /// for streams with pruned key channels, or if the file cannot be created.
    pub fn enable_offload(&mut self, oc: &OffloadConfig) -> Result<()> {
        if self.pool.off.is_some() {
            bail!("the KV cache is already offloaded");
        }
        if self.streams.iter().any(|s| s.channels.is_some()) {
            bail!("--kv-offload keeps blocks with every key channel: it cannot take streams with pruned channels (think)");
        }
        let mut off = Offload::create(oc, &self.cfg)?;
        for s in &self.streams {
            s.blocks.iter().for_each(|&id| off.fresh(id));
        }
        self.pool.off = Some(off);
        Ok(())
    }

    /// The offload configuration, when offload is on.
    pub fn offload_config(&self) -> Option<&OffloadConfig> {
        self.pool.off.as_ref().map(|o| &o.cfg)
    }

    /// The offload file and its nonce (for [`offload::OffloadReader::open`]), when offload is on.
    pub fn offload_file(&self) -> Option<(&Path, u64)> {
        self.pool.off.as_ref().map(|o| (o.path(), o.nonce()))
    }

    /// Bytes of the blocks on disk (0 without offload).
    pub fn disk_bytes(&self) -> usize {
        self.pool.off.as_ref().map_or(0, |o| o.disk_bytes())
    }

    /// Bytes read from the offload file since the cache was made (0 without offload).
    pub fn disk_read_bytes(&self) -> u64 {
        self.pool.off.as_ref().map_or(0, |o| o.read_total())
    }

    /// The resident limit now, in bytes: the configured size, or the share of what the cache would hold with every
    /// block in RAM, but never below the floor that cannot move (positions, page summaries, the open block of each
    /// stream, blocks in other formats): what [`Self::rebalance`] keeps RAM to. A small cache (sliding-window layers
    /// hold a few blocks each) can sit at its floor. None without offload.
    pub fn resident_limit(&self) -> Option<usize> {
        let off = self.pool.off.as_ref()?;
        let (bt, hk) = (self.cfg.block_tokens, self.cfg.head_dim_k);
        let (mut n_disk, mut movable) = (0, 0);
        for s in &self.streams {
            let nb = s.blocks.len();
            for (b, &id) in s.blocks.iter().enumerate() {
                match &self.pool.get(id).data {
                    BlockData::Disk(_) => n_disk += 1,
                    BlockData::F16 { k, .. } if k.len() == hk * bt => {
                        let open = b + 1 == nb && !s.len.is_multiple_of(bt);
                        movable += !open as usize;
                    }
                    _ => {}
                }
            }
        }
        let data = self.block_data_bytes();
        let floor = self.pool.bytes() - movable * data;
        Some(
            off.cfg
                .resident
                .limit(self.pool.bytes() + n_disk * data)
                .max(floor),
        )
    }

    /// Moves blocks between RAM and the offload file so that at most the resident limit stays in RAM (never less
    /// than the floor that cannot move: positions, page summaries, the open block of each stream): the most recently
    /// read blocks stay or come back, the least recently read ones go to disk. Call it between steps. Reports the
    /// first I/O failure since the cache was made. Nothing to do without offload.
    pub fn rebalance(&mut self) -> Result<()> {
        self.settle(true);
        match self.pool.off.as_ref().and_then(|o| o.error()) {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    /// Bytes of an f16 block's keys and values with every key channel (what a spill frees).
    fn block_data_bytes(&self) -> usize {
        2 * (self.cfg.head_dim_k + self.cfg.head_dim_v) * self.cfg.block_tokens
    }

    /// Spills the least recently read blocks until at most the resident limit stays in RAM, and brings nothing back:
    /// the model calls it after each layer of a prompt chunk, so RAM holds the limit plus one layer's new blocks
    /// rather than the whole chunk's until [`Self::rebalance`] at its end (which reports any failure recorded here).
    /// Nothing to do without offload.
    pub fn spill_to_limit(&mut self) {
        self.settle(false);
    }

    /// [`Self::rebalance`] without the report (failures are recorded in the store); `promote`: also bring back the
    /// blocks on disk that rank within the limit.
    fn settle(&mut self, promote: bool) {
        let Some(off) = self.pool.off.as_ref() else {
            return;
        };
        if off.error().is_some() {
            return;
        }
        let (bt, hk) = (self.cfg.block_tokens, self.cfg.head_dim_k);
        let data = self.block_data_bytes();
        let mut cands = std::mem::take(&mut self.cands);
        cands.clear();
        let (mut n_disk, mut resident) = (0, 0);
        for s in &self.streams {
            let nb = s.blocks.len();
            for (b, &id) in s.blocks.iter().enumerate() {
                let on_disk = match &self.pool.get(id).data {
                    BlockData::Disk(_) => true,
                    BlockData::F16 { k, .. } if k.len() == hk * bt => false,
                    // Other formats (pruned channels) stay in RAM.
                    _ => continue,
                };
                n_disk += on_disk as usize;
                if !on_disk && b + 1 == nb && !s.len.is_multiple_of(bt) {
                    continue; // the open block: the next append writes into it
                }
                resident += !on_disk as usize;
                cands.push(Cand {
                    id,
                    stamp: off.stamp(id),
                    on_disk,
                    index: b as u32,
                });
            }
        }
        let resident_cfg = off.cfg.resident;
        // Free blocks are memory held for nothing here: give them back first.
        self.pool.trim();
        let bytes = self.pool.bytes();
        let limit = resident_cfg.limit(bytes + n_disk * data);
        let fixed = bytes - resident * data;
        let keep = limit.saturating_sub(fixed) / data;
        offload::rank(&mut cands);
        let mut res = Ok(());
        for c in cands.iter().skip(keep).filter(|c| !c.on_disk) {
            res = self.pool.spill(c.id);
            if res.is_err() {
                break;
            }
        }
        if res.is_ok() && promote {
            for c in cands.iter().take(keep).filter(|c| c.on_disk) {
                res = self.pool.promote(c.id);
                if res.is_err() {
                    break;
                }
            }
        }
        let off = self.pool.off.as_mut().expect("checked above");
        if let Err(e) = res {
            off.fail(e);
        }
        off.tick = off.tick.wrapping_add(1);
        self.cands = cands;
    }

    /// Brings blocks `[from, to)` of stream `si` back into RAM if they are on disk (before they are edited).
    fn make_resident(&mut self, si: usize, from: usize, to: usize) {
        if self.pool.off.is_none() {
            return;
        }
        for b in from..to.min(self.streams[si].blocks.len()) {
            let id = self.streams[si].blocks[b];
            if let Err(e) = self.pool.promote(id) {
                self.pool.off.as_ref().expect("offload is on").fail(e);
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Page summaries and read accounting

    /// Keeps page summaries of every stream from now on (computed at once for what is already cached). Asking again
    /// with another configuration recomputes them all. Panics if the page size does not divide the block size (a
    /// programming error: selectors choose it from the block size).
    pub fn enable_meta(&mut self, m: MetaConfig) {
        assert!(
            m.page_tokens > 0 && self.cfg.block_tokens.is_multiple_of(m.page_tokens),
            "page of {} tokens in blocks of {}",
            m.page_tokens,
            self.cfg.block_tokens
        );
        if self.meta_cfg == Some(m) {
            return;
        }
        self.meta_cfg = Some(m);
        self.meta_keys = vec![0.0; (m.page_tokens + 2) * self.cfg.head_dim_k];
        for si in 0..self.streams.len() {
            if self.meta_of(si).is_some() {
                self.refresh_meta(si, 0);
            } else {
                self.drop_meta(si);
            }
        }
    }

    /// The page summaries stream `si` keeps: the cache's configuration where its layer keeps any
    /// ([`MetaConfig::keeps`]: not a selector's dense first layers, not a sliding-window layer).
    fn meta_of(&self, si: usize) -> Option<MetaConfig> {
        let layer = si / self.cfg.n_kv_heads.max(1);
        self.meta_cfg
            .filter(|m| m.keeps(layer, self.cfg.window(layer)))
    }

    /// Frees the summaries of stream `si` (a layer that no longer keeps any).
    fn drop_meta(&mut self, si: usize) {
        let s = &mut self.streams[si];
        let gone = 2 * s.meta.len() + s.meta_codes.len() + 4 * s.meta_scales.len();
        s.meta = Vec::new();
        s.meta_codes = Vec::new();
        s.meta_scales = Vec::new();
        self.meta_bytes -= gone;
        self.pool.account(0, gone);
    }

    /// Counts the changes that may move entries (everything but appends): a selection remembered from before is stale
    /// once this changes.
    pub fn edits(&self) -> u64 {
        self.edits
    }

    pub fn meta_config(&self) -> Option<MetaConfig> {
        self.meta_cfg
    }

    /// Page summaries of (layer, KV head): pages × 2 × head_dim_k f16 (see [`meta`]); empty when off or when the layer
    /// keeps none.
    pub fn page_meta(&self, layer: usize, head: usize) -> &[f16] {
        &self.streams[self.stream_index(layer, head)].meta
    }

    /// The 8-bit copy of [`Self::page_meta`]: codes (pages × 2 × head_dim_k) and one scale per page.
    pub fn page_codes(&self, layer: usize, head: usize) -> (&[i8], &[f32]) {
        let s = &self.streams[self.stream_index(layer, head)];
        (&s.meta_codes, &s.meta_scales)
    }

    /// Makes stream `si`'s 8-bit copy match its summaries: as many pages, pages from `p0` on quantized again.
    fn sync_codes(&mut self, si: usize, p0: usize) {
        let Some(m) = self.meta_of(si) else { return };
        let d = 2 * self.cfg.head_dim_k;
        let s = &mut self.streams[si];
        let n_pages = s.meta.len() / d;
        let old = s.meta_codes.len() + 4 * s.meta_scales.len();
        s.meta_codes.resize(n_pages * d, 0);
        s.meta_scales.resize(n_pages, 0.0);
        for p in p0.min(n_pages)..n_pages {
            s.meta_scales[p] = meta::quantize_page(
                m.stat,
                &s.meta[p * d..][..d],
                &mut s.meta_codes[p * d..][..d],
            );
        }
        let new = s.meta_codes.len() + 4 * s.meta_scales.len();
        self.meta_bytes = self.meta_bytes + new - old;
        self.pool.account(new, old);
    }

    /// Bytes held by page summaries (part of [`Self::bytes`]).
    pub fn meta_bytes(&self) -> usize {
        self.meta_bytes
    }

    /// Counts `bytes` read from the cache (attention reading blocks, selectors reading summaries). Callable from
    /// parallel tasks.
    pub fn note_read(&self, bytes: usize) {
        self.read.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes read since the last call (or since the cache was made), and resets the count. Bytes read from the
    /// offload file count too.
    pub fn take_read(&self) -> u64 {
        let disk = self.pool.off.as_ref().map_or(0, |o| o.take_pending());
        self.read.0.swap(0, Ordering::Relaxed) + disk
    }

    /// Bytes one stored entry of (layer, KV head) takes to read (key, value and position), its block's share.
    pub fn entry_read_bytes(&self, layer: usize, head: usize, block: usize) -> usize {
        let si = self.stream_index(layer, head);
        let id = self.streams[si].blocks[block];
        self.pool.shape(id).bytes(&self.cfg) / self.cfg.block_tokens
    }

    /// Recomputes the summaries of stream `si` from the page holding entry `from` to its end, and drops pages past it.
    fn refresh_meta(&mut self, si: usize, from: usize) {
        let Some(m) = self.meta_of(si) else { return };
        let (pt, hk, bt) = (m.page_tokens, self.cfg.head_dim_k, self.cfg.block_tokens);
        let len = self.streams[si].len;
        let n_pages = len.div_ceil(pt);
        let old = self.streams[si].meta.len();
        let mut meta = std::mem::take(&mut self.streams[si].meta);
        let mut keys = std::mem::take(&mut self.meta_keys);
        meta.resize(n_pages * 2 * hk, f16::ZERO);
        for p in (from / pt).min(n_pages)..n_pages {
            let (e0, e1) = (p * pt, ((p + 1) * pt).min(len));
            let view = self.block_view(si, e0 / bt);
            for (t, e) in (e0..e1).enumerate() {
                view.read_key(e % bt, &mut keys[t * hk..][..hk]);
            }
            meta::summarize(
                m.stat,
                &keys,
                e1 - e0,
                hk,
                &mut meta[p * 2 * hk..][..2 * hk],
            );
        }
        let (added, removed) = (2 * meta.len(), 2 * old);
        self.streams[si].meta = meta;
        self.meta_keys = keys;
        self.meta_bytes = self.meta_bytes + added - removed;
        self.pool.account(added, removed);
        self.sync_codes(si, from / pt);
    }

    /// Brings the summaries of stream `si` up to date after entries were appended at `from` (the old length) and
    /// nothing before changed. A min/max summary of a partly filled page folds in only the new keys: rounding outward
    /// to f16 is monotone, so max(up(old max), up(x)) = up(max(old keys, x)), the same bits a recomputation gives.
    fn extend_meta(&mut self, si: usize, from: usize) {
        let Some(m) = self.meta_of(si) else { return };
        let (pt, hk, bt) = (m.page_tokens, self.cfg.head_dim_k, self.cfg.block_tokens);
        let len = self.streams[si].len;
        if m.stat != meta::PageStat::MinMax || from.is_multiple_of(pt) || from >= len {
            return self.refresh_meta(si, from);
        }
        let p = from / pt;
        let e1 = ((p + 1) * pt).min(len);
        let mut keys = std::mem::take(&mut self.meta_keys);
        let view = self.block_view(si, from / bt);
        for (t, e) in (from..e1).enumerate() {
            // A page never straddles blocks (block_tokens is a multiple of page_tokens).
            view.read_key(e % bt, &mut keys[t * hk..][..hk]);
        }
        // The page's summary as f32 (after the new keys in the scratch), compared channel by channel with the new
        // keys' extremes; only a channel the new keys pass is rounded and written (max(up(M), up(x)) is up(x)
        // exactly when x > M, M being an f16), the same bits as summarizing the new keys and keeping the larger.
        let n = e1 - from;
        let (new_keys, page_f) = keys.split_at_mut(n * hk);
        let page_f = &mut page_f[..2 * hk];
        let page = &mut self.streams[si].meta[p * 2 * hk..][..2 * hk];
        {
            use half::slice::HalfFloatSliceExt;
            crate::kernels::f16_to_f32_slice(page.reinterpret_cast(), page_f);
        }
        for c in 0..hk {
            let (mut mx, mut mn) = (f32::NEG_INFINITY, f32::INFINITY);
            for t in 0..n {
                let x = new_keys[t * hk + c];
                mx = mx.max(x);
                mn = mn.min(x);
            }
            if mx > page_f[c] {
                page[c] = meta::f16_up(mx);
            }
            if mn < page_f[hk + c] {
                page[hk + c] = meta::f16_down(mn);
            }
        }
        self.meta_keys = keys;
        self.sync_codes(si, p);
        if e1 < len {
            self.refresh_meta(si, e1);
        }
    }

    /// Allocates blocks up front for `tokens` entries in every stream, so that filling them later allocates nothing.
    pub fn reserve(&mut self, tokens: usize) {
        let bt = self.cfg.block_tokens;
        let n_q = self.quant_target(tokens);
        let n_f = tokens.div_ceil(bt) - n_q;
        let hk = self.cfg.head_dim_k;
        for (shape, per_stream) in [
            (Shape { quant: false, hk }, n_f),
            (Shape { quant: true, hk }, n_q),
        ] {
            self.pool.ensure(shape, per_stream * self.streams.len());
        }
        let want = tokens.div_ceil(bt);
        for s in &mut self.streams {
            s.blocks.reserve(want.saturating_sub(s.blocks.len()));
        }
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Reading

    /// Number of entries cached for (layer, KV head).
    pub fn len(&self, layer: usize, head: usize) -> usize {
        self.streams[self.stream_index(layer, head)].len
    }

    /// Largest stream length (= tokens seen, while nothing has been evicted from some layer without a sliding window).
    pub fn max_len(&self) -> usize {
        self.streams.iter().map(|s| s.len).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.max_len() == 0
    }

    /// Kept key channels of (layer, KV head), ascending, or None when every channel is stored.
    pub fn key_channels(&self, layer: usize, head: usize) -> Option<&[u16]> {
        self.streams[self.stream_index(layer, head)]
            .channels
            .as_deref()
    }

    /// Key channels stored per entry of (layer, KV head).
    pub fn key_dims(&self, layer: usize, head: usize) -> usize {
        self.stream_hk(self.stream_index(layer, head))
    }

    /// Quantized blocks at the head of (layer, KV head)'s stream.
    pub fn quantized_blocks(&self, layer: usize, head: usize) -> usize {
        self.streams[self.stream_index(layer, head)].n_quant
    }

    /// The blocks of (layer, KV head), in order, each with its count of valid entries.
    pub fn blocks(&self, layer: usize, head: usize) -> impl Iterator<Item = BlockView<'_>> + '_ {
        let si = self.stream_index(layer, head);
        (0..self.streams[si].blocks.len()).map(move |i| self.block_view(si, i))
    }

    /// Block `i` of (layer, KV head).
    pub fn block(&self, layer: usize, head: usize, i: usize) -> BlockView<'_> {
        self.block_view(self.stream_index(layer, head), i)
    }

    /// Number of blocks of (layer, KV head).
    pub fn n_blocks(&self, layer: usize, head: usize) -> usize {
        self.streams[self.stream_index(layer, head)].blocks.len()
    }

    /// Reads entry `idx` of (layer, KV head) as f32 (`k`: head_dim_k, pruned channels read as 0; `v`: head_dim_v) and
    /// returns its position.
    pub fn read(&self, layer: usize, head: usize, idx: usize, k: &mut [f32], v: &mut [f32]) -> u32 {
        let bt = self.cfg.block_tokens;
        let len = self.len(layer, head);
        assert!(idx < len, "entry {idx} past the stream's {len} entries");
        let b = self.block_view(self.stream_index(layer, head), idx / bt);
        b.read_key(idx % bt, k);
        b.read_value(idx % bt, v);
        b.pos[idx % bt]
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Writing

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
        // A sliding-window layer first drops the blocks no query from here on reads.
        let visible_from = match (self.cfg.window(layer), pos.first()) {
            (Some(w), Some(&p0)) => Some(self.hold.map_or(p0, |h| h.min(p0)).saturating_sub(w - 1)),
            _ => None,
        };
        if n >= PAR_APPEND_MIN
            && self.cfg.dtype.quant_bits().is_none()
            && self.pool.off.is_none()
            && rayon::current_num_threads() > 1
        {
            return self.append_split(layer, pos, k, v, visible_from);
        }
        for h in 0..nh {
            let (si, shape) = self.open_for_append(layer, h, visible_from);
            // Summaries change from the first new entry, or from the first block quantized below.
            let old_len = self.streams[si].len;
            let mut changed = old_len;
            for t in 0..n {
                let len = self.streams[si].len;
                if len.is_multiple_of(bt) && len / bt == self.streams[si].blocks.len() {
                    let id = self.pool.take(shape);
                    self.streams[si].blocks.push(id);
                }
                let slot = len % bt;
                if slot != 0 {
                    // The open block went to disk only if a truncation reopened it.
                    self.make_resident(si, len / bt, len / bt + 1);
                }
                let s = &self.streams[si];
                let block = self.pool.get_mut(s.blocks[len / bt]);
                let rows = (&k[(t * nh + h) * hk..][..hk], &v[(t * nh + h) * hv..][..hv]);
                block.write_at(slot, bt, pos[t], rows, s.channels.as_deref());
                self.streams[si].len += 1;
                // Quantize a block as soon as it leaves the residual window: its f16 block goes back to the pool and
                // is reused by the next block, so a stream holds only about residual + 2 blocks' worth of f16.
                let target = self.quant_target(self.streams[si].len);
                while self.streams[si].n_quant < target {
                    let b = self.streams[si].n_quant;
                    self.convert(si, b, true);
                    self.streams[si].n_quant += 1;
                    changed = changed.min(b * bt);
                }
            }
            if changed == old_len {
                self.extend_meta(si, old_len);
            } else {
                self.refresh_meta(si, changed);
            }
        }
    }

    /// Asks for the memory the next one-entry append to `layer` writes: each stream's open block at the next slot
    /// and the page summary it updates. A decode step's append writes into lines last touched a whole step (every
    /// other layer's cache) ago, a key line per channel; asked for before the step's projections, they arrive while
    /// those run instead of stalling the append miss by miss.
    pub fn prefetch_append(&self, layer: usize) {
        let (bt, d) = (self.cfg.block_tokens, 2 * self.cfg.head_dim_k);
        let meta = self.meta_of(self.stream_index(layer, 0));
        for h in 0..self.cfg.n_kv_heads {
            let s = &self.streams[self.stream_index(layer, h)];
            if let Some(&id) = s.blocks.get(s.len / bt) {
                self.pool.get(id).prefetch_slot(s.len % bt, bt);
            }
            if let Some(m) = meta {
                let p = s.len / m.page_tokens;
                if let Some(x) = s.meta.get(p * d..(p + 1) * d) {
                    super::format::prefetch_lines(x);
                }
                if let Some(x) = s.meta_codes.get(p * d..(p + 1) * d) {
                    super::format::prefetch_lines(x);
                }
            }
        }
    }

    /// Stream of (layer, KV head `h`) ready for appending: slid past `visible_from` on a window layer. Returns its
    /// index and the shape of its full-precision blocks.
    fn open_for_append(
        &mut self,
        layer: usize,
        h: usize,
        visible_from: Option<u32>,
    ) -> (usize, Shape) {
        let si = self.stream_index(layer, h);
        if let Some(lo) = visible_from {
            self.slide(si, lo);
        }
        let shape = Shape {
            quant: false,
            hk: self.stream_hk(si),
        };
        (si, shape)
    }

    /// [`KvCache::append`] of a prefill chunk to a full-precision, all-resident cache, split over the pool by (KV head,
    /// block): the blocks are taken here, on the calling thread, and written (first touched: where a fresh cache's
    /// page faults land) by the pool's threads. Left on one thread, a 512-token chunk's appends took 12 % of its
    /// prefill at 16 threads (`HAYLOFT_PROFILE=1 bench speed`, SmolLM2, the 16-core Xeon), as long as at 2. The same
    /// entries, bits and summaries as the entry-by-entry loop.
    fn append_split(
        &mut self,
        layer: usize,
        pos: &[u32],
        k: &[f32],
        v: &[f32],
        visible_from: Option<u32>,
    ) {
        let (hk, hv, nh, bt) = (
            self.cfg.head_dim_k,
            self.cfg.head_dim_v,
            self.cfg.n_kv_heads,
            self.cfg.block_tokens,
        );
        let n = pos.len();
        // (block address, head, first and end entry of the stream written there)
        let mut tasks: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(nh * (n / bt + 2));
        for h in 0..nh {
            let (si, shape) = self.open_for_append(layer, h, visible_from);
            let old_len = self.streams[si].len;
            while self.streams[si].blocks.len() * bt < old_len + n {
                let id = self.pool.take(shape);
                self.streams[si].blocks.push(id);
            }
        }
        // Addresses only once every block is taken: taking may move the pool's table of blocks.
        for h in 0..nh {
            let si = self.stream_index(layer, h);
            let old_len = self.streams[si].len;
            for b in old_len / bt..(old_len + n).div_ceil(bt) {
                let id = self.streams[si].blocks[b];
                let block: *mut Block = self.pool.get_mut(id);
                let (e0, e1) = ((b * bt).max(old_len), ((b + 1) * bt).min(old_len + n));
                tasks.push((block as usize, h, e0, e1));
            }
        }
        let streams = &self.streams;
        let first = self.stream_index(layer, 0);
        crate::kernels::team::for_each(tasks.len(), |i| {
            let (addr, h, e0, e1) = tasks[i];
            let s = &streams[first + h];
            // SAFETY: every task's block is a distinct live block of the pool (each stream's blocks are its own), the
            // pool is not touched until the region ends, and no other reference to these blocks exists meanwhile.
            let block = unsafe { &mut *(addr as *mut Block) };
            let old_len = s.len;
            for e in e0..e1 {
                let t = e - old_len;
                let rows = (&k[(t * nh + h) * hk..][..hk], &v[(t * nh + h) * hv..][..hv]);
                block.write_at(e % bt, bt, pos[t], rows, s.channels.as_deref());
            }
        });
        for h in 0..nh {
            let si = self.stream_index(layer, h);
            let old_len = self.streams[si].len;
            self.streams[si].len += n;
            self.extend_meta(si, old_len);
        }
    }

    /// Appends a whole KIVI-quantized block (a copy of one this cache's configuration made, with its positions) to
    /// (layer, KV head): how a prefix store puts back blocks it kept, bit for bit. The stream must hold only whole
    /// quantized blocks so far (quantized blocks are always a prefix of a stream), every key channel, and no window.
    pub fn push_quant_block(&mut self, layer: usize, head: usize, block: &Block) -> Result<()> {
        let bt = self.cfg.block_tokens;
        let si = self.stream_index(layer, head);
        let s = &self.streams[si];
        let hk = self.cfg.head_dim_k;
        let BlockData::Quant(q) = &block.data else {
            bail!("push_quant_block: the block is not quantized");
        };
        let want = quant::QBlock::new(q.bits, hk, self.cfg.head_dim_v, bt);
        let same = self.cfg.dtype.quant_bits() == Some(q.bits)
            && (
                q.k.len(),
                q.k_ms.len(),
                q.v.len(),
                q.v_ms.len(),
                block.pos.len(),
            ) == (
                want.k.len(),
                want.k_ms.len(),
                want.v.len(),
                want.v_ms.len(),
                bt,
            );
        if !same {
            bail!(
                "push_quant_block: the block's shape does not match this cache's quantized blocks"
            );
        }
        if s.len != s.n_quant * bt || s.channels.is_some() || self.cfg.window(layer).is_some() {
            bail!(
                "push_quant_block: stream ({layer}, {head}) holds {} entries of which {} blocks are quantized; \
                 quantized blocks go only after quantized blocks",
                s.len,
                s.n_quant
            );
        }
        let id = self.pool.take(Shape { quant: true, hk });
        *self.pool.get_mut(id) = block.clone();
        let s = &mut self.streams[si];
        let from = s.len;
        s.blocks.push(id);
        s.len += bt;
        s.n_quant += 1;
        self.refresh_meta(si, from);
        Ok(())
    }

    /// Overwrites the key (all head_dim_k channels given; a pruned stream stores its kept ones) and value of entry
    /// `idx` of (layer, KV head); its position stays. Merging methods use this to fold dropped entries into kept ones.
    /// In a quantized block the whole block is re-encoded (its per-channel key groups change with the new key).
    pub fn write(&mut self, layer: usize, head: usize, idx: usize, k: &[f32], v: &[f32]) {
        let bt = self.cfg.block_tokens;
        let si = self.stream_index(layer, head);
        let len = self.streams[si].len;
        assert!(idx < len, "entry {idx} past the stream's {len} entries");
        let (b, slot) = (idx / bt, idx % bt);
        self.make_resident(si, b, b + 1);
        let id = self.streams[si].blocks[b];
        if matches!(self.pool.get(id).data, BlockData::Quant(_)) {
            let n = (len - b * bt).min(bt);
            self.stage_block(si, b, n);
            let channels = self.streams[si].channels.as_deref();
            self.stage.put(&self.cfg, slot, k, v, channels);
            self.store_block(si, b, n, true);
            self.refresh_meta(si, b * bt);
            self.edits += 1;
        } else {
            let channels = self.streams[si].channels.as_deref();
            self.pool.get_mut(id).write_entry(slot, bt, k, v, channels);
            self.refresh_meta(si, idx);
            self.edits += 1;
        }
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Dropping entries and channels

    /// Keeps the first `len` entries of every stream; whole blocks past the end go back to the free list.
    /// A stream left empty forgets its key-channel mask.
    pub fn truncate(&mut self, len: usize) {
        for si in 0..self.streams.len() {
            self.shrink(si, len);
        }
    }

    /// Empties every stream and forgets the [`Self::hold`].
    pub fn clear(&mut self) {
        self.truncate(0);
        self.streams.iter_mut().for_each(|s| s.slid_to = 0);
        self.hold = None;
    }

    /// Drops every entry whose position is ≥ `pos` (entries of a stream are in position order), in every stream.
    /// Fails, changing nothing, if a sliding-window layer already dropped an entry that a query at `pos` reads (see
    /// [`Self::hold`]).
    pub fn truncate_pos(&mut self, pos: u32) -> Result<()> {
        self.check_truncate_pos(pos)?;
        let bt = self.cfg.block_tokens;
        for si in 0..self.streams.len() {
            let s = &self.streams[si];
            // Entries are sorted by position: binary search over the stream.
            let (mut lo, mut hi) = (0usize, s.len);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.pool.get(s.blocks[mid / bt]).pos[mid % bt] < pos {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            self.shrink(si, lo);
            let s = &mut self.streams[si];
            s.slid_to = s.slid_to.min(pos);
        }
        Ok(())
    }

    /// Whether [`Self::truncate_pos`] to `pos` would leave every sliding-window stream the entries a query at `pos`
    /// reads (positions `pos − window + 1 .. pos`): an error naming what was dropped if not.
    pub fn check_truncate_pos(&self, pos: u32) -> Result<()> {
        for layer in 0..self.cfg.n_layers {
            let Some(w) = self.cfg.window(layer) else {
                continue;
            };
            let need = pos.saturating_sub(w - 1);
            let slid = (0..self.cfg.n_kv_heads)
                .map(|h| self.streams[self.stream_index(layer, h)].slid_to)
                .max()
                .unwrap_or(0);
            if need < slid.min(pos) {
                bail!(
                    "cannot go back to position {pos}: sliding-window layer {layer} (window {w}) keeps only what its \
                     queries still read, and has dropped positions up to {} that a query at {pos} reads (hold the \
                     position before feeding past it, or fork the session instead)",
                    slid - 1
                );
            }
        }
        Ok(())
    }

    /// Makes sliding-window layers keep, from now on, every entry a query at position `pos` or later reads, so that
    /// [`Self::truncate_pos`] to any position ≥ `pos` keeps working (a shared context answered several times, a chat
    /// turn retried); None lets them keep only what the next appended entries read. Entries already dropped stay
    /// dropped.
    pub fn hold(&mut self, pos: Option<u32>) {
        self.hold = pos;
    }

    /// The position [`Self::hold`] keeps the window of, if any.
    pub fn held(&self) -> Option<u32> {
        self.hold
    }

    /// The sliding window of `layer` if its streams keep only that window (see [`KvConfig::windows`]).
    pub fn window(&self, layer: usize) -> Option<u32> {
        self.cfg.window(layer)
    }

    /// Keeps only the entries of (layer, KV head) for which `keep(index, position)` is true, in order, and returns
    /// whole blocks emptied at the end to the free list. Other heads are untouched, so heads can hold different
    /// numbers of tokens: this is how eviction methods drop entries from one head only.
    ///
    /// On a quantized stream, kept entries move as follows: value rows move between quantized blocks as codes
    /// (exact); keys are dequantized and quantized again with the destination block's per-channel groups (at most
    /// half a step of that group's grid added to each moved key); entries that land in full-precision blocks are
    /// stored as their dequantized f16 values. Blocks before the first dropped entry are not touched.
    pub fn retain(&mut self, layer: usize, head: usize, mut keep: impl FnMut(usize, u32) -> bool) {
        let bt = self.cfg.block_tokens;
        let si = self.stream_index(layer, head);
        let len = self.streams[si].len;
        let mut kept: Vec<usize> = Vec::with_capacity(len);
        for i in 0..len {
            let pos = self.pool.get(self.streams[si].blocks[i / bt]).pos[i % bt];
            if keep(i, pos) {
                kept.push(i);
            }
        }
        let new_len = kept.len();
        if new_len == len {
            return;
        }
        // Entries before the first dropped one stay where they are.
        let first = kept
            .iter()
            .enumerate()
            .take_while(|(w, &i)| *w == i)
            .count();
        // Every block from the first dropped entry on is rewritten or read: in RAM.
        self.make_resident(si, first / bt, usize::MAX);
        let target = self.quant_target(new_len);
        let old_nq = self.streams[si].n_quant;
        for b in target..(first / bt).min(old_nq) {
            self.convert(si, b, false);
        }
        // Compact the kept entries block by block. Destination block b receives entries from block b or later ones,
        // and later destinations receive entries past block b, so b can be rewritten once its entries are staged.
        let mut w = (first / bt) * bt;
        while w < new_len {
            let b = w / bt;
            let end = ((b + 1) * bt).min(new_len);
            let hk = self.stream_hk(si);
            for (slot, &src) in kept[w..end].iter().enumerate() {
                let block = self.pool.get(self.streams[si].blocks[src / bt]);
                self.stage.load(&self.cfg, hk, block, src % bt, slot);
            }
            self.store_block(si, b, end - w, b < target);
            w = end;
        }
        self.release_blocks_from(si, new_len.div_ceil(bt));
        let s = &mut self.streams[si];
        s.len = new_len;
        s.n_quant = target;
        if new_len == 0 {
            s.channels = None;
        }
        self.refresh_meta(si, first.min(target * bt));
        self.edits += 1;
        // The blocks brought back for the edit go back to disk now, not at the end of the whole compression.
        self.settle(true);
    }

    /// ThinK: keeps only the key channels `c` of (layer, KV head) with `keep[c]` (indexed by the model's channels,
    /// `keep.len() == head_dim_k`). Every block of the stream is rewritten with the kept channels only (the memory of
    /// the others is freed at once, and the byte counter drops); later entries store only those channels; attention
    /// scores q·k over them. Channels pruned earlier stay pruned. Quantized keys keep their codes and scales (per
    /// channel), so pruning adds no error. Values are untouched.
    ///
    /// Panics if `keep.len() != head_dim_k` (a programming error).
    pub fn prune_key_channels(&mut self, layer: usize, head: usize, keep: &[bool]) {
        assert_eq!(keep.len(), self.cfg.head_dim_k, "one flag per key channel");
        let si = self.stream_index(layer, head);
        let old: Vec<u16> = match &self.streams[si].channels {
            Some(c) => c.to_vec(),
            None => (0..self.cfg.head_dim_k as u16).collect(),
        };
        // Rows (stored channel indices) that survive.
        let rows: Vec<usize> = (0..old.len()).filter(|&r| keep[old[r] as usize]).collect();
        if rows.len() == old.len() {
            return;
        }
        self.make_resident(si, 0, usize::MAX);
        for &id in &self.streams[si].blocks {
            self.pool.keep_key_rows(id, &rows);
        }
        self.streams[si].channels = Some(rows.iter().map(|&r| old[r]).collect());
        self.refresh_meta(si, 0);
        self.edits += 1;
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Memory

    /// Gives free blocks back to the allocator (the byte counter drops accordingly).
    pub fn trim(&mut self) {
        self.pool.trim();
    }

    /// Bytes this cache holds right now (all existing blocks, used or free).
    pub fn bytes(&self) -> usize {
        self.pool.bytes()
    }

    /// Bytes of the entries in use (a quantized block's bytes shared out over its entries).
    pub fn used_bytes(&self) -> usize {
        let bt = self.cfg.block_tokens;
        (0..self.streams.len())
            .map(|si| {
                let s = &self.streams[si];
                let hk = self.stream_hk(si);
                let q = s.n_quant * Shape { quant: true, hk }.bytes(&self.cfg);
                let f = Shape { quant: false, hk }.bytes(&self.cfg) / bt;
                q + (s.len - s.n_quant * bt) * f
            })
            .sum()
    }

    pub fn peak_bytes(&self) -> usize {
        self.pool.peak_bytes()
    }

    pub fn reset_peak(&mut self) {
        self.pool.reset_peak();
    }

    // -----------------------------------------------------------------------------------------------------------------
    // Internals

    fn stream_index(&self, layer: usize, head: usize) -> usize {
        layer * self.cfg.n_kv_heads + head
    }

    /// Key channels stored by stream `si`.
    fn stream_hk(&self, si: usize) -> usize {
        self.streams[si]
            .channels
            .as_ref()
            .map_or(self.cfg.head_dim_k, |c| c.len())
    }

    /// Quantized blocks a stream of `len` entries should have.
    fn quant_target(&self, len: usize) -> usize {
        self.cfg.quant_blocks(len)
    }

    /// Block `i` of stream `si`.
    fn block_view(&self, si: usize, i: usize) -> BlockView<'_> {
        let s = &self.streams[si];
        let bt = self.cfg.block_tokens;
        let b = self.pool.get(s.blocks[i]);
        let n = (s.len - i * bt).min(bt);
        BlockView {
            data: &b.data,
            pos: &b.pos[..n],
            n,
            hk: self.stream_hk(si),
            channels: s.channels.as_deref(),
            bt,
            hv: self.cfg.head_dim_v,
            off: self.pool.off.as_ref(),
            id: s.blocks[i],
        }
    }

    /// Loads entries `[0, n)` of block `b` of stream `si` into the stage.
    fn stage_block(&mut self, si: usize, b: usize, n: usize) {
        self.make_resident(si, b, b + 1);
        let hk = self.stream_hk(si);
        let block = self.pool.get(self.streams[si].blocks[b]);
        for j in 0..n {
            self.stage.load(&self.cfg, hk, block, j, j);
        }
    }

    /// Writes the stage's first `n` entries into block `b` of stream `si`, quantized or not, swapping the block for one
    /// of the right shape if needed. Every entry the stream still needs from the old block must already be staged.
    fn store_block(&mut self, si: usize, b: usize, n: usize, quant: bool) {
        let shape = Shape {
            quant,
            hk: self.stream_hk(si),
        };
        let cur = self.streams[si].blocks[b];
        let id = if self.pool.shape(cur) == shape {
            cur
        } else {
            self.pool.release(cur);
            let id = self.pool.take(shape);
            self.streams[si].blocks[b] = id;
            id
        };
        self.stage
            .store(&self.cfg, shape.hk, self.pool.get_mut(id), n);
    }

    /// Rewrites block `b` of stream `si` quantized (`to_quant`) or in full precision.
    fn convert(&mut self, si: usize, b: usize, to_quant: bool) {
        let bt = self.cfg.block_tokens;
        let n = (self.streams[si].len - b * bt).min(bt);
        debug_assert!(!to_quant || n == bt, "only full blocks are quantized");
        self.stage_block(si, b, n);
        self.store_block(si, b, n, to_quant);
    }

    /// Sliding window: drops the leading blocks of stream `si` whose entries all lie before position `lo` (the oldest
    /// position a query still reads); such a layer keeps no page summaries ([`MetaConfig::keeps`]). Entries that
    /// remain keep their order; their indices shift down by the dropped count. This is not counted in
    /// [`Self::edits`]: selectors never select on sliding-window layers.
    fn slide(&mut self, si: usize, lo: u32) {
        let bt = self.cfg.block_tokens;
        let s = &self.streams[si];
        let mut nb = 0;
        while nb < s.blocks.len() {
            let last = ((nb + 1) * bt).min(s.len) - 1;
            if self.pool.get(s.blocks[nb]).pos[last % bt] >= lo {
                break;
            }
            nb += 1;
        }
        if nb == 0 {
            return;
        }
        let dropped = (nb * bt).min(s.len);
        let newest = self.pool.get(s.blocks[nb - 1]).pos[(dropped - 1) % bt];
        for i in 0..nb {
            self.pool.release(self.streams[si].blocks[i]);
        }
        let s = &mut self.streams[si];
        s.blocks.drain(..nb);
        s.len -= dropped;
        s.n_quant = s.n_quant.saturating_sub(nb);
        s.slid_to = s.slid_to.max(newest + 1);
        if s.len == 0 {
            s.channels = None;
        }
        debug_assert!(
            self.streams[si].meta.is_empty(),
            "sliding-window layers keep no page summaries"
        );
    }

    /// Releases blocks `[from, ..)` of stream `si` to the pool, in order, and drops them from the stream.
    fn release_blocks_from(&mut self, si: usize, from: usize) {
        for i in from..self.streams[si].blocks.len() {
            self.pool.release(self.streams[si].blocks[i]);
        }
        self.streams[si].blocks.truncate(from);
    }

    /// Cuts stream `si` to `len` entries: blocks past the end go to the free list, quantized blocks that fall back
    /// into the residual window are stored in full precision again (their quantization error stays).
    fn shrink(&mut self, si: usize, len: usize) {
        let bt = self.cfg.block_tokens;
        if self.streams[si].len <= len {
            return;
        }
        self.streams[si].len = len;
        self.edits += 1;
        self.release_blocks_from(si, len.div_ceil(bt));
        let target = self.quant_target(len);
        let nq = self.streams[si].n_quant.min(self.streams[si].blocks.len());
        for b in target..nq {
            self.convert(si, b, false);
        }
        let s = &mut self.streams[si];
        s.n_quant = s.n_quant.min(target);
        if len == 0 {
            s.channels = None;
            s.slid_to = 0;
        }
        // Summaries change from the first block stored in full precision again, else only in the last page.
        let from = if nq > target {
            len.min(target * bt)
        } else {
            len
        };
        self.refresh_meta(si, from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;
    use half::f16;

    /// Entry `j` of a block as (key, value), through the public readers.
    fn entry(b: &BlockView, j: usize) -> (Vec<f32>, Vec<f32>) {
        entry_hk(b, j, 4)
    }

    fn entry_hk(b: &BlockView, j: usize, hk: usize) -> (Vec<f32>, Vec<f32>) {
        let mut k = vec![0.0; hk];
        let mut v = vec![0.0; b.hv];
        b.read_key(j, &mut k);
        b.read_value(j, &mut v);
        (k, v)
    }

    fn cfg(dtype: KvDtype) -> KvConfig {
        KvConfig {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim_k: 4,
            head_dim_v: 3,
            block_tokens: 4,
            dtype,
            windows: Vec::new(),
        }
    }

    /// Prefill chunks appended split over a pool (by head and block) leave the same cache as entry by entry on one
    /// thread: entries, positions, page summaries and bytes, for f16 and f32, summaries on and off, pruned key
    /// channels, a sliding window, and chunks that start inside a block.
    #[test]
    fn split_appends_equal_serial_ones() {
        use super::meta::PageStat;
        use crate::testutil::Rng;
        let (nh, hd, bt) = (3, 8, 8);
        let build = |threads: usize, dtype: KvDtype, meta: Option<PageStat>| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let mut c = KvCache::new(KvConfig {
                    n_layers: 2,
                    n_kv_heads: nh,
                    head_dim_k: hd,
                    head_dim_v: hd,
                    block_tokens: bt,
                    dtype,
                    windows: vec![None, Some(100)],
                });
                if let Some(stat) = meta {
                    c.enable_meta(MetaConfig {
                        page_tokens: 4,
                        stat,
                        first_layer: 0,
                    });
                }
                let mut rng = Rng(5);
                let keep: Vec<bool> = (0..hd).map(|d| d % 3 != 1).collect();
                let mut p0 = 0u32;
                // 5 entries (serial on every pool), then chunks of 70, 129 and 64 (split where the pool has threads).
                for (i, n) in [5usize, 70, 129, 64].into_iter().enumerate() {
                    let pos: Vec<u32> = (p0..p0 + n as u32).collect();
                    let (k, v) = (rng.vec(n * nh * hd, 1.0), rng.vec(n * nh * hd, 1.0));
                    for l in 0..2 {
                        c.append(l, &pos, &k, &v);
                    }
                    if i == 1 {
                        c.prune_key_channels(0, 1, &keep);
                    }
                    p0 += n as u32;
                }
                c
            })
        };
        let dump = |c: &KvCache| {
            let mut out = Vec::new();
            for l in 0..2 {
                for h in 0..nh {
                    out.push(c.len(l, h) as f32);
                    out.extend(
                        c.key_channels(l, h)
                            .unwrap_or(&[])
                            .iter()
                            .map(|&x| x as f32),
                    );
                    out.extend(c.page_meta(l, h).iter().map(|x| x.to_f32()));
                    let si = c.stream_index(l, h);
                    for i in 0..c.len(l, h) {
                        let b = c.block_view(si, i / bt);
                        let (kk, vv) = entry_hk(&b, i % bt, hd);
                        out.push(b.pos[i % bt] as f32);
                        out.extend(kk);
                        out.extend(vv);
                    }
                }
            }
            (out, c.bytes())
        };
        for dtype in [KvDtype::F16, KvDtype::F32] {
            for meta in [None, Some(PageStat::MinMax), Some(PageStat::MeanStd)] {
                let (one, four) = (build(1, dtype, meta), build(4, dtype, meta));
                let (a, b) = (dump(&one), dump(&four));
                assert!(a.0.len() > 1000);
                assert_eq!(a.1, b.1, "{dtype:?} {meta:?}: bytes");
                assert!(
                    a.0.iter()
                        .zip(&b.0)
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                        && a.0.len() == b.0.len(),
                    "{dtype:?} {meta:?}: contents differ"
                );
            }
        }
    }

    /// Decode-step appends with and without page summaries: 30 layers × 3 KV heads of 64 channels, 8000 entries
    /// each, one token at a time. `cargo test --release --lib meta_append_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn meta_append_timing() {
        use crate::testutil::Rng;
        let (nl, nh, hd, len) = (30, 3, 64, 8000);
        let steps: usize = std::env::var("STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        let mut rng = Rng(9);
        use super::meta::PageStat;
        for meta in [None, Some(PageStat::MinMax), Some(PageStat::MeanStd)] {
            let mut c = KvCache::new(KvConfig {
                n_layers: nl,
                n_kv_heads: nh,
                head_dim_k: hd,
                head_dim_v: hd,
                block_tokens: 32,
                dtype: KvDtype::F16,
                windows: Vec::new(),
            });
            if let Some(stat) = meta {
                c.enable_meta(MetaConfig {
                    page_tokens: 8,
                    stat,
                    first_layer: 0,
                });
            }
            let pos: Vec<u32> = (0..len as u32).collect();
            let (k, v) = (rng.vec(len * nh * hd, 1.0), rng.vec(len * nh * hd, 1.0));
            for l in 0..nl {
                c.append(l, &pos, &k, &v);
            }
            let (k1, v1) = (rng.vec(nh * hd, 1.0), rng.vec(nh * hd, 1.0));
            let t = std::time::Instant::now();
            for s in 0..steps {
                for l in 0..nl {
                    c.append(l, &[(len + s) as u32], &k1, &v1);
                }
            }
            eprintln!(
                "{meta:?}: {:.1} us per token ({nl} layers x {nh} heads)",
                t.elapsed().as_secs_f64() * 1e6 / steps as f64
            );
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
                    let (k0, v0) = entry(&b, i);
                    let (k0, v0) = (k0[0], v0[2]);
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
                    let (k, v) = entry(&b, i);
                    let (k1, v2) = (k[1], v[2]);
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
        c.truncate_pos(7).unwrap();
        assert_eq!(c.len(0, 0), 7);
        assert_eq!(c.len(0, 1), 4);
        let kept: Vec<u32> = c.blocks(0, 1).flat_map(|b| b.pos.to_vec()).collect();
        assert_eq!(kept, vec![0, 2, 4, 6]);
        c.truncate_pos(0).unwrap();
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

    use crate::testutil::Rng;

    fn kivi(bits: u8, residual: usize, hk: usize, hv: usize, bt: usize) -> KvConfig {
        KvConfig {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim_k: hk,
            head_dim_v: hv,
            block_tokens: bt,
            dtype: KvDtype::Kivi { bits, residual },
            windows: Vec::new(),
        }
    }

    /// Every entry of (0, head) as (pos, key, value).
    fn dump(c: &KvCache, head: usize) -> Vec<(u32, Vec<f32>, Vec<f32>)> {
        let hk = c.cfg.head_dim_k;
        c.blocks(0, head)
            .flat_map(|b| {
                (0..b.n)
                    .map(|j| {
                        let (k, v) = entry_hk(&b, j, hk);
                        (b.pos[j], k, v)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn f16r(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }

    /// Half a quantization step of a group spanning [lo, hi] (with the f16 rounding of the minimum), plus slack.
    fn half_step(lo: f32, hi: f32, bits: u8) -> f32 {
        0.5 * ((hi - lo) + lo.abs() / 1024.0) / ((1u32 << bits) - 1) as f32 * 1.01 + 1e-6
    }

    #[test]
    fn kivi_quantizes_old_blocks_and_keeps_the_residual_exact() {
        for bits in quant::BITS_CHOICES {
            let (hk, hv, bt, r) = (4, 70, 4, 9);
            let mut c = KvCache::new(kivi(bits, r, hk, hv, bt));
            let mut rng = Rng(bits as u64 + 5);
            let n = 30;
            let k = rng.vec(n * 2 * hk, 1.0);
            let v = rng.vec(n * 2 * hv, 1.0);
            let pos: Vec<u32> = (0..n as u32).collect();
            // Two appends: quantization happens as blocks leave the window, across calls.
            c.append(0, &pos[..13], &k[..13 * 2 * hk], &v[..13 * 2 * hv]);
            assert_eq!(c.quantized_blocks(0, 1), 1); // (13 − 9) / 4
            c.append(0, &pos[13..], &k[13 * 2 * hk..], &v[13 * 2 * hv..]);
            let nq = (n - r) / bt; // 5 blocks, entries 0..20
            assert_eq!(c.quantized_blocks(0, 1), nq);
            let got = dump(&c, 1);
            for (t, (p, kk, vv)) in got.iter().enumerate() {
                assert_eq!(*p, t as u32);
                let kin = &k[(t * 2 + 1) * hk..][..hk];
                let vin = &v[(t * 2 + 1) * hv..][..hv];
                if t >= nq * bt {
                    // The residual window (and the rest of the unquantized blocks): f16, exact up to its rounding.
                    for (a, b) in kin.iter().zip(kk).chain(vin.iter().zip(vv)) {
                        assert_eq!(f16r(*a), *b, "entry {t}");
                    }
                    continue;
                }
                // Keys: the group is channel c over the entry's block.
                let b0 = t / bt * bt;
                for ch in 0..hk {
                    let grp: Vec<f32> = (b0..b0 + bt).map(|u| k[(u * 2 + 1) * hk + ch]).collect();
                    let (lo, hi) = grp
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                    // Keys were stored in f16 before being quantized: add its rounding.
                    let tol = half_step(lo, hi, bits) + kin[ch].abs() / 2048.0;
                    assert!((kk[ch] - kin[ch]).abs() <= tol, "bits {bits} key {t}.{ch}");
                }
                // Values: groups of 64 channels of one token.
                for (d, (a, b)) in vin.iter().zip(vv).enumerate() {
                    let g = &vin[d / 64 * 64..((d / 64 + 1) * 64).min(hv)];
                    let (lo, hi) = g
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                    let tol = half_step(lo, hi, bits) + a.abs() / 2048.0;
                    assert!((a - b).abs() <= tol, "bits {bits} value {t}.{d}");
                }
            }
            // Quantization really happened (int2 cannot be exact on random data).
            assert!(
                nq * bt <= n - r,
                "the newest r entries are among the exact ones"
            );
            if bits == 2 {
                assert!(got[0].1.iter().zip(&k[hk..2 * hk]).any(|(a, b)| a != b));
            }
        }
    }

    #[test]
    fn kivi_byte_counter_counts_packed_blocks() {
        // A real cache: 200 tokens, residual 40, 32-token blocks: 5 quantized blocks and 2 f16 blocks per stream.
        let (hk, hv) = (64, 64);
        let mut c = KvCache::new(kivi(4, 40, hk, hv, 32));
        let mut rng = Rng(3);
        let pos: Vec<u32> = (0..200).collect();
        c.append(
            0,
            &pos,
            &rng.vec(200 * 2 * hk, 1.0),
            &rng.vec(200 * 2 * hv, 1.0),
        );
        assert_eq!(c.quantized_blocks(0, 0), 5);
        c.trim();
        let qb = c.cfg.quant_block_bytes(hk);
        assert_eq!(qb, 80 * 32);
        assert_eq!(c.bytes(), 2 * (5 * qb + 2 * c.cfg.block_bytes()));
        assert_eq!(c.used_bytes(), 2 * (5 * qb + 40 * c.cfg.entry_bytes()));
    }

    #[test]
    fn kivi_retain_and_truncate_move_quantized_entries() {
        let (hk, hv, bt, r, bits) = (4, 6, 4, 6, 4u8);
        let mut c = KvCache::new(kivi(bits, r, hk, hv, bt));
        let mut rng = Rng(11);
        let n = 41;
        let pos: Vec<u32> = (0..n as u32).collect();
        c.append(
            0,
            &pos,
            &rng.vec(n * 2 * hk, 1.0),
            &rng.vec(n * 2 * hv, 1.0),
        );
        let before = dump(&c, 0);
        let other = dump(&c, 1);
        assert_eq!(c.quantized_blocks(0, 0), (n - r) / bt);
        // Keep entries 0..5 (an untouched prefix block) and every position ≢ 1 mod 3 after.
        c.retain(0, 0, |i, p| i < 5 || p % 3 != 1);
        let after = dump(&c, 0);
        let want: Vec<&(u32, Vec<f32>, Vec<f32>)> = before
            .iter()
            .filter(|(p, _, _)| *p < 5 || p % 3 != 1)
            .collect();
        assert_eq!(after.len(), want.len());
        let new_nq = (after.len() - r) / bt;
        assert_eq!(c.quantized_blocks(0, 0), new_nq);
        let src_nq = (n - r) / bt;
        for (w, ((p, k, v), (p0, k0, v0))) in after.iter().zip(want).enumerate() {
            assert_eq!(p, p0);
            let src_quant = (*p0 as usize) < src_nq * bt;
            if w < new_nq * bt || !src_quant {
                // Into a quantized block from a quantized one: the value row moves as codes; from f16: exact f16.
                // (A value re-quantized from f16 lies within half a step; exact when it moved as codes.)
                if src_quant {
                    assert_eq!(v, v0, "value of pos {p} moved as codes");
                } else if w >= new_nq * bt {
                    assert_eq!(v, v0, "f16 → f16 is exact");
                }
            } else {
                // Quantized entries landing in the f16 window keep their dequantized values (f16-rounded).
                let r0: Vec<f32> = v0.iter().map(|&x| f16r(x)).collect();
                assert_eq!(*v, r0);
            }
            // Keys re-quantized with their new block: within one step of a 4-bit grid over [-1, 1].
            for (a, b) in k.iter().zip(k0) {
                assert!((a - b).abs() <= 2.0 / 15.0, "key of pos {p}: {a} vs {b}");
            }
            if w < 4 {
                assert_eq!(
                    k, k0,
                    "the block before the first dropped entry is untouched"
                );
            }
        }
        assert_eq!(dump(&c, 1).len(), other.len(), "head 1 untouched");
        // truncate_pos into a quantized block: it goes back to f16 (keeping its values), and appends keep working.
        c.truncate_pos(30).unwrap();
        let t = dump(&c, 1);
        assert_eq!(t.len(), 30);
        assert_eq!(c.quantized_blocks(0, 1), (30 - r) / bt);
        for ((p, k, v), (p0, k0, v0)) in t.iter().zip(&other) {
            assert_eq!(p, p0);
            // Still-quantized blocks are untouched; the blocks back in the window hold their dequantized values in f16.
            let still = (*p as usize) < c.quantized_blocks(0, 1) * bt;
            let f: Vec<f32> = k0
                .iter()
                .chain(v0)
                .map(|&x| if still { x } else { f16r(x) })
                .collect();
            let g: Vec<f32> = k.iter().chain(v).copied().collect();
            assert_eq!(g, f);
        }
        let pos2: Vec<u32> = (30..50).collect();
        c.append(
            0,
            &pos2,
            &rng.vec(20 * 2 * hk, 1.0),
            &rng.vec(20 * 2 * hv, 1.0),
        );
        assert_eq!(c.len(0, 1), 50);
        assert_eq!(c.quantized_blocks(0, 1), (50 - r) / bt);
        let ps: Vec<u32> = dump(&c, 1).iter().map(|e| e.0).collect();
        assert_eq!(ps, (0..50).collect::<Vec<_>>());
        c.truncate_pos(0).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn pruned_key_channels_are_freed_and_stay_pruned() {
        for dtype in [
            KvDtype::F16,
            KvDtype::F32,
            KvDtype::Kivi {
                bits: 4,
                residual: 4,
            },
        ] {
            let (hk, hv, bt) = (8, 4, 4);
            let mut c = KvCache::new(KvConfig {
                n_layers: 1,
                n_kv_heads: 2,
                head_dim_k: hk,
                head_dim_v: hv,
                block_tokens: bt,
                dtype,
                windows: Vec::new(),
            });
            let mut rng = Rng(21);
            let pos: Vec<u32> = (0..18).collect();
            c.append(
                0,
                &pos,
                &rng.vec(18 * 2 * hk, 1.0),
                &rng.vec(18 * 2 * hv, 1.0),
            );
            let before = dump(&c, 0);
            let head1 = dump(&c, 1);
            let bytes0 = c.bytes();
            let keep = [true, false, true, true, false, false, true, false];
            c.prune_key_channels(0, 0, &keep);
            assert_eq!(c.key_channels(0, 0), Some(&[0u16, 2, 3, 6][..]));
            assert_eq!(c.key_dims(0, 0), 4);
            // 5 blocks lose 4 channels each: f16 2 bytes, f32 4 bytes per slot; quantized: codes + (min, scale).
            let per_block = match dtype {
                KvDtype::F16 => 4 * bt * 2,
                KvDtype::F32 => 4 * bt * 4,
                KvDtype::Kivi { bits, .. } => {
                    let nq = c.quantized_blocks(0, 0);
                    assert_eq!(nq, 3);
                    let q = 4 * (bt * bits as usize / 8 + 4);
                    assert_eq!(bytes0 - c.bytes(), nq * q + 2 * 4 * bt * 2);
                    0
                }
            };
            if per_block > 0 {
                assert_eq!(bytes0 - c.bytes(), 5 * per_block);
            }
            // Kept channels read back unchanged (no extra error, even quantized); pruned ones read 0.
            let after = dump(&c, 0);
            for ((p, k, v), (p0, k0, v0)) in after.iter().zip(&before) {
                assert_eq!((p, v), (p0, v0));
                for ch in 0..hk {
                    assert_eq!(k[ch], if keep[ch] { k0[ch] } else { 0.0 });
                }
            }
            assert_eq!(dump(&c, 1), head1, "other head untouched");
            // New entries store only the kept channels; retain moves compact entries; pruning again intersects.
            let knew = rng.vec(6 * 2 * hk, 1.0);
            c.append(
                0,
                &(18..24).collect::<Vec<u32>>(),
                &knew,
                &rng.vec(6 * 2 * hv, 1.0),
            );
            let e = dump(&c, 0);
            assert_eq!(e.len(), 24);
            let nq = c.quantized_blocks(0, 0) * bt;
            for (t, (_, k, _)) in e[18..].iter().enumerate() {
                for ch in 0..hk {
                    let x = knew[t * 2 * hk + ch];
                    let want = if !keep[ch] {
                        0.0
                    } else if dtype == KvDtype::F32 {
                        x
                    } else {
                        f16r(x)
                    };
                    if 18 + t < nq {
                        assert!(
                            (k[ch] - want).abs() <= 2.0 / 15.0,
                            "entry {} channel {ch}",
                            18 + t
                        );
                    } else {
                        assert_eq!(k[ch], want, "entry {} channel {ch}", 18 + t);
                    }
                }
            }
            c.retain(0, 0, |_, p| p % 2 == 0);
            assert_eq!(
                dump(&c, 0).iter().map(|e| e.0).collect::<Vec<_>>(),
                (0..24).step_by(2).collect::<Vec<u32>>()
            );
            let mut keep2 = [true; 8];
            keep2[0] = false;
            keep2[1] = true; // already pruned: stays pruned
            c.prune_key_channels(0, 0, &keep2);
            assert_eq!(c.key_channels(0, 0), Some(&[2u16, 3, 6][..]));
            assert!(dump(&c, 0)
                .iter()
                .all(|(_, k, _)| k[0] == 0.0 && k[1] == 0.0));
            // A stream cut to nothing forgets its mask.
            c.truncate_pos(0).unwrap();
            assert_eq!(c.key_channels(0, 0), None);
            c.append(0, &[0], &rng.vec(2 * hk, 1.0), &rng.vec(2 * hv, 1.0));
            assert_eq!(c.key_dims(0, 0), hk);
        }
    }

    /// Summaries recomputed from the stored entries, page by page.
    fn expected_meta(c: &KvCache, layer: usize, head: usize, m: MetaConfig) -> Vec<f16> {
        let hk = c.cfg.head_dim_k;
        let len = c.len(layer, head);
        let mut out = vec![f16::ZERO; len.div_ceil(m.page_tokens) * 2 * hk];
        let (mut k, mut v) = (vec![0.0; hk], vec![0.0; c.cfg.head_dim_v]);
        for p in 0..len.div_ceil(m.page_tokens) {
            let e1 = ((p + 1) * m.page_tokens).min(len);
            let mut keys = Vec::new();
            for e in p * m.page_tokens..e1 {
                c.read(layer, head, e, &mut k, &mut v);
                keys.extend_from_slice(&k);
            }
            meta::summarize(
                m.stat,
                &keys,
                e1 - p * m.page_tokens,
                hk,
                &mut out[p * 2 * hk..][..2 * hk],
            );
        }
        out
    }

    fn assert_meta_exact(c: &KvCache, m: MetaConfig, when: &str) {
        for layer in 0..c.cfg.n_layers {
            for head in 0..c.cfg.n_kv_heads {
                let want = expected_meta(c, layer, head, m);
                assert_eq!(
                    c.page_meta(layer, head),
                    &want[..],
                    "{when}: layer {layer} head {head}"
                );
                // The 8-bit copy is the summaries' quantization, page by page.
                let d = 2 * c.cfg.head_dim_k;
                let (codes, scales) = c.page_codes(layer, head);
                assert_eq!(scales.len() * d, want.len(), "{when}: pages of the copy");
                let mut q = vec![0i8; d];
                for (p, row) in want.chunks_exact(d).enumerate() {
                    let s = meta::quantize_page(m.stat, row, &mut q);
                    assert_eq!(
                        s.to_bits(),
                        scales[p].to_bits(),
                        "{when}: scale of page {p}"
                    );
                    assert_eq!(&codes[p * d..][..d], &q[..], "{when}: codes of page {p}");
                }
            }
        }
        let n: usize = (0..c.cfg.n_layers * c.cfg.n_kv_heads)
            .map(|si| c.streams[si].len.div_ceil(m.page_tokens))
            .sum();
        assert_eq!(
            c.meta_bytes(),
            n * meta::page_bytes(c.cfg.head_dim_k),
            "{when}: bytes"
        );
    }

    #[test]
    fn page_summaries_stay_exact_as_the_cache_changes() {
        use crate::testutil::Rng;
        for stat in [meta::PageStat::MinMax, meta::PageStat::MeanStd] {
            for dtype in [
                KvDtype::F16,
                KvDtype::Kivi {
                    bits: 4,
                    residual: 4,
                },
            ] {
                for page_tokens in [2, 4] {
                    let m = MetaConfig {
                        page_tokens,
                        stat,
                        first_layer: 0,
                    };
                    let mut rng = Rng(11);
                    let mut c = KvCache::new(cfg(dtype));
                    let pos: Vec<u32> = (0..5).collect();
                    c.append(0, &pos, &rng.vec(5 * 8, 1.0), &rng.vec(5 * 6, 1.0));
                    // Turned on over a filled cache, then kept as it grows one entry and one chunk at a time.
                    let bytes = c.bytes();
                    c.enable_meta(m);
                    assert!(c.bytes() > bytes);
                    assert_meta_exact(&c, m, "enabled");
                    // One entry at a time: a partly filled page folds in each new key (min/max), bit for bit.
                    for t in 5..9u32 {
                        c.append(0, &[t], &rng.vec(8, 1.0), &rng.vec(6, 1.0));
                        assert_meta_exact(&c, m, "appended one");
                    }
                    let pos: Vec<u32> = (9..23).collect();
                    c.append(0, &pos, &rng.vec(14 * 8, 2.0), &rng.vec(14 * 6, 1.0));
                    c.append(1, &pos, &rng.vec(14 * 8, 2.0), &rng.vec(14 * 6, 1.0));
                    assert_meta_exact(&c, m, "appended");
                    c.retain(0, 1, |i, _| i % 3 != 1);
                    assert_meta_exact(&c, m, "evicted");
                    c.write(0, 0, 2, &[9.0, -9.0, 0.5, 0.25], &[1.0, 2.0, 3.0]);
                    c.write(0, 0, 20, &[-3.0, 3.0, 0.5, 0.25], &[1.0, 2.0, 3.0]);
                    assert_meta_exact(&c, m, "overwritten");
                    c.prune_key_channels(0, 0, &[true, false, true, false]);
                    assert_meta_exact(&c, m, "pruned");
                    c.truncate_pos(13).unwrap();
                    assert_meta_exact(&c, m, "truncated");
                    // Appending after a truncation that cut a page: the summary covers only what is left.
                    for t in 13..17u32 {
                        c.append(0, &[t], &rng.vec(8, 0.5), &rng.vec(6, 1.0));
                        c.append(1, &[t], &rng.vec(8, 0.5), &rng.vec(6, 1.0));
                        assert_meta_exact(&c, m, "appended after truncation");
                    }
                    c.clear();
                    assert_eq!(c.meta_bytes(), 0);
                }
            }
        }
    }

    #[test]
    fn min_max_summaries_bound_every_score_of_their_page() {
        use crate::testutil::Rng;
        let m = MetaConfig {
            page_tokens: 4,
            stat: meta::PageStat::MinMax,
            first_layer: 0,
        };
        let mut c = KvCache::new(cfg(KvDtype::Kivi {
            bits: 2,
            residual: 4,
        }));
        c.enable_meta(m);
        let mut rng = Rng(5);
        let pos: Vec<u32> = (0..40).collect();
        c.append(0, &pos, &rng.vec(40 * 8, 3.0), &rng.vec(40 * 6, 1.0));
        let (mut k, mut v) = (vec![0.0; 4], vec![0.0; 3]);
        for _ in 0..20 {
            let q = rng.vec(4, 2.0);
            let meta = c.page_meta(0, 1);
            for e in 0..40 {
                c.read(0, 1, e, &mut k, &mut v);
                let s: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
                let page = &meta[(e / 4) * 8..][..8];
                let bound: f32 = (0..4)
                    .map(|d| (q[d] * page[d].to_f32()).max(q[d] * page[4 + d].to_f32()))
                    .sum();
                assert!(
                    s <= bound + 1e-5,
                    "entry {e}: q·k {s} above the page bound {bound}"
                );
            }
        }
    }
}
