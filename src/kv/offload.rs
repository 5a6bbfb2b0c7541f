//! KV offload (InstInfer's idea, on a CPU): at most `--resident` bytes of KV blocks stay in RAM, the rest live in a
//! file and are read back on demand, by the blocks attention actually reads.
//!
//! InstInfer (Pan et al., "InstInfer: In-Storage Attention Offloading for Cost-Effective Long-Context LLM Inference",
//! 2024) keeps the KV cache in flash and runs decode attention next to it. On a CPU the storage cannot compute, so
//! here the blocks come back: a block on disk is read with an explicit `read_at` into the reading task's scratch (no
//! mmap, no page-cache illusion: the byte counter counts what this process holds), folded like an f16 block, and
//! promoted into RAM between steps if it keeps being read. With a decode-time selector only the selected blocks are
//! read, so the working set is the selection, not the context.
//!
//! - **What stays in RAM**: every block's positions (attention masks and truncation search them), the page summaries
//!   selectors score, the open (partly filled) last block of each stream, and as many whole f16 blocks as the limit
//!   leaves room for. That floor cannot leave RAM: resident bytes are at most max(limit, floor) between steps, and
//!   within a prompt chunk, which spills after each layer ([`super::KvCache::spill_to_limit`]), that plus the blocks
//!   one layer's streams open (up to ⌈chunk / block⌉ + 1 each; `engine::memplan` plans them).
//! - **LRU**: every block the attention kernel folds is stamped with the current step
//!   ([`super::BlockView::mark_read`]); a block attention skips (outside a sliding window, not selected) keeps its old
//!   stamp, and reads by other readers (a selector scoring keys, a compression method) do not count, so what stays
//!   in RAM is what attention reads. Between steps, [`super::KvCache::rebalance`] keeps the most recently read blocks
//!   in RAM up to the limit (ties keep what is already resident, then newer blocks), spills the others and promotes
//!   the disk blocks that made the cut. Full attention reads every block every step, so nothing churns; a selector's
//!   selection becomes resident after one step.
//! - **The file**: `DIR/hayloft-kv-<pid>-<nonce>.kv`, created fresh (never an existing file), removed when the cache is
//!   dropped. A 64-byte header (magic, format version, a random per-run nonce, the cache geometry, a checksum of the
//!   header), then fixed-size slots of one block each: keys (f16, transposed as in RAM), values (f16), positions
//!   (u32), and a CRC-32 of the nonce, the slot index and those bytes. Every read checks the checksum. A file that a
//!   killed run left behind is never reused; [`OffloadReader`] opens one for inspection and refuses a foreign,
//!   truncated or corrupted file with an error naming the file and the problem.
//! - **Accounting**: bytes read from the file count as KV bytes read (the cache's read counter) and, separately, as
//!   disk reads ([`super::KvCache::disk_read_bytes`]); a block on disk costs 0 in [`super::BlockView::entry_bytes`],
//!   its read is counted where it happens (a whole slot, even when a selection reads a few of its entries).
//! - **Readers' buffers**: each reader keeps the last block it read from disk ([`OffloadBuf`]: one per attention task,
//!   one per thread for the per-entry readers), scratch like the kernel's f32 tiles, outside the byte counter; a
//!   block read again while still on disk is read again. Prefill attention reads each block on disk once per query
//!   tile of the chunk: offload costs prefill more than decode.
//!
//! Offload stores f16 blocks with every key channel: KIVI-quantized and f32 storage and ThinK's pruned channels are
//! refused when the cache is set up ([`super::KvCache::enable_offload`]). Methods that edit the cache (eviction,
//! merging, truncation) bring the blocks they edit back into RAM first.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use half::f16;

use super::{KvConfig, KvDtype};

/// First bytes of an offload file.
pub const MAGIC: [u8; 8] = *b"HLKVOFF\0";
/// Layout version of the header and slots.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first slot.
pub const HEADER_BYTES: usize = 64;
/// Geometry's code for f16 blocks (the only storage offloaded).
const DTYPE_F16: u32 = 1;

// ---------------------------------------------------------------------------------------------------------------------
// Configuration

/// How much of the KV cache may stay in RAM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resident {
    /// At most this many bytes.
    Bytes(usize),
    /// At most this share of what the cache would hold with every block in RAM, in (0, 1].
    Share(f64),
}

impl Resident {
    /// The byte limit for a cache that would hold `total` bytes with every block in RAM.
    pub fn limit(self, total: usize) -> usize {
        match self {
            Resident::Bytes(b) => b,
            Resident::Share(s) => (total as f64 * s) as usize,
        }
    }
}

impl std::str::FromStr for Resident {
    type Err = anyhow::Error;

    /// A size with a unit (`64MiB`, `1.5GiB`, `512KiB`, `100MB`, `4096B`) or a share of the cache in (0, 1] (`0.25`).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.is_empty() || t.chars().all(|c| c.is_ascii_digit() || c == '.') {
            let x: f64 = t.parse().map_err(|_| {
                anyhow::anyhow!(
                    "give a size with a unit (64MiB, 1.5GiB, 512KiB, 100MB) or a share of the cache \
                     in (0, 1] (0.25)"
                )
            })?;
            if !(x > 0.0 && x <= 1.0) {
                bail!(
                    "a number without a unit is a share of the cache and must lie in (0, 1]; \
                     give a size with a unit (e.g. {s}MiB) for bytes"
                );
            }
            return Ok(Resident::Share(x));
        }
        crate::util::parse_size(t).map(Resident::Bytes)
    }
}

impl fmt::Display for Resident {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Resident::Bytes(b) => write!(f, "{b}B"),
            Resident::Share(s) => write!(f, "{s}"),
        }
    }
}

/// `--kv-offload DIR --resident N`.
#[derive(Clone, Debug, PartialEq)]
pub struct OffloadConfig {
    /// Where the offload file is created (made if missing).
    pub dir: PathBuf,
    pub resident: Resident,
}

// ---------------------------------------------------------------------------------------------------------------------
// The file format

/// The cache geometry a file is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim_k: u32,
    pub head_dim_v: u32,
    pub block_tokens: u32,
    /// 1 = f16.
    pub dtype: u32,
}

impl Geometry {
    /// The geometry of a cache; None for storage that is not offloaded (only f16 is).
    pub fn of(cfg: &KvConfig) -> Option<Self> {
        (cfg.dtype == KvDtype::F16).then_some(Geometry {
            n_layers: cfg.n_layers as u32,
            n_kv_heads: cfg.n_kv_heads as u32,
            head_dim_k: cfg.head_dim_k as u32,
            head_dim_v: cfg.head_dim_v as u32,
            block_tokens: cfg.block_tokens as u32,
            dtype: DTYPE_F16,
        })
    }

    fn k_len(&self) -> usize {
        (self.head_dim_k * self.block_tokens) as usize
    }

    fn v_len(&self) -> usize {
        (self.head_dim_v * self.block_tokens) as usize
    }

    /// Bytes of one slot's block (keys, values, positions), without its checksum.
    pub fn payload_bytes(&self) -> usize {
        2 * (self.k_len() + self.v_len()) + 4 * self.block_tokens as usize
    }

    /// Bytes of one slot: the block and its CRC-32.
    pub fn slot_bytes(&self) -> usize {
        self.payload_bytes() + 4
    }

    /// Offset of slot `i` in the file.
    pub fn slot_offset(&self, i: u32) -> u64 {
        HEADER_BYTES as u64 + i as u64 * self.slot_bytes() as u64
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let dtype = if self.dtype == DTYPE_F16 {
            "f16".to_string()
        } else {
            format!("dtype code {}", self.dtype)
        };
        write!(
            f,
            "{} layers × {} KV heads, key/value dims {}/{}, {}-token blocks, {dtype}",
            self.n_layers, self.n_kv_heads, self.head_dim_k, self.head_dim_v, self.block_tokens
        )
    }
}

fn header(g: &Geometry, nonce: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&g.dtype.to_le_bytes());
    h[16..24].copy_from_slice(&nonce.to_le_bytes());
    let dims = [
        g.n_layers,
        g.n_kv_heads,
        g.head_dim_k,
        g.head_dim_v,
        g.block_tokens,
    ];
    for (i, d) in dims.iter().enumerate() {
        h[24 + 4 * i..][..4].copy_from_slice(&d.to_le_bytes());
    }
    let crc = crc32fast::hash(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks a header's magic, version and checksum; returns its geometry and nonce.
fn parse_header(h: &[u8; HEADER_BYTES]) -> std::result::Result<(Geometry, u64), String> {
    if h[..8] != MAGIC {
        return Err("not a hayloft KV offload file (bad magic)".into());
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    let (stored, computed) = (u32_at(h, 44), crc32fast::hash(&h[..44]));
    if stored != computed {
        return Err(format!(
            "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is corrupted"
        ));
    }
    let g = Geometry {
        dtype: u32_at(h, 12),
        n_layers: u32_at(h, 24),
        n_kv_heads: u32_at(h, 28),
        head_dim_k: u32_at(h, 32),
        head_dim_v: u32_at(h, 36),
        block_tokens: u32_at(h, 40),
    };
    let nonce = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    Ok((g, nonce))
}

/// CRC-32 of a slot: the run's nonce, the slot index and the block's bytes, so a slot copied from another run or
/// another place in the file fails the check.
fn slot_crc(nonce: u64, slot: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&nonce.to_le_bytes());
    h.update(&slot.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes a block (keys `k`, values `v`, positions `pos`) and its checksum into `out` (one slot).
fn encode_slot(nonce: u64, slot: u32, k: &[f16], v: &[f16], pos: &[u32], out: &mut [u8]) {
    let mut w = 0;
    for x in k.iter().chain(v) {
        out[w..w + 2].copy_from_slice(&x.to_bits().to_le_bytes());
        w += 2;
    }
    for p in pos {
        out[w..w + 4].copy_from_slice(&p.to_le_bytes());
        w += 4;
    }
    let crc = slot_crc(nonce, slot, &out[..w]);
    out[w..w + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a slot's checksum and decodes it into `k`, `v` and `pos`.
fn decode_slot(
    nonce: u64,
    slot: u32,
    raw: &[u8],
    k: &mut [f16],
    v: &mut [f16],
    pos: &mut [u32],
) -> std::result::Result<(), String> {
    let n = raw.len() - 4;
    let (stored, computed) = (u32_at(raw, n), slot_crc(nonce, slot, &raw[..n]));
    if stored != computed {
        return Err(format!(
            "slot {slot}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the block is corrupted"
        ));
    }
    let mut r = 0;
    for x in k.iter_mut().chain(v.iter_mut()) {
        *x = f16::from_bits(u16::from_le_bytes([raw[r], raw[r + 1]]));
        r += 2;
    }
    for p in pos.iter_mut() {
        *p = u32_at(raw, r);
        r += 4;
    }
    Ok(())
}

/// Reads slot `slot` of `file` into `raw` (one slot's bytes).
fn read_raw(
    file: &File,
    g: &Geometry,
    slot: u32,
    raw: &mut [u8],
) -> std::result::Result<(), String> {
    file.read_exact_at(raw, g.slot_offset(slot))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                format!("slot {slot} lies past the end of the file (truncated)")
            }
            _ => format!("slot {slot}: read failed: {e}"),
        })
}

/// A random 64-bit nonce for a new file (the OS's randomness, through std's hasher keys, mixed with the clock, the
/// process id and a counter).
fn new_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(t);
    h.write_u32(std::process::id());
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Opens an existing offload file for inspection: checks that it is one (magic, version, header checksum), written
/// for `cfg`'s geometry by the run with `nonce`, and not truncated; [`Self::read_block`] checks each slot's checksum.
pub struct OffloadReader {
    path: PathBuf,
    file: File,
    geo: Geometry,
    nonce: u64,
    slots: u32,
}

impl OffloadReader {
    pub fn open(path: &Path, cfg: &KvConfig, nonce: u64) -> Result<Self> {
        let fail = |what: String| anyhow::anyhow!("KV offload file {}: {what}", path.display());
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| fail(format!("cannot stat: {e}")))?
            .len();
        let mut h = [0u8; HEADER_BYTES];
        if len < HEADER_BYTES as u64 {
            return Err(fail(format!(
                "truncated: {len} bytes, shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|e| fail(format!("cannot read the header: {e}")))?;
        let (geo, file_nonce) = parse_header(&h).map_err(fail)?;
        let want = Geometry::of(cfg).ok_or_else(|| {
            fail(format!(
                "this cache stores {} blocks, and offload files hold f16 blocks only",
                cfg.dtype.label()
            ))
        })?;
        if geo != want {
            return Err(fail(format!(
                "written for another cache geometry: the file has {geo}, this cache {want}"
            )));
        }
        if file_nonce != nonce {
            return Err(fail(format!(
                "written by another run (nonce {file_nonce:016x}, expected {nonce:016x})"
            )));
        }
        let body = len - HEADER_BYTES as u64;
        let sb = geo.slot_bytes() as u64;
        if !body.is_multiple_of(sb) {
            return Err(fail(format!(
                "truncated: {len} bytes is not the {HEADER_BYTES}-byte header plus whole {sb}-byte slots"
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            geo,
            nonce,
            slots: (body / sb) as u32,
        })
    }

    /// Slots the file holds (in use or free).
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Reads slot `slot`: keys (head_dim_k × block_tokens, transposed), values (block_tokens × head_dim_v) and
    /// positions (block_tokens), after checking its checksum.
    pub fn read_block(
        &self,
        slot: u32,
        k: &mut [f16],
        v: &mut [f16],
        pos: &mut [u32],
    ) -> Result<()> {
        let g = &self.geo;
        assert!(
            k.len() == g.k_len() && v.len() == g.v_len() && pos.len() == g.block_tokens as usize,
            "buffers of one block"
        );
        let mut raw = vec![0u8; g.slot_bytes()];
        read_raw(&self.file, g, slot, &mut raw)
            .and_then(|_| decode_slot(self.nonce, slot, &raw, k, v, pos))
            .map_err(|e| anyhow::anyhow!("KV offload file {}: {e}", self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// The live store

/// Where an offloaded block lives: its slot, and a version unique within its store (readers cache by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRef {
    pub(super) slot: u32,
    pub(super) version: u64,
    /// Key channels of the block (every channel: pruned streams are not offloaded).
    pub(super) hk: u32,
}

/// A reader's copy of one offloaded block (keys and values as f16, positions), with the raw slot bytes it was read
/// into. Sized on first use, then reused: reading the same block again costs nothing.
#[derive(Default)]
pub struct OffloadBuf {
    /// (store id, version) of the block held; store ids start at 1.
    key: (u64, u64),
    raw: Vec<u8>,
    k: Vec<f16>,
    v: Vec<f16>,
    pos: Vec<u32>,
}

impl OffloadBuf {
    /// The block `r` of `off` as (keys, values): from this buffer if it holds it, else read from the file (counted
    /// as a disk read). A failed read is recorded in the store (the session reports it after the step) and reads as
    /// zeros.
    pub(super) fn load(&mut self, off: &Offload, r: &DiskRef) -> (&[f16], &[f16]) {
        let g = &off.geo;
        if self.key != (off.id, r.version) {
            if self.raw.len() != g.slot_bytes() {
                self.raw.resize(g.slot_bytes(), 0);
                self.k.resize(g.k_len(), f16::ZERO);
                self.v.resize(g.v_len(), f16::ZERO);
                self.pos.resize(g.block_tokens as usize, 0);
            }
            let res = read_raw(&off.file, g, r.slot, &mut self.raw).and_then(|_| {
                decode_slot(
                    off.nonce,
                    r.slot,
                    &self.raw,
                    &mut self.k,
                    &mut self.v,
                    &mut self.pos,
                )
            });
            off.note_read(self.raw.len());
            match res {
                Ok(()) => self.key = (off.id, r.version),
                Err(e) => {
                    off.fail(off.err(e));
                    self.k.fill(f16::ZERO);
                    self.v.fill(f16::ZERO);
                    self.key = (0, 0);
                }
            }
        }
        (&self.k, &self.v)
    }
}

std::thread_local! {
    /// The block that [`super::BlockView::read_key`] / `read_value` last read from disk on this thread.
    pub(super) static THREAD_BUF: std::cell::RefCell<OffloadBuf> = std::cell::RefCell::new(OffloadBuf::default());
}

/// Store ids, unique in the process (0 = none).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The offload file of one cache, its free slots, the LRU stamps of the pool's blocks and the disk counters.
pub(super) struct Offload {
    pub(super) cfg: OffloadConfig,
    path: PathBuf,
    file: File,
    nonce: u64,
    id: u64,
    geo: Geometry,
    /// Slots the file has room for; free ones are reused first.
    n_slots: u32,
    free: Vec<u32>,
    next_version: u64,
    /// Block id → the step it was last viewed in.
    stamps: Vec<AtomicU32>,
    /// The current step.
    pub(super) tick: u32,
    /// One slot's bytes, for writing.
    raw: Vec<u8>,
    /// Disk bytes read since the cache's read counter last took them, and since the store was made.
    read_pending: AtomicU64,
    read_total: AtomicU64,
    /// The first I/O failure (reads happen in parallel tasks, which cannot return errors).
    error: OnceLock<String>,
}

impl Offload {
    /// Creates `DIR/hayloft-kv-<pid>-<nonce>.kv` (never an existing file) with its header.
    pub(super) fn create(cfg: &OffloadConfig, kv: &KvConfig) -> Result<Self> {
        let geo = Geometry::of(kv).ok_or_else(|| {
            anyhow::anyhow!(
                "--kv-offload keeps f16 blocks on disk, and this cache stores {} (use --kv-dtype f16 and no kivi \
                 option)",
                kv.dtype.label()
            )
        })?;
        std::fs::create_dir_all(&cfg.dir).with_context(|| {
            format!(
                "--kv-offload: cannot create the directory {}",
                cfg.dir.display()
            )
        })?;
        let nonce = new_nonce();
        let path = cfg
            .dir
            .join(format!("hayloft-kv-{}-{nonce:016x}.kv", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("--kv-offload: cannot create {}", path.display()))?;
        let off = Self {
            cfg: cfg.clone(),
            path,
            file,
            nonce,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            geo,
            n_slots: 0,
            free: Vec::new(),
            next_version: 1,
            stamps: Vec::new(),
            tick: 0,
            raw: vec![0; geo.slot_bytes()],
            read_pending: AtomicU64::new(0),
            read_total: AtomicU64::new(0),
            error: OnceLock::new(),
        };
        off.file
            .write_all_at(&header(&geo, nonce), 0)
            .with_context(|| format!("--kv-offload: cannot write {}", off.path.display()))?;
        Ok(off)
    }

    /// A new file with the same blocks (same slots, checksums under the new nonce), stamps and counters.
    pub(super) fn try_clone(&self) -> Result<Self> {
        let mut c = Self::create(&self.cfg, &self.kv_config())?;
        c.n_slots = self.n_slots;
        c.free = self.free.clone();
        c.next_version = self.next_version;
        c.tick = self.tick;
        c.stamps = self
            .stamps
            .iter()
            .map(|s| AtomicU32::new(s.load(Ordering::Relaxed)))
            .collect();
        c.read_total = AtomicU64::new(self.read_total.load(Ordering::Relaxed));
        let mut raw = vec![0u8; self.geo.slot_bytes()];
        let mut free = vec![false; self.n_slots as usize];
        self.free.iter().for_each(|&s| free[s as usize] = true);
        for slot in 0..self.n_slots {
            if free[slot as usize] {
                continue;
            }
            read_raw(&self.file, &self.geo, slot, &mut raw).map_err(|e| self.err(e))?;
            let n = raw.len() - 4;
            let (stored, computed) = (u32_at(&raw, n), slot_crc(self.nonce, slot, &raw[..n]));
            if stored != computed {
                return Err(self.err(format!("slot {slot}: checksum mismatch while copying")));
            }
            let crc = slot_crc(c.nonce, slot, &raw[..n]);
            raw[n..].copy_from_slice(&crc.to_le_bytes());
            c.file
                .write_all_at(&raw, self.geo.slot_offset(slot))
                .map_err(|e| c.err(format!("slot {slot}: write failed: {e}")))?;
        }
        Ok(c)
    }

    fn kv_config(&self) -> KvConfig {
        let g = &self.geo;
        KvConfig {
            n_layers: g.n_layers as usize,
            n_kv_heads: g.n_kv_heads as usize,
            head_dim_k: g.head_dim_k as usize,
            head_dim_v: g.head_dim_v as usize,
            block_tokens: g.block_tokens as usize,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        }
    }

    fn err(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!("KV offload file {}: {what}", self.path.display())
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Writes a block to a free slot; returns where it lives.
    pub(super) fn write(&mut self, k: &[f16], v: &[f16], pos: &[u32]) -> Result<DiskRef> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.n_slots += 1;
                self.n_slots - 1
            }
        };
        encode_slot(self.nonce, slot, k, v, pos, &mut self.raw);
        if let Err(e) = self
            .file
            .write_all_at(&self.raw, self.geo.slot_offset(slot))
        {
            self.free.push(slot);
            return Err(self.err(format!("slot {slot}: write failed: {e}")));
        }
        let version = self.next_version;
        self.next_version += 1;
        Ok(DiskRef {
            slot,
            version,
            hk: self.geo.head_dim_k,
        })
    }

    /// Reads block `r` into `k`, `v` and `pos` (counted as a disk read) and frees its slot.
    pub(super) fn take(
        &mut self,
        r: &DiskRef,
        k: &mut [f16],
        v: &mut [f16],
        pos: &mut [u32],
    ) -> Result<()> {
        let res = read_raw(&self.file, &self.geo, r.slot, &mut self.raw)
            .and_then(|_| decode_slot(self.nonce, r.slot, &self.raw, k, v, pos));
        self.note_read(self.raw.len());
        self.free.push(r.slot);
        res.map_err(|e| self.err(e))
    }

    /// Frees block `r`'s slot (its block was dropped).
    pub(super) fn release(&mut self, r: &DiskRef) {
        self.free.push(r.slot);
    }

    /// Bytes of the blocks on disk (slots in use).
    pub(super) fn disk_bytes(&self) -> usize {
        (self.n_slots as usize - self.free.len()) * self.geo.slot_bytes()
    }

    /// Bytes read from the file since the store was made.
    pub(super) fn read_total(&self) -> u64 {
        self.read_total.load(Ordering::Relaxed)
    }

    /// Disk bytes read since the last call.
    pub(super) fn take_pending(&self) -> u64 {
        self.read_pending.swap(0, Ordering::Relaxed)
    }

    fn note_read(&self, bytes: usize) {
        self.read_pending.fetch_add(bytes as u64, Ordering::Relaxed);
        self.read_total.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records an I/O failure (the first one is kept).
    pub(super) fn fail(&self, e: anyhow::Error) {
        let _ = self.error.set(format!("{e:#}"));
    }

    /// The first recorded failure, if any.
    pub(super) fn error(&self) -> Option<&str> {
        self.error.get().map(|s| s.as_str())
    }

    /// Marks block `id` as read in the current step.
    #[inline]
    pub(super) fn touch(&self, id: u32) {
        if let Some(s) = self.stamps.get(id as usize) {
            s.store(self.tick, Ordering::Relaxed);
        }
    }

    /// The step block `id` was last read in.
    pub(super) fn stamp(&self, id: u32) -> u32 {
        self.stamps
            .get(id as usize)
            .map_or(self.tick, |s| s.load(Ordering::Relaxed))
    }

    /// Block `id` is new (or reused): it counts as read now.
    pub(super) fn fresh(&mut self, id: u32) {
        let i = id as usize;
        if self.stamps.len() <= i {
            self.stamps.resize_with(i + 1, || AtomicU32::new(0));
        }
        self.stamps[i].store(self.tick, Ordering::Relaxed);
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One block considered by the rebalance: where it is and when it was last read.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cand {
    pub(super) id: u32,
    pub(super) stamp: u32,
    pub(super) on_disk: bool,
    /// Its index in its stream (newer blocks win ties).
    pub(super) index: u32,
}

/// Orders `cands` by who stays in RAM first: most recently read, then already resident (no churn between equally
/// recent blocks), then newer in its stream, then by id (deterministic).
pub(super) fn rank(cands: &mut [Cand]) {
    cands.sort_unstable_by(|a, b| {
        b.stamp
            .cmp(&a.stamp)
            .then(a.on_disk.cmp(&b.on_disk))
            .then(b.index.cmp(&a.index))
            .then(a.id.cmp(&b.id))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_parses_sizes_and_shares() {
        let b = |s: &str| s.parse::<Resident>().unwrap();
        assert_eq!(b("64MiB"), Resident::Bytes(64 << 20));
        assert_eq!(b("1.5GiB"), Resident::Bytes(3 << 29));
        assert_eq!(b("512KiB"), Resident::Bytes(512 << 10));
        assert_eq!(b("100MB"), Resident::Bytes(100_000_000));
        assert_eq!(b("4096B"), Resident::Bytes(4096));
        assert_eq!(b("0.25"), Resident::Share(0.25));
        assert_eq!(b("1"), Resident::Share(1.0));
        for (bad, msg) in [
            ("0", "must lie in (0, 1]"),
            ("2", "must lie in (0, 1]"),
            ("64XB", "unknown unit"),
            ("MiB", "give a size with a unit"),
            ("", "give a size with a unit"),
            ("0.1B", "at least 1 byte"),
            ("-1", "give a size with a unit"),
        ] {
            let e = bad.parse::<Resident>().unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
        assert_eq!(Resident::Share(0.25).limit(1000), 250);
        assert_eq!(Resident::Bytes(7).limit(1000), 7);
    }

    #[test]
    fn slots_round_trip_and_checksums_catch_changes() {
        let g = Geometry {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: 3,
            head_dim_v: 2,
            block_tokens: 4,
            dtype: DTYPE_F16,
        };
        let k: Vec<f16> = (0..12)
            .map(|i| f16::from_f32(i as f32 * 0.5 - 2.0))
            .collect();
        let v: Vec<f16> = (0..8).map(|i| f16::from_f32(-(i as f32))).collect();
        let pos = [7u32, 8, 9, 4_000_000_000];
        let mut raw = vec![0u8; g.slot_bytes()];
        encode_slot(42, 3, &k, &v, &pos, &mut raw);
        let (mut k2, mut v2, mut p2) = (vec![f16::ZERO; 12], vec![f16::ZERO; 8], [0u32; 4]);
        decode_slot(42, 3, &raw, &mut k2, &mut v2, &mut p2).unwrap();
        assert_eq!((k2, v2, p2), (k, v, pos));
        // Another nonce, another slot index, one flipped bit: refused.
        let mut tmp = (vec![f16::ZERO; 12], vec![f16::ZERO; 8], [0u32; 4]);
        let mut dec = |n, s, r: &[u8]| decode_slot(n, s, r, &mut tmp.0, &mut tmp.1, &mut tmp.2);
        assert!(dec(43, 3, &raw).unwrap_err().contains("checksum mismatch"));
        assert!(dec(42, 4, &raw).unwrap_err().contains("checksum mismatch"));
        raw[5] ^= 1;
        assert!(dec(42, 3, &raw).unwrap_err().contains("slot 3: checksum"));
        // Headers round-trip; a damaged one is refused.
        let mut h = header(&g, 99);
        assert_eq!(parse_header(&h).unwrap(), (g, 99));
        h[30] ^= 1;
        assert!(parse_header(&h).unwrap_err().contains("header checksum"));
    }

    use crate::kv::{BlockData, KvCache};
    use crate::testutil::Rng;

    fn kv(n_layers: usize) -> KvConfig {
        KvConfig {
            n_layers,
            n_kv_heads: 2,
            head_dim_k: 8,
            head_dim_v: 6,
            block_tokens: 4,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        }
    }

    /// Every entry of every stream: (position, key, value).
    fn dump(c: &KvCache) -> Vec<(u32, Vec<f32>, Vec<f32>)> {
        let (hk, hv) = (c.cfg.head_dim_k, c.cfg.head_dim_v);
        let mut out = Vec::new();
        for l in 0..c.cfg.n_layers {
            for h in 0..c.cfg.n_kv_heads {
                for i in 0..c.len(l, h) {
                    let (mut k, mut v) = (vec![0.0; hk], vec![0.0; hv]);
                    let p = c.read(l, h, i, &mut k, &mut v);
                    out.push((p, k, v));
                }
            }
        }
        out
    }

    fn on_disk(c: &KvCache, l: usize, h: usize) -> usize {
        c.blocks(l, h)
            .filter(|b| matches!(b.data, BlockData::Disk(_)))
            .count()
    }

    /// Appends `n` random entries at positions from `p0` to every layer of both caches.
    fn fill(caches: &mut [&mut KvCache], rng: &mut Rng, p0: u32, n: usize) {
        let c = caches[0].cfg.clone();
        let pos: Vec<u32> = (p0..p0 + n as u32).collect();
        for l in 0..c.n_layers {
            let k = rng.vec(n * c.n_kv_heads * c.head_dim_k, 1.0);
            let v = rng.vec(n * c.n_kv_heads * c.head_dim_v, 1.0);
            for cache in caches.iter_mut() {
                cache.append(l, &pos, &k, &v);
            }
        }
    }

    fn offloaded(cfg: KvConfig, dir: &Path, resident: Resident) -> KvCache {
        let mut c = KvCache::new(cfg);
        c.enable_offload(&OffloadConfig {
            dir: dir.to_path_buf(),
            resident,
        })
        .unwrap();
        c
    }

    #[test]
    fn offloaded_blocks_read_back_exactly_and_ram_stays_under_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = kv(2);
        let data = 2 * (8 + 6) * 4;
        // Positions of ~40 blocks plus the 4 open blocks are the floor; room for 3 more blocks.
        let limit = 4 * (data + 16) + 40 * 16 + 3 * data;
        let mut plain = KvCache::new(cfg.clone());
        let mut off = offloaded(cfg.clone(), dir.path(), Resident::Bytes(limit));
        let mut rng = Rng(5);
        let mut n = 0u32;
        for chunk in [13usize, 1, 1, 7, 1, 9, 3, 1] {
            fill(&mut [&mut plain, &mut off], &mut rng, n, chunk);
            n += chunk as u32;
            off.rebalance().unwrap();
            assert!(off.bytes() <= limit, "{} > {limit}", off.bytes());
            assert_eq!(dump(&off), dump(&plain), "after {n} entries");
            assert!(off.disk_bytes() > 0 || n < 12);
        }
        assert!(on_disk(&off, 0, 0) > 0 && on_disk(&off, 1, 1) > 0);
        assert_eq!(
            off.disk_bytes() % Geometry::of(&cfg).unwrap().slot_bytes(),
            0
        );
        // A whole block read from disk is the block in RAM, and counts as a KV read.
        off.take_read();
        let read0 = off.disk_read_bytes();
        let mut buf = OffloadBuf::default();
        for (a, b) in plain.blocks(1, 0).zip(off.blocks(1, 0)) {
            if let (BlockData::F16 { k, v }, Some((dk, dv))) = (a.data, b.read_offloaded(&mut buf))
            {
                assert_eq!((&k[..], &v[..]), (dk, dv));
            }
        }
        let read = off.disk_read_bytes() - read0;
        assert!(
            read > 0 && off.take_read() == read,
            "disk reads are KV reads"
        );
        // Read blocks come back into RAM at the next rebalance, others go out; contents never change.
        off.rebalance().unwrap();
        assert!(off.bytes() <= limit);
        assert_eq!(dump(&off), dump(&plain));
        // A share of the cache.
        let mut share = offloaded(cfg.clone(), dir.path(), Resident::Share(0.5));
        let mut plain2 = KvCache::new(cfg);
        fill(&mut [&mut plain2, &mut share], &mut Rng(6), 0, 60);
        share.rebalance().unwrap();
        let slot = Geometry::of(&share.cfg).unwrap().slot_bytes();
        let total = share.bytes() + share.disk_bytes() / slot * data;
        assert!(
            share.bytes() * 2 <= total + data,
            "{} of {total}",
            share.bytes()
        );
        assert_eq!(share.resident_limit(), Some(total / 2));
        assert_eq!(dump(&share), dump(&plain2));
    }

    #[test]
    fn edits_bring_blocks_back_and_match_the_cache_in_ram() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = kv(1);
        let mut plain = KvCache::new(cfg.clone());
        let mut off = offloaded(cfg, dir.path(), Resident::Bytes(1));
        let mut rng = Rng(8);
        fill(&mut [&mut plain, &mut off], &mut rng, 0, 30);
        off.rebalance().unwrap();
        // Only the open blocks stay (the limit is below the floor).
        assert_eq!((on_disk(&off, 0, 0), on_disk(&off, 0, 1)), (7, 7));
        // Eviction, overwrite, truncation into a block on disk, then appends into it.
        for c in [&mut plain, &mut off] {
            c.retain(0, 1, |i, _| i % 3 != 1);
            c.write(0, 0, 5, &[1.0; 8], &[2.0; 6]);
            c.truncate_pos(22).unwrap();
        }
        off.rebalance().unwrap();
        assert_eq!(dump(&off), dump(&plain));
        fill(&mut [&mut plain, &mut off], &mut rng, 22, 5);
        off.rebalance().unwrap();
        assert_eq!(dump(&off), dump(&plain));
        // A copy has its own file with the same blocks; dropping it leaves the original intact.
        let copy = off.try_clone().unwrap();
        assert_ne!(
            copy.offload_file().unwrap().0,
            off.offload_file().unwrap().0
        );
        assert_eq!(dump(&copy), dump(&plain));
        drop(copy);
        assert_eq!(dump(&off), dump(&plain));
        off.clear();
        off.rebalance().unwrap();
        assert_eq!(off.disk_bytes(), 0);
    }

    #[test]
    fn the_file_is_new_per_cache_and_gone_when_the_cache_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        // A file a killed run left behind is never opened.
        let stale = dir.path().join("hayloft-kv-1-0000000000000000.kv");
        std::fs::write(&stale, b"left behind").unwrap();
        let a = offloaded(kv(1), dir.path(), Resident::Share(0.5));
        let b = offloaded(kv(1), dir.path(), Resident::Share(0.5));
        let (pa, pb) = (
            a.offload_file().unwrap().0.to_path_buf(),
            b.offload_file().unwrap().0.to_path_buf(),
        );
        assert!(pa != pb && pa != stale && pa.exists() && pb.exists());
        assert_eq!(a.offload_file().unwrap().0.parent(), Some(dir.path()));
        drop(a);
        assert!(!pa.exists() && pb.exists());
        drop(b);
        assert!(!pb.exists());
        assert_eq!(std::fs::read(&stale).unwrap(), b"left behind");
        // Storage that is not f16 is refused.
        let mut q = KvCache::new(KvConfig {
            dtype: KvDtype::F32,
            ..kv(1)
        });
        let e = q
            .enable_offload(&OffloadConfig {
                dir: dir.path().into(),
                resident: Resident::Share(0.5),
            })
            .unwrap_err();
        assert!(e.to_string().contains("keeps f16 blocks"), "{e}");
    }

    #[test]
    fn the_reader_refuses_foreign_truncated_and_corrupted_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = kv(1);
        let mut plain = KvCache::new(cfg.clone());
        let mut c = offloaded(cfg.clone(), dir.path(), Resident::Bytes(1));
        fill(&mut [&mut plain, &mut c], &mut Rng(9), 0, 14);
        c.rebalance().unwrap();
        let (path, nonce) = c.offload_file().map(|(p, n)| (p.to_path_buf(), n)).unwrap();
        let g = Geometry::of(&cfg).unwrap();
        // The live file reads back: 6 slots (3 full blocks per head), each the block in RAM.
        let r = OffloadReader::open(&path, &cfg, nonce).unwrap();
        assert_eq!(r.slots(), 6);
        let (mut k, mut v, mut pos) = (vec![f16::ZERO; 32], vec![f16::ZERO; 24], vec![0u32; 4]);
        let mut seen = Vec::new();
        for s in 0..6 {
            r.read_block(s, &mut k, &mut v, &mut pos).unwrap();
            let head = (0..2)
                .find(|&h| {
                    let b = plain.block(0, h, pos[0] as usize / 4);
                    matches!(b.data, BlockData::F16 { k: bk, v: bv } if **bk == *k && **bv == *v)
                })
                .expect("the slot holds one head's block");
            seen.push((head, pos.clone()));
        }
        seen.sort();
        let want: Vec<(usize, Vec<u32>)> = (0..2)
            .flat_map(|h| (0..3).map(move |b| (h, (4 * b..4 * b + 4).collect())))
            .collect();
        assert_eq!(seen, want);
        let bytes = std::fs::read(&path).unwrap();
        let mut check = |name: &str, data: &[u8], cfg: &KvConfig, nonce: u64, want: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            let e = OffloadReader::open(&p, cfg, nonce)
                .and_then(|r| (0..4).try_for_each(|s| r.read_block(s, &mut k, &mut v, &mut pos)))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert!(
                e.contains(&p.display().to_string()),
                "{name}: names the file: {e}"
            );
        };
        check(
            "other-run.kv",
            &bytes,
            &cfg,
            nonce ^ 1,
            "written by another run",
        );
        let other = KvConfig {
            n_layers: 2,
            ..cfg.clone()
        };
        check(
            "other-geometry.kv",
            &bytes,
            &other,
            nonce,
            "another cache geometry",
        );
        check(
            "short.kv",
            &bytes[..30],
            &cfg,
            nonce,
            "shorter than the 64-byte header",
        );
        let half = HEADER_BYTES + g.slot_bytes() * 2 + 7;
        check(
            "half-slot.kv",
            &bytes[..half],
            &cfg,
            nonce,
            "not the 64-byte header plus whole",
        );
        let whole = HEADER_BYTES + g.slot_bytes() * 3;
        check(
            "cut.kv",
            &bytes[..whole],
            &cfg,
            nonce,
            "slot 3 lies past the end of the file (truncated)",
        );
        let mut bad = bytes.clone();
        bad[HEADER_BYTES + g.slot_bytes() + 10] ^= 0x40;
        check("flipped.kv", &bad, &cfg, nonce, "slot 1: checksum mismatch");
        let mut magic = bytes.clone();
        magic[0] = b'X';
        check("magic.kv", &magic, &cfg, nonce, "bad magic");
        let mut version = bytes.clone();
        version[8] = 9;
        check("version.kv", &version, &cfg, nonce, "format version 9");
        // A corrupted slot in the live file: the read records it, the next rebalance reports it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], g.slot_offset(0) + 2).unwrap();
        let (mut k, mut v) = (vec![0.0; 8], vec![0.0; 6]);
        for i in 0..12 {
            c.read(0, 0, i, &mut k, &mut v);
            c.read(0, 1, i, &mut k, &mut v);
        }
        let e = c.rebalance().unwrap_err().to_string();
        assert!(
            e.contains("slot 0: checksum mismatch") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn ranking_prefers_recent_then_resident_then_newer() {
        let c = |id, stamp, on_disk, index| Cand {
            id,
            stamp,
            on_disk,
            index,
        };
        let mut v = vec![
            c(0, 5, true, 0),
            c(1, 6, true, 1),
            c(2, 5, false, 2),
            c(3, 5, false, 9),
            c(4, 4, false, 3),
        ];
        rank(&mut v);
        assert_eq!(v.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 3, 2, 0, 4]);
    }
}
