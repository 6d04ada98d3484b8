//! A scripted token endpoint with single-use refresh tokens `r0, r1, ...` and reuse
//! detection, implementing `tokenrelay::oauth::TokenEndpoint` so that the real refresher
//! talks to it. Each answer is a JSON body judged by tokenrelay's own parser.
//!
//! It checks, on every request, what the protocol model checks (tests/protocol_model):
//! never two refresh requests in flight; never a request while nobody holds the lease;
//! a spent refresh token presented only when the answer that spent it was lost (and then
//! once more at most, unless a process crashed).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenrelay::oauth::{parse, Answer, GrantRequest, TokenAnswer, TokenEndpoint, TokenError};
use tokio::time::Instant;

use super::store::FaultStore;

/// How the endpoint handles one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Rotates and answers.
    Answer,
    /// Rotates and answers 200 with the new refresh token and an unusable access token.
    UnusableAccessToken,
    /// Answers nothing before the client's timeout; never acts.
    TimeoutBeforeActing,
    /// Rotates, then answers nothing before the client's timeout.
    TimeoutAfterActing,
    /// Rotates, then the connection is reset.
    ResetAfterActing,
    /// Answers 503 without acting.
    ServerError,
    /// Answers `invalid_grant` without acting (the grant was revoked elsewhere).
    InvalidGrant,
}

pub const ACCESS_TTL: Duration = Duration::from_secs(60);

struct Server {
    /// When the simulation started (log times are relative to it).
    t0: Instant,
    /// The current refresh token's number; older ones are spent.
    current: u64,
    revoked: bool,
    /// Rotated tokens: when, and their successor (for the grace window).
    rotated: HashMap<u64, (Instant, u64)>,
    grace: Duration,
    script: VecDeque<Behaviour>,
    in_flight: u32,
    /// Tokens whose issuing answer never reached a refresher that could keep it.
    lost: BTreeSet<u64>,
    /// Presentations per token.
    presented: HashMap<u64, u32>,
    /// The lease each token was issued under (the request that rotated to it).
    issued_under: HashMap<u64, Option<u64>>,
    crashes: u32,
    /// The store was restored from a backup: tokens it lost may be presented again, and
    /// a refresh under way when it happened may lose its answer (a documented limit).
    rolled_back: bool,
    requests: u64,
    reuses: u64,
    grace_answers: u64,
    violations: Vec<String>,
    log: Vec<String>,
}

pub struct ScriptedEndpoint {
    server: Arc<Mutex<Server>>,
    store: Arc<FaultStore>,
    latency: Duration,
    timeout: Duration,
}

/// What a test reads back.
#[derive(Clone, Debug)]
pub struct EndpointReport {
    pub current: u64,
    pub revoked: bool,
    pub requests: u64,
    pub reuses: u64,
    pub grace_answers: u64,
    pub lost: BTreeSet<u64>,
    pub rolled_back: bool,
    pub violations: Vec<String>,
    pub log: Vec<String>,
}

impl ScriptedEndpoint {
    pub fn new(store: Arc<FaultStore>, timeout: Duration, grace: Duration) -> Arc<Self> {
        Arc::new(ScriptedEndpoint {
            server: Arc::new(Mutex::new(Server {
                t0: Instant::now(),
                current: 0,
                revoked: false,
                rotated: HashMap::new(),
                grace,
                script: VecDeque::new(),
                in_flight: 0,
                lost: BTreeSet::new(),
                presented: HashMap::new(),
                issued_under: HashMap::new(),
                crashes: 0,
                rolled_back: false,
                requests: 0,
                reuses: 0,
                grace_answers: 0,
                violations: Vec::new(),
                log: Vec::new(),
            })),
            store,
            latency: Duration::from_millis(150),
            timeout,
        })
    }

    /// The next requests are handled as `behaviours` say, in order; then `Answer`.
    pub fn script(&self, behaviours: &[Behaviour]) {
        self.server.lock().unwrap().script.extend(behaviours);
    }

    /// A process crashed: any token it held unwritten is lost with it (the model's
    /// "lost by crash"); which ones is decided by what the store holds.
    pub fn crashed(&self) {
        self.server.lock().unwrap().crashes += 1;
        self.unstored_is_lost();
    }

    /// The store was restored from a backup.
    pub fn rolled_back(&self) {
        self.server.lock().unwrap().rolled_back = true;
        self.unstored_is_lost();
    }

    /// The store lost writes (restored from a backup) or a process died with an answer
    /// unwritten: every token newer than the stored one is lost.
    fn unstored_is_lost(&self) {
        let stored = self.stored_token();
        let mut s = self.server.lock().unwrap();
        let current = s.current;
        if !s.revoked {
            // Every token newer than the stored one (a restored store holds an old one).
            let first = stored.map_or(current, |t| t + 1);
            s.lost.extend(first..=current);
        }
    }

    pub fn note(&self, line: String) {
        let mut s = self.server.lock().unwrap();
        let at = s.t0.elapsed().as_secs_f64();
        s.log.push(format!("{at:9.3}s {line}"));
    }

    pub fn report(&self) -> EndpointReport {
        let s = self.server.lock().unwrap();
        EndpointReport {
            current: s.current,
            revoked: s.revoked,
            requests: s.requests,
            reuses: s.reuses,
            grace_answers: s.grace_answers,
            lost: s.lost.clone(),
            rolled_back: s.rolled_back,
            violations: s.violations.clone(),
            log: s.log.clone(),
        }
    }

    fn stored_token(&self) -> Option<u64> {
        self.store
            .state()
            .and_then(|s| s.refresh_token)
            .and_then(|t| number(t.expose()))
    }

    /// The server's side of a request: `Ok(new token)` or the OAuth refusal.
    fn act(&self, token: u64) -> Result<u64, TokenError> {
        let lease = self.store.lease_id();
        let mut s = self.server.lock().unwrap();
        let at = Instant::now();
        let t = format!("{:9.3}s", at.duration_since(s.t0).as_secs_f64());
        *s.presented.entry(token).or_default() += 1;
        if s.revoked {
            s.log.push(format!("{t} r{token} refused: grant revoked"));
            return Err(invalid_grant("grant revoked"));
        }
        if token == s.current {
            let new = token + 1;
            s.current = new;
            s.rotated.insert(token, (at, new));
            s.issued_under.insert(new, lease);
            s.log.push(format!("{t} r{token} rotated to r{new}"));
            return Ok(new);
        }
        if let Some(&(when, successor)) = s.rotated.get(&token) {
            if at.duration_since(when) < s.grace {
                s.grace_answers += 1;
                s.log
                    .push(format!("{t} r{token} within grace: r{successor} again"));
                return Ok(successor);
            }
        }
        // A spent token: reuse detection revokes the grant.
        s.reuses += 1;
        s.revoked = true;
        let successor = token + 1;
        let cut_off = s
            .issued_under
            .get(&successor)
            .copied()
            .flatten()
            .is_some_and(|id| self.store.renewal_failed(id));
        let excused = s.lost.contains(&successor) || cut_off || s.rolled_back;
        let times = s.presented[&token];
        s.log.push(format!(
            "{t} r{token} reused ({times} presentations; successor lost: {excused}): grant revoked"
        ));
        if !excused {
            let v =
                format!("invariant 1: spent r{token} presented, and its successor was not lost");
            s.violations.push(v);
        } else if s.crashes == 0 && !cut_off && !s.rolled_back && times > 2 {
            let v = format!("in doubt: r{token} presented {times} times; one retry at most");
            s.violations.push(v);
        }
        Err(invalid_grant("refresh token reuse detected"))
    }
}

/// Decrements the in-flight count when a request ends, however it ends; a request
/// dropped (its process crashed) after the server acted loses the token it issued.
struct InFlight {
    server: Arc<Mutex<Server>>,
    issued: Option<u64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.server.lock().unwrap();
        s.in_flight -= 1;
        if let Some(t) = self.issued {
            s.lost.insert(t);
        }
    }
}

#[async_trait]
impl TokenEndpoint for ScriptedEndpoint {
    async fn request(&self, grant: GrantRequest<'_>) -> Result<TokenAnswer, TokenError> {
        let GrantRequest::RefreshToken(presented) = grant else {
            panic!("the simulation refreshes only");
        };
        let token = number(presented.expose()).expect("a token this endpoint issued");
        let behaviour = {
            let mut s = self.server.lock().unwrap();
            s.requests += 1;
            s.in_flight += 1;
            if s.in_flight > 1 {
                s.violations
                    .push("invariant 3: two refresh requests in flight at once".into());
            }
            if !self.store.leased() {
                s.violations
                    .push("a refresh token was sent while nobody held the lease".into());
            }
            s.script.pop_front().unwrap_or(Behaviour::Answer)
        };
        let mut flight = InFlight {
            server: self.server.clone(),
            issued: None,
        };
        tokio::time::sleep(self.latency).await;
        let wait_out = self.timeout.saturating_sub(self.latency);
        match behaviour {
            Behaviour::TimeoutBeforeActing => {
                tokio::time::sleep(wait_out).await;
                return Err(TokenError::InDoubt("token request timed out".into()));
            }
            Behaviour::ServerError => {
                return Err(TokenError::InDoubt("token endpoint answered 503".into()))
            }
            Behaviour::InvalidGrant => return Err(invalid_grant("grant revoked")),
            _ => {}
        }
        let new = self.act(token)?;
        flight.issued = Some(new);
        let lose = |flight: &mut InFlight| {
            // The answer is lost on its way: nobody learns the new token.
            let t = flight.issued.take().expect("issued");
            self.server.lock().unwrap().lost.insert(t);
        };
        let answer = match behaviour {
            Behaviour::TimeoutAfterActing => {
                tokio::time::sleep(wait_out).await;
                lose(&mut flight);
                return Err(TokenError::InDoubt("token request timed out".into()));
            }
            Behaviour::ResetAfterActing => {
                lose(&mut flight);
                return Err(TokenError::InDoubt("connection reset".into()));
            }
            Behaviour::UnusableAccessToken => answer(new, 0),
            _ => answer(new, ACCESS_TTL.as_secs()),
        };
        flight.issued = None;
        answer
    }
}

/// A 200 answer carrying refresh token `r{new}`, judged by tokenrelay's parser.
fn answer(new: u64, expires_in: u64) -> Result<TokenAnswer, TokenError> {
    let body = format!(
        r#"{{"access_token":"a{new}","token_type":"Bearer","expires_in":{expires_in},"refresh_token":"r{new}"}}"#
    );
    parse(
        &Answer {
            status: 200,
            content_type: "application/json",
            body: body.as_bytes(),
        },
        ACCESS_TTL,
        &[],
        &[],
        &[],
    )
}

fn invalid_grant(description: &str) -> TokenError {
    TokenError::OAuth {
        status: 400,
        error: "invalid_grant".into(),
        description: Some(description.into()),
    }
}

pub fn number(token: &str) -> Option<u64> {
    token.strip_prefix('r')?.parse().ok()
}
