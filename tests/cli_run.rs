//! The commands end to end on a tiny random-weight model the test writes itself.

use std::io::Write;
use std::process::{Command, Stdio};

use hayloft::model::testutil::{write_tiny_llama, TinySpec};

fn tiny() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_llama(&p, &TinySpec::default()).unwrap();
    let s = p.to_string_lossy().into_owned();
    (dir, s)
}

fn hayloft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hayloft"))
}

/// Runs `hayloft bench speed --model MODEL ARGS --json FILE` in `dir`, asserts it succeeded and returns its stderr and
/// the JSON it wrote.
fn bench_speed(dir: &tempfile::TempDir, model: &str, args: &[&str]) -> (String, serde_json::Value) {
    let json = dir.path().join("speed.json");
    let out = hayloft()
        .args(["bench", "speed", "--model", model])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let j = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stderr, j)
}

#[test]
fn generate_streams_and_writes_stats_json() {
    let (dir, model) = tiny();
    let stats = dir.path().join("stats.json");
    let out = hayloft()
        .args([
            "generate",
            "--model",
            &model,
            "-p",
            "the cat",
            "-n",
            "8",
            "--temperature",
            "0",
            "-t",
            "2",
        ])
        .arg("--stats-json")
        .arg(&stats)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[stats]"), "{stderr}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
        "peak_kv_bytes",
        "peak_rss_bytes",
        "threads",
    ] {
        assert!(j.get(key).is_some(), "stats JSON lacks {key}: {j}");
    }
    assert_eq!(j["threads"], 2);
    assert!(j["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(j["generated_tokens"].as_u64().unwrap() <= 8);
    assert!(j["peak_kv_bytes"].as_u64().unwrap() > 0);
}

/// Runs greedy `hayloft generate` of `n` tokens after "in the" with `extra` flags, asserts it succeeded and returns
/// its stdout.
fn greedy_in_the(dir: &tempfile::TempDir, model: &str, n: &str, extra: &[&str]) -> Vec<u8> {
    let out = hayloft()
        .args([
            "generate",
            "--model",
            model,
            "-p",
            "in the",
            "-n",
            n,
            "--temperature",
            "0",
        ])
        .args(extra)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn greedy_generation_is_deterministic() {
    let (dir, model) = tiny();
    let run = |extra: &[&str]| greedy_in_the(&dir, &model, "12", extra);
    let first = run(&[]);
    assert_eq!(first, run(&[]));
    // Other block sizes change how attention tiles the cache, not what it computes.
    assert_eq!(first, run(&["--block-tokens", "16"]));
    assert_eq!(first, run(&["--block-tokens", "64"]));
    // A KIVI cache takes the block as its key group at any size (as `serve` does per request).
    for bt in ["16", "64"] {
        assert!(!run(&["--block-tokens", bt, "--kv", "kivi4"]).is_empty());
    }
}

#[test]
fn stop_strings_end_the_generated_text_before_them() {
    let (dir, model) = tiny();
    let run = |extra: &[&str]| String::from_utf8(greedy_in_the(&dir, &model, "16", extra)).unwrap();
    let whole = run(&[]);
    let text = whole.trim_end_matches('\n');
    // A stop string from the middle of the text (two characters), streamed and not.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(chars.len() >= 6, "too short to cut: {text:?}");
    let (a, _) = chars[chars.len() / 2];
    let b = chars.get(chars.len() / 2 + 2).map_or(text.len(), |c| c.0);
    let stop = &text[a..b];
    let before = &text[..text.find(stop).unwrap()];
    for extra in [&["--stop", stop][..], &["--stop", stop, "--no-stream"]] {
        assert_eq!(run(extra), format!("{before}\n"), "{extra:?} in {text:?}");
    }
    // A stop string that never comes leaves the text whole; of two, the first reached wins.
    assert_eq!(run(&["--stop", "\u{1}never"]), whole);
    assert_eq!(
        run(&["--stop", "\u{1}never", "--stop", stop]),
        format!("{before}\n")
    );
}

#[test]
fn json_mode_output_is_the_beginning_of_a_json_object_and_ends_with_it() {
    let (dir, model) = tiny();
    let run = |extra: &[&str]| String::from_utf8(greedy_in_the(&dir, &model, "40", extra)).unwrap();
    // The random model's own text is not JSON; under --json it is the beginning of an object.
    let text = run(&["--json"]);
    let text = text.strip_suffix('\n').unwrap();
    let mut s = hayloft::engine::json::JsonState::new();
    assert!(text.bytes().all(|b| s.step(b)), "{text:?}");
    // '}' (byte token 125) pushed up: the object closes at once and generation ends there.
    let closed = run(&["--json", "--logit-bias", "125+100"]);
    assert_eq!(closed.trim_start(), "{}\n");
    // With a schema: a whole value it accepts (a random model may take some whitespace and digits on the way).
    let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"]}"#;
    let out = String::from_utf8(greedy_in_the(
        &dir,
        &model,
        "400",
        &["--json-schema", schema],
    ))
    .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert!(v["ok"].is_boolean() && v["n"].is_number(), "{out}");
    assert!(out.find("\"ok\"") < out.find("\"n\""), "{out}");
}

/// Runs `hayloft chat --model MODEL ARGS` in `dir` with `input` on stdin, asserts it succeeded and returns its stderr.
fn chat(dir: &tempfile::TempDir, model: &str, args: &[&str], input: &str) -> String {
    let mut child = hayloft()
        .args(["chat", "--model", model, "--temperature", "0"])
        .args(args)
        .env("HAYLOFT_HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn chat_reuses_the_cache_of_previous_turns() {
    let (dir, model) = tiny();
    let stderr = chat(
        &dir,
        &model,
        &["-n", "4"],
        "hello there\nand again\n/exit\n",
    );
    let turns: Vec<&str> = stderr.lines().filter(|l| l.starts_with("[turn]")).collect();
    assert_eq!(turns.len(), 2, "{stderr}");
    assert!(turns[0].contains("reused 0 cached tokens"), "{}", turns[0]);
    // The second turn's prompt starts with the whole first exchange: that part must come from the cache.
    let reused: usize = turns[1]
        .split("reused ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        reused >= 10,
        "second turn reused only {reused} tokens: {}",
        turns[1]
    );
}

#[test]
fn perplexity_runs_and_writes_per_token_nll() {
    let (dir, model) = tiny();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "the theme in the thin tin then ".repeat(20)).unwrap();
    let nll = dir.path().join("nll.json");
    let out = hayloft()
        .args(["perplexity", "--model", &model, "--ctx", "64"])
        .arg("--file")
        .arg(&text)
        .arg("--nll-json")
        .arg(&nll)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PPL = "), "{stdout}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&nll).unwrap()).unwrap();
    let toks = j["tokens"].as_array().unwrap();
    let chunks = j["result"]["n_chunks"].as_u64().unwrap() as usize;
    // Each chunk scores positions ctx/2+1 .. ctx-1.
    assert_eq!(toks.len(), chunks * 31);
    assert_eq!(toks[0]["pos"], 33);
}

#[test]
fn info_and_bench_speed_run() {
    let (dir, model) = tiny();
    let out = hayloft()
        .args(["info", &model])
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains("architecture:  llama") && s.contains("KV per token"),
        "{s}"
    );
    let (_, j) = bench_speed(
        &dir,
        &model,
        &["--contexts", "64,128", "--reps", "1", "--n-gen", "4"],
    );
    let rows = j["results"].as_array().unwrap();
    // prefill 64, 128; decode 0, 64, 128
    assert_eq!(rows.len(), 5);
    // Speeds are reported (a number each), not judged: wall-clock checks belong to `hayloft bench speed`.
    assert!(rows.iter().all(|r| r["tok_s"].as_f64().is_some()), "{j}");
}

/// `bench speed --contexts 0 --no-prefill` (decode speed with an empty cache only) warms up on fewer tokens than one
/// prefill chunk: it once sliced past its random tokens and panicked.
#[test]
fn bench_speed_decodes_from_an_empty_cache_alone() {
    let (dir, model) = tiny();
    let args = [
        "--contexts",
        "0",
        "--no-prefill",
        "--reps",
        "1",
        "--n-gen",
        "4",
    ];
    let (_, j) = bench_speed(&dir, &model, &args);
    let rows = j["results"].as_array().unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["test"] == "decode" && r["ctx"] == 0),
        "{j}"
    );
}

#[test]
fn bench_tokenize_reports_encode_and_decode_speed() {
    let (dir, model) = tiny();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(200)).unwrap();
    let json = dir.path().join("tok.json");
    let out = hayloft()
        .args(["bench", "tokenize", "--model", &model, "--reps", "2"])
        .arg("--file")
        .arg(&text)
        .arg("--json")
        .arg(&json)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["bytes"], 24 * 200);
    assert!(j["tokens"].as_u64().unwrap() > 0, "{j}");
    assert!(
        j["encode_tok_s"].as_f64().is_some() && j["decode_tok_s"].as_f64().is_some(),
        "{j}"
    );
    // A missing text file is a clear error.
    let out = hayloft()
        .args([
            "bench",
            "tokenize",
            "--model",
            &model,
            "--file",
            "/nonexistent/t.txt",
        ])
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/t.txt"));
}

#[test]
fn kv_method_shrinks_the_cache_and_reports_it() {
    let (dir, model) = tiny();
    let stats = dir.path().join("stats-kv.json");
    let prompt = "the cat sat on the mat. ".repeat(15);
    let out = hayloft()
        .args(["generate", "--model", &model, "-p", &prompt, "-n", "4"])
        .args([
            "--temperature",
            "0",
            "--kv",
            "snapkv@16t,chunked",
            "--chunk-size",
            "32",
        ])
        .arg("--stats-json")
        .arg(&stats)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("| KV ") && stderr.contains("(peak "),
        "{stderr}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let (end, peak) = (
        j["kv_bytes"].as_u64().unwrap(),
        j["peak_kv_bytes"].as_u64().unwrap(),
    );
    let prompt_tokens = j["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 100, "{j}");
    // Tiny model: 2 layers × 2 KV heads, head_dim 16, f16, 32-token blocks: (16 + 16) · 2 + 4 bytes per entry.
    let block = 32 * ((16 + 16) * 2 + 4);
    assert_eq!(end, 4 * block, "{j}");
    // Chunked: never more than budget + one chunk per head (48 entries = 2 blocks).
    assert!(peak <= 4 * 2 * block, "{j}");
}

#[test]
fn quantized_kv_flags_run_and_hold_fewer_bytes() {
    let (dir, model) = tiny();
    let prompt = "the theme in the thin tin then ".repeat(30);
    let peak = |extra: &[&str]| -> u64 {
        let stats = dir.path().join("s.json");
        let out = hayloft()
            .args([
                "generate",
                "--model",
                &model,
                "-p",
                &prompt,
                "-n",
                "4",
                "--temperature",
                "0",
            ])
            .args(extra)
            .arg("--stats-json")
            .arg(&stats)
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        j["peak_kv_bytes"].as_u64().unwrap()
    };
    let f16 = peak(&[]);
    let q8 = peak(&["--kv-dtype", "q8", "--kv-residual", "16"]);
    let q4 = peak(&["--kv", "kivi4@16"]);
    let q2 = peak(&["--kv", "kivi2", "--kv-residual", "16"]);
    assert!(
        q2 < q4 && q4 < q8 && q8 < f16,
        "peak KV bytes f16 {f16} q8 {q8} q4 {q4} q2 {q2}"
    );
}

#[test]
fn heads_writes_scores_that_duo_and_the_mask_read() {
    let (dir, model) = tiny();
    let hay = dir.path().join("hay.txt");
    let text: String = (0..300)
        .map(|i| format!("Line {i} of a plain haystack about fields and barns. "))
        .collect();
    std::fs::write(&hay, text).unwrap();
    let heads = dir.path().join("heads.json");
    let out = hayloft()
        .args([
            "heads",
            "--model",
            &model,
            "--lengths",
            "500",
            "--depths",
            "0,50",
        ])
        .args(["--max-new", "4", "--haystack-file", hay.to_str().unwrap()])
        .arg("--out")
        .arg(&heads)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&heads).unwrap()).unwrap();
    let (nl, nkv, nq) = (
        j["layers"].as_u64().unwrap() as usize,
        j["kv_heads"].as_u64().unwrap() as usize,
        j["q_heads"].as_u64().unwrap() as usize,
    );
    assert_eq!(j["instances"], 2, "{j}");
    assert_eq!(j["scores"].as_array().unwrap().len(), nl);
    assert!(j["scores"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r.as_array().unwrap().len() == nkv));
    assert!(j["q_scores"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r.as_array().unwrap().len() == nq));
    // DuoAttention reads the file.
    let h = heads.to_str().unwrap();
    let duo = hayloft()
        .args([
            "generate",
            "--model",
            &model,
            "-p",
            &"a b c ".repeat(30),
            "-n",
            "2",
        ])
        .args(["--kv", &format!("duo@0.5,heads@{h}")])
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        duo.status.success(),
        "{}",
        String::from_utf8_lossy(&duo.stderr)
    );
    // The masking experiment reads it; a bad mask size is refused.
    for (extra, ok) in [
        (vec!["--mask-top", "2"], true),
        (vec!["--mask-top", "2", "--mask-random"], true),
        (vec!["--mask-top", "100000"], false),
    ] {
        let o = hayloft()
            .args([
                "eval",
                "niah",
                "--model",
                &model,
                "--lengths",
                "500",
                "--depths",
                "50",
            ])
            .args([
                "--haystack-file",
                hay.to_str().unwrap(),
                "--quiet",
                "--mask-heads",
                h,
            ])
            .args(&extra)
            .arg("--out")
            .arg(dir.path().join(format!("mask-{}", extra.len())))
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.success(), ok, "{extra:?}: {e}");
        if !ok {
            assert!(e.contains("--mask-top must be between 1 and"), "{e}");
        }
    }
}

#[test]
fn kv_offload_keeps_the_output_and_reports_disk_bytes() {
    let (dir, model) = tiny();
    let prompt = "the theme in the thin tin then ".repeat(30);
    let off = dir.path().join("offload");
    let gen = |extra: &[&str]| -> (String, serde_json::Value, String) {
        let stats = dir.path().join("s.json");
        let out = hayloft()
            .args([
                "generate",
                "--model",
                &model,
                "-p",
                &prompt,
                "-n",
                "6",
                "--temperature",
                "0",
            ])
            .args(extra)
            .arg("--stats-json")
            .arg(&stats)
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let j = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), j, stderr)
    };
    let (text, plain, _) = gen(&[]);
    let (text_off, j, stderr) = gen(&["--kv-offload", off.to_str().unwrap(), "--resident", "0.25"]);
    assert_eq!(text_off, text);
    assert!(stderr.contains("on disk (read from disk"), "{stderr}");
    let disk = j["kv_disk_bytes"].as_u64().unwrap();
    assert!(
        disk > 0 && j["kv_disk_read_bytes"].as_u64().unwrap() > 0,
        "{j}"
    );
    let (ram, all) = (
        j["kv_bytes"].as_u64().unwrap(),
        plain["kv_bytes"].as_u64().unwrap(),
    );
    assert!(ram * 3 < all, "{ram} of {all} bytes in RAM");
    assert_eq!(plain["kv_disk_bytes"], 0);
    assert_eq!(
        std::fs::read_dir(&off).unwrap().count(),
        0,
        "the file is removed at exit"
    );
}

/// `bench machine` writes a profile; `plan` reads it, predicts, and with --validate runs the model beside: the
/// predicted KV bytes are the measured ones (within a block per stream), every time is finite and positive.
#[test]
fn bench_machine_then_plan_predicts_and_validates() {
    let (dir, model) = tiny();
    let prof = dir.path().join("machine.json");
    let out = hayloft()
        .args(["bench", "machine", "--quick", "-t", "2", "--json"])
        .arg(&prof)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    for key in [
        "read_bw",
        "paths",
        "weights",
        "attention",
        "disk_read_bw",
        "matmul_call_s",
    ] {
        assert!(!m[key].is_null(), "profile lacks {key}: {m}");
    }
    let plan = dir.path().join("plan.json");
    let out = hayloft()
        .args([
            "plan",
            "--model",
            &model,
            "--context",
            "40,200",
            "--new-tokens",
            "4",
            "--validate",
            "-t",
            "2",
        ])
        .args(["--validate-gen", "4", "--max-memory", "4GiB", "--machine"])
        .arg(&prof)
        .arg("--json")
        .arg(&plan)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| 200 + 4 |"), "{stdout}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let (p, m) = (&r["predicted"], &r["measured"]);
        for key in ["prefill_s", "decode_s", "kv_bytes_per_token"] {
            let v = p[key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        assert!(p["max_concurrency"].as_u64().unwrap() > 0);
        let (pk, mk) = (
            p["memory"]["kv"].as_f64().unwrap(),
            m["kv_bytes"].as_f64().unwrap(),
        );
        // Tiny model: 2 layers × 2 KV heads, 32-token f16 blocks of 16 + 16 channels (+ positions).
        let block = (32 * ((16 + 16) * 2 + 4)) as f64;
        assert!(
            (pk - mk).abs() <= 4.0 * block,
            "KV predicted {pk}, measured {mk}"
        );
    }
    // A file that is not a profile: the error names it and the command that writes one.
    std::fs::write(&prof, "{}").unwrap();
    let out = hayloft()
        .args(["plan", "--model", &model, "--context", "40", "--machine"])
        .arg(&prof)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("machine.json") && stderr.contains("bench machine"),
        "{stderr}"
    );
}

/// `bench speed --threads 1,2,3` measures every count and writes a scaling table; a list where one count is meant,
/// or a bad count in a list, is a clear error.
#[test]
fn bench_speed_takes_a_thread_list() {
    let (dir, model) = tiny();
    let args = [
        "--threads",
        "1,2,3",
        "--contexts",
        "32,64",
        "--reps",
        "1",
        "--n-gen",
        "2",
    ];
    let (stderr, j) = bench_speed(&dir, &model, &args);
    assert!(
        stderr.contains("| test | ctx | 1 threads | 2 threads | 3 threads |"),
        "{stderr}"
    );
    assert_eq!(j["threads"], serde_json::json!([1, 2, 3]));
    // 2 prefill + 3 decode rows per thread count, each naming its count.
    let rows = j["results"].as_array().unwrap();
    assert_eq!(rows.len(), 15);
    for t in [1, 2, 3] {
        assert_eq!(rows.iter().filter(|r| r["threads"] == t).count(), 5);
    }
    let sc = j["scaling"].as_array().unwrap();
    assert_eq!(sc.len(), 5);
    assert!(sc.iter().all(|r| r["speedup"][0] == 1.0));
    for (args, want) in [
        (
            vec![
                "generate",
                "--model",
                &model,
                "-p",
                "x",
                "-n",
                "1",
                "--threads",
                "1,2",
            ],
            "one thread count",
        ),
        (
            vec!["bench", "speed", "--model", &model, "--threads", "2,0"],
            "'0' is not a thread count",
        ),
        (
            vec!["bench", "speed", "--model", &model, "--threads", "2,x"],
            "'x' is not a thread count",
        ),
    ] {
        let out = hayloft()
            .args(&args)
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
}

/// `bench serve` against its own in-process server with prompts shorter than the default shared prefix and no shared
/// share: it used to build the warm-up prompt from a prefix longer than the prompt and panic. Asking for a warm-up
/// with no prefix to warm is a clear error.
#[test]
fn bench_serve_runs_short_unshared_prompts() {
    let (dir, model) = tiny();
    let json = dir.path().join("serve.json");
    let out = hayloft()
        .args(["bench", "serve", "--model", &model, "--threads", "2"])
        .args(["--clients", "2", "--requests", "3", "--prompt-tokens", "24"])
        .args(["--shared", "0", "--max-tokens", "3", "--json"])
        .arg(&json)
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["failed"], 0, "{j}");
    assert_eq!(j["samples"].as_array().unwrap().len(), 3, "{j}");
    let out = hayloft()
        .args(["bench", "serve", "--model", &model, "--threads", "2"])
        .args(["--prompt-tokens", "24", "--shared", "0", "--warm"])
        .env("HAYLOFT_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--shared-prefix"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `generate --kv-disk DIR`: a later run restores the prompt's cached prefix (whole units) instead of prefilling it,
/// by default bit for bit (the same greedy output as the cold run); `--kv-disk-format codec` writes smaller blobs; a
/// damaged blob in DIR is refused, its prefix recomputed, the run still answering.
#[test]
fn generate_with_kv_disk_restores_the_prompt_in_a_later_run() {
    let (dir, model) = tiny();
    let prompt = "the cat sat on the mat and ".repeat(18);
    let run = |cache: &str, name: &str, format: &[&str]| {
        let stats = dir.path().join(name);
        let out = hayloft()
            .args(["generate", "--model", &model, "-p", &prompt, "-n", "12"])
            .args(["--temperature", "0", "--kv-disk"])
            .arg(dir.path().join(cache))
            .args(format)
            .arg("--stats-json")
            .arg(&stats)
            .env("HAYLOFT_HOME", dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("no {k} in {j}")) as usize;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (n("prompt_tokens"), n("cached_tokens"), stderr, stdout)
    };
    let blobs = |cache: &str| {
        std::fs::read_dir(dir.path().join(cache))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "hlkv"))
            .collect::<Vec<_>>()
    };
    let size = |cache: &str| -> u64 {
        blobs(cache)
            .iter()
            .map(|b| std::fs::metadata(b).unwrap().len())
            .sum()
    };
    let (fed, cached, _, cold) = run("exact", "cold.json", &[]);
    assert_eq!(cached, 0, "nothing was cached yet");
    assert!(fed > 300, "the prompt is {fed} tokens, under one unit");
    assert!(!blobs("exact").is_empty(), "the first run stored nothing");
    let (rest, cached, stderr, warm) = run("exact", "warm.json", &[]);
    assert!(
        cached >= 256,
        "the second run restored {cached} tokens: {stderr}"
    );
    assert_eq!(rest + cached, fed, "{stderr}");
    assert!(stderr.contains("restored from --kv-disk"), "{stderr}");
    assert_eq!(warm, cold, "an exact restore changed the greedy output");
    // The codec's blobs: restored too, and smaller.
    let codec = ["--kv-disk-format", "codec"];
    run("codec", "codec-cold.json", &codec);
    let (_, cached, stderr, _) = run("codec", "codec-warm.json", &codec);
    assert!(
        cached >= 256,
        "the codec's blobs restored {cached} tokens: {stderr}"
    );
    assert!(
        size("codec") * 2 < size("exact"),
        "codec {} bytes against exact {}",
        size("codec"),
        size("exact")
    );
    // Damage every blob: the next run refuses them, recomputes, and still answers.
    for b in blobs("exact") {
        let bytes = std::fs::read(&b).unwrap();
        std::fs::write(&b, &bytes[..bytes.len() / 2]).unwrap();
    }
    let (again, cached, stderr, _) = run("exact", "damaged.json", &[]);
    assert_eq!((again, cached), (fed, 0), "{stderr}");
    assert!(
        stderr.contains("warning"),
        "a refused blob is not reported: {stderr}"
    );
}

/// `chat --kv-disk DIR`: a conversation that starts the way an earlier run's did restores its head from DIR.
#[test]
fn chat_with_kv_disk_restores_the_first_turn_of_a_later_run() {
    let (dir, model) = tiny();
    let cache = dir.path().join("prompts");
    let message = format!("{}\n/exit\n", "the cat sat on the mat and ".repeat(16));
    let cache = cache.to_string_lossy().into_owned();
    let run = || {
        let stderr = chat(&dir, &model, &["-n", "2", "--kv-disk", &cache], &message);
        stderr
            .lines()
            .find(|l| l.starts_with("[turn]"))
            .unwrap_or_else(|| panic!("no turn: {stderr}"))
            .to_string()
    };
    let cold = run();
    assert!(cold.contains("reused 0 cached tokens,"), "{cold}");
    let warm = run();
    assert!(warm.contains("(256 from --kv-disk)"), "{warm}");
}
