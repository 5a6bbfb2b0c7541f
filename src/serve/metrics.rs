//! The counters `/metrics` shows, in Prometheus' text format (version 0.0.4). Written by the HTTP handlers and the
//! engine thread, read by the scrape: atomics and two small locked histograms, nothing on a hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::engine::prefix::PrefixStore;

/// Upper bounds, in seconds, of the latency histograms' buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

struct Histogram {
    bounds: &'static [f64],
    /// counts[i]: observations ≤ bounds[i] and > bounds[i − 1]; the last: above every bound.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

pub struct Metrics {
    /// (endpoint, HTTP status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sequences dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Gauges the engine sets after every scheduling round.
    pub kv_bytes: AtomicU64,
    /// The most `kv_bytes` has been.
    pub kv_bytes_peak: AtomicU64,
    /// The running sequences' planned peak KV bytes, summed (what `--kv-budget` bounds).
    pub kv_planned_bytes: AtomicU64,
    /// Batched forward passes, and the sequences they carried.
    pub batch_steps: AtomicU64,
    pub batch_rows: AtomicU64,
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            kv_bytes_peak: AtomicU64::new(0),
            kv_planned_bytes: AtomicU64::new(0),
            batch_steps: AtomicU64::new(0),
            batch_rows: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(ITL_BUCKETS)),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
        }
    }

    pub fn ttft(&self, secs: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(secs);
        }
    }

    pub fn inter_token(&self, secs: f64) {
        if let Ok(mut h) = self.itl.lock() {
            h.observe(secs);
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s += "# HELP hayloft_requests_total HTTP requests answered, by endpoint and status.\n\
              # TYPE hayloft_requests_total counter\n";
        if let Ok(m) = self.requests.lock() {
            for ((e, c), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "hayloft_requests_total{{endpoint=\"{e}\",status=\"{c}\"}} {n}"
                );
            }
        }
        let counters = [
            (
                "hayloft_prompt_tokens_total",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "hayloft_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "hayloft_cancelled_total",
                "Sequences stopped because their client disconnected.",
                &self.cancelled,
            ),
            (
                "hayloft_batch_steps_total",
                "Batched forward passes of the scheduler.",
                &self.batch_steps,
            ),
            (
                "hayloft_batch_sequences_total",
                "Sequences those passes carried (divide by the steps for the mean batch size).",
                &self.batch_rows,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let gauges = [
            (
                "hayloft_kv_cache_bytes",
                "Bytes the running sequences' KV caches hold.",
                &self.kv_bytes,
            ),
            (
                "hayloft_kv_cache_bytes_peak",
                "The most bytes the running sequences' KV caches have held at once.",
                &self.kv_bytes_peak,
            ),
            (
                "hayloft_kv_cache_planned_bytes",
                "The running sequences' planned peak KV bytes, summed (bounded by --kv-budget).",
                &self.kv_planned_bytes,
            ),
            (
                "hayloft_requests_waiting",
                "Sequences queued, not yet started.",
                &self.waiting,
            ),
            (
                "hayloft_requests_running",
                "Sequences being prefilled or decoded.",
                &self.running,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        if let Ok(h) = self.ttft.lock() {
            h.render(
                &mut s,
                "hayloft_time_to_first_token_seconds",
                "From a sequence's arrival to its first generated token.",
            );
        }
        if let Ok(h) = self.itl.lock() {
            h.render(
                &mut s,
                "hayloft_inter_token_latency_seconds",
                "Between consecutive generated tokens of a sequence.",
            );
        }
        s
    }
}

/// The prefix store's counters and the KV bytes each of its tiers holds, in the same format.
pub fn render_prefix(store: &PrefixStore) -> String {
    let mut s = String::new();
    let c = store.counters();
    let t = store.tier_counters();
    for (name, help, v) in [
        (
            "hayloft_prefix_cache_hits_total",
            "Prefix lookups that found cached tokens.",
            c.hits,
        ),
        (
            "hayloft_prefix_cache_misses_total",
            "Prefix lookups that found none.",
            c.misses,
        ),
        (
            "hayloft_prefix_cache_evictions_total",
            "RAM entries dropped to stay within --prefix-cache-ram.",
            c.evictions,
        ),
        (
            "hayloft_prefix_cache_hit_tokens_total",
            "Prompt tokens restored from the cache instead of computed.",
            c.hit_tokens,
        ),
        (
            "hayloft_prefix_cache_inserts_total",
            "Entries stored in RAM.",
            c.inserts,
        ),
        (
            "hayloft_prefix_tier_hits_total",
            "Units read back from the disk and Redis tiers.",
            t.hits,
        ),
        (
            "hayloft_prefix_tier_writes_total",
            "Units written to the disk and Redis tiers.",
            t.writes,
        ),
        (
            "hayloft_prefix_tier_errors_total",
            "Tier blobs refused (failed checks: deleted, recomputed) or tier calls that failed.",
            t.errors,
        ),
        (
            "hayloft_prefix_tier_evictions_total",
            "Tier blobs this server removed to stay under a tier's size limit (--kv-disk-max).",
            t.evictions,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let name = "hayloft_prefix_cache_bytes";
    let _ = writeln!(
        s,
        "# HELP {name} KV bytes the prefix cache holds, by tier (ram: this process; disk, redis: every writer's).\n\
         # TYPE {name} gauge\n{name}{{tier=\"ram\"}} {}",
        store.ram_usage().0
    );
    for (tier, bytes) in store.tier_bytes() {
        match bytes {
            Ok(b) => {
                let _ = writeln!(s, "{name}{{tier=\"{tier}\"}} {b}");
            }
            Err(e) => eprintln!("warning: /metrics: the {tier} tier's size: {e:#}"),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft(0.003);
        m.ttft(0.2);
        m.ttft(100.0);
        m.request("/v1/completions", 200);
        let t = m.render();
        assert!(t.contains("hayloft_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(t.contains("hayloft_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(t.contains("hayloft_time_to_first_token_seconds_bucket{le=\"60\"} 2"));
        assert!(t.contains("hayloft_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(t.contains("hayloft_time_to_first_token_seconds_count 3"));
        assert!(t.contains("hayloft_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"));
    }
}
