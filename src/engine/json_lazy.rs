//! A constraint that waits for its trigger: the text is free until the model begins a tool call, then the call is
//! decoded under its schema, then the text is free again (llama.cpp's lazy grammars with their triggers; vLLM leaves
//! `tool_choice: "auto"` unconstrained, and a small model's call then may not parse, or may name arguments its
//! function does not take).
//!
//! A call begins where the model writes one of the format's markers (`<tool_call>`, `<|python_tag|>`,
//! `[TOOL_CALLS]`, ...: a token of that id, or text ending in those bytes), or, for formats whose calls may come bare,
//! where the answer opens with a call object up to its function's name (`{"name": "get_weather"`, whitespace
//! allowed; llama.cpp's trigger patterns name the functions too, so a JSON answer of another shape stays free): the
//! bytes from the `{` on are then read by the schema as if constrained from the start. Inside a reasoning model's
//! thinking nothing triggers. [`Watch`] finds those points; the schema state itself stays in
//! [`super::json::JsonConstraint`].
//!
//! Mistral's calls (`[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`, maybe `[CALL_ID]abc123XYZ` before `[ARGS]`)
//! are not JSON up to their arguments: after the marker, [`Head`] lets only a function's name be written, then
//! `[ARGS]`, and the arguments are read under that function's schema (llama.cpp's grammar for these templates has
//! the same shape).

use std::sync::Arc;

use super::json::JsonFormat;
use super::xml_call::XmlCalls;

/// Whitespace allowed in a bare call's opening beyond its bytes, before the text counts as no call.
const OPEN_SLACK: usize = 32;
/// Most bytes of a call id (Mistral writes 9).
const MAX_ID: usize = 16;

/// What a lazily constrained answer watches for, and the schema of what follows.
#[derive(Clone, Debug)]
pub struct LazyJson {
    /// The value decoded once triggered (a call, or a list of calls).
    pub format: JsonFormat,
    /// Tokens that begin a call (the markers that are one token, maybe without bytes: control tokens).
    pub trigger_ids: Vec<u32>,
    /// Text that begins a call, matched across tokens.
    pub trigger_texts: Vec<Vec<u8>>,
    /// A call may open the answer bare: these openings (`{"name":"get_weather"`, one per function), with any
    /// whitespace between their bytes.
    pub bare: Vec<Vec<u8>>,
    /// A reasoning model's thinking, where nothing triggers: its opening and closing texts (`<think>`,
    /// `</think>`), and whether the answer starts inside it (the prompt opened it).
    pub think: Option<(Vec<u8>, Vec<u8>, bool)>,
    /// A member a bare call may open with before its name (Llama 3.x: `"type":"function",`, no whitespace), which
    /// the schema does not take: it is left out of what the schema reads.
    pub member: Option<Vec<u8>>,
    /// Calls whose head before the arguments is not JSON (Mistral's `name[ARGS]`): after a trigger the head is read
    /// by [`Head`], and `format` is not used.
    pub heads: Option<Heads>,
    /// Calls in Qwen3-Coder's XML (`<function=NAME>` with `<parameter=KEY>` elements) after the trigger, read by
    /// this grammar; `format` is then not used.
    pub xml: Option<Arc<XmlCalls>>,
}

impl LazyJson {
    /// Most bytes (whitespace included) that may still open a bare call.
    fn max_open(&self) -> usize {
        let member = self.member.as_ref().map_or(0, Vec::len);
        self.bare.iter().map(Vec::len).max().unwrap_or(0) + member + OPEN_SLACK
    }
}

/// The heads of Mistral's calls: `NAME[ARGS]` or `NAME[CALL_ID]ID[ARGS]`, each name one function's.
#[derive(Clone, Debug)]
pub struct Heads {
    /// Each function's name and the schema of its arguments.
    pub fns: Vec<(Vec<u8>, JsonFormat)>,
    /// The text that ends a head (`[ARGS]`) and its token, if it is one.
    pub args: (Vec<u8>, Option<u32>),
    /// The text that may stand between the name and `[ARGS]` before an id (`[CALL_ID]`), and its token.
    pub id: (Vec<u8>, Option<u32>),
}

/// A call's head read so far (control tokens as their text).
#[derive(Clone, Debug, Default)]
pub struct Head {
    text: Vec<u8>,
}

/// How a head stands after a token.
#[derive(Debug, PartialEq)]
pub enum HeadStep {
    /// Not whole yet, and it may still be a function's head.
    More,
    /// Whole: the arguments of function `fns[i]` begin at this offset of the text read (bytes of the token after
    /// `[ARGS]`).
    Args(usize, usize),
    /// It can no longer be any function's head.
    No,
}

impl Head {
    /// The head with the token `id` (its `bytes`; a control token has none) after it, written to `text` (a scratch
    /// buffer, so that the mask allocates nothing per token): not kept.
    pub fn step(&self, heads: &Heads, id: u32, bytes: &[u8], text: &mut Vec<u8>) -> HeadStep {
        text.clear();
        text.extend_from_slice(&self.text);
        if Some(id) == heads.args.1 {
            text.extend_from_slice(&heads.args.0);
        } else if Some(id) == heads.id.1 {
            text.extend_from_slice(&heads.id.0);
        } else if bytes.is_empty() {
            return HeadStep::No;
        } else {
            text.extend_from_slice(bytes);
        }
        read_head(heads, text)
    }

    /// The text read so far.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// Takes the text a [`Head::step`] that gave `More` wrote.
    pub fn set(&mut self, text: Vec<u8>) {
        self.text = text;
    }
}

/// Reads `text` as a head: `NAME`, then `[ARGS]`, or `[CALL_ID]`, 1 to [`MAX_ID`] letters or digits, `[ARGS]`.
fn read_head(heads: &Heads, text: &[u8]) -> HeadStep {
    let (args, id) = (&heads.args.0[..], &heads.id.0[..]);
    let mut more = false;
    for (i, (name, _)) in heads.fns.iter().enumerate() {
        if text.len() <= name.len() {
            more |= name.starts_with(text);
            continue;
        }
        let Some(r) = text.strip_prefix(&name[..]) else {
            continue;
        };
        // After the name: `[ARGS]`, or `[CALL_ID]ID[ARGS]`.
        let r = match r.strip_prefix(id) {
            Some(after) => {
                let n = after
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric())
                    .count();
                // (What follows the id is checked against `[ARGS]` below.)
                if n > MAX_ID {
                    continue;
                }
                if n == after.len() {
                    more = true;
                    continue;
                }
                if n == 0 {
                    continue;
                }
                &after[n..]
            }
            None if id.starts_with(r) => {
                more = true;
                continue;
            }
            None => r,
        };
        match r.strip_prefix(args) {
            Some(rest) => return HeadStep::Args(i, text.len() - rest.len()),
            None if args.starts_with(r) => more = true,
            None => {}
        }
    }
    if more {
        HeadStep::More
    } else {
        HeadStep::No
    }
}

/// Where the watch is.
#[derive(Clone, Debug)]
pub enum Watch {
    /// Nothing but whitespace so far, or (`open`) the bytes from a `{` that may still open a bare call.
    Start { open: Vec<u8> },
    /// Free text: its last bytes, as far as a trigger text can reach back; `inside` thinking.
    Text { recent: Vec<u8>, inside: bool },
}

impl Watch {
    pub fn new(spec: &LazyJson) -> Self {
        match spec.think {
            Some((_, _, true)) => Watch::Text {
                recent: Vec::new(),
                inside: true,
            },
            _ => Watch::Start { open: Vec::new() },
        }
    }

    /// Free text after a call.
    pub fn after_call() -> Self {
        Watch::Text {
            recent: Vec::new(),
            inside: false,
        }
    }

    /// Reads a drawn token (`bytes` empty for a control token). Some(bytes) when a call begins: the bytes from its
    /// start up to the token's end, to be read by the schema.
    pub fn token(&mut self, spec: &LazyJson, id: u32, bytes: &[u8]) -> Option<Vec<u8>> {
        if spec.trigger_ids.contains(&id) && !matches!(self, Watch::Text { inside: true, .. }) {
            *self = Watch::after_call();
            return Some(Vec::new());
        }
        let mut rest = bytes;
        // Bytes that are free text from this token on (at the start, with what seemed to open a bare call).
        let mut seen = Vec::new();
        if let Watch::Start { open } = self {
            let mut bare = true;
            while let Some((&b, tail)) = rest.split_first() {
                if open.is_empty() && b.is_ascii_whitespace() {
                    rest = tail;
                    continue;
                }
                if open.is_empty() && (b != b'{' || spec.bare.is_empty()) {
                    bare = false;
                    break;
                }
                open.push(b);
                rest = tail;
                let (mut whole, mut partial) = (false, false);
                // Whole with the member before the name: its bytes are left out of the feed.
                let mut drop = 0;
                let member = spec.member.as_deref();
                for o in &spec.bare {
                    let plain = opening(open, o.iter());
                    let with =
                        member.and_then(|m| opening(open, o[..1].iter().chain(m).chain(&o[1..])));
                    for (r, n) in [(plain, 0), (with, member.map_or(0, <[u8]>::len))] {
                        match r {
                            Some(true) => (whole, drop) = (true, n),
                            Some(false) => partial = true,
                            None => {}
                        }
                    }
                }
                if whole {
                    let mut feed = without_member(std::mem::take(open), drop);
                    feed.extend_from_slice(rest);
                    *self = Watch::after_call();
                    return Some(feed);
                }
                if !partial || open.len() > spec.max_open() {
                    bare = false;
                    break;
                }
            }
            if bare {
                return None;
            }
            seen = std::mem::take(open);
            *self = Watch::after_call();
        }
        let Watch::Text { recent, inside } = self else {
            return None;
        };
        let mut floor = recent.len();
        recent.extend_from_slice(&seen);
        recent.extend_from_slice(rest);
        // The texts that matter in this token's bytes, in order: outside thinking a trigger (the call starts after
        // it) or the thinking's opening; inside, its closing.
        let (open, close) = match &spec.think {
            Some((o, c, _)) => (&o[..], &c[..]),
            None => (&[][..], &[][..]),
        };
        #[derive(Clone, Copy, PartialEq)]
        enum Seen {
            Trigger,
            Open,
            Close,
        }
        loop {
            let mut hit: Option<(usize, Seen)> = None;
            let mut look = |t: &[u8], what: Seen| {
                if t.is_empty() {
                    return;
                }
                let from = floor.saturating_sub(t.len() - 1);
                if let Some(p) = recent[from..].windows(t.len()).position(|w| w == t) {
                    let end = from + p + t.len();
                    if hit.is_none_or(|(h, _)| end < h) {
                        hit = Some((end, what));
                    }
                }
            };
            if *inside {
                look(close, Seen::Close);
            } else {
                for t in &spec.trigger_texts {
                    look(t, Seen::Trigger);
                }
                look(open, Seen::Open);
            }
            match hit {
                None => break,
                Some((end, Seen::Trigger)) => {
                    let feed = recent[end..].to_vec();
                    recent.clear();
                    return Some(feed);
                }
                Some((end, what)) => {
                    *inside = what == Seen::Open;
                    // Nothing before the match can match again.
                    recent.drain(..end);
                    floor = 0;
                }
            }
        }
        let keep = spec
            .trigger_texts
            .iter()
            .map(|t| t.len())
            .chain([open.len(), close.len()])
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let cut = recent.len().saturating_sub(keep);
        recent.drain(..cut);
        None
    }
}

/// `open` (a bare call's opening, `{` first) without the `n` bytes after the `{` that are not whitespace, nor the
/// whitespace among them.
fn without_member(open: Vec<u8>, n: usize) -> Vec<u8> {
    if n == 0 {
        return open;
    }
    let mut seen = 0;
    let mut out = Vec::with_capacity(open.len());
    for (i, &b) in open.iter().enumerate() {
        let ws = b.is_ascii_whitespace();
        if i > 0 && seen < n {
            seen += usize::from(!ws);
            continue;
        }
        out.push(b);
    }
    out
}

/// How `text` (whitespace left out) stands to the opening `o`: Some(true) it holds all of it, Some(false) it is a
/// beginning of it, None it is neither.
fn opening<'a>(text: &[u8], mut o: impl Iterator<Item = &'a u8>) -> Option<bool> {
    for &b in text.iter().filter(|b| !b.is_ascii_whitespace()) {
        match o.next() {
            None => return Some(true),
            Some(&c) if c == b => {}
            Some(_) => return None,
        }
    }
    Some(o.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LazyJson {
        LazyJson {
            format: JsonFormat::Object,
            trigger_ids: vec![7],
            trigger_texts: vec![b"<tool_call>".to_vec()],
            bare: vec![b"{\"name\":\"f\"".to_vec(), b"{\"name\":\"get\"".to_vec()],
            think: None,
            member: None,
            heads: None,
            xml: None,
        }
    }

    /// Feeds pieces (id 0 each) and returns what the first trigger hands over, with the piece it came at.
    fn run(spec: &LazyJson, pieces: &[&str]) -> Option<(usize, String)> {
        let mut w = Watch::new(spec);
        pieces.iter().enumerate().find_map(|(i, p)| {
            w.token(spec, 0, p.as_bytes())
                .map(|f| (i, String::from_utf8(f).unwrap()))
        })
    }

    #[test]
    fn calls_begin_at_markers_and_at_bare_openings() {
        let s = spec();
        // A marker in one token, split over tokens, with text before and after it in the same token.
        assert_eq!(run(&s, &["Sure.", "<tool_call>"]), Some((1, String::new())));
        assert_eq!(
            run(&s, &["Sure. <tool", "_ca", "ll>\n{\""]),
            Some((2, "\n{\"".into()))
        );
        // A bare call at the start up to a function's name, over several tokens, whitespace before and inside.
        assert_eq!(
            run(&s, &["\n ", "{\"", "name", "\": \"f", "\", \"a"]),
            Some((4, "{\"name\": \"f\", \"a".into()))
        );
        assert_eq!(
            run(&s, &["{", "\n  ", "\"name\" :", "\"get\""]),
            Some((3, "{\n  \"name\" :\"get\"".into()))
        );
        // Not a call: another key, another name (one a function's name begins), a `{` later in the text, text first.
        assert_eq!(run(&s, &["{\"", "answer\": 1}"]), None);
        assert_eq!(run(&s, &["{\"name\": \"Alice\"}"]), None);
        assert_eq!(run(&s, &["{\"name\": \"get", "ter\"}"]), None);
        assert_eq!(run(&s, &["The set {\"name\": \"f\"}"]), None);
        assert_eq!(run(&s, &["a", "{\"name\": \"f\""]), None);
        // ... but a marker after them still is.
        assert_eq!(
            run(&s, &["{\"x\": 1} ", "<tool_call>"]),
            Some((1, String::new()))
        );
        // The trigger token, whatever its bytes.
        let mut w = Watch::new(&s);
        assert_eq!(w.token(&s, 7, b""), Some(Vec::new()));
        // Without bare openings only markers count.
        let markers = LazyJson {
            bare: Vec::new(),
            ..spec()
        };
        assert_eq!(run(&markers, &["{\"name\": \"f\""]), None);
    }

    #[test]
    fn a_bare_call_may_open_with_the_type_member_which_the_schema_does_not_read() {
        let s = LazyJson {
            member: Some(b"\"type\":\"function\",".to_vec()),
            ..spec()
        };
        assert_eq!(
            run(
                &s,
                &[
                    "{\"type\": ",
                    "\"function\",\n ",
                    "\"name\": \"get\"",
                    ", \"p"
                ]
            ),
            Some((2, "{\n \"name\": \"get\"".into()))
        );
        assert_eq!(
            run(&s, &["{\"name\": \"f\", "]),
            Some((0, "{\"name\": \"f\", ".into()))
        );
        // Another type, or the member without a function's name after it, is no call.
        assert_eq!(run(&s, &["{\"type\": \"object\", \"name\": \"f\""]), None);
        assert_eq!(run(&s, &["{\"type\": \"function\", \"name\": \"g\""]), None);
        // Without the member allowed it is no call.
        assert_eq!(
            run(&spec(), &["{\"type\": \"function\", \"name\": \"f\""]),
            None
        );
        // A long function name still triggers (the opening may be as long as the longest one, plus whitespace).
        let long = "f".repeat(64);
        let s = LazyJson {
            bare: vec![format!("{{\"name\":\"{long}\"").into_bytes()],
            ..spec()
        };
        let text = format!("{{ \"name\" : \"{long}\"");
        assert_eq!(run(&s, &[&text]), Some((0, text.clone())));
    }

    fn heads() -> Heads {
        Heads {
            fns: vec![
                (b"get".to_vec(), JsonFormat::Object),
                (b"get_weather".to_vec(), JsonFormat::Object),
            ],
            args: (b"[ARGS]".to_vec(), Some(5)),
            id: (b"[CALL_ID]".to_vec(), Some(6)),
        }
    }

    #[test]
    fn a_mistral_head_is_a_function_name_maybe_an_id_then_args() {
        let h = heads();
        let read = |t: &str| read_head(&h, t.as_bytes());
        for more in [
            "",
            "g",
            "get",
            "get_",
            "get_weather",
            "get[",
            "get[ARGS",
            "get[CALL_ID]",
            "get[CALL_ID]a1",
        ] {
            assert_eq!(read(more), HeadStep::More, "{more}");
        }
        assert_eq!(read("get[ARGS]"), HeadStep::Args(0, 9));
        assert_eq!(read("get_weather[ARGS]{\""), HeadStep::Args(1, 17));
        assert_eq!(read("get[CALL_ID]abc123XYZ[ARGS] {"), HeadStep::Args(0, 27));
        for no in [
            "x",
            "gets",
            "get_weathers",
            "get ",
            "get[CALL_ID][ARGS]",
            "get[CALL_ID]a-b",
            "get[ARG]",
        ] {
            assert_eq!(read(no), HeadStep::No, "{no}");
        }
        let long_id = format!("get[CALL_ID]{}", "a".repeat(MAX_ID + 1));
        assert_eq!(read(&long_id), HeadStep::No);
        // Control tokens stand for their text; another token without bytes fits no head.
        let head = Head {
            text: b"get".to_vec(),
        };
        let mut buf = Vec::new();
        assert_eq!(head.step(&h, 5, b"", &mut buf), HeadStep::Args(0, 9));
        assert_eq!(buf, b"get[ARGS]");
        assert_eq!(head.step(&h, 6, b"", &mut buf), HeadStep::More);
        assert_eq!(buf, b"get[CALL_ID]");
        assert_eq!(head.step(&h, 7, b"", &mut buf), HeadStep::No);
    }

    #[test]
    fn nothing_triggers_inside_thinking() {
        let think = |inside| LazyJson {
            think: Some((b"<think>".to_vec(), b"</think>".to_vec(), inside)),
            ..spec()
        };
        // The prompt opened the thinking: a marker in it is text; after its end, a marker begins a call.
        let s = think(true);
        assert_eq!(
            run(
                &s,
                &["Use <tool_call>?", " Yes.</th", "ink>\n\n<tool_call>"]
            ),
            Some((2, String::new()))
        );
        assert_eq!(run(&s, &["{\"name\": \"f\"} <tool_call>"]), None);
        let mut w = Watch::new(&s);
        assert_eq!(
            w.token(&s, 7, b""),
            None,
            "the trigger token inside thinking"
        );
        // The model opens it itself, in the same token as a marker before it, or twice.
        let s = think(false);
        assert_eq!(
            run(&s, &["<think>Hmm <tool_call>", "</think><tool_call>\n"]),
            Some((1, "\n".into()))
        );
        assert_eq!(
            run(&s, &["<tool_call><think>"]),
            Some((0, "<think>".into()))
        );
        assert_eq!(run(&s, &["<think>a</think><think>b<tool_call>"]), None);
    }

    #[test]
    fn random_pieces_never_panic_the_watch() {
        let mut rng = crate::testutil::Rng::seeded(11);
        let alphabet = b"{}\" \n<>/_toolcalnamehik:";
        for _ in 0..2000 {
            let s = LazyJson {
                think: Some((b"<think>".to_vec(), b"</think>".to_vec(), rng.below(2) == 0)),
                ..spec()
            };
            let mut w = Watch::new(&s);
            for _ in 0..12 {
                let n = rng.below(6);
                let piece: Vec<u8> = (0..n)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect();
                if let Some(feed) = w.token(&s, rng.below(9) as u32, &piece) {
                    assert!(feed.len() <= s.max_open() + piece.len());
                }
            }
        }
    }
}
