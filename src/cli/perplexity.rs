//! `hayloft perplexity`: llama-perplexity's protocol (see engine::perplexity).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use super::ModelArgs;
use crate::engine::perplexity::perplexity;
use crate::engine::{Lengths, Session};
use crate::progress::Progress;
use crate::util::read_text_file;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score (UTF-8).
    #[arg(long, short = 'f', required_unless_present = "pairs")]
    pub file: Option<PathBuf>,
    /// Score (context, continuation) pairs instead of a text: a JSONL file of `{"context": [ids], "continuation":
    /// [ids]}`, each scored from an empty cache; prints one `{"logprob", "greedy", "n"}` line per pair
    /// (lm-evaluation-harness's loglikelihood, computed without the server).
    #[arg(long, conflicts_with_all = ["file", "stream"])]
    pub pairs: Option<PathBuf>,
    /// Chunk length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Write per-token NLL with positions as JSON.
    #[arg(long)]
    pub nll_json: Option<PathBuf>,
    /// Streaming mode (the StreamingLLM experiment): feed the first `--tokens` tokens as one stream, `--step` at a
    /// time, letting the `--kv` method compress the cache as it grows; report perplexity by position.
    #[arg(long)]
    pub stream: bool,
    /// Streaming: tokens of the text to stream (default: all, up to --max-context).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Streaming: tokens fed per step (the cache is compressed after each).
    #[arg(long, default_value_t = 64)]
    pub step: usize,
    /// Streaming: positions per reported perplexity bucket.
    #[arg(long, default_value_t = 512)]
    pub bucket: usize,
    /// Streaming: when the --kv method compresses. Only `prompt` applies (the cache is compressed after every
    /// step, as the StreamingLLM experiment grows it): a stream has no question to leave out, and `context` would
    /// compress the first step alone and let the cache grow with the rest, so it is refused.
    #[arg(long, value_name = "prompt", requires = "stream")]
    pub compress_at: Option<crate::methods::CompressAt>,
}

fn run_stream(a: &PerplexityArgs, l: &mut crate::cli::Loaded, tokens: &[u32]) -> Result<()> {
    let n = a.tokens.unwrap_or(tokens.len()).min(tokens.len());
    let mut tokens = tokens[..n].to_vec();
    if let (true, Some(b)) = (l.tokenizer.add_bos(), l.tokenizer.bos_id()) {
        tokens.insert(0, b);
        tokens.pop();
    }
    let at = l
        .session_cfg
        .kv
        .resolve_compress_at(a.compress_at, crate::methods::CompressAt::Prompt);
    if at == crate::methods::CompressAt::Context {
        bail!(
            "perplexity --stream compresses the cache after every --step tokens (`--compress-at prompt`); a stream \
             has no context/question split, and under `context` only the first step would be compressed. Drop \
             `--compress-at context` (or the spec's `at@context`)"
        );
    }
    l.session_cfg.max_context = l.session_cfg.max_context.max(tokens.len());
    let mut session = Session::new(&l.model, l.session_cfg.clone())?;
    session.check_memory(Lengths {
        prompt: tokens.len(),
        new: 0,
        feed: a.step.clamp(1, tokens.len().max(1)),
        uncompressed: 0,
    })?;
    let t0 = Instant::now();
    eprintln!(
        "streaming {} tokens, {} per step, kv {}",
        tokens.len(),
        a.step,
        session.cfg.kv
    );
    let mut last_report = 0;
    let progress = Progress::bar("[stream]", tokens.len() as u64, "tokens", false);
    let (nlls, buckets) = crate::engine::perplexity::streaming_perplexity(
        &mut session,
        &tokens,
        a.step,
        a.bucket,
        |done, total| {
            progress.set(done as u64, "");
            if !progress.is_bar() && (done - last_report >= 1024 || done == total) {
                last_report = done;
                progress.line(&format!(
                    "[{done}/{total}] ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                ));
            }
        },
    )?;
    progress.finish();
    println!("| positions | tokens | PPL |");
    println!("|---|---|---|");
    for b in &buckets {
        println!("| {}–{} | {} | {:.3} |", b.start, b.end - 1, b.n, b.ppl);
    }
    let mean = nlls.iter().map(|t| t.nll).sum::<f64>() / nlls.len() as f64;
    println!(
        "stream PPL = {:.4} over {} tokens (kv {}, peak KV {})",
        mean.exp(),
        nlls.len(),
        session.cfg.kv,
        crate::engine::stats::human_bytes(session.cache.peak_bytes())
    );
    if let Some(p) = &a.nll_json {
        let j = serde_json::json!({ "kv": session.cfg.kv.to_string(), "buckets": buckets, "tokens": nlls });
        crate::util::write_atomic(p, serde_json::to_string(&j)?.as_bytes())?;
    }
    session.stats.finish();
    eprintln!("{}", session.stats.line());
    Ok(())
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    if let Some(p) = &a.pairs {
        return super::pairs::run(&a.model, p);
    }
    let Some(file) = &a.file else {
        bail!("give --file (a text to score) or --pairs (context/continuation pairs)");
    };
    let text = read_text_file(file)?;
    let mut l = a.model.load()?;
    l.session_cfg.max_context = l.session_cfg.max_context.max(a.ctx);
    let tokens = l.tokenizer.encode(&text, false, false)?;
    if a.stream {
        return run_stream(&a, &mut l, &tokens);
    }
    let tokens = match a.chunks {
        Some(c) => &tokens[..(c * a.ctx).min(tokens.len())],
        None => &tokens[..],
    };
    let bos = if l.tokenizer.add_bos() {
        l.tokenizer.bos_id()
    } else {
        None
    };
    let mut session = Session::new(&l.model, l.session_cfg.clone())?;
    session.check_memory(Lengths::generate(a.ctx, 0))?;
    let t0 = Instant::now();
    eprintln!("{} tokens, chunks of {}", tokens.len(), a.ctx);
    let n_chunks = tokens.len() / a.ctx.max(1);
    let progress = Progress::bar("[ppl]", n_chunks as u64, "chunks", false);
    let (r, nlls) = perplexity(&mut session, tokens, a.ctx, bos, |i, n, ppl| {
        if progress.is_bar() {
            progress.set(i as u64, format!("running PPL {ppl:.4}"));
        } else {
            progress.line(&format!(
                "[{i}/{n}] running PPL {ppl:.4}  ({:.1} s)",
                t0.elapsed().as_secs_f64()
            ));
        }
    })?;
    progress.finish();
    println!(
        "PPL = {:.4} +/- {:.4}  ({} chunks of {} tokens, {} tokens scored, {:.1} s)",
        r.ppl,
        r.ppl_se,
        r.n_chunks,
        r.ctx,
        r.n_scored,
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.nll_json {
        let j = serde_json::json!({ "result": r, "tokens": nlls });
        crate::util::write_atomic(p, serde_json::to_string(&j)?.as_bytes())?;
    }
    session.stats.finish();
    eprintln!("{}", session.stats.line());
    if let Some(p) = &a.model.stats_json {
        session.stats.write_json(p)?;
    }
    Ok(())
}
