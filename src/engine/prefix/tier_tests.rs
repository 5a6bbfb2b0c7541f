//! Tiers below RAM: independent stores on one directory or one Redis server see each other's entries; a damaged
//! entry is refused, deleted, and its prefix recomputed.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::tests::{tiny, tokens};
use super::*;
use crate::engine::prefix::disk::DiskTier;
use crate::engine::SessionConfig;

const UNIT: usize = 64;

fn cfg(disk: Option<PathBuf>, redis: Option<String>) -> StoreConfig {
    StoreConfig {
        ram_bytes: 1 << 30,
        disk,
        disk_max: None,
        redis,
        codec: CodecConfig {
            chunk_tokens: UNIT,
            ..CodecConfig::default()
        },
    }
}

/// A namespace no earlier run used (a Redis server outlives test runs).
fn fresh_ns() -> Namespace {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Namespace::from_bytes(format!("tier-test-{}-{t}", std::process::id()).as_bytes())
}

/// Store A saves a 200-token session (three 64-token units); store B, another instance on the same tier, finds the
/// 192 tokens and a session restored from them continues close to the original. Returns (store B, keys of units).
fn share(c: &StoreConfig, ns: &Namespace) -> (PrefixStore, Vec<Key>) {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny(dir.path());
    let sc = SessionConfig::for_model(&model);
    let toks = tokens(230, 6);
    let a_store = PrefixStore::open(c).unwrap();
    let mut a = Session::new(&model, sc.clone()).unwrap();
    a.prefill(&toks[..200]).unwrap();
    a_store.insert(ns, &a).unwrap();
    assert_eq!(
        a_store.tier_counters().writes,
        3 * a_store.tiers.len() as u64
    );
    let want = a.prefill(&toks[200..]).unwrap().to_vec();

    let b_store = PrefixStore::open(c).unwrap();
    let hit = b_store.lookup(ns, &toks);
    assert_eq!(hit.tokens, 192);
    assert_eq!(b_store.tier_counters().hits, 3);
    let mut b = Session::new(&model, sc).unwrap();
    hit.restore(&mut b, &toks).unwrap();
    let got = b.prefill(&toks[192..]).unwrap().to_vec();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = want
        .iter()
        .zip(&got)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err < 0.05 * scale,
        "logits after a decoded prefix: max error {err} of {scale}"
    );
    let keys = ns.block_keys(&toks[..200]);
    let units = (1..=3)
        .map(|u| b_store.unit_key(&keys[u * 2 - 1]))
        .collect();
    (b_store, units)
}

#[test]
fn disk_tier_is_shared_and_refuses_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    let c = cfg(Some(kv.clone()), None);
    let ns = fresh_ns();
    let (_, units) = share(&c, &ns);
    let disk = DiskTier::open(&kv, None).unwrap();
    let toks = tokens(230, 6);
    // A flipped byte in unit 1: only unit 0 serves; the file is deleted.
    let p1 = disk.path(&units[1]);
    let mut b = std::fs::read(&p1).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&p1, &b).unwrap();
    let s = PrefixStore::open(&c).unwrap();
    assert_eq!(s.lookup(&ns, &toks).tokens, 64);
    assert_eq!(s.tier_counters().errors, 1);
    assert!(!p1.exists(), "the damaged file is deleted");
    // A truncated unit 0: nothing serves.
    let p0 = disk.path(&units[0]);
    let b = std::fs::read(&p0).unwrap();
    std::fs::write(&p0, &b[..b.len() - 7]).unwrap();
    let s = PrefixStore::open(&c).unwrap();
    assert_eq!(s.lookup(&ns, &toks).tokens, 0);
    assert_eq!((s.counters().misses, s.tier_counters().errors), (1, 1));
    assert!(!p0.exists());
    // No temporary files are left beside the entries.
    let names: Vec<String> = std::fs::read_dir(&kv)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".hlkv")), "{names:?}");
}

/// A redis-server this test started, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Redis to test against: `HAYLOFT_REDIS_URL` (which must answer), else a `redis-server` started here on a free
/// port. None only when neither exists and `HAYLOFT_REDIS_REQUIRED` is unset.
fn redis() -> Option<(String, Option<Server>)> {
    if let Ok(url) = std::env::var("HAYLOFT_REDIS_URL") {
        if let Err(e) = RedisTier::open(&url) {
            panic!("HAYLOFT_REDIS_URL={url} is set but Redis does not answer: {e:#}");
        }
        return Some((url, None));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => Server(c),
        Err(e) => {
            assert!(
                std::env::var_os("HAYLOFT_REDIS_REQUIRED").is_none(),
                "HAYLOFT_REDIS_REQUIRED is set but redis-server cannot start ({e}): apt-get install -y redis-server"
            );
            eprintln!("redis-server not found ({e}): the Redis tier test did not run (apt-get install -y redis-server)");
            return None;
        }
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let t0 = Instant::now();
    while RedisTier::open(&url).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis-server on port {port} did not answer in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((url, Some(child)))
}

#[test]
fn redis_tier_is_shared_and_refuses_damaged_values() {
    let Some((url, _server)) = redis() else {
        return;
    };
    let c = cfg(None, Some(url.clone()));
    let ns = fresh_ns();
    let (_, units) = share(&c, &ns);
    let r = RedisTier::open(&url).unwrap();
    let toks = tokens(230, 6);
    // Unit 2 truncated, unit 1 garbage: unit 0 serves, the bad values are deleted.
    let v = r.get(&units[2]).unwrap().unwrap();
    r.put(&units[2], &v[..v.len() / 3]).unwrap();
    r.put(&units[1], b"not a blob").unwrap();
    let s = PrefixStore::open(&c).unwrap();
    assert_eq!(s.lookup(&ns, &toks).tokens, 64);
    assert_eq!(s.tier_counters().errors, 1);
    assert!(!r.contains(&units[1]).unwrap());
    // Inserting again repairs the missing units.
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny(dir.path());
    let mut a = Session::new(&model, SessionConfig::for_model(&model)).unwrap();
    a.prefill(&toks[..200]).unwrap();
    s.insert(&ns, &a).unwrap();
    assert_eq!(s.tier_counters().writes, 1);
    let fresh = PrefixStore::open(&c).unwrap();
    // Unit 2 still truncated: refused and deleted; then the next insert writes it again.
    assert_eq!(fresh.lookup(&ns, &toks).tokens, 128);
    assert!(!r.contains(&units[2]).unwrap());
    // A URL with nothing behind it is a clear error.
    let err = format!(
        "{:#}",
        PrefixStore::open(&cfg(None, Some("redis://127.0.0.1:1/".into())))
            .err()
            .unwrap()
    );
    assert!(err.contains("does not answer"), "{err}");
}

/// A compressed session's snapshot goes to the tier (RAM holds nothing here); another store finds it by length and a
/// session restored from it continues bit for bit; a damaged snapshot blob is refused and deleted.
fn snapshot_through(c: &StoreConfig, damage: impl Fn(&Key)) {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny(dir.path());
    let sc = SessionConfig {
        kv: super::tests::some_method(),
        ..SessionConfig::for_model(&model)
    };
    let toks = tokens(150, 2);
    let mut a = Session::new(&model, sc.clone()).unwrap();
    assert_eq!(entry::mode(&a), Mode::Snapshot);
    // A namespace of its own: a shared Redis outlives test runs.
    let ns = Namespace(fresh_ns().0.derive(&Namespace::of_session(id, &a).0 .0, 0));
    a.prefill(&toks[..70]).unwrap();
    let st = PrefixStore::open(c).unwrap();
    assert_eq!(st.insert(&ns, &a).unwrap(), 1);
    assert_eq!(st.tier_counters().writes, st.tiers.len() as u64);
    let want = a.prefill(&toks[70..]).unwrap().to_vec();

    let other = PrefixStore::open(c).unwrap();
    let hit = other.lookup(&ns, &toks);
    assert_eq!(hit.tokens, 70);
    assert_eq!(other.tier_counters().hits, 1);
    let mut b = Session::new(&model, sc.clone()).unwrap();
    hit.restore(&mut b, &toks).unwrap();
    assert_eq!(b.n_past(), 70);
    let got = b.prefill(&toks[70..]).unwrap().to_vec();
    assert!(
        want == got,
        "a snapshot from the tier continues bit for bit"
    );
    // Sharing 64 of the 70 tokens finds nothing.
    let mut near = toks.clone();
    near[65] += 1;
    assert_eq!(other.lookup(&ns, &near).tokens, 0);

    let key = PrefixStore::snap_key(&ns.exact_key(&toks[..70]));
    damage(&key);
    let third = PrefixStore::open(c).unwrap();
    assert_eq!(third.lookup(&ns, &toks).tokens, 0);
    assert_eq!(third.tier_counters().errors, 1);
    for t in &third.tiers {
        assert!(
            !t.contains(&key).unwrap(),
            "the damaged snapshot is deleted"
        );
    }
}

#[test]
fn disk_tier_holds_snapshots_of_compressed_caches() {
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    let c = StoreConfig {
        ram_bytes: 0,
        ..cfg(Some(kv.clone()), None)
    };
    snapshot_through(&c, |key| {
        let p = DiskTier::open(&kv, None).unwrap().path(key);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x08;
        std::fs::write(&p, &b).unwrap();
    });
}

#[test]
fn redis_tier_holds_snapshots_of_compressed_caches() {
    let Some((url, _server)) = redis() else {
        return;
    };
    let c = StoreConfig {
        ram_bytes: 0,
        ..cfg(None, Some(url.clone()))
    };
    snapshot_through(&c, |key| {
        let r = RedisTier::open(&url).unwrap();
        let v = r.get(key).unwrap().unwrap();
        r.put(key, &v[..v.len() - 3]).unwrap();
    });
}
