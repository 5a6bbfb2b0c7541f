//! Integer scores of a 4-bit KIVI block (32 keys) on AVX2, and the block's preparation in 8-lane vectors: the
//! AVX2 counterpart of [`super::vnni`]'s scores, for CPUs without AVX-512 (AVX2-only EPYCs).
//!
//! A score is `qc + Σ_c qs[c] · code[c][j]` ([`super::qtile`]); each row's `qs` is quantized once per block to int8
//! (`qs ≈ s · qi`), exactly as the VNNI fold does, so the error bound there holds here: the integer sums are exact
//! and only the query's rounding, at most `max|qs| / 254` per channel, moves a score.
//!
//! AVX2 has no `vpdpbusd`: `vpmaddubsw` multiplies unsigned codes by signed int8 query values and adds adjacent
//! pairs into 16-bit lanes. Four channels of codes (4 × 16 bytes, channel-major) are two 32-byte loads, [c | c+1]
//! and [c+2 | c+3]; interleaving their bytes within each 128-bit lane pairs channel c with c+2 in the low lane and
//! c+1 with c+3 in the high lane, for the same 8 keys, so no byte crosses a lane. Each row's query is laid out once
//! per block to match (lane 0: (q[c], q[c+2]) eight times, lane 1: (q[c+1], q[c+3])). The 16-bit sums are widened
//! and the two lanes added every 8 steps of 4 channels: a lane gains at most 2 · 15 · 127 = 3 810 per step, so 8
//! steps stay below 2¹⁵. Low nibbles (even keys) and high nibbles (odd keys) go in two passes over the block's
//! codes, so each pass keeps only 2 accumulators per row in registers.
//!
//! p·V ([`pv`]) multiplies byte probabilities (each row's, times the tokens' value scales, quantized per value
//! group against their largest: 255 levels) by the codes on `vpmaddubsw`, 32 products per instruction, and widens
//! the 16-bit sums every 16 tokens. The VNNI fold keeps 16-bit probabilities (`vpdpwssd` makes them as cheap as
//! bytes there); here 16-bit ones on `vpmaddwd` needed each code widened to 16 bits and did half the products per
//! multiply.
//!
//! Byte probabilities round more: per channel at most n · 15 · s / 2 with s = the group's largest scaled probability
//! / 255 instead of / 32 767. Against the 4-bit values themselves that stays small: in `every_simd_path_matches_naive`
//! the fold's error (query and probability rounding together) is at most 0.20 of what 4-bit storage moves the same
//! output (0.16 with 16-bit probabilities), about 2 % more error than storage alone where the two add in quadrature.
//! SmolLM2's `kivi4` perplexity over 6 × 2048 tokens of the essays (`hayloft perplexity --kv kivi4 --ctx 2048
//! --chunks 6`) moves as much from any rounding this small: 20.920 before the FMA softmax, 20.996 after it, 20.970
//! with byte probabilities too (full cache 20.664 throughout). A KIVI cache's codes flip wherever a key lands near a
//! rounding edge, so its perplexity does not resolve differences this fine. On a Zen 3 (one thread, one 8K layer
//! from the L3, min of 2000 steps) byte probabilities took the step from 0.512 to 0.456 ms.
//!
//! What bounds this on Zen 1: every vector integer multiply issues on one pipe (FP0), a 256-bit one in two halves,
//! where an FMA's halves share FP0 and FP1. A decode block of a 3-query group (hk = hv = 64) needs 384 FP0 cycles
//! for its scores and 768 for p·V at the least (16-bit probabilities, as it then ran), against 1 536 for the f16
//! fold's FMAs: on arithmetic alone the 4-bit fold could be at most about 1.33× the f16 one there, and both folds,
//! not the bus, bound decode at 8K (SmolLM2's 30 layers of 8K from the L3: f16 0.645 ms per layer, 4-bit 0.598).
//!
//! On Zen 1 a 256-bit `vpmaddubsw` does 32 products in two micro-ops where a 256-bit FMA does 8, and no code is
//! widened to a float. 30 layers of SmolLM2's shapes at 8K from memory (`batched_decode_timing`, `HL_STREAMS=1
//! HL_LEN=8192 HL_STEPS=30`, AVX2-only EPYC, 3 alternations): float fold 37–55 ms per step; integer scores, vector
//! preparation and spread prefetch 22.1–23.4; integer p·V too 19.8–20.0 (f16: 21.9–22.7).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::qtile::Q4;
use super::Ahead;

const BT: usize = 32;

/// The most stored key channels the integer scores take (each row's laid-out query lives on the stack).
pub(super) const MAX_HS: usize = 256;

/// Query byte pattern of a step: lane 0 repeats bytes (0, 2), lane 1 bytes (1, 3) of the step's 4 channels.
const QPAT: [i8; 32] = {
    let mut a = [0i8; 32];
    let mut i = 0;
    while i < 16 {
        a[i] = if i % 2 == 0 { 0 } else { 2 };
        a[16 + i] = if i % 2 == 0 { 1 } else { 3 };
        i += 1;
    }
    a
};

/// Steps of 4 channels whose 16-bit sums cannot overflow.
const WIDEN_EVERY: usize = 8;

/// s[i · BT + j] = qc[r_i] + qsc[r_i] · Σ_c qi[r_i][c] · code[c][j] for the rows `rows` (R ≤ 4), j < 32.
/// `ahead`: the next block's key codes, asked for a line per step (4 channels) of the first pass.
///
/// # Safety
/// The CPU must support AVX2 (and FMA, F16C); `q4` holds 4-bit codes with `qi` filled for every row of `rows`, hs a
/// multiple of 4 and at most [`MAX_HS`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores<const R: usize>(
    q4: &Q4,
    rows: &[usize; R],
    s: &mut [f32],
    ahead: Ahead,
) {
    let hs = q4.hs;
    assert!(q4.bits == 4 && R <= 4 && hs.is_multiple_of(4) && hs <= MAX_HS);
    assert!(q4.k.len() >= hs * BT / 2 && s.len() >= R * BT);
    assert!(rows
        .iter()
        .all(|&r| r < q4.qc.len() && r < q4.qsc.len() && (r + 1) * hs <= q4.qi.len()));
    let steps = hs / 4;
    // Per row and step: the 32 query bytes its codes multiply with.
    let mut qv: [[MaybeUninit<__m256i>; MAX_HS / 4]; R] = [[MaybeUninit::uninit(); MAX_HS / 4]; R];
    let pat = _mm256_loadu_si256(QPAT.as_ptr() as *const __m256i);
    for (qr, &r) in qv.iter_mut().zip(rows) {
        let q = q4.qi.as_ptr().add(r * hs);
        for (t, x) in qr.iter_mut().enumerate().take(steps) {
            let d = _mm256_set1_epi32((q.add(4 * t) as *const i32).read_unaligned());
            x.write(_mm256_shuffle_epi8(d, pat));
        }
    }
    // Per row: the 32-bit sums of even keys (idx 0..16 → key 2·idx) then odd keys (→ 2·idx + 1).
    let mut sums = [[0i32; BT]; R];
    let mask = _mm256_set1_epi8(15);
    let base = q4.k.as_ptr();
    for odd in [false, true] {
        let mut t0 = 0;
        while t0 < steps {
            let t1 = (t0 + WIDEN_EVERY).min(steps);
            // Per row: 16-bit sums of idx 0..8 and 8..16, lane 0 over channels c ≡ 0, 2 (mod 4), lane 1 over 1, 3.
            let mut a16 = [[_mm256_setzero_si256(); 2]; R];
            for t in t0..t1 {
                if !odd {
                    ahead.span_l2(64 * t, 64);
                }
                let x = _mm256_loadu_si256(base.add(64 * t) as *const __m256i);
                let y = _mm256_loadu_si256(base.add(64 * t + 32) as *const __m256i);
                let (x, y) = if odd {
                    (
                        _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(y), mask),
                    )
                } else {
                    (_mm256_and_si256(x, mask), _mm256_and_si256(y, mask))
                };
                let lo = _mm256_unpacklo_epi8(x, y);
                let hi = _mm256_unpackhi_epi8(x, y);
                for (ar, qr) in a16.iter_mut().zip(&qv) {
                    let q = qr.get_unchecked(t).assume_init();
                    ar[0] = _mm256_add_epi16(ar[0], _mm256_maddubs_epi16(lo, q));
                    ar[1] = _mm256_add_epi16(ar[1], _mm256_maddubs_epi16(hi, q));
                }
            }
            // Widened, the two lanes (channel sets) added, into the row's 32-bit sums.
            for (ar, sr) in a16.iter().zip(sums.iter_mut()) {
                for (h, &a) in ar.iter().enumerate() {
                    let w = _mm256_add_epi32(
                        _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)),
                        _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(a)),
                    );
                    let at = sr.as_mut_ptr().add(16 * odd as usize + 8 * h) as *mut __m256i;
                    _mm256_storeu_si256(at, _mm256_add_epi32(_mm256_loadu_si256(at), w));
                }
            }
            t0 = t1;
        }
    }
    // qc + qsc · sum, even and odd keys interleaved back into key order.
    let out = s.as_mut_ptr();
    for (i, (sr, &r)) in sums.iter().zip(rows).enumerate() {
        let qc = _mm256_set1_ps(*q4.qc.get_unchecked(r));
        let st = _mm256_set1_ps(*q4.qsc.get_unchecked(r));
        let f = |k: usize| {
            let v = _mm256_loadu_si256(sr.as_ptr().add(8 * k) as *const __m256i);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), st, qc)
        };
        for h in 0..2 {
            // Even keys 16h + 0, 2, .., 14 and odd keys 16h + 1, .., 15.
            let (e, o) = (f(h), f(2 + h));
            let (a, b) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
            let dst = out.add(i * BT + 16 * h);
            _mm_storeu_ps(dst, _mm256_castps256_ps128(a));
            _mm_storeu_ps(dst.add(4), _mm256_castps256_ps128(b));
            _mm_storeu_ps(dst.add(8), _mm256_extractf128_ps::<1>(a));
            _mm_storeu_ps(dst.add(12), _mm256_extractf128_ps::<1>(b));
        }
    }
}

/// Row `p`'s probabilities (n ≤ 32 values ≥ 0, the rest read as 0) times the block's value scales of one group
/// (`vscale`), as unsigned bytes: `p[j] · vscale[j] ≈ s · out[j]`, s = max / 255, out[j] = round(x / s).
/// Returns (s, Σ_j p[j] · vmin[j]); s is 0 when every scaled value is 0 (or one is not finite).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_probs(
    p: *const f32,
    n: usize,
    vmin: *const f32,
    vscale: *const f32,
    out: &mut [u8; BT],
) -> (f32, f32) {
    let mut buf = [0.0f32; BT];
    let src = if n >= BT {
        p
    } else {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        buf.as_ptr()
    };
    let ps: [__m256; 4] = std::array::from_fn(|h| _mm256_loadu_ps(src.add(8 * h)));
    let xs: [__m256; 4] =
        std::array::from_fn(|h| _mm256_mul_ps(ps[h], _mm256_loadu_ps(vscale.add(8 * h))));
    let mut c = _mm256_mul_ps(ps[0], _mm256_loadu_ps(vmin));
    for (h, &v) in ps.iter().enumerate().skip(1) {
        c = _mm256_fmadd_ps(v, _mm256_loadu_ps(vmin.add(8 * h)), c);
    }
    let pc = hsum(c);
    let mx = hmax(_mm256_max_ps(
        _mm256_max_ps(xs[0], xs[1]),
        _mm256_max_ps(xs[2], xs[3]),
    ));
    if !(mx > 0.0 && mx.is_finite()) {
        *out = [0; BT];
        return (0.0, pc);
    }
    // Rounded to nearest (even); every value lies in 0..=255, so the narrowing saturates nothing.
    let inv = _mm256_set1_ps(255.0 / mx);
    let q: [__m256i; 4] = std::array::from_fn(|h| _mm256_cvtps_epi32(_mm256_mul_ps(xs[h], inv)));
    // Packing works per 128-bit lane: 4-byte chunks come out as (0, 2, 4, 6, 1, 3, 5, 7) of the 8 wanted.
    let b = _mm256_packus_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, b);
    (mx / 255.0, pc)
}

/// acc_i ← alpha_i · acc_i + pc_i[g] + Σ_{j<n} pq_i[g · 32 + j] · code_j for R ≤ 4 rows (`acc` row stride hv), one
/// value group (64 channels) at a time, as integer dot products, where pq_i[g · 32 + j] = p_i[j] · vscale[g][j] and
/// pc_i[g] = Σ_j p_i[j] · vmin[g][j] come from the rows' probabilities `p` (rows 32 apart) as each group starts
/// ([`super::qtile`]'s split of a value row, here without a pass of its own). Per row and group the scaled
/// probabilities are quantized to unsigned bytes against the largest: |Δ| ≤ n · 15 · s / 2 per channel, s = max pq
/// / 255 (the module's notes weigh that against 4-bit storage's own error).
///
/// `vpmaddubsw` multiplies 32 byte pairs (probability bytes, code bytes) and adds each pair into a 16-bit lane; the
/// codes are laid out so a lane's pair is one channel of tokens (j, j + 1) and the next lane's the same channel of
/// (j + 2, j + 3): four value rows (one 32-byte load each) are interleaved byte by byte, then in 16-bit units, within
/// each 128-bit lane, and only then split into low nibbles (even channels) and high nibbles (odd). A 16-bit lane
/// gains at most 2 · 255 · 15 = 7 650 per 4 tokens, so 16 tokens (30 600) fit; `vpmaddwd` by ones then adds a
/// channel's two lanes into 32 bits. The group's 64 channels go in four passes (even or odd channels, first or second
/// half of each lane's bytes) with 2 accumulators per row each, and the channel order is restored once per group.
/// `ahead`: the next block's value codes, a row's line with each row of the first group.
///
/// # Safety
/// The CPU must support AVX2 (and FMA, F16C); `q4` holds 4-bit codes of 32 tokens with `rb · 2 == hv`, hv a
/// multiple of 64; `p` holds R rows of n values 32 apart, `acc` R rows as laid out above.
#[allow(clippy::too_many_arguments)] // the float step's arguments and the prefetch span
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pv<const R: usize>(
    q4: &Q4,
    p: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    ahead: Ahead,
) {
    let (ng, rb) = (q4.ng, q4.rb);
    assert!(
        q4.bits == 4 && R <= 4 && n <= BT && hv.is_multiple_of(64) && ng * 64 == hv && rb * 2 == hv
    );
    assert!(q4.v.len() >= BT * rb && alpha.len() >= R);
    assert!(q4.vmin.len() >= ng * BT && q4.vscale.len() >= ng * BT);
    let mask = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    // Tokens read: whole steps of 4 (a token at n or later carries weight 0; the block holds 32 rows).
    let nt = n.next_multiple_of(4);
    for g in 0..ng {
        let mut w8 = [[0u8; BT]; R];
        let (mut step, mut pcs) = ([0.0f32; R], [0.0f32; R]);
        let (vmin, vscale) = (q4.vmin.as_ptr().add(g * BT), q4.vscale.as_ptr().add(g * BT));
        for (r, wr) in w8.iter_mut().enumerate() {
            (step[r], pcs[r]) = quantize_probs(p.add(r * BT), n, vmin, vscale, wr);
        }
        let vb = q4.v.as_ptr().add(32 * g);
        // Per row and channel parity: the group's 32 channel sums (channel 2i + parity at [parity][i]), as floats.
        let mut part = [[[0.0f32; BT]; 2]; R];
        for quarter in 0..4 {
            let (odd, second) = (quarter >= 2, quarter % 2 == 1);
            let mut ia = [[_mm256_setzero_si256(); 2]; R];
            let mut j0 = 0;
            while j0 < nt {
                let j1 = (j0 + 16).min(nt);
                // Per row: 16-bit sums, two lanes per channel (tokens j, j + 1 and j + 2, j + 3 of every step).
                let mut a16 = [[_mm256_setzero_si256(); 2]; R];
                for j in (j0..j1).step_by(4) {
                    if g == 0 && quarter == 0 {
                        // Rows j..j + 4 of the next block's value codes (a full next block: the rest on the last).
                        if j + 4 >= nt {
                            ahead.span_l2(j * rb, usize::MAX);
                        } else {
                            ahead.span_l2(j * rb, 4 * rb);
                        }
                    }
                    let row = |t: usize| _mm256_loadu_si256(vb.add((j + t) * rb) as *const __m256i);
                    let (a, b, c, d) = (row(0), row(1), row(2), row(3));
                    // Bytes i = 8·second + 0..8 (lane 0) and 16 + 8·second + 0..8 (lane 1) of tokens (j, j + 1) and
                    // (j + 2, j + 3), then the four tokens of each byte side by side: x[h] holds bytes 4h + 0..4.
                    let (ab, cd) = if second {
                        (_mm256_unpackhi_epi8(a, b), _mm256_unpackhi_epi8(c, d))
                    } else {
                        (_mm256_unpacklo_epi8(a, b), _mm256_unpacklo_epi8(c, d))
                    };
                    let x = [_mm256_unpacklo_epi16(ab, cd), _mm256_unpackhi_epi16(ab, cd)];
                    let x = x.map(|v| {
                        if odd {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask)
                        } else {
                            _mm256_and_si256(v, mask)
                        }
                    });
                    for (ar, wr) in a16.iter_mut().zip(&w8) {
                        let w =
                            _mm256_set1_epi32((wr.as_ptr().add(j) as *const i32).read_unaligned());
                        ar[0] = _mm256_add_epi16(ar[0], _mm256_maddubs_epi16(w, x[0]));
                        ar[1] = _mm256_add_epi16(ar[1], _mm256_maddubs_epi16(w, x[1]));
                    }
                }
                for (ar, sr) in ia.iter_mut().zip(&a16) {
                    ar[0] = _mm256_add_epi32(ar[0], _mm256_madd_epi16(sr[0], ones));
                    ar[1] = _mm256_add_epi32(ar[1], _mm256_madd_epi16(sr[1], ones));
                }
                j0 = j1;
            }
            // ia[r][h]: codes i = 8·second + 4h + 0..4 (lane 0) and 16 + 8·second + 4h + 0..4 (lane 1).
            for ((ar, pr), &st) in ia.iter().zip(part.iter_mut()).zip(&step) {
                let st = _mm256_set1_ps(st);
                let dst = pr[odd as usize].as_mut_ptr();
                for (h, &a) in ar.iter().enumerate() {
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(a), st);
                    let i0 = 8 * second as usize + 4 * h;
                    _mm_storeu_ps(dst.add(i0), _mm256_castps256_ps128(f));
                    _mm_storeu_ps(dst.add(16 + i0), _mm256_extractf128_ps::<1>(f));
                }
            }
        }
        // Channel order restored, then acc ← alpha · acc + pc + the sums.
        for (r, pr) in part.iter().enumerate() {
            let al = _mm256_set1_ps(alpha[r]);
            let cst = _mm256_set1_ps(pcs[r]);
            let row = acc.add(r * hv + 64 * g);
            for i in (0..BT).step_by(8) {
                let e = _mm256_loadu_ps(pr[0].as_ptr().add(i));
                let o = _mm256_loadu_ps(pr[1].as_ptr().add(i));
                // Lane 0: channels 2i..2i + 8, lane 1: 2i + 8..2i + 16.
                let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
                let first = _mm256_permute2f128_ps::<0x20>(lo, hi);
                let second = _mm256_permute2f128_ps::<0x31>(lo, hi);
                for (k, v) in [first, second].into_iter().enumerate() {
                    let at = row.add(2 * i + 8 * k);
                    let old = _mm256_loadu_ps(at);
                    _mm256_storeu_ps(at, _mm256_add_ps(_mm256_fmadd_ps(old, al, cst), v));
                }
            }
        }
    }
}

/// 8 interleaved (a, b) f16 pairs at `p` (16 f16) as [a's, b's] in f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pairs8(p: *const half::f16) -> [__m256; 2] {
    let x = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let y = _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i));
    // Per 128-bit lane: [x0 x2 y0 y2 | x4 x6 y4 y6], i.e. pairs (0, 1, 4, 5 | 2, 3, 6, 7): 64-bit chunks reordered.
    let a = _mm256_shuffle_ps::<0b10_00_10_00>(x, y);
    let b = _mm256_shuffle_ps::<0b11_01_11_01>(x, y);
    let order =
        |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
    [order(a), order(b)]
}

/// Splits interleaved (a, b) f16 pairs (`src`, 2 · n, n a multiple of 8) into `a` and `b` as f32.
///
/// # Safety
/// The CPU must support AVX2 (and FMA, F16C); `a` and `b` hold n each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn split_pairs(src: &[half::f16], a: &mut [f32], b: &mut [f32]) {
    let n = src.len() / 2;
    assert!(n.is_multiple_of(8) && a.len() >= n && b.len() >= n);
    for i in (0..n).step_by(8) {
        let [x, y] = pairs8(src.as_ptr().add(2 * i));
        _mm256_storeu_ps(a.as_mut_ptr().add(i), x);
        _mm256_storeu_ps(b.as_mut_ptr().add(i), y);
    }
}

/// Sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// Maximum of 8 lanes (a NaN lane may or may not win).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hmax(v: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)))
}

/// Each query row's constants for a block, as [`super::vnni::fold_queries`] computes them, in 8-lane vectors: row
/// r's `qs` (`qs[r · hs..][..hs]`) = q_r ∘ key scale, `qc[r]` = q_r · key min and, with `quantize`, `qi` = `qs`
/// quantized to int8 (`qs ≈ qsc[r] · qi`, qsc = max|qs| / 127, all zero when the row is or holds a non-finite
/// value). `k_ms` is the block's per-channel (min, scale) pairs in f16; `row_q(r)` is row r's query over hs
/// channels, hs a multiple of 8. Rows go up to four at a time, each 8 channels' pairs widened once for them.
///
/// # Safety
/// The CPU must support AVX2 (and FMA, F16C); `k_ms` holds 2 · hs, `qs` and `qi` rows · hs, `qc` and `qsc` rows.
#[allow(clippy::too_many_arguments)] // one block's inputs and the four outputs
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fold_queries<'q>(
    k_ms: &[half::f16],
    hs: usize,
    rows: usize,
    row_q: impl Fn(usize) -> &'q [f32],
    quantize: bool,
    qs: &mut [f32],
    qi: &mut [i8],
    qc: &mut [f32],
    qsc: &mut [f32],
) {
    assert!(hs.is_multiple_of(8) && k_ms.len() >= 2 * hs);
    assert!(qs.len() >= rows * hs && qc.len() >= rows);
    assert!(!quantize || (qi.len() >= rows * hs && qsc.len() >= rows));
    let mut r0 = 0;
    while r0 < rows {
        let k = (rows - r0).min(4);
        let (qs, qc) = (&mut qs[r0 * hs..], &mut qc[r0..]);
        let row = |i: usize| row_q(r0 + i);
        let q8 = if quantize {
            Some((&mut qi[r0 * hs..], &mut qsc[r0..]))
        } else {
            None
        };
        match k {
            1 => fold_rows::<1>(k_ms, hs, row, qs, qc, q8),
            2 => fold_rows::<2>(k_ms, hs, row, qs, qc, q8),
            3 => fold_rows::<3>(k_ms, hs, row, qs, qc, q8),
            _ => fold_rows::<4>(k_ms, hs, row, qs, qc, q8),
        }
        r0 += k;
    }
}

/// [`fold_queries`] for K ≤ 4 rows at once, their accumulators in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold_rows<'q, const K: usize>(
    k_ms: &[half::f16],
    hs: usize,
    row_q: impl Fn(usize) -> &'q [f32],
    qs: &mut [f32],
    qc: &mut [f32],
    q8: Option<(&mut [i8], &mut [f32])>,
) {
    assert!(qs.len() >= K * hs && qc.len() >= K);
    let (mut mx, mut c) = ([_mm256_setzero_ps(); K], [_mm256_setzero_ps(); K]);
    let q: [&[f32]; K] = std::array::from_fn(&row_q);
    assert!(q.iter().all(|q| q.len() >= hs));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    for ch in (0..hs).step_by(8) {
        let [kmin, kscale] = pairs8(k_ms.as_ptr().add(2 * ch));
        for i in 0..K {
            let qv = _mm256_loadu_ps(q[i].as_ptr().add(ch));
            let x = _mm256_mul_ps(qv, kscale);
            _mm256_storeu_ps(qs.as_mut_ptr().add(i * hs + ch), x);
            c[i] = _mm256_fmadd_ps(qv, kmin, c[i]);
            mx[i] = _mm256_max_ps(mx[i], _mm256_and_ps(x, abs));
        }
    }
    for i in 0..K {
        qc[i] = hsum(c[i]);
    }
    let Some((qi, qsc)) = q8 else {
        return;
    };
    assert!(qi.len() >= K * hs && qsc.len() >= K);
    for i in 0..K {
        let amax = hmax(mx[i]);
        let dst = qi.as_mut_ptr().add(i * hs);
        // All zero when the row is (or holds a non-finite value).
        if !(amax > 0.0 && amax.is_finite()) {
            qsc[i] = 0.0;
            std::ptr::write_bytes(dst, 0, hs);
            continue;
        }
        qsc[i] = amax / 127.0;
        let inv = _mm256_set1_ps(127.0 / amax);
        let src = qs.as_ptr().add(i * hs);
        for ch in (0..hs).step_by(8) {
            // Rounded to nearest (even), then narrowed with saturation: |qs · inv| ≤ 127 up to rounding.
            let v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src.add(ch)), inv));
            let w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            _mm_storel_epi64(dst.add(ch) as *mut __m128i, _mm_packs_epi16(w, w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::qtile::QPrep;
    use super::super::vnni::tests::{adversarial, check_pv, check_scores};
    use super::*;

    pub(super) fn avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Integer scores stay within the stated bound of f32 scores over the dequantized keys, for 1 to 4 rows.
    #[test]
    fn avx2_integer_scores_bound_their_error_against_f32() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for (hk, seed) in [(64usize, 1u64), (40, 2), (128, 3), (256, 5), (8, 6)] {
            let (hv, rows) = (64, 4);
            let (qb, q) = adversarial(hk, hv, rows, seed);
            let mut prep = QPrep::default();
            prep.ensure(rows, hk, hv, BT);
            let q4 = prep.prepare::<BT>(&qb, hv, rows, super::super::qtile::Int8::Avx2, |r| {
                &q[r * hk..][..hk]
            });
            assert_eq!(q4.qi.len(), rows * hk);
            for n in 1..=4 {
                let mut s = vec![0.0f32; 4 * BT];
                // SAFETY: avx2() checked the CPU; qi is filled for every row.
                unsafe {
                    match n {
                        1 => scores::<1>(&q4, &[3], &mut s, Ahead::NONE),
                        2 => scores::<2>(&q4, &[0, 2], &mut s, Ahead::NONE),
                        3 => scores::<3>(&q4, &[0, 1, 2], &mut s, Ahead::NONE),
                        _ => scores::<4>(&q4, &[0, 1, 2, 3], &mut s, Ahead::NONE),
                    }
                };
                let which: &[usize] = match n {
                    1 => &[3],
                    2 => &[0, 2],
                    3 => &[0, 1, 2],
                    _ => &[0, 1, 2, 3],
                };
                let worst = which
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| check_scores(&qb, &q, q4.qs, hk, r, &s[i * BT..][..BT]))
                    .fold(0.0f32, f32::max);
                eprintln!("hk {hk} rows {n}: worst error {worst:.3} of the bound");
            }
        }
    }

    /// Integer p·V stays within the stated bound of the float step, over full and partly masked blocks, 1 to 4 rows
    /// and one or several value groups.
    #[test]
    fn avx2_integer_pv_bounds_its_error_against_f32() {
        use super::super::qtile;
        use crate::testutil::Rng;
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let (hk, rows) = (64usize, 4usize);
        for hv in [64usize, 256] {
            let (qb, q) = adversarial(hk, hv, rows, 9);
            let mut prep = QPrep::default();
            prep.ensure(rows, hk, hv, BT);
            let q4 = prep.prepare::<BT>(&qb, hv, rows, qtile::Int8::Avx2, |r| &q[r * hk..][..hk]);
            let mut rng = Rng::seeded(4);
            for n in [32usize, 29, 1] {
                // Probabilities: one dominant key, a few mid, many tiny (e^-20), per row.
                let mut p = vec![0.0f32; 8 * BT];
                for r in 0..rows {
                    for j in 0..n {
                        p[r * BT + j] = match (j + r) % 7 {
                            0 => 1.0,
                            1 | 4 => 0.3 * rng.uniform().abs(),
                            _ => 2e-9 * rng.uniform().abs(),
                        };
                    }
                }
                let mut pbuf = vec![0.0f32; qtile::pbuf_len(hv, BT)];
                qtile::scale_probs::<BT>(&q4, &p, rows, n, &mut pbuf);
                let acc0 = rng.vec(rows * hv, 5.0);
                let alpha = [0.25f32, 1.0, 0.0, 0.5];
                for nr in 1..=rows {
                    let mut got = acc0.clone();
                    let pr = p.as_ptr();
                    // SAFETY: avx2() checked the CPU; the buffers hold 4 rows.
                    unsafe {
                        match nr {
                            1 => pv::<1>(&q4, pr, n, hv, &alpha, got.as_mut_ptr(), Ahead::NONE),
                            2 => pv::<2>(&q4, pr, n, hv, &alpha, got.as_mut_ptr(), Ahead::NONE),
                            3 => pv::<3>(&q4, pr, n, hv, &alpha, got.as_mut_ptr(), Ahead::NONE),
                            _ => pv::<4>(&q4, pr, n, hv, &alpha, got.as_mut_ptr(), Ahead::NONE),
                        }
                    };
                    for r in 0..rows {
                        let (a0, g) = (&acc0[r * hv..][..hv], &got[r * hv..][..hv]);
                        if r < nr {
                            check_pv(255.0, &q4, &pbuf, n, alpha[r], a0, g, r);
                        } else {
                            assert_eq!(a0, g, "row {r} is past the {nr} rows folded");
                        }
                    }
                }
            }
        }
    }

    /// The vector preparation gives what the portable one does: the same scaled query and constants (up to the
    /// order of a sum), and each int8 value within one step of round(qs / qsc).
    #[test]
    fn avx2_preparation_matches_portable() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let (hk, hv, rows) = (64usize, 64usize, 7usize);
        let (qb, q) = adversarial(hk, hv, rows, 11);
        let (mut pv, mut pp) = (QPrep::default(), QPrep::default());
        pv.ensure(rows, hk, hv, BT);
        pp.ensure(rows, hk, hv, BT);
        let row = |r: usize| &q[r * hk..][..hk];
        let a = pv.prepare::<BT>(&qb, hv, rows, super::super::qtile::Int8::Avx2, row);
        let b = pp.prepare::<BT>(&qb, hv, rows, super::super::qtile::Int8::Off, row);
        for (x, y) in a.qs.iter().zip(b.qs) {
            assert_eq!(x, y, "scaled query");
        }
        for (x, y) in a.qc.iter().zip(b.qc) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "qc {x} vs {y}");
        }
        assert_eq!(a.vmin, b.vmin);
        assert_eq!(a.vscale, b.vscale);
        for r in 0..rows {
            let st = a.qsc[r];
            let amax = b.qs[r * hk..][..hk]
                .iter()
                .fold(0.0f32, |m, x| m.max(x.abs()));
            assert_eq!(st, amax / 127.0);
            for (c, &v) in a.qi[r * hk..][..hk].iter().enumerate() {
                let want = b.qs[r * hk + c] / st;
                assert!(
                    (v as f32 - want).abs() <= 0.5 + 1e-3,
                    "row {r} ch {c}: {v} vs {want}"
                );
            }
        }
    }
}

/// Timing of the fold's pieces on one block in L1 (not a test: run it by name with `--ignored --nocapture`, pinned to
/// one CPU with `taskset -c 1` for steady figures). On a 2-core Zen 3: preparation about 110 ns, scores 165–190,
/// p·V 230–320 per block of 32 keys and 3 rows (SmolLM2's shapes), against about 600 per block inside the whole fold.
#[cfg(test)]
mod piece_timing {
    use super::super::qtile::{Int8, QPrep};
    use super::super::vnni::tests::adversarial;
    use super::*;

    #[test]
    #[ignore]
    fn avx2q_piece_timing() {
        if !super::tests::avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let (hk, hv, rows) = (64usize, 64usize, 3usize);
        let (qb, q) = adversarial(hk, hv, rows, 1);
        let mut prep = QPrep::default();
        prep.ensure(rows, hk, hv, BT);
        let iters = 200_000;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            let q4 = prep.prepare::<BT>(&qb, hv, rows, Int8::Avx2, |r| &q[r * hk..][..hk]);
            std::hint::black_box(q4.qc[0]);
        }
        let prep_ns = t.elapsed().as_nanos() as f64 / iters as f64;
        let q4 = prep.prepare::<BT>(&qb, hv, rows, Int8::Avx2, |r| &q[r * hk..][..hk]);
        let mut s = vec![0.0f32; 4 * BT];
        let t = std::time::Instant::now();
        for _ in 0..iters {
            // SAFETY: the CPU has AVX2, FMA and F16C; qi is filled for the 3 rows.
            unsafe { scores::<3>(&q4, &[0, 1, 2], &mut s, Ahead::NONE) };
            std::hint::black_box(&mut s);
        }
        let sc_ns = t.elapsed().as_nanos() as f64 / iters as f64;
        let p: Vec<f32> = (0..4 * BT)
            .map(|i| ((i * 37) % 101) as f32 / 101.0)
            .collect();
        let mut acc = vec![0.0f32; 4 * hv];
        let alpha = [0.5f32; 4];
        let t = std::time::Instant::now();
        for _ in 0..iters {
            // SAFETY: as above; p and acc hold 4 rows.
            unsafe {
                pv::<3>(
                    &q4,
                    p.as_ptr(),
                    BT,
                    hv,
                    &alpha,
                    acc.as_mut_ptr(),
                    Ahead::NONE,
                )
            };
            std::hint::black_box(&mut acc);
        }
        let pv_ns = t.elapsed().as_nanos() as f64 / iters as f64;
        eprintln!("per block of 32, 3 rows: prepare {prep_ns:.1} ns, scores {sc_ns:.1} ns, pv {pv_ns:.1} ns");
    }
}
