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

fn cfg(chunk: usize, key_scale: KeyScale) -> CodecConfig {
    CodecConfig {
        chunk_tokens: chunk,
        key_scale,
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
                for (is_key, d, bins) in [
                    (true, r.hk, c.key_bins.bins(layer, r.n_layers)),
                    (false, r.hv, c.value_bins.bins(layer, r.n_layers)),
                ] {
                    let per_token = !is_key || c.key_scale == KeyScale::Token;
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
                        per_token,
                        h,
                        &mut scales,
                        &mut sym,
                    );
                    for t in 0..n {
                        for ch in 0..d {
                            let sc = scales[if per_token { t } else { ch }].to_f32();
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
    for key_scale in [KeyScale::Token, KeyScale::Channel] {
        let r = rows(3, 70, 1);
        let c = cfg(32, key_scale);
        let blob = encode(&r, &c).unwrap();
        let got = decode(&blob).unwrap();
        assert_eq!(got.pos, r.pos);
        // The symbols survive entropy coding exactly.
        assert!(got == dequantized(&r, &c), "{key_scale:?}");
        // Every value within half a level of its scale (per-token values: the row's max-abs).
        let (n, hv) = (r.tokens, r.hv);
        for s in 0..r.n_layers * r.n_heads {
            let h = half(if s / r.n_heads < 1 { 32 } else { 16 }) as f32;
            for t in 0..n {
                let row = &r.v[(s * n + t) * hv..][..hv];
                let m = f16_up(row.iter().fold(0f32, |m, x| m.max(x.abs()))).to_f32();
                for (x, y) in row.iter().zip(&got.v[(s * n + t) * hv..][..hv]) {
                    assert!((x - y).abs() <= m / (2.0 * h) * 1.0001 + 1e-7, "{x} vs {y}");
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

#[test]
fn a_prefix_of_chunks_decodes_alone() {
    let r = rows(2, 100, 2);
    let blob = encode(&r, &cfg(32, KeyScale::Token)).unwrap();
    let all = decode(&blob).unwrap();
    let two = decode_prefix(&blob, 2).unwrap();
    assert_eq!(two, all.slice(0, 64));
    assert_eq!(header(&blob).unwrap().tokens, 100);
}

#[test]
fn damaged_blobs_are_refused_with_what_is_wrong() {
    let r = rows(2, 100, 3);
    let blob = encode(&r, &cfg(32, KeyScale::Token)).unwrap();
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
    // Trailing garbage.
    let mut bad = blob.clone();
    bad.push(0);
    assert!(err(&bad).contains("after the last chunk"));
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
