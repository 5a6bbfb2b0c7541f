//! KV-cache methods by name: what `--kv` accepts and what the eval harness sweeps over.
//!
//! A spec is `<method>[@<budget>][,<wrapper>[@<arg>]...]`, e.g. `full`, `snapkv@0.25`, `streamingllm@1024t`,
//! `snapkv@0.25,kivi4`. A budget is a share of the tokens seen (`@0.25` keeps 25 %) or a token count (`@1024t`).

pub mod heads;

use anyhow::{bail, Context, Result};

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

/// Methods `--kv` accepts as its first element.
pub const METHODS: &[&str] = &["full"];
/// Wrappers that may follow the method.
pub const WRAPPERS: &[&str] = &[];

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
}
