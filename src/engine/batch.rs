//! Continuous batching: advance several sessions of one model in one forward pass.
//!
//! On a CPU, decoding is bound by memory bandwidth: each step streams every weight once for a single row. A
//! [`Batch`] step runs one row per decoding session (or a prompt chunk's rows) through the model together
//! ([`Model::forward_batch`]), so each weight is read once for all of them, while every session attends over its own
//! cache with its own KV method, selector and recorded queries. Each session ends up exactly where
//! [`Session::decode`] / [`Session::feed`] would have left it: the same cache, history, compression schedule and
//! logits (bit for bit with the kernels here, see tests/batch.rs).
//!
//! A serving loop: keep one `Batch`; each iteration, gather the live sessions and one [`Input`] each (the token just
//! sampled, or the next piece of a new prompt), call [`Batch::step`], and sample from [`Batch::logits`].

use std::time::Instant;

use anyhow::{bail, Result};

use super::{Phase, Session};
use crate::model::{Model, Scratch, SeqStep};

/// What one session does in a batch step.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// One decode step: feeds this token (as [`Session::decode`]); its logits come back.
    Decode(u32),
    /// A piece of a prompt (one or more tokens). `last`: the prompt ends with this piece, so the KV method compresses
    /// and the selector indexes after it (as at the end of [`Session::prefill`]), and the logits after its last token
    /// come back; a piece that is not the last gets no logits (and compresses only under a `chunked` method).
    Prompt { tokens: &'a [u32], last: bool },
}

impl Input<'_> {
    fn tokens(&self) -> &[u32] {
        match self {
            Input::Decode(t) => std::slice::from_ref(t),
            Input::Prompt { tokens, .. } => tokens,
        }
    }

    /// Whether the step returns logits for this session.
    fn wants_logits(&self) -> bool {
        matches!(self, Input::Decode(_) | Input::Prompt { last: true, .. })
    }
}

/// Shared buffers of batched steps: the activations of all rows of a step, and one row of logits per session that
/// wants them. Grows to the largest step it has seen (rows, sessions); reused after that without allocating.
#[derive(Default)]
pub struct Batch {
    /// rows × …: activations; logits: sessions × vocab.
    scratch: Option<Scratch>,
    /// Rows the scratch holds, and logit rows.
    cap: (usize, usize),
    /// rows: the positions of every row, sequence after sequence.
    pos: Vec<u32>,
    /// Per session of the last step: its row of `scratch.logits`, if it got logits.
    logit_row: Vec<Option<usize>>,
    /// The last row of each session that wants logits, in session order (reused).
    logit_src: Vec<usize>,
    /// Reused allocation of the per-step list of sequences (see [`recycle`]).
    steps: Vec<SeqStep<'static>>,
    vocab: usize,
}

impl Batch {
    /// A batch whose buffers first fit `rows` rows and `seqs` sessions (they grow if a step needs more).
    pub fn new(model: &Model, rows: usize, seqs: usize) -> Self {
        let mut b = Self::default();
        b.reserve(model, rows, seqs);
        b
    }

    fn reserve(&mut self, model: &Model, rows: usize, seqs: usize) {
        let (r, l) = self.cap;
        if self.scratch.is_none() || rows > r || seqs > l {
            let cap = (rows.max(r).max(1), seqs.max(l).max(1));
            self.scratch = Some(Scratch::new(model.config(), cap.0, cap.1));
            self.cap = cap;
            self.pos.reserve(cap.0.saturating_sub(self.pos.len()));
        }
        self.vocab = model.config().vocab;
    }

    /// Bytes the shared buffers hold.
    pub fn bytes(&self) -> usize {
        self.scratch.as_ref().map_or(0, Scratch::bytes)
    }

    /// Advances every session by its input in one forward pass (`inputs[i]` is session i's). Every session must run
    /// the same model. Checks every input first (empty, over the context budget, a token outside the vocabulary):
    /// an error there leaves every session as it was. Afterwards each session holds what [`Session::decode`]
    /// (`Input::Decode`) or [`Session::feed`] of the prompt piece would have left, stats included: a step's wall time
    /// counts for each session in it. The logits are then at [`Self::logits`].
    pub fn step(&mut self, sessions: &mut [&mut Session<'_>], inputs: &[Input<'_>]) -> Result<()> {
        if sessions.len() != inputs.len() {
            bail!(
                "batch step: {} sessions but {} inputs",
                sessions.len(),
                inputs.len()
            );
        }
        self.logit_row.clear();
        let Some(first) = sessions.first() else {
            return Ok(());
        };
        let model = first.model;
        let vocab = model.config().vocab;
        for (s, inp) in sessions.iter().zip(inputs) {
            if !std::ptr::eq(s.model, model) {
                bail!("batch step: every session of a batch must run the same model");
            }
            let toks = inp.tokens();
            if toks.is_empty() {
                bail!("nothing to feed: the prompt is empty");
            }
            s.check_room(toks.len())?;
            if let Some(&bad) = toks.iter().find(|&&t| t as usize >= vocab) {
                bail!("token id {bad} is outside the model's vocabulary of {vocab}");
            }
        }
        let rows: usize = inputs.iter().map(|i| i.tokens().len()).sum();
        let n_logits = inputs.iter().filter(|i| i.wants_logits()).count();
        self.reserve(model, rows, n_logits);
        let t0 = Instant::now();

        // Positions of every row; the last row of each session that wants logits, and where its logits go.
        self.pos.clear();
        self.logit_src.clear();
        for (s, inp) in sessions.iter().zip(inputs) {
            let n0 = s.n_past() as u32;
            self.pos.extend(n0..n0 + inp.tokens().len() as u32);
            let want = inp.wants_logits();
            self.logit_row.push(want.then_some(self.logit_src.len()));
            if want {
                self.logit_src.push(self.pos.len() - 1);
            }
        }
        for s in sessions.iter_mut() {
            // Per-step counters, as Session::decode resets them.
            s.cache.take_read();
            s.scratch.seq.attn_ns = 0;
        }

        let scratch = self.scratch.as_mut().expect("reserved above");
        let mut steps: Vec<SeqStep<'_>> = recycle(std::mem::take(&mut self.steps));
        let mut r0 = 0;
        for (s, inp) in sessions.iter_mut().zip(inputs) {
            let toks = inp.tokens();
            let s = &mut **s;
            steps.push(SeqStep {
                tokens: toks,
                pos: &self.pos[r0..r0 + toks.len()],
                cache: &mut s.cache,
                state: &mut s.scratch.seq,
            });
            r0 += toks.len();
        }
        // On a pool worker, as Session::feed runs its passes (parallel kernels skip the cross-thread hand-off).
        rayon::scope(|_| model.forward_batch(&mut steps, scratch));
        self.steps = recycle(steps);

        // Logits of the sessions that want them, in one product.
        let rows_wanted = self.logit_src.iter().copied();
        rayon::scope(|_| model.logits_at(scratch, rows_wanted));

        let elapsed = t0.elapsed().as_secs_f64();
        for (s, inp) in sessions.iter_mut().zip(inputs) {
            let toks = inp.tokens();
            s.after_chunk(toks)?;
            match *inp {
                Input::Decode(_) => {
                    s.end_feed(Phase::Decode)?;
                    s.stats.decode_steps += 1;
                    s.stats.decode_s += elapsed;
                    s.stats.kv_read_total += s.cache.take_read();
                    s.stats.attention_ns_total += s.scratch.seq.attn_ns;
                }
                Input::Prompt { last, .. } => {
                    // The protocol's decision for this prompt: it changes only at the prompt's end (end_feed).
                    let compress = s.prompt_compresses();
                    if last {
                        s.end_feed(Phase::Prefill { compress })?;
                    } else {
                        s.end_chunk(compress)?;
                        s.note_bytes();
                    }
                    s.stats.prompt_tokens += toks.len();
                    s.stats.prefill_s += elapsed;
                }
            }
        }
        Ok(())
    }

    /// The logits after session `i`'s input in the last step (vocab floats), or None if that input was a prompt piece
    /// other than the last (or there was no such session).
    pub fn logits(&self, i: usize) -> Option<&[f32]> {
        let row = (*self.logit_row.get(i)?)?;
        let s = self.scratch.as_ref()?;
        Some(&s.logits[row * self.vocab..(row + 1) * self.vocab])
    }
}

/// An empty vector of another lifetime on the same allocation: the per-step list of borrowed sequences is rebuilt
/// every step without allocating (the in-place `collect` of an empty iterator over a same-layout element type keeps
/// the buffer).
fn recycle<'a, 'b>(mut v: Vec<SeqStep<'a>>) -> Vec<SeqStep<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycling_the_step_list_keeps_its_allocation() {
        let v: Vec<SeqStep<'static>> = Vec::with_capacity(8);
        let ptr = v.as_ptr() as usize;
        let w: Vec<SeqStep<'_>> = recycle(v);
        assert_eq!((w.capacity(), w.as_ptr() as usize), (8, ptr));
    }
}
