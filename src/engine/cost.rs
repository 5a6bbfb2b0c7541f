//! The cost model ("Challenges in Deploying Long-Context Transformers", Fu 2024: KV size, prefill compute, decode
//! memory reads, concurrency, context switching), made concrete for this engine: from the model's shapes, the KV spec
//! and the machine's measured rates ([`MachineProfile`], `hayloft bench machine`), predict the KV bytes, the prefill
//! time, the time per decoded token, how many sequences fit a memory budget, and what swapping a context in from disk
//! costs. `hayloft plan` prints it; `--validate` runs the model beside it.
//!
//! The times are sums of parts, each divided by the rate this machine's kernels were measured to attain on that kind
//! of work (not the peak):
//! - prefill: every weight matrix's 2·rows·cols operations per token ÷ the batch rate of its weight type, plus the
//!   useful attention operations ([`crate::model::cost`]) ÷ the attention kernel's prefill rate;
//! - decode: every matrix's fixed call cost + its bytes ÷ the single-token streaming rate of its type, plus each
//!   layer's attention call cost + the KV bytes it reads ÷ the attention kernel's decode rate.
//!
//! Memory comes from the memory plan ([`super::memplan`]), the same function that refuses a run that cannot fit.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use super::memplan::{self, Footprint, Lengths, MemPlan};
use super::SessionConfig;
use crate::attention::{attend, AttnParams, AttnScratch};
use crate::kernels::machine::{best_of, AttnRates, MachineProfile};
use crate::kv::{KvCache, KvConfig, KvDtype};
use crate::model::{cost as ops, Model, ModelConfig};

/// Attention shapes the rates are measured on: head dim 64, 2 KV heads of 4 query heads each, f16 cache.
const HD: usize = 64;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 8;

/// Measures the attention kernel's attained rates into `p.attention`, on the current pool.
pub fn measure_attention(
    p: &mut MachineProfile,
    per_figure: Duration,
    block_tokens: usize,
) -> Result<()> {
    let cfg = KvConfig {
        n_layers: 1,
        n_kv_heads: KV_HEADS,
        head_dim_k: HD,
        head_dim_v: HD,
        block_tokens,
        dtype: KvDtype::F16,
        windows: Vec::new(),
    };
    let params = AttnParams {
        n_q_heads: Q_HEADS,
        scale: 1.0 / (HD as f32).sqrt(),
        window: None,
        softcap: None,
    };
    // A cache of `layers` layers, each holding the same `n` entries.
    let fill = |n: usize, layers: usize| {
        let mut c = KvCache::new(KvConfig {
            n_layers: layers,
            ..cfg.clone()
        });
        let pos: Vec<u32> = (0..n as u32).collect();
        let kv: Vec<f32> = (0..n * KV_HEADS * HD)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect(); // n × KV_HEADS·HD
        for l in 0..layers {
            c.append(l, &pos, &kv, &kv);
        }
        c
    };
    let query = |rows: usize| -> Vec<f32> {
        (0..rows * Q_HEADS * HD)
            .map(|i| ((i * 104_729) % 991) as f32 / 991.0 - 0.5)
            .collect() // rows × Q_HEADS·HD
    };
    let mut scratch = AttnScratch::default();
    // Prefill: the last 512-token chunk of a 2048-token prompt, as the engine runs it.
    let (n, chunk) = (2048usize, 512usize);
    let cache = fill(n, 1);
    let q = query(chunk);
    let q_pos: Vec<u32> = ((n - chunk) as u32..n as u32).collect();
    let mut out = vec![0.0f32; chunk * Q_HEADS * HD]; // chunk × Q_HEADS·HD
    let t = best_of(per_figure, || {
        attend(&cache, 0, &q, &q_pos, &mut out, &params, &mut scratch)
    });
    let keys: f64 = (n - chunk..n).map(|p| (p + 1) as f64).sum();
    let prefill_ops = 2.0 * (Q_HEADS * 2 * HD) as f64 * keys / t;
    // Decode: one query over 8192 entries in every layer of a cache several times the last-level cache (as a model's
    // layers stream from memory), and over one block (the call's fixed cost).
    let q1 = query(1);
    let mut out1 = vec![0.0f32; Q_HEADS * HD]; // 1 × Q_HEADS·HD
    let per_layer = 8192 * KV_HEADS * cfg.entry_bytes();
    let layers = (4 * p.llc_bytes.max(1 << 20))
        .div_ceil(per_layer)
        .clamp(1, 64);
    let mut decode = |n: usize, layers: usize| {
        let c = fill(n, layers);
        let qpos = [n as u32 - 1];
        c.take_read();
        for l in 0..layers {
            attend(&c, l, &q1, &qpos, &mut out1, &params, &mut scratch);
        }
        let bytes = c.take_read() as f64 / layers as f64;
        let t = best_of(per_figure, || {
            for l in 0..layers {
                attend(&c, l, &q1, &qpos, &mut out1, &params, &mut scratch);
            }
        }) / layers as f64;
        (bytes, t)
    };
    let (b_small, t_small) = decode(block_tokens, 1);
    let (b_big, t_big) = decode(8192, layers);
    if b_big <= b_small {
        bail!("attention read no more bytes over 8192 entries than over one block");
    }
    p.attention = Some(AttnRates {
        prefill_ops,
        decode_bw: (b_big - b_small) / (t_big - t_small).max(t_big * 0.05),
        decode_call_s: t_small,
    });
    Ok(())
}

/// What `hayloft plan` predicts for one context length.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// Prompt tokens and tokens generated after them.
    pub context: usize,
    pub new_tokens: usize,
    /// The memory plan at the end of the run (KV cache, weights, activations, ...).
    pub memory: MemPlan,
    /// KV bytes per cached token at that point (the cache's bytes ÷ its tokens).
    pub kv_bytes_per_token: f64,
    /// Operations of the prefill (matmuls, attention).
    pub prefill_ops: f64,
    pub prefill_s: f64,
    /// One decode step with `context` tokens cached: the bytes it streams and its time.
    pub decode_weight_bytes: usize,
    pub decode_kv_read_bytes: f64,
    pub decode_s: f64,
    pub decode_tok_s: f64,
    /// Sequences of this shape that fit `memory_budget` beside one copy of the weights.
    pub memory_budget: usize,
    pub max_concurrency: usize,
    /// Seconds to read this context's KV cache back from disk (None without a disk rate).
    pub swap_in_s: Option<f64>,
}

/// Predicts a run of `context` prompt tokens and `new` generated ones with the session settings `cfg`.
pub fn predict(
    model: &Model,
    cfg: &SessionConfig,
    machine: &MachineProfile,
    context: usize,
    new: usize,
    memory_budget: usize,
) -> Result<Prediction> {
    let mc = model.config();
    let Some(att) = &machine.attention else {
        bail!("the machine profile has no attention rates: write it with `hayloft bench machine --json FILE`");
    };
    if machine.weights.is_empty() {
        bail!("the machine profile has no weight rates: write it with `hayloft bench machine --json FILE`");
    }
    let fp = Footprint::of(mc, cfg)?;
    let memory = memplan::plan(
        mc,
        model.weight_bytes(),
        &fp,
        Lengths::generate(context, new),
    );
    let mats = model.decode_matrices();
    let head = mats.len() - 1;
    // Prefill: chunked matmuls over every prompt token, the head for the last row only.
    let mut prefill_mm = 0.0;
    for (i, m) in mats.iter().enumerate() {
        let rate = machine.weight_rate(m.ty).map_or(f64::NAN, |r| r.batch_ops);
        let rows = if i == head { 1 } else { context };
        prefill_mm += 2.0 * (m.rows * m.cols * rows) as f64 / rate;
    }
    let pre = ops::prefill_ops(mc, context);
    let prefill_s = prefill_mm + pre.attention / att.prefill_ops;
    // Decode: every matrix streamed once, the KV bytes attention reads.
    let mut decode_mm = 0.0;
    for m in &mats {
        let rate = machine.weight_rate(m.ty).map_or(f64::NAN, |r| r.gemv_bw);
        decode_mm += machine.matmul_call_s + m.n_bytes() as f64 / rate;
    }
    let kv_read = kv_read_bytes(mc, cfg, &fp, context);
    let decode_s = decode_mm + mc.n_layers as f64 * att.decode_call_s + kv_read / att.decode_bw;
    let per_seq = memory.kv + memory.activations + memory.logits + memory.method;
    let max_concurrency = memory_budget.saturating_sub(memory.weights) / per_seq.max(1);
    Ok(Prediction {
        context,
        new_tokens: new,
        kv_bytes_per_token: memory.kv as f64 / memory.tokens.max(1) as f64,
        memory,
        prefill_ops: pre.total(),
        prefill_s,
        decode_weight_bytes: model.streamed_weight_bytes(),
        decode_kv_read_bytes: kv_read,
        decode_s,
        decode_tok_s: 1.0 / decode_s,
        memory_budget,
        max_concurrency,
        swap_in_s: machine
            .disk_read_bw
            .map(|bw| (memory.kv + memory.kv_disk) as f64 / bw),
    })
}

/// KV bytes one decode step's attention reads with `context` tokens cached: every entry each layer keeps (the
/// window on sliding layers, the budget under an evicting method), or with a decode-time selector the budget of its
/// selective layers (the first `dense` stay dense) plus their page summaries.
fn kv_read_bytes(mc: &ModelConfig, cfg: &SessionConfig, fp: &Footprint, context: usize) -> f64 {
    let kv = &fp.kv;
    let mut total = 0usize;
    let dense = cfg
        .kv
        .select
        .as_ref()
        .map(|s| s.options.dense.unwrap_or(s.row.defaults.dense));
    for l in 0..kv.n_layers {
        // A decode step appends one entry; sliding-window layers are not compressed.
        let held = kv.stream_len(l, context + 1, 1);
        let held = match fp.budget {
            Some(b) if kv.window(l).is_none() => held.min(b.keep(context + 1)),
            _ => held,
        };
        let local = mc.layer_is_local.get(l).copied().unwrap_or(false);
        let read = match (&cfg.kv.select, dense) {
            (Some(s), Some(d)) if l >= d && !local => {
                held.min(s.budget.keep(context + 1)) * kv.entry_bytes()
                    + fp.meta.map_or(0, |m| m.stream_bytes(held, kv.head_dim_k))
            }
            _ => kv.stream_bytes(held, kv.head_dim_k),
        };
        total += kv.n_kv_heads * read;
    }
    total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::machine::{AttnRates, WeightRate};
    use crate::model::testutil::{write_tiny_llama, TinySpec};

    fn profile(bw: f64) -> MachineProfile {
        MachineProfile {
            cpu: "test".into(),
            cpus: 2,
            threads: 2,
            kernel: crate::kernels::kernel_name().into(),
            read_bw: bw,
            read_bw_1t: bw,
            paths: Vec::new(),
            llc_bytes: 32 << 20,
            weights: vec![WeightRate {
                ty: "Q8_0".into(),
                gemv_bw: bw,
                batch_ops: 1e11,
            }],
            matmul_call_s: 1e-6,
            attention: Some(AttnRates {
                prefill_ops: 2e10,
                decode_bw: bw / 2.0,
                decode_call_s: 2e-6,
            }),
            disk_read_bw: Some(1e9),
        }
    }

    /// The KV bytes a decode step is predicted to read equal what the attention kernel counts reading, for full
    /// attention, an evicting method and a decode-time selector.
    #[test]
    fn predicted_kv_reads_match_the_read_counter() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_llama(&p, &TinySpec::default()).unwrap();
        let m = Model::load(&p).unwrap();
        let vocab = m.config().vocab;
        for spec in ["full", "snapkv@0.5", "quest@64t"] {
            for ctx in [100usize, 300] {
                let mut cfg = SessionConfig::for_model(&m);
                cfg.kv = spec.parse().unwrap();
                cfg.chunk_size = 64;
                let pred = predict(&m, &cfg, &profile(1e10), ctx, 1, 1 << 30).unwrap();
                let toks: Vec<u32> = (0..ctx + 1)
                    .map(|i| (i * 7 % (vocab - 1)) as u32 + 1)
                    .collect();
                let mut s = super::super::Session::new(&m, cfg).unwrap();
                s.feed(&toks[..ctx], ctx - 1..ctx, |_, _| {}).unwrap();
                s.stats = Default::default();
                s.decode(toks[ctx]).unwrap();
                s.stats.finish();
                let got = s.stats.kv_read_bytes_per_token;
                let want = pred.decode_kv_read_bytes;
                // Within one page of summaries / one block per stream (the selector reads whole pages' keys).
                let kv = m.config().kv_config(KvDtype::F16, cfg_block());
                let slack = (m.config().n_layers * kv.n_kv_heads * kv.block_bytes()) as f64;
                assert!(
                    (got - want).abs() <= slack,
                    "{spec} at {ctx}: predicted {want} bytes read, counted {got} (slack {slack})"
                );
            }
        }
    }

    fn cfg_block() -> usize {
        super::super::DEFAULT_BLOCK_TOKENS
    }

    #[test]
    fn times_follow_the_rates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_llama(&p, &TinySpec::default()).unwrap();
        let m = Model::load(&p).unwrap();
        let cfg = SessionConfig::for_model(&m);
        let slow = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap();
        let fast = predict(&m, &cfg, &profile(2e9), 400, 8, 1 << 30).unwrap();
        assert!(fast.decode_s < slow.decode_s && fast.decode_s > slow.decode_s / 2.0 - 1e-9);
        let short = predict(&m, &cfg, &profile(1e9), 100, 8, 1 << 30).unwrap();
        assert!(short.prefill_s < slow.prefill_s && short.decode_s < slow.decode_s);
        assert!(slow.max_concurrency > 0 && slow.swap_in_s.unwrap() > 0.0);
        // No attention rates: a clear error, not a guess.
        let mut none = profile(1e9);
        none.attention = None;
        let e = predict(&m, &cfg, &none, 100, 8, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("bench machine"), "{e}");
    }
}
