//! Head ablation, the Retrieval Head paper's masking experiment: which query heads to silence.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::methods::heads::HeadScores;

/// The query-head mask for the masking experiment: the `top` best-scoring heads of a `hayloft heads` file, or (random)
/// `top` heads drawn from the rest.
pub fn head_mask(
    path: &Path,
    n_layers: usize,
    n_heads: usize,
    top: usize,
    random: bool,
    seed: u64,
) -> Result<Vec<bool>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read head scores from {}", path.display()))?;
    let r: HeadScores = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a `hayloft heads` scores file", path.display()))?;
    if r.q_scores.len() != n_layers || r.q_scores.iter().any(|row| row.len() != n_heads) {
        bail!(
            "{}: scores for {} layers × {} query heads, the model has {n_layers} × {n_heads}",
            path.display(),
            r.q_scores.len(),
            r.q_scores.first().map_or(0, Vec::len)
        );
    }
    if top == 0 || top >= n_layers * n_heads / 2 {
        bail!(
            "--mask-top must be between 1 and {} (half the model's query heads)",
            n_layers * n_heads / 2 - 1
        );
    }
    let mut ranked: Vec<(f64, usize)> = r
        .q_scores
        .iter()
        .flatten()
        .copied()
        .enumerate()
        .map(|(i, s)| (s, i))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut mask = vec![false; n_layers * n_heads];
    if random {
        let mut rest: Vec<usize> = ranked[top..].iter().map(|&(_, i)| i).collect();
        rest.sort_unstable();
        super::Rng::new(seed ^ 0x0068_6561_6473).shuffle(&mut rest);
        rest[..top].iter().for_each(|&i| mask[i] = true);
    } else {
        ranked[..top].iter().for_each(|&(_, i)| mask[i] = true);
    }
    Ok(mask)
}
