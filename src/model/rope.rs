//! RoPE frequency scaling a GGUF declares (`<arch>.rope.scaling.*`), applied as llama.cpp applies it: linear
//! (position interpolation: every angle × 1/factor) and YaRN (interpolate the low frequencies, keep the high ones,
//! ramp in between, and scale cos/sin by an attention factor).
//!
//! YaRN, per rotated pair i of `rope_dim` dimensions (θ_i = pos · base^(−2i/rope_dim)):
//! `low/high = floor/ceil(rope_dim · ln(orig_ctx / (β · 2π)) / (2 ln base))` for β = β_fast, β_slow (clamped to
//! [0, rope_dim − 1]); `ramp_i = 1 − clamp((i − low) / max(0.001, high − low), 0, 1)`;
//! angle = θ_i/factor · (1 − ramp_i) + θ_i · ramp_i; cos and sin are multiplied by
//! `mscale = attn_factor · m(factor, 1) / m(factor, log_mul)` with `m(s, k) = 1 + 0.1 · k · ln s` (1 for s ≤ 1), or
//! `attn_factor · m(factor, 1)` when the file gives no `yarn_log_multiplier`.
//!
//! Frequency factors (`rope_freqs.weight`, written for Llama 3.1 and later, whose "llama3" scaling the converter bakes
//! into one factor per rotated pair): θ_i is divided by factor i before any scaling above, as llama.cpp's
//! `freq_factors` are applied.

use anyhow::{bail, Result};

use super::blocks::rope_tables_factored;
use crate::gguf::GgufFile;

/// How the RoPE angles are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Angles × 1/factor; cos and sin × `attn_factor` (`rope.scaling.attn_factor`, which llama.cpp applies whatever
    /// the scaling type: Phi-3's LongRoPE files give one with no type and no factor).
    Linear {
        factor: f32,
        attn_factor: f32,
    },
    Yarn(Yarn),
}

/// YaRN parameters (llama.cpp's defaults where the GGUF is silent: β_fast 32, β_slow 1, attention factor 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    /// Context the model was trained for before scaling.
    pub orig_ctx: u32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// `rope.scaling.attn_factor`: multiplies cos and sin.
    pub attn_factor: f32,
    /// `rope.scaling.yarn_log_multiplier` (0 = absent).
    pub log_mul: f32,
}

impl RopeScaling {
    /// Reads `<arch>.rope.scaling.{type,factor,original_context_length,attn_factor,yarn_*}`. No type, "none", or a
    /// factor of 0 or 1 mean no scaling (llama.cpp's reading); a type hayloft does not implement is an error.
    pub fn from_gguf(g: &GgufFile, arch: &str, ctx_len: usize) -> Result<Self> {
        let key = |k: &str| format!("{arch}.rope.scaling.{k}");
        let factor = match g.get_f64(&key("factor"))? {
            Some(f) => f,
            None => g
                .get_f64(&format!("{arch}.rope.scale_linear"))?
                .unwrap_or(0.0),
        } as f32;
        let ty = g.get_str(&key("type"))?.unwrap_or("linear");
        if !(factor.is_finite() && factor >= 0.0) {
            bail!(
                "{}: {} is {factor}, expected a positive number",
                g.path.display(),
                key("factor")
            );
        }
        let factor = if factor == 0.0 { 1.0 } else { factor };
        let attn_factor = g.get_f64(&key("attn_factor"))?.map_or(1.0, |v| v as f32);
        if !(attn_factor.is_finite() && attn_factor > 0.0) {
            bail!(
                "{}: {} is {attn_factor}, expected a positive number",
                g.path.display(),
                key("attn_factor")
            );
        }
        Ok(match ty {
            "none" | "linear" if factor == 1.0 && attn_factor == 1.0 => RopeScaling::None,
            "none" => RopeScaling::Linear {
                factor: 1.0,
                attn_factor,
            },
            "linear" => RopeScaling::Linear {
                factor,
                attn_factor,
            },
            "yarn" => {
                let orig = g
                    .get_u64(&key("original_context_length"))?
                    .unwrap_or(ctx_len as u64);
                if orig == 0 || orig > u32::MAX as u64 {
                    bail!(
                        "{}: {} is {orig}",
                        g.path.display(),
                        key("original_context_length")
                    );
                }
                let f = |k: &str, default: f32| -> Result<f32> {
                    Ok(g.get_f64(&key(k))?.map_or(default, |v| v as f32))
                };
                RopeScaling::Yarn(Yarn {
                    factor,
                    orig_ctx: orig as u32,
                    beta_fast: f("yarn_beta_fast", 32.0)?,
                    beta_slow: f("yarn_beta_slow", 1.0)?,
                    attn_factor,
                    log_mul: f("yarn_log_multiplier", 0.0)?,
                })
            }
            other => bail!(
                "{}: {} is '{other}'; hayloft implements none, linear and yarn",
                g.path.display(),
                key("type")
            ),
        })
    }

    /// Fills cos/sin tables (n_tok × rope_dim/2) for positions `pos`, scaled as declared, with pair i's frequency
    /// divided by `factors[i]` where the model has frequency factors (rope_dim/2 of them).
    pub fn tables(
        &self,
        pos: &[u32],
        rope_dim: usize,
        base: f32,
        factors: Option<&[f32]>,
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        match self {
            RopeScaling::None => rope_tables_factored(pos, rope_dim, base, 1.0, factors, cos, sin),
            RopeScaling::Linear {
                factor,
                attn_factor,
            } => {
                rope_tables_factored(pos, rope_dim, base, 1.0 / factor, factors, cos, sin);
                if *attn_factor != 1.0 {
                    let n = pos.len() * (rope_dim / 2);
                    for x in cos[..n].iter_mut().chain(sin[..n].iter_mut()) {
                        *x *= attn_factor;
                    }
                }
            }
            RopeScaling::Yarn(y) => y.tables(pos, rope_dim, base, factors, cos, sin),
        }
    }
}

/// Reads a Llama model's `rope_freqs.weight` (F32 or F16, rope_dim/2 values, each finite and positive), if the file
/// has one.
pub fn freq_factors(g: &GgufFile, rope_dim: usize) -> Result<Option<Vec<f32>>> {
    factors_named(g, "rope_freqs.weight", rope_dim)
}

/// Phi-3's LongRoPE factor sets, `[short, long]` (`rope_factors_short.weight`, `rope_factors_long.weight`; F32 or
/// F16, rope_dim/2 values, each finite and positive), each where the file has it.
pub fn long_rope_factors(g: &GgufFile, rope_dim: usize) -> Result<[Option<Vec<f32>>; 2]> {
    Ok([
        factors_named(g, "rope_factors_short.weight", rope_dim)?,
        factors_named(g, "rope_factors_long.weight", rope_dim)?,
    ])
}

fn factors_named(g: &GgufFile, name: &str, rope_dim: usize) -> Result<Option<Vec<f32>>> {
    if g.tensor_info(name).is_none() {
        return Ok(None);
    }
    let ff = super::load_vector(g, name, rope_dim / 2)?;
    if let Some((i, v)) = ff
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v > 0.0))
    {
        bail!(
            "{}: tensor {name} holds {v} at pair {i}; a frequency factor must be finite and positive",
            g.path.display()
        );
    }
    Ok(Some(ff))
}

impl Yarn {
    /// The (low, high) pair indices between which the ramp runs.
    fn corr_dims(&self, rope_dim: usize, base: f32) -> (f32, f32) {
        let n = rope_dim as f32;
        let dim = |beta: f32| {
            n * (self.orig_ctx as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = dim(self.beta_fast).floor().max(0.0);
        let high = dim(self.beta_slow).ceil().min(n - 1.0);
        (low, high)
    }

    /// The factor cos and sin are multiplied by.
    fn mscale(&self) -> f32 {
        let m = |s: f32, k: f32| {
            if s <= 1.0 {
                1.0
            } else {
                1.0 + 0.1 * k * s.ln()
            }
        };
        let ratio = if self.log_mul != 0.0 {
            m(self.factor, 1.0) / m(self.factor, self.log_mul)
        } else {
            m(self.factor, 1.0)
        };
        self.attn_factor * ratio
    }

    fn tables(
        &self,
        pos: &[u32],
        rope_dim: usize,
        base: f32,
        ff: Option<&[f32]>,
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        let half = rope_dim / 2;
        let (low, high) = self.corr_dims(rope_dim, base);
        let mscale = self.mscale() as f64;
        let inv_factor = 1.0 / self.factor as f64;
        for (t, &p) in pos.iter().enumerate() {
            for i in 0..half {
                let mut extrap = p as f64 * (base as f64).powf(-2.0 * i as f64 / rope_dim as f64);
                if let Some(ff) = ff {
                    extrap /= ff[i] as f64;
                }
                let y = (i as f32 - low) / (high - low).max(0.001);
                let ramp = (1.0 - y.clamp(0.0, 1.0)) as f64;
                let a = extrap * inv_factor * (1.0 - ramp) + extrap * ramp;
                cos[t * half + i] = (a.cos() * mscale) as f32;
                sin[t * half + i] = (a.sin() * mscale) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f32) -> Yarn {
        Yarn {
            factor,
            orig_ctx: 32768,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: 1.0,
            log_mul: 0.0,
        }
    }

    #[test]
    fn yarn_correction_dims_match_llama_cpps_formula() {
        // 128 rotated dims, base 1e6, 32K original context: rope_dim·ln(32768/(β·2π))/(2·ln 1e6).
        let (lo, hi) = yarn(4.0).corr_dims(128, 1e6);
        let want = |b: f64| {
            128.0 * (32768.0 / (b * 2.0 * std::f64::consts::PI)).ln() / (2.0 * 1e6f64.ln())
        };
        assert_eq!(lo, want(32.0).floor() as f32);
        assert_eq!(hi, want(1.0).ceil() as f32);
        assert!(lo < hi && hi < 64.0, "{lo} {hi}");
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let y = yarn(4.0);
        let (d, base) = (64, 1e6f32);
        let half = d / 2;
        let (mut c, mut s) = (vec![0.0; half], vec![0.0; half]);
        let p = 1000u32;
        y.tables(&[p], d, base, None, &mut c, &mut s);
        let m = y.mscale();
        assert!((m - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
        let (lo, hi) = y.corr_dims(d, base);
        for i in 0..half {
            let theta = p as f64 * (base as f64).powf(-2.0 * i as f64 / d as f64);
            // Recover the angle from the table (magnitude is mscale).
            let got = (s[i] as f64).atan2(c[i] as f64);
            let r = (c[i] as f64).hypot(s[i] as f64);
            assert!((r - m as f64).abs() < 1e-5, "magnitude {r} at {i}");
            let wrap = |a: f64| {
                (a + std::f64::consts::PI).rem_euclid(2.0 * std::f64::consts::PI)
                    - std::f64::consts::PI
            };
            if (i as f32) < lo {
                assert!(wrap(got - theta).abs() < 1e-4, "pair {i} must extrapolate");
            } else if (i as f32) > hi {
                assert!(
                    wrap(got - theta / 4.0).abs() < 1e-4,
                    "pair {i} must interpolate"
                );
            }
        }
    }

    #[test]
    fn linear_scaling_divides_angles() {
        let (mut c1, mut s1, mut c2, mut s2) =
            (vec![0.0; 8], vec![0.0; 8], vec![0.0; 8], vec![0.0; 8]);
        let linear = |factor, attn_factor| RopeScaling::Linear {
            factor,
            attn_factor,
        };
        linear(2.0, 1.0).tables(&[10], 16, 1e4, None, &mut c1, &mut s1);
        RopeScaling::None.tables(&[5], 16, 1e4, None, &mut c2, &mut s2);
        for i in 0..8 {
            assert!((c1[i] - c2[i]).abs() < 1e-6 && (s1[i] - s2[i]).abs() < 1e-6);
        }
        // An attention factor multiplies cos and sin, the angle unchanged (Phi-3's LongRoPE files).
        linear(1.0, 1.25).tables(&[5], 16, 1e4, None, &mut c1, &mut s1);
        for i in 0..8 {
            assert!((c1[i] - 1.25 * c2[i]).abs() < 1e-6 && (s1[i] - 1.25 * s2[i]).abs() < 1e-6);
        }
    }

    /// Pair i's angle at position p with factor f_i is its angle at p / f_i; factors of 1 change no bit, with or
    /// without scaling.
    #[test]
    fn frequency_factors_divide_each_pairs_angle() {
        let ff = [1.0f32, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0];
        let (mut c, mut s) = (vec![0.0f32; 8], vec![0.0f32; 8]);
        let (mut c1, mut s1) = (vec![0.0f32; 8], vec![0.0f32; 8]);
        for scaling in [
            RopeScaling::None,
            RopeScaling::Linear {
                factor: 2.0,
                attn_factor: 1.0,
            },
            RopeScaling::Yarn(yarn(4.0)),
        ] {
            scaling.tables(&[64], 16, 1e4, Some(&ff), &mut c, &mut s);
            for (i, &f) in ff.iter().enumerate() {
                scaling.tables(&[64 / f as u32], 16, 1e4, None, &mut c1, &mut s1);
                assert!(
                    (c[i] - c1[i]).abs() < 1e-6 && (s[i] - s1[i]).abs() < 1e-6,
                    "{scaling:?} pair {i}"
                );
            }
            scaling.tables(&[77], 16, 1e4, Some(&[1.0; 8]), &mut c, &mut s);
            scaling.tables(&[77], 16, 1e4, None, &mut c1, &mut s1);
            assert_eq!((&c, &s), (&c1, &s1), "{scaling:?}");
        }
    }
}
