//! Snapshots ([`Snapshot`]: the whole state of a compressed session after an exact prefix) as self-checking blobs
//! for the tiers below RAM. The codec does not fit them: its runs hold the same positions in every stream, while a
//! compressed cache keeps different entries per (layer, KV head). So the format is raw: every stream's positions,
//! keys and values at the cache's precision (f16, or f32 for f32 caches; KIVI caches as their dequantized f16, quantized
//! again on restore), the accumulated attention and recorded queries that methods read next, all under one CRC-32.
//!
//! Not stored (the tiers then keep no snapshot for the session, RAM still does): caches with pruned key channels
//! or offloaded blocks, and streams whose entries are not in increasing position order.
//!
//! ```text
//! magic "HLKVSNAP"  u16 version  u16 flags(0)  u64 body length  u32 crc32 of the body
//! body: u32 n_layers, n_kv_heads, head_dim_k, head_dim_v; u8 precision (2: f16, 4: f32); u64 since_compress
//!       u32 n_tokens, u32 tokens[n_tokens]
//!       per stream (layer-major): u32 len, u32 pos[len], keys[len × head_dim_k], values[len × head_dim_v]
//!       u8 acc on; if on, per stream: u32 len, f32[len]
//!       u32 query capacity, u32 row; per layer: u32 rows, then per row: u32 pos, f32[row]
//! ```

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use super::entry::Snapshot;
use crate::engine::Session;
use crate::kv::{BlockData, KvDtype};
use crate::model::query_window::QueryWindow;

const MAGIC: &[u8; 8] = b"HLKVSNAP";
const VERSION: u16 = 1;
const HEAD: usize = 8 + 2 + 2 + 8 + 4;

/// A decoded snapshot blob, checked for shape; [`SnapBlob::restore`] puts it into a session.
pub struct SnapBlob {
    shape: [usize; 4],
    since_compress: usize,
    pub(super) tokens: Vec<u32>,
    /// Per stream: positions, keys (len × hk), values (len × hv).
    streams: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)>,
    acc: Option<Vec<Vec<f32>>>,
    /// Capacity, row, and per layer the rows (position, query row) oldest first.
    queries: (usize, usize, Vec<QueryRows>),
}

/// One layer's recorded queries: (position, row of n_q_heads · head_dim_k floats), oldest first.
type QueryRows = Vec<(u32, Vec<f32>)>;

/// Encodes `snap`; None when the tiers cannot hold this kind of cache (see the module documentation).
pub fn encode(snap: &Snapshot) -> Option<Vec<u8>> {
    let c = &snap.cache.cfg;
    let (nl, nh, hk, hv) = (c.n_layers, c.n_kv_heads, c.head_dim_k, c.head_dim_v);
    let prec: usize = if c.dtype == KvDtype::F32 { 4 } else { 2 };
    let mut b = Vec::new();
    for x in [nl, nh, hk, hv] {
        put32(&mut b, x);
    }
    b.push(prec as u8);
    b.extend_from_slice(&(snap.since_compress as u64).to_le_bytes());
    put32(&mut b, snap.tokens.len());
    snap.tokens.iter().for_each(|&t| put32(&mut b, t as usize));
    // One entry at a time: rows hk + hv floats.
    let (mut k, mut v) = (vec![0f32; hk], vec![0f32; hv]);
    for layer in 0..nl {
        for head in 0..nh {
            if snap.cache.key_channels(layer, head).is_some() {
                return None;
            }
            let n = snap.cache.len(layer, head);
            let blocks = snap.cache.n_blocks(layer, head);
            if (0..blocks)
                .any(|i| matches!(snap.cache.block(layer, head, i).data, BlockData::Disk(_)))
            {
                return None;
            }
            put32(&mut b, n);
            let mut rows = Vec::with_capacity(n * (hk + hv) * prec);
            let mut last = None;
            for i in 0..n {
                let p = snap.cache.read(layer, head, i, &mut k, &mut v);
                if last.is_some_and(|l| p <= l) {
                    return None;
                }
                last = Some(p);
                put32(&mut b, p as usize);
                for x in k.iter().chain(&v) {
                    if prec == 4 {
                        rows.extend_from_slice(&x.to_le_bytes());
                    } else {
                        rows.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
                    }
                }
            }
            b.extend_from_slice(&rows);
        }
    }
    if snap.acc.is_on() {
        b.push(1);
        for si in 0..nl * nh {
            let a = snap.acc.acc.get(si).map_or(&[][..], |a| &a[..]);
            put32(&mut b, a.len());
            a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        }
    } else {
        b.push(0);
    }
    let obs = &snap.obs;
    let (cap, row) = (obs.capacity(), obs.row());
    put32(&mut b, cap);
    put32(&mut b, row);
    let (mut q, mut pos) = (Vec::new(), Vec::new());
    let layers = if cap == 0 { 0 } else { nl };
    for layer in 0..layers {
        let heads = row.checked_div(hk).unwrap_or(0);
        obs.gather(layer, 0..heads, hk, cap, &mut q, &mut pos);
        put32(&mut b, pos.len());
        for (t, &p) in pos.iter().enumerate() {
            put32(&mut b, p as usize);
            q[t * row..(t + 1) * row]
                .iter()
                .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        }
    }
    let mut out = Vec::with_capacity(HEAD + b.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    out.extend_from_slice(&b);
    Some(out)
}

fn put32(b: &mut Vec<u8>, x: usize) {
    b.extend_from_slice(&(x as u32).to_le_bytes());
}

/// A cursor over a checked body: every read names what ran short.
struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        ensure!(self.0.len() >= n, "snapshot blob ends inside {what}");
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<usize> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn f32s(&mut self, n: usize, prec: usize, what: &str) -> Result<Vec<f32>> {
        let bytes = n
            .checked_mul(prec)
            .context("snapshot blob: a length overflows")?;
        let b = self.take(bytes, what)?;
        Ok(if prec == 4 {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        })
    }
}

/// Checks and decodes a blob (magic, version, length, CRC, then every length against what is left).
pub fn decode(blob: &[u8]) -> Result<SnapBlob> {
    ensure!(
        blob.len() >= HEAD && &blob[..8] == MAGIC,
        "not a snapshot blob"
    );
    let version = u16::from_le_bytes([blob[8], blob[9]]);
    ensure!(
        version == VERSION,
        "snapshot blob version {version} (this build reads {VERSION})"
    );
    let len = u64::from_le_bytes(blob[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(blob[20..24].try_into().expect("4 bytes"));
    let body = &blob[HEAD..];
    ensure!(
        body.len() as u64 == len,
        "snapshot blob truncated or padded: {} body bytes, header says {len}",
        body.len()
    );
    ensure!(
        crc32fast::hash(body) == crc,
        "snapshot blob checksum mismatch"
    );
    let mut r = Rd(body);
    let mut shape = [0; 4];
    for s in &mut shape {
        *s = r.u32("the shape")?;
    }
    let [nl, nh, hk, hv] = shape;
    let prec = r.u8("the precision")? as usize;
    ensure!(prec == 2 || prec == 4, "snapshot blob precision {prec}");
    let since = r.take(8, "the header")?;
    let since_compress = u64::from_le_bytes(since.try_into().expect("8 bytes")) as usize;
    let n = r.u32("the token count")?;
    let tokens = (0..n)
        .map(|_| r.u32("the tokens").map(|t| t as u32))
        .collect::<Result<Vec<u32>>>()?;
    let mut streams = Vec::new();
    for _ in 0..nl * nh {
        let len = r.u32("a stream length")?;
        ensure!(len <= r.0.len() / 4, "snapshot blob ends inside a stream");
        let pos = (0..len)
            .map(|_| r.u32("positions").map(|p| p as u32))
            .collect::<Result<Vec<u32>>>()?;
        let mut k = Vec::with_capacity(len * hk);
        let mut v = Vec::with_capacity(len * hv);
        for _ in 0..len {
            k.extend(r.f32s(hk, prec, "keys")?);
            v.extend(r.f32s(hv, prec, "values")?);
        }
        streams.push((pos, k, v));
    }
    let acc = match r.u8("the attention flag")? {
        0 => None,
        _ => Some(
            (0..nl * nh)
                .map(|_| {
                    let n = r.u32("accumulated attention")?;
                    r.f32s(n, 4, "accumulated attention")
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let (cap, row) = (r.u32("the queries")?, r.u32("the queries")?);
    let layers = if cap == 0 { 0 } else { nl };
    let mut rows = Vec::new();
    for _ in 0..layers {
        let m = r.u32("the queries")?;
        ensure!(
            m <= cap,
            "snapshot blob: {m} query rows in a window of {cap}"
        );
        rows.push(
            (0..m)
                .map(|_| Ok((r.u32("queries")? as u32, r.f32s(row, 4, "queries")?)))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    ensure!(
        r.0.is_empty(),
        "snapshot blob: {} bytes past its end",
        r.0.len()
    );
    Ok(SnapBlob {
        shape,
        since_compress,
        tokens,
        streams,
        acc,
        queries: (cap, row, rows),
    })
}

impl SnapBlob {
    /// Puts this state into the empty session `s` (made with the configuration the namespace names).
    pub fn restore(&self, s: &mut Session) -> Result<()> {
        let c = s.cache.cfg.clone();
        let want = [c.n_layers, c.n_kv_heads, c.head_dim_k, c.head_dim_v];
        if self.shape != want {
            bail!(
                "the snapshot's cache shape {:?} is not this session's {want:?}",
                self.shape
            );
        }
        let obs = &s.scratch.seq.obs;
        let (cap, row, rows) = &self.queries;
        if (obs.capacity(), obs.row()) != (*cap, *row) || s.acc.is_on() != self.acc.is_some() {
            bail!("the snapshot was taken from a session that records different observations");
        }
        let (nh, hk, hv) = (c.n_kv_heads, c.head_dim_k, c.head_dim_v);
        s.reset();
        for layer in 0..c.n_layers {
            let streams = &self.streams[layer * nh..(layer + 1) * nh];
            // Every position some head of the layer keeps, in order; each head then keeps its own.
            let mut all: Vec<u32> = streams.iter().flat_map(|(p, _, _)| p.clone()).collect();
            all.sort_unstable();
            all.dedup();
            if all.is_empty() {
                continue;
            }
            // Shapes: all.len() × (nh · hk) keys and all.len() × (nh · hv) values, zero where a head lacks the entry.
            let mut k = vec![0f32; all.len() * nh * hk];
            let mut v = vec![0f32; all.len() * nh * hv];
            for (h, (pos, sk, sv)) in streams.iter().enumerate() {
                let mut j = 0;
                for (t, p) in all.iter().enumerate() {
                    if pos.get(j) == Some(p) {
                        k[(t * nh + h) * hk..][..hk].copy_from_slice(&sk[j * hk..][..hk]);
                        v[(t * nh + h) * hv..][..hv].copy_from_slice(&sv[j * hv..][..hv]);
                        j += 1;
                    }
                }
                if j != pos.len() {
                    s.reset();
                    bail!("the snapshot's stream ({layer}, {h}) is not in position order");
                }
            }
            s.cache.append(layer, &all, &k, &v);
            for (h, (pos, _, _)) in streams.iter().enumerate() {
                if pos.len() < all.len() {
                    s.cache
                        .retain(layer, h, |_, p| pos.binary_search(&p).is_ok());
                }
            }
        }
        if let Some(acc) = &self.acc {
            for (si, a) in acc.iter().enumerate() {
                if let Some(dst) = s.acc.acc.get_mut(si) {
                    dst.clone_from(a);
                }
            }
        }
        let n_layers = s.model.config().n_layers;
        let mut w = QueryWindow::new(n_layers, *row, *cap);
        for (layer, rs) in rows.iter().enumerate().take(n_layers) {
            for (p, q) in rs {
                w.record(layer, q, &[*p]);
            }
        }
        s.scratch.seq.obs = w;
        s.tokens = self.tokens.clone();
        s.since_compress = self.since_compress;
        s.end_prefill();
        s.cache.rebalance()?;
        Ok(())
    }
}
