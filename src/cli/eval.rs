//! `hayloft eval`: long-context benchmarks (NIAH, RULER, SCBench, TSort, LongBench, and sweeps over KV methods).
//!
//! Every command takes `--kv` as a list of KV specs. Specs are separated by `;`
//! (`--kv "full;snapkv@0.25,kivi4"`); without a `;`, a comma starts a new spec only where a method name follows,
//! and an option name after a comma stays with the spec before it (`--kv full,snapkv@0.25,kivi4` is the same two
//! specs).

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::ModelArgs;
use crate::eval::haystack::{Haystacks, Source};
use crate::eval::runner::{Plan, ResultsFile, Runner};
use crate::eval::{
    self, niah, parse_lengths, ruler, scbench, tsort, Case, CaseMeta, Mode, Prompter,
};
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
    /// Output folder (default: ./runs/<time>-<command>).
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
    /// Task families and tasks: niah, ruler (all RULER tasks), ruler:<task>, scbench (all, multi-turn),
    /// scbench:<task>, tsort.
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
    /// Prompt limit in tokens (context cut in the middle beyond it). Default: the session's context.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Run at most this many records per file.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Splits a `--kv` list into specs (see the module doc).
pub fn parse_kv_list(s: &str) -> Result<Vec<KvSpec>> {
    KvSpec::parse_list(s)
}

/// Depths as a list (`0,50,100`) or a range (`0:100:10`).
pub fn parse_depths(s: &str) -> Result<Vec<f64>> {
    let bad = || {
        anyhow::anyhow!("--depths '{s}': expected a list like 0,50,100 or a range like 0:100:10")
    };
    let mut out = Vec::new();
    if s.contains(':') {
        let parts: Vec<f64> = s
            .split(':')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [a, b, step] = parts[..] else {
            return Err(bad());
        };
        if step <= 0.0 || b < a {
            return Err(bad());
        }
        let mut d = a;
        while d <= b + 1e-9 {
            out.push((d * 1e6).round() / 1e6);
            d += step;
        }
    } else {
        for p in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            out.push(p.parse::<f64>().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    if let Some(d) = out.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        bail!("depth {d} is outside 0..=100 percent");
    }
    Ok(out)
}

/// `./runs/<UTC time>-<what>`.
fn default_out(what: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from("runs").join(format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{what}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    ))
}

fn check_lengths(lengths: &[usize], max_context: usize) -> Result<()> {
    if let Some(l) = lengths.iter().find(|l| **l > max_context) {
        bail!(
            "length {l} is above this session's context of {max_context} tokens (the model's trained context, or \
             --max-context); use shorter --lengths"
        );
    }
    Ok(())
}

/// Loads the model, runs the plans under every spec, writes the report and prints it.
fn run_plans<'g>(
    common: &EvalCommon,
    what: &str,
    own_answers: bool,
    lengths: &[usize],
    make_plans: impl FnOnce(Prompter<'g>, &'g RefCell<Haystacks>, usize) -> Result<Vec<Plan<'g>>>,
    loaded: &'g super::Loaded,
    hays: &'g RefCell<Haystacks>,
) -> Result<()> {
    let specs = parse_kv_list(&common.model.kv)?;
    let max_ctx = loaded.session_cfg.max_context;
    check_lengths(lengths, max_ctx)?;
    let prompter = Prompter::new(
        &loaded.tokenizer,
        loaded.chat_template.as_ref().map_err(|e| e.clone()),
        common.no_chat,
    );
    let mut plans = make_plans(prompter, hays, max_ctx)?;
    let out = common.out.clone().unwrap_or_else(|| default_out(what));
    let results = ResultsFile::open(&out, common.resume)?;
    if !common.quiet {
        eprintln!(
            "[eval] {what}: {} cases × {} KV specs ({}), prompts: {}, writing to {}",
            plans.len(),
            specs.len(),
            specs
                .iter()
                .map(|s| s.label())
                .collect::<Vec<_>>()
                .join("; "),
            if prompter.is_chat() {
                "chat template"
            } else {
                "plain completion"
            },
            out.display()
        );
    }
    let mut runner = Runner::new(&loaded.model, prompter, loaded.session_cfg.clone(), results);
    runner.own_answers = own_answers;
    runner.quiet = common.quiet;
    runner.share_prefill = !common.no_share_prefill;
    runner.run_all(&mut plans, &specs)?;
    let files = eval::report::write(&out, what)?;
    let report = std::fs::read_to_string(out.join("report.md"))?;
    println!("{report}");
    if !common.quiet {
        for f in files {
            eprintln!("[eval] wrote {}", f.display());
        }
    }
    Ok(())
}

fn load(common: &EvalCommon) -> Result<super::Loaded> {
    // Specs are checked before the model loads; the session's own spec is set per case.
    parse_kv_list(&common.model.kv)?;
    let mut m = common.model.clone();
    m.kv = "full".into();
    let mut loaded = m.load()?;
    if let Some(path) = &common.mask_heads {
        let mc = loaded.model.config();
        loaded.session_cfg.head_mask = head_mask(
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
    Ok(loaded)
}

/// The query-head mask for the masking experiment: the `top` best-scoring heads of a `hayloft heads` file, or (random)
/// `top` heads drawn from the rest.
fn head_mask(
    path: &std::path::Path,
    n_layers: usize,
    n_heads: usize,
    top: usize,
    random: bool,
    seed: u64,
) -> Result<Vec<bool>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read head scores from {}", path.display()))?;
    let r: crate::methods::heads::HeadScores = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a `hayloft heads` scores file", path.display()))?;
    if r.q_scores.len() != n_layers || r.q_scores.iter().any(|row| row.len() != n_heads) {
        bail!(
            "{}: scores for {} layers × {} query heads, the model has {n_layers} × {n_heads}",
            path.display(),
            r.q_scores.len(),
            r.q_scores.first().map_or(0, Vec::len)
        );
    }
    if top == 0 || top >= n_layers * n_heads / 2 {
        bail!(
            "--mask-top must be between 1 and {} (half the model's query heads)",
            n_layers * n_heads / 2 - 1
        );
    }
    let mut ranked: Vec<(f64, usize)> = r
        .q_scores
        .iter()
        .flatten()
        .copied()
        .enumerate()
        .map(|(i, s)| (s, i))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut mask = vec![false; n_layers * n_heads];
    if random {
        let mut rest: Vec<usize> = ranked[top..].iter().map(|&(_, i)| i).collect();
        rest.sort_unstable();
        eval::Rng::new(seed ^ 0x0068_6561_6473).shuffle(&mut rest);
        rest[..top].iter().for_each(|&i| mask[i] = true);
    } else {
        ranked[..top].iter().for_each(|&(_, i)| mask[i] = true);
    }
    Ok(mask)
}

fn niah_plans<'g>(
    p: Prompter<'g>,
    hays: &'g RefCell<Haystacks>,
    params: niah::NiahParams,
    lengths: &[usize],
    depths: &[f64],
    samples: usize,
    seed: u64,
) -> Vec<Plan<'g>> {
    let mut plans = Vec::new();
    for &len in lengths {
        for &d in depths {
            for s in 0..samples {
                let params = params.clone();
                plans.push(Plan {
                    meta: CaseMeta {
                        task: niah::task_name(&params),
                        target_len: len,
                        depth: Some(d),
                        sample: s,
                        seed,
                    },
                    make: Box::new(move || {
                        niah::case(&p, &mut hays.borrow_mut(), &params, len, d, s, seed)
                    }),
                });
            }
        }
    }
    plans
}

/// Plans for every task × length × sample: `name(task)` is the recorded task name, `make(task, length, sample)`
/// generates the case when it runs.
fn task_plans<'g>(
    tasks: &[String],
    lengths: &[usize],
    samples: usize,
    seed: u64,
    name: impl Fn(&str) -> String,
    make: impl Fn(String, usize, usize) -> Box<dyn FnMut() -> Result<Case> + 'g>,
) -> Vec<Plan<'g>> {
    let mut plans = Vec::new();
    for t in tasks {
        for &len in lengths {
            for s in 0..samples {
                plans.push(Plan {
                    meta: CaseMeta {
                        task: name(t),
                        target_len: len,
                        depth: None,
                        sample: s,
                        seed,
                    },
                    make: make(t.clone(), len, s),
                });
            }
        }
    }
    plans
}

fn ruler_plans<'g>(
    p: Prompter<'g>,
    hays: &'g RefCell<Haystacks>,
    tasks: &[String],
    lengths: &[usize],
    samples: usize,
    seed: u64,
) -> Vec<Plan<'g>> {
    task_plans(
        tasks,
        lengths,
        samples,
        seed,
        |t| format!("ruler_{t}"),
        |t, len, s| Box::new(move || ruler::case(&p, &mut hays.borrow_mut(), &t, len, s, seed)),
    )
}

#[allow(clippy::too_many_arguments)]
fn scbench_plans<'g>(
    p: Prompter<'g>,
    hays: &'g RefCell<Haystacks>,
    tasks: &[String],
    mode: Mode,
    turns: usize,
    lengths: &[usize],
    samples: usize,
    seed: u64,
) -> Vec<Plan<'g>> {
    task_plans(
        tasks,
        lengths,
        samples,
        seed,
        |t| scbench::task_name(t, mode),
        |t, len, s| {
            Box::new(move || {
                scbench::case(&p, &mut hays.borrow_mut(), &t, mode, turns, len, s, seed)
            })
        },
    )
}

fn tsort_plans<'g>(
    p: Prompter<'g>,
    hays: &'g RefCell<Haystacks>,
    source: Source,
    k: usize,
    lengths: &[usize],
    samples: usize,
    seed: u64,
) -> Vec<Plan<'g>> {
    let mut plans = Vec::new();
    for &len in lengths {
        for s in 0..samples {
            plans.push(Plan {
                meta: CaseMeta {
                    task: "tsort".into(),
                    target_len: len,
                    depth: None,
                    sample: s,
                    seed,
                },
                make: Box::new(move || {
                    tsort::case(&p, &mut hays.borrow_mut(), source, k, len, s, seed)
                }),
            });
        }
    }
    plans
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Niah(a) => {
            let lengths = parse_lengths(&a.lengths)?;
            let depths = parse_depths(&a.depths)?;
            let params = niah::NiahParams {
                haystack: Source::parse(&a.haystack)?,
                needle: niah::Needle::parse(&a.needle)?,
                needles: a.needles,
                max_new: a.max_new,
            };
            if a.needles == 0 || a.samples == 0 || a.max_new == 0 {
                bail!("--needles, --samples and --max-new must be at least 1");
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(a.common.haystack_file.clone()));
            run_plans(
                &a.common,
                "niah",
                false,
                &lengths,
                |p, h, _| {
                    Ok(niah_plans(
                        p,
                        h,
                        params,
                        &lengths,
                        &depths,
                        a.samples,
                        a.common.seed,
                    ))
                },
                &loaded,
                &hays,
            )
        }
        EvalCmd::Ruler(a) => {
            let tasks = ruler::parse_tasks(&a.tasks)?;
            let lengths = parse_lengths(&a.lengths)?;
            if a.samples == 0 {
                bail!("--samples must be at least 1");
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(a.common.haystack_file.clone()));
            run_plans(
                &a.common,
                "ruler",
                false,
                &lengths,
                |p, h, _| {
                    Ok(ruler_plans(
                        p,
                        h,
                        &tasks,
                        &lengths,
                        a.samples,
                        a.common.seed,
                    ))
                },
                &loaded,
                &hays,
            )
        }
        EvalCmd::Scbench(a) => {
            let tasks = scbench::parse_tasks(&a.tasks)?;
            let mode = scbench::parse_mode(&a.mode)?;
            let lengths = parse_lengths(&a.lengths)?;
            if a.samples == 0 || a.turns == 0 {
                bail!("--samples and --turns must be at least 1");
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(a.common.haystack_file.clone()));
            run_plans(
                &a.common,
                "scbench",
                a.own_answers,
                &lengths,
                |p, h, _| {
                    Ok(scbench_plans(
                        p,
                        h,
                        &tasks,
                        mode,
                        a.turns,
                        &lengths,
                        a.samples,
                        a.common.seed,
                    ))
                },
                &loaded,
                &hays,
            )
        }
        EvalCmd::Tsort(a) => {
            let lengths = parse_lengths(&a.lengths)?;
            let source = Source::parse(&a.haystack)?;
            if a.samples == 0 {
                bail!("--samples must be at least 1");
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(a.common.haystack_file.clone()));
            run_plans(
                &a.common,
                "tsort",
                false,
                &lengths,
                |p, h, _| {
                    Ok(tsort_plans(
                        p,
                        h,
                        source,
                        a.segments,
                        &lengths,
                        a.samples,
                        a.common.seed,
                    ))
                },
                &loaded,
                &hays,
            )
        }
        EvalCmd::Sweep(a) => {
            let lengths = parse_lengths(&a.lengths)?;
            let depths = parse_depths(&a.depths)?;
            if a.samples == 0 || a.turns == 0 {
                bail!("--samples and --turns must be at least 1");
            }
            // Check every task name before loading anything.
            let mut fams: Vec<(String, Option<String>)> = Vec::new();
            for t in a.tasks.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let (fam, sub) = match t.split_once(':') {
                    Some((f, s)) => (f, Some(s.to_string())),
                    None => (t, None),
                };
                match (fam, &sub) {
                    ("niah" | "tsort", None) => {}
                    ("ruler", Some(s)) => {
                        ruler::parse_tasks(s)?;
                    }
                    ("scbench", Some(s)) => {
                        scbench::parse_tasks(s)?;
                    }
                    ("ruler" | "scbench", None) => {}
                    _ => bail!(
                        "unknown sweep task '{t}' (valid: niah, ruler, ruler:<task>, scbench, scbench:<task>, tsort; \
                         RULER tasks: {}; SCBench tasks: {})",
                        ruler::TASKS.join(", "),
                        scbench::TASKS.join(", ")
                    ),
                }
                fams.push((fam.to_string(), sub));
            }
            if fams.is_empty() {
                bail!("--tasks is empty");
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(a.common.haystack_file.clone()));
            let seed = a.common.seed;
            run_plans(
                &a.common,
                "sweep",
                false,
                &lengths,
                |p, h, _| {
                    let mut plans = Vec::new();
                    for (fam, sub) in &fams {
                        match fam.as_str() {
                            "niah" => plans.extend(niah_plans(
                                p,
                                h,
                                niah::NiahParams::default(),
                                &lengths,
                                &depths,
                                a.samples,
                                seed,
                            )),
                            "ruler" => {
                                let ts = ruler::parse_tasks(sub.as_deref().unwrap_or("all"))?;
                                plans.extend(ruler_plans(p, h, &ts, &lengths, a.samples, seed));
                            }
                            "scbench" => {
                                let ts = scbench::parse_tasks(sub.as_deref().unwrap_or("all"))?;
                                plans.extend(scbench_plans(
                                    p,
                                    h,
                                    &ts,
                                    Mode::MultiTurn,
                                    a.turns,
                                    &lengths,
                                    a.samples,
                                    seed,
                                ));
                            }
                            _ => plans.extend(tsort_plans(
                                p,
                                h,
                                Source::Essays,
                                4,
                                &lengths,
                                a.samples,
                                seed,
                            )),
                        }
                    }
                    Ok(plans)
                },
                &loaded,
                &hays,
            )
        }
        EvalCmd::Longbench(a) => {
            let mut data = Vec::new();
            for f in &a.data {
                let mut recs = eval::longbench::load(f)?;
                for r in &recs {
                    eval::longbench::dataset(&r.dataset)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                }
                if let Some(n) = a.limit {
                    recs.truncate(n);
                }
                data.push((f.clone(), recs));
            }
            let loaded = load(&a.common)?;
            let hays = RefCell::new(Haystacks::new(None));
            let seed = a.common.seed;
            let data_ref = &data;
            let max_length = a.max_length;
            run_plans(
                &a.common,
                "longbench",
                false,
                &[],
                |p, _, max_ctx| {
                    let max_len = max_length.unwrap_or(max_ctx).min(max_ctx);
                    let mut plans = Vec::new();
                    let mut offset = 0;
                    for (_, recs) in data_ref {
                        for (i, r) in recs.iter().enumerate() {
                            let idx = offset + i;
                            plans.push(Plan {
                                meta: CaseMeta {
                                    task: format!("longbench_{}", r.dataset),
                                    target_len: 0,
                                    depth: None,
                                    sample: idx,
                                    seed,
                                },
                                make: Box::new(move || {
                                    eval::longbench::case(&p, r, idx, max_len, seed)
                                }),
                            });
                        }
                        offset += recs.len();
                    }
                    Ok(plans)
                },
                &loaded,
                &hays,
            )
        }
    }
}

/// For tests: the default output folder name pattern.
pub fn default_out_for(what: &str) -> PathBuf {
    default_out(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_lists_split_on_methods_and_semicolons() {
        let v = parse_kv_list("full").unwrap();
        assert_eq!(v.len(), 1);
        assert!(parse_kv_list("full;full").is_err());
        let e = format!("{:#}", parse_kv_list("full,nope@0.5").unwrap_err());
        assert!(e.contains("nope") && e.contains("full"), "{e}");
        assert!(parse_kv_list("").is_err());
    }

    #[test]
    fn depths_parse() {
        assert_eq!(
            parse_depths("0:100:25").unwrap(),
            vec![0.0, 25.0, 50.0, 75.0, 100.0]
        );
        assert_eq!(parse_depths("0:100:10").unwrap().len(), 11);
        assert_eq!(parse_depths("0, 50,100").unwrap(), vec![0.0, 50.0, 100.0]);
        assert!(parse_depths("0:100").is_err());
        assert!(parse_depths("150").is_err());
        assert!(parse_depths("x").is_err());
        let p = default_out_for("niah");
        assert!(p.starts_with("runs") && p.to_string_lossy().ends_with("-niah"));
    }
}
