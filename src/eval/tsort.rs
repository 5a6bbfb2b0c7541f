//! Ada-LEval TSort-style segment ordering: consecutive segments of one essay are shown shuffled, and the model is
//! asked for their original order. Length-adaptable: the text's word count is tuned so the prompt fills the
//! target. Score: 100 if the first k numbers in the answer are exactly the original order, else 0 (Ada-LEval's
//! exact match; no partial credit).

use anyhow::{bail, Result};

use super::haystack::{Haystacks, Source};
use super::{
    case_seed, fit_conversation, Case, CaseMeta, Conversation, Metric, Mode, Prompter, Rng, Turn,
};

/// One TSort case: `k` segments from `source`, `target` tokens.
pub fn case(
    p: &Prompter,
    hays: &mut Haystacks,
    source: Source,
    k: usize,
    target: usize,
    sample: usize,
    seed: u64,
) -> Result<Case> {
    if !(2..=9).contains(&k) {
        bail!("--segments must be between 2 and 9");
    }
    let task = "tsort".to_string();
    let cs = case_seed(
        seed,
        &[
            &task,
            &target.to_string(),
            &sample.to_string(),
            &k.to_string(),
        ],
    );
    let mut rng = Rng::new(cs);
    let hay = hays.get(source, target * 2)?;
    // A random start, leaving room for as many words as the target could need.
    let start = rng.below(hay.words().saturating_sub(target).max(1));
    let mut perm: Vec<usize> = (0..k).collect();
    while perm.iter().enumerate().all(|(i, &v)| i == v) {
        rng.shuffle(&mut perm);
    }
    // perm[shown position] = original index; the answer lists, in original order, the shown labels.
    let mut refs = vec![String::new(); k];
    for (shown, &orig) in perm.iter().enumerate() {
        refs[orig] = (shown + 1).to_string();
    }
    let example: Vec<String> = (1..=k).rev().map(|i| i.to_string()).collect();
    let t = Turn {
        question: format!(
            "The {k} segments above are consecutive parts of one essay, shown in a shuffled order. Give their \
             original order as a list of segment numbers, for example [{}].",
            example.join(", ")
        ),
        answer_prefix: "The original order of the segments is:".into(),
        gold: format!("[{}]", refs.join(", ")),
        refs: refs.clone(),
        metric: Metric::Order,
        max_new: 32,
    };
    let build = |n: usize| {
        let n = n.max(k);
        let per = n / k;
        let mut ctx = String::new();
        for (shown, &orig) in perm.iter().enumerate() {
            ctx.push_str(&format!(
                "Segment {}:\n{}\n\n",
                shown + 1,
                hay.slice(start + orig * per, per)
            ));
        }
        Conversation {
            preamble: "Below are segments of an essay.".into(),
            context: ctx.trim_end().to_string(),
            turns: vec![t.clone()],
            mode: Mode::MultiTurn,
            no_chat: false,
            seps: super::Seps::BLANK,
        }
    };
    let (conv, _) = fit_conversation(p, target, target, build)?;
    Ok(Case {
        meta: CaseMeta {
            task,
            target_len: target,
            depth: None,
            sample,
            seed,
        },
        conv,
    })
}
