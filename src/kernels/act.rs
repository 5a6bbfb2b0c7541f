//! Activation quantization, matching what llama.cpp's CPU backend does on x86-64 before its integer
//! dot products (the weight type's `vec_dot_type`):
//!
//! * Q8_0 / Q8_1 (ggml-cpu `quantize_row_q8_0` / `quantize_row_q8_1`, AVX2 build): per 32 values,
//!   `amax = max|x|`, `d = amax / 127` stored as f16, `q = round_half_even(x * (127 / amax))`.
//!   Q8_1 also stores `s = f16(d * sum(q))` with the unrounded f32 `d`.
//!   (ggml's scalar reference uses `1/d` and `roundf`; the x86 build, the one our logits are compared
//!   with, uses the formulas above. They differ only on exact ties.)
//! * Q8_K (`quantize_row_q8_K_ref`, used on every architecture): per 256 values, `max` = the value of
//!   largest magnitude (first one wins), `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))`
//!   (round half to even), `d = 1 / iscale` kept as f32, `bsums` = sums of 16 consecutive `q`.
//! * F16 / BF16: values rounded to nearest-even in that format.
//!
//! Besides the quantized values, we precompute what the kernels add per block (see `layout.rs`):
//! the integer start value `-off * sum(q)` that folds the unsigned weight offset in, the Q8_1 `s`,
//! and for Q8_K `-32 * bsum16` (Q6_K) or `d * bsum32` (Q4_K/Q5_K mins).

use super::layout::Kind;
use half::{bf16, f16};

#[inline]
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantize one 32-value block to Q8_0. Returns (d as f32 after f16 rounding, d unrounded, sum(q)).
#[inline]
pub(crate) fn q8_block(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x[..32].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q[..32].iter_mut().zip(&x[..32]) {
        let r = (v * id).round_ties_even() as i32;
        let r = r.clamp(-128, 127);
        *qi = r as i8;
        sum += r;
    }
    (round_f16(d), d, sum)
}

/// Quantize one 256-value super-block to Q8_K: returns d and fills q and bsums (16 sums of 16).
#[inline]
pub(crate) fn q8k_block(x: &[f32], q: &mut [i8], bsums: &mut [i32; 16]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in &x[..256] {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax == 0.0 {
        q[..256].fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qi, &v) in q[..256].iter_mut().zip(&x[..256]) {
        let r = (iscale * v).round_ties_even() as i32;
        *qi = r.min(127) as i8;
    }
    for (j, s) in bsums.iter_mut().enumerate() {
        *s = q[16 * j..16 * j + 16].iter().map(|&v| v as i32).sum();
    }
    1.0 / iscale
}

/// Per-token activation buffers, as the kernels read them.
/// * 32-blocks: `f1[t*nb+b]` = d, `i1[t*nb+b]` = -off*sum(q), `f2[t*nb+b]` = s (Q8_1).
/// * Q8_K: `f1[t*nb+b]` = d, `i1[(t*nb+b)*16+k]` = -32*bsum16 (Q6_K), `f2[(t*nb+b)*8+j]` = d*bsum32.
/// * floats: `fx[t*cols+c]`.
pub(crate) struct ActRow<'a> {
    pub qa: &'a mut [i8],
    pub f1: &'a mut [f32],
    pub f2: &'a mut [f32],
    pub i1: &'a mut [i32],
    pub fx: &'a mut [f32],
}

/// Sizes (qa, f1, f2, i1, fx) per token for a kind and row length.
pub(crate) fn act_sizes(kind: Kind, cols: usize) -> (usize, usize, usize, usize, usize) {
    match kind {
        Kind::F32 => (0, 0, 0, 0, 0),
        Kind::F16 | Kind::BF16 => (0, 0, 0, 0, cols),
        Kind::Q4K | Kind::Q5K | Kind::Q6K => {
            let nb = cols / 256;
            (cols, nb, nb * 8, nb * 16, 0)
        }
        _ => {
            let nb = cols / 32;
            (cols, nb, nb, nb, 0)
        }
    }
}

/// Quantize one token's activations `x` for weight kind `kind` (scalar reference; SIMD versions must
/// produce identical bytes).
pub(crate) fn quantize_row(kind: Kind, x: &[f32], a: ActRow<'_>, simd: bool) {
    match kind {
        Kind::F32 => {}
        Kind::F16 => {
            super::f32_to_f16_round(x, a.fx);
        }
        Kind::BF16 => {
            for (o, &v) in a.fx.iter_mut().zip(x) {
                *o = bf16::from_f32(v).to_f32();
            }
        }
        Kind::Q4K | Kind::Q5K | Kind::Q6K => {
            let nb = x.len() / 256;
            let mut bs = [0i32; 16];
            for b in 0..nb {
                #[cfg(target_arch = "x86_64")]
                let d = if simd && super::has_avx2() {
                    // SAFETY: AVX2 presence checked; slices hold a whole super-block.
                    unsafe {
                        q8k_block_avx2(
                            &x[b * 256..b * 256 + 256],
                            &mut a.qa[b * 256..b * 256 + 256],
                            &mut bs,
                        )
                    }
                } else {
                    q8k_block(&x[b * 256..], &mut a.qa[b * 256..], &mut bs)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let d = q8k_block(&x[b * 256..], &mut a.qa[b * 256..], &mut bs);
                a.f1[b] = d;
                if kind == Kind::Q6K {
                    for k in 0..16 {
                        a.i1[b * 16 + k] = -32 * bs[k];
                    }
                } else {
                    for j in 0..8 {
                        a.f2[b * 8 + j] = d * (bs[2 * j] + bs[2 * j + 1]) as f32;
                    }
                }
            }
        }
        _ => {
            let nb = x.len() / 32;
            let off = match kind {
                Kind::Q4_0 => 8,
                Kind::Q5_0 => 16,
                Kind::Q8_0 => 128,
                _ => 0,
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = simd;
            #[cfg(target_arch = "x86_64")]
            if simd && super::has_avx2() {
                // SAFETY: AVX2/FMA/F16C presence checked.
                unsafe { q8_row_avx2(x, a.qa, a.f1, a.f2, a.i1, off, kind) };
                return;
            }
            for b in 0..nb {
                let (d, du, sum) = q8_block(&x[b * 32..], &mut a.qa[b * 32..]);
                a.f1[b] = d;
                a.i1[b] = -off * sum;
                a.f2[b] = if matches!(kind, Kind::Q4_1 | Kind::Q5_1) {
                    round_f16(du * sum as f32)
                } else {
                    0.0
                };
            }
        }
    }
}

/// AVX2 version of the Q8_0/Q8_1 row quantization (same arithmetic as ggml's, bit-identical to
/// `q8_block`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_row_avx2(
    x: &[f32],
    qa: &mut [i8],
    f1: &mut [f32],
    f2: &mut [f32],
    i1: &mut [i32],
    off: i32,
    kind: Kind,
) {
    use std::arch::x86_64::*;
    let nb = x.len() / 32;
    assert!(qa.len() >= nb * 32 && f1.len() >= nb && f2.len() >= nb && i1.len() >= nb);
    let sign = _mm256_set1_ps(-0.0);
    let want_s = matches!(kind, Kind::Q4_1 | Kind::Q5_1);
    for b in 0..nb {
        let p = x.as_ptr().add(b * 32);
        let v0 = _mm256_loadu_ps(p);
        let v1 = _mm256_loadu_ps(p.add(8));
        let v2 = _mm256_loadu_ps(p.add(16));
        let v3 = _mm256_loadu_ps(p.add(24));
        let mut m = _mm256_andnot_ps(sign, v0);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v1));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v2));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v3));
        let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v0, id)));
        let i1v = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v1, id)));
        let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v2, id)));
        let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v3, id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1v), _mm256_add_epi32(i2, i3));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
        let sum = _mm_cvtsi128_si32(s4);
        let a = _mm256_packs_epi32(i0, i1v);
        let c = _mm256_packs_epi32(i2, i3);
        let q = _mm256_packs_epi16(a, c);
        let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qa.as_mut_ptr().add(b * 32) as *mut __m256i, q);
        let dh = _mm_cvtph_ps(_mm_cvtps_ph::<0>(_mm_set_ss(d)));
        *f1.get_unchecked_mut(b) = _mm_cvtss_f32(dh);
        *i1.get_unchecked_mut(b) = -off * sum;
        if want_s {
            let sh = _mm_cvtph_ps(_mm_cvtps_ph::<0>(_mm_set_ss(d * sum as f32)));
            *f2.get_unchecked_mut(b) = _mm_cvtss_f32(sh);
        } else {
            *f2.get_unchecked_mut(b) = 0.0;
        }
    }
}

/// AVX2 version of `q8k_block` (bit-identical: same max search, same f32 products, round half to even).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8k_block_avx2(x: &[f32], q: &mut [i8], bsums: &mut [i32; 16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(x.len() == 256 && q.len() == 256);
    let p = x.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for i in 0..32 {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
    }
    let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    if amax == 0.0 || amax.is_nan() {
        return q8k_block(x, q, bsums);
    }
    // The first value of largest magnitude (its sign decides the sign of d, as in ggml).
    let av = _mm256_set1_ps(amax);
    let mut max = amax;
    for i in 0..32 {
        let eq =
            _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))), av);
        let bits = _mm256_movemask_ps(eq);
        if bits != 0 {
            max = x[8 * i + bits.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127.0 / max;
    let is = _mm256_set1_ps(iscale);
    let lim = _mm256_set1_epi32(127);
    const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for j in 0..8 {
        let mut v = [_mm256_setzero_si256(); 4];
        for (k, v) in v.iter_mut().enumerate() {
            let f = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * j + 8 * k)), is);
            *v = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps::<R>(f)), lim);
        }
        for h in 0..2 {
            let s = _mm256_add_epi32(v[2 * h], v[2 * h + 1]);
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
            bsums[2 * j + h] = _mm_cvtsi128_si32(s4);
        }
        let a = _mm256_packs_epi32(v[0], v[1]);
        let c = _mm256_packs_epi32(v[2], v[3]);
        let b = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(a, c),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(q.as_mut_ptr().add(32 * j) as *mut __m256i, b);
    }
    1.0 / iscale
}
