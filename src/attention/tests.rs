//! The attention kernels against naive attention: every SIMD path, GQA, windows, soft-caps, selections, KIVI
//! widths, chunked prefill and batches.

use super::*;
use crate::kv::{KvConfig, KvDtype};

use crate::testutil::Rng;

#[allow(clippy::too_many_arguments)] // a test table row: every argument is one column
fn check(
    n_q: usize,
    n_kv: usize,
    hk: usize,
    hv: usize,
    len: usize,
    n_new: usize,
    window: Option<u32>,
    dtype: KvDtype,
) {
    let mut rng = Rng(0x9E3779B97F4A7C15 ^ (len as u64 * 31 + n_new as u64));
    let cfg = KvConfig {
        n_layers: 1,
        n_kv_heads: n_kv,
        head_dim_k: hk,
        head_dim_v: hv,
        block_tokens: if len.is_multiple_of(2) { 32 } else { 8 },
        dtype,
        windows: Vec::new(),
    };
    let mut cache = KvCache::new(cfg.clone());
    let mut exact = KvCache::new(KvConfig {
        dtype: KvDtype::F32,
        ..cfg
    });
    let pos: Vec<u32> = (0..len as u32).collect();
    let (k, v) = (rng.vec(len * n_kv * hk, 1.0), rng.vec(len * n_kv * hv, 1.0));
    cache.append(0, &pos, &k, &v);
    exact.append(0, &pos, &k, &v);
    let q_pos: Vec<u32> = ((len - n_new) as u32..len as u32).collect();
    let q = rng.vec(n_new * n_q * hk, 2.0);
    let p = AttnParams {
        n_q_heads: n_q,
        scale: 1.0 / (hk as f32).sqrt(),
        window,
        softcap: None,
    };
    let mut out = vec![0.0; n_new * n_q * hv];
    let mut scratch = AttnScratch::default();
    attend(&cache, 0, &q, &q_pos, &mut out, &p, &mut scratch);
    let want = naive_attention(&cache, 0, &q, &q_pos, &p);
    let max_err = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let tol = tolerance(&cache, &exact, &q, &q_pos, &p, None);
    assert!(max_err < tol, "tiled vs naive max err {max_err} > {tol} (n_q {n_q} n_kv {n_kv} len {len} new {n_new} window {window:?})");
    // Run twice with the same scratch: reuse must not leak state between calls.
    let mut out2 = vec![0.0; out.len()];
    attend(&cache, 0, &q, &q_pos, &mut out2, &p, &mut scratch);
    assert_eq!(out, out2);
}

#[test]
fn tiled_matches_naive_gqa_odd_lengths() {
    for &(len, n_new) in &[
        (1, 1),
        (7, 7),
        (37, 37),
        (37, 1),
        (100, 13),
        (300, 1),
        (129, 64),
    ] {
        check(9, 3, 64, 64, len, n_new, None, KvDtype::F16);
        check(4, 4, 16, 16, len, n_new, None, KvDtype::F32);
    }
}

/// A decode step over a cache holding entries 0..=r gives row r's output of a prefill over the whole cache bit
/// for bit, on every path: the prefill row sees the decode step's partial newest block as a full block cut by
/// its causal mask, and every fold sums the missing entries' exact zeros in the lanes the partial block's last
/// entries take (model_tiny's chunked ≡ one-shot ≡ token-by-token rests on it).
#[test]
fn decoding_an_entry_equals_its_prefill_row_bit_for_bit() {
    let len = 75;
    for &(n_q, n_kv, hd, dtype) in &[
        (4, 2, 16, KvDtype::F32),
        (9, 3, 64, KvDtype::F32),
        (9, 3, 64, KvDtype::F16),
        (4, 1, 32, KvDtype::F16),
    ] {
        for seed in 0..4u64 {
            let mut rng = Rng(0xDEC0DE ^ seed ^ ((hd as u64) << 8));
            let cfg = KvConfig {
                n_layers: 1,
                n_kv_heads: n_kv,
                head_dim_k: hd,
                head_dim_v: hd,
                block_tokens: 32,
                dtype,
                windows: Vec::new(),
            };
            let pos: Vec<u32> = (0..len as u32).collect();
            let (k, v) = (rng.vec(len * n_kv * hd, 1.0), rng.vec(len * n_kv * hd, 1.0));
            let q = rng.vec(len * n_q * hd, 3.0);
            let p = AttnParams {
                n_q_heads: n_q,
                scale: 1.0 / (hd as f32).sqrt(),
                window: None,
                softcap: None,
            };
            let mut whole = KvCache::new(cfg.clone());
            whole.append(0, &pos, &k, &v);
            let row = n_q * hd;
            let mut scratch = AttnScratch::default();
            for simd in simd_levels() {
                let mut prefill = vec![0.0; len * row];
                attend_impl(
                    &whole,
                    0,
                    &q,
                    &pos,
                    &mut prefill,
                    &p,
                    Sel::All,
                    simd,
                    &mut scratch,
                );
                let mut growing = KvCache::new(cfg.clone());
                let mut one = vec![0.0; row];
                for r in 0..len {
                    let kv = n_kv * hd;
                    growing.append(0, &pos[r..=r], &k[r * kv..][..kv], &v[r * kv..][..kv]);
                    let qr = &q[r * row..][..row];
                    attend_impl(
                        &growing,
                        0,
                        qr,
                        &pos[r..=r],
                        &mut one,
                        &p,
                        Sel::All,
                        simd,
                        &mut scratch,
                    );
                    let differ = one
                        .iter()
                        .zip(&prefill[r * row..][..row])
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(
                        differ, 0,
                        "{simd:?} {dtype:?} {n_q}/{n_kv}×{hd} seed {seed}: row {r}"
                    );
                }
            }
        }
    }
}

/// A decode row reads f16 blocks in place on the AVX-512 path (each key and value converted where it is
/// loaded); a call with more rows than one pass of that fold converts each block into a copy first. The same
/// query row gives the same bits both ways: three copies of it at the same position (12 rows of a 4-query-head
/// group) take the copy path, one alone the in-place path. Groups of 5 and 7 (Qwen2.5's) take the in-place path's
/// p·V of up to 7 rows in one pass on AVX-512 against 4 rows per pass in the copy path.
#[test]
fn f16_blocks_read_in_place_equal_the_converted_copy_bit_for_bit() {
    let (hk, len) = (64, 333);
    for (n_q, bt) in [(4, 16), (4, 32), (4, 64), (5, 32), (7, 32)] {
        let mut rng = Rng(0xF16 + bt as u64);
        let (cache, p) = f16_head(&mut rng, n_q, hk, bt, len);
        let q1 = rng.vec(n_q * hk, 2.0); // 1 × n_q·hk
        let q3: Vec<f32> = q1.iter().cycle().take(3 * q1.len()).copied().collect(); // 3 × n_q·hk
        let mut scratch = AttnScratch::default();
        for simd in simd_levels() {
            let mut one = vec![0.0; n_q * hk];
            let mut three = vec![0.0; 3 * n_q * hk];
            let at = [len as u32 - 1; 3];
            attend_impl(
                &cache,
                0,
                &q1,
                &at[..1],
                &mut one,
                &p,
                Sel::All,
                simd,
                &mut scratch,
            );
            attend_impl(
                &cache,
                0,
                &q3,
                &at,
                &mut three,
                &p,
                Sel::All,
                simd,
                &mut scratch,
            );
            for t in 0..3 {
                assert_eq!(
                    one,
                    three[t * n_q * hk..][..n_q * hk],
                    "{simd:?}, {n_q} rows, block {bt}, copy {t}"
                );
            }
        }
    }
}

/// One f16 KV head of `len` random entries at positions 0.., in blocks of `bt`, and `n_q` query heads over it.
fn f16_head(rng: &mut Rng, n_q: usize, hk: usize, bt: usize, len: usize) -> (KvCache, AttnParams) {
    let mut cache = KvCache::new(KvConfig {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim_k: hk,
        head_dim_v: hk,
        block_tokens: bt,
        dtype: KvDtype::F16,
        windows: Vec::new(),
    });
    let pos: Vec<u32> = (0..len as u32).collect();
    cache.append(0, &pos, &rng.vec(len * hk, 1.0), &rng.vec(len * hk, 1.0));
    let p = AttnParams {
        n_q_heads: n_q,
        scale: 0.125,
        window: None,
        softcap: None,
    };
    (cache, p)
}

/// A block every row sees whole takes the interleaved softmax step (AVX-512); the same block folded for a tile
/// whose other query cannot see all of it takes the masked step. The last query's output must not depend on
/// which ran: that is what keeps chunked prefill equal to one-shot bit for bit.
#[test]
fn the_unmasked_softmax_step_equals_the_masked_one_bit_for_bit() {
    let (n_q, hk) = (4, 64);
    for bt in [16, 32, 64] {
        let len = 4 * bt;
        let mut rng = Rng(0x50F7 + bt as u64);
        let (cache, p) = f16_head(&mut rng, n_q, hk, bt, len);
        let q2 = rng.vec(2 * n_q * hk, 2.0); // 2 × n_q·hk: tokens at len − 2 and len − 1
        let last = &q2[n_q * hk..];
        let mut scratch = AttnScratch::default();
        for simd in simd_levels() {
            let (mut one, mut two) = (vec![0.0; n_q * hk], vec![0.0; 2 * n_q * hk]);
            let at = [len as u32 - 2, len as u32 - 1];
            let mut run = |q: &[f32], at: &[u32], out: &mut [f32]| {
                attend_impl(&cache, 0, q, at, out, &p, Sel::All, simd, &mut scratch)
            };
            run(last, &at[1..], &mut one);
            run(&q2, &at, &mut two);
            assert_eq!(one, two[n_q * hk..], "{simd:?}, block {bt}");
        }
    }
}

#[test]
fn tiled_matches_naive_sliding_window() {
    for &(len, n_new, w) in &[
        (50, 50, 8),
        (200, 1, 16),
        (200, 40, 33),
        (64, 64, 1),
        (90, 17, 200),
    ] {
        check(4, 1, 32, 32, len, n_new, Some(w), KvDtype::F16);
    }
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = -90.0f32;
    while x <= 0.0 {
        let want = (x as f64).exp();
        let got = exp_neg(x) as f64;
        if x >= -87.0 {
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "exp({x}) = {got}, want {want}"
            );
        } else {
            assert!(got < 1e-37);
        }
        x += 0.0137;
    }
    assert_eq!(exp_neg(0.0), 1.0);
    assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
}

/// The AVX-512 folds' 16-lane e^x ([`wide::exp_neg16`], fused multiply-adds) against f64 over [−90, 0], −∞ and 0.
#[cfg(target_arch = "x86_64")]
#[test]
fn fused_exp_is_accurate() {
    use std::arch::x86_64::*;
    if !std::arch::is_x86_feature_detected!("avx512f") {
        eprintln!("skipped: no AVX-512 on this CPU");
        return;
    }
    let mut xs: Vec<f32> = (0..6600)
        .map(|i| -90.0 + 0.0137 * i as f32)
        .filter(|&x| x <= 0.0)
        .collect();
    xs.extend([0.0, -0.0, f32::NEG_INFINITY, -87.0, -86.999, -1e-30]);
    for chunk in xs.chunks(16) {
        let mut lanes = [f32::NEG_INFINITY; 16];
        lanes[..chunk.len()].copy_from_slice(chunk);
        let mut got = [0.0f32; 16];
        // SAFETY: AVX-512F was found above (the function's other features come with it on every AVX-512 CPU).
        unsafe {
            let e = wide::exp_neg16(_mm512_loadu_ps(lanes.as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), e);
        }
        for (&x, &g) in chunk.iter().zip(&got) {
            let want = (x as f64).exp();
            if x >= -87.0 {
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * want,
                    "exp({x}) = {g}, want {want}"
                );
            } else {
                assert_eq!(g, 0.0, "exp({x})");
            }
        }
    }
}

#[test]
fn scalar_path_matches_naive() {
    // run_task is the same code with or without target features; exercise it directly without SIMD dispatch.
    let cfg = KvConfig {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim_k: 8,
        head_dim_v: 8,
        block_tokens: 4,
        dtype: KvDtype::F32,
        windows: Vec::new(),
    };
    let mut rng = Rng(7);
    let mut cache = KvCache::new(cfg);
    let pos: Vec<u32> = (0..10).collect();
    cache.append(0, &pos, &rng.vec(80, 1.0), &rng.vec(80, 1.0));
    let q = rng.vec(2 * 8, 1.0);
    let q_pos = [8u32, 9];
    let p = AttnParams {
        n_q_heads: 2,
        scale: 0.3,
        window: None,
        softcap: Some(5.0),
    };
    let sh = Shape {
        n_q_heads: 2,
        group: 2,
        hk: 8,
        hv: 8,
        bt: 4,
    };
    let task = Task {
        job: 0,
        kv_head: 0,
        t0: 0,
        t1: 1,
        blk0: 0,
        blk1: 3,
        shared: false,
    };
    let mut buf = TaskBuf {
        acc: vec![0.0; 16],
        m: vec![0.0; 2],
        l: vec![0.0; 2],
        s: vec![0.0; 4],
        k: vec![0.0; 32],
        v: vec![0.0; 32],
        ..Default::default()
    };
    let a = TaskArgs {
        cache: &cache,
        layer: 0,
        q: &q[..16],
        q_pos: &q_pos[..1],
        sh: &sh,
        p: &p,
        task: &task,
        pieces: None,
        scores: None,
        shared: None,
        simd: Simd::Scalar,
        follow: None,
    };
    run_task::<4>(&a, &mut buf);
    let want = naive_attention(&cache, 0, &q[..16], &q_pos[..1], &p);
    for r in 0..2 {
        for d in 0..8 {
            let got = buf.acc[r * 8 + d] / buf.l[r];
            assert!((got - want[r * 8 + d]).abs() < 1e-5);
        }
    }
}

#[test]
fn quantized_blocks_match_naive_on_dequantized_values() {
    for bits in [8u8, 4, 2] {
        let dtype = KvDtype::Kivi { bits, residual: 16 };
        for &(len, n_new) in &[(37, 37), (100, 13), (300, 1), (129, 64)] {
            check(9, 3, 64, 64, len, n_new, None, dtype);
        }
        check(4, 1, 32, 32, 200, 40, Some(33), dtype);
        check(4, 2, 16, 96, 150, 1, None, dtype);
    }
}

/// One case of [`every_simd_path_matches_naive`]: a cache of `len` random entries (keys of `hk`, values of `hv`
/// channels, blocks of `bt`), the last `n_new` of them queried by `n_q` heads.
#[derive(Clone, Copy)]
struct Case {
    n_q: usize,
    n_kv: usize,
    hk: usize,
    hv: usize,
    bt: usize,
    len: usize,
    n_new: usize,
    window: Option<u32>,
    softcap: Option<f32>,
    /// Prune head 0's key channels (ThinK) to those with c % 3 != 1.
    prune: bool,
}

/// Case `c`'s cache in `dtype` (the same entries for every dtype), its queries, their positions and parameters.
fn case_setup(c: Case, dtype: KvDtype) -> (KvCache, Vec<f32>, Vec<u32>, AttnParams) {
    let mut rng = Rng(0xA11CE ^ (c.len as u64 * 131 + c.hv as u64 * 7 + c.bt as u64));
    let mut cache = KvCache::new(KvConfig {
        n_layers: 1,
        n_kv_heads: c.n_kv,
        head_dim_k: c.hk,
        head_dim_v: c.hv,
        block_tokens: c.bt,
        dtype,
        windows: Vec::new(),
    });
    let pos: Vec<u32> = (0..c.len as u32).collect();
    // Keys with a per-channel offset and spread (as real keys have), values around 0.
    let mut k = rng.vec(c.len * c.n_kv * c.hk, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        let ch = i % c.hk;
        *x = *x * (1.0 + (ch % 5) as f32) + (ch % 7) as f32 - 3.0;
    }
    cache.append(0, &pos, &k, &rng.vec(c.len * c.n_kv * c.hv, 1.0));
    if c.prune {
        let keep: Vec<bool> = (0..c.hk).map(|ch| ch % 3 != 1).collect();
        cache.prune_key_channels(0, 0, &keep);
    }
    let q_pos: Vec<u32> = ((c.len - c.n_new) as u32..c.len as u32).collect();
    let q = rng.vec(c.n_new * c.n_q * c.hk, 1.0);
    let p = AttnParams {
        n_q_heads: c.n_q,
        scale: 1.0 / (c.hk as f32).sqrt(),
        window: c.window,
        softcap: c.softcap,
    };
    (cache, q, q_pos, p)
}

/// What storing case `c` in `dtype` does to the exact result: the f64 reference over the cache's (dequantized)
/// entries against the reference over the same entries kept in f32, max |Δ| / max |want|.
fn storage_err(c: Case, dtype: KvDtype) -> f32 {
    let (cache, q, q_pos, p) = case_setup(c, dtype);
    let got = naive_attention(&cache, 0, &q, &q_pos, &p);
    let (exact, ..) = case_setup(c, KvDtype::F32);
    let want = naive_attention(&exact, 0, &q, &q_pos, &p);
    let scale = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    got.iter()
        .zip(&want)
        .fold(0.0f32, |e, (a, b)| e.max((a - b).abs()))
        / scale
}

/// The share of what 4-bit storage moves an output that the integer fold's own rounding may add (query bytes,
/// and on AVX2 byte probabilities too: up to 0.20 seen in these tests, against 0.16 with 16-bit probabilities).
const FOLD_SHARE: f32 = 0.25;

/// The largest |Δ| a tiled result over `cache` may show against the reference over the same entries, when it runs
/// on the process's SIMD level: 1e-4, or where the integer fold reads 4-bit blocks ([`integer_fold`]),
/// [`FOLD_SHARE`] of what 4-bit storage itself moves the reference (`exact`: the same entries in f32), if that is
/// more.
fn tolerance(
    cache: &KvCache,
    exact: &KvCache,
    q: &[f32],
    q_pos: &[u32],
    p: &AttnParams,
    sel: Option<&Selection>,
) -> f32 {
    let cfg = &cache.cfg;
    if !integer_fold(simd_level(), cfg.dtype, cfg.block_tokens) {
        return 1e-4;
    }
    let got = naive_attention_over(cache, 0, q, q_pos, p, sel);
    let want = naive_attention_over(exact, 0, q, q_pos, p, sel);
    let storage = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |e, (a, b)| e.max((a - b).abs()));
    1e-4f32.max(FOLD_SHARE * storage)
}

/// attend() on `simd` vs the f64 reference over the cache's own (dequantized) entries: max |Δ| / max |want|.
fn rel_err_at(simd: Simd, c: Case, dtype: KvDtype) -> f32 {
    let (cache, q, q_pos, p) = case_setup(c, dtype);
    let mut out = vec![0.0; c.n_new * c.n_q * c.hv];
    let mut scratch = AttnScratch::default();
    attend_impl(
        &cache,
        0,
        &q,
        &q_pos,
        &mut out,
        &p,
        Sel::All,
        simd,
        &mut scratch,
    );
    let want = naive_attention(&cache, 0, &q, &q_pos, &p);
    let scale = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    assert!(scale > 0.0);
    out.iter()
        .zip(&want)
        .fold(0.0f32, |e, (a, b)| e.max((a - b).abs()))
        / scale
}

/// Every compiled variant this CPU runs (scalar, the AVX2 wide step, the AVX-512 one), on every storage: f32, f16,
/// KIVI 4-bit blocks read in place (with an f16 residual and a partial last block) and 8-bit ones dequantized,
/// against the reference over the same (dequantized) entries. Odd lengths, GQA 1/3/8, windows, soft-capping,
/// pruned key channels, block sizes 4..64 and value dims that take every strip width and two value groups.
#[test]
fn every_simd_path_matches_naive() {
    let base = Case {
        n_q: 9,
        n_kv: 3,
        hk: 64,
        hv: 64,
        bt: 32,
        len: 301,
        n_new: 1,
        window: None,
        softcap: None,
        prune: false,
    };
    let cases = [
        base,
        Case { n_new: 37, ..base },
        Case {
            n_q: 8,
            n_kv: 1,
            len: 200,
            n_new: 19,
            ..base
        },
        Case {
            n_q: 4,
            n_kv: 4,
            hk: 16,
            hv: 16,
            bt: 16,
            len: 157,
            n_new: 5,
            ..base
        },
        Case {
            n_q: 4,
            n_kv: 2,
            hk: 40,
            hv: 96,
            bt: 64,
            len: 333,
            n_new: 3,
            ..base
        },
        Case {
            hk: 48,
            hv: 72,
            bt: 8,
            len: 123,
            n_new: 2,
            ..base
        },
        Case {
            n_q: 2,
            n_kv: 1,
            hk: 8,
            hv: 8,
            bt: 4,
            len: 61,
            n_new: 7,
            ..base
        },
        Case {
            window: Some(70),
            n_new: 21,
            ..base
        },
        Case {
            window: Some(40),
            bt: 16,
            n_new: 1,
            ..base
        },
        Case {
            softcap: Some(3.0),
            n_new: 4,
            ..base
        },
        Case {
            prune: true,
            n_new: 9,
            ..base
        },
        // 3-query groups over 64-key blocks (two 32-key strips) and 96 value channels (three 32-channel strips),
        // Qwen2.5's 7-query groups (a decode step's rows over f16 blocks read in place: one p·V pass of 7 rows on
        // AVX-512, chunks of 4 and 3 on AVX2), 5-query groups and 8-query groups, decoding and in a prefill tile.
        Case {
            n_q: 6,
            n_kv: 2,
            hk: 48,
            hv: 96,
            bt: 64,
            len: 250,
            n_new: 1,
            ..base
        },
        Case {
            n_q: 14,
            n_kv: 2,
            len: 190,
            n_new: 1,
            ..base
        },
        Case {
            n_q: 14,
            n_kv: 2,
            len: 190,
            n_new: 2,
            ..base
        },
        Case {
            n_q: 10,
            n_kv: 2,
            len: 150,
            n_new: 1,
            ..base
        },
        Case {
            n_q: 8,
            n_kv: 1,
            len: 97,
            n_new: 1,
            ..base
        },
    ];
    let dtypes = [
        KvDtype::F32,
        KvDtype::F16,
        KvDtype::Kivi {
            bits: 4,
            residual: 16,
        },
        KvDtype::Kivi {
            bits: 4,
            residual: 0,
        },
        KvDtype::Kivi {
            bits: 8,
            residual: 16,
        },
        KvDtype::Kivi {
            bits: 2,
            residual: 16,
        },
    ];
    let levels = simd_levels();
    eprintln!("variants: {levels:?}");
    for simd in levels {
        for c in cases {
            for dtype in dtypes {
                let e = rel_err_at(simd, c, dtype);
                // The integer fold's rounding: a share of what 4-bit storage itself does.
                let tol = if integer_fold(simd, dtype, c.bt) {
                    let q = storage_err(c, dtype);
                    eprintln!("integer fold {e:.2e} against 4-bit storage {q:.2e}");
                    1e-4f32.max(FOLD_SHARE * q)
                } else {
                    1e-4
                };
                assert!(
                    e < tol,
                    "{simd:?} {dtype:?} n_q {} n_kv {} hk {} hv {} bt {} len {} new {} window {:?} \
                     softcap {:?} prune {}: relative error {e}",
                    c.n_q, c.n_kv, c.hk, c.hv, c.bt, c.len, c.n_new, c.window, c.softcap, c.prune
                );
            }
        }
    }
}

/// Decode over runs of whole 4-bit blocks (`wide::fold_q4_run`: one softmax step and one integer p·V pass per
/// run) against the reference over the same entries, within the integer fold's tolerance: groups of 1 to 8 rows,
/// two value groups, a window that cuts through the runs, pruned key channels, a partial last run and block.
#[test]
fn runs_of_four_bit_blocks_match_naive() {
    let base = Case {
        n_q: 9,
        n_kv: 3,
        hk: 64,
        hv: 64,
        bt: 32,
        len: 1123,
        n_new: 1,
        window: None,
        softcap: None,
        prune: false,
    };
    let cases = [
        base,
        Case {
            n_q: 7,
            n_kv: 1,
            ..base
        },
        Case {
            n_q: 8,
            n_kv: 1,
            hv: 128,
            ..base
        },
        Case {
            n_q: 4,
            n_kv: 4,
            len: 900,
            ..base
        },
        Case {
            n_q: 4,
            n_kv: 1,
            n_new: 2,
            ..base
        },
        Case {
            window: Some(500),
            ..base
        },
        Case {
            prune: true,
            ..base
        },
        Case {
            hk: 128,
            len: 2000,
            ..base
        },
    ];
    for bits in [4, 2] {
        let dtype = KvDtype::Kivi { bits, residual: 32 };
        #[cfg(target_arch = "x86_64")]
        COUNT_Q4_RUNS.store(true, std::sync::atomic::Ordering::Relaxed);
        #[cfg(target_arch = "x86_64")]
        let before = Q4_RUNS_FOLDED.load(std::sync::atomic::Ordering::Relaxed);
        for simd in simd_levels() {
            for c in cases {
                let e = rel_err_at(simd, c, dtype);
                let tol = if integer_fold(simd, dtype, c.bt) {
                    1e-4f32.max(FOLD_SHARE * storage_err(c, dtype))
                } else {
                    1e-4
                };
                assert!(
                e < tol,
                "{simd:?} {bits}-bit n_q {} n_kv {} hk {} hv {} len {} new {} window {:?} prune {}: relative \
                 error {e} (tolerance {tol})",
                c.n_q, c.n_kv, c.hk, c.hv, c.len, c.n_new, c.window, c.prune
            );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if integer_fold(Simd::Avx512, dtype, 32) && simd_levels().contains(&Simd::Avx512) {
            let runs = Q4_RUNS_FOLDED.load(std::sync::atomic::Ordering::Relaxed) - before;
            assert!(runs > 0, "no run of {bits}-bit blocks was folded together");
        }
    }
}

/// The in-place 4-bit fold reads the quantized blocks as they are: the bytes it counts are the codes and scales.
#[test]
fn four_bit_blocks_count_their_own_bytes() {
    let (cache, q, q_pos, p) = fixed_case(KvDtype::Kivi {
        bits: 4,
        residual: 32,
    });
    let (mut out, mut scratch) = (vec![0.0; q.len()], AttnScratch::default());
    cache.take_read();
    attend(&cache, 0, &q, &q_pos, &mut out, &p, &mut scratch);
    let read = cache.take_read();
    let (f16, ..) = fixed_case(KvDtype::F16);
    f16.take_read();
    attend(&f16, 0, &q, &q_pos, &mut out, &p, &mut scratch);
    let dense = f16.take_read();
    assert!(read * 2 < dense, "4-bit read {read} vs f16 {dense}");
}

/// Shapes of the fixed test case: query heads, KV heads, head dim, cached entries, new queries.
const CASE: (usize, usize, usize, usize, usize) = (6, 2, 64, 300, 8);

/// A cache with `dtype` holding fixed random keys/values, the queries that follow them (from the same generator)
/// and the attention parameters.
fn fixed_case(dtype: KvDtype) -> (KvCache, Vec<f32>, Vec<u32>, AttnParams) {
    let (n_q, n_kv, hd, len, n_new) = CASE;
    let mut rng = Rng(77);
    let mut cache = KvCache::new(KvConfig {
        n_layers: 1,
        n_kv_heads: n_kv,
        head_dim_k: hd,
        head_dim_v: hd,
        block_tokens: 32,
        dtype,
        windows: Vec::new(),
    });
    let pos: Vec<u32> = (0..len as u32).collect();
    cache.append(
        0,
        &pos,
        &rng.vec(len * n_kv * hd, 1.0),
        &rng.vec(len * n_kv * hd, 1.0),
    );
    let q = rng.vec(n_new * n_q * hd, 2.0);
    let q_pos: Vec<u32> = ((len - n_new) as u32..len as u32).collect();
    let p = AttnParams {
        n_q_heads: n_q,
        scale: 1.0 / (hd as f32).sqrt(),
        window: None,
        softcap: None,
    };
    (cache, q, q_pos, p)
}

/// Attention output of the fixed case with `dtype` (head 1's key channels pruned to `prune`), and the cache bytes.
fn run_with(dtype: KvDtype, prune: Option<&[bool]>) -> (Vec<f32>, usize) {
    let (mut cache, q, q_pos, p) = fixed_case(dtype);
    if let Some(keep) = prune {
        cache.prune_key_channels(0, 1, keep);
    }
    let mut out = vec![0.0; q.len()];
    attend(
        &cache,
        0,
        &q,
        &q_pos,
        &mut out,
        &p,
        &mut AttnScratch::default(),
    );
    (out, cache.bytes())
}

#[test]
fn quantized_attention_stays_close_to_f16() {
    let (f16_out, f16_bytes) = run_with(KvDtype::F16, None);
    let mut last = 0.0f32;
    for (bits, bound) in [(8u8, 0.002f32), (4, 0.03), (2, 0.2)] {
        let (out, bytes) = run_with(KvDtype::Kivi { bits, residual: 32 }, None);
        let err = out
            .iter()
            .zip(&f16_out)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("q{bits}: max |Δ| vs f16 {err}, bytes {bytes} vs {f16_bytes}");
        assert!(err <= bound, "q{bits}: max |Δ| {err} > {bound}");
        assert!(
            err > last,
            "q{bits}: fewer bits must not be more accurate ({err} vs {last})"
        );
        assert!(bytes < f16_bytes);
        last = err;
    }
}

#[test]
fn pruned_key_channels_score_over_kept_channels_only() {
    // Head 1 keeps 40 of 64 channels: its attention must equal full attention with those 24 channels of q zeroed.
    let keep: Vec<bool> = (0..64).map(|c| c % 8 != 3 && c % 5 != 1).collect();
    let n_kept = keep.iter().filter(|&&k| k).count();
    for dtype in [
        KvDtype::F16,
        KvDtype::F32,
        KvDtype::Kivi {
            bits: 4,
            residual: 32,
        },
    ] {
        let (out, bytes) = run_with(dtype, Some(&keep));
        let (_, full_bytes) = run_with(dtype, None);
        let freed = (64 - n_kept)
            * match dtype {
                KvDtype::F16 => 300usize.div_ceil(32) * 32 * 2,
                KvDtype::F32 => 300usize.div_ceil(32) * 32 * 4,
                _ => 8 * (16 + 4) + 2 * 32 * 2, // 8 quantized blocks of 4-bit codes + (min, scale); 2 f16 blocks
            };
        assert_eq!(full_bytes - bytes, freed, "{dtype:?}");
        // Reference: the same data unpruned, naive attention, q with the pruned channels zeroed for head 1's group.
        let (n_q, _, hd, _, n_new) = CASE;
        let (cache, mut q, q_pos, p) = fixed_case(dtype);
        for t in 0..n_new {
            for h in 3..6 {
                for c in 0..hd {
                    if !keep[c] {
                        q[(t * n_q + h) * hd + c] = 0.0;
                    }
                }
            }
        }
        let want = naive_attention(&cache, 0, &q, &q_pos, &p);
        let err = out
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let tol = tolerance(&cache, &fixed_case(KvDtype::F32).0, &q, &q_pos, &p, None);
        assert!(
            err < tol,
            "{dtype:?}: pruned vs zeroed-q naive max err {err} > {tol}"
        );
    }
}

/// A selection of scattered ranges: whole blocks, parts of blocks, single entries, and the newest entries.
fn scattered(n_heads: usize, len: usize, shift: usize) -> Selection {
    let mut sel = Selection::default();
    sel.reset(n_heads);
    for h in 0..n_heads {
        let o = (h * 7 + shift) % 13;
        sel.add(h, 0, 3);
        sel.add(h, 32 + o, 64 + o);
        sel.add(h, 100 + o, 101 + o);
        sel.add(h, 130, 140 + o);
        sel.add(h, 64, 96);
        sel.add(h, len - 5, len);
    }
    sel.finish();
    sel
}

#[test]
fn selected_attention_equals_naive_over_the_same_entries() {
    for dtype in [
        KvDtype::F16,
        KvDtype::F32,
        KvDtype::Kivi {
            bits: 4,
            residual: 32,
        },
    ] {
        let (cache, q, q_pos, p) = fixed_case(dtype);
        let len = cache.len(0, 0);
        for shift in 0..3 {
            let sel = scattered(2, len, shift);
            let mut out = vec![0.0; q.len()];
            let mut scratch = AttnScratch::default();
            cache.take_read();
            attend_selected(&cache, 0, &q, &q_pos, &mut out, &p, &sel, &mut scratch);
            let read = cache.take_read();
            let want = naive_attention_over(&cache, 0, &q, &q_pos, &p, Some(&sel));
            let err = out
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let exact = fixed_case(KvDtype::F32).0;
            let tol = tolerance(&cache, &exact, &q, &q_pos, &p, Some(&sel));
            assert!(
                err < tol,
                "{dtype:?}: selected vs naive max err {err} > {tol}"
            );
            // Reading fewer entries reads fewer bytes than the dense pass.
            attend(&cache, 0, &q, &q_pos, &mut out, &p, &mut scratch);
            let dense = cache.take_read();
            assert!(
                read > 0 && read < dense / 2,
                "{dtype:?}: read {read} of {dense}"
            );
        }
    }
}

/// A decode row reads the selected part of an f16 block in place (unselected entries masked); more rows gather
/// the selected entries into a tile first. Both equal naive attention over the same entries and count the same
/// bytes, on every SIMD path.
#[test]
fn partly_selected_f16_blocks_read_in_place_match_naive_and_the_gathered_path() {
    let (cache, q, _, p) = fixed_case(KvDtype::F16);
    let (n_q, hd) = (CASE.0, CASE.2);
    let len = cache.len(0, 0);
    let q1 = &q[..n_q * hd]; // 1 × n_q·hd
    let q3: Vec<f32> = q1.iter().cycle().take(3 * q1.len()).copied().collect(); // 3 × n_q·hd
    let at = [len as u32 - 1; 3];
    let mut scratch = AttnScratch::default();
    for shift in 0..3 {
        let sel = scattered(2, len, shift);
        let want = naive_attention_over(&cache, 0, q1, &at[..1], &p, Some(&sel));
        for simd in simd_levels() {
            let mut one = vec![0.0; n_q * hd];
            let mut three = vec![0.0; 3 * n_q * hd];
            cache.take_read();
            attend_impl(
                &cache,
                0,
                q1,
                &at[..1],
                &mut one,
                &p,
                Sel::Heads(&sel),
                simd,
                &mut scratch,
            );
            let read_one = cache.take_read();
            attend_impl(
                &cache,
                0,
                &q3,
                &at,
                &mut three,
                &p,
                Sel::Heads(&sel),
                simd,
                &mut scratch,
            );
            let read_three = cache.take_read();
            let err = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            };
            assert!(
                err(&one) < 1e-4,
                "{simd:?}: in place vs naive max err {}",
                err(&one)
            );
            for t in 0..3 {
                let got = &three[t * n_q * hd..][..n_q * hd];
                assert!(
                    err(got) < 1e-4,
                    "{simd:?}: gathered vs naive max err {}",
                    err(got)
                );
            }
            assert_eq!(
                read_one, read_three,
                "{simd:?}: bytes counted in place and gathered"
            );
        }
    }
}

/// Raw scores q·k of the decode row `q1` over entries `[lo, hi)` of every KV head, as a selector hands them over:
/// in `parts` adjacent parts of about equal length (cut inside blocks, as a split scan cuts).
fn given_scores(
    cache: &KvCache,
    q1: &[f32],
    sel: &mut Selection,
    (lo, hi): (usize, usize),
    parts: usize,
) {
    let (n_q, n_kv, hd) = (CASE.0, CASE.1, CASE.2);
    let g = n_q / n_kv;
    let bt = cache.cfg.block_tokens;
    let mut key = vec![0.0f32; hd];
    for h in 0..n_kv {
        let given = sel.scores_mut(h);
        given.clear();
        for part in 0..parts {
            let (a, b) = (
                lo + (hi - lo) * part / parts,
                lo + (hi - lo) * (part + 1) / parts,
            );
            let mut rows = Vec::new();
            for i in 0..g {
                let qr = &q1[(h * g + i) * hd..][..hd];
                for e in a..b {
                    cache.block(0, h, e / bt).read_key(e % bt, &mut key);
                    let dot: f64 = qr
                        .iter()
                        .zip(&key)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    rows.push(dot as f32);
                }
            }
            given.push_swap(a, b, &mut rows);
        }
    }
}

/// Entries a selector scored for the decode row are folded from its scores, their keys not read: the same output
/// as naive attention over the same entries, fewer bytes read, on every SIMD path; a piece the scores cover only
/// in part (entries 34..64 with scores from 40) reads its keys. Scores that are wrong change the output (they are what the kernel uses).
#[test]
fn given_scores_replace_the_keys_they_score() {
    let (cache, q, _, p) = fixed_case(KvDtype::F16);
    let (n_q, hd) = (CASE.0, CASE.2);
    let len = cache.len(0, 0);
    let q1 = &q[..n_q * hd]; // 1 × n_q·hd
    let at = [len as u32 - 1];
    let mut scratch = AttnScratch::default();
    for (shift, middle, parts) in [
        (0, (16, 290), 1),
        (1, (16, 290), 1),
        (2, (40, 290), 1),
        (0, (16, 290), 3),
        (1, (40, 290), 2),
    ] {
        let mut sel = scattered(2, len, shift);
        let want = naive_attention_over(&cache, 0, q1, &at, &p, Some(&sel));
        for simd in simd_levels() {
            let run = |sel: &Selection, scratch: &mut AttnScratch| {
                let mut out = vec![0.0; n_q * hd];
                cache.take_read();
                attend_impl(
                    &cache,
                    0,
                    q1,
                    &at,
                    &mut out,
                    &p,
                    Sel::Heads(sel),
                    simd,
                    scratch,
                );
                (out, cache.take_read())
            };
            let err = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            };
            sel.forget_scores();
            let (plain, read_plain) = run(&sel, &mut scratch);
            given_scores(&cache, q1, &mut sel, middle, parts);
            assert!(sel.scores(0).is_some() && sel.scores(1).is_some());
            let (given, read_given) = run(&sel, &mut scratch);
            assert!(
                err(&plain) < 1e-4,
                "{simd:?}: keys read: max err {}",
                err(&plain)
            );
            assert!(
                err(&given) < 1e-4,
                "{simd:?}: given scores: max err {}",
                err(&given)
            );
            assert!(
                read_given < read_plain,
                "{simd:?}: {read_given} bytes read with given scores, {read_plain} without"
            );
            // One entry's score raised: the output moves.
            let part = sel
                .scores_mut(0)
                .parts_mut()
                .iter_mut()
                .find(|p| (p.lo..p.hi).contains(&135));
            let part = part.expect("a part holds entry 135");
            let e = 135 - part.lo as usize;
            part.rows[e] += 8.0;
            let (wrong, _) = run(&sel, &mut scratch);
            assert!(
                err(&wrong) > 1e-3,
                "{simd:?}: a changed score left the output as it was"
            );
        }
    }
}

#[test]
fn selecting_everything_is_dense_attention_bit_for_bit() {
    for dtype in [KvDtype::F16, KvDtype::F32] {
        let (cache, q, q_pos, p) = fixed_case(dtype);
        let mut sel = Selection::default();
        sel.reset(2);
        for h in 0..2 {
            sel.add(h, 0, cache.len(0, h));
        }
        sel.finish();
        let mut scratch = AttnScratch::default();
        let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        attend(&cache, 0, &q, &q_pos, &mut a, &p, &mut scratch);
        let dense = cache.take_read();
        attend_selected(&cache, 0, &q, &q_pos, &mut b, &p, &sel, &mut scratch);
        assert_eq!(a, b);
        assert_eq!(cache.take_read(), dense);
    }
}

#[test]
fn selected_attention_on_pruned_channels_matches_naive() {
    let keep: Vec<bool> = (0..64).map(|c| c % 3 != 0).collect();
    let (mut cache, q, q_pos, p) = fixed_case(KvDtype::F16);
    cache.prune_key_channels(0, 1, &keep);
    let sel = scattered(2, cache.len(0, 0), 1);
    let mut out = vec![0.0; q.len()];
    attend_selected(
        &cache,
        0,
        &q,
        &q_pos,
        &mut out,
        &p,
        &sel,
        &mut AttnScratch::default(),
    );
    let want = naive_attention_over(&cache, 0, &q, &q_pos, &p, Some(&sel));
    let err = out
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-4, "pruned selected vs naive max err {err}");
}

/// A 4-bit block whose positions do not ascend (LazyLLM's revival appends old positions after newer ones) is
/// masked entry by entry for a row that sees only part of it, on every SIMD path: the run of whole blocks takes
/// only blocks every row sees in full, judged by the block's largest and smallest positions.
#[test]
fn four_bit_blocks_with_positions_out_of_order_mask_each_entry() {
    let (n_q, hk, bt, len) = (3usize, 64usize, 32usize, 320usize);
    let mut rng = Rng(0x0DD_0DE2);
    let dtype = KvDtype::Kivi {
        bits: 4,
        residual: 32,
    };
    let cfg = KvConfig {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim_k: hk,
        head_dim_v: hk,
        block_tokens: bt,
        dtype,
        windows: Vec::new(),
    };
    let mut cache = KvCache::new(cfg.clone());
    let mut exact = KvCache::new(KvConfig {
        dtype: KvDtype::F32,
        ..cfg
    });
    // Each block holds its 32 positions in descending order: its last entry is its smallest position.
    let pos: Vec<u32> = (0..len)
        .map(|i| (i / bt * bt + bt - 1 - i % bt) as u32)
        .collect();
    let (k, v) = (rng.vec(len * hk, 1.0), rng.vec(len * hk, 1.0));
    cache.append(0, &pos, &k, &v);
    exact.append(0, &pos, &k, &v);
    // One row sees everything, the other positions up to 240: block 7 (224..255) ends a run of four 4-bit blocks
    // and is partly visible to it.
    let q_pos = [240u32, len as u32 - 1];
    let q = rng.vec(q_pos.len() * n_q * hk, 2.0);
    let p = AttnParams {
        n_q_heads: n_q,
        scale: 1.0 / (hk as f32).sqrt(),
        window: None,
        softcap: None,
    };
    // What 4-bit storage itself moves the reference; each path's tolerance as in `tolerance`, for that path.
    let (got, want) = (
        naive_attention(&cache, 0, &q, &q_pos, &p),
        naive_attention(&exact, 0, &q, &q_pos, &p),
    );
    let storage = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |e, (a, b)| e.max((a - b).abs()));
    for (simd, err) in errors_on_every_path(&cache, &q, &q_pos, &p) {
        let tol = if integer_fold(simd, dtype, bt) {
            1e-4f32.max(FOLD_SHARE * storage)
        } else {
            1e-4
        };
        assert!(err < tol, "{simd:?}: max |Δ| {err} > {tol}");
    }
}

/// attend() on every SIMD path this CPU runs against the reference over the cache's own entries: (path, max |Δ|).
fn errors_on_every_path(
    cache: &KvCache,
    q: &[f32],
    q_pos: &[u32],
    p: &AttnParams,
) -> Vec<(Simd, f32)> {
    let want = naive_attention(cache, 0, q, q_pos, p);
    simd_levels()
        .into_iter()
        .map(|simd| {
            let mut out = vec![0.0; want.len()];
            let mut scratch = AttnScratch::default();
            attend_impl(
                cache,
                0,
                q,
                q_pos,
                &mut out,
                p,
                Sel::All,
                simd,
                &mut scratch,
            );
            let err = out
                .iter()
                .zip(&want)
                .fold(0.0f32, |e, (a, b)| e.max((a - b).abs()));
            (simd, err)
        })
        .collect()
}

/// With a sliding window, the blocks wholly before it are left out of the plan by a search over the blocks; a block
/// that ends with an old position (LazyLLM's revival appends them after newer ones) but holds positions inside the
/// window is still read, on every SIMD path and storage.
#[test]
fn a_window_reads_blocks_that_end_with_an_old_position() {
    let (n_q, hk, bt) = (2usize, 16usize, 8usize);
    let mut pos: Vec<u32> = (0..64).collect();
    pos.extend([64, 65, 66, 10, 67, 68, 69, 5, 70, 71, 3, 72, 73, 74, 75, 2]);
    let mut rng = Rng(0x51D3);
    let (k, v) = (rng.vec(pos.len() * hk, 1.0), rng.vec(pos.len() * hk, 1.0));
    let q_pos = [76u32];
    let q = rng.vec(n_q * hk, 2.0);
    let p = AttnParams {
        n_q_heads: n_q,
        scale: 1.0 / (hk as f32).sqrt(),
        window: Some(12),
        softcap: None,
    };
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let mut cache = KvCache::new(KvConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim_k: hk,
            head_dim_v: hk,
            block_tokens: bt,
            dtype,
            windows: Vec::new(),
        });
        cache.append(0, &pos, &k, &v);
        for (simd, err) in errors_on_every_path(&cache, &q, &q_pos, &p) {
            assert!(err < 1e-4, "{dtype:?} {simd:?}: max |Δ| {err}");
        }
    }
}
