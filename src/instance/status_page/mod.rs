//! `GET /` on the admin listener: a self-contained HTML page (no scripts, no external
//! assets) rendered from the same document as `/status`, refreshing itself. At the top,
//! one coloured line says how many credentials are healthy and what the others need;
//! then each credential (those needing action first) with its countdowns, its last
//! error in words, a 24-hour timeline and what to do now; then each upstream with its
//! request rate over the last hour. [`svg`] draws the pictures, [`words`] the times.

mod svg;
mod words;

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

/// What the page needs besides the `/status` document.
pub struct Page<'a> {
    /// The time the document describes (Unix ms), for "ago" and "in".
    pub now_ms: u64,
    /// The token the page's forms carry (checked by the admin listener).
    pub csrf: &'a str,
    /// Whether actions need the `admin.token_file` token (the form asks for it).
    pub token_required: bool,
    /// The credentials whose `redirect_uri` the admin listener serves: they get an
    /// "Authorize again" button that starts the provider's flow.
    pub authorize_again: &'a [String],
}

/// "5m 2s ago (2026-12-07T18:00:00Z)" for an RFC 3339 time.
fn when(at: &Value, now_ms: u64) -> String {
    match words::seconds_until(at, now_ms) {
        Some(s) => format!("{} ({})", words::relative(s), text(at)),
        None => "–".into(),
    }
}

/// The access token's remaining life as a countdown, or that none is known.
fn token_expiry(c: &Value, now_ms: u64) -> String {
    if c["generation"].is_null() {
        "no token".into()
    } else if c["expiry_known"] == Value::Bool(false) {
        "no expiry known".into()
    } else {
        match c["expires_in_seconds"].as_i64() {
            Some(s) if s <= 0 => format!("expired {}", when(&c["expires_at"], now_ms)),
            Some(_) => format!("expires {}", when(&c["expires_at"], now_ms)),
            None => "–".into(),
        }
    }
}

/// The next attempt the refresher makes by itself.
fn next_attempt(c: &Value, now_ms: u64) -> String {
    let n = &c["next_attempt"];
    match n["kind"].as_str() {
        Some("retry") => format!(
            "retry {} · backoff step {}",
            when(&n["at"], now_ms),
            text(&n["backoff_step"])
        ),
        Some(_) => format!("scheduled refresh {}", when(&n["at"], now_ms)),
        None => match c["state"].as_str() {
            Some("reauthorization_required") => "none: waiting for re-authorization".into(),
            Some("moved") => "none: refreshed where it went".into(),
            _ if c["grant"] == "static" => "none: a static token is not refreshed".into(),
            _ => "none scheduled".into(),
        },
    }
}

/// The refresh token's known death as a countdown bar, marked "estimate" where it is.
fn refresh_death(c: &Value, now_ms: u64) -> String {
    let d = &c["refresh_token_death"];
    let Some(left) = d["in_seconds"].as_i64() else {
        return match c["state"].as_str() {
            Some("reauthorization_required") => {
                r#"<span class="err">dead: rejected, a new grant is needed</span>"#.into()
            }
            _ => "no known end".into(),
        };
    };
    let life = d["lifetime_seconds"].as_i64().unwrap_or(0);
    let pct = if life > 0 {
        (left.max(0) as f64 / life as f64 * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    let class = if pct < 10.0 {
        "bad"
    } else if pct < 30.0 {
        "warn"
    } else {
        "ok"
    };
    let kind = match d["kind"].as_str() {
        Some("idle") => "idle lifetime: dies unless used before",
        Some("absolute") => "absolute lifetime since authorization",
        _ => "as the token endpoint said",
    };
    let estimate = if d["estimate"] == Value::Bool(true) {
        r#" <span class="estimate" title="from the configured lifetime: the provider does not say">estimate</span>"#
    } else {
        ""
    };
    let dies = if left <= 0 { "died" } else { "dies" };
    format!(
        r#"<div class="bar {class}"><div style="width:{pct:.0}%"></div></div> {dies} {} · {}{estimate}"#,
        esc(&when(&d["at"], now_ms)),
        esc(kind),
    )
}

/// The last error in plain words: the refresh's, the store's, the state's detail, the
/// token sinks'.
fn problems(c: &Value) -> String {
    let sink_errors = c["sinks"].as_array().into_iter().flatten().filter_map(|s| {
        let error = s["last_error"].as_str()?;
        Some(format!("sink {}: {error}", text(&s["file"])))
    });
    let last = &c["last_refresh"];
    let failed = last["result"]
        .as_str()
        .is_some_and(|r| r == "failure" || r == "in_doubt");
    let refresh_error = if failed || c["state"] != "ready" {
        &last["error"]
    } else {
        &Value::Null
    };
    let mut out: Vec<String> = [
        refresh_error,
        &c["store_error"],
        &c["detail"],
        &c["reauthorization_required"]["reason"],
    ]
    .iter()
    .filter(|v| !v.is_null())
    .map(|v| text(v))
    .chain(sink_errors)
    .collect();
    out.dedup();
    out.join("; ")
}

/// What the operator does now, for a credential that needs it: the exact command, and
/// for a code-paste grant, a form that exchanges the code here.
fn what_to_do(name: &str, c: &Value, page: &Page) -> String {
    let state = c["state"].as_str().unwrap_or("");
    let mut action = [
        &c["reauthorization_required"]["action"],
        &c["moved"]["action"],
    ]
    .iter()
    .find_map(|v| v.as_str())
    .map(str::to_string);
    if action.is_none() && state == "unavailable" && c["generation"].is_null() {
        action = c["detail"].as_str().map(str::to_string);
    }
    if action.is_none() && state == "degraded" && c["grant"] == "static" {
        action = Some("put a valid token in the credential's token_file (re-read within 10 seconds), or in its token and reload the config".into());
    }
    let Some(action) = action else {
        return String::new();
    };
    let mut form = String::new();
    let needs_grant = state == "reauthorization_required"
        || (state == "unavailable" && c["generation"].is_null());
    if c["grant"] == "refresh_token" && needs_grant {
        form = format!(
            r#"<form class="code" method="post" action="/actions/authorize-code">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="credential" value="{name}">
{token}<label>Authorization code from the provider: <input name="code" autocomplete="off" required size="40"></label>
<button type="submit">Exchange and store</button>
<p class="muted">The same as <code>tokenrelay authorize --code</code>: exchanged once, stored as the next generation, picked up at once.</p>
</form>"#,
            csrf = esc(page.csrf),
            name = esc(name),
            token = token_field(page),
        );
        if page.authorize_again.iter().any(|n| n == name) {
            form.push_str(&format!(
                r#"<form class="again" method="post" action="/actions/authorize-start">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="credential" value="{name}">
{token}<button type="submit">Authorize again</button> <span class="muted">at the provider; it sends the browser back here, and the code is exchanged and stored.</span>
</form>"#,
                csrf = esc(page.csrf),
                name = esc(name),
                token = token_field(page),
            ));
        }
    }
    format!(
        r#"<div class="todo"><strong>What to do now</strong><p><code>{}</code></p>{form}</div>"#,
        esc(&action)
    )
}

/// The provider shuts down an endpoint the credential uses (within 90 days, or past).
fn sunset(c: &Value) -> String {
    let s = &c["sunset"];
    if !s.is_object() {
        return String::new();
    }
    format!(
        "\n<dt>sunset</dt><dd class=\"err sunset\">{} ends on {}; use {} (<a href=\"{}\">announcement</a>)</dd>",
        esc(s["endpoint"].as_str().unwrap_or("what its preset relies on")),
        esc(&text(&s["date"])),
        esc(&text(&s["replacement"])),
        esc(&text(&s["source"])),
    )
}

/// The admin token field of a form, when actions need it.
fn token_field(page: &Page) -> &'static str {
    if page.token_required {
        r#"<label>Admin token: <input type="password" name="admin_token" autocomplete="off" required></label><br>"#
    } else {
        ""
    }
}

fn credential(name: &str, c: &Value, page: &Page) -> String {
    let now = page.now_ms;
    let state = text(&c["state"]);
    let last = &c["last_refresh"];
    let last_text = if last.is_null() {
        "–".to_string()
    } else {
        format!(
            "{} · {} · {}",
            when(&last["at"], now),
            text(&last["trigger"]).replace('_', " "),
            text(&last["result"]).replace('_', " ")
        )
    };
    let moved = match c["moved"]["to"].as_str() {
        Some(to) => format!(
            "<dt>moved</dt><dd class=\"moved\">to {} {}</dd>",
            esc(to),
            esc(&when(&c["moved"]["at"], now))
        ),
        None => String::new(),
    };
    let problem = problems(c);
    let sunset = sunset(c);
    format!(
        r#"<section class="cred" id="cred-{id}">
<h3>{name} <span class="state {state}">{state_words}</span> <span class="since">since {since}</span></h3>
<dl>
<dt>grant</dt><dd>{grant} · generation {generation}</dd>{moved}
<dt>access token</dt><dd class="expiry">{expiry}</dd>
<dt>next</dt><dd class="next">{next}</dd>
<dt>refresh token</dt><dd class="death">{death}</dd>
<dt>last refresh</dt><dd class="last">{last}</dd>
<dt>last error</dt><dd class="err">{problem}</dd>{sunset}
</dl>
{timeline}
{todo}
</section>
"#,
        id = esc(name),
        name = esc(name),
        state = esc(&state),
        state_words = esc(&state.replace('_', " ")),
        since = esc(&when(&c["state_since"], now)),
        grant = esc(&text(&c["grant"])),
        generation = esc(&text(&c["generation"])),
        expiry = esc(&token_expiry(c, now)),
        next = esc(&next_attempt(c, now)),
        death = refresh_death(c, now),
        last = esc(&last_text),
        problem = if problem.is_empty() {
            r#"<span class="muted">none</span>"#.into()
        } else {
            esc(&problem)
        },
        timeline = svg::timeline(&c["timeline"], now),
        todo = what_to_do(name, c, page),
    )
}

/// Renders the page from the `/status` document.
pub fn render(status: &Value, page: &Page) -> String {
    let empty = serde_json::Map::new();
    let credentials = status["credentials"].as_object().unwrap_or(&empty);
    let (summary, summary_class) = words::summary(credentials);
    // Those needing action first: what an operator must see at 3 a.m. is at the top.
    let mut order: Vec<(&String, &Value)> = credentials.iter().collect();
    order.sort_by_key(|(_, c)| c["state"] == "ready");
    let creds: String = order
        .iter()
        .map(|(name, c)| credential(name, c, page))
        .collect();
    let has_form = creds.contains("<form");
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
                "<tr><td>{}</td><td>http://{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(name),
                esc(&text(&u["listen"])),
                esc(&forwards),
                esc(&text(&u["credential"])),
                esc(&text(&u["requests_total"])),
                esc(&counts),
                svg::sparkline(&u["requests_per_minute"]),
            ));
        }
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh_meta}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenrelay status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 2em; }} h3 {{ font-size: 1.05em; margin: 0 0 .5em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .4em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.summary {{ font-size: 1.2em; font-weight: 600; padding: .6em 1em; border-radius: .4em; color: #fff; }}
.summary.ok {{ background: #2e7d32; }} .summary.warn {{ background: #ef6c00; }} .summary.bad {{ background: #c62828; }}
.cred {{ border: 1px solid #ddd; border-radius: .4em; padding: 1em; margin: 1em 0; }}
dl {{ display: grid; grid-template-columns: 9em 1fr; gap: .2em 1em; margin: 0 0 .5em; }} dt {{ color: #666; }} dd {{ margin: 0; }}
.state {{ padding: .1em .5em; border-radius: .3em; color: #fff; background: #777; font-weight: normal; }}
.ready {{ background: #2e7d32; }} .degraded, .moved {{ background: #ef6c00; }}
.unavailable, .reauthorization_required {{ background: #c62828; }} .initializing {{ background: #1565c0; }}
dd.moved {{ background: none; }}
.since, .muted {{ color: #777; font-weight: normal; font-size: .9em; }}
.err {{ color: #c62828; }}
.bar {{ display: inline-block; width: 12em; height: .7em; background: #eee; border-radius: .35em; overflow: hidden; vertical-align: middle; }}
.bar div {{ height: 100%; background: #2e7d32; }} .bar.warn div {{ background: #ef6c00; }} .bar.bad div {{ background: #c62828; }}
.estimate {{ font-size: .8em; border: 1px dashed #999; padding: 0 .3em; border-radius: .3em; color: #555; }}
.todo {{ border-left: 4px solid #c62828; background: #fff5f5; padding: .5em 1em; margin-top: .5em; }}
.todo code {{ white-space: pre-wrap; word-break: break-word; }}
svg text {{ font-size: 10px; fill: #777; }}
.ev.refresh.success {{ fill: #2e7d32; }} .ev.refresh.adopted {{ fill: #1565c0; }}
.ev.refresh.failure {{ fill: #c62828; }} .ev.refresh.in_doubt {{ fill: #ef6c00; }}
.ev.state {{ fill: #777; }} .ev.state.ready {{ fill: #2e7d32; }} .ev.state.reauthorization_required, .ev.state.unavailable {{ fill: #c62828; }}
.ev.state.degraded {{ fill: #ef6c00; }} .ev.replay {{ fill: #6a1b9a; }}
.rate {{ stroke-width: 1.5; }} .rate.ok {{ stroke: #2e7d32; }} .rate.client {{ stroke: #ef6c00; }} .rate.server {{ stroke: #c62828; }}
.rate.own {{ stroke: #6a1b9a; stroke-dasharray: 3 2; }}
.key.ok {{ color: #2e7d32; }} .key.client {{ color: #ef6c00; }} .key.server {{ color: #c62828; }} .key.own {{ color: #6a1b9a; }}
.legend {{ font-size: .85em; }}
footer {{ margin-top: 2em; color: #777; }}
</style></head>
<body>
<h1>tokenrelay {version}</h1>
<p id="summary" class="summary {summary_class}">{summary}</p>
<p>Store: {store}{rollback}. {refresh_words} Machine-readable: <a href="/status">/status</a>, <a href="/metrics">/metrics</a>.</p>
<h2>Credentials</h2>
{creds}
<h2>Upstreams</h2>
<table><thead><tr><th>upstream</th><th>listen</th><th>forwards to</th><th>credential</th><th>requests</th><th>by status</th><th>per minute, last hour</th></tr></thead>
<tbody>
{ups}</tbody></table>
<footer>Token values are never shown here or anywhere else.</footer>
</body></html>
"#,
        version = esc(&text(&status["version"])),
        // A page holding a form does not reload itself: that would wipe a code being
        // pasted.
        refresh_meta = if has_form {
            ""
        } else {
            r#"<meta http-equiv="refresh" content="30">"#
        },
        refresh_words = if has_form {
            "This page does not refresh itself while it offers an action; reload it to see changes."
        } else {
            "This page refreshes every 30 seconds."
        },
        summary = esc(&summary),
        store = esc(&text(&status["store"])),
        rollback = match status["store_rollback_detection"].as_str() {
            Some(note) => format!(" (restores: {})", esc(note)),
            None => String::new(),
        },
    )
}

/// The answer to one of the page's actions: what happened, and the way back.
pub fn action_result(ok: bool, message: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tokenrelay</title>
<style>body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; }} .ok {{ color: #2e7d32; }} .bad {{ color: #c62828; }}</style></head>
<body><p id="result" class="{class}">{message}</p><p><a href="/">Back to the status page</a></p></body></html>
"#,
        class = if ok { "ok" } else { "bad" },
        message = esc(message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: Page = Page {
        now_ms: 0,
        csrf: "c5rf",
        token_required: false,
        authorize_again: &[],
    };

    fn render(status: &Value) -> String {
        super::render(status, &PAGE)
    }

    /// A failing credential shows its next retry and backoff step; a scheduled one
    /// its next refresh; a refresh token's death from the configured lifetime is an
    /// estimate.
    #[test]
    fn countdowns_read_as_words() {
        let status = serde_json::json!({"credentials": {
            "a": {"state": "degraded", "grant": "refresh_token", "generation": 2,
                "next_attempt": {"at": "1970-01-01T00:00:30Z", "kind": "retry", "backoff_step": 3},
                "refresh_token_death": {"at": "1970-01-01T00:10:00Z", "in_seconds": 600, "kind": "absolute",
                    "lifetime_seconds": 6000, "estimate": true}},
            "b": {"state": "ready", "grant": "client_credentials", "generation": 1,
                "next_attempt": {"at": "1970-01-01T01:00:00Z", "kind": "scheduled"}}
        }});
        let html = render(&status);
        assert!(
            html.contains("retry in 30s (1970-01-01T00:00:30Z) · backoff step 3"),
            "{html}"
        );
        assert!(html.contains("scheduled refresh in 1h 0m"), "{html}");
        assert!(
            html.contains(
                r#"<div class="bar warn"><div style="width:10%"></div></div> dies in 10m 0s"#
            ),
            "{html}"
        );
        assert!(html.contains("absolute lifetime since authorization"));
        assert!(html.contains(r#"class="estimate""#));
        assert!(html.contains("1 of 2 credentials healthy · 1 is degraded"));
    }

    #[test]
    fn a_dead_grant_says_what_to_do_with_a_form() {
        let status = serde_json::json!({
            "credentials": {
                "crm": {"state": "reauthorization_required", "grant": "refresh_token", "generation": 4,
                    "state_since": "1970-01-01T00:00:00Z",
                    "reauthorization_required": {"reason": "invalid_grant: token revoked",
                        "action": "obtain a new token and run: tokenrelay authorize --config /etc/tr.yaml --credential crm"}},
                "old": {"state": "moved", "grant": "refresh_token", "moved": {"to": "staging", "at": "1970-01-01T00:00:00Z", "action": "import it back"}},
                "ok": {"state": "ready", "grant": "client_credentials"}
            }
        });
        let html = render(&status);
        assert!(html.contains(r#"<p id="summary" class="summary bad">1 of 3 credentials healthy · 1 needs re-authorization · 1 moved away</p>"#), "{html}");
        assert!(html.contains("tokenrelay authorize --config /etc/tr.yaml --credential crm"));
        assert!(html.contains(r#"<input type="hidden" name="csrf" value="c5rf"><input type="hidden" name="credential" value="crm">"#));
        assert!(html.contains("invalid_grant: token revoked"));
        assert!(html.contains(r#"<dd class="moved">to staging"#), "{html}");
        assert_eq!(
            html.matches("<form").count(),
            1,
            "only the dead grant gets a form"
        );
        assert!(
            html.find("cred-crm").unwrap() < html.find("cred-ok").unwrap(),
            "needing action comes first"
        );
    }

    #[test]
    fn shows_a_sunset_line_in_its_credential() {
        let html = render(&serde_json::json!({
            "credentials": {"crm": {"state": "ready", "sunset": {
                "date": "2027-02-16", "days_left": 71,
                "endpoint": "https://api.hubapi.com/oauth/v1/token",
                "replacement": "https://api.hubapi.com/oauth/2026-03/token",
                "source": "https://developers.hubspot.com/changelog/v1-oauth-api-deprecation"}}},
            "upstreams": {}
        }));
        assert!(html.contains("https://api.hubapi.com/oauth/v1/token ends on 2027-02-16; use https://api.hubapi.com/oauth/2026-03/token"), "{html}");
        let html = render(
            &serde_json::json!({"credentials": {"crm": {"state": "ready"}}, "upstreams": {}}),
        );
        assert!(!html.contains("ends on"), "{html}");
    }

    #[test]
    fn escapes_and_shows_names() {
        let status = serde_json::json!({
            "version": "1", "store": "file",
            "credentials": {"crm": {"state": "ready", "grant": "refresh_token", "generation": 3,
                "expires_in_seconds": 125, "expires_at": "1970-01-01T00:02:05Z", "expiry_known": true, "last_refresh": null, "detail": "<script>"}},
            "upstreams": {"crm": {"listen": "127.0.0.1:1", "url": "https://x", "credential": "crm",
                "requests_total": 2, "requests": {"200": 2}}}
        });
        let html = render(&status);
        assert!(html.contains("<td>crm</td>"));
        assert!(html.contains("expires in 2m 5s"), "{html}");
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
