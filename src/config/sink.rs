//! Token sinks (`credentials.<name>.sinks`): files that get the credential's access token
//! each time a new one is published, for consumers that are not HTTP clients through the
//! proxy (database drivers, SDKs, cron scripts). Only the access token is written, never
//! the refresh token.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Problems;

/// The mode a sink file gets unless `mode` says otherwise: owner read and write only.
pub const DEFAULT_SINK_MODE: u32 = 0o600;

/// What a sink file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// The access token and a line break.
    #[default]
    Raw,
    /// `{"access_token": "...", "token_type": "Bearer", "expires_at": "RFC 3339"}`.
    Json,
    /// `ACCESS_TOKEN=...` and `ACCESS_TOKEN_EXPIRES_AT=...` lines.
    Env,
}

impl SinkFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkFormat::Raw => "raw",
            SinkFormat::Json => "json",
            SinkFormat::Env => "env",
        }
    }
}

/// Permission bits of a sink file (`0o600`); shown as the octal string it was written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FileMode {
    /// Others may read the file.
    pub fn world_readable(self) -> bool {
        self.0 & 0o004 != 0
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for FileMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One validated sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SinkConfig {
    /// Absolute path of the file.
    pub file: PathBuf,
    pub format: SinkFormat,
    pub mode: FileMode,
}

/// A sink as written in the config file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    /// Absolute path of the file. It is replaced on every new access token (a temporary
    /// file in the same directory, fsync, rename), so a reader never sees a partial file.
    pub file: PathBuf,
    /// `raw` (the token and a line break; the default), `json` or `env`.
    pub format: Option<SinkFormat>,
    /// The file's permissions as a quoted octal string; default "0600". World-writable
    /// modes are refused.
    pub mode: Option<RawFileMode>,
}

/// `mode` as written: an octal string, or a bare number (refused: YAML reads `0600` as
/// the decimal number 600).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawFileMode {
    Text(String),
    Number(i64),
}

impl JsonSchema for RawFileMode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FileMode".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "file permissions as a quoted octal string such as \"0600\" or \"0640\"",
            "type": "string",
            "pattern": "^0?[0-7]{3}$"
        })
    }
}

/// Validates the sinks of the credential at `path` (`credentials.NAME`).
pub(super) fn validate(p: &mut Problems, path: &str, raw: Vec<RawSink>) -> Vec<SinkConfig> {
    let mut sinks: Vec<SinkConfig> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = |key: &str| format!("{path}.sinks[{i}].{key}");
        let file = check_file(p, &at("file"), s.file);
        let mode = match s.mode {
            None => Some(FileMode(DEFAULT_SINK_MODE)),
            Some(m) => parse_mode(&m).map_err(|why| p.add(&at("mode"), why)).ok(),
        };
        if let (Some(file), Some(mode)) = (file, mode) {
            if sinks.iter().any(|other| other.file == file) {
                p.add(
                    &at("file"),
                    format!("{} is already a sink of this credential", file.display()),
                );
                continue;
            }
            sinks.push(SinkConfig {
                file,
                format: s.format.unwrap_or_default(),
                mode,
            });
        }
    }
    sinks
}

/// What an operator should hear about a credential's sinks: a mode that lets every user
/// read the token, a directory that does not exist (writes fail until it does).
pub(super) fn warnings(credential: &str, sinks: &[SinkConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in sinks.iter().enumerate() {
        let at = format!("credentials.{credential}.sinks[{i}]");
        if s.mode.world_readable() {
            out.push(format!(
                "{at}.mode: \"{}\" lets every user of the machine read the access token; use \"0600\", or \"0640\" with a group for its readers",
                s.mode
            ));
        }
        let dir = s.file.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            out.push(format!(
                "{at}.file: the directory {} does not exist; writing the token fails until it does",
                dir.display()
            ));
        }
    }
    out
}

/// An absolute path naming a file (not `/`, not ending in `/`, no `.` or `..` steps).
fn check_file(p: &mut Problems, at: &str, file: PathBuf) -> Option<PathBuf> {
    let text = file.to_string_lossy();
    let why = if !file.is_absolute() {
        Some("must be an absolute path")
    } else if text.ends_with('/') || file.file_name().is_none() {
        Some("must name a file, not a directory")
    } else if file
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        Some("must not contain `.` or `..` steps")
    } else {
        None
    };
    match why {
        Some(why) => {
            p.add(at, format!("{} {why}", display(&file)));
            None
        }
        None => Some(file),
    }
}

fn display(file: &Path) -> String {
    format!("{:?}", file.display().to_string())
}

/// Why a `mode` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("must be a quoted octal string such as \"0600\" (unquoted, YAML reads {0} as a decimal number)")]
    Unquoted(i64),
    #[error("{0:?} is not an octal file mode such as \"0600\" or \"0640\"")]
    NotOctal(String),
    #[error("{0:?} lets every user of the machine replace the token; use \"0600\" or \"0640\"")]
    WorldWritable(String),
}

/// `"0600"` or `"600"`: permission bits only (no setuid, setgid or sticky bit), and never
/// writable by others.
fn parse_mode(m: &RawFileMode) -> Result<FileMode, ModeError> {
    let text = match m {
        RawFileMode::Text(t) => t.trim(),
        RawFileMode::Number(n) => return Err(ModeError::Unquoted(*n)),
    };
    let digits = text
        .strip_prefix('0')
        .filter(|d| d.len() == 3)
        .unwrap_or(text);
    let octal = digits.len() == 3 && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    let bits = octal
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .ok_or_else(|| ModeError::NotOctal(text.to_string()))?;
    if bits & 0o002 != 0 {
        return Err(ModeError::WorldWritable(text.to_string()));
    }
    Ok(FileMode(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(text: &str) -> Result<u32, ModeError> {
        parse_mode(&RawFileMode::Text(text.into())).map(|m| m.0)
    }

    #[test]
    fn modes_are_octal_strings_without_world_write() {
        assert_eq!(mode("0600"), Ok(0o600));
        assert_eq!(mode("640"), Ok(0o640));
        assert_eq!(mode("0444"), Ok(0o444));
        for bad in ["0666", "0602", "777"] {
            assert_eq!(mode(bad), Err(ModeError::WorldWritable(bad.into())));
        }
        for bad in [
            "",
            "0",
            "06000",
            "4600",
            "0800",
            "+60",
            "rw-------",
            "0x180",
        ] {
            assert_eq!(
                mode(bad),
                Err(ModeError::NotOctal(bad.trim().into())),
                "{bad}"
            );
        }
        let unquoted = parse_mode(&RawFileMode::Number(600)).unwrap_err();
        assert_eq!(unquoted, ModeError::Unquoted(600));
        assert!(
            unquoted.to_string().contains("quoted octal string"),
            "{unquoted}"
        );
        assert_eq!(FileMode(0o640).to_string(), "0640");
        assert!(FileMode(0o644).world_readable() && !FileMode(0o640).world_readable());
    }

    #[test]
    fn files_are_absolute_paths_of_files() {
        let check = |f: &str| {
            let mut p = Problems(Vec::new());
            let ok = check_file(&mut p, "at", PathBuf::from(f)).is_some();
            (ok, p.0.join(" "))
        };
        assert_eq!(check("/run/tokens/crm.json"), (true, String::new()));
        assert!(check("tokens/crm.json").1.contains("absolute"));
        assert!(check("/run/tokens/").1.contains("not a directory"));
        assert!(check("/").1.contains("not a directory"));
        assert!(check("/run/../etc/crm").1.contains("`..`"));
    }

    #[test]
    fn defaults_and_repeats() {
        let raw = |file: &str| RawSink {
            file: file.into(),
            format: None,
            mode: None,
        };
        let mut p = Problems(Vec::new());
        let sinks = validate(
            &mut p,
            "credentials.crm",
            vec![raw("/run/a"), raw("/run/b"), raw("/run/a")],
        );
        assert_eq!(sinks.len(), 2);
        assert_eq!(sinks[0].format, SinkFormat::Raw);
        assert_eq!(sinks[0].mode, FileMode(0o600));
        assert_eq!(
            p.0,
            ["credentials.crm.sinks[2].file: /run/a is already a sink of this credential"]
        );
    }
}
