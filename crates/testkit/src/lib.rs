//! In-process demo servers, used by `tokenrelay demo` and by the test suites.
//!
//! * [`AuthServer`] is an OAuth2 authorization server (RFC 6749 token endpoint plus a
//!   minimal authorization endpoint) that can rotate single-use refresh tokens with
//!   reuse detection, exactly the behaviour tokenrelay exists to survive. It also
//!   records what it was sent and can inject failures at runtime.
//! * [`ApiServer`] is an upstream API that checks the bearer token (through a
//!   validator, usually [`AuthServer::validator`]) and offers echo, streaming, status,
//!   redirect and hop-by-hop header routes for exercising the proxy.
//!
//! Both bind plain HTTP on loopback (port 0 by default), serve HTTP/1.1 and HTTP/2
//! (prior knowledge), run one task per connection on the current tokio runtime, and
//! never log a token or secret.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use testkit::{ApiServer, AuthServer, AuthServerOptions};
//!
//! let auth = AuthServer::start(AuthServerOptions::default()).await?;
//! let api = ApiServer::start(Some(auth.validator())).await?;
//! let refresh_token = auth.new_grant();
//! // point a credential at auth.token_url() and an upstream at api.url() ...
//! # let _ = refresh_token;
//! api.shutdown().await;
//! auth.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod api_server;
mod assertions;
pub mod auth_server;

pub use api_server::{pattern_byte, ApiServer, ApiStats, RecordedRequest};
pub use auth_server::{
    AuthServer, AuthServerOptions, AuthStats, DiscoveryDocs, FailureMode, LostAnswer,
    ProviderProfile, TokenRequestRecord, INTUIT_HARD_EXPIRES_IN,
};

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Decides whether a bearer token is acceptable; see [`AuthServer::validator`].
pub type TokenValidator = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Error type of response bodies (streamed bodies can fail mid-way).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body shared by both servers: either a small buffered body or a stream.
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How long [`Server::shutdown`] lets in-flight requests finish before cutting them off.
/// Short, because tests shut servers down to simulate outages and must not wait long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A buffered response body.
fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON response with the given status.
fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_bytes_response(status, value.to_string().into_bytes())
}

/// A response labelled JSON whatever `body` holds.
fn json_bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The accept loop and shutdown plumbing common to both demo servers.
///
/// Connection tasks live in a [`JoinSet`] owned by the accept task, so aborting that
/// one task (what `Drop` does) also tears down every open connection: a dropped demo
/// server really disappears, even for clients holding keep-alive connections.
struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves every connection accepted on `listener` with `handler`.
    ///
    /// Callers bind the listener themselves because handlers may need the bound
    /// address (port 0 resolved) before the first request arrives.
    fn start<F, Fut>(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: F,
    ) -> io::Result<Server>
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel();
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(accept_loop(listener, tls, handler, rx));
        Ok(Server {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Stops accepting, lets in-flight requests finish (bounded by
    /// [`DRAIN_TIMEOUT`]), then closes every connection.
    async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The leaf certificate a TLS client presented; a request extension on TLS listeners.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Vec<u8>);

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: F,
    mut stop: oneshot::Receiver<()>,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Tests measure latency; don't let Nagle hold back small writes.
                    let _ = stream.set_nodelay(true);
                    let handler = handler.clone();
                    let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
                    connections.spawn(async move {
                        let Some(acceptor) = tls else {
                            return serve(builder, watcher, TokioIo::new(stream), handler, None).await;
                        };
                        // A handshake the server's verifier refuses (say, no client
                        // certificate where one is required) ends here.
                        match acceptor.accept(stream).await {
                            Ok(tls) => {
                                let peer = tls.get_ref().1.peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| PeerCertificate(c.to_vec()));
                                serve(builder, watcher, TokioIo::new(tls), handler, peer).await
                            }
                            Err(err) => tracing::debug!(error = %err, "demo server: TLS handshake failed"),
                        }
                    });
                }
                Err(err) => {
                    // Typically EMFILE; back off briefly instead of spinning.
                    tracing::warn!(error = %err, "demo server: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    // Free the port right away so a "server is down" test sees connection refused.
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    connections.shutdown().await;
}

/// Serves one connection, adding the client's certificate to each request.
async fn serve<I, F, Fut>(
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: TokioIo<I>,
    handler: F,
    peer: Option<PeerCertificate>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection(io, service).into_owned();
    if let Err(err) = watcher.watch(conn).await {
        tracing::debug!(error = %err, "demo server: connection error");
    }
}

/// An HTTP client for the unit tests: follows no redirects, so tests see them.
#[cfg(test)]
fn test_client() -> reqwest::Client {
    // reqwest is built without a bundled TLS provider; it needs a process-wide one even
    // for plain-HTTP clients. Losing the race against another test is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}
