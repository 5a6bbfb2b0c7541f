//! What a forward pass costs, from the model's shapes alone: operations (a multiply-add counts 2) of the weight
//! matmuls and of attention, per prompt and per decoded token. The roofline of `hayloft bench speed` and the cost
//! model divide these by the machine's measured roofs.
//!
//! Attention counts the work a query must do over the keys it can see: all earlier positions on global layers, at most
//! `window` on sliding-window layers; the masked half of a causal prefill is not counted (it is not useful work).
//! Norms, RoPE, activations and the softmax's exponentials are left out of the operation counts: a few operations per
//! element, well under 1 % of the matmuls at these shapes. Their time is not negligible (they stream activations and
//! do not vectorize as well), so [`glue_elements`] counts the elements they pass for the cost model to price.

use super::ModelConfig;

/// Operations split by the roof that bounds them: weight matmuls run on the int8 path (activations quantized), the
/// attention's q·k and p·v sums on the f32 path.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ops {
    pub matmul: f64,
    pub attention: f64,
}

impl Ops {
    pub fn total(&self) -> f64 {
        self.matmul + self.attention
    }
}

/// Weight elements one token multiplies in every layer's matmuls (Q, K, V, O projections and the gated feed-forward).
pub fn layer_params(c: &ModelConfig) -> f64 {
    let (d, hq, hkv) = (c.dim as f64, c.n_heads as f64, c.n_kv_heads as f64);
    let (hk, hv) = (c.head_dim_k as f64, c.head_dim_v as f64);
    let attn = d * hq * hk + d * hkv * (hk + hv) + hq * hv * d;
    // A MoE layer multiplies its router and k experts per token; its model's dense layers (ERNIE 4.5's first) their
    // own width.
    let ffn = match c.moe {
        Some(m) => {
            let lead = m.dense_lead.min(c.n_layers) as f64;
            (c.n_layers as f64 - lead)
                * (3.0 * d * (c.ffn_dim * m.n_used + m.shared_ff) as f64
                    + d * (m.n_expert + (m.shared_ff > 0) as usize) as f64)
                + lead * 3.0 * d * m.dense_ff as f64
        }
        None => c.n_layers as f64 * 3.0 * d * c.ffn_dim as f64,
    };
    c.n_layers as f64 * attn + ffn
}

/// Weight elements of the output head (vocab × dim), multiplied once per token whose logits are computed.
pub fn head_params(c: &ModelConfig) -> f64 {
    c.vocab as f64 * c.dim as f64
}

/// Keys layer `l` lets the query at 0-based position `p` see.
fn visible(c: &ModelConfig, layer: usize, p: u64) -> u64 {
    match (c.sliding_window, c.layer_is_local.get(layer).copied()) {
        (Some(w), Some(true)) => (p + 1).min(w as u64),
        _ => p + 1,
    }
}

/// Σ over query positions p in [from, to) of the keys each sees on `layer` (closed form).
fn visible_sum(c: &ModelConfig, layer: usize, from: u64, to: u64) -> f64 {
    let tri = |n: u64| n as f64 * (n as f64 + 1.0) / 2.0; // Σ_{p<n} (p+1)
    let full = |a: u64, b: u64| tri(b) - tri(a);
    match (c.sliding_window, c.layer_is_local.get(layer).copied()) {
        (Some(w), Some(true)) => {
            let w = w as u64;
            let split = to.min(w).max(from); // positions below w see p+1 keys, the rest see w
            full(from, split) + (to - split) as f64 * w as f64
        }
        _ => full(from, to),
    }
}

/// Operations of attention for one query over the keys it sees, per key: q·k over head_dim_k, p·v over head_dim_v,
/// for every query head.
fn attn_per_key(c: &ModelConfig) -> f64 {
    2.0 * c.n_heads as f64 * (c.head_dim_k + c.head_dim_v) as f64
}

/// Elements one token passes through in one layer's work besides matmuls and attention (what the machine profile's
/// per-element glue rates price).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GlueElements {
    /// RMSNorm + residual add: the block norms over `dim` (Gemma 3 adds post-norms and per-head Q/K norms).
    pub norm: f64,
    /// The gated activation over the feed-forward width.
    pub gate: f64,
    /// RoPE over the query and key heads.
    pub rope: f64,
    /// New keys and values written to the cache.
    pub append: f64,
}

/// [`GlueElements`] of one layer of `c`, per token.
pub fn glue_elements(c: &ModelConfig) -> GlueElements {
    let (d, hq, hkv) = (c.dim as f64, c.n_heads as f64, c.n_kv_heads as f64);
    let (hk, hv) = (c.head_dim_k as f64, c.head_dim_v as f64);
    let norm = match c.arch {
        super::Arch::Gemma3 => 4.0 * d + (hq + hkv) * hk,
        super::Arch::Gemma2 => 4.0 * d,
        super::Arch::Gemma => 2.0 * d,
        // Qwen2's Q/K/V biases cost about what a norm pass over those rows does.
        super::Arch::Qwen2 | super::Arch::Qwen2Moe => 2.0 * d + hq * hk + hkv * (hk + hv),
        super::Arch::Qwen3 | super::Arch::Qwen3Moe => 2.0 * d + (hq + hkv) * hk,
        // OLMo 2: the two output norms, and QK-norm over the whole query and key rows.
        super::Arch::Olmo2 | super::Arch::Olmoe => 2.0 * d + (hq + hkv) * hk,
        super::Arch::Llama
        | super::Arch::SmolLM3
        | super::Arch::Granite
        | super::Arch::GraniteMoe
        | super::Arch::Phi3
        | super::Arch::Exaone
        | super::Arch::Ernie45
        | super::Arch::Ernie45Moe
        | super::Arch::Mistral3 => 2.0 * d,
    };
    GlueElements {
        norm,
        // Per layer, on average over a MoE model's dense and expert layers.
        gate: c.moe.map_or(c.ffn_dim as f64, |m| {
            let (l, lead) = (c.n_layers.max(1), m.dense_lead.min(c.n_layers));
            ((l - lead) * (c.ffn_dim * m.n_used + m.shared_ff) + lead * m.dense_ff) as f64
                / l as f64
        }),
        rope: (hq + hkv) * hk,
        append: hkv * (hk + hv),
    }
}

/// Operations of reading a prompt of `n` tokens into an empty cache, logits for the last token only (as prefill does).
pub fn prefill_ops(c: &ModelConfig, n: usize) -> Ops {
    let keys: f64 = (0..c.n_layers)
        .map(|l| visible_sum(c, l, 0, n as u64))
        .sum();
    Ops {
        matmul: 2.0 * (layer_params(c) * n as f64 + head_params(c)),
        attention: attn_per_key(c) * keys,
    }
}

/// Attention operations of a prefill of `n` tokens in chunks of `chunk`, split into (keys inside each query's own
/// chunk, keys before it): the kernel runs the two at different rates (the first half-masked on the diagonal).
pub fn prefill_attention_split(c: &ModelConfig, n: usize, chunk: usize) -> (f64, f64) {
    let chunk = chunk.max(1) as u64;
    let (mut diag, mut total) = (0.0, 0.0);
    for l in 0..c.n_layers {
        total += visible_sum(c, l, 0, n as u64);
        // Inside a chunk, query p sees min(p − start + 1, visible(p)) of its chunk's keys.
        let mut a = 0u64;
        while a < n as u64 {
            let b = (a + chunk).min(n as u64);
            diag += (a..b)
                .map(|p| (p - a + 1).min(visible(c, l, p)) as f64)
                .sum::<f64>();
            a = b;
        }
    }
    let k = attn_per_key(c);
    (k * diag, k * (total - diag))
}

/// Operations of one decode step with `ctx` tokens already cached (full attention).
pub fn decode_ops(c: &ModelConfig, ctx: usize) -> Ops {
    let keys: u64 = (0..c.n_layers).map(|l| visible(c, l, ctx as u64)).sum();
    Ops {
        matmul: 2.0 * (layer_params(c) + head_params(c)),
        attention: attn_per_key(c) * keys as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, RopeStyle};

    fn cfg(window: Option<u32>) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            name: "t".into(),
            n_layers: 2,
            dim: 8,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim_k: 4,
            head_dim_v: 4,
            ffn_dim: 16,
            vocab: 10,
            ctx_len: 64,
            rms_eps: 1e-6,
            rope_style: RopeStyle::Norm,
            rope_dim: 4,
            rope_base: 1e4,
            rope_base_local: 1e4,
            sliding_window: window,
            layer_is_local: vec![true, false],
            attn_scale: 0.5,
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            residual_scale: 1.0,
            logit_scale: 1.0,
            long_rope: None,
            attn_temp: None,
            moe: None,
        }
    }

    #[test]
    fn prefill_attention_equals_the_sum_of_decode_steps() {
        for w in [None, Some(3), Some(100)] {
            let c = cfg(w);
            for n in [1usize, 2, 3, 4, 7, 20] {
                let step: f64 = (0..n).map(|p| decode_ops(&c, p).attention).sum();
                let pre = prefill_ops(&c, n).attention;
                assert!((pre - step).abs() < 1e-6, "w {w:?} n {n}: {pre} vs {step}");
            }
        }
    }

    /// The chunk split adds up to the whole, puts everything in the triangle when one chunk holds the prompt, and
    /// counts one own key per query with one-token chunks.
    #[test]
    fn the_chunk_split_of_prefill_attention_adds_up() {
        for w in [None, Some(3), Some(100)] {
            let c = cfg(w);
            for (n, chunk) in [(20usize, 4usize), (20, 7), (20, 20), (20, 64), (9, 1)] {
                let (diag, off) = prefill_attention_split(&c, n, chunk);
                let all = prefill_ops(&c, n).attention;
                assert!(
                    (diag + off - all).abs() < 1e-6,
                    "w {w:?} n {n} chunk {chunk}"
                );
                if chunk >= n && w.is_none() {
                    assert_eq!(off, 0.0);
                }
                if chunk == 1 {
                    assert_eq!(diag, attn_per_key(&c) * (n * c.n_layers) as f64);
                }
            }
        }
    }

    #[test]
    fn params_count_every_projection() {
        let c = cfg(None);
        // q 8×8, k 8×4, v 8×4, o 8×8, ffn 3×8×16 = 64+32+32+64+384 per layer.
        assert_eq!(layer_params(&c), 2.0 * 576.0);
        assert_eq!(head_params(&c), 80.0);
        // A window caps what the local layer sees: decode at 10 sees 3 (local) + 11 (global) keys.
        let w = cfg(Some(3));
        assert_eq!(decode_ops(&w, 10).attention, 2.0 * 2.0 * 8.0 * 14.0);
    }
}
