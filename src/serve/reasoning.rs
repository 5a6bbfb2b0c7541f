//! Reasoning models' thinking (`<think> ... </think>`: Qwen3, QwQ, the DeepSeek-R1 distills) given back apart from
//! the answer, as llama-server (`reasoning_format`, default `auto`) and vLLM's reasoning parsers give it: the message's
//! `reasoning_content`, and `reasoning_content` deltas in a stream before the `content` ones. Tool calls and
//! `content` are read from the text after `</think>`.
//!
//! A template that writes `<think>` turns it on; a request turns it off with `"reasoning_format": "none"` (the text
//! then stays in `content`, tags and all). The thinking starts at a `<think>` that opens the answer, or at the
//! answer's first byte when the prompt itself ends in an open `<think>` (the R1 distills' templates open it). A
//! thinking that never closes (cut off by `max_tokens`) is all reasoning, with no content. The reasoning is given
//! without the whitespace at its ends, and content from its first byte that is not whitespace. Under a JSON
//! constraint (`response_format`, a forced call) the handler reads no thinking: the whole answer is the value.

use serde::Deserialize;

#[cfg(doc)]
use crate::engine::json_lazy::LazyJson;

use super::error::ApiError;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// The request's field, parsed from its body on its own.
#[derive(Deserialize, Debug, Default)]
pub struct ReasoningRequest {
    pub reasoning_format: Option<String>,
}

/// How an answer's thinking is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thinking {
    /// The prompt ends in an open `<think>`: the answer starts inside it.
    pub starts_inside: bool,
}

impl Thinking {
    /// Its opening and closing texts, and whether the answer starts inside ([`LazyJson::think`]).
    pub fn span(self) -> (Vec<u8>, Vec<u8>, bool) {
        (OPEN.into(), CLOSE.into(), self.starts_inside)
    }
}

/// What a stream may send of an answer so far.
#[derive(Debug, PartialEq)]
pub struct Progress {
    /// The reasoning that may go out (a byte range of the answer; empty while none).
    pub reasoning: (usize, usize),
    /// Where the content starts, once the thinking is closed (or the answer is seen to have none).
    pub body: Option<usize>,
}

impl ReasoningRequest {
    /// The thinking to read for a chat answer: None when the template writes none or the request asked for
    /// `"none"`; a 400 naming the field for a value hayloft does not know.
    pub fn check(
        &self,
        template: Option<&str>,
        prompt_tail: &str,
    ) -> Result<Option<Thinking>, ApiError> {
        match self.reasoning_format.as_deref() {
            None | Some("auto") | Some("deepseek") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "field `reasoning_format`: '{other}' is not one of \"auto\", \"deepseek\", \"none\""
                ))
                .code("invalid_field"))
            }
        }
        if !template.is_some_and(|t| t.contains(OPEN)) {
            return Ok(None);
        }
        Ok(Some(Thinking {
            starts_inside: prompt_tail.trim_end().ends_with(OPEN),
        }))
    }
}

/// The first byte of `t` from `from` on that is not whitespace (its length when there is none).
pub fn first_non_ws(t: &str, from: usize) -> usize {
    t.len() - t[from..].trim_start().len()
}

fn last_non_ws(t: &str, from: usize, to: usize) -> usize {
    from + t[from..to].trim_end().len()
}

impl Thinking {
    /// Where the thinking starts (after its `<think>`); None when the answer has none; Err while the answer so far
    /// could still open one.
    fn start(&self, text: &str) -> Result<Option<usize>, ()> {
        if self.starts_inside {
            return Ok(Some(0));
        }
        let t = text.trim_start();
        let at = text.len() - t.len();
        if t.starts_with(OPEN) {
            Ok(Some(at + OPEN.len()))
        } else if OPEN.starts_with(t) {
            Err(())
        } else {
            Ok(None)
        }
    }

    /// A whole answer: where its reasoning is (bytes; None when it has none, or only whitespace) and where its
    /// content starts (its first byte that is not whitespace, thinking or not, as a stream starts it).
    pub fn split(&self, text: &str) -> (Option<(usize, usize)>, usize) {
        let Ok(Some(start)) = self.start(text) else {
            return (None, first_non_ws(text, 0));
        };
        let (end, body) = match text[start..].find(CLOSE) {
            Some(e) => (start + e, first_non_ws(text, start + e + CLOSE.len())),
            None => (text.len(), text.len()),
        };
        let from = first_non_ws(text, start).min(end);
        let to = last_non_ws(text, from, end);
        ((from < to).then_some((from, to)), body)
    }

    /// An answer so far, for a stream: the reasoning that may go out (from its first byte that is not whitespace to
    /// its last, short of what could be the start of `</think>`) and, once the thinking is closed, where the content
    /// starts. Its pieces add up to what [`Thinking::split`] gives the whole answer.
    pub fn progress(&self, text: &str) -> Progress {
        let start = match self.start(text) {
            Err(()) => {
                return Progress {
                    reasoning: (0, 0),
                    body: None,
                }
            }
            Ok(None) => {
                return Progress {
                    reasoning: (0, 0),
                    body: Some(0),
                }
            }
            Ok(Some(s)) => s,
        };
        let from = first_non_ws(text, start);
        if let Some(e) = text[start..].find(CLOSE).map(|e| start + e) {
            let to = last_non_ws(text, from.min(e), e);
            return Progress {
                reasoning: (from.min(to), to),
                body: Some(e + CLOSE.len()),
            };
        }
        // Hold back a tail that could begin `</think>`.
        let mut end = text.len();
        for k in (1..CLOSE.len()).rev() {
            if end >= from + k
                && text.is_char_boundary(end - k)
                && CLOSE.starts_with(&text[end - k..])
            {
                end -= k;
                break;
            }
        }
        let to = last_non_ws(text, from.min(end), end);
        Progress {
            reasoning: (from.min(to), to),
            body: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_is_split_from_the_answer_whole_and_streamed() {
        let opened = Thinking {
            starts_inside: false,
        };
        let inside = Thinking {
            starts_inside: true,
        };
        let cases = [
            (
                opened,
                "<think>\nLet me see: 2 < 3.\n</think>\n\nThe answer is 5.",
                Some("Let me see: 2 < 3."),
                "The answer is 5.",
            ),
            (
                inside,
                "Okay, the user asks.\n</think>\n\nHello!",
                Some("Okay, the user asks."),
                "Hello!",
            ),
            (
                opened,
                "<think>\n\n</think>\n\n<tool_call>x",
                None,
                "<tool_call>x",
            ),
            (
                opened,
                "Plain answer <think> later",
                None,
                "Plain answer <think> later",
            ),
            (
                opened,
                "<think>cut off by max_tok",
                Some("cut off by max_tok"),
                "",
            ),
            (inside, "  ", None, ""),
        ];
        for (th, text, reasoning, content) in cases {
            let (r, body) = th.split(text);
            let r = r.map(|(s, e)| &text[s..e]);
            assert_eq!((r, &text[body..]), (reasoning, content), "{text:?}");
            // Streamed: the reasoning pieces add up to the reasoning; the content starts where split says.
            let mut sent = 0;
            let mut streamed = String::new();
            let mut body_at = None;
            for (cut, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
                let p = th.progress(&text[..cut]);
                if body_at.is_some() {
                    break;
                }
                if p.reasoning.1 > sent {
                    streamed.push_str(&text[sent.max(p.reasoning.0)..p.reasoning.1]);
                    sent = p.reasoning.1;
                }
                body_at = p.body;
            }
            assert_eq!(streamed, reasoning.unwrap_or(""), "{text:?}");
            if let Some(b) = body_at {
                assert_eq!(&text[first_non_ws(text, b)..], content, "{text:?}");
            }
        }
        // Random text of the pieces thinking is made of: the streamed reasoning always adds up to the split's.
        const PIECES: [&str; 8] = ["<think>", "</think>", " ", "\n", "ü", "a", "</thi", "<th"];
        let mut rng = crate::testutil::Rng::seeded(11);
        for _ in 0..500 {
            let mut text = String::new();
            for _ in 0..12 {
                text.push_str(PIECES[(rng.next_u64() % PIECES.len() as u64) as usize]);
            }
            for th in [opened, inside] {
                let (r, body) = th.split(&text);
                let want = r.map_or("", |(s, e)| &text[s..e]);
                let (mut sent, mut streamed, mut closed) = (0, String::new(), None);
                for (cut, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
                    let p = th.progress(&text[..cut]);
                    if p.reasoning.1 > sent {
                        streamed.push_str(&text[sent.max(p.reasoning.0)..p.reasoning.1]);
                        sent = p.reasoning.1;
                    }
                    if p.body.is_some() {
                        closed = p.body;
                        break;
                    }
                }
                if closed.is_none() {
                    // Never closed: the end of the answer gives the rest, as the stream's last deltas do.
                    streamed.push_str(
                        &text[sent.max(r.map_or(0, |r| r.0))..r.map_or(0, |r| r.1).max(sent)],
                    );
                }
                assert_eq!(streamed, want, "{text:?} {th:?}");
                if let Some(b) = closed {
                    assert_eq!(first_non_ws(&text, b), body, "{text:?}");
                }
            }
        }
        let r = ReasoningRequest {
            reasoning_format: Some("raw".into()),
        };
        assert!(r.check(Some("<think>"), "").is_err());
        let none = ReasoningRequest {
            reasoning_format: Some("none".into()),
        };
        assert_eq!(none.check(Some("<think>"), "<think>\n").unwrap(), None);
        let auto = ReasoningRequest::default();
        assert_eq!(auto.check(Some("no tags"), "").unwrap(), None);
        assert_eq!(
            auto.check(Some("{{ '<think>' }}"), "<|Assistant|><think>\n")
                .unwrap(),
            Some(inside)
        );
        assert_eq!(
            auto.check(Some("{{ '<think>' }}"), "<|im_start|>assistant\n")
                .unwrap(),
            Some(opened)
        );
    }
}
