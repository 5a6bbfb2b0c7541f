//! KV-cache methods by name: what `--kv` accepts and what the eval harness sweeps over.
//!
//! A spec is `<method>[@<budget>][,<wrapper>[@<arg>]...]`, e.g. `full`, `snapkv@0.25`, `streamingllm@1024t`,
//! `snapkv@0.25,kivi4`. A budget is a share of the tokens seen (`@0.25` keeps 25 %) or a token count (`@1024t`).
//!
//! Storage wrappers change how the cache stores entries rather than which it keeps: `kivi8`, `kivi4`, `kivi2` quantize
//! the cache KIVI-style ([`crate::kv::quant`]), optionally with the residual window as argument (`kivi4@64`: the newest
//! 64 entries stay f16; default 128). Alone (`--kv kivi4`) they mean `full,kivi4`: every entry kept, quantized.

pub mod think;

use anyhow::{bail, Context, Result};

use crate::kv::{KvDtype, DEFAULT_RESIDUAL};

/// How many entries a head may keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Keep this share of the tokens seen, in (0, 1].
    Ratio(f64),
    /// Keep at most this many tokens.
    Tokens(usize),
}

impl Budget {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(t) = s.strip_suffix('t') {
            let n: usize = t
                .parse()
                .with_context(|| format!("budget '{s}': expected a token count like 1024t"))?;
            if n == 0 {
                bail!("budget '{s}': a token budget must be at least 1");
            }
            return Ok(Budget::Tokens(n));
        }
        let r: f64 = s.parse().with_context(|| {
            format!("budget '{s}': expected a ratio like 0.25 or a token count like 1024t")
        })?;
        if !(r > 0.0 && r <= 1.0) {
            bail!("budget '{s}': a ratio must be in (0, 1]");
        }
        Ok(Budget::Ratio(r))
    }

    /// Entries to keep out of `seen` tokens.
    pub fn keep(&self, seen: usize) -> usize {
        match *self {
            Budget::Ratio(r) => ((seen as f64 * r).round() as usize).clamp(1.min(seen), seen),
            Budget::Tokens(n) => n.min(seen),
        }
    }

    pub fn label(&self) -> String {
        match *self {
            Budget::Ratio(r) => format!("{r}"),
            Budget::Tokens(n) => format!("{n}t"),
        }
    }
}

/// One element of a spec: a name and its optional `@argument`.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecPart {
    pub name: String,
    pub arg: Option<String>,
}

/// A parsed `--kv` value.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    pub method: String,
    pub budget: Option<Budget>,
    pub wrappers: Vec<SpecPart>,
}

/// Methods `--kv` accepts as its first element (a storage wrapper alone stands for `full,<wrapper>`).
pub const METHODS: &[&str] = &["full", "kivi8", "kivi4", "kivi2"];
/// Wrappers that may follow the method.
pub const WRAPPERS: &[&str] = &["kivi8", "kivi4", "kivi2"];
/// Wrappers that choose the cache's storage format (see [`storage_for`]).
pub const STORAGE_WRAPPERS: &[&str] = &["kivi8", "kivi4", "kivi2"];

/// The residual window a `kivi*` argument names: a token count, `128` or `128t`.
fn parse_residual(name: &str, arg: &str) -> Result<usize> {
    arg.strip_suffix('t').unwrap_or(arg).parse().with_context(|| {
        format!("'{name}@{arg}': the argument of {name} is its full-precision residual window in tokens, like {name}@128")
    })
}

/// The cache storage a spec asks for. A `kivi<bits>[@<residual>]` wrapper selects KIVI quantization with that many
/// bits; its residual is the wrapper's argument, else `base`'s residual when `base` is already quantized, else 128.
/// Without one, the storage is `base` (the `--kv-dtype`). A spec and a `--kv-dtype` that ask for different
/// quantizations, or KIVI over f32, are an error.
pub fn storage_for(spec: &KvSpec, base: KvDtype) -> Result<KvDtype> {
    let mut kivi = spec
        .wrappers
        .iter()
        .filter(|w| STORAGE_WRAPPERS.contains(&w.name.as_str()));
    let Some(w) = kivi.next() else {
        return Ok(base);
    };
    if kivi.next().is_some() {
        bail!(
            "--kv '{}': at most one storage wrapper (kivi8, kivi4, kivi2)",
            spec.label()
        );
    }
    let bits: u8 = w.name["kivi".len()..].parse().expect("kivi<bits> names");
    let arg = w
        .arg
        .as_deref()
        .map(|a| parse_residual(&w.name, a))
        .transpose()?;
    let residual = match base {
        KvDtype::F16 => arg.unwrap_or(DEFAULT_RESIDUAL),
        KvDtype::Kivi { bits: b, residual } if b == bits => arg.unwrap_or(residual),
        KvDtype::Kivi { bits: b, .. } => bail!(
            "--kv '{}' asks for {bits}-bit KV but --kv-dtype q{b} for {b}-bit: give one of them",
            spec.label()
        ),
        KvDtype::F32 => bail!(
            "--kv '{}' quantizes the cache with an f16 residual window: it cannot be combined with --kv-dtype f32",
            spec.label()
        ),
    };
    Ok(KvDtype::Kivi { bits, residual })
}

impl Default for KvSpec {
    fn default() -> Self {
        Self::full()
    }
}

impl KvSpec {
    pub fn full() -> Self {
        Self {
            method: "full".into(),
            budget: None,
            wrappers: Vec::new(),
        }
    }

    pub fn is_full(&self) -> bool {
        self.method == "full" && self.wrappers.is_empty()
    }

    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let mut parts = s.split(',').map(str::trim);
        let first = parts.next().unwrap_or("");
        // A storage wrapper alone: `kivi4[@R]` = `full,kivi4[@R]`.
        let first_name = first.split_once('@').map_or(first, |(n, _)| n);
        if STORAGE_WRAPPERS.contains(&first_name) {
            let rest: Vec<&str> = parts.collect();
            let mut full = vec!["full", first];
            full.extend(rest);
            return Self::parse(&full.join(","));
        }
        let (method, budget) = match first.split_once('@') {
            Some((m, b)) => (
                m,
                Some(Budget::parse(b).with_context(|| format!("--kv '{s}'"))?),
            ),
            None => (first, None),
        };
        if !METHODS.contains(&method) {
            bail!(
                "unknown KV method '{method}' in --kv '{s}' (valid: {})",
                METHODS.join(", ")
            );
        }
        if method == "full" && budget.is_some() {
            bail!("--kv '{s}': 'full' keeps every entry and takes no budget");
        }
        let mut wrappers = Vec::new();
        for p in parts {
            let (name, arg) = match p.split_once('@') {
                Some((n, a)) => (n, Some(a.to_string())),
                None => (p, None),
            };
            if !WRAPPERS.contains(&name) {
                bail!(
                    "unknown KV wrapper '{name}' in --kv '{s}' (valid: {})",
                    if WRAPPERS.is_empty() {
                        "none yet".to_string()
                    } else {
                        WRAPPERS.join(", ")
                    }
                );
            }
            if let (true, Some(a)) = (STORAGE_WRAPPERS.contains(&name), &arg) {
                parse_residual(name, a).with_context(|| format!("--kv '{s}'"))?;
            }
            wrappers.push(SpecPart {
                name: name.to_string(),
                arg,
            });
        }
        Ok(Self {
            method: method.to_string(),
            budget,
            wrappers,
        })
    }

    /// The canonical text of this spec (parses back to the same spec).
    pub fn label(&self) -> String {
        let mut s = self.method.clone();
        if let Some(b) = &self.budget {
            s.push('@');
            s.push_str(&b.label());
        }
        for w in &self.wrappers {
            s.push(',');
            s.push_str(&w.name);
            if let Some(a) = &w.arg {
                s.push('@');
                s.push_str(a);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_count() {
        assert_eq!(Budget::parse("0.25").unwrap(), Budget::Ratio(0.25));
        assert_eq!(Budget::parse("1024t").unwrap(), Budget::Tokens(1024));
        assert!(Budget::parse("0").is_err());
        assert!(Budget::parse("1.5").is_err());
        assert!(Budget::parse("0t").is_err());
        assert!(Budget::parse("abc").is_err());
        assert_eq!(Budget::Ratio(0.25).keep(1000), 250);
        assert_eq!(Budget::Tokens(1024).keep(1000), 1000);
        assert_eq!(Budget::Tokens(100).keep(1000), 100);
    }

    #[test]
    fn specs_parse_and_reject_unknown_names() {
        assert!(KvSpec::parse("full").unwrap().is_full());
        assert_eq!(KvSpec::parse("full").unwrap().label(), "full");
        let e = format!("{:#}", KvSpec::parse("nope@0.5").unwrap_err());
        assert!(
            e.contains("unknown KV method 'nope'") && e.contains("full"),
            "{e}"
        );
        assert!(KvSpec::parse("full@0.5").is_err());
    }

    #[test]
    fn kivi_specs_choose_the_storage() {
        let q4 = KvSpec::parse("kivi4").unwrap();
        assert_eq!(q4.label(), "full,kivi4");
        assert!(!q4.is_full());
        assert_eq!(
            storage_for(&q4, KvDtype::F16).unwrap(),
            KvDtype::Kivi {
                bits: 4,
                residual: 128
            }
        );
        let q2 = KvSpec::parse("kivi2@64").unwrap();
        assert_eq!(KvSpec::parse(&q2.label()).unwrap(), q2);
        assert_eq!(
            storage_for(&q2, KvDtype::F16).unwrap(),
            KvDtype::Kivi {
                bits: 2,
                residual: 64
            }
        );
        // The residual of --kv-dtype q8 --kv-residual 32 carries over to a bare kivi8.
        let q8 = KvSpec::parse("full,kivi8").unwrap();
        let base = KvDtype::Kivi {
            bits: 8,
            residual: 32,
        };
        assert_eq!(storage_for(&q8, base).unwrap(), base);
        assert_eq!(storage_for(&KvSpec::full(), base).unwrap(), base);
        assert_eq!(
            storage_for(&KvSpec::full(), KvDtype::F32).unwrap(),
            KvDtype::F32
        );
        // Conflicts and bad arguments are errors that name the problem.
        let e = format!(
            "{:#}",
            storage_for(
                &q4,
                KvDtype::Kivi {
                    bits: 8,
                    residual: 128
                }
            )
            .unwrap_err()
        );
        assert!(e.contains("4-bit") && e.contains("q8"), "{e}");
        assert!(storage_for(&q4, KvDtype::F32).is_err());
        let e = format!("{:#}", KvSpec::parse("kivi4@abc").unwrap_err());
        assert!(e.contains("residual"), "{e}");
        assert!(KvSpec::parse("full,kivi4@x").is_err());
        assert!(storage_for(&KvSpec::parse("full,kivi4,kivi2").unwrap(), KvDtype::F16).is_err());
        let e = format!("{:#}", KvSpec::parse("full,kivi3").unwrap_err());
        assert!(e.contains("kivi4"), "{e}");
    }
}
