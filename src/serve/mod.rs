//! `hayloft serve`: an OpenAI-compatible HTTP server over one model.
//!
//! Endpoints: `POST /v1/completions` (text, token ids or a batch; `echo` with prompt log-probabilities, what
//! lm-evaluation-harness's log-likelihood tasks read), `POST /v1/chat/completions` (the GGUF's chat template), both
//! with SSE streaming; `GET /v1/models`, `GET /health` (503 while loading), `POST /tokenize`, `POST /detokenize`,
//! `GET /tokenizer_info` (lm-eval's remote tokenizer), `GET /metrics` (Prometheus text).
//!
//! The model lives on one engine thread ([`engine`]) that owns every sequence's session; the HTTP side (tokio, axum)
//! tokenizes, validates, and talks to it over channels. A request may choose its KV method (`"kv": "snapkv@0.25"`).

pub mod api;
pub mod engine;
pub mod error;
mod handlers;
pub mod logprobs;
pub mod metrics;
pub mod reasoning;
mod respond;
mod seq;
pub mod stop;
pub mod tools;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use crate::engine::json::JsonVocab;
use crate::engine::prefix::{ModelId, PrefixStore, StoreConfig};
use crate::engine::SessionConfig;
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;

pub use error::ApiError;

/// Server settings (the model's come with [`ServeModel`]).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    /// 0 = any free port (tests).
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Sequences run at once; more wait in the queue.
    pub parallel: usize,
    /// Sequences that may wait; past parallel + queue a request gets 429 with Retry-After.
    pub queue: usize,
    /// The prefix cache (None: off).
    pub prefix: Option<StoreConfig>,
    /// Most bytes the running sequences' planned KV caches may add up to (None: no bound but --parallel).
    pub kv_budget: Option<usize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            parallel: 4,
            queue: 64,
            prefix: None,
            kv_budget: None,
        }
    }
}

/// What the engine thread loads before it serves: the model, its tokenizer and chat template, and the session
/// settings requests start from.
pub struct ServeModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The chat template, or why there is none (chat requests then get a 400 saying so).
    pub chat_template: std::result::Result<ChatTemplate, String>,
    pub session_cfg: SessionConfig,
    /// The id `/v1/models` shows (the file's stem).
    pub name: String,
    /// The model file's identity, the root of prefix-cache keys (None: no prefix cache).
    pub id: Option<ModelId>,
}

impl ServeModel {
    /// Loads a GGUF file with default session settings.
    pub fn open(path: &Path) -> Result<Self> {
        let mut g = GgufFile::open(path)?;
        Model::check_architecture(&g)?;
        let tokenizer =
            Tokenizer::from_gguf(&g).with_context(|| format!("{}: tokenizer", path.display()))?;
        let chat_template = ChatTemplate::from_gguf(&g).map_err(|e| format!("{e:#}"));
        // As `hayloft generate` loads: the vocabulary's arrays go before the weights are read.
        g.shed_vocabulary();
        crate::util::return_freed_memory();
        let model = Model::from_gguf(&g)?;
        drop(g);
        crate::util::return_freed_memory();
        let session_cfg = SessionConfig::for_model(&model);
        let id = Some(ModelId::of_file(path)?);
        Ok(ServeModel {
            id,
            model,
            tokenizer,
            chat_template,
            session_cfg,
            name: model_name(path),
        })
    }
}

/// The id a model file is served under: its file name without `.gguf`.
pub fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

/// Loads the model on the engine thread.
pub type Loader = Box<dyn FnOnce() -> Result<ServeModel> + Send>;

/// What the HTTP side knows of the loaded model.
pub struct Ready {
    pub tokenizer: Tokenizer,
    pub chat_template: std::result::Result<ChatTemplate, String>,
    pub name: String,
    pub max_context: usize,
    pub vocab: usize,
    pub created: u64,
    /// Every token's bytes for JSON mode, built by the first request that asks for it.
    pub json_vocab: OnceLock<Arc<JsonVocab>>,
}

impl Ready {
    /// The token table JSON mode reads (built once).
    pub fn json_vocab(&self) -> Arc<JsonVocab> {
        self.json_vocab
            .get_or_init(|| Arc::new(JsonVocab::new(&self.tokenizer, self.vocab)))
            .clone()
    }
}

/// State shared by the handlers and the engine thread.
pub struct Shared {
    pub cfg: ServeConfig,
    /// Set once the model is loaded (or failed to).
    pub state: OnceLock<std::result::Result<Arc<Ready>, String>>,
    pub metrics: metrics::Metrics,
    /// Jobs accepted and not yet finished (queued or running).
    pub in_flight: AtomicUsize,
    pub stopping: AtomicBool,
    /// The prefix cache, shared by every sequence.
    pub prefix: Option<Arc<PrefixStore>>,
    jobs: Mutex<mpsc::Sender<engine::Job>>,
}

impl Shared {
    /// Most jobs the server holds at once.
    pub fn capacity(&self) -> usize {
        self.cfg.parallel + self.cfg.queue
    }
}

/// A running server; dropping it stops it.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<()>>>,
    engine: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `cfg.host:cfg.port`, starts answering at once (`/health` is 503 until the model is in), and loads the
    /// model with `load` on the engine thread.
    pub fn start(cfg: ServeConfig, load: Loader) -> Result<Server> {
        if cfg.parallel == 0 {
            return Err(anyhow!("--parallel must be at least 1"));
        }
        if cfg.kv_budget == Some(0) {
            return Err(anyhow!("--kv-budget must be more than 0"));
        }
        let prefix = match &cfg.prefix {
            Some(p) => Some(Arc::new(
                PrefixStore::open(p).context("cannot open the prefix cache")?,
            )),
            None => None,
        };
        let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            cfg,
            state: OnceLock::new(),
            metrics: metrics::Metrics::default(),
            in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            prefix,
            jobs: Mutex::new(tx),
        });
        let sh = shared.clone();
        let engine = std::thread::Builder::new()
            .name("hayloft-engine".into())
            .spawn(move || engine_thread(load, rx, sh))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = handlers::router(shared.clone());
        let http = std::thread::Builder::new()
            .name("hayloft-http".into())
            .spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await?;
                    Ok(())
                })
            })?;
        Ok(Server {
            addr,
            shared,
            shutdown: Some(stop_tx),
            http: Some(http),
            engine: Some(engine),
        })
    }

    /// Waits until the model is loaded; its load error if it failed.
    pub fn wait_loaded(&self) -> Result<()> {
        loop {
            match self.shared.state.get() {
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => return Err(anyhow!("{e}")),
                None => {
                    if self.engine.as_ref().is_some_and(|h| h.is_finished()) {
                        return Err(anyhow!("the engine thread stopped while loading the model"));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
            }
        }
    }

    /// Serves until the HTTP server stops (an error, or never).
    pub fn join(mut self) -> Result<()> {
        match self.http.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the HTTP thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Relaxed);
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}

fn engine_thread(load: Loader, jobs: mpsc::Receiver<engine::Job>, shared: Arc<Shared>) {
    let m = match load() {
        Ok(m) => m,
        Err(e) => {
            let _ = shared.state.set(Err(format!("{e:#}")));
            return;
        }
    };
    let ready = Arc::new(Ready {
        tokenizer: m.tokenizer,
        chat_template: m.chat_template,
        name: m.name,
        max_context: m.session_cfg.max_context,
        vocab: m.model.config().vocab,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        json_vocab: OnceLock::new(),
    });
    let _ = shared.state.set(Ok(ready.clone()));
    engine::Scheduler::new(&m.model, ready, m.session_cfg, shared, m.id).run(jobs);
}
