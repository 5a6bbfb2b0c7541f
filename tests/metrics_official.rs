//! SCBench's and LongBench's scores against their official code: `fixtures/metrics_official.json` holds fixed
//! (prediction, references) pairs and the score the official scorers give them (see
//! `fixtures/gen_metrics_official.py`); ours, through the metric each task is scored with, must agree.

use std::path::PathBuf;

use hayloft::eval::{longbench, scbench};

#[test]
fn scores_match_the_official_scorers() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics_official.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 50);
    let mut tasks = std::collections::BTreeSet::new();
    for c in &cases {
        let task = c["task"].as_str().unwrap();
        let pred = c["pred"].as_str().unwrap();
        let refs: Vec<String> = c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let metric = match c["suite"].as_str().unwrap() {
            "scbench" => scbench::metric(task).unwrap(),
            _ => {
                let classes = c["classes"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect());
                let sample = longbench::Sample {
                    input: String::new(),
                    context: String::new(),
                    answers: refs.clone(),
                    all_classes: classes,
                    length: None,
                    dataset: task.to_string(),
                    id: None,
                };
                (longbench::dataset(task).unwrap().metric)(&sample)
            }
        };
        let want = c["score"].as_f64().unwrap() * 100.0;
        let got = metric.score(pred, &refs);
        // ROUGE's F carries the `rouge` package's 1e-8 in its denominator.
        assert!(
            (got - want).abs() < 1e-4,
            "{task} ({}): pred {pred:?} refs {refs:?}: ours {got}, official {want}",
            metric.name()
        );
        tasks.insert(task.to_string());
    }
    for t in [
        "kv",
        "prefix_suffix",
        "mf",
        "many_shot",
        "vt",
        "hotpotqa",
        "trec",
        "lcc",
    ] {
        assert!(tasks.contains(t), "no pairs for {t}");
    }
}
