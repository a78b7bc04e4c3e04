//! Per-Service and per-route traffic settings that Gateway API `HTTPRoute` does not
//! carry: Istio `DestinationRule` (load balancer, pending-request bound, outlier
//! detection), Gateway API `XBackendTrafficPolicy` (retry budget, GEP-3388), and
//! nodemesh's `FaultInjection` and `LocalRateLimit`, attached to route rules with
//! `ExtensionRef` filters.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::route::parse_duration;

type FieldError = (String, String);

/// Istio networking API versions, accepted as-is.
pub const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The experimental Gateway API group holding `XBackendTrafficPolicy`.
pub const GATEWAY_X_V1ALPHA1: &str = "gateway.networking.x-k8s.io/v1alpha1";

/// How endpoints are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency times outstanding requests.
    #[default]
    PeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Outlier detection settings (Istio field meanings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses or connect failures that eject an endpoint.
    pub consecutive_errors: u32,
    /// First ejection length; the n-th ejection lasts n times this.
    #[serde(with = "secs")]
    pub base_ejection_time: Duration,
    /// Never eject more than this share of endpoints (at least one may go).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// Everything that shapes traffic to one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTraffic {
    /// Endpoint choice.
    pub load_balancer: LoadBalancer,
    /// Requests in flight to one endpoint before it is skipped, and then refused (503 UO).
    pub max_pending_per_endpoint: u32,
    /// Ejection of failing endpoints.
    pub outlier_detection: OutlierDetection,
    /// Retries allowed on top of requests.
    pub retry_budget: RetryBudgetConfig,
}

impl Default for ServiceTraffic {
    fn default() -> Self {
        ServiceTraffic {
            load_balancer: LoadBalancer::default(),
            max_pending_per_endpoint: 1024,
            outlier_detection: OutlierDetection::default(),
            retry_budget: RetryBudgetConfig::default(),
        }
    }
}

/// GEP-3388 retry budget: retries may add at most `percent` of the requests seen
/// in `interval`, plus `min_per_second` so a quiet Service can still retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetConfig {
    /// Extra load allowed, in percent of requests.
    pub percent: u32,
    /// Window over which requests are counted.
    #[serde(with = "secs")]
    pub interval: Duration,
    /// Retries always allowed per second.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20,
            interval: Duration::from_secs(10),
            min_per_second: 10,
        }
    }
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// An Istio `DestinationRule`: the traffic policy for the Service named by `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    /// Rule name.
    pub name: String,
    /// Rule namespace.
    pub namespace: String,
    /// The Service: `name`, `name.namespace`, or the full `…svc.cluster.local` name.
    pub host: (String, String),
    /// Load balancer, if set.
    pub load_balancer: Option<LoadBalancer>,
    /// Pending-request bound, if set.
    pub max_pending_per_endpoint: Option<u32>,
    /// Outlier detection, if set.
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawDestinationRuleSpec {
    host: String,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTrafficPolicy {
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    connection_pool: Option<RawConnectionPool>,
    #[serde(default)]
    outlier_detection: Option<RawOutlierDetection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoadBalancer {
    simple: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnectionPool {
    #[serde(default)]
    http: Option<RawHttpPool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttpPool {
    #[serde(default, rename = "http1MaxPendingRequests")]
    http1_max_pending_requests: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOutlierDetection {
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
}

impl DestinationRule {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        spec: RawDestinationRuleSpec,
    ) -> Result<DestinationRule, FieldError> {
        let _ = spec.export_to;
        let host = service_host(&spec.host, &namespace)
            .ok_or_else(|| ("spec.host".to_owned(), format!("{:?} is not a Service name (name, name.namespace or name.namespace.svc.cluster.local)", spec.host)))?;
        let policy = spec.traffic_policy;
        let load_balancer = policy
            .as_ref()
            .and_then(|p| p.load_balancer.as_ref())
            .map(|lb| match lb.simple.as_str() {
                "LEAST_REQUEST" => Ok(LoadBalancer::PeakEwma),
                "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
                other => Err((
                    "spec.trafficPolicy.loadBalancer.simple".to_owned(),
                    format!(
                        "{other:?} (supported: LEAST_REQUEST, which is peak-EWMA, and ROUND_ROBIN)"
                    ),
                )),
            })
            .transpose()?;
        let max_pending_per_endpoint = policy
            .as_ref()
            .and_then(|p| p.connection_pool.as_ref())
            .and_then(|c| c.http.as_ref())
            .and_then(|h| h.http1_max_pending_requests);
        if max_pending_per_endpoint == Some(0) {
            return Err((
                "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests".into(),
                "must be at least 1".into(),
            ));
        }
        let outlier_detection = match policy.and_then(|p| p.outlier_detection) {
            None => None,
            Some(raw) => {
                let defaults = OutlierDetection::default();
                let field = "spec.trafficPolicy.outlierDetection";
                if let Some(i) = raw.interval.as_deref() {
                    parse_duration(&format!("{field}.interval"), i)?;
                }
                let base = match raw.base_ejection_time.as_deref() {
                    None => defaults.base_ejection_time,
                    Some(t) => parse_duration(&format!("{field}.baseEjectionTime"), t)?
                        .ok_or_else(|| {
                            (
                                format!("{field}.baseEjectionTime"),
                                "must be positive".to_owned(),
                            )
                        })?,
                };
                let percent = raw
                    .max_ejection_percent
                    .unwrap_or(defaults.max_ejection_percent);
                if percent > 100 {
                    return Err((
                        format!("{field}.maxEjectionPercent"),
                        "must be 0-100".into(),
                    ));
                }
                Some(OutlierDetection {
                    consecutive_errors: raw
                        .consecutive_5xx_errors
                        .unwrap_or(defaults.consecutive_errors),
                    base_ejection_time: base,
                    max_ejection_percent: percent,
                })
            }
        };
        Ok(DestinationRule {
            name,
            namespace,
            host,
            load_balancer,
            max_pending_per_endpoint,
            outlier_detection,
        })
    }
}

/// `(namespace, name)` of a Service host, relative to `namespace`.
fn service_host(host: &str, namespace: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] => Some((namespace.to_owned(), name.to_string())),
        [name, ns] | [name, ns, "svc"] | [name, ns, "svc", "cluster", "local"] => {
            Some((ns.to_string(), name.to_string()))
        }
        _ => None,
    }
}

/// A Gateway API `XBackendTrafficPolicy`: the retry budget of target Services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendTrafficPolicy {
    /// Policy name.
    pub name: String,
    /// Policy namespace, which is also its targets'.
    pub namespace: String,
    /// Target Service names.
    pub targets: Vec<String>,
    /// The budget.
    pub retry_budget: RetryBudgetConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawBackendTrafficPolicySpec {
    target_refs: Vec<RawTargetRef>,
    #[serde(default)]
    retry_constraint: Option<RawRetryConstraint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetRef {
    #[serde(default)]
    group: Option<String>,
    kind: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRetryConstraint {
    #[serde(default)]
    budget: Option<RawBudget>,
    #[serde(default)]
    min_retry_rate: Option<RawRate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    count: u32,
    interval: String,
}

impl BackendTrafficPolicy {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        spec: RawBackendTrafficPolicySpec,
    ) -> Result<BackendTrafficPolicy, FieldError> {
        let mut targets = Vec::new();
        for (i, t) in spec.target_refs.into_iter().enumerate() {
            if !t.group.as_deref().unwrap_or("").is_empty() || t.kind != "Service" {
                return Err((
                    format!("spec.targetRefs[{i}]"),
                    "only Service targets (group \"\", kind Service) are supported".into(),
                ));
            }
            targets.push(t.name);
        }
        if targets.is_empty() {
            return Err(("spec.targetRefs".into(), "at least one target".into()));
        }
        let defaults = RetryBudgetConfig::default();
        let constraint = spec.retry_constraint;
        let budget = constraint.as_ref().and_then(|c| c.budget.as_ref());
        let percent = budget.and_then(|b| b.percent).unwrap_or(defaults.percent);
        if percent > 100 {
            return Err((
                "spec.retryConstraint.budget.percent".into(),
                "must be 0-100".into(),
            ));
        }
        let interval = match budget.and_then(|b| b.interval.as_deref()) {
            None => defaults.interval,
            Some(t) => parse_duration("spec.retryConstraint.budget.interval", t)?
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| {
                    (
                        "spec.retryConstraint.budget.interval".to_owned(),
                        "must be at least 1s".to_owned(),
                    )
                })?,
        };
        let min_per_second = match constraint.and_then(|c| c.min_retry_rate) {
            None => defaults.min_per_second,
            Some(rate) => {
                let per =
                    parse_duration("spec.retryConstraint.minRetryRate.interval", &rate.interval)?
                        .ok_or_else(|| {
                        (
                            "spec.retryConstraint.minRetryRate.interval".to_owned(),
                            "must be positive".to_owned(),
                        )
                    })?;
                (rate.count as f64 / per.as_secs_f64()).ceil() as u32
            }
        };
        Ok(BackendTrafficPolicy {
            name,
            namespace,
            targets,
            retry_budget: RetryBudgetConfig {
                percent,
                interval,
                min_per_second,
            },
        })
    }
}

/// A `FaultInjection` filter document: delay and/or abort a share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjection {
    /// Document name.
    pub name: String,
    /// Document namespace (that of the routes using it).
    pub namespace: String,
    /// Delay `percent` of requests by `fixed_delay`.
    pub delay: Option<(u32, Duration)>,
    /// Answer `percent` of requests with `status` without forwarding.
    pub abort: Option<(u32, u16)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawFaultSpec {
    #[serde(default)]
    delay: Option<RawDelay>,
    #[serde(default)]
    abort: Option<RawAbort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDelay {
    percentage: u32,
    fixed_delay: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAbort {
    percentage: u32,
    http_status: u16,
}

impl FaultInjection {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        spec: RawFaultSpec,
    ) -> Result<FaultInjection, FieldError> {
        let delay = match spec.delay {
            None => None,
            Some(d) => {
                check_percent("spec.delay.percentage", d.percentage)?;
                let t = parse_duration("spec.delay.fixedDelay", &d.fixed_delay)?
                    .unwrap_or(Duration::ZERO);
                Some((d.percentage, t))
            }
        };
        let abort = match spec.abort {
            None => None,
            Some(a) => {
                check_percent("spec.abort.percentage", a.percentage)?;
                if !(200..=599).contains(&a.http_status) {
                    return Err((
                        "spec.abort.httpStatus".into(),
                        format!("{} is not an HTTP status", a.http_status),
                    ));
                }
                Some((a.percentage, a.http_status))
            }
        };
        if delay.is_none() && abort.is_none() {
            return Err(("spec".into(), "set delay, abort or both".into()));
        }
        Ok(FaultInjection {
            name,
            namespace,
            delay,
            abort,
        })
    }
}

fn check_percent(field: &str, p: u32) -> Result<(), FieldError> {
    if p > 100 {
        return Err((field.to_owned(), "must be 0-100".into()));
    }
    Ok(())
}

/// A `LocalRateLimit` filter document: a token bucket per destination Service,
/// or per source identity too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// Document name.
    pub name: String,
    /// Document namespace.
    pub namespace: String,
    /// Sustained requests per second.
    pub requests_per_second: u32,
    /// Bucket size: the burst allowed.
    pub burst: u32,
    /// One bucket per client identity instead of one per Service.
    pub per_source: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRateLimitSpec {
    requests_per_second: u32,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    per_source: bool,
}

impl LocalRateLimit {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        spec: RawRateLimitSpec,
    ) -> Result<LocalRateLimit, FieldError> {
        if spec.requests_per_second == 0 {
            return Err(("spec.requestsPerSecond".into(), "must be at least 1".into()));
        }
        Ok(LocalRateLimit {
            name,
            namespace,
            requests_per_second: spec.requests_per_second,
            burst: spec.burst.unwrap_or(spec.requests_per_second).max(1),
            per_source: spec.per_source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let cases = [
            ("web", Some(("shop", "web"))),
            ("web.other", Some(("other", "web"))),
            ("web.other.svc.cluster.local", Some(("other", "web"))),
            ("a.b.c", None),
        ];
        for (host, expected) in cases {
            let expected = expected.map(|(n, s)| (n.to_owned(), s.to_owned()));
            assert_eq!(service_host(host, "shop"), expected, "{host}");
        }
    }

    #[test]
    fn budget_rates() {
        let yaml = "targetRefs: [{kind: Service, name: web}]\nretryConstraint: {budget: {percent: 50, interval: 5s}, minRetryRate: {count: 30, interval: 10s}}";
        let spec: RawBackendTrafficPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
        let p = BackendTrafficPolicy::from_raw("p".into(), "shop".into(), spec).unwrap();
        assert_eq!(
            p.retry_budget,
            RetryBudgetConfig {
                percent: 50,
                interval: Duration::from_secs(5),
                min_per_second: 3
            }
        );
    }
}
