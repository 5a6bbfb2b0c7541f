//! Llama-family forward pass (SmolLM2, Llama 2/3, Mistral-style GQA models, Qwen2/2.5, Qwen3 and Qwen3-MoE, whose
//! feed-forward layers are experts behind a router ([`super::moe`]), SmolLM3, whose every
//! 4th layer has no RoPE, Granite, which scales the embeddings, scores, residual branches and logits by constants
//! from the file, Phi-3, whose Q/K/V and gate/up projections are fused matrices cut at load and whose RoPE takes one
//! of two LongRoPE factor sets by context, OLMo 2/3, whose blocks norm their outputs instead of their inputs, EXAONE,
//! and Mistral 3, whose queries may be scaled by position) as llama.cpp's GGUF lays it out.
//!
//! Per layer: x += Wo · attention(RoPE(qn(Wq·n(x) + bq)), RoPE(kn(Wk·n(x) + bk)), Wv·n(x) + bv);
//! x += Wdown · (silu(Wgate·n(x)) ⊙ Wup·n(x)), with n = RMSNorm. Keys and values go to the KV cache before attention
//! reads them. The biases are there when the file has them (Qwen2 always does); qn and kn, RMSNorm over each query
//! and key head, only in Qwen3. Llama rotates pairs (2i, 2i+1); Qwen2 and Qwen3 rotate (i, i + d/2) (NeoX), as
//! llama.cpp does for each. All honour the RoPE scaling the file declares, and Llama its frequency factors.

use anyhow::{bail, Result};

use super::blocks::{
    self, add_residual, block_input, post_norm, rope_tables, Attention, GateAct, GatedFfn,
};
use super::moe::{Ffn, MoeConfig, MoeFfn};
use super::rope::{freq_factors, long_rope_factors, RopeScaling};
use super::{
    load_matrix, load_vector, meta_usize, Arch, AttnTemp, LongRope, ModelConfig, RopeStyle,
    Scratch, SeqStep,
};
use crate::gguf::GgufFile;
use crate::kernels::QMatrix;

pub struct LlamaLayer {
    /// RMSNorm weights of the attention block's input (dim); None on OLMo 2, whose blocks read x itself.
    pub attn_norm: Option<Vec<f32>>,
    pub attn: Attention,
    /// RMSNorm weights of the feed-forward block's input (dim); None on OLMo 2.
    pub ffn_norm: Option<Vec<f32>>,
    pub ffn: Ffn,
    /// OLMo 2's RMSNorm weights of the attention and feed-forward outputs (dim each), applied before each joins the
    /// residual stream.
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub tok_embd: QMatrix, // vocab × dim
    pub layers: Vec<LlamaLayer>,
    pub out_norm: Vec<f32>, // dim
    /// vocab × dim; None when the output shares the token embedding.
    pub output: Option<QMatrix>,
    /// RoPE scaling from `<arch>.rope.scaling.*`.
    pub rope_scaling: RopeScaling,
    /// rope_dim/2 frequency factors (`rope_freqs.weight`, Llama 3.1 and later; Qwen2 has none; on Phi-3, the
    /// LongRoPE set `cfg.long_rope` names).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Phi-3's LongRoPE factor sets, `[short, long]`, each where the file has it (None on other architectures).
    pub long_rope_sets: Option<[Option<Vec<f32>>; 2]>,
}

/// OLMo 3: without a `sliding_window_pattern`, every layer but each 4th has the window (llama.cpp's default).
const OLMO3_SWA_PERIOD: usize = 4;

/// SmolLM3: layers i with (i + 1) divisible by this have no RoPE (fixed by the architecture in llama.cpp).
const SMOLLM3_NOPE_EVERY: usize = 4;

/// Mistral 3's attention temperature: `attention.temperature_scale` (absent or 0: none), counted in steps of the
/// YaRN original context, which must then be given (llama.cpp refuses such a file too).
fn attn_temp(g: &GgufFile, a: &str) -> Result<Option<AttnTemp>> {
    let scale = g.get_f64(&format!("{a}.attention.temperature_scale"))?;
    let Some(scale) = scale.filter(|&s| s != 0.0) else {
        return Ok(None);
    };
    let orig = format!("{a}.rope.scaling.original_context_length");
    match g.get_u64(&orig)? {
        Some(n) if n > 0 => Ok(Some(AttnTemp {
            scale: scale as f32,
            floor: u32::try_from(n).unwrap_or(u32::MAX),
            offset: 0.0,
        })),
        _ => bail!(
            "{}: {a}.attention.temperature_scale is set, but {orig} (the step of its position scaling) is missing or 0",
            g.path.display()
        ),
    }
}

/// ERNIE 4.5 MoE's routing as llama.cpp's graph runs it: the first `leading_dense_block_count` layers (default 0)
/// dense, `feed_forward_length` wide, every later one experts; `expert_weights_scale` is not read. llama.cpp loads
/// dense tensors only for the leading layers, so an `interleave_moe_layer_step` other than 1 (expert layers
/// interleaved with dense ones) cannot run there either and is refused.
fn ernie_dense_lead(g: &GgufFile, a: &str, n_layers: usize, m: MoeConfig) -> Result<MoeConfig> {
    let step = format!("{a}.interleave_moe_layer_step");
    match g.get_u64(&step)? {
        Some(1) => {}
        Some(n) => bail!(
            "{}: {step} is {n}: hayloft (like llama.cpp) runs ERNIE 4.5 MoE files whose layers after the dense ones \
             are all experts (step 1)",
            g.path.display()
        ),
        None => bail!("{}: {step} is missing", g.path.display()),
    }
    let lead = g
        .get_u64(&format!("{a}.leading_dense_block_count"))?
        .unwrap_or(0) as usize;
    if lead >= n_layers {
        bail!(
            "{}: {a}.leading_dense_block_count is {lead}: no expert layer is left of {n_layers}",
            g.path.display()
        );
    }
    Ok(MoeConfig {
        w_scale: 0.0,
        dense_lead: lead,
        dense_ff: meta_usize(g, a, "feed_forward_length")?,
        ..m
    })
}
impl Llama {
    /// Loads a model of a Llama-family architecture `arch` (every [`Arch`] but the Gemmas; their metadata keys start
    /// with the architecture's name).
    pub fn load(g: &GgufFile, arch: Arch) -> Result<Self> {
        let (a, rope_style) = match arch {
            Arch::Llama => ("llama", RopeStyle::Norm),
            Arch::Qwen2 => ("qwen2", RopeStyle::Neox),
            Arch::Qwen2Moe => ("qwen2moe", RopeStyle::Neox),
            Arch::Qwen3 => ("qwen3", RopeStyle::Neox),
            Arch::Qwen3Moe => ("qwen3moe", RopeStyle::Neox),
            Arch::SmolLM3 => ("smollm3", RopeStyle::Norm),
            Arch::Granite => ("granite", RopeStyle::Norm),
            Arch::GraniteMoe => ("granitemoe", RopeStyle::Norm),
            Arch::Phi3 => ("phi3", RopeStyle::Neox),
            Arch::Olmo2 => ("olmo2", RopeStyle::Neox),
            Arch::Olmoe => ("olmoe", RopeStyle::Neox),
            Arch::Exaone => ("exaone", RopeStyle::Neox),
            Arch::Ernie45 => ("ernie4_5", RopeStyle::Norm),
            Arch::Ernie45Moe => ("ernie4_5-moe", RopeStyle::Norm),
            Arch::Mistral3 => ("mistral3", RopeStyle::Norm),
            Arch::Gemma3 | Arch::Gemma2 | Arch::Gemma => {
                bail!("{}: Gemma is not a Llama-family model", g.path.display())
            }
        };
        let key = |k: &str| format!("{a}.{k}");
        let n_layers = super::layer_count(g, a)?;
        // Experts, as each architecture's llama.cpp graph routes them: (whether the file must have them, whether
        // the k chosen weights are renormalized); other architectures' MoE files are refused.
        let routing = match arch {
            Arch::Qwen3Moe | Arch::GraniteMoe | Arch::Ernie45Moe => Some((true, true)),
            Arch::Olmoe | Arch::Qwen2Moe => Some((true, false)),
            Arch::Llama | Arch::Mistral3 => Some((false, true)),
            _ => None,
        };
        let moe = match routing {
            Some((required, norm_w)) => match MoeConfig::from_gguf(g, a, norm_w)? {
                // Shared experts: Qwen2-MoE's (gated) always, feed_forward_length wide unless the file says;
                // Granite MoE's and ERNIE 4.5's (ungated) where the file gives a width.
                Some(m) => Some(MoeConfig {
                    shared_ff: match (arch, g.get_u64(&key("expert_shared_feed_forward_length"))?) {
                        (Arch::Qwen2Moe | Arch::GraniteMoe | Arch::Ernie45Moe, Some(f)) => {
                            f as usize
                        }
                        (Arch::Qwen2Moe, None) => meta_usize(g, a, "feed_forward_length")?,
                        _ => 0,
                    },
                    ..match arch {
                        Arch::Ernie45Moe => ernie_dense_lead(g, a, n_layers, m)?,
                        _ => m,
                    }
                }),
                None if required => bail!(
                    "{}: {} is missing or 0",
                    g.path.display(),
                    key("expert_count")
                ),
                None => None,
            },
            None => {
                if let Some(n) = g.get_u64(&key("expert_count"))?.filter(|&n| n > 0) {
                    bail!(
                        "{}: {} is {n}: mixture-of-experts feed-forward layers are not supported for this \
                         architecture (hayloft runs the experts of qwen2moe, qwen3moe, olmoe, granitemoe, llama and \
                         mistral3 files)",
                        g.path.display(),
                        key("expert_count")
                    );
                }
                None
            }
        };
        let dim = meta_usize(g, a, "embedding_length")?;
        let n_heads = meta_usize(g, a, "attention.head_count")?;
        let n_kv_heads = g
            .get_u64(&key("attention.head_count_kv"))?
            .map_or(n_heads, |v| v as usize);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            bail!(
                "{}: inconsistent head counts: {n_heads} heads, {n_kv_heads} KV heads",
                g.path.display()
            );
        }
        // Head width: `attention.key_length` where the file gives it (Qwen3's heads are wider than dim / heads),
        // else dim / heads; values as wide as keys (llama.cpp's Llama-family graphs assume it too).
        let hd = match g.get_u64(&key("attention.key_length"))? {
            Some(k) => k as usize,
            None if dim % n_heads == 0 => dim / n_heads,
            None => bail!(
                "{}: {dim} dims do not split into {n_heads} heads and {} is absent",
                g.path.display(),
                key("attention.key_length")
            ),
        };
        let hv = g
            .get_u64(&key("attention.value_length"))?
            .map_or(hd, |v| v as usize);
        if hd == 0 || hv != hd {
            bail!(
                "{}: head widths {hd} (keys) and {hv} (values); hayloft runs Llama-family heads of one nonzero width",
                g.path.display()
            );
        }
        // Qwen3-MoE's experts are `expert_feed_forward_length` wide (else feed_forward_length / k, as llama.cpp
        // reads it); Llama's and Mistral 3's are feed_forward_length wide.
        let ffn_dim = match (arch, moe) {
            (Arch::Ernie45Moe, Some(_)) => meta_usize(g, a, "expert_feed_forward_length")?,
            (Arch::Qwen3Moe | Arch::Qwen2Moe, Some(m)) => {
                match g.get_u64(&key("expert_feed_forward_length"))? {
                    Some(f) => f as usize,
                    None => meta_usize(g, a, "feed_forward_length")? / m.n_used,
                }
            }
            _ => meta_usize(g, a, "feed_forward_length")?,
        };
        let emb = super::tensor(g, "token_embd.weight")?;
        let vocab = emb.dims.get(1).copied().unwrap_or(0) as usize;
        let rope_dim = g
            .get_u64(&key("rope.dimension_count"))?
            .map_or(hd, |v| v as usize);
        if rope_dim == 0 || rope_dim > hd || !rope_dim.is_multiple_of(2) {
            bail!(
                "{}: {} is {rope_dim}; it must be even and at most the head dimension {hd}",
                g.path.display(),
                key("rope.dimension_count")
            );
        }
        let ctx_len = meta_usize(g, a, "context_length")?;
        // OLMo 3 (architecture "olmo2" too): a sliding window on the layers its pattern marks, rotated with plain
        // RoPE (llama.cpp's graph: the global base, no scaling) while the others take the file's scaling.
        let olmo2 = arch == Arch::Olmo2;
        let sliding_window = match olmo2 {
            true => g
                .get_u64(&key("attention.sliding_window"))?
                .filter(|&w| w > 0)
                .map(|w| u32::try_from(w).unwrap_or(u32::MAX)),
            false => None,
        };
        let layer_is_local = super::swa_layers(g, a, n_layers, sliding_window, OLMO3_SWA_PERIOD)?;
        // Phi-3's LongRoPE factor sets; the long one rotates when the context exceeds the original one (llama.cpp's
        // choice for a context of the trained length, until `set_max_context` says otherwise).
        let long_rope_sets = match arch {
            Arch::Phi3 => Some(long_rope_factors(g, rope_dim)?),
            _ => None,
        };
        let long_rope = match &long_rope_sets {
            Some([short, long]) if short.is_some() || long.is_some() => {
                let orig = g
                    .get_u64(&key("rope.scaling.original_context_length"))?
                    .map_or(ctx_len, |v| v as usize);
                let mut lr = LongRope {
                    orig_ctx: orig,
                    long: false,
                };
                lr.long = lr.long_for(ctx_len);
                Some(lr)
            }
            _ => None,
        };
        // Granite's four multipliers (llama.cpp reads each, and a 0 or absent one as "none"; the logit scale is
        // required there).
        let granite = matches!(arch, Arch::Granite | Arch::GraniteMoe);
        let scale = |k: &str| -> Result<Option<f32>> {
            Ok(match g.get_f64(&key(k))? {
                Some(v) if granite && v != 0.0 => Some(v as f32),
                _ => None,
            })
        };
        let logit_scale = match scale("logit_scale")? {
            Some(v) => v,
            None if granite => bail!("{}: {} is missing", g.path.display(), key("logit_scale")),
            None => 1.0,
        };
        let mut cfg = ModelConfig {
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
            ctx_len,
            rms_eps: g.req_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_style,
            rope_dim,
            rope_base: g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
            rope_base_local: 0.0,
            sliding_window,
            layer_is_local,
            attn_scale: scale("attention.scale")?.unwrap_or(1.0 / (hd as f32).sqrt()),
            embed_scale: scale("embedding_scale")?.unwrap_or(1.0),
            attn_softcap: None,
            final_softcap: None,
            residual_scale: scale("residual_scale")?.unwrap_or(1.0),
            logit_scale,
            long_rope,
            attn_temp: match arch {
                Arch::Mistral3 => attn_temp(g, a)?,
                _ => None,
            },
            moe,
        };
        if cfg.layer_is_local.iter().any(|&l| l) {
            cfg.rope_base_local = cfg.rope_base;
        }
        cfg.validate(g)?;
        // Granite turns RoPE off altogether when `rope.scaling.finetuned` is false (llama.cpp's reading).
        let granite_rope = !granite || g.get_bool(&key("rope.scaling.finetuned"))?.unwrap_or(true);
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            // OLMo 2: no input norms; norms of the blocks' outputs; QK-norm over all heads of a row at once.
            let norm = |what: &str| -> Result<Option<Vec<f32>>> {
                match olmo2 {
                    true => Ok(None),
                    false => load_vector(g, &n(what), dim).map(Some),
                }
            };
            layers.push(LlamaLayer {
                attn_norm: norm("attn_norm")?,
                attn: match arch {
                    Arch::Phi3 => Attention::load_fused(g, i, &cfg)?,
                    Arch::Olmo2 | Arch::Olmoe => Attention {
                        qk_norm: Some((
                            load_vector(g, &n("attn_q_norm"), n_heads * hd)?,
                            load_vector(g, &n("attn_k_norm"), n_kv_heads * hd)?,
                        )),
                        ..Attention::load(g, i, &cfg, false)?
                    },
                    _ => Attention {
                        // SmolLM3 leaves every 4th layer unrotated (NoPE), as llama.cpp's graph does.
                        rope: granite_rope
                            && !(arch == Arch::SmolLM3 && (i + 1) % SMOLLM3_NOPE_EVERY == 0),
                        ..Attention::load(g, i, &cfg, matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe))?
                    },
                },
                ffn_norm: norm("ffn_norm")?,
                ffn: match (arch, cfg.moe) {
                    (_, Some(m)) if i >= m.dense_lead => Ffn::Moe(Box::new(MoeFfn::load(
                        g,
                        i,
                        &cfg,
                        m,
                        (arch == Arch::Qwen2Moe, arch == Arch::Ernie45Moe),
                    )?)),
                    (_, Some(m)) => Ffn::Dense(GatedFfn::load_wide(g, i, dim, m.dense_ff)?),
                    (Arch::Phi3, None) => Ffn::Dense(GatedFfn::load_fused(g, i, &cfg)?),
                    _ => Ffn::Dense(GatedFfn::load(g, i, &cfg)?),
                },
                post_norms: match olmo2 {
                    true => Some((
                        load_vector(g, &n("post_attention_norm"), dim)?,
                        load_vector(g, &n("post_ffw_norm"), dim)?,
                    )),
                    false => None,
                },
            });
        }
        let output = match g.tensor_info("output.weight") {
            Some(_) => Some(load_matrix(g, "output.weight", vocab, dim)?),
            None => None,
        };
        let mut m = Self {
            tok_embd: load_matrix(g, "token_embd.weight", vocab, dim)?,
            out_norm: load_vector(g, "output_norm.weight", dim)?,
            output,
            layers,
            rope_scaling: RopeScaling::from_gguf(g, a, cfg.ctx_len)?,
            rope_freq_factors: match arch {
                Arch::Llama | Arch::Granite | Arch::GraniteMoe | Arch::Exaone => {
                    freq_factors(g, cfg.rope_dim)?
                }
                _ => None,
            },
            long_rope_sets,
            cfg,
        };
        m.set_max_context(ctx_len);
        Ok(m)
    }

    /// Rotates with the LongRoPE factor set llama.cpp picks for a context of `n` tokens (see [`LongRope`]); no-op
    /// for a model without the sets.
    pub fn set_max_context(&mut self, n: usize) {
        if let (Some(lr), Some(sets)) = (&mut self.cfg.long_rope, &self.long_rope_sets) {
            lr.long = lr.long_for(n);
            self.rope_freq_factors = sets[lr.long as usize].clone();
        }
    }

    /// [`Self::weight_bytes`] less the experts a token does not go through (all of them for a dense model).
    pub fn active_weight_bytes(&self) -> usize {
        let unread: usize = self
            .layers
            .iter()
            .map(|l| l.ffn.n_bytes() - l.ffn.active_bytes())
            .sum();
        self.weight_bytes() - unread
    }

    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                let norms = [&l.attn_norm, &l.ffn_norm]
                    .into_iter()
                    .flatten()
                    .chain(l.post_norms.iter().flat_map(|(a, f)| [a, f]))
                    .map(|w| 4 * w.len())
                    .sum::<usize>();
                l.attn.n_bytes() + l.ffn.n_bytes() + norms
            })
            .sum();
        l + self.tok_embd.n_bytes()
            + self.output.as_ref().map_or(0, |m| m.n_bytes())
            + 4 * self.out_norm.len()
    }

    /// Runs the steps' tokens (rows sequence after sequence) through every layer, appending each sequence's keys
    /// and values to its cache; the final residual stream stays in `s.x`.
    pub fn forward(&self, seqs: &mut [SeqStep<'_>], s: &mut Scratch) {
        let c = &self.cfg;
        let half = c.rope_dim / 2;
        // x: n × dim ← token embeddings
        let n = blocks::embed(&self.tok_embd, c, seqs, s);
        let (cos, sin) = (&mut s.rope_cos[..n * half], &mut s.rope_sin[..n * half]); // n × rope_dim/2 each
        blocks::rope_rows(seqs, half, cos, sin, |pos, cos, sin| {
            let ff = self.rope_freq_factors.as_deref();
            self.rope_scaling
                .tables(pos, c.rope_dim, c.rope_base, ff, cos, sin)
        });
        if c.layer_is_local.iter().any(|&l| l) {
            // Sliding-window layers (OLMo 3): plain RoPE, n × rope_dim/2 each.
            let (cos, sin) = (
                &mut s.rope_cos_local[..n * half],
                &mut s.rope_sin_local[..n * half],
            );
            blocks::rope_rows(seqs, half, cos, sin, |pos, cos, sin| {
                rope_tables(pos, c.rope_dim, c.rope_base_local, 1.0, cos, sin)
            });
        }

        if let Some(t) = c.attn_temp {
            // q_temp: n, each row's query factor.
            let rows = seqs.iter().flat_map(|q| q.pos.iter());
            for (f, &p) in s.q_temp[..n].iter_mut().zip(rows) {
                *f = t.factor(p);
            }
        }

        for (li, l) in self.layers.iter().enumerate() {
            let local = c.layer_is_local[li];
            // Attention block: x += Wo · attention(RoPE(Wq·xb + bq), RoPE(Wk·xb + bk), Wv·xb + bv), xb = RMSNorm(x)
            // (OLMo 2: xb = x, and the block's output normed before it joins x).
            block_input(s, n, c.dim, l.attn_norm.as_deref(), c.rms_eps); // xb: n × dim
            l.attn.forward(c, li, local, seqs, s); // xo: n × dim
            if let Some((w, _)) = &l.post_norms {
                post_norm(s, n, w, c.rms_eps); // xo ← RMSNorm(xo)
            }
            add_residual(c, s, n); // x: n × dim += residual_scale · xo

            // Feed-forward block (SwiGLU): x += Wdown · (silu(Wgate·xb) ⊙ Wup·xb), xb = RMSNorm(x) (OLMo 2 as above).
            block_input(s, n, c.dim, l.ffn_norm.as_deref(), c.rms_eps); // xb: n × dim
            l.ffn.forward(c, n, GateAct::Silu, s); // xo: n × dim
            if let Some((_, w)) = &l.post_norms {
                post_norm(s, n, w, c.rms_eps); // xo ← RMSNorm(xo)
            }
            add_residual(c, s, n); // x: n × dim += residual_scale · xo
        }
    }
}
