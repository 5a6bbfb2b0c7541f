//! Portable kernels: the reference the SIMD paths are tested against, and the fallback elsewhere.
//! They read the same packed layout and do the same integer arithmetic as the SIMD kernels.

use super::layout::{a_hdr, bits, unpack_tile, Kind, K_HDR, Q6_HDR, RG};
use super::Ctx;
use half::{bf16, f16};

const TT: usize = 8;

/// Compute `y` for row groups `rg0..rg1` and tokens `t0..t1`.
///
/// # Safety
/// `c` must describe live buffers of the sizes its fields imply; no other thread may write the same
/// part of `y`.
pub(crate) unsafe fn run(c: &Ctx, rg0: usize, rg1: usize, t0: usize, t1: usize) {
    for rg in rg0..rg1 {
        let mut t = t0;
        while t < t1 {
            let nt = (t1 - t).min(TT);
            match c.kind {
                Kind::F32 | Kind::F16 | Kind::BF16 => float_tile(c, rg, t, nt),
                Kind::Q4K | Kind::Q5K | Kind::Q6K => k_tile(c, rg, t, nt),
                _ => a_tile(c, rg, t, nt),
            }
            t += nt;
        }
    }
}

#[inline]
fn fp16(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

#[inline]
unsafe fn rd16(p: *const u8) -> u16 {
    u16::from_le_bytes([*p, *p.add(1)])
}

unsafe fn store(c: &Ctx, rg: usize, t0: usize, acc: &[[f32; RG]; TT], nt: usize) {
    let nr = (c.rows - rg * RG).min(RG);
    for (t, a) in acc.iter().enumerate().take(nt) {
        let y = c.y.add((t0 + t) * c.rows + rg * RG);
        for (r, &v) in a.iter().enumerate().take(nr) {
            *y.add(r) = v;
        }
    }
}

unsafe fn a_tile(c: &Ctx, rg: usize, t0: usize, nt: usize) {
    let min = matches!(c.kind, Kind::Q4_1 | Kind::Q5_1);
    let bits = bits(c.kind);
    let h = a_hdr(min);
    let qlen = if bits == 8 { 512 } else { 256 };
    let mut acc = [[0f32; RG]; TT];
    let mut tile = [[0u8; 32]; RG];
    for kb in 0..c.n_blk {
        let p = c.data.add((rg * c.n_blk + kb) * c.rec);
        let rec = std::slice::from_raw_parts(p, c.rec);
        unpack_tile(
            &rec[h..h + qlen],
            &rec[(h + 256).min(c.rec)..],
            bits,
            &mut tile,
        );
        let mut dv = [0f32; RG];
        let mut mv = [0f32; RG];
        for r in 0..RG {
            dv[r] = fp16(rd16(p.add(2 * r)));
            if min {
                mv[r] = fp16(rd16(p.add(32 + 2 * r)));
            }
        }
        for (t, acc) in acc.iter_mut().enumerate().take(nt) {
            let ab = (t0 + t) * c.n_blk + kb;
            let qa = std::slice::from_raw_parts(c.qa.add((t0 + t) * c.cols + kb * 32), 32);
            let da = *c.f1.add(ab);
            let init = if min { 0 } else { *c.i1.add(ab) };
            let sa = if min { *c.f2.add(ab) } else { 0.0 };
            for r in 0..RG {
                let mut s = init;
                for k in 0..32 {
                    s += tile[r][k] as i32 * qa[k] as i32;
                }
                acc[r] += s as f32 * (dv[r] * da);
                if min {
                    acc[r] += mv[r] * sa;
                }
            }
        }
    }
    store(c, rg, t0, &acc, nt);
}

unsafe fn k_tile(c: &Ctx, rg: usize, t0: usize, nt: usize) {
    let bits = bits(c.kind);
    let mut acc = [[0f32; RG]; TT];
    let mut tile = [[0u8; 32]; RG];
    for sb in 0..c.n_blk {
        let p = c.data.add((rg * c.n_blk + sb) * c.rec);
        let rec = std::slice::from_raw_parts(p, c.rec);
        let mut dv = [0f32; RG];
        let mut dmin = [0f32; RG];
        for r in 0..RG {
            dv[r] = fp16(rd16(p.add(2 * r)));
            if c.kind != Kind::Q6K {
                dmin[r] = fp16(rd16(p.add(32 + 2 * r)));
            }
        }
        for j in 0..8 {
            if c.kind == Kind::Q6K {
                let o = Q6_HDR + j * 384;
                unpack_tile(&rec[o..o + 256], &rec[o + 256..o + 384], 6, &mut tile);
                let mut sc = [[0f32; RG]; 2];
                for (h, s) in sc.iter_mut().enumerate() {
                    for r in 0..RG {
                        s[r] = (rec[32 + (2 * j + h) * 16 + r] as i8) as f32 * dv[r];
                    }
                }
                for (t, acc) in acc.iter_mut().enumerate().take(nt) {
                    let ab = (t0 + t) * c.n_blk + sb;
                    let qa = std::slice::from_raw_parts(
                        c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32),
                        32,
                    );
                    let dy = *c.f1.add(ab);
                    for h in 0..2 {
                        let init = *c.i1.add(ab * 16 + 2 * j + h);
                        for r in 0..RG {
                            let mut s = init;
                            for k in 16 * h..16 * h + 16 {
                                s += tile[r][k] as i32 * qa[k] as i32;
                            }
                            acc[r] += s as f32 * (sc[h][r] * dy);
                        }
                    }
                }
            } else {
                let sub = if c.kind == Kind::Q5K { 320 } else { 256 };
                let o = K_HDR + j * sub;
                unpack_tile(
                    &rec[o..o + 256],
                    &rec[(o + 256).min(c.rec)..],
                    bits,
                    &mut tile,
                );
                let mut scd = [0f32; RG];
                let mut mnd = [0f32; RG];
                for r in 0..RG {
                    scd[r] = rec[64 + j * 16 + r] as f32 * dv[r];
                    mnd[r] = rec[192 + j * 16 + r] as f32 * dmin[r];
                }
                for (t, acc) in acc.iter_mut().enumerate().take(nt) {
                    let ab = (t0 + t) * c.n_blk + sb;
                    let qa = std::slice::from_raw_parts(
                        c.qa.add((t0 + t) * c.cols + sb * 256 + j * 32),
                        32,
                    );
                    let dy = *c.f1.add(ab);
                    let bs = *c.f2.add(ab * 8 + j);
                    for r in 0..RG {
                        let mut s = 0i32;
                        for k in 0..32 {
                            s += tile[r][k] as i32 * qa[k] as i32;
                        }
                        acc[r] += s as f32 * (scd[r] * dy);
                        acc[r] -= mnd[r] * bs;
                    }
                }
            }
        }
    }
    store(c, rg, t0, &acc, nt);
}

unsafe fn float_tile(c: &Ctx, rg: usize, t0: usize, nt: usize) {
    let nr = (c.rows - rg * RG).min(RG);
    for r in rg * RG..rg * RG + nr {
        for t in t0..t0 + nt {
            let x = std::slice::from_raw_parts(c.fx.add(t * c.cols), c.cols);
            let mut s = 0f32;
            match c.kind {
                Kind::F32 => {
                    let w = c.data.add(r * c.cols * 4) as *const f32;
                    for (k, &xv) in x.iter().enumerate() {
                        s += w.add(k).read_unaligned() * xv;
                    }
                }
                Kind::F16 => {
                    let w = c.data.add(r * c.cols * 2) as *const u16;
                    for (k, &xv) in x.iter().enumerate() {
                        s += fp16(w.add(k).read_unaligned()) * xv;
                    }
                }
                _ => {
                    let w = c.data.add(r * c.cols * 2) as *const u16;
                    for (k, &xv) in x.iter().enumerate() {
                        s += bf16::from_bits(w.add(k).read_unaligned()).to_f32() * xv;
                    }
                }
            }
            *c.y.add(t * c.rows + r) = s;
        }
    }
}
