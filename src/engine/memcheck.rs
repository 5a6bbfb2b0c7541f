//! The check before the work: a run whose [memory plan](super::memplan) does not fit `--max-memory`, or what the
//! process can still get, is refused with the plan's parts and the limit, before any prefill.
//!
//! What the process can get is the tightest of: the cgroup's limit (v2 `memory.max` of its cgroup and every ancestor,
//! v1 `memory.limit_in_bytes`) less what the cgroup already uses (its inactive page cache counts as free, since the
//! kernel reclaims it first), the address-space limit (RLIMIT_AS) less the process's mapped size, and the system's
//! `MemAvailable`. Those are compared with the part of the plan not yet allocated; `--max-memory` with the whole plan.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::memplan::MemPlan;
use super::stats::human_bytes;

/// A run refused because its plan does not fit (callers running many cases skip that case and go on).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutOfMemory(pub String);

/// Room the process has left under one limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    /// The limit, in words ("the cgroup limit (memory.max 800 MiB, 500 MiB in use)").
    pub what: String,
    /// Bytes the process may still allocate under it.
    pub bytes: usize,
}

/// Refuses `plan` when it does not fit: its total over `max_memory`, or its bytes not yet allocated (`total − held`)
/// over the room some limit of the process leaves.
pub fn check(plan: &MemPlan, held: usize, max_memory: Option<usize>) -> Result<()> {
    check_against(plan, held, max_memory, &process_room())
}

/// [`check`] against given rooms (the probe is [`process_room`]).
pub fn check_against(
    plan: &MemPlan,
    held: usize,
    max_memory: Option<usize>,
    rooms: &[Room],
) -> Result<()> {
    let total = plan.total();
    let advice = "shorten the prompt or --max-tokens, or keep less KV: a method with a budget (--kv snapkv@0.25), \
                  a quantized cache (--kv-dtype q4), --kv-offload DIR --resident SIZE, or a smaller --chunk-size";
    if let Some(m) = max_memory {
        if total > m {
            return Err(OutOfMemory(format!(
                "not enough memory: this run needs {} at its peak ({}), over --max-memory {}; {advice}",
                human_bytes(total),
                plan.describe(),
                human_bytes(m)
            ))
            .into());
        }
    }
    let need = total.saturating_sub(held);
    if let Some(r) = rooms
        .iter()
        .filter(|r| r.bytes < need)
        .min_by_key(|r| r.bytes)
    {
        return Err(OutOfMemory(format!(
            "not enough memory: this run needs {} at its peak ({}), {} more than it holds now, and {} leaves {}; \
             {advice}",
            human_bytes(total),
            plan.describe(),
            human_bytes(need),
            r.what,
            human_bytes(r.bytes)
        ))
        .into());
    }
    Ok(())
}

/// The room under every limit this process can see (none where the OS reports none).
pub fn process_room() -> Vec<Room> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let mut rooms = Vec::new();
    if let Some(cg) = read(Path::new("/proc/self/cgroup")) {
        rooms.extend(cgroup_room(&cg, Path::new("/sys/fs/cgroup"), &read));
    }
    if let (Some(limits), Some(status)) = (
        read(Path::new("/proc/self/limits")),
        read(Path::new("/proc/self/status")),
    ) {
        rooms.extend(address_space_room(&limits, &status));
    }
    if let Some(mi) = read(Path::new("/proc/meminfo")) {
        if let Some(kb) = kb_field(&mi, "MemAvailable:") {
            rooms.push(Room {
                what: format!(
                    "the system's available memory (MemAvailable {})",
                    human_bytes(kb)
                ),
                bytes: kb,
            });
        }
    }
    rooms
}

/// The value of a `Name:   1234 kB` line, in bytes.
fn kb_field(text: &str, name: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: usize = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The value of a `name 1234` line (cgroup `memory.stat`).
fn stat_field(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Room under the cgroup limits: v2 (`0::/path`, `memory.max` of the cgroup and its ancestors) and v1 (`N:memory:/path`,
/// `memory.limit_in_bytes`). `root` is the cgroup file system's mount point; `read` reads a file.
fn cgroup_room(
    proc_cgroup: &str,
    root: &Path,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Vec<Room> {
    let num = |p: PathBuf| read(&p).and_then(|s| s.trim().parse::<usize>().ok());
    let mut rooms = Vec::new();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrl.is_empty() {
            // v2: every ancestor's limit applies too.
            let mut dir = root.join(rel);
            loop {
                if let Some(max) = num(dir.join("memory.max")) {
                    let used = num(dir.join("memory.current")).unwrap_or(0);
                    let inactive = read(&dir.join("memory.stat"))
                        .and_then(|s| stat_field(&s, "inactive_file"))
                        .unwrap_or(0);
                    rooms.push(cgroup(
                        max,
                        used.saturating_sub(inactive),
                        "memory.max",
                        &dir,
                    ));
                }
                if dir == root || !dir.pop() || !dir.starts_with(root) {
                    break;
                }
            }
        } else if ctrl.split(',').any(|c| c == "memory") {
            let base = root.join("memory");
            for dir in [base.join(rel), base.clone()] {
                if let Some(max) = num(dir.join("memory.limit_in_bytes")) {
                    // v1 writes "no limit" as a number near 2^63.
                    if max < 1 << 60 {
                        let used = num(dir.join("memory.usage_in_bytes")).unwrap_or(0);
                        let inactive = read(&dir.join("memory.stat"))
                            .and_then(|s| stat_field(&s, "total_inactive_file"))
                            .unwrap_or(0);
                        rooms.push(cgroup(
                            max,
                            used.saturating_sub(inactive),
                            "memory.limit_in_bytes",
                            &dir,
                        ));
                    }
                    break;
                }
            }
        }
    }
    rooms
}

fn cgroup(max: usize, used: usize, file: &str, dir: &Path) -> Room {
    Room {
        what: format!(
            "the cgroup limit ({file} {} in {}, {} in use)",
            human_bytes(max),
            dir.display(),
            human_bytes(used)
        ),
        bytes: max.saturating_sub(used),
    }
}

/// Room under RLIMIT_AS (`Max address space` of /proc/self/limits) less the mapped size (`VmSize` of
/// /proc/self/status).
fn address_space_room(limits: &str, status: &str) -> Option<Room> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: usize = line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mapped = kb_field(status, "VmSize:").unwrap_or(0);
    Some(Room {
        what: format!(
            "the address-space limit (ulimit -v: {}, {} mapped)",
            human_bytes(soft),
            human_bytes(mapped)
        ),
        bytes: soft.saturating_sub(mapped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan() -> MemPlan {
        MemPlan {
            weights: 100 << 20,
            kv: 700 << 20,
            activations: 20 << 20,
            logits: 4 << 20,
            tokens: 29_920,
            ..Default::default()
        }
    }

    #[test]
    fn over_max_memory_names_the_parts_and_the_limit() {
        let e = check_against(&plan(), 100 << 20, Some(800 << 20), &[])
            .unwrap_err()
            .to_string();
        for s in [
            "824.0 MiB",
            "KV cache 700.0 MiB (29920 tokens)",
            "--max-memory 800.0 MiB",
            "--kv-dtype q4",
        ] {
            assert!(e.contains(s), "{s}: {e}");
        }
        assert!(check_against(&plan(), 0, Some(900 << 20), &[]).is_ok());
    }

    #[test]
    fn the_tightest_room_is_named_and_what_is_held_is_not_counted_twice() {
        let rooms = [
            Room {
                what: "roomy".into(),
                bytes: 10 << 30,
            },
            Room {
                what: "tight".into(),
                bytes: 700 << 20,
            },
        ];
        // 724 MiB still to allocate: over the tight room.
        let e = check_against(&plan(), 100 << 20, None, &rooms)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tight leaves 700.0 MiB") && e.contains("724.0 MiB more"),
            "{e}"
        );
        // With the KV already held, the rest fits.
        assert!(check_against(&plan(), 800 << 20, None, &rooms).is_ok());
    }

    #[test]
    fn cgroup_files_are_read_for_v2_ancestors_and_v1() {
        let files: HashMap<PathBuf, &str> = [
            ("/cg/a/b/memory.max", "max\n"),
            ("/cg/a/memory.max", "1073741824\n"),
            ("/cg/a/memory.current", "536870912\n"),
            (
                "/cg/a/memory.stat",
                "anon 1\ninactive_file 268435456\nactive_file 5\n",
            ),
            ("/cg/memory/job/memory.limit_in_bytes", "2147483648\n"),
            ("/cg/memory/job/memory.usage_in_bytes", "1073741824\n"),
            (
                "/cg/memory/other/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]
        .into_iter()
        .map(|(p, s)| (PathBuf::from(p), s))
        .collect();
        let read = |p: &Path| files.get(p).map(|s| s.to_string());
        let v2 = cgroup_room("0::/a/b\n", Path::new("/cg"), &read);
        assert_eq!(v2.len(), 1, "{v2:?}");
        // 1 GiB limit, 512 MiB used of which 256 MiB inactive page cache: 768 MiB left.
        assert_eq!(v2[0].bytes, 768 << 20);
        assert!(v2[0].what.contains("memory.max 1.00 GiB"), "{}", v2[0].what);
        let v1 = cgroup_room("4:memory:/job\n3:cpu:/x\n", Path::new("/cg"), &read);
        assert_eq!(
            v1.iter().map(|r| r.bytes).collect::<Vec<_>>(),
            vec![1 << 30]
        );
        assert!(cgroup_room("4:memory:/other\n", Path::new("/cg"), &read).is_empty());
    }

    #[test]
    fn address_space_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max address space         838860800            unlimited            bytes\n";
        let status = "Name:\thayloft\nVmSize:\t  204800 kB\n";
        let r = address_space_room(limits, status).unwrap();
        assert_eq!(r.bytes, (800 << 20) - (200 << 20));
        let unlimited =
            "Max address space         unlimited            unlimited            bytes\n";
        assert!(address_space_room(unlimited, status).is_none());
        assert_eq!(
            kb_field("MemAvailable:   2048 kB\n", "MemAvailable:"),
            Some(2 << 20)
        );
    }
}
