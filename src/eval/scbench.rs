//! SCBench-style shared-context tasks: one long context, several questions about it, in two modes
//! (see [`super::Mode`]): multi-turn (each turn appended to the cached KV, the previous turn's gold answer fed back
//! by default, the model's own with `--own-answers`) and multi-request (the context encoded once, every query
//! answered against that shared KV alone and then dropped with `Session::truncate`).
//!
//! Generated tasks (SCBench's own data is not needed; ours stands in for its HF dataset, inside SCBench's own
//! templates, see [`official`]):
//! - `kv`: a JSON object of UUID keys → UUID values (`JSON data:\n{…}`); each turn asks for one key's value.
//! - `prefix_suffix`: a list of random strings; each turn asks for the one with a given prefix and suffix.
//! - `vt`: one variable chain per turn (`VAR A = 12345.`, `VAR B = VAR A.`, ... three hops) hidden in noise;
//!   each turn asks, in RULER's words (SCBench's vt is RULER's), for every variable holding one chain's value.
//! - `mf`: one named list of integers per turn; each turn asks for its largest or smallest number.
//! - `many_shot`: in-context classification with made-up labels (each label stands for a topic: animals, fruits,
//!   tools, vehicles, instruments); each turn classifies a new input.
//! - `needles` (hayloft's, for models that SCBench's own tasks are beyond): one RULER-style needle per turn
//!   ("One of the special magic numbers for {key} is: {7 digits}.") spread over an essay haystack; each turn asks for
//!   a different needle, so a cache that kept only what the first question needed loses the later turns. It keeps
//!   hayloft's framing (instruction, blank lines, answer prefix after the question).
//!
//! Framing is SCBench's `eval_utils.py` (MInference fb56c91): the template tables, the multi-turn follow-ups and
//! the multi-request split (`tests/scbench_official.rs` holds the text against the official builders). Each turn's
//! input carries the words the answer follows ("…is:"), inside the user message as SCBench's data has them; a chat
//! template is used for instruct models (SCBench's scripts pass `--use_chat_template`), plain text otherwise.
//!
//! The length target covers the context plus the first question and its answer budget. Budgets and scores per turn
//! are SCBench's (`eval_utils.py`, `compute_scores.py`): kv and prefix_suffix 150 tokens, `label in pred`
//! (case-sensitive); mf 5 tokens (more where the tokenizer needs them for a 5-digit number), the first number equals
//! the label; vt 30 tokens, `string_match_all`; many_shot 10 tokens, any label in the upper-cased output; needles
//! (hayloft's) `string_match_all`. The case's score is the mean over turns and the report shows each turn's accuracy.

use anyhow::{bail, Result};

use super::haystack::{insert_needles, Haystacks, Source};
use super::{
    case_seed, fit_conversation, words, Case, CaseMeta, Conversation, Metric, Mode, Prompter, Rng,
    Turn,
};

pub const TASKS: &[&str] = &["kv", "prefix_suffix", "vt", "mf", "many_shot", "needles"];

pub fn parse_tasks(s: &str) -> Result<Vec<String>> {
    super::parse_task_list(s, TASKS, "SCBench")
}

pub fn parse_mode(s: &str) -> Result<Mode> {
    match s {
        "multi-turn" | "multiturn" | "turn" => Ok(Mode::MultiTurn),
        "multi-request" | "multirequest" | "request" => Ok(Mode::MultiRequest),
        _ => bail!("unknown SCBench mode '{s}' (valid: multi-turn, multi-request)"),
    }
}

/// The task name recorded in results (mode included: the two modes are different experiments).
pub fn task_name(task: &str, mode: Mode) -> String {
    format!(
        "scbench_{task}_{}",
        if mode == Mode::MultiTurn { "mt" } else { "mr" }
    )
}

fn turn(question: String, prefix: &str, answer: String, metric: Metric, max_new: usize) -> Turn {
    Turn {
        question,
        answer_prefix: prefix.to_string(),
        gold: answer.clone(),
        refs: vec![answer],
        metric,
        max_new,
    }
}

/// The score a task's turns get (SCBench's `compute_scores.py` per task; `needles` is hayloft's).
pub fn metric(task: &str) -> Option<Metric> {
    Some(match task {
        "kv" | "prefix_suffix" => Metric::Contains,
        "mf" => Metric::FirstNumber,
        "many_shot" => Metric::ContainsUpper,
        "vt" | "needles" => Metric::StringMatchAll,
        _ => return None,
    })
}

fn metric_of(task: &str) -> Metric {
    metric(task).unwrap_or(Metric::StringMatchAll)
}

/// SCBench's generation budgets (`eval_utils.py`'s `DATA_NAME_TO_MAX_NEW_TOKENS`).
const KV_TOKENS: usize = 150;
const PREFIX_SUFFIX_TOKENS: usize = 150;
const MF_TOKENS: usize = 5;
const VT_TOKENS: usize = 30;
const MANY_SHOT_TOKENS: usize = 10;

/// Indices of `k` distinct items among `n`, at fixed fractions of the list (so a case keeps its questions'
/// relative positions while the list length is tuned).
fn spread(fracs: &[f64], n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for f in fracs {
        let mut i = ((f * n as f64) as usize).min(n.saturating_sub(1));
        while out.contains(&i) && i + 1 < n {
            i += 1;
        }
        out.push(i);
    }
    out
}

const TOPICS: &[(&str, &[&str])] = &[
    (
        "animals",
        &[
            "otter", "badger", "camel", "heron", "lynx", "beaver", "gecko", "moose", "ferret",
            "bison",
        ],
    ),
    (
        "fruits",
        &[
            "mango", "plum", "apricot", "papaya", "lime", "cherry", "guava", "peach", "melon",
            "fig",
        ],
    ),
    (
        "tools",
        &[
            "hammer", "wrench", "chisel", "saw", "pliers", "drill", "trowel", "rake", "mallet",
            "file",
        ],
    ),
    (
        "vehicles",
        &[
            "tram", "scooter", "ferry", "truck", "glider", "canoe", "wagon", "sled", "bus", "jeep",
        ],
    ),
    (
        "instruments",
        &[
            "cello", "flute", "banjo", "oboe", "harp", "tuba", "violin", "drum", "lute", "organ",
        ],
    ),
];

/// What a task's generator works from: the case's random stream (already past the turns' positions), where each
/// turn's question points as a fraction of the list, the mode, the number of turns and the target length.
struct Gen<'a, 'p> {
    p: &'a Prompter<'p>,
    rng: Rng,
    fracs: Vec<f64>,
    mode: Mode,
    turns: usize,
    target: usize,
}

impl Gen<'_, '_> {
    /// Our data in SCBench's official template for `task` (see [`official`]).
    fn conv(&self, task: &str, context: String, turns: Vec<Turn>) -> Conversation {
        official(task, self.mode, context, turns)
    }

    /// hayloft's own framing (the `needles` task, which SCBench does not have): an instruction, blank lines around
    /// the context, the answer prefix after the question.
    fn own_conv(&self, preamble: &str, context: String, turns: Vec<Turn>) -> Conversation {
        Conversation {
            preamble: preamble.to_string(),
            context,
            turns,
            mode: self.mode,
            no_chat: false,
            seps: super::Seps::BLANK,
        }
    }
}

/// The instruction SCBench's template puts before the context (`multiturn_templates` / `multiturn_templates_scdq`
/// in `eval_utils.py`); tasks whose template is `{context}\n\n{input}` carry their instruction in the data.
fn instruction(task: &str) -> &'static str {
    match task {
        "kv" => "Extract the value corresponding to the specified key in the JSON object below.",
        _ => "",
    }
}

/// mf's question line: `What is {target}?`, where `target` is what the turn's input names, found as
/// `re.findall(r"The .+ is", input)[0].lower()[:-3]` finds it (the first "The " on a line, greedy to the last " is"
/// on that line, lower-cased, " is" dropped). `None` when the input has no such phrase.
pub fn mf_prefix(input: &str) -> Option<String> {
    for line in input.split('\n') {
        let Some(st) = line.find("The ") else {
            continue;
        };
        // `.+` takes at least one character after "The ", then backs off to the last " is".
        let rest = &line[st + 4..];
        let skip = rest.chars().next().map_or(0, char::len_utf8);
        if skip == 0 {
            continue;
        }
        if let Some(e) = rest[skip..].rfind(" is").map(|e| e + skip) {
            let target = format!("The {}", &rest[..e]).to_lowercase();
            return Some(format!("What is {target}?"));
        }
    }
    None
}

/// A conversation exactly as SCBench's `create_multiturn_prompt` (multi-turn) or `create_scdq_prompt`
/// (multi-request) frames it, around our data: `context` is the data's context and each turn's `question` the
/// data's per-turn `input` (ending where the answer starts; SCBench puts it in the user message, so there is no
/// separate answer prefix). What the runner renders from it:
/// - multi-turn, first turn: `{instruction}\n\n{context}\n\n{input}` (mf: `{What is …?}\n\n{context}\n\n{input}`);
///   later turns: the fed-back answer, then `\n\n{input}` (mf: `\n\n{What is …?}\n\n{input}`) as plain text, or an
///   assistant message with the answer and a user message with `{input}` (mf: `{What is …?}\n\n{input}`) under a
///   chat template;
/// - multi-request: the shared part is `{instruction}\n\n{context}` (mf: the first turn's input, then the
///   context), and each query continues it with nothing in between: `{input}` (mf: `{What is …?}\n\n{input}`),
///   the user message closed and the assistant's header opened under a chat template.
pub fn official(task: &str, mode: Mode, context: String, mut turns: Vec<Turn>) -> Conversation {
    let mut preamble = instruction(task).to_string();
    if task == "mf" {
        let prefixes: Vec<String> = turns
            .iter()
            .map(|t| mf_prefix(&t.question).unwrap_or_default())
            .collect();
        // Multi-turn opens with the first turn's question line; multi-request with the first turn's whole input
        // (`create_scdq_prompt` formats `prefix=eg["multi_turns"][0]["input"]`).
        preamble = match mode {
            Mode::MultiTurn => prefixes.first().cloned().unwrap_or_default(),
            Mode::MultiRequest => turns
                .first()
                .map(|t| t.question.clone())
                .unwrap_or_default(),
        };
        for (i, (t, pre)) in turns.iter_mut().zip(&prefixes).enumerate() {
            if i > 0 || mode == Mode::MultiRequest {
                t.question = format!("{pre}\n\n{}", t.question);
            }
        }
    }
    for t in &mut turns {
        t.answer_prefix.clear();
    }
    let seps = super::Seps {
        preamble: "\n\n",
        question: if mode == Mode::MultiTurn { "\n\n" } else { "" },
        prefix: "",
    };
    Conversation {
        preamble,
        context,
        turns,
        mode,
        no_chat: false,
        seps,
    }
}

/// A task's generator: its conversation fitted to the target length.
type TaskFn = fn(&mut Gen, &mut Haystacks) -> Result<Conversation>;

/// Every task by name (the names of [`TASKS`], in order).
const GENERATORS: &[(&str, TaskFn)] = &[
    ("kv", kv),
    ("prefix_suffix", prefix_suffix),
    ("vt", vt),
    ("mf", mf),
    ("many_shot", many_shot),
    ("needles", needles),
];

/// One needle per turn in the essays, each turn asking for a different one.
fn needles(g: &mut Gen, hays: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let keys = words::distinct_keys(&mut g.rng, turns);
    let values: Vec<String> = (0..turns)
        .map(|_| g.rng.range(1_000_000, 9_999_999).to_string())
        .collect();
    // Needles spread over the haystack (each turn's fraction), asked in turn order.
    let placed: Vec<(f64, String)> = keys
        .iter()
        .zip(&values)
        .zip(&g.fracs)
        .map(|((k, v), f)| {
            (
                f * 100.0,
                format!("One of the special magic numbers for {k} is: {v}."),
            )
        })
        .collect();
    let ts: Vec<Turn> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| {
            turn(
                format!("What is the special magic number for {k} mentioned in the provided text?"),
                &format!("The special magic number for {k} mentioned in the provided text is"),
                v.clone(),
                metric_of("needles"),
                16,
            )
        })
        .collect();
    let hay = hays.get(Source::Essays, target)?;
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, hay.words(), |n| {
        g.own_conv(
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. I will \
             quiz you about the numbers afterwards.",
            insert_needles(hay.prefix(n), &placed),
            ts.clone(),
        )
    })?;
    Ok(c)
}

/// One SCBench case of `task` with `turns` turns.
#[allow(clippy::too_many_arguments)]
pub fn case(
    p: &Prompter,
    hays: &mut Haystacks,
    task: &str,
    mode: Mode,
    turns: usize,
    target: usize,
    sample: usize,
    seed: u64,
) -> Result<Case> {
    if turns == 0 {
        bail!("--turns must be at least 1");
    }
    let name = task_name(task, mode);
    let cs = case_seed(
        seed,
        &[
            &name,
            &target.to_string(),
            &sample.to_string(),
            &turns.to_string(),
        ],
    );
    let mut rng = Rng::new(cs);
    let fracs: Vec<f64> = (0..turns).map(|_| rng.unit()).collect();
    let Some(&(_, make)) = GENERATORS.iter().find(|(n, _)| *n == task) else {
        bail!(
            "unknown SCBench task '{task}' (valid: {})",
            TASKS.join(", ")
        );
    };
    let mut g = Gen {
        p,
        rng,
        fracs,
        mode,
        turns,
        target,
    };
    Ok(Case {
        meta: CaseMeta {
            task: name,
            target_len: target,
            depth: None,
            sample,
            seed,
        },
        conv: make(&mut g, hays)?,
    })
}

/// A JSON object of UUID keys → UUID values; each turn asks for one key's value.
fn kv(g: &mut Gen, _: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let max = target / 30 + turns + 8;
    let pairs: Vec<(String, String)> = (0..max).map(|_| (g.rng.uuid(), g.rng.uuid())).collect();
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, max, |n| {
        let n = n.max(turns);
        let body: Vec<String> = pairs[..n]
            .iter()
            .map(|(k, v)| format!("\"{k}\": \"{v}\""))
            .collect();
        let ts = spread(&g.fracs, n)
            .into_iter()
            .map(|i| {
                turn(
                    format!(
                        "Key: \"{}\"\nThe value associated with the specified key is:",
                        pairs[i].0
                    ),
                    "",
                    pairs[i].1.clone(),
                    metric_of("kv"),
                    KV_TOKENS,
                )
            })
            .collect();
        g.conv("kv", format!("JSON data:\n{{{}}}", body.join(", ")), ts)
    })?;
    Ok(c)
}

/// A list of random strings; each turn asks for the one with a given prefix and suffix.
fn prefix_suffix(g: &mut Gen, _: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let max = target / 6 + turns + 8;
    let items: Vec<String> = (0..max)
        .map(|_| {
            (0..16)
                .map(|_| (b'a' + g.rng.below(26) as u8) as char)
                .collect()
        })
        .collect();
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, max, |n| {
        let n = n.max(turns);
        let ts = spread(&g.fracs, n)
            .into_iter()
            .map(|i| {
                let s = &items[i];
                turn(
                    format!(
                        "Which string in the list above starts with \"{}\" and ends with \"{}\"?\nThe string \
                         is:",
                        &s[..4],
                        &s[12..]
                    ),
                    "",
                    s.clone(),
                    metric_of("prefix_suffix"),
                    PREFIX_SUFFIX_TOKENS,
                )
            })
            .collect();
        g.conv(
            "prefix_suffix",
            format!("Here is a list of strings.\n\n{}", items[..n].join("\n")),
            ts,
        )
    })?;
    Ok(c)
}

/// One three-hop variable chain per turn hidden in noise; each turn asks for every variable holding its value.
fn vt(g: &mut Gen, hays: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let rng = &mut g.rng;
    let mut names: Vec<String> = Vec::new();
    while names.len() < turns * 4 {
        let v: String = (0..5)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect();
        if !names.contains(&v) {
            names.push(v);
        }
    }
    let mut placed: Vec<(f64, String)> = Vec::new();
    let mut ts = Vec::new();
    for c in 0..turns {
        let chain = &names[c * 4..c * 4 + 4];
        let value = rng.range(10_000, 99_999).to_string();
        let mut depths: Vec<f64> = (0..4).map(|_| rng.unit() * 100.0).collect();
        depths.sort_by(f64::total_cmp);
        placed.push((depths[0], format!("VAR {} = {value}.", chain[0])));
        for h in 1..4 {
            placed.push((
                depths[h],
                format!("VAR {} = VAR {}.", chain[h], chain[h - 1]),
            ));
        }
        // SCBench's vt comes from RULER: RULER's question and answer lead (its trailing space left out).
        ts.push(Turn {
            question: format!(
                "Question: Find all variables that are assigned the value {value} in the text above. Answer: \
                 According to the chain(s) of variable assignment in the text above, {} variables are assigned \
                 the value {value}, they are:",
                chain.len()
            ),
            answer_prefix: String::new(),
            gold: chain.join(", "),
            refs: chain.to_vec(),
            metric: metric_of("vt"),
            max_new: VT_TOKENS,
        });
    }
    let hay = hays.get(Source::Noise, target)?;
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, hay.words(), |n| {
        g.conv(
            "vt",
            format!(
                "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{}",
                insert_needles(hay.prefix(n), &placed)
            ),
            ts.clone(),
        )
    })?;
    Ok(c)
}

/// One named list of integers per turn; each turn asks for its largest or smallest number.
fn mf(g: &mut Gen, _: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let max = target / 2 + 8;
    let nums: Vec<u64> = (0..max).map(|_| g.rng.range(1, 99_999)).collect();
    let labels: Vec<String> = words::distinct_keys(&mut g.rng, turns);
    let wants: Vec<bool> = (0..turns).map(|_| g.rng.below(2) == 0).collect();
    // SCBench's 5 tokens fit its models' answers (Llama 3 writes up to 3 digits a token); a tokenizer with one
    // digit a token gets what the widest number here takes.
    let max_new = MF_TOKENS.max(g.p.encode_plain(" 99999")?.len());
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, max, |n| {
        let per = (n / turns).max(2);
        let mut body = String::new();
        let mut ts = Vec::new();
        for (i, label) in labels.iter().enumerate() {
            let xs = &nums[(i * per).min(max - per)..(i * per).min(max - per) + per];
            body.push_str(&format!(
                "List {label}: {}\n",
                xs.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let (word, v) = if wants[i] {
                ("largest", xs.iter().max().copied().unwrap_or(0))
            } else {
                ("smallest", xs.iter().min().copied().unwrap_or(0))
            };
            // SCBench's mf input names its target as "The … is"; the template derives "What is …?" from it.
            ts.push(turn(
                format!("The {word} number in list {label} is:"),
                "",
                v.to_string(),
                metric_of("mf"),
                max_new,
            ));
        }
        g.conv(
            "mf",
            format!("Here are some lists of numbers.\n\n{body}"),
            ts,
        )
    })?;
    Ok(c)
}

/// In-context classification with made-up labels, each standing for a topic; each turn classifies a new input.
fn many_shot(g: &mut Gen, _: &mut Haystacks) -> Result<Conversation> {
    let (target, turns) = (g.target, g.turns);
    let rng = &mut g.rng;
    let mut labels: Vec<String> = Vec::new();
    while labels.len() < TOPICS.len() {
        let l = words::coined(rng, 2);
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let example = |rng: &mut Rng| {
        let t = rng.below(TOPICS.len());
        let noun = rng.choose(TOPICS[t].1);
        let adj = rng.choose(words::ADJECTIVES);
        let place = rng.choose(words::NOUNS);
        (format!("A {adj} {noun} was found near the {place}."), t)
    };
    let max = target / 12 + 8;
    let shots: Vec<(String, usize)> = (0..max).map(|_| example(rng)).collect();
    let queries: Vec<(String, usize)> = (0..turns).map(|_| example(rng)).collect();
    let ts: Vec<Turn> = queries
        .iter()
        .map(|(q, t)| {
            turn(
                format!(
                    "Give the label of this input, using the labels of the examples above.\nInput: {q}\nLabel:"
                ),
                "",
                labels[*t].clone(),
                metric_of("many_shot"),
                MANY_SHOT_TOKENS,
            )
        })
        .collect();
    let g = &*g;
    let (c, _) = fit_conversation(g.p, target, max, |n| {
        let body: Vec<String> = shots[..n]
            .iter()
            .map(|(s, t)| format!("Input: {s}\nLabel: {}", labels[*t]))
            .collect();
        g.conv(
            "many_shot",
            format!("Here are labelled examples.\n\n{}", body.join("\n\n")),
            ts.clone(),
        )
    })?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_has_a_generator() {
        let names: Vec<&str> = GENERATORS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, TASKS);
        assert!(TASKS.iter().all(|t| metric(t).is_some()));
    }
}
