//! Page summaries of the keys: what decode-time selectors (Quest, LServe) score instead of the keys themselves.
//!
//! When a selector asks for them ([`KvCache::enable_meta`](super::KvCache::enable_meta)), every stream of the layers
//! it reads ([`MetaConfig::keeps`]) keeps, for each page of `page_tokens` consecutive entries, two f16 vectors over
//! all `head_dim_k` key channels:
//! - [`PageStat::MinMax`]: the channel-wise maximum and minimum (Quest's and LServe's metadata). They are rounded
//!   outward to f16 (max up, min down), so `Σ_c max(q_c·max_c, q_c·min_c)` stays an upper bound of every q·k in the
//!   page.
//! - [`PageStat::MeanStd`]: the channel-wise mean and standard deviation (the page score that kept needles on GQA
//!   models where the min/max bound lost them).
//!
//! Summaries are computed from the keys as stored (f16, or dequantized KIVI; pruned channels read as 0), and are
//! recomputed for every page an append, eviction, overwrite, quantization or truncation touched, so they are always
//! exact for the stored keys. Their bytes are part of the cache's byte counter.
//!
//! Beside the f16 summaries every page keeps an 8-bit copy, the one selectors score ([`quantize_page`]): one scale
//! per page (its largest |value| / 127) and 2 × hk codes, a maximum rounded up and a minimum rounded down, so the copy
//! still brackets the page's keys. A decode step then reads 2·hk + 4 bytes per page instead of 4·hk, and scores it
//! with integer dot products (VNNI where the CPU has it). Measured at Gemma 3's 32K (1 KV head of 256, 2000 pages
//! per global layer, from memory, 2-core AVX-512 Xeon; `HL_FLUSH_MB=256 cargo test --release --lib quest_decode_32k --
//! --ignored --nocapture`, three runs each): a Quest step took 118–126 µs per layer at best (135–145 median) scoring
//! the f16 summaries, 62–65 (81–85) scoring this copy.

use half::f16;

/// What a page summary holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStat {
    MinMax,
    MeanStd,
}

/// Page summaries: page size, statistic, and the layers that keep them. A layer below `first_layer` (a selector's
/// dense first layers) or with a sliding window (every selector reads a window layer whole) keeps none: no selector
/// reads them, and on Gemma 3 they were 15 of the 18 layers whose summaries every decode step updated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaConfig {
    pub page_tokens: usize,
    pub stat: PageStat,
    pub first_layer: usize,
}

impl MetaConfig {
    /// Whether `layer` (with sliding window `window`) keeps summaries.
    pub fn keeps(&self, layer: usize, window: Option<u32>) -> bool {
        layer >= self.first_layer && window.is_none()
    }

    /// Bytes of the summaries of a stream of `len` entries over `hk` key channels: two f16 vectors and their 8-bit
    /// copy per page (what the cache's byte counter adds for them).
    pub fn stream_bytes(&self, len: usize, hk: usize) -> usize {
        len.div_ceil(self.page_tokens) * page_bytes(hk)
    }

    /// Bytes a selector reads to score every page of such a stream: the 8-bit copy only.
    pub fn stream_read_bytes(&self, len: usize, hk: usize) -> usize {
        len.div_ceil(self.page_tokens) * code_bytes(hk)
    }
}

/// Bytes one page's summaries hold: the f16 summary (2 × hk × 2) and its 8-bit copy (2 × hk codes and a scale).
pub fn page_bytes(hk: usize) -> usize {
    2 * hk * 2 + code_bytes(hk)
}

/// Bytes of one page's 8-bit copy: what a selector scoring the page reads.
pub fn code_bytes(hk: usize) -> usize {
    2 * hk + 4
}

/// The 8-bit copy of one page's summary `row` (2 × hk: first half maxima or means, second half minima or standard
/// deviations) into `codes`, returning its scale `s` (value ≈ s · code; 0 for an all-zero row). Min/max: the maxima
/// are rounded up and the minima down (`s · code` ≥ max, ≤ min, up to f32 rounding of the product), so the bound
/// scored from the copy stays a bound; mean/std: to nearest.
pub fn quantize_page(stat: PageStat, row: &[f16], codes: &mut [i8]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    // A decode step requantizes one page per stream (90 of 128 values on SmolLM2, 18 of 512 on Gemma 3): the values
    // are converted 64 at a time with the vector instructions, and rounded by truncation and a comparison.
    const CH: usize = 64;
    let mut buf = [0.0f32; CH];
    let mut amax = 0.0f32;
    for ch in row.chunks(CH) {
        let b = &mut buf[..ch.len()];
        crate::kernels::f16_to_f32_slice(ch.reinterpret_cast(), b);
        amax = b.iter().fold(amax, |m, x| m.max(x.abs()));
    }
    if amax == 0.0 || !amax.is_finite() {
        codes.fill(0);
        return 0.0;
    }
    let (s, hk) = (amax / 127.0, row.len() / 2);
    let inv = 1.0 / s;
    for (i, (ch, q)) in row.chunks(CH).zip(codes.chunks_mut(CH)).enumerate() {
        let b = &mut buf[..ch.len()];
        crate::kernels::f16_to_f32_slice(ch.reinterpret_cast(), b);
        for (j, (x, q)) in b.iter().zip(q.iter_mut()).enumerate() {
            let y = x * inv;
            let r = match stat {
                PageStat::MinMax if i * CH + j < hk => ceil_i(y),
                PageStat::MinMax => floor_i(y),
                PageStat::MeanStd => round_i(y),
            };
            *q = r.clamp(-127, 127) as i8;
        }
    }
    s
}

// ⌈y⌉, ⌊y⌋ and y rounded half away from zero as integers, exact for |y| < 2³¹ (NaN gives 0), by truncation and a
// comparison: `f32::ceil` and its kin are a library call each on the baseline x86-64 target (no SSE4.1), and
// showed as a third of a Quest decode step's summary upkeep (Gemma 3 8K, 0.04 of 0.10 ms per token).
#[inline]
fn ceil_i(y: f32) -> i32 {
    let t = y as i32;
    t + ((t as f32) < y) as i32
}

#[inline]
fn floor_i(y: f32) -> i32 {
    let t = y as i32;
    t - ((t as f32) > y) as i32
}

#[inline]
fn round_i(y: f32) -> i32 {
    let t = y as i32;
    let f = y - t as f32; // exact: the fraction of y
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
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
    fn integer_rounding_equals_the_float_functions() {
        let mut xs: Vec<f32> = vec![
            0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.99999, -126.99999, 127.0, -127.0,
        ];
        xs.extend((0..200_000).map(|i| (i as f32 - 100_000.0) * 0.00127 + 0.000_3));
        xs.extend([
            0.49999997f32,
            -0.49999997,
            1.0 - f32::EPSILON,
            1e-40,
            -1e-40,
        ]);
        for &y in &xs {
            assert_eq!(super::ceil_i(y), y.ceil() as i32, "ceil {y}");
            assert_eq!(super::floor_i(y), y.floor() as i32, "floor {y}");
            assert_eq!(super::round_i(y), y.round() as i32, "round {y}");
        }
        assert_eq!(
            (
                super::ceil_i(f32::NAN),
                super::floor_i(f32::NAN),
                super::round_i(f32::NAN)
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn outward_rounding_brackets_the_value() {
        for x in [0.1f32, -0.1, 1.0 / 3.0, -7.77, 1e-6, -1e-6, 0.0, 1000.3] {
            assert!(f16_up(x).to_f32() >= x, "{x}");
            assert!(f16_down(x).to_f32() <= x, "{x}");
            assert!((f16_up(x).to_f32() - x).abs() <= x.abs() * 1e-3 + 1e-7);
        }
    }

    /// The 8-bit copy is within one step of the summary, on the outer side for min/max.
    #[test]
    fn eight_bit_copy_brackets_the_summary() {
        let mut rng = crate::testutil::Rng::seeded(3);
        let hk = 24;
        for stat in [PageStat::MinMax, PageStat::MeanStd] {
            let keys = rng.vec(5 * hk, 3.0);
            let mut row = vec![f16::ZERO; 2 * hk];
            summarize(stat, &keys, 5, hk, &mut row);
            let mut codes = vec![0i8; 2 * hk];
            let s = quantize_page(stat, &row, &mut codes);
            let amax = row.iter().map(|x| x.to_f32().abs()).fold(0.0, f32::max);
            assert_eq!(s, amax / 127.0);
            for (c, (x, &q)) in row.iter().zip(&codes).enumerate() {
                let (x, y) = (x.to_f32(), s * q as f32);
                assert!(
                    (x - y).abs() <= s * (1.0 + 1e-5),
                    "{stat:?} {c}: {x} vs {y}"
                );
                if stat == PageStat::MinMax {
                    let tol = s * 1e-5;
                    assert!(
                        if c < hk { y >= x - tol } else { y <= x + tol },
                        "{c}: {x} vs {y}"
                    );
                } else {
                    assert!((x - y).abs() <= s * 0.5 * (1.0 + 1e-5), "{c}: {x} vs {y}");
                }
            }
        }
        let mut codes = [1i8; 4];
        assert_eq!(
            quantize_page(PageStat::MinMax, &[f16::ZERO; 4], &mut codes),
            0.0
        );
        assert_eq!(codes, [0; 4]);
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
