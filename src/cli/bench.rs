//! `hayloft bench speed`: prefill and decode tok/s at several context lengths, as llama-bench measures them:
//! prefill N = N tokens from an empty cache; decode at depth N = 32 single-token steps with N tokens already cached.
//! Tokens are random (as llama-bench's), so no tokenizer or text is involved. Reports the median of `--reps`.
//! `hayloft bench machine`: the roofs (memory read bandwidth, f32 and int8 kernel throughput) that every `bench speed`
//! row is then set against (its share of the roofline).
//! `hayloft bench batch`: aggregate decode tok/s of several sequences decoded together (see `bench/batch.rs`).
//! `hayloft bench tokenize`: the tokenizer's encode and decode speed on real text (the essay haystack, or a file).

mod batch;
mod serve;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::ModelArgs;
use crate::engine::{Lengths, Session};
use crate::kernels::machine::{self, Effort, MachineProfile};
use crate::model::cost;
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Prefill and decode speed at several contexts.
    Speed(SpeedArgs),
    /// Tokenizer encode and decode speed on real text.
    Tokenize(TokenizeArgs),
    /// The machine's roofs: memory read bandwidth (all threads, one thread) and f32 / int8 dot-product throughput of
    /// every kernel path the CPU has, as JSON (`bench speed --machine FILE` and `plan` read it).
    Machine(MachineArgs),
    /// Decode over one long context under several KV specs (decode-time selectors): KV bytes read per token,
    /// attention time per token and decode tok/s, each against full attention, next to the bandwidth ceiling.
    Select(SelectArgs),
    /// Aggregate decode tok/s of 1, 2, 4, 8 concurrent sequences decoded together in batched steps (continuous
    /// batching), each holding its own prompt.
    Batch(batch::BatchArgs),
    /// The KV codec (CacheGen-style) on a real cache: size against f16, KIVI-8 and KIVI-4, and the perplexity of a
    /// continuation over the decoded cache.
    Codec(super::kvcodec::CodecArgs),
    /// CacheBlend on multi-document QA: accuracy and time to first token of full recompute, naive reuse of the
    /// separately cached passages, and blend with selective recompute.
    Blend(super::blend::BlendArgs),
    /// `hayloft serve` under load: concurrent clients with shared-prefix and unique prompts; throughput, time to
    /// first token and latency percentiles, prefix-cache hit rate, peak KV bytes.
    Serve(serve::ServeBenchArgs),
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context length to decode at.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// KV specs to compare, `;`-separated (as eval's --kv); `full` is added first if missing.
    #[arg(
        long,
        default_value = "full;quest@1024t;quest@1024t,score=meanstd;lserve@1024t"
    )]
    pub compare: String,
    /// Tokens decoded per spec.
    #[arg(long, default_value_t = 32)]
    pub n_gen: usize,
    /// When the compared specs compress (default `context`, as in eval). There is no question here: every spec is
    /// a fork of one prefill of the random context, compressed once at the fork and never while decoding (unless
    /// `every@N`), so `context` and `prompt` give the same figures; the flag sets the specs' `at` and their labels.
    #[arg(long, value_name = "context|prompt")]
    pub compress_at: Option<crate::methods::CompressAt>,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Write results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct MachineArgs {
    /// Worker threads of the "all threads" figures (default: available cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Shorter measurements (a 256 MiB bandwidth buffer, 120 ms per figure).
    #[arg(long)]
    pub quick: bool,
    /// Folder whose disk the swap-in rate is measured on (default: $HAYLOFT_HOME, where offload files usually go).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Write the profile as JSON to this file (default: stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF file (its tokenizer is used), or a known model name. Default: smollm2-135m.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Text to encode (default: Paul Graham's essays, the eval haystack, fetched on first use).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Write results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SpeedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context lengths (default: 512,2048,4096,8192, plus 16384,32768 when the model allows).
    #[arg(long, value_delimiter = ',')]
    pub contexts: Option<Vec<usize>>,
    /// Tokens generated per decode measurement.
    #[arg(long, default_value_t = 32)]
    pub n_gen: usize,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Skip the prefill or decode half.
    #[arg(long)]
    pub no_prefill: bool,
    #[arg(long)]
    pub no_decode: bool,
    /// Machine profile (from `bench machine --json`) for the roofline columns; measured briefly when absent.
    #[arg(long)]
    pub machine: Option<PathBuf>,
    /// Write results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    threads: usize,
    test: &'static str,
    ctx: usize,
    tok_s: f64,
    samples: Vec<f64>,
    /// Prefill: weight-matmul and attention operations of the whole prompt (a multiply-add counts 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    ops: Option<Ops>,
    /// Decode: bytes one step streams, weights and KV (the cache's read counter, median over the steps).
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_bytes_per_token: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_read_bytes_per_token: Option<f64>,
    /// What the roofs allow (decode: bandwidth ÷ bytes per step; prefill: tokens ÷ (matmul ops ÷ int8 peak +
    /// attention ops ÷ f32 peak)), and the measured speed's share of it.
    roofline_tok_s: f64,
    roofline_share: f64,
}

#[derive(Serialize)]
struct Ops {
    matmul: f64,
    attention: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    /// The thread counts measured, in order.
    threads: Vec<usize>,
    kernel: String,
    kv_dtype: String,
    chunk_size: usize,
    machine: MachineProfile,
    results: Vec<Row>,
    /// Per test and context: tok/s at each thread count and its speed-up over the first count.
    scaling: Vec<ScalingRow>,
}

#[derive(Serialize)]
struct ScalingRow {
    test: &'static str,
    ctx: usize,
    tok_s: Vec<f64>,
    speedup: Vec<f64>,
}

/// The roofs at `threads` threads, from a profile measured on one and on `profile.threads`: compute scales with the
/// cores used, bandwidth with the threads up to what all of them reached.
struct Roofs {
    int8_ops: f64,
    f32_flops: f64,
    read_bw: f64,
}

impl Roofs {
    fn at(p: &MachineProfile, k: &machine::PathPeak, threads: usize) -> Self {
        if threads == p.threads {
            return Roofs {
                int8_ops: k.int8_ops,
                f32_flops: k.f32_flops,
                read_bw: p.read_bw,
            };
        }
        let t = threads.min(p.cpus.max(1)) as f64;
        Roofs {
            int8_ops: k.int8_ops_1t * t,
            f32_flops: k.f32_flops_1t * t,
            read_bw: (p.read_bw_1t * t).min(p.read_bw.max(p.read_bw_1t)),
        }
    }
}

/// Rows of the same test and context side by side over the thread counts.
fn scaling(results: &[Row], threads: &[usize]) -> Vec<ScalingRow> {
    let mut out: Vec<ScalingRow> = Vec::new();
    for r in results.iter().filter(|r| r.threads == threads[0]) {
        let tok_s: Vec<f64> = threads
            .iter()
            .map(|&t| {
                results
                    .iter()
                    .find(|x| x.threads == t && x.test == r.test && x.ctx == r.ctx)
                    .map_or(f64::NAN, |x| x.tok_s)
            })
            .collect();
        let speedup = tok_s.iter().map(|v| v / tok_s[0]).collect();
        out.push(ScalingRow {
            test: r.test,
            ctx: r.ctx,
            tok_s,
            speedup,
        });
    }
    out
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Speed(a) => speed(a),
        BenchCmd::Tokenize(a) => tokenize(a),
        BenchCmd::Select(a) => select(a),
        BenchCmd::Machine(a) => machine(a),
        BenchCmd::Batch(a) => batch::run(a),
        BenchCmd::Codec(a) => super::kvcodec::run(a),
        BenchCmd::Blend(a) => super::blend::run(a),
        BenchCmd::Serve(a) => serve::run(a),
    }
}

fn machine(a: MachineArgs) -> Result<()> {
    super::init_threads(a.threads)?;
    let effort = if a.quick { Effort::QUICK } else { Effort::FULL };
    eprintln!(
        "[bench] measuring bandwidth and kernel throughput on {} threads ...",
        rayon::current_num_threads()
    );
    let mut p = machine::measure(effort, true)?;
    eprintln!("[bench] attained rates: matmuls per weight type, attention, disk ...");
    machine::measure_weights(&mut p, effort)?;
    crate::engine::cost::measure_attention(
        &mut p,
        effort.per_figure,
        crate::engine::DEFAULT_BLOCK_TOKENS,
    )?;
    crate::engine::cost::measure_glue(
        &mut p,
        effort.per_figure,
        crate::engine::DEFAULT_BLOCK_TOKENS,
    )?;
    let dir = a.disk.clone().unwrap_or_else(crate::fetch::home_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    p.disk_read_bw = Some(machine::disk_read_bandwidth(&dir, effort.disk_bytes)?);
    eprintln!(
        "[bench] {} ({} cpus): read {:.1} GB/s ({} threads), {:.1} GB/s (1 thread)",
        p.cpu,
        p.cpus,
        p.read_bw / 1e9,
        p.threads,
        p.read_bw_1t / 1e9
    );
    for k in &p.paths {
        eprintln!(
            "[bench]   {:<11} f32 {:>7.1} GFLOP/s ({:.1} on 1 thread)   int8 {:>7.1} GOP/s ({:.1} on 1 thread){}",
            k.kernel,
            k.f32_flops / 1e9,
            k.f32_flops_1t / 1e9,
            k.int8_ops / 1e9,
            k.int8_ops_1t / 1e9,
            if k.kernel == p.kernel { "   <- runs" } else { "" }
        );
    }
    for w in &p.weights {
        eprintln!(
            "[bench]   {:<6} single-token {:>6.1} GB/s, 512-token batch {:>6.1} GOP/s + {:.2} ns per activation",
            w.ty,
            w.gemv_bw / 1e9,
            w.batch_ops / 1e9,
            w.act_s * 1e9
        );
    }
    if let Some(at) = &p.attention {
        eprintln!(
            "[bench]   attention: prefill {:.1} GFLOP/s ({:.1} inside a chunk), decode {:.1} GB/s (4 query heads per KV head; {:.1} with 8, {:.1} with 2) + {:.1} us per call; matmul call {:.1} us ({:.1} us split over the pool)",
            at.prefill_ops / 1e9,
            at.diag_ops() / 1e9,
            at.decode_bw / 1e9,
            at.decode_bw_g8 / 1e9,
            at.decode_bw_g2 / 1e9,
            at.decode_call_s * 1e6,
            p.matmul_call_s * 1e6,
            p.matmul_split_s * 1e6
        );
        for r in &at.kivi {
            eprintln!(
                "[bench]   attention over {}-bit KIVI: decode {:.1} GB/s of its bytes (4 query heads per KV head; {:.1} with 8, {:.1} with 2)",
                r.bits,
                r.decode_bw / 1e9,
                r.decode_bw_g8 / 1e9,
                r.decode_bw_g2 / 1e9
            );
        }
    }
    if let Some(g) = &p.glue {
        eprintln!(
            "[bench]   glue per element: norm {:.2} ns, gated activation {:.2} ns, RoPE {:.2} ns, cache write {:.2} ns",
            g.norm_s * 1e9,
            g.gate_s * 1e9,
            g.rope_s * 1e9,
            g.append_s * 1e9
        );
    }
    if !p.reuse.is_empty() {
        let pts: Vec<String> = p
            .reuse
            .iter()
            .map(|r| format!("{} MiB {:.2}×", r.bytes >> 20, r.speedup))
            .collect();
        eprintln!(
            "[bench]   re-read working set against streamed (Q8_0 products): {}",
            pts.join(", ")
        );
    }
    if let Some(d) = p.disk_read_bw {
        eprintln!(
            "[bench]   disk read {:.2} GB/s (under {})",
            d / 1e9,
            dir.display()
        );
    }
    let s = serde_json::to_string_pretty(&p)? + "\n";
    match &a.json {
        Some(f) => std::fs::write(f, s)
            .with_context(|| format!("cannot write the machine profile {}", f.display()))?,
        None => print!("{s}"),
    }
    Ok(())
}

#[derive(Serialize)]
struct SelectRow {
    kv: String,
    kv_read_bytes_per_token: f64,
    attention_ms_per_token: f64,
    decode_tok_s: f64,
    /// (weight bytes + KV bytes read per token) / measured bandwidth, as tok/s.
    ceiling_tok_s: f64,
    samples: Vec<f64>,
}

#[derive(Serialize)]
struct SelectReport {
    model: String,
    context: usize,
    threads: usize,
    kernel: String,
    weight_bytes: usize,
    bandwidth_bytes_s: f64,
    results: Vec<SelectRow>,
}

/// Random token ids below the vocabulary (skipping the low special ids), fixed seed.
fn random_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (100 + rng % (vocab as u64 - 100)) as u32
        })
        .collect()
}

fn select(a: SelectArgs) -> Result<()> {
    if a.reps == 0 || a.n_gen == 0 || a.context == 0 {
        bail!("--context, --reps and --n-gen must be at least 1");
    }
    let mut specs = crate::methods::KvSpec::parse_list(&a.compare)?;
    for s in &mut specs {
        s.resolve_compress_at(a.compress_at, crate::methods::CompressAt::Context);
    }
    if !specs.iter().any(|s| s.is_full()) {
        specs.insert(0, crate::methods::KvSpec::full());
    }
    let l = a.model.load()?;
    let c = l.model.config();
    let mut cfg = l.session_cfg.clone();
    cfg.kv = crate::methods::KvSpec::full();
    cfg.max_context = cfg.max_context.max(a.context + a.n_gen);
    // Record what any compression method in the list reads, so each spec is a fork of one prefill.
    // ... and the queries any selector in the list indexes at the end of the prefill.
    let mut window = 64;
    for s in &specs {
        if let Some(sel) = &s.select {
            window = window.max(sel.build(c)?.query_window());
        }
    }
    cfg.observe = crate::methods::Needs {
        window,
        ..Default::default()
    };
    let toks = random_tokens(a.context + a.n_gen, c.vocab);
    let mut base = Session::new(&l.model, cfg)?;
    // The base session and one fork at a time: a copy of its cache per spec.
    let plan = base.plan_memory(Lengths::generate(a.context, 0))?;
    let mut fork_kv = 0;
    for s in &specs {
        let mut c = base.cfg.clone();
        c.kv = s.clone();
        c.observe = Default::default();
        let p = crate::engine::plan_memory(&l.model, &c, Lengths::generate(a.context, a.n_gen))?;
        fork_kv = fork_kv.max(p.kv);
    }
    base.check_plan(&plan, fork_kv)?;
    eprintln!("[bench] prefilling {} tokens ...", a.context);
    base.feed(&toks[..a.context], a.context - 1..a.context, |_, _| {})?;
    let bw = crate::kernels::membw::read_bandwidth(1 << 30, 5);
    let weights = l.model.weight_bytes();
    eprintln!(
        "[bench] read bandwidth {:.1} GB/s ({} threads), weights {:.1} MB",
        bw / 1e9,
        rayon::current_num_threads(),
        weights as f64 / 1e6
    );
    let mut results = Vec::new();
    for spec in &specs {
        let mut samples = Vec::new();
        let (mut read, mut attn) = (Vec::new(), Vec::new());
        let mut prof = Vec::new();
        for _ in 0..a.reps {
            let mut s = base.fork(spec)?;
            s.stats = Default::default();
            crate::kernels::prof::take();
            let t0 = Instant::now();
            for i in 0..a.n_gen {
                s.decode(toks[a.context + i])?;
            }
            samples.push(a.n_gen as f64 / t0.elapsed().as_secs_f64());
            prof.push(crate::kernels::prof::take());
            s.stats.finish();
            read.push(s.stats.kv_read_bytes_per_token);
            attn.push(s.stats.attention_ms_per_token);
        }
        if crate::kernels::prof::enabled() {
            eprintln!(
                "[profile] {spec}, per decoded token: {}",
                crate::kernels::prof::summary_of(&prof, (a.n_gen * a.reps) as f64)
            );
        }
        let row = SelectRow {
            kv: spec.to_string(),
            kv_read_bytes_per_token: median(&mut read),
            attention_ms_per_token: median(&mut attn),
            decode_tok_s: median(&mut samples.clone()),
            ceiling_tok_s: 0.0,
            samples,
        };
        let ceiling = bw / (weights as f64 + row.kv_read_bytes_per_token);
        results.push(SelectRow {
            ceiling_tok_s: ceiling,
            ..row
        });
    }
    let full = &results[specs.iter().position(|s| s.is_full()).unwrap_or(0)];
    let (f_read, f_attn, f_tok) = (
        full.kv_read_bytes_per_token,
        full.attention_ms_per_token,
        full.decode_tok_s,
    );
    println!(
        "| kv | KV read/token | vs full | attention ms/token | vs full | decode tok/s | vs full | ceiling tok/s | of ceiling |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} MB | {:.2}× less | {:.2} | {:.2}× less | {:.1} | {:.2}× | {:.1} | {:.0} % |",
            r.kv,
            r.kv_read_bytes_per_token / 1e6,
            f_read / r.kv_read_bytes_per_token.max(1.0),
            r.attention_ms_per_token,
            f_attn / r.attention_ms_per_token.max(1e-9),
            r.decode_tok_s,
            r.decode_tok_s / f_tok.max(1e-9),
            r.ceiling_tok_s,
            100.0 * r.decode_tok_s / r.ceiling_tok_s.max(1e-9)
        );
    }
    let report = SelectReport {
        model: c.name.clone(),
        context: a.context,
        threads: rayon::current_num_threads(),
        kernel: crate::kernels::kernel_name().to_string(),
        weight_bytes: weights,
        bandwidth_bytes_s: bw,
        results,
    };
    if let Some(p) = &a.json {
        crate::util::write_atomic(
            p,
            (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
        )?;
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let path = crate::fetch::resolve_model(a.model.as_deref())?;
    let gguf = crate::gguf::GgufFile::open(&path)?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&gguf)?;
    let text = match &a.file {
        Some(f) => crate::util::read_text_file(f)?,
        None => crate::util::read_text_file(&crate::eval::haystack::ensure_essays()?)?,
    };
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    let mut n_tokens = 0;
    for _ in 0..a.reps {
        let t = Instant::now();
        let ids = tok.encode(&text, false, false)?;
        enc.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(tok.decode(&ids));
        dec.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        n_tokens = ids.len();
    }
    let (enc, dec) = (median(&mut enc), median(&mut dec));
    println!(
        "tokenizer of {}: {} bytes -> {n_tokens} tokens; encode {enc:.0} tok/s ({:.1} MB/s), decode {dec:.0} tok/s \
         (median of {})",
        path.display(),
        text.len(),
        enc * text.len() as f64 / n_tokens.max(1) as f64 / 1e6,
        a.reps
    );
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "model": path.display().to_string(),
            "bytes": text.len(),
            "tokens": n_tokens,
            "encode_tok_s": enc,
            "decode_tok_s": dec,
            "reps": a.reps,
        });
        crate::util::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn speed(mut a: SpeedArgs) -> Result<()> {
    if a.reps == 0 || a.n_gen == 0 {
        bail!("--reps and --n-gen must be at least 1");
    }
    // --threads may be a list: the model loads once (the global pool sized for the largest count) and every count
    // runs in a pool of its own.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let thread_list: Vec<usize> = match a.model.threads.take() {
        Some(t) => t.0.iter().map(|&n| super::capped_threads(n)).collect(),
        None => vec![cores],
    };
    let most = thread_list.iter().copied().max().unwrap_or(cores);
    a.model.threads = Some(super::Threads(vec![most]));
    let l = a.model.load()?;
    let c = l.model.config();
    let contexts = a.contexts.clone().unwrap_or_else(|| {
        [512, 2048, 4096, 8192, 16384, 32768]
            .into_iter()
            .filter(|&n| n <= c.ctx_len)
            .collect()
    });
    let mut cfg = l.session_cfg.clone();
    cfg.max_context = contexts
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .max(cfg.max_context)
        + a.n_gen;
    let prof = match &a.machine {
        Some(p) => MachineProfile::load(p)?,
        None => {
            eprintln!("[bench] measuring the machine's roofs (pass --machine FILE from `bench machine` to skip)");
            machine::measure(Effort::QUICK, false)?
        }
    };
    let Some(peak) = prof.active().cloned() else {
        bail!("the machine profile lists no kernel path");
    };
    let mut results = Vec::new();
    for &nt in &thread_list {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(nt).build()?;
        let roof = Roofs::at(&prof, &peak, nt);
        pool.install(|| -> Result<()> {
            let mut session = Session::new(&l.model, cfg.clone())?;
            let deepest = contexts.iter().max().copied().unwrap_or(0);
            session.check_memory(Lengths::generate(deepest, a.n_gen))?;
            let max_ctx = deepest + a.n_gen;
            let weights = l.model.streamed_weight_bytes();
            let toks = random_tokens(max_ctx, c.vocab);
            // Warm-up: fault in the weights and grow the scratch buffers.
            session.feed(
                &toks[..cfg.chunk_size.min(64).min(toks.len())],
                0..1,
                |_, _| {},
            )?;
            session.reset();

            let steps = a.reps
                * (usize::from(!a.no_prefill) * contexts.len()
                    + usize::from(!a.no_decode) * (contexts.len() + 1));
            let progress = Progress::bar("[bench]", steps as u64, "runs", false);
            let mut step = 0u64;
            progress.line(&format!(
                "{:>8} {:>8} {:>10} {:>10} {:>9}   ({} threads, kernel {}, chunk {})",
                "test",
                "ctx",
                "tok/s",
                "roof tok/s",
                "of roof",
                rayon::current_num_threads(),
                crate::kernels::kernel_name(),
                cfg.chunk_size
            ));
            if !a.no_prefill {
                for &n in &contexts {
                    let mut samples = Vec::new();
                    crate::kernels::prof::take();
                    for _ in 0..a.reps {
                        session.reset();
                        let t0 = Instant::now();
                        session.feed(&toks[..n], n - 1..n, |_, _| {})?;
                        samples.push(n as f64 / t0.elapsed().as_secs_f64());
                        step += 1;
                        progress.set(step, format!("prefill {n}"));
                    }
                    let m = median(&mut samples.clone());
                    let ops = cost::prefill_ops(c, n);
                    let r =
                        n as f64 / (ops.matmul / roof.int8_ops + ops.attention / roof.f32_flops);
                    progress.line(&format!(
                        "{:>8} {:>8} {:>10.1} {:>10.1} {:>8.0}%",
                        "prefill",
                        n,
                        m,
                        r,
                        100.0 * m / r
                    ));
                    if crate::kernels::prof::enabled() {
                        let per = (n * a.reps) as f64;
                        progress.line(&format!(
                            "  [profile per token] {}",
                            crate::kernels::prof::summary(per)
                        ));
                    }
                    results.push(Row {
                        threads: nt,
                        test: "prefill",
                        ctx: n,
                        tok_s: m,
                        samples,
                        ops: Some(Ops {
                            matmul: ops.matmul,
                            attention: ops.attention,
                        }),
                        weight_bytes_per_token: None,
                        kv_read_bytes_per_token: None,
                        roofline_tok_s: r,
                        roofline_share: m / r,
                    });
                }
            }
            if !a.no_decode {
                for &depth in std::iter::once(&0).chain(contexts.iter()) {
                    let (mut samples, mut kv_read) = (Vec::new(), Vec::new());
                    let mut prof_decode = Vec::new();
                    for _ in 0..a.reps {
                        session.reset();
                        if depth > 0 {
                            session.feed(&toks[..depth], depth - 1..depth, |_, _| {})?;
                        }
                        session.stats = Default::default();
                        crate::kernels::prof::take();
                        let t0 = Instant::now();
                        for i in 0..a.n_gen {
                            session.decode(toks[depth + i])?;
                        }
                        samples.push(a.n_gen as f64 / t0.elapsed().as_secs_f64());
                        prof_decode.push(crate::kernels::prof::take());
                        session.stats.finish();
                        kv_read.push(session.stats.kv_read_bytes_per_token);
                        step += 1;
                        progress.set(step, format!("decode at depth {depth}"));
                    }
                    let m = median(&mut samples.clone());
                    let kv = median(&mut kv_read);
                    let r = roof.read_bw / (weights as f64 + kv);
                    progress.line(&format!(
                        "{:>8} {:>8} {:>10.1} {:>10.1} {:>8.0}%",
                        "decode",
                        depth,
                        m,
                        r,
                        100.0 * m / r
                    ));
                    if crate::kernels::prof::enabled() {
                        progress.line(&format!(
                            "  [profile per token] {}",
                            crate::kernels::prof::summary_of(
                                &prof_decode,
                                (a.n_gen * a.reps) as f64
                            )
                        ));
                    }
                    results.push(Row {
                        threads: nt,
                        test: "decode",
                        ctx: depth,
                        tok_s: m,
                        samples,
                        ops: None,
                        weight_bytes_per_token: Some(weights),
                        kv_read_bytes_per_token: Some(kv),
                        roofline_tok_s: r,
                        roofline_share: m / r,
                    });
                }
            }
            progress.finish();
            Ok(())
        })?;
    }
    let scaling = scaling(&results, &thread_list);
    if thread_list.len() > 1 {
        let head: Vec<String> = thread_list.iter().map(|t| format!("{t} threads")).collect();
        eprintln!("| test | ctx | {} |", head.join(" | "));
        eprintln!("|---|---|{}", "---|".repeat(thread_list.len()));
        for r in &scaling {
            let cells: Vec<String> = r
                .tok_s
                .iter()
                .zip(&r.speedup)
                .map(|(v, x)| format!("{v:.1} ({x:.2}×)"))
                .collect();
            eprintln!("| {} | {} | {} |", r.test, r.ctx, cells.join(" | "));
        }
    }
    let report = Report {
        model: c.name.clone(),
        threads: thread_list.clone(),
        kernel: crate::kernels::kernel_name().to_string(),
        kv_dtype: crate::methods::storage_for(&cfg.kv, cfg.kv_dtype)?.label(),
        chunk_size: cfg.chunk_size,
        machine: prof,
        results,
        scaling,
    };
    let s = serde_json::to_string_pretty(&report)?;
    match &a.json {
        Some(p) => crate::util::write_atomic(p, (s + "\n").as_bytes())?,
        None => println!("{s}"),
    }
    Ok(())
}
