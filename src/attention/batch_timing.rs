//! An ignored timing harness for batched decode attention (`batched_decode_timing`).

use super::*;
use crate::kv::{KvConfig, KvDtype};
use crate::testutil::Rng;

/// Batched decode attention of 8 sequences with SmolLM2's shapes (30 layers, 9 query / 3 KV heads of 64, 1K
/// entries each), f16 and kivi4, on the default pool: the median ms per step. A 64 MiB buffer is written between
/// steps so the caches come from memory, as they do after a step's weights. The environment changes it: HL_STREAMS,
/// HL_LEN (entries), HL_DTYPE (f16 or q4 alone), HL_FLUSH (0: no buffer), HL_STEPS, HL_NKV / HL_NQ / HL_HD (KV
/// heads, query heads, head dim; Gemma 3 270M: 1 / 4 / 256).
#[test]
#[ignore]
fn batched_decode_timing() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (layers, nkv, nq, hd, len, streams) = (
        env("HL_LAYERS", 30),
        env("HL_NKV", 3),
        env("HL_NQ", 9),
        env("HL_HD", 64),
        env("HL_LEN", 1024),
        env("HL_STREAMS", 8),
    );
    let do_flush = env("HL_FLUSH", 1) == 1;
    let bt = 32;
    let mut flush = vec![1u8; 64 << 20];
    let dtypes = match std::env::var("HL_DTYPE").as_deref() {
        Ok("f16") => vec![KvDtype::F16],
        Ok("q4") => vec![KvDtype::Kivi {
            bits: 4,
            residual: 128,
        }],
        _ => vec![
            KvDtype::F16,
            KvDtype::Kivi {
                bits: 4,
                residual: 128,
            },
        ],
    };
    for dtype in dtypes {
        let mut rng = Rng(7);
        let caches: Vec<KvCache> = (0..streams)
            .map(|_| {
                let mut c = KvCache::new(KvConfig {
                    n_layers: layers,
                    n_kv_heads: nkv,
                    head_dim_k: hd,
                    head_dim_v: hd,
                    block_tokens: bt,
                    dtype,
                    windows: Vec::new(),
                });
                let pos: Vec<u32> = (0..len as u32).collect();
                for l in 0..layers {
                    c.append(
                        l,
                        &pos,
                        &rng.vec(len * nkv * hd, 1.0),
                        &rng.vec(len * nkv * hd, 1.0),
                    );
                }
                c
            })
            .collect();
        let q = rng.vec(nq * hd, 2.0);
        let q_pos = [len as u32 - 1];
        let mut outs = vec![vec![0.0f32; nq * hd]; streams];
        let p = AttnParams {
            n_q_heads: nq,
            scale: 0.125,
            window: None,
            softcap: None,
        };
        let mut scratch = AttnScratch::default();
        let mut times = Vec::new();
        for _ in 0..env("HL_STEPS", 40) {
            if do_flush {
                for (i, b) in flush.iter_mut().enumerate().step_by(64) {
                    *b = b.wrapping_add(i as u8);
                }
            }
            let t = std::time::Instant::now();
            for l in 0..layers {
                let mut jobs: Vec<AttnJob> = caches
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(c, o)| AttnJob {
                        cache: c,
                        q: &q,
                        q_pos: &q_pos,
                        out: o,
                        sel: Sel::All,
                    })
                    .collect();
                attend_batch(&mut jobs, l, &p, &mut scratch);
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let bytes: usize = caches.iter().map(|c| c.bytes()).sum();
        times.sort_by(f64::total_cmp);
        eprintln!(
            "{dtype:?}: {:.3} ms per step (min {:.3}), {:.1} MB held",
            times[times.len() / 2],
            times[0],
            bytes as f64 / 1e6
        );
    }
    std::hint::black_box(&flush);
}
