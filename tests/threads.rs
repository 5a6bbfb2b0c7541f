//! The whole model, run in thread pools of 1, 2, 3, 7 and 16 threads, gives the same logits (issue "Use every core").
//!
//! Tiny random Llama, Qwen2 and Gemma 3 models sized so that every parallel path runs: prompt chunks big enough for
//! the matmul to split rows and tokens over the pool, and a cache long enough for decode attention to split each
//! head's key blocks over several tasks (flash-decoding), whose partial softmaxes are then merged.
//!
//! Asserted bit for bit, with F32 and with Q8_0 layer weights. Attention plans its split of key blocks (and so the
//! order in which partial softmaxes merge) for a pool of `attention::PLAN_THREADS` threads whatever the pool's size,
//! and the matmul computes each output element the same way whatever its split of rows and tokens, so nothing in the
//! forward pass depends on the thread count up to 16 threads. (Before the plan was fixed, a merge order that followed
//! the pool gave last-bit differences, which a quantizing matmul turned into whole 8-bit levels: about 1 % of a logit
//! with Q8_0 weights.)

use hayloft::engine::{Session, SessionConfig};
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, write_tiny_qwen2, TinySpec};
use hayloft::model::Model;

const THREADS: [usize; 5] = [1, 2, 3, 7, 16];

fn spec(weight_type: hayloft::gguf::GgmlType) -> TinySpec {
    TinySpec {
        n_layers: 2,
        dim: 256,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_dim: 768,
        ctx_len: 1024,
        weight_type,
        ..Default::default()
    }
}

/// Prompt logits (every row) and the logits of `steps` greedy decode steps, run inside a pool of `threads`.
fn run(m: &Model, threads: usize, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut cfg = SessionConfig::for_model(m);
        cfg.chunk_size = 96;
        cfg.block_tokens = 16;
        let mut s = Session::new(m, cfg).unwrap();
        let v = m.config().vocab;
        let mut pre = vec![0.0; prompt.len() * v];
        s.feed(prompt, 0..prompt.len(), |i, l| {
            pre[i * v..(i + 1) * v].copy_from_slice(l)
        })
        .unwrap();
        let mut next = argmax(&pre[pre.len() - v..]);
        let (mut dec, mut toks) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let l = s.decode(next).unwrap();
            dec.extend_from_slice(l);
            next = argmax(l);
            toks.push(next);
        }
        (pre, dec, toks)
    })
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn check(name: &str, m: &Model) {
    let vocab = m.config().vocab;
    let prompt: Vec<u32> = (0..300).map(|i| ((i * 53 + 7) % vocab) as u32).collect();
    let (pre1, dec1, toks1) = run(m, 1, &prompt, 8);
    for t in &THREADS[1..] {
        let (pre, dec, toks) = run(m, *t, &prompt, 8);
        let first_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .position(|(x, y)| x.to_bits() != y.to_bits())
        };
        assert!(
            bits(&pre) == bits(&pre1),
            "{name}: prompt logits at {t} threads differ from 1 thread (first at {:?})",
            first_diff(&pre1, &pre)
        );
        assert_eq!(toks, toks1, "{name}: greedy tokens at {t} threads");
        assert!(
            bits(&dec) == bits(&dec1),
            "{name}: decode logits at {t} threads differ from 1 thread (first at {:?})",
            first_diff(&dec1, &dec)
        );
    }
}

#[test]
fn logits_do_not_depend_on_the_thread_count() {
    for wt in [hayloft::gguf::GgmlType::F32, hayloft::gguf::GgmlType::Q8_0] {
        one_weight_type(wt);
    }
}

fn one_weight_type(wt: hayloft::gguf::GgmlType) {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(wt);
    let p = dir.path().join("llama.gguf");
    write_tiny_llama(&p, &s).unwrap();
    check(&format!("llama {wt:?}"), &Model::load(&p).unwrap());
    let p = dir.path().join("qwen2.gguf");
    write_tiny_qwen2(&p, &s, None).unwrap();
    check(&format!("qwen2 {wt:?}"), &Model::load(&p).unwrap());
    let p = dir.path().join("gemma3.gguf");
    write_tiny_gemma3(&p, &s, 64).unwrap();
    check(&format!("gemma3 {wt:?}"), &Model::load(&p).unwrap());
}
