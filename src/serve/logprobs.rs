//! Log-probabilities of tokens from a row of logits: the chosen token's and the top alternatives'.

/// One position's log-probabilities: of the token that is there, and of the `top` most likely ones (best first).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// log-softmax of `logits` at `id`, with the `top_n` most likely tokens. Sums in f64, so a 256K vocabulary loses
/// nothing to rounding.
pub fn token_logprob(logits: &[f32], id: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    // The top_n largest, kept sorted best first (top_n is at most a few dozen).
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if top.len() == top_n && top[top_n - 1].1 >= x {
                continue;
            }
            let at = top.partition_point(|&(_, v)| v >= x);
            top.insert(at, (i as u32, x));
            top.truncate(top_n);
        }
    }
    let value = logits
        .get(id as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprob {
        id,
        logprob: lp(value),
        top: top.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top() {
        let l = [1.0f32, 3.0, 2.0, -1.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        let t = token_logprob(&l, 2, 2);
        assert!((t.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((t.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(token_logprob(&l, 0, 0).top.is_empty());
        // Probabilities sum to one.
        let s: f64 = (0..4)
            .map(|i| (token_logprob(&l, i, 0).logprob as f64).exp())
            .sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
