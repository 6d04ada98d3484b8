//! [`Upstream`]: the resolved, immutable facts of one upstream's forwarding path, built
//! once per config.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::uri::Authority;

use super::outcome::{ProxyError, Recorder};
use super::{fast, hyper, policy};
use crate::config::UpstreamConfig;
use crate::credential::{ActiveToken, Credential};
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::target::Target;

/// Everything the forwarding path of one upstream needs, resolved once at startup.
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    /// The address actually listened on (differs from the config for port 0).
    pub listen: SocketAddr,
    pub credential: Arc<Credential>,
    /// Index of this upstream's header format in the credential's prebuilt values.
    pub(super) format: usize,
    pub(super) header_name: HeaderName,
    /// Where requests go.
    base: Base,
    pub(super) recorder: Recorder,
    pub(super) general: hyper::General,
    /// Set for plain-http upstreams: most requests take [`fast`]'s path.
    pub(super) fast: Option<fast::FastPath>,
}

/// Why an upstream cannot be set up from its (validated) config.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("the current token cannot be sent in this header format: {0}")]
    Format(#[source] crate::secret::InvalidToken),
    #[error("upstream url: {0}")]
    Target(#[from] crate::target::TargetError),
    #[error("credential lacks this upstream's url template")]
    NoTemplate,
    #[error("header: {0}")]
    Header(#[from] http::header::InvalidHeaderName),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Upstream {
    /// Resolves an upstream's forwarding parameters and builds its clients.
    pub fn new(
        config: Arc<UpstreamConfig>,
        listen: SocketAddr,
        credential: Arc<Credential>,
        metrics: &Metrics,
        access_log: bool,
        workers: usize,
    ) -> Result<Upstream, UpstreamSetupError> {
        let format = credential
            .add_format(&config.format)
            .map_err(UpstreamSetupError::Format)?;
        let base = match &config.url {
            crate::config::UpstreamUrl::Fixed(url) => Base::Fixed(Target::of(url)?),
            crate::config::UpstreamUrl::Template(_) => Base::FromToken(
                credential
                    .template_index(&config.name)
                    .ok_or(UpstreamSetupError::NoTemplate)?,
            ),
        };
        Ok(Upstream {
            format,
            header_name: HeaderName::from_bytes(config.header.as_bytes())?,
            general: hyper::General::new(&config)?,
            fast: fast::FastPath::for_upstream(&config, workers)?,
            base,
            recorder: Recorder {
                name: config.name.clone(),
                credential: credential.name.clone(),
                metrics: metrics.upstream(&config.name),
                access_log,
                rates: Default::default(),
            },
            config,
            listen,
            credential,
        })
    }

    /// Where requests carrying `token` go: the fixed url's target, or the one the
    /// credential resolved from the token's answer fields when it published the token.
    pub(super) fn target<'a>(&'a self, token: &'a ActiveToken) -> Result<&'a Target, ProxyError> {
        match &self.base {
            Base::Fixed(t) => Ok(t),
            Base::FromToken(index) => resolved(token, *index).map(|t| &**t),
        }
    }

    /// A templated upstream's target for `token`, shared so it can be kept; `None` for
    /// a fixed url.
    pub(super) fn token_target<'a>(
        &self,
        token: &'a ActiveToken,
    ) -> Option<Result<&'a Arc<Target>, ProxyError>> {
        match &self.base {
            Base::Fixed(_) => None,
            Base::FromToken(index) => Some(resolved(token, *index)),
        }
    }

    /// The target of an upstream with a fixed url.
    pub(super) fn fixed_target(&self) -> Option<&Target> {
        match &self.base {
            Base::Fixed(t) => Some(t),
            Base::FromToken(_) => None,
        }
    }

    /// Whether an absolute-form request for `a` is for this upstream (its current
    /// authority) or this listener.
    pub(super) fn is_own_authority(&self, a: &Authority, local: SocketAddr) -> bool {
        match &self.base {
            Base::Fixed(t) => policy::is_own_authority(a, Some(&t.authority), local),
            Base::FromToken(_) => {
                let token = self.credential.current();
                let upstream = token.as_deref().and_then(|t| self.target(t).ok());
                policy::is_own_authority(a, upstream.map(|t| &t.authority), local)
            }
        }
    }

    /// The query parameter that carries the token, when the upstream has one.
    pub(super) fn query_param(&self) -> Option<policy::QueryParam<'_>> {
        self.config
            .token_query_param
            .as_deref()
            .map(|name| policy::QueryParam {
                name,
                ignore_case: self.config.token_query_param_ignore_case,
            })
    }

    /// Which engine serves this upstream's requests: `fast` (HTTP/1.1 to the upstream,
    /// WebSocket included; unusual requests still go to the general engine) or `general`
    /// (HTTP/2, or an egress proxy for a fixed url; WebSocket there too).
    pub fn engine(&self) -> &'static str {
        if self.fast.is_some() {
            "fast"
        } else {
            "general"
        }
    }

    /// Requests answered so far by this upstream's listener, by status code.
    pub fn request_counts(&self) -> Vec<(u16, u64)> {
        self.recorder.metrics.counts()
    }

    /// Requests per minute over the last hour, by status class.
    pub fn request_rates(&self) -> super::RequestRates {
        self.recorder.rates.snapshot()
    }

    pub(super) fn metrics(&self) -> &UpstreamMetrics {
        &self.recorder.metrics
    }
}

/// The target `token` resolved for the url template at `index`.
fn resolved(token: &ActiveToken, index: usize) -> Result<&Arc<Target>, ProxyError> {
    token.target(index).map_err(|e| {
        if e.is_missing() {
            ProxyError::NoUpstreamUrl(e)
        } else {
            ProxyError::BadUpstreamUrl(e)
        }
    })
}

/// Where an upstream's requests go.
enum Base {
    /// A fixed url, resolved at startup.
    Fixed(Target),
    /// A url template (`{token.instance_url}/...`): resolved by the credential for each
    /// token it publishes, at this index of its templates. The authority may change with
    /// any token: the fast path keeps a pool per origin and follows the token.
    FromToken(usize),
}
