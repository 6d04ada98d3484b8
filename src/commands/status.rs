//! `tokenrelay status`: the running instance's `/status` (asked over the admin listener
//! named in the config), or, when no instance answers, what the store holds, with the
//! same fields and state names. Never token values.
//!
//! Exit codes (DESIGN.md, "Operator commands"): 0 every credential is ready, 1 some
//! credential needs action, 2 no instance answered and the store could not be read.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::clock::from_ms;
use crate::config::{Config, Grant};
use crate::store::{now_ms, StoreError, StoredState};

/// How long the running instance may take to answer.
const INSTANCE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the command found.
enum Found {
    /// The running instance's `/status`.
    Instance(Value),
    /// No instance answered (why); what the store holds per credential.
    Store {
        unreachable: InstanceError,
        doc: Value,
    },
    /// Neither the instance nor the store could be read.
    Nothing {
        unreachable: InstanceError,
        store: StoreError,
    },
}

pub async fn run(cfg: Config, json_output: bool) -> anyhow::Result<ExitCode> {
    let found = match ask_instance(&cfg).await {
        Ok(doc) => Found::Instance(doc),
        Err(unreachable) => match from_store(&cfg).await {
            Ok(doc) => Found::Store { unreachable, doc },
            Err(store) => Found::Nothing { unreachable, store },
        },
    };
    let (text, code) = match &found {
        Found::Instance(doc) => (
            render(doc, "the running instance", json_output),
            exit_code(doc),
        ),
        Found::Store { unreachable, doc } => {
            let from = format!("the store (no running instance answered: {unreachable})");
            (render(doc, &from, json_output), exit_code(doc))
        }
        Found::Nothing { unreachable, store } => {
            let text = if json_output {
                let doc = json!({"source": null, "instance_error": unreachable.to_string(), "store_error": store.to_string()});
                format!("{doc:#}\n")
            } else {
                format!("no running instance answered ({unreachable}), and the store could not be read ({store})\n")
            };
            (text, ExitCode::from(2))
        }
    };
    print_quietly(&text);
    Ok(code)
}

/// Writes `text` to standard output; a reader that went away (`| head`) is not an error.
fn print_quietly(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Why the running instance gave no `/status`.
#[derive(Debug, thiserror::Error)]
enum InstanceError {
    #[error("{url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("{url}/status answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
}

async fn ask_instance(cfg: &Config) -> Result<Value, InstanceError> {
    let url = super::admin_client::base_url(cfg);
    let unreachable = |e: reqwest::Error| InstanceError::Unreachable {
        url: url.clone(),
        cause: without_url(&e),
    };
    let client = super::admin_client::client(INSTANCE_TIMEOUT).map_err(unreachable)?;
    let resp = client
        .get(format!("{url}/status"))
        .send()
        .await
        .map_err(unreachable)?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(InstanceError::Status { url, status });
    }
    let mut doc: Value = resp.json().await.map_err(unreachable)?;
    doc["source"] = json!("instance");
    Ok(doc)
}

/// A reqwest error's cause, without the URL it already names.
fn without_url(e: &reqwest::Error) -> String {
    let mut source = std::error::Error::source(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// The `/status` fields the store can tell, per credential.
async fn from_store(cfg: &Config) -> Result<Value, StoreError> {
    let needs_store = cfg
        .credentials
        .values()
        .any(|c| c.grant == Grant::RefreshToken);
    let store = if needs_store {
        Some(crate::store::open(&cfg.store)?)
    } else {
        None
    };
    let mut credentials = BTreeMap::new();
    let mut read_any = !needs_store;
    let mut last_error = None;
    for (name, c) in &cfg.credentials {
        let entry = match store.as_ref().filter(|_| c.grant == Grant::RefreshToken) {
            None => json!({
                "state": "unavailable",
                "grant": c.grant,
                "detail": "obtained by a running instance at its start; none is running",
            }),
            Some(store) => match store.load(name).await {
                Ok(s) => {
                    read_any = true;
                    stored_entry(name, c.grant, s.as_ref())
                }
                Err(e) => {
                    let entry = json!({"state": "unavailable", "grant": c.grant, "store_error": e.to_string()});
                    last_error = Some(e);
                    entry
                }
            },
        };
        credentials.insert(name.clone(), entry);
    }
    // With a store needed, every credential that uses it was read or failed.
    if let (false, Some(e)) = (read_any, last_error) {
        return Err(e);
    }
    Ok(json!({
        "source": "store",
        "store": store.as_ref().map_or("none", |s| s.kind()),
        "credentials": credentials,
    }))
}

/// One credential's entry from its stored state, in `/status` terms.
fn stored_entry(name: &str, grant: Grant, s: Option<&StoredState>) -> Value {
    let at = |ms: u64| humantime::format_rfc3339_seconds(from_ms(ms)).to_string();
    let Some(s) = s else {
        return json!({
            "state": "unavailable",
            "grant": grant,
            "detail": format!("nothing stored: run `tokenrelay seed --credential {name}` or `tokenrelay authorize --credential {name}`"),
        });
    };
    let valid_until = s.access_expires_at_ms.filter(|&e| e > now_ms());
    let state = if s.moved.is_some() {
        "moved"
    } else if s.reauthorization_required.is_some() {
        "reauthorization_required"
    } else if s.access_token.is_some() && (valid_until.is_some() || s.is_long_lived()) {
        "ready"
    } else {
        "unavailable"
    };
    let detail = (state == "unavailable").then(|| {
        if s.refresh_token.is_some() {
            "the stored access token has expired; a running instance refreshes it at its start"
        } else {
            "no usable token is stored"
        }
    });
    json!({
        "state": state,
        "grant": grant,
        "generation": s.generation,
        "expires_at": valid_until.map(at),
        "expires_in_seconds": valid_until.map(|e| (e - now_ms()) / 1000),
        "refresh_token_expires_at": s.refresh_expires_at_ms.map(at),
        "refresh_token_expiry_estimated": s.refresh_expires_at_ms.map(|_| s.refresh_expires_estimated),
        "refresh_token": if s.refresh_token.is_some() { "stored" } else { "none" },
        "updated_at": at(s.updated_at_ms),
        "updated_by": s.updated_by,
        "reauthorization_required": s.reauthorization_required.as_ref().map(|why| json!({"reason": why})),
        "moved": s.moved.as_ref().map(|m| json!({"to": m.to, "at": at(m.at_ms)})),
        "in_doubt": s.in_doubt.as_ref().map(|d| json!({"since": at(d.at_ms), "cause": d.cause, "retried": d.retried})),
        // A state stored by an older version may hold a field now judged secret.
        "answer_fields": crate::config::url_template::without_secret_looking(s.answer_fields.clone()),
        "detail": detail,
    })
}

/// 0 when every credential is ready, else 1.
fn exit_code(doc: &Value) -> ExitCode {
    let all_ready = doc["credentials"]
        .as_object()
        .is_some_and(|m| m.values().all(|c| c["state"] == "ready"));
    if all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The document as JSON, or as lines for a person.
fn render(doc: &Value, from: &str, json_output: bool) -> String {
    if json_output {
        return format!("{doc:#}\n");
    }
    let mut out = format!("from {from}\n");
    let empty = serde_json::Map::new();
    for (name, c) in doc["credentials"].as_object().unwrap_or(&empty) {
        let text = |v: &Value| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        };
        out += &format!(
            "{name}: {} (grant {})\n",
            text(&c["state"]),
            text(&c["grant"])
        );
        let mut line = |label: &str, v: &Value| {
            if !v.is_null() {
                out += &format!("  {label:<21} {}\n", text(v));
            }
        };
        line("why:", &c["reauthorization_required"]["reason"]);
        line("what to do:", &c["reauthorization_required"]["action"]);
        line("moved to:", &c["moved"]["to"]);
        line("detail:", &c["detail"]);
        line("store error:", &c["store_error"]);
        line("generation:", &c["generation"]);
        line("access token expires:", &c["expires_at"]);
        let dies = match (&c["refresh_token_expires_at"], &c["refresh_token_expiry_estimated"]) {
            (Value::String(at), Value::Bool(true)) => Value::String(format!(
                "{at} (estimate: counted from the seed time; seed --refresh-token-issued-at gives the real one)"
            )),
            (at, _) => at.clone(),
        };
        line("refresh token dies:", &dies);
        line("refresh token:", &c["refresh_token"]);
        line("last refresh:", &c["last_refresh"]["at"]);
        line("  result:", &c["last_refresh"]["result"]);
        line("  error:", &c["last_refresh"]["error"]);
        line("in doubt since:", &c["in_doubt"]["since"]);
        line("updated:", &c["updated_at"]);
        line("updated by:", &c["updated_by"]);
        if let Some(fields) = c["answer_fields"].as_object() {
            for (field, value) in fields {
                line(&format!("answer field {field}:"), value);
            }
        }
        for sink in c["sinks"].as_array().into_iter().flatten() {
            line("sink:", &sink["file"]);
            line("  written:", &sink["last_write_at"]);
            line("  error:", &sink["last_error"]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_credential_ready_is_exit_0_and_anything_else_is_1() {
        let ready = json!({"credentials": {"a": {"state": "ready"}, "b": {"state": "ready"}}});
        let degraded =
            json!({"credentials": {"a": {"state": "ready"}, "b": {"state": "degraded"}}});
        assert_eq!(exit_code(&ready), ExitCode::SUCCESS);
        assert_eq!(exit_code(&degraded), ExitCode::from(1));
    }

    #[test]
    fn each_token_sink_is_shown_with_its_last_write_or_error() {
        let doc = json!({"credentials": {"crm": {"state": "ready", "grant": "client_credentials", "sinks": [
            {"file": "/run/tokens/a.json", "last_write_at": "2026-01-01T00:00:00Z", "last_error": null},
            {"file": "/run/tokens/b.json", "last_write_at": null, "last_error": "the directory /run/tokens does not exist"}]}}});
        let text = render(&doc, "instance", false);
        assert!(text.contains("sink:                 /run/tokens/a.json\n    written:            2026-01-01T00:00:00Z\n"), "{text}");
        assert!(
            text.contains("/run/tokens/b.json\n    error:              the directory"),
            "{text}"
        );
    }

    #[test]
    fn stored_states_read_as_status_states() {
        let valid = StoredState {
            generation: 3,
            access_token: Some(crate::secret::Secret::new("a")),
            access_expires_at_ms: Some(now_ms() + 60_000),
            refresh_token: Some(crate::secret::Secret::new("r")),
            ..Default::default()
        };
        let e = stored_entry("crm", Grant::RefreshToken, Some(&valid));
        assert_eq!(e["state"], "ready");
        assert_eq!(
            e["grant"], "refresh_token",
            "the config's name, not the Rust one"
        );
        let dead = StoredState {
            reauthorization_required: Some("refused".into()),
            ..valid.clone()
        };
        assert_eq!(
            stored_entry("crm", Grant::RefreshToken, Some(&dead))["state"],
            "reauthorization_required"
        );
        assert_eq!(
            stored_entry("crm", Grant::RefreshToken, None)["state"],
            "unavailable"
        );
        assert!(!e.to_string().contains("\"r\"") && !e.to_string().contains("\"a\""));
    }
}
