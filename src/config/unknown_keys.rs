//! Every unknown key of a config at once, each with the closest known key: serde stops
//! at the first one, so each is taken out of the document and the rest read again.

use serde::de::DeserializeOwned;

/// At most this many unknown keys are collected (a wrong file, not a typo, beyond it).
const MAX_UNKNOWN: usize = 50;
/// The known keys are listed when there are this few; a long list helps nobody.
const SHOWN_KNOWN: usize = 12;

/// A serde problem with the key path it is at.
pub struct Located {
    pub path: String,
    pub message: String,
}

/// Deserializes `value` as `T`. On failure, every unknown key (with "did you mean")
/// and then the first other problem, each as `path: message`.
pub fn deserialize<T: DeserializeOwned>(mut value: serde_yaml::Value) -> Result<T, Vec<String>> {
    let mut problems = Vec::new();
    loop {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) if problems.is_empty() => return Ok(t),
            Ok(_) => return Err(problems),
            Err(e) => Located {
                path: e.path().to_string(),
                message: e.into_inner().to_string(),
            },
        };
        match unknown_field(&error) {
            Some((parent, field, expected))
                if problems.len() < MAX_UNKNOWN && remove(&mut value, &parent, &field) =>
            {
                let full = join(&parent, &field);
                problems.push(match closest(&field, &expected) {
                    Some(known) => format!("{full}: unknown key; did you mean `{known}`?"),
                    None if expected.is_empty() || expected.len() > SHOWN_KNOWN => {
                        format!("{full}: unknown key")
                    }
                    None => format!("{full}: unknown key (known here: {})", expected.join(", ")),
                });
            }
            _ => {
                // One mistake, one error: a problem that follows from a key already
                // reported (a required key misspelt) is not reported again.
                let follows = problems.iter().any(|p| {
                    error.message.starts_with("missing field")
                        && p.starts_with(&join(&error.path, ""))
                });
                if !follows {
                    problems.push(super::describe_serde_error(&error.path, &error.message));
                }
                return Err(problems);
            }
        }
    }
}

/// `(the path of the mapping holding it, the unknown key, the keys known there)`.
fn unknown_field(e: &Located) -> Option<(String, String, Vec<String>)> {
    let rest = e.message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let field = rest[..end].to_string();
    let expected = rest[end..]
        .split_once("expected ")
        .map(|(_, list)| {
            list.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    // serde_path_to_error has usually recorded the unknown key as the last segment.
    let path = if e.path == "." { "" } else { e.path.as_str() };
    let parent = match path.strip_suffix(field.as_str()) {
        Some(p) if p.is_empty() || p.ends_with('.') => p.trim_end_matches('.').to_string(),
        _ => path.to_string(),
    };
    Some((parent, field, expected))
}

/// Removes `field` from the mapping at `parent` (dotted keys, `[n]` for list items).
fn remove(value: &mut serde_yaml::Value, parent: &str, field: &str) -> bool {
    let mut at = value;
    for segment in parent.split('.').filter(|s| !s.is_empty()) {
        let (key, index) = match segment.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        if !key.is_empty() {
            match at.get_mut(key) {
                Some(v) => at = v,
                None => return false,
            }
        }
        if let Some(i) = index {
            match at.get_mut(i) {
                Some(v) => at = v,
                None => return false,
            }
        }
    }
    at.as_mapping_mut().and_then(|m| m.remove(field)).is_some()
}

fn join(parent: &str, field: &str) -> String {
    match (parent.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => parent.to_string(),
        (false, false) => format!("{parent}.{field}"),
    }
}

/// The known key closest to `field`, when it is close enough to be a misspelling.
fn closest<'a>(field: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(field, k), k))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelling_gets_the_closest_known_key() {
        let known: Vec<String> = ["token_url", "token_timeout", "client_id"]
            .map(String::from)
            .into();
        assert_eq!(closest("tokn_url", &known), Some("token_url"));
        assert_eq!(closest("token_timeot", &known), Some("token_timeout"));
        assert_eq!(closest("bogus_key", &known), None);
    }
}
