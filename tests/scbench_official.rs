//! SCBench prompts against SCBench's own prompt builders: `fixtures/scbench_official.json` holds, for fixed data of
//! each task we implement, the prompts `create_multiturn_prompt` and `create_scdq_prompt` (MInference fb56c91,
//! `scbench/eval_utils.py`) build, plain and under the SmolLM2 and Qwen2.5 chat templates (see
//! `fixtures/gen_scbench_official.py`). Ours, framed by `scbench::official` and rendered as the runner feeds them,
//! must be the same text: the first prompt, then each follow-up (multi-turn) or query (multi-request) as the part
//! fed after what came before.

mod common;

use std::path::PathBuf;

use hayloft::eval::{scbench, Metric, Mode, Prompter, Turn};
use hayloft::gguf::GgufFile;
use hayloft::tokenizer::chat::ChatTemplate;
use hayloft::tokenizer::Tokenizer;

fn fixture() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scbench_official.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn scbench_prompts_match_the_official_builders() {
    let fx = fixture();
    // Rendering needs no vocabulary of its own, but a Prompter holds a tokenizer: SmolLM2's.
    let model = common::model("smollm2-135m");
    let tok = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let templates: Vec<(String, ChatTemplate)> = fx["templates"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let t = ChatTemplate::from_source(v.as_str().unwrap(), "", "", false, false).unwrap();
            (k.clone(), t)
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for c in fx["cases"].as_array().unwrap() {
        let task = c["task"].as_str().unwrap();
        let mode = match c["mode"].as_str().unwrap() {
            "multi-turn" => Mode::MultiTurn,
            _ => Mode::MultiRequest,
        };
        let chat = c["chat"].as_str();
        let p = match chat {
            Some(name) => {
                let t = &templates.iter().find(|(k, _)| k == name).unwrap().1;
                Prompter::new(&tok, Ok(t), false)
            }
            None => Prompter::new(&tok, Err("plain".into()), true),
        };
        let answers = strings(&c["answers"]);
        let turns: Vec<Turn> = strings(&c["inputs"])
            .into_iter()
            .zip(&answers)
            .map(|(input, a)| Turn {
                question: input,
                answer_prefix: "Answer:".into(),
                refs: vec![a.clone()],
                gold: a.clone(),
                metric: Metric::Contains,
                max_new: 8,
            })
            .collect();
        let conv = scbench::official(task, mode, c["context"].as_str().unwrap().into(), turns);
        let official = strings(&c["prompts"]);
        let label = format!("{task} {} {}", mode.name(), chat.unwrap_or("plain"));
        let mut ours = Vec::new();
        match mode {
            Mode::MultiTurn => {
                let mut before = String::new();
                for i in 0..conv.turns.len() {
                    let full = p.render(&conv, i, &answers[..i], mode).unwrap();
                    let delta = full.strip_prefix(before.as_str()).unwrap_or_else(|| {
                        panic!("{label}: turn {i} does not extend the previous prompt")
                    });
                    ours.push(delta.to_string());
                    before = full;
                }
            }
            Mode::MultiRequest => {
                let shared = p.shared_prefix(&conv).unwrap();
                ours.push(shared.clone());
                for i in 0..conv.turns.len() {
                    let full = p.render(&conv, i, &[], mode).unwrap();
                    ours.push(full.strip_prefix(shared.as_str()).unwrap().to_string());
                }
            }
        }
        assert_eq!(ours, official, "{label}: prompts differ");
        seen.insert(task.to_string());
    }
    let ours: Vec<&str> = scbench::TASKS
        .iter()
        .copied()
        .filter(|t| *t != "needles")
        .collect();
    assert_eq!(
        seen.iter().map(String::as_str).collect::<Vec<_>>().len(),
        ours.len(),
        "a fixture for every SCBench task hayloft implements (needles is hayloft's own)"
    );
}

#[test]
fn mf_question_line_is_derived_as_scbench_derives_it() {
    assert_eq!(
        scbench::mf_prefix("The largest number in list Calm-Otter is:").as_deref(),
        Some("What is the largest number in list calm-otter?")
    );
    // Greedy: up to the last " is" on the line; another line is not searched once one matched.
    assert_eq!(
        scbench::mf_prefix("x The sum is what the list is:\nThe y is").as_deref(),
        Some("What is the sum is what the list?")
    );
    assert_eq!(scbench::mf_prefix("no target here"), None);
    // `.+` takes at least one character before " is".
    assert_eq!(scbench::mf_prefix("The  is"), None);
    assert_eq!(
        scbench::mf_prefix("The x is").as_deref(),
        Some("What is the x?")
    );
}
