//! `hayloft perplexity --pairs FILE`: lm-eval-style log-likelihoods of (context, continuation) token-id pairs, one
//! JSON line out per line in (see engine::loglik).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::ModelArgs;
use crate::engine::loglik::continuation_logprob;
use crate::engine::{Lengths, Session};
use crate::util::read_text_file;

/// One input line.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Pair {
    context: Vec<u32>,
    continuation: Vec<u32>,
}

/// Parses the JSONL file (blank lines skipped); an error names the line.
fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = read_text_file(path)?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Pair = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"context\": [token ids], \"continuation\": [token ids]}}",
                path.display(),
                i + 1
            )
        })?;
        pairs.push(p);
    }
    if pairs.is_empty() {
        anyhow::bail!("{}: no pairs to score", path.display());
    }
    Ok(pairs)
}

pub fn run(model: &ModelArgs, path: &Path) -> Result<()> {
    let pairs = read_pairs(path)?;
    let mut l = model.load()?;
    let longest = pairs
        .iter()
        .map(|p| p.context.len() + p.continuation.len())
        .max()
        .unwrap_or(0);
    l.session_cfg.max_context = l.session_cfg.max_context.max(longest);
    let mut session = Session::new(&l.model, l.session_cfg.clone())?;
    session.check_memory(Lengths::generate(longest, 0))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, p) in pairs.iter().enumerate() {
        let s = continuation_logprob(&mut session, &p.context, &p.continuation)
            .with_context(|| format!("{} pair {}", path.display(), i + 1))?;
        writeln!(out, "{}", serde_json::to_string(&s)?)?;
    }
    out.flush()?;
    session.stats.finish();
    eprintln!("{} pairs scored; {}", pairs.len(), session.stats.line());
    Ok(())
}
