//! Shared by the integration tests that need a real model.

use std::path::PathBuf;

/// Path of a known model (smollm2-135m, gemma3-270m), fetched into $HAYLOFT_HOME on first use.
/// Returns None (and says so) when it cannot be had, unless HAYLOFT_REQUIRE_MODELS=1 (CI), where that is a failure.
#[allow(dead_code)]
pub fn model(name: &str) -> Option<PathBuf> {
    match hayloft::fetch::ensure_model(name) {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var("HAYLOFT_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
                panic!("model {name} is required (HAYLOFT_REQUIRE_MODELS=1) but could not be fetched: {e:#}");
            }
            eprintln!("SKIPPED: model {name} unavailable: {e:#}");
            None
        }
    }
}

/// Path of the Paul Graham essay haystack, fetched like the models (same skip / require rules).
#[allow(dead_code)]
pub fn essays() -> Option<PathBuf> {
    match hayloft::eval::haystack::ensure_essays() {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var("HAYLOFT_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
                panic!("the essays are required (HAYLOFT_REQUIRE_MODELS=1) but could not be fetched: {e:#}");
            }
            eprintln!("SKIPPED: essays unavailable: {e:#}");
            None
        }
    }
}
