//! The metadata keys hayloft reads, with the kind of value each must hold. [`check`] runs when a file is opened, so
//! a key of the wrong type is an error naming the key before anything reads it, never a silent default.
//!
//! Architecture keys are listed by their suffix (`block_count` stands for `<arch>.block_count`, where `<arch>` is the
//! file's `general.architecture`), so a new architecture gets its keys checked without being listed here.

use std::collections::BTreeMap;

use super::Value;

/// What a key's value must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A non-negative value of any integer type (u8 … i64): every integer hayloft reads is a count, size or id.
    Int,
    /// Exactly a u32 (what the GGUF spec fixes for `general.alignment`).
    U32,
    /// f32 or f64, or an integer (a base of 10000 written as an integer is still a number).
    Float,
    Bool,
    Str,
    /// An array whose elements are all of this (scalar) kind.
    Array(&'static Kind),
    /// Either of two kinds (`sliding_window_pattern`: a period, or one bool per layer).
    Either(&'static Kind, &'static Kind),
}

impl Kind {
    pub fn matches(self, v: &Value) -> bool {
        use Value::*;
        match self {
            Kind::Int => is_integer(v) && v.as_u64().is_some(),
            Kind::U32 => matches!(v, U32(_)),
            Kind::Float => matches!(v, F32(_) | F64(_)) || is_integer(v),
            Kind::Bool => matches!(v, Bool(_)),
            Kind::Str => matches!(v, String(_)),
            Kind::Array(e) => matches!(v, Array(a) if a.iter().all(|x| e.matches(x))),
            Kind::Either(a, b) => a.matches(v) || b.matches(v),
        }
    }

    /// How `v` falls short of this kind, for errors: "type string", or "the value -4 (i32)" for a negative integer
    /// where a non-negative one is expected.
    pub fn shortfall(self, v: &Value) -> String {
        match (self, v.as_i64()) {
            (Kind::Int | Kind::Either(Kind::Int, _), Some(i)) if is_integer(v) && i < 0 => {
                format!("the value {i} ({})", v.type_desc())
            }
            _ => format!("type {}", v.type_desc()),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Int => "a non-negative integer",
            Kind::U32 => "u32",
            Kind::Float => "a number",
            Kind::Bool => "bool",
            Kind::Str => "a string",
            Kind::Array(Kind::Str) => "an array of strings",
            Kind::Array(Kind::Int) => "an array of non-negative integers",
            Kind::Array(Kind::Float) => "an array of numbers",
            Kind::Array(Kind::Bool) => "an array of bools",
            Kind::Array(_) => "an array",
            Kind::Either(Kind::Int, Kind::Array(Kind::Bool)) => {
                "a non-negative integer or an array of bools"
            }
            Kind::Either(..) => "one of two kinds",
        }
    }
}

fn is_integer(v: &Value) -> bool {
    use Value::*;
    matches!(
        v,
        U8(_) | I8(_) | U16(_) | I16(_) | U32(_) | I32(_) | U64(_) | I64(_)
    )
}

/// Keys named in full.
const FULL: &[(&str, Kind)] = &[
    ("general.architecture", Kind::Str),
    ("general.name", Kind::Str),
    ("general.alignment", Kind::U32),
    ("tokenizer.ggml.model", Kind::Str),
    ("tokenizer.ggml.pre", Kind::Str),
    ("tokenizer.ggml.tokens", Kind::Array(&Kind::Str)),
    ("tokenizer.ggml.token_type", Kind::Array(&Kind::Int)),
    ("tokenizer.ggml.scores", Kind::Array(&Kind::Float)),
    ("tokenizer.ggml.merges", Kind::Array(&Kind::Str)),
    ("tokenizer.ggml.bos_token_id", Kind::Int),
    ("tokenizer.ggml.eos_token_id", Kind::Int),
    ("tokenizer.ggml.eot_token_id", Kind::Int),
    ("tokenizer.ggml.eom_token_id", Kind::Int),
    ("tokenizer.ggml.fim_pre_token_id", Kind::Int),
    ("tokenizer.ggml.fim_suf_token_id", Kind::Int),
    ("tokenizer.ggml.fim_mid_token_id", Kind::Int),
    ("tokenizer.ggml.fim_pad_token_id", Kind::Int),
    ("tokenizer.ggml.fim_rep_token_id", Kind::Int),
    ("tokenizer.ggml.fim_sep_token_id", Kind::Int),
    ("tokenizer.ggml.prefix_token_id", Kind::Int),
    ("tokenizer.ggml.suffix_token_id", Kind::Int),
    ("tokenizer.ggml.middle_token_id", Kind::Int),
    ("tokenizer.ggml.add_bos_token", Kind::Bool),
    ("tokenizer.ggml.add_eos_token", Kind::Bool),
    ("tokenizer.ggml.add_space_prefix", Kind::Bool),
    ("tokenizer.chat_template", Kind::Str),
];

/// `<arch>.` keys, by suffix.
const ARCH: &[(&str, Kind)] = &[
    ("block_count", Kind::Int),
    ("context_length", Kind::Int),
    ("embedding_length", Kind::Int),
    ("feed_forward_length", Kind::Int),
    ("attention.head_count", Kind::Int),
    ("attention.head_count_kv", Kind::Int),
    ("attention.key_length", Kind::Int),
    ("attention.value_length", Kind::Int),
    ("attention.sliding_window", Kind::Int),
    (
        "attention.sliding_window_pattern",
        Kind::Either(&Kind::Int, &Kind::Array(&Kind::Bool)),
    ),
    ("attention.layer_norm_rms_epsilon", Kind::Float),
    ("rope.dimension_count", Kind::Int),
    ("rope.freq_base", Kind::Float),
    ("rope.scaling.type", Kind::Str),
    ("rope.scaling.factor", Kind::Float),
    ("rope.scale_linear", Kind::Float),
    ("rope.scaling.original_context_length", Kind::Int),
    ("rope.scaling.attn_factor", Kind::Float),
    ("rope.scaling.yarn_beta_fast", Kind::Float),
    ("rope.scaling.yarn_beta_slow", Kind::Float),
    ("rope.scaling.yarn_log_multiplier", Kind::Float),
];

/// The kind `key` must hold in a file of architecture `arch`, if hayloft reads it.
pub fn expected(key: &str, arch: Option<&str>) -> Option<Kind> {
    if let Some(&(_, k)) = FULL.iter().find(|(name, _)| *name == key) {
        return Some(k);
    }
    let suffix = key.strip_prefix(arch?)?.strip_prefix('.')?;
    ARCH.iter().find(|(s, _)| *s == suffix).map(|&(_, k)| k)
}

/// The first key (in key order) whose value is not of the kind hayloft reads it as: (key, expected kind).
pub fn check(metadata: &BTreeMap<String, Value>) -> Option<(&str, Kind)> {
    let arch = metadata.get("general.architecture").and_then(Value::as_str);
    metadata.iter().find_map(|(k, v)| {
        expected(k, arch)
            .filter(|kind| !kind.matches(v))
            .map(|kind| (k.as_str(), kind))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_lookup() {
        assert_eq!(
            expected("llama.block_count", Some("llama")),
            Some(Kind::Int)
        );
        assert_eq!(
            expected("qwen2.rope.freq_base", Some("qwen2")),
            Some(Kind::Float)
        );
        assert_eq!(expected("llama.block_count", Some("gemma3")), None);
        assert_eq!(expected("llama.unknown_key", Some("llama")), None);
        assert_eq!(expected("general.alignment", None), Some(Kind::U32));
        assert!(Kind::Float.matches(&Value::U32(10000)));
        assert!(Kind::Float.matches(&Value::I32(-1)));
        assert_eq!(Kind::Int.shortfall(&Value::I32(-4)), "the value -4 (i32)");
        assert_eq!(Kind::U32.shortfall(&Value::I32(-4)), "type i32");
        assert!(!Kind::Int.matches(&Value::F32(1.0)));
        assert!(!Kind::Int.matches(&Value::Bool(true)));
        assert!(!Kind::Int.matches(&Value::I32(-1)));
        assert!(Kind::Int.matches(&Value::I64(7)));
        assert!(!Kind::U32.matches(&Value::U64(32)));
        assert!(!Kind::Bool.matches(&Value::U8(1)));
        let strs = Kind::Array(&Kind::Str);
        assert!(strs.matches(&Value::Array(vec![Value::String("a".into())])));
        assert!(strs.matches(&Value::Array(vec![])));
        assert!(!strs.matches(&Value::Array(vec![Value::U32(1)])));
        assert!(!strs.matches(&Value::String("a".into())));
    }
}
