//! LongBench: runs any file in LongBench's JSONL format (`{"input", "context", "answers": [...], "all_classes",
//! "length", "dataset", "_id"}`, one object a line) with LongBench's per-dataset prompt family, answer budget and
//! metric (see [`super::score`]). LongBench-E names (`hotpotqa_e`) map to their base dataset.
//!
//! As LongBench does: prompts longer than the limit are cut in the middle of the context; prompts are plain
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

/// One LongBench case; the context is cut in the middle (as LongBench does) so prompt + answer budget fits
/// `max_len` tokens.
///
/// The prompt is LongBench's template filled in, as one plain completion prompt: `pred.py` wraps it in a chat
/// format only for the model families it lists (ChatGLM, LongChat/Vicuna, Llama 2, XGen, InternLM), none of which
/// hayloft knows by name. `chat` wraps it (as one user message, "Answer:" and all) in the model's own template,
/// except for the few-shot and code datasets, which `pred.py` never wraps.
pub fn case(
    p: &Prompter,
    s: &Sample,
    index: usize,
    max_len: usize,
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
    if max_len <= d.max_new + 16 {
        bail!("--max-length {max_len} leaves no room for a prompt");
    }
    let budget = max_len - d.max_new;
    for _ in 0..4 {
        let n = p.first_prompt_tokens(&conv)?;
        if n <= budget {
            break;
        }
        let toks = p.encode_plain(&conv.context)?;
        let keep = toks.len().saturating_sub(n - budget + 2);
        let head = keep / 2;
        conv.context = format!(
            "{}{}",
            p.tok.decode(&toks[..head]),
            p.tok.decode(&toks[toks.len() - (keep - head)..])
        );
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
