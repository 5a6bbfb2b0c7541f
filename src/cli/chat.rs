//! `hayloft chat`: an interactive session with the model's own chat template. The conversation is re-rendered each
//! turn, and only the tokens past the part already in the KV cache are prefilled: history is never re-prefilled.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use super::prompt_cache::PromptCacheArgs;
use super::{CompressArgs, MaxTokens, ModelArgs, SamplingArgs};
use crate::engine::{Lengths, Sampler, Session};
use crate::tokenizer::chat::ChatMessage;
use crate::tokenizer::StreamDecoder;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// `context`: the first message is compressed once and later turns are not (unless the spec has `turns`);
    /// `prompt` (default): every turn's prompt is compressed.
    #[command(flatten)]
    pub compress: CompressArgs,
    #[command(flatten)]
    pub prompt_cache: PromptCacheArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply; -1 = until an end-of-generation token or a full context.
    #[arg(long, short = 'n', default_value = "512")]
    pub max_tokens: MaxTokens,
    /// Parse special-token texts (`<|im_end|>`) typed in messages as control tokens. By default they are plain text,
    /// so a message cannot close its own turn or open another; the template's own tokens are always special.
    #[arg(long)]
    pub parse_special: bool,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let sampler_cfg = a.sampling.config()?;
    let mut l = a.model.load()?;
    sampler_cfg.check_vocab(l.model.config().vocab)?;
    a.compress
        .apply(&mut l.session_cfg.kv, crate::methods::CompressAt::Prompt);
    let tpl = l.chat_template()?;
    let mut session = Session::new(&l.model, l.session_cfg.clone())?;
    let cache = a.prompt_cache.open(&a.model, &session)?;
    let mut sampler = Sampler::new(sampler_cfg);
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s));
    }
    eprintln!(
        "chat with {} — /reset clears the conversation, /exit or Ctrl-D quits",
        l.model.config().name
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(out)?;
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let rendered = tpl.render_marked(&messages, true)?;
        let tokens = l.tokenizer.encode_chat(&rendered, a.parse_special)?;
        // Reuse the cached prefix; prefill only what is new.
        let common = session
            .tokens
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let mut common = common.min(tokens.len() - 1);
        if session.truncate(common).is_err() {
            // Sliding-window layers no longer hold what this point reads (the template rewrote an earlier turn):
            // read the whole conversation again.
            session.reset();
            common = 0;
        }
        if tokens.len() >= session.cfg.max_context {
            eprintln!(
                "error: the conversation is {} tokens, over the context budget of {}; /reset to start over",
                tokens.len(),
                session.cfg.max_context
            );
            messages.pop();
            continue;
        }
        // The next turn usually comes back to the end of this prompt: sliding-window layers keep its window.
        session.hold(tokens.len());
        let room = session.cfg.max_context - tokens.len();
        let len = Lengths {
            prompt: tokens.len(),
            new: a.max_tokens.within(room),
            feed: tokens.len() - common,
            uncompressed: 0,
        };
        if let Err(e) = session.check_memory(len) {
            eprintln!("error: {e:#}; /reset to start over");
            messages.pop();
            continue;
        }
        let t0 = Instant::now();
        // A conversation that starts afresh may find its head in the prompt cache of an earlier run.
        let mut restored = 0;
        if let (Some(c), 0) = (&cache, session.n_past()) {
            restored = c.restore(&mut session, &tokens);
            common = restored;
            session.stats.cached_tokens += restored;
        }
        let new = &tokens[common..];
        let mut history = tokens.clone();
        let logits = session.prefill(new)?;
        let mut next = sampler.sample(logits, &history);
        let ttft = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(c) = &cache {
            c.store(&session);
        }
        let mut dec = StreamDecoder::new();
        let mut reply = String::new();
        let room = session.cfg.max_context - session.n_past();
        let max_new = a.max_tokens.within(room);
        let mut n = 0;
        let t1 = Instant::now();
        while n < max_new && !l.tokenizer.is_eog(next) {
            n += 1;
            history.push(next);
            let piece = dec.push(&l.tokenizer, next);
            reply.push_str(&piece);
            write!(out, "{piece}")?;
            out.flush()?;
            if n == max_new {
                break;
            }
            let logits = session.decode(next)?;
            next = sampler.sample(logits, &history);
        }
        let tail = dec.flush();
        reply.push_str(&tail);
        writeln!(out, "{tail}")?;
        let dt = t1.elapsed().as_secs_f64();
        eprintln!(
            "[turn] reused {common} cached tokens{}, prefilled {} | ttft {ttft:.0} ms | {n} tokens at {:.1} tok/s | KV {}",
            if restored > 0 {
                format!(" ({restored} from --kv-disk)")
            } else {
                String::new()
            },
            new.len(),
            if dt > 0.0 { n as f64 / dt } else { 0.0 },
            crate::engine::stats::human_bytes(session.cache.bytes())
        );
        messages.push(ChatMessage::new("assistant", reply.trim()));
    }
    session.stats.finish();
    eprintln!("{}", session.stats.line());
    if let Some(p) = &a.model.stats_json {
        session.stats.write_json(p)?;
    }
    Ok(())
}
