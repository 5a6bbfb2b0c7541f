//! Real chat templates render as transformers renders them. tests/fixtures/chat_templates.json holds templates of
//! models whose architectures hayloft runs (Ministral 3, Mistral Nemo and Small 3.2, Devstral, Phi-3.5, SmolLM3,
//! Granite 3.3, Llama 3.1 and 3.2, Qwen3, Qwen2.5, Gemma 2, a DeepSeek-R1 distill), as llama.cpp keeps them, and their
//! renders of four conversations by Python's jinja2 set up as `apply_chat_template` sets it up (made by
//! `tests/fixtures/gen_chat_templates.py`). hayloft's minijinja setup must give the same text, and must refuse where
//! the template raises (Gemma 2 refuses a system turn).

use hayloft::tokenizer::chat::{ChatMessage, ChatTemplate};
use hayloft::tokenizer::strftime;
use serde::Deserialize;

const FIXTURE: &str = "tests/fixtures/chat_templates.json";

#[derive(Deserialize)]
struct Case {
    messages: Vec<(String, String)>,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
    /// Formats the template gave `strftime_now`.
    strftime: Vec<String>,
}

#[derive(Deserialize)]
struct Template {
    file: String,
    bos_token: String,
    eos_token: String,
    source: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Fixture {
    fixed_time: i64,
    templates: Vec<Template>,
}

#[test]
fn real_chat_templates_render_as_transformers_renders_them() {
    let f: Fixture = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    assert!(f.templates.len() >= 13);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (mut rendered, mut refused) = (0, 0);
    for t in &f.templates {
        let tmpl = ChatTemplate::from_source(&t.source, &t.bos_token, &t.eos_token, false, false)
            .unwrap_or_else(|e| panic!("{}: {e:#}", t.file));
        for (i, c) in t.cases.iter().enumerate() {
            let msgs: Vec<ChatMessage> = c
                .messages
                .iter()
                .map(|(r, m)| ChatMessage::new(r.as_str(), m.as_str()))
                .collect();
            let got = tmpl.render(&msgs, c.add_generation_prompt);
            match (&c.text, &c.error) {
                (Some(want), None) => {
                    let mut got = got.unwrap_or_else(|e| panic!("{} case {i}: {e:#}", t.file));
                    // The fixture's moment in place of today's, for each format the template asked for.
                    for fmt in &c.strftime {
                        let (today, fixed) = (
                            strftime(fmt, now).unwrap(),
                            strftime(fmt, f.fixed_time).unwrap(),
                        );
                        got = got.replace(&today, &fixed);
                    }
                    assert_eq!(&got, want, "{} case {i}", t.file);
                    rendered += 1;
                }
                (None, Some(why)) => {
                    let e = format!(
                        "{:#}",
                        got.err()
                            .unwrap_or_else(|| panic!("{} case {i} renders", t.file))
                    );
                    assert!(
                        e.contains(why.as_str()),
                        "{} case {i}: {e} (jinja2: {why})",
                        t.file
                    );
                    refused += 1;
                }
                _ => panic!("{} case {i}: a text or an error", t.file),
            }
        }
    }
    println!("{rendered} renders equal, {refused} refusals equal");
    assert!(rendered >= 40 && refused >= 1);
}
