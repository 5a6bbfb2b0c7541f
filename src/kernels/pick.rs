//! The two passes of a top-k selection over f32 scores (`methods::select::top_k`), as stream compactions.
//!
//! A score is compared as its *order key*: an integer whose unsigned order is `f32::total_cmp`'s order of the
//! score ([`order_key`]), so NaNs, both zeros and infinities have one place each and every comparison is an integer
//! one. [`band_keys`] counts the keys above a band and copies those inside it, in row order; [`keep_indices`] writes
//! the indices of the keys above a threshold and of the ties past the first `skip`, ascending. The portable loops are
//! branch-free (a write at every index, the output cursor moving on only for a kept one); the AVX2 path compacts 8
//! lanes through a permutation table, the AVX-512 path 16 through `vpcompressd`. All paths give the same output.

use super::Kernel;

/// An integer whose order is `f32::total_cmp`'s order of `x`: negative scores have every bit flipped, the others
/// only the sign bit.
#[inline(always)]
pub fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// Slots past a row's length that [`band_keys`] and [`keep_indices`] may write into (a SIMD store of a whole
/// register at the end of the output); callers size their output `n + PAD`.
pub const PAD: usize = 16;

/// Of the order keys of `scores`: how many lie above `hi`, and those in `[lo, hi]` copied to the front of `out` in
/// row order (returns `(above, copied)`). `out` holds at least `scores.len() + PAD` slots.
pub fn band_keys(scores: &[f32], lo: u32, hi: u32, out: &mut [u32]) -> (usize, usize) {
    band_keys_with(super::kernel(), scores, lo, hi, out)
}

/// The indices of the keys of `scores` above `t`, and of those equal to `t` all but the first `skip`, ascending,
/// at the front of `out`; returns how many. `out` holds at least `scores.len() + PAD` slots.
pub fn keep_indices(scores: &[f32], t: u32, skip: usize, out: &mut [u32]) -> usize {
    keep_indices_with(super::kernel(), scores, t, skip, out)
}

/// [`band_keys`] on kernel `k`.
pub(crate) fn band_keys_with(
    k: Kernel,
    scores: &[f32],
    lo: u32,
    hi: u32,
    out: &mut [u32],
) -> (usize, usize) {
    let n = scores.len();
    assert!(
        out.len() >= n + PAD,
        "band_keys: {} slots for {n} scores",
        out.len()
    );
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let (mut i, mut over, mut b) = (0, 0, 0);
    match k {
        // SAFETY: the kernel is chosen only when the CPU has its features; `out` holds n + PAD slots.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { (i, over, b) = band_avx512(scores, lo, hi, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { (i, over, b) = band_avx2(scores, lo, hi, out) },
        _ => {}
    }
    for &x in &scores[i..] {
        let key = order_key(x);
        over += (key > hi) as usize;
        out[b] = key;
        b += (key >= lo && key <= hi) as usize;
    }
    (over, b)
}

/// [`keep_indices`] on kernel `k`.
pub(crate) fn keep_indices_with(
    k: Kernel,
    scores: &[f32],
    t: u32,
    skip: usize,
    out: &mut [u32],
) -> usize {
    let n = scores.len();
    assert!(
        out.len() >= n + PAD && n <= u32::MAX as usize,
        "keep_indices: {} slots for {n} scores",
        out.len()
    );
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let (mut i, mut skip, mut w) = (0, skip, 0);
    match k {
        // SAFETY: as in `band_keys_with`.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { (i, skip, w) = keep_avx512(scores, t, skip, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { (i, skip, w) = keep_avx2(scores, t, skip, out) },
        _ => {}
    }
    for (j, &x) in scores.iter().enumerate().skip(i) {
        let key = order_key(x);
        let eq = key == t;
        let keep = key > t || (eq && skip == 0);
        skip -= (eq && skip > 0) as usize;
        out[w] = j as u32;
        w += keep as usize;
    }
    w
}

/// Clears the lowest `skip` set bits of `eq` (as many as it has); returns the mask and the skip left.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn drop_first_ties(mut eq: u32, mut skip: usize) -> (u32, usize) {
    while skip > 0 && eq != 0 {
        eq &= eq - 1;
        skip -= 1;
    }
    (eq, skip)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn keys16(p: *const f32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let b = _mm512_loadu_si512(p as *const _);
    let flip = _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(i32::MIN));
    _mm512_xor_si512(b, flip)
}

/// Whole groups of 16: returns (scores done, above, copied).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn band_avx512(scores: &[f32], lo: u32, hi: u32, out: &mut [u32]) -> (usize, usize, usize) {
    use std::arch::x86_64::*;
    let (vlo, vhi) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(hi as i32));
    let (mut over, mut b) = (0, 0);
    let groups = scores.len() / 16;
    for g in 0..groups {
        let key = keys16(scores.as_ptr().add(g * 16));
        let above = _mm512_cmpgt_epu32_mask(key, vhi);
        let inside = _mm512_cmpge_epu32_mask(key, vlo) & !above;
        over += above.count_ones() as usize;
        _mm512_storeu_si512(
            out.as_mut_ptr().add(b) as *mut _,
            _mm512_maskz_compress_epi32(inside, key),
        );
        b += inside.count_ones() as usize;
    }
    (groups * 16, over, b)
}

/// Whole groups of 16: returns (scores done, skip left, written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn keep_avx512(
    scores: &[f32],
    t: u32,
    mut skip: usize,
    out: &mut [u32],
) -> (usize, usize, usize) {
    use std::arch::x86_64::*;
    let vt = _mm512_set1_epi32(t as i32);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut w = 0;
    let groups = scores.len() / 16;
    for g in 0..groups {
        let key = keys16(scores.as_ptr().add(g * 16));
        let mut keep = _mm512_cmpgt_epu32_mask(key, vt);
        let eq = _mm512_cmpeq_epu32_mask(key, vt);
        if eq != 0 {
            let (e, s) = drop_first_ties(eq as u32, skip);
            skip = s;
            keep |= e as u16;
        }
        let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32((g * 16) as i32));
        _mm512_storeu_si512(
            out.as_mut_ptr().add(w) as *mut _,
            _mm512_maskz_compress_epi32(keep, idx),
        );
        w += keep.count_ones() as usize;
    }
    (groups * 16, skip, w)
}

/// For each 8-bit lane mask, the lanes set in it, packed to the front as 4-bit lane numbers (the rest 0).
#[cfg(target_arch = "x86_64")]
const COMPACT8: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut m = 0;
    while m < 256 {
        let (mut v, mut at, mut lane) = (0u32, 0, 0);
        while lane < 8 {
            if m & (1 << lane) != 0 {
                v |= (lane as u32) << (4 * at);
                at += 1;
            }
            lane += 1;
        }
        t[m] = v;
        m += 1;
    }
    t
};

/// Lanes of an 8-lane mask packed to the front of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compact8(x: std::arch::x86_64::__m256i, mask: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let perm = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(COMPACT8[mask as usize] as i32), shifts),
        _mm256_set1_epi32(0xF),
    );
    _mm256_permutevar8x32_epi32(x, perm)
}

/// Order keys of 8 scores, and the same with the sign bit flipped (signed comparisons of those order as unsigned
/// comparisons of the keys).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keys8(p: *const f32) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let b = _mm256_loadu_si256(p as *const _);
    let sign = _mm256_set1_epi32(i32::MIN);
    let key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
    (key, _mm256_xor_si256(key, sign))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn band_avx2(scores: &[f32], lo: u32, hi: u32, out: &mut [u32]) -> (usize, usize, usize) {
    use std::arch::x86_64::*;
    // Signed comparisons of sign-flipped keys: key > hi as (key ^ sign) > (hi ^ sign), key ≥ lo as ¬(lo > key).
    let (slo, shi) = (
        _mm256_set1_epi32((lo ^ 0x8000_0000) as i32),
        _mm256_set1_epi32((hi ^ 0x8000_0000) as i32),
    );
    let (mut over, mut b) = (0, 0);
    let groups = scores.len() / 8;
    for g in 0..groups {
        let (key, s) = keys8(scores.as_ptr().add(g * 8));
        let above = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(s, shi))) as u32;
        let below = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(slo, s))) as u32;
        let inside = !(above | below) & 0xFF;
        over += above.count_ones() as usize;
        _mm256_storeu_si256(out.as_mut_ptr().add(b) as *mut _, compact8(key, inside));
        b += inside.count_ones() as usize;
    }
    (groups * 8, over, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keep_avx2(
    scores: &[f32],
    t: u32,
    mut skip: usize,
    out: &mut [u32],
) -> (usize, usize, usize) {
    use std::arch::x86_64::*;
    let st = _mm256_set1_epi32((t ^ 0x8000_0000) as i32);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut w = 0;
    let groups = scores.len() / 8;
    for g in 0..groups {
        let (_, s) = keys8(scores.as_ptr().add(g * 8));
        let mut keep = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(s, st))) as u32;
        let eq = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(s, st))) as u32;
        if eq != 0 {
            let (e, left) = drop_first_ties(eq, skip);
            skip = left;
            keep |= e;
        }
        let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32((g * 8) as i32));
        _mm256_storeu_si256(out.as_mut_ptr().add(w) as *mut _, compact8(idx, keep));
        w += keep.count_ones() as usize;
    }
    (groups * 8, skip, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_order_as_total_cmp() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(
                    order_key(a).cmp(&order_key(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    /// Every kernel path gives the portable loop's output, over lengths that leave every remainder and over rows
    /// with many ties (skips that end inside a SIMD group, or outlast the ties).
    #[test]
    fn every_path_compacts_as_the_portable_loop() {
        let mut rng = crate::testutil::Rng::seeded(11);
        for case in 0..200 {
            let n = case * 3 % 157;
            let levels = 1 + case % 7;
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.below(10) {
                    0 => -0.0,
                    1 => 0.0,
                    _ => rng.below(levels) as f32 - 2.0,
                })
                .collect();
            let keys: Vec<u32> = scores.iter().map(|&x| order_key(x)).collect();
            let (lo, hi) = (order_key(-1.0), order_key(rng.below(levels) as f32 - 1.5));
            let t = order_key(rng.below(levels) as f32 - 2.0);
            let ties = keys.iter().filter(|&&k| k == t).count();
            let skip = rng.below(ties + 2);
            let want_band: Vec<u32> = keys
                .iter()
                .copied()
                .filter(|&k| k >= lo && k <= hi)
                .collect();
            let want_over = keys.iter().filter(|&&k| k > hi).count();
            let mut seen = 0;
            let want_keep: Vec<u32> = (0..n as u32)
                .filter(|&i| {
                    let k = keys[i as usize];
                    if k == t {
                        seen += 1;
                        seen > skip
                    } else {
                        k > t
                    }
                })
                .collect();
            for k in crate::kernels::available() {
                let mut out = vec![0u32; n + PAD];
                let (over, b) = band_keys_with(k, &scores, lo, hi, &mut out);
                assert_eq!(
                    (over, &out[..b]),
                    (want_over, &want_band[..]),
                    "{k:?} band, case {case}"
                );
                let w = keep_indices_with(k, &scores, t, skip, &mut out);
                assert_eq!(
                    &out[..w],
                    &want_keep[..],
                    "{k:?} keep, case {case}, skip {skip}"
                );
            }
        }
    }
}
