//! Sliding-window streams: what a layer with a window keeps, what it frees, and what it refuses. Every check compares a
//! windowed cache with a cache that keeps everything, fed the same entries.

use super::meta::{MetaConfig, PageStat};
use super::offload::{OffloadConfig, Resident};
use super::{KvCache, KvConfig, KvDtype};
use crate::testutil::Rng;

const W: u32 = 10;
const BT: usize = 4;

/// Layer 0 slides with window `W`, layer 1 keeps every entry; 2 KV heads each.
fn cfg(dtype: KvDtype, windowed: bool) -> KvConfig {
    KvConfig {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim_k: 4,
        head_dim_v: 3,
        block_tokens: BT,
        dtype,
        windows: if windowed {
            vec![Some(W), None]
        } else {
            Vec::new()
        },
    }
}

/// Every entry of (layer, head) as (position, key, value).
type Entry = (u32, Vec<f32>, Vec<f32>);

fn entries(c: &KvCache, layer: usize, head: usize) -> Vec<Entry> {
    let (hk, hv) = (c.cfg.head_dim_k, c.cfg.head_dim_v);
    let mut out = Vec::new();
    for b in c.blocks(layer, head) {
        for j in 0..b.n {
            let (mut k, mut v) = (vec![0.0; hk], vec![0.0; hv]);
            b.read_key(j, &mut k);
            b.read_value(j, &mut v);
            out.push((b.pos[j], k, v));
        }
    }
    out
}

/// Appends positions `p0..p0 + n` with random keys and values to both layers of every cache.
fn feed(caches: &mut [&mut KvCache], rng: &mut Rng, p0: u32, n: usize) {
    let pos: Vec<u32> = (p0..p0 + n as u32).collect();
    let c0 = &caches[0].cfg;
    let (kw, vw) = (c0.n_kv_heads * c0.head_dim_k, c0.n_kv_heads * c0.head_dim_v);
    for layer in 0..2 {
        let (k, v) = (rng.vec(n * kw, 1.0), rng.vec(n * vw, 1.0));
        for c in caches.iter_mut() {
            c.append(layer, &pos, &k, &v);
        }
    }
}

/// Bytes of the blocks `c` uses (quantized ones packed), what the byte counter must equal once free blocks are trimmed.
fn blocks_in_use(c: &KvCache) -> usize {
    let (qb, fb) = (
        c.cfg.quant_block_bytes(c.cfg.head_dim_k),
        c.cfg.block_bytes(),
    );
    let mut total = 0;
    for layer in 0..c.cfg.n_layers {
        for h in 0..c.cfg.n_kv_heads {
            let nq = c.quantized_blocks(layer, h);
            total += nq * qb + (c.n_blocks(layer, h) - nq) * fb;
        }
    }
    total + c.meta_bytes()
}

#[test]
fn a_windowed_layer_keeps_what_its_queries_read_and_frees_the_rest() {
    let kivi = KvDtype::Kivi {
        bits: 4,
        residual: 4,
    };
    for dtype in [KvDtype::F16, KvDtype::F32, kivi] {
        let mut win = KvCache::new(cfg(dtype, true));
        let mut full = KvCache::new(cfg(dtype, false));
        let mut rng = Rng(7);
        let mut p = 0u32;
        // Chunks of every size up to 12, then decode steps.
        let chunks: Vec<usize> = (0..40)
            .map(|i| 1 + (i * 7) % 12)
            .chain(std::iter::repeat_n(1, 30))
            .collect();
        for &n in &chunks {
            feed(&mut [&mut win, &mut full], &mut rng, p, n);
            p += n as u32;
            for h in 0..2 {
                let (w, f) = (entries(&win, 0, h), entries(&full, 0, h));
                // What the chunk's first query reads is there, and the entries are those of the full cache, bit
                // for bit (blocks are cut and quantized at the same places).
                let first = w[0].0;
                assert!(first <= (p - n as u32).saturating_sub(W - 1), "{dtype:?}");
                assert_eq!(&f[first as usize..], &w[..], "{dtype:?} at {p}");
                // At most the window, the chunk and the part of the oldest block before them.
                assert!(w.len() <= win.cfg.stream_len(0, p as usize, n), "{dtype:?}");
                assert!(w.len() <= (W as usize + n - 1 + BT - 1));
                assert_eq!(entries(&win, 1, h), entries(&full, 1, h), "global layer");
                if dtype == kivi {
                    assert_eq!(
                        win.quantized_blocks(0, h),
                        full.quantized_blocks(0, h) - first as usize / BT
                    );
                }
            }
        }
        // Decoding: the window plus at most one block.
        for h in 0..2 {
            assert!(win.len(0, h) < W as usize + BT);
            assert!(win.len(0, h) >= W as usize);
        }
        // The byte counter holds only the blocks in use (after the free ones are trimmed), far below the full cache.
        win.trim();
        full.trim();
        assert_eq!(win.bytes(), blocks_in_use(&win), "{dtype:?}");
        assert_eq!(full.bytes(), blocks_in_use(&full), "{dtype:?}");
        let per_stream = full.bytes() / 4;
        assert!(win.bytes() < 3 * per_stream, "{dtype:?}");
        assert!(win.used_bytes() <= win.bytes());
    }
}

#[test]
fn freed_blocks_are_reused_so_memory_stays_flat() {
    let mut c = KvCache::new(cfg(KvDtype::F16, true));
    let mut rng = Rng(3);
    feed(&mut [&mut c], &mut rng, 0, 40);
    let mut windowed_bytes = Vec::new();
    for p in 40..240 {
        feed(&mut [&mut c], &mut rng, p, 1);
        c.trim();
        let global = 2 * c.n_blocks(1, 0) * c.cfg.block_bytes();
        windowed_bytes.push(c.bytes() - global);
    }
    // Layer 0's two streams hold 3 or 4 blocks each (window 10 + one block), never more, however long the stream.
    let bb = c.cfg.block_bytes();
    assert!(windowed_bytes
        .iter()
        .all(|&b| (6 * bb..=8 * bb).contains(&b)));
    assert!(c.peak_bytes() < c.bytes() + 2 * 40usize.div_ceil(BT) * bb);
}

#[test]
fn going_back_behind_the_window_is_refused_unless_held() {
    let mut c = KvCache::new(cfg(KvDtype::F16, true));
    let mut rng = Rng(9);
    feed(&mut [&mut c], &mut rng, 0, 10);
    for p in 10..20 {
        feed(&mut [&mut c], &mut rng, p, 1);
    }
    // The last append (position 19) reads 10..19: blocks 0..3 and 4..7 went, 8..11 stayed.
    assert_eq!(entries(&c, 0, 0)[0].0, 8);
    let before = (entries(&c, 0, 0), entries(&c, 1, 1), c.bytes());
    // A query at 12 reads 3..11: refused, and nothing changed.
    let err = c.truncate_pos(12).unwrap_err().to_string();
    assert!(
        err.contains("sliding-window layer 0") && err.contains("position 12"),
        "{err}"
    );
    assert_eq!((entries(&c, 0, 0), entries(&c, 1, 1), c.bytes()), before);
    // A query at 17 reads 8..16: fine.
    c.truncate_pos(17).unwrap();
    assert_eq!(c.len(1, 0), 17);
    assert_eq!(entries(&c, 0, 0).last().unwrap().0, 16);
    // Back to the start is always possible; clearing forgets what was dropped.
    c.truncate_pos(0).unwrap();
    assert!(c.is_empty());

    // Held at 10: the layer keeps positions 1.. while 40 more tokens go by, so going back to 10 (or later) works and
    // what follows matches a cache that never went anywhere.
    let mut held = KvCache::new(cfg(KvDtype::F16, true));
    let mut plain = KvCache::new(cfg(KvDtype::F16, true));
    let mut rng = Rng(11);
    feed(&mut [&mut held, &mut plain], &mut rng, 0, 10);
    held.hold(Some(10));
    for p in 10..50 {
        feed(&mut [&mut held], &mut rng, p, 1);
    }
    assert_eq!(entries(&held, 0, 1)[0].0, 0);
    assert!(held.check_truncate_pos(10).is_ok() && held.check_truncate_pos(30).is_ok());
    held.truncate_pos(10).unwrap();
    let mut rng2 = Rng(12);
    let mut rng3 = Rng(12);
    for p in 10..30 {
        feed(&mut [&mut held], &mut rng2, p, 1);
        feed(&mut [&mut plain], &mut rng3, p, 1);
    }
    for h in 0..2 {
        let (a, b) = (entries(&held, 0, h), entries(&plain, 0, h));
        // The held cache keeps more (from the hold's window on), and the same entries where both hold them.
        assert!(a.len() > b.len());
        assert_eq!(&a[a.len() - b.len()..], &b[..]);
    }
    // Without the hold, sliding resumes: back to the window plus one block.
    held.hold(None);
    feed(&mut [&mut held], &mut rng2, 30, 1);
    assert!(held.len(0, 0) < W as usize + BT);
    // Going back before the hold's window is refused.
    assert!(held.truncate_pos(5).is_err());
    held.clear();
    assert!(held.check_truncate_pos(25).is_ok());
}

#[test]
fn only_layers_a_selector_reads_keep_page_summaries() {
    // The sliding-window layer (0) keeps none, the other layer the same summaries as in a cache without windows;
    // with `first_layer` 1 (one dense layer) the cache without windows keeps none on layer 0 either. The byte
    // counter counts only the pages kept.
    for stat in [PageStat::MinMax, PageStat::MeanStd] {
        let m = MetaConfig {
            page_tokens: 2,
            stat,
            first_layer: 0,
        };
        let dense1 = MetaConfig {
            first_layer: 1,
            ..m
        };
        let dtype = KvDtype::Kivi {
            bits: 2,
            residual: 4,
        };
        let mut win = KvCache::new(cfg(dtype, true));
        let mut full = KvCache::new(cfg(dtype, false));
        let mut skip = KvCache::new(cfg(dtype, false));
        win.enable_meta(m);
        full.enable_meta(m);
        skip.enable_meta(dense1);
        let mut rng = Rng(5);
        let mut p = 0;
        let page_bytes = crate::kv::meta::page_bytes(win.cfg.head_dim_k);
        for n in [9usize, 1, 1, 5, 1, 13, 1, 1, 1, 7] {
            feed(&mut [&mut win, &mut full, &mut skip], &mut rng, p, n);
            p += n as u32;
            let mut pages = 0;
            for h in 0..2 {
                assert!(win.page_meta(0, h).is_empty() && win.page_codes(0, h).0.is_empty());
                assert!(skip.page_meta(0, h).is_empty() && skip.page_codes(0, h).1.is_empty());
                assert!(!full.page_meta(0, h).is_empty());
                for c in [&win, &skip] {
                    assert_eq!(c.page_meta(1, h), full.page_meta(1, h));
                    assert_eq!(c.page_codes(1, h), full.page_codes(1, h));
                }
                pages += win.len(1, h).div_ceil(m.page_tokens);
            }
            assert_eq!(win.meta_bytes(), pages * page_bytes);
            assert_eq!(skip.meta_bytes(), pages * page_bytes);
        }
        // Asking for summaries from layer 0 on computes them there; asking again for layer 1 on frees them.
        skip.enable_meta(m);
        assert_eq!(skip.page_meta(0, 1), full.page_meta(0, 1));
        assert_eq!(skip.meta_bytes(), full.meta_bytes());
        let before = skip.bytes();
        skip.enable_meta(dense1);
        assert!(skip.page_meta(0, 0).is_empty());
        assert_eq!(before - skip.bytes(), full.meta_bytes() - skip.meta_bytes());
    }
}

#[test]
fn offloaded_blocks_that_slide_out_free_their_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut off = KvCache::new(cfg(KvDtype::F16, true));
    off.enable_offload(&OffloadConfig {
        dir: dir.path().to_path_buf(),
        resident: Resident::Share(0.3),
    })
    .unwrap();
    let mut full = KvCache::new(cfg(KvDtype::F16, false));
    let mut rng = Rng(13);
    let mut p = 0;
    let mut disk_windowed = Vec::new();
    for n in std::iter::once(30).chain(std::iter::repeat_n(1, 60)) {
        feed(&mut [&mut off, &mut full], &mut rng, p, n);
        p += n as u32;
        off.rebalance().unwrap();
        // Every entry reads back as the full cache holds it, on disk or not.
        let first = entries(&off, 0, 0)[0].0 as usize;
        assert_eq!(&entries(&full, 0, 0)[first..], &entries(&off, 0, 0)[..]);
        assert_eq!(entries(&full, 1, 1), entries(&off, 1, 1));
        disk_windowed.push(off.disk_bytes());
    }
    // The disk holds at most what the cache holds: slots of blocks that slid out were freed. (A slot: f16 keys and
    // values, positions, CRC.)
    let slot = 2 * (4 + 3) * BT + 4 * BT + 4;
    let blocks: usize = (0..2)
        .flat_map(|l| (0..2).map(move |h| (l, h)))
        .map(|(l, h)| off.n_blocks(l, h))
        .sum();
    assert!(off.disk_bytes() > 0);
    assert!(off.disk_bytes() <= blocks * slot, "{disk_windowed:?}");
}
