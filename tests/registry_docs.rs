//! The README's method and option tables are the registry's: every name documented, none invented.

mod common;

#[test]
fn readme_tables_match_the_registry() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = "<!-- registry tables:";
    let end = "<!-- end of registry tables -->";
    let a = readme
        .find(start)
        .expect("README lacks the registry tables marker");
    let a = a + readme[a..].find('\n').unwrap() + 1;
    let b = readme
        .find(end)
        .expect("README lacks the end-of-tables marker");
    let want = hayloft::cli::methods_text(true);
    assert_eq!(
        readme[a..b].trim(),
        want.trim(),
        "README.md's KV tables differ from the registry: paste the output of `hayloft methods --markdown` between the markers"
    );
}

#[test]
fn cli_help_and_errors_name_every_registered_method() {
    let help = hayloft::methods::registry::kv_help();
    let err = format!(
        "{:#}",
        "no-such-method@0.5"
            .parse::<hayloft::methods::KvSpec>()
            .unwrap_err()
    );
    for m in hayloft::methods::registry::METHODS {
        assert!(help.contains(m.name), "--kv help misses {}", m.name);
        assert!(
            err.contains(m.name),
            "the unknown-method error misses {}",
            m.name
        );
    }
}

/// A method or option name as a string literal (`"snapkv"`) appears in `src/` only in the registry: no second list, no
/// match on names elsewhere. (Specs in tests, like `"snapkv@0.25"`, are not names and are not counted.)
#[test]
fn method_names_live_only_in_the_registry() {
    use hayloft::methods::registry::{METHODS, OPTIONS, SELECTORS, SELECT_OPTIONS};
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = common::src_files();
    let registry = src.join("methods").join("registry.rs");
    let names: Vec<&str> = METHODS
        .iter()
        .map(|m| m.name)
        .chain(OPTIONS.iter().map(|o| o.name))
        .chain(SELECTORS.iter().map(|o| o.name))
        .collect();
    // Selector options are written `name=value`; their names are common words ("score", "page"), so only a literal
    // that starts a `name=` text counts.
    let select_options: Vec<String> = SELECT_OPTIONS
        .iter()
        .map(|o| format!("\"{}=", o.name))
        .collect();
    let mut found = Vec::new();
    // eval/words.rs is a list of English words for generated keys ("window" among them), not of methods.
    let words = src.join("eval").join("words.rs");
    // The same word naming something else: LongBench's passage-retrieval metric is "retrieval", like the selector.
    // `hayloft bench codec` labels its rows by storage format ("codec" among them).
    let homonyms = [
        (src.join("eval").join("score.rs"), "retrieval"),
        (src.join("cli").join("kvcodec.rs"), "codec"),
    ];
    for f in files.iter().filter(|f| **f != registry && **f != words) {
        let text = std::fs::read_to_string(f).unwrap();
        // Unit tests parse specs written out; the code above them is what must not list names.
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        for n in &names {
            if homonyms.iter().any(|(hf, hn)| hf == f && hn == n) {
                continue;
            }
            if text.contains(&format!("\"{n}\"")) {
                found.push(format!(
                    "{}: \"{n}\"",
                    f.strip_prefix(&src).unwrap().display()
                ));
            }
        }
        for n in &select_options {
            if text.contains(n.as_str()) {
                found.push(format!("{}: {n}", f.strip_prefix(&src).unwrap().display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "method or option names outside src/methods/registry.rs:\n{}",
        found.join("\n")
    );
}
