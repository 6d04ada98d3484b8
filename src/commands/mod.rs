//! Command-line interface: `run`, `check`, `seed`, `authorize`, `status`, `demo`, and the
//! operator's helpers (`providers`, `completions`).

mod admin_client;
mod authorize;
#[cfg(feature = "demo")]
mod demo;
mod providers;
mod reload;
mod seed;
mod status;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, LogFormat};

/// How often `--watch-config` reads the config file.
const WATCH_EVERY: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "tokenrelay",
    version,
    about = "Reverse-proxy sidecar that attaches OAuth2 bearer tokens and keeps them fresh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format (overrides log.format in the config).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArg {
    /// Config file (YAML).
    #[arg(long, short = 'c', env = "TOKENRELAY_CONFIG")]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve: one listener per upstream plus the admin listener.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Worker threads (overrides runtime.worker_threads; default: one per core).
        #[arg(long)]
        worker_threads: Option<usize>,
        /// Reload when the config file's contents change (checked every 2 s; survives
        /// Kubernetes ConfigMap symlink swaps). SIGHUP and `tokenrelay reload` always work.
        #[arg(long)]
        watch_config: bool,
    },
    /// Asks the running instance (over its admin listener, from loopback) to re-read its
    /// config file; prints what changed, or why nothing did (exit 1).
    Reload {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config and print it resolved, secrets redacted; exit 1 on errors.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Store an initial refresh token obtained elsewhere.
    #[command(group(clap::ArgGroup::new("token").required(true).args(["refresh_token_file", "access_token_file"])))]
    Seed {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        credential: String,
        /// File holding the refresh token, or - for standard input.
        #[arg(long)]
        refresh_token_file: Option<PathBuf>,
        /// When the provider issued the refresh token (RFC 3339 time, or a date): its
        /// absolute lifetime counts from then. Without it the seed time stands in, and
        /// `status` calls the refresh token's expiry an estimate.
        #[arg(long, requires = "refresh_token_file", value_parser = seed::parse_issued_at)]
        refresh_token_issued_at: Option<u64>,
        /// File holding a long-lived access token (no refresh token; never refreshed),
        /// or - for standard input.
        #[arg(long)]
        access_token_file: Option<PathBuf>,
        /// Lifetime of the long-lived access token, when the provider states one
        /// (e.g. 365d); without it no expiry is known.
        #[arg(long, requires = "access_token_file", value_parser = crate::config::units::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Moves a credential to another environment: writes its stored state to an
    /// encrypted bundle and marks it `moved` here (every process using this store stops
    /// using it). With --copy, a backup instead: nothing is marked.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        credential: String,
        /// The bundle file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Seal the bundle with this passphrase (scrypt); default: the store's key file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// A backup: the source keeps using the credential.
        #[arg(long)]
        copy: bool,
        /// A name for the destination, shown by this environment's /status.
        #[arg(long)]
        to: Option<String>,
    },
    /// Stores a credential from a bundle made by `export`; running instances adopt it.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        credential: String,
        /// The bundle file.
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// The credential the bundle was made for: imports it under --credential, a
        /// deliberate rename.
        #[arg(long, value_name = "NAME")]
        from_credential: Option<String>,
        /// Import despite the guards: a bundle for another credential name or of another
        /// token endpoint or client, brought back to the store it was handed over from,
        /// or older than what the store holds.
        #[arg(long)]
        force: bool,
    },
    /// Lists the built-in provider presets, or shows one with its resolved settings.
    Providers {
        /// A preset name (e.g. amocrm).
        name: Option<String>,
    },
    /// Prints the config file's JSON Schema (draft 2020-12), for editors and CI: e.g. a
    /// `# yaml-language-server: $schema=tokenrelay.schema.json` line atop the config.
    Schema,
    /// Prints a shell completion script: `tokenrelay completions bash >
    /// /etc/bash_completion.d/tokenrelay` (zsh: into a directory on $fpath as
    /// `_tokenrelay`; fish: ~/.config/fish/completions/tokenrelay.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// One-time bootstrap: obtain a grant (an authorization code, the device flow, or one
    /// password exchange) and store the answer's refresh token.
    Authorize {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        credential: String,
        /// A code copied from the provider's UI; without it (and without --device or
        /// --password), the authorize URL is printed and the redirect_uri callback is
        /// served locally. (Codes may begin with '-'.)
        #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["device", "password"])]
        code: Option<String>,
        /// The device flow (RFC 8628): prints an address and a code to enter there from
        /// any browser, and waits for the approval (device_authorization_url).
        #[arg(long, conflicts_with = "password")]
        device: bool,
        /// One password grant: the username and password are used once and never kept;
        /// only the answer (its refresh token) is stored.
        #[arg(long)]
        password: bool,
        /// The username for --password (default: a prompt).
        #[arg(long, requires = "password")]
        username: Option<String>,
        /// A file holding the password for --password, or - for standard input
        /// (default: a prompt that does not echo).
        #[arg(long, requires = "password", value_name = "FILE|-")]
        password_file: Option<PathBuf>,
    },
    /// Per credential: state, expiries, the last refresh (never token values), from the
    /// running instance, or from the store when none answers. Exit 0: every credential
    /// ready; 1: some credential needs action; 2: no instance answered and the store
    /// could not be read.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the `/status` document (JSON) instead of lines for a person.
        #[arg(long)]
        json: bool,
    },
    /// Try it with nothing else installed: demo authorization server, demo API, tokenrelay.
    #[cfg(feature = "demo")]
    Demo {
        /// Directory for the demo's file store.
        #[arg(long, default_value = "./tokenrelay-demo-state")]
        state_dir: PathBuf,
    },
}

/// Runs the parsed command; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    let log_format = cli.log_format.map(|f| match f {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Check { config } => match Config::load(&config.config).and_then(discovered) {
            Ok(c) => {
                print!("{}", c.to_redacted_yaml());
                print!("{}", providers::origins_comment(&c));
                print!("{}", url_templates_comment(&c));
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                eprintln!("{}: configuration is valid", config.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&config.config, &e),
        },
        Command::Run {
            config,
            worker_threads,
            watch_config,
        } => {
            let cfg = match Config::load(&config.config) {
                Ok(c) => c,
                Err(e) => return config_error(&config.config, &e),
            };
            crate::logging::init(
                log_format.unwrap_or(cfg.log.format),
                cfg.log.level.as_deref(),
            );
            let mut cfg = cfg;
            cfg.runtime.worker_threads = worker_threads.or(cfg.runtime.worker_threads);
            // One current-thread runtime here; app::run adds a thread with a runtime of
            // its own per further worker (see crate::server::workers).
            let rt = match runtime(Some(1)) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let loader: crate::instance::run::Loader = Arc::new(move |text| {
                let mut c = Config::from_yaml(text, &|k| std::env::var(k).ok())?;
                c.runtime.worker_threads = worker_threads.or(c.runtime.worker_threads);
                Ok(c)
            });
            let reloading = crate::instance::run::ReloadOptions {
                loader: Some(loader),
                // Absolute, as /status and notifications name it in the commands they suggest.
                path: Some(std::path::absolute(&config.config).unwrap_or(config.config.clone())),
                on_sighup: true,
                watch: watch_config.then_some(WATCH_EVERY),
            };
            let served = rt.block_on(async {
                let stop = crate::shutdown::signal();
                crate::instance::run::run_with(cfg, reloading, stop, |_| {}).await
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "tokenrelay stopped with an error");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Seed {
            config,
            credential,
            refresh_token_file,
            refresh_token_issued_at,
            access_token_file,
            expires_in,
        } => with_config(&config, log_format, Discover::Yes, |cfg| async move {
            let what = match (&refresh_token_file, &access_token_file) {
                (Some(f), _) => seed::Seed::RefreshToken(f, refresh_token_issued_at),
                (None, Some(f)) => seed::Seed::AccessToken(f, expires_in),
                (None, None) => unreachable!("clap requires one"),
            };
            seed::run(cfg, &credential, what).await
        }),
        Command::Providers { name } => providers::run(name.as_deref()),
        Command::Schema => {
            let text = format!("{:#}\n", Config::json_schema());
            // A reader that went away (`| head`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tokenrelay", &mut out);
            // A reader that went away (`| head`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &out);
            ExitCode::SUCCESS
        }
        Command::Export {
            config,
            credential,
            out,
            passphrase_file,
            copy,
            to,
        } => with_config(&config, log_format, Discover::Yes, |cfg| {
            transfer::export(
                cfg,
                transfer::ExportArgs {
                    credential,
                    out,
                    passphrase_file,
                    copy,
                    to,
                },
            )
        }),
        Command::Import {
            config,
            credential,
            input,
            passphrase_file,
            from_credential,
            force,
        } => with_config(&config, log_format, Discover::Yes, |cfg| {
            transfer::import(
                cfg,
                transfer::ImportArgs {
                    credential,
                    input,
                    passphrase_file,
                    from_credential,
                    force,
                },
            )
        }),
        Command::Authorize {
            config,
            credential,
            code,
            device,
            password,
            username,
            password_file,
        } => {
            let mode = if device {
                authorize::Mode::Device
            } else if password {
                authorize::Mode::Password(authorize::PasswordInput {
                    username,
                    password_file,
                })
            } else {
                authorize::Mode::Code(code)
            };
            with_config(&config, log_format, Discover::Yes, |cfg| {
                authorize::run(cfg, &credential, mode)
            })
        }
        Command::Status { config, json } => {
            // Status needs no endpoints, and must answer while the authorization server
            // does not.
            with_config_exit(&config, log_format, Discover::No, |cfg| {
                status::run(cfg, json)
            })
        }
        Command::Reload { config } => with_config(&config, log_format, Discover::No, reload::run),
        #[cfg(feature = "demo")]
        Command::Demo { state_dir } => {
            crate::logging::init(log_format.unwrap_or(LogFormat::Text), None);
            let rt = match runtime(None) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(demo::run(&state_dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// For `check`: where each templated upstream url comes from.
fn url_templates_comment(c: &Config) -> String {
    let mut out = String::new();
    for u in c.upstreams.values() {
        if let Some(t) = u.url.template() {
            if out.is_empty() {
                out.push_str("# upstream urls taken from token answers (resolved for each new token; requests get 503 until an answer carries the field):\n");
            }
            let path = if t.path.is_empty() {
                String::new()
            } else {
                format!(", followed by {}", t.path)
            };
            out.push_str(&format!(
                "#   upstreams.{}.url: the field {} of credential {}'s token answers{path}\n",
                u.name, t.field, u.credential
            ));
        }
    }
    out
}

fn config_error(path: &std::path::Path, e: &crate::config::ConfigError) -> ExitCode {
    eprintln!("{}: invalid configuration:", path.display());
    for p in &e.problems {
        eprintln!("  - {p}");
    }
    ExitCode::FAILURE
}

/// Whether a command reads the endpoints an `issuer`'s metadata gives: those that
/// store or send tokens do (a stored token records its token endpoint).
#[derive(Clone, Copy)]
enum Discover {
    Yes,
    No,
}

/// `config` with the endpoints its issuers' metadata give (on a runtime of its own, as
/// config loading happens before any).
fn discovered(mut config: Config) -> Result<Config, crate::config::ConfigError> {
    if config.credentials.values().all(|c| c.issuer.is_none()) {
        return Ok(config);
    }
    let rt = runtime(Some(1)).map_err(|e| crate::config::ConfigError {
        problems: vec![format!("cannot start the runtime for discovery: {e}")],
    })?;
    rt.block_on(crate::oauth::discovery::resolve(
        &mut config,
        &Default::default(),
    ))?;
    Ok(config)
}

/// Loads the config and runs a short async command on a small runtime.
fn with_config<F, Fut>(
    config: &ConfigArg,
    log_format: Option<LogFormat>,
    discover: Discover,
    f: F,
) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    with_config_exit(config, log_format, discover, |cfg| async move {
        f(cfg).await.map(|()| ExitCode::SUCCESS)
    })
}

/// As [`with_config`], for a command that chooses its exit code.
fn with_config_exit<F, Fut>(
    config: &ConfigArg,
    log_format: Option<LogFormat>,
    discover: Discover,
    f: F,
) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let loaded = Config::load(&config.config).and_then(|c| match discover {
        Discover::Yes => discovered(c),
        Discover::No => Ok(c),
    });
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => return config_error(&config.config, &e),
    };
    crate::logging::init(
        log_format.unwrap_or(cfg.log.format),
        Some(cfg.log.level.as_deref().unwrap_or("warn")),
    );
    let rt = match runtime(Some(1)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f(cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime: with one worker thread, a current-thread runtime (no work-stealing
/// overhead, like one nginx worker); otherwise multi-threaded with `threads` workers
/// (all cores when unset).
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().thread_name("tokenrelay").build()
}
