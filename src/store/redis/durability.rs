//! What the Redis server's persistence settings risk: read once with `CONFIG GET` when
//! the store first connects, and logged as one warning unless writes are on disk before
//! Redis acknowledges them.
//!
//! A compare-and-swap that Redis acknowledged is what lets the refresher use a rotated
//! refresh token (the old one is spent at that point). If Redis then loses that write, the
//! store holds the spent token again, and the credential needs authorizing again. Redis
//! keeps an acknowledged write through its own crash only with `appendonly yes` and
//! `appendfsync always` (the append-only file fsynced before the reply); with `everysec` up
//! to about a second of writes is lost, with `appendfsync no` whatever the OS had not
//! flushed, and without the append-only file everything since the last RDB snapshot.

use redis::aio::ConnectionManager;

/// The verdict on the server's persistence settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes` and `appendfsync always`: on disk before acknowledged.
    Fsynced,
    /// A setting with which an acknowledged write can be lost by a Redis crash.
    AtRisk {
        /// The setting (`appendonly` or `appendfsync`) and its value.
        setting: &'static str,
        value: String,
        /// What is lost, in words.
        loses: &'static str,
    },
    /// The settings could not be read (e.g. `CONFIG` disabled or renamed on a managed
    /// Redis, or not allowed to this user).
    Unknown { reason: String },
}

impl Durability {
    /// Judges the values of `appendonly` and `appendfsync` (`None`: not reported).
    pub fn judge(appendonly: Option<&str>, appendfsync: Option<&str>) -> Durability {
        let (Some(appendonly), Some(appendfsync)) = (appendonly, appendfsync) else {
            return Durability::Unknown {
                reason: "CONFIG GET did not report appendonly and appendfsync".into(),
            };
        };
        if !appendonly.eq_ignore_ascii_case("yes") {
            return Durability::AtRisk {
                setting: "appendonly",
                value: appendonly.to_string(),
                loses: "every write since the last RDB snapshot (all of them without one)",
            };
        }
        match appendfsync.to_ascii_lowercase().as_str() {
            "always" => Durability::Fsynced,
            "everysec" => Durability::AtRisk {
                setting: "appendfsync",
                value: appendfsync.to_string(),
                loses: "up to about a second of writes",
            },
            _ => Durability::AtRisk {
                setting: "appendfsync",
                value: appendfsync.to_string(),
                loses: "the writes the operating system had not flushed to disk yet",
            },
        }
    }

    /// The startup warning, or `None` when writes are on disk before acknowledged.
    pub fn warning(&self) -> Option<String> {
        const ADVICE: &str = "so a rotated refresh token Redis acknowledged can be lost, \
            leaving the spent one stored and the credential to be authorized again; run Redis \
            with appendonly yes and appendfsync always, and/or set store.wait_replicas to \
            have each write confirmed by replicas (docs/replicas.md, Redis durability)";
        match self {
            Durability::Fsynced => None,
            Durability::AtRisk {
                setting,
                value,
                loses,
            } => Some(format!(
                "Redis store: {setting} is {value}: a crash of the Redis server loses {loses}, \
                 {ADVICE}"
            )),
            Durability::Unknown { reason } => Some(format!(
                "Redis store: cannot read appendonly and appendfsync ({reason}), so whether an \
                 acknowledged write survives a crash of the Redis server is unknown; unless the \
                 server fsyncs every write, {ADVICE}"
            )),
        }
    }

    /// Reads `appendonly` and `appendfsync` from the server and judges them.
    pub async fn read(c: &mut ConnectionManager) -> Durability {
        let mut pipe = redis::pipe();
        pipe.cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync");
        type Settings = std::collections::HashMap<String, String>;
        let read = tokio::time::timeout(
            super::COMMAND_TIMEOUT,
            pipe.query_async::<(Settings, Settings)>(c),
        )
        .await;
        match read {
            Ok(Ok((appendonly, appendfsync))) => Durability::judge(
                appendonly.get("appendonly").map(String::as_str),
                appendfsync.get("appendfsync").map(String::as_str),
            ),
            Ok(Err(e)) => Durability::Unknown {
                reason: format!("CONFIG GET: {}", super::describe(&e)),
            },
            Err(_) => Durability::Unknown {
                reason: "CONFIG GET timed out".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_append_only_file_fsynced_always_is_quiet() {
        assert_eq!(
            Durability::judge(Some("yes"), Some("always")),
            Durability::Fsynced
        );
        assert_eq!(Durability::Fsynced.warning(), None);
    }

    #[test]
    fn each_risky_setting_is_named_with_what_it_loses() {
        for (appendonly, appendfsync, named, loses) in [
            (
                "no",
                "always",
                "appendonly is no",
                "since the last RDB snapshot",
            ),
            (
                "yes",
                "everysec",
                "appendfsync is everysec",
                "about a second",
            ),
            ("yes", "no", "appendfsync is no", "not flushed"),
        ] {
            let warning = Durability::judge(Some(appendonly), Some(appendfsync))
                .warning()
                .unwrap();
            for part in [named, loses, "rotated refresh token", "appendfsync always"] {
                assert!(warning.contains(part), "{part:?} not in {warning:?}");
            }
        }
    }

    #[test]
    fn settings_that_cannot_be_read_are_warned_about() {
        let warning = Durability::judge(None, Some("always")).warning().unwrap();
        assert!(
            warning.contains("cannot read appendonly and appendfsync"),
            "{warning}"
        );
        let unknown = Durability::Unknown {
            reason: "CONFIG GET: unknown command 'CONFIG'".into(),
        };
        let warning = unknown.warning().unwrap();
        assert!(warning.contains("unknown command 'CONFIG'"), "{warning}");
        assert!(warning.contains("rotated refresh token"), "{warning}");
    }
}
