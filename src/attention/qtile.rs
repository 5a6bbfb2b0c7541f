//! KIVI blocks (4-bit; 8-bit and widened 2-bit too) read in place: the fold scores and mixes the codes directly, no dequantized copy of the block.
//!
//! A key is `k[c] = kmin[c] + kscale[c] · code[c]` per channel, so for a query row
//! `q · k = Σ_c q[c]·kmin[c] + Σ_c (q[c]·kscale[c]) · code[c]`: once per block and row, the scale is folded into the
//! query (`qs`) and the minimum into one constant (`qc`), and the score of every key is `qc` plus a dot product with
//! its codes. A value row is `v[d] = vmin[j] + vscale[j] · code[j][d]` per token (and value group), so
//! `Σ_j p[j]·v[j][d] = Σ_j p[j]·vmin[j] + Σ_j (p[j]·vscale[j]) · code[j][d]`: the probabilities are scaled per token
//! (`pq`) and the minimum becomes one constant per row and group (`pc`) added to every channel of the group.
//!
//! Codes sit two per byte, the low nibble first (see [`crate::kv::quant`]); the SIMD folds unpack them into
//! float lanes, or score them with integer dot products ([`super::vnni`], [`super::avx2q`]). 8-bit blocks are read the same way, one code per byte; 2-bit blocks are widened to 4-bit codes. This file holds the preparation and the portable (reference) row steps.

use half::slice::HalfFloatSliceExt;

use crate::kv::quant::{row_bytes, value_groups, widen_2bit_codes, QBlock, VALUE_GROUP};

/// The most stored key channels the AVX2 integer scores take ([`super::avx2q`]'s `MAX_HS`; 256 off x86).
#[cfg(target_arch = "x86_64")]
const AVX2_MAX_HS: usize = super::avx2q::MAX_HS;
#[cfg(not(target_arch = "x86_64"))]
const AVX2_MAX_HS: usize = 256;

/// Whether a whole block of `bits`-bit codes with value head dim `hv` can be read in place ([`Q4`]): 8-bit or 4-bit
/// codes, or 2-bit codes whose value rows are whole bytes (hv a multiple of 4), widened to 4-bit ones by
/// [`QPrep::prepare`].
#[inline(always)]
pub(super) fn reads(bits: u8, hv: usize) -> bool {
    bits == 8 || reads_nibbles(bits, hv)
}

/// Whether such a block is read as 4-bit codes (4-bit, or widened 2-bit): what the integer fold takes.
#[inline(always)]
pub(super) fn reads_nibbles(bits: u8, hv: usize) -> bool {
    bits == 4 || (bits == 2 && hv.is_multiple_of(4))
}

/// A 4-bit (or 8-bit: `bits`) block prepared for one task's rows.
#[derive(Clone, Copy)]
pub(super) struct Q4<'a> {
    /// 4 (two codes per byte, the low nibble first) or 8 (one code per byte).
    pub bits: u8,
    /// Key codes, channel-major: channel c's BT codes are bytes `[c · BT · bits/8, (c+1) · BT · bits/8)`.
    pub k: &'a [u8],
    /// Value codes, token-major: token j's row is bytes `[j · rb, (j+1) · rb)`.
    pub v: &'a [u8],
    pub rb: usize,
    /// Stored key channels.
    pub hs: usize,
    /// Value groups per row.
    pub ng: usize,
    /// Per row: q ∘ key scale (rows × hs) and q · key minimum (rows).
    pub qs: &'a [f32],
    pub qc: &'a [f32],
    /// Per value group and token: minimum and scale (`[g · BT + j]`, ng × BT).
    pub vmin: &'a [f32],
    pub vscale: &'a [f32],
    /// Integer scores read this block ([`super::vnni`] or [`super::avx2q`]): `qi` holds each row's `qs` quantized
    /// to int8 (rows × hs), `qsc` their steps (rows); both empty otherwise.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub qi: &'a [i8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub qsc: &'a [f32],
    /// The next block's key and value codes, for the AVX2 fold to ask for a line at a time as it works (set by the
    /// caller; none from [`QPrep::prepare`]).
    pub ahead: (super::Ahead, super::Ahead),
    /// The VNNI fold may read this block (the CPU has it and the block holds 32 keys): p·V takes it whenever
    /// the value head dim allows, scores whenever `qi` is filled.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub int8: bool,
}

/// Which integer fold, if any, reads the prepared block: it decides whether the scaled query rows are quantized to
/// int8 and which vector code prepares them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Int8 {
    /// Float scores and p·V only.
    Off,
    /// The AVX-512 VNNI fold ([`super::vnni`]): integer scores and p·V, the AVX-512 preparation.
    Vnni,
    /// The AVX2 fold's integer scores and p·V ([`super::avx2q`]), the AVX2 preparation (p·V reads 4-bit codes
    /// whatever the preparation: the AVX2 fold decides it from the block's shape).
    Avx2,
}

/// Per-block working memory of the preparation, sized once per task.
#[derive(Default)]
pub(super) struct QPrep {
    /// rows × hk
    qs: Vec<f32>,
    /// rows
    qc: Vec<f32>,
    /// 2 · hk: the block's (min, scale) pairs as f32, then deinterleaved: min (hk), scale (hk).
    kms: Vec<f32>,
    kmin: Vec<f32>,
    kscale: Vec<f32>,
    /// 2 · BT · ng: the block's value (min, scale) pairs as f32.
    vms: Vec<f32>,
    /// ng × BT each.
    vmin: Vec<f32>,
    vscale: Vec<f32>,
    /// rows × hs and rows: see [`Q4::qi`].
    qi: Vec<i8>,
    qsc: Vec<f32>,
    /// A 2-bit block's key and value codes rewritten as 4-bit codes ([`widen_2bit_codes`]): hk · BT/2 and BT · hv/2
    /// bytes.
    k4: Vec<u8>,
    v4: Vec<u8>,
}

/// f32s the fold's probability scratch (`pbuf`) needs for a chunk of up to 8 rows: `pq` (8 × ng × BT) then `pc`
/// (8 × ng).
pub(super) fn pbuf_len(hv: usize, bt: usize) -> usize {
    8 * value_groups(hv) * (bt + 1)
}

impl QPrep {
    pub fn ensure(&mut self, rows: usize, hk: usize, hv: usize, bt: usize) {
        let ng = value_groups(hv);
        if self.qs.len() < rows * hk || self.vmin.len() < ng * bt || self.kmin.len() < hk {
            self.qs.resize(rows * hk, 0.0);
            self.qc.resize(rows, 0.0);
            self.kms.resize(2 * hk, 0.0);
            self.kmin.resize(hk, 0.0);
            self.kscale.resize(hk, 0.0);
            self.vms.resize(2 * bt * ng, 0.0);
            self.vmin.resize(ng * bt, 0.0);
            self.vscale.resize(ng * bt, 0.0);
            self.qi.resize(rows * hk, 0);
            self.qsc.resize(rows, 0.0);
        }
        if self.k4.len() < hk * bt / 2 || self.v4.len() < bt * row_bytes(hv, 4) {
            self.k4.resize(hk * bt / 2, 0);
            self.v4.resize(bt * row_bytes(hv, 4), 0);
        }
    }

    /// Folds the block's key scales and minima into `rows` query rows (`row_q(r)`: row r's query over the stored
    /// channels) and unpacks its value minima and scales. `qb` must hold 8-bit or 4-bit codes, or 2-bit codes
    /// ([`reads`]), which are rewritten as 4-bit ones (codes 0..3) into this preparation's buffers: the fold's
    /// arithmetic, `min + scale · code`, is the same for every width. With an integer fold (`int8`, which the caller
    /// runs) the scaled rows of a 4-bit (or 2-bit) block are also quantized to int8 where that fold reads them.
    #[inline(always)]
    pub fn prepare<'a, const BT: usize>(
        &'a mut self,
        qb: &'a QBlock,
        hv: usize,
        rows: usize,
        int8: Int8,
        row_q: impl Fn(usize) -> &'a [f32],
    ) -> Q4<'a> {
        debug_assert!(reads(qb.bits, hv));
        let hs = qb.k_ms.len() / 2;
        let ng = value_groups(hv);
        let (k, v): (&[u8], &[u8]) = if qb.bits == 2 {
            let (k4, v4) = (&mut self.k4[..hs * BT / 2], &mut self.v4[..BT * hv / 2]);
            widen_2bit_codes(&qb.k[..hs * BT / 4], k4);
            widen_2bit_codes(&qb.v[..BT * hv / 4], v4);
            (k4, v4)
        } else {
            (&qb.k, &qb.v)
        };
        // The CPU runs an integer fold (x86 only: `int8` is never set elsewhere), so its vector preparation may run
        // too. 8-bit codes are scored and mixed in floats: rounding the scaled query to int8 would cost more than
        // the cache's own 8-bit rounding.
        let (vnni, avx2) = (int8 == Int8::Vnni, int8 == Int8::Avx2);
        let x86 = cfg!(target_arch = "x86_64");
        let nibbles = qb.bits != 8;
        // The VNNI fold's scores take hs % 4 == 0; the AVX2 fold's hs % 8 == 0 (its preparation's) up to its stack's
        // limit.
        let int8q = nibbles
            && x86
            && ((vnni && hs.is_multiple_of(4))
                || (avx2 && hs.is_multiple_of(8) && hs <= AVX2_MAX_HS));
        if vnni && hs.is_multiple_of(16) && x86 {
            // Each row folded against the block's key minima and scales (for 8-bit codes its int8 rows go unused).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                // SAFETY: `Vnni` is asked for only where `vnni::available()` found the CPU features; hs % 16 == 0.
                super::vnni::fold_queries(
                    &qb.k_ms[..2 * hs],
                    hs,
                    rows,
                    |r| &row_q(r)[..hs],
                    &mut self.qs,
                    &mut self.qi,
                    &mut self.qc,
                    &mut self.qsc,
                );
            }
        } else if avx2 && hs.is_multiple_of(8) && x86 {
            #[cfg(target_arch = "x86_64")]
            unsafe {
                // SAFETY: `Avx2` is asked for only on the AVX2 kernel path, which runs where the CPU has AVX2, FMA
                // and F16C; hs % 8 == 0.
                super::avx2q::fold_queries(
                    &qb.k_ms[..2 * hs],
                    hs,
                    rows,
                    |r| &row_q(r)[..hs],
                    int8q,
                    &mut self.qs,
                    &mut self.qi,
                    &mut self.qc,
                    &mut self.qsc,
                );
            }
        } else {
            qb.k_ms.convert_to_f32_slice(&mut self.kms[..2 * hs]);
            for (c, ms) in self.kms[..2 * hs].chunks_exact(2).enumerate() {
                self.kmin[c] = ms[0];
                self.kscale[c] = ms[1];
            }
            let (kmin, kscale) = (&self.kmin[..hs], &self.kscale[..hs]);
            for r in 0..rows {
                let q = &row_q(r)[..hs];
                for ((o, &x), &s) in self.qs[r * hs..][..hs].iter_mut().zip(q).zip(kscale) {
                    *o = x * s;
                }
                self.qc[r] = dot8(q, kmin);
                #[cfg(target_arch = "x86_64")]
                if int8q {
                    let (x, out) = (&self.qs[r * hs..][..hs], &mut self.qi[r * hs..][..hs]);
                    // SAFETY: `int8q` without the vector preparation above is the VNNI fold's (the AVX2 one's
                    // needs hs % 8 == 0, which that preparation takes), asked for only where `vnni::available()`
                    // found the CPU features.
                    self.qsc[r] = unsafe { super::vnni::quantize_row(x, out) };
                }
            }
        }
        let nq = if int8q { rows } else { 0 };
        if vnni && ng == 1 && BT.is_multiple_of(16) && x86 {
            // SAFETY: as above; one value group: v_ms is BT (min, scale) pairs.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                super::vnni::split_pairs(
                    &qb.v_ms[..2 * BT],
                    &mut self.vmin[..BT],
                    &mut self.vscale[..BT],
                )
            };
        } else if avx2 && ng == 1 && BT.is_multiple_of(8) && x86 {
            // SAFETY: as above; one value group: v_ms is BT (min, scale) pairs.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                super::avx2q::split_pairs(
                    &qb.v_ms[..2 * BT],
                    &mut self.vmin[..BT],
                    &mut self.vscale[..BT],
                )
            };
        } else {
            qb.v_ms[..2 * BT * ng].convert_to_f32_slice(&mut self.vms[..2 * BT * ng]);
            for j in 0..BT {
                for g in 0..ng {
                    self.vmin[g * BT + j] = self.vms[2 * (j * ng + g)];
                    self.vscale[g * BT + j] = self.vms[2 * (j * ng + g) + 1];
                }
            }
        }
        let bits = if qb.bits == 8 { 8 } else { 4 };
        Q4 {
            bits,
            k,
            v,
            rb: row_bytes(hv, bits),
            hs,
            ng,
            qs: &self.qs[..rows * hs],
            qc: &self.qc[..rows],
            vmin: &self.vmin[..ng * BT],
            vscale: &self.vscale[..ng * BT],
            qi: &self.qi[..nq * hs],
            qsc: &self.qsc[..nq],
            ahead: (super::Ahead::NONE, super::Ahead::NONE),
            int8: vnni && nibbles,
        }
    }
}

/// Σ a[i]·b[i] over 8 independent lanes (so the loop vectorizes), the lanes then added left to right.
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    rest + lanes.iter().sum::<f32>()
}

/// Scales the probabilities of `rc` rows (`p[i · BT + j]`, the first `n` keys) by each token's value scale, per
/// value group, into `pbuf`'s `pq[(i · ng + g) · BT + j]`, and their sums against the value minima into
/// `pc[i · ng + g]` (after the 8 · ng · BT of `pq`).
#[inline(always)]
pub(super) fn scale_probs<const BT: usize>(
    q4: &Q4,
    p: &[f32],
    rc: usize,
    n: usize,
    pbuf: &mut [f32],
) {
    let ng = q4.ng;
    let (pq, pc) = pbuf.split_at_mut(8 * ng * BT);
    for i in 0..rc {
        let pr = &p[i * BT..][..n];
        for g in 0..ng {
            let out = &mut pq[(i * ng + g) * BT..][..n];
            for ((o, &x), &s) in out.iter_mut().zip(pr).zip(&q4.vscale[g * BT..][..n]) {
                *o = x * s;
            }
            pc[i * ng + g] = dot8(pr, &q4.vmin[g * BT..][..n]);
        }
    }
}

/// Offsets of `pq` and `pc` in a `pbuf` laid out by [`scale_probs`].
#[inline(always)]
pub(super) fn pc_offset<const BT: usize>(ng: usize) -> usize {
    8 * ng * BT
}

/// Portable scores of row `r` against the block's BT keys: s[j] = qc + Σ_c qs[c] · code[c][j].
#[inline(always)]
pub(super) fn scores_row<const BT: usize>(q4: &Q4, r: usize, s: &mut [f32]) {
    let s: &mut [f32; BT] = (&mut s[..BT]).try_into().expect("BT scores");
    s.fill(q4.qc[r]);
    if q4.bits == 8 {
        for (c, &w) in q4.qs[r * q4.hs..][..q4.hs].iter().enumerate() {
            for (x, &b) in s.iter_mut().zip(&q4.k[c * BT..][..BT]) {
                *x += w * b as f32;
            }
        }
        return;
    }
    let kb = BT / 2;
    for (c, &w) in q4.qs[r * q4.hs..][..q4.hs].iter().enumerate() {
        let codes = &q4.k[c * kb..][..kb];
        for (i, &b) in codes.iter().enumerate() {
            s[2 * i] += w * (b & 15) as f32;
            s[2 * i + 1] += w * (b >> 4) as f32;
        }
    }
}

/// Portable p·V of one row over the first `n` tokens: a ← α·a + pc[g] (per group) + Σ_j pq[g · BT + j] · code[j].
/// `pq`: this row's ng × BT scaled probabilities, `pc`: its ng constants.
#[inline(always)]
pub(super) fn pv_row<const BT: usize>(
    q4: &Q4,
    pq: &[f32],
    pc: &[f32],
    n: usize,
    alpha: f32,
    a: &mut [f32],
) {
    let hv = a.len();
    for (g, &c) in pc[..q4.ng].iter().enumerate() {
        for x in &mut a[g * VALUE_GROUP..((g + 1) * VALUE_GROUP).min(hv)] {
            *x = *x * alpha + c;
        }
    }
    for j in 0..n {
        let row = &q4.v[j * q4.rb..][..q4.rb];
        for g in 0..q4.ng {
            let w = pq[g * BT + j];
            let (d0, d1) = (g * VALUE_GROUP, ((g + 1) * VALUE_GROUP).min(hv));
            let ag = &mut a[d0..d1];
            if q4.bits == 8 {
                for (o, &b) in ag.iter_mut().zip(&row[d0..d1]) {
                    *o += w * b as f32;
                }
                continue;
            }
            let codes = &row[d0 / 2..];
            let mut pairs = ag.chunks_exact_mut(2);
            for (o, &b) in pairs.by_ref().zip(codes) {
                o[0] += w * (b & 15) as f32;
                o[1] += w * (b >> 4) as f32;
            }
            if let [last] = pairs.into_remainder() {
                *last += w * (codes[(d1 - d0) / 2] & 15) as f32;
            }
        }
    }
}
