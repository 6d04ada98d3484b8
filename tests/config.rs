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
    // A short list of known keys is shown when nothing is close.
    assert_refused(
        &variant(
            "  listen: 127.0.0.1:19090\n",
            "  listen: 127.0.0.1:19090\n  frobnicate: 1\n",
        ),
        "admin.frobnicate",
        &["unknown key (known here: listen, token_file)"],
    );
}

/// Every unknown key is reported at once, each with the closest known key when it is a
/// misspelling, and nothing else follows from them.
#[test]
fn every_unknown_key_is_reported_at_once_with_did_you_mean() {
    let yaml = VALID
        .replacen(
            "    token_url: https://auth.example.com/oauth2/token\n",
            "    tokn_url: https://auth.example.com/oauth2/token\n    bogus_key: 1\n",
            1,
        )
        .replacen("    timeout: 30s\n", "    timeot: 30s\n", 1)
        + "stor:\n  type: file\n";
    let err = parse(&yaml).expect_err("unknown keys");
    assert_eq!(
        err.problems,
        [
            "credentials.crm.tokn_url: unknown key; did you mean `token_url`?",
            "credentials.crm.bogus_key: unknown key",
            "upstreams.crm.timeot: unknown key; did you mean `timeout`?",
            "stor: unknown key; did you mean `store`?",
        ]
        .map(String::from)
        .to_vec(),
        "{err}"
    );
}

/// One mistake, one error: an upstream naming a credential whose own entry is wrong is
/// not reported as naming an undefined one.
#[test]
fn a_broken_credential_is_reported_once() {
    let err = parse(&variant(
        "grant: client_credentials",
        "grant: client_credentialz",
    ))
    .expect_err("a bad grant");
    assert_eq!(
        err.problems,
        ["credentials.crm.grant: must be refresh_token, client_credentials, password, jwt_bearer or static, got \"client_credentialz\""],
        "{err}"
    );
}

#[test]
fn a_tab_is_named_with_its_line() {
    let err = parse(&VALID.replacen(
        "    grant: client_credentials",
        "\tgrant: client_credentials",
        1,
    ))
    .expect_err("a tab");
    assert_eq!(
        err.problems,
        ["config is not valid YAML: line 5 is indented with a tab; YAML indents with spaces only"],
        "{err}"
    );
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

/// A webhook URL often carries its secret in the path (Slack's do) or the query:
/// `check` and the config's `Debug` show only its scheme and host.
#[test]
fn check_and_debug_keep_a_webhook_urls_path_and_query_out() {
    let url = "https://hooks.example.com/services/T0/B0/path-secret-77?sig=query-secret-88";
    let yaml = format!("{VALID}notify:\n  webhook:\n    url: {url}\n");
    let (code, stdout, stderr) = check(&yaml);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("hooks.example.com"), "{stdout}");
    let config = parse(&yaml).unwrap();
    for shown in [stdout, stderr, format!("{config:?}")] {
        for secret in ["path-secret-77", "query-secret-88"] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
    }
    // Delivery still goes to the whole URL.
    let webhook = config.notify.webhook.expect("a webhook");
    assert_eq!(webhook.url.as_url().as_str(), url);
}

/// The ```yaml blocks of a Markdown text.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Files a documented snippet refers to, made here: a signing key of the type its
/// algorithm wants, a service-account file, a client certificate with its key, a CA, a
/// secret.
struct StandIns {
    dir: tempfile::TempDir,
    n: usize,
}

impl StandIns {
    fn new() -> StandIns {
        StandIns {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
        }
    }

    fn write(&mut self, content: &str) -> String {
        self.n += 1;
        let path = self.dir.path().join(format!("stand-in-{}", self.n));
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    /// A private key (PEM) for `alg` (`None`: EC P-256); `None` when an RSA key is
    /// wanted and openssl is missing.
    fn key(&self, alg: Option<&str>) -> Option<String> {
        use support::pki::{key, rsa_key};
        Some(match alg {
            Some(a) if a.starts_with("RS") || a.starts_with("PS") => {
                rsa_key(self.dir.path())?.private
            }
            Some("ES384") => key(&rcgen::PKCS_ECDSA_P384_SHA384).private,
            Some("EdDSA") => key(&rcgen::PKCS_ED25519).private,
            _ => key(&rcgen::PKCS_ECDSA_P256_SHA256).private,
        })
    }

    /// Points every `*_file` key of `block` (a credential or an upstream) at a stand-in;
    /// `None` when one cannot be made here.
    fn fill(&mut self, block: &mut serde_yaml::Mapping) -> Option<()> {
        let get =
            |b: &serde_yaml::Mapping, k: &str| b.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let keys: Vec<String> = block
            .keys()
            .filter_map(|k| k.as_str())
            .filter(|k| k.ends_with("_file"))
            .map(str::to_owned)
            .collect();
        for k in keys {
            let path = match k.as_str() {
                "client_assertion_key_file" => {
                    let pem = self.key(get(block, "client_assertion_alg").as_deref())?;
                    self.write(&pem)
                }
                "assertion_key_file" => {
                    let pem = self.key(get(block, "assertion_alg").as_deref())?;
                    self.write(&pem)
                }
                "service_account_file" => {
                    let pem = self.key(get(block, "assertion_alg").as_deref())?;
                    let account = serde_json::json!({
                        "type": "service_account",
                        "private_key_id": "stand-in",
                        "private_key": pem,
                        "client_email": "relay@example.iam.gserviceaccount.com",
                        "token_uri": "https://oauth2.googleapis.com/token",
                    });
                    self.write(&account.to_string())
                }
                "client_cert_file" => {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
                        .unwrap()
                        .self_signed(&key)
                        .unwrap();
                    let key_path = self.write(&key.serialize_pem());
                    block.insert("client_key_file".into(), key_path.into());
                    self.write(&cert.pem())
                }
                // Written with client_cert_file.
                "client_key_file" => continue,
                "ca_file" => {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                    let ca = params.self_signed(&key).unwrap();
                    self.write(&ca.pem())
                }
                "client_secret_file" | "password_file" | "token_file" => {
                    self.write("stand-in-secret-value\n")
                }
                other => panic!("no stand-in for {other}: teach this test what the file holds"),
            };
            block.insert(k.as_str().into(), path.into());
        }
        Some(())
    }
}

/// Completes a documented snippet (`credentials` and/or `upstreams` as mappings) into a
/// config: stand-in files, an upstream for each credential none uses, a credential for
/// each upstream whose credential is not shown. `None` when a stand-in cannot be made.
fn complete_snippet(doc: &mut serde_yaml::Value, files: &mut StandIns) -> Option<()> {
    use serde_yaml::{Mapping, Value};
    let root = doc.as_mapping_mut().expect("a snippet is a mapping");
    for section in ["credentials", "upstreams"] {
        root.entry(section.into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    let mut used = Vec::new();
    let mut wanted = Vec::new();
    for (_, u) in root["upstreams"].as_mapping_mut().unwrap().iter_mut() {
        let u = u.as_mapping_mut().expect("an upstream is a mapping");
        files.fill(u)?;
        if let Some(c) = u.get("credential").and_then(Value::as_str) {
            used.push(c.to_owned());
        }
    }
    for (name, c) in root["credentials"].as_mapping_mut().unwrap().iter_mut() {
        files.fill(c.as_mapping_mut().expect("a credential is a mapping"))?;
        wanted.push(name.as_str().unwrap().to_owned());
    }
    let mut port = 18500;
    for name in wanted.iter().filter(|n| !used.contains(n)) {
        port += 1;
        let upstream: Value = serde_yaml::from_str(&format!(
            "{{ listen: \"127.0.0.1:{port}\", url: \"https://api.example.com\", credential: \"{name}\" }}"
        ))
        .unwrap();
        root["upstreams"]
            .as_mapping_mut()
            .unwrap()
            .insert(format!("{name}-stand-in").into(), upstream);
    }
    for name in used.iter().filter(|n| !wanted.contains(n)) {
        let credential: Value = serde_yaml::from_str(
            "{ grant: client_credentials, token_url: \"https://auth.example.com/token\", client_id: c, client_secret: s }",
        )
        .unwrap();
        root["credentials"]
            .as_mapping_mut()
            .unwrap()
            .insert(name.as_str().into(), credential);
    }
    Some(())
}

/// Every variable a snippet refers to is set.
fn any_variable(name: &str) -> Option<String> {
    Some(format!("value-of-{name}"))
}

#[test]
fn the_client_auth_page_snippets_are_valid_config() {
    let path = repo_file("docs/client-auth.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut files = StandIns::new();
    let mut checked = 0;
    for block in yaml_blocks(&text) {
        let mut doc: serde_yaml::Value =
            serde_yaml::from_str(&block).unwrap_or_else(|e| panic!("not YAML ({e}):\n{block}"));
        // Chart values (lists of items with `name`) are rendered by the chart tests.
        if doc.get("credentials").is_some_and(|c| c.is_sequence())
            || doc.get("upstreams").is_some_and(|u| u.is_sequence())
        {
            continue;
        }
        if complete_snippet(&mut doc, &mut files).is_none() {
            return; // openssl is missing: no RSA stand-in
        }
        let config = serde_yaml::to_string(&doc).unwrap();
        Config::from_yaml(&config, &any_variable)
            .unwrap_or_else(|e| panic!("docs/client-auth.md: refused\n{block}\n{e}"));
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} snippets found");
}

#[test]
fn the_example_configs_commented_client_auth_credentials_are_valid() {
    let path = repo_file("config.example.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The commented section under `# Without a shared secret`, uncommented.
    let section: String = text
        .lines()
        .skip_while(|l| !l.starts_with("  # Without a shared secret"))
        .skip(1)
        .take_while(|l| l.starts_with("  # "))
        .map(|l| format!("  {}\n", &l["  # ".len()..]))
        .collect();
    assert!(
        section.contains("client_auth: private_key_jwt"),
        "{section}"
    );
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&format!("credentials:\n{section}")).unwrap();
    let names: Vec<String> = doc["credentials"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let mut files = StandIns::new();
    if complete_snippet(&mut doc, &mut files).is_none() {
        return; // openssl is missing: no RSA stand-in
    }
    let config = Config::from_yaml(&serde_yaml::to_string(&doc).unwrap(), &any_variable)
        .unwrap_or_else(|e| panic!("config.example.yaml, uncommented:\n{section}\n{e}"));
    for name in ["signed", "hmac", "google", "salesforce", "bank"] {
        assert!(names.contains(&name.to_string()), "{name}: {names:?}");
        assert!(config.credentials.contains_key(name), "{name}");
    }
}

#[test]
fn client_auth_accepts_the_registry_names_of_the_secret_methods() {
    use tokenrelay::config::ClientAuth;
    let with = |method: &str| {
        let yaml = variant(
            "    client_secret: ${CRM_CLIENT_SECRET}\n",
            &format!("    client_secret: ${{CRM_CLIENT_SECRET}}\n    client_auth: {method}\n"),
        );
        parse(&yaml).unwrap().credentials["crm"].client_auth
    };
    assert_eq!(with("client_secret_basic"), ClientAuth::Basic);
    assert_eq!(with("basic"), ClientAuth::Basic);
    assert_eq!(with("client_secret_post"), ClientAuth::RequestBody);
    assert_eq!(with("request_body"), ClientAuth::RequestBody);
    assert_refused(
        &variant(
            "    client_secret: ${CRM_CLIENT_SECRET}\n",
            "    client_secret: ${CRM_CLIENT_SECRET}\n    client_auth: client_secret\n",
        ),
        "credentials.crm.client_auth",
        &["client_secret_basic"],
    );
}

#[test]
fn token_query_param_must_be_a_plain_name() {
    let with = |param: &str| {
        variant(
            "    credential: crm\n",
            &format!("    credential: crm\n    token_query_param: {param}\n"),
        )
    };
    let cfg = parse(&with("auth")).unwrap();
    assert_eq!(
        cfg.upstreams["crm"].token_query_param.as_deref(),
        Some("auth")
    );
    assert!(parse(VALID).unwrap().upstreams["crm"]
        .token_query_param
        .is_none());
    assert_refused(
        &with("'a&b'"),
        "upstreams.crm.token_query_param",
        &["letters, digits"],
    );
    let cfg = parse(&with("auth\n    token_query_param_ignore_case: true")).unwrap();
    assert!(cfg.upstreams["crm"].token_query_param_ignore_case);
    assert_refused(
        &variant(
            "    credential: crm\n",
            "    credential: crm\n    token_query_param_ignore_case: true\n",
        ),
        "upstreams.crm.token_query_param_ignore_case",
        &["only with token_query_param"],
    );
}

#[test]
fn a_second_mark_path_is_for_the_file_store_and_another_directory() {
    let file = |extra: &str| format!("store: {{ type: file, path: /tmp/s{extra} }}\n{VALID}");
    assert!(parse(&file(", mark_path: /tmp/marks")).is_ok());
    assert_refused(
        &file(", mark_path: /tmp/s"),
        "store.mark_path",
        &["another directory"],
    );
    let redis = format!(
        "store: {{ type: redis, url: \"redis://127.0.0.1:6379\", mark_path: /tmp/m }}\n{VALID}"
    );
    assert_refused(&redis, "store.mark_path", &["only to store type file"]);
}

/// `store.allow_network_filesystem` is a boolean of the file store; a misspelling is an
/// unknown key; a store on the tests' own temporary directory (a local filesystem) opens
/// with it unset, as always.
#[test]
fn allow_network_filesystem_is_a_file_store_boolean() {
    let file = |extra: &str| format!("store: {{ type: file, path: /tmp/s{extra} }}\n{VALID}");
    for (value, allowed) in [("", false), (", allow_network_filesystem: false", false)] {
        let cfg = parse(&file(value)).unwrap();
        assert!(
            matches!(
                cfg.store.backend,
                tokenrelay::config::StoreBackend::File { allow_network_filesystem, .. }
                    if allow_network_filesystem == allowed
            ),
            "{value:?}"
        );
    }
    let cfg = parse(&file(", allow_network_filesystem: true")).unwrap();
    assert!(matches!(
        cfg.store.backend,
        tokenrelay::config::StoreBackend::File {
            allow_network_filesystem: true,
            ..
        }
    ));
    assert_refused(
        &file(", allow_network_filesystems: true"),
        "store.allow_network_filesystems",
        &[],
    );
    assert_refused(
        &file(", allow_network_filesystem: sure"),
        "store.allow_network_filesystem",
        &[],
    );
    let redis = format!(
        "store: {{ type: redis, url: \"redis://127.0.0.1:6379\", allow_network_filesystem: true }}\n{VALID}"
    );
    assert_refused(
        &redis,
        "store.allow_network_filesystem",
        &["only to store type file"],
    );

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let local = format!(
        "store: {{ type: file, path: {}, mark_path: {} }}\n{VALID}",
        state.display(),
        dir.path().join("marks").display()
    );
    let store = tokenrelay::store::open(&parse(&local).unwrap().store)
        .unwrap_or_else(|e| panic!("a local directory is refused: {e}"));
    assert_eq!(store.kind(), "file");
    assert!(state.is_dir());
}

/// `store.wait_replicas` is a count of Redis replicas; other stores refuse it.
#[test]
fn wait_replicas_is_a_redis_replica_count() {
    let redis =
        |extra: &str| format!("store: {{ type: redis, url: \"redis://r:6379\"{extra} }}\n{VALID}");
    let replicas = |yaml: &str| match parse(yaml).unwrap().store.backend {
        tokenrelay::config::StoreBackend::Redis { wait_replicas, .. } => wait_replicas,
        other => panic!("not redis: {other:?}"),
    };
    assert_eq!(replicas(&redis("")), 0);
    assert_eq!(replicas(&redis(", wait_replicas: 2")), 2);
    for bad in [
        ", wait_replicas: -1",
        ", wait_replicas: two",
        ", wait_replicas: 1.5",
    ] {
        assert_refused(&redis(bad), "store.wait_replicas", &[]);
    }
    assert_refused(&redis(", wait_replica: 1"), "store.wait_replica", &[]);
    for other in [
        "type: file, path: /tmp/s",
        "type: etcd, endpoints: [\"http://127.0.0.1:2379\"]",
    ] {
        assert_refused(
            &format!("store: {{ {other}, wait_replicas: 1 }}\n{VALID}"),
            "store.wait_replicas",
            &["only to store type redis"],
        );
    }
}

/// A preset credential with `params` (a flow mapping's entries) and `extra` keys.
fn preset_yaml(provider: &str, params: &str, extra: &str) -> String {
    format!(
        "credentials:\n  crm: {{ provider: {provider}, provider_params: {{ {params} }}, client_id: id, client_secret: s{extra} }}\nupstreams:\n  crm: {{ listen: 127.0.0.1:18081, url: https://api.example.com, credential: crm }}\n"
    )
}

/// Provider parameters are checked by shape before a URL is built from them, and the
/// error says what to write instead; a key the provider needs is required.
#[test]
fn preset_parameters_and_requirements_are_checked() {
    let with_redirect = ", redirect_uri: https://example.com/cb";
    assert!(parse(&preset_yaml("amocrm", "subdomain: acme", with_redirect)).is_ok());
    for pasted in ["acme.amocrm.ru", "https://acme.amocrm.ru/"] {
        assert_refused(
            &preset_yaml("amocrm", &format!("subdomain: \"{pasted}\""), with_redirect),
            "credentials.crm.provider_params.subdomain",
            &["write subdomain: acme"],
        );
    }
    assert_refused(
        &preset_yaml("okta", "domain: \"https://acme.okta.com/oauth2\"", ""),
        "credentials.crm.provider_params.domain",
        &["write domain: acme.okta.com"],
    );
    assert_refused(
        &preset_yaml("elma365", "base_url: \"https://acme.elma365.ru/\"", ""),
        "credentials.crm.provider_params.base_url",
        &["write base_url: https://acme.elma365.ru"],
    );
    assert_refused(
        &preset_yaml("amocrm", "subdomain: acme", ""),
        "credentials.crm.redirect_uri",
        &["required by preset amocrm"],
    );
    // `check` says the same and exits 1.
    let (code, _, stderr) = check(&preset_yaml("kommo", "subdomain: acme.kommo.com", ""));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("write subdomain: acme"), "{stderr}");
    assert!(
        stderr.contains("credentials.crm.redirect_uri: required by preset kommo"),
        "{stderr}"
    );
}

/// Warnings (not errors), with their exact text: a listener other hosts can reach, a
/// rotating preset told its tokens do not rotate, a file store allowed on a network
/// filesystem. The base config has none.
#[test]
fn settings_that_weaken_the_promise_are_warned_about() {
    assert_eq!(parse(VALID).unwrap().warnings(), Vec::<String>::new());
    let open = parse(&variant("listen: 127.0.0.1:18081", "listen: 0.0.0.0:18081")).unwrap();
    assert_eq!(
        open.warnings(),
        ["upstreams.crm.listen: 0.0.0.0:18081 is reachable from other hosts, and whoever connects gets their requests sent with the credential's token; listen on 127.0.0.1 unless a firewall or network policy limits who can connect"]
    );
    let reusable = parse(&preset_yaml(
        "okta",
        "domain: acme.okta.com",
        ", rotating_refresh_token: false",
    ))
    .unwrap();
    assert_eq!(
        reusable.warnings(),
        ["credentials.crm.rotating_refresh_token: false, but the okta preset treats its refresh tokens as single-use: if they are, an answer lost in transit leads to a spent token presented again and the grant lost; keep false only if the provider says its refresh tokens are reusable"]
    );
    assert_eq!(
        parse(&preset_yaml(
            "google",
            "",
            ", rotating_refresh_token: false"
        ))
        .unwrap()
        .warnings(),
        Vec::<String>::new(),
        "google's refresh tokens are reusable"
    );
    let nfs = parse(&format!("{VALID}store: {{ type: file, path: /var/lib/tokenrelay, allow_network_filesystem: true }}\n")).unwrap();
    assert_eq!(
        nfs.warnings(),
        ["store.allow_network_filesystem: true: on a network filesystem the lease (flock) and the atomic replace are not guaranteed, so two processes may spend one refresh token; use one process per state directory"]
    );
}

/// `tokenrelay completions SHELL` prints a script the shell accepts, naming every
/// command and option.
#[test]
fn shell_completions_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(support::binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "run",
            "check",
            "seed",
            "authorize",
            "status",
            "export",
            "json",
            "config",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("tokenrelay.bash");
            std::fs::write(&file, &script).unwrap();
            let syntax = support::tools::command("bash")
                .expect("bash is listed in scripts/test-tools.txt")
                .arg("-n")
                .arg(&file)
                .output()
                .unwrap();
            assert!(syntax.status.success(), "bash -n: {syntax:?}");
        }
    }
}

/// The presets added from issue 24 §3 expand to the settings their providers document
/// (each cited in its preset file), and `tokenrelay providers` lists them.
#[test]
fn the_2027_presets_expand_to_their_documented_settings() {
    use std::time::Duration;
    use tokenrelay::config::{ClientAuth, RequestFormat};
    let days = |d: u64| Some(Duration::from_secs(d * 86400));
    let resolved = |provider: &str, params: &str| {
        let cfg = parse(&preset_yaml(provider, params, ""))
            .unwrap_or_else(|e| panic!("preset {provider}: {e}"));
        let format = cfg.upstreams["crm"].format.clone();
        (cfg.credentials["crm"].clone(), format)
    };

    // Zendesk: JSON body to {subdomain}.zendesk.com/oauth/tokens, rotating, 30-day
    // default refresh-token TTL.
    let (c, format) = resolved("zendesk", "subdomain: acme");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://acme.zendesk.com/oauth/tokens"
    );
    assert_eq!(c.request_format, RequestFormat::Json);
    assert_eq!(c.client_auth, ClientAuth::RequestBody);
    assert!(c.refresh_token.rotating);
    assert_eq!(c.refresh_token.idle_lifetime.map(|d| d.0), days(30));
    assert_eq!(format, "Bearer {token}");
    assert_refused(
        &preset_yaml("zendesk", "subdomain: acme.zendesk.com", ""),
        "credentials.crm.provider_params.subdomain",
        &["write subdomain: acme"],
    );

    // Pipedrive: Basic auth, form body, 60 days unused, api_domain kept, the documented
    // "refresh_token is invalid" answer is a dead grant.
    let (c, format) = resolved("pipedrive", "");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://oauth.pipedrive.com/oauth/token"
    );
    assert_eq!(c.client_auth, ClientAuth::Basic);
    assert_eq!(c.request_format, RequestFormat::Form);
    assert!(c.refresh_token.rotating);
    assert_eq!(c.refresh_token.idle_lifetime.map(|d| d.0), days(60));
    assert!(c.answer_fields.contains(&"api_domain".to_string()));
    assert!(c
        .dead_grant_answers
        .iter()
        .any(|r| r.status == Some(400)
            && r.body_contains.as_deref() == Some("refresh_token is invalid")));
    assert_eq!(format, "Bearer {token}");

    // T-Bank: Basic auth, form body, a refresh rate limit below the 20 per second that
    // invalidates the token, a year's refresh token.
    let (c, format) = resolved("tbank", "");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://id.tbank.ru/auth/token"
    );
    assert_eq!(c.client_auth, ClientAuth::Basic);
    assert_eq!(c.request_format, RequestFormat::Form);
    assert!(c.refresh_token.rotating);
    let limit = c.refresh_token.rate_limit.expect("a rate limit");
    assert!(
        f64::from(limit.count) / limit.per.0.as_secs_f64() < 20.0,
        "{limit:?}"
    );
    assert_eq!(c.refresh_token.absolute_lifetime.map(|d| d.0), days(365));
    assert_eq!(format, "Bearer {token}");

    // Yandex: form body to oauth.yandex.ru/token, `Authorization: OAuth {token}`, a
    // refresh about three months into a one-year token.
    let (c, format) = resolved("yandex", "");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://oauth.yandex.ru/token"
    );
    assert_eq!(c.request_format, RequestFormat::Form);
    assert!(c.refresh_token.rotating);
    assert!((c.refresh_at - 0.25).abs() < 1e-9, "{}", c.refresh_at);
    assert_eq!(format, "OAuth {token}");

    // GitHub App: single-use refresh tokens of 6 months, `bad_refresh_token` a dead grant
    // at any status (GitHub answers errors with 200).
    let (c, format) = resolved("github_app", "");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://github.com/login/oauth/access_token"
    );
    assert!(c.refresh_token.rotating);
    assert_eq!(c.refresh_token.absolute_lifetime.map(|d| d.0), days(180));
    assert!(c
        .dead_grant_answers
        .iter()
        .any(|r| r.status.is_none() && r.error.as_deref() == Some("bad_refresh_token")));
    assert_eq!(format, "Bearer {token}");

    // `tokenrelay providers` lists them, and shows each in full.
    listed_and_shown(&["zendesk", "pipedrive", "tbank", "yandex", "github_app"]);
}

/// `tokenrelay schema` is a draft 2020-12 JSON Schema that accepts the shipped example
/// and every config example in the docs, and refuses a misspelt key.
#[test]
fn the_schema_accepts_every_documented_example() {
    let out = Command::new(support::binary())
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let validator = jsonschema::draft202012::new(&schema).expect("a valid schema");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut examples = vec![(
        "config.example.yaml".to_string(),
        std::fs::read_to_string(root.join("config.example.yaml")).unwrap(),
    )];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .chain(std::fs::read_dir(root.join("docs/providers")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.push(root.join("README.md"));
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            examples.push((
                format!("{} yaml block {}", doc.display(), i + 1),
                block.into(),
            ));
        }
    }
    let top = [
        "admin",
        "store",
        "log",
        "runtime",
        "credentials",
        "upstreams",
    ];
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, yaml) in &examples {
        // Fragments (a credential's keys alone, `...` placeholders) are not whole files.
        let Ok(value) = serde_yaml::from_str::<serde_json::Value>(yaml) else {
            continue;
        };
        let whole = value
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.keys().all(|k| top.contains(&k.as_str())));
        // The Helm chart's values (lists of credentials, `...Ref` and `extraConfig`
        // keys) are not config files.
        let chart_values = ["credentials", "upstreams"]
            .iter()
            .any(|k| value[k].is_array())
            || yaml.contains("Ref:")
            || yaml.contains("extraConfig");
        if !whole || chart_values {
            continue;
        }
        checked += 1;
        for e in validator.iter_errors(&value) {
            failures.push(format!("{name}: {} at {}", e, e.instance_path()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 10, "only {checked} examples checked");
    let typo: serde_json::Value =
        serde_yaml::from_str("credentials:\n  crm: { grant: client_credentials, tokn_url: x }\n")
            .unwrap();
    assert!(
        !validator.is_valid(&typo),
        "a misspelt key passes the schema"
    );
}

/// The next presets of issue 24 §3, each against the facts its file cites.
#[test]
fn the_2027b_presets_expand_to_their_documented_settings() {
    use std::time::Duration;
    use tokenrelay::config::{ClientAuth, RequestFormat};
    let days = |d: u64| Some(Duration::from_secs(d * 86400));
    let resolved = |provider: &str, params: &str| {
        let cfg = parse(&preset_yaml(provider, params, ""))
            .unwrap_or_else(|e| panic!("preset {provider}: {e}"));
        let u = &cfg.upstreams["crm"];
        (
            cfg.credentials["crm"].clone(),
            u.header.to_ascii_lowercase(),
            u.format.clone(),
        )
    };

    // Shopify: JSON refresh to {shop}.myshopify.com/admin/oauth/access_token, a new
    // refresh token on every use living 90 days, the bare token in X-Shopify-Access-Token.
    let (c, header, format) = resolved("shopify", "shop: acme");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://acme.myshopify.com/admin/oauth/access_token"
    );
    assert_eq!(
        c.authorize_url.as_ref().map(|u| u.to_string()).as_deref(),
        Some("https://acme.myshopify.com/admin/oauth/authorize")
    );
    assert_eq!(c.request_format, RequestFormat::Json);
    assert_eq!(c.client_auth, ClientAuth::RequestBody);
    assert!(c.refresh_token.rotating);
    assert_eq!(c.refresh_token.idle_lifetime.map(|d| d.0), days(90));
    assert_eq!(header, "x-shopify-access-token");
    assert_eq!(format, "{token}");
    assert_refused(
        &preset_yaml("shopify", "shop: acme.myshopify.com", ""),
        "credentials.crm.provider_params.shop",
        &["write shop: acme"],
    );
    // An upstream's own header wins over the preset's.
    let own = preset_yaml("shopify", "shop: acme", "").replace(
        "credential: crm }",
        "credential: crm, header: Authorization, format: \"Bearer {token}\" }",
    );
    let cfg = parse(&own).unwrap();
    assert!(cfg.upstreams["crm"]
        .header
        .eq_ignore_ascii_case("authorization"));
    assert_eq!(cfg.upstreams["crm"].format, "Bearer {token}");

    // Slack: form refresh with HTTP Basic to oauth.v2.access, rotating, 12-hour tokens,
    // `bot`/`user` token types accepted, `invalid_refresh_token` a dead grant at any
    // status (Slack answers errors with 200 and "ok": false).
    let (c, header, format) = resolved("slack", "");
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://slack.com/api/oauth.v2.access"
    );
    assert_eq!(c.client_auth, ClientAuth::Basic);
    assert_eq!(c.request_format, RequestFormat::Form);
    assert!(c.refresh_token.rotating);
    assert_eq!(c.default_expires_in.0, Duration::from_secs(12 * 3600));
    assert_eq!(c.token_types, ["bot", "user"]);
    assert!(c
        .dead_grant_answers
        .iter()
        .any(|r| r.status.is_none() && r.error.as_deref() == Some("invalid_refresh_token")));
    assert_eq!(header, "authorization");
    assert_eq!(format, "Bearer {token}");

    // `tokenrelay providers` lists them, and shows each in full.
    for (name, shown) in listed_and_shown(&["shopify", "slack"]) {
        if name == "shopify" {
            assert!(
                shown.contains("upstream header: \"X-Shopify-Access-Token\""),
                "{shown}"
            );
        }
    }
}

/// The Zoom preset: HTTP Basic and a form body to zoom.us/oauth/token, rotating refresh
/// tokens, one-hour access tokens, a 15-year refresh-token lifetime, "Invalid Token!" a
/// dead grant at any status, and `tokenrelay providers` lists and shows it.
#[test]
fn the_zoom_preset_expands_to_its_documented_settings() {
    use std::time::Duration;
    use tokenrelay::config::{ClientAuth, RequestFormat};
    let cfg = parse(&preset_yaml("zoom", "", "")).unwrap_or_else(|e| panic!("preset zoom: {e}"));
    let c = &cfg.credentials["crm"];
    assert_eq!(
        c.token_url.as_ref().unwrap().as_str(),
        "https://zoom.us/oauth/token"
    );
    assert_eq!(c.client_auth, ClientAuth::Basic);
    assert_eq!(c.request_format, RequestFormat::Form);
    assert!(c.refresh_token.rotating);
    assert_eq!(c.default_expires_in.0, Duration::from_secs(3600));
    assert_eq!(
        c.refresh_token.absolute_lifetime.map(|d| d.0),
        Some(Duration::from_secs(15 * 365 * 86400))
    );
    assert!(c.dead_grant_answers.iter().any(|r| r.status.is_none()
        && r.error.is_none()
        && r.body_contains.as_deref() == Some("Invalid Token!")));
    let u = &cfg.upstreams["crm"];
    assert!(u.header.eq_ignore_ascii_case("authorization"));
    assert_eq!(u.format, "Bearer {token}");

    listed_and_shown(&["zoom"]);
}

/// `token_types` names the `token_type` values accepted besides Bearer: type names only,
/// kept lowercase; Bearer (always accepted) is dropped; `grant: static` has no token answer.
#[test]
fn token_types_are_checked() {
    let cfg = parse(&preset_yaml(
        "github_app",
        "",
        ", token_types: [Bot, user, bearer, bot]",
    ))
    .unwrap();
    assert_eq!(cfg.credentials["crm"].token_types, ["bot", "user"]);
    assert!(parse(&preset_yaml("github_app", "", ""))
        .unwrap()
        .credentials["crm"]
        .token_types
        .is_empty());
    assert_refused(
        &preset_yaml("github_app", "", ", token_types: [\"bot user\"]"),
        "credentials.crm.token_types",
        &["\"bot user\" is not a token type name"],
    );
    assert_refused(
        &preset_yaml("github_app", "", ", token_types: [\"\"]"),
        "credentials.crm.token_types",
        &["is not a token type name"],
    );
    let static_yaml = "credentials:\n  crm: { grant: static, token: t, token_types: [bot] }\nupstreams:\n  crm: { listen: 127.0.0.1:18081, url: https://api.example.com, credential: crm }\n";
    assert_refused(
        static_yaml,
        "credentials.crm.token_types",
        &["not used by grant static"],
    );
}

/// `refresh_mode: on_demand` (Bitrix24's preset) refreshes only for proxied requests, so
/// `check` warns when sink files are to be kept fresh too.
#[test]
fn on_demand_refreshing_with_token_sinks_is_warned_about() {
    let sinks = ", redirect_uri: https://example.com/cb, sinks: [{ file: /run/tokens/b24.json }]";
    let warned = parse(&preset_yaml("bitrix24", "portal: acme.bitrix24.ru", sinks))
        .unwrap()
        .warnings();
    assert!(
        warned.iter().any(|w| {
            w.starts_with(
            "credentials.crm.refresh_mode: on_demand refreshes only for requests through tokenrelay"
        )
        }),
        "{warned:?}"
    );
    let proactive = format!("{sinks}, refresh_mode: proactive");
    let warned = parse(&preset_yaml(
        "bitrix24",
        "portal: acme.bitrix24.ru",
        &proactive,
    ))
    .unwrap()
    .warnings();
    assert!(
        !warned.iter().any(|w| w.contains("refresh_mode")),
        "{warned:?}"
    );
}

/// Every preset `tokenrelay providers` lists shows user-facing notes: at least 27 presets,
/// none of whose notes speak of how its facts were gathered.
#[test]
fn every_preset_shows_user_facing_notes() {
    let out = Command::new(support::binary())
        .arg("providers")
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = list
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.len() >= 27, "{list}");
    listed_and_shown(&names);
}

/// Asserts that `tokenrelay providers` lists each of `names`, and that `tokenrelay
/// providers NAME` shows its sources and user-facing notes; returns what each showed.
fn listed_and_shown(names: &[&str]) -> Vec<(String, String)> {
    let out = Command::new(support::binary())
        .arg("providers")
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    names
        .iter()
        .map(|name| {
            assert!(
                list.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} not listed:\n{list}"
            );
            let out = Command::new(support::binary())
                .args(["providers", name])
                .output()
                .unwrap();
            assert!(out.status.success(), "providers {name}");
            let shown = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(shown.contains("# source: https://"), "{shown}");
            assert!(
                shown.contains("\nnotes (what the provider's documentation leaves open"),
                "{shown}"
            );
            // User-facing: nothing about how the facts were gathered.
            for internal in ["brief", "issue 12", "pages read", "this project"] {
                assert!(
                    !shown.contains(internal),
                    "{name}: {internal:?} in\n{shown}"
                );
            }
            (name.to_string(), shown)
        })
        .collect()
}
