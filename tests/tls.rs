//! TLS to upstreams and token endpoints: a private CA trusted through `ca_file` works
//! (with HTTP/2 negotiated by ALPN where the server offers it); without it, the server's
//! certificate is refused — a 502 of kind `tls` for upstreams, a failed refresh for token
//! endpoints — and nothing is sent. Certificates are made by the test (rcgen); a TLS
//! terminator in the test relays to the plain-HTTP demo servers. Loopback only.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokenrelay::demo::{ApiServer, AuthServer, AuthServerOptions};
use tokio::net::TcpListener;

/// A private CA (PEM) and a server certificate it signed for localhost and 127.0.0.1.
struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn pki(alpn: &[&[u8]]) -> Pki {
    tokenrelay::tls::install_crypto_provider();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Pki {
        ca_pem: ca.pem(),
        server,
    }
}

/// Terminates TLS on a loopback port and relays the bytes to `backend`; records the
/// ALPN protocol each connection negotiated.
async fn tls_front(
    config: rustls::ServerConfig,
    backend: SocketAddr,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let seen = alpn.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let proto = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).to_string());
                seen.lock()
                    .unwrap()
                    .push(proto.unwrap_or_else(|| "none".into()));
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, alpn)
}

/// One client_credentials credential and one upstream; a CA file for either side is
/// optional, and plain-http URLs (the non-TLS side of a test) are allowed explicitly.
fn yaml(
    token_url: &str,
    upstream_url: &str,
    cred_ca: Option<&Path>,
    up_ca: Option<&Path>,
) -> String {
    let extra = |url: &str, ca: Option<&Path>| {
        let mut e = ca
            .map(|p| format!(", ca_file: \"{}\"", p.display()))
            .unwrap_or_default();
        if url.starts_with("http://") {
            e.push_str(", allow_insecure_http: true");
        }
        e
    };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api: {{ grant: client_credentials, token_url: "{token_url}", client_id: demo-client, client_secret: demo-secret, token_timeout: 2s{} }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{upstream_url}", credential: api{} }}
"#,
        extra(token_url, cred_ca),
        extra(upstream_url, up_ca)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_is_trusted_and_h2_is_negotiated() {
    let pki = pki(&[b"h2", b"http/1.1"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (auth_tls, _) = tls_front(pki.server.clone(), auth.addr()).await;
    let (api_tls, api_alpn) = tls_front(pki.server.clone(), api.addr()).await;

    let relay = support::start(&yaml(
        &format!("https://127.0.0.1:{}/oauth2/token", auth_tls.port()),
        &format!("https://localhost:{}", api_tls.port()),
        Some(&ca_file),
        Some(&ca_file),
    ))
    .await;
    let resp = support::client()
        .get(format!("{}/echo?via=tls", relay.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["query"], "via=tls");
    assert!(api.stats().authorized >= 1);
    assert_eq!(
        api_alpn.lock().unwrap().first().map(String::as_str),
        Some("h2")
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_a_502_of_kind_tls() {
    let pki = pki(&[b"http/1.1"]);
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (api_tls, _) = tls_front(pki.server, api.addr()).await;
    let relay = support::start(&yaml(
        &auth.token_url(),
        &format!("https://localhost:{}", api_tls.port()),
        None,
        None,
    ))
    .await;
    let resp = support::client()
        .get(format!("{}/echo", relay.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    let error = body["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("tls") && error.contains("certificate"),
        "{body}"
    );
    assert_eq!(api.stats().requests, 0, "nothing reached the upstream");
    let metrics = support::client()
        .get(relay.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tokenrelay_upstream_errors_total{kind="tls",upstream="api"} 1"#),
        "{metrics}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_token_endpoint_gets_no_client_secret() {
    let pki = pki(&[b"http/1.1"]);
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (auth_tls, _) = tls_front(pki.server, auth.addr()).await;
    let relay = support::start(&yaml(
        &format!("https://127.0.0.1:{}/oauth2/token", auth_tls.port()),
        &api.url(),
        None,
        None,
    ))
    .await;
    let resp = support::client()
        .get(format!("{}/echo", relay.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        auth.stats().token_requests,
        0,
        "the handshake failed before any request"
    );
    let status = support::client()
        .get(relay.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let error = status["credentials"]["api"]["last_refresh"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(error.contains("certificate"), "{status}");
    assert!(!status.to_string().contains("demo-secret"));
    relay.stop().await;
}
