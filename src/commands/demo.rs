//! `tokenrelay demo`: the whole thing working with nothing else installed. Starts a local
//! authorization server (short-lived access tokens, rotating single-use refresh tokens
//! with reuse detection), an API that checks the bearer token, and tokenrelay in front
//! of it on a file store; prints what to try. The servers are the ones the tests use.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use testkit::{ApiServer, AuthServer, AuthServerOptions};

use crate::config::Config;

/// Access token lifetime in the demo: short, so rotations show up in the log.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(20);

/// `preferred` if it is free, else any free loopback port.
fn pick(preferred: u16) -> SocketAddr {
    let want = SocketAddr::from(([127, 0, 0, 1], preferred));
    match std::net::TcpListener::bind(want) {
        Ok(_) => want,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

pub async fn run(state_dir: &Path) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: DEMO_TOKEN_TTL,
        ..AuthServerOptions::default()
    })
    .await
    .context("starting the demo authorization server")?;
    let api = ApiServer::start(Some(auth.validator()))
        .await
        .context("starting the demo API")?;
    let (proxy, admin) = (pick(8081), pick(9090));
    let yaml = format!(
        r#"
admin: {{ listen: "{admin}" }}
store: {{ type: file, path: "{state}" }}
credentials:
  demo:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
upstreams:
  demo:
    listen: "{proxy}"
    url: {api_url}
    credential: demo
    allow_insecure_http: true
"#,
        state = state_dir.display(),
        token_url = auth.token_url(),
        api_url = api.url(),
    );
    let config =
        Config::from_yaml(&yaml, &|_| None).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    // Every demo start is a fresh authorization, as if a user had just approved access.
    super::seed::store_new_grant(
        &config,
        "demo",
        Some(crate::secret::Secret::new(auth.new_grant())),
        None,
        (Default::default(), super::seed::IssuedAt::Now),
        Default::default(),
    )
    .await?;
    let stop = crate::shutdown::signal();
    crate::instance::run::run(config, stop, |bound| {
        let proxy = bound.upstreams["demo"];
        println!(
            "\ntokenrelay demo is running (Ctrl-C to stop).\n\
             \n  demo API (needs a bearer token):   {api}/api/v4/leads\
             \n  the same through tokenrelay:       curl -i http://{proxy}/api/v4/leads\
             \n  without tokenrelay (401):          curl -i {api}/api/v4/leads\
             \n  admin:                             http://{admin}/status  http://{admin}/metrics\
             \n\nAccess tokens live {ttl}s and every refresh rotates the single-use refresh token;\
             \nwatch the log for \"token refresh\" lines. State is kept in {state}.\n",
            api = api.url(),
            admin = bound.admin,
            ttl = DEMO_TOKEN_TTL.as_secs(),
            state = state_dir.display(),
        );
    })
    .await?;
    let stats = auth.stats();
    println!(
        "demo authorization server: {} refreshes, {} refresh token reuses detected",
        stats.refreshes, stats.refresh_reuse_detected
    );
    Ok(())
}
