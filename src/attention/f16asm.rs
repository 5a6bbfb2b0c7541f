//! The two loops of an AVX2 f16 decode step for a chunk of 3 or 4 query rows (SmolLM2's 3-query groups; Qwen2.5's
//! 7 as 4 + 3; Gemma 3's 4), written in assembly.
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

/// s[r · BT + j] = q_r · k_j for the 3 rows `q` and the 32 keys at `kt` (`hs` channels `kstep` bytes apart, 32 f16
/// keys each); `pf`: one byte address asked for (into every cache level) with each channel, `pfs` bytes apart.
///
/// # Safety
/// AVX2, FMA and F16C; `kt` holds hs channels of 32 f16 at `kstep` bytes, each `q[r]` hs f32, `out` 3 rows of `bt`
/// f32 from the strip's first key.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn scores3(
    kt: *const u8,
    kstep: usize,
    q: [*const f32; 3],
    hs: usize,
    pf: *const u8,
    pfs: usize,
    out: *mut f32,
    bt: usize,
) {
    let z = _mm256_setzero_ps();
    let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5] = [z; 6];
    let [mut a6, mut a7, mut a8, mut a9, mut a10, mut a11] = [z; 6];
    if hs > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{q0} + 4*{d}]",
            "vbroadcastss {b1}, dword ptr [{q1} + 4*{d}]",
            "vbroadcastss {b2}, dword ptr [{q2} + 4*{d}]",
            "prefetcht0 byte ptr [{pf}]",
            "vcvtph2ps {k}, xmmword ptr [{kp}]",
            "vfmadd231ps {a0}, {b0}, {k}",
            "vfmadd231ps {a4}, {b1}, {k}",
            "vfmadd231ps {a8}, {b2}, {k}",
            "vcvtph2ps {k}, xmmword ptr [{kp} + 16]",
            "vfmadd231ps {a1}, {b0}, {k}",
            "vfmadd231ps {a5}, {b1}, {k}",
            "vfmadd231ps {a9}, {b2}, {k}",
            "vcvtph2ps {k}, xmmword ptr [{kp} + 32]",
            "vfmadd231ps {a2}, {b0}, {k}",
            "vfmadd231ps {a6}, {b1}, {k}",
            "vfmadd231ps {a10}, {b2}, {k}",
            "vcvtph2ps {k}, xmmword ptr [{kp} + 48]",
            "vfmadd231ps {a3}, {b0}, {k}",
            "vfmadd231ps {a7}, {b1}, {k}",
            "vfmadd231ps {a11}, {b2}, {k}",
            "add {kp}, {ks}",
            "add {pf}, {pfs}",
            "inc {d}",
            "cmp {d}, {n}",
            "jb 2b",
            q0 = in(reg) q[0],
            q1 = in(reg) q[1],
            q2 = in(reg) q[2],
            d = inout(reg) 0usize => _,
            kp = inout(reg) kt => _,
            pf = inout(reg) pf => _,
            ks = in(reg) kstep,
            pfs = in(reg) pfs,
            n = in(reg) hs,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            k = out(ymm_reg) _,
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
    let rows = [[a0, a1, a2, a3], [a4, a5, a6, a7], [a8, a9, a10, a11]];
    for (r, row) in rows.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * bt + 8 * w), *v);
        }
    }
}

/// acc_r[0..32] ← alpha_r · acc_r[0..32] + Σ_{j<n} p[r · bt + j] · v_j[0..32] for the 3 rows (`acc` rows `hv` apart),
/// over the value rows at `vb` (`vrow` bytes apart, 32 f16 channels from the strip's first); `pf`: one byte address
/// asked for with each value row, `pfs` bytes apart.
///
/// # Safety
/// AVX2, FMA and F16C; `p` holds 3 rows of `bt` ≥ n f32, `vb` n rows, `acc` 3 rows of 32 f32 `hv` apart.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn pv3(
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
    let ld = |r: usize, w: usize| {
        _mm256_mul_ps(
            _mm256_loadu_ps(acc.add(r * hv + 8 * w)),
            _mm256_set1_ps(alpha[r]),
        )
    };
    let (mut a0, mut a1, mut a2, mut a3) = (ld(0, 0), ld(0, 1), ld(0, 2), ld(0, 3));
    let (mut a4, mut a5, mut a6, mut a7) = (ld(1, 0), ld(1, 1), ld(1, 2), ld(1, 3));
    let (mut a8, mut a9, mut a10, mut a11) = (ld(2, 0), ld(2, 1), ld(2, 2), ld(2, 3));
    if n > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{p0} + 4*{j}]",
            "vbroadcastss {b1}, dword ptr [{p1} + 4*{j}]",
            "vbroadcastss {b2}, dword ptr [{p2} + 4*{j}]",
            "prefetcht0 byte ptr [{pf}]",
            "vcvtph2ps {v}, xmmword ptr [{vp}]",
            "vfmadd231ps {a0}, {b0}, {v}",
            "vfmadd231ps {a4}, {b1}, {v}",
            "vfmadd231ps {a8}, {b2}, {v}",
            "vcvtph2ps {v}, xmmword ptr [{vp} + 16]",
            "vfmadd231ps {a1}, {b0}, {v}",
            "vfmadd231ps {a5}, {b1}, {v}",
            "vfmadd231ps {a9}, {b2}, {v}",
            "vcvtph2ps {v}, xmmword ptr [{vp} + 32]",
            "vfmadd231ps {a2}, {b0}, {v}",
            "vfmadd231ps {a6}, {b1}, {v}",
            "vfmadd231ps {a10}, {b2}, {v}",
            "vcvtph2ps {v}, xmmword ptr [{vp} + 48]",
            "vfmadd231ps {a3}, {b0}, {v}",
            "vfmadd231ps {a7}, {b1}, {v}",
            "vfmadd231ps {a11}, {b2}, {v}",
            "add {vp}, {vs}",
            "add {pf}, {pfs}",
            "inc {j}",
            "cmp {j}, {n}",
            "jb 2b",
            p0 = in(reg) p,
            p1 = in(reg) p.add(bt),
            p2 = in(reg) p.add(2 * bt),
            j = inout(reg) 0usize => _,
            vp = inout(reg) vb => _,
            pf = inout(reg) pf => _,
            vs = in(reg) vrow,
            pfs = in(reg) pfs,
            n = in(reg) n,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            v = out(ymm_reg) _,
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
    let rows = [[a0, a1, a2, a3], [a4, a5, a6, a7], [a8, a9, a10, a11]];
    for (r, row) in rows.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * hv + 8 * w), *v);
        }
    }
}

/// [`scores3`] for 4 rows and a strip of 16 keys: s[r · BT + j] = q_r · k_j.
///
/// # Safety
/// As [`scores3`], with 16 keys per channel read and 4 rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn scores4(
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
    let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7] = [z; 8];
    if hs > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{q0} + 4*{d}]",
            "vbroadcastss {b1}, dword ptr [{q1} + 4*{d}]",
            "vbroadcastss {b2}, dword ptr [{q2} + 4*{d}]",
            "vbroadcastss {b3}, dword ptr [{q3} + 4*{d}]",
            "prefetcht0 byte ptr [{pf}]",
            "vcvtph2ps {k}, xmmword ptr [{kp}]",
            "vfmadd231ps {a0}, {b0}, {k}",
            "vfmadd231ps {a2}, {b1}, {k}",
            "vfmadd231ps {a4}, {b2}, {k}",
            "vfmadd231ps {a6}, {b3}, {k}",
            "vcvtph2ps {k}, xmmword ptr [{kp} + 16]",
            "vfmadd231ps {a1}, {b0}, {k}",
            "vfmadd231ps {a3}, {b1}, {k}",
            "vfmadd231ps {a5}, {b2}, {k}",
            "vfmadd231ps {a7}, {b3}, {k}",
            "add {kp}, {ks}",
            "add {pf}, {pfs}",
            "inc {d}",
            "cmp {d}, {n}",
            "jb 2b",
            q0 = in(reg) q[0],
            q1 = in(reg) q[1],
            q2 = in(reg) q[2],
            q3 = in(reg) q[3],
            d = inout(reg) 0usize => _,
            kp = inout(reg) kt => _,
            pf = inout(reg) pf => _,
            ks = in(reg) kstep,
            pfs = in(reg) pfs,
            n = in(reg) hs,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            b3 = out(ymm_reg) _,
            k = out(ymm_reg) _,
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
    let rows = [[a0, a1], [a2, a3], [a4, a5], [a6, a7]];
    for (r, row) in rows.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * bt + 8 * w), *v);
        }
    }
}

/// [`pv3`] for 4 rows and a strip of 16 channels.
///
/// # Safety
/// As [`pv3`], with 4 rows of 16 channels.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the strip's pointers and strides
pub(super) unsafe fn pv4(
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
    let ld = |r: usize, w: usize| {
        _mm256_mul_ps(
            _mm256_loadu_ps(acc.add(r * hv + 8 * w)),
            _mm256_set1_ps(alpha[r]),
        )
    };
    let (mut a0, mut a1, mut a2, mut a3) = (ld(0, 0), ld(0, 1), ld(1, 0), ld(1, 1));
    let (mut a4, mut a5, mut a6, mut a7) = (ld(2, 0), ld(2, 1), ld(3, 0), ld(3, 1));
    if n > 0 {
        asm!(
            "2:",
            "vbroadcastss {b0}, dword ptr [{p0} + 4*{j}]",
            "vbroadcastss {b1}, dword ptr [{p1} + 4*{j}]",
            "vbroadcastss {b2}, dword ptr [{p2} + 4*{j}]",
            "vbroadcastss {b3}, dword ptr [{p3} + 4*{j}]",
            "prefetcht0 byte ptr [{pf}]",
            "vcvtph2ps {v}, xmmword ptr [{vp}]",
            "vfmadd231ps {a0}, {b0}, {v}",
            "vfmadd231ps {a2}, {b1}, {v}",
            "vfmadd231ps {a4}, {b2}, {v}",
            "vfmadd231ps {a6}, {b3}, {v}",
            "vcvtph2ps {v}, xmmword ptr [{vp} + 16]",
            "vfmadd231ps {a1}, {b0}, {v}",
            "vfmadd231ps {a3}, {b1}, {v}",
            "vfmadd231ps {a5}, {b2}, {v}",
            "vfmadd231ps {a7}, {b3}, {v}",
            "add {vp}, {vs}",
            "add {pf}, {pfs}",
            "inc {j}",
            "cmp {j}, {n}",
            "jb 2b",
            p0 = in(reg) p,
            p1 = in(reg) p.add(bt),
            p2 = in(reg) p.add(2 * bt),
            p3 = in(reg) p.add(3 * bt),
            j = inout(reg) 0usize => _,
            vp = inout(reg) vb => _,
            pf = inout(reg) pf => _,
            vs = in(reg) vrow,
            pfs = in(reg) pfs,
            n = in(reg) n,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            b2 = out(ymm_reg) _,
            b3 = out(ymm_reg) _,
            v = out(ymm_reg) _,
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
    let rows = [[a0, a1], [a2, a3], [a4, a5], [a6, a7]];
    for (r, row) in rows.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * hv + 8 * w), *v);
        }
    }
}
