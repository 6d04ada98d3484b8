//! Credentials without shared secrets, each verified by the other side for real:
//! `private_key_jwt` and `client_secret_jwt` client assertions and `jwt_bearer` grants
//! (including a Google-style service-account file) are checked by the demo authorization
//! server with a JOSE library (signature, `aud`, `exp`, `jti` replay); client
//! certificates by TLS handshakes whose verifier requires one, on the token endpoint and
//! on an upstream; rotated certificate files are used without a restart. Bad keys are
//! config errors naming the key, and no key or assertion shows in config output, logs,
//! `/status` or metrics. Every key and certificate is generated here; loopback only.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use support::pki::{key, rsa_key, Key};
use support::DemoServers;
use testkit::{ApiServer, AuthServer, AuthServerOptions, TokenRequestRecord};
use tokenrelay::config::Config;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Replaces a file the way Kubernetes and cert-manager do: a new file renamed over it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn get(relay: &support::Running, upstream: &str) -> u16 {
    support::client()
        .get(format!("{}/echo", relay.url(upstream)))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn yaml(token_url: &str, api_url: &str, credential: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api:
    token_url: "{token_url}"
    allow_insecure_http: true
    token_timeout: 2s
{credential}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{api_url}", credential: api, allow_insecure_http: true }}
"#
    )
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Demo servers whose token endpoint accepts client assertions signed by `key`.
async fn demo_trusting_client_key(key: &Key) -> DemoServers {
    support::demo_servers(AuthServerOptions {
        client_assertion_keys: vec![key.public.clone()],
        ..Default::default()
    })
    .await
}

/// A config with one credential (`credential` are its YAML lines) at the demo servers.
fn demo_yaml(demo: &DemoServers, credential: &str) -> String {
    yaml(&demo.auth.token_url(), &demo.api.url(), &indent(credential))
}

/// tokenrelay running with one credential (`credential` are its YAML lines) at the demo servers.
async fn start_at(demo: &DemoServers, credential: &str) -> support::Running {
    support::start(&demo_yaml(demo, credential)).await
}

/// The YAML lines of a client_credentials credential signing its assertions with `key_file`.
fn private_key_jwt(key_file: &Path) -> String {
    format!(
        "grant: client_credentials\nclient_id: demo-client\nclient_auth: private_key_jwt\nclient_assertion_key_file: {}",
        key_file.display()
    )
}

/// The YAML lines naming a client certificate and its key.
fn cert_files(cert: &Path, key: &Path) -> String {
    format!(
        "client_cert_file: {}\nclient_key_file: {}",
        cert.display(),
        key.display()
    )
}

/// The same as extra entries of a YAML flow mapping (an upstream's).
fn flow_cert_files(cert: &Path, key: &Path) -> String {
    format!(
        ", client_cert_file: \"{}\", client_key_file: \"{}\"",
        cert.display(),
        key.display()
    )
}

/// The last token request the authorization server saw.
fn last_request(auth: &AuthServer) -> TokenRequestRecord {
    auth.requests_log().pop().expect("a token request")
}

/// Whether the relay's upstream `api` answers 200 at some point within `within`.
async fn serves_within(relay: &support::Running, within: Duration) -> bool {
    support::eventually(within, || async { get(relay, "api").await == 200 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_with_each_key_type_is_verified_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = vec![
        ("ES256", key(&rcgen::PKCS_ECDSA_P256_SHA256)),
        ("ES384", key(&rcgen::PKCS_ECDSA_P384_SHA384)),
        ("EdDSA", key(&rcgen::PKCS_ED25519)),
    ];
    if let Some(k) = rsa_key(dir.path()) {
        keys.push(("RS256", k));
    }
    for (alg, k) in keys {
        let demo = demo_trusting_client_key(&k).await;
        let key_file = write(dir.path(), &format!("{alg}.pem"), &k.private);
        let relay = start_at(
            &demo,
            &format!("{}\nclient_assertion_kid: k1", private_key_jwt(&key_file)),
        )
        .await;
        assert_eq!(get(&relay, "api").await, 200, "{alg}");
        let r = last_request(&demo.auth);
        assert_eq!(
            (r.status, r.client_auth.as_str()),
            (200, "assertion"),
            "{alg}: {r:?}"
        );
        assert_eq!(r.param("client_assertion_type"), Some(ASSERTION_TYPE));
        assert_eq!(r.param("client_id"), Some("demo-client"));
        assert_eq!(r.param("client_secret"), None);
        let a = &r.assertions[0];
        assert_eq!(a["alg"], alg);
        assert_eq!(a["kid"], "k1");
        let c = &a["claims"];
        assert_eq!(
            (c["iss"].as_str(), c["sub"].as_str()),
            (Some("demo-client"), Some("demo-client"))
        );
        assert_eq!(c["aud"], demo.auth.token_url());
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 60);
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_jwt_is_hs256_over_the_secret_and_the_audience_can_be_set() {
    let demo = support::demo_servers(AuthServerOptions {
        assertion_audience: Some("https://issuer.example".into()),
        ..Default::default()
    })
    .await;
    let relay = start_at(
        &demo,
        "grant: client_credentials\nclient_id: demo-client\nclient_secret: demo-secret\nclient_auth: client_secret_jwt\nclient_assertion_audience: https://issuer.example",
    )
    .await;
    assert_eq!(get(&relay, "api").await, 200);
    let r = last_request(&demo.auth);
    assert_eq!(r.client_auth, "assertion");
    assert_eq!(r.assertions[0]["alg"], "HS256");
    assert_eq!(r.assertions[0]["claims"]["aud"], "https://issuer.example");
    assert_eq!(
        r.param("client_secret"),
        None,
        "the secret itself is never sent"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_grant_authenticates_the_client_with_private_key_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ECDSA_P384_SHA384);
    let demo = demo_trusting_client_key(&k).await;
    let key_file = write(dir.path(), "k.pem", &k.private);
    let relay = start_at(
        &demo,
        &format!(
            "grant: password\nusername: demo-user\npassword: demo-password\nclient_id: demo-client\nclient_auth: private_key_jwt\nclient_assertion_key_file: {}",
            key_file.display()
        ),
    )
    .await;
    assert_eq!(get(&relay, "api").await, 200);
    let r = last_request(&demo.auth);
    assert_eq!(
        (r.status, r.grant_type.as_str(), r.client_auth.as_str()),
        (200, "password", "assertion"),
        "{r:?}"
    );
    assert_eq!(r.param("username"), Some("demo-user"));
    assert_eq!(r.param("client_secret"), None);
    let a = &r.assertions[0];
    assert_eq!(a["alg"], "ES384");
    assert_eq!(a["claims"]["iss"], "demo-client");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_key_signs_with_the_configured_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let Some(k) = rsa_key(dir.path()) else { return };
    let demo = support::demo_servers(AuthServerOptions {
        client_assertion_keys: vec![k.public.clone()],
        grant_assertion_keys: vec![k.public.clone()],
        ..Default::default()
    })
    .await;
    let key_file = write(dir.path(), "k.pem", &k.private);
    for (credential, alg, auth) in [
        (
            format!("{}\nclient_assertion_alg: PS256", private_key_jwt(&key_file)),
            "PS256",
            "assertion",
        ),
        (
            format!("grant: jwt_bearer\nassertion_issuer: svc@example\nassertion_key_file: {}\nassertion_alg: RS512", key_file.display()),
            "RS512",
            "none",
        ),
    ] {
        let relay = start_at(&demo, &credential).await;
        assert_eq!(get(&relay, "api").await, 200, "{alg}");
        let r = last_request(&demo.auth);
        assert_eq!((r.status, r.client_auth.as_str()), (200, auth), "{alg}: {r:?}");
        assert_eq!(r.assertions[0]["alg"], alg);
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_audience_is_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let registered = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let other = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let demo = demo_trusting_client_key(&registered).await;
    for (file, extra, why) in [
        (
            write(dir.path(), "other.pem", &other.private),
            "",
            "signature",
        ),
        (
            write(dir.path(), "right.pem", &registered.private),
            "\nclient_assertion_audience: https://elsewhere.example/token",
            "aud",
        ),
    ] {
        let relay = start_at(&demo, &format!("{}{extra}", private_key_jwt(&file))).await;
        assert_ne!(get(&relay, "api").await, 200);
        let r = last_request(&demo.auth);
        assert_eq!(
            (r.status, r.error.as_deref()),
            (401, Some("invalid_client")),
            "{why}"
        );
        relay.stop().await;
    }
    assert_eq!(demo.api.stats().authorized, 0);
}

/// Posts a form to the token endpoint directly.
async fn post(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = support::client().post(url).form(form).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_replayed_assertions_are_refused() {
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let auth = AuthServer::start(AuthServerOptions {
        client_assertion_keys: vec![k.public.clone()],
        grant_assertion_keys: vec![k.public.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(k.private.as_bytes()).unwrap();
    let sign = |iss: &str, exp: u64, jti: &str| {
        let claims = json!({"iss": iss, "sub": iss, "aud": auth.token_url(), "iat": now(), "exp": exp, "jti": jti});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &enc,
        )
        .unwrap()
    };
    let url = auth.token_url();
    let client = |a: &str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_assertion_type", ASSERTION_TYPE),
        ]
        .into_iter()
        .chain([("client_assertion", a)])
        .map(|(k, v)| (k, v.to_owned()))
        .collect::<Vec<_>>()
    };
    let form = |v: &Vec<(&'static str, String)>| {
        v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()
    };
    let send = |v: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let f = form(&v);
            let refs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(&url, &refs).await
        }
    };
    let expired = sign("demo-client", now() - 120, "j-expired");
    let (status, body) = send(client(&expired)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );

    let fresh = sign("demo-client", now() + 60, "j-1");
    assert_eq!(send(client(&fresh)).await.0, 200);
    let (status, body) = send(client(&fresh)).await;
    assert_eq!(status, 401, "a replayed jti is refused");
    assert!(
        body["error_description"].as_str().unwrap().contains("jti"),
        "{body}"
    );

    // The same checks guard the jwt-bearer grant.
    let grant = |a: &str| {
        vec![
            ("grant_type", JWT_BEARER.to_owned()),
            ("assertion", a.to_owned()),
        ]
    };
    let g = sign("svc@example", now() + 60, "g-1");
    assert_eq!(send(grant(&g)).await.0, 200);
    let (status, body) = send(grant(&g)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, _) = send(grant(&sign("svc@example", now() - 120, "g-2"))).await;
    assert_eq!(status, 400);
    auth.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_google_service_account_file_drives_jwt_bearer_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let Some(k) = rsa_key(dir.path()) else { return };
    let auth = AuthServer::start(AuthServerOptions {
        grant_assertion_keys: vec![k.public.clone()],
        access_ttl: Duration::from_secs(3),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let sa_file = write(
        dir.path(),
        "sa.json",
        &service_account(&k, "0123abcd", &auth.token_url()),
    );
    let state = dir.path().join("state");
    let relay = support::start(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{}" }}
credentials:
  google:
    grant: jwt_bearer
    service_account_file: "{}"
    subject: admin@demo.example
    scopes: [https://www.googleapis.com/auth/admin.directory.user.readonly, openid]
    allow_insecure_http: true
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: google, allow_insecure_http: true }}
"#,
        state.display(),
        sa_file.display(),
        api.url()
    ))
    .await;
    assert_eq!(get(&relay, "api").await, 200);
    let r = last_request(&auth);
    assert_eq!((r.status, r.grant_type.as_str()), (200, JWT_BEARER));
    assert_eq!(
        r.client_auth, "none",
        "Google takes no client authentication"
    );
    assert_eq!(r.param("scope"), None, "scopes travel in the assertion");
    let a = &r.assertions[0];
    assert_eq!(
        (a["alg"].as_str(), a["kid"].as_str()),
        (Some("RS256"), Some("0123abcd"))
    );
    let c = &a["claims"];
    assert_eq!(c["iss"], "relay@demo.iam.gserviceaccount.com");
    assert_eq!(c["sub"], "admin@demo.example");
    assert_eq!(c["aud"], auth.token_url());
    assert_eq!(
        c["scope"],
        "https://www.googleapis.com/auth/admin.directory.user.readonly openid"
    );
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        3600
    );
    // Minted again before expiry, each time with a new assertion; nothing stored.
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            auth.stats().jwt_bearer >= 3
        })
        .await,
        "re-minted before expiry: {:?}",
        auth.stats()
    );
    assert_eq!(auth.stats().invalid_grant, 0, "no assertion was replayed");
    assert_eq!(get(&relay, "api").await, 200);
    let stored: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "nothing is stored: {stored:?}");
    relay.stop().await;
}

/// A Google-style service-account key file for `key`.
fn service_account(key: &Key, key_id: &str, token_uri: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": key_id,
        "private_key": key.private,
        "client_email": "relay@demo.iam.gserviceaccount.com",
        "client_id": "1234",
        "token_uri": token_uri,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_file_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        key(&rcgen::PKCS_ECDSA_P256_SHA256),
        key(&rcgen::PKCS_ECDSA_P256_SHA256),
    );
    // The provider already has the new key; the old one was deleted.
    let demo = support::demo_servers(AuthServerOptions {
        grant_assertion_keys: vec![new.public.clone()],
        ..Default::default()
    })
    .await;
    let sa_file = write(
        dir.path(),
        "sa.json",
        &service_account(&old, "old-key", &demo.auth.token_url()),
    );
    let relay = start_at(
        &demo,
        &format!(
            "grant: jwt_bearer\nservice_account_file: {}\nscopes: [openid]",
            sa_file.display()
        ),
    )
    .await;
    assert_ne!(get(&relay, "api").await, 200);
    let refused = last_request(&demo.auth);
    assert_eq!(
        (refused.status, refused.error.as_deref()),
        (400, Some("invalid_grant"))
    );
    replace(
        &sa_file,
        &service_account(&new, "new-key", &demo.auth.token_url()),
    );
    assert!(
        serves_within(&relay, Duration::from_secs(45)).await,
        "the rotated service account is used"
    );
    let r = last_request(&demo.auth);
    assert_eq!((r.status, r.grant_type.as_str()), (200, JWT_BEARER));
    // The key id comes from the file as it is now.
    assert_eq!(r.assertions[0]["kid"], "new-key");
    assert_eq!(r.assertions[0]["claims"]["scope"], "openid");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_with_generic_keys_and_extra_claims() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ED25519);
    // The server wants its issuer as the audience, not the token URL (as Salesforce does).
    let demo = support::demo_servers(AuthServerOptions {
        grant_assertion_keys: vec![k.public.clone()],
        assertion_audience: Some("https://login.example.com".into()),
        ..Default::default()
    })
    .await;
    let key_file = write(dir.path(), "k.pem", &k.private);
    let relay = start_at(
        &demo,
        &format!(
            "grant: jwt_bearer\nassertion_issuer: 3MVG9-consumer-key\nassertion_subject: integration@example.com\nassertion_audience: https://login.example.com\nassertion_key_file: {}\nassertion_alg: EdDSA\nassertion_kid: sf-2026\nassertion_lifetime: 3m\nassertion_claims: {{ tenant: acme, level: 2 }}\nscopes: [api]",
            key_file.display()
        ),
    )
    .await;
    assert_eq!(get(&relay, "api").await, 200);
    let r = last_request(&demo.auth);
    assert_eq!(
        (r.status, r.grant_type.as_str()),
        (200, JWT_BEARER),
        "{r:?}"
    );
    assert_eq!(r.param("scope"), Some("api"));
    assert_eq!(r.assertions[0]["kid"], "sf-2026");
    let c = &r.assertions[0]["claims"];
    assert_eq!(c["aud"], "https://login.example.com");
    assert_eq!(c["iss"], "3MVG9-consumer-key");
    assert_eq!(c["sub"], "integration@example.com");
    assert_eq!(
        (c["tenant"].as_str(), c["level"].as_i64()),
        (Some("acme"), Some(2))
    );
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 180);
    assert_eq!(r.assertions[0]["alg"], "EdDSA");
    relay.stop().await;
}

/// `Config::from_yaml` of one credential (`body` are its YAML lines); the error text.
fn config_error(body: &str) -> String {
    let y = yaml(
        "https://auth.example/token",
        "https://api.example",
        &indent(body),
    );
    match Config::from_yaml(&y, &|_| None) {
        Ok(_) => panic!("accepted:\n{body}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_keys_and_certificates_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ec = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let ec_file = write(dir.path(), "ec.pem", &ec.private);
    let enc = write(
        dir.path(),
        "enc.pem",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    let pkjwt = "grant: client_credentials\nclient_id: c\nclient_auth: private_key_jwt\n";
    let e = config_error(&format!(
        "{pkjwt}client_assertion_key_file: {}",
        enc.display()
    ));
    assert!(
        e.contains("credentials.api.client_assertion_key_file: ") && e.contains("encrypted"),
        "{e}"
    );
    let e = config_error(&format!(
        "{pkjwt}client_assertion_key_file: {}/missing.pem",
        dir.path().display()
    ));
    assert!(
        e.contains("credentials.api.client_assertion_key_file: cannot read"),
        "{e}"
    );
    let e = config_error(&format!(
        "{pkjwt}client_assertion_key_file: {}\nclient_assertion_alg: RS256",
        ec_file.display()
    ));
    assert!(
        e.contains("credentials.api.client_assertion_key_file: ")
            && e.contains("EC P-256 key, which cannot sign RS256"),
        "{e}"
    );
    let e = config_error(&format!(
        "{pkjwt}client_assertion_key_file: {}\nclient_assertion_alg: HS999",
        ec_file.display()
    ));
    assert!(
        e.contains("credentials.api.client_assertion_alg: \"HS999\" is not supported"),
        "{e}"
    );
    let e = config_error(pkjwt);
    assert!(
        e.contains("credentials.api.client_assertion_key_file: is required"),
        "{e}"
    );

    for (content, why) in [
        ("{not json", "not a JSON object"),
        (
            r#"{"type":"service_account","client_email":"a@b","token_uri":"https://t.example/token"}"#,
            "\"private_key\" is missing",
        ),
        (
            r#"{"type":"authorized_user"}"#,
            "expected \"service_account\"",
        ),
    ] {
        let sa = write(dir.path(), "sa.json", content);
        let e = config_error(&format!(
            "grant: jwt_bearer\nservice_account_file: {}",
            sa.display()
        ));
        assert!(
            e.contains("credentials.api.service_account_file: ") && e.contains(why),
            "{e}"
        );
    }

    let e = config_error("grant: jwt_bearer\nassertion_issuer: x");
    assert!(e.contains("credentials.api.assertion_key_file: assertion_key_file or service_account_file is required"), "{e}");
    let e = config_error(&format!("grant: jwt_bearer\nassertion_issuer: x\nassertion_key_file: {}\nassertion_claims: {{ exp: 1 }}", ec_file.display()));
    assert!(
        e.contains("credentials.api.assertion_claims.exp: is set by tokenrelay"),
        "{e}"
    );

    // Client certificates: expired, key not matching, only one of the pair.
    let ca = Ca::new();
    let expired = ca.client_cert("expired", Some((2020, 1, 1)));
    let (cert, key_file) = expired.write(dir.path(), "expired");
    let tls = "grant: client_credentials\nclient_id: c\nclient_auth: tls_client_auth\n";
    let e = config_error(&format!("{tls}{}", cert_files(&cert, &key_file)));
    assert!(
        e.contains("credentials.api.client_cert_file: the certificate in ")
            && e.contains("expired at 2020-01-01"),
        "{e}"
    );
    let good = ca.client_cert("good", None);
    let (cert, _) = good.write(dir.path(), "good");
    let e = config_error(&format!("{tls}{}", cert_files(&cert, &ec_file)));
    assert!(
        e.contains("credentials.api.client_cert_file: ")
            && e.contains("does not belong to the certificate"),
        "{e}"
    );
    let e = config_error(&format!("{tls}client_cert_file: {}", cert.display()));
    assert!(
        e.contains("credentials.api.client_key_file: is required with client_cert_file"),
        "{e}"
    );
    let e = config_error(tls);
    assert!(
        e.contains(
            "credentials.api.client_cert_file: client_cert_file and client_key_file are required"
        ),
        "{e}"
    );
}

/// `pem` encrypted with a passphrase by openssl: PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`),
/// or `traditional` (the legacy `Proc-Type: 4,ENCRYPTED` headers); `None` skips.
fn encrypted_key(dir: &Path, pem: &str, traditional: bool) -> Option<String> {
    let plain = write(dir, "plain.pem", pem);
    let mut cmd = support::tools::command("openssl")?;
    cmd.args(["pkey", "-aes256", "-passout", "pass:test-passphrase", "-in"])
        .arg(&plain);
    if traditional {
        cmd.arg("-traditional");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "openssl pkey failed");
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn unusable_client_auth_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // client_secret_jwt signs with HS256 over the secret, nothing else.
    for alg in ["HS512", "RS256"] {
        let e = config_error(&format!(
            "grant: client_credentials\nclient_id: c\nclient_secret: s\nclient_auth: client_secret_jwt\nclient_assertion_alg: {alg}"
        ));
        assert!(
            e.contains(
                "credentials.api.client_assertion_alg: client_secret_jwt signs with HS256 only"
            ),
            "{alg}: {e}"
        );
    }

    // A client certificate for an upstream reached over plain http could never be shown.
    let issued = Ca::new().client_cert("relay", None);
    let (cert, key_file) = issued.write(dir.path(), "up");
    let upstream = |url: &str| {
        format!(
            r#"
credentials:
  api: {{ grant: client_credentials, token_url: "https://auth.example/token", client_id: c, client_secret: s }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{url}", credential: api, allow_insecure_http: true{} }}
"#,
            flow_cert_files(&cert, &key_file)
        )
    };
    let e = Config::from_yaml(&upstream("http://api.example"), &|_| None)
        .expect_err("a client certificate on an http:// upstream is refused")
        .to_string();
    assert!(
        e.contains("upstreams.api.client_cert_file: a client certificate needs an https:// url"),
        "{e}"
    );
    Config::from_yaml(&upstream("https://api.example"), &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));

    // An encrypted client key, in either PEM form, is refused by its key.
    for (traditional, marker) in [
        (false, "-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        (true, "Proc-Type: 4,ENCRYPTED"),
    ] {
        let Some(pem) = encrypted_key(dir.path(), &issued.key_pem, traditional) else {
            return;
        };
        assert!(pem.contains(marker), "{pem}");
        let enc = write(dir.path(), "enc.key", &pem);
        for (field, credential) in [
            (
                "client_key_file",
                format!(
                    "grant: client_credentials\nclient_id: c\nclient_auth: tls_client_auth\n{}",
                    cert_files(&cert, &enc)
                ),
            ),
            (
                "client_assertion_key_file",
                format!(
                    "grant: client_credentials\nclient_id: c\nclient_auth: private_key_jwt\nclient_assertion_key_file: {}",
                    enc.display()
                ),
            ),
        ] {
            let e = config_error(&credential);
            assert!(
                e.contains(&format!(
                    "credentials.api.{field}: {} is an encrypted private key",
                    enc.display()
                )),
                "{marker}: {e}"
            );
        }
    }
}

/// `Config::from_yaml` of one credential accepts it.
fn config_ok(body: &str) -> Config {
    let y = yaml(
        "https://auth.example/token",
        "https://api.example",
        &indent(body),
    );
    Config::from_yaml(&y, &|_| None).unwrap_or_else(|e| panic!("refused:\n{body}\n{e}"))
}

#[test]
fn jwt_bearer_that_authenticates_the_client_needs_a_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let key_file = write(dir.path(), "k.pem", &k.private);
    let (cert, cert_key) = Ca::new()
        .client_cert("demo-client", None)
        .write(dir.path(), "client");
    let grant = format!(
        "grant: jwt_bearer\nassertion_issuer: svc\nassertion_key_file: {}\n",
        key_file.display()
    );
    // The assertion grant alone identifies nobody else: no client_id needed.
    let c = config_ok(&grant);
    assert_eq!(c.credentials["api"].client_id, None);
    // Authenticating the client as well needs the client's id: the client assertion's
    // iss and sub, the id that goes with a certificate or a secret.
    for (auth, why) in [
        (
            format!(
                "client_auth: private_key_jwt\nclient_assertion_key_file: {}",
                key_file.display()
            ),
            "client_auth private_key_jwt",
        ),
        (
            "client_auth: client_secret_jwt\nclient_secret: s".to_string(),
            "client_auth client_secret_jwt",
        ),
        (
            format!(
                "client_auth: tls_client_auth\n{}",
                cert_files(&cert, &cert_key)
            ),
            "client_auth tls_client_auth",
        ),
        (
            format!(
                "client_auth: self_signed_tls_client_auth\n{}",
                cert_files(&cert, &cert_key)
            ),
            "client_auth self_signed_tls_client_auth",
        ),
        (
            "client_auth: basic\nclient_secret: s".to_string(),
            "client_auth basic",
        ),
        ("client_secret: s".to_string(), "client_secret"),
    ] {
        let e = config_error(&format!("{grant}{auth}"));
        assert!(
            e.contains("credentials.api.client_id: is required for grant jwt_bearer with ")
                && e.contains(why),
            "{auth}: {e}"
        );
        let c = config_ok(&format!("{grant}{auth}\nclient_id: demo-client"));
        assert_eq!(
            c.credentials["api"].client_id.as_deref(),
            Some("demo-client")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_assertions_never_show_and_check_prints_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let demo = demo_trusting_client_key(&k).await;
    let key_file = write(dir.path(), "k.pem", &k.private);
    let ca = Ca::new();
    // Expires in 5 days: `check` warns.
    let soon = ymd(SystemTime::now() + Duration::from_secs(5 * 86400));
    let (cert, cert_key) = ca.client_cert("soon", Some(soon)).write(dir.path(), "soon");
    let config_text = demo_yaml(
        &demo,
        &format!(
            "{}\n{}",
            private_key_jwt(&key_file),
            cert_files(&cert, &cert_key)
        ),
    );
    let out = check(dir.path(), &config_text);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stderr}");
    let fp = tokenrelay::fingerprint(&KeyPair::from_pem(&k.private).unwrap().public_key_der());
    assert!(
        stdout.contains(&key_file.display().to_string())
            && stdout.contains("ES256")
            && stdout.contains(&fp),
        "{stdout}"
    );
    assert!(
        stderr.contains("warning: credentials.api.client_cert_file: the certificate in")
            && stderr.contains("(in 4 days)"),
        "{stderr}"
    );

    let relay = support::start(&config_text).await;
    assert_eq!(get(&relay, "api").await, 200);
    let secret_parts: Vec<String> = [&k.private, &std::fs::read_to_string(&cert_key).unwrap()]
        .iter()
        .flat_map(|pem| {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let config = Config::from_yaml(&config_text, &|_| None).unwrap();
    let st = support::status_json(&relay.admin_url("")).await;
    let cc = &st["credentials"]["api"]["client_certificate"];
    assert_eq!(cc["cert_file"], cert.display().to_string(), "{st}");
    assert!(
        cc["not_after"].as_str().unwrap().ends_with("T00:00:00Z"),
        "{cc}"
    );
    assert!(
        cc["expires_in_seconds"].as_u64().unwrap() < 5 * 86400,
        "{cc}"
    );
    let status = support::get_text(&relay.admin_url("/status")).await;
    let metrics = support::metrics_text(&relay.admin_url("")).await;
    assert_eq!(
        cert_expiry_metric(&metrics, "credential"),
        unix_seconds(&cc["not_after"])
    );
    for (what, text) in [
        ("check", format!("{stdout}{stderr}")),
        ("Debug", format!("{config:?}")),
        ("/status", status),
        ("/metrics", metrics),
    ] {
        for part in &secret_parts {
            assert!(!text.contains(part.as_str()), "{what} shows key material");
        }
        // A JWT's header starts `{"` (`eyJ` in base64url).
        let jwt = text.match_indices("eyJ").any(|(i, _)| {
            text[i..]
                .split(['.', '"', ' '])
                .next()
                .is_some_and(|t| t.len() > 20)
        });
        assert!(
            !jwt,
            "{what} shows a JWT: {}",
            &text[text.find("eyJ").unwrap_or(0)..][..40.min(text.len())]
        );
    }
    relay.stop().await;
}

/// `tokenrelay check` of `config`, written to config.yaml in `dir`.
fn check(dir: &Path, config: &str) -> std::process::Output {
    let path = write(dir, "config.yaml", config);
    support::run_cli(&["check", "--config", path.to_str().unwrap()])
}

/// The client-certificate expiry metric of the `scope` (credential or upstream) `api`.
fn cert_expiry_metric(metrics: &str, scope: &str) -> u64 {
    support::metric(
        metrics,
        "tokenrelay_client_certificate_expiry_timestamp_seconds",
        &[("scope", scope), ("name", "api")],
    ) as u64
}

/// An RFC 3339 time as /status shows it, in seconds since the Unix epoch.
fn unix_seconds(t: &Value) -> u64 {
    let t = humantime::parse_rfc3339(t.as_str().unwrap()).unwrap();
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The UTC date of `t`, as (year, month, day).
fn ymd(t: SystemTime) -> (i32, u8, u8) {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    (
        s[..4].parse().unwrap(),
        s[5..7].parse().unwrap(),
        s[8..10].parse().unwrap(),
    )
}

/// A private CA and the certificates it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Issued {
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write(dir, &format!("{name}.crt"), &self.cert_pem),
            write(dir, &format!("{name}.key"), &self.key_pem),
        )
    }
}

impl Ca {
    fn new() -> Ca {
        tokenrelay::install_crypto_provider();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn sign(&self, names: Vec<String>, not_after: Option<(i32, u8, u8)>) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    fn client_cert(&self, name: &str, not_after: Option<(i32, u8, u8)>) -> Issued {
        self.sign(vec![name.to_string()], not_after)
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from(self.cert.der().to_vec()))
            .unwrap();
        Arc::new(r)
    }

    /// A server config for localhost/127.0.0.1 whose verifier requires a client
    /// certificate issued by `clients`.
    fn server_requiring_client_certs(
        &self,
        clients: Arc<rustls::RootCertStore>,
    ) -> rustls::ServerConfig {
        let server = self.sign(vec!["localhost".into(), "127.0.0.1".into()], None);
        let verifier = rustls::server::WebPkiClientVerifier::builder(clients)
            .build()
            .unwrap();
        rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.der)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der)),
            )
            .unwrap()
    }
}

/// A credential using `client_auth` at the mutual-TLS token endpoint `auth`.
fn mtls_yaml(auth: &AuthServer, api: &ApiServer, ca: &Path, credential: &str) -> String {
    yaml(
        &auth.token_url(),
        &api.url(),
        &indent(&format!(
            "grant: client_credentials\nclient_id: demo-client\nca_file: {}\n{credential}",
            ca.display()
        )),
    )
}

/// A TLS token endpoint (certified by `server_ca`) that requires a client certificate from `clients`.
async fn mtls_token_endpoint(server_ca: &Ca, clients: Arc<rustls::RootCertStore>) -> AuthServer {
    AuthServer::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        AuthServerOptions {
            tls_client_auth: true,
            ..Default::default()
        },
        server_ca.server_requiring_client_certs(clients),
    )
    .await
    .unwrap()
}

/// A TLS upstream taking `auth`'s tokens that requires a client certificate from `clients`.
async fn mtls_upstream(
    auth: &AuthServer,
    server_ca: &Ca,
    clients: Arc<rustls::RootCertStore>,
) -> ApiServer {
    ApiServer::start_tls(
        Some(auth.validator()),
        server_ca.server_requiring_client_certs(clients),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_presents_the_certificate_the_token_endpoint_requires() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, stranger_ca) = (Ca::new(), Ca::new(), Ca::new());
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem());
    let auth = mtls_token_endpoint(&server_ca, client_ca.roots()).await;
    assert!(auth.token_url().starts_with("https://"));
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (cert, key) = client_ca
        .client_cert("demo-client", None)
        .write(dir.path(), "client");
    let config = |credential: &str| mtls_yaml(&auth, &api, &ca_file, credential);
    let tls_client_auth = |cert: &Path, key: &Path| {
        config(&format!(
            "client_auth: tls_client_auth\n{}",
            cert_files(cert, key)
        ))
    };
    let relay = support::start(&tls_client_auth(&cert, &key)).await;
    assert_eq!(get(&relay, "api").await, 200);
    let r = last_request(&auth);
    assert_eq!((r.status, r.client_auth.as_str()), (200, "tls"), "{r:?}");
    assert_eq!(r.param("client_id"), Some("demo-client"));
    assert_eq!(r.param("client_secret"), None);
    relay.stop().await;

    // No certificate: the handshake is refused before any HTTP request is made.
    let before = auth.stats().token_requests;
    let relay = support::start(&config("client_secret: demo-secret")).await;
    assert_ne!(get(&relay, "api").await, 200);
    assert_eq!(
        auth.stats().token_requests,
        before,
        "no request got through"
    );
    relay.stop().await;

    // A certificate the server does not trust fails too, until the files are rotated to
    // a trusted one: picked up without a restart.
    let (cert, key) = stranger_ca
        .client_cert("demo-client", None)
        .write(dir.path(), "rotating");
    let relay = support::start(&tls_client_auth(&cert, &key)).await;
    assert_ne!(get(&relay, "api").await, 200);
    assert_eq!(auth.stats().token_requests, before);
    let trusted = client_ca.client_cert("demo-client", None);
    replace(&key, &trusted.key_pem);
    replace(&cert, &trusted.cert_pem);
    assert!(
        serves_within(&relay, Duration::from_secs(45)).await,
        "the rotated certificate is used"
    );
    relay.stop().await;
}

/// The SberBusiness API token endpoint requires mutual TLS whatever the client
/// authentication: the `sber_business` preset refreshes with the secret in the form body,
/// its request id header, and the configured client certificate, which a server accepting
/// only certificates of the partner CA verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sber_business_refreshes_over_mutual_tls_with_the_secret_in_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Ca::new(), Ca::new());
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem());
    let auth = AuthServer::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        AuthServerOptions::default(),
        server_ca.server_requiring_client_certs(client_ca.roots()),
    )
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (cert, key) = client_ca
        .client_cert("partner", None)
        .write(dir.path(), "partner");
    let credential = format!(
        "provider: sber_business\nclient_id: demo-client\nclient_secret: demo-secret\nredirect_uri: https://example.com/cb\nca_file: {}\n{}",
        ca_file.display(),
        cert_files(&cert, &key)
    );
    let store = format!(
        "store: {{ type: file, path: \"{}\" }}\ncredentials:\n",
        dir.path().join("state").display()
    );
    let yaml = yaml(&auth.token_url(), &api.url(), &indent(&credential)).replacen(
        "credentials:\n",
        &store,
        1,
    );
    support::seed_refresh_token(&yaml, "api", &auth.new_grant()).await;
    let relay = support::start(&yaml).await;
    assert_eq!(get(&relay, "api").await, 200);
    relay.stop().await;
    let r = last_request(&auth);
    assert_eq!(
        (r.status, r.grant_type.as_str(), r.client_auth.as_str()),
        (200, "refresh_token", "body"),
        "{r:?}"
    );
    assert_eq!(r.header("rquid").map(str::len), Some(32), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_certificate_is_never_shown_to_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Ca::new(), Ca::new());
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem());
    let auth = mtls_token_endpoint(&server_ca, client_ca.roots()).await;
    // The upstream trusts the very CA that issued the token endpoint's certificate: had
    // the relay presented that certificate here too, the upstream would accept it.
    let api = mtls_upstream(&auth, &server_ca, client_ca.roots()).await;
    let (cert, key) = client_ca
        .client_cert("demo-client", None)
        .write(dir.path(), "client");
    let config = |upstream_cert: &str| {
        format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api: {{ grant: client_credentials, token_url: "{}", client_id: demo-client, client_auth: tls_client_auth, client_cert_file: "{cert}", client_key_file: "{key}", ca_file: "{ca}" }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, ca_file: "{ca}"{upstream_cert} }}
"#,
            auth.token_url(),
            api.url(),
            cert = cert.display(),
            key = key.display(),
            ca = ca_file.display(),
        )
    };
    let relay = support::start(&config("")).await;
    assert_eq!(
        get(&relay, "api").await,
        502,
        "the upstream refuses a handshake without a client certificate"
    );
    let r = last_request(&auth);
    assert_eq!(
        (r.status, r.client_auth.as_str()),
        (200, "tls"),
        "the token endpoint accepted the certificate: {r:?}"
    );
    assert_eq!(api.stats().authorized, 0);
    let st = support::status_json(&relay.admin_url("")).await;
    assert_eq!(
        st["upstreams"]["api"]["client_certificate"],
        Value::Null,
        "{st}"
    );
    relay.stop().await;

    // Control: configured for the upstream as well, the same certificate is accepted there.
    let relay = support::start(&config(&flow_cert_files(&cert, &key))).await;
    assert_eq!(get(&relay, "api").await, 200);
    assert!(api.stats().authorized >= 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_tls_client_auth_presents_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new();
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem());
    let key = KeyPair::generate().unwrap();
    let own = CertificateParams::new(vec!["demo-client".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    // The server registered exactly this certificate (RFC 8705 §2.2).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(own.der().to_vec())).unwrap();
    let auth = mtls_token_endpoint(&server_ca, Arc::new(roots)).await;
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let cert = write(dir.path(), "own.crt", &own.pem());
    let key_file = write(dir.path(), "own.key", &key.serialize_pem());
    let relay = support::start(&mtls_yaml(
        &auth,
        &api,
        &ca_file,
        &format!(
            "client_auth: self_signed_tls_client_auth\n{}",
            cert_files(&cert, &key_file)
        ),
    ))
    .await;
    assert_eq!(get(&relay, "api").await, 200);
    assert_eq!(last_request(&auth).client_auth, "tls");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_requiring_a_client_certificate_gets_the_rotated_one() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, stranger_ca) = (Ca::new(), Ca::new(), Ca::new());
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem());
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = mtls_upstream(&auth, &server_ca, client_ca.roots()).await;
    let config = |cert: Option<(&Path, &Path)>| {
        let extra = cert.map(|(c, k)| flow_cert_files(c, k)).unwrap_or_default();
        format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api: {{ grant: client_credentials, token_url: "{}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, ca_file: "{}"{extra} }}
"#,
            auth.token_url(),
            api.url(),
            ca_file.display()
        )
    };
    // Without a certificate the upstream refuses the handshake: a 502, nothing served.
    let relay = support::start(&config(None)).await;
    assert_eq!(get(&relay, "api").await, 502);
    relay.stop().await;

    let (cert, key) = stranger_ca
        .client_cert("relay", None)
        .write(dir.path(), "up");
    let relay = support::start(&config(Some((&cert, &key)))).await;
    assert_eq!(
        get(&relay, "api").await,
        502,
        "an untrusted certificate is refused"
    );
    assert_eq!(api.stats().authorized, 0);
    // The replacement expires in 5 days.
    let soon = ymd(SystemTime::now() + Duration::from_secs(5 * 86400));
    let trusted = client_ca.client_cert("relay", Some(soon));
    replace(&cert, &trusted.cert_pem);
    replace(&key, &trusted.key_pem);
    assert!(
        serves_within(&relay, Duration::from_secs(30)).await,
        "the rotated certificate is used without a restart"
    );
    assert!(api.stats().authorized >= 1);

    // /status and the expiry metric show the certificate as the file is now.
    let st = support::status_json(&relay.admin_url("")).await;
    let cc = &st["upstreams"]["api"]["client_certificate"];
    assert_eq!(cc["cert_file"], cert.display().to_string(), "{st}");
    let fp = tokenrelay::fingerprint(
        &KeyPair::from_pem(&trusted.key_pem)
            .unwrap()
            .public_key_der(),
    );
    assert_eq!(cc["fingerprint"], fp, "{cc}");
    assert_eq!(
        cc["not_after"],
        format!("{:04}-{:02}-{:02}T00:00:00Z", soon.0, soon.1, soon.2)
    );
    assert!(
        cc["expires_in_seconds"].as_u64().unwrap() < 5 * 86400,
        "{cc}"
    );
    assert_eq!(
        st["credentials"]["api"]["client_certificate"],
        Value::Null,
        "the upstream's certificate is not the credential's"
    );
    let metrics = support::metrics_text(&relay.admin_url("")).await;
    assert_eq!(
        cert_expiry_metric(&metrics, "upstream"),
        unix_seconds(&cc["not_after"])
    );
    relay.stop().await;

    // `check` warns about an upstream certificate that expires soon.
    let out = check(dir.path(), &config(Some((&cert, &key))));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: upstreams.api.client_cert_file: the certificate in {} expires at",
            cert.display()
        )) && stderr.contains("(in 4 days)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_debug_level_never_show_keys_or_assertions() {
    let dir = tempfile::tempdir().unwrap();
    let (good, wrong) = (key(&rcgen::PKCS_ED25519), key(&rcgen::PKCS_ED25519));
    let demo = support::demo_servers(AuthServerOptions {
        client_assertion_keys: vec![good.public.clone()],
        grant_assertion_keys: vec![good.public.clone()],
        ..Default::default()
    })
    .await;
    let good_file = write(dir.path(), "good.pem", &good.private);
    let wrong_file = write(dir.path(), "wrong.pem", &wrong.private);
    let ports = support::free_ports(3);
    let (admin, up1, up2) = (ports[0], ports[1], ports[2]);
    let config = write(
        dir.path(),
        "config.yaml",
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
credentials:
  good: {{ grant: client_credentials, token_url: "{t}", client_id: demo-client, client_auth: private_key_jwt, client_assertion_key_file: "{g}", allow_insecure_http: true }}
  wrong: {{ grant: jwt_bearer, token_url: "{t}", assertion_issuer: svc, assertion_key_file: "{w}", allow_insecure_http: true, token_timeout: 1s }}
upstreams:
  good: {{ listen: "127.0.0.1:{up1}", url: "{a}", credential: good, allow_insecure_http: true }}
  wrong: {{ listen: "127.0.0.1:{up2}", url: "{a}", credential: wrong, allow_insecure_http: true }}
"#,
            t = demo.auth.token_url(),
            a = demo.api.url(),
            g = good_file.display(),
            w = wrong_file.display(),
        ),
    );
    let log = dir.path().join("relay.log");
    let mut child = support::ChildProc::spawn(&config, &log, &[("RUST_LOG", "debug")]);
    assert!(
        support::wait_ready(
            &format!("http://127.0.0.1:{admin}/healthz"),
            Duration::from_secs(30)
        )
        .await
    );
    let c = support::client();
    let echo = |port: u16| c.get(format!("http://127.0.0.1:{port}/echo")).send();
    let ok = echo(up1).await.unwrap();
    assert_eq!(ok.status(), 200);
    let refused = echo(up2).await.unwrap();
    assert_ne!(refused.status(), 200);
    child.terminate();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("invalid_grant"),
        "the refusal is logged:\n{text}"
    );
    for pem in [&good.private, &wrong.private] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "key material in the log");
        }
    }
    assert!(!text.contains("eyJ"), "an assertion in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorize_code_exchange_and_refreshes_use_private_key_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let demo = demo_trusting_client_key(&k).await;
    let key_file = write(dir.path(), "k.pem", &k.private);
    let redirect = "https://example.com/oauth/callback";
    let text = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm:
    grant: refresh_token
    token_url: "{token}"
    authorize_url: "{authorize}"
    client_id: demo-client
    client_auth: private_key_jwt
    client_assertion_key_file: "{key}"
    redirect_uri: "{redirect}"
    allow_insecure_http: true
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "{api}", credential: crm, allow_insecure_http: true }}
"#,
        state = dir.path().join("state").display(),
        token = demo.auth.token_url(),
        authorize = demo.auth.authorize_url(),
        key = key_file.display(),
        api = demo.api.url(),
    );
    let config = write(dir.path(), "config.yaml", &text);
    let code = demo.auth.new_authorization_code(redirect);
    let cfg = config.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        support::run_cli(&[
            "authorize",
            "--config",
            &cfg,
            "--credential",
            "crm",
            "--code",
            &code,
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exchange = last_request(&demo.auth);
    assert_eq!(
        (exchange.grant_type.as_str(), exchange.client_auth.as_str()),
        ("authorization_code", "assertion")
    );

    let relay = support::start(&text).await;
    assert_eq!(get(&relay, "crm").await, 200);
    demo.auth.expire_access_tokens();
    assert_eq!(get(&relay, "crm").await, 200, "refreshed after a 401");
    let log = demo.auth.requests_log();
    let refresh = log
        .iter()
        .rev()
        .find(|r| r.grant_type == "refresh_token")
        .expect("a refresh");
    assert_eq!(
        (refresh.status, refresh.client_auth.as_str()),
        (200, "assertion")
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        key(&rcgen::PKCS_ECDSA_P256_SHA256),
        key(&rcgen::PKCS_ED25519),
    );
    // The provider already has the new public key; the old one was withdrawn.
    let demo = demo_trusting_client_key(&new).await;
    let key_file = write(dir.path(), "k.pem", &old.private);
    let relay = start_at(&demo, &private_key_jwt(&key_file)).await;
    assert_ne!(get(&relay, "api").await, 200);
    // Even a key of another type: the algorithm follows the key when none is configured.
    replace(&key_file, &new.private);
    assert!(
        serves_within(&relay, Duration::from_secs(45)).await,
        "the rotated key is used"
    );
    assert_eq!(last_request(&demo.auth).assertions[0]["alg"], "EdDSA");
    // The status page renders the new /status fields.
    let page = support::client()
        .get(relay.admin_url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    relay.stop().await;
}

#[test]
fn presets_for_google_service_accounts_and_the_salesforce_jwt_flow() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let sa = json!({
        "type": "service_account",
        "private_key": k.private,
        "client_email": "svc@demo.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let sa_file = write(dir.path(), "sa.json", &sa.to_string());
    let key_file = write(dir.path(), "k.pem", &k.private);
    let yaml = format!(
        r#"
credentials:
  google: {{ provider: google_service_account, service_account_file: "{}", scopes: [a, b] }}
  sf:
    provider: salesforce_jwt
    provider_params: {{ login_host: test.salesforce.com }}
    assertion_issuer: consumer-key
    assertion_subject: user@example.com
    assertion_key_file: "{}"
upstreams:
  g: {{ listen: "127.0.0.1:0", url: "https://www.googleapis.com", credential: google }}
  s: {{ listen: "127.0.0.1:0", url: "https://acme.my.salesforce.com", credential: sf }}
"#,
        sa_file.display(),
        key_file.display()
    );
    let c = Config::from_yaml(&yaml, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    let g = &c.credentials["google"];
    assert_eq!(
        g.token_url.as_ref().unwrap().as_str(),
        "https://oauth2.googleapis.com/token"
    );
    let j = g.jwt_bearer.as_ref().unwrap();
    assert_eq!(j.issuer, "svc@demo.iam.gserviceaccount.com");
    assert_eq!(j.claims["scope"], "a b");
    assert_eq!(j.lifetime.0, Duration::from_secs(3600));
    let s = &c.credentials["sf"];
    assert_eq!(
        s.token_url.as_ref().unwrap().as_str(),
        "https://test.salesforce.com/services/oauth2/token"
    );
    let j = s.jwt_bearer.as_ref().unwrap();
    assert_eq!(j.audience, "https://test.salesforce.com");
    assert_eq!(j.lifetime.0, Duration::from_secs(120));
}

/// An EC key in SEC1 form (`BEGIN EC PRIVATE KEY`) from openssl, and its public key.
fn sec1_key(dir: &Path, curve: &str) -> Option<Key> {
    let path = dir.join(format!("{curve}.pem"));
    let out = support::tools::command("openssl")?
        .args(["ecparam", "-genkey", "-noout", "-name", curve, "-out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = support::tools::command("openssl")?
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    let private = std::fs::read_to_string(&path).unwrap();
    assert!(private.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    Some(Key {
        private,
        public: String::from_utf8(public.stdout).unwrap(),
    })
}

/// An RSA key in PKCS#1 form (`BEGIN RSA PRIVATE KEY`).
fn pkcs1_key(dir: &Path) -> Option<Key> {
    let k = rsa_key(dir)?;
    let out = support::tools::command("openssl")?
        .args(["pkey", "-traditional", "-in"])
        .arg(dir.join("rsa.pem"))
        .output()
        .unwrap();
    let private = String::from_utf8(out.stdout).unwrap();
    assert!(private.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    Some(Key { private, ..k })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec1_and_pkcs1_keys_as_cert_manager_writes_them_sign_too() {
    let dir = tempfile::tempdir().unwrap();
    for (curve, alg) in [
        ("prime256v1", "ES256"),
        ("secp384r1", "ES384"),
        ("pkcs1", "RS256"),
    ] {
        let k = if curve == "pkcs1" {
            pkcs1_key(dir.path())
        } else {
            sec1_key(dir.path(), curve)
        };
        let Some(k) = k else {
            return;
        };
        let demo = demo_trusting_client_key(&k).await;
        let key_file = write(dir.path(), "sec1.pem", &k.private);
        let relay = start_at(&demo, &private_key_jwt(&key_file)).await;
        assert_eq!(get(&relay, "api").await, 200, "{curve}");
        assert_eq!(last_request(&demo.auth).assertions[0]["alg"], alg);
        relay.stop().await;
    }
}
