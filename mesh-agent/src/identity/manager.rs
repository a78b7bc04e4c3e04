//! The certificate manager: one task owns every workload certificate on the node.
//!
//! Others tell it which identities the node needs ([`CertManager::set_identities`])
//! and read certificates from a published snapshot ([`CertManager::certificate`]).
//! The task issues each certificate, renews it at half its lifetime, and on a
//! failed renewal keeps serving the still-valid certificate while it retries with
//! exponential backoff, per identity, so one failing identity never delays another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use futures::future::BoxFuture;
use tokio::task::JoinSet;

use super::ca::{CaError, Signer};
use super::{Identity, WorkloadCert};
use crate::metrics::Metrics;

/// Why a certificate request failed; the manager retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The local CA files could not sign.
    #[error(transparent)]
    Local(#[from] CaError),
    /// The CA service answered with a refusal or an error.
    #[error("CA service refused: {code:?}: {message}")]
    Refused {
        /// gRPC status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// The CA service could not be reached, or did not answer in time.
    #[error("CA service unreachable: {0}")]
    Unreachable(String),
    /// The CA service's answer is unusable (a wrong name, key or chain).
    #[error("CA service sent an unusable certificate: {0}")]
    BadResponse(String),
}

/// Where certificates come from: the local CA files, or a CSR to the CA service.
pub trait CertificateSource: Send + Sync + 'static {
    /// A new key and certificate for `identity`.
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>>;
}

impl CertificateSource for Signer {
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
        let result = Signer::issue(self, identity, lifetime).map_err(IssueError::from);
        Box::pin(std::future::ready(result))
    }
}

/// Requests in flight at once: enough to fill a node quickly after a restart,
/// few enough not to flood the CA service.
const MAX_IN_FLIGHT: usize = 16;

/// How certificates are requested and retried.
#[derive(Debug, Clone)]
pub struct CertPolicy {
    /// Requested certificate lifetime.
    pub lifetime: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub initial_backoff: Duration,
    /// Upper bound on the retry delay.
    pub max_backoff: Duration,
}

impl Default for CertPolicy {
    fn default() -> Self {
        CertPolicy {
            lifetime: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Where one identity's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CertState {
    /// No certificate yet; the first request is in flight or being retried.
    Initializing,
    /// A valid certificate is being served.
    Available,
    /// The last renewal failed; the previous certificate is still served.
    RenewalFailing,
    /// No valid certificate: every request so far failed, or the last one expired.
    Failed,
}

/// One identity in the published snapshot.
#[derive(Debug, Clone)]
pub struct CertStatus {
    /// The certificate being served, if any.
    pub current: Option<Arc<WorkloadCert>>,
    /// See [`CertState`].
    pub state: CertState,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// When the task next acts on this identity (renewal or retry).
    pub next_attempt: Instant,
}

/// JSON view of one certificate for `/config_dump`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    /// SPIFFE ID.
    pub identity: String,
    /// Where the certificate stands.
    pub state: CertState,
    /// Hex serial of the served certificate.
    pub serial: Option<String>,
    /// Expiry of the served certificate, seconds since the Unix epoch.
    pub not_after_unix: Option<u64>,
    /// Seconds until the next renewal or retry.
    pub next_attempt_in_seconds: f64,
    /// Consecutive failures.
    pub failures: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Every managed identity, as last published by the task.
pub type CertSnapshot = BTreeMap<Identity, CertStatus>;

/// Why a certificate is not available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The node has no workload with this identity.
    #[error("no workload on this node has identity {0}")]
    NotManaged(Identity),
    /// Issuing keeps failing.
    #[error("no certificate for {identity}: {reason}")]
    Unavailable {
        /// Whose certificate.
        identity: Identity,
        /// The last error.
        reason: String,
    },
    /// The manager task has stopped.
    #[error("certificate manager stopped")]
    Stopped,
}

/// Handle on the manager task; cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    requests: mpsc::UnboundedSender<Request>,
    snapshot: watch::Receiver<Arc<CertSnapshot>>,
}

/// What the task is asked to do.
enum Request {
    /// The identities the node needs now.
    Identities(BTreeSet<Identity>),
    /// Re-issue every certificate now (the signing CA changed).
    RenewAll,
}

impl CertManager {
    /// Starts the task on the current runtime. It stops when every handle is dropped.
    pub fn spawn(
        source: Arc<dyn CertificateSource>,
        policy: CertPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (publish, snapshot) = watch::channel(Arc::new(CertSnapshot::new()));
        let task = Task {
            source,
            policy,
            metrics,
            entries: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            publish,
        };
        tokio::spawn(task.run(rx));
        CertManager {
            requests: tx,
            snapshot,
        }
    }

    /// The identities the node needs now; others are dropped, new ones issued at once.
    pub fn set_identities(&self, identities: BTreeSet<Identity>) {
        let _ = self.requests.send(Request::Identities(identities));
    }

    /// Re-issues every certificate now, from the current source: after the
    /// signing CA changed (a rotation), so every workload moves to it at once
    /// while the current certificates stay in use until then.
    pub fn renew_all(&self) {
        let _ = self.requests.send(Request::RenewAll);
    }

    /// The latest snapshot of all certificates.
    pub fn snapshot(&self) -> Arc<CertSnapshot> {
        self.snapshot.borrow().clone()
    }

    /// The certificate to present for `identity`, waiting for the first issue if needed.
    pub async fn certificate(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = self.snapshot.clone();
        let mut seen_managed = false;
        loop {
            {
                let snapshot = rx.borrow_and_update();
                match snapshot.get(identity) {
                    Some(CertStatus {
                        current: Some(cert),
                        ..
                    }) if cert.not_after > SystemTime::now() => return Ok(cert.clone()),
                    Some(status) if status.state == CertState::Failed => {
                        return Err(CertError::Unavailable {
                            identity: identity.clone(),
                            reason: status.last_error.clone().unwrap_or_default(),
                        });
                    }
                    Some(_) => seen_managed = true,
                    // A reconcile may have asked for it a moment ago.
                    None if seen_managed => return Err(CertError::NotManaged(identity.clone())),
                    None => {}
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(CertError::Stopped),
                Err(_) if seen_managed => {
                    return Err(CertError::Unavailable {
                        identity: identity.clone(),
                        reason: "still initializing after 5s".into(),
                    });
                }
                Err(_) => return Err(CertError::NotManaged(identity.clone())),
            }
        }
    }

    /// `/config_dump` view.
    pub fn views(&self) -> Vec<CertView> {
        let now = Instant::now();
        self.snapshot()
            .iter()
            .map(|(id, s)| CertView {
                identity: id.to_string(),
                state: s.state,
                serial: s.current.as_ref().map(|c| c.serial.clone()),
                not_after_unix: s.current.as_ref().map(|c| unix(c.not_after)),
                next_attempt_in_seconds: s
                    .next_attempt
                    .saturating_duration_since(now)
                    .as_secs_f64(),
                failures: s.failures,
                last_error: s.last_error.clone(),
            })
            .collect()
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Task {
    source: Arc<dyn CertificateSource>,
    policy: CertPolicy,
    metrics: Arc<Metrics>,
    entries: BTreeMap<Identity, CertStatus>,
    /// Identities with a request in flight, and whether a renewal was asked for
    /// meanwhile (the answer may come from the CA as it was before the change).
    in_flight: BTreeMap<Identity, bool>,
    publish: watch::Sender<Arc<CertSnapshot>>,
}

type Answer = (Identity, Result<WorkloadCert, IssueError>);

impl Task {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut answers: JoinSet<Answer> = JoinSet::new();
        loop {
            let next = self
                .entries
                .iter()
                .filter(|(id, _)| !self.in_flight.contains_key(*id))
                .map(|(_, e)| e.next_attempt)
                .min()
                .filter(|_| self.in_flight.len() < MAX_IN_FLIGHT);
            tokio::select! {
                request = requests.recv() => match request {
                    Some(Request::Identities(wanted)) => self.set(wanted),
                    Some(Request::RenewAll) => {
                        let now = Instant::now();
                        for entry in self.entries.values_mut() {
                            entry.next_attempt = now;
                        }
                        for renew in self.in_flight.values_mut() {
                            *renew = true;
                        }
                    }
                    None => return,
                },
                Some(answer) = answers.join_next() => match answer {
                    Ok((id, result)) => self.answered(&id, result),
                    Err(e) => tracing::error!(error = %e, "certificate request task failed"),
                },
                _ = sleep_until(next) => {}
            }
            let now = Instant::now();
            let due: Vec<Identity> = self
                .entries
                .iter()
                .filter(|(id, e)| e.next_attempt <= now && !self.in_flight.contains_key(*id))
                .map(|(id, _)| id.clone())
                .take(MAX_IN_FLIGHT.saturating_sub(self.in_flight.len()))
                .collect();
            for id in due {
                let request = self.source.issue(&id, self.policy.lifetime);
                self.in_flight.insert(id.clone(), false);
                answers.spawn(async move { (id, request.await) });
            }
            self.publish.send_replace(Arc::new(self.entries.clone()));
        }
    }

    fn set(&mut self, wanted: BTreeSet<Identity>) {
        let gone: Vec<Identity> = self
            .entries
            .keys()
            .filter(|id| !wanted.contains(id))
            .cloned()
            .collect();
        for id in gone {
            self.entries.remove(&id);
            self.metrics.forget_certificate(&id.to_string());
        }
        let now = Instant::now();
        for id in wanted {
            self.entries.entry(id).or_insert(CertStatus {
                current: None,
                state: CertState::Initializing,
                failures: 0,
                last_error: None,
                next_attempt: now,
            });
        }
    }

    fn answered(&mut self, id: &Identity, result: Result<WorkloadCert, IssueError>) {
        let renew_again = self.in_flight.remove(id).unwrap_or(false);
        // An identity the node no longer needs: its answer is dropped.
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(cert) => {
                tracing::info!(identity = %id, serial = %cert.serial, "issued workload certificate");
                self.metrics
                    .certificate_issued(&id.to_string(), unix(cert.not_after));
                // What is left of it: the CA may grant less than asked for,
                // and back-dates the start for clock skew.
                let lifetime = cert
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                entry.current = Some(Arc::new(cert));
                entry.state = CertState::Available;
                entry.failures = 0;
                entry.last_error = None;
                entry.next_attempt = if renew_again {
                    now
                } else {
                    now + lifetime.min(self.policy.lifetime) / 2
                };
            }
            Err(e) => {
                entry.failures += 1;
                let backoff = jittered(
                    self.policy
                        .initial_backoff
                        .saturating_mul(1 << (entry.failures - 1).min(20))
                        .min(self.policy.max_backoff),
                );
                let valid = entry
                    .current
                    .as_ref()
                    .is_some_and(|c| c.not_after > SystemTime::now());
                entry.state = if valid {
                    CertState::RenewalFailing
                } else {
                    CertState::Failed
                };
                tracing::warn!(
                    identity = %id,
                    error = %e,
                    failures = entry.failures,
                    retry_in = ?backoff,
                    keeping_current = valid,
                    "certificate request failed"
                );
                self.metrics.certificate_failed(&id.to_string());
                entry.last_error = Some(e.to_string());
                entry.next_attempt = now + backoff;
            }
        }
    }
}

/// A retry delay between half and all of `backoff`: many agents that lost the
/// CA at the same moment do not come back to it at the same moment.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::random_range(0.5..=1.0))
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A real CA whose requests can be made to fail.
    struct FlakyCa {
        signer: Signer,
        failing: AtomicBool,
        calls: AtomicU32,
        _dir: tempfile::TempDir,
    }

    impl CertificateSource for FlakyCa {
        fn issue(
            &self,
            id: &Identity,
            lifetime: Duration,
        ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(IssueError::Unreachable(
                    "connection refused".into(),
                ))));
            }
            CertificateSource::issue(&self.signer, id, lifetime)
        }
    }

    fn flaky() -> Arc<FlakyCa> {
        let dir = tempfile::tempdir().unwrap();
        super::super::ca::init(dir.path(), "cluster.local").unwrap();
        Arc::new(FlakyCa {
            signer: Signer::load(dir.path()).unwrap(),
            failing: AtomicBool::new(false),
            calls: AtomicU32::new(0),
            _dir: dir,
        })
    }

    fn serial(m: &CertManager, id: &Identity) -> Option<String> {
        m.snapshot()
            .get(id)
            .and_then(|s| s.current.as_ref().map(|c| c.serial.clone()))
    }

    /// Lets the task run what is due now.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_keeps_the_valid_cert_through_failures() {
        let ca = flaky();
        let metrics = Arc::new(Metrics::new());
        let policy = CertPolicy::default();
        let m = CertManager::spawn(ca.clone(), policy.clone(), metrics.clone());
        let id = Identity::new("cluster.local", "shop", "cart");
        m.set_identities([id.clone()].into());
        let first = m.certificate(&id).await.unwrap();
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);

        // Just before half-life: nothing happens.
        tokio::time::sleep(policy.lifetime / 2 - Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        assert_eq!(serial(&m, &id), Some(first.serial.clone()));

        // At half-life: renewed, with a new serial.
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        let second = serial(&m, &id).unwrap();
        assert_ne!(second, first.serial);

        // The CA breaks: at the next renewal the valid certificate stays, retries back off.
        ca.failing.store(true, Ordering::SeqCst);
        let renewal = m.snapshot()[&id].next_attempt;
        tokio::time::sleep_until(renewal + Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
        let status = m.snapshot()[&id].clone();
        assert_eq!(status.state, CertState::RenewalFailing);
        assert_eq!(serial(&m, &id), Some(second.clone()));
        assert_eq!(m.certificate(&id).await.unwrap().serial, second);
        // Retries after 1 s, then 2 s, then 4 s, each less up to half for jitter.
        let mut last = renewal;
        for (wait, calls) in [(1, 4), (2, 5), (4, 6)] {
            let next = m.snapshot()[&id].next_attempt;
            let delay = next - last;
            let wait_ms = wait * 1000;
            assert!(
                delay >= Duration::from_millis(wait_ms / 2)
                    && delay <= Duration::from_millis(wait_ms + 20),
                "retry {delay:?} not within [{wait}s/2, {wait}s]"
            );
            tokio::time::sleep_until(next - Duration::from_millis(10)).await;
            settle().await;
            assert_eq!(
                ca.calls.load(Ordering::SeqCst),
                calls - 1,
                "not before {wait}s"
            );
            tokio::time::sleep_until(next + Duration::from_millis(10)).await;
            settle().await;
            assert_eq!(ca.calls.load(Ordering::SeqCst), calls, "after {wait}s");
            last = next;
        }
        let failures = metrics.certificate_failures(&id.to_string());
        assert_eq!(failures, 4);

        // The CA recovers: the next retry succeeds and the state clears.
        ca.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(9)).await;
        settle().await;
        let status = m.snapshot()[&id].clone();
        assert_eq!(status.state, CertState::Available);
        assert_eq!(status.failures, 0);
        assert_ne!(serial(&m, &id), Some(second));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_lifetime_than_asked_for_is_renewed_at_its_own_half_life() {
        /// A CA that grants 10 s whatever is asked.
        struct Stingy(Arc<FlakyCa>);
        impl CertificateSource for Stingy {
            fn issue(
                &self,
                id: &Identity,
                _asked: Duration,
            ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
                self.0.issue(id, Duration::from_secs(10))
            }
        }
        let ca = flaky();
        let m = CertManager::spawn(
            Arc::new(Stingy(ca.clone())),
            CertPolicy::default(),
            Arc::new(Metrics::new()),
        );
        let id = Identity::new("cluster.local", "shop", "cart");
        m.set_identities([id.clone()].into());
        m.certificate(&id).await.unwrap();
        let due = m.snapshot()[&id].next_attempt - Instant::now();
        assert!(
            due <= Duration::from_secs(5) && due > Duration::from_secs(4),
            "renewal in {due:?}, not at half of the 10 s granted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_failing_identity_does_not_hold_up_another_and_removal_forgets() {
        struct OnlyCart(Arc<FlakyCa>, Mutex<Vec<String>>);
        impl CertificateSource for OnlyCart {
            fn issue(
                &self,
                id: &Identity,
                l: Duration,
            ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
                self.1.lock().unwrap().push(id.service_account.clone());
                if id.service_account != "cart" {
                    return Box::pin(std::future::ready(Err(IssueError::Refused {
                        code: tonic::Code::PermissionDenied,
                        message: "no such pod on this node".into(),
                    })));
                }
                self.0.issue(id, l)
            }
        }
        let source = Arc::new(OnlyCart(flaky(), Mutex::default()));
        let m = CertManager::spawn(
            source.clone(),
            CertPolicy::default(),
            Arc::new(Metrics::new()),
        );
        let cart = Identity::new("cluster.local", "shop", "cart");
        let bad = Identity::new("cluster.local", "shop", "broken");
        m.set_identities([cart.clone(), bad.clone()].into());
        assert!(m.certificate(&cart).await.is_ok());
        let err = m.certificate(&bad).await.unwrap_err();
        assert!(matches!(err, CertError::Unavailable { .. }), "{err}");

        m.set_identities([cart.clone()].into());
        settle().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert!(!m.snapshot().contains_key(&bad));
        assert!(matches!(
            m.certificate(&bad).await.unwrap_err(),
            CertError::NotManaged(_)
        ));
    }
}
