//! Endpoint choice for one Service port: power of two choices over peak-EWMA
//! latency weighted by outstanding requests (as Linkerd and Finagle do), or
//! round-robin; a bound on requests pending at each endpoint; and outlier
//! detection that ejects failing endpoints for a growing time.
//!
//! Endpoint state outlives config reloads: a reload that keeps an endpoint keeps
//! its latency estimate and ejection history.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use crate::state::service::Endpoint;
use crate::state::traffic::{LoadBalancer, OutlierDetection, ServiceTraffic};

/// Latency assumed for an endpoint that has not answered yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the EWMA decay.
pub const DECAY: Duration = Duration::from_secs(10);

/// One endpoint and everything learned about it.
pub struct EndpointState {
    /// Address and workload.
    pub endpoint: Endpoint,
    pending: AtomicU32,
    ewma: Mutex<PeakEwma>,
    health: Mutex<Health>,
}

/// Peak-sensitive EWMA: jumps up to a slower sample at once, decays toward
/// faster ones (and toward zero while unobserved, so a slow endpoint is re-probed).
#[derive(Debug, Clone, Copy)]
struct PeakEwma {
    cost_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn decayed(&self, now: Instant) -> f64 {
        let td = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.cost_ns * (-td / DECAY.as_secs_f64()).exp()
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let td = now.saturating_duration_since(self.stamp).as_secs_f64();
        let w = (-td / DECAY.as_secs_f64()).exp();
        self.cost_ns = if rtt > self.cost_ns {
            rtt
        } else {
            self.cost_ns * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// How an attempt to an endpoint ended, for the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A 5xx response, a refused connect or a reset.
    Failure,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    /// The Service selects no workload.
    #[error("no endpoints")]
    Empty,
    /// Every endpoint already has its maximum of pending requests.
    #[error("every endpoint is at its pending-request limit")]
    Overflow,
}

/// The endpoints of one Service port and the policy that picks among them.
pub struct Balancer {
    policy: RwLock<ServiceTraffic>,
    endpoints: RwLock<Arc<Vec<Arc<EndpointState>>>>,
    next: AtomicUsize,
}

/// A chosen endpoint; counts as pending until dropped.
pub struct Pick {
    /// The endpoint.
    pub state: Arc<EndpointState>,
    started: Instant,
}

impl Pick {
    /// Where to send the request.
    pub fn endpoint(&self) -> &Endpoint {
        &self.state.endpoint
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.state.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint in `/config_dump` and `mesh-agent debug endpoints`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    /// `ip:port`.
    pub address: String,
    /// `namespace/name` of the workload; `None` for an address no known pod has.
    pub workload: Option<String>,
    /// `healthy` or `ejected`.
    pub health: String,
    /// Seconds until an ejection ends.
    pub ejected_for_seconds: Option<f64>,
    /// Times ejected (decays while healthy).
    pub ejections: u32,
    /// Consecutive failures so far.
    pub consecutive_failures: u32,
    /// Requests in flight.
    pub pending: u32,
    /// Current latency estimate.
    pub ewma_ms: f64,
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(policy: ServiceTraffic, endpoints: Vec<Endpoint>) -> Self {
        let b = Balancer {
            policy: RwLock::new(policy),
            endpoints: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
        };
        b.update(b.policy(), endpoints);
        b
    }

    /// The policy in force.
    pub fn policy(&self) -> ServiceTraffic {
        self.policy.read().expect("balancer lock").clone()
    }

    /// Replaces policy and endpoint set, keeping what is known about endpoints that stay.
    pub fn update(&self, policy: ServiceTraffic, endpoints: Vec<Endpoint>) {
        let now = Instant::now();
        let old = self.endpoints.read().expect("balancer lock").clone();
        let fresh = endpoints
            .into_iter()
            .map(|e| {
                old.iter()
                    .find(|s| s.endpoint == e)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(EndpointState {
                            endpoint: e,
                            pending: AtomicU32::new(0),
                            ewma: Mutex::new(PeakEwma {
                                cost_ns: DEFAULT_RTT.as_nanos() as f64,
                                stamp: now,
                            }),
                            health: Mutex::new(Health::default()),
                        })
                    })
            })
            .collect();
        *self.endpoints.write().expect("balancer lock") = Arc::new(fresh);
        *self.policy.write().expect("balancer lock") = policy;
    }

    /// The current endpoint set.
    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointState>>> {
        self.endpoints.read().expect("balancer lock").clone()
    }

    /// Chooses an endpoint, skipping ejected ones (unless all are) and those at
    /// their pending bound, excluding `avoid` (the last failed attempt) when
    /// another choice exists.
    pub fn pick(
        &self,
        now: Instant,
        avoid: Option<&Endpoint>,
        rng: &mut impl Rng,
    ) -> Result<Pick, NoEndpoint> {
        let all = self.endpoints();
        if all.is_empty() {
            return Err(NoEndpoint::Empty);
        }
        let policy = self.policy.read().expect("balancer lock").clone();
        let healthy: Vec<&Arc<EndpointState>> = all.iter().filter(|s| !s.ejected(now)).collect();
        // Panic mode: with every endpoint ejected, trying one beats failing all.
        let pool: Vec<&Arc<EndpointState>> = if healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        let open: Vec<&Arc<EndpointState>> = pool
            .into_iter()
            .filter(|s| s.pending.load(Ordering::Relaxed) < policy.max_pending_per_endpoint)
            .collect();
        let candidates: Vec<&Arc<EndpointState>> =
            match open.iter().filter(|s| Some(&s.endpoint) != avoid).count() {
                0 => open,
                _ => open
                    .into_iter()
                    .filter(|s| Some(&s.endpoint) != avoid)
                    .collect(),
            };
        let chosen = match candidates.len() {
            0 => return Err(NoEndpoint::Overflow),
            1 => candidates[0],
            n => match policy.load_balancer {
                LoadBalancer::RoundRobin => {
                    candidates[self.next.fetch_add(1, Ordering::Relaxed) % n]
                }
                LoadBalancer::PeakEwma => {
                    let a = rng.random_range(0..n);
                    let mut b = rng.random_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (x, y) = (candidates[a], candidates[b]);
                    if x.load(now) <= y.load(now) { x } else { y }
                }
            },
        };
        chosen.pending.fetch_add(1, Ordering::Relaxed);
        Ok(Pick {
            state: chosen.clone(),
            started: now,
        })
    }

    /// Records how an attempt ended: latency for the EWMA, and failures for
    /// outlier detection. Returns true when this failure ejected the endpoint.
    pub fn record(&self, pick: &Pick, outcome: Outcome, now: Instant) -> bool {
        let state = &pick.state;
        state
            .ewma
            .lock()
            .expect("ewma lock")
            .observe(now.saturating_duration_since(pick.started), now);
        let outlier = self
            .policy
            .read()
            .expect("balancer lock")
            .outlier_detection
            .clone();
        let all = self.endpoints();
        let ejected_now = all.iter().filter(|s| s.ejected(now)).count();
        let mut h = state.health.lock().expect("health lock");
        match outcome {
            Outcome::Success => {
                h.consecutive_failures = 0;
                // Healthy for a whole further base period after an ejection: the
                // next ejection is one step shorter.
                if let Some(until) = h.ejected_until
                    && now > until + outlier.base_ejection_time
                {
                    h.ejections = h.ejections.saturating_sub(1);
                    h.ejected_until = (h.ejections > 0).then_some(now);
                }
                false
            }
            Outcome::Failure => {
                h.consecutive_failures += 1;
                let due = h.consecutive_failures >= outlier.consecutive_errors.max(1);
                let already = h.ejected_until.is_some_and(|t| t > now);
                if due && !already && ejection_allowed(&outlier, all.len(), ejected_now) {
                    h.ejections += 1;
                    h.ejected_until = Some(now + eject_for(&outlier, h.ejections));
                    h.consecutive_failures = 0;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Snapshot for the debug views.
    pub fn views(&self, now: Instant) -> Vec<EndpointView> {
        self.endpoints()
            .iter()
            .map(|s| {
                let h = *s.health.lock().expect("health lock");
                let until = h.ejected_until.filter(|t| *t > now);
                EndpointView {
                    address: s.endpoint.addr.to_string(),
                    workload: s.endpoint.workload.as_ref().map(|w| w.key()),
                    health: if until.is_some() {
                        "ejected"
                    } else {
                        "healthy"
                    }
                    .into(),
                    ejected_for_seconds: until.map(|t| (t - now).as_secs_f64()),
                    ejections: h.ejections,
                    consecutive_failures: h.consecutive_failures,
                    pending: s.pending.load(Ordering::Relaxed),
                    ewma_ms: s.ewma.lock().expect("ewma lock").decayed(now) / 1e6,
                }
            })
            .collect()
    }
}

impl EndpointState {
    fn ejected(&self, now: Instant) -> bool {
        self.health
            .lock()
            .expect("health lock")
            .ejected_until
            .is_some_and(|t| t > now)
    }

    /// P2C cost: latency estimate times (pending + 1).
    fn load(&self, now: Instant) -> f64 {
        let cost = self.ewma.lock().expect("ewma lock").decayed(now);
        cost * (self.pending.load(Ordering::Relaxed) as f64 + 1.0)
    }
}

/// The n-th ejection lasts n base periods, capped at 5 minutes.
fn eject_for(outlier: &OutlierDetection, ejections: u32) -> Duration {
    outlier
        .base_ejection_time
        .saturating_mul(ejections.max(1))
        .min(Duration::from_secs(300).max(outlier.base_ejection_time))
}

/// At most `max_ejection_percent` of endpoints may be out, but always at least
/// one when there are two or more.
fn ejection_allowed(outlier: &OutlierDetection, total: usize, ejected: usize) -> bool {
    if total < 2 {
        return false;
    }
    let cap = (total * outlier.max_ejection_percent as usize / 100).max(1);
    ejected < cap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::workload::WorkloadMeta;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn endpoint(i: u8) -> Endpoint {
        Endpoint {
            addr: format!("10.0.0.{i}:80").parse().unwrap(),
            workload: Some(Arc::new(WorkloadMeta {
                name: format!("pod-{i}").into(),
                namespace: "shop".into(),
                service_account: "default".into(),
                labels: Default::default(),
                workload_name: format!("pod-{i}").into(),
                meshed: true,
                trust_domain: "cluster.local".into(),
            })),
        }
    }

    fn policy(lb: LoadBalancer, errors: u32, percent: u32) -> ServiceTraffic {
        ServiceTraffic {
            load_balancer: lb,
            max_pending_per_endpoint: 2,
            outlier_detection: OutlierDetection {
                consecutive_errors: errors,
                base_ejection_time: Duration::from_secs(1),
                max_ejection_percent: percent,
            },
            ..ServiceTraffic::default()
        }
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let b = Balancer::new(
            policy(LoadBalancer::PeakEwma, 5, 50),
            (1..=3).map(endpoint).collect(),
        );
        let mut rng = SmallRng::seed_from_u64(7);
        let mut now = Instant::now();
        let mut slow = 0;
        for _ in 0..1000 {
            let pick = b.pick(now, None, &mut rng).unwrap();
            let is_slow = pick.endpoint().addr.ip().to_string() == "10.0.0.1";
            let rtt = Duration::from_millis(if is_slow { 50 } else { 1 });
            now += rtt;
            b.record(&pick, Outcome::Success, now);
            slow += is_slow as usize;
        }
        assert!(slow < 100, "slow endpoint got {slow} of 1000");
    }

    #[test]
    fn round_robin_takes_turns() {
        let b = Balancer::new(
            policy(LoadBalancer::RoundRobin, 5, 50),
            (1..=3).map(endpoint).collect(),
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        let order: Vec<String> = (0..6)
            .map(|_| {
                b.pick(now, None, &mut rng)
                    .unwrap()
                    .endpoint()
                    .addr
                    .to_string()
            })
            .collect();
        assert_eq!(order[0..3], order[3..6]);
        assert_ne!(order[0], order[1]);
    }

    #[test]
    fn pending_bound_overflows() {
        let b = Balancer::new(policy(LoadBalancer::PeakEwma, 5, 50), vec![endpoint(1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        let held: Vec<Pick> = (0..2)
            .map(|_| b.pick(now, None, &mut rng).unwrap())
            .collect();
        assert_eq!(
            b.pick(now, None, &mut rng).err(),
            Some(NoEndpoint::Overflow)
        );
        drop(held);
        assert!(b.pick(now, None, &mut rng).is_ok());
    }

    #[test]
    fn outliers_are_ejected_for_growing_times_within_the_cap() {
        let b = Balancer::new(
            policy(LoadBalancer::RoundRobin, 3, 10),
            (1..=3).map(endpoint).collect(),
        );
        let bad = b.endpoints()[0].clone();
        let fail = |now: Instant| {
            let pick = Pick {
                state: bad.clone(),
                started: now,
            };
            bad.pending.fetch_add(1, Ordering::Relaxed);
            b.record(&pick, Outcome::Failure, now)
        };
        let t0 = Instant::now();
        assert!(!fail(t0));
        assert!(!fail(t0));
        assert!(fail(t0), "third consecutive failure ejects");
        assert!(bad.ejected(t0 + Duration::from_millis(900)));
        assert!(!bad.ejected(t0 + Duration::from_millis(1100)));
        let t1 = t0 + Duration::from_millis(1100);
        (0..3).for_each(|_| {
            fail(t1);
        });
        assert!(
            bad.ejected(t1 + Duration::from_millis(1900)),
            "second ejection is 2 s"
        );

        // A second bad endpoint stays in: 10 % of 3 rounds down, but one may go.
        let other = b.endpoints()[1].clone();
        for _ in 0..5 {
            let pick = Pick {
                state: other.clone(),
                started: t1,
            };
            other.pending.fetch_add(1, Ordering::Relaxed);
            b.record(&pick, Outcome::Failure, t1);
        }
        assert!(!other.ejected(t1));

        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..10 {
            let pick = b.pick(t1, None, &mut rng).unwrap();
            assert_ne!(pick.endpoint().addr, bad.endpoint.addr);
        }
    }

    #[test]
    fn state_survives_updates() {
        let b = Balancer::new(
            policy(LoadBalancer::PeakEwma, 1, 50),
            (1..=2).map(endpoint).collect(),
        );
        let first = b.endpoints()[0].clone();
        b.update(b.policy(), (1..=3).map(endpoint).collect());
        assert!(Arc::ptr_eq(&first, &b.endpoints()[0]));
        assert_eq!(b.endpoints().len(), 3);
    }
}
