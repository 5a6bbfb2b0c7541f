//! AVX2 + FMA + F16C kernels: the same scheme as the AVX-512 ones on 8-row halves of a row group
//! (the layout's 32-byte halves), with `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd`.
//! `vpmaddubsw` saturates at ±32767: 4-6 bit weights (≤ 63 × 127 × 2) never reach it; the 8-bit
//! (Q8_0 + 128) weights go back to signed, and their magnitude (≤ 128) multiplies the activation with the
//! weight's sign (≤ 2 · 128 · 127): one multiply per 32 bytes, not two (on Zen 1 every integer multiply
//! shares one pipe, and the split's second one made the Q8_0 logits compute-bound).

use super::layout::{a_hdr, Kind, K_HDR, Q6_HDR, RG};
use super::Ctx;
use std::arch::x86_64::*;

/// Compute `y` for row groups `rg0..rg1` and tokens `t0..t1`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `c` must describe live buffers; no other thread may write
/// the same part of `y`.
pub(crate) unsafe fn run(c: &Ctx, rg0: usize, rg1: usize, t0: usize, t1: usize) {
    if c.kind.is_float() {
        for rg in rg0..rg1 {
            float_rg(c, rg, t0, t1);
        }
        return;
    }
    for rg in rg0..rg1 {
        for h in 0..2 {
            if rg * RG + 8 * h >= c.rows {
                break;
            }
            let mut t = t0;
            while t < t1 {
                // Tiles of up to 4 tokens (a remainder of 3 in one tile: each weight block unpacked once).
                let nt = (t1 - t).min(4);
                match nt {
                    4 => tile::<4>(c, rg, h, t),
                    3 => tile::<3>(c, rg, h, t),
                    2 => tile::<2>(c, rg, h, t),
                    _ => tile::<1>(c, rg, h, t),
                }
                t += nt;
            }
        }
    }
}

#[inline(always)]
unsafe fn tile<const T: usize>(c: &Ctx, rg: usize, h: usize, t0: usize) {
    match c.kind {
        Kind::Q4_0 => a_kernel::<T, 4, false>(c, rg, h, t0),
        Kind::Q4_1 => a_kernel::<T, 4, true>(c, rg, h, t0),
        Kind::Q5_0 => a_kernel::<T, 5, false>(c, rg, h, t0),
        Kind::Q5_1 => a_kernel::<T, 5, true>(c, rg, h, t0),
        Kind::Q8_0 => a_kernel::<T, 8, false>(c, rg, h, t0),
        Kind::Q4K => k45_kernel::<T, false>(c, rg, h, t0),
        Kind::Q5K => k45_kernel::<T, true>(c, rg, h, t0),
        Kind::Q6K => q6k_kernel::<T>(c, rg, h, t0),
        Kind::F32 | Kind::F16 | Kind::BF16 => unreachable!(),
    }
}

#[inline(always)]
unsafe fn store<const T: usize>(c: &Ctx, rg: usize, h: usize, t0: usize, acc: &[__m256; T]) {
    let r0 = rg * RG + 8 * h;
    let nr = (c.rows - r0).min(8);
    for (t, a) in acc.iter().enumerate() {
        let y = c.y.add((t0 + t) * c.rows + r0);
        if nr == 8 {
            _mm256_storeu_ps(y, *a);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), y, nr);
        }
    }
}

#[inline(always)]
unsafe fn bcast(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn ld(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline(always)]
unsafe fn cvt_f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// 32 bits → 32 bytes of 0x00 / 0xFF.
#[inline(always)]
unsafe fn bits_to_bytes(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bm = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(b, bm), _mm256_set1_epi64x(-1))
}

/// Sum of products of unsigned weight bytes and signed activation bytes, per 4 bytes, as i32.
#[inline(always)]
unsafe fn dot<const BITS: u32>(w: __m256i, a: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if BITS == 8 {
        // w = q + 128: the signed q is w ^ 0x80, and q · a = |q| · (a with q's sign), so one `vpmaddubsw` takes
        // |q| ≤ 128 unsigned (pairs ≤ 2 · 128 · 127 < 2¹⁵). The block's sum starts at 0, not at −128 · Σa.
        let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(a, q)),
            ones,
        )
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones)
    }
}

/// Half `h` of groups 2i, 2i+1 of a packed 32-element slice at `q` (BITS 4, 5 or 8).
#[inline(always)]
unsafe fn unpack_pair<const BITS: u32>(q: *const u8, i: usize, h: usize) -> (__m256i, __m256i) {
    if BITS == 8 {
        return (
            ld(q.add(128 * i + 32 * h)),
            ld(q.add(128 * i + 64 + 32 * h)),
        );
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let v = ld(q.add(64 * i + 32 * h));
    let mut w0 = _mm256_and_si256(v, m4);
    let mut w1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    if BITS == 5 {
        let b16 = _mm256_set1_epi8(0x10);
        let hb = q.add(256 + 4 * h) as *const u32;
        w0 = _mm256_or_si256(
            w0,
            _mm256_and_si256(bits_to_bytes(hb.add(4 * i).read_unaligned()), b16),
        );
        w1 = _mm256_or_si256(
            w1,
            _mm256_and_si256(bits_to_bytes(hb.add(4 * i + 2).read_unaligned()), b16),
        );
    }
    (w0, w1)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn a_kernel<const T: usize, const BITS: u32, const MIN: bool>(
    c: &Ctx,
    rg: usize,
    h: usize,
    t0: usize,
) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let mut acc = [_mm256_setzero_ps(); T];
    for kb in 0..nb {
        let p = base.add(kb * c.rec);
        if h == 0 {
            // The second half (h = 1) reads the row group again, from the caches.
            super::ask_weights_ahead(p, c.rec);
        }
        let q = p.add(a_hdr(MIN));
        let mut s = [_mm256_setzero_si256(); T];
        if !MIN && BITS != 8 {
            for (t, s) in s.iter_mut().enumerate() {
                *s = _mm256_set1_epi32(*c.i1.add((t0 + t) * nb + kb));
            }
        }
        for i in 0..4 {
            let (w0, w1) = unpack_pair::<BITS>(q, i, h);
            for (t, s) in s.iter_mut().enumerate() {
                let a = c.qa.add((t0 + t) * c.cols + kb * 32 + 8 * i);
                *s = _mm256_add_epi32(*s, dot::<BITS>(w0, bcast(a)));
                *s = _mm256_add_epi32(*s, dot::<BITS>(w1, bcast(a.add(4))));
            }
        }
        let dv = cvt_f16x8(p.add(16 * h));
        for t in 0..T {
            let ab = (t0 + t) * nb + kb;
            let sc = _mm256_mul_ps(dv, _mm256_set1_ps(*c.f1.add(ab)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), sc, acc[t]);
        }
        if MIN {
            let mv = cvt_f16x8(p.add(32 + 16 * h));
            for t in 0..T {
                let ab = (t0 + t) * nb + kb;
                acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*c.f2.add(ab)), acc[t]);
            }
        }
    }
    store::<T>(c, rg, h, t0, &acc);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k45_kernel<const T: usize, const Q5: bool>(c: &Ctx, rg: usize, h: usize, t0: usize) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let sub = if Q5 { 320 } else { 256 };
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..nb {
        let p = base.add(sb * c.rec);
        if h == 0 {
            // The second half (h = 1) reads the row group again, from the caches.
            super::ask_weights_ahead(p, c.rec);
        }
        let dv = cvt_f16x8(p.add(16 * h));
        let dminv = cvt_f16x8(p.add(32 + 16 * h));
        for j in 0..8 {
            let q = p.add(K_HDR + j * sub);
            let mut s = [_mm256_setzero_si256(); T];
            for i in 0..4 {
                let (w0, w1) = if Q5 {
                    unpack_pair::<5>(q, i, h)
                } else {
                    unpack_pair::<4>(q, i, h)
                };
                for (t, s) in s.iter_mut().enumerate() {
                    let a = c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32 + 8 * i);
                    *s = _mm256_add_epi32(*s, dot::<4>(w0, bcast(a)));
                    *s = _mm256_add_epi32(*s, dot::<4>(w1, bcast(a.add(4))));
                }
            }
            let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                p.add(64 + 16 * j + 8 * h) as *const __m128i,
            )));
            let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                p.add(192 + 16 * j + 8 * h) as *const __m128i,
            )));
            let scd = _mm256_mul_ps(sc, dv);
            let mnd = _mm256_mul_ps(mn, dminv);
            for t in 0..T {
                let ab = (t0 + t) * nb + sb;
                let f = _mm256_mul_ps(scd, _mm256_set1_ps(*c.f1.add(ab)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), f, acc[t]);
                acc[t] = _mm256_fnmadd_ps(mnd, _mm256_set1_ps(*c.f2.add(ab * 8 + j)), acc[t]);
            }
        }
    }
    store::<T>(c, rg, h, t0, &acc);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_kernel<const T: usize>(c: &Ctx, rg: usize, h: usize, t0: usize) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..nb {
        let p = base.add(sb * c.rec);
        if h == 0 {
            // The second half (h = 1) reads the row group again, from the caches.
            super::ask_weights_ahead(p, c.rec);
        }
        let dv = cvt_f16x8(p.add(16 * h));
        for j in 0..8 {
            let q = p.add(Q6_HDR + j * 384);
            for hh in 0..2 {
                let k16 = 2 * j + hh;
                let mut s = [_mm256_setzero_si256(); T];
                for (t, s) in s.iter_mut().enumerate() {
                    *s = _mm256_set1_epi32(*c.i1.add(((t0 + t) * nb + sb) * 16 + k16));
                }
                let hi = ld(q.add(256 + 64 * hh + 32 * h));
                for ii in 0..2 {
                    let i = 2 * hh + ii;
                    let v = ld(q.add(64 * i + 32 * h));
                    let lo0 = _mm256_and_si256(v, m4);
                    let lo1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                    let (h0, h1) = if ii == 0 {
                        (_mm256_slli_epi16::<4>(hi), _mm256_slli_epi16::<2>(hi))
                    } else {
                        (hi, _mm256_srli_epi16::<2>(hi))
                    };
                    let w0 = _mm256_or_si256(lo0, _mm256_and_si256(h0, m30));
                    let w1 = _mm256_or_si256(lo1, _mm256_and_si256(h1, m30));
                    for (t, s) in s.iter_mut().enumerate() {
                        let a = c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32 + 8 * i);
                        *s = _mm256_add_epi32(*s, dot::<6>(w0, bcast(a)));
                        *s = _mm256_add_epi32(*s, dot::<6>(w1, bcast(a.add(4))));
                    }
                }
                let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    p.add(32 + 16 * k16 + 8 * h) as *const __m128i,
                )));
                let scd = _mm256_mul_ps(sc, dv);
                for t in 0..T {
                    let ab = (t0 + t) * nb + sb;
                    let f = _mm256_mul_ps(scd, _mm256_set1_ps(*c.f1.add(ab)));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), f, acc[t]);
                }
            }
        }
    }
    store::<T>(c, rg, h, t0, &acc);
}

// ---------------------------------------------------------------------------------------------------
// Float weights.

unsafe fn float_rg(c: &Ctx, rg: usize, t0: usize, t1: usize) {
    let r_end = (rg * RG + RG).min(c.rows);
    let mut r = rg * RG;
    while r < r_end {
        let nr = if r_end - r >= 4 { 4 } else { 1 };
        let mut t = t0;
        while t < t1 {
            let nt = if t1 - t >= 2 { 2 } else { 1 };
            match (c.kind, nr, nt) {
                (Kind::F32, 4, 2) => f_kernel::<4, 2, 0>(c, r, t),
                (Kind::F32, 4, _) => f_kernel::<4, 1, 0>(c, r, t),
                (Kind::F32, _, 2) => f_kernel::<1, 2, 0>(c, r, t),
                (Kind::F32, _, _) => f_kernel::<1, 1, 0>(c, r, t),
                (Kind::F16, 4, 2) => f_kernel::<4, 2, 1>(c, r, t),
                (Kind::F16, 4, _) => f_kernel::<4, 1, 1>(c, r, t),
                (Kind::F16, _, 2) => f_kernel::<1, 2, 1>(c, r, t),
                (Kind::F16, _, _) => f_kernel::<1, 1, 1>(c, r, t),
                (_, 4, 2) => f_kernel::<4, 2, 2>(c, r, t),
                (_, 4, _) => f_kernel::<4, 1, 2>(c, r, t),
                (_, _, 2) => f_kernel::<1, 2, 2>(c, r, t),
                (_, _, _) => f_kernel::<1, 1, 2>(c, r, t),
            }
            t += nt;
        }
        r += nr;
    }
}

#[inline(always)]
unsafe fn wload<const E: u8>(p: *const u8, k: usize) -> __m256 {
    match E {
        0 => _mm256_loadu_ps((p as *const f32).add(k)),
        1 => _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(k) as *const __m128i)),
        _ => {
            let v =
                _mm256_cvtepu16_epi32(_mm_loadu_si128((p as *const u16).add(k) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
        }
    }
}

#[inline(always)]
unsafe fn wscalar<const E: u8>(p: *const u8, k: usize) -> f32 {
    match E {
        0 => (p as *const f32).add(k).read_unaligned(),
        1 => half::f16::from_bits((p as *const u16).add(k).read_unaligned()).to_f32(),
        _ => half::bf16::from_bits((p as *const u16).add(k).read_unaligned()).to_f32(),
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f_kernel<const R: usize, const T: usize, const E: u8>(c: &Ctx, r0: usize, t0: usize) {
    let esz = if E == 0 { 4 } else { 2 };
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut rp = [std::ptr::null::<u8>(); R];
    for (r, p) in rp.iter_mut().enumerate() {
        *p = c.data.add((r0 + r) * c.cols * esz);
    }
    let n8 = c.cols / 8 * 8;
    let mut k = 0;
    while k < n8 {
        let mut w = [_mm256_setzero_ps(); R];
        for r in 0..R {
            w[r] = wload::<E>(rp[r], k);
        }
        for t in 0..T {
            let x = _mm256_loadu_ps(c.fx.add((t0 + t) * c.cols + k));
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(w[r], x, acc[r][t]);
            }
        }
        k += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum(acc[r][t]);
            let x = c.fx.add((t0 + t) * c.cols);
            for k in n8..c.cols {
                s += wscalar::<E>(rp[r], k) * *x.add(k);
            }
            *c.y.add((t0 + t) * c.rows + r0 + r) = s;
        }
    }
}
