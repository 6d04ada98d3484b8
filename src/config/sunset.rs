//! Sunset dates: an endpoint or behaviour a provider announced it will end, recorded in
//! the preset (`sunset: {date, replacement, source}`). `check` warns and `/status` shows
//! it within [`SUNSET_WARNING`] of the date; the metric
//! `tokenrelay_preset_sunset_timestamp_seconds` exposes the date all along.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};

use super::CredentialConfig;

/// How long before a sunset date `check` and `/status` speak of it.
pub const SUNSET_WARNING: Duration = Duration::from_secs(90 * 86_400);

/// A day, `YYYY-MM-DD`, taken as its start in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day {
    pub text: String,
    pub start: SystemTime,
}

impl Day {
    pub fn parse(text: &str) -> Option<Day> {
        let well_formed = text.len() == 10
            && text.char_indices().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == '-'
                } else {
                    c.is_ascii_digit()
                }
            });
        if !well_formed {
            return None;
        }
        let start = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
        Some(Day {
            text: text.to_string(),
            start,
        })
    }

    /// Seconds since the Unix epoch.
    pub fn unix_seconds(&self) -> i64 {
        self.start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

impl<'de> Deserialize<'de> for Day {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Day, D::Error> {
        let text = String::deserialize(d)?;
        Day::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a date YYYY-MM-DD")))
    }
}

/// An endpoint or behaviour a provider announced it will end.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sunset {
    pub date: Day,
    /// What to use instead.
    pub replacement: String,
    /// The provider's announcement.
    pub source: String,
    /// The endpoint that ends: the notice concerns credentials using it (a URL a user
    /// kept after the preset moved on). Without it, every credential of the preset.
    pub endpoint: Option<String>,
}

impl Sunset {
    /// Whether `now` is within [`SUNSET_WARNING`] of the date, or past it.
    pub fn is_near(&self, now: SystemTime) -> bool {
        now + SUNSET_WARNING >= self.date.start
    }

    /// Whole days from `now` to the date; negative once past.
    pub fn days_left(&self, now: SystemTime) -> i64 {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        (self.date.unix_seconds() - now).div_euclid(86_400)
    }

    fn what(&self, provider: &str) -> String {
        match &self.endpoint {
            Some(e) => format!("{e}, used by this credential,"),
            None => format!("what the {provider} preset relies on"),
        }
    }

    /// The `check` warning for credential `name` of preset `provider`.
    pub fn warning(&self, name: &str, provider: &str, now: SystemTime) -> String {
        let days = self.days_left(now);
        let when = if days >= 0 {
            format!("is shut down on {} (in {days} days)", self.date.text)
        } else {
            format!("was shut down on {}", self.date.text)
        };
        format!(
            "credentials.{name}: {} {when}, as {provider} announced ({}); use {} instead",
            self.what(provider),
            self.source,
            self.replacement
        )
    }

    /// The `/status` entry.
    pub fn status(&self, now: SystemTime) -> serde_json::Value {
        serde_json::json!({
            "date": self.date.text,
            "days_left": self.days_left(now),
            "endpoint": self.endpoint,
            "replacement": self.replacement,
            "source": self.source,
        })
    }
}

impl CredentialConfig {
    /// The preset's sunset, when it concerns this credential: its endpoint is one the
    /// credential uses, or it names no endpoint.
    pub fn sunset(&self) -> Option<&Sunset> {
        let s = self.preset_sunset.as_ref()?;
        let Some(endpoint) = &s.endpoint else {
            return Some(s);
        };
        let endpoint = url::Url::parse(endpoint).ok()?;
        super::Endpoint::ALL
            .into_iter()
            .any(|e| self.endpoint(e) == Some(&endpoint))
            .then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sunset(endpoint: Option<&str>) -> Sunset {
        Sunset {
            date: Day::parse("2027-02-16").unwrap(),
            replacement: "https://idp.example/v2/token".into(),
            source: "https://idp.example/changelog".into(),
            endpoint: endpoint.map(str::to_owned),
        }
    }

    fn day(text: &str) -> SystemTime {
        Day::parse(text).unwrap().start
    }

    #[test]
    fn days_are_checked() {
        assert!(Day::parse("2027-02-16").is_some());
        for bad in [
            "2027-2-16",
            "2027-02-30",
            "16.02.2027",
            "2027-02-16T00:00:00Z",
            "",
        ] {
            assert!(Day::parse(bad).is_none(), "{bad}");
        }
    }

    /// The window opens 90 days before the date and stays open after it.
    #[test]
    fn near_within_ninety_days_and_after() {
        let s = sunset(None);
        assert!(!s.is_near(day("2026-11-17")));
        assert!(s.is_near(day("2026-11-18")));
        assert!(s.is_near(day("2027-02-16")));
        assert!(s.is_near(day("2028-01-01")));
        assert_eq!(s.days_left(day("2026-12-07")), 71);
        assert_eq!(s.days_left(day("2027-02-17")), -1);
    }

    #[test]
    fn warning_says_when_and_what_instead() {
        let s = sunset(Some("https://idp.example/v1/token"));
        let w = s.warning("crm", "hubspot", day("2026-12-07"));
        assert_eq!(w, "credentials.crm: https://idp.example/v1/token, used by this credential, is shut down on 2027-02-16 (in 71 days), as hubspot announced (https://idp.example/changelog); use https://idp.example/v2/token instead");
        let w = s.warning("crm", "hubspot", day("2027-03-01"));
        assert!(w.contains("was shut down on 2027-02-16"), "{w}");
    }
}
