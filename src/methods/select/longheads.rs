//! LongHeads — Lu, Zhou, He, Zhao, Ji, Gui, Zhang and Huang, "LongHeads: Multi-Head Attention is Secretly a Long
//! Context Processor" (arXiv 2402.10685, 2024; Findings of EMNLP 2024).
//!
//! Mechanism: the context is cut into fixed chunks; each complete chunk gets one representative key, computed once
//! when the chunk is complete; at every decode step each head scores the chunks by q·rep and attends to the first
//! chunk, the last complete chunk, the incomplete tail and its top-scoring chunks, so that it never reads more than
//! its trained length. Different heads pick different chunks, so together they cover a longer context.
//!
//! Defaults as in the official code (LuLuLuyi/LongHeads, `modeling_longheads/modeling_llama.py` at 1c9f72e):
//! - chunk (`window_size`) 256 tokens and 16 chunks per head (`atten_length` 4096): the first chunk and the last
//!   complete chunk are always kept, the top `atten_length / window_size − 3` of the other chunks are chosen, and the
//!   incomplete tail is attended too;
//! - the representative: the chunk's tokens attend to each other (non-causal, RoPE restarted inside the chunk), the
//!   mean of those outputs is a summary vector, and the representative is the chunk's keys averaged with the softmax
//!   weights of that summary against them (`chunk_features_key`);
//! - reselection every step, every layer (no dense layers), selection per query head (LLaMA-2, MHA).
//!
//! Where hayloft differs, and why:
//! - the budget B (entries per KV head) is the attention length, capped at the model's trained context
//!   ([`ModelConfig::ctx_len`]); the chunk is 256 tokens but at most B/16 (the official 16 chunks per head), a power of
//!   two and at least 8, fixed at the first index build (`page=N` fixes it). Sinks and recent window default to one
//!   chunk each (`sink=`, `recent=` override);
//! - the summary vector is the chunk's mean key, not the mean of its intra-chunk attention outputs: those need every
//!   prompt query (the session keeps only a window of them) and live in value space. The representative is then
//!   `Σ_j softmax(s·k_j/√d) k_j` over the chunk's keys, as in the code;
//! - keys are cached after RoPE at their absolute positions, so chunks are scored by the post-RoPE query against
//!   post-RoPE representatives, and attention runs at the original positions (LongHeads remaps the chosen chunks to
//!   positions inside the trained length);
//! - selection is per KV head: a chunk's score is the maximum over the query heads of the group;
//! - the first 2 layers stay dense (hayloft's default, as for lserve; LongHeads selects in every layer, `dense=0`);
//! - a context within the budget is read whole (the frame's rule), even past the trained length.

use half::f16;

use super::{key_read_bytes, Frame, FrameDefaults, Middle, SelectOptions, Step};
use crate::attention::Selection;
use crate::kernels::rowdot::{rows_dot_max_f16, MAX_VECTORS};
use crate::kv::KvCache;
use crate::methods::spec::Budget;
use crate::model::{ModelConfig, QueryWindow, SelectCx, Selector};

/// Tokens per chunk (`window_size`).
pub const CHUNK: usize = 256;
/// Chunks each head attends to (`atten_length / window_size` = 4096 / 256).
pub const CHUNKS_PER_HEAD: usize = 16;
/// The smallest chunk the budget scaling goes down to.
pub const MIN_CHUNK: usize = 8;

/// LongHeads' frame: the first chunk, the newest chunk, 2 dense layers (hayloft's), reselect every step. The sink
/// and recent window follow the chunk once it is fixed.
pub const DEFAULTS: FrameDefaults = FrameDefaults {
    sink: CHUNK,
    recent: CHUNK,
    dense: 2,
    interval: 1,
};

/// The chunk for a head that reads `budget` entries: 256, but at most a 16th of the budget, a power of two ≥ 8.
pub fn chunk_for(budget: usize) -> usize {
    let c = (budget / CHUNKS_PER_HEAD).clamp(MIN_CHUNK, CHUNK);
    1 << c.ilog2()
}

pub struct LongHeads {
    frame: Frame,
    ctx_len: usize,
    /// Tokens per chunk, once fixed.
    chunk: Option<usize>,
    sink_given: bool,
    recent_given: bool,
    /// Layers that never select (dense or sliding-window): no index.
    skip: Vec<bool>,
    /// Per stream (layer · n_kv_heads + head): the representatives of its complete chunks, head_dim_k each.
    reps: Vec<Vec<f16>>,
    /// Per layer: the cache's edit count its representatives were built at.
    built: Vec<Option<u64>>,
    // Scratch.
    keys: Vec<f32>,
    w: Vec<f32>,
    acc: Vec<f32>,
    /// The group's query rows, and one pass's chunk scores (see `pick`).
    qw: Vec<f32>,
    part: Vec<f32>,
    scores: Vec<f32>,
    order: Vec<u32>,
}

impl LongHeads {
    pub fn new(budget: Budget, o: &SelectOptions, mc: &ModelConfig) -> Self {
        let frame = Frame::new(budget, o, DEFAULTS, mc.n_layers);
        let skip = (0..mc.n_layers)
            .map(|l| l < frame.dense || mc.is_local(l))
            .collect();
        let mut s = Self {
            frame,
            ctx_len: mc.ctx_len.max(1),
            chunk: None,
            sink_given: o.sink.is_some(),
            recent_given: o.recent.is_some(),
            skip,
            reps: vec![Vec::new(); mc.n_layers * mc.n_kv_heads],
            built: vec![None; mc.n_layers],
            keys: Vec::new(),
            w: Vec::new(),
            acc: Vec::new(),
            qw: Vec::new(),
            part: Vec::new(),
            scores: Vec::new(),
            order: Vec::new(),
        };
        if let Some(c) = o.page {
            s.fix_chunk(c);
        }
        s
    }

    /// Fixes the chunk and the sink and recent window that follow it (unless given).
    fn fix_chunk(&mut self, c: usize) {
        let c = c.max(1);
        self.chunk = Some(c);
        if !self.sink_given {
            self.frame.sink = c;
        }
        if !self.recent_given {
            self.frame.recent = c;
        }
    }

    /// The chunk, fixed from the budget at the cache's current length if it is not yet.
    fn chunk(&mut self, cache: &KvCache) -> usize {
        match self.chunk {
            Some(c) => c,
            None => {
                let b = self.frame.budget.keep(cache.max_len()).min(self.ctx_len);
                let c = chunk_for(b);
                self.fix_chunk(c);
                c
            }
        }
    }

    /// Brings `layer`'s representatives up to date: all rebuilt after an edit of the cache, then one per newly
    /// completed chunk. The keys read are counted.
    fn sync_layer(&mut self, cache: &KvCache, layer: usize) {
        let c = self.chunk(cache);
        let (nh, hk, bt) = (
            cache.cfg.n_kv_heads,
            cache.cfg.head_dim_k,
            cache.cfg.block_tokens,
        );
        if self.built[layer] != Some(cache.edits()) {
            for h in 0..nh {
                self.reps[layer * nh + h].clear();
            }
            self.built[layer] = Some(cache.edits());
        }
        self.keys.resize(c * hk, 0.0);
        self.w.resize(c, 0.0);
        self.acc.resize(hk, 0.0);
        let scale = 1.0 / (hk as f32).sqrt();
        let mut bytes = 0;
        for h in 0..nh {
            let s = layer * nh + h;
            let want = cache.len(layer, h) / c;
            self.reps[s].truncate(want * hk);
            for i in self.reps[s].len() / hk..want {
                // The chunk's keys, and their mean: the summary vector.
                self.acc.fill(0.0);
                for j in 0..c {
                    let e = i * c + j;
                    let block = cache.block(layer, h, e / bt);
                    let key = &mut self.keys[j * hk..][..hk];
                    block.read_key(e % bt, key);
                    bytes += key_read_bytes(&block, bt);
                    self.acc
                        .iter_mut()
                        .zip(key.iter())
                        .for_each(|(a, k)| *a += k);
                }
                self.acc.iter_mut().for_each(|a| *a /= c as f32);
                // Softmax of the summary against each key, then the weighted keys.
                let mut max = f32::NEG_INFINITY;
                for j in 0..c {
                    let key = &self.keys[j * hk..][..hk];
                    let l = scale * dot(&self.acc, key);
                    self.w[j] = l;
                    max = max.max(l);
                }
                let mut z = 0.0;
                for x in &mut self.w {
                    *x = (*x - max).exp();
                    z += *x;
                }
                self.acc.fill(0.0);
                for j in 0..c {
                    let wj = self.w[j] / z;
                    let key = &self.keys[j * hk..][..hk];
                    self.acc.iter_mut().zip(key).for_each(|(a, k)| *a += wj * k);
                }
                self.reps[s].extend(self.acc.iter().map(|&x| f16::from_f32(x)));
            }
        }
        cache.note_read(bytes);
    }

    fn choose(&mut self, cx: &SelectCx) {
        self.sync_layer(cx.cache, cx.layer);
        let nh = cx.cache.cfg.n_kv_heads;
        let mut kept = std::mem::take(self.frame.kept_mut(cx.layer));
        kept.reset(nh);
        for h in 0..nh {
            let m = self.frame.middle(cx, h);
            // Everything read stays within the trained context.
            let around = m.lo + (cx.cache.len(cx.layer, h) - m.hi);
            let k = m.k.min(self.ctx_len.saturating_sub(around));
            if k > 0 {
                self.pick(cx, h, Middle { k, ..m }, &mut kept);
            }
        }
        kept.finish();
        *self.frame.kept_mut(cx.layer) = kept;
    }

    /// Head `h`'s chunks inside the middle region, at most `m.k` entries, into `kept`.
    fn pick(&mut self, cx: &SelectCx, h: usize, m: Middle, kept: &mut Selection) {
        let (g, hk) = (cx.group(), cx.cache.cfg.head_dim_k);
        let c = self.chunk.unwrap_or(CHUNK);
        let reps = &self.reps[cx.layer * cx.cache.cfg.n_kv_heads + h];
        let n = reps.len() / hk;
        let mut left = m.k;
        // The incomplete tail (no representative yet, when the recent window does not cover it) is the newest: kept.
        let tail = (n * c).max(m.lo);
        if tail < m.hi {
            let take = left.min(m.hi - tail);
            kept.add(h, m.hi - take, m.hi);
            left -= take;
        }
        // Complete chunks overlapping the middle; the last complete chunk is always kept (scored +∞).
        let (c0, c1) = (m.lo / c, n.min(m.hi.div_ceil(c)));
        // A chunk's score: the best q·representative over the group's query heads, read from the f16
        // representatives in place (groups of more than MAX_VECTORS heads in several passes).
        self.scores.clear();
        self.scores.resize(c1.saturating_sub(c0), f32::NEG_INFINITY);
        if c0 < c1 {
            for j0 in (0..g).step_by(MAX_VECTORS) {
                let j1 = (j0 + MAX_VECTORS).min(g);
                self.qw.clear();
                for j in j0..j1 {
                    self.qw.extend_from_slice(cx.last_query(h * g + j));
                }
                self.part.resize(c1 - c0, 0.0);
                rows_dot_max_f16(&reps[c0 * hk..c1 * hk], hk, &self.qw, &mut self.part);
                for (s, &x) in self.scores.iter_mut().zip(&self.part) {
                    *s = s.max(x);
                }
            }
            if c1 == n {
                self.scores[c1 - c0 - 1] = f32::INFINITY;
            }
        }
        cx.cache.note_read((c1 - c0) * hk * 2);
        self.order.clear();
        self.order.extend(0..(c1 - c0) as u32);
        let scores = &self.scores;
        self.order.sort_unstable_by(|a, b| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(b.cmp(a))
        });
        for &i in &self.order {
            if left == 0 {
                break;
            }
            let i = c0 + i as usize;
            let (a, b) = ((i * c).max(m.lo), ((i + 1) * c).min(m.hi));
            if b - a <= left {
                kept.add(h, a, b);
                left -= b - a;
            } else if i + 1 == n {
                kept.add(h, b - left, b);
                left = 0;
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Selector for LongHeads {
    fn select(&mut self, cx: &SelectCx, out: &mut Selection) -> bool {
        match self.frame.step(cx) {
            Step::Dense => return false,
            Step::Reuse => {}
            Step::Choose => self.choose(cx),
        }
        self.frame.finish(cx, out);
        true
    }

    fn end_prefill(&mut self, cache: &KvCache, _obs: &QueryWindow) {
        for layer in 0..cache.cfg.n_layers {
            if !self.skip[layer] {
                self.sync_layer(cache, layer);
            }
        }
    }

    fn index_bytes(&self) -> usize {
        self.reps.iter().map(|r| r.len() * 2).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvDtype};
    use crate::testutil::Rng;

    const HK: usize = 16;

    fn model(ctx_len: usize) -> ModelConfig {
        ModelConfig {
            arch: crate::model::Arch::Llama,
            name: "test".into(),
            n_layers: 1,
            dim: 4 * HK,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim_k: HK,
            head_dim_v: HK,
            ffn_dim: 8,
            vocab: 8,
            ctx_len,
            rms_eps: 1e-5,
            rope_style: crate::model::RopeStyle::Norm,
            rope_dim: HK,
            rope_base: 10000.0,
            rope_base_local: 10000.0,
            sliding_window: None,
            layer_is_local: vec![false],
            attn_scale: 0.25,
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            residual_scale: 1.0,
            logit_scale: 1.0,
            long_rope: None,
            attn_temp: None,
            moe: None,
        }
    }

    /// Two KV heads of `len` random entries; in head 0, entry `planted` is `dir` scaled far above the rest.
    fn cache(len: usize, planted: usize, dir: &[f32], rng: &mut Rng) -> KvCache {
        let mut c = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim_k: HK,
            head_dim_v: HK,
            block_tokens: 32,
            dtype: KvDtype::F16,
            windows: Vec::new(),
        });
        append(&mut c, 0, len, rng);
        let mut k = vec![0.0; HK];
        let mut v = vec![0.0; HK];
        c.read(0, 0, planted, &mut k, &mut v);
        k.iter_mut().zip(dir).for_each(|(x, d)| *x = 20.0 * d);
        c.write(0, 0, planted, &k, &v);
        c
    }

    /// Selection in layer 0 (the only one).
    fn opts() -> SelectOptions {
        SelectOptions {
            dense: Some(0),
            ..Default::default()
        }
    }

    fn append(c: &mut KvCache, from: usize, n: usize, rng: &mut Rng) {
        let k = rng.vec(n * 2 * HK, 0.5);
        let v = rng.vec(n * 2 * HK, 1.0);
        let pos: Vec<u32> = (from as u32..(from + n) as u32).collect();
        c.append(0, &pos, &k, &v);
    }

    fn cx<'a>(cache: &'a KvCache, q: &'a [f32], pos: &'a [u32]) -> SelectCx<'a> {
        SelectCx {
            cache,
            layer: 0,
            q,
            pos,
            n_q_heads: 4,
            local: false,
        }
    }

    #[test]
    fn a_spec_that_leaves_no_layer_to_select_in_is_refused() {
        let mc = model(4096);
        let spec = |s: &str| {
            crate::methods::KvSpec::parse(s)
                .unwrap()
                .select
                .expect("a selector spec")
        };
        // One layer: the default two dense layers (and dense=1) leave nothing to select in.
        for s in [
            "longheads@0.25",
            "quest@0.25,dense=1",
            "lserve@0.25,dense=5",
        ] {
            let e = format!("{:#}", spec(s).build(&mc).err().expect(s));
            assert!(
                e.contains("no layer to select in") && e.contains("1 layers"),
                "{s}: {e}"
            );
        }
        assert!(spec("longheads@0.25,dense=0").build(&mc).is_ok());
        // A sliding-window layer does not count as one to select in either.
        let local = ModelConfig {
            layer_is_local: vec![true],
            ..model(4096)
        };
        assert!(spec("quest@0.25,dense=0").build(&local).is_err());
    }

    #[test]
    fn chunk_follows_the_budget() {
        assert_eq!(chunk_for(4096), 256);
        assert_eq!(chunk_for(100_000), 256);
        assert_eq!(chunk_for(512), 32);
        assert_eq!(chunk_for(600), 32);
        assert_eq!(chunk_for(40), 8);
    }

    #[test]
    fn a_planted_key_far_above_the_rest_picks_its_chunk() {
        let mut rng = Rng::seeded(11);
        let dir = rng.vec(HK, 1.0);
        let len = 3000;
        for planted in [700, 1500, 2500] {
            let c = cache(len, planted, &dir, &mut rng);
            let mut sel = LongHeads::new(Budget::Tokens(400), &opts(), &model(8192));
            sel.end_prefill(&c, &QueryWindow::new(1, 4 * HK, 0));
            assert_eq!(sel.chunk, Some(16));
            // Query head 1 (of KV head 0's group) looks at the planted key; the others are noise.
            let mut q = rng.vec(4 * HK, 0.1);
            q[HK..2 * HK].copy_from_slice(&dir);
            let pos = [len as u32 - 1];
            let mut out = Selection::default();
            c.take_read();
            assert!(sel.select(&cx(&c, &q, &pos), &mut out));
            assert!(out.contains(0, planted), "{planted}: {:?}", out.ranges(0));
            let ch = planted / 16 * 16;
            assert!(out.contains(0, ch) && out.contains(0, ch + 15));
            for h in 0..2 {
                assert!(out.count(h) <= 400, "head {h} reads {}", out.count(h));
                // The first chunk, the last complete chunk and the tail.
                assert!(out.contains(h, 0) && out.contains(h, 15));
                assert!((len / 16 * 16 - 16..len).all(|e| out.contains(h, e)));
            }
            // Scoring read one representative per candidate chunk and nothing else (no chunk completed).
            let n = len / 16;
            let read = c.take_read() as usize;
            assert!(read > 0 && read <= 2 * n * HK * 2, "{read}");
        }
    }

    #[test]
    fn the_chosen_count_respects_budget_and_trained_context() {
        let mut rng = Rng::seeded(12);
        let c = cache(2000, 5, &rng.vec(HK, 1.0), &mut rng);
        let q = rng.vec(4 * HK, 1.0);
        let pos = [1999];
        for (b, ctx_len, want) in [
            (Budget::Tokens(500), 8192, 500),
            (Budget::Tokens(500), 300, 300),
            (Budget::Ratio(0.3), 8192, 600),
        ] {
            let budget = b;
            let mut sel = LongHeads::new(b, &opts(), &model(ctx_len));
            sel.end_prefill(&c, &QueryWindow::new(1, 4 * HK, 0));
            let mut out = Selection::default();
            assert!(sel.select(&cx(&c, &q, &pos), &mut out));
            for h in 0..2 {
                let n = out.count(h);
                assert!(n <= want, "budget {budget:?}, ctx {ctx_len}: {n}");
                // Whole chunks fill it up to less than one chunk short.
                let ch = sel.chunk.unwrap_or(CHUNK);
                assert!(
                    n + 2 * ch > want,
                    "budget {budget:?}, ctx {ctx_len}: {n} (chunk {ch})"
                );
            }
        }
    }

    #[test]
    fn representatives_grow_with_completed_chunks_as_a_fresh_build_has_them() {
        let mut rng = Rng::seeded(13);
        let dir = rng.vec(HK, 1.0);
        let mut c = cache(1000, 10, &dir, &mut rng);
        let o = SelectOptions {
            page: Some(32),
            ..opts()
        };
        let mut sel = LongHeads::new(Budget::Tokens(200), &o, &model(8192));
        sel.end_prefill(&c, &QueryWindow::new(1, 4 * HK, 0));
        assert_eq!(sel.reps[0].len(), 1000 / 32 * HK);
        assert_eq!(sel.index_bytes(), 2 * (1000 / 32) * HK * 2);
        let q = rng.vec(4 * HK, 1.0);
        // Decode 40 steps: one chunk completes (at 1024), its 32 keys read then, in both heads.
        for t in 1000..1040 {
            append(&mut c, t, 1, &mut rng);
            let pos = [t as u32];
            let mut out = Selection::default();
            c.take_read();
            assert!(sel.select(&cx(&c, &q, &pos), &mut out));
            let read = c.take_read() as usize;
            let scoring = 2 * (t + 1) / 32 * HK * 2;
            if t + 1 == 1024 {
                assert!(read >= 2 * 32 * HK * 2, "step {t}: {read}");
            } else {
                assert!(read <= scoring, "step {t}: {read}");
            }
        }
        let mut fresh = LongHeads::new(Budget::Tokens(200), &o, &model(8192));
        fresh.end_prefill(&c, &QueryWindow::new(1, 4 * HK, 0));
        assert_eq!(sel.reps, fresh.reps);
        assert_eq!(sel.reps[1].len(), 1040 / 32 * HK);
        // An edit of the cache rebuilds from scratch.
        c.truncate(900);
        let pos = [899];
        let mut out = Selection::default();
        assert!(sel.select(&cx(&c, &q, &pos), &mut out));
        assert_eq!(sel.reps[0].len(), 900 / 32 * HK);
    }
}
