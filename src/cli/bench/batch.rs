//! `hayloft bench batch`: aggregate decode speed of several concurrent sequences advanced together by
//! [`crate::engine::Batch`] (one forward pass per step for all of them), against one sequence alone. Each stream holds
//! its own prompt of `--prompt` random tokens; a step feeds every stream one token.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::{median, random_tokens};
use crate::cli::ModelArgs;
use crate::engine::{Batch, Input, Lengths, Session};

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Concurrent sequences to measure, comma-separated.
    #[arg(long, default_value = "1,2,4,8")]
    pub streams: String,
    /// Prompt tokens each stream holds before decoding.
    #[arg(long, default_value_t = 1024)]
    pub prompt: usize,
    /// Decode steps timed per measurement.
    #[arg(long, default_value_t = 32)]
    pub n_gen: usize,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Write results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    streams: usize,
    /// Tokens per second over all streams.
    aggregate_tok_s: f64,
    /// Tokens per second each stream sees.
    per_stream_tok_s: f64,
    /// Aggregate over the first row's (one stream, normally).
    speedup: f64,
    /// KV-cache bytes one step reads, all streams together.
    kv_read_bytes_per_step: f64,
    /// Milliseconds of attention per step, all streams together.
    attention_ms_per_step: f64,
    /// The speedup a purely bandwidth-bound step would reach: the bytes one stream's step reads (weights + its KV),
    /// times the streams, over the bytes this step reads (weights once + every stream's KV).
    bandwidth_ceiling: f64,
    samples: Vec<f64>,
}

/// "1,2,4,8" → [1, 2, 4, 8] (each at least 1).
fn parse_streams(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            let p = p.trim();
            match p.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => bail!("--streams: '{p}' is not a stream count (a list of whole numbers ≥ 1, like 1,2,4,8)"),
            }
        })
        .collect()
}

pub fn run(a: BatchArgs) -> Result<()> {
    if a.reps == 0 || a.n_gen == 0 || a.prompt == 0 {
        bail!("--prompt, --reps and --n-gen must be at least 1");
    }
    let streams = parse_streams(&a.streams)?;
    let most = streams.iter().copied().max().unwrap_or(1);
    let l = a.model.load()?;
    let c = l.model.config();
    let mut cfg = l.session_cfg.clone();
    cfg.max_context = cfg.max_context.max(a.prompt + a.n_gen);
    let toks = random_tokens(most * (a.prompt + a.n_gen), c.vocab);
    let mut sessions = Vec::with_capacity(most);
    eprintln!(
        "[bench] prefilling {most} streams of {} tokens ({}, {} threads) ...",
        a.prompt,
        c.name,
        rayon::current_num_threads()
    );
    for i in 0..most {
        let mut s = Session::new(&l.model, cfg.clone())?;
        if i == 0 {
            let plan = s.plan_memory(Lengths::generate(a.prompt, a.n_gen))?;
            // Every stream holds a cache like this one.
            s.check_plan(&plan, plan.kv * (most - 1))?;
        }
        let t = &toks[i * (a.prompt + a.n_gen)..];
        s.prefill(&t[..a.prompt])
            .with_context(|| format!("prefilling stream {i}"))?;
        sessions.push(s);
    }
    let weights = l.model.streamed_weight_bytes() as f64;
    let mut batch = Batch::new(&l.model, most, most);
    let mut rows: Vec<Row> = Vec::new();
    // With HAYLOFT_PROFILE=1: each row's phase split per step (printed after the table).
    let mut splits: Vec<(usize, String)> = Vec::new();
    for &n in &streams {
        crate::kernels::prof::take();
        let mut samples = Vec::with_capacity(a.reps);
        let before: (u64, u64) = read_and_attention(&sessions[..n]);
        for _ in 0..a.reps {
            let t0 = Instant::now();
            for step in 0..a.n_gen {
                let inputs: Vec<Input> = (0..n)
                    .map(|i| Input::Decode(toks[i * (a.prompt + a.n_gen) + a.prompt + step]))
                    .collect();
                let mut refs: Vec<&mut Session> = sessions[..n].iter_mut().collect();
                batch.step(&mut refs, &inputs)?;
            }
            samples.push((n * a.n_gen) as f64 / t0.elapsed().as_secs_f64());
            for s in &mut sessions[..n] {
                s.truncate(a.prompt)?;
            }
        }
        let after = read_and_attention(&sessions[..n]);
        let steps = (a.reps * a.n_gen) as f64;
        if crate::kernels::prof::enabled() {
            splits.push((n, crate::kernels::prof::summary(steps)));
        }
        let kv = (after.0 - before.0) as f64 / steps;
        let agg = median(&mut samples.clone());
        let (base, base_bytes) = rows.first().map_or((agg, weights + kv / n as f64), |r| {
            (
                r.aggregate_tok_s,
                weights + r.kv_read_bytes_per_step / r.streams as f64,
            )
        });
        rows.push(Row {
            streams: n,
            aggregate_tok_s: agg,
            per_stream_tok_s: agg / n as f64,
            speedup: agg / base,
            kv_read_bytes_per_step: kv,
            attention_ms_per_step: (after.1 - before.1) as f64 / steps / 1e6,
            bandwidth_ceiling: n as f64 * base_bytes / (weights + kv),
            samples,
        });
    }
    println!(
        "{} ({}), prompt {} tokens per stream, {} decode steps, kv {}, {} threads",
        c.name,
        crate::kernels::kernel_name(),
        a.prompt,
        a.n_gen,
        cfg.kv,
        rayon::current_num_threads()
    );
    println!(
        "weights read per step {:.1} MB; bandwidth ceiling = the speedup if every step were bound by the bytes it reads",
        weights / 1e6
    );
    println!(
        "| streams | aggregate tok/s | per stream tok/s | vs {} stream(s) | bandwidth ceiling | KV read/step | attention ms/step |",
        streams[0]
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2}× | {:.2}× | {:.1} MB | {:.1} |",
            r.streams,
            r.aggregate_tok_s,
            r.per_stream_tok_s,
            r.speedup,
            r.bandwidth_ceiling,
            r.kv_read_bytes_per_step / 1e6,
            r.attention_ms_per_step
        );
    }
    for (n, split) in &splits {
        println!("{n} stream(s), per step: {split}");
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// KV bytes read and attention nanoseconds so far, summed over `sessions`.
fn read_and_attention(sessions: &[Session]) -> (u64, u64) {
    sessions.iter().fold((0, 0), |(r, t), s| {
        (r + s.stats.kv_read_total, t + s.stats.attention_ns_total)
    })
}
