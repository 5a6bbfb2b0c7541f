//! Function calling on `/v1/chat/completions` (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).
//!
//! The definitions go to the model's chat template, which writes them into the prompt in the format the model was
//! trained on; the answer is then read back for calls in that format. Which format a template's model writes is
//! found from the template's text ([`Format::of`], the markers llama.cpp's chat parsers key on):
//! - Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Qwen3, Hermes 2 Pro and 3;
//!   vLLM's `hermes` parser); bare call objects too, which Qwen2.5-Coder writes;
//! - Llama 3.x: a bare `{"name": ..., "parameters": {...}}` object, maybe after `<|python_tag|>` (Llama 3.1, 3.2,
//!   3.3; vLLM's `llama3_json`);
//! - a JSON list after a marker: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral Nemo and the
//!   v3 templates; vLLM's `mistral`) and `<|tool_call|>[...]` (Granite 3; vLLM's `granite`);
//! - Mistral's later `[TOOL_CALLS]name[ARGS]{...}` (Mistral Small 3.2, Devstral, Ministral 3; a `[CALL_ID]id`
//!   may stand before `[ARGS]`).
//!
//! A template that does not render tools, or whose calls are in none of these formats, is refused rather than
//! answered as if there were no tools.
//!
//! `tool_choice`:
//! - `"auto"` (the default with tools): the model answers text, calls, or both; the text before the first call is the
//!   message's `content`, and `finish_reason` is `"tool_calls"` when it called. A call that does not read as one
//!   leaves the whole answer as text (as vLLM does).
//! - `"required"` and `{"type": "function", "function": {"name": ...}}`: decoding is constrained (the JSON-schema
//!   mode of `response_format`) to one call object, `{"name": ..., "arguments": {...}}` (`"parameters"` for Llama
//!   3.x, the key it was trained on), the name one of the tools (or the named one) and the arguments what the named
//!   function's `parameters` schema accepts when hayloft's schema subset takes it, any JSON object otherwise. `required` with
//!   parallel calls (the default) decodes a JSON list of one such call or more, as vLLM constrains it; a named call
//!   is one call and finishes with `"stop"`, as OpenAI's does.
//! - `"none"`: the definitions are left out of the prompt and the answer is text.
//!
//! Call ids are OpenAI's `call_` and 24 hex digits, except for Mistral's formats, whose templates accept only 9
//! letters and digits in the ids a client sends back (vLLM makes them so too).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::engine::json::JsonFormat;
use crate::engine::json_lazy::{Heads, LazyJson};
use crate::engine::json_schema::{JVal, Schema};
use crate::engine::xml_call::XmlCalls;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;
use scan::{compact, scan_call, CallScan};

mod scan;

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
    /// Text, calls in the template's format, or both.
    Auto,
    /// The whole answer is one call object (decoding constrained to it); `named`: the request named the function.
    Forced { named: bool },
}

/// The format a model writes its calls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>{...}</tool_call>` blocks, or bare call objects.
    Hermes,
    /// Bare `{"name": ..., "parameters": {...}}` objects, maybe after `<|python_tag|>`.
    Llama3,
    /// A marker (`[TOOL_CALLS]`, `<|tool_call|>`), then a JSON list of call objects.
    List { marker: &'static str },
    /// `[TOOL_CALLS]name[ARGS]{...}` (a `[CALL_ID]id` may come before `[ARGS]`), once per call.
    MistralArgs,
    /// `<tool_call>` blocks of `<function=NAME>` with a `<parameter=KEY>` element per argument, its value as text
    /// (Qwen3-Coder; vLLM's `qwen3_coder` parser).
    Xml,
}

const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_ID: &str = "[CALL_ID]";
const GRANITE_CALLS: &str = "<|tool_call|>";
const XML_FUNCTION: &str = "<function=";
const XML_PARAMETER: &str = "<parameter=";
const XML_FUNCTION_END: &str = "</function>";
const XML_PARAMETER_END: &str = "</parameter>";

impl Format {
    /// The format of the calls a chat template's model writes, from the markers in the template's text; None for
    /// a format hayloft does not read.
    pub fn of(template: &str) -> Option<Format> {
        if template.contains(XML_FUNCTION) && template.contains(XML_PARAMETER) {
            Some(Format::Xml)
        } else if template.contains(OPEN) {
            Some(Format::Hermes)
        } else if template.contains(MISTRAL_CALLS) {
            Some(if template.contains(MISTRAL_ARGS) {
                Format::MistralArgs
            } else {
                Format::List {
                    marker: MISTRAL_CALLS,
                }
            })
        } else if template.contains(GRANITE_CALLS) {
            Some(Format::List {
                marker: GRANITE_CALLS,
            })
        } else if template.contains("ipython<|end_header_id|>") {
            Some(Format::Llama3)
        } else {
            None
        }
    }

    /// The text that starts the calls of an answer (for Llama 3.x, only its optional tag).
    fn marker(self) -> &'static str {
        match self {
            Format::Hermes | Format::Xml => OPEN,
            Format::Llama3 => PYTHON_TAG,
            Format::List { marker } => marker,
            Format::MistralArgs => MISTRAL_CALLS,
        }
    }

    /// Whether an answer may be bare call objects with no marker.
    fn bare(self) -> bool {
        matches!(self, Format::Hermes | Format::Llama3)
    }

    /// The key of a call object's arguments the model was trained to write.
    fn arguments_key(self) -> &'static str {
        match self {
            Format::Llama3 => "parameters",
            _ => "arguments",
        }
    }
}

/// What a request's tools make of its prompt, its decoding and its answer.
pub struct ToolPlan {
    /// Definitions for the template.
    pub tools: Vec<JVal>,
    pub reader: Reader,
    /// The constraint for `Forced`.
    pub json: Option<JsonFormat>,
    /// For `Auto`: the calls the model begins, decoded under the tools' schema.
    pub lazy: Option<LazyCalls>,
}

/// Where calls begin in a format's answers, and the schema they are decoded under once begun (`tool_choice`
/// `"auto"`, as llama.cpp's lazy grammars do it).
#[derive(Clone, Debug)]
pub struct LazyCalls {
    /// One call, or for the list formats a list of calls.
    pub format: JsonFormat,
    /// Texts (maybe one token each) after which a call begins.
    pub markers: Vec<&'static str>,
    /// A call may also open the answer bare: `{"name":"NAME"` for each function (no whitespace; any is allowed
    /// between the bytes).
    pub bare: Vec<String>,
    /// A member a bare call may write before its name, which the schema does not take (Llama 3.x).
    pub member: Option<&'static str>,
    /// For Mistral's `NAME[ARGS]{...}` calls: each function's name and the schema of its arguments (`format` is
    /// then not used).
    pub heads: Option<Vec<(String, JsonFormat)>>,
    /// For Qwen3-Coder's XML calls: their grammar (`format` is then not used).
    pub xml: Option<Arc<XmlCalls>>,
}

impl LazyCalls {
    /// The constraint for a model's tokenizer (markers that are one token trigger as that token too), with the
    /// thinking where nothing triggers.
    pub fn spec(&self, tok: &Tokenizer, think: Option<(Vec<u8>, Vec<u8>, bool)>) -> LazyJson {
        LazyJson {
            format: self.format.clone(),
            trigger_ids: self
                .markers
                .iter()
                .filter_map(|m| tok.token_id(m))
                .collect(),
            trigger_texts: self.markers.iter().map(|m| m.as_bytes().to_vec()).collect(),
            bare: self.bare.iter().map(|o| o.as_bytes().to_vec()).collect(),
            think,
            member: self.member.map(|m| m.as_bytes().to_vec()),
            heads: self.heads.as_ref().map(|fns| {
                let text = |t: &str| (t.as_bytes().to_vec(), tok.token_id(t));
                Heads {
                    fns: fns
                        .iter()
                        .map(|(n, f)| (n.as_bytes().to_vec(), f.clone()))
                        .collect(),
                    args: text(MISTRAL_ARGS),
                    id: text(MISTRAL_ID),
                }
            }),
            xml: self.xml.clone(),
        }
    }
}

impl Format {
    /// The lazy constraint of `auto` calls; None for XML calls whose tools the grammar cannot hold (more than 64
    /// parameters to a function, a name with `<` or `>`): those calls are left free.
    fn lazy(self, tools: &[&JVal], parallel: bool) -> Option<LazyCalls> {
        let (markers, bare, list) = match self {
            Format::Hermes => (vec![OPEN], true, false),
            Format::Llama3 => (vec![PYTHON_TAG], true, false),
            Format::List { marker } => (vec![marker], false, true),
            Format::MistralArgs => {
                let heads = tools
                    .iter()
                    .filter_map(|t| Some((fn_name(t)?.to_string(), args_schema(t))))
                    .collect();
                return Some(LazyCalls {
                    format: JsonFormat::Object,
                    markers: vec![MISTRAL_CALLS],
                    bare: Vec::new(),
                    member: None,
                    heads: Some(heads),
                    xml: None,
                });
            }
            Format::Xml => {
                let fns: Vec<_> = tools
                    .iter()
                    .filter_map(|t| {
                        let f = t.get("function")?;
                        Some((fn_name(t)?, f.get("parameters")))
                    })
                    .collect();
                let xml = XmlCalls::compile(&fns).ok()?;
                return Some(LazyCalls {
                    format: JsonFormat::Object,
                    markers: vec![OPEN],
                    bare: Vec::new(),
                    member: None,
                    heads: None,
                    xml: Some(Arc::new(xml)),
                });
            }
        };
        let format = call_schema(tools, self.arguments_key(), list.then_some(!parallel));
        let bare = match bare {
            true => tools
                .iter()
                .filter_map(|t| fn_name(t))
                .map(|n| format!("{{\"name\":\"{n}\""))
                .collect(),
            false => Vec::new(),
        };
        Some(LazyCalls {
            format,
            markers,
            bare,
            // Llama 3.x models also write `{"type": "function", "name": ...}` (llama.cpp's trigger and grammar
            // allow it).
            member: (self == Format::Llama3).then_some("\"type\":\"function\","),
            heads: None,
            xml: None,
        })
    }
}

/// How an answer is read for calls.
#[derive(Clone, Debug)]
pub struct Reader {
    pub mode: Mode,
    pub format: Format,
    /// Every call of the answer, or only the first (`parallel_tool_calls: false`).
    pub parallel: bool,
    /// The functions defined: an answer that is a bare call object counts as a call only to one of them.
    names: Vec<String>,
    /// Each function's parameters and their JSON types (`"string"` where none is given): how an XML call's text
    /// values become JSON.
    types: Vec<(String, ParamTypes)>,
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
        let Some(format) = Format::of(tpl.source()) else {
            return Err(unsupported(
                "field `tools`: this model's chat template writes tool calls in a format hayloft does not read \
                 (it reads Hermes <tool_call> blocks: Qwen2.5, Qwen3, Hermes; Llama 3.x JSON calls; Mistral's \
                 [TOOL_CALLS]; Granite's <|tool_call|>)"
                    .into(),
            ));
        };
        let parallel = self.parallel_tool_calls.unwrap_or(true);
        let (mode, json) = if required || named.is_some() {
            let chosen: Vec<&JVal> = tools
                .iter()
                .filter(|t| named.is_none() || fn_name(t) == named.as_deref())
                .collect();
            // `required` with parallel calls: a list of one call or more (vLLM's constraint); a named call is one.
            let list = named.is_none() && parallel;
            (
                Mode::Forced {
                    named: named.is_some(),
                },
                Some(call_schema(
                    &chosen,
                    format.arguments_key(),
                    list.then_some(false),
                )),
            )
        } else {
            (Mode::Auto, None)
        };
        let lazy = match mode {
            Mode::Auto => format.lazy(&tools.iter().collect::<Vec<_>>(), parallel),
            Mode::Forced { .. } => None,
        };
        let names = names.iter().map(|n| n.to_string()).collect();
        let types = tools.iter().filter_map(param_types).collect();
        Ok(Some(ToolPlan {
            tools,
            reader: Reader {
                mode,
                format,
                parallel,
                names,
                types,
            },
            json,
            lazy,
        }))
    }
}

/// Each parameter of a function and its declared JSON types (none where the schema gives no `type`).
type ParamTypes = Vec<(String, Vec<String>)>;

/// A function's name with its parameters' declared types, from its `parameters` schema.
fn param_types(t: &JVal) -> Option<(String, ParamTypes)> {
    let props = t
        .get("function")?
        .get("parameters")
        .and_then(|p| p.get("properties"));
    let types = match props {
        Some(JVal::Obj(kv)) => kv
            .iter()
            .map(|(k, v)| {
                let tys = match v.get("type") {
                    Some(JVal::Str(s)) => vec![s.clone()],
                    Some(JVal::Arr(a)) => a
                        .iter()
                        .filter_map(JVal::as_str)
                        .map(String::from)
                        .collect(),
                    _ => Vec::new(),
                };
                (k.clone(), tys)
            })
            .collect(),
        _ => Vec::new(),
    };
    Some((fn_name(t)?.to_string(), types))
}

fn fn_name(t: &JVal) -> Option<&str> {
    t.get("function")?.get("name")?.as_str()
}

/// The schema of a function's arguments: its `parameters` when hayloft's schema subset takes them, any JSON object
/// otherwise.
fn args_schema(t: &JVal) -> JsonFormat {
    let params = t.get("function").and_then(|f| f.get("parameters"));
    match params.map(Schema::compile) {
        Some(Ok(s)) => JsonFormat::Schema(Arc::new(s)),
        _ => JsonFormat::Object,
    }
}

/// The constraint of a forced call: `{"name": ..., "<args_key>": {...}}` with, for each chosen function, its name
/// and the arguments its `parameters` schema accepts when hayloft's schema subset takes it (any JSON object
/// otherwise): one object per function, told apart by the name, so a call's arguments are those of the function it
/// names. With `list` Some(one), a JSON list of one such call or more (`one`: exactly one).
fn call_schema(chosen: &[&JVal], args_key: &str, list: Option<bool>) -> JsonFormat {
    let obj = |kv: Vec<(&str, JVal)>| {
        JVal::Obj(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let any_object = obj(vec![("type", JVal::Str("object".into()))]);
    // Each function's `$defs`, moved to the call schema's root.
    let mut defs = Vec::new();
    let calls = chosen
        .iter()
        .filter_map(|t| {
            let n = fn_name(t)?;
            let args = t
                .get("function")
                .and_then(|f| f.get("parameters"))
                .filter(|p| Schema::compile(p).is_ok())
                .map(|p| hoist_defs(p, &format!("{n}."), &mut defs))
                .unwrap_or_else(|| any_object.clone());
            let name = obj(vec![("const", JVal::Str(n.into()))]);
            Some(obj(vec![
                ("type", JVal::Str("object".into())),
                ("properties", obj(vec![("name", name), (args_key, args)])),
                (
                    "required",
                    JVal::Arr(vec![JVal::Str("name".into()), JVal::Str(args_key.into())]),
                ),
            ]))
        })
        .collect();
    let schema = obj(vec![("anyOf", JVal::Arr(calls))]);
    let schema = match list {
        Some(one) => {
            let mut a = vec![
                ("type", JVal::Str("array".into())),
                ("items", schema),
                ("minItems", JVal::Num(1.into())),
            ];
            if one {
                a.push(("maxItems", JVal::Num(1.into())));
            }
            obj(a)
        }
        None => schema,
    };
    let schema = match schema {
        JVal::Obj(mut kv) if !defs.is_empty() => {
            kv.push(("$defs".into(), JVal::Obj(defs)));
            JVal::Obj(kv)
        }
        s => s,
    };
    match Schema::compile(&schema) {
        Ok(s) => JsonFormat::Schema(Arc::new(s)),
        // Unreachable for the arguments chosen above (each compiled alone, the names are distinct strings); any
        // object keeps the call's shape.
        Err(_) => JsonFormat::Object,
    }
}

/// A function's `parameters` as part of the call schema: its `$defs` (or `definitions`) go to `defs` under `prefix`
/// and its references are renamed to match, so they resolve at the call schema's root as they did in the parameters
/// alone (Pydantic writes nested models so).
fn hoist_defs(params: &JVal, prefix: &str, defs: &mut Vec<(String, JVal)>) -> JVal {
    let JVal::Obj(kv) = params else {
        return params.clone();
    };
    let mut out = Vec::with_capacity(kv.len());
    for (k, v) in kv {
        match (k.as_str(), v) {
            ("$defs" | "definitions", JVal::Obj(d)) => {
                for (name, body) in d {
                    defs.push((format!("{prefix}{name}"), rename_refs(body, prefix)));
                }
            }
            _ => out.push((k.clone(), rename_refs(v, prefix))),
        }
    }
    JVal::Obj(out)
}

/// `v` with every `$ref` to `#/$defs/NAME` or `#/definitions/NAME` pointing to `#/$defs/<prefix>NAME`.
fn rename_refs(v: &JVal, prefix: &str) -> JVal {
    match v {
        JVal::Obj(kv) => JVal::Obj(
            kv.iter()
                .map(|(k, x)| {
                    let name = match (k.as_str(), x) {
                        ("$ref", JVal::Str(r)) => r
                            .strip_prefix("#/$defs/")
                            .or_else(|| r.strip_prefix("#/definitions/")),
                        _ => None,
                    };
                    let x = match name {
                        Some(n) => JVal::Str(format!("#/$defs/{prefix}{n}")),
                        None => rename_refs(x, prefix),
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        JVal::Arr(a) => JVal::Arr(a.iter().map(|x| rename_refs(x, prefix)).collect()),
        other => other.clone(),
    }
}

/// A call read from the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `arguments` is a string).
    pub arguments: String,
}

/// One call object, `{"name": ..., "arguments": {...}}` and nothing else but whitespace (arguments may also be JSON
/// text, which some models write).
fn read_call(text: &str) -> Option<Call> {
    let t = text.trim();
    match serde_json::from_str::<JVal>(t).ok()? {
        JVal::Obj(_) => {}
        _ => return None,
    }
    let s = scan_call(t)?;
    (s.end == Some(t.len())).then_some(())?;
    let arguments = arguments_text(t, &s)?;
    Some(Call {
        name: s.name?,
        arguments,
    })
}

/// A complete call's arguments as the answer has them, without the whitespace between tokens: `{}` when there are
/// none, the inner text of arguments given as a JSON string; None when they are not an object.
fn arguments_text(t: &str, s: &CallScan) -> Option<String> {
    let Some((a, e)) = s.args else {
        return Some("{}".into());
    };
    let raw = &t[a..e];
    let raw = match raw.as_bytes()[0] {
        b'{' => raw.to_string(),
        b'"' => serde_json::from_str::<String>(raw).ok()?,
        _ => return None,
    };
    match serde_json::from_str::<JVal>(&raw).ok()? {
        JVal::Obj(_) => Some(compact(raw.trim())),
        _ => None,
    }
}

/// The arguments of a call being streamed: what there is of them so far, compacted (a prefix of what
/// [`arguments_text`] gives once the call is complete; nothing until then when they are a JSON string).
fn arguments_so_far(t: &str, s: &CallScan) -> String {
    match s.args {
        None if s.end.is_some() => "{}".into(),
        Some((a, e)) if t.as_bytes()[a] == b'{' => compact(&t[a..e]),
        Some(_) if s.args_done => arguments_text(t, s).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Calls' JSON objects one after another (a call's own text is `t[at..]`), each complete.
fn objects_in_a_row(t: &str, mut at: usize) -> impl Iterator<Item = Option<(usize, usize)>> + '_ {
    std::iter::from_fn(move || {
        at = t.len() - t[at..].trim_start().len();
        if at == t.len() {
            return None;
        }
        let end = scan_call(&t[at..]).and_then(|s| s.end);
        let r = end.map(|e| (at, at + e));
        at = r.map_or(t.len(), |(_, e)| e);
        Some(r)
    })
}

/// A call being streamed: its name, and its arguments so far.
#[derive(Clone, Debug, PartialEq)]
pub struct PartialCall {
    pub name: String,
    pub arguments: String,
}

/// Whether `gap` (text between calls) holds only what separates calls: markers, whitespace, list punctuation, fences.
fn separators_only(gap: &str, marker: &str) -> bool {
    let g = gap
        .replace(marker, "")
        .replace(CLOSE, "")
        .replace(FENCE, "");
    g.chars()
        .all(|c| c.is_whitespace() || matches!(c, '[' | ',' | ']' | '`'))
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
    /// Reads an answer: the text before the first call, then the calls in the format's way (see the module
    /// docs); the last Hermes block may lack its `</tool_call>` when generation stopped right after it. Any call
    /// that does not read as one, or text after the calls, leaves the whole answer as text. An answer that is bare
    /// call objects (one or several in a row, or in a ```json fence), each to a defined function, is those calls
    /// for the formats that write them so (Hermes: Qwen2.5-Coder answers so, and llama.cpp's Hermes reader takes
    /// it too; Llama 3.x). Forced: the answer is the call. Only the first call is kept when
    /// `parallel_tool_calls` was false.
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
        let found = |head: usize, calls: Option<Vec<Call>>| match calls {
            Some(calls) if !calls.is_empty() => Parsed {
                content: Some(text[..head].to_string()).filter(|t| !t.trim().is_empty()),
                head,
                calls,
            },
            _ => as_text(),
        };
        if let Mode::Forced { .. } = self.mode {
            return found(0, json_list(text));
        }
        let marker = self.format.marker();
        let Some(first) = text.find(marker) else {
            return match self.format.bare() {
                true => found(0, self.bare_calls(text)),
                false => as_text(),
            };
        };
        let body = &text[first..];
        let calls = match self.format {
            Format::Hermes => hermes_blocks(body),
            Format::Llama3 => self.bare_calls(&body[marker.len()..]),
            Format::List { marker } => json_list(&body[marker.len()..]),
            Format::MistralArgs => mistral_args(body),
            Format::Xml => self.xml_blocks(body),
        };
        found(first, calls)
    }

    /// Qwen3-Coder's calls from the first `<tool_call>` on, nothing but whitespace between and after the blocks; the
    /// last block may lack its `</tool_call>` when generation stopped right after it.
    fn xml_blocks(&self, mut rest: &str) -> Option<Vec<Call>> {
        let mut calls = Vec::new();
        while let Some(body) = rest.strip_prefix(OPEN) {
            let (inner, after) = match body.find(CLOSE) {
                Some(e) => (&body[..e], &body[e + CLOSE.len()..]),
                None => (body, ""),
            };
            calls.push(self.xml_call(inner)?);
            rest = after.trim_start();
        }
        rest.is_empty().then_some(calls)
    }

    /// One `<function=NAME>` element (a defined function) holding `<parameter=KEY>` elements and nothing else; each
    /// value loses one line break at each end (the model writes one around it) and becomes JSON by the parameter's
    /// type, as vLLM's `qwen3_coder` parser converts it: numbers and booleans when the text is one, objects and
    /// arrays when it parses as one, a string otherwise.
    fn xml_call(&self, inner: &str) -> Option<Call> {
        let t = inner.trim().strip_prefix(XML_FUNCTION)?;
        let (name, t) = t.split_once('>')?;
        let name = name.trim();
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let mut rest = t.trim().strip_suffix(XML_FUNCTION_END)?.trim_start();
        let mut args = String::from("{");
        while let Some(p) = rest.strip_prefix(XML_PARAMETER) {
            let (key, body) = p.split_once('>')?;
            let end = body.find(XML_PARAMETER_END)?;
            let raw = &body[..end];
            let raw = raw.strip_prefix('\n').unwrap_or(raw);
            let raw = raw.strip_suffix('\n').unwrap_or(raw);
            if args.len() > 1 {
                args.push(',');
            }
            args += &serde_json::to_string(key.trim()).ok()?;
            args.push(':');
            args += &self.xml_value(name, key.trim(), raw);
            rest = body[end + XML_PARAMETER_END.len()..].trim_start();
        }
        if !rest.is_empty() {
            return None;
        }
        args.push('}');
        Some(Call {
            name: name.to_string(),
            arguments: args,
        })
    }

    /// A parameter's text value as JSON text, by its declared types in the function's schema (a value that reads as
    /// one of them is that JSON value; text otherwise).
    fn xml_value(&self, function: &str, key: &str, raw: &str) -> String {
        let tys = self
            .types
            .iter()
            .find(|(f, _)| f == function)
            .and_then(|(_, ps)| ps.iter().find(|(k, _)| k == key))
            .map_or(&[][..], |(_, t)| t.as_slice());
        let t = raw.trim();
        let parsed = serde_json::from_str::<JVal>(t).ok();
        let fits = tys.iter().any(|ty| {
            matches!(
                (ty.as_str(), &parsed),
                ("integer" | "number", Some(JVal::Num(_)))
                    | ("boolean", Some(JVal::Bool(_)))
                    | ("object", Some(JVal::Obj(_)))
                    | ("array", Some(JVal::Arr(_)))
                    | ("null", Some(JVal::Null))
            )
        });
        match fits {
            true => compact(t),
            false
                if tys.iter().any(|ty| ty == "boolean")
                    && matches!(t.to_ascii_lowercase().as_str(), "true" | "false") =>
            {
                t.to_ascii_lowercase()
            }
            false => serde_json::to_string(raw).unwrap_or_default(),
        }
    }

    /// Bare call objects, one or several in a row, maybe in a ```json fence, each to a defined function.
    fn bare_calls(&self, text: &str) -> Option<Vec<Call>> {
        let t = text.trim();
        let t = t
            .strip_prefix(FENCE)
            .and_then(|f| f.strip_suffix("```"))
            .unwrap_or(t);
        let mut calls = Vec::new();
        for span in objects_in_a_row(t, 0) {
            let (a, e) = span?;
            let c = read_call(&t[a..e])?;
            if !self.names.contains(&c.name) {
                return None;
            }
            calls.push(c);
        }
        Some(calls)
    }

    /// The calls the answer so far is making, for a stream: each call whose name is complete and defined, with its
    /// arguments so far, compacted (a prefix of the arguments [`Reader::parse`] gives once the answer is complete, so
    /// a stream can send them piece by piece). Empty until the answer is seen to be calls: from the format's marker
    /// on, or from its start for bare call objects (where the format writes them) and forced calls; only what
    /// separates calls (markers, whitespace, list punctuation, a fence) may stand between them.
    pub fn partial(&self, text: &str) -> Vec<PartialCall> {
        let marker = self.format.marker();
        let region = match (self.mode, text.find(marker)) {
            (Mode::Forced { .. }, _) => text,
            (Mode::Auto, Some(i)) => &text[i..],
            (Mode::Auto, None) if self.format.bare() => text,
            (Mode::Auto, None) => return Vec::new(),
        };
        let mut out = Vec::new();
        if self.mode == Mode::Auto && self.format == Format::Xml {
            // A call once its function's name is whole; its arguments all at once when its element is.
            for block in region.split(OPEN).skip(1) {
                let Some(t) = block.trim_start().strip_prefix(XML_FUNCTION) else {
                    break;
                };
                let Some((name, _)) = t.split_once('>') else {
                    break;
                };
                let name = name.trim();
                if !self.names.iter().any(|n| n == name) {
                    break;
                }
                let inner = block.find(CLOSE).map_or(block, |e| &block[..e]);
                let arguments = match inner.trim_end().ends_with(XML_FUNCTION_END) {
                    true => self
                        .xml_call(inner)
                        .map(|c| c.arguments)
                        .unwrap_or_default(),
                    false => String::new(),
                };
                out.push(PartialCall {
                    name: name.to_string(),
                    arguments,
                });
            }
        } else if self.mode == Mode::Auto && self.format == Format::MistralArgs {
            for part in region.split(MISTRAL_CALLS).skip(1) {
                let Some((head, args)) = part.split_once(MISTRAL_ARGS) else {
                    break;
                };
                let name = head.split(MISTRAL_ID).next().unwrap_or("").trim();
                let args = args.trim_start();
                if !self.names.iter().any(|n| n == name)
                    || !(args.is_empty() || args.starts_with('{'))
                {
                    break;
                }
                // The next call's marker may have begun after complete arguments.
                let args = &args[..scan::value_len(args).unwrap_or(args.len())];
                out.push(PartialCall {
                    name: name.to_string(),
                    arguments: compact(args),
                });
            }
        } else {
            let mut at = 0;
            while let Some(open) = region[at..].find('{').map(|i| at + i) {
                if !separators_only(&region[at..open], marker) {
                    break;
                }
                let Some(s) = scan_call(&region[open..]) else {
                    break;
                };
                match &s.name {
                    Some(n) if self.names.contains(n) => out.push(PartialCall {
                        name: n.clone(),
                        arguments: arguments_so_far(&region[open..], &s),
                    }),
                    _ => break,
                }
                match s.end {
                    Some(e) => at = open + e,
                    None => break,
                }
            }
        }
        if !self.parallel {
            out.truncate(1);
        }
        out
    }

    /// How much of `pending` (answer text not yet sent; `at_start`: none was) may go out as content now: up to the
    /// format's first call marker, short of a tail that could be its beginning, and nothing while the answer could
    /// still be bare call objects (it starts with `{` or a ```json fence, for the formats that write them).
    /// Forced answers send nothing before the end.
    pub fn releasable(&self, pending: &str, at_start: bool) -> usize {
        if let Mode::Forced { .. } = self.mode {
            return 0;
        }
        let t = pending.trim_start();
        if at_start
            && self.format.bare()
            && (t.starts_with('{') || t.starts_with(FENCE) || FENCE.starts_with(t))
        {
            return 0;
        }
        let marker = self.format.marker();
        if let Some(at) = pending.find(marker) {
            return at;
        }
        for k in (1..marker.len()).rev() {
            if pending.len() >= k
                && pending.is_char_boundary(pending.len() - k)
                && marker.starts_with(&pending[pending.len() - k..])
            {
                return pending.len() - k;
            }
        }
        pending.len()
    }

    /// The `tool_calls` list of a message, each call with a new id.
    pub fn calls_json(&self, calls: &[Call]) -> Value {
        let one = |c: &Call| {
            json!({"id": self.new_id(), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        };
        Value::Array(calls.iter().map(one).collect())
    }

    /// A new call id in this format's way: 9 letters and digits for Mistral's formats (its templates refuse any
    /// other id sent back), OpenAI's `call_...` otherwise.
    pub fn new_id(&self) -> String {
        match self.format {
            Format::MistralArgs
            | Format::List {
                marker: MISTRAL_CALLS,
            } => short_call_id(),
            _ => call_id(),
        }
    }
}

/// Hermes blocks from the first `<tool_call>` on, each a call object, nothing but whitespace between and after.
fn hermes_blocks(mut rest: &str) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    while let Some(body) = rest.strip_prefix(OPEN) {
        let (inner, after) = match body.find(CLOSE) {
            Some(e) => (&body[..e], &body[e + CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(read_call(inner)?);
        rest = after.trim_start();
    }
    rest.is_empty().then_some(calls)
}

/// A JSON list of call objects (or one object) and nothing after it.
fn json_list(text: &str) -> Option<Vec<Call>> {
    let t = text.trim();
    let items = match serde_json::from_str::<JVal>(t).ok()? {
        JVal::Arr(items) => items.len(),
        JVal::Obj(_) => return Some(vec![read_call(t)?]),
        _ => return None,
    };
    // A valid list: its items are where the scan finds them, a comma (or the closing bracket) after each.
    let mut calls = Vec::with_capacity(items);
    let mut at = 1;
    for _ in 0..items {
        at = t.len() - t[at..].trim_start().len();
        let end = at + scan_call(&t[at..])?.end?;
        calls.push(read_call(&t[at..end])?);
        at = end + t[end..].find([',', ']'])? + 1;
    }
    Some(calls)
}

/// `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` once per call (the `[CALL_ID]` part optional).
fn mistral_args(text: &str) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    for part in text.split(MISTRAL_CALLS).skip(1) {
        let (head, args) = part.split_once(MISTRAL_ARGS)?;
        let name = head.split(MISTRAL_ID).next()?.trim();
        if !valid_name(name) {
            return None;
        }
        let args = args.trim();
        if !matches!(serde_json::from_str(args).ok()?, JVal::Obj(_)) {
            return None;
        }
        calls.push(Call {
            name: name.to_string(),
            arguments: compact(args),
        });
    }
    Some(calls)
}

/// A number unique in this process, mixed with the start time (splitmix64 of seed + n: distinct for distinct n).
fn id_bits() -> (u64, u64) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let n = NEXT.fetch_add(1, Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31), n)
}

/// A call's id, unique in this process: `call_` and 24 hex digits of a counter mixed with the start time.
pub fn call_id() -> String {
    let (z, n) = id_bits();
    format!("call_{z:016x}{:08x}", n as u32)
}

/// A Mistral call id: 9 letters and digits (its templates refuse any other id sent back), the counter's low
/// digits last so ids made in a row differ.
fn short_call_id() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let (z, n) = id_bits();
    let mut out = String::with_capacity(9);
    let mut z = z;
    for _ in 0..5 {
        out.push(DIGITS[(z % 62) as usize] as char);
        z /= 62;
    }
    let mut n = n;
    let mut tail = [0u8; 4];
    for t in tail.iter_mut().rev() {
        *t = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    out.extend(tail.iter().map(|&b| b as char));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::json_schema::SchemaState;

    fn call(name: &str, args: &str) -> Call {
        Call {
            name: name.into(),
            arguments: args.into(),
        }
    }

    fn reader(mode: Mode) -> Reader {
        reader_for(mode, Format::Hermes)
    }

    fn reader_for(mode: Mode, format: Format) -> Reader {
        Reader {
            mode,
            format,
            parallel: true,
            names: vec!["a".into(), "b".into(), "get_weather".into()],
            types: vec![(
                "get_weather".into(),
                [
                    ("city", "string"),
                    ("days", "integer"),
                    ("hourly", "boolean"),
                    ("at", "object"),
                ]
                .map(|(k, t)| (k.to_string(), vec![t.to_string()]))
                .to_vec(),
            )],
        }
    }

    #[test]
    fn hermes_answers_split_into_text_and_calls() {
        let m = reader(Mode::Auto);
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
            ..reader(Mode::Auto)
        };
        assert_eq!(one.parse(two).calls, vec![call("a", "{}")]);
        // A forced answer is the call object itself, or a list of them (`required` with parallel calls).
        let f = reader(Mode::Forced { named: true });
        assert_eq!(
            f.parse("{\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}")
                .calls,
            vec![call("a", "{\"q\":\"x\"}")]
        );
        assert_eq!(f.parse("{\"name\": \"a\", \"argu").calls, vec![]);
        assert_eq!(
            f.parse("[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"q\": 2}}]")
                .calls,
            vec![call("a", "{}"), call("b", "{\"q\":2}")]
        );
    }

    #[test]
    fn streamed_text_is_held_back_from_a_possible_call_on() {
        let m = reader(Mode::Auto);
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

    /// Every prefix of an answer streams calls that the complete answer's calls extend: the same names in the same
    /// order, arguments that are prefixes of the final ones; the complete answer streams exactly its calls.
    #[test]
    fn streamed_calls_grow_into_the_parsed_ones() {
        let list = Format::List {
            marker: MISTRAL_CALLS,
        };
        let cases = [
            (Mode::Auto, Format::Hermes, "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Z\\\"ü rich\", \"n\": [1, 2.5]}}\n</tool_call>\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>", 2),
            (Mode::Auto, Format::Hermes, "```json\n{\"name\": \"a\", \"arguments\": \"{\\\"x\\\": 1}\"}\n```", 1),
            (Mode::Auto, Format::Llama3, "<|python_tag|>{\"name\": \"b\", \"parameters\": {\"q\": \"long text here\"}}", 1),
            (Mode::Auto, list, "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"k\": [true, null]}, \"id\": \"abc123XYZ\"}, {\"name\": \"b\"}]", 2),
            (Mode::Auto, Format::MistralArgs, "[TOOL_CALLS]a[ARGS]{\"x\": 1}[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{\"city\": \"Paris\"}", 2),
            (Mode::Auto, Format::Xml, "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=a>\n</function>\n</tool_call>", 2),
            (Mode::Forced { named: false }, Format::Llama3, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", 1),
            (Mode::Forced { named: false }, Format::Hermes, "[{\"name\": \"a\", \"arguments\": {\"x\": [1]}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]", 2),
        ];
        for (mode, format, text, n) in cases {
            let r = reader_for(mode, format);
            let done = r.parse(text).calls;
            assert_eq!(done.len(), n, "{text}");
            let whole: Vec<Call> = r
                .partial(text)
                .into_iter()
                .map(|p| call(&p.name, &p.arguments))
                .collect();
            assert_eq!(whole, done, "{text}");
            let mut grew = 0;
            for (cut, _) in text.char_indices() {
                let part = r.partial(&text[..cut]);
                assert!(part.len() <= n, "{text:?} at {cut}");
                for (p, d) in part.iter().zip(&done) {
                    assert_eq!(p.name, d.name, "{text:?} at {cut}");
                    assert!(
                        d.arguments.starts_with(&p.arguments),
                        "{text:?} at {cut}: {} then {}",
                        p.arguments,
                        d.arguments
                    );
                }
                grew = grew.max(part.len());
            }
            assert_eq!(grew, n, "{text}");
        }
        // Not calls: text first for a bare format, an undefined name, words between calls.
        let h = reader_for(Mode::Auto, Format::Hermes);
        for t in [
            "Sure: {\"name\": \"a\", \"arguments\": {}}",
            "{\"name\": \"zed\", \"arguments\": {\"x\"",
            "<tool_call>I think {\"name\": \"a\", \"arguments\": {}}",
        ] {
            assert_eq!(h.partial(t), vec![], "{t}");
        }
        let one = Reader {
            parallel: false,
            ..reader_for(Mode::Auto, list)
        };
        assert_eq!(one.partial(cases[3].2).len(), 1);
    }

    /// Text made of the pieces calls are made of, in random order, never panics a reader: every format, every
    /// prefix, parse, partial and releasable; and what the stream would send stays consistent with the parse.
    #[test]
    fn random_text_never_panics_a_reader() {
        const PIECES: [&str; 28] = [
            "<function=get_weather>",
            "</function>",
            "<parameter=city>",
            "</parameter>",
            "{",
            "}",
            "[",
            "]",
            "\"",
            "\\",
            ":",
            ",",
            " ",
            "\n",
            "name",
            "arguments",
            "parameters",
            "a",
            "get_weather",
            "ü",
            "€x",
            "1.5",
            "<tool_call>",
            "</tool_call>",
            "[TOOL_CALLS]",
            "[ARGS]",
            "<|python_tag|>",
            "```json",
        ];
        let formats = [
            Format::Hermes,
            Format::Llama3,
            Format::List {
                marker: MISTRAL_CALLS,
            },
            Format::List {
                marker: GRANITE_CALLS,
            },
            Format::MistralArgs,
            Format::Xml,
        ];
        let mut rng = crate::testutil::Rng::seeded(7);
        for _ in 0..400 {
            let mut text = String::new();
            for _ in 0..24 {
                text.push_str(PIECES[(rng.next_u64() % PIECES.len() as u64) as usize]);
            }
            for format in formats {
                for mode in [Mode::Auto, Mode::Forced { named: false }] {
                    let r = reader_for(mode, format);
                    let done = r.parse(&text);
                    assert!(done.head <= text.len());
                    for (cut, _) in text.char_indices() {
                        let part = &text[..cut];
                        r.parse(part);
                        r.partial(part);
                        assert!(r.releasable(part, true) <= part.len());
                    }
                    for (p, d) in r.partial(&text).iter().zip(&done.calls) {
                        assert!(d.arguments.starts_with(&p.arguments) || p.name != d.name);
                    }
                }
            }
        }
    }

    #[test]
    fn forced_calls_take_the_arguments_of_the_function_they_name() {
        let tool = |name: &str, params: &str| {
            let t = format!(
                r#"{{"type": "function", "function": {{"name": "{name}", "parameters": {params}}}}}"#
            );
            serde_json::from_str::<JVal>(&t).unwrap()
        };
        let weather = tool(
            "get_weather",
            r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#,
        );
        let add = tool(
            "add",
            r#"{"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}"#,
        );
        // Keywords outside the subset: that function's arguments are any object.
        let free = tool(
            "free",
            r#"{"type": "object", "properties": {"s": {"type": "string", "pattern": "x"}}}"#,
        );
        // Pydantic's nested models: `$defs` and references to them, in two functions with a model of the same name.
        let order = tool(
            "order",
            r##"{"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                "$defs": {"Item": {"type": "object", "properties": {"size": {"$ref": "#/$defs/Size"}}, "required": ["size"]},
                          "Size": {"enum": ["S", "L"]}}}"##,
        );
        let ship = tool(
            "ship",
            r##"{"type": "object", "properties": {"item": {"$ref": "#/definitions/Item"}}, "required": ["item"],
                "definitions": {"Item": {"type": "object", "properties": {"kg": {"type": "number"}}, "required": ["kg"]}}}"##,
        );
        let tools = [&weather, &add, &free, &order, &ship];
        let accepts = |f: &JsonFormat, text: &str| match f {
            JsonFormat::Schema(s) => SchemaState::new().accepts(s, text.as_bytes()),
            JsonFormat::Object => panic!("not compiled"),
        };
        let one = call_schema(&tools, "arguments", None);
        for ok in [
            r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#,
            r#"{"name": "add", "arguments": {"a": 1, "b": 2}}"#,
            r#"{"name": "free", "arguments": {"anything": [1]}}"#,
            r#"{"name": "order", "arguments": {"item": {"size": "L"}}}"#,
            r#"{"name": "ship", "arguments": {"item": {"kg": 2.5}}}"#,
        ] {
            assert!(accepts(&one, ok), "{ok}");
        }
        for bad in [
            r#"{"name": "get_weather", "arguments": {"a""#,
            r#"{"name": "add", "arguments": {"city""#,
            r#"{"name": "add", "arguments": {"a": "1""#,
            r#"{"name": "other""#,
            r#"[{"name""#,
            r#"{"name": "order", "arguments": {"item": {"size": "M""#,
            r#"{"name": "order", "arguments": {"item": {"kg""#,
            r#"{"name": "ship", "arguments": {"item": {"size""#,
        ] {
            assert!(!accepts(&one, bad), "{bad}");
        }
        let list = call_schema(&tools, "parameters", Some(false));
        assert!(accepts(
            &list,
            r#"[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "P"}}]"#
        ));
        assert!(!accepts(&list, r#"[{"name": "add", "parameters": {"city""#));
        assert!(!accepts(&list, "[]"));
        // Many functions (an agent's tool set): still each its own arguments.
        let many: Vec<JVal> = (0..150)
            .map(|i| {
                let p = format!(r#"{{"type": "object", "properties": {{"n{i}": {{"type": "integer"}}}}, "required": ["n{i}"]}}"#);
                tool(&format!("tool_{i}"), &p)
            })
            .collect();
        let many = call_schema(&many.iter().collect::<Vec<_>>(), "arguments", None);
        assert!(accepts(
            &many,
            r#"{"name": "tool_120", "arguments": {"n120": 7}}"#
        ));
        assert!(!accepts(
            &many,
            r#"{"name": "tool_120", "arguments": {"n12""#
        ));
        assert!(!accepts(&many, r#"{"name": "tool_150""#));
    }

    #[test]
    fn xml_calls_take_their_values_by_the_parameter_types() {
        let r = reader_for(Mode::Auto, Format::Xml);
        let p = r.parse("Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n 3 \n</parameter>\n<parameter=hourly>\nTrue\n</parameter>\n<parameter=at>\n{\"lat\": 1.5, \"lon\": -2}\n</parameter>\n<parameter=note>\n42\n</parameter>\n</function>\n</tool_call>");
        assert_eq!(p.content.as_deref(), Some("Sure.\n"));
        assert_eq!(
            p.calls,
            [call(
                "get_weather",
                r#"{"city":"New York","days":3,"hourly":true,"at":{"lat":1.5,"lon":-2},"note":"42"}"#
            )]
        );
        // A value that is not its type stays text; multi-line text keeps its inner lines.
        let p = r.parse("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=city>\na\n\nb\n</parameter>\n</function>");
        assert_eq!(
            p.calls,
            [call("get_weather", r#"{"days":"three","city":"a\n\nb"}"#)]
        );
        // Not calls: an undefined function, text inside the function element, words after the calls.
        for t in [
            "<tool_call>\n<function=zed>\n</function>\n</tool_call>",
            "<tool_call>\n<function=a>\nhello\n</function>\n</tool_call>",
            "<tool_call>\n<function=a>\n</function>\n</tool_call> and more",
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>",
        ] {
            assert!(r.parse(t).calls.is_empty(), "{t}");
        }
    }

    /// Random calls drawn under the XML grammar of `auto` calls (each step a byte or a longer piece the grammar takes,
    /// as tokens come) never get stuck, and each whole one reads back as one call to a defined function with the
    /// arguments its `parameters` schema accepts.
    #[test]
    fn random_xml_calls_under_the_grammar_read_back_as_valid_calls() {
        use crate::engine::xml_call::XmlState;
        let tools: Vec<JVal> = serde_json::from_str(
            r##"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                  "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["c", "celsius", "f"]},
                    "hourly": {"type": "boolean"}, "at": {"type": ["number", "null"]},
                    "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}},
                  "required": ["city", "unit"], "$defs": {"tag": {"enum": ["rain", "sun"]}}}}},
                 {"type": "function", "function": {"name": "get", "parameters": {"type": "object",
                  "properties": {"x": {"type": "object", "properties": {"y": {"type": "integer"},
                    "s": {"type": "string"}}}}}}},
                 {"type": "function", "function": {"name": "ping"}}]"##,
        )
        .unwrap();
        let refs: Vec<&JVal> = tools.iter().collect();
        let lazy = Format::Xml.lazy(&refs, true).unwrap();
        let (xml, markers) = (lazy.xml.unwrap(), lazy.markers);
        assert_eq!(markers, [OPEN]);
        let reader = Reader {
            mode: Mode::Auto,
            format: Format::Xml,
            parallel: true,
            names: refs
                .iter()
                .filter_map(|t| fn_name(t))
                .map(String::from)
                .collect(),
            types: refs.iter().filter_map(|t| param_types(t)).collect(),
        };
        // Every byte of the names and values as a piece of its own, as byte-level vocabularies have them.
        let bytes = "abcdefghijklmnopqrstuvwxyz_0123456789<>/=\n \"{}[]:,.-";
        let pieces: Vec<&str> = (0..bytes.len())
            .map(|i| &bytes[i..i + 1])
            .chain([
                "</",
                "<function=",
                "get",
                "_weather",
                "ping",
                "<parameter=",
                "city",
                "days",
                "unit",
                "hourly",
                "at",
                "tags",
                "celsius",
                "true",
                "false",
                "null",
                "\"y\"",
                "\"s\"",
                "\"rain\"",
                "\"sun\"",
                "</parameter>",
                "</function>",
                "</tool_call>",
                "Oslo",
                "\n</parameter>\n",
            ])
            .collect();
        let (mut rng, mut whole) = (0x2545_f491_4f6c_dd1du64, 0);
        for _ in 0..400 {
            let (mut st, mut text) = (XmlState::new(), String::new());
            while text.len() < 400 && !st.done() {
                let ok: Vec<&str> = pieces
                    .iter()
                    .copied()
                    .filter(|p| st.accepts(&xml, p.as_bytes()))
                    .collect();
                assert!(!ok.is_empty(), "stuck after {text:?}");
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let p = ok[(rng % ok.len() as u64) as usize];
                assert!(p.bytes().all(|b| st.step(&xml, b)));
                text += p;
            }
            if !st.done() {
                continue;
            }
            whole += 1;
            let answer = format!("{OPEN}\n{text}\n{CLOSE}");
            let calls = reader.parse(&answer).calls;
            assert_eq!(calls.len(), 1, "{answer:?}");
            let f = refs
                .iter()
                .find(|t| fn_name(t) == Some(&calls[0].name))
                .unwrap();
            let params = f
                .get("function")
                .and_then(|f| f.get("parameters"))
                .cloned()
                .unwrap_or_else(|| {
                    serde_json::from_str(r#"{"type": "object", "properties": {}}"#).unwrap()
                });
            let schema = Schema::compile(&params).unwrap();
            // The arguments' members as written (compact JSON), put in the schema's key order (the XML grammar
            // takes any order; the schema reader one).
            let args = &calls[0].arguments;
            let (mut kv, mut at) = (Vec::new(), 1);
            while at < args.len() - 1 {
                let k = scan::value_len(&args[at..]).unwrap();
                let v = scan::value_len(&args[at + k + 1..]).unwrap();
                kv.push((&args[at..at + k], &args[at + k + 1..at + k + 1 + v]));
                at += k + 1 + v + 1;
            }
            let order: Vec<String> = match params.get("properties") {
                Some(JVal::Obj(ps)) => ps.iter().map(|(k, _)| format!("\"{k}\"")).collect(),
                _ => Vec::new(),
            };
            kv.sort_by_key(|(k, _)| order.iter().position(|o| o == k));
            let members: Vec<String> = kv.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let ordered = format!("{{{}}}", members.join(","));
            let mut st = SchemaState::new();
            assert!(
                ordered.bytes().all(|b| st.step(&schema, b)) && st.done(),
                "{answer:?} → {ordered}"
            );
        }
        assert!(whole >= 100, "only {whole} whole calls");
    }

    /// The calls a Qwen3-Coder-style template writes into an assistant turn (its tool-call part, as the model's
    /// template writes it: each argument an XML element, mappings and lists as JSON, other values as text) read back
    /// as those calls.
    #[test]
    fn xml_calls_a_template_writes_read_back() {
        let src = r#"{%- for message in messages %}{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{%- set tool_call = tool_call.function %}
{{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
{%- for args_name, args_value in tool_call.arguments|items %}
{{- '<parameter=' + args_name + '>\n' }}
{%- if args_value is mapping or (args_value is sequence and args_value is not string) %}{{- args_value | tojson }}{%- else %}{{- args_value | string }}{%- endif %}
{{- '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}{%- endif %}{%- endfor %}"#;
        let t = ChatTemplate::from_source(src, "", "", false, false).unwrap();
        let args = r#"{"city": "Paris", "days": 3, "hourly": false, "at": {"lat": 1.5, "tags": ["a", "b"]}}"#;
        let mut m = crate::tokenizer::chat::ChatMessage::new("assistant", "");
        m.tool_calls = vec![
            crate::tokenizer::chat::ToolCall {
                id: Some("c1".into()),
                name: "get_weather".into(),
                arguments: serde_json::from_str(args).unwrap(),
            },
            crate::tokenizer::chat::ToolCall {
                id: Some("c2".into()),
                name: "a".into(),
                arguments: serde_json::from_str("{}").unwrap(),
            },
        ];
        let text = t.render_with(&[m], &[], &[], false).unwrap();
        let r = reader_for(Mode::Auto, Format::Xml);
        assert_eq!(
            r.parse(&text).calls,
            [call("get_weather", &compact(args)), call("a", "{}")],
            "{text}"
        );
    }

    #[test]
    fn call_ids_differ() {
        let (a, b) = (call_id(), call_id());
        assert_ne!(a, b);
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
        let ids: Vec<String> = (0..1000).map(|_| short_call_id()).collect();
        for id in &ids {
            assert!(
                id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{id}"
            );
        }
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), ids.len());
    }

    #[test]
    fn templates_name_their_call_format() {
        let hermes = "{{- '<tool_call>\\n' }}{% for tool in tools %}";
        assert_eq!(Format::of(hermes), Some(Format::Hermes));
        let nemo =
            "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}{% endif %}{{ '[TOOL_CALLS][' }}";
        assert_eq!(
            Format::of(nemo),
            Some(Format::List {
                marker: MISTRAL_CALLS
            })
        );
        let small = "{{ '[TOOL_CALLS]' + call.name + '[CALL_ID]' + id + '[ARGS]' + args }}";
        assert_eq!(Format::of(small), Some(Format::MistralArgs));
        // Qwen3-Coder writes `<tool_call>` too, with XML inside.
        let coder = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}{{- '<parameter=' + args_name + '>\\n' }}";
        assert_eq!(Format::of(coder), Some(Format::Xml));
        let granite = "please use <|tool_call|> followed by a list";
        assert_eq!(
            Format::of(granite),
            Some(Format::List {
                marker: GRANITE_CALLS
            })
        );
        let llama = "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}";
        assert_eq!(Format::of(llama), Some(Format::Llama3));
        assert_eq!(Format::of("<｜tool▁calls▁begin｜>{{ tools }}"), None);
    }

    #[test]
    fn llama3_and_mistral_answers_split_into_text_and_calls() {
        let weather = call("get_weather", "{\"city\":\"Zürich\",\"unit\":\"celsius\"}");
        // Llama 3.x: a bare object with "parameters", maybe after <|python_tag|>.
        let m = reader_for(Mode::Auto, Format::Llama3);
        for t in [
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}",
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}",
        ] {
            let p = m.parse(t);
            assert_eq!((p.content, p.calls), (None, vec![weather.clone()]), "{t}");
        }
        let p = m.parse("Checking.<|python_tag|>{\"name\": \"a\", \"parameters\": {}}");
        assert_eq!(p.content.as_deref(), Some("Checking."));
        assert_eq!(p.calls, vec![call("a", "{}")]);
        for t in [
            "It is sunny.",
            "{\"name\": \"zed\", \"parameters\": {}}",
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>",
            "<|python_tag|>brave_search.call(query=\"x\")",
        ] {
            assert_eq!(m.parse(t).calls, vec![], "{t}");
        }
        // Mistral Nemo: [TOOL_CALLS] and a JSON list (the model may write an id: a new one is given anyway).
        let m = reader_for(
            Mode::Auto,
            Format::List {
                marker: MISTRAL_CALLS,
            },
        );
        let p = m.parse("[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}, \"id\": \"abc123XYZ\"}, {\"name\": \"b\", \"arguments\": {}}]");
        assert_eq!(
            (p.content, p.calls),
            (None, vec![weather.clone(), call("b", "{}")])
        );
        let p = m.parse("Sure. [TOOL_CALLS][{\"name\": \"a\", \"arguments\": {}}]");
        assert_eq!(p.content.as_deref(), Some("Sure. "));
        assert_eq!(p.head, "Sure. ".len());
        for t in [
            "{\"name\": \"a\", \"arguments\": {}}",
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {}}] and",
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": [1]}]",
            "[TOOL_CALLS][{\"name\": \"a\"",
        ] {
            let p = m.parse(t);
            assert_eq!((p.calls, p.content.as_deref()), (vec![], Some(t)), "{t}");
        }
        let calls = m.calls_json(&[call("a", "{}")]);
        let id = calls[0]["id"].as_str().unwrap();
        assert!(id.len() == 9, "{id}");
        // Granite: <|tool_call|> and a list.
        let g = reader_for(
            Mode::Auto,
            Format::List {
                marker: GRANITE_CALLS,
            },
        );
        assert_eq!(
            g.parse("<|tool_call|>[{\"name\": \"a\", \"arguments\": {\"x\": 1}}]")
                .calls,
            vec![call("a", "{\"x\":1}")]
        );
        assert!(g.calls_json(&[call("a", "{}")])[0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_"));
        // Mistral v11: [TOOL_CALLS]name[ARGS]{...}, a [CALL_ID] maybe between, once per call.
        let m = reader_for(Mode::Auto, Format::MistralArgs);
        let p = m.parse("[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Zürich\", \"unit\": \"celsius\"}[TOOL_CALLS]b[CALL_ID]abc123XYZ[ARGS]{}");
        assert_eq!((p.content, p.calls), (None, vec![weather, call("b", "{}")]));
        for t in [
            "[TOOL_CALLS]get weather[ARGS]{}",
            "[TOOL_CALLS]a[ARGS]{} then",
            "[TOOL_CALLS]a{}",
            "[TOOL_CALLS]a[ARGS][1]",
        ] {
            assert_eq!(m.parse(t).calls, vec![], "{t}");
        }
        // Streaming holds text back from each format's marker; only the bare formats hold a leading '{'.
        assert_eq!(m.releasable("Hi [TOOL_", true), 3);
        assert_eq!(m.releasable("Hi [TOOL_CALLS]a", false), 3);
        assert_eq!(m.releasable("{\"a\": 1}", true), 8);
        assert_eq!(g.releasable("x <|tool", true), 2);
        let l = reader_for(Mode::Auto, Format::Llama3);
        assert_eq!(l.releasable("{\"name", true), 0);
        assert_eq!(l.releasable("So <|python", false), 3);
    }
}
