//! Page summaries of the keys: what decode-time selectors (Quest, LServe) score instead of the keys themselves.
//!
//! When a selector asks for them ([`KvCache::enable_meta`](super::KvCache::enable_meta)), every stream keeps, for each
//! page of `page_tokens` consecutive entries, two f16 vectors over all `head_dim_k` key channels:
//! - [`PageStat::MinMax`]: the channel-wise maximum and minimum (Quest's and LServe's metadata). They are rounded
//!   outward to f16 (max up, min down), so `Σ_c max(q_c·max_c, q_c·min_c)` stays an upper bound of every q·k in the
//!   page.
//! - [`PageStat::MeanStd`]: the channel-wise mean and standard deviation (the page score that kept needles on GQA
//!   models where the min/max bound lost them).
//!
//! Summaries are computed from the keys as stored (f16, or dequantized KIVI; pruned channels read as 0), and are
//! recomputed for every page an append, eviction, overwrite, quantization or truncation touched, so they are always
//! exact for the stored keys. Their bytes are part of the cache's byte counter.

use half::f16;

/// What a page summary holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStat {
    MinMax,
    MeanStd,
}

/// Page summaries of every stream: page size and statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaConfig {
    pub page_tokens: usize,
    pub stat: PageStat,
}

impl MetaConfig {
    /// Bytes of the summaries of a stream of `len` entries over `hk` key channels: two f16 vectors per page (what
    /// the cache's byte counter adds for them).
    pub fn stream_bytes(&self, len: usize, hk: usize) -> usize {
        len.div_ceil(self.page_tokens) * 2 * hk * 2
    }
}

/// `x` rounded to an f16 that is ≥ x.
pub(super) fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x || h.is_nan() {
        h
    } else {
        next_toward(h, true)
    }
}

/// `x` rounded to an f16 that is ≤ x.
pub(super) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x || h.is_nan() {
        h
    } else {
        next_toward(h, false)
    }
}

/// The next representable f16 above (`up`) or below `h` (finite `h`).
fn next_toward(h: f16, up: bool) -> f16 {
    let b = h.to_bits();
    let neg = b & 0x8000 != 0;
    let mag = b & 0x7fff;
    let bits = match (up, neg) {
        (true, false) | (false, true) => b + 1, // away from zero
        _ if mag == 0 => {
            if up {
                0x0001
            } else {
                0x8001
            }
        }
        _ => b - 1, // toward zero
    };
    f16::from_bits(bits)
}

/// Summarizes `n` keys (`keys`: n × hk row-major, f32) into `out` (2 × hk).
pub(super) fn summarize(stat: PageStat, keys: &[f32], n: usize, hk: usize, out: &mut [f16]) {
    let (a, b) = out.split_at_mut(hk);
    match stat {
        PageStat::MinMax => {
            for c in 0..hk {
                let (mut mx, mut mn) = (f32::NEG_INFINITY, f32::INFINITY);
                for t in 0..n {
                    let x = keys[t * hk + c];
                    mx = mx.max(x);
                    mn = mn.min(x);
                }
                a[c] = f16_up(mx);
                b[c] = f16_down(mn);
            }
        }
        PageStat::MeanStd => {
            let inv = 1.0 / n.max(1) as f64;
            for c in 0..hk {
                let (mut s, mut s2) = (0.0f64, 0.0f64);
                for t in 0..n {
                    let x = keys[t * hk + c] as f64;
                    s += x;
                    s2 += x * x;
                }
                let mean = s * inv;
                let var = (s2 * inv - mean * mean).max(0.0);
                a[c] = f16::from_f64(mean);
                b[c] = f16::from_f64(var.sqrt());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outward_rounding_brackets_the_value() {
        for x in [0.1f32, -0.1, 1.0 / 3.0, -7.77, 1e-6, -1e-6, 0.0, 1000.3] {
            assert!(f16_up(x).to_f32() >= x, "{x}");
            assert!(f16_down(x).to_f32() <= x, "{x}");
            assert!((f16_up(x).to_f32() - x).abs() <= x.abs() * 1e-3 + 1e-7);
        }
    }

    #[test]
    fn summaries_of_a_page() {
        // 3 keys × 2 channels.
        let keys = [1.0, -2.0, 3.0, 0.0, 2.0, 4.0];
        let mut out = [f16::ZERO; 4];
        summarize(PageStat::MinMax, &keys, 3, 2, &mut out);
        let v: Vec<f32> = out.iter().map(|h| h.to_f32()).collect();
        assert_eq!(v, [3.0, 4.0, 1.0, -2.0]);
        summarize(PageStat::MeanStd, &keys, 3, 2, &mut out);
        let v: Vec<f32> = out.iter().map(|h| h.to_f32()).collect();
        assert_eq!(v[0], 2.0);
        assert!((v[1] - 2.0 / 3.0).abs() < 1e-3);
        assert!((v[2] - (2.0f32 / 3.0).sqrt()).abs() < 1e-3);
    }
}
