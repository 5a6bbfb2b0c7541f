//! `--kv-disk DIR`: one file per key, `<hex key>.hlkv`, optionally under a byte limit (`--kv-disk-max`).
//!
//! - **Crash safety.** A blob is written to a temporary file (`.<name>.tmp-<pid>-<n>`), flushed to disk, renamed over
//!   its name, and the directory is flushed: a process killed at any point leaves either the whole blob under its
//!   name or nothing there. Blobs check themselves (magic, version, CRC-32s; see the codec and snapshot formats), so
//!   even a file damaged after the fact is refused, deleted by the store, and its prefix recomputed. Temporary files
//!   of processes that no longer run are removed when a tier opens.
//! - **Size limit.** The file modification time is the LRU clock (a hit touches its file), so several servers on one
//!   directory share one notion of "least recently used". Each tier keeps an estimate of the bytes in the directory;
//!   when a write takes it over the limit, the directory is listed and the oldest files go until the rest fits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result};

use super::key::Key;
use super::tier::Tier;

/// File name extension of a blob.
const EXT: &str = "hlkv";

pub struct DiskTier {
    dir: PathBuf,
    /// Most bytes of blobs the directory may hold (None: no limit).
    max_bytes: Option<u64>,
    /// Bytes this tier believes the directory holds (exact after each listing; other writers make it drift).
    estimate: Mutex<u64>,
    /// Files this tier removed to stay under the limit.
    evictions: AtomicU64,
    /// Distinguishes the temporary files of one process's concurrent writes.
    seq: AtomicU64,
}

/// One blob of the directory, as a listing sees it.
struct FileInfo {
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

impl DiskTier {
    /// Opens (creating) `dir`; with `max_bytes`, evicts down to it at once.
    pub fn open(dir: &Path, max_bytes: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the KV store directory {}", dir.display()))?;
        let t = Self {
            dir: dir.into(),
            max_bytes,
            estimate: Mutex::new(0),
            evictions: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        };
        t.remove_stale_temps()?;
        t.evict()?;
        Ok(t)
    }

    pub fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.{EXT}", key.hex()))
    }

    /// Where the snapshot lengths of namespace `ns` are noted.
    fn lens_dir(&self, ns: &Key) -> PathBuf {
        self.dir.join("snaplens").join(ns.hex())
    }

    fn estimate(&self) -> std::sync::MutexGuard<'_, u64> {
        self.estimate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every blob of the directory (files removed meanwhile are skipped).
    fn list(&self) -> Result<Vec<FileInfo>> {
        let ctx = || format!("listing {}", self.dir.display());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_context(ctx)? {
            let e = e.with_context(ctx)?;
            let path = e.path();
            if path.extension().is_none_or(|x| x != EXT) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            out.push(FileInfo {
                path,
                bytes: m.len(),
                used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    /// Lists the directory and, over the limit, removes the least recently used blobs until the rest fits. Sets the
    /// estimate to what is left.
    fn evict(&self) -> Result<()> {
        let mut files = self.list()?;
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        if let Some(max) = self.max_bytes {
            files.sort_by_key(|f| f.used);
            for f in &files {
                if total <= max {
                    break;
                }
                match std::fs::remove_file(&f.path) {
                    Ok(()) => {
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                        total -= f.bytes;
                    }
                    // Another process evicted it first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= f.bytes,
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", f.path.display()))
                    }
                }
            }
        }
        *self.estimate() = total;
        Ok(())
    }

    /// Removes temporary files whose writer no longer runs (killed mid-write). Where the process table cannot be
    /// read (not Linux), temporary files older than an hour go.
    fn remove_stale_temps(&self) -> Result<()> {
        let ctx = || format!("listing {}", self.dir.display());
        for e in std::fs::read_dir(&self.dir).with_context(ctx)? {
            let e = e.with_context(ctx)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = temp_writer(&name) else {
                continue;
            };
            let proc_table = Path::new("/proc/self").exists();
            let stale = if proc_table {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600)
            };
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Writes `blob` whole under `path` or not at all (see the module documentation).
    fn write_atomic(&self, path: &Path, blob: &[u8]) -> Result<()> {
        use std::io::Write;
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(blob)?;
            // The same clock as a hit's touch (the kernel's own file times are coarser).
            f.set_modified(SystemTime::now())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename itself reaches the disk with the directory.
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }
}

/// The writer's pid of a temporary file name `.<name>.tmp-<pid>[-<n>]`.
fn temp_writer(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, tail) = name.rsplit_once(".tmp-")?;
    tail.split('-').next()?.parse().ok()
}

impl Tier for DiskTier {
    fn name(&self) -> String {
        format!("disk {}", self.dir.display())
    }
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let p = self.path(key);
        match std::fs::read(&p) {
            Ok(b) => {
                // Used now: last out under the limit. A file evicted meanwhile just stays gone.
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Ok(Some(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    fn put(&self, key: &Key, blob: &[u8]) -> Result<()> {
        if let Some(m) = self.max_bytes.filter(|&m| blob.len() as u64 > m) {
            // Never kept: it would evict everything and then itself.
            anyhow::bail!(
                "an entry of {} bytes is over the disk tier's limit of {m} bytes (raise --kv-disk-max)",
                blob.len()
            );
        }
        self.write_atomic(&self.path(key), blob)?;
        let over = {
            let mut est = self.estimate();
            *est += blob.len() as u64;
            self.max_bytes.is_some_and(|m| *est > m)
        };
        if over {
            self.evict()?;
        }
        Ok(())
    }
    fn contains(&self, key: &Key) -> Result<bool> {
        Ok(self.path(key).exists())
    }
    fn kind(&self) -> &'static str {
        "disk"
    }
    fn held_bytes(&self) -> Result<u64> {
        Ok(self.list()?.iter().map(|f| f.bytes).sum())
    }
    fn add_snap_len(&self, ns: &Key, len: usize) -> Result<()> {
        // One empty file per length: creating it is atomic and idempotent, whoever else writes the directory.
        let d = self.lens_dir(ns);
        std::fs::create_dir_all(&d)
            .and_then(|()| std::fs::write(d.join(len.to_string()), b""))
            .with_context(|| format!("noting a snapshot length in {}", d.display()))
    }
    fn snap_lens(&self, ns: &Key) -> Result<Vec<usize>> {
        let d = self.lens_dir(ns);
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", d.display())),
        };
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect())
    }
    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
    fn remove(&self, key: &Key) -> Result<()> {
        let p = self.path(key);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", p.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Key {
        Key([i; 32])
    }

    #[test]
    fn the_least_recently_used_files_go_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(dir.path(), Some(3000)).unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(100);
        for i in 0..3 {
            t.put(&key(i), &[i; 1000]).unwrap();
            // Distinct, increasing use times whatever the file system's clock resolution.
            let f = std::fs::File::options()
                .write(true)
                .open(t.path(&key(i)))
                .unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        assert_eq!(t.held_bytes().unwrap(), 3000);
        // Reading key 0 makes it the most recently used: key 1 goes when key 3 comes.
        assert_eq!(t.get(&key(0)).unwrap().unwrap(), vec![0; 1000]);
        t.put(&key(3), &[3; 1000]).unwrap();
        assert!(t.contains(&key(0)).unwrap());
        assert!(!t.contains(&key(1)).unwrap());
        assert!(t.contains(&key(2)).unwrap() && t.contains(&key(3)).unwrap());
        assert_eq!((t.held_bytes().unwrap(), t.evictions()), (3000, 1));
        // A blob over the whole limit is refused, and evicts nothing.
        let e = t.put(&key(4), &[4; 3001]).unwrap_err();
        assert!(format!("{e:#}").contains("--kv-disk-max"), "{e:#}");
        assert!(!t.contains(&key(4)).unwrap());
        assert_eq!(t.evictions(), 1);
        // A tier opened with a smaller limit evicts at once.
        let small = DiskTier::open(dir.path(), Some(1500)).unwrap();
        assert_eq!(small.held_bytes().unwrap(), 1000);
        assert!(small.contains(&key(3)).unwrap());
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed_on_open() {
        if !Path::new("/proc/self").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum runs nowhere; our own pid's file is kept (it may be mid-write).
        let dead = dir.path().join(".abc.hlkv.tmp-4194305-0");
        let ours = dir
            .path()
            .join(format!(".abc.hlkv.tmp-{}-0", std::process::id()));
        let other = dir.path().join("notes.txt");
        for p in [&dead, &ours, &other] {
            std::fs::write(p, b"half").unwrap();
        }
        let t = DiskTier::open(dir.path(), None).unwrap();
        assert!(!dead.exists() && ours.exists() && other.exists());
        assert_eq!(t.held_bytes().unwrap(), 0, "temporary files are not blobs");
        assert_eq!(temp_writer(".x.hlkv.tmp-12-3"), Some(12));
        assert_eq!(temp_writer(".x.hlkv.tmp-12"), Some(12));
        assert_eq!(temp_writer("x.hlkv"), None);
    }
}
