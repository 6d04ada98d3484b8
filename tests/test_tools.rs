//! The tests' external programs go through one door: `support::tools`, which accepts only
//! what `scripts/test-tools.txt` lists (and so what the install step installs). This
//! target scans `tests/` and `scripts/` for programs started any other way, and checks
//! that the list itself is well formed.

mod support;

use std::path::{Path, PathBuf};

use support::tools::{list_path, parse_list, tool};

/// Source files under `dir`, recursively, with the given extensions.
fn sources(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, exts, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(path);
        }
    }
}

/// Lines of Rust source that start a program by a literal name (`Command` built with a
/// string literal such as "redis-server") instead of through `support::tools`. The binary under test is started by path
/// (`support::binary()`), never by a literal.
fn rust_bypasses(text: &str) -> Vec<(usize, String)> {
    let needle = ["Command", "::new(\""].concat();
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(&needle) && !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .collect()
}

/// Lines of the Python packaging tests that find or start a program other than through
/// `support.tool`: `shutil.which(...)`, or `run(["name", ...])` with a literal name.
fn python_bypasses(text: &str) -> Vec<(usize, String)> {
    let which = ["shutil", ".which("].concat();
    let literal_runs = ["run([\"", "run(['", "Popen([\"", "Popen(['"];
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(&which) || literal_runs.iter().any(|r| l.contains(r)))
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .collect()
}

#[test]
fn no_test_starts_a_program_around_the_tools_list() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut files = Vec::new();
    sources(&root.join("tests"), &["rs", "py"], &mut files);
    sources(&root.join("scripts"), &["rs", "py"], &mut files);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(root).unwrap().display().to_string();
        let hits = match file.extension().and_then(|e| e.to_str()) {
            Some("rs") => rust_bypasses(&text),
            // support.py holds the one door for the Python tests.
            Some("py") if rel.ends_with("packaging/support.py") => Vec::new(),
            _ => python_bypasses(&text),
        };
        found.extend(hits.into_iter().map(|(n, l)| format!("{rel}:{n}: {l}")));
    }
    assert!(
        files.len() > 10,
        "the scan found only {} files under tests/ and scripts/",
        files.len()
    );
    assert!(
        found.is_empty(),
        "programs started without support::tools (Rust) or support.tool (Python), so the \
         list in scripts/test-tools.txt cannot vouch for them:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_recognises_a_bypass() {
    let rust = [
        "let c = std::process::",
        "Command::new(\"etcdctl\")",
        ".arg(x);",
    ]
    .concat();
    assert_eq!(rust_bypasses(&rust).len(), 1);
    assert!(rust_bypasses("Command::new(support::binary())").is_empty());
    assert!(rust_bypasses("Command::new(promtool)").is_empty());
    let py = ["X = shutil", ".which(\"buildah\")"].concat();
    assert_eq!(python_bypasses(&py).len(), 1);
    assert_eq!(python_bypasses("support.run([\"helm\", \"x\"])").len(), 1);
    assert!(python_bypasses("support.run([BUILDAH, \"rmi\"])").is_empty());
}

#[test]
fn the_list_is_well_formed() {
    let text = std::fs::read_to_string(list_path()).unwrap();
    let entries = parse_list(&text);
    for want in ["redis-server", "etcd", "promtool", "prometheus", "chromium"] {
        assert!(
            entries.iter().any(|e| e.program == want),
            "{want} missing from scripts/test-tools.txt"
        );
    }
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 3, "not `PROGRAM PACKAGE GROUPS`: {line}");
        for group in words[2].split(',') {
            assert!(
                ["rust", "build", "packaging"].contains(&group),
                "unknown group {group:?} in: {line}"
            );
        }
    }
}

#[test]
#[should_panic(expected = "does not list")]
fn an_unlisted_program_is_refused() {
    tool("etcdctl");
}
