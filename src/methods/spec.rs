//! The typed `--kv` spec: `<method>[@<budget>][,<option>[@<arg>]...]`, e.g. `full`, `snapkv@0.25`,
//! `streamingllm@1024t`, `h2o@0.25,chunked`, `snapkv@0.25,pyramid,every@32`, `duo@0.5,heads@heads.json`,
//! `snapkv@0.25,kivi4`. A budget is a share of the tokens seen so far (`@0.25` keeps 25 %) or a token count per KV
//! head (`@1024t`). Options that keep every entry may stand alone: `kivi4` means `full,kivi4`.
//!
//! A decode-time selector may follow (or stand alone, over the full cache): `quest@0.125`, `snapkv@0.5,quest@1024t`,
//! `kivi4,lserve@0.125,interval=8`. Its budget is what each KV head reads per decode step; its options are written
//! `name=value` and follow it.
//!
//! A spec is parsed once ([`std::str::FromStr`]) into [`KvSpec`] and written back by [`std::fmt::Display`] in a
//! canonical form (options in the registry's order, default arguments left out) that parses to the same spec. Names
//! and their checks come from the [`registry`].

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use super::registry::{self, MethodRow, SelectorRow};
use super::select::SelectOptions;
use crate::kv::{KvDtype, DEFAULT_RESIDUAL};
use crate::model::{ModelConfig, Selector};

/// When the KV method compresses a prompt (`--compress-at`, or the spec option `at@context|prompt`), parsed once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompressAt {
    /// Once, at the end of the context; the question after it is fed uncompressed at the positions that follow the
    /// context's (kvpress's pipeline, question-agnostic), and later turns are not compressed unless `turns` says so.
    Context,
    /// At the end of every prompt feed, the question included (question-aware, as the SnapKV paper evaluates).
    #[default]
    Prompt,
}

impl CompressAt {
    /// Every value, as the flag and the option spell them.
    pub const ALL: [CompressAt; 2] = [CompressAt::Context, CompressAt::Prompt];

    pub fn name(self) -> &'static str {
        match self {
            CompressAt::Context => "context",
            CompressAt::Prompt => "prompt",
        }
    }
}

impl FromStr for CompressAt {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match Self::ALL.into_iter().find(|a| a.name() == s) {
            Some(a) => Ok(a),
            None => bail!(
                "compress at '{s}': expected one of {}",
                Self::ALL.map(|a| a.name()).join(", ")
            ),
        }
    }
}

impl fmt::Display for CompressAt {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
        s.parse()
    }

    /// Entries to keep out of `seen` tokens.
    pub fn keep(&self, seen: usize) -> usize {
        match *self {
            Budget::Ratio(r) => ((seen as f64 * r).round() as usize).clamp(1.min(seen), seen),
            Budget::Tokens(n) => n.min(seen),
        }
    }
}

impl FromStr for Budget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
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
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Budget::Ratio(r) => write!(f, "{r}"),
            Budget::Tokens(n) => write!(f, "{n}t"),
        }
    }
}

/// KIVI-quantized storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kivi {
    pub bits: u8,
    /// Newest entries kept f16; None: `--kv-dtype`'s, else the default.
    pub residual: Option<usize>,
}

/// The options of a spec, typed. Unset = off (or the default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Compress after every prefill chunk.
    pub chunked: bool,
    /// Compress every this many decode steps (0 = never); None = never.
    pub every: Option<usize>,
    /// When prompts are compressed; None = the command's default ([`CompressAt::Prompt`] in a session).
    pub compress_at: Option<CompressAt>,
    /// Under [`CompressAt::Context`]: compress again at the end of every later turn's prompt.
    pub turns: bool,
    /// PyramidKV's per-layer budgets: formula and beta.
    pub pyramid: Option<super::pyramidkv::Pyramid>,
    /// AdaKV's head-adaptive budgets, with its floor share.
    pub adakv: Option<f32>,
    /// DuoAttention's head-score file.
    pub heads: Option<String>,
    /// Quantized storage.
    pub kivi: Option<Kivi>,
    /// ThinK: share of key channels each head prunes.
    pub think: Option<f64>,
    /// At each compression point the cache goes through the KV codec and back (a restore from the disk or Redis
    /// tier).
    pub codec: bool,
}

impl Options {
    /// Whether the option of that registry name is set.
    pub fn has(&self, name: &str) -> bool {
        registry::option(name).is_some_and(|o| (o.show)(self).is_some())
    }

    /// Decode steps between compressions (0 = never, the default under both protocols).
    pub fn every(&self) -> usize {
        self.every.unwrap_or(0)
    }
}

/// A decode-time selector with its read budget and options.
#[derive(Clone, Debug)]
pub struct SelectSpec {
    pub row: &'static SelectorRow,
    pub budget: Budget,
    pub options: SelectOptions,
}

impl PartialEq for SelectSpec {
    fn eq(&self, o: &Self) -> bool {
        self.row.name == o.row.name && self.budget == o.budget && self.options == o.options
    }
}

impl SelectSpec {
    /// This spec's selector on a model. A spec whose dense layers (with the model's sliding-window layers, which
    /// always read their whole window) leave no layer to select in is refused: it would read every entry while
    /// claiming to select.
    pub fn build(&self, mc: &ModelConfig) -> Result<Box<dyn Selector>> {
        let dense = self.options.dense.unwrap_or(self.row.defaults.dense);
        if (dense..mc.n_layers).all(|l| mc.is_local(l)) {
            let globals = (0..mc.n_layers).filter(|&l| !mc.is_local(l)).count();
            bail!(
                "--kv '{self}': dense={dense} leaves {} no layer to select in (the model has {} layers, {globals} of \
                 them global); use a smaller dense=",
                self.row.name,
                mc.n_layers
            );
        }
        (self.row.build)(self, mc)
    }
}

impl fmt::Display for SelectSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}@{}", self.row.name, self.budget)?;
        for r in registry::SELECT_OPTIONS {
            if let Some(t) = (r.show)(&self.options) {
                write!(f, ",{t}")?;
            }
        }
        Ok(())
    }
}

/// A parsed `--kv` value.
#[derive(Clone, Debug)]
pub struct KvSpec {
    pub method: &'static MethodRow,
    pub budget: Option<Budget>,
    pub options: Options,
    /// The decode-time selector, if any.
    pub select: Option<SelectSpec>,
}

impl PartialEq for KvSpec {
    fn eq(&self, o: &Self) -> bool {
        self.method.name == o.method.name
            && self.budget == o.budget
            && self.options == o.options
            && self.select == o.select
    }
}

impl Default for KvSpec {
    fn default() -> Self {
        Self::full()
    }
}

impl KvSpec {
    /// Every entry kept, stored as the session's `--kv-dtype` says.
    pub fn full() -> Self {
        Self {
            method: registry::full(),
            budget: None,
            options: Options::default(),
            select: None,
        }
    }

    /// Every entry kept and read, nothing about storage or channels changed.
    pub fn is_full(&self) -> bool {
        self.method.build.is_none() && self.options == Options::default() && self.select.is_none()
    }

    pub fn parse(s: &str) -> Result<Self> {
        s.parse()
    }

    /// Whether a press runs for this spec (it evicts entries or prunes key channels): what the protocol applies to.
    pub fn compresses(&self) -> bool {
        self.method.build.is_some() || self.options.think.is_some() || self.options.codec
    }

    /// The protocol this spec compresses under in a session (its `at` option, else [`CompressAt::Prompt`]).
    pub fn compress_at(&self) -> CompressAt {
        self.options.compress_at.unwrap_or_default()
    }

    /// The protocol a run uses for this spec: `flag` (`--compress-at`) over the spec's own `at` option over the
    /// command's `default`. Written into the spec when it compresses, so its label says which protocol ran.
    pub fn resolve_compress_at(
        &mut self,
        flag: Option<CompressAt>,
        default: CompressAt,
    ) -> CompressAt {
        let at = flag.or(self.options.compress_at).unwrap_or(default);
        if self.compresses() {
            self.options.compress_at = Some(at);
        }
        at
    }

    /// Checks the combination of method, budget and options.
    fn check(&self) -> Result<()> {
        if let Some(sel) = &self.select {
            for r in registry::SELECT_OPTIONS.iter().filter(|r| !r.common) {
                if (r.show)(&sel.options).is_some() && !sel.row.options.contains(&r.name) {
                    let who: Vec<&str> = registry::SELECTORS
                        .iter()
                        .filter(|x| x.options.contains(&r.name))
                        .map(|x| x.name)
                        .collect();
                    bail!(
                        "selector option '{}' goes with {}, not {}",
                        r.name,
                        who.join(", "),
                        sel.row.name
                    );
                }
            }
        }
        let m = self.method;
        let o = &self.options;
        if !self.compresses() && (o.compress_at.is_some() || o.turns) {
            bail!(
                "'{self}' compresses nothing, so when compression runs (at@context|prompt, turns) does not apply; \
                 give a compression method (or think)"
            );
        }
        if o.codec && (m.build.is_some() || o.kivi.is_some() || o.think.is_some()) {
            bail!(
                "'codec' round-trips an f16 cache that keeps every entry and every channel; it does not combine with \
                 '{}'",
                if m.build.is_some() {
                    m.name
                } else if o.kivi.is_some() {
                    "KIVI storage"
                } else {
                    "ThinK's pruned key channels"
                }
            );
        }
        if m.build.is_none() {
            if self.budget.is_some() {
                bail!("'{}' keeps every entry and takes no budget", m.name);
            }
            if let Some(r) = registry::OPTIONS
                .iter()
                .find(|r| r.evicting_only && (r.show)(o).is_some())
            {
                bail!(
                    "'{}' needs a compression method; '{}' keeps every entry",
                    r.name,
                    m.name
                );
            }
            return Ok(());
        }
        if self.budget.is_none() {
            let n = m.name;
            bail!("KV method '{n}' needs a budget, e.g. {n}@0.25 (keep 25 %) or {n}@1024t (keep 1024 tokens per head)");
        }
        if let Some(r) = m.implies.iter().find(|r| o.has(r)) {
            bail!("{} already includes '{r}'; drop ',{r}'", m.name);
        }
        if let Some(r) = m.excludes.iter().find(|r| o.has(r)) {
            bail!(
                "{} sets every head's budget itself; it does not combine with '{r}'",
                m.name
            );
        }
        if let Some(r) = m.requires.iter().find(|r| !o.has(r)) {
            let (arg, help) = registry::option(r).map_or(("", ""), |x| (x.arg, x.help));
            bail!("{} needs ,{r}@<{arg}>: {help}", m.name);
        }
        // An option a method requires belongs to it alone (heads@FILE goes with duo only).
        for r in registry::OPTIONS.iter().filter(|r| (r.show)(o).is_some()) {
            let owners: Vec<&str> = registry::METHODS
                .iter()
                .filter(|x| x.requires.contains(&r.name))
                .map(|x| x.name)
                .collect();
            if !owners.is_empty() && !owners.contains(&m.name) {
                bail!("'{}' only goes with {}", r.name, owners.join(", "));
            }
        }
        Ok(())
    }

    /// Splits a list of specs (eval's `--kv`): specs are separated by `;` (`full;snapkv@0.25,kivi4`); without a `;`,
    /// a comma starts a new spec only where a method name follows, and an option after a comma stays with the spec
    /// before it (`full,snapkv@0.25,kivi4` is the same two specs). A spec listed twice is an error.
    pub fn parse_list(s: &str) -> Result<Vec<KvSpec>> {
        let groups: Vec<String> = if s.contains(';') {
            s.split(';')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        } else {
            let mut out: Vec<String> = Vec::new();
            for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                let name = part.split(['@', '=']).next().unwrap_or(part);
                let is_method =
                    registry::method(name).is_some() || registry::selector(name).is_some();
                let is_option = registry::option(name).is_some()
                    || (part.contains('=') && registry::select_option(name).is_some());
                if !is_method && !is_option {
                    bail!(
                        "unknown KV method or option '{name}' in --kv '{s}' (methods: {}; selectors: {}; options: {})",
                        registry::method_names(),
                        registry::selector_names(),
                        registry::option_names()
                    );
                }
                match out.last_mut() {
                    Some(last) if !is_method => {
                        last.push(',');
                        last.push_str(part);
                    }
                    _ => out.push(part.to_string()),
                }
            }
            out
        };
        if groups.is_empty() {
            bail!(
                "--kv is empty (valid methods: {})",
                registry::method_names()
            );
        }
        let mut specs: Vec<KvSpec> = Vec::new();
        for g in groups {
            let spec: KvSpec = g.parse()?;
            if specs.contains(&spec) {
                bail!("--kv lists '{spec}' twice");
            }
            specs.push(spec);
        }
        Ok(specs)
    }
}

impl FromStr for KvSpec {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let s = text.trim();
        let ctx = || format!("--kv '{s}'");
        let mut parts = s.split(',').map(str::trim).peekable();
        // Splits `name@arg` (methods, options, selectors).
        let split_at = |p: &str| -> (String, Option<String>) {
            match p.split_once('@') {
                Some((n, a)) => (n.to_string(), Some(a.to_string())),
                None => (p.to_string(), None),
            }
        };
        let first_text = parts.peek().copied().unwrap_or("");
        let mut select: Option<SelectSpec> = None;
        // A selector first: the compression part is `full`.
        let (first, first_arg) = if registry::selector(split_at(first_text).0.as_str()).is_some() {
            (registry::full().name.to_string(), None)
        } else {
            parts.next();
            split_at(first_text)
        };
        let (first, first_arg) = (first.as_str(), first_arg.as_deref());
        let mut options = Options::default();
        let mut given: Vec<&'static str> = Vec::new();
        let mut set = |name: &str, arg: Option<&str>| -> Result<()> {
            let Some(row) = registry::option(name) else {
                bail!(
                    "unknown KV option '{name}' in --kv '{s}' (valid: {})",
                    registry::option_names()
                );
            };
            if given.contains(&row.name) {
                bail!("option '{name}' is given twice");
            }
            given.push(row.name);
            (row.set)(&mut options, arg)
        };
        // An option that keeps every entry, alone: `kivi4[@R]` = `full,kivi4[@R]`, `think` = `full,think`.
        let (method, budget) = match registry::option(first) {
            Some(row) if row.alone.is_some() => {
                set(first, first_arg).with_context(ctx)?;
                (registry::full(), None)
            }
            _ => {
                let Some(m) = registry::method(first) else {
                    bail!(
                        "unknown KV method '{first}' in --kv '{s}' (valid: {})",
                        registry::method_names()
                    );
                };
                let budget = first_arg
                    .map(str::parse::<Budget>)
                    .transpose()
                    .with_context(ctx)?;
                (m, budget)
            }
        };
        for part in parts {
            if let Some((name, value)) = part.split_once('=') {
                let Some(row) = registry::select_option(name) else {
                    bail!(
                        "unknown selector option '{name}' in --kv '{s}' (valid: {})",
                        registry::SELECT_OPTIONS
                            .iter()
                            .map(|o| o.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                };
                let Some(sel) = select.as_mut() else {
                    bail!("--kv '{s}': '{part}' is a selector option; name a selector before it, e.g. quest@0.125,{part}");
                };
                if (row.show)(&sel.options).is_some() {
                    bail!("--kv '{s}': selector option '{name}' is given twice");
                }
                (row.set)(&mut sel.options, value).with_context(ctx)?;
                continue;
            }
            let (name, arg) = split_at(part);
            if let Some(row) = registry::selector(&name) {
                if let Some(prev) = &select {
                    bail!(
                        "--kv '{s}': one selector per spec (got {} and {name})",
                        prev.row.name
                    );
                }
                let Some(arg) = arg else {
                    bail!("--kv '{s}': selector '{name}' needs a read budget, e.g. {name}@0.125 (12.5 % of each head's entries) or {name}@1024t");
                };
                let budget: Budget = arg.parse().with_context(ctx)?;
                select = Some(SelectSpec {
                    row,
                    budget,
                    options: SelectOptions::default(),
                });
                continue;
            }
            set(&name, arg.as_deref()).with_context(ctx)?;
        }
        let spec = KvSpec {
            method,
            budget,
            options,
            select,
        };
        spec.check().with_context(ctx)?;
        Ok(spec)
    }
}

impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // A selector over the plain full cache is written alone: `quest@0.125`.
        let bare = self.method.build.is_none() && self.options == Options::default();
        if let (true, Some(sel)) = (bare, &self.select) {
            return write!(f, "{sel}");
        }
        f.write_str(self.method.name)?;
        if let Some(b) = &self.budget {
            write!(f, "@{b}")?;
        }
        for r in registry::OPTIONS {
            if let Some(t) = (r.show)(&self.options) {
                write!(f, ",{t}")?;
            }
        }
        if let Some(sel) = &self.select {
            write!(f, ",{sel}")?;
        }
        Ok(())
    }
}

/// The cache storage a spec asks for. A `kivi<bits>[@<residual>]` option selects KIVI quantization with that many
/// bits; its residual is the option's argument, else `base`'s residual when `base` is already quantized, else 128.
/// Without one, the storage is `base` (the `--kv-dtype`). A spec and a `--kv-dtype` that ask for different
/// quantizations, or KIVI over f32, are an error.
pub fn storage_for(spec: &KvSpec, base: KvDtype) -> Result<KvDtype> {
    let Some(Kivi {
        bits,
        residual: arg,
    }) = spec.options.kivi
    else {
        return Ok(base);
    };
    let residual = match base {
        KvDtype::F16 => arg.unwrap_or(DEFAULT_RESIDUAL),
        KvDtype::Kivi { bits: b, residual } if b == bits => arg.unwrap_or(residual),
        KvDtype::Kivi { bits: b, .. } => bail!(
            "--kv '{spec}' asks for {bits}-bit KV but --kv-dtype q{b} for {b}-bit: give one of them"
        ),
        KvDtype::F32 => bail!(
            "--kv '{spec}' quantizes the cache with an f16 residual window: it cannot be combined with --kv-dtype f32"
        ),
    };
    Ok(KvDtype::Kivi { bits, residual })
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
        assert!(Budget::parse("NaN").is_err());
        assert_eq!(Budget::Ratio(0.25).keep(1000), 250);
        assert_eq!(Budget::Tokens(1024).keep(1000), 1000);
        assert_eq!(Budget::Tokens(100).keep(1000), 100);
    }

    #[test]
    fn specs_parse_and_reject_unknown_names() {
        assert!(KvSpec::parse("full").unwrap().is_full());
        assert_eq!(KvSpec::parse("full").unwrap().to_string(), "full");
        let e = format!("{:#}", KvSpec::parse("nope@0.5").unwrap_err());
        assert!(
            e.contains("unknown KV method 'nope'") && e.contains("full"),
            "{e}"
        );
        assert!(KvSpec::parse("full@0.5").is_err());
        assert!(KvSpec::parse("full,every@64").is_err());
        assert!(KvSpec::parse("pyramidkv@0.5,pyramid").is_err());
        assert!(KvSpec::parse("adakv@0.5,adakv@0.1").is_err());
        assert!(KvSpec::parse("duo@0.5,heads@h.json,pyramid").is_err());
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (given, canonical) in [
            ("full", "full"),
            ("snapkv@0.25", "snapkv@0.25"),
            ("h2o@0.25,chunked", "h2o@0.25,chunked"),
            ("streamingllm@1024t", "streamingllm@1024t"),
            ("snapkv@0.5,kivi4,chunked", "snapkv@0.5,chunked,kivi4"),
            ("snapkv@0.5,pyramid@20", "snapkv@0.5,pyramid"),
            (
                "snapkv@0.5,pyramid@4,adakv@0.3",
                "snapkv@0.5,pyramid@4,adakv@0.3",
            ),
            ("snapkv@0.5,every@64", "snapkv@0.5,every@64"),
            ("kivi4", "full,kivi4"),
            ("kivi2@64t", "full,kivi2@64"),
            ("think", "full,think"),
            ("think@0.25,kivi8", "full,kivi8,think@0.25"),
            ("duo@0.5,heads@a/b.json", "duo@0.5,heads@a/b.json"),
            (" tova@0.1 , every@0 ", "tova@0.1,every@0"),
            ("snapkv@0.5,turns,at@context", "snapkv@0.5,at@context,turns"),
            ("h2o@0.2,at@prompt,every@8", "h2o@0.2,every@8,at@prompt"),
        ] {
            let s = KvSpec::parse(given).unwrap();
            assert_eq!(s.to_string(), canonical, "{given}");
            assert_eq!(KvSpec::parse(&s.to_string()).unwrap(), s, "{given}");
        }
    }

    #[test]
    fn lists_split_on_methods_and_semicolons() {
        assert_eq!(KvSpec::parse_list("full").unwrap().len(), 1);
        let v = KvSpec::parse_list("full,snapkv@0.25,kivi4").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to_string(), "snapkv@0.25,kivi4");
        let v = KvSpec::parse_list("full; kivi4 ;snapkv@0.25,chunked").unwrap();
        assert_eq!(v.len(), 3);
        assert!(KvSpec::parse_list("full;full").is_err());
        // Two texts of one spec are one spec.
        assert!(KvSpec::parse_list("snapkv@0.5,pyramid;snapkv@0.5,pyramid@20").is_err());
        let e = format!("{:#}", KvSpec::parse_list("full,nope@0.5").unwrap_err());
        assert!(e.contains("nope") && e.contains("full"), "{e}");
        assert!(KvSpec::parse_list("").is_err());
        assert!(KvSpec::parse_list(" ; ").is_err());
    }

    #[test]
    fn kivi_specs_choose_the_storage() {
        let q4 = KvSpec::parse("kivi4").unwrap();
        assert!(!q4.is_full());
        assert_eq!(
            storage_for(&q4, KvDtype::F16).unwrap(),
            KvDtype::Kivi {
                bits: 4,
                residual: 128
            }
        );
        let q2 = KvSpec::parse("kivi2@64").unwrap();
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
        let e = format!("{:#}", KvSpec::parse("full,kivi4,kivi2").unwrap_err());
        assert!(e.contains("at most one storage option"), "{e}");
        let e = format!("{:#}", KvSpec::parse("full,kivi3").unwrap_err());
        assert!(e.contains("kivi4"), "{e}");
    }

    #[test]
    fn selectors_parse_compose_and_round_trip() {
        for (given, canonical) in [
            ("quest@0.125", "quest@0.125"),
            ("quest@1024t,score=meanstd", "quest@1024t,score=meanstd"),
            ("full,quest@0.125", "quest@0.125"),
            ("snapkv@0.5,quest@1024t", "snapkv@0.5,quest@1024t"),
            ("kivi4,quest@0.125", "full,kivi4,quest@0.125"),
            ("quest@0.125,kivi4", "full,kivi4,quest@0.125"),
            (
                "lserve@0.25,interval=8,sink=4",
                "lserve@0.25,sink=4,interval=8",
            ),
            (
                "snapkv@0.5,chunked,lserve@512t,dense=0",
                "snapkv@0.5,chunked,lserve@512t,dense=0",
            ),
        ] {
            let s = KvSpec::parse(given).unwrap();
            assert!(s.select.is_some() && !s.is_full(), "{given}");
            assert_eq!(s.to_string(), canonical, "{given}");
            assert_eq!(KvSpec::parse(&s.to_string()).unwrap(), s, "{given}");
        }
        for (bad, says) in [
            ("quest", "needs a read budget"),
            ("quest@0", "ratio"),
            ("quest@0.1,lserve@0.1", "one selector"),
            ("score=meanstd", "unknown KV method"),
            ("snapkv@0.5,score=meanstd", "name a selector before it"),
            ("quest@0.1,score=max", "meanstd"),
            ("quest@0.1,bogus=1", "unknown selector option"),
            ("quest@0.1,sink=1,sink=2", "twice"),
            ("quest@0.1,interval=0", "at least 1"),
            ("quest@0.1,heads=h.json", "goes with lserve"),
        ] {
            let e = format!("{:#}", KvSpec::parse(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
        // In a list a selector starts a new spec; `;` composes.
        let v = KvSpec::parse_list("full,quest@0.125,score=meanstd,snapkv@0.25").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].to_string(), "quest@0.125,score=meanstd");
        let v = KvSpec::parse_list("full;snapkv@0.5,quest@1024t").unwrap();
        assert_eq!(v[1].to_string(), "snapkv@0.5,quest@1024t");
    }
}
