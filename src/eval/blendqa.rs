//! Multi-document QA over separately cached chunks: what CacheBlend is for.
//!
//! Each case retrieves `docs` essay passages, each holding one needle ("The special magic number for KEY is N."), and
//! asks for one of the numbers. The prompt is a shared head (chat template, system prompt, instructions), the
//! passages, and the question. Every passage is tokenized and cached on its own, right after the head, after one BOS or from position 0
//! ([`ChunkKv::compute`], not timed: a RAG server has these ready); each mode then builds the request's cache from the
//! head's and the passages' and prefills the question. Time to first token (TTFT) runs from the copy of the head's
//! session to the question's logits; the answer is decoded greedily and scored by whether it holds the number.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use super::haystack::{insert_needles, Haystacks, Source};
use super::{words, Rng};
use crate::engine::blend::{prepare, ChunkKv, Reuse};
use crate::engine::sampler::argmax;
use crate::engine::{Session, SessionConfig};
use crate::model::Model;
use crate::tokenizer::chat::{ChatMessage, ChatTemplate};
use crate::tokenizer::Tokenizer;

/// The task's size.
#[derive(Clone, Debug)]
pub struct BlendQaParams {
    /// Passages per case (one needle each).
    pub docs: usize,
    /// Words per passage.
    pub doc_words: usize,
    pub samples: usize,
    /// Tokens decoded for the answer.
    pub max_new: usize,
    pub seed: u64,
    /// What each passage is cached after.
    pub chunk_base: ChunkBase,
}

/// What a passage's cache was computed after, alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkBase {
    /// The request's shared head (chat template, system prompt, instructions).
    Head,
    /// Nothing: the passage starts at position 0, its first token an attention sink.
    Zero,
    /// One BOS token (CacheBlend's code: each chunk prefilled alone with the tokenizer's BOS, BOS dropped).
    Bos,
}

/// One mode's figures over every case.
#[derive(Clone, Debug, Serialize)]
pub struct ModeSummary {
    pub mode: String,
    pub accuracy: f64,
    /// Mean time to first token, ms.
    pub ttft_ms: f64,
    /// Share of the passages' tokens whose queries ran per layer from the check layer on, averaged over those layers
    /// (blend only; with one check it is the share recomputed).
    pub recomputed: Option<f64>,
    /// Answers, one per case.
    pub answers: Vec<String>,
}

/// One case: the prompt in three parts, and the number asked for.
pub struct BlendCase {
    pub head: Vec<u32>,
    pub docs: Vec<Vec<u32>>,
    pub question: Vec<u32>,
    pub answer: String,
}

const MARK: &str = "@@PASSAGES@@";

/// Builds case `sample`: passages from the essays at distinct offsets, one needle each at a random depth.
pub fn case(
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    hays: &mut Haystacks,
    p: &BlendQaParams,
    sample: usize,
) -> Result<BlendCase> {
    if p.docs == 0 || p.doc_words == 0 {
        bail!("blend QA needs at least one passage of at least one word");
    }
    let mut rng = Rng::new(p.seed ^ (sample as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keys = words::distinct_keys(&mut rng, p.docs);
    let values: Vec<String> = (0..p.docs).map(|_| rng.number7()).collect();
    let hay = hays.get(Source::Essays, p.doc_words * 4)?;
    let span = hay.words().saturating_sub(p.doc_words).max(1);
    let mut docs = Vec::with_capacity(p.docs);
    for (k, v) in keys.iter().zip(&values) {
        let text = hay.slice(rng.below(span), p.doc_words);
        let depth = 10.0 + 80.0 * rng.below(1000) as f64 / 1000.0;
        let needle = format!("The special magic number for {k} is {v}.");
        let doc = insert_needles(text, &[(depth, needle)]);
        docs.push(tok.encode(&format!("{doc}\n\n"), false, false)?);
    }
    let target = rng.below(p.docs);
    let ask = format!(
        "What is the special magic number for {} mentioned in the provided passages?",
        keys[target]
    );
    let answer_prefix = format!("The special magic number for {} is", keys[target]);
    let user = format!(
        "Some special magic numbers are hidden in the passages below. Memorize them: I will ask about one.\n\n\
         {MARK}{ask}"
    );
    let text = match chat {
        Some(t) => t.render(&[ChatMessage::new("user", user)], true)?,
        None => format!("{user}\n"),
    } + &answer_prefix;
    let Some((head, tail)) = text.split_once(MARK) else {
        bail!("the chat template changed the user's text; cannot split the prompt around the passages");
    };
    Ok(BlendCase {
        head: tok.encode(head, tok.add_bos(), true)?,
        docs,
        question: tok.encode(tail, false, true)?,
        answer: values[target].clone(),
    })
}

/// Runs every case under every mode (labels beside), returning one summary per mode.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    cfg: &SessionConfig,
    p: &BlendQaParams,
    modes: &[(String, Reuse)],
    mut on_case: impl FnMut(usize, &str, bool, f64),
) -> Result<Vec<ModeSummary>> {
    let mut hays = Haystacks::new(None);
    let mut out: Vec<ModeSummary> = modes
        .iter()
        .map(|(label, how)| ModeSummary {
            mode: label.clone(),
            accuracy: 0.0,
            ttft_ms: 0.0,
            recomputed: matches!(how, Reuse::Blend(_)).then_some(0.0),
            answers: Vec::new(),
        })
        .collect();
    for sample in 0..p.samples {
        let c = case(tok, chat, &mut hays, p, sample)?;
        let mut head = Session::new(model, cfg.clone())?;
        head.prefill(&c.head)?;
        let mut alone = Session::new(model, cfg.clone())?;
        let base = match p.chunk_base {
            ChunkBase::Head => &head,
            ChunkBase::Zero => &alone,
            ChunkBase::Bos => {
                let Some(bos) = tok.bos_id() else {
                    bail!("the model's tokenizer has no BOS token to cache the passages after");
                };
                alone.prefill(&[bos])?;
                &alone
            }
        };
        let chunks = c
            .docs
            .iter()
            .map(|d| ChunkKv::compute(base, d))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&ChunkKv> = chunks.iter().collect();
        let n_docs: usize = c.docs.iter().map(Vec::len).sum();
        for ((_, how), sum) in modes.iter().zip(out.iter_mut()) {
            let t0 = Instant::now();
            let (mut s, blend) = prepare(&head, &refs, *how)?;
            let mut next = argmax(s.prefill(&c.question)?);
            let ttft = t0.elapsed().as_secs_f64() * 1e3;
            let mut ids = Vec::new();
            for _ in 0..p.max_new {
                if tok.is_eog(next) {
                    break;
                }
                ids.push(next);
                if tok.decode(&ids).contains('\n') {
                    break;
                }
                next = argmax(s.decode(next)?);
            }
            let text = tok.decode(&ids);
            let ok = text.contains(&c.answer);
            sum.accuracy += ok as u8 as f64 / p.samples as f64;
            sum.ttft_ms += ttft / p.samples as f64;
            if let (Some(r), Some(b)) = (sum.recomputed.as_mut(), blend) {
                let per_layer =
                    b.layer_rows.iter().sum::<usize>() as f64 / b.layer_rows.len().max(1) as f64;
                *r += per_layer / n_docs.max(1) as f64 / p.samples as f64;
            }
            on_case(sample, &sum.mode, ok, ttft);
            sum.answers.push(text.trim().to_string());
        }
    }
    Ok(out)
}
