//! AVX2 fold: [`super::wide`]'s register-blocked step with 8-lane vectors, for CPUs without AVX-512 (AVX2-only EPYCs).
//!
//! Rows go in chunks of up to 4: the chunk's scores are one register-blocked product per strip of keys (32 keys for up
//! to 3 rows, 16 for 4: each channel's query values broadcast once, then each key vector loaded once for all rows), the
//! masks, then the softmax step ([`softmax_rows`], on FMAs: a masked or partial block goes through the same step with
//! its hidden entries −∞, so it sums exactly as a full one: chunked ≡ one-shot), and p·V keeps a strip of 32 (up to 3
//! rows) or 16 channels of the chunk's output rows in registers, so each value strip is loaded once for all rows. With
//! at most 16 ymm registers that is R · W accumulators + R broadcasts + 1 key or value: a decode step of a 3-query
//! group broadcasts once per 4 FMAs instead of once per 2. Keys past the last one any row of the chunk can see are left
//! out of p·V. A 4-bit KIVI tile ([`super::qtile`]) of 32 keys is scored with integer dot products ([`super::avx2q`])
//! and its value codes unpacked 8 or 16 at a time where the f32 path loads values, for exactly the chunk's rows (other
//! quantized tiles unpack their key codes too). An f16 block asks for the next block's lines as it works (a key
//! channel's line with each channel, a value row's with each row), as the AVX-512 fold does, and so does a 4-bit block
//! for the next block's codes (a line per 4 key channels, a value row's with each row): a burst of prefetches for a
//! whole block stalls once the core's miss buffers are full.
//!
//! Chosen when `crate::kernels::kernel()` is the AVX2 kernel, the block holds a multiple of 8 keys and the value head
//! dim is a multiple of 8; otherwise `fold` takes the portable path.

use std::arch::x86_64::*;

use super::qtile::{self, Q4};
use super::{avx2q, f16asm};
use super::{row_q, Ahead, TaskArgs, Tile};

/// Rows per chunk.
pub(super) const CHUNK: usize = 4;

/// The fold of [`super::fold`] (same arguments and results) for BT ∈ {8, 16, 32, 64} and hv % 8 == 0.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; an f32 tile's `kt` holds hs × BT and `vb` pos.len() × hv; `s_buf` holds
/// 4 × BT, `pbuf` (4-bit tiles) [`qtile::pbuf_len`].
#[allow(clippy::too_many_arguments)] // fold's arguments
#[target_feature(enable = "avx2,fma,f16c")]
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
    assert!(BT.is_multiple_of(8) && BT <= 64 && hv.is_multiple_of(8));
    assert!(s_buf.len() >= CHUNK * BT);
    assert!(acc.len() >= rows * hv && m.len() >= rows && l.len() >= rows);
    match tile {
        Tile::F32 {
            kt, vb, hs, given, ..
        } => assert!(
            vb.len() >= n * hv && given.map_or(kt.len() >= hs * BT, |gs| gs.len() >= rows * BT)
        ),
        Tile::F16 { kt, vb, hs, .. } => {
            assert!(kt.len() >= hs * BT && vb.len() >= n * hv && rows <= 2 * CHUNK)
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
    let mut r0 = 0;
    while r0 < rows {
        let rc = (rows - r0).min(CHUNK);
        // Scores of the chunk's rows (padded by repeating the last row): s_buf[i · BT + j].
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
            Tile::Q4(ref q4) => {
                // Exactly the chunk's rows (a decode step of a 3-query group takes 3, not a padded 4).
                // Integer scores where the preparation quantized the rows ([`avx2q`]: 4-bit codes, blocks of 32).
                let int = BT == 32 && q4.bits == 4 && q4.qi.len() >= rows * q4.hs;
                // The next block's key codes, a line at a time (first chunk only).
                let pf = if r0 == 0 { q4.ahead.0 } else { Ahead::NONE };
                macro_rules! go {
                    ($r:literal) => {{
                        let rs: [usize; $r] = std::array::from_fn(|i| r0 + i);
                        if int {
                            avx2q::scores::<$r>(q4, &rs, s_buf, pf);
                        } else if BT >= 16 {
                            scores_q4::<$r, 2, BT>(q4, &rs, s_buf, pf);
                        } else {
                            scores_q4::<$r, 1, BT>(q4, &rs, s_buf, pf);
                        }
                    }};
                }
                match rc {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
            }
        }
        // Scale, soft-cap, mask and the softmax step of each row; `alpha` rescales its accumulator in p·V.
        let mut alpha = [1.0f32; CHUNK];
        let mut cmax = 0u32;
        let plain = n == BT && all_visible && p.softcap.is_none();
        if plain {
            // A full block every row sees whole: the rows' softmax steps interleaved, the step the loop below takes
            // a row at a time (a partly selected block's other entries masked first, as the AVX-512 fold does).
            if cols != u64::MAX {
                mask_cols::<BT>(&mut s_buf[..rc * BT], cols);
            }
            cmax = tile_pos[(r0 + rc - 1) / g];
            let (m, l) = (&mut m[r0..r0 + rc], &mut l[r0..r0 + rc]);
            match rc {
                1 => softmax_rows::<BT, 1>(s_buf, p.scale, m, l, &mut alpha),
                2 => softmax_rows::<BT, 2>(s_buf, p.scale, m, l, &mut alpha),
                3 => softmax_rows::<BT, 3>(s_buf, p.scale, m, l, &mut alpha),
                _ => softmax_rows::<BT, 4>(s_buf, p.scale, m, l, &mut alpha),
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
            // Scaled and masked already: the plain step with scale 1 (x · 1 = x exactly), a partial block's missing
            // entries −∞ (probability 0, and x + 0 = x in the sum), so a row gets the bits it would get where every
            // entry is visible or where the causal mask cuts a whole block.
            let row = &mut s_buf[i * BT..][..BT];
            row[n..].fill(f32::NEG_INFINITY);
            softmax_rows::<BT, 1>(row, 1.0, &mut m[r..=r], &mut l[r..=r], &mut alpha[i..=i]);
        }
        // Keys after the last one any row of the chunk sees carry probability 0 for every row: leave them out.
        let n_eff = if all_visible {
            n
        } else {
            pos.iter().rposition(|&k| k <= cmax).map_or(0, |j| j + 1)
        };
        let ar = acc[r0 * hv..].as_mut_ptr();
        match *tile {
            Tile::F32 { vb, .. } => {
                let (pr, vp) = (s_buf.as_ptr(), vb.as_ptr() as *const u8);
                let pf = Ahead::NONE;
                match rc {
                    4 => pv::<4, BT, false>(pr, vp, n_eff, hv, &alpha, ar, u64::MAX, pf),
                    3 => pv::<3, BT, false>(pr, vp, n_eff, hv, &alpha, ar, u64::MAX, pf),
                    2 => pv::<2, BT, false>(pr, vp, n_eff, hv, &alpha, ar, u64::MAX, pf),
                    _ => pv::<1, BT, false>(pr, vp, n_eff, hv, &alpha, ar, u64::MAX, pf),
                }
            }
            Tile::F16 { vb, ahead, .. } => {
                let (pr, vp) = (s_buf.as_ptr(), vb.as_ptr() as *const u8);
                // The next block's values, a row's lines with each row (first chunk only).
                let pf = if r0 == 0 { ahead.1 } else { Ahead::NONE };
                match rc {
                    4 => pv::<4, BT, true>(pr, vp, n_eff, hv, &alpha, ar, cols, pf),
                    3 => pv::<3, BT, true>(pr, vp, n_eff, hv, &alpha, ar, cols, pf),
                    2 => pv::<2, BT, true>(pr, vp, n_eff, hv, &alpha, ar, cols, pf),
                    _ => pv::<1, BT, true>(pr, vp, n_eff, hv, &alpha, ar, cols, pf),
                }
            }
            Tile::Q4(ref q4) => {
                // The next block's value codes, a row's line with each row (first chunk only).
                let pf = if r0 == 0 { q4.ahead.1 } else { Ahead::NONE };
                if BT == 32 && q4.bits == 4 && hv.is_multiple_of(64) && q4.rb * 2 == hv {
                    // Integer p·V ([`avx2q::pv`]): whole 64-channel value groups of 4-bit codes, the
                    // probabilities scaled per token as each group starts.
                    let pr = s_buf.as_ptr();
                    match rc {
                        4 => avx2q::pv::<4>(q4, pr, n_eff, hv, &alpha, ar, pf),
                        3 => avx2q::pv::<3>(q4, pr, n_eff, hv, &alpha, ar, pf),
                        2 => avx2q::pv::<2>(q4, pr, n_eff, hv, &alpha, ar, pf),
                        _ => avx2q::pv::<1>(q4, pr, n_eff, hv, &alpha, ar, pf),
                    }
                    r0 += rc;
                    continue;
                }
                qtile::scale_probs::<BT>(q4, s_buf, rc, n_eff, pbuf);
                let pq = pbuf.as_ptr();
                let pc = pbuf[qtile::pc_offset::<BT>(q4.ng)..].as_ptr();
                match rc {
                    4 => pvq::<4, BT>(q4, pq, pc, n_eff, hv, &alpha, ar, pf),
                    3 => pvq::<3, BT>(q4, pq, pc, n_eff, hv, &alpha, ar, pf),
                    2 => pvq::<2, BT>(q4, pq, pc, n_eff, hv, &alpha, ar, pf),
                    _ => pvq::<1, BT>(q4, pq, pc, n_eff, hv, &alpha, ar, pf),
                }
            }
        }
        r0 += rc;
    }
}

/// dst[i] = src[i] as f32, 8 per instruction (`half`'s slice conversion goes 8 at a time through a call).
///
/// # Safety
/// The CPU must support AVX2 and F16C; `dst` is at least as long as `src`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    assert!(dst.len() >= src.len());
    let n8 = src.len() / 8 * 8;
    let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        let h = _mm_loadu_si128(s.add(i) as *const __m128i);
        _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for (x, h) in dst[n8..src.len()].iter_mut().zip(&src[n8..]) {
        *x = h.to_f32();
    }
}

/// The softmax step of R rows (`s[i · BT..][..BT]`, raw scores; −∞ where hidden): scale, block max, e^(s − m_new)
/// and the sum as [`super::block_softmax`] computes them up to rounding (the exponential's polynomial runs on FMAs
/// and the 8 lanes of a max or sum are reduced as a tree), in lockstep over the rows so their dependency chains
/// overlap; the rows' rescale factors come from one vector exponential. Every row of this fold, masked or not,
/// takes this step, which is what keeps its results independent of how a prompt was cut into tiles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_rows<const BT: usize, const R: usize>(
    s: &mut [f32],
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    assert!(s.len() >= R * BT && m.len() >= R && l.len() >= R && alpha.len() >= R && R <= 8);
    let nv = BT / 8;
    let sp = s.as_mut_ptr();
    let sc = _mm256_set1_ps(scale);
    let mut mx = [_mm256_set1_ps(f32::NEG_INFINITY); R];
    for v in 0..nv {
        for (i, mi) in mx.iter_mut().enumerate() {
            let at = sp.add(i * BT + 8 * v);
            let x = _mm256_mul_ps(_mm256_loadu_ps(at), sc);
            _mm256_storeu_ps(at, x);
            // The old lane where x is not greater (x NaN included), as block_softmax's ordered step.
            *mi = _mm256_max_ps(x, *mi);
        }
    }
    // Per row: the new running max (−∞: every score −∞, the row's state unchanged) and m_old − m_new.
    let mut mnew = [f32::NEG_INFINITY; R];
    let mut d = [0.0f32; 8];
    for i in 0..R {
        let bm = avx2q::hmax(mx[i]);
        if bm == f32::NEG_INFINITY {
            continue;
        }
        mnew[i] = if bm > m[i] { bm } else { m[i] };
        d[i] = m[i] - mnew[i];
    }
    let mut a = [0.0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), exp_neg8(_mm256_loadu_ps(d.as_ptr())));
    let mut sum = [_mm256_setzero_ps(); R];
    for v in 0..nv {
        for (i, si) in sum.iter_mut().enumerate() {
            if mnew[i] == f32::NEG_INFINITY {
                continue;
            }
            let at = sp.add(i * BT + 8 * v);
            let e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(at), _mm256_set1_ps(mnew[i])));
            _mm256_storeu_ps(at, e);
            *si = _mm256_add_ps(*si, e);
        }
    }
    for i in 0..R {
        if mnew[i] == f32::NEG_INFINITY {
            // Probabilities 0; alpha stays 1 and the row's state unchanged.
            for v in 0..nv {
                _mm256_storeu_ps(sp.add(i * BT + 8 * v), _mm256_setzero_ps());
            }
            continue;
        }
        alpha[i] = a[i];
        m[i] = mnew[i];
        l[i] = l[i] * a[i] + avx2q::hsum(sum[i]);
    }
}

/// [`exp_neg`] on 8 lanes: the same range reduction and polynomial, each multiply-add one FMA (so a result may
/// differ from the scalar one in its last bits); lanes below −87 (and −∞, NaN) give 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_neg8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.0);
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
    let xc = _mm256_max_ps(x, lo);
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(0.001_394_2);
    for c in [0.008_333_45, 0.041_666_43, 0.166_666_67, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(c));
    }
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_and_ps(_mm256_mul_ps(p, scale), keep)
}

/// 8 lanes at element `i` of `base`: f32 elements, or (H) f16 elements converted as they are loaded, with the
/// value the f32 copy of them would hold.
#[inline(always)]
unsafe fn ld8<const H: bool>(base: *const u8, i: usize) -> __m256 {
    if H {
        _mm256_cvtph_ps(_mm_loadu_si128(base.add(2 * i) as *const __m128i))
    } else {
        _mm256_loadu_ps((base as *const f32).add(i))
    }
}

/// [`scores`] for the `rc` ≤ 4 rows `row(0..rc)` with exactly that many rows of products (a padded row costs as
/// much as a real one).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_n<'q, const BT: usize, const H: bool>(
    kt: *const u8,
    rc: usize,
    row: impl Fn(usize) -> &'q [f32],
    hs: usize,
    s: &mut [f32],
    pf: Ahead,
) {
    macro_rules! go {
        ($r:literal) => {
            if BT >= 32 && $r <= 3 {
                // 32 keys per strip where the registers allow: each broadcast of a query value serves 4 vectors.
                scores::<$r, 4, BT, H>(kt, &std::array::from_fn(&row), hs, s, pf)
            } else if BT >= 16 {
                scores::<$r, 2, BT, H>(kt, &std::array::from_fn(&row), hs, s, pf)
            } else {
                scores::<$r, 1, BT, H>(kt, &std::array::from_fn(&row), hs, s, pf)
            }
        };
    }
    match rc {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        _ => go!(4),
    }
}

/// s[i · BT + j] = q_i · k_j for R rows and the BT keys of `kt` (hs × BT, transposed; f32, or f16 when H), in strips
/// of 8 · KW keys: R · KW accumulators in registers, each key channel's strip loaded once for the R rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores<const R: usize, const KW: usize, const BT: usize, const H: bool>(
    kt: *const u8,
    q: &[&[f32]; R],
    hs: usize,
    s: &mut [f32],
    pf: Ahead,
) {
    assert!(s.len() >= R * BT && q.iter().all(|r| r.len() >= hs));
    let out = s.as_mut_ptr();
    // Channel d of the next block's keys: the same bytes of its layout as this block's.
    let kstep = BT * if H { 2 } else { 4 };
    if H && ((R == 3 && KW == 4) || (R == 4 && KW == 2)) {
        // A chunk of 3 or 4 rows over f16 keys: the loop in assembly ([`f16asm`]), each strip asking for its own
        // slice of the next block's channels (the strip's own keys again where there is no next block).
        let rows: [*const f32; 4] = std::array::from_fn(|i| q[i.min(R - 1)].as_ptr());
        for k0 in (0..BT).step_by(8 * KW) {
            let kp = kt.add(2 * k0);
            let pfp = if pf.len > 0 {
                pf.base.wrapping_add(2 * k0)
            } else {
                kp
            };
            f16asm::scores::<R>(kp, kstep, rows, hs, pfp, kstep, out.add(k0), BT);
        }
        return;
    }
    for k0 in (0..BT).step_by(8 * KW) {
        let mut acc = [[_mm256_setzero_ps(); KW]; R];
        for d in 0..hs {
            if k0 == 0 {
                pf.span(d * kstep, kstep);
            }
            // The rows' query values first, then one key vector at a time: R · KW + R + 1 registers (16 at most).
            let qb: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*q[r].get_unchecked(d)));
            #[allow(clippy::needless_range_loop)]
            // acc[r][w]: the row loop runs inside the key-vector loop
            for w in 0..KW {
                let k = ld8::<H>(kt, d * BT + k0 + 8 * w);
                for r in 0..R {
                    acc[r][w] = _mm256_fmadd_ps(qb[r], k, acc[r][w]);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (w, aw) in ar.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * BT + k0 + 8 * w), *aw);
            }
        }
    }
}

/// 8 codes (4 bytes at `p`, two per byte, low nibble first) as f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nib8(p: *const u8) -> __m256 {
    let x = _mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32));
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)))
}

/// 16 codes (8 bytes at `p`) as two vectors of 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nib16(p: *const u8) -> [__m256; 2] {
    let x = _mm_loadl_epi64(p as *const __m128i);
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
    let b = _mm_unpacklo_epi8(lo, hi);
    [
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b))),
    ]
}

/// KW ∈ {1, 2, 4} vectors of 8 codes from the `4 · KW` bytes at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes<const KW: usize>(p: *const u8) -> [__m256; KW] {
    let mut out = [_mm256_setzero_ps(); KW];
    if KW == 1 {
        out[0] = nib8(p);
    } else {
        for h in 0..KW / 2 {
            let [a, b] = nib16(p.add(8 * h));
            out[2 * h] = a;
            out[2 * h + 1] = b;
        }
    }
    out
}

/// KW vectors of 8 one-byte codes from the `8 · KW` bytes at `p`, as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes<const KW: usize>(p: *const u8) -> [__m256; KW] {
    std::array::from_fn(|w| {
        let x = _mm_loadl_epi64(p.add(8 * w) as *const __m128i);
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x))
    })
}

/// [`scores`] for a 4-bit (or 8-bit) tile: s[i · BT + j] = qc[r_i] + Σ_c qs[r_i][c] · code[c][j] for the R rows
/// `rows`, each channel's strip of codes unpacked once for the R rows; `pf`: the next block's key codes, asked for a
/// channel's line with each channel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_q4<const R: usize, const KW: usize, const BT: usize>(
    q4: &Q4,
    rows: &[usize; R],
    s: &mut [f32],
    pf: Ahead,
) {
    let hs = q4.hs;
    assert!(R <= CHUNK && s.len() >= R * BT && q4.k.len() >= hs * BT / 2);
    assert!(rows
        .iter()
        .all(|&r| r < q4.qc.len() && (r + 1) * hs <= q4.qs.len()));
    let base = q4.k.as_ptr();
    let qs = q4.qs.as_ptr();
    let out = s.as_mut_ptr();
    for k0 in (0..BT).step_by(8 * KW) {
        let mut acc = [[_mm256_setzero_ps(); KW]; R];
        for (ar, &r) in acc.iter_mut().zip(rows) {
            let c = _mm256_set1_ps(*q4.qc.get_unchecked(r));
            for aw in ar.iter_mut() {
                *aw = c;
            }
        }
        // Channel c's codes of the next block: the same bytes of its layout as this block's.
        let kstep = BT * q4.bits as usize / 8;
        for c in 0..hs {
            if k0 == 0 {
                pf.span(c * kstep, kstep);
            }
            let k = if q4.bits == 8 {
                bytes::<KW>(base.add(c * BT + k0))
            } else {
                codes::<KW>(base.add(c * BT / 2 + k0 / 2))
            };
            let qb: [__m256; R] =
                std::array::from_fn(|r| _mm256_set1_ps(*qs.add(rows[r] * hs + c)));
            for w in 0..KW {
                for r in 0..R {
                    acc[r][w] = _mm256_fmadd_ps(qb[r], k[w], acc[r][w]);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (w, aw) in ar.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * BT + k0 + 8 * w), *aw);
            }
        }
    }
}

/// acc_i ← alpha_i · acc_i + Σ_{j<n} p[i · BT + j] · v_j for R rows (`acc` row stride hv), in strips of 32 channels
/// (up to 3 rows), 16 or 8 whose R rows stay in registers while the strip of each value row is loaded once.
#[inline]
#[allow(clippy::too_many_arguments)] // the strip's arguments and the prefetch span
#[target_feature(enable = "avx2,fma,f16c")]
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
        // The next block's values are asked for during the first strip only (by each [`f16asm`] strip for its
        // own channels).
        let pf = if c0 == 0 || ((R == 3 || R == 4) && H && cols == u64::MAX) {
            pf
        } else {
            Ahead::NONE
        };
        if R <= 3 && hv - c0 >= 32 {
            // 32 channels per strip where the registers allow: each broadcast probability serves 4 vectors.
            pv_strip::<R, 4, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf);
            c0 += 32;
        } else if hv - c0 >= 16 {
            pv_strip::<R, 2, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf);
            c0 += 16;
        } else {
            pv_strip::<R, 1, BT, H>(p, vb, n, hv, alpha, acc, c0, cols, pf);
            c0 += 8;
        }
    }
}

/// One strip of [`pv`]: channels [c0, c0 + 8·W).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let vrow = hv * if H { 2 } else { 4 };
    if H && ((R == 3 && W == 4) || (R == 4 && W == 2)) && cols == u64::MAX {
        // A chunk of 3 or 4 rows over f16 values: the loop in assembly ([`f16asm`]), asking for this strip's
        // channels of each row of the next block (the strip's own rows again where there is no next block), then
        // for the rows past the last one read of a partial block.
        let vp = vb.add(2 * c0);
        let pfp = if pf.len > 0 {
            pf.base.wrapping_add(2 * c0)
        } else {
            vp
        };
        f16asm::pv::<R>(p, BT, vp, vrow, n, pfp, vrow, alpha, acc.add(c0), hv);
        if c0 == 0 {
            pf.span(n * vrow, usize::MAX);
        }
        return;
    }
    let mut a = [[_mm256_setzero_ps(); W]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        let al = _mm256_set1_ps(alpha[r]);
        for (w, aw) in ar.iter_mut().enumerate() {
            *aw = _mm256_mul_ps(_mm256_loadu_ps(acc.add(r * hv + c0 + 8 * w)), al);
        }
    }
    for j in 0..n {
        // Row j of the next block's values (a full next block: rows past n too, on the last row).
        if j + 1 == n {
            pf.span(j * vrow, usize::MAX);
        } else {
            pf.span(j * vrow, vrow);
        }
        if cols >> j & 1 == 0 {
            continue; // not selected: probability 0, value row not read
        }
        // The rows' probabilities first, then one value vector at a time: R · W + R + 1 registers (16 at most).
        let pb: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*p.add(r * BT + j)));
        #[allow(clippy::needless_range_loop)] // a[r][w]: the row loop runs inside the strip loop
        for w in 0..W {
            let v = ld8::<H>(vb, j * hv + c0 + 8 * w);
            for r in 0..R {
                a[r][w] = _mm256_fmadd_ps(pb[r], v, a[r][w]);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (w, aw) in ar.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * hv + c0 + 8 * w), *aw);
        }
    }
}

/// [`pv`] for a 4-bit tile: acc_i ← alpha_i · acc_i + pc_i[g] + Σ_{j<n} pq_i[g · BT + j] · code_j, where `pq` rows
/// are `ng · BT` apart and `pc` rows `ng` apart ([`qtile::scale_probs`]'s layout); strips stay inside a value group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's arguments and the prefetch span
unsafe fn pvq<const R: usize, const BT: usize>(
    q4: &Q4,
    pq: *const f32,
    pc: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    pf: Ahead,
) {
    let mut c0 = 0;
    while c0 < hv {
        // The next block's value codes are asked for during the first strip only.
        let pf = if c0 == 0 { pf } else { Ahead::NONE };
        // = c0 / VALUE_GROUP: 32-channel strips start at multiples of 32 and the rest at multiples of 16, so no
        // strip crosses a group.
        let gi = c0 / 64;
        let (pq, pc) = (pq.add(gi * BT), pc.add(gi));
        if R <= 2 && hv - c0 >= 32 {
            pvq_strip::<R, 4, BT>(q4, pq, pc, n, hv, alpha, acc, c0, pf);
            c0 += 32;
        } else if hv - c0 >= 16 {
            pvq_strip::<R, 2, BT>(q4, pq, pc, n, hv, alpha, acc, c0, pf);
            c0 += 16;
        } else {
            pvq_strip::<R, 1, BT>(q4, pq, pc, n, hv, alpha, acc, c0, pf);
            c0 += 8;
        }
    }
}

/// One strip of [`pvq`]: channels [c0, c0 + 8·W).
#[allow(clippy::too_many_arguments)] // pvq's arguments and the strip
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pvq_strip<const R: usize, const W: usize, const BT: usize>(
    q4: &Q4,
    pq: *const f32,
    pc: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    c0: usize,
    pf: Ahead,
) {
    let ng = q4.ng;
    let bits = q4.bits as usize;
    assert!(n <= BT && q4.v.len() >= n * q4.rb && q4.rb * 8 >= (c0 + 8 * W) * bits);
    let mut a = [[_mm256_setzero_ps(); W]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        let al = _mm256_set1_ps(alpha[r]);
        let cst = _mm256_set1_ps(*pc.add(r * ng));
        for (w, aw) in ar.iter_mut().enumerate() {
            *aw = _mm256_fmadd_ps(_mm256_loadu_ps(acc.add(r * hv + c0 + 8 * w)), al, cst);
        }
    }
    let vbase = q4.v.as_ptr().add(c0 * bits / 8);
    for j in 0..n {
        // Row j of the next block's value codes (a full next block: rows past n too, on the last row).
        if j + 1 == n {
            pf.span(j * q4.rb, usize::MAX);
        } else {
            pf.span(j * q4.rb, q4.rb);
        }
        let v = if bits == 8 {
            bytes::<W>(vbase.add(j * q4.rb))
        } else {
            codes::<W>(vbase.add(j * q4.rb))
        };
        let pb: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*pq.add(r * ng * BT + j)));
        for w in 0..W {
            for r in 0..R {
                a[r][w] = _mm256_fmadd_ps(pb[r], v[w], a[r][w]);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (w, aw) in ar.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * hv + c0 + 8 * w), *aw);
        }
    }
}

/// Sets the entries of each BT-wide row of `s` whose bit in `cols` is clear to −∞ (8 lanes at a time).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mask_cols<const BT: usize>(s: &mut [f32], cols: u64) {
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for row in s.chunks_exact_mut(BT) {
        for (c, v) in row.chunks_exact_mut(8).enumerate() {
            let keep = _mm256_set1_epi32(((cols >> (8 * c)) & 0xff) as i32);
            // Lanes whose bit is set: all ones.
            let on = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(keep, bit), bit));
            let p = v.as_mut_ptr();
            // SAFETY: `v` holds 8 f32.
            unsafe { _mm256_storeu_ps(p, _mm256_blendv_ps(ninf, _mm256_loadu_ps(p), on)) };
        }
    }
}
