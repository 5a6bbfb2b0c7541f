//! Quantized (KIVI) and channel-pruned (ThinK) KV storage, end to end on tiny random models: logits stay close to the
//! f16 cache's, closer with more bits, and the cache really holds fewer bytes.

use hayloft::engine::{Session, SessionConfig};
use hayloft::kv::KvDtype;
use hayloft::methods::KvSpec;
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, TinySpec};
use hayloft::model::Model;

const N: usize = 160;

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Logits of every token (prefill in chunks of 48) and the cache's bytes at the end.
fn run(model: &Model, dtype: KvDtype, kv: &str) -> (Vec<f32>, usize) {
    let mut cfg = SessionConfig::for_model(model);
    cfg.chunk_size = 48;
    cfg.kv_dtype = dtype;
    cfg.kv = KvSpec::parse(kv).unwrap();
    let mut s = Session::new(model, cfg).unwrap();
    let vocab = model.config().vocab;
    let toks = tokens(N, vocab);
    let mut out = vec![0.0; N * vocab];
    s.feed(&toks, 0..N, |i, l| {
        out[i * vocab..(i + 1) * vocab].copy_from_slice(l)
    })
    .unwrap();
    s.cache.trim();
    (out, s.cache.bytes())
}

/// Max |Δ| relative to the f16 logits' max magnitude.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Random-weight models are sensitive: f16 rounding of the cache alone moves their logits by a few percent. Each bit
/// width's error is measured in units of that (f16 vs f32) error: q8 must be of the same order, q4 and q2 bounded.
fn check(model: &Model, what: &str) {
    let (base, base_bytes) = run(model, KvDtype::F16, "full");
    let (f32_out, _) = run(model, KvDtype::F32, "full");
    let unit = rel_err(&f32_out, &base);
    assert!(unit > 0.0);
    let mut last = 0.0;
    for (bits, bound) in [(8u8, 2.0f32), (4, 12.0), (2, 40.0)] {
        let dtype = KvDtype::Kivi { bits, residual: 16 };
        let (out, bytes) = run(model, dtype, "full");
        let e = rel_err(&base, &out);
        eprintln!(
            "{what} q{bits}: max |Δlogit| / max |logit| = {e:.5} ({:.2} × f16-vs-f32's {unit:.5}), KV bytes {bytes} vs f16 {base_bytes}",
            e / unit
        );
        assert!(
            e <= bound * unit,
            "{what} q{bits}: relative logit error {e} > {bound} × {unit}"
        );
        assert!(
            e > last,
            "{what} q{bits}: error {e} not above the {last} of more bits"
        );
        assert!(
            bytes < base_bytes,
            "{what} q{bits}: {bytes} bytes vs f16 {base_bytes}"
        );
        last = e;
        // The same storage chosen by name through the spec gives the same logits, bit for bit.
        let (by_spec, _) = run(model, KvDtype::F16, &format!("kivi{bits}@16"));
        assert_eq!(
            by_spec, out,
            "{what}: --kv kivi{bits}@16 differs from --kv-dtype q{bits}"
        );
    }
}

#[test]
fn llama_logits_stay_close_to_f16_with_quantized_kv() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    check(&Model::load(&p).unwrap(), "llama");
}

#[test]
fn gemma3_logits_stay_close_to_f16_with_quantized_kv() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny-gemma3.gguf");
    let spec = TinySpec {
        n_layers: 3,
        n_kv_heads: 1,
        head_dim: 64,
        ..Default::default()
    };
    write_tiny_gemma3(&p, &spec, 40).unwrap();
    check(&Model::load(&p).unwrap(), "gemma3");
}

#[test]
fn pruning_every_head_to_all_channels_changes_nothing_and_fewer_channels_frees_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    let m = Model::load(&p).unwrap();
    let c = m.config();
    let vocab = c.vocab;
    let toks = tokens(N, vocab);
    let mut logits = Vec::new();
    let mut bytes = Vec::new();
    for n_keep in [16usize, 10] {
        let mut s = Session::new(&m, SessionConfig::for_model(&m)).unwrap();
        s.feed(&toks[..100], 0..0, |_, _| {}).unwrap();
        let keep: Vec<bool> = (0..16).map(|ch| ch < n_keep).collect();
        for layer in 0..c.n_layers {
            for h in 0..c.n_kv_heads {
                s.cache.prune_key_channels(layer, h, &keep);
            }
        }
        let mut last = vec![0.0; (N - 100) * vocab];
        s.feed(&toks[100..], 0..N - 100, |i, l| {
            last[i * vocab..(i + 1) * vocab].copy_from_slice(l)
        })
        .unwrap();
        s.cache.trim();
        bytes.push(s.cache.bytes());
        logits.push(last);
    }
    let (full, _) = {
        let mut s = Session::new(&m, SessionConfig::for_model(&m)).unwrap();
        let mut out = vec![0.0; N * vocab];
        s.feed(&toks, 0..N, |i, l| {
            out[i * vocab..(i + 1) * vocab].copy_from_slice(l)
        })
        .unwrap();
        (out, ())
    };
    // Keeping all 16 channels is the full cache; keeping 10 is not, and frees 6 channels × 2 bytes per entry.
    assert_eq!(logits[0], full[100 * vocab..]);
    assert!(rel_err(&logits[0], &logits[1]) > 1e-3);
    assert_eq!(
        bytes[0] - bytes[1],
        c.n_layers * c.n_kv_heads * N.div_ceil(32) * 32 * 6 * 2
    );
}
