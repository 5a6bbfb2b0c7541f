//! RULER's synthetic tasks (NVIDIA RULER, `synthetic.yaml`), generated here with the same structure, templates and
//! answer budgets; sizes found by searching the filler amount so prompt + tokens to generate ≤ target length.
//!
//! | task | haystack | keys → values | needles |
//! | --- | --- | --- | --- |
//! | niah_single_1 | noise | words → numbers | 1 |
//! | niah_single_2 | essays | words → numbers | 1 |
//! | niah_single_3 | essays | words → UUIDs | 1 |
//! | niah_multikey_1 | essays | words → numbers | 4 keys, 1 asked |
//! | niah_multikey_2 | other needles | words → numbers | 1 among many distractor needles |
//! | niah_multikey_3 | other needles | UUIDs → UUIDs | 1 among many distractor needles |
//! | niah_multivalue | essays | words → numbers | 1 key, 4 values |
//! | niah_multiquery | essays | words → numbers | 4 keys, all 4 asked |
//! | vt | noise | one chain `VAR A = 12345`, 4 hops | answer: the 5 variable names |
//! | cwe | numbered word list | 10 words × 30 (fewer when short), others × 3 | answer: the 10 common words |
//! | fwe | coded words, Zipf α = 2 | rank 1 is "...." noise | answer: ranks 2–4 |
//!
//! Differences from RULER: keys come from a shipped adjective/noun list (RULER uses wonderwords), cwe draws its
//! words from that list plus coined words and has no worked example in the prompt, fwe's coded words use a seeded
//! generator; qa_1/qa_2 need SQuAD/HotpotQA and are not generated. Score: `string_match_all` × 100.

use anyhow::{bail, Result};

use super::haystack::{insert_needles, Haystacks, Source};
use super::niah::join_and;
use super::{
    case_seed, fit_conversation, words, Case, CaseMeta, Conversation, Metric, Mode, Prompter, Rng,
    Turn,
};

pub const TASKS: &[&str] = &[
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
];

/// `all` or a comma-separated list, checked against [`TASKS`].
pub fn parse_tasks(s: &str) -> Result<Vec<String>> {
    super::parse_task_list(s, TASKS, "RULER")
}

#[derive(Clone, Copy, PartialEq)]
enum Hay {
    Noise,
    Essays,
    Needles,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Words,
    Numbers,
    Uuids,
}

struct NiahCfg {
    hay: Hay,
    key: Kind,
    value: Kind,
    k: usize,
    v: usize,
    q: usize,
}

fn niah_cfg(task: &str) -> Option<NiahCfg> {
    use Hay::*;
    use Kind::*;
    let c = |hay, key, value, k, v, q| NiahCfg {
        hay,
        key,
        value,
        k,
        v,
        q,
    };
    Some(match task {
        "niah_single_1" => c(Noise, Words, Numbers, 1, 1, 1),
        "niah_single_2" => c(Essays, Words, Numbers, 1, 1, 1),
        "niah_single_3" => c(Essays, Words, Uuids, 1, 1, 1),
        "niah_multikey_1" => c(Essays, Words, Numbers, 4, 1, 1),
        "niah_multikey_2" => c(Needles, Words, Numbers, 1, 1, 1),
        "niah_multikey_3" => c(Needles, Uuids, Uuids, 1, 1, 1),
        "niah_multivalue" => c(Essays, Words, Numbers, 1, 4, 1),
        "niah_multiquery" => c(Essays, Words, Numbers, 4, 1, 4),
        _ => return None,
    })
}

fn draw(rng: &mut Rng, kind: Kind) -> String {
    match kind {
        Kind::Words => words::key(rng),
        Kind::Numbers => rng.number7(),
        Kind::Uuids => rng.uuid(),
    }
}

/// One RULER case of `task` at `target` tokens.
pub fn case(
    prompter: &Prompter,
    hays: &mut Haystacks,
    task: &str,
    target: usize,
    sample: usize,
    seed: u64,
) -> Result<Case> {
    let cs = case_seed(
        seed,
        &["ruler", task, &target.to_string(), &sample.to_string()],
    );
    let mut rng = Rng::new(cs);
    let conv = if let Some(cfg) = niah_cfg(task) {
        niah(prompter, hays, &cfg, target, &mut rng)?
    } else {
        match task {
            "vt" => vt(prompter, hays, target, &mut rng)?,
            "cwe" => cwe(prompter, target, &mut rng)?,
            "fwe" => fwe(prompter, target, &mut rng)?,
            _ => bail!("unknown RULER task '{task}' (valid: {})", TASKS.join(", ")),
        }
    };
    Ok(Case {
        meta: CaseMeta {
            task: format!("ruler_{task}"),
            target_len: target,
            depth: None,
            sample,
            seed,
        },
        conv,
    })
}

fn one_turn(question: String, prefix: String, refs: Vec<String>, max_new: usize) -> Vec<Turn> {
    vec![Turn {
        question,
        answer_prefix: prefix,
        gold: refs.join(", "),
        refs,
        metric: Metric::StringMatchAll,
        max_new,
    }]
}

fn niah(
    p: &Prompter,
    hays: &mut Haystacks,
    c: &NiahCfg,
    target: usize,
    rng: &mut Rng,
) -> Result<Conversation> {
    let vname = if c.value == Kind::Uuids {
        "uuids"
    } else {
        "numbers"
    };
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < c.k {
        let k = draw(rng, c.key);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<Vec<String>> = keys
        .iter()
        .map(|_| (0..c.v).map(|_| draw(rng, c.value)).collect())
        .collect();
    let mut needles: Vec<String> = Vec::new();
    for (k, vs) in keys.iter().zip(&values) {
        for v in vs {
            needles.push(format!("One of the special magic {vname} for {k} is: {v}."));
        }
    }
    rng.shuffle(&mut needles);
    let mut asked: Vec<usize> = (0..c.k).collect();
    rng.shuffle(&mut asked);
    asked.truncate(c.q);
    let queries: Vec<String> = asked.iter().map(|&i| keys[i].clone()).collect();
    let answers: Vec<String> = asked.iter().flat_map(|&i| values[i].clone()).collect();
    let query = join_and(&queries);
    // Singular wording when exactly one value is asked for.
    let vq = if answers.len() == 1 {
        &vname[..vname.len() - 1]
    } else {
        vname
    };
    let question = if answers.len() == 1 {
        format!("What is the special magic {vq} for {query} mentioned in the provided text?")
    } else {
        format!("What are all the special magic {vq} for {query} mentioned in the provided text?")
    };
    let prefix = format!(
        "The special magic {vq} for {query} mentioned in the provided text {}",
        if answers.len() == 1 { "is" } else { "are" }
    );
    let preamble = format!(
        "Some special magic {vname} are hidden within the following text. Make sure to memorize it. \
         I will quiz you about the {vname} afterwards."
    );
    let turns = one_turn(question, prefix, answers, 128);
    // Depths: RULER samples them from a 40-point grid without replacement (needles in sampled order).
    let mut grid: Vec<f64> = (0..40).map(|i| i as f64 * 100.0 / 39.0).collect();
    rng.shuffle(&mut grid);
    let mut depths: Vec<f64> = grid[..needles.len()].to_vec();
    depths.sort_by(f64::total_cmp);
    match c.hay {
        Hay::Noise | Hay::Essays => {
            let src = if c.hay == Hay::Noise {
                Source::Noise
            } else {
                Source::Essays
            };
            let hay = hays.get(src, target)?;
            let placed: Vec<(f64, String)> = depths.into_iter().zip(needles).collect();
            let build = |n: usize| Conversation {
                preamble: preamble.clone(),
                context: insert_needles(hay.prefix(n), &placed),
                turns: turns.clone(),
                mode: Mode::MultiTurn,
                no_chat: false,
            };
            Ok(fit_conversation(p, target, hay.words(), build)?.0)
        }
        Hay::Needles => {
            // Distractor needles with fresh keys and values; the real ones at random positions among them.
            let max = target / 8 + 8;
            let distract: Vec<String> = (0..max)
                .map(|_| {
                    format!(
                        "One of the special magic {vname} for {} is: {}.",
                        draw(rng, c.key),
                        draw(rng, c.value)
                    )
                })
                .collect();
            let build = |n: usize| {
                let mut lines: Vec<&str> = distract[..n].iter().map(String::as_str).collect();
                for (d, nd) in depths.iter().zip(&needles) {
                    let at = ((d / 100.0) * lines.len() as f64).round() as usize;
                    lines.insert(at.min(lines.len()), nd);
                }
                Conversation {
                    preamble: preamble.clone(),
                    context: lines.join("\n"),
                    turns: turns.clone(),
                    mode: Mode::MultiTurn,
                    no_chat: false,
                }
            };
            Ok(fit_conversation(p, target, max, build)?.0)
        }
    }
}

fn var_name(rng: &mut Rng) -> String {
    (0..5)
        .map(|_| (b'A' + rng.below(26) as u8) as char)
        .collect()
}

fn vt(p: &Prompter, hays: &mut Haystacks, target: usize, rng: &mut Rng) -> Result<Conversation> {
    let hops = 4;
    let mut names: Vec<String> = Vec::new();
    while names.len() < hops + 1 {
        let v = var_name(rng);
        if !names.contains(&v) {
            names.push(v);
        }
    }
    let value = rng.range(10_000, 99_999).to_string();
    let mut stmts = vec![format!("VAR {} = {value}.", names[0])];
    for i in 1..=hops {
        stmts.push(format!("VAR {} = VAR {}.", names[i], names[i - 1]));
    }
    let mut depths: Vec<f64> = (0..stmts.len()).map(|_| rng.unit() * 100.0).collect();
    depths.sort_by(f64::total_cmp);
    let placed: Vec<(f64, String)> = depths.into_iter().zip(stmts).collect();
    let hay = hays.get(Source::Noise, target)?;
    let turns = one_turn(
        format!("Question: Find all variables that are assigned the value {value} in the text above."),
        format!(
            "Answer: According to the chain(s) of variable assignment in the text above, {} variables are \
             assigned the value {value}, they are:",
            hops + 1
        ),
        names,
        30,
    );
    let build = |n: usize| Conversation {
        preamble:
            "Memorize and track the chain(s) of variable assignment hidden in the following text."
                .into(),
        context: insert_needles(hay.prefix(n), &placed),
        turns: turns.clone(),
        mode: Mode::MultiTurn,
        no_chat: false,
    };
    Ok(fit_conversation(p, target, hay.words(), build)?.0)
}

fn cwe(p: &Prompter, target: usize, rng: &mut Rng) -> Result<Conversation> {
    let num_cw = 10;
    let max_ucw = target / 2 + 16;
    let vocab = words::distinct_words(rng, num_cw + max_ucw);
    let (common, rare) = vocab.split_at(num_cw);
    // A fixed shuffle key per word occurrence so that adding words keeps the order of the others stable.
    let turns = one_turn(
        format!("Question: What are the {num_cw} most common words in the above list?"),
        format!("Answer: The top {num_cw} words that appear most often in the list are:"),
        common.to_vec(),
        120,
    );
    let shuffle_seed = rng.next_u64();
    let build_with = |freq_cw: usize, freq_ucw: usize, n: usize| {
        let mut list: Vec<(u64, &str)> = Vec::new();
        let mut r = Rng::new(shuffle_seed);
        for w in common {
            for _ in 0..freq_cw {
                list.push((r.next_u64(), w));
            }
        }
        for w in &rare[..n] {
            for _ in 0..freq_ucw {
                list.push((r.next_u64(), w));
            }
        }
        list.sort();
        let context = list
            .iter()
            .enumerate()
            .map(|(i, (_, w))| format!("{}. {w}", i + 1))
            .collect::<Vec<_>>()
            .join(" ");
        Conversation {
            preamble: "Below is a numbered list of words. In these words, some appear more often than others. \
                       Memorize the ones that appear most often."
                .into(),
            context,
            turns: turns.clone(),
            mode: Mode::MultiTurn,
            no_chat: false,
        }
    };
    // RULER's frequencies (30 for common, 3 for the others) when they fit; fewer repetitions for short lengths.
    let mut last_err = None;
    for freq_cw in [30, 20, 10, 6, 4] {
        let freq_ucw = if freq_cw > 6 { 3 } else { 1 };
        match fit_conversation(p, target, max_ucw, |n| build_with(freq_cw, freq_ucw, n)) {
            Ok((c, _)) => return Ok(c),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("cwe does not fit")))
}

fn fwe(p: &Prompter, target: usize, rng: &mut Rng) -> Result<Conversation> {
    let vocab_size = 2000;
    let mut vocab: Vec<String> = Vec::with_capacity(vocab_size);
    let mut seen = std::collections::HashSet::new();
    while vocab.len() < vocab_size {
        let w: String = (0..6)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab[0] = "....".into();
    let answers: Vec<String> = vocab[1..4].to_vec();
    let turns = one_turn(
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most \
         frequently appeared words in the above coded text?"
            .into(),
        "Answer: According to the coded text above, the three most frequently appeared words are:".into(),
        answers,
        50,
    );
    let zeta2 = std::f64::consts::PI * std::f64::consts::PI / 6.0;
    let shuffle_seed = rng.next_u64();
    let build = |n: usize| {
        let mut list: Vec<(u64, &str)> = Vec::new();
        let mut r = Rng::new(shuffle_seed);
        for (k, w) in vocab.iter().enumerate() {
            let cnt = (n as f64 * ((k + 1) as f64).powf(-2.0) / zeta2) as usize;
            for _ in 0..cnt {
                list.push((r.next_u64(), w));
            }
        }
        list.sort();
        Conversation {
            preamble: "Read the following coded text and track the frequency of each coded word. Find the three \
                       most frequently appeared coded words."
                .into(),
            context: list.iter().map(|(_, w)| *w).collect::<Vec<_>>().join(" "),
            turns: turns.clone(),
            mode: Mode::MultiTurn,
            no_chat: false,
        }
    };
    Ok(fit_conversation(p, target, target * 2, build)?.0)
}
