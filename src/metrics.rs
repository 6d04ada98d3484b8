//! Prometheus metrics (names per DESIGN.md) on a registry of our own. Label values are
//! bounded: upstream and credential names from config, status codes, fixed enums.
//! Hot-path handles are resolved once per upstream/credential, never by label per request.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets from 0.25 ms to 30 s: loopback hops to slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Every credential state, in the order `/status` documents them.
pub const STATES: [&str; 6] = [
    "initializing",
    "ready",
    "degraded",
    "unavailable",
    "reauthorization_required",
    "moved",
];

/// All metric families.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    pub refresh_total: IntCounterVec,
    refresh_duration: HistogramVec,
    pub expiry_timestamp: IntGaugeVec,
    pub refresh_expiry_timestamp: IntGaugeVec,
    pub generation: IntGaugeVec,
    pub ready: IntGaugeVec,
    pub state: IntGaugeVec,
    pub last_success: IntGaugeVec,
    waiters: IntCounterVec,
    retries_401: IntCounterVec,
    tunnels_open: IntGaugeVec,
    tunnel_bytes: IntCounterVec,
    pub store_ops: IntCounterVec,
    lease_lost: IntCounterVec,
    in_doubt: IntCounterVec,
    notifications: IntCounterVec,
    config_reloads: IntCounterVec,
    sink_writes: IntCounterVec,
    pub client_cert_expiry: IntGaugeVec,
    pub preset_sunset_timestamp: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let hv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )
                .unwrap(),
            )
        };
        let m = Metrics {
            requests: cv(
                "tokenrelay_requests_total",
                "Requests answered, by upstream and HTTP status code.",
                &["upstream", "code"],
            ),
            request_duration: hv(
                "tokenrelay_request_duration_seconds",
                "Time from request received to response headers sent.",
                &["upstream"],
            ),
            upstream_errors: cv(
                "tokenrelay_upstream_errors_total",
                "Upstream failures by kind (connect, timeout, tls, other).",
                &["upstream", "kind"],
            ),
            refresh_total: cv(
                "tokenrelay_token_refresh_total",
                "Token refresh attempts by trigger and result.",
                &["credential", "trigger", "result"],
            ),
            refresh_duration: hv(
                "tokenrelay_token_refresh_duration_seconds",
                "Duration of token refreshes, lease to durable write.",
                &["credential"],
            ),
            expiry_timestamp: gv(
                "tokenrelay_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires.",
                &["credential"],
            ),
            preset_sunset_timestamp: gv(
                "tokenrelay_preset_sunset_timestamp_seconds",
                "When the provider shuts down an endpoint or behaviour the credential's preset records as ending (sunset), as Unix time; absent when none concerns it.",
                &["credential"],
            ),
            refresh_expiry_timestamp: gv(
                "tokenrelay_refresh_token_expiry_timestamp_seconds",
                "When the current refresh token dies unless used (idle lifetime) or at the latest (absolute lifetime), the earlier; absent when unknown.",
                &["credential"],
            ),
            generation: gv(
                "tokenrelay_token_generation",
                "Generation of the current token (increases by one per rotation).",
                &["credential"],
            ),
            ready: gv(
                "tokenrelay_credential_ready",
                "1 when the credential holds a usable access token.",
                &["credential"],
            ),
            state: gv(
                "tokenrelay_credential_state",
                "1 for the credential's current state, 0 for the others.",
                &["credential", "state"],
            ),
            last_success: gv(
                "tokenrelay_last_refresh_success_timestamp_seconds",
                "Unix time of the last successful refresh or adoption.",
                &["credential"],
            ),
            waiters: cv(
                "tokenrelay_refresh_waiters_total",
                "Requests that waited on an in-flight refresh.",
                &["credential"],
            ),
            lease_lost: cv(
                "tokenrelay_refresh_lease_lost_total",
                "Refreshes whose store lease could not be renewed after the refresh token was sent (the write then relies on compare-and-swap on the generation).",
                &["credential"],
            ),
            in_doubt: cv(
                "tokenrelay_refresh_in_doubt_total",
                "Refresh attempts whose outcome is unknown: the request may have reached the token endpoint and no usable answer came back.",
                &["credential"],
            ),
            notifications: cv(
                "tokenrelay_notifications_total",
                "Webhook deliveries by event and result: success, failure (retried), expired (given up after an hour).",
                &["event", "result"],
            ),
            config_reloads: cv(
                "tokenrelay_config_reloads_total",
                "Config reloads (SIGHUP, tokenrelay reload, --watch-config), by result.",
                &["result"],
            ),
            sink_writes: cv(
                "tokenrelay_sink_writes_total",
                "Writes of token sink files (credentials.NAME.sinks), by result.",
                &["credential", "result"],
            ),
            client_cert_expiry: gv(
                "tokenrelay_client_certificate_expiry_timestamp_seconds",
                "Unix time at which a client certificate (mutual TLS) expires, as its file is now.",
                &["scope", "name"],
            ),
            retries_401: cv(
                "tokenrelay_upstream_401_retries_total",
                "Requests retried after an upstream 401, by result.",
                &["upstream", "result"],
            ),
            tunnels_open: gv(
                "tokenrelay_upstream_tunnels_open",
                "WebSocket connections being tunnelled to the upstream.",
                &["upstream"],
            ),
            tunnel_bytes: cv(
                "tokenrelay_upstream_tunnel_bytes_total",
                "Bytes carried by WebSocket tunnels, by direction (to_upstream, to_app).",
                &["upstream", "direction"],
            ),
            store_ops: cv(
                "tokenrelay_store_operations_total",
                "Store operations by op and result.",
                &["op", "result"],
            ),
            registry: r,
        };
        let build = IntGaugeVec::new(
            Opts::new("tokenrelay_build_info", "Build information; always 1."),
            &["version"],
        )
        .unwrap();
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(&m.registry, build);
        // Both results are shown from the start, so an alert on failures has a series.
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// Text exposition format of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// Per-upstream handles for the hot path.
    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        let e = |kind: &str| self.upstream_errors.with_label_values(&[upstream, kind]);
        let r = |result: &str| self.retries_401.with_label_values(&[upstream, result]);
        UpstreamMetrics {
            name: upstream.to_string(),
            requests: self.requests.clone(),
            by_code: (0..600).map(|_| OnceLock::new()).collect(),
            duration: self.request_duration.with_label_values(&[upstream]),
            connect: e("connect"),
            timeout: e("timeout"),
            tls: e("tls"),
            other: e("other"),
            retry_success: r("success"),
            retry_failure: r("failure"),
            retry_skipped: r("body_too_large"),
            tunnels_open: self.tunnels_open.with_label_values(&[upstream]),
            tunnel_to_upstream: self
                .tunnel_bytes
                .with_label_values(&[upstream, "to_upstream"]),
            tunnel_to_app: self.tunnel_bytes.with_label_values(&[upstream, "to_app"]),
        }
    }

    /// Per-credential handles.
    pub fn credential(&self, name: &str) -> CredentialMetrics {
        CredentialMetrics {
            refresh_duration: self.refresh_duration.with_label_values(&[name]),
            waiters: self.waiters.with_label_values(&[name]),
        }
    }

    /// Counts a refresh that lost its lease after sending the refresh token.
    pub fn lease_lost(&self, credential: &str) {
        self.lease_lost.with_label_values(&[credential]).inc();
    }

    /// Counts a refresh attempt whose outcome is unknown.
    pub fn in_doubt(&self, credential: &str) {
        self.in_doubt.with_label_values(&[credential]).inc();
    }

    /// One webhook delivery attempt of `event` ended with `result`.
    pub fn notification(&self, event: &str, result: &str) {
        self.notifications.with_label_values(&[event, result]).inc();
    }

    /// Drops a removed credential's gauges, so no stale state (and no alert on it)
    /// outlives it. Its counters stay, as counters do.
    pub fn forget_credential(&self, name: &str) {
        for g in [
            &self.expiry_timestamp,
            &self.refresh_expiry_timestamp,
            &self.generation,
            &self.ready,
            &self.last_success,
            &self.preset_sunset_timestamp,
        ] {
            let _ = g.remove_label_values(&[name]);
        }
        for state in STATES {
            let _ = self.state.remove_label_values(&[name, state]);
        }
    }

    /// The write counters of a credential's token sinks, success and failure; both
    /// series exist from the start, so an alert on failures has one.
    pub fn sink_writes(&self, credential: &str) -> SinkWrites {
        SinkWrites {
            success: self.sink_writes.with_label_values(&[credential, "success"]),
            failure: self.sink_writes.with_label_values(&[credential, "failure"]),
        }
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    /// Counts a store operation.
    pub fn store_op(&self, op: &str, ok: bool) {
        self.store_ops
            .with_label_values(&[op, if ok { "success" } else { "failure" }])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Upstream failure kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Tls,
    Other,
}

/// Pre-resolved metric handles of one upstream.
pub struct UpstreamMetrics {
    name: String,
    requests: IntCounterVec,
    /// One counter per status code, created on first use and then lock-free.
    by_code: Vec<OnceLock<IntCounter>>,
    pub duration: Histogram,
    connect: IntCounter,
    timeout: IntCounter,
    tls: IntCounter,
    other: IntCounter,
    pub retry_success: IntCounter,
    pub retry_failure: IntCounter,
    pub retry_skipped: IntCounter,
    pub tunnels_open: IntGauge,
    pub tunnel_to_upstream: IntCounter,
    pub tunnel_to_app: IntCounter,
}

impl UpstreamMetrics {
    /// Counts one answered request.
    pub fn count(&self, code: u16) {
        match self.by_code.get(code as usize) {
            Some(cell) => cell
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[&self.name, &code.to_string()])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[&self.name, "other"])
                .inc(),
        }
    }

    /// Requests answered so far, by status code (for `/status` and the status page).
    pub fn counts(&self) -> Vec<(u16, u64)> {
        self.by_code
            .iter()
            .enumerate()
            .filter_map(|(code, cell)| cell.get().map(|c| (code as u16, c.get())))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Counts one upstream failure.
    pub fn error(&self, kind: UpstreamErrorKind) {
        match kind {
            UpstreamErrorKind::Connect => &self.connect,
            UpstreamErrorKind::Timeout => &self.timeout,
            UpstreamErrorKind::Tls => &self.tls,
            UpstreamErrorKind::Other => &self.other,
        }
        .inc()
    }
}

/// `tokenrelay_sink_writes_total` of one credential.
#[derive(Clone)]
pub struct SinkWrites {
    pub success: IntCounter,
    pub failure: IntCounter,
}

/// Pre-resolved metric handles of one credential.
pub struct CredentialMetrics {
    pub refresh_duration: Histogram,
    pub waiters: IntCounter,
}
