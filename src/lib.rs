//! hayloft: a long-context LLM inference engine that owns its attention, KV cache and kernels.
//!
//! Layers, bottom up: `gguf` (the file format), `kernels` (quantized matmul, SIMD), `tokenizer`,
//! `kv` (the paged KV cache), `attention` (tiled online-softmax attention over the cache),
//! `model` (one forward pass per architecture), `methods` (KV-cache methods by name), `engine` (sessions, sampling, stats),
//! `eval` (benchmarks and reports), `serve` (the HTTP server), `cli`; `fetch`, `util`, `progress` and (tests only) `testutil` are utilities at
//! the bottom. A module uses only the layers below it (`tests/layers.rs` checks it).

pub mod attention;
pub mod cli;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod methods;
pub mod model;
pub mod progress;
pub mod serve;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;
pub mod tokenizer;
pub mod util;
