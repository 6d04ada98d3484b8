//! `GET /` on the admin listener: a small self-contained HTML page (no scripts, no
//! external assets) rendered from the same document as `/status`, refreshing itself.

use serde_json::Value;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn expires(v: &Value) -> String {
    match v.as_i64() {
        None => "–".into(),
        Some(s) if s <= 0 => "expired".into(),
        Some(s) if s >= 2 * 86400 => format!("{}d {}h", s / 86400, s % 86400 / 3600),
        Some(s) if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        Some(s) if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        Some(s) => format!("{s}s"),
    }
}

/// The refresh token's remaining life, marked when it is an estimate.
fn refresh_expiry(c: &Value) -> String {
    let left = expires(&c["refresh_token_expires_in_seconds"]);
    match c["refresh_token_expiry_estimated"] == Value::Bool(true) {
        true => format!("{left} (estimate)"),
        false => left,
    }
}

/// The access token's remaining life, or that none is known (static and long-lived
/// tokens).
fn token_expiry(c: &Value) -> String {
    if c["expiry_known"] == Value::Bool(false) {
        "no expiry known".into()
    } else {
        expires(&c["expires_in_seconds"])
    }
}

/// Renders the page from the `/status` document.
pub fn render(status: &Value) -> String {
    let mut creds = String::new();
    if let Some(map) = status["credentials"].as_object() {
        for (name, c) in map {
            let state = text(&c["state"]);
            let last = &c["last_refresh"];
            let last_text = if last.is_null() {
                "–".to_string()
            } else {
                format!(
                    "{} · {} · {}",
                    text(&last["at"]),
                    text(&last["trigger"]),
                    text(&last["result"])
                )
            };
            let sink_errors = c["sinks"].as_array().into_iter().flatten().filter_map(|s| {
                let error = s["last_error"].as_str()?;
                Some(format!("sink {}: {error}", text(&s["file"])))
            });
            let mut problem = [&last["error"], &c["store_error"], &c["detail"]]
                .iter()
                .filter(|v| !v.is_null())
                .map(|v| text(v))
                .chain(sink_errors)
                .collect::<Vec<_>>()
                .join("; ");
            if let Some(action) = c["reauthorization_required"]["action"].as_str() {
                problem = format!("{problem} — {action}");
            }
            creds.push_str(&format!(
                "<tr><td>{}</td><td><span class=\"state {}\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>\n",
                esc(name),
                esc(&state),
                esc(&state),
                esc(&text(&c["grant"])),
                esc(&text(&c["generation"])),
                esc(&token_expiry(c)),
                esc(&refresh_expiry(c)),
                esc(&last_text),
                esc(&problem),
            ));
        }
    }
    let mut ups = String::new();
    if let Some(map) = status["upstreams"].as_object() {
        for (name, u) in map {
            let counts = u["requests"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(code, n)| format!("{code}: {}", text(n)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "none yet".into());
            // A url template shows where the current token sends requests, or why nowhere.
            let resolved = &status["credentials"][text(&u["credential"])]["upstream_urls"][name];
            let forwards = match (&resolved["url"], &resolved["error"]) {
                (Value::String(url), _) => format!("{} → {url}", text(&u["url"])),
                (_, Value::String(e)) => format!("{} ({e})", text(&u["url"])),
                _ => text(&u["url"]),
            };
            ups.push_str(&format!(
                "<tr><td>{}</td><td>http://{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(name),
                esc(&text(&u["listen"])),
                esc(&forwards),
                esc(&text(&u["credential"])),
                esc(&text(&u["requests_total"])),
                esc(&counts),
            ));
        }
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenrelay status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 2em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .4em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.state {{ padding: .1em .5em; border-radius: .3em; color: #fff; background: #777; }}
.ready {{ background: #2e7d32; }} .degraded {{ background: #ef6c00; }}
.unavailable, .reauthorization_required {{ background: #c62828; }} .initializing {{ background: #1565c0; }}
.err {{ color: #c62828; }} footer {{ margin-top: 2em; color: #777; }}
</style></head>
<body>
<h1>tokenrelay {version}</h1>
<p>Store: {store}{rollback}. This page refreshes every 5 seconds; machine-readable: <a href="/status">/status</a>, <a href="/metrics">/metrics</a>.</p>
{sunsets}<h2>Credentials</h2>
<table><thead><tr><th>credential</th><th>state</th><th>grant</th><th>generation</th><th>expires in</th><th>refresh token dies in</th><th>last refresh</th><th>problem</th></tr></thead>
<tbody>
{creds}</tbody></table>
<h2>Upstreams</h2>
<table><thead><tr><th>upstream</th><th>listen</th><th>forwards to</th><th>credential</th><th>requests</th><th>by status</th></tr></thead>
<tbody>
{ups}</tbody></table>
<footer>Token values are never shown here or anywhere else.</footer>
</body></html>
"#,
        sunsets = sunset_notes(status),
        version = esc(&text(&status["version"])),
        store = esc(&text(&status["store"])),
        rollback = match status["store_rollback_detection"].as_str() {
            Some(note) => format!(" (restores: {})", esc(note)),
            None => String::new(),
        },
    )
}

/// One line per credential whose provider shuts down an endpoint it uses within 90 days.
fn sunset_notes(status: &Value) -> String {
    let Some(map) = status["credentials"].as_object() else {
        return String::new();
    };
    map.iter()
        .filter(|(_, c)| c["sunset"].is_object())
        .map(|(name, c)| {
            let s = &c["sunset"];
            format!(
                "<p class=\"err\">{}: {} ends on {}; use {} (<a href=\"{}\">announcement</a>)</p>\n",
                esc(name),
                esc(s["endpoint"].as_str().unwrap_or("what its preset relies on")),
                esc(&text(&s["date"])),
                esc(&text(&s["replacement"])),
                esc(&text(&s["source"])),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_shows_names() {
        let status = serde_json::json!({
            "version": "1", "store": "file",
            "credentials": {"crm": {"state": "ready", "grant": "refresh_token", "generation": 3,
                "expires_in_seconds": 125, "last_refresh": null, "detail": "<script>"}},
            "upstreams": {"crm": {"listen": "127.0.0.1:1", "url": "https://x", "credential": "crm",
                "requests_total": 2, "requests": {"200": 2}}}
        });
        let html = render(&status);
        assert!(html.contains("<td>crm</td>"));
        assert!(html.contains("2m 5s"));
        assert!(html.contains("200: 2"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn shows_where_a_url_template_goes() {
        let status = serde_json::json!({
            "credentials": {"sf": {"state": "ready", "upstream_urls": {
                "sf": {"template": "{token.instance_url}/x", "url": "https://na1.example.com/x", "error": null}}}},
            "upstreams": {"sf": {"listen": "127.0.0.1:1", "url": "{token.instance_url}/x", "credential": "sf"}}
        });
        assert!(render(&status).contains("{token.instance_url}/x → https://na1.example.com/x"));
    }

    #[test]
    fn shows_a_sunset_line() {
        let html = render(&serde_json::json!({
            "credentials": {"crm": {"state": "ready", "sunset": {
                "date": "2027-02-16", "days_left": 71,
                "endpoint": "https://api.hubapi.com/oauth/v1/token",
                "replacement": "https://api.hubapi.com/oauth/2026-03/token",
                "source": "https://developers.hubspot.com/changelog/v1-oauth-api-deprecation"}}},
            "upstreams": {}
        }));
        assert!(html.contains("<p class=\"err\">crm: https://api.hubapi.com/oauth/v1/token ends on 2027-02-16; use https://api.hubapi.com/oauth/2026-03/token"), "{html}");
        let html = render(
            &serde_json::json!({"credentials": {"crm": {"state": "ready"}}, "upstreams": {}}),
        );
        assert!(!html.contains("ends on"), "{html}");
    }

    #[test]
    fn shows_a_token_sink_that_cannot_be_written() {
        let status = serde_json::json!({
            "credentials": {"crm": {"state": "ready", "sinks": [
                {"file": "/run/tokens/a.json", "last_error": null},
                {"file": "/run/tokens/b.json", "last_error": "the directory /run/tokens does not exist"}]}}
        });
        let html = render(&status);
        assert!(html.contains("sink /run/tokens/b.json: the directory /run/tokens does not exist"));
        assert!(!html.contains("a.json"));
    }
}
