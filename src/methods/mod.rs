//! KV-cache methods: what `--kv` accepts and what the eval harness sweeps over.
//!
//! A spec (`snapkv@0.25,chunked,kivi4`) is parsed once into a typed [`KvSpec`] ([`spec`]); every method and option
//! name lives in one table, the [`registry`], which the parser, the press, the CLI help, the README table and the
//! tests all read. Storage options change how the cache stores entries rather than which it keeps: `kivi8`, `kivi4`,
//! `kivi2` quantize the cache KIVI-style ([`crate::kv::quant`]), `think` stores pruned key channels compactly.
//!
//! # Design
//!
//! Most methods only decide *which* entries of one (layer, KV head) stream to keep. They implement [`Scorer`]: given a
//! [`HeadObs`] (that head's keys after RoPE, values, positions, the recent queries of the query heads sharing it,
//! accumulated attention if asked for), write one score per entry, higher = keep. The press ([`press::Press`]) turns
//! scores and a budget into `KvCache::retain` calls: each head keeps its top-k entries (ties go to the more recent
//! entry), the cache's freed blocks are trimmed, so the byte counter falls. Forced keeps (sinks, observation windows,
//! recent windows) are scores of +∞, so "kept = top-scored" holds for every method.
//!
//! What a score cannot express is *how many* entries each head keeps. That is the press's allocation step, in two
//! stages a method file provides as plain functions: per-head targets before scoring ([`pyramidkv`]: per-layer budgets
//! decreasing with depth; [`duo`]: retrieval heads keep all, streaming heads share the rest), and a redistribution
//! across the heads of a layer after scoring ([`adakv`]). Merging ([`kvmerger`]) needs one more hook: before the drop,
//! fold each dropped entry into a kept one through `KvCache::write`. So there is one trait, and allocation and
//! merging are small functions the press calls.
//!
//! # When compression runs
//!
//! - At the end of a prompt feed, as the protocol ([`CompressAt`], `at@context|prompt`, `--compress-at`) says:
//!   `prompt` compresses at the end of every prompt feed, so the observation window holds the prompt's last queries —
//!   the question, when the prompt ends with one (question-aware, as the SnapKV paper evaluates); `context` compresses
//!   once, at the end of the context, and the question is fed after it uncompressed (kvpress's protocol), later feeds
//!   too unless `turns`. Peak memory still holds the whole context.
//! - `chunked`: also after every chunk of a feed that compresses (Locret-style), so peak memory is bounded by budget +
//!   one chunk.
//! - During decoding, only with `every@N` (every N steps; the default is never): the cache stays within budget + N.
//!
//! Prefill is `Session::prefill`, or `Session::feed` of more than one token; a single-token feed is a decode step.

pub mod adakv;
pub mod duo;
pub mod h2o;
pub mod knorm;
pub mod kvmerger;
pub mod obs;
pub mod press;
pub mod pyramidkv;
pub mod random;
pub mod snapkv;
pub mod streamingllm;
pub mod think;
pub mod tova;
pub mod window;

pub mod heads;

pub mod prefill;
pub mod registry;
pub mod select;
pub mod spec;

pub use spec::{storage_for, Budget, CompressAt, Kivi, KvSpec, Options};

/// What a method reads besides the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Recent query rows per layer (0 = none).
    pub window: usize,
    /// Attention accumulated per cached entry (H2O).
    pub accumulate: bool,
    /// Cached values as well as keys.
    pub values: bool,
}

impl Needs {
    pub fn max(self, o: Needs) -> Needs {
        Needs {
            window: self.window.max(o.window),
            accumulate: self.accumulate || o.accumulate,
            values: self.values || o.values,
        }
    }
}

/// What a scorer sees of one (layer, KV head) stream. Rows are f32 and row-major.
pub struct HeadObs<'a> {
    pub layer: usize,
    pub n_layers: usize,
    pub head: usize,
    pub hk: usize,
    pub hv: usize,
    /// len × hk, after RoPE.
    pub keys: &'a [f32],
    /// len × hv when the method asked for values, else empty.
    pub values: &'a [f32],
    /// Absolute position of each entry (ascending).
    pub pos: &'a [u32],
    /// Recent queries of the `group` query heads sharing this KV head, oldest first: n_q × group × hk, after RoPE.
    pub queries: &'a [f32],
    /// Position of each query row.
    pub q_pos: &'a [u32],
    pub group: usize,
    /// Attention accumulated per entry when the method asked for it, else empty.
    pub acc: &'a [f32],
    /// q·k multiplier of the model.
    pub scale: f32,
    /// Sliding window of this layer (Gemma 3 local layers), for attention masks.
    pub window: Option<u32>,
    /// Entries this head will keep (its budget after per-layer/per-head allocation).
    pub keep: usize,
    /// Tokens the session has seen.
    pub seen: usize,
}

impl<'a> HeadObs<'a> {
    /// One head of one layer with keys only (`hk` floats each, at positions `pos`), no queries, no accumulated
    /// attention, group 1, scale 1, budget = every entry: what a scorer's unit test starts from.
    #[cfg(test)]
    pub(crate) fn single(keys: &'a [f32], hk: usize, pos: &'a [u32]) -> Self {
        HeadObs {
            layer: 0,
            n_layers: 1,
            head: 0,
            hk,
            hv: hk,
            keys,
            values: &[],
            pos,
            queries: &[],
            q_pos: &[],
            group: 1,
            acc: &[],
            scale: 1.0,
            window: None,
            keep: pos.len(),
            seen: pos.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    pub fn n_queries(&self) -> usize {
        self.q_pos.len()
    }
    /// Query row `r` of query head `g` of the group.
    pub fn query(&self, r: usize, g: usize) -> &[f32] {
        &self.queries[(r * self.group + g) * self.hk..][..self.hk]
    }
    pub fn key(&self, i: usize) -> &[f32] {
        &self.keys[i * self.hk..(i + 1) * self.hk]
    }
}

/// A method that ranks the entries of one head: write `out[i]` (one per entry), higher = keep; `f32::INFINITY` marks
/// entries that must stay. `tmp` is scratch the scorer may resize.
pub trait Scorer: Send + Sync {
    fn needs(&self) -> Needs;
    fn score(&self, obs: &HeadObs, tmp: &mut Vec<f32>, out: &mut [f32]);
}
