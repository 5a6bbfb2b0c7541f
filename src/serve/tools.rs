//! Function calling on `/v1/chat/completions` (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).
//!
//! The definitions go to the model's chat template, which writes them into the prompt in the format the model was
//! trained on; the answer is then read back for calls in that format. hayloft reads one format, Hermes-style
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Qwen3, Hermes 2 Pro and 3: vLLM's
//! `hermes` parser), and refuses tools for a template that does not render them or writes calls another way, rather
//! than answer as if there were none.
//!
//! `tool_choice`:
//! - `"auto"` (the default with tools): the model answers text, calls, or both; the text before the first call is the
//!   message's `content`, and `finish_reason` is `"tool_calls"` when it called. A block that is not a valid call
//!   leaves the whole answer as text (as vLLM does).
//! - `"required"` and `{"type": "function", "function": {"name": ...}}`: decoding is constrained (the JSON-schema
//!   mode of `response_format`) to one call object, `{"name": ..., "arguments": {...}}`, the name one of the tools
//!   (or the named one) and the arguments what its `parameters` schema accepts when hayloft's schema subset takes
//!   it, any JSON object otherwise. One call, where OpenAI's `required` may make several. A named call finishes with
//!   `"stop"`, as OpenAI's does.
//! - `"none"`: the definitions are left out of the prompt and the answer is text.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::engine::json::JsonFormat;
use crate::engine::json_schema::{JVal, Schema};
use crate::tokenizer::chat::ChatTemplate;

/// The request's function-calling fields, parsed from its body on their own.
#[derive(Deserialize, Debug, Default)]
pub struct ToolRequest {
    pub tools: Option<Vec<JVal>>,
    pub tool_choice: Option<JVal>,
    pub parallel_tool_calls: Option<bool>,
}

/// How the answer is read for calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Text with Hermes `<tool_call>` blocks.
    Hermes,
    /// The whole answer is one call object (decoding constrained to it); `named`: the request named the function.
    Forced { named: bool },
}

/// What a request's tools make of its prompt, its decoding and its answer.
pub struct ToolPlan {
    /// Definitions for the template.
    pub tools: Vec<JVal>,
    pub reader: Reader,
    /// The constraint for `Forced`.
    pub json: Option<JsonFormat>,
}

/// How an answer is read for calls.
#[derive(Clone, Debug)]
pub struct Reader {
    pub mode: Mode,
    /// Every call of the answer, or only the first (`parallel_tool_calls: false`).
    pub parallel: bool,
    /// The functions defined: an answer that is a bare call object counts as a call only to one of them.
    names: Vec<String>,
}

/// The block markers of the Hermes format.
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

fn bad(msg: String) -> ApiError {
    ApiError::bad_request(msg).code("invalid_field")
}

/// A function name as OpenAI accepts it: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolRequest {
    /// The plan for this request, None when it calls no tools; a 400 naming the field for a malformed definition or
    /// choice, and for tools the model's template cannot take.
    pub fn check(
        self,
        template: Result<&ChatTemplate, &str>,
    ) -> Result<Option<ToolPlan>, ApiError> {
        let tools = self.tools.unwrap_or_default();
        let mut names = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(JVal::as_str) != Some("function") {
                return Err(bad(format!(
                    "field `tools[{i}].type`: expected \"function\" (the only kind of tool)"
                )));
            }
            let f = t.get("function").filter(|f| matches!(f, JVal::Obj(_)));
            let Some(f) = f else {
                return Err(bad(format!(
                    "field `tools[{i}].function`: missing or not an object"
                )));
            };
            let name = f.get("name").and_then(JVal::as_str).unwrap_or("");
            if !valid_name(name) {
                return Err(bad(format!(
                    "field `tools[{i}].function.name`: '{name}' is not 1 to 64 letters, digits, '_' or '-'"
                )));
            }
            if names.contains(&name) {
                return Err(bad(format!(
                    "field `tools[{i}].function.name`: '{name}' is defined twice"
                )));
            }
            if f.get("parameters")
                .is_some_and(|p| !matches!(p, JVal::Obj(_)))
            {
                return Err(bad(format!(
                    "field `tools[{i}].function.parameters`: a JSON schema object"
                )));
            }
            names.push(name);
        }
        // tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}.
        let named = match &self.tool_choice {
            None => None,
            Some(JVal::Str(s)) if s == "none" => return Ok(None),
            Some(JVal::Str(s)) if s == "auto" || s == "required" => None,
            Some(c @ JVal::Obj(_)) => {
                let kind = c.get("type").and_then(JVal::as_str);
                let name = c.get("function").and_then(|f| f.get("name"));
                match (kind, name.and_then(JVal::as_str)) {
                    (Some("function"), Some(n)) => Some(n.to_string()),
                    _ => {
                        return Err(bad("field `tool_choice`: expected {\"type\": \"function\", \"function\": \
                                        {\"name\": ...}}"
                            .into()))
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    "field `tool_choice`: expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \
                     \"function\": {\"name\": ...}}"
                        .into(),
                ))
            }
        };
        let required = matches!(&self.tool_choice, Some(JVal::Str(s)) if s == "required");
        if tools.is_empty() {
            if required || named.is_some() {
                return Err(bad(
                    "field `tool_choice`: names a tool call, but `tools` is empty".into(),
                ));
            }
            return Ok(None);
        }
        if let Some(n) = &named {
            if !names.contains(&n.as_str()) {
                return Err(bad(format!(
                    "field `tool_choice`: function '{n}' is not among `tools` ({})",
                    names.join(", ")
                )));
            }
        }
        let unsupported = |msg: String| ApiError::bad_request(msg).code("tools_unsupported");
        let tpl = template.map_err(|e| {
            unsupported(format!(
                "field `tools`: this model has no chat template: {e}"
            ))
        })?;
        if !tpl.renders_tools() {
            return Err(unsupported(
                "field `tools`: this model's chat template does not render tool definitions (it never reads \
                 `tools`), so the model would not see them"
                    .into(),
            ));
        }
        if !tpl.source().contains(OPEN) {
            return Err(unsupported(
                "field `tools`: this model's chat template writes tool calls in a format hayloft does not read \
                 (it reads Hermes-style <tool_call> blocks: Qwen2.5, Qwen3, Hermes)"
                    .into(),
            ));
        }
        let (mode, json) = if required || named.is_some() {
            let chosen: Vec<&JVal> = tools
                .iter()
                .filter(|t| named.is_none() || fn_name(t) == named.as_deref())
                .collect();
            (
                Mode::Forced {
                    named: named.is_some(),
                },
                Some(call_schema(&chosen)),
            )
        } else {
            (Mode::Hermes, None)
        };
        let names = names.iter().map(|n| n.to_string()).collect();
        Ok(Some(ToolPlan {
            tools,
            reader: Reader {
                mode,
                parallel: self.parallel_tool_calls.unwrap_or(true),
                names,
            },
            json,
        }))
    }
}

fn fn_name(t: &JVal) -> Option<&str> {
    t.get("function")?.get("name")?.as_str()
}

/// The constraint of a forced call: `{"name": one of the chosen, "arguments": {...}}`, the arguments the one
/// function's `parameters` when the schema subset takes them, any object otherwise (several functions, or a
/// schema with keywords the subset refuses).
fn call_schema(chosen: &[&JVal]) -> JsonFormat {
    let obj = |kv: Vec<(&str, JVal)>| {
        JVal::Obj(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let any_object = obj(vec![("type", JVal::Str("object".into()))]);
    let names = chosen
        .iter()
        .filter_map(|t| fn_name(t))
        .map(|n| JVal::Str(n.into()))
        .collect();
    let args = match chosen {
        [one] => one
            .get("function")
            .and_then(|f| f.get("parameters"))
            .filter(|p| Schema::compile(p).is_ok())
            .cloned()
            .unwrap_or_else(|| any_object.clone()),
        _ => any_object,
    };
    let schema = obj(vec![
        ("type", JVal::Str("object".into())),
        (
            "properties",
            obj(vec![
                ("name", obj(vec![("enum", JVal::Arr(names))])),
                ("arguments", args.clone()),
            ]),
        ),
        (
            "required",
            JVal::Arr(vec![
                JVal::Str("name".into()),
                JVal::Str("arguments".into()),
            ]),
        ),
    ]);
    match Schema::compile(&schema) {
        Ok(s) => JsonFormat::Schema(Arc::new(s)),
        // Unreachable for the arguments chosen above (they compiled alone); any object keeps the call's shape.
        Err(_) => JsonFormat::Object,
    }
}

/// A call read from the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `arguments` is a string).
    pub arguments: String,
}

/// One call object, `{"name": ..., "arguments": {...}}` (arguments also as JSON text, which some models write).
fn read_call(text: &str) -> Option<Call> {
    read_call_value(&serde_json::from_str(text.trim()).ok()?)
}

fn read_call_value(v: &JVal) -> Option<Call> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => JVal::Obj(Vec::new()),
        Some(JVal::Str(s)) => serde_json::from_str::<JVal>(s).ok()?,
        Some(a) => a.clone(),
    };
    if !matches!(args, JVal::Obj(_)) {
        return None;
    }
    let mut out = Vec::new();
    args.write(&mut out);
    Some(Call {
        name,
        arguments: String::from_utf8(out).ok()?,
    })
}

/// An answer split into its text and its calls.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// The text before the first call (all of it when there is none); None when empty or only whitespace.
    pub content: Option<String>,
    /// Where that text ends in the answer (bytes).
    pub head: usize,
    pub calls: Vec<Call>,
}

/// The opening of a fenced JSON block, which some models put a bare call in.
const FENCE: &str = "```json";

impl Reader {
    /// Reads an answer. Hermes: the text before the first `<tool_call>`, then every block (the last may lack its
    /// `</tool_call>` when generation stopped right after it); any block that is not a call leaves the answer as text.
    /// An answer without blocks that is bare call objects (one or several in a row, or in a ```json fence), each to a
    /// defined function, is those calls: Qwen2.5-Coder answers so, and llama.cpp's Hermes reader takes it too. Forced: the answer is the
    /// call. Only the first call is kept when `parallel_tool_calls` was false.
    pub fn parse(&self, text: &str) -> Parsed {
        let mut p = self.parse_all(text);
        if !self.parallel {
            p.calls.truncate(1);
        }
        p
    }

    fn parse_all(&self, text: &str) -> Parsed {
        let as_text = || Parsed {
            content: Some(text.to_string()).filter(|t| !t.trim().is_empty()),
            head: text.len(),
            calls: Vec::new(),
        };
        match self.mode {
            Mode::Forced { .. } => match read_call(text) {
                Some(c) => Parsed {
                    content: None,
                    head: 0,
                    calls: vec![c],
                },
                None => as_text(),
            },
            Mode::Hermes => {
                let Some(first) = text.find(OPEN) else {
                    let t = text.trim();
                    let t = t
                        .strip_prefix(FENCE)
                        .and_then(|f| f.strip_suffix("```"))
                        .unwrap_or(t);
                    // One object or several in a row (parallel calls), every one a call to a defined function.
                    let mut calls = Vec::new();
                    for v in serde_json::Deserializer::from_str(t).into_iter::<JVal>() {
                        let c = v.ok().and_then(|v| read_call_value(&v));
                        match c {
                            Some(c) if self.names.contains(&c.name) => calls.push(c),
                            _ => return as_text(),
                        }
                    }
                    if calls.is_empty() {
                        return as_text();
                    }
                    return Parsed {
                        content: None,
                        head: 0,
                        calls,
                    };
                };
                let mut calls = Vec::new();
                let mut rest = &text[first..];
                while let Some(body) = rest.strip_prefix(OPEN) {
                    let (inner, after) = match body.find(CLOSE) {
                        Some(e) => (&body[..e], &body[e + CLOSE.len()..]),
                        None => (body, ""),
                    };
                    let Some(c) = read_call(inner) else {
                        return as_text();
                    };
                    calls.push(c);
                    rest = after.trim_start();
                }
                if !rest.is_empty() {
                    return as_text(); // text after the calls: not a reading we can be sure of
                }
                let head = &text[..first];
                Parsed {
                    content: Some(head.to_string()).filter(|t| !t.trim().is_empty()),
                    head: first,
                    calls,
                }
            }
        }
    }

    /// How much of `pending` (answer text not yet sent; `at_start`: none was) may go out as content now: up to the
    /// first `<tool_call>`, short of a tail that could be its beginning, and nothing while the answer could still be a
    /// bare call object (it starts with `{` or a ```json fence). Forced answers send nothing before the end.
    pub fn releasable(&self, pending: &str, at_start: bool) -> usize {
        match self.mode {
            Mode::Forced { .. } => 0,
            Mode::Hermes => {
                let t = pending.trim_start();
                if at_start && (t.starts_with('{') || t.starts_with(FENCE) || FENCE.starts_with(t))
                {
                    return 0;
                }
                if let Some(at) = pending.find(OPEN) {
                    return at;
                }
                let mut keep = pending.len();
                for k in (1..OPEN.len()).rev() {
                    if pending.len() >= k
                        && pending.is_char_boundary(pending.len() - k)
                        && OPEN.starts_with(&pending[pending.len() - k..])
                    {
                        keep = pending.len() - k;
                        break;
                    }
                }
                keep
            }
        }
    }
}

/// A call's id, unique in this process: `call_` and 24 hex digits of a counter mixed with the start time.
pub fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let n = NEXT.fetch_add(1, Relaxed);
    // splitmix64 of seed + n: distinct for distinct n.
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    format!("call_{z:016x}{:08x}", n as u32)
}

/// The `tool_calls` list of a message (or, with `index`, of a stream delta).
pub fn calls_json(calls: &[Call], delta: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({"id": call_id(), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments}});
                if delta {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> Call {
        Call {
            name: name.into(),
            arguments: args.into(),
        }
    }

    fn reader(mode: Mode) -> Reader {
        Reader {
            mode,
            parallel: true,
            names: vec!["a".into(), "b".into(), "get_weather".into()],
        }
    }

    #[test]
    fn hermes_answers_split_into_text_and_calls() {
        let m = reader(Mode::Hermes);
        let p = m.parse("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}\n</tool_call>");
        assert_eq!(p.content, None);
        assert_eq!(
            p.calls,
            vec![call(
                "get_weather",
                "{\"city\":\"Zürich\",\"unit\":\"celsius\"}"
            )]
        );
        // Text first, two calls, the last without its closing tag, arguments given as JSON text.
        let p = m.parse(
            "Let me check.\n<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}",
        );
        assert_eq!(p.content.as_deref(), Some("Let me check.\n"));
        assert_eq!(p.calls, vec![call("a", "{}"), call("b", "{\"x\":1}")]);
        // Not calls: no block, a block that is not JSON, arguments that are not an object, text after the calls.
        for t in [
            "The weather is fine.",
            "<tool_call>{\"name\": \"a\", \"arguments\": {</tool_call>",
            "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call> and more",
        ] {
            let p = m.parse(t);
            assert_eq!(p.calls, vec![], "{t}");
            assert_eq!(p.content.as_deref(), Some(t));
        }
        assert_eq!(m.parse("  \n").content, None);
        // A bare call object (Qwen2.5-Coder's way), alone or fenced, to a defined function.
        for t in [
            " {\"name\": \"a\", \"arguments\": {\"q\": 1}}\n",
            "```json\n{\"name\": \"a\", \"arguments\": {\"q\": 1}}\n```",
        ] {
            let p = m.parse(t);
            assert_eq!(
                (p.content, p.calls),
                (None, vec![call("a", "{\"q\":1}")]),
                "{t}"
            );
        }
        let t = "{\"name\": \"zed\", \"arguments\": {}}";
        assert_eq!(m.parse(t).calls, vec![], "not a defined function: text");
        // Several bare objects in a row are parallel calls; one that is not a call leaves it all text.
        let t =
            "{\"name\": \"a\", \"arguments\": {}}\n{\"name\": \"b\", \"arguments\": {\"x\": 2}}";
        assert_eq!(
            m.parse(t).calls,
            vec![call("a", "{}"), call("b", "{\"x\":2}")]
        );
        let t = "{\"name\": \"a\", \"arguments\": {}}\n{\"note\": 1}";
        assert_eq!(m.parse(t).calls, vec![]);
        assert_eq!(
            m.parse("{\"name\": \"a\", \"arguments\": {}} and").calls,
            vec![]
        );
        // parallel_tool_calls false keeps the first call.
        let two = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        assert_eq!(m.parse(two).calls.len(), 2);
        let one = Reader {
            parallel: false,
            ..reader(Mode::Hermes)
        };
        assert_eq!(one.parse(two).calls, vec![call("a", "{}")]);
        // A forced answer is the call object itself.
        let f = reader(Mode::Forced { named: true });
        assert_eq!(
            f.parse("{\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}")
                .calls,
            vec![call("a", "{\"q\":\"x\"}")]
        );
        assert_eq!(f.parse("{\"name\": \"a\", \"argu").calls, vec![]);
    }

    #[test]
    fn streamed_text_is_held_back_from_a_possible_call_on() {
        let m = reader(Mode::Hermes);
        assert_eq!(m.releasable("Hello", true), 5);
        assert_eq!(m.releasable("Hello <tool", true), 6);
        assert_eq!(m.releasable("Hello <", true), 6);
        assert_eq!(m.releasable("Hello <tool_call>{", true), 6);
        assert_eq!(m.releasable("a < b", true), 5);
        assert_eq!(m.releasable("Zürich <tool_c", true), "Zürich ".len());
        // At the start, what may be a bare call object is held; later it is text.
        for t in ["", " ", "{", "\n{\"na", "``", "```json\n{"] {
            assert_eq!(m.releasable(t, true), 0, "{t:?}");
        }
        assert_eq!(m.releasable("```python\n", true), 10);
        assert_eq!(m.releasable("{x}", false), 3);
        // Once the unsent text starts a call, nothing more goes out as content.
        assert_eq!(
            m.releasable("<tool_call>{\"name\": \"a\"} and text", false),
            0
        );
        assert_eq!(
            reader(Mode::Forced { named: false }).releasable("{\"name\"", true),
            0
        );
    }

    #[test]
    fn call_ids_differ() {
        let (a, b) = (call_id(), call_id());
        assert_ne!(a, b);
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
    }
}
