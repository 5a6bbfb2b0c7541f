//! Continuous batching (engine::batch): sessions advanced together in one forward pass end up exactly where each
//! would be run alone — the same logits bit for bit, step after step — whatever their lengths, KV methods
//! (compression during decode, quantized storage, accumulated attention, a decode-time selector), head masks, and
//! whether some rows are prompt pieces while others decode. Tiny random-weight Llama, Qwen2 and Gemma 3 (sliding
//! window) models.

use hayloft::engine::{Batch, Input, Session, SessionConfig};
use hayloft::gguf::GgmlType;
use hayloft::methods::KvSpec;
use hayloft::model::testutil::{write_tiny_gemma3, write_tiny_llama, write_tiny_qwen2, TinySpec};
use hayloft::model::Model;

/// One sequence of a test: its KV spec, prompt length, and whether a query head is masked.
struct Seq {
    spec: &'static str,
    prompt: usize,
    mask: bool,
}

const SEQS: [Seq; 6] = [
    Seq {
        spec: "full",
        prompt: 70,
        mask: false,
    },
    Seq {
        spec: "snapkv@0.5,every@4",
        prompt: 45,
        mask: false,
    },
    Seq {
        spec: "kivi4",
        prompt: 90,
        mask: false,
    },
    Seq {
        spec: "quest@32t,dense=1",
        prompt: 100,
        mask: false,
    },
    Seq {
        spec: "h2o@0.5,every@3",
        prompt: 33,
        mask: false,
    },
    Seq {
        spec: "full",
        prompt: 9,
        mask: true,
    },
];

const STEPS: usize = 12;

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 101 + 11) % vocab) as u32)
        .collect()
}

fn session<'m>(model: &'m Model, q: &Seq, chunk: usize) -> Session<'m> {
    let mut cfg = SessionConfig::for_model(model);
    cfg.kv = KvSpec::parse(q.spec).unwrap();
    cfg.chunk_size = chunk;
    if q.mask {
        let c = model.config();
        cfg.head_mask = vec![false; c.n_layers * c.n_heads];
        cfg.head_mask[1] = true;
    }
    Session::new(model, cfg).unwrap()
}

/// Logits after the prompt and after each decode token, the sequence run alone.
fn alone(model: &Model, q: &Seq, salt: usize, chunk: usize) -> Vec<Vec<f32>> {
    let vocab = model.config().vocab;
    let mut s = session(model, q, chunk);
    let mut out = vec![s.prefill(&tokens(q.prompt, salt, vocab)).unwrap().to_vec()];
    for &t in &tokens(STEPS, salt + 50, vocab) {
        out.push(s.decode(t).unwrap().to_vec());
    }
    out
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert!(
        want.iter().any(|v| v.abs() > 0.1),
        "{what}: degenerate logits"
    );
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        got == want,
        "{what}: batched logits differ from the sequence alone (max |Δ| {err})"
    );
}

/// Prefills each sequence alone, then decodes all of them in batched steps; every step's logits equal the
/// sequence's own run.
fn check_decode(model: &Model, seqs: &[Seq]) {
    let vocab = model.config().vocab;
    let want: Vec<_> = seqs
        .iter()
        .enumerate()
        .map(|(i, q)| alone(model, q, i, 32))
        .collect();
    let mut sessions: Vec<Session> = seqs.iter().map(|q| session(model, q, 32)).collect();
    for (i, (s, q)) in sessions.iter_mut().zip(seqs).enumerate() {
        let first = s.prefill(&tokens(q.prompt, i, vocab)).unwrap();
        assert_same(first, &want[i][0], "prefill");
    }
    let dec: Vec<Vec<u32>> = (0..seqs.len())
        .map(|i| tokens(STEPS, i + 50, vocab))
        .collect();
    let mut batch = Batch::new(model, 2, 2);
    for step in 0..STEPS {
        let inputs: Vec<Input> = dec.iter().map(|d| Input::Decode(d[step])).collect();
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        batch.step(&mut refs, &inputs).unwrap();
        for (i, q) in seqs.iter().enumerate() {
            let got = batch.logits(i).unwrap();
            assert_same(got, &want[i][step + 1], &format!("{} step {step}", q.spec));
        }
    }
    for (s, q) in sessions.iter().zip(seqs) {
        assert_eq!(s.n_past(), q.prompt + STEPS);
        assert_eq!(s.stats.decode_steps, STEPS);
    }
}

fn tiny(dir: &tempfile::TempDir, arch: &str) -> Model {
    let p = dir.path().join(format!("tiny-{arch}.gguf"));
    // 4 layers: the selector leaves the first two dense.
    let spec = TinySpec {
        n_layers: 4,
        weight_type: GgmlType::Q8_0,
        ..Default::default()
    };
    match arch {
        "llama" => write_tiny_llama(&p, &spec).unwrap(),
        "qwen2" => write_tiny_qwen2(&p, &spec, None).unwrap(),
        _ => write_tiny_gemma3(
            &p,
            &TinySpec {
                n_layers: 6,
                n_kv_heads: 1,
                head_dim: 32,
                ..spec
            },
            9,
        )
        .unwrap(),
    }
    Model::load(&p).unwrap()
}

#[test]
fn batched_decode_equals_each_sequence_alone_llama() {
    let dir = tempfile::tempdir().unwrap();
    check_decode(&tiny(&dir, "llama"), &SEQS);
}

#[test]
fn batched_decode_equals_each_sequence_alone_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    check_decode(&tiny(&dir, "qwen2"), &SEQS);
}

#[test]
fn batched_decode_equals_each_sequence_alone_gemma3_sliding_window() {
    let dir = tempfile::tempdir().unwrap();
    check_decode(&tiny(&dir, "gemma3"), &SEQS);
}

#[test]
fn batched_decode_equals_alone_for_f32_and_f16_weights() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::F32, GgmlType::F16] {
        let p = dir.path().join(format!("tiny-{ty}.gguf"));
        let spec = TinySpec {
            weight_type: ty,
            ..Default::default()
        };
        write_tiny_llama(&p, &spec).unwrap();
        check_decode(&Model::load(&p).unwrap(), &SEQS[..4]);
    }
}

#[test]
fn batch_of_one_equals_session_decode_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir, "llama");
    let vocab = model.config().vocab;
    let q = &SEQS[1];
    let (mut a, mut b) = (session(&model, q, 32), session(&model, q, 32));
    let prompt = tokens(q.prompt, 0, vocab);
    a.prefill(&prompt).unwrap();
    b.prefill(&prompt).unwrap();
    let mut batch = Batch::default();
    for &t in &tokens(STEPS, 3, vocab) {
        let want = a.decode(t).unwrap().to_vec();
        batch.step(&mut [&mut b], &[Input::Decode(t)]).unwrap();
        assert_same(batch.logits(0).unwrap(), &want, "batch of one");
    }
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.cache.bytes(), b.cache.bytes());
    assert_eq!(a.stats.decode_steps, b.stats.decode_steps);
}

/// One session's prompt goes in 16-token pieces while the others decode, all in the same steps; its logits after
/// the last piece, and every later step, equal a prefill with 16-token chunks.
fn check_mixed(model: &Model) {
    let vocab = model.config().vocab;
    let seqs = [&SEQS[0], &SEQS[3], &SEQS[4]];
    // Session 0 (snapkv, chunked: compresses after every piece) arrives while the others decode.
    let newcomer = Seq {
        spec: "snapkv@0.5,chunked",
        prompt: 57,
        mask: false,
    };
    let want_new = alone(model, &newcomer, 9, 16);
    let want: Vec<_> = seqs
        .iter()
        .enumerate()
        .map(|(i, q)| alone(model, q, i, 32))
        .collect();
    let mut olds: Vec<Session> = seqs.iter().map(|q| session(model, q, 32)).collect();
    for (i, (s, q)) in olds.iter_mut().zip(seqs).enumerate() {
        s.prefill(&tokens(q.prompt, i, vocab)).unwrap();
    }
    let mut new = session(model, &newcomer, 16);
    let prompt = tokens(newcomer.prompt, 9, vocab);
    let pieces: Vec<&[u32]> = prompt.chunks(16).collect();
    let dec: Vec<Vec<u32>> = (0..seqs.len())
        .map(|i| tokens(STEPS, i + 50, vocab))
        .collect();
    let dec_new = tokens(STEPS, 59, vocab);
    let mut batch = Batch::default();
    let mut new_step = 0;
    for step in 0..STEPS {
        let mut inputs: Vec<Input> = dec.iter().map(|d| Input::Decode(d[step])).collect();
        let prompt_piece = step < pieces.len();
        inputs.push(if prompt_piece {
            Input::Prompt {
                tokens: pieces[step],
                last: step + 1 == pieces.len(),
            }
        } else {
            new_step += 1;
            Input::Decode(dec_new[new_step - 1])
        });
        let mut refs: Vec<&mut Session> = olds.iter_mut().collect();
        refs.push(&mut new);
        batch.step(&mut refs, &inputs).unwrap();
        for (i, w) in want.iter().enumerate() {
            assert_same(
                batch.logits(i).unwrap(),
                &w[step + 1],
                &format!("decoding beside a prompt, step {step}"),
            );
        }
        let got = batch.logits(seqs.len());
        if step + 1 < pieces.len() {
            assert!(
                got.is_none(),
                "a prompt piece that is not the last has no logits"
            );
        } else {
            assert_same(
                got.unwrap(),
                &want_new[new_step],
                &format!("newcomer after step {step}"),
            );
        }
    }
    assert_eq!(new.n_past(), newcomer.prompt + new_step);
    assert_eq!(new.stats.prompt_tokens, newcomer.prompt);
}

#[test]
fn prompt_pieces_and_decode_rows_share_steps_llama() {
    let dir = tempfile::tempdir().unwrap();
    check_mixed(&tiny(&dir, "llama"));
}

#[test]
fn prompt_pieces_and_decode_rows_share_steps_gemma3() {
    let dir = tempfile::tempdir().unwrap();
    check_mixed(&tiny(&dir, "gemma3"));
}

#[test]
fn a_bad_input_fails_the_step_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir, "llama");
    let other = tiny(&dir, "qwen2");
    let vocab = model.config().vocab as u32;
    let mut a = session(&model, &SEQS[0], 32);
    let mut b = session(&model, &SEQS[1], 32);
    a.prefill(&[1, 2, 3]).unwrap();
    b.prefill(&[4, 5]).unwrap();
    let mut batch = Batch::default();
    let err = batch
        .step(
            &mut [&mut a, &mut b],
            &[Input::Decode(7), Input::Decode(vocab)],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
    let err = batch
        .step(
            &mut [&mut a, &mut b],
            &[
                Input::Decode(7),
                Input::Prompt {
                    tokens: &[],
                    last: true,
                },
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
    let err = batch
        .step(&mut [&mut a], &[Input::Decode(1), Input::Decode(2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("inputs"), "{err}");
    let mut c = session(&other, &SEQS[0], 32);
    let err = batch
        .step(&mut [&mut a, &mut c], &[Input::Decode(1), Input::Decode(2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("same model"), "{err}");
    let mut small = SessionConfig::for_model(&model);
    small.max_context = 4;
    let mut d = Session::new(&model, small).unwrap();
    d.prefill(&[1, 2, 3, 4]).unwrap();
    let err = batch
        .step(&mut [&mut a, &mut d], &[Input::Decode(1), Input::Decode(2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("context budget"), "{err}");
    assert_eq!((a.n_past(), b.n_past(), d.n_past()), (3, 2, 4));
    assert!(batch.logits(0).is_none());
    // The sessions still step afterwards.
    batch
        .step(&mut [&mut a, &mut b], &[Input::Decode(7), Input::Decode(8)])
        .unwrap();
    assert_eq!((a.n_past(), b.n_past()), (4, 3));
}
