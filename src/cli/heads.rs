//! `hayloft heads`: retrieval-head detection with the Retrieval Head paper's copy-paste criterion
//! (see `methods::heads`), over NIAH instances the eval harness generates. Writes the JSON `--kv duo@..,heads@FILE`
//! reads.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::ModelArgs;
use crate::engine::sampler::argmax;
use crate::engine::Session;
use crate::eval::haystack::{Haystacks, Source};
use crate::eval::niah::{self, Needle, NiahParams, KAMRADT_NEEDLE};
use crate::eval::{parse_lengths, Mode, Prompter};
use crate::methods::heads::{rouge1_recall, HeadScorer, InstanceTally};
use crate::methods::Needs;

#[derive(Args, Debug)]
pub struct HeadsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths in tokens (`1k,2k,4k`).
    #[arg(long, default_value = "1k,2k,4k")]
    pub lengths: String,
    /// Needle depths in percent, `a:b:step` or a list.
    #[arg(long, default_value = "0:100:20")]
    pub depths: String,
    /// Needle: number (RULER's magic number sentence) or kamradt (the San Francisco sandwich).
    #[arg(long, default_value = "kamradt")]
    pub needle: String,
    /// Haystack: essays or noise.
    #[arg(long, default_value = "essays")]
    pub haystack: String,
    /// A text file to use as the haystack instead.
    #[arg(long)]
    pub haystack_file: Option<PathBuf>,
    /// Tokens decoded per instance.
    #[arg(long, default_value_t = 40)]
    pub max_new: usize,
    /// Heads scoring above this are retrieval heads (paper: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Render plain prompts even for chat models.
    #[arg(long)]
    pub no_chat: bool,
    /// Where to write the scores.
    #[arg(long, default_value = "heads.json")]
    pub out: PathBuf,
}

pub fn run(a: HeadsArgs) -> Result<()> {
    let lengths = parse_lengths(&a.lengths)?;
    let depths = crate::eval::parse_depths(&a.depths)?;
    let needle = Needle::parse(&a.needle)?;
    let haystack = Source::parse(&a.haystack)?;
    if a.max_new == 0 {
        bail!("--max-new must be at least 1");
    }
    let l = a.model.load()?;
    if !l.session_cfg.kv.is_full() {
        bail!("retrieval-head detection reads the full cache: run it with --kv full");
    }
    let mc = l.model.config();
    if let Some(&n) = lengths.iter().find(|&&n| n > l.session_cfg.max_context) {
        bail!(
            "length {n} is over the session's context of {} tokens",
            l.session_cfg.max_context
        );
    }
    let prompter = Prompter::new(
        &l.tokenizer,
        l.chat_template.as_ref().map_err(|e| e.clone()),
        a.no_chat,
    );
    let hays = RefCell::new(Haystacks::new(a.haystack_file.clone()));
    let params = NiahParams {
        haystack,
        needle,
        needles: 1,
        max_new: a.max_new,
    };
    let mut scorer = HeadScorer::new(mc.n_layers, mc.n_heads, mc.n_kv_heads);
    let (mut q, mut qpos) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    let total = lengths.len() * depths.len();
    let (mut done, mut n_counted) = (0, 0);
    let progress = crate::progress::Progress::bar("[heads]", total as u64, "instances", false);
    for &len in &lengths {
        for &depth in &depths {
            let case = niah::case(
                &prompter,
                &mut hays.borrow_mut(),
                &params,
                len,
                depth,
                0,
                a.seed,
            )?;
            let text = prompter.render(&case.conv, 0, &[], Mode::MultiTurn)?;
            let toks = prompter.encode(&text, true)?;
            let turn = &case.conv.turns[0];
            let needle_text = match needle {
                Needle::Kamradt => KAMRADT_NEEDLE.to_string(),
                Needle::Number => number_needle(&text, &turn.refs[0])?,
            };
            let span = token_span(&l.tokenizer, &toks, &text, &needle_text)?;
            let mut cfg = l.session_cfg.clone();
            cfg.observe = Needs {
                window: 1,
                ..Needs::default()
            };
            let mut s = Session::new(&l.model, cfg)?;
            let mut tally = InstanceTally::new(mc.n_layers, mc.n_heads, mc.n_kv_heads, &toks, span);
            let mut next = argmax(s.prefill(&toks)?);
            let mut out = Vec::new();
            for _ in 0..a.max_new {
                // The query that produced `next` is the last one recorded in every layer.
                for layer in 0..mc.n_layers {
                    s.scratch.seq.obs.gather(
                        layer,
                        0..mc.n_heads,
                        mc.head_dim_k,
                        1,
                        &mut q,
                        &mut qpos,
                    );
                    tally.observe(&s.cache, layer, &q, next);
                }
                if l.tokenizer.is_eog(next) {
                    break;
                }
                out.push(next);
                if s.n_past() >= s.cfg.max_context {
                    break;
                }
                next = argmax(s.decode(next)?);
            }
            let answer = l.tokenizer.decode(&out);
            let reference = match needle {
                Needle::Kamradt => KAMRADT_NEEDLE.to_string(),
                Needle::Number => turn.refs.join(" "),
            };
            let recall = rouge1_recall(&answer, &reference);
            let counted = scorer.add(&tally, recall);
            done += 1;
            n_counted += usize::from(counted);
            progress.line(&format!(
                "[{done}/{total}] length {} depth {depth}%: recall {recall:.2}{} ({:.0} s) {:?}",
                toks.len(),
                if counted { "" } else { " (not counted)" },
                t0.elapsed().as_secs_f64(),
                answer.chars().take(80).collect::<String>()
            ));
            progress.set(
                done as u64,
                format!("{n_counted} counted (needle recovered), last recall {recall:.2}"),
            );
        }
    }
    progress.finish();
    let r = scorer.finish(&mc.name, a.threshold);
    if r.counted == 0 {
        eprintln!("warning: the model recovered the needle in no instance; every head scores 0");
    }
    crate::util::write_atomic(&a.out, serde_json::to_string_pretty(&r)?.as_bytes())?;
    let n_q = mc.n_layers * mc.n_heads;
    let q_over = r
        .q_scores
        .iter()
        .flatten()
        .filter(|&&x| x > a.threshold)
        .count();
    let kv_over = r.retrieval_heads.len();
    println!(
        "{} of {} instances counted (needle recovered). Query heads scoring > {}: {q_over} of {n_q} ({:.1} %); \
         KV heads: {kv_over} of {} ({:.1} %).",
        r.counted,
        r.instances,
        a.threshold,
        100.0 * q_over as f64 / n_q as f64,
        mc.n_layers * mc.n_kv_heads,
        100.0 * kv_over as f64 / (mc.n_layers * mc.n_kv_heads) as f64
    );
    let mut ranked: Vec<(f64, usize, usize)> = r
        .q_scores
        .iter()
        .enumerate()
        .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &s)| (s, l, h)))
        .collect();
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0));
    println!("top query heads (layer.head score):");
    for (s, l, h) in ranked.iter().take(10) {
        println!("  {l}.{h} {s:.3}");
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The magic-number needle sentence around `value` in the prompt.
fn number_needle(text: &str, value: &str) -> Result<String> {
    let at = text
        .find(value)
        .with_context(|| format!("the needle value {value} is not in the prompt"))?;
    let start = text[..at]
        .rfind("One of the special magic")
        .context("the needle sentence is not in the prompt")?;
    Ok(text[start..at + value.len()].to_string())
}

/// Token positions covering the first occurrence of `needle` in `text`, the prompt `toks` encode (BOS first if any).
fn token_span(
    tok: &crate::tokenizer::Tokenizer,
    toks: &[u32],
    text: &str,
    needle: &str,
) -> Result<std::ops::Range<usize>> {
    let at = text
        .find(needle)
        .context("the needle is not in the prompt")?;
    let end = at + needle.len();
    let mut offset = 0usize;
    let (mut first, mut last) = (None, 0);
    let start = usize::from(tok.add_bos() && toks.first() == tok.bos_id().as_ref());
    for (i, &t) in toks.iter().enumerate().skip(start) {
        let n = tok.token_bytes(t).len();
        if offset + n > at && offset < end {
            first.get_or_insert(i);
            last = i + 1;
        }
        offset += n;
    }
    match first {
        Some(f) if offset == text.len() => Ok(f..last),
        _ => bail!(
            "cannot map the needle onto prompt tokens (the tokens spell {offset} bytes, the prompt has {})",
            text.len()
        ),
    }
}
