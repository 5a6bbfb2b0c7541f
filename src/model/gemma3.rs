//! Gemma 3 forward pass (text part), as llama.cpp's GGUF lays it out.
//!
//! Differences from Llama: embeddings scaled by sqrt(dim); RMSNorm on each query and key head (QK-norm) before RoPE;
//! NeoX-style RoPE with base 1e6 on global layers and 1e4 on local ones; local layers see a sliding window (5 of every 6
//! layers; every 6th is global); norms after the attention and feed-forward blocks as well as before; GeGLU (tanh GELU)
//! feed-forward. The converter already folded Gemma's (1 + w) into the norm weights.

use std::ops::Range;

use anyhow::{bail, Result};

use super::llama::add_inplace;
use super::{
    apply_rope, gelu_tanh, load_matrix, load_vector, mask_heads, meta_usize, rmsnorm,
    rmsnorm_inplace, rope_tables, warn_past_context, Arch, ModelConfig, RopeStyle, Scratch,
};
use crate::attention::{attend, AttnParams};
use crate::gguf::GgufFile;
use crate::kernels::{matmul, QMatrix};
use crate::kv::KvCache;

pub struct Gemma3Layer {
    pub attn_norm: Vec<f32>,      // dim
    pub wq: QMatrix,              // n_heads·hd × dim
    pub wk: QMatrix,              // n_kv·hd × dim
    pub wv: QMatrix,              // n_kv·hd × dim
    pub q_norm: Vec<f32>,         // hd
    pub k_norm: Vec<f32>,         // hd
    pub wo: QMatrix,              // dim × n_heads·hd
    pub post_attn_norm: Vec<f32>, // dim
    pub ffn_norm: Vec<f32>,       // dim
    pub w_gate: QMatrix,          // ffn × dim
    pub w_up: QMatrix,            // ffn × dim
    pub w_down: QMatrix,          // dim × ffn
    pub post_ffn_norm: Vec<f32>,  // dim
}

pub struct Gemma3 {
    pub cfg: ModelConfig,
    pub tok_embd: QMatrix, // vocab × dim (also the output matrix)
    pub layers: Vec<Gemma3Layer>,
    pub out_norm: Vec<f32>,
    /// Linear RoPE scaling of global layers (1 = none).
    pub rope_scale_global: f32,
}

/// Every `SWA_PATTERN`-th layer is global; the others use the sliding window (llama.cpp's Gemma 3 default).
const SWA_PATTERN: usize = 6;
/// RoPE base of the local layers (not stored in the GGUF; fixed by the architecture).
const ROPE_BASE_LOCAL: f32 = 10_000.0;

impl Gemma3 {
    pub fn load(g: &GgufFile) -> Result<Self> {
        let a = "gemma3";
        let n_layers = super::layer_count(g, a)?;
        let dim = meta_usize(g, a, "embedding_length")?;
        let n_heads = meta_usize(g, a, "attention.head_count")?;
        let n_kv_heads = g
            .opt_u64("gemma3.attention.head_count_kv")
            .map_or(n_heads, |v| v as usize);
        let hd = g
            .opt_u64("gemma3.attention.key_length")
            .map_or(dim / n_heads.max(1), |v| v as usize);
        let hd_v = g
            .opt_u64("gemma3.attention.value_length")
            .map_or(hd, |v| v as usize);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || hd != hd_v {
            bail!("{}: unsupported head layout: {n_heads} heads, {n_kv_heads} KV heads, key {hd}, value {hd_v}", g.path.display());
        }
        let ffn_dim = meta_usize(g, a, "feed_forward_length")?;
        let vocab = super::tensor(g, "token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        let pattern = g
            .opt_u64("gemma3.attention.sliding_window_pattern")
            .map_or(SWA_PATTERN, |v| v as usize)
            .max(1);
        let window = g
            .opt_u64("gemma3.attention.sliding_window")
            .map(|w| w as u32);
        let layer_is_local = (0..n_layers)
            .map(|i| window.is_some() && i % pattern < pattern - 1)
            .collect();
        let cfg = ModelConfig {
            arch: Arch::Gemma3,
            name: g.opt_str("general.name").unwrap_or("gemma3").to_string(),
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim_k: hd,
            head_dim_v: hd,
            ffn_dim,
            vocab,
            ctx_len: meta_usize(g, a, "context_length")?,
            rms_eps: g.req_f64("gemma3.attention.layer_norm_rms_epsilon")? as f32,
            rope_style: RopeStyle::Neox,
            rope_dim: hd,
            rope_base: g.opt_f64("gemma3.rope.freq_base").unwrap_or(1_000_000.0) as f32,
            rope_base_local: ROPE_BASE_LOCAL,
            sliding_window: window,
            layer_is_local,
            attn_scale: 1.0 / (hd as f32).sqrt(),
            embed_scale: (dim as f32).sqrt(),
        };
        let rope_scale_global = match g.opt_str("gemma3.rope.scaling.type") {
            Some("linear") => g.opt_f64("gemma3.rope.scaling.factor").unwrap_or(1.0) as f32,
            _ => 1.0,
        };
        let kvd = n_kv_heads * hd;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Gemma3Layer {
                attn_norm: load_vector(g, &n("attn_norm"), dim)?,
                wq: load_matrix(g, &n("attn_q"), n_heads * hd, dim)?,
                wk: load_matrix(g, &n("attn_k"), kvd, dim)?,
                wv: load_matrix(g, &n("attn_v"), kvd, dim)?,
                q_norm: load_vector(g, &n("attn_q_norm"), hd)?,
                k_norm: load_vector(g, &n("attn_k_norm"), hd)?,
                wo: load_matrix(g, &n("attn_output"), dim, n_heads * hd)?,
                post_attn_norm: load_vector(g, &n("post_attention_norm"), dim)?,
                ffn_norm: load_vector(g, &n("ffn_norm"), dim)?,
                w_gate: load_matrix(g, &n("ffn_gate"), ffn_dim, dim)?,
                w_up: load_matrix(g, &n("ffn_up"), ffn_dim, dim)?,
                w_down: load_matrix(g, &n("ffn_down"), dim, ffn_dim)?,
                post_ffn_norm: load_vector(g, &n("post_ffw_norm"), dim)?,
            });
        }
        Ok(Self {
            tok_embd: load_matrix(g, "token_embd.weight", vocab, dim)?,
            out_norm: load_vector(g, "output_norm.weight", dim)?,
            layers,
            cfg,
            rope_scale_global,
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
            })
            .sum();
        l + self.tok_embd.n_bytes()
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
        let (dim, hd, nh, nkv, f) = (c.dim, c.head_dim_k, c.n_heads, c.n_kv_heads, c.ffn_dim);
        let half = c.rope_dim / 2;

        // x: n × dim ← token embeddings · sqrt(dim)
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &mut s.x[t * dim..(t + 1) * dim];
            self.tok_embd.dequantize_row(tok as usize, row);
            row.iter_mut().for_each(|v| *v *= c.embed_scale);
        }
        // Two RoPE tables: global layers (base 1e6, optionally linearly scaled) and local layers (base 1e4).
        let (cos, sin) = (&mut s.rope_cos[..n * half], &mut s.rope_sin[..n * half]);
        rope_tables(
            pos,
            c.rope_dim,
            c.rope_base,
            1.0 / self.rope_scale_global,
            cos,
            sin,
        );
        let (cos, sin) = (
            &mut s.rope_cos_local[..n * half],
            &mut s.rope_sin_local[..n * half],
        );
        rope_tables(pos, c.rope_dim, c.rope_base_local, 1.0, cos, sin);

        for (li, l) in self.layers.iter().enumerate() {
            let local = c.layer_is_local[li];
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
            rmsnorm_inplace(&mut s.q[..n * nh * hd], &l.q_norm, c.rms_eps);
            rmsnorm_inplace(&mut s.k[..n * nkv * hd], &l.k_norm, c.rms_eps);
            let (cos, sin) = if local {
                (&s.rope_cos_local[..n * half], &s.rope_sin_local[..n * half])
            } else {
                (&s.rope_cos[..n * half], &s.rope_sin[..n * half])
            };
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
            let params = AttnParams {
                n_q_heads: nh,
                scale: c.attn_scale,
                window: if local { c.sliding_window } else { None },
                softcap: None,
            };
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
            rmsnorm_inplace(&mut s.xo[..n * dim], &l.post_attn_norm, c.rms_eps);
            add_inplace(&mut s.x[..n * dim], &s.xo[..n * dim]);

            // Feed-forward block (GeGLU).
            rmsnorm(
                &mut s.xb[..n * dim],
                &s.x[..n * dim],
                &l.ffn_norm,
                c.rms_eps,
            );
            matmul(
                &l.w_gate,
                &s.xb[..n * dim],
                n,
                &mut s.hb[..n * f],
                &mut s.mm,
            ); // hb: n × ffn
            matmul(&l.w_up, &s.xb[..n * dim], n, &mut s.hb2[..n * f], &mut s.mm); // hb2: n × ffn
            for (g, u) in s.hb[..n * f].iter_mut().zip(&s.hb2[..n * f]) {
                *g = gelu_tanh(*g) * u;
            }
            matmul(
                &l.w_down,
                &s.hb[..n * f],
                n,
                &mut s.xo[..n * dim],
                &mut s.mm,
            );
            rmsnorm_inplace(&mut s.xo[..n * dim], &l.post_ffn_norm, c.rms_eps);
            add_inplace(&mut s.x[..n * dim], &s.xo[..n * dim]);
        }
    }

    /// Logits of rows `rows` of the last chunk (its residual stream is still in `s.x`) into `s.logits`.
    pub fn logits(&self, s: &mut Scratch, rows: Range<usize>) {
        let c = &self.cfg;
        super::output_logits(
            &self.out_norm,
            &self.tok_embd,
            c.rms_eps,
            c.dim,
            c.vocab,
            s,
            rows,
        );
    }
}
