//! `hayloft eval`: long-context benchmarks that put accuracy, KV memory and speed side by side.
//!
//! Every task turns into the same shape, a [`Conversation`]: a long context and one or more turns (question, answer
//! prefix, references, metric). Generators build conversations whose prompt length is controlled in the model's own
//! tokens ([`fit_units`]); the [`runner`] feeds them to a fresh [`crate::engine::Session`] per case and KV spec,
//! decodes greedily, scores, times and appends one JSON line per case; [`report`] and [`plot`] turn the lines into
//! `report.md`, `summary.json` and PNG plots. [`plan`] holds each benchmark's typed parameters, the plans (cases to
//! run) they make, and the run from plans to report that every `hayloft eval` command goes through; [`ablation`] the
//! head mask of the masking experiment.
//!
//! Tasks: [`niah`] (Kamradt's needle in a haystack), [`ruler`] (NVIDIA RULER's synthetic tasks), [`scbench`]
//! (shared-context multi-turn / multi-request), [`tsort`] (Ada-LEval's segment ordering), [`longbench`] (LongBench's
//! JSONL files with its metrics).

pub mod ablation;
pub mod blendqa;
pub mod haystack;
pub mod longbench;
pub mod niah;
pub mod plan;
pub mod plot;
pub mod report;
pub mod ruler;
pub mod runner;
pub mod scbench;
pub mod score;
pub mod tsort;
pub mod wonderwords;
pub mod words;

use anyhow::{bail, Result};

use crate::tokenizer::chat::{ChatMessage, ChatTemplate};
use crate::tokenizer::Tokenizer;

pub use score::Metric;

/// A small deterministic generator (SplitMix64): same seed, same stream, on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n.max(1) as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below((hi - lo + 1) as usize) as u64
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    pub fn choose<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }

    /// A version-4-shaped UUID string (RULER's UUID values).
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        let b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        let a = (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xFFFF,
            a & 0xFFFF,
            b >> 48,
            b & 0xFFFF_FFFF_FFFF
        )
    }

    /// A 7-digit number (RULER's number values).
    pub fn number7(&mut self) -> String {
        self.range(1_000_000, 9_999_999).to_string()
    }
}

/// A seed for one case from the run's seed and what identifies the case (FNV-1a over the parts, then mixed), so a
/// case's content does not depend on which other cases run or in what order.
pub fn case_seed(base: u64, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ base;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    Rng::new(h).next_u64()
}

/// One question against the context.
#[derive(Clone, Debug)]
pub struct Turn {
    pub question: String,
    /// Text the answer starts with, put after the question (RULER's "The special magic number for X ... is").
    pub answer_prefix: String,
    /// Reference answers the metric compares the output with.
    pub refs: Vec<String>,
    /// The gold answer fed back in multi-turn mode (defaults to the first reference).
    pub gold: String,
    pub metric: Metric,
    /// Most tokens to generate.
    pub max_new: usize,
}

/// How the turns of a conversation use the context's KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each turn is appended after the previous one (and its answer); the cache keeps growing.
    MultiTurn,
    /// The context is encoded once; every query is answered against it alone and then dropped (`truncate`).
    MultiRequest,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::MultiTurn => "multi-turn",
            Mode::MultiRequest => "multi-request",
        }
    }
}

/// A long context and the turns asked about it.
#[derive(Clone, Debug)]
pub struct Conversation {
    /// Instruction placed before the context (may be empty).
    pub preamble: String,
    pub context: String,
    pub turns: Vec<Turn>,
    pub mode: Mode,
    /// Render as a plain completion prompt even for chat models (LongBench's few-shot and code datasets).
    pub no_chat: bool,
    /// The text between the parts, as the benchmark's own template has it.
    pub seps: Seps,
}

/// What joins a conversation's parts: preamble and context, context and the first question, question and answer
/// prefix (the last only in a plain completion prompt; a chat prompt puts the prefix right after the assistant's
/// header). Benchmarks differ here (RULER: one newline, fwe: a space; LongBench: its whole template verbatim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seps {
    pub preamble: &'static str,
    pub question: &'static str,
    pub prefix: &'static str,
}

impl Seps {
    /// Blank lines around the context, the answer prefix on the next line: hayloft's own tasks.
    pub const BLANK: Seps = Seps {
        preamble: "\n\n",
        question: "\n\n",
        prefix: "\n",
    };
    /// Nothing added: the parts carry their own separators (a template copied verbatim).
    pub const NONE: Seps = Seps {
        preamble: "",
        question: "",
        prefix: "",
    };
}

/// Identifies a generated case: what `--resume` matches on, together with the KV spec.
#[derive(Clone, Debug)]
pub struct CaseMeta {
    pub task: String,
    /// Requested length in tokens (prompt + tokens to generate), 0 where the data decides (LongBench).
    pub target_len: usize,
    /// Needle depth in percent (NIAH).
    pub depth: Option<f64>,
    pub sample: usize,
    pub seed: u64,
}

impl CaseMeta {
    /// The resume key of this case under a KV spec label.
    pub fn key(&self, kv: &str) -> String {
        let depth = self.depth.map_or(String::from("-"), |d| format!("{d}"));
        format!(
            "{}|{}|{}|{}|{}|{}",
            self.task, self.target_len, depth, self.sample, self.seed, kv
        )
    }
}

/// A ready-to-run case.
#[derive(Clone, Debug)]
pub struct Case {
    pub meta: CaseMeta,
    pub conv: Conversation,
}

/// Turns conversations into prompt text and tokens: the model's chat template for instruct models, a plain
/// completion prompt (context, question, answer prefix) for base models.
#[derive(Clone, Copy)]
pub struct Prompter<'a> {
    pub tok: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
}

impl<'a> Prompter<'a> {
    /// Uses the chat template unless `no_chat`, the model has none, or only has a built-in fallback (base models
    /// whose vocabulary merely contains turn markers, such as Gemma 3 270M).
    pub fn new(
        tok: &'a Tokenizer,
        template: std::result::Result<&'a ChatTemplate, String>,
        no_chat: bool,
    ) -> Self {
        let chat = match template {
            Ok(t) if !no_chat && t.builtin().is_none() => Some(t),
            _ => None,
        };
        Prompter { tok, chat }
    }

    pub fn is_chat(&self) -> bool {
        self.chat.is_some()
    }

    fn first_user(conv: &Conversation, turn: &Turn) -> String {
        let mut s = String::new();
        if !conv.preamble.is_empty() {
            s.push_str(&conv.preamble);
            s.push_str(conv.seps.preamble);
        }
        s.push_str(&conv.context);
        s.push_str(conv.seps.question);
        s.push_str(&turn.question);
        s
    }

    /// The text up to the end of the context: the part every query of a multi-request conversation shares.
    pub fn shared_prefix(&self, conv: &Conversation) -> Result<String> {
        let first = conv
            .turns
            .first()
            .ok_or_else(|| anyhow::anyhow!("a conversation needs a turn"))?;
        let full = self.render(conv, 0, &[], Mode::MultiRequest)?;
        let user = Self::first_user(conv, first);
        let start = full.find(&user).ok_or_else(|| {
            anyhow::anyhow!("the chat template changed the user's text; cannot share the context")
        })?;
        let ctx_end = start + user.len() - first.question.len() - conv.seps.question.len();
        Ok(full[..ctx_end].to_string())
    }

    /// The full prompt text for turn `i`, ending with its answer prefix. `answers` holds the answers of the earlier
    /// turns (multi-turn mode), in order.
    pub fn render(
        &self,
        conv: &Conversation,
        i: usize,
        answers: &[String],
        mode: Mode,
    ) -> Result<String> {
        let turn = &conv.turns[i];
        let chat = if conv.no_chat { None } else { self.chat };
        match chat {
            Some(t) => {
                let mut msgs = Vec::new();
                match mode {
                    Mode::MultiRequest => {
                        msgs.push(ChatMessage::new("user", Self::first_user(conv, turn)))
                    }
                    Mode::MultiTurn => {
                        for (j, tj) in conv.turns[..=i].iter().enumerate() {
                            let user = if j == 0 {
                                Self::first_user(conv, tj)
                            } else {
                                tj.question.clone()
                            };
                            msgs.push(ChatMessage::new("user", user));
                            if j < i {
                                msgs.push(ChatMessage::new(
                                    "assistant",
                                    format!("{} {}", tj.answer_prefix, answers[j])
                                        .trim()
                                        .to_string(),
                                ));
                            }
                        }
                    }
                }
                let mut s = t.render(&msgs, true)?;
                s.push_str(&turn.answer_prefix);
                Ok(s)
            }
            None => {
                let mut s = Self::first_user(conv, &conv.turns[0]);
                if mode == Mode::MultiTurn {
                    for (j, tj) in conv.turns[..i].iter().enumerate() {
                        s.push_str(conv.seps.prefix);
                        s.push_str(&tj.answer_prefix);
                        s.push(' ');
                        s.push_str(&answers[j]);
                        s.push_str("\n\n");
                        s.push_str(&conv.turns[j + 1].question);
                    }
                } else if i > 0 {
                    s = Self::first_user(conv, turn);
                }
                s.push_str(conv.seps.prefix);
                s.push_str(&turn.answer_prefix);
                Ok(s)
            }
        }
    }

    pub fn encode(&self, text: &str, with_bos: bool) -> Result<Vec<u32>> {
        self.tok.encode(text, with_bos, self.chat.is_some())
    }

    /// Tokens of plain text (no special-token parsing): for measuring and cutting contexts.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text, false, false)
    }

    /// Tokens of the first turn's full prompt: the prompt length a generator controls.
    pub fn first_prompt_tokens(&self, conv: &Conversation) -> Result<usize> {
        let text = self.render(conv, 0, &[], conv.mode)?;
        Ok(self.encode(&text, true)?.len())
    }
}

/// Finds the largest `n` in `0..=max_n` with `cost(n) ≤ budget`, for a cost that grows with `n` (tokens of a
/// prompt with `n` filler units). A small probe measures tokens per unit; extrapolating from it brackets the
/// answer just above it; interpolation (with bisection steps when it stalls) closes the bracket. A near-linear cost
/// needs a handful of probes, none much longer than the budget.
pub fn fit_units(
    budget: usize,
    max_n: usize,
    mut cost: impl FnMut(usize) -> Result<usize>,
) -> Result<usize> {
    let c0 = cost(0)?;
    if c0 > budget {
        bail!(
            "the prompt without any filler already takes {c0} tokens, over the {budget} tokens available; \
             ask for a longer length"
        );
    }
    if max_n == 0 {
        return Ok(0);
    }
    let (mut lo, mut clo) = (0usize, c0);
    let mut g = ((budget - c0) / 64).clamp(1, max_n);
    let (mut hi, mut chi) = loop {
        let c = cost(g)?;
        if c > budget {
            break (g, c);
        }
        (lo, clo) = (g, c);
        if g == max_n {
            return Ok(max_n);
        }
        let rate = ((clo - c0) as f64 / lo as f64).max(1e-3);
        let est = lo as f64 + (budget - clo) as f64 / rate;
        g = ((est * 1.01).ceil() as usize + 1).clamp(lo + 1, max_n);
    };
    let mut bisect = false;
    while hi - lo > 1 {
        let guess = if bisect || chi == clo {
            lo + (hi - lo) / 2
        } else {
            let x = lo as f64 + (budget - clo) as f64 * (hi - lo) as f64 / (chi - clo) as f64;
            (x.floor() as usize).clamp(lo + 1, hi - 1)
        };
        let c = cost(guess)?;
        let before = hi - lo;
        if c <= budget {
            (lo, clo) = (guess, c);
        } else {
            (hi, chi) = (guess, c);
        }
        // Interpolation that shrinks the bracket by less than half is followed by a bisection step.
        bisect = !bisect && (hi - lo) * 2 > before;
    }
    Ok(lo)
}

/// Builds the conversation whose first prompt plus the tokens to generate fills `target` tokens as closely as the
/// filler's granularity allows (never over): `build(n)` makes the conversation with `n` filler units.
/// Returns it with its prompt length in tokens.
pub fn fit_conversation(
    p: &Prompter,
    target: usize,
    max_units: usize,
    build: impl Fn(usize) -> Conversation,
) -> Result<(Conversation, usize)> {
    let max_new = build(0).turns.first().map_or(0, |t| t.max_new);
    if target <= max_new {
        bail!("length {target} leaves no room for a prompt after the {max_new} tokens to generate");
    }
    let n = fit_units(target - max_new, max_units, |n| {
        p.first_prompt_tokens(&build(n))
    })?;
    let conv = build(n);
    let t = p.first_prompt_tokens(&conv)?;
    Ok((conv, t))
}

/// Parses lengths like `1k,2k,4096,8K` (k = 1024).
pub fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (num, mul) = match p.strip_suffix(['k', 'K']) {
            Some(n) => (n, 1024.0),
            None => (p, 1.0),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("length '{p}': expected a token count like 4096 or 4k"))?;
        let n = (v * mul).round();
        if n.is_nan() || n < 1.0 {
            bail!("length '{p}' must be at least 1 token");
        }
        out.push(n as usize);
    }
    if out.is_empty() {
        bail!("no lengths given");
    }
    Ok(out)
}

/// Depths as a list (`0,50,100`) or a range (`0:100:10`).
pub fn parse_depths(s: &str) -> Result<Vec<f64>> {
    let bad = || {
        anyhow::anyhow!("--depths '{s}': expected a list like 0,50,100 or a range like 0:100:10")
    };
    let mut out = Vec::new();
    if s.contains(':') {
        let parts: Vec<f64> = s
            .split(':')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [a, b, step] = parts[..] else {
            return Err(bad());
        };
        if step <= 0.0 || b < a {
            return Err(bad());
        }
        let mut d = a;
        while d <= b + 1e-9 {
            out.push((d * 1e6).round() / 1e6);
            d += step;
        }
    } else {
        for p in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            out.push(p.parse::<f64>().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    if let Some(d) = out.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        bail!("depth {d} is outside 0..=100 percent");
    }
    Ok(out)
}

/// Short label of a length: 4096 → "4k", 1000 → "1000".
pub fn length_label(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// `all` or a comma-separated list of task names, each checked against `valid` (`what` names the benchmark in errors).
pub fn parse_task_list(s: &str, valid: &[&str], what: &str) -> Result<Vec<String>> {
    if s.trim() == "all" {
        return Ok(valid.iter().map(|t| t.to_string()).collect());
    }
    let mut out = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !valid.contains(&t) {
            bail!(
                "unknown {what} task '{t}' (valid: all, {})",
                valid.join(", ")
            );
        }
        out.push(t.to_string());
    }
    if out.is_empty() {
        bail!("no {what} task given (valid: all, {})", valid.join(", "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_parse() {
        assert_eq!(
            parse_depths("0:100:25").unwrap(),
            vec![0.0, 25.0, 50.0, 75.0, 100.0]
        );
        assert_eq!(parse_depths("0:100:10").unwrap().len(), 11);
        assert_eq!(parse_depths("0, 50,100").unwrap(), vec![0.0, 50.0, 100.0]);
        assert!(parse_depths("0:100").is_err());
        assert!(parse_depths("150").is_err());
        assert!(parse_depths("x").is_err());
    }

    #[test]
    fn rng_is_deterministic_and_uniformish() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut r = Rng::new(1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
        let u = r.uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(r.number7().len(), 7);
    }

    #[test]
    fn case_seeds_differ_by_part() {
        assert_ne!(case_seed(1, &["a", "b"]), case_seed(1, &["ab"]));
        assert_ne!(case_seed(1, &["a"]), case_seed(2, &["a"]));
        assert_eq!(case_seed(3, &["x", "1"]), case_seed(3, &["x", "1"]));
    }

    #[test]
    fn fit_finds_the_largest_fitting_count() {
        // A step cost: 10 + 3n + n/7.
        let f = |n: usize| 10 + 3 * n + n / 7;
        for budget in [10, 11, 100, 1000, 5000] {
            let mut probes = 0;
            let n = fit_units(budget, 100_000, |n| {
                probes += 1;
                Ok(f(n))
            })
            .unwrap();
            assert!(
                f(n) <= budget && f(n + 1) > budget,
                "budget {budget}: n {n}"
            );
            assert!(probes < 40, "{probes} probes");
        }
        assert!(fit_units(5, 10, |n| Ok(10 + n)).is_err());
        assert_eq!(fit_units(100, 10, |n| Ok(10 + n)).unwrap(), 10);
    }

    #[test]
    fn lengths_parse() {
        assert_eq!(
            parse_lengths("1k, 2K,4096").unwrap(),
            vec![1024, 2048, 4096]
        );
        assert_eq!(parse_lengths("0.5k").unwrap(), vec![512]);
        assert!(parse_lengths("abc").is_err());
        assert!(parse_lengths("0").is_err());
        assert_eq!(length_label(4096), "4k");
        assert_eq!(length_label(1000), "1000");
    }
}
