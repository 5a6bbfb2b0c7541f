//! Tiers below RAM: codec blobs ([`crate::kv::codec`]) by key, in a directory ([`super::disk`]) or in Redis. Blobs are
//! self-checking (magic, version, CRC-32 per header, table and chunk), so a tier only moves bytes; a blob that fails to
//! decode is deleted by the store and its prefix recomputed.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

use super::key::Key;

/// A place blobs are kept by key. Implementations are thread-safe; every call is synchronous.
pub trait Tier: Send + Sync {
    /// Short name for messages (`disk DIR`, `redis URL`).
    fn name(&self) -> String;
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>>;
    fn put(&self, key: &Key, blob: &[u8]) -> Result<()>;
    fn contains(&self, key: &Key) -> Result<bool>;
    fn remove(&self, key: &Key) -> Result<()>;
    /// A short label for metrics ("disk", "redis").
    fn kind(&self) -> &'static str;
    /// Bytes of the blobs the tier holds (all of them, whoever wrote them).
    fn held_bytes(&self) -> Result<u64>;
    /// Notes that a snapshot of `len` tokens is stored under namespace `ns` (snapshots are found by length).
    fn add_snap_len(&self, ns: &Key, len: usize) -> Result<()>;
    /// Lengths noted under `ns` (their blobs may be gone since).
    fn snap_lens(&self, ns: &Key) -> Result<Vec<usize>>;
    /// Blobs this tier removed to stay under its size limit.
    fn evictions(&self) -> u64 {
        0
    }
}

/// A Redis server (`redis://host:port/db`): one string value per key, `hayloft:kv:<hex key>`; a SET replaces a value
/// whole, so readers never see half a blob. One connection, reopened after an error.
pub struct RedisTier {
    url: String,
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
}

/// How long a Redis call may take before it fails (the store then recomputes).
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisTier {
    /// Opens `url` and checks the server answers.
    pub fn open(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL '{url}'"))?;
        let t = Self {
            url: url.into(),
            client,
            conn: Mutex::new(None),
        };
        t.call(|c| redis::cmd("PING").query::<String>(c))
            .with_context(|| format!("Redis at {url} does not answer"))?;
        Ok(t)
    }

    fn call<T>(&self, f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> Result<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .with_context(|| format!("connecting to Redis at {}", self.url))?;
            c.set_read_timeout(Some(REDIS_TIMEOUT))?;
            c.set_write_timeout(Some(REDIS_TIMEOUT))?;
            *slot = Some(c);
        }
        let r = f(slot.as_mut().expect("connected"));
        if r.is_err() {
            *slot = None;
        }
        r.with_context(|| format!("Redis at {}", self.url))
    }

    fn key(key: &Key) -> String {
        format!("hayloft:kv:{}", key.hex())
    }
}

impl Tier for RedisTier {
    fn name(&self) -> String {
        format!("redis {}", self.url)
    }
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        self.call(|c| redis::cmd("GET").arg(Self::key(key)).query(c))
    }
    fn put(&self, key: &Key, blob: &[u8]) -> Result<()> {
        self.call(|c| redis::cmd("SET").arg(Self::key(key)).arg(blob).query(c))
    }
    fn contains(&self, key: &Key) -> Result<bool> {
        self.call(|c| redis::cmd("EXISTS").arg(Self::key(key)).query::<i64>(c))
            .map(|n| n > 0)
    }
    fn kind(&self) -> &'static str {
        "redis"
    }
    fn add_snap_len(&self, ns: &Key, len: usize) -> Result<()> {
        let set = format!("hayloft:snaplens:{}", ns.hex());
        self.call(|c| redis::cmd("SADD").arg(&set).arg(len).query::<i64>(c))
            .map(|_| ())
    }
    fn snap_lens(&self, ns: &Key) -> Result<Vec<usize>> {
        let set = format!("hayloft:snaplens:{}", ns.hex());
        self.call(|c| redis::cmd("SMEMBERS").arg(&set).query(c))
    }
    fn held_bytes(&self) -> Result<u64> {
        // SCAN over this store's keys, then their lengths in one pipeline per batch.
        self.call(|c| {
            let mut cursor: u64 = 0;
            let mut total = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("hayloft:kv:*")
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                if !keys.is_empty() {
                    let mut p = redis::pipe();
                    for k in &keys {
                        p.cmd("STRLEN").arg(k);
                    }
                    let lens: Vec<u64> = p.query(c)?;
                    total += lens.iter().sum::<u64>();
                }
                if next == 0 {
                    return Ok(total);
                }
                cursor = next;
            }
        })
    }
    fn remove(&self, key: &Key) -> Result<()> {
        self.call(|c| redis::cmd("DEL").arg(Self::key(key)).query::<i64>(c))
            .map(|_| ())
    }
}
