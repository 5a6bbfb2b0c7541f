//! Forward-pass invariants on tiny random-weight models the test writes itself:
//! chunked prefill ≡ one-shot prefill ≡ token-by-token decode, for every architecture (Qwen2 with and without RoPE
//! scaling); Qwen2's biases and RoPE scaling change the output; head ablation zeroes exactly its head.

use hayloft::engine::{Session, SessionConfig};
use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::GgmlType;
use hayloft::model::testutil::{
    tiny_ernie45moe, tiny_exaone, tiny_gemma1, tiny_gemma2, tiny_granite, tiny_granitemoe,
    tiny_llama3, tiny_mistral3, tiny_mixtral, tiny_olmo2, tiny_olmoe, tiny_phi3, tiny_qwen2moe,
    tiny_qwen3, tiny_qwen3moe, tiny_smollm3, write_tiny_gemma3, write_tiny_llama, write_tiny_qwen2,
    TinySpec,
};
use hayloft::model::{Arch, Model, RopeStyle};

fn all_logits(model: &Model, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = chunk;
    let mut s = Session::new(model, cfg).unwrap();
    let vocab = model.config().vocab;
    let mut out = vec![0.0; tokens.len() * vocab];
    s.feed(tokens, 0..tokens.len(), |i, l| {
        out[i * vocab..(i + 1) * vocab].copy_from_slice(l)
    })
    .unwrap();
    out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.1, "{what}: degenerate logits");
    assert!(
        err <= 1e-4 * scale,
        "{what}: max |Δ| {err} vs scale {scale}"
    );
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Chunked prefill and token-by-token decode give the one-shot prefill's logits bit for bit: every path folds a
/// block its causal mask cuts as it folds the same block holding only the visible entries (the missing ones add
/// exact zeros), on every kernel (`.ci/run` runs this file under each). A tiny random model amplifies a one-ulp
/// difference in attention to about 1e-3 of its logits, so a tolerance would hide such a difference.
fn check_model(model: &Model, n: usize) {
    let toks = tokens(n, model.config().vocab);
    let one_shot = all_logits(model, &toks, 512);
    for chunk in [7, 3, 1] {
        let other = all_logits(model, &toks, chunk);
        let what = if chunk == 1 {
            "token-by-token vs one-shot".to_string()
        } else {
            format!("prefill in chunks of {chunk} vs one-shot")
        };
        assert_close(&one_shot, &other, &what);
        let differ = one_shot
            .iter()
            .zip(&other)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{what}: {differ} logits differ in their bits");
    }
}

#[test]
fn llama_chunked_equals_one_shot_equals_token_by_token() {
    let dir = tempfile::tempdir().unwrap();
    // Seeds 0, 1, 4, 8, 9 (F32, portable path), 5 (F32), 0 (F16) and 3 (Q8_0, AVX-512) decoded differently from the
    // prefill before a partial block's last entries were summed in the lanes a masked block puts them in.
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
        for seed in 0..10 {
            let p = dir.path().join(format!("tiny-{ty}-{seed}.gguf"));
            write_tiny_llama(
                &p,
                &TinySpec {
                    weight_type: ty,
                    seed,
                    ..Default::default()
                },
            )
            .unwrap();
            let m = Model::load(&p).unwrap();
            check_model(&m, 75);
        }
    }
}

#[test]
fn gemma3_chunked_equals_one_shot_with_sliding_window() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-gemma3.gguf");
    // 6 layers: 5 local (window 9) + 1 global, one KV head shared by 4 query heads.
    let spec = TinySpec {
        n_layers: 6,
        n_kv_heads: 1,
        head_dim: 32,
        ..Default::default()
    };
    write_tiny_gemma3(&p, &spec, 9).unwrap();
    let m = Model::load(&p).unwrap();
    assert_eq!(
        m.config().layer_is_local,
        vec![true, true, true, true, true, false]
    );
    check_model(&m, 70);
}

#[test]
fn qwen2_chunked_equals_one_shot_equals_token_by_token() {
    let dir = tempfile::tempdir().unwrap();
    let scalings = [None, Some(("linear", 4.0, 128)), Some(("yarn", 4.0, 4096))];
    for (i, scaling) in scalings.into_iter().enumerate() {
        for ty in [GgmlType::F32, GgmlType::Q8_0] {
            let p = dir.path().join(format!("tiny-qwen2-{i}-{ty}.gguf"));
            let spec = TinySpec {
                weight_type: ty,
                n_kv_heads: 1,
                ..Default::default()
            };
            write_tiny_qwen2(&p, &spec, scaling).unwrap();
            let m = Model::load(&p).unwrap();
            let c = m.config();
            assert_eq!((c.arch, c.rope_style), (Arch::Qwen2, RopeStyle::Neox));
            check_model(&m, 75);
        }
    }
}

/// A loaded model is of `arch`, and its chunked, one-shot and token-by-token passes agree ([`check_model`]).
fn check_arch(m: &Model, arch: Arch) {
    assert_eq!(m.config().arch, arch);
    check_model(m, 75);
}

/// Qwen3 (QK-norm, heads wider than dim / heads), Llama with RoPE frequency factors, SmolLM3 (a NoPE layer), Granite
/// (multipliers), Phi-3 (fused projections, LongRoPE), OLMo 2 and 3 (output norms; a window), EXAONE, Mistral 3
/// (queries scaled by position), Gemma 1 and Gemma 2 (soft-capped scores and logits, every other layer windowed),
/// like the others.
#[test]
fn qwen3_llama3_and_gemma2_chunked_equal_one_shot_equal_token_by_token() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        for seed in 0..3 {
            // Writes a builder's file for this weight type and seed, and loads it.
            let load = |name: &str, w: GgufWriter| {
                let p = dir.path().join(format!("tiny-{name}-{ty}-{seed}.gguf"));
                w.write(&p).unwrap();
                Model::load(&p).unwrap()
            };
            let spec = TinySpec {
                weight_type: ty,
                head_dim: 32,
                seed,
                ..Default::default()
            };
            let p = dir.path().join(format!("tiny-qwen3-{ty}-{seed}.gguf"));
            tiny_qwen3(&spec).write(&p).unwrap();
            let m = Model::load(&p).unwrap();
            let c = m.config();
            assert_eq!(
                (c.arch, c.rope_style, c.head_dim_k),
                (Arch::Qwen3, RopeStyle::Neox, 32)
            );
            check_model(&m, 75);
            let p = dir.path().join(format!("tiny-llama3-{ty}-{seed}.gguf"));
            let llama = TinySpec {
                head_dim: 16, // dim / heads: the tiny Llama writes no key_length
                ..spec.clone()
            };
            tiny_llama3(&llama).write(&p).unwrap();
            check_model(&Model::load(&p).unwrap(), 75);
            let p = dir.path().join(format!("tiny-smollm3-{ty}-{seed}.gguf"));
            tiny_smollm3(&TinySpec {
                n_layers: 4,
                ..llama.clone()
            })
            .write(&p)
            .unwrap();
            check_model(&Model::load(&p).unwrap(), 75);
            let p = dir.path().join(format!("tiny-granite-{ty}-{seed}.gguf"));
            tiny_granite(&llama, (3.0, 0.25, 0.4, 2.5))
                .write(&p)
                .unwrap();
            check_model(&Model::load(&p).unwrap(), 75);
            // Phi-3: fused projections cut by rows (of Q8_0 blocks too), partial NeoX RoPE, the long LongRoPE set.
            let p = dir.path().join(format!("tiny-phi3-{ty}-{seed}.gguf"));
            tiny_phi3(&llama, Some((32, 1.19))).write(&p).unwrap();
            let m = Model::load(&p).unwrap();
            let c = m.config();
            assert_eq!(
                (
                    c.arch,
                    c.rope_style,
                    c.rope_dim,
                    c.long_rope.map(|l| l.long)
                ),
                (Arch::Phi3, RopeStyle::Neox, 12, Some(true))
            );
            check_model(&m, 75);
            // OLMo 2, and OLMo 3 with a 16-token window on 3 of 4 layers (chunks cross the window).
            for (name, swa) in [
                ("olmo2", None),
                ("olmo3", Some((16, vec![true, false, true, true]))),
            ] {
                let p = dir.path().join(format!("tiny-{name}-{ty}-{seed}.gguf"));
                tiny_olmo2(
                    &TinySpec {
                        n_layers: 4,
                        ..llama.clone()
                    },
                    swa,
                    None,
                )
                .write(&p)
                .unwrap();
                let m = Model::load(&p).unwrap();
                assert_eq!(m.config().arch, Arch::Olmo2);
                check_model(&m, 75);
            }
            check_arch(&load("exaone", tiny_exaone(&llama)), Arch::Exaone);
            // Qwen3-MoE: 8 experts, 2 per token; a chunk's rows grouped by expert must give each row what it gets
            // alone.
            check_arch(
                &load("qwen3moe", tiny_qwen3moe(&spec, 8, 2)),
                Arch::Qwen3Moe,
            );
            check_arch(
                &load("qwen2moe", tiny_qwen2moe(&llama, 8, 2)),
                Arch::Qwen2Moe,
            );
            // ERNIE 4.5 MoE: a wider dense layer 0 before the experts, a choice bias, a shared expert.
            check_arch(
                &load("ernie45moe", tiny_ernie45moe(&llama, 8, 2)),
                Arch::Ernie45Moe,
            );
            check_arch(
                &load(
                    "granitemoe",
                    tiny_granitemoe(&llama, 8, 2, (3.0, 0.25, 0.4, 2.5), true),
                ),
                Arch::GraniteMoe,
            );
            check_arch(
                &load(
                    "olmoe",
                    tiny_olmoe(
                        &TinySpec {
                            n_kv_heads: 4,
                            ..llama.clone()
                        },
                        8,
                        2,
                    ),
                ),
                Arch::Olmoe,
            );
            let p = dir.path().join(format!("tiny-mixtral-{ty}-{seed}.gguf"));
            tiny_mixtral(&llama, 4, 2).write(&p).unwrap();
            let m = Model::load(&p).unwrap();
            assert_eq!(
                (m.config().arch, m.config().moe.map(|m| m.n_expert)),
                (Arch::Llama, Some(4))
            );
            check_model(&m, 75);
            // Mistral 3: the query factor steps every 16 positions, inside chunks and between decode steps.
            let p = dir.path().join(format!("tiny-mistral3-{ty}-{seed}.gguf"));
            tiny_mistral3(&llama, 4.0, 16, Some(0.4)).write(&p).unwrap();
            let m = Model::load(&p).unwrap();
            assert_eq!(m.config().arch, Arch::Mistral3);
            assert!(m.config().attn_temp.is_some());
            check_model(&m, 75);
            check_arch(&load("gemma1", tiny_gemma1(&spec)), Arch::Gemma);
            check_arch(
                &load("gemma2", tiny_gemma2(&spec, 16, (2.0, 1.5))),
                Arch::Gemma2,
            );
        }
    }
}

/// Max |Δ| between the logits of two models over the same tokens.
fn max_diff(a: &Model, b: &Model, n: usize) -> f32 {
    let toks = tokens(n, a.config().vocab);
    let (la, lb) = (all_logits(a, &toks, 512), all_logits(b, &toks, 512));
    la.iter()
        .zip(&lb)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn qwen2_biases_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-qwen2.gguf");
    write_tiny_qwen2(&p, &TinySpec::default(), None).unwrap();
    let with = Model::load(&p).unwrap();
    // Each bias alone matters: dropping it from every layer changes the logits (and the weight bytes).
    for which in 0..3 {
        let mut without = Model::load(&p).unwrap();
        let Model::Llama(l) = &mut without else {
            panic!("qwen2 loads as a Llama-family model")
        };
        for layer in &mut l.layers {
            assert!(layer.attn.qkv_bias[which].is_some(), "bias {which} loaded");
            layer.attn.qkv_bias[which] = None;
        }
        let d = max_diff(&with, &without, 30);
        assert!(d > 1e-3, "dropping bias {which} changed nothing ({d})");
        assert!(without.weight_bytes() < with.weight_bytes());
    }
}

#[test]
fn qwen2_rope_scaling_changes_the_output_and_bad_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let load = |name: &str, scaling| {
        let p = dir.path().join(name);
        write_tiny_qwen2(&p, &spec, scaling).unwrap();
        Model::load(&p)
    };
    let plain = load("plain.gguf", None).unwrap();
    let unit = load("unit.gguf", Some(("linear", 1.0, 512))).unwrap();
    assert_eq!(max_diff(&plain, &unit, 30), 0.0, "factor 1 is no scaling");
    let linear = load("linear.gguf", Some(("linear", 4.0, 512))).unwrap();
    let yarn = load("yarn.gguf", Some(("yarn", 4.0, 4096))).unwrap();
    assert!(max_diff(&plain, &linear, 30) > 1e-3);
    assert!(max_diff(&plain, &yarn, 30) > 1e-3);
    assert!(max_diff(&linear, &yarn, 30) > 1e-3);
    let err = load("bad.gguf", Some(("longrope", 4.0, 512)))
        .err()
        .expect("an unknown scaling type is refused")
        .to_string();
    assert!(
        err.contains("qwen2.rope.scaling.type") && err.contains("longrope"),
        "{err}"
    );
}

#[test]
fn sliding_window_changes_the_output() {
    // The window must actually mask: the same weights with a window of the whole context (512, more than the 40
    // tokens run) give different late logits.
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 32,
        ..Default::default()
    };
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    write_tiny_gemma3(&a, &spec, 4).unwrap();
    write_tiny_gemma3(&b, &spec, spec.ctx_len as u32).unwrap();
    let (ma, mb) = (Model::load(&a).unwrap(), Model::load(&b).unwrap());
    let toks = tokens(40, ma.config().vocab);
    let (la, lb) = (all_logits(&ma, &toks, 512), all_logits(&mb, &toks, 512));
    let v = ma.config().vocab;
    // Before the window fills (first 4 tokens) they agree; later they differ.
    assert_close(&la[..4 * v], &lb[..4 * v], "inside the window");
    let diff = la[39 * v..]
        .iter()
        .zip(&lb[39 * v..])
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff > 1e-3, "window had no effect ({diff})");
}

#[test]
fn context_budget_is_enforced_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    let m = Model::load(&p).unwrap();
    let mut cfg = SessionConfig::for_model(&m);
    cfg.max_context = 10;
    let mut s = Session::new(&m, cfg).unwrap();
    let err = s
        .prefill(&tokens(11, m.config().vocab))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("prompt too long") && err.contains("10"),
        "{err}"
    );
    // Nothing was lost: the session is still usable.
    s.prefill(&tokens(5, m.config().vocab)).unwrap();
    assert_eq!(s.n_past(), 5);
}

#[test]
fn streaming_perplexity_with_full_cache_equals_one_shot_scoring() {
    use hayloft::engine::perplexity::{nll_of, streaming_perplexity};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    let m = Model::load(&p).unwrap();
    let toks = tokens(90, m.config().vocab);
    let logits = all_logits(&m, &toks, 64);
    let vocab = m.config().vocab;
    let mut s = Session::new(&m, SessionConfig::for_model(&m)).unwrap();
    let (nlls, buckets) = streaming_perplexity(&mut s, &toks, 7, 40, |_, _| {}).unwrap();
    assert_eq!(nlls.len(), 89);
    for t in &nlls {
        let want = nll_of(&logits[(t.pos - 1) * vocab..t.pos * vocab], toks[t.pos]);
        assert!(
            (t.nll - want).abs() < 1e-3,
            "pos {}: {} vs {want}",
            t.pos,
            t.nll
        );
    }
    assert_eq!(
        buckets.iter().map(|b| b.n).collect::<Vec<_>>(),
        vec![40, 40, 9]
    );
    assert!(streaming_perplexity(&mut s, &toks, 0, 40, |_, _| {}).is_err());
}

/// Bits of head `h`'s slice of every row of an n × n_heads·head_dim attention output.
fn head_bits(att: &[f32], nh: usize, hd: usize, h: usize) -> Vec<u32> {
    att.chunks_exact(nh * hd)
        .flat_map(|row| row[h * hd..(h + 1) * hd].iter().map(|x| x.to_bits()))
        .collect()
}

/// Head ablation zeroes exactly the marked (layer, query head): its attention output is +0.0 in every row, prefill and
/// decode, and every other head of that layer is bit-for-bit what an unmasked run computes. Observed in the scratch,
/// which holds the last layer's attention output of the last chunk after a forward pass.
fn check_head_mask(m: &Model) {
    let c = m.config();
    let (nl, nh, hd) = (c.n_layers, c.n_heads, c.head_dim_v);
    assert!(nl >= 2 && nh >= 2);
    let n = 20;
    let toks = tokens(n + 1, c.vocab);
    // (last layer's attention output over the prompt, over one decoded token, logits after it)
    let run = |mask: Vec<bool>| {
        let mut s = Session::new(m, SessionConfig::for_model(m)).unwrap();
        s.scratch.seq.head_mask = mask;
        s.prefill(&toks[..n]).unwrap();
        let pre = s.scratch.att[..n * nh * hd].to_vec();
        let logits = s.decode(toks[n]).unwrap().to_vec();
        let dec = s.scratch.att[..nh * hd].to_vec();
        (pre, dec, logits)
    };
    let base = run(Vec::new());
    for (att, what) in [(&base.0, "prefill"), (&base.1, "decode")] {
        for h in 0..nh {
            assert!(
                att.iter().all(|x| x.is_finite())
                    && head_bits(att, nh, hd, h).iter().any(|&b| b != 0),
                "{what}: unmasked head {h} has no output to mask"
            );
        }
    }
    assert_eq!(
        run(vec![false; nl * nh]),
        base,
        "an all-false mask must change nothing"
    );

    let (layer, head) = (nl - 1, 1);
    let mut mask = vec![false; nl * nh];
    mask[layer * nh + head] = true;
    let masked = run(mask);
    for (att, want, what) in [
        (&masked.0, &base.0, "prefill"),
        (&masked.1, &base.1, "decode"),
    ] {
        for h in 0..nh {
            let got = head_bits(att, nh, hd, h);
            if h == head {
                assert!(
                    got.iter().all(|&b| b == 0),
                    "{what}: masked head {h} is not exactly +0.0"
                );
            } else {
                assert_eq!(
                    got,
                    head_bits(want, nh, hd, h),
                    "{what}: unmasked head {h} of the masked layer changed"
                );
            }
        }
    }
    assert_ne!(masked.2, base.2, "masking a head must change the logits");

    // The mask acts at its own layer: the same head masked one layer down changes every head of the last layer.
    let mut mask = vec![false; nl * nh];
    mask[(layer - 1) * nh + head] = true;
    let earlier = run(mask);
    for h in 0..nh {
        assert_ne!(
            head_bits(&earlier.0, nh, hd, h),
            head_bits(&base.0, nh, hd, h),
            "masking layer {} left head {h} of layer {layer} unchanged",
            layer - 1
        );
    }
}

#[test]
fn head_mask_zeroes_exactly_the_marked_head_llama() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    check_head_mask(&Model::load(&p).unwrap());
}

#[test]
fn head_mask_zeroes_exactly_the_marked_head_qwen3() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-qwen3.gguf");
    let spec = TinySpec {
        head_dim: 24,
        ..Default::default()
    };
    tiny_qwen3(&spec).write(&p).unwrap();
    check_head_mask(&Model::load(&p).unwrap());
}

#[test]
fn head_mask_zeroes_exactly_the_marked_head_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-qwen2.gguf");
    write_tiny_qwen2(&p, &TinySpec::default(), None).unwrap();
    check_head_mask(&Model::load(&p).unwrap());
}

#[test]
fn head_mask_zeroes_exactly_the_marked_head_gemma3() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-gemma3.gguf");
    write_tiny_gemma3(&p, &TinySpec::default(), 9).unwrap();
    check_head_mask(&Model::load(&p).unwrap());
}

/// Writes a random-weight Qwen3-MoE-shaped model big enough to time (8 layers, dim 1024, 16 experts of 768, 4 per
/// token, Q8_0, 344 MB) to `$HAYLOFT_MOE_BENCH_OUT`, for `hayloft bench speed` and `llama-bench` on the same file:
/// `HAYLOFT_MOE_BENCH_OUT=/tmp/moe_bench.gguf cargo test --release --test model_tiny write_moe_bench_model --
/// --ignored`.
#[test]
#[ignore]
fn write_moe_bench_model() {
    let out =
        std::env::var("HAYLOFT_MOE_BENCH_OUT").expect("set HAYLOFT_MOE_BENCH_OUT to a file path");
    let s = TinySpec {
        n_layers: 8,
        dim: 1024,
        n_heads: 16,
        n_kv_heads: 4,
        head_dim: 64,
        ffn_dim: 768,
        ctx_len: 4096,
        weight_type: GgmlType::Q8_0,
        seed: 5,
    };
    tiny_qwen3moe(&s, 16, 4)
        .write(std::path::Path::new(&out))
        .unwrap();
}
