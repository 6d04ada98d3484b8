//! The page's inline SVG pictures: a credential's 24-hour timeline and an upstream's
//! request-rate sparkline. Plain SVG elements with `<title>` tooltips; no scripts.

use serde_json::Value;

use super::esc;

const DAY_MS: u64 = 24 * 3600 * 1000;
const TIMELINE_W: f64 = 720.0;

/// Refreshes (dots coloured by result), state changes (ticks) and 401 replays
/// (triangles) over the 24 hours before `now_ms`.
pub fn timeline(events: &Value, now_ms: u64) -> String {
    let from = now_ms.saturating_sub(DAY_MS);
    let x = |at: u64| (at.saturating_sub(from) as f64 / DAY_MS as f64 * TIMELINE_W).min(TIMELINE_W);
    let mut marks = String::new();
    for e in events.as_array().into_iter().flatten() {
        let (Some(at), Some(kind)) = (e["at_ms"].as_u64(), e["kind"].as_str()) else {
            continue;
        };
        let when = esc(e["at"].as_str().unwrap_or(""));
        let px = x(at) + 10.0;
        match kind {
            "refresh" => {
                let result = e["result"].as_str().unwrap_or("");
                let trigger = e["trigger"].as_str().unwrap_or("");
                marks.push_str(&format!(
                    r#"<circle class="ev refresh {r}" cx="{px:.1}" cy="30" r="4"><title>{when} refresh ({t}): {r}</title></circle>"#,
                    r = esc(result),
                    t = esc(trigger),
                ));
            }
            "state" => {
                let state = e["state"].as_str().unwrap_or("");
                marks.push_str(&format!(
                    r#"<rect class="ev state {s}" x="{x:.1}" y="4" width="3" height="14"><title>{when} state: {s}</title></rect>"#,
                    s = esc(state),
                    x = px - 1.5,
                ));
            }
            "replay_401" => {
                let status = e["status"].as_u64().unwrap_or(0);
                marks.push_str(&format!(
                    r#"<path class="ev replay" d="M{a:.1} 50 L{px:.1} 42 L{b:.1} 50 Z"><title>{when} request replayed after a 401: answered {status}</title></path>"#,
                    a = px - 4.0,
                    b = px + 4.0,
                ));
            }
            _ => {}
        }
    }
    let mut axis = String::new();
    for h in [24, 18, 12, 6, 0] {
        let px = 10.0 + TIMELINE_W * (24 - h) as f64 / 24.0;
        let label = if h == 0 {
            "now".to_string()
        } else {
            format!("-{h}h")
        };
        axis.push_str(&format!(
            r##"<line x1="{px:.1}" y1="54" x2="{px:.1}" y2="58" stroke="#999"/><text x="{px:.1}" y="70" text-anchor="middle">{label}</text>"##
        ));
    }
    format!(
        r##"<svg class="timeline" role="img" aria-label="the last 24 hours" width="{w}" height="74" viewBox="0 0 {w} 74" xmlns="http://www.w3.org/2000/svg"><line x1="10" y1="56" x2="{end}" y2="56" stroke="#999"/>{axis}{marks}</svg>"##,
        w = TIMELINE_W + 20.0,
        end = TIMELINE_W + 10.0,
    )
}

const SPARK_W: f64 = 240.0;
const SPARK_H: f64 = 36.0;

/// The requests per minute of the last hour, one line per status class, from the
/// `requests_per_minute` of `/status`.
pub fn sparkline(rates: &Value) -> String {
    let series = [
        ("2xx", "ok", "2xx"),
        ("4xx", "client", "4xx"),
        ("5xx", "server", "upstream 5xx"),
        ("own_5xx", "own", "tokenrelay's own 5xx"),
    ];
    let values: Vec<Vec<u64>> = series
        .iter()
        .map(|(key, _, _)| {
            rates[*key]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default()
        })
        .collect();
    let max = values.iter().flatten().copied().max().unwrap_or(0).max(1);
    let mut lines = String::new();
    let mut legend = Vec::new();
    for ((_, class, label), v) in series.iter().zip(&values) {
        if v.is_empty() {
            continue;
        }
        let step = SPARK_W / (v.len().max(2) - 1) as f64;
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * step,
                    SPARK_H - 2.0 - (*n as f64 / max as f64) * (SPARK_H - 4.0)
                )
            })
            .collect();
        let total: u64 = v.iter().sum();
        legend.push(format!(
            r#"<span class="key {class}">{label} {total}</span>"#
        ));
        if total == 0 {
            // A flat line at zero would hide the others' baseline.
            continue;
        }
        lines.push_str(&format!(
            r#"<polyline class="rate {class}" fill="none" points="{}"><title>{label}: {total} in the last hour</title></polyline>"#,
            points.join(" ")
        ));
    }
    format!(
        r#"<svg class="sparkline" role="img" aria-label="requests per minute, last hour" width="{SPARK_W}" height="{SPARK_H}" viewBox="0 0 {SPARK_W} {SPARK_H}" xmlns="http://www.w3.org/2000/svg">{lines}</svg><div class="legend">{} <span class="muted">(last hour, peak {max}/min)</span></div>"#,
        legend.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_places_events_in_the_day() {
        let now = 10 * DAY_MS;
        let events = serde_json::json!([
            {"at_ms": now - DAY_MS / 2, "at": "x", "kind": "refresh", "trigger": "scheduled", "result": "in_doubt"},
            {"at_ms": now, "at": "y", "kind": "state", "state": "reauthorization_required"},
            {"at_ms": now - 1000, "at": "z", "kind": "replay_401", "status": 200}
        ]);
        let svg = timeline(&events, now);
        assert!(
            svg.contains(r#"class="ev refresh in_doubt" cx="370.0""#),
            "{svg}"
        );
        assert!(svg.contains(r#"class="ev state reauthorization_required""#));
        assert!(svg.contains("answered 200"));
    }

    #[test]
    fn the_sparkline_draws_each_class() {
        let rates = serde_json::json!({"2xx": [0, 4, 2], "4xx": [0, 0, 1], "5xx": [0, 0, 0], "own_5xx": [3, 0, 0]});
        let svg = sparkline(&rates);
        assert_eq!(
            svg.matches("<polyline").count(),
            3,
            "none for a class without requests"
        );
        assert!(svg.contains("upstream 5xx 0"));
        assert!(svg.contains("2xx 6"));
        assert!(
            svg.contains("tokenrelay&#39;s own 5xx 3") || svg.contains("tokenrelay's own 5xx 3")
        );
        assert!(svg.contains("peak 4/min"));
    }
}
