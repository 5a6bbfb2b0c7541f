//! The offline per-head pattern search (`hayloft patterns`), after MInference's `search_pattern`.
//!
//! One long example is prefilled densely. For every chunk of every global layer, each query head's candidates are
//! built exactly as the run time builds them (vertical-slash estimated from the chunk's last 64 queries), and for
//! sampled query rows at positions from [`FROM_POS`] on (one row per 16-query tile, its last) the share of the row's
//! true attention that the candidate's tile ranges cover is its recall. The candidate with the highest mean recall
//! wins (the first on a tie). Candidates and the rewrite of winners follow MInference: `stream_llm` (100, 800),
//! vertical-slash (30, 800), (100, 750), (500, 700), (3500, 100), and block-sparse with 32-token blocks keeping an
//! eighth of the blocks; a block-sparse winner is written as VS(1000, 6096) and a stream winner as VS(100, 800). The
//! forced columns and diagonals are the run time's (30 and 100), so the recall is what `--prefill minference@FILE` gets.
//!
//! Highest recall is what the shipped search does; the paper instead picks patterns under a compute budget. With a
//! recall floor ([`PatternSearch::finish`]'s `min_recall`, `hayloft patterns --min-recall R`) a head gets the cheapest
//! candidate whose recall reaches the floor (cost: keys a query row reads under the pattern the file records, at the
//! example's length, as our kernel reads them: see [`Candidate::cost`]), and the highest-recall one only if none does:
//! a budget-aware choice of ours, not MInference's. For that choice two candidates of ours join MInference's:
//! vertical-slash with many columns and only the forced diagonals, (1000, 100) and (2000, 100), which our kernel reads
//! cheaply (columns are gathered once per chunk, a scattered diagonal costs a 16-key range per query tile).

use rayon::prelude::*;

use super::pattern::{HeadEntry, PatternFile, DEFAULT};
use super::plan::{
    prefill_shape, Estimator, HeadPlan, Keys, FORCED_COLUMNS, FORCED_DIAGONALS, MIN_SLASH,
};
use super::HeadPattern;
use crate::attention::{TileSelection, Q_TILE};
use crate::model::{ModelConfig, PrefillPattern, SelectCx};

/// Rows from this position on are scored (MInference: 2500).
pub const FROM_POS: usize = 2500;

/// One search candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Candidate {
    /// A run-time pattern.
    Pattern(HeadPattern),
    /// `block`-token mean-pooled blocks, keeping 1/`share` of the visible key blocks.
    Block { block: usize, share: usize },
}

pub const CANDIDATES: [Candidate; 8] = [
    Candidate::Pattern(HeadPattern::AShape {
        init: 100,
        local: 800,
    }),
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 30,
        slash: 800,
    }),
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 100,
        slash: 750,
    }),
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 500,
        slash: 700,
    }),
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 3500,
        slash: 100,
    }),
    Candidate::Block {
        block: 32,
        share: 8,
    },
    // Ours (see the module text): few diagonals, many columns.
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 1000,
        slash: 100,
    }),
    Candidate::Pattern(HeadPattern::VerticalSlash {
        vertical: 2000,
        slash: 100,
    }),
];
const NC: usize = CANDIDATES.len();

impl Candidate {
    /// What the file records for a winner (MInference's rewrite).
    pub fn written(self) -> HeadPattern {
        match self {
            Self::Pattern(HeadPattern::AShape { .. }) => HeadPattern::VerticalSlash {
                vertical: 100,
                slash: 800,
            },
            Self::Pattern(p) => p,
            Self::Block { .. } => DEFAULT,
        }
    }

    /// Keys a query row reads under the recorded pattern at context `n` (forced columns and diagonals included), as
    /// the kernel reads them: the forced last 100 diagonals are one band, but each further diagonal usually lies
    /// apart from the others and is read as a 16-key range by every 16-query tile (16 keys per row, not 1).
    pub fn cost(self, n: usize) -> usize {
        let keys = match self.written() {
            HeadPattern::VerticalSlash { vertical, slash } => {
                let far = slash.max(MIN_SLASH).saturating_sub(FORCED_DIAGONALS);
                vertical.max(FORCED_COLUMNS) + FORCED_DIAGONALS + Q_TILE * far
            }
            HeadPattern::AShape { init, local } => init + local,
            HeadPattern::BlockSparse { top_k } => 64 * top_k,
        };
        keys.min(n)
    }
}

#[derive(Default)]
struct Work {
    keys: Keys,
    est: Estimator,
    plan: HeadPlan,
    /// One candidate's tile ranges (one head).
    tiles: Vec<TileSelection>,
}

/// Scores every candidate on every (layer, query head) while a dense prefill runs.
pub struct PatternSearch {
    scale: f32,
    from_pos: usize,
    n_heads: usize,
    /// [layer · n_heads + head][candidate]: recall summed over scored rows.
    sums: Vec<[f64; NC]>,
    /// [layer · n_heads + head]: rows scored.
    rows: Vec<u64>,
    work: Vec<Work>,
}

impl PatternSearch {
    /// Scores rows at positions from `from_pos` on.
    pub fn new(mc: &ModelConfig, from_pos: usize) -> Self {
        Self {
            scale: mc.attn_scale,
            from_pos,
            n_heads: mc.n_heads,
            sums: vec![[0.0; NC]; mc.n_layers * mc.n_heads],
            rows: vec![0; mc.n_layers * mc.n_heads],
            work: (0..mc.n_kv_heads).map(|_| Work::default()).collect(),
        }
    }

    /// The winners as a pattern file: per head the highest mean recall (MInference), or with `min_recall` the cheapest
    /// candidate at `tokens` whose recall reaches it (the highest-recall one if none does).
    pub fn finish(
        &self,
        model: &str,
        example: &str,
        tokens: usize,
        min_recall: Option<f64>,
    ) -> PatternFile {
        let layers = self.rows.len() / self.n_heads;
        let heads = (0..layers)
            .map(|l| {
                (0..self.n_heads)
                    .map(|h| {
                        let i = l * self.n_heads + h;
                        if self.rows[i] == 0 {
                            return HeadEntry {
                                pattern: DEFAULT,
                                recall: 0.0,
                            };
                        }
                        let mut best = 0;
                        for c in 1..NC {
                            if self.sums[i][c] > self.sums[i][best] {
                                best = c;
                            }
                        }
                        if let Some(floor) = min_recall {
                            let rows = self.rows[i] as f64;
                            let cheapest = (0..NC)
                                .filter(|&c| self.sums[i][c] / rows >= floor)
                                .min_by_key(|&c| (CANDIDATES[c].cost(tokens), c));
                            best = cheapest.unwrap_or(best);
                        }
                        HeadEntry {
                            pattern: CANDIDATES[best].written(),
                            // Four decimals: a figure to read (f32 probabilities may sum a hair past 1).
                            recall: ((self.sums[i][best] / self.rows[i] as f64).min(1.0) * 1e4)
                                .round()
                                / 1e4,
                        }
                    })
                    .collect()
            })
            .collect();
        PatternFile {
            model: model.to_string(),
            layers,
            q_heads: self.n_heads,
            example: example.to_string(),
            tokens,
            heads,
        }
    }

    /// Mean recall of every candidate over all scored heads (for the report).
    pub fn mean_recalls(&self) -> Vec<(Candidate, f64)> {
        let scored: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i] > 0).collect();
        CANDIDATES
            .iter()
            .enumerate()
            .map(|(c, &cand)| {
                let m = scored
                    .iter()
                    .map(|&i| self.sums[i][c] / self.rows[i] as f64)
                    .sum::<f64>()
                    / scored.len().max(1) as f64;
                (cand, m)
            })
            .collect()
    }
}

impl PrefillPattern for PatternSearch {
    fn pattern(&mut self, cx: &SelectCx, _out: &mut TileSelection) -> bool {
        if !prefill_shape(cx) {
            return false;
        }
        let n = cx.pos.len();
        let len = cx.pos[n - 1] as usize + 1;
        // Tiles whose last row is scored.
        let scored: Vec<usize> = (0..n.div_ceil(Q_TILE))
            .filter(|&t| cx.pos[((t + 1) * Q_TILE).min(n) - 1] as usize >= self.from_pos)
            .collect();
        if scored.is_empty() {
            return false;
        }
        let (g, hk, scale) = (cx.group(), cx.cache.cfg.head_dim_k, self.scale);
        let results: Vec<Vec<(usize, [f64; NC], u64)>> = self
            .work
            .par_iter_mut()
            .enumerate()
            .map(|(h, w)| {
                w.keys.load(cx.cache, cx.layer, h, len);
                w.est.forget_means();
                w.tiles.resize_with(NC, TileSelection::default);
                let mut res = Vec::new();
                for qh in h * g..(h + 1) * g {
                    w.est.vertical_slash_scores(&w.keys, cx, qh, scale);
                    for (c, cand) in CANDIDATES.iter().enumerate() {
                        w.plan.reset(len);
                        match *cand {
                            Candidate::Pattern(HeadPattern::VerticalSlash { vertical, slash }) => {
                                w.est.add_vs_from_scores(vertical, slash, &mut w.plan)
                            }
                            Candidate::Pattern(HeadPattern::AShape { init, local }) => {
                                w.plan.add_a_shape(init, local)
                            }
                            Candidate::Pattern(HeadPattern::BlockSparse { top_k }) => {
                                w.est.forget_means();
                                w.est.add_block_sparse(
                                    &w.keys,
                                    cx,
                                    qh,
                                    super::plan::BLOCK,
                                    |_| top_k,
                                    &mut w.plan,
                                );
                                w.est.forget_means();
                            }
                            Candidate::Block { block, share } => w.est.add_block_sparse(
                                &w.keys,
                                cx,
                                qh,
                                block,
                                |v| v.div_ceil(share),
                                &mut w.plan,
                            ),
                        }
                        let ts = &mut w.tiles[c];
                        ts.reset(1, n);
                        w.plan.emit(0, cx.pos, ts);
                        ts.finish();
                    }
                    let mut sums = [0.0f64; NC];
                    for &t in &scored {
                        let r = ((t + 1) * Q_TILE).min(n) - 1;
                        let p = cx.pos[r] as usize;
                        let q = &cx.q[(r * cx.n_q_heads + qh) * hk..][..hk];
                        let probs = w.est.probs(&w.keys, q, p, scale);
                        for (c, s) in sums.iter_mut().enumerate() {
                            let ts = &w.tiles[c];
                            for &(lo, hi) in ts.ranges(0, t).iter().chain(ts.shared(0)) {
                                let hi = (hi as usize).min(p + 1);
                                if (lo as usize) < hi {
                                    *s += probs[lo as usize..hi]
                                        .iter()
                                        .map(|&x| x as f64)
                                        .sum::<f64>();
                                }
                            }
                        }
                    }
                    res.push((qh, sums, scored.len() as u64));
                }
                res
            })
            .collect();
        for (qh, sums, rows) in results.into_iter().flatten() {
            let i = cx.layer * self.n_heads + qh;
            for (d, s) in self.sums[i].iter_mut().zip(sums) {
                *d += s;
            }
            self.rows[i] += rows;
        }
        false
    }
}

/// A search a session runs while the caller keeps a handle to read its tallies afterwards.
pub struct Shared(pub std::sync::Arc<std::sync::Mutex<PatternSearch>>);

impl PrefillPattern for Shared {
    fn pattern(&mut self, cx: &SelectCx, out: &mut TileSelection) -> bool {
        self.0.lock().is_ok_and(|mut s| s.pattern(cx, out))
    }
}
