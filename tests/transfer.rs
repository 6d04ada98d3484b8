//! Moving a credential between environments and backing it up: `tokenrelay export` and
//! `import` as child processes, two tokenrelay instances (environments A and B, each with
//! its own file store) in this process, and the demo authorization server with rotating
//! single-use refresh tokens and reuse detection.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{eventually, status_json, stored_state};
use testkit::{ApiServer, AuthServer, AuthServerOptions};

struct Env {
    config: PathBuf,
    yaml: String,
}

fn env(dir: &Path, name: &str, auth: &AuthServer, api: &ApiServer, client_id: &str) -> Env {
    env_with(dir, name, auth, api, client_id, &[])
}

/// Environment `name` with credential `crm` (and its upstream) plus credentials `extra`
/// of the same token endpoint and client, without upstreams.
fn env_with(
    dir: &Path,
    name: &str,
    auth: &AuthServer,
    api: &ApiServer,
    client_id: &str,
    extra: &[&str],
) -> Env {
    let credential = |c: &str| {
        format!(
            "  {c}: {{ grant: refresh_token, token_url: {}, client_id: {client_id}, client_secret: demo-secret, allow_insecure_http: true, refresh_before: 1s, token_timeout: 2s }}\n",
            auth.token_url()
        )
    };
    let credentials: String = std::iter::once("crm")
        .chain(extra.iter().copied())
        .map(credential)
        .collect();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}
store: {{ type: file, path: {state}, poll_interval: 200ms }}
runtime: {{ instance_id: {name} }}
credentials:
{credentials}upstreams:
  crm: {{ listen: 127.0.0.1:0, url: {api_url}, credential: crm, allow_insecure_http: true }}
",
        state = dir.join(name).display(),
        api_url = api.url(),
    );
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, &yaml).unwrap();
    Env { config, yaml }
}

/// Seeds credential `crm` of `e` with a new grant; returns its refresh token.
async fn seed(e: &Env, auth: &AuthServer) -> String {
    let token = auth.new_grant();
    support::seed_refresh_token(&e.yaml, "crm", &token).await;
    token
}

/// Environments `a` and `b` in `dir` of one token endpoint and client (`b` with
/// credentials `b_extra` too), `a` seeded, and a passphrase file: where a handover
/// starts. Returns `a`, `b`, the refresh token `a` holds and the passphrase file.
async fn seeded_a_and_b(
    dir: &Path,
    auth: &AuthServer,
    api: &ApiServer,
    b_extra: &[&str],
) -> (Env, Env, String, PathBuf) {
    let a = env(dir, "a", auth, api, "demo-client");
    let b = env_with(dir, "b", auth, api, "demo-client", b_extra);
    let token = seed(&a, auth).await;
    (a, b, token, passphrase(dir))
}

/// A passphrase file in `dir`.
fn passphrase(dir: &Path) -> PathBuf {
    let pass = dir.join("passphrase");
    std::fs::write(&pass, "a long passphrase\n").unwrap();
    pass
}

/// `tokenrelay export` of credential `crm` of `e` to `out`, sealed with `pass`.
async fn export(e: &Env, out: &Path, pass: &Path, extra: &[&str]) -> Output {
    bundle_command("export", e, "crm", ("--out", out), pass, extra).await
}

/// `tokenrelay import` of `bundle` (sealed with `pass`) into credential `credential` of `e`.
async fn import(e: &Env, credential: &str, bundle: &Path, pass: &Path, extra: &[&str]) -> Output {
    bundle_command("import", e, credential, ("--in", bundle), pass, extra).await
}

/// `tokenrelay <command> --config <e> --credential <credential> <flag> <file>
/// --passphrase-file <pass> <extra>`: what export and import have in common.
async fn bundle_command(
    command: &str,
    e: &Env,
    credential: &str,
    (flag, file): (&str, &Path),
    pass: &Path,
    extra: &[&str],
) -> Output {
    let (config, file, pass) = (
        e.config.display().to_string(),
        file.display().to_string(),
        pass.display().to_string(),
    );
    let mut args = vec![
        command,
        "--config",
        &config,
        "--credential",
        credential,
        flag,
        &file,
        "--passphrase-file",
        &pass,
    ];
    args.extend(extra);
    support::cli(&args).await
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Asserts that the command failed with an error (exit 1, not a signal) whose text has
/// every one of `needles` and not `secret`.
fn refused(out: &Output, needles: &[&str], secret: &str) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    for n in needles {
        assert!(stderr.contains(n), "no {n:?} in: {stderr}");
    }
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "a token was printed"
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn get(url: &str) -> u16 {
    support::client()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn servers() -> (AuthServer, ApiServer) {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(3),
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    (auth, api)
}

/// A hands the credential over to B: A shows `moved` (where, when), stops sending
/// anything, and answers 503; B, already running, adopts the import without a restart
/// and keeps rotating. The refresh token is never presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_is_handed_over_to_another_environment() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _, pass) = seeded_a_and_b(dir.path(), &auth, &api, &[]).await;
    let relay_a = support::start(&a.yaml).await;
    let relay_b = support::start(&b.yaml).await;
    let (url_a, url_b) = (
        format!("{}/echo", relay_a.url("crm")),
        format!("{}/echo", relay_b.url("crm")),
    );
    assert_eq!(get(&url_a).await, 200);
    assert_eq!(get(&url_b).await, 503, "B has nothing yet");
    let rotated = eventually(Duration::from_secs(10), || async {
        auth.stats().rotations >= 1
    })
    .await;
    assert!(rotated);

    let bundle = dir.path().join("crm.bundle");
    let out = export(&a, &bundle, &pass, &["--to", "environment-b"]).await;
    assert!(out.status.success(), "export failed: {}", text(&out.stderr));
    let sealed = std::fs::read_to_string(&bundle).unwrap();
    assert!(sealed.contains("tokenrelay-credential-bundle") && !sealed.contains("refresh_token"));

    let admin_a = format!("http://{}", relay_a.admin);
    let moved = eventually(Duration::from_secs(5), || {
        let admin = admin_a.clone();
        async move { status_json(&admin).await["credentials"]["crm"]["state"] == "moved" }
    })
    .await;
    let st = status_json(&admin_a).await;
    assert!(moved, "{st}");
    assert_eq!(
        st["credentials"]["crm"]["moved"]["to"], "environment-b",
        "{st}"
    );
    assert_eq!(get(&url_a).await, 503, "A no longer uses the credential");
    // A's status page says where it went and how to take it back.
    let page = support::get_text(&format!("{admin_a}/")).await;
    for needle in [
        "1 moved away",
        r#"<dd class="moved">to environment-b"#,
        "tokenrelay import --config",
    ] {
        assert!(page.contains(needle), "the page lacks {needle:?}:\n{page}");
    }

    let out = import(&b, "crm", &bundle, &pass, &[]).await;
    assert!(out.status.success(), "import failed: {}", text(&out.stderr));
    let adopted = eventually(Duration::from_secs(10), || {
        let url = url_b.clone();
        async move { get(&url).await == 200 }
    })
    .await;
    assert!(
        adopted,
        "B did not adopt the import: {}",
        status_json(&format!("http://{}", relay_b.admin)).await
    );
    // B rotates on; A stays quiet.
    let rotations = auth.stats().rotations;
    let more = eventually(Duration::from_secs(10), || async {
        auth.stats().rotations > rotations
    })
    .await;
    assert_eq!(get(&url_a).await, 503);
    relay_a.stop().await;
    relay_b.stop().await;
    assert!(more, "B did not rotate");
    let stats = auth.stats();
    assert_eq!(stats.refresh_reuse_detected, 0, "{stats:?}");
    assert_eq!(stats.invalid_grant, 0, "{stats:?}");
}

/// An import is refused when the bundle belongs to another client of the token endpoint,
/// and when it is older than what the store holds (a stale backup whose refresh token
/// was spent since), unless --force; each refusal names the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_of_other_clients_and_stale_backups_are_refused() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let a = env(dir.path(), "a", &auth, &api, "demo-client");
    let other = env(dir.path(), "other", &auth, &api, "another-client");
    let token = seed(&a, &auth).await;
    let pass = dir.path().join("passphrase");
    std::fs::write(&pass, "p\n").unwrap();
    let bundle = dir.path().join("backup.bundle");
    succeeded(&export(&a, &bundle, &pass, &["--copy"]).await);

    let out = import(&other, "crm", &bundle, &pass, &[]).await;
    refused(&out, &["another client", "--force"], &token);
    let out = import(&other, "crm", &bundle, &pass, &["--force"]).await;
    succeeded(&out);
    assert!(
        text(&out.stderr).contains("--force: importing despite: the bundle is for token endpoint"),
        "{}",
        text(&out.stderr)
    );

    // The source keeps running (a backup, not a move) and rotates past the backup.
    let relay = support::start(&a.yaml).await;
    assert_eq!(get(&format!("{}/echo", relay.url("crm"))).await, 200);
    relay.stop().await;
    let out = import(&a, "crm", &bundle, &pass, &[]).await;
    refused(&out, &["most likely been spent", "--force"], &token);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not it\n").unwrap();
    let out = import(&a, "crm", &bundle, &wrong, &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wrong passphrase"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(auth.stats().refresh_reuse_detected, 0);
}

/// A handover bundle brought back into its source is refused, naming the reason and
/// --force: its refresh token belongs to the destination now (which may have spent it),
/// and sending it from the source would make the authorization server revoke the grant
/// in both. The source stays moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_bundle_is_not_imported_back_into_its_source() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token, pass) = seeded_a_and_b(dir.path(), &auth, &api, &[]).await;
    let bundle = dir.path().join("crm.bundle");
    succeeded(&export(&a, &bundle, &pass, &["--to", "b"]).await);
    succeeded(&import(&b, "crm", &bundle, &pass, &[]).await);

    let out = import(&a, "crm", &bundle, &pass, &[]).await;
    refused(&out, &["from this very store", "--force"], &token);
    let st = stored_state(&a.yaml, "crm").await.unwrap();
    assert!(st.moved.is_some() && st.refresh_token.is_none(), "{st:?}");
}

/// A bundle older than the target's newest generation is refused even when the target
/// has handed the credential over (moved): generations only grow along handovers, so the
/// older bundle's refresh token was spent since. Moving the credential back with a new
/// export from the destination is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_bundle_is_refused_by_a_moved_target() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token, pass) = seeded_a_and_b(dir.path(), &auth, &api, &[]).await;
    let (to_b, back_to_a) = (dir.path().join("to-b"), dir.path().join("back-to-a"));
    succeeded(&export(&a, &to_b, &pass, &[]).await);
    succeeded(&import(&b, "crm", &to_b, &pass, &[]).await);
    succeeded(&export(&b, &back_to_a, &pass, &[]).await);
    succeeded(&import(&a, "crm", &back_to_a, &pass, &[]).await);

    let out = import(&b, "crm", &to_b, &pass, &[]).await;
    refused(&out, &["most likely been spent", "--force"], &token);
    assert!(stored_state(&b.yaml, "crm").await.unwrap().moved.is_some());
}

/// A bundle made for another credential name is refused unless the rename is deliberate
/// (--from-credential NAME): two credentials of one client holding the same refresh token
/// would spend it twice, and the authorization server would then revoke the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_for_another_credential_needs_from_credential() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token, pass) = seeded_a_and_b(dir.path(), &auth, &api, &["b24"]).await;
    let bundle = dir.path().join("crm.bundle");
    succeeded(&export(&a, &bundle, &pass, &[]).await);

    let out = import(&b, "b24", &bundle, &pass, &[]).await;
    refused(&out, &["\"crm\"", "--from-credential crm"], &token);
    let out = import(&b, "b24", &bundle, &pass, &["--from-credential", "erp"]).await;
    refused(&out, &["\"crm\"", "--from-credential crm"], &token);
    assert_eq!(stored_state(&b.yaml, "b24").await, None);

    succeeded(&import(&b, "b24", &bundle, &pass, &["--from-credential", "crm"]).await);
    let st = stored_state(&b.yaml, "b24").await.unwrap();
    assert_eq!(
        st.refresh_token.map(|t| t.expose().to_string()),
        Some(token)
    );
}

/// The scrypt parameters a bundle names are bounded before the key is derived: a
/// tampered bundle asking for a petabyte of memory is refused with an error naming the
/// bound (not an abort, nor gigabytes in use), with --force too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_key_derivation_parameters_are_refused_before_use() {
    let (auth, api) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token, pass) = seeded_a_and_b(dir.path(), &auth, &api, &[]).await;
    let bundle = dir.path().join("crm.bundle");
    succeeded(&export(&a, &bundle, &pass, &["--copy"]).await);
    let sealed = std::fs::read_to_string(&bundle).unwrap();
    assert!(sealed.contains("\"log_n\": 15"), "{sealed}");
    std::fs::write(&bundle, sealed.replace("\"log_n\": 15", "\"log_n\": 40")).unwrap();

    for extra in [&[][..], &["--force"]] {
        let out = import(&b, "crm", &bundle, &pass, extra).await;
        refused(&out, &["scrypt", "MiB"], &token);
    }
    assert_eq!(stored_state(&b.yaml, "crm").await, None);
}
