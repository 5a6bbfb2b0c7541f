//! AVX-512 fold: the online-softmax step of a task's rows over one tile of keys, register-blocked so several query
//! rows share every K and V load.
//!
//! Rows go in chunks of up to 8 (4 when a block holds 64 keys): the chunk's scores against the whole tile are one
//! register-blocked product (8 rows × 32 keys = 16 zmm accumulators, one broadcast of q and BT/16 key loads per
//! channel), the masks and softmax run 16 lanes wide over each row, and p·V goes 4 rows at a time (an f16 block's up
//! to 7) with a 64-channel strip of each row's output in registers, so each value row is loaded once for those rows.
//! Query values and probabilities enter the multiply-adds as embedded broadcasts ([`fma_b`]). Keys past the last one
//! any row of the chunk can see (the masked half of a diagonal block) are left out of p·V.
//!
//! A 4-bit KIVI tile ([`super::qtile`]) goes the same way with its codes unpacked 16 or 32 at a time (two per byte,
//! low nibble first) right where the f32 path loads keys or values: scores start from the row's `q·min` constant
//! and multiply the scale-folded query; p·V multiplies probabilities scaled per token and starts from the row's
//! `p·min` constant per value group (one group = one 64-channel strip).
//!
//! Chosen when `crate::kernels::kernel()` is the AVX-512 kernel, the block holds a multiple of 16 keys and the value
//! head dim is a multiple of 16; otherwise `fold` takes the portable path.

use std::arch::asm;
use std::arch::x86_64::*;

use super::qtile::{self, Q4};
use super::vnni;
use super::{exp_neg, row_q, Ahead, TaskArgs, Tile};

/// The fold of [`super::fold`] (same arguments and results) for BT ∈ {16, 32, 64} and hv % 16 == 0.
///
/// # Safety
/// The CPU must support AVX-512F/VL, AVX2, FMA and F16C; an f32 tile's `kt` holds hs × BT and `vb` pos.len() × hv;
/// `s_buf` holds 8 × BT, `pbuf` (4-bit tiles) [`qtile::pbuf_len`].
#[allow(clippy::too_many_arguments)] // fold's arguments
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn fold<const BT: usize>(
    a: &TaskArgs,
    tile: &Tile,
    pos: &[u32],
    s_buf: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    pbuf: &mut [f32],
) {
    let (sh, p, task) = (a.sh, a.p, a.task);
    let (hv, g) = (sh.hv, sh.group);
    let n = pos.len();
    let rows = (task.t1 - task.t0) * g;
    assert!(BT.is_multiple_of(16) && BT <= 64 && hv.is_multiple_of(16));
    assert!(s_buf.len() >= 8 * BT);
    assert!(acc.len() >= rows * hv && m.len() >= rows && l.len() >= rows);
    match tile {
        Tile::F32 {
            kt, vb, hs, given, ..
        } => assert!(
            vb.len() >= n * hv && given.map_or(kt.len() >= hs * BT, |gs| gs.len() >= rows * BT)
        ),
        Tile::F16 { kt, vb, hs, .. } => {
            assert!(kt.len() >= hs * BT && vb.len() >= n * hv && rows <= chunk_rows::<BT>())
        }
        Tile::Q4(q4) => assert!(
            n == BT
                && q4.k.len() >= q4.hs * BT * q4.bits as usize / 8
                && q4.v.len() >= n * q4.rb
                && q4.rb * 8 >= hv * q4.bits as usize
                && q4.qs.len() >= rows * q4.hs
                && q4.qc.len() >= rows
                && pbuf.len() >= qtile::pbuf_len(hv, BT)
        ),
    }
    let tile_pos = &a.q_pos[task.t0..task.t1];
    let all_visible = super::all_visible(tile_pos, pos, p.window);
    // The entries that take part (a partly selected f16 block reads only its selected ones).
    let cols = match *tile {
        Tile::F16 { cols, .. } => cols,
        _ => u64::MAX,
    };
    let window = p.window.unwrap_or(u32::MAX);
    let chunk = chunk_rows::<BT>();
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(chunk);
        // Scores of the chunk's rows: s_buf[i · BT + j] (4-bit tiles pad the chunk by repeating its last row).
        match *tile {
            Tile::F32 {
                given: Some(gs), ..
            } => {
                // Scores a selector computed for this query: the keys are not read.
                s_buf[..rc * BT].copy_from_slice(&gs[r0 * BT..][..rc * BT]);
            }
            Tile::F32 { kt, hs, qrows, .. } => {
                let row = |i: usize| row_q(a, qrows, hs, r0 + i);
                scores_n::<BT, false>(kt.as_ptr() as *const u8, rc, row, hs, s_buf, Ahead::NONE);
            }
            Tile::F16 {
                kt,
                hs,
                qrows,
                ahead,
                ..
            } => {
                let row = |i: usize| row_q(a, qrows, hs, r0 + i);
                // The next block's keys, a channel's lines with each channel (first chunk only).
                let pf = if r0 == 0 { ahead.0 } else { Ahead::NONE };
                scores_n::<BT, true>(kt.as_ptr() as *const u8, rc, row, hs, s_buf, pf);
            }
            Tile::Q4(ref q4) if BT == 32 && !q4.qi.is_empty() => {
                // Integer scores, the chunk's rows in one pass over the codes.
                let row = |i: usize| r0 + i;
                match rc {
                    1 => vnni::scores::<1>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    2 => vnni::scores::<2>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    3 => vnni::scores::<3>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    4 => vnni::scores::<4>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    5 => vnni::scores::<5>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    6 => vnni::scores::<6>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    7 => vnni::scores::<7>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                    _ => vnni::scores::<8>(q4, &std::array::from_fn(row), s_buf, BT, Ahead::NONE),
                }
            }
            Tile::Q4(ref q4) => {
                let row = |i: usize| r0 + i.min(rc - 1);
                if rc > 4 {
                    scores_q4::<8, BT>(q4, &std::array::from_fn(row), s_buf);
                } else {
                    scores_q4::<4, BT>(q4, &std::array::from_fn(row), s_buf);
                }
            }
        }
        // Scale, soft-cap, mask and the softmax step of each row; `alpha` rescales its accumulator in p·V.
        let mut alpha = [1.0f32; 8];
        let mut cmax = 0u32;
        let plain = n == BT && all_visible && p.softcap.is_none();
        if plain {
            // A full block every row sees whole (decode, and prefill away from the diagonal): the rows' softmax
            // steps run interleaved, each one's arithmetic exactly the general loop's below. A partly selected
            // block's other entries are masked first (−∞ stays −∞ once scaled): a selector's scattered picks
            // (`squeezed`, `tokenselect`) make most blocks partly selected, and the row-by-row loop took twice as long.
            if cols != u64::MAX {
                mask_cols::<BT>(&mut s_buf[..rc * BT], cols);
            }
            cmax = tile_pos[(r0 + rc - 1) / g];
            let (m, l) = (&mut m[r0..r0 + rc], &mut l[r0..r0 + rc]);
            match rc {
                1 => softmax_rows::<BT, 1>(s_buf, p.scale, m, l, &mut alpha),
                2 => softmax_rows::<BT, 2>(s_buf, p.scale, m, l, &mut alpha),
                3 => softmax_rows::<BT, 3>(s_buf, p.scale, m, l, &mut alpha),
                4 => softmax_rows::<BT, 4>(s_buf, p.scale, m, l, &mut alpha),
                5 => softmax_rows::<BT, 5>(s_buf, p.scale, m, l, &mut alpha),
                6 => softmax_rows::<BT, 6>(s_buf, p.scale, m, l, &mut alpha),
                7 => softmax_rows::<BT, 7>(s_buf, p.scale, m, l, &mut alpha),
                _ => softmax_rows::<BT, 8>(s_buf, p.scale, m, l, &mut alpha),
            }
        }
        for i in 0..if plain { 0 } else { rc } {
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
            if cols != u64::MAX {
                for (j, x) in s.iter_mut().enumerate() {
                    if cols >> j & 1 == 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            // Scaled and masked already: the one-row step with scale 1 (x · 1 = x exactly), a partial block's missing
            // entries −∞ (probability 0, and the sum's lanes add 0 where they would be), so every block of every path
            // takes the same step and chunked prefill stays equal to one-shot bit for bit.
            let row = &mut s_buf[i * BT..][..BT];
            row[n..].fill(f32::NEG_INFINITY);
            let (m, l) = (&mut m[r..=r], &mut l[r..=r]);
            softmax_rows::<BT, 1>(row, 1.0, m, l, &mut alpha[i..=i]);
        }
        // Keys after the last one any row of the chunk sees carry probability 0 for every row: leave them out.
        let n_eff = if all_visible {
            n
        } else {
            pos.iter().rposition(|&k| k <= cmax).map_or(0, |j| j + 1)
        };
        if let Tile::Q4(q4) = tile {
            qtile::scale_probs::<BT>(q4, s_buf, rc, n_eff, pbuf);
        }
        let int8_pv = matches!(tile, Tile::Q4(q4) if BT == 32 && q4.int8 && q4.rb * 2 == hv && hv.is_multiple_of(64));
        // Rows per p·V pass: 4, or for f16 blocks up to 7 (4 × 7 accumulators and one value vector in registers), so
        // each value is loaded and converted once for a whole 7-query group.
        let per_pass = match tile {
            Tile::F16 { .. } if rc <= 7 => rc,
            _ => 4,
        };
        let mut i0 = 0;
        while i0 < rc {
            let k = (rc - i0).min(per_pass);
            let ar = acc[(r0 + i0) * hv..].as_mut_ptr();
            let al = &alpha[i0..];
            match *tile {
                Tile::F32 { vb, .. } => {
                    let (pr, vp) = (s_buf[i0 * BT..].as_ptr(), vb.as_ptr() as *const u8);
                    let pf = Ahead::NONE;
                    match k {
                        4 => pv::<4, BT, false>(pr, vp, n_eff, hv, al, ar, u64::MAX, pf),
                        3 => pv::<3, BT, false>(pr, vp, n_eff, hv, al, ar, u64::MAX, pf),
                        2 => pv::<2, BT, false>(pr, vp, n_eff, hv, al, ar, u64::MAX, pf),
                        _ => pv::<1, BT, false>(pr, vp, n_eff, hv, al, ar, u64::MAX, pf),
                    }
                }
                Tile::F16 { vb, ahead, .. } => {
                    let (pr, vp) = (s_buf[i0 * BT..].as_ptr(), vb.as_ptr() as *const u8);
                    // The next block's values, a row's lines with each row (first pass only).
                    let pf = if r0 + i0 == 0 { ahead.1 } else { Ahead::NONE };
                    match k {
                        7 => pv::<7, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        6 => pv::<6, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        5 => pv::<5, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        4 => pv::<4, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        3 => pv::<3, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        2 => pv::<2, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                        _ => pv::<1, BT, true>(pr, vp, n_eff, hv, al, ar, cols, pf),
                    }
                }
                Tile::Q4(ref q4) if int8_pv => {
                    let pq = pbuf[i0 * q4.ng * BT..].as_ptr();
                    let pc = pbuf[qtile::pc_offset::<BT>(q4.ng) + i0 * q4.ng..].as_ptr();
                    // SAFETY: `q4.int8` is set only where `vnni::available()` found the CPU features; p·V rows
                    // as `pvq` takes them.
                    match k {
                        4 => vnni::pv::<4>(q4, pq, pc, n_eff, hv, al, ar),
                        3 => vnni::pv::<3>(q4, pq, pc, n_eff, hv, al, ar),
                        2 => vnni::pv::<2>(q4, pq, pc, n_eff, hv, al, ar),
                        _ => vnni::pv::<1>(q4, pq, pc, n_eff, hv, al, ar),
                    }
                }
                Tile::Q4(ref q4) => {
                    let pq = pbuf[i0 * q4.ng * BT..].as_ptr();
                    let pc = pbuf[qtile::pc_offset::<BT>(q4.ng) + i0 * q4.ng..].as_ptr();
                    match k {
                        4 => pvq::<4, BT>(q4, pq, pc, n_eff, hv, al, ar),
                        3 => pvq::<3, BT>(q4, pq, pc, n_eff, hv, al, ar),
                        2 => pvq::<2, BT>(q4, pq, pc, n_eff, hv, al, ar),
                        _ => pvq::<1, BT>(q4, pq, pc, n_eff, hv, al, ar),
                    }
                }
            }
            i0 += k;
        }
        r0 += rc;
    }
}

/// Most blocks [`fold_q4_run`] folds together.
pub(super) const Q4_RUN: usize = 4;

/// The next run's key and value codes, block by block: [`fold_q4_run`] asks for them a cache line at a time as it
/// scores and mixes the same block of its own run, so their misses overlap its work instead of a burst of
/// prefetches filling the core's miss buffers before it starts.
#[derive(Clone, Copy)]
pub(super) struct RunAhead {
    pub k: [Ahead; Q4_RUN],
    pub v: [Ahead; Q4_RUN],
}

impl RunAhead {
    pub const NONE: RunAhead = RunAhead {
        k: [Ahead::NONE; Q4_RUN],
        v: [Ahead::NONE; Q4_RUN],
    };
}

/// f32s of [`fold_q4_run`]'s score scratch: 8 rows × the keys of [`Q4_RUN`] blocks.
pub(super) const RUN_SCRATCH: usize = 8 * 32 * Q4_RUN;

/// The fold of [`fold`] over NB ≤ [`Q4_RUN`] consecutive full 4-bit blocks (32 keys each, KEYS = 32 · NB, prepared
/// with the integer fold) for `rows` ≤ 8 rows that see every key of them, with no soft-cap (decode): the blocks'
/// integer scores side by side, one softmax step over all of their keys, and one p·V pass whose integer sums run
/// across the blocks ([`vnni::pv_run`]). Per key it does what [`fold`] does block by block; per run it pays the
/// softmax's reductions, the accumulators' rescaling and p·V's epilogue once instead of once per block, and the
/// blocks' independent score chains can overlap. `s` holds [`RUN_SCRATCH`]; m, l and acc (row stride hv) as [`fold`]
/// takes them.
///
/// # Safety
/// The CPU must support what [`vnni::available`] checks; hv is a multiple of 64 and every block's `rb · 2 == hv`.
#[allow(clippy::too_many_arguments)] // fold's state plus the run
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn fold_q4_run<const NB: usize, const KEYS: usize>(
    q4s: &[Q4; NB],
    rows: usize,
    scale: f32,
    hv: usize,
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    ahead: &RunAhead,
) {
    assert!(KEYS == 32 * NB && NB <= Q4_RUN && s.len() >= RUN_SCRATCH);
    match rows {
        1 => run_rows::<1, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        2 => run_rows::<2, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        3 => run_rows::<3, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        4 => run_rows::<4, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        5 => run_rows::<5, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        6 => run_rows::<6, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        7 => run_rows::<7, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        8 => run_rows::<8, NB, KEYS>(q4s, scale, hv, s, m, l, acc, ahead),
        _ => panic!("fold_q4_run takes 1 to 8 rows, not {rows}"),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // fold's state plus the run and what to prefetch
unsafe fn run_rows<const R: usize, const NB: usize, const KEYS: usize>(
    q4s: &[Q4; NB],
    scale: f32,
    hv: usize,
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    ahead: &RunAhead,
) {
    assert!(s.len() >= R * KEYS && m.len() >= R && l.len() >= R && acc.len() >= R * hv);
    let rows: [usize; R] = std::array::from_fn(|i| i);
    // Scores: row i's run at s[i · KEYS..], block b's keys at b · 32.
    for (b, q4) in q4s.iter().enumerate() {
        vnni::scores::<R>(q4, &rows, &mut s[32 * b..], KEYS, ahead.k[b]);
    }
    let mut alpha = [1.0f32; 8];
    softmax_rows::<KEYS, R>(s, scale, &mut m[..R], &mut l[..R], &mut alpha);
    let (sp, ap) = (s.as_ptr(), acc.as_mut_ptr());
    let mut i0 = 0;
    while i0 < R {
        let (p, a, al) = (sp.add(i0 * KEYS), ap.add(i0 * hv), &alpha[i0..]);
        match R - i0 {
            1 => vnni::pv_run::<1, NB>(q4s, p, KEYS, hv, al, a, &ahead.v),
            2 => vnni::pv_run::<2, NB>(q4s, p, KEYS, hv, al, a, &ahead.v),
            3 => vnni::pv_run::<3, NB>(q4s, p, KEYS, hv, al, a, &ahead.v),
            _ => vnni::pv_run::<4, NB>(q4s, p, KEYS, hv, al, a, &ahead.v),
        }
        i0 += 4;
    }
}

/// The softmax step of R rows (`s[i · BT..][..BT]`, raw scores) over a full block that every row sees whole, with
/// no soft-cap (or one row scaled and masked already, with `scale` 1, a partial block's missing entries −∞): scale,
/// block max, e^(s − m_new) ([`exp_neg16`]) and the sum in [`super::block_softmax`]'s order, in lockstep over the
/// rows, so their dependency chains (the max's and the sum's reductions, the exp polynomial) overlap instead of
/// following one another. Updates m, l and alpha of rows 0..R; a row whose scores are all −∞ gets probabilities 0
/// and keeps its state.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn softmax_rows<const BT: usize, const R: usize>(
    s: &mut [f32],
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    assert!(s.len() >= R * BT && m.len() >= R && l.len() >= R && alpha.len() >= R);
    let nv = BT / 16;
    let sp = s.as_mut_ptr();
    let sc = _mm512_set1_ps(scale);
    // Scale and each row's block max.
    let mut bmax = [0.0f32; R];
    for (i, bm) in bmax.iter_mut().enumerate() {
        let mut mx = _mm512_setzero_ps();
        for v in 0..nv {
            let x = _mm512_mul_ps(_mm512_loadu_ps(sp.add(i * BT + 16 * v)), sc);
            _mm512_storeu_ps(sp.add(i * BT + 16 * v), x);
            mx = if v == 0 { x } else { _mm512_max_ps(mx, x) };
        }
        *bm = _mm512_reduce_max_ps(mx);
    }
    let mut mnew = [0.0f32; R];
    for i in 0..R {
        if bmax[i] == f32::NEG_INFINITY {
            mnew[i] = f32::NEG_INFINITY; // every score −∞: the row's probabilities are 0, its state unchanged
            continue;
        }
        let m_old = m[i];
        mnew[i] = if bmax[i] > m_old { bmax[i] } else { m_old };
        alpha[i] = if mnew[i] == m_old {
            1.0
        } else {
            exp_neg(m_old - mnew[i])
        };
    }
    // e^(s − m_new) and the sums in block_softmax's order: 8 lanes that add the block's runs of 8 one after another,
    // then those lanes left to right, so a full block sums exactly as a partial one would (chunked prefill ≡ one-shot
    // bit for bit).
    let mut sums = [_mm256_setzero_ps(); R];
    for (i, sum) in sums.iter_mut().enumerate() {
        let (mv, dead) = (_mm512_set1_ps(mnew[i]), mnew[i] == f32::NEG_INFINITY);
        for v in 0..nv {
            let e = if dead {
                _mm512_setzero_ps()
            } else {
                exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(sp.add(i * BT + 16 * v)), mv))
            };
            _mm512_storeu_ps(sp.add(i * BT + 16 * v), e);
            *sum = _mm256_add_ps(*sum, _mm512_castps512_ps256(e));
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            *sum = _mm256_add_ps(*sum, hi);
        }
    }
    for i in 0..R {
        if mnew[i] == f32::NEG_INFINITY {
            continue;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums[i]);
        m[i] = mnew[i];
        l[i] = l[i] * alpha[i] + lanes.iter().sum::<f32>();
    }
}

/// e^x for x ≤ 0 on 16 lanes: the scalar [`exp_neg`]'s range reduction and polynomial on fused multiply-adds, and
/// the power of two applied by `vscalefps`: 14 instructions where the scalar steps' separate multiplies and adds took
/// 24. Close to e^x (test `fused_exp_is_accurate`) but not bit for bit `exp_neg`: every AVX-512 fold takes its
/// probabilities from here, so no result mixes the two. Lanes below −87 (and −∞) give 0.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn exp_neg16(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.0);
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo);
    let xc = _mm512_max_ps(x, lo);
    let t = _mm512_fmadd_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(0.001_394_2);
    for c in [0.008_333_45, 0.041_666_43, 0.166_666_67, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c));
    }
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
}

/// Rows of one pass of [`fold`]: 8, or 4 for blocks of 64 keys (the register budget of the score product).
pub(super) const fn chunk_rows<const BT: usize>() -> usize {
    if BT >= 64 {
        4
    } else {
        8
    }
}

/// 16 lanes at element `i` of `base`: f32 elements, or (H) f16 elements converted as they are loaded, with the
/// value the f32 copy of them would hold.
#[inline(always)]
unsafe fn ld16<const H: bool>(base: *const u8, i: usize) -> __m512 {
    if H {
        _mm512_cvtph_ps(_mm256_loadu_si256(base.add(2 * i) as *const __m256i))
    } else {
        _mm512_loadu_ps((base as *const f32).add(i))
    }
}

/// acc + x · b[i]: the multiply-add takes b[i] straight from memory, broadcast to its 16 lanes (`{1to16}`). A separate
/// `vbroadcastss` to a zmm register runs on a vector pipe, and on Zen 4 it costs a cycle as the multiply-adds it feeds
/// do: 7 rows' broadcasts shared by 2 multiply-adds each took the score loop to 1.19 cycles per multiply-add, embedded
/// ones to 0.99 (a microbenchmark of that loop, one thread). Same rounding as `_mm512_fmadd_ps`: the same bits.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fma_b(acc: __m512, x: __m512, b: *const f32, i: usize) -> __m512 {
    let mut a = acc;
    asm!(
        "vfmadd231ps {a}, {x}, dword ptr [{b} + 4*{i}]{{1to16}}",
        a = inout(zmm_reg) a,
        x = in(zmm_reg) x,
        b = in(reg) b,
        i = in(reg) i,
        options(pure, readonly, nostack, preserves_flags),
    );
    a
}

/// [`scores`] for the `rc` ≤ 8 rows `row(0..rc)`, with exactly that many rows of products: every accumulator
/// costs an FMA per key channel, and on cores that split 512-bit FMAs in two that, not the load, bounds the fold.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn scores_n<'q, const BT: usize, const H: bool>(
    kt: *const u8,
    rc: usize,
    row: impl Fn(usize) -> &'q [f32],
    hs: usize,
    s: &mut [f32],
    pf: Ahead,
) {
    match rc {
        1 => scores::<1, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        2 => scores::<2, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        3 => scores::<3, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        4 => scores::<4, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        5 => scores::<5, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        6 => scores::<6, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        7 => scores::<7, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
        _ => scores::<8, BT, H>(kt, &std::array::from_fn(row), hs, s, pf),
    }
}

/// s[i · BT + j] = q_i · k_j for R rows and the BT keys of `kt` (hs × BT, transposed; f32, or f16 when H): R · BT/16
/// accumulators in registers, each key channel loaded once for all R rows.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn scores<const R: usize, const BT: usize, const H: bool>(
    kt: *const u8,
    q: &[&[f32]; R],
    hs: usize,
    s: &mut [f32],
    pf: Ahead,
) {
    assert!(s.len() >= R * BT && q.iter().all(|r| r.len() >= hs));
    let nv = BT / 16;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    // Channel d of the next block's keys: the same bytes of its layout as this block's.
    let kstep = BT * if H { 2 } else { 4 };
    for d in 0..hs {
        pf.span_l2(d * kstep, kstep);
        let mut k = [_mm512_setzero_ps(); 4];
        for (v, kv) in k.iter_mut().enumerate().take(nv) {
            *kv = ld16::<H>(kt, d * BT + 16 * v);
        }
        for r in 0..R {
            for v in 0..nv {
                acc[r][v] = fma_b(acc[r][v], k[v], q[r].as_ptr(), d);
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

/// acc_i ← alpha_i · acc_i + Σ_{j<n} p[i · BT + j] · v_j for R rows (`acc` row stride hv; `vb` n × hv, f32 or, when
/// H, f16), in strips of up to 64 channels whose R rows stay in registers while the strip of each value row is
/// loaded once.
#[allow(clippy::too_many_arguments)] // the fold's state, the selection mask and what to prefetch
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn pv<const R: usize, const BT: usize, const H: bool>(
    p: *const f32,
    vb: *const u8,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    cols: u64,
    pf: Ahead,
) {
    let mut c0 = 0;
    while c0 < hv {
        // The next block's values go with the first strip.
        let pf = if c0 == 0 { pf } else { Ahead::NONE };
        match (hv - c0) / 16 {
            1 => pv_strip::<R, 1, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf),
            2 => pv_strip::<R, 2, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf),
            3 => pv_strip::<R, 3, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf),
            _ => pv_strip::<R, 4, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf),
        }
        c0 += 64.min(hv - c0);
    }
}

/// One strip of [`pv`]: channels [c0, c0 + 16·W).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // pv's arguments and the strip
unsafe fn pv_strip<const R: usize, const W: usize, const BT: usize, const H: bool>(
    p: *const f32,
    vb: *const u8,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    c0: usize,
    cols: u64,
    pf: Ahead,
) {
    let mut a = [[_mm512_setzero_ps(); W]; R];
    let vrow = hv * if H { 2 } else { 4 };
    for (r, ar) in a.iter_mut().enumerate() {
        let al = _mm512_set1_ps(alpha[r]);
        for (w, aw) in ar.iter_mut().enumerate() {
            *aw = _mm512_mul_ps(_mm512_loadu_ps(acc.add(r * hv + c0 + 16 * w)), al);
        }
    }
    for j in 0..n {
        // Row j of the next block's values (a full next block: rows past n too, on the last row).
        if j + 1 == n {
            pf.span_l2(j * vrow, usize::MAX);
        } else {
            pf.span_l2(j * vrow, vrow);
        }
        if cols >> j & 1 == 0 {
            continue; // not selected: probability 0, value row not read
        }
        // One value vector at a time, multiplied into every row's strip, so 7 rows × 4 vectors of accumulators and
        // the vector fit the 32 registers.
        for w in 0..W {
            let x = ld16::<H>(vb, j * hv + c0 + 16 * w);
            for (r, ar) in a.iter_mut().enumerate() {
                ar[w] = fma_b(ar[w], x, p.add(r * BT), j);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (w, aw) in ar.iter().enumerate() {
            _mm512_storeu_ps(acc.add(r * hv + c0 + 16 * w), *aw);
        }
    }
}

/// 16 codes (8 bytes at `p`, two per byte, low nibble first) as f32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn nib16(p: *const u8) -> __m512 {
    let x = _mm_loadl_epi64(p as *const __m128i);
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)))
}

/// 32 codes (16 bytes at `p`) as two vectors of 16 f32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn nib32(p: *const u8) -> [__m512; 2] {
    let x = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
    [
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))),
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi))),
    ]
}

/// `nv` ≤ 4 vectors of 16 codes from the `8 · nv` bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn codes(p: *const u8, nv: usize) -> [__m512; 4] {
    let mut out = [_mm512_setzero_ps(); 4];
    let mut v = 0;
    while v + 1 < nv {
        let [x, y] = nib32(p.add(8 * v));
        out[v] = x;
        out[v + 1] = y;
        v += 2;
    }
    if v < nv {
        out[v] = nib16(p.add(8 * v));
    }
    out
}

/// nv ≤ 4 vectors of 16 one-byte codes from the 16 · nv bytes at `p`, as floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn bytes(p: *const u8, nv: usize) -> [__m512; 4] {
    let mut out = [_mm512_setzero_ps(); 4];
    for (v, o) in out.iter_mut().enumerate().take(nv) {
        let x = _mm_loadu_si128(p.add(16 * v) as *const __m128i);
        *o = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x));
    }
    out
}

/// [`scores`] for a 4-bit (or 8-bit) tile: s[i · BT + j] = qc[r_i] + Σ_c qs[r_i][c] · code[c][j] for the rows `rows`, each
/// channel's codes unpacked once for all R rows.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn scores_q4<const R: usize, const BT: usize>(q4: &Q4, rows: &[usize; R], s: &mut [f32]) {
    let hs = q4.hs;
    assert!(s.len() >= R * BT && q4.k.len() >= hs * BT / 2);
    assert!(rows
        .iter()
        .all(|&r| r < q4.qc.len() && (r + 1) * hs <= q4.qs.len()));
    let nv = BT / 16;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (ar, &r) in acc.iter_mut().zip(rows) {
        let c = _mm512_set1_ps(*q4.qc.get_unchecked(r));
        for av in ar.iter_mut().take(nv) {
            *av = c;
        }
    }
    let base = q4.k.as_ptr();
    let qs = q4.qs.as_ptr();
    if BT >= 32 && q4.bits == 4 {
        // Each 16 bytes (32 keys) widen to 16 lanes of one byte each; the low nibbles (even keys) and the high ones
        // (odd keys) become floats through a 16-entry table lookup (the lookup reads only an index's low 4 bits), so
        // the scores come out as [even keys, odd keys] per 32 and are interleaved back once per row at the end.
        let table = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        for c in 0..hs {
            let col = base.add(c * BT / 2);
            let mut k = [_mm512_setzero_ps(); 4];
            for h in 0..nv / 2 {
                let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(col.add(16 * h) as *const __m128i));
                k[2 * h] = _mm512_permutexvar_ps(x, table);
                k[2 * h + 1] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(x), table);
            }
            for r in 0..R {
                let qb = _mm512_set1_ps(*qs.add(rows[r] * hs + c));
                for v in 0..nv {
                    acc[r][v] = _mm512_fmadd_ps(qb, k[v], acc[r][v]);
                }
            }
        }
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let out = s.as_mut_ptr();
        for (r, ar) in acc.iter().enumerate() {
            for h in 0..nv / 2 {
                let (e, o) = (ar[2 * h], ar[2 * h + 1]);
                _mm512_storeu_ps(out.add(r * BT + 32 * h), _mm512_permutex2var_ps(e, lo, o));
                _mm512_storeu_ps(
                    out.add(r * BT + 32 * h + 16),
                    _mm512_permutex2var_ps(e, hi, o),
                );
            }
        }
        return;
    }
    // 8-bit codes (one per byte: 16 keys widen straight to 16 float lanes, in key order), or 4-bit ones of a short
    // block.
    assert!(q4.k.len() >= hs * BT * q4.bits as usize / 8);
    for c in 0..hs {
        let k = if q4.bits == 8 {
            bytes(base.add(c * BT), nv)
        } else {
            codes(base.add(c * BT / 2), nv)
        };
        for r in 0..R {
            let qb = _mm512_set1_ps(*qs.add(rows[r] * hs + c));
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

/// [`pv`] for a 4-bit tile: acc_i ← alpha_i · acc_i + pc_i[g] + Σ_{j<n} pq_i[g · BT + j] · code_j, where `pq` rows
/// are `ng · BT` apart and `pc` rows `ng` apart ([`qtile::scale_probs`]'s layout); a 64-channel strip is one value
/// group.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn pvq<const R: usize, const BT: usize>(
    q4: &Q4,
    pq: *const f32,
    pc: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
) {
    let mut c0 = 0;
    while c0 < hv {
        let w = ((hv - c0) / 16).min(4);
        let gi = c0 / 64; // = c0 / VALUE_GROUP
        let (pq, pc) = (pq.add(gi * BT), pc.add(gi));
        match w {
            1 => pvq_strip::<R, 1, BT>(q4, pq, pc, n, hv, alpha, acc, c0),
            2 => pvq_strip::<R, 2, BT>(q4, pq, pc, n, hv, alpha, acc, c0),
            3 => pvq_strip::<R, 3, BT>(q4, pq, pc, n, hv, alpha, acc, c0),
            _ => pvq_strip::<R, 4, BT>(q4, pq, pc, n, hv, alpha, acc, c0),
        }
        c0 += 16 * w;
    }
}

/// One strip of [`pvq`]: channels [c0, c0 + 16·W) of value group c0 / 64.
#[allow(clippy::too_many_arguments)] // pvq's arguments and the strip
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn pvq_strip<const R: usize, const W: usize, const BT: usize>(
    q4: &Q4,
    pq: *const f32,
    pc: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    c0: usize,
) {
    let ng = q4.ng;
    let bits = q4.bits as usize;
    assert!(n <= BT && q4.v.len() >= n * q4.rb && q4.rb * 8 >= (c0 + 16 * W) * bits);
    let mut a = [[_mm512_setzero_ps(); W]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        let al = _mm512_set1_ps(alpha[r]);
        let cst = _mm512_set1_ps(*pc.add(r * ng));
        for (w, aw) in ar.iter_mut().enumerate() {
            *aw = _mm512_fmadd_ps(_mm512_loadu_ps(acc.add(r * hv + c0 + 16 * w)), al, cst);
        }
    }
    let vbase = q4.v.as_ptr().add(c0 * bits / 8);
    for j in 0..n {
        let v = if bits == 8 {
            bytes(vbase.add(j * q4.rb), W)
        } else {
            codes(vbase.add(j * q4.rb), W)
        };
        for (r, ar) in a.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(*pq.add(r * ng * BT + j));
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

/// Sets the entries of each BT-wide row of `s` whose bit in `cols` is clear to −∞ (16 lanes at a time).
#[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
unsafe fn mask_cols<const BT: usize>(s: &mut [f32], cols: u64) {
    use std::arch::x86_64::*;
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    for row in s.chunks_exact_mut(BT) {
        for (c, v) in row.chunks_exact_mut(16).enumerate() {
            let keep = (cols >> (16 * c)) as u16;
            let p = v.as_mut_ptr();
            // SAFETY: `v` holds 16 f32.
            unsafe { _mm512_storeu_ps(p, _mm512_mask_blend_ps(keep, ninf, _mm512_loadu_ps(p))) };
        }
    }
}
