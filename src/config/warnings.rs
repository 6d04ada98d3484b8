//! What does not stop tokenrelay but its operator should hear about: at `check`, and
//! logged at startup.

use super::{Config, StoreBackend};

/// Each warning as `path: why`.
pub(super) fn of(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (n, c) in &config.credentials {
        out.extend(super::sink::warnings(n, &c.sinks));
        if let Some(w) = c
            .client_cert
            .as_ref()
            .and_then(|cc| cc.expiry_warning(&format!("credentials.{n}.client_cert_file")))
        {
            out.push(w);
        }
        if let Some(s) = c
            .sunset()
            .filter(|s| s.is_near(std::time::SystemTime::now()))
        {
            let provider = c.provider.as_deref().unwrap_or_default();
            out.push(s.warning(n, provider, std::time::SystemTime::now()));
        }
        let rotating_preset = c
            .provider
            .as_deref()
            .and_then(super::preset::get)
            .and_then(|p| p.credential.get("rotating_refresh_token").cloned())
            == Some(serde_yaml::Value::Bool(true));
        if rotating_preset && !c.refresh_token.rotating {
            out.push(format!(
                "credentials.{n}.rotating_refresh_token: false, but the {} preset treats its refresh tokens as single-use: if they are, an answer lost in transit leads to a spent token presented again and the grant lost; keep false only if the provider says its refresh tokens are reusable",
                c.provider.as_deref().unwrap_or_default()
            ));
        }
    }
    for (n, c) in &config.credentials {
        if c.refresh_mode == super::RefreshMode::OnDemand && !c.sinks.is_empty() {
            out.push(format!(
                "credentials.{n}.refresh_mode: on_demand refreshes only for requests through tokenrelay, so the token in its sink files expires between them; set refresh_mode: proactive if programs read the files"
            ));
        }
    }
    for (n, u) in &config.upstreams {
        if let Some(w) = u
            .client_cert
            .as_ref()
            .and_then(|cc| cc.expiry_warning(&format!("upstreams.{n}.client_cert_file")))
        {
            out.push(w);
        }
        let ip = u.listen.ip().to_canonical();
        if !ip.is_loopback() {
            out.push(format!(
                "upstreams.{n}.listen: {} is reachable from other hosts, and whoever connects gets their requests sent with the credential's token; listen on 127.0.0.1 unless a firewall or network policy limits who can connect",
                u.listen
            ));
        }
    }
    if let StoreBackend::File {
        allow_network_filesystem: true,
        ..
    } = &config.store.backend
    {
        out.push("store.allow_network_filesystem: true: on a network filesystem the lease (flock) and the atomic replace are not guaranteed, so two processes may spend one refresh token; use one process per state directory".into());
    }
    out
}
