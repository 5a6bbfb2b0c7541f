//! The engine thread: owns the model and every running sequence's session, and interleaves them.
//!
//! HTTP handlers send [`Job`]s (one per choice) over a channel and read [`Event`]s back over the job's own channel.
//! Each scheduling round gives every decoding sequence one decode step ([`Scheduler::decode_round`], the one place
//! a batched decode replaces the per-sequence loop), then one prefill chunk to the oldest sequence still reading
//! its prompt, so a long prompt delays the others' next tokens by one chunk, not by the whole prompt. A sequence
//! whose client is gone (its event channel closed) is dropped at the next round.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::logprobs::TokenLogprob;
use super::seq::Seq;
use super::{api::GenParams, Ready, Shared};
use crate::engine::{Lengths, Session, SessionConfig};
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
    waiting: VecDeque<Job>,
    running: Vec<Seq<'m>>,
}

impl<'m> Scheduler<'m> {
    pub fn new(
        model: &'m Model,
        ready: Arc<Ready>,
        base: SessionConfig,
        shared: Arc<Shared>,
    ) -> Self {
        Scheduler {
            model,
            ready,
            base,
            shared,
            waiting: VecDeque::new(),
            running: Vec::new(),
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
            let gone = self.running.iter().filter(|s| s.cancelled()).count();
            self.shared
                .metrics
                .cancelled
                .fetch_add(gone as u64, Relaxed);
            self.running.retain(|s| !s.finished());
            self.publish_gauges();
        }
    }

    /// Starts waiting jobs while there is room (`--parallel`); a job whose client left is dropped unstarted.
    fn admit(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        self.shared
            .metrics
            .cancelled
            .fetch_add(gone as u64, Relaxed);
        while self.running.len() < self.shared.cfg.parallel {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            match self.open(&job) {
                Ok((session, cached)) => {
                    let _ = job.events.send(Event::Admitted { index: job.index });
                    self.running
                        .push(Seq::new(job, session, cached, self.ready.clone()));
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

    /// A session for `job`, and how many of its prompt tokens it already holds. The prefix-cache lookup goes here:
    /// a hit returns a session restored from the store with `cached` > 0, and the sequence prefills only the rest.
    fn open(&self, job: &Job) -> Result<(Session<'m>, usize), ApiError> {
        let mut cfg = self.base.clone();
        if let Some(kv) = &job.params.kv {
            cfg.kv = kv.clone();
        }
        let mut session = Session::new(self.model, cfg).map_err(|e| {
            let label = job
                .params
                .kv
                .as_ref()
                .map_or_else(String::new, |k| format!("kv '{k}': "));
            ApiError::bad_request(format!("{label}{e:#}")).code("invalid_kv")
        })?;
        session
            .check_memory(Lengths::generate(job.prompt.len(), job.params.max_tokens))
            .map_err(|e| ApiError::unavailable(format!("{e:#}"), 5).code("out_of_memory"))?;
        Ok((session, 0))
    }

    /// One scheduling round: a decode step for every decoding sequence, then one prefill chunk.
    fn round(&mut self) {
        for s in &mut self.running {
            s.check_client();
        }
        self.decode_round();
        if let Some(s) = self
            .running
            .iter_mut()
            .find(|s| !s.finished() && s.prefilling())
        {
            s.prefill_chunk(&self.shared.metrics);
        }
    }

    /// Every decoding sequence advances one token. This is the batching point: a batched forward pass over all of
    /// them replaces the loop, and each sequence's `after_logits` stays as is.
    fn decode_round(&mut self) {
        for s in self
            .running
            .iter_mut()
            .filter(|s| !s.finished() && !s.prefilling())
        {
            s.decode_step(&self.shared.metrics);
        }
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        let kv: usize = self.running.iter().map(Seq::kv_bytes).sum();
        m.kv_bytes.store(kv as u64, Relaxed);
        m.waiting.store(self.waiting.len() as u64, Relaxed);
        m.running.store(self.running.len() as u64, Relaxed);
    }
}
