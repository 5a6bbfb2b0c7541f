//! Llama-family forward pass (SmolLM2, Llama 2/3, Mistral-style GQA models) as llama.cpp's GGUF lays it out.
//!
//! Per layer: x += Wo · attention(RoPE(Wq·n(x)), RoPE(Wk·n(x)), Wv·n(x)); x += Wdown · (silu(Wgate·n(x)) ⊙ Wup·n(x)),
//! with n = RMSNorm. Keys and values go to the KV cache before attention reads them.

use std::ops::Range;

use anyhow::{bail, Result};

use super::{
    apply_rope, load_matrix, load_vector, mask_heads, meta_usize, rmsnorm, rope_tables, silu,
    warn_past_context, Arch, ModelConfig, RopeStyle, Scratch,
};
use crate::attention::{attend, AttnParams};
use crate::gguf::GgufFile;
use crate::kernels::{matmul, QMatrix};
use crate::kv::KvCache;

pub struct LlamaLayer {
    pub attn_norm: Vec<f32>, // dim
    pub wq: QMatrix,         // n_heads·hd × dim
    pub wk: QMatrix,         // n_kv·hd × dim
    pub wv: QMatrix,         // n_kv·hd × dim
    pub wo: QMatrix,         // dim × n_heads·hd
    pub ffn_norm: Vec<f32>,  // dim
    pub w_gate: QMatrix,     // ffn × dim
    pub w_up: QMatrix,       // ffn × dim
    pub w_down: QMatrix,     // dim × ffn
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub tok_embd: QMatrix, // vocab × dim
    pub layers: Vec<LlamaLayer>,
    pub out_norm: Vec<f32>, // dim
    /// vocab × dim; None when the output shares the token embedding.
    pub output: Option<QMatrix>,
}

impl Llama {
    pub fn load(g: &GgufFile) -> Result<Self> {
        let a = "llama";
        let n_layers = super::layer_count(g, a)?;
        let dim = meta_usize(g, a, "embedding_length")?;
        let n_heads = meta_usize(g, a, "attention.head_count")?;
        let n_kv_heads = g
            .opt_u64("llama.attention.head_count_kv")
            .map_or(n_heads, |v| v as usize);
        if n_heads == 0 || n_kv_heads == 0 || dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
            bail!(
                "{}: inconsistent head counts: dim {dim}, {n_heads} heads, {n_kv_heads} KV heads",
                g.path.display()
            );
        }
        let hd = dim / n_heads;
        let ffn_dim = meta_usize(g, a, "feed_forward_length")?;
        let emb = super::tensor(g, "token_embd.weight")?;
        let vocab = emb.dims.get(1).copied().unwrap_or(0) as usize;
        let rope_dim = g
            .opt_u64("llama.rope.dimension_count")
            .map_or(hd, |v| v as usize);
        let cfg = ModelConfig {
            arch: Arch::Llama,
            name: g.opt_str("general.name").unwrap_or("llama").to_string(),
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim_k: hd,
            head_dim_v: hd,
            ffn_dim,
            vocab,
            ctx_len: meta_usize(g, a, "context_length")?,
            rms_eps: g.req_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            rope_style: RopeStyle::Norm,
            rope_dim,
            rope_base: g.opt_f64("llama.rope.freq_base").unwrap_or(10000.0) as f32,
            rope_base_local: 0.0,
            sliding_window: None,
            layer_is_local: vec![false; n_layers],
            attn_scale: 1.0 / (hd as f32).sqrt(),
            embed_scale: 1.0,
        };
        let kvd = n_kv_heads * hd;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LlamaLayer {
                attn_norm: load_vector(g, &n("attn_norm"), dim)?,
                wq: load_matrix(g, &n("attn_q"), n_heads * hd, dim)?,
                wk: load_matrix(g, &n("attn_k"), kvd, dim)?,
                wv: load_matrix(g, &n("attn_v"), kvd, dim)?,
                wo: load_matrix(g, &n("attn_output"), dim, n_heads * hd)?,
                ffn_norm: load_vector(g, &n("ffn_norm"), dim)?,
                w_gate: load_matrix(g, &n("ffn_gate"), ffn_dim, dim)?,
                w_up: load_matrix(g, &n("ffn_up"), ffn_dim, dim)?,
                w_down: load_matrix(g, &n("ffn_down"), dim, ffn_dim)?,
            });
        }
        let output = match g.tensor_info("output.weight") {
            Some(_) => Some(load_matrix(g, "output.weight", vocab, dim)?),
            None => None,
        };
        Ok(Self {
            tok_embd: load_matrix(g, "token_embd.weight", vocab, dim)?,
            out_norm: load_vector(g, "output_norm.weight", dim)?,
            output,
            layers,
            cfg,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.n_bytes())
                    .sum::<usize>()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        l + self.tok_embd.n_bytes()
            + self.output.as_ref().map_or(0, |m| m.n_bytes())
            + 4 * self.out_norm.len()
    }

    pub fn forward(&self, tokens: &[u32], pos: &[u32], cache: &mut KvCache, s: &mut Scratch) {
        let c = &self.cfg;
        let n = tokens.len();
        assert!(
            n <= s.cap,
            "chunk of {n} tokens exceeds scratch capacity {}",
            s.cap
        );
        warn_past_context(pos, c.ctx_len);
        let (dim, hd, nh, nkv) = (c.dim, c.head_dim_k, c.n_heads, c.n_kv_heads);
        let half = c.rope_dim / 2;

        // x: n × dim ← token embeddings
        for (t, &tok) in tokens.iter().enumerate() {
            self.tok_embd
                .dequantize_row(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
        }
        rope_tables(
            pos,
            c.rope_dim,
            c.rope_base,
            1.0,
            &mut s.rope_cos[..n * half],
            &mut s.rope_sin[..n * half],
        );
        let params = AttnParams {
            n_q_heads: nh,
            scale: c.attn_scale,
            window: None,
            softcap: None,
        };

        for (li, l) in self.layers.iter().enumerate() {
            // Attention block.
            rmsnorm(
                &mut s.xb[..n * dim],
                &s.x[..n * dim],
                &l.attn_norm,
                c.rms_eps,
            );
            let xb = &s.xb[..n * dim];
            matmul(&l.wq, xb, n, &mut s.q[..n * nh * hd], &mut s.mm); // q: n × nh·hd
            matmul(&l.wk, xb, n, &mut s.k[..n * nkv * hd], &mut s.mm); // k: n × nkv·hd
            matmul(&l.wv, xb, n, &mut s.v[..n * nkv * hd], &mut s.mm); // v: n × nkv·hd
            let (cos, sin) = (&s.rope_cos[..n * half], &s.rope_sin[..n * half]);
            apply_rope(
                &mut s.q[..n * nh * hd],
                nh,
                hd,
                c.rope_style,
                cos,
                sin,
                c.rope_dim,
            );
            apply_rope(
                &mut s.k[..n * nkv * hd],
                nkv,
                hd,
                c.rope_style,
                cos,
                sin,
                c.rope_dim,
            );
            s.obs.record(li, &s.q[..n * nh * hd], pos);
            cache.append(li, pos, &s.k[..n * nkv * hd], &s.v[..n * nkv * hd]);
            attend(
                cache,
                li,
                &s.q[..n * nh * hd],
                pos,
                &mut s.att[..n * nh * hd],
                &params,
                &mut s.attn,
            );
            mask_heads(&mut s.att[..n * nh * hd], nh, hd, &s.head_mask, li);
            matmul(
                &l.wo,
                &s.att[..n * nh * hd],
                n,
                &mut s.xo[..n * dim],
                &mut s.mm,
            );
            add_inplace(&mut s.x[..n * dim], &s.xo[..n * dim]);

            // Feed-forward block.
            rmsnorm(
                &mut s.xb[..n * dim],
                &s.x[..n * dim],
                &l.ffn_norm,
                c.rms_eps,
            );
            let f = c.ffn_dim;
            matmul(
                &l.w_gate,
                &s.xb[..n * dim],
                n,
                &mut s.hb[..n * f],
                &mut s.mm,
            ); // hb: n × ffn
            matmul(&l.w_up, &s.xb[..n * dim], n, &mut s.hb2[..n * f], &mut s.mm); // hb2: n × ffn
            for (g, u) in s.hb[..n * f].iter_mut().zip(&s.hb2[..n * f]) {
                *g = silu(*g) * u;
            }
            matmul(
                &l.w_down,
                &s.hb[..n * f],
                n,
                &mut s.xo[..n * dim],
                &mut s.mm,
            );
            add_inplace(&mut s.x[..n * dim], &s.xo[..n * dim]);
        }
    }

    /// Logits of rows `rows` of the last chunk (its residual stream is still in `s.x`) into `s.logits`.
    pub fn logits(&self, s: &mut Scratch, rows: Range<usize>) {
        let c = &self.cfg;
        super::output_logits(
            &self.out_norm,
            self.output.as_ref().unwrap_or(&self.tok_embd),
            c.rms_eps,
            c.dim,
            c.vocab,
            s,
            rows,
        );
    }
}

pub(crate) fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
