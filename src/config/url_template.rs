//! Upstream URLs taken from a token answer, and the answer fields tokenrelay keeps.
//!
//! Some providers name the API host in the token answer rather than in their docs:
//! Salesforce's `instance_url`, Bitrix24's `client_endpoint`, Zoho's `api_domain`. A
//! credential keeps such fields (`answer_fields`, from its preset, its own key, and every
//! field an upstream's url names), stores them with the token, and an upstream may take
//! its base URL from one: `url: "{token.instance_url}/services/data/v59.0"`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use url::Url;

/// Longest field value kept (an instance URL is far shorter).
pub const MAX_FIELD_VALUE: usize = 2048;

/// An upstream's `url`: fixed in the config, or a template over a token-answer field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamUrl {
    Fixed(Url),
    Template(UrlTemplate),
}

impl UpstreamUrl {
    /// The URL, or the template as written.
    pub fn as_str(&self) -> &str {
        match self {
            UpstreamUrl::Fixed(u) => u.as_str(),
            UpstreamUrl::Template(t) => &t.source,
        }
    }

    /// The URL when it is fixed.
    pub fn fixed(&self) -> Option<&Url> {
        match self {
            UpstreamUrl::Fixed(u) => Some(u),
            UpstreamUrl::Template(_) => None,
        }
    }

    /// The template when the URL comes from the token answer.
    pub fn template(&self) -> Option<&UrlTemplate> {
        match self {
            UpstreamUrl::Fixed(_) => None,
            UpstreamUrl::Template(t) => Some(t),
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `{token.FIELD}` followed by an optional path: the field's value is the base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlTemplate {
    /// As written in the config.
    pub source: String,
    /// The token-answer field whose value starts the URL.
    pub field: String,
    /// What follows: empty, or a path starting with `/`.
    pub path: String,
}

/// An upstream whose url is a template, as its credential knows it (the credential
/// resolves it each time it publishes a token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplatedUpstream {
    pub upstream: String,
    pub template: UrlTemplate,
    pub allow_insecure_http: bool,
}

/// Why a template gave no usable URL for a token: the field and the rule its value
/// broke. Never quotes a value, which may hold a secret (a URL's `user:password@` or
/// query, or something that is not a URL at all); at most the scheme and host of a
/// value that is a URL, an instance address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// No answer so far carried the field.
    #[error(
        "no token answer so far carried the field {field}, which the upstream url {template} needs"
    )]
    Missing { field: String, template: String },
    /// The last answer carried the field, but its value was not kept (and no earlier
    /// value is known).
    #[error("the token answer's field {field} was not kept: {rule}; the upstream url {template} needs it")]
    Refused {
        field: String,
        template: String,
        rule: ValueRule,
    },
    /// The field's value does not make a usable upstream url.
    #[error("the token answer's field {field}{} does not make a usable upstream url for {template}: {rule}", origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    Unusable {
        field: String,
        template: String,
        /// `scheme://host[:port]` of the value, when it is a URL with a host.
        origin: Option<String>,
        rule: UrlRule,
    },
    /// Not expected: every template of a credential is resolved when a token is published.
    #[error("the upstream url has not been resolved for this token")]
    NotResolved,
}

impl Unresolved {
    /// Whether no value is known (503, as for a missing token) rather than an unusable
    /// one (502).
    pub fn is_missing(&self) -> bool {
        matches!(self, Unresolved::Missing { .. } | Unresolved::NotResolved)
    }
}

/// Why an answer field's value is not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueRule {
    #[error("its value is not a string")]
    NotAString,
    #[error("it is given more than once with different values")]
    Ambiguous,
    #[error("its value is empty")]
    Empty,
    #[error("its value is longer than {MAX_FIELD_VALUE} bytes")]
    TooLong,
    #[error("its value contains control characters")]
    ControlCharacters,
}

/// Why a kept value does not make a usable upstream url.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlRule {
    /// The parser's reason names no part of the value.
    #[error("it is not an absolute URL ({0})")]
    NotAbsolute(url::ParseError),
    #[error("it must use https:// (the upstream does not set allow_insecure_http)")]
    NotHttps,
    #[error("scheme {0:?} is not supported")]
    Scheme(String),
    #[error("it has no host")]
    NoHost,
    #[error("credentials in the URL (user:password@) are not allowed")]
    Credentials,
    #[error("it has a query or fragment")]
    QueryOrFragment,
    /// The host and port do not make an HTTP authority.
    #[error("{0}")]
    Authority(String),
}

/// Why a configured url template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{template:?}: {problem}")]
pub struct TemplateError {
    pub template: String,
    pub problem: TemplateProblem,
}

/// What is wrong with a url template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateProblem {
    #[error("the only placeholder is {{token.FIELD}}, a field of the token answer, e.g. {{token.instance_url}}")]
    OtherPlaceholder,
    #[error("a url template must start with {{token.FIELD}} (e.g. \"{{token.instance_url}}/services/data\"); the field's value is the base URL, optionally followed by a path")]
    NoLeadingField,
    #[error("{{token. is not closed with }}")]
    NotClosed,
    #[error(transparent)]
    Field(FieldNameError),
    #[error("only one {{token.FIELD}}, at the start, is supported")]
    SecondField,
    #[error("must not have a query or fragment")]
    QueryOrFragment,
    #[error("what follows {{token.{field}}} must be a path starting with '/'")]
    PathWithoutSlash { field: String },
    #[error("the path after the field is not a URL path")]
    NotAPath,
}

/// Why a name cannot be an answer field kept for templates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldNameError {
    #[error("{0:?} is not a field name (letters, digits and '_', not starting with a digit)")]
    NotAName(String),
    #[error("{0:?} looks like a secret (a token, secret, password, session, key or code, in any spelling such as apiKey); only fields such as instance_url are kept")]
    SecretLooking(String),
}

/// Whether a configured url is meant as a template.
pub fn is_template(s: &str) -> bool {
    s.contains(['{', '}'])
}

impl UrlTemplate {
    /// Parses `{token.FIELD}` plus an optional path; errors say what is wrong.
    pub fn parse(s: &str) -> Result<UrlTemplate, TemplateError> {
        let bad = |problem| TemplateError {
            template: s.to_string(),
            problem,
        };
        let Some(rest) = s.strip_prefix("{token.") else {
            return Err(bad(if s.starts_with('{') {
                TemplateProblem::OtherPlaceholder
            } else {
                TemplateProblem::NoLeadingField
            }));
        };
        let Some(end) = rest.find('}') else {
            return Err(bad(TemplateProblem::NotClosed));
        };
        let field = &rest[..end];
        check_field_name(field).map_err(|e| bad(TemplateProblem::Field(e)))?;
        let path = &rest[end + 1..];
        if path.contains(['{', '}']) {
            return Err(bad(TemplateProblem::SecondField));
        }
        if path.contains(['?', '#']) {
            return Err(bad(TemplateProblem::QueryOrFragment));
        }
        if !(path.is_empty() || path.starts_with('/')) {
            return Err(bad(TemplateProblem::PathWithoutSlash {
                field: field.to_string(),
            }));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control())
            || Url::parse(&format!("https://example.invalid{path}")).is_err()
        {
            return Err(bad(TemplateProblem::NotAPath));
        }
        Ok(UrlTemplate {
            source: s.to_string(),
            field: field.to_string(),
            path: path.to_string(),
        })
    }

    /// The URL for a token whose answers carried `fields`: the field's value with the
    /// path appended (one `/` between them), absolute, https unless `allow_insecure_http`.
    /// `refused` names the fields the last answer carried but were not kept, and why.
    pub fn resolve(
        &self,
        fields: &BTreeMap<String, String>,
        refused: &BTreeMap<String, ValueRule>,
        allow_insecure_http: bool,
    ) -> Result<Url, Unresolved> {
        let (field, template) = (self.field.clone(), self.source.clone());
        let Some(value) = fields.get(&self.field) else {
            return Err(match refused.get(&self.field) {
                Some(&rule) => Unresolved::Refused {
                    field,
                    template,
                    rule,
                },
                None => Unresolved::Missing { field, template },
            });
        };
        let joined = if self.path.is_empty() {
            value.clone()
        } else {
            format!("{}{}", value.trim_end_matches('/'), self.path)
        };
        let unusable = |origin, rule| Unresolved::Unusable {
            field,
            template,
            origin,
            rule,
        };
        let url = match Url::parse(&joined) {
            Ok(url) => url,
            Err(e) => return Err(unusable(None, UrlRule::NotAbsolute(e))),
        };
        url_rule(&url, allow_insecure_http).map_err(|rule| unusable(origin(&url), rule))?;
        Ok(url)
    }
}

/// The first rule `url` breaks as an upstream base, if any.
fn url_rule(url: &Url, allow_insecure_http: bool) -> Result<(), UrlRule> {
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http => {}
        "http" => return Err(UrlRule::NotHttps),
        other => return Err(UrlRule::Scheme(other.to_string())),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlRule::NoHost);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRule::Credentials);
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(UrlRule::QueryOrFragment);
    }
    Ok(())
}

/// `scheme://host[:port]` of `url`, the part of a value messages may quote: never its
/// credentials, path or query.
fn origin(url: &Url) -> Option<String> {
    let host = url.host_str().filter(|h| !h.is_empty())?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    Some(format!("{}://{host}{port}", url.scheme()))
}

/// A field name: letters, digits and `_`, not starting with a digit, and nothing that
/// looks like a secret (answers' tokens are never kept as fields).
pub fn check_field_name(name: &str) -> Result<(), FieldNameError> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(FieldNameError::NotAName(name.to_string()));
    }
    if secret_looking(name) {
        return Err(FieldNameError::SecretLooking(name.to_string()));
    }
    Ok(())
}

/// Stems that mark a secret wherever they appear in a word of the name
/// (`refresh_token`, `refreshToken`, `refreshtoken`, `clientsecret`, `sessionid`).
const SECRET_STEMS: [&str; 10] = [
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "assertion",
    "credential",
    "cookie",
    "session",
    "jwt",
];

/// Words that mark a secret alone or ending a concatenated word, plural too (`api_key`,
/// `apiKey`, `apikey`, `auth_code`, `devicecode`, `user_sid`); never as a prefix, so
/// `keycloak_realm` passes.
const SECRET_TAILS: [&str; 3] = ["key", "code", "sid"];

/// RFC 6749 §5.1 names that contain a stem but never hold a secret (`token_type` is a
/// word such as `Bearer`), compared with the words joined.
const NOT_SECRET: [&str; 1] = ["tokentype"];

/// Names of answer fields that are or may be secrets: never kept, whatever is configured.
/// The name is split into words on `_`, `-`, digits and camelCase humps, so every spelling
/// of a name is judged alike.
pub fn secret_looking(name: &str) -> bool {
    let words = name_words(name);
    if NOT_SECRET.contains(&words.concat().as_str()) {
        return false;
    }
    words.iter().any(|w| {
        SECRET_STEMS.iter().any(|s| w.contains(s))
            || SECRET_TAILS
                .iter()
                .any(|t| w.ends_with(t) || w.strip_suffix('s').is_some_and(|w| w.ends_with(t)))
    })
}

/// The lowercase words of a field name: split at anything but a letter, before an
/// upper-case letter that follows a lower-case one (`apiKey`), and before the last
/// capital of an acronym followed by lower case (`APIKey` -> `api`, `key`).
fn name_words(name: &str) -> Vec<String> {
    let chars: Vec<char> = name.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_alphabetic() {
            words.extend((!word.is_empty()).then(|| std::mem::take(&mut word)));
            continue;
        }
        let prev = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1);
        let hump = c.is_ascii_uppercase()
            && (prev.is_some_and(|p| p.is_ascii_lowercase())
                || (prev.is_some_and(|p| p.is_ascii_uppercase())
                    && next.is_some_and(|n| n.is_ascii_lowercase())));
        if hump && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        word.push(c.to_ascii_lowercase());
    }
    words.extend((!word.is_empty()).then_some(word));
    words
}

/// `fields` without those whose name looks like a secret: a state stored by a version
/// whose rule missed a spelling (`apiKey`) neither shows nor keeps such a field.
pub fn without_secret_looking(mut fields: BTreeMap<String, String>) -> BTreeMap<String, String> {
    fields.retain(|name, _| !secret_looking(name));
    fields
}

/// Whether an answer field's string value is worth keeping: non-empty, printable, at
/// most [`MAX_FIELD_VALUE`] bytes long.
pub fn check_value(value: &str) -> Result<(), ValueRule> {
    if value.is_empty() {
        Err(ValueRule::Empty)
    } else if value.len() > MAX_FIELD_VALUE {
        Err(ValueRule::TooLong)
    } else if value.chars().any(char::is_control) {
        Err(ValueRule::ControlCharacters)
    } else {
        Ok(())
    }
}

/// `previous` updated with `answer`: a field the answer carries replaces the one known,
/// a field it omits keeps its previous value (Salesforce sends `instance_url` on some
/// answers only). A secret-looking field of an older state is dropped.
pub fn merge_fields(
    previous: &BTreeMap<String, String>,
    answer: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = previous.clone();
    out.extend(answer.iter().map(|(k, v)| (k.clone(), v.clone())));
    without_secret_looking(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_field_and_path() {
        let t = UrlTemplate::parse("{token.instance_url}/services/data/v59.0").unwrap();
        assert_eq!(t.field, "instance_url");
        assert_eq!(t.path, "/services/data/v59.0");
        let t = UrlTemplate::parse("{token.api_domain}").unwrap();
        assert_eq!((t.field.as_str(), t.path.as_str()), ("api_domain", ""));
    }

    #[test]
    fn refuses_bad_templates() {
        for (bad, says) in [
            (
                "https://{token.instance_url}/x",
                "must start with {token.FIELD}",
            ),
            ("{instance_url}", "the only placeholder is {token.FIELD}"),
            (
                "{tokens.instance_url}",
                "the only placeholder is {token.FIELD}",
            ),
            ("{token.instance_url", "is not closed"),
            ("{token.}", "is not a field name"),
            ("{token.instance-url}", "is not a field name"),
            ("{token.1x}", "is not a field name"),
            ("{token.access_token}", "looks like a secret"),
            ("{token.refresh_token}/x", "looks like a secret"),
            ("{token.api_key}", "looks like a secret"),
            ("{token.apiKey}", "looks like a secret"),
            ("{token.sessionId}/x", "looks like a secret"),
            (
                "{token.instance_url}services",
                "must be a path starting with '/'",
            ),
            ("{token.instance_url}/a?b=1", "query or fragment"),
            ("{token.a}/{token.b}", "only one {token.FIELD}"),
            ("{token.instance_url}/a b", "not a URL path"),
        ] {
            let e = UrlTemplate::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn resolves_with_one_slash_between_value_and_path() {
        let none = BTreeMap::new();
        let t = UrlTemplate::parse("{token.client_endpoint}/profile").unwrap();
        let f = fields(&[("client_endpoint", "https://portal.bitrix24.com/rest/")]);
        assert_eq!(
            t.resolve(&f, &none, false).unwrap().as_str(),
            "https://portal.bitrix24.com/rest/profile"
        );
        let t = UrlTemplate::parse("{token.instance_url}").unwrap();
        let f = fields(&[("instance_url", "https://na1.salesforce.com")]);
        assert_eq!(
            t.resolve(&f, &none, false).unwrap().as_str(),
            "https://na1.salesforce.com/"
        );
    }

    /// Each rejection names the field and the rule; a value is never quoted, at most
    /// the scheme and host of a URL.
    #[test]
    fn unresolved_says_which_field_and_rule_never_the_value() {
        let none = BTreeMap::new();
        let t = UrlTemplate::parse("{token.instance_url}/x").unwrap();
        let e = t.resolve(&fields(&[]), &none, false).unwrap_err();
        assert!(
            e.is_missing() && e.to_string().contains("instance_url"),
            "{e}"
        );
        let refused = BTreeMap::from([("instance_url".to_string(), ValueRule::TooLong)]);
        let e = t.resolve(&fields(&[]), &refused, false).unwrap_err();
        assert!(!e.is_missing(), "{e}");
        assert!(
            e.to_string().contains("instance_url") && e.to_string().contains("longer than 2048"),
            "{e}"
        );
        for (value, rule, origin, hidden) in [
            (
                "http://na1.example.com",
                "https://",
                Some("http://na1.example.com"),
                None,
            ),
            (
                "na1-s3cr3t.example.com",
                "not an absolute URL",
                None,
                Some("s3cr3t"),
            ),
            (
                "ftp://na1.example.com",
                "scheme",
                Some("ftp://na1.example.com"),
                None,
            ),
            (
                "https://u:s3cr3t@na1.example.com:8443",
                "credentials",
                Some("https://na1.example.com:8443"),
                Some("s3cr3t"),
            ),
            (
                "https://na1.example.com/?sig=s3cr3t",
                "query",
                Some("https://na1.example.com"),
                Some("s3cr3t"),
            ),
            (
                "https://na1.example.com/#s3cr3t",
                "fragment",
                Some("https://na1.example.com"),
                Some("s3cr3t"),
            ),
        ] {
            let e = t
                .resolve(&fields(&[("instance_url", value)]), &none, false)
                .unwrap_err();
            let text = e.to_string();
            assert!(!e.is_missing() && text.contains("instance_url"), "{text}");
            assert!(text.contains(rule), "{value}: {text}");
            assert!(
                origin.is_none_or(|o| text.contains(&format!("({o})"))),
                "{text}"
            );
            assert!(hidden.is_none_or(|h| !text.contains(h)), "{text}");
        }
        assert!(t
            .resolve(
                &fields(&[("instance_url", "http://127.0.0.1:1")]),
                &none,
                true
            )
            .is_ok());
    }

    #[test]
    fn values_kept_are_non_empty_printable_and_bounded() {
        assert_eq!(check_value("https://na1.example.com"), Ok(()));
        assert_eq!(check_value(""), Err(ValueRule::Empty));
        assert_eq!(check_value(&"a".repeat(2049)), Err(ValueRule::TooLong));
        assert_eq!(check_value(&"a".repeat(2048)), Ok(()));
        assert_eq!(
            check_value("https://a\n"),
            Err(ValueRule::ControlCharacters)
        );
    }

    /// Every spelling of a secret's name is caught (snake, kebab, camelCase, PascalCase,
    /// acronyms, concatenated, digits), and the fields providers really send are not.
    #[test]
    fn secret_looking_names() {
        for s in [
            "access_token",
            "refresh_token",
            "id_token",
            "client_secret",
            "api_key",
            "code",
            "session_id",
            "sid",
            "x_password",
            // camelCase and PascalCase
            "apiKey",
            "sessionId",
            "clientSecret",
            "refreshToken",
            "idToken",
            "ApiKey",
            "SessionID",
            "APIKey",
            "userSid",
            "authCode",
            "codeVerifier",
            "privateKeyPem",
            "accessKeyId",
            "jwtAssertion",
            "userPwd",
            // concatenated
            "apikey",
            "sessionid",
            "clientsecret",
            "refreshtoken",
            "idtoken",
            "privatekey",
            "authcode",
            "devicecode",
            "apikeys",
            "usersession",
            "userpwd",
            "idjwt",
            // kebab and digits
            "api-key",
            "session-id",
            "x-api-key",
            "api_key2",
            "apiKey2",
            "key",
            "KEY",
            "session_state",
        ] {
            assert!(secret_looking(s), "{s} should look like a secret");
        }
        for s in [
            "instance_url",
            "api_domain",
            "client_endpoint",
            "server_endpoint",
            "domain",
            "member_id",
            "keycloak_realm",
            "scope",
            "token_type",
            "expires_in",
            "id",
            "issued_at",
            "signature",
            "sfdc_community_url",
            "sfdc_community_id",
            "instanceUrl",
            "apiDomain",
            "InstanceURL",
            "userId",
            "user_id",
            "status",
            "region",
            "keycloakRealm",
            "identity_url",
            "consideration",
        ] {
            assert!(!secret_looking(s), "{s} should not look like a secret");
        }
    }

    #[test]
    fn names_split_into_words_at_humps_acronyms_and_separators() {
        for (name, words) in [
            ("instance_url", &["instance", "url"][..]),
            ("apiKey", &["api", "key"]),
            ("APIKey", &["api", "key"]),
            ("SessionID", &["session", "id"]),
            ("x-api-key2", &["x", "api", "key"]),
            ("sfdc_community_url", &["sfdc", "community", "url"]),
            ("apikey", &["apikey"]),
        ] {
            assert_eq!(name_words(name), words, "{name}");
        }
    }

    #[test]
    fn merge_keeps_what_an_answer_omits() {
        let prev = fields(&[("instance_url", "https://a"), ("api_domain", "https://z")]);
        let m = merge_fields(&prev, &fields(&[("instance_url", "https://b")]));
        assert_eq!(
            m,
            fields(&[("instance_url", "https://b"), ("api_domain", "https://z")])
        );
        // A field an older version kept under a name now judged secret is dropped.
        let old = fields(&[("instance_url", "https://a"), ("apiKey", "k")]);
        assert_eq!(
            merge_fields(&old, &fields(&[])),
            fields(&[("instance_url", "https://a")])
        );
    }
}
