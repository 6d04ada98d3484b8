//! `tokenrelay providers [NAME]`: the built-in provider presets; and, for `check`, which
//! resolved values came from a preset.

use std::process::ExitCode;

use crate::config::preset;
use crate::config::Config;

pub fn run(name: Option<&str>) -> ExitCode {
    // Written whole, so a reader that stops early (`| head`) ends the output quietly.
    let mut out = String::new();
    let code = render(name, &mut out);
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    code
}

fn render(name: Option<&str>, out: &mut String) -> ExitCode {
    use std::fmt::Write;
    match name {
        None => {
            let presets = preset::all();
            let w = presets
                .iter()
                .map(|p| p.name.len())
                .max()
                .unwrap_or(0)
                .max(6);
            let _ = writeln!(
                out,
                "{:<w$} {:<28} {:<22} docs",
                "preset", "provider", "provider_params"
            );
            for p in presets {
                let params = if p.params.is_empty() {
                    "-".to_string()
                } else {
                    p.params
                        .iter()
                        .map(|(k, v)| {
                            if v.required {
                                k.clone()
                            } else {
                                format!("[{k}]")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    out,
                    "{:<w$} {:<28} {:<22} {}",
                    p.name, p.title, params, p.docs
                );
            }
            let _ = writeln!(
                out,
                "\n`tokenrelay providers NAME` shows one; [param] is optional."
            );
            ExitCode::SUCCESS
        }
        Some(name) => match preset::get(name) {
            Some(p) => {
                out.push_str(&describe(&p));
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "error: no preset named {name:?} (known: {})",
                    preset::names().join(", ")
                );
                ExitCode::FAILURE
            }
        },
    }
}

/// One preset: what it sets (placeholders shown as `{param}`), its parameters, sources
/// and uncertainties.
fn describe(p: &preset::Preset) -> String {
    let mut out = format!(
        "# {} ({})\n# docs: {}\n# verified against the sources on {}\n",
        p.title, p.name, p.docs, p.verified.text
    );
    if let Some(s) = &p.sunset {
        let what = s
            .endpoint
            .as_deref()
            .unwrap_or("what this preset relies on");
        out.push_str(&format!(
            "# sunset: {what} ends on {}; instead: {} ({})\n",
            s.date.text, s.replacement, s.source
        ));
    }
    for s in &p.sources {
        out.push_str(&format!("# source: {s}\n"));
    }
    for (k, v) in &p.params {
        let kind = if v.required { "required" } else { "optional" };
        let default = v
            .default
            .as_ref()
            .map(|d| format!(", default {d}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "# provider_params.{k} ({kind}{default}): {}\n",
            v.description
        ));
    }
    if !p.requires.is_empty() {
        out.push_str(&format!(
            "# the credential must also set: {}\n",
            p.requires.join(", ")
        ));
    }
    out.push_str("credential defaults (keys set in the config file win):\n");
    let yaml = serde_yaml::to_string(&p.credential).unwrap_or_default();
    for line in yaml.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    if let Some(h) = &p.header {
        out.push_str(&format!("upstream header: {h:?}\n"));
    }
    if let Some(f) = &p.header_format {
        out.push_str(&format!("upstream header format: {f:?}\n"));
    }
    if let Some(q) = &p.token_query_param {
        out.push_str(&format!("upstream token query parameter: {q:?}\n"));
    }
    if let Some(u) = &p.uncertain {
        // The preset file's `uncertain:` notes: what the provider's documentation does not
        // settle, and what to set if your setup differs.
        out.push_str("notes (what the provider's documentation leaves open, and what to set if yours differs):\n");
        for line in u.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// For `check`: the values a preset filled in, as YAML comments after the resolved
/// config (every other value comes from the file or a built-in default).
pub fn origins_comment(c: &Config) -> String {
    if c.origins.is_empty() {
        return String::new();
    }
    let mut out = String::from("# origin of each value a provider preset or discovery filled in (the rest come from the file or defaults):\n");
    for (path, origin) in &c.origins {
        out.push_str(&format!("#   {path}: {origin}\n"));
    }
    out
}
