//! The two loops of an AVX2 f16 decode step for a chunk of 3 or 4 query rows (SmolLM2's 3-query groups; Qwen2.5's
//! 7 as 4 + 3; Gemma 3's 4), written in assembly. Both are one loop: per step i, each row's value b_r[i] broadcast
//! and multiplied into a strip of f16 vectors converted as they are loaded (scores: query values against a key
//! channel's strip of keys; p·V: probabilities against a value row's strip of channels).
//!
//! [`super::wide2`] keeps 3 rows × 4 vectors (32 keys or channels) of accumulators in registers, with the rows' 3
//! broadcast values and one converted key or value: all 16 ymm registers. LLVM schedules the next conversion before
//! the last multiply-add of the one before, needs a 17th register and spills an accumulator, so every iteration waits
//! on a store and a reload (`perf annotate`, 2-core Zen 3: the spilled chain took the most samples of the fold). With
//! 2 vectors per row instead, 6 chains of 4-cycle multiply-adds bound the loop at 1.5 per cycle. Here the registers
//! are named and the one key register is reused, so each loop runs 12 independent chains with no memory traffic but
//! its loads. 4 rows keep 2 vectors each (8 chains, 13 registers); their intrinsic loop spent as many instructions on
//! its indices, prefetch spans and selection test as on its 8 multiply-adds, here 12 instructions go around them. The
//! multiply-adds are the intrinsic loops', in their order: the same bits.

use std::arch::asm;
use std::arch::x86_64::*;

/// acc[r][w] += b_r[i] · x_i[w] for i < n and the 3 rows, where x_i is the strip of 4 × 8 f16 values at
/// `x + i · stride`; `pf`: one byte address asked for (`prefetcht1`: into the second-level cache, where
/// [`super::Ahead::span_l2`] asks too) with each step, `pfs` bytes apart.
///
/// # Safety
/// AVX2, FMA and F16C; each `b[r]` holds n f32 and each x_i 32 f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run3(
    b: [*const f32; 3],
    x: *const u8,
    stride: usize,
    n: usize,
    pf: *const u8,
    pfs: usize,
    acc: [[__m256; 4]; 3],
) -> [[__m256; 4]; 3] {
    let [[mut a0, mut a1, mut a2, mut a3], [mut a4, mut a5, mut a6, mut a7], [mut a8, mut a9, mut a10, mut a11]] =
        acc;
    if n > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{r0} + 4*{i}]",
            "vbroadcastss {b1}, dword ptr [{r1} + 4*{i}]",
            "vbroadcastss {b2}, dword ptr [{r2} + 4*{i}]",
            "prefetcht1 byte ptr [{pf}]",
            "vcvtph2ps {x}, xmmword ptr [{xp}]",
            "vfmadd231ps {a0}, {b0}, {x}",
            "vfmadd231ps {a4}, {b1}, {x}",
            "vfmadd231ps {a8}, {b2}, {x}",
            "vcvtph2ps {x}, xmmword ptr [{xp} + 16]",
            "vfmadd231ps {a1}, {b0}, {x}",
            "vfmadd231ps {a5}, {b1}, {x}",
            "vfmadd231ps {a9}, {b2}, {x}",
            "vcvtph2ps {x}, xmmword ptr [{xp} + 32]",
            "vfmadd231ps {a2}, {b0}, {x}",
            "vfmadd231ps {a6}, {b1}, {x}",
            "vfmadd231ps {a10}, {b2}, {x}",
            "vcvtph2ps {x}, xmmword ptr [{xp} + 48]",
            "vfmadd231ps {a3}, {b0}, {x}",
            "vfmadd231ps {a7}, {b1}, {x}",
            "vfmadd231ps {a11}, {b2}, {x}",
            "add {xp}, {xs}",
            "add {pf}, {pfs}",
            "inc {i}",
            "cmp {i}, {n}",
            "jb 2b",
            r0 = in(reg) b[0],
            r1 = in(reg) b[1],
            r2 = in(reg) b[2],
            i = inout(reg) 0usize => _,
            xp = inout(reg) x => _,
            pf = inout(reg) pf => _,
            xs = in(reg) stride,
            pfs = in(reg) pfs,
            n = in(reg) n,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            x = out(ymm_reg) _,
            a0 = inout(ymm_reg) a0,
            a1 = inout(ymm_reg) a1,
            a2 = inout(ymm_reg) a2,
            a3 = inout(ymm_reg) a3,
            a4 = inout(ymm_reg) a4,
            a5 = inout(ymm_reg) a5,
            a6 = inout(ymm_reg) a6,
            a7 = inout(ymm_reg) a7,
            a8 = inout(ymm_reg) a8,
            a9 = inout(ymm_reg) a9,
            a10 = inout(ymm_reg) a10,
            a11 = inout(ymm_reg) a11,
            options(readonly, nostack),
        );
    }
    [[a0, a1, a2, a3], [a4, a5, a6, a7], [a8, a9, a10, a11]]
}

/// [`run3`] for 4 rows and strips of 2 × 8 values.
///
/// # Safety
/// As [`run3`], with x_i 16 f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run4(
    b: [*const f32; 4],
    x: *const u8,
    stride: usize,
    n: usize,
    pf: *const u8,
    pfs: usize,
    acc: [[__m256; 2]; 4],
) -> [[__m256; 2]; 4] {
    let [[mut a0, mut a1], [mut a2, mut a3], [mut a4, mut a5], [mut a6, mut a7]] = acc;
    if n > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{r0} + 4*{i}]",
            "vbroadcastss {b1}, dword ptr [{r1} + 4*{i}]",
            "vbroadcastss {b2}, dword ptr [{r2} + 4*{i}]",
            "vbroadcastss {b3}, dword ptr [{r3} + 4*{i}]",
            "prefetcht1 byte ptr [{pf}]",
            "vcvtph2ps {x}, xmmword ptr [{xp}]",
            "vfmadd231ps {a0}, {b0}, {x}",
            "vfmadd231ps {a2}, {b1}, {x}",
            "vfmadd231ps {a4}, {b2}, {x}",
            "vfmadd231ps {a6}, {b3}, {x}",
            "vcvtph2ps {x}, xmmword ptr [{xp} + 16]",
            "vfmadd231ps {a1}, {b0}, {x}",
            "vfmadd231ps {a3}, {b1}, {x}",
            "vfmadd231ps {a5}, {b2}, {x}",
            "vfmadd231ps {a7}, {b3}, {x}",
            "add {xp}, {xs}",
            "add {pf}, {pfs}",
            "inc {i}",
            "cmp {i}, {n}",
            "jb 2b",
            r0 = in(reg) b[0],
            r1 = in(reg) b[1],
            r2 = in(reg) b[2],
            r3 = in(reg) b[3],
            i = inout(reg) 0usize => _,
            xp = inout(reg) x => _,
            pf = inout(reg) pf => _,
            xs = in(reg) stride,
            pfs = in(reg) pfs,
            n = in(reg) n,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            b3 = out(ymm_reg) _,
            x = out(ymm_reg) _,
            a0 = inout(ymm_reg) a0,
            a1 = inout(ymm_reg) a1,
            a2 = inout(ymm_reg) a2,
            a3 = inout(ymm_reg) a3,
            a4 = inout(ymm_reg) a4,
            a5 = inout(ymm_reg) a5,
            a6 = inout(ymm_reg) a6,
            a7 = inout(ymm_reg) a7,
            options(readonly, nostack),
        );
    }
    [[a0, a1], [a2, a3], [a4, a5], [a6, a7]]
}

/// s[r · bt + j] = q_r · k_j for the R ∈ {3, 4} rows `q` and the strip of 8 · W keys at `kt` (W = 4 for 3 rows, 2
/// for 4; `hs` channels `kstep` bytes apart); `pf`: one byte address asked for with each channel, `pfs` bytes apart.
///
/// # Safety
/// AVX2, FMA and F16C; `kt` holds hs channels of the strip's f16 keys at `kstep` bytes, each `q[r]` (r < R) hs f32,
/// `out` R rows of `bt` f32 from the strip's first key.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn scores<const R: usize>(
    kt: *const u8,
    kstep: usize,
    q: [*const f32; 4],
    hs: usize,
    pf: *const u8,
    pfs: usize,
    out: *mut f32,
    bt: usize,
) {
    let z = _mm256_setzero_ps();
    if R == 3 {
        let a = run3([q[0], q[1], q[2]], kt, kstep, hs, pf, pfs, [[z; 4]; 3]);
        store(&a, out, bt);
    } else {
        let a = run4(q, kt, kstep, hs, pf, pfs, [[z; 2]; 4]);
        store(&a, out, bt);
    }
}

/// acc_r[0..8W] ← alpha_r · acc_r[0..8W] + Σ_{j<n} p[r · bt + j] · v_j[0..8W] for the R ∈ {3, 4} rows (`acc` rows
/// `hv` apart; W = 4 for 3 rows, 2 for 4), over the value rows at `vb` (`vrow` bytes apart, 8 · W f16 channels from
/// the strip's first); `pf`: one byte address asked for with each value row, `pfs` bytes apart.
///
/// # Safety
/// AVX2, FMA and F16C; `p` holds R rows of `bt` ≥ n f32, `vb` n rows, `acc` R rows of 8 · W f32 `hv` apart.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn pv<const R: usize>(
    p: *const f32,
    bt: usize,
    vb: *const u8,
    vrow: usize,
    n: usize,
    pf: *const u8,
    pfs: usize,
    alpha: &[f32],
    acc: *mut f32,
    hv: usize,
) {
    assert!(alpha.len() >= R);
    let rows: [*const f32; 4] = std::array::from_fn(|r| p.wrapping_add(r.min(R - 1) * bt));
    if R == 3 {
        let a = run3(
            [rows[0], rows[1], rows[2]],
            vb,
            vrow,
            n,
            pf,
            pfs,
            load(acc, hv, alpha),
        );
        store(&a, acc, hv);
    } else {
        let a = run4(rows, vb, vrow, n, pf, pfs, load(acc, hv, alpha));
        store(&a, acc, hv);
    }
}

/// The accumulators of R rows of 8 · W f32 `stride` apart at `acc`, each row times its `alpha`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load<const R: usize, const W: usize>(
    acc: *const f32,
    stride: usize,
    alpha: &[f32],
) -> [[__m256; W]; R] {
    std::array::from_fn(|r| {
        let al = _mm256_set1_ps(alpha[r]);
        std::array::from_fn(|w| _mm256_mul_ps(_mm256_loadu_ps(acc.add(r * stride + 8 * w)), al))
    })
}

/// Stores R rows of W vectors, `stride` f32 apart, at `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store<const R: usize, const W: usize>(
    a: &[[__m256; W]; R],
    out: *mut f32,
    stride: usize,
) {
    for (r, row) in a.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * stride + 8 * w), *v);
        }
    }
}
