//! What compression methods observe besides the cache itself: the most recent query rows of every layer (recorded by the
//! forward pass) and, for methods that ask for it, the attention each cached entry has received so far.
//!
//! Both cost nothing when no method needs them: a [`QueryWindow`] of capacity 0 returns from `record` at once, and an
//! [`AttnAcc`] that is off holds nothing. Attention for scoring is recomputed here from the cached keys (plain f32 dot
//! products over a gathered copy of one head), never inside the attention kernel.

use rayon::prelude::*;

use crate::kv::KvCache;
pub use crate::model::QueryWindow;

/// Attention each cached entry has received, summed over the queries seen since it was cached and over the query heads
/// of its KV head (H2O's statistic), one f32 per entry, stream by stream, kept aligned with the cache.
#[derive(Clone, Default)]
pub struct AttnAcc {
    on: bool,
    /// Per (layer, KV head) stream: one value per cached entry.
    pub acc: Vec<Vec<f32>>,
    scratch: Vec<GatherBuf>,
}

/// Reusable buffers for one head's gathered keys and queries.
#[derive(Clone, Default)]
pub struct GatherBuf {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub pos: Vec<u32>,
    pub q: Vec<f32>,
    pub q_pos: Vec<u32>,
    pub p: Vec<f32>,
    vtmp: Vec<f32>,
}

impl GatherBuf {
    /// Copies (layer, head)'s keys (and values if `values`) and positions out of the cache as f32 rows.
    pub fn gather(&mut self, cache: &KvCache, layer: usize, head: usize, values: bool) {
        let (hk, hv) = (cache.cfg.head_dim_k, cache.cfg.head_dim_v);
        let n = cache.len(layer, head);
        self.keys.resize(n * hk, 0.0);
        self.pos.resize(n, 0);
        self.values.resize(if values { n * hv } else { 0 }, 0.0);
        self.vtmp.resize(hv, 0.0);
        for i in 0..n {
            let k = &mut self.keys[i * hk..(i + 1) * hk];
            let p = if values {
                cache.read(layer, head, i, k, &mut self.values[i * hv..(i + 1) * hv])
            } else {
                cache.read(layer, head, i, k, &mut self.vtmp)
            };
            self.pos[i] = p;
        }
    }
}

impl AttnAcc {
    pub fn new(on: bool, n_streams: usize) -> Self {
        Self {
            on,
            acc: if on {
                vec![Vec::new(); n_streams]
            } else {
                Vec::new()
            },
            scratch: Vec::new(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Adds the attention of the newest `n_new` query rows of every layer over the current cache (new entries start
    /// at 0). `group` query heads share a KV head; `windows[layer]` is that layer's sliding window. Layers whose cache
    /// keeps only its sliding window hold nothing here: no method evicts from them, and their entries slide.
    pub fn accumulate(
        &mut self,
        cache: &KvCache,
        obs: &QueryWindow,
        n_new: usize,
        scale: f32,
        windows: &[Option<u32>],
    ) {
        if !self.on {
            return;
        }
        let nkv = cache.cfg.n_kv_heads;
        let hk = cache.cfg.head_dim_k;
        let group = obs.row() / hk / nkv;
        self.scratch.resize_with(nkv, GatherBuf::default);
        for (layer, &window) in windows.iter().enumerate() {
            let accs = &mut self.acc[layer * nkv..(layer + 1) * nkv];
            if cache.window(layer).is_some() {
                accs.iter_mut().for_each(Vec::clear);
                continue;
            }
            accs.par_iter_mut()
                .zip(self.scratch.par_iter_mut())
                .enumerate()
                .for_each(|(h, (acc, b))| {
                    b.gather(cache, layer, h, false);
                    acc.resize(b.pos.len(), 0.0);
                    obs.gather(
                        layer,
                        h * group..(h + 1) * group,
                        hk,
                        n_new,
                        &mut b.q,
                        &mut b.q_pos,
                    );
                    b.p.resize(b.pos.len(), 0.0);
                    for (r, &qp) in b.q_pos.iter().enumerate() {
                        for g in 0..group {
                            let q = &b.q[(r * group + g) * hk..][..hk];
                            attn_row(q, qp, &b.keys, &b.pos, hk, scale, window, &mut b.p);
                            for (a, p) in acc.iter_mut().zip(&b.p) {
                                *a += p;
                            }
                        }
                    }
                });
        }
    }

    /// Keeps the values of stream `si` whose `keep` flag is set (the same mask the cache's retain used).
    pub fn retain(&mut self, si: usize, keep: &[bool]) {
        if !self.on {
            return;
        }
        let a = &mut self.acc[si];
        let mut w = 0;
        for i in 0..a.len().min(keep.len()) {
            if keep[i] {
                a[w] = a[i];
                w += 1;
            }
        }
        a.truncate(w);
    }

    /// Cuts every stream's values to the cache's length (after truncation).
    pub fn sync_len(&mut self, cache: &KvCache) {
        if !self.on {
            return;
        }
        let nkv = cache.cfg.n_kv_heads;
        for (si, a) in self.acc.iter_mut().enumerate() {
            a.truncate(cache.len(si / nkv, si % nkv));
        }
    }
}

/// Dot product with eight independent accumulators (vectorizes).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Softmax attention of one query (at position `q_pos`) over the entries it can see — causal, and within `window` on
/// sliding-window layers — written to `p` (one probability per entry; invisible entries get 0).
#[allow(clippy::too_many_arguments)]
pub fn attn_row(
    q: &[f32],
    q_pos: u32,
    keys: &[f32],
    pos: &[u32],
    hk: usize,
    scale: f32,
    window: Option<u32>,
    p: &mut [f32],
) {
    let visible = |kp: u32| kp <= q_pos && window.is_none_or(|w| q_pos - kp < w);
    let mut m = f32::NEG_INFINITY;
    for (j, &kp) in pos.iter().enumerate() {
        p[j] = if visible(kp) {
            let s = scale * dot(q, &keys[j * hk..(j + 1) * hk]);
            m = m.max(s);
            s
        } else {
            f32::NEG_INFINITY
        };
    }
    if m == f32::NEG_INFINITY {
        p.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let mut sum = 0.0;
    for x in p.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// Per-KV-head working memory of the press, sized once and reused by every compression.
#[derive(Default)]
pub struct HeadBuf {
    pub g: GatherBuf,
    pub scores: Vec<f32>,
    pub tmp: Vec<f32>,
    pub order: Vec<u32>,
    pub keep: Vec<bool>,
    /// Entries whose key/value a merge rewrote.
    pub dirty: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_the_newest_rows_in_order() {
        let mut w = QueryWindow::new(2, 2, 3);
        w.record(1, &[1., 1., 2., 2.], &[0, 1]);
        w.record(1, &[3., 3., 4., 4., 5., 5.], &[2, 3, 4]);
        let (mut q, mut p) = (Vec::new(), Vec::new());
        w.gather(1, 0..2, 1, 10, &mut q, &mut p);
        assert_eq!(p, vec![2, 3, 4]);
        assert_eq!(q, vec![3., 3., 4., 4., 5., 5.]);
        w.gather(1, 1..2, 1, 2, &mut q, &mut p);
        assert_eq!((q.clone(), p.clone()), (vec![4., 5.], vec![3, 4]));
        assert_eq!(w.len(0), 0);
        w.truncate_pos(4);
        w.gather(1, 0..1, 1, 10, &mut q, &mut p);
        assert_eq!(p, vec![2, 3]);
        // More rows than the capacity in one call: only the last ones stay.
        w.record(0, &[1., 0., 2., 0., 3., 0., 4., 0.], &[5, 6, 7, 8]);
        w.gather(0, 0..1, 1, 10, &mut q, &mut p);
        assert_eq!((q, p), (vec![2., 3., 4.], vec![6, 7, 8]));
    }

    #[test]
    fn attention_row_is_a_masked_softmax() {
        let keys = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let pos = [0, 1, 2];
        let mut p = [0.0; 3];
        attn_row(&[2.0, 0.0], 1, &keys, &pos, 2, 1.0, None, &mut p);
        let (a, b) = (2.0f32.exp(), 1.0f32);
        assert!((p[0] - a / (a + b)).abs() < 1e-6 && p[2] == 0.0, "{p:?}");
        attn_row(&[2.0, 0.0], 2, &keys, &pos, 2, 1.0, Some(2), &mut p);
        assert_eq!(p[0], 0.0);
        assert!((p[1] + p[2] - 1.0).abs() < 1e-6);
    }
}
