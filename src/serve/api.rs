//! The JSON requests the OpenAI-style endpoints take, parsed once into what the engine runs ([`GenParams`]).
//!
//! Unknown fields are ignored (clients send many we have no use for); fields we know but cannot honour with the
//! value given (`frequency_penalty` outside −2..2, `n` over the limit) are a 400 naming them.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use crate::engine::json::JsonFormat;
use crate::engine::json_lazy::LazyJson;
use crate::engine::json_schema::{JVal, Schema};
use crate::engine::SamplerConfig;
use crate::methods::KvSpec;

/// Most choices one request may ask for (`n`, times the prompts of a batch).
pub const MAX_CHOICES: usize = 64;
/// Most alternatives per position in `logprobs` / `top_logprobs` (OpenAI's limit for completions is 5, chat 20).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings.
pub const MAX_STOPS: usize = 16;
/// `max_tokens` of a completion request that names none (OpenAI's legacy default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// Parses a JSON body; a syntax error and a wrong-typed field are 400s that say which (the field by its path).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("malformed JSON body: {inner}")).code("invalid_json")
        } else if path == "." {
            ApiError::bad_request(format!("request body: {inner}")).code("invalid_field")
        } else if path == "prompt" || path.starts_with("prompt[") {
            ApiError::bad_request(format!(
                "field `{path}`: give a string, a list of token ids, a list of strings, or a list of token-id \
                 lists ({inner})"
            ))
            .code("invalid_field")
        } else {
            ApiError::bad_request(format!("field `{path}`: {inner}")).code("invalid_field")
        }
    })
}

/// `prompt` of `/v1/completions`: text, token ids, or a batch of either.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt of a request, before tokenization.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptInput {
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            PromptInput::Text(s) => vec![Prompt::Text(s)],
            PromptInput::Ids(v) => vec![Prompt::Ids(v)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::IdLists(v) => v.into_iter().map(Prompt::Ids).collect(),
        }
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and streaming fields both endpoints share, parsed from the same body on their own (not flattened into
/// the request, so an error names the field).
#[derive(Deserialize, Debug, Default)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// ≤ 0 = off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// OpenAI's `logit_bias`: token id (as a string key) → bias added to its logit, −100 to 100 (−100 bans it).
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The KV-cache method for this request (`"snapkv@0.25"`), parsed like `--kv`.
    pub kv: Option<String>,
    /// Keep generating past end-of-generation tokens (llama-server's and vLLM's field; for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's `stop_token_ids`: generation also ends, with finish_reason "stop", at any of these tokens.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's `min_tokens`: until this many tokens are generated, end-of-generation tokens and `stop_token_ids` are
    /// never drawn and stop strings are not matched.
    pub min_tokens: Option<usize>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    /// Alternatives per position (0 = only the chosen token's log-probability).
    pub logprobs: Option<usize>,
}

/// A chat message's content: text, or a list of parts of which the text ones are joined.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct MessageIn {
    pub role: String,
    /// Null or absent = empty (an assistant turn that only called tools).
    #[serde(default)]
    pub content: Option<Content>,
    /// The calls an assistant turn made.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// The call a `tool` turn answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// A reasoning model's thinking on an assistant turn, as the server gave it back.
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

/// A call in an assistant turn: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Deserialize, Debug)]
pub struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Deserialize, Debug)]
pub struct FunctionCallIn {
    pub name: String,
    /// JSON text, as OpenAI sends it (an object is taken too).
    pub arguments: JVal,
}

impl MessageIn {
    /// The message's text; a non-text part is an error naming it.
    pub fn text(&self, i: usize) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}].content[{j}]: only text parts are supported (got type '{}')",
                                p.kind
                            ))
                            .code("invalid_field"))
                        }
                    }
                }
                Ok(s)
            }
        }
    }
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<MessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    /// More variables for the chat template (vLLM's and llama-server's field).
    pub chat_template_kwargs: Option<JVal>,
}

/// `response_format`, and the fields that ask for behaviour hayloft does not have, parsed from the same body on their
/// own: a request that uses one is refused with a 400 naming it rather than answered as if the field were absent
/// (llama-server refuses `tools` without `--jinja` the same way). Their neutral values (an empty tool list, `"none"`,
/// `best_of` 1, an empty suffix) pass; `response_format` may be `{"type": "text"}`, `{"type": "json_object"}` or a
/// `json_schema` that [`Schema::compile`] takes.
#[derive(Deserialize, Debug, Default)]
pub struct Unsupported {
    /// Parsed with its keys in order: a schema's property order is the order they are generated in.
    pub response_format: Option<JVal>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<Vec<serde_json::Value>>,
    pub suffix: Option<String>,
    pub best_of: Option<usize>,
}

impl Unsupported {
    /// The JSON mode the request asks for (if any), or the 400 for what it asks that hayloft does not do. `chat`:
    /// the chat endpoint, which reads `tools` itself ([`super::tools`]).
    pub fn check(&self, chat: bool) -> Result<Option<JsonFormat>, ApiError> {
        let refuse = |field: &str, msg: &str| {
            Err(ApiError::bad_request(format!("field `{field}`: {msg}")).code("unsupported_field"))
        };
        let mut json = None;
        if let Some(f) = &self.response_format {
            match f.get("type").and_then(|t| t.as_str()) {
                Some("text") => {}
                Some("json_object") => json = Some(JsonFormat::Object),
                Some("json_schema") => {
                    let schema = f
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .ok_or_else(|| {
                            ApiError::bad_request(
                                "field `response_format.json_schema.schema`: missing",
                            )
                            .code("invalid_field")
                        })?;
                    let s = Schema::compile(schema).map_err(|e| {
                        ApiError::bad_request(format!(
                            "field `response_format.json_schema.schema`: {e}"
                        ))
                        .code("unsupported_schema")
                    })?;
                    json = Some(JsonFormat::Schema(Arc::new(s)));
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "field `response_format`: expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}",
                    )
                    .code("invalid_field"))
                }
            }
        }
        let tool_choice_none = self.tool_choice.as_ref().and_then(|c| c.as_str()) == Some("none");
        if !chat && self.tools.as_ref().is_some_and(|t| !t.is_empty()) && !tool_choice_none {
            return refuse(
                "tools",
                "tools are read on /v1/chat/completions, where the chat template writes them into the prompt",
            );
        }
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) {
            return refuse("functions", "function calling is not supported");
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix", "fill-in-the-middle completion is not supported");
        }
        if self.best_of.is_some_and(|b| b > 1) {
            return refuse("best_of", "only 1 is supported; use n for several choices");
        }
        Ok(json)
    }
}

/// What the engine runs for one choice, besides the prompt.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Tokens to generate at most (0: only the prompt).
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends, with finish_reason "stop", at the first of these; the text stops before it.
    pub stop: Vec<String>,
    /// Log-probabilities of the prompt's tokens with this many alternatives each (echo with logprobs).
    pub prompt_logprobs: Option<usize>,
    /// Log-probabilities of the generated tokens with this many alternatives each.
    pub logprobs: Option<usize>,
    /// The KV method, None = the server's `--kv`.
    pub kv: Option<KvSpec>,
    /// End-of-generation tokens do not end the sequence.
    pub ignore_eos: bool,
    /// Tokens that end the sequence besides end-of-generation ones (`stop_token_ids`).
    pub stop_tokens: Vec<u32>,
    /// Until this many tokens are generated, the sequence cannot end but by its length (`min_tokens`).
    pub min_tokens: usize,
    /// JSON mode (`response_format` `json_object` or `json_schema`): the text is kept the beginning of a JSON object
    /// (or of a value the schema accepts) and ends with it.
    pub json: Option<JsonFormat>,
    /// Tool calls under `tool_choice: "auto"`: the text is free, each call the model begins is decoded under the
    /// tools' schema.
    pub lazy_json: Option<Arc<LazyJson>>,
}

/// The parts of [`Sampling`] the engine reads, checked: a sampler config (seeded), the stop strings, the KV spec,
/// the number of choices.
pub struct Checked {
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub kv: Option<KvSpec>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    pub stop_tokens: Vec<u32>,
    pub min_tokens: usize,
}

impl Sampling {
    pub fn check(&self) -> Result<Checked, ApiError> {
        let bad = |field: &str, msg: String| {
            ApiError::bad_request(format!("field `{field}`: {msg}")).code("invalid_field")
        };
        let mut logit_bias = Vec::new();
        for (key, &b) in self.logit_bias.iter().flatten() {
            let Ok(t) = key.parse::<u32>() else {
                return Err(bad("logit_bias", format!("key '{key}' is not a token id")));
            };
            if !(-100.0..=100.0).contains(&b) {
                return Err(bad(
                    "logit_bias",
                    format!("token {t}: bias {b}, give -100 to 100"),
                ));
            }
            // OpenAI's −100 bans the token outright.
            logit_bias.push((t, if b == -100.0 { f32::NEG_INFINITY } else { b }));
        }
        let d = SamplerConfig::default();
        let sampler = SamplerConfig {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.map_or(d.top_k, |k| k.max(0) as usize),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            logit_bias,
            seed: self.seed.unwrap_or_else(random_seed),
        };
        sampler
            .validate()
            .map_err(|e| bad("sampling", flags_as_fields(&format!("{e:#}"))))?;
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
        if stop.len() > MAX_STOPS {
            return Err(bad(
                "stop",
                format!("{} strings, at most {MAX_STOPS}", stop.len()),
            ));
        }
        let kv = match &self.kv {
            None => None,
            Some(s) => Some(s.parse::<KvSpec>().map_err(|e| {
                ApiError::bad_request(format!("field `kv`: '{s}': {e:#}")).code("invalid_kv")
            })?),
        };
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES {
            return Err(bad("n", format!("{n}: give 1 to {MAX_CHOICES}")));
        }
        Ok(Checked {
            sampler,
            stop,
            kv,
            n,
            stream: self.stream,
            ignore_eos: self.ignore_eos,
            stop_tokens: self.stop_token_ids.clone().unwrap_or_default(),
            min_tokens: self.min_tokens.unwrap_or(0),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// A command-line message as the API's: each `--flag-name` becomes `flag_name`; nothing else changes (a negative
/// number keeps its sign).
fn flags_as_fields(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find("--") {
        out.push_str(&rest[..at]);
        let name = &rest[at + 2..];
        let end = name
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(name.len());
        out.push_str(&name[..end].replace('-', "_"));
        rest = &name[end..];
    }
    out.push_str(rest);
    out
}

/// Checks a count of alternatives per position.
pub fn check_top(field: &str, n: usize) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_request(format!(
            "field `{field}`: {n} alternatives, at most {MAX_TOP_LOGPROBS}"
        ))
        .code("invalid_field"));
    }
    Ok(n)
}

/// A seed for a request that names none: different per request.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `POST /tokenize`: lm-eval's `{"prompt", "add_special_tokens"}`, llama-server's `{"content", "add_special"}`, or
/// vLLM's `{"messages"}` (rendered with the chat template).
#[derive(Deserialize, Debug)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub content: Option<String>,
    pub messages: Option<Vec<MessageIn>>,
    pub add_special_tokens: Option<bool>,
    pub add_special: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// Function definitions rendered with `messages` (as vLLM's `/tokenize` takes them): the count a chat request
    /// with the same tools has.
    pub tools: Option<Vec<JVal>>,
    /// More variables for the chat template, as a chat request gives them.
    pub chat_template_kwargs: Option<JVal>,
}

#[derive(Deserialize, Debug)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}
