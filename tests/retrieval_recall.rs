//! How well RetrievalAttention's graph finds what a real decode query attends to (an ignored harness, not a test of
//! a result): SmolLM2 reads a NIAH prompt with the full cache, a recording selector keeps every layer's keys, the
//! prompt's queries and the decode queries, and each graph built from them is searched as the `retrieval` selector
//! searches it, against the exact top keys of the same queries.
//!
//! `cargo test --release --test retrieval_recall -- --ignored --nocapture` (environment: HL_MODEL, default
//! smollm2-135m; HL_LEN tokens, default 4000; HL_DEPTHS, default "0,25,50"; HL_STEPS decode steps, default 12;
//! HL_SHARE budget, default 0.125). Layers from the third on that are not sliding-window layers are measured.
//! Per build it prints the mean over (layer ≥ 2, KV head, decode step) of: recall of the budget's exact top keys,
//! recall of the exact top 16, the share of the exact top keys' attention mass the chosen keys hold, and the share
//! of the middle's keys the search touched.

mod common;

use std::sync::{Arc, Mutex};

use hayloft::attention::Selection;
use hayloft::engine::sampler::argmax;
use hayloft::engine::{Session, SessionConfig};
use hayloft::eval::haystack::Haystacks;
use hayloft::eval::niah::{self, NiahParams};
use hayloft::eval::{Mode, Prompter};
use hayloft::gguf::GgufFile;
use hayloft::kv::KvCache;
use hayloft::methods::select::retrieval::{
    default_queue, static_set, Graph, Index, KeyCopy, Params, Retrieve,
};
use hayloft::methods::select::Middle;
use hayloft::model::{Model, QueryWindow, SelectCx, Selector};
use hayloft::tokenizer::{ChatTemplate, Tokenizer};

/// What one prompt leaves: per (layer, KV head) the keys; per layer every prompt query row and each decode step's
/// query row (all query heads).
#[derive(Default)]
struct Recorded {
    keys: Vec<Vec<f32>>,
    prompt_q: Vec<Vec<f32>>,
    decode_q: Vec<Vec<Vec<f32>>>,
}

struct Recorder(Arc<Mutex<Recorded>>, usize);

impl Selector for Recorder {
    fn select(&mut self, cx: &SelectCx, _out: &mut Selection) -> bool {
        if cx.pos.len() == 1 {
            let mut r = self.0.lock().unwrap();
            if r.decode_q.len() <= cx.layer {
                r.decode_q.resize(cx.layer + 1, Vec::new());
            }
            r.decode_q[cx.layer].push(cx.q.to_vec());
        }
        false
    }

    fn query_window(&self) -> usize {
        self.1
    }

    fn end_prefill(&mut self, cache: &KvCache, obs: &QueryWindow) {
        let mut r = self.0.lock().unwrap();
        let (nl, nh, hk) = (
            cache.cfg.n_layers,
            cache.cfg.n_kv_heads,
            cache.cfg.head_dim_k,
        );
        r.keys.clear();
        r.prompt_q.clear();
        for l in 0..nl {
            for h in 0..nh {
                let mut keys = vec![0.0f32; cache.len(l, h) * hk];
                let mut at = 0;
                for b in cache.blocks(l, h) {
                    for j in 0..b.n {
                        b.read_key(j, &mut keys[at * hk..][..hk]);
                        at += 1;
                    }
                }
                r.keys.push(keys);
            }
            let (mut q, mut pos) = (Vec::new(), Vec::new());
            let nq = obs.row() / hk;
            obs.gather(l, 0..nq, hk, usize::MAX, &mut q, &mut pos);
            r.prompt_q.push(q);
        }
    }
}

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A way to pick the build queries from the prompt's rows (oldest first, `g` heads of `hk` each per row).
type Pick = fn(rows: usize) -> Vec<usize>;

/// The selector's: the last 512 rows, every 4th, newest first.
fn last_window(rows: usize) -> Vec<usize> {
    (rows.saturating_sub(512)..rows).rev().step_by(4).collect()
}

/// 128 rows spread evenly over the whole prompt, newest first.
fn whole_prompt(rows: usize) -> Vec<usize> {
    let stride = rows.div_ceil(128).max(1);
    (0..rows).rev().step_by(stride).collect()
}

/// The selector's rows and 128 more spread over the rest of the prompt.
fn last_and_whole(rows: usize) -> Vec<usize> {
    let mut v = last_window(rows);
    let rest = rows.saturating_sub(512);
    let stride = rest.div_ceil(128).max(1);
    v.extend((0..rest).rev().step_by(stride));
    v
}

/// Every one of the last 512 rows.
fn last_all(rows: usize) -> Vec<usize> {
    (rows.saturating_sub(512)..rows).rev().collect()
}

#[derive(Default, Clone)]
struct Sums {
    masses: Vec<f64>,
    recall: f64,
    top16: f64,
    mass: f64,
    touched: f64,
    n: usize,
    build_ms: f64,
}

#[test]
#[ignore]
fn graph_recall_on_a_niah_prompt() {
    let name = std::env::var("HL_MODEL").unwrap_or_else(|_| "smollm2-135m".into());
    let path = common::model(&name);
    common::essays();
    let gguf = GgufFile::open(&path).unwrap();
    let model = Model::from_gguf(&gguf).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let tpl = ChatTemplate::from_gguf(&gguf).map_err(|e| format!("{e:#}"));
    let prompter = Prompter::new(&tok, tpl.as_ref().map_err(|e| e.clone()), false);
    let mc = model.config().clone();
    let (nl, nh, nq, hk) = (mc.n_layers, mc.n_kv_heads, mc.n_heads, mc.head_dim_k);
    let g = nq / nh;
    let len: usize = env("HL_LEN", 4000);
    let steps: usize = env("HL_STEPS", 12);
    let share: f64 = env("HL_SHARE", 0.125);
    let depths: Vec<f64> = std::env::var("HL_DEPTHS")
        .unwrap_or_else(|_| "0,25,50".into())
        .split(',')
        .map(|d| d.parse().unwrap())
        .collect();
    let p0 = Params::default();
    // (name, build rows, graph parameters, queue: 0 = the selector's default)
    let builds: Vec<(&str, Pick, Params, usize)> = vec![
        ("current (last 512, stride 4)", last_window, p0, 0),
        ("queue 256", last_window, p0, 256),
        ("queue 512", last_window, p0, 512),
        ("whole prompt 128 rows", whole_prompt, p0, 0),
        ("last 512/4 + whole 128", last_and_whole, p0, 0),
        ("last 512 every row", last_all, p0, 0),
        ("pivots 16", last_window, Params { pivots: 16, ..p0 }, 0),
        ("degree 48", last_window, Params { degree: 48, ..p0 }, 0),
        (
            "pivots 16, queue 256",
            last_window,
            Params { pivots: 16, ..p0 },
            256,
        ),
        (
            "last+whole, pivots 16, q 256",
            last_and_whole,
            Params { pivots: 16, ..p0 },
            256,
        ),
    ];
    let mut sums = vec![Sums::default(); builds.len()];
    let mut hays = Haystacks::new(None);
    for &depth in &depths {
        let case = niah::case(
            &prompter,
            &mut hays,
            &NiahParams::default(),
            len,
            depth,
            0,
            1,
        )
        .unwrap();
        let text = prompter
            .render(&case.conv, 0, &[], Mode::MultiTurn)
            .unwrap();
        let toks = prompter.encode(&text, true).unwrap();
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let mut s = Session::new(&model, SessionConfig::for_model(&model)).unwrap();
        s.scratch.seq.obs = QueryWindow::new(nl, nq * hk, toks.len());
        s.scratch.seq.selector = Some(Box::new(Recorder(rec.clone(), toks.len())));
        let mut next = argmax(s.prefill(&toks).unwrap());
        let mut out = vec![next];
        for _ in 1..steps {
            next = argmax(s.decode(next).unwrap());
            out.push(next);
        }
        drop(s);
        eprintln!(
            "depth {depth}: {} prompt tokens, answer {:?} (expected {:?})",
            toks.len(),
            tok.decode(&out),
            case.conv.turns[0].refs
        );
        let r = rec.lock().unwrap();
        for (bi, (_, pick, params, queue)) in builds.iter().enumerate() {
            let mut local = Sums::default();
            for l in (2..nl).filter(|&l| !mc.layer_is_local.get(l).copied().unwrap_or(false)) {
                let rows_q = &r.prompt_q[l];
                let rows = rows_q.len() / (nq * hk);
                for h in 0..nh {
                    let keys = &r.keys[l * nh + h];
                    let n = keys.len() / hk;
                    let b = ((n as f64) * share).round() as usize;
                    let (sink, recent) = static_set(b);
                    let (lo, hi) = (sink, n - recent);
                    let k = b - sink - recent;
                    let picked = pick(rows);
                    let queries: Vec<f32> = picked
                        .iter()
                        .flat_map(|&row| {
                            rows_q[(row * nq + h * g) * hk..(row * nq + (h + 1) * g) * hk]
                                .iter()
                                .copied()
                        })
                        .collect();
                    let tb = std::time::Instant::now();
                    let graph = Graph::build(
                        keys,
                        hk,
                        &queries,
                        lo..hi,
                        Params {
                            seed_queries: g,
                            ..*params
                        },
                    );
                    local.build_ms += tb.elapsed().as_secs_f64() * 1e3;
                    let ix = Index {
                        keys: KeyCopy::new(keys, hk),
                        graph: Some(graph),
                    };
                    let mut rt = Retrieve::default();
                    for step in r.decode_q[l].iter().take(steps) {
                        let qs = &step[h * g * hk..(h + 1) * g * hk];
                        let score = |i: usize| {
                            qs.chunks_exact(hk)
                                .map(|q| dot(q, &keys[i * hk..][..hk]))
                                .fold(f32::NEG_INFINITY, f32::max)
                        };
                        let mut exact: Vec<(f32, usize)> =
                            (lo..hi).map(|i| (score(i), i)).collect();
                        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
                        let mid = Middle { lo, hi, k };
                        let queue = if *queue > 0 { *queue } else { default_queue(n) };
                        rt.run(Some(&ix), queue, qs, hk, mid, &mut |key, o| {
                            ix.keys.read_key(key, o)
                        });
                        let mut chosen = vec![false; n];
                        for &c in &rt.chosen {
                            chosen[c as usize] = true;
                        }
                        let hit = |m: usize| {
                            exact[..m].iter().filter(|e| chosen[e.1]).count() as f64 / m as f64
                        };
                        // Attention mass (softmax over the middle, max-over-heads scores scaled as attention is).
                        let scale = 1.0 / (hk as f32).sqrt();
                        let top = exact[0].0;
                        let w = |s: f32| ((s - top) * scale).exp() as f64;
                        let exact_mass: f64 = exact[..k].iter().map(|e| w(e.0)).sum();
                        let got: f64 = exact.iter().filter(|e| chosen[e.1]).map(|e| w(e.0)).sum();
                        local.recall += hit(k);
                        local.top16 += hit(16.min(k));
                        local.mass += got / exact_mass;
                        local.masses.push(got / exact_mass);
                        local.touched += rt.touch.touched.len() as f64 / (hi - lo) as f64;
                        local.n += 1;
                    }
                }
            }
            let sm = &mut sums[bi];
            sm.recall += local.recall;
            sm.top16 += local.top16;
            sm.mass += local.mass;
            sm.touched += local.touched;
            sm.n += local.n;
            sm.build_ms += local.build_ms;
            sm.masses.extend_from_slice(&local.masses);
            report(builds[bi].0, &local, &format!("depth {depth}"));
        }
    }
    for (bi, b) in builds.iter().enumerate() {
        report(b.0, &sums[bi], "all depths");
    }
}

fn report(name: &str, s: &Sums, what: &str) {
    let n = s.n.max(1) as f64;
    let mut m = s.masses.clone();
    m.sort_by(f64::total_cmp);
    let pct = |p: f64| m.get((p * m.len() as f64) as usize).copied().unwrap_or(0.0);
    eprintln!(
        "{what:>12} | {name:<30} | recall {:.3} | top-16 {:.3} | mass {:.3} (p1 {:.2}, p10 {:.2}) | touched {:.3} | build {:.0} ms",
        s.recall / n,
        s.top16 / n,
        s.mass / n,
        pct(0.01),
        pct(0.10),
        s.touched / n,
        s.build_ms
    );
}
