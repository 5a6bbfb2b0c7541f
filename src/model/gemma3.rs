//! Gemma 3 forward pass (text part), as llama.cpp's GGUF lays it out; Gemma 2 runs the same blocks.
//!
//! Differences from Llama: embeddings scaled by sqrt(dim); RMSNorm on each query and key head (QK-norm) before RoPE;
//! NeoX-style RoPE with base 1e6 on global layers and 1e4 on local ones; local layers see a sliding window (5 of every 6
//! layers; every 6th is global); norms after the attention and feed-forward blocks as well as before; GeGLU (tanh GELU)
//! feed-forward. The converter already folded Gemma's (1 + w) into the norm weights.
//!
//! Gemma 2 (`general.architecture = "gemma2"`): no QK-norm; one RoPE base (`rope.freq_base_swa` may set the local
//! one); every other layer local (even layers, window 4096 unless the file says); attention scores soft-capped,
//! s ← 50 · tanh(s / 50), and the final logits too, l ← 30 · tanh(l / 30) (`attn_logit_softcapping`,
//! `final_logit_softcapping`); scores scaled by 1/√head_dim, or 1/√(dim / heads) for the 46-layer 27B model, as
//! llama.cpp does. A Gemma 3 file may declare a final soft-cap too, and it is applied.

use anyhow::{bail, Result};

use super::blocks::{
    self, add_residual, norm_input, post_norm, rope_tables, Attention, GateAct, GatedFfn,
};
use super::moe::Ffn;
use super::{load_matrix, load_vector, meta_usize, Arch, ModelConfig, RopeStyle, Scratch, SeqStep};
use crate::gguf::GgufFile;
use crate::kernels::QMatrix;

pub struct Gemma3Layer {
    pub attn_norm: Vec<f32>, // dim
    /// With QK-norm (Gemma 3).
    pub attn: Attention,
    pub ffn_norm: Vec<f32>, // dim
    pub ffn: Ffn,
    /// Norms of the attention and feed-forward outputs before they join the residual stream (dim each; Gemma 2 and
    /// 3, not Gemma 1).
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
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

/// Gemma 2's every-other-layer pattern, window and soft-caps where the file is silent (llama.cpp's defaults).
const GEMMA2_SWA_PATTERN: usize = 2;
const GEMMA2_WINDOW: u32 = 4096;
const GEMMA2_ATTN_SOFTCAP: f32 = 50.0;
const GEMMA2_FINAL_SOFTCAP: f32 = 30.0;

impl Gemma3 {
    /// Loads a model of architecture `arch` (`Gemma3` or `Gemma2`; their metadata keys start with "gemma3." and
    /// "gemma2.").
    pub fn load(g: &GgufFile, arch: Arch) -> Result<Self> {
        let (a, gemma2) = match arch {
            Arch::Gemma3 => ("gemma3", false),
            Arch::Gemma2 => ("gemma2", true),
            Arch::Gemma => ("gemma", false),
            _ => bail!("{}: not a Gemma model", g.path.display()),
        };
        // Gemma 1: every layer global, no post-norms, no QK-norm, one RoPE base (10000 unless the file says).
        let gemma1 = arch == Arch::Gemma;
        let key = |k: &str| format!("{a}.{k}");
        let n_layers = super::layer_count(g, a)?;
        let dim = meta_usize(g, a, "embedding_length")?;
        let n_heads = meta_usize(g, a, "attention.head_count")?;
        let n_kv_heads = g
            .get_u64(&key("attention.head_count_kv"))?
            .map_or(n_heads, |v| v as usize);
        let hd = g
            .get_u64(&key("attention.key_length"))?
            .map_or(dim / n_heads.max(1), |v| v as usize);
        let hd_v = g
            .get_u64(&key("attention.value_length"))?
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
        let window = match gemma1 {
            true => None,
            false => g
                .get_u64(&key("attention.sliding_window"))?
                .map(|w| u32::try_from(w).unwrap_or(u32::MAX))
                .or(gemma2.then_some(GEMMA2_WINDOW)),
        };
        let default_period = if gemma2 {
            GEMMA2_SWA_PATTERN
        } else {
            SWA_PATTERN
        };
        let layer_is_local = super::swa_layers(g, a, n_layers, window, default_period)?;
        let rope_base = g
            .get_f64(&key("rope.freq_base"))?
            .unwrap_or(if gemma2 || gemma1 {
                10_000.0
            } else {
                1_000_000.0
            }) as f32;
        let rope_base_local = match g.get_f64(&key("rope.freq_base_swa"))? {
            Some(b) => b as f32,
            None if gemma2 || gemma1 => rope_base,
            None => ROPE_BASE_LOCAL,
        };
        // A soft-cap of 0 means none (llama.cpp's reading).
        let cap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
            Ok(match g.get_f64(&key(k))? {
                Some(0.0) => None,
                Some(c) if c.is_finite() && c > 0.0 => Some(c as f32),
                Some(c) => bail!(
                    "{}: {} is {c}, expected a positive number",
                    g.path.display(),
                    key(k)
                ),
                None => default,
            })
        };
        let attn_softcap = if gemma2 {
            cap("attn_logit_softcapping", Some(GEMMA2_ATTN_SOFTCAP))?
        } else {
            None
        };
        let final_softcap = cap(
            "final_logit_softcapping",
            gemma2.then_some(GEMMA2_FINAL_SOFTCAP),
        )?;
        // Gemma 2 27B scales by the model's dim per head, not its head width (llama.cpp picks it by layer count).
        let attn_scale = if gemma2 && n_layers == 46 {
            1.0 / ((dim / n_heads) as f32).sqrt()
        } else {
            1.0 / (hd as f32).sqrt()
        };
        let cfg = ModelConfig {
            arch,
            name: g.get_str("general.name")?.unwrap_or(a).to_string(),
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim_k: hd,
            head_dim_v: hd,
            ffn_dim,
            vocab,
            ctx_len: meta_usize(g, a, "context_length")?,
            rms_eps: g.req_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_style: RopeStyle::Neox,
            rope_dim: g
                .get_u64(&key("rope.dimension_count"))?
                .map_or(hd, |v| v as usize),
            rope_base,
            rope_base_local,
            sliding_window: window,
            layer_is_local,
            attn_scale,
            embed_scale: (dim as f32).sqrt(),
            attn_softcap,
            final_softcap,
            residual_scale: 1.0,
            logit_scale: 1.0,
            long_rope: None,
            attn_temp: None,
            moe: None,
        };
        cfg.validate(g)?;
        let rope_scale_global = match g.get_str(&key("rope.scaling.type"))? {
            Some("linear") => g.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32,
            _ => 1.0,
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Gemma3Layer {
                attn_norm: load_vector(g, &n("attn_norm"), dim)?,
                attn: Attention::load(g, i, &cfg, arch == Arch::Gemma3)?,
                ffn_norm: load_vector(g, &n("ffn_norm"), dim)?,
                ffn: Ffn::Dense(GatedFfn::load(g, i, &cfg)?),
                post_norms: match gemma1 {
                    true => None,
                    false => Some((
                        load_vector(g, &n("post_attention_norm"), dim)?,
                        load_vector(g, &n("post_ffw_norm"), dim)?,
                    )),
                },
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
            .map(|l| l.attn.n_bytes() + l.ffn.n_bytes())
            .sum();
        l + self.tok_embd.n_bytes()
    }

    /// Runs the steps' tokens (rows sequence after sequence) through every layer, appending each sequence's keys
    /// and values to its cache; the final residual stream stays in `s.x`.
    pub fn forward(&self, seqs: &mut [SeqStep<'_>], s: &mut Scratch) {
        let c = &self.cfg;
        let half = c.rope_dim / 2;
        // x: n × dim ← token embeddings · sqrt(dim)
        let n = blocks::embed(&self.tok_embd, c, seqs, s);
        // Two RoPE tables (n × rope_dim/2 each): global layers (base 1e6, optionally linearly scaled) and local layers
        // (base 1e4).
        let (cos, sin) = (&mut s.rope_cos[..n * half], &mut s.rope_sin[..n * half]);
        let scale = 1.0 / self.rope_scale_global;
        blocks::rope_rows(seqs, half, cos, sin, |pos, cos, sin| {
            rope_tables(pos, c.rope_dim, c.rope_base, scale, cos, sin)
        });
        let (cos, sin) = (
            &mut s.rope_cos_local[..n * half],
            &mut s.rope_sin_local[..n * half],
        );
        blocks::rope_rows(seqs, half, cos, sin, |pos, cos, sin| {
            rope_tables(pos, c.rope_dim, c.rope_base_local, 1.0, cos, sin)
        });

        for (li, l) in self.layers.iter().enumerate() {
            let local = c.layer_is_local[li];
            // Attention block: x += RMSNorm(Wo · attention(RoPE(QKnorm(Wq·xb)), RoPE(QKnorm(Wk·xb)), Wv·xb)),
            // xb = RMSNorm(x); local layers see the sliding window only.
            norm_input(s, n, &l.attn_norm, c.rms_eps); // xb: n × dim ← RMSNorm(x)
            l.attn.forward(c, li, local, seqs, s); // xo: n × dim
            if let Some((w, _)) = &l.post_norms {
                post_norm(s, n, w, c.rms_eps); // xo ← RMSNorm(xo)
            }
            add_residual(c, s, n); // x: n × dim += xo

            // Feed-forward block (GeGLU): x += RMSNorm(Wdown · (gelu(Wgate·xb) ⊙ Wup·xb)), xb = RMSNorm(x).
            norm_input(s, n, &l.ffn_norm, c.rms_eps); // xb: n × dim ← RMSNorm(x)
            l.ffn.forward(c, n, GateAct::GeluTanh, s); // xo: n × dim
            if let Some((_, w)) = &l.post_norms {
                post_norm(s, n, w, c.rms_eps); // xo ← RMSNorm(xo)
            }
            add_residual(c, s, n); // x: n × dim += xo
        }
    }
}
