//! `hayloft info MODEL.gguf`

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;

use crate::engine::stats::human_bytes;
use crate::gguf::GgufFile;
use crate::kv::KvDtype;
use crate::model::rope::RopeScaling;
use crate::model::{Arch, Model};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// GGUF file or known model name.
    pub model: String,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let path = crate::fetch::resolve_model(Some(&a.model))?;
    let g = GgufFile::open(&path)?;
    let model = Model::from_gguf(&g)?; // the validation every command runs, before anything is printed
    println!(
        "file:          {} ({}, GGUF v{})",
        path.display(),
        human_bytes(g.file_len() as usize),
        g.version
    );
    println!("architecture:  {}", g.architecture()?);
    if let Some(n) = g.opt_str("general.name") {
        println!("name:          {n}");
    }
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = types.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let types: Vec<String> = types
        .iter()
        .map(|(k, (n, b))| format!("{k} ×{n} ({})", human_bytes(*b as usize)))
        .collect();
    println!("tensors:       {} — {}", g.tensors.len(), types.join(", "));
    let c = model.config();
    println!("layers:        {}", c.n_layers);
    match c.moe {
        Some(m) => {
            println!("dim / expert:  {} / {}", c.dim, c.ffn_dim);
            println!(
                "experts:       {} per layer, {} per token (weights {}; {} of {} read per token)",
                m.n_expert,
                m.n_used,
                if m.norm_w {
                    "renormalized over the chosen"
                } else {
                    "as routed"
                },
                human_bytes(model.streamed_weight_bytes()),
                human_bytes(model.weight_bytes())
            );
            if m.shared_ff > 0 {
                println!("shared expert: {} wide, every token", m.shared_ff);
            }
            if m.dense_lead > 0 {
                println!(
                    "dense layers:  the first {}, {} wide",
                    m.dense_lead, m.dense_ff
                );
            }
        }
        None => println!("dim / ffn:     {} / {}", c.dim, c.ffn_dim),
    }
    println!(
        "heads:         {} query, {} KV (GQA group {}), head dim {}",
        c.n_heads,
        c.n_kv_heads,
        c.n_heads / c.n_kv_heads,
        c.head_dim_k
    );
    println!("vocab:         {}", c.vocab);
    let scaling = match &model {
        Model::Llama(l) => {
            let s = match l.rope_scaling {
                RopeScaling::None => String::new(),
                RopeScaling::Linear {
                    factor,
                    attn_factor,
                } => {
                    let f = if factor != 1.0 {
                        format!(", linear scaling ×{factor}")
                    } else {
                        String::new()
                    };
                    if attn_factor != 1.0 {
                        format!("{f}, cos/sin ×{attn_factor}")
                    } else {
                        f
                    }
                }
                RopeScaling::Yarn(y) => format!(
                    ", YaRN scaling ×{} (trained at {}, β {}/{})",
                    y.factor, y.orig_ctx, y.beta_fast, y.beta_slow
                ),
            };
            match &l.rope_freq_factors {
                Some(ff) => {
                    let (lo, hi) = ff
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    let what = match c.long_rope {
                        Some(lr) => format!(
                            "LongRoPE {} set: contexts {} {} tokens",
                            if lr.long { "long" } else { "short" },
                            if lr.long { "over" } else { "up to" },
                            lr.orig_ctx
                        ),
                        None => "rope_freqs".to_string(),
                    };
                    format!("{s}, frequency factors {lo}…{hi} ({what})")
                }
                None => s,
            }
        }
        Model::Gemma3(_) => String::new(),
    };
    println!(
        "rope:          {:?}, base {}, dims {}{}{scaling}",
        c.rope_style,
        c.rope_base,
        c.rope_dim,
        if c.rope_base_local > 0.0 {
            format!(", local base {}", c.rope_base_local)
        } else {
            String::new()
        }
    );
    if let Some(t) = c.attn_temp {
        println!(
            "temperature:   queries × (1 + {} · ln(⌊(pos + {}) / {}⌋ + 1)) after RoPE",
            t.scale, t.offset, t.floor
        );
    }
    if matches!(c.arch, Arch::Granite | Arch::GraniteMoe) {
        println!(
            "multipliers:   embeddings ×{}, scores ×{}, residual branches ×{}, logits ÷{}",
            c.embed_scale, c.attn_scale, c.residual_scale, c.logit_scale
        );
    }
    if c.attn_softcap.is_some() || c.final_softcap.is_some() {
        let cap = |v: Option<f32>| v.map_or("none".to_string(), |c| c.to_string());
        println!(
            "soft-caps:     attention {}, final logits {}",
            cap(c.attn_softcap),
            cap(c.final_softcap)
        );
    }
    if let Some(first) = match &model {
        Model::Llama(l) => l.layers.first(),
        Model::Gemma3(_) => None,
    } {
        let biased: Vec<&str> = ["Q", "K", "V"]
            .into_iter()
            .zip(&first.attn.qkv_bias)
            .filter(|(_, b)| b.is_some())
            .map(|(n, _)| n)
            .collect();
        if !biased.is_empty() {
            println!("biases:        {} projections", biased.join("/"));
        }
    }
    if let Some(w) = c.sliding_window {
        let local = c.layer_is_local.iter().filter(|&&x| x).count();
        println!(
            "sliding window: {w} tokens on {local} of {} layers",
            c.n_layers
        );
    }
    println!("max context:   {}", c.ctx_len);
    let bt = crate::engine::DEFAULT_BLOCK_TOKENS;
    let chunk = crate::engine::SessionConfig::for_model(&model).chunk_size;
    let (f16, f32) = (c.kv_config(KvDtype::F16, bt), c.kv_config(KvDtype::F32, bt));
    let windowed = c.n_layers - f16.global_layers();
    println!(
        "KV per token:  {} (f16), {} (f32){}",
        human_bytes(f16.entry_bytes() * f16.global_layers() * c.n_kv_heads),
        human_bytes(f32.entry_bytes() * f32.global_layers() * c.n_kv_heads),
        if windowed > 0 {
            format!(" on the {} global layers", f16.global_layers())
        } else {
            String::new()
        }
    );
    if let Some(w) = (0..c.n_layers).find_map(|l| f16.window(l)) {
        // The most a sliding-window layer holds: its window, one prefill step and the part of a block before them.
        let one = f16.layer_bytes(
            (0..c.n_layers)
                .find(|&l| f16.window(l).is_some())
                .unwrap_or(0),
            c.ctx_len,
            chunk,
        );
        println!(
            "KV windowed:   {windowed} sliding-window layers keep only their {w}-token window: at most {} each, {} in all (f16)",
            human_bytes(one),
            human_bytes(one * windowed)
        );
    }
    println!(
        "KV full ctx:   {} at f16 ({} tokens, {}-token prefill chunks)",
        human_bytes(f16.bytes_at(c.ctx_len, chunk)),
        c.ctx_len,
        chunk
    );
    let kivi = |bits| {
        let dtype = KvDtype::Kivi { bits, residual: 0 };
        c.kv_config(dtype, crate::engine::DEFAULT_BLOCK_TOKENS)
            .bytes_per_token()
    };
    println!(
        "KV quantized:  {} (q8), {} (q4), {} (q2) per token past the f16 residual window (KIVI, 32-token groups)",
        human_bytes(kivi(8)),
        human_bytes(kivi(4)),
        human_bytes(kivi(2))
    );
    println!(
        "weights:       {} in memory",
        human_bytes(model.weight_bytes())
    );
    if let Some(t) = g.opt_str("tokenizer.ggml.model") {
        println!(
            "tokenizer:     {t} (pre: {})",
            g.opt_str("tokenizer.ggml.pre").unwrap_or("-")
        );
    }
    println!("kernel:        {}", crate::kernels::kernel_name());
    Ok(())
}
