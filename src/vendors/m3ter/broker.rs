//! The m3ter token broker: one bearer token per credential, exchanged once, refreshed ahead.
//!
//! [`TokenBroker`] is the [`TokenSource`] behind the data plane. Per credential (API host,
//! access key ID, keyed hash of the API secret) it keeps a slot in a moka cache. The slot,
//! not moka, owns everything time-related: the token with its `tokio::time::Instant`
//! deadlines, the one exchange in flight, and the backoff after a failure. moka only indexes
//! the slots (and bounds them when [`BrokerConfig::capacity`] is set); its own TTL clock is
//! never consulted, so tests drive time with `tokio::time::advance`.
//!
//! - **Single-flight.** The first caller that finds no usable token starts an exchange as a
//!   spawned task and leaves a `watch` receiver in the slot; every later caller awaits that
//!   receiver. Deciding and registering happen under the slot's mutex, so two callers cannot
//!   both start one. The task outlives cancelled callers, so a dropped request never wastes an
//!   exchange that others wait for.
//! - **Refresh ahead.** A token past its refresh point is still served; the first such call
//!   also starts a background exchange (the same single flight), so a steady stream of
//!   requests never waits for one.
//! - **Backoff.** A failed exchange fails all its waiters with the same error, then the
//!   credential backs off exponentially: calls without a usable token fail fast with that
//!   error, calls with one keep getting it and start no refresh until the backoff ends.
//! - **Refusals.** [`TokenSource::refused`] drops the cached token only if it is the refused
//!   one (`Arc::ptr_eq`) and is old enough to have plausibly expired at m3ter.
//! - **Invalidation.** [`TokenBroker::retain`] (or the task of
//!   [`TokenBroker::spawn_retain`]) drops slots of credentials no tenant uses any more.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use ring::rand::SystemRandom;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::exchange::{Exchange, ExchangeFailure, IssuedToken};
use super::{BearerToken, TokenError, TokenSource};
use crate::secret::CredentialKey;
use crate::tenants::{M3terCreds, Snapshot, SnapshotReader};

/// Default time before m3ter's announced expiry at which a token stops being handed out:
/// 300 s, as the TypeScript SDK does. It covers what happens after we hand a token out: the
/// request queueing, travelling, being replayed, and m3ter's clock being ahead of ours. For
/// short-lived tokens the margin is clamped to half the lifetime (see
/// [`BrokerConfig::lifetime`]), so a token is always usable for a while and never past its
/// expiry.
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// Default refresh point, in percent of a token's usable life: 80. For m3ter's 5-hour tokens
/// that is 3 h 56 min after issuance, leaving 59 minutes of retries (under backoff) before
/// callers would have to wait for an exchange.
pub const DEFAULT_REFRESH_PERCENT: u32 = 80;

/// Default first backoff after a failed exchange: 1 s, doubling with each consecutive failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);

/// Default longest backoff: 60 s. A credential that keeps failing (revoked secret) costs
/// m3ter at most one exchange a minute, while a transient failure heals within a minute.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Default backoff jitter: 20 percent. Each backoff is lengthened by a random share of itself,
/// up to this percentage, so credentials that failed together (m3ter down for everyone) do
/// not all retry in the same instant.
pub const DEFAULT_BACKOFF_JITTER_PERCENT: u32 = 20;

/// Default limit on one exchange: 30 s. Waiters are released with a `TimedOut` error and the
/// credential backs off; without it a hung connection would hold every request of the
/// credential for as long as the transport allows.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default shortest time between two refusal-driven token drops of one credential: 30 s.
/// m3ter answers 403 both for an expired or revoked token and for an unknown organisation.
/// The first refusal drops the token, so one fresh exchange and one replay recover from a
/// revoked token at once; a tenant with a wrong org ID, refused again and again, then costs
/// at most one exchange per 30 s instead of one per request.
pub const DEFAULT_REFUSAL_INTERVAL: Duration = Duration::from_secs(30);

/// Longest lifetime believed from `expires_in`: 24 h (m3ter issues 5 h). Keeps deadline
/// arithmetic far from `Instant` overflow whatever the response says.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Metric: exchanges by `outcome` (`ok` or `failed`).
pub const METRIC_EXCHANGES: &str = "sidekey_token_exchanges_total";
/// Metric: `token()` calls answered from the cache without waiting.
pub const METRIC_CACHE_HITS: &str = "sidekey_token_cache_hits_total";
/// Metric: requests the proxy replayed with a fresh token after m3ter refused one; counted by
/// the proxy through [`record_replay`].
pub const METRIC_REPLAYS: &str = "sidekey_token_replays_total";
/// Metric: `token()` calls failed fast because their credential is backing off.
pub const METRIC_BACKOFF_REJECTIONS: &str = "sidekey_token_backoff_rejections_total";

/// Registers the help texts of the broker's metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(METRIC_EXCHANGES, "m3ter token exchanges, by outcome");
    metrics::describe_counter!(METRIC_CACHE_HITS, "m3ter tokens served from the cache");
    metrics::describe_counter!(
        METRIC_REPLAYS,
        "m3ter requests replayed with a fresh token after a refusal"
    );
    metrics::describe_counter!(
        METRIC_BACKOFF_REJECTIONS,
        "m3ter token requests failed fast during exchange backoff"
    );
}

/// Counts one replay; called by the proxy when it resends a request m3ter refused.
pub fn record_replay() {
    metrics::counter!(METRIC_REPLAYS).increment(1);
}

/// Tuning of a [`TokenBroker`]. `Default` gives the documented `DEFAULT_*` values.
#[derive(Clone, Copy, Debug)]
pub struct BrokerConfig {
    /// Most credentials whose slots are kept; by default (`None`) no bound but the tenants'.
    /// Slots exist for the credentials of the current tenants only ([`TokenBroker::retain`]
    /// drops the others at every change of the snapshot), a few hundred bytes plus a ~1 KiB
    /// token each, so the tenants already bound them. A bound below the credentials in use
    /// would make the least recently used of them exchange again at their next request, and
    /// so on in turn: a token exchange (a round trip to m3ter, against its rate limits) per
    /// request for the surplus. When set, least recently used goes first; LRU rather than
    /// moka's default TinyLFU, which may refuse to admit a new credential at all when full.
    pub capacity: Option<u64>,
    /// Stop handing a token out this long before it expires; [`DEFAULT_EXPIRY_MARGIN`].
    pub expiry_margin: Duration,
    /// Refresh in the background after this percentage of the usable life;
    /// [`DEFAULT_REFRESH_PERCENT`]. Values above 100 count as 100, which disables refresh
    /// ahead (callers then wait for an exchange when the token runs out).
    pub refresh_percent: u32,
    /// First backoff after a failure; [`DEFAULT_BACKOFF_INITIAL`].
    pub backoff_initial: Duration,
    /// Longest backoff, also the cap on m3ter's `Retry-After`; [`DEFAULT_BACKOFF_MAX`].
    pub backoff_max: Duration,
    /// Random lengthening of each backoff, in percent of it (never shortening it, so
    /// m3ter's `Retry-After` is still honoured); [`DEFAULT_BACKOFF_JITTER_PERCENT`].
    pub backoff_jitter_percent: u32,
    /// Limit on one exchange; [`DEFAULT_EXCHANGE_TIMEOUT`].
    pub exchange_timeout: Duration,
    /// Refusals closer than this to the last refusal-driven drop are ignored;
    /// [`DEFAULT_REFUSAL_INTERVAL`].
    pub refusal_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            capacity: None,
            expiry_margin: DEFAULT_EXPIRY_MARGIN,
            refresh_percent: DEFAULT_REFRESH_PERCENT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            backoff_jitter_percent: DEFAULT_BACKOFF_JITTER_PERCENT,
            exchange_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            refusal_interval: DEFAULT_REFUSAL_INTERVAL,
        }
    }
}

impl BrokerConfig {
    /// How long a token announced with `expires_in` is handed out, and after how long it is
    /// refreshed, both counted from when the exchange was *sent* (m3ter starts its clock
    /// later, so this errs early).
    ///
    /// The margin is at most half the lifetime: a 60 s token is used for 30 s rather than
    /// never; the usable life is never longer than `expires_in`. `None` for a lifetime of
    /// zero, which cannot be used at all.
    pub fn lifetime(&self, expires_in: Duration) -> Option<(Duration, Duration)> {
        let life = expires_in.min(MAX_TOKEN_LIFETIME);
        let usable = life.saturating_sub(self.expiry_margin.min(life / 2));
        if usable.is_zero() {
            return None;
        }
        let percent = self.refresh_percent.min(100);
        let refresh_after = usable
            .checked_mul(percent)
            .map_or(usable, |d| d / 100)
            .min(usable);
        Some((usable, refresh_after))
    }

    /// Backoff after the `failures`-th consecutive failure: `backoff_initial` doubled per
    /// failure, at least m3ter's `Retry-After`, at most `backoff_max` (itself capped at
    /// [`MAX_TOKEN_LIFETIME`] to keep deadlines representable).
    pub fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let exponential = self.backoff_initial.saturating_mul(1u32 << doublings);
        exponential
            .max(retry_after.unwrap_or_default())
            .min(self.backoff_max)
            .min(MAX_TOKEN_LIFETIME)
    }

    /// `backoff` lengthened by `unit` (in `[0, 1)`, drawn at random) times the jitter
    /// percentage of itself: between `backoff` and `backoff` plus that percentage.
    pub fn jittered(&self, backoff: Duration, unit: f64) -> Duration {
        let share = f64::from(self.backoff_jitter_percent.min(100)) / 100.0;
        backoff + backoff.mul_f64(unit.clamp(0.0, 1.0) * share)
    }
}

/// A random number in `[0, 1)` for backoff jitter; 0 (no jitter) should the system's
/// random source fail.
fn random_unit() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 4];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.0,
    }
}

/// A token with the deadlines that govern it.
struct Cached {
    token: BearerToken,
    /// Start a background refresh from here on.
    refresh_at: Instant,
    /// Never hand it out from here on.
    usable_until: Instant,
}

/// The outcome of one exchange as its waiters see it; `None` until it finishes.
type FlightResult = Option<Result<BearerToken, TokenError>>;

struct Backoff {
    until: Instant,
    error: TokenError,
}

#[derive(Default)]
struct SlotState {
    current: Option<Cached>,
    /// The exchange in flight, at most one.
    flight: Option<watch::Receiver<FlightResult>>,
    /// Consecutive failed exchanges; reset by a success.
    failures: u32,
    backoff: Option<Backoff>,
    /// When a refusal last dropped a token.
    last_refusal_drop: Option<Instant>,
}

/// Everything the broker knows about one credential.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    /// The state is consistent between statements (nothing in a critical section panics),
    /// so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What `token()` decided under the slot's lock.
enum Next {
    Serve(BearerToken),
    Wait(watch::Receiver<FlightResult>),
    Reject(TokenError),
}

/// The [`TokenSource`] that exchanges, caches, refreshes and backs off; see the module docs.
pub struct TokenBroker {
    /// By [`M3terCreds::token_key`]: API host, access key id and a keyed hash of the
    /// secret, so a rotated secret never reuses the old token.
    slots: Cache<CredentialKey, Arc<Slot>>,
    exchange: Arc<dyn Exchange>,
    config: BrokerConfig,
    /// Registered once: looked up by name, it cost a hash of its name on every m3ter request.
    cache_hits: metrics::Counter,
}

impl TokenBroker {
    pub fn new(exchange: Arc<dyn Exchange>, config: BrokerConfig) -> Self {
        // Both outcomes exported (at 0) from the start: a counter that first appears at 1 is
        // invisible to `rate()`, so the first failures would not fire an alert.
        for outcome in ["ok", "failed"] {
            metrics::counter!(METRIC_EXCHANGES, "outcome" => outcome).increment(0);
        }
        let mut slots = Cache::builder()
            .name("m3ter-tokens")
            .eviction_policy(EvictionPolicy::lru());
        if let Some(capacity) = config.capacity {
            slots = slots.max_capacity(capacity);
        }
        let slots = slots.build();
        Self {
            slots,
            exchange,
            config,
            cache_hits: metrics::counter!(METRIC_CACHE_HITS),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Drops the slots of credentials that no tenant in `snapshot` uses any more (tenant
    /// deleted, secret rotated, partner defaults changed). Waiters of an exchange in flight
    /// for a dropped credential still get its result; it is just not cached.
    pub fn retain(&self, snapshot: &Snapshot) {
        let live: HashSet<CredentialKey> = snapshot
            .tenants()
            .filter_map(|t| t.m3ter.as_ref())
            .map(|c| c.token_key())
            .collect();
        let dead: Vec<Arc<CredentialKey>> = self
            .slots
            .iter()
            .filter(|(k, _)| !live.contains(&**k))
            .map(|(k, _)| k)
            .collect();
        for key in dead {
            self.slots.invalidate(&*key);
        }
    }

    /// Runs [`Self::retain`] after every snapshot publish. The task holds the broker weakly
    /// and ends at the first publish after the broker is dropped, or when the publisher is.
    pub fn spawn_retain(self: &Arc<Self>, reader: SnapshotReader) -> JoinHandle<()> {
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut changes = reader.changes();
            while changes.changed().await.is_ok() {
                let Some(broker) = broker.upgrade() else {
                    break;
                };
                broker.retain(&reader.load());
            }
        })
    }

    /// Registers a new exchange as the slot's flight and spawns it. Called with the slot's
    /// lock held, which is what makes the flight single.
    fn start_flight(
        &self,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        creds: &M3terCreds,
    ) -> watch::Receiver<FlightResult> {
        let (tx, rx) = watch::channel(None);
        state.flight = Some(rx.clone());
        tokio::spawn(run_flight(
            slot.clone(),
            self.exchange.clone(),
            self.config,
            creds.clone(),
            tx,
        ));
        rx
    }
}

/// One exchange, from sending to settling the slot and releasing its waiters.
async fn run_flight(
    slot: Arc<Slot>,
    exchange: Arc<dyn Exchange>,
    config: BrokerConfig,
    creds: M3terCreds,
    tx: watch::Sender<FlightResult>,
) {
    let started = Instant::now();
    let api_host = creds.api_host.clone();
    let access_key_id = creds.access_key_id.clone();
    // A task of its own so that a panicking `Exchange` becomes an error for the waiters
    // instead of leaving the slot's flight registered forever.
    let work = tokio::spawn(async move { exchange.exchange(&creds).await });
    let abort = work.abort_handle();
    let outcome = match tokio::time::timeout(config.exchange_timeout, work).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(ExchangeFailure::Abandoned),
        Err(_) => {
            abort.abort();
            // The exchange's own transport errors are counted where they happen; this one
            // is the broker's deadline, which aborts the call before it can fail by itself.
            crate::upstream::UpstreamError::Timeout.record(super::VENDOR);
            Err(ExchangeFailure::TimedOut {
                after: config.exchange_timeout,
            })
        }
    };
    let finished = Instant::now();
    let result = {
        let mut state = slot.lock();
        state.flight = None;
        settle(&mut state, &config, outcome, started, finished)
    };
    match &result {
        Ok(_) => {
            metrics::counter!(METRIC_EXCHANGES, "outcome" => "ok").increment(1);
            tracing::debug!(%api_host, %access_key_id, "m3ter token exchanged");
        }
        Err(e) => {
            metrics::counter!(METRIC_EXCHANGES, "outcome" => "failed").increment(1);
            tracing::warn!(%api_host, %access_key_id, error = %e, "m3ter token exchange failed");
        }
    }
    // Sent after the slot is settled: a caller woken by this finds the same state.
    tx.send_replace(Some(result));
}

/// Records an exchange's outcome in the slot and returns what its waiters get.
fn settle(
    state: &mut SlotState,
    config: &BrokerConfig,
    outcome: Result<IssuedToken, ExchangeFailure>,
    started: Instant,
    finished: Instant,
) -> Result<BearerToken, TokenError> {
    let cached = outcome.and_then(|issued| {
        let unusable = ExchangeFailure::Malformed {
            reason: "the token expired before it could be used",
        };
        let (usable, refresh_after) = config
            .lifetime(issued.expires_in)
            .ok_or_else(|| unusable.clone())?;
        let usable_until = started + usable;
        // An exchange slower than the token's usable life would hand out a token past its
        // deadline; refuse it rather than serve it.
        if finished >= usable_until {
            return Err(unusable);
        }
        Ok(Cached {
            token: Arc::new(issued.token),
            refresh_at: started + refresh_after,
            usable_until,
        })
    });
    match cached {
        Ok(cached) => {
            let token = cached.token.clone();
            state.current = Some(cached);
            state.failures = 0;
            state.backoff = None;
            Ok(token)
        }
        Err(failure) => {
            state.failures = state.failures.saturating_add(1);
            let retry_after = match &failure {
                ExchangeFailure::Refused { retry_after, .. } => *retry_after,
                _ => None,
            };
            let error = TokenError {
                message: failure.to_string(),
            };
            // A still-valid token stays in `current` and keeps being served.
            state.backoff = Some(Backoff {
                until: finished
                    + config.jittered(config.backoff(state.failures, retry_after), random_unit()),
                error: error.clone(),
            });
            Err(error)
        }
    }
}

fn abandoned() -> TokenError {
    TokenError {
        message: ExchangeFailure::Abandoned.to_string(),
    }
}

#[async_trait]
impl TokenSource for TokenBroker {
    async fn token(&self, creds: &M3terCreds) -> Result<BearerToken, TokenError> {
        let slot = self
            .slots
            .get_with(creds.token_key(), || Arc::new(Slot::default()));
        let next = {
            let now = Instant::now();
            let mut state = slot.lock();
            let backing_off = state.backoff.as_ref().is_some_and(|b| now < b.until);
            let usable = match &state.current {
                Some(c) if now < c.usable_until => Some((c.token.clone(), now >= c.refresh_at)),
                _ => None,
            };
            match usable {
                Some((token, refresh_due)) => {
                    if refresh_due && state.flight.is_none() && !backing_off {
                        // Refresh ahead: the caller is served the current token and does not
                        // wait for this exchange.
                        self.start_flight(&slot, &mut state, creds);
                    }
                    Next::Serve(token)
                }
                None => {
                    // Expired (or never had one): drop it so nothing can hand it out again.
                    state.current = None;
                    if let Some(flight) = &state.flight {
                        Next::Wait(flight.clone())
                    } else if let Some(b) = state.backoff.as_ref().filter(|_| backing_off) {
                        Next::Reject(b.error.clone())
                    } else {
                        Next::Wait(self.start_flight(&slot, &mut state, creds))
                    }
                }
            }
        };
        match next {
            Next::Serve(token) => {
                self.cache_hits.increment(1);
                Ok(token)
            }
            Next::Reject(error) => {
                metrics::counter!(METRIC_BACKOFF_REJECTIONS).increment(1);
                Err(error)
            }
            Next::Wait(mut flight) => match flight.wait_for(Option::is_some).await {
                Ok(result) => result.clone().unwrap_or_else(|| Err(abandoned())),
                Err(_) => Err(abandoned()),
            },
        }
    }

    fn refused(&self, creds: &M3terCreds, token: &BearerToken) {
        let Some(slot) = self.slots.get(&creds.token_key()) else {
            return;
        };
        let now = Instant::now();
        let mut state = slot.lock();
        let current = state
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.token, token));
        let rested = state
            .last_refusal_drop
            .is_none_or(|at| now.saturating_duration_since(at) >= self.config.refusal_interval);
        if current && rested {
            state.current = None;
            state.last_refusal_drop = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::LogCapture;
    use crate::vendors::m3ter::Bearer;
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::{Notify, oneshot};

    use super::*;
    use crate::secret::Secret;
    use crate::tenants::EffectiveTenant;
    use crate::tenants::snapshot::SnapshotPublisher;
    use crate::vendors::m3ter::test_creds as creds;

    const LIFE: Duration = Duration::from_secs(18_000);

    /// What the fake answers to one call.
    enum Step {
        Ok(&'static str, Duration),
        Fail(ExchangeFailure),
        /// Held open until the test sends the answer.
        Held(oneshot::Receiver<Result<IssuedToken, ExchangeFailure>>),
    }

    /// A fake m3ter: answers calls from a script (then `tok-<n>` with 5 h lifetime), counts
    /// them and remembers which credential each used.
    #[derive(Default)]
    struct Fake {
        calls: AtomicUsize,
        script: Mutex<VecDeque<Step>>,
        seen: Mutex<Vec<(String, String)>>,
        started: Notify,
    }

    impl Fake {
        fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(steps.into_iter().collect()),
                ..Default::default()
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Exchange for Fake {
        async fn exchange(&self, creds: &M3terCreds) -> Result<IssuedToken, ExchangeFailure> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.seen.lock().unwrap().push((
                creds.access_key_id.clone(),
                creds.api_secret.expose().to_owned(),
            ));
            self.started.notify_one();
            let step = self.script.lock().unwrap().pop_front();
            match step {
                Some(Step::Ok(token, expires_in)) => Ok(issued(token, expires_in)),
                Some(Step::Fail(f)) => Err(f),
                Some(Step::Held(rx)) => rx.await.unwrap_or(Err(ExchangeFailure::Abandoned)),
                None => Ok(issued(&format!("tok-{n}"), LIFE)),
            }
        }
    }

    fn issued(token: &str, expires_in: Duration) -> IssuedToken {
        IssuedToken {
            token: Bearer::new(Secret::new(token)).unwrap(),
            expires_in,
        }
    }

    fn refused(status: u16) -> ExchangeFailure {
        ExchangeFailure::Refused {
            status,
            retry_after: None,
        }
    }

    /// A broker without backoff jitter, so tests can name exact instants.
    fn broker(fake: &Arc<Fake>) -> Arc<TokenBroker> {
        let config = BrokerConfig {
            backoff_jitter_percent: 0,
            ..BrokerConfig::default()
        };
        Arc::new(TokenBroker::new(fake.clone(), config))
    }

    /// Lets spawned tasks run until they block; never advances the clock.
    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A call that must not wait: with the clock paused, any wait would let tokio advance
    /// time to the exchange timeout, so "time did not move" proves it returned at once.
    async fn immediate(b: &TokenBroker, c: &M3terCreds) -> Result<BearerToken, TokenError> {
        let before = Instant::now();
        let result = b.token(c).await;
        assert_eq!(Instant::now(), before, "token() waited");
        result
    }

    #[tokio::test(start_paused = true)]
    async fn more_credentials_than_ten_thousand_keep_their_tokens() {
        // The broker once kept 10,000 credentials: past that, the least recently used one
        // exchanged again at its next request, and with traffic over all of them, one
        // request in every few went to m3ter's token endpoint.
        const CREDENTIALS: usize = 10_001;
        let fake = Fake::new([]);
        let b = broker(&fake);
        let all: Vec<_> = (0..CREDENTIALS)
            .map(|i| creds(&format!("key-{i}"), "secret"))
            .collect();
        for round in 0..2 {
            for c in &all {
                b.token(c).await.unwrap();
            }
            // moka evicts in its housekeeping: run it, so that a bound would have acted.
            b.slots.run_pending_tasks();
            assert_eq!(fake.calls(), CREDENTIALS, "round {round}");
        }
        // A bound, when set, still evicts the least recently used.
        let bounded = TokenBroker::new(
            fake.clone(),
            BrokerConfig {
                capacity: Some(2),
                ..BrokerConfig::default()
            },
        );
        for c in &all[..3] {
            bounded.token(c).await.unwrap();
            bounded.slots.run_pending_tasks();
        }
        bounded.token(&all[0]).await.unwrap();
        assert_eq!(
            fake.calls(),
            CREDENTIALS + 4,
            "the first credential exchanged again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_calls_share_one_exchange() {
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let callers: Vec<_> = (0..500)
            .map(|_| {
                let (b, c) = (b.clone(), c.clone());
                tokio::spawn(async move { b.token(&c).await })
            })
            .collect();
        settle().await;
        // All 500 are waiting on the one exchange.
        assert_eq!(fake.calls(), 1);
        assert!(callers.iter().all(|h| !h.is_finished()));
        answer.send(Ok(issued("shared", LIFE))).unwrap();
        let mut tokens = Vec::new();
        for h in callers {
            tokens.push(h.await.unwrap().unwrap());
        }
        assert_eq!(tokens[0].expose(), "shared");
        assert!(tokens.iter().all(|t| Arc::ptr_eq(t, &tokens[0])));
        assert_eq!(fake.calls(), 1);
        // And later calls are served from the cache.
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &tokens[0]));
        assert_eq!(fake.calls(), 1);
    }

    /// An exchange cut off by the broker's deadline is a transport failure like any other:
    /// counted as an upstream error of kind `timeout`, and as a failed exchange.
    #[tokio::test(start_paused = true)]
    async fn an_exchange_past_its_deadline_counts_as_an_upstream_timeout() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // This test's runtime has one thread, so the spawned exchange task sees it too.
        let _local = metrics::set_default_local_recorder(&recorder);
        let (_never_answered, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held)]);
        let b = broker(&fake);
        let err = b.token(&creds("key", "secret")).await.unwrap_err();
        assert!(err.message.contains("did not answer"), "{}", err.message);
        let text = handle.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(
            value(r#"sidekey_upstream_errors_total{vendor="m3ter",kind="timeout"}"#),
            1.0,
            "{text}"
        );
        assert_eq!(
            value(r#"sidekey_token_exchanges_total{outcome="failed"}"#),
            1.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_calls_share_one_exchange_across_threads() {
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        // Released together so the calls really race on two threads.
        let start = Arc::new(tokio::sync::Barrier::new(501));
        let callers: Vec<_> = (0..500)
            .map(|_| {
                let (b, c, start) = (b.clone(), c.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    b.token(&c).await
                })
            })
            .collect();
        start.wait().await;
        fake.started.notified().await;
        settle().await;
        answer.send(Ok(issued("shared", LIFE))).unwrap();
        let mut tokens = Vec::new();
        for h in callers {
            tokens.push(h.await.unwrap().unwrap());
        }
        assert_eq!(fake.calls(), 1);
        assert!(tokens.iter().all(|t| Arc::ptr_eq(t, &tokens[0])));
    }

    #[tokio::test(start_paused = true)]
    async fn shared_credentials_share_a_token_and_rotated_secrets_do_not() {
        let fake = Fake::new([]);
        let b = broker(&fake);
        // Two tenants inheriting the same partner credential: separate structs, equal values.
        let t1 = b.token(&creds("partner", "s1")).await.unwrap();
        let t2 = b.token(&creds("partner", "s1")).await.unwrap();
        assert!(Arc::ptr_eq(&t1, &t2));
        assert_eq!(fake.calls(), 1);
        // Same key ID, another secret (rotation): its own exchange, with the new secret.
        let t3 = b.token(&creds("partner", "s2")).await.unwrap();
        assert!(!Arc::ptr_eq(&t1, &t3));
        assert_eq!(fake.calls(), 2);
        assert_eq!(
            fake.seen.lock().unwrap()[1],
            ("partner".into(), "s2".into())
        );
        // Same key and secret on another environment's host: its own token too.
        let staging = M3terCreds::new(
            "partner".into(),
            crate::secret::Secret::new("s1"),
            "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa".into(),
            "staging".into(),
        );
        assert_eq!(staging.api_host, "api.staging.m3ter.com");
        b.token(&staging).await.unwrap();
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_runs_in_the_background() {
        // 1000 s token: usable 700 s (300 s margin), refreshed after 80 % = 560 s.
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Ok("old", secs(1000)), Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let old = b.token(&c).await.unwrap();

        tokio::time::advance(secs(559)).await;
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &old));
        settle().await;
        assert_eq!(fake.calls(), 1, "refreshed before the refresh point");

        tokio::time::advance(secs(1)).await;
        // Past the refresh point: served the old token at once, one refresh starts.
        for _ in 0..50 {
            assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &old));
            settle().await;
        }
        assert_eq!(fake.calls(), 2);

        answer.send(Ok(issued("new", secs(1000)))).unwrap();
        settle().await;
        let new = immediate(&b, &c).await.unwrap();
        assert_eq!(new.expose(), "new");
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_exchange_fails_its_waiters_then_backs_off_then_recovers() {
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held), Step::Fail(refused(503))]);
        let b = broker(&fake);
        let c = creds("key", "very-secret-value");
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let (b, c) = (b.clone(), c.clone());
                tokio::spawn(async move { b.token(&c).await })
            })
            .collect();
        settle().await;
        answer.send(Err(refused(401))).unwrap();
        for w in waiters {
            let err = w.await.unwrap().unwrap_err();
            assert_eq!(
                err.message,
                "m3ter refused the token exchange with HTTP 401"
            );
            assert!(!format!("{err} {err:?}").contains("very-secret-value"));
        }
        assert_eq!(fake.calls(), 1);

        // Within the 1 s backoff: fail fast with the last error, no exchange.
        for _ in 0..10 {
            let err = immediate(&b, &c).await.unwrap_err();
            assert!(err.message.contains("HTTP 401"));
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(immediate(&b, &c).await.is_err());
        assert_eq!(fake.calls(), 1);

        // Backoff over: one new attempt, which fails again (503) and doubles it to 2 s.
        tokio::time::advance(Duration::from_millis(1)).await;
        let err = b.token(&c).await.unwrap_err();
        assert!(err.message.contains("HTTP 503"));
        assert_eq!(fake.calls(), 2);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(immediate(&b, &c).await.is_err());
        assert_eq!(fake.calls(), 2);

        // Recovery.
        tokio::time::advance(Duration::from_millis(1)).await;
        let token = b.token(&c).await.unwrap();
        assert_eq!(fake.calls(), 3);
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &token));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_background_refresh_keeps_serving_the_valid_token() {
        let fake = Fake::new([
            Step::Ok("old", secs(1000)),
            Step::Fail(refused(500)),
            Step::Ok("new", secs(1000)),
        ]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let old = b.token(&c).await.unwrap();
        tokio::time::advance(secs(560)).await;
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &old));
        settle().await;
        assert_eq!(fake.calls(), 2);
        // The refresh failed: still the old token, and no new refresh during the backoff.
        tokio::time::advance(Duration::from_millis(500)).await;
        for _ in 0..10 {
            assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &old));
            settle().await;
        }
        assert_eq!(fake.calls(), 2);
        // After it, the next call refreshes again, still without waiting.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &old));
        settle().await;
        assert_eq!(fake.calls(), 3);
        assert_eq!(immediate(&b, &c).await.unwrap().expose(), "new");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_drops_only_the_current_token() {
        let fake = Fake::new([]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let first = b.token(&c).await.unwrap();

        // The first refusal drops the token at once: a revoked token recovers.
        b.refused(&c, &first);
        let second = b.token(&c).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(fake.calls(), 2);

        // Refused again within the interval (a wrong org ID): kept, no exchange storm.
        b.refused(&c, &second);
        assert!(Arc::ptr_eq(&b.token(&c).await.unwrap(), &second));
        assert_eq!(fake.calls(), 2);

        // A late refusal of the replaced token does not drop its successor.
        tokio::time::advance(DEFAULT_REFUSAL_INTERVAL).await;
        b.refused(&c, &first);
        assert!(Arc::ptr_eq(&b.token(&c).await.unwrap(), &second));
        assert_eq!(fake.calls(), 2);
        // Nor does a refusal quoting other credentials.
        b.refused(&creds("key", "other"), &second);
        assert!(Arc::ptr_eq(&b.token(&c).await.unwrap(), &second));
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_after_a_refresh_do_not_drop_the_new_token() {
        let fake = Fake::new([Step::Ok("old", secs(1000)), Step::Ok("new", secs(1000))]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let old = b.token(&c).await.unwrap();
        tokio::time::advance(secs(560)).await;
        // This request carries the old token while the refresh replaces it.
        assert!(Arc::ptr_eq(&b.token(&c).await.unwrap(), &old));
        settle().await;
        let new = immediate(&b, &c).await.unwrap();
        assert_eq!(new.expose(), "new");
        b.refused(&c, &old);
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &new));
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_after_a_refusal_share_one_exchange() {
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Ok("first", LIFE), Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let first = b.token(&c).await.unwrap();
        tokio::time::advance(secs(3600)).await;
        // Many requests were refused with the same token at about the same time.
        let replays: Vec<_> = (0..100)
            .map(|_| {
                let (b, c, first) = (b.clone(), c.clone(), first.clone());
                tokio::spawn(async move {
                    b.refused(&c, &first);
                    b.token(&c).await
                })
            })
            .collect();
        settle().await;
        assert_eq!(fake.calls(), 2);
        answer.send(Ok(issued("second", LIFE))).unwrap();
        for r in replays {
            assert_eq!(r.await.unwrap().unwrap().expose(), "second");
        }
        assert_eq!(fake.calls(), 2);
    }

    fn tenant(id: &str, m3ter: M3terCreds) -> EffectiveTenant {
        EffectiveTenant {
            id: Arc::from(id),
            miradore: None,
            m3ter: Some(m3ter),
            mailkit: None,
        }
    }

    fn snapshot(tenants: impl IntoIterator<Item = EffectiveTenant>, revision: u64) -> Snapshot {
        let map: HashMap<_, _> = tenants
            .into_iter()
            .map(|t| (t.id.clone(), Arc::new(t)))
            .collect();
        Snapshot::new(map, revision)
    }

    #[tokio::test(start_paused = true)]
    async fn retain_drops_tokens_of_vanished_credentials() {
        let fake = Fake::new([]);
        let b = broker(&fake);
        let (acme, globex, initech) = (creds("a", "s"), creds("g", "s"), creds("i", "old"));
        for c in [&acme, &globex, &initech] {
            b.token(c).await.unwrap();
        }
        assert_eq!(fake.calls(), 3);

        // globex deleted, initech's secret rotated, acme unchanged.
        let rotated = creds("i", "new");
        b.retain(&snapshot(
            [
                tenant("acme", acme.clone()),
                tenant("initech", rotated.clone()),
            ],
            2,
        ));
        b.token(&acme).await.unwrap();
        assert_eq!(fake.calls(), 3, "a live credential kept its token");
        b.token(&globex).await.unwrap();
        assert_eq!(fake.calls(), 4, "a deleted tenant's token was dropped");
        b.token(&initech).await.unwrap();
        assert_eq!(fake.calls(), 5, "a rotated secret's old token was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn retain_runs_after_each_publish() {
        let fake = Fake::new([]);
        let b = broker(&fake);
        let (acme, globex) = (creds("a", "s"), creds("g", "s"));
        let (publisher, reader) = SnapshotPublisher::new(snapshot(
            [
                tenant("acme", acme.clone()),
                tenant("globex", globex.clone()),
            ],
            1,
        ));
        let task = b.spawn_retain(reader);
        b.token(&acme).await.unwrap();
        b.token(&globex).await.unwrap();
        publisher.publish(snapshot([tenant("acme", acme.clone())], 2));
        settle().await;
        b.token(&acme).await.unwrap();
        b.token(&globex).await.unwrap();
        assert_eq!(fake.calls(), 3);
        drop(publisher);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_never_served_past_its_expiry() {
        // 10 s token: margin clamped to 5 s, usable 5 s. No refresh ahead, so the deadline
        // itself is what is tested.
        let fake = Fake::new([Step::Ok("short", secs(10)), Step::Ok("next", secs(10))]);
        let config = BrokerConfig {
            refresh_percent: 100,
            ..BrokerConfig::default()
        };
        let b = TokenBroker::new(fake.clone(), config);
        let c = creds("key", "secret");
        let short = b.token(&c).await.unwrap();
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(Arc::ptr_eq(&immediate(&b, &c).await.unwrap(), &short));
        settle().await;
        assert_eq!(fake.calls(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        // Usable life over: the caller waits for a new token instead of getting this one.
        assert_eq!(b.token(&c).await.unwrap().expose(), "next");
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_slower_than_its_life_is_not_served() {
        let (answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let waiter = {
            let (b, c) = (b.clone(), c.clone());
            tokio::spawn(async move { b.token(&c).await })
        };
        settle().await;
        tokio::time::advance(secs(6)).await;
        // Usable for 5 s from when it was requested: already over on arrival.
        answer.send(Ok(issued("late", secs(10)))).unwrap();
        let err = waiter.await.unwrap().unwrap_err();
        assert!(err.message.contains("expired"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_exchange_times_out_and_backs_off() {
        let (_answer, held) = oneshot::channel();
        let fake = Fake::new([Step::Held(held)]);
        let b = broker(&fake);
        let c = creds("key", "secret");
        let started = Instant::now();
        // Nothing answers: the paused clock jumps to the exchange timeout.
        let err = b.token(&c).await.unwrap_err();
        assert_eq!(Instant::now() - started, DEFAULT_EXCHANGE_TIMEOUT);
        assert!(err.message.contains("within 30s"), "{err}");
        assert!(immediate(&b, &c).await.is_err());
        assert_eq!(fake.calls(), 1);
    }

    struct Panics;

    #[async_trait]
    impl Exchange for Panics {
        async fn exchange(&self, _: &M3terCreds) -> Result<IssuedToken, ExchangeFailure> {
            panic!("exchange bug");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_exchange_releases_its_waiters() {
        let b = TokenBroker::new(Arc::new(Panics), BrokerConfig::default());
        let err = b.token(&creds("key", "secret")).await.unwrap_err();
        assert!(err.message.contains("stopped without an answer"), "{err}");
    }

    #[test]
    fn lifetime_is_never_longer_than_expires_in() {
        let cfg = BrokerConfig::default();
        for s in [1, 2, 10, 60, 599, 600, 601, 18_000, 10_000_000] {
            let expires_in = secs(s);
            let (usable, refresh) = cfg.lifetime(expires_in).unwrap();
            assert!(usable <= expires_in && !usable.is_zero(), "{s}");
            assert!(refresh <= usable, "{s}");
        }
        assert_eq!(cfg.lifetime(LIFE), Some((secs(17_700), secs(14_160))));
        assert_eq!(cfg.lifetime(secs(60)), Some((secs(30), secs(24))));
        assert_eq!(cfg.lifetime(Duration::ZERO), None);
        assert_eq!(cfg.lifetime(secs(u64::MAX)).unwrap().0, secs(86_400 - 300));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_honours_retry_after() {
        let cfg = BrokerConfig::default();
        let delays: Vec<u64> = (1..=9).map(|n| cfg.backoff(n, None).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(cfg.backoff(u32::MAX, None), secs(60));
        assert_eq!(cfg.backoff(1, Some(secs(7))), secs(7));
        assert_eq!(cfg.backoff(1, Some(secs(3600))), secs(60));
    }

    #[test]
    fn jitter_lengthens_a_backoff_within_its_percentage() {
        let cfg = BrokerConfig::default();
        let base = secs(10);
        assert_eq!(cfg.jittered(base, 0.0), base);
        assert_eq!(cfg.jittered(base, 0.5), secs(11));
        assert!(cfg.jittered(base, 0.999_999) < secs(12));
        assert_eq!(
            cfg.jittered(base, 7.0),
            secs(12),
            "out-of-range draws are clamped"
        );
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_between_its_base_and_the_jitter_bound() {
        let fake = Fake::new([Step::Fail(refused(503)), Step::Ok("tok", secs(1000))]);
        let b = Arc::new(TokenBroker::new(fake.clone(), BrokerConfig::default()));
        let c = creds("key", "secret");
        assert!(b.token(&c).await.is_err());
        assert_eq!(fake.calls(), 1);
        // Never shorter than the 1 s base backoff...
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(immediate(&b, &c).await.is_err());
        assert_eq!(fake.calls(), 1);
        // ...and over by 1.2 s (20 % jitter).
        tokio::time::advance(Duration::from_millis(201)).await;
        assert!(b.token(&c).await.is_ok());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn no_flow_logs_a_secret_or_a_token() {
        let logs = LogCapture::default();
        // Thread-local; the paused-clock runtime runs every task on this thread.
        let _guard = logs.capture();

        let fake = Fake::new([
            Step::Fail(refused(401)),
            Step::Ok("token-value-1", secs(1000)),
            Step::Ok("token-value-2", secs(1000)),
        ]);
        let b = broker(&fake);
        let c = creds("key", "api-secret-value");
        let err = b.token(&c).await.unwrap_err();
        tokio::time::advance(secs(1)).await;
        let first = b.token(&c).await.unwrap();
        tokio::time::advance(secs(600)).await;
        b.refused(&c, &first);
        let second = b.token(&c).await.unwrap();
        b.retain(&snapshot([], 2));
        settle().await;

        let logs = logs.text();
        assert!(logs.contains("m3ter token exchange failed"), "{logs}");
        for shown in [logs, format!("{err:?} {first:?} {second:?} {c:?}")] {
            for secret in ["api-secret-value", "token-value"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }

    #[test]
    fn cache_keys_never_show_the_secret() {
        let c = creds("key", "hunter2-secret");
        let debug = format!("{c:?} {:?}", c.token_key());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("api.m3ter.com") && debug.contains("key"));
    }
}
