//! KV codec (after CacheGen): a compact, portable, checksummed encoding of a run of cached tokens, for moving caches
//! to disk or over the network.
//!
//! **Quantization.** Each (layer, KV head) matrix of the run (tokens × channels, keys and values apart) is quantized
//! symmetrically to `2·h + 1` levels (`h = bins/2 − 1`): `q = round(x / s · h)`, `x̂ = q · s / h`, so
//! `|x − x̂| ≤ s / (2h)`. The scale `s` is a max-abs ([`Scale`]): of each token's row (CacheGen's), of each channel's
//! column over the chunk (keys by default: KIVI's finding that keys have outlier channels), or of the whole matrix
//! (values by default: one uniform step, which under entropy coding costs fewer bits than per-token steps for a lower
//! error; see [`CodecConfig::default`]). Bins are set per layer group (CacheGen: keys 32 in layers 0–9, 16 after;
//! values 32 in layers 0–1, 16 after).
//!
//! **Entropy coding.** Symbols are range-coded (`constriction`) channel by channel, each channel with one of up to 16
//! models its matrix stores for the chunk: histograms as one 4-bit log-scale class per level (a level's weight is
//! 2^class), and a 4-bit model index per channel. The encoder picks how many models and which channels share each by
//! the bits it costs (see [`group_channels`]); probabilities come from the classes with integer arithmetic only, so
//! every machine builds the same model.
//!
//! **Chunks.** The run is cut into chunks of `chunk_tokens` tokens, each with its own scales, models, coded stream and
//! CRC-32: the first n chunks decode alone (a prefix), and a damaged chunk is named.
//!
//! **Format** (version 2; little-endian; no serializer of a host language; version 1 blobs, one model per channel and
//! no value scaling choice, are refused by version, and the tiers recompute them):
//! ```text
//! magic "HLKVCODE"  u16 version  u16 flags(0)  u32 header length
//! header: u32 n_layers, n_heads, head_dim_k, head_dim_v, tokens, chunk_tokens; u8 key_scale, value_scale
//!         (0 token, 1 channel, 2 matrix, 3 exact); u8 key_bins[n_layers]; u8 value_bins[n_layers]
//! u32 crc32 of the header
//! u32 n_chunks; per chunk: u64 byte length, u32 crc32 (the table's own crc32 follows it)
//! chunks, in order: u32 positions[tokens]; per layer, per head, keys then values: f16 scales, u8 model count m,
//!         (m > 1) a 4-bit model index per channel, two a byte; m × levels 4-bit classes, two a byte;
//!         u32 coded word count, u32 words; or, scaling 3 (exact), f16 values[tokens × channels] alone
//! ```
//!
//! Scaling 3 (exact: no quantization, [`CodecConfig::exact`]) came after version 2's first blobs; a reader without
//! it refuses such a blob as an unknown scaling, and the tiers recompute its prefix.

use anyhow::{bail, ensure, Context, Result};
use constriction::stream::model::{DecoderModel, EncoderModel, EntropyModel};
use constriction::stream::queue::{DefaultRangeDecoder, DefaultRangeEncoder};
use constriction::stream::{Decode, Encode};
use half::f16;

use super::KvCache;

const MAGIC: &[u8; 8] = b"HLKVCODE";
const VERSION: u16 = 2;
/// Probability precision of the entropy models (constriction's default categorical model).
const PRECISION: u32 = 24;

/// Keys and values of `tokens` consecutive entries of every (layer, KV head) stream, as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct KvRows {
    pub n_layers: usize,
    pub n_heads: usize,
    pub hk: usize,
    pub hv: usize,
    pub tokens: usize,
    /// Position of each token (the same in every stream).
    pub pos: Vec<u32>,
    /// `[layer][head][token][hk]`.
    pub k: Vec<f32>,
    /// `[layer][head][token][hv]`.
    pub v: Vec<f32>,
}

impl KvRows {
    pub fn zeros(n_layers: usize, n_heads: usize, hk: usize, hv: usize, tokens: usize) -> Self {
        Self {
            n_layers,
            n_heads,
            hk,
            hv,
            tokens,
            pos: vec![0; tokens],
            k: vec![0.0; n_layers * n_heads * tokens * hk],
            v: vec![0.0; n_layers * n_heads * tokens * hv],
        }
    }

    /// Entries `[start, end)` of every stream of `cache` (which must hold them, at the same positions everywhere).
    pub fn from_cache(cache: &KvCache, start: usize, end: usize) -> Result<Self> {
        let c = &cache.cfg;
        let n = end - start;
        let mut r = Self::zeros(c.n_layers, c.n_kv_heads, c.head_dim_k, c.head_dim_v, n);
        for layer in 0..c.n_layers {
            for head in 0..c.n_kv_heads {
                ensure!(
                    cache.len(layer, head) >= end,
                    "stream ({layer}, {head}) holds {} entries, fewer than {end}",
                    cache.len(layer, head)
                );
                for t in 0..n {
                    let (k, v) = r.row_mut(layer, head, t);
                    let p = cache.read(layer, head, start + t, k, v);
                    if layer == 0 && head == 0 {
                        r.pos[t] = p;
                    } else {
                        ensure!(
                            r.pos[t] == p,
                            "streams hold different positions at entry {}",
                            start + t
                        );
                    }
                }
            }
        }
        Ok(r)
    }

    fn row_mut(&mut self, layer: usize, head: usize, t: usize) -> (&mut [f32], &mut [f32]) {
        let s = layer * self.n_heads + head;
        let (hk, hv, n) = (self.hk, self.hv, self.tokens);
        (
            &mut self.k[(s * n + t) * hk..][..hk],
            &mut self.v[(s * n + t) * hv..][..hv],
        )
    }

    /// Tokens `[a, b)` of these rows.
    pub fn slice(&self, a: usize, b: usize) -> Self {
        let mut r = Self::zeros(self.n_layers, self.n_heads, self.hk, self.hv, b - a);
        r.pos.copy_from_slice(&self.pos[a..b]);
        let (hk, hv, n) = (self.hk, self.hv, self.tokens);
        for s in 0..self.n_layers * self.n_heads {
            r.k[s * (b - a) * hk..][..(b - a) * hk]
                .copy_from_slice(&self.k[(s * n + a) * hk..(s * n + b) * hk]);
            r.v[s * (b - a) * hv..][..(b - a) * hv]
                .copy_from_slice(&self.v[(s * n + a) * hv..(s * n + b) * hv]);
        }
        r
    }

    /// Appends these entries to every stream of `cache` (shaped like them).
    pub fn append_to(&self, cache: &mut KvCache) -> Result<()> {
        let c = &cache.cfg;
        ensure!(
            (c.n_layers, c.n_kv_heads, c.head_dim_k, c.head_dim_v) == (self.n_layers, self.n_heads, self.hk, self.hv),
            "cached rows of {} layers × {} heads × {}/{} channels do not fit a cache of {} × {} × {}/{}",
            self.n_layers,
            self.n_heads,
            self.hk,
            self.hv,
            c.n_layers,
            c.n_kv_heads,
            c.head_dim_k,
            c.head_dim_v
        );
        let (nh, hk, hv, n) = (self.n_heads, self.hk, self.hv, self.tokens);
        // n × (nh · hk) and n × (nh · hv): the layout the K/V projections produce.
        let mut k = vec![0f32; n * nh * hk];
        let mut v = vec![0f32; n * nh * hv];
        for layer in 0..self.n_layers {
            for h in 0..nh {
                let s = layer * nh + h;
                for t in 0..n {
                    k[(t * nh + h) * hk..][..hk].copy_from_slice(&self.k[(s * n + t) * hk..][..hk]);
                    v[(t * nh + h) * hv..][..hv].copy_from_slice(&self.v[(s * n + t) * hv..][..hv]);
                }
            }
            cache.append(layer, &self.pos, &k, &v);
        }
        Ok(())
    }

    /// Bytes of these rows stored as f16 (keys and values, no positions): the baseline sizes are compared with.
    pub fn f16_bytes(&self) -> usize {
        2 * (self.k.len() + self.v.len())
    }
}

/// What one quantization scale covers in a (layer, KV head) matrix of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Each token's row (CacheGen's scaling).
    Token,
    /// Each channel's column (KIVI's finding for keys: a few channels are outliers).
    Channel,
    /// The whole matrix: one step for every entry. Under entropy coding a level's cost follows how often it occurs,
    /// not how many levels there are, so one uniform step spends bits where the entries are, and the step is the
    /// same for every token: an entry's error is bounded in absolute terms, which is what an attention-weighted sum
    /// of values sees.
    Matrix,
    /// No quantization: the matrix is stored as f16 values, token by token, and read back exactly (an f16 cache's
    /// entries bit for bit; an f32 cache's rounded to f16). Neither scales nor entropy models; 2 bytes an entry.
    Exact,
}

impl Scale {
    const ALL: [Scale; 4] = [Scale::Token, Scale::Channel, Scale::Matrix, Scale::Exact];

    fn code(self) -> u8 {
        match self {
            Scale::Token => 0,
            Scale::Channel => 1,
            Scale::Matrix => 2,
            Scale::Exact => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scale::Token => "token",
            Scale::Channel => "channel",
            Scale::Matrix => "matrix",
            Scale::Exact => "exact",
        }
    }

    /// Scales a matrix of `n` tokens × `d` channels carries.
    fn count(self, n: usize, d: usize) -> usize {
        match self {
            Scale::Token => n,
            Scale::Channel => d,
            Scale::Matrix => 1,
            Scale::Exact => 0,
        }
    }

    /// Which scale covers entry (`t`, `c`).
    #[inline]
    fn at(self, t: usize, c: usize) -> usize {
        match self {
            Scale::Token => t,
            Scale::Channel => c,
            Scale::Matrix | Scale::Exact => 0,
        }
    }
}

impl std::str::FromStr for Scale {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Scale::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .with_context(|| format!("codec scale '{s}': expected token, channel, matrix or exact"))
    }
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Codec settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecConfig {
    pub chunk_tokens: usize,
    pub key_scale: Scale,
    pub value_scale: Scale,
    /// Bins per layer for keys, and for values.
    pub key_bins: LayerBins,
    pub value_bins: LayerBins,
}

/// Where a codec's layer groups split: before a layer, or at a share of the model's layers (rounded down), so one
/// setting carries across models of different depths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Layer(usize),
    /// `num / den` of the layers come before the split.
    Share {
        num: u16,
        den: u16,
    },
}

/// Bins of two layer groups: the layers before the split get `early`, the rest `late` (`SPLIT:EARLY:LATE`, SPLIT a
/// layer index or a share `a/b`: `2/3:32:64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerBins {
    pub split: Split,
    pub early: u8,
    pub late: u8,
}

/// Bins a layer group may have: at most 64, so a matrix has at most [`MAX_LEVELS`] levels.
pub const BINS: std::ops::RangeInclusive<u8> = 4..=64;

impl LayerBins {
    /// Whether both groups' bins lie in [`BINS`].
    fn in_range(&self) -> bool {
        BINS.contains(&self.early) && BINS.contains(&self.late)
    }

    pub const fn at_layer(split: usize, early: u8, late: u8) -> Self {
        Self {
            split: Split::Layer(split),
            early,
            late,
        }
    }

    /// The first layer of the late group in a model of `n_layers` layers.
    pub fn split_layer(&self, n_layers: usize) -> usize {
        match self.split {
            Split::Layer(l) => l,
            Split::Share { num, den } => n_layers * num as usize / den as usize,
        }
    }

    /// Bins of `layer` in a model of `n_layers` layers.
    pub fn bins(&self, layer: usize, n_layers: usize) -> u8 {
        if layer < self.split_layer(n_layers) {
            self.early
        } else {
            self.late
        }
    }
}

impl std::str::FromStr for LayerBins {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            format!("codec bins '{s}': expected SPLIT:EARLY:LATE, SPLIT a layer or a share (10:32:16, 2/3:32:64)")
        };
        let p: Vec<&str> = s.split(':').collect();
        ensure!(p.len() == 3, bad());
        let split = match p[0].split_once('/') {
            Some((a, b)) => {
                let (num, den): (u16, u16) =
                    (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
                ensure!(
                    den > 0 && num <= den,
                    "{}: a share a/b needs 0 < b and a <= b",
                    bad()
                );
                Split::Share { num, den }
            }
            None => Split::Layer(p[0].parse().with_context(bad)?),
        };
        let (early, late): (u8, u8) = (
            p[1].parse().with_context(bad)?,
            p[2].parse().with_context(bad)?,
        );
        let b = Self { split, early, late };
        ensure!(b.in_range(), "{}: bins must lie in {BINS:?}", bad());
        Ok(b)
    }
}

impl std::fmt::Display for LayerBins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.split {
            Split::Layer(l) => write!(f, "{l}")?,
            Split::Share { num, den } => write!(f, "{num}/{den}")?,
        }
        write!(f, ":{}:{}", self.early, self.late)
    }
}

impl Default for CodecConfig {
    /// Keys scaled per channel with 64 bins in every layer, values with one scale per matrix and 32 bins, chunks of
    /// 256 tokens. On 4095-token caches of the essays (`hayloft bench codec --score 1024`): SmolLM2-135M 3.62× smaller
    /// than f16, perplexity over the next 1023 tokens −0.90 %; Gemma 3 270M 4.03×, −0.41 %; and no needle of NIAH
    /// lost on either (README). The version-1 default (keys per channel with 32 bins, values per token with 32 bins in
    /// layers 0–1 and 16 after) is 4.00× with the shared models but lost needles at 4K on SmolLM2; CacheGen's own
    /// setting (keys per token) is smaller still but +3 % perplexity: per-token scales of keys are set by their
    /// outlier channels.
    fn default() -> Self {
        Self {
            chunk_tokens: 256,
            key_scale: Scale::Channel,
            key_bins: LayerBins::at_layer(0, 64, 64),
            value_scale: Scale::Matrix,
            value_bins: LayerBins::at_layer(0, 32, 32),
        }
    }
}

impl CodecConfig {
    /// No quantization ([`Scale::Exact`] for keys and values): an f16 cache comes back bit for bit, at 2 bytes an
    /// entry (the chunks, their positions and checksums as in the default).
    pub fn exact() -> Self {
        Self {
            key_scale: Scale::Exact,
            value_scale: Scale::Exact,
            ..Self::default()
        }
    }
}

/// Half the number of levels for `bins` bins: levels are `−h..=h`.
fn half(bins: u8) -> i32 {
    (bins as i32 / 2 - 1).max(1)
}

/// Why a blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a hayloft KV codec blob (bad magic)")]
    Magic,
    #[error("KV codec version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("KV codec blob truncated: {0}")]
    Truncated(&'static str),
    #[error("KV codec blob corrupt: {0}")]
    Corrupt(String),
}

// ---------------------------------------------------------------------------------------------------------------------
// Byte helpers

#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
}

struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(CodecError::Truncated(what))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Entropy models

/// 4-bit class of a symbol count given the largest count: 0 for none, else 1 + ⌊log2⌋ of the count scaled so the
/// largest is 2^14 (classes 1..=15).
fn class_of(count: u32, max: u32) -> u8 {
    if count == 0 {
        return 0;
    }
    let scaled = ((count as u64) << 14) / max as u64;
    (1 + (63 - scaled.max(1).leading_zeros()) as u8).min(15)
}

/// Fixed-point probabilities (summing to 2^PRECISION, each ≥ 1) from classes: weight 2^class (class 0 gets 1, so a
/// level that did not occur costs almost nothing but stays codable). Integer arithmetic only.
fn probabilities(classes: &[u8], out: &mut Vec<u32>) {
    out.clear();
    let weights = classes.iter().map(|&c| 1u64 << c);
    let total: u64 = weights.clone().sum();
    let room = (1u64 << PRECISION) - classes.len() as u64;
    out.extend(weights.map(|w| 1 + (w * room / total) as u32));
    let sum: u64 = out.iter().map(|&p| p as u64).sum();
    let (arg, _) = out
        .iter()
        .enumerate()
        .max_by_key(|(_, p)| **p)
        .expect("levels");
    out[arg] += ((1u64 << PRECISION) - sum) as u32;
}

/// Most levels a matrix has (`bins` ≤ 64 gives `2·(bins/2 − 1) + 1` ≤ 63 levels).
const MAX_LEVELS: usize = 64;
/// Bits of a quantile the decoding table is indexed by.
const LUT_BITS: u32 = 8;

/// A channel's entropy model: the cumulative distribution of its levels at [`PRECISION`] bits, and for decoding a
/// table from a quantile's top [`LUT_BITS`] bits to the first level that may hold it. Codes exactly as
/// constriction's contiguous categorical model over the same probabilities (the same intervals, so the same words),
/// but finds a decoded symbol by one table look-up and a short forward scan instead of a binary search.
struct Model {
    /// `cdf[i]` = left cumulative of level `i`; `cdf[levels]` = 2^PRECISION.
    cdf: [u32; MAX_LEVELS + 1],
    lut: [u8; 1 << LUT_BITS],
}

impl Model {
    /// The model for encoding: the cumulative distribution only.
    fn new(classes: &[u8], buf: &mut Vec<u32>) -> Self {
        probabilities(classes, buf);
        let mut cdf = [0u32; MAX_LEVELS + 1];
        for (i, &p) in buf.iter().enumerate() {
            cdf[i + 1] = cdf[i] + p;
        }
        // Levels past the last one never hold a quantile.
        cdf[buf.len() + 1..].fill(1 << PRECISION);
        Self {
            cdf,
            lut: [0; 1 << LUT_BITS],
        }
    }

    /// The model for decoding: with its table (entry `j` = the level holding quantile `j · 2^(PRECISION − LUT_BITS)`).
    fn for_decoding(classes: &[u8], buf: &mut Vec<u32>) -> Self {
        let mut m = Self::new(classes, buf);
        let shift = PRECISION - LUT_BITS;
        for i in 0..buf.len() {
            // Entries whose quantile lies in [cdf[i], cdf[i + 1]).
            let a = m.cdf[i].div_ceil(1 << shift) as usize;
            let b = m.cdf[i + 1].div_ceil(1 << shift) as usize;
            m.lut[a..b].fill(i as u8);
        }
        m
    }
}

impl EntropyModel<{ PRECISION as usize }> for Model {
    type Symbol = usize;
    type Probability = u32;
}

impl EncoderModel<{ PRECISION as usize }> for Model {
    fn left_cumulative_and_probability(
        &self,
        symbol: impl std::borrow::Borrow<usize>,
    ) -> Option<(u32, std::num::NonZeroU32)> {
        let s = *symbol.borrow();
        let (l, r) = (*self.cdf.get(s)?, *self.cdf.get(s + 1)?);
        Some((l, std::num::NonZeroU32::new(r - l)?))
    }
}

impl DecoderModel<{ PRECISION as usize }> for Model {
    #[inline]
    fn quantile_function(&self, quantile: u32) -> (usize, u32, std::num::NonZeroU32) {
        let mut i = self.lut[(quantile >> (PRECISION - LUT_BITS)) as usize] as usize;
        // A quantile below 2^PRECISION lies below cdf[levels], so the scan stops at a real level.
        while self.cdf[i + 1] <= quantile {
            i += 1;
        }
        let (l, r) = (self.cdf[i], self.cdf[i + 1]);
        // Every level has a probability of at least 1 (see `probabilities`).
        (
            i,
            l,
            std::num::NonZeroU32::new(r - l).unwrap_or(std::num::NonZeroU32::MIN),
        )
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Encoding

/// Scale rounded up to the next f16, so the quantized levels never overflow `h`.
fn f16_up(s: f32) -> f16 {
    let h = f16::from_f32(s);
    if h.to_f32() < s {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// One matrix (`n` rows × `d` channels, row-major) quantized: symbols channel-major (`sym[c · n + t]`).
fn quantize(
    x: &[f32],
    n: usize,
    d: usize,
    scale: Scale,
    h: i32,
    scales: &mut Vec<f16>,
    sym: &mut Vec<u32>,
) {
    scales.clear();
    scales.resize(scale.count(n, d), f16::ZERO);
    let mut max = vec![0f32; scales.len()];
    for t in 0..n {
        for c in 0..d {
            let m = &mut max[scale.at(t, c)];
            *m = m.max(x[t * d + c].abs());
        }
    }
    scales
        .iter_mut()
        .zip(&max)
        .for_each(|(s, &m)| *s = f16_up(m));
    // Levels per unit of each scale (0 for an all-zero scale: every entry at level 0).
    max.iter_mut().zip(scales.iter()).for_each(|(m, s)| {
        let s = s.to_f32();
        *m = if s > 0.0 { h as f32 / s } else { 0.0 };
    });
    sym.clear();
    sym.resize(n * d, h as u32);
    for t in 0..n {
        for c in 0..d {
            let q = (x[t * d + c] * max[scale.at(t, c)]).round() as i32;
            sym[c * n + t] = (q.clamp(-h, h) + h) as u32;
        }
    }
}

/// Most assignment rounds of the channel grouping at each model count (it usually settles in fewer).
const KMEANS_ROUNDS: usize = 8;

/// Most entropy models the channels of one matrix share (a channel's model index is 4 bits).
const MAX_GROUPS: usize = 16;

/// The entropy models of one matrix: `n` histograms (as classes, `levels` each, model-major) and the model of each
/// channel.
#[derive(Default)]
struct Groups {
    n: usize,
    of: Vec<u8>,
    classes: Vec<u8>,
}

impl Groups {
    /// Classes of each model from the channels' histograms (`counts`, channel-major) under the current assignment.
    fn fit(&mut self, counts: &[u32], levels: usize, sum: &mut Vec<u32>) {
        sum.clear();
        sum.resize(self.n * levels, 0);
        for (c, &g) in self.of.iter().enumerate() {
            let dst = &mut sum[g as usize * levels..][..levels];
            dst.iter_mut()
                .zip(&counts[c * levels..][..levels])
                .for_each(|(a, &b)| *a += b);
        }
        self.classes.clear();
        for g in sum.chunks(levels) {
            let max = g.iter().copied().max().unwrap_or(0).max(1);
            self.classes.extend(g.iter().map(|&k| class_of(k, max)));
        }
    }
}

/// Chooses how many models the `d` channels of a matrix share (1, 2, 4, … [`MAX_GROUPS`]) and which channel codes
/// with which, by the bits each choice costs: the symbols under their channel's model, plus the models (4 bits a
/// level) and the channel → model map (4 bits a channel). Per-channel histograms (as version 1 stored) cost half a
/// byte per level and channel, up to a bit per entry of a 256-token chunk at 63 levels; on real caches most channels'
/// histograms are alike up to a few shapes (RoPE's slow and fast channels, outliers), which a few shared models
/// capture. For each count the assignment is a k-means under cross-entropy, started from the channels ordered by their
/// own entropy.
fn group_channels(counts: &[u32], d: usize, levels: usize, out: &mut Groups) {
    let mut sum = Vec::new();
    let mut cost = vec![0f32; MAX_GROUPS * levels.next_multiple_of(16)];
    // Channels ordered by the entropy of their own histogram.
    let mut order: Vec<(f32, usize)> = (0..d)
        .map(|c| {
            let h = &counts[c * levels..][..levels];
            let n: u32 = h.iter().sum();
            let e = h
                .iter()
                .filter(|&&k| k > 0)
                .map(|&k| {
                    let p = k as f32 / n as f32;
                    -p * p.log2()
                })
                .sum::<f32>();
            (e, c)
        })
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    // Each channel's counts as f32 rows padded to a multiple of 16 levels (the padding costs 0): the assignment's
    // sums are dense dot products.
    let lp = levels.next_multiple_of(16);
    let mut dense = vec![0f32; d * lp];
    for c in 0..d {
        for (x, &k) in dense[c * lp..][..levels]
            .iter_mut()
            .zip(&counts[c * levels..][..levels])
        {
            *x = k as f32;
        }
    }
    let mut best = f32::INFINITY;
    let mut g = Groups::default();
    let mut n_groups = 1;
    while n_groups <= MAX_GROUPS.min(d) {
        g.n = n_groups;
        g.of.clear();
        g.of.resize(d, 0);
        for (rank, &(_, c)) in order.iter().enumerate() {
            g.of[c] = (rank * n_groups / d) as u8;
        }
        let mut bits = 0f32;
        for _ in 0..KMEANS_ROUNDS {
            g.fit(counts, levels, &mut sum);
            // A level's cost in bits under its model: −log2 of weight 2^class over the model's total weight (what
            // `probabilities` gives up to its floor of 1 and rounding; only the choice uses it).
            for (m, cl) in g.classes.chunks(levels).enumerate() {
                let total = cl.iter().map(|&c| 1u64 << c).sum::<u64>() as f32;
                let lt = total.log2();
                for (x, &c) in cost[m * lp..][..levels].iter_mut().zip(cl) {
                    *x = lt - c as f32;
                }
            }
            bits = 0.0;
            let mut moved = false;
            for c in 0..d {
                let h = &dense[c * lp..][..lp];
                let (mut arg, mut low) = (0, f32::INFINITY);
                for m in 0..n_groups {
                    let b = dot16(h, &cost[m * lp..][..lp]);
                    if b < low {
                        (arg, low) = (m, b);
                    }
                }
                moved |= g.of[c] as usize != arg;
                g.of[c] = arg as u8;
                bits += low;
            }
            if !moved {
                break;
            }
        }
        bits += (4 * n_groups * levels + if n_groups > 1 { 4 * d } else { 0 }) as f32;
        if bits >= best {
            break;
        }
        best = bits;
        g.fit(counts, levels, &mut sum);
        std::mem::swap(out, &mut g);
        n_groups *= 2;
    }
}

/// Dot product of two equal slices whose length is a multiple of 16, in 16 lanes (so it vectorizes).
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

/// 4-bit entries, two a byte (the first in the low half).
fn put_nibbles(o: &mut Out, x: &[u8]) {
    for pair in x.chunks(2) {
        o.u8(pair[0] | pair.get(1).map_or(0, |x| x << 4));
    }
}

fn take_nibbles(i: &mut In, n: usize, what: &'static str) -> Result<Vec<u8>, CodecError> {
    let packed = i.take(n.div_ceil(2), what)?;
    Ok((0..n)
        .map(|j| (packed[j / 2] >> (4 * (j % 2))) & 15)
        .collect())
}

/// Encodes `rows` (see the module documentation for the format).
pub fn encode(rows: &KvRows, cfg: &CodecConfig) -> Result<Vec<u8>> {
    ensure!(
        cfg.chunk_tokens > 0,
        "codec chunks must hold at least one token"
    );
    for (what, b) in [("key", cfg.key_bins), ("value", cfg.value_bins)] {
        ensure!(b.in_range(), "codec {what} bins must lie in {BINS:?}");
    }
    let mut o = Out::default();
    o.0.extend_from_slice(MAGIC);
    o.u16(VERSION);
    o.u16(0);
    let len_at = o.0.len();
    o.u32(0);
    let h0 = o.0.len();
    for x in [
        rows.n_layers,
        rows.n_heads,
        rows.hk,
        rows.hv,
        rows.tokens,
        cfg.chunk_tokens,
    ] {
        o.u32(u32::try_from(x).context("codec: a dimension past u32")?);
    }
    o.u8(cfg.key_scale.code());
    o.u8(cfg.value_scale.code());
    for bins in [cfg.key_bins, cfg.value_bins] {
        for l in 0..rows.n_layers {
            o.u8(bins.bins(l, rows.n_layers));
        }
    }
    let len = (o.0.len() - h0) as u32;
    o.0[len_at..h0].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&o.0[h0..]);
    o.u32(crc);
    // Chunks encode alone, so they encode in parallel (as they decode).
    use rayon::prelude::*;
    let chunks: Vec<Vec<u8>> = (0..rows.tokens.div_ceil(cfg.chunk_tokens))
        .into_par_iter()
        .map(|c| {
            let a = c * cfg.chunk_tokens;
            encode_chunk(&rows.slice(a, (a + cfg.chunk_tokens).min(rows.tokens)), cfg)
        })
        .collect::<Result<_>>()?;
    let t0 = o.0.len();
    o.u32(chunks.len() as u32);
    for c in &chunks {
        o.u64(c.len() as u64);
        o.u32(crc32fast::hash(c));
    }
    let crc = crc32fast::hash(&o.0[t0..]);
    o.u32(crc);
    for c in &chunks {
        o.0.extend_from_slice(c);
    }
    Ok(o.0)
}

fn encode_chunk(r: &KvRows, cfg: &CodecConfig) -> Result<Vec<u8>> {
    let mut o = Out::default();
    r.pos.iter().for_each(|&p| o.u32(p));
    let n = r.tokens;
    let (mut scales, mut sym, mut probs, mut counts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut groups = Groups::default();
    for layer in 0..r.n_layers {
        for head in 0..r.n_heads {
            let s = layer * r.n_heads + head;
            for (x, d, bins, scale) in [
                (
                    &r.k,
                    r.hk,
                    cfg.key_bins.bins(layer, r.n_layers),
                    cfg.key_scale,
                ),
                (
                    &r.v,
                    r.hv,
                    cfg.value_bins.bins(layer, r.n_layers),
                    cfg.value_scale,
                ),
            ] {
                if scale == Scale::Exact {
                    x[s * n * d..][..n * d]
                        .iter()
                        .for_each(|&v| o.u16(f16::from_f32(v).to_bits()));
                    continue;
                }
                let h = half(bins);
                let levels = (2 * h + 1) as usize;
                quantize(
                    &x[s * n * d..][..n * d],
                    n,
                    d,
                    scale,
                    h,
                    &mut scales,
                    &mut sym,
                );
                scales.iter().for_each(|s| o.u16(s.to_bits()));
                // Each channel's histogram, then the models its channels share.
                counts.clear();
                counts.resize(d * levels, 0u32);
                for c in 0..d {
                    let hist = &mut counts[c * levels..][..levels];
                    sym[c * n..][..n]
                        .iter()
                        .for_each(|&y| hist[y as usize] += 1);
                }
                group_channels(&counts, d, levels, &mut groups);
                o.u8(groups.n as u8);
                if groups.n > 1 {
                    put_nibbles(&mut o, &groups.of);
                }
                put_nibbles(&mut o, &groups.classes);
                let models: Vec<Model> = groups
                    .classes
                    .chunks(levels)
                    .map(|cl| Model::new(cl, &mut probs))
                    .collect();
                let mut enc = DefaultRangeEncoder::new();
                for c in 0..d {
                    let m = &models[groups.of[c] as usize];
                    enc.encode_iid_symbols(sym[c * n..][..n].iter().map(|&y| y as usize), m)
                        .map_err(|e| anyhow::anyhow!("range coder: {e:?}"))?;
                }
                let words = enc
                    .into_compressed()
                    .map_err(|e| anyhow::anyhow!("range coder: {e:?}"))?;
                o.u32(words.len() as u32);
                words.iter().for_each(|&w| o.u32(w));
            }
        }
    }
    Ok(o.0)
}

// ---------------------------------------------------------------------------------------------------------------------
// Decoding

/// What a blob's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub n_layers: usize,
    pub n_heads: usize,
    pub hk: usize,
    pub hv: usize,
    pub tokens: usize,
    pub chunk_tokens: usize,
    pub key_scale: Scale,
    pub value_scale: Scale,
    pub key_bins: Vec<u8>,
    pub value_bins: Vec<u8>,
    /// (byte offset, length, crc32) of each chunk.
    chunks: Vec<(usize, usize, u32)>,
}

/// Reads and checks a blob's header and chunk table.
pub fn header(blob: &[u8]) -> Result<Header, CodecError> {
    let mut i = In { b: blob, at: 0 };
    if i.take(8, "magic")? != MAGIC {
        return Err(CodecError::Magic);
    }
    let version = i.u16("version")?;
    if version != VERSION {
        return Err(CodecError::Version(version));
    }
    i.u16("flags")?;
    let len = i.u32("header length")? as usize;
    let hb = i.take(len, "header")?;
    if i.u32("header checksum")? != crc32fast::hash(hb) {
        return Err(CodecError::Corrupt("header checksum mismatch".into()));
    }
    let mut hi = In { b: hb, at: 0 };
    let mut dims = [0usize; 6];
    for d in &mut dims {
        *d = hi.u32("header")? as usize;
    }
    let [n_layers, n_heads, hk, hv, tokens, chunk_tokens] = dims;
    let mut scale = || -> Result<Scale, CodecError> {
        let x = hi.u8("header")?;
        Scale::ALL
            .into_iter()
            .find(|s| s.code() == x)
            .ok_or_else(|| CodecError::Corrupt(format!("unknown scaling {x}")))
    };
    let (key_scale, value_scale) = (scale()?, scale()?);
    let key_bins = hi.take(n_layers, "key bins")?.to_vec();
    let value_bins = hi.take(n_layers, "value bins")?.to_vec();
    if hi.at != hb.len() {
        return Err(CodecError::Corrupt(
            "header length does not match its fields".into(),
        ));
    }
    if chunk_tokens == 0
        || [key_bins.as_slice(), &value_bins]
            .iter()
            .any(|b| b.iter().any(|&x| !(4..=64).contains(&x)))
    {
        return Err(CodecError::Corrupt("impossible header values".into()));
    }
    let t0 = i.at;
    let n_chunks = i.u32("chunk table")? as usize;
    if n_chunks != tokens.div_ceil(chunk_tokens) {
        return Err(CodecError::Corrupt(format!(
            "{n_chunks} chunks for {tokens} tokens of {chunk_tokens}"
        )));
    }
    let mut table = Vec::with_capacity(n_chunks.min(1 << 16));
    for _ in 0..n_chunks {
        table.push((i.u64("chunk table")? as usize, i.u32("chunk table")?));
    }
    let crc = crc32fast::hash(&blob[t0..i.at]);
    if i.u32("chunk table checksum")? != crc {
        return Err(CodecError::Corrupt("chunk table checksum mismatch".into()));
    }
    let mut at = i.at;
    let mut chunks = Vec::with_capacity(n_chunks);
    for (len, crc) in table {
        chunks.push((at, len, crc));
        at = at
            .checked_add(len)
            .ok_or(CodecError::Corrupt("chunk length".into()))?;
    }
    if at > blob.len() {
        return Err(CodecError::Truncated("chunk data"));
    }
    if at < blob.len() {
        return Err(CodecError::Corrupt(format!(
            "{} bytes after the last chunk",
            blob.len() - at
        )));
    }
    // Every token carries its 4-byte position, and no real cache codes below an eighth of a bit an entry (the
    // codec's own settings give 3 to 6): dimensions past that are damage, refused before anything is allocated.
    let entries = n_layers
        .checked_mul(n_heads)
        .and_then(|x| x.checked_mul(tokens))
        .and_then(|x| x.checked_mul(hk + hv));
    if !(1..=4096).contains(&hk)
        || !(1..=4096).contains(&hv)
        || tokens.saturating_mul(4) > blob.len()
        || entries.is_none_or(|x| x / 64 > blob.len())
    {
        return Err(CodecError::Corrupt(format!(
            "dimensions {n_layers} × {n_heads} × {tokens} × {hk}/{hv} do not fit a blob of {} bytes",
            blob.len()
        )));
    }
    Ok(Header {
        n_layers,
        n_heads,
        hk,
        hv,
        tokens,
        chunk_tokens,
        key_scale,
        value_scale,
        key_bins,
        value_bins,
        chunks,
    })
}

/// Decodes the whole blob.
pub fn decode(blob: &[u8]) -> Result<KvRows> {
    decode_prefix(blob, usize::MAX)
}

/// Decodes the first `max_chunks` chunks (a prefix of the tokens), checking each one's CRC first. Chunks decode
/// alone, so they decode in parallel (each into its own rows, stitched in order after); the first damaged chunk is
/// the one named.
pub fn decode_prefix(blob: &[u8], max_chunks: usize) -> Result<KvRows> {
    use rayon::prelude::*;
    let h = header(blob)?;
    let n_chunks = h.chunks.len().min(max_chunks);
    let tokens = (n_chunks * h.chunk_tokens).min(h.tokens);
    let parts: Vec<Result<KvRows>> = h.chunks[..n_chunks]
        .par_iter()
        .enumerate()
        .map(|(ci, &(at, len, crc))| {
            let bytes = &blob[at..at + len];
            if crc32fast::hash(bytes) != crc {
                return Err(CodecError::Corrupt(format!("chunk {ci} checksum mismatch")).into());
            }
            let n = h.chunk_tokens.min(h.tokens - ci * h.chunk_tokens);
            let mut part = KvRows::zeros(h.n_layers, h.n_heads, h.hk, h.hv, n);
            decode_chunk(bytes, &h, 0, n, &mut part)
                .with_context(|| format!("KV codec chunk {ci}"))?;
            Ok(part)
        })
        .collect();
    let mut out = KvRows::zeros(h.n_layers, h.n_heads, h.hk, h.hv, tokens);
    for (ci, part) in parts.into_iter().enumerate() {
        let part = part?;
        let (a, n) = (ci * h.chunk_tokens, part.tokens);
        out.pos[a..a + n].copy_from_slice(&part.pos);
        // Each stream's rows of this chunk: [a, a + n) of the stream's `tokens`.
        for st in 0..h.n_layers * h.n_heads {
            out.k[(st * tokens + a) * h.hk..][..n * h.hk]
                .copy_from_slice(&part.k[st * n * h.hk..][..n * h.hk]);
            out.v[(st * tokens + a) * h.hv..][..n * h.hv]
                .copy_from_slice(&part.v[st * n * h.hv..][..n * h.hv]);
        }
    }
    Ok(out)
}

fn decode_chunk(bytes: &[u8], h: &Header, a: usize, n: usize, out: &mut KvRows) -> Result<()> {
    let mut i = In { b: bytes, at: 0 };
    for t in 0..n {
        out.pos[a + t] = i.u32("positions")?;
    }
    let (mut probs, mut words) = (Vec::new(), Vec::<u32>::new());
    let total = out.tokens;
    for layer in 0..h.n_layers {
        for head in 0..h.n_heads {
            let s = layer * h.n_heads + head;
            for (is_key, d, bins, scale) in [
                (true, h.hk, h.key_bins[layer], h.key_scale),
                (false, h.hv, h.value_bins[layer], h.value_scale),
            ] {
                let x = if is_key { &mut out.k } else { &mut out.v };
                if scale == Scale::Exact {
                    let raw = i.take(2 * n * d, "exact values")?;
                    for (t, row) in raw.chunks_exact(2 * d).enumerate() {
                        let dst = &mut x[(s * total + a + t) * d..][..d];
                        for (y, b) in dst.iter_mut().zip(row.chunks_exact(2)) {
                            *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                        }
                    }
                    continue;
                }
                let hh = half(bins);
                let levels = (2 * hh + 1) as usize;
                // A level's step: the scale over `hh`.
                let steps: Vec<f32> = i
                    .take(2 * scale.count(n, d), "scales")?
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() / hh as f32)
                    .collect();
                let n_models = i.u8("entropy models")? as usize;
                if !(1..=MAX_GROUPS).contains(&n_models) {
                    bail!(CodecError::Corrupt(format!(
                        "{n_models} entropy models in a matrix"
                    )));
                }
                let of = if n_models > 1 {
                    take_nibbles(&mut i, d, "entropy models")?
                } else {
                    vec![0; d]
                };
                if of.iter().any(|&m| m as usize >= n_models) {
                    bail!(CodecError::Corrupt(
                        "a channel names a missing entropy model".into()
                    ));
                }
                let classes = take_nibbles(&mut i, n_models * levels, "entropy models")?;
                let models: Vec<Model> = classes
                    .chunks(levels)
                    .map(|cl| Model::for_decoding(cl, &mut probs))
                    .collect();
                let n_words = i.u32("coded symbols")? as usize;
                words.clear();
                words.extend(
                    i.take(
                        n_words
                            .checked_mul(4)
                            .ok_or(CodecError::Corrupt("word count".into()))?,
                        "coded symbols",
                    )?
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                let mut dec = DefaultRangeDecoder::from_compressed(words.clone())
                    .map_err(|e| anyhow::anyhow!("range decoder: {e:?}"))?;
                for c in 0..d {
                    let m = &models[of[c] as usize];
                    for (t, y) in dec.decode_iid_symbols(n, m).enumerate() {
                        let y = y.map_err(|e| anyhow::anyhow!("range decoder: {e:?}"))? as i32;
                        x[(s * total + a + t) * d + c] = (y - hh) as f32 * steps[scale.at(t, c)];
                    }
                }
            }
        }
    }
    if i.at != bytes.len() {
        bail!(CodecError::Corrupt(format!(
            "{} unread bytes at the end of a chunk",
            bytes.len() - i.at
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
