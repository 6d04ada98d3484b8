//! `tokenrelay reload`: asks the running instance to re-read its config file, over the
//! admin listener named in the config (from loopback), and prints the outcome. The file
//! was validated here first, so a broken file never reaches the instance.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::Config;

/// A reload waits for refreshers of changed credentials to stop; a refresh in flight
/// takes at most its token timeout, so this is generous.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let admin = super::admin_client::loopback(cfg.admin.listen);
    let client = super::admin_client::client(REPLY_TIMEOUT)?;
    let resp = client
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the running instance's admin listener at {admin}")
        })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if status.is_success() {
        let applied = &doc["applied"];
        println!(
            "reloaded: config generation {}",
            doc["generation"].as_u64().unwrap_or_default()
        );
        let changes = applied["changes"].as_object().cloned().unwrap_or_default();
        let mut any = false;
        for (what, names) in &changes {
            let names: Vec<&str> = names
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            if !names.is_empty() {
                any = true;
                println!("  {}: {}", what.replace('_', " "), names.join(", "));
            }
        }
        if !any {
            println!("  nothing changed");
        }
        for setting in applied["restart_needed"].as_array().into_iter().flatten() {
            println!(
                "  restart needed: {} changed in the file; the running value is kept",
                setting.as_str().unwrap_or_default()
            );
        }
        Ok(())
    } else if let Some(error) = doc["error"].as_str() {
        bail!("reload failed; the running config is kept:\n{error}")
    } else {
        bail!("reload refused ({status}): {}", body.trim())
    }
}
