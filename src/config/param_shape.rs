//! The shape a preset parameter's value must have, checked before it is put into a URL:
//! `subdomain: mycompany.amocrm.ru` would otherwise build
//! `https://mycompany.amocrm.ru.amocrm.ru/...`, and a pasted `https://` would build
//! `https://https//...`. A refusal says what to write instead.

use serde::Deserialize;

/// What a `provider_params` value is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamShape {
    /// A name used in a path (a realm, a tenant, a server id): no `/`, `?`, `#` or
    /// white space.
    #[default]
    Name,
    /// One DNS label, the part of a host name before the provider's domain
    /// (`mycompany` in `mycompany.amocrm.ru`).
    Label,
    /// A host name, optionally with a port, without a scheme or a path.
    Host,
    /// An absolute `https://` (or `http://`) address without a trailing slash, query or
    /// fragment.
    BaseUrl,
}

/// Why a value does not have its shape; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; write {key}: {suggestion}")]
pub struct ShapeError {
    problem: String,
    key: String,
    suggestion: String,
}

impl ParamShape {
    /// Checks `value` of parameter `key`.
    pub fn check(self, key: &str, value: &str) -> Result<(), ShapeError> {
        let refuse = |problem: String, suggestion: String| ShapeError {
            problem,
            key: key.to_string(),
            suggestion,
        };
        let bare = without_scheme_and_path(value);
        match self {
            ParamShape::Name => {
                if value.contains(['/', '?', '#']) || value.contains(char::is_whitespace) {
                    return Err(refuse(
                        format!("{value:?} is not a plain name (no /, ?, # or spaces)"),
                        "a name such as \"default\"".into(),
                    ));
                }
            }
            ParamShape::Label => {
                if !is_label(value) {
                    let first = bare.split(['.', ':']).next().unwrap_or_default();
                    let why = if value.contains("://") {
                        "has a scheme"
                    } else if value.contains('.') {
                        "is a whole host name"
                    } else {
                        "is not a DNS label (letters, digits and -)"
                    };
                    return Err(refuse(
                        format!("{value:?} {why}; give only the first part of the host"),
                        first.to_string(),
                    ));
                }
            }
            ParamShape::Host => {
                if !is_host(value) {
                    return Err(refuse(
                        format!("{value:?} is not a bare host name (no scheme, no path)"),
                        bare.to_string(),
                    ));
                }
            }
            ParamShape::BaseUrl => check_base_url(value).map_err(|problem| {
                let fixed = if value.contains("://") {
                    value.trim_end_matches('/').to_string()
                } else {
                    format!("https://{}", value.trim_end_matches('/'))
                };
                refuse(format!("{value:?} {problem}"), fixed)
            })?,
        }
        Ok(())
    }
}

/// `https://a.b/c` → `a.b`: what is left of a pasted address once its scheme and path
/// are gone.
fn without_scheme_and_path(value: &str) -> &str {
    let rest = value.split_once("://").map_or(value, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or_default()
}

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
        && !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(is_label)
}

fn check_base_url(value: &str) -> Result<(), &'static str> {
    if !(value.starts_with("https://") || value.starts_with("http://")) {
        return Err("needs its scheme");
    }
    let url = url::Url::parse(value).map_err(|_| "is not a URL")?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("has a query or fragment");
    }
    if value.ends_with('/') {
        return Err("ends with a slash (paths are appended to it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suggestion(shape: ParamShape, value: &str) -> String {
        shape.check("p", value).unwrap_err().to_string()
    }

    #[test]
    fn good_values_pass() {
        assert!(ParamShape::Label.check("p", "my-company1").is_ok());
        assert!(ParamShape::Host.check("p", "mytenant.eu.auth0.com").is_ok());
        assert!(ParamShape::Host.check("p", "sso.example.com:8443").is_ok());
        assert!(ParamShape::BaseUrl
            .check("p", "https://sso.example.com/auth")
            .is_ok());
        assert!(ParamShape::Name.check("p", "organizations").is_ok());
    }

    #[test]
    fn refusals_say_what_to_write() {
        let e = suggestion(ParamShape::Label, "mycompany.amocrm.ru");
        assert!(
            e.contains("whole host name") && e.ends_with("write p: mycompany"),
            "{e}"
        );
        let e = suggestion(ParamShape::Label, "https://mycompany.amocrm.ru/");
        assert!(
            e.contains("has a scheme") && e.ends_with("write p: mycompany"),
            "{e}"
        );
        let e = suggestion(ParamShape::Host, "https://mycompany.okta.com/oauth2");
        assert!(e.ends_with("write p: mycompany.okta.com"), "{e}");
        let e = suggestion(ParamShape::BaseUrl, "https://x.elma365.ru/");
        assert!(e.ends_with("write p: https://x.elma365.ru"), "{e}");
        let e = suggestion(ParamShape::BaseUrl, "x.elma365.ru");
        assert!(e.ends_with("write p: https://x.elma365.ru"), "{e}");
        let e = suggestion(ParamShape::Name, "my realm/x");
        assert!(e.contains("not a plain name"), "{e}");
    }
}
