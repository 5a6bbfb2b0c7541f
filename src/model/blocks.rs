//! What the forward passes are built from: the blocks of a decoder layer and the element-wise ops under them.
//!
//! The blocks (candle-transformers style: weights plus a forward of a few lines) are the token embedding, the
//! attention block (Q/K/V projections with optional biases, optional QK-norm, RoPE, KV-cache append, attention, output
//! projection), the gated feed-forward block with its activation as a parameter, and the output head. Each
//! architecture file composes them in its own order, with its own norms around them.
//!
//! Blocks work in the pass's [`Scratch`] (n = rows of the pass: one sequence's chunk, or the rows of several
//! sequences one after another, see [`SeqStep`]): `x` (n × dim) is the residual stream; a block reads its normed input
//! from `xb` (n × dim) and leaves its output in `xo` (n × dim) for the caller to add to `x`. Only attention tells the
//! sequences apart.

use anyhow::Result;

use super::{
    batch_rows, load_matrix, load_matrix_parts, load_vector, ModelConfig, RopeStyle, Scratch,
    SelectCx, SeqStep,
};
use smallvec::SmallVec;

use crate::attention::{
    attend, attend_batch, attend_selected, attend_tiles, AttnJob, AttnParams, AttnScratch, Sel,
};
use crate::gguf::GgufFile;
use crate::kernels::prof::{scope, Phase};
use crate::kernels::team::for_each_chunk_mut;
use crate::kernels::{gate_mul, matmul, matmul_many, par_rows, MatmulScratch, QMatrix};
pub use crate::kernels::{gelu_tanh, silu, GateAct};
use crate::kv::WINDOW_STEP;

/// Name of layer `i`'s weight `what` in a llama.cpp GGUF.
fn layer_tensor(i: usize, what: &str) -> String {
    format!("blk.{i}.{what}.weight")
}

// ---------------------------------------------------------------------------------------------------------------------
// Blocks

/// Starts a pass: checks that its rows fit the scratch, warns once past the trained context, and fills
/// x (n × dim, sequence after sequence) with the tokens' embedding rows times `c.embed_scale`. Returns n.
pub(crate) fn embed(
    tok_embd: &QMatrix,
    c: &ModelConfig,
    seqs: &[SeqStep<'_>],
    s: &mut Scratch,
) -> usize {
    let _p = scope(Phase::Embed);
    let (n, dim) = (batch_rows(seqs), c.dim);
    assert!(
        n <= s.cap,
        "chunk of {n} tokens exceeds scratch capacity {}",
        s.cap
    );
    let tokens = seqs.iter().flat_map(|q| q.tokens);
    for (row, &tok) in s.x[..n * dim].chunks_exact_mut(dim).zip(tokens) {
        tok_embd.dequantize_row(tok as usize, row);
        if c.embed_scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= c.embed_scale);
        }
    }
    for q in seqs {
        warn_past_context(q.pos, c.ctx_len);
    }
    n
}

/// Fills rows of a RoPE table pair (n × rope_dim/2 each) sequence by sequence: `fill(pos, cos, sin)` writes the rows
/// of one sequence's positions.
pub(crate) fn rope_rows(
    seqs: &[SeqStep<'_>],
    half: usize,
    cos: &mut [f32],
    sin: &mut [f32],
    mut fill: impl FnMut(&[u32], &mut [f32], &mut [f32]),
) {
    let mut r0 = 0;
    for q in seqs {
        let r1 = r0 + q.pos.len();
        fill(
            q.pos,
            &mut cos[r0 * half..r1 * half],
            &mut sin[r0 * half..r1 * half],
        );
        r0 = r1;
    }
}

/// xb (n × dim) ← RMSNorm(x) ⊙ w: the input of a block.
pub(crate) fn norm_input(s: &mut Scratch, n: usize, w: &[f32], eps: f32) {
    let _p = scope(Phase::Norm);
    let dim = w.len();
    let x = &s.x[..n * dim];
    par_rows(&mut s.xb[..n * dim], dim, |r0, out| {
        rmsnorm(out, &x[r0 * dim..][..out.len()], w, eps)
    });
}

/// xb (n × dim) ← RMSNorm(x) ⊙ w with a norm weight, else x itself (OLMo 2's blocks read the residual stream
/// unnormalized).
pub(crate) fn block_input(s: &mut Scratch, n: usize, dim: usize, w: Option<&[f32]>, eps: f32) {
    match w {
        Some(w) => norm_input(s, n, w, eps),
        None => s.xb[..n * dim].copy_from_slice(&s.x[..n * dim]),
    }
}

/// xo (n × dim) ← RMSNorm(xo) ⊙ w: a norm of a block's output before it joins the residual stream (Gemma's and
/// OLMo 2's post-norms).
pub(crate) fn post_norm(s: &mut Scratch, n: usize, w: &[f32], eps: f32) {
    let _p = scope(Phase::Norm);
    let dim = w.len();
    par_rows(&mut s.xo[..n * dim], dim, |_, xo| {
        rmsnorm_inplace(xo, w, eps)
    });
}

/// x (n × dim) += residual_scale · xo: a block's output joins the residual stream.
pub(crate) fn add_residual(c: &ModelConfig, s: &mut Scratch, n: usize) {
    let _p = scope(Phase::Residual);
    let dim = c.dim;
    let xo = &s.xo[..n * dim];
    let scale = c.residual_scale;
    // 1 · b is b exactly: a scale of 1 (every model but Granite) changes no bit.
    par_rows(&mut s.x[..n * dim], dim, |r0, x| {
        for (a, b) in x.iter_mut().zip(&xo[r0 * dim..]) {
            *a += scale * b;
        }
    });
}

/// Self-attention of one layer: grouped-query attention over the KV cache, with optional Q/K/V biases and per-head
/// QK-norm.
pub struct Attention {
    pub wq: QMatrix, // n_heads·hd × dim
    pub wk: QMatrix, // n_kv·hd × dim
    pub wv: QMatrix, // n_kv·hd × dim
    pub wo: QMatrix, // dim × n_heads·hd
    /// RMSNorm weights (hd each) applied to every query head and every key head before RoPE (Gemma 3's QK-norm);
    /// None = no QK-norm (Llama).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Biases added to the Q, K and V projections (n_heads·hd, n_kv·hd, n_kv·hd; Qwen2 has all three), each
    /// present only when the GGUF holds `blk.i.attn_{q,k,v}.bias`.
    pub qkv_bias: [Option<Vec<f32>>; 3],
    /// Whether queries and keys are rotated: false on SmolLM3's NoPE layers (every 4th).
    pub rope: bool,
}

impl Attention {
    /// Layer `i`'s attention weights (`blk.i.attn_*`), with the QK-norm weights when `qk_norm` and whichever
    /// Q/K/V biases the file holds.
    pub(crate) fn load(g: &GgufFile, i: usize, c: &ModelConfig, qk_norm: bool) -> Result<Self> {
        let (dim, hd) = (c.dim, c.head_dim_k);
        let (qd, kvd) = (c.n_heads * hd, c.n_kv_heads * hd);
        let n = |what: &str| layer_tensor(i, what);
        let bias = |what: &str, len: usize| -> Result<Option<Vec<f32>>> {
            let name = format!("blk.{i}.{what}.bias");
            match g.tensor_info(&name) {
                Some(_) => load_vector(g, &name, len).map(Some),
                None => Ok(None),
            }
        };
        Ok(Self {
            qkv_bias: [
                bias("attn_q", qd)?,
                bias("attn_k", kvd)?,
                bias("attn_v", kvd)?,
            ],
            wq: load_matrix(g, &n("attn_q"), qd, dim)?,
            wk: load_matrix(g, &n("attn_k"), kvd, dim)?,
            wv: load_matrix(g, &n("attn_v"), kvd, dim)?,
            qk_norm: if qk_norm {
                Some((
                    load_vector(g, &n("attn_q_norm"), hd)?,
                    load_vector(g, &n("attn_k_norm"), hd)?,
                ))
            } else {
                None
            },
            wo: load_matrix(g, &n("attn_output"), dim, qd)?,
            rope: true,
        })
    }

    /// Layer `i`'s attention weights with Q, K and V fused in one matrix (`blk.i.attn_qkv`, Q rows first, then K,
    /// then V: Phi-3), cut into the three, and its fused bias (`attn_qkv.bias`) likewise where the file has one.
    /// A file with separate `attn_q`/`attn_k`/`attn_v` loads as [`Attention::load`] does (llama.cpp takes either).
    pub(crate) fn load_fused(g: &GgufFile, i: usize, c: &ModelConfig) -> Result<Self> {
        let fused = layer_tensor(i, "attn_qkv");
        if g.tensor_info(&fused).is_none() {
            return Self::load(g, i, c, false);
        }
        let (dim, hd) = (c.dim, c.head_dim_k);
        let parts = [c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd];
        let [wq, wk, wv]: [QMatrix; 3] = load_matrix_parts(g, &fused, dim, &parts)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("three parts"))?;
        let bias_name = format!("blk.{i}.attn_qkv.bias");
        let qkv_bias = match g.tensor_info(&bias_name) {
            Some(_) => {
                let b = load_vector(g, &bias_name, parts.iter().sum())?;
                let (bq, rest) = b.split_at(parts[0]);
                let (bk, bv) = rest.split_at(parts[1]);
                [Some(bq.to_vec()), Some(bk.to_vec()), Some(bv.to_vec())]
            }
            None => [None, None, None],
        };
        Ok(Self {
            wq,
            wk,
            wv,
            wo: load_matrix(g, &layer_tensor(i, "attn_output"), dim, parts[0])?,
            qk_norm: None,
            qkv_bias,
            rope: true,
        })
    }

    /// Bytes of the projection matrices and their biases.
    pub(crate) fn n_bytes(&self) -> usize {
        let biases: usize = self.qkv_bias.iter().flatten().map(|b| 4 * b.len()).sum();
        [&self.wq, &self.wk, &self.wv, &self.wo]
            .iter()
            .map(|m| m.n_bytes())
            .sum::<usize>()
            + biases
    }

    /// xo ← Wo · attention(RoPE(Wq·xb), RoPE(Wk·xb), Wv·xb) for the pass's rows (sequence after sequence, as
    /// `seqs` lists them): the projections run over every row at once; each sequence's rows append their keys and
    /// values to its own cache (layer `layer`) and attend over it alone. A `local` layer rotates with the local RoPE
    /// table and sees only `c.sliding_window` positions back; each sequence's query rows are recorded in its state for
    /// KV-compression methods; query heads its `head_mask` marks contribute nothing.
    pub(crate) fn forward(
        &self,
        c: &ModelConfig,
        layer: usize,
        local: bool,
        seqs: &mut [SeqStep<'_>],
        s: &mut Scratch,
    ) {
        let n = batch_rows(seqs);
        let (dim, hd, nh, nkv) = (c.dim, c.head_dim_k, c.n_heads, c.n_kv_heads);
        let half = c.rope_dim / 2;
        let (q, k, v) = (
            &mut s.q[..n * nh * hd],  // n × nh·hd
            &mut s.k[..n * nkv * hd], // n × nkv·hd
            &mut s.v[..n * nkv * hd], // n × nkv·hd
        );
        let xb = &s.xb[..n * dim]; // n × dim
        for seq in seqs.iter().filter(|q| q.tokens.len() == 1) {
            seq.cache.prefetch_append(layer);
        }
        let p = scope(Phase::Qkv);
        matmul_many(
            &[&self.wq, &self.wk, &self.wv],
            xb,
            n,
            &mut [&mut *q, &mut *k, &mut *v],
            &mut s.mm,
        );
        drop(p);
        let p = scope(Phase::Rope);
        // cos, sin: n × rope_dim/2 each.
        let (cos, sin) = if local {
            (&s.rope_cos_local[..n * half], &s.rope_sin_local[..n * half])
        } else {
            (&s.rope_cos[..n * half], &s.rope_sin[..n * half])
        };
        // Each token row on its own: + bias, QK-norm, RoPE for Q and K, + bias for V (split over the pool for a
        // prefill chunk).
        let norms = self.qk_norm.as_ref().map(|(qn, kn)| [qn, kn]);
        // Each query row's temperature factor (Mistral 3), after RoPE.
        let temp = c.attn_temp.map(|_| &s.q_temp[..n]);
        for (i, (out, heads)) in [(&mut *q, nh), (&mut *k, nkv)].into_iter().enumerate() {
            let (bias, norm) = (self.qkv_bias[i].as_deref(), norms.map(|n| n[i]));
            let temp = temp.filter(|_| i == 0);
            par_rows(out, heads * hd, |t0, rows| {
                if let Some(b) = bias {
                    add_bias(rows, b);
                }
                if let Some(w) = norm {
                    rmsnorm_inplace(rows, w, c.rms_eps);
                }
                let nt = rows.len() / (heads * hd);
                let (cos, sin) = (
                    &cos[t0 * half..][..nt * half],
                    &sin[t0 * half..][..nt * half],
                );
                if self.rope {
                    apply_rope(rows, heads, hd, c.rope_style, cos, sin, c.rope_dim);
                }
                if let Some(f) = temp {
                    scale_rows(rows, heads * hd, &f[t0..t0 + nt]);
                }
            });
        }
        if let Some(b) = self.qkv_bias[2].as_deref() {
            par_rows(v, nkv * hd, |_, rows| add_bias(rows, b));
        }
        drop(p);
        let params = AttnParams {
            n_q_heads: nh,
            scale: c.attn_scale,
            window: if local { c.sliding_window } else { None },
            softcap: c.attn_softcap,
        };
        let (qr, kr) = (nh * hd, nkv * hd); // floats per row of q, and of k and v
        let q = &*q;
        // A sequence whose step is one attention call (a decode step, or a chunk no window splits and no sparse
        // prefill reads) appends and selects here, and attends in one call with the others (one pass over the pool
        // for the batch); any other runs its own calls now.
        let rows: SmallVec<[(usize, usize); 16]> = seqs
            .iter()
            .scan(0, |r0, seq| {
                let r = (*r0, *r0 + seq.pos.len());
                *r0 = r.1;
                Some(r)
            })
            .collect(); // each sequence's rows [r0, r1) of the pass
        let one: SmallVec<[bool; 16]> = seqs
            .iter()
            .map(|seq| one_call(&params, local, seq))
            .collect();
        // Their queries recorded and keys and values appended, sequences split over the pool: each writes only its
        // own cache, and a decode step's append is a few scattered stores whose misses (and, a block in 32, a
        // quantization) would otherwise keep one thread busy while the others wait (`bench batch --streams 8 --kv
        // kivi4`, 2 threads: 2.2-2.7 -> 1.4-1.8 ms of appends per step). The profile's kv-append is this region's
        // wall time; a quantization inside it is counted on each thread that runs one.
        let append = |i: usize, seq: &mut SeqStep<'_>| {
            let (r0, r1) = rows[i];
            if one[i] {
                seq.state.obs.record(layer, &q[r0 * qr..r1 * qr], seq.pos);
                seq.cache
                    .append(layer, seq.pos, &k[r0 * kr..r1 * kr], &v[r0 * kr..r1 * kr]);
            }
        };
        {
            let _p = scope(Phase::KvAppend);
            if one.iter().filter(|&&o| o).count() > 1 {
                for_each_chunk_mut(seqs, 1, |i, seq| append(i, &mut seq[0]));
            } else {
                seqs.iter_mut()
                    .enumerate()
                    .for_each(|(i, seq)| append(i, seq));
            }
        }
        let mut batched: SmallVec<[(usize, bool); 16]> = SmallVec::new(); // (sequence, with a selection)
        for (i, seq) in seqs.iter_mut().enumerate() {
            let (r0, r1) = rows[i];
            let qs = &q[r0 * qr..r1 * qr];
            if one[i] {
                batched.push((i, select_call(layer, local, &params, seq, qs)));
            } else {
                attend_seq(
                    layer,
                    local,
                    &params,
                    seq,
                    qs,
                    &k[r0 * kr..r1 * kr],
                    &v[r0 * kr..r1 * kr],
                    &mut s.att[r0 * qr..r1 * qr],
                    &mut s.attn,
                );
            }
        }
        if !batched.is_empty() {
            let _p = scope(Phase::Attention);
            let t0 = std::time::Instant::now();
            {
                let mut jobs: SmallVec<[AttnJob; 16]> = SmallVec::new();
                let (mut rest, mut at) = (&mut s.att[..n * qr], 0); // `rest` starts at row `at`
                let (mut r0, mut next) = (0, batched.iter().peekable());
                for (i, seq) in seqs.iter().enumerate() {
                    let r1 = r0 + seq.pos.len();
                    if let Some(&(_, selected)) = next.next_if(|&&(j, _)| j == i) {
                        let tail = std::mem::take(&mut rest).split_at_mut((r0 - at) * qr).1;
                        let (out, tail) = tail.split_at_mut((r1 - r0) * qr);
                        (rest, at) = (tail, r1);
                        jobs.push(AttnJob {
                            cache: &*seq.cache,
                            q: &q[r0 * qr..r1 * qr],
                            q_pos: seq.pos,
                            out,
                            sel: if selected {
                                Sel::Heads(&seq.state.sel)
                            } else {
                                Sel::All
                            },
                        });
                    }
                    r0 = r1;
                }
                attend_batch(&mut jobs, layer, &params, &mut s.attn);
            }
            // The call's time, shared evenly among its sequences.
            let ns = t0.elapsed().as_nanos() as u64 / batched.len() as u64;
            for &(i, _) in &batched {
                seqs[i].state.attn_ns += ns;
            }
        }
        // Offload: a prompt chunk's blocks go to disk as each layer is done with them, so RAM holds the resident
        // limit plus one layer's new blocks, not the whole chunk's (a decode step rebalances after the step).
        for seq in seqs.iter_mut().filter(|q| q.pos.len() > 1) {
            seq.cache.spill_to_limit();
        }
        let mut r0 = 0;
        for seq in seqs.iter() {
            let r1 = r0 + seq.pos.len();
            mask_heads(
                &mut s.att[r0 * qr..r1 * qr],
                nh,
                hd,
                &seq.state.head_mask,
                layer,
            );
            r0 = r1;
        }
        let _p = scope(Phase::Wo);
        matmul(
            &self.wo,
            &s.att[..n * qr],
            n,
            &mut s.xo[..n * dim],
            &mut s.mm,
        ); // xo: n × dim
    }
}

/// Whether a sequence's step is one attention call over whole or selected blocks, attended with the others through
/// [`attend_batch`] after its queries are recorded, its keys and values appended and its selector run
/// ([`select_call`]); false: a window splits the chunk, or a sparse prefill method may read it, and the step goes
/// through [`attend_seq`].
fn one_call(params: &AttnParams, local: bool, seq: &SeqStep<'_>) -> bool {
    let n = seq.pos.len();
    !((params.window.is_some() && n > WINDOW_STEP)
        || (n > 1 && !local && seq.state.prefill.is_some()))
}

/// Runs the selector of a [`one_call`] sequence whose keys and values for this step are in its cache (`q`: its
/// queries), timed into its attention time, and returns whether it selected.
fn select_call(
    layer: usize,
    local: bool,
    params: &AttnParams,
    seq: &mut SeqStep<'_>,
    q: &[f32],
) -> bool {
    let (cache, st) = (&*seq.cache, &mut *seq.state);
    let _p = scope(Phase::Attention);
    let t0 = std::time::Instant::now();
    let cx = SelectCx {
        cache,
        layer,
        q,
        pos: seq.pos,
        n_q_heads: params.n_q_heads,
        local,
    };
    let selected = {
        let _s = scope(Phase::Select);
        st.selector
            .as_mut()
            .is_some_and(|sel| sel.select(&cx, &mut st.sel))
    };
    st.attn_ns += t0.elapsed().as_nanos() as u64;
    selected
}

/// One sequence's attention in a layer: records its queries `q` (its rows × nh·hd, after RoPE), appends its keys and
/// values `k`, `v` (rows × nkv·hd) to its cache and writes the attention output of its rows into `att`.
#[allow(clippy::too_many_arguments)] // the sequence, its three projections, the output and the shared buffers
fn attend_seq(
    layer: usize,
    local: bool,
    params: &AttnParams,
    seq: &mut SeqStep<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let (n, pos) = (seq.pos.len(), seq.pos);
    let (qr, kr) = (q.len() / n, k.len() / n);
    let (cache, st) = (&mut *seq.cache, &mut *seq.state);
    st.obs.record(layer, q, pos);
    // A sliding-window layer takes the chunk WINDOW_STEP tokens at a time (append, attend), so a cache that keeps
    // only the window never holds more than the window and one step, whatever the chunk. (A cache that keeps
    // every entry takes the same steps: both then add up the same partial sums, bit for bit.)
    let step = if params.window.is_some() {
        WINDOW_STEP
    } else {
        n
    };
    let mut a = 0;
    while a < n {
        let b = (a + step).min(n);
        let (q, pos) = (&q[a * qr..b * qr], &pos[a..b]); // (b − a) × nh·hd
        {
            let _p = scope(Phase::KvAppend);
            cache.append(layer, pos, &k[a * kr..b * kr], &v[a * kr..b * kr]);
        }
        let _p = scope(Phase::Attention);
        let att = &mut att[a * qr..b * qr]; // (b − a) × nh·hd
        let t0 = std::time::Instant::now();
        let cx = SelectCx {
            cache,
            layer,
            q,
            pos,
            n_q_heads: params.n_q_heads,
            local,
        };
        // A sparse prefill method may give each query tile its own key ranges (prefill chunks of global layers).
        let prefill = b - a > 1 && !local && st.prefill.is_some();
        let sparse = prefill
            && st
                .prefill
                .as_mut()
                .is_some_and(|pf| pf.pattern(&cx, &mut st.tsel));
        if prefill {
            for h in 0..cache.cfg.n_kv_heads {
                let (got, dense) = if sparse {
                    st.tsel.pairs(h, pos)
                } else {
                    let d = pos.iter().map(|&p| p as u64 + 1).sum();
                    (d, d)
                };
                st.prefill_pairs[0] += got;
                st.prefill_pairs[1] += dense;
            }
        }
        // A selector may restrict what each KV head reads (decode); otherwise the whole cache is read.
        let selected = !sparse && {
            let _s = scope(Phase::Select);
            st.selector
                .as_mut()
                .is_some_and(|sel| sel.select(&cx, &mut st.sel))
        };
        if sparse {
            attend_tiles(cache, layer, q, pos, att, params, &st.tsel, scratch);
        } else if selected {
            attend_selected(cache, layer, q, pos, att, params, &st.sel, scratch);
        } else {
            attend(cache, layer, q, pos, att, params, scratch);
        }
        st.attn_ns += t0.elapsed().as_nanos() as u64;
        a = b;
    }
}

/// Adds `b` to every row (of b.len()) of `x`.
fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (xi, bi) in row.iter_mut().zip(b) {
            *xi += bi;
        }
    }
}

/// Gated feed-forward block: Wdown · (act(Wgate·x) ⊙ Wup·x). SwiGLU with `act` = [`GateAct::Silu`] (Llama), GeGLU
/// with [`GateAct::GeluTanh`] (Gemma).
pub struct GatedFfn {
    pub w_gate: QMatrix, // ffn × dim
    pub w_up: QMatrix,   // ffn × dim
    pub w_down: QMatrix, // dim × ffn
}

impl GatedFfn {
    /// Layer `i`'s feed-forward weights (`blk.i.ffn_{gate,up,down}`), `c.ffn_dim` wide.
    pub(crate) fn load(g: &GgufFile, i: usize, c: &ModelConfig) -> Result<Self> {
        Self::load_wide(g, i, c.dim, c.ffn_dim)
    }

    /// Layer `i`'s feed-forward weights, `f` wide (a MoE model's dense layers: ERNIE 4.5's first).
    pub(crate) fn load_wide(g: &GgufFile, i: usize, dim: usize, f: usize) -> Result<Self> {
        let n = |what: &str| layer_tensor(i, what);
        Ok(Self {
            w_gate: load_matrix(g, &n("ffn_gate"), f, dim)?,
            w_up: load_matrix(g, &n("ffn_up"), f, dim)?,
            w_down: load_matrix(g, &n("ffn_down"), dim, f)?,
        })
    }

    /// Layer `i`'s feed-forward weights with gate and up fused in `blk.i.ffn_up` (2·ffn rows, the gate's first: the
    /// half llama.cpp's SwiGLU passes through the activation), cut into the two (Phi-3).
    pub(crate) fn load_fused(g: &GgufFile, i: usize, c: &ModelConfig) -> Result<Self> {
        let (dim, f) = (c.dim, c.ffn_dim);
        let [w_gate, w_up]: [QMatrix; 2] =
            load_matrix_parts(g, &layer_tensor(i, "ffn_up"), dim, &[f, f])?
                .try_into()
                .map_err(|_| anyhow::anyhow!("two parts"))?;
        Ok(Self {
            w_gate,
            w_up,
            w_down: load_matrix(g, &layer_tensor(i, "ffn_down"), dim, f)?,
        })
    }

    /// Bytes of the matrices.
    pub(crate) fn n_bytes(&self) -> usize {
        [&self.w_gate, &self.w_up, &self.w_down]
            .iter()
            .map(|m| m.n_bytes())
            .sum()
    }

    /// xo ← Wdown · (act(Wgate·xb) ⊙ Wup·xb) for the chunk's n tokens.
    pub(crate) fn forward(&self, c: &ModelConfig, n: usize, act: GateAct, s: &mut Scratch) {
        let (dim, f) = (c.dim, self.w_up.rows);
        self.apply(
            &s.xb[..n * dim], // n × dim
            n,
            act,
            (&mut s.hb[..n * f], &mut s.hb2[..n * f]), // n × ffn each
            &mut s.xo[..n * dim],                      // n × dim
            &mut s.mm,
        );
    }

    /// out ← Wdown · (act(Wgate·x) ⊙ Wup·x) for the n rows of x, through `gate` and `up` (n × this block's width
    /// each; gate is left holding act(Wgate·x) ⊙ Wup·x).
    pub(crate) fn apply(
        &self,
        x: &[f32],
        n: usize,
        act: GateAct,
        (gate, up): (&mut [f32], &mut [f32]),
        out: &mut [f32],
        mm: &mut MatmulScratch,
    ) {
        let p = scope(Phase::FfnUp);
        matmul_many(
            &[&self.w_gate, &self.w_up],
            x,
            n,
            &mut [&mut *gate, &mut *up],
            mm,
        );
        drop(p);
        let p = scope(Phase::Act);
        gate_mul(act, gate, up); // gate ← act(gate) ⊙ up
        drop(p);
        let _p = scope(Phase::FfnDown);
        matmul(&self.w_down, gate, n, out, mm);
    }
}

/// Final norm and output projection of the rows `rows` lists (indices into the pass's rows in `s.x`) into
/// `s.logits` (rows.len() × vocab, in the list's order).
pub(crate) fn output_logits(
    norm: &[f32],
    out: &QMatrix,
    c: &ModelConfig,
    s: &mut Scratch,
    rows: impl ExactSizeIterator<Item = usize>,
) {
    let (dim, vocab, nr) = (c.dim, c.vocab, rows.len());
    assert!(
        nr * vocab <= s.logits.len() && nr <= s.cap,
        "{nr} logit rows do not fit the scratch"
    );
    if nr == 0 {
        return;
    }
    let _p = scope(Phase::Logits);
    for (i, r) in rows.enumerate() {
        assert!(r < s.cap, "logit row {r} out of range");
        let x = &s.x[r * dim..(r + 1) * dim];
        rmsnorm(&mut s.xb[i * dim..(i + 1) * dim], x, norm, c.rms_eps);
    }
    matmul(
        out,
        &s.xb[..nr * dim],
        nr,
        &mut s.logits[..nr * vocab],
        &mut s.mm,
    );
    if c.logit_scale != 1.0 {
        // Granite: l ← l / logit_scale.
        let inv = 1.0 / c.logit_scale;
        par_rows(&mut s.logits[..nr * vocab], vocab, |_, rows| {
            rows.iter_mut().for_each(|l| *l *= inv)
        });
    }
    if let Some(cap) = c.final_softcap {
        // Gemma 2: l ← cap · tanh(l / cap), as llama.cpp computes it.
        par_rows(&mut s.logits[..nr * vocab], vocab, |_, rows| {
            rows.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh())
        });
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Element-wise ops

/// Σ x² in 16 interleaved partial sums (lane i takes the elements ≡ i mod 16, the tail included), added pairwise at
/// the end: one fixed order on every CPU and path, so the same bits everywhere, and one the compiler can keep in
/// vector registers. A single running f32 sum is a chain of dependent adds: `bench machine` priced the norm at 0.83
/// ns per element with it.
#[inline]
pub fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v * v;
    }
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] += acc[i + n];
        }
    }
    acc[0]
}

/// `out[t] = x[t] / rms(x[t]) ⊙ w`, for each row of length `w.len()`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    for (o, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ss = sum_squares(xr) / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((oi, xi), wi) in o.iter_mut().zip(xr).zip(w) {
            *oi = xi * inv * wi;
        }
    }
}

/// In-place RMSNorm of every `w.len()`-sized piece of `x` (per-head norm).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss = sum_squares(xr) / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (xi, wi) in xr.iter_mut().zip(w) {
            *xi = *xi * inv * wi;
        }
    }
}

/// Multiplies each row (`width` floats) of `rows` by its factor (one per row).
pub(crate) fn scale_rows(rows: &mut [f32], width: usize, factors: &[f32]) {
    for (row, &f) in rows.chunks_exact_mut(width).zip(factors) {
        row.iter_mut().for_each(|v| *v *= f);
    }
}

/// Fills cos/sin tables (n_tok × rope_dim/2) for positions `pos` with angles pos · freq_scale · base^(−2i/rope_dim)
/// (freq_scale < 1 is linear RoPE scaling). Angles are computed in f64 and rounded once, so there is no cap on
/// positions and no drift at large ones.
pub fn rope_tables(
    pos: &[u32],
    rope_dim: usize,
    base: f32,
    freq_scale: f32,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    rope_tables_factored(pos, rope_dim, base, freq_scale, None, cos, sin)
}

/// [`rope_tables`] with pair i's frequency divided by `factors[i]` where given (Llama 3.1+'s `rope_freqs`).
pub fn rope_tables_factored(
    pos: &[u32],
    rope_dim: usize,
    base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let half = rope_dim / 2;
    for (t, &p) in pos.iter().enumerate() {
        for i in 0..half {
            let mut freq = (base as f64).powf(-2.0 * i as f64 / rope_dim as f64);
            if let Some(ff) = factors {
                freq /= ff[i] as f64;
            }
            let a = p as f64 * freq * freq_scale as f64;
            cos[t * half + i] = a.cos() as f32;
            sin[t * half + i] = a.sin() as f32;
        }
    }
}

/// Rotates every head of every token. `x`: n_tok × n_heads × head_dim; the first rope_dim dims of a head rotate.
pub fn apply_rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    style: RopeStyle,
    cos: &[f32],
    sin: &[f32],
    rope_dim: usize,
) {
    let half = rope_dim / 2;
    for (t, tok) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for head in tok.chunks_exact_mut(head_dim) {
            match style {
                RopeStyle::Norm => {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c[i] - b * s[i];
                        head[2 * i + 1] = a * s[i] + b * c[i];
                    }
                }
                RopeStyle::Neox => {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c[i] - b * s[i];
                        head[i + half] = a * s[i] + b * c[i];
                    }
                }
            }
        }
    }
}

/// Warns once when a position goes past the context the model was trained for.
pub(crate) fn warn_past_context(pos: &[u32], ctx_len: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if pos.last().is_some_and(|&p| p as usize >= ctx_len) && !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: position {} is past the model's trained context of {ctx_len} tokens",
            pos[pos.len() - 1]
        );
    }
}

/// Zeroes the attention output (n tokens × n_heads × head_dim) of the query heads of `layer` that `mask` marks.
pub fn mask_heads(att: &mut [f32], n_heads: usize, head_dim: usize, mask: &[bool], layer: usize) {
    if mask.is_empty() {
        return;
    }
    let m = &mask[layer * n_heads..(layer + 1) * n_heads];
    for row in att.chunks_exact_mut(n_heads * head_dim) {
        for (h, _) in m.iter().enumerate().filter(|(_, &x)| x) {
            row[h * head_dim..(h + 1) * head_dim].fill(0.0);
        }
    }
}
