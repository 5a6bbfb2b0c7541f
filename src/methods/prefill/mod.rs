//! Sparse prefill (`--prefill`): which keys each prompt query reads while the prompt is read. Decode never changes.
//!
//! A spec (`minference@patterns.json,from=2`) is parsed once into a [`PrefillSpec`]; names live in the registry's
//! [`PREFILL`](super::registry::PREFILL) table. A method builds a [`PrefillPattern`]: for each prefill chunk of a
//! global layer it hands the attention kernel the key ranges of every (KV head, 16-query tile)
//! ([`crate::attention::attend_tiles`]). [`minference`] estimates vertical-slash and block-sparse patterns from the
//! chunk itself; [`streaming`] gives DuoAttention's streaming heads a sink + local window; [`search`] is the offline
//! per-head pattern search (`hayloft patterns`) whose file [`pattern`] reads and writes.
//!
//! [`lazyllm`] is the other kind: LazyLLM's progressive token pruning, where later layers compute fewer prompt
//! tokens at all (run by `model::lazy`, with an aux cache from which decode revives pruned tokens).

pub mod lazyllm;
pub mod minference;
pub mod pattern;
pub mod plan;
pub mod search;
pub mod streaming;

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::registry::{self, PrefillKind, PrefillOpt};
use crate::model::{ModelConfig, PrefillPattern};
pub use lazyllm::LazyConfig;
pub use pattern::HeadPattern;

/// Chunks whose context is shorter than this stay dense unless `min=` says otherwise.
pub const DEFAULT_MIN_LEN: usize = 1024;

/// Where a sparse method applies: layers from `from` on, chunks whose context reaches `min_len`.
#[derive(Clone, Debug, PartialEq)]
pub struct Scope {
    pub from: usize,
    pub min_len: usize,
}

impl Default for Scope {
    fn default() -> Self {
        Self {
            from: 0,
            min_len: DEFAULT_MIN_LEN,
        }
    }
}

/// `--prefill minference[@FILE][,vs=V:S|block=K|ashape=I:L][,from=N][,min=N]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MInferenceSpec {
    /// Per-head patterns from `hayloft patterns` (None: every head [`pattern::DEFAULT`]).
    pub file: Option<PathBuf>,
    /// One pattern for every head, overriding the file.
    pub every: Option<HeadPattern>,
    pub scope: Scope,
}

/// `--prefill streaming@HEADS.json[,sink=N][,local=N][,from=N][,min=N]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamingSpec {
    pub heads: PathBuf,
    pub sink: usize,
    pub local: usize,
    pub scope: Scope,
}

/// What `--prefill` selects, parsed once.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum PrefillSpec {
    #[default]
    Dense,
    MInference(MInferenceSpec),
    Streaming(StreamingSpec),
    LazyLlm(LazyConfig),
}

fn count(name: &str, v: &str) -> Result<usize> {
    v.parse::<usize>()
        .with_context(|| format!("--prefill option {name}={v}: expected a whole number"))
}

fn pair(name: &str, v: &str) -> Result<(usize, usize)> {
    let Some((a, b)) = v.split_once(':') else {
        bail!("--prefill option {name}={v}: expected two numbers as A:B");
    };
    Ok((count(name, a)?, count(name, b)?))
}

/// The prefill chunk under MInference when the user sets none: each chunk estimates its vertical-slash patterns
/// from its own last [`plan::LAST_Q`] queries against every key before them (MInference estimates once, from the
/// prompt's last queries), so that estimate costs LAST_Q / chunk of dense attention: 12.5 % at 512 tokens, 1.6 % here.
pub const MINFERENCE_CHUNK: usize = 4096;

impl PrefillSpec {
    /// The chunk size this method runs best with, when the user does not choose one.
    pub fn default_chunk(&self) -> Option<usize> {
        match self {
            PrefillSpec::MInference(_) => Some(MINFERENCE_CHUNK),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default().trim();
        let (name, arg) = match head.split_once('@') {
            Some((n, a)) => (n, Some(a)),
            None => (head, None),
        };
        let Some(row) = registry::prefill_row(name) else {
            bail!(
                "--prefill '{s}': unknown method '{name}' (valid: {})",
                registry::prefill_names()
            );
        };
        if arg.is_some_and(str::is_empty) || (arg.is_some() && row.arg.is_empty()) {
            bail!("--prefill '{s}': '{name}' takes no @ argument");
        }
        if arg.is_none() && row.arg_required {
            bail!("--prefill '{s}': '{name}' needs @{}", row.arg);
        }
        let mut scope = Scope::default();
        let mut every = None;
        let (mut sink, mut local) = (streaming::DEFAULT_SINK, streaming::DEFAULT_LOCAL);
        let mut lazy = LazyConfig::default();
        for part in parts {
            let (oname, v) = part.split_once('=').unwrap_or((part, ""));
            let valid = || {
                row.options
                    .iter()
                    .map(|&o| registry::prefill_option_of(o).name)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let opt = match registry::prefill_option(oname) {
                Some(o) if row.options.contains(&o.opt) => o,
                _ => bail!(
                    "--prefill '{s}': '{name}' takes no option '{oname}' (valid: {})",
                    if row.options.is_empty() {
                        "none".to_string()
                    } else {
                        valid()
                    }
                ),
            };
            if v.is_empty() {
                bail!("--prefill '{s}': option {oname} needs ={}", opt.arg);
            }
            match opt.opt {
                PrefillOpt::VerticalSlash => {
                    let (vertical, slash) = pair(oname, v)?;
                    every = Some(HeadPattern::VerticalSlash { vertical, slash });
                }
                PrefillOpt::BlockSparse => {
                    let top_k = count(oname, v)?;
                    every = Some(HeadPattern::BlockSparse { top_k });
                }
                PrefillOpt::AShape => {
                    let (init, local) = pair(oname, v)?;
                    every = Some(HeadPattern::AShape { init, local });
                }
                PrefillOpt::From => scope.from = count(oname, v)?,
                PrefillOpt::Min => scope.min_len = count(oname, v)?,
                PrefillOpt::Sink => sink = count(oname, v)?,
                PrefillOpt::Local => local = count(oname, v)?,
                PrefillOpt::Layers => {
                    lazy.stages =
                        Some(lazyllm::parse_stages(v).with_context(|| format!("--prefill '{s}'"))?)
                }
                PrefillOpt::Revive => lazy.revive_every = count(oname, v)?,
            }
        }
        if let Some(p) = every {
            p.check().with_context(|| format!("--prefill '{s}'"))?;
        }
        Ok(match row.kind {
            PrefillKind::Dense => Self::Dense,
            PrefillKind::MInference => Self::MInference(MInferenceSpec {
                file: arg.map(PathBuf::from),
                every,
                scope,
            }),
            PrefillKind::Streaming => Self::Streaming(StreamingSpec {
                heads: PathBuf::from(arg.unwrap_or_default()),
                sink,
                local,
                scope,
            }),
            PrefillKind::LazyLlm => Self::LazyLlm(lazy),
        })
    }

    /// The sparse-attention method for a model (None for dense, and for LazyLLM, which the session runs itself);
    /// files are read and checked against the model here.
    pub fn build(&self, mc: &ModelConfig) -> Result<Option<Box<dyn PrefillPattern>>> {
        Ok(match self {
            Self::Dense | Self::LazyLlm(_) => None,
            Self::MInference(m) => Some(Box::new(minference::MInference::new(m, mc)?)),
            Self::Streaming(s) => Some(Box::new(streaming::Streaming::new(s, mc)?)),
        })
    }
}

impl std::str::FromStr for PrefillSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

fn scope_opts(f: &mut fmt::Formatter, sc: &Scope) -> fmt::Result {
    if sc.from != 0 {
        write!(
            f,
            ",{}={}",
            registry::prefill_option_of(PrefillOpt::From).name,
            sc.from
        )?;
    }
    if sc.min_len != DEFAULT_MIN_LEN {
        write!(
            f,
            ",{}={}",
            registry::prefill_option_of(PrefillOpt::Min).name,
            sc.min_len
        )?;
    }
    Ok(())
}

impl fmt::Display for PrefillSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Dense => f.write_str(registry::prefill_row_of(PrefillKind::Dense).name),
            Self::MInference(m) => {
                f.write_str(registry::prefill_row_of(PrefillKind::MInference).name)?;
                if let Some(p) = &m.file {
                    write!(f, "@{}", p.display())?;
                }
                if let Some(p) = m.every {
                    let (opt, v) = match p {
                        HeadPattern::VerticalSlash { vertical, slash } => {
                            (PrefillOpt::VerticalSlash, format!("{vertical}:{slash}"))
                        }
                        HeadPattern::BlockSparse { top_k } => {
                            (PrefillOpt::BlockSparse, top_k.to_string())
                        }
                        HeadPattern::AShape { init, local } => {
                            (PrefillOpt::AShape, format!("{init}:{local}"))
                        }
                    };
                    write!(f, ",{}={v}", registry::prefill_option_of(opt).name)?;
                }
                scope_opts(f, &m.scope)
            }
            Self::Streaming(s) => {
                write!(
                    f,
                    "{}@{}",
                    registry::prefill_row_of(PrefillKind::Streaming).name,
                    s.heads.display()
                )?;
                if s.sink != streaming::DEFAULT_SINK {
                    write!(
                        f,
                        ",{}={}",
                        registry::prefill_option_of(PrefillOpt::Sink).name,
                        s.sink
                    )?;
                }
                if s.local != streaming::DEFAULT_LOCAL {
                    write!(
                        f,
                        ",{}={}",
                        registry::prefill_option_of(PrefillOpt::Local).name,
                        s.local
                    )?;
                }
                scope_opts(f, &s.scope)
            }
            Self::LazyLlm(c) => c.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "dense",
            "minference",
            "minference@pat.json",
            "minference,vs=100:800,from=2",
            "minference,block=100,min=0",
            "minference,ashape=128:3968",
            "streaming@heads.json,sink=64,local=512",
            "lazyllm",
            "lazyllm,layers=8:0.7/16:0.4/24:0.2",
            "lazyllm,revive=0",
            "lazyllm,layers=3:0.5,revive=4",
        ] {
            let p = PrefillSpec::parse(s).unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(PrefillSpec::parse(&p.to_string()).unwrap(), p);
        }
        assert_eq!(PrefillSpec::parse("dense").unwrap(), PrefillSpec::Dense);
    }

    #[test]
    fn only_minference_asks_for_longer_chunks() {
        for (s, want) in [
            ("dense", None),
            ("minference", Some(MINFERENCE_CHUNK)),
            ("minference@pat.json,min=0", Some(MINFERENCE_CHUNK)),
            ("streaming@heads.json", None),
            ("lazyllm", None),
        ] {
            assert_eq!(PrefillSpec::parse(s).unwrap().default_chunk(), want, "{s}");
        }
    }

    #[test]
    fn bad_specs_are_clear_errors() {
        let err = |s: &str| format!("{:#}", PrefillSpec::parse(s).unwrap_err());
        let e = err("minferense");
        assert!(
            e.contains("unknown method") && e.contains("minference") && e.contains("streaming"),
            "{e}"
        );
        let e = err("minference,vs=100");
        assert!(e.contains("A:B"), "{e}");
        let e = err("minference,sink=3");
        assert!(e.contains("no option 'sink'") && e.contains("vs"), "{e}");
        assert!(err("streaming").contains("needs @"));
        assert!(err("dense@x").contains("no @ argument"));
        assert!(err("minference,block=x").contains("whole number"));
        assert!(err("minference,vs=0:10").contains("at least"));
        assert!(err("dense,revive=2").contains("no option 'revive'"));
        assert!(err("lazyllm,layers=8:1.5").contains("1.5"));
        assert!(err("lazyllm,layers=8").contains("layer:keep"));
        assert!(err("lazyllm,layers=16:0.4/8:0.7").contains("ascend"));
        assert!(err("lazyllm,layers=x:0.4").contains("'x'"));
        assert!(err("lazyllm,revive=-1").contains("whole number"));
        assert!(err("lazyllm,speed=2").contains("no option 'speed'"));
    }
}

#[cfg(test)]
mod tests_model;
