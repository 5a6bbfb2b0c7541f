//! Chat templates: turns a conversation into the prompt text a model was trained on.
//!
//! The Jinja template comes from `tokenizer.chat_template` (the Hugging Face template the converter copied)
//! and is rendered with minijinja set up like transformers' `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, Python string methods (`.strip()`, `.startswith()`, `.split()`, ...) through
//! minijinja-contrib's pycompat, `raise_exception(msg)` failing the render, `strftime_now(format)` (today's date, UTC:
//! [`super::strftime`]), `tojson` as transformers defines it (Python's `json.dumps`: spaces after `,` and `:`, keys in
//! order, no HTML escapes), and the variables `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, plus
//! `tools` when a request defines functions (messages carry `tool_calls`, `tool_call_id` and `name` when they have
//! them). Models without a template get a built-in one when their vocabulary shows the format: ChatML
//! (`<|im_start|>`) or Gemma (`<start_of_turn>`).
//!
//! Like llama.cpp, `render` drops a BOS text the template put at the very start when the vocabulary adds BOS
//! itself (`add_bos_token`), and an EOS text at the very end when it adds EOS, so that encoding the result with
//! `Tokenizer::encode(text, true, true)` never doubles them.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// minijinja instructions one render may execute (a 2,000-message ChatML conversation renders within it, tested).
const RENDER_FUEL: u64 = 5_000_000;

use crate::gguf::GgufFile;
use crate::util::JVal;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant turn made (OpenAI's `tool_calls`), in order; empty for every other turn.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` turn answers (`tool_call_id`).
    pub tool_call_id: Option<String>,
    /// The tool's name on a `tool` turn (`name`), when the client gave it.
    pub name: Option<String>,
    /// A reasoning model's thinking on an assistant turn (`reasoning_content`, as the server gives it back and
    /// vLLM hands it to templates): Qwen3's template writes it back inside `<think>` for the turns of a tool loop.
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            reasoning_content: None,
        }
    }
}

/// A function call as a template sees it: `{"id", "type": "function", "function": {"name", "arguments"}}`, the
/// arguments an object (as transformers and vLLM hand them to templates), not the JSON text the API carries.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: Option<String>,
    pub name: String,
    pub arguments: JVal,
}

/// ChatML, for vocabularies with `<|im_start|>` / `<|im_end|>` but no template.
const CHATML: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// Gemma's turn format (as in the Gemma 3 instruction-tuned models' template), for vocabularies with
/// `<start_of_turn>` / `<end_of_turn>` but no template. A system message is put in front of the first user turn.
const GEMMA: &str = "{{- bos_token -}}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}\
{%- endif -%}\
{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\
{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}";

const NAME: &str = "chat_template";

/// A rendered conversation and where each message's text landed in it: the template's own text (turn markers, role
/// headers) lies outside `content`; what the messages said lies inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Byte ranges of `text` that hold message contents, ascending, not overlapping.
    pub content: Vec<Range<usize>>,
}

/// A compiled chat template plus the special-token texts it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Which built-in template is used, if the model has none of its own.
    builtin: Option<&'static str>,
    bos_token: String,
    eos_token: String,
    strip_bos: bool,
    strip_eos: bool,
    /// The template reads a `tools` variable (found once, when it is compiled).
    reads_tools: bool,
}

/// The error for a template whose rendering of message texts cannot be told apart from its own text.
fn unfollowable(what: &str) -> anyhow::Error {
    anyhow!(
        "the chat template {what}, so hayloft cannot tell its own control tokens from the messages' text; pass \
         --parse-special to tokenize the whole rendered prompt with special tokens parsed everywhere"
    )
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// The model's `tokenizer.chat_template`; if absent, ChatML when the vocabulary has `<|im_start|>`, Gemma's
    /// format when it has `<start_of_turn>`; otherwise an error saying the model has no chat template.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .unwrap_or(&[]);
        let text_of = |key: &str| -> String {
            g.opt_u64(key)
                .and_then(|id| tokens.get(id as usize))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let has_token = |t: &str| tokens.iter().any(|v| v.as_str() == Some(t));
        let (source, builtin) = match g.opt_str("tokenizer.chat_template") {
            Some(s) => (s.to_string(), None),
            None if has_token("<|im_start|>") && has_token("<|im_end|>") => (CHATML.to_string(), Some("chatml")),
            None if has_token("<start_of_turn>") && has_token("<end_of_turn>") => (GEMMA.to_string(), Some("gemma")),
            None => bail!(
                "{}: the model has no chat template (tokenizer.chat_template is missing and its vocabulary has no \
                 ChatML or Gemma turn tokens); give the prompt as plain text instead",
                g.path.display()
            ),
        };
        let is_spm = g.opt_str("tokenizer.ggml.model") == Some("llama");
        let pre = g.opt_str("tokenizer.ggml.pre").unwrap_or("");
        // llama.cpp's default when the key is absent (SentencePiece and llama3-style BPE add BOS).
        let default_add_bos = is_spm
            || matches!(
                pre,
                "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral"
            );
        let strip_bos = g
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(default_add_bos);
        let strip_eos = g.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
        Self::new(
            source,
            builtin,
            text_of("tokenizer.ggml.bos_token_id"),
            text_of("tokenizer.ggml.eos_token_id"),
            strip_bos,
            strip_eos,
        )
    }

    /// A template from its source. `strip_bos` / `strip_eos`: the tokenizer adds BOS / EOS itself, so a leading
    /// `bos_token` / trailing `eos_token` in the output is dropped.
    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        strip_bos: bool,
        strip_eos: bool,
    ) -> Result<Self> {
        Self::new(
            source.to_string(),
            None,
            bos_token.to_string(),
            eos_token.to_string(),
            strip_bos,
            strip_eos,
        )
    }

    fn new(
        source: String,
        builtin: Option<&'static str>,
        bos_token: String,
        eos_token: String,
        strip_bos: bool,
        strip_eos: bool,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("chat template syntax settings: {e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template comes from the model file: bound the work one render may do, so a hostile one (nested loops
        // over large ranges) is an error, not a hang. Real templates over long conversations use far less.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_function("strftime_now", super::strftime::strftime_now);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| anyhow!("cannot compile the chat template: {e}"))?;
        let reads_tools = env
            .get_template(NAME)
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"));
        Ok(ChatTemplate {
            env,
            source,
            builtin,
            bos_token,
            eos_token,
            strip_bos,
            strip_eos,
            reads_tools,
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// "chatml" or "gemma" when the model had no template of its own.
    pub fn builtin(&self) -> Option<&'static str> {
        self.builtin
    }

    /// Renders the conversation like [`Self::render`] and finds where each message's content landed, so that the
    /// tokenizer can read special-token texts inside messages as plain text (`Tokenizer::encode_chat`).
    ///
    /// The conversation is rendered twice: as is, and with every content replaced by a unique marker. The marker
    /// render splits into the template's own text and the places contents go; the real render must then read as
    /// those template pieces with each content in between, as given or trimmed (templates `| trim` contents). A
    /// template that changes contents otherwise (upper-cases them, branches on their text) is an error that names
    /// `--parse-special`, rather than a guess.
    pub fn render_marked(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        self.render_marked_tools(messages, &[], add_generation_prompt)
    }

    /// [`Self::render_marked`] with function definitions (`tools`, OpenAI's `{"type": "function", "function":
    /// {...}}` objects) for templates that render them: their text is the template's own.
    pub fn render_marked_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[JVal],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        self.render_marked_with(messages, tools, &[], add_generation_prompt)
    }

    /// [`Self::render_marked_tools`] with more variables for the template (`chat_template_kwargs`, e.g. Qwen3's
    /// `enable_thinking`); see [`Self::render_with`].
    pub fn render_marked_with(
        &self,
        messages: &[ChatMessage],
        tools: &[JVal],
        kwargs: &[(String, JVal)],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let text = self.render_with(messages, tools, kwargs, add_generation_prompt)?;
        // A marker prefix that no message contains: "\u{E000}<nonce>#".
        let mut nonce = 0u32;
        let prefix = loop {
            let p = format!("\u{E000}{nonce}#");
            if !messages.iter().any(|m| m.content.contains(&p)) {
                break p;
            }
            nonce += 1;
        };
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                // An empty content has no text to find, and templates test it (`{% if message.content %}` before
                // the calls of an assistant turn): it stays empty.
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}{i}\u{E001}")
                },
                ..m.clone()
            })
            .collect();
        let marked = self.render_with(&masked, tools, kwargs, add_generation_prompt)?;
        // Template pieces and, between them, the index of the message whose content goes there.
        let mut pieces: Vec<&str> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        let mut rest = marked.as_str();
        while let Some(at) = rest.find(&prefix) {
            pieces.push(&rest[..at]);
            let after = &rest[at + prefix.len()..];
            let end = after
                .find('\u{E001}')
                .ok_or_else(|| unfollowable("cut a message marker"))?;
            let i: usize = after[..end]
                .parse()
                .map_err(|_| unfollowable("changed a message marker"))?;
            if i >= messages.len() {
                return Err(unfollowable("changed a message marker"));
            }
            slots.push(i);
            rest = &after[end + '\u{E001}'.len_utf8()..];
        }
        pieces.push(rest);
        // Walk the real render: template piece, content, template piece, ...
        let mut pos = 0;
        let mut content = Vec::with_capacity(slots.len());
        if !text.starts_with(pieces[0]) {
            return Err(unfollowable(
                "renders its own text differently around different messages",
            ));
        }
        pos += pieces[0].len();
        for (k, &i) in slots.iter().enumerate() {
            let c = messages[i].content.as_str();
            let next = pieces[k + 1];
            let found = [c, c.trim(), c.trim_start(), c.trim_end()]
                .into_iter()
                .find(|x| text[pos..].starts_with(x) && text[pos + x.len()..].starts_with(next));
            let Some(x) = found else {
                return Err(unfollowable(
                    "changes message text other than by trimming it",
                ));
            };
            if !x.is_empty() {
                content.push(pos..pos + x.len());
            }
            pos += x.len() + next.len();
        }
        if pos != text.len() {
            return Err(unfollowable(
                "renders its own text differently around different messages",
            ));
        }
        Ok(Rendered { text, content })
    }

    /// Renders the conversation; `add_generation_prompt` appends the header of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_tools(messages, &[], add_generation_prompt)
    }

    /// Whether the template renders function definitions: it reads a `tools` variable. Templates that do not would
    /// drop a request's tools without a word.
    pub fn renders_tools(&self) -> bool {
        self.reads_tools
    }

    /// [`Self::render`] with function definitions: `tools` is set (a list, in the order given) when there are any,
    /// and left undefined otherwise, as templates test it both ways.
    pub fn render_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[JVal],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_with(messages, tools, &[], add_generation_prompt)
    }

    /// The variables a template gets from hayloft itself: `kwargs` may not set them.
    pub const RESERVED: [&'static str; 5] = [
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
    ];

    /// [`Self::render_tools`] with more variables for the template (vLLM's and llama-server's
    /// `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); one named like a variable hayloft sets
    /// ([`Self::RESERVED`]) is an error.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: &[JVal],
        kwargs: &[(String, JVal)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<Value> = messages.iter().map(message_value).collect();
        let mut ctx = BTreeMap::new();
        for (k, v) in kwargs {
            if Self::RESERVED.contains(&k.as_str()) {
                return Err(anyhow!(
                    "chat_template_kwargs: '{k}' is set by the server and cannot be passed"
                ));
            }
            ctx.insert(k.as_str(), json_value(v));
        }
        ctx.insert("messages", Value::from(msgs));
        if !tools.is_empty() {
            ctx.insert(
                "tools",
                Value::from(tools.iter().map(json_value).collect::<Vec<_>>()),
            );
        }
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("bos_token", Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token", Value::from(self.eos_token.as_str()));
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| anyhow!("chat template: {e}"))?;
        let mut out = tmpl.render(Value::from(ctx)).map_err(|e| {
            if e.kind() == ErrorKind::OutOfFuel {
                anyhow!(
                    "the chat template (tokenizer.chat_template{}) ran out of fuel: it did more than {RENDER_FUEL} \
                     steps of work for one conversation, far more than any real template needs; the model file's \
                     template is broken or hostile",
                    self.builtin.map_or(String::new(), |b| format!(", built-in {b}"))
                )
            } else {
                anyhow!("cannot render the chat template: {e}")
            }
        })?;
        if self.strip_bos && !self.bos_token.is_empty() && out.starts_with(&self.bos_token) {
            out.drain(..self.bos_token.len());
        }
        if self.strip_eos && !self.eos_token.is_empty() && out.ends_with(&self.eos_token) {
            out.truncate(out.len() - self.eos_token.len());
        }
        Ok(out)
    }
}

/// A message as templates read it: `role` and `content`, and `tool_calls`, `tool_call_id` and `name` when it has
/// them (absent otherwise, so `message.tool_calls is defined` tells an assistant turn that called tools).
fn message_value(m: &ChatMessage) -> Value {
    let mut kv = vec![
        ("role".to_string(), Value::from(m.role.as_str())),
        ("content".to_string(), Value::from(m.content.as_str())),
    ];
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = Vec::new();
                if let Some(id) = &c.id {
                    call.push(("id".to_string(), Value::from(id.as_str())));
                }
                call.push(("type".to_string(), Value::from("function")));
                let function = vec![
                    ("name".to_string(), Value::from(c.name.as_str())),
                    ("arguments".to_string(), json_value(&c.arguments)),
                ];
                call.push((
                    "function".to_string(),
                    Value::from_object(JsonMap(function)),
                ));
                Value::from_object(JsonMap(call))
            })
            .collect();
        kv.push(("tool_calls".to_string(), Value::from(calls)));
    }
    if let Some(id) = &m.tool_call_id {
        kv.push(("tool_call_id".to_string(), Value::from(id.as_str())));
    }
    if let Some(name) = &m.name {
        kv.push(("name".to_string(), Value::from(name.as_str())));
    }
    if let Some(r) = &m.reasoning_content {
        kv.push(("reasoning_content".to_string(), Value::from(r.as_str())));
    }
    Value::from_object(JsonMap(kv))
}

/// A JSON value for a template, objects with their keys in the order given (a tool's `type` before its
/// `function`, its parameters' properties as the client listed them).
fn json_value(v: &JVal) -> Value {
    match v {
        JVal::Null => Value::from(()),
        JVal::Bool(b) => Value::from(*b),
        JVal::Num(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        JVal::Str(s) => Value::from(s.as_str()),
        JVal::Arr(a) => Value::from(a.iter().map(json_value).collect::<Vec<_>>()),
        JVal::Obj(kv) => Value::from_object(JsonMap(
            kv.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        )),
    }
}

/// A map that keeps its keys in insertion order (minijinja's own maps sort them).
#[derive(Debug)]
struct JsonMap(Vec<(String, Value)>);

impl Object for JsonMap {
    fn repr(self: &std::sync::Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &Value) -> Option<Value> {
        let k = key.as_str()?;
        self.0
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect(),
        )
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)`, so `{"a": 1, "b": [2, 3]}` with its spaces and
/// without HTML escapes (minijinja's own filter writes `'` and `<` as `\u0027` and `\u003c`).
fn tojson(v: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) => match i.as_i64() {
            Some(n) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            None => Some(i.as_str().unwrap_or("  ").to_string()),
        },
    };
    let ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let seps: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match seps.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let style = JsonStyle {
        indent: indent.as_deref(),
        item: &item,
        key: &key,
        ascii,
        sort,
    };
    write_json(v, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle<'a> {
    indent: Option<&'a str>,
    item: &'a str,
    key: &'a str,
    ascii: bool,
    sort: bool,
}

/// Deepest nesting `tojson` writes (a template cannot build a cycle, but a deep value should stay an error).
const JSON_DEPTH: usize = 128;

fn write_json(
    v: &Value,
    st: &JsonStyle,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    if level > JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deep",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = st.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) if v.is_integer() => out.push_str(&i.to_string()),
            _ => match f64::try_from(v.clone()) {
                Ok(f) => out.push_str(&python_float(f)),
                Err(_) => out.push_str(&v.to_string()),
            },
        },
        ValueKind::String | ValueKind::Plain => json_string(&v.to_string(), st.ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if st.sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(st.item);
                }
                newline(out, level + 1);
                json_string(&k.to_string(), st.ascii, out);
                out.push_str(st.key);
                write_json(&v.get_item(k)?, st, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(st.item);
                }
                newline(out, level + 1);
                write_json(x, st, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
    }
    Ok(())
}

/// A string as Python's json module writes it.
fn json_string(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: `1.0`, `0.5`, `1e-05`, `1e+16`, `NaN`, `Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust writes the shortest digits as "1.5e-7"; Python as "1.5e-07".
        let s = format!("{f:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match e.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', e),
        };
        return format!("{m}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}
