//! Qwen3-Coder's XML tool calls as a grammar read byte by byte, so a lazily constrained answer
//! ([`super::json_lazy`]) can decode the calls it begins under the tools' definitions:
//!
//! ```text
//! <function=get_weather>
//! <parameter=city>
//! San Francisco
//! </parameter>
//! <parameter=days>
//! 3
//! </parameter>
//! </function>
//! ```
//!
//! After the call's marker (`<tool_call>`) only whitespace and `<function=` may come, then one of the functions'
//! names and `>`; then parameter elements, each of a parameter that function defines and the call has not given yet,
//! until `</function>` closes the call once every required parameter is given. A value is read by what its
//! parameter's declared types make of it when the call is read back (`serve::tools`, as vLLM's `qwen3_coder` parser
//! converts it): a string parameter's value is any text without `</parameter>` or `</tool_call>` (one of its `enum`
//! texts when it has them), any other parameter's a JSON value its schema accepts, whitespace around it. `</tool_call>` after the
//! function element is left to the free text that follows, as the JSON formats leave their closing markers.

use super::json::WsRun;
use super::json_schema::{narrow, JVal, Schema, SchemaState};

/// Most parameters a function may define for its calls to be read by the grammar (one bit each).
pub const MAX_PARAMS: usize = 64;
/// Most functions.
pub const MAX_FUNCTIONS: usize = u16::MAX as usize;
/// Longest function or parameter name, in bytes.
pub const MAX_NAME: usize = 255;

const FUNCTION: &[u8] = b"<function=";
const PARAMETER: &[u8] = b"<parameter=";
const PARAMETER_END: &[u8] = b"</parameter>";
const FUNCTION_END: &[u8] = b"</function>";
/// Never inside a text value: the reader (as vLLM's) takes a call to end at the first one.
const CALL_END: &[u8] = b"</tool_call>";

/// How a parameter's value is written.
#[derive(Debug)]
enum Value {
    /// Any text without `</parameter>` or `</tool_call>` (a string parameter: the text is its value).
    Text,
    /// One of these texts, sorted (a string parameter's `enum`), maybe a line break before and after.
    OneOf(Vec<Vec<u8>>),
    /// A JSON value its schema accepts (numbers, booleans, objects, arrays: the text is parsed), whitespace around.
    Json(Schema),
}

#[derive(Debug)]
struct Param {
    name: Vec<u8>,
    value: Value,
}

#[derive(Debug)]
struct Function {
    name: Vec<u8>,
    /// Sorted by name.
    params: Vec<Param>,
    /// Bits of the parameters a call must give.
    required: u64,
}

/// The calls a request's tools allow, compiled once per request.
#[derive(Debug)]
pub struct XmlCalls {
    /// Sorted by name.
    fns: Vec<Function>,
    /// The function names, as [`narrow`] takes them.
    names: Vec<Vec<u8>>,
}

impl XmlCalls {
    /// The grammar of calls to these functions (each a name and its `parameters` schema, if any). An error names what
    /// the grammar cannot hold (too many functions or parameters, a name with `>` or past [`MAX_NAME`] bytes, two
    /// functions of one name); a parameter whose schema hayloft's JSON-schema subset does not take gets any text.
    pub fn compile(functions: &[(&str, Option<&JVal>)]) -> Result<XmlCalls, String> {
        if functions.len() > MAX_FUNCTIONS {
            return Err(format!("more than {MAX_FUNCTIONS} functions"));
        }
        let mut fns = functions
            .iter()
            .map(|&(name, params)| function(name, params))
            .collect::<Result<Vec<_>, _>>()?;
        fns.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = fns.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(format!(
                "two functions named {}",
                String::from_utf8_lossy(&w[0].name)
            ));
        }
        let names = fns.iter().map(|f| f.name.clone()).collect();
        Ok(XmlCalls { fns, names })
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains(['>', '<']) {
        return Err(format!(
            "{what} name {name:?}: empty, longer than {MAX_NAME} bytes, or holds `<` or `>`"
        ));
    }
    Ok(())
}

fn function(name: &str, params: Option<&JVal>) -> Result<Function, String> {
    check_name("function", name)?;
    let props = match params.and_then(|p| p.get("properties")) {
        Some(JVal::Obj(kv)) => kv.as_slice(),
        _ => &[],
    };
    if props.len() > MAX_PARAMS {
        return Err(format!(
            "function {name}: more than {MAX_PARAMS} parameters"
        ));
    }
    // The parameters' own definitions, so a property's `$ref` resolves when it is compiled alone.
    let defs = params.and_then(|p| {
        ["$defs", "definitions"]
            .into_iter()
            .find_map(|k| p.get(k).map(|d| (k, d)))
    });
    let mut ps = Vec::with_capacity(props.len());
    for (key, schema) in props {
        check_name("parameter", key)?;
        ps.push(Param {
            name: key.as_bytes().to_vec(),
            value: value_of(schema, defs),
        });
    }
    ps.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = ps.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!(
            "function {name}: two parameters named {}",
            String::from_utf8_lossy(&w[0].name)
        ));
    }
    let mut required = 0u64;
    if let Some(JVal::Arr(req)) = params.and_then(|p| p.get("required")) {
        for r in req.iter().filter_map(JVal::as_str) {
            // A required name the properties do not define cannot be given: the schema is refused.
            let i = ps
                .iter()
                .position(|p| p.name == r.as_bytes())
                .ok_or_else(|| format!("function {name}: required parameter {r} is not defined"))?;
            required |= 1 << i;
        }
    }
    Ok(Function {
        name: name.as_bytes().to_vec(),
        params: ps,
        required,
    })
}

/// How a parameter's value is written, from its declared types (as the reader converts it): text for a string
/// parameter or one that declares no type, JSON otherwise (under its schema, or where hayloft's subset does not take
/// the schema, any value of its declared types).
fn value_of(schema: &JVal, defs: Option<(&str, &JVal)>) -> Value {
    let types: Vec<&str> = match schema.get("type") {
        Some(JVal::Str(s)) => vec![s.as_str()],
        Some(JVal::Arr(a)) => a.iter().filter_map(JVal::as_str).collect(),
        _ => Vec::new(),
    };
    if types.is_empty() || types.contains(&"string") {
        let only_strings = types.iter().all(|&t| t == "string");
        let texts = match schema.get("enum") {
            Some(JVal::Arr(e)) if only_strings && !e.is_empty() => e
                .iter()
                .map(|v| v.as_str().map(|s| s.as_bytes().to_vec()))
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        return match texts {
            // Texts the value's ends could be confused with are left to the free text.
            Some(mut t) if t.iter().all(|t| !t.contains(&b'<') && !t.contains(&b'\n')) => {
                t.sort();
                t.dedup();
                Value::OneOf(t)
            }
            _ => Value::Text,
        };
    }
    let with_defs = match (schema, defs) {
        (JVal::Obj(kv), Some((k, d))) if !kv.iter().any(|(key, _)| key == k) => {
            let mut kv = kv.clone();
            kv.push((k.to_string(), d.clone()));
            JVal::Obj(kv)
        }
        _ => schema.clone(),
    };
    // A schema with keywords the subset does not read (`minimum`, `format`, ...): a value of its declared types,
    // which the reader parses (wider than the schema, never narrower).
    let types_only = || {
        let tys = types.iter().map(|t| JVal::Str(t.to_string())).collect();
        Schema::compile(&JVal::Obj(vec![("type".into(), JVal::Arr(tys))]))
    };
    match Schema::compile(&with_defs).or_else(|_| types_only()) {
        Ok(s) => Value::Json(s),
        Err(_) => Value::Text,
    }
}

/// Which fixed text is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lit {
    /// `<function=`, then the name.
    Function,
    /// `<parameter=`, then the parameter's name.
    Parameter,
    /// `</parameter>` closing parameter p's value.
    ParameterEnd(u8),
    /// `</function>`: the call is whole.
    FunctionEnd,
}

impl Lit {
    fn text(self) -> &'static [u8] {
        match self {
            Lit::Function => FUNCTION,
            Lit::Parameter => PARAMETER,
            Lit::ParameterEnd(_) => PARAMETER_END,
            Lit::FunctionEnd => FUNCTION_END,
        }
    }
}

/// Where a call is.
#[derive(Clone, Copy, Debug)]
enum At {
    /// Before the function element: whitespace, then `<`.
    Lead,
    /// `n` bytes of a fixed text read.
    Lit { lit: Lit, n: u8 },
    /// The function's name: the functions [lo, hi) begin with the `n` bytes read.
    Name { lo: u16, hi: u16, n: u8 },
    /// Between parameter elements: whitespace, then `<`.
    Body,
    /// `<` in the body: `parameter=` or `/function>` next.
    Tag,
    /// A parameter's name: the parameters not given yet that begin with the `n` bytes read (bits).
    Key { cands: u64, n: u8 },
    /// Parameter p's text value; `n` bytes of `</parameter>` and `c` of `</tool_call>` read at its end so far.
    Text { p: u8, n: u8, c: u8 },
    /// Parameter p's value, one of its texts [lo, hi) that begin with the `n` bytes read (after a line break, `nl`).
    OneOf {
        p: u8,
        lo: u16,
        hi: u16,
        n: u8,
        nl: bool,
    },
    /// The line break after parameter p's whole text, then `</parameter>`.
    AfterValue { p: u8 },
    /// Parameter p's JSON value (read by [`XmlState::json`]); `n` bytes of `</parameter>` and `c` of
    /// `</tool_call>` read at its end so far (neither may come whole inside one of its strings: the reader would end
    /// the value there).
    Json { p: u8, n: u8, c: u8 },
    /// The call is whole: whitespace only.
    Done,
}

/// A prefix of one call, read byte by byte.
#[derive(Clone, Copy, Debug)]
pub struct XmlState {
    at: At,
    /// The function named (valid once its name is read).
    f: u16,
    /// Bits of the parameters given.
    seen: u64,
    ws: WsRun,
    /// The JSON value being read (valid in [`At::Json`]).
    json: SchemaState,
}

impl Default for XmlState {
    fn default() -> Self {
        Self::new()
    }
}

impl XmlState {
    pub fn new() -> Self {
        Self {
            at: At::Lead,
            f: 0,
            seen: 0,
            ws: WsRun::default(),
            json: SchemaState::new(),
        }
    }

    /// The function element is closed: nothing but whitespace may follow.
    pub fn done(&self) -> bool {
        matches!(self.at, At::Done)
    }

    /// Inside a text value with nothing of its end read: any token without `<` goes.
    pub fn in_text(&self) -> bool {
        matches!(self.at, At::Text { n: 0, c: 0, .. })
    }

    /// Inside a JSON string with no constraint on its text (as [`SchemaState::in_free_string`]) and nothing of
    /// `</parameter>` or `</tool_call>` read at its end: any token without a quote, a backslash, a control byte or
    /// `<` goes.
    pub fn in_free_string(&self) -> bool {
        matches!(self.at, At::Json { n: 0, c: 0, .. }) && self.json.in_free_string()
    }

    /// Whether these bytes can follow (the state is unchanged either way).
    pub fn accepts(&self, c: &XmlCalls, bytes: &[u8]) -> bool {
        let mut t = *self;
        bytes.iter().all(|&b| t.step(c, b))
    }

    fn to(&mut self, at: At) -> bool {
        self.at = at;
        self.ws = WsRun::default();
        true
    }

    /// Parameters of the named function not given yet.
    fn open_params(&self, c: &XmlCalls) -> u64 {
        let n = c.fns[self.f as usize].params.len();
        let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        all & !self.seen
    }

    /// Reads one byte; false (and the state then meaningless) if the text stops being a prefix of a call.
    pub fn step(&mut self, c: &XmlCalls, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.at {
            At::Lead | At::Body | At::Done if ws => self.ws.take(b),
            At::Lead => {
                b == b'<'
                    && self.to(At::Lit {
                        lit: Lit::Function,
                        n: 1,
                    })
            }
            At::Body => b == b'<' && self.to(At::Tag),
            At::AfterValue { p } => {
                b == b'<'
                    && self.to(At::Lit {
                        lit: Lit::ParameterEnd(p),
                        n: 1,
                    })
            }
            At::Done => false,
            At::Tag => match b {
                b'p' if self.open_params(c) != 0 => self.to(At::Lit {
                    lit: Lit::Parameter,
                    n: 2,
                }),
                b'/' if c.fns[self.f as usize].required & !self.seen == 0 => self.to(At::Lit {
                    lit: Lit::FunctionEnd,
                    n: 2,
                }),
                _ => false,
            },
            At::Lit { lit, n } => {
                let text = lit.text();
                if text[n as usize] != b {
                    return false;
                }
                if (n as usize) + 1 < text.len() {
                    return self.to(At::Lit { lit, n: n + 1 });
                }
                match lit {
                    Lit::Function => self.to(At::Name {
                        lo: 0,
                        hi: c.fns.len() as u16,
                        n: 0,
                    }),
                    Lit::Parameter => {
                        let cands = self.open_params(c);
                        self.to(At::Key { cands, n: 0 })
                    }
                    Lit::ParameterEnd(p) => {
                        self.seen |= 1 << p;
                        self.to(At::Body)
                    }
                    Lit::FunctionEnd => self.to(At::Done),
                }
            }
            At::Name { lo, hi, n } => {
                let (lo, hi) = (lo as usize, hi as usize);
                if b == b'>' && c.names[lo].len() == n as usize {
                    self.f = lo as u16;
                    self.seen = 0;
                    return self.to(At::Body);
                }
                let (lo, hi) = narrow(&c.names, lo, hi, n as usize, b);
                lo < hi
                    && self.to(At::Name {
                        lo: lo as u16,
                        hi: hi as u16,
                        n: n + 1,
                    })
            }
            At::Key { cands, n } => {
                let params = &c.fns[self.f as usize].params;
                let n = n as usize;
                if b == b'>' {
                    let Some(p) = bits(cands).find(|&p| params[p].name.len() == n) else {
                        return false;
                    };
                    let p = p as u8;
                    let at = match &params[p as usize].value {
                        Value::Text => At::Text { p, n: 0, c: 0 },
                        Value::OneOf(t) => At::OneOf {
                            p,
                            lo: 0,
                            hi: t.len() as u16,
                            n: 0,
                            nl: false,
                        },
                        Value::Json(_) => At::Json { p, n: 0, c: 0 },
                    };
                    self.json = SchemaState::new();
                    return self.to(at);
                }
                let cands = bits(cands)
                    .filter(|&p| params[p].name.get(n) == Some(&b))
                    .fold(0u64, |m, p| m | 1 << p);
                cands != 0
                    && self.to(At::Key {
                        cands,
                        n: (n + 1) as u8,
                    })
            }
            At::Text { p, n, c } => {
                let (n, c) = (matched(PARAMETER_END, n, b), matched(CALL_END, c, b));
                if n as usize == PARAMETER_END.len() {
                    self.seen |= 1 << p;
                    return self.to(At::Body);
                }
                self.at = At::Text { p, n, c };
                c as usize != CALL_END.len()
            }
            At::OneOf { p, lo, hi, n, nl } => {
                let Value::OneOf(texts) = &c.fns[self.f as usize].params[p as usize].value else {
                    return false;
                };
                if n == 0 && !nl && b == b'\n' {
                    self.at = At::OneOf {
                        p,
                        lo,
                        hi,
                        n,
                        nl: true,
                    };
                    return true;
                }
                let whole = texts[lo as usize].len() == n as usize;
                // One line break around the text, as the reader takes off (more would be part of the value).
                if whole && b == b'\n' {
                    return self.to(At::AfterValue { p });
                }
                if whole && b == b'<' {
                    return self.to(At::Lit {
                        lit: Lit::ParameterEnd(p),
                        n: 1,
                    });
                }
                let (lo, hi) = narrow(texts, lo as usize, hi as usize, n as usize, b);
                if lo == hi {
                    return false;
                }
                self.at = At::OneOf {
                    p,
                    lo: lo as u16,
                    hi: hi as u16,
                    n: n + 1,
                    nl,
                };
                true
            }
            At::Json { p, n, c: k } => {
                let Value::Json(schema) = &c.fns[self.f as usize].params[p as usize].value else {
                    return false;
                };
                let s = self.json;
                if self.json.step(schema, b) {
                    let (n, k) = (matched(PARAMETER_END, n, b), matched(CALL_END, k, b));
                    self.at = At::Json { p, n, c: k };
                    return (n as usize) < PARAMETER_END.len() && (k as usize) < CALL_END.len();
                }
                // `<` ends a whole value (a number is whole once a byte that cannot continue it comes).
                let mut t = s;
                b == b'<'
                    && (s.done() || t.step(schema, b' ') && t.done())
                    && self.to(At::Lit {
                        lit: Lit::ParameterEnd(p),
                        n: 1,
                    })
            }
        }
    }
}

/// Bytes of `text` (`</parameter>` or `</tool_call>`: `<` first and nowhere else) matched after byte `b`, `n`
/// before it: a byte that breaks a match starts a new one only if it is `<`.
fn matched(text: &[u8], n: u8, b: u8) -> u8 {
    match text[n as usize] == b {
        true => n + 1,
        false => (b == b'<') as u8,
    }
}

/// The set bits of `m`, lowest first.
fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let i = m.trailing_zeros() as usize;
        m &= m - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> XmlCalls {
        let weather: JVal = serde_json::from_str(
            r##"{"type": "object", "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"type": "string", "enum": ["fahrenheit", "celsius", "c"]},
                "detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}}, "required": ["hourly"]},
                "note": {"type": "object", "properties": {"s": {"type": "string"}}},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}},
              "required": ["city"], "$defs": {"tag": {"type": "string", "enum": ["rain", "sun"]}}}"##,
        )
        .unwrap();
        let ping: JVal = serde_json::from_str(r#"{"type": "object", "properties": {}}"#).unwrap();
        XmlCalls::compile(&[
            ("get_weather", Some(&weather)),
            ("get", None),
            ("ping", Some(&ping)),
        ])
        .unwrap()
    }

    fn reads(c: &XmlCalls, text: &str) -> Option<XmlState> {
        let mut s = XmlState::new();
        text.bytes().all(|b| s.step(c, b)).then_some(s)
    }

    #[test]
    fn whole_calls_and_each_of_their_prefixes_read() {
        let c = tools();
        for call in [
            "\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>",
            "<function=get_weather><parameter=unit>celsius</parameter><parameter=city>Oslo</parameter></function>\n",
            "<function=get_weather>\n<parameter=unit>\nc\n</parameter>\n<parameter=city>\na < b </param </parameter\n</parameter>\n</function>",
            "<function=get_weather>\n<parameter=detail>\n{\"hourly\": true}\n</parameter>\n<parameter=tags>\n[\"rain\"]\n</parameter>\n<parameter=city>\n\n</parameter>\n</function>",
            "<function=get>\n</function>",
            "<function=ping></function>",
            "<function=get_weather><parameter=note>{\"s\": \"a</parameter </tool_call\"}</parameter><parameter=city>x</parameter></function>",
        ] {
            let s = reads(&c, call).unwrap_or_else(|| panic!("{call:?}"));
            assert!(s.done(), "{call:?}");
            // Every prefix before the closing tag's last byte is a call not yet whole.
            let close = call.rfind(">").unwrap();
            for end in 0..close {
                let s = reads(&c, &call[..end]).unwrap_or_else(|| panic!("{:?}", &call[..end]));
                assert!(!s.done(), "{:?}", &call[..end]);
            }
        }
    }

    #[test]
    fn what_the_tools_do_not_define_is_refused() {
        let c = tools();
        for bad in [
            "x",
            "<function=get_weathers>",
            "<function=set>",
            "<function=get_weather>\n</function>", // city is required
            "<function=get_weather>\n<parameter=town>",
            "<function=get_weather>\n<parameter=city>\nA\n</parameter>\n<parameter=city>",
            "<function=get_weather>\n<parameter=days>\nthree",
            "<function=get_weather>\n<parameter=days>\n3.5",
            "<function=get_weather>\n<parameter=days>\n</parameter>",
            "<function=get_weather>\n<parameter=unit>\nkelvin",
            "<function=get_weather>\n<parameter=unit>\ncelsius!",
            "<function=get_weather>\n<parameter=unit>\ncelsius ",
            "<function=get_weather>\n<parameter=unit>\ncelsius\n\n",
            "<function=get_weather>\n<parameter=unit>\n\ncelsius",
            "<function=get_weather>\n<parameter=unit>\n</parameter>",
            "<function=get_weather>\n<parameter=tags>\n[\"snow\"]",
            "<function=get_weather>\n<parameter=detail>\n{}\n</parameter>",
            "<function=get>\n<parameter=",
            "<function=ping>\n<p",
            "<function=get>\n</function>x",
            "<function=get_weather>\n<parameter=city>\nA</tool_call>",
            "<function=get_weather>\n<parameter=note>\n{\"s\": \"a</parameter>",
            "<function=get_weather>\n<parameter=note>\n{\"s\": \"a</tool_call>",
        ] {
            assert!(reads(&c, bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_schema_the_subset_does_not_read_still_types_its_value() {
        let days: JVal = serde_json::from_str(r#"{"type": "integer", "minimum": 1}"#).unwrap();
        assert!(Schema::compile(&days).is_err());
        assert!(matches!(value_of(&days, None), Value::Json(_)));
        let free: JVal = serde_json::from_str(r#"{"type": "string", "format": "date"}"#).unwrap();
        assert!(matches!(value_of(&free, None), Value::Text));
    }

    #[test]
    fn a_tool_set_the_grammar_cannot_hold_is_refused_by_name() {
        let params: JVal =
            serde_json::from_str(r#"{"properties": {"a": {}}, "required": ["b"]}"#).unwrap();
        let e = XmlCalls::compile(&[("f", Some(&params))]).unwrap_err();
        assert!(e.contains("required parameter b"), "{e}");
        let e = XmlCalls::compile(&[("f", None), ("f", None)]).unwrap_err();
        assert!(e.contains("two functions named f"), "{e}");
        let e = XmlCalls::compile(&[("a>b", None)]).unwrap_err();
        assert!(e.contains("\"a>b\""), "{e}");
        let many = (0..65)
            .map(|i| (format!("p{i}"), JVal::Obj(Vec::new())))
            .collect();
        let params = JVal::Obj(vec![("properties".into(), JVal::Obj(many))]);
        let e = XmlCalls::compile(&[("f", Some(&params))]).unwrap_err();
        assert!(e.contains("more than 64 parameters"), "{e}");
    }
}
