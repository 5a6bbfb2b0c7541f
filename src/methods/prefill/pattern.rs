//! Per-head sparse prefill patterns and their file.
//!
//! The file (`hayloft patterns` writes it, `--prefill minference@FILE` reads it) is our own JSON:
//! `{"model": name, "layers": L, "q_heads": H, "example": what the search read, "tokens": its length,
//!   heads: [[{"type": "vertical_slash", "vertical": V, "slash": S, "recall": r}, ...H], ...L]}`
//! with types `vertical_slash` (V columns, S diagonals), `block_sparse` (`top_k` 64-token key blocks per 64-query
//! block) and `a_shape` (`init` first keys, `local` last keys). MInference's own files are per query head too (one
//! dict per layer, `[type, v, s, recall]`); a head the search could not score keeps [`DEFAULT`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

/// One query head's pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HeadPattern {
    /// The `vertical` key columns and `slash` diagonals (query − key offsets) the chunk's last 64 queries weigh most.
    VerticalSlash { vertical: usize, slash: usize },
    /// The `top_k` 64-token key blocks whose mean key best matches each 64-query block's mean query.
    BlockSparse { top_k: usize },
    /// The first `init` keys and the last `local` keys of each query (StreamingLLM's Λ shape).
    AShape { init: usize, local: usize },
}

/// MInference's pattern for a head its configuration does not list.
pub const DEFAULT: HeadPattern = HeadPattern::VerticalSlash {
    vertical: 1000,
    slash: 6096,
};

impl HeadPattern {
    /// Sizes must be at least 1 (a head that reads nothing has no softmax).
    pub fn check(&self) -> Result<()> {
        let ok = match *self {
            Self::VerticalSlash { vertical, slash } => vertical >= 1 && slash >= 1,
            Self::BlockSparse { top_k } => top_k >= 1,
            Self::AShape { init, local } => init + local >= 1 && local >= 1,
        };
        if !ok {
            bail!("pattern {self:?}: sizes must be at least 1");
        }
        Ok(())
    }
}

/// One head's entry in the file.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadEntry {
    #[serde(flatten)]
    pub pattern: HeadPattern,
    /// Mean attention mass the pattern kept in the search (0 for a head not searched).
    pub recall: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternFile {
    pub model: String,
    pub layers: usize,
    pub q_heads: usize,
    /// What the search read (prompt kind), and its length in tokens.
    pub example: String,
    pub tokens: usize,
    /// [layer][query head].
    pub heads: Vec<Vec<HeadEntry>>,
}

impl PatternFile {
    /// Reads and checks a file for a model shaped like `mc`.
    pub fn load(path: &Path, mc: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prefill patterns from {}", path.display()))?;
        let f = Self::parse(&text)
            .with_context(|| format!("{}: not a pattern file", path.display()))?;
        if f.layers != mc.n_layers || f.q_heads != mc.n_heads {
            bail!(
                "{}: patterns for {} layers × {} query heads, but the model has {} × {}",
                path.display(),
                f.layers,
                f.q_heads,
                mc.n_layers,
                mc.n_heads
            );
        }
        Ok(f)
    }

    /// Parses and checks the file's own consistency.
    pub fn parse(text: &str) -> Result<Self> {
        let f: Self = serde_json::from_str(text).context(
            "expected an object with model, layers, q_heads, example, tokens and heads: per layer a list of \
             {type: vertical_slash | block_sparse | a_shape, its sizes, recall} per query head",
        )?;
        if f.heads.len() != f.layers || f.heads.iter().any(|r| r.len() != f.q_heads) {
            bail!("'heads' must be {} rows of {} entries", f.layers, f.q_heads);
        }
        for (l, row) in f.heads.iter().enumerate() {
            for (h, e) in row.iter().enumerate() {
                e.pattern
                    .check()
                    .with_context(|| format!("layer {l} head {h}"))?;
            }
        }
        Ok(f)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a pattern file serializes")
    }

    /// Heads per pattern (its Debug text), most common first.
    pub fn mix(&self) -> Vec<(String, usize)> {
        let mut m: Vec<(String, usize)> = Vec::new();
        // Heads the search never scored (recall 0: sliding-window layers, which the run time leaves dense) are not
        // part of the mix.
        for e in self.heads.iter().flatten().filter(|e| e.recall > 0.0) {
            let k = format!("{:?}", e.pattern);
            match m.iter_mut().find(|(n, _)| *n == k) {
                Some((_, c)) => *c += 1,
                None => m.push((k, 1)),
            }
        }
        m.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PatternFile {
        let pats = [
            HeadPattern::VerticalSlash {
                vertical: 30,
                slash: 800,
            },
            HeadPattern::BlockSparse { top_k: 100 },
            HeadPattern::AShape {
                init: 100,
                local: 800,
            },
        ];
        PatternFile {
            model: "tiny".into(),
            layers: 2,
            q_heads: 3,
            example: "kv retrieval".into(),
            tokens: 4096,
            heads: (0..2)
                .map(|l| {
                    (0..3)
                        .map(|h| HeadEntry {
                            pattern: pats[(l + h) % 3],
                            recall: 0.5 + 0.1 * h as f64,
                        })
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn pattern_file_round_trips() {
        let f = sample();
        let back = PatternFile::parse(&f.to_json()).unwrap();
        assert_eq!(back, f);
        assert_eq!(f.mix().iter().map(|m| m.1).sum::<usize>(), 6);
        let mut g = sample();
        g.heads[1].iter_mut().for_each(|e| e.recall = 0.0);
        assert_eq!(g.mix().iter().map(|m| m.1).sum::<usize>(), 3);
    }

    #[test]
    fn malformed_pattern_files_are_clear_errors() {
        let err = |t: &str| format!("{:#}", PatternFile::parse(t).unwrap_err());
        assert!(err("{").contains("expected"));
        let mut f = sample();
        f.heads[1].pop();
        assert!(err(&f.to_json()).contains("2 rows of 3"));
        let t = sample().to_json().replacen("block_sparse", "diagonal", 1);
        assert!(err(&t).contains("expected"));
        let t = sample()
            .to_json()
            .replacen("\"top_k\": 100", "\"top_k\": 0", 1);
        assert!(err(&t).contains("at least 1"), "{}", err(&t));
    }
}
