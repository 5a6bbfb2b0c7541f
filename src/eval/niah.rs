//! Needle in a haystack (Kamradt): a fact hidden at a chosen depth of a long filler text, asked for after it.
//!
//! Haystack: Paul Graham's essays (default) or RULER's noise sentences, cut to the word count that makes prompt +
//! tokens to generate fill the target length. Needles go in at the sentence boundary nearest the depth (share of
//! the haystack's bytes). Needles:
//! - `number` (default): RULER's "One of the special magic numbers for {key} is: {value}." with a random
//!   adjective-noun key and 7-digit value, so the model cannot know the answer beforehand. With `needles` > 1 the
//!   first needle sits at the depth and the others are spread evenly over the rest (Kamradt's multi-needle
//!   placement); the question asks for all values and the score is the share found (`string_match_all`).
//! - `kamradt`: the original "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a
//!   sunny day."; prompted as Kamradt's OpenAI provider does (the context, then "What is the best thing to do in San
//!   Francisco? Don't give information outside the document or repeat your findings", no answer prefix; its system
//!   message and its split into two user messages are not reproduced: hayloft's prompt is one user turn); scored by
//!   whether "sandwich" and "Dolores Park" both appear (`string_match_all`, partial credit) where Kamradt asks a
//!   GPT-4 judge.

use anyhow::{bail, Result};

use super::haystack::{insert_needles, Haystacks, Source};
use super::{
    case_seed, fit_conversation, words, Case, CaseMeta, Conversation, Metric, Mode, Prompter, Rng,
    Turn,
};

pub const KAMRADT_NEEDLE: &str =
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";

/// Which needle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needle {
    Number,
    Kamradt,
}

impl Needle {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "number" => Ok(Needle::Number),
            "kamradt" | "sandwich" => Ok(Needle::Kamradt),
            _ => bail!("unknown needle '{s}' (valid: number, kamradt)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NiahParams {
    pub haystack: Source,
    pub needle: Needle,
    pub needles: usize,
    pub max_new: usize,
}

impl Default for NiahParams {
    fn default() -> Self {
        NiahParams {
            haystack: Source::Essays,
            needle: Needle::Number,
            needles: 1,
            max_new: 64,
        }
    }
}

/// The task name recorded in results.
pub fn task_name(p: &NiahParams) -> String {
    let mut s = format!("niah_{}", p.haystack.name());
    if p.needle == Needle::Kamradt {
        s.push_str("_kamradt");
    }
    if p.needles > 1 {
        s.push_str(&format!("_{}needles", p.needles));
    }
    s
}

/// Depths of the needles: the first at `depth`, the rest evenly over what remains.
pub fn needle_depths(depth: f64, k: usize) -> Vec<f64> {
    (0..k)
        .map(|i| depth + i as f64 * (100.0 - depth) / k as f64)
        .collect()
}

/// One NIAH case: `target` tokens (prompt + tokens to generate), needle(s) at `depth` percent.
pub fn case(
    prompter: &Prompter,
    hays: &mut Haystacks,
    params: &NiahParams,
    target: usize,
    depth: f64,
    sample: usize,
    seed: u64,
) -> Result<Case> {
    if !(0.0..=100.0).contains(&depth) {
        bail!("depth {depth} is outside 0..=100 percent");
    }
    if params.needles == 0 {
        bail!("--needles must be at least 1");
    }
    if params.needle == Needle::Kamradt && params.needles > 1 {
        bail!("the kamradt needle is single; use --needle number for several needles");
    }
    let task = task_name(params);
    let cs = case_seed(
        seed,
        &[
            &task,
            &target.to_string(),
            &format!("{depth}"),
            &sample.to_string(),
        ],
    );
    let mut rng = Rng::new(cs);
    let depths = needle_depths(depth, params.needles);
    let (needles, question, prefix, refs) = match params.needle {
        Needle::Kamradt => (
            vec![KAMRADT_NEEDLE.to_string()],
            "What is the best thing to do in San Francisco? Don't give information outside the document or repeat \
             your findings"
                .to_string(),
            String::new(),
            vec!["sandwich".to_string(), "Dolores Park".to_string()],
        ),
        Needle::Number => {
            let keys = words::distinct_keys(&mut rng, params.needles);
            let values: Vec<String> = (0..params.needles).map(|_| rng.number7()).collect();
            let needles: Vec<String> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("One of the special magic numbers for {k} is: {v}."))
                .collect();
            let (q, pre) = if params.needles == 1 {
                (
                    format!(
                        "What is the special magic number for {} mentioned in the provided text?",
                        keys[0]
                    ),
                    format!(
                        "The special magic number for {} mentioned in the provided text is",
                        keys[0]
                    ),
                )
            } else {
                let list = join_and(&keys);
                (
                    format!("What are the special magic numbers for {list} mentioned in the provided text?"),
                    format!("The special magic numbers for {list} mentioned in the provided text are"),
                )
            };
            (needles, q, pre, values)
        }
    };
    let hay = hays.get(params.haystack, target)?;
    let placed: Vec<(f64, String)> = depths.iter().copied().zip(needles).collect();
    let preamble = match params.needle {
        Needle::Kamradt => "",
        Needle::Number => {
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. \
             I will quiz you about the numbers afterwards."
        }
    };
    let build = |n: usize| Conversation {
        preamble: preamble.to_string(),
        context: insert_needles(hay.prefix(n), &placed),
        turns: vec![Turn {
            question: question.clone(),
            answer_prefix: prefix.clone(),
            refs: refs.clone(),
            gold: refs.join(", "),
            metric: Metric::StringMatchAll,
            max_new: params.max_new,
        }],
        mode: Mode::MultiTurn,
        no_chat: false,
        seps: super::Seps::BLANK,
    };
    let (conv, _) = fit_conversation(prompter, target, hay.words(), build)?;
    Ok(Case {
        meta: CaseMeta {
            task,
            target_len: target,
            depth: Some(depth),
            sample,
            seed,
        },
        conv,
    })
}

/// "a", "a and b", "a, b, and c" (RULER's query list).
pub fn join_and(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        2 => format!("{} and {}", items[0], items[1]),
        n => format!("{}, and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_needle_depths_spread_over_the_rest() {
        assert_eq!(needle_depths(50.0, 1), vec![50.0]);
        assert_eq!(needle_depths(40.0, 3), vec![40.0, 60.0, 80.0]);
        assert_eq!(
            join_and(&["a".into(), "b".into(), "c".into()]),
            "a, b, and c"
        );
    }
}
