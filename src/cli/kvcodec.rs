//! `hayloft bench codec`: the KV codec on a real cache: its size against f16, KIVI-8 and KIVI-4, its speed, and the
//! perplexity of a continuation scored over the decoded cache against the original one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::ModelArgs;
use crate::engine::{Lengths, Session};
use crate::kv::codec::{self, CodecConfig, KvRows, LayerBins, Scale};
use crate::kv::{KvConfig, KvDtype};

#[derive(Args, Debug)]
pub struct CodecArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to take the context from (default: the Paul Graham essays, fetched on first use).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Tokens of context whose cache is encoded.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Tokens scored after the context (perplexity over the original and the decoded cache).
    #[arg(long, default_value_t = 256)]
    pub score: usize,
    /// Tokens per codec chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// What one key scale covers: token (CacheGen's), channel or matrix. Default: the codec's own.
    #[arg(long)]
    pub key_scale: Option<Scale>,
    /// What one value scale covers: token, channel or matrix. Default: the codec's own.
    #[arg(long)]
    pub value_scale: Option<Scale>,
    /// Key bins as SPLIT:EARLY:LATE: layers below SPLIT get EARLY bins; SPLIT a layer or a share of the layers
    /// (`2/3:32:64`). Default: the codec's own.
    #[arg(long)]
    pub key_bins: Option<LayerBins>,
    /// Value bins as SPLIT:EARLY:LATE. Default: the codec's own.
    #[arg(long)]
    pub value_bins: Option<LayerBins>,
    /// Write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Mean negative log-likelihood of `toks[1..]` fed after the session's cache, starting with `toks[0]`.
fn score(s: &mut Session, toks: &[u32]) -> Result<f64> {
    let n = toks.len() - 1;
    let mut nll = 0f64;
    s.feed(&toks[..n], 0..n, |i, logits| {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - logits[toks[i + 1] as usize] as f64;
    })?;
    Ok(nll / n as f64)
}

/// Bytes of `tokens` entries of every stream in KIVI blocks of `bits` (codes and scales; no positions).
fn kivi_bytes(r: &KvRows, bits: u8) -> usize {
    let kc = KvConfig {
        n_layers: r.n_layers,
        n_kv_heads: r.n_heads,
        head_dim_k: r.hk,
        head_dim_v: r.hv,
        block_tokens: 32,
        dtype: KvDtype::Kivi { bits, residual: 0 },
        windows: Vec::new(),
    };
    let per_block = kc.quant_block_bytes(r.hk) - 4 * 32;
    per_block * r.tokens.div_ceil(32) * r.n_layers * r.n_heads
}

pub fn run(a: CodecArgs) -> Result<()> {
    if a.context < 2 || a.score < 2 {
        bail!("--context and --score must be at least 2");
    }
    let cfg = CodecConfig {
        chunk_tokens: a.chunk_tokens,
        key_scale: a.key_scale.unwrap_or(CodecConfig::default().key_scale),
        value_scale: a.value_scale.unwrap_or(CodecConfig::default().value_scale),
        key_bins: a.key_bins.unwrap_or(CodecConfig::default().key_bins),
        value_bins: a.value_bins.unwrap_or(CodecConfig::default().value_bins),
    };
    let path = match &a.file {
        Some(p) => p.clone(),
        None => crate::eval::haystack::ensure_essays()?,
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let l = a.model.load()?;
    let toks = l.tokenizer.encode(&text, false, false)?;
    let need = a.context + a.score;
    if toks.len() < need {
        bail!(
            "{} holds {} tokens, fewer than --context + --score = {need}",
            path.display(),
            toks.len()
        );
    }
    let toks = &toks[..need];
    let mut cfg_s = l.session_cfg.clone();
    cfg_s.max_context = cfg_s.max_context.max(need);
    // The cache of the first context − 1 tokens is encoded; scoring feeds the last context token on.
    let ctx = a.context - 1;
    let mut orig = Session::new(&l.model, cfg_s.clone())?;
    orig.check_memory(Lengths::generate(need, 0))?;
    eprintln!("[codec] prefilling {ctx} tokens ...");
    orig.feed(&toks[..ctx], ctx - 1..ctx, |_, _| {})?;
    let rows = KvRows::from_cache(&orig.cache, 0, ctx)?;
    let t0 = Instant::now();
    let blob = codec::encode(&rows, &cfg)?;
    let enc_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let dec = codec::decode(&blob)?;
    let dec_s = t0.elapsed().as_secs_f64();
    let mut restored = Session::new(&l.model, cfg_s)?;
    dec.append_to(&mut restored.cache)?;
    restored.tokens = toks[..ctx].to_vec();
    eprintln!("[codec] scoring {} tokens over both caches ...", a.score);
    let nll_orig = score(&mut orig, &toks[ctx..])?;
    let nll_dec = score(&mut restored, &toks[ctx..])?;
    let (ppl_orig, ppl_dec) = (nll_orig.exp(), nll_dec.exp());
    let f16 = rows.f16_bytes();
    let sizes = [
        ("f16", f16),
        ("kivi-8", kivi_bytes(&rows, 8)),
        ("kivi-4", kivi_bytes(&rows, 4)),
        ("codec", blob.len()),
    ];
    println!(
        "KV codec on {} tokens × {} layers × {} KV heads ({}), chunks of {}, keys {} {}, values {} {} (scale, bins)",
        ctx,
        rows.n_layers,
        rows.n_heads,
        orig.cache.cfg.dtype.label(),
        cfg.chunk_tokens,
        cfg.key_scale,
        cfg.key_bins,
        cfg.value_scale,
        cfg.value_bins
    );
    println!(
        "{:<8} {:>12} {:>10} {:>8}",
        "format", "bytes", "bits/elt", "vs f16"
    );
    let elts = (rows.k.len() + rows.v.len()) as f64;
    for (name, b) in sizes {
        println!(
            "{name:<8} {b:>12} {:>10.2} {:>7.2}×",
            8.0 * b as f64 / elts,
            f16 as f64 / b as f64
        );
    }
    let delta = (ppl_dec / ppl_orig - 1.0) * 100.0;
    println!(
        "perplexity of the next {} tokens: {ppl_orig:.4} over the f16 cache, {ppl_dec:.4} over the decoded cache \
         ({delta:+.2} %)",
        a.score - 1
    );
    println!(
        "encode {:.0} ms ({:.0} MB/s of f16), decode {:.0} ms",
        enc_s * 1e3,
        f16 as f64 / enc_s / 1e6,
        dec_s * 1e3
    );
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "tokens": ctx, "chunk_tokens": cfg.chunk_tokens, "key_scale": cfg.key_scale.to_string(), "value_scale": cfg.value_scale.to_string(),
            "key_bins": cfg.key_bins.to_string(), "value_bins": cfg.value_bins.to_string(),
            "bytes": sizes.iter().map(|(n, b)| (n.to_string(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
            "ratio_vs_f16": f16 as f64 / blob.len() as f64,
            "ppl_f16": ppl_orig, "ppl_decoded": ppl_dec, "ppl_delta_pct": delta,
            "encode_s": enc_s, "decode_s": dec_s,
        });
        crate::util::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}
