//! Small helpers every layer may use (no dependency on any other module of the crate).

use std::path::Path;

use anyhow::{Context, Result};

/// Reads a text file: a clear error for a missing file or invalid UTF-8.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}
