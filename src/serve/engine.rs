//! The engine thread: owns the model and every running sequence's session, and interleaves them.
//!
//! HTTP handlers send [`Job`]s (one per choice) over a channel and read [`Event`]s back over the job's own channel.
//! Each scheduling round is one batched forward pass ([`Batch::step`], every weight read once for all of them): a
//! decode step for every decoding sequence plus one prefill chunk of the oldest sequence still reading its prompt,
//! so a long prompt delays the others' next tokens by one chunk, not by the whole prompt. A prompt whose
//! log-probabilities are asked for, or that cannot be split, is fed alone after the batch. A sequence whose client is
//! gone (its event channel closed) is dropped at the next round.
//!
//! Admission: at most `--parallel` sequences run, and with `--kv-budget` the KV plans ([`crate::engine::memplan`])
//! of the running sequences add up to at most the budget; the oldest waiting job starts when its plan fits. With a
//! prefix store, [`Scheduler::open`] restores the longest cached prefix of the prompt and the sequence stores its
//! cache after the prefill (and at its end).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::stats::human_bytes;

use super::error::ApiError;
use super::logprobs::TokenLogprob;
use super::seq::{Prefix, Seq, Step};
use super::{api::GenParams, Ready, Shared};
use crate::engine::batch::{Batch, Input};
use crate::engine::prefix::{ModelId, Namespace};
use crate::engine::{memplan, Lengths, Session, SessionConfig};
use crate::model::Model;

/// One choice to generate.
pub struct Job {
    /// The choice's index in the response.
    pub index: usize,
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    /// Holds the job's place in the admission count until it is dropped.
    pub ticket: Ticket,
}

/// A place in the server's admission count ([`Shared::in_flight`]); given back when dropped.
pub struct Ticket(pub(super) Arc<Shared>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job reports, in order: `Admitted` (or `Failed`), `Prompt`, `Token`s, `Done` (or `Failed`).
#[derive(Debug)]
pub enum Event {
    /// The session exists and the run fits in memory: the request will be answered.
    Admitted {
        index: usize,
    },
    /// The prompt is in the cache. `logprobs`: one entry per prompt token (the first None) when asked for.
    Prompt {
        index: usize,
        prompt_tokens: usize,
        cached_tokens: usize,
        logprobs: Option<Vec<Option<TokenLogprob>>>,
    },
    /// A generated token and the text it releases (empty while a stop string may be starting or a UTF-8 character
    /// is unfinished).
    Token {
        index: usize,
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: the text still held back, and why it ended.
    Done {
        index: usize,
        text: String,
        finish: Finish,
        completion_tokens: usize,
    },
    Failed {
        index: usize,
        error: ApiError,
    },
}

pub struct Scheduler<'m> {
    model: &'m Model,
    ready: Arc<Ready>,
    base: SessionConfig,
    shared: Arc<Shared>,
    /// The model file's identity, the root of prefix-cache keys (None: no prefix cache).
    model_id: Option<ModelId>,
    waiting: VecDeque<Job>,
    /// The running sequences, and each one's planned peak KV bytes.
    running: Vec<Seq<'m>>,
    kv_plans: Vec<usize>,
    batch: Batch,
    /// Per round: the sequences in the batch step (index into `running`) and what each feeds.
    plan: Vec<(usize, Step)>,
    /// Empty between rounds; their allocations are reused (see [`recycle`]).
    sessions: Vec<&'static mut Session<'static>>,
    inputs: Vec<Input<'static>>,
}

impl<'m> Scheduler<'m> {
    pub fn new(
        model: &'m Model,
        ready: Arc<Ready>,
        base: SessionConfig,
        shared: Arc<Shared>,
        model_id: Option<ModelId>,
    ) -> Self {
        Scheduler {
            model,
            ready,
            base,
            shared,
            model_id,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_plans: Vec::new(),
            batch: Batch::default(),
            plan: Vec::new(),
            sessions: Vec::new(),
            inputs: Vec::new(),
        }
    }

    /// Runs until the server stops: takes jobs, runs rounds.
    pub fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            if self.shared.stopping.load(Relaxed) {
                return;
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(j) => self.waiting.push_back(j),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(j) = jobs.try_recv() {
                self.waiting.push_back(j);
            }
            self.admit();
            self.round();
            // The peak before the finished sequences go (they still hold their caches).
            let kv: usize = self.running.iter().map(Seq::kv_bytes).sum();
            self.shared
                .metrics
                .kv_bytes_peak
                .fetch_max(kv as u64, Relaxed);
            let gone = self.running.iter().filter(|s| s.cancelled()).count();
            self.shared
                .metrics
                .cancelled
                .fetch_add(gone as u64, Relaxed);
            let mut i = 0;
            while i < self.running.len() {
                if self.running[i].finished() {
                    self.running.remove(i);
                    self.kv_plans.remove(i);
                } else {
                    i += 1;
                }
            }
            self.publish_gauges();
        }
    }

    /// Starts waiting jobs, oldest first, while there is room: fewer than `--parallel` running, and the job's KV plan
    /// within what `--kv-budget` leaves. A job whose client left is dropped unstarted.
    fn admit(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        self.shared
            .metrics
            .cancelled
            .fetch_add(gone as u64, Relaxed);
        while self.running.len() < self.shared.cfg.parallel {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let cfg = self.config(job);
            let kv = match self.kv_plan(&cfg, job) {
                Ok(kv) => kv,
                Err(error) => {
                    self.refuse(error);
                    continue;
                }
            };
            if let Some(budget) = self.shared.cfg.kv_budget {
                if kv > budget {
                    let msg = format!(
                        "the request's KV cache needs {} at its peak ({} prompt + {} new tokens), more than the \
                         server's --kv-budget of {}; send a shorter prompt or fewer max_tokens",
                        human_bytes(kv),
                        job.prompt.len(),
                        job.params.max_tokens,
                        human_bytes(budget)
                    );
                    self.refuse(ApiError::bad_request(msg).code("kv_budget_exceeded"));
                    continue;
                }
                let held: usize = self.kv_plans.iter().sum();
                if held + kv > budget {
                    // Waits for running sequences to finish (the queue's bound, in the handlers, sends 429s).
                    break;
                }
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            match self.open(&job, cfg) {
                Ok((session, cached, prefix)) => {
                    let _ = job.events.send(Event::Admitted { index: job.index });
                    self.running
                        .push(Seq::new(job, session, cached, prefix, self.ready.clone()));
                    self.kv_plans.push(kv);
                }
                Err(error) => {
                    let _ = job.events.send(Event::Failed {
                        index: job.index,
                        error,
                    });
                }
            }
        }
    }

    /// Fails the oldest waiting job with `error`.
    fn refuse(&mut self, error: ApiError) {
        if let Some(job) = self.waiting.pop_front() {
            let _ = job.events.send(Event::Failed {
                index: job.index,
                error,
            });
        }
    }

    /// The session configuration of `job`: the server's, with the request's KV method.
    fn config(&self, job: &Job) -> SessionConfig {
        let mut cfg = self.base.clone();
        if let Some(kv) = &job.params.kv {
            cfg.kv = kv.clone();
        }
        cfg
    }

    /// The planned peak KV bytes of `job` (its prompt and max_tokens) under `cfg`.
    fn kv_plan(&self, cfg: &SessionConfig, job: &Job) -> Result<usize, ApiError> {
        let mc = self.model.config();
        let fp = memplan::Footprint::of(mc, cfg).map_err(|e| invalid_kv(job, e))?;
        let len = Lengths::generate(job.prompt.len(), job.params.max_tokens);
        Ok(memplan::plan(mc, self.model.weight_bytes(), &fp, len).kv)
    }

    /// A session for `job`, how many of its prompt tokens it already holds, and where it stores its prefix. With a
    /// prefix store, the longest cached prefix is restored (not for a prompt whose log-probabilities are asked for:
    /// they need the whole prompt fed); a prefix that cannot be restored is recomputed.
    fn open(
        &self,
        job: &Job,
        cfg: SessionConfig,
    ) -> Result<(Session<'m>, usize, Option<Prefix>), ApiError> {
        let mut session = Session::new(self.model, cfg).map_err(|e| invalid_kv(job, e))?;
        session
            .check_memory(Lengths::generate(job.prompt.len(), job.params.max_tokens))
            .map_err(|e| ApiError::unavailable(format!("{e:#}"), 5).code("out_of_memory"))?;
        let (Some(store), Some(id)) = (&self.shared.prefix, self.model_id) else {
            return Ok((session, 0, None));
        };
        let ns = Namespace::of_session(id, &session);
        let mut cached = 0;
        if job.params.prompt_logprobs.is_none() {
            let hit = store.lookup(&ns, &job.prompt);
            if hit.tokens > 0 {
                match hit.restore(&mut session, &job.prompt) {
                    Ok(()) => cached = hit.tokens,
                    Err(e) => {
                        eprintln!(
                            "warning: prefix cache: restoring a prefix: {e:#}; recomputing it"
                        );
                        session.reset();
                    }
                }
            }
        }
        let prefix = Prefix {
            store: store.clone(),
            ns,
        };
        Ok((session, cached, Some(prefix)))
    }

    /// One scheduling round: one batched step of every decoding sequence and the oldest prefilling one's next
    /// chunk; a prefill that must run alone runs after it.
    fn round(&mut self) {
        for s in &mut self.running {
            s.check_client();
        }
        let mut plan = std::mem::take(&mut self.plan);
        plan.clear();
        let mut alone = None;
        let mut prefill_taken = false;
        for (i, s) in self.running.iter().enumerate() {
            if s.finished() {
                continue;
            }
            if s.prefilling() {
                if prefill_taken {
                    continue;
                }
                prefill_taken = true;
                match s.batch_step() {
                    Some(step) => plan.push((i, step)),
                    None => alone = Some(i),
                }
            } else if let Some(step) = s.batch_step() {
                plan.push((i, step));
            }
        }
        self.step(&plan);
        self.plan = plan;
        if let Some(i) = alone {
            self.running[i].prefill_chunk(&self.shared.metrics);
        }
    }

    /// Runs `plan` as one batched forward pass. If the step refuses its inputs (a sequence at its context's end),
    /// each sequence runs alone instead, so that only the one at fault fails.
    fn step(&mut self, plan: &[(usize, Step)]) {
        if plan.is_empty() {
            return;
        }
        let metrics = &self.shared.metrics;
        // Rebuilt every round on the same allocations.
        let mut sessions: Vec<&mut Session<'m>> = recycle(std::mem::take(&mut self.sessions));
        let mut inputs: Vec<Input<'_>> = recycle(std::mem::take(&mut self.inputs));
        let mut p = plan.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some(&(_, step)) = p.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let (session, prompt) = s.parts();
            let n = prompt.len();
            inputs.push(match step {
                Step::Decode(t) => Input::Decode(t),
                Step::Prompt { a, b } => Input::Prompt {
                    tokens: &prompt[a..b],
                    last: b == n,
                },
            });
            sessions.push(session);
        }
        let ok = self.batch.step(&mut sessions, &inputs).is_ok();
        self.sessions = recycle(sessions);
        self.inputs = recycle(inputs);
        for (k, &(i, step)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            if !ok {
                match step {
                    Step::Decode(_) => s.decode_step(metrics),
                    Step::Prompt { .. } => s.prefill_chunk(metrics),
                }
                continue;
            }
            s.after_batch(step, self.batch.logits(k), metrics);
        }
        metrics.batch_steps.fetch_add(1, Relaxed);
        metrics
            .batch_rows
            .fetch_add(if ok { plan.len() as u64 } else { 0 }, Relaxed);
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        let kv: usize = self.running.iter().map(Seq::kv_bytes).sum();
        m.kv_bytes.store(kv as u64, Relaxed);
        let planned: usize = self.kv_plans.iter().sum();
        m.kv_planned_bytes.store(planned as u64, Relaxed);
        m.waiting.store(self.waiting.len() as u64, Relaxed);
        m.running.store(self.running.len() as u64, Relaxed);
    }
}

fn invalid_kv(job: &Job, e: anyhow::Error) -> ApiError {
    let label = job
        .params
        .kv
        .as_ref()
        .map_or_else(String::new, |k| format!("kv '{k}': "));
    ApiError::bad_request(format!("{label}{e:#}")).code("invalid_kv")
}

/// An empty vector of another element type on the same allocation when the layouts agree (references and inputs of
/// other lifetimes): the in-place `collect` of an empty iterator keeps the buffer.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}
