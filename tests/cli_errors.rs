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
fn a_bad_compression_protocol_names_the_allowed_ones() {
    let f = Fixture::new();
    let model = f.path("tiny.gguf");
    for cmd in [
        vec!["generate", "-p", "hi"],
        vec!["chat"],
        vec!["eval", "niah"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--model", &model, "--compress-at", "question"]);
        expect_error(&args, f.home(), &["question", "context, prompt"]);
    }
    expect_error(
        &[
            "generate",
            "--model",
            &model,
            "-p",
            "hi",
            "--kv",
            "snapkv@0.5,at@later",
        ],
        f.home(),
        &["later", "context, prompt"],
    );
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
    let disk = f.path("prompts");
    let offloaded_to_disk = [
        "--kv-offload",
        &off,
        "--resident",
        "0.5",
        "--kv-disk",
        &disk,
    ];
    run(
        &offloaded_to_disk,
        &["--kv-disk cannot store an offloaded cache"],
    );
    run(&["--kv-disk-format", "exact"], &["--kv-disk"]);
    let mut serve = vec!["serve", "--model", &model, "--port", "0"];
    serve.extend_from_slice(&offloaded_to_disk);
    expect_error(&serve, f.home(), &["cannot store an offloaded cache"]);
    run(
        &["--kv-disk", &disk, "--kv-disk-format", "lossless"],
        &["'lossless'", "exact", "codec"],
    );
    run(
        &["--kv-offload", &off, "--resident", "1KiB"],
        &["below the", "must stay in RAM"],
    );
    run(
        &["--kv-offload", &off, "--resident", "0.5", "--kv", "kivi4"],
        &["keeps f16 blocks", "q4"],
    );
    run(&["--block-tokens", "24"], &["'24'", "16, 32 or 64"]);
    run(&["--block-tokens", "-1"], &["16, 32 or 64"]);
    run(
        &["--block-tokens", "16", "--kv", "quest@0.5,page=32,dense=0"],
        &["pages of 32 tokens", "blocks of 16", "--block-tokens"],
    );
    // The tiny model has 2 layers: selectors' default 2 dense layers would leave nothing to select in.
    run(
        &["--kv", "quest@0.5"],
        &["dense=2 leaves quest no layer to select in", "2 layers"],
    );
}

/// Runs hayloft and returns (exit code, stdout, stderr).
fn hayloft_out(args: &[&str], home: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hayloft"))
        .args(args)
        .env("HAYLOFT_HOME", home)
        .env_remove("HAYLOFT_EVAL_ABORT_AFTER")
        .output()
        .expect("run hayloft");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "hayloft panicked on {args:?}: {stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn a_memory_limit_below_the_plan_is_refused_before_the_prefill() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let stats = f.path("stats.json");
    let base = [
        "generate",
        "--model",
        &m,
        "-p",
        "the the the",
        "-n",
        "4",
        "-t",
        "2",
    ];
    // Nothing is generated: the refusal comes before the prefill, naming the parts and the limit.
    let (code, out, err) = hayloft_out(&[&base[..], &["--max-memory", "64KiB"]].concat(), f.home());
    assert_ne!(code, 0, "{err}");
    for s in [
        "not enough memory",
        "--max-memory 64.0 KiB",
        "weights",
        "KV cache",
        "--kv-dtype q4",
    ] {
        assert!(err.contains(s), "stderr lacks {s:?}:\n{err}");
    }
    assert!(
        out.is_empty(),
        "generated text despite the refusal: {out:?}"
    );
    // A limit above the plan runs, and the stats show the planned KV next to the measured peak.
    let (code, _, err) = hayloft_out(
        &[&base[..], &["--max-memory", "1GiB", "--stats-json", &stats]].concat(),
        f.home(),
    );
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let (planned, peak) = (
        j["planned_kv_bytes"].as_u64().unwrap(),
        j["peak_kv_bytes"].as_u64().unwrap(),
    );
    assert!(planned > 0 && planned == peak, "{j}");
    // Perplexity too, and a size that does not parse is named.
    std::fs::write(f.path("text.txt"), "the the the ".repeat(60)).unwrap();
    expect_error(
        &[
            "perplexity",
            "--model",
            &m,
            "-f",
            &f.path("text.txt"),
            "--ctx",
            "64",
            "--max-memory",
            "100KiB",
        ],
        f.home(),
        &["not enough memory", "--max-memory 100.0 KiB"],
    );
    expect_error(
        &[&base[..], &["--max-memory", "12 parsecs"]].concat(),
        f.home(),
        &["--max-memory", "unknown unit 'parsecs'"],
    );
}

#[test]
fn an_eval_case_that_does_not_fit_is_skipped_and_the_others_run() {
    use hayloft::engine::{plan_memory, Lengths, SessionConfig};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        ctx_len: 4096,
        ..Default::default()
    };
    write_tiny_llama(&m, &spec).unwrap();
    // A limit between the plans of a 600- and a 3000-token case.
    let model = hayloft::model::Model::load(&m).unwrap();
    let cfg = SessionConfig::for_model(&model);
    let total = |n: usize| {
        plan_memory(&model, &cfg, Lengths::generate(n, 8))
            .unwrap()
            .total()
    };
    let limit = (total(600) + total(3000)) / 2;
    let out = dir.path().join("run");
    let (ms, os) = (m.to_string_lossy(), out.to_string_lossy());
    let (code, stdout, err) = hayloft_out(
        &[
            "eval",
            "niah",
            "--model",
            &ms,
            "--haystack",
            "noise",
            "--lengths",
            "600,3000",
            "--depths",
            "50",
            "--max-new",
            "8",
            "--out",
            &os,
            "--quiet",
            "-t",
            "2",
            "--max-memory",
            &limit.to_string(),
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("skipped niah") && err.contains("not enough memory"),
        "{err}"
    );
    assert!(
        stdout.contains("1 case(s) did not fit in memory"),
        "{stdout}"
    );
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 1, "{results}");
    assert!(results.contains("\"target_len\":600"), "{results}");
}

#[test]
fn max_tokens_minus_one_runs_to_the_context_and_other_negatives_are_named() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let stats = f.path("stats.json");
    let args = [
        "generate",
        "--model",
        &m,
        "-p",
        "the",
        "-n",
        "-1",
        "--max-context",
        "24",
        "--temperature",
        "0",
        "--stats-json",
        &stats,
        "-t",
        "2",
    ];
    let (code, _, err) = hayloft_out(&args, f.home());
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let (p, g) = (
        j["prompt_tokens"].as_u64().unwrap(),
        j["generated_tokens"].as_u64().unwrap(),
    );
    // Until an end-of-generation token or a full context, whichever came first.
    assert!(g >= 1 && p + g <= 24, "{j}");
    expect_error(
        &["generate", "--model", &m, "-p", "the", "-n", "-2"],
        f.home(),
        &["'-2'", "-1 to generate until the end of generation"],
    );
    expect_error(
        &["generate", "--model", &m, "-p", "the", "--threads", "-3"],
        f.home(),
        &["invalid value '-3' for '--threads"],
    );
}

#[test]
fn a_json_schema_that_is_not_json_or_not_supported_is_named() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let gen = ["generate", "--model", &m, "-p", "x", "--json-schema"];
    for (schema, needles) in [
        (
            r#"{"type": "string", "maxLength": 3}"#,
            &["--json-schema", "maxLength"][..],
        ),
        ("{\"type\": ", &["--json-schema: not JSON"]),
        (
            r#"{"type": "object", "properties": {"a": {}}}"#,
            &["properties/a", "without `type`"],
        ),
    ] {
        let mut args = gen.to_vec();
        args.push(schema);
        expect_error(&args, f.home(), needles);
    }
}

#[test]
fn sampling_flags_out_of_range_or_malformed_are_named() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let gen = |extra: &[&'static str]| {
        let mut a = vec!["generate", "--model", &m, "-p", "the", "-n", "2"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, needles) in [
        (
            &["--frequency-penalty", "2.5"][..],
            &["--frequency-penalty must be between -2 and 2, got 2.5"][..],
        ),
        (
            &["--presence-penalty", "-3"],
            &["--presence-penalty", "got -3"],
        ),
        (&["--logit-bias", "15"], &["'15'", "TOKEN_ID(+/-)BIAS"]),
        (&["--logit-bias", "x+1"], &["TOKEN_ID(+/-)BIAS"]),
        (
            &["--logit-bias", "99999+1"],
            &["token 99999", "outside the model's vocabulary"],
        ),
    ] {
        let args = gen(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, f.home(), needles);
    }
    // In range, they run.
    let args = gen(&[
        "--frequency-penalty",
        "-0.5",
        "--presence-penalty",
        "1",
        "--logit-bias",
        "3-inf",
        "--logit-bias",
        "4+2",
        "--temperature",
        "0",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = hayloft_out(&args, f.home());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn too_many_threads_are_capped_with_a_warning() {
    let f = Fixture::new();
    let (code, _, err) = hayloft_out(
        &[
            "generate",
            "--model",
            &f.path("tiny.gguf"),
            "-p",
            "the",
            "-n",
            "2",
            "--threads",
            "100000",
        ],
        f.home(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--threads 100000 is more than 4×"), "{err}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(err.contains(&format!("{} threads", 4 * cores)), "{err}");
}

#[test]
fn special_token_text_in_a_chat_prompt_is_plain_text() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let prompt_tokens = |extra: &[&str]| {
        let stats = f.path("chat.json");
        let args = [
            &[
                "generate",
                "--model",
                m.as_str(),
                "--chat",
                "-p",
                "<|im_end|>",
                "-n",
                "0",
                "--stats-json",
                &stats,
            ][..],
            extra,
        ]
        .concat();
        let (code, _, err) = hayloft_out(&args, f.home());
        assert_eq!(code, 0, "{err}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        j["prompt_tokens"].as_u64().unwrap()
    };
    // "<|im_end|>" is one control token only with --parse-special; as text it takes one token per byte or merge.
    let plain = prompt_tokens(&[]);
    let special = prompt_tokens(&["--parse-special"]);
    assert!(plain >= special + 5, "plain {plain}, parsed {special}");
    expect_error(
        &["generate", "--model", &m, "-p", "x", "--parse-special"],
        f.home(),
        &["--chat"],
    );
}

#[test]
fn write_failures_name_the_path_and_leave_nothing_half_done() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    let missing = f.path("no/such/dir/stats.json");
    expect_error(
        &[
            "generate",
            "--model",
            &m,
            "-p",
            "the",
            "-n",
            "1",
            "--stats-json",
            &missing,
        ],
        f.home(),
        &["no/such/dir/stats.json"],
    );
    // An eval whose report cannot be written (report.md is a folder here) names it, and leaves no partial file.
    let out = f.dir.path().join("run");
    std::fs::create_dir_all(out.join("report.md")).unwrap();
    let os = out.to_string_lossy().into_owned();
    let (code, _, err) = hayloft_out(
        &[
            "eval",
            "niah",
            "--model",
            &m,
            "--haystack",
            "noise",
            "--lengths",
            "500",
            "--depths",
            "50",
            "--max-new",
            "4",
            "--out",
            &os,
            "--quiet",
            "-t",
            "2",
        ],
        f.home(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("report.md"), "{err}");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn bench_blend_refuses_a_bad_ratio_and_check_layer() {
    let f = Fixture::new();
    let m = f.path("tiny.gguf");
    expect_error(
        &["bench", "blend", "--model", &m, "--ratios", "0.15,1.5"],
        f.home(),
        &["ratio 1.5", "[0, 1]"],
    );
    expect_error(
        &["bench", "blend", "--model", &m, "--ratios", "lots"],
        f.home(),
        &["--ratios", "'lots'"],
    );
    expect_error(
        &["bench", "blend", "--model", &m, "--check-layer", "7"],
        f.home(),
        &["--check-layer 7", "2 layers"],
    );
}
