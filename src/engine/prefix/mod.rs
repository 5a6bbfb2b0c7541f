//! Prefix caching: keep the KV cache of token prefixes and start later sessions from it instead of recomputing.
//!
//! Keys ([`key`]) are chained SHA-256 hashes over 32-token blocks under a [`Namespace`] (model file, model
//! configuration with RoPE, storage type, KV method with budget and options). What can be reused depends on the
//! session ([`entry::mode`]):
//! - a cache that keeps every entry (f16, f32, KIVI) is reused **block by block**: a request's longest cached prefix
//!   is found one 32-token block at a time, and restoring it gives the cache a recomputation would, bit for bit;
//! - a cache a method compressed (or whose sliding-window layers dropped entries) is reused only as a **whole
//!   snapshot of an exact prefix** under its method's key: a compressed prefix is not a prefix of a longer prompt's
//!   compressed cache.
//!
//! [`PrefixStore`] is synchronous and thread-safe (a mutex inside): `lookup` before a prefill, `Hit::restore` into an
//! empty session, feed the rest, `insert` after. The RAM tier evicts least recently used entries no hit holds, under a
//! byte budget; a request's blocks are stamped last block first, so a prefix's tail goes before its head.
//!
//! Below RAM, optional tiers ([`tier`]: a directory, Redis) keep block-reusable prefixes in units of
//! `codec.chunk_tokens` tokens as KV codec blobs ([`crate::kv::codec`], lossy, about 4× smaller than f16), keyed by
//! the chain key of the unit's last block and the unit size. A lookup continues in the tiers where RAM stops; a blob
//! that fails its checks is deleted and its prefix recomputed. Entries restored from a tier are the codec's
//! approximation of the cache, not the cache bit for bit.

pub mod disk;
pub mod entry;
pub mod key;
pub mod snapfile;
mod store;
pub mod tier;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Result};

use crate::engine::Session;
use crate::kv::codec::{self, CodecConfig, KvRows};
use disk::DiskTier;
pub use entry::Mode;
use entry::{BlockEntry, Snapshot};
pub use key::{Key, ModelId, Namespace, BLOCK};
pub use store::Counters;
use store::{Entry, Ram};
use tier::{RedisTier, Tier};

/// How a store is set up.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Bytes the RAM tier may hold.
    pub ram_bytes: usize,
    /// A directory of codec blobs (`--kv-disk DIR`).
    pub disk: Option<PathBuf>,
    /// Most bytes the directory may hold (`--kv-disk-max`); least recently used files go first. None: no limit.
    pub disk_max: Option<u64>,
    /// A Redis server, `redis://host:port[/db]`.
    pub redis: Option<String>,
    /// How blobs below RAM are encoded; `chunk_tokens` (a multiple of [`BLOCK`]) is also the tiers' unit.
    pub codec: CodecConfig,
}

impl StoreConfig {
    /// RAM only, at most `bytes`.
    pub fn ram(bytes: usize) -> Self {
        Self {
            ram_bytes: bytes,
            disk: None,
            disk_max: None,
            redis: None,
            codec: CodecConfig::default(),
        }
    }
}

/// What a lookup found: `tokens` leading tokens of the request, ready to restore into an empty session.
pub struct Hit {
    /// Cached tokens (0: nothing found; feed everything).
    pub tokens: usize,
    what: Found,
}

enum Found {
    Nothing,
    /// One source per block, in order.
    Blocks(Vec<Source>),
    Snapshot(Arc<Snapshot>),
    /// A snapshot read from a tier.
    SnapBlob(Arc<snapfile::SnapBlob>),
}

/// Where one block of a hit comes from.
#[derive(Clone)]
enum Source {
    /// The RAM tier: the blocks themselves.
    Exact(Arc<BlockEntry>),
    /// A decoded tier unit, and the block's index in it.
    Rows(Arc<KvRows>, usize),
}

impl Hit {
    /// Puts the cached prefix into `s`, which must be empty and made with the configuration the lookup's namespace
    /// came from; `s.tokens` then holds the prefix. Feed the request's remaining tokens next.
    pub fn restore(&self, s: &mut Session, request: &[u32]) -> Result<()> {
        if s.n_past() != 0 {
            bail!(
                "a cached prefix goes into an empty session (this one holds {} tokens)",
                s.n_past()
            );
        }
        if request.len() < self.tokens {
            bail!("the request has fewer tokens than the hit it was looked up with");
        }
        match &self.what {
            Found::Nothing => return Ok(()),
            Found::Blocks(b) => {
                if let Err(e) = restore_sources(s, b) {
                    s.reset();
                    return Err(e);
                }
                s.tokens = request[..self.tokens].to_vec();
            }
            Found::Snapshot(snap) => {
                if snap.tokens[..] != request[..self.tokens] {
                    bail!("the snapshot's tokens are not the request's prefix");
                }
                snap.restore(s)?;
            }
            Found::SnapBlob(snap) => {
                if snap.tokens[..] != request[..self.tokens] {
                    bail!("the snapshot's tokens are not the request's prefix");
                }
                if let Err(e) = snap.restore(s) {
                    s.reset();
                    return Err(e);
                }
            }
        }
        s.acc.sync_len(&s.cache);
        s.note_bytes();
        Ok(())
    }
}

/// Appends the blocks of `sources` to `s`'s empty cache: runs of RAM blocks exactly, tier rows through the cache's
/// append.
fn restore_sources(s: &mut Session, sources: &[Source]) -> Result<()> {
    let mut i = 0;
    while i < sources.len() {
        match &sources[i] {
            Source::Exact(_) => {
                let run: Vec<&BlockEntry> = sources[i..]
                    .iter()
                    .map_while(|x| match x {
                        Source::Exact(e) => Some(e.as_ref()),
                        Source::Rows(..) => None,
                    })
                    .collect();
                entry::restore_blocks(s, &run)?;
                i += run.len();
            }
            Source::Rows(rows, b) => {
                let n = sources[i..]
                    .iter()
                    .take_while(|x| matches!(x, Source::Rows(r, _) if Arc::ptr_eq(r, rows)))
                    .count();
                rows.slice(b * BLOCK, (b + n) * BLOCK)
                    .append_to(&mut s.cache)?;
                i += n;
            }
        }
    }
    Ok(())
}

/// A store of cached prefixes (see the module documentation).
pub struct PrefixStore {
    ram: Mutex<Ram>,
    tiers: Vec<Box<dyn Tier>>,
    codec: CodecConfig,
    /// Tier counters (apart from the RAM tier's lock).
    tier_counters: Mutex<TierCounters>,
}

/// What the tiers below RAM did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// Units found and decoded.
    pub hits: u64,
    /// Units written.
    pub writes: u64,
    /// Blobs refused (failed checks: deleted) or calls that failed.
    pub errors: u64,
    /// Blobs removed to stay under a tier's size limit.
    pub evictions: u64,
}

impl PrefixStore {
    /// A RAM-only store.
    pub fn new(cfg: &StoreConfig) -> Self {
        Self {
            ram: Mutex::new(Ram::new(cfg.ram_bytes)),
            tiers: Vec::new(),
            codec: cfg.codec.clone(),
            tier_counters: Mutex::default(),
        }
    }

    /// A store with the tiers `cfg` names (directory created, Redis pinged).
    pub fn open(cfg: &StoreConfig) -> Result<Self> {
        let unit = cfg.codec.chunk_tokens;
        if unit == 0 || !unit.is_multiple_of(BLOCK) {
            bail!("the KV store's unit of {unit} tokens is not a multiple of its {BLOCK}-token blocks");
        }
        let mut s = Self::new(cfg);
        if let Some(d) = &cfg.disk {
            s.tiers.push(Box::new(DiskTier::open(d, cfg.disk_max)?));
        }
        if let Some(u) = &cfg.redis {
            s.tiers.push(Box::new(RedisTier::open(u)?));
        }
        Ok(s)
    }

    pub fn tier_counters(&self) -> TierCounters {
        let mut c = *self.tier_counters.lock().unwrap_or_else(|p| p.into_inner());
        c.evictions = self.tiers.iter().map(|t| t.evictions()).sum();
        c
    }

    fn note_tier(&self, f: impl FnOnce(&mut TierCounters)) {
        f(&mut self.tier_counters.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Key of the tier unit whose last block has chain key `last`.
    fn unit_key(&self, last: &Key) -> Key {
        last.derive(b"unit", self.codec.chunk_tokens as u64)
    }

    /// Extends `sources` (blocks 0.. of a prefix whose block keys are `keys`) from the tiers, one whole unit at a time.
    /// Units are fetched and decoded in parallel (a unit is one codec chunk, which decodes on one thread); what each
    /// found (hits, refused blobs to delete) is then applied in order up to the first unit no tier serves, so the
    /// store counts and deletes what a walk unit by unit would have, and units past a gap are left as they are.
    fn tier_lookup(&self, keys: &[Key], sources: &mut Vec<Source>) {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let unit = self.codec.chunk_tokens;
        let ub = unit / BLOCK;
        let first = sources.len() / ub;
        let units = keys.len() / ub;
        if first >= units {
            return;
        }
        let gap = AtomicUsize::new(usize::MAX);
        let found: Vec<Option<(Key, Probe<KvRows>)>> = (first..units)
            .into_par_iter()
            .map(|u| {
                if u > gap.load(Ordering::Relaxed) {
                    return None;
                }
                let key = self.unit_key(&keys[(u + 1) * ub - 1]);
                let probe = self.tier_probe(&key, |blob| Self::unit_rows(blob, u * unit, unit));
                if probe.found.is_none() {
                    gap.fetch_min(u, Ordering::Relaxed);
                }
                Some((key, probe))
            })
            .collect();
        for (u, f) in (first..).zip(found) {
            let Some((key, probe)) = f else {
                return;
            };
            let Some(rows) = self.tier_apply(&key, "entry", probe) else {
                return;
            };
            let rows = Arc::new(rows);
            for b in sources.len()..(u + 1) * ub {
                sources.push(Source::Rows(rows.clone(), b - u * ub));
            }
        }
    }

    /// A unit's rows from its blob (tokens at positions `start..start + n`).
    fn unit_rows(blob: &[u8], start: usize, n: usize) -> Result<KvRows> {
        let r = codec::decode(blob)?;
        let want: Vec<u32> = (start as u32..(start + n) as u32).collect();
        if r.tokens != n || r.pos != want {
            bail!(
                "holds {} tokens at other positions than the unit's",
                r.tokens
            );
        }
        Ok(r)
    }

    /// `key`'s blob from the first tier that has one that `decode` accepts, counted as a hit. A tier that fails to
    /// answer is counted as an error; a blob `decode` refuses (a `what` of the tier) is counted and deleted, so its
    /// prefix is recomputed.
    fn tier_find<T>(
        &self,
        key: &Key,
        what: &str,
        decode: impl Fn(&[u8]) -> Result<T>,
    ) -> Option<T> {
        let probe = self.tier_probe(key, decode);
        self.tier_apply(key, what, probe)
    }

    /// The tiers asked for `key` in order until one has a blob `decode` accepts, with nothing counted or deleted
    /// yet: what was seen is kept for [`Self::tier_apply`].
    fn tier_probe<T>(&self, key: &Key, decode: impl Fn(&[u8]) -> Result<T>) -> Probe<T> {
        let mut seen = Vec::new();
        for (i, t) in self.tiers.iter().enumerate() {
            let blob = match t.get(key) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    seen.push((i, Seen::Unanswered(e)));
                    continue;
                }
            };
            match decode(&blob) {
                Ok(v) => {
                    return Probe {
                        seen,
                        found: Some(v),
                    }
                }
                Err(e) => seen.push((i, Seen::Refused(e))),
            }
        }
        Probe { seen, found: None }
    }

    /// Counts (and for refused blobs, deletes) what a probe of `key` saw; its value if a tier served one.
    fn tier_apply<T>(&self, key: &Key, what: &str, probe: Probe<T>) -> Option<T> {
        for (i, s) in probe.seen {
            let t = &self.tiers[i];
            self.note_tier(|c| c.errors += 1);
            match s {
                Seen::Unanswered(e) => eprintln!("warning: KV store {}: {e:#}", t.name()),
                Seen::Refused(e) => {
                    eprintln!(
                        "warning: KV store {}: {what} {key:?} refused ({e:#}); deleted, its prefix is recomputed",
                        t.name()
                    );
                    let _ = t.remove(key);
                }
            }
        }
        if probe.found.is_some() {
            self.note_tier(|c| c.hits += 1);
        }
        probe.found
    }

    /// The tiers that do not hold `key` (a tier that cannot say counts as lacking it).
    fn lacking(&self, key: &Key) -> Vec<&dyn Tier> {
        self.tiers
            .iter()
            .filter(|t| !t.contains(key).unwrap_or(false))
            .map(|t| t.as_ref())
            .collect()
    }

    /// Writes the whole units of `s`'s tokens that some tier lacks. Units encode alone, so the lacking ones are
    /// encoded in parallel (an engine step waits for this), then written in order.
    fn tier_insert(&self, keys: &[Key], s: &Session) {
        use rayon::prelude::*;
        let unit = self.codec.chunk_tokens;
        let ub = unit / BLOCK;
        let todo: Vec<(usize, Key, Vec<&dyn Tier>)> = (0..keys.len() / ub)
            .filter_map(|u| {
                let key = self.unit_key(&keys[(u + 1) * ub - 1]);
                let lacking = self.lacking(&key);
                (!lacking.is_empty()).then_some((u, key, lacking))
            })
            .collect();
        let (cache, cfg) = (&s.cache, &self.codec);
        let blobs: Vec<Result<Vec<u8>>> = todo
            .par_iter()
            .map(|&(u, _, _)| {
                KvRows::from_cache(cache, u * unit, (u + 1) * unit)
                    .and_then(|r| codec::encode(&r, cfg))
            })
            .collect();
        for ((_, key, lacking), blob) in todo.iter().zip(blobs) {
            let blob = match blob {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("warning: KV store: encoding a prefix unit: {e:#}");
                    self.note_tier(|c| c.errors += 1);
                    return;
                }
            };
            for t in lacking {
                match t.put(key, &blob) {
                    Ok(()) => self.note_tier(|c| c.writes += 1),
                    Err(e) => {
                        eprintln!("warning: KV store {}: {e:#}", t.name());
                        self.note_tier(|c| c.errors += 1);
                    }
                }
            }
        }
    }

    /// Tier key of the snapshot whose exact key is `exact`.
    fn snap_key(exact: &Key) -> Key {
        exact.derive(b"snapshot", 1)
    }

    /// The longest snapshot in a tier of an exact prefix of `usable` longer than `than` tokens. A blob that fails its
    /// checks (or holds other tokens) is deleted.
    fn tier_snapshot(&self, ns: &Namespace, usable: &[u32], than: usize) -> Option<Hit> {
        let mut lens: Vec<usize> = Vec::new();
        for t in &self.tiers {
            match t.snap_lens(&ns.0) {
                Ok(l) => lens.extend(l),
                Err(e) => {
                    eprintln!("warning: KV store {}: {e:#}", t.name());
                    self.note_tier(|c| c.errors += 1);
                }
            }
        }
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        for len in lens {
            if len > usable.len() || len <= than {
                continue;
            }
            let key = Self::snap_key(&ns.exact_key(&usable[..len]));
            let snap = self.tier_find(&key, "snapshot", |blob| {
                let b = snapfile::decode(blob)?;
                if b.tokens[..] != usable[..len] {
                    bail!("holds another prefix than its key's");
                }
                Ok(b)
            });
            if let Some(b) = snap {
                return Some(Hit {
                    tokens: len,
                    what: Found::SnapBlob(Arc::new(b)),
                });
            }
        }
        None
    }

    /// Writes `snap` (of the exact prefix keyed `exact`) to the tiers that lack it, and notes its length under `ns`.
    fn tier_insert_snapshot(&self, ns: &Namespace, exact: &Key, snap: &Snapshot) {
        let key = Self::snap_key(exact);
        let lacking = self.lacking(&key);
        if lacking.is_empty() {
            return;
        }
        // A kind of cache the tiers do not hold: RAM only.
        let Some(blob) = snapfile::encode(snap) else {
            return;
        };
        for t in lacking {
            match t
                .put(&key, &blob)
                .and_then(|()| t.add_snap_len(&ns.0, snap.tokens.len()))
            {
                Ok(()) => self.note_tier(|c| c.writes += 1),
                Err(e) => {
                    eprintln!("warning: KV store {}: {e:#}", t.name());
                    self.note_tier(|c| c.errors += 1);
                }
            }
        }
    }

    fn ram(&self) -> MutexGuard<'_, Ram> {
        // A panic while holding the lock leaves entries whole (each change is one insert or remove): keep going.
        self.ram.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest cached prefix of `tokens` under `ns`, leaving at least one token to feed (its logits are the
    /// next token's). Counts a hit or a miss.
    pub fn lookup(&self, ns: &Namespace, tokens: &[u32]) -> Hit {
        let usable = &tokens[..tokens.len().saturating_sub(1)];
        let mut ram = self.ram();
        // Block by block.
        let keys = ns.block_keys(usable);
        let mut found: Vec<Source> = Vec::new();
        for k in &keys {
            match ram.block(k) {
                Some(b) => found.push(Source::Exact(b.clone())),
                None => break,
            }
        }
        let in_ram = found.len();
        if !self.tiers.is_empty() {
            // No tier I/O under the lock.
            drop(ram);
            self.tier_lookup(&keys, &mut found);
            ram = self.ram();
        }
        let quant: Vec<bool> = found
            .iter()
            .map(|e| matches!(e, Source::Exact(e) if e.quant))
            .collect();
        let residual = found
            .iter()
            .find_map(|e| match e {
                Source::Exact(e) => Some(e.residual),
                Source::Rows(..) => None,
            })
            .unwrap_or(0);
        found.truncate(entry::restorable(&quant, residual));
        let mut hit = Hit {
            tokens: found.len() * BLOCK,
            what: Found::Blocks(found),
        };
        // Exact snapshots, longest first, when longer than the blocks found.
        for len in ram.snap_lens(ns) {
            if len > usable.len() || len <= hit.tokens {
                continue;
            }
            let key = ns.exact_key(&usable[..len]);
            if let Some(s) = ram.snapshot(&key) {
                hit = Hit {
                    tokens: len,
                    what: Found::Snapshot(s.clone()),
                };
                ram.touch(&key);
                break;
            }
        }
        if !self.tiers.is_empty() && !matches!(hit.what, Found::Snapshot(_)) {
            drop(ram);
            if let Some(h) = self.tier_snapshot(ns, usable, hit.tokens) {
                hit = h;
            }
            ram = self.ram();
        }
        if let Found::Blocks(b) = &hit.what {
            // Last block first: the head of a prefix is the most recently used, and goes last.
            for k in keys[..b.len().min(in_ram)].iter().rev() {
                ram.touch(k);
            }
        }
        if hit.tokens == 0 {
            ram.counters.misses += 1;
            hit.what = Found::Nothing;
        } else {
            ram.counters.hits += 1;
            ram.counters.hit_tokens += hit.tokens as u64;
        }
        hit
    }

    /// Stores what `s` holds under `ns`: each whole block of its tokens not stored yet (block-reusable caches), or a
    /// snapshot of its exact token history (others). Returns the number of entries stored.
    pub fn insert(&self, ns: &Namespace, s: &Session) -> Result<usize> {
        if s.tokens.is_empty() {
            return Ok(0);
        }
        match entry::mode(s) {
            Mode::Blocks => {
                let keys = ns.block_keys(&s.tokens);
                if (0..s.cache.cfg.n_layers).any(|l| {
                    (0..s.cache.cfg.n_kv_heads).any(|h| s.cache.len(l, h) != s.tokens.len())
                }) {
                    bail!("the session's cache does not hold one entry per token in every stream");
                }
                // Captured before taking the lock (copies of the blocks not stored yet, or stored quantized).
                let missing: Vec<bool> = {
                    let ram = self.ram();
                    keys.iter()
                        .map(|k| ram.block(k).is_none_or(|e| e.quant))
                        .collect()
                };
                let captured: Vec<Option<BlockEntry>> = (0..keys.len())
                    .map(|b| {
                        missing[b]
                            .then(|| BlockEntry::capture(&s.cache, b))
                            .flatten()
                    })
                    .collect();
                let mut stored = 0;
                let mut ram = self.ram();
                // Last block first, so that the head of the prefix is the most recently used and goes last.
                for (key, e) in keys.iter().zip(captured).rev() {
                    match e {
                        // A full-precision block replaces a quantized one (it can be restored in more places).
                        Some(e) if ram.block(key).is_none() || !e.quant => {
                            ram.put(*key, Entry::Block(Arc::new(e)), None);
                            stored += 1;
                        }
                        _ => ram.touch(key),
                    }
                }
                drop(ram);
                if !self.tiers.is_empty() {
                    self.tier_insert(&keys, s);
                }
                Ok(stored)
            }
            Mode::Snapshot => {
                let key = ns.exact_key(&s.tokens);
                if self.ram().snapshot(&key).is_some() {
                    self.ram().touch(&key);
                    return Ok(0);
                }
                let snap = Arc::new(Snapshot::capture(s)?);
                self.ram()
                    .put(key, Entry::Snap(snap.clone()), Some((*ns, s.tokens.len())));
                if !self.tiers.is_empty() {
                    self.tier_insert_snapshot(ns, &key, &snap);
                }
                Ok(1)
            }
        }
    }

    pub fn counters(&self) -> Counters {
        self.ram().counters
    }

    /// Per tier below RAM: its kind ("disk", "redis") and the bytes it holds (or why they could not be counted).
    pub fn tier_bytes(&self) -> Vec<(&'static str, Result<u64>)> {
        self.tiers
            .iter()
            .map(|t| (t.kind(), t.held_bytes()))
            .collect()
    }

    /// Bytes and entries the RAM tier holds.
    pub fn ram_usage(&self) -> (usize, usize) {
        let ram = self.ram();
        (ram.bytes(), ram.len())
    }
}

impl Namespace {
    /// The namespace of `s`'s configuration on the model file `id`.
    pub fn of_session(id: ModelId, s: &Session) -> Self {
        Self::new(id, s.model.config(), &s.cfg, s.cache.cfg.dtype)
    }
}

/// What asking the tiers for one key saw (see `PrefixStore::tier_probe`).
struct Probe<T> {
    /// (tier index, what went wrong there), in tier order.
    seen: Vec<(usize, Seen)>,
    found: Option<T>,
}

enum Seen {
    /// The tier failed to answer.
    Unanswered(anyhow::Error),
    /// Its blob failed to decode.
    Refused(anyhow::Error),
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
