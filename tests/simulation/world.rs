//! A simulated fleet: N real refresher tasks (`tokenrelay::credential::refresher`)
//! sharing one [`FaultStore`] and one [`ScriptedEndpoint`], under tokio's paused clock.
//! A crash drops a task mid-step (its lease is not released, its memory is gone); a
//! restart starts a new refresher with empty memory, as a new process would.

use std::sync::Arc;
use std::time::Duration;

use tokenrelay::config::{Config, CredentialConfig};
use tokenrelay::secret::Secret;
use tokenrelay::store::{now_ms, Store, StoredState};
use tokenrelay::Credential;
use tokenrelay::Metrics;
use tokenrelay::Refresher;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::endpoint::{number, EndpointReport, ScriptedEndpoint};
use super::store::FaultStore;

pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Replica {
    pub credential: Arc<Credential>,
    pub metrics: Arc<Metrics>,
    task: JoinHandle<()>,
    stop: CancellationToken,
}

pub struct World {
    pub store: Arc<FaultStore>,
    pub endpoint: Arc<ScriptedEndpoint>,
    pub replicas: Vec<Option<Replica>>,
    config: Arc<CredentialConfig>,
    seed: u64,
    started: u64,
}

impl World {
    /// `replicas` processes sharing a credential seeded with refresh token `r0`; the
    /// token endpoint has a reuse grace window of `grace`.
    pub fn new(replicas: usize, grace: Duration, seed: u64) -> World {
        let yaml = "credentials:
  crm:
    grant: refresh_token
    token_url: https://idp.example/token
    client_id: sim
    token_timeout: 2s
upstreams:
  crm: { listen: \"127.0.0.1:0\", url: \"https://api.example\", credential: crm }
";
        let config = Config::from_yaml(yaml, &|_| None).expect("simulation config");
        let store = FaultStore::new(StoredState {
            generation: 1,
            refresh_token: Some(Secret::new("r0")),
            obtained_at_ms: now_ms(),
            authorized_at_ms: Some(now_ms()),
            updated_by: "seed".into(),
            ..Default::default()
        });
        let endpoint = ScriptedEndpoint::new(store.clone(), TOKEN_TIMEOUT, grace);
        let mut w = World {
            store,
            endpoint,
            replicas: (0..replicas).map(|_| None).collect(),
            config: Arc::new(config.credentials["crm"].clone()),
            seed,
            started: 0,
        };
        for i in 0..replicas {
            w.start(i);
        }
        w
    }

    pub fn start(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} is running");
        self.started += 1;
        let metrics = Arc::new(Metrics::new());
        let credential = Arc::new(Credential::new(self.config.clone(), metrics.clone()));
        let stop = CancellationToken::new();
        let refresher = Refresher::new(
            credential.clone(),
            Some(self.store.clone() as Arc<dyn Store>),
            None,
            format!("replica-{i}"),
            metrics.clone(),
            stop.clone(),
        )
        .expect("refresher")
        .with_token_endpoint(self.endpoint.clone())
        .with_jitter_seed(self.seed.wrapping_mul(31).wrapping_add(self.started));
        self.replicas[i] = Some(Replica {
            credential,
            metrics,
            task: tokio::spawn(refresher.run()),
            stop,
        });
        self.endpoint.note(format!("replica {i} started"));
    }

    /// SIGKILL: the task is dropped wherever it is; nothing is released or written.
    pub fn crash(&mut self, i: usize) {
        if let Some(r) = self.replicas[i].take() {
            r.task.abort();
            self.endpoint.crashed();
            self.endpoint.note(format!("replica {i} crashed"));
        }
    }

    /// SIGTERM: the refresher finishes what it must and ends.
    pub async fn stop(&mut self, i: usize) {
        if let Some(r) = self.replicas[i].take() {
            r.stop.cancel();
            let _ = r.task.await;
            self.endpoint.note(format!("replica {i} stopped"));
        }
    }

    pub fn running(&self, i: usize) -> bool {
        self.replicas[i].is_some()
    }

    /// Lets `d` of simulated time pass.
    pub async fn pass(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    pub fn report(&self) -> EndpointReport {
        self.endpoint.report()
    }

    /// Whether every running replica serves a usable token.
    pub fn all_serving(&self) -> bool {
        let now = tokenrelay::Instant::now();
        self.replicas
            .iter()
            .flatten()
            .all(|r| r.credential.usable(now).is_some())
    }

    /// The refresh token the store holds, by number.
    pub fn stored_token(&self) -> Option<u64> {
        self.store
            .state()
            .and_then(|s| s.refresh_token)
            .and_then(|t| number(t.expose()))
    }

    /// A metric of replica `i`, summed over its label sets.
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        let Some(r) = &self.replicas[i] else {
            return 0.0;
        };
        let text = String::from_utf8_lossy(&r.metrics.render()).into_owned();
        let (labelled, bare) = (format!("{name}{{"), format!("{name} "));
        text.lines()
            .filter(|l| l.starts_with(&labelled) || l.starts_with(&bare))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops every task (end of a history).
    pub fn shutdown(&mut self) {
        for r in self.replicas.iter_mut().filter_map(Option::take) {
            r.task.abort();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown();
    }
}
