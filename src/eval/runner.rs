//! The case loop: one fresh session per case and KV spec, greedy decoding, timing, scoring, and one JSON line per
//! finished case appended and flushed to `results.jsonl`, so a killed run loses at most the case in flight and
//! `--resume` skips every case already there (matched on task, length, depth, sample, seed, KV spec and protocol).
//!
//! The compression protocol ([`CompressAt`]) decides how a prompt goes in. Under `prompt` the whole first prompt is
//! one prefill, compressed at its end with the question in it. Under `context` (kvpress's pipeline) the first prompt is
//! split where the question starts: the context is prefilled and compressed, then the question is prefilled without
//! compression at the positions that follow the context's. The split applies to every spec of such a run, `full`
//! included, so all specs see the same tokens. Multi-request conversations prefill the shared context once (compressed
//! under `context`, left whole under `prompt`) and answer each query on a copy of that session, so no query sees or
//! changes what another did.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Case, CaseMeta, Mode, Prompter};
use crate::engine::memcheck::OutOfMemory;
use crate::engine::sampler::argmax;
use crate::engine::{Lengths, Session, SessionConfig};
use crate::methods::{CompressAt, KvSpec};
use crate::model::Model;

/// The outcome of one turn of a conversation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TurnResult {
    pub turn: usize,
    pub score: f64,
    pub output: String,
    pub references: Vec<String>,
    /// Tokens fed for this turn (context included for the first).
    pub prompt_tokens: usize,
    pub ttft_ms: f64,
    pub generated_tokens: usize,
}

/// One line of `results.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseResult {
    pub task: String,
    /// Requested length (prompt + tokens to generate); 0 where the data decides.
    pub target_len: usize,
    /// Actual prompt tokens of the first turn (the shared context plus the first question).
    pub length: usize,
    pub depth: Option<f64>,
    pub sample: usize,
    pub seed: u64,
    /// The KV spec label (`full`, `snapkv@0.25`, ...), its method and budget.
    pub kv: String,
    pub method: String,
    pub budget: Option<String>,
    /// When the cache was compressed: `context` (once, question left out) or `prompt` (every prompt feed, question
    /// included); rows written before this field ran `prompt`.
    #[serde(default = "prompt_protocol")]
    pub compress_at: String,
    pub mode: String,
    pub metric: String,
    /// Mean over turns, in [0, 100].
    pub score: f64,
    /// The first turn's output.
    pub output: String,
    pub references: Vec<String>,
    /// The cache's own peak byte counter over the case.
    pub peak_kv_bytes: usize,
    /// KV bytes the cache holds when the case ends (after compression; 0 in results written before this field).
    #[serde(default)]
    pub final_kv_bytes: usize,
    /// KV bytes read per decoded token (attention and selector scoring; 0 in results written before this field).
    #[serde(default)]
    pub kv_read_bytes_per_token: f64,
    /// The `--prefill` spec the case ran under (`dense` in results written before this field) and the share of dense
    /// prefill work it did: LazyLLM's share of (prompt token, layer) rows computed, else the share of query·key pairs
    /// its global layers computed (1 for dense).
    #[serde(default = "dense_prefill")]
    pub prefill: String,
    #[serde(default = "one")]
    pub prefill_share: f64,
    /// Time to first token of the first turn: prefill + first token.
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub generated_tokens: usize,
    /// Model time for the case (all turns).
    pub model_s: f64,
    /// Time to generate the case's prompt (shared by the specs of one case).
    pub gen_ms: f64,
    /// Per turn, for conversations of more than one turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub turns: Vec<TurnResult>,
}

fn dense_prefill() -> String {
    crate::methods::prefill::PrefillSpec::Dense.to_string()
}

fn one() -> f64 {
    1.0
}

/// What a case's session measured besides time: KV bytes (peak, held at the end, read per decoded token), its
/// `--prefill` spec and the share of dense prefill work that did (see [`CaseResult::prefill_share`]).
struct Figures {
    peak_kv_bytes: usize,
    final_kv_bytes: usize,
    kv_read_bytes_per_token: f64,
    prefill: String,
    prefill_share: f64,
}

impl Figures {
    fn of(s: &Session, peak_kv_bytes: usize, kv_read_bytes_per_token: f64) -> Self {
        let st = &s.stats;
        Self {
            peak_kv_bytes,
            final_kv_bytes: s.kv_bytes(),
            kv_read_bytes_per_token,
            prefill: s.cfg.prefill.to_string(),
            prefill_share: st.prefill_rows_computed.unwrap_or(st.prefill_density),
        }
    }
}

fn prompt_protocol() -> String {
    CompressAt::Prompt.name().to_string()
}

impl CaseResult {
    pub fn key(&self) -> String {
        CaseMeta {
            task: self.task.clone(),
            target_len: self.target_len,
            depth: self.depth,
            sample: self.sample,
            seed: self.seed,
        }
        .key(&format!("{}|{}", self.kv, self.compress_at))
    }
}

/// `results.jsonl`: read back for `--resume`, appended one flushed line per case.
pub struct ResultsFile {
    pub path: PathBuf,
    file: File,
    done: HashSet<String>,
}

impl ResultsFile {
    /// Opens `dir/results.jsonl`. An existing non-empty file needs `resume`; a last line cut short by a kill is
    /// dropped, any other unreadable line is an error naming it.
    pub fn open(dir: &Path, resume: bool) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
        let path = dir.join("results.jsonl");
        let mut done = HashSet::new();
        if path.exists()
            && fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len()
                > 0
        {
            if !resume {
                bail!(
                    "{} already holds results: pass --resume to continue that run, or choose another --out",
                    path.display()
                );
            }
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut good_end = 0;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let complete = line.ends_with('\n');
                match serde_json::from_str::<CaseResult>(line.trim()) {
                    Ok(r) if complete => {
                        done.insert(r.key());
                        good_end += line.len();
                    }
                    _ if line.trim().is_empty() => good_end += line.len(),
                    _ if i + 1 == lines.len() => {
                        eprintln!(
                            "note: dropping the unfinished last line of {}",
                            path.display()
                        );
                    }
                    Err(e) => bail!(
                        "{} line {}: not a result record: {e}",
                        path.display(),
                        i + 1
                    ),
                    Ok(_) => unreachable!("a complete line is handled above"),
                }
            }
            if good_end < text.len() {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(good_end as u64))
                    .with_context(|| {
                        format!("cannot cut the unfinished line off {}", path.display())
                    })?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(ResultsFile { path, file, done })
    }

    pub fn is_done(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    pub fn done_count(&self) -> usize {
        self.done.len()
    }

    /// Appends one record as a single write and flushes it.
    pub fn append(&mut self, r: &CaseResult) -> Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.done.insert(r.key());
        Ok(())
    }

    /// Every record in a results file, in order.
    pub fn load(path: &Path) -> Result<Vec<CaseResult>> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push(serde_json::from_str(line).with_context(|| {
                format!("{} line {}: not a result record", path.display(), i + 1)
            })?);
        }
        Ok(out)
    }
}

/// Eval progress on stderr: on a terminal an `indicatif` bar with the ETA, the mean score so far and the last case;
/// otherwise a plain line every 10 s and at the end. Nothing when quiet.
pub struct Progress {
    total: usize,
    done: usize,
    score_sum: f64,
    start: Instant,
    last: Option<Instant>,
    out: crate::progress::Progress,
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Self {
        Progress {
            total,
            done: 0,
            score_sum: 0.0,
            start: Instant::now(),
            last: None,
            out: crate::progress::Progress::bar("[eval]", total as u64, "cases", quiet),
        }
    }

    /// A case that was not run (it did not fit in memory): said on stderr even when quiet, and out of the count.
    pub fn skip(&mut self, what: &str, why: &str) {
        self.total = self.total.saturating_sub(1);
        let line = format!("[eval] skipped {what}: {why}");
        if self.out.quiet() {
            eprintln!("{line}");
        } else {
            self.out.line(&line);
        }
        if self.done == self.total && self.done > 0 {
            self.out.finish();
        }
    }

    pub fn tick(&mut self, what: &str, score: f64) {
        self.done += 1;
        self.score_sum += score;
        if self.out.quiet() {
            return;
        }
        let mean = self.score_sum / self.done as f64;
        self.out.set(
            self.done as u64,
            format!("mean score {mean:.1}  last: {what} {score:.0}"),
        );
        let finished = self.done == self.total;
        if finished
            || (!self.out.is_bar() && self.last.is_none_or(|t| t.elapsed().as_secs_f64() >= 10.0))
        {
            let el = self.start.elapsed().as_secs_f64();
            let per = el / self.done as f64;
            let left = per * (self.total.saturating_sub(self.done)) as f64;
            self.out.line(&format!(
                "[eval] {}/{} cases  {:.1} s/case  elapsed {}  ETA {}  mean score {mean:.1}  last: {what} score {score:.0}",
                self.done,
                self.total,
                per,
                crate::progress::hms(el),
                crate::progress::hms(left)
            ));
            self.last = Some(Instant::now());
        }
        if finished {
            self.out.finish();
        }
    }
}

/// A case to run, known by its metadata before it is generated (so resumed cases are never generated).
pub struct Plan<'g> {
    pub meta: CaseMeta,
    pub make: Box<dyn FnMut() -> Result<Case> + 'g>,
}

/// Runs cases against a model.
pub struct Runner<'a> {
    pub model: &'a Model,
    pub prompter: Prompter<'a>,
    pub base_cfg: SessionConfig,
    pub results: ResultsFile,
    /// Multi-turn: feed the model's own previous answers instead of the gold ones.
    pub own_answers: bool,
    pub quiet: bool,
    /// Single-turn cases under several specs: prefill once with the full cache, then fork a session per spec
    /// (`Session::fork` applies the spec's end-of-prefill compression to a copy), so methods are compared on identical
    /// caches and the prompt is prefilled once. Specs that compress during prefill (`chunked`) or store the cache in
    /// another format run on their own.
    pub share_prefill: bool,
    /// The run's protocol: what specs that compress nothing (`full`) use to split their prompts like the others.
    /// Specs that compress carry their own (`KvSpec::resolve_compress_at`). Default: `prompt`.
    pub compress_at: CompressAt,
    /// Test hook (`HAYLOFT_EVAL_ABORT_AFTER=N`): after N cases written by this process, the next one exits
    /// mid-case, as a kill would.
    abort_after: Option<usize>,
    written: usize,
    /// Cases (key and KV spec) refused because their memory plan did not fit, with the reason; not in the results,
    /// so `--resume` tries them again.
    pub skipped: Vec<(String, String)>,
}

impl<'a> Runner<'a> {
    pub fn new(
        model: &'a Model,
        prompter: Prompter<'a>,
        base_cfg: SessionConfig,
        results: ResultsFile,
    ) -> Self {
        let abort_after = std::env::var("HAYLOFT_EVAL_ABORT_AFTER")
            .ok()
            .and_then(|v| v.parse().ok());
        Runner {
            model,
            prompter,
            base_cfg,
            results,
            own_answers: false,
            quiet: false,
            share_prefill: true,
            compress_at: CompressAt::Prompt,
            abort_after,
            written: 0,
            skipped: Vec::new(),
        }
    }

    /// The protocol `spec` runs under: its own when it compresses, else the run's.
    pub fn protocol(&self, spec: &KvSpec) -> CompressAt {
        if spec.compresses() {
            spec.compress_at()
        } else {
            self.compress_at
        }
    }

    /// The resume key of a case under a spec.
    fn key(&self, meta: &CaseMeta, spec: &KvSpec) -> String {
        meta.key(&format!("{spec}|{}", self.protocol(spec)))
    }

    /// Runs every plan under every spec, all specs of one case back to back. Returns the number of cases run.
    pub fn run_all(&mut self, plans: &mut [Plan], specs: &[KvSpec]) -> Result<usize> {
        let todo: usize = plans
            .iter()
            .map(|p| {
                specs
                    .iter()
                    .filter(|s| !self.results.is_done(&self.key(&p.meta, s)))
                    .count()
            })
            .sum();
        let skipped = plans.len() * specs.len() - todo;
        if skipped > 0 && !self.quiet {
            eprintln!(
                "[eval] resuming: {skipped} cases already in {}",
                self.results.path.display()
            );
        }
        let mut progress = Progress::new(todo, self.quiet);
        let mut ran = 0;
        for plan in plans.iter_mut() {
            let pending: Vec<&KvSpec> = specs
                .iter()
                .filter(|s| !self.results.is_done(&self.key(&plan.meta, s)))
                .collect();
            if pending.is_empty() {
                continue;
            }
            let t0 = Instant::now();
            let case = (plan.make)()?;
            let gen_ms = t0.elapsed().as_secs_f64() * 1e3;
            if case.meta.key("") != plan.meta.key("") {
                bail!(
                    "internal: case {} generated as {}",
                    plan.meta.key(""),
                    case.meta.key("")
                );
            }
            ran += self.run_specs(&case, &pending, gen_ms, &mut progress)?;
        }
        Ok(ran)
    }

    /// All specs for one generated case, back to back.
    pub fn run_specs(
        &mut self,
        case: &Case,
        specs: &[&KvSpec],
        gen_ms: f64,
        progress: &mut Progress,
    ) -> Result<usize> {
        let mut n = 0;
        let (shared, own): (Vec<&KvSpec>, Vec<&KvSpec>) = specs.iter().partition(|s| {
            self.share_prefill && single_turn(case) && forkable(s, self.base_cfg.kv_dtype)
        });
        let mut own = own;
        // One shared prefill per protocol: `context` prefills the context alone, `prompt` the whole prompt.
        for at in CompressAt::ALL {
            let group: Vec<&KvSpec> = shared
                .iter()
                .copied()
                .filter(|s| self.protocol(s) == at)
                .collect();
            let mut forked = false;
            if group.len() > 1 {
                // A shared prefill holds the full cache and a fork's copy at once; when that does not fit, each spec
                // runs on its own, where it may.
                match self.run_forked(case, &group, at, gen_ms) {
                    Ok(results) => {
                        forked = true;
                        for r in results {
                            self.results.append(&r)?;
                            self.written += 1;
                            n += 1;
                            progress.tick(&format!("{} {}", r.task, r.kv), r.score);
                        }
                    }
                    Err(e) if e.is::<OutOfMemory>() => {}
                    Err(e) => return Err(e),
                }
            }
            if !forked {
                own.extend(group);
            }
        }
        // Back in the order the specs were given.
        own.sort_by_key(|s| specs.iter().position(|x| std::ptr::eq(*x, *s)));
        for spec in own {
            match self.run_one(case, spec, gen_ms) {
                Ok(r) => {
                    self.results.append(&r)?;
                    self.written += 1;
                    n += 1;
                    progress.tick(&format!("{} {}", r.task, r.kv), r.score);
                }
                // A case that does not fit is that case's error, not the run's.
                Err(e) if e.is::<OutOfMemory>() => {
                    let key = self.key(&case.meta, spec);
                    progress.skip(&key, &format!("{e:#}"));
                    self.skipped.push((key, format!("{e:#}")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn check_abort(&self) {
        if self.abort_after.is_some_and(|n| self.written >= n) {
            eprintln!("[eval] HAYLOFT_EVAL_ABORT_AFTER reached: exiting mid-case");
            std::process::exit(9);
        }
    }

    /// Feeds a turn's tokens, then decodes greedily. `also`: KV bytes held beside this session (a shared context
    /// whose copy it is).
    fn answer(&self, s: &mut Session, feed: Feed, max_new: usize, also: usize) -> Result<Answer> {
        let n = feed.len();
        check_room(s, n, max_new)?;
        let room = s.cfg.max_context - s.n_past() - n;
        // What this feed leaves uncompressed: the question of a split prompt, a request's whole query.
        let tail = match feed {
            Feed::Prompt(_) => 0,
            Feed::Split { question, .. } => question.len(),
            Feed::Question(t) => t.len(),
        };
        let plan = s.plan_memory(
            Lengths {
                prompt: s.n_past() + n,
                new: max_new.min(room),
                feed: n,
                uncompressed: 0,
            }
            .uncompressed(tail),
        )?;
        s.check_plan(&plan, also)?;
        let t0 = Instant::now();
        let logits = match feed {
            Feed::Prompt(t) => s.prefill(t)?,
            // LazyLLM ranks the prompt by its last token's attention: context and question go in as one prompt.
            Feed::Split { context, question } if s.lazy.is_some() => {
                s.prefill(&[context, question].concat())?
            }
            Feed::Split { context, question } => {
                s.prefill(context)?;
                s.prefill_uncompressed(question)?
            }
            Feed::Question(t) => s.prefill_uncompressed(t)?,
        };
        let next = argmax(logits);
        let prefill_s = t0.elapsed().as_secs_f64();
        self.check_abort();
        let (tokens, decode_steps, decode_s) = self.decode_greedy(s, next, max_new)?;
        Ok(Answer {
            tokens,
            ttft_s: prefill_s,
            decode_steps,
            decode_s,
            prefill_s,
        })
    }

    /// Greedy decoding from `next` (the argmax after the prompt) until an end-of-generation token, `max_new` tokens or
    /// the context budget; returns (output ids, decode steps, decode seconds).
    fn decode_greedy(
        &self,
        s: &mut Session,
        mut next: u32,
        max_new: usize,
    ) -> Result<(Vec<u32>, usize, f64)> {
        let tok = self.prompter.tok;
        let mut out = Vec::new();
        let mut steps = 0;
        let mut dec_s = 0.0;
        loop {
            if tok.is_eog(next) {
                break;
            }
            out.push(next);
            if out.len() >= max_new || s.n_past() >= s.cfg.max_context {
                break;
            }
            let t = Instant::now();
            let logits = s.decode(next)?;
            next = argmax(logits);
            dec_s += t.elapsed().as_secs_f64();
            steps += 1;
        }
        Ok((out, steps, dec_s))
    }

    /// A single-turn case under several forkable specs: one full-cache prefill that records what every spec's method
    /// reads, then per spec a fork (copy + that method's end-of-prefill compression) and greedy decoding. Time to first
    /// token = the shared prefill + the fork's compression (the first token itself comes from the full-cache prefill,
    /// as it does when the method runs on its own: compression follows the prompt's last logits).
    /// Under `context` the shared prefill holds the context only; each fork compresses it and prefills the question.
    fn run_forked(
        &mut self,
        case: &Case,
        specs: &[&KvSpec],
        at: CompressAt,
        gen_ms: f64,
    ) -> Result<Vec<CaseResult>> {
        let mc = self.model.config();
        let mut cfg = self.base_cfg.clone();
        cfg.kv = KvSpec::full();
        for spec in specs {
            if let Some(press) = crate::methods::press::Press::new(spec, mc)? {
                cfg.observe = cfg.observe.max(press.needs());
            }
            // A selector that indexes the prompt's recorded queries (RetrievalAttention's graph, Squeezed Attention's
            // thresholds) reads them from the fork's copy.
            if let Some(sel) = &spec.select {
                let w = sel.build(mc)?.query_window();
                cfg.observe.window = cfg.observe.window.max(w);
            }
        }
        let mut base = Session::new(self.model, cfg)?;
        let conv = &case.conv;
        let turn = &conv.turns[0];
        let (ctx, question) = self.first_prompt(conv, at)?;
        let n_prompt = ctx.len() + question.len();
        check_room(&base, n_prompt, turn.max_new)?;
        // The full-cache prefill, and one fork at a time: a copy of its cache, compressed, then decoding.
        let len = Lengths::generate(n_prompt, turn.max_new).uncompressed(question.len());
        let plan = base.plan_memory(Lengths::generate(n_prompt, 0))?;
        let mut fork_kv = 0;
        for spec in specs {
            let mut c = self.base_cfg.clone();
            c.kv = (*spec).clone();
            fork_kv = fork_kv.max(
                crate::engine::plan_memory(self.model, &c, len)?
                    .kv
                    .max(plan.kv),
            );
        }
        base.check_plan(&plan, fork_kv)?;
        let t0 = Instant::now();
        let full_next = argmax(base.prefill(&ctx)?);
        let prefill_s = t0.elapsed().as_secs_f64();
        self.check_abort();
        let mut results = Vec::with_capacity(specs.len());
        for spec in specs {
            let t_case = Instant::now();
            let mut s = base.fork(spec)?;
            // Under `context` the question follows the compressed context; its last logits give the first token.
            let next = if question.is_empty() {
                full_next
            } else {
                argmax(s.prefill_uncompressed(&question)?)
            };
            let ttft = prefill_s + t_case.elapsed().as_secs_f64();
            let (out, steps, dec_s) = self.decode_greedy(&mut s, next, turn.max_new)?;
            let text = self.prompter.tok.decode(&out);
            let tr = self.turn_result(0, turn, &text, n_prompt, ttft, out.len());
            let model_s = prefill_s + t_case.elapsed().as_secs_f64();
            results.push(self.case_result(
                case,
                spec,
                vec![tr],
                Timing {
                    first_len: n_prompt,
                    first_ttft: ttft,
                    pre_tok: n_prompt,
                    pre_s: prefill_s,
                    dec_steps: steps,
                    dec_s,
                    model_s,
                },
                Figures::of(&s, s.kv_peak_bytes(), read_per_token(&s)),
                gen_ms,
            )?);
        }
        Ok(results)
    }

    /// The first prompt of a conversation, as `protocol` feeds it: under `prompt` the whole prompt and no question;
    /// under `context` the text up to the end of the context (with BOS) and the question after it (the part that is
    /// not compressed).
    fn first_prompt(
        &self,
        conv: &super::Conversation,
        at: CompressAt,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let p = self.prompter;
        let full = p.render(conv, 0, &[], Mode::MultiTurn)?;
        match at {
            CompressAt::Prompt => Ok((p.encode(&full, true)?, Vec::new())),
            CompressAt::Context => {
                let shared = p.shared_prefix(conv)?;
                let question = full
                    .strip_prefix(shared.as_str())
                    .context("the first prompt does not start with its context; cannot split it for --compress-at context")?;
                Ok((p.encode(&shared, true)?, p.encode(question, false)?))
            }
        }
    }

    /// One case under one KV spec, in a fresh session.
    pub fn run_one(&mut self, case: &Case, spec: &KvSpec, gen_ms: f64) -> Result<CaseResult> {
        let mut cfg = self.base_cfg.clone();
        cfg.kv = spec.clone();
        let at = self.protocol(spec);
        let mut s = Session::new(self.model, cfg)?;
        let conv = &case.conv;
        let p = self.prompter;
        let mut turns = Vec::new();
        let (mut dec_steps, mut dec_s, mut pre_tok, mut pre_s) = (0usize, 0.0f64, 0usize, 0.0f64);
        let mut first_len = 0;
        let mut first_ttft = 0.0;
        // The case's KV bytes and prefill, taken when its last turn or request ends.
        let kv_figures;
        let t_case = Instant::now();
        match conv.mode {
            Mode::MultiTurn => {
                let mut fed = String::new();
                let mut answers: Vec<String> = Vec::new();
                for (i, turn) in conv.turns.iter().enumerate() {
                    let full = p.render(conv, i, &answers, Mode::MultiTurn)?;
                    let (head, question);
                    let feed = if i == 0 {
                        (head, question) = self.first_prompt(conv, at)?;
                        if question.is_empty() {
                            Feed::Prompt(&head)
                        } else {
                            Feed::Split {
                                context: &head,
                                question: &question,
                            }
                        }
                    } else {
                        let delta = full.strip_prefix(fed.as_str()).with_context(|| {
                            "the chat template does not render turns append-only; cannot run this conversation \
                             multi-turn (try --no-chat)"
                        })?;
                        head = p.encode(delta, false)?;
                        Feed::Prompt(&head)
                    };
                    let n = feed.len();
                    let before = s.n_past();
                    // Sliding-window layers keep what the truncation below comes back to.
                    s.hold(before + n);
                    let a = self.answer(&mut s, feed, turn.max_new, 0)?;
                    let text = p.tok.decode(&a.tokens);
                    // Drop the generated tokens: the answer the next turn sees is fed again from the rendered
                    // conversation (the gold answer by default, the model's own with --own-answers).
                    s.truncate(before + n)?;
                    if i == 0 {
                        first_len = n;
                        first_ttft = a.ttft_s;
                    }
                    (dec_steps, dec_s, pre_tok, pre_s) = (
                        dec_steps + a.decode_steps,
                        dec_s + a.decode_s,
                        pre_tok + n,
                        pre_s + a.prefill_s,
                    );
                    turns.push(self.turn_result(i, turn, &text, n, a.ttft_s, a.tokens.len()));
                    answers.push(if self.own_answers {
                        text.trim().to_string()
                    } else {
                        turn.gold.clone()
                    });
                    fed = full;
                }
                kv_figures = Figures::of(&s, s.kv_peak_bytes(), read_per_token(&s));
            }
            Mode::MultiRequest => {
                let shared = p.shared_prefix(conv)?;
                let ctx = p.encode(&shared, true)?;
                let t0 = Instant::now();
                self.shared_context(&mut s, &ctx)?;
                let ctx_s = t0.elapsed().as_secs_f64();
                let ctx_len = s.n_past();
                let (mut peak, mut reads) = (s.kv_peak_bytes(), 0u64);
                for (i, turn) in conv.turns.iter().enumerate() {
                    let full = p.render(conv, i, &[], Mode::MultiRequest)?;
                    let delta = full
                        .strip_prefix(shared.as_str())
                        .context("a query's prompt does not start with the shared context")?;
                    let toks = p.encode(delta, false)?;
                    let r = self.request(&s, &toks, turn.max_new)?;
                    let a = r.answer;
                    peak = peak.max(r.peak_kv_bytes);
                    reads += r.kv_read;
                    let text = p.tok.decode(&a.tokens);
                    let fed = if i == 0 {
                        ctx_len + toks.len()
                    } else {
                        toks.len()
                    };
                    if i == 0 {
                        first_len = fed;
                        first_ttft = ctx_s + a.ttft_s;
                        pre_s += ctx_s;
                        pre_tok += ctx_len;
                    }
                    (dec_steps, dec_s, pre_tok, pre_s) = (
                        dec_steps + a.decode_steps,
                        dec_s + a.decode_s,
                        pre_tok + toks.len(),
                        pre_s + a.prefill_s,
                    );
                    turns.push(self.turn_result(
                        i,
                        turn,
                        &text,
                        fed,
                        if i == 0 { first_ttft } else { a.ttft_s },
                        a.tokens.len(),
                    ));
                }
                // What the case holds between requests is the shared context; a request's copy is counted as a paged
                // cache would share it: its own peak, the shared blocks once.
                kv_figures = Figures::of(&s, peak, reads as f64 / dec_steps.max(1) as f64);
            }
        }
        let model_s = t_case.elapsed().as_secs_f64();
        self.case_result(
            case,
            spec,
            turns,
            Timing {
                first_len,
                first_ttft,
                pre_tok,
                pre_s,
                dec_steps,
                dec_s,
                model_s,
            },
            kv_figures,
            gen_ms,
        )
    }

    /// Prefills the shared context of a multi-request conversation into `s`, once: compressed under `context`; whole
    /// under `prompt`, where each request compresses its own copy together with its question.
    pub fn shared_context(&self, s: &mut Session, ctx: &[u32]) -> Result<()> {
        s.check_memory(Lengths::generate(ctx.len(), 0))?;
        match self.protocol(&s.cfg.kv) {
            CompressAt::Context => s.prefill(ctx)?,
            CompressAt::Prompt => s.prefill_uncompressed(ctx)?,
        };
        Ok(())
    }

    /// Answers one request against `shared` on a copy of it ([`Session::duplicate`]), so `shared` is the same after
    /// every request: the question is prefilled (compressed with the context under `prompt`, uncompressed after the
    /// already compressed context under `context`), then decoded greedily.
    fn request(&self, shared: &Session, toks: &[u32], max_new: usize) -> Result<Request> {
        let t0 = Instant::now();
        let mut q = shared.duplicate()?;
        let copy_s = t0.elapsed().as_secs_f64();
        let feed = match self.protocol(&shared.cfg.kv) {
            CompressAt::Context => Feed::Question(toks),
            CompressAt::Prompt => Feed::Prompt(toks),
        };
        let mut answer = self.answer(&mut q, feed, max_new, shared.kv_bytes())?;
        answer.ttft_s += copy_s;
        answer.prefill_s += copy_s;
        Ok(Request {
            answer,
            peak_kv_bytes: q.kv_peak_bytes(),
            kv_read: q.stats.kv_read_total - shared.stats.kv_read_total,
        })
    }

    fn case_result(
        &self,
        case: &Case,
        spec: &KvSpec,
        turns: Vec<TurnResult>,
        t: Timing,
        f: Figures,
        gen_ms: f64,
    ) -> Result<CaseResult> {
        let conv = &case.conv;
        let score = turns.iter().map(|t| t.score).sum::<f64>() / turns.len().max(1) as f64;
        let first = turns
            .first()
            .cloned()
            .context("a case needs at least one turn")?;
        let generated = turns.iter().map(|t| t.generated_tokens).sum();
        Ok(CaseResult {
            task: case.meta.task.clone(),
            target_len: case.meta.target_len,
            length: t.first_len,
            depth: case.meta.depth,
            sample: case.meta.sample,
            seed: case.meta.seed,
            kv: spec.to_string(),
            method: spec.method.name.to_string(),
            budget: spec.budget.map(|b| b.to_string()),
            compress_at: self.protocol(spec).name().to_string(),
            mode: conv.mode.name().to_string(),
            metric: conv.turns[0].metric.name(),
            score,
            output: first.output,
            references: first.references,
            peak_kv_bytes: f.peak_kv_bytes,
            final_kv_bytes: f.final_kv_bytes,
            kv_read_bytes_per_token: f.kv_read_bytes_per_token,
            prefill: f.prefill,
            prefill_share: f.prefill_share,
            ttft_ms: t.first_ttft * 1e3,
            prefill_tok_s: if t.pre_s > 0.0 {
                t.pre_tok as f64 / t.pre_s
            } else {
                0.0
            },
            decode_tok_s: if t.dec_s > 0.0 {
                t.dec_steps as f64 / t.dec_s
            } else {
                0.0
            },
            generated_tokens: generated,
            model_s: t.model_s,
            gen_ms,
            turns: if turns.len() > 1 { turns } else { Vec::new() },
        })
    }

    fn turn_result(
        &self,
        i: usize,
        turn: &super::Turn,
        text: &str,
        fed: usize,
        ttft: f64,
        gen: usize,
    ) -> TurnResult {
        TurnResult {
            turn: i,
            score: turn.metric.score(text, &turn.refs),
            output: text.to_string(),
            references: turn.refs.clone(),
            prompt_tokens: fed,
            ttft_ms: ttft * 1e3,
            generated_tokens: gen,
        }
    }
}

/// How a turn's tokens go in.
#[derive(Clone, Copy)]
enum Feed<'t> {
    /// One prefill, compressed as the protocol says ([`Session::prefill`]).
    Prompt(&'t [u32]),
    /// The context (compressed as the protocol says), then the question after it, uncompressed.
    Split {
        context: &'t [u32],
        question: &'t [u32],
    },
    /// The question after an already compressed context, uncompressed.
    Question(&'t [u32]),
}

impl Feed<'_> {
    fn len(&self) -> usize {
        match *self {
            Feed::Prompt(t) | Feed::Question(t) => t.len(),
            Feed::Split { context, question } => context.len() + question.len(),
        }
    }
}

/// One request of a multi-request conversation, answered on a copy of the shared session.
struct Request {
    answer: Answer,
    /// The copy's peak KV bytes (the shared context's blocks it started from included).
    peak_kv_bytes: usize,
    /// KV bytes the copy read while decoding.
    kv_read: u64,
}

/// One turn's prefill and greedy decoding.
struct Answer {
    /// The generated token ids (without the end-of-generation token).
    tokens: Vec<u32>,
    /// Time to first token: the turn's prefill (the first token is the argmax of its last logits).
    ttft_s: f64,
    decode_steps: usize,
    decode_s: f64,
    prefill_s: f64,
}

/// Timing and token counts of one case, gathered while it runs.
struct Timing {
    first_len: usize,
    first_ttft: f64,
    pre_tok: usize,
    pre_s: f64,
    dec_steps: usize,
    dec_s: f64,
    model_s: f64,
}

/// KV bytes the session read per decoded token so far.
fn read_per_token(s: &Session) -> f64 {
    s.stats.kv_read_total as f64 / s.stats.decode_steps.max(1) as f64
}

fn check_room(s: &Session, n: usize, max_new: usize) -> Result<()> {
    let room = s.cfg.max_context.saturating_sub(s.n_past());
    if n + max_new.min(1) > room {
        bail!(
            "the case needs {n} more tokens but the session holds {} of its {} (--max-context); use shorter \
             lengths or a larger --max-context",
            s.n_past(),
            s.cfg.max_context
        );
    }
    Ok(())
}

/// One question, one answer: what prefill sharing applies to.
fn single_turn(case: &Case) -> bool {
    case.conv.mode == Mode::MultiTurn && case.conv.turns.len() == 1
}

/// Whether a spec can start from a copy of a full-cache prefill: its compression must not run during the prefill
/// (`chunked`), and its cache must be stored like the full cache's.
fn forkable(spec: &KvSpec, base: crate::kv::KvDtype) -> bool {
    !spec.options.chunked && crate::methods::storage_for(spec, base).is_ok_and(|d| d == base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::haystack::Haystacks;
    use crate::eval::scbench;
    use crate::gguf::GgufFile;
    use crate::model::testutil::{write_tiny_llama, TinySpec};
    use crate::tokenizer::chat::ChatTemplate;
    use crate::tokenizer::Tokenizer;

    /// SCBench's multi-request protocol: the shared context's cache is computed once (compressed once under
    /// `context`) and is bit for bit the same after every query; under `context` each query's answer is the one a
    /// single-query run of it gives.
    #[test]
    fn multi_request_leaves_the_shared_context_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = TinySpec {
            ctx_len: 2048,
            ..Default::default()
        };
        write_tiny_llama(&path, &spec).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let model = Model::from_gguf(&g).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        let tpl = ChatTemplate::from_gguf(&g).map_err(|e| format!("{e:#}"));
        let p = Prompter::new(&tok, tpl.as_ref().map_err(|e| e.clone()), false);
        let mut hays = Haystacks::new(None);
        let case = scbench::case(&p, &mut hays, "kv", Mode::MultiRequest, 3, 1200, 0, 1).unwrap();
        let rf = ResultsFile::open(&dir.path().join("r"), false).unwrap();
        let mut runner = Runner::new(&model, p, SessionConfig::for_model(&model), rf);
        runner.compress_at = CompressAt::Context;
        let shared_text = p.shared_prefix(&case.conv).unwrap();
        let ctx = p.encode(&shared_text, true).unwrap();
        for (kv, compressions) in [
            ("snapkv@0.3,at@context", 1),
            ("snapkv@0.3,at@prompt", 0),
            ("full", 0),
        ] {
            let spec = KvSpec::parse(kv).unwrap();
            let mut cfg = runner.base_cfg.clone();
            cfg.kv = spec.clone();
            let mut s = Session::new(&model, cfg).unwrap();
            runner.shared_context(&mut s, &ctx).unwrap();
            assert_eq!(s.compressions, compressions, "{kv}");
            let before = s.fingerprint();
            for (i, turn) in case.conv.turns.iter().enumerate() {
                let full = p.render(&case.conv, i, &[], Mode::MultiRequest).unwrap();
                let toks = p
                    .encode(full.strip_prefix(shared_text.as_str()).unwrap(), false)
                    .unwrap();
                let r = runner.request(&s, &toks, turn.max_new).unwrap();
                assert!(r.peak_kv_bytes > 0);
                assert_eq!(
                    s.fingerprint(),
                    before,
                    "{kv}: query {i} changed the context"
                );
                assert_eq!(s.compressions, compressions, "{kv}");
                assert_eq!(s.n_past(), ctx.len());
            }
            // The whole case, then each query alone as a single-turn case (under `context` split the same way).
            let r = runner.run_one(&case, &spec, 0.0).unwrap();
            assert_eq!(r.compress_at, runner.protocol(&spec).name());
            if kv.contains("at@prompt") {
                continue;
            }
            for i in 0..case.conv.turns.len() {
                let mut single = case.clone();
                single.conv.mode = Mode::MultiTurn;
                single.conv.turns = vec![case.conv.turns[i].clone()];
                let one = runner.run_one(&single, &spec, 0.0).unwrap();
                assert_eq!(one.output, r.turns[i].output, "{kv}: query {i}");
            }
        }
    }
}
