//! `hayloft eval`: long-context benchmarks (NIAH, RULER, SCBench, TSort, LongBench, and sweeps over KV methods).
//!
//! Every command takes `--kv` as a list of KV specs. Specs are separated by `;`
//! (`--kv "full;snapkv@0.25,kivi4"`); without a `;`, a comma starts a new spec only where a method name follows,
//! and an option name after a comma stays with the spec before it (`--kv full,snapkv@0.25,kivi4` is the same two
//! specs).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use super::ModelArgs;
use crate::eval::haystack::Source;
use crate::eval::plan::{self, Benchmark, SweepTask};
use crate::eval::{niah, parse_depths, parse_lengths, ruler, scbench, Prompter};
use crate::methods::KvSpec;

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Needle in a haystack: a depth × length grid, drawn as a heatmap.
    Niah(NiahArgs),
    /// RULER's synthetic tasks (niah_*, vt, cwe, fwe).
    Ruler(RulerArgs),
    /// SCBench-style shared context: multi-turn or multi-request.
    Scbench(ScbenchArgs),
    /// Ada-LEval TSort-style: put shuffled essay segments back in order.
    Tsort(TsortArgs),
    /// Several tasks × lengths × KV specs in one report (accuracy vs KV memory, speed vs length).
    Sweep(SweepArgs),
    /// A LongBench JSONL file, scored with LongBench's metrics.
    Longbench(LongbenchArgs),
}

/// Options every eval command takes.
#[derive(Args, Clone, Debug)]
pub struct EvalCommon {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compress: super::CompressArgs,
    /// Output folder (default: `./runs/<time>-<command>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out: skip the cases already in its results.jsonl.
    #[arg(long)]
    pub resume: bool,
    /// Seed of the generated cases (same seed, same prompts).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Plain completion prompts even if the model has a chat template (base-model style).
    #[arg(long)]
    pub no_chat: bool,
    /// A text file to use as the essay haystack instead of Paul Graham's essays.
    #[arg(long)]
    pub haystack_file: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// With several KV specs: run every spec from its own prefill instead of prefilling each single-turn case once
    /// with the full cache and forking a copy per spec (same outputs, slower; TTFT then includes each spec's own
    /// prefill).
    #[arg(long)]
    pub no_share_prefill: bool,
    /// Head ablation (the Retrieval Head paper's masking experiment): a scores file from `hayloft heads`. Zeroes the
    /// attention output of the `--mask-top` best-scoring query heads, or with `--mask-random` of as many query heads
    /// drawn at random (seeded by --seed) from the others.
    #[arg(long)]
    pub mask_heads: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub mask_top: usize,
    #[arg(long)]
    pub mask_random: bool,
}

#[derive(Args, Debug)]
pub struct NiahArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    /// Target lengths in tokens (prompt + answer budget), e.g. 1k,2k,4k,8k.
    #[arg(long, default_value = "1k,2k,4k,8k")]
    pub lengths: String,
    /// Needle depths in percent: a list (0,50,100) or a range start:end:step (0:100:10).
    #[arg(long, default_value = "0:100:10")]
    pub depths: String,
    /// essays (Paul Graham) or noise (RULER's repeated sentences).
    #[arg(long, default_value = "essays")]
    pub haystack: String,
    /// number (RULER-style key → 7-digit value) or kamradt (the San Francisco sandwich).
    #[arg(long, default_value = "number")]
    pub needle: String,
    /// Needles per case (number needle only).
    #[arg(long, default_value_t = 1)]
    pub needles: usize,
    /// Cases per (length, depth).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new: usize,
}

#[derive(Args, Debug)]
pub struct RulerArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    /// `all` or a list of: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Target lengths in tokens.
    #[arg(long, alias = "length", default_value = "4k")]
    pub lengths: String,
    /// Cases per task and length.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
}

#[derive(Args, Debug)]
pub struct ScbenchArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    /// multi-turn or multi-request.
    #[arg(long, default_value = "multi-turn")]
    pub mode: String,
    /// `all` or a list of: kv, prefix_suffix, vt, mf, many_shot.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Target lengths in tokens (context + first question + its answer budget).
    #[arg(long, alias = "length", default_value = "4k")]
    pub lengths: String,
    /// Questions per shared context.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Cases per task and length.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Multi-turn: feed the model's own answers back instead of the gold ones.
    #[arg(long)]
    pub own_answers: bool,
}

#[derive(Args, Debug)]
pub struct TsortArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    #[arg(long, alias = "length", default_value = "2k")]
    pub lengths: String,
    /// Segments to order (2..=9).
    #[arg(long, default_value_t = 4)]
    pub segments: usize,
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// essays or noise.
    #[arg(long, default_value = "essays")]
    pub haystack: String,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    /// Task families and tasks: niah, ruler (all RULER tasks), `ruler:<task>`, scbench (all, multi-turn),
    /// `scbench:<task>`, tsort.
    #[arg(long, default_value = "niah,ruler")]
    pub tasks: String,
    #[arg(long, default_value = "1k,2k,4k")]
    pub lengths: String,
    /// NIAH depths.
    #[arg(long, default_value = "0:100:25")]
    pub depths: String,
    /// Cases per task and length (per depth for NIAH).
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Questions per SCBench context.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
}

#[derive(Args, Debug)]
pub struct LongbenchArgs {
    #[command(flatten)]
    pub common: EvalCommon,
    /// LongBench JSONL file(s).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Prompt limit in tokens, LongBench's `pred.py` `max_length`: a longer prompt (the filled-in template,
    /// tokenized whole) keeps its first and last halves. Default and at most: the session's context less the
    /// answer budget.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Run at most this many records per file.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Wrap the prompts (except the few-shot and code datasets') in the model's chat template. LongBench's pred.py
    /// does so only for the model families it lists; by default the prompt is its plain template.
    #[arg(long)]
    pub chat_template: bool,
}

impl NiahArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        let lengths = parse_lengths(&self.lengths)?;
        let depths = parse_depths(&self.depths)?;
        let params = niah::NiahParams {
            haystack: Source::parse(&self.haystack)?,
            needle: niah::Needle::parse(&self.needle)?,
            needles: self.needles,
            max_new: self.max_new,
        };
        if self.needles == 0 || self.samples == 0 || self.max_new == 0 {
            bail!("--needles, --samples and --max-new must be at least 1");
        }
        Ok(Benchmark::Niah(plan::Niah {
            params,
            lengths,
            depths,
            samples: self.samples,
        }))
    }
}

impl RulerArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        let tasks = ruler::parse_tasks(&self.tasks)?;
        let lengths = parse_lengths(&self.lengths)?;
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        Ok(Benchmark::Ruler(plan::Ruler {
            tasks,
            lengths,
            samples: self.samples,
        }))
    }
}

impl ScbenchArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        let tasks = scbench::parse_tasks(&self.tasks)?;
        let mode = scbench::parse_mode(&self.mode)?;
        let lengths = parse_lengths(&self.lengths)?;
        if self.samples == 0 || self.turns == 0 {
            bail!("--samples and --turns must be at least 1");
        }
        Ok(Benchmark::Scbench(plan::Scbench {
            tasks,
            mode,
            turns: self.turns,
            lengths,
            samples: self.samples,
            own_answers: self.own_answers,
        }))
    }
}

impl TsortArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        let lengths = parse_lengths(&self.lengths)?;
        let source = Source::parse(&self.haystack)?;
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        Ok(Benchmark::Tsort(plan::Tsort {
            source,
            segments: self.segments,
            lengths,
            samples: self.samples,
        }))
    }
}

impl SweepArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        let lengths = parse_lengths(&self.lengths)?;
        let depths = parse_depths(&self.depths)?;
        if self.samples == 0 || self.turns == 0 {
            bail!("--samples and --turns must be at least 1");
        }
        Ok(Benchmark::Sweep(plan::Sweep {
            tasks: SweepTask::parse_list(&self.tasks)?,
            lengths,
            depths,
            samples: self.samples,
            turns: self.turns,
        }))
    }
}

impl LongbenchArgs {
    fn benchmark(&self) -> Result<Benchmark> {
        Ok(Benchmark::Longbench(plan::Longbench::load(
            &self.data,
            self.limit,
            self.max_length,
            self.chat_template,
        )?))
    }
}

/// Checks the KV specs, then loads the model (with the head mask of `--mask-heads`). The session's own spec is set
/// per case.
fn load(common: &EvalCommon) -> Result<(Vec<KvSpec>, super::Loaded)> {
    let specs = KvSpec::parse_list(&common.model.kv)?;
    let mut m = common.model.clone();
    m.kv = KvSpec::full().to_string();
    let mut loaded = m.load()?;
    if let Some(path) = &common.mask_heads {
        let mc = loaded.model.config();
        loaded.session_cfg.head_mask = crate::eval::ablation::head_mask(
            path,
            mc.n_layers,
            mc.n_heads,
            common.mask_top,
            common.mask_random,
            common.seed,
        )?;
        if !common.quiet {
            let masked: Vec<String> = loaded
                .session_cfg
                .head_mask
                .iter()
                .enumerate()
                .filter(|(_, &m)| m)
                .map(|(i, _)| format!("{}.{}", i / mc.n_heads, i % mc.n_heads))
                .collect();
            eprintln!(
                "[eval] masking query heads (layer.head): {}",
                masked.join(" ")
            );
        }
    } else if common.mask_top > 0 || common.mask_random {
        bail!("--mask-top and --mask-random need --mask-heads FILE (from `hayloft heads`)");
    }
    Ok((specs, loaded))
}

/// Checks the arguments, loads the model, runs the benchmark under every spec and prints the report.
pub fn run(cmd: EvalCmd) -> Result<()> {
    let (common, bench) = match &cmd {
        EvalCmd::Niah(a) => (&a.common, a.benchmark()?),
        EvalCmd::Ruler(a) => (&a.common, a.benchmark()?),
        EvalCmd::Scbench(a) => (&a.common, a.benchmark()?),
        EvalCmd::Tsort(a) => (&a.common, a.benchmark()?),
        EvalCmd::Sweep(a) => (&a.common, a.benchmark()?),
        EvalCmd::Longbench(a) => (&a.common, a.benchmark()?),
    };
    let (specs, loaded) = load(common)?;
    let prompter = Prompter::new(
        &loaded.tokenizer,
        loaded.chat_template.as_ref().map_err(|e| e.clone()),
        common.no_chat,
    );
    let opts = plan::RunOptions {
        out: common.out.clone(),
        resume: common.resume,
        quiet: common.quiet,
        share_prefill: !common.no_share_prefill,
        compress_at: common.compress.compress_at,
        haystack_file: common.haystack_file.clone(),
        seed: common.seed,
    };
    let report = plan::run(
        &bench,
        &specs,
        &loaded.model,
        prompter,
        &loaded.session_cfg,
        &opts,
    )?;
    println!("{}", report.text);
    if !common.quiet {
        for f in report.files {
            eprintln!("[eval] wrote {}", f.display());
        }
    }
    Ok(())
}
