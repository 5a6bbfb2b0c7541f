//! The model half of the validation pass every open goes through (`hayloft info` and every command that runs a model):
//! hyper-parameters in range and consistent with each other and with the file's tensors. The container half
//! (unique, aligned, non-overlapping tensors; metadata types) ran when the file was parsed; the tensor shapes are
//! checked against the config as each weight is loaded ([`super::load_matrix`], [`super::load_vector`]).
//!
//! Each architecture builds its [`ModelConfig`] from the metadata and calls [`ModelConfig::validate`] before loading
//! any weight, so no size computed from the config (RoPE tables, scratch buffers, head products) is used unchecked.

use anyhow::{bail, Result};

use super::ModelConfig;
use crate::gguf::GgufFile;

/// Longest trained context accepted: positions are i32 in llama.cpp (`llama_pos`) and u32 here.
pub const MAX_CONTEXT: usize = i32::MAX as usize;

impl ModelConfig {
    /// Checks the config read from `g` before any weight is loaded. Errors name the file, the metadata key (or
    /// tensor) and what is wrong with it.
    pub fn validate(&self, g: &GgufFile) -> Result<()> {
        let file = g.path.display();
        let arch = g.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let c = self;

        if c.n_layers == 0 {
            bail!("{file}: {} is 0", key("block_count"));
        }
        if c.layer_is_local.len() != c.n_layers {
            bail!(
                "{file}: {} local-layer flags for {} layers",
                c.layer_is_local.len(),
                c.n_layers
            );
        }
        check_layer_tensors(g, c.n_layers, &key("block_count"))?;

        for (what, v) in [
            (key("embedding_length"), c.dim),
            (key("attention.head_count"), c.n_heads),
            (key("attention.head_count_kv"), c.n_kv_heads),
            (key("attention.key_length"), c.head_dim_k),
            (key("attention.value_length"), c.head_dim_v),
            (key("feed_forward_length"), c.ffn_dim),
            (
                "the rows of token_embd.weight (vocabulary)".to_string(),
                c.vocab,
            ),
        ] {
            if v == 0 {
                bail!("{file}: {what} is 0");
            }
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            bail!(
                "{file}: {} = {} does not divide {} = {}",
                key("attention.head_count_kv"),
                c.n_kv_heads,
                key("attention.head_count"),
                c.n_heads
            );
        }
        // Every product of dimensions the forward pass forms fits a usize (the tensors' shapes, checked on load,
        // then bound them by the file's size).
        let heads = [c.n_heads, c.n_kv_heads];
        let head_dims = [c.head_dim_k, c.head_dim_v];
        for (h, d) in heads
            .iter()
            .flat_map(|h| head_dims.iter().map(move |d| (h, d)))
        {
            if h.checked_mul(*d).is_none() {
                bail!("{file}: {h} heads × head dimension {d} overflow");
            }
        }
        if c.vocab.checked_mul(c.dim).is_none() || c.ffn_dim.checked_mul(c.dim).is_none() {
            bail!(
                "{file}: dimensions overflow (vocabulary {}, width {}, feed-forward {})",
                c.vocab,
                c.dim,
                c.ffn_dim
            );
        }

        // RoPE rotates pairs within the first rope_dim dimensions of each key head.
        let rope_key = key("rope.dimension_count");
        if c.rope_dim == 0 || !c.rope_dim.is_multiple_of(2) || c.rope_dim > c.head_dim_k {
            bail!(
                "{file}: {rope_key} is {}, must be even, positive and at most the head dimension {}",
                c.rope_dim,
                c.head_dim_k
            );
        }
        positive_finite(g, &key("rope.freq_base"), c.rope_base as f64)?;
        if c.rope_base_local != 0.0 {
            positive_finite(g, "the local RoPE base", c.rope_base_local as f64)?;
        }
        if let Some(f) = g.get_f64(&key("rope.scaling.factor"))? {
            positive_finite(g, &key("rope.scaling.factor"), f)?;
        }
        positive_finite(
            g,
            &key("attention.layer_norm_rms_epsilon"),
            c.rms_eps as f64,
        )?;
        positive_finite(g, "the attention scale", c.attn_scale as f64)?;
        positive_finite(g, "the embedding scale", c.embed_scale as f64)?;
        positive_finite(g, "the residual scale", c.residual_scale as f64)?;
        positive_finite(g, "the logit scale", c.logit_scale as f64)?;

        if c.ctx_len == 0 || c.ctx_len > MAX_CONTEXT {
            bail!(
                "{file}: {} is {}, must be between 1 and {MAX_CONTEXT}",
                key("context_length"),
                c.ctx_len
            );
        }
        if let Some(w) = c.sliding_window {
            if w == 0 || w as usize > c.ctx_len {
                bail!(
                    "{file}: {} is {w}, must be between 1 and the context length {}",
                    key("attention.sliding_window"),
                    c.ctx_len
                );
            }
        }
        if g.get(&key("attention.sliding_window_pattern"))
            .and_then(|v| v.as_u64())
            == Some(0)
        {
            bail!(
                "{file}: {} is 0, must be at least 1",
                key("attention.sliding_window_pattern")
            );
        }

        // The tokenizer's ids index the embedding: it may not have more tokens than the embedding has rows.
        if let Some(tokens) = g.token_count() {
            if tokens > c.vocab {
                bail!(
                    "{file}: the tokenizer has {tokens} tokens but token_embd.weight has {} rows",
                    c.vocab
                );
            }
        }
        Ok(())
    }
}

fn positive_finite(g: &GgufFile, what: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!(
            "{}: {what} is {v}, must be a positive finite number",
            g.path.display()
        );
    }
    Ok(())
}

/// Every `blk.N.*` tensor belongs to a layer N < `n_layers`, and every layer has tensors.
fn check_layer_tensors(g: &GgufFile, n_layers: usize, count_key: &str) -> Result<()> {
    if n_layers > g.tensors.len() {
        bail!(
            "{}: {count_key} is {n_layers} but the file holds only {} tensors",
            g.path.display(),
            g.tensors.len()
        );
    }
    let mut seen = vec![false; n_layers];
    for t in &g.tensors {
        let Some(rest) = t.name.strip_prefix("blk.") else {
            continue;
        };
        let n = rest.split('.').next().and_then(|s| s.parse::<usize>().ok());
        match n {
            Some(n) if n < n_layers => seen[n] = true,
            _ => bail!(
                "{}: tensor {} is not in a layer 0..{n_layers} ({count_key} is {n_layers})",
                g.path.display(),
                t.name
            ),
        }
    }
    if let Some(i) = seen.iter().position(|&s| !s) {
        bail!(
            "{}: {count_key} is {n_layers} but the file has no tensors for layer {i}",
            g.path.display()
        );
    }
    Ok(())
}
