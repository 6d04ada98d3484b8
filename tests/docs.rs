//! The documentation a user follows: every relative link in the README, docs/ and the
//! chart's README leads to a file that exists (and to a heading that exists, when it names
//! one), and the README stays a README (issue 25 §6): at most 12 KB, a contents list at the
//! top, the test script's Debian packages said before its commands, every preset listed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, every .md under docs/, and the chart's README.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut files = vec![
        root().join("README.md"),
        root().join("charts/tokenrelay/README.md"),
    ];
    walk(&root().join("docs"), &mut files);
    files.sort();
    files
}

/// The lines outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces made hyphens; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut candidate = slug.clone();
        let mut n = 0;
        while seen.contains(&candidate) {
            n += 1;
            candidate = format!("{slug}-{n}");
        }
        seen.insert(candidate);
    }
    seen
}

/// The targets of inline links `[text](target)` in a line, inline code left out.
fn link_targets(line: &str) -> Vec<String> {
    let mut outside_code = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            outside_code.push_str(part);
        } else {
            outside_code.push_str("``");
        }
    }
    let mut out = Vec::new();
    let mut rest = outside_code.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim().to_string());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in prose_lines(&text) {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().unwrap().join(path)
                };
                if !resolved.exists() {
                    broken.push(format!("{shown}:{n}: {target}: no such file"));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if resolved.extension().is_some_and(|e| e == "md") {
                    let there = std::fs::read_to_string(&resolved).unwrap();
                    if !anchors(&there).contains(anchor) {
                        broken.push(format!("{shown}:{n}: {target}: no such heading"));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_anchor_rule_matches_githubs() {
    let text = "# Bootstrapping\n## The device flow (`--device`)\n```\n# not a heading\n```\n## Endpoints from the issuer (discovery)\n## Limits\n## Limits\n";
    let found = anchors(text);
    for want in [
        "bootstrapping",
        "the-device-flow---device",
        "endpoints-from-the-issuer-discovery",
        "limits",
        "limits-1",
    ] {
        assert!(found.contains(want), "{want} not in {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
    assert_eq!(
        link_targets("see [a](x.md#y) and `[b](not-a-link)` or [c](../z.md)"),
        ["x.md#y", "../z.md"]
    );
}

#[test]
fn the_readme_is_a_readme() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        text.len() <= 12 * 1024,
        "README.md is {} bytes; keep it at most 12 KB and move detail to docs/",
        text.len()
    );

    // A contents list before the first section, linking to every section.
    let first_section = text.find("\n## ").expect("README.md has no sections");
    let head = &text[..first_section];
    let sections = prose_lines(&text)
        .into_iter()
        .filter_map(|(_, l)| l.strip_prefix("## "))
        .map(|t| {
            let one = format!("## {t}\n");
            anchors(&one).into_iter().next().unwrap()
        })
        .collect::<Vec<_>>();
    let missing: Vec<_> = sections
        .iter()
        .filter(|a| !head.contains(&format!("](#{a})")))
        .collect();
    assert!(
        missing.is_empty(),
        "the contents list at the top of README.md lacks {missing:?}"
    );

    // The test script installs Debian packages: said before its command is shown.
    let command = text
        .find("\nscripts/test.sh\n")
        .expect("README.md shows scripts/test.sh");
    assert!(
        text[..command].contains("Debian packages"),
        "README.md must say that scripts/test.sh installs Debian packages before showing it"
    );

    // Every preset, by its name.
    let mut unlisted = Vec::new();
    for entry in std::fs::read_dir(root().join("src/config/presets")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if !text.contains(&format!("`{name}`")) {
                unlisted.push(name);
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "README.md's presets list lacks {unlisted:?}"
    );
}
