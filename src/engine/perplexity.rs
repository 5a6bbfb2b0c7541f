//! Perplexity, following llama.cpp's `llama-perplexity` protocol so figures are comparable:
//! the token stream is cut into consecutive chunks of `ctx` tokens (the remainder is dropped); each chunk is evaluated
//! from an empty cache; only the second half of each chunk is scored (token j+1 given tokens 0..=j, for
//! j in ctx/2 .. ctx−1), so every scored token has at least ctx/2 tokens of context. When the model's GGUF asks for a
//! BOS token, the chunk's first token is replaced by BOS, as llama.cpp does.
//! PPL = exp(mean NLL); its standard error is PPL · sd(NLL)/sqrt(n−1), as llama.cpp prints it.

use anyhow::{bail, Result};
use serde::Serialize;

use super::Session;

#[derive(Clone, Debug, Serialize)]
pub struct TokenNll {
    pub chunk: usize,
    /// Position of the scored token within its chunk.
    pub pos: usize,
    pub token: u32,
    pub nll: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PplResult {
    pub ctx: usize,
    pub n_chunks: usize,
    pub n_scored: usize,
    pub ppl: f64,
    pub ppl_se: f64,
    pub mean_nll: f64,
}

/// Scores `tokens` in chunks of `ctx`. `on_chunk(i, running_ppl)` is called after each chunk (progress).
pub fn perplexity(
    session: &mut Session,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<(PplResult, Vec<TokenNll>)> {
    if ctx < 4 {
        bail!("--ctx must be at least 4, got {ctx}");
    }
    let n_chunks = tokens.len() / ctx;
    if n_chunks == 0 {
        bail!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}",
            tokens.len()
        );
    }
    let first = ctx / 2;
    let mut nlls = Vec::with_capacity(n_chunks * (ctx - 1 - first));
    let mut chunk_tokens = vec![0u32; ctx];
    let (mut sum, mut sum2) = (0.0f64, 0.0f64);
    for c in 0..n_chunks {
        chunk_tokens.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk_tokens[0] = b;
        }
        session.reset();
        let targets = &chunk_tokens;
        session.feed(targets, first..ctx - 1, |j, logits| {
            let target = targets[j + 1];
            let nll = nll_of(logits, target);
            sum += nll;
            sum2 += nll * nll;
            nlls.push(TokenNll {
                chunk: c,
                pos: j + 1,
                token: target,
                nll,
            });
        })?;
        let n = nlls.len() as f64;
        on_chunk(c + 1, n_chunks, (sum / n).exp());
    }
    let n = nlls.len() as f64;
    let mean = sum / n;
    let var = (sum2 / n - mean * mean).max(0.0);
    let ppl = mean.exp();
    let se = if n > 1.0 {
        ppl * (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Ok((
        PplResult {
            ctx,
            n_chunks,
            n_scored: nlls.len(),
            ppl,
            ppl_se: se,
            mean_nll: mean,
        },
        nlls,
    ))
}

/// `−log softmax(logits)[target]`, in f64.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    m + z.ln() - logits[target as usize] as f64
}

/// Perplexity of one position bucket of a streaming run.
#[derive(Clone, Debug, Serialize)]
pub struct PositionBucket {
    /// Positions `start..end` of the stream.
    pub start: usize,
    pub end: usize,
    pub n: usize,
    pub ppl: f64,
}

/// Streaming perplexity (the StreamingLLM experiment): the whole token stream is fed into one session, `step` tokens
/// at a time, so the session's KV method compresses the cache as the stream grows (each feed ends a prefill); every
/// token after the first is scored given everything the cache still holds. Returns per-token NLLs (pos = position in
/// the stream) and the perplexity of each `bucket` positions. Positions are the stream's own, so a stream longer than
/// the model's trained context also tests RoPE past its range.
pub fn streaming_perplexity(
    session: &mut Session,
    tokens: &[u32],
    step: usize,
    bucket: usize,
    mut on_step: impl FnMut(usize, usize),
) -> Result<(Vec<TokenNll>, Vec<PositionBucket>)> {
    if step == 0 || bucket == 0 {
        bail!("--step and --bucket must be at least 1");
    }
    if tokens.len() < 2 {
        bail!(
            "the text has {} tokens; streaming perplexity needs at least 2",
            tokens.len()
        );
    }
    session.reset();
    let mut nlls = Vec::with_capacity(tokens.len() - 1);
    let mut start = 0;
    while start < tokens.len() - 1 {
        let end = (start + step).min(tokens.len() - 1);
        let piece = &tokens[start..end];
        session.feed(piece, 0..piece.len(), |j, logits| {
            let target = tokens[start + j + 1];
            nlls.push(TokenNll {
                chunk: 0,
                pos: start + j + 1,
                token: target,
                nll: nll_of(logits, target),
            });
        })?;
        start = end;
        on_step(start, tokens.len() - 1);
    }
    let mut buckets = Vec::new();
    for (i, group) in nlls.chunks(bucket).enumerate() {
        let n = group.len();
        let mean = group.iter().map(|t| t.nll).sum::<f64>() / n as f64;
        buckets.push(PositionBucket {
            start: 1 + i * bucket,
            end: 1 + i * bucket + n,
            n,
            ppl: mean.exp(),
        });
    }
    Ok((nlls, buckets))
}
