//! `--prefill lazyllm[,layers=L:keep/L:keep/...][,revive=N]`: LazyLLM (arXiv 2407.14057) as a configuration. The
//! paper publishes no schedule, so the stages are an option; the default ([`LazyPlan::default_stages`]) keeps 0.7,
//! 0.4 and 0.2 of the prompt from a quarter, half and three quarters of the model's depth. `revive=N` runs revival
//! every N decode steps (default 1; 0 = never, pruning is then one-shot eviction). The pass is `model::lazy`.

use std::fmt;

use anyhow::{bail, Context, Result};

use crate::model::lazy::{LazyPlan, Stage};
use crate::model::ModelConfig;

/// Revival every decode step unless the spec says otherwise.
pub const DEFAULT_REVIVE: usize = 1;

#[derive(Clone, Debug, PartialEq)]
pub struct LazyConfig {
    /// None = the default stages for the model's depth.
    pub stages: Option<Vec<Stage>>,
    pub revive_every: usize,
}

impl Default for LazyConfig {
    fn default() -> Self {
        Self {
            stages: None,
            revive_every: DEFAULT_REVIVE,
        }
    }
}

impl LazyConfig {
    /// The plan for a model: the stages given (or the default), checked against its layers.
    pub fn plan(&self, c: &ModelConfig) -> Result<LazyPlan> {
        let plan = LazyPlan {
            stages: self
                .stages
                .clone()
                .unwrap_or_else(|| LazyPlan::default_stages(c)),
            revive_every: self.revive_every,
        };
        plan.check(c)
            .with_context(|| format!("--prefill '{self}' on {}", c.name))?;
        Ok(plan)
    }

    /// Sets the option `key` (one of `names`: stages, revival) from `value`.
    pub fn set(&mut self, key: &str, value: &str, names: [&str; 2]) -> Result<()> {
        if key == names[0] {
            self.stages = Some(parse_stages(value)?);
        } else if key == names[1] {
            self.revive_every = value
                .parse()
                .with_context(|| format!("{key}={value}: a count of decode steps (0 = never)"))?;
        } else {
            bail!("unknown option '{key}' (known: {}, {})", names[0], names[1]);
        }
        Ok(())
    }

    /// Writes the spec back with the option names given.
    pub fn write(&self, f: &mut fmt::Formatter<'_>, name: &str, names: [&str; 2]) -> fmt::Result {
        f.write_str(name)?;
        if let Some(st) = &self.stages {
            let s: Vec<String> = st
                .iter()
                .map(|s| format!("{}:{}", s.layer, s.keep))
                .collect();
            write!(f, ",{}={}", names[0], s.join("/"))?;
        }
        if self.revive_every != DEFAULT_REVIVE {
            write!(f, ",{}={}", names[1], self.revive_every)?;
        }
        Ok(())
    }
}

/// `L:keep/L:keep/...`: layers ascending, shares in (0, 1] not growing (the model's range is checked by the plan).
pub fn parse_stages(v: &str) -> Result<Vec<Stage>> {
    let mut out: Vec<Stage> = Vec::new();
    for part in v.split('/') {
        let Some((l, k)) = part.split_once(':') else {
            bail!("stage '{part}' is not layer:keep (e.g. 8:0.7)");
        };
        let layer: usize = l
            .trim()
            .parse()
            .with_context(|| format!("stage '{part}': layer '{l}' is not a layer number"))?;
        let keep: f32 = k
            .trim()
            .parse()
            .with_context(|| format!("stage '{part}': keep '{k}' is not a share"))?;
        if !(keep > 0.0 && keep <= 1.0) {
            bail!("stage '{part}': keep share {keep} must be in (0, 1]");
        }
        if let Some(p) = out.last() {
            if layer <= p.layer {
                bail!("stage layers must ascend: {layer} comes after {}", p.layer);
            }
            if keep > p.keep {
                bail!(
                    "keep shares must not grow: {keep} at layer {layer} after {} at layer {}",
                    p.keep,
                    p.layer
                );
            }
        }
        out.push(Stage { layer, keep });
    }
    Ok(out)
}

impl fmt::Display for LazyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use super::super::registry::{prefill_option_of, prefill_row_of, PrefillKind, PrefillOpt};
        let names = [
            prefill_option_of(PrefillOpt::Layers).name,
            prefill_option_of(PrefillOpt::Revive).name,
        ];
        self.write(f, prefill_row_of(PrefillKind::LazyLlm).name, names)
    }
}
