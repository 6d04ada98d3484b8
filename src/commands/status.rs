//! `tokenrelay status`: what the store holds per credential, never token values.

use std::time::{Duration, SystemTime};

use crate::config::{Config, Grant};
use crate::store::now_ms;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let needs_store = cfg
        .credentials
        .values()
        .any(|c| c.grant == Grant::RefreshToken);
    let store = if needs_store {
        Some(crate::store::open(&cfg.store)?)
    } else {
        None
    };
    let mut failed = Vec::new();
    for (name, c) in &cfg.credentials {
        let Some(store) = store.as_ref().filter(|_| c.grant == Grant::RefreshToken) else {
            println!(
                "{name}: grant {:?}; nothing stored (tokens are obtained at startup)",
                c.grant
            );
            continue;
        };
        match store.load(name).await {
            Err(e) => {
                println!("{name}: store error: {e}");
                failed.push(name.as_str());
            }
            Ok(None) => println!("{name}: nothing stored; run `tokenrelay seed --credential {name}` or `tokenrelay authorize --credential {name}`"),
            Ok(Some(s)) => {
                let when = |ms: u64| humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string();
                let state = if let Some(why) = &s.reauthorization_required {
                    format!("reauthorization_required ({why})")
                } else if s.access_expires_at_ms.is_some_and(|e| e > now_ms()) {
                    "access token valid".to_string()
                } else if s.refresh_token.is_some() {
                    "access token expired; refresh token stored".to_string()
                } else {
                    "no usable token".to_string()
                };
                println!("{name}: {state}");
                println!("  generation:       {}", s.generation);
                if let Some(e) = s.access_expires_at_ms {
                    let left = e.saturating_sub(now_ms()) / 1000;
                    println!("  access expires:   {} (in {left}s)", when(e));
                }
                println!("  refresh token:    {}", if s.refresh_token.is_some() { "stored" } else { "none" });
                println!("  obtained:         {}", when(s.obtained_at_ms));
                println!("  updated:          {} by {}", when(s.updated_at_ms), s.updated_by);
                // A state stored by an older version may hold a field now judged secret.
                let fields = crate::config::url_template::without_secret_looking(s.answer_fields.clone());
                for (field, value) in &fields {
                    println!("  answer field:     {field} = {value}");
                }
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("the store could not be read for: {}", failed.join(", "));
    }
    Ok(())
}
