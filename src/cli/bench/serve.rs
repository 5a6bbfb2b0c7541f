//! `hayloft bench serve`: load on an OpenAI-compatible server. Starts `hayloft serve` in this process (the serve
//! flags apply) or connects to `--url`; `--clients` threads each send their share of `--requests` streamed
//! completions, one at a time, and time them: time to first token (the first token event), latency (the last event),
//! the tokens generated and the prompt tokens the server reports cached. A share of the prompts (`--shared`) start
//! with one common prefix of `--shared-prefix` tokens; the rest are unique. Prompts are token ids, cut from the
//! server's own tokenization of a seeded word salad.
//!
//! The client is plain HTTP/1.1 over a `TcpStream` (one connection per request, as most benchmark clients do): a
//! blocking thread per client measures the first byte of each event exactly, with no runtime in between.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::serve::{start, ServeArgs};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The load (the rest of `bench serve`'s flags are `hayloft serve`'s).
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The server to load (`http://host:port`); without it, one is started here with the serve flags below.
    #[arg(long)]
    pub url: Option<String>,
    /// Concurrent clients (each sends one request at a time).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 1024)]
    pub prompt_tokens: usize,
    /// Tokens of the common prefix of the shared-prefix prompts.
    #[arg(long, default_value_t = 512)]
    pub shared_prefix: usize,
    /// Share of requests whose prompt starts with the common prefix (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    pub shared: f64,
    /// Tokens generated per request (end-of-generation ignored).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Send one shared-prefix request alone first, so that later ones find the prefix cached (its figures are
    /// reported apart, as the cold request).
    #[arg(long)]
    pub warm: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One finished request.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    ttft_s: f64,
    latency_s: f64,
    completion_tokens: usize,
    prompt_tokens: usize,
    cached_tokens: usize,
    shared: bool,
}

#[derive(Serialize, Default)]
struct Pct {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

#[derive(Serialize)]
struct Report {
    clients: usize,
    requests: usize,
    /// Requests that failed otherwise than a 429 with Retry-After (under a --kv-budget, this must be 0).
    failed: usize,
    /// Requests refused with 429 and a Retry-After header (the server's overload answer).
    refused_429: usize,
    prompt_tokens: usize,
    max_tokens: usize,
    shared_prefix: usize,
    wall_s: f64,
    requests_per_s: f64,
    generated_tokens_per_s: f64,
    /// Sum over clients of each request's decode rate (tokens after the first / time after the first), averaged over
    /// requests: the aggregate decode speed while all clients decode.
    aggregate_decode_tokens_per_s: f64,
    ttft_s: Pct,
    latency_s: Pct,
    /// TTFT of requests that found cached tokens, and of those that found none.
    ttft_cached_s: Pct,
    ttft_uncached_s: Pct,
    /// Prompt tokens the server reported cached / prompt tokens sent.
    cached_token_share: f64,
    /// Requests with any cached tokens / requests.
    cache_hit_rate: f64,
    /// `hayloft_kv_cache_bytes_peak` from the server's /metrics (None if it does not say).
    peak_kv_bytes: Option<u64>,
    /// Peak resident set of this process (server and clients) when the server runs in it; None with --url.
    peak_rss_bytes: Option<u64>,
    warm_request: Option<Sample>,
    samples: Vec<Sample>,
}

/// A 429 with Retry-After: the server refused the request on purpose.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("refused: 429 with Retry-After")
    }
}

impl std::error::Error for Refused {}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let ServeBenchArgs { load: a, serve } = args;
    if a.clients == 0 || a.requests == 0 {
        bail!("--clients and --requests must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.shared) {
        bail!(
            "--shared is a share of the requests, from 0 to 1 (got {})",
            a.shared
        );
    }
    if a.shared_prefix >= a.prompt_tokens && (a.shared > 0.0 || a.warm) {
        bail!(
            "--shared-prefix ({}) must be shorter than --prompt-tokens ({})",
            a.shared_prefix,
            a.prompt_tokens
        );
    }
    let (addr, _server) = match &a.url {
        Some(u) => (host_port(u)?, None),
        None => {
            let mut s = serve;
            s.port = 0;
            s.host = "127.0.0.1".into();
            let server = start(s)?;
            (server.addr.to_string(), Some(server))
        }
    };
    let (prompts, warm_prompt) = make_prompts(&addr, &a)?;
    let warm = if a.warm {
        Some(request(&addr, &warm_prompt, a.max_tokens, true)?)
    } else {
        None
    };
    let t0 = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Sample>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..a.clients)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= a.requests {
                            return out;
                        }
                        let (p, shared) = &prompts[i];
                        out.push(request(&addr, p, a.max_tokens, *shared));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let (mut failed, mut refused) = (0, 0);
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) if e.is::<Refused>() => refused += 1,
            Err(e) => {
                failed += 1;
                eprintln!("request failed: {e:#}");
            }
        }
    }
    let metrics = http(&addr, "GET", "/metrics", None)
        .map(|(_, b)| b)
        .unwrap_or_default();
    let peak = metrics.lines().find_map(|l| {
        l.strip_prefix("hayloft_kv_cache_bytes_peak ")
            .and_then(|v| v.trim().parse().ok())
    });
    let rss = _server
        .as_ref()
        .and_then(|_| crate::engine::stats::peak_rss_bytes())
        .map(|b| b as u64);
    let mut r = report(&a, samples, failed, wall, peak, warm);
    r.refused_429 = refused;
    r.peak_rss_bytes = rss;
    print_table(&r);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// `http://host:port[/]` → `host:port`.
fn host_port(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--url '{url}': only http:// URLs are supported"))?;
    Ok(rest.trim_end_matches('/').to_string())
}

type Prompts = (Vec<(Vec<u32>, bool)>, Vec<u32>);

/// The prompts in request order with whether each starts with the common prefix, and a shared-prefix prompt of
/// its own for `--warm`: the server tokenizes a seeded word salad; the prefix is its head, each prompt's own tokens
/// come from a window further on.
fn make_prompts(addr: &str, a: &LoadArgs) -> Result<Prompts> {
    const WORDS: &[&str] = &[
        "barn", "hay", "loft", "river", "stone", "lantern", "meadow", "copper", "thistle",
        "orchard", "harbor", "quiet", "amber", "falcon", "willow", "granite", "ember", "saddle",
        "cedar", "north", "plough", "ferry", "velvet", "marble", "signal", "tundra", "oak",
        "pepper", "ribbon", "summit",
    ];
    let want = a.shared_prefix + a.prompt_tokens * (a.requests + 1) + 64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut ids: Vec<u32> = Vec::new();
    while ids.len() < want {
        let mut text = String::new();
        for _ in 0..4096 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            text.push_str(WORDS[(rng % WORDS.len() as u64) as usize]);
            text.push(if rng.is_multiple_of(11) { '.' } else { ' ' });
        }
        // llama-server's field names (`content`, `add_special`), which hayloft serve also reads, so --url may point
        // at either server.
        let body = json!({"content": text, "add_special": false}).to_string();
        let (status, r) = http(addr, "POST", "/tokenize", Some(&body))?;
        if status != 200 {
            bail!("/tokenize answered {status}: {r}");
        }
        let v: Value = serde_json::from_str(&r).context("/tokenize: not JSON")?;
        let got = v["tokens"]
            .as_array()
            .ok_or_else(|| anyhow!("/tokenize: no tokens in {r}"))?;
        let before = ids.len();
        ids.extend(got.iter().filter_map(|t| t.as_u64()).map(|t| t as u32));
        if ids.len() == before {
            bail!("/tokenize returned no tokens");
        }
    }
    let prefix = &ids[..a.shared_prefix];
    let n_shared = (a.requests as f64 * a.shared).round() as usize;
    // Window w of the prompts' own tokens (0: the warm-up's).
    let prompt = |w: usize, shared: bool| {
        let start = a.shared_prefix + w * a.prompt_tokens;
        let own = &ids[start..start + a.prompt_tokens];
        if shared {
            let mut p = prefix.to_vec();
            p.extend_from_slice(&own[..a.prompt_tokens - a.shared_prefix]);
            p
        } else {
            own.to_vec()
        }
    };
    let prompts = (0..a.requests)
        .map(|i| {
            // The shared ones spread evenly over the order.
            let shared = (i * n_shared) / a.requests != ((i + 1) * n_shared) / a.requests;
            (prompt(i + 1, shared), shared)
        })
        .collect();
    // The warm-up request starts with the common prefix when there is one to warm (else it is one more own prompt).
    Ok((prompts, prompt(0, a.shared_prefix < a.prompt_tokens)))
}

/// One streamed completion, timed.
fn request(addr: &str, prompt: &[u32], max_tokens: usize, shared: bool) -> Result<Sample> {
    let body = json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.write_all(head("POST", "/v1/completions", addr, body.len()).as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let mut ttft = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if ttft.is_none() && contains(&raw, b"\"text\"") {
            ttft = Some(t0.elapsed().as_secs_f64());
        }
    }
    let latency = t0.elapsed().as_secs_f64();
    let (status, body) = split_response(&raw)?;
    let retry_after = String::from_utf8_lossy(&raw)
        .split("\r\n\r\n")
        .next()
        .is_some_and(|h| h.to_ascii_lowercase().contains("\r\nretry-after:"));
    if status == 429 && retry_after {
        return Err(Refused.into());
    }
    if status != 200 {
        bail!("status {status}: {body}");
    }
    let usage = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .last()
        .ok_or_else(|| anyhow!("the stream has no usage event"))?;
    let num = |v: &Value| v.as_u64().unwrap_or(0) as usize;
    Ok(Sample {
        ttft_s: ttft.unwrap_or(latency),
        latency_s: latency,
        completion_tokens: num(&usage["completion_tokens"]),
        prompt_tokens: num(&usage["prompt_tokens"]),
        cached_tokens: num(&usage["prompt_tokens_details"]["cached_tokens"]),
        shared,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn head(method: &str, path: &str, addr: &str, len: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    )
}

/// A whole request and its answer (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let body = body.unwrap_or("");
    s.write_all(head(method, path, addr, body.len()).as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    split_response(&raw)
}

/// Status and body (chunked transfer decoded) of a raw HTTP/1.1 response.
fn split_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("the server's answer has no header end"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {}", head.lines().next().unwrap_or("")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, rest.to_string()));
    }
    let mut out = String::new();
    let mut s = rest;
    while let Some((size, after)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 || after.len() < n {
            break;
        }
        out += &after[..n];
        s = after.get(n + 2..).unwrap_or("");
    }
    Ok((status, out))
}

fn pct(mut v: Vec<f64>) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Pct {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

fn report(
    a: &LoadArgs,
    samples: Vec<Sample>,
    failed: usize,
    wall: f64,
    peak_kv_bytes: Option<u64>,
    warm_request: Option<Sample>,
) -> Report {
    let n = samples.len().max(1) as f64;
    let gen: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let prompt: usize = samples.iter().map(|s| s.prompt_tokens).sum();
    let cached: usize = samples.iter().map(|s| s.cached_tokens).sum();
    let decode_rate = |s: &Sample| {
        let t = s.latency_s - s.ttft_s;
        if s.completion_tokens > 1 && t > 0.0 {
            (s.completion_tokens - 1) as f64 / t
        } else {
            0.0
        }
    };
    let mean_decode = samples.iter().map(decode_rate).sum::<f64>() / n;
    let ttft_where = |c: bool| {
        pct(samples
            .iter()
            .filter(|s| (s.cached_tokens > 0) == c)
            .map(|s| s.ttft_s)
            .collect())
    };
    Report {
        clients: a.clients,
        requests: a.requests,
        failed,
        refused_429: 0,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        shared_prefix: a.shared_prefix,
        wall_s: wall,
        requests_per_s: samples.len() as f64 / wall,
        generated_tokens_per_s: gen as f64 / wall,
        aggregate_decode_tokens_per_s: mean_decode * a.clients.min(a.requests) as f64,
        ttft_s: pct(samples.iter().map(|s| s.ttft_s).collect()),
        latency_s: pct(samples.iter().map(|s| s.latency_s).collect()),
        ttft_cached_s: ttft_where(true),
        ttft_uncached_s: ttft_where(false),
        cached_token_share: cached as f64 / prompt.max(1) as f64,
        cache_hit_rate: samples.iter().filter(|s| s.cached_tokens > 0).count() as f64 / n,
        peak_kv_bytes,
        peak_rss_bytes: None,
        warm_request,
        samples,
    }
}

fn print_table(r: &Report) {
    println!(
        "{} clients, {} requests ({} failed, {} refused with 429), {} prompt tokens ({} shared prefix), {} new tokens each; {:.2} s",
        r.clients, r.requests, r.failed, r.refused_429, r.prompt_tokens, r.shared_prefix, r.max_tokens, r.wall_s
    );
    println!(
        "throughput: {:.2} req/s, {:.1} generated tok/s; aggregate decode {:.1} tok/s",
        r.requests_per_s, r.generated_tokens_per_s, r.aggregate_decode_tokens_per_s
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9}",
        "seconds", "p50", "p90", "p99", "mean"
    );
    for (name, p) in [
        ("TTFT", &r.ttft_s),
        ("TTFT cached", &r.ttft_cached_s),
        ("TTFT uncached", &r.ttft_uncached_s),
        ("latency", &r.latency_s),
    ] {
        println!(
            "{name:<16} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            p.p50, p.p90, p.p99, p.mean
        );
    }
    if let Some(w) = &r.warm_request {
        println!(
            "warm-up (cold) request: TTFT {:.3} s, {} cached tokens",
            w.ttft_s, w.cached_tokens
        );
    }
    println!(
        "prefix cache: {:.0} % of requests hit, {:.1} % of prompt tokens cached; peak KV {}; peak RSS {}",
        100.0 * r.cache_hit_rate,
        100.0 * r.cached_token_share,
        r.peak_kv_bytes
            .map_or("?".into(), |b| crate::engine::stats::human_bytes(
                b as usize
            )),
        r.peak_rss_bytes
            .map_or("?".into(), |b| crate::engine::stats::human_bytes(
                b as usize
            ))
    );
}
