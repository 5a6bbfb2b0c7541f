//! AVX-512 fold: the online-softmax step of a task's rows over one tile of keys, register-blocked so several query
//! rows share every K and V load.
//!
//! Rows go in chunks of up to 8 (4 when a block holds 64 keys): the chunk's scores against the whole tile are one
//! register-blocked product (8 rows × 32 keys = 16 zmm accumulators, one broadcast of q and BT/16 key loads per
//! channel), the masks and softmax run 16 lanes wide over each row, and p·V goes 4 rows at a time with a 64-channel
//! strip of each row's output in registers, so each value row is loaded once for 4 rows. Keys past the last one any
//! row of the chunk can see (the masked half of a diagonal block) are left out of p·V.
//!
//! Chosen when `crate::kernels::kernel()` is the AVX-512 kernel, the block holds a multiple of 16 keys and the value
//! head dim is a multiple of 16; otherwise `fold` takes the portable path.

use std::arch::x86_64::*;

use super::{block_softmax, exp_neg, TaskArgs};

/// The fold of [`super::fold`] (same arguments and results) for BT ∈ {16, 32, 64} and hv % 16 == 0.
///
/// # Safety
/// The CPU must support AVX-512F/VL, AVX2, FMA and F16C; `kt` holds hs × BT, `vb` pos.len() × hv, `s_buf` 8 × BT.
#[allow(clippy::too_many_arguments)] // fold's arguments
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn fold<const BT: usize>(
    a: &TaskArgs,
    kt: &[f32],
    vb: &[f32],
    pos: &[u32],
    hs: usize,
    qrows: Option<&[f32]>,
    s_buf: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let (q, sh, p, task) = (a.q, a.sh, a.p, a.task);
    let (hk, hv, g) = (sh.hk, sh.hv, sh.group);
    let n = pos.len();
    let rows = (task.t1 - task.t0) * g;
    assert!(BT.is_multiple_of(16) && BT <= 64 && hv.is_multiple_of(16));
    assert!(kt.len() >= hs * BT && vb.len() >= n * hv && s_buf.len() >= 8 * BT);
    assert!(acc.len() >= rows * hv && m.len() >= rows && l.len() >= rows);
    let tile_pos = &a.q_pos[task.t0..task.t1];
    let max_qpos = tile_pos.iter().copied().max().unwrap_or(0);
    let min_qpos = tile_pos.iter().copied().min().unwrap_or(0);
    let (pmin, pmax) = pos
        .iter()
        .fold((u32::MAX, 0), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let all_visible = pmax <= min_qpos && p.window.is_none_or(|w| max_qpos - pmin < w);
    let window = p.window.unwrap_or(u32::MAX);
    let row_q = |r: usize| -> &[f32] {
        match qrows {
            None => {
                let t = task.t0 + r / g;
                &q[(t * sh.n_q_heads + task.kv_head * g + r % g) * hk..][..hk]
            }
            Some(qg) => &qg[r * hs..][..hs],
        }
    };
    let chunk = if BT >= 64 { 4 } else { 8 };
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(chunk);
        // Scores of the chunk's rows (padded by repeating the last row): s_buf[i · BT + j].
        if rc > 4 {
            let qs: [&[f32]; 8] = std::array::from_fn(|i| row_q(r0 + i.min(rc - 1)));
            scores::<8, BT>(kt, &qs, hs, s_buf);
        } else {
            let qs: [&[f32]; 4] = std::array::from_fn(|i| row_q(r0 + i.min(rc - 1)));
            scores::<4, BT>(kt, &qs, hs, s_buf);
        }
        // Scale, soft-cap, mask and the softmax step of each row; `alpha` rescales its accumulator in p·V.
        let mut alpha = [1.0f32; 8];
        let mut cmax = 0u32;
        for i in 0..rc {
            let r = r0 + i;
            let qpos = tile_pos[r / g];
            cmax = cmax.max(qpos);
            let s = &mut s_buf[i * BT..][..n];
            for x in s.iter_mut() {
                *x *= p.scale;
            }
            if let Some(c) = p.softcap {
                for x in s.iter_mut() {
                    *x = c * (*x / c).tanh();
                }
            }
            if !all_visible {
                for (x, &kpos) in s.iter_mut().zip(pos) {
                    let visible = (kpos <= qpos) & (qpos.wrapping_sub(kpos) < window);
                    *x = if visible { *x } else { f32::NEG_INFINITY };
                }
            }
            let step = if n == BT {
                softmax_full::<BT>(s, m[r])
            } else {
                block_softmax(s, m[r])
            };
            match step {
                Some((m_new, al, lsum)) => {
                    alpha[i] = al;
                    m[r] = m_new;
                    l[r] = l[r] * al + lsum;
                }
                None => s.fill(0.0),
            }
        }
        // Keys after the last one any row of the chunk sees carry probability 0 for every row: leave them out.
        let n_eff = if all_visible {
            n
        } else {
            pos.iter().rposition(|&k| k <= cmax).map_or(0, |j| j + 1)
        };
        let mut i0 = 0;
        while i0 < rc {
            let k = (rc - i0).min(4);
            let pr = s_buf[i0 * BT..].as_ptr();
            let ar = acc[(r0 + i0) * hv..].as_mut_ptr();
            let al = &alpha[i0..];
            match k {
                4 => pv::<4, BT>(pr, vb.as_ptr(), n_eff, hv, al, ar),
                3 => pv::<3, BT>(pr, vb.as_ptr(), n_eff, hv, al, ar),
                2 => pv::<2, BT>(pr, vb.as_ptr(), n_eff, hv, al, ar),
                _ => pv::<1, BT>(pr, vb.as_ptr(), n_eff, hv, al, ar),
            }
            i0 += k;
        }
        r0 += rc;
    }
}

/// [`block_softmax`] for a full block of BT scores: the max and the sum reduce in registers, e^x 16 lanes at a time.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn softmax_full<const BT: usize>(s: &mut [f32], m_old: f32) -> Option<(f32, f32, f32)> {
    assert!(s.len() >= BT);
    let sp = s.as_mut_ptr();
    let mut x = [_mm512_setzero_ps(); 4];
    for (v, xv) in x.iter_mut().enumerate().take(BT / 16) {
        *xv = _mm512_loadu_ps(sp.add(16 * v));
    }
    let mut mx = x[0];
    for xv in x.iter().take(BT / 16).skip(1) {
        mx = _mm512_max_ps(mx, *xv);
    }
    let blk_max = _mm512_reduce_max_ps(mx);
    if blk_max == f32::NEG_INFINITY {
        return None;
    }
    let m_new = if blk_max > m_old { blk_max } else { m_old };
    let alpha = exp_neg(m_old - m_new); // 0 when m_old = −∞
    let mv = _mm512_set1_ps(m_new);
    // The sum in block_softmax's order: 8 lanes that add the block's runs of 8 one after another, then those lanes
    // left to right, so a full block sums exactly as a partial one would (chunked prefill ≡ one-shot bit for bit).
    let mut sum = _mm256_setzero_ps();
    for (v, xv) in x.iter().enumerate().take(BT / 16) {
        let e = exp_neg16(_mm512_sub_ps(*xv, mv));
        _mm512_storeu_ps(sp.add(16 * v), e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        sum = _mm256_add_ps(sum, hi);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    Some((m_new, alpha, lanes.iter().sum::<f32>()))
}

/// [`exp_neg`] on 16 lanes, bit for bit: the same range reduction and polynomial with the same roundings (separate
/// multiplies and adds, no fused ones), so a block's probabilities do not depend on which softmax step ran; lanes below
/// −87 (and −∞) give 0.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn exp_neg16(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.0);
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo);
    let xc = _mm512_max_ps(x, lo);
    let t = _mm512_add_ps(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _mm512_set1_ps(0.5),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693_145_75)));
    let r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(1.428_606_8e-6)));
    let mut p = _mm512_set1_ps(0.001_394_2);
    for c in [0.008_333_45, 0.041_666_43, 0.166_666_67, 0.5, 1.0, 1.0] {
        p = _mm512_add_ps(_mm512_set1_ps(c), _mm512_mul_ps(r, p));
    }
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvttps_epi32(n),
        _mm512_set1_epi32(127),
    )));
    _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, scale))
}

/// s[i · BT + j] = q_i · k_j for R rows and the BT keys of `kt` (hs × BT, transposed): R · BT/16 accumulators in
/// registers, each key channel loaded once for all R rows.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn scores<const R: usize, const BT: usize>(
    kt: &[f32],
    q: &[&[f32]; R],
    hs: usize,
    s: &mut [f32],
) {
    assert!(kt.len() >= hs * BT && s.len() >= R * BT && q.iter().all(|r| r.len() >= hs));
    let nv = BT / 16;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let base = kt.as_ptr();
    for d in 0..hs {
        let col = base.add(d * BT);
        let mut k = [_mm512_setzero_ps(); 4];
        for (v, kv) in k.iter_mut().enumerate().take(nv) {
            *kv = _mm512_loadu_ps(col.add(16 * v));
        }
        for r in 0..R {
            let qb = _mm512_set1_ps(*q[r].get_unchecked(d));
            for v in 0..nv {
                acc[r][v] = _mm512_fmadd_ps(qb, k[v], acc[r][v]);
            }
        }
    }
    let out = s.as_mut_ptr();
    for (r, ar) in acc.iter().enumerate() {
        for (v, av) in ar.iter().enumerate().take(nv) {
            _mm512_storeu_ps(out.add(r * BT + 16 * v), *av);
        }
    }
}

/// acc_i ← alpha_i · acc_i + Σ_{j<n} p[i · BT + j] · v_j for R rows (`acc` row stride hv), in strips of up to 64
/// channels whose R rows stay in registers while the strip of each value row is loaded once.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn pv<const R: usize, const BT: usize>(
    p: *const f32,
    vb: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
) {
    let mut c0 = 0;
    while c0 < hv {
        match (hv - c0) / 16 {
            1 => pv_strip::<R, 1, BT>(p, vb, n, hv, alpha, acc, c0),
            2 => pv_strip::<R, 2, BT>(p, vb, n, hv, alpha, acc, c0),
            3 => pv_strip::<R, 3, BT>(p, vb, n, hv, alpha, acc, c0),
            _ => pv_strip::<R, 4, BT>(p, vb, n, hv, alpha, acc, c0),
        }
        c0 += 64.min(hv - c0);
    }
}

/// One strip of [`pv`]: channels [c0, c0 + 16·W).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn pv_strip<const R: usize, const W: usize, const BT: usize>(
    p: *const f32,
    vb: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    c0: usize,
) {
    let mut a = [[_mm512_setzero_ps(); W]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        let al = _mm512_set1_ps(alpha[r]);
        for (w, aw) in ar.iter_mut().enumerate() {
            *aw = _mm512_mul_ps(_mm512_loadu_ps(acc.add(r * hv + c0 + 16 * w)), al);
        }
    }
    for j in 0..n {
        let vrow = vb.add(j * hv + c0);
        let mut v = [_mm512_setzero_ps(); W];
        for (w, vw) in v.iter_mut().enumerate() {
            *vw = _mm512_loadu_ps(vrow.add(16 * w));
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(*p.add(r * BT + j));
            for (aw, vw) in ar.iter_mut().zip(&v) {
                *aw = _mm512_fmadd_ps(pb, *vw, *aw);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (w, aw) in ar.iter().enumerate() {
            _mm512_storeu_ps(acc.add(r * hv + c0 + 16 * w), *aw);
        }
    }
}

/// dst[i] = src[i] as f32, 16 per instruction (`half`'s slice conversion goes 8 at a time through a call).
///
/// # Safety
/// The CPU must support AVX-512F; `dst` is at least as long as `src`.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    assert!(dst.len() >= src.len());
    let n16 = src.len() / 16 * 16;
    let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i < n16 {
        let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
        _mm512_storeu_ps(d.add(i), _mm512_cvtph_ps(h));
        i += 16;
    }
    for (x, h) in dst[n16..src.len()].iter_mut().zip(&src[n16..]) {
        *x = h.to_f32();
    }
}
