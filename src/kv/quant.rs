//! KIVI-style KV quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024).
//!
//! Mechanism: asymmetric integer quantization with a per-group minimum (zero point) and scale, `x ≈ min + q · scale`,
//! `q ∈ [0, 2^bits − 1]`. Keys are quantized *per channel* (a group is one channel across the tokens of a block), because
//! key outliers sit in fixed channels; values are quantized *per token* (a group is [`VALUE_GROUP`] channels of one
//! token's value row), because the attention output mixes values per token. KIVI's defaults: group 32, 2 or 4 bits,
//! a full-precision residual of the most recent R = 128 tokens (see [`crate::kv::KvDtype::Kivi`]).
//!
//! Here a key group is one cache block (`block_tokens`, 32 by default, = KIVI's group size), so a quantized block holds
//! per channel: `block_tokens · bits / 8` bytes of codes plus an f16 minimum and an f16 scale; per token: the packed
//! value row plus an f16 minimum and scale per value group. Codes are packed little-end first: code `j` of a group
//! sits in bits `(j mod 8/bits) · bits` of byte `j / (8/bits)`.
//!
//! The minimum is rounded *down* to an f16 and the scale *up* (so every element of the group lies inside the grid and
//! nothing is clamped), and codes are computed against the rounded pair. Error per element: at most half a step,
//! `(max − min + δ) / (2^bits − 1) / 2`, where δ < one f16 ulp of the minimum (0.1 % of its magnitude).
//! Re-quantizing dequantized data is not exactly idempotent, so the cache moves value rows between quantized blocks as
//! codes (exact) and re-quantizes only keys when entries move (see `KvCache::retain`).

use half::f16;

/// Channels per value group (one token's value row is cut into groups of this many channels; the last may be shorter).
pub const VALUE_GROUP: usize = 64;

/// Bit widths the cache supports.
pub const BITS_CHOICES: [u8; 3] = [8, 4, 2];

/// A quantized block: `hk` key channels × `bt` tokens, `bt` value rows of `hv` channels.
#[derive(Clone)]
pub struct QBlock {
    pub bits: u8,
    /// Key codes, channel-major: channel c's `bt` codes are bytes `[c · bt·bits/8, (c+1) · bt·bits/8)`.
    pub k: Box<[u8]>,
    /// Per key channel: (min, scale), interleaved.
    pub k_ms: Box<[f16]>,
    /// Value codes, token-major: token j's row is bytes `[j · row_bytes, (j+1) · row_bytes)`.
    pub v: Box<[u8]>,
    /// Per token and value group: (min, scale), interleaved, `[(j · n_groups + g) · 2 ..]`.
    pub v_ms: Box<[f16]>,
}

/// Bytes of one value row's codes.
pub fn row_bytes(hv: usize, bits: u8) -> usize {
    (hv * bits as usize).div_ceil(8)
}

pub fn value_groups(hv: usize) -> usize {
    hv.div_ceil(VALUE_GROUP)
}

impl QBlock {
    pub fn new(bits: u8, hk: usize, hv: usize, bt: usize) -> Self {
        let b = bits as usize;
        Self {
            bits,
            k: vec![0; hk * bt * b / 8].into_boxed_slice(),
            k_ms: vec![f16::ZERO; 2 * hk].into_boxed_slice(),
            v: vec![0; bt * row_bytes(hv, bits)].into_boxed_slice(),
            v_ms: vec![f16::ZERO; 2 * bt * value_groups(hv)].into_boxed_slice(),
        }
    }

    /// Bytes held by this block's data (codes and scales; positions are counted by the cache).
    pub fn bytes(&self) -> usize {
        self.k.len() + self.v.len() + 2 * (self.k_ms.len() + self.v_ms.len())
    }

    /// Bytes a block of this shape holds, without building one.
    pub fn bytes_for(bits: u8, hk: usize, hv: usize, bt: usize) -> usize {
        let b = bits as usize;
        hk * bt * b / 8 + 4 * hk + bt * row_bytes(hv, bits) + 4 * bt * value_groups(hv)
    }

    /// Quantizes a full block: `kt` = keys transposed (`kt[c · bt + j]`, hk·bt), `v` = value rows (bt·hv).
    pub fn encode(&mut self, kt: &[f32], v: &[f32], bt: usize) {
        let hk = self.k_ms.len() / 2;
        let hv = v.len() / bt;
        let kb = bt * self.bits as usize / 8;
        for c in 0..hk {
            let (m, s) = encode_group(&kt[c * bt..][..bt], self.bits, &mut self.k[c * kb..][..kb]);
            self.k_ms[2 * c] = m;
            self.k_ms[2 * c + 1] = s;
        }
        for j in 0..bt {
            self.encode_value(j, &v[j * hv..][..hv]);
        }
    }

    /// Quantizes one token's value row into slot `j`.
    pub fn encode_value(&mut self, j: usize, row: &[f32]) {
        let (hv, bits) = (row.len(), self.bits);
        let rb = row_bytes(hv, bits);
        let ng = value_groups(hv);
        let codes = &mut self.v[j * rb..][..rb];
        for g in 0..ng {
            let x = &row[g * VALUE_GROUP..((g + 1) * VALUE_GROUP).min(hv)];
            let b0 = g * VALUE_GROUP * bits as usize / 8;
            let nb = (x.len() * bits as usize).div_ceil(8);
            let (m, s) = encode_group(x, bits, &mut codes[b0..][..nb]);
            self.v_ms[2 * (j * ng + g)] = m;
            self.v_ms[2 * (j * ng + g) + 1] = s;
        }
    }

    /// Key of slot `j` (its `hk` stored channels).
    pub fn key(&self, j: usize, bt: usize, out: &mut [f32]) {
        let kb = bt * self.bits as usize / 8;
        for (c, o) in out.iter_mut().enumerate() {
            *o = decode_one(
                &self.k[c * kb..][..kb],
                self.bits,
                self.k_ms[2 * c],
                self.k_ms[2 * c + 1],
                j,
            );
        }
    }

    /// Value row of slot `j`.
    pub fn value(&self, j: usize, out: &mut [f32]) {
        let (hv, bits) = (out.len(), self.bits);
        let rb = row_bytes(hv, bits);
        let ng = value_groups(hv);
        let codes = &self.v[j * rb..][..rb];
        for (d, o) in out.iter_mut().enumerate() {
            let g = d / VALUE_GROUP;
            let (m, s) = (
                self.v_ms[2 * (j * ng + g)].to_f32(),
                self.v_ms[2 * (j * ng + g) + 1].to_f32(),
            );
            *o = m + s * code_at(codes, bits, d) as f32;
        }
    }

    /// All keys of the block, transposed (`kt[c · BT + j]`, `hk` channels), for the attention kernel. The same
    /// bits on every SIMD path (`min + scale · code`, a product and a sum, never fused).
    #[inline(always)]
    pub fn keys_into<const BT: usize>(&self, kt: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::{kernel, Kernel};
            // SAFETY: the kernel choice checked the CPU's features.
            match kernel() {
                Kernel::Avx512 => return unsafe { self.keys_into_avx512::<BT>(kt) },
                Kernel::Avx2 => return unsafe { self.keys_into_avx2::<BT>(kt) },
                Kernel::Scalar => {}
            }
        }
        self.keys_body::<BT>(kt)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn keys_into_avx512<const BT: usize>(&self, kt: &mut [f32]) {
        self.keys_body::<BT>(kt)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn keys_into_avx2<const BT: usize>(&self, kt: &mut [f32]) {
        self.keys_body::<BT>(kt)
    }

    /// [`Self::keys_into`]'s loop, compiled once per SIMD path.
    #[inline(always)]
    fn keys_body<const BT: usize>(&self, kt: &mut [f32]) {
        let kb = BT * self.bits as usize / 8;
        let hk = self.k_ms.len() / 2;
        for c in 0..hk {
            let (m, s) = (self.k_ms[2 * c].to_f32(), self.k_ms[2 * c + 1].to_f32());
            let out = &mut kt[c * BT..][..BT];
            let codes = &self.k[c * kb..][..kb];
            match self.bits {
                8 => unpack::<8>(codes, m, s, out),
                4 => unpack::<4>(codes, m, s, out),
                _ => unpack::<2>(codes, m, s, out),
            }
        }
    }

    /// The first `n` value rows (`v[j · hv + d]`), for the attention kernel; the same bits on every SIMD path.
    #[inline(always)]
    pub fn values_into(&self, n: usize, hv: usize, v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::{kernel, Kernel};
            // SAFETY: the kernel choice checked the CPU's features.
            match kernel() {
                Kernel::Avx512 => return unsafe { self.values_into_avx512(n, hv, v) },
                Kernel::Avx2 => return unsafe { self.values_into_avx2(n, hv, v) },
                Kernel::Scalar => {}
            }
        }
        self.values_body(n, hv, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn values_into_avx512(&self, n: usize, hv: usize, v: &mut [f32]) {
        self.values_body(n, hv, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn values_into_avx2(&self, n: usize, hv: usize, v: &mut [f32]) {
        self.values_body(n, hv, v)
    }

    /// [`Self::values_into`]'s loop, compiled once per SIMD path.
    #[inline(always)]
    fn values_body(&self, n: usize, hv: usize, v: &mut [f32]) {
        let rb = row_bytes(hv, self.bits);
        let ng = value_groups(hv);
        for j in 0..n {
            let codes = &self.v[j * rb..][..rb];
            for g in 0..ng {
                let d0 = g * VALUE_GROUP;
                let d1 = (d0 + VALUE_GROUP).min(hv);
                let (m, s) = (
                    self.v_ms[2 * (j * ng + g)].to_f32(),
                    self.v_ms[2 * (j * ng + g) + 1].to_f32(),
                );
                let out = &mut v[j * hv + d0..j * hv + d1];
                let b0 = d0 * self.bits as usize / 8;
                let cb = &codes[b0..][..((d1 - d0) * self.bits as usize).div_ceil(8)];
                match self.bits {
                    8 => unpack::<8>(cb, m, s, out),
                    4 => unpack::<4>(cb, m, s, out),
                    _ => unpack::<2>(cb, m, s, out),
                }
            }
        }
    }
}

/// Rewrites packed 2-bit codes as 4-bit codes in the same order: code `j` of `src` (bits `2 (j mod 4)` of byte `j / 4`)
/// becomes the nibble `j` of `dst` (low nibble of byte `j / 2` for even j), so a 2-bit block's key channels and value
/// rows (whose rows are whole bytes: hv a multiple of 4) read as a 4-bit block's with codes 0..3. `dst` holds
/// `2 · src.len()` bytes. Integer only: every SIMD path writes the same bytes.
pub fn widen_2bit_codes(src: &[u8], dst: &mut [u8]) {
    assert_eq!(dst.len(), 2 * src.len(), "4-bit codes take twice the bytes");
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::{kernel, Kernel};
        match kernel() {
            // SAFETY: the kernel choice checked the CPU's features.
            Kernel::Avx512 | Kernel::Avx2 => return unsafe { widen_2bit_avx2(src, dst) },
            Kernel::Scalar => {}
        }
    }
    widen_2bit(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_2bit_avx2(src: &[u8], dst: &mut [u8]) {
    widen_2bit(src, dst)
}

/// [`widen_2bit_codes`]' loop: four bytes of 2-bit codes spread into eight bytes of nibbles (each 2-bit field moved
/// from bit 2j to bit 4j), written so the compiler runs it on whole vectors.
#[inline(always)]
fn widen_2bit(src: &[u8], dst: &mut [u8]) {
    #[inline(always)]
    fn spread(x: u32) -> u64 {
        let mut x = x as u64;
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
        (x | (x << 2)) & 0x3333_3333_3333_3333
    }
    let whole = src.len() / 4 * 4;
    let (src, s_rest) = src.split_at(whole);
    let (dst, d_rest) = dst.split_at_mut(2 * whole);
    for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(8)) {
        let x = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        d.copy_from_slice(&spread(x).to_le_bytes());
    }
    let mut tail = [0u8; 4];
    tail[..s_rest.len()].copy_from_slice(s_rest);
    let wide = spread(u32::from_le_bytes(tail)).to_le_bytes();
    d_rest.copy_from_slice(&wide[..d_rest.len()]);
}

/// Code `j` of a packed group.
#[inline(always)]
fn code_at(codes: &[u8], bits: u8, j: usize) -> u8 {
    let per = 8 / bits as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    (codes[j / per] >> ((j % per) * bits as usize)) & mask
}

/// out[j] = m + s · code_j, `out.len()` codes (a multiple of 8/B, or the group's tail).
#[inline(always)]
fn unpack<const B: usize>(codes: &[u8], m: f32, s: f32, out: &mut [f32]) {
    if B == 8 {
        // One code per byte: a plain loop the compiler runs on whole vectors.
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = m + s * c as f32;
        }
        return;
    }
    let per = 8 / B;
    let mask = ((1u16 << B) - 1) as u8;
    let last = out.len() / per;
    let mut chunks = out.chunks_exact_mut(per);
    for (o, &byte) in chunks.by_ref().zip(codes) {
        for (t, x) in o.iter_mut().enumerate() {
            *x = m + s * ((byte >> (t * B)) & mask) as f32;
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let byte = codes[last];
        for (t, x) in rest.iter_mut().enumerate() {
            *x = m + s * ((byte >> (t * B)) & mask) as f32;
        }
    }
}

/// The largest f16 ≤ x (x clamped to the finite f16 range).
fn f16_down(x: f32) -> f16 {
    let x = x.clamp(-65504.0, 65504.0);
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        h
    } else if h.to_bits() & 0x7fff == 0 {
        f16::from_bits(0x8001) // just below zero
    } else if h.is_sign_negative() {
        f16::from_bits(h.to_bits() + 1)
    } else {
        f16::from_bits(h.to_bits() - 1)
    }
}

/// The smallest non-negative f16 ≥ x, for x ≥ 0 (clamped to the finite f16 range).
fn f16_up(x: f32) -> f16 {
    let x = x.clamp(0.0, 65504.0);
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Quantizes one group `x` into `codes` (`x.len() · bits / 8` bytes, rounded up) and returns its (min, scale).
///
/// Every KIVI append runs it (each key channel of a filled block, each value row), so its loops are written for the
/// compiler's vectors and, on a CPU with AVX2, compiled for it: min and max over 8 lanes, the codes of up to 64
/// elements at a time into a buffer, then packed. The codes are [`round_code`]'s, element by element.
pub fn encode_group(x: &[f32], bits: u8, codes: &mut [u8]) -> (f16, f16) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2() {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { encode_group_avx2(x, bits, codes) };
    }
    encode_group_with(x, bits, codes)
}

/// [`encode_group`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_group_avx2(x: &[f32], bits: u8, codes: &mut [u8]) -> (f16, f16) {
    encode_group_with(x, bits, codes)
}

#[inline(always)]
fn encode_group_with(x: &[f32], bits: u8, codes: &mut [u8]) -> (f16, f16) {
    let levels = ((1u32 << bits) - 1) as f32;
    let (lo, hi) = min_max(x);
    let m = f16_down(lo);
    let mf = m.to_f32();
    let s = f16_up((hi - mf) / levels);
    let sf = s.to_f32();
    let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
    let per = 8 / bits as usize;
    let mut q = [0u8; 64];
    for (xs, cs) in x.chunks(64).zip(codes.chunks_mut(64 / per)) {
        let q = &mut q[..xs.len()];
        for (c, &v) in q.iter_mut().zip(xs) {
            *c = round_code((v - mf) * inv, levels);
        }
        match bits {
            8 => cs.copy_from_slice(q),
            4 => pack::<2>(q, cs),
            _ => pack::<4>(q, cs),
        }
    }
    (m, s)
}

/// The smallest and largest element (NaN ignored), as `f32::min` / `f32::max` folded from ±∞ give them, over 8
/// lanes.
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
    }
    lo.iter()
        .zip(&hi)
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), (&l, &h)| {
            (a.min(l), b.max(h))
        })
}

/// Packs codes `q` (each below 2^(8/P)) P to a byte, the first in the low bits; `out` holds `q.len()` / P bytes,
/// rounded up (a short last byte has its high bits clear).
#[inline(always)]
fn pack<const P: usize>(q: &[u8], out: &mut [u8]) {
    let w = 8 / P;
    let mut it = q.chunks_exact(P);
    for (o, c) in out.iter_mut().zip(&mut it) {
        let mut b = 0u8;
        for (i, &v) in c.iter().enumerate() {
            b |= v << (i * w);
        }
        *o = b;
    }
    let rest = it.remainder();
    if !rest.is_empty() {
        let mut b = 0u8;
        for (i, &v) in rest.iter().enumerate() {
            b |= v << (i * w);
        }
        out[q.len() / P] = b;
    }
}

/// `y.round().clamp(0.0, levels) as u8` (0 for NaN), the same code for every input, without `round`'s library call
/// (x86-64's baseline has no rounding instruction; the call made a KIVI append cost 14 ns per element): clamping to
/// integer bounds first changes no rounded value, and for 0 ≤ y ≤ 255 the truncation `t` and `y − t` are exact, so
/// rounding half away from zero is `t + (y − t ≥ 0.5)`.
///
/// Written for vectors: NaN and everything below 0 go to 0 by one comparison, and once `y` lies in [0, 255] the
/// conversions need none of `as`'s saturation.
#[inline(always)]
fn round_code(y: f32, levels: f32) -> u8 {
    let y = if y >= 0.0 { y } else { 0.0 };
    let y = if y <= levels { y } else { levels };
    // SAFETY: 0 ≤ y ≤ levels ≤ 255 (NaN went to 0 above), so both values fit an i32.
    let t = unsafe { y.to_int_unchecked::<i32>() } as f32;
    let r = if y - t >= 0.5 { t + 1.0 } else { t };
    unsafe { r.to_int_unchecked::<i32>() as u8 }
}

/// Dequantizes code `j` of a group.
#[inline(always)]
pub fn decode_one(codes: &[u8], bits: u8, m: f16, s: f16, j: usize) -> f32 {
    m.to_f32() + s.to_f32() * code_at(codes, bits, j) as f32
}

/// Dequantizes one group (the reference for tests and for moving entries).
pub fn decode_group(codes: &[u8], bits: u8, m: f16, s: f16, out: &mut [f32]) {
    let (m, s) = (m.to_f32(), s.to_f32());
    for (j, o) in out.iter_mut().enumerate() {
        *o = m + s * code_at(codes, bits, j) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::Rng;

    /// The rounding without a library call gives `round`'s code for every input, halves, NaN and infinities
    /// included.
    #[test]
    fn round_code_is_round_then_clamp() {
        let mut rng = Rng(0xC0DE);
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            0.49999997,
            0.5,
            2.5,
            14.5,
            15.5,
        ];
        xs.extend((0..20_000).map(|i| (rng.uniform() - 0.1) * [3.0f32, 17.0, 300.0][i % 3]));
        xs.extend((0..600).map(|i| i as f32 * 0.5));
        for levels in [3.0f32, 15.0, 255.0] {
            for &y in &xs {
                assert_eq!(
                    round_code(y, levels),
                    y.round().clamp(0.0, levels) as u8,
                    "y {y} levels {levels}"
                );
            }
        }
    }

    /// The scalar encoder `encode_group` replaced: a fold for min and max, then one code at a time.
    fn encode_reference(x: &[f32], bits: u8, codes: &mut [u8]) -> (f16, f16) {
        let levels = ((1u32 << bits) - 1) as f32;
        let (lo, hi) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let m = f16_down(lo);
        let mf = m.to_f32();
        let s = f16_up((hi - mf) / levels);
        let sf = s.to_f32();
        let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
        codes.fill(0);
        let per = 8 / bits as usize;
        for (j, &v) in x.iter().enumerate() {
            codes[j / per] |= round_code((v - mf) * inv, levels) << ((j % per) * bits as usize);
        }
        (m, s)
    }

    /// The vectorized encoder, portable and AVX2-compiled, gives the scalar one's minimum, scale and code bytes, for
    /// every width and group length (odd tails, more than 64 elements), with NaN, infinities and constant groups.
    #[test]
    fn encoder_paths_equal_the_scalar_reference() {
        let mut rng = Rng(0xE7C0);
        let mut groups: Vec<Vec<f32>> = Vec::new();
        for n in [
            1usize, 2, 3, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 100, 128, 130,
        ] {
            for t in 0..6 {
                let (sc, off) = (
                    [0.01f32, 1.0, 30.0, 1e4, 1.0, 2.0][t],
                    [0.0f32, 5.0, -2.0, 0.0, -7.0, 0.0][t],
                );
                let mut x: Vec<f32> = (0..n).map(|_| (rng.uniform() - 0.5) * sc + off).collect();
                match t {
                    4 => x[n / 2] = f32::NAN,
                    5 => x.iter_mut().for_each(|v| *v = 2.0),
                    _ => {}
                }
                groups.push(x);
            }
        }
        groups.push(vec![0.0, -0.0, 1.0, -1.0, f32::INFINITY, 3.0]);
        groups.push(vec![f32::NEG_INFINITY, 0.5, 0.25]);
        for x in &groups {
            for bits in BITS_CHOICES {
                let nb = (x.len() * bits as usize).div_ceil(8);
                let mut want = vec![0u8; nb];
                let (wm, ws) = encode_reference(x, bits, &mut want);
                let mut got = vec![0xAAu8; nb];
                let (m, s) = encode_group_with(x, bits, &mut got);
                assert_eq!(
                    (m.to_bits(), s.to_bits(), &got),
                    (wm.to_bits(), ws.to_bits(), &want),
                    "portable {bits} {x:?}"
                );
                let mut got = vec![0x55u8; nb];
                let (m, s) = encode_group(x, bits, &mut got);
                assert_eq!(
                    (m.to_bits(), s.to_bits(), &got),
                    (wm.to_bits(), ws.to_bits(), &want),
                    "dispatched {bits} {x:?}"
                );
            }
        }
    }

    /// Max error over random groups, as a share of each group's range; also checks codes round-trip.
    fn max_rel_err(bits: u8, n: usize) -> f32 {
        let mut rng = Rng(0x1234_5678 ^ bits as u64);
        let mut worst = 0.0f32;
        for trial in 0..200 {
            let scale = [0.01f32, 1.0, 30.0][trial % 3];
            let offset = [0.0f32, 5.0, -2.0][trial % 3];
            let x: Vec<f32> = (0..n).map(|_| rng.uniform() * scale + offset).collect();
            let mut codes = vec![0u8; (n * bits as usize).div_ceil(8)];
            let (m, s) = encode_group(&x, bits, &mut codes);
            let mut y = vec![0.0; n];
            decode_group(&codes, bits, m, s, &mut y);
            let (lo, hi) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            // Bound: half a (rounded-up) step, the step widened by the f16 rounding of the minimum.
            let step = ((hi - lo) + lo.abs() / 1024.0) / ((1u32 << bits) - 1) as f32 * 1.001;
            for (a, b) in x.iter().zip(&y) {
                assert!(
                    (a - b).abs() <= 0.5 * step + 1e-6 * a.abs(),
                    "bits {bits}: |{a} - {b}| > half step {step}"
                );
                worst = worst.max((a - b).abs() / (hi - lo));
            }
        }
        worst
    }

    #[test]
    fn error_is_half_a_step_per_bit_width() {
        for (bits, n) in [(8u8, 32usize), (4, 32), (2, 32), (4, 64), (2, 7), (8, 3)] {
            let step = 1.0 / ((1u32 << bits) - 1) as f32;
            let e = max_rel_err(bits, n);
            // Relative to the range: half a step, widened by the f16 minimum (offset 5 on a range of 0.02 is the worst).
            assert!(
                e <= 0.5 * step * 1.25,
                "bits {bits} n {n}: {e} vs half step {}",
                0.5 * step
            );
            assert!(
                e >= 0.25 * step,
                "bits {bits}: error {e} suspiciously small for step {step}"
            );
        }
        // int8: at most ~0.5 % of the range.
        assert!(max_rel_err(8, 32) < 0.005);
    }

    /// 2-bit codes widened to 4-bit ones keep every code in its place, on the running SIMD path and the portable
    /// loop alike, for lengths that end inside a 4-byte step.
    #[test]
    fn widened_two_bit_codes_read_as_the_same_codes() {
        let mut rng = Rng(7);
        for n in [0usize, 1, 3, 4, 7, 8, 31, 32, 64, 67, 512] {
            let src: Vec<u8> = (0..n).map(|_| (rng.next_u64() >> 56) as u8).collect();
            let (mut got, mut portable) = (vec![0u8; 2 * n], vec![0xaau8; 2 * n]);
            widen_2bit_codes(&src, &mut got);
            widen_2bit(&src, &mut portable);
            assert_eq!(got, portable, "{n} bytes");
            for j in 0..4 * n {
                assert_eq!(
                    code_at(&got, 4, j),
                    code_at(&src, 2, j),
                    "{n} bytes, code {j}"
                );
            }
        }
    }

    #[test]
    fn block_encode_matches_group_decode() {
        let (hk, hv, bt) = (5, 70, 8);
        let mut rng = Rng(99);
        let kt: Vec<f32> = (0..hk * bt).map(|_| rng.uniform()).collect();
        let v: Vec<f32> = (0..bt * hv).map(|_| rng.uniform() * 3.0).collect();
        for bits in BITS_CHOICES {
            let mut b = QBlock::new(bits, hk, hv, bt);
            b.encode(&kt, &v, bt);
            assert_eq!(b.bytes(), QBlock::bytes_for(bits, hk, hv, bt));
            let mut kt2 = vec![0.0; hk * bt];
            b.keys_into::<8>(&mut kt2);
            let mut v2 = vec![0.0; bt * hv];
            b.values_into(bt, hv, &mut v2);
            let mut one = vec![0.0; hk];
            let mut row = vec![0.0; hv];
            for j in 0..bt {
                b.key(j, bt, &mut one);
                b.value(j, &mut row);
                for c in 0..hk {
                    assert_eq!(one[c], kt2[c * bt + j]);
                }
                assert_eq!(row, v2[j * hv..][..hv]);
            }
            let step = 2.0 / ((1u32 << bits) - 1) as f32;
            let kerr = kt
                .iter()
                .zip(&kt2)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let verr = v
                .iter()
                .zip(&v2)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                kerr <= 0.51 * step && verr <= 0.51 * 3.0 * step,
                "bits {bits}: {kerr} {verr}"
            );
        }
    }
}
