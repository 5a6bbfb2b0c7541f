//! Imports flow one way, down: no module of `src/` names a module of a higher layer (`crate::…`). The order is the
//! one `src/lib.rs` documents; a new top-level module must be placed in it here, or this test fails.

use std::path::Path;

mod common;

/// Top-level modules, bottom layer first. Modules on one line are one layer (they may use each other).
const LAYERS: &[&[&str]] = &[
    &["util", "fetch", "progress", "testutil"],
    &["gguf"],
    &["kernels"],
    &["tokenizer"],
    &["kv"],
    &["attention"],
    &["model"],
    &["methods"],
    &["engine"],
    &["eval"],
    &["serve"],
    &["cli"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every top-level module named after `crate::` in `text`, including the members of a grouped `use crate::{a, b::c}`.
fn crate_refs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at depth 0 of the group: after `{` and after each top-level `,`.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        let name: String = group[j..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        out.push(name);
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = common::src_files();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(mine) = rank(&top) else {
            bad.push(format!(
                "{}: module '{top}' has no layer in tests/layers.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for r in crate_refs(&text) {
            match rank(&r) {
                Some(theirs) if theirs > mine => bad.push(format!(
                    "{}: '{top}' imports crate::{r} from a layer above it",
                    rel.display()
                )),
                None if !r.is_empty() => bad.push(format!(
                    "{}: crate::{r} is not a known module",
                    rel.display()
                )),
                _ => {}
            }
        }
    }
    bad.sort();
    bad.dedup();
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_imports() {
    let refs = crate_refs("use crate::{kv::{A, B}, model::C};\nlet x = crate::eval::f();");
    assert_eq!(refs, ["kv", "model", "eval"]);
    assert!(rank("cli") > rank("eval") && rank("kv") < rank("model"));
}
