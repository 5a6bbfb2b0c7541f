//! `hayloft serve`: the OpenAI-compatible HTTP server (see [`crate::serve`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::prompt_cache::DiskFormat;
use super::ModelArgs;
use crate::engine::prefix::{ModelId, StoreConfig};
use crate::serve::{model_name, ServeConfig, ServeModel, Server};
use crate::util::ByteSize;

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
    /// RAM for the prefix cache (KV of earlier prompts, reused by later ones that start the same): a size (512MiB,
    /// 2GiB) or 0 to turn the cache off.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub prefix_cache_ram: CacheSize,
    /// Also keep cached prefixes in this directory (codec-compressed; shared by servers that point at it).
    #[arg(long, value_name = "DIR")]
    pub kv_disk: Option<PathBuf>,
    /// Most bytes --kv-disk may hold (512MiB, 2GiB); past it the least recently used files go. No limit if not
    /// given.
    #[arg(long, value_name = "SIZE", requires = "kv_disk")]
    pub kv_disk_max: Option<ByteSize>,
    /// Also keep cached prefixes in this Redis server (redis://host:port[/db]).
    #[arg(long, value_name = "URL")]
    pub kv_redis: Option<String>,
    /// How --kv-disk and --kv-redis write a cache: codec (CacheGen-style, about 4× smaller than f16, restored as its
    /// approximation) or exact (2 bytes an entry, restored bit for bit). Blobs of either format are read.
    #[arg(long, value_enum, default_value_t = DiskFormat::Codec)]
    pub kv_disk_format: DiskFormat,
    /// Most bytes the running sequences' planned KV caches (prompt + max_tokens each) may add up to; a request
    /// that does not fit waits in the queue. Unbounded (but for --parallel) if not given.
    #[arg(long, value_name = "SIZE")]
    pub kv_budget: Option<ByteSize>,
}

/// A size, or 0 for none.
#[derive(Clone, Copy, Debug)]
pub struct CacheSize(pub usize);

impl std::str::FromStr for CacheSize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.trim() == "0" {
            return Ok(CacheSize(0));
        }
        Ok(CacheSize(s.parse::<ByteSize>()?.0))
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let server = start(a)?;
    eprintln!("hayloft serve: ready");
    server.join()
}

/// Starts the server `a` describes and waits for its model.
pub fn start(a: ServeArgs) -> Result<Server> {
    if a.model.kv_offload.is_some() && (a.kv_disk.is_some() || a.kv_redis.is_some()) {
        anyhow::bail!(
            "--kv-disk and --kv-redis cannot store an offloaded cache (--kv-offload): the tiers keep caches whose \
             blocks are all in RAM; drop one of them"
        );
    }
    let ram = a.prefix_cache_ram.0;
    let prefix = (ram > 0 || a.kv_disk.is_some() || a.kv_redis.is_some()).then(|| StoreConfig {
        disk: a.kv_disk,
        disk_max: a.kv_disk_max.map(|b| b.0 as u64),
        redis: a.kv_redis,
        codec: a.kv_disk_format.codec(),
        ..StoreConfig::ram(ram)
    });
    let cfg = ServeConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        parallel: a.parallel,
        queue: a.queue,
        prefix,
        kv_budget: a.kv_budget.map(|b| b.0),
    };
    let args = a.model;
    let server = Server::start(
        cfg,
        Box::new(move || {
            let l = args.load()?;
            let path = crate::fetch::resolve_model(args.model.as_deref())?;
            let name = model_name(&path);
            let id = Some(ModelId::of_file(&path)?);
            Ok(ServeModel {
                id,
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
    Ok(server)
}
