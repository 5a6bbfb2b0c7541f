//! The routes: request parsing and checks on the HTTP side, then jobs to the engine.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::api::{
    self, ChatRequest, CompletionRequest, GenParams, Prompt, Sampling, TokenizeRequest,
};
use super::engine::{Job, Ticket};
use super::error::ApiError;
use super::reasoning::ReasoningRequest;
use super::respond::{self, Kind, Meta, Run};
use super::tools::ToolRequest;
use super::{Ready, Shared};
use crate::engine::json_schema::JVal;
use crate::tokenizer::chat::{ChatMessage, ChatTemplate, ToolCall};

/// Largest request body (a long prompt as a JSON list of token ids is ~8 bytes a token).
const BODY_LIMIT: usize = 64 << 20;

pub fn router(sh: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(middleware::from_fn_with_state(sh.clone(), gate))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(sh)
}

/// Every request: the API key (all but `/health`), then the request count by endpoint and status.
async fn gate(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let resp = if path != "/health" && !authorized(&sh, req.headers()) {
        ApiError::unauthorized().into_response()
    } else {
        next.run(req).await
    };
    sh.metrics
        .request(&path_label(&path), resp.status().as_u16());
    resp
}

/// The endpoint label for metrics: known routes by name, the rest as one label (paths are client-chosen).
fn path_label(path: &str) -> String {
    const KNOWN: &[&str] = &[
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/metrics",
    ];
    KNOWN
        .iter()
        .find(|k| **k == path)
        .map_or_else(|| "other".into(), |k| k.to_string())
}

fn authorized(sh: &Shared, headers: &HeaderMap) -> bool {
    let Some(key) = &sh.cfg.api_key else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Compare every byte, so the time taken does not tell how much of a guess was right.
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// The loaded model, or 503 while loading (500 if loading failed).
fn ready(sh: &Shared) -> Result<Arc<Ready>, ApiError> {
    match sh.state.get() {
        Some(Ok(r)) => Ok(r.clone()),
        Some(Err(e)) => Err(ApiError::internal(format!("the model failed to load: {e}"))),
        None => Err(ApiError::unavailable("the model is still loading", 5).code("loading")),
    }
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    match ready(&sh) {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(sh): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": r.name,
            "object": "model",
            "created": r.created,
            "owned_by": "hayloft",
            "max_model_len": r.max_context,
        }],
    }))
    .into_response())
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    // The tiers' sizes are file and Redis I/O: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let mut t = sh.metrics.render();
        if let Some(p) = &sh.prefix {
            t += &super::metrics::render_prefix(p);
        }
        t
    })
    .await
    .unwrap_or_else(|e| format!("# metrics failed: {e}\n"));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn tokenizer_info(State(sh): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    let t = &r.tokenizer;
    let text = |id: Option<u32>| id.and_then(|i| t.token_text(i)).map(str::to_string);
    Ok(Json(json!({
        "tokenizer_class": "hayloft-gguf",
        "eos_token": text(t.eos_id()),
        "eos_token_id": t.eos_id(),
        "bos_token": text(t.bos_id()),
        "bos_token_id": t.bos_id(),
        "pad_token": null,
        "add_bos_token": t.add_bos(),
        "vocab_size": t.vocab_size(),
        "model_max_length": r.max_context,
        "chat_template": r.chat_template.as_ref().ok().map(|c| c.source()),
    }))
    .into_response())
}

async fn tokenize(State(sh): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    let req: TokenizeRequest = api::parse(&body)?;
    let add_special = req.add_special_tokens.or(req.add_special).unwrap_or(true);
    let tokens = match (&req.prompt, &req.content, &req.messages) {
        (Some(text), None, None) | (None, Some(text), None) => r
            .tokenizer
            .encode(text, add_special, true)
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e:#}")))?,
        (None, None, Some(msgs)) => {
            let tools = ToolRequest {
                tools: req.tools.clone(),
                ..Default::default()
            }
            .check(r.chat_template.as_ref().map_err(|e| e.as_str()))?;
            let defs = tools.as_ref().map_or(&[][..], |t| &t.tools[..]);
            let kwargs = template_kwargs(req.chat_template_kwargs.as_ref())?;
            let gen = req.add_generation_prompt.unwrap_or(true);
            chat_tokens(&r, msgs, defs, &kwargs, gen)?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `prompt` (or `content`) and `messages`",
            )
            .code("invalid_field"))
        }
    };
    Ok(
        Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": r.max_context}))
            .into_response(),
    )
}

async fn detokenize(State(sh): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    let req: api::DetokenizeRequest = api::parse(&body)?;
    check_ids(&r, &req.tokens, "tokens")?;
    Ok(Json(json!({"prompt": r.tokenizer.decode(&req.tokens)})).into_response())
}

fn check_ids(r: &Ready, ids: &[u32], field: &str) -> Result<(), ApiError> {
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= r.vocab) {
        return Err(ApiError::bad_request(format!(
            "field `{field}`: token id {bad} is outside the model's vocabulary of {}",
            r.vocab
        ))
        .code("invalid_token"));
    }
    Ok(())
}

/// `chat_template_kwargs` (vLLM's and llama-server's field): more variables for the chat template, e.g. Qwen3's
/// `enable_thinking`; a JSON object, each key a variable.
fn template_kwargs(v: Option<&JVal>) -> Result<Vec<(String, JVal)>, ApiError> {
    match v {
        None | Some(JVal::Null) => Ok(Vec::new()),
        Some(JVal::Obj(kv)) => match kv
            .iter()
            .find(|(k, _)| ChatTemplate::RESERVED.contains(&k.as_str()))
        {
            Some((k, _)) => Err(ApiError::bad_request(format!(
                "field `chat_template_kwargs`: '{k}' is set by the server and cannot be passed"
            ))
            .code("invalid_field")),
            None => Ok(kv.clone()),
        },
        Some(_) => Err(ApiError::bad_request(
            "field `chat_template_kwargs`: expected a JSON object",
        )
        .code("invalid_field")),
    }
}

/// A conversation rendered with the model's chat template (with `kwargs` as more variables) and tokenized
/// (template tokens special, message text plain).
fn chat_tokens(
    r: &Ready,
    msgs: &[api::MessageIn],
    tools: &[JVal],
    kwargs: &[(String, JVal)],
    gen_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let tpl = r.chat_template.as_ref().map_err(|e| {
        ApiError::bad_request(format!("this model has no chat template: {e}"))
            .code("no_chat_template")
    })?;
    let mut list = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let mut msg = ChatMessage::new(m.role.clone(), m.text(i)?);
        msg.tool_call_id = m.tool_call_id.clone();
        msg.name = m.name.clone();
        msg.reasoning_content = m.reasoning_content.clone();
        for (j, c) in m.tool_calls.iter().flatten().enumerate() {
            // Templates take the arguments as an object (transformers and vLLM hand them over that way).
            let arguments = match &c.function.arguments {
                JVal::Str(s) => serde_json::from_str::<JVal>(s).ok(),
                a => Some(a.clone()),
            }
            .filter(|a| matches!(a, JVal::Obj(_)))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "field `messages[{i}].tool_calls[{j}].function.arguments`: not a JSON object"
                ))
                .code("invalid_messages")
            })?;
            msg.tool_calls.push(ToolCall {
                id: c.id.clone(),
                name: c.function.name.clone(),
                arguments,
            });
        }
        list.push(msg);
    }
    let rendered = tpl
        .render_marked_with(&list, tools, kwargs, gen_prompt)
        .map_err(|e| ApiError::bad_request(format!("messages: {e:#}")).code("invalid_messages"))?;
    r.tokenizer
        .encode_chat(&rendered, false)
        .map_err(|e| ApiError::bad_request(format!("messages: {e:#}")))
}

/// `min_tokens` (vLLM's): at most `max_tokens`, and not in JSON mode, whose text ends when its value closes.
fn check_min_tokens(c: &api::Checked, max_tokens: usize, json: bool) -> Result<(), ApiError> {
    let bad = |msg: String| ApiError::bad_request(msg).code("invalid_field");
    if c.min_tokens > max_tokens {
        return Err(bad(format!(
            "field `min_tokens`: {} is more than max_tokens {max_tokens}",
            c.min_tokens
        )));
    }
    if c.min_tokens > 0 && json {
        return Err(bad(
            "field `min_tokens` cannot be combined with `response_format`: a JSON answer ends when its value closes"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses a prompt that, with `max_tokens` more, does not fit the context.
fn check_length(r: &Ready, i: usize, prompt: usize, max_tokens: usize) -> Result<(), ApiError> {
    if prompt == 0 {
        return Err(ApiError::bad_request(format!("prompt {i} is empty")).code("empty_prompt"));
    }
    if prompt + max_tokens > r.max_context {
        let what = if prompt > r.max_context {
            format!("the prompt alone has {prompt} tokens")
        } else {
            format!(
                "{prompt} prompt tokens + max_tokens {max_tokens} = {}",
                prompt + max_tokens
            )
        };
        return Err(ApiError::bad_request(format!(
            "{what}, over the server's context of {} tokens (--max-context); shorten the prompt or lower max_tokens",
            r.max_context
        ))
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// Queues one job per (prompt, choice) and waits until all are admitted; 429 when the queue cannot take them.
async fn submit(
    sh: &Arc<Shared>,
    prompts: &[Vec<u32>],
    n: usize,
    params: &GenParams,
) -> Result<Run, ApiError> {
    let jobs = prompts.len() * n;
    if jobs > api::MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "{} prompts × n {n} = {jobs} choices, at most {}",
            prompts.len(),
            api::MAX_CHOICES
        ))
        .code("invalid_field"));
    }
    if jobs > sh.capacity() {
        return Err(ApiError::bad_request(format!(
            "{jobs} choices in one request, and the server holds at most {} sequences (--parallel + --queue); \
             send fewer prompts or a smaller n",
            sh.capacity()
        ))
        .code("too_many_choices"));
    }
    // Reserve the places; each job's ticket gives its one back when the job ends (or is never sent).
    let before = sh.in_flight.fetch_add(jobs, Relaxed);
    if before + jobs > sh.capacity() {
        sh.in_flight.fetch_sub(jobs, Relaxed);
        return Err(ApiError::overloaded(
            format!(
                "the server is full ({before} sequences running or queued, room for {}); retry later",
                sh.capacity()
            ),
            1,
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let arrived = Instant::now();
    let mut sent = 0;
    let r = (|| -> Result<(), ApiError> {
        let queue = sh
            .jobs
            .lock()
            .map_err(|_| ApiError::internal("the job queue is poisoned"))?;
        for (p, prompt) in prompts.iter().enumerate() {
            for j in 0..n {
                let index = p * n + j;
                let mut params = params.clone();
                params.sampler.seed = params.sampler.seed.wrapping_add(index as u64);
                sent += 1;
                let job = Job {
                    index,
                    prompt: prompt.clone(),
                    params,
                    events: tx.clone(),
                    arrived,
                    ticket: Ticket(sh.clone()),
                };
                // A job that cannot be sent is dropped here, and its ticket with it.
                queue
                    .send(job)
                    .map_err(|_| ApiError::internal("the engine has stopped"))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        // Places reserved for jobs never made.
        sh.in_flight.fetch_sub(jobs - sent, Relaxed);
        return Err(e);
    }
    drop(tx);
    Run::admitted(rx, jobs).await
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Relaxed))
}

async fn completions(State(sh): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    let req: CompletionRequest = api::parse(&body)?;
    let c = api::parse::<Sampling>(&body)?.check()?;
    let json = api::parse::<api::Unsupported>(&body)?.check(false)?;
    let biased: Vec<u32> = c.sampler.logit_bias.iter().map(|&(t, _)| t).collect();
    check_ids(&r, &biased, "logit_bias")?;
    check_ids(&r, &c.stop_tokens, "stop_token_ids")?;
    let top = req
        .logprobs
        .map(|n| api::check_top("logprobs", n))
        .transpose()?;
    let max_tokens = req.max_tokens.unwrap_or(api::DEFAULT_COMPLETION_TOKENS);
    check_min_tokens(&c, max_tokens, json.is_some())?;
    let prompts = req.prompt.into_prompts();
    if prompts.is_empty() {
        return Err(ApiError::bad_request("field `prompt`: an empty list").code("empty_prompt"));
    }
    let (mut ids, mut texts, mut skips) = (Vec::new(), Vec::new(), Vec::new());
    for (i, p) in prompts.into_iter().enumerate() {
        let (t, text, skip) = match p {
            Prompt::Text(s) => {
                let t = r
                    .tokenizer
                    .encode(&s, true, true)
                    .map_err(|e| ApiError::bad_request(format!("prompt {i}: {e:#}")))?;
                // encode put a BOS in front when the model asks for one (it fails when there is no BOS id).
                (t, s, usize::from(r.tokenizer.add_bos()))
            }
            Prompt::Ids(v) => {
                check_ids(&r, &v, "prompt")?;
                let text = r.tokenizer.decode(&v);
                (v, text, 0)
            }
        };
        check_length(&r, i, t.len(), max_tokens)?;
        ids.push(t);
        texts.push(text);
        skips.push(skip);
    }
    let params = GenParams {
        max_tokens,
        sampler: c.sampler,
        stop: c.stop,
        prompt_logprobs: if req.echo { top } else { None },
        logprobs: top,
        kv: c.kv,
        ignore_eos: c.ignore_eos,
        stop_tokens: c.stop_tokens,
        min_tokens: c.min_tokens,
        json,
        lazy_json: None,
    };
    let run = submit(&sh, &ids, c.n, &params).await?;
    let meta = Meta {
        kind: Kind::Completion,
        id: request_id("cmpl"),
        created: now_secs(),
        model: req.model.unwrap_or_else(|| r.name.clone()),
        n: c.n,
        echo: req.echo.then_some(texts),
        echo_skip: skips,
        logprobs: top,
        include_usage: c.include_usage,
        ready: r,
        tools: None,
        thinking: None,
    };
    let firsts = ids.iter().map(|v| v[0]).collect();
    let jobs = ids.len() * c.n;
    if c.stream {
        Ok(respond::stream(run, meta, jobs, firsts))
    } else {
        respond::collect(run, meta, jobs, firsts).await
    }
}

async fn chat(State(sh): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&sh)?;
    let req: ChatRequest = api::parse(&body)?;
    let c = api::parse::<Sampling>(&body)?.check()?;
    let mut json = api::parse::<api::Unsupported>(&body)?.check(true)?;
    let tools = api::parse::<ToolRequest>(&body)?
        .check(r.chat_template.as_ref().map_err(|e| e.as_str()))?;
    if let Some(t) = &tools {
        if t.json.is_some() {
            if json.is_some() {
                return Err(ApiError::bad_request(
                    "field `response_format` cannot be combined with a `tool_choice` that forces a call: the \
                     answer is the call",
                )
                .code("invalid_field"));
            }
            json = t.json.clone();
        }
    }
    let biased: Vec<u32> = c.sampler.logit_bias.iter().map(|&(t, _)| t).collect();
    check_ids(&r, &biased, "logit_bias")?;
    check_ids(&r, &c.stop_tokens, "stop_token_ids")?;
    if req.messages.is_empty() {
        return Err(
            ApiError::bad_request("field `messages`: an empty list").code("invalid_messages")
        );
    }
    let top = match (req.logprobs, req.top_logprobs) {
        (true, k) => Some(api::check_top("top_logprobs", k.unwrap_or(0))?),
        (false, Some(_)) => {
            return Err(
                ApiError::bad_request("field `top_logprobs` needs `logprobs: true`")
                    .code("invalid_field"),
            )
        }
        (false, None) => None,
    };
    let defs = tools.as_ref().map_or(&[][..], |t| &t.tools[..]);
    let kwargs = template_kwargs(req.chat_template_kwargs.as_ref())?;
    let prompt = chat_tokens(&r, &req.messages, defs, &kwargs, true)?;
    // A reasoning model's thinking, given back apart: does the prompt leave the answer inside `<think>`?
    let tail = r
        .tokenizer
        .decode(&prompt[prompt.len().saturating_sub(16)..]);
    let source = r.chat_template.as_ref().ok().map(|t| t.source());
    let thinking = api::parse::<ReasoningRequest>(&body)?.check(source, &tail)?;
    // Under a JSON constraint (response_format, a forced call) the whole answer is the value: no thinking to read.
    let thinking = thinking.filter(|_| json.is_none());
    let room = r.max_context.saturating_sub(prompt.len());
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(room);
    check_length(&r, 0, prompt.len(), max_tokens)?;
    check_min_tokens(&c, max_tokens, json.is_some())?;
    // `auto` tool calls: each call the model begins is decoded under the tools' schema (not under response_format,
    // whose constraint holds the whole answer).
    let lazy_json = match (&tools, &json) {
        (Some(t), None) => t
            .lazy
            .as_ref()
            .map(|l| Arc::new(l.spec(&r.tokenizer, thinking.map(|t| t.span())))),
        _ => None,
    };
    let params = GenParams {
        max_tokens,
        sampler: c.sampler,
        stop: c.stop,
        prompt_logprobs: None,
        logprobs: top,
        kv: c.kv,
        ignore_eos: c.ignore_eos,
        stop_tokens: c.stop_tokens,
        min_tokens: c.min_tokens,
        json,
        lazy_json,
    };
    let firsts = vec![prompt[0]];
    let run = submit(&sh, std::slice::from_ref(&prompt), c.n, &params).await?;
    let meta = Meta {
        kind: Kind::Chat,
        id: request_id("chatcmpl"),
        created: now_secs(),
        model: req.model.unwrap_or_else(|| r.name.clone()),
        n: c.n,
        echo: None,
        echo_skip: Vec::new(),
        logprobs: top,
        include_usage: c.include_usage,
        ready: r,
        tools: tools.map(|t| t.reader),
        thinking,
    };
    if c.stream {
        Ok(respond::stream(run, meta, c.n, firsts))
    } else {
        respond::collect(run, meta, c.n, firsts).await
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
