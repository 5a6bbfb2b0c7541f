//! Log-likelihood of a continuation given a context, scored the way `hayloft perplexity` scores a chunk (one session
//! from an empty cache, log-softmax in f64): lm-evaluation-harness's `loglikelihood` request, computed without the
//! server, so the server's answers (batching, prefix cache, echo logprobs) can be checked against it.

use anyhow::{bail, Result};
use serde::Serialize;

use super::perplexity::nll_of;
use super::Session;

/// One scored (context, continuation) pair: lm-eval's `(logprob, is_greedy)`, plus the tokens scored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairScore {
    /// Σ log p(continuation[i] | context, continuation[..i]), natural log.
    pub logprob: f64,
    /// Every continuation token is the argmax of its position (greedy decoding would produce it).
    pub greedy: bool,
    /// Continuation tokens scored.
    pub n: usize,
}

/// Scores `continuation` after `context` from an empty cache. Both are token ids as sent to the model (no BOS is
/// added); the context must hold at least one token (lm-eval puts BOS or EOS there when its context is empty).
pub fn continuation_logprob(
    session: &mut Session,
    context: &[u32],
    continuation: &[u32],
) -> Result<PairScore> {
    if context.is_empty() {
        bail!("the context is empty: give at least one token (lm-eval sends BOS or EOS for an empty context)");
    }
    if continuation.is_empty() {
        bail!("the continuation is empty: nothing to score");
    }
    // tokens: [context ‖ continuation]; logits at j predict tokens[j + 1].
    let mut tokens = Vec::with_capacity(context.len() + continuation.len());
    tokens.extend_from_slice(context);
    tokens.extend_from_slice(continuation);
    session.reset();
    let (mut logprob, mut greedy) = (0.0f64, true);
    let targets = &tokens;
    session.feed(
        targets,
        context.len() - 1..targets.len() - 1,
        |j, logits| {
            let target = targets[j + 1];
            logprob -= nll_of(logits, target);
            let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            greedy &= logits[target as usize] >= best;
        },
    )?;
    Ok(PairScore {
        logprob,
        greedy,
        n: continuation.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SessionConfig;
    use crate::model::testutil::{write_tiny_llama, TinySpec};
    use crate::model::Model;

    fn tiny() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny_llama(&p, &TinySpec::default()).unwrap();
        let m = Model::load(&p).unwrap();
        (dir, m)
    }

    /// Every position's logits of one pass over `tokens`, [n × vocab].
    fn all_logits(s: &mut Session, tokens: &[u32], vocab: usize) -> Vec<f32> {
        s.reset();
        let mut out = vec![0.0; tokens.len() * vocab];
        s.feed(tokens, 0..tokens.len(), |i, l| {
            out[i * vocab..(i + 1) * vocab].copy_from_slice(l)
        })
        .unwrap();
        out
    }

    #[test]
    fn sums_the_continuations_log_softmax_and_flags_greedy() {
        let (_d, m) = tiny();
        let vocab = m.config().vocab;
        let mut s = Session::new(&m, SessionConfig::for_model(&m)).unwrap();
        let ctx: Vec<u32> = (0..9).map(|i| (i * 37 + 11) % vocab as u32).collect();
        let cont: Vec<u32> = vec![5, 17, 3];
        let all: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
        let logits = all_logits(&mut s, &all, vocab);
        let want: f64 = (0..cont.len())
            .map(|k| {
                let j = ctx.len() - 1 + k;
                -nll_of(&logits[j * vocab..(j + 1) * vocab], all[j + 1])
            })
            .sum();
        let got = continuation_logprob(&mut s, &ctx, &cont).unwrap();
        assert_eq!(got.n, 3);
        assert!(got.logprob < 0.0);
        assert!(
            (got.logprob - want).abs() < 1e-4,
            "{} vs {want}",
            got.logprob
        );
        // A second pair on the same session is scored from an empty cache: the same answer again.
        assert_eq!(continuation_logprob(&mut s, &ctx, &cont).unwrap(), got);

        // The greedy continuation (argmax after argmax) is flagged greedy, a changed last token is not.
        let mut greedy_cont = Vec::new();
        let mut seq = ctx.clone();
        for _ in 0..3 {
            let l = all_logits(&mut s, &seq, vocab);
            let row = &l[(seq.len() - 1) * vocab..];
            let best = (0..vocab)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap() as u32;
            greedy_cont.push(best);
            seq.push(best);
        }
        assert!(
            continuation_logprob(&mut s, &ctx, &greedy_cont)
                .unwrap()
                .greedy
        );
        let mut other = greedy_cont.clone();
        other[2] = (other[2] + 1) % vocab as u32;
        assert!(!continuation_logprob(&mut s, &ctx, &other).unwrap().greedy);
    }

    #[test]
    fn empty_parts_and_bad_ids_are_errors_not_panics() {
        let (_d, m) = tiny();
        let vocab = m.config().vocab as u32;
        let mut s = Session::new(&m, SessionConfig::for_model(&m)).unwrap();
        let e = continuation_logprob(&mut s, &[], &[1]).unwrap_err();
        assert!(e.to_string().contains("context is empty"), "{e}");
        let e = continuation_logprob(&mut s, &[1], &[]).unwrap_err();
        assert!(e.to_string().contains("continuation is empty"), "{e}");
        let e = continuation_logprob(&mut s, &[1], &[vocab]).unwrap_err();
        assert!(
            format!("{e:#}").contains("outside the model's vocabulary"),
            "{e:#}"
        );
        // The session still scores afterwards.
        assert!(continuation_logprob(&mut s, &[1, 2], &[3]).is_ok());
    }
}
