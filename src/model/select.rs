//! The decode-time selector interface: read less of a kept cache.
//!
//! A [`Selector`] sits in the model's [`Scratch`](super::Scratch). Every layer's attention block, right after it
//! appended the chunk's keys and values, asks it which entries each KV head should read; the attention kernel then
//! reads only those ([`crate::attention::attend_selected`]) and merges partial softmaxes over them. A selector that
//! answers `false` leaves the layer dense (prefill, dense first layers, sliding-window layers, a context within the
//! budget). Selectors implement it in `src/methods/select/`, one file per method.

use crate::attention::Selection;
use crate::kv::{KvCache, MetaConfig};

use super::QueryWindow;

/// What one layer's attention hands its selector.
pub struct SelectCx<'a> {
    pub cache: &'a KvCache,
    pub layer: usize,
    /// The chunk's queries after RoPE: n × n_q_heads × head_dim_k.
    pub q: &'a [f32],
    /// The chunk's absolute positions (n).
    pub pos: &'a [u32],
    pub n_q_heads: usize,
    /// A sliding-window layer (it reads only its window anyway).
    pub local: bool,
}

impl SelectCx<'_> {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_q_heads / self.cache.cfg.n_kv_heads
    }

    /// The last token's query rows of the query heads KV head `kv` serves (group × head_dim_k, one after another).
    pub fn group_queries(&self, kv: usize) -> &[f32] {
        let (hk, g) = (self.cache.cfg.head_dim_k, self.group());
        let t = self.pos.len() - 1;
        &self.q[(t * self.n_q_heads + kv * g) * hk..][..g * hk]
    }

    /// The last token's query row of query head `h` (head_dim_k).
    pub fn last_query(&self, h: usize) -> &[f32] {
        let hk = self.cache.cfg.head_dim_k;
        let t = self.pos.len() - 1;
        &self.q[(t * self.n_q_heads + h) * hk..][..hk]
    }
}

/// A decode-time selection method for one session.
pub trait Selector: Send {
    /// Chooses the entries each KV head of `cx.layer` reads for this chunk into `out` and returns true, or returns
    /// false for dense attention. Called after the chunk's keys and values are in the cache.
    /// The bytes its own scoring reads (page summaries, keys) go into the cache's read counter
    /// ([`KvCache::note_read`]).
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool;

    /// Page summaries the cache must keep for this selector, if any.
    fn meta(&self) -> Option<MetaConfig> {
        None
    }

    /// Recent queries per layer this selector reads at [`Self::end_prefill`] (0 = none).
    fn query_window(&self) -> usize {
        0
    }

    /// Called once a prompt's prefill (and any compression after it) is done: build indices over the cached keys.
    /// `obs` holds the prompt's last [`Self::query_window`] queries of every layer.
    fn end_prefill(&mut self, _cache: &KvCache, _obs: &QueryWindow) {}

    /// Bytes of index structures held beside the cache (centroids, graphs); the stats count them with the cache.
    fn index_bytes(&self) -> usize {
        0
    }
}

/// A sparse prefill method ([`crate::attention::attend_tiles`]): for each prefill chunk of a global (not
/// sliding-window) layer, the key ranges each (KV head, query tile) reads. Decode steps (one query row) never ask.
pub trait PrefillPattern: Send {
    /// Writes the ranges for this chunk into `out` (reset by the callee to the cache's KV heads and the chunk's rows)
    /// and returns true, or returns false for dense attention. Called after the chunk's keys are in the cache.
    fn pattern(&mut self, cx: &SelectCx, out: &mut crate::attention::TileSelection) -> bool;
}
