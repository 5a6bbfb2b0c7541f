//! `--kv-disk DIR` for `generate` and `chat`: a prompt's KV cache kept in a directory across runs, in the format and
//! under the keys of `hayloft serve --kv-disk` (the prefix store's disk tier), so that a later prompt that starts the
//! same way restores that prefix instead of prefilling it. A directory is shared with servers that point at it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::ModelArgs;
use crate::engine::prefix::{Mode, ModelId, Namespace, PrefixStore, StoreConfig};
use crate::engine::Session;
use crate::kv::codec::CodecConfig;
use crate::util::ByteSize;

/// How blobs below RAM (`--kv-disk`, `--kv-redis`) hold a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiskFormat {
    /// Entries as the cache holds them (f16, 2 bytes each): restored bit for bit.
    Exact,
    /// The KV codec (CacheGen-style quantization and entropy coding, about 4× smaller than f16): restored as its
    /// approximation.
    Codec,
}

impl DiskFormat {
    pub fn codec(self) -> CodecConfig {
        match self {
            DiskFormat::Exact => CodecConfig::exact(),
            DiskFormat::Codec => CodecConfig::default(),
        }
    }
}

#[derive(Args, Debug)]
pub struct PromptCacheArgs {
    /// Keep prompt caches in DIR across runs (the files `hayloft serve --kv-disk` keeps, shared with it): a prompt
    /// that starts with a cached prefix of whole 256-token units restores it instead of prefilling it. A cache a
    /// method compressed is kept whole and reused by a later prompt that extends this one exactly.
    #[arg(long, value_name = "DIR")]
    pub kv_disk: Option<PathBuf>,
    /// How --kv-disk writes a cache: exact (restored bit for bit) or codec (about 4× smaller, restored as the codec's
    /// approximation, so an answer can differ from a cold run's). Blobs of either format are read.
    #[arg(long, value_enum, default_value_t = DiskFormat::Exact, requires = "kv_disk")]
    pub kv_disk_format: DiskFormat,
    /// Most bytes --kv-disk may hold (512MiB, 2GiB); past it the least recently used files go. No limit if not given.
    #[arg(long, value_name = "SIZE", requires = "kv_disk")]
    pub kv_disk_max: Option<ByteSize>,
}

/// An open prompt cache: the store (disk tier only; nothing is kept in RAM between runs) and the namespace of the
/// session configuration it serves.
pub struct PromptCache {
    store: PrefixStore,
    ns: Namespace,
}

impl PromptCacheArgs {
    /// The prompt cache for sessions like `session` on the model `model` names, when --kv-disk is given.
    pub fn open(&self, model: &ModelArgs, session: &Session) -> Result<Option<PromptCache>> {
        let Some(dir) = &self.kv_disk else {
            return Ok(None);
        };
        if session.cfg.offload.is_some() {
            bail!(
                "--kv-disk cannot store an offloaded cache (--kv-offload): the tiers keep a cache whose blocks are \
                 all in RAM; drop one of the two"
            );
        }
        if crate::engine::prefix::entry::mode(session) == Mode::Snapshot {
            let windows =
                (0..session.cache.cfg.n_layers).any(|l| session.cache.cfg.window(l).is_some());
            eprintln!(
                "note: --kv-disk keeps this cache whole ({}), and only a later prompt that extends this one token for \
                 token reuses it; a full or KIVI cache{} is reused block by block by any prompt that starts the same",
                if windows {
                    "its sliding-window layers drop entries".to_string()
                } else {
                    format!("--kv '{}'", session.cfg.kv)
                },
                if windows { " (--swa-full)" } else { "" }
            );
        }
        let cfg = StoreConfig {
            disk: Some(dir.clone()),
            disk_max: self.kv_disk_max.map(|b| b.0 as u64),
            codec: self.kv_disk_format.codec(),
            ..StoreConfig::ram(0)
        };
        let store = PrefixStore::open(&cfg)?;
        let path = crate::fetch::resolve_model(model.model.as_deref())?;
        let ns = Namespace::of_session(ModelId::of_file(&path)?, session);
        Ok(Some(PromptCache { store, ns }))
    }
}

impl PromptCache {
    /// Restores the longest cached prefix of `tokens` into the empty `session` (at least one token is left to feed)
    /// and returns its length; 0 when nothing is cached. A prefix that cannot be restored is recomputed, with a
    /// warning: the cache only ever saves work.
    pub fn restore(&self, session: &mut Session, tokens: &[u32]) -> usize {
        let hit = self.store.lookup(&self.ns, tokens);
        if hit.tokens == 0 {
            return 0;
        }
        match hit.restore(session, tokens) {
            Ok(()) => hit.tokens,
            Err(e) => {
                eprintln!("warning: --kv-disk: restoring a cached prefix: {e:#}; recomputing it");
                session.reset();
                0
            }
        }
    }

    /// Stores what `session` holds (its tokens so far). A failure costs only reuse: a warning.
    pub fn store(&self, session: &Session) {
        // The store warns of each blob it could not encode or write.
        if let Err(e) = self.store.insert(&self.ns, session) {
            eprintln!("warning: --kv-disk: storing the prompt's cache: {e:#}");
        }
    }
}
