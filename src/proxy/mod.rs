//! The forwarding path of one upstream. [`Upstream`] holds the resolved, immutable facts;
//! [`policy`] and [`outcome`] hold every rule (headers, target, credential, 401 retry,
//! errors, metrics and access log); two engines do only framing and I/O: [`fast`] for
//! plain-http upstreams, [`hyper`] for everything else (https, HTTP/2, and whatever the
//! fast path hands over).

pub mod fast;
pub mod hyper;
pub mod outcome;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::uri::Authority;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::UpstreamConfig;
use crate::credential::{ActiveToken, Credential};
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::target::Target;
use outcome::{ProxyError, Recorder};

/// Everything the forwarding path of one upstream needs, resolved once at startup.
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    /// The address actually listened on (differs from the config for port 0).
    pub listen: SocketAddr,
    pub credential: Arc<Credential>,
    /// Index of this upstream's header format in the credential's prebuilt values.
    format: usize,
    header_name: HeaderName,
    /// Where requests go.
    base: Base,
    recorder: Recorder,
    general: hyper::General,
    /// Set for plain-http upstreams: most requests take [`fast`]'s path.
    fast: Option<fast::FastPath>,
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

impl crate::server::ServeConnection for Upstream {
    /// Serves one app connection until it closes: the fast path where it applies, the
    /// general path for the rest of the connection from the first request it declines.
    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        local: SocketAddr,
        peer: SocketAddr,
        worker: usize,
        shutdown: CancellationToken,
    ) {
        match fast::serve(self.clone(), stream, local, worker, shutdown.clone()).await {
            fast::End::Closed => {}
            fast::End::Handoff { stream, read } => {
                hyper::serve(self, stream, read, local, peer, &shutdown).await
            }
        }
    }
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
            fast: fast::FastPath::for_upstream(&config, workers),
            base,
            recorder: Recorder {
                name: config.name.clone(),
                credential: credential.name.clone(),
                metrics: metrics.upstream(&config.name),
                access_log,
            },
            config,
            listen,
            credential,
        })
    }

    /// Where requests carrying `token` go: the fixed url's target, or the one the
    /// credential resolved from the token's answer fields when it published the token.
    fn target<'a>(&'a self, token: &'a ActiveToken) -> Result<&'a Target, ProxyError> {
        match &self.base {
            Base::Fixed(t) => Ok(t),
            Base::FromToken(index) => token.target(*index).map(|t| &**t).map_err(|e| {
                if e.is_missing() {
                    ProxyError::NoUpstreamUrl(e)
                } else {
                    ProxyError::BadUpstreamUrl(e)
                }
            }),
        }
    }

    /// The target of an upstream with a fixed url.
    fn fixed_target(&self) -> Option<&Target> {
        match &self.base {
            Base::Fixed(t) => Some(t),
            Base::FromToken(_) => None,
        }
    }

    /// Whether an absolute-form request for `a` is for this upstream (its current
    /// authority) or this listener.
    fn is_own_authority(&self, a: &Authority, local: SocketAddr) -> bool {
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
    fn query_param(&self) -> Option<policy::QueryParam<'_>> {
        self.config
            .token_query_param
            .as_deref()
            .map(|name| policy::QueryParam {
                name,
                ignore_case: self.config.token_query_param_ignore_case,
            })
    }

    /// Requests answered so far by this upstream's listener, by status code.
    pub fn request_counts(&self) -> Vec<(u16, u64)> {
        self.recorder.metrics.counts()
    }

    fn metrics(&self) -> &UpstreamMetrics {
        &self.recorder.metrics
    }

    /// The 401-retry decision, shared by both engines: after a 401 to `token`, a newer
    /// token to retry with, or `None` (the 401 goes to the app as it is).
    async fn token_after_401(&self, token: &ActiveToken) -> Option<Arc<ActiveToken>> {
        match self.credential.after_401(token.generation).await {
            Ok(t) => Some(t),
            Err(e) => {
                self.metrics().retry_failure.inc();
                warn!(upstream = %self.config.name, error = %e, "upstream answered 401 and no newer token is available; passing it through");
                None
            }
        }
    }

    /// Counts how a retry after a 401 went.
    fn retried(&self, status: u16) {
        if status == 401 {
            self.metrics().retry_failure.inc();
        } else {
            self.metrics().retry_success.inc();
        }
    }

    /// A 401 that cannot be retried goes to the app as it is; a refresh still starts in
    /// the background, so the next request finds a fresh token.
    fn pass_401_through(&self, generation: u64) {
        self.metrics().retry_skipped.inc();
        let cred = self.credential.clone();
        tokio::spawn(async move {
            let _ = cred.after_401(generation).await;
        });
    }
}

/// Where an upstream's requests go.
enum Base {
    /// A fixed url, resolved at startup.
    Fixed(Target),
    /// A url template (`{token.instance_url}/...`): resolved by the credential for each
    /// token it publishes, at this index of its templates. Such upstreams always use the
    /// general engine, as the authority may change with any token.
    FromToken(usize),
}

/// Both engines report each upstream answer here: any status but 401 proves the token
/// worked, so a later 401 to it means revocation (refreshed at once), not a permission
/// problem (spaced out).
pub(crate) fn note_acceptance(token: &ActiveToken, status: u16) {
    if status != 401 {
        token.mark_accepted();
    }
}
