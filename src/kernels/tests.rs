//! Kernel tests. Weights are random *valid blocks* built byte by byte (every bit pattern of values,
//! scales and mins), decoded by an independent f64 reference written from ggml's block definitions.
//! Activations are quantized by an independent reference of ggml's x86 quantizers.

use super::act::{self, ActRow};
use super::layout::Kind;
use super::*;
use half::{bf16, f16};

// ------------------------------------------------------------------------------------------------
// Deterministic random numbers.

use crate::testutil::Rng;

/// Roughly normal, with occasional outliers like real activations.
fn act(rng: &mut Rng) -> f32 {
    let v = (rng.uniform() + rng.uniform() + rng.uniform()) * 0.8;
    if rng.next_u64().is_multiple_of(61) {
        v * 12.0
    } else {
        v
    }
}

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

const ALL: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Random valid GGUF bytes for a rows × cols tensor.
fn random_tensor(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let (bs, bb) = ty.block_layout().unwrap();
    let mut out = Vec::with_capacity(rows * cols / bs * bb);
    for _ in 0..rows * cols / bs {
        let mut b = vec![0u8; bb];
        for x in b.iter_mut() {
            *x = rng.byte();
        }
        // Scales: plausible magnitudes (random bytes would give huge or NaN f16 values).
        let d = 0.004 + 0.02 * rng.uniform().abs();
        match ty {
            GgmlType::F32 => b.copy_from_slice(&(rng.uniform() * 0.1).to_le_bytes()),
            GgmlType::F16 => b.copy_from_slice(&h(rng.uniform() * 0.1)),
            GgmlType::BF16 => {
                b.copy_from_slice(&bf16::from_f32(rng.uniform() * 0.1).to_bits().to_le_bytes())
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                let s = if rng.next_u64().is_multiple_of(2) {
                    d
                } else {
                    -d
                };
                b[0..2].copy_from_slice(&h(s));
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                b[0..2].copy_from_slice(&h(d));
                b[2..4].copy_from_slice(&h(-8.0 * d * (0.5 + rng.uniform().abs())));
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                b[0..2].copy_from_slice(&h(d / 40.0));
                b[2..4].copy_from_slice(&h(d / 60.0));
            }
            GgmlType::Q6K => {
                b[208..210].copy_from_slice(&h(d / 100.0));
            }
            _ => unreachable!(),
        }
        out.extend_from_slice(&b);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Independent f64 reference decoding of GGUF blocks.

fn f16at(b: &[u8], o: usize) -> f64 {
    f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f64()
}

/// One row decoded: values and, for Q4_1/Q5_1, the block min of each element (else 0).
fn ref_decode_row(ty: GgmlType, row: &[u8], cols: usize) -> (Vec<f64>, Vec<f64>) {
    let (bs, bb) = ty.block_layout().unwrap();
    let mut v = vec![0f64; cols];
    let mut mins = vec![0f64; cols];
    for blk in 0..cols / bs {
        let b = &row[blk * bb..(blk + 1) * bb];
        let o = blk * bs;
        match ty {
            GgmlType::F32 => v[o] = f32::from_le_bytes(b.try_into().unwrap()) as f64,
            GgmlType::F16 => v[o] = f16at(b, 0),
            GgmlType::BF16 => v[o] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
                let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
                let d = f16at(b, 0);
                let m = if min { f16at(b, 2) } else { 0.0 };
                let mut p = if min { 4 } else { 2 };
                let qh = if five {
                    let q = u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
                    p += 4;
                    q
                } else {
                    0
                };
                for e in 0..32 {
                    let byte = b[p + e % 16];
                    let mut q = if e < 16 { byte & 15 } else { byte >> 4 } as i32;
                    q |= (((qh >> e) & 1) as i32) << 4;
                    let off = match (min, five) {
                        (true, _) => 0,
                        (false, false) => 8,
                        (false, true) => 16,
                    };
                    v[o + e] = d * (q - off) as f64 + m;
                    mins[o + e] = m;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16at(b, 0);
                for e in 0..32 {
                    v[o + e] = d * (b[2 + e] as i8) as f64;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let five = ty == GgmlType::Q5K;
                let (d, dmin) = (f16at(b, 0), f16at(b, 2));
                let sc = &b[4..16];
                let qh = &b[16..48];
                let qs = if five { &b[48..176] } else { &b[16..144] };
                for e in 0..256 {
                    let (chunk, upper, l, sub) = (e / 64, (e % 64) >= 32, e % 32, e / 32);
                    let byte = qs[32 * chunk + l];
                    let mut q = if upper { byte >> 4 } else { byte & 15 } as i32;
                    if five {
                        q += (((qh[l] >> (2 * chunk + upper as usize)) & 1) as i32) * 16;
                    }
                    let (s, m) = if sub < 4 {
                        (sc[sub] & 63, sc[sub + 4] & 63)
                    } else {
                        (
                            (sc[sub + 4] & 15) | ((sc[sub - 4] >> 6) << 4),
                            (sc[sub + 4] >> 4) | ((sc[sub] >> 6) << 4),
                        )
                    };
                    v[o + e] = d * s as f64 * q as f64 - dmin * m as f64;
                }
            }
            GgmlType::Q6K => {
                let d = f16at(b, 208);
                for e in 0..256 {
                    let (half, w) = (e / 128, e % 128);
                    let (quarter, l) = (w / 32, w % 32);
                    let byte = b[half * 64 + (quarter % 2) * 32 + l];
                    let nib = if quarter < 2 { byte & 15 } else { byte >> 4 };
                    let hi = (b[128 + half * 32 + l] >> (2 * quarter)) & 3;
                    let q = (nib | (hi << 4)) as i32 - 32;
                    v[o + e] = d * (b[192 + e / 16] as i8) as f64 * q as f64;
                }
            }
            _ => unreachable!(),
        }
    }
    (v, mins)
}

// ------------------------------------------------------------------------------------------------
// Independent reference of ggml's activation quantizers (x86 build for Q8_0/Q8_1, reference Q8_K).

struct RefAct {
    /// Dequantized activations (q * d, d as the dot product uses it).
    a: Vec<f64>,
    q: Vec<i8>,
    /// Per block: d used in the dot (f16-rounded for Q8_0/Q8_1, f32 for Q8_K).
    d: Vec<f32>,
    /// Per block: sum of q (32-blocks) / per 16: bsums (Q8_K).
    sums: Vec<i32>,
    /// Q8_1: f16(d * sum) per block.
    s: Vec<f32>,
    /// Per block: the quantization step bound used by the loose tolerance (|a - x| <= err per element).
    err: Vec<f64>,
}

fn ref_quant(kind_ty: GgmlType, x: &[f32]) -> RefAct {
    let n = x.len();
    let mut r = RefAct {
        a: vec![0.0; n],
        q: vec![0; n],
        d: vec![],
        sums: vec![],
        s: vec![],
        err: vec![0.0; n],
    };
    match kind_ty {
        GgmlType::F32 => {
            for i in 0..n {
                r.a[i] = x[i] as f64;
                r.err[i] = 0.0;
            }
        }
        GgmlType::F16 => {
            for i in 0..n {
                r.a[i] = f16::from_f32(x[i]).to_f64();
                r.err[i] = x[i].abs() as f64 / 2048.0;
            }
        }
        GgmlType::BF16 => {
            for i in 0..n {
                r.a[i] = bf16::from_f32(x[i]).to_f64();
                r.err[i] = x[i].abs() as f64 / 256.0;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            for blk in x.chunks(256).enumerate() {
                let (b, xs) = blk;
                let mut max = 0f32;
                for &v in xs {
                    if v.abs() > max.abs() {
                        max = v;
                    }
                }
                let (iscale, d) = if max == 0.0 {
                    (0.0, 0.0)
                } else {
                    (-127.0 / max, 1.0 / (-127.0 / max))
                };
                for (i, &v) in xs.iter().enumerate() {
                    // nearest_int: add 1.5*2^23 in f32 (round half to even), read back the integer.
                    let t = iscale * v + 12582912.0f32;
                    let qi = ((t.to_bits() & 0x007fffff) as i32 - 0x00400000).min(127);
                    r.q[b * 256 + i] = qi as i8;
                    r.a[b * 256 + i] = qi as f64 * d as f64;
                    r.err[b * 256 + i] = 0.51 * (max.abs() as f64 / 127.0);
                }
                r.d.push(d);
                for k in 0..16 {
                    r.sums.push(
                        r.q[b * 256 + 16 * k..b * 256 + 16 * k + 16]
                            .iter()
                            .map(|&q| q as i32)
                            .sum(),
                    );
                }
            }
        }
        _ => {
            for (b, xs) in x.chunks(32).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let d16 = f16::from_f32(d).to_f32();
                let mut sum = 0;
                for (i, &v) in xs.iter().enumerate() {
                    let p = v * id;
                    // round half to even, written out
                    let fl = p.floor();
                    let diff = p - fl;
                    let qi = if diff > 0.5 || (diff == 0.5 && (fl as i32) % 2 != 0) {
                        fl as i32 + 1
                    } else {
                        fl as i32
                    };
                    r.q[b * 32 + i] = qi as i8;
                    r.a[b * 32 + i] = qi as f64 * d16 as f64;
                    // |q*d16 - x| <= d/2 + 127*|d16 - d| <= d*(0.5 + 127/2048)
                    r.err[b * 32 + i] = 0.57 * d as f64;
                    sum += qi;
                }
                r.d.push(d16);
                r.sums.push(sum);
                r.s.push(f16::from_f32(d * sum as f32).to_f32());
            }
        }
    }
    r
}

/// (reference dot with quantized activations, norm = sum of |terms|, loose bound vs f32 activations,
///  reference dot with f32 activations)
fn ref_dot(ty: GgmlType, w: &[f64], mins: &[f64], ra: &RefAct, x: &[f32]) -> (f64, f64, f64, f64) {
    let mut dot = 0.0;
    let mut norm = 0.0;
    let mut bound = 0.0;
    let mut exact = 0.0;
    let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    for c in 0..w.len() {
        exact += w[c] * x[c] as f64;
        if min {
            // llama.cpp: d_w*d_a*sum(q_w*q_a) + m*s, s = f16(d_a*sum(q_a)) per block.
            let dq = w[c] - mins[c];
            dot += dq * ra.a[c];
            norm += (dq * ra.a[c]).abs();
            bound += (dq.abs() + mins[c].abs()) * ra.err[c];
            if c % 32 == 0 {
                let s = ra.s[c / 32] as f64;
                dot += mins[c] * s;
                norm += (mins[c] * s).abs();
            }
        } else {
            dot += w[c] * ra.a[c];
            norm += (w[c] * ra.a[c]).abs();
            bound += w[c].abs() * ra.err[c];
        }
    }
    (dot, norm, bound, exact)
}

fn kind_of(ty: GgmlType) -> Kind {
    Kind::from_type(ty).unwrap()
}

fn block_cols(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
        _ => 32,
    }
}

fn run_k(k: Kernel, w: &QMatrix, x: &[f32], n_tok: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n_tok * w.rows];
    let mut s = MatmulScratch::default();
    matmul_with(k, w, x, n_tok, &mut y, &mut s);
    y
}

struct Case {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    w: QMatrix,
    x: Vec<f32>,
    n_tok: usize,
    /// Per (t, r): (dot vs quantized activations, norm, loose bound, dot vs f32 activations).
    refs: Vec<(f64, f64, f64, f64)>,
}

fn case(ty: GgmlType, rows: usize, cols: usize, n_tok: usize, seed: u64) -> Case {
    let mut rng = Rng::seeded(seed);
    let raw = random_tensor(ty, rows, cols, &mut rng);
    let w = QMatrix::from_gguf(ty, rows, cols, &raw).unwrap();
    let x: Vec<f32> = (0..n_tok * cols).map(|_| act(&mut rng)).collect();
    let row_bytes = raw.len() / rows;
    let dec: Vec<(Vec<f64>, Vec<f64>)> = (0..rows)
        .map(|r| ref_decode_row(ty, &raw[r * row_bytes..(r + 1) * row_bytes], cols))
        .collect();
    let mut refs = vec![];
    for t in 0..n_tok {
        let xt = &x[t * cols..(t + 1) * cols];
        let ra = ref_quant(ty, xt);
        for (wv, mins) in &dec {
            refs.push(ref_dot(ty, wv, mins, &ra, xt));
        }
    }
    Case {
        ty,
        rows,
        cols,
        w,
        x,
        n_tok,
        refs,
    }
}

fn check_against_ref(c: &Case, k: Kernel, y: &[f32], what: &str) {
    for t in 0..c.n_tok {
        for r in 0..c.rows {
            let (dot, norm, _, _) = c.refs[t * c.rows + r];
            let got = y[t * c.rows + r] as f64;
            let tol = 1e-5 * norm + 1e-30;
            assert!(
                (got - dot).abs() <= tol,
                "{} {what} kernel {:?} {}x{} tok {t} row {r}: got {got}, reference {dot} (norm {norm})",
                c.ty,
                k,
                c.rows,
                c.cols,
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// (a) dequantize_row against the f64 reference decode.

#[test]
fn dequantize_row_matches_reference_decode() {
    for (i, &ty) in ALL.iter().enumerate() {
        let cols = 2 * block_cols(ty).max(32) * if block_cols(ty) == 256 { 1 } else { 4 };
        let rows = 37;
        let mut rng = Rng::seeded(100 + i as u64);
        let raw = random_tensor(ty, rows, cols, &mut rng);
        let w = QMatrix::from_gguf(ty, rows, cols, &raw).unwrap();
        let rb = raw.len() / rows;
        let mut out = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut out);
            let (want, _) = ref_decode_row(ty, &raw[r * rb..(r + 1) * rb], cols);
            for c in 0..cols {
                // ggml computes these in f32: a couple of roundings of the result's magnitude.
                let tol = 4.0 * f32::EPSILON as f64 * (want[c].abs() + 1e-3);
                assert!(
                    (out[c] as f64 - want[c]).abs() <= tol,
                    "{ty} row {r} col {c}: dequantized {} vs reference {}",
                    out[c],
                    want[c]
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Activation quantization: bit-identical to the reference (scalar and SIMD quantizers).

#[test]
fn activation_quantization_matches_ggml() {
    let cols = 512;
    let mut rng = Rng::seeded(7);
    let mut x: Vec<f32> = (0..cols).map(|_| act(&mut rng)).collect();
    // An all-zero block and exact ties (amax = 127 makes the scale exactly 1): 2.5 -> 2, -3.5 -> -4.
    x[32..64].fill(0.0);
    // Q8_K: the first value of largest magnitude decides the sign (-127 before +127: iscale = +1).
    x[3] = -127.0;
    x[64] = 127.0;
    x[65] = 2.5;
    x[66] = -3.5;
    x[67] = 0.5;
    x[68] = 1.5;
    x[256..512].fill(0.0);
    for &ty in &[
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let kind = kind_of(ty);
        let ra = ref_quant(ty, &x);
        let (nq, n1, n2, ni, nx) = act::act_sizes(kind, cols);
        for simd in [false, true] {
            let (mut qa, mut f1, mut f2, mut i1, mut fx) = (
                vec![0i8; nq],
                vec![0f32; n1],
                vec![0f32; n2],
                vec![0i32; ni],
                vec![0f32; nx],
            );
            act::quantize_row(
                kind,
                &x,
                ActRow {
                    qa: &mut qa,
                    f1: &mut f1,
                    f2: &mut f2,
                    i1: &mut i1,
                    fx: &mut fx,
                },
                simd,
            );
            assert_eq!(qa, ra.q, "{ty} simd={simd}: quantized values");
            for b in 0..n1 {
                assert_eq!(
                    f1[b].to_bits(),
                    ra.d[b].to_bits(),
                    "{ty} simd={simd}: d of block {b}"
                );
            }
            match kind {
                Kind::Q4K => {
                    for b in 0..n1 {
                        for j in 0..8 {
                            let want = ra.d[b]
                                * (ra.sums[b * 16 + 2 * j] + ra.sums[b * 16 + 2 * j + 1]) as f32;
                            assert_eq!(f2[b * 8 + j], want, "{ty}: d*bsum32");
                        }
                    }
                }
                Kind::Q6K => {
                    for k in 0..ni {
                        assert_eq!(i1[k], -32 * ra.sums[k], "{ty}: -32*bsum16");
                    }
                }
                Kind::Q4_1 => {
                    for b in 0..n1 {
                        assert_eq!(
                            f2[b].to_bits(),
                            ra.s[b].to_bits(),
                            "{ty} simd={simd}: s of block {b}"
                        );
                        assert_eq!(i1[b], 0);
                    }
                }
                _ => {
                    let off = match kind {
                        Kind::Q4_0 => 8,
                        Kind::Q5_0 => 16,
                        _ => 128,
                    };
                    for b in 0..n1 {
                        assert_eq!(i1[b], -off * ra.sums[b], "{ty}: block sum");
                    }
                }
            }
            assert_eq!(
                &qa[64..69],
                &[127, 2, -4, 0, 2],
                "{ty}: ties round half to even"
            );
            assert_eq!(qa[3], -127);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// (b) + (c): every implementation against the f64 references.

#[test]
fn dot_products_match_reference_all_types_all_kernels() {
    for (i, &ty) in ALL.iter().enumerate() {
        let cols = if block_cols(ty) == 256 { 512 } else { 320 };
        let c = case(ty, 35, cols, 5, 1000 + i as u64);
        for k in available() {
            let y = run_k(k, &c.w, &c.x, c.n_tok);
            // (b) tight: same quantized activations, only f32 summation order differs.
            check_against_ref(&c, k, &y, "quantized-activation reference");
            // (c) loose: against the f32 activations. The 8-bit activation quantization moves each
            // value by up to half a step (amax/254 per block, plus the f16 rounding of the scale), so
            // the result may differ by sum(|w| * step/2); this is the bound we check, not a fudge factor.
            for t in 0..c.n_tok {
                for r in 0..c.rows {
                    let (_, norm, bound, exact) = c.refs[t * c.rows + r];
                    let got = y[t * c.rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-5 * norm + 1e-30,
                        "{ty} kernel {k:?} tok {t} row {r}: {got} vs f32-activation dot {exact} (bound {bound})"
                    );
                }
            }
        }
    }
}

/// The loose check can fail: activations that were not quantized the way the kernel assumes (here:
/// a reference built from a shifted activation row) are caught.
#[test]
fn reference_check_detects_wrong_results() {
    let c = case(GgmlType::Q4_1, 16, 64, 1, 5);
    let y = run_k(Kernel::Scalar, &c.w, &c.x, 1);
    let bad: Vec<f32> = y.iter().map(|v| v * 1.001 + 1e-3).collect();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_against_ref(&c, Kernel::Scalar, &bad, "perturbed")
    }));
    assert!(r.is_err(), "a 0.1% error must be detected");
}

// ------------------------------------------------------------------------------------------------
// (c2) a token's result does not depend on the tile it falls in: batched decoding (several sequences' rows in one
// product) gives each sequence exactly what its own one-row product gives.

#[test]
fn each_row_of_a_small_batch_equals_that_row_alone_bit_for_bit() {
    for (i, &ty) in ALL.iter().enumerate() {
        let cols = if block_cols(ty) == 256 { 256 } else { 96 };
        let c = case(ty, 33, cols, 9, 7000 + i as u64);
        for k in available() {
            let alone: Vec<Vec<f32>> = (0..9)
                .map(|t| run_k(k, &c.w, &c.x[t * cols..(t + 1) * cols], 1))
                .collect();
            for n in 2..=9 {
                let y = run_k(k, &c.w, &c.x[..n * cols], n);
                for (t, want) in alone[..n].iter().enumerate() {
                    assert!(
                        &y[t * 33..(t + 1) * 33] == want.as_slice(),
                        "{ty} kernel {k:?}: row {t} of a batch of {n} differs from the row alone"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// (d) odd shapes: matmul == per-row reference dots, SIMD == scalar.

#[test]
fn matmul_odd_shapes_all_types() {
    for (i, &ty) in ALL.iter().enumerate() {
        let cols = if block_cols(ty) == 256 { 256 } else { 96 };
        for &rows in &[1usize, 7, 33] {
            for &n_tok in &[1usize, 3, 17] {
                let c = case(ty, rows, cols, n_tok, (i * 100 + rows * 10 + n_tok) as u64);
                let ys = run_k(Kernel::Scalar, &c.w, &c.x, n_tok);
                check_against_ref(&c, Kernel::Scalar, &ys, "odd shape");
                for k in available() {
                    let y = run_k(k, &c.w, &c.x, n_tok);
                    check_against_ref(&c, k, &y, "odd shape");
                    for j in 0..y.len() {
                        let norm = c.refs[j].1;
                        assert!(
                            ((y[j] - ys[j]) as f64).abs() <= 1e-5 * norm + 1e-30,
                            "{ty} {rows}x{cols} n_tok {n_tok} kernel {k:?}: {} vs scalar {} at {j}",
                            y[j],
                            ys[j]
                        );
                    }
                }
                // The public entry point (default kernel) gives the same.
                let mut y = vec![0f32; n_tok * rows];
                matmul(&c.w, &c.x, n_tok, &mut y, &mut MatmulScratch::default());
                check_against_ref(&c, kernel(), &y, "public matmul");
            }
        }
    }
}

/// Shapes big enough for the parallel path (row-group chunks and token chunks), reusing one scratch
/// across calls of different types and sizes.
#[test]
fn matmul_parallel_split_and_scratch_reuse() {
    let mut s = MatmulScratch::default();
    for (i, &(ty, rows, cols, n_tok)) in [
        (GgmlType::Q4_1, 300, 576, 40),
        (GgmlType::Q8_0, 130, 256, 1),
        (GgmlType::Q6K, 40, 768, 21),
        (GgmlType::Q4K, 520, 256, 2),
        (GgmlType::Q5_0, 48, 640, 70),
        (GgmlType::F16, 70, 200, 9),
    ]
    .iter()
    .enumerate()
    {
        let c = case(ty, rows, cols, n_tok, 50 + i as u64);
        for k in available() {
            let mut y = vec![f32::NAN; n_tok * rows];
            matmul_with(k, &c.w, &c.x, n_tok, &mut y, &mut s);
            check_against_ref(&c, k, &y, "parallel");
        }
    }
    // After warm-up the buffers are reused, not reallocated.
    let c = case(GgmlType::Q4_1, 64, 576, 40, 9);
    let mut y = vec![0f32; 40 * 64];
    matmul(&c.w, &c.x, 40, &mut y, &mut s);
    let ptrs = |s: &MatmulScratch| {
        let a = &s.sets[0];
        (
            a.qa.as_ptr(),
            a.f1.as_ptr(),
            a.f2.as_ptr(),
            a.i1.as_ptr(),
            a.qa.capacity(),
        )
    };
    let before = ptrs(&s);
    matmul(&c.w, &c.x, 40, &mut y, &mut s);
    matmul(&c.w, &c.x[..576], 1, &mut y[..64], &mut s);
    assert_eq!(before, ptrs(&s));
}

/// Several matrices of one input in one call (Q, K, V; gate, up) give the separate products bit for bit, whether
/// their kinds are equal or mixed, on every kernel, serial and split over a pool.
#[test]
fn matmul_many_equals_separate_products_bit_for_bit() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("pool");
    for (i, kinds) in [
        [GgmlType::Q4_1, GgmlType::Q4_1, GgmlType::Q4_1],
        [GgmlType::Q4K, GgmlType::Q4K, GgmlType::Q6K],
        [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q8_0],
    ]
    .iter()
    .enumerate()
    {
        let cols = 512;
        for n_tok in [1usize, 2, 40] {
            let cases: Vec<_> = kinds
                .iter()
                .zip([384usize, 128, 200])
                .enumerate()
                .map(|(m, (&ty, rows))| case(ty, rows, cols, n_tok, 700 + (i * 10 + m) as u64))
                .collect();
            let x = &cases[0].x; // one input for all
            for k in available() {
                for threads in [1usize, 3] {
                    let go = || {
                        let mut s = MatmulScratch::default();
                        let sep: Vec<Vec<f32>> = cases
                            .iter()
                            .map(|c| {
                                let mut y = vec![f32::NAN; n_tok * c.w.rows];
                                matmul_with(k, &c.w, x, n_tok, &mut y, &mut s);
                                y
                            })
                            .collect();
                        let mut outs: Vec<Vec<f32>> = cases
                            .iter()
                            .map(|c| vec![f32::NAN; n_tok * c.w.rows])
                            .collect();
                        let ws: Vec<&QMatrix> = cases.iter().map(|c| &c.w).collect();
                        let mut ys: Vec<&mut [f32]> =
                            outs.iter_mut().map(|v| v.as_mut_slice()).collect();
                        matmul_many_with(k, &ws, x, n_tok, &mut ys, &mut s);
                        for (m, (a, b)) in sep.iter().zip(&outs).enumerate() {
                            assert!(
                                a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                                "{kinds:?} matrix {m}, {n_tok} tokens, {k:?}, {threads} threads"
                            );
                        }
                    };
                    if threads == 1 {
                        go();
                    } else {
                        pool.install(go);
                    }
                }
            }
        }
    }
}

#[test]
fn zero_tokens_is_a_no_op() {
    let c = case(GgmlType::Q8_0, 16, 64, 1, 3);
    let mut y: Vec<f32> = vec![];
    matmul(&c.w, &[], 0, &mut y, &mut MatmulScratch::default());
}

// ------------------------------------------------------------------------------------------------
// Against llama.cpp itself: testdata/llamacpp_dots.fixture holds random valid blocks of every type, random
// activations and llama.cpp's results (its own activation quantizer + vec_dot, through ctypes; see
// testdata/make_llamacpp_fixture.py). Both our kernels and this file's reference must agree with it up to
// f32 summation order.

#[test]
fn matches_llama_cpp_fixture() {
    let b: &[u8] = include_bytes!("testdata/llamacpp_dots.fixture");
    let mut o = 0usize;
    let mut take = |n: usize| {
        o += n;
        &b[o - n..o]
    };
    let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap()) as usize;
    let f32s = |s: &[u8]| {
        s.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let n = u32::from_le_bytes(take(4).try_into().unwrap());
    let mut seen = vec![];
    for _ in 0..n {
        let ty = GgmlType::from_u32(u32::from_le_bytes(take(4).try_into().unwrap()));
        let (rows, cols, n_tok, wl) = (u64_(take(8)), u64_(take(8)), u64_(take(8)), u64_(take(8)));
        let raw = take(wl).to_vec();
        let x = f32s(take(n_tok * cols * 4));
        let want = f32s(take(n_tok * rows * 4));
        seen.push(ty);
        let w = QMatrix::from_gguf(ty, rows, cols, &raw).unwrap();
        let rb = raw.len() / rows;
        for t in 0..n_tok {
            let xt = &x[t * cols..(t + 1) * cols];
            let ra = ref_quant(ty, xt);
            for r in 0..rows {
                let (wv, mins) = ref_decode_row(ty, &raw[r * rb..(r + 1) * rb], cols);
                let (dot, norm, _, _) = ref_dot(ty, &wv, &mins, &ra, xt);
                let l = want[t * rows + r] as f64;
                assert!(
                    (dot - l).abs() <= 1e-5 * norm + 1e-30,
                    "{ty} reference {dot} vs llama.cpp {l}"
                );
            }
        }
        for k in available() {
            let y = run_k(k, &w, &x, n_tok);
            for t in 0..n_tok {
                let ra = ref_quant(ty, &x[t * cols..(t + 1) * cols]);
                for r in 0..rows {
                    let (wv, mins) = ref_decode_row(ty, &raw[r * rb..(r + 1) * rb], cols);
                    let norm = ref_dot(ty, &wv, &mins, &ra, &x[t * cols..(t + 1) * cols]).1;
                    let (got, l) = (y[t * rows + r] as f64, want[t * rows + r] as f64);
                    assert!(
                        (got - l).abs() <= 1e-5 * norm + 1e-30,
                        "{ty} kernel {k:?} tok {t} row {r}: {got} vs llama.cpp {l} (norm {norm})"
                    );
                }
            }
        }
    }
    assert_eq!(o, b.len());
    for ty in ALL {
        assert!(seen.contains(&ty), "fixture lacks {ty}");
    }
}

// ------------------------------------------------------------------------------------------------
// Errors.

#[test]
fn unsupported_types_and_bad_sizes_are_errors() {
    for ty in [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q8_1,
        GgmlType::Q8K,
        GgmlType::Other(99),
    ] {
        let err = QMatrix::from_gguf(ty, 4, 256, &vec![0u8; 4096])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&ty.to_string()),
            "error should name the type: {err}"
        );
    }
    // Wrong byte count.
    let err = QMatrix::from_gguf(GgmlType::Q4_0, 4, 64, &[0u8; 143])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q4_0") && err.contains("144") && err.contains("143"),
        "{err}"
    );
    // Row not a whole number of blocks.
    let err = QMatrix::from_gguf(GgmlType::Q4K, 2, 300, &[0u8; 288])
        .unwrap_err()
        .to_string();
    assert!(err.contains("Q4_K"), "{err}");
    // Empty, overflow.
    assert!(QMatrix::from_gguf(GgmlType::F32, 0, 4, &[]).is_err());
    assert!(QMatrix::from_gguf(GgmlType::F32, usize::MAX / 2, 4, &[0u8; 16]).is_err());
    // Valid sizes work.
    assert!(QMatrix::from_gguf(GgmlType::Q4_0, 4, 64, &[0u8; 144]).is_ok());
}

// ------------------------------------------------------------------------------------------------
// f16 conversions and kernel selection.

#[test]
fn f16_conversions_match_half() {
    let mut rng = Rng::seeded(11);
    let mut xs: Vec<f32> = (0..1000).map(|_| rng.uniform() * 70000.0).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-8,
        -6e-8,
        65504.0,
        65520.0,
        1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 2048.0,
    ]);
    xs.extend((0..100).map(|_| rng.uniform() * 1e-5));
    let mut hb = vec![0u16; xs.len()];
    f32_to_f16_slice(&xs, &mut hb);
    for (x, b) in xs.iter().zip(&hb) {
        assert_eq!(*b, f16::from_f32(*x).to_bits(), "f32 -> f16 of {x}");
    }
    let mut all: Vec<u16> = (0..=u16::MAX).collect();
    all.push(0x3c00);
    let mut back = vec![0f32; all.len()];
    f16_to_f32_slice(&all, &mut back);
    for (b, v) in all.iter().zip(&back) {
        let want = f16::from_bits(*b).to_f32();
        assert!(
            want.to_bits() == v.to_bits() || (want.is_nan() && v.is_nan()),
            "f16 {b:#x}"
        );
    }
    let mut nan = [0u16; 1];
    f32_to_f16_slice(&[f32::NAN], &mut nan);
    assert!(f16::from_bits(nan[0]).is_nan());
}

#[test]
fn kernel_selection() {
    assert_eq!(select_kernel(Some("scalar")), Kernel::Scalar);
    assert_eq!(select_kernel(Some(" SCALAR ")), Kernel::Scalar);
    let best = select_kernel(None);
    assert_eq!(select_kernel(Some("nonsense")), best);
    if has_avx2() {
        assert_eq!(select_kernel(Some("avx2")), Kernel::Avx2);
    }
    if has_avx512() {
        assert_eq!(select_kernel(Some("avx512vnni")), Kernel::Avx512);
        assert_eq!(best, Kernel::Avx512);
    }
    assert!(["avx512vnni", "avx2", "scalar"].contains(&kernel_name()));
}

// ------------------------------------------------------------------------------------------------
// Speed check, by hand:
//   cargo test --release --lib kernels::tests::speed -- --ignored --nocapture
// (RAYON_NUM_THREADS / HAYLOFT_KERNEL apply.)

#[test]
#[ignore]
fn speed_smollm2_shapes() {
    let l = 30;
    // SmolLM2-135M: (rows, cols, type, count per token)
    let smollm2 = [
        (576, 576, GgmlType::Q4_1, 2 * l),  // q, o
        (192, 576, GgmlType::Q4_1, 2 * l),  // k, v
        (1536, 576, GgmlType::Q4_1, 2 * l), // gate, up
        (576, 1536, GgmlType::Q4_1, l),     // down
        (49152, 576, GgmlType::Q8_0, 1),    // output (tied embedding)
    ];
    // Gemma-3-270M layers (18): 640-column tensors cannot be K-quants (640 % 256 != 0); the
    // 262144x640 Q8_0 output is left out here (178 MB).
    let g = 18;
    let gemma = [
        (1024, 640, GgmlType::Q5_0, g),     // q
        (256, 640, GgmlType::Q5_0, 2 * g),  // k, v
        (640, 1024, GgmlType::Q4K, g),      // o
        (2048, 640, GgmlType::Q5_0, 2 * g), // gate, up
        (640, 2048, GgmlType::Q6K, g),      // down
    ];
    println!(
        "kernel {} threads {}",
        kernel_name(),
        rayon::current_num_threads()
    );
    println!("-- SmolLM2-135M, called from outside the rayon pool:");
    speed_run(&smollm2);
    println!("-- SmolLM2-135M, called from a rayon worker (forward pass run inside the pool):");
    rayon::scope(|_| speed_run(&smollm2));
    println!("-- Gemma-3-270M layers (no output matrix), from a rayon worker:");
    rayon::scope(|_| speed_run(&gemma));
}

fn speed_run(shapes: &[(usize, usize, GgmlType, usize)]) {
    let mut rng = Rng::seeded(1);
    let mut s = MatmulScratch::default();
    for &n_tok in &[1usize, 256] {
        let mut total_t = 0f64;
        let mut total_flop = 0f64;
        for &(rows, cols, ty, count) in shapes {
            let raw = random_tensor(ty, rows, cols, &mut rng);
            let w = QMatrix::from_gguf(ty, rows, cols, &raw).unwrap();
            let x: Vec<f32> = (0..n_tok * cols).map(|_| act(&mut rng)).collect();
            let mut y = vec![0f32; n_tok * rows];
            matmul(&w, &x, n_tok, &mut y, &mut s);
            let reps = ((2e8 / (rows * cols * n_tok) as f64) as usize).clamp(3, 2000);
            // Best of 3 runs: the machine is shared.
            let mut dt = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    matmul(&w, &x, n_tok, &mut y, &mut s);
                }
                dt = dt.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            let flop = 2.0 * (rows * cols * n_tok) as f64;
            println!(
                "n_tok {n_tok:4} {ty} {rows:5}x{cols:4}: {:9.1} us  {:7.1} GFLOP/s  {:7.2} GB/s weights",
                dt * 1e6,
                flop / dt / 1e9,
                w.n_bytes() as f64 / dt / 1e9
            );
            total_t += dt * count as f64;
            total_flop += flop * count as f64;
        }
        println!(
            "n_tok {n_tok}: all matmuls {:.2} ms per batch, {:.1} GFLOP/s, {:.1} tok/s equivalent",
            total_t * 1e3,
            total_flop / total_t / 1e9,
            n_tok as f64 / total_t
        );
    }
}

/// A loader lets the file's pages go slab by slab as the repack reads them; the packed matrix must not depend on
/// the slab size, and the slabs reported done must cover the source once, in order.
#[test]
fn repack_by_slabs_equals_one_pass_and_reports_every_byte_once() {
    let mut rng = Rng::seeded(41);
    for ty in ALL {
        // 37 rows: two whole row groups and a partial one.
        let (rows, cols) = (37, 512);
        let raw = random_tensor(ty, rows, cols, &mut rng);
        let kind = kind_of(ty);
        let bb = ty.block_layout().unwrap().1;
        let whole = layout::repack_slabs(kind, rows, cols, bb, &raw, usize::MAX, &mut |_| {});
        for slab in [1, raw.len() / 3, raw.len() - 1] {
            let mut seen = Vec::new();
            let packed =
                layout::repack_slabs(kind, rows, cols, bb, &raw, slab, &mut |r| seen.push(r));
            assert!(
                packed.as_slice() == whole.as_slice(),
                "{ty}: slab {slab} packs differently"
            );
            assert!(seen.len() > 1, "{ty}: slab {slab} gave one range");
            let mut at = 0;
            for r in &seen {
                assert_eq!(r.start, at, "{ty}: slab {slab}: ranges {seen:?}");
                assert!(r.end > r.start, "{ty}: slab {slab}: ranges {seen:?}");
                at = r.end;
            }
            assert_eq!(at, raw.len(), "{ty}: slab {slab}: ranges {seen:?}");
        }
    }
}
