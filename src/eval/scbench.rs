//! SCBench-style shared-context tasks: one long context, several questions about it, in two modes
//! (see [`super::Mode`]): multi-turn (each turn appended to the cached KV, the previous turn's gold answer fed back
//! by default, the model's own with `--own-answers`) and multi-request (the context encoded once, every query
//! answered against that shared KV alone and then dropped with `Session::truncate`).
//!
//! Generated tasks (SCBench's own data is not needed):
//! - `kv`: a JSON object of UUID keys → UUID values; each turn asks for one key's value.
//! - `prefix_suffix`: a list of random strings; each turn asks for the one with a given prefix and suffix.
//! - `vt`: one variable chain per turn (`VAR A = 12345.`, `VAR B = VAR A.`, ... three hops) hidden in noise;
//!   each turn asks for every variable holding one chain's value.
//! - `mf`: one named list of integers per turn; each turn asks for its largest or smallest number.
//! - `many_shot`: in-context classification with made-up labels (each label stands for a topic: animals, fruits,
//!   tools, vehicles, instruments); each turn classifies a new input.
//!
//! The length target covers the context plus the first question and its answer budget. Score per turn:
//! `string_match_all` (the reference contained in the output) × 100; the case's score is the mean over turns
//! and the report shows each turn's accuracy.

use anyhow::{bail, Result};

use super::haystack::{insert_needles, Haystacks, Source};
use super::{
    case_seed, fit_conversation, words, Case, CaseMeta, Conversation, Metric, Mode, Prompter, Rng,
    Turn,
};

pub const TASKS: &[&str] = &["kv", "prefix_suffix", "vt", "mf", "many_shot"];

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

fn turn(question: String, prefix: &str, answer: String, max_new: usize) -> Turn {
    Turn {
        question,
        answer_prefix: prefix.to_string(),
        gold: answer.clone(),
        refs: vec![answer],
        metric: Metric::StringMatchAll,
        max_new,
    }
}

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
    let conv = |preamble: &str, context: String, ts: Vec<Turn>| Conversation {
        preamble: preamble.to_string(),
        context,
        turns: ts,
        mode,
        no_chat: false,
    };
    let (c, _) = match task {
        "kv" => {
            let max = target / 30 + turns + 8;
            let pairs: Vec<(String, String)> = (0..max).map(|_| (rng.uuid(), rng.uuid())).collect();
            fit_conversation(p, target, max, |n| {
                let n = n.max(turns);
                let body: Vec<String> = pairs[..n]
                    .iter()
                    .map(|(k, v)| format!("\"{k}\": \"{v}\""))
                    .collect();
                let ts = spread(&fracs, n)
                    .into_iter()
                    .map(|i| {
                        turn(
                            format!(
                                "Extract the value corresponding to the specified key in the JSON object above. \
                                 Key: \"{}\"",
                                pairs[i].0
                            ),
                            "The value associated with the specified key is:",
                            pairs[i].1.clone(),
                            50,
                        )
                    })
                    .collect();
                conv("JSON data:", format!("{{{}}}", body.join(", ")), ts)
            })?
        }
        "prefix_suffix" => {
            let max = target / 6 + turns + 8;
            let items: Vec<String> = (0..max)
                .map(|_| {
                    (0..16)
                        .map(|_| (b'a' + rng.below(26) as u8) as char)
                        .collect()
                })
                .collect();
            fit_conversation(p, target, max, |n| {
                let n = n.max(turns);
                let ts = spread(&fracs, n)
                    .into_iter()
                    .map(|i| {
                        let s = &items[i];
                        turn(
                            format!(
                                "Which string in the list above starts with \"{}\" and ends with \"{}\"?",
                                &s[..4],
                                &s[12..]
                            ),
                            "The string is:",
                            s.clone(),
                            24,
                        )
                    })
                    .collect();
                conv("Here is a list of strings.", items[..n].join("\n"), ts)
            })?
        }
        "vt" => {
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
                ts.push(Turn {
                    question: format!("Find all variables that are assigned the value {value} in the text above."),
                    answer_prefix: format!(
                        "According to the chains of variable assignment in the text above, the variables assigned \
                         the value {value} are:"
                    ),
                    gold: chain.join(", "),
                    refs: chain.to_vec(),
                    metric: Metric::StringMatchAll,
                    max_new: 30,
                });
            }
            let hay = hays.get(Source::Noise, target)?;
            fit_conversation(p, target, hay.words(), |n| {
                conv(
                    "Memorize and track the chains of variable assignment hidden in the following text.",
                    insert_needles(hay.prefix(n), &placed),
                    ts.clone(),
                )
            })?
        }
        "mf" => {
            let max = target / 2 + 8;
            let nums: Vec<u64> = (0..max).map(|_| rng.range(1, 99_999)).collect();
            let labels: Vec<String> = words::distinct_keys(&mut rng, turns);
            let wants: Vec<bool> = (0..turns).map(|_| rng.below(2) == 0).collect();
            fit_conversation(p, target, max, |n| {
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
                    ts.push(turn(
                        format!("What is the {word} number in list {label}?"),
                        &format!("The {word} number in list {label} is"),
                        v.to_string(),
                        16,
                    ));
                }
                conv("Here are some lists of numbers.", body, ts)
            })?
        }
        "many_shot" => {
            let mut labels: Vec<String> = Vec::new();
            while labels.len() < TOPICS.len() {
                let l = words::coined(&mut rng, 2);
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
            let shots: Vec<(String, usize)> = (0..max).map(|_| example(&mut rng)).collect();
            let queries: Vec<(String, usize)> = (0..turns).map(|_| example(&mut rng)).collect();
            let ts: Vec<Turn> = queries
                .iter()
                .map(|(q, t)| {
                    turn(
                        format!("Give the label of this input, using the labels of the examples above.\nInput: {q}"),
                        "Label:",
                        labels[*t].clone(),
                        8,
                    )
                })
                .collect();
            fit_conversation(p, target, max, |n| {
                let body: Vec<String> = shots[..n]
                    .iter()
                    .map(|(s, t)| format!("Input: {s}\nLabel: {}", labels[*t]))
                    .collect();
                conv("Here are labelled examples.", body.join("\n\n"), ts.clone())
            })?
        }
        _ => bail!(
            "unknown SCBench task '{task}' (valid: {})",
            TASKS.join(", ")
        ),
    };
    Ok(Case {
        meta: CaseMeta {
            task: name,
            target_len: target,
            depth: None,
            sample,
            seed,
        },
        conv: c,
    })
}
