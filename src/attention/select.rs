//! What a decode-time selector hands the attention kernel: for each KV head of one layer, the entries to read.

/// Entry ranges `[lo, hi)` (indices into each KV head's stream) that one layer's attention reads, per KV head. After
/// [`Selection::finish`] every head's ranges are ascending, disjoint and not adjacent.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    ranges: Vec<Vec<(u32, u32)>>,
    /// Per KV head: the scores a selector computed for this step's query over some of the head's entries, which the
    /// kernel takes instead of reading those entries' keys ([`Selection::scores`]).
    scores: Vec<GivenScores>,
}

/// Raw scores q·k (before the 1/√d scale, soft-cap and mask) of the one query row of every query head of a KV
/// head's group over its entries `[lo, hi)`, in contiguous parts (one, or one per task of a split scan, so each task
/// fills its own buffer): part `[a, b)` holds query head i's (in group order) at `rows[i · (b − a)..][..b − a]`.
#[derive(Clone, Debug, Default)]
pub struct GivenScores {
    /// The first `n` of these are in use, ascending and adjacent; the rest keep their memory for later steps.
    parts: Vec<ScorePart>,
    n: usize,
}

/// One part of [`GivenScores`]: entries `[lo, hi)`, group rows × (hi − lo) scores.
#[derive(Clone, Debug, Default)]
pub struct ScorePart {
    pub lo: u32,
    pub hi: u32,
    pub rows: Vec<f32>,
}

impl ScorePart {
    /// Entries the part covers.
    pub fn len(&self) -> usize {
        (self.hi - self.lo) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.hi <= self.lo
    }

    /// Query head `r`'s scores of the part's entries (the part must hold that row: [`GivenScores::holds_rows`]).
    #[inline]
    pub fn row(&self, r: usize) -> &[f32] {
        &self.rows[r * self.len()..][..self.len()]
    }
}

impl GivenScores {
    /// Whether it holds scores (a head without them has no part).
    pub fn is_empty(&self) -> bool {
        self.lo() >= self.hi()
    }

    /// First entry scored.
    pub fn lo(&self) -> usize {
        self.parts[..self.n].first().map_or(0, |p| p.lo as usize)
    }

    /// One past the last entry scored.
    pub fn hi(&self) -> usize {
        self.parts[..self.n].last().map_or(0, |p| p.hi as usize)
    }

    /// Drops every part (keeping their memory).
    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Appends a part over `[lo, hi)` (which must follow the last one), swapping `rows` in: the caller gets back the
    /// buffer a previous step left in that slot, to reuse.
    pub fn push_swap(&mut self, lo: usize, hi: usize, rows: &mut Vec<f32>) {
        assert!(
            lo < hi && (self.n == 0 || self.hi() == lo),
            "given scores: part [{lo}, {hi}) does not extend [{}, {})",
            self.lo(),
            self.hi()
        );
        if self.parts.len() == self.n {
            self.parts.push(ScorePart::default());
        }
        let p = &mut self.parts[self.n];
        (p.lo, p.hi) = (lo as u32, hi as u32);
        std::mem::swap(&mut p.rows, rows);
        self.n += 1;
    }

    /// The parts in use.
    pub fn parts(&self) -> &[ScorePart] {
        &self.parts[..self.n]
    }

    /// Mutable parts in use (tests edit scores to see the kernel take them).
    pub fn parts_mut(&mut self) -> &mut [ScorePart] {
        &mut self.parts[..self.n]
    }

    /// The part holding entry `e` (None outside `[lo, hi)`).
    #[inline]
    pub fn part_at(&self, e: usize) -> Option<&ScorePart> {
        self.parts()
            .iter()
            .find(|p| (p.lo as usize..p.hi as usize).contains(&e))
    }

    /// Whether every part holds `rows` rows of scores.
    pub fn holds_rows(&self, rows: usize) -> bool {
        self.parts()
            .iter()
            .all(|p| p.rows.len() >= rows * (p.hi - p.lo) as usize)
    }
}

impl Selection {
    /// Empties every head's list (keeping the memory) for a layer with `n_heads` KV heads.
    pub fn reset(&mut self, n_heads: usize) {
        self.ranges.resize_with(n_heads, Vec::new);
        self.ranges.truncate(n_heads);
        for r in &mut self.ranges {
            r.clear();
        }
        self.forget_scores();
    }

    /// Drops every head's given scores (keeping their memory).
    pub fn forget_scores(&mut self) {
        for g in &mut self.scores {
            g.clear();
        }
    }

    /// `head`'s given-scores slot, to fill: a selector that scored the step's query against entries `[lo, hi)` of
    /// the head adds them as parts ([`GivenScores::push_swap`], swapping its own buffers in). Only for a decode step
    /// (one query row) and only the scores of this very query: the kernel trusts them in place of the keys.
    pub fn scores_mut(&mut self, head: usize) -> &mut GivenScores {
        if self.scores.len() <= head {
            self.scores.resize_with(head + 1, GivenScores::default);
        }
        &mut self.scores[head]
    }

    /// `head`'s given scores, if a selector set them for this step.
    pub fn scores(&self, head: usize) -> Option<&GivenScores> {
        self.scores.get(head).filter(|g| !g.is_empty())
    }

    /// KV heads this selection covers.
    pub fn n_heads(&self) -> usize {
        self.ranges.len()
    }

    /// Adds entries `[lo, hi)` of `head` (any order, overlaps allowed until [`Self::finish`]).
    pub fn add(&mut self, head: usize, lo: usize, hi: usize) {
        if lo < hi {
            self.ranges[head].push((lo as u32, hi as u32));
        }
    }

    /// Empties `head`'s list.
    pub fn clear_head(&mut self, head: usize) {
        self.ranges[head].clear();
    }

    /// Sorts and merges every head's ranges.
    pub fn finish(&mut self) {
        for r in &mut self.ranges {
            if !r.is_sorted() {
                r.sort_unstable();
            }
            let mut w = 0;
            for i in 0..r.len() {
                if w > 0 && r[i].0 <= r[w - 1].1 {
                    r[w - 1].1 = r[w - 1].1.max(r[i].1);
                } else {
                    r[w] = r[i];
                    w += 1;
                }
            }
            r.truncate(w);
        }
    }

    /// The ranges of `head` (empty for a head past [`Self::n_heads`]).
    pub fn ranges(&self, head: usize) -> &[(u32, u32)] {
        self.ranges.get(head).map_or(&[], |r| r.as_slice())
    }

    /// `head`'s list, to edit in place (kept sorted and disjoint by the caller).
    pub(crate) fn list_mut(&mut self, head: usize) -> &mut Vec<(u32, u32)> {
        &mut self.ranges[head]
    }

    /// Whether entry `e` of `head` is selected.
    pub fn contains(&self, head: usize, e: usize) -> bool {
        self.ranges(head)
            .iter()
            .any(|&(lo, hi)| (lo as usize..hi as usize).contains(&e))
    }

    /// Entries selected for `head`.
    pub fn count(&self, head: usize) -> usize {
        self.ranges(head)
            .iter()
            .map(|&(a, b)| (b - a) as usize)
            .sum()
    }

    /// Whether `head`'s selection is exactly `[0, len)`.
    pub fn covers(&self, head: usize, len: usize) -> bool {
        match self.ranges(head) {
            [] => len == 0,
            [(0, hi)] => *hi as usize == len,
            _ => false,
        }
    }

    /// Copies `other`'s ranges (reusing this selection's memory); given scores are not copied: they belong to the step
    /// that computed them.
    pub fn copy_from(&mut self, other: &Selection) {
        self.reset(other.n_heads());
        for (d, s) in self.ranges.iter_mut().zip(&other.ranges) {
            d.extend_from_slice(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_sort_and_merge() {
        let mut s = Selection::default();
        s.reset(2);
        s.add(0, 10, 20);
        s.add(0, 0, 4);
        s.add(0, 15, 30);
        s.add(0, 30, 31);
        s.add(0, 5, 5);
        s.add(1, 0, 8);
        s.finish();
        assert_eq!(s.ranges(0), &[(0, 4), (10, 31)]);
        assert_eq!(s.count(0), 25);
        assert!(s.covers(1, 8));
        assert!(!s.covers(0, 31));
        assert_eq!(s.ranges(5), &[]);
        s.reset(1);
        assert_eq!(s.n_heads(), 1);
        assert_eq!(s.count(0), 0);
    }
}
