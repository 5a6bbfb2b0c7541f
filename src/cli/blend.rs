//! `hayloft bench blend`: CacheBlend against full recompute and naive reuse on multi-document QA (see
//! [`crate::eval::blendqa`]): accuracy and mean time to first token per mode.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::ModelArgs;
use crate::engine::blend::{BlendOptions, Deviation, Reuse, DEFAULT_CHECK_LAYER, DEFAULT_RATIO};
use crate::eval::blendqa::{self, BlendQaParams, ChunkBase};

#[derive(Args, Debug)]
pub struct BlendArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Passages per question, each cached on its own and holding one needle.
    #[arg(long, default_value_t = 4)]
    pub docs: usize,
    /// Words per passage.
    #[arg(long, default_value_t = 200)]
    pub doc_words: usize,
    /// Questions asked (one case each).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Blend recompute ratios to compare, comma-separated shares of the passages' tokens (0.15 = 15 %).
    #[arg(long, default_value_t = DEFAULT_RATIO.to_string())]
    pub ratios: String,
    /// Layer at which tokens are ranked by value deviation (the layers before it are recomputed in full).
    #[arg(long, default_value_t = DEFAULT_CHECK_LAYER)]
    pub check_layer: usize,
    /// Rank tokens by key deviation (LMCache's blender) instead of value deviation (CacheBlend's code).
    #[arg(long)]
    pub by_key: bool,
    /// Gradual filtering (the paper's §4.3): the check layer keeps this many times each ratio (capped at 1), and the
    /// next --taper layers rank again among those, narrowing to the ratio. 1 = one check (the public codes).
    #[arg(long, default_value_t = 1.0)]
    pub widen: f32,
    /// Layers after the check layer over which gradual filtering narrows to the ratio.
    #[arg(long, default_value_t = 0)]
    pub taper: usize,
    /// Tokens decoded per answer.
    #[arg(long, default_value_t = 12)]
    pub max_new: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Cache each passage on its own from position 0, with nothing before it, instead of after the shared system
    /// prompt and instructions.
    #[arg(long, conflicts_with = "after_bos")]
    pub from_zero: bool,
    /// Cache each passage on its own after one BOS token (CacheBlend's code) instead of after the shared head.
    #[arg(long)]
    pub after_bos: bool,
    /// Write the summaries as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: BlendArgs) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let mut modes = vec![
        ("full recompute".to_string(), Reuse::Full),
        ("naive reuse".to_string(), Reuse::Naive),
    ];
    for r in a.ratios.split(',').filter(|r| !r.trim().is_empty()) {
        let ratio: f32 = r
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--ratios: '{r}' is not a number (e.g. 0.15)"))?;
        let mut opt = BlendOptions::new(ratio, a.check_layer)?;
        if a.by_key {
            opt.deviation = Deviation::Key;
        }
        if a.widen.is_nan() || a.widen < 1.0 {
            bail!(
                "--widen {} must be at least 1 (the first check keeps that many times the ratio)",
                a.widen
            );
        }
        let first = (ratio * a.widen).min(1.0);
        if first > ratio || a.taper > 0 {
            opt = opt.gradual(first.max(ratio), a.taper)?;
        }
        let pct = (ratio as f64 * 1000.0).round() / 10.0;
        modes.push((format!("blend@{pct}%"), Reuse::Blend(opt)));
    }
    let l = a.model.load()?;
    if l.model.config().n_layers <= a.check_layer {
        bail!(
            "--check-layer {} is past the model's {} layers",
            a.check_layer,
            l.model.config().n_layers
        );
    }
    let chat = l
        .chat_template
        .as_ref()
        .ok()
        .filter(|t| t.builtin().is_none());
    let p = BlendQaParams {
        docs: a.docs,
        doc_words: a.doc_words,
        samples: a.samples,
        max_new: a.max_new,
        seed: a.seed,
        chunk_base: if a.from_zero {
            ChunkBase::Zero
        } else if a.after_bos {
            ChunkBase::Bos
        } else {
            ChunkBase::Head
        },
    };
    let mut cfg = l.session_cfg.clone();
    cfg.kv = crate::methods::KvSpec::full();
    let sums = blendqa::run(
        &l.model,
        &l.tokenizer,
        chat,
        &cfg,
        &p,
        &modes,
        |i, m, ok, ms| {
            eprintln!(
                "case {i} {m:<16} {} {ms:8.1} ms",
                if ok { "ok  " } else { "miss" }
            );
        },
    )?;
    let full = sums[0].ttft_ms.max(1e-9);
    let full_acc = sums[0].accuracy;
    println!(
        "{} passages × {} words cached {}, {} questions, {}, check layer {}{}",
        a.docs,
        a.doc_words,
        match p.chunk_base {
            ChunkBase::Zero => "from position 0",
            ChunkBase::Bos => "after one BOS",
            ChunkBase::Head => "after the shared head",
        },
        a.samples,
        l.model.config().name,
        a.check_layer,
        if a.taper > 0 {
            format!(", gradual ×{} over {} more layers", a.widen, a.taper)
        } else {
            String::new()
        }
    );
    println!(
        "{:<16} {:>9} {:>12} {:>11} {:>11} {:>11}",
        "mode", "accuracy", "of full acc", "TTFT ms", "of full", "rows/layer"
    );
    for s in &sums {
        let rel_acc = if full_acc > 0.0 {
            format!("{:.0} %", 100.0 * s.accuracy / full_acc)
        } else {
            "-".to_string()
        };
        println!(
            "{:<16} {:>8.0}% {:>12} {:>11.1} {:>10.0}% {:>11}",
            s.mode,
            100.0 * s.accuracy,
            rel_acc,
            s.ttft_ms,
            100.0 * s.ttft_ms / full,
            s.recomputed
                .map_or("-".to_string(), |r| format!("{:.1} %", 100.0 * r))
        );
    }
    if let Some(p) = &a.json {
        crate::util::write_atomic(p, (serde_json::to_string_pretty(&sums)? + "\n").as_bytes())?;
    }
    Ok(())
}
