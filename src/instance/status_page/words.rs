//! Times and counts in words: "in 4m 10s", "3h ago", the summary line.

use serde_json::Value;

/// A span of seconds, coarsely: "2d 3h", "4h 10m", "5m 2s", "40s".
pub fn span(s: i64) -> String {
    let s = s.unsigned_abs();
    if s >= 2 * 86400 {
        format!("{}d {}h", s / 86400, s % 86400 / 3600)
    } else if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// "in 5m 2s" for a time ahead, "5m 2s ago" for one behind.
pub fn relative(seconds_ahead: i64) -> String {
    if seconds_ahead == 0 {
        "just now".into()
    } else if seconds_ahead > 0 {
        format!("in {}", span(seconds_ahead))
    } else {
        format!("{} ago", span(seconds_ahead))
    }
}

/// Seconds from `now_ms` to an RFC 3339 time, when it parses.
pub fn seconds_until(at: &Value, now_ms: u64) -> Option<i64> {
    let t = humantime::parse_rfc3339(at.as_str()?).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
    Some((ms - now_ms as i64) / 1000)
}

/// "3 of 4 credentials healthy · 1 needs re-authorization", and the worst class of it
/// (`ok`, `warn` or `bad`) for its colour.
pub fn summary(credentials: &serde_json::Map<String, Value>) -> (String, &'static str) {
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in credentials.values() {
        *by_state
            .entry(c["state"].as_str().unwrap_or("unknown"))
            .or_default() += 1;
    }
    let total = credentials.len();
    let healthy = by_state.get("ready").copied().unwrap_or(0);
    let noun = if total == 1 {
        "credential"
    } else {
        "credentials"
    };
    let mut parts = vec![format!("{healthy} of {total} {noun} healthy")];
    let mut class = "ok";
    for (state, words, severity) in [
        (
            "reauthorization_required",
            "needs re-authorization|need re-authorization",
            "bad",
        ),
        ("unavailable", "is unavailable|are unavailable", "bad"),
        ("moved", "moved away|moved away", "warn"),
        ("degraded", "is degraded|are degraded", "warn"),
        ("initializing", "is starting|are starting", "warn"),
    ] {
        let Some(&n) = by_state.get(state) else {
            continue;
        };
        let (one, many) = words.split_once('|').unwrap_or((words, words));
        parts.push(format!("{n} {}", if n == 1 { one } else { many }));
        if class != "bad" {
            class = severity;
        }
    }
    (parts.join(" · "), class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_states() {
        let creds = serde_json::json!({
            "a": {"state": "ready"}, "b": {"state": "ready"}, "c": {"state": "ready"},
            "d": {"state": "reauthorization_required"}
        });
        let (line, class) = summary(creds.as_object().unwrap());
        assert_eq!(
            line,
            "3 of 4 credentials healthy · 1 needs re-authorization"
        );
        assert_eq!(class, "bad");
        let (line, class) = summary(
            serde_json::json!({"a": {"state": "ready"}})
                .as_object()
                .unwrap(),
        );
        assert_eq!((line.as_str(), class), ("1 of 1 credential healthy", "ok"));
    }

    #[test]
    fn spans_read_as_words() {
        assert_eq!(relative(125), "in 2m 5s");
        assert_eq!(relative(0), "just now");
        assert_eq!(relative(-7200), "2h 0m ago");
        assert_eq!(span(3 * 86400 + 3600), "3d 1h");
    }
}
