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

use super::json::JsonFormat;

/// Most bytes from a `{` to the end of a bare call's function name (whitespace included).
const MAX_OPEN: usize = 40;

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
                for o in &spec.bare {
                    match opening(open, o) {
                        Some(true) => whole = true,
                        Some(false) => partial = true,
                        None => {}
                    }
                }
                if whole {
                    let mut feed = std::mem::take(open);
                    feed.extend_from_slice(rest);
                    *self = Watch::after_call();
                    return Some(feed);
                }
                if !partial || open.len() > MAX_OPEN {
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

/// How `text` (whitespace left out) stands to the opening `o`: Some(true) it holds all of it, Some(false) it is a
/// beginning of it, None it is neither.
fn opening(text: &[u8], o: &[u8]) -> Option<bool> {
    let mut o = o.iter();
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
                    assert!(feed.len() <= MAX_OPEN + piece.len());
                }
            }
        }
    }
}
