//! `hayloft perplexity`: llama-perplexity's protocol (see engine::perplexity).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::{read_text_file, ModelArgs};
use crate::engine::perplexity::perplexity;
use crate::engine::Session;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score (UTF-8).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Chunk length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Write per-token NLL with positions as JSON.
    #[arg(long)]
    pub nll_json: Option<PathBuf>,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    let text = read_text_file(&a.file)?;
    let mut l = a.model.load()?;
    l.session_cfg.max_context = l.session_cfg.max_context.max(a.ctx);
    let tokens = l.tokenizer.encode(&text, false, false)?;
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
    let t0 = Instant::now();
    eprintln!("{} tokens, chunks of {}", tokens.len(), a.ctx);
    let (r, nlls) = perplexity(&mut session, tokens, a.ctx, bos, |i, n, ppl| {
        eprintln!(
            "[{i}/{n}] running PPL {ppl:.4}  ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
    })?;
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
        std::fs::write(p, serde_json::to_string(&j)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    session.stats.finish();
    eprintln!("{}", session.stats.line());
    if let Some(p) = &a.model.stats_json {
        session.stats.write_json(p)?;
    }
    Ok(())
}
