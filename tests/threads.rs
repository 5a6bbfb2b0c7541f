//! The whole model, run in thread pools of 1, 2, 3, 7 and 16 threads, gives the same logits (issue "Use every core").
//!
//! Tiny random Llama, Qwen2 and Gemma 3 models sized so that every parallel path runs: prompt chunks big enough for
//! the matmul to split rows and tokens over the pool, and a cache long enough for decode attention to split each
//! head's key blocks over several tasks (flash-decoding), whose partial softmaxes are then merged.
//!
//! What may differ, and the stated tolerance: attention splits a head's key blocks over more tasks when there are
//! more threads than (head, query tile) pairs to keep busy (flash-decoding, and prefill of a short chunk), so the
//! order in which those partial softmaxes are merged follows the thread count, and with it the last bits of some
//! values (about 1e-7 relative). The matmul computes each output element the same way whatever its split of rows and
//! tokens, but it quantizes its input rows to 8 bits (Q8 weights, and the Q8_0 tied output matrix here), so a last-bit
//! difference that sits on a rounding boundary moves one 8-bit level and grows. Measured here with F32 layer weights
//! (only the output matrix quantizes its input): at most 4e-4 of the largest logit. Tolerance: 2e-3 of the largest
//! logit, and the same greedy tokens. (With Q8_0 layer weights one flipped level inside the network moves a logit
//! by about 1 %, which is why the layers here are F32.)

use hayloft::engine::{Session, SessionConfig};
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, write_tiny_qwen2, TinySpec};
use hayloft::model::Model;

const THREADS: [usize; 5] = [1, 2, 3, 7, 16];

fn spec() -> TinySpec {
    TinySpec {
        n_layers: 2,
        dim: 256,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_dim: 768,
        ctx_len: 1024,
        weight_type: hayloft::gguf::GgmlType::F32,
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

fn check(name: &str, m: &Model) {
    let vocab = m.config().vocab;
    let prompt: Vec<u32> = (0..300).map(|i| ((i * 53 + 7) % vocab) as u32).collect();
    let (pre1, dec1, toks1) = run(m, 1, &prompt, 8);
    let scale = pre1
        .iter()
        .chain(&dec1)
        .fold(0f32, |a, x| a.max(x.abs()))
        .max(1e-6);
    for t in &THREADS[1..] {
        let (pre, dec, toks) = run(m, *t, &prompt, 8);
        let worst = pre1
            .iter()
            .zip(&pre)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 2e-3 * scale,
            "{name}: prompt logits at {t} threads differ by {worst} (scale {scale})"
        );
        assert_eq!(toks, toks1, "{name}: greedy tokens at {t} threads");
        let worst = dec1
            .iter()
            .zip(&dec)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 2e-3 * scale,
            "{name}: decode logits at {t} threads differ by {worst} (scale {scale})"
        );
    }
}

#[test]
fn logits_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec();
    let p = dir.path().join("llama.gguf");
    write_tiny_llama(&p, &s).unwrap();
    check("llama", &Model::load(&p).unwrap());
    let p = dir.path().join("qwen2.gguf");
    write_tiny_qwen2(&p, &s, None).unwrap();
    check("qwen2", &Model::load(&p).unwrap());
    let p = dir.path().join("gemma3.gguf");
    write_tiny_gemma3(&p, &s, 64).unwrap();
    check("gemma3", &Model::load(&p).unwrap());
}
