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
//!
//! Two storage features change what a block holds, per stream:
//! - **KIVI quantization** ([`KvDtype::Kivi`], [`quant`]): a stream's blocks are quantized (keys per channel, values per
//!   token) once a whole block lies more than `residual` entries behind the stream's end; the newer entries and the
//!   partly filled last block stay f16. Quantized blocks are always a prefix of the stream. A block is quantized right
//!   after the append that pushed it out of the residual window, before attention runs, so a prefill chunk already reads
//!   its own older part quantized (at least as strict as KIVI, whose prompt attention is full precision).
//! - **Compact key channels** (ThinK, [`KvCache::prune_key_channels`]): a stream may keep only some key channels; its
//!   blocks then store only those (the memory is freed), new entries store only those, and attention computes q·k over
//!   them. Values keep every channel.
//!
//! **Sliding windows** ([`KvConfig::windows`]): the streams of a layer whose attention reads only the last `w`
//! positions (Gemma 3's local layers) keep only what their queries can still read. Before an append whose first
//! position is p, a windowed stream drops its leading blocks whose entries all lie before p − w + 1, back to the pool
//! (the next block it needs reuses one). It then holds at most w − 1 + n + `block_tokens` − 1 entries for an append of
//! n, so the model appends a long prefill chunk to such a layer [`WINDOW_STEP`] tokens at a time; decoding holds the
//! window plus at most one block. [`KvConfig::layer_bytes`] states what a layer costs for a context length. Going back
//! ([`KvCache::truncate_pos`]) behind entries already dropped is refused; [`KvCache::hold`] keeps what a later
//! truncation needs. Compression methods leave windowed layers alone: the window is already their budget.
//!
//! The code is split the way a block engine separates its allocator from its block tables:
//! - `pool`: the blocks themselves, their free lists and the byte counter;
//! - `format`: what a block holds (f16, f32, KIVI-quantized, compact key channels), how it is read, and how entries
//!   are converted between formats ([`quant`] holds the KIVI math);
//! - `streams`: [`KvCache`], the per (layer, KV head) block tables and everything callers do with them.
//!
//! - `meta`: page summaries of the keys (channel min/max or mean/std) that decode-time selectors score, kept exact
//!   as the streams change and counted in the byte counter.
//!
//! - `offload`: `--kv-offload DIR --resident N`: at most N bytes of blocks stay in RAM, the others live in a file and
//!   are read back (explicit reads, checksummed slots) by the blocks attention reads, through an LRU.
//!
//! The cache also counts the bytes attention and selectors *read* ([`KvCache::note_read`]), next to the bytes it holds.
//!
//! This file holds the configuration types.

pub mod codec;
mod format;
pub mod meta;
pub mod offload;
mod pool;
pub mod quant;
mod streams;
#[cfg(test)]
mod window_tests;

pub(crate) use format::prefetch_lines;
pub use format::{Block, BlockData, BlockView};
pub use meta::{MetaConfig, PageStat};
pub use offload::{OffloadBuf, OffloadConfig, OffloadReader, Resident};
pub use streams::KvCache;

use quant::QBlock;

/// KIVI's default full-precision residual: the newest 128 entries of each stream stay f16.
pub const DEFAULT_RESIDUAL: usize = 128;

/// Storage type of cached keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F16,
    F32,
    /// KIVI quantization with `bits` ∈ {8, 4, 2}; the newest `residual` entries of each stream stay f16
    /// (see [`quant`]).
    Kivi {
        bits: u8,
        residual: usize,
    },
}

impl KvDtype {
    /// Bytes per element of full-precision blocks (f16 for KIVI's residual window).
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 | KvDtype::Kivi { .. } => 2,
            KvDtype::F32 => 4,
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            "q8" | "q4" | "q2" => Ok(KvDtype::Kivi {
                bits: s[1..].parse().expect("matched digits"),
                residual: DEFAULT_RESIDUAL,
            }),
            _ => anyhow::bail!("unknown KV cache type '{s}' (valid: f16, f32, q8, q4, q2)"),
        }
    }
    /// Bits of quantized blocks, if any.
    pub fn quant_bits(self) -> Option<u8> {
        match self {
            KvDtype::Kivi { bits, .. } => Some(bits),
            _ => None,
        }
    }
    /// Short name: `f16`, `f32`, `q4` (with `/r<residual>` when the residual is not the default).
    pub fn label(self) -> String {
        match self {
            KvDtype::F16 => "f16".into(),
            KvDtype::F32 => "f32".into(),
            KvDtype::Kivi { bits, residual } if residual == DEFAULT_RESIDUAL => format!("q{bits}"),
            KvDtype::Kivi { bits, residual } => format!("q{bits}/r{residual}"),
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
    /// Sliding window of each layer (`windows[layer]`; missing or None = the layer keeps every entry). The streams of
    /// a layer with a window keep only the entries its queries can still see (see [`KvCache`]'s sliding windows).
    pub windows: Vec<Option<u32>>,
}

impl KvConfig {
    /// The sliding window of `layer`, if its streams keep only their window.
    pub fn window(&self, layer: usize) -> Option<u32> {
        self.windows
            .get(layer)
            .copied()
            .flatten()
            .filter(|&w| w > 0)
    }

    /// Most entries one stream of `layer` holds while `seen` tokens go through it, fed in appends of at most `chunk`
    /// tokens, when no method evicts any: every token on a global layer; on a sliding-window layer of window w, what
    /// the widest append needs (w − 1 older entries before its first query, at most min(`chunk`, [`WINDOW_STEP`]) new
    /// ones) plus the part of the oldest block before them (at most `block_tokens` − 1), never more than `seen`.
    /// Decoding (`chunk` 1) holds at most w + `block_tokens` − 1: the window plus one block. (A [`KvCache::hold`]
    /// keeps more, from the held position's window on.)
    pub fn stream_len(&self, layer: usize, seen: usize, chunk: usize) -> usize {
        match self.window(layer) {
            None => seen,
            Some(w) => {
                let step = chunk.clamp(1, WINDOW_STEP);
                seen.min(w as usize + step - 1 + self.block_tokens - 1)
            }
        }
    }

    /// Bytes `layer` holds at most over `seen` tokens fed `chunk` at a time (all its KV heads; no method, every key
    /// channel, no page summaries): what a memory plan adds up per layer.
    pub fn layer_bytes(&self, layer: usize, seen: usize, chunk: usize) -> usize {
        self.n_kv_heads * self.stream_bytes(self.stream_len(layer, seen, chunk), self.head_dim_k)
    }

    /// Bytes the whole cache holds at most over `seen` tokens fed `chunk` at a time (no compression method).
    pub fn bytes_at(&self, seen: usize, chunk: usize) -> usize {
        (0..self.n_layers)
            .map(|l| self.layer_bytes(l, seen, chunk))
            .sum()
    }

    /// Layers whose streams keep every entry (no sliding window): those that grow with the context.
    pub fn global_layers(&self) -> usize {
        (0..self.n_layers)
            .filter(|&l| self.window(l).is_none())
            .count()
    }

    /// Bytes of one full-precision cached token in one stream (key + value + position).
    pub fn entry_bytes(&self) -> usize {
        (self.head_dim_k + self.head_dim_v) * self.dtype.bytes() + 4
    }
    /// Bytes one more token of context costs across the layers that keep every entry (a sliding-window layer's
    /// cost stops growing at its window: see [`Self::layer_bytes`]): for KIVI, a token in a quantized block (the
    /// long-context cost; the residual window's entries cost [`Self::entry_bytes`]).
    pub fn bytes_per_token(&self) -> usize {
        let streams = self.global_layers() * self.n_kv_heads;
        match self.dtype.quant_bits() {
            Some(_) => self.quant_block_bytes(self.head_dim_k) * streams / self.block_tokens,
            None => self.entry_bytes() * streams,
        }
    }
    /// Bytes of a full-precision block.
    pub fn block_bytes(&self) -> usize {
        self.entry_bytes() * self.block_tokens
    }
    /// Bytes of a quantized block whose keys keep `hk` channels (codes, scales and positions).
    pub fn quant_block_bytes(&self, hk: usize) -> usize {
        let bits = self.dtype.quant_bits().unwrap_or(8);
        QBlock::bytes_for(bits, hk, self.head_dim_v, self.block_tokens) + 4 * self.block_tokens
    }
    /// Quantized blocks at the head of a stream of `len` entries (KIVI: every whole block more than `residual`
    /// entries behind the end; 0 for f16/f32 storage).
    pub fn quant_blocks(&self, len: usize) -> usize {
        match self.dtype {
            KvDtype::Kivi { residual, .. } => len.saturating_sub(residual) / self.block_tokens,
            _ => 0,
        }
    }
    /// Bytes of the blocks a stream of `len` entries whose keys keep `hk` channels holds: its quantized prefix and
    /// its full-precision blocks, the last one partly filled. This is the stream's share of the cache's byte counter
    /// (free blocks and page summaries aside), so a memory plan built on it agrees with the counter.
    pub fn stream_bytes(&self, len: usize, hk: usize) -> usize {
        let n_q = self.quant_blocks(len);
        let n_f = len.div_ceil(self.block_tokens) - n_q;
        n_q * format::Shape { quant: true, hk }.bytes(self)
            + n_f * format::Shape { quant: false, hk }.bytes(self)
    }
    /// Bytes an eviction from `len` to `kept` entries of one stream allocates beyond its blocks, at most: quantized
    /// blocks falling back into the residual window are rewritten in full precision before the freed quantized ones
    /// are given back (at the end of the compression), so the counter peaks above the stream's size (0 unless KIVI).
    pub fn retain_extra_bytes(&self, len: usize, kept: usize, hk: usize) -> usize {
        let back = self.quant_blocks(len) - self.quant_blocks(kept.min(len));
        back * format::Shape { quant: false, hk }.bytes(self)
    }
}

/// Tokens a sliding-window layer appends and attends at a time within a prefill chunk, so that its streams hold at
/// most window + `WINDOW_STEP` − 1 entries (plus part of a block) whatever the chunk size.
pub const WINDOW_STEP: usize = 128;

/// Block sizes the attention kernel is compiled for.
pub const BLOCK_TOKEN_CHOICES: [usize; 5] = [4, 8, 16, 32, 64];

#[cfg(test)]
mod tests {
    use super::*;

    fn kivi(bits: u8, hd: usize) -> KvConfig {
        KvConfig {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim_k: hd,
            head_dim_v: hd,
            block_tokens: 32,
            dtype: KvDtype::Kivi { bits, residual: 0 },
            windows: Vec::new(),
        }
    }

    #[test]
    fn bytes_per_token_counts_packed_blocks() {
        for (hd, want_q4) in [(64usize, 80usize), (256, 308)] {
            // Per token and head, 32-token blocks: keys hd·(16 + 4)/32 bytes, values hd/2 + 4 per 64-channel group,
            // position 4.
            let f16 = kivi(4, hd);
            let f16 = KvConfig {
                dtype: KvDtype::F16,
                ..f16
            };
            let q4 = kivi(4, hd);
            assert_eq!(q4.bytes_per_token(), want_q4 * 2);
            assert_eq!(f16.bytes_per_token(), (4 * hd + 4) * 2);
            let ratio = f16.bytes_per_token() as f64 / q4.bytes_per_token() as f64;
            assert!(ratio > 3.2 && ratio < 3.4, "hd {hd}: {ratio}");
            let q8 = kivi(8, hd).bytes_per_token();
            let q2 = kivi(2, hd).bytes_per_token();
            assert!(q2 < q4.bytes_per_token() && q4.bytes_per_token() < q8);
        }
    }

    #[test]
    fn windowed_layers_cost_their_window_and_the_rest_grows_with_the_context() {
        // Gemma 3 270M's shape: 18 layers, one KV head of 256, window 512 on 5 of every 6 layers.
        let cfg = KvConfig {
            n_layers: 18,
            n_kv_heads: 1,
            head_dim_k: 256,
            head_dim_v: 256,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: (0..18).map(|l| (l % 6 != 5).then_some(512)).collect(),
        };
        assert_eq!(cfg.global_layers(), 3);
        assert_eq!(
            (cfg.window(0), cfg.window(5), cfg.window(40)),
            (Some(512), None, None)
        );
        // Prefill chunks of 512 go through a windowed layer 128 at a time: 511 older + 128 new + 31 of a block.
        assert_eq!(cfg.stream_len(0, 32768, 512), 670);
        assert_eq!(cfg.stream_len(0, 32768, 7), 512 + 6 + 31);
        assert_eq!(cfg.stream_len(0, 32768, 1), 543); // decoding: the window and one block
        assert_eq!(cfg.stream_len(0, 300, 512), 300);
        assert_eq!(cfg.stream_len(5, 32768, 512), 32768);
        let entry = 1028; // f16 key and value of 256 channels, position
        assert_eq!(cfg.layer_bytes(0, 32768, 512), 21 * 32 * entry);
        assert_eq!(cfg.layer_bytes(5, 32768, 512), 32768 * entry);
        assert_eq!(cfg.bytes_at(32768, 512), (3 * 32768 + 15 * 21 * 32) * entry);
        // A token more costs the global layers only.
        assert_eq!(cfg.bytes_per_token(), 3 * entry);
        // KIVI: quantized blocks past the residual, on windowed layers too.
        let q = KvConfig {
            dtype: KvDtype::Kivi {
                bits: 4,
                residual: 128,
            },
            ..cfg.clone()
        };
        let (qb, fb) = (q.quant_block_bytes(256), q.block_bytes());
        assert_eq!(q.layer_bytes(0, 32768, 512), 16 * qb + 5 * fb); // (670 − 128) / 32 quantized
        assert_eq!(q.layer_bytes(5, 32768, 512), 1020 * qb + 4 * fb);
        // Without windows every layer grows.
        let full = KvConfig {
            windows: Vec::new(),
            ..cfg
        };
        assert_eq!(full.bytes_at(32768, 512), 18 * 32768 * entry);
    }

    #[test]
    fn dtype_parses_and_labels() {
        for s in ["f16", "f32", "q8", "q4", "q2"] {
            assert_eq!(KvDtype::parse(s).unwrap().label(), s);
        }
        assert!(KvDtype::parse("q3").is_err());
        let q = KvDtype::Kivi {
            bits: 4,
            residual: 64,
        };
        assert_eq!(
            (q.label().as_str(), q.bytes(), q.quant_bits()),
            ("q4/r64", 2, Some(4))
        );
    }
}
