//! Models: one file per architecture family, each a plain struct of weights and a forward pass that reads top to
//! bottom: `llama` (Llama; Qwen2/2.5, which adds biases to the Q/K/V projections and rotates NeoX-style; Qwen3, which
//! norms each query and key head instead) and `gemma3`. What they share: this module holds the hyper-parameters, weight loading and the per-chunk scratch buffers;
//! [`blocks`] the layer blocks (attention, gated feed-forward, embedding, output head) and the element-wise ops
//! (RMSNorm, RoPE, activations); [`rope`] the RoPE scaling a GGUF may declare (linear, YaRN).

pub mod blend;
pub mod blocks;
pub mod cost;
pub mod gemma3;
pub mod lazy;
pub mod llama;
pub mod moe;
pub mod query_window;
pub mod rope;
pub mod select;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;
mod validate;

pub use blocks::{apply_rope, gelu_tanh, mask_heads, rmsnorm, rmsnorm_inplace, rope_tables, silu};

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::attention::{AttnScratch, Selection};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::kernels::{MatmulScratch, QMatrix};
use crate::kv::{KvCache, KvConfig, KvDtype};
pub use query_window::QueryWindow;
pub use select::{PrefillPattern, SelectCx, Selector};
pub use validate::MAX_CONTEXT;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    /// Qwen2 / Qwen2.5: Llama blocks with biased Q/K/V projections and NeoX RoPE (run by [`llama::Llama`]).
    Qwen2,
    /// Qwen3: Llama blocks with per-head RMSNorm of queries and keys before RoPE (QK-norm), NeoX RoPE, no biases, and
    /// heads wider than dim / heads (run by [`llama::Llama`]).
    Qwen3,
    /// Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention, mixture-of-experts feed-forward layers whose routed
    /// weights are not renormalized, plus a shared expert every token goes through, scaled by a sigmoid gate (run by
    /// [`llama::Llama`] with [`moe::MoeFfn`]).
    Qwen2Moe,
    /// Qwen3-MoE: Qwen3's attention with mixture-of-experts feed-forward layers (softmax router, top-k experts,
    /// weights renormalized over the k; run by [`llama::Llama`] with [`moe::MoeFfn`]).
    Qwen3Moe,
    /// SmolLM3: Llama blocks with no RoPE on every 4th layer (run by [`llama::Llama`]).
    SmolLM3,
    /// Granite (dense): Llama blocks with embedding, attention, residual and logit multipliers from the file (run by
    /// [`llama::Llama`]).
    Granite,
    /// Granite MoE (3.0/3.1 1B-A400M, 3B-A800M, and the shared-expert variant): Granite's multipliers around
    /// mixture-of-experts feed-forward layers (weights renormalized), plus an ungated shared expert where the file
    /// declares one (run by [`llama::Llama`] with [`moe::MoeFfn`]).
    GraniteMoe,
    Gemma3,
    /// Gemma 1 (and CodeGemma): Gemma 3's blocks without QK-norm, post-norms or windows, one RoPE base (run by
    /// [`gemma3::Gemma3`]).
    Gemma,
    /// Gemma 2: Gemma 3's blocks without QK-norm, with attention and final logit soft-capping and every other layer
    /// local (run by [`gemma3::Gemma3`]).
    Gemma2,
    /// Phi-3 / Phi-3.5 / Phi-4-mini: Llama blocks whose Q, K, V projections are one fused matrix (`attn_qkv`) and whose
    /// gate and up projections are one (`ffn_up`, gate rows first), NeoX RoPE, and LongRoPE's two sets of frequency
    /// factors (run by [`llama::Llama`]).
    Phi3,
    /// Mistral 3 (Ministral 3): Llama blocks with YaRN and, where the file sets `attention.temperature_scale`, queries
    /// scaled by position (Llama 4's attention temperature, [`AttnTemp`]; run by [`llama::Llama`]).
    Mistral3,
    /// OLMoE: OLMo's full-width QK-norm with input norms (no output norms), and mixture-of-experts feed-forward
    /// layers whose routed weights are not renormalized (run by [`llama::Llama`] with [`moe::MoeFfn`]).
    Olmoe,
    /// ERNIE 4.5 (dense: 0.3B): Llama blocks (run by [`llama::Llama`]).
    Ernie45,
    /// ERNIE 4.5 MoE (21B-A3B, 300B-A47B): Llama blocks, dense first layers, then experts behind a router whose
    /// choice takes a per-expert bias, with a shared expert (run by [`llama::Llama`] with [`moe::MoeFfn`]).
    Ernie45Moe,
    /// EXAONE 3 / 3.5: Llama blocks with NeoX RoPE (and Llama 3.1's frequency factors where the file has them; run
    /// by [`llama::Llama`]).
    Exaone,
    /// OLMo 2 / OLMo 3: Llama blocks without input norms, with RMSNorm on each block's output before it joins the
    /// residual stream and on whole query and key rows (all heads at once) before RoPE, NeoX RoPE; OLMo 3 adds a
    /// sliding window on the layers its pattern marks (run by [`llama::Llama`]).
    Olmo2,
}

/// LongRoPE (Phi-3 128K, Phi-3.5, Phi-4-mini): the file holds a short and a long set of RoPE frequency factors
/// (`rope_factors_short`, `rope_factors_long`); llama.cpp rotates with the long set when the context it runs with
/// exceeds `orig_ctx` (`rope.scaling.original_context_length`), else with the short one, for every position. hayloft
/// picks by the context a session may hold ([`Model::set_max_context`], the model's trained context by default).
/// Keys rotated under one set are not those of the other, so the choice is part of the configuration (and of every
/// prefix-cache namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongRope {
    pub orig_ctx: usize,
    /// Whether the long set rotates.
    pub long: bool,
}

impl LongRope {
    /// The set llama.cpp picks for a context of `n` tokens.
    pub fn long_for(&self, n: usize) -> bool {
        n > self.orig_ctx
    }
}

/// Attention temperature by position (Llama 4's, which Mistral 3 files set): each query row at position p is multiplied,
/// after RoPE, by `1 + scale · ln(⌊(p + offset) / floor⌋ + 1)`, so queries far into a long context score sharper.
/// llama.cpp's reading for `mistral3`: `scale` from `attention.temperature_scale`, `floor` the YaRN original context
/// (`rope.scaling.original_context_length`), offset 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnTemp {
    pub scale: f32,
    pub floor: u32,
    pub offset: f32,
}

impl AttnTemp {
    /// The factor of a query at position `pos`, computed as llama.cpp computes it (the quotient in f32, the logarithm
    /// in f64, rounded once to f32).
    pub fn factor(&self, pos: u32) -> f32 {
        let steps = ((pos as f32 + self.offset) / self.floor as f32).floor();
        ((steps as f64 + 1.0).ln() * self.scale as f64 + 1.0) as f32
    }
}

/// How RoPE pairs dimensions: `Norm` rotates (2i, 2i+1) (llama.cpp's GGUF Llama layout), `Neox` rotates (i, i + d/2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    Norm,
    Neox,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: String,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub ctx_len: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    pub rope_dim: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3 uses a different base locally).
    pub rope_base_local: f32,
    /// Sliding window of local layers, and which layers are local.
    pub sliding_window: Option<u32>,
    pub layer_is_local: Vec<bool>,
    /// Multiplies q·k before softmax.
    pub attn_scale: f32,
    /// Multiplies token embeddings (Gemma: sqrt(dim)).
    pub embed_scale: f32,
    /// Attention logit soft-capping (Gemma 2): each scaled score s becomes c · tanh(s / c) before the softmax.
    pub attn_softcap: Option<f32>,
    /// Final logit soft-capping (Gemma 2): each output logit l becomes c · tanh(l / c).
    pub final_softcap: Option<f32>,
    /// Multiplies each block's output before it joins the residual stream (Granite's `residual_scale`; else 1).
    pub residual_scale: f32,
    /// Divides the output logits (Granite's `logit_scale`; else 1).
    pub logit_scale: f32,
    /// Which of LongRoPE's factor sets rotates (Phi-3 files that hold them; None elsewhere).
    pub long_rope: Option<LongRope>,
    /// Queries scaled by position (Mistral 3 files that set a temperature scale; None elsewhere).
    pub attn_temp: Option<AttnTemp>,
    /// Mixture-of-experts feed-forward layers (Qwen3-MoE): `ffn_dim` is then each expert's width.
    pub moe: Option<moe::MoeConfig>,
}

impl ModelConfig {
    /// Whether `layer` is a sliding-window (local) layer.
    pub fn is_local(&self, layer: usize) -> bool {
        self.layer_is_local.get(layer).copied().unwrap_or(false)
    }

    /// The sliding window of `layer`, None on global layers.
    pub fn layer_window(&self, layer: usize) -> Option<u32> {
        if self.is_local(layer) {
            self.sliding_window
        } else {
            None
        }
    }

    /// The cache layout for this model: each sliding-window layer keeps only its window (see [`KvCache`]).
    pub fn kv_config(&self, dtype: KvDtype, block_tokens: usize) -> KvConfig {
        KvConfig {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim_k: self.head_dim_k,
            head_dim_v: self.head_dim_v,
            block_tokens,
            dtype,
            windows: (0..self.n_layers).map(|l| self.layer_window(l)).collect(),
        }
    }
}

/// A loaded model of any supported architecture.
pub enum Model {
    /// Llama or Qwen2 (`config().arch` tells which).
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
}

/// The architectures hayloft runs: `general.architecture` → the loader's variant (Gemma's go to the Gemma 3 loader,
/// the others to the Llama one).
const ARCHITECTURES: [(&str, Arch); 18] = [
    ("llama", Arch::Llama),
    ("qwen2", Arch::Qwen2),
    ("qwen2moe", Arch::Qwen2Moe),
    ("qwen3", Arch::Qwen3),
    ("qwen3moe", Arch::Qwen3Moe),
    ("smollm3", Arch::SmolLM3),
    ("granite", Arch::Granite),
    ("granitemoe", Arch::GraniteMoe),
    ("phi3", Arch::Phi3),
    ("olmo2", Arch::Olmo2),
    ("olmoe", Arch::Olmoe),
    ("exaone", Arch::Exaone),
    ("ernie4_5", Arch::Ernie45),
    ("ernie4_5-moe", Arch::Ernie45Moe),
    ("mistral3", Arch::Mistral3),
    ("gemma", Arch::Gemma),
    ("gemma2", Arch::Gemma2),
    ("gemma3", Arch::Gemma3),
];

impl Model {
    pub fn load(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        Self::from_gguf(&g)
    }

    /// The file's architecture, if hayloft runs it: a clear error otherwise, before anything else is read (a loader
    /// may call it first so a file of another architecture is named as such, not by what else it lacks).
    pub fn check_architecture(g: &GgufFile) -> Result<(&str, Arch)> {
        let name = g.architecture()?;
        match ARCHITECTURES.iter().find(|(n, _)| *n == name) {
            Some(&(_, arch)) => Ok((name, arch)),
            None => bail!(
                "{}: unsupported architecture '{name}' (hayloft runs: {})",
                g.path.display(),
                ARCHITECTURES.map(|(n, _)| n).join(", ")
            ),
        }
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let (arch, a) = Self::check_architecture(g)?;
        let model = match a {
            Arch::Gemma3 | Arch::Gemma2 | Arch::Gemma => Model::Gemma3(gemma3::Gemma3::load(g, a)?),
            _ => Model::Llama(llama::Llama::load(g, a)?),
        };
        // A tensor the loader never asked for would change nothing, silently: a file made for a variant of the
        // architecture this loader does not know (llama.cpp refuses it too: "wrong number of tensors").
        let unused = g.unused_tensors();
        if let Some(first) = unused.first() {
            bail!(
                "{}: {} tensor(s) that the {arch} architecture does not use, first '{first}'{}; hayloft refuses a \
                 file whose weights it would ignore",
                g.path.display(),
                unused.len(),
                if unused.len() > 1 {
                    format!(" (all: {})", unused.iter().take(8).copied().collect::<Vec<_>>().join(", "))
                } else {
                    String::new()
                }
            );
        }
        Ok(model)
    }

    /// Sets the model up for sessions of at most `n` tokens: a LongRoPE model (Phi-3) then rotates with the factor set
    /// llama.cpp picks for a context of `n` (the long one past `rope.scaling.original_context_length`). Other models
    /// do not depend on it. The engine refuses a session whose `max_context` needs the other set.
    pub fn set_max_context(&mut self, n: usize) {
        if let Model::Llama(m) = self {
            m.set_max_context(n);
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Llama(m) => &m.cfg,
            Model::Gemma3(m) => &m.cfg,
        }
    }

    /// Runs `tokens` (at absolute positions `pos`) through the model, appending their keys/values to `cache`;
    /// attention uses (and records into) `s.seq`. The final residual stream stays in `s.x` for [`Model::logits`].
    pub fn forward(&self, tokens: &[u32], pos: &[u32], cache: &mut KvCache, s: &mut Scratch) {
        // The sequence's own state leaves the scratch for the pass (moving a few vectors, no allocation), so that the
        // one-sequence pass is exactly the batched one with a batch of one.
        let mut state = std::mem::take(&mut s.seq);
        let mut one = [SeqStep {
            tokens,
            pos,
            cache,
            state: &mut state,
        }];
        self.forward_batch(&mut one, s);
        s.seq = state;
    }

    /// Runs several independent sequences through the model in one pass: every weight matrix multiplies the rows of
    /// all of them at once (each weight is read once for the whole batch), while each sequence's rows attend over
    /// its own cache with its own [`SeqState`]. Rows are laid out sequence after sequence in `s` (sequence i's rows
    /// start at the sum of the earlier ones' token counts); the final residual stream stays in `s.x` for
    /// [`Model::logits`] / [`Model::logits_at`]. Each sequence's results are those of [`Model::forward`] on it alone.
    /// `s.seq` is not used. Panics if the rows exceed `s.cap` or a step has no tokens or mismatched positions.
    pub fn forward_batch(&self, seqs: &mut [SeqStep<'_>], s: &mut Scratch) {
        for q in seqs.iter() {
            assert!(
                !q.tokens.is_empty() && q.tokens.len() == q.pos.len(),
                "a batch step needs at least one token and one position per token"
            );
        }
        match self {
            Model::Llama(m) => m.forward(seqs, s),
            Model::Gemma3(m) => m.forward(seqs, s),
        }
    }

    /// Logits of rows `rows` (indices into the last forward's tokens) into `s.logits` (rows.len() × vocab).
    pub fn logits(&self, s: &mut Scratch, rows: Range<usize>) {
        self.logits_at(s, rows)
    }

    /// Logits of the rows `rows` lists (indices into the last forward's rows, in any order) into `s.logits`, row i of
    /// the list at `s.logits[i·vocab..]`: after [`Model::forward_batch`], the last row of each sequence.
    pub fn logits_at(&self, s: &mut Scratch, rows: impl ExactSizeIterator<Item = usize>) {
        let (norm, out) = match self {
            Model::Llama(m) => (&m.out_norm, m.output.as_ref().unwrap_or(&m.tok_embd)),
            Model::Gemma3(m) => (&m.out_norm, &m.tok_embd),
        };
        blocks::output_logits(norm, out, self.config(), s, rows);
    }

    pub fn weight_bytes(&self) -> usize {
        match self {
            Model::Llama(m) => m.weight_bytes(),
            Model::Gemma3(m) => m.weight_bytes(),
        }
    }

    /// Every matrix one decode step multiplies, in order: each layer's Q, K, V, O, gate, up, down (a MoE layer: its
    /// router and k experts' three), then the output head (the token embedding when the head shares it).
    pub fn decode_matrices(&self) -> Vec<&QMatrix> {
        fn layer<'a>(a: &'a blocks::Attention, f: &'a moe::Ffn) -> Vec<&'a QMatrix> {
            let mut v = vec![&a.wq, &a.wk, &a.wv, &a.wo];
            v.extend(f.token_matrices());
            v
        }
        let (mut v, head): (Vec<&QMatrix>, &QMatrix) = match self {
            Model::Llama(m) => (
                m.layers
                    .iter()
                    .flat_map(|l| layer(&l.attn, &l.ffn))
                    .collect(),
                m.output.as_ref().unwrap_or(&m.tok_embd),
            ),
            Model::Gemma3(m) => (
                m.layers
                    .iter()
                    .flat_map(|l| layer(&l.attn, &l.ffn))
                    .collect(),
                &m.tok_embd,
            ),
        };
        v.push(head);
        v
    }

    /// Weight bytes one decode step streams: every matrix but the token embedding, of which a step reads one row
    /// (unless the output head shares it, when the head reads it whole).
    pub fn streamed_weight_bytes(&self) -> usize {
        match self {
            Model::Llama(m) => {
                let unread = m.weight_bytes() - m.active_weight_bytes();
                match m.output {
                    Some(_) => m.weight_bytes() - m.tok_embd.n_bytes() - unread,
                    None => m.weight_bytes() - unread,
                }
            }
            _ => self.weight_bytes(),
        }
    }
}

/// Activation buffers for one chunk of up to `cap` tokens: allocated once, reused for every chunk and decode step.
#[derive(Default)]
pub struct Scratch {
    pub cap: usize,
    /// cap × dim: the residual stream.
    pub x: Vec<f32>,
    /// cap × dim: normed input of a sub-layer.
    pub xb: Vec<f32>,
    /// cap × dim: output projection result.
    pub xo: Vec<f32>,
    /// cap × n_heads·head_dim_k
    pub q: Vec<f32>,
    /// cap × n_kv_heads·head_dim_k
    pub k: Vec<f32>,
    /// cap × n_kv_heads·head_dim_v
    pub v: Vec<f32>,
    /// cap × n_heads·head_dim_v: attention output.
    pub att: Vec<f32>,
    /// cap × ffn_dim: gate, then gate ⊙ up.
    pub hb: Vec<f32>,
    /// cap × ffn_dim: up.
    pub hb2: Vec<f32>,
    /// cap × rope_dim/2 each: cos and sin of every (token, frequency) for the two RoPE bases.
    pub rope_cos: Vec<f32>,
    pub rope_sin: Vec<f32>,
    pub rope_cos_local: Vec<f32>,
    pub rope_sin_local: Vec<f32>,
    /// cap: each row's query factor ([`AttnTemp`]), filled only for models that have one.
    pub q_temp: Vec<f32>,
    /// The MoE block's buffers (empty for dense models).
    pub moe: moe::MoeScratch,
    /// rows × vocab: logits of the requested rows.
    pub logits: Vec<f32>,
    pub mm: MatmulScratch,
    pub attn: AttnScratch,
    /// The attention state of the sequence [`Model::forward`] runs (a batched pass takes each sequence's own).
    pub seq: SeqState,
}

/// What one sequence's attention keeps besides its KV cache: the per-sequence half of the model's state, which a
/// batched pass ([`Model::forward_batch`]) takes from each sequence while the sequences share one [`Scratch`].
#[derive(Default)]
pub struct SeqState {
    /// Head ablation: `head_mask[layer · n_heads + head]` true = that query head's attention output is zeroed
    /// (the Retrieval Head paper's masking experiment). Empty = no mask.
    pub head_mask: Vec<bool>,
    /// Recent query rows for KV-compression methods (capacity 0 = off: nothing recorded).
    pub obs: QueryWindow,
    /// The decode-time selector (None = every layer reads its whole cache).
    pub selector: Option<Box<dyn Selector>>,
    /// The selector's answer for the current layer.
    pub sel: Selection,
    /// Nanoseconds spent in attention (selection included) since the caller last reset it.
    pub attn_ns: u64,
    /// The sparse prefill method (None = dense prefill).
    pub prefill: Option<Box<dyn PrefillPattern>>,
    /// Its answer for the current layer and chunk.
    pub tsel: crate::attention::TileSelection,
    /// Query·key pairs of the global layers' prefill chunks: [computed, dense causal] (per KV head), while a
    /// prefill method is set.
    pub prefill_pairs: [u64; 2],
}

/// One sequence's part of a batched forward pass: its new tokens (a decode step's one, or a prompt chunk) at their
/// absolute positions, the cache they append to and attend over, and its attention state.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    /// Absolute positions, one per token.
    pub pos: &'a [u32],
    pub cache: &'a mut KvCache,
    pub state: &'a mut SeqState,
}

/// Rows of a batch: the sum of its steps' token counts.
pub fn batch_rows(seqs: &[SeqStep<'_>]) -> usize {
    seqs.iter().map(|q| q.tokens.len()).sum()
}

impl Scratch {
    /// Buffers for chunks of up to `cap` tokens, with logits for up to `logit_rows` of them.
    pub fn new(cfg: &ModelConfig, cap: usize, logit_rows: usize) -> Self {
        let half = cfg.rope_dim / 2;
        // Feed-forward width: the widest of a MoE model's experts, its shared expert and its dense layers.
        let ffn = cfg.moe.map_or(cfg.ffn_dim, |m| m.widest(cfg.ffn_dim));
        Self {
            cap,
            x: vec![0.0; cap * cfg.dim],
            xb: vec![0.0; cap * cfg.dim],
            xo: vec![0.0; cap * cfg.dim],
            q: vec![0.0; cap * cfg.n_heads * cfg.head_dim_k],
            k: vec![0.0; cap * cfg.n_kv_heads * cfg.head_dim_k],
            v: vec![0.0; cap * cfg.n_kv_heads * cfg.head_dim_v],
            att: vec![0.0; cap * cfg.n_heads * cfg.head_dim_v],
            hb: vec![0.0; cap * ffn],
            hb2: vec![0.0; cap * ffn],
            rope_cos: vec![0.0; cap * half],
            rope_sin: vec![0.0; cap * half],
            rope_cos_local: vec![0.0; cap * half],
            rope_sin_local: vec![0.0; cap * half],
            q_temp: vec![0.0; if cfg.attn_temp.is_some() { cap } else { 0 }],
            moe: moe::MoeScratch::new(cfg, cap),
            logits: vec![0.0; logit_rows.max(1) * cfg.vocab],
            mm: MatmulScratch::default(),
            attn: AttnScratch::default(),
            seq: SeqState::default(),
        }
    }

    /// Bytes held by the activation buffers (for the memory report).
    pub fn bytes(&self) -> usize {
        4 * (self.x.len()
            + self.xb.len()
            + self.xo.len()
            + self.q.len()
            + self.k.len()
            + self.v.len()
            + self.att.len()
            + self.hb.len()
            + self.hb2.len()
            + self.rope_cos.len() * 4
            + self.q_temp.len()
            + self.logits.len())
            + self.moe.bytes()
    }

    /// How many rows of logits fit at once.
    pub fn logit_rows(&self, vocab: usize) -> usize {
        self.logits.len() / vocab.max(1)
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Loading helpers

pub(crate) fn tensor<'a>(g: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    g.tensor_info(name)
        .with_context(|| format!("{}: tensor {name} is missing", g.path.display()))
}

/// A 2-D weight as a quantized matrix (rows = dims[1] output features, cols = dims[0] input features).
pub(crate) fn load_matrix(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
    let t = tensor(g, name)?;
    if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
        bail!(
            "{}: tensor {name} has shape {:?}, expected [{cols}, {rows}]",
            g.path.display(),
            t.dims
        );
    }
    QMatrix::from_gguf_with(t.ty, rows, cols, g.tensor_bytes(t), &mut |r| {
        g.release_range(t, r)
    })
    .with_context(|| format!("{}: tensor {name}", g.path.display()))
}

/// A 3-D tensor of `n_expert` matrices of `rows` × `cols` (shape [cols, rows, n_expert], expert e's rows the e-th
/// slab), one [`QMatrix`] per expert.
pub(crate) fn load_experts(
    g: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    n_expert: usize,
) -> Result<Vec<QMatrix>> {
    let t = tensor(g, name)?;
    if t.dims != [cols as u64, rows as u64, n_expert as u64] {
        bail!(
            "{}: tensor {name} has shape {:?}, expected [{cols}, {rows}, {n_expert}] ({n_expert} experts)",
            g.path.display(),
            t.dims
        );
    }
    let bytes = g.tensor_bytes(t);
    let per = bytes.len() / n_expert.max(1);
    bytes
        .chunks_exact(per)
        .enumerate()
        .map(|(e, b)| {
            QMatrix::from_gguf_with(t.ty, rows, cols, b, &mut |r| {
                g.release_range(t, e * per + r.start..e * per + r.end)
            })
            .with_context(|| format!("{}: tensor {name}", g.path.display()))
        })
        .collect()
}

/// Which of `n_layers` layers have a sliding window, as llama.cpp reads `<arch>.attention.sliding_window_pattern`:
/// one bool per layer (true = windowed), or a period n (every layer but each n-th is windowed: layer i when
/// i mod n < n − 1), `default_period` when the key is absent. No layer has one without a `window`.
pub(crate) fn swa_layers(
    g: &GgufFile,
    arch: &str,
    n_layers: usize,
    window: Option<u32>,
    default_period: usize,
) -> Result<Vec<bool>> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    if window.is_none() {
        return Ok(vec![false; n_layers]);
    }
    let period = match g.get(&key) {
        Some(crate::gguf::Value::Array(a)) => {
            if a.len() != n_layers {
                bail!(
                    "{}: {key} holds {} values for {n_layers} layers",
                    g.path.display(),
                    a.len()
                );
            }
            return Ok(a
                .iter()
                .map(|v| matches!(v, crate::gguf::Value::Bool(true)))
                .collect());
        }
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => default_period,
    }
    .max(1);
    Ok((0..n_layers).map(|i| i % period < period - 1).collect())
}

/// A fused weight matrix (`cols` input features × the sum of `parts` output rows, as Phi-3's `attn_qkv` and `ffn_up`)
/// cut by rows into one matrix per part, in order: each part's rows are a contiguous run of the tensor's bytes.
pub(crate) fn load_matrix_parts(
    g: &GgufFile,
    name: &str,
    cols: usize,
    parts: &[usize],
) -> Result<Vec<QMatrix>> {
    let t = tensor(g, name)?;
    let rows: usize = parts.iter().sum();
    if t.dims.len() != 2 || t.dims[0] as usize != cols || t.dims[1] as usize != rows {
        bail!(
            "{}: tensor {name} has shape {:?}, expected [{cols}, {rows}] ({} fused)",
            g.path.display(),
            t.dims,
            parts
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    let bytes = g.tensor_bytes(t);
    let row_bytes = bytes.len() / rows.max(1);
    let mut out = Vec::with_capacity(parts.len());
    let mut r0 = 0;
    for &n in parts {
        let (at, b) = (r0 * row_bytes, &bytes[r0 * row_bytes..(r0 + n) * row_bytes]);
        out.push(
            QMatrix::from_gguf_with(t.ty, n, cols, b, &mut |r| {
                g.release_range(t, at + r.start..at + r.end)
            })
            .with_context(|| format!("{}: tensor {name}", g.path.display()))?,
        );
        r0 += n;
    }
    Ok(out)
}

/// A 1-D F32 (or F16) weight vector (shape [len], trailing dimensions of 1 allowed as in llama.cpp).
pub(crate) fn load_vector(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = tensor(g, name)?;
    if t.dims[0] != len as u64 || t.dims[1..].iter().any(|&d| d != 1) {
        bail!(
            "{}: tensor {name} has shape {:?}, expected [{len}]",
            g.path.display(),
            t.dims
        );
    }
    let b = g.tensor_bytes(t);
    let v = match t.ty {
        GgmlType::F32 => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        GgmlType::F16 => Ok(b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        ty => bail!(
            "{}: tensor {name} has type {ty}, expected F32 or F16",
            g.path.display()
        ),
    };
    g.release(t);
    v
}

pub(crate) fn meta_usize(g: &GgufFile, arch: &str, key: &str) -> Result<usize> {
    Ok(g.req_u64(&format!("{arch}.{key}"))? as usize)
}

/// `<arch>.block_count`, checked against the tensors the file holds (every layer has several), so that a corrupt
/// count is an error before anything is allocated per layer.
pub(crate) fn layer_count(g: &GgufFile, arch: &str) -> Result<usize> {
    let n = g.req_u64(&format!("{arch}.block_count"))?;
    if n > g.tensors.len() as u64 {
        bail!(
            "{}: {arch}.block_count is {n} but the file holds only {} tensors",
            g.path.display(),
            g.tensors.len()
        );
    }
    Ok(n as usize)
}
