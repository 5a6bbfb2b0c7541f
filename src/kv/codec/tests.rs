use super::*;
use crate::kv::{KvConfig, KvDtype};
use crate::testutil::Rng;

/// Rows like a real cache's: most channels small, a few keys channels large (outliers).
fn rows(n_layers: usize, tokens: usize, seed: u64) -> KvRows {
    let mut rng = Rng::seeded(seed);
    let mut r = KvRows::zeros(n_layers, 2, 16, 8, tokens);
    for (i, x) in r.k.iter_mut().enumerate() {
        let outlier = i % 16 == 3;
        *x = (rng.uniform() + rng.uniform() + rng.uniform()) * if outlier { 20.0 } else { 1.0 };
    }
    r.v.iter_mut()
        .for_each(|x| *x = (rng.uniform() + rng.uniform() + rng.uniform()) * 0.5);
    r.pos
        .iter_mut()
        .enumerate()
        .for_each(|(t, p)| *p = 100 + t as u32);
    r
}

fn cfg(chunk: usize, key_scale: Scale, value_scale: Scale) -> CodecConfig {
    CodecConfig {
        chunk_tokens: chunk,
        key_scale,
        value_scale,
        key_bins: LayerBins::at_layer(1, 32, 16),
        value_bins: LayerBins::at_layer(1, 32, 16),
    }
}

/// What quantization alone gives (no entropy coding): the decoder must reproduce it bit for bit.
fn dequantized(r: &KvRows, c: &CodecConfig) -> KvRows {
    let mut out = r.clone();
    let (mut scales, mut sym) = (Vec::new(), Vec::new());
    for ci in 0..r.tokens.div_ceil(c.chunk_tokens) {
        let a = ci * c.chunk_tokens;
        let part = r.slice(a, (a + c.chunk_tokens).min(r.tokens));
        let n = part.tokens;
        for layer in 0..r.n_layers {
            for head in 0..r.n_heads {
                let s = layer * r.n_heads + head;
                for (is_key, d, bins, scale) in [
                    (true, r.hk, c.key_bins.bins(layer, r.n_layers), c.key_scale),
                    (
                        false,
                        r.hv,
                        c.value_bins.bins(layer, r.n_layers),
                        c.value_scale,
                    ),
                ] {
                    let h = half(bins);
                    let (x, y) = if is_key {
                        (&part.k, &mut out.k)
                    } else {
                        (&part.v, &mut out.v)
                    };
                    quantize(
                        &x[s * n * d..][..n * d],
                        n,
                        d,
                        scale,
                        h,
                        &mut scales,
                        &mut sym,
                    );
                    for t in 0..n {
                        for ch in 0..d {
                            let sc = scales[scale.at(t, ch)].to_f32();
                            y[(s * r.tokens + a + t) * d + ch] =
                                (sym[ch * n + t] as i32 - h) as f32 * (sc / h as f32);
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn round_trip_is_within_the_quantization_bound_and_symbols_are_exact() {
    let quantizing = [Scale::Token, Scale::Channel, Scale::Matrix];
    for key_scale in quantizing {
        for value_scale in quantizing {
            let r = rows(3, 70, 1);
            let c = cfg(32, key_scale, value_scale);
            let blob = encode(&r, &c).unwrap();
            let got = decode(&blob).unwrap();
            assert_eq!(got.pos, r.pos);
            // The symbols survive entropy coding exactly.
            assert!(got == dequantized(&r, &c), "{key_scale:?} {value_scale:?}");
            // Every value within half a level of the max-abs of what its scale covers (per chunk of 32 tokens).
            let hv = r.hv;
            for s in 0..r.n_layers * r.n_heads {
                let h = half(if s / r.n_heads < 1 { 32 } else { 16 }) as f32;
                for a in (0..r.tokens).step_by(32) {
                    let n = 32.min(r.tokens - a);
                    let x = &r.v[(s * r.tokens + a) * hv..][..n * hv];
                    let y = &got.v[(s * r.tokens + a) * hv..][..n * hv];
                    let mut max = vec![0f32; value_scale.count(n, hv)];
                    for (j, v) in x.iter().enumerate() {
                        let m = &mut max[value_scale.at(j / hv, j % hv)];
                        *m = m.max(v.abs());
                    }
                    for (j, (v, w)) in x.iter().zip(y).enumerate() {
                        let m = f16_up(max[value_scale.at(j / hv, j % hv)]).to_f32();
                        assert!((v - w).abs() <= m / (2.0 * h) * 1.0001 + 1e-7, "{v} vs {w}");
                    }
                }
            }
            // Smaller than f16 even on random data in small chunks (their models cost more than on long runs).
            assert!(
                blob.len() * 10 < r.f16_bytes() * 6,
                "{} vs {}",
                blob.len(),
                r.f16_bytes()
            );
        }
    }
}

#[test]
fn channels_alike_share_one_model_and_unlike_ones_get_their_own() {
    // 64 channels, 256 tokens, 31 levels: even channels peaked at the middle level, odd ones spread flat.
    let (d, n, levels) = (64, 256, 31);
    let mut rng = Rng::seeded(11);
    let mut counts = vec![0u32; d * levels];
    for c in 0..d {
        for _ in 0..n {
            let y = if c % 2 == 0 {
                (14 + rng.below(3)).min(30)
            } else {
                rng.below(levels)
            };
            counts[c * levels + y] += 1;
        }
    }
    let mut g = Groups::default();
    group_channels(&counts, d, levels, &mut g);
    assert!(g.n >= 2 && g.n < d / 4, "{} models", g.n);
    // No peaked channel shares a model with a flat one.
    for c in (0..d).step_by(2) {
        for e in (1..d).step_by(2) {
            assert_ne!(g.of[c], g.of[e], "channels {c} and {e}");
        }
    }
    assert_eq!(g.classes.len(), g.n * levels);
    // One kind of channel: one model.
    let same: Vec<u32> = (0..d).flat_map(|_| counts[..levels].to_vec()).collect();
    group_channels(&same, d, levels, &mut g);
    assert_eq!(g.n, 1);
}

#[test]
fn a_prefix_of_chunks_decodes_alone() {
    let r = rows(2, 100, 2);
    let blob = encode(&r, &cfg(32, Scale::Token, Scale::Token)).unwrap();
    let all = decode(&blob).unwrap();
    let two = decode_prefix(&blob, 2).unwrap();
    assert_eq!(two, all.slice(0, 64));
    assert_eq!(header(&blob).unwrap().tokens, 100);
}

#[test]
fn damaged_blobs_are_refused_with_what_is_wrong() {
    let r = rows(2, 100, 3);
    let blob = encode(&r, &cfg(32, Scale::Token, Scale::Token)).unwrap();
    let err = |b: &[u8]| format!("{:#}", decode(b).unwrap_err());
    // A flipped byte in the last chunk: named by its checksum; the chunks before it still decode.
    let mut bad = blob.clone();
    let last = bad.len() - 10;
    bad[last] ^= 0x40;
    assert!(
        err(&bad).contains("chunk 3 checksum mismatch"),
        "{}",
        err(&bad)
    );
    assert!(decode_prefix(&bad, 3).is_ok());
    // Two damaged chunks (they decode in parallel): the first is the one named.
    let at1 = header(&blob).unwrap().chunks[1].0 + 5;
    bad[at1] ^= 0x40;
    assert!(
        err(&bad).contains("chunk 1 checksum mismatch"),
        "{}",
        err(&bad)
    );
    // Truncated anywhere.
    for cut in [3, 14, 20, 60, blob.len() / 2, blob.len() - 1] {
        assert!(
            err(&blob[..cut]).contains("truncated"),
            "cut {cut}: {}",
            err(&blob[..cut])
        );
    }
    // Header damage, magic, version.
    let mut bad = blob.clone();
    bad[17] ^= 1;
    assert!(err(&bad).contains("header checksum"), "{}", err(&bad));
    let mut bad = blob.clone();
    bad[0] = b'X';
    assert!(err(&bad).contains("bad magic"));
    let mut bad = blob.clone();
    bad[8] = 9;
    assert!(err(&bad).contains("version 9"));
    // A chunk whose model count or channel → model map is impossible (checksums made to match): refused by name.
    let h = header(&blob).unwrap();
    let (at, len, _) = h.chunks[0];
    // Chunk 0 starts with 32 positions, then the first key matrix's 32 per-token scales, then its model count.
    let models_at = at + 4 * 32 + 2 * 32;
    for (n_models, what) in [(0u8, "0 entropy models"), (17, "17 entropy models")] {
        let mut bad = blob.clone();
        bad[models_at] = n_models;
        fix_chunk_crc(&mut bad, 0, at, len);
        assert!(err(&bad).contains(what), "{}", err(&bad));
    }
    // Keys whose even channels are near zero and odd ones spread, under one matrix scale: two models and a map.
    let mut r2 = rows(1, 256, 5);
    r2.k.iter_mut()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .for_each(|(_, x)| *x *= 1e-3);
    let two = encode(&r2, &cfg(256, Scale::Matrix, Scale::Token)).unwrap();
    let (at, len, _) = header(&two).unwrap().chunks[0];
    let models_at = at + 4 * 256 + 2;
    assert!(two[models_at] > 1, "{} models", two[models_at]);
    let mut bad = two.clone();
    bad[models_at + 1] = 0xff;
    fix_chunk_crc(&mut bad, 0, at, len);
    assert!(err(&bad).contains("missing entropy model"), "{}", err(&bad));
    // Trailing garbage.
    let mut bad = blob.clone();
    bad.push(0);
    assert!(err(&bad).contains("after the last chunk"));
}

/// Rewrites chunk `ci`'s checksum in the chunk table (and the table's own) after a deliberate change.
fn fix_chunk_crc(blob: &mut [u8], ci: usize, at: usize, len: usize) {
    let crc = crc32fast::hash(&blob[at..at + len]);
    let len_at = 12;
    let hlen = u32::from_le_bytes(blob[len_at..len_at + 4].try_into().unwrap()) as usize;
    let t0 = 16 + hlen + 4;
    let n = u32::from_le_bytes(blob[t0..t0 + 4].try_into().unwrap()) as usize;
    let e = t0 + 4 + ci * 12 + 8;
    blob[e..e + 4].copy_from_slice(&crc.to_le_bytes());
    let table_end = t0 + 4 + n * 12;
    let tcrc = crc32fast::hash(&blob[t0..table_end]);
    blob[table_end..table_end + 4].copy_from_slice(&tcrc.to_le_bytes());
}

/// Scaling `exact` stores an f16 cache's entries as they are: decoding gives them back bit for bit, in every chunk,
/// beside a quantized half of the same blob, at f16's size plus the positions and chunk table.
#[test]
fn exact_matrices_come_back_bit_for_bit() {
    let mut r = rows(3, 70, 9);
    // An f16 cache's entries: f16 values.
    for x in r.k.iter_mut().chain(r.v.iter_mut()) {
        *x = f16::from_f32(*x).to_f32();
    }
    let exact = CodecConfig {
        chunk_tokens: 32,
        ..CodecConfig::exact()
    };
    let blob = encode(&r, &exact).unwrap();
    assert_eq!(decode(&blob).unwrap(), r);
    assert_eq!(decode_prefix(&blob, 1).unwrap(), r.slice(0, 32));
    let overhead = blob.len() - r.f16_bytes();
    assert!(overhead < 4 * r.tokens + 200, "{overhead} bytes past f16's");
    // Exact keys beside quantized values.
    let mixed = cfg(32, Scale::Exact, Scale::Channel);
    let got = decode(&encode(&r, &mixed).unwrap()).unwrap();
    assert_eq!(got.k, r.k);
    assert_eq!(got.v, dequantized_values(&r, &mixed));
    // A damaged exact chunk is refused like any other.
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    let e = format!("{:#}", decode(&bad).unwrap_err());
    assert!(e.contains("checksum"), "{e}");
}

/// The values of `r` as `c` quantizes them (its value scaling must quantize).
fn dequantized_values(r: &KvRows, c: &CodecConfig) -> Vec<f32> {
    let values_only = CodecConfig {
        key_scale: c.value_scale,
        ..c.clone()
    };
    dequantized(r, &values_only).v
}

#[test]
fn scales_parse_and_print_by_name() {
    for s in Scale::ALL {
        assert_eq!(s.to_string().parse::<Scale>().unwrap(), s);
    }
    let e = "rows".parse::<Scale>().unwrap_err().to_string();
    assert!(e.contains("'rows'") && e.contains("matrix"), "{e}");
}

#[test]
fn probabilities_are_a_valid_fixed_point_distribution() {
    let mut p = Vec::new();
    for classes in [vec![0u8; 15], vec![15, 0, 3, 15, 1], vec![1; 31]] {
        probabilities(&classes, &mut p);
        assert_eq!(p.iter().map(|&x| x as u64).sum::<u64>(), 1 << PRECISION);
        assert!(p.iter().all(|&x| x >= 1));
    }
    assert_eq!(
        (class_of(0, 9), class_of(9, 9), class_of(1, 1 << 20)),
        (0, 15, 1)
    );
}

#[test]
fn rows_come_from_and_go_back_into_a_cache() {
    let kc = KvConfig {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim_k: 16,
        head_dim_v: 8,
        block_tokens: 32,
        dtype: KvDtype::F32,
        windows: Vec::new(),
    };
    let r = rows(2, 40, 4);
    let mut cache = KvCache::new(kc.clone());
    r.append_to(&mut cache).unwrap();
    assert_eq!(KvRows::from_cache(&cache, 0, 40).unwrap(), r);
    assert_eq!(KvRows::from_cache(&cache, 8, 40).unwrap(), r.slice(8, 40));
    assert!(KvRows::from_cache(&cache, 0, 41).is_err());
    let wrong = KvRows::zeros(3, 2, 16, 8, 1);
    assert!(wrong.append_to(&mut cache).is_err());
}

#[test]
fn the_table_model_codes_exactly_as_the_categorical_model() {
    // Blobs written with constriction's contiguous categorical model (version 1 as first written) and with ours are
    // the same words: the intervals are the same.
    use constriction::stream::model::DefaultContiguousCategoricalEntropyModel as Categorical;
    let mut rng = Rng::seeded(7);
    let mut buf = Vec::new();
    for levels in [3usize, 7, 15, 31, 63] {
        for round in 0..20 {
            // Peaked histograms (as quantized KV gives) and flat or degenerate ones.
            let classes: Vec<u8> = (0..levels)
                .map(|i| match round % 3 {
                    0 => 15usize.saturating_sub(2 * i.abs_diff(levels / 2)) as u8,
                    1 => rng.below(16) as u8,
                    _ => u8::from(i == round % levels) * 15,
                })
                .collect();
            let n = 300;
            let sym: Vec<usize> = (0..n)
                .map(|t| {
                    let r = rng.below(1 << 20);
                    if t % 3 == 0 {
                        r % levels
                    } else {
                        (levels / 2 + r % 3).min(levels - 1)
                    }
                })
                .collect();
            probabilities(&classes, &mut buf);
            let theirs =
                Categorical::from_nonzero_fixed_point_probabilities(buf.iter().copied(), false)
                    .unwrap();
            let ours = Model::new(&classes, &mut buf);
            let mut a = DefaultRangeEncoder::new();
            a.encode_iid_symbols(sym.iter().copied(), &theirs).unwrap();
            let mut b = DefaultRangeEncoder::new();
            b.encode_iid_symbols(sym.iter().copied(), &ours).unwrap();
            let words = a.into_compressed().unwrap();
            assert_eq!(
                words,
                b.into_compressed().unwrap(),
                "{levels} levels, round {round}"
            );
            let mut d = DefaultRangeDecoder::from_compressed(words).unwrap();
            let table = Model::for_decoding(&classes, &mut buf);
            let back: Vec<usize> = d
                .decode_iid_symbols(n, &table)
                .map(|s| s.unwrap())
                .collect();
            assert_eq!(back, sym);
        }
    }
}

#[test]
fn layer_bins_parse_split_at_a_layer_or_a_share() {
    let b: LayerBins = "2/3:32:64".parse().unwrap();
    assert_eq!(b.split, Split::Share { num: 2, den: 3 });
    assert_eq!(b.to_string(), "2/3:32:64");
    // 30 layers (SmolLM2): the last third, layers 20..30, get 64; 18 layers (Gemma 3 270M): layers 12..18.
    assert_eq!((b.bins(19, 30), b.bins(20, 30)), (32, 64));
    assert_eq!((b.bins(11, 18), b.bins(12, 18)), (32, 64));
    let l: LayerBins = "2:32:16".parse().unwrap();
    assert_eq!(l, LayerBins::at_layer(2, 32, 16));
    assert_eq!(l.to_string(), "2:32:16");
    for bad in [
        "2:32",
        "x:32:16",
        "2/0:32:16",
        "4/3:32:16",
        "2:3:16",
        "2:32:65",
        "1/2/3:32:16",
    ] {
        let e = bad.parse::<LayerBins>().unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}
