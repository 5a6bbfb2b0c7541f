//! RULER prompts against RULER's own generators: `fixtures/ruler_official.json` holds one prompt per task made by
//! RULER's scripts (see `fixtures/gen_ruler_official.py`), and each of ours, rendered as a plain completion prompt
//! (RULER's base template), must have the same structure: template text, separators, worked examples, needle and
//! chain lines, haystack layout. Random draws (keys, values, names, words, positions) and lengths are masked out.

mod common;

use std::path::PathBuf;

use hayloft::eval::haystack::{Haystacks, NOISE};
use hayloft::eval::{ruler, Prompter};
use hayloft::gguf::GgufFile;
use hayloft::tokenizer::Tokenizer;

const NEEDLE_START: &str = "One of the special magic ";

/// Byte ranges of the needle sentences in `s`.
fn needle_spans(s: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = s[from..].find(NEEDLE_START) {
        let st = from + i;
        let is = st + s[st..].find(" is: ").expect("needle without value");
        let end = is + s[is..].find('.').expect("needle without a full stop") + 1;
        out.push((st, end));
        from = end;
    }
    out
}

/// The essay text between needles as "[essay]", as the fixture's generator writes it.
fn mask_essay(ctx: &str) -> String {
    let spans = needle_spans(ctx);
    let mut out = String::new();
    if !ctx[..spans.first().map_or(ctx.len(), |s| s.0)]
        .trim()
        .is_empty()
    {
        out.push_str("[essay]");
    }
    for (i, &(st, end)) in spans.iter().enumerate() {
        out.push(' ');
        out.push_str(&ctx[st..end]);
        let next = spans.get(i + 1).map_or(ctx.len(), |s| s.0);
        if !ctx[end..next].trim().is_empty() {
            out.push_str(" [essay]");
        }
    }
    out
}

/// Numbered list items `N. word` as `N. w` (words may hold spaces), as the fixture's generator writes them.
fn mask_numbered(line: &str) -> String {
    let toks: Vec<&str> = line.split(' ').collect();
    let is_num = |t: &str| {
        t.len() > 1 && t.ends_with('.') && t[..t.len() - 1].bytes().all(|b| b.is_ascii_digit())
    };
    let first = toks.iter().position(|t| *t == "1.");
    let Some(first) = first else {
        return line.to_string();
    };
    let mut out: Vec<String> = toks[..first].iter().map(|t| t.to_string()).collect();
    let items = toks[first..].iter().filter(|t| is_num(t)).count();
    // The example's lists have fixed lengths; the main list's is fitted.
    out.push(if items <= 40 {
        format!("<{items} numbered words>")
    } else {
        "<numbered words>".into()
    });
    out.join(" ")
}

/// Digits, UUIDs and capitalised variable names masked; the key between "for " and " mentioned"/" is:" masked.
fn mask_draws(line: &str) -> String {
    let mut s = line.to_string();
    for (open, close) in [
        ("magic numbers for ", " is: "),
        ("magic uuids for ", " is: "),
    ] {
        let mut from = 0;
        while let Some(i) = s[from..].find(open) {
            let a = from + i + open.len();
            let Some(j) = s[a..].find(close) else { break };
            s.replace_range(a..a + j, "<key>");
            from = a + 5;
        }
    }
    for open in [
        "magic number for ",
        "magic numbers for ",
        "magic uuid for ",
        "magic uuids for ",
    ] {
        let mut from = 0;
        while let Some(i) = s[from..].find(open) {
            let a = from + i + open.len();
            let Some(j) = s[a..].find(" mentioned") else {
                break;
            };
            s.replace_range(a..a + j, "<key>");
            from = a + 5;
        }
    }
    let mut out = String::new();
    for (i, tok) in s.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let core = tok.trim_end_matches(['.', ',', ':', '?']);
        let tail = &tok[core.len()..];
        let hexish = core.len() == 36 && core.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        let var = core != "VAR" && core.len() >= 3 && core.bytes().all(|b| b.is_ascii_uppercase());
        let digits = !core.is_empty() && core.bytes().all(|b| b.is_ascii_digit());
        if hexish {
            out.push_str("<uuid>");
        } else if var {
            out.push_str("<VAR>");
        } else if digits {
            out.push_str("<n>");
        } else {
            out.push_str(core);
        }
        out.push_str(tail);
    }
    out
}

/// A prompt's structure: haystack runs collapsed to `<hay>` (noise lines and whole-line needles), chain lines kept
/// apart in order, essay contexts as their needle count, everything else with the draws masked.
fn skeleton(prompt: &str) -> (Vec<String>, Vec<String>) {
    let mut lines: Vec<String> = Vec::new();
    let mut chain: Vec<String> = Vec::new();
    for line in prompt.split('\n') {
        let kind = if line == NOISE || (line.starts_with(NEEDLE_START) && needle_spans(line).len() == 1) {
            "<hay>".to_string()
        } else if line.starts_with("VAR ") {
            chain.push(mask_draws(line));
            continue;
        } else if line.contains(NEEDLE_START) {
            let m = mask_essay(line);
            format!("<essay, {} needles, {} parts>", needle_spans(&m).len(), m.matches("[essay]").count().min(1))
        } else if let Some(rest) = line.strip_prefix(
            "Read the following coded text and track the frequency of each coded word. Find the three most \
             frequently appeared coded words. ",
        ) {
            format!("<fwe preamble> <{} coded words>", rest.split(' ').count().min(1))
        } else {
            mask_draws(&mask_numbered(line))
        };
        if kind == "<hay>" && lines.last().is_some_and(|l| l == "<hay>") {
            continue;
        }
        lines.push(kind);
    }
    (lines, chain)
}

#[test]
fn ruler_prompts_have_the_official_structure() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ruler_official.json");
    let official: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let model = common::model("smollm2-135m");
    common::essays();
    common::wonderwords();
    let g = GgufFile::open(&model).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let p = Prompter::new(
        &tok,
        Err("plain prompt: RULER's base template".into()),
        true,
    );
    let mut hays = Haystacks::new(None);
    let cases = official.as_object().unwrap();
    assert_eq!(
        cases.len(),
        ruler::TASKS.len() + 1,
        "a fixture for every task"
    );
    for (key, rec) in cases {
        let (task, len) = key.split_once('@').unwrap();
        let len: usize = len.parse().unwrap();
        let theirs = rec["prompt"].as_str().unwrap();
        let c = ruler::case(&p, &mut hays, task, len, 0, 11).unwrap();
        let ours = p.render(&c.conv, 0, &[], c.conv.mode).unwrap();
        let (a, b) = (skeleton(&ours), skeleton(theirs));
        assert_eq!(
            a.0, b.0,
            "{key}: prompt structure differs\nours:   {:?}\nRULER:  {:?}",
            a.0, b.0
        );
        assert_eq!(a.1, b.1, "{key}: chain lines differ");
        assert_eq!(
            c.conv.turns[0].refs.len() as u64,
            rec["outputs"].as_u64().unwrap(),
            "{key}: number of answers"
        );
    }
}

#[test]
fn skeleton_masks_draws_but_not_structure() {
    let a = "A special magic number is hidden.\nThe grass is green. The sky is blue. The sun is yellow. Here we go. \
             There and back again.\nWhat is the special magic number for red-fox mentioned in the provided text? \
             The special magic number for red-fox mentioned in the provided text is";
    let b = a.replace("red-fox", "Big-ice cream");
    assert_eq!(skeleton(a), skeleton(&b));
    // A separator changed is a different structure.
    assert_ne!(skeleton(a), skeleton(&a.replacen('\n', "\n\n", 1)));
    assert_eq!(
        mask_numbered("x: 1. ice cream 2. b"),
        "x: <2 numbered words>"
    );
    assert_eq!(
        mask_essay("Text. One of the special magic numbers for k is: 1234567. More."),
        "[essay] One of the special magic numbers for k is: 1234567. [essay]"
    );
    let (l, c) = skeleton("VAR ABCDE = 12345\nVAR FGHIJ = VAR ABCDE \nQ");
    assert_eq!(c, ["VAR <VAR> = <n>", "VAR <VAR> = VAR <VAR> "]);
    assert_eq!(l, ["Q"]);
}
