//! Config validation: every rule refuses a bad file with an error naming the key path;
//! `tokenrelay check` exits 1 with the same errors; the shipped example is valid.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use tokenrelay::config::{Config, ConfigError};

const VALID: &str = "\
admin:
  listen: 127.0.0.1:19090
credentials:
  crm:
    grant: client_credentials
    token_url: https://auth.example.com/oauth2/token
    client_id: ${CRM_CLIENT_ID}
    client_secret: ${CRM_CLIENT_SECRET}
upstreams:
  crm:
    listen: 127.0.0.1:18081
    url: https://api.example.com/v1
    credential: crm
    timeout: 30s
    retry_body_limit: 64KiB
";

fn env(name: &str) -> Option<String> {
    match name {
        "CRM_CLIENT_ID" => Some("id-1".into()),
        "CRM_CLIENT_SECRET" => Some("secret-1".into()),
        _ => None,
    }
}

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(yaml, &env)
}

/// `VALID` with `from` replaced by `to` (which must occur).
fn variant(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "{from:?} not in the base config");
    VALID.replacen(from, to, 1)
}

/// The error text of an invalid config, asserting that some problem line starts with
/// `path` and mentions every one of `mentions`.
fn assert_refused(yaml: &str, path: &str, mentions: &[&str]) -> String {
    let err = match parse(yaml) {
        Ok(_) => panic!("config accepted, expected an error at {path}:\n{yaml}"),
        Err(e) => e,
    };
    let line = err
        .problems
        .iter()
        .find(|p| p.starts_with(&format!("{path}:")) || p.starts_with(&format!("{path} ")))
        .unwrap_or_else(|| panic!("no problem names {path}; got:\n{err}"));
    for m in mentions {
        assert!(line.contains(m), "{path}: {m:?} not mentioned in {line:?}");
    }
    err.to_string()
}

#[test]
fn the_base_config_is_valid() {
    let c = parse(VALID).unwrap();
    assert_eq!(
        c.upstreams["crm"].url.as_str(),
        "https://api.example.com/v1"
    );
    assert_eq!(c.credentials["crm"].client_id.as_deref(), Some("id-1"));
    assert_eq!(c.upstreams["crm"].retry_body_limit.0, 64 * 1024);
}

#[test]
fn unknown_keys_are_named_with_their_full_path() {
    assert_refused(
        &variant(
            "    grant: client_credentials\n",
            "    grant: client_credentials\n    bogus_key: 1\n",
        ),
        "credentials.crm.bogus_key",
        &[],
    );
    assert_refused(
        &variant(
            "    timeout: 30s\n",
            "    timeout: 30s\n    limits: { max_conections: 3 }\n",
        ),
        "upstreams.crm.limits.max_conections",
        &[],
    );
    assert_refused(&format!("{VALID}stor:\n  type: file\n"), "stor", &[]);
}

#[test]
fn an_unset_variable_names_the_key_and_the_variable() {
    assert_refused(
        &variant("${CRM_CLIENT_ID}", "${CRM_CLIENT_ID_TYPO}"),
        "credentials.crm.client_id",
        &["CRM_CLIENT_ID_TYPO"],
    );
}

#[test]
fn http_urls_need_allow_insecure_http_on_their_entry() {
    let yaml = variant(
        "https://auth.example.com/oauth2/token",
        "http://auth.example.com/oauth2/token",
    );
    assert_refused(&yaml, "credentials.crm.token_url", &["https"]);
    let fixed = yaml.replace(
        "    grant: client_credentials\n",
        "    grant: client_credentials\n    allow_insecure_http: true\n",
    );
    parse(&fixed).expect("allowed on the credential");

    let yaml = variant("https://api.example.com/v1", "http://api.example.com/v1");
    assert_refused(&yaml, "upstreams.crm.url", &["https"]);
    // Allowing it on the credential does not allow it on the upstream.
    let wrong_entry = yaml.replace(
        "    grant: client_credentials\n",
        "    grant: client_credentials\n    allow_insecure_http: true\n",
    );
    assert_refused(&wrong_entry, "upstreams.crm.url", &[]);
    let fixed = yaml.replace(
        "    credential: crm\n",
        "    credential: crm\n    allow_insecure_http: true\n",
    );
    parse(&fixed).expect("allowed on the upstream");
}

#[test]
fn credentials_in_urls_are_refused_without_echoing_them() {
    let err = assert_refused(
        &variant(
            "https://api.example.com/v1",
            "https://user:pw-in-url-123@api.example.com/v1",
        ),
        "upstreams.crm.url",
        &[],
    );
    assert!(!err.contains("pw-in-url-123"), "{err}");
    let err = assert_refused(
        &variant(
            "https://auth.example.com/oauth2/token",
            "https://id:pw-in-url-456@auth.example.com/oauth2/token",
        ),
        "credentials.crm.token_url",
        &[],
    );
    assert!(!err.contains("pw-in-url-456"), "{err}");
}

#[test]
fn a_bad_duration_names_its_key() {
    assert_refused(
        &variant("timeout: 30s", "timeout: soon"),
        "upstreams.crm.timeout",
        &["soon"],
    );
}

#[test]
fn a_bad_size_names_its_key() {
    assert_refused(
        &variant("retry_body_limit: 64KiB", "retry_body_limit: 64 parsecs"),
        "upstreams.crm.retry_body_limit",
        &["64 parsecs"],
    );
}

#[test]
fn a_missing_client_secret_file_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-secret");
    let yaml = variant(
        "client_secret: ${CRM_CLIENT_SECRET}",
        &format!("client_secret_file: {}", missing.display()),
    );
    assert_refused(
        &yaml,
        "credentials.crm.client_secret_file",
        &[&missing.display().to_string()],
    );
    // The same file, once it exists, is read.
    std::fs::write(&missing, "from-file\n").unwrap();
    let c = parse(&yaml).unwrap();
    assert_eq!(
        c.credentials["crm"]
            .client_secret
            .as_ref()
            .unwrap()
            .expose(),
        "from-file"
    );
}

#[test]
fn an_unknown_credential_reference_is_refused() {
    assert_refused(
        &variant("    credential: crm\n", "    credential: crmm\n"),
        "upstreams.crm.credential",
        &["crmm"],
    );
}

#[test]
fn an_unknown_grant_is_refused() {
    assert_refused(
        &variant("grant: client_credentials", "grant: implicit"),
        "credentials.crm.grant",
        &["implicit"],
    );
}

#[test]
fn refresh_at_must_be_a_fraction() {
    for bad in ["1.5", "0", "1", "-0.2"] {
        assert_refused(
            &variant(
                "    grant: client_credentials\n",
                &format!("    grant: client_credentials\n    refresh_at: {bad}\n"),
            ),
            "credentials.crm.refresh_at",
            &[],
        );
    }
    parse(&variant(
        "    grant: client_credentials\n",
        "    grant: client_credentials\n    refresh_at: 0.5\n",
    ))
    .unwrap();
}

#[test]
fn a_listen_address_may_be_used_once() {
    let two = format!(
        "{VALID}  other:\n    listen: 127.0.0.1:18081\n    url: https://other.example.com\n    credential: crm\n"
    );
    let err = assert_refused(&two, "upstreams.other.listen", &["127.0.0.1:18081"]);
    assert!(
        err.contains("upstreams.crm.listen"),
        "names the other user: {err}"
    );

    let clash_admin = variant("listen: 127.0.0.1:19090", "listen: 127.0.0.1:18081");
    let err = assert_refused(&clash_admin, "upstreams.crm.listen", &["127.0.0.1:18081"]);
    assert!(err.contains("admin.listen"), "{err}");
}

#[test]
fn a_format_without_token_is_refused() {
    for bad in ["\"Bearer\"", "\"{token} {token}\""] {
        assert_refused(
            &variant(
                "    credential: crm\n",
                &format!("    credential: crm\n    format: {bad}\n"),
            ),
            "upstreams.crm.format",
            &["{token}"],
        );
    }
    let c = parse(&variant(
        "    credential: crm\n",
        "    credential: crm\n    header: X-Api-Key\n    format: \"Token {token}\"\n",
    ))
    .unwrap();
    assert_eq!(c.upstreams["crm"].format, "Token {token}");
}

#[test]
fn all_problems_are_reported_together() {
    let yaml = variant("timeout: 30s", "timeout: 0s")
        .replace("    credential: crm\n", "    credential: nope\n")
        .replace(
            "    grant: client_credentials\n",
            "    grant: client_credentials\n    refresh_at: 2\n",
        );
    let err = parse(&yaml).unwrap_err();
    let text = err.to_string();
    for path in [
        "upstreams.crm.timeout",
        "upstreams.crm.credential",
        "credentials.crm.refresh_at",
    ] {
        assert!(text.contains(path), "{path} missing from:\n{text}");
    }
}

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[test]
fn the_example_config_is_valid_with_its_documented_variables() {
    let path = repo_file("config.example.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The variables the example's header documents.
    let documented = [
        "CRM_CLIENT_ID",
        "CRM_CLIENT_SECRET",
        "BILLING_CLIENT_ID",
        "BILLING_CLIENT_SECRET",
    ];
    for var in documented {
        assert!(text.contains(var), "{var} not documented in the example");
    }
    let config = Config::from_yaml(&text, &|k| {
        documented.contains(&k).then(|| format!("value-of-{k}"))
    })
    .unwrap_or_else(|e| panic!("config.example.yaml is invalid:\n{e}"));
    assert!(!config.credentials.is_empty());
    assert!(!config.upstreams.is_empty());
    // And it really needs them: without, each is reported.
    let err = Config::from_yaml(&text, &|_| None).unwrap_err();
    for var in documented {
        assert!(err.to_string().contains(var), "{var}: {err}");
    }
}

fn check(config_text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenrelay.yaml");
    std::fs::write(&file, config_text).unwrap();
    let out = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(&file)
        .env("CRM_CLIENT_ID", "id-1")
        .env("CRM_CLIENT_SECRET", "secret-1")
        .env_remove("CRM_CLIENT_ID_TYPO")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_exits_1_naming_the_key_path() {
    for (yaml, path) in [
        (
            variant(
                "    grant: client_credentials\n",
                "    grant: client_credentials\n    bogus_key: 1\n",
            ),
            "credentials.crm.bogus_key",
        ),
        (
            variant("timeout: 30s", "timeout: soon"),
            "upstreams.crm.timeout",
        ),
        (
            variant("${CRM_CLIENT_ID}", "${CRM_CLIENT_ID_TYPO}"),
            "credentials.crm.client_id",
        ),
    ] {
        let (code, _stdout, stderr) = check(&yaml);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{path}: ")),
            "{path} not in:\n{stderr}"
        );
    }
}

#[test]
fn check_accepts_a_valid_config_without_touching_the_network() {
    // check never contacts the (unreachable here) token endpoint or upstream.
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("api.example.com"), "{stdout}");
    assert!(!stdout.contains("secret-1"), "{stdout}");
}
