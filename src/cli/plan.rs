//! `hayloft plan`: what a run will cost before it runs (the cost model, [`crate::engine::cost`]): KV bytes per token
//! and in total, prefill time, time per decoded token, how many such sequences fit a memory budget, and the cost of
//! swapping the context in from disk; `--validate` runs each length and prints the measured figures beside.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::engine::cost::{self, Prediction};
use crate::engine::stats::human_bytes;
use crate::engine::{Lengths, Session};
use crate::kernels::machine::MachineProfile;

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths in tokens, comma-separated (e.g. 4096,32768).
    #[arg(long, value_delimiter = ',', required = true)]
    pub context: Vec<usize>,
    /// Tokens generated after the prompt.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Sequences to plan for at once: the memory they need together is checked against the budget.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Machine profile from `hayloft bench machine --json FILE` (required: the prediction divides by its rates).
    #[arg(long)]
    pub machine: PathBuf,
    /// Run each length (random tokens, `--validate-gen` decoded tokens) and print measured beside predicted.
    #[arg(long)]
    pub validate: bool,
    /// Decode steps timed per length by --validate.
    #[arg(long, default_value_t = 64)]
    pub validate_gen: usize,
    /// Write the predictions (and measurements) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Measured {
    prefill_s: f64,
    decode_tok_s: f64,
    kv_bytes: usize,
    kv_read_bytes_per_token: f64,
    /// Memory read bandwidth probed just before the decode (bytes/s): on a shared machine the bus a run gets can
    /// differ from the one the profile measured, and a prediction cannot know it.
    read_bw_now: f64,
}

#[derive(Serialize)]
struct Row {
    predicted: Prediction,
    #[serde(skip_serializing_if = "Option::is_none")]
    measured: Option<Measured>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    kv: String,
    threads: usize,
    machine: MachineProfile,
    concurrency: usize,
    rows: Vec<Row>,
}

pub fn run(a: PlanArgs) -> Result<()> {
    if a.context.contains(&0) || a.concurrency == 0 {
        bail!("--context lengths and --concurrency must be at least 1");
    }
    let machine = MachineProfile::load(&a.machine)?;
    let l = a.model.load()?;
    let mc = l.model.config();
    let threads = rayon::current_num_threads();
    if machine.threads != threads {
        eprintln!(
            "warning: {} was measured on {} threads, this plan runs on {threads}",
            a.machine.display(),
            machine.threads
        );
    }
    let longest = a.context.iter().max().copied().unwrap_or(0) + a.new_tokens;
    if longest > mc.ctx_len {
        bail!(
            "--context {} plus --new-tokens {} is past {}'s context of {} tokens",
            longest - a.new_tokens,
            a.new_tokens,
            mc.name,
            mc.ctx_len
        );
    }
    let mut cfg = l.session_cfg.clone();
    cfg.max_context = cfg.max_context.max(longest);
    let budget = match cfg.max_memory {
        Some(m) => m,
        None => crate::engine::memcheck::process_room()
            .iter()
            .map(|r| r.bytes)
            .min()
            .context("no memory limit is visible to this process: give --max-memory")?
            .saturating_add(l.model.weight_bytes()),
    };
    let mut rows = Vec::new();
    for &n in &a.context {
        let p = cost::predict(&l.model, &cfg, &machine, n, a.new_tokens, budget)?;
        let measured = if a.validate {
            Some(measure(&l, &cfg, n, a.validate_gen)?)
        } else {
            None
        };
        rows.push(Row {
            predicted: p,
            measured,
        });
    }
    print_table(&rows, a.concurrency, budget);
    if machine.reuse.is_empty() {
        println!(
            "\nThe profile has no reuse curve (it predates it): every weight byte of a decode step is taken to come from memory."
        );
    } else {
        let ws: Vec<String> = rows
            .iter()
            .map(|r| {
                let p = &r.predicted;
                let bytes = p.decode_weight_bytes as f64 + p.decode_kv_read_bytes;
                format!(
                    "{}: {:.0} MiB, {:.2}×",
                    p.context,
                    bytes / (1u64 << 20) as f64,
                    p.decode_reuse
                )
            })
            .collect();
        println!(
            "\nDecode working set (weights + KV read, re-read every step) and the weights' speed-up over memory \
             from the profile's reuse curve: {}.",
            ws.join("; ")
        );
    }
    if a.validate {
        let now: Vec<String> = rows
            .iter()
            .filter_map(|r| r.measured.as_ref())
            .map(|m| format!("{:.1}", m.read_bw_now / 1e9))
            .collect();
        println!(
            "\nMemory read bandwidth: {:.1} GB/s in the profile; probed before each measured decode: {} GB/s.",
            machine.read_bw / 1e9,
            now.join(", ")
        );
    }
    let report = Report {
        model: mc.name.clone(),
        kv: cfg.kv.to_string(),
        threads,
        machine,
        concurrency: a.concurrency,
        rows,
    };
    if let Some(p) = &a.json {
        crate::util::write_atomic(
            p,
            (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
        )?;
    }
    Ok(())
}

/// Runs `n` random prompt tokens and `gen` decode steps; the prefill time, decode rate and KV bytes.
fn measure(
    l: &super::Loaded,
    cfg: &crate::engine::SessionConfig,
    n: usize,
    gen: usize,
) -> Result<Measured> {
    let vocab = l.model.config().vocab;
    let toks: Vec<u32> = (0..n + gen)
        .map(|i| (100 + (i as u64 * 2_654_435_761 % (vocab as u64 - 100))) as u32)
        .collect();
    let mut s = Session::new(&l.model, cfg.clone())?;
    s.check_memory(Lengths::generate(n, gen))?;
    // Warm-up: fault the weights in, grow the scratch buffers to the timed run's chunk.
    s.feed(&toks[..cfg.chunk_size.min(n)], 0..1, |_, _| {})?;
    s.reset();
    let t0 = Instant::now();
    s.feed(&toks[..n], n - 1..n, |_, _| {})?;
    let prefill_s = t0.elapsed().as_secs_f64();
    s.stats = Default::default();
    let read_bw_now = crate::kernels::membw::read_bandwidth(256 << 20, 3);
    let t1 = Instant::now();
    for i in 0..gen {
        s.decode(toks[n + i])?;
    }
    let decode_tok_s = gen as f64 / t1.elapsed().as_secs_f64();
    s.stats.finish();
    Ok(Measured {
        prefill_s,
        decode_tok_s,
        kv_bytes: s.cache.bytes(),
        kv_read_bytes_per_token: s.stats.kv_read_bytes_per_token,
        read_bw_now,
    })
}

fn print_table(rows: &[Row], concurrency: usize, budget: usize) {
    let err = |pred: f64, meas: f64| format!("{:+.0} %", 100.0 * (pred - meas) / meas);
    println!("| context | KV/token | KV total | peak memory | prefill s | decode tok/s | KV read/token | fits in {} | swap-in from disk |", human_bytes(budget));
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let p = &r.predicted;
        let (pre, dec, kvr) = match &r.measured {
            Some(m) => (
                format!(
                    "{:.2} (measured {:.2}, {})",
                    p.prefill_s,
                    m.prefill_s,
                    err(p.prefill_s, m.prefill_s)
                ),
                format!(
                    "{:.1} (measured {:.1}, {})",
                    p.decode_tok_s,
                    m.decode_tok_s,
                    err(p.decode_tok_s, m.decode_tok_s)
                ),
                format!(
                    "{} (measured {})",
                    human_bytes(p.decode_kv_read_bytes as usize),
                    human_bytes(m.kv_read_bytes_per_token as usize)
                ),
            ),
            None => (
                format!("{:.2}", p.prefill_s),
                format!("{:.1}", p.decode_tok_s),
                human_bytes(p.decode_kv_read_bytes as usize),
            ),
        };
        let kv_total = match &r.measured {
            Some(m) => format!(
                "{} (measured {})",
                human_bytes(p.memory.kv),
                human_bytes(m.kv_bytes)
            ),
            None => human_bytes(p.memory.kv),
        };
        let fits = if p.max_concurrency >= concurrency {
            format!("{} sequences", p.max_concurrency)
        } else {
            format!("{} sequences: {concurrency} do NOT fit", p.max_concurrency)
        };
        println!(
            "| {} + {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.context,
            p.new_tokens,
            human_bytes(p.kv_bytes_per_token as usize),
            kv_total,
            human_bytes(p.memory.total()),
            pre,
            dec,
            kvr,
            fits,
            p.swap_in_s
                .map_or("(no disk rate in the profile)".to_string(), |s| format!(
                    "{:.2} s",
                    s
                ))
        );
    }
}
