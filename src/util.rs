//! Small helpers every layer may use (no dependency on any other module of the crate).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Reads a text file: a clear error for a missing file or invalid UTF-8.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, flushed to disk, then renamed over
/// `path`. A failure (a full disk, a missing folder) names the path and leaves any earlier `path` as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
    })
}

/// `dir/.name.tmp-<pid>` for `dir/name`: same folder, so the rename stays on one file system.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A size in bytes: `800MiB`, `1.5GiB`, `512KiB`, `100MB`, `4096B`, or a plain number of bytes (`1048576`).
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let x: f64 = num.parse().map_err(|_| {
        anyhow::anyhow!(
            "'{s}': give a size with a unit (800MiB, 1.5GiB, 512KiB, 100MB) or a number of bytes"
        )
    })?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => bail!("'{s}': unknown unit '{unit}' (valid: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    let b = x * mult;
    if !(b >= 1.0 && b.is_finite() && b < usize::MAX as f64) {
        bail!("'{s}': a size must be at least 1 byte");
    }
    Ok(b as usize)
}

/// A size flag's value (`--max-memory 800MiB`), parsed by [`parse_size`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl std::str::FromStr for ByteSize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_size(s).map(ByteSize)
    }
}

/// Hands memory the program has freed back to the OS now, instead of when the allocator next decides to: after a
/// model's load, the parsed GGUF metadata (Gemma 3's 262K-token vocabulary: about 35 MB) would otherwise stay
/// resident for the life of a server or a chat (mimalloc, the binary's allocator, keeps freed pages for reuse).
/// Steady resident memory after `hayloft generate`'s load, 2026-12-06: Gemma 3 315.8 → 271.7 MB, Qwen2.5 545.3 →
/// 518.1 MB. Where another allocator serves the process (tests), mimalloc's own empty heap is all it touches.
pub fn return_freed_memory() {
    // SAFETY: mi_collect takes no pointers; it only frees what mimalloc holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// A JSON value with its objects' keys in the order written (serde_json's map sorts them, and a schema's property
/// order is the order the keys are generated in: a "reasoning" field listed before "answer" comes first).
#[derive(Clone, Debug, PartialEq)]
pub enum JVal {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<JVal>),
    Obj(Vec<(String, JVal)>),
}

impl JVal {
    /// The value of `key` in an object (None otherwise).
    pub fn get(&self, key: &str) -> Option<&JVal> {
        match self {
            JVal::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            JVal::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            JVal::Num(n) => n.as_u64(),
            _ => None,
        }
    }

    /// The value as serde_json's (objects' key order lost).
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            JVal::Null => serde_json::Value::Null,
            JVal::Bool(b) => serde_json::Value::Bool(*b),
            JVal::Num(n) => serde_json::Value::Number(n.clone()),
            JVal::Str(s) => serde_json::Value::String(s.clone()),
            JVal::Arr(a) => serde_json::Value::Array(a.iter().map(JVal::to_value).collect()),
            JVal::Obj(kv) => serde_json::Value::Object(
                kv.iter().map(|(k, v)| (k.clone(), v.to_value())).collect(),
            ),
        }
    }

    /// Compact JSON text, keys in their order.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            JVal::Arr(a) => {
                out.push(b'[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write(out);
                }
                out.push(b']');
            }
            JVal::Obj(kv) => {
                out.push(b'{');
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(k).unwrap_or_default());
                    out.push(b':');
                    v.write(out);
                }
                out.push(b'}');
            }
            v => out.extend(serde_json::to_vec(&v.to_value()).unwrap_or_default()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for JVal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JVal;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<JVal, E> {
                Ok(JVal::Null)
            }
            fn visit_none<E>(self) -> Result<JVal, E> {
                Ok(JVal::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<JVal, E> {
                Ok(JVal::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<JVal, E> {
                Ok(JVal::Num(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<JVal, E> {
                Ok(JVal::Num(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<JVal, E> {
                serde_json::Number::from_f64(n)
                    .map(JVal::Num)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, s: &str) -> Result<JVal, E> {
                Ok(JVal::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<JVal, E> {
                Ok(JVal::Str(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<JVal, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(JVal::Arr(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<JVal, A::Error> {
                let mut kv: Vec<(String, JVal)> = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, JVal>()? {
                    // A repeated key: the last one wins, as serde_json's map does.
                    kv.retain(|(k2, _)| *k2 != k);
                    kv.push((k, v));
                }
                Ok(JVal::Obj(kv))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("800MiB").unwrap(), 800 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        for bad in ["", "0", "-5MiB", "12 parsecs", "MiB", "0.1B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(format!("{:#}", parse_size("3XB").unwrap_err()).contains("unknown unit 'XB'"));
    }

    #[test]
    fn atomic_write_replaces_whole_or_leaves_the_old_file() {
        let dir = std::env::temp_dir().join(format!("hayloft-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("report.md");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // A folder that does not exist: the error names the path.
        let missing = dir.join("no/such/dir/report.md");
        let e = format!("{:#}", write_atomic(&missing, b"x").unwrap_err());
        assert!(e.contains("no/such/dir/report.md"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
