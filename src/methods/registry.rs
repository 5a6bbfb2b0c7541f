//! The one table of KV-cache methods and spec options. Everything that lists, checks or documents a method reads it:
//! the `--kv` parser ([`super::spec`]), the press that builds a method ([`super::press`]), the CLI help and error
//! messages, `hayloft methods`, the README table (a test compares them) and the tests' every-method loops.
//!
//! Adding a method: one file with its [`Scorer`] (and its paper in the opening comment), one row in [`METHODS`].
//! A method that needs more than a scorer (per-head targets, merging, an implied allocation) says so in its
//! [`Parts`].

use anyhow::{bail, Result};

use super::select::{
    self, hip, longheads, lserve, quest, retrieval, squeezed, tokenselect, FrameDefaults,
    SelectOptions,
};
use super::spec::{KvSpec, Options, SelectSpec};
use super::{
    adakv, duo, h2o, knorm, kvmerger, pyramidkv, random, snapkv, streamingllm, think, tova, window,
    Scorer,
};
use crate::model::{ModelConfig, Selector};

/// What a method hands the press: its scorer and the allocation or merging it needs besides.
pub struct Parts {
    pub scorer: Box<dyn Scorer>,
    /// Per-head budgets the method sets itself (DuoAttention's head roles).
    pub roles: Option<duo::Roles>,
    /// Folds each dropped entry into a kept one before the drop (KVMerger).
    pub merger: Option<kvmerger::KvMerger>,
    /// Per-layer budgets the method implies (PyramidKV: kvpress's formula, beta 20).
    pub pyramid: Option<pyramidkv::Pyramid>,
    /// Head-adaptive budgets the method implies (AdaKV: its floor share).
    pub adakv: Option<f32>,
}

impl Parts {
    /// A method that is a scorer and nothing else.
    pub fn scorer(s: impl Scorer + 'static) -> Self {
        Self {
            scorer: Box::new(s),
            roles: None,
            merger: None,
            pyramid: None,
            adakv: None,
        }
    }
}

/// Builds a method's parts for a spec on a model.
pub type Build = fn(&KvSpec, &ModelConfig) -> Result<Parts>;

/// One method: its `--kv` name, what it keeps (one line, the README's column), its file, and how to build it.
pub struct MethodRow {
    pub name: &'static str,
    pub keeps: &'static str,
    pub file: &'static str,
    /// None for the method that keeps every entry: no press at all.
    pub build: Option<Build>,
    /// Options this method implies and so refuses when given (`pyramidkv` is SnapKV + `pyramid`).
    pub implies: &'static [&'static str],
    /// Options this method needs.
    pub requires: &'static [&'static str],
    /// Options this method does not combine with.
    pub excludes: &'static [&'static str],
}

impl std::fmt::Debug for MethodRow {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl MethodRow {
    const fn new(
        name: &'static str,
        keeps: &'static str,
        file: &'static str,
        build: Build,
    ) -> Self {
        Self {
            name,
            keeps,
            file,
            build: Some(build),
            implies: &[],
            requires: &[],
            excludes: &[],
        }
    }
}

/// Every KV-cache method, in the order help and tables list them. The first row keeps every entry.
pub static METHODS: &[MethodRow] = &[
    MethodRow {
        name: "full",
        keeps: "everything",
        file: "—",
        build: None,
        implies: &[],
        requires: &[],
        excludes: &[],
    },
    MethodRow::new(
        "streamingllm",
        "4 attention sinks + the most recent entries",
        "src/methods/streamingllm.rs",
        |_, _| Ok(Parts::scorer(streamingllm::StreamingLlm::default())),
    ),
    MethodRow::new(
        "window",
        "the most recent entries only (the baseline StreamingLLM shows failing)",
        "src/methods/window.rs",
        |_, _| Ok(Parts::scorer(window::Window)),
    ),
    MethodRow::new(
        "h2o",
        "heavy hitters by attention accumulated over every query so far + a recent window (1:1)",
        "src/methods/h2o.rs",
        |_, _| Ok(Parts::scorer(h2o::H2o)),
    ),
    MethodRow::new(
        "snapkv",
        "attention of the prompt's last 64 queries, avg-pooled (kernel 5); the window itself",
        "src/methods/snapkv.rs",
        |_, _| Ok(Parts::scorer(snapkv::SnapKv::default())),
    ),
    MethodRow {
        implies: &["pyramid"],
        ..MethodRow::new(
            "pyramidkv",
            "SnapKV scores, budgets decreasing linearly with layer depth (same total)",
            "src/methods/pyramidkv.rs",
            |_, _| {
                Ok(Parts {
                    pyramid: Some(pyramidkv::Pyramid::DEFAULT),
                    ..Parts::scorer(snapkv::SnapKv::default())
                })
            },
        )
    },
    MethodRow::new(
        "tova",
        "attention of the last query, averaged over the heads of the group",
        "src/methods/tova.rs",
        |_, _| Ok(Parts::scorer(tova::Tova)),
    ),
    MethodRow::new(
        "knorm",
        "lowest key norm",
        "src/methods/knorm.rs",
        |_, _| Ok(Parts::scorer(knorm::Knorm)),
    ),
    MethodRow::new(
        "random",
        "random entries (seeded control)",
        "src/methods/random.rs",
        |_, _| Ok(Parts::scorer(random::Random::default())),
    ),
    MethodRow {
        implies: &["adakv"],
        ..MethodRow::new(
            "adakv",
            "SnapKV scores, one budget per layer spread across heads by score (floor share 0.2)",
            "src/methods/adakv.rs",
            |_, _| {
                Ok(Parts {
                    adakv: Some(adakv::ALPHA),
                    ..Parts::scorer(snapkv::SnapKv::default())
                })
            },
        )
    },
    MethodRow {
        requires: &["heads"],
        excludes: &["pyramid", "pyramid_factory", "adakv"],
        ..MethodRow::new(
            "duo",
            "DuoAttention head roles: retrieval heads (from `hayloft heads`) keep everything, streaming heads sinks + recent",
            "src/methods/duo.rs",
            |spec, mc| {
                let path = spec.options.heads.as_deref().unwrap_or_default();
                Ok(Parts {
                    roles: Some(duo::Roles::load(std::path::Path::new(path), mc)?),
                    ..Parts::scorer(duo::Streaming)
                })
            },
        )
    },
    MethodRow::new(
        "kvmerger",
        "SnapKV keeps; each dropped entry is merged (Gaussian-kernel weights) into its similar kept neighbour",
        "src/methods/kvmerger.rs",
        |_, _| {
            Ok(Parts {
                merger: Some(kvmerger::KvMerger::default()),
                ..Parts::scorer(kvmerger::KvMerger::default())
            })
        },
    ),
];

/// One option that may follow the method in a spec (`,chunked`, `,every@32`, ...).
pub struct OptionRow {
    pub name: &'static str,
    /// What its `@argument` is ("" when it takes none).
    pub arg: &'static str,
    /// The argument must be given.
    pub arg_required: bool,
    pub help: &'static str,
    /// Only with a method that evicts (not with the one that keeps every entry).
    pub evicting_only: bool,
    /// May stand alone as a whole spec, meaning `<full>,<option>` (it keeps every entry).
    pub alone: Option<&'static str>,
    /// Sets the option from its argument.
    pub set: fn(&mut Options, Option<&str>) -> Result<()>,
    /// The option as the canonical spec text writes it, if it is set.
    pub show: fn(&Options) -> Option<String>,
}

impl OptionRow {
    /// How help text writes it: `chunked`, `every@N`, `pyramid[@beta]`.
    pub fn usage(&self) -> String {
        match (self.arg, self.arg_required) {
            ("", _) => self.name.to_string(),
            (a, true) => format!("{}@{a}", self.name),
            (a, false) => format!("{}[@{a}]", self.name),
        }
    }
}

fn no_arg(name: &str, arg: Option<&str>) -> Result<()> {
    match arg {
        Some(a) => bail!("'{name}' takes no argument (got '@{a}')"),
        None => Ok(()),
    }
}

/// `name` or `name@arg`, the argument left out when it is the default.
fn with_arg<T: PartialEq + std::fmt::Display>(name: &str, v: T, default: T) -> String {
    if v == default {
        name.to_string()
    } else {
        format!("{name}@{v}")
    }
}

/// Sets the pyramid allocation once: `pyramid` and `pyramid_factory` are two formulas of one thing.
fn set_pyramid(o: &mut Options, a: Option<&str>, f: pyramidkv::Formula) -> Result<()> {
    if o.pyramid.is_some() {
        bail!("give one of 'pyramid' and 'pyramid_factory', once");
    }
    o.pyramid = Some(pyramidkv::parse(a, f)?);
    Ok(())
}

fn show_pyramid(o: &Options, f: pyramidkv::Formula, name: &str) -> Option<String> {
    o.pyramid
        .filter(|p| p.formula == f)
        .map(|p| with_arg(name, p.beta, pyramidkv::BETA))
}

/// A KIVI residual window argument: a token count, `128` or `128t`.
fn parse_residual(name: &str, arg: &str) -> Result<usize> {
    arg.strip_suffix('t').unwrap_or(arg).parse().map_err(|_| {
        anyhow::anyhow!("'{name}@{arg}': the argument of {name} is its full-precision residual window in tokens, like {name}@128")
    })
}

/// `kivi<BITS>[@residual]`: KIVI-quantized storage, at most one per spec.
fn set_kivi<const BITS: u8>(o: &mut Options, arg: Option<&str>) -> Result<()> {
    let name = format!("kivi{BITS}");
    if let Some(k) = o.kivi {
        bail!(
            "at most one storage option (kivi8, kivi4, kivi2): got kivi{} and {name}",
            k.bits
        );
    }
    let residual = arg.map(|a| parse_residual(&name, a)).transpose()?;
    o.kivi = Some(super::spec::Kivi {
        bits: BITS,
        residual,
    });
    Ok(())
}

fn show_kivi<const BITS: u8>(o: &Options) -> Option<String> {
    let k = o.kivi.filter(|k| k.bits == BITS)?;
    Some(match k.residual {
        Some(r) => format!("kivi{BITS}@{r}"),
        None => format!("kivi{BITS}"),
    })
}

/// The row of a `kivi<BITS>` storage option (it may stand alone: every entry kept, quantized).
const fn kivi_row<const BITS: u8>(
    name: &'static str,
    help: &'static str,
    alone: &'static str,
) -> OptionRow {
    OptionRow {
        name,
        arg: "residual",
        arg_required: false,
        help,
        evicting_only: false,
        alone: Some(alone),
        set: set_kivi::<BITS>,
        show: show_kivi::<BITS>,
    }
}

/// Every option, in the order the canonical spec text writes them.
pub static OPTIONS: &[OptionRow] = &[
    OptionRow {
        name: "chunked",
        arg: "",
        arg_required: false,
        help: "compress after every prefill chunk, so peak memory is budget + one chunk (default: once at the end of \
               the prefill, see `at`)",
        evicting_only: true,
        alone: None,
        set: |o, a| {
            no_arg("chunked", a)?;
            o.chunked = true;
            Ok(())
        },
        show: |o| o.chunked.then(|| "chunked".to_string()),
    },
    OptionRow {
        name: "every",
        arg: "N",
        arg_required: true,
        help: "compress every N decode steps (default: never, under both protocols; 0 = never)",
        evicting_only: true,
        alone: None,
        set: |o, a| {
            let Some(a) = a else {
                bail!("'every' needs a step count, e.g. every@64 (0 = never during decoding)")
            };
            o.every = Some(a.parse().map_err(|_| {
                anyhow::anyhow!("every@{a}: expected a whole number of decode steps, e.g. every@64")
            })?);
            Ok(())
        },
        show: |o| o.every.map(|n| format!("every@{n}")),
    },
    OptionRow {
        name: "at",
        arg: "context|prompt",
        arg_required: true,
        help: "when prompts are compressed (`--compress-at` sets it for every spec): `context` = once, at the end of \
               the context, the question left out and fed after it uncompressed (kvpress's protocol; eval's default); \
               `prompt` = at the end of every prompt feed, question included (question-aware; default elsewhere)",
        evicting_only: false,
        alone: None,
        set: |o, a| {
            let Some(a) = a else {
                bail!("'at' needs a protocol: at@context or at@prompt")
            };
            o.compress_at = Some(a.parse()?);
            Ok(())
        },
        show: |o| o.compress_at.map(|a| format!("at@{a}")),
    },
    OptionRow {
        name: "turns",
        arg: "",
        arg_required: false,
        help: "with `at@context`: compress again at the end of every later turn's prompt (chat, multi-turn eval); \
               default: only the context is compressed",
        evicting_only: false,
        alone: None,
        set: |o, a| {
            no_arg("turns", a)?;
            o.turns = true;
            Ok(())
        },
        show: |o| o.turns.then(|| "turns".to_string()),
    },
    OptionRow {
        name: "pyramid",
        arg: "beta",
        arg_required: false,
        help: "per-layer budgets decreasing with depth (PyramidKV as kvpress allocates them: SnapKV's uniform \
               budget when the top layer would keep fewer than the window; default beta 20) on top of any scoring \
               method",
        evicting_only: true,
        alone: None,
        set: |o, a| set_pyramid(o, a, pyramidkv::Formula::Kvpress),
        show: |o| show_pyramid(o, pyramidkv::Formula::Kvpress, "pyramid"),
    },
    OptionRow {
        name: "pyramid_factory",
        arg: "beta",
        arg_required: false,
        help: "PyramidKV's budgets by the original KVCache-Factory formula (the window kept apart; SnapKV's \
               uniform budget only for prompts shorter than twice the budget; default beta 20); also selects the \
               formula of the method pyramidkv",
        evicting_only: true,
        alone: None,
        set: |o, a| set_pyramid(o, a, pyramidkv::Formula::Factory),
        show: |o| show_pyramid(o, pyramidkv::Formula::Factory, "pyramid_factory"),
    },
    OptionRow {
        name: "adakv",
        arg: "alpha",
        arg_required: false,
        help: "head-adaptive budgets across the heads of a layer (AdaKV, floor share alpha, default 0.2) on top of any \
               scoring method",
        evicting_only: true,
        alone: None,
        set: |o, a| {
            o.adakv = Some(a.map_or(Ok(adakv::ALPHA), adakv::parse_alpha)?);
            Ok(())
        },
        show: |o| o.adakv.map(|x| with_arg("adakv", x, adakv::ALPHA)),
    },
    OptionRow {
        name: "heads",
        arg: "FILE",
        arg_required: true,
        help: "DuoAttention's head scores (a `hayloft heads` file), for duo",
        evicting_only: true,
        alone: None,
        set: |o, a| {
            let Some(a) = a.filter(|a| !a.is_empty()) else {
                bail!("'heads' needs a file: heads@<scores.json>")
            };
            o.heads = Some(a.to_string());
            Ok(())
        },
        show: |o| o.heads.as_ref().map(|p| format!("heads@{p}")),
    },
    kivi_row::<8>(
        "kivi8",
        "KIVI-quantized storage, 8 bits (keys per channel, values per token); the newest `residual` entries \
         (default 128) stay f16",
        "every entry, KIVI-quantized 8-bit (keys per channel, values per token), newest 128 in f16",
    ),
    kivi_row::<4>(
        "kivi4",
        "KIVI-quantized storage, 4 bits",
        "every entry, KIVI-quantized 4-bit",
    ),
    kivi_row::<2>(
        "kivi2",
        "KIVI-quantized storage, 2 bits",
        "every entry, KIVI-quantized 2-bit",
    ),
    OptionRow {
        name: "think",
        arg: "ratio",
        arg_required: false,
        help: "ThinK: prune that share of each head's key channels (default 0.4), once, from the last 32 queries",
        evicting_only: false,
        alone: Some("every entry; each head's least significant key channels (40 %) are pruned and stored compactly"),
        set: |o, a| {
            o.think = Some(a.map_or(Ok(think::DEFAULT_PRUNE_RATIO), think::parse_ratio)?);
            Ok(())
        },
        show: |o| o.think.map(|r| with_arg("think", r, think::DEFAULT_PRUNE_RATIO)),
    },
    OptionRow {
        name: "codec",
        arg: "",
        arg_required: false,
        help: "at each compression point (`at`), the cache goes through the KV codec (CacheGen-style, the prefix \
               store's disk and Redis format) and back: the answers of a cache restored from those tiers",
        evicting_only: false,
        alone: Some("every entry, encoded with the KV codec and decoded back at the compression point (`at`)"),
        set: |o, a| {
            no_arg("codec", a)?;
            o.codec = true;
            Ok(())
        },
        show: |o| o.codec.then(|| "codec".to_string()),
    },
];

/// Builds a selector for a spec on a model.
pub type BuildSelector = fn(&SelectSpec, &ModelConfig) -> Result<Box<dyn Selector>>;

/// One decode-time selector: its `--kv` name, what each decode step reads (the README's column), its file, the
/// defaults of the options every selector has, the options only it takes, and its constructor.
pub struct SelectorRow {
    pub name: &'static str,
    pub reads: &'static str,
    pub file: &'static str,
    pub defaults: FrameDefaults,
    /// Names of the [`SELECT_OPTIONS`] rows that are not `common` and that this selector takes.
    pub options: &'static [&'static str],
    pub build: BuildSelector,
}

impl std::fmt::Debug for SelectorRow {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every decode-time selector (`--kv <name>@<budget>`, alone or after a compression method).
pub static SELECTORS: &[SelectorRow] = &[
    SelectorRow {
        name: "quest",
        reads: "top 16-token pages by the channel min/max upper bound of q·k (max over the query heads of the group), \
                plus the newest page",
        file: "src/methods/select/quest.rs",
        defaults: quest::DEFAULTS,
        options: &["score", "page"],
        build: |s, mc| Ok(Box::new(quest::Quest::new(s.budget, &s.options, mc.n_layers))),
    },
    SelectorRow {
        name: "lserve",
        reads: "top blocks scored by their best 16-token logical page (min/max bound), reselected every 4 steps; \
                streaming heads (`heads=FILE`) read 128 sinks + 256 recent",
        file: "src/methods/select/lserve.rs",
        defaults: lserve::DEFAULTS,
        options: &["score", "page", "heads"],
        build: |s, mc| Ok(Box::new(lserve::LServe::new(s.budget, &s.options, mc)?)),
    },
    SelectorRow {
        name: "hip",
        reads: "HiP's hierarchical pruning: 2K pieces, halved and cut back to the top K each round down to 8-token \
                chunks, each piece scored by one representative key found by a binary descent (max over the group); \
                mask refreshed every 8 steps",
        file: "src/methods/select/hip.rs",
        defaults: hip::DEFAULTS,
        options: &["page"],
        build: |s, mc| Ok(Box::new(hip::Hip::new(s.budget, &s.options, mc.n_layers))),
    },
    SelectorRow {
        name: "longheads",
        reads: "LongHeads: the first chunk, the last complete chunk and the top chunks by q · chunk representative \
                (attention-pooled keys, built once per completed chunk), within the trained context; chunk 256, at \
                most B/16 (sink and recent: one chunk)",
        file: "src/methods/select/longheads.rs",
        defaults: longheads::DEFAULTS,
        options: &["page"],
        build: |s, mc| Ok(Box::new(longheads::LongHeads::new(s.budget, &s.options, mc))),
    },
    SelectorRow {
        name: "tokenselect",
        reads: "top tokens by q·k softmaxed per query head and summed over all query heads of the layer (one top-k \
                shared by every KV head), scoring every key each step unless the query stays within cosine 0.9 of \
                the last scored one (Selection Cache)",
        file: "src/methods/select/tokenselect.rs",
        defaults: tokenselect::DEFAULTS,
        options: &["reuse"],
        build: |s, mc| Ok(Box::new(tokenselect::TokenSelect::new(s.budget, &s.options, mc))),
    },
    SelectorRow {
        name: "squeezed",
        reads: "the keys of the best k-means clusters of the prompt's keys (5 % centroids, cosine; a cluster's estimate is \
                the size-weighted softmax over centroids, max over the query heads of the group), best-first to the \
                budget or above a global threshold (`threshold=`); the prompt's last 100 tokens and everything after \
                them always",
        file: "src/methods/select/squeezed.rs",
        defaults: squeezed::DEFAULTS,
        options: &["threshold", "levels"],
        build: |s, mc| Ok(Box::new(squeezed::Squeezed::new(s.budget, &s.options, mc))),
    },
    SelectorRow {
        name: "retrieval",
        reads: "keys found by a greedy search (one per query head, top keys by the maximum over the group) of an \
                attention-aware graph built from the prompt's last queries (RoarGraph projection), keys scored from the \
                index's 8-bit copy (`index=flat`: every key scored from it); keys past the index or after a cache edit \
                are scanned exactly; static set 128 + 512, shrunk in proportion below 2640",
        file: "src/methods/select/retrieval.rs",
        defaults: retrieval::DEFAULTS,
        options: &["queue", "index", "rescore"],
        build: |s, mc| {
            if s.options.rescore.is_some() && s.options.index != Some(retrieval::IndexKind::Flat) {
                bail!("rescore= applies to index=flat (a graph search scores only the keys it touches)");
            }
            Ok(Box::new(retrieval::Retrieval::new(s.budget, &s.options, mc)))
        },
    },
];

/// One option of a selector (`,score=meanstd`, `,sink=128`): always written `name=value`.
pub struct SelectOptionRow {
    pub name: &'static str,
    pub arg: &'static str,
    pub help: &'static str,
    /// Every selector takes it; otherwise only the selectors whose row lists it.
    pub common: bool,
    pub set: fn(&mut SelectOptions, &str) -> Result<()>,
    pub show: fn(&SelectOptions) -> Option<String>,
}

/// Every selector option, in the order the canonical spec text writes them.
pub static SELECT_OPTIONS: &[SelectOptionRow] = &[
    SelectOptionRow {
        name: "sink",
        arg: "N",
        help: "leading entries every head always reads (part of the budget)",
        common: true,
        set: |o, v| {
            o.sink = Some(select::parse_count("sink", v)?);
            Ok(())
        },
        show: |o| o.sink.map(|n| format!("sink={n}")),
    },
    SelectOptionRow {
        name: "recent",
        arg: "N",
        help: "newest entries every head always reads (part of the budget)",
        common: true,
        set: |o, v| {
            o.recent = Some(select::parse_count("recent", v)?);
            Ok(())
        },
        show: |o| o.recent.map(|n| format!("recent={n}")),
    },
    SelectOptionRow {
        name: "dense",
        arg: "N",
        help: "the first N layers read their whole cache (default 2; one that leaves no layer to select in is refused)",
        common: true,
        set: |o, v| {
            o.dense = Some(select::parse_count("dense", v)?);
            Ok(())
        },
        show: |o| o.dense.map(|n| format!("dense={n}")),
    },
    SelectOptionRow {
        name: "interval",
        arg: "N",
        help: "reuse a layer's selection for N decode steps (1 = reselect every step)",
        common: true,
        set: |o, v| {
            let n = select::parse_count("interval", v)?;
            if n == 0 {
                bail!("interval={v}: at least 1 (reselect every step)");
            }
            o.interval = Some(n);
            Ok(())
        },
        show: |o| o.interval.map(|n| format!("interval={n}")),
    },
    SelectOptionRow {
        name: "score",
        arg: "minmax|meanstd",
        help: "page score: the channel min/max upper bound (Quest) or mean + std per channel",
        common: false,
        set: |o, v| {
            o.score = Some(select::parse_score(v)?);
            Ok(())
        },
        show: |o| o.score.map(|s| format!("score={}", select::score_name(s))),
    },
    SelectOptionRow {
        name: "page",
        arg: "N",
        help: "tokens per (logical) page, dividing the block size (quest, lserve); per final chunk (hip); per chunk \
               (longheads): 4, 8, 16, 32, 64, 128 or 256",
        common: false,
        set: |o, v| {
            let n = select::parse_count("page", v)?;
            if ![4, 8, 16, 32, 64, 128, 256].contains(&n) {
                bail!("page={v}: one of 4, 8, 16, 32, 64, 128, 256 (pages of quest and lserve must divide --block-tokens)");
            }
            o.page = Some(n);
            Ok(())
        },
        show: |o| o.page.map(|n| format!("page={n}")),
    },
    SelectOptionRow {
        name: "heads",
        arg: "FILE",
        help: "DuoAttention head scores (`hayloft heads`): the lower-scoring half of the KV heads stream (sinks + recent)",
        common: false,
        set: |o, v| {
            if v.is_empty() {
                bail!("heads= needs a file: heads=<scores.json>");
            }
            o.heads = Some(v.to_string());
            Ok(())
        },
        show: |o| o.heads.as_ref().map(|p| format!("heads={p}")),
    },
    SelectOptionRow {
        name: "reuse",
        arg: "T|off",
        help: "Selection Cache: reuse a layer's selection while the query's cosine similarity to the one it was chosen \
               with is at least T (default 0.9); off scores every step",
        common: false,
        set: |o, v| {
            o.reuse = Some(tokenselect::parse_reuse("reuse", v)?);
            Ok(())
        },
        show: |o| o.reuse.map(|t| format!("reuse={}", tokenselect::reuse_text(t))),
    },
    SelectOptionRow {
        name: "threshold",
        arg: "Q",
        help: "keep the clusters whose estimated attention reaches one global number, the Q quantile (e.g. 0.9) of the \
               prompt's keys' estimates under its last 100 queries, pooled over all layers and heads; the budget caps it",
        common: false,
        set: |o, v| {
            o.threshold = Some(squeezed::parse_quantile("threshold", v)?);
            Ok(())
        },
        show: |o| o.threshold.map(|q| format!("threshold={q}")),
    },
    SelectOptionRow {
        name: "levels",
        arg: "1|2",
        help: "2: hierarchical lookup, 1 % L1 centroids over the L2 ones; only the L2 centroids under L1 clusters above \
               the 0.7 quantile are read",
        common: false,
        set: |o, v| {
            o.levels = Some(squeezed::parse_levels("levels", v)?);
            Ok(())
        },
        show: |o| o.levels.map(|n| format!("levels={n}")),
    },
    SelectOptionRow {
        name: "queue",
        arg: "N",
        help: "candidate queue of the graph search, per query head (more: higher recall, more keys read)",
        common: false,
        set: |o, v| {
            let n = select::parse_count("queue", v)?;
            if n == 0 {
                bail!("queue={v}: at least 1");
            }
            o.queue = Some(n);
            Ok(())
        },
        show: |o| o.queue.map(|n| format!("queue={n}")),
    },
    SelectOptionRow {
        name: "index",
        arg: "graph|flat",
        help: "graph: the paper's attention-aware graph, searched per query head (default); flat: every key scored \
               from the index's 8-bit key copy (the official integration's default index is an exact flat scan)",
        common: false,
        set: |o, v| {
            o.index = Some(retrieval::parse_index("index", v)?);
            Ok(())
        },
        show: |o| o.index.map(|k| format!("index={}", retrieval::index_name(k))),
    },
    SelectOptionRow {
        name: "rescore",
        arg: "on|off",
        help: "with index=flat: off (default) hands the scan's scores (8-bit keys and query) to attention, which then \
               reads only the chosen entries' values; on reads the chosen keys again and scores them exactly",
        common: false,
        set: |o, v| {
            o.rescore = Some(parse_on_off("rescore", v)?);
            Ok(())
        },
        show: |o| o.rescore.map(|b| format!("rescore={}", if b { "on" } else { "off" })),
    },
];

/// Parses `on` or `off`.
fn parse_on_off(name: &str, v: &str) -> Result<bool> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => bail!("{name}={v}: expected on or off"),
    }
}

pub fn selector(name: &str) -> Option<&'static SelectorRow> {
    SELECTORS.iter().find(|m| m.name == name)
}

pub fn select_option(name: &str) -> Option<&'static SelectOptionRow> {
    SELECT_OPTIONS.iter().find(|o| o.name == name)
}

/// Selector names, comma-separated.
pub fn selector_names() -> String {
    names(SELECTORS.iter().map(|m| m.name))
}

/// The README's table of selectors, as markdown.
pub fn selectors_markdown() -> String {
    let mut s = String::from(
        "| selector | reads per decode step (per KV head) | sink / recent / dense layers / interval | file |\n|---|---|---|---|\n",
    );
    for m in SELECTORS {
        let d = m.defaults;
        s += &format!(
            "| `{}` | {} | {} / {} / {} / {} | `{}` |\n",
            m.name, m.reads, d.sink, d.recent, d.dense, d.interval, m.file
        );
    }
    s += "\n| selector option | what it does | selectors |\n|---|---|---|\n";
    for o in SELECT_OPTIONS {
        let who = if o.common {
            "all".to_string()
        } else {
            names(
                SELECTORS
                    .iter()
                    .filter(|m| m.options.contains(&o.name))
                    .map(|m| m.name),
            )
        };
        s += &format!("| `{}={}` | {} | {who} |\n", o.name, o.arg, o.help);
    }
    s
}

/// The method that keeps every entry (the first row).
pub fn full() -> &'static MethodRow {
    &METHODS[0]
}

pub fn method(name: &str) -> Option<&'static MethodRow> {
    METHODS.iter().find(|m| m.name == name)
}

pub fn option(name: &str) -> Option<&'static OptionRow> {
    OPTIONS.iter().find(|o| o.name == name)
}

/// Method names, comma-separated (for error messages).
pub fn method_names() -> String {
    names(METHODS.iter().map(|m| m.name))
}

/// Option names, comma-separated (for error messages).
pub fn option_names() -> String {
    names(OPTIONS.iter().map(|o| o.name))
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// Methods that choose which entries to keep (every row with a press).
pub fn evicting() -> impl Iterator<Item = &'static MethodRow> {
    METHODS.iter().filter(|m| m.build.is_some())
}

/// The `--kv` help of every command, from the table.
pub fn kv_help() -> String {
    let alone: Vec<&str> = OPTIONS
        .iter()
        .filter(|o| o.alone.is_some())
        .map(|o| o.name)
        .collect();
    let opts: Vec<String> = OPTIONS.iter().map(OptionRow::usage).collect();
    let sel_opts: Vec<String> = SELECT_OPTIONS
        .iter()
        .map(|o| format!("{}={}", o.name, o.arg))
        .collect();
    format!(
        "KV cache method: `<method>[@<budget>][,<option>...][,<selector>@<budget>[,<selector option>...]]`, budget a \
         ratio (`@0.25`) or tokens per head (`@1024t`). Methods: {}; {} alone keep every entry. Options: {}. \
         Decode-time selectors (keep the cache, read less): {}; their options: {}. `hayloft methods` explains each. \
         E.g. `snapkv@0.25,chunked,kivi4`, `quest@0.125,score=meanstd`, `snapkv@0.5,quest@1024t`.",
        method_names(),
        alone.join(", "),
        opts.join(", "),
        selector_names(),
        sel_opts.join(", ")
    )
}

/// The README's table of methods (and of options that stand alone as a spec), as markdown.
pub fn methods_markdown() -> String {
    let mut s = String::from("| method | keeps (per KV head) | file |\n|---|---|---|\n");
    for m in METHODS {
        let file = match m.file {
            "—" => "—".to_string(),
            f => format!("`{f}`"),
        };
        s += &format!("| `{}` | {} | {file} |\n", m.name, m.keeps);
    }
    for o in OPTIONS {
        if let Some(keeps) = o.alone {
            s += &format!(
                "| `{}` | {keeps} | option (alone = `full,{}`) |\n",
                o.name, o.name
            );
        }
    }
    s
}

/// The README's table of options, as markdown.
pub fn options_markdown() -> String {
    let mut s = String::from("| option | what it does |\n|---|---|\n");
    for o in OPTIONS {
        s += &format!("| `{}` | {} |\n", o.usage(), o.help);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shared_only_by_what_a_method_implies() {
        for (i, m) in METHODS.iter().enumerate() {
            assert!(
                METHODS[..i].iter().all(|x| x.name != m.name),
                "{} twice",
                m.name
            );
        }
        for (i, o) in OPTIONS.iter().enumerate() {
            assert!(
                OPTIONS[..i].iter().all(|x| x.name != o.name),
                "{} twice",
                o.name
            );
            // `adakv` is a method (SnapKV + AdaKV allocation) and an option (AdaKV over any method): allowed only so.
            if let Some(m) = method(o.name) {
                assert!(
                    m.implies.contains(&o.name),
                    "{} is a method and an option",
                    o.name
                );
            }
        }
    }

    #[test]
    fn selector_rows_are_unique_and_name_real_options() {
        for (i, m) in SELECTORS.iter().enumerate() {
            assert!(SELECTORS[..i].iter().all(|x| x.name != m.name));
            assert!(
                method(m.name).is_none() && option(m.name).is_none(),
                "{}",
                m.name
            );
            for o in m.options {
                let row =
                    select_option(o).unwrap_or_else(|| panic!("{}: unknown option {o}", m.name));
                assert!(!row.common, "{}: {o} is common to every selector", m.name);
            }
        }
    }

    #[test]
    fn rows_refer_to_options_that_exist() {
        for m in METHODS {
            for o in m.implies.iter().chain(m.requires).chain(m.excludes) {
                assert!(option(o).is_some(), "{}: unknown option '{o}'", m.name);
            }
        }
        assert!(full().build.is_none());
        assert_eq!(METHODS.iter().filter(|m| m.build.is_none()).count(), 1);
    }

    #[test]
    fn help_lists_every_name() {
        let h = kv_help();
        for n in METHODS
            .iter()
            .map(|m| m.name)
            .chain(OPTIONS.iter().map(|o| o.name))
            .chain(SELECTORS.iter().map(|o| o.name))
            .chain(SELECT_OPTIONS.iter().map(|o| o.name))
        {
            assert!(h.contains(n), "--kv help misses {n}");
        }
    }
}

/// Which sparse prefill a `--prefill` name selects ([`super::prefill`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKind {
    Dense,
    MInference,
    Streaming,
    LazyLlm,
}

/// One `--prefill` method: `<name>[@<arg>][,<option>=<value>...]`.
pub struct PrefillRow {
    pub name: &'static str,
    pub kind: PrefillKind,
    /// What `@` takes ("" = nothing) and whether it must be given.
    pub arg: &'static str,
    pub arg_required: bool,
    pub help: &'static str,
    pub file: &'static str,
    /// Options it accepts.
    pub options: &'static [PrefillOpt],
}

pub static PREFILL: &[PrefillRow] = &[
    PrefillRow {
        name: "dense",
        kind: PrefillKind::Dense,
        arg: "",
        arg_required: false,
        help: "every query reads every earlier key (the default)",
        file: "src/attention/mod.rs",
        options: &[],
    },
    PrefillRow {
        name: "minference",
        kind: PrefillKind::MInference,
        arg: "PATTERNS.json",
        arg_required: false,
        help: "MInference: per-head vertical-slash / block-sparse / A-shape patterns (file from `hayloft patterns`; \
               without one every head is vertical-slash 1000/6096)",
        file: "src/methods/prefill/minference.rs",
        options: &[
            PrefillOpt::VerticalSlash,
            PrefillOpt::BlockSparse,
            PrefillOpt::AShape,
            PrefillOpt::From,
            PrefillOpt::Min,
        ],
    },
    PrefillRow {
        name: "streaming",
        kind: PrefillKind::Streaming,
        arg: "HEADS.json",
        arg_required: true,
        help: "DuoAttention-style: streaming heads (from `hayloft heads`) read sinks + a local window, retrieval heads \
               stay dense",
        file: "src/methods/prefill/streaming.rs",
        options: &[
            PrefillOpt::Sink,
            PrefillOpt::Local,
            PrefillOpt::From,
            PrefillOpt::Min,
        ],
    },
    PrefillRow {
        name: "lazyllm",
        kind: PrefillKind::LazyLlm,
        arg: "",
        arg_required: false,
        help: "LazyLLM: from each stage's layer on, only the top share of prompt tokens by the last token's attention \
               (averaged over heads, at the layer before) is computed; pruned hidden states wait in an aux cache and \
               decode revives selected ones",
        file: "src/methods/prefill/lazyllm.rs",
        options: &[PrefillOpt::Layers, PrefillOpt::Revive],
    },
];

/// A `--prefill` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillOpt {
    VerticalSlash,
    BlockSparse,
    AShape,
    From,
    Min,
    Sink,
    Local,
    Layers,
    Revive,
}

pub struct PrefillOptionRow {
    pub name: &'static str,
    pub opt: PrefillOpt,
    pub arg: &'static str,
    pub help: &'static str,
}

pub static PREFILL_OPTIONS: &[PrefillOptionRow] = &[
    PrefillOptionRow {
        name: "vs",
        opt: PrefillOpt::VerticalSlash,
        arg: "V:S",
        help: "every head vertical-slash: V columns, S diagonals (first 30 columns, last 100 diagonals forced)",
    },
    PrefillOptionRow {
        name: "block",
        opt: PrefillOpt::BlockSparse,
        arg: "K",
        help: "every head block-sparse: top K 64-token key blocks per 64-query block (MInference: 100)",
    },
    PrefillOptionRow {
        name: "ashape",
        opt: PrefillOpt::AShape,
        arg: "I:L",
        help: "every head A-shape: the first I keys and the last L (SCBench: 128:3968)",
    },
    PrefillOptionRow {
        name: "from",
        opt: PrefillOpt::From,
        arg: "N",
        help: "layers before N stay dense (MInference's starting_layer; default 0)",
    },
    PrefillOptionRow {
        name: "min",
        opt: PrefillOpt::Min,
        arg: "N",
        help: "chunks whose context is under N tokens stay dense (default 1024)",
    },
    PrefillOptionRow {
        name: "sink",
        opt: PrefillOpt::Sink,
        arg: "N",
        help: "streaming heads: first N keys (default 128)",
    },
    PrefillOptionRow {
        name: "local",
        opt: PrefillOpt::Local,
        arg: "N",
        help: "streaming heads: last N keys (default 256)",
    },
    PrefillOptionRow {
        name: "layers",
        opt: PrefillOpt::Layers,
        arg: "L:keep/L:keep/...",
        help: "LazyLLM stages: layers ascending, keep shares of the prompt not growing (default: 0.7/0.4/0.2 from 1/4, \
               1/2 and 3/4 of the depth)",
    },
    PrefillOptionRow {
        name: "revive",
        opt: PrefillOpt::Revive,
        arg: "N",
        help: "LazyLLM: revival every N decode steps (default 1; 0 = never, one-shot eviction)",
    },
];

pub fn prefill_row(name: &str) -> Option<&'static PrefillRow> {
    PREFILL.iter().find(|r| r.name == name)
}

pub fn prefill_row_of(kind: PrefillKind) -> &'static PrefillRow {
    PREFILL
        .iter()
        .find(|r| r.kind == kind)
        .expect("every prefill kind has a row")
}

pub fn prefill_option(name: &str) -> Option<&'static PrefillOptionRow> {
    PREFILL_OPTIONS.iter().find(|o| o.name == name)
}

pub fn prefill_option_of(opt: PrefillOpt) -> &'static PrefillOptionRow {
    PREFILL_OPTIONS
        .iter()
        .find(|o| o.opt == opt)
        .expect("every prefill option has a row")
}

/// Prefill method names, comma-separated.
pub fn prefill_names() -> String {
    names(PREFILL.iter().map(|r| r.name))
}

/// The `--prefill` help, from the table.
pub fn prefill_help() -> String {
    let opts: Vec<String> = PREFILL_OPTIONS
        .iter()
        .map(|o| format!("{}={}", o.name, o.arg))
        .collect();
    format!(
        "Prefill attention: `<method>[@<file>][,<option>=<value>...]`, method one of {}; options {}. Decode is never \
         affected.",
        prefill_names(),
        opts.join(", ")
    )
}

/// The README's table of prefill methods and options, as markdown.
pub fn prefill_markdown() -> String {
    let mut s =
        String::from("| prefill | what each query reads | options | file |\n|---|---|---|---|\n");
    for r in PREFILL {
        let name = if r.arg.is_empty() {
            r.name.to_string()
        } else if r.arg_required {
            format!("{}@{}", r.name, r.arg)
        } else {
            format!("{}[@{}]", r.name, r.arg)
        };
        let opts: Vec<&str> = r
            .options
            .iter()
            .map(|&o| prefill_option_of(o).name)
            .collect();
        s += &format!(
            "| `{name}` | {} | {} | `{}` |\n",
            r.help,
            opts.join(", "),
            r.file
        );
    }
    s += "\n| prefill option | what it does |\n|---|---|\n";
    for o in PREFILL_OPTIONS {
        s += &format!("| `{}={}` | {} |\n", o.name, o.arg, o.help);
    }
    s
}
