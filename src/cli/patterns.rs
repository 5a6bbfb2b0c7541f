//! `hayloft patterns`: MInference's offline per-head pattern search ([`crate::methods::prefill::search`]) on one long
//! kv-retrieval example (RULER's `niah_multikey_3`: UUID keys and values hidden among UUID pairs), written as the
//! JSON `--prefill minference@FILE` reads.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use super::ModelArgs;
use crate::engine::Session;
use crate::eval::haystack::Haystacks;
use crate::eval::{ruler, Mode, Prompter};
use crate::methods::prefill::search::{PatternSearch, Shared, FROM_POS};
use crate::methods::prefill::PrefillSpec;

/// The RULER task the example comes from.
const TASK: &str = "niah_multikey_3";

#[derive(Args, Debug)]
pub struct PatternsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Length of the example in tokens (MInference searches on one long example; here 8K keeps it to minutes).
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Score query rows from this position on (MInference: 2500).
    #[arg(long, default_value_t = FROM_POS)]
    pub from: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give each head the cheapest candidate (keys read per query row) whose mean recall reaches R, e.g. 0.95,
    /// instead of MInference's highest recall (ours: the paper chooses under a compute budget, its code by recall).
    #[arg(long, value_name = "R")]
    pub min_recall: Option<f64>,
    /// Where to write the patterns.
    #[arg(long, default_value = "patterns.json")]
    pub out: PathBuf,
}

pub fn run(a: PatternsArgs) -> Result<()> {
    let l = a.model.load()?;
    if l.session_cfg.prefill != PrefillSpec::Dense {
        bail!("the pattern search reads dense attention: run it without --prefill");
    }
    if let Some(r) = a.min_recall {
        if !(0.0..=1.0).contains(&r) {
            bail!("--min-recall {r}: a share of the attention, between 0 and 1");
        }
    }
    if a.from >= a.tokens {
        bail!("--from {} must be below --tokens {}", a.from, a.tokens);
    }
    let mc = l.model.config();
    let prompter = Prompter::new(
        &l.tokenizer,
        l.chat_template.as_ref().map_err(|e| e.clone()),
        false,
    );
    let hays = RefCell::new(Haystacks::new(None));
    let case = ruler::case(&prompter, &mut hays.borrow_mut(), TASK, a.tokens, 0, a.seed)?;
    let text = prompter.render(&case.conv, 0, &[], Mode::MultiTurn)?;
    let toks = prompter.encode(&text, true)?;
    if toks.len() > l.session_cfg.max_context {
        bail!(
            "the example has {} tokens, over the session's context of {}",
            toks.len(),
            l.session_cfg.max_context
        );
    }
    let t0 = Instant::now();
    let search = Arc::new(Mutex::new(PatternSearch::new(mc, a.from)));
    let mut s = Session::new(&l.model, l.session_cfg.clone())?;
    s.scratch.seq.prefill = Some(Box::new(Shared(search.clone())));
    s.prefill(&toks)?;
    drop(s);
    let search = search
        .lock()
        .map_err(|_| anyhow::anyhow!("the pattern search failed while the prefill ran"))?;
    let rule = match a.min_recall {
        Some(r) => format!("cheapest candidate with recall >= {r}"),
        None => "highest recall".to_string(),
    };
    let example = format!(
        "RULER {TASK}, seed {}, rows from position {} scored, {rule}",
        a.seed, a.from
    );
    let file = search.finish(&mc.name, &example, toks.len(), a.min_recall);
    crate::util::write_atomic(&a.out, (file.to_json() + "\n").as_bytes())?;
    eprintln!(
        "searched {} tokens in {:.1} s; wrote {}",
        toks.len(),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    println!("mean recall per candidate over all heads:");
    for (c, r) in search.mean_recalls() {
        println!("  {c:?}: {r:.3}");
    }
    let mix = file.mix();
    let scored: usize = mix.iter().map(|m| m.1).sum();
    println!(
        "per-head pattern mix ({scored} scored heads of {}; the others are on sliding-window layers, which keep their window attention):",
        mc.n_layers * mc.n_heads
    );
    for (p, n) in mix {
        println!("  {n:>4} × {p}");
    }
    Ok(())
}
