//! CacheBlend (Yao et al., 2024): reusing the KV caches of text chunks that are not a prefix.
//!
//! RAG retrieves several documents; each one's KV cache was computed on its own ([`ChunkKv::compute`]: after what a
//! base session holds: a shared system prefix, one BOS token as in the paper's code, or nothing) and the request puts
//! them, in its own order, after the system prompt. [`assemble`] builds a session whose cache holds the chunks at their
//! new positions, keys re-rotated by the position shift (see [`crate::model::blend`]). On its own that is *naive
//! reuse*: each chunk's KV ignores the chunks before it (no cross-attention), and answers suffer. [`recompute`] is
//! CacheBlend's fix:
//!
//! 1. the layers before the check layer run in full over every reused token (their fresh K/V replace the reused);
//! 2. at the check layer every token's fresh K/V are computed, compared with the reused ones, and written over them
//!    (CacheBlend's code attends at that layer over fresh K/V for all tokens; LMCache's blender writes only the
//!    chosen ones, but they cost nothing more here); the tokens of largest squared deviation (summed over KV heads),
//!    [`BlendOptions::ratio`] of them (default 15 %), are chosen;
//! 3. from then on only the chosen tokens run: their fresh K/V overwrite the reused entries and their queries attend
//!    to the whole blended cache; every other token keeps its reused K/V.
//!
//! Checked against the paper (§4.3) and public code (CacheBlend's vllm_blend, LMCache's v1 blender):
//! - check layer 1 with one ratio is what both codes do (`check_layers = [1]`; layer 0's K/V depend only on the token
//!   and its position, so after re-rotation they equal the fresh ones and show no deviation to rank by). The paper's
//!   *gradual filtering* (keep r₁ > r at the first check, then rank again among those on the next layers, narrowing to
//!   r) is in neither code; [`BlendOptions::gradual`] adds it as an option.
//! - deviation: CacheBlend's code ranks by values, LMCache's by keys; values stay the default, keys are
//!   [`Deviation::Key`].
//! - the question after the chunks: CacheBlend's code treats it as one more cached chunk and forces only its last
//!   token into the recompute (its suffix length is computed as 1); the paper and this module recompute all of it: the
//!   caller prefills it as usual, through every layer.
//! - the system prefix (with BOS) is a true prefix: it is reused exactly, as in both codes, and never ranked.
//! - chunk prefill: CacheBlend's code prefills each chunk alone after a BOS token and keeps only the chunk's tokens,
//!   so no chunk token was ever an attention sink at position 0. Computing a chunk from position 0 with nothing
//!   before it makes its first token a sink whose reused K/V then sit mid-prompt; give [`ChunkKv::compute`] a base
//!   holding one BOS (or the shared prefix) instead.
//! - positions: chunks move to their place in the request by re-rotating cached keys, as both codes do.
//!
//! Ratio 1 recomputes everything (= a full prefill of the chunks); ratio 0 keeps the reused K/V after the check layer
//! (= naive reuse, but for the layers up to the check layer).

use anyhow::{bail, Result};

use super::Session;
use crate::kv::{KvCache, KvDtype};
use crate::model::blend::{shift_keys, RowRope};
use crate::model::{Model, Scratch};

/// LMCache's default share of reused tokens recomputed.
pub const DEFAULT_RATIO: f32 = 0.15;
/// LMCache's default check layer.
pub const DEFAULT_CHECK_LAYER: usize = 1;

/// A text chunk's KV cache, computed on its own: every layer holds the chunk's entries at positions
/// `start .. start + len` (sliding-window layers too: nothing dropped), keys rotated for those positions.
pub struct ChunkKv {
    tokens: Vec<u32>,
    start: u32,
    cache: KvCache,
}

impl ChunkKv {
    /// Prefills `tokens` after what `base` holds (an empty session: from position 0; or a shared system prefix) on a
    /// copy of `base`, and keeps the chunk's entries. `base` is unchanged.
    pub fn compute(base: &Session, tokens: &[u32]) -> Result<Self> {
        check_plain(base)?;
        if tokens.is_empty() {
            bail!("a chunk to cache is empty");
        }
        let mut s = base.duplicate()?;
        let start = s.n_past();
        s.hold(start);
        s.prefill_uncompressed(tokens)?;
        let mut cfg = s.cache.cfg.clone();
        cfg.windows.clear();
        let mut cache = KvCache::new(cfg);
        copy_entries(
            &s.cache,
            start as u32,
            tokens.len(),
            &mut cache,
            start as u32,
            None,
        )?;
        Ok(Self {
            tokens: tokens.to_vec(),
            start: start as u32,
            cache,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Position of the chunk's first token when it was computed.
    pub fn start(&self) -> u32 {
        self.start
    }

    /// The chunk's cache (entries at positions start .. start + len).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Bytes its cache holds.
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// CacheBlend's settings, checked once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlendOptions {
    /// Share of the reused tokens recomputed through the last layers, in [0, 1].
    pub ratio: f32,
    /// The (first) layer at which tokens are ranked by KV deviation; the layers before it are recomputed in full.
    pub check_layer: usize,
    /// What the deviation compares.
    pub deviation: Deviation,
    /// The paper's gradual filtering: share kept at the check layer (≥ `ratio`; = `ratio`: one check, as LMCache and
    /// CacheBlend's code do).
    pub first_ratio: f32,
    /// Layers after the check layer that rank again, among the tokens still carried, narrowing the kept share
    /// linearly from `first_ratio` to `ratio` (0 with `first_ratio` = `ratio`).
    pub taper: usize,
}

/// Which cached vectors the check layer compares with the fresh ones: CacheBlend's original code ranks by values,
/// LMCache's current blender by keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Deviation {
    #[default]
    Value,
    Key,
}

impl Default for BlendOptions {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_RATIO,
            check_layer: DEFAULT_CHECK_LAYER,
            deviation: Deviation::Value,
            first_ratio: DEFAULT_RATIO,
            taper: 0,
        }
    }
}

impl BlendOptions {
    pub fn new(ratio: f32, check_layer: usize) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) {
            bail!("blend recompute ratio {ratio} is outside [0, 1] (0.15 recomputes 15 % of the reused tokens)");
        }
        Ok(Self {
            ratio,
            check_layer,
            deviation: Deviation::Value,
            first_ratio: ratio,
            taper: 0,
        })
    }

    /// Gradual filtering: the check layer keeps `first_ratio` of the reused tokens, and each of the next `taper`
    /// layers ranks the carried tokens again and keeps a share linearly closer to `ratio`.
    pub fn gradual(mut self, first_ratio: f32, taper: usize) -> Result<Self> {
        if !(self.ratio..=1.0).contains(&first_ratio) {
            bail!(
                "blend first-check share {first_ratio} must lie in [{}, 1]: gradual filtering keeps more tokens at the \
                 first check than at the last",
                self.ratio
            );
        }
        if (first_ratio > self.ratio) != (taper > 0) {
            bail!(
                "gradual filtering needs both a first-check share above the ratio ({first_ratio} vs {}) and at least \
                 one tapering layer (got {taper})",
                self.ratio
            );
        }
        self.first_ratio = first_ratio;
        self.taper = taper;
        Ok(self)
    }

    /// Tokens recomputed through the last layers out of `n` reused.
    pub fn picks(&self, n: usize) -> usize {
        share(self.ratio, n)
    }

    /// Tokens kept at the `step`-th check (0 = the check layer, `taper` = the last), out of `n` reused.
    pub fn kept_at(&self, step: usize, n: usize) -> usize {
        if self.taper == 0 || step >= self.taper {
            return self.picks(n);
        }
        let t = step as f32 / self.taper as f32;
        share(self.first_ratio + (self.ratio - self.first_ratio) * t, n).max(self.picks(n))
    }
}

fn share(ratio: f32, n: usize) -> usize {
    ((ratio as f64 * n as f64 + 1e-9).floor() as usize).min(n)
}

/// How a request's reused chunks get into its cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reuse {
    /// Ordinary prefill of the chunks (no reuse): the quality reference.
    Full,
    /// The chunks' caches, re-rotated, nothing recomputed.
    Naive,
    /// Re-rotated caches with CacheBlend's selective recompute.
    Blend(BlendOptions),
}

/// What [`recompute`] did.
#[derive(Clone, Debug, Default)]
pub struct BlendOutcome {
    /// Position of the first reused token.
    pub from: usize,
    /// Each reused token's squared value deviation at the check layer (index = position − `from`).
    pub deviation: Vec<f32>,
    /// Positions of the tokens recomputed through the last layer, ascending.
    pub recomputed: Vec<u32>,
    /// Tokens whose queries ran through each layer from the check layer on (index = layer − check layer): the
    /// recompute's cost.
    pub layer_rows: Vec<usize>,
}

/// A copy of `base` followed by `chunks` in this order, by `how`: the session to prefill the question into. Also the
/// blend's outcome under [`Reuse::Blend`].
pub fn prepare<'m>(
    base: &Session<'m>,
    chunks: &[&ChunkKv],
    how: Reuse,
) -> Result<(Session<'m>, Option<BlendOutcome>)> {
    match how {
        Reuse::Full => {
            let mut s = base.duplicate()?;
            let toks: Vec<u32> = chunks
                .iter()
                .flat_map(|c| c.tokens.iter().copied())
                .collect();
            if !toks.is_empty() {
                s.prefill_uncompressed(&toks)?;
            }
            Ok((s, None))
        }
        Reuse::Naive => Ok((assemble(base, chunks)?, None)),
        Reuse::Blend(opt) => {
            let from = base.n_past();
            let mut s = assemble(base, chunks)?;
            let out = recompute(&mut s, from, &opt)?;
            Ok((s, Some(out)))
        }
    }
}

/// Naive reuse: a copy of `base` whose cache gains each chunk's entries, in order, right after what `base` holds,
/// keys re-rotated from where the chunk was computed to where it now sits. Nothing is recomputed.
pub fn assemble<'m>(base: &Session<'m>, chunks: &[&ChunkKv]) -> Result<Session<'m>> {
    check_plain(base)?;
    let from = base.n_past();
    let n: usize = chunks.iter().map(|c| c.len()).sum();
    if from + n > base.cfg.max_context {
        bail!(
            "blended prompt too long: {from} tokens held + {n} from {} cached chunks = {} tokens, over the context \
             budget of {} (raise --max-context or retrieve fewer chunks)",
            chunks.len(),
            from + n,
            base.cfg.max_context
        );
    }
    let want = &base.cache.cfg;
    for c in chunks {
        let have = &c.cache.cfg;
        if (
            have.n_layers,
            have.n_kv_heads,
            have.head_dim_k,
            have.head_dim_v,
            have.dtype,
        ) != (
            want.n_layers,
            want.n_kv_heads,
            want.head_dim_k,
            want.head_dim_v,
            want.dtype,
        ) {
            bail!(
                "a cached chunk was computed for another cache layout ({} layers × {} KV heads, {}) than this session's \
                 ({} × {}, {})",
                have.n_layers,
                have.n_kv_heads,
                have.dtype.label(),
                want.n_layers,
                want.n_kv_heads,
                want.dtype.label()
            );
        }
    }
    let mut s = base.duplicate()?;
    let held = s.cache.held();
    // Sliding-window layers keep what the chunks' own queries read until the recompute is done (it appends nothing).
    s.cache
        .hold(Some(held.map_or(from as u32, |h| h.min(from as u32))));
    let mut at = from;
    for c in chunks {
        let delta = at as i64 - c.start as i64;
        let shift = (delta != 0).then_some((s.model, delta));
        copy_entries(&c.cache, c.start, c.len(), &mut s.cache, at as u32, shift)?;
        s.tokens.extend_from_slice(&c.tokens);
        at += c.len();
    }
    s.cache.hold(held);
    Ok(s)
}

/// CacheBlend's selective recompute of the tokens at positions `from ..` of `s` (assembled by [`assemble`]); see the
/// module documentation. Appends nothing: it rewrites the K/V of the tokens it recomputes in place.
pub fn recompute(s: &mut Session, from: usize, opt: &BlendOptions) -> Result<BlendOutcome> {
    check_plain(s)?;
    let model = s.model;
    let c = model.config();
    if opt.check_layer >= c.n_layers {
        bail!(
            "blend check layer {} is past the model's {} layers (layer 1 is the usual choice)",
            opt.check_layer,
            c.n_layers
        );
    }
    if opt.check_layer + opt.taper >= c.n_layers {
        bail!(
            "blend gradual filtering runs past the model's {} layers (check layer {} + {} tapering layers)",
            c.n_layers,
            opt.check_layer,
            opt.taper
        );
    }
    let n = s.n_past().saturating_sub(from);
    let mut out = BlendOutcome {
        from,
        ..Default::default()
    };
    if n == 0 {
        return Ok(out);
    }
    let toks = s.tokens[from..].to_vec();
    let (cache, scratch) = (&mut s.cache, &mut s.scratch);
    rayon::scope(|_| -> Result<()> {
        let mut rows = Rows::new(model, &toks, from as u32, scratch);
        for li in 0..c.n_layers {
            if li >= opt.check_layer && li <= opt.check_layer + opt.taper {
                let step = li - opt.check_layer;
                // Every carried token's fresh K/V replace the reused ones here (they are computed to rank anyway).
                let dev = rows.check(model, li, opt.deviation, cache, scratch)?;
                let mut order: Vec<usize> = (0..dev.len()).collect();
                order.sort_by(|&a, &b| dev[b].total_cmp(&dev[a]).then(a.cmp(&b)));
                order.truncate(opt.kept_at(step, n));
                order.sort_unstable();
                if step == 0 {
                    out.deviation = dev;
                }
                rows.keep(model, &order);
                out.recomputed = rows.pos.clone();
            }
            if li >= opt.check_layer {
                out.layer_rows.push(rows.pos.len());
            }
            if rows.pos.is_empty() {
                break;
            }
            rows.layer(model, li, cache, scratch)?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// The token rows a recompute carries through the layers: their positions, residual streams and RoPE tables.
struct Rows {
    pos: Vec<u32>,
    /// rows × dim
    resid: Vec<f32>,
    rope: RowRope,
}

impl Rows {
    fn new(model: &Model, toks: &[u32], from: u32, s: &mut Scratch) -> Self {
        let dim = model.config().dim;
        let pos: Vec<u32> = (from..from + toks.len() as u32).collect();
        let mut resid = vec![0.0; toks.len() * dim];
        for a in (0..toks.len()).step_by(s.cap) {
            let b = (a + s.cap).min(toks.len());
            model.embed_rows(&toks[a..b], &pos[a..b], s);
            resid[a * dim..b * dim].copy_from_slice(&s.x[..(b - a) * dim]);
        }
        let mut rope = RowRope::default();
        model.rope_rows(&pos, &mut rope);
        Self { pos, resid, rope }
    }

    /// Keeps rows `idx` (ascending) only.
    fn keep(&mut self, model: &Model, idx: &[usize]) {
        let dim = model.config().dim;
        let mut resid = Vec::with_capacity(idx.len() * dim);
        for &i in idx {
            resid.extend_from_slice(&self.resid[i * dim..(i + 1) * dim]);
        }
        self.resid = resid;
        self.pos = idx.iter().map(|&i| self.pos[i]).collect();
        model.rope_rows(&self.pos, &mut self.rope);
    }

    /// Runs layer `li` over the rows, `s.cap` at a time in position order: their fresh K/V replace the cached ones,
    /// then their queries attend to the cache.
    fn layer(
        &mut self,
        model: &Model,
        li: usize,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<()> {
        let c = model.config();
        let (dim, hd, nkv) = (c.dim, c.head_dim_k, c.n_kv_heads);
        let first = stream_starts(cache, li)?;
        for a in (0..self.pos.len()).step_by(s.cap) {
            let b = (a + s.cap).min(self.pos.len());
            let m = b - a;
            s.x[..m * dim].copy_from_slice(&self.resid[a * dim..b * dim]);
            model.layer_qkv(li, &self.rope, a..b, s);
            for (t, &p) in self.pos[a..b].iter().enumerate() {
                for (h, &f) in first.iter().enumerate() {
                    let row = (t * nkv + h) * hd;
                    cache.write(
                        li,
                        h,
                        (p - f) as usize,
                        &s.k[row..row + hd],
                        &s.v[row..row + hd],
                    );
                }
            }
            model.layer_finish(li, &self.pos[a..b], cache, s);
            self.resid[a * dim..b * dim].copy_from_slice(&s.x[..m * dim]);
        }
        Ok(())
    }

    /// Each row's Σ over KV heads of |fresh − cached|² of the values (or keys) at layer `li`; then the rows' fresh
    /// K/V replace the cached ones on that layer.
    fn check(
        &self,
        model: &Model,
        li: usize,
        what: Deviation,
        cache: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<Vec<f32>> {
        let c = model.config();
        let (dim, hd, nkv) = (c.dim, c.head_dim_k, c.n_kv_heads);
        let first = stream_starts(cache, li)?;
        let (mut kb, mut vb) = (vec![0.0; c.head_dim_k], vec![0.0; c.head_dim_v]);
        let mut dev = vec![0.0f32; self.pos.len()];
        for a in (0..self.pos.len()).step_by(s.cap) {
            let b = (a + s.cap).min(self.pos.len());
            s.x[..(b - a) * dim].copy_from_slice(&self.resid[a * dim..b * dim]);
            model.layer_qkv(li, &self.rope, a..b, s);
            for (t, &p) in self.pos[a..b].iter().enumerate() {
                for (h, &f) in first.iter().enumerate() {
                    let at = (p - f) as usize;
                    cache.read(li, h, at, &mut kb, &mut vb);
                    let row = (t * nkv + h) * hd;
                    let (k, v) = (&s.k[row..row + hd], &s.v[row..row + hd]);
                    let (fresh, cached) = match what {
                        Deviation::Value => (v, &vb),
                        Deviation::Key => (k, &kb),
                    };
                    dev[a + t] += fresh
                        .iter()
                        .zip(cached)
                        .map(|(x, y)| (x - y) * (x - y))
                        .sum::<f32>();
                    cache.write(li, h, at, k, v);
                }
            }
        }
        Ok(dev)
    }
}

/// The position of each KV head's first entry on `layer`; fails unless every stream holds consecutive positions (an
/// evicting method broke them), since rows are found by position.
fn stream_starts(cache: &KvCache, layer: usize) -> Result<Vec<u32>> {
    (0..cache.cfg.n_kv_heads)
        .map(|h| {
            let (len, nb) = (cache.len(layer, h), cache.n_blocks(layer, h));
            if len == 0 {
                bail!("layer {layer} holds no entries to blend");
            }
            let (b0, bl) = (cache.block(layer, h, 0), cache.block(layer, h, nb - 1));
            let (f, l) = (b0.pos[0], bl.pos[bl.n - 1]);
            if (l - f) as usize + 1 != len {
                bail!("layer {layer} KV head {h}: its entries are not consecutive positions; blend needs an unevicted cache");
            }
            Ok(f)
        })
        .collect()
}

/// Appends `n` entries of `src` from position `src_pos` on, on every layer, to `dst` at positions `dst_pos ..`; with
/// `shift` = (model, Δ), keys are re-rotated by Δ positions first.
fn copy_entries(
    src: &KvCache,
    src_pos: u32,
    n: usize,
    dst: &mut KvCache,
    dst_pos: u32,
    shift: Option<(&Model, i64)>,
) -> Result<()> {
    let cfg = &src.cfg;
    let (nkv, hk, hv) = (cfg.n_kv_heads, cfg.head_dim_k, cfg.head_dim_v);
    let (mut k, mut v) = (vec![0.0; n * nkv * hk], vec![0.0; n * nkv * hv]); // n × nkv·hd each
    let pos: Vec<u32> = (dst_pos..dst_pos + n as u32).collect();
    let half = shift.map_or(0, |(m, _)| m.config().rope_dim / 2);
    let (mut cos, mut sin) = (vec![0.0; half], vec![0.0; half]);
    for layer in 0..cfg.n_layers {
        let first = stream_starts(src, layer)?;
        for (h, &f) in first.iter().enumerate() {
            if src_pos < f || (src_pos - f) as usize + n > src.len(layer, h) {
                bail!(
                    "the chunk's cache lacks positions {src_pos}..{} on layer {layer}",
                    src_pos as usize + n
                );
            }
            for t in 0..n {
                let row_k = &mut k[(t * nkv + h) * hk..][..hk];
                let row_v = &mut v[(t * nkv + h) * hv..][..hv];
                src.read(layer, h, (src_pos - f) as usize + t, row_k, row_v);
            }
        }
        if let Some((model, delta)) = shift {
            model.rope_shift(layer, delta, &mut cos, &mut sin);
            shift_keys(model.config(), &mut k, &cos, &sin);
        }
        dst.append(layer, &pos, &k, &v);
    }
    Ok(())
}

/// Blending works on plain caches: no KV method (it would evict entries), no decode-time selector, no offload, f16 or
/// f32 storage.
fn check_plain(s: &Session) -> Result<()> {
    if s.press.is_some() || s.scratch.seq.selector.is_some() {
        bail!("cache blending needs --kv full (got '{}')", s.cfg.kv);
    }
    if s.cfg.offload.is_some() {
        bail!("cache blending does not run with --kv-offload");
    }
    if !matches!(s.cache.cfg.dtype, KvDtype::F16 | KvDtype::F32) {
        bail!(
            "cache blending needs f16 or f32 KV storage (got {})",
            s.cache.cfg.dtype.label()
        );
    }
    Ok(())
}

#[cfg(test)]
#[path = "blend_tests.rs"]
mod tests;
