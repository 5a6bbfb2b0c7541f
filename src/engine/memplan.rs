//! The memory plan: the peak bytes a run will hold, computed before it starts from the model's shapes, the KV spec,
//! the chunk size and the lengths: weights, KV cache, activations, logits and what the KV method keeps beside the
//! cache. [`plan`] is a pure function of those inputs, so the same numbers serve the check before a prefill
//! ([`super::memcheck`]), a cost model, or a server deciding whether to admit a request.
//!
//! The KV part is summed layer by layer from the KV layer's own accounting ([`KvConfig::stream_len`],
//! [`KvConfig::stream_bytes`], [`MetaConfig::stream_bytes`]), the same block arithmetic the cache's byte counter
//! follows, so the plan and the counter agree to within a block per stream (a free block the pool keeps for reuse).
//! With a method that evicts, the plan takes the larger of the two peaks: the end of the prefill, before the
//! compression (the whole prompt, or the budget plus one chunk with `chunked`), and the end of decoding (the budget plus
//! the entries added since the last compression). Per-layer and per-head allocations (PyramidKV, AdaKV, DuoAttention)
//! keep the same total as a uniform budget, so the average budget stands for them. Sliding-window layers hold their
//! window (see [`KvConfig::stream_len`]; from a held position's window on when the session holds one) and are not
//! compressed. A decode-time selector's own index
//! (graph, clusters) is not planned: only the page summaries it asks the cache to keep are.

use anyhow::Result;
use serde::Serialize;

use super::SessionConfig;
use crate::kv::{KvConfig, MetaConfig, Resident};
use crate::methods::press::Press;
use crate::methods::{Budget, KvSpec, Needs};
use crate::model::ModelConfig;

/// Rows of logits a session keeps at once: a whole chunk for small vocabularies, bounded to 64 MiB for large ones
/// (Gemma's 262K).
pub fn logit_rows(vocab: usize, chunk_size: usize) -> usize {
    (64 * 1024 * 1024 / 4 / vocab.max(1)).clamp(1, chunk_size.max(1))
}

/// What a session configuration means for memory, resolved once (building the spec's press and selector, which may
/// read their head files): everything the plan needs besides the model's shapes and the lengths.
#[derive(Clone, Debug)]
pub struct Footprint {
    /// Cache layout and storage format.
    pub kv: KvConfig,
    /// Entries each head keeps on average; None when no method evicts.
    pub budget: Option<Budget>,
    /// Compress after every prefill chunk.
    pub chunked: bool,
    /// Decode steps between compressions (0 = never).
    pub every: usize,
    /// ThinK: share of key channels pruned at the first compression.
    pub think: Option<f64>,
    /// Page summaries a selector asks the cache to keep.
    pub meta: Option<MetaConfig>,
    /// Recent query rows recorded per layer.
    pub window: usize,
    /// Attention accumulated per cached entry.
    pub accumulate: bool,
    /// The press gathers values as well as keys.
    pub values: bool,
    /// Whether a press runs at all (eviction or channel pruning).
    pub press: bool,
    pub chunk_size: usize,
    /// `--kv-offload`: the KV bytes kept in RAM.
    pub resident: Option<Resident>,
    /// A held position ([`crate::kv::KvCache::hold`]): sliding-window layers keep its window and everything after.
    pub hold: Option<usize>,
}

impl Footprint {
    /// The footprint of sessions made with `cfg` on a model shaped like `mc` (the same choices `Session::new` makes).
    pub fn of(mc: &ModelConfig, cfg: &SessionConfig) -> Result<Self> {
        let dtype = crate::methods::storage_for(&cfg.kv, cfg.kv_dtype)?;
        let press = Press::new(&cfg.kv, mc)?;
        let needs = press
            .as_ref()
            .map_or(Needs::default(), Press::needs)
            .max(cfg.observe);
        let mut window = needs
            .window
            .max(if needs.accumulate { cfg.chunk_size } else { 0 });
        let mut meta = None;
        if let Some(sel) = &cfg.kv.select {
            let s = sel.build(mc)?;
            meta = s.meta();
            window = window.max(s.query_window());
        }
        Ok(Footprint {
            kv: cfg.kv_layout(mc, dtype),
            budget: press.as_ref().and_then(|_| evicting_budget(&cfg.kv)),
            chunked: press.as_ref().is_some_and(|p| p.chunked),
            every: press.as_ref().map_or(0, |p| p.every),
            think: press.as_ref().and_then(|p| p.think),
            meta,
            window,
            accumulate: needs.accumulate,
            values: needs.values,
            press: press.is_some(),
            chunk_size: cfg.chunk_size,
            resident: cfg.offload.as_ref().map(|o| o.resident),
            hold: None,
        })
    }
}

/// The budget of a method that evicts entries (None for a press that only prunes channels).
fn evicting_budget(spec: &KvSpec) -> Option<Budget> {
    spec.method.build.and(spec.budget)
}

/// How much a run feeds and generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lengths {
    /// Tokens in the cache once the prompt is in: for a chat turn, the whole conversation so far.
    pub prompt: usize,
    /// Tokens generated after it.
    pub new: usize,
    /// Tokens per prefill call (a compression follows each): the prompt for one prefill, the step of a streaming run.
    pub feed: usize,
    /// The last tokens of the prompt, fed after the compression and never compressed: the question under
    /// `--compress-at context` (part of `prompt` and of `feed`).
    pub uncompressed: usize,
}

impl Lengths {
    /// One prefill of `prompt` tokens, then `new` generated ones.
    pub fn generate(prompt: usize, new: usize) -> Self {
        Lengths {
            prompt,
            new,
            feed: prompt,
            uncompressed: 0,
        }
    }

    /// The same run with its last `n` prompt tokens fed after the compression, uncompressed (at most the feed).
    pub fn uncompressed(self, n: usize) -> Self {
        Lengths {
            uncompressed: n.min(self.feed).min(self.prompt),
            ..self
        }
    }
}

/// The planned peak bytes of a run, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemPlan {
    /// Model weights in memory.
    pub weights: usize,
    /// KV cache in RAM at its peak (blocks and page summaries).
    pub kv: usize,
    /// KV bytes in the offload file at that peak (`--kv-offload`), not counted in the total.
    pub kv_disk: usize,
    /// Activation buffers of one chunk.
    pub activations: usize,
    /// Logit rows kept at once.
    pub logits: usize,
    /// What the KV method keeps beside the cache: recorded queries, accumulated attention, the press's gathered heads.
    pub method: usize,
    /// Tokens the cache holds at the end (prompt + generated).
    pub tokens: usize,
}

impl MemPlan {
    /// Bytes in RAM at the peak.
    pub fn total(&self) -> usize {
        self.weights + self.kv + self.activations + self.logits + self.method
    }

    /// "weights 130 MiB + KV cache 1.1 GiB (29920 tokens) + ...", the parts that are not zero.
    pub fn describe(&self) -> String {
        let h = super::stats::human_bytes;
        let mut parts = vec![
            format!("weights {}", h(self.weights)),
            format!("KV cache {} ({} tokens)", h(self.kv), self.tokens),
        ];
        for (name, b) in [
            ("activations", self.activations),
            ("logits", self.logits),
            ("KV method state", self.method),
        ] {
            if b > 0 {
                parts.push(format!("{name} {}", h(b)));
            }
        }
        parts.join(" + ")
    }
}

/// The peak bytes of a session with footprint `fp` on a model shaped like `mc` holding `weight_bytes` of weights,
/// for a run of `len`.
pub fn plan(mc: &ModelConfig, weight_bytes: usize, fp: &Footprint, len: Lengths) -> MemPlan {
    let kv = &fp.kv;
    let total = len.prompt + len.new;
    let hk = kv.head_dim_k;
    let keep = |seen: usize| fp.budget.map_or(seen, |b| b.keep(seen));
    // The compression sees the prompt up to the uncompressed tail (the question under `--compress-at context`); the
    // tail is added whole after it.
    let tail = len.uncompressed.min(len.prompt).min(len.feed);
    let compressed = len.prompt - tail;
    let kept = keep(compressed) + tail;
    // Bytes of every stream when each stream of layer `l` holds `n(l)` entries with `hk` key channels (all of them on
    // sliding-window layers, which ThinK leaves alone).
    let cache_bytes = |n: &dyn Fn(usize) -> usize, hk: usize| -> usize {
        (0..kv.n_layers)
            .map(|l| {
                let e = n(l);
                let meta = fp
                    .meta
                    .filter(|m| m.keeps(l, kv.window(l)))
                    .map_or(0, |m| m.stream_bytes(e, kv.head_dim_k));
                let hk = if kv.window(l).is_some() {
                    kv.head_dim_k
                } else {
                    hk
                };
                kv.n_kv_heads * (kv.stream_bytes(e, hk) + meta)
            })
            .sum()
    };
    // End of the prefill, before its compression: the whole prompt, or the budget plus what one feed (or chunk) adds;
    // with an uncompressed tail, the larger of that (up to the tail) and what the compression kept plus the tail.
    let since_press = if fp.chunked {
        fp.chunk_size.min(len.feed - tail)
    } else {
        len.feed - tail
    };
    // Sliding-window layers hold their window (and the widest append), or from a held position's window on, and no
    // method compresses them.
    let stream_len = |l: usize, seen: usize, chunk: usize| {
        let slid = kv.stream_len(l, seen, chunk);
        match (kv.window(l), fp.hold) {
            (Some(w), Some(h)) => {
                let from = h.saturating_sub(w as usize - 1) / kv.block_tokens * kv.block_tokens;
                slid.max(seen.saturating_sub(from))
            }
            _ => slid,
        }
    };
    let prefill_len = |l: usize| {
        let all = stream_len(l, len.prompt, fp.chunk_size.min(len.feed));
        match fp.budget {
            Some(_) if kv.window(l).is_none() => {
                let before = stream_len(l, compressed, fp.chunk_size.min(len.feed))
                    .min(keep(compressed) + since_press);
                all.min(before.max(kept))
            }
            _ => all,
        }
    };
    // A compression on a quantized cache rewrites blocks in full precision before freeing the old ones (one stream at
    // a time, reused by the next).
    let retain_extra = |n: &dyn Fn(usize) -> usize, kept: usize, hk: usize| -> usize {
        match fp.budget {
            Some(_) => (0..kv.n_layers)
                .filter(|&l| kv.window(l).is_none())
                .map(|l| kv.retain_extra_bytes(n(l), kept, hk))
                .max()
                .unwrap_or(0),
            None => 0,
        }
    };
    let at_prefill =
        cache_bytes(&prefill_len, hk) + retain_extra(&prefill_len, keep(compressed), hk);
    // End of decoding: the budget plus the entries added since the last compression, keys pruned by ThinK.
    let decode_hk = fp.think.map_or(hk, |r| {
        hk - ((hk as f64 * r.clamp(0.0, 1.0)).floor() as usize).min(hk)
    });
    let decode_len = |l: usize| {
        let all = stream_len(l, total, 1);
        match fp.budget {
            _ if kv.window(l).is_some() => all,
            Some(_) if fp.every == 0 => all.min(kept + len.new),
            Some(_) => all.min(keep(total) + fp.every.min(len.new)),
            None => all,
        }
    };
    let at_decode = if len.new > 0 {
        cache_bytes(&decode_len, decode_hk) + retain_extra(&decode_len, keep(total), decode_hk)
    } else {
        0
    };
    let kv_all = at_prefill.max(at_decode);
    let kv_ram = match fp.resident {
        None => kv_all,
        Some(r) => {
            // The open block of every stream stays in RAM whatever the limit. A prompt chunk spills after each
            // layer, so the blocks one layer's streams open stay until then: up to ⌈chunk / block⌉ + 1 each.
            let floor = kv.n_layers * kv.n_kv_heads * kv.block_bytes();
            let chunk = fp.chunk_size.min(len.feed.max(1));
            let opened = kv.n_kv_heads * (chunk.div_ceil(kv.block_tokens) + 1) * kv.block_bytes();
            kv_all.min(r.limit(kv_all).max(floor) + opened)
        }
    };
    let cap = fp.chunk_size;
    let half = mc.rope_dim / 2;
    let activations = 4
        * (3 * cap * mc.dim
            + cap * mc.n_heads * mc.head_dim_k
            + cap * mc.n_kv_heads * (mc.head_dim_k + mc.head_dim_v)
            + cap * mc.n_heads * mc.head_dim_v
            + 2 * cap * mc.moe.map_or(mc.ffn_dim, |m| m.widest(mc.ffn_dim))
            + 4 * cap * half
            + if mc.attn_temp.is_some() { cap } else { 0 })
        + crate::model::moe::MoeScratch::planned_bytes(mc, cap);
    let logits = 4 * logit_rows(mc.vocab, fp.chunk_size) * mc.vocab;
    // Recorded queries (rows and positions), attention per entry, and the press's per-head gather buffers.
    let most = (0..kv.n_layers).map(prefill_len).max().unwrap_or(0);
    let queries = 4 * mc.n_layers * fp.window * (mc.n_heads * mc.head_dim_k + 1);
    let acc = if fp.accumulate {
        4 * kv.n_layers * kv.n_kv_heads * most
    } else {
        0
    };
    let press = if fp.press {
        let row = hk + if fp.values { kv.head_dim_v } else { 0 } + 5;
        4 * kv.n_kv_heads * most * row
    } else {
        0
    };
    MemPlan {
        weights: weight_bytes,
        kv: kv_ram,
        kv_disk: kv_all - kv_ram,
        activations,
        logits,
        method: queries + acc + press,
        tokens: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Session;
    use crate::kv::KvDtype;
    use crate::model::testutil::{write_tiny_gemma3, write_tiny_llama, TinySpec};
    use crate::model::{Model, Scratch};

    fn tiny() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_llama(&p, &TinySpec::default()).unwrap();
        let m = Model::load(&p).unwrap();
        (dir, m)
    }

    /// 5 sliding-window layers (window 16) and a global one.
    fn tiny_gemma() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny-gemma3.gguf");
        let spec = TinySpec {
            n_layers: 6,
            ..Default::default()
        };
        write_tiny_gemma3(&p, &spec, 16).unwrap();
        let m = Model::load(&p).unwrap();
        (dir, m)
    }

    fn tokens(n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|i| (i * 7 % (vocab - 1)) as u32 + 1).collect()
    }

    #[test]
    fn activations_and_logits_are_what_the_scratch_allocates() {
        let (_d, m) = tiny();
        activations_match(&m);
        // Queries scaled by position (Mistral 3) and experts with a shared one (Qwen2-MoE) have buffers of their own.
        let dir = tempfile::tempdir().unwrap();
        for (name, w) in [
            (
                "mistral3",
                crate::model::testutil::tiny_mistral3(&TinySpec::default(), 4.0, 16, Some(0.4)),
            ),
            (
                "qwen2moe",
                crate::model::testutil::tiny_qwen2moe(&TinySpec::default(), 8, 2),
            ),
        ] {
            let p = dir.path().join(format!("{name}.gguf"));
            w.write(&p).unwrap();
            activations_match(&Model::load(&p).unwrap());
        }
    }

    fn activations_match(m: &Model) {
        let mc = m.config();
        for chunk in [1, 7, 64, 512] {
            let mut cfg = SessionConfig::for_model(m);
            cfg.chunk_size = chunk;
            let fp = Footprint::of(mc, &cfg).unwrap();
            let p = plan(mc, m.weight_bytes(), &fp, Lengths::generate(10, 5));
            let s = Scratch::new(mc, chunk, logit_rows(mc.vocab, chunk));
            assert_eq!(p.activations + p.logits, s.bytes(), "chunk {chunk}");
            assert_eq!(p.weights, m.weight_bytes());
        }
    }

    /// `--compress-at context`: the context is compressed, then the question is fed whole and kept. Planned with
    /// the question as the uncompressed tail, the plan covers what the cache holds; planned as if the question were
    /// compressed too, it falls short by about (1 − ratio) × the question (seen when the decode peak, not the
    /// prefill's, is the larger: a long answer after a short context).
    #[test]
    fn a_question_fed_after_the_compression_is_planned_whole() {
        let (_d, m) = tiny();
        let mc = m.config();
        let (ctx, question, new) = (100, 150, 200);
        let mut cfg = SessionConfig::for_model(&m);
        cfg.kv = "snapkv@0.25,at@context".parse().unwrap();
        cfg.chunk_size = 64;
        cfg.max_context = 512;
        let mut s = Session::new(&m, cfg).unwrap();
        let whole = Lengths::generate(ctx + question, new);
        let p = s.plan_memory(whole.uncompressed(question)).unwrap();
        let old = s.plan_memory(whole).unwrap();
        let fp = Footprint::of(mc, &s.cfg).unwrap();
        let toks = tokens(ctx + question + new, mc.vocab);
        s.prefill(&toks[..ctx]).unwrap();
        s.prefill_uncompressed(&toks[ctx..ctx + question]).unwrap();
        for &t in &toks[ctx + question..] {
            s.decode(t).unwrap();
        }
        let measured = s.cache.peak_bytes();
        let slack = mc.n_layers * mc.n_kv_heads * fp.kv.block_bytes();
        assert!(
            measured <= p.kv + slack && p.kv <= measured + slack,
            "planned {} measured {measured} (slack {slack})",
            p.kv
        );
        // What the old plan missed: 3/4 of the question's entries in every stream.
        let per_entry = fp.kv.stream_bytes(1024, fp.kv.head_dim_k) / 1024;
        let missed = mc.n_layers * mc.n_kv_heads * per_entry * question * 3 / 4;
        assert!(
            old.kv + missed / 2 < measured,
            "the plan without the tail was {} for {measured} measured",
            old.kv
        );
    }

    /// Fills a real session and compares its cache's byte counter with the plan: within one block per stream.
    #[test]
    fn planned_kv_matches_the_cache_counter() {
        let ((_d, llama), (_e, gemma)) = (tiny(), tiny_gemma());
        for m in [llama, gemma] {
            planned_kv_matches_the_cache_counter_for(&m);
        }
    }

    fn planned_kv_matches_the_cache_counter_for(m: &Model) {
        let mc = m.config();
        let q4 = KvDtype::Kivi {
            bits: 4,
            residual: 16,
        };
        let cases = [
            ("full", KvDtype::F16),
            ("full", KvDtype::F32),
            ("full", q4),
            ("kivi2", KvDtype::F16),
            ("quest@0.5,dense=1", KvDtype::F16),
            ("snapkv@0.25", KvDtype::F16),
            ("h2o@32t,chunked", KvDtype::F16),
            ("think@0.5", KvDtype::F16),
            ("snapkv@0.5,kivi4", KvDtype::F16),
        ];
        for (spec, dtype) in cases {
            for (prompt, new, hold) in [
                (37, 0, false),
                (200, 30, false),
                (301, 80, false),
                (301, 80, true),
            ] {
                let mut cfg = SessionConfig::for_model(m);
                cfg.kv = spec.parse().unwrap();
                cfg.kv_dtype = dtype;
                cfg.chunk_size = 64;
                cfg.max_context = 512;
                let mut s = Session::new(m, cfg).unwrap();
                if hold {
                    // Sliding-window layers keep the window before token 150 and everything after.
                    s.hold(150);
                }
                let p = s.plan_memory(Lengths::generate(prompt, new)).unwrap();
                let fp = Footprint::of(mc, &s.cfg).unwrap();
                let toks = tokens(prompt + new, mc.vocab);
                s.prefill(&toks[..prompt]).unwrap();
                for &t in &toks[prompt..] {
                    s.decode(t).unwrap();
                }
                let measured = s.cache.peak_bytes();
                let streams = mc.n_layers * mc.n_kv_heads;
                let block = fp
                    .kv
                    .block_bytes()
                    .max(fp.kv.quant_block_bytes(mc.head_dim_k));
                let slack = streams * block;
                // A sliding-window stream is planned at the worst alignment of its appends against its blocks: up
                // to one block more than a run from position 0 holds.
                let windowed = (0..mc.n_layers)
                    .filter(|&l| fp.kv.window(l).is_some())
                    .count();
                let over = slack + windowed * mc.n_kv_heads * block;
                assert!(
                    measured <= p.kv + slack && p.kv <= measured + over,
                    "{} {spec} {} prompt {prompt} new {new} hold {hold}: planned {} measured {} (slack {slack}, {over})",
                    mc.name,
                    dtype.label(),
                    p.kv,
                    measured
                );
                // A plan is never far below what a method with a budget ends up with.
                assert!(p.kv + slack >= s.cache.bytes(), "{spec}");
            }
        }
    }

    /// With offload, a prompt chunk spills after each layer: the plan holds the resident limit plus the blocks one
    /// layer's streams open, and the cache's peak stays within it.
    #[test]
    fn planned_kv_with_offload_bounds_the_resident_peak() {
        let ((_d, llama), (_e, gemma)) = (tiny(), tiny_gemma());
        let dir = tempfile::tempdir().unwrap();
        for m in [&llama, &gemma] {
            let mc = m.config();
            for resident in [Resident::Share(0.25), Resident::Share(0.5)] {
                for (chunk, prompt, new) in
                    [(64, 301, 40), (32, 300, 0), (128, 260, 70), (64, 40, 30)]
                {
                    let mut cfg = SessionConfig::for_model(m);
                    cfg.chunk_size = chunk;
                    cfg.max_context = 512;
                    cfg.offload = Some(crate::kv::OffloadConfig {
                        dir: dir.path().to_path_buf(),
                        resident,
                    });
                    let mut s = Session::new(m, cfg).unwrap();
                    let p = s.plan_memory(Lengths::generate(prompt, new)).unwrap();
                    let toks = tokens(prompt + new, mc.vocab);
                    s.prefill(&toks[..prompt]).unwrap();
                    for &t in &toks[prompt..] {
                        s.decode(t).unwrap();
                    }
                    let measured = s.cache.peak_bytes();
                    let fp = Footprint::of(mc, &s.cfg).unwrap();
                    let block = fp.kv.block_bytes();
                    let streams = mc.n_layers * mc.n_kv_heads;
                    let opened = mc.n_kv_heads * (chunk.div_ceil(fp.kv.block_tokens) + 1) * block;
                    let case = format!(
                        "{} {resident:?} chunk {chunk} prompt {prompt} new {new}",
                        mc.name
                    );
                    assert!(
                        measured <= p.kv && p.kv <= measured + opened + streams * block,
                        "{case}: planned {} measured {measured}",
                        p.kv
                    );
                    assert!(p.kv + p.kv_disk >= measured, "{case}: {p:?}");
                }
            }
        }
    }

    #[test]
    fn budgets_quantization_and_offload_shrink_the_plan() {
        let (_d, m) = tiny();
        let mc = m.config();
        let kv_for = |spec: &str, dtype: KvDtype, offload: bool| {
            let mut cfg = SessionConfig::for_model(&m);
            cfg.kv = spec.parse().unwrap();
            cfg.kv_dtype = dtype;
            if offload {
                cfg.offload = Some(crate::kv::OffloadConfig {
                    dir: std::env::temp_dir(),
                    resident: Resident::Share(0.25),
                });
            }
            let fp = Footprint::of(mc, &cfg).unwrap();
            plan(mc, 0, &fp, Lengths::generate(4000, 100))
        };
        let full = kv_for("full", KvDtype::F16, false);
        assert_eq!(full.tokens, 4100);
        let chunked = kv_for("snapkv@256t,chunked", KvDtype::F16, false);
        let q2 = kv_for("full", KvDtype::parse("q2").unwrap(), false);
        let off = kv_for("full", KvDtype::F16, true);
        assert!(chunked.kv * 5 < full.kv, "{chunked:?} vs {full:?}");
        assert!(q2.kv * 3 < full.kv, "{q2:?} vs {full:?}");
        // A quarter resident, plus the blocks one layer's streams open in a 512-token prompt chunk.
        assert!(
            off.kv * 3 < full.kv && off.kv + off.kv_disk == full.kv,
            "{off:?}"
        );
        assert!(
            full.describe().contains("(4100 tokens)"),
            "{}",
            full.describe()
        );
    }
}
