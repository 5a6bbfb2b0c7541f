//! One running sequence: its session, sampler and the text it has released; fed a prompt chunk or a decode step at
//! a time by the scheduler.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::engine::{Event, Finish, Job};
use super::error::ApiError;
use super::logprobs::{token_logprob, TokenLogprob};
use super::metrics::Metrics;
use super::stop::StopMatcher;
use super::Ready;
use crate::engine::json::JsonConstraint;
use crate::engine::prefix::{Mode, Namespace, PrefixStore};
use crate::engine::{Sampler, Session};
use crate::tokenizer::StreamDecoder;

/// What one sequence feeds in a batched step.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// The token sampled last.
    Decode(u32),
    /// Prompt tokens `a..b`.
    Prompt { a: usize, b: usize },
}

/// Where a sequence stores its prefix: the server's store, under the namespace of the sequence's configuration.
pub struct Prefix {
    pub store: Arc<PrefixStore>,
    pub ns: Namespace,
}

pub struct Seq<'m> {
    job: Job,
    prefix: Option<Prefix>,
    session: Session<'m>,
    sampler: Sampler,
    ready: Arc<Ready>,
    /// Prompt tokens in the cache so far (cached ones included).
    fed: usize,
    cached: usize,
    /// The token sampled last, to be fed by the next decode step (None while prefilling or once finished).
    pending: Option<u32>,
    /// Prompt then generated tokens (the repetition penalty reads it).
    history: Vec<u32>,
    /// vocab: logits of the last prompt token.
    row: Vec<f32>,
    /// vocab: a copy of the logits a token is sampled from, when log-probabilities are asked for (the sampler's
    /// penalty changes the logits it gets).
    raw: Vec<f32>,
    prompt_lp: Vec<Option<TokenLogprob>>,
    dec: StreamDecoder,
    stop: StopMatcher,
    generated: usize,
    last_token_at: Option<Instant>,
    finished: bool,
    cancelled: bool,
}

impl<'m> Seq<'m> {
    pub fn new(
        job: Job,
        session: Session<'m>,
        cached: usize,
        prefix: Option<Prefix>,
        ready: Arc<Ready>,
    ) -> Self {
        let mut sampler = Sampler::new(job.params.sampler.clone());
        if let Some(f) = &job.params.json {
            sampler = sampler.with_json(JsonConstraint::new(ready.json_vocab(), f));
        } else if let Some(l) = &job.params.lazy_json {
            sampler = sampler.with_json(JsonConstraint::lazy(ready.json_vocab(), l.clone()));
        }
        // `min_tokens`: the tokens that would end the answer are never drawn before it, and the stop strings are
        // matched only from its last token on (as vLLM does).
        let min = job.params.min_tokens;
        if min > 0 {
            let mut ban = job.params.stop_tokens.clone();
            if !job.params.ignore_eos {
                ban.extend(ready.tokenizer.eog_ids());
            }
            sampler = sampler.with_ban(ban, min);
        }
        let stop = StopMatcher::new(if min > 0 {
            Vec::new()
        } else {
            job.params.stop.clone()
        });
        let history = job.prompt[..cached].to_vec();
        Seq {
            sampler,
            stop,
            history,
            ready,
            fed: cached,
            cached,
            pending: None,
            row: Vec::new(),
            raw: Vec::new(),
            prompt_lp: Vec::new(),
            dec: StreamDecoder::new(),
            generated: 0,
            last_token_at: None,
            finished: false,
            cancelled: false,
            session,
            prefix,
            job,
        }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn prefilling(&self) -> bool {
        self.fed < self.job.prompt.len()
    }

    /// Checks whether the client is still there; a sequence whose client left is finished, as cancelled.
    pub fn check_client(&mut self) {
        if !self.finished && self.job.events.is_closed() {
            self.cancel();
        }
    }

    fn cancel(&mut self) {
        self.finished = true;
        self.cancelled = true;
    }

    /// Ended because its client disconnected.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }

    pub fn kv_bytes(&self) -> usize {
        self.session.cache.bytes()
    }

    fn send(&mut self, e: Event) {
        if self.job.events.send(e).is_err() {
            self.cancel();
        }
    }

    fn fail(&mut self, e: anyhow::Error) {
        let index = self.job.index;
        self.send(Event::Failed {
            index,
            error: ApiError::internal(format!("{e:#}")),
        });
        self.finished = true;
    }

    /// Whether the prefill goes in pieces: no compression, no selector (the cache is then the same either way).
    fn splittable(&self) -> bool {
        self.session.press.is_none() && self.session.scratch.seq.selector.is_none()
    }

    /// What this sequence feeds in a batched step, or None when it has nothing to feed or its next piece runs alone
    /// ([`Self::prefill_chunk`]: a prompt whose log-probabilities are asked for, or one that cannot be split).
    pub fn batch_step(&self) -> Option<Step> {
        if self.finished {
            return None;
        }
        if !self.prefilling() {
            return self.pending.map(Step::Decode);
        }
        if self.job.params.prompt_logprobs.is_some() || !self.splittable() {
            return None;
        }
        let n = self.job.prompt.len();
        let b = (self.fed + self.session.cfg.chunk_size).min(n);
        Some(Step::Prompt { a: self.fed, b })
    }

    /// The session and the prompt, borrowed apart (a batch step feeds pieces of the one into the other).
    pub fn parts(&mut self) -> (&mut Session<'m>, &[u32]) {
        (&mut self.session, &self.job.prompt)
    }

    /// Takes the result of a batched step that fed `step`: `logits` after it (None for a prompt piece but the last).
    pub fn after_batch(&mut self, step: Step, logits: Option<&[f32]>, metrics: &Metrics) {
        if let Some(l) = logits {
            // vocab: copied, as the sampler's penalty changes the logits it gets.
            self.row.clear();
            self.row.extend_from_slice(l);
        }
        match step {
            Step::Decode(_) => {
                self.pending = None;
                let top = self.job.params.logprobs;
                let (next, lp) = pick(
                    &mut self.sampler,
                    &self.history,
                    &mut self.raw,
                    &mut self.row,
                    top,
                );
                self.take(next, lp, metrics);
            }
            Step::Prompt { a, b } => self.prompt_fed(a, b, metrics),
        }
    }

    /// Feeds the next piece of the prompt alone: one chunk when the prefill can be split, else the whole prompt.
    pub fn prefill_chunk(&mut self, metrics: &Metrics) {
        let n = self.job.prompt.len();
        let a = self.fed;
        let b = if self.splittable() {
            (a + self.session.cfg.chunk_size).min(n)
        } else {
            n
        };
        let want_all = self.job.params.prompt_logprobs;
        if want_all.is_some() && a == 0 {
            // The first token has no log-probability.
            self.prompt_lp.push(None);
        }
        let want = match want_all {
            Some(_) => 0..b - a,
            None if b == n => b - a - 1..b - a,
            None => 0..0,
        };
        let prompt = &self.job.prompt;
        let (row, lps) = (&mut self.row, &mut self.prompt_lp);
        let r = self.session.feed(&prompt[a..b], want, |i, logits| {
            let at = a + i;
            if at + 1 < n {
                if let Some(top) = want_all {
                    lps.push(Some(token_logprob(logits, prompt[at + 1], top)));
                }
            } else {
                row.clear();
                row.extend_from_slice(logits);
            }
        });
        if let Err(e) = r {
            return self.fail(e);
        }
        self.prompt_fed(a, b, metrics);
    }

    /// Prompt tokens `a..b` are in the cache (and, when `b` ends the prompt, the last one's logits in `row`): at the
    /// prompt's end, report it, store the prefix, and sample the first token.
    fn prompt_fed(&mut self, a: usize, b: usize, metrics: &Metrics) {
        let n = self.job.prompt.len();
        self.history.extend_from_slice(&self.job.prompt[a..b]);
        self.fed = b;
        metrics.prompt_tokens.fetch_add((b - a) as u64, Relaxed);
        if b < n {
            return;
        }
        let (index, cached) = (self.job.index, self.cached);
        let logprobs = self
            .job
            .params
            .prompt_logprobs
            .map(|_| std::mem::take(&mut self.prompt_lp));
        self.send(Event::Prompt {
            index,
            prompt_tokens: n,
            cached_tokens: cached,
            logprobs,
        });
        if self.job.params.max_tokens == 0 {
            self.store_prefix();
            return self.finish(Finish::Length);
        }
        let top = self.job.params.logprobs;
        let (next, lp) = pick(
            &mut self.sampler,
            &self.history,
            &mut self.raw,
            &mut self.row,
            top,
        );
        self.take(next, lp, metrics);
        // After the first token is out: storing (a tier's encoding and writes) is not in its latency. The session
        // still holds exactly the prompt (the sampled token is fed by the next step).
        if !self.finished || self.generated == 0 {
            self.store_prefix();
        }
    }

    /// Puts what the session holds into the prefix store (when there is one). A failure costs only reuse.
    fn store_prefix(&self) {
        if let Some(p) = &self.prefix {
            if let Err(e) = p.store.insert(&p.ns, &self.session) {
                eprintln!("warning: prefix cache: {e:#}");
            }
        }
    }

    /// Feeds the pending token alone and samples the next.
    pub fn decode_step(&mut self, metrics: &Metrics) {
        let Some(tok) = self.pending.take() else {
            return;
        };
        let logits = match self.session.decode(tok) {
            Ok(l) => l,
            Err(e) => return self.fail(e),
        };
        let top = self.job.params.logprobs;
        let (next, lp) = pick(&mut self.sampler, &self.history, &mut self.raw, logits, top);
        self.take(next, lp, metrics);
    }

    /// Handles a sampled token: the end of generation, or a released piece of text and the next step.
    fn take(&mut self, next: u32, lp: Option<TokenLogprob>, metrics: &Metrics) {
        let now = Instant::now();
        match self.last_token_at {
            None => metrics.ttft(now.duration_since(self.job.arrived).as_secs_f64()),
            Some(t) => metrics.inter_token(now.duration_since(t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.generated += 1;
        metrics.generated_tokens.fetch_add(1, Relaxed);
        if self.generated == self.job.params.min_tokens {
            // Stop strings are matched from here on (the matcher held nothing back until now).
            self.stop = StopMatcher::new(self.job.params.stop.clone());
        }
        let index = self.job.index;
        let stop_token = self.job.params.stop_tokens.contains(&next);
        let eog = !self.job.params.ignore_eos && self.ready.tokenizer.is_eog(next);
        if eog || (stop_token && self.ready.tokenizer.is_control(next)) {
            // The end-of-generation token counts as generated and shows in log-probabilities (lm-eval reads the
            // one generated token after an echoed prompt), but adds no text.
            self.send(Event::Token {
                index,
                id: next,
                text: String::new(),
                logprob: lp,
            });
            return self.finish(Finish::Stop);
        }
        self.history.push(next);
        let piece = self.dec.push(&self.ready.tokenizer, next);
        let (text, hit) = self.stop.push(&piece);
        self.send(Event::Token {
            index,
            id: next,
            text,
            logprob: lp,
        });
        if hit {
            return self.finish_with(Finish::Stop, String::new());
        }
        if stop_token {
            // A stop token that is text ends the answer after its text (vLLM keeps it unless it is special).
            return self.finish(Finish::Stop);
        }
        if self.sampler.json_done() {
            // JSON mode: the object is closed.
            return self.finish(Finish::Stop);
        }
        if self.generated >= self.job.params.max_tokens
            || self.session.n_past() + 1 > self.session.cfg.max_context
        {
            return self.finish(Finish::Length);
        }
        self.pending = Some(next);
    }

    /// Ends the sequence, releasing the text still held back.
    fn finish(&mut self, why: Finish) {
        let tail = self.dec.flush();
        let (mut text, hit) = self.stop.push(&tail);
        if hit {
            return self.finish_with(Finish::Stop, text);
        }
        text.push_str(&self.stop.flush());
        self.finish_with(why, text)
    }

    fn finish_with(&mut self, why: Finish, text: String) {
        // The prompt and the answer, for the next turn of a conversation (whole blocks only: an exact snapshot of
        // this history would rarely be a later prompt's prefix).
        if self.generated > 0 && crate::engine::prefix::entry::mode(&self.session) == Mode::Blocks {
            self.store_prefix();
        }
        let (index, completion_tokens) = (self.job.index, self.generated);
        self.send(Event::Done {
            index,
            text,
            finish: why,
            completion_tokens,
        });
        self.finished = true;
    }
}

/// Samples the next token from `logits`; with `top`, also its log-probability and `top` alternatives, from the logits
/// as the model gave them (copied into `raw` first: the penalty changes `logits`).
fn pick(
    sampler: &mut Sampler,
    history: &[u32],
    raw: &mut Vec<f32>,
    logits: &mut [f32],
    top: Option<usize>,
) -> (u32, Option<TokenLogprob>) {
    if top.is_some() {
        raw.clear();
        raw.extend_from_slice(logits);
    }
    let next = sampler.sample(logits, history);
    (next, top.map(|k| token_logprob(raw, next, k)))
}
