//! Parity with llama.cpp on the real models, teacher-forced: both engines score the same token sequences, so no
//! divergence can compound. The fixtures (tests/fixtures/parity_*.json, made by scripts/parity/make_fixture.sh) hold
//! llama.cpp's top-64 logits and full-vocabulary logsumexp at stored positions.
//!
//! Tolerances, and why:
//! - top-1 agreement ≥ 99 % of *decisive* positions, those where llama.cpp's top-1 logit leads its top-2 by at least
//!   `DECISIVE_MARGIN` (0.5), and ≥ 95 % of all positions. Why not 99 % of all: both engines quantize every activation
//!   row to 8 bits before each matmul, so a 1e-6 difference in summation order flips some roundings and the flips add up
//!   through the layers to ~0.05–0.5 logits of noise (measured: hayloft's own scalar and SIMD kernels, identical but
//!   for f32 summation order, differ by up to 0.1 logits at the first position and 0.9 later). A quarter of the
//!   positions of these texts (sampled at temperature 0.8) are closer races than that, and every disagreement we saw was
//!   at a llama.cpp margin below 0.6. Strict top-1 agreement is printed.
//! - mean KL(llama.cpp ‖ hayloft) ≤ 0.01 nats, computed over the partition {llama.cpp's top-64 tokens} ∪ {all others}
//!   (the fixture does not store full distributions; grouping the tail can only lower KL, and the tail mass is tiny).
//! - max |Δlogit| is reported, not asserted: llama.cpp quantizes activations to 8 bits for its dot products and we do
//!   the same, but summation order and f16 KV rounding differ, so differences of ~0.01–0.1 are expected.

mod common;

use std::collections::HashSet;

use hayloft::engine::{Session, SessionConfig};
use hayloft::model::Model;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    n_vocab: usize,
    texts: Vec<Text>,
}

#[derive(Deserialize)]
struct Text {
    name: String,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
    logsumexp: Vec<f64>,
}

/// llama.cpp's top-1 must lead its top-2 by this many logits for a position to count as decisive.
const DECISIVE_MARGIN: f32 = 0.5;

#[derive(Default)]
struct Agreement {
    positions: usize,
    top1_agree: usize,
    decisive: usize,
    decisive_agree: usize,
    kl_sum: f64,
    max_dlogit: f32,
}

fn score_text(model: &Model, t: &Text, chunk: usize) -> Agreement {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = chunk;
    cfg.max_context = cfg.max_context.max(t.tokens.len());
    let mut s = Session::new(model, cfg).unwrap();
    let want: HashSet<usize> = t.positions.iter().copied().collect();
    let index: std::collections::HashMap<usize, usize> = t
        .positions
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, i))
        .collect();
    let mut a = Agreement::default();
    let lo = *t.positions.iter().min().unwrap();
    let hi = *t.positions.iter().max().unwrap() + 1;
    s.feed(&t.tokens, lo..hi, |p, logits| {
        if !want.contains(&p) {
            return;
        }
        let i = index[&p];
        let (ids, refl, lse_ref) = (&t.top_ids[i], &t.top_logits[i], t.logsumexp[i]);
        a.positions += 1;
        let ours_top = hayloft::engine::sampler::argmax(logits);
        let agree = ours_top == ids[0]
            || (logits[ours_top as usize] - logits[ids[0] as usize]).abs() < 1e-6;
        a.top1_agree += agree as usize;
        if refl[0] - refl[1] >= DECISIVE_MARGIN {
            a.decisive += 1;
            a.decisive_agree += agree as usize;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse_ours = m + logits
            .iter()
            .map(|&l| (l as f64 - m).exp())
            .sum::<f64>()
            .ln();
        let (mut kl, mut p_head, mut q_head) = (0.0, 0.0, 0.0);
        for (&id, &l) in ids.iter().zip(refl) {
            let p = (l as f64 - lse_ref).exp();
            let q = (logits[id as usize] as f64 - lse_ours).exp();
            if p > 0.0 {
                kl += p * (p / q.max(1e-300)).ln();
            }
            p_head += p;
            q_head += q;
            a.max_dlogit = a.max_dlogit.max((logits[id as usize] - l).abs());
        }
        let (p_tail, q_tail) = ((1.0 - p_head).max(0.0), (1.0 - q_head).max(1e-300));
        if p_tail > 1e-12 {
            kl += p_tail * (p_tail / q_tail).ln();
        }
        a.kl_sum += kl.max(0.0);
    })
    .unwrap();
    a
}

fn check(model_name: &str, fixture_file: &str) {
    let path = common::model(model_name);
    let fx: Fixture =
        serde_json::from_str(&std::fs::read_to_string(fixture_file).unwrap()).unwrap();
    hayloft::cli::init_threads(None).unwrap();
    let model = Model::load(&path).unwrap();
    assert_eq!(model.config().vocab, fx.n_vocab);
    let mut total = Agreement::default();
    assert!(fx.texts.len() >= 5 && fx.texts.iter().any(|t| t.tokens.len() >= 4096));
    for t in &fx.texts {
        let a = score_text(&model, t, 512);
        eprintln!(
            "{} / {:<8} {:>5} tokens {:>4} positions: top-1 {:.2} %, mean KL {:.5}, max |Δlogit| {:.4}",
            fx.model,
            t.name,
            t.tokens.len(),
            a.positions,
            100.0 * a.top1_agree as f64 / a.positions as f64,
            a.kl_sum / a.positions as f64,
            a.max_dlogit
        );
        assert_eq!(a.positions, t.positions.len());
        total.positions += a.positions;
        total.top1_agree += a.top1_agree;
        total.decisive += a.decisive;
        total.decisive_agree += a.decisive_agree;
        total.kl_sum += a.kl_sum;
        total.max_dlogit = total.max_dlogit.max(a.max_dlogit);
    }
    let top1 = total.top1_agree as f64 / total.positions as f64;
    let decisive = total.decisive_agree as f64 / total.decisive as f64;
    let kl = total.kl_sum / total.positions as f64;
    eprintln!(
        "{}: top-1 agreement {:.2} % of {} positions, {:.2} % of {} decisive ones; mean KL {kl:.5}; max |Δlogit| {:.4}",
        fx.model,
        100.0 * top1,
        total.positions,
        100.0 * decisive,
        total.decisive,
        total.max_dlogit
    );
    assert!(
        decisive >= 0.99,
        "top-1 agreement on decisive positions {:.2} % < 99 %",
        100.0 * decisive
    );
    assert!(top1 >= 0.95, "top-1 agreement {:.2} % < 95 %", 100.0 * top1);
    assert!(kl <= 0.01, "mean KL {kl} > 0.01");
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2-135m", "tests/fixtures/parity_smollm2.json");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check("gemma3-270m", "tests/fixtures/parity_gemma3.json");
}

#[test]
fn qwen25_matches_llama_cpp() {
    check("qwen2.5-0.5b", "tests/fixtures/parity_qwen25.json");
}
