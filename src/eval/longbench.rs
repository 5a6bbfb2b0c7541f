//! LongBench: runs any file in LongBench's JSONL format (`{"input", "context", "answers": [...], "all_classes",
//! "length", "dataset", "_id"}`, one object a line) with LongBench's per-dataset prompt family, answer budget and
//! metric (see [`super::score`]). LongBench-E names (`hotpotqa_e`) map to their base dataset.
//!
//! As LongBench's `pred.py` does: a prompt longer than the limit keeps its first and last halves (tokens of the
//! whole filled-in template, see [`truncate_middle`]); prompts are plain
//! completion prompts (`--chat-template` wraps them in the model's template, see [`case`]); the few-shot datasets
//! (trec, triviaqa, samsum, lsht) score only the first line of the output.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{Case, CaseMeta, Conversation, Metric, Mode, Prompter, Seps, Turn};

#[derive(Clone, Debug, Deserialize)]
pub struct Sample {
    pub input: String,
    pub context: String,
    pub answers: Vec<String>,
    #[serde(default)]
    pub all_classes: Option<Vec<String>>,
    #[serde(default)]
    pub length: Option<serde_json::Value>,
    pub dataset: String,
    #[serde(default, rename = "_id")]
    pub id: Option<String>,
}

/// Reads a LongBench JSONL file; a malformed line is an error naming it.
pub fn load(path: &Path) -> Result<Vec<Sample>> {
    parse(&crate::util::read_text_file(path)?, path)
}

/// Parses LongBench JSONL text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: Sample = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a LongBench record (expected {{\"input\", \"context\", \"answers\": [...], \
                 \"dataset\", ...}})",
                path.display(),
                i + 1
            )
        })?;
        out.push(s);
    }
    if out.is_empty() {
        bail!("{} holds no records", path.display());
    }
    Ok(out)
}

/// Per-dataset settings: LongBench's `config/dataset2prompt.json` template (verbatim, typos included),
/// `dataset2maxlen.json` budget, `eval.py` metric, and whether `pred.py` may wrap the prompt in a chat template.
pub struct Dataset {
    /// The whole prompt with `{context}` and `{input}` placeholders.
    pub template: &'static str,
    pub max_new: usize,
    pub metric: fn(&Sample) -> Metric,
    /// False for the few-shot and code datasets, which `pred.py` never wraps.
    pub chat: bool,
}

pub const DATASETS: &[&str] = &[
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
];

fn classes(s: &Sample) -> Metric {
    Metric::FirstLine(Box::new(Metric::Classification(
        s.all_classes.clone().unwrap_or_default(),
    )))
}

pub fn dataset(name: &str) -> Result<Dataset> {
    let base = name.strip_suffix("_e").unwrap_or(name);
    let d = |template, max_new, metric, chat| Dataset {
        template,
        max_new,
        metric,
        chat,
    };
    #[rustfmt::skip]
    let d = match base {
        "narrativeqa" => d("You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, |_| Metric::QaF1, true),
        "qasper" => d("You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, |_| Metric::QaF1, true),
        "multifieldqa_en" => d("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 64, |_| Metric::QaF1, true),
        "multifieldqa_zh" => d("阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：", 64, |_| Metric::QaF1Zh, true),
        "hotpotqa" => d("Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, |_| Metric::QaF1, true),
        "2wikimqa" => d("Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, |_| Metric::QaF1, true),
        "musique" => d("Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:", 32, |_| Metric::QaF1, true),
        "dureader" => d("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：", 128, |_| Metric::RougeLZh, true),
        "gov_report" => d("You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, |_| Metric::RougeL, true),
        "qmsum" => d("You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, |_| Metric::RougeL, true),
        "multi_news" => d("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, |_| Metric::RougeL, true),
        "vcsum" => d("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：", 512, |_| Metric::RougeLZh, true),
        "trec" => d("Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}", 64, classes, false),
        "triviaqa" => d("Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}", 32, |_| Metric::FirstLine(Box::new(Metric::QaF1)), false),
        "samsum" => d("Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}", 128, |_| Metric::FirstLine(Box::new(Metric::RougeL)), false),
        "lsht" => d("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, classes, false),
        "passage_count" => d("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, |_| Metric::Count, true),
        "passage_retrieval_en" => d("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ", 32, |_| Metric::Retrieval, true),
        "passage_retrieval_zh" => d("以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：", 32, |_| Metric::RetrievalZh, true),
        "lcc" => d("Please complete the code given below. \n{context}Next line of code:\n", 64, |_| Metric::CodeSim, false),
        "repobench-p" => d("Please complete the code given below. \n{context}{input}Next line of code:\n", 64, |_| Metric::CodeSim, false),
        _ => bail!("unknown LongBench dataset '{name}' (known: {})", DATASETS.join(", ")),
    };
    Ok(d)
}

/// One LongBench case; a prompt over `max_length` tokens (`pred.py`'s `max_length`; default and at most the
/// session's `max_context` less the answer budget) is cut in the middle as `pred.py` cuts it (see
/// [`truncate_middle`]).
///
/// The prompt is LongBench's template filled in, as one plain completion prompt: `pred.py` wraps it in a chat
/// format only for the model families it lists (ChatGLM, LongChat/Vicuna, Llama 2, XGen, InternLM), none of which
/// hayloft knows by name. `chat` wraps it (as one user message, "Answer:" and all) in the model's own template,
/// except for the few-shot and code datasets, which `pred.py` never wraps.
pub fn case(
    p: &Prompter,
    s: &Sample,
    index: usize,
    max_length: Option<usize>,
    max_context: usize,
    seed: u64,
    chat: bool,
) -> Result<Case> {
    let d = dataset(&s.dataset)?;
    let (head, tail) = d
        .template
        .split_once("{context}")
        .ok_or_else(|| anyhow::anyhow!("LongBench template of {} has no context", s.dataset))?;
    if s.answers.is_empty() {
        bail!(
            "LongBench record {index} ({}) has no answers",
            s.id.as_deref().unwrap_or("no _id")
        );
    }
    let turn = Turn {
        question: tail.replace("{input}", &s.input),
        answer_prefix: String::new(),
        refs: s.answers.clone(),
        gold: s.answers[0].clone(),
        metric: (d.metric)(s),
        max_new: d.max_new,
    };
    let mut conv = Conversation {
        preamble: head.to_string(),
        context: s.context.clone(),
        turns: vec![turn],
        mode: Mode::MultiTurn,
        no_chat: !(chat && d.chat),
        seps: Seps::NONE,
    };
    // The session holds the prompt and the answer: the limit is at most the context less the answer budget, and
    // less again by what a chat template adds around the cut prompt.
    let room = max_context.saturating_sub(d.max_new);
    let mut limit = max_length.unwrap_or(room).min(room);
    let original = conv.clone();
    for _ in 0..3 {
        if limit <= 16 {
            bail!(
                "a prompt limit of {limit} tokens (--max-length, or the session's {max_context} less the answer's \
                 {}) leaves no room for a LongBench prompt",
                d.max_new
            );
        }
        conv = original.clone();
        truncate_middle(p, &mut conv, limit)?;
        let n = p.first_prompt_tokens(&conv)?;
        if n + d.max_new <= max_context {
            break;
        }
        limit -= n + d.max_new - max_context;
    }
    Ok(Case {
        meta: CaseMeta {
            task: format!("longbench_{}", s.dataset),
            target_len: 0,
            depth: None,
            sample: index,
            seed,
        },
        conv,
    })
}

/// `pred.py`'s cut: when the filled-in template (the plain prompt, BOS included as the tokenizer adds it) is over
/// `max_len` tokens, keep its first `max_len / 2` and last `max_len / 2` tokens, decoded without special tokens
/// and joined. The cut falls in the context whenever the instruction and the question each fit a half; the pieces
/// around it go back into the conversation's preamble, context and question. When the cut reaches into the
/// instruction or the question, the whole cut prompt becomes the context and the question is empty.
pub fn truncate_middle(p: &Prompter, conv: &mut Conversation, max_len: usize) -> Result<()> {
    let Some(turn) = conv.turns.first() else {
        bail!("a LongBench case needs its question");
    };
    let (head, tail) = (conv.preamble.clone(), turn.question.clone());
    let whole = format!("{head}{}{tail}", conv.context);
    let toks = p.tok.encode(&whole, true, false)?;
    if toks.len() <= max_len {
        return Ok(());
    }
    let half = max_len / 2;
    let text = |ids: &[u32]| {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&t| !p.tok.is_control(t))
            .collect();
        p.tok.decode(&kept)
    };
    let (first, last) = (text(&toks[..half]), text(&toks[toks.len() - half..]));
    match (
        first.strip_prefix(head.as_str()),
        last.strip_suffix(tail.as_str()),
    ) {
        (Some(a), Some(b)) => conv.context = format!("{a}{b}"),
        _ => {
            conv.preamble.clear();
            conv.context = format!("{first}{last}");
            conv.turns[0].question.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::model::testutil::{write_tiny_llama, TinySpec};
    use crate::tokenizer::Tokenizer;

    fn sample(context: String, input: &str) -> Sample {
        Sample {
            input: input.into(),
            context,
            answers: vec!["x".into()],
            all_classes: None,
            length: None,
            dataset: "narrativeqa".into(),
            id: None,
        }
    }

    fn with_tokenizer(f: impl FnOnce(&Prompter)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, &TinySpec::default()).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        f(&Prompter::new(&tok, Err("plain".into()), true));
    }

    /// What `pred.py` keeps of a prompt: the decoded first and last `max_len / 2` tokens of the whole prompt.
    fn pred_py_cut(p: &Prompter, whole: &str, max_len: usize) -> String {
        let toks = p.tok.encode(whole, true, false).unwrap();
        let strip = |ids: &[u32]| {
            let v: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|&t| !p.tok.is_control(t))
                .collect();
            p.tok.decode(&v)
        };
        let half = max_len / 2;
        strip(&toks[..half]) + &strip(&toks[toks.len() - half..])
    }

    fn plain(c: &Case) -> String {
        let t = &c.conv.turns[0];
        format!("{}{}{}", c.conv.preamble, c.conv.context, t.question)
    }

    #[test]
    fn a_long_prompt_keeps_the_first_and_last_halves_of_the_whole_prompt() {
        with_tokenizer(|p| {
            let ctx: String = (0..400)
                .map(|i| format!("line {i} of the story. "))
                .collect();
            let s = sample(ctx, "Who wrote it?");
            let full = case(p, &s, 0, None, 1 << 20, 1, false).unwrap();
            let whole = plain(&full);
            let n = p.tok.encode(&whole, true, false).unwrap().len();
            let limit = 1000;
            assert!(
                n > 2 * limit,
                "the prompt must be over the limit ({n} tokens)"
            );
            let c = case(p, &s, 0, Some(limit), 1 << 20, 1, false).unwrap();
            assert_eq!(plain(&c), pred_py_cut(p, &whole, limit));
            // The instruction and the question survive whole; the cut is in the context.
            assert_eq!(c.conv.preamble, full.conv.preamble);
            assert_eq!(c.conv.turns[0].question, full.conv.turns[0].question);
            assert!(c.conv.context.starts_with("line 0 of the story."));
            assert!(c.conv.context.ends_with("line 399 of the story. "));
            assert!(p.first_prompt_tokens(&c.conv).unwrap() <= limit + 2);
        });
    }

    #[test]
    fn a_question_longer_than_half_is_cut_too_and_the_prompt_becomes_context() {
        with_tokenizer(|p| {
            let ctx: String = (0..200).map(|i| format!("line {i}. ")).collect();
            let input: String = (0..100).map(|i| format!("clause {i}, ")).collect();
            let s = sample(ctx, &input);
            let whole = plain(&case(p, &s, 0, None, 1 << 20, 1, false).unwrap());
            let c = case(p, &s, 0, Some(600), 1 << 20, 1, false).unwrap();
            assert_eq!(c.conv.context, pred_py_cut(p, &whole, 600));
            assert!(c.conv.preamble.is_empty() && c.conv.turns[0].question.is_empty());
        });
    }

    #[test]
    fn the_session_context_bounds_the_limit_and_a_short_prompt_is_left_alone() {
        with_tokenizer(|p| {
            let s = sample("A short story.".into(), "Who?");
            let c = case(p, &s, 0, Some(4096), 4096, 1, false).unwrap();
            assert_eq!(c.conv.context, "A short story.");
            let long = sample((0..300).map(|i| format!("line {i}. ")).collect(), "Who?");
            // 600 tokens of session: the prompt gets 600 - 128 (narrativeqa's answer budget).
            let c = case(p, &long, 0, Some(100_000), 600, 1, false).unwrap();
            assert!(p.first_prompt_tokens(&c.conv).unwrap() + 128 <= 600);
            assert!(p.first_prompt_tokens(&c.conv).unwrap() + 128 >= 590);
            let e = case(p, &long, 0, None, 140, 1, false).unwrap_err();
            assert!(format!("{e:#}").contains("leaves no room"), "{e:#}");
        });
    }
}
