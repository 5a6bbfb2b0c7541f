//! KV-cache methods by name: what `--kv` accepts and what the eval harness sweeps over.
//!
//! A spec is `<method>[@<budget>][,<wrapper>[@<arg>]...]`, e.g. `full`, `snapkv@0.25`, `streamingllm@1024t`,
//! `h2o@0.25,chunked`, `snapkv@0.25,pyramid,every@32`, `duo@0.5,heads@heads.json`, `snapkv@0.25,kivi4`. A budget is a share of the tokens
//! seen so far (`@0.25` keeps 25 %) or a token count per KV head (`@1024t`).
//!
//! Storage wrappers change how the cache stores entries rather than which it keeps: `kivi8`, `kivi4`, `kivi2` quantize
//! the cache KIVI-style ([`crate::kv::quant`]), optionally with the residual window as argument (`kivi4@64`: the newest
//! 64 entries stay f16; default 128). Alone (`--kv kivi4`) they mean `full,kivi4`: every entry kept, quantized.
//!
//! # Design
//!
//! Most methods only decide *which* entries of one (layer, KV head) stream to keep. They implement [`Scorer`]: given a
//! [`HeadObs`] (that head's keys after RoPE, values, positions, the recent queries of the query heads sharing it,
//! accumulated attention if asked for), write one score per entry, higher = keep. The press ([`press::Press`]) turns
//! scores and a budget into `KvCache::retain` calls: each head keeps its top-k entries (ties go to the more recent
//! entry), the cache's freed blocks are trimmed, so the byte counter falls. Forced keeps (sinks, observation windows,
//! recent windows) are scores of +∞, so "kept = top-scored" holds for every method.
//!
//! What a score cannot express is *how many* entries each head keeps. That is the press's allocation step, in two
//! stages a method file provides as plain functions: per-head targets before scoring ([`pyramidkv`]: per-layer budgets
//! decreasing with depth; [`duo`]: retrieval heads keep all, streaming heads share the rest), and a redistribution
//! across the heads of a layer after scoring ([`adakv`]). Merging ([`kvmerger`]) needs one more hook: before the drop,
//! fold each dropped entry into a kept one through `KvCache::write`. So there is one trait, and allocation and
//! merging are small functions the press calls.
//!
//! # When compression runs
//!
//! - End of prefill (default): once the whole prompt is in the cache, so the observation window holds the prompt's last
//!   queries — the question, when the prompt ends with one (question-aware, as the SnapKV paper evaluates). Peak memory
//!   still holds the whole prompt.
//! - `chunked`: after every prefill chunk (Locret-style), so peak memory is bounded by budget + one chunk.
//! - During decoding, every N steps (`every@N`, default 64; `every@0` = never): the cache stays within budget + N.
//!
//! Prefill is `Session::prefill`, or `Session::feed` of more than one token; a single-token feed is a decode step.

pub mod adakv;
pub mod duo;
pub mod h2o;
pub mod knorm;
pub mod kvmerger;
pub mod obs;
pub mod press;
pub mod pyramidkv;
pub mod random;
pub mod snapkv;
pub mod streamingllm;
pub mod think;
pub mod tova;
pub mod window;

pub mod heads;

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

/// Methods `--kv` accepts as its first element.
pub const METHODS: &[&str] = &[
    "full",
    "streamingllm",
    "window",
    "h2o",
    "snapkv",
    "pyramidkv",
    "tova",
    "knorm",
    "random",
    "adakv",
    "duo",
    "kvmerger",
    "kivi8",
    "kivi4",
    "kivi2",
    "think",
];
/// Wrappers (options) that may follow the method: `chunked` (compress after every prefill chunk), `every@N` (compress
/// every N decode steps, 0 = never; default 64), `pyramid[@beta]` (per-layer budgets, PyramidKV), `adakv[@alpha]`
/// (head-adaptive budgets, AdaKV), `heads@FILE` (DuoAttention head scores), `kivi8|kivi4|kivi2[@residual]`
/// (KIVI-quantized storage), `think[@ratio]` (ThinK: prune that share of key channels per head, default 0.4).
pub const WRAPPERS: &[&str] = &[
    "chunked", "every", "pyramid", "adakv", "heads", "kivi8", "kivi4", "kivi2", "think",
];

/// Decode steps between compressions unless `every@N` says otherwise.
pub const DEFAULT_EVERY: usize = 64;

/// What a method reads besides the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Recent query rows per layer (0 = none).
    pub window: usize,
    /// Attention accumulated per cached entry (H2O).
    pub accumulate: bool,
    /// Cached values as well as keys.
    pub values: bool,
}

impl Needs {
    pub fn max(self, o: Needs) -> Needs {
        Needs {
            window: self.window.max(o.window),
            accumulate: self.accumulate || o.accumulate,
            values: self.values || o.values,
        }
    }
}

/// What a scorer sees of one (layer, KV head) stream. Rows are f32 and row-major.
pub struct HeadObs<'a> {
    pub layer: usize,
    pub n_layers: usize,
    pub head: usize,
    pub hk: usize,
    pub hv: usize,
    /// len × hk, after RoPE.
    pub keys: &'a [f32],
    /// len × hv when the method asked for values, else empty.
    pub values: &'a [f32],
    /// Absolute position of each entry (ascending).
    pub pos: &'a [u32],
    /// Recent queries of the `group` query heads sharing this KV head, oldest first: n_q × group × hk, after RoPE.
    pub queries: &'a [f32],
    /// Position of each query row.
    pub q_pos: &'a [u32],
    pub group: usize,
    /// Attention accumulated per entry when the method asked for it, else empty.
    pub acc: &'a [f32],
    /// q·k multiplier of the model.
    pub scale: f32,
    /// Sliding window of this layer (Gemma 3 local layers), for attention masks.
    pub window: Option<u32>,
    /// Entries this head will keep (its budget after per-layer/per-head allocation).
    pub keep: usize,
    /// Tokens the session has seen.
    pub seen: usize,
}

impl HeadObs<'_> {
    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    pub fn n_queries(&self) -> usize {
        self.q_pos.len()
    }
    /// Query row `r` of query head `g` of the group.
    pub fn query(&self, r: usize, g: usize) -> &[f32] {
        &self.queries[(r * self.group + g) * self.hk..][..self.hk]
    }
    pub fn key(&self, i: usize) -> &[f32] {
        &self.keys[i * self.hk..(i + 1) * self.hk]
    }
}

/// A method that ranks the entries of one head: write `out[i]` (one per entry), higher = keep; `f32::INFINITY` marks
/// entries that must stay. `tmp` is scratch the scorer may resize.
pub trait Scorer: Send + Sync {
    fn needs(&self) -> Needs;
    fn score(&self, obs: &HeadObs, tmp: &mut Vec<f32>, out: &mut [f32]);
}

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
        // A wrapper that keeps every entry, alone: `kivi4[@R]` = `full,kivi4[@R]`, `think` = `full,think`.
        let first_name = first.split_once('@').map_or(first, |(n, _)| n);
        if STORAGE_WRAPPERS.contains(&first_name) || first_name == "think" {
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
            if let ("think", Some(a)) = (name, &arg) {
                think::parse_ratio(a).with_context(|| format!("--kv '{s}'"))?;
            }
            wrappers.push(SpecPart {
                name: name.to_string(),
                arg,
            });
        }
        let spec = Self {
            method: method.to_string(),
            budget,
            wrappers,
        };
        spec.check().with_context(|| format!("--kv '{s}'"))?;
        Ok(spec)
    }

    /// The wrapper named `name`, if present.
    pub fn wrapper(&self, name: &str) -> Option<&SpecPart> {
        self.wrappers.iter().find(|w| w.name == name)
    }

    /// Checks the combination of method, budget and options (names were checked by `parse`).
    fn check(&self) -> Result<()> {
        let m = self.method.as_str();
        let ours = |n: &str| ["chunked", "every", "pyramid", "adakv", "heads"].contains(&n);
        if m == "full" {
            if let Some(w) = self.wrappers.iter().find(|w| ours(&w.name)) {
                bail!(
                    "'{}' needs a compression method; 'full' keeps every entry",
                    w.name
                );
            }
            return Ok(());
        }
        if self.budget.is_none() {
            bail!("KV method '{m}' needs a budget, e.g. {m}@0.25 (keep 25 %) or {m}@1024t (keep 1024 tokens per head)");
        }
        for (i, w) in self.wrappers.iter().enumerate() {
            if self.wrappers[..i].iter().any(|o| o.name == w.name) {
                bail!("option '{}' is given twice", w.name);
            }
            let arg = w.arg.as_deref();
            match (w.name.as_str(), arg) {
                ("chunked", Some(a)) => bail!("'chunked' takes no argument (got '@{a}')"),
                ("every", None) => {
                    bail!("'every' needs a step count, e.g. every@64 (0 = never during decoding)")
                }
                ("every", Some(a)) => {
                    a.parse::<usize>().map_err(|_| {
                        anyhow::anyhow!(
                            "every@{a}: expected a whole number of decode steps, e.g. every@64"
                        )
                    })?;
                }
                ("pyramid", Some(a)) => {
                    pyramidkv::parse_beta(a)?;
                }
                ("adakv", Some(a)) => {
                    adakv::parse_alpha(a)?;
                }
                ("heads", None) => bail!("'heads' needs a file: heads@<scores.json>"),
                _ => {}
            }
        }
        let has = |n: &str| self.wrapper(n).is_some();
        if has("heads") && m != "duo" {
            bail!("'heads@FILE' gives DuoAttention's head roles; it only goes with duo");
        }
        if m == "duo" {
            if !has("heads") {
                bail!("duo needs head scores: add ,heads@<file.json> ({{\"layers\":L,\"kv_heads\":H,\"scores\":[[...],...]}}, e.g. from `hayloft heads`)");
            }
            if has("pyramid") || has("adakv") {
                bail!("duo sets every head's budget itself; it does not combine with pyramid or adakv");
            }
        }
        if m == "pyramidkv" && has("pyramid") {
            bail!("pyramidkv already has per-layer budgets; drop ',pyramid'");
        }
        if m == "adakv" && has("adakv") {
            bail!("adakv already has head-adaptive budgets; drop ',adakv'");
        }
        Ok(())
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
