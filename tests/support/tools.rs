//! External programs the tests start. Every one goes through [`tool`], which accepts only
//! programs listed in `scripts/test-tools.txt` (the list the install step reads), so a
//! program the install step would not provide cannot creep into the suite.
//!
//! With `TOKENRELAY_REQUIRE_TOOLS=1` (the default in `scripts/test.sh` and CI) a listed
//! program that is missing fails the test, naming its Debian package; otherwise the test
//! says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One line of the list: a program (or an absolute path) and its Debian package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub program: String,
    pub package: String,
}

/// `scripts/test-tools.txt` of this checkout.
pub fn list_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-tools.txt")
}

/// The entries of a list in the `PROGRAM PACKAGE GROUPS` format; `#` starts a comment.
pub fn parse_list(text: &str) -> Vec<Listed> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let program = words.next().unwrap_or_default().to_string();
            let package = words
                .next()
                .unwrap_or_else(|| panic!("scripts/test-tools.txt: `{program}` has no package"))
                .to_string();
            Listed { program, package }
        })
        .collect()
}

fn listed(name: &str) -> Listed {
    let path = list_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_list(&text)
        .into_iter()
        .find(|l| l.program == name)
        .unwrap_or_else(|| {
            panic!(
                "the tests start `{name}`, which scripts/test-tools.txt does not list, so the \
                 install step would not provide it: add a line `{name} <debian-package> rust`"
            )
        })
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn required() -> bool {
    std::env::var("TOKENRELAY_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// The path of a listed program. `None` (the caller skips) when it is missing, unless
/// `TOKENRELAY_REQUIRE_TOOLS=1`; panics for a program the list does not name.
pub fn tool(name: &str) -> Option<PathBuf> {
    let entry = listed(name);
    if let Some(found) = on_path(name) {
        return Some(found);
    }
    assert!(
        !required(),
        "`{name}` is not installed: it comes from the Debian package `{}` \
         (scripts/test.sh installs everything scripts/test-tools.txt lists)",
        entry.package
    );
    eprintln!(
        "`{name}` not installed (Debian package `{}`); skipping (scripts/test.sh installs it)",
        entry.package
    );
    None
}

/// A `Command` for a listed program, or `None` as for [`tool`].
pub fn command(name: &str) -> Option<Command> {
    tool(name).map(Command::new)
}
