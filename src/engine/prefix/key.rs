//! Prefix keys: where a cached prefix lives, stable across processes and machines.
//!
//! A [`Namespace`] names everything that makes two caches of the same tokens differ: the model file, the model's
//! configuration as loaded (RoPE style, dimension and bases included), the cache's storage type and block size, the KV
//! method with its budget and options, sliding-window handling and any head mask. Inside a namespace, prefix blocks of
//! [`BLOCK`] tokens are keyed as vLLM does, by a chain: `key(b) = H(key(b − 1), tokens of block b)`, with the
//! namespace as `key(−1)`, so a block's key names its whole prefix. A partial tail (for whole-cache snapshots) is
//! keyed by `H(key of the last full block, tail tokens)` under its own tag. H is SHA-256 over fixed little-endian
//! bytes: never a per-process seeded hash, so another process (or a Redis peer) finds the same entries.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::engine::SessionConfig;
use crate::kv::KvDtype;
use crate::model::ModelConfig;

/// Tokens per prefix-key block (the cache's block size: sessions must use the same).
pub const BLOCK: usize = 32;

/// Version of the key derivation: bump it when what goes into a key changes, so old entries are never misread.
/// v2: Llama files with RoPE frequency factors (`rope_freqs.weight`) are read with them; a v1 entry of such a file
/// holds keys rotated without them.
const KEY_VERSION: &[u8] = b"hayloft-prefix-v2";

/// A 256-bit key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Lower-case hex: file names and Redis keys.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Key {
    /// Another key derived from this one under `tag` and a number (the tiers' unit keys).
    pub fn derive(&self, tag: &[u8], n: u64) -> Key {
        let mut h = Sha256::new();
        h.update(self.0);
        field(&mut h, tag);
        h.update(n.to_le_bytes());
        Key(h.finalize().into())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

/// Identity of a model file. Cheap: SHA-256 of the file's size, its first 4 MiB (the GGUF header, metadata and
/// tensor table, and the start of the weights) and its last 1 MiB; a full hash of a multi-GB file on every start
/// would cost seconds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ModelId(pub Key);

impl ModelId {
    pub fn of_file(path: &Path) -> Result<Self> {
        let ctx = || format!("reading {} to identify the model", path.display());
        let mut f = std::fs::File::open(path).with_context(ctx)?;
        let size = f.metadata().with_context(ctx)?.len();
        let mut h = Sha256::new();
        h.update(b"gguf-identity-v1");
        h.update(size.to_le_bytes());
        let mut buf = vec![0u8; (4 << 20).min(size as usize)];
        f.read_exact(&mut buf).with_context(ctx)?;
        h.update(&buf);
        let tail = (1u64 << 20).min(size);
        f.seek(SeekFrom::Start(size - tail)).with_context(ctx)?;
        buf.resize(tail as usize, 0);
        f.read_exact(&mut buf).with_context(ctx)?;
        h.update(&buf);
        Ok(Self(Key(h.finalize().into())))
    }
}

/// The root of every key of caches made by one (model, session configuration).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Namespace(pub Key);

impl Namespace {
    /// The namespace of sessions made with `cfg` (storing `dtype`, the storage the method resolves to) on the model
    /// `id` loaded as `mc`.
    pub fn new(id: ModelId, mc: &ModelConfig, cfg: &SessionConfig, dtype: KvDtype) -> Self {
        let mut h = Sha256::new();
        field(&mut h, KEY_VERSION);
        field(&mut h, &id.0 .0);
        // The configuration as loaded: architecture, shapes, RoPE style/dim/bases, windows, scales. Debug of plain
        // numbers and enums is deterministic.
        field(&mut h, format!("{mc:?}").as_bytes());
        field(&mut h, dtype.label().as_bytes());
        field(&mut h, &(cfg.block_tokens as u64).to_le_bytes());
        field(&mut h, cfg.kv.to_string().as_bytes());
        field(&mut h, &[cfg.swa_full as u8]);
        let mask: Vec<u8> = cfg.head_mask.iter().map(|&m| m as u8).collect();
        field(&mut h, &mask);
        // A sparse prefill leaves other keys and values than a dense one (dense namespaces are unchanged).
        if cfg.prefill != crate::methods::prefill::PrefillSpec::Dense {
            field(&mut h, cfg.prefill.to_string().as_bytes());
        }
        Self(Key(h.finalize().into()))
    }

    /// A namespace from raw bytes (tests, tools).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut h = Sha256::new();
        field(&mut h, KEY_VERSION);
        field(&mut h, bytes);
        Self(Key(h.finalize().into()))
    }

    /// Keys of the full [`BLOCK`]-token blocks of `tokens`, in order (`keys[b]` names tokens `[0, (b + 1) · BLOCK)`).
    pub fn block_keys(&self, tokens: &[u32]) -> Vec<Key> {
        let mut parent = self.0;
        tokens
            .chunks_exact(BLOCK)
            .map(|block| {
                parent = chain(&parent, b"block", block);
                parent
            })
            .collect()
    }

    /// Key of exactly `tokens` (any length), for whole-cache snapshots: the chain over its full blocks, then its
    /// partial tail under another tag (so a snapshot key never equals a block key).
    pub fn exact_key(&self, tokens: &[u32]) -> Key {
        let full = tokens.len() / BLOCK * BLOCK;
        let parent = self
            .block_keys(&tokens[..full])
            .last()
            .copied()
            .unwrap_or(self.0);
        chain(&parent, b"exact", &tokens[full..])
    }
}

/// Length-prefixed field, so that no two field lists hash the same bytes.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn chain(parent: &Key, tag: &[u8], tokens: &[u32]) -> Key {
    let mut h = Sha256::new();
    h.update(parent.0);
    field(&mut h, tag);
    h.update((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    Key(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::KvSpec;
    use crate::model::testutil::{self, TinySpec};

    #[test]
    fn block_keys_are_a_fixed_chain() {
        let ns = Namespace::from_bytes(b"test");
        let tokens: Vec<u32> = (0..100).collect();
        let keys = ns.block_keys(&tokens);
        assert_eq!(keys.len(), 3, "only full blocks are keyed");
        // The same value in every process and on every machine (SHA-256 of fixed bytes; checked against Python's
        // hashlib over the same bytes).
        assert_eq!(
            keys[0].hex(),
            "50c54263a9fcdfb352ae5655f9600b5127c1763a16c5c2f0a5d491eb762cdc70"
        );
        assert_eq!(
            keys[2].hex(),
            "f284d77619dfee54eb5aba0ee62197b83d054a0c531f8cc4cc8cb2c99ccea6e8"
        );
        // A block's key names its whole prefix: change token 0 and every key changes.
        let mut other = tokens.clone();
        other[0] = 7;
        let k2 = ns.block_keys(&other);
        assert!(keys.iter().zip(&k2).all(|(a, b)| a != b));
        // Changing block 2 keeps blocks 0 and 1.
        other = tokens.clone();
        other[70] = 1;
        let k3 = ns.block_keys(&other);
        assert_eq!((k3[0], k3[1]), (keys[0], keys[1]));
        assert_ne!(k3[2], keys[2]);
        // Exact keys: a full-block prefix's exact key is not its block key; tails differ by length.
        assert_ne!(ns.exact_key(&tokens[..64]), keys[1]);
        assert_ne!(ns.exact_key(&tokens[..65]), ns.exact_key(&tokens[..66]));
        assert_eq!(ns.exact_key(&tokens[..65]), ns.exact_key(&tokens[..65]));
    }

    #[test]
    fn namespaces_differ_across_models_dtypes_and_methods() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        testutil::write_tiny_llama(&pa, &TinySpec::default()).unwrap();
        let other = TinySpec {
            seed: 2,
            ..TinySpec::default()
        };
        testutil::write_tiny_llama(&pb, &other).unwrap();
        let (ia, ib) = (
            ModelId::of_file(&pa).unwrap(),
            ModelId::of_file(&pb).unwrap(),
        );
        assert_ne!(ia, ib, "different weights, different identity");
        assert_eq!(ia, ModelId::of_file(&pa).unwrap());
        let model = crate::model::Model::load(&pa).unwrap();
        let mc = model.config();
        let cfg = SessionConfig::for_model(&model);
        let base = Namespace::new(ia, mc, &cfg, KvDtype::F16);
        assert_eq!(base, Namespace::new(ia, mc, &cfg, KvDtype::F16));
        assert_ne!(base, Namespace::new(ib, mc, &cfg, KvDtype::F16));
        assert_ne!(base, Namespace::new(ia, mc, &cfg, KvDtype::F32));
        assert_ne!(
            base,
            Namespace::new(ia, mc, &cfg, KvDtype::parse("q4").unwrap())
        );
        let mut rope = mc.clone();
        rope.rope_base *= 2.0;
        assert_ne!(base, Namespace::new(ia, &rope, &cfg, KvDtype::F16));
        let names: Vec<String> = crate::methods::registry::METHODS
            .iter()
            .filter(|m| m.build.is_some())
            .map(|m| m.name.to_string())
            .collect();
        let mut seen = vec![base];
        for name in names.iter().take(3) {
            for budget in ["0.5", "0.25"] {
                let Ok(spec) = KvSpec::parse(&format!("{name}@{budget}")) else {
                    continue;
                };
                let c = SessionConfig {
                    kv: spec,
                    ..cfg.clone()
                };
                let ns = Namespace::new(ia, mc, &c, KvDtype::F16);
                assert!(!seen.contains(&ns), "{name}@{budget}");
                seen.push(ns);
            }
        }
        assert!(seen.len() >= 5, "methods tried: {names:?}");
    }
}
