//! What an eval command runs: a [`Benchmark`] (one typed parameter struct per benchmark), the [`Plan`]s it makes
//! (every case it will run, known by its metadata before it is generated), and [`run`], which runs the plans under
//! every KV spec and writes the report.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::haystack::{Haystacks, Source};
use super::runner::{Plan, ResultsFile, Runner};
use super::{longbench, niah, ruler, scbench, tsort, Case, CaseMeta, Mode, Prompter};
use crate::engine::SessionConfig;
use crate::methods::{CompressAt, KvSpec};
use crate::model::Model;

/// What every case is generated with: the prompt renderer, the haystacks (loaded on first use) and the run's seed.
#[derive(Clone, Copy)]
pub struct Gen<'g> {
    pub prompter: Prompter<'g>,
    pub hays: &'g RefCell<Haystacks>,
    pub seed: u64,
}

/// Needle in a haystack: a depth × length grid.
pub struct Niah {
    pub params: niah::NiahParams,
    pub lengths: Vec<usize>,
    /// Needle depths in percent.
    pub depths: Vec<f64>,
    /// Cases per (length, depth).
    pub samples: usize,
}

/// RULER's synthetic tasks.
pub struct Ruler {
    pub tasks: Vec<String>,
    pub lengths: Vec<usize>,
    /// Cases per task and length.
    pub samples: usize,
}

/// SCBench-style shared-context conversations.
pub struct Scbench {
    pub tasks: Vec<String>,
    pub mode: Mode,
    /// Questions per shared context.
    pub turns: usize,
    pub lengths: Vec<usize>,
    /// Cases per task and length.
    pub samples: usize,
    /// Multi-turn: feed the model's own answers back instead of the gold ones.
    pub own_answers: bool,
}

/// Ada-LEval TSort-style segment ordering.
pub struct Tsort {
    pub source: Source,
    /// Segments to order.
    pub segments: usize,
    pub lengths: Vec<usize>,
    /// Cases per length.
    pub samples: usize,
}

/// One entry of a sweep's task list.
#[derive(Clone, Debug, PartialEq)]
pub enum SweepTask {
    /// NIAH with the default needle and haystack, over the sweep's depths.
    Niah,
    /// These RULER tasks.
    Ruler(Vec<String>),
    /// These SCBench tasks, multi-turn.
    Scbench(Vec<String>),
    /// TSort of 4 essay segments.
    Tsort,
}

impl SweepTask {
    /// Parses a `--tasks` list: niah, ruler (all RULER tasks), `ruler:<tasks>`, scbench (all), `scbench:<tasks>`, tsort.
    pub fn parse_list(s: &str) -> Result<Vec<SweepTask>> {
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let task = match t.split_once(':') {
                None if t == "niah" => SweepTask::Niah,
                None if t == "tsort" => SweepTask::Tsort,
                None if t == "ruler" => SweepTask::Ruler(ruler::parse_tasks("all")?),
                None if t == "scbench" => SweepTask::Scbench(scbench::parse_tasks("all")?),
                Some(("ruler", sub)) => SweepTask::Ruler(ruler::parse_tasks(sub)?),
                Some(("scbench", sub)) => SweepTask::Scbench(scbench::parse_tasks(sub)?),
                _ => bail!(
                    "unknown sweep task '{t}' (valid: niah, ruler, ruler:<task>, scbench, scbench:<task>, tsort; \
                     RULER tasks: {}; SCBench tasks: {})",
                    ruler::TASKS.join(", "),
                    scbench::TASKS.join(", ")
                ),
            };
            out.push(task);
        }
        if out.is_empty() {
            bail!("--tasks is empty");
        }
        Ok(out)
    }
}

/// Several task families × lengths in one run.
pub struct Sweep {
    pub tasks: Vec<SweepTask>,
    pub lengths: Vec<usize>,
    /// NIAH depths in percent.
    pub depths: Vec<f64>,
    /// Cases per task and length (per depth for NIAH).
    pub samples: usize,
    /// Questions per SCBench context.
    pub turns: usize,
}

/// LongBench JSONL files, their records loaded and checked.
pub struct Longbench {
    pub files: Vec<(PathBuf, Vec<longbench::Sample>)>,
    /// Prompt limit in tokens (default: the session's context).
    pub max_length: Option<usize>,
    /// Wrap the prompts in the model's chat template (LongBench's `pred.py` does so only for the families it lists).
    pub chat_template: bool,
}

impl Longbench {
    /// Loads every file (at most `limit` records of each), checking every record's dataset name.
    pub fn load(
        files: &[PathBuf],
        limit: Option<usize>,
        max_length: Option<usize>,
        chat_template: bool,
    ) -> Result<Self> {
        let mut out = Vec::new();
        for f in files {
            let mut recs = longbench::load(f)?;
            for r in &recs {
                longbench::dataset(&r.dataset)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            }
            if let Some(n) = limit {
                recs.truncate(n);
            }
            out.push((f.clone(), recs));
        }
        Ok(Longbench {
            files: out,
            max_length,
            chat_template,
        })
    }
}

/// One eval command's benchmark.
pub enum Benchmark {
    Niah(Niah),
    Ruler(Ruler),
    Scbench(Scbench),
    Tsort(Tsort),
    Sweep(Sweep),
    Longbench(Longbench),
}

impl Benchmark {
    /// The command's name: the report's title and the default output folder's suffix.
    pub fn name(&self) -> &'static str {
        match self {
            Benchmark::Niah(_) => "niah",
            Benchmark::Ruler(_) => "ruler",
            Benchmark::Scbench(_) => "scbench",
            Benchmark::Tsort(_) => "tsort",
            Benchmark::Sweep(_) => "sweep",
            Benchmark::Longbench(_) => "longbench",
        }
    }

    /// The target lengths (none for LongBench, whose data sets them).
    pub fn lengths(&self) -> &[usize] {
        match self {
            Benchmark::Niah(b) => &b.lengths,
            Benchmark::Ruler(b) => &b.lengths,
            Benchmark::Scbench(b) => &b.lengths,
            Benchmark::Tsort(b) => &b.lengths,
            Benchmark::Sweep(b) => &b.lengths,
            Benchmark::Longbench(_) => &[],
        }
    }

    fn own_answers(&self) -> bool {
        matches!(self, Benchmark::Scbench(b) if b.own_answers)
    }

    /// Every case to run, in order; `max_context` is the session's context (LongBench's default prompt limit).
    pub fn plans<'g>(&'g self, g: Gen<'g>, max_context: usize) -> Vec<Plan<'g>> {
        match self {
            Benchmark::Niah(b) => niah_plans(g, b),
            Benchmark::Ruler(b) => ruler_plans(g, b),
            Benchmark::Scbench(b) => scbench_plans(g, b),
            Benchmark::Tsort(b) => tsort_plans(g, b),
            Benchmark::Sweep(b) => sweep_plans(g, b),
            Benchmark::Longbench(b) => longbench_plans(g, b, max_context),
        }
    }
}

pub fn niah_plans<'g>(g: Gen<'g>, b: &Niah) -> Vec<Plan<'g>> {
    let Gen {
        prompter: p,
        hays,
        seed,
    } = g;
    let mut plans = Vec::new();
    for &len in &b.lengths {
        for &d in &b.depths {
            for s in 0..b.samples {
                let params = b.params.clone();
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

pub fn ruler_plans<'g>(g: Gen<'g>, b: &Ruler) -> Vec<Plan<'g>> {
    let Gen {
        prompter: p,
        hays,
        seed,
    } = g;
    task_plans(
        &b.tasks,
        &b.lengths,
        b.samples,
        seed,
        |t| format!("ruler_{t}"),
        |t, len, s| Box::new(move || ruler::case(&p, &mut hays.borrow_mut(), &t, len, s, seed)),
    )
}

pub fn scbench_plans<'g>(g: Gen<'g>, b: &Scbench) -> Vec<Plan<'g>> {
    let Gen {
        prompter: p,
        hays,
        seed,
    } = g;
    let (mode, turns) = (b.mode, b.turns);
    task_plans(
        &b.tasks,
        &b.lengths,
        b.samples,
        seed,
        |t| scbench::task_name(t, mode),
        |t, len, s| {
            Box::new(move || {
                scbench::case(&p, &mut hays.borrow_mut(), &t, mode, turns, len, s, seed)
            })
        },
    )
}

pub fn tsort_plans<'g>(g: Gen<'g>, b: &Tsort) -> Vec<Plan<'g>> {
    let Gen {
        prompter: p,
        hays,
        seed,
    } = g;
    let (source, k) = (b.source, b.segments);
    let mut plans = Vec::new();
    for &len in &b.lengths {
        for s in 0..b.samples {
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

/// The plans of every sweep task in turn, each over the sweep's lengths and samples.
pub fn sweep_plans<'g>(g: Gen<'g>, b: &Sweep) -> Vec<Plan<'g>> {
    let (lengths, samples) = (b.lengths.clone(), b.samples);
    let mut plans = Vec::new();
    for task in &b.tasks {
        plans.extend(match task {
            SweepTask::Niah => niah_plans(
                g,
                &Niah {
                    params: niah::NiahParams::default(),
                    lengths: lengths.clone(),
                    depths: b.depths.clone(),
                    samples,
                },
            ),
            SweepTask::Ruler(tasks) => ruler_plans(
                g,
                &Ruler {
                    tasks: tasks.clone(),
                    lengths: lengths.clone(),
                    samples,
                },
            ),
            SweepTask::Scbench(tasks) => scbench_plans(
                g,
                &Scbench {
                    tasks: tasks.clone(),
                    mode: Mode::MultiTurn,
                    turns: b.turns,
                    lengths: lengths.clone(),
                    samples,
                    own_answers: false,
                },
            ),
            SweepTask::Tsort => tsort_plans(
                g,
                &Tsort {
                    source: Source::Essays,
                    segments: 4,
                    lengths: lengths.clone(),
                    samples,
                },
            ),
        });
    }
    plans
}

/// One plan per record, numbered across the files; prompts longer than `max_length` (at most the session's
/// context less the answer budget) are cut in the middle.
pub fn longbench_plans<'g>(g: Gen<'g>, b: &'g Longbench, max_context: usize) -> Vec<Plan<'g>> {
    let Gen {
        prompter: p, seed, ..
    } = g;
    let mut plans = Vec::new();
    let mut offset = 0;
    for (_, recs) in &b.files {
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
                    longbench::case(&p, r, idx, b.max_length, max_context, seed, b.chat_template)
                }),
            });
        }
        offset += recs.len();
    }
    plans
}

/// How a run writes and shows its results.
pub struct RunOptions {
    /// Output folder (default: [`default_out`]).
    pub out: Option<PathBuf>,
    /// Skip the cases already in the folder's results.jsonl.
    pub resume: bool,
    /// No progress output.
    pub quiet: bool,
    /// Prefill each single-turn case once and fork it per spec (see [`Runner::share_prefill`]).
    pub share_prefill: bool,
    /// `--compress-at`: over every spec's own `at` option; None = each spec's own, else [`EVAL_COMPRESS_AT`].
    pub compress_at: Option<CompressAt>,
    /// The essay haystack's text file instead of Paul Graham's essays.
    pub haystack_file: Option<PathBuf>,
    /// Seed of the generated cases.
    pub seed: u64,
}

/// What a finished run wrote.
pub struct Report {
    /// report.md's text.
    pub text: String,
    /// Every file written for the report (plots, report.md, summary.json).
    pub files: Vec<PathBuf>,
}

/// The protocol eval runs compress under unless told otherwise: `context`, as kvpress's pipeline and SCBench's
/// shared-context modes do (compress the context once, leave the question out), so figures compare with theirs.
pub const EVAL_COMPRESS_AT: CompressAt = CompressAt::Context;

/// Every spec with the protocol it runs under written in (`--compress-at` over its own `at` over
/// [`EVAL_COMPRESS_AT`]), so each result's label says it. Two specs that become one are an error.
pub fn resolve_protocol(specs: &[KvSpec], flag: Option<CompressAt>) -> Result<Vec<KvSpec>> {
    let mut out: Vec<KvSpec> = Vec::with_capacity(specs.len());
    for s in specs {
        let mut s = s.clone();
        s.resolve_compress_at(flag, EVAL_COMPRESS_AT);
        if out.contains(&s) {
            bail!("--kv lists '{s}' twice (once the compression protocol is written in)");
        }
        out.push(s);
    }
    Ok(out)
}

/// Runs the benchmark's plans under every spec (a fresh session per case and spec, from `session_cfg`), then writes
/// the report of the whole output folder.
pub fn run(
    bench: &Benchmark,
    specs: &[KvSpec],
    model: &Model,
    prompter: Prompter,
    session_cfg: &SessionConfig,
    opts: &RunOptions,
) -> Result<Report> {
    let what = bench.name();
    let specs = resolve_protocol(specs, opts.compress_at)?;
    let specs = specs.as_slice();
    let max_ctx = session_cfg.max_context;
    check_lengths(bench.lengths(), max_ctx)?;
    let hays = RefCell::new(Haystacks::new(opts.haystack_file.clone()));
    let g = Gen {
        prompter,
        hays: &hays,
        seed: opts.seed,
    };
    let mut plans = bench.plans(g, max_ctx);
    let out = opts.out.clone().unwrap_or_else(|| default_out(what));
    let results = ResultsFile::open(&out, opts.resume)?;
    if !opts.quiet {
        eprintln!(
            "[eval] {what}: {} cases × {} KV specs ({}), prompts: {}, writing to {}",
            plans.len(),
            specs.len(),
            specs
                .iter()
                .map(|s| s.to_string())
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
    let mut runner = Runner::new(model, prompter, session_cfg.clone(), results);
    runner.own_answers = bench.own_answers();
    runner.quiet = opts.quiet;
    runner.share_prefill = opts.share_prefill;
    runner.compress_at = opts.compress_at.unwrap_or(EVAL_COMPRESS_AT);
    runner.run_all(&mut plans, specs)?;
    let files = super::report::write(&out, what)?;
    let report_md = out.join("report.md");
    let mut text = std::fs::read_to_string(&report_md)
        .with_context(|| format!("cannot read {}", report_md.display()))?;
    if !runner.skipped.is_empty() {
        text += &format!(
            "\n{} case(s) did not fit in memory and were skipped (not in results.jsonl; --resume tries them again):\n",
            runner.skipped.len()
        );
        for (key, _) in &runner.skipped {
            text += &format!("- {key}\n");
        }
    }
    Ok(Report { text, files })
}

/// Every length must fit the session's context.
pub fn check_lengths(lengths: &[usize], max_context: usize) -> Result<()> {
    if let Some(l) = lengths.iter().find(|l| **l > max_context) {
        bail!(
            "length {l} is above this session's context of {max_context} tokens (the model's trained context, or \
             --max-context); use shorter --lengths"
        );
    }
    Ok(())
}

/// `./runs/<UTC time>-<what>`.
pub fn default_out(what: &str) -> PathBuf {
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
    Path::new("runs").join(format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{what}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_tasks_parse_once_into_families() {
        let t = SweepTask::parse_list("niah, ruler:vt,cwe_x").unwrap_err();
        assert!(format!("{t:#}").contains("cwe_x"), "{t:#}");
        let t = SweepTask::parse_list("niah,ruler:vt,scbench:kv,tsort").unwrap();
        assert_eq!(
            t,
            vec![
                SweepTask::Niah,
                SweepTask::Ruler(vec!["vt".into()]),
                SweepTask::Scbench(vec!["kv".into()]),
                SweepTask::Tsort
            ]
        );
        let all = SweepTask::parse_list("ruler,scbench").unwrap();
        assert_eq!(
            all,
            vec![
                SweepTask::Ruler(ruler::TASKS.iter().map(|t| t.to_string()).collect()),
                SweepTask::Scbench(scbench::TASKS.iter().map(|t| t.to_string()).collect()),
            ]
        );
        for bad in ["nope", "niah:x", "tsort:4", "ruler:"] {
            assert!(SweepTask::parse_list(bad).is_err(), "{bad}");
        }
        let e = SweepTask::parse_list(" , ").unwrap_err();
        assert_eq!(format!("{e:#}"), "--tasks is empty");
    }

    #[test]
    fn lengths_must_fit_the_context() {
        assert!(check_lengths(&[1024, 2048], 2048).is_ok());
        let e = check_lengths(&[1024, 4096], 2048).unwrap_err();
        assert!(format!("{e}").contains("length 4096"), "{e}");
    }

    #[test]
    fn default_out_is_under_runs() {
        let p = default_out("niah");
        assert!(p.starts_with("runs") && p.to_string_lossy().ends_with("-niah"));
    }
}
