//! Sparse prefill through a tiny random model: every pattern at full density is dense prefill bit for bit; sparse
//! patterns compute fewer pairs; the search writes a file the run time reads.

use super::pattern::PatternFile;
use super::search::{PatternSearch, CANDIDATES};
use super::*;
use crate::kv::{KvCache, KvDtype};
use crate::model::testutil::{write_tiny_llama, TinySpec};
use crate::model::{Model, Scratch};

const CHUNK: usize = 64;

fn tiny(dir: &std::path::Path) -> Model {
    let p = dir.join("tiny.gguf");
    let spec = TinySpec {
        n_heads: 6,
        n_kv_heads: 2,
        dim: 96,
        ctx_len: 1024,
        ..TinySpec::default()
    };
    write_tiny_llama(&p, &spec).unwrap();
    Model::load(&p).unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 31 + 7) % 200 + 3).collect()
}

/// Logits of every row of the last chunk of `toks`, prefilled in chunks with `prefill` (None: dense), and the
/// [computed, dense] pair counts.
fn run(
    model: &Model,
    toks: &[u32],
    prefill: Option<Box<dyn PrefillPattern>>,
) -> (Vec<f32>, [u64; 2]) {
    let mc = model.config();
    let mut cache = KvCache::new(mc.kv_config(KvDtype::F16, 32));
    let mut s = Scratch::new(mc, CHUNK, CHUNK);
    s.seq.prefill = prefill;
    let mut last = 0..0;
    for (c, chunk) in toks.chunks(CHUNK).enumerate() {
        let pos: Vec<u32> = (c * CHUNK..c * CHUNK + chunk.len())
            .map(|p| p as u32)
            .collect();
        model.forward(chunk, &pos, &mut cache, &mut s);
        last = 0..chunk.len();
    }
    model.logits(&mut s, last.clone());
    (
        s.logits[..last.len() * mc.vocab].to_vec(),
        s.seq.prefill_pairs,
    )
}

fn every(model: &Model, p: HeadPattern, min_len: usize) -> Box<dyn PrefillPattern> {
    let mc = model.config();
    Box::new(minference::MInference::with_patterns(
        vec![vec![p; mc.n_heads]; mc.n_layers],
        Scope { from: 0, min_len },
        mc,
    ))
}

#[test]
fn every_pattern_at_full_density_is_dense_prefill_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let toks = tokens(300);
    let (dense, _) = run(&model, &toks, None);
    for p in [
        HeadPattern::VerticalSlash {
            vertical: 4096,
            slash: 4096,
        },
        HeadPattern::BlockSparse { top_k: 1000 },
        HeadPattern::AShape {
            init: 4096,
            local: 1,
        },
        HeadPattern::AShape {
            init: 1,
            local: 4096,
        },
    ] {
        let (got, pairs) = run(&model, &toks, Some(every(&model, p, 0)));
        assert!(got == dense, "{p:?} at full density differs from dense");
        assert_eq!(pairs[0], pairs[1], "{p:?}");
        assert!(pairs[1] > 0);
    }
    // Sparse patterns compute fewer pairs and change the logits.
    for p in [
        HeadPattern::VerticalSlash {
            vertical: 30,
            slash: 50,
        },
        HeadPattern::BlockSparse { top_k: 1 },
        HeadPattern::AShape { init: 4, local: 64 },
    ] {
        let (got, pairs) = run(&model, &toks, Some(every(&model, p, 0)));
        assert!(pairs[0] < pairs[1], "{p:?}: {pairs:?}");
        assert!(got != dense, "{p:?}");
        assert!(got.iter().all(|x| x.is_finite()));
    }
    // Chunks under min= stay dense.
    let (got, pairs) = run(
        &model,
        &toks,
        Some(every(
            &model,
            HeadPattern::AShape { init: 4, local: 8 },
            10_000,
        )),
    );
    assert!(got == dense && pairs[0] == pairs[1]);
}

#[test]
fn streaming_heads_read_a_window_and_retrieval_heads_stay_dense() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let mc = model.config();
    let toks = tokens(300);
    let (dense, _) = run(&model, &toks, None);
    let heads = dir.path().join("heads.json");
    let write = |score: f64| {
        let rows = vec![vec![score; mc.n_kv_heads]; mc.n_layers];
        let j =
            serde_json::json!({"layers": mc.n_layers, "kv_heads": mc.n_kv_heads, "scores": rows});
        std::fs::write(&heads, j.to_string()).unwrap();
    };
    let build = |sink: usize, local: usize| {
        let spec = StreamingSpec {
            heads: heads.clone(),
            sink,
            local,
            scope: Scope {
                from: 0,
                min_len: 0,
            },
        };
        PrefillSpec::Streaming(spec).build(mc).unwrap()
    };
    write(1.0); // every head a retrieval head
    let (got, pairs) = run(&model, &toks, build(4, 16));
    assert!(got == dense && pairs[0] == pairs[1]);
    write(0.0); // every head streaming
    let (got, pairs) = run(&model, &toks, build(4096, 1));
    assert!(got == dense, "a sink covering everything is dense");
    assert_eq!(pairs[0], pairs[1]);
    let (got, pairs) = run(&model, &toks, build(4, 16));
    assert!(got != dense && pairs[0] < pairs[1] / 3, "{pairs:?}");
    // A heads file for another model is a clear error.
    std::fs::write(&heads, r#"{"layers": 7, "kv_heads": 2, "scores": []}"#).unwrap();
    let spec = StreamingSpec {
        heads: heads.clone(),
        sink: 4,
        local: 4,
        scope: Scope::default(),
    };
    let e = format!(
        "{:#}",
        PrefillSpec::Streaming(spec).build(mc).err().unwrap()
    );
    assert!(e.contains("7 layers"), "{e}");
}

#[test]
fn the_search_writes_a_file_the_run_time_reads() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let mc = model.config();
    let toks = tokens(300);
    let search = std::sync::Arc::new(std::sync::Mutex::new(PatternSearch::new(mc, 100)));
    let (dense, _) = run(
        &model,
        &toks,
        Some(Box::new(search::Shared(search.clone()))),
    );
    let (plain, _) = run(&model, &toks, None);
    assert!(dense == plain, "the search only watches");
    let file = search
        .lock()
        .unwrap()
        .finish(&mc.name, "test", toks.len(), None);
    // A recall floor of 0 takes each head's cheapest candidate; a floor above 1 falls back to the highest recall.
    let cheap = search
        .lock()
        .unwrap()
        .finish(&mc.name, "test", toks.len(), Some(0.0));
    let cheapest = CANDIDATES
        .iter()
        .min_by_key(|c| c.cost(toks.len()))
        .unwrap()
        .written();
    // (Heads no row was scored on keep the default with recall 0.)
    assert!(cheap
        .heads
        .iter()
        .flatten()
        .all(|e| e.pattern == cheapest || (e.recall == 0.0 && e.pattern == pattern::DEFAULT)));
    assert!(cheap.heads.iter().flatten().any(|e| e.pattern == cheapest));
    let unreachable = search
        .lock()
        .unwrap()
        .finish(&mc.name, "test", toks.len(), Some(2.0));
    assert_eq!(unreachable.heads, file.heads);
    assert_eq!(file.heads.len(), mc.n_layers);
    for e in file.heads.iter().flatten() {
        assert!(e.recall > 0.0 && e.recall <= 1.0, "{e:?}");
    }
    let path = dir.path().join("p.json");
    std::fs::write(&path, file.to_json()).unwrap();
    let back = PatternFile::load(&path, mc).unwrap();
    for (a, b) in back.heads.iter().flatten().zip(file.heads.iter().flatten()) {
        assert_eq!(a.pattern, b.pattern);
        assert!((a.recall - b.recall).abs() < 1e-9);
    }
    let spec = PrefillSpec::parse(&format!("minference@{},min=0", path.display())).unwrap();
    let (got, pairs) = run(&model, &toks, spec.build(mc).unwrap());
    assert!(got.iter().all(|x| x.is_finite()) && pairs[0] <= pairs[1]);
    // A file for another shape, or a broken one, is a clear error.
    std::fs::write(
        &path,
        file.to_json().replacen("\"layers\": 2", "\"layers\": 3", 1),
    )
    .unwrap();
    let e = format!("{:#}", spec.build(mc).err().unwrap());
    assert!(e.contains("rows of") || e.contains("layers"), "{e}");
    std::fs::write(&path, "[1, 2]").unwrap();
    let e = format!("{:#}", spec.build(mc).err().unwrap());
    assert!(e.contains("not a pattern file"), "{e}");
}
