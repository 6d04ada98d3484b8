//! Validation of the raw config into the typed [`Config`](super::Config): the top level
//! and the helpers the sections share here, one module per section.

mod credential;
mod notify;
mod store;
mod upstream;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use url::Url;

use super::raw::RawConfig;
use super::*;
use credential::validate_credential;
use store::validate_store;
use upstream::validate_upstream;

pub(super) fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());

    let admin_listen = raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin = AdminConfig {
        listen: parse_listen(&mut p, "admin.listen", admin_listen),
        token: raw
            .admin
            .token_file
            .as_deref()
            .and_then(|f| super::secrets::read_secret_file(&mut p, "admin.token_file", f)),
        token_file: raw.admin.token_file,
    };
    let store = validate_store(&mut p, raw.store);
    let notify = notify::validate_notify(&mut p, raw.notify);
    let log = LogConfig {
        format: match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add("log.format", format!("must be text or json, got {other:?}"));
                LogFormat::Text
            }
        },
        level: raw.log.level,
        access_log: raw.log.access_log.unwrap_or(false),
    };
    if raw.runtime.worker_threads == Some(0) {
        p.add("runtime.worker_threads", "must be at least 1");
    }
    let runtime = RuntimeConfig {
        worker_threads: raw.runtime.worker_threads,
        shutdown_grace: raw
            .runtime
            .shutdown_grace
            .unwrap_or(HumanDuration(DEFAULT_SHUTDOWN_GRACE)),
        instance_id: raw
            .runtime
            .instance_id
            .unwrap_or_else(|| default_instance_id(env)),
    };

    if raw.credentials.is_empty() {
        p.add("credentials", "at least one credential is required");
    }
    let mut credentials = BTreeMap::new();
    // Defined, but with problems of their own (already reported): an upstream naming
    // one gets no second error for it.
    let mut refused = BTreeSet::new();
    for (name, c) in raw.credentials {
        check_name(&mut p, &format!("credentials.{name}"), &name);
        match validate_credential(&mut p, &name, c) {
            Some(c) => {
                credentials.insert(name, c);
            }
            None => {
                refused.insert(name);
            }
        }
    }

    check_sink_files(&mut p, &credentials);

    if raw.upstreams.is_empty() {
        p.add("upstreams", "at least one upstream is required");
    }
    let mut upstreams = BTreeMap::new();
    let mut listens: HashMap<SocketAddr, String> = HashMap::new();
    listens.insert(admin.listen, "admin.listen".into());
    for (name, u) in raw.upstreams {
        let path = format!("upstreams.{name}");
        check_name(&mut p, &path, &name);
        if let Some(u) = validate_upstream(&mut p, &name, u, &credentials, &refused) {
            // Port 0 (any free port, used by tests) never collides.
            let taken = (u.listen.port() != 0)
                .then(|| listens.insert(u.listen, format!("{path}.listen")))
                .flatten();
            if let Some(other) = taken {
                p.add(
                    &format!("{path}.listen"),
                    format!("{} is already used by {other}", u.listen),
                );
            }
            upstreams.insert(name, u);
        }
    }

    // Fields named by url templates are kept by their credential, which resolves the
    // templates each time it publishes a token.
    for u in upstreams.values() {
        if let (Some(t), Some(c)) = (u.url.template(), credentials.get_mut(&u.credential)) {
            if !c.answer_fields.contains(&t.field) {
                c.answer_fields.push(t.field.clone());
                c.answer_fields.sort();
            }
            c.url_templates.push(TemplatedUpstream {
                upstream: u.name.clone(),
                template: t.clone(),
                allow_insecure_http: u.allow_insecure_http,
            });
        }
    }

    if !p.0.is_empty() {
        return Err(ConfigError { problems: p.0 });
    }
    Ok(Config {
        admin,
        store,
        log,
        runtime,
        credentials,
        upstreams,
        notify,
        origins: preset::Origins::new(),
    })
}

/// Each sink file belongs to one credential: two would overwrite each other's token.
fn check_sink_files(p: &mut Problems, credentials: &BTreeMap<String, CredentialConfig>) {
    let mut owners: HashMap<&std::path::Path, &str> = HashMap::new();
    for (name, c) in credentials {
        for (i, s) in c.sinks.iter().enumerate() {
            if let Some(other) = owners.insert(&s.file, name) {
                p.add(
                    &format!("credentials.{name}.sinks[{i}].file"),
                    format!(
                        "{} is already a sink of credential {other}",
                        s.file.display()
                    ),
                );
            }
        }
    }
}

pub(super) fn default_instance_id(env: &dyn Fn(&str) -> Option<String>) -> String {
    let host = env("HOSTNAME")
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tokenrelay".into());
    format!("{host}/{}", std::process::id())
}

/// Names become metric labels, file names and store keys: keep them plain.
pub(super) fn check_name(p: &mut Problems, path: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        p.add(
            path,
            "name must be 1-64 characters of letters, digits, '-' or '_'",
        );
    }
}

pub(super) fn parse_listen(p: &mut Problems, path: &str, s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| {
        p.add(
            path,
            format!("{s:?} is not an address like 127.0.0.1:8081 or [::1]:8081"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Parses an http(s) URL, enforcing https unless `allow_insecure_http`.
pub(super) fn parse_url(
    p: &mut Problems,
    path: &str,
    s: &str,
    allow_insecure_http: bool,
) -> Option<Url> {
    let url = match Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            p.add(path, format!("{s:?} is not a valid URL ({e})"));
            return None;
        }
    };
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http => {}
        "http" => {
            p.add(
                path,
                format!("must use https:// (got {s:?}); set allow_insecure_http: true on this entry only for local development or tests"),
            );
            return None;
        }
        other => {
            p.add(
                path,
                format!("scheme {other:?} is not supported; use https://"),
            );
            return None;
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        p.add(path, format!("{s:?} has no host"));
        return None;
    }
    if !url.username().is_empty() || url.password().is_some() {
        p.add(
            path,
            "credentials in the URL are not allowed; use the credential settings",
        );
        return None;
    }
    Some(url)
}
