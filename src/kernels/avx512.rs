//! AVX-512 kernels (avx512f/bw/vl + avx512vnni `vpdpbusd`).
//!
//! One call computes a tile of 16 rows (one row group) × T tokens (T = 1 to 8). Per weight block
//! the 16 rows' unsigned values are unpacked once into registers (one 64-byte register per 4 columns),
//! then for each token `vpdpbusd` against the token's 4 activation bytes broadcast to all lanes gives
//! the 16 rows' partial sums in the 16 lanes: after 8 of them each lane holds its row's whole integer
//! block dot product, which is scaled (one convert, one multiply, one FMA per block and token) into the
//! token's float accumulator. No horizontal reductions anywhere.

use super::layout::{a_hdr, Kind, K_HDR, Q6_HDR, RG};
use super::Ctx;
use std::arch::x86_64::*;

/// Compute `y` for row groups `rg0..rg1` and tokens `t0..t1`.
///
/// # Safety
/// The CPU must support avx512f/bw/vl/vnni, avx2, fma and f16c; `c` must describe live buffers; no
/// other thread may write the same part of `y`.
pub(crate) unsafe fn run(c: &Ctx, rg0: usize, rg1: usize, t0: usize, t1: usize) {
    if c.kind.is_float() {
        for rg in rg0..rg1 {
            float_rg(c, rg, t0, t1);
        }
        return;
    }
    for rg in rg0..rg1 {
        // Tiles of up to 8 tokens; a remainder of 3..7 gets a tile of its own size, so a batch of a few sequences
        // unpacks each weight block once (not once per power-of-two piece).
        let mut t = t0;
        while t < t1 {
            let nt = (t1 - t).min(8);
            match nt {
                8 => tile::<8>(c, rg, t),
                7 => tile::<7>(c, rg, t),
                6 => tile::<6>(c, rg, t),
                5 => tile::<5>(c, rg, t),
                4 => tile::<4>(c, rg, t),
                3 => tile::<3>(c, rg, t),
                2 => tile::<2>(c, rg, t),
                _ => tile::<1>(c, rg, t),
            }
            t += nt;
        }
    }
}

#[inline(always)]
unsafe fn tile<const T: usize>(c: &Ctx, rg: usize, t0: usize) {
    match c.kind {
        Kind::Q4_0 => a_kernel::<T, 4, false>(c, rg, t0),
        Kind::Q4_1 => a_kernel::<T, 4, true>(c, rg, t0),
        Kind::Q5_0 => a_kernel::<T, 5, false>(c, rg, t0),
        Kind::Q5_1 => a_kernel::<T, 5, true>(c, rg, t0),
        Kind::Q8_0 => a_kernel::<T, 8, false>(c, rg, t0),
        Kind::Q4K => k45_kernel::<T, false>(c, rg, t0),
        Kind::Q5K => k45_kernel::<T, true>(c, rg, t0),
        Kind::Q6K => q6k_kernel::<T>(c, rg, t0),
        Kind::F32 | Kind::F16 | Kind::BF16 => unreachable!(),
    }
}

#[inline(always)]
unsafe fn store<const T: usize>(c: &Ctx, rg: usize, t0: usize, acc: &[__m512; T]) {
    let nr = (c.rows - rg * RG).min(RG);
    let mask: u16 = if nr >= 16 { 0xFFFF } else { (1u16 << nr) - 1 };
    for (t, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(c.y.add((t0 + t) * c.rows + rg * RG), mask, *a);
    }
}

#[inline(always)]
unsafe fn bcast(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn ld(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

#[inline(always)]
unsafe fn cvt_f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// The two value registers (groups 2i and 2i+1) of a packed 32-element slice at `q`.
/// BITS 4: nibbles; 5: nibbles + bit masks at `q+256`; 8: bytes.
#[inline(always)]
unsafe fn unpack_pair<const BITS: u32>(q: *const u8, i: usize) -> (__m512i, __m512i) {
    if BITS == 8 {
        return (ld(q.add(128 * i)), ld(q.add(128 * i + 64)));
    }
    let m4 = _mm512_set1_epi8(0x0F);
    let v = ld(q.add(64 * i));
    let mut w0 = _mm512_and_si512(v, m4);
    let mut w1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
    if BITS == 5 {
        let b16 = _mm512_set1_epi8(0x10);
        let hb = q.add(256) as *const u64;
        w0 = _mm512_mask_add_epi8(w0, hb.add(2 * i).read_unaligned(), w0, b16);
        w1 = _mm512_mask_add_epi8(w1, hb.add(2 * i + 1).read_unaligned(), w1, b16);
    }
    (w0, w1)
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against Q8_0/Q8_1 activations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn a_kernel<const T: usize, const BITS: u32, const MIN: bool>(
    c: &Ctx,
    rg: usize,
    t0: usize,
) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let mut acc = [_mm512_setzero_ps(); T];
    for kb in 0..nb {
        let p = base.add(kb * c.rec);
        super::ask_weights_ahead_l2(p, c.rec);
        let q = p.add(a_hdr(MIN));
        let mut s = [_mm512_setzero_si512(); T];
        if !MIN {
            for (t, s) in s.iter_mut().enumerate() {
                *s = _mm512_set1_epi32(*c.i1.add((t0 + t) * nb + kb));
            }
        }
        // Two chains per token (even and odd groups) halve the vpdpbusd dependency chain.
        let mut s2 = [_mm512_setzero_si512(); T];
        for i in 0..4 {
            let (w0, w1) = unpack_pair::<BITS>(q, i);
            for t in 0..T {
                let a = c.qa.add((t0 + t) * c.cols + kb * 32 + 8 * i);
                s[t] = _mm512_dpbusd_epi32(s[t], w0, bcast(a));
                s2[t] = _mm512_dpbusd_epi32(s2[t], w1, bcast(a.add(4)));
            }
        }
        for t in 0..T {
            s[t] = _mm512_add_epi32(s[t], s2[t]);
        }
        let dv = cvt_f16x16(p);
        for t in 0..T {
            let ab = (t0 + t) * nb + kb;
            let sc = _mm512_mul_ps(dv, _mm512_set1_ps(*c.f1.add(ab)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), sc, acc[t]);
        }
        if MIN {
            let mv = cvt_f16x16(p.add(32));
            for t in 0..T {
                let ab = (t0 + t) * nb + kb;
                acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*c.f2.add(ab)), acc[t]);
            }
        }
    }
    store::<T>(c, rg, t0, &acc);
}

/// Q4_K and Q5_K against Q8_K activations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k45_kernel<const T: usize, const Q5: bool>(c: &Ctx, rg: usize, t0: usize) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let sub = if Q5 { 320 } else { 256 };
    let mut acc = [_mm512_setzero_ps(); T];
    for sb in 0..nb {
        let p = base.add(sb * c.rec);
        super::ask_weights_ahead_l2(p, c.rec);
        let dv = cvt_f16x16(p);
        let dminv = cvt_f16x16(p.add(32));
        for j in 0..8 {
            let q = p.add(K_HDR + j * sub);
            let mut s = [_mm512_setzero_si512(); T];
            for i in 0..4 {
                let (w0, w1) = if Q5 {
                    unpack_pair::<5>(q, i)
                } else {
                    unpack_pair::<4>(q, i)
                };
                for (t, s) in s.iter_mut().enumerate() {
                    let a = c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32 + 8 * i);
                    *s = _mm512_dpbusd_epi32(*s, w0, bcast(a));
                    *s = _mm512_dpbusd_epi32(*s, w1, bcast(a.add(4)));
                }
            }
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                p.add(64 + 16 * j) as *const __m128i
            )));
            let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                p.add(192 + 16 * j) as *const __m128i
            )));
            let scd = _mm512_mul_ps(sc, dv);
            let mnd = _mm512_mul_ps(mn, dminv);
            for t in 0..T {
                let ab = (t0 + t) * nb + sb;
                let f = _mm512_mul_ps(scd, _mm512_set1_ps(*c.f1.add(ab)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), f, acc[t]);
                acc[t] = _mm512_fnmadd_ps(mnd, _mm512_set1_ps(*c.f2.add(ab * 8 + j)), acc[t]);
            }
        }
    }
    store::<T>(c, rg, t0, &acc);
}

/// Q6_K against Q8_K activations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_kernel<const T: usize>(c: &Ctx, rg: usize, t0: usize) {
    let nb = c.n_blk;
    let base = c.data.add(rg * nb * c.rec);
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); T];
    for sb in 0..nb {
        let p = base.add(sb * c.rec);
        super::ask_weights_ahead_l2(p, c.rec);
        let dv = cvt_f16x16(p);
        for j in 0..8 {
            let q = p.add(Q6_HDR + j * 384);
            for h in 0..2 {
                let k16 = 2 * j + h;
                let mut s = [_mm512_setzero_si512(); T];
                for (t, s) in s.iter_mut().enumerate() {
                    *s = _mm512_set1_epi32(*c.i1.add(((t0 + t) * nb + sb) * 16 + k16));
                }
                let hi = ld(q.add(256 + 64 * h));
                for ii in 0..2 {
                    let i = 2 * h + ii;
                    let v = ld(q.add(64 * i));
                    let lo0 = _mm512_and_si512(v, m4);
                    let lo1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    let (h0, h1) = if ii == 0 {
                        (_mm512_slli_epi16::<4>(hi), _mm512_slli_epi16::<2>(hi))
                    } else {
                        (hi, _mm512_srli_epi16::<2>(hi))
                    };
                    let w0 = _mm512_or_si512(lo0, _mm512_and_si512(h0, m30));
                    let w1 = _mm512_or_si512(lo1, _mm512_and_si512(h1, m30));
                    for (t, s) in s.iter_mut().enumerate() {
                        let a = c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32 + 8 * i);
                        *s = _mm512_dpbusd_epi32(*s, w0, bcast(a));
                        *s = _mm512_dpbusd_epi32(*s, w1, bcast(a.add(4)));
                    }
                }
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    p.add(32 + 16 * k16) as *const __m128i,
                )));
                let scd = _mm512_mul_ps(sc, dv);
                for t in 0..T {
                    let ab = (t0 + t) * nb + sb;
                    let f = _mm512_mul_ps(scd, _mm512_set1_ps(*c.f1.add(ab)));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), f, acc[t]);
                }
            }
        }
    }
    store::<T>(c, rg, t0, &acc);
}

// ---------------------------------------------------------------------------------------------------
// Float weights (F32, F16, BF16): R rows × T tokens of f32 FMAs, horizontal sums at the end.

unsafe fn float_rg(c: &Ctx, rg: usize, t0: usize, t1: usize) {
    let r_end = (rg * RG + RG).min(c.rows);
    let mut r = rg * RG;
    while r < r_end {
        let nr = if r_end - r >= 4 { 4 } else { 1 };
        let mut t = t0;
        while t < t1 {
            let nt = if t1 - t >= 4 {
                4
            } else if t1 - t >= 2 {
                2
            } else {
                1
            };
            match (c.kind, nr, nt) {
                (Kind::F32, 4, 4) => f_kernel::<4, 4, 0>(c, r, t),
                (Kind::F32, 4, 2) => f_kernel::<4, 2, 0>(c, r, t),
                (Kind::F32, 4, _) => f_kernel::<4, 1, 0>(c, r, t),
                (Kind::F32, _, 4) => f_kernel::<1, 4, 0>(c, r, t),
                (Kind::F32, _, 2) => f_kernel::<1, 2, 0>(c, r, t),
                (Kind::F32, _, _) => f_kernel::<1, 1, 0>(c, r, t),
                (Kind::F16, 4, 4) => f_kernel::<4, 4, 1>(c, r, t),
                (Kind::F16, 4, 2) => f_kernel::<4, 2, 1>(c, r, t),
                (Kind::F16, 4, _) => f_kernel::<4, 1, 1>(c, r, t),
                (Kind::F16, _, 4) => f_kernel::<1, 4, 1>(c, r, t),
                (Kind::F16, _, 2) => f_kernel::<1, 2, 1>(c, r, t),
                (Kind::F16, _, _) => f_kernel::<1, 1, 1>(c, r, t),
                (_, 4, 4) => f_kernel::<4, 4, 2>(c, r, t),
                (_, 4, 2) => f_kernel::<4, 2, 2>(c, r, t),
                (_, 4, _) => f_kernel::<4, 1, 2>(c, r, t),
                (_, _, 4) => f_kernel::<1, 4, 2>(c, r, t),
                (_, _, 2) => f_kernel::<1, 2, 2>(c, r, t),
                (_, _, _) => f_kernel::<1, 1, 2>(c, r, t),
            }
            t += nt;
        }
        r += nr;
    }
}

/// Load 16 weights (E: 0 = f32, 1 = f16, 2 = bf16) starting at element `k` of the row at `p`,
/// masked to the lanes in `m`.
#[inline(always)]
unsafe fn wload<const E: u8>(p: *const u8, k: usize, m: u16) -> __m512 {
    match E {
        0 => _mm512_maskz_loadu_ps(m, (p as *const f32).add(k)),
        1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (p as *const i16).add(k))),
        _ => {
            let v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (p as *const i16).add(k)));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f_kernel<const R: usize, const T: usize, const E: u8>(c: &Ctx, r0: usize, t0: usize) {
    let esz = if E == 0 { 4 } else { 2 };
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut rp = [std::ptr::null::<u8>(); R];
    for (r, p) in rp.iter_mut().enumerate() {
        *p = c.data.add((r0 + r) * c.cols * esz);
    }
    let mut k = 0;
    while k < c.cols {
        let m: u16 = if c.cols - k >= 16 {
            0xFFFF
        } else {
            (1u16 << (c.cols - k)) - 1
        };
        let mut w = [_mm512_setzero_ps(); R];
        for r in 0..R {
            w[r] = wload::<E>(rp[r], k, m);
        }
        for t in 0..T {
            let x = _mm512_maskz_loadu_ps(m, c.fx.add((t0 + t) * c.cols + k));
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(w[r], x, acc[r][t]);
            }
        }
        k += 16;
    }
    for r in 0..R {
        for t in 0..T {
            *c.y.add((t0 + t) * c.rows + r0 + r) = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}
