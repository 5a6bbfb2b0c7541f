//! Token sampling, in llama.cpp's default order: logit bias → penalties → top-k → top-p → min-p → temperature →
//! draw. Temperature 0 is greedy (argmax after the bias and the penalties).
//!
//! The penalties are llama.cpp's (`llama_sampler_penalties`): over the last `repeat_last_n` tokens of the history
//! (prompt included), each distinct token that occurs `c` times has its logit divided by `repeat_penalty` (multiplied
//! when negative) once, then lowered by `c · frequency_penalty + presence_penalty` (OpenAI's additive penalties).
//!
//! In JSON mode ([`Sampler::with_json`]) the tokens that cannot continue the JSON text (an object, or a value a schema
//! accepts) are banned after the penalties; with a minimum length ([`Sampler::with_ban`], vLLM's `min_tokens`) the
//! tokens that would end the text are banned there for the first draws.

use super::json::JsonConstraint;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Lowers a recent token's logit by this much per occurrence (OpenAI's `frequency_penalty`, −2 to 2; 0 = off).
    pub frequency_penalty: f32,
    /// Lowers every recent token's logit by this much once (OpenAI's `presence_penalty`, −2 to 2; 0 = off).
    pub presence_penalty: f32,
    /// Added to these tokens' logits before anything else (OpenAI's `logit_bias`; −∞ bans a token): (token, bias).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 42,
        }
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be ≥ 0, got {}",
            self.temperature
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.top_p),
            "--top-p must be in [0, 1], got {}",
            self.top_p
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_p),
            "--min-p must be in [0, 1], got {}",
            self.min_p
        );
        anyhow::ensure!(
            self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite(),
            "--repeat-penalty must be > 0, got {}",
            self.repeat_penalty
        );
        for (name, v) in [
            ("--frequency-penalty", self.frequency_penalty),
            ("--presence-penalty", self.presence_penalty),
        ] {
            anyhow::ensure!(
                (-2.0..=2.0).contains(&v),
                "{name} must be between -2 and 2, got {v}"
            );
        }
        for &(t, b) in &self.logit_bias {
            anyhow::ensure!(
                !b.is_nan() && b != f32::INFINITY,
                "--logit-bias for token {t} must be a number or -inf, got {b}"
            );
        }
        Ok(())
    }

    /// Checks the biased tokens against the model's vocabulary (`n_vocab` logits).
    pub fn check_vocab(&self, n_vocab: usize) -> anyhow::Result<()> {
        if let Some(&(t, _)) = self
            .logit_bias
            .iter()
            .find(|&&(t, _)| t as usize >= n_vocab)
        {
            anyhow::bail!(
                "--logit-bias names token {t}, outside the model's vocabulary of {n_vocab}"
            );
        }
        Ok(())
    }
}

/// A `--logit-bias` value as llama.cpp writes it: `TOKEN_ID(+/-)BIAS`, e.g. `15043+1`, `15043-0.5`, `2-inf`.
pub fn parse_logit_bias(s: &str) -> anyhow::Result<(u32, f32)> {
    let bad = || {
        anyhow::anyhow!(
            "--logit-bias '{s}': expected TOKEN_ID(+/-)BIAS, e.g. 15043+1, 15043-0.5 or 15043-inf (the token banned)"
        )
    };
    let at = s.find(['+', '-']).ok_or_else(bad)?;
    let token: u32 = s[..at].parse().map_err(|_| bad())?;
    let bias: f32 = match &s[at..] {
        "-inf" => f32::NEG_INFINITY,
        b => b.parse().map_err(|_| bad())?,
    };
    if !bias.is_finite() && bias != f32::NEG_INFINITY {
        return Err(bad());
    }
    Ok((token, bias))
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: u64,
    /// (logit or probability, token id) candidates; reused across steps.
    cand: Vec<(f32, u32)>,
    /// The penalties' window of recent tokens, sorted; reused across steps.
    recent: Vec<u32>,
    /// JSON mode: only tokens that keep the text the beginning of a JSON object (or of a schema's value) are drawn.
    json: Option<JsonConstraint>,
    /// Tokens never drawn while draws are left ([`Self::with_ban`]).
    ban: Vec<u32>,
    ban_draws: usize,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = cfg.seed ^ 0x9E37_79B9_7F4A_7C15;
        Self {
            cfg,
            rng,
            cand: Vec::new(),
            recent: Vec::new(),
            json: None,
            ban: Vec::new(),
            ban_draws: 0,
        }
    }

    /// Never draws `tokens` in the next `draws` draws (vLLM's `min_tokens`: the end-of-generation and stop tokens).
    pub fn with_ban(mut self, tokens: Vec<u32>, draws: usize) -> Self {
        self.ban = tokens;
        self.ban_draws = draws;
        self
    }

    /// Draws only tokens that keep the generated text the beginning of what `json` asks for ([`JsonConstraint`]).
    pub fn with_json(mut self, json: JsonConstraint) -> Self {
        self.json = Some(json);
        self
    }

    /// JSON mode, and the value is complete: the sequence should end here.
    pub fn json_done(&self) -> bool {
        self.json.as_ref().is_some_and(|j| j.done())
    }

    /// The logit bias, then the penalties (module comment), in place.
    pub fn adjust(&mut self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        for &(t, b) in &c.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if c.repeat_penalty == 1.0 && c.frequency_penalty == 0.0 && c.presence_penalty == 0.0 {
            return;
        }
        let start = history.len().saturating_sub(c.repeat_last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&history[start..]);
        self.recent.sort_unstable();
        for run in self.recent.chunk_by(|a, b| a == b) {
            let Some(l) = logits.get_mut(run[0] as usize) else {
                continue;
            };
            if c.repeat_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / c.repeat_penalty
                } else {
                    *l * c.repeat_penalty
                };
            }
            *l -= run.len() as f32 * c.frequency_penalty + c.presence_penalty;
        }
    }

    fn next_f32(&mut self) -> f32 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from `logits` (modified in place by the bias, the penalties and, in JSON mode, the
    /// tokens that cannot come next). `history` = tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.adjust(logits, history);
        if self.ban_draws > 0 {
            self.ban_draws -= 1;
            for &t in &self.ban {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(j) = &self.json {
            j.mask(logits);
        }
        let next = self.draw(logits);
        if let Some(j) = &mut self.json {
            j.accept(next);
        }
        next
    }

    /// The draw of [`Self::sample`] from adjusted logits.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let c = &self.cfg;
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let (top_k, top_p, min_p, temp) = (c.top_k, c.top_p, c.min_p, c.temperature);
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if top_k > 0 && top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(top_k - 1, by_logit_desc);
            self.cand.truncate(top_k);
        }
        self.cand.sort_unstable_by(by_logit_desc);
        // Probabilities at temperature 1 for the top-p / min-p cuts.
        softmax_in_place(&mut self.cand, 1.0);
        if top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = self.cand.len();
            for (i, &(p, _)) in self.cand.iter().enumerate() {
                cum += p;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if min_p > 0.0 {
            let thresh = self.cand[0].0 * min_p;
            let keep = self.cand.iter().take_while(|c| c.0 >= thresh).count();
            self.cand.truncate(keep.max(1));
        }
        // Re-apply the temperature to the kept candidates' logits.
        for c in self.cand.iter_mut() {
            c.0 = logits[c.1 as usize];
        }
        softmax_in_place(&mut self.cand, temp);
        let r = self.next_f32();
        let mut cum = 0.0;
        for &(p, id) in &self.cand {
            cum += p;
            if r < cum {
                return id;
            }
        }
        self.cand.last().map_or(0, |c| c.1)
    }
}

fn softmax_in_place(c: &mut [(f32, u32)], temp: f32) {
    let m = c.iter().map(|x| x.0).fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for x in c.iter_mut() {
        x.0 = ((x.0 - m) / temp).exp();
        z += x.0;
    }
    for x in c.iter_mut() {
        x.0 /= z;
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_penalty_changes_it() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        let mut l = vec![0.1, 3.0, 2.9, -1.0];
        assert_eq!(s.sample(&mut l.clone(), &[]), 1);
        s.cfg.repeat_penalty = 1.5;
        assert_eq!(s.sample(&mut l, &[1]), 2);
    }

    #[test]
    fn penalties_count_each_recent_token_once_as_llama_cpp_does() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 4,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        });
        let mut l = vec![4.0, -1.0, 3.0, 1.0, 0.0];
        // Token 0 is outside the window of 4; token 2 occurs three times, token 1 once.
        s.adjust(&mut l, &[0, 2, 1, 2, 2]);
        // 2: 3 / 2 once (not 3 / 2³), then − 3 · 0.5 − 0.25; 1: −1 · 2 − 0.5 − 0.25.
        assert_eq!(l, vec![4.0, -2.75, -0.25, 1.0, 0.0]);
        // Off: nothing changes.
        let mut s = Sampler::new(SamplerConfig::default());
        let mut l2 = vec![4.0, -1.0, 3.0];
        s.adjust(&mut l2, &[0, 1, 2, 2]);
        assert_eq!(l2, vec![4.0, -1.0, 3.0]);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let cfg = |bias: Vec<(u32, f32)>| SamplerConfig {
            temperature: 0.0,
            logit_bias: bias,
            ..Default::default()
        };
        let l = vec![0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(cfg(vec![])).sample(&mut l.clone(), &[]), 1);
        let banned = cfg(vec![(1, f32::NEG_INFINITY)]);
        assert_eq!(Sampler::new(banned).sample(&mut l.clone(), &[]), 2);
        let forced = cfg(vec![(3, 100.0)]);
        assert_eq!(Sampler::new(forced.clone()).sample(&mut l.clone(), &[]), 3);
        assert!(forced.check_vocab(4).is_ok());
        assert!(format!("{:#}", forced.check_vocab(3).unwrap_err()).contains("token 3"));
        // Sampled (not greedy) too: a banned token is never drawn.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            logit_bias: vec![(0, f32::NEG_INFINITY)],
            ..Default::default()
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [5.0, 0.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn logit_bias_flags_parse_as_llama_cpp_writes_them() {
        assert_eq!(parse_logit_bias("15043+1").unwrap(), (15043, 1.0));
        assert_eq!(parse_logit_bias("7-0.5").unwrap(), (7, -0.5));
        assert_eq!(parse_logit_bias("2-inf").unwrap(), (2, f32::NEG_INFINITY));
        for bad in ["", "15043", "+1", "x+1", "3+", "3+inf", "3+nan", "-1+2"] {
            let e = parse_logit_bias(bad).unwrap_err();
            assert!(
                format!("{e:#}").contains("TOKEN_ID(+/-)BIAS"),
                "{bad}: {e:#}"
            );
        }
        let c = SamplerConfig {
            frequency_penalty: 2.5,
            ..Default::default()
        };
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("--frequency-penalty"));
    }

    #[test]
    fn sampling_respects_top_k_and_is_seeded() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let logits = vec![5.0, 4.9, 4.8, 4.7, 0.0];
        let mut a = Sampler::new(cfg.clone());
        let mut b = Sampler::new(cfg);
        let mut seen = [0usize; 5];
        for _ in 0..200 {
            let x = a.sample(&mut logits.clone(), &[]);
            assert_eq!(x, b.sample(&mut logits.clone(), &[]));
            seen[x as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(seen[2] + seen[3] + seen[4], 0);
    }

    #[test]
    fn min_p_cuts_unlikely_tokens() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..100 {
            let x = s.sample(&mut [2.0, 2.0, -3.0, -3.0], &[]);
            assert!(x < 2);
        }
    }
}
