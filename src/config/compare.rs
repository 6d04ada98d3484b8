//! What a reload compares: whether a credential or upstream changed, the token endpoint
//! identity a stored refresh token belongs to, and the settings only a restart applies.

use serde::Serialize;

use super::{Config, CredentialConfig, UpstreamConfig};
use crate::secret::Secret;

/// The token endpoint and client a refresh token belongs to (neither is secret). Stored
/// with each state, so a token is never sent where it was not issued.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedTo {
    pub token_url: String,
    pub client_id: String,
}

/// Settings read once at startup; a reload that changes them keeps the running value.
pub const RESTART_ONLY: [&str; 7] = [
    "admin",
    "notify",
    "store",
    "runtime.worker_threads",
    "runtime.instance_id",
    "log.format",
    "log.level",
];

fn json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl CredentialConfig {
    /// Whether two configs describe the same credential, secret values included (they
    /// serialize redacted, so they are compared on their own), and the url templates of
    /// the upstreams using it (which the credential resolves per token).
    pub fn same_as(&self, other: &CredentialConfig) -> bool {
        json(self) == json(other)
            && self.secret_values() == other.secret_values()
            && self.url_templates == other.url_templates
    }

    /// Every secret value the config holds.
    fn secret_values(&self) -> Vec<Option<&Secret>> {
        let mut v = vec![
            self.client_secret.as_ref(),
            self.password.as_ref(),
            self.static_token.as_ref(),
        ];
        v.extend(self.token_headers.values().map(Some));
        v
    }

    /// Who a stored refresh token was issued to: the token endpoint and the client.
    /// Sending it anywhere else would leak it, so changing either starts over; stored
    /// states record it.
    pub fn token_endpoint_identity(&self) -> IssuedTo {
        IssuedTo {
            token_url: self
                .token_url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
            client_id: self.client_id.clone().unwrap_or_default(),
        }
    }
}

impl UpstreamConfig {
    /// Whether two configs describe the same upstream (it holds no secret values).
    pub fn same_as(&self, other: &UpstreamConfig) -> bool {
        json(self) == json(other)
    }
}

impl Config {
    /// The restart-only settings ([`RESTART_ONLY`]) that differ in `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let values = |c: &Config| {
            [
                json(&c.admin),
                json(&c.notify),
                json(&c.store),
                json(&c.runtime.worker_threads),
                json(&c.runtime.instance_id),
                json(&c.log.format),
                json(&c.log.level),
            ]
        };
        RESTART_ONLY
            .iter()
            .zip(values(self).iter().zip(values(new).iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(name, _)| *name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, &|_| None).unwrap()
    }

    const BASE: &str = r#"
admin: { listen: "127.0.0.1:9901" }
credentials:
  crm:
    grant: client_credentials
    token_url: https://auth.example.com/token
    client_id: app
    client_secret: SECRET
upstreams:
  api: { listen: "127.0.0.1:8081", url: "https://api.example.com/v1", credential: crm }
"#;

    #[test]
    fn a_secret_value_change_is_a_change_though_it_prints_redacted() {
        let a = config(BASE);
        let b = config(&BASE.replace("SECRET", "OTHER"));
        let (ca, cb) = (&a.credentials["crm"], &b.credentials["crm"]);
        assert!(ca.same_as(&config(BASE).credentials["crm"]));
        assert!(!ca.same_as(cb));
        assert_eq!(ca.token_endpoint_identity(), cb.token_endpoint_identity());
        let c = config(&BASE.replace("client_id: app", "client_id: other"));
        assert_ne!(
            ca.token_endpoint_identity(),
            c.credentials["crm"].token_endpoint_identity()
        );
    }

    #[test]
    fn upstream_changes_and_restart_only_settings_are_told_apart() {
        let a = config(BASE);
        let b = config(
            &BASE
                .replace("/v1", "/v2")
                .replace("9901", "9902")
                .replace("admin:", "runtime: { worker_threads: 3 }\nadmin:"),
        );
        assert!(!a.upstreams["api"].same_as(&b.upstreams["api"]));
        assert!(a.upstreams["api"].same_as(&config(BASE).upstreams["api"]));
        assert_eq!(
            a.restart_only_changes(&b),
            vec!["admin", "runtime.worker_threads"]
        );
        assert!(a.restart_only_changes(&config(BASE)).is_empty());
    }
}
