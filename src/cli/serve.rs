//! `hayloft serve`: the OpenAI-compatible HTTP server (see [`crate::serve`]).

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::serve::{model_name, ServeConfig, ServeModel, Server};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model, threads, context, and the default KV method and storage of requests (a request's `"kv"` overrides
    /// --kv).
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Sequences decoded at once (interleaved step by step); more wait in the queue.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Sequences that may wait beyond --parallel; past that a request gets 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let cfg = ServeConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        parallel: a.parallel,
        queue: a.queue,
    };
    let args = a.model;
    let server = Server::start(
        cfg,
        Box::new(move || {
            let l = args.load()?;
            let name = model_name(&crate::fetch::resolve_model(args.model.as_deref())?);
            Ok(ServeModel {
                model: l.model,
                tokenizer: l.tokenizer,
                chat_template: l.chat_template,
                session_cfg: l.session_cfg,
                name,
            })
        }),
    )?;
    eprintln!(
        "hayloft serve: listening on http://{} (loading the model)",
        server.addr
    );
    server.wait_loaded()?;
    eprintln!("hayloft serve: ready");
    server.join()
}
