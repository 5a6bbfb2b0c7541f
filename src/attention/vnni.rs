//! Integer fold of a 4-bit KIVI block (32 keys): scores and p·V as integer dot products (AVX-512 VNNI), the codes
//! spread to the lanes they multiply with byte permutes (AVX-512 VBMI) instead of being widened to floats.
//!
//! Scores: a score is `qc + Σ_c qs[c] · code[c][j]` ([`super::qtile`]). Each row's `qs` is quantized once per block
//! to int8 (`qs ≈ s · qi`, [`quantize_row`]), as llama.cpp quantizes activations against quantized weights;
//! `vpdpbusd` sums 4 channels of unsigned codes times 4 signed int8 weights per 32-bit lane, lane = key. Four channels
//! of codes (4 × 16 bytes) are one 64-byte load; their low and high nibbles (even and odd keys) are permuted into
//! key-major order, so each load feeds 2 dot products per row. Integer sums are exact; the only error is the query's
//! rounding, at most `max|qs| / 254` per channel: |Δscore| ≤ hs · 15 · max|qs| / 254 at worst, and in rms about
//! √hs · 8.7 · max|qs| / 440 (hs = 64: 0.16 · max|qs|). KIVI-4's own key rounding, half a step per channel, moves a
//! score by √(Σ_c qs[c]²) / √12 in rms: 0.29 · max|qs| when one channel holds all of qs, 2.3 · max|qs| when every
//! channel is as large. Added in quadrature, the query's rounding raises the cache's own score noise by 0.2–14 %.
//! (An earlier version spent a second int8 pass on the residual, 254 times finer; it doubled the dot products and the
//! query's preparation, and attention over a 4-bit cache then ran slower than over f16 on a 2-core Xeon.)
//!
//! p·V: per row and value group, the value-scaled probabilities `pq` (≥ 0) are quantized to 16 bits
//! (`pq ≈ s · p`, s = max pq / 32 767); `vpdpwssd` sums 2 tokens of 16-bit codes times 16-bit weights per lane, lane =
//! channel. Two value rows (2 × 32 bytes of a group) are one load; their nibbles are permuted into channel-major
//! words, once for both 32-channel halves of the group. Error at most s / 2 per token, i.e. |Δ| ≤ n · 15 · s / 2 per
//! channel: 15 · n / 65 534 of the block's largest scaled probability.
//!
//! Used by [`super::wide::fold`] when [`available`] and the block holds 32 keys, the stored key channels are a
//! multiple of 4 (scores) and the value head dim a multiple of 64 (p·V); otherwise the float steps run.

use std::arch::x86_64::*;

use super::qtile::Q4;
use super::Ahead;

const BT: usize = 32;

/// Whether this CPU runs the integer fold: AVX-512 F/BW/VL with VNNI and VBMI.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vbmi")
}

/// Byte b of the key-major vector (lane = key, 4 channels) takes byte `16 · (b mod 4) + b / 4` of the 4 channels'
/// nibbles (channel k's 16 keys at bytes 16k..16k+16).
const KEY_IDX: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut b = 0;
    while b < 64 {
        a[b] = (16 * (b % 4) + b / 4) as u8;
        b += 1;
    }
    a
};

/// Word-major value permutes: lane i (16-bit words 2i, 2i+1) takes channel nibble byte `i + 16h` of token j (bytes
/// 0..32) and of token j + 1 (bytes 32..64); h = 0 for the first 16 lanes' strip, 1 for the second. Odd bytes are
/// zeroed by the mask.
const fn val_idx(h: usize) -> [u8; 64] {
    let mut a = [0u8; 64];
    let mut i = 0;
    while i < 16 {
        a[4 * i] = (i + 16 * h) as u8;
        a[4 * i + 2] = (32 + i + 16 * h) as u8;
        i += 1;
    }
    a
}
const VAL_IDX0: [u8; 64] = val_idx(0);
const VAL_IDX1: [u8; 64] = val_idx(1);

/// `acc + Σ` of each lane's two 16-bit products (`vpdpwssd`), kept one instruction. Through the intrinsic, LLVM's
/// generic x86 tuning rewrote about half of them into `vpmaddwd` + `vpaddd` (one more micro-op each, on the ports
/// the p·V loop is short of), as `perf annotate` of [`pv_run`] showed.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// Bytes of `t` picked by `idx` into the even bytes, odd bytes zero (`vpermb` under a zeroing mask), kept one
/// instruction: through the intrinsic LLVM emitted a `vpermb` and a `vpandq` with a constant.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn permute_even(idx: __m512i, t: __m512i) -> __m512i {
    let out: __m512i;
    std::arch::asm!(
        "vpermb {out} {{{k}}}{{z}}, {idx}, {t}",
        out = out(zmm_reg) out,
        k = in(kreg) EVEN_BYTES,
        idx = in(zmm_reg) idx,
        t = in(zmm_reg) t,
        options(pure, nomem, nostack, preserves_flags),
    );
    out
}

/// The even bytes of a 64-byte vector (the low byte of each 16-bit word).
const EVEN_BYTES: u64 = 0x5555_5555_5555_5555;

/// Interleaves [even 0..16 | odd 0..16] lane results back to order: first 16 (LO) and second 16 (HI).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn interleave(e: __m512, o: __m512) -> [__m512; 2] {
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [
        _mm512_permutex2var_ps(e, lo, o),
        _mm512_permutex2var_ps(e, hi, o),
    ]
}

/// c + s · a, the integer sums as floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn scaled(a: __m512i, s: __m512, c: __m512) -> __m512 {
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, c)
}

/// s[i · stride + j] = qc[r_i] + qsc[r_i] · Σ_c qi[r_i][c] · code[c][j] for the rows `rows` (R ≤ 8), j < 32.
///
/// # Safety
/// The CPU must support what [`available`] checks (and AVX2, FMA, F16C).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn scores<const R: usize>(
    q4: &Q4,
    rows: &[usize; R],
    s: &mut [f32],
    stride: usize,
    ahead: Ahead,
) {
    let hs = q4.hs;
    assert!(
        q4.bits == 4 && R <= 8 && hs.is_multiple_of(4) && stride >= BT && q4.k.len() >= hs * BT / 2
    );
    assert!(s.len() >= (R - 1) * stride + BT);
    assert!(rows
        .iter()
        .all(|&r| r < q4.qc.len() && r < q4.qsc.len() && (r + 1) * hs <= q4.qi.len()));
    let idx = _mm512_loadu_si512(KEY_IDX.as_ptr() as *const _);
    let mask = _mm512_set1_epi8(15);
    // Per row: [even keys, odd keys].
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    let (base, qi) = (q4.k.as_ptr(), q4.qi.as_ptr());
    for c4 in 0..hs / 4 {
        // One line of the next block's key codes per 64 bytes of this block's (a 2-bit block's are half as many).
        ahead.span_l2(64 * c4, 64);
        let x = _mm512_loadu_si512(base.add(64 * c4) as *const _);
        let lo = _mm512_and_si512(x, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
        let e = _mm512_permutexvar_epi8(idx, lo);
        let o = _mm512_permutexvar_epi8(idx, hi);
        for (ar, &r) in acc.iter_mut().zip(rows) {
            let q = qi.add(r * hs + 4 * c4);
            let b = _mm512_set1_epi32((q as *const i32).read_unaligned());
            ar[0] = _mm512_dpbusd_epi32(ar[0], e, b);
            ar[1] = _mm512_dpbusd_epi32(ar[1], o, b);
        }
    }
    let out = s.as_mut_ptr();
    for (i, (ar, &r)) in acc.iter().zip(rows).enumerate() {
        let qc = _mm512_set1_ps(*q4.qc.get_unchecked(r));
        let st = _mm512_set1_ps(*q4.qsc.get_unchecked(r));
        let [a, b] = interleave(scaled(ar[0], st, qc), scaled(ar[1], st, qc));
        _mm512_storeu_ps(out.add(i * stride), a);
        _mm512_storeu_ps(out.add(i * stride + 16), b);
    }
}

/// Quantizes `x` to signed int8, `x ≈ s · out` with s = max|x| / 127 and out = round(x / s), and returns s; all zero
/// when x is (or holds a non-finite value). Error per element at most s / 2 = max|x| / 254.
///
/// # Safety
/// The CPU must support what [`available`] checks; `out` holds x.len().
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    let n = x.len();
    assert!(out.len() >= n);
    let mut mx = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let v = _mm512_maskz_loadu_ps(tail_mask(n - i), x.as_ptr().add(i));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        i += 16;
    }
    quantize_scaled(x, _mm512_reduce_max_ps(mx), out)
}

/// [`quantize_row`] given amax = max|x|.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn quantize_scaled(x: &[f32], amax: f32, out: &mut [i8]) -> f32 {
    let n = x.len();
    assert!(out.len() >= n);
    if !(amax > 0.0 && amax.is_finite()) {
        out[..n].fill(0);
        return 0.0;
    }
    quantize_with(x.as_ptr(), n, 127.0 / amax, out.as_mut_ptr());
    amax / 127.0
}

/// out[i] = round(x[i] · inv) as int8 for the n values at `x`, inv = 127 / max|x| (|x · inv| ≤ 127 up to rounding;
/// the narrowing saturates): the one quantizing loop of [`quantize_scaled`] and [`fold_queries`].
///
/// # Safety
/// The CPU must support what [`available`] checks; `x` and `out` hold n values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn quantize_with(x: *const f32, n: usize, inv: f32, out: *mut i8) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let iv = _mm512_set1_ps(inv);
    let mut i = 0;
    while i < n {
        let k = tail_mask(n - i);
        let v = _mm512_maskz_loadu_ps(k, x.add(i));
        let q = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v, iv));
        _mm_mask_storeu_epi8(out.add(i), k, _mm512_cvtsepi32_epi8(q));
        i += 16;
    }
}

/// Each query row's constants for a block's integer scores: row r's `qs` (`qs[r · hs..][..hs]`) = q_r ∘ key scale,
/// quantized into `qi[r · hs..][..hs]` as [`quantize_row`] does, `qc[r]` = q_r · key min and `qsc[r]` the step of its
/// `qi`. `k_ms` is the block's per-channel (min, scale) pairs in f16, hs of them; `row_q(r)` is row r's query over hs
/// channels, hs a multiple of 16. Rows go four at a time, so their reductions and divisions overlap instead of
/// waiting on one another, and each 16 channels' pairs are widened once for the four (straight from the block: no
/// f32 copy of the minima and scales is written and read back).
///
/// # Safety
/// The CPU must support what [`available`] checks; `k_ms` holds 2 · hs, `qs` and `qi` rows · hs, `qc` and `qsc`
/// rows.
#[allow(clippy::too_many_arguments)] // one block's inputs and the four outputs
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn fold_queries<'q>(
    k_ms: &[half::f16],
    hs: usize,
    rows: usize,
    row_q: impl Fn(usize) -> &'q [f32],
    qs: &mut [f32],
    qi: &mut [i8],
    qc: &mut [f32],
    qsc: &mut [f32],
) {
    assert!(hs.is_multiple_of(16) && k_ms.len() >= 2 * hs);
    assert!(
        qs.len() >= rows * hs && qi.len() >= rows * hs && qc.len() >= rows && qsc.len() >= rows
    );
    let mut r0 = 0;
    while r0 < rows {
        let k = (rows - r0).min(4);
        let (qs, qi) = (&mut qs[r0 * hs..], &mut qi[r0 * hs..]);
        let (qc, qsc) = (&mut qc[r0..], &mut qsc[r0..]);
        let row = |i: usize| row_q(r0 + i);
        match k {
            1 => fold_rows::<1>(k_ms, hs, row, qs, qi, qc, qsc),
            2 => fold_rows::<2>(k_ms, hs, row, qs, qi, qc, qsc),
            3 => fold_rows::<3>(k_ms, hs, row, qs, qi, qc, qsc),
            _ => fold_rows::<4>(k_ms, hs, row, qs, qi, qc, qsc),
        }
        r0 += k;
    }
}

/// [`fold_queries`] for K ≤ 4 rows at once, their accumulators in registers (with the row count known at compile
/// time, none of them is indexed at run time, so none goes to the stack).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn fold_rows<'q, const K: usize>(
    k_ms: &[half::f16],
    hs: usize,
    row_q: impl Fn(usize) -> &'q [f32],
    qs: &mut [f32],
    qi: &mut [i8],
    qc: &mut [f32],
    qsc: &mut [f32],
) {
    assert!(qs.len() >= K * hs && qi.len() >= K * hs && qc.len() >= K && qsc.len() >= K);
    let (mut mx, mut c) = ([_mm512_setzero_ps(); K], [_mm512_setzero_ps(); K]);
    let q: [&[f32]; K] = std::array::from_fn(&row_q);
    assert!(q.iter().all(|q| q.len() >= hs));
    for ch in (0..hs).step_by(16) {
        let [kmin, kscale] = pairs16(k_ms.as_ptr().add(2 * ch));
        for i in 0..K {
            let qv = _mm512_loadu_ps(q[i].as_ptr().add(ch));
            let x = _mm512_mul_ps(qv, kscale);
            _mm512_storeu_ps(qs.as_mut_ptr().add(i * hs + ch), x);
            c[i] = _mm512_fmadd_ps(qv, kmin, c[i]);
            mx[i] = _mm512_max_ps(mx[i], _mm512_abs_ps(x));
        }
    }
    let mut inv = [0.0f32; K];
    for i in 0..K {
        let amax = _mm512_reduce_max_ps(mx[i]);
        qc[i] = _mm512_reduce_add_ps(c[i]);
        // All zero when the row is (or holds a non-finite value).
        let ok = amax > 0.0 && amax.is_finite();
        qsc[i] = if ok { amax / 127.0 } else { 0.0 };
        inv[i] = if ok { 127.0 / amax } else { 0.0 };
    }
    for (i, &inv) in inv.iter().enumerate() {
        let (src, dst) = (qs.as_ptr().add(i * hs), qi.as_mut_ptr().add(i * hs));
        if inv == 0.0 {
            std::ptr::write_bytes(dst, 0, hs);
            continue;
        }
        quantize_with(src, hs, inv, dst);
    }
}

/// 16 interleaved (a, b) f16 pairs at `p` as [a's, b's] in f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn pairs16(p: *const half::f16) -> [__m512; 2] {
    let h = _mm512_loadu_si512(p as *const _);
    let x = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    let y = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h));
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    [
        _mm512_permutex2var_ps(x, even, y),
        _mm512_permutex2var_ps(x, odd, y),
    ]
}

/// Splits interleaved (a, b) f16 pairs (`src`, 2 · n, n a multiple of 16) into `a` and `b` as f32.
///
/// # Safety
/// The CPU must support what [`available`] checks; `a` and `b` hold n each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn split_pairs(src: &[half::f16], a: &mut [f32], b: &mut [f32]) {
    let n = src.len() / 2;
    assert!(n.is_multiple_of(16) && a.len() >= n && b.len() >= n);
    for i in (0..n).step_by(16) {
        let [x, y] = pairs16(src.as_ptr().add(2 * i));
        _mm512_storeu_ps(a.as_mut_ptr().add(i), x);
        _mm512_storeu_ps(b.as_mut_ptr().add(i), y);
    }
}

/// The lanes of a 16-lane step that hold one of the `left` remaining elements.
#[inline(always)]
fn tail_mask(left: usize) -> __mmask16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
    }
}

/// `x` (n ≤ 32 values ≥ 0, the rest read as 0) as 16-bit integers, `x ≈ s · p[j]`: s = max x / 32 767,
/// p[j] = round(x / s). Returns s, 0 when every value is 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
unsafe fn quantize_probs(x: *const f32, n: usize, p: &mut [i16; BT]) -> f32 {
    let xs = [
        _mm512_maskz_loadu_ps(tail_mask(n), x),
        _mm512_maskz_loadu_ps(tail_mask(n.saturating_sub(16)), x.add(16)),
    ];
    let mx = _mm512_reduce_max_ps(_mm512_max_ps(xs[0], xs[1]));
    if !(mx > 0.0 && mx.is_finite()) {
        *p = [0; BT];
        return 0.0;
    }
    let (s, inv) = (mx / 32767.0, _mm512_set1_ps(32767.0 / mx));
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let out = p.as_mut_ptr() as *mut __m256i;
    for (h, &v) in xs.iter().enumerate() {
        let q = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v, inv));
        _mm256_storeu_si256(out.add(h), _mm512_cvtsepi32_epi16(q));
    }
    s
}

/// acc_i ← alpha_i · acc_i + pc_i[g] + Σ_{j<n} pq_i[g · 32 + j] · code_j for R ≤ 4 rows (`acc` row stride hv; `pq`
/// rows `ng · 32` apart and `pc` rows `ng` apart, [`super::qtile::scale_probs`]'s layout), one value group (64
/// channels) at a time.
///
/// # Safety
/// The CPU must support what [`available`] checks (and AVX2, FMA, F16C); `pq`, `pc` and `acc` hold R rows as laid out
/// above; hv is a multiple of 64.
#[allow(clippy::too_many_arguments)] // the float step's arguments
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub(super) unsafe fn pv<const R: usize>(
    q4: &Q4,
    pq: *const f32,
    pc: *const f32,
    n: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
) {
    let (ng, rb) = (q4.ng, q4.rb);
    assert!(R <= 4 && n <= BT && hv.is_multiple_of(64) && ng * 64 == hv && rb * 2 == hv);
    assert!(q4.v.len() >= BT * rb && alpha.len() >= R);
    let idx = [
        _mm512_loadu_si512(VAL_IDX0.as_ptr() as *const _),
        _mm512_loadu_si512(VAL_IDX1.as_ptr() as *const _),
    ];
    let mask = _mm512_set1_epi8(15);
    for g in 0..ng {
        // Per row: the weights as 16-bit integers, and their step.
        let mut p16 = [[0i16; BT]; R];
        let mut step = [0.0f32; R];
        for (r, (pr, st)) in p16.iter_mut().zip(&mut step).enumerate() {
            *st = quantize_probs(pq.add(r * ng * BT + g * BT), n, pr);
        }
        let vb = q4.v.as_ptr().add(32 * g);
        // Per row: [half 0 even channels, half 0 odd, half 1 even, half 1 odd] (half h: channels 32h..32h + 32).
        let mut ia = [[_mm512_setzero_si512(); 4]; R];
        let mut j = 0;
        while j < n {
            // Tokens j and j + 1 (j + 1 < 32 always: n ≤ 32 and j is even; a token at n carries weight 0).
            let a = _mm256_loadu_si256(vb.add(j * rb) as *const __m256i);
            let b = _mm256_loadu_si256(vb.add((j + 1) * rb) as *const __m256i);
            let x = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
            let lo = _mm512_and_si512(x, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
            let w = [
                permute_even(idx[0], lo),
                permute_even(idx[0], hi),
                permute_even(idx[1], lo),
                permute_even(idx[1], hi),
            ];
            for (ar, pr) in ia.iter_mut().zip(&p16) {
                let p = _mm512_set1_epi32((pr.as_ptr().add(j) as *const i32).read_unaligned());
                for (a, &w) in ar.iter_mut().zip(&w) {
                    *a = dpwssd(*a, p, w);
                }
            }
            j += 2;
        }
        for (r, ar) in ia.iter().enumerate() {
            let al = _mm512_set1_ps(alpha[r]);
            let cst = _mm512_set1_ps(*pc.add(r * ng + g));
            let (st, zero) = (_mm512_set1_ps(step[r]), _mm512_setzero_ps());
            for h in 0..2 {
                let ev = scaled(ar[2 * h], st, zero);
                let od = scaled(ar[2 * h + 1], st, zero);
                let row = acc.add(r * hv + 64 * g + 32 * h);
                for (k, c) in interleave(ev, od).into_iter().enumerate() {
                    let old = _mm512_loadu_ps(row.add(16 * k));
                    _mm512_storeu_ps(
                        row.add(16 * k),
                        _mm512_add_ps(_mm512_fmadd_ps(old, al, cst), c),
                    );
                }
            }
        }
    }
}

/// Blocks one [`pv_run`] may take: its 32-bit sums of 16-bit weights (≤ 32 767) times codes (≤ 15) stay below 2³¹
/// up to 4 369 tokens.
pub(super) const MAX_RUN: usize = 8;

/// p·V of R ≤ 4 rows over NB ≤ [`MAX_RUN`] consecutive full blocks: acc_i ← alpha_i · acc_i + Σ_b Σ_j p_i[b · 32 + j]
/// · v_b[j], with v_b[j] = vmin_b[j] + vscale_b[j] · code_b[j] per value group. Row i's probabilities are the NB · 32
/// f32 at `p + i · pstride` (block b's at b · 32), its output the hv f32 at `acc + i · hv`.
///
/// Per row and value group the run's probabilities are scaled by their tokens' value scales and quantized to 16 bits
/// against one step, the run's largest scaled probability / 32 767, so the integer sums run across all NB blocks and
/// the float epilogue comes once per run. Error at most step / 2 per token: |Δ| ≤ 15 · NB · 32 / 65 534 of the run's
/// largest scaled probability per channel (a quantized value's own rounding is up to half its scale, 2 185 times
/// more for the token that holds that probability).
///
/// # Safety
/// The CPU must support what [`available`] checks (and AVX2, FMA, F16C); every block holds 32 tokens and was
/// prepared with `int8` for the same hv, a multiple of 64 with `rb · 2 == hv`; `p` and `acc` hold R rows as laid out
/// above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the run, its rows' state and what to prefetch
pub(super) unsafe fn pv_run<const R: usize, const NB: usize>(
    q4s: &[Q4; NB],
    p: *const f32,
    pstride: usize,
    hv: usize,
    alpha: &[f32],
    acc: *mut f32,
    ahead: &[Ahead],
) {
    assert!(R <= 4 && NB <= MAX_RUN && pstride >= NB * BT && alpha.len() >= R);
    assert!(ahead.len() >= NB);
    assert!(hv.is_multiple_of(64));
    let ng = hv / 64;
    for q4 in q4s {
        assert!(q4.ng == ng && q4.rb * 2 == hv && q4.v.len() >= BT * q4.rb);
        assert!(q4.vmin.len() >= ng * BT && q4.vscale.len() >= ng * BT);
    }
    let idx = [
        _mm512_loadu_si512(VAL_IDX0.as_ptr() as *const _),
        _mm512_loadu_si512(VAL_IDX1.as_ptr() as *const _),
    ];
    let mask = _mm512_set1_epi8(15);
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for g in 0..ng {
        // Per row: the run's scaled probabilities as 16-bit integers, their step, and Σ p · vmin.
        // Written below for the run's NB · 32 tokens only (zeros for a row of zero weights): zeroing all of it for
        // every value group was a `memset` of 512 bytes per row (one 8K `kivi4` layer from the L3, one thread,
        // `batched_decode_timing`: 0.215 → 0.208 ms without it).
        let mut p16 = [[std::mem::MaybeUninit::<i16>::uninit(); MAX_RUN * BT]; R];
        let (mut step, mut pc) = ([0.0f32; R], [0.0f32; R]);
        for r in 0..R {
            let pr = p.add(r * pstride);
            let mut pq = [_mm512_setzero_ps(); 2 * MAX_RUN];
            let (mut mx, mut c) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (b, q4) in q4s.iter().enumerate() {
                for h in 0..2 {
                    let x = _mm512_loadu_ps(pr.add(b * BT + 16 * h));
                    let at = g * BT + 16 * h;
                    let y = _mm512_mul_ps(x, _mm512_loadu_ps(q4.vscale.as_ptr().add(at)));
                    c = _mm512_fmadd_ps(x, _mm512_loadu_ps(q4.vmin.as_ptr().add(at)), c);
                    mx = _mm512_max_ps(mx, y);
                    pq[2 * b + h] = y;
                }
            }
            pc[r] = _mm512_reduce_add_ps(c);
            let top = _mm512_reduce_max_ps(mx);
            if !(top > 0.0 && top.is_finite()) {
                // Weights 0: the row's p16 is 0.
                let out = p16[r].as_mut_ptr() as *mut __m256i;
                for k in 0..2 * NB {
                    _mm256_storeu_si256(out.add(k), _mm256_setzero_si256());
                }
                continue;
            }
            step[r] = top / 32767.0;
            let inv = _mm512_set1_ps(32767.0 / top);
            let out = p16[r].as_mut_ptr() as *mut __m256i;
            for (k, &y) in pq.iter().enumerate().take(2 * NB) {
                let q = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(y, inv));
                _mm256_storeu_si256(out.add(k), _mm512_cvtsepi32_epi16(q));
            }
        }
        // Per row: [half 0 even channels, half 0 odd, half 1 even, half 1 odd], summed over the whole run.
        let mut ia = [[_mm512_setzero_si512(); 4]; R];
        for (b, q4) in q4s.iter().enumerate() {
            let (vb, rb) = (q4.v.as_ptr().add(32 * g), q4.rb);
            for j in (0..BT).step_by(2) {
                // One line of the next run's block b's value codes per token pair: 16 lines per value group, the
                // block's 16 · hv bytes over the ng groups.
                ahead[b].span_l2(64 * (16 * g + j / 2), 64);
                let a = _mm256_loadu_si256(vb.add(j * rb) as *const __m256i);
                let x = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(a),
                    _mm256_loadu_si256(vb.add((j + 1) * rb) as *const __m256i),
                );
                let lo = _mm512_and_si512(x, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
                let w = [
                    permute_even(idx[0], lo),
                    permute_even(idx[0], hi),
                    permute_even(idx[1], lo),
                    permute_even(idx[1], hi),
                ];
                for (ar, pr) in ia.iter_mut().zip(&p16) {
                    let p = _mm512_set1_epi32(
                        (pr.as_ptr().add(b * BT + j) as *const i32).read_unaligned(),
                    );
                    for (a, &w) in ar.iter_mut().zip(&w) {
                        *a = dpwssd(*a, p, w);
                    }
                }
            }
        }
        for (r, ar) in ia.iter().enumerate() {
            let al = _mm512_set1_ps(alpha[r]);
            let cst = _mm512_set1_ps(pc[r]);
            let (st, zero) = (_mm512_set1_ps(step[r]), _mm512_setzero_ps());
            for h in 0..2 {
                let ev = scaled(ar[2 * h], st, zero);
                let od = scaled(ar[2 * h + 1], st, zero);
                let row = acc.add(r * hv + 64 * g + 32 * h);
                for (k, c) in interleave(ev, od).into_iter().enumerate() {
                    let old = _mm512_loadu_ps(row.add(16 * k));
                    _mm512_storeu_ps(
                        row.add(16 * k),
                        _mm512_add_ps(_mm512_fmadd_ps(old, al, cst), c),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::qtile::{self, QPrep};
    use super::*;
    use crate::kv::quant::QBlock;
    use crate::testutil::Rng;

    /// A 4-bit block with outlier key channels (large offsets and ranges) and value rows of very different scales,
    /// and queries with large magnitudes and a few dominant channels.
    pub(in crate::attention) fn adversarial(
        hk: usize,
        hv: usize,
        rows: usize,
        seed: u64,
    ) -> (QBlock, Vec<f32>) {
        let mut rng = Rng::seeded(seed);
        let mut kt = rng.vec(hk * BT, 1.0);
        for c in 0..hk {
            let (off, spread) = match c % 16 {
                3 => (40.0, 25.0),
                7 => (-15.0, 0.01),
                _ => (0.5 * (c as f32 % 5.0), 1.0),
            };
            for x in &mut kt[c * BT..][..BT] {
                *x = off + spread * *x;
            }
        }
        let mut v = rng.vec(BT * hv, 1.0);
        for (j, row) in v.chunks_exact_mut(hv).enumerate() {
            let sc = [0.001f32, 1.0, 30.0, 4.0][j % 4];
            row.iter_mut().for_each(|x| *x = *x * sc + 2.0);
        }
        let mut qb = QBlock::new(4, hk, hv, BT);
        qb.encode(&kt, &v, BT);
        let mut q = rng.vec(rows * hk, 30.0);
        for r in 0..rows {
            q[r * hk + 5] = 900.0 * (r as f32 - 1.0);
            q[r * hk + 3] *= 20.0;
        }
        (qb, q)
    }

    /// Asserts that `s`, the integer scores of row `r` (query `q[r · hk..]`, scaled query `qs[r · hk..]`) against the
    /// block's 32 keys, lie within the stated bound of f64 scores over the dequantized keys: hk · 15 · max|qs| / 254,
    /// plus f32 slack. Returns the worst error as a share of the bound.
    pub(in crate::attention) fn check_scores(
        qb: &QBlock,
        q: &[f32],
        qs: &[f32],
        hk: usize,
        r: usize,
        s: &[f32],
    ) -> f32 {
        let qr = &q[r * hk..][..hk];
        let amax = qs[r * hk..][..hk]
            .iter()
            .fold(0.0f32, |m, x| m.max(x.abs()));
        let mut key = vec![0.0f32; hk];
        let mut worst = 0.0f32;
        for (j, &got) in s[..BT].iter().enumerate() {
            qb.key(j, BT, &mut key);
            let want: f64 = qr
                .iter()
                .zip(&key)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let mag: f64 = qr
                .iter()
                .zip(&key)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let bound = hk as f32 * 15.0 * amax / 254.0 + 1e-5 * mag as f32;
            let err = (got - want as f32).abs();
            assert!(
                err <= bound,
                "hk {hk} row {r} key {j}: |{got} - {want}| = {err} > {bound}"
            );
            worst = worst.max(err / bound);
        }
        worst
    }

    /// Integer scores stay within the stated bound of f32 scores over the dequantized keys.
    #[test]
    fn integer_scores_bound_their_error_against_f32() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI/VBMI on this CPU");
            return;
        }
        for (hk, seed) in [(64usize, 1u64), (40, 2), (128, 3)] {
            let (hv, rows) = (64, 3);
            let (qb, q) = adversarial(hk, hv, rows, seed);
            let mut prep = QPrep::default();
            prep.ensure(rows, hk, hv, BT);
            let q4 = prep.prepare::<BT>(&qb, hv, rows, qtile::Int8::Vnni, |r| &q[r * hk..][..hk]);
            assert_eq!(q4.qi.len(), rows * hk);
            let mut s = vec![0.0f32; 4 * BT];
            // SAFETY: available() checked the CPU.
            unsafe { scores::<3>(&q4, &[0, 1, 2], &mut s, BT, Ahead::NONE) };
            let worst = (0..rows)
                .map(|r| check_scores(&qb, &q, q4.qs, hk, r, &s[r * BT..][..BT]))
                .fold(0.0f32, f32::max);
            eprintln!("hk {hk}: worst error {worst:.3} of the bound");
        }
    }

    /// Asserts that `got`, row r's integer p·V over the first n tokens (from `acc0` with `alpha`; `pbuf` laid out by
    /// [`qtile::scale_probs`]), lies within the stated bound of the float step: n · 15 · s / 2 per channel, s = the
    /// group's largest scaled probability / `levels` (32 767 for 16-bit probabilities, 255 for bytes), plus f32
    /// slack.
    #[allow(clippy::too_many_arguments)] // the step's inputs, its result and the rounding's levels
    pub(in crate::attention) fn check_pv(
        levels: f32,
        q4: &Q4,
        pbuf: &[f32],
        n: usize,
        alpha: f32,
        acc0: &[f32],
        got: &[f32],
        r: usize,
    ) {
        let (hv, ng) = (acc0.len(), q4.ng);
        let pc_at = qtile::pc_offset::<BT>(ng);
        let mut want = acc0.to_vec();
        let pq = &pbuf[r * ng * BT..][..ng * BT];
        qtile::pv_row::<BT>(q4, pq, &pbuf[pc_at + r * ng..], n, alpha, &mut want);
        for (d, (&a, &b)) in got[..hv].iter().zip(&want).enumerate() {
            let g = d / 64;
            let pmax = pq[g * BT..][..n].iter().fold(0.0f32, |m, &x| m.max(x));
            // f32 slack: the float step's own rounding over terms up to 15 · pmax each, the constant and acc.
            let pc = pbuf[pc_at + r * ng + g].abs();
            let slack = 1e-5 * (b.abs() + 15.0 * n as f32 * pmax + pc + 5.0);
            let bound = n as f32 * 7.5 * pmax / levels + slack;
            assert!(
                (a - b).abs() <= bound,
                "hv {hv} n {n} row {r} ch {d}: |{a} - {b}| > {bound}"
            );
        }
    }

    /// Integer p·V stays within the stated bound of the float step, over full and partly masked blocks.
    #[test]
    fn integer_pv_bounds_its_error_against_f32() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI/VBMI on this CPU");
            return;
        }
        let (hk, hv, rows) = (64usize, 128usize, 3usize);
        let (qb, q) = adversarial(hk, hv, rows, 9);
        let mut prep = QPrep::default();
        prep.ensure(rows, hk, hv, BT);
        let q4 = prep.prepare::<BT>(&qb, hv, rows, qtile::Int8::Vnni, |r| &q[r * hk..][..hk]);
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
            let alpha = [0.25f32, 1.0, 0.0];
            let mut got = acc0.clone();
            let pc_at = qtile::pc_offset::<BT>(q4.ng);
            // SAFETY: available() checked the CPU; the buffers hold 3 rows.
            unsafe {
                pv::<3>(
                    &q4,
                    pbuf.as_ptr(),
                    pbuf[pc_at..].as_ptr(),
                    n,
                    hv,
                    &alpha,
                    got.as_mut_ptr(),
                )
            };
            for r in 0..rows {
                check_pv(
                    32_767.0,
                    &q4,
                    &pbuf,
                    n,
                    alpha[r],
                    &acc0[r * hv..][..hv],
                    &got[r * hv..][..hv],
                    r,
                );
            }
        }
    }

    /// Decode attention time at 8K (SmolLM2's shapes: 9 query heads on 3 KV heads, head dim 64, blocks of 32): f16
    /// against 4-bit blocks, the best of many calls each. With `HAYLOFT_HARNESS_LAYERS=30` each timed step calls
    /// every one of 30 layers, so the cache (190 MB in f16) comes from memory as in a real decode, not from the CPU's
    /// caches. `cargo test --release --lib attention_decode_8k -- --ignored --nocapture`; `HAYLOFT_HARNESS_DTYPE=q4`
    /// (f16, q2, q8) times one format alone, `HAYLOFT_HARNESS_LEN` another context, `HAYLOFT_HARNESS_REPS` the number
    /// of timed steps (the best is printed).
    #[test]
    #[ignore = "timing, run by hand"]
    fn attention_decode_8k() {
        use super::super::{attend, AttnParams, AttnScratch};
        use crate::kv::{KvCache, KvConfig, KvDtype};
        // HAYLOFT_HARNESS_LEN: another context length (default 8192).
        let len = std::env::var("HAYLOFT_HARNESS_LEN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192usize);
        let (n_q, n_kv, hd) = (9usize, 3usize, 64usize);
        let mut rng = Rng::seeded(8);
        let k = rng.vec(len * n_kv * hd, 1.0);
        let v = rng.vec(len * n_kv * hd, 1.0);
        let q = rng.vec(n_q * hd, 2.0);
        let pos: Vec<u32> = (0..len as u32).collect();
        let p = AttnParams {
            n_q_heads: n_q,
            scale: 0.125,
            window: None,
            softcap: None,
        };
        let layers: usize = std::env::var("HAYLOFT_HARNESS_LAYERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let mut best = Vec::new();
        for dtype in [
            KvDtype::F16,
            KvDtype::Kivi {
                bits: 4,
                residual: 128,
            },
            KvDtype::Kivi {
                bits: 2,
                residual: 128,
            },
            KvDtype::Kivi {
                bits: 8,
                residual: 128,
            },
        ]
        .into_iter()
        .filter(|d| {
            // One format alone (HAYLOFT_HARNESS_DTYPE), e.g. for a profiler.
            std::env::var("HAYLOFT_HARNESS_DTYPE").map_or(true, |w| w == d.label())
        }) {
            let mut cache = KvCache::new(KvConfig {
                n_layers: layers,
                n_kv_heads: n_kv,
                head_dim_k: hd,
                head_dim_v: hd,
                block_tokens: 32,
                dtype,
                windows: Vec::new(),
            });
            for layer in 0..layers {
                cache.append(layer, &pos, &k, &v);
            }
            let (mut out, mut scratch) = (vec![0.0; n_q * hd], AttnScratch::default());
            let mut ts = Vec::new();
            // HAYLOFT_HARNESS_REPS: more timed steps, so a profiler sees the attention more than the cache's setup.
            let reps = std::env::var("HAYLOFT_HARNESS_REPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or((300 / layers).max(40));
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                for layer in 0..layers {
                    attend(
                        &cache,
                        layer,
                        &q,
                        &[len as u32 - 1],
                        &mut out,
                        &p,
                        &mut scratch,
                    );
                }
                ts.push(t0.elapsed().as_secs_f64() / layers as f64);
            }
            ts.sort_by(f64::total_cmp);
            let (t, med) = (ts[0], ts[ts.len() / 2]);
            eprintln!(
                "{dtype:?}: {:.1} µs per layer call, median {:.1} (30 layers: {:.2} ms per token)",
                t * 1e6,
                med * 1e6,
                t * 30e3
            );
            best.push(t);
        }
        if best.len() >= 2 {
            eprintln!("f16 / kivi4 attention time: {:.2}x", best[0] / best[1]);
        }
        assert!(best.iter().all(|t| t.is_finite()));
    }
}
