//! The most recent query rows of every layer, recorded by the forward passes after RoPE: what compression methods
//! (SnapKV's observation window, TOVA, ThinK) score the cache against. A window of capacity 0 records nothing.

/// The last `cap` query rows (post-RoPE, all query heads) of every layer, in a ring per layer.
#[derive(Clone, Default)]
pub struct QueryWindow {
    cap: usize,
    /// Floats per row: n_q_heads · head_dim_k.
    row: usize,
    /// n_layers × cap × row.
    q: Vec<f32>,
    /// n_layers × cap: position of each row.
    pos: Vec<u32>,
    /// Per layer: ring start and number of valid rows.
    start: Vec<usize>,
    len: Vec<usize>,
}

impl QueryWindow {
    /// A window of `cap` rows of `row` floats for each of `n_layers` layers; `cap` 0 records nothing.
    pub fn new(n_layers: usize, row: usize, cap: usize) -> Self {
        Self {
            cap,
            row,
            q: vec![0.0; n_layers * cap * row],
            pos: vec![0; n_layers * cap],
            start: vec![0; n_layers],
            len: vec![0; n_layers],
        }
    }

    /// Floats per row (all query heads).
    pub fn row(&self) -> usize {
        self.row
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Rows held for `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.len.get(layer).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len.iter().all(|&n| n == 0)
    }

    /// Records the queries of one chunk of `layer` (`q`: n × row, `pos`: n). Called by the forward passes after RoPE.
    #[inline]
    pub fn record(&mut self, layer: usize, q: &[f32], pos: &[u32]) {
        if self.cap == 0 {
            return;
        }
        let (cap, row) = (self.cap, self.row);
        let n = pos.len();
        let skip = n.saturating_sub(cap);
        for (t, &p) in pos.iter().enumerate().skip(skip) {
            let (s, l) = (self.start[layer], self.len[layer]);
            let slot = (s + l) % cap;
            if l == cap {
                self.start[layer] = (s + 1) % cap;
            } else {
                self.len[layer] = l + 1;
            }
            let at = layer * cap + slot;
            self.q[at * row..(at + 1) * row].copy_from_slice(&q[t * row..(t + 1) * row]);
            self.pos[at] = p;
        }
    }

    /// The last `last` rows of `layer` (oldest first), restricted to query heads `heads` (each `hk` floats):
    /// `out_q` ← n × heads.len() × hk, `out_pos` ← n.
    pub fn gather(
        &self,
        layer: usize,
        heads: std::ops::Range<usize>,
        hk: usize,
        last: usize,
        out_q: &mut Vec<f32>,
        out_pos: &mut Vec<u32>,
    ) {
        out_q.clear();
        out_pos.clear();
        if self.cap == 0 {
            return;
        }
        let (s, l) = (self.start[layer], self.len[layer]);
        let n = last.min(l);
        for i in l - n..l {
            let at = layer * self.cap + (s + i) % self.cap;
            let r = &self.q[at * self.row..(at + 1) * self.row];
            out_q.extend_from_slice(&r[heads.start * hk..heads.end * hk]);
            out_pos.push(self.pos[at]);
        }
    }

    /// Forgets rows at positions ≥ `n` (the newest ones), after the session is truncated.
    pub fn truncate_pos(&mut self, n: u32) {
        if self.cap == 0 {
            return;
        }
        for layer in 0..self.len.len() {
            while self.len[layer] > 0 {
                let last = (self.start[layer] + self.len[layer] - 1) % self.cap;
                if self.pos[layer * self.cap + last] < n {
                    break;
                }
                self.len[layer] -= 1;
            }
        }
    }
}
