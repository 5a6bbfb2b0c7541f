//! The committed per-head sparse prefill patterns (`patterns/*.json`) load for the models they were searched on: the
//! run time refuses a file whose layer or head counts do not match the model, so a stale file would fail here first.

mod common;

use hayloft::methods::prefill::pattern::PatternFile;
use hayloft::model::Model;

#[test]
fn committed_pattern_files_load_for_their_models() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("patterns");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("patterns/ is committed") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let model = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
            .into_iter()
            .find(|m| name.starts_with(m))
            .unwrap_or_else(|| panic!("{name}: no known model's name starts the file name"));
        let m = Model::load(&common::model(model)).expect("the model loads");
        let f = PatternFile::load(&path, m.config()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let searched: usize = f.mix().iter().map(|(_, n)| n).sum();
        assert!(searched > 0, "{name}: no head was searched");
        seen += 1;
    }
    assert!(
        seen >= 4,
        "expected the files of all three models, found {seen}"
    );
}
