//! Logit parity with llama.cpp for architecture features none of the three real models has, on tiny random models the
//! test writes itself: llama.cpp's logits on the same files are in tests/fixtures/tiny_parity.json (made by `bash
//! scripts/parity/make_tiny_fixture.sh`, which writes the files with this test's ignored `write_fixture_models`).
//! - `llama3`: a Llama model with RoPE frequency factors (`rope_freqs.weight`, Meta's "llama3" scaling baked in by
//!   llama.cpp's converter for Llama 3.1 and later).
//! - `qwen3`: a Qwen3 model (per-head RMSNorm of queries and keys, heads wider than dim / heads).
//! - `smollm3`: a SmolLM3 model (no RoPE on every 4th layer).
//! - `granite`: a Granite model (embedding, attention, residual and logit multipliers).
//! - `gemma2`: a Gemma 2 model (attention and final logit soft-capping, every other layer local with a 16-token
//!   window, one RoPE base).
//! - `exaone`: an EXAONE model (Llama blocks, NeoX RoPE, RoPE frequency factors); `ernie45`: an ERNIE 4.5 model
//!   (Llama blocks, Llama's RoPE pairing).
//! - `gemma1`: a Gemma 1 model (Gemma's blocks without post-norms, QK-norm or windows).
//! - `olmo2`, `olmo3`: OLMo models (no input norms, output norms, QK-norm over whole rows; OLMo 3's sliding window
//!   on the layers a bool-array pattern marks).
//! - `phi3`, `phi3short`: Phi-3 models (fused Q/K/V and gate/up matrices, RoPE over 3/4 of each head, LongRoPE's
//!   long and short factor sets and attention factor), one past its original context and one within it.
//! - `qwen3moe`: a Qwen3-MoE model (8 experts behind a softmax router, 2 per token, their weights renormalized);
//!   `mixtral`: the same routing in a Llama-architecture file (Mixtral's layout), 4 experts, 2 per token; `olmoe`:
//!   an OLMoE model (full-width QK-norm, 8 experts, 2 per token, the routed weights not renormalized); `qwen2moe`: a
//!   Qwen2-MoE model (biases, 8 experts, 2 per token, not renormalized, and a shared expert behind a sigmoid gate);
//!   `granitemoe`, `granitemoeshared`: Granite MoE models (Granite's multipliers, 8 experts, 2 per token), the second
//!   with an ungated shared expert; `mistral3moe`: Mistral 3 with 4 experts, 2 per token; `ernie45moe`: ERNIE 4.5
//!   MoE (layer 0 dense and wider, then 8 experts, 2 per token, chosen with a per-expert bias, and a shared expert).
//! - `mistral3`: a Mistral 3 model (YaRN with Ministral 3's keys, queries scaled by position: the attention
//!   temperature).
//!
//! Each case also drops its feature from the loaded model and checks that the logits then move far from llama.cpp's,
//! so the comparison can fail. Also: a file holding a tensor its architecture does not use is refused by name, as
//! llama.cpp's loader refuses it.

use std::collections::BTreeMap;
use std::path::Path;

use hayloft::engine::{Session, SessionConfig};
use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::{GgmlType, Value};
use hayloft::kernels::QMatrix;
use hayloft::model::moe::{Ffn, MoeFfn};
use hayloft::model::rope::RopeScaling;
use hayloft::model::testutil::{
    llama3_freq_factors, tiny_ernie45, tiny_ernie45moe, tiny_exaone, tiny_gemma1, tiny_gemma2,
    tiny_granite, tiny_granitemoe, tiny_llama, tiny_llama3, tiny_mistral3, tiny_mistral3_moe,
    tiny_mixtral, tiny_olmo2, tiny_olmoe, tiny_phi3, tiny_qwen2moe, tiny_qwen3, tiny_qwen3moe,
    tiny_smollm3, TinySpec,
};
use hayloft::model::{Model, RopeStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const FIXTURE: &str = "tests/fixtures/tiny_parity.json";

/// llama.cpp rounds each query to f16 for its products with the f16 cache and hayloft does not, which a tiny random
/// model amplifies: measured 2026-12-05, max |Δ| 0.012 (llama3) and 0.013 (qwen3) of logits up to 3.9, and the same
/// 0.012 for the llama3 model without its factors against llama.cpp on that file.
const TOLERANCE: f32 = 0.03;

/// F32 projections (no activation rounding on either side), four layers.
fn spec(head_dim: usize, seed: u64) -> TinySpec {
    TinySpec {
        n_layers: 4,
        dim: 128,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim,
        ffn_dim: 192,
        ctx_len: 512,
        weight_type: GgmlType::F32,
        seed,
    }
}

/// The cases: name and file. Qwen3's heads are 48 wide for a 128-dim model (192 query dims), as the real ones are
/// wider than dim / heads.
fn cases() -> Vec<(&'static str, GgufWriter)> {
    vec![
        ("llama3", tiny_llama3(&spec(32, 31))),
        ("qwen3", tiny_qwen3(&spec(48, 37))),
        ("smollm3", tiny_smollm3(&spec(32, 43))),
        (
            "granite",
            tiny_granite(&spec(32, 47), (3.0, 0.25, 0.4, 2.5)),
        ),
        // Soft-caps of 2 and 1.5 (Gemma 2's are 50 and 30) so that they bite on a tiny model's small scores.
        ("gemma2", tiny_gemma2(&spec(32, 41), 16, (2.0, 1.5))),
        ("gemma1", tiny_gemma1(&spec(32, 71))),
        ("exaone", tiny_exaone(&spec(32, 73))),
        ("ernie45", tiny_ernie45(&spec(32, 113))),
        // llama.cpp runs the fixture with a context of 256 (128 padded up): past the original 64, so the long
        // factors rotate; hayloft's default context is the trained 512, also past it.
        ("phi3", tiny_phi3(&spec(32, 53), Some((64, 1.19)))),
        ("olmo2", tiny_olmo2(&spec(32, 61), None, None)),
        // OLMo 3: a 16-token window on layers 0, 1 and 3 (a bool per layer), layer 2 global, and YaRN ×4 from a
        // trained 32 tokens, which only the global layer takes.
        (
            "olmo3",
            tiny_olmo2(
                &spec(32, 67),
                Some((16, vec![true, true, false, true])),
                Some(("yarn", 4.0, 32)),
            ),
        ),
        // YaRN ×4 from 16 tokens, and a temperature of 0.4 per step of 16 positions: the fixture's 96 tokens take
        // factors from 1 to 1 + 0.4 · ln 6 ≈ 1.72.
        ("mistral3", tiny_mistral3(&spec(32, 79), 4.0, 16, Some(0.4))),
        ("qwen3moe", tiny_qwen3moe(&spec(32, 83), 8, 2)),
        ("mixtral", tiny_mixtral(&spec(32, 89), 4, 2)),
        ("qwen2moe", tiny_qwen2moe(&spec(32, 101), 8, 2)),
        ("ernie45moe", tiny_ernie45moe(&spec(32, 127), 8, 2)),
        (
            "mistral3moe",
            tiny_mistral3_moe(&spec(32, 109), 4.0, 16, Some(0.4), (4, 2)),
        ),
        (
            "granitemoe",
            tiny_granitemoe(&spec(32, 103), 8, 2, (3.0, 0.25, 0.4, 2.5), false),
        ),
        (
            "granitemoeshared",
            tiny_granitemoe(&spec(32, 107), 8, 2, (3.0, 0.25, 0.4, 2.5), true),
        ),
        // OLMoE has no GQA: as many KV heads as query heads.
        (
            "olmoe",
            tiny_olmoe(
                &TinySpec {
                    n_kv_heads: 4,
                    ..spec(32, 97)
                },
                8,
                2,
            ),
        ),
        // Trained and original context 256: llama.cpp's 256 is not past it, nor is hayloft's default: the short set.
        (
            "phi3short",
            tiny_phi3(
                &TinySpec {
                    ctx_len: 256,
                    ..spec(32, 59)
                },
                Some((256, 1.19)),
            ),
        ),
    ]
}

#[derive(Deserialize)]
struct Case {
    model_sha256: String,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Fixture {
    command: String,
    cases: BTreeMap<String, Case>,
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

/// Every position's logits (positions × vocab), fed in one prefill.
fn logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut s = Session::new(model, SessionConfig::for_model(model)).unwrap();
    let mut out = vec![Vec::new(); tokens.len()];
    s.feed(tokens, 0..tokens.len(), |i, l| out[i] = l.to_vec())
        .unwrap();
    out
}

/// Largest |Δ| over the case's positions, and the largest |logit| of llama.cpp's.
fn max_diff(c: &Case, ours: &[Vec<f32>]) -> (f32, f32) {
    let (mut err, mut scale) = (0.0f32, 0.0f32);
    for (p, want) in c.positions.iter().zip(&c.logits) {
        assert_eq!(want.len(), ours[*p].len(), "vocabulary size");
        for (a, b) in want.iter().zip(&ours[*p]) {
            err = err.max((a - b).abs());
            scale = scale.max(a.abs());
        }
    }
    (err, scale)
}

/// Writes case `name`, checks it is the file llama.cpp scored, and returns it loaded with its fixture case.
fn load_case(name: &str, dir: &Path) -> (Model, Case, std::path::PathBuf) {
    let mut f: Fixture = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let (_, w) = cases().into_iter().find(|(n, _)| *n == name).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    w.write(&path).unwrap();
    let case = f.cases.remove(name).expect("the fixture has the case");
    assert_eq!(
        sha256(&path),
        case.model_sha256,
        "the tiny {name} model's bytes changed since the fixture was made: run `{}`",
        f.command
    );
    (Model::load(&path).unwrap(), case, path)
}

/// hayloft's logits are within [`TOLERANCE`] of llama.cpp's, and the model changed by `drop` is not: the feature
/// moves them by more than 10× the tolerance (SmolLM3's one NoPE layer of four moves them least: 0.41).
fn check(name: &str, drop: impl Fn(&mut Model)) {
    let dir = tempfile::tempdir().unwrap();
    let (model, case, path) = load_case(name, dir.path());
    let (err, scale) = max_diff(&case, &logits(&model, &case.tokens));
    println!("{name}: max |Δ| {err} against llama.cpp, logits up to {scale}");
    assert!(scale > 0.5, "{name}: degenerate logits (largest {scale})");
    assert!(
        err <= TOLERANCE,
        "{name}: max |Δ| against llama.cpp {err} (logits up to {scale})"
    );
    let mut without = Model::load(&path).unwrap();
    drop(&mut without);
    let (err_without, _) = max_diff(&case, &logits(&without, &case.tokens));
    println!("{name}: without the feature max |Δ| {err_without}");
    assert!(
        err_without > 10.0 * TOLERANCE,
        "{name}: dropping the feature moved the logits by only {err_without} (with it: {err})"
    );
}

#[test]
fn llama3_frequency_factors_give_llama_cpps_logits() {
    check("llama3", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama model")
        };
        assert!(
            l.rope_freq_factors.is_some(),
            "rope_freqs.weight was not read"
        );
        l.rope_freq_factors = None;
    });
}

#[test]
fn qwen3_gives_llama_cpps_logits() {
    check("qwen3", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        assert_eq!(l.cfg.head_dim_k, 48, "attention.key_length was not read");
        for layer in &mut l.layers {
            assert!(
                layer.attn.qk_norm.is_some(),
                "QK-norm weights were not read"
            );
            layer.attn.qk_norm = None;
        }
    });
}

#[test]
fn gemma2_gives_llama_cpps_logits() {
    check("gemma2", |m| {
        let Model::Gemma3(g) = m else {
            panic!("a Gemma model")
        };
        let c = &mut g.cfg;
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(2.0), Some(1.5)));
        assert_eq!(c.layer_is_local[..4], [true, false, true, false]);
        assert_eq!(
            (c.rope_base, c.rope_base_local, c.sliding_window),
            (1e4, 1e4, Some(16))
        );
        c.attn_softcap = None;
        c.final_softcap = None;
    });
}

#[test]
fn smollm3_gives_llama_cpps_logits() {
    check("smollm3", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        let rope: Vec<bool> = l.layers.iter().map(|l| l.attn.rope).collect();
        assert_eq!(rope, [true, true, true, false], "layer 3 has no RoPE");
        l.layers[3].attn.rope = true;
    });
}

#[test]
fn granite_gives_llama_cpps_logits() {
    // Each multiplier on its own: (embedding, attention, residual, logit) set back to Llama's.
    for which in 0..4 {
        check("granite", |m| {
            let Model::Llama(l) = m else {
                panic!("a Llama-family model")
            };
            let c = &mut l.cfg;
            assert_eq!(
                (c.embed_scale, c.attn_scale, c.residual_scale, c.logit_scale),
                (3.0, 0.25, 0.4, 2.5)
            );
            match which {
                0 => c.embed_scale = 1.0,
                1 => c.attn_scale = 1.0 / (c.head_dim_k as f32).sqrt(),
                2 => c.residual_scale = 1.0,
                _ => c.logit_scale = 1.0,
            }
        });
    }
}

/// OLMo 2: no input norms, norms on the blocks' outputs, QK-norm over whole rows; dropping either norm moves the
/// logits.
#[test]
fn olmo2_gives_llama_cpps_logits() {
    for which in 0..2 {
        check("olmo2", |m| {
            let Model::Llama(l) = m else {
                panic!("a Llama-family model")
            };
            for layer in &mut l.layers {
                assert!(layer.attn_norm.is_none() && layer.ffn_norm.is_none());
                let (qn, kn) = layer.attn.qk_norm.as_ref().expect("QK-norm");
                assert_eq!((qn.len(), kn.len()), (128, 64), "over whole rows");
                match which {
                    0 => layer.post_norms = None,
                    _ => layer.attn.qk_norm = None,
                }
            }
        });
    }
}

/// OLMo 3: a sliding window on the layers a bool-array pattern marks, plain RoPE there and YaRN on the global layer;
/// without the window the logits move.
#[test]
fn olmo3_sliding_window_gives_llama_cpps_logits() {
    check("olmo3", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        assert!(matches!(l.rope_scaling, RopeScaling::Yarn(_)));
        let c = &mut l.cfg;
        assert_eq!(c.sliding_window, Some(16));
        assert_eq!(c.layer_is_local, [true, true, false, true]);
        c.layer_is_local = vec![false; 4];
    });
}

/// A per-layer window pattern must name every layer; one of another length is refused by name.
#[test]
fn a_window_pattern_of_the_wrong_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("olmo3.gguf");
    tiny_olmo2(&spec(32, 67), Some((16, vec![true, false])), None)
        .write(&p)
        .unwrap();
    let e = format!("{:#}", Model::load(&p).err().expect("refused"));
    assert!(
        e.contains("olmo2.attention.sliding_window_pattern") && e.contains("2 values for 4 layers"),
        "{e}"
    );
}

/// Phi-3 with LongRoPE past its original context: fused Q/K/V and gate/up cut at load, partial NeoX RoPE, the long
/// factor set, and cos/sin × the attention factor. Dropping either the set (the short one instead) or the attention
/// factor moves the logits.
#[test]
fn phi3_long_rope_gives_llama_cpps_logits() {
    for which in 0..2 {
        check("phi3", |m| {
            let Model::Llama(l) = m else {
                panic!("a Llama-family model")
            };
            let lr = l.cfg.long_rope.expect("LongRoPE was read");
            assert_eq!((lr.orig_ctx, lr.long), (64, true));
            assert_eq!((l.cfg.rope_dim, l.cfg.head_dim_k), (24, 32));
            let sets = l.long_rope_sets.clone().expect("factor sets");
            assert_eq!(l.rope_freq_factors, sets[1], "the long set rotates");
            match which {
                0 => l.rope_freq_factors = sets[0].clone(),
                _ => {
                    assert!(matches!(
                        l.rope_scaling,
                        RopeScaling::Linear {
                            factor: 1.0,
                            attn_factor: 1.19
                        }
                    ));
                    l.rope_scaling = RopeScaling::None;
                }
            }
        });
    }
}

/// Phi-3 within its original context rotates with the short set, as llama.cpp does; the long one moves the logits.
#[test]
fn phi3_short_rope_gives_llama_cpps_logits() {
    check("phi3short", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        let lr = l.cfg.long_rope.expect("LongRoPE was read");
        assert_eq!((lr.orig_ctx, lr.long), (256, false));
        let sets = l.long_rope_sets.clone().expect("factor sets");
        assert_eq!(l.rope_freq_factors, sets[0], "the short set rotates");
        l.rope_freq_factors = sets[1].clone();
    });
}

/// The factor set follows the context a model is set up for, and a session whose context needs the other set is
/// refused with an error that says so (its keys would be rotated for another context).
#[test]
fn phi3_factor_set_follows_the_context_and_sessions_must_match_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("phi3.gguf");
    tiny_phi3(&spec(32, 53), Some((64, 1.19)))
        .write(&p)
        .unwrap();
    let mut model = Model::load(&p).unwrap();
    model.set_max_context(64);
    let Model::Llama(l) = &model else {
        panic!("a Llama-family model")
    };
    let sets = l.long_rope_sets.clone().unwrap();
    assert_eq!(l.cfg.long_rope.map(|lr| lr.long), Some(false));
    assert_eq!(l.rope_freq_factors, sets[0]);
    let mut cfg = SessionConfig::for_model(&model);
    assert_eq!(cfg.max_context, 512);
    let e = format!(
        "{:#}",
        Session::new(&model, cfg.clone()).err().expect("refused")
    );
    assert!(
        e.contains(
            "short LongRoPE factors (set up for at most 64 tokens), but this session may hold 512 tokens"
        ) && e.contains("--max-context 512"),
        "{e}"
    );
    cfg.max_context = 64;
    Session::new(&model, cfg).unwrap();
    model.set_max_context(65);
    let Model::Llama(l) = &model else {
        panic!("a Llama-family model")
    };
    assert_eq!(l.rope_freq_factors, sets[1]);
    // Without the factor tensors, a Phi-3 file has no LongRoPE and any context goes.
    let p = dir.path().join("phi3plain.gguf");
    tiny_phi3(&spec(32, 53), None).write(&p).unwrap();
    let model = Model::load(&p).unwrap();
    assert!(model.config().long_rope.is_none());
    let mut cfg = SessionConfig::for_model(&model);
    cfg.max_context = 64;
    Session::new(&model, cfg).unwrap();
}

/// Gemma 1: Gemma's scaled embeddings and GeGLU, no post-norms, QK-norm or window; the embedding scale matters.
#[test]
fn gemma1_gives_llama_cpps_logits() {
    check("gemma1", |m| {
        let Model::Gemma3(g) = m else {
            panic!("a Gemma model")
        };
        assert!(g
            .layers
            .iter()
            .all(|l| l.post_norms.is_none() && l.attn.qk_norm.is_none()));
        let c = &mut g.cfg;
        assert!(c.layer_is_local.iter().all(|&l| !l) && c.sliding_window.is_none());
        assert_eq!((c.rope_base, c.embed_scale), (1e4, (128f32).sqrt()));
        c.embed_scale = 1.0;
    });
}

/// EXAONE: Llama blocks rotated NeoX-style, with RoPE frequency factors; Llama's pairing instead moves the logits.
#[test]
fn exaone_gives_llama_cpps_logits() {
    check("exaone", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        assert!(l.rope_freq_factors.is_some(), "rope_freqs.weight was read");
        assert_eq!(l.cfg.rope_style, RopeStyle::Neox);
        l.cfg.rope_style = RopeStyle::Norm;
    });
}

/// Mistral 3: queries scaled by position after RoPE (the attention temperature); without it the logits move.
#[test]
fn mistral3_attention_temperature_gives_llama_cpps_logits() {
    check("mistral3", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        let t = l
            .cfg
            .attn_temp
            .expect("attention.temperature_scale was read");
        assert_eq!((t.scale, t.floor, t.offset), (0.4, 16, 0.0));
        assert_eq!(t.factor(15), 1.0);
        assert!((t.factor(16) - (1.0 + 0.4 * 2f32.ln())).abs() < 1e-6);
        l.cfg.attn_temp = None;
    });
}

/// A temperature scale needs the step it counts positions in (llama.cpp refuses such a file too), and a
/// mixture-of-experts file of an architecture whose experts hayloft does not run (Qwen3 dense) is refused by name
/// rather than failing on a missing tensor.
#[test]
fn mistral3_without_its_step_and_unsupported_experts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m3.gguf");
    let mut w = tiny_mistral3(&spec(32, 79), 4.0, 16, Some(0.4));
    w.set_meta(
        "mistral3.rope.scaling.original_context_length",
        Value::U32(0),
    );
    w.write(&p).unwrap();
    let e = format!("{:#}", Model::load(&p).err().expect("refused"));
    assert!(
        e.contains("mistral3.attention.temperature_scale is set")
            && e.contains("mistral3.rope.scaling.original_context_length"),
        "{e}"
    );
    let mut w = tiny_qwen3(&spec(48, 37));
    w.meta("qwen3.expert_count", Value::U32(8));
    w.write(&p).unwrap();
    let e = format!("{:#}", Model::load(&p).err().expect("refused"));
    assert!(
        e.contains("qwen3.expert_count is 8: mixture-of-experts"),
        "{e}"
    );
    // No temperature scale: plain YaRN Llama blocks.
    tiny_mistral3(&spec(32, 79), 4.0, 16, None)
        .write(&p)
        .unwrap();
    assert!(Model::load(&p).unwrap().config().attn_temp.is_none());
}

/// Qwen3-MoE: each token through its 2 most probable of 8 experts, weighted by the renormalized router
/// probabilities; taking the 2 least probable instead moves the logits.
#[test]
fn qwen3moe_gives_llama_cpps_logits() {
    moe_case("qwen3moe", 8);
}

/// Mixtral's layout (architecture "llama" with experts), and Mistral 3 with experts: the same routing.
#[test]
fn mixtral_gives_llama_cpps_logits() {
    moe_case("mixtral", 4);
    moe_case("mistral3moe", 4);
}

/// Qwen2-MoE: routed experts (not renormalized) plus the gated shared expert, which matters.
#[test]
fn qwen2moe_gives_llama_cpps_logits() {
    moe_case("qwen2moe", 8);
    check("qwen2moe", |m| {
        for f in moe_layers(m) {
            assert_eq!(f.cfg.shared_ff, 384);
            f.shared = None;
        }
    });
}

/// Granite MoE: Granite's multipliers around routed experts; the shared variant's ungated shared expert matters.
#[test]
fn granitemoe_gives_llama_cpps_logits() {
    moe_case("granitemoe", 8);
    moe_case("granitemoeshared", 8);
    check("granitemoeshared", |m| {
        for f in moe_layers(m) {
            assert!(f.shared.as_ref().is_some_and(|(_, gate)| gate.is_none()));
            f.shared = None;
        }
    });
    check("granitemoe", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        assert_eq!(l.cfg.residual_scale, 0.4);
        l.cfg.residual_scale = 1.0;
    });
}

/// OLMoE: the routed probabilities are not renormalized over the chosen experts.
#[test]
fn olmoe_gives_llama_cpps_logits() {
    moe_case("olmoe", 8);
    check("olmoe", |m| {
        for f in moe_layers(m) {
            f.cfg.norm_w = true;
        }
    });
}

/// Every expert block of a loaded MoE model (the layers after its dense ones).
fn moe_layers(m: &mut Model) -> impl Iterator<Item = &mut MoeFfn> {
    let Model::Llama(l) = m else {
        panic!("a Llama-family model")
    };
    let lead = l.cfg.moe.expect("a MoE model").dense_lead;
    l.layers
        .iter_mut()
        .enumerate()
        .filter_map(move |(i, layer)| match (&mut layer.ffn, i < lead) {
            (Ffn::Moe(f), false) => Some(&mut **f),
            (Ffn::Dense(_), true) => None,
            _ => panic!("layer {i}: experts from layer {lead} on"),
        })
}

/// ERNIE 4.5 MoE: a dense first layer twice as wide as an expert, and a bias on the experts' choice (not on their
/// weights) that matters, as does the shared expert.
#[test]
fn ernie45moe_gives_llama_cpps_logits() {
    moe_case("ernie45moe", 8);
    check("ernie45moe", |m| {
        let Model::Llama(l) = &*m else {
            panic!("a Llama-family model")
        };
        let Ffn::Dense(f) = &l.layers[0].ffn else {
            panic!("layer 0 dense")
        };
        assert_eq!(f.w_up.rows, 384);
        for f in moe_layers(m) {
            assert!(f.choice_bias.is_some(), "exp_probs_b.bias was read");
            f.choice_bias = None;
        }
    });
    check("ernie45moe", |m| {
        for f in moe_layers(m) {
            assert!(f.shared.as_ref().is_some_and(|(_, gate)| gate.is_none()));
            f.shared = None;
        }
    });
}

fn moe_case(name: &str, n_expert: usize) {
    check(name, |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        let moe = l.cfg.moe.expect("expert_count was read");
        assert_eq!(
            (moe.n_expert, moe.n_used, moe.norm_w),
            (n_expert, 2, !matches!(name, "olmoe" | "qwen2moe"))
        );
        for f in moe_layers(m) {
            // The router negated: every token's least probable experts instead.
            let (rows, cols) = (n_expert, 128);
            let mut row = vec![0.0f32; cols];
            let mut bytes = Vec::new();
            for r in 0..rows {
                f.router.dequantize_row(r, &mut row);
                bytes.extend(row.iter().flat_map(|v| (-v).to_le_bytes()));
            }
            f.router = QMatrix::from_gguf(GgmlType::F32, rows, cols, &bytes).unwrap();
        }
    });
}

/// ERNIE 4.5 MoE files whose expert layers are interleaved with dense ones (llama.cpp has no dense tensors for those
/// either), or that leave no expert layer, are refused with the key named.
#[test]
fn ernie45moe_with_interleaved_or_no_expert_layers_is_refused() {
    refused_with_meta(
        || tiny_ernie45moe(&spec(32, 127), 8, 2),
        &[
            (
                "ernie4_5-moe.interleave_moe_layer_step",
                2,
                "ernie4_5-moe.interleave_moe_layer_step is 2",
            ),
            (
                "ernie4_5-moe.leading_dense_block_count",
                4,
                "ernie4_5-moe.leading_dense_block_count is 4: no expert layer is left of 4",
            ),
        ],
    );
}

/// A Qwen3-MoE file whose routing cannot work is refused with the key or tensor named.
#[test]
fn qwen3moe_with_bad_routing_is_refused() {
    refused_with_meta(
        || tiny_qwen3moe(&spec(32, 83), 8, 2),
        &[
            (
                "qwen3moe.expert_used_count",
                0,
                "qwen3moe.expert_used_count is 0",
            ),
            (
                "qwen3moe.expert_used_count",
                9,
                "qwen3moe.expert_used_count is 9",
            ),
            (
                "qwen3moe.expert_count",
                0,
                "qwen3moe.expert_count is missing or 0",
            ),
            (
                "qwen3moe.expert_count",
                4,
                "blk.0.ffn_gate_exps.weight has shape [128, 192, 8]",
            ),
        ],
    );
}

/// For each (key, value, message): the file `make` writes, with that key set to that value, is refused with an error
/// that contains the message.
fn refused_with_meta(make: impl Fn() -> GgufWriter, cases: &[(&str, u32, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("refused.gguf");
    for &(key, v, want) in cases {
        let mut w = make();
        w.set_meta(key, Value::U32(v));
        w.write(&p).unwrap();
        let e = format!("{:#}", Model::load(&p).err().expect("refused"));
        assert!(e.contains(want), "{key} = {v}: {e}");
    }
}

/// ERNIE 4.5: Llama blocks with Llama's RoPE pairing; NeoX's instead moves the logits.
#[test]
fn ernie45_gives_llama_cpps_logits() {
    check("ernie45", |m| {
        let Model::Llama(l) = m else {
            panic!("a Llama-family model")
        };
        assert_eq!(l.cfg.rope_style, RopeStyle::Norm);
        l.cfg.rope_style = RopeStyle::Neox;
    });
}

/// Granite turns RoPE off on every layer when `rope.scaling.finetuned` is false, as llama.cpp reads it.
#[test]
fn granite_without_finetuned_rope_rotates_no_layer() {
    let dir = tempfile::tempdir().unwrap();
    for (finetuned, want) in [(None, true), (Some(true), true), (Some(false), false)] {
        let mut w = tiny_granite(&spec(32, 47), (3.0, 0.25, 0.4, 2.5));
        if let Some(f) = finetuned {
            w.set_meta("granite.rope.scaling.finetuned", Value::Bool(f));
        }
        let p = dir.path().join("granite.gguf");
        w.write(&p).unwrap();
        let Model::Llama(l) = Model::load(&p).unwrap() else {
            panic!("a Llama-family model")
        };
        assert!(
            l.layers.iter().all(|l| l.attn.rope == want),
            "{finetuned:?}"
        );
    }
}

#[test]
fn factors_that_are_not_positive_or_of_the_wrong_length_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(32, 31);
    let good = llama3_freq_factors(s.head_dim, 10000.0, 8.0, 1.0, 4.0, 64.0);
    let mut zero = good.clone();
    zero[3] = 0.0;
    let cases: [(&str, Vec<f32>, &str); 3] = [
        ("zero", zero, "finite and positive"),
        ("short", good[1..].to_vec(), "has shape"),
        ("nan", vec![f32::NAN; good.len()], "finite and positive"),
    ];
    for (name, ff, want) in cases {
        let mut w = tiny_llama(&s);
        w.tensor_f32("rope_freqs.weight", &[ff.len() as u64], &ff);
        let p = dir.path().join(format!("{name}.gguf"));
        w.write(&p).unwrap();
        let e = format!("{:#}", Model::load(&p).err().expect(name));
        assert!(
            e.contains("rope_freqs.weight") && e.contains(want),
            "{name}: {e}"
        );
    }
}

#[test]
fn a_tensor_the_architecture_does_not_use_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(32, 31);
    // An output bias Llama files may carry (llama.cpp reads it), which hayloft does not apply: refused, not ignored.
    let mut w = tiny_llama(&s);
    w.tensor_f32("blk.1.attn_output.bias", &[s.dim as u64], &vec![0.5; s.dim]);
    let p = dir.path().join("bias.gguf");
    w.write(&p).unwrap();
    let e = format!("{:#}", Model::load(&p).err().expect("an unused tensor"));
    assert!(
        e.contains("blk.1.attn_output.bias") && e.contains("does not use"),
        "{e}"
    );
    // The same file without it loads.
    let p = dir.path().join("plain.gguf");
    tiny_llama(&s).write(&p).unwrap();
    Model::load(&p).unwrap();
}

/// Writes every case's model to `$HAYLOFT_TINY_OUT/<name>.gguf` (for scripts/parity/make_tiny_fixture.sh).
#[test]
#[ignore]
fn write_fixture_models() {
    let out = std::env::var("HAYLOFT_TINY_OUT").expect("set HAYLOFT_TINY_OUT to a directory");
    for (name, w) in cases() {
        let p = Path::new(&out).join(format!("{name}.gguf"));
        w.write(&p).unwrap();
        println!("wrote {} (sha256 {})", p.display(), sha256(&p));
    }
}
