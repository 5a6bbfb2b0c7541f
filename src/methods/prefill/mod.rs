//! Prefill methods: what `--prefill` accepts. A spec (`lazyllm,layers=8:0.7/16:0.4`) is parsed once into a typed
//! [`PrefillSpec`]; method and option names live in the registry's [`PREFILL`](super::registry::PREFILL) table.
//!
//! - `dense` (the default): every prompt token through every layer.
//! - `lazyllm` ([`lazyllm`], run by `model::lazy`): progressive token pruning by the last token's attention, with an
//!   aux cache from which decode revives pruned tokens.

pub mod lazyllm;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

use super::registry::{self, PREFILL};
pub use lazyllm::LazyConfig;

#[derive(Clone, Debug, Default, PartialEq)]
pub enum PrefillSpec {
    #[default]
    Dense,
    LazyLlm(LazyConfig),
}

/// `name[,option...]`: the method's row parses its options.
pub fn parse(s: &str) -> Result<PrefillSpec> {
    let s = s.trim();
    let (name, opts) = s.split_once(',').unwrap_or((s, ""));
    let Some(row) = registry::prefill(name) else {
        bail!(
            "--prefill '{s}': unknown method '{name}' (known: {})",
            registry::prefill_names()
        );
    };
    let opts: Vec<&str> = opts.split(',').filter(|o| !o.is_empty()).collect();
    (row.parse)(&opts).map_err(|e| anyhow::anyhow!("--prefill '{s}': {e:#}"))
}

impl FromStr for PrefillSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse(s)
    }
}

impl fmt::Display for PrefillSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefillSpec::Dense => f.write_str(PREFILL[0].name),
            PrefillSpec::LazyLlm(c) => c.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_ones_are_clear_errors() {
        for s in [
            "dense",
            "lazyllm",
            "lazyllm,layers=8:0.7/16:0.4/24:0.2",
            "lazyllm,revive=0",
            "lazyllm,layers=3:0.5,revive=4",
        ] {
            let p = parse(s).unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(parse(&p.to_string()).unwrap(), p);
        }
        assert_eq!(parse("dense").unwrap(), PrefillSpec::Dense);
        let err = |s: &str| format!("{:#}", parse(s).unwrap_err());
        assert!(err("sparse").contains("unknown method 'sparse'"));
        assert!(err("sparse").contains("lazyllm"));
        assert!(err("dense,revive=2").contains("no options"));
        assert!(err("lazyllm,layers=8:1.5").contains("1.5"));
        assert!(err("lazyllm,layers=8").contains("layer:keep"));
        assert!(err("lazyllm,layers=16:0.4/8:0.7").contains("ascend"));
        assert!(err("lazyllm,layers=x:0.4").contains("'x'"));
        assert!(err("lazyllm,revive=-1").contains("revive"));
        assert!(err("lazyllm,speed=2").contains("unknown option 'speed'"));
    }
}
