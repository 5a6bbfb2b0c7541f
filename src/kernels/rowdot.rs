//! Scores of many f16 rows against a few f32 vectors: `out[i] = max_j rows_i · w_j`, and the same products for a
//! KV block's keys stored transposed (`cols_dot_f16`, every vector's score kept).
//!
//! What selectors compute every decode step: each page summary (a row of 2·head_dim f16 values) scored
//! against the query heads of a KV head's group, keeping the best; or (token-level selection) every key of a block
//! against each query head; or (`rows_dot_max_i8`) every key of an index's 8-bit copy. The rows are read once for all
//! vectors, converted where they are loaded; AVX-512 and AVX2 builds beside the portable one, picked by
//! [`super::kernel`].

use half::f16;

use super::Kernel;

/// Most vectors one call takes (a GQA group's query heads).
pub const MAX_VECTORS: usize = 16;

/// Calls `$f::<N, _>(args)` for `nw` = N vectors (1 to 8), whose accumulators then stay in registers (a loop over a
/// run-time count kept them in memory, each FMA a store and a load), or `$f::<0, _>` for more (counted at run time).
#[cfg(target_arch = "x86_64")]
macro_rules! by_vectors {
    ($nw:expr, $f:ident, $($a:expr),*) => {
        match $nw {
            1 => $f::<1, _>($($a),*),
            2 => $f::<2, _>($($a),*),
            3 => $f::<3, _>($($a),*),
            4 => $f::<4, _>($($a),*),
            5 => $f::<5, _>($($a),*),
            6 => $f::<6, _>($($a),*),
            7 => $f::<7, _>($($a),*),
            8 => $f::<8, _>($($a),*),
            _ => $f::<0, _>($($a),*),
        }
    };
}

/// `out[i] = max_j Σ_c rows[i·d + c] · w[j·d + c]` for the `out.len()` rows of `rows` (n × d) and the
/// `w.len() / d` vectors of `w` (1 to [`MAX_VECTORS`]).
pub fn rows_dot_max_f16(rows: &[f16], d: usize, w: &[f32], out: &mut [f32]) {
    rows_dot_max_with(super::kernel(), rows, d, w, out)
}

pub(crate) fn rows_dot_max_with(k: Kernel, rows: &[f16], d: usize, w: &[f32], out: &mut [f32]) {
    dot_max(k, rows, d, w, out)
}

/// `out[i] = scales[i] · max_j s_j · Σ_c codes[i·d + c] · qi_j[c]` for the `out.len()` rows of `codes` (n × d,
/// 8-bit, each row with its scale ≥ 0, so the scale applies after the maximum) and the `w.len() / d` vectors of `w`
/// (1 to [`MAX_VECTORS`]), each quantized once to 8 bits (`w_j ≈ s_j · qi_j`, s_j = max|w_j| / 127), as llama.cpp
/// quantizes activations against 8-bit weights: the products are then integer dot products (AVX-512 VNNI, 64 per
/// instruction) instead of conversions, float products and a horizontal sum per row and vector. Integer sums are
/// exact and the float steps are the same on every path, so every path gives the same bits. Against the float
/// product the error is the query's rounding, at most `s_j / 2` per channel: |Δ| ≤ scales[i] · s_j / 2 · Σ_c |codes|.
/// Rows wider than [`MAX_QD`] channels take the float product (`w` unquantized).
///
/// With `each`, every vector's own score too: `each[j · n + i]` = the score of row i against vector j (n =
/// `out.len()`; `each` holds `w.len() / d · n`), of which `out[i]` is the largest (the same number).
pub fn rows_dot_max_i8(
    codes: &[i8],
    scales: &[f32],
    d: usize,
    w: &[f32],
    out: &mut [f32],
    each: Option<&mut [f32]>,
) {
    rows_dot_max_i8_with(super::kernel(), codes, scales, d, w, out, each)
}

/// How far ahead of its current row the 8-bit scan asks for rows, on every path (bytes). An in-process A/B of the
/// VNNI scan of SmolLM2's 8K middle (168 parts of 3450 rows of 64 codes, 3 vectors, 2 threads, six rounds): 3.6–4.3
/// ms per token without, 2.8–3.2 at 1 KiB ahead, 2.5–2.9 at 2 KiB, 2.7–2.8 at 4 KiB.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PF_AHEAD: usize = 2048;

/// Widest row [`rows_dot_max_i8`] quantizes the vectors for (their codes live on the stack).
pub const MAX_QD: usize = 512;

/// [`rows_dot_max_i8`] on kernel `k`.
pub(crate) fn rows_dot_max_i8_with(
    k: Kernel,
    codes: &[i8],
    scales: &[f32],
    d: usize,
    w: &[f32],
    out: &mut [f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] mut each: Option<&mut [f32]>,
) {
    let nw = w.len() / d.max(1);
    let n = out.len();
    assert!(
        scales.len() >= n
            && d > 0
            && (1..=MAX_VECTORS).contains(&nw)
            && w.len() == nw * d
            && codes.len() >= n * d
            && each.as_ref().is_none_or(|e| e.len() >= nw * n),
        "rows_dot_max_i8: {} scales, {nw} vectors of {d} for {n} rows",
        scales.len(),
    );
    if d > MAX_QD {
        let Some(e) = each else {
            dot_max(k, codes, d, w, out);
            for (o, &s) in out.iter_mut().zip(scales) {
                *o *= s;
            }
            return;
        };
        // Each vector's float products alone, and their maximum.
        out.fill(f32::NEG_INFINITY);
        for (j, wj) in w.chunks_exact(d).enumerate() {
            let ej = &mut e[j * n..(j + 1) * n];
            dot_max(k, codes, d, wj, ej);
            for ((v, &s), o) in ej.iter_mut().zip(scales).zip(out.iter_mut()) {
                *v *= s;
                *o = o.max(*v);
            }
        }
        return;
    }
    // The vectors' codes (and, for VNNI, the same + 128 as unsigned bytes) and steps.
    let mut qi = [0i8; MAX_VECTORS * MAX_QD];
    let mut step = [0.0f32; MAX_VECTORS];
    for ((wj, q), s) in w.chunks_exact(d).zip(qi.chunks_exact_mut(d)).zip(&mut step) {
        *s = quantize_i8(wj, q);
    }
    let (qi, step) = (&qi[..nw * d], &step[..nw]);
    let done = match k {
        // SAFETY: the AVX-512 kernel is only chosen when the CPU has F/BW/VL/VNNI; shapes checked above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if d.is_multiple_of(64) => unsafe {
            let e = each.as_deref_mut();
            // The vector count a constant where it is small, so the accumulators stay in registers.
            match nw {
                1 => i8q_vnni::<1>(codes, scales, d, qi, step, out, e),
                2 => i8q_vnni::<2>(codes, scales, d, qi, step, out, e),
                3 => i8q_vnni::<3>(codes, scales, d, qi, step, out, e),
                4 => i8q_vnni::<4>(codes, scales, d, qi, step, out, e),
                _ => i8q_vnni::<0>(codes, scales, d, qi, step, out, e),
            }
        },
        // SAFETY: the AVX2 kernel is only chosen when the CPU has AVX2 and FMA; shapes checked above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if d.is_multiple_of(32) => unsafe {
            let e = each.as_deref_mut();
            match nw {
                1 => i8q_avx2::<1>(codes, scales, d, qi, step, out, e),
                2 => i8q_avx2::<2>(codes, scales, d, qi, step, out, e),
                3 => i8q_avx2::<3>(codes, scales, d, qi, step, out, e),
                4 => i8q_avx2::<4>(codes, scales, d, qi, step, out, e),
                _ => i8q_avx2::<0>(codes, scales, d, qi, step, out, e),
            }
        },
        _ => 0,
    };
    i8q_portable(codes, scales, d, qi, step, out, done, each);
}

/// Quantizes `x` to 8 bits, `x ≈ s · out` with s = max|x| / 127 and out = round(x / s) (all zero when x is), and
/// returns s: an index's key copy and [`rows_dot_max_i8`]'s query vectors.
pub fn quantize_i8(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * inv).round() as i8;
    }
    amax / 127.0
}

/// Row i's scores from its integer dot products with the vectors (the float steps every path takes): each vector's
/// `(t · s_j) · scale` into `each[j · n + i]` when given, and `max_j (t · s_j) · scale` returned (scale ≥ 0 and
/// rounding is monotonic, so that is the largest of them as a number).
#[inline(always)]
fn i8q_score(
    dots: impl Iterator<Item = i32>,
    step: &[f32],
    scale: f32,
    mut each: Option<(&mut [f32], usize, usize)>,
) -> f32 {
    let mut best = f32::NEG_INFINITY;
    for (j, (t, &s)) in dots.zip(step).enumerate() {
        let v = t as f32 * s;
        if let Some((e, n, i)) = each.as_mut() {
            e[j * *n + *i] = v * scale;
        }
        best = best.max(v);
    }
    best * scale
}

/// Rows `from..out.len()` on the portable path.
#[allow(clippy::too_many_arguments)] // the rows, the quantized vectors and the two outputs
fn i8q_portable(
    codes: &[i8],
    scales: &[f32],
    d: usize,
    qi: &[i8],
    step: &[f32],
    out: &mut [f32],
    from: usize,
    mut each: Option<&mut [f32]>,
) {
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate().skip(from) {
        let r = &codes[i * d..][..d];
        ask_ahead(r);
        let dots = qi.chunks_exact(d).map(|q| {
            r.iter()
                .zip(q)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum::<i32>()
        });
        *o = i8q_score(
            dots,
            step,
            scales[i],
            each.as_deref_mut().map(|e| (e, n, i)),
        );
    }
}

/// Whole groups of 8 rows on AVX2 (d a multiple of 32); returns the rows done. Signed bytes times signed bytes
/// through `vpmaddubsw` (unsigned × signed): |row code| times the vector's code carrying the row code's sign, pairs
/// summed to 16 bits (at most 2 · 127 · 127, no saturation), then to 32 bits; each row's 8 lanes summed by a
/// transposing tree of `vphaddd` for 8 rows at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)] // as above
unsafe fn i8q_avx2<const NW: usize>(
    codes: &[i8],
    scales: &[f32],
    d: usize,
    qi: &[i8],
    step: &[f32],
    out: &mut [f32],
    mut each: Option<&mut [f32]>,
) -> usize {
    use std::arch::x86_64::*;
    let nw = if NW > 0 { NW } else { step.len() };
    let n = out.len();
    let groups = n / 8;
    let ones = _mm256_set1_epi16(1);
    let (cp, qp) = (codes.as_ptr(), qi.as_ptr());
    let mut acc = [[_mm256_setzero_si256(); 8]; MAX_VECTORS];
    for gi in 0..groups {
        for r in 0..8 {
            let row = cp.add((gi * 8 + r) * d);
            ask_ahead(std::slice::from_raw_parts(row, d));
            let mut a = [_mm256_setzero_si256(); MAX_VECTORS];
            for c in (0..d).step_by(32) {
                let x = _mm256_loadu_si256(row.add(c) as *const _);
                let ax = _mm256_abs_epi8(x);
                for (j, aj) in a.iter_mut().enumerate().take(nw) {
                    let q = _mm256_loadu_si256(qp.add(j * d + c) as *const _);
                    let p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(q, x));
                    *aj = _mm256_add_epi32(*aj, _mm256_madd_epi16(p16, ones));
                }
            }
            for j in 0..nw {
                acc[j][r] = a[j];
            }
        }
        let sc = _mm256_loadu_ps(scales.as_ptr().add(gi * 8));
        let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in 0..nw {
            let v = &acc[j];
            let lo =
                _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
            let hi =
                _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
            let t = _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(lo, hi),
                _mm256_permute2x128_si256::<0x31>(lo, hi),
            );
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(step[j]));
            if let Some(e) = each.as_deref_mut() {
                _mm256_storeu_ps(e.as_mut_ptr().add(j * n + gi * 8), _mm256_mul_ps(v, sc));
            }
            best = _mm256_max_ps(best, v);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(gi * 8), _mm256_mul_ps(best, sc));
    }
    groups * 8
}

/// Asks for the row [`PF_AHEAD`] bytes past `row` (a hint: the address may lie past the rows).
#[inline(always)]
fn ask_ahead(row: &[i8]) {
    #[cfg(target_arch = "x86_64")]
    for c in (0..row.len()).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(PF_AHEAD + c)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Sums of each vector's 16 lanes: lane i of the result = Σ lanes of `v[i]` (a transposing tree, 15 additions and
/// 24 shuffles for 16 rows instead of a horizontal sum per row).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn sum16(v: &[std::arch::x86_64::__m512i; 16]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // t[k]: 128-bit lanes 0, 1 hold v[2k]'s halves summed, 2, 3 v[2k + 1]'s.
    let t: [__m512i; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x44>(a, b),
            _mm512_shuffle_i32x4::<0xEE>(a, b),
        )
    });
    // u[m]: 128-bit lane L holds 4 partial sums of v[4m + L].
    let u: [__m512i; 4] = std::array::from_fn(|m| {
        let (a, b) = (t[2 * m], t[2 * m + 1]);
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(a, b),
            _mm512_shuffle_i32x4::<0xDD>(a, b),
        )
    });
    // Within each 128-bit lane L: [Σ u0, Σ u1, Σ u2, Σ u3], i.e. element 4L + m = v[4m + L].
    let p = _mm512_add_epi32(
        _mm512_unpacklo_epi32(u[0], u[1]),
        _mm512_unpackhi_epi32(u[0], u[1]),
    );
    let q = _mm512_add_epi32(
        _mm512_unpacklo_epi32(u[2], u[3]),
        _mm512_unpackhi_epi32(u[2], u[3]),
    );
    let r = _mm512_add_epi32(_mm512_unpacklo_epi64(p, q), _mm512_unpackhi_epi64(p, q));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_epi32(order, r)
}

/// The VNNI rows of [`rows_dot_max_i8`], 16 at a time (d a multiple of 64); returns the rows done (the rest go to
/// the portable loop). `vpdpbusd` multiplies unsigned by signed bytes: the vector's codes + 128 (1..255) times the
/// row's codes, less 128 · Σ codes (a second `vpdpbusd` with 128s), is the signed dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)] // the rows, the quantized vectors and the two outputs
unsafe fn i8q_vnni<const NW: usize>(
    codes: &[i8],
    scales: &[f32],
    d: usize,
    qi: &[i8],
    step: &[f32],
    out: &mut [f32],
    mut each: Option<&mut [f32]>,
) -> usize {
    use std::arch::x86_64::*;
    let nw = if NW > 0 { NW } else { step.len() };
    let n = out.len();
    let groups = n / 16;
    let mut qu = [0u8; MAX_VECTORS * MAX_QD];
    for (u, &q) in qu.iter_mut().zip(qi) {
        *u = (q as i16 + 128) as u8;
    }
    let c128 = _mm512_set1_epi8(-128);
    let (cp, qp) = (codes.as_ptr(), qu.as_ptr());
    let mut acc = [[_mm512_setzero_si512(); 16]; MAX_VECTORS];
    for gi in 0..groups {
        for r in 0..16 {
            let row = cp.add((gi * 16 + r) * d);
            // The scan reads its rows once, in order, and waits on memory more than on arithmetic: ask ahead.
            ask_ahead(std::slice::from_raw_parts(row, d));
            let mut a = [_mm512_setzero_si512(); MAX_VECTORS];
            let mut corr = _mm512_setzero_si512();
            for c in (0..d).step_by(64) {
                let x = _mm512_loadu_si512(row.add(c) as *const _);
                corr = _mm512_dpbusd_epi32(corr, c128, x);
                for (j, aj) in a.iter_mut().enumerate().take(nw) {
                    let q = _mm512_loadu_si512(qp.add(j * d + c) as *const _);
                    *aj = _mm512_dpbusd_epi32(*aj, q, x);
                }
            }
            for j in 0..nw {
                acc[j][r] = _mm512_sub_epi32(a[j], corr);
            }
        }
        let sc = _mm512_loadu_ps(scales.as_ptr().add(gi * 16));
        let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in 0..nw {
            let t = _mm512_cvtepi32_ps(sum16(&acc[j]));
            let v = _mm512_mul_ps(t, _mm512_set1_ps(step[j]));
            if let Some(e) = each.as_deref_mut() {
                _mm512_storeu_ps(e.as_mut_ptr().add(j * n + gi * 16), _mm512_mul_ps(v, sc));
            }
            best = _mm512_max_ps(best, v);
        }
        _mm512_storeu_ps(out.as_mut_ptr().add(gi * 16), _mm512_mul_ps(best, sc));
    }
    groups * 16
}

/// A row element the kernels below read: f16 (page summaries) or i8 (an index's key codes), converted to f32 where
/// it is loaded.
trait Elem: Copy {
    fn f32(self) -> f32;
    /// 16 elements from `p` as f32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 elements from `p` as f32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl Elem for i8 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
}

/// `out[i] = max_j Σ_c rows[i·d + c] · w[j·d + c]` on kernel `k`, for f16 or 8-bit rows.
fn dot_max<E: Elem>(k: Kernel, rows: &[E], d: usize, w: &[f32], out: &mut [f32]) {
    let nw = w.len() / d.max(1);
    assert!(
        d > 0
            && (1..=MAX_VECTORS).contains(&nw)
            && w.len() == nw * d
            && rows.len() >= out.len() * d,
        "rows · vectors: {} vectors of {d} over {} rows",
        nw,
        out.len()
    );
    match k {
        // SAFETY: a kernel is only chosen when the CPU has its features; shapes checked above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if d.is_multiple_of(16) => unsafe {
            by_vectors!(nw, avx512, rows, d, w, nw, out)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if d.is_multiple_of(8) => unsafe {
            by_vectors!(nw, avx2, rows, d, w, nw, out)
        },
        _ => portable(rows, d, w, nw, out),
    }
}

fn portable<E: Elem>(rows: &[E], d: usize, w: &[f32], nw: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let r = &rows[i * d..][..d];
        let mut best = f32::NEG_INFINITY;
        for wj in w.chunks_exact(d).take(nw) {
            // Eight partial sums, as the vector builds keep lanes.
            let mut acc = [0.0f32; 8];
            for (c, (x, y)) in r.iter().zip(wj).enumerate() {
                acc[c % 8] += x.f32() * y;
            }
            best = best.max(acc.iter().sum());
        }
        *o = best;
    }
}

/// Rows taken `R` at a time where the accumulators fit in registers: one row's product with a vector is a chain of
/// dependent FMAs (d / 16 of them, 4 cycles each), and a row at a time left the core waiting on that chain (about 56
/// cycles a 128-channel summary row with 3 vectors, in cache). `R` rows interleave their chains and share each vector
/// load. Every (row, vector) sum takes the same FMAs in the same order and the same reduction as a row alone, so the
/// result does not depend on the grouping (a test holds it). A decode step scores a layer's page summaries cold from
/// memory, and the hardware prefetchers stop at each 4 KiB page: each row group asks for the rows 4 KiB on
/// ([`super::ask_weights_ahead`], as the products do), which took a Quest step with 8-token pages at SmolLM2 8K from
/// 28.2 / 17.9 / 19.9 to 26.5 / 16.7 / 17.4 ms per token (with and without, alternated step by step in one process on
/// a 2-core Xeon, an eval sweep on the other core). The AVX2 path does the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn avx512<const NW: usize, E: Elem>(
    rows: &[E],
    d: usize,
    w: &[f32],
    nw: usize,
    out: &mut [f32],
) {
    let nw = if NW > 0 { NW } else { nw };
    let (rp, wp, n) = (rows.as_ptr(), w.as_ptr(), out.len());
    let (base, row_bytes) = (rp as *const u8, d * std::mem::size_of::<E>());
    let mut i = 0;
    // 32 registers: 4 rows × up to 4 vectors, or 2 rows × up to 8.
    if (1..=4).contains(&NW) {
        while i + 4 <= n {
            super::ask_weights_ahead(base.wrapping_add(i * row_bytes), 4 * row_bytes);
            avx512_rows::<NW, 4, E>(rp.add(i * d), d, wp, nw, &mut out[i..i + 4]);
            i += 4;
        }
    } else if (5..=8).contains(&NW) {
        while i + 2 <= n {
            super::ask_weights_ahead(base.wrapping_add(i * row_bytes), 2 * row_bytes);
            avx512_rows::<NW, 2, E>(rp.add(i * d), d, wp, nw, &mut out[i..i + 2]);
            i += 2;
        }
    }
    while i < n {
        avx512_rows::<NW, 1, E>(rp.add(i * d), d, wp, nw, &mut out[i..i + 1]);
        i += 1;
    }
}

/// `out[r]` for the `R` rows at `rp` (see [`avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn avx512_rows<const NW: usize, const R: usize, E: Elem>(
    rp: *const E,
    d: usize,
    wp: *const f32,
    nw: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); MAX_VECTORS]; R];
    for c in (0..d).step_by(16) {
        let mut x = [_mm512_setzero_ps(); R];
        for (r, x) in x.iter_mut().enumerate() {
            *x = E::load16(rp.add(r * d + c));
        }
        for j in 0..nw {
            let wv = _mm512_loadu_ps(wp.add(j * d + c));
            for (a, &x) in acc.iter_mut().zip(&x) {
                a[j] = _mm512_fmadd_ps(x, wv, a[j]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a
            .iter()
            .take(nw)
            .map(|&a| _mm512_reduce_add_ps(a))
            .fold(f32::NEG_INFINITY, f32::max);
    }
}

/// As [`avx512`], 2 rows at a time up to 4 vectors (16 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const NW: usize, E: Elem>(
    rows: &[E],
    d: usize,
    w: &[f32],
    nw: usize,
    out: &mut [f32],
) {
    let nw = if NW > 0 { NW } else { nw };
    let (rp, wp, n) = (rows.as_ptr(), w.as_ptr(), out.len());
    let (base, row_bytes) = (rp as *const u8, d * std::mem::size_of::<E>());
    let mut i = 0;
    if (1..=4).contains(&NW) {
        while i + 2 <= n {
            super::ask_weights_ahead(base.wrapping_add(i * row_bytes), 2 * row_bytes);
            avx2_rows::<NW, 2, E>(rp.add(i * d), d, wp, nw, &mut out[i..i + 2]);
            i += 2;
        }
    }
    while i < n {
        avx2_rows::<NW, 1, E>(rp.add(i * d), d, wp, nw, &mut out[i..i + 1]);
        i += 1;
    }
}

/// `out[r]` for the `R` rows at `rp` (see [`avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn avx2_rows<const NW: usize, const R: usize, E: Elem>(
    rp: *const E,
    d: usize,
    wp: *const f32,
    nw: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); MAX_VECTORS]; R];
    for c in (0..d).step_by(8) {
        let mut x = [_mm256_setzero_ps(); R];
        for (r, x) in x.iter_mut().enumerate() {
            *x = E::load8(rp.add(r * d + c));
        }
        for j in 0..nw {
            let wv = _mm256_loadu_ps(wp.add(j * d + c));
            for (a, &x) in acc.iter_mut().zip(&x) {
                a[j] = _mm256_fmadd_ps(x, wv, a[j]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        let mut best = f32::NEG_INFINITY;
        for a in a.iter().take(nw) {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            best = best.max(lanes.iter().sum());
        }
        *o = best;
    }
}

/// `out[j · bt + t] = Σ_c kt[c·bt + t] · w[j·d + c]` for the `bt` columns of `kt` (d × bt, a KV block's keys stored
/// channel-major) and the `w.len() / d` vectors of `w` (1 to [`MAX_VECTORS`]): every key of a block scored against
/// every query head of its group, each key channel loaded once for all of them.
pub fn cols_dot_f16(kt: &[f16], bt: usize, w: &[f32], out: &mut [f32]) {
    cols_dot_with(super::kernel(), kt, bt, w, out, &[])
}

/// [`cols_dot_f16`] that also asks for `next` (the keys of the block to be scored after this one, laid out alike, or
/// empty) a channel's line with each channel it reads, into L2: blocks are separate allocations the hardware
/// prefetchers do not follow, and asking for the whole next block at once fills the core's miss buffers while this
/// one waits. (Into L1 instead, the scoring phase of TokenSelect at 8K took 130–146 µs a layer against 89–111 into
/// L2.) The same results as [`cols_dot_f16`].
pub fn cols_dot_f16_next(kt: &[f16], bt: usize, w: &[f32], out: &mut [f32], next: &[f16]) {
    cols_dot_with(super::kernel(), kt, bt, w, out, next)
}

/// [`cols_dot_f16_next`] into rows `stride` apart: vector j's score of column t goes to `out[j · stride + t]`, so a
/// caller's score rows (one per vector, longer than a block) are written in place, with no copy of a block's tile.
///
/// # Safety
/// `out` must be valid for writes at `j · stride + t` for every vector j < `w.len() / d` and column t < `bt`, and no
/// other thread may access those elements meanwhile (the elements between the rows are not touched).
pub unsafe fn cols_dot_f16_next_strided(
    kt: &[f16],
    bt: usize,
    w: &[f32],
    out: *mut f32,
    stride: usize,
    next: &[f16],
) {
    cols_dot_raw(super::kernel(), kt, bt, w, out, stride, next)
}

pub(crate) fn cols_dot_with(
    k: Kernel,
    kt: &[f16],
    bt: usize,
    w: &[f32],
    out: &mut [f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] next: &[f16],
) {
    let nw = w.len() / (kt.len() / bt.max(1)).max(1);
    assert!(
        out.len() >= nw * bt,
        "cols_dot_f16: {nw} vectors over {bt} columns into {} outputs",
        out.len()
    );
    // SAFETY: out holds the nw rows of bt, bt apart (checked above).
    unsafe { cols_dot_raw(k, kt, bt, w, out.as_mut_ptr(), bt, next) }
}

/// The kernels behind [`cols_dot_f16`]: vector j's scores into `out[j · stride ..][..bt]`.
///
/// # Safety
/// As [`cols_dot_f16_next_strided`].
unsafe fn cols_dot_raw(
    k: Kernel,
    kt: &[f16],
    bt: usize,
    w: &[f32],
    out: *mut f32,
    stride: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] next: &[f16],
) {
    let d = kt.len() / bt.max(1);
    let nw = w.len() / d.max(1);
    assert!(
        bt > 0
            && d > 0
            && kt.len() == d * bt
            && (1..=MAX_VECTORS).contains(&nw)
            && w.len() == nw * d
            && stride >= bt,
        "cols_dot_f16: {nw} vectors of {d} over {bt} columns, rows {stride} apart"
    );
    match k {
        // SAFETY: a kernel is only chosen when the CPU has its features; shapes checked above, `out` by the caller.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if bt.is_multiple_of(16) && bt <= 64 => unsafe {
            cols_avx512(kt, bt, d, w, nw, (out, stride), next)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if bt.is_multiple_of(8) && bt <= 64 => unsafe {
            cols_avx2(kt, bt, d, w, nw, (out, stride), next)
        },
        _ => {
            for j in 0..nw {
                // SAFETY: row j's bt outputs are the caller's (see above), and nothing else refers to them here.
                let row = unsafe { std::slice::from_raw_parts_mut(out.add(j * stride), bt) };
                row.fill(0.0);
                for c in 0..d {
                    let wc = w[j * d + c];
                    for (o, x) in row.iter_mut().zip(&kt[c * bt..][..bt]) {
                        *o += x.to_f32() * wc;
                    }
                }
            }
        }
    }
}

/// Up to 4 vectors at a time over the d channels: each channel's bt keys are loaded and converted once for the 4, and
/// the 4 × bt/16 accumulators (at most 16 registers) give that many independent FMA chains. (One vector at a time
/// converted every key once per vector, and its bt/16 chains waited on the FMA latency: TokenSelect's scoring of
/// SmolLM2 at 8K, 3 vectors of 64 channels per block, ran at half the speed of full attention's.) Each output still
/// adds its channels in order 0..d, so the bits do not depend on the grouping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn cols_avx512(
    kt: &[f16],
    bt: usize,
    d: usize,
    w: &[f32],
    nw: usize,
    (op, os): (*mut f32, usize),
    next: &[f16],
) {
    let (kp, wp) = (kt.as_ptr() as *const u16, w.as_ptr());
    let ahead = NextLines::of(next, bt);
    match bt / 16 {
        1 => cols_avx512_nv::<1>(kp, bt, d, wp, nw, (op, os), ahead),
        2 => cols_avx512_nv::<2>(kp, bt, d, wp, nw, (op, os), ahead),
        3 => cols_avx512_nv::<3>(kp, bt, d, wp, nw, (op, os), ahead),
        _ => cols_avx512_nv::<4>(kp, bt, d, wp, nw, (op, os), ahead),
    }
}

/// The next block's keys, asked for into L2 a channel at a time ([`cols_dot_f16_next`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct NextLines {
    base: *const u16,
    /// Channels it holds (0: none).
    channels: usize,
    bt: usize,
}

#[cfg(target_arch = "x86_64")]
impl NextLines {
    fn of(next: &[f16], bt: usize) -> Self {
        Self {
            base: next.as_ptr() as *const u16,
            channels: next.len() / bt.max(1),
            bt,
        }
    }

    /// Prefetches channel c's elements (bt of them: the lines they begin in).
    #[inline(always)]
    fn channel(self, c: usize) {
        if c >= self.channels {
            return;
        }
        // SAFETY: a prefetch is a hint and never faults; the addresses lie inside `next`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            let p = self.base.add(c * self.bt) as usize;
            let mut line = p & !63;
            while line < p + 2 * self.bt {
                _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
                line += 64;
            }
        }
    }
}

/// [`cols_avx512`] for bt = 16·NV: the vectors in groups of up to 4.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn cols_avx512_nv<const NV: usize>(
    kp: *const u16,
    bt: usize,
    d: usize,
    wp: *const f32,
    nw: usize,
    (op, os): (*mut f32, usize),
    ahead: NextLines,
) {
    let mut j0 = 0;
    while j0 < nw {
        let (wj, oj) = (wp.add(j0 * d), (op.add(j0 * os), os));
        // The next block's lines with the first group of vectors only.
        let ahead = if j0 == 0 {
            ahead
        } else {
            NextLines::of(&[], bt)
        };
        match nw - j0 {
            1 => cols_avx512_tile::<NV, 1>(kp, bt, d, wj, oj, ahead),
            2 => cols_avx512_tile::<NV, 2>(kp, bt, d, wj, oj, ahead),
            3 => cols_avx512_tile::<NV, 3>(kp, bt, d, wj, oj, ahead),
            _ => cols_avx512_tile::<NV, 4>(kp, bt, d, wj, oj, ahead),
        }
        j0 += (nw - j0).min(4);
    }
}

/// NJ vectors (`w`: NJ × d) against the block's bt = 16·NV keys, into `o` (NJ rows of bt, `os` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn cols_avx512_tile<const NV: usize, const NJ: usize>(
    kp: *const u16,
    bt: usize,
    d: usize,
    w: *const f32,
    (o, os): (*mut f32, usize),
    ahead: NextLines,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; NJ];
    for c in 0..d {
        ahead.channel(c);
        let mut x = [_mm512_setzero_ps(); NV];
        for (v, xv) in x.iter_mut().enumerate() {
            *xv = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(c * bt + 16 * v) as *const __m256i));
        }
        for (j, aj) in acc.iter_mut().enumerate() {
            let wc = _mm512_set1_ps(*w.add(j * d + c));
            for (a, xv) in aj.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(*xv, wc, *a);
            }
        }
    }
    for (j, aj) in acc.iter().enumerate() {
        for (v, a) in aj.iter().enumerate() {
            _mm512_storeu_ps(o.add(j * os + 16 * v), *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn cols_avx2(
    kt: &[f16],
    bt: usize,
    d: usize,
    w: &[f32],
    nw: usize,
    (op, os): (*mut f32, usize),
    next: &[f16],
) {
    use std::arch::x86_64::*;
    let (kp, wp) = (kt.as_ptr() as *const u16, w.as_ptr());
    let ahead = NextLines::of(next, bt);
    for j in 0..nw {
        // Strips of 32 columns (4 accumulators) so the registers hold them.
        for t0 in (0..bt).step_by(32) {
            let nv = (bt - t0).min(32) / 8;
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..d {
                if j == 0 && t0 == 0 {
                    ahead.channel(c);
                }
                let wc = _mm256_set1_ps(*wp.add(j * d + c));
                for (v, a) in acc.iter_mut().enumerate().take(nv) {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(
                        kp.add(c * bt + t0 + 8 * v) as *const __m128i
                    ));
                    *a = _mm256_fmadd_ps(x, wc, *a);
                }
            }
            for (v, a) in acc.iter().enumerate().take(nv) {
                _mm256_storeu_ps(op.add(j * os + t0 + 8 * v), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// A random block of keys (d × bt, channel-major f16) and `nw` vectors of d.
    fn block_and_vectors(seed: u64, d: usize, nw: usize, bt: usize) -> (Vec<f16>, Vec<f32>) {
        let mut rng = Rng(seed);
        let kt = rng
            .vec(d * bt, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        (kt, rng.vec(nw * d, 1.0))
    }

    #[test]
    fn column_scores_match_the_f64_sum_on_every_path() {
        for (d, nw, bt) in [
            (64, 3, 32),
            (128, 7, 16),
            (64, 1, 64),
            (24, 4, 8),
            (32, 16, 48),
        ] {
            let (kt, w) = block_and_vectors(d as u64 * 17 + bt as u64, d, nw, bt);
            for k in super::super::available() {
                let mut out = vec![f32::NAN; nw * bt];
                cols_dot_with(k, &kt, bt, &w, &mut out, &kt);
                for j in 0..nw {
                    for t in 0..bt {
                        let e: f64 = (0..d)
                            .map(|c| kt[c * bt + t].to_f64() * w[j * d + c] as f64)
                            .sum();
                        let g = out[j * bt + t] as f64;
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{k:?} d {d} bt {bt}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn strided_column_scores_are_the_same_bits_in_place_and_leave_the_gaps_alone() {
        for (d, nw, bt) in [(64, 3, 32), (128, 7, 16), (24, 4, 8), (32, 16, 48)] {
            let (kt, w) = block_and_vectors(d as u64 * 5 + nw as u64, d, nw, bt);
            let stride = bt * 3 + 5;
            for k in super::super::available() {
                let mut dense = vec![f32::NAN; nw * bt];
                cols_dot_with(k, &kt, bt, &w, &mut dense, &[]);
                let mut rows = vec![7.0f32; nw * stride];
                // SAFETY: nw rows of bt, stride apart, inside `rows`.
                unsafe { cols_dot_raw(k, &kt, bt, &w, rows.as_mut_ptr().add(2), stride, &kt) };
                for j in 0..nw {
                    for t in 0..stride {
                        let g = rows[j * stride + t];
                        if (2..2 + bt).contains(&t) {
                            assert_eq!(
                                g.to_bits(),
                                dense[j * bt + t - 2].to_bits(),
                                "{k:?} {d}x{bt}"
                            );
                        } else {
                            assert_eq!(g, 7.0, "{k:?}: wrote outside row {j}'s columns (at {t})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn eight_bit_rows_give_the_same_bits_on_every_path_within_the_query_rounding() {
        // Row counts around the VNNI path's groups of 16 (tails go to the portable loop); d over MAX_QD takes the
        // float product.
        for (d, nw, n) in [
            (64, 3, 37),
            (64, 1, 16),
            (128, 7, 50),
            (256, 1, 33),
            (16, 1, 9),
            (24, 2, 4),
            (8, 16, 3),
            (10, 2, 6),
            (640, 2, 5),
        ] {
            let mut rng = Rng(d as u64 * 7 + nw as u64);
            let codes: Vec<i8> = rng
                .vec(n * d, 127.0)
                .into_iter()
                .map(|x| x.round() as i8)
                .collect();
            let scales: Vec<f32> = (0..n).map(|i| 0.01 * (i % 5) as f32).collect();
            let w = rng.vec(nw * d, 1.0);
            let step: Vec<f64> = w
                .chunks_exact(d)
                .map(|v| v.iter().fold(0.0f32, |a, &x| a.max(x.abs())) as f64 / 127.0)
                .collect();
            let exact: Vec<f64> = (0..n)
                .map(|i| {
                    scales[i] as f64
                        * (0..nw)
                            .map(|j| {
                                (0..d)
                                    .map(|c| codes[i * d + c] as f64 * w[j * d + c] as f64)
                                    .sum::<f64>()
                            })
                            .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect();
            let mut first: Option<Vec<f32>> = None;
            for k in super::super::available() {
                let mut out = vec![f32::NAN; n];
                rows_dot_max_i8_with(k, &codes, &scales, d, &w, &mut out, None);
                for (i, (g, e)) in out.iter().zip(&exact).enumerate() {
                    let l1: f64 = codes[i * d..][..d].iter().map(|&c| (c as f64).abs()).sum();
                    let bound = if d > MAX_QD {
                        1e-5 * (1.0 + e.abs())
                    } else {
                        scales[i] as f64 * l1 * step.iter().fold(0.0f64, |a, &b| a.max(b)) / 2.0
                            + 1e-5 * (1.0 + e.abs())
                    };
                    assert!(
                        (*g as f64 - e).abs() <= bound,
                        "{k:?} d {d} vectors {nw} row {i}: {g} vs {e} (bound {bound})"
                    );
                }
                // Each vector's own scores: within the query's rounding of that vector's exact product, their
                // maximum `out` (and `out` the same with or without them, on the integer path).
                let mut out2 = vec![f32::NAN; n];
                let mut each = vec![f32::NAN; nw * n];
                rows_dot_max_i8_with(k, &codes, &scales, d, &w, &mut out2, Some(&mut each));
                for i in 0..n {
                    let best = (0..nw)
                        .map(|j| each[j * n + i])
                        .fold(f32::NEG_INFINITY, f32::max);
                    // (Equal as numbers: a zero scale may give either sign of zero.)
                    assert_eq!(best, out2[i], "{k:?} d {d} row {i}: max of each");
                    if d <= MAX_QD {
                        assert_eq!(out2[i], out[i], "{k:?} d {d} row {i}");
                    }
                    for j in 0..nw {
                        let e: f64 = scales[i] as f64
                            * (0..d)
                                .map(|c| codes[i * d + c] as f64 * w[j * d + c] as f64)
                                .sum::<f64>();
                        let l1: f64 = codes[i * d..][..d].iter().map(|&c| (c as f64).abs()).sum();
                        let bound = scales[i] as f64 * l1 * step[j] / 2.0 + 1e-5 * (1.0 + e.abs());
                        let g = each[j * n + i] as f64;
                        assert!(
                            (g - e).abs() <= bound,
                            "{k:?} d {d} row {i} vector {j}: {g} vs {e} (bound {bound})"
                        );
                    }
                }
                match &first {
                    None => first = Some(out),
                    Some(f) if d <= MAX_QD => assert!(
                        f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{k:?} d {d} vectors {nw}: not the same bits as the first path"
                    ),
                    Some(_) => {}
                }
            }
        }
    }

    /// Timing of the 8-bit scan at SmolLM2's shape (8000 keys of 64, three query heads) against the float product
    /// it replaced: `cargo test --release --lib eight_bit_scan_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn eight_bit_scan_timing() {
        let (n, d, nw) = (8000, 64, 3);
        let mut rng = Rng(3);
        // 90 streams' worth (30 layers x 3 KV heads), so the codes come from memory as in a decode step.
        let streams: usize = std::env::var("STREAMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(90);
        let codes: Vec<i8> = rng
            .vec(streams * n * d, 127.0)
            .into_iter()
            .map(|x| x.round() as i8)
            .collect();
        let scales: Vec<f32> = (0..streams * n).map(|i| 0.01 * (i % 5) as f32).collect();
        let w = rng.vec(nw * d, 1.0);
        let mut out = vec![0.0f32; n];
        let k = super::super::kernel();
        for name in ["float", "int8"] {
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                for st in 0..streams {
                    let c = &codes[st * n * d..(st + 1) * n * d];
                    if name == "float" {
                        dot_max(k, c, d, &w, &mut out);
                    } else {
                        rows_dot_max_i8_with(k, c, &scales[st * n..], d, &w, &mut out, None);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{name}: {:.2} ms for {streams} streams, {:.1} GB/s",
                best * 1e3,
                (streams * n * (d + 4)) as f64 / best / 1e9
            );
        }
    }

    /// Page-summary scoring as Quest does it at SmolLM2 8K with 8-token pages: 84 streams (28 selecting layers × 3 KV
    /// heads) of 1000 summaries of 2 × 64 f16 channels, 3 query vectors, on one thread; `STREAMS=1` keeps one
    /// stream's summaries in cache. `cargo test --release --lib page_scoring_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn page_scoring_timing() {
        let (n, d, nw) = (1000, 128, 3);
        let streams: usize = std::env::var("STREAMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(84);
        let mut rng = Rng(4);
        let rows: Vec<f16> = rng
            .vec(streams * n * d, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let w = rng.vec(nw * d, 1.0);
        let mut out = vec![0.0f32; n];
        for k in super::super::available() {
            let mut best = f64::INFINITY;
            for _ in 0..30 {
                let t = std::time::Instant::now();
                for st in 0..streams {
                    rows_dot_max_with(k, &rows[st * n * d..(st + 1) * n * d], d, &w, &mut out);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{k:?}: {:.3} ms for {streams} streams ({:.1} us each), {:.1} GB/s",
                best * 1e3,
                best * 1e6 / streams as f64,
                (streams * n * d * 2) as f64 / best / 1e9
            );
        }
    }

    /// A row's score does not depend on the rows scored with it: every path gives each row of a run the bits it
    /// gives that row alone (the vector paths take rows 4 or 2 at a time, with the remainder one by one).
    #[test]
    fn a_row_scores_the_same_alone_and_in_a_run() {
        for (d, nw, n) in [
            (128, 3, 11),
            (64, 4, 9),
            (32, 6, 7),
            (48, 8, 5),
            (16, 12, 3),
            (128, 1, 6),
        ] {
            let mut rng = Rng(d as u64 + 7 * nw as u64);
            let rows: Vec<f16> = rng.vec(n * d, 2.0).into_iter().map(f16::from_f32).collect();
            let w = rng.vec(nw * d, 1.0);
            for k in super::super::available() {
                let mut run = vec![0.0; n];
                rows_dot_max_with(k, &rows, d, &w, &mut run);
                for (i, &r) in run.iter().enumerate() {
                    let mut one = [0.0];
                    rows_dot_max_with(k, &rows[i * d..(i + 1) * d], d, &w, &mut one);
                    assert_eq!(
                        r.to_bits(),
                        one[0].to_bits(),
                        "{k:?} d {d} vectors {nw} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_path_matches_the_f64_sum() {
        for (d, nw, n) in [(64, 3, 37), (128, 7, 5), (16, 1, 9), (24, 2, 4), (8, 16, 3)] {
            let mut rng = Rng(d as u64 * 131 + nw as u64);
            let rows: Vec<f16> = rng.vec(n * d, 2.0).into_iter().map(f16::from_f32).collect();
            let w = rng.vec(nw * d, 1.0);
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    (0..nw)
                        .map(|j| {
                            (0..d)
                                .map(|c| rows[i * d + c].to_f64() * w[j * d + c] as f64)
                                .sum::<f64>()
                        })
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect();
            for k in super::super::available() {
                let mut out = vec![0.0; n];
                rows_dot_max_with(k, &rows, d, &w, &mut out);
                for (g, e) in out.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{k:?} d {d} vectors {nw}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
