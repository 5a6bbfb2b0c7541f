//! The stats line every model-running command prints, and its JSON form (`--stats-json`).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Prompt tokens prefilled (those restored from a prompt cache not counted).
    pub prompt_tokens: usize,
    /// Prompt tokens restored from a prompt cache (`--kv-disk`) instead of prefilled.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// Time from the start of prefill to the first generated token.
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Largest number of bytes the KV cache held (its own counter of allocated blocks).
    pub peak_kv_bytes: usize,
    /// The memory plan's KV bytes for this run (0 when no plan was made); compare with `peak_kv_bytes`.
    pub planned_kv_bytes: usize,
    /// Bytes the KV cache held at the end (after any compression), selection metadata and indices included.
    pub kv_bytes: usize,
    /// Of those, the selector's page summaries and indices.
    pub kv_meta_bytes: usize,
    /// KV offload (`--kv-offload`): bytes of the blocks in the offload file at the end (`kv_bytes` is what stayed in
    /// RAM).
    pub kv_disk_bytes: usize,
    /// KV offload: bytes read from the offload file over the session (prefill, decode and promotions back into RAM);
    /// they are part of the KV bytes read.
    pub kv_disk_read_bytes: u64,
    /// `--prefill lazyllm`: bytes the aux cache of pruned hidden states held at the end.
    pub aux_bytes: usize,
    /// KV bytes read per decoded token (attention plus the selector's scoring; mean over decode steps).
    pub kv_read_bytes_per_token: f64,
    /// Time in attention (selection included) per decoded token.
    pub attention_ms_per_token: f64,
    /// Peak resident set size of the process (VmHWM), where the OS reports it.
    pub peak_rss_bytes: usize,
    pub threads: usize,
    /// Which matmul kernel ran.
    pub kernel: String,
    /// The `--prefill` method, and the share of query·key pairs its prefill chunks computed of what dense causal
    /// attention computes (global layers; 1 for dense).
    pub prefill: String,
    pub prefill_density: f64,
    /// `--prefill lazyllm`: the share of (prompt token, layer) rows prefill computed (pruning skips the rest); its
    /// attention is dense over what is kept, so the stats line shows this instead of the density.
    pub prefill_rows_computed: Option<f64>,
    /// The spec's `codec` option: bytes of the last codec blob the cache went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec_bytes: Option<usize>,
    #[serde(skip)]
    pub prefill_s: f64,
    #[serde(skip)]
    pub decode_s: f64,
    #[serde(skip)]
    pub decode_steps: usize,
    #[serde(skip)]
    pub kv_read_total: u64,
    #[serde(skip)]
    pub attention_ns_total: u64,
}

impl Stats {
    pub fn note_kv(&mut self, bytes: usize) {
        self.peak_kv_bytes = self.peak_kv_bytes.max(bytes);
    }

    /// Fills the derived fields (rates, peak RSS).
    pub fn finish(&mut self) {
        if self.prefill_s > 0.0 {
            self.prefill_tok_s = self.prompt_tokens as f64 / self.prefill_s;
        }
        if self.decode_s > 0.0 {
            self.decode_tok_s = self.decode_steps as f64 / self.decode_s;
        }
        if self.decode_steps > 0 {
            let n = self.decode_steps as f64;
            self.kv_read_bytes_per_token = self.kv_read_total as f64 / n;
            self.attention_ms_per_token = self.attention_ns_total as f64 / 1e6 / n;
        }
        self.peak_rss_bytes = peak_rss_bytes().unwrap_or(0);
        self.kernel = crate::kernels::kernel_name().to_string();
    }

    pub fn line(&self) -> String {
        let codec = self.codec_bytes.map_or(String::new(), |b| {
            format!(" | KV codec blob {}", human_bytes(b))
        });
        let line = format!(
            "[stats] prompt {} tok{} | generated {} tok | ttft {:.1} ms | prefill {:.1} tok/s | decode {:.1} tok/s | KV {} (peak {}{}{}){} | KV read {}/tok | attention {:.2} ms/tok | peak RSS {} | {} threads ({}) | prefill {} ({})",
            self.prompt_tokens,
            if self.cached_tokens > 0 {
                format!(" (+{} restored from --kv-disk)", self.cached_tokens)
            } else {
                String::new()
            },
            self.generated_tokens,
            self.ttft_ms,
            self.prefill_tok_s,
            self.decode_tok_s,
            human_bytes(self.kv_bytes),
            human_bytes(self.peak_kv_bytes),
            if self.planned_kv_bytes > 0 {
                format!(", planned {}", human_bytes(self.planned_kv_bytes))
            } else {
                String::new()
            },
            if self.kv_meta_bytes > 0 {
                format!(", selection metadata {}", human_bytes(self.kv_meta_bytes))
            } else if self.aux_bytes > 0 {
                format!(", LazyLLM aux cache {}", human_bytes(self.aux_bytes))
            } else {
                String::new()
            },
            if self.kv_disk_bytes > 0 || self.kv_disk_read_bytes > 0 {
                format!(
                    " in RAM, {} on disk (read from disk {})",
                    human_bytes(self.kv_disk_bytes),
                    human_bytes(self.kv_disk_read_bytes as usize)
                )
            } else {
                String::new()
            },
            human_bytes(self.kv_read_bytes_per_token as usize),
            self.attention_ms_per_token,
            human_bytes(self.peak_rss_bytes),
            self.threads,
            self.kernel,
            self.prefill,
            match self.prefill_rows_computed {
                Some(r) => format!("computed {:.1}% of token-layer rows", 100.0 * r),
                None => format!("density {:.1}%", 100.0 * self.prefill_density),
            },
        );
        line + &codec
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self)?;
        crate::util::write_atomic(path, (s + "\n").as_bytes())
    }
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Peak resident set size from /proc/self/status (Linux); None elsewhere.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
