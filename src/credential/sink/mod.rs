//! Token sinks: the files a credential writes its access token to (`sinks` in its
//! config), off the refresh path. Publishing a token only hands it to the credential's
//! writer thread and returns; the writer replaces each file atomically ([`write`]) in
//! one of the formats of [`format`]. When tokens come faster than files are written,
//! the writer skips to the latest. A failed write is logged, counted, shown on
//! `/status`, and retried with backoff until it succeeds or a newer token comes; it
//! never holds up a refresh or a request. When the credential leaves `ready` the files
//! stay as they are: their `expires_at` tells.

mod format;
mod write;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::config::SinkConfig;
use crate::metrics::{Metrics, SinkWrites};
use crate::secret::Secret;
use format::Snapshot;

/// The first retry of a failed write; each next one waits twice as long, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A credential's sinks: the hand-off to its writer thread, and what `/status` shows.
/// Dropping it stops the writer (after the write in progress, if any).
pub(crate) struct Sinks {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    credential: String,
    sinks: Vec<SinkConfig>,
    next: Mutex<Next>,
    wake: Condvar,
    shown: Mutex<Vec<Shown>>,
    writes: SinkWrites,
}

/// The token waiting to be written (only the latest is kept).
#[derive(Default)]
struct Next {
    token: Option<Arc<Snapshot>>,
    closed: bool,
}

/// One sink on `/status`.
#[derive(Default, Clone)]
struct Shown {
    generation: Option<u64>,
    last_write_at: Option<SystemTime>,
    last_error: Option<String>,
}

impl Sinks {
    /// The sinks of `credential`; a writer thread starts when there is at least one.
    pub(crate) fn new(credential: &str, sinks: &[SinkConfig], metrics: &Metrics) -> Sinks {
        if sinks.is_empty() {
            return Sinks { shared: None };
        }
        let shared = Arc::new(Shared {
            credential: credential.to_string(),
            sinks: sinks.to_vec(),
            next: Mutex::default(),
            wake: Condvar::new(),
            shown: Mutex::new(vec![Shown::default(); sinks.len()]),
            writes: metrics.sink_writes(credential),
        });
        let writer = shared.clone();
        let started = std::thread::Builder::new()
            .name(format!("sink-{credential}"))
            .spawn(move || writer.run());
        if let Err(e) = started {
            tracing::error!(credential, error = %e, "cannot start the token sink writer; the sink files are not written");
            for s in shared.shown.lock().unwrap().iter_mut() {
                s.last_error = Some(format!("cannot start the sink writer: {e}"));
            }
        }
        Sinks {
            shared: Some(shared),
        }
    }

    /// Hands a newly published token to the writer; returns at once.
    pub(crate) fn offer(&self, token: &Secret, generation: u64, expires_at: Option<SystemTime>) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.next.lock().unwrap().token = Some(Arc::new(Snapshot {
            token: token.clone(),
            generation,
            expires_at,
        }));
        shared.wake.notify_one();
    }

    /// `/status`: per sink its file, format, the generation last written, when, and the
    /// last error (cleared by a successful write); `None` without sinks.
    pub(crate) fn status(&self) -> Option<Value> {
        let shared = self.shared.as_ref()?;
        let shown = shared.shown.lock().unwrap().clone();
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        Some(Value::Array(
            shared
                .sinks
                .iter()
                .zip(shown)
                .map(|(sink, s)| {
                    json!({
                        "file": sink.file,
                        "format": sink.format,
                        "generation": s.generation,
                        "last_write_at": time(s.last_write_at),
                        "last_error": s.last_error,
                    })
                })
                .collect(),
        ))
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.next.lock().unwrap().closed = true;
            shared.wake.notify_one();
        }
    }
}

/// Why a sink file was not written (never showing the token).
#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error(transparent)]
    Render(#[from] format::RenderError),
    #[error(transparent)]
    Write(#[from] write::WriteError),
}

/// Renders `token` in the sink's format and replaces the file with it.
fn write_sink(sink: &SinkConfig, token: &Snapshot) -> Result<(), SinkError> {
    let content = format::render(sink.format, token)?;
    write::replace(&sink.file, sink.mode, &content)?;
    Ok(())
}

impl Shared {
    /// The writer: waits for a token, writes every sink, retries the failed ones with
    /// backoff until they succeed or a newer token replaces theirs.
    fn run(self: Arc<Self>) {
        for s in &self.sinks {
            write::remove_leftovers(&s.file);
        }
        let mut current: Option<Arc<Snapshot>> = None;
        let mut failed = vec![false; self.sinks.len()];
        let mut retry = RETRY_FIRST;
        loop {
            let mut next = self.next.lock().unwrap();
            loop {
                if next.closed {
                    return;
                }
                if let Some(token) = next.token.take() {
                    current = Some(token);
                    failed.fill(true);
                    retry = RETRY_FIRST;
                    break;
                }
                if failed.contains(&true) {
                    let (guard, waited) = self.wake.wait_timeout(next, retry).unwrap();
                    next = guard;
                    if waited.timed_out() && !next.closed && next.token.is_none() {
                        retry = (retry * 2).min(RETRY_MAX);
                        break;
                    }
                } else {
                    next = self.wake.wait(next).unwrap();
                }
            }
            drop(next);
            let Some(token) = &current else { continue };
            for (i, sink) in self.sinks.iter().enumerate() {
                if failed[i] {
                    failed[i] = !self.write_one(i, sink, token);
                }
            }
        }
    }

    /// Writes one sink; true on success. Counted, logged (never the token) and shown.
    fn write_one(&self, i: usize, sink: &SinkConfig, token: &Snapshot) -> bool {
        let result = write_sink(sink, token).map_err(|e| e.to_string());
        let mut shown = self.shown.lock().unwrap();
        let s = &mut shown[i];
        match result {
            Ok(()) => {
                self.writes.success.inc();
                tracing::debug!(credential = %self.credential, file = %sink.file.display(), generation = token.generation, "token sink written");
                s.generation = Some(token.generation);
                s.last_write_at = Some(crate::clock::wall_now());
                s.last_error = None;
                true
            }
            Err(e) => {
                self.writes.failure.inc();
                // Each distinct problem once at warn; its retries at debug.
                if s.last_error.as_ref() != Some(&e) {
                    tracing::warn!(credential = %self.credential, file = %sink.file.display(), error = %e, "cannot write the token sink; the proxy and refreshes go on, and the write is retried");
                } else {
                    tracing::debug!(credential = %self.credential, file = %sink.file.display(), error = %e, "token sink write failed again");
                }
                s.last_error = Some(e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileMode, SinkFormat};

    fn sink(file: std::path::PathBuf, format: SinkFormat) -> SinkConfig {
        SinkConfig {
            file,
            format,
            mode: FileMode(0o600),
        }
    }

    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn the_latest_token_is_written_and_a_failure_is_retried_until_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        let later = dir.path().join("later/token");
        let metrics = Metrics::new();
        let sinks = Sinks::new(
            "crm",
            &[
                sink(ok.clone(), SinkFormat::Json),
                sink(later.clone(), SinkFormat::Raw),
            ],
            &metrics,
        );
        for generation in 1..=50 {
            sinks.offer(
                &Secret::new(format!("token-{generation}")),
                generation,
                None,
            );
        }
        assert!(eventually(
            || std::fs::read_to_string(&ok).is_ok_and(|t| t.contains("\"token-50\""))
        ));
        assert!(eventually(|| sinks.status().unwrap()[0]["generation"] == 50));
        let status = sinks.status().unwrap();
        assert!(status[1]["last_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"));
        assert!(status[1]["last_write_at"].is_null());
        let writes = metrics.sink_writes("crm");
        assert!(writes.failure.get() >= 1);
        // At most one write per token: coalesced when tokens come faster.
        assert!(writes.success.get() <= 50);
        // The directory appears: the retry writes the latest token.
        std::fs::create_dir(dir.path().join("later")).unwrap();
        assert!(eventually(
            || std::fs::read_to_string(&later).is_ok_and(|t| t == "token-50\n")
        ));
        assert!(eventually(
            || sinks.status().unwrap()[1]["last_error"].is_null()
        ));
        assert!(!format!("{}", sinks.status().unwrap()).contains("token-"));
    }

    #[test]
    fn no_sinks_no_writer_and_no_status() {
        let sinks = Sinks::new("crm", &[], &Metrics::new());
        sinks.offer(&Secret::new("t"), 1, None);
        assert!(sinks.status().is_none());
    }
}
