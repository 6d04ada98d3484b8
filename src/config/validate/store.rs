//! The `store` section.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

use super::super::raw::RawStore;
use super::super::*;

pub(super) fn validate_store(p: &mut Problems, raw: RawStore) -> StoreConfig {
    let kind = raw.kind.as_deref().unwrap_or("file");
    let prefix = raw.key_prefix.unwrap_or_else(|| "tokenrelay/".to_string());
    let password = secret_from(p, "store", "password", raw.password, raw.password_file);
    if kind != "file" && raw.mark_path.is_some() {
        p.add(
            "store.mark_path",
            "applies only to store type file (its generation marks)",
        );
    }
    if kind != "redis" && raw.wait_replicas.is_some() {
        p.add(
            "store.wait_replicas",
            "applies only to store type redis (etcd writes are acknowledged by a majority already)",
        );
    }
    if kind != "file" && raw.allow_network_filesystem.is_some() {
        p.add(
            "store.allow_network_filesystem",
            "applies only to store type file (the filesystem of its directories)",
        );
    }
    let backend = match kind {
        "file" => {
            let path = raw
                .path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH));
            if raw.mark_path.as_ref().is_some_and(|m| *m == path) {
                p.add(
                    "store.mark_path",
                    "must be another directory than store.path (on storage a restore of it does not reach)",
                );
            }
            StoreBackend::File {
                path,
                mark_path: raw.mark_path,
                allow_network_filesystem: raw.allow_network_filesystem.unwrap_or(false),
            }
        }
        "redis" => {
            let url = raw.url.unwrap_or_default();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                p.add(
                    "store.url",
                    "a redis:// or rediss:// URL is required for store type redis",
                );
            }
            StoreBackend::Redis {
                url: Secret::new(url),
                key_prefix: prefix,
                wait_replicas: raw.wait_replicas.unwrap_or(0),
            }
        }
        "etcd" => {
            let endpoints = raw.endpoints.unwrap_or_default();
            if endpoints.is_empty() {
                p.add(
                    "store.endpoints",
                    "at least one endpoint is required for store type etcd",
                );
            }
            for (i, e) in endpoints.iter().enumerate() {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    p.add(
                        &format!("store.endpoints[{i}]"),
                        format!("{e:?} must start with http:// or https://"),
                    );
                }
            }
            check_ca_file(p, "store.ca_file", &raw.ca_file);
            StoreBackend::Etcd {
                endpoints,
                key_prefix: prefix,
                username: raw.username,
                password,
                ca_file: raw.ca_file,
            }
        }
        other => {
            p.add(
                "store.type",
                format!("must be file, redis or etcd, got {other:?}"),
            );
            StoreBackend::File {
                path: PathBuf::from(DEFAULT_STORE_PATH),
                mark_path: None,
                allow_network_filesystem: false,
            }
        }
    };
    let encryption_key = raw.encryption_key_file.as_ref().and_then(|f| {
        crate::keys::encryption::read_key_file(f)
            .map_err(|e| p.add("store.encryption_key_file", e))
            .ok()
    });
    let poll_interval = raw
        .poll_interval
        .unwrap_or(HumanDuration(DEFAULT_STORE_POLL));
    if poll_interval.0 < Duration::from_millis(50) || poll_interval.0 > Duration::from_secs(60) {
        p.add("store.poll_interval", "must be between 50ms and 60s");
    }
    if raw
        .lease_ttl
        .is_some_and(|t| t.0 < Duration::from_secs(1) || t.0 > Duration::from_secs(600))
    {
        p.add("store.lease_ttl", "must be between 1s and 10m");
    }
    StoreConfig {
        backend,
        encryption_key,
        encryption_key_file: raw.encryption_key_file,
        poll_interval,
        lease_ttl: raw.lease_ttl,
    }
}
