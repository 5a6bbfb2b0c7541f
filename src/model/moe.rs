//! Mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, Granite MoE, ERNIE 4.5 MoE), as
//! llama.cpp's `build_moe_ffn` runs it with softmax gating: a router scores every expert for each token, the token goes
//! through its top-k experts (each a gated feed-forward block of its own, `ff_exp` wide), and their outputs are summed
//! with the router's probabilities as weights, renormalized over the chosen k where the architecture says so and scaled
//! by `expert_weights_scale` where the file gives one. Qwen2-MoE adds a shared expert every token goes through, its
//! output scaled by sigmoid(x · w) with a gate vector w of its own; Granite MoE's and ERNIE 4.5's shared experts have
//! no gate. ERNIE 4.5 also adds a per-expert bias to the probabilities for choosing the k experts only (the weights
//! stay the unbiased probabilities), and keeps its first layers dense (`leading_dense_block_count`).
//!
//! A pass's rows are grouped by expert: each expert multiplies only the rows routed to it, gathered into one block
//! (so a decode step reads k experts' weights, not all of them), and adds its weighted output to those rows. Every row
//! sums its experts in ascending expert order whatever the other rows of the pass are, so a token's output does not
//! depend on how its prompt was chunked.

use anyhow::{bail, Result};

use super::blocks::GatedFfn;
use super::{ModelConfig, Scratch};
use crate::gguf::GgufFile;
use crate::kernels::prof::{scope, Phase};
use crate::kernels::{matmul, GateAct, QMatrix};

/// The routing a file declares (`<arch>.expert_count`, `expert_used_count`, `expert_feed_forward_length`,
/// `expert_weights_scale`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_expert: usize,
    /// Experts each token goes through (k).
    pub n_used: usize,
    /// Whether the k chosen probabilities are divided by their sum (Qwen3-MoE and Mistral 3: yes).
    pub norm_w: bool,
    /// Multiplies the weights when not 0 or 1.
    pub w_scale: f32,
    /// Width of the shared expert (0: none).
    pub shared_ff: usize,
    /// Layers before this one are dense (ERNIE 4.5: `leading_dense_block_count`), `dense_ff` wide.
    pub dense_lead: usize,
    pub dense_ff: usize,
}

impl MoeConfig {
    /// The file's routing, with `norm_w` as the architecture's graph fixes it; None when `expert_count` is absent or
    /// 0. The expert width is `ffn_dim` (set from `expert_feed_forward_length` by the caller).
    pub(crate) fn from_gguf(g: &GgufFile, arch: &str, norm_w: bool) -> Result<Option<Self>> {
        let key = |k: &str| format!("{arch}.{k}");
        let Some(n_expert) = g
            .get_u64(&key("expert_count"))?
            .filter(|&n| n > 0)
            .map(|n| n as usize)
        else {
            return Ok(None);
        };
        let n_used = g.get_u64(&key("expert_used_count"))?.unwrap_or(0) as usize;
        if n_used == 0 || n_used > n_expert {
            bail!(
                "{}: {} is {n_used}; it must be between 1 and {} = {n_expert}",
                g.path.display(),
                key("expert_used_count"),
                key("expert_count")
            );
        }
        Ok(Some(Self {
            n_expert,
            n_used,
            norm_w,
            w_scale: g.get_f64(&key("expert_weights_scale"))?.unwrap_or(0.0) as f32,
            shared_ff: 0,
            dense_lead: 0,
            dense_ff: 0,
        }))
    }

    /// The widest feed-forward block of a model with this routing whose experts are `ffn_dim` wide.
    pub fn widest(&self, ffn_dim: usize) -> usize {
        ffn_dim.max(self.shared_ff).max(self.dense_ff)
    }
}

/// A layer's feed-forward block: one gated block, or experts behind a router.
pub enum Ffn {
    Dense(GatedFfn),
    Moe(Box<MoeFfn>),
}

impl Ffn {
    /// xo ← the block's output for the pass's n rows (input in xb).
    pub(crate) fn forward(&self, c: &ModelConfig, n: usize, act: GateAct, s: &mut Scratch) {
        match self {
            Ffn::Dense(f) => f.forward(c, n, act, s),
            Ffn::Moe(m) => m.forward(c, n, act, s),
        }
    }

    /// Bytes of every matrix.
    pub(crate) fn n_bytes(&self) -> usize {
        match self {
            Ffn::Dense(f) => f.n_bytes(),
            Ffn::Moe(m) => m.n_bytes(),
        }
    }

    /// Bytes one token's pass reads: all of a dense block, the router and k experts of a MoE block.
    pub(crate) fn active_bytes(&self) -> usize {
        match self {
            Ffn::Dense(f) => f.n_bytes(),
            Ffn::Moe(m) => m.active_bytes(),
        }
    }

    /// The matrices one token multiplies: gate, up, down (a MoE block: the router, then k experts' three; which k
    /// varies by token, their shapes do not; then the shared expert's three).
    pub(crate) fn token_matrices(&self) -> Vec<&QMatrix> {
        match self {
            Ffn::Dense(f) => vec![&f.w_gate, &f.w_up, &f.w_down],
            Ffn::Moe(m) => std::iter::once(&m.router)
                .chain(
                    m.experts
                        .iter()
                        .take(m.cfg.n_used)
                        .chain(m.shared.iter().map(|(f, _)| f))
                        .flat_map(|f| [&f.w_gate, &f.w_up, &f.w_down]),
                )
                .collect(),
        }
    }
}

/// One layer's experts and router.
pub struct MoeFfn {
    pub router: QMatrix, // n_expert × dim
    /// Each expert's gate, up (ff_exp × dim) and down (dim × ff_exp) matrices.
    pub experts: Vec<GatedFfn>,
    /// The shared expert (`cfg.shared_ff` wide) and its gate vector (dim; None: added as it is).
    pub shared: Option<(GatedFfn, Option<Vec<f32>>)>,
    /// n_expert: added to the probabilities to choose the k experts, not to their weights (ERNIE 4.5).
    pub choice_bias: Option<Vec<f32>>,
    pub cfg: MoeConfig,
}

/// Work buffers of the MoE block, sized once for passes of up to `cap` rows.
#[derive(Default)]
pub struct MoeScratch {
    /// cap × n_expert: router logits, then probabilities.
    probs: Vec<f32>,
    /// n_expert: one row's probabilities plus the choice bias.
    biased: Vec<f32>,
    /// cap × k: each row's chosen experts and weights, in the router's order.
    chosen: Vec<(u32, f32)>,
    /// n_expert + 1: where each expert's rows start in `routed`.
    starts: Vec<usize>,
    /// cap × k: (row, weight) pairs grouped by expert, rows ascending within an expert.
    routed: Vec<(u32, f32)>,
    /// cap × dim: the rows routed to one expert, gathered.
    x: Vec<f32>,
    /// cap × dim: that expert's output rows.
    y: Vec<f32>,
}

impl MoeScratch {
    pub(crate) fn new(c: &ModelConfig, cap: usize) -> Self {
        let Some(m) = c.moe else {
            return Self::default();
        };
        Self {
            probs: vec![0.0; cap * m.n_expert],
            biased: vec![0.0; m.n_expert],
            chosen: vec![(0, 0.0); cap * m.n_used],
            starts: vec![0; m.n_expert + 1],
            routed: vec![(0, 0.0); cap * m.n_used],
            x: vec![0.0; cap * c.dim],
            y: vec![0.0; cap * c.dim],
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        4 * (self.probs.len() + self.biased.len() + self.x.len() + self.y.len())
            + 8 * (self.chosen.len() + self.routed.len() + self.starts.len())
    }

    /// What [`MoeScratch::new`] allocates for `c` and `cap`, without allocating it (the memory plan).
    pub fn planned_bytes(c: &ModelConfig, cap: usize) -> usize {
        c.moe.map_or(0, |m| {
            4 * ((cap + 1) * m.n_expert + 2 * cap * c.dim)
                + 8 * (2 * cap * m.n_used + m.n_expert + 1)
        })
    }
}

impl MoeFfn {
    /// Layer `i`'s router (`blk.i.ffn_gate_inp`) and experts (`blk.i.ffn_{gate,up,down}_exps`, one 3-D tensor each:
    /// expert e's rows are the e-th slab).
    /// `gated_shared`: the shared expert (if `cfg.shared_ff` > 0) has a sigmoid gate (`ffn_gate_inp_shexp`).
    /// `choice_bias`: the layer may have a bias for choosing experts (`blk.i.exp_probs_b.bias`, n_expert).
    pub(crate) fn load(
        g: &GgufFile,
        i: usize,
        c: &ModelConfig,
        cfg: MoeConfig,
        (gated_shared, choice_bias): (bool, bool),
    ) -> Result<Self> {
        let (dim, f, e) = (c.dim, c.ffn_dim, cfg.n_expert);
        let n = |what: &str| format!("blk.{i}.{what}.weight");
        let gate = super::load_experts(g, &n("ffn_gate_exps"), f, dim, e)?;
        let up = super::load_experts(g, &n("ffn_up_exps"), f, dim, e)?;
        let down = super::load_experts(g, &n("ffn_down_exps"), dim, f, e)?;
        let experts = gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((w_gate, w_up), w_down)| GatedFfn {
                w_gate,
                w_up,
                w_down,
            })
            .collect();
        let shared = match cfg.shared_ff {
            0 => None,
            sf => Some((
                GatedFfn {
                    w_gate: super::load_matrix(g, &n("ffn_gate_shexp"), sf, dim)?,
                    w_up: super::load_matrix(g, &n("ffn_up_shexp"), sf, dim)?,
                    w_down: super::load_matrix(g, &n("ffn_down_shexp"), dim, sf)?,
                },
                match gated_shared {
                    true => Some(super::load_vector(g, &n("ffn_gate_inp_shexp"), dim)?),
                    false => None,
                },
            )),
        };
        let bias_name = format!("blk.{i}.exp_probs_b.bias");
        let choice_bias = match choice_bias && g.tensor_info(&bias_name).is_some() {
            true => Some(super::load_vector(g, &bias_name, e)?),
            false => None,
        };
        Ok(Self {
            router: super::load_matrix(g, &n("ffn_gate_inp"), e, dim)?,
            experts,
            shared,
            choice_bias,
            cfg,
        })
    }

    /// Bytes of the router and every expert.
    pub(crate) fn n_bytes(&self) -> usize {
        self.router.n_bytes()
            + self.experts.iter().map(|x| x.n_bytes()).sum::<usize>()
            + self.shared_bytes()
    }

    fn shared_bytes(&self) -> usize {
        self.shared.as_ref().map_or(0, |(f, w)| {
            f.n_bytes() + w.as_ref().map_or(0, |w| 4 * w.len())
        })
    }

    /// Bytes one token reads: the router and k experts (all experts are the same size).
    pub(crate) fn active_bytes(&self) -> usize {
        let one = self.experts.first().map_or(0, |x| x.n_bytes());
        self.router.n_bytes() + self.cfg.n_used * one + self.shared_bytes()
    }

    /// xo ← Σ over each row's k experts of w · Wdown_e · (act(Wgate_e·xb) ⊙ Wup_e·xb), for the pass's n rows.
    pub(crate) fn forward(&self, c: &ModelConfig, n: usize, act: GateAct, s: &mut Scratch) {
        let (dim, f) = (c.dim, c.ffn_dim);
        let (ne, k) = (self.cfg.n_expert, self.cfg.n_used);
        let m = &mut s.moe;
        let xb = &s.xb[..n * dim]; // n × dim
        let p = scope(Phase::FfnUp);
        let probs = &mut m.probs[..n * ne]; // n × n_expert
        matmul(&self.router, xb, n, probs, &mut s.mm);
        drop(p);
        let _p = scope(Phase::Act);
        // Each row: softmax over the experts, the k most probable (ties to the lower index), their weights.
        let chosen = &mut m.chosen[..n * k]; // n × k
        for (row, pick) in probs.chunks_exact_mut(ne).zip(chosen.chunks_exact_mut(k)) {
            softmax(row);
            match &self.choice_bias {
                Some(b) => {
                    // Chosen by probability + bias, weighted by the probability alone.
                    let biased = &mut m.biased[..ne]; // n_expert
                    for ((o, p), b) in biased.iter_mut().zip(row.iter()).zip(b) {
                        *o = p + b;
                    }
                    top_k(biased, pick);
                    for (e, w) in pick.iter_mut() {
                        *w = row[*e as usize];
                    }
                }
                None => top_k(row, pick),
            }
            let sum: f32 = pick.iter().map(|&(_, w)| w).sum();
            for (_, w) in pick.iter_mut() {
                if self.cfg.norm_w {
                    *w /= sum.max(6.103_515_6e-5);
                }
                if self.cfg.w_scale != 0.0 && self.cfg.w_scale != 1.0 {
                    *w *= self.cfg.w_scale;
                }
            }
        }
        // Group (row, weight) by expert: a counting sort keeps rows ascending within each expert.
        let starts = &mut m.starts;
        starts.iter_mut().for_each(|v| *v = 0);
        for &(e, _) in chosen.iter() {
            starts[e as usize + 1] += 1;
        }
        for e in 0..ne {
            starts[e + 1] += starts[e];
        }
        let routed = &mut m.routed[..n * k];
        for (r, pick) in chosen.chunks_exact(k).enumerate() {
            for &(e, w) in pick {
                routed[starts[e as usize]] = (r as u32, w);
                starts[e as usize] += 1;
            }
        }
        // Each cursor now sits where the next expert starts: shift them back.
        for e in (1..ne).rev() {
            starts[e] = starts[e - 1];
        }
        starts[0] = 0;
        drop(_p);
        let xo = &mut s.xo[..n * dim]; // n × dim
        xo.iter_mut().for_each(|v| *v = 0.0);
        for (e, expert) in self.experts.iter().enumerate() {
            let rows = &routed[starts[e]..starts[e + 1]];
            let mr = rows.len();
            if mr == 0 {
                continue;
            }
            // x: mr × dim ← the routed rows of xb
            let x = &mut m.x[..mr * dim];
            for (dst, &(r, _)) in x.chunks_exact_mut(dim).zip(rows) {
                dst.copy_from_slice(&xb[r as usize * dim..][..dim]);
            }
            let y = &mut m.y[..mr * dim]; // mr × dim
            expert.apply(
                x,
                mr,
                act,
                (&mut s.hb[..mr * f], &mut s.hb2[..mr * f]), // mr × ff_exp each
                y,
                &mut s.mm,
            );
            for (src, &(r, w)) in y.chunks_exact(dim).zip(rows) {
                let dst = &mut xo[r as usize * dim..][..dim];
                dst.iter_mut().zip(src).for_each(|(o, v)| *o += w * v);
            }
        }
        if let Some((shared, gate_w)) = &self.shared {
            // xo += sigmoid(xb · w) ⊙ Wdown_s · (act(Wgate_s·xb) ⊙ Wup_s·xb), every row (no gate: × 1).
            let sf = self.cfg.shared_ff;
            let y = &mut m.y[..n * dim]; // n × dim
            shared.apply(
                xb,
                n,
                act,
                (&mut s.hb[..n * sf], &mut s.hb2[..n * sf]), // n × shared_ff each
                y,
                &mut s.mm,
            );
            for ((dst, src), x) in xo
                .chunks_exact_mut(dim)
                .zip(y.chunks_exact(dim))
                .zip(xb.chunks_exact(dim))
            {
                match gate_w {
                    Some(w) => {
                        let g: f32 = x.iter().zip(w).map(|(a, b)| a * b).sum();
                        let scale = 1.0 / (1.0 + (-g).exp());
                        dst.iter_mut().zip(src).for_each(|(o, v)| *o += scale * v);
                    }
                    None => dst.iter_mut().zip(src).for_each(|(o, v)| *o += v),
                }
            }
        }
    }
}

/// In-place softmax of one row.
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The `pick.len()` largest entries of `row` as (index, value), largest first, ties to the lower index.
fn top_k(row: &[f32], pick: &mut [(u32, f32)]) {
    let k = pick.len();
    let mut len = 0;
    for (i, &v) in row.iter().enumerate() {
        // Insert into the sorted prefix if it beats the smallest kept (or there is room).
        if len == k && v <= pick[k - 1].1 {
            continue;
        }
        let mut j = len.min(k - 1);
        if len < k {
            len += 1;
        }
        while j > 0 && pick[j - 1].1 < v {
            pick[j] = pick[j - 1];
            j -= 1;
        }
        pick[j] = (i as u32, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_in_order_with_ties_to_the_lower_index() {
        let row = [0.1, 0.5, 0.2, 0.5, 0.05, 0.9];
        let mut pick = [(0u32, 0.0f32); 3];
        top_k(&row, &mut pick);
        assert_eq!(pick, [(5, 0.9), (1, 0.5), (3, 0.5)]);
        let mut one = [(0u32, 0.0f32); 1];
        top_k(&row, &mut one);
        assert_eq!(one, [(5, 0.9)]);
        let mut all = [(0u32, 0.0f32); 6];
        top_k(&row, &mut all);
        assert_eq!(all.map(|p| p.0), [5, 1, 3, 2, 0, 4]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut row = [1.0f32, 2.0, 3.0, -50.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[2] > row[1] && row[1] > row[0] && row[3] < 1e-20);
    }
}
