//! The word lists RULER draws its keys and common words from: the PyPI package `wonderwords` (3.0.1), whose wheel
//! ships `adjectivelist.txt`, `nounlist.txt` and `verblist.txt`. Fetched once with `pip download --no-deps`, the
//! wheel's SHA-256 checked, the three lists unpacked into `$HAYLOFT_HOME/data/wonderwords-3.0.1/` (never committed).
//!
//! Read as wonderwords' `_get_words_from_text_file` does (one entry a line, trailing whitespace removed).
//! RULER's keys are `sorted(set(f"{adj}-{noun}"))` drawn with `random.choice`: with both lists deduplicated every
//! pair is distinct (910 × 6,782 = 6,171,620 keys, checked), so an adjective and a noun drawn uniformly give the same
//! distribution without building the list. cwe draws from `sorted(set(nouns + adjs + verbs))` (8,166 words).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use super::Rng;
use crate::fetch::{home_dir, pip_download, python, sha256_file};

/// The package and its wheel's SHA-256.
pub const PACKAGE: &str = "wonderwords==3.0.1";
pub const WHEEL_SHA256: &str = "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0";
const DIR: &str = "wonderwords-3.0.1";
const FILES: [&str; 3] = ["adjectivelist.txt", "nounlist.txt", "verblist.txt"];

/// The lists, deduplicated in file order, and cwe's word pool.
#[derive(Debug)]
pub struct Lists {
    pub adjectives: Vec<String>,
    pub nouns: Vec<String>,
    /// `sorted(set(nouns + adjectives + verbs))`.
    pub words: Vec<String>,
}

impl Lists {
    /// Parses the three files' texts.
    pub fn parse(adjectives: &str, nouns: &str, verbs: &str) -> Result<Self> {
        let read = |t: &str, what: &str| -> Result<Vec<String>> {
            let mut seen = std::collections::HashSet::new();
            let v: Vec<String> = t
                .lines()
                .map(|l| l.trim_end().to_string())
                .filter(|w| seen.insert(w.clone()))
                .collect();
            if v.len() < 100 || v.iter().any(String::is_empty) {
                bail!(
                    "wonderwords' {what} list looks damaged ({} entries)",
                    v.len()
                );
            }
            Ok(v)
        };
        let adjectives = read(adjectives, "adjective")?;
        let nouns = read(nouns, "noun")?;
        let verbs = read(verbs, "verb")?;
        let mut words: Vec<String> = nouns
            .iter()
            .chain(&adjectives)
            .chain(&verbs)
            .cloned()
            .collect();
        words.sort();
        words.dedup();
        Ok(Lists {
            adjectives,
            nouns,
            words,
        })
    }

    /// A RULER key: `random.choice` over every adjective-noun pair.
    pub fn key(&self, rng: &mut Rng) -> String {
        format!(
            "{}-{}",
            rng.choose(&self.adjectives),
            rng.choose(&self.nouns)
        )
    }
}

/// The lists, fetched on first use and read once per process.
pub fn lists() -> Result<&'static Lists> {
    static LISTS: OnceLock<Lists> = OnceLock::new();
    if let Some(l) = LISTS.get() {
        return Ok(l);
    }
    let dir = ensure()?;
    let read = |f: &str| crate::util::read_text_file(&dir.join(f));
    let l = Lists::parse(&read(FILES[0])?, &read(FILES[1])?, &read(FILES[2])?)
        .with_context(|| format!("in {}", dir.display()))?;
    Ok(LISTS.get_or_init(|| l))
}

/// The folder holding the three lists, fetching the wheel with pip on first use.
pub fn ensure() -> Result<PathBuf> {
    let data = home_dir().join("data");
    let dir = data.join(DIR);
    if FILES.iter().all(|f| dir.join(f).exists()) {
        return Ok(dir);
    }
    // Parallel tests are threads of one process: one fetches, the others wait and find the lists.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if FILES.iter().all(|f| dir.join(f).exists()) {
        return Ok(dir);
    }
    fetch_into(&data, &dir).with_context(|| {
        format!(
            "RULER needs wonderwords' word lists; check that `python3 -m pip download --no-deps {PACKAGE}` works \
             (hayloft then unpacks them into {} itself)",
            dir.display()
        )
    })?;
    Ok(dir)
}

fn fetch_into(data: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let nonce = crate::fetch::scratch_nonce();
    let dl = data.join(format!(".download-wonderwords-{nonce}"));
    fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    eprintln!("fetching {PACKAGE} (RULER's word lists) with pip ...");
    let wheel = pip_download(PACKAGE, &dl)?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        fs::remove_dir_all(&dl).ok();
        bail!(
            "downloaded {} has SHA-256 {got}, expected {WHEEL_SHA256}",
            wheel.display()
        );
    }
    let tmp = data.join(format!(".{DIR}.partial-{nonce}"));
    let py = python();
    let script = "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[1])\nfor f in sys.argv[3:]:\n    open(os.path.join(sys.argv[2], f), 'wb').write(z.read('wonderwords/assets/' + f))\n";
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let out = Command::new(&py)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&tmp)
        .args(FILES)
        .output()
        .with_context(|| format!("cannot run {py} to unpack the word lists"))?;
    if !out.status.success() {
        fs::remove_dir_all(&tmp).ok();
        bail!(
            "cannot unpack the word lists: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::remove_dir_all(dir).ok();
    fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))?;
    fs::remove_dir_all(&dl).ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_like_wonderwords() {
        let adj: String = (0..120).map(|i| format!("adj{i} \n")).collect::<String>() + "adj0\n";
        let noun: String = (0..150).map(|i| format!("noun{i}\r\n")).collect();
        let verb: String = (0..100).map(|i| format!("v{i}\n")).collect::<String>() + "noun3\n";
        let l = Lists::parse(&adj, &noun, &verb).unwrap();
        assert_eq!(l.adjectives.len(), 120, "duplicates dropped");
        assert_eq!(l.adjectives[0], "adj0", "trailing whitespace removed");
        assert_eq!(l.nouns[1], "noun1");
        assert_eq!(l.words.len(), 120 + 150 + 100);
        assert!(l.words.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        let mut r = Rng::new(1);
        let k = l.key(&mut r);
        assert!(k.starts_with("adj") && k.contains("-noun"), "{k}");
        assert!(Lists::parse("a\n", &noun, &verb).is_err());
    }
}
