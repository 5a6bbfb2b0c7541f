//! Turning a run's events into OpenAI-shaped responses: one JSON body, or an SSE stream of chunks ending in
//! `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Event, Finish};
use super::error::ApiError;
use super::logprobs::TokenLogprob;
use super::reasoning::{self, Thinking};
use super::tools::{self, Mode, Reader};
use super::Ready;

/// The events of one request's jobs, after every job was admitted.
pub struct Run {
    rx: UnboundedReceiver<Event>,
    /// Events that came before the last admission.
    early: VecDeque<Event>,
}

impl Run {
    /// Waits until all `jobs` are admitted; the first failure is the request's error (dropping the receiver then
    /// cancels the others).
    pub async fn admitted(mut rx: UnboundedReceiver<Event>, jobs: usize) -> Result<Run, ApiError> {
        let mut early = VecDeque::new();
        let mut admitted = 0;
        while admitted < jobs {
            match rx.recv().await {
                Some(Event::Admitted { .. }) => admitted += 1,
                Some(Event::Failed { error, .. }) => return Err(error),
                Some(e) => early.push_back(e),
                None => return Err(engine_gone()),
            }
        }
        Ok(Run { rx, early })
    }

    async fn next(&mut self) -> Option<Event> {
        match self.early.pop_front() {
            Some(e) => Some(e),
            None => self.rx.recv().await,
        }
    }
}

fn engine_gone() -> ApiError {
    ApiError::internal("the engine stopped before answering")
}

/// Which response shape.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// What the response needs besides the events.
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Choices per prompt (`n`).
    pub n: usize,
    /// Per prompt: its text, when echoed (completions with `echo`).
    pub echo: Option<Vec<String>>,
    /// Per prompt: leading tokens the server added (a BOS before a text prompt) that the echo leaves out, so the
    /// echoed tokens and log-probabilities line up with the text the client sent (and with its own tokenization,
    /// which lm-eval's `[ctxlen:-1]` slice relies on). Empty = none anywhere.
    pub echo_skip: Vec<usize>,
    /// Alternatives per position when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    pub include_usage: bool,
    pub ready: Arc<Ready>,
    /// Chat with tools: how the answer is read for calls.
    pub tools: Option<Reader>,
    /// Chat with a reasoning model's template: how its thinking is found.
    pub thinking: Option<Thinking>,
}

/// One choice, as the events build it.
#[derive(Default)]
struct Choice {
    text: String,
    prompt_tokens: usize,
    cached_tokens: usize,
    prompt_lp: Option<Vec<Option<TokenLogprob>>>,
    /// The prompt's first token (its log-probability entry has no id of its own).
    first_id: u32,
    /// Generated tokens' log-probabilities (when asked for).
    lps: Vec<TokenLogprob>,
    finish: Option<Finish>,
    completion_tokens: usize,
    /// Streamed with tools: bytes of `text` sent as content so far.
    sent: usize,
    /// Streamed with tools: the calls begun so far, each with its id and the bytes of its arguments sent.
    calls: Vec<(String, usize)>,
    /// Streamed with thinking: where the content starts, once the thinking is closed.
    body: Option<usize>,
    /// Streamed with thinking: bytes of `text` sent as reasoning so far.
    thought: usize,
}

impl Choice {
    /// The stream delta that brings the calls sent so far up to `calls` (names and arguments so far, or final): a
    /// call not begun yet comes with its id, type and name, every call with the arguments it has gained. None when
    /// nothing changed.
    fn calls_delta<'a>(
        &mut self,
        reader: &Reader,
        calls: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Option<Value> {
        let mut out = Vec::new();
        for (i, (name, args)) in calls.enumerate() {
            match self.calls.get_mut(i) {
                None => {
                    let id = reader.new_id();
                    out.push(json!({"index": i, "id": id, "type": "function",
                                    "function": {"name": name, "arguments": args}}));
                    self.calls.push((id, args.len()));
                }
                Some((_, sent)) if args.len() > *sent && args.is_char_boundary(*sent) => {
                    out.push(json!({"index": i, "function": {"arguments": &args[*sent..]}}));
                    *sent = args.len();
                }
                Some(_) => {}
            }
        }
        (!out.is_empty()).then(|| json!({ "tool_calls": out }))
    }
}

/// A chat answer read for calls, and its finish reason: "tool_calls" for a plain stop with calls (OpenAI finishes a
/// call it was told to make with "stop"), `finish`'s own otherwise. None when the answer made no call.
fn tool_answer(
    reader: &Reader,
    text: &str,
    finish: Finish,
) -> Option<(tools::Parsed, &'static str)> {
    let p = reader.parse(text);
    if p.calls.is_empty() {
        return None;
    }
    let reason = match finish {
        Finish::Stop if reader.mode != (Mode::Forced { named: true }) => "tool_calls",
        f => f.as_str(),
    };
    Some((p, reason))
}

/// Where a chat answer's content starts once its thinking is closed (its first byte that is not whitespace), while
/// none of it has gone out.
fn settle_body(thinking: bool, c: &mut Choice, body: usize) {
    let b = match thinking {
        true if c.sent <= body => reasoning::first_non_ws(&c.text, body),
        _ => body,
    };
    c.body = Some(b);
    c.sent = c.sent.max(b);
}

/// The reasoning a streamed answer has not sent yet (of the answer so far, or with `whole` of the complete answer),
/// and whether its thinking is closed, so that content may follow (then `c.body` says where it starts).
fn reasoning_delta(
    thinking: Option<Thinking>,
    c: &mut Choice,
    whole: bool,
) -> (Option<Value>, bool) {
    let Some(th) = thinking.filter(|_| c.body.is_none()) else {
        if let Some(b) = c.body.filter(|&b| c.sent == b) {
            settle_body(thinking.is_some(), c, b);
        }
        return (None, true);
    };
    let ((from, to), body) = match whole {
        true => {
            let (r, b) = th.split(&c.text);
            (r.unwrap_or((0, 0)), Some(b))
        }
        false => {
            let p = th.progress(&c.text);
            (p.reasoning, p.body)
        }
    };
    let mut delta = None;
    if to > c.thought {
        delta = Some(json!({"reasoning_content": &c.text[c.thought.max(from)..to]}));
        c.thought = to;
    }
    match body {
        Some(b) => settle_body(true, c, b),
        None => return (delta, false),
    }
    (delta, true)
}

/// The deltas a streamed chat answer with tools or thinking sends after its latest token: reasoning, then content up
/// to where a call may begin, then calls as they are written.
fn chat_deltas(thinking: Option<Thinking>, tools: Option<&Reader>, c: &mut Choice) -> Vec<Value> {
    let (reasoning, closed) = reasoning_delta(thinking, c, false);
    let mut out: Vec<Value> = reasoning.into_iter().collect();
    if !closed {
        return out;
    }
    let body = c.body.unwrap_or(0);
    match tools {
        None => {
            if c.sent < c.text.len() {
                out.push(json!({"content": &c.text[c.sent..]}));
                c.sent = c.text.len();
            }
        }
        Some(reader) => {
            // Once the unsent text starts a call, nothing more is releasable.
            let n = reader.releasable(&c.text[c.sent..], c.sent == body);
            if n > 0 {
                out.push(json!({"content": &c.text[c.sent..c.sent + n]}));
                c.sent += n;
            }
            if c.sent < c.text.len() {
                let so_far = reader.partial(&c.text[body..]);
                let named = so_far
                    .iter()
                    .map(|p| (p.name.as_str(), p.arguments.as_str()));
                out.extend(c.calls_delta(reader, named));
            }
        }
    }
    out
}

/// The last deltas of a streamed chat answer with tools or thinking (what the whole answer has that was not sent),
/// and its finish reason.
fn final_deltas(
    thinking: Option<Thinking>,
    tools: Option<&Reader>,
    c: &mut Choice,
    finish: Finish,
) -> (Vec<Value>, &'static str) {
    let mut out: Vec<Value> = reasoning_delta(thinking, c, true).0.into_iter().collect();
    let body = c.body.unwrap_or(0);
    let rest = |c: &Choice| Some(c.text[c.sent.max(body)..].to_string()).filter(|t| !t.is_empty());
    let reason = match tools {
        Some(reader) => match tool_answer(reader, &c.text[body..], finish) {
            Some((p, reason)) => {
                let head_end = body + p.head;
                let head = &c.text[c.sent.min(head_end)..head_end];
                if !head.is_empty() {
                    out.push(json!({ "content": head }));
                }
                let named = p
                    .calls
                    .iter()
                    .map(|k| (k.name.as_str(), k.arguments.as_str()));
                out.extend(c.calls_delta(reader, named));
                reason
            }
            None if !c.calls.is_empty() => finish.as_str(),
            None => {
                out.extend(rest(c).map(|t| json!({ "content": t })));
                finish.as_str()
            }
        },
        None => {
            out.extend(rest(c).map(|t| json!({ "content": t })));
            finish.as_str()
        }
    };
    c.sent = c.text.len();
    (out, reason)
}

/// usage over every choice: each prompt counted once (not once per `n`).
fn usage(choices: &[Choice], n: usize) -> Value {
    let prompt: usize = choices.iter().step_by(n).map(|c| c.prompt_tokens).sum();
    let cached: usize = choices.iter().step_by(n).map(|c| c.cached_tokens).sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), Value::Array(choices));
        m
    }

    fn piece(&self, id: u32) -> String {
        self.ready.tokenizer.token_to_piece(id)
    }

    /// Legacy completions `logprobs`: parallel lists, `text_offset` in characters from `offset`.
    fn completion_logprobs(
        &self,
        entries: &[(u32, Option<&TokenLogprob>)],
        mut offset: usize,
    ) -> Value {
        let (mut tokens, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
        for &(id, lp) in entries {
            let piece = self.piece(id);
            offs.push(json!(offset));
            offset += piece.chars().count();
            tokens.push(json!(piece));
            lps.push(lp.map_or(Value::Null, |l| json!(l.logprob)));
            tops.push(lp.map_or(Value::Null, |l| {
                let mut m = Map::new();
                for &(t, v) in &l.top {
                    m.entry(self.piece(t)).or_insert(json!(v));
                }
                Value::Object(m)
            }));
        }
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
    }

    /// Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let bytes = self.ready.tokenizer.token_bytes(id).to_vec();
            json!({"token": self.piece(id), "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                let tops: Vec<Value> = l.top.iter().map(|&(t, v)| entry(t, v)).collect();
                e["top_logprobs"] = Value::Array(tops);
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// A choice's prompt log-probabilities as echoed: without the tokens the server added in front.
    fn echoed<'a>(
        &self,
        index: usize,
        v: &'a [Option<TokenLogprob>],
    ) -> &'a [Option<TokenLogprob>] {
        let skip = self.echo_skip.get(index / self.n).copied().unwrap_or(0);
        &v[skip.min(v.len())..]
    }

    /// The prompt text a choice echoes ("" without echo).
    fn echo_text(&self, index: usize) -> &str {
        self.echo
            .as_ref()
            .and_then(|v| v.get(index / self.n))
            .map_or("", |s| s.as_str())
    }

    fn choice_json(&self, index: usize, c: &Choice) -> Value {
        let finish = c.finish.map(Finish::as_str);
        match self.kind {
            Kind::Completion => {
                let echo = self.echo_text(index);
                let logprobs = match self.logprobs {
                    None => Value::Null,
                    Some(_) => {
                        let mut entries: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
                        let mut offset = echo.chars().count();
                        if let Some(p) = &c.prompt_lp {
                            offset = 0;
                            entries = prompt_entries(self.echoed(index, p), c.first_id);
                        }
                        entries.extend(c.lps.iter().map(|l| (l.id, Some(l))));
                        self.completion_logprobs(&entries, offset)
                    }
                };
                json!({"index": index, "text": format!("{echo}{}", c.text), "logprobs": logprobs,
                       "finish_reason": finish})
            }
            Kind::Chat => {
                let logprobs = match self.logprobs {
                    None => Value::Null,
                    Some(_) => self.chat_logprobs(&c.lps),
                };
                let (reasoning, body) = match &self.thinking {
                    Some(th) => th.split(&c.text),
                    None => (None, 0),
                };
                let answer = &c.text[body..];
                let mut message = json!({"role": "assistant", "content": answer});
                let mut finish = finish;
                let called = self.tools.as_ref().zip(c.finish);
                if let Some((r, (p, reason))) =
                    called.and_then(|(r, f)| Some((r, tool_answer(r, answer, f)?)))
                {
                    message = json!({"role": "assistant", "content": p.content,
                                     "tool_calls": r.calls_json(&p.calls)});
                    finish = Some(reason);
                }
                if let Some((s, e)) = reasoning {
                    message["reasoning_content"] = json!(&c.text[s..e]);
                }
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }
}

/// Reads every event of `run` into choices, then the one JSON body.
pub async fn collect(
    mut run: Run,
    meta: Meta,
    jobs: usize,
    first_ids: Vec<u32>,
) -> Result<Response, ApiError> {
    let mut choices: Vec<Choice> = (0..jobs).map(|_| Choice::default()).collect();
    let mut done = 0;
    while done < jobs {
        let Some(e) = run.next().await else {
            return Err(engine_gone());
        };
        match e {
            Event::Admitted { .. } => {}
            Event::Prompt {
                index,
                prompt_tokens,
                cached_tokens,
                logprobs,
            } => {
                let c = &mut choices[index];
                c.prompt_tokens = prompt_tokens;
                c.cached_tokens = cached_tokens;
                c.prompt_lp = logprobs;
                c.first_id = first_ids[index / meta.n];
            }
            Event::Token {
                index,
                text,
                logprob,
                ..
            } => {
                let c = &mut choices[index];
                c.text.push_str(&text);
                c.lps.extend(logprob);
            }
            Event::Done {
                index,
                text,
                finish,
                completion_tokens,
            } => {
                let c = &mut choices[index];
                c.text.push_str(&text);
                c.finish = Some(finish);
                c.completion_tokens = completion_tokens;
                done += 1;
            }
            Event::Failed { error, .. } => return Err(error),
        }
    }
    let list = choices
        .iter()
        .enumerate()
        .map(|(i, c)| meta.choice_json(i, c))
        .collect();
    let mut body = meta.envelope(false, list);
    body.insert("usage".into(), usage(&choices, meta.n));
    Ok(axum::Json(Value::Object(body)).into_response())
}

/// Entries of a prompt's log-probabilities: the first position has none, and its id is the prompt's first.
fn prompt_entries(v: &[Option<TokenLogprob>], first: u32) -> Vec<(u32, Option<&TokenLogprob>)> {
    v.iter()
        .map(|l| (l.as_ref().map_or(first, |l| l.id), l.as_ref()))
        .collect()
}

/// The SSE response: a chunk per event, a usage chunk when asked for, `data: [DONE]`.
pub fn stream(run: Run, meta: Meta, jobs: usize, first_ids: Vec<u32>) -> Response {
    let state = StreamState {
        run,
        meta,
        choices: (0..jobs).map(|_| Choice::default()).collect(),
        done: 0,
        out: VecDeque::new(),
        ended: false,
        first_ids,
    };
    let s = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            let e = st.run.next().await;
            st.on(e);
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

struct StreamState {
    run: Run,
    meta: Meta,
    choices: Vec<Choice>,
    done: usize,
    out: VecDeque<SseEvent>,
    ended: bool,
    first_ids: Vec<u32>,
}

impl StreamState {
    fn chunk(&mut self, choice: Value) {
        let body = Value::Object(self.meta.envelope(true, vec![choice]));
        self.out
            .push_back(SseEvent::default().data(body.to_string()));
    }

    fn end(&mut self) {
        if self.meta.include_usage {
            let mut body = self.meta.envelope(true, vec![]);
            body.insert("usage".into(), usage(&self.choices, self.meta.n));
            self.out
                .push_back(SseEvent::default().data(Value::Object(body).to_string()));
        }
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.ended = true;
    }

    fn on(&mut self, e: Option<Event>) {
        let meta = &self.meta;
        match e {
            None => {
                let err = engine_gone();
                self.out
                    .push_back(SseEvent::default().data(err.body().to_string()));
                self.ended = true;
            }
            Some(Event::Failed { error, .. }) => {
                self.out
                    .push_back(SseEvent::default().data(error.body().to_string()));
                self.ended = true;
            }
            Some(Event::Admitted { .. }) => {}
            Some(Event::Prompt {
                index,
                prompt_tokens,
                cached_tokens,
                logprobs,
            }) => {
                let c = &mut self.choices[index];
                c.prompt_tokens = prompt_tokens;
                c.cached_tokens = cached_tokens;
                let first = match meta.kind {
                    Kind::Chat => Some(
                        json!({"index": index, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": null, "finish_reason": null}),
                    ),
                    Kind::Completion if meta.echo.is_some() => {
                        let lp = logprobs.as_ref().map_or(Value::Null, |v| {
                            let first = self.first_ids[index / meta.n];
                            meta.completion_logprobs(
                                &prompt_entries(meta.echoed(index, v), first),
                                0,
                            )
                        });
                        Some(
                            json!({"index": index, "text": meta.echo_text(index), "logprobs": lp,
                                    "finish_reason": null}),
                        )
                    }
                    Kind::Completion => None,
                };
                if let Some(ch) = first {
                    self.chunk(ch);
                }
            }
            Some(Event::Token {
                index,
                text,
                logprob,
                ..
            }) => {
                if text.is_empty() && logprob.is_none() {
                    return;
                }
                let offset = {
                    let c = &mut self.choices[index];
                    let at = meta.echo_text(index).chars().count() + c.text.chars().count();
                    c.text.push_str(&text);
                    at
                };
                if let Kind::Completion = meta.kind {
                    let lp = logprob.as_ref().map_or(Value::Null, |l| {
                        meta.completion_logprobs(&[(l.id, Some(l))], offset)
                    });
                    self.chunk(
                        json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null}),
                    );
                    return;
                }
                let mut lp = logprob
                    .as_ref()
                    .map(|l| meta.chat_logprobs(std::slice::from_ref(l)));
                let mut deltas = match meta.tools.is_some() || meta.thinking.is_some() {
                    true => {
                        chat_deltas(meta.thinking, meta.tools.as_ref(), &mut self.choices[index])
                    }
                    false => vec![json!({ "content": text })],
                };
                if deltas.is_empty() {
                    if lp.is_none() {
                        return;
                    }
                    deltas.push(json!({"content": ""}));
                }
                let chunks: Vec<Value> = deltas
                    .into_iter()
                    .map(|d| {
                        json!({"index": index, "delta": d, "logprobs": lp.take().unwrap_or(Value::Null),
                               "finish_reason": null})
                    })
                    .collect();
                for ch in chunks {
                    self.chunk(ch);
                }
            }
            Some(Event::Done {
                index,
                text,
                finish,
                completion_tokens,
            }) => {
                let c = &mut self.choices[index];
                c.completion_tokens = completion_tokens;
                c.finish = Some(finish);
                let ch = match meta.kind {
                    Kind::Chat if meta.tools.is_some() || meta.thinking.is_some() => {
                        // The rest of the answer: reasoning and content not sent yet, then what its calls have not
                        // sent yet. A call begun in the stream that the whole answer does not read as one (cut off
                        // by max_tokens) stays as far as it went; the rest of the text is not sent as content.
                        c.text.push_str(&text);
                        let (deltas, reason) =
                            final_deltas(meta.thinking, meta.tools.as_ref(), c, finish);
                        for d in deltas {
                            self.chunk(json!({"index": index, "delta": d, "logprobs": null,
                                              "finish_reason": null}));
                        }
                        json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                    Kind::Completion => json!({"index": index, "text": text, "logprobs": null,
                                               "finish_reason": finish.as_str()}),
                    Kind::Chat => {
                        let delta = if text.is_empty() {
                            json!({})
                        } else {
                            json!({ "content": text })
                        };
                        json!({"index": index, "delta": delta, "logprobs": null,
                               "finish_reason": finish.as_str()})
                    }
                };
                self.chunk(ch);
                self.done += 1;
                if self.done == self.choices.len() {
                    self.end();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::tools::ToolRequest;
    use crate::tokenizer::chat::ChatTemplate;

    /// A stream's deltas put together as a client does: reasoning, content, calls (name, arguments), finish reason.
    type Assembled = (String, String, Vec<(String, String)>, &'static str);

    fn streamed(
        th: Option<Thinking>,
        tools: Option<&Reader>,
        text: &str,
        piece: usize,
    ) -> Assembled {
        let mut c = Choice::default();
        let mut deltas = Vec::new();
        let mut at = 0;
        while at < text.len() {
            let mut end = (at + piece).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            c.text.push_str(&text[at..end]);
            deltas.extend(chat_deltas(th, tools, &mut c));
            at = end;
        }
        let (last, reason) = final_deltas(th, tools, &mut c, Finish::Stop);
        deltas.extend(last);
        let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
        for d in deltas {
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(d["content"].as_str().unwrap_or(""));
            for k in d["tool_calls"].as_array().into_iter().flatten() {
                let i = k["index"].as_u64().unwrap() as usize;
                let args = k["function"]["arguments"].as_str().unwrap_or("");
                if i == calls.len() {
                    calls.push((
                        k["function"]["name"].as_str().unwrap().to_string(),
                        String::new(),
                    ));
                }
                calls[i].1.push_str(args);
            }
        }
        (reasoning, content, calls, reason)
    }

    /// The plain answer's parts, as `collect` builds its message.
    fn plain(th: Option<Thinking>, tools: Option<&Reader>, text: &str) -> Assembled {
        let (r, body) = th.map_or((None, 0), |t| t.split(text));
        let reasoning = r.map_or(String::new(), |(s, e)| text[s..e].to_string());
        let answer = &text[body..];
        match tools.and_then(|t| tool_answer(t, answer, Finish::Stop)) {
            Some((p, reason)) => {
                let calls = p.calls.into_iter().map(|k| (k.name, k.arguments)).collect();
                (reasoning, p.content.unwrap_or_default(), calls, reason)
            }
            None => (reasoning, answer.to_string(), Vec::new(), "stop"),
        }
    }

    #[test]
    fn streamed_reasoning_content_and_calls_add_up_to_the_plain_answer() {
        let tpl = ChatTemplate::from_source(
            "{{ '<tool_call>' }}{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
            false,
            false,
        )
        .unwrap();
        let def = r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}"#;
        let reader = ToolRequest {
            tools: Some(vec![serde_json::from_str(def).unwrap()]),
            tool_choice: None,
            parallel_tool_calls: None,
        }
        .check(Ok(&tpl))
        .unwrap()
        .unwrap()
        .reader;
        let opened = Some(Thinking {
            starts_inside: false,
        });
        let inside = Some(Thinking {
            starts_inside: true,
        });
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
        let cases = [
            (
                opened,
                Some(&reader),
                format!("<think>\nThe user wants weather.\n</think>\n\n{call}"),
            ),
            (
                opened,
                Some(&reader),
                "<think>\nHmm.</think>\n\n  It is sunny.".to_string(),
            ),
            (opened, Some(&reader), format!("Let me check.\n{call}")),
            (
                inside,
                None,
                "Okay, so.\n</think>\n\nSunny in Zürich.".to_string(),
            ),
            (opened, None, "<think>\nnever closes, cut off".to_string()),
            (opened, Some(&reader), "<think>\n\n</think>\n\n".to_string()),
            (None, None, "<think>kept as text</think> answer".to_string()),
        ];
        for (th, tools, text) in &cases {
            let want = plain(*th, *tools, text);
            for piece in [1, 2, 3, 7, 64] {
                let got = streamed(*th, *tools, text, piece);
                assert_eq!(got, want, "{text:?} in pieces of {piece}");
            }
        }
        let (r, content, calls, reason) = plain(opened, Some(&reader), &cases[0].2);
        assert_eq!(r, "The user wants weather.");
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![(
                "get_weather".to_string(),
                "{\"city\":\"Zürich\"}".to_string()
            )]
        );
        assert_eq!(reason, "tool_calls");
        assert_eq!(plain(opened, None, &cases[1].2).1, "It is sunny.");
    }
}
