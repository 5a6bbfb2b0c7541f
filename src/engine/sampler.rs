//! Token sampling, in llama.cpp's default order: repetition penalty → top-k → top-p → min-p → temperature → draw.
//! Temperature 0 is greedy (argmax after the penalty).

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
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
            self.repeat_penalty > 0.0,
            "--repeat-penalty must be > 0, got {}",
            self.repeat_penalty
        );
        Ok(())
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: u64,
    /// (logit or probability, token id) candidates; reused across steps.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = cfg.seed ^ 0x9E37_79B9_7F4A_7C15;
        Self {
            cfg,
            rng,
            cand: Vec::new(),
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

    /// Picks the next token from `logits` (modified in place by the penalty). `history` = tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            for &t in &history[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repeat_penalty
                    } else {
                        *l * c.repeat_penalty
                    };
                }
            }
        }
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
