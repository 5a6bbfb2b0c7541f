//! Decode-time selectors, every row of the registry: at a budget that covers the context they are full attention bit for
//! bit; below it they read fewer bytes and still produce finite logits; they compose with compression and KIVI
//! storage; a fork and a direct run agree; the reselection interval reuses the choice.

use hayloft::engine::{Session, SessionConfig};
use hayloft::methods::registry::{SelectorRow, SELECTORS};
use hayloft::methods::KvSpec;
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, TinySpec};
use hayloft::model::Model;

fn tiny_llama(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny-llama.gguf");
    let spec = TinySpec {
        n_layers: 8,
        ctx_len: 2048,
        ..Default::default()
    };
    write_tiny_llama(&p, &spec).unwrap();
    Model::load(&p).unwrap()
}

fn tiny_gemma(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny-gemma3.gguf");
    let spec = TinySpec {
        n_layers: 6,
        n_kv_heads: 1,
        head_dim: 32,
        ctx_len: 2048,
        ..Default::default()
    };
    write_tiny_gemma3(&p, &spec, 24).unwrap();
    Model::load(&p).unwrap()
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 200 + 3)
        .collect()
}

/// Prefill `toks`, then greedy-decode `steps` tokens; the logits of every decode step, the KV bytes read per decoded
/// token, and the session's stats line.
fn run(model: &Model, spec: &str, toks: &[u32], steps: usize) -> (Vec<Vec<f32>>, f64) {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = 64;
    cfg.kv = KvSpec::parse(spec).unwrap();
    let mut s = Session::new(model, cfg).unwrap();
    let mut last = s.prefill(toks).unwrap().to_vec();
    let mut all = Vec::new();
    for _ in 0..steps {
        let next = argmax(&last);
        last = s.decode(next).unwrap().to_vec();
        assert!(
            last.iter().all(|x| x.is_finite()),
            "{spec}: non-finite logits"
        );
        all.push(last.clone());
    }
    s.stats.finish();
    (all, s.stats.kv_read_bytes_per_token)
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

/// A selector's spec text at `budget` with `extra` options. These contexts are a few hundred tokens: a selector whose
/// default always-kept parts (sinks + recent window) would fill such budgets alone, leaving nothing to select, gets
/// small ones (sink=4, recent=16) unless `extra` sets them.
fn spec(row: &SelectorRow, budget: &str, extra: &str) -> String {
    let mut s = format!("{}@{budget}{extra}", row.name);
    if row.defaults.sink + row.defaults.recent > 64 {
        for (name, n) in [("sink", 4), ("recent", 16)] {
            if !extra.contains(&format!("{name}=")) {
                s += &format!(",{name}={n}");
            }
        }
    }
    s
}

#[test]
fn every_selector_at_a_covering_budget_is_full_attention_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for model in [tiny_llama(dir.path()), tiny_gemma(dir.path())] {
        let toks = prompt(300, 1);
        let (full, full_read) = run(&model, "full", &toks, 6);
        for row in SELECTORS {
            for budget in ["1.0", "4096t"] {
                let s = spec(row, budget, "");
                let (got, read) = run(&model, &s, &toks, 6);
                assert_eq!(got, full, "{s}: logits differ from full attention");
                assert_eq!(
                    read, full_read,
                    "{s}: bytes read differ from full attention"
                );
            }
        }
    }
}

#[test]
fn every_selector_reads_less_below_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let toks = prompt(600, 2);
    let (_, full_read) = run(&model, "full", &toks, 4);
    for row in SELECTORS {
        for extra in ["", ",dense=0", ",interval=3,sink=8"] {
            let s = spec(row, "0.125", extra);
            let (got, read) = run(&model, &s, &toks, 4);
            assert_eq!(got.len(), 4);
            assert!(
                read < 0.9 * full_read,
                "{s}: reads {read:.0} bytes per token, full attention {full_read:.0}: a selector must read less"
            );
        }
    }
}

#[test]
fn selectors_compose_with_compression_and_quantized_storage() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let toks = prompt(500, 3);
    for row in SELECTORS {
        for base in [
            "snapkv@0.5",
            "kivi4",
            "snapkv@0.5,every@2,kivi8",
            "full,think",
        ] {
            let s = format!("{base},{}", spec(row, "64t", ""));
            let parsed = KvSpec::parse(&s).unwrap();
            assert_eq!(KvSpec::parse(&parsed.to_string()).unwrap(), parsed);
            let (got, read) = run(&model, &s, &toks, 5);
            assert_eq!(got.len(), 5, "{s}");
            assert!(read > 0.0, "{s}");
        }
    }
}

#[test]
fn a_fork_selects_as_a_direct_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let toks = prompt(400, 4);
    for row in SELECTORS {
        let s = spec(row, "0.2", "");
        let (direct, _) = run(&model, &s, &toks, 5);
        let mut cfg = SessionConfig::for_model(&model);
        cfg.chunk_size = 64;
        cfg.observe.window = 512;
        let mut base = Session::new(&model, cfg).unwrap();
        base.prefill(&toks).unwrap();
        let mut f = base.fork(&KvSpec::parse(&s).unwrap()).unwrap();
        let mut last = {
            let mut c = SessionConfig::for_model(&model);
            c.chunk_size = 64;
            let mut d = Session::new(&model, c).unwrap();
            d.prefill(&toks).unwrap().to_vec()
        };
        for (i, want) in direct.iter().enumerate() {
            last = f.decode(argmax(&last)).unwrap().to_vec();
            assert_eq!(&last, want, "{s}: fork and direct run differ at step {i}");
        }
    }
}

#[test]
fn a_longer_interval_reads_fewer_summary_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let toks = prompt(900, 5);
    for row in SELECTORS {
        let (_, every) = run(&model, &spec(row, "0.1", ",interval=1"), &toks, 8);
        let (_, reuse) = run(&model, &spec(row, "0.1", ",interval=8"), &toks, 8);
        // Squeezed Attention's tiny-model index can be a handful of centroids whose reads round away; it must not read
        // more. Every other selector scores pages, chunks or keys each step and must read less.
        let strict = row.name != "squeezed";
        assert!(
            reuse < every || (!strict && reuse <= every),
            "{}: reusing the selection must read less ({reuse:.0} vs {every:.0} bytes per token)",
            row.name
        );
    }
}

/// Squeezed Attention's threshold and two-level modes need the prompt's last queries: a session runs them, and a fork
/// from a session that did not record them is refused.
#[test]
fn threshold_and_two_levels_run_in_a_session_and_a_fork_needs_the_queries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_layers: 4,
        ctx_len: 2048,
        ..Default::default()
    };
    write_tiny_llama(&path, &spec).unwrap();
    let model = Model::load(&path).unwrap();
    let toks: Vec<u32> = (0..700u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) % 200 + 3)
        .collect();
    let session = |kv: &str, window: usize| {
        let mut cfg = SessionConfig::for_model(&model);
        cfg.chunk_size = 128;
        cfg.kv = KvSpec::parse(kv).unwrap();
        cfg.observe.window = window;
        Session::new(&model, cfg).unwrap()
    };
    let decode = |s: &mut Session, first: u32| {
        let mut next = first;
        let mut all = Vec::new();
        for _ in 0..4 {
            let l = s.decode(next).unwrap().to_vec();
            assert!(l.iter().all(|x| x.is_finite()));
            next = l
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32;
            all.push(l);
        }
        s.stats.finish();
        (all, s.stats.kv_read_bytes_per_token)
    };
    let mut full = session("full", 0);
    full.prefill(&toks).unwrap();
    let (_, full_read) = decode(&mut full, 7);
    for kv in [
        "squeezed@0.25,dense=0,threshold=0.9",
        "squeezed@0.25,dense=0,levels=2",
        "squeezed@0.25,dense=0,threshold=0.8,levels=2",
    ] {
        let mut direct = session(kv, 0);
        direct.prefill(&toks).unwrap();
        let (want, read) = decode(&mut direct, 7);
        assert!(
            read < 0.9 * full_read,
            "{kv}: {read} bytes per token vs {full_read}"
        );
        // A fork must have the observation queries the thresholds come from.
        let mut base = session("full", 0);
        base.prefill(&toks).unwrap();
        assert!(base.fork(&KvSpec::parse(kv).unwrap()).is_err(), "{kv}");
        let mut base = session("full", hayloft::methods::select::squeezed::OBS_WINDOW);
        base.prefill(&toks).unwrap();
        let mut f = base.fork(&KvSpec::parse(kv).unwrap()).unwrap();
        assert_eq!(
            decode(&mut f, 7).0,
            want,
            "{kv}: fork and direct run differ"
        );
    }
}

#[test]
fn a_fork_to_a_selector_that_indexes_queries_needs_them_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let toks = prompt(300, 6);
    let mut cfg = SessionConfig::for_model(&model);
    cfg.chunk_size = 64;
    let mut base = Session::new(&model, cfg).unwrap();
    base.prefill(&toks).unwrap();
    for row in SELECTORS {
        let spec = KvSpec::parse(&spec(row, "0.2", "")).unwrap();
        let sel = spec.select.as_ref().unwrap();
        let window = (row.build)(sel, model.config()).unwrap().query_window();
        assert_eq!(
            base.fork(&spec).is_err(),
            window > 0,
            "{}: a fork from a session that recorded no queries (the selector reads {window})",
            row.name
        );
    }
}
