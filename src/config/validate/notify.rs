//! `notify`: the webhook that hears about credentials needing a person.

use std::collections::BTreeSet;

use super::super::raw::RawNotify;
use super::super::secrets::read_secret;
use super::super::{NotifyConfig, NotifyEvent, Problems, WebhookConfig, DEFAULT_EXPIRING_BEFORE};
use super::parse_url;
use crate::config::units::HumanDuration;

pub(super) fn validate_notify(p: &mut Problems, raw: RawNotify) -> NotifyConfig {
    let expiring_before = raw
        .expiring_before
        .unwrap_or(HumanDuration(DEFAULT_EXPIRING_BEFORE));
    let webhook = raw.webhook.and_then(|w| {
        // Plain http only to this host, or where the config says so explicitly.
        let loopback = url::Url::parse(&w.url).ok().is_some_and(|u| {
            u.scheme() == "http"
                && u.host().is_some_and(|h| match h {
                    url::Host::Ipv4(ip) => ip.is_loopback(),
                    url::Host::Ipv6(ip) => ip.is_loopback(),
                    url::Host::Domain(d) => d == "localhost",
                })
        });
        let insecure_ok = loopback || w.allow_insecure_http.unwrap_or(false);
        let url = parse_url(p, "notify.webhook.url", &w.url, insecure_ok);
        let secret = w.secret_file.as_ref().and_then(|f| {
            read_secret(f)
                .map_err(|e| p.add("notify.webhook.secret_file", e))
                .ok()
        });
        let events = match w.events {
            None => NotifyEvent::ALL.into_iter().collect(),
            Some(names) => {
                let mut events = BTreeSet::new();
                for name in names {
                    match NotifyEvent::ALL.into_iter().find(|e| e.as_str() == name) {
                        Some(e) => {
                            events.insert(e);
                        }
                        None => {
                            let known: Vec<&str> =
                                NotifyEvent::ALL.iter().map(|e| e.as_str()).collect();
                            p.add(
                                "notify.webhook.events",
                                format!("{name:?} is not an event; use {}", known.join(", ")),
                            );
                        }
                    }
                }
                events
            }
        };
        Some(WebhookConfig {
            url: super::super::WebhookUrl::new(url?),
            secret,
            secret_file: w.secret_file,
            events,
        })
    });
    NotifyConfig {
        webhook,
        expiring_before,
    }
}
