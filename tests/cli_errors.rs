//! Bad input gets a clear error naming the problem and a non-zero exit, never a panic.

use std::path::Path;
use std::process::Command;

use hayloft::gguf::writer::GgufWriter;
use hayloft::gguf::{GgmlType, Value};
use hayloft::model::testutil::{write_tiny_llama, TinySpec};

fn hayloft(args: &[&str], home: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hayloft"))
        .args(args)
        .env("HAYLOFT_HOME", home)
        .output()
        .expect("run hayloft");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "hayloft panicked on {args:?}: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

fn expect_error(args: &[&str], home: &Path, needles: &[&str]) {
    let (code, err) = hayloft(args, home);
    assert_ne!(code, 0, "{args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}:\n{err}");
    }
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(&dir.path().join("tiny.gguf"), &TinySpec::default()).unwrap();
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
    fn home(&self) -> &Path {
        self.dir.path()
    }
}

#[test]
fn missing_model_file() {
    let f = Fixture::new();
    expect_error(
        &["generate", "--model", &f.path("nope.gguf"), "-p", "hi"],
        f.home(),
        &["nope.gguf", "does not exist"],
    );
}

#[test]
fn not_a_gguf_file() {
    let f = Fixture::new();
    std::fs::write(f.path("text.gguf"), b"hello, I am not a model").unwrap();
    expect_error(
        &["generate", "--model", &f.path("text.gguf"), "-p", "hi"],
        f.home(),
        &["not a GGUF file"],
    );
    std::fs::write(f.path("empty.gguf"), b"").unwrap();
    expect_error(
        &["info", &f.path("empty.gguf")],
        f.home(),
        &["not a GGUF file"],
    );
}

#[test]
fn truncated_gguf_file() {
    let f = Fixture::new();
    let bytes = std::fs::read(f.path("tiny.gguf")).unwrap();
    for cut in [10, 200, bytes.len() / 2, bytes.len() - 7] {
        std::fs::write(f.path("cut.gguf"), &bytes[..cut]).unwrap();
        expect_error(
            &["generate", "--model", &f.path("cut.gguf"), "-p", "hi"],
            f.home(),
            &["truncated"],
        );
    }
}

#[test]
fn unsupported_architecture() {
    let f = Fixture::new();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("mamba".into()));
    w.tensor_f32("x", &[4], &[0.0; 4]);
    w.write(Path::new(&f.path("mamba.gguf"))).unwrap();
    expect_error(
        &["generate", "--model", &f.path("mamba.gguf"), "-p", "hi"],
        f.home(),
        &["unsupported architecture 'mamba'"],
    );
}

#[test]
fn unsupported_tensor_type() {
    let f = Fixture::new();
    // Rewrite the tiny model with one layer's Q weight in a type hayloft does not know (ggml type 99).
    let g = hayloft::gguf::GgufFile::open(f.path("tiny.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.meta(k, v.clone());
    }
    for t in &g.tensors {
        let ty = if t.name == "blk.0.attn_q.weight" {
            GgmlType::Other(99)
        } else {
            t.ty
        };
        w.tensor(&t.name, &t.dims, ty, g.tensor_bytes(t).to_vec());
    }
    w.write(Path::new(&f.path("odd.gguf"))).unwrap();
    expect_error(
        &["generate", "--model", &f.path("odd.gguf"), "-p", "hi"],
        f.home(),
        &["blk.0.attn_q.weight", "99"],
    );
}

#[test]
fn prompt_longer_than_max_context() {
    let f = Fixture::new();
    let long = "the ".repeat(100);
    expect_error(
        &[
            "generate",
            "--model",
            &f.path("tiny.gguf"),
            "-p",
            &long,
            "--max-context",
            "16",
        ],
        f.home(),
        &["prompt too long", "16"],
    );
}

#[test]
fn empty_prompt() {
    let f = Fixture::new();
    expect_error(
        &["generate", "--model", &f.path("tiny.gguf"), "-p", ""],
        f.home(),
        &["prompt is empty"],
    );
    std::fs::write(f.path("empty.txt"), b"").unwrap();
    expect_error(
        &[
            "generate",
            "--model",
            &f.path("tiny.gguf"),
            "-f",
            &f.path("empty.txt"),
        ],
        f.home(),
        &["prompt is empty"],
    );
}

#[test]
fn invalid_utf8_prompt_file() {
    let f = Fixture::new();
    std::fs::write(f.path("bad.txt"), b"caf\xe9 au lait").unwrap();
    expect_error(
        &[
            "generate",
            "--model",
            &f.path("tiny.gguf"),
            "-f",
            &f.path("bad.txt"),
        ],
        f.home(),
        &["bad.txt", "not valid UTF-8", "offset 3"],
    );
}

#[test]
fn unknown_kv_method_lists_valid_ones() {
    let f = Fixture::new();
    expect_error(
        &[
            "generate",
            "--model",
            &f.path("tiny.gguf"),
            "-p",
            "hi",
            "--kv",
            "magic@0.5",
        ],
        f.home(),
        &["unknown KV method 'magic'", "full"],
    );
}

#[test]
fn unknown_model_name_for_fetch() {
    let f = Fixture::new();
    expect_error(
        &["fetch", "llama-70b"],
        f.home(),
        &["unknown model 'llama-70b'", "smollm2-135m"],
    );
}

#[test]
fn kv_spec_errors_name_the_problem() {
    let f = Fixture::new();
    for (kv, want) in [
        ("snapkv", "needs a budget"),
        ("snapkv@2", "(0, 1]"),
        ("snapkv@0.5,sideways", "chunked"),
        ("duo@0.5", "heads@"),
        (
            "duo@0.5,heads@/nonexistent/heads.json",
            "cannot read head scores",
        ),
    ] {
        expect_error(
            &[
                "generate",
                "--model",
                &f.path("tiny.gguf"),
                "-p",
                "hi",
                "--kv",
                kv,
            ],
            f.home(),
            &[want],
        );
    }
}

#[test]
fn bad_kv_storage_flags_name_the_problem() {
    let f = Fixture::new();
    let model = f.path("tiny.gguf");
    let run = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "-p", "hi", "-n", "1"];
        args.extend_from_slice(extra);
        expect_error(&args, f.home(), needles);
    };
    run(&["--kv-dtype", "q3"], &["unknown KV cache type 'q3'", "q4"]);
    run(
        &["--kv-residual", "64"],
        &["--kv-residual applies to a quantized cache"],
    );
    run(&["--kv", "kivi4", "--kv-dtype", "q8"], &["4-bit", "q8"]);
    run(&["--kv", "kivi4@many"], &["residual window"]);
    run(
        &["--kv", "kivi4@64", "--kv-residual", "32"],
        &["both set the residual"],
    );
    run(&["--kv", "kivi4", "--kv-dtype", "f32"], &["f32"]);
    let off = f.path("off");
    run(
        &["--kv-offload", &off, "--resident", "64XB"],
        &["--resident", "unknown unit 'XB'"],
    );
    run(
        &["--kv-offload", &off, "--resident", "3"],
        &["share of the cache", "(0, 1]"],
    );
    run(&["--resident", "0.5"], &["--kv-offload"]);
    run(&["--kv-offload", &off], &["--resident"]);
    run(
        &["--kv-offload", &off, "--resident", "1KiB"],
        &["below the", "must stay in RAM"],
    );
    run(
        &["--kv-offload", &off, "--resident", "0.5", "--kv", "kivi4"],
        &["keeps f16 blocks", "q4"],
    );
}
