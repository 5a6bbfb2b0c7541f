//! Sessions: a model, its KV cache and activation buffers, and the token history they hold.
//!
//! A session prefills prompts in chunks (peak activation memory is bounded by the chunk, not the prompt), decodes one
//! token at a time, and keeps its cache across calls, so a chat turn only prefills the new tokens.

pub mod batch;
pub mod blend;
pub mod cost;
pub mod json;
pub mod json_lazy;
pub mod json_schema;
pub mod loglik;
pub mod memcheck;
pub mod memplan;
pub mod perplexity;
pub mod prefix;
pub mod sampler;
pub mod stats;
pub mod xml_call;

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::kv::{codec, KvCache, KvDtype, OffloadConfig, Resident};
use crate::methods::obs::{AttnAcc, QueryWindow};
use crate::methods::prefill::PrefillSpec;
use crate::methods::press::Press;
use crate::methods::{CompressAt, KvSpec, Needs};
use crate::model::lazy::LazyState;
use crate::model::{Model, Scratch};

pub use batch::{Batch, Input};
pub use memplan::{Lengths, MemPlan};
pub use sampler::{Sampler, SamplerConfig};
pub use stats::Stats;

/// Tokens per KV block (page).
pub const DEFAULT_BLOCK_TOKENS: usize = 32;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most tokens the session may hold (prompt + generated); defaults to the model's context length.
    pub max_context: usize,
    /// Prefill chunk: tokens per forward pass.
    pub chunk_size: usize,
    pub kv_dtype: KvDtype,
    pub block_tokens: usize,
    /// KV-cache method (`--kv`): `full` keeps every entry.
    pub kv: KvSpec,
    /// Observations to record even if the method does not need them (recent queries, accumulated attention), so that
    /// [`Session::fork`] can later apply a method that does. Default: none.
    pub observe: Needs,
    /// Head ablation: `head_mask[layer · n_heads + head]` zeroes that query head's attention output (empty = none).
    pub head_mask: Vec<bool>,
    /// `--kv-offload DIR --resident N`: keep at most N bytes of KV blocks in RAM, the rest in a file under DIR
    /// (see [`crate::kv::offload`]). None = everything in RAM.
    pub offload: Option<OffloadConfig>,
    /// Keep every entry on sliding-window layers too (llama.cpp's `--swa-full`), as caches did before they slid:
    /// for comparisons. Default false: those layers keep only their window.
    pub swa_full: bool,
    /// `--max-memory`: runs whose memory plan exceeds this many bytes are refused before they start (see
    /// [`Session::check_memory`]). None = only the process's own limits.
    pub max_memory: Option<usize>,
    /// `--prefill`: how a prompt goes through the layers: dense, a sparse prefill method (which keys each prompt query
    /// reads), or LazyLLM's token pruning (see [`crate::model::lazy`]). Decode is never sparse.
    pub prefill: PrefillSpec,
}

impl SessionConfig {
    /// The cache layout sessions made with this configuration use on a model shaped like `mc`, storing `dtype`:
    /// sliding-window layers keep only their window unless [`Self::swa_full`].
    pub fn kv_layout(&self, mc: &crate::model::ModelConfig, dtype: KvDtype) -> crate::kv::KvConfig {
        let mut kv = mc.kv_config(dtype, self.block_tokens);
        if self.swa_full {
            kv.windows.clear();
        }
        kv
    }

    pub fn for_model(model: &Model) -> Self {
        Self {
            max_context: model.config().ctx_len,
            chunk_size: 512,
            kv_dtype: KvDtype::F16,
            block_tokens: DEFAULT_BLOCK_TOKENS,
            kv: KvSpec::full(),
            observe: Needs::default(),
            head_mask: Vec::new(),
            offload: None,
            swa_full: false,
            max_memory: None,
            prefill: PrefillSpec::Dense,
        }
    }
}

pub struct Session<'m> {
    pub model: &'m Model,
    pub cfg: SessionConfig,
    pub cache: KvCache,
    pub scratch: Scratch,
    /// Every token fed so far, in order.
    pub tokens: Vec<u32>,
    /// Position buffer for the current chunk (reused).
    pos: Vec<u32>,
    pub stats: Stats,
    /// The KV-compression method, None for `full`.
    pub press: Option<Press>,
    /// Attention accumulated per cached entry (on when the method or `cfg.observe` asks for it).
    pub acc: AttnAcc,
    /// Decode steps since the last compression.
    since_compress: usize,
    /// Under [`CompressAt::Context`]: tokens held when the context was compressed (None until then). Later prompt
    /// feeds are not compressed unless the spec has `turns`.
    context_end: Option<usize>,
    /// Times the KV method ran on this session's cache (forks count their own).
    pub compressions: usize,
    /// `--prefill lazyllm`: the plan, the aux cache of pruned tokens and the pass's buffers.
    pub lazy: Option<LazyState>,
}

/// Where a feed stands in the prompt/answer cycle: a prefill may end with a compression (the protocol decides, see
/// [`Session::prompt_compresses`]), decode steps compress every N.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Prefill { compress: bool },
    Decode,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, cfg: SessionConfig) -> Result<Self> {
        if cfg.chunk_size == 0 {
            bail!("--chunk-size must be at least 1");
        }
        if cfg.max_context == 0 {
            bail!("--max-context must be at least 1");
        }
        let mc = model.config();
        if let Some(lr) = mc.long_rope {
            if lr.long_for(cfg.max_context) != lr.long {
                bail!(
                    "the model rotates with its {} LongRoPE factors (set up for {} {} tokens), but this session \
                     may hold {} tokens, which needs the {} ones: load it for that context (--max-context {})",
                    if lr.long { "long" } else { "short" },
                    if lr.long { "more than" } else { "at most" },
                    lr.orig_ctx,
                    cfg.max_context,
                    if lr.long { "short" } else { "long" },
                    cfg.max_context
                );
            }
        }
        // The storage format comes from the spec (a `kivi*` option) or else from `kv_dtype`.
        let dtype = crate::methods::storage_for(&cfg.kv, cfg.kv_dtype)?;
        let mut cache = KvCache::new(cfg.kv_layout(mc, dtype));
        if let Some(oc) = &cfg.offload {
            check_offload(oc, &cfg, &cache)?;
            cache.enable_offload(oc)?;
        }
        // Logit rows kept at once: enough for a chunk of a small vocabulary, bounded for big ones (Gemma's 262K).
        let logit_rows = memplan::logit_rows(mc.vocab, cfg.chunk_size);
        let mut scratch = Scratch::new(mc, cfg.chunk_size, logit_rows);
        if cfg.kv.options.codec {
            check_codec(&cache.cfg, cfg.offload.is_some())
                .with_context(|| format!("--kv '{}'", cfg.kv))?;
        }
        let press = Press::new(&cfg.kv, mc)?;
        let needs = press
            .as_ref()
            .map_or(Needs::default(), Press::needs)
            .max(cfg.observe);
        // Accumulating attention needs every query of a chunk, so the window then holds a whole chunk.
        let window = needs
            .window
            .max(if needs.accumulate { cfg.chunk_size } else { 0 });
        if window > 0 {
            scratch.seq.obs = QueryWindow::new(mc.n_layers, mc.n_heads * mc.head_dim_k, window);
        }
        if !cfg.head_mask.is_empty() {
            if cfg.head_mask.len() != mc.n_layers * mc.n_heads {
                bail!(
                    "head mask has {} entries, the model has {} layers × {} query heads",
                    cfg.head_mask.len(),
                    mc.n_layers,
                    mc.n_heads
                );
            }
            scratch.seq.head_mask = cfg.head_mask.clone();
        }
        if let Some(sel) = &cfg.kv.select {
            let selector = sel.build(mc)?;
            if let Some(m) = selector.meta() {
                if !cfg.block_tokens.is_multiple_of(m.page_tokens) {
                    bail!(
                        "--kv '{}': pages of {} tokens do not divide the cache's blocks of {} (use page= a divisor, \
                         or another --block-tokens)",
                        cfg.kv,
                        m.page_tokens,
                        cfg.block_tokens
                    );
                }
                cache.enable_meta(m);
            }
            let w = selector.query_window();
            if w > scratch.seq.obs.capacity() {
                scratch.seq.obs = QueryWindow::new(mc.n_layers, mc.n_heads * mc.head_dim_k, w);
            }
            scratch.seq.selector = Some(selector);
        }
        let lazy = lazy_state(&cfg, mc, &cache)?;
        scratch.seq.prefill = cfg.prefill.build(mc)?;
        let acc = AttnAcc::new(needs.accumulate, mc.n_layers * mc.n_kv_heads);
        let stats = Stats {
            threads: rayon::current_num_threads(),
            prefill: cfg.prefill.to_string(),
            prefill_density: 1.0,
            ..Default::default()
        };
        Ok(Self {
            model,
            cfg,
            cache,
            scratch,
            tokens: Vec::new(),
            pos: Vec::new(),
            stats,
            press,
            acc,
            since_compress: 0,
            context_end: None,
            compressions: 0,
            lazy,
        })
    }

    /// The memory plan of a run of `len` in a session configured like this one (`len.prompt`: every token the cache
    /// holds once the prompt is in, those already cached included).
    pub fn plan_memory(&self, len: Lengths) -> Result<MemPlan> {
        let mc = self.model.config();
        let mut fp = memplan::Footprint::of(mc, &self.cfg)?;
        fp.hold = self.cache.held().map(|h| h as usize);
        Ok(memplan::plan(mc, self.model.weight_bytes(), &fp, len))
    }

    /// Refuses a run of `len` that does not fit, before any of it runs: its plan over `--max-memory`, or more than the
    /// process can still get (see [`memcheck`]). The error is a [`memcheck::OutOfMemory`]. Call before the prefill.
    pub fn check_memory(&mut self, len: Lengths) -> Result<MemPlan> {
        let plan = self.plan_memory(len)?;
        self.check_plan(&plan, 0)?;
        Ok(plan)
    }

    /// [`Self::check_memory`] for a plan already made, with `also` bytes the run holds beside this session (a forked
    /// copy of its cache). The plan's KV figure goes into the stats.
    pub fn check_plan(&mut self, plan: &MemPlan, also: usize) -> Result<()> {
        let mut p = *plan;
        p.kv += also;
        memcheck::check(&p, self.held_bytes(), self.cfg.max_memory)?;
        self.stats.planned_kv_bytes = self.stats.planned_kv_bytes.max(plan.kv);
        Ok(())
    }

    /// Bytes this session and its model hold now: weights, activations and logits, recorded queries, the KV cache.
    fn held_bytes(&self) -> usize {
        let obs = &self.scratch.seq.obs;
        self.model.weight_bytes()
            + self.scratch.bytes()
            + 4 * self.model.config().n_layers * obs.capacity() * (obs.row() + 1)
            + self.cache.bytes()
    }

    /// Tokens held (= the next token's position).
    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    fn check_room(&self, n_new: usize) -> Result<()> {
        let total = self.n_past() + n_new;
        if total > self.cfg.max_context {
            bail!(
                "prompt too long: {} tokens already held + {n_new} new = {total} tokens, over the context budget of {} \
                 (raise --max-context, up to the model's {} for full quality, or shorten the prompt)",
                self.n_past(),
                self.cfg.max_context,
                self.model.config().ctx_len
            );
        }
        Ok(())
    }

    /// Feeds `tokens` through the model in chunks. Calls `on_logits(index_in_tokens, logits)` for every index in
    /// `want` (a range of indices into `tokens`), chunk by chunk, without ever holding more than one chunk of logits.
    /// More than one token is a prefill (the KV method compresses at its end, or after every chunk with `chunked`, when
    /// the protocol says this feed compresses: [`Self::prompt_compresses`]); one token is a decode step.
    pub fn feed<F: FnMut(usize, &[f32])>(
        &mut self,
        tokens: &[u32],
        want: std::ops::Range<usize>,
        on_logits: F,
    ) -> Result<()> {
        let phase = if tokens.len() > 1 {
            Phase::Prefill {
                compress: self.prompt_compresses(),
            }
        } else {
            Phase::Decode
        };
        self.feed_as(tokens, want, on_logits, phase)
    }

    fn feed_as<F: FnMut(usize, &[f32])>(
        &mut self,
        tokens: &[u32],
        want: std::ops::Range<usize>,
        mut on_logits: F,
        phase: Phase,
    ) -> Result<()> {
        if tokens.is_empty() {
            bail!("nothing to feed: the prompt is empty");
        }
        self.check_room(tokens.len())?;
        let vocab = self.model.config().vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        if self.lazy.is_some() && phase != Phase::Decode {
            return self.feed_lazy(tokens, want, on_logits, phase);
        }
        let chunk = self.cfg.chunk_size;
        let mut start = 0;
        while start < tokens.len() {
            let end = (start + chunk).min(tokens.len());
            let n0 = self.n_past() as u32;
            self.pos.clear();
            self.pos.extend(n0..n0 + (end - start) as u32);
            // Run the forward pass on a pool worker: parallel kernels started from inside the pool skip the
            // cross-thread hand-off that each call from an outside thread pays.
            let (model, pos, cache, scratch) =
                (self.model, &self.pos, &mut self.cache, &mut self.scratch);
            match self.lazy.as_mut() {
                // A decode step: LazyLLM may revive pruned tokens in it.
                Some(lz) => rayon::scope(|_| lz.decode(model, tokens[0], pos[0], cache, scratch)),
                None => rayon::scope(|_| model.forward(&tokens[start..end], pos, cache, scratch)),
            }
            self.after_chunk(&tokens[start..end])?;
            // Logits for wanted rows inside this chunk, a bounded number of rows at a time.
            let lo = want.start.max(start);
            let hi = want.end.min(end);
            let step = self.scratch.logit_rows(vocab);
            let mut r = lo;
            while r < hi {
                let r_end = (r + step).min(hi);
                let (model, scratch) = (self.model, &mut self.scratch);
                rayon::scope(|_| model.logits(scratch, r - start..r_end - start));
                for i in r..r_end {
                    on_logits(
                        i,
                        &self.scratch.logits[(i - r) * vocab..(i - r + 1) * vocab],
                    );
                }
                r = r_end;
            }
            if let Phase::Prefill { compress } = phase {
                if end < tokens.len() {
                    self.end_chunk(compress)?;
                }
            }
            start = end;
        }
        self.end_feed(phase)?;
        Ok(())
    }

    /// A LazyLLM prompt feed: one layer-major pass over the whole of `tokens` (see [`crate::model::lazy`]); only the
    /// last token's logits exist.
    fn feed_lazy<F: FnMut(usize, &[f32])>(
        &mut self,
        tokens: &[u32],
        want: std::ops::Range<usize>,
        mut on_logits: F,
        phase: Phase,
    ) -> Result<()> {
        let n = tokens.len();
        if want.start < want.end && (want.start + 1 != want.end || want.end != n) {
            bail!(
                "--prefill {}: only the prompt's last token has logits (pruned tokens never reach the output); \
                 asked for tokens {}..{} of {n}",
                self.cfg.prefill,
                want.start,
                want.end
            );
        }
        let n0 = self.n_past() as u32;
        let (model, cache, scratch) = (self.model, &mut self.cache, &mut self.scratch);
        if let Some(lz) = self.lazy.as_mut() {
            rayon::scope(|_| lz.prefill(model, tokens, n0, cache, scratch));
        }
        self.after_chunk(tokens)?;
        if want.start < want.end {
            let vocab = model.config().vocab;
            let scratch = &mut self.scratch;
            rayon::scope(|_| model.logits(scratch, 0..1));
            on_logits(n - 1, &self.scratch.logits[..vocab]);
        }
        self.end_feed(phase)?;
        Ok(())
    }

    /// Bookkeeping after a forward pass appended `chunk` to the cache: the token history, accumulated attention, the
    /// offload's rebalance, the peak KV figure.
    fn after_chunk(&mut self, chunk: &[u32]) -> Result<()> {
        self.tokens.extend_from_slice(chunk);
        if self.acc.is_on() {
            let (mc, cache, obs) = (self.model.config(), &self.cache, &self.scratch.seq.obs);
            let windows = layer_windows(mc);
            let acc = &mut self.acc;
            rayon::scope(|_| acc.accumulate(cache, obs, chunk.len(), mc.attn_scale, &windows));
        }
        // Offload: the blocks this step read come back into RAM, the least recently read go to disk.
        self.cache.rebalance()?;
        self.stats.note_kv(self.cache.peak_bytes());
        Ok(())
    }

    /// After a prompt chunk that is not the prompt's last: a `chunked` method compresses now, when this prompt
    /// compresses at all (`compress`, from the protocol).
    fn end_chunk(&mut self, compress: bool) -> Result<()> {
        if compress && self.press.as_ref().is_some_and(|p| p.chunked) {
            self.compress()?;
        }
        Ok(())
    }

    /// After a whole feed: a prefill compresses and lets the selector index; a decode step compresses every N steps.
    fn end_feed(&mut self, phase: Phase) -> Result<()> {
        match phase {
            Phase::Prefill { compress } => {
                if compress {
                    self.compress()?;
                    if self.context_end.is_none() {
                        self.context_end = Some(self.n_past());
                    }
                }
                self.end_prefill();
                let [got, dense] = self.scratch.seq.prefill_pairs;
                self.stats.prefill_density = if dense > 0 {
                    got as f64 / dense as f64
                } else {
                    1.0
                };
                if let Some(lz) = &self.lazy {
                    // Rows of every layer for every token held, less those pruning skipped.
                    let rows = (self.n_past() * self.model.config().n_layers).max(1);
                    self.stats.prefill_rows_computed =
                        Some(1.0 - lz.counts.skipped.min(rows) as f64 / rows as f64);
                }
            }
            Phase::Decode => {
                self.since_compress += 1;
                let every = self.press.as_ref().map_or(0, |p| p.every);
                if every > 0 && self.since_compress >= every {
                    self.compress()?;
                }
            }
        }
        self.note_bytes();
        Ok(())
    }

    /// Bytes the selector's index holds (0 without a selector).
    pub fn index_bytes(&self) -> usize {
        self.scratch
            .seq
            .selector
            .as_ref()
            .map_or(0, |s| s.index_bytes())
    }

    /// KV bytes held now: the cache and the selector's index (what a memory figure of a KV spec counts).
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes() + self.index_bytes()
    }

    /// The most KV bytes held so far: the cache's peak and the selector's index.
    pub fn kv_peak_bytes(&self) -> usize {
        self.cache.peak_bytes() + self.index_bytes()
    }

    /// Bytes the cache and the selector's index hold now, into the stats.
    fn note_bytes(&mut self) {
        let index = self.index_bytes();
        self.stats.kv_bytes = self.cache.bytes() + index;
        self.stats.kv_meta_bytes = self.cache.meta_bytes() + index;
        self.stats.kv_disk_bytes = self.cache.disk_bytes();
        self.stats.kv_disk_read_bytes = self.cache.disk_read_bytes();
        self.stats.aux_bytes = self.lazy.as_ref().map_or(0, LazyState::aux_bytes);
        self.stats.note_kv(self.cache.peak_bytes() + index);
    }

    /// Lets the selector index what the prompt left in the cache.
    fn end_prefill(&mut self) {
        let (cache, scratch) = (&self.cache, &mut self.scratch);
        if let Some(sel) = scratch.seq.selector.as_mut() {
            let obs = &scratch.seq.obs;
            rayon::scope(|_| sel.end_prefill(cache, obs));
        }
    }

    /// Whether the next prompt feed ([`Self::prefill`], a multi-token [`Self::feed`]) ends with a compression: every
    /// one under [`CompressAt::Prompt`]; under [`CompressAt::Context`] the first (the context) only, or every one with
    /// the spec's `turns`.
    pub fn prompt_compresses(&self) -> bool {
        match self.cfg.kv.compress_at() {
            CompressAt::Prompt => true,
            CompressAt::Context => self.context_end.is_none() || self.cfg.kv.options.turns,
        }
    }

    /// Tokens held when the context was compressed, if it was (see [`CompressAt::Context`]).
    pub fn context_end(&self) -> Option<usize> {
        self.context_end
    }

    /// Applies the KV method now (nothing for `full`): every head drops to its budget for the tokens seen so far, and
    /// freed blocks go back to the allocator.
    pub fn compress(&mut self) -> Result<()> {
        self.since_compress = 0;
        if self.cfg.kv.options.codec {
            self.codec_roundtrip()?;
        }
        let Some(press) = self.press.as_mut() else {
            return Ok(());
        };
        self.compressions += 1;
        let seen = self.tokens.len();
        let (mc, cache, obs, acc) = (
            self.model.config(),
            &mut self.cache,
            &self.scratch.seq.obs,
            &mut self.acc,
        );
        rayon::scope(|_| press.compress(cache, obs, acc, mc, seen));
        self.note_bytes();
        Ok(())
    }

    /// The spec's `codec` option: every entry encoded with the KV codec ([`codec`], the format of the prefix store's
    /// disk and Redis tiers, default settings) and decoded back in place of the cache, as a restore from those tiers
    /// gives it. The cache must hold every entry in f16 or f32 (the spec's checks), on every layer.
    fn codec_roundtrip(&mut self) -> Result<()> {
        check_codec(&self.cache.cfg, self.cfg.offload.is_some())?;
        let n = self.cache.len(0, 0);
        let rows = codec::KvRows::from_cache(&self.cache, 0, n)?;
        let blob = codec::encode(&rows, &codec::CodecConfig::default())?;
        let back = codec::decode(&blob)?;
        drop(rows);
        self.cache.truncate(0);
        back.append_to(&mut self.cache)?;
        self.acc.sync_len(&self.cache);
        self.stats.codec_bytes = Some(blob.len());
        Ok(())
    }

    /// A copy of this session — cache, token history, recorded queries and accumulated attention — under another KV
    /// spec, whose end-of-prefill compression is applied at once. Prefill once, then compare methods on identical
    /// caches. Fails if this session did not record what the new method reads (create it with `cfg.observe`).
    pub fn fork(&self, spec: &KvSpec) -> Result<Session<'m>> {
        // The fork records only what its own method reads: the source's extra observations (kept so that any method
        // could be forked) would slow every decode step of the fork.
        let mut s = self.copy_as(spec, Needs::default())?;
        s.compress()?;
        s.context_end = Some(s.n_past());
        s.end_prefill();
        s.cache.rebalance()?;
        s.note_bytes();
        Ok(s)
    }

    /// An independent copy of this session — same spec, cache, token history, recorded queries, accumulated attention
    /// and protocol state — with nothing applied: what one request of several against a shared context runs on, so the
    /// shared session itself never changes.
    pub fn duplicate(&self) -> Result<Session<'m>> {
        let mut s = self.copy_as(&self.cfg.kv, self.cfg.observe)?;
        s.context_end = self.context_end;
        s.compressions = self.compressions;
        s.since_compress = self.since_compress;
        s.note_bytes();
        Ok(s)
    }

    /// A copy of this session under `spec`, recording `observe` besides what the spec's method reads.
    fn copy_as(&self, spec: &KvSpec, observe: Needs) -> Result<Session<'m>> {
        let mut cfg = self.cfg.clone();
        cfg.kv = spec.clone();
        cfg.observe = observe;
        let mut s = Session::new(self.model, cfg)?;
        if s.cache.cfg.dtype != self.cache.cfg.dtype {
            bail!(
                "cannot fork to '{}': it stores the cache as {} and this session holds {}; run it on its own",
                spec,
                s.cache.cfg.dtype.label(),
                self.cache.cfg.dtype.label()
            );
        }
        let needs = s.press.as_ref().map_or(Needs::default(), Press::needs);
        // The selector's index reads recorded queries too (Squeezed Attention's thresholds).
        let window = needs.window.max(
            s.scratch
                .seq
                .selector
                .as_ref()
                .map_or(0, |x| x.query_window()),
        );
        if window > self.scratch.seq.obs.capacity() {
            bail!(
                "cannot fork to '{}': it reads the last {} queries, and this session recorded {} \
                 (set SessionConfig::observe.window to at least {})",
                spec,
                window,
                self.scratch.seq.obs.capacity(),
                window
            );
        }
        if needs.accumulate && !self.acc.is_on() {
            bail!(
                "cannot fork to '{}': it needs accumulated attention, and this session did not record it \
                 (set SessionConfig::observe.accumulate)",
                spec
            );
        }
        s.cache = self.cache.try_clone()?;
        // The copied cache keeps the page summaries the fork's selector scores (computed now for what it holds).
        if let Some(m) = s.scratch.seq.selector.as_ref().and_then(|x| x.meta()) {
            s.cache.enable_meta(m);
        }
        s.tokens = self.tokens.clone();
        s.stats = self.stats.clone();
        s.lazy = self.lazy.clone();
        if s.scratch.seq.obs.capacity() == self.scratch.seq.obs.capacity() {
            s.scratch.seq.obs = self.scratch.seq.obs.clone();
        } else {
            // Copy the newest rows into the fork's own (smaller or equal-needs) window.
            let mc = self.model.config();
            let (mut q, mut p) = (Vec::new(), Vec::new());
            for layer in 0..mc.n_layers {
                let last = s.scratch.seq.obs.capacity();
                self.scratch.seq.obs.gather(
                    layer,
                    0..mc.n_heads,
                    mc.head_dim_k,
                    last,
                    &mut q,
                    &mut p,
                );
                s.scratch.seq.obs.record(layer, &q, &p);
            }
        }
        if s.acc.is_on() {
            s.acc = self.acc.clone();
        }
        Ok(s)
    }

    /// Prefills `tokens` and returns the logits after the last one. Compresses at the end as the protocol says (see
    /// [`Self::prompt_compresses`]).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&mut [f32]> {
        let compress = self.prompt_compresses();
        self.prefill_as(tokens, compress)
    }

    /// [`Self::prefill`] without the compression at its end, whatever the protocol: the question after a compressed
    /// context under [`CompressAt::Context`] (it continues at the context's positions, and nothing it adds is
    /// evicted), or a shared context that each request compresses together with its own question under
    /// [`CompressAt::Prompt`].
    pub fn prefill_uncompressed(&mut self, tokens: &[u32]) -> Result<&mut [f32]> {
        self.prefill_as(tokens, false)
    }

    fn prefill_as(&mut self, tokens: &[u32], compress: bool) -> Result<&mut [f32]> {
        let t0 = Instant::now();
        let n = tokens.len();
        let vocab = self.model.config().vocab;
        let phase = Phase::Prefill { compress };
        self.feed_as(tokens, n.saturating_sub(1)..n, |_, _| {}, phase)?;
        self.stats.prompt_tokens += n;
        self.stats.prefill_s += t0.elapsed().as_secs_f64();
        Ok(&mut self.scratch.logits[..vocab])
    }

    /// Feeds one token and returns the logits after it.
    pub fn decode(&mut self, token: u32) -> Result<&mut [f32]> {
        let t0 = Instant::now();
        let vocab = self.model.config().vocab;
        self.cache.take_read();
        self.scratch.seq.attn_ns = 0;
        self.feed_as(&[token], 0..1, |_, _| {}, Phase::Decode)?;
        self.stats.decode_steps += 1;
        self.stats.decode_s += t0.elapsed().as_secs_f64();
        self.stats.kv_read_total += self.cache.take_read();
        self.stats.attention_ns_total += self.scratch.seq.attn_ns;
        Ok(&mut self.scratch.logits[..vocab])
    }

    /// Forgets everything after the first `n` tokens (e.g. to retry a turn, or to answer another query against a
    /// shared context): drops every cached entry whose position is ≥ n, so it also works after eviction. Fails,
    /// changing nothing, if a sliding-window layer has already dropped entries the token at `n` reads: call
    /// [`Self::hold`] before feeding past a point the session may come back to.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        match self.lazy.as_mut() {
            Some(lz) => {
                crate::model::lazy::truncate(&mut self.cache, n as u32)?;
                lz.truncate_pos(n as u32, self.model.config().dim);
            }
            None => self.cache.truncate_pos(n as u32)?,
        }
        self.tokens.truncate(n);
        // Back before the end of the compressed context: what comes next is a new context.
        if self.context_end.is_some_and(|e| e > n) {
            self.context_end = None;
        }
        self.scratch.seq.obs.truncate_pos(n as u32);
        self.acc.sync_len(&self.cache);
        Ok(())
    }

    /// Keeps, from now on, what [`Self::truncate`] back to `n` (or later) needs: sliding-window layers keep the
    /// window before token `n` as more tokens come (they hold n − window + 1 … the newest token until the next hold).
    pub fn hold(&mut self, n: usize) {
        self.cache.hold(Some(n as u32));
    }

    /// A hash of what the session holds: every cached entry of every (layer, KV head) — position, key and value
    /// bits — and the token history. Equal fingerprints = the same cache, as far as a 64-bit hash tells; for tests
    /// that something was left unchanged.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let c = &self.cache.cfg;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.tokens.hash(&mut h);
        let (mut k, mut v) = (vec![0f32; c.head_dim_k], vec![0f32; c.head_dim_v]);
        for layer in 0..c.n_layers {
            for head in 0..c.n_kv_heads {
                let n = self.cache.len(layer, head);
                n.hash(&mut h);
                for i in 0..n {
                    self.cache.read(layer, head, i, &mut k, &mut v).hash(&mut h);
                    for x in k.iter().chain(&v) {
                        x.to_bits().hash(&mut h);
                    }
                }
            }
        }
        h.finish()
    }

    /// Forgets everything: an empty cache (sliding windows and holds included).
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.context_end = None;
        self.cache.clear();
        if let Some(lz) = self.lazy.as_mut() {
            lz.truncate_pos(0, self.model.config().dim);
        }
        self.scratch.seq.obs.truncate_pos(0);
        self.acc.sync_len(&self.cache);
    }
}

/// The memory plan of a run of `len` in a session of `model` made with `cfg` (see [`memplan`]).
pub fn plan_memory(model: &Model, cfg: &SessionConfig, len: Lengths) -> Result<MemPlan> {
    let fp = memplan::Footprint::of(model.config(), cfg)?;
    Ok(memplan::plan(
        model.config(),
        model.weight_bytes(),
        &fp,
        len,
    ))
}

/// Refuses what offload cannot do: ThinK's pruned key channels (offloaded blocks keep every channel; KIVI and f32
/// storage are refused by the cache itself), and a byte limit below the open block of every stream.
fn check_offload(oc: &OffloadConfig, cfg: &SessionConfig, cache: &KvCache) -> Result<()> {
    if cfg.kv.options.think.is_some() {
        bail!(
            "--kv '{}' with --kv-offload: think prunes key channels, and offloaded blocks keep every channel; \
             run think without offload",
            cfg.kv
        );
    }
    let c = &cache.cfg;
    let floor = c.n_layers * c.n_kv_heads * c.block_bytes();
    if let Resident::Bytes(b) = oc.resident {
        if b < floor {
            bail!(
                "--resident {}: below the {} that must stay in RAM (the open {}-token block of each of the cache's \
                 {} streams); give at least that, or a share",
                stats::human_bytes(b),
                stats::human_bytes(floor),
                c.block_tokens,
                c.n_layers * c.n_kv_heads
            );
        }
    }
    Ok(())
}

/// What the spec's `codec` option needs of a cache (checked when the session is made, so a round-trip cannot fail on
/// it mid-step): every entry of every layer in f16 or f32, in RAM.
fn check_codec(c: &crate::kv::KvConfig, offloaded: bool) -> Result<()> {
    if !matches!(c.dtype, KvDtype::F16 | KvDtype::F32) {
        bail!(
            "'codec' round-trips an f16 or f32 cache; this one stores {}",
            c.dtype.label()
        );
    }
    if (0..c.n_layers).any(|l| c.window(l).is_some()) {
        bail!(
            "'codec' needs every entry of every layer: this model's sliding-window layers keep only their window \
             (run with --swa-full)"
        );
    }
    if offloaded {
        bail!("'codec' does not combine with --kv-offload");
    }
    Ok(())
}

/// The LazyLLM state a session under `cfg` runs with (None for dense prefill): its plan checked against the model;
/// refused beside a KV method or selector (they read and edit streams that LazyLLM leaves unequal across layers), and
/// revival on a cache that keeps only sliding windows (an old token's window is gone).
fn lazy_state(
    cfg: &SessionConfig,
    mc: &crate::model::ModelConfig,
    cache: &KvCache,
) -> Result<Option<LazyState>> {
    let PrefillSpec::LazyLlm(lc) = &cfg.prefill else {
        return Ok(None);
    };
    let plan = lc.plan(mc)?;
    if cfg.kv.method.build.is_some() || cfg.kv.select.is_some() {
        bail!(
            "--prefill '{}' with --kv '{}': LazyLLM runs with a full cache (no KV method or selector)",
            cfg.prefill,
            cfg.kv
        );
    }
    if plan.revive_every > 0 && cache.cfg.windows.iter().any(Option::is_some) {
        bail!(
            "--prefill '{}': revival recomputes a pruned token's layers, and this model's sliding-window layers keep \
             only their window; add revive=0 or --swa-full",
            cfg.prefill
        );
    }
    Ok(Some(LazyState::new(plan)))
}

/// The sliding window of every layer (None on global layers).
fn layer_windows(mc: &crate::model::ModelConfig) -> Vec<Option<u32>> {
    (0..mc.n_layers).map(|l| mc.layer_window(l)).collect()
}
