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
use crate::kernels::machine::{
    best_of, median_of, AttnRates, GlueRates, KiviAttnRate, KiviPrefillRate, MachineProfile,
};
use crate::kv::{KvCache, KvConfig, KvDtype};
use crate::model::{cost as ops, Model, ModelConfig};

/// Attention shapes the rates are measured on: head dim 64, 2 KV heads of 4 query heads each, f16 cache.
const HD: usize = 64;
const KV_HEADS: usize = 2;
const Q_HEADS: usize = 8;

/// Measures the attention kernel's attained rates into `p.attention`, on a worker of the current pool (as the engine
/// runs it).
pub fn measure_attention(
    p: &mut MachineProfile,
    per_figure: Duration,
    block_tokens: usize,
) -> Result<()> {
    rayon::scope(|_| measure_attention_in_pool(p, per_figure, block_tokens))
}

/// Measures the per-element costs of a layer's work outside matmuls and attention into `p.glue`, with the engine's
/// own functions on a 512-token chunk of Llama-like shapes, on a worker of the current pool.
pub fn measure_glue(
    p: &mut MachineProfile,
    per_figure: Duration,
    block_tokens: usize,
) -> Result<()> {
    rayon::scope(|_| measure_glue_in_pool(p, per_figure, block_tokens))
}

fn measure_glue_in_pool(
    p: &mut MachineProfile,
    per_figure: Duration,
    block_tokens: usize,
) -> Result<()> {
    use crate::kernels::{gate_mul, GateAct};
    use crate::model::blocks::{apply_rope, rmsnorm};
    use crate::model::RopeStyle;
    let (n, dim, ffn, nh, nkv) = (512usize, 1024usize, 4096usize, 16usize, 4usize);
    let val = |i: usize| ((i * 7919) % 997) as f32 / 997.0 - 0.5;
    let x: Vec<f32> = (0..n * dim).map(val).collect(); // n × dim
    let w: Vec<f32> = (0..dim).map(|i| 1.0 + val(i) * 0.1).collect(); // dim
    let mut xb = vec![0.0f32; n * dim]; // n × dim
    let mut resid = x.clone(); // n × dim
    let norm = best_of(per_figure, || {
        rmsnorm(&mut xb, &x, &w, 1e-6);
        for (a, b) in resid.iter_mut().zip(&xb) {
            *a += b * 1e-3;
        }
    }) / (n * dim) as f64;
    let up: Vec<f32> = (0..n * ffn).map(val).collect(); // n × ffn
    let mut gate = up.clone(); // n × ffn
    let gate_s = best_of(per_figure, || {
        gate.copy_from_slice(&up);
        gate_mul(GateAct::Silu, &mut gate, &up);
    }) / (n * ffn) as f64;
    // The copy is part of the timed loop: take its own cost out (a plain memcpy of the same bytes).
    let copy = best_of(per_figure, || gate.copy_from_slice(&up)) / (n * ffn) as f64;
    let gate_s = (gate_s - copy).max(gate_s * 0.1);
    let half = HD / 2;
    let cos: Vec<f32> = (0..n * half).map(|i| val(i).cos()).collect(); // n × HD/2
    let sin: Vec<f32> = (0..n * half).map(|i| val(i).sin()).collect(); // n × HD/2
    let mut q: Vec<f32> = (0..n * (nh + nkv) * HD).map(val).collect(); // n × (nh + nkv)·HD
    let rope = best_of(per_figure, || {
        apply_rope(&mut q, nh + nkv, HD, RopeStyle::Neox, &cos, &sin, HD);
    }) / q.len() as f64;
    let kv_cfg = KvConfig {
        n_layers: 1,
        n_kv_heads: nkv,
        head_dim_k: HD,
        head_dim_v: HD,
        block_tokens,
        dtype: KvDtype::F16,
        windows: Vec::new(),
    };
    let kv: Vec<f32> = (0..n * nkv * HD).map(val).collect(); // n × nkv·HD
    let pos: Vec<u32> = (0..n as u32).collect();
    let mut cache = KvCache::new(kv_cfg);
    let append = best_of(per_figure, || {
        cache.clear();
        cache.append(0, &pos, &kv, &kv);
    }) / (2 * kv.len()) as f64;
    p.glue = Some(GlueRates {
        norm_s: norm,
        gate_s,
        rope_s: rope,
        append_s: append,
    });
    Ok(())
}

fn measure_attention_in_pool(
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
    // `n` entries' positions and keys (= values).
    let entries = |n: usize| -> (Vec<u32>, Vec<f32>) {
        let kv = (0..n * KV_HEADS * HD)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect(); // n × KV_HEADS·HD
        ((0..n as u32).collect(), kv)
    };
    // A cache of `layers` layers stored as `dtype`, each holding the same `n` entries.
    let fill_as = |n: usize, layers: usize, dtype: KvDtype| {
        let mut c = KvCache::new(KvConfig {
            n_layers: layers,
            dtype,
            ..cfg.clone()
        });
        let (pos, kv) = entries(n);
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
    // Prefill: the last 512-token chunk of a 2048-token prompt, as the engine runs it. A chunk's keys inside it (the
    // causal triangle, diagonal blocks half masked) cost more per useful operation than the keys before it: time a
    // first chunk alone (all triangle), then take its share out of the last chunk's time. Returns (off-diagonal,
    // triangle) useful operations per second over a cache stored as `dtype`.
    let (n, chunk) = (2048usize, 512usize);
    let q = query(chunk);
    let mut out = vec![0.0f32; chunk * Q_HEADS * HD]; // chunk × Q_HEADS·HD
    let mut prefill_rates = |dtype: KvDtype| -> (f64, f64) {
        let cache = fill_as(n, 1, dtype);
        let q_pos: Vec<u32> = ((n - chunk) as u32..n as u32).collect();
        let t = best_of(per_figure, || {
            attend(&cache, 0, &q, &q_pos, &mut out, &params, &mut scratch)
        });
        let per_key = 2.0 * (Q_HEADS * 2 * HD) as f64;
        let tri = (chunk * (chunk + 1) / 2) as f64;
        let first = fill_as(chunk, 1, dtype);
        let q_pos0: Vec<u32> = (0..chunk as u32).collect();
        let t_tri = best_of(per_figure, || {
            attend(&first, 0, &q, &q_pos0, &mut out, &params, &mut scratch)
        });
        let off = (chunk * (n - chunk)) as f64;
        (
            per_key * off / (t - t_tri).max(0.05 * t),
            per_key * tri / t_tri,
        )
    };
    let (prefill_ops, prefill_diag_ops) = prefill_rates(KvDtype::F16);
    // Writing a prompt's entries into a KIVI cache quantizes all but its newest `residual`: time appending n of them
    // to an empty cache, per element.
    let kivi_prefill = |bits: u8, (ops, diag_ops): (f64, f64)| {
        let mut c = KvCache::new(KvConfig {
            dtype: KvDtype::Kivi {
                bits,
                residual: 128,
            },
            ..cfg.clone()
        });
        let (pos, kv) = entries(n);
        let append_s = best_of(per_figure, || {
            c.clear();
            c.append(0, &pos, &kv, &kv);
        }) / (2 * kv.len()) as f64;
        KiviPrefillRate {
            ops,
            diag_ops,
            append_s,
        }
    };
    let kivi_prefill: Vec<KiviPrefillRate> = crate::kv::quant::BITS_CHOICES
        .iter()
        .map(|&bits| {
            let rates = prefill_rates(KvDtype::Kivi {
                bits,
                residual: 128,
            });
            kivi_prefill(bits, rates)
        })
        .collect();
    // Decode: one query over 8192 entries in every layer of a cache several times the last-level cache (as a model's
    // layers stream from memory), and over one block (the call's fixed cost).
    // Decode is bound by the work per entry as much as by the bus, and that work grows with the query heads sharing
    // each KV head: measure groups of 2, 4 and 8 (the prediction interpolates to the model's group).
    let mut rate_for = |group: usize, dtype: KvDtype| -> Result<(f64, f64)> {
        let per_layer = 8192
            * KV_HEADS
            * KvConfig {
                dtype,
                ..cfg.clone()
            }
            .entry_bytes();
        let layers = (4 * p.llc_bytes.max(1 << 20))
            .div_ceil(per_layer)
            .clamp(1, 64);
        let params = AttnParams {
            n_q_heads: KV_HEADS * group,
            ..params
        };
        let q1 = query(2);
        let q1 = &q1[..KV_HEADS * group * HD]; // 1 × n_q_heads·HD (2·Q_HEADS·HD holds the widest group)
        let mut out1 = vec![0.0f32; KV_HEADS * group * HD]; // 1 × n_q_heads·HD
        let mut decode = |n: usize, layers: usize| {
            let c = fill_as(n, layers, dtype);
            let qpos = [n as u32 - 1];
            c.take_read();
            for l in 0..layers {
                attend(&c, l, q1, &qpos, &mut out1, &params, &mut scratch);
            }
            let bytes = c.take_read() as f64 / layers as f64;
            // The median pass, as for the weights: a decode step reads its KV once, amid other work.
            let t = median_of(per_figure, || {
                for l in 0..layers {
                    attend(&c, l, q1, &qpos, &mut out1, &params, &mut scratch);
                }
            }) / layers as f64;
            (bytes, t)
        };
        let (b_small, t_small) = decode(block_tokens, 1);
        let (b_big, t_big) = decode(8192, layers);
        if b_big <= b_small {
            bail!("attention read no more bytes over 8192 entries than over one block");
        }
        Ok((
            (b_big - b_small) / (t_big - t_small).max(t_big * 0.05),
            t_small,
        ))
    };
    let (decode_bw, decode_call_s) = rate_for(Q_HEADS / KV_HEADS, KvDtype::F16)?;
    let (decode_bw_g8, _) = rate_for(2 * Q_HEADS / KV_HEADS, KvDtype::F16)?;
    let (decode_bw_g2, _) = rate_for(Q_HEADS / KV_HEADS / 2, KvDtype::F16)?;
    let mut kivi = Vec::new();
    for (bits, prefill) in crate::kv::quant::BITS_CHOICES.into_iter().zip(kivi_prefill) {
        let dtype = KvDtype::Kivi {
            bits,
            residual: 128,
        };
        kivi.push(KiviAttnRate {
            bits,
            decode_bw: rate_for(Q_HEADS / KV_HEADS, dtype)?.0,
            decode_bw_g8: rate_for(2 * Q_HEADS / KV_HEADS, dtype)?.0,
            decode_bw_g2: rate_for(Q_HEADS / KV_HEADS / 2, dtype)?.0,
            prefill: Some(prefill),
        });
    }
    p.attention = Some(AttnRates {
        prefill_ops,
        prefill_diag_ops,
        decode_bw,
        decode_bw_g8,
        decode_bw_g2,
        decode_call_s,
        kivi,
    });
    Ok(())
}

/// Seconds of a predicted phase, by the kind of work.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Parts {
    pub matmul: f64,
    pub glue: f64,
    pub attention: f64,
}

impl Parts {
    pub fn total(&self) -> f64 {
        self.matmul + self.glue + self.attention
    }
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
    /// Its parts: weight matmuls, per-token glue (norms, activation, RoPE, cache writes), attention.
    pub prefill_parts_s: Parts,
    /// One decode step with `context` tokens cached: the bytes it streams and its time.
    pub decode_weight_bytes: usize,
    pub decode_kv_read_bytes: f64,
    pub decode_s: f64,
    pub decode_parts_s: Parts,
    /// How many times faster than from memory the step reads its weights, its working set (weights + KV read)
    /// fitting in the caches or not (the profile's reuse curve at that size; 1 without one). Attention keeps its
    /// streamed rate.
    pub decode_reuse: f64,
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
    let Some(glue) = &machine.glue else {
        bail!("the machine profile has no glue rates (it predates them): write it again with `hayloft bench machine --json FILE`");
    };
    let mats = model.decode_matrices();
    let head = mats.len() - 1;
    let rate = |ty| {
        machine.weight_rate(ty).ok_or_else(|| {
            anyhow::anyhow!(
                "the machine profile has no rates for {ty} weights, which {} uses: write it again with `hayloft bench machine --json FILE`",
                mc.name
            )
        })
    };
    // A decode step re-reads every weight and the KV it attends to: where that working set fits in the caches, the
    // weights come faster than the rates streamed from memory (the profile's reuse curve; 1 without one). Its
    // attention does not: a real step's fold read SmolLM2's KV at 20-22 GB/s at 512, 2048 and 8000 tokens alike
    // (HAYLOFT_PROFILE=1), the streamed rate, though a probe re-reading 8192-entry layers ran 1.6-1.9x faster
    // from cache; a short context's fold is bound by its per-block costs, not the bus.
    let kv_read = kv_read_bytes(mc, cfg, &fp, context);
    let reuse = machine.reuse_speedup(model.streamed_weight_bytes() as f64 + kv_read);
    // One single-token product: its fixed cost (split over the pool or not), its bytes streamed, its activation.
    let gemv = |m: &crate::kernels::QMatrix, reuse: f64| -> Result<f64> {
        let r = rate(m.ty)?;
        let fixed = if crate::kernels::gemv_splits(m, machine.threads) {
            machine.matmul_split_s
        } else {
            machine.matmul_call_s
        };
        Ok(fixed + m.n_bytes() as f64 / (r.gemv_bw * reuse) + m.cols as f64 * r.act_s)
    };
    // A KIVI cache has its own prefill rates: attention over quantized blocks, and quantizing what it writes.
    let kivi_prefill = match fp.kv.dtype.quant_bits() {
        Some(bits) => Some(att.kivi_prefill(bits)?),
        None => None,
    };
    // Glue per token: every layer's norms, activation, RoPE and cache writes.
    let e = ops::glue_elements(mc);
    let append_s = kivi_prefill.map_or(glue.append_s, |r| r.append_s);
    let glue_tok = mc.n_layers as f64
        * (e.norm * glue.norm_s
            + e.gate * glue.gate_s
            + e.rope * glue.rope_s
            + e.append * append_s);
    // Prefill: chunked matmuls over every prompt token (activation preparation, multiply-adds, output finishing), the
    // head for the last row only.
    let mut prefill_mm = 0.0;
    for (i, m) in mats.iter().enumerate() {
        if i == head {
            prefill_mm += gemv(m, 1.0)?;
            continue;
        }
        let r = rate(m.ty)?;
        let n = context as f64;
        prefill_mm += n * (m.cols as f64 * r.act_s + m.rows as f64 * r.out_s)
            + 2.0 * (m.rows * m.cols) as f64 * n / r.batch_ops;
    }
    let pre = ops::prefill_ops(mc, context);
    let (diag, off) = ops::prefill_attention_split(mc, context, cfg.chunk_size);
    let prefill_parts_s = Parts {
        matmul: prefill_mm,
        glue: context as f64 * glue_tok,
        attention: match kivi_prefill {
            Some(r) => off / r.ops + diag / r.diag_ops,
            None => off / att.prefill_ops + diag / att.diag_ops(),
        },
    };
    let prefill_s = prefill_parts_s.total();
    // Decode: every matrix streamed once, the glue of one token, the KV bytes attention reads.
    let mut decode_mm = 0.0;
    for m in &mats {
        decode_mm += gemv(m, reuse)?;
    }
    let decode_parts_s = Parts {
        matmul: decode_mm,
        glue: glue_tok,
        attention: mc.n_layers as f64 * att.decode_call_s
            + kv_read
                * att.decode_s_per_byte_of(
                    fp.kv.dtype.quant_bits(),
                    mc.n_heads / mc.n_kv_heads.max(1),
                )?,
    };
    let decode_s = decode_parts_s.total();
    let per_seq = memory.kv + memory.activations + memory.logits + memory.method;
    let max_concurrency = memory_budget.saturating_sub(memory.weights) / per_seq.max(1);
    Ok(Prediction {
        context,
        new_tokens: new,
        kv_bytes_per_token: memory.kv as f64 / memory.tokens.max(1) as f64,
        memory,
        prefill_ops: pre.total(),
        prefill_s,
        prefill_parts_s,
        decode_weight_bytes: model.streamed_weight_bytes(),
        decode_kv_read_bytes: kv_read,
        decode_s,
        decode_parts_s,
        decode_reuse: reuse,
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
        let local = mc.is_local(l);
        let read = match (&cfg.kv.select, dense) {
            (Some(s), Some(d)) if l >= d && !local => {
                held.min(s.budget.keep(context + 1)) * kv.entry_bytes()
                    + fp.meta
                        .map_or(0, |m| m.stream_read_bytes(held, kv.head_dim_k))
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
                act_s: 1e-10,
                out_s: 1e-10,
            }],
            matmul_call_s: 1e-6,
            matmul_split_s: 2e-6,
            glue: Some(GlueRates {
                norm_s: 5e-10,
                gate_s: 4e-10,
                rope_s: 1e-10,
                append_s: 1e-9,
            }),
            attention: Some(AttnRates {
                prefill_ops: 2e10,
                prefill_diag_ops: 1e10,
                decode_bw: bw / 2.0,
                decode_bw_g8: bw / 3.0,
                decode_bw_g2: bw,
                decode_call_s: 2e-6,
                kivi: vec![
                    KiviAttnRate {
                        bits: 4,
                        decode_bw: bw / 8.0,
                        decode_bw_g8: bw / 12.0,
                        decode_bw_g2: bw / 4.0,
                        prefill: Some(KiviPrefillRate {
                            ops: 5e9,
                            diag_ops: 4e9,
                            append_s: 3e-9,
                        }),
                    },
                    // Decode rates only, as in a profile written before the prefill ones were measured.
                    KiviAttnRate {
                        bits: 8,
                        decode_bw: bw / 4.0,
                        decode_bw_g8: bw / 6.0,
                        decode_bw_g2: bw / 2.0,
                        prefill: None,
                    },
                ],
            }),
            disk_read_bw: Some(1e9),
            reuse: Vec::new(),
        }
    }

    /// The KV bytes a decode step is predicted to read equal what the attention kernel counts reading, for full
    /// attention, an evicting method and a decode-time selector.
    #[test]
    fn predicted_kv_reads_match_the_read_counter() {
        let m = tiny_model();
        let vocab = m.config().vocab;
        for spec in ["full", "snapkv@0.5", "quest@64t,dense=1"] {
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

    /// The default tiny Llama, loaded (its file is gone once loaded).
    fn tiny_model() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_llama(&p, &TinySpec::default()).unwrap();
        Model::load(&p).unwrap()
    }

    fn cfg_block() -> usize {
        super::super::DEFAULT_BLOCK_TOKENS
    }

    #[test]
    fn times_follow_the_rates() {
        let m = tiny_model();
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

    /// A working set that fits the profile's caches streams its weights faster, by the reuse curve's factor at
    /// weights + KV read; attention (f16 or KIVI) and prefill keep their rates.
    #[test]
    fn a_cached_working_set_reads_its_weights_faster() {
        use crate::kernels::machine::ReusePoint;
        let m = tiny_model();
        let at = |bytes: usize| {
            let mut p = profile(1e9);
            p.reuse = vec![
                ReusePoint {
                    bytes,
                    speedup: 2.0,
                },
                ReusePoint {
                    bytes: 2 * bytes,
                    speedup: 1.0,
                },
            ];
            p
        };
        for kv in ["full", "kivi4"] {
            let mut cfg = SessionConfig::for_model(&m);
            cfg.kv = kv.parse().unwrap();
            let a = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap();
            let b = predict(&m, &cfg, &at(1 << 30), 400, 8, 1 << 30).unwrap();
            assert_eq!((a.decode_reuse, b.decode_reuse), (1.0, 2.0));
            let streamed = |p: &Prediction| p.decode_parts_s.matmul;
            assert!(streamed(&b) < streamed(&a) && streamed(&b) > streamed(&a) / 2.0);
            assert_eq!(a.decode_parts_s.attention, b.decode_parts_s.attention);
            assert_eq!(a.prefill_s, b.prefill_s);
            // Past the curve's last point nothing is cached.
            let c = predict(&m, &cfg, &at(1 << 10), 400, 8, 1 << 30).unwrap();
            assert_eq!((c.decode_s, c.decode_reuse), (a.decode_s, 1.0));
        }
    }

    /// A KIVI cache's decode attention is priced at its width's measured rate, not at the f16 rate per byte; a
    /// width the profile did not measure is an error naming it.
    #[test]
    fn kivi_caches_take_their_own_decode_rate() {
        let m = tiny_model();
        let mut cfg = SessionConfig::for_model(&m);
        cfg.kv = "kivi4".parse().unwrap();
        let pred = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap();
        let (mc, att) = (m.config(), profile(1e9).attention.unwrap());
        let group = mc.n_heads / mc.n_kv_heads;
        let want = mc.n_layers as f64 * att.decode_call_s
            + pred.decode_kv_read_bytes * att.decode_s_per_byte_of(Some(4), group).unwrap();
        let got = pred.decode_parts_s.attention;
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "attention {got} s, want {want} s"
        );
        assert!(
            got > mc.n_layers as f64 * att.decode_call_s
                + pred.decode_kv_read_bytes * att.decode_s_per_byte(group)
        );
        cfg.kv = "kivi2".parse().unwrap();
        let e = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("2-bit"), "{e}");
    }

    /// A KIVI cache's prefill is priced at its width's own rates: attention at the measured operations per second over
    /// quantized blocks, and the cache writes (quantizing) at its append cost; a profile without them names the width.
    #[test]
    fn kivi_caches_take_their_own_prefill_rates() {
        let m = tiny_model();
        let mut cfg = SessionConfig::for_model(&m);
        let full = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap();
        cfg.kv = "kivi4".parse().unwrap();
        let pred = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap();
        let (mc, att) = (m.config(), profile(1e9).attention.unwrap());
        let r = att.kivi_prefill(4).unwrap();
        let (diag, off) = ops::prefill_attention_split(mc, 400, cfg.chunk_size);
        let want = off / r.ops + diag / r.diag_ops;
        let got = pred.prefill_parts_s.attention;
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "attention {got} s, want {want} s"
        );
        assert!(got > full.prefill_parts_s.attention);
        // The cache writes: the same elements per token and layer, at the KIVI append cost instead of f16's.
        let e = ops::glue_elements(mc);
        let extra = 400.0 * mc.n_layers as f64 * e.append * (r.append_s - 1e-9);
        let dg = pred.prefill_parts_s.glue - full.prefill_parts_s.glue;
        assert!(
            (dg - extra).abs() <= 1e-6 * extra,
            "glue grew by {dg} s, want {extra} s"
        );
        cfg.kv = "kivi8".parse().unwrap();
        let e = predict(&m, &cfg, &profile(1e9), 400, 8, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("prefill rates for 8-bit"), "{e}");
    }

    /// A profile that lacks the rates of a weight type the model uses, or the glue rates, is refused with an error
    /// that names what is missing; it is not priced at some other type's rate.
    #[test]
    fn missing_rates_are_named_not_guessed() {
        let m = tiny_model();
        let cfg = SessionConfig::for_model(&m);
        let mut other = profile(1e9);
        other.weights[0].ty = "Q4_0".into();
        let e = predict(&m, &cfg, &other, 100, 8, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("Q8_0"), "{e}");
        let mut old = profile(1e9);
        old.glue = None;
        let e = predict(&m, &cfg, &old, 100, 8, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("glue"), "{e}");
    }

    /// Each glue rate adds its elements' time to every token of the prefill and to each decode step.
    #[test]
    fn glue_adds_its_elements_per_token_and_layer() {
        let m = tiny_model();
        let cfg = SessionConfig::for_model(&m);
        let base = predict(&m, &cfg, &profile(1e9), 200, 8, 1 << 30).unwrap();
        let mut slow = profile(1e9);
        slow.glue.as_mut().unwrap().gate_s += 1e-6;
        let more = predict(&m, &cfg, &slow, 200, 8, 1 << 30).unwrap();
        let mc = m.config();
        let per_tok = 1e-6 * mc.ffn_dim as f64 * mc.n_layers as f64;
        assert!((more.decode_s - base.decode_s - per_tok).abs() < 1e-9 * per_tok.max(1.0) + 1e-12);
        assert!((more.prefill_s - base.prefill_s - 200.0 * per_tok).abs() < 1e-6 * per_tok);
    }
}
