//! Elementwise math of the forward pass, written so LLVM vectorizes it: e^x for x ≤ 0 ([`exp_neg`], shared with
//! attention's softmax), SiLU and tanh-GELU built on it, and the gated feed-forward's `act(gate) ⊙ up` over a chunk
//! ([`gate_mul`]), compiled for AVX-512 and AVX2 beside the portable build and split over the pool for prefill chunks.
//!
//! The transcendental calls of libm (`expf`, `tanhf`) do not vectorize; on Gemma 3's prefill they were the largest cost
//! after the matmuls (tanh-GELU over n × 2048 values per layer, on one thread). The same formulas with the same
//! roundings run in every build (Rust does not contract a·b + c into an FMA on its own), so every path gives the
//! same bits as the scalar functions.

use super::{kernel, Kernel};

/// e^x for x ≤ 0 (scores minus their running max), written so LLVM vectorizes it: range reduction to
/// x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial (relative error < 2e-7). Inputs below −87 give 0.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Clamped above too (no input this serves exceeds 0), so n always fits an i32 and the conversion below can be
    // the plain one; NaN becomes −87 (max/min return the other operand, where `clamp` would keep the NaN).
    #[allow(clippy::manual_clamp)] // see above: NaN must not reach the unchecked conversion
    let xc = x.max(-87.0).min(88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67 + r * (0.041_666_43 + r * (0.008_333_45 + r * 0.001_394_2)))));
    // SAFETY: n is an integer in [−126, 127] (xc is finite and within [−87, 88]). Rust's saturating `as` would be a
    // scalar conversion per lane with NaN and range checks: it kept this loop from vectorizing (softmax at 2.8 ns per
    // value on AVX-512).
    let scale = f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// SiLU, x · σ(x) = x / (1 + e^−x), from e^−|x| so the exponential never overflows.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let t = exp_neg(-x.abs()); // e^−|x| ∈ (0, 1]
    let num = if x >= 0.0 { x } else { x * t };
    num / (1.0 + t)
}

/// GELU, tanh approximation (what Gemma's `gelu_pytorch_tanh` and ggml's gelu compute):
/// 0.5·x·(1 + tanh u) with u = √(2/π)·(x + 0.044715·x³), computed as x·σ(2u) (the same value, since
/// 1 + tanh u = 2σ(2u)) from e^−2|u|, which keeps its relative accuracy where tanh u is close to −1.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
    let t = exp_neg(-2.0 * u.abs()); // e^−2|u| ∈ (0, 1]
    let num = if u >= 0.0 { x } else { x * t };
    num / (1.0 + t)
}

/// The gate's activation in a gated feed-forward block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GateAct {
    /// SwiGLU (Llama, Qwen2).
    Silu,
    /// GeGLU with tanh-GELU (Gemma).
    GeluTanh,
}

impl GateAct {
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            GateAct::Silu => silu(x),
            GateAct::GeluTanh => gelu_tanh(x),
        }
    }
}

/// Values per parallel task of [`gate_mul`]; shorter inputs (decode) run on the calling thread.
const PAR_CHUNK: usize = 1 << 15;

/// gate ← act(gate) ⊙ up, elementwise (gate and up: n × ffn of a chunk).
pub fn gate_mul(act: GateAct, gate: &mut [f32], up: &[f32]) {
    gate_mul_with(kernel(), act, gate, up)
}

pub(crate) fn gate_mul_with(k: Kernel, act: GateAct, gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "gate_mul: gate and up differ in length"
    );
    let one = |g: &mut [f32], u: &[f32]| match k {
        // SAFETY: a kernel is only chosen when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { gate_mul_avx512(act, g, u) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { gate_mul_avx2(act, g, u) },
        _ => gate_mul_portable(act, g, u),
    };
    if gate.len() >= 2 * PAR_CHUNK && rayon::current_num_threads() > 1 {
        super::team::for_each_chunk_mut(gate, PAR_CHUNK, |i, g| {
            one(g, &up[i * PAR_CHUNK..][..g.len()])
        });
    } else {
        one(gate, up);
    }
}

#[inline(always)]
fn gate_mul_portable(act: GateAct, gate: &mut [f32], up: &[f32]) {
    match act {
        GateAct::Silu => gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u),
        GateAct::GeluTanh => gate
            .iter_mut()
            .zip(up)
            .for_each(|(g, u)| *g = gelu_tanh(*g) * u),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn gate_mul_avx512(act: GateAct, gate: &mut [f32], up: &[f32]) {
    gate_mul_portable(act, gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gate_mul_avx2(act: GateAct, gate: &mut [f32], up: &[f32]) {
    gate_mul_portable(act, gate, up)
}

/// z ← softmax(z) over one row: e^(x − max) by [`exp_neg`], divided by their sum. The max and the sum run in 16
/// lanes, added up at the end, so every path vectorizes them and gives the same bits. An empty row is left alone.
pub fn softmax_inplace(z: &mut [f32]) {
    softmax_with(kernel(), z)
}

pub(crate) fn softmax_with(k: Kernel, z: &mut [f32]) {
    match k {
        // SAFETY: a kernel is only chosen when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { softmax_avx512(z) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { softmax_avx2(z) },
        _ => softmax_portable(z),
    }
}

const LANES: usize = 16;

/// The max and the inverse sum of e^(x − max) of a row, as [`softmax_inplace`] computes them (the same bits): its
/// softmax is then `exp_neg(x − max) · inv`, which [`add_softmax`] adds up without writing the row. An empty row
/// gives (−∞, 0).
pub fn softmax_stats(z: &[f32]) -> (f32, f32) {
    match kernel() {
        // SAFETY: a kernel is only chosen when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { stats_avx512(z) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { stats_avx2(z) },
        _ => stats_portable(z),
    }
}

/// A piece of a row's softmax stats: its max and Σ exp_neg(z − max) over the piece ((−∞, 0) when empty). Pieces
/// of one row combine with [`merge_softmax_parts`].
pub fn softmax_part(z: &[f32]) -> (f32, f32) {
    match kernel() {
        // SAFETY: a kernel is only chosen when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { part_avx512(z) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { part_avx2(z) },
        _ => part_portable(z),
    }
}

/// The (max, 1 / Σ) of [`softmax_stats`] for a row from its pieces' [`softmax_part`]s, in the order given. The
/// result depends on how the row was cut (each piece's sum is rescaled to the row's max), not on who computed it.
pub fn merge_softmax_parts(parts: impl Iterator<Item = (f32, f32)> + Clone) -> (f32, f32) {
    let mx = parts.clone().fold(f32::NEG_INFINITY, |a, (m, _)| a.max(m));
    if mx == f32::NEG_INFINITY {
        return (mx, f32::INFINITY);
    }
    let sum: f32 = parts
        .filter(|&(m, _)| m != f32::NEG_INFINITY)
        .map(|(m, s)| s * exp_neg(m - mx))
        .sum();
    (mx, 1.0 / sum)
}

/// out[j] += exp_neg(z[j] − max) · inv: a row's softmax from [`softmax_stats`], added into `out` (z.len()).
pub fn add_softmax(out: &mut [f32], z: &[f32], (max, inv): (f32, f32)) {
    assert_eq!(out.len(), z.len(), "add_softmax: one output per score");
    match kernel() {
        // SAFETY: a kernel is only chosen when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { add_softmax_avx512(out, z, max, inv) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { add_softmax_avx2(out, z, max, inv) },
        _ => add_softmax_portable(out, z, max, inv),
    }
}

/// The largest value of a row, in [`LANES`] lanes reduced at the end (so every path vectorizes it alike).
#[inline(always)]
fn lane_max(z: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for (mi, &x) in m.iter_mut().zip(c) {
            *mi = mi.max(x);
        }
    }
    for (mi, &x) in m.iter_mut().zip(chunks.remainder()) {
        *mi = mi.max(x);
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

#[inline(always)]
fn stats_portable(z: &[f32]) -> (f32, f32) {
    if z.is_empty() {
        return (f32::NEG_INFINITY, 0.0);
    }
    let (mx, sum) = part_portable(z);
    (mx, 1.0 / sum)
}

#[inline(always)]
fn part_portable(z: &[f32]) -> (f32, f32) {
    if z.is_empty() {
        return (f32::NEG_INFINITY, 0.0);
    }
    let mx = lane_max(z);
    let mut acc = [0.0f32; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp_neg(x - mx);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += exp_neg(x - mx);
    }
    (mx, acc.iter().sum::<f32>())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn part_avx512(z: &[f32]) -> (f32, f32) {
    part_portable(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn part_avx2(z: &[f32]) -> (f32, f32) {
    part_portable(z)
}

#[inline(always)]
fn add_softmax_portable(out: &mut [f32], z: &[f32], mx: f32, inv: f32) {
    for (o, &x) in out.iter_mut().zip(z) {
        *o += exp_neg(x - mx) * inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn stats_avx512(z: &[f32]) -> (f32, f32) {
    stats_portable(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stats_avx2(z: &[f32]) -> (f32, f32) {
    stats_portable(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn add_softmax_avx512(out: &mut [f32], z: &[f32], mx: f32, inv: f32) {
    add_softmax_portable(out, z, mx, inv)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_softmax_avx2(out: &mut [f32], z: &[f32], mx: f32, inv: f32) {
    add_softmax_portable(out, z, mx, inv)
}

#[inline(always)]
fn softmax_portable(z: &mut [f32]) {
    if z.is_empty() {
        return;
    }
    let mx = lane_max(z);
    let mut acc = [0.0f32; LANES];
    let mut chunks = z.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_neg(*x - mx);
            *a += *x;
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.into_remainder()) {
        *x = exp_neg(*x - mx);
        *a += *x;
    }
    let inv = 1.0 / acc.iter().sum::<f32>();
    z.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn softmax_avx512(z: &mut [f32]) {
    softmax_portable(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(z: &mut [f32]) {
    softmax_portable(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).collect(); // −20 … 20
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 50.0, -50.0, 90.0, -90.0, 1e4, -1e4,
        ]);
        v
    }

    /// Inputs outside the contract (x ≤ 0) stay defined: the exponent's unchecked conversion never sees NaN or a value
    /// out of range.
    #[test]
    fn exp_neg_takes_nan_infinities_and_large_inputs() {
        assert_eq!(exp_neg(f32::NAN).to_bits(), exp_neg(-87.0).to_bits());
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(f32::INFINITY).to_bits(), exp_neg(88.0).to_bits());
        assert!(exp_neg(88.0).is_finite() && exp_neg(88.0) > 1e38);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    /// A row's softmax added through its stats has the bits of the softmax written in place, on every path.
    #[test]
    fn softmax_stats_give_the_inplace_softmax_bits() {
        let z: Vec<f32> = inputs().into_iter().filter(|x| x.abs() < 100.0).collect();
        let mut want = z.clone();
        softmax_with(Kernel::Scalar, &mut want);
        for k in crate::kernels::available() {
            let stats = match k {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available` lists only what this CPU runs.
                Kernel::Avx512 => unsafe { stats_avx512(&z) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Kernel::Avx2 => unsafe { stats_avx2(&z) },
                _ => stats_portable(&z),
            };
            let mut got = vec![0.0f32; z.len()];
            add_softmax_portable(&mut got, &z, stats.0, stats.1);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.to_bits(), w.to_bits(), "{k:?}");
            }
        }
        assert_eq!(softmax_stats(&[]), (f32::NEG_INFINITY, 0.0));
    }

    /// A row's stats merged from pieces match the whole row's (to rounding), on every path; one piece gives the
    /// same bits, empty pieces change nothing.
    #[test]
    fn softmax_pieces_merge_into_the_rows_stats() {
        let z: Vec<f32> = inputs().into_iter().filter(|x| x.abs() < 30.0).collect();
        assert!(z.len() > 20);
        let whole = stats_portable(&z);
        for k in crate::kernels::available() {
            let part = |p: &[f32]| match k {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available` lists only what this CPU runs.
                Kernel::Avx512 => unsafe { part_avx512(p) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Kernel::Avx2 => unsafe { part_avx2(p) },
                _ => part_portable(p),
            };
            assert_eq!(merge_softmax_parts([part(&z)].into_iter()), whole, "{k:?}");
            for cuts in [
                vec![0, 1],
                vec![7],
                vec![3, 3, 11],
                vec![z.len() / 2, z.len()],
            ] {
                let mut bounds = vec![0];
                bounds.extend(cuts.iter().copied());
                bounds.push(z.len());
                let parts: Vec<(f32, f32)> =
                    bounds.windows(2).map(|w| part(&z[w[0]..w[1]])).collect();
                let (m, inv) = merge_softmax_parts(parts.iter().copied());
                assert_eq!(m, whole.0, "{k:?} {cuts:?}");
                assert!(
                    (inv / whole.1 - 1.0).abs() < 1e-5,
                    "{k:?} {cuts:?}: {inv} vs {}",
                    whole.1
                );
            }
        }
        assert_eq!(part_portable(&[]), (f32::NEG_INFINITY, 0.0));
    }

    #[test]
    fn activations_match_the_f64_formulas() {
        for x in inputs() {
            let xd = x as f64;
            let silu_want = xd / (1.0 + (-xd).exp());
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let gelu_want = 0.5 * xd * (1.0 + u.tanh());
            for (got, want, what) in [
                (silu(x), silu_want, "silu"),
                (gelu_tanh(x), gelu_want, "gelu"),
            ] {
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs().max(1e-3) + 1e-30,
                    "{what}({x}) = {got}, want {want}"
                );
            }
        }
    }

    /// Every compiled path (portable, AVX2, AVX-512, split over the pool or not) gives the scalar functions' bits.
    #[test]
    fn softmax_matches_f64_and_every_path_gives_the_same_bits() {
        for len in [0, 1, 15, 16, 17, 1000, 8191] {
            let z0: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.03 - 15.0)
                .collect();
            let mx = z0.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let e: Vec<f64> = z0.iter().map(|&x| (x as f64 - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut first: Option<Vec<u32>> = None;
            for k in crate::kernels::available() {
                let mut z = z0.clone();
                softmax_with(k, &mut z);
                for (i, (&got, &want)) in z.iter().zip(&e).enumerate() {
                    let want = want / sum;
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * want + 1e-12,
                        "{k:?}, len {len}, [{i}]: {got} vs {want}"
                    );
                }
                let bits: Vec<u32> = z.iter().map(|v| v.to_bits()).collect();
                match &first {
                    None => first = Some(bits),
                    Some(f) => assert!(*f == bits, "{k:?}, len {len}: bits differ"),
                }
            }
        }
    }

    #[test]
    fn gate_mul_equals_the_scalar_functions_bit_for_bit_on_every_path() {
        let x = inputs();
        let n = 3 * PAR_CHUNK + 17; // long enough to split over the pool, with a ragged end
        let gate0: Vec<f32> = (0..n).map(|i| x[i % x.len()]).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.37).collect();
        for act in [GateAct::Silu, GateAct::GeluTanh] {
            let want: Vec<u32> = gate0
                .iter()
                .zip(&up)
                .map(|(g, u)| (act.apply(*g) * u).to_bits())
                .collect();
            for k in crate::kernels::available() {
                for len in [n, 100] {
                    let mut g = gate0[..len].to_vec();
                    gate_mul_with(k, act, &mut g, &up[..len]);
                    let got: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
                    assert!(got == want[..len], "{act:?} on {k:?} (len {len})");
                }
            }
        }
    }
}
