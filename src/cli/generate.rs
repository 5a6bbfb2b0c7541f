//! `hayloft generate`: complete one prompt, stream the tokens, end with the stats line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use super::prompt_cache::PromptCacheArgs;
use super::{CompressArgs, MaxTokens, ModelArgs, SamplingArgs};
use crate::engine::json::{JsonConstraint, JsonFormat, JsonVocab};
use crate::engine::json_schema::{JVal, Schema};
use crate::engine::{Lengths, Sampler, Session};
use crate::serve::stop::StopMatcher;
use crate::tokenizer::chat::ChatMessage;
use crate::tokenizer::StreamDecoder;
use crate::util::read_text_file;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    #[command(flatten)]
    pub prompt_cache: PromptCacheArgs,
    /// The prompt text.
    #[arg(long, short = 'p', conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8).
    #[arg(long, short = 'f')]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: parse special-token texts (`<|im_end|>`) inside the prompt and system message as control tokens.
    /// By default they are plain text there, so a prompt cannot close its own turn; the template's own tokens are
    /// always special. (Without --chat the prompt is raw and its special-token texts are always parsed.)
    #[arg(long, requires = "chat")]
    pub parse_special: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate; -1 = until an end-of-generation token or a full context.
    #[arg(long, short = 'n', default_value = "128")]
    pub max_tokens: MaxTokens,
    /// Do not stream the text (print it at the end).
    #[arg(long)]
    pub no_stream: bool,
    /// End the generation at this text (repeatable; the first one reached wins): the output stops just before it, as
    /// the server's `stop` does. Text that could begin a stop string is held back until the next token tells.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// JSON mode: only tokens that keep the output the beginning of one JSON object are drawn, and generation ends
    /// when the object closes (the server's `response_format: {"type": "json_object"}`). Ask for JSON in the prompt
    /// too: the constraint keeps the text valid, the prompt makes it useful.
    #[arg(long, conflicts_with_all = ["json_schema", "json_schema_file"])]
    pub json: bool,
    /// JSON mode with a schema (JSON Schema text, e.g. '{"type": "object", "properties": {"name": {"type":
    /// "string"}}, "required": ["name"]}'): the output is a value the schema accepts, keys in the schema's order
    /// (the server's `response_format` `json_schema`; README lists what is supported).
    #[arg(long, value_name = "SCHEMA", conflicts_with = "json_schema_file")]
    pub json_schema: Option<String>,
    /// --json-schema read from a file.
    #[arg(long, value_name = "FILE")]
    pub json_schema_file: Option<PathBuf>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let sampler_cfg = a.sampling.config()?;
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => read_text_file(f)?,
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
        (Some(_), Some(_)) => bail!("give either --prompt or --prompt-file, not both"),
    };
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let schema_text = match (&a.json_schema, &a.json_schema_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(f)) => Some(read_text_file(f)?),
        (None, None) => None,
    };
    let format = match schema_text {
        Some(t) => {
            let v: JVal = serde_json::from_str(&t)
                .map_err(|e| anyhow::anyhow!("--json-schema: not JSON: {e}"))?;
            let s = Schema::compile(&v).map_err(|e| anyhow::anyhow!("--json-schema: {e}"))?;
            Some(JsonFormat::Schema(Arc::new(s)))
        }
        None => a.json.then_some(JsonFormat::Object),
    };
    let mut l = a.model.load()?;
    sampler_cfg.check_vocab(l.model.config().vocab)?;
    // One prompt: it is the context, compressed once at its end under either protocol; decoding does not compress
    // unless the spec has every@N.
    a.compress
        .apply(&mut l.session_cfg.kv, crate::methods::CompressAt::Prompt);
    let tokens = if a.chat {
        let tpl = l.chat_template()?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &text));
        let r = tpl.render_marked(&msgs, true)?;
        l.tokenizer.encode_chat(&r, a.parse_special)?
    } else {
        // A raw completion prompt: special-token texts become control tokens, as llama.cpp's completion does.
        l.tokenizer.encode(&text, true, true)?
    };
    if tokens.is_empty() {
        bail!("the prompt tokenized to nothing");
    }
    let mut session = Session::new(&l.model, l.session_cfg.clone())?;
    if tokens.len() >= session.cfg.max_context {
        bail!(
            "prompt too long: {} tokens, and the context budget (--max-context) is {} tokens",
            tokens.len(),
            session.cfg.max_context
        );
    }
    let room = session.cfg.max_context - tokens.len();
    let max_new = a.max_tokens.within(room);
    if a.max_tokens.0.is_some_and(|n| n > max_new) {
        eprintln!(
            "note: generating at most {max_new} tokens to stay within --max-context {}",
            session.cfg.max_context
        );
    }
    let mut sampler = Sampler::new(sampler_cfg);
    if let Some(f) = &format {
        let vocab = JsonVocab::new(&l.tokenizer, l.model.config().vocab);
        sampler = sampler.with_json(JsonConstraint::new(Arc::new(vocab), f));
    }
    let mut dec = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    let mut all_text = String::new();
    let mut stopped = false;
    let mut stop = StopMatcher::new(a.stop.clone());
    let mut emit = |text: &str, all: &mut String| -> Result<()> {
        if a.no_stream {
            all.push_str(text);
        } else {
            write!(out, "{text}")?;
            out.flush()?;
        }
        Ok(())
    };

    session.check_memory(Lengths::generate(tokens.len(), max_new))?;
    let cache = a.prompt_cache.open(&a.model, &session)?;
    let t0 = Instant::now();
    let cached = cache
        .as_ref()
        .map_or(0, |c| c.restore(&mut session, &tokens));
    session.stats.cached_tokens = cached;
    let logits = session.prefill(&tokens[cached..])?;
    let mut history = tokens.clone();
    let mut next = sampler.sample(logits, &history);
    session.stats.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
    // After the first token (storing is not in its latency); the session holds exactly the prompt.
    if let Some(c) = &cache {
        c.store(&session);
    }
    let mut generated = 0;
    while generated < max_new {
        if l.tokenizer.is_eog(next) {
            break;
        }
        generated += 1;
        history.push(next);
        let (text, hit) = stop.push(&dec.push(&l.tokenizer, next));
        emit(&text, &mut all_text)?;
        if hit || sampler.json_done() {
            stopped = hit;
            break;
        }
        if generated == max_new {
            break;
        }
        let logits = session.decode(next)?;
        next = sampler.sample(logits, &history);
    }
    if !stopped {
        let (text, hit) = stop.push(&dec.flush());
        emit(&text, &mut all_text)?;
        if !hit {
            emit(&stop.flush(), &mut all_text)?;
        }
    }
    if a.no_stream {
        writeln!(out, "{all_text}")?;
    } else {
        writeln!(out)?;
    }
    session.stats.generated_tokens = generated;
    session.stats.finish();
    eprintln!("{}", session.stats.line());
    if let Some(p) = &a.model.stats_json {
        session.stats.write_json(p)?;
    }
    Ok(())
}
