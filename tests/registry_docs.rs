//! The README's method and option tables are the registry's: every name documented, none invented.

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
