//! The house: every top-level module of `src/` sits on one floor, and imports only from
//! floors below it. So no two modules import each other, config depends on nothing above
//! it, and the request path never reaches up into the process that runs it. The floors
//! are drawn in docs/architecture.md; a new module gets a floor here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may use modules on lower floors only.
const FLOORS: &[&[&str]] = &[
    &["commands"],
    &["instance"],
    &["proxy"],
    &["credential", "server"],
    &["logging", "oauth", "store"],
    &["config"],
    &["tls"],
    &["keys"],
    &[
        "clock",
        "http_names",
        "metrics",
        "secret",
        "shutdown",
        "target",
        "watched_files",
    ],
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `text` names as `crate::NAME` or in `use crate::{NAME, ...}`,
/// leaving out comments and the unit-test module at the end of a file.
fn uses(text: &str) -> BTreeSet<String> {
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let ident: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !ident.is_empty() {
                    found.insert(ident);
                }
            }
        }
    }
    found
}

fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path.clone());
        }
        let used = imports.entry(name.clone()).or_default();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            used.extend(uses(&text).into_iter().filter(|m| *m != name));
        }
    }
    imports
}

#[test]
fn every_module_imports_only_from_floors_below_it() {
    let imports = module_imports();
    let mut wrong = Vec::new();
    for (module, used) in &imports {
        let Some(floor) = floor_of(module) else {
            wrong.push(format!("{module} has no floor in FLOORS"));
            continue;
        };
        for other in used {
            match floor_of(other) {
                Some(f) if f > floor => {}
                Some(_) => wrong.push(format!("{module} (floor {floor}) imports {other}")),
                // Not a module of ours (e.g. a macro path); nothing to check.
                None if !imports.contains_key(other) => {}
                None => wrong.push(format!("{other} has no floor in FLOORS")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the house is crooked:\n{}",
        wrong.join("\n")
    );
}

/// The check reads what it should: an upward import is caught.
#[test]
fn an_upward_import_is_seen() {
    let text = "use crate::config::Config;\nfn f() { crate::proxy::x(); }\nuse crate::{instance, store::open};\n// crate::commands in a comment\n#[cfg(test)]\nmod tests {\n    use crate::commands;\n}\n";
    let used: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(used, ["config", "instance", "proxy", "store"]);
}
