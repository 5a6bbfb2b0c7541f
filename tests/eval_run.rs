//! `hayloft eval` end to end on a tiny random-weight model: outputs, resume after a kill, bad input, and the
//! shared-context modes.

use std::path::Path;
use std::process::Command;

use hayloft::engine::SessionConfig;
use hayloft::eval::haystack::Haystacks;
use hayloft::eval::runner::{CaseResult, ResultsFile, Runner};
use hayloft::eval::{scbench, Mode, Prompter};
use hayloft::gguf::GgufFile;
use hayloft::methods::KvSpec;
use hayloft::model::testutil::{write_tiny_llama, TinySpec};
use hayloft::model::Model;
use hayloft::tokenizer::chat::ChatTemplate;
use hayloft::tokenizer::Tokenizer;

fn tiny(dir: &Path) -> String {
    let p = dir.join("tiny.gguf");
    let spec = TinySpec {
        ctx_len: 2048,
        ..Default::default()
    };
    write_tiny_llama(&p, &spec).unwrap();
    p.to_string_lossy().into_owned()
}

fn eval(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hayloft"))
        .arg("eval")
        .args(args)
        .args(["-t", "2"])
        .env("HAYLOFT_HOME", dir)
        .env_remove("HAYLOFT_EVAL_ABORT_AFTER")
        .output()
        .unwrap()
}

fn niah_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "niah",
        "--model",
        model,
        "--haystack",
        "noise",
        "--lengths",
        "700,900",
        "--depths",
        "0,50,100",
        "--max-new",
        "6",
        "--out",
        out,
        "--quiet",
    ]
}

/// The fields that must not depend on timing.
fn deterministic(r: &CaseResult) -> String {
    format!(
        "{}|{}|{}|{:?}|{}|{}|{}|{}|{:?}|{:?}|{}|{}",
        r.task,
        r.target_len,
        r.length,
        r.depth,
        r.sample,
        r.seed,
        r.kv,
        r.score,
        r.output,
        r.references,
        r.generated_tokens,
        r.peak_kv_bytes
    )
}

#[test]
fn niah_writes_results_report_and_heatmap() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("run");
    let o = eval(dir.path(), &niah_args(&model, out.to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("[eval]"),
        "--quiet printed progress: {stderr}"
    );
    let rs = ResultsFile::load(&out.join("results.jsonl")).unwrap();
    assert_eq!(rs.len(), 6);
    for r in &rs {
        assert!((0.0..=100.0).contains(&r.score));
        assert!(r.length > 0 && r.length + 6 <= r.target_len);
        assert!(r.peak_kv_bytes > 0 && r.ttft_ms.is_finite());
        assert_eq!(r.kv, "full");
        // Eval's default protocol: the context is compressed once, the question left out.
        assert_eq!(r.compress_at, "context");
        assert_eq!(r.references.len(), 1);
        assert_eq!(r.references[0].len(), 7);
    }
    // A longer prompt needs more KV.
    assert!(rs[3].peak_kv_bytes > rs[0].peak_kv_bytes);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| niah_noise | full |"), "{report}");
    assert!(report.contains("depth × length"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("## Accuracy"));
    let png = std::fs::read(out.join("niah_niah_noise_full.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(out.join("niah_niah_noise_full.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("needle depth"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["cases"], 6);
    assert_eq!(summary["niah"][0]["depths"].as_array().unwrap().len(), 3);
}

#[test]
fn progress_without_a_terminal_is_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("run");
    let mut args = niah_args(&model, out.to_str().unwrap());
    args.retain(|a| *a != "--quiet");
    let o = eval(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // Captured stderr is not a terminal: no bar, no cursor movement, but the first case and the last get a line
    // with the ETA and the running mean score.
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\r'),
        "{stderr:?}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("[eval] ") && l.contains("/6 cases"))
        .collect();
    assert!(lines.len() >= 2, "{stderr}");
    assert!(lines[0].starts_with("[eval] 1/6 cases"), "{stderr}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("[eval] 6/6 cases")
            && last.contains("ETA 0m00s")
            && last.contains("mean score "),
        "{stderr}"
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let full = dir.path().join("full");
    let o = eval(dir.path(), &niah_args(&model, full.to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let cut = dir.path().join("cut");
    let cut_s = cut.to_str().unwrap();
    // Killed in the middle of the fourth case (after its prefill).
    let o = Command::new(env!("CARGO_BIN_EXE_hayloft"))
        .arg("eval")
        .args(niah_args(&model, cut_s))
        .args(["-t", "2"])
        .env("HAYLOFT_HOME", dir.path())
        .env("HAYLOFT_EVAL_ABORT_AFTER", "3")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        ResultsFile::load(&cut.join("results.jsonl")).unwrap().len(),
        3
    );
    // Simulate a line cut short by the kill: it must be dropped, not break the resume.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cut.join("results.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"task\":\"niah_noi").unwrap();
    drop(f);

    // Without --resume the folder is refused.
    let o = eval(dir.path(), &niah_args(&model, cut_s));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    let mut args = niah_args(&model, cut_s);
    args.push("--resume");
    let o = eval(dir.path(), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a: Vec<String> = ResultsFile::load(&full.join("results.jsonl"))
        .unwrap()
        .iter()
        .map(deterministic)
        .collect();
    let b: Vec<String> = ResultsFile::load(&cut.join("results.jsonl"))
        .unwrap()
        .iter()
        .map(deterministic)
        .collect();
    assert_eq!(a, b);
    // A second resume has nothing left to do.
    let o = eval(dir.path(), &args);
    assert!(o.status.success());
    assert_eq!(
        ResultsFile::load(&cut.join("results.jsonl")).unwrap().len(),
        6
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let err = |args: &[&str]| {
        let o = eval(dir.path(), args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&[
        "ruler",
        "--model",
        &model,
        "--tasks",
        "niah_single_1,bogus",
        "--out",
        out,
    ]);
    assert!(
        e.contains("unknown RULER task 'bogus'")
            && e.contains("niah_multikey_3")
            && e.contains("fwe"),
        "{e}"
    );
    let e = err(&[
        "niah",
        "--model",
        &model,
        "--kv",
        "full,nosuch@0.5",
        "--out",
        out,
    ]);
    assert!(
        e.contains("unknown KV method or option 'nosuch'") && e.contains("methods: full"),
        "{e}"
    );
    let e = err(&[
        "niah",
        "--model",
        &model,
        "--kv",
        "nosuch@0.5",
        "--out",
        out,
    ]);
    assert!(e.contains("'nosuch'") && e.contains("full"), "{e}");
    let e = err(&[
        "scbench", "--model", &model, "--tasks", "kv,zz", "--out", out,
    ]);
    assert!(
        e.contains("unknown SCBench task 'zz'") && e.contains("many_shot"),
        "{e}"
    );
    let e = err(&[
        "niah",
        "--model",
        &model,
        "--haystack",
        "noise",
        "--lengths",
        "4k",
        "--out",
        out,
    ]);
    assert!(
        e.contains("length 4096 is above") && e.contains("2048"),
        "{e}"
    );
    let e = err(&["niah", "--model", &model, "--depths", "0,120", "--out", out]);
    assert!(e.contains("depth 120"), "{e}");
    let e = err(&[
        "sweep", "--model", &model, "--tasks", "niah,foo", "--out", out,
    ]);
    assert!(e.contains("unknown sweep task 'foo'"), "{e}");
    let data = dir.path().join("lb.jsonl");
    std::fs::write(
        &data,
        "{\"input\":\"q\",\"context\":\"c\",\"answers\":[\"a\"],\"all_classes\":null,\"length\":1,\"dataset\":\"hotpotqa\",\"_id\":\"x\"}\n{\"input\": \"q\", \"context\": \n",
    )
    .unwrap();
    let e = err(&[
        "longbench",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert!(e.contains("lb.jsonl line 2"), "{e}");
    std::fs::write(
        &data,
        "{\"input\":\"q\",\"context\":\"c\",\"answers\":[\"a\"],\"dataset\":\"nope\"}\n",
    )
    .unwrap();
    let e = err(&[
        "longbench",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert!(
        e.contains("unknown LongBench dataset 'nope'") && e.contains("hotpotqa"),
        "{e}"
    );
}

#[test]
fn longbench_file_runs_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let data = dir.path().join("lb.jsonl");
    let ctx = "Passage 1: the river is long. ".repeat(200);
    let line = |ds: &str, ans: &str| {
        serde_json::json!({"input": "What is long?", "context": ctx, "answers": [ans], "all_classes": ["river", "lake"],
            "length": 100, "dataset": ds, "_id": "id"})
        .to_string()
    };
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n{}\n",
            line("hotpotqa", "river"),
            line("trec", "river"),
            line("lcc", "x = 1")
        ),
    )
    .unwrap();
    let out = dir.path().join("lb");
    let o = eval(
        dir.path(),
        &[
            "longbench",
            "--model",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--max-length",
            "1200",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rs = ResultsFile::load(&out.join("results.jsonl")).unwrap();
    assert_eq!(rs.len(), 3);
    assert_eq!(rs[0].metric, "qa_f1");
    assert_eq!(rs[1].metric, "classification");
    assert_eq!(rs[2].metric, "code_sim");
    // The 6000-character context was cut in the middle to fit 1200 tokens.
    assert!(
        rs.iter().all(|r| r.length <= 1200 && r.length > 900),
        "{:?}",
        rs.iter().map(|r| r.length).collect::<Vec<_>>()
    );
}

/// Multi-request: every query is answered against the shared context alone, so each answer equals a fresh
/// single-query run; multi-turn keeps the earlier turns in the cache, so its later prompts are longer.
#[test]
fn shared_context_modes() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path());
    let g = GgufFile::open(Path::new(&path)).unwrap();
    let model = Model::from_gguf(&g).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tpl = ChatTemplate::from_gguf(&g).map_err(|e| format!("{e:#}"));
    let p = Prompter::new(&tok, tpl.as_ref().map_err(|e| e.clone()), false);
    let mut hays = Haystacks::new(None);
    let cfg = SessionConfig::for_model(&model);
    let rf = ResultsFile::open(&dir.path().join("r"), false).unwrap();
    let mut runner = Runner::new(&model, p, cfg, rf);
    let full = KvSpec::full();
    for task in ["kv", "mf", "vt"] {
        let c = scbench::case(&p, &mut hays, task, Mode::MultiRequest, 3, 1200, 0, 1).unwrap();
        let r = runner.run_one(&c, &full, 0.0).unwrap();
        assert_eq!(r.turns.len(), 3);
        for i in 0..3 {
            let mut single = c.clone();
            single.conv.turns = vec![c.conv.turns[i].clone()];
            let s = runner.run_one(&single, &full, 0.0).unwrap();
            assert_eq!(
                s.output, r.turns[i].output,
                "{task} query {i} saw another query"
            );
        }
        let mt = scbench::case(&p, &mut hays, task, Mode::MultiTurn, 3, 1200, 0, 1).unwrap();
        let r = runner.run_one(&mt, &full, 0.0).unwrap();
        assert_eq!(r.turns.len(), 3);
        assert_eq!(r.mode, "multi-turn");
        // The KV peak covers the whole conversation: more than the first prompt alone.
        let first = runner
            .run_one(
                &{
                    let mut one = mt.clone();
                    one.conv.turns.truncate(1);
                    one
                },
                &full,
                0.0,
            )
            .unwrap();
        assert!(r.peak_kv_bytes > first.peak_kv_bytes, "{task}");
    }
}

#[test]
fn sweep_over_task_families_reports_per_turn_and_speed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let hay = dir.path().join("hay.txt");
    let text: String = (0..400)
        .map(|i| format!("Sentence number {i} talks about the weather. It was sunny on day {i}. "))
        .collect();
    std::fs::write(&hay, text).unwrap();
    let out = dir.path().join("sweep");
    let o = eval(
        dir.path(),
        &[
            "sweep",
            "--model",
            &model,
            "--tasks",
            "niah,ruler:niah_single_2,ruler:vt,scbench:kv,tsort",
            "--lengths",
            "1000,1400",
            "--depths",
            "0:100:50",
            "--samples",
            "1",
            "--turns",
            "2",
            "--haystack-file",
            hay.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rs = ResultsFile::load(&out.join("results.jsonl")).unwrap();
    assert_eq!(rs.len(), 6 + 4 + 2 + 2);
    let tasks: std::collections::BTreeSet<&str> = rs.iter().map(|r| r.task.as_str()).collect();
    assert_eq!(
        tasks.into_iter().collect::<Vec<_>>(),
        vec![
            "niah_essays",
            "ruler_niah_single_2",
            "ruler_vt",
            "scbench_kv_mt",
            "tsort"
        ]
    );
    assert!(rs
        .iter()
        .filter(|r| r.task == "scbench_kv_mt")
        .all(|r| r.turns.len() == 2));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("## Accuracy per turn") && report.contains("turn 2"),
        "{report}"
    );
    for png in [
        "decode_speed_vs_length.png",
        "ttft_vs_length.png",
        "niah_niah_essays_full.png",
    ] {
        assert!(out.join(png).exists(), "{png} missing");
        let svg = out.join(png).with_extension("svg");
        assert!(svg.exists(), "{} missing", svg.display());
    }
}

#[test]
fn shared_prefill_sweep_equals_separate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let hay = dir.path().join("hay.txt");
    let text: String = (0..400)
        .map(|i| format!("Sentence number {i} talks about the weather. It was sunny on day {i}. "))
        .collect();
    std::fs::write(&hay, text).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "sweep",
            "--model",
            &model,
            "--tasks",
            "niah,ruler:vt",
            "--lengths",
            "900",
            "--depths",
            "0:100:50",
            "--samples",
            "1",
            "--kv",
            "full;snapkv@0.5;h2o@0.3;streamingllm@64t;tova@0.5,adakv;snapkv@0.5,chunked",
            "--haystack-file",
            hay.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = eval(dir.path(), &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        ResultsFile::load(&out.join("results.jsonl")).unwrap()
    };
    let shared = run("shared", &[]);
    let separate = run("separate", &["--no-share-prefill"]);
    assert_eq!(shared.len(), 4 * 6);
    assert_eq!(shared.len(), separate.len());
    for (a, b) in shared.iter().zip(&separate) {
        assert_eq!((&a.task, a.depth, &a.kv), (&b.task, b.depth, &b.kv));
        assert_eq!(a.output, b.output, "{} {:?} {}", a.task, a.depth, a.kv);
        assert_eq!(a.length, b.length);
        assert_eq!(a.score, b.score);
        if a.kv != "full" && !a.kv.contains("chunked") {
            assert!(
                a.peak_kv_bytes > 0 && a.peak_kv_bytes == b.peak_kv_bytes,
                "{}",
                a.kv
            );
        }
        assert_eq!(a.final_kv_bytes, b.final_kv_bytes, "{}", a.kv);
        // (With `chunked` the peak is already bounded by budget + one chunk; the question and the answer, never
        // compressed under `context`, may bring the cache back up to it.)
        if a.kv != "full" && !a.kv.contains("chunked") {
            assert!(
                a.final_kv_bytes < a.peak_kv_bytes,
                "{}: compression must free memory",
                a.kv
            );
        }
    }
}

/// A selector keeps the whole cache and adds its index: the sweep's KV figures (peak and at the end) count both, so
/// its memory is above the full cache's, not equal to it.
#[test]
fn a_selectors_index_counts_in_the_kv_figures() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("sel");
    let o = eval(
        dir.path(),
        &[
            "sweep",
            "--model",
            &model,
            "--tasks",
            "niah",
            "--lengths",
            "900",
            "--depths",
            "0:100:100",
            "--samples",
            "1",
            "--kv",
            "full;retrieval@0.25,dense=0",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rs = ResultsFile::load(&out.join("results.jsonl")).unwrap();
    assert_eq!(rs.len(), 4);
    for f in rs.iter().filter(|r| r.kv == "full") {
        let r = rs
            .iter()
            .find(|r| r.kv != "full" && r.depth == f.depth)
            .expect("the retrieval case of the same depth");
        assert!(
            r.peak_kv_bytes > f.peak_kv_bytes && r.final_kv_bytes > f.final_kv_bytes,
            "{}: peak {} / end {} against full's {} / {}",
            r.kv,
            r.peak_kv_bytes,
            r.final_kv_bytes,
            f.peak_kv_bytes,
            f.final_kv_bytes
        );
    }
}
