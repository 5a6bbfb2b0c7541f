//! `hayloft serve --kv-disk DIR` as a real process, killed with SIGKILL while it writes cache files, its directory then
//! damaged by hand (a truncated file, a flipped byte, a dead writer's temporary file): a restarted server trusts only
//! whole, valid entries (`cached_tokens` from them alone), refuses and counts the damaged ones, recomputes their
//! prefixes to the same answers, and never panics. Then `--kv-disk-max` shrinks the directory on start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hayloft::model::testutil::{write_tiny_llama, TinySpec};
use serde_json::{json, Value};

/// A `hayloft serve` child process, SIGKILLed when dropped.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(model: &Path, kv: &Path, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_hayloft"))
            .arg("serve")
            .arg("-m")
            .arg(model)
            .args(["-t", "1", "--port", &port.to_string(), "--parallel", "4"])
            .args(["--prefix-cache-ram", "0", "--kv-disk"])
            .arg(kv)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut p = Proc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("hayloft serve exited at start: {st}");
            }
            if try_http(p.addr, "GET", "/health", None).is_some_and(|(s, _)| s == 200) {
                return p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "hayloft serve did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to clean up.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Greedy completion of token ids: (text, cached tokens).
    fn complete(&self, prompt: &[u32]) -> (String, u64) {
        let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        let (status, text) = try_http(
            self.addr,
            "POST",
            "/v1/completions",
            Some(&body.to_string()),
        )
        .expect("the server answers");
        assert_eq!(status, 200, "{text}");
        let j: Value = serde_json::from_str(&text).unwrap();
        (
            j["choices"][0]["text"].as_str().unwrap().to_string(),
            j["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        )
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, m) = try_http(self.addr, "GET", "/metrics", None).unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0)
    }

    fn wait_metric(&self, name: &str, at_least: u64) {
        let t0 = Instant::now();
        while self.metric(name) < at_least {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{name} stays under {at_least}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One HTTP/1.1 exchange (`Connection: close`): status and body; None if the connection fails.
fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let mut out = String::new();
    if chunked {
        let mut r = rest;
        loop {
            let (size, tail) = r.split_once("\r\n")?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out += tail.get(..n)?;
            r = tail.get(n + 2..)?;
        }
    } else {
        out = rest.to_string();
    }
    Some((status, out))
}

/// 300 byte-token ids from a seed: one 256-token unit of the disk tier, and a tail.
fn prompt(seed: u32) -> Vec<u32> {
    (0..300u32)
        .map(|i| 32 + (i.wrapping_mul(7).wrapping_add(seed * 13)) % 90)
        .collect()
}

fn blobs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hlkv"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_server_killed_mid_write_leaves_nothing_a_restarted_one_trusts_wrongly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, &TinySpec::default()).unwrap();
    let kv = dir.path().join("kv");

    // Server A: three prompts one after another, each writing one unit file (mapped to its prompt), then four at
    // once, killed while they run and write.
    let a = Proc::start(&model, &kv, &[]);
    let mut cold = Vec::new();
    let mut file_of = Vec::new();
    for i in 0..3u32 {
        let (text, cached) = a.complete(&prompt(i));
        assert_eq!(cached, 0);
        a.wait_metric("hayloft_prefix_tier_writes_total", i as u64 + 1);
        let new: Vec<PathBuf> = blobs(&kv)
            .into_iter()
            .filter(|p| !file_of.contains(p))
            .collect();
        assert_eq!(new.len(), 1, "one unit file per prompt: {new:?}");
        file_of.push(new[0].clone());
        cold.push(text);
    }
    let addr = a.addr;
    let racing: Vec<_> = (3..7u32)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"prompt": prompt(i), "max_tokens": 64, "temperature": 0, "ignore_eos": true});
                try_http(addr, "POST", "/v1/completions", Some(&body.to_string()))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    a.kill9();
    for h in racing {
        let _ = h.join().unwrap();
    }

    // Damage by hand: unit 0 truncated, unit 1 with a flipped byte, a half-written temporary file of a dead writer.
    let b0 = std::fs::read(&file_of[0]).unwrap();
    std::fs::write(&file_of[0], &b0[..b0.len() / 2]).unwrap();
    let mut b1 = std::fs::read(&file_of[1]).unwrap();
    let mid = b1.len() / 2;
    b1[mid] ^= 0x20;
    std::fs::write(&file_of[1], &b1).unwrap();
    let temp = kv.join(format!(
        ".{}.tmp-4194305-0",
        file_of[2].file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&temp, &b0[..100]).unwrap();

    // Server B on the same directory.
    let mut b = Proc::start(&model, &kv, &[]);
    assert!(!temp.exists(), "a dead writer's temporary file is removed");
    for (i, want) in cold.iter().enumerate().take(2) {
        let (text, cached) = b.complete(&prompt(i as u32));
        assert_eq!(cached, 0, "damaged unit {i} is not reused");
        assert_eq!(
            &text, want,
            "and its prefix is recomputed to the same answer"
        );
    }
    // Both were deleted, then written again whole from the recomputed prefixes.
    b.wait_metric("hayloft_prefix_tier_writes_total", 2);
    assert_eq!(std::fs::read(&file_of[0]).unwrap(), b0);
    b1[mid] ^= 0x20;
    assert_eq!(std::fs::read(&file_of[1]).unwrap(), b1);
    let (_, cached) = b.complete(&prompt(2));
    assert_eq!(cached, 256, "the intact unit is reused");
    // Whatever the killed server left of the racing prompts is whole, or absent.
    for i in 3..7 {
        let (_, cached) = b.complete(&prompt(i));
        assert!(cached == 0 || cached == 256, "{cached}");
    }
    assert_eq!(
        b.metric("hayloft_prefix_tier_errors_total"),
        2,
        "exactly the two damaged files are refused"
    );
    assert!(b.alive(), "no panic");
    let held = b.metric("hayloft_prefix_cache_bytes{tier=\"disk\"}");
    let on_disk: u64 = blobs(&kv)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(held, on_disk);
    b.kill9();

    // Server C with a limit of about two files: the oldest go at start, and writes keep it under.
    let unit = std::fs::metadata(&file_of[2]).unwrap().len();
    let max = (unit * 5 / 2).to_string();
    let c = Proc::start(&model, &kv, &["--kv-disk-max", &max]);
    assert!(blobs(&kv).len() <= 2, "{:?}", blobs(&kv));
    for i in 10..13 {
        c.complete(&prompt(i));
    }
    c.wait_metric("hayloft_prefix_tier_evictions_total", 1);
    let held = c.metric("hayloft_prefix_cache_bytes{tier=\"disk\"}");
    assert!(held > 0 && held <= unit * 5 / 2, "{held} over the limit");
    assert_eq!(c.metric("hayloft_prefix_tier_errors_total"), 0);
}
