//! JSON mode: decoding constrained so that the generated text is always the beginning of one JSON object, and
//! generation ends the moment the object closes (OpenAI's `response_format: {"type": "json_object"}`; llama.cpp
//! gets the same from a JSON grammar).
//!
//! [`JsonState`] recognizes RFC 8259 byte by byte (`Copy`, no allocation), the top-level value an object, with two
//! limits that keep a small model from wandering off where the grammar alone would let it: objects and arrays nest
//! at most [`MAX_DEPTH`] deep, and a run of whitespace between tokens of the JSON text holds at most [`MAX_WS`] bytes
//! with at most one line break (llama.cpp's JSON grammar allows a space, or a line break and up to 20 spaces or tabs;
//! indented output fits either). Numbers have at most [`MAX_NUMBER`] bytes and two exponent digits (a larger exponent
//! leaves the range of a double, and parsers such as serde_json refuse it). Inside strings any byte from 0x20 up
//! goes (so a token may end in the middle of a UTF-8 character), control characters only escaped.
//!
//! Before each draw, [`JsonConstraint::mask`] bans (logit −∞) every token whose bytes would leave that language,
//! end-of-generation tokens until the object is closed, and control tokens always; the draw then runs on what is
//! left, so greedy decoding takes the most likely token that keeps the text valid, and sampling draws from the
//! model's distribution renormalized over those tokens. Tokens without a quote, a backslash or a control byte
//! continue any free string unchecked, which makes the mask cheap for most steps; elsewhere the bytes a token may start
//! with are found once per step, and only tokens starting with one of them are run through a copy of the state.
//!
//! With a schema ([`JsonFormat::Schema`], `response_format` `json_schema`) the state is a
//! [`super::json_schema::SchemaState`] instead, under the same limits and the same mask. A lazy constraint over
//! Qwen3-Coder's XML calls reads each call with an [`XmlState`] under the same mask; inside a parameter's text value
//! any token without `<` goes unchecked.

use std::sync::Arc;

use super::json_lazy::{Head, HeadStep, Heads, LazyJson, Watch};
use super::json_schema::{Schema, SchemaState};
use super::xml_call::{XmlCalls, XmlState};
use crate::tokenizer::Tokenizer;

/// Deepest nesting of objects and arrays.
pub const MAX_DEPTH: u8 = 64;
/// Longest run of whitespace between the JSON text's tokens.
pub const MAX_WS: u8 = 32;
/// Longest number, in bytes.
pub const MAX_NUMBER: u8 = 32;

/// The literals, by index in [`Mode::Lit`].
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where the recognizer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object's `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjOpen,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `:` or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrOpen,
    /// After a value: `,` or the closing bracket of the innermost object or array.
    After,
    /// Inside a string (a key when `key`).
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Esc {
        key: bool,
    },
    /// Inside `\uXXXX`, `left` hex digits to go; `d`: the first was `d` (no surrogates: see [`JsonState::step`]).
    Hex {
        key: bool,
        left: u8,
        d: bool,
    },
    Num(Num),
    /// Inside literal `LITERALS[lit]`, `at` bytes of it read.
    Lit {
        lit: u8,
        at: u8,
    },
    /// The top-level object is closed.
    Done,
}

/// Where a number is (RFC 8259 `number`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
    /// Two exponent digits: the most (a larger exponent is out of the range of a double, which parsers refuse).
    Exp2,
}

impl Num {
    pub(crate) fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        let digit = b.is_ascii_digit();
        match (self, b) {
            (Minus, b'0') => Some(Zero),
            (Minus, _) if digit => Some(Int),
            (Int, _) if digit => Some(Int),
            (Zero | Int, b'.') => Some(Dot),
            (Dot | Frac, _) if digit => Some(Frac),
            (Zero | Int | Frac, b'e' | b'E') => Some(E),
            (E, b'+' | b'-') => Some(ESign),
            (E | ESign, _) if digit => Some(Exp),
            (Exp, _) if digit => Some(Exp2),
            _ => None,
        }
    }

    /// Whether the number may end here.
    pub(crate) fn complete(self) -> bool {
        matches!(
            self,
            Num::Zero | Num::Int | Num::Frac | Num::Exp | Num::Exp2
        )
    }
}

/// The whitespace run between two tokens of the JSON text: its bytes and whether it held a line break (at most
/// [`MAX_WS`] bytes and one break). Reset by the next byte that is not whitespace.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WsRun {
    bytes: u8,
    nl: bool,
}

impl WsRun {
    /// One more whitespace byte; false if the run would grow past its limits.
    pub(crate) fn take(&mut self, b: u8) -> bool {
        if self.bytes >= MAX_WS || (b == b'\n' && self.nl) {
            return false;
        }
        self.nl |= b == b'\n';
        self.bytes += 1;
        true
    }
}

/// A prefix of one JSON object, read byte by byte.
#[derive(Clone, Copy, Debug)]
pub struct JsonState {
    mode: Mode,
    /// Bit i: the i-th open bracket (from the outside) is an array's.
    arrays: u64,
    depth: u8,
    ws: WsRun,
    /// Bytes of the current number.
    num: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonState {
    pub fn new() -> Self {
        Self {
            mode: Mode::Start,
            arrays: 0,
            depth: 0,
            ws: WsRun::default(),
            num: 0,
        }
    }

    /// The object is closed: nothing but whitespace may follow.
    pub fn done(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Whether these bytes can follow (the state is unchanged either way).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut s = *self;
        bytes.iter().all(|&b| s.step(b))
    }

    /// Reads one byte; false (and the state then meaningless) if the text stops being a prefix of a JSON object.
    pub fn step(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key } => {
                return match b {
                    b'"' if key => self.to(Mode::Colon),
                    b'"' => self.value_end(),
                    b'\\' => self.to(Mode::Esc { key }),
                    _ => b >= 0x20,
                };
            }
            Mode::Esc { key } => {
                return match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        self.to(Mode::Str { key })
                    }
                    b'u' => self.to(Mode::Hex {
                        key,
                        left: 4,
                        d: false,
                    }),
                    _ => false,
                };
            }
            Mode::Hex { key, left, d } => {
                // No surrogates (\uD800–\uDFFF): parsers refuse a lone one, and a pair is not worth the states;
                // such characters come as UTF-8.
                let surrogate = left == 3 && d && !(b'0'..=b'7').contains(&b);
                return b.is_ascii_hexdigit()
                    && !surrogate
                    && self.to(if left == 1 {
                        Mode::Str { key }
                    } else {
                        Mode::Hex {
                            key,
                            left: left - 1,
                            d: left == 4 && matches!(b, b'd' | b'D'),
                        }
                    });
            }
            Mode::Lit { lit, at } => {
                let word = LITERALS[lit as usize];
                if word[at as usize] != b {
                    return false;
                }
                return if at as usize + 1 == word.len() {
                    self.value_end()
                } else {
                    self.to(Mode::Lit { lit, at: at + 1 })
                };
            }
            Mode::Num(n) => {
                if let Some(n2) = n.next(b) {
                    self.num += 1;
                    return self.num <= MAX_NUMBER && self.to(Mode::Num(n2));
                }
                // The byte ends the number, if it may end here, and is then read after it.
                return n.complete() && self.value_end() && self.step(b);
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return self.ws.take(b);
        }
        self.ws = WsRun::default();
        match (self.mode, b) {
            (Mode::Start, b'{') => self.open(false),
            (Mode::ObjOpen | Mode::Key, b'"') => self.to(Mode::Str { key: true }),
            (Mode::ObjOpen, b'}') => self.close(false),
            (Mode::Colon, b':') => self.to(Mode::Value),
            (Mode::ArrOpen, b']') => self.close(true),
            (Mode::Value | Mode::ArrOpen, _) => self.value_start(b),
            (Mode::After, b',') => self.to(if self.in_array() {
                Mode::Value
            } else {
                Mode::Key
            }),
            (Mode::After, b'}') => !self.in_array() && self.close(false),
            (Mode::After, b']') => self.in_array() && self.close(true),
            _ => false,
        }
    }

    fn to(&mut self, m: Mode) -> bool {
        self.mode = m;
        true
    }

    /// The first byte of a value.
    fn value_start(&mut self, b: u8) -> bool {
        match b {
            b'{' => self.open(false),
            b'[' => self.open(true),
            b'"' => self.to(Mode::Str { key: false }),
            b'-' | b'0'..=b'9' => {
                self.num = 1;
                self.to(Mode::Num(match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                }))
            }
            b't' => self.to(Mode::Lit { lit: 0, at: 1 }),
            b'f' => self.to(Mode::Lit { lit: 1, at: 1 }),
            b'n' => self.to(Mode::Lit { lit: 2, at: 1 }),
            _ => false,
        }
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.arrays >> (self.depth - 1) & 1 == 1
    }

    fn open(&mut self, array: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        let bit = 1u64 << self.depth;
        self.arrays = if array {
            self.arrays | bit
        } else {
            self.arrays & !bit
        };
        self.depth += 1;
        self.to(if array { Mode::ArrOpen } else { Mode::ObjOpen })
    }

    fn close(&mut self, array: bool) -> bool {
        debug_assert!(self.depth > 0 && self.in_array() == array);
        self.depth -= 1;
        self.value_end()
    }

    fn value_end(&mut self) -> bool {
        self.to(if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        })
    }
}

/// What a token is to the constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Text with no quote, backslash or control byte: it continues any string.
    Plain,
    /// Other text.
    Text,
    /// End of generation: allowed once the object is closed.
    Eog,
    /// Never (control tokens, tokens with no bytes, ids past the tokenizer's vocabulary).
    Banned,
}

/// Every token's bytes and kind, built once per tokenizer and shared by the sequences that ask for JSON.
pub struct JsonVocab {
    data: Vec<u8>,
    off: Vec<u32>,
    kind: Vec<Kind>,
}

impl JsonVocab {
    /// The table for `n_logits` token ids (a model may have more logits than its tokenizer has tokens).
    pub fn new(tok: &Tokenizer, n_logits: usize) -> Self {
        let (mut data, mut off, mut kind) = (Vec::new(), vec![0u32], Vec::with_capacity(n_logits));
        for id in 0..n_logits as u32 {
            let bytes = if (id as usize) < tok.vocab_size() {
                tok.token_bytes(id)
            } else {
                &[]
            };
            kind.push(if (id as usize) >= tok.vocab_size() {
                Kind::Banned
            } else if tok.is_eog(id) {
                Kind::Eog
            } else if tok.is_control(id) || bytes.is_empty() {
                Kind::Banned
            } else if bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
                Kind::Plain
            } else {
                Kind::Text
            });
            if matches!(kind.last(), Some(Kind::Plain | Kind::Text)) {
                data.extend_from_slice(bytes);
            }
            off.push(data.len() as u32);
        }
        Self { data, off, kind }
    }

    fn bytes(&self, id: usize) -> &[u8] {
        &self.data[self.off[id] as usize..self.off[id + 1] as usize]
    }

    pub fn len(&self) -> usize {
        self.kind.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kind.is_empty()
    }
}

/// What JSON mode asks for: any object, or a value a schema accepts.
#[derive(Clone, Debug)]
pub enum JsonFormat {
    Object,
    Schema(Arc<Schema>),
}

/// The text's state under a [`JsonFormat`].
#[derive(Clone)]
enum Grammar {
    Object(JsonState),
    Schema(Arc<Schema>, Box<SchemaState>),
    /// One XML call (a lazy constraint's, [`LazyJson::xml`]).
    Xml(Arc<XmlCalls>, Box<XmlState>),
}

impl Grammar {
    fn of(format: &JsonFormat) -> Self {
        match format {
            JsonFormat::Object => Grammar::Object(JsonState::new()),
            JsonFormat::Schema(s) => Grammar::Schema(s.clone(), Box::default()),
        }
    }

    /// The grammar a lazy constraint reads a call with once triggered.
    fn of_call(spec: &LazyJson) -> Self {
        match &spec.xml {
            Some(x) => Grammar::Xml(x.clone(), Box::default()),
            None => Grammar::of(&spec.format),
        }
    }

    fn done(&self) -> bool {
        match self {
            Grammar::Object(s) => s.done(),
            Grammar::Schema(_, s) => s.done(),
            Grammar::Xml(_, s) => s.done(),
        }
    }

    fn in_free_string(&self) -> bool {
        match self {
            Grammar::Object(s) => matches!(s.mode, Mode::Str { .. }),
            Grammar::Schema(_, s) => s.in_free_string(),
            Grammar::Xml(_, s) => s.in_free_string(),
        }
    }

    /// Inside an XML call's text value: any bytes without `<` go.
    fn in_text(&self) -> bool {
        matches!(self, Grammar::Xml(_, s) if s.in_text())
    }

    fn accepts(&self, bytes: &[u8]) -> bool {
        match self {
            Grammar::Object(s) => s.accepts(bytes),
            Grammar::Schema(g, s) => s.accepts(g, bytes),
            Grammar::Xml(g, s) => s.accepts(g, bytes),
        }
    }

    /// Reads the bytes; false (state unchanged) if they do not fit.
    fn advance(&mut self, bytes: &[u8]) -> bool {
        match self {
            Grammar::Object(s) => {
                let mut t = *s;
                let ok = bytes.iter().all(|&b| t.step(b));
                if ok {
                    *s = t;
                }
                ok
            }
            Grammar::Schema(g, s) => {
                let mut t = **s;
                let ok = bytes.iter().all(|&b| t.step(g, b));
                if ok {
                    **s = t;
                }
                ok
            }
            Grammar::Xml(g, s) => {
                let mut t = **s;
                let ok = bytes.iter().all(|&b| t.step(g, b));
                if ok {
                    **s = t;
                }
                ok
            }
        }
    }
}

/// One sequence's JSON constraint: the shared token table and the text's state so far.
#[derive(Clone)]
pub struct JsonConstraint {
    vocab: Arc<JsonVocab>,
    state: Grammar,
    /// A token that does not fit was accepted (only when nothing fitted): the text is no longer checked.
    broken: bool,
    /// A constraint that waits for its trigger ([`JsonConstraint::lazy`]).
    lazy: Option<Lazy>,
}

#[derive(Clone)]
struct Lazy {
    spec: Arc<LazyJson>,
    phase: Phase,
}

/// Where a lazy constraint is.
#[derive(Clone)]
enum Phase {
    /// Free text, watched for a call's beginning.
    Free(Watch),
    /// A call's head (Mistral's `name[ARGS]`) before its arguments.
    Head(Head),
    /// A triggered value, read under `state`.
    Value,
}

impl JsonConstraint {
    pub fn new(vocab: Arc<JsonVocab>, format: &JsonFormat) -> Self {
        Self {
            vocab,
            state: Grammar::of(format),
            broken: false,
            lazy: None,
        }
    }

    /// The text is free until `spec`'s trigger, then one value of its format is read under the constraint, then the
    /// text is free again, as often as the model begins one ([`super::json_lazy`]). It never ends the sequence.
    pub fn lazy(vocab: Arc<JsonVocab>, spec: Arc<LazyJson>) -> Self {
        Self {
            vocab,
            state: Grammar::of_call(&spec),
            broken: false,
            lazy: Some(Lazy {
                phase: Phase::Free(Watch::new(&spec)),
                spec,
            }),
        }
    }

    /// The value is complete: the sequence should end (never for a lazy constraint).
    pub fn done(&self) -> bool {
        self.lazy.is_none() && self.state.done()
    }

    /// A lazy constraint is reading a triggered value.
    pub fn triggered(&self) -> bool {
        self.lazy
            .as_ref()
            .is_some_and(|l| !matches!(l.phase, Phase::Free(_)))
    }

    /// Bans every token that cannot come next (its logit becomes −∞) and returns how many remain. If none would
    /// (a vocabulary that cannot close what is open), the end-of-generation tokens are let through instead, so the
    /// sequence ends rather than drawing from nothing.
    pub fn mask(&self, logits: &mut [f32]) -> usize {
        if self.broken {
            return logits.len();
        }
        match self.lazy.as_ref().map(|l| (&l.phase, &l.spec)) {
            Some((Phase::Free(_), _)) => return logits.len(),
            Some((Phase::Head(h), spec)) => return self.mask_head(h, spec, logits),
            _ => {}
        }
        let in_string = self.state.in_free_string();
        let in_text = self.state.in_text();
        // In an XML call `<` may end a value (or break it), even inside a JSON string.
        let xml = matches!(self.state, Grammar::Xml(..));
        let lt = |id: usize| xml && self.vocab.bytes(id).contains(&b'<');
        let done = self.state.done();
        // The bytes a token may start with: most tokens fail on their first byte, without a copy of the state.
        let mut first = [false; 256];
        if !in_string {
            for (b, f) in first.iter_mut().enumerate() {
                *f = self.state.accepts(&[b as u8]);
            }
        }
        let mut allowed = 0;
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = match self.vocab.kind.get(id).copied().unwrap_or(Kind::Banned) {
                Kind::Eog => done,
                Kind::Banned => false,
                Kind::Plain if in_string && !lt(id) => true,
                Kind::Plain | Kind::Text if in_text && !lt(id) => true,
                Kind::Plain | Kind::Text => {
                    let bytes = self.vocab.bytes(id);
                    (in_string || first[bytes[0] as usize]) && self.state.accepts(bytes)
                }
            };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        // A call's marker never comes inside the call (not even in a free string).
        for &id in self.lazy.iter().flat_map(|l| &l.spec.trigger_ids) {
            if let Some(l) = logits.get_mut(id as usize) {
                if *l != f32::NEG_INFINITY {
                    *l = f32::NEG_INFINITY;
                    allowed -= 1;
                }
            }
        }
        if allowed == 0 {
            allowed = self.let_the_end_through(logits);
        }
        allowed
    }

    /// Nothing fits (a vocabulary that cannot go on): the end-of-generation tokens are let through, so the sequence
    /// ends rather than drawing from nothing. Returns how many.
    fn let_the_end_through(&self, logits: &mut [f32]) -> usize {
        let mut n = 0;
        for (id, l) in logits.iter_mut().enumerate() {
            if self.vocab.kind.get(id) == Some(&Kind::Eog) {
                *l = 0.0;
                n += 1;
            }
        }
        n
    }

    /// The mask of a call's head: the tokens that keep it a function's head (the end of generation never).
    fn mask_head(&self, head: &Head, spec: &LazyJson, logits: &mut [f32]) -> usize {
        let Some(heads) = &spec.heads else {
            return logits.len();
        };
        let mut allowed = 0;
        // The head with each token after it, in one buffer.
        let mut text = Vec::with_capacity(head.text().len() + 64);
        for (id, l) in logits.iter_mut().enumerate() {
            let kind = self.vocab.kind.get(id).copied().unwrap_or(Kind::Banned);
            let bytes = match kind {
                Kind::Plain | Kind::Text => self.vocab.bytes(id),
                _ => &[],
            };
            let ok = kind != Kind::Eog
                && !spec.trigger_ids.contains(&(id as u32))
                && match head.step(heads, id as u32, bytes, &mut text) {
                    HeadStep::More => true,
                    HeadStep::Args(i, at) => match &heads.fns[i].1 {
                        JsonFormat::Object => JsonState::new().accepts(&text[at..]),
                        JsonFormat::Schema(s) => SchemaState::new().accepts(s, &text[at..]),
                    },
                    HeadStep::No => false,
                };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if allowed == 0 {
            allowed = self.let_the_end_through(logits);
        }
        allowed
    }

    /// Starts reading a value of grammar `g` from `feed` (the bytes of it drawn so far): false if they do not read
    /// as one, or already hold all of it.
    fn begin_value(&mut self, mut g: Grammar, feed: &[u8]) -> bool {
        if g.advance(feed) && !g.done() {
            self.state = g;
            return true;
        }
        false
    }

    /// Moves past a drawn token.
    pub fn accept(&mut self, id: u32) {
        if let Some(lazy) = &mut self.lazy {
            let bytes = self
                .vocab
                .kind
                .get(id as usize)
                .map_or(&[][..], |_| self.vocab.bytes(id as usize));
            let spec = lazy.spec.clone();
            // The bytes of a call's value drawn so far, and its grammar, when one begins with this token.
            let mut begin: Option<(Grammar, Vec<u8>)> = None;
            match &mut lazy.phase {
                Phase::Free(w) => match (w.token(&spec, id, bytes), &spec.heads) {
                    // The rest of the marker's token (as text) begins the head.
                    (Some(feed), Some(heads)) => {
                        match head_after(heads, Head::default(), None, &feed) {
                            Ok(p) => lazy.phase = p,
                            Err((f, feed)) => begin = Some((Grammar::of(&f), feed)),
                        }
                    }
                    (Some(feed), None) => begin = Some((Grammar::of_call(&spec), feed)),
                    (None, _) => {}
                },
                Phase::Head(head) => match &spec.heads {
                    Some(heads) => match head_after(heads, head.clone(), Some(id), bytes) {
                        Ok(p) => lazy.phase = p,
                        Err((f, feed)) => begin = Some((Grammar::of(&f), feed)),
                    },
                    None => lazy.phase = Phase::Free(Watch::after_call()),
                },
                Phase::Value => {
                    let eog = self.vocab.kind.get(id as usize) == Some(&Kind::Eog);
                    // The value is whole, or a token that does not fit was drawn (nothing fitted): free text again.
                    if eog || !self.state.advance(bytes) || self.state.done() {
                        lazy.phase = Phase::Free(Watch::after_call());
                    }
                }
            }
            if let Some((g, feed)) = begin {
                // The call from its start: read under the schema from here on, unless it does not read as one, or
                // is already whole (then the text is free).
                let value = self.begin_value(g, &feed);
                if let Some(lazy) = &mut self.lazy {
                    lazy.phase = match value {
                        true => Phase::Value,
                        false => Phase::Free(Watch::after_call()),
                    };
                }
            }
            return;
        }
        let id = id as usize;
        if self.broken || id >= self.vocab.len() || self.vocab.kind[id] == Kind::Eog {
            return;
        }
        if !self.state.advance(self.vocab.bytes(id)) {
            self.broken = true;
        }
    }
}

/// A call's head after a token (`id` None: text only): Ok(the phase it leaves), or Err(the arguments' format and
/// their first bytes) when the head is whole. A token that fits no head (drawn when nothing fitted) leaves free text.
fn head_after(
    heads: &Heads,
    mut head: Head,
    id: Option<u32>,
    bytes: &[u8],
) -> Result<Phase, (JsonFormat, Vec<u8>)> {
    if id.is_none() && bytes.is_empty() {
        return Ok(Phase::Head(head));
    }
    let mut text = Vec::new();
    match head.step(heads, id.unwrap_or(u32::MAX), bytes, &mut text) {
        HeadStep::More => {
            head.set(text);
            Ok(Phase::Head(head))
        }
        HeadStep::Args(i, at) => Err((heads.fns[i].1.clone(), text[at..].to_vec())),
        HeadStep::No => Ok(Phase::Free(Watch::after_call())),
    }
}

/// Test helper: a random walk from state `s`, each step a byte of `alphabet` drawn among those `step` takes (tried on
/// a copy), until `done` or `max` bytes. Returns the text and whether it ended done; panics if no byte fits.
#[cfg(test)]
pub(crate) fn random_walk<S: Copy>(
    rng: &mut u64,
    alphabet: &[u8],
    max: usize,
    mut s: S,
    step: impl Fn(&mut S, u8) -> bool,
    done: impl Fn(&S) -> bool,
) -> (Vec<u8>, bool) {
    let mut text = Vec::new();
    while text.len() < max && !done(&s) {
        let ok: Vec<u8> = alphabet
            .iter()
            .copied()
            .filter(|&b| step(&mut { s }, b))
            .collect();
        assert!(
            !ok.is_empty(),
            "stuck after {:?}",
            String::from_utf8_lossy(&text)
        );
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let b = ok[(*rng % ok.len() as u64) as usize];
        assert!(step(&mut s, b));
        text.push(b);
    }
    let d = done(&s);
    (text, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::xml_call::XmlCalls;

    fn reads(text: &str) -> Option<JsonState> {
        let mut s = JsonState::new();
        text.bytes().all(|b| s.step(b)).then_some(s)
    }

    #[test]
    fn objects_are_recognized_whole_and_as_prefixes() {
        let docs = [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#"{"a":[1,2.5,-0.25e+3,true,false,null,"x"],"b":{"c":{}}}"#,
            "{\n  \"name\": \"caf\u{e9} \\\"q\\\" \\u00e9\\n\",\n  \"list\": [ ]\n}",
            r#"{"n": 0, "m": -12E-2, "o": 1e9}"#,
            r#"{"nested": [[[]], [{}], {"x": [null]}]}"#,
        ];
        for d in docs {
            assert!(serde_json::from_str::<serde_json::Value>(d).is_ok(), "{d}");
            let s = reads(d).unwrap_or_else(|| panic!("refused {d:?}"));
            assert!(s.done(), "not done after {d:?}");
            for cut in 1..d.len() {
                if let Some(p) = d.get(..cut) {
                    let s = reads(p).unwrap_or_else(|| panic!("refused the prefix {p:?}"));
                    assert!(!s.done(), "done early at {p:?}");
                }
            }
        }
    }

    #[test]
    fn what_is_not_a_json_object_prefix_is_refused() {
        for bad in [
            "[1]",
            "\"s\"",
            "1",
            "x",
            "{,",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1]",
            "{\"a\":[1}",
            "{\"a\":01",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{\"a\":1e999",
            "{\"a\":tru}",
            "{\"a\":nul ",
            "{\"a\":\"\\x\"",
            "{\"a\":\"\\u12g",
            "{\"a\":\"\\ud800",
            "{\"a\":\"\\uDC",
            "{\"a\":\"line\nbreak\"",
            "{\"a\":1}}",
            "{\"a\":1} x",
            "{a:1}",
            "{'a':1}",
        ] {
            assert!(reads(bad).is_none(), "accepted {bad:?}");
        }
    }

    #[test]
    fn whitespace_runs_nesting_and_numbers_are_bounded() {
        assert!(reads(&format!("{{{}\"a\":1}}", " ".repeat(MAX_WS as usize))).is_some());
        assert!(reads(&format!("{{{}\"a\":1}}", " ".repeat(MAX_WS as usize + 1))).is_none());
        assert!(reads("{\n    \"a\":\n 1\n}").is_some());
        assert!(reads("{\n\n\"a\":1}").is_none());
        assert!(reads("{ \n \n\"a\":1}").is_none());
        let deep = |d: usize| format!("{{\"a\":{}", "[".repeat(d));
        assert!(reads(&deep(MAX_DEPTH as usize - 1)).is_some());
        assert!(reads(&deep(MAX_DEPTH as usize)).is_none());
        let num = |n: usize| format!("{{\"a\":{}", "9".repeat(n));
        assert!(reads(&num(MAX_NUMBER as usize)).is_some());
        assert!(reads(&num(MAX_NUMBER as usize + 1)).is_none());
        // Whitespace after the object is still a valid document; anything else is not.
        assert!(reads("{} \n").is_some_and(|s| s.done()));
    }

    #[test]
    fn numbers_end_at_the_byte_after_them() {
        for (text, done) in [
            ("{\"a\":1}", true),
            ("{\"a\":[1 ,2]}", true),
            ("{\"a\":0.5e3 }", true),
            ("{\"a\":12", false),
        ] {
            let s = reads(text).unwrap_or_else(|| panic!("refused {text:?}"));
            assert_eq!(s.done(), done, "{text:?}");
        }
    }

    #[test]
    fn every_text_the_recognizer_lets_through_to_the_end_is_a_json_object() {
        // Random walks over the bytes each state accepts: whatever closes must parse as an object.
        let alphabet = b"{}[]\":,-0123456789.eE+ tfrueals nul\\/bu\n\tx";
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut closed = 0;
        for _ in 0..4000 {
            let (text, done) = random_walk(
                &mut rng,
                alphabet,
                200,
                JsonState::new(),
                |s, b| s.step(b),
                |s| s.done(),
            );
            if done {
                closed += 1;
                let v: serde_json::Value = serde_json::from_slice(&text)
                    .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&text)));
                assert!(v.is_object());
            }
        }
        assert!(closed > 100, "only {closed} walks closed their object");
    }

    /// A vocabulary of pieces with their ids, as the mask sees it.
    /// Mistral's lazy calls over `fns`: the marker is token 1, `[ARGS]` token 2, `[CALL_ID]` token 3.
    fn mistral_spec(fns: Vec<(Vec<u8>, JsonFormat)>) -> Arc<LazyJson> {
        Arc::new(LazyJson {
            format: JsonFormat::Object,
            trigger_ids: vec![1],
            trigger_texts: vec![b"[TOOL_CALLS]".to_vec()],
            bare: Vec::new(),
            think: None,
            member: None,
            heads: Some(Heads {
                fns,
                args: (b"[ARGS]".to_vec(), Some(2)),
                id: (b"[CALL_ID]".to_vec(), Some(3)),
            }),
            xml: None,
        })
    }

    /// The ids a constraint's mask leaves of a vocabulary of `n` tokens.
    fn allowed_ids(c: &JsonConstraint, n: usize) -> Vec<usize> {
        let mut l = vec![0.0f32; n];
        c.mask(&mut l);
        (0..n).filter(|&i| l[i] == 0.0).collect()
    }

    fn vocab(pieces: &[&str], eog: usize) -> JsonVocab {
        let mut data = Vec::new();
        let mut off = vec![0u32];
        let mut kind = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let b = p.as_bytes();
            kind.push(if i == eog {
                Kind::Eog
            } else if b.is_empty() {
                Kind::Banned
            } else if b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\') {
                Kind::Plain
            } else {
                Kind::Text
            });
            if i != eog {
                data.extend_from_slice(b);
            }
            off.push(data.len() as u32);
        }
        JsonVocab { data, off, kind }
    }

    #[test]
    fn a_mistral_call_takes_a_function_name_then_its_arguments() {
        let pieces = [
            "</s>",
            "",
            "",
            "",
            "add",
            "ad",
            "d",
            "scale",
            "x",
            "{\"a\": 1",
            "}",
            "Hi",
            "[ARGS]",
            "abc12",
            "{\"b\": 1",
        ];
        let args = |key: &str| {
            let s = format!(
                r#"{{"type": "object", "properties": {{"{key}": {{"type": "number"}}}}, "required": ["{key}"],
                "additionalProperties": false}}"#
            );
            let s = Schema::compile(&serde_json::from_str(&s).unwrap()).unwrap();
            JsonFormat::Schema(Arc::new(s))
        };
        let spec = mistral_spec(vec![
            (b"add".to_vec(), args("a")),
            (b"scale".to_vec(), args("b")),
        ]);
        let v = Arc::new(vocab(&pieces, 0));
        let allowed = |c: &JsonConstraint| allowed_ids(c, pieces.len());
        let all: Vec<usize> = (0..pieces.len()).collect();
        let mut c = JsonConstraint::lazy(v.clone(), spec.clone());
        c.accept(11);
        assert_eq!(allowed(&c), all);
        c.accept(1);
        assert!(c.triggered());
        // Only a function's name (not the end, not a second marker), then `[ARGS]` or `[CALL_ID]`.
        assert_eq!(allowed(&c), [4, 5, 7]);
        c.accept(5);
        assert_eq!(allowed(&c), [6]);
        c.accept(6);
        assert_eq!(allowed(&c), [2, 3, 12]);
        // An id: letters and digits, at least one before `[ARGS]`.
        c.accept(3);
        assert_eq!(allowed(&c), [4, 5, 6, 7, 8, 11, 13]);
        c.accept(13);
        assert_eq!(allowed(&c), [2, 4, 5, 6, 7, 8, 11, 12, 13]);
        // The arguments under `add`'s schema, then free text again, and a second call.
        c.accept(2);
        assert_eq!(allowed(&c), [9]);
        c.accept(9);
        assert_eq!(allowed(&c), [10]);
        c.accept(10);
        assert!(!c.triggered());
        assert_eq!(allowed(&c), all);
        c.accept(1);
        assert!(c.triggered());
        // `[ARGS]` as text; `scale`'s arguments.
        c.accept(7);
        c.accept(12);
        assert_eq!(allowed(&c), [14]);
        // A name that is not a function's, drawn when nothing else could be (a vocabulary without it): free text.
        let mut c = JsonConstraint::lazy(v, spec);
        c.accept(1);
        c.accept(8);
        assert!(!c.triggered());
    }

    /// Qwen3-Coder's XML calls under the mask: a defined function, its parameters each once, typed values, the
    /// required ones before `</function>`; a text value takes any token but the marker and the end.
    #[test]
    fn an_xml_call_takes_a_function_then_parameters_it_defines_then_its_end() {
        let pieces = [
            "<|im_end|>",
            "<tool_call>",
            "<function=",
            "add",
            ">",
            "\n",
            "<parameter=",
            "a",
            "12",
            "</parameter>",
            "</function>",
            "Hi <",
            "x",
            "</",
            "parameter>",
            "hello",
            "b",
        ];
        let params: crate::engine::json_schema::JVal = serde_json::from_str(
            r#"{"properties": {"a": {"type": "number"}, "b": {"type": "string"}}, "required": ["a"]}"#,
        )
        .unwrap();
        let xml = XmlCalls::compile(&[("add", Some(&params))]).unwrap();
        let spec = Arc::new(LazyJson {
            format: JsonFormat::Object,
            trigger_ids: vec![1],
            trigger_texts: vec![b"<tool_call>".to_vec()],
            bare: Vec::new(),
            think: None,
            member: None,
            heads: None,
            xml: Some(Arc::new(xml)),
        });
        let v = Arc::new(vocab(&pieces, 0));
        let allowed = |c: &JsonConstraint| allowed_ids(c, pieces.len());
        let all: Vec<usize> = (0..pieces.len()).collect();
        let mut c = JsonConstraint::lazy(v, spec);
        c.accept(11);
        assert_eq!(allowed(&c), all);
        c.accept(1);
        assert!(c.triggered());
        // The function element (never the end of generation, never a second marker).
        assert_eq!(allowed(&c), [2, 5]);
        c.accept(2);
        assert_eq!(allowed(&c), [3, 7]);
        c.accept(3);
        assert_eq!(allowed(&c), [4]);
        c.accept(4);
        // `a` is required: no `</function>` yet.
        assert_eq!(allowed(&c), [5, 6]);
        c.accept(6);
        assert_eq!(allowed(&c), [7, 16]);
        c.accept(7);
        c.accept(4);
        // A number, whole before `</parameter>`.
        assert_eq!(allowed(&c), [5, 8]);
        c.accept(8);
        assert_eq!(allowed(&c), [5, 8, 9, 13]);
        c.accept(9);
        assert_eq!(allowed(&c), [5, 6, 10, 13]);
        // `b`'s text: anything but the marker and the end, until `</parameter>`.
        c.accept(6);
        c.accept(16);
        c.accept(4);
        let text: Vec<usize> = (2..pieces.len()).collect();
        assert_eq!(allowed(&c), text);
        c.accept(13);
        assert_eq!(allowed(&c), text);
        c.accept(14);
        // Both given: only the close.
        assert_eq!(allowed(&c), [5, 10, 13]);
        c.accept(10);
        assert!(!c.triggered());
        assert_eq!(allowed(&c), all);
    }

    /// Random draws among the tokens the mask leaves, from Mistral's marker on: the call that comes out is always
    /// one function's name, maybe an id, `[ARGS]`, and arguments its schema accepts whole, and the text is free
    /// right after them.
    #[test]
    fn random_mistral_calls_under_the_mask_are_always_whole_calls() {
        let mut pieces: Vec<String> = [
            "</s>", "", "", "", "[ARGS]", "[", "ARG", "S]", "[CALL", "_ID]",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        for p in [
            "a",
            "d",
            "dd",
            "add",
            "s",
            "c",
            "l",
            "sc",
            "ale",
            "scale",
            "x",
            "X9",
            "7",
            "{",
            "}",
            "\"",
            ":",
            ",",
            " ",
            "\n",
            "{\"",
            "\":",
            "1",
            "2.5",
            "-",
            "e",
            "true",
            "null",
            "[ARGS]{",
            "}[",
            "add[ARGS]",
        ] {
            pieces.push(p.to_string());
        }
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let schema = |t: &str| {
            let s = Schema::compile(&serde_json::from_str(t).unwrap()).unwrap();
            Arc::new(s)
        };
        let add = schema(
            r#"{"type": "object", "properties": {"a": {"type": "number"}, "d": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false}"#,
        );
        let scale = schema(r#"{"type": "object", "properties": {"x": {"type": "boolean"}}}"#);
        let spec = mistral_spec(vec![
            (b"add".to_vec(), JsonFormat::Schema(add.clone())),
            (b"scale".to_vec(), JsonFormat::Schema(scale.clone())),
        ]);
        let v = Arc::new(vocab(&refs, 0));
        let text_of = |id: usize| match id {
            2 => "[ARGS]",
            3 => "[CALL_ID]",
            _ => refs[id],
        };
        let mut rng = crate::testutil::Rng::seeded(5);
        let mut calls = [0usize; 2];
        for _ in 0..300 {
            let mut c = JsonConstraint::lazy(v.clone(), spec.clone());
            c.accept(1);
            let mut text = String::new();
            let mut steps = 0;
            while c.triggered() {
                let ok = allowed_ids(&c, refs.len());
                assert!(!ok.is_empty());
                assert!(
                    !ok.contains(&0) && !ok.contains(&1),
                    "the end or a marker inside a call: {text:?}"
                );
                let id = ok[rng.below(ok.len())];
                text.push_str(text_of(id));
                c.accept(id as u32);
                steps += 1;
                assert!(steps < 400, "no end: {text:?}");
            }
            let (head, args) = text
                .split_once("[ARGS]")
                .unwrap_or_else(|| panic!("{text:?}"));
            let name = head.split("[CALL_ID]").next().unwrap();
            if let Some(id) = head
                .strip_prefix(name)
                .and_then(|h| h.strip_prefix("[CALL_ID]"))
            {
                assert!(
                    (1..=16).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()),
                    "{text:?}"
                );
            }
            let s = match name {
                "add" => &add,
                "scale" => &scale,
                _ => panic!("not a function: {text:?}"),
            };
            calls[usize::from(name == "scale")] += 1;
            let mut st = SchemaState::new();
            assert!(args.bytes().all(|b| st.step(s, b)) && st.done(), "{text:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(args).is_ok(),
                "{text:?}"
            );
        }
        assert!(calls[0] > 20 && calls[1] > 20, "{calls:?}");
    }

    #[test]
    fn a_lazy_constraint_holds_only_between_a_trigger_and_the_end_of_its_value() {
        let pieces = [
            "</s>",
            "<tool_call>",
            "Hi",
            "{\"",
            "name",
            "\": \"",
            "f",
            "g",
            "\", \"arguments\": {\"",
            "x",
            "\": 1",
            "}}",
            "\n</tool_call>",
            "",
        ];
        let schema = r#"{"type": "object", "properties": {"name": {"const": "f"}, "arguments": {"type": "object",
            "properties": {"x": {"type": "number"}}, "required": ["x"]}}, "required": ["name", "arguments"]}"#;
        let schema = Schema::compile(&serde_json::from_str(schema).unwrap()).unwrap();
        let spec = Arc::new(LazyJson {
            format: JsonFormat::Schema(Arc::new(schema)),
            trigger_ids: vec![13],
            trigger_texts: vec![b"<tool_call>".to_vec()],
            bare: vec![b"{\"name\":\"f\"".to_vec()],
            think: None,
            member: None,
            heads: None,
            xml: None,
        });
        let v = Arc::new(vocab(&pieces, 0));
        let allowed = |c: &JsonConstraint| allowed_ids(c, pieces.len());
        let all: Vec<usize> = (0..pieces.len()).collect();
        let call = [3, 4, 5, 6, 8, 9, 10, 11];
        // Text, a marker, the call under its schema, then free text again; the end of generation only outside.
        let mut c = JsonConstraint::lazy(v.clone(), spec.clone());
        for id in [2, 1] {
            assert_eq!(allowed(&c), all);
            c.accept(id);
        }
        assert!(c.triggered());
        assert_eq!(allowed(&c), [3]);
        for (i, id) in call.into_iter().enumerate() {
            if i == 3 {
                assert_eq!(allowed(&c), [6], "the name is the schema's");
            }
            assert!(c.triggered() && !c.done());
            c.accept(id);
        }
        assert!(!c.triggered() && !c.done());
        assert_eq!(allowed(&c), all);
        c.accept(12);
        c.accept(1);
        assert!(c.triggered(), "a second call");
        // A bare call at the start: free until the function's name is whole, then constrained.
        let mut c = JsonConstraint::lazy(v.clone(), spec.clone());
        for id in [3, 4, 5, 6] {
            c.accept(id);
            assert_eq!(allowed(&c), all);
        }
        c.accept(8);
        assert!(c.triggered());
        assert_eq!(allowed(&c), [9]);
        // A control-token trigger, and text that never triggers.
        let mut c = JsonConstraint::lazy(v.clone(), spec.clone());
        c.accept(13);
        assert!(c.triggered());
        let mut c = JsonConstraint::lazy(v, spec);
        for id in [2, 3, 9, 11] {
            c.accept(id);
            assert!(!c.triggered() && !c.done());
        }
    }

    #[test]
    fn the_mask_leaves_exactly_the_tokens_that_fit_and_the_end_only_after_the_object() {
        let pieces = [
            "</s>",
            "{",
            "}",
            "\"",
            "a",
            "\":",
            " 1",
            "1}",
            ",",
            "hello world",
            "\"}",
            "[",
            "",
        ];
        let v = Arc::new(vocab(&pieces, 0));
        let mut c = JsonConstraint::new(v, &JsonFormat::Object);
        let allowed = |c: &JsonConstraint| {
            let mut l = vec![0.0f32; pieces.len()];
            c.mask(&mut l);
            (0..pieces.len())
                .filter(|&i| l[i] == 0.0)
                .map(|i| pieces[i])
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(&c), ["{"]);
        c.accept(1);
        // A quote opens a key, and what follows it in the same token is the key's text.
        assert_eq!(allowed(&c), ["}", "\"", "\":", "\"}"]);
        c.accept(3);
        // In a string: every plain piece, and the quotes that close it.
        assert_eq!(
            allowed(&c),
            [
                "{",
                "}",
                "\"",
                "a",
                "\":",
                " 1",
                "1}",
                ",",
                "hello world",
                "["
            ]
        );
        c.accept(4);
        c.accept(5);
        assert_eq!(allowed(&c), ["{", "\"", "\":", " 1", "1}", "\"}", "["]);
        c.accept(7);
        assert!(c.done());
        assert_eq!(allowed(&c), ["</s>"]);
    }

    #[test]
    fn a_vocabulary_that_cannot_go_on_lets_the_end_through() {
        let pieces = ["</s>", "{", "x"];
        let mut c = JsonConstraint::new(Arc::new(vocab(&pieces, 0)), &JsonFormat::Object);
        c.accept(1);
        let mut l = vec![1.0f32; 3];
        assert_eq!(c.mask(&mut l), 1);
        assert_eq!(l, [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
    }
}
