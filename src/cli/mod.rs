//! The `hayloft` command line.

mod bench;
mod blend;
mod chat;
pub mod eval;
mod generate;
mod heads;
mod info;
mod kvcodec;
mod pairs;
mod patterns;
mod perplexity;
mod plan;
mod prompt_cache;
mod serve;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::engine::{SamplerConfig, SessionConfig};
use crate::gguf::GgufFile;
use crate::kv::KvDtype;
use crate::model::Model;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "hayloft",
    version,
    about = "Long-context LLM inference that owns its attention, KV cache and kernels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Complete a prompt (raw, or wrapped in the chat template with --chat) and print a stats line.
    Generate(generate::GenerateArgs),
    /// Interactive chat; each turn reuses the KV cache of the previous turns.
    Chat(chat::ChatArgs),
    /// Perplexity of a text file, following llama.cpp's llama-perplexity protocol.
    Perplexity(perplexity::PerplexityArgs),
    /// Print a GGUF model's architecture, hyper-parameters, tensor types and KV cost.
    Info(info::InfoArgs),
    /// List the KV-cache methods and spec options `--kv` accepts (from the one registry).
    Methods {
        /// Print the README's markdown tables instead.
        #[arg(long)]
        markdown: bool,
    },
    /// Download and verify a known model (smollm2-135m, gemma3-270m, qwen2.5-0.5b).
    Fetch {
        /// Model name.
        name: String,
    },
    /// Long-context benchmarks: accuracy, KV memory and speed side by side (niah, ruler, scbench, tsort, sweep,
    /// longbench).
    Eval {
        #[command(subcommand)]
        what: eval::EvalCmd,
    },
    /// Retrieval-head detection (copy-paste criterion on NIAH instances): scores per (layer, head) as JSON, the
    /// file `--kv duo@<budget>,heads@FILE` reads.
    Heads(heads::HeadsArgs),
    /// MInference's offline per-head sparse prefill pattern search on one long kv-retrieval example: writes the JSON
    /// `--prefill minference@FILE` reads.
    Patterns(patterns::PatternsArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
    /// The cost model: KV bytes, prefill time, time per decoded token, sequences that fit the memory, swap-in time,
    /// predicted from the model's shapes and a machine profile (`bench machine`); --validate runs it beside.
    Plan(plan::PlanArgs),
    /// OpenAI-compatible HTTP server: /v1/completions (with echo + logprobs for lm-eval), /v1/chat/completions, SSE
    /// streaming, /v1/models, /health, /tokenize, /detokenize, /tokenizer_info, /metrics.
    Serve(serve::ServeArgs),
}

impl Cli {
    /// Parses the process's arguments. Every option that takes a value also takes a negative number (`-n -1`,
    /// `--threads -2`), so a negative value reaches the option's own parser and gets its error, not clap's
    /// "unexpected argument".
    pub fn parse_args() -> Cli {
        fn negatives(cmd: clap::Command) -> clap::Command {
            cmd.mut_args(|a| {
                if a.get_action().takes_values() {
                    a.allow_negative_numbers(true)
                } else {
                    a
                }
            })
            .mut_subcommands(negatives)
        }
        let matches = negatives(Cli::command()).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// `--threads`: a worker count, or (for `bench speed`) a comma-separated list of them, each at least 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Threads(pub Vec<usize>);

impl std::str::FromStr for Threads {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let v = s
            .split(',')
            .map(|x| match x.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => bail!(
                    "'{}' is not a thread count: give a whole number of at least 1 (bench speed: a list, 1,2,4)",
                    x.trim()
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Threads(v))
    }
}

impl Threads {
    /// The one count a command runs with; a list is an error naming the command that takes one.
    pub fn one(&self) -> Result<usize> {
        match self.0.as_slice() {
            [n] => Ok(*n),
            v => bail!(
                "--threads {}: this command runs with one thread count (a list is for `hayloft bench speed`)",
                v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

/// The thread count `init_threads` would use for a request of `n` (capped at a multiple of the cores, warned).
pub fn capped_threads(n: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n > MAX_THREADS_PER_CORE * cores {
        let cap = MAX_THREADS_PER_CORE * cores;
        eprintln!(
            "warning: --threads {n} is more than {MAX_THREADS_PER_CORE}× the {cores} available cores; using {cap}"
        );
        cap
    } else {
        n
    }
}

/// `--block-tokens`: entries per KV cache block, one of the tile sizes the attention kernels take whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockTokens(pub usize);

impl std::str::FromStr for BlockTokens {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().parse::<usize>() {
            Ok(n @ (16 | 32 | 64)) => Ok(BlockTokens(n)),
            _ => bail!("give 16, 32 or 64 (entries per KV cache block)"),
        }
    }
}

/// `--max-tokens`: how many tokens to generate at most; -1 = until an end-of-generation token or a full context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxTokens(pub Option<usize>);

impl MaxTokens {
    /// Tokens to generate when `room` more fit in the context.
    pub fn within(self, room: usize) -> usize {
        self.0.map_or(room, |n| n.min(room))
    }
}

impl std::str::FromStr for MaxTokens {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t == "-1" {
            return Ok(MaxTokens(None));
        }
        match t.parse::<usize>() {
            Ok(n) => Ok(MaxTokens(Some(n))),
            Err(_) => bail!(
                "'{s}': give a number of tokens (0 or more), or -1 to generate until the end of generation or a full \
                 context"
            ),
        }
    }
}

impl std::fmt::Display for MaxTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("-1"),
        }
    }
}

/// Options shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF file, or a known model name (smollm2-135m, gemma3-270m, qwen2.5-0.5b). Default: smollm2-135m, fetched
    /// on first use.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Worker threads (default: available cores); `bench speed` also takes a list (1,2,4,8,16).
    #[arg(long, short = 't')]
    pub threads: Option<Threads>,
    /// Most tokens a session may hold (default: the model's context length).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Prefill chunk size in tokens: peak activation memory is bounded by it. Default 512, and 4096 with
    /// `--prefill minference` (its pattern is estimated from each chunk's last 64 queries: a longer chunk pays for
    /// that estimate fewer times).
    #[arg(long)]
    pub chunk_size: Option<usize>,
    #[arg(long, default_value_t = crate::methods::KvSpec::full().to_string(), help = crate::methods::registry::kv_help())]
    pub kv: String,
    /// KV cache storage type: f16, f32, or KIVI quantization q8, q4, q2 (keys per channel, values per token).
    #[arg(long, default_value = "f16")]
    pub kv_dtype: String,
    /// Quantized KV: the newest N entries of each head stay f16 (default 128). Needs --kv-dtype q* or a kivi spec.
    #[arg(long)]
    pub kv_residual: Option<usize>,
    /// Keep the KV blocks beyond --resident in a file under DIR (created fresh, removed at exit), read back on demand
    /// by the blocks attention reads. f16 storage; every method but think and kivi.
    #[arg(long, value_name = "DIR", requires = "resident")]
    pub kv_offload: Option<PathBuf>,
    /// With --kv-offload: the KV bytes kept in RAM, a size (64MiB, 1.5GiB) or a share of the cache (0.25).
    #[arg(long, value_name = "N", requires = "kv_offload")]
    pub resident: Option<crate::kv::Resident>,
    /// Refuse, before any work, a run whose planned peak memory (weights + KV cache + activations + logits, from
    /// the prompt length, --max-tokens and the KV spec) exceeds this size (800MiB, 4GiB, or bytes). Runs are always
    /// refused when the plan exceeds what the process can get (cgroup limit, ulimit -v, available memory).
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<crate::util::ByteSize>,
    /// Keep every KV entry on sliding-window layers too (llama.cpp's --swa-full): the same answers for more memory;
    /// by default those layers (Gemma 3's local ones) keep only their window.
    #[arg(long)]
    pub swa_full: bool,
    /// Entries per KV cache block: 16, 32 (default) or 64. A block is what attention reads as one tile and what a
    /// selector's page must divide; a page-selecting method (`quest`, `lserve`) whose pages are 16 tokens reads only
    /// its chosen pages' keys with 16-entry blocks (a block's keys are stored channel by channel, so a page of a
    /// 32-entry block reads the whole block's keys). A KIVI cache quantizes each block as one key group, so the group
    /// follows: KIVI's 32 by default; at 16 or 64 attention dequantizes each block instead of running the integer
    /// folds, which take 32. `serve`'s prefix cache shares 32-token blocks across requests; at another size it
    /// reuses only whole snapshots of an earlier prompt that a new one extends.
    #[arg(long, value_name = "N")]
    pub block_tokens: Option<BlockTokens>,
    #[arg(long, default_value_t = crate::methods::prefill::PrefillSpec::Dense.to_string(), help = crate::methods::registry::prefill_help())]
    pub prefill: String,
    /// Write the stats line as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
}

/// `--compress-at`: when the KV method compresses prompts (every command that compresses one).
#[derive(Args, Clone, Debug, Default)]
pub struct CompressArgs {
    /// When the --kv method compresses: `context` = once, at the end of the context, the question left out and fed
    /// after it uncompressed (kvpress's protocol; the default of every eval command); `prompt` = at the end of every
    /// prompt feed, question included (the default of generate and chat). Sets the spec option `at@...` of every
    /// spec. Decoding never compresses unless a spec has every@N.
    #[arg(long, value_name = "context|prompt")]
    pub compress_at: Option<crate::methods::CompressAt>,
}

impl CompressArgs {
    /// Writes the flag (else the spec's own `at`, else `default`) into a spec that compresses.
    pub fn apply(&self, spec: &mut crate::methods::KvSpec, default: crate::methods::CompressAt) {
        spec.resolve_compress_at(self.compress_at, default);
    }
}

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Divides (multiplies, when negative) the logit of each token among the last --repeat-last-n once. 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over (prompt included).
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Lowers a recent token's logit by this much per occurrence (OpenAI's frequency penalty, -2 to 2). 0 = off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Lowers the logit of every token among the recent ones by this much (OpenAI's presence penalty, -2 to 2). 0 = off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Adds a bias to one token's logit, as llama.cpp writes it: TOKEN_ID(+/-)BIAS (`15043+1`, `15043-inf` bans the
    /// token). Repeat the flag for more tokens.
    #[arg(long, value_name = "TOKEN_ID(+/-)BIAS", value_parser = parse_logit_bias_arg)]
    pub logit_bias: Vec<(u32, f32)>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

fn parse_logit_bias_arg(s: &str) -> std::result::Result<(u32, f32), String> {
    crate::engine::sampler::parse_logit_bias(s).map_err(|e| format!("{e:#}"))
}

impl SamplingArgs {
    pub fn config(&self) -> Result<SamplerConfig> {
        let c = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        };
        c.validate()?;
        Ok(c)
    }
}

/// A loaded model with its tokenizer and the session settings the flags ask for. The GGUF file itself is closed
/// once the weights are copied out, so its mapped pages do not count twice in memory.
pub struct Loaded {
    pub model: Model,
    /// The model's chat template, or why it has none (reported only if a command needs it).
    pub chat_template: std::result::Result<ChatTemplate, String>,
    pub tokenizer: Tokenizer,
    pub session_cfg: SessionConfig,
}

impl ModelArgs {
    /// Sets up threads, resolves/fetches the model, loads weights and tokenizer, checks the flags.
    pub fn load(&self) -> Result<Loaded> {
        let mut kv_spec: crate::methods::KvSpec = self.kv.parse()?;
        let prefill: crate::methods::prefill::PrefillSpec = self.prefill.parse()?;
        let mut kv_dtype = KvDtype::parse(&self.kv_dtype)?;
        if let Some(r) = self.kv_residual {
            match (&mut kv_dtype, &mut kv_spec.options.kivi) {
                (KvDtype::Kivi { residual, .. }, _) => *residual = r,
                (_, Some(k)) if k.residual.is_none() => k.residual = Some(r),
                (_, Some(k)) => bail!(
                    "--kv-residual {r} and --kv 'kivi{}@{}' both set the residual window: give one",
                    k.bits,
                    k.residual.unwrap_or_default()
                ),
                (_, None) => bail!(
                    "--kv-residual applies to a quantized cache only (--kv-dtype q8/q4/q2, or --kv with kivi8/kivi4/kivi2)"
                ),
            }
        }
        // Check the combination now, with the other flags' errors.
        let kv_dtype = crate::methods::storage_for(&kv_spec, kv_dtype)?;
        init_threads(self.threads.as_ref().map(Threads::one).transpose()?)?;
        let path = crate::fetch::resolve_model(self.model.as_deref())?;
        let mut gguf = GgufFile::open(&path)?;
        Model::check_architecture(&gguf)?;
        let chat_template = ChatTemplate::from_gguf(&gguf).map_err(|e| format!("{e:#}"));
        let tokenizer = Tokenizer::from_gguf(&gguf)
            .with_context(|| format!("{}: tokenizer", path.display()))?;
        // The vocabulary's parsed arrays go before the weights are read, so the load does not peak with both.
        gguf.shed_vocabulary();
        crate::util::return_freed_memory();
        let mut model = Model::from_gguf(&gguf)?;
        let mut session_cfg = SessionConfig::for_model(&model);
        session_cfg.kv_dtype = kv_dtype;
        session_cfg.kv = kv_spec;
        session_cfg.chunk_size = match self.chunk_size {
            Some(0) => bail!("--chunk-size must be at least 1"),
            Some(n) => n,
            None => prefill.default_chunk().unwrap_or(session_cfg.chunk_size),
        };
        session_cfg.prefill = prefill;
        session_cfg.max_memory = self.max_memory.map(|b| b.0);
        session_cfg.swa_full = self.swa_full;
        if let Some(BlockTokens(bt)) = self.block_tokens {
            session_cfg.block_tokens = bt;
        }
        if let crate::methods::prefill::PrefillSpec::LazyLlm(c) = &session_cfg.prefill {
            c.plan(model.config())?;
        }
        if let (Some(dir), Some(resident)) = (&self.kv_offload, self.resident) {
            session_cfg.offload = Some(crate::kv::OffloadConfig {
                dir: dir.clone(),
                resident,
            });
        }
        if let Some(mc) = self.max_context {
            if mc == 0 {
                bail!("--max-context must be at least 1");
            }
            if mc > model.config().ctx_len {
                eprintln!(
                    "warning: --max-context {mc} is past the model's trained context of {} tokens",
                    model.config().ctx_len
                );
            }
            session_cfg.max_context = mc;
            // LongRoPE models (Phi-3) rotate with the factor set of this context, as llama.cpp's -c picks it.
            model.set_max_context(mc);
        }
        // The file's metadata (a large vocabulary's token arrays: 25–35 MB parsed) is freed here, once.
        drop(gguf);
        crate::util::return_freed_memory();
        Ok(Loaded {
            model,
            chat_template,
            tokenizer,
            session_cfg,
        })
    }
}

impl Loaded {
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Most worker threads per available core: more only adds switching (`--threads 1000` on 4 cores ran 20× slower).
pub const MAX_THREADS_PER_CORE: usize = 4;

pub fn init_threads(threads: Option<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => capped_threads(n),
        None => cores,
    };
    // A second call (tests) finds the pool already built; that is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(())
}

/// What `hayloft methods` prints: the registry as aligned text, or as the README's markdown tables.
pub fn methods_text(markdown: bool) -> String {
    use crate::methods::registry::{self, METHODS, OPTIONS, SELECTORS, SELECT_OPTIONS};
    if markdown {
        return format!(
            "{}\n{}\n{}\n{}",
            registry::methods_markdown(),
            registry::options_markdown(),
            registry::selectors_markdown(),
            registry::prefill_markdown()
        );
    }
    let mut s = String::from("KV methods (--kv <method>[@<budget>][,<option>...]):\n");
    for m in METHODS {
        s += &format!("  {:<14} {}\n", m.name, m.keeps);
    }
    s += "\nOptions:\n";
    for o in OPTIONS {
        s += &format!("  {:<18} {}\n", o.usage(), o.help);
    }
    s += "\nDecode-time selectors (keep the cache, read less; alone or after a method: \
          [<method>...,]<selector>@<budget>[,<name>=<value>...]):\n";
    for m in SELECTORS {
        let d = m.defaults;
        s += &format!(
            "  {:<14} {} (defaults: sink={} recent={} dense={} interval={})\n",
            m.name, m.reads, d.sink, d.recent, d.dense, d.interval
        );
    }
    s += "\nSelector options:\n";
    for o in SELECT_OPTIONS {
        let who = if o.common {
            "every selector".to_string()
        } else {
            SELECTORS
                .iter()
                .filter(|m| m.options.contains(&o.name))
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        s += &format!(
            "  {:<18} {} ({who})\n",
            format!("{}={}", o.name, o.arg),
            o.help
        );
    }
    s += "\nPrefill methods (--prefill <method>[@<file>][,<option>=<value>...]):\n";
    for r in registry::PREFILL {
        s += &format!("  {:<14} {}\n", r.name, r.help);
        for &o in r.options {
            let o = registry::prefill_option_of(o);
            s += &format!("    {}={}  {}\n", o.name, o.arg, o.help);
        }
    }
    s
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => generate::run(a),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Fetch { name } => {
            let p = crate::fetch::ensure_model(&name)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Methods { markdown } => {
            print!("{}", methods_text(markdown));
            Ok(())
        }
        Cmd::Eval { what } => eval::run(what),
        Cmd::Heads(a) => heads::run(a),
        Cmd::Patterns(a) => patterns::run(a),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Plan(a) => plan::run(a),
        Cmd::Serve(a) => serve::run(a),
    }
}
