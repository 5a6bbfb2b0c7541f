//! What CacheBlend needs from a model, beside its ordinary forward pass: moving cached keys to new positions, and one
//! decoder layer run over any set of token rows whose keys and values already sit in the cache.
//!
//! **Re-rotation.** Cached keys are stored after RoPE. Every RoPE variant hayloft runs (plain, linear scaling, YaRN;
//! Gemma 3's two bases) rotates pair i by an angle linear in the position, a_i(p) = p · ω_i, so a key rotated for
//! position p becomes the key for p + Δ under one more rotation by Δ · ω_i: [`Model::rope_shift`] gives that rotation
//! (unit length: YaRN's magnitude factor is already in the stored key) for a layer, and [`shift_keys`] applies it.
//!
//! **Row forward.** [`Model::layer_qkv`] leaves the rows' post-RoPE queries, keys and values in the scratch;
//! [`Model::layer_finish`] then runs the rows' queries over the cache as it stands (the caller has written whatever
//! keys and values it wants there), the output projection, the residual and the feed-forward block. Together they are
//! the layer body of `llama::Llama::forward` / `gemma3::Gemma3::forward` with the append left to the caller.

use std::ops::Range;

use super::blocks::{
    add_residual, apply_rope, block_input, mask_heads, rmsnorm_inplace, rope_tables, scale_rows,
    Attention, GateAct,
};
use super::moe::Ffn;
use super::{Model, ModelConfig, Scratch};
use crate::attention::{attend, AttnParams};
use crate::kernels::matmul;
use crate::kv::KvCache;

/// RoPE tables of a set of token rows for both bases (n × rope_dim/2 each; the local pair is filled for Gemma 3).
#[derive(Default, Clone)]
pub struct RowRope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub cos_local: Vec<f32>,
    pub sin_local: Vec<f32>,
    /// Each row's query factor ([`super::AttnTemp`]); empty for models without one.
    pub q_temp: Vec<f32>,
}

/// One layer's pieces, whatever the architecture.
struct LayerRef<'a> {
    /// None: the block reads x itself (OLMo 2).
    attn_norm: Option<&'a [f32]>,
    attn: &'a Attention,
    /// Gemma's and OLMo 2's norms after the attention and feed-forward blocks.
    post: Option<(&'a [f32], &'a [f32])>,
    ffn_norm: Option<&'a [f32]>,
    ffn: &'a Ffn,
    gelu: bool,
}

impl Model {
    fn layer_ref(&self, li: usize) -> LayerRef<'_> {
        match self {
            Model::Llama(m) => {
                let l = &m.layers[li];
                LayerRef {
                    attn_norm: l.attn_norm.as_deref(),
                    attn: &l.attn,
                    post: l
                        .post_norms
                        .as_ref()
                        .map(|(a, f)| (a.as_slice(), f.as_slice())),
                    ffn_norm: l.ffn_norm.as_deref(),
                    ffn: &l.ffn,
                    gelu: false,
                }
            }
            Model::Gemma3(m) => {
                let l = &m.layers[li];
                LayerRef {
                    attn_norm: Some(&l.attn_norm),
                    attn: &l.attn,
                    post: l
                        .post_norms
                        .as_ref()
                        .map(|(a, f)| (a.as_slice(), f.as_slice())),
                    ffn_norm: Some(&l.ffn_norm),
                    ffn: &l.ffn,
                    gelu: true,
                }
            }
        }
    }

    /// Fills `r` with the RoPE tables of positions `pos`, as the forward pass computes them (scaling included).
    pub fn rope_rows(&self, pos: &[u32], r: &mut RowRope) {
        let c = self.config();
        let m = pos.len() * c.rope_dim / 2;
        for t in [&mut r.cos, &mut r.sin, &mut r.cos_local, &mut r.sin_local] {
            t.resize(m, 0.0);
        }
        match self {
            Model::Llama(l) => {
                let ff = l.rope_freq_factors.as_deref();
                l.rope_scaling
                    .tables(pos, c.rope_dim, c.rope_base, ff, &mut r.cos, &mut r.sin);
            }
            Model::Gemma3(g) => {
                let scale = 1.0 / g.rope_scale_global;
                rope_tables(pos, c.rope_dim, c.rope_base, scale, &mut r.cos, &mut r.sin);
            }
        }
        r.q_temp.clear();
        if let Some(t) = c.attn_temp {
            r.q_temp.extend(pos.iter().map(|&p| t.factor(p)));
        }
        // Sliding-window layers (Gemma 2/3, OLMo 3): plain RoPE at their own base.
        if c.layer_is_local.iter().any(|&l| l) {
            rope_tables(
                pos,
                c.rope_dim,
                c.rope_base_local,
                1.0,
                &mut r.cos_local,
                &mut r.sin_local,
            );
        }
    }

    /// The rotation (cos, sin: rope_dim/2 each) that turns a key of `layer` stored for position p into the key for
    /// position p + `delta`: the layer's own base and scaling, unit length.
    pub fn rope_shift(&self, layer: usize, delta: i64, cos: &mut [f32], sin: &mut [f32]) {
        let c = self.config();
        let half = c.rope_dim / 2;
        if !self.layer_ref(layer).attn.rope {
            // A NoPE layer's keys carry no position: the identity.
            cos[..half].fill(1.0);
            sin[..half].fill(0.0);
            return;
        }
        let d = [delta.unsigned_abs().min(u32::MAX as u64) as u32];
        let mut r = RowRope::default();
        self.rope_rows(&d, &mut r);
        let local = c.is_local(layer);
        let (tc, ts) = if local {
            (&r.cos_local, &r.sin_local)
        } else {
            (&r.cos, &r.sin)
        };
        for i in 0..half {
            let (a, b) = (tc[i] as f64, ts[i] as f64);
            let m = a.hypot(b).max(f64::MIN_POSITIVE);
            cos[i] = (a / m) as f32;
            sin[i] = (b / m * delta.signum() as f64) as f32;
        }
    }

    /// x (n × dim) ← the embeddings of `tokens` (n ≤ s.cap), as the forward pass starts.
    pub fn embed_rows(&self, tokens: &[u32], pos: &[u32], s: &mut Scratch) {
        let tok_embd = match self {
            Model::Llama(m) => &m.tok_embd,
            Model::Gemma3(m) => &m.tok_embd,
        };
        let (c, n) = (self.config(), tokens.len());
        assert!(
            n <= s.cap && pos.len() == n,
            "{n} rows exceed scratch capacity {}",
            s.cap
        );
        for (row, &tok) in s.x[..n * c.dim].chunks_exact_mut(c.dim).zip(tokens) {
            tok_embd.dequantize_row(tok as usize, row);
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
    }

    /// Layer `li`, first half, for the n rows in `s.x` whose RoPE tables are rows `rows` of `rope`: xb ← the normed
    /// input, and q (n × n_heads·hd), k, v (n × n_kv·hd) ← the projections, biased, QK-normed and rotated as the
    /// forward pass does. Nothing is written to the cache.
    pub fn layer_qkv(&self, li: usize, rope: &RowRope, rows: Range<usize>, s: &mut Scratch) {
        let c = self.config();
        let l = self.layer_ref(li);
        let (n, hd, nh, nkv, half) = (
            rows.len(),
            c.head_dim_k,
            c.n_heads,
            c.n_kv_heads,
            c.rope_dim / 2,
        );
        block_input(s, n, c.dim, l.attn_norm, c.rms_eps); // xb: n × dim
        let a = l.attn;
        let (q, k, v) = (
            &mut s.q[..n * nh * hd],  // n × nh·hd
            &mut s.k[..n * nkv * hd], // n × nkv·hd
            &mut s.v[..n * nkv * hd], // n × nkv·hd
        );
        let xb = &s.xb[..n * c.dim];
        matmul(&a.wq, xb, n, q, &mut s.mm);
        matmul(&a.wk, xb, n, k, &mut s.mm);
        matmul(&a.wv, xb, n, v, &mut s.mm);
        for (out, bias) in [&mut *q, &mut *k, &mut *v].into_iter().zip(&a.qkv_bias) {
            if let Some(b) = bias {
                for row in out.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        if let Some((qn, kn)) = &a.qk_norm {
            rmsnorm_inplace(q, qn, c.rms_eps);
            rmsnorm_inplace(k, kn, c.rms_eps);
        }
        let local = c.is_local(li);
        let t = rows.start * half..rows.end * half;
        let (cos, sin) = if local {
            (&rope.cos_local[t.clone()], &rope.sin_local[t])
        } else {
            (&rope.cos[t.clone()], &rope.sin[t])
        };
        if a.rope {
            apply_rope(q, nh, hd, c.rope_style, cos, sin, c.rope_dim);
            apply_rope(k, nkv, hd, c.rope_style, cos, sin, c.rope_dim);
        }
        if c.attn_temp.is_some() {
            scale_rows(q, nh * hd, &rope.q_temp[rows]);
        }
    }

    /// Layer `li`, second half, for the n rows at positions `pos` whose queries [`Self::layer_qkv`] left in `s.q`:
    /// attention over layer `li` of `cache` as it stands (causal by position, the layer's window), output projection,
    /// residual, feed-forward block; x (n × dim) holds the rows' residual stream after the layer.
    pub fn layer_finish(&self, li: usize, pos: &[u32], cache: &KvCache, s: &mut Scratch) {
        let c = self.config();
        let (n, hd, nh) = (pos.len(), c.head_dim_k, c.n_heads);
        let params = attn_params(c, li);
        let (q, att) = (&s.q[..n * nh * hd], &mut s.att[..n * nh * hd]); // n × nh·hd each
        let t0 = std::time::Instant::now();
        attend(cache, li, q, pos, att, &params, &mut s.attn);
        s.seq.attn_ns += t0.elapsed().as_nanos() as u64;
        self.layer_out(li, n, s);
    }

    /// Layer `li`, after attention, for n rows whose attention output is in `s.att` (n × n_heads·hd): head mask,
    /// output projection, residual, feed-forward block; x (n × dim) holds the rows' residual stream after the layer.
    pub fn layer_out(&self, li: usize, n: usize, s: &mut Scratch) {
        let c = self.config();
        let l = self.layer_ref(li);
        let (dim, hd, nh) = (c.dim, c.head_dim_k, c.n_heads);
        let att = &mut s.att[..n * nh * hd]; // n × nh·hd
        mask_heads(att, nh, hd, &s.seq.head_mask, li);
        matmul(&l.attn.wo, att, n, &mut s.xo[..n * dim], &mut s.mm); // xo: n × dim
        if let Some((post_attn, _)) = l.post {
            rmsnorm_inplace(&mut s.xo[..n * dim], post_attn, c.rms_eps);
        }
        add_residual(c, s, n);
        block_input(s, n, c.dim, l.ffn_norm, c.rms_eps);
        if l.gelu {
            l.ffn.forward(c, n, GateAct::GeluTanh, s);
        } else {
            l.ffn.forward(c, n, GateAct::Silu, s);
        }
        if let Some((_, post_ffn)) = l.post {
            rmsnorm_inplace(&mut s.xo[..n * dim], post_ffn, c.rms_eps);
        }
        add_residual(c, s, n);
    }
}

pub(crate) fn attn_params(c: &ModelConfig, li: usize) -> AttnParams {
    AttnParams {
        n_q_heads: c.n_heads,
        scale: c.attn_scale,
        window: c.layer_window(li),
        softcap: c.attn_softcap,
    }
}

/// Rotates every key head in `k` (rows × heads × head_dim) by the one rotation `cos`/`sin` (rope_dim/2 each) from
/// [`Model::rope_shift`].
pub fn shift_keys(c: &ModelConfig, k: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in k.chunks_exact_mut(c.head_dim_k) {
        apply_rope(head, 1, c.head_dim_k, c.rope_style, cos, sin, c.rope_dim);
    }
}
