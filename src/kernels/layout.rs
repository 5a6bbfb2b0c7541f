//! The packed weight layout the kernels read, the repacking from GGUF blocks, and row dequantization.
//!
//! Quantized matrices are stored in *row groups* of [`RG`] = 16 rows. For each row group and each
//! weight block (32 elements for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, a 256-element super-block for the K-quants)
//! there is one *record*; the records of a row group are contiguous, so a row group is one sequential
//! stream (what decode wants) and its 16 rows share every load (what the SIMD dot products want).
//!
//! Inside a record, 32 consecutive elements of the 16 rows are held as 8 *groups* of 64 bytes, one per
//! 4 consecutive elements: byte `g*64 + r*4 + e` is element `4g+e` of row `r`. With AVX-512 one such group
//! is one register and `vpdpbusd` against a broadcast 4-byte slice of the activations gives 16 row
//! partial sums at once; AVX2 reads the two 32-byte halves (rows 0-7, 8-15).
//!
//! All weights are stored as *unsigned* integers (`q + offset` for the signed formats), the offset being
//! folded into the integer dot product through the activation block sums (exact integer arithmetic).
//!
//! * 4-bit values: 256 bytes per 32 elements; byte `i*64 + r*4 + e` = group `2i` (low nibble) | group `2i+1` (high).
//! * 5th bit: 8 little-endian u64 masks, bit `r*4+e` of mask `g` = bit 4 of element `4g+e` of row `r`.
//! * 6-bit (Q6_K) high pairs: 128 bytes; byte `h*64 + r*4 + e` holds bits 4-5 of group `4h+i` at bit `2i`.
//! * 8-bit (Q8_0): 512 bytes of `q + 128`.
//!
//! Record contents (f16 values are kept as f16 bits, exactly as in the file):
//! * Q4_0/Q5_0/Q8_0: `d[16]` (f16), values, [Q5: high-bit masks].
//! * Q4_1/Q5_1: `d[16]`, `m[16]` (f16), values, [Q5_1: masks].
//! * Q4_K/Q5_K: `d[16]`, `dmin[16]` (f16), `sc[8][16]`, `m[8][16]` (u8, 6-bit), then per 32-element
//!   sub-block: 4-bit values [+ Q5_K masks].
//! * Q6_K: `d[16]` (f16), `sc[16][16]` (i8), then per 32-element sub-block: low nibbles, high pairs.
//!
//! Float matrices (F32, F16, BF16) are kept row-major in their own element type.

use crate::gguf::GgmlType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Rows per row group.
pub(crate) const RG: usize = 16;

/// The weight formats the kernels know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    F32,
    F16,
    BF16,
}

impl Kind {
    pub(crate) fn from_type(ty: GgmlType) -> Option<Kind> {
        Some(match ty {
            GgmlType::Q4_0 => Kind::Q4_0,
            GgmlType::Q4_1 => Kind::Q4_1,
            GgmlType::Q5_0 => Kind::Q5_0,
            GgmlType::Q5_1 => Kind::Q5_1,
            GgmlType::Q8_0 => Kind::Q8_0,
            GgmlType::Q4K => Kind::Q4K,
            GgmlType::Q5K => Kind::Q5K,
            GgmlType::Q6K => Kind::Q6K,
            GgmlType::F32 => Kind::F32,
            GgmlType::F16 => Kind::F16,
            GgmlType::BF16 => Kind::BF16,
            _ => return None,
        })
    }

    pub(crate) fn is_float(self) -> bool {
        matches!(self, Kind::F32 | Kind::F16 | Kind::BF16)
    }

    /// Elements per record (per row).
    pub(crate) fn block(self) -> usize {
        match self {
            Kind::Q4K | Kind::Q5K | Kind::Q6K => 256,
            Kind::F32 | Kind::F16 | Kind::BF16 => 1,
            _ => 32,
        }
    }

    /// Bytes per record (one row group × one block). Float kinds: bytes per element.
    pub(crate) fn rec_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 32 + 256,
            Kind::Q4_1 => 64 + 256,
            Kind::Q5_0 => 32 + 256 + 64,
            Kind::Q5_1 => 64 + 256 + 64,
            Kind::Q8_0 => 32 + 512,
            Kind::Q4K => K_HDR + 8 * 256,
            Kind::Q5K => K_HDR + 8 * 320,
            Kind::Q6K => Q6_HDR + 8 * 384,
            Kind::F32 => 4,
            Kind::F16 | Kind::BF16 => 2,
        }
    }
}

/// Header bytes of a Q4_K/Q5_K record: d, dmin (16 f16 each), sc[8][16], m[8][16].
pub(crate) const K_HDR: usize = 64 + 128 + 128;
/// Header bytes of a Q6_K record: d (16 f16), sc[16][16].
pub(crate) const Q6_HDR: usize = 32 + 256;
/// Offset of the values in a Q4_0/Q5_0/Q8_0 (no min) or Q4_1/Q5_1 (min) record.
pub(crate) const fn a_hdr(min: bool) -> usize {
    if min {
        64
    } else {
        32
    }
}

/// A 64-byte aligned byte buffer.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct A64([u8; 64]);

pub(crate) struct AlignedBuf {
    v: Vec<A64>,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBuf {
            v: vec![A64([0; 64]); len.div_ceil(64)],
            len,
        }
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: A64 is 64 plain bytes; the vector holds at least `len` bytes.
        unsafe { std::slice::from_raw_parts(self.v.as_ptr() as *const u8, self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.v.as_mut_ptr() as *mut u8, self.len) }
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[inline]
fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

#[inline]
fn fp16(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Q4_K/Q5_K 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One row's block decoded into unsigned integer values and scale parameters.
#[derive(Clone, Copy)]
struct RowBlock {
    v: [u8; 256],
    d: u16,
    m: u16,
    sc: [u8; 16],
    mn: [u8; 8],
}

impl Default for RowBlock {
    fn default() -> Self {
        RowBlock {
            v: [0; 256],
            d: 0,
            m: 0,
            sc: [0; 16],
            mn: [0; 8],
        }
    }
}

/// Decode one GGUF block (bytes `b`) of `kind` into `out`.
fn decode_block(kind: Kind, b: &[u8], out: &mut RowBlock) {
    match kind {
        Kind::Q4_0 | Kind::Q4_1 => {
            out.d = rd16(b, 0);
            let qs = if kind == Kind::Q4_1 {
                out.m = rd16(b, 2);
                &b[4..20]
            } else {
                &b[2..18]
            };
            for j in 0..16 {
                out.v[j] = qs[j] & 0xF;
                out.v[j + 16] = qs[j] >> 4;
            }
        }
        Kind::Q5_0 | Kind::Q5_1 => {
            out.d = rd16(b, 0);
            let (qh, qs) = if kind == Kind::Q5_1 {
                out.m = rd16(b, 2);
                (&b[4..8], &b[8..24])
            } else {
                (&b[2..6], &b[6..22])
            };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for j in 0..16 {
                out.v[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                out.v[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        Kind::Q8_0 => {
            out.d = rd16(b, 0);
            for (v, &q) in out.v[..32].iter_mut().zip(&b[2..34]) {
                *v = q ^ 0x80; // i8 q -> u8 q + 128
            }
        }
        Kind::Q4K | Kind::Q5K => {
            out.d = rd16(b, 0);
            out.m = rd16(b, 2);
            let scales = &b[4..16];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, scales);
                out.sc[j] = s;
                out.mn[j] = m;
            }
            let (qh, ql) = if kind == Kind::Q5K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for j64 in 0..4 {
                let q = &ql[32 * j64..32 * j64 + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = (q[l] & 0xF, q[l] >> 4);
                    if kind == Kind::Q5K {
                        lo |= ((qh[l] >> (2 * j64)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j64 + 1)) & 1) << 4;
                    }
                    out.v[64 * j64 + l] = lo;
                    out.v[64 * j64 + 32 + l] = hi;
                }
            }
        }
        Kind::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = rd16(b, 208);
            out.sc.copy_from_slice(sc);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let y = &mut out.v[128 * n..];
                    y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        Kind::F32 | Kind::F16 | Kind::BF16 => unreachable!("float kinds are not block-decoded"),
    }
}

/// Values of 16 rows × 32 elements.
type Tile = [[u8; 32]; RG];

#[inline]
fn word(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn pack_nibbles(t: &Tile, out: &mut [u8]) {
    for i in 0..4 {
        for r in 0..RG {
            let lo = word(&t[r][8 * i..]) & 0x0F0F_0F0F;
            let hi = word(&t[r][8 * i + 4..]) & 0x0F0F_0F0F;
            out[i * 64 + r * 4..i * 64 + r * 4 + 4]
                .copy_from_slice(&(lo | (hi << 4)).to_le_bytes());
        }
    }
}

fn pack_bit4(t: &Tile, out: &mut [u8]) {
    for g in 0..8 {
        let mut m = 0u64;
        for r in 0..RG {
            for e in 0..4 {
                m |= (((t[r][4 * g + e] >> 4) & 1) as u64) << (r * 4 + e);
            }
        }
        out[g * 8..g * 8 + 8].copy_from_slice(&m.to_le_bytes());
    }
}

fn pack_q6_high(t: &Tile, out: &mut [u8]) {
    for h in 0..2 {
        for r in 0..RG {
            for e in 0..4 {
                let mut b = 0u8;
                for i in 0..4 {
                    b |= ((t[r][4 * (4 * h + i) + e] >> 4) & 3) << (2 * i);
                }
                out[h * 64 + r * 4 + e] = b;
            }
        }
    }
}

fn pack_bytes(t: &Tile, out: &mut [u8]) {
    for g in 0..8 {
        for r in 0..RG {
            out[g * 64 + r * 4..g * 64 + r * 4 + 4].copy_from_slice(&t[r][4 * g..4 * g + 4]);
        }
    }
}

/// Write the record of one row group and one block from the 16 decoded row blocks.
fn write_record(kind: Kind, rb: &[RowBlock; RG], out: &mut [u8]) {
    let tile_of = |j: usize| -> Tile {
        let mut t = [[0u8; 32]; RG];
        for r in 0..RG {
            t[r].copy_from_slice(&rb[r].v[32 * j..32 * j + 32]);
        }
        t
    };
    for r in 0..RG {
        out[2 * r..2 * r + 2].copy_from_slice(&rb[r].d.to_le_bytes());
    }
    match kind {
        Kind::Q4_0 | Kind::Q4_1 | Kind::Q5_0 | Kind::Q5_1 | Kind::Q8_0 => {
            let min = matches!(kind, Kind::Q4_1 | Kind::Q5_1);
            if min {
                for r in 0..RG {
                    out[32 + 2 * r..34 + 2 * r].copy_from_slice(&rb[r].m.to_le_bytes());
                }
            }
            let h = a_hdr(min);
            let t = tile_of(0);
            if kind == Kind::Q8_0 {
                pack_bytes(&t, &mut out[h..h + 512]);
            } else {
                pack_nibbles(&t, &mut out[h..h + 256]);
                if matches!(kind, Kind::Q5_0 | Kind::Q5_1) {
                    pack_bit4(&t, &mut out[h + 256..h + 320]);
                }
            }
        }
        Kind::Q4K | Kind::Q5K => {
            for r in 0..RG {
                out[32 + 2 * r..34 + 2 * r].copy_from_slice(&rb[r].m.to_le_bytes());
                for j in 0..8 {
                    out[64 + j * 16 + r] = rb[r].sc[j];
                    out[192 + j * 16 + r] = rb[r].mn[j];
                }
            }
            let sub = if kind == Kind::Q5K { 320 } else { 256 };
            for j in 0..8 {
                let t = tile_of(j);
                let o = K_HDR + j * sub;
                pack_nibbles(&t, &mut out[o..o + 256]);
                if kind == Kind::Q5K {
                    pack_bit4(&t, &mut out[o + 256..o + 320]);
                }
            }
        }
        Kind::Q6K => {
            for r in 0..RG {
                for k in 0..16 {
                    out[32 + k * 16 + r] = rb[r].sc[k];
                }
            }
            for j in 0..8 {
                let t = tile_of(j);
                let o = Q6_HDR + j * 384;
                pack_nibbles(&t, &mut out[o..o + 256]);
                pack_q6_high(&t, &mut out[o + 256..o + 384]);
            }
        }
        Kind::F32 | Kind::F16 | Kind::BF16 => unreachable!(),
    }
}

/// Repack a quantized GGUF tensor (`rows` rows of `cols` elements, `ggml_bb` bytes per GGUF block).
pub(crate) fn repack(
    kind: Kind,
    rows: usize,
    cols: usize,
    ggml_bb: usize,
    bytes: &[u8],
    done: &mut dyn FnMut(std::ops::Range<usize>),
) -> AlignedBuf {
    repack_slabs(kind, rows, cols, ggml_bb, bytes, SLAB_BYTES, done)
}

/// [`repack`] with `slab` source bytes between two calls of `done` (at least one row group).
pub(super) fn repack_slabs(
    kind: Kind,
    rows: usize,
    cols: usize,
    ggml_bb: usize,
    bytes: &[u8],
    slab: usize,
    done: &mut dyn FnMut(std::ops::Range<usize>),
) -> AlignedBuf {
    if kind.is_float() {
        let mut buf = AlignedBuf::zeroed(bytes.len());
        for (i, (dst, src)) in buf
            .as_mut_slice()
            .chunks_mut(slab)
            .zip(bytes.chunks(slab))
            .enumerate()
        {
            dst.copy_from_slice(src);
            done(i * slab..i * slab + src.len());
        }
        return buf;
    }
    let n_blk = cols / kind.block();
    let rec = kind.rec_bytes();
    let n_rg = rows.div_ceil(RG);
    let row_bytes = n_blk * ggml_bb;
    let mut buf = AlignedBuf::zeroed(n_rg * n_blk * rec);
    if n_blk == 0 {
        return buf;
    }
    // Row groups a slab at a time (at least one), each slab's groups over the pool, so that the source bytes of a
    // finished slab can go before the next is read.
    let slab_rg = (slab / (RG * row_bytes)).max(1);
    for (s, slab) in buf
        .as_mut_slice()
        .chunks_mut(slab_rg * n_blk * rec)
        .enumerate()
    {
        slab.par_chunks_mut(n_blk * rec)
            .enumerate()
            .for_each(|(i, out)| {
                let rg = s * slab_rg + i;
                let mut rb = [RowBlock::default(); RG];
                for blk in 0..n_blk {
                    for (r, b) in rb.iter_mut().enumerate() {
                        let row = rg * RG + r;
                        if row < rows {
                            let o = row * row_bytes + blk * ggml_bb;
                            decode_block(kind, &bytes[o..o + ggml_bb], b);
                        } else {
                            *b = RowBlock::default();
                        }
                    }
                    write_record(kind, &rb, &mut out[blk * rec..(blk + 1) * rec]);
                }
            });
        let first = s * slab_rg * RG;
        let end = ((s + 1) * slab_rg * RG).min(rows);
        done(first * row_bytes..end * row_bytes);
    }
    buf
}

/// Source bytes repacked between two calls of [`repack`]'s `done`: small enough that a loader which lets the file's
/// pages go as they are done holds one large tensor about once, large enough to keep the pool busy.
const SLAB_BYTES: usize = 8 << 20;

/// The unsigned value of element `k` (0..32) of row `r` in a packed 32-element slice.
/// `bits`: 4, 5 (masks at `hi`), 6 (high pairs at `hi`) or 8.
#[inline]
fn value(lo: &[u8], hi: &[u8], bits: u32, r: usize, k: usize) -> u8 {
    let (g, e) = (k / 4, k % 4);
    if bits == 8 {
        return lo[g * 64 + r * 4 + e];
    }
    let byte = lo[(g / 2) * 64 + r * 4 + e];
    let mut v = if g % 2 == 0 { byte & 0xF } else { byte >> 4 };
    if bits == 5 {
        let m = u64::from_le_bytes(hi[g * 8..g * 8 + 8].try_into().unwrap());
        v |= (((m >> (r * 4 + e)) & 1) as u8) << 4;
    } else if bits == 6 {
        v |= ((hi[(g / 4) * 64 + r * 4 + e] >> (2 * (g % 4))) & 3) << 4;
    }
    v
}

/// Unpack the values of all 16 rows of a packed 32-element slice (used by the scalar kernels).
#[inline]
pub(crate) fn unpack_tile(lo: &[u8], hi: &[u8], bits: u32, t: &mut Tile) {
    match bits {
        8 => {
            for g in 0..8 {
                for r in 0..RG {
                    t[r][4 * g..4 * g + 4].copy_from_slice(&lo[g * 64 + r * 4..g * 64 + r * 4 + 4]);
                }
            }
        }
        _ => {
            for i in 0..4 {
                for r in 0..RG {
                    for e in 0..4 {
                        let b = lo[i * 64 + r * 4 + e];
                        t[r][8 * i + e] = b & 0xF;
                        t[r][8 * i + 4 + e] = b >> 4;
                    }
                }
            }
            if bits == 5 {
                for g in 0..8 {
                    let m = u64::from_le_bytes(hi[g * 8..g * 8 + 8].try_into().unwrap());
                    for r in 0..RG {
                        for e in 0..4 {
                            t[r][4 * g + e] |= (((m >> (r * 4 + e)) & 1) as u8) << 4;
                        }
                    }
                }
            } else if bits == 6 {
                for g in 0..8 {
                    for r in 0..RG {
                        for e in 0..4 {
                            t[r][4 * g + e] |=
                                ((hi[(g / 4) * 64 + r * 4 + e] >> (2 * (g % 4))) & 3) << 4;
                        }
                    }
                }
            }
        }
    }
}

/// Bits per value of a quantized kind.
pub(crate) fn bits(kind: Kind) -> u32 {
    match kind {
        Kind::Q4_0 | Kind::Q4_1 | Kind::Q4K => 4,
        Kind::Q5_0 | Kind::Q5_1 | Kind::Q5K => 5,
        Kind::Q6K => 6,
        Kind::Q8_0 => 8,
        _ => 32,
    }
}

/// Dequantize row `row` of a packed matrix into `out` (`cols` values), with ggml's arithmetic.
pub(crate) fn dequantize_row(kind: Kind, data: &[u8], cols: usize, row: usize, out: &mut [f32]) {
    match kind {
        Kind::F32 => {
            let src = &data[row * cols * 4..(row + 1) * cols * 4];
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return;
        }
        Kind::F16 | Kind::BF16 => {
            let src = &data[row * cols * 2..(row + 1) * cols * 2];
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                let b = u16::from_le_bytes([c[0], c[1]]);
                *o = if kind == Kind::F16 {
                    fp16(b)
                } else {
                    bf16::from_bits(b).to_f32()
                };
            }
            return;
        }
        _ => {}
    }
    let n_blk = cols / kind.block();
    let rec = kind.rec_bytes();
    let (rg, r) = (row / RG, row % RG);
    let bits = bits(kind);
    for blk in 0..n_blk {
        let p = &data[(rg * n_blk + blk) * rec..(rg * n_blk + blk + 1) * rec];
        let d = fp16(rd16(p, 2 * r));
        match kind {
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 => {
                let h = a_hdr(false);
                let off = match kind {
                    Kind::Q4_0 => 8,
                    Kind::Q5_0 => 16,
                    _ => 128,
                };
                for k in 0..32 {
                    let q = value(&p[h..], &p[h + 256..], bits, r, k) as i32 - off;
                    out[blk * 32 + k] = q as f32 * d;
                }
            }
            Kind::Q4_1 | Kind::Q5_1 => {
                let m = fp16(rd16(p, 32 + 2 * r));
                let h = a_hdr(true);
                for k in 0..32 {
                    let q = value(&p[h..], &p[h + 256..], bits, r, k);
                    out[blk * 32 + k] = q as f32 * d + m;
                }
            }
            Kind::Q4K | Kind::Q5K => {
                let dmin = fp16(rd16(p, 32 + 2 * r));
                let sub = if kind == Kind::Q5K { 320 } else { 256 };
                for j in 0..8 {
                    let d1 = d * p[64 + j * 16 + r] as f32;
                    let m1 = dmin * p[192 + j * 16 + r] as f32;
                    let o = K_HDR + j * sub;
                    for k in 0..32 {
                        let q = value(&p[o..], &p[o + 256..], bits, r, k);
                        out[blk * 256 + j * 32 + k] = d1 * q as f32 - m1;
                    }
                }
            }
            Kind::Q6K => {
                for j in 0..8 {
                    let o = Q6_HDR + j * 384;
                    for k in 0..32 {
                        let sc = p[32 + (2 * j + k / 16) * 16 + r] as i8;
                        let q = value(&p[o..], &p[o + 256..], 6, r, k) as i32 - 32;
                        out[blk * 256 + j * 32 + k] = d * sc as f32 * q as f32;
                    }
                }
            }
            _ => unreachable!(),
        }
    }
}
