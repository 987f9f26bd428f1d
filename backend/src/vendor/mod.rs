//! The guarded vendor call behind `POST /llm` (the second seed's layer 5). Inbound limits do
//! not protect the vendor: every outbound call, from every instance, retries included, must
//! respect the vendor's contract, and no instance may collapse while waiting for it.
//!
//! The order is the seed's: reject before waiting, wait before reserving, reserve before
//! calling. Each stage is one step of [`Vendor::call`] with one comment saying what it
//! protects; the per-user limits ran before this (in the router), so a user over its own
//! limit never waits here, takes a token or a slot.
//!
//! The stages are written out rather than stacked as tower layers because two of them do not
//! fit a layer: the contract's token must be the last thing taken before the send (the slot
//! comes first, so no wait separates the token from the call the vendor counts), and each
//! retry must pass the global limiter again while keeping the slot. tower's
//! `TpsBudget` is used for the retry budget and governor for the local smoothing.

pub mod breaker;
pub mod contract;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota as GovernorQuota};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::metrics::Metrics;
use crate::ratelimit::Quota;
use breaker::Breaker;
use contract::Contract;

/// The pipeline's settings (environment variables `VENDOR_*`, see `backend --help`).
#[derive(Debug, Clone)]
pub struct VendorSettings {
    pub url: String,
    /// `https://`: CA certificates (PEM) trusted instead of the system's store.
    pub ca_file: Option<std::path::PathBuf>,
    pub queue_timeout: Duration,
    pub local_rate: Quota,
    pub contract: Quota,
    /// Added to the contract's window on our side: covers the variation of the time from
    /// taking a token to the vendor receiving the call.
    pub contract_margin: Duration,
    pub limiter_wait: Duration,
    pub concurrency: usize,
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_budget: f32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub expected_instances: u32,
    /// When failed Redis calls mean Redis is lost (see [`contract`]).
    pub redis_lost: contract::LossRule,
}

/// Why a vendor call did not produce the vendor's answer; each maps to one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VendorError {
    /// 503: the circuit is open; fail fast.
    CircuitOpen { retry_after: Duration },
    /// 503: the queue timeout ran out in `stage`.
    QueueTimeout { stage: &'static str },
    /// 429: the vendor contract is used up (our limiter said so).
    Quota { retry_after: Duration },
    /// 503: no vendor call can be counted: Redis, which counts every instance's calls, was
    /// lost (this instance makes no calls for one window) or did not answer in time.
    LimiterUnavailable { retry_after: Duration },
    /// 429: the vendor refused a call over its contract (a violation seen from our side:
    /// counted in `backend_vendor_contract_rejections_total` and logged).
    VendorQuota { retry_after: Duration },
    /// 504: the vendor did not answer in time (after the allowed retries).
    Timeout,
    /// 502: the vendor failed (connect error, 5xx, or an answer we cannot pass on).
    Upstream { detail: String },
}

impl VendorError {
    /// The pipeline stage it happened in, for the JSON body and metrics.
    pub fn stage(&self) -> &'static str {
        match self {
            VendorError::CircuitOpen { .. } => "circuit",
            VendorError::QueueTimeout { stage } => stage,
            VendorError::Quota { .. } => "global_limiter",
            VendorError::LimiterUnavailable { .. } => "limiter_unavailable",
            VendorError::VendorQuota { .. } => "vendor_contract",
            VendorError::Timeout | VendorError::Upstream { .. } => "call",
        }
    }
}

/// One attempt's result, classified for retries and the breaker.
enum Attempt {
    Done(u16, Bytes),
    /// Worth retrying: connect error, timeout, 5xx, vendor 429 (with its Retry-After).
    Retryable(VendorError, Option<Duration>),
    /// Not worth retrying: the vendor refused the request itself.
    Final(VendorError),
}

pub struct Vendor {
    s: VendorSettings,
    client: reqwest::Client,
    /// Stage 2: this instance's smoothing.
    local: DefaultDirectRateLimiter,
    /// Stage 4: the contract across instances (Redis, with shares through outages).
    global: Arc<Contract>,
    /// Stage 3: concurrent calls from this instance.
    slots: Arc<Semaphore>,
    budget: TpsBudget,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    instance: String,
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a prometheus::IntGauge);

impl<'a> Gauge<'a> {
    fn up(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Vendor {
    pub fn new(
        s: VendorSettings,
        redis: Option<crate::ratelimit::redis::RedisStore>,
        redis_timeout: Duration,
        metrics: Arc<Metrics>,
        instance: &str,
    ) -> Result<Self, String> {
        crate::tls::init();
        let mut client = reqwest::Client::builder()
            .connect_timeout(s.connect_timeout)
            .pool_max_idle_per_host(s.concurrency);
        if let Some(path) = &s.ca_file {
            // The vendor's own CA only, as curl's --cacert: not also every public CA.
            let pem = crate::tls::read_certificates("VENDOR_CA_FILE", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("VENDOR_CA_FILE={}: {e}", path.display()))?;
            client = client.tls_built_in_root_certs(false);
            for cert in certs {
                client = client.add_root_certificate(cert);
            }
        }
        let client = client
            .build()
            .map_err(|e| format!("vendor HTTP client: {}", crate::tls::error_chain(&e)))?;
        // governor spaces calls evenly: one every window/limit, no burst beyond one.
        let period = s.local_rate.window / s.local_rate.limit.max(1);
        let local = DefaultDirectRateLimiter::direct(
            GovernorQuota::with_period(period).ok_or("VENDOR_LOCAL_RATE: too fast")?,
        );
        let global = Contract::new(
            redis,
            s.contract,
            s.contract_margin,
            s.expected_instances,
            redis_timeout,
            s.redis_lost,
            metrics.clone(),
        );
        let budget = TpsBudget::new(Duration::from_secs(10), 1, s.retry_budget);
        Ok(Vendor {
            slots: Arc::new(Semaphore::new(s.concurrency)),
            breaker: Breaker::new(s.breaker_failures, s.breaker_cooldown),
            client,
            local,
            global,
            budget,
            metrics,
            instance: instance.to_string(),
            s,
        })
    }

    fn stage(&self, stage: &str, result: &str) {
        self.metrics
            .vendor_stage
            .with_label_values(&[stage, result])
            .inc();
    }

    /// Send `payload` to the vendor through every stage; the vendor's status and body.
    pub async fn call(&self, payload: Bytes) -> Result<(u16, Bytes), VendorError> {
        let result = self.guarded_call(payload).await;
        self.metrics.vendor_circuit.set(self.breaker.state() as i64);
        if let Err(e) = &result {
            self.stage(e.stage(), "rejected");
        }
        result
    }

    async fn guarded_call(&self, payload: Bytes) -> Result<(u16, Bytes), VendorError> {
        // 0. Circuit breaker: while the vendor is failing, fail fast instead of queueing.
        let probe = self.breaker.admit().map_err(|o| VendorError::CircuitOpen {
            retry_after: o.retry_after,
        })?;
        let mut probe = ProbeGuard {
            breaker: &self.breaker,
            pending: probe,
        };
        // 1. Queue timeout: the whole wait for admission (stages 2-4) is bounded.
        let deadline = Instant::now() + self.s.queue_timeout;
        let waiting = Gauge::up(&self.metrics.vendor_waiting);

        // 2. Local smoothing: this instance's calls are spaced to its rate, so one instance
        //    cannot use the global budget in a burst.
        tokio::time::timeout_at(deadline, self.local.until_ready())
            .await
            .map_err(|_| VendorError::QueueTimeout {
                stage: "local_limiter",
            })?;
        self.stage("local_limiter", "admitted");

        // 3. Semaphore: a slot for the call, taken before the contract's token, so that no
        //    wait comes between the token and the send (a token taken, then a long wait for a
        //    slot, was counted by the vendor later than by us).
        let _slot = tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| VendorError::QueueTimeout { stage: "semaphore" })?
            .expect("the semaphore is never closed");
        self.stage("semaphore", "admitted");

        // 4. Global vendor limiter: the contract across every instance, exact, in Redis; the
        //    call is sent as soon as it has the token.
        self.acquire_global(deadline).await?;
        drop(waiting);
        let _inflight = Gauge::up(&self.metrics.vendor_inflight);

        // 5-7. The call: a timeout per attempt, pooled connections, retries with backoff
        //      and a budget, each retry passing the global limiter again.
        self.budget.deposit();
        let mut attempt = 1;
        loop {
            let outcome = self.attempt(&payload).await;
            let (error, vendor_wait) = match outcome {
                Attempt::Done(status, body) => {
                    self.breaker.record(true);
                    probe.pending = false;
                    self.stage("call", "ok");
                    return Ok((status, body));
                }
                Attempt::Final(e) => {
                    self.breaker.record(true);
                    probe.pending = false;
                    return Err(e);
                }
                Attempt::Retryable(e, wait) => {
                    // A vendor quota answer says nothing about its health.
                    if !matches!(e, VendorError::VendorQuota { .. }) {
                        self.breaker.record(false);
                        probe.pending = false;
                    }
                    (e, wait)
                }
            };
            if attempt >= self.s.max_attempts || self.breaker.admit_retry().is_err() {
                return Err(error);
            }
            if !self.budget.withdraw() {
                self.metrics.vendor_budget_exhausted.inc();
                return Err(error);
            }
            self.metrics.vendor_retries.inc();
            tokio::time::sleep(vendor_wait.unwrap_or_else(|| self.backoff(attempt))).await;
            // Every retry is a call too: it passes the global limiter again.
            self.acquire_global(Instant::now() + self.s.limiter_wait)
                .await?;
            attempt += 1;
        }
    }

    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .s
            .backoff_base
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.s.backoff_max);
        cap.mul_f64(rand::random::<f64>())
    }

    /// Wait for a token of the global contract, up to the limiter's own timeout (and the
    /// queue deadline); 429 when the contract is used up, 503 when the shared limiter is
    /// unavailable (Redis lost, or not answering), whichever kept the call out last.
    async fn acquire_global(&self, deadline: Instant) -> Result<(), VendorError> {
        let own_deadline = (Instant::now() + self.s.limiter_wait).min(deadline);
        loop {
            let refusal = match self.global.acquire().await {
                Ok(()) => {
                    self.stage("global_limiter", "admitted");
                    return Ok(());
                }
                Err(refusal) => refusal,
            };
            if let contract::Refusal::RedisFailed(_) = refusal {
                self.stage("global_limiter", "redis_failed");
            }
            let wait = refusal.wait().max(Duration::from_millis(5));
            if Instant::now() + wait > own_deadline {
                return Err(match refusal {
                    contract::Refusal::Full(_) => VendorError::Quota { retry_after: wait },
                    contract::Refusal::RedisFailed(_) | contract::Refusal::Held(_) => {
                        VendorError::LimiterUnavailable { retry_after: wait }
                    }
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// While Redis is lost, the contract is kept with this instance's share.
    pub fn is_degraded(&self) -> bool {
        self.global.is_degraded()
    }

    async fn attempt(&self, payload: &Bytes) -> Attempt {
        let started = std::time::Instant::now();
        let send = async {
            let resp = self
                .client
                .post(&self.s.url)
                .header("Content-Type", "application/json")
                .header("X-Floodgate-Instance", &self.instance)
                .body(payload.clone())
                .send()
                .await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, retry_after, body))
        };
        let result = tokio::time::timeout(self.s.call_timeout, send).await;
        self.metrics
            .vendor_latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(_) => Attempt::Retryable(VendorError::Timeout, None),
            Ok(Err(e)) if e.is_timeout() => Attempt::Retryable(VendorError::Timeout, None),
            Ok(Err(e)) => Attempt::Retryable(
                VendorError::Upstream {
                    detail: format!("cannot reach the vendor: {}", crate::tls::error_chain(&e)),
                },
                None,
            ),
            Ok(Ok((status, _, body))) if (200..300).contains(&status) => {
                Attempt::Done(status, body)
            }
            Ok(Ok((429, retry_after, _))) => {
                // The vendor counted more calls in its window than the contract allows: a
                // violation from where we stand, to be seen apart from our own refusals.
                self.metrics.vendor_contract_rejections.inc();
                log::warn!(
                    "the vendor refused a call over its contract (429); {}",
                    "VENDOR_CONTRACT, VENDOR_CONTRACT_MARGIN or VENDOR_EXPECTED_INSTANCES may be wrong"
                );
                let wait = retry_after.unwrap_or(Duration::from_secs(1));
                let wait = wait.min(self.s.backoff_max.max(Duration::from_millis(1)));
                Attempt::Retryable(VendorError::VendorQuota { retry_after: wait }, Some(wait))
            }
            Ok(Ok((status, _, _))) if status >= 500 => Attempt::Retryable(
                VendorError::Upstream {
                    detail: format!("the vendor answered {status}"),
                },
                None,
            ),
            Ok(Ok((status, _, _))) => Attempt::Final(VendorError::Upstream {
                detail: format!("the vendor refused the request ({status})"),
            }),
        }
    }
}

/// A half-open probe that ended without a verdict (refused in a queue, say) hands the probe
/// back, so the breaker does not stay half-open forever.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    pending: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.pending {
            self.breaker.abandon_probe();
        }
    }
}
