//! KV-compression methods: kept entries are the top-scored, budgets hold per head, freed memory is returned, chunked
//! compression bounds the peak, every method × option runs end to end, 100 % budgets change nothing, fork ≡ direct.

use hayloft::engine::{Session, SessionConfig};
use hayloft::kv::{KvCache, KvDtype};
use hayloft::methods::obs::{AttnAcc, GatherBuf, QueryWindow};
use hayloft::methods::press::Press;
use hayloft::methods::{
    duo, h2o, knorm, pyramidkv, random, snapkv, streamingllm, tova, window, HeadObs, KvSpec, Needs,
    Scorer,
};
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, TinySpec};
use hayloft::model::{Arch, Model, ModelConfig, RopeStyle};
use hayloft::testutil::Rng;

fn config(nl: usize, nh: usize, nkv: usize, hd: usize, window: Option<u32>) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        name: "test".into(),
        n_layers: nl,
        dim: nh * hd,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim_k: hd,
        head_dim_v: hd,
        ffn_dim: 8,
        vocab: 8,
        ctx_len: 4096,
        rms_eps: 1e-5,
        rope_style: RopeStyle::Norm,
        rope_dim: hd,
        rope_base: 1e4,
        rope_base_local: 1e4,
        sliding_window: window,
        layer_is_local: (0..nl).map(|l| window.is_some() && l == 0).collect(),
        attn_scale: 1.0 / (hd as f32).sqrt(),
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

fn heads_file(dir: &std::path::Path, nl: usize, nkv: usize, rng: &mut Rng) -> std::path::PathBuf {
    let scores: Vec<Vec<f64>> = (0..nl)
        .map(|_| (0..nkv).map(|_| rng.uniform().abs() as f64 * 0.3).collect())
        .collect();
    let p = dir.join(format!("heads-{nl}x{nkv}-{}.json", rng.next_u64() % 1000));
    let json = serde_json::json!({"layers": nl, "kv_heads": nkv, "scores": scores});
    std::fs::write(&p, json.to_string()).unwrap();
    p
}

/// The scorer a method's press uses, built independently of the press.
fn reference_scorer(method: &str) -> Box<dyn Scorer> {
    match method {
        "streamingllm" => Box::new(streamingllm::StreamingLlm::default()),
        "window" => Box::new(window::Window),
        "h2o" => Box::new(h2o::H2o),
        "snapkv" | "pyramidkv" | "adakv" | "kvmerger" => Box::new(snapkv::SnapKv::default()),
        "tova" => Box::new(tova::Tova),
        "knorm" => Box::new(knorm::Knorm),
        "random" => Box::new(random::Random::default()),
        "duo" => Box::new(duo::Streaming),
        m => panic!("no reference for {m}"),
    }
}

/// Positions of the `k` best entries by a full sort: score descending, ties to the later entry.
fn top_positions(scores: &[f32], pos: &[u32], k: usize) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    let mut kept: Vec<u32> = idx[..k.min(idx.len())].iter().map(|&i| pos[i]).collect();
    kept.sort();
    kept
}

fn kept_positions(cache: &KvCache, l: usize, h: usize) -> Vec<u32> {
    cache.blocks(l, h).flat_map(|b| b.pos.to_vec()).collect()
}

/// One random case: a cache with ragged heads, recorded queries, accumulated attention; compress with `method`
/// and check every head kept exactly its top-scored entries, within budget.
fn check_random_case(method: &str, rng: &mut Rng, dir: &std::path::Path) {
    let nl = 1 + rng.below(3);
    let nkv = 1 + rng.below(3);
    let group = 1 + rng.below(3);
    let hd = [4, 8, 16][rng.below(3)];
    let window = if rng.below(2) == 0 {
        Some(5 + rng.below(40) as u32)
    } else {
        None
    };
    let mc = config(nl, nkv * group, nkv, hd, window);
    let dtype = if rng.below(2) == 0 {
        KvDtype::F16
    } else {
        KvDtype::F32
    };
    let mut cache = KvCache::new(mc.kv_config(dtype, [4, 8, 16][rng.below(3)]));
    let seen = 2 + rng.below(200);
    let pos: Vec<u32> = (0..seen as u32).collect();
    for l in 0..nl {
        let k: Vec<f32> = (0..seen * nkv * hd).map(|_| rng.uniform()).collect();
        let v: Vec<f32> = (0..seen * nkv * hd).map(|_| rng.uniform()).collect();
        cache.append(l, &pos, &k, &v);
        for h in 0..nkv {
            // Earlier evictions: heads hold different subsets (the newest entry always stays).
            let drop = rng.below(4) as u64;
            let mut r = Rng(rng.next_u64() | 1);
            cache.retain(l, h, |_, p| {
                p as usize + 1 == seen || r.next_u64() % 4 >= drop
            });
        }
    }
    let w = 1 + rng.below(80.min(seen));
    let mut obs = QueryWindow::new(nl, nkv * group * hd, snapkv::WINDOW);
    for l in 0..nl {
        let q: Vec<f32> = (0..w * nkv * group * hd)
            .map(|_| rng.uniform() * 3.0)
            .collect();
        obs.record(l, &q, &pos[seen - w..]);
    }
    let mut acc = AttnAcc::new(true, nl * nkv);
    for l in 0..nl {
        for h in 0..nkv {
            acc.acc[l * nkv + h] = (0..cache.len(l, h)).map(|_| rng.uniform().abs()).collect();
        }
    }
    let budget = if rng.below(2) == 0 {
        format!("{:.3}", 0.05 + 0.9 * rng.uniform().abs())
    } else {
        format!("{}t", 1 + rng.below(seen + 10))
    };
    let mut spec_text = format!("{method}@{budget}");
    if method == "duo" {
        spec_text += &format!(",heads@{}", heads_file(dir, nl, nkv, rng).display());
    }
    let spec = KvSpec::parse(&spec_text).unwrap();
    let k = spec.budget.unwrap().keep(seen);
    let mut press = Press::new(&spec, &mc).unwrap().unwrap();
    let roles = (method == "duo").then(|| {
        duo::Roles::load(
            std::path::Path::new(spec.options.heads.as_ref().unwrap()),
            &mc,
        )
        .unwrap()
    });
    // Layers whose cache keeps only a sliding window are left alone; allocation shares the budget among the others.
    let windowed: Vec<bool> = (0..nl).map(|l| cache.window(l).is_some()).collect();
    let n_global = windowed.iter().filter(|&&w| !w).count();
    let mut duo_targets = Vec::new();
    if let Some(r) = &roles {
        let skip: Vec<bool> = (0..nl * nkv).map(|si| windowed[si / nkv]).collect();
        r.targets(k, seen, &skip, &mut duo_targets);
    }

    // Reference scores, before compression.
    let scorer = reference_scorer(method);
    let mut refs = Vec::new(); // (layer, head, scores, positions, target)
    for l in 0..nl {
        for h in 0..nkv {
            let mut g = GatherBuf::default();
            g.gather(&cache, l, h, true);
            obs.gather(
                l,
                h * group..(h + 1) * group,
                hd,
                scorer.needs().window,
                &mut g.q,
                &mut g.q_pos,
            );
            let len = g.pos.len();
            let global_index = windowed[..l].iter().filter(|&&w| !w).count();
            let target = match method {
                _ if windowed[l] => len,
                "pyramidkv" => pyramidkv::layer_keep(
                    pyramidkv::BETA,
                    global_index,
                    n_global,
                    k,
                    seen,
                    snapkv::WINDOW,
                ),
                "duo" => duo_targets[l * nkv + h],
                _ => k,
            };
            let o = HeadObs {
                layer: l,
                n_layers: nl,
                head: h,
                hk: hd,
                hv: hd,
                keys: &g.keys,
                values: &g.values,
                pos: &g.pos,
                queries: &g.q,
                q_pos: &g.q_pos,
                group,
                acc: &acc.acc[l * nkv + h],
                scale: mc.attn_scale,
                window: if mc.layer_is_local[l] { window } else { None },
                keep: target.min(len),
                seen,
            };
            let mut s = vec![0.0; len];
            scorer.score(&o, &mut Vec::new(), &mut s);
            refs.push((l, h, s, g.pos.clone(), target));
        }
    }
    let lens_before: Vec<usize> = refs.iter().map(|r| r.3.len()).collect();
    press.compress(&mut cache, &obs, &mut acc, &mc, seen);

    let mut layer_total = vec![0; nl];
    for (i, (l, h, s, p, target)) in refs.iter().enumerate() {
        let kept = kept_positions(&cache, *l, *h);
        let n = kept.len();
        layer_total[*l] += n;
        let ctx = format!(
            "{spec_text}: layer {l} head {h} len {} seen {seen}",
            lens_before[i]
        );
        if windowed[*l] {
            assert_eq!(&kept, p, "{ctx}: a sliding-window layer was compressed");
        } else if method == "adakv" {
            assert!(
                n >= ((0.2 * k as f32) as usize).min(lens_before[i]),
                "{ctx}: below the floor"
            );
        } else {
            assert_eq!(n, (*target).min(lens_before[i]), "{ctx}: count");
        }
        assert_eq!(
            kept,
            top_positions(s, p, n),
            "{ctx}: kept entries are not the top-scored"
        );
        assert_eq!(
            acc.acc[l * nkv + h].len(),
            n,
            "{ctx}: accumulator out of step"
        );
    }
    if method == "adakv" {
        for l in 0..nl {
            // One budget per layer: what its heads hold, at most nkv · k.
            let held = lens_before[l * nkv..(l + 1) * nkv].iter().sum::<usize>();
            let want = if windowed[l] { held } else { held.min(nkv * k) };
            assert_eq!(
                layer_total[l], want,
                "{spec_text}: layer {l} total, lens {lens_before:?} seen {seen} nkv {nkv}"
            );
        }
    }
    // Freed blocks were returned: the cache holds exactly the blocks its entries need.
    let bt = cache.cfg.block_tokens;
    let blocks: usize = (0..nl)
        .flat_map(|l| (0..nkv).map(move |h| (l, h)))
        .map(|(l, h)| cache.len(l, h).div_ceil(bt))
        .sum();
    assert_eq!(
        cache.bytes(),
        blocks * cache.cfg.block_bytes(),
        "{spec_text}: bytes"
    );
}

#[test]
fn every_scoring_method_keeps_exactly_its_top_scored_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for method in scoring_methods() {
        for _ in 0..40 {
            check_random_case(method, &mut rng, dir.path());
        }
    }
}

fn tiny_llama(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny-llama.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    Model::load(&p).unwrap()
}

fn tiny_gemma(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny-gemma3.gguf");
    let spec = TinySpec {
        n_layers: 6,
        n_kv_heads: 1,
        head_dim: 32,
        ..Default::default()
    };
    write_tiny_gemma3(&p, &spec, 24).unwrap();
    Model::load(&p).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11 + seed * 101) % vocab) as u32)
        .collect()
}

fn session<'m>(model: &'m Model, kv: &str, chunk: usize) -> Session<'m> {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = chunk;
    cfg.kv = KvSpec::parse(kv).unwrap();
    Session::new(model, cfg).unwrap()
}

fn all_heads(m: &Model) -> Vec<(usize, usize)> {
    let c = m.config();
    (0..c.n_layers)
        .flat_map(|l| (0..c.n_kv_heads).map(move |h| (l, h)))
        .collect()
}

#[test]
fn budgets_hold_per_head_and_bytes_fall_by_what_was_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let toks = tokens(300, m.config().vocab, 0);
    let streams = all_heads(&m).len();
    for (kv, keep) in [
        ("snapkv@40t", 40),
        ("knorm@0.25", 75),
        ("streamingllm@0.1", 30),
    ] {
        let mut s = session(&m, kv, 128);
        s.prefill(&toks).unwrap();
        let bb = s.cache.cfg.block_bytes();
        let bt = s.cache.cfg.block_tokens;
        for (l, h) in all_heads(&m) {
            assert_eq!(s.cache.len(l, h), keep, "{kv}: layer {l} head {h}");
        }
        // The peak held the whole prompt; now only the kept entries' blocks remain.
        assert_eq!(
            s.cache.peak_bytes(),
            streams * 300usize.div_ceil(bt) * bb,
            "{kv}"
        );
        assert_eq!(s.cache.bytes(), streams * keep.div_ceil(bt) * bb, "{kv}");
        assert_eq!(s.stats.kv_bytes, s.cache.bytes());
        if kv.starts_with("streamingllm") {
            let want: Vec<u32> = (0..4).chain(300 - (keep as u32 - 4)..300).collect();
            assert_eq!(kept_positions(&s.cache, 1, 1), want);
        }
    }
}

#[test]
fn chunked_compression_bounds_peak_memory() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let toks = tokens(400, m.config().vocab, 1);
    let streams = all_heads(&m).len();
    let (budget, chunk) = (48usize, 32usize);
    for method in ["streamingllm", "snapkv", "h2o", "tova", "knorm"] {
        let mut s = session(&m, &format!("{method}@{budget}t,chunked"), chunk);
        s.prefill(&toks).unwrap();
        let (bt, bb) = (s.cache.cfg.block_tokens, s.cache.cfg.block_bytes());
        let bound = streams * (budget + chunk).div_ceil(bt) * bb;
        assert!(
            s.cache.peak_bytes() <= bound,
            "{method}: peak {} > bound {bound}",
            s.cache.peak_bytes()
        );
        assert!(s.stats.peak_kv_bytes <= bound);
        // Without `chunked` the peak holds the whole prompt.
        let mut once = session(&m, &format!("{method}@{budget}t"), chunk);
        once.prefill(&toks).unwrap();
        assert_eq!(
            once.cache.peak_bytes(),
            streams * 400usize.div_ceil(bt) * bb,
            "{method}"
        );
        assert_eq!(
            once.cache.bytes(),
            s.cache.bytes(),
            "{method}: same budget, same bytes at the end"
        );
    }
}

#[test]
fn decoding_compresses_every_n_steps() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let mut s = session(&m, "snapkv@20t,every@8", 64);
    s.prefill(&tokens(100, m.config().vocab, 2)).unwrap();
    assert_eq!(s.cache.max_len(), 20);
    for i in 0..20 {
        s.decode((i * 7 % 50) as u32).unwrap();
        // Compressed after steps 8 and 16: the cache never holds more than budget + 8.
        assert_eq!(s.cache.max_len(), 20 + (i + 1) % 8, "step {i}");
    }
    let mut never = session(&m, "snapkv@20t,every@0", 64);
    never.prefill(&tokens(100, m.config().vocab, 2)).unwrap();
    for i in 0..20 {
        never.decode((i * 7 % 50) as u32).unwrap();
    }
    assert_eq!(never.cache.max_len(), 40);
}

const OPTIONS: &[&str] = &[
    "",
    ",chunked",
    ",every@3",
    ",pyramid",
    ",adakv",
    ",chunked,every@5,pyramid@4",
    ",kivi4@16",
    ",chunked,kivi2@8",
    ",think@0.25",
];

/// Methods that choose entries (every name but `full` and the storage formats, which keep everything).
fn scoring_methods() -> impl Iterator<Item = &'static str> {
    hayloft::methods::registry::evicting().map(|m| m.name)
}

fn spec_for(method: &str, budget: &str, opts: &str, heads: &std::path::Path) -> String {
    let mut s = format!("{method}@{budget}{opts}");
    if method == "duo" {
        s += &format!(",heads@{}", heads.display());
    }
    s
}

#[test]
fn every_method_with_every_option_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    for model in [tiny_llama(dir.path()), tiny_gemma(dir.path())] {
        let c = model.config();
        let heads = heads_file(dir.path(), c.n_layers, c.n_kv_heads, &mut rng);
        let toks = tokens(150, c.vocab, 3);
        for method in scoring_methods() {
            for opts in OPTIONS {
                let text = spec_for(method, "0.3", opts, &heads);
                let spec = match KvSpec::parse(&text) {
                    Ok(s) => s,
                    Err(e) => {
                        // The only refused combinations: an option the method implies or excludes (duo with
                        // allocation options, pyramidkv with pyramid, adakv with adakv).
                        let e = format!("{e:#}");
                        let row = hayloft::methods::registry::method(method).unwrap();
                        assert!(
                            row.implies
                                .iter()
                                .chain(row.excludes)
                                .any(|o| opts.contains(o)),
                            "{text}: {e}"
                        );
                        continue;
                    }
                };
                let mut cfg = SessionConfig::for_model(&model);
                cfg.chunk_size = 40;
                cfg.kv = spec;
                let mut s = Session::new(&model, cfg).unwrap();
                let mut next = s
                    .prefill(&toks)
                    .unwrap()
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i as u32)
                    .unwrap();
                let after_prefill: usize = all_heads(&model)
                    .iter()
                    .map(|&(l, h)| s.cache.len(l, h))
                    .sum();
                let streams = all_heads(&model).len();
                // Something was dropped, and the total is within the budget: 30 % of the tokens on global layers;
                // sliding-window layers (Gemma's local ones) hold their window and are not compressed.
                let allowed: usize = all_heads(&model)
                    .iter()
                    .map(|&(l, _)| match s.cache.window(l) {
                        Some(_) => s.cache.cfg.stream_len(l, 150, 40),
                        None => 45,
                    })
                    .sum();
                assert!(
                    after_prefill <= allowed + c.n_layers,
                    "{text}: {after_prefill} entries kept"
                );
                assert!(after_prefill < streams * 150, "{text}: nothing was evicted");
                for _ in 0..6 {
                    let logits = s.decode(next).unwrap();
                    assert!(logits.iter().all(|x| x.is_finite()), "{text}");
                    next = logits
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i as u32)
                        .unwrap();
                }
            }
        }
    }
}

fn run_logits(model: &Model, kv: &str, toks: &[u32], steps: usize) -> Vec<f32> {
    let mut s = session(model, kv, 32);
    let mut out = s.prefill(toks).unwrap().to_vec();
    for i in 0..steps {
        out.extend_from_slice(s.decode((i * 13 % 60) as u32).unwrap());
    }
    out
}

#[test]
fn full_budget_leaves_logits_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    for model in [tiny_llama(dir.path()), tiny_gemma(dir.path())] {
        let c = model.config();
        let heads = heads_file(dir.path(), c.n_layers, c.n_kv_heads, &mut rng);
        let toks = tokens(100, c.vocab, 4);
        let full = run_logits(&model, "full", &toks, 8);
        for method in scoring_methods() {
            for (budget, opts) in [
                ("1", ""),
                ("1", ",chunked,every@2"),
                ("100000t", ",every@1"),
            ] {
                let text = spec_for(method, budget, opts, &heads);
                let got = run_logits(&model, &text, &toks, 8);
                assert!(got == full, "{text}: logits differ from the full cache");
            }
        }
    }
}

#[test]
fn fork_equals_running_the_method_directly() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let toks = tokens(200, m.config().vocab, 5);
    let mut cfg = SessionConfig::for_model(&m);
    cfg.chunk_size = 64;
    cfg.observe = Needs {
        window: snapkv::WINDOW,
        accumulate: true,
        values: false,
    };
    let mut base = Session::new(&m, cfg.clone()).unwrap();
    base.prefill(&toks).unwrap();
    let base_bytes = base.cache.bytes();
    for kv in [
        "snapkv@0.3",
        "h2o@50t",
        "tova@0.2",
        "adakv@0.25",
        "kvmerger@0.4",
    ] {
        let spec = KvSpec::parse(kv).unwrap();
        let mut forked = base.fork(&spec).unwrap();
        let mut dcfg = cfg.clone();
        dcfg.kv = spec;
        let mut direct = Session::new(&m, dcfg).unwrap();
        direct.prefill(&toks).unwrap();
        for (l, h) in all_heads(&m) {
            assert_eq!(
                kept_positions(&forked.cache, l, h),
                kept_positions(&direct.cache, l, h),
                "{kv}"
            );
        }
        assert!(forked.cache.bytes() < base_bytes, "{kv}");
        let a = forked.decode(3).unwrap().to_vec();
        let b = direct.decode(3).unwrap().to_vec();
        assert!(a == b, "{kv}: forked and direct sessions disagree");
    }
    // The base session is untouched.
    assert_eq!(base.cache.bytes(), base_bytes);
    // A session that did not record queries cannot be forked to a method that reads them.
    let mut plain = session(&m, "full", 64);
    plain.prefill(&toks).unwrap();
    let e = format!(
        "{:#}",
        plain
            .fork(&KvSpec::parse("snapkv@0.5").unwrap())
            .err()
            .unwrap()
    );
    assert!(e.contains("observe"), "{e}");
    assert!(plain.fork(&KvSpec::parse("knorm@0.5").unwrap()).is_ok());
}

#[test]
fn accumulated_attention_does_not_depend_on_the_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let toks = tokens(120, m.config().vocab, 6);
    let acc_for = |chunk: usize| {
        let mut cfg = SessionConfig::for_model(&m);
        cfg.chunk_size = chunk;
        cfg.observe.accumulate = true;
        let mut s = Session::new(&m, cfg).unwrap();
        s.prefill(&toks).unwrap();
        s.acc.acc.clone()
    };
    let (a, b) = (acc_for(7), acc_for(120));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), 120);
        // Every query's attention sums to 1 per query head: the total is the number of (query, head) pairs.
        let total: f32 = x.iter().sum();
        assert!((total - 120.0 * 2.0).abs() < 1e-2, "{total}");
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() < 1e-3, "{p} vs {q}");
        }
    }
}

#[test]
fn bad_specs_are_clear_errors() {
    let err = |s: &str| format!("{:#}", KvSpec::parse(s).unwrap_err());
    let e = err("snapkvv@0.5");
    assert!(
        e.contains("unknown KV method 'snapkvv'") && e.contains("snapkv") && e.contains("h2o"),
        "{e}"
    );
    let e = err("snapkv@0.5,chunky");
    assert!(
        e.contains("unknown KV option 'chunky'") && e.contains("chunked"),
        "{e}"
    );
    assert!(err("snapkv").contains("needs a budget"));
    assert!(err("snapkv@0").contains("(0, 1]"));
    assert!(err("snapkv@1.5").contains("(0, 1]"));
    assert!(err("snapkv@0t").contains("at least 1"));
    assert!(err("snapkv@abc").contains("ratio like 0.25"));
    assert!(err("snapkv@0.5,every@x").contains("whole number"));
    assert!(err("snapkv@0.5,every").contains("step count"));
    assert!(err("snapkv@0.5,chunked,chunked").contains("twice"));
    assert!(err("snapkv@0.5,pyramid@0.5").contains("beta"));
    assert!(err("snapkv@0.5,adakv@2").contains("alpha"));
    assert!(err("duo@0.5").contains("heads@"));
    assert!(err("snapkv@0.5,heads@x.json").contains("only goes with duo"));
    assert!(err("full,chunked").contains("needs a compression method"));
    // Head scores that do not fit the model.
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let p = dir.path().join("h.json");
    std::fs::write(
        &p,
        r#"{"layers": 3, "kv_heads": 2, "scores": [[0,0],[0,0],[0,0]]}"#,
    )
    .unwrap();
    let mut cfg = SessionConfig::for_model(&m);
    cfg.kv = KvSpec::parse(&format!("duo@0.5,heads@{}", p.display())).unwrap();
    let e = format!("{:#}", Session::new(&m, cfg.clone()).err().unwrap());
    assert!(e.contains("3 layers") && e.contains("model has 2"), "{e}");
    std::fs::write(&p, "not json").unwrap();
    assert!(format!("{:#}", Session::new(&m, cfg.clone()).err().unwrap()).contains("expected"));
    cfg.kv = KvSpec::parse("duo@0.5,heads@/nonexistent/h.json").unwrap();
    let e = format!("{:#}", Session::new(&m, cfg).err().unwrap());
    assert!(e.contains("cannot read head scores"), "{e}");
}

#[test]
fn think_prunes_key_channels_once_and_frees_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let c = m.config();
    let toks = tokens(200, c.vocab, 5);
    let full = run_logits(&m, "full", &toks, 6);
    // Pruning no channel changes nothing.
    assert!(run_logits(&m, "think@0", &toks, 6) == full);
    let mut s = session(&m, "think@0.5", 64);
    let mut f = session(&m, "full", 64);
    let a = s.prefill(&toks).unwrap().to_vec();
    let b = f.prefill(&toks).unwrap().to_vec();
    // The prompt's logits come before the end-of-prefill compression: identical.
    assert_eq!(a, b);
    let want = c.head_dim_k - c.head_dim_k / 2;
    for (l, h) in all_heads(&m) {
        assert_eq!(s.cache.len(l, h), 200, "think keeps every entry");
        assert_eq!(s.cache.key_dims(l, h), want, "layer {l} head {h}");
    }
    assert!(
        s.cache.bytes() < f.cache.bytes(),
        "pruned keys must free memory"
    );
    // Decoding appends entries with the kept channels only; the mask is not pruned again.
    for i in 0..70 {
        s.decode((i * 7 % 50) as u32).unwrap();
    }
    for (l, h) in all_heads(&m) {
        assert_eq!(s.cache.key_dims(l, h), want);
    }
    // Composition with eviction.
    let mut e = session(&m, "snapkv@0.5,think", 64);
    e.prefill(&toks).unwrap();
    let keep_dims = c.head_dim_k - (c.head_dim_k as f64 * 0.4).floor() as usize;
    for (l, h) in all_heads(&m) {
        assert_eq!(e.cache.len(l, h), 100);
        assert_eq!(e.cache.key_dims(l, h), keep_dims);
    }
    assert!(KvSpec::parse("think@1.5").is_err());
}

#[test]
fn codec_option_restores_the_cache_through_the_kv_codec() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(dir.path());
    let c = m.config();
    let toks = tokens(200, c.vocab, 7);
    // Spelling: alone it means the full cache with the option, and it prints back as it parses.
    let spec = KvSpec::parse("codec").unwrap();
    assert_eq!(KvSpec::parse(&spec.to_string()).unwrap(), spec);
    assert!(spec.compresses());
    let mut s = session(&m, "codec", 64);
    let mut f = session(&m, "full", 64);
    // The prompt's logits come before the round trip (at the end of the prefill): identical.
    assert_eq!(
        s.prefill(&toks).unwrap().to_vec(),
        f.prefill(&toks).unwrap().to_vec()
    );
    let blob = s
        .stats
        .codec_bytes
        .expect("the round trip records its blob");
    assert!(
        blob * 2 < f.cache.bytes(),
        "codec blob {blob} B vs f16 cache {} B",
        f.cache.bytes()
    );
    for (l, h) in all_heads(&m) {
        assert_eq!(s.cache.len(l, h), 200, "the codec keeps every entry");
        assert_eq!(
            kept_positions(&s.cache, l, h),
            kept_positions(&f.cache, l, h)
        );
    }
    // The restored cache is the codec's copy of the original: the same round trip by hand gives it (up to f16
    // storage), and it is lossy (not the original).
    use hayloft::kv::codec;
    let orig = codec::KvRows::from_cache(&f.cache, 0, 200).unwrap();
    let blob2 = codec::encode(&orig, &codec::CodecConfig::default()).unwrap();
    assert_eq!(blob2.len(), blob, "the same cache encodes to the same blob");
    let want = codec::decode(&blob2).unwrap();
    let got = codec::KvRows::from_cache(&s.cache, 0, 200).unwrap();
    assert_eq!(got.pos, want.pos);
    let close = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (p - q).abs() <= 1e-3 * q.abs() + 1e-6)
    };
    assert!(close(&got.k, &want.k) && close(&got.v, &want.v));
    assert!(got.k != orig.k);
    let (a, b) = (s.decode(5).unwrap().to_vec(), f.decode(5).unwrap().to_vec());
    assert!(a != b, "a lossy codec left the logits bit-identical");
    let scale = b.iter().fold(0f32, |x, y| x.max(y.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |x, (p, q)| x.max((p - q).abs()));
    assert!(
        diff < 0.2 * scale,
        "max |Δlogit| {diff} against max |logit| {scale}"
    );
    // A fork to `codec` restores the same copy as a session that ran it directly.
    let mut base = session(&m, "full", 64);
    base.prefill(&toks).unwrap();
    let mut forked = base.fork(&spec).unwrap();
    let mut direct = session(&m, "codec", 64);
    direct.prefill(&toks).unwrap();
    assert!(forked.decode(5).unwrap() == direct.decode(5).unwrap());
    // What it refuses: a cache it cannot round-trip whole, and specs that would change it first.
    let err = |s: &str| format!("{:#}", KvSpec::parse(s).unwrap_err());
    for (bad, names) in [
        ("snapkv@0.5,codec", "snapkv"),
        ("kivi4,codec", "KIVI"),
        ("think,codec", "ThinK"),
    ] {
        let e = err(bad);
        assert!(e.contains("'codec'") && e.contains(names), "{bad}: {e}");
    }
    let g = tiny_gemma(dir.path());
    let mut cfg = SessionConfig::for_model(&g);
    cfg.kv = spec.clone();
    let e = format!("{:#}", Session::new(&g, cfg.clone()).err().unwrap());
    assert!(e.contains("--swa-full"), "{e}");
    cfg.swa_full = true;
    let mut sg = Session::new(&g, cfg).unwrap();
    sg.prefill(&tokens(80, g.config().vocab, 2)).unwrap();
    assert!(sg.stats.codec_bytes.is_some());
}
