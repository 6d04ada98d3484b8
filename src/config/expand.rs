//! `${VAR}` expansion in config string values, before typed parsing, so every error
//! can name the key path of the value that referenced the variable.

use serde_yaml::Value;

/// Expands `${VAR}` in every string scalar of `value` from `lookup`. `$${` escapes a
/// literal `${`. An unset variable is an error naming the key path and the variable.
pub fn expand_env(
    value: &mut Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand_str(s, lookup) {
            Ok(out) => *s = out,
            Err(Unset(var)) => errors.push(format!(
                "{path}: environment variable {var} is not set (referenced as ${{{var}}})"
            )),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"), lookup, errors);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                expand_env(v, &child, lookup, errors);
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path, lookup, errors),
        _ => {}
    }
}

/// The first variable a string names that is not set.
#[derive(Debug, PartialEq, Eq)]
struct Unset(String);

/// Expands one string; `Err` names the first unset variable.
fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, Unset> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                out.push('$');
                rest = after;
                continue;
            };
            let name = &body[..end];
            let value = lookup(name).ok_or_else(|| Unset(name.to_string()))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "ID").then(|| "abc".to_string())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand_str("x-${ID}-y", &env).unwrap(), "x-abc-y");
        assert_eq!(expand_str("$${ID} $5 ${ID}", &env).unwrap(), "${ID} $5 abc");
        assert_eq!(expand_str("${NOPE}", &env), Err(Unset("NOPE".into())));
    }

    #[test]
    fn unset_names_the_key_path() {
        let mut v: Value =
            serde_yaml::from_str("credentials:\n  crm:\n    client_id: ${MISSING}\n").unwrap();
        let mut errors = vec![];
        expand_env(&mut v, "", &env, &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("credentials.crm.client_id: environment variable MISSING"));
    }
}
