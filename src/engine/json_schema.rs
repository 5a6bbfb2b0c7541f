//! JSON mode with a schema: decoding constrained so that the text is always the beginning of a JSON value the schema
//! accepts (OpenAI's `response_format: {"type": "json_schema", ...}`, llama.cpp's `--json-schema`).
//!
//! A schema is compiled once into a small graph of [`Node`]s; [`SchemaState`] then reads the text byte by byte with a
//! fixed stack of frames (`Copy`, no allocation), the way [`super::json::JsonState`] reads a plain object, with the
//! same whitespace and number limits. What it supports, and how it narrows a schema (every text it lets through is
//! valid against the schema; not every valid text can be produced):
//! - `type` (one or a list), `properties` with `required`: keys come in the order the schema lists them, each at most
//!   once, a required one never skipped; no other keys are produced (`additionalProperties` may be `false` or absent;
//!   a schema that allows extra keys is refused rather than narrowed silently — `true` or a schema there). An object
//!   without `properties` is any JSON object.
//! - `items`, `minItems`, `maxItems`; `enum` and `const` (any JSON values, written compactly); `boolean`, `null`,
//!   `string` (any string), `number`, `integer` (no fraction or exponent).
//! - `anyOf` / `oneOf` and type lists whose alternatives start with different bytes (a string or null, an object or
//!   an array, ...): the first byte picks the alternative. Objects among the alternatives may also be told apart by
//!   their first property: by its value (a discriminator: the same required key first in each, a `const` or `enum`
//!   value that no other alternative shares), as OpenAI's structured outputs write tagged unions and as a tool
//!   call's `{"name": ..., "arguments": ...}` is one object per function, or by its key (each alternative's first
//!   property required, no two with the same key: `{"url": ...}` or `{"file": ...}`); the object is read as the
//!   alternative that value or key names. Other alternatives that could start alike are refused.
//! - `$ref` to `#/$defs/NAME` or `#/definitions/NAME` (recursion allowed), nesting at most [`MAX_FRAMES`] deep.
//! - `title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment` are ignored; any other keyword
//!   (`format`, `pattern`, `minLength`, `minimum`, ...) is refused with its name, as a constraint that would not be
//!   kept.

use std::collections::HashMap;

use serde_json::Value;

use super::json::{JsonState, Num, WsRun, MAX_NUMBER};
pub use crate::util::JVal;

/// Deepest stack of open values (objects, arrays and the value being read).
pub const MAX_FRAMES: usize = 12;
/// Most properties of one object.
pub const MAX_PROPERTIES: usize = 64;
/// Most alternatives of one `enum` (or values of a tagged union's first property over its alternatives: a forced
/// call over that many functions).
pub const MAX_ENUM: usize = 4096;

type NodeId = u16;

/// A compiled schema node.
#[derive(Clone, Debug)]
enum Node {
    /// Keys in this order, none other.
    Object(Vec<Prop>),
    /// Any JSON object.
    FreeObject,
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    Str,
    Number {
        int: bool,
    },
    /// One of these JSON texts (prefix-free, sorted: the texts that begin with what has been read are a range).
    Lit(Vec<Vec<u8>>),
    /// Alternatives with disjoint first bytes.
    Union(Vec<NodeId>),
    /// Objects told apart by their first property: read as an object of that one property (`tag`, whose value is a
    /// literal node holding every alternative's values) until its value is whole, then as `alts[owner[text]]` from its
    /// second property on.
    Tagged {
        tag: Prop,
        alts: Vec<NodeId>,
        owner: Vec<u16>,
    },
    /// Objects told apart by their first key: read as an object whose key is one of `heads` (alternative i's
    /// first property) until that key is whole, then as `alts[i]`.
    Keyed {
        heads: Vec<Prop>,
        alts: Vec<NodeId>,
    },
    /// A `$ref` not yet resolved (only while compiling).
    Ref(String),
}

#[derive(Clone, Debug)]
struct Prop {
    /// The key as it appears between the quotes (JSON-escaped).
    key: Vec<u8>,
    node: NodeId,
    required: bool,
}

/// A compiled schema.
#[derive(Clone, Debug)]
pub struct Schema {
    nodes: Vec<Node>,
    root: NodeId,
}

const IGNORED: [&str; 8] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "strict",
];

impl Schema {
    /// Compiles a JSON Schema; an error names the keyword or construct that is not supported.
    pub fn compile(v: &JVal) -> Result<Schema, String> {
        let mut c = Compiler {
            nodes: Vec::new(),
            defs: HashMap::new(),
            root: v,
        };
        let root = c.node(v, "#")?;
        // Resolve references (a chain of them to its end; a cycle of bare references is refused).
        for i in 0..c.nodes.len() {
            if let Node::Ref(name) = &c.nodes[i] {
                let mut seen = 0;
                let mut target = *c
                    .defs
                    .get(name)
                    .ok_or_else(|| format!("$ref {name}: not found"))?;
                while let Node::Ref(n) = &c.nodes[target as usize] {
                    seen += 1;
                    if seen > c.nodes.len() {
                        return Err(format!("$ref {name}: a cycle of references"));
                    }
                    target = c.defs[n];
                }
                c.nodes[i] = c.nodes[target as usize].clone();
            }
        }
        let s = Schema {
            nodes: c.nodes,
            root,
        };
        for (i, n) in s.nodes.iter().enumerate() {
            if let Node::Union(alts) = n {
                let mut seen = [false; 256];
                for &a in alts {
                    for b in 0..=255u8 {
                        if s.starts(a, b) {
                            if seen[b as usize] {
                                return Err(format!(
                                    "anyOf/oneOf/type list (node {i}): two alternatives can start with '{}'; only alternatives that start differently (e.g. a string or null) are supported",
                                    b.escape_ascii()
                                ));
                            }
                            seen[b as usize] = true;
                        }
                    }
                }
            }
        }
        Ok(s)
    }

    /// Whether a value of node `n` can start with byte `b`.
    fn starts(&self, n: NodeId, b: u8) -> bool {
        match &self.nodes[n as usize] {
            Node::Object(_) | Node::FreeObject | Node::Tagged { .. } | Node::Keyed { .. } => {
                b == b'{'
            }
            Node::Array { .. } => b == b'[',
            Node::Str => b == b'"',
            Node::Number { .. } => b == b'-' || b.is_ascii_digit(),
            Node::Lit(texts) => texts.iter().any(|t| t[0] == b),
            Node::Union(alts) => alts.iter().any(|&a| self.starts(a, b)),
            Node::Ref(_) => false,
        }
    }
}

struct Compiler<'v> {
    nodes: Vec<Node>,
    defs: HashMap<String, NodeId>,
    root: &'v JVal,
}

impl Compiler<'_> {
    fn push(&mut self, n: Node) -> Result<NodeId, String> {
        if let Node::Lit(t) = &n {
            assert!(t.windows(2).all(|w| w[0] < w[1]), "literal texts unsorted");
        }
        if self.nodes.len() >= NodeId::MAX as usize {
            return Err("the schema is too large".into());
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn node(&mut self, v: &JVal, at: &str) -> Result<NodeId, String> {
        let o = match v {
            JVal::Obj(_) => v,
            JVal::Bool(true) => return Err(format!("{at}: `true` (any value) is not supported")),
            _ => return Err(format!("{at}: a schema must be an object")),
        };
        let JVal::Obj(kv) = v else {
            return Err(format!("{at}: a schema must be an object"));
        };
        for (k, _) in kv {
            let known = [
                "type",
                "properties",
                "required",
                "additionalProperties",
                "items",
                "minItems",
                "maxItems",
                "enum",
                "const",
                "anyOf",
                "oneOf",
                "$ref",
                "$defs",
                "definitions",
            ];
            if !known.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) {
                return Err(format!("{at}: keyword `{k}` is not supported"));
            }
        }
        if let Some(r) = o.get("$ref") {
            let r = r.as_str().ok_or(format!("{at}: $ref must be a string"))?;
            return self.reference(r, at);
        }
        if let Some(JVal::Arr(vals)) = o.get("enum") {
            return self.literals(vals, at);
        }
        if o.get("enum").is_some() {
            return Err(format!("{at}: enum must be a list"));
        }
        if let Some(c) = o.get("const") {
            return self.literals(std::slice::from_ref(c), at);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = o.get(key) {
                let alts = match alts {
                    JVal::Arr(a) if !a.is_empty() => a,
                    _ => return Err(format!("{at}: {key} must be a non-empty list")),
                };
                let mut ids = Vec::new();
                for (i, a) in alts.iter().enumerate() {
                    ids.push(self.node(a, &format!("{at}/{key}/{i}"))?);
                }
                let ids = self.tag_objects(ids, &format!("{at}/{key}"))?;
                if let [one] = ids[..] {
                    return Ok(one);
                }
                return self.push(Node::Union(ids));
            }
        }
        match o.get("type") {
            Some(JVal::Str(t)) => self.typed(t, o, at),
            Some(JVal::Arr(ts)) if !ts.is_empty() => {
                let mut ids = Vec::new();
                for t in ts {
                    let t = t
                        .as_str()
                        .ok_or(format!("{at}: type list entries must be strings"))?;
                    ids.push(self.typed(t, o, at)?);
                }
                if ids.len() == 1 {
                    return Ok(ids[0]);
                }
                self.push(Node::Union(ids))
            }
            Some(_) => Err(format!("{at}: type must be a string or a list of strings")),
            None if o.get("properties").is_some() => self.typed("object", o, at),
            None => Err(format!(
                "{at}: a schema without `type`, `enum`, `const`, `anyOf` or `$ref` (any value) is not supported"
            )),
        }
    }

    /// A union's object alternatives (two or more) as one [`Node::Tagged`] when their first properties tell them
    /// apart; the other alternatives as they are. Objects that no first property tells apart are left for the
    /// union's check, which refuses them.
    fn tag_objects(&mut self, ids: Vec<NodeId>, at: &str) -> Result<Vec<NodeId>, String> {
        let objects: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|&i| matches!(self.nodes[i as usize], Node::Object(_)))
            .collect();
        if objects.len() < 2 {
            return Ok(ids);
        }
        let first = |n: &Node| match n {
            Node::Object(props) => props.first().filter(|p| p.required).cloned(),
            _ => None,
        };
        let Some(heads) = objects
            .iter()
            .map(|&o| first(&self.nodes[o as usize]))
            .collect::<Option<Vec<Prop>>>()
        else {
            return Ok(ids);
        };
        let tag = heads[0].clone();
        let distinct = heads
            .iter()
            .enumerate()
            .all(|(i, h)| heads[..i].iter().all(|g| g.key != h.key));
        if distinct && heads.len() <= 64 {
            let keyed = self.push(Node::Keyed {
                heads,
                alts: objects.clone(),
            })?;
            let mut out = vec![keyed];
            out.extend(ids.into_iter().filter(|i| !objects.contains(i)));
            return Ok(out);
        }
        let (mut texts, mut owner) = (Vec::new(), Vec::new());
        for (k, &o) in objects.iter().enumerate() {
            let Some(p) = first(&self.nodes[o as usize]).filter(|p| p.key == tag.key) else {
                return Ok(ids);
            };
            let Node::Lit(vals) = &self.nodes[p.node as usize] else {
                return Ok(ids);
            };
            for v in vals {
                if let Some(t) = texts
                    .iter()
                    .find(|t: &&Vec<u8>| t.starts_with(v) || v.starts_with(t))
                {
                    return Err(format!(
                        "{at}: alternatives whose first property `{}` can be both {} and {} cannot be told apart",
                        String::from_utf8_lossy(&tag.key),
                        String::from_utf8_lossy(t),
                        String::from_utf8_lossy(v)
                    ));
                }
                texts.push(v.clone());
                owner.push(k as u16);
            }
        }
        if texts.len() > MAX_ENUM {
            return Err(format!(
                "{at}: more than {MAX_ENUM} values of the first property `{}` over the alternatives",
                String::from_utf8_lossy(&tag.key)
            ));
        }
        let mut pairs: Vec<(Vec<u8>, u16)> = texts.into_iter().zip(owner).collect();
        pairs.sort();
        let (texts, owner) = pairs.into_iter().unzip();
        let lit = self.push(Node::Lit(texts))?;
        let tagged = self.push(Node::Tagged {
            tag: Prop {
                key: tag.key,
                node: lit,
                required: true,
            },
            alts: objects.clone(),
            owner,
        })?;
        let mut out = vec![tagged];
        out.extend(ids.into_iter().filter(|i| !objects.contains(i)));
        Ok(out)
    }

    fn reference(&mut self, r: &str, at: &str) -> Result<NodeId, String> {
        let name = r
            .strip_prefix("#/$defs/")
            .map(|n| ("$defs", n))
            .or_else(|| r.strip_prefix("#/definitions/").map(|n| ("definitions", n)));
        let Some((table, name)) = name else {
            return Err(format!(
                "{at}: $ref {r}: only #/$defs/NAME and #/definitions/NAME are supported"
            ));
        };
        if let Some(&id) = self.defs.get(r) {
            return Ok(id);
        }
        let target = self
            .root
            .get(table)
            .and_then(|t| t.get(name))
            .ok_or(format!("{at}: $ref {r}: not found"))?;
        // A placeholder first, so a recursive schema refers to itself.
        let id = self.push(Node::Ref(r.to_string()))?;
        self.defs.insert(r.to_string(), id);
        let body = self.node(target, r)?;
        self.defs.insert(r.to_string(), body);
        self.nodes[id as usize] = Node::Ref(r.to_string());
        Ok(body)
    }

    fn literals(&mut self, vals: &[JVal], at: &str) -> Result<NodeId, String> {
        if vals.is_empty() || vals.len() > MAX_ENUM {
            return Err(format!("{at}: enum needs 1 to {MAX_ENUM} values"));
        }
        let mut texts: Vec<Vec<u8>> = vals
            .iter()
            .map(|v| {
                let mut t = Vec::new();
                v.write(&mut t);
                t
            })
            .collect();
        texts.sort();
        texts.dedup();
        // Sorted, a text that begins another comes right before one that it begins.
        for w in texts.windows(2) {
            if w[1].starts_with(&w[0]) {
                return Err(format!(
                    "{at}: enum values {} and {} (one begins the other) are not supported",
                    String::from_utf8_lossy(&w[0]),
                    String::from_utf8_lossy(&w[1])
                ));
            }
        }
        self.push(Node::Lit(texts))
    }

    fn typed(&mut self, t: &str, o: &JVal, at: &str) -> Result<NodeId, String> {
        let count = |k: &str| -> Result<Option<u32>, String> {
            o.get(k)
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or(format!("{at}: {k} must be a count"))
                })
                .transpose()
        };
        match t {
            "string" => self.push(Node::Str),
            "number" => self.push(Node::Number { int: false }),
            "integer" => self.push(Node::Number { int: true }),
            "boolean" => self.push(Node::Lit(vec![b"false".to_vec(), b"true".to_vec()])),
            "null" => self.push(Node::Lit(vec![b"null".to_vec()])),
            "array" => {
                let items = match o.get("items") {
                    Some(i) => self.node(i, &format!("{at}/items"))?,
                    None => return Err(format!("{at}: an array needs `items`")),
                };
                let (min, max) = (count("minItems")?.unwrap_or(0), count("maxItems")?);
                let max = max.unwrap_or(u32::MAX);
                if min > max {
                    return Err(format!("{at}: minItems {min} > maxItems {max}"));
                }
                self.push(Node::Array { items, min, max })
            }
            "object" => {
                match o.get("additionalProperties") {
                    None | Some(JVal::Bool(false)) => {}
                    Some(_) if o.get("properties").is_none() => return self.push(Node::FreeObject),
                    Some(_) => {
                        return Err(format!(
                            "{at}: additionalProperties other than false next to properties is not supported"
                        ))
                    }
                }
                let Some(props) = o.get("properties") else {
                    return self.push(Node::FreeObject);
                };
                let JVal::Obj(props) = props else {
                    return Err(format!("{at}: properties must be an object"));
                };
                if props.len() > MAX_PROPERTIES {
                    return Err(format!("{at}: more than {MAX_PROPERTIES} properties"));
                }
                let required: Vec<&str> = match o.get("required") {
                    None => Vec::new(),
                    Some(JVal::Arr(r)) => r.iter().filter_map(|x| x.as_str()).collect(),
                    Some(_) => return Err(format!("{at}: required must be a list")),
                };
                if let Some(r) = required
                    .iter()
                    .find(|r| !props.iter().any(|(k, _)| k == **r))
                {
                    return Err(format!(
                        "{at}: required property `{r}` is not in properties"
                    ));
                }
                let mut list = Vec::new();
                for (k, v) in props {
                    let node = self.node(v, &format!("{at}/properties/{k}"))?;
                    let quoted = serde_json::to_vec(&Value::String(k.clone())).unwrap_or_default();
                    list.push(Prop {
                        key: quoted[1..quoted.len() - 1].to_vec(),
                        node,
                        required: required.contains(&k.as_str()),
                    });
                }
                self.push(Node::Object(list))
            }
            other => Err(format!("{at}: type `{other}` is not supported")),
        }
    }
}

/// The range of `texts[lo..hi]` (sorted, each longer than `at`, alike in their first `at` bytes) whose byte `at` is
/// `b`: a range again.
pub(crate) fn narrow(texts: &[Vec<u8>], lo: usize, hi: usize, at: usize, b: u8) -> (usize, usize) {
    let r = &texts[lo..hi];
    let from = r.partition_point(|t| t.get(at) < Some(&b));
    let to = r.partition_point(|t| t.get(at) <= Some(&b));
    (lo + from, lo + to)
}

/// Where an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ObjAt {
    /// After `{`.
    Open,
    /// After `,`: a key.
    NeedKey,
    /// Inside a key: the properties it may still be (bits), `at` bytes read.
    Key { cands: u64, at: u8 },
    /// After property `p`'s key: `:`.
    Colon { p: u8 },
    /// After `:`: property `p`'s value.
    NeedValue { p: u8 },
    /// After a value.
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArrAt {
    Open,
    NeedValue,
    After,
}

/// One open value.
#[derive(Clone, Copy, Debug)]
enum Frame {
    /// `next`: the first property not yet passed.
    Obj {
        node: NodeId,
        next: u8,
        at: ObjAt,
    },
    Arr {
        node: NodeId,
        count: u32,
        at: ArrAt,
    },
    /// A string: `esc` 0 plain, 1 after a backslash, 2 + n with n hex digits of `\u` to go (7: 3 to go after a
    /// first digit `d`).
    Str {
        esc: u8,
    },
    Num {
        int: bool,
        st: Num,
        len: u8,
    },
    /// Literal texts of `node` still possible (`lo..hi` of its sorted texts), `at` bytes read.
    Lit {
        node: NodeId,
        lo: u16,
        hi: u16,
        at: u16,
    },
    Free(JsonState),
}

/// A prefix of a value the schema accepts, read byte by byte.
#[derive(Clone, Copy, Debug)]
pub struct SchemaState {
    frames: [Frame; MAX_FRAMES],
    depth: u8,
    ws: WsRun,
    done: bool,
}

impl Default for SchemaState {
    fn default() -> Self {
        Self::new()
    }
}

impl SchemaState {
    pub fn new() -> Self {
        Self {
            frames: [Frame::Str { esc: 0 }; MAX_FRAMES],
            depth: 0,
            ws: WsRun::default(),
            done: false,
        }
    }

    /// The value is complete: nothing but whitespace may follow.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Inside a string with no constraint on its text (any token free of quotes, backslashes and control bytes goes).
    pub fn in_free_string(&self) -> bool {
        self.depth > 0 && matches!(self.frames[self.depth as usize - 1], Frame::Str { esc: 0 })
    }

    /// Whether these bytes can follow (the state is unchanged either way).
    pub fn accepts(&self, s: &Schema, bytes: &[u8]) -> bool {
        let mut t = *self;
        bytes.iter().all(|&b| t.step(s, b))
    }

    fn top(&mut self) -> &mut Frame {
        &mut self.frames[self.depth as usize - 1]
    }

    fn push(&mut self, f: Frame) -> bool {
        if self.depth as usize >= MAX_FRAMES {
            return false;
        }
        self.frames[self.depth as usize] = f;
        self.depth += 1;
        true
    }

    /// The top value is complete.
    fn complete(&mut self) -> bool {
        self.depth -= 1;
        if self.depth == 0 {
            self.done = true;
        }
        true
    }

    /// Text `text` of literal node `lit` is whole. The value of a tagged object's first property picks the
    /// alternative the object is read as from there on.
    fn literal_done(&mut self, s: &Schema, lit: NodeId, text: usize) -> bool {
        self.complete();
        if self.depth == 0 {
            return true;
        }
        if let Frame::Obj { node, next: 1, at } = *self.top() {
            if let Node::Tagged { tag, alts, owner } = &s.nodes[node as usize] {
                if tag.node == lit {
                    let node = alts[owner[text] as usize];
                    *self.top() = Frame::Obj { node, next: 1, at };
                }
            }
        }
        true
    }

    /// The first byte of a value of node `n`.
    fn start(&mut self, s: &Schema, n: NodeId, b: u8) -> bool {
        match &s.nodes[n as usize] {
            Node::Object(_) => {
                b == b'{'
                    && self.push(Frame::Obj {
                        node: n,
                        next: 0,
                        at: ObjAt::Open,
                    })
            }
            Node::Tagged { .. } | Node::Keyed { .. } => {
                b == b'{'
                    && self.push(Frame::Obj {
                        node: n,
                        next: 0,
                        at: ObjAt::Open,
                    })
            }
            Node::FreeObject => {
                let mut j = JsonState::new();
                b == b'{' && j.step(b) && self.push(Frame::Free(j))
            }
            Node::Array { .. } => {
                b == b'['
                    && self.push(Frame::Arr {
                        node: n,
                        count: 0,
                        at: ArrAt::Open,
                    })
            }
            Node::Str => b == b'"' && self.push(Frame::Str { esc: 0 }),
            &Node::Number { int } => {
                let st = match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    b'1'..=b'9' => Num::Int,
                    _ => return false,
                };
                self.push(Frame::Num { int, st, len: 1 })
            }
            Node::Lit(texts) => {
                let (lo, hi) = narrow(texts, 0, texts.len(), 0, b);
                if lo == hi
                    || !self.push(Frame::Lit {
                        node: n,
                        lo: lo as u16,
                        hi: hi as u16,
                        at: 1,
                    })
                {
                    return false;
                }
                // A one-byte literal (a digit) is whole at once (prefix-free: the only one left).
                match texts[lo].len() == 1 {
                    true => self.literal_done(s, n, lo),
                    false => true,
                }
            }
            Node::Union(alts) => match alts.iter().find(|&&a| s.starts(a, b)) {
                Some(&a) => self.start(s, a, b),
                None => false,
            },
            Node::Ref(_) => false,
        }
    }

    /// Reads one byte; false (and the state then meaningless) if the text stops being a prefix of a valid value.
    pub fn step(&mut self, s: &Schema, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        if self.depth == 0 {
            if ws {
                return self.ws.take(b);
            }
            if self.done {
                return false;
            }
            self.ws = WsRun::default();
            return self.start(s, s.root, b);
        }
        match *self.top() {
            Frame::Str { esc } => {
                let next = match (esc, b) {
                    (0, b'"') => return self.complete(),
                    (0, b'\\') => 1,
                    (0, _) => return b >= 0x20,
                    (1, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 0,
                    (1, b'u') => 2 + 4,
                    (1, _) => return false,
                    // \uD800–\uDFFF (surrogates) are left out: parsers refuse a lone one, and a pair is not worth
                    // the states; such characters come as UTF-8.
                    (6, b'd' | b'D') => 7,
                    (7, b'0'..=b'7') => 4,
                    (7, _) => return false,
                    (n, _) if b.is_ascii_hexdigit() => {
                        if n == 3 {
                            0
                        } else {
                            n - 1
                        }
                    }
                    _ => return false,
                };
                *self.top() = Frame::Str { esc: next };
                true
            }
            Frame::Num { int, st, len } => {
                let grows = !(int && matches!(b, b'.' | b'e' | b'E'));
                match st.next(b).filter(|_| grows) {
                    Some(st2) if len < MAX_NUMBER => {
                        *self.top() = Frame::Num {
                            int,
                            st: st2,
                            len: len + 1,
                        };
                        true
                    }
                    Some(_) => false,
                    // The byte ends the number and is read after it.
                    None => st.complete() && self.complete() && self.step(s, b),
                }
            }
            Frame::Lit { node, lo, hi, at } => {
                let Node::Lit(texts) = &s.nodes[node as usize] else {
                    return false;
                };
                let (lo, hi) = narrow(texts, lo as usize, hi as usize, at as usize, b);
                if lo == hi {
                    return false;
                }
                *self.top() = Frame::Lit {
                    node,
                    lo: lo as u16,
                    hi: hi as u16,
                    at: at + 1,
                };
                // Prefix-free texts: a whole one is the only one left.
                match texts[lo].len() == at as usize + 1 {
                    true => self.literal_done(s, node, lo),
                    false => true,
                }
            }
            Frame::Free(mut j) => {
                if !j.step(b) {
                    return false;
                }
                *self.top() = Frame::Free(j);
                !j.done() || self.complete()
            }
            Frame::Obj { node, next, at } => {
                let props = match &s.nodes[node as usize] {
                    Node::Object(props) => &props[..],
                    Node::Tagged { tag, .. } => std::slice::from_ref(tag),
                    Node::Keyed { heads, .. } => &heads[..],
                    _ => return false,
                };
                if let ObjAt::Key { cands, at: k } = at {
                    let (mut left, mut closed) = (0u64, None);
                    for (i, p) in props.iter().enumerate() {
                        if cands >> i & 1 == 1 {
                            match p.key.get(k as usize) {
                                Some(&c) if c == b => left |= 1 << i,
                                None if b == b'"' => closed = Some(i as u8),
                                _ => {}
                            }
                        }
                    }
                    let (node, at) = match (closed, &s.nodes[node as usize]) {
                        // The key names the alternative: its first property.
                        (Some(p), Node::Keyed { alts, .. }) => {
                            (alts[p as usize], ObjAt::Colon { p: 0 })
                        }
                        (Some(p), _) => (node, ObjAt::Colon { p }),
                        (None, _) if left != 0 && (k as usize) < u8::MAX as usize => (
                            node,
                            ObjAt::Key {
                                cands: left,
                                at: k + 1,
                            },
                        ),
                        (None, _) => return false,
                    };
                    *self.top() = Frame::Obj { node, next, at };
                    return true;
                }
                if ws {
                    return self.ws.take(b);
                }
                self.ws = WsRun::default();
                // The keys that may come next: from `next` up to the first required one.
                let (mut keys, mut required_left) = (0u64, false);
                for (i, p) in props.iter().enumerate().skip(next as usize) {
                    if !required_left {
                        keys |= 1 << i;
                    }
                    required_left |= p.required;
                }
                if matches!(s.nodes[node as usize], Node::Keyed { .. }) {
                    // Any alternative's first key; the object is not whole before one.
                    keys = u64::MAX >> (64 - props.len());
                }
                let set = |st: &mut Self, at| {
                    *st.top() = Frame::Obj { node, next, at };
                    true
                };
                match (at, b) {
                    (ObjAt::Open | ObjAt::NeedKey, b'"') if keys != 0 => {
                        set(self, ObjAt::Key { cands: keys, at: 0 })
                    }
                    (ObjAt::Open | ObjAt::After, b'}') if !required_left => self.complete(),
                    (ObjAt::After, b',') if keys != 0 => set(self, ObjAt::NeedKey),
                    (ObjAt::Colon { p }, b':') => set(self, ObjAt::NeedValue { p }),
                    (ObjAt::NeedValue { p }, _) => {
                        *self.top() = Frame::Obj {
                            node,
                            next: p + 1,
                            at: ObjAt::After,
                        };
                        self.start(s, props[p as usize].node, b)
                    }
                    _ => false,
                }
            }
            Frame::Arr { node, count, at } => {
                let &Node::Array { items, min, max } = &s.nodes[node as usize] else {
                    return false;
                };
                if ws {
                    return self.ws.take(b);
                }
                self.ws = WsRun::default();
                match (at, b) {
                    (ArrAt::Open | ArrAt::After, b']') if count >= min => self.complete(),
                    (ArrAt::After, b',') if count < max => {
                        *self.top() = Frame::Arr {
                            node,
                            count,
                            at: ArrAt::NeedValue,
                        };
                        true
                    }
                    (ArrAt::Open | ArrAt::NeedValue, _) if count < max => {
                        *self.top() = Frame::Arr {
                            node,
                            count: count + 1,
                            at: ArrAt::After,
                        };
                        self.start(s, items, b)
                    }
                    _ => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reads(s: &Schema, text: &str) -> Option<SchemaState> {
        let mut st = SchemaState::new();
        text.bytes().all(|b| st.step(s, b)).then_some(st)
    }

    fn whole(s: &Schema, text: &str) -> bool {
        reads(s, text).is_some_and(|st| st.done())
    }

    /// `text` reads whole, and each beginning of it reads as a value not yet done.
    fn reads_whole_and_as_prefixes(s: &Schema, text: &str) {
        assert!(whole(s, text), "refused {text:?}");
        for cut in 1..text.len() {
            let st = reads(s, &text[..cut]).unwrap_or_else(|| panic!("refused {:?}", &text[..cut]));
            assert!(!st.done(), "done early at {:?}", &text[..cut]);
        }
    }

    /// Compiles schema text (keys in the order written; `json!` would sort them).
    fn compile_text(t: &str) -> Result<Schema, String> {
        Schema::compile(&serde_json::from_str::<JVal>(t).unwrap())
    }

    fn compile(v: Value) -> Result<Schema, String> {
        compile_text(&v.to_string())
    }

    fn person() -> Schema {
        compile_text(
            r##"{
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "email": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
                "role": {"$ref": "#/$defs/Role"},
                "extra": {"type": "object"}
            },
            "required": ["name", "age", "role"],
            "$defs": {"Role": {"type": "string", "enum": ["admin", "user"]}}
        }"##,
        )
        .unwrap()
    }

    #[test]
    fn values_the_schema_accepts_are_read_whole_and_as_prefixes() {
        let s = person();
        for text in [
            r#"{"name": "Al", "age": 30, "role": "user"}"#,
            r#"{"name":"B \"q\"","age":-4,"email":null,"tags":["a",3],"role":"admin","extra":{"x":[1,{}]}}"#,
            "{\n  \"name\": \"C\",\n  \"age\": 0,\n  \"email\": \"c@d\",\n  \"role\": \"user\"\n}",
        ] {
            reads_whole_and_as_prefixes(&s, text);
        }
    }

    #[test]
    fn values_the_schema_refuses_are_refused() {
        let s = person();
        for bad in [
            r#"{"age": 30"#,                                      // a required key skipped
            r#"{"name": "A", "name""#,                            // a key twice
            r#"{"name": "A", "role": "user", "age""#,             // keys out of order
            r#"{"name": 1"#,                                      // wrong type
            r#"{"name": "A", "age": 1.5"#,                        // not an integer
            r#"{"name": "A", "age": 1e3"#,                        // not an integer
            r#"{"name": "A", "age": 1, "role": "root""#,          // not in the enum
            r#"{"name": "A", "age": 1, "tags": ["c""#,            // not in the enum
            r#"{"name": "A", "age": 1, "tags": ["a", "b", "a""#,  // maxItems
            r#"{"name": "A", "age": 1, "role": "user", "other""#, // no such key
            r#"{"name": "A", "age": 1}"#,                         // closed before a required key
            r#"{"name": "A", "age": 1, "email": true"#,           // neither string nor null
            r#"{"name": "A", "age": 1, "role": "user"} x"#,
            r#"["#,
        ] {
            assert!(reads(&s, bad).is_none(), "accepted {bad:?}");
        }
    }

    #[test]
    fn arrays_at_the_top_recursion_and_min_items() {
        let s = compile_text(
            r##"{
            "type": "array", "minItems": 1,
            "items": {"$ref": "#/definitions/Tree"},
            "definitions": {"Tree": {"type": "object", "properties": {
                "v": {"type": "number"}, "kids": {"type": "array", "items": {"$ref": "#/definitions/Tree"}}},
                "required": ["v"]}}
        }"##,
        )
        .unwrap();
        assert!(whole(
            &s,
            r#"[{"v": 1.5e2, "kids": [{"v": 0, "kids": []}]}]"#
        ));
        assert!(reads(&s, "[]").is_none());
        assert!(whole(&s, r#"[{"v":2}, {"v":-1}]"#));
    }

    /// The values that random walks over the bytes each state accepts completed (`walks` walks of at most `max`
    /// bytes from `alphabet`), each parsed: every one must parse.
    fn closed_walks(
        s: &Schema,
        alphabet: &[u8],
        max: usize,
        walks: usize,
        seed: u64,
    ) -> Vec<Value> {
        let mut rng = seed;
        let mut out = Vec::new();
        for _ in 0..walks {
            let (text, done) = crate::engine::json::random_walk(
                &mut rng,
                alphabet,
                max,
                SchemaState::new(),
                |st, b| st.step(s, b),
                |st| st.done(),
            );
            if done {
                out.push(
                    serde_json::from_slice(&text)
                        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&text))),
                );
            }
        }
        out
    }

    /// Two tools' calls, `{"name": ..., "arguments": ...}` with each function's own arguments, and a null.
    fn calls() -> Schema {
        compile_text(
            r#"{"anyOf": [
            {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {"type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}},
                "required": ["name", "arguments"]},
            {"type": "object", "properties": {"name": {"enum": ["add", "plus"]}, "arguments": {"type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}},
                "required": ["name", "arguments"]},
            {"type": "null"}
        ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn objects_told_apart_by_their_first_property_take_their_own_properties() {
        let s = calls();
        for text in [
            r#"{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}"#,
            r#"{"name":"add","arguments":{"a":1,"b":2.5}}"#,
            r#"{"name": "plus", "arguments": {"a": -1, "b": 0}}"#,
            "null",
        ] {
            reads_whole_and_as_prefixes(&s, text);
        }
        for bad in [
            r#"{"name": "get_weather", "arguments": {"a""#, // the other function's arguments
            r#"{"name": "add", "arguments": {"city""#,
            r#"{"name": "add", "arguments": {"a": 1}}"#, // b is required for add
            r#"{"name": "sub""#,                         // no such alternative
            r#"{"arguments""#,                           // the discriminator first
            r#"{"name": "get_weather"}"#,                // arguments required
        ] {
            assert!(reads(&s, bad).is_none(), "accepted {bad:?}");
        }
        // One object alternative stays a plain object; an object and a string stay a first-byte union.
        assert!(compile(
            json!({"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}]})
        )
        .is_ok());
    }

    #[test]
    fn enums_and_tagged_unions_of_hundreds_of_values() {
        // 300 values, some beginning like others up to their closing quote ("v1", "v10", "v100").
        let vals: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
        let s = compile(json!({"enum": vals})).unwrap();
        for v in &vals {
            reads_whole_and_as_prefixes(&s, &format!("\"{v}\""));
        }
        for bad in ["\"v300\"", "\"v\"", "\"v01\"", "\"w1\""] {
            assert!(!whole(&s, bad), "{bad}");
        }
        assert!(compile(json!({"enum": (0..=MAX_ENUM).collect::<Vec<_>>()})).is_err());
        // A forced call over 100 functions: each name takes its own arguments only.
        // (As text: `json!` would sort the keys, and the name must come first.)
        let alts: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"type": "object", "properties": {{"name": {{"const": "f{i}"}}, "arguments": {{"type":
                    "object", "properties": {{"x{i}": {{"type": "integer"}}}}, "required": ["x{i}"],
                    "additionalProperties": false}}}}, "required": ["name", "arguments"]}}"#
                )
            })
            .collect();
        let s = compile_text(&format!(r#"{{"anyOf": [{}]}}"#, alts.join(","))).unwrap();
        for i in [0, 1, 10, 57, 99] {
            reads_whole_and_as_prefixes(
                &s,
                &format!(r#"{{"name": "f{i}", "arguments": {{"x{i}": 3}}}}"#),
            );
            let other = (i + 1) % 100;
            let bad = format!(r#"{{"name": "f{i}", "arguments": {{"x{other}": 3}}}}"#);
            assert!(reads(&s, &bad).is_none(), "{bad}");
        }
        assert!(reads(&s, r#"{"name": "f100""#).is_none());
    }

    #[test]
    fn objects_no_first_property_tells_apart_are_refused() {
        let obj =
            |k: &str, v: Value| json!({"type": "object", "properties": {k: v}, "required": [k]});
        for (alts, needle) in [
            (
                vec![
                    obj("t", json!({"const": "a"})),
                    obj("t", json!({"enum": ["b", "a"]})),
                ],
                "both",
            ),
            (
                vec![
                    obj("t", json!({"const": "a"})),
                    obj("t", json!({"const": "b"})),
                    obj("u", json!({"const": "c"})),
                ],
                "start",
            ),
            (
                vec![
                    obj("t", json!({"type": "string"})),
                    obj("t", json!({"const": "b"})),
                ],
                "start",
            ),
        ] {
            let e = compile(json!({ "anyOf": alts })).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn objects_told_apart_by_their_first_key_take_that_alternative() {
        let s = compile_text(
            r#"{"oneOf": [
            {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
            {"type": "object", "properties": {"file": {"type": "string"}, "size": {"type": "integer"}},
                "required": ["file"]},
            {"type": "object", "properties": {"f": {"type": "number"}}, "required": ["f"]}
        ]}"#,
        )
        .unwrap();
        for text in [
            r#"{"url": "http://x"}"#,
            r#"{"file": "a.txt", "size": 3}"#,
            r#"{"file":"a.txt"}"#,
            r#"{ "f" : 1.5 }"#,
        ] {
            reads_whole_and_as_prefixes(&s, text);
        }
        for bad in [
            r#"{}"#,
            r#"{"url": "x", "size""#,
            r#"{"size": 1"#,
            r#"{"fi": 1"#,
            r#"{"f": "x""#,
            r#"{"other""#,
        ] {
            assert!(reads(&s, bad).is_none(), "accepted {bad:?}");
        }
    }

    #[test]
    fn every_tagged_text_the_state_lets_through_is_one_alternative() {
        let alphabet = b"{}\":,-0123456789. _abcdefghilmnoprstuwy";
        let values = closed_walks(&calls(), alphabet, 200, 4000, 0x1234_5678_9abc_def1);
        assert!(values.len() > 50, "only {} walks closed", values.len());
        for v in values {
            if v.is_null() {
                continue;
            }
            let args = v["arguments"].as_object().unwrap();
            match v["name"].as_str().unwrap() {
                "get_weather" => assert!(
                    args["city"].is_string() && args.keys().all(|k| k == "city" || k == "unit"),
                    "{v}"
                ),
                "add" | "plus" => assert!(
                    args["a"].is_number() && args["b"].is_number() && args.len() == 2,
                    "{v}"
                ),
                other => panic!("name {other}: {v}"),
            }
        }
    }

    #[test]
    fn unsupported_schemas_are_refused_by_name() {
        for (schema, needle) in [
            (json!({"type": "string", "format": "date-time"}), "format"),
            (json!({"type": "string", "minLength": 3}), "minLength"),
            (json!({}), "without `type`"),
            (
                json!({"anyOf": [{"type": "string"}, {"enum": ["x"]}]}),
                "start",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": true}),
                "additionalProperties",
            ),
            (json!({"$ref": "#/$defs/Nope"}), "not found"),
            (json!({"enum": [1, 12]}), "begins"),
            (json!({"type": "array"}), "items"),
            (
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}),
                "`b`",
            ),
        ] {
            let e = compile(schema.clone()).unwrap_err();
            assert!(e.contains(needle), "{schema}: {e}");
        }
    }

    #[test]
    fn every_text_the_state_lets_through_to_the_end_is_valid() {
        // Random walks over the bytes each state accepts; whatever completes must parse and match the schema's
        // shape (checked here by hand for `person`).
        let alphabet = b"{}[]\":,-0123456789.eE+ \nabcdeilmnorstuxgy\\";
        let values = closed_walks(&person(), alphabet, 300, 3000, 0x9e37_79b9_7f4a_7c15);
        assert!(values.len() > 50, "only {} walks closed", values.len());
        for v in values {
            let o = v.as_object().unwrap();
            assert!(o["name"].is_string() && o["age"].is_number(), "{v}");
            assert!(
                ["admin", "user"].contains(&o["role"].as_str().unwrap()),
                "{v}"
            );
            assert!(
                o.get("email").is_none_or(|e| e.is_string() || e.is_null()),
                "{v}"
            );
            if let Some(t) = o.get("tags") {
                let t = t.as_array().unwrap();
                assert!(
                    t.len() <= 2 && t.iter().all(|x| *x == "a" || *x == "b" || *x == 3),
                    "{v}"
                );
            }
            assert!(o.get("extra").is_none_or(|e| e.is_object()), "{v}");
        }
    }
}
