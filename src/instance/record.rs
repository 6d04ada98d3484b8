//! What a reload did, and the config facts `/status` shows: the generation (+1 per
//! applied reload), when it was loaded, and how the last reload went.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadTrigger {
    /// `SIGHUP`.
    Signal,
    /// `tokenrelay reload` (`POST /reload` on the admin listener).
    Admin,
    /// `--watch-config` saw the file change.
    Watch,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this instance was not started from a config file")]
    NoConfigFile,
    #[error("{0}; nothing changed")]
    Unreadable(#[source] crate::instance::config_file::ReadError),
    #[error("the new config is invalid; nothing changed:\n{0}")]
    Invalid(#[source] crate::config::ConfigError),
    #[error(transparent)]
    Apply(#[from] crate::instance::ApplyError),
}

/// Names of what a reload added, changed and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub credentials_added: Vec<String>,
    pub credentials_changed: Vec<String>,
    pub credentials_removed: Vec<String>,
    pub upstreams_added: Vec<String>,
    pub upstreams_changed: Vec<String>,
    pub upstreams_removed: Vec<String>,
}

impl Changes {
    /// One line for the log, e.g. `upstreams added: b; credentials changed: crm`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("credentials added", &self.credentials_added),
            ("credentials changed", &self.credentials_changed),
            ("credentials removed", &self.credentials_removed),
            ("upstreams added", &self.upstreams_added),
            ("upstreams changed", &self.upstreams_changed),
            ("upstreams removed", &self.upstreams_removed),
        ]
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what}: {}", names.join(", ")))
        .collect();
        if parts.is_empty() {
            "nothing changed".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// An applied reload.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub changes: Changes,
    /// Settings only a restart applies ([`crate::config::RESTART_ONLY`]) that the new
    /// file changes: their running values are kept.
    pub restart_needed: Vec<&'static str>,
}

/// How the last reload went.
#[derive(Clone, Debug, Serialize)]
pub struct LastReload {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub trigger: ReloadTrigger,
    pub result: &'static str,
    /// Why the file was refused (names the setting; never a secret value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Applied>,
}

/// The config facts of `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigStatus {
    /// The file reloads read; none when the instance was started from text.
    pub path: Option<PathBuf>,
    /// 1 at startup, +1 per applied reload.
    pub generation: u64,
    #[serde(serialize_with = "rfc3339")]
    pub loaded_at: SystemTime,
    pub last_reload: Option<LastReload>,
}

impl ConfigStatus {
    pub fn new(path: Option<PathBuf>) -> ConfigStatus {
        ConfigStatus {
            path,
            generation: 1,
            loaded_at: SystemTime::now(),
            last_reload: None,
        }
    }

    /// Records a reload's outcome.
    pub fn record(&mut self, trigger: ReloadTrigger, outcome: &Result<Applied, ReloadError>) {
        let at = SystemTime::now();
        self.last_reload = Some(match outcome {
            Ok(applied) => {
                self.generation += 1;
                self.loaded_at = at;
                LastReload {
                    at,
                    trigger,
                    result: "success",
                    error: None,
                    applied: Some(applied.clone()),
                }
            }
            Err(e) => LastReload {
                at,
                trigger,
                result: "failure",
                error: Some(e.to_string()),
                applied: None,
            },
        });
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_reload_keeps_the_generation_and_says_why() {
        let mut s = ConfigStatus::new(None);
        let no_credential = crate::instance::ApplyError::NoCredential { name: "a".into() };
        s.record(ReloadTrigger::Signal, &Err(no_credential.into()));
        assert_eq!(s.generation, 1);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["last_reload"]["result"], "failure");
        assert_eq!(v["last_reload"]["trigger"], "signal");
        assert_eq!(
            v["last_reload"]["error"],
            "upstreams.a.credential: no such credential"
        );
        let applied = Applied {
            changes: Changes {
                upstreams_added: vec!["b".into()],
                ..Changes::default()
            },
            restart_needed: vec!["admin"],
        };
        s.record(ReloadTrigger::Watch, &Ok(applied));
        assert_eq!(s.generation, 2);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["last_reload"]["result"], "success");
        assert_eq!(v["last_reload"]["changes"]["upstreams_added"][0], "b");
        assert_eq!(v["last_reload"]["restart_needed"][0], "admin");
    }

    #[test]
    fn the_summary_names_only_what_changed() {
        let c = Changes {
            credentials_changed: vec!["crm".into()],
            upstreams_removed: vec!["a".into(), "b".into()],
            ..Changes::default()
        };
        assert_eq!(
            c.summary(),
            "credentials changed: crm; upstreams removed: a, b"
        );
        assert_eq!(Changes::default().summary(), "nothing changed");
    }
}
