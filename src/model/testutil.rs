//! Tiny random-weight GGUF models for tests: the same tensor names, metadata and tokenizer layout as the real files,
//! with dimensions small enough to run in milliseconds. Compiled only for tests (see `crate::testutil`).

use std::path::Path;

use crate::gguf::writer::GgufWriter;
use crate::gguf::{GgmlType, Value};
pub use crate::testutil::Rng;

/// Dimensions of a tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub ctx_len: usize,
    /// Weight type of the linear layers (F32, F16 or Q8_0).
    pub weight_type: GgmlType,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layers: 2,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_dim: 96,
            ctx_len: 512,
            weight_type: GgmlType::Q8_0,
            seed: 1,
        }
    }
}

/// Encodes f32 values in `ty` (F32, F16 or Q8_0, ggml's layouts).
pub fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(x.len() / 32 * 34);
            for b in x.chunks(32) {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            out
        }
        other => panic!("testutil cannot encode {other}"),
    }
}

/// GPT-2's byte → printable char map (what byte-level BPE vocabularies are written in).
pub fn byte_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    map
}

/// A byte-level BPE vocabulary: 256 byte tokens, a few merges, and two special tokens (ids 256, 257).
fn gpt2_vocab(w: &mut GgufWriter, pre: &str) -> usize {
    let map = byte_to_unicode();
    let mut tokens: Vec<String> = (0..256).map(|b| map[b].to_string()).collect();
    let mut types = vec![1i32; 256];
    tokens.push("<|endoftext|>".into());
    types.push(3);
    tokens.push("<|im_end|>".into());
    types.push(3);
    let sp = map[b' ' as usize];
    let merges = [
        format!("{sp} t"),
        "h e".into(),
        format!("{sp}t he"),
        "i n".into(),
    ];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    let n = tokens.len();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::String(pre.into()));
    w.meta(
        "tokenizer.ggml.tokens",
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    w.meta(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    w.meta(
        "tokenizer.ggml.merges",
        Value::Array(merges.into_iter().map(Value::String).collect()),
    );
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(256));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(257));
    w.meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    w.meta(
        "tokenizer.chat_template",
        Value::String("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
    );
    n
}

/// Writes a tiny Llama-architecture GGUF with random weights to `path`.
pub fn write_tiny_llama(path: &Path, s: &TinySpec) -> std::io::Result<()> {
    tiny_llama(s).write(path)
}

/// A tiny Llama-architecture GGUF with random weights, still open for changes (tests that build invalid files).
pub fn tiny_llama(s: &TinySpec) -> GgufWriter {
    llama_family(s, "llama", None)
}

/// A tiny Llama model in the shape of Llama 3.1+ files: `rope_freqs.weight` holds rope_dim/2 frequency factors made
/// as Meta's "llama3" RoPE scaling makes them (factor 8, low/high frequency factors 1 and 4, trained context 64, base
/// 10000), so at a tiny model's positions some pairs turn 8× slower, some not at all, and some in between.
pub fn tiny_llama3(s: &TinySpec) -> GgufWriter {
    let mut w = tiny_llama(s);
    w.tensor_f32(
        "rope_freqs.weight",
        &[(s.head_dim / 2) as u64],
        &llama3_freq_factors(s.head_dim, 10000.0, 8.0, 1.0, 4.0, 64.0),
    );
    w
}

/// Meta's "llama3" RoPE frequency factors (what llama.cpp's converter writes as `rope_freqs.weight`): 1 for
/// wavelengths under `orig / high`, `factor` for those over `orig / low`, a smooth blend between.
pub fn llama3_freq_factors(
    rope_dim: usize,
    base: f32,
    factor: f32,
    low: f32,
    high: f32,
    orig: f32,
) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf(2.0 * i as f32 / rope_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// RoPE scaling metadata for a tiny Qwen2 model: (type, factor, original context length).
pub type TinyRopeScaling = (&'static str, f32, u32);

/// Writes a tiny Qwen2-architecture GGUF with random weights to `path`: Llama blocks plus random Q/K/V biases
/// (`blk.i.attn_{q,k,v}.bias`, F32), the `qwen2` pre-tokenizer, and the RoPE scaling `rope_scaling` declares.
pub fn write_tiny_qwen2(
    path: &Path,
    s: &TinySpec,
    rope_scaling: Option<TinyRopeScaling>,
) -> std::io::Result<()> {
    llama_family(s, "qwen2", rope_scaling).write(path)
}

/// A tiny Qwen3-architecture GGUF with random weights: Llama blocks with per-head RMSNorm weights for queries and
/// keys (`blk.i.attn_{q,k}_norm`, head_dim each), no biases, `attention.key_length` given (choose a `head_dim` other
/// than dim / heads to exercise it, as the real Qwen3 files have), the `qwen2` pre-tokenizer.
pub fn tiny_qwen3(s: &TinySpec) -> GgufWriter {
    llama_family(s, "qwen3", None)
}

/// A tiny Mixtral-style GGUF with random weights: architecture "llama" with `n_expert` experts (feed_forward_length
/// wide) behind a router on every layer, `n_used` per token, as llama.cpp's converter writes Mixtral.
pub fn tiny_mixtral(s: &TinySpec, n_expert: usize, n_used: usize) -> GgufWriter {
    llama_family_moe(s, "llama", None, Some((n_expert, n_used, 0)))
}

/// A tiny Qwen2-MoE GGUF with random weights: Qwen2's biased projections, `n_expert` experts (`ffn_dim` wide) behind a
/// router, `n_used` per token, and a shared expert twice as wide with its sigmoid gate, an untied output head.
pub fn tiny_qwen2moe(s: &TinySpec, n_expert: usize, n_used: usize) -> GgufWriter {
    llama_family_moe(s, "qwen2moe", None, Some((n_expert, n_used, 2 * s.ffn_dim)))
}

/// A tiny OLMoE GGUF with random weights: input norms, RMSNorm over whole query and key rows, an untied output head,
/// and `n_expert` experts (feed_forward_length wide) behind a router, `n_used` per token.
pub fn tiny_olmoe(s: &TinySpec, n_expert: usize, n_used: usize) -> GgufWriter {
    llama_family_moe(s, "olmoe", None, Some((n_expert, n_used, 0)))
}

/// A tiny Qwen3-MoE GGUF with random weights: Qwen3's attention, and `n_expert` experts (`ffn_dim` wide) behind a
/// router on every layer, `n_used` per token.
pub fn tiny_qwen3moe(s: &TinySpec, n_expert: usize, n_used: usize) -> GgufWriter {
    llama_family_moe(s, "qwen3moe", None, Some((n_expert, n_used, 0)))
}

/// A tiny Granite-MoE GGUF with random weights: Granite's four multipliers `scales` (as [`tiny_granite`]), `n_expert`
/// experts (`ffn_dim` wide) behind a router, `n_used` per token, and with `shared` an ungated shared expert as wide.
pub fn tiny_granitemoe(
    s: &TinySpec,
    n_expert: usize,
    n_used: usize,
    scales: (f32, f32, f32, f32),
    shared: bool,
) -> GgufWriter {
    let sf = if shared { s.ffn_dim } else { 0 };
    let mut w = llama_family_moe(s, "granitemoe", None, Some((n_expert, n_used, sf)));
    granite_scales(&mut w, "granitemoe", scales);
    w
}

/// A tiny EXAONE-architecture GGUF with random weights: Llama blocks (NeoX RoPE in llama.cpp) and Llama 3.1-style
/// RoPE frequency factors (`rope_freqs.weight`, as [`tiny_llama3`]).
pub fn tiny_exaone(s: &TinySpec) -> GgufWriter {
    let mut w = llama_family(s, "exaone", None);
    w.tensor_f32(
        "rope_freqs.weight",
        &[(s.head_dim / 2) as u64],
        &llama3_freq_factors(s.head_dim, 10000.0, 8.0, 1.0, 4.0, 64.0),
    );
    w
}

/// A tiny Mistral-3-architecture GGUF with random weights: Llama blocks, YaRN ×`factor` from a trained `orig` tokens
/// with the YaRN keys Ministral 3's converter writes (β fast 32 and slow 1, log multiplier 1), and, with `temp`, the
/// attention temperature scale (queries scaled by position in steps of `orig`).
pub fn tiny_mistral3(s: &TinySpec, factor: f32, orig: u32, temp: Option<f32>) -> GgufWriter {
    mistral3(s, factor, orig, temp, None)
}

/// [`tiny_mistral3`] with `n_expert` experts (`ffn_dim` wide) behind a router on every layer, `n_used` per token.
pub fn tiny_mistral3_moe(
    s: &TinySpec,
    factor: f32,
    orig: u32,
    temp: Option<f32>,
    (n_expert, n_used): (usize, usize),
) -> GgufWriter {
    mistral3(s, factor, orig, temp, Some((n_expert, n_used, 0)))
}

fn mistral3(
    s: &TinySpec,
    factor: f32,
    orig: u32,
    temp: Option<f32>,
    moe: Option<(usize, usize, usize)>,
) -> GgufWriter {
    let mut w = llama_family_moe(s, "mistral3", Some(("yarn", factor, orig)), moe);
    for (k, v) in [
        ("rope.scaling.yarn_beta_fast", 32.0),
        ("rope.scaling.yarn_beta_slow", 1.0),
        ("rope.scaling.yarn_log_multiplier", 1.0),
    ] {
        w.meta(&format!("mistral3.{k}"), Value::F32(v));
    }
    if let Some(t) = temp {
        w.meta("mistral3.attention.temperature_scale", Value::F32(t));
    }
    w
}

/// A tiny ERNIE-4.5-architecture GGUF with random weights: Llama blocks.
pub fn tiny_ernie45(s: &TinySpec) -> GgufWriter {
    llama_family(s, "ernie4_5", None)
}

/// A tiny ERNIE-4.5-MoE GGUF with random weights: Llama blocks, layer 0 dense (twice `ffn_dim` wide), every later
/// layer `n_expert` experts (`ffn_dim` wide) behind a router whose choice takes a random per-expert bias
/// (`exp_probs_b.bias`), `n_used` per token, and an ungated shared expert `ffn_dim` wide.
pub fn tiny_ernie45moe(s: &TinySpec, n_expert: usize, n_used: usize) -> GgufWriter {
    llama_family_moe(s, "ernie4_5-moe", None, Some((n_expert, n_used, s.ffn_dim)))
}

/// A tiny SmolLM3-architecture GGUF with random weights: Llama blocks (llama.cpp leaves every 4th layer unrotated).
pub fn tiny_smollm3(s: &TinySpec) -> GgufWriter {
    llama_family(s, "smollm3", None)
}

/// A tiny Granite-architecture GGUF with random weights: Llama blocks, and the multipliers `(embedding, attention,
/// residual, logit)` in its metadata.
pub fn tiny_granite(s: &TinySpec, scales: (f32, f32, f32, f32)) -> GgufWriter {
    let mut w = llama_family(s, "granite", None);
    granite_scales(&mut w, "granite", scales);
    w
}

/// Granite's multipliers `(embedding, attention, residual, logit)` in `arch`'s metadata.
fn granite_scales(w: &mut GgufWriter, arch: &str, (e, a, r, l): (f32, f32, f32, f32)) {
    for (k, v) in [
        ("embedding_scale", e),
        ("attention.scale", a),
        ("residual_scale", r),
        ("logit_scale", l),
    ] {
        w.meta(&format!("{arch}.{k}"), Value::F32(v));
    }
}

/// A tiny Phi-3-architecture GGUF with random weights: Q/K/V fused in `blk.i.attn_qkv`, gate and up fused in
/// `blk.i.ffn_up`, an untied output head, RoPE over 3/4 of each head (as Phi-4-mini), and with `long_rope` = (original
/// context, attention factor) LongRoPE's two factor sets (`rope_factors_short`: gently rising from 1, `rope_factors_long`:
/// up to 16), `rope.scaling.original_context_length` and `rope.scaling.attn_factor`, as llama.cpp's converter writes
/// them for Phi-3 128K (and no scaling type or factor).
pub fn tiny_phi3(s: &TinySpec, long_rope: Option<(u32, f32)>) -> GgufWriter {
    let mut w = llama_family(s, "phi3", None);
    // Not "phi3" in the name: llama.cpp then looks up Phi-3's `<s>`/`</s>`/`<unk>` tokens, which this vocabulary lacks.
    w.set_meta("general.name", Value::String("tiny-p3".into()));
    let half = phi3_rope_dim(s.head_dim) / 2;
    if let Some((orig, attn_factor)) = long_rope {
        w.meta(
            "phi3.rope.scaling.original_context_length",
            Value::U32(orig),
        );
        w.meta("phi3.rope.scaling.attn_factor", Value::F32(attn_factor));
        let short: Vec<f32> = (0..half).map(|i| 1.0 + 0.15 * i as f32).collect();
        let long: Vec<f32> = (0..half)
            .map(|i| 16f32.powf(i as f32 / (half - 1).max(1) as f32))
            .collect();
        w.tensor_f32("rope_factors_short.weight", &[half as u64], &short);
        w.tensor_f32("rope_factors_long.weight", &[half as u64], &long);
    }
    w
}

/// A tiny OLMo-2-architecture GGUF with random weights: no input norms, RMSNorm weights on each block's output
/// (`post_attention_norm`, `post_ffw_norm`) and on whole query and key rows (`attn_q_norm`: heads·head_dim,
/// `attn_k_norm`: KV heads·head_dim), an untied output head. With `swa` = (window, per-layer flags) it is OLMo 3's
/// shape: `attention.sliding_window` and a bool-array `attention.sliding_window_pattern`, as llama.cpp's converter
/// writes them; `rope_scaling` as for Qwen2 (OLMo 3 declares YaRN, which its windowed layers do not take).
pub fn tiny_olmo2(
    s: &TinySpec,
    swa: Option<(u32, Vec<bool>)>,
    rope_scaling: Option<TinyRopeScaling>,
) -> GgufWriter {
    let mut w = llama_family(s, "olmo2", rope_scaling);
    if let Some((window, pattern)) = swa {
        w.meta("olmo2.attention.sliding_window", Value::U32(window));
        w.meta(
            "olmo2.attention.sliding_window_pattern",
            Value::Array(pattern.into_iter().map(Value::Bool).collect()),
        );
    }
    w
}

/// Rotated dimensions of a tiny Phi-3 head: 3/4 of it (Phi-4-mini's partial rotary factor), even.
fn phi3_rope_dim(head_dim: usize) -> usize {
    (head_dim * 3 / 4) & !1
}

/// `arch` "llama", "smollm3", "granite", "phi3" (fused projections, see [`tiny_phi3`]), "qwen2" (which adds biases and the qwen2 pre-tokenizer) or "qwen3" (QK-norm weights, head width
/// in the metadata, the qwen2 pre-tokenizer).
fn llama_family(s: &TinySpec, arch: &str, rope_scaling: Option<TinyRopeScaling>) -> GgufWriter {
    llama_family_moe(s, arch, rope_scaling, None)
}

/// [`llama_family`] with `moe` = (experts, experts per token): a router (`ffn_gate_inp`, F32) and 3-D expert tensors
/// (`ffn_{gate,up,down}_exps`, `ffn_dim` wide each) in place of the dense feed-forward, and the expert metadata.
fn llama_family_moe(
    s: &TinySpec,
    arch: &str,
    rope_scaling: Option<TinyRopeScaling>,
    moe: Option<(usize, usize, usize)>,
) -> GgufWriter {
    let qwen2 = arch == "qwen2" || arch == "qwen2moe";
    let qwen3 = arch == "qwen3" || arch == "qwen3moe";
    // Qwen2-MoE's shared expert, twice as wide as the routed ones.
    let shared_ff = moe.map_or(0, |m| m.2);
    let phi3 = arch == "phi3";
    let olmo2 = arch == "olmo2";
    let olmoe = arch == "olmoe";
    // ERNIE 4.5 MoE: layer 0 dense and twice as wide as an expert.
    let ernie_moe = arch == "ernie4_5-moe";
    let mut w = GgufWriter::new();
    let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut bias_rng = Rng(s.seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
    let mut moe_rng = Rng(s.seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1);
    let a = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", Value::String(arch.into()));
    w.meta("general.name", Value::String(format!("tiny-{arch}")));
    w.meta(&a("block_count"), Value::U32(s.n_layers as u32));
    w.meta(&a("context_length"), Value::U32(s.ctx_len as u32));
    w.meta(&a("embedding_length"), Value::U32(s.dim as u32));
    let dense_ff = if ernie_moe { 2 * s.ffn_dim } else { s.ffn_dim };
    w.meta(&a("feed_forward_length"), Value::U32(dense_ff as u32));
    w.meta(&a("attention.head_count"), Value::U32(s.n_heads as u32));
    w.meta(
        &a("attention.head_count_kv"),
        Value::U32(s.n_kv_heads as u32),
    );
    w.meta(&a("rope.freq_base"), Value::F32(10000.0));
    w.meta(&a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    let rope_dim = if phi3 {
        phi3_rope_dim(s.head_dim)
    } else {
        s.head_dim
    };
    w.meta(&a("rope.dimension_count"), Value::U32(rope_dim as u32));
    if qwen3 {
        w.meta(&a("attention.key_length"), Value::U32(s.head_dim as u32));
        w.meta(&a("attention.value_length"), Value::U32(s.head_dim as u32));
    }
    if let Some((ne, k, _)) = moe {
        w.meta(&a("expert_count"), Value::U32(ne as u32));
        w.meta(&a("expert_used_count"), Value::U32(k as u32));
        if ernie_moe {
            w.meta(&a("leading_dense_block_count"), Value::U32(1));
            w.meta(&a("interleave_moe_layer_step"), Value::U32(1));
        }
        if arch == "qwen3moe" || arch == "qwen2moe" || ernie_moe {
            w.meta(
                &a("expert_feed_forward_length"),
                Value::U32(s.ffn_dim as u32),
            );
        }
        if shared_ff > 0 {
            w.meta(
                &a("expert_shared_feed_forward_length"),
                Value::U32(shared_ff as u32),
            );
        }
    }
    if let Some((ty, factor, orig)) = rope_scaling {
        w.meta(&a("rope.scaling.type"), Value::String(ty.into()));
        w.meta(&a("rope.scaling.factor"), Value::F32(factor));
        w.meta(&a("rope.scaling.original_context_length"), Value::U32(orig));
    }
    let vocab = gpt2_vocab(&mut w, if qwen2 || qwen3 { "qwen2" } else { "smollm" });
    let (d, hd, f) = (s.dim, s.head_dim, s.ffn_dim);
    let wt = s.weight_type;
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let x = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt() * 1.7);
        w.tensor(name, &[cols as u64, rows as u64], ty, encode(ty, &x));
    };
    mat(&mut w, "token_embd.weight", vocab, d, GgmlType::Q8_0);
    for i in 0..s.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        if phi3 {
            mat(
                &mut w,
                &n("attn_qkv"),
                (s.n_heads + 2 * s.n_kv_heads) * hd,
                d,
                wt,
            );
        } else {
            mat(&mut w, &n("attn_q"), s.n_heads * hd, d, wt);
            mat(&mut w, &n("attn_k"), s.n_kv_heads * hd, d, wt);
            mat(&mut w, &n("attn_v"), s.n_kv_heads * hd, d, wt);
        }
        if qwen2 {
            // Biases as large as the projections' outputs, so that they matter.
            for (what, len) in [
                ("attn_q", s.n_heads * hd),
                ("attn_k", s.n_kv_heads * hd),
                ("attn_v", s.n_kv_heads * hd),
            ] {
                let b = bias_rng.vec(len, 1.0);
                w.tensor_f32(&format!("blk.{i}.{what}.bias"), &[len as u64], &b);
            }
        }
        if qwen3 || olmo2 || olmoe {
            // Per-channel weights far from 1, different for queries and keys, so a norm applied wrongly shows
            // (OLMo 2's span all heads of a row).
            for (what, k, heads) in [
                ("attn_q_norm", 3, s.n_heads),
                ("attn_k_norm", 5, s.n_kv_heads),
            ] {
                let len = if olmo2 || olmoe { heads * hd } else { hd };
                let g: Vec<f32> = (0..len)
                    .map(|j| 0.5 + ((j * k + i) % 11) as f32 / 10.0)
                    .collect();
                w.tensor_f32(&n(what), &[len as u64], &g);
            }
        }
        mat(&mut w, &n("attn_output"), d, s.n_heads * hd, wt);
        let layer_moe = moe.filter(|_| !(ernie_moe && i == 0));
        if let Some((ne, _, _)) = layer_moe {
            // The router's scores far apart enough that rounding does not reorder a token's experts.
            let r = moe_rng.vec(ne * d, 4.0 / (d as f32).sqrt());
            w.tensor_f32(&n("ffn_gate_inp"), &[d as u64, ne as u64], &r);
            if ernie_moe {
                // As large as the probabilities it is added to, so that it changes which experts are chosen.
                let b = moe_rng.vec(ne, 0.3);
                w.tensor_f32(&format!("blk.{i}.exp_probs_b.bias"), &[ne as u64], &b);
            }
            for (what, rows, cols) in [
                ("ffn_gate_exps", f, d),
                ("ffn_up_exps", f, d),
                ("ffn_down_exps", d, f),
            ] {
                let x = moe_rng.vec(ne * rows * cols, 1.0 / (cols as f32).sqrt() * 1.7);
                w.tensor(
                    &n(what),
                    &[cols as u64, rows as u64, ne as u64],
                    wt,
                    encode(wt, &x),
                );
            }
            if shared_ff > 0 {
                let sf = shared_ff;
                if arch == "qwen2moe" {
                    let g = moe_rng.vec(d, 2.0 / (d as f32).sqrt());
                    w.tensor_f32(&n("ffn_gate_inp_shexp"), &[d as u64], &g);
                }
                for (what, rows, cols) in [
                    ("ffn_gate_shexp", sf, d),
                    ("ffn_up_shexp", sf, d),
                    ("ffn_down_shexp", d, sf),
                ] {
                    let x = moe_rng.vec(rows * cols, 1.0 / (cols as f32).sqrt() * 1.7);
                    w.tensor(&n(what), &[cols as u64, rows as u64], wt, encode(wt, &x));
                }
            }
        } else if phi3 {
            mat(&mut w, &n("ffn_up"), 2 * f, d, wt);
        } else {
            mat(&mut w, &n("ffn_gate"), dense_ff, d, wt);
            mat(&mut w, &n("ffn_up"), dense_ff, d, wt);
        }
        if layer_moe.is_none() {
            mat(&mut w, &n("ffn_down"), d, dense_ff, wt);
        }
        let ones: Vec<f32> = (0..d)
            .map(|j| 1.0 + 0.1 * ((j % 7) as f32 - 3.0) / 3.0)
            .collect();
        if olmo2 {
            let post: Vec<f32> = (0..d)
                .map(|j| 0.6 + ((j * 7 + i) % 9) as f32 / 10.0)
                .collect();
            w.tensor_f32(&n("post_attention_norm"), &[d as u64], &ones);
            w.tensor_f32(&n("post_ffw_norm"), &[d as u64], &post);
        } else {
            w.tensor_f32(&n("attn_norm"), &[d as u64], &ones);
            w.tensor_f32(&n("ffn_norm"), &[d as u64], &ones);
        }
    }
    w.tensor_f32("output_norm.weight", &[d as u64], &vec![1.0; d]);
    if phi3 || olmo2 || olmoe || arch == "qwen2moe" {
        mat(&mut w, "output.weight", vocab, d, GgmlType::Q8_0);
    }
    w
}

/// Writes a tiny Gemma-3-architecture GGUF with random weights (sliding window `window` on 5 of 6 layers).
pub fn write_tiny_gemma3(path: &Path, s: &TinySpec, window: u32) -> std::io::Result<()> {
    tiny_gemma3(s, window).write(path)
}

/// A tiny Gemma-3-architecture GGUF with random weights, still open for changes.
pub fn tiny_gemma3(s: &TinySpec, window: u32) -> GgufWriter {
    gemma_family(s, "gemma3", window, None)
}

/// A tiny Gemma-1-architecture GGUF with random weights: Gemma 3's blocks without QK-norm, post-norms or windows, RoPE
/// base 10000 (written, as llama.cpp's converter writes it).
pub fn tiny_gemma1(s: &TinySpec) -> GgufWriter {
    gemma_family(s, "gemma", 0, None)
}

/// A tiny Gemma-2-architecture GGUF with random weights: no QK-norm, one RoPE base, every other layer local with
/// window `window`, and the attention and final logit soft-caps `softcaps` (small ones make them matter here).
pub fn tiny_gemma2(s: &TinySpec, window: u32, softcaps: (f32, f32)) -> GgufWriter {
    gemma_family(s, "gemma2", window, Some(softcaps))
}

/// Gemma 3, Gemma 2 with its soft-caps, or Gemma 1 (`arch` "gemma": `window` unused).
fn gemma_family(s: &TinySpec, arch: &str, window: u32, gemma2: Option<(f32, f32)>) -> GgufWriter {
    let gemma1 = arch == "gemma";
    let mut w = GgufWriter::new();
    let mut rng = Rng(s.seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
    let a = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", Value::String(arch.into()));
    w.meta("general.name", Value::String(format!("tiny-{arch}")));
    w.meta(&a("block_count"), Value::U32(s.n_layers as u32));
    w.meta(&a("context_length"), Value::U32(s.ctx_len as u32));
    w.meta(&a("embedding_length"), Value::U32(s.dim as u32));
    w.meta(&a("feed_forward_length"), Value::U32(s.ffn_dim as u32));
    w.meta(&a("attention.head_count"), Value::U32(s.n_heads as u32));
    w.meta(
        &a("attention.head_count_kv"),
        Value::U32(s.n_kv_heads as u32),
    );
    w.meta(&a("attention.key_length"), Value::U32(s.head_dim as u32));
    w.meta(&a("attention.value_length"), Value::U32(s.head_dim as u32));
    if !gemma1 {
        w.meta(&a("attention.sliding_window"), Value::U32(window));
    }
    match gemma2 {
        Some((attn, fin)) => {
            w.meta(&a("rope.freq_base"), Value::F32(10_000.0));
            w.meta(&a("attn_logit_softcapping"), Value::F32(attn));
            w.meta(&a("final_logit_softcapping"), Value::F32(fin));
        }
        None if gemma1 => {
            w.meta(&a("rope.freq_base"), Value::F32(10_000.0));
        }
        None => {
            w.meta(&a("rope.freq_base"), Value::F32(1_000_000.0));
        }
    }
    w.meta(&a("attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
    let vocab = gpt2_vocab(&mut w, "smollm");
    let (d, hd, f) = (s.dim, s.head_dim, s.ffn_dim);
    let wt = s.weight_type;
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let x = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt() * 1.7);
        w.tensor(name, &[cols as u64, rows as u64], ty, encode(ty, &x));
    };
    mat(&mut w, "token_embd.weight", vocab, d, GgmlType::Q8_0);
    for i in 0..s.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        mat(&mut w, &n("attn_q"), s.n_heads * hd, d, wt);
        mat(&mut w, &n("attn_k"), s.n_kv_heads * hd, d, wt);
        mat(&mut w, &n("attn_v"), s.n_kv_heads * hd, d, wt);
        mat(&mut w, &n("attn_output"), d, s.n_heads * hd, wt);
        mat(&mut w, &n("ffn_gate"), f, d, wt);
        mat(&mut w, &n("ffn_up"), f, d, wt);
        mat(&mut w, &n("ffn_down"), d, f, wt);
        let ones = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|j| 1.0 + 0.1 * ((j % 5) as f32 - 2.0) / 2.0)
                .collect()
        };
        let norms: &[&str] = if gemma1 {
            &["attn_norm", "ffn_norm"]
        } else {
            &[
                "attn_norm",
                "post_attention_norm",
                "ffn_norm",
                "post_ffw_norm",
            ]
        };
        for norm in norms {
            w.tensor_f32(&n(norm), &[d as u64], &ones(d));
        }
        if gemma2.is_none() && !gemma1 {
            w.tensor_f32(&n("attn_q_norm"), &[hd as u64], &ones(hd));
            w.tensor_f32(&n("attn_k_norm"), &[hd as u64], &ones(hd));
        }
    }
    w.tensor_f32("output_norm.weight", &[d as u64], &vec![1.0; d]);
    w
}
