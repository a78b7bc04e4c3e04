//! The routing view of the config: Service VIPs and ports, their endpoints,
//! attached routes, traffic settings and filter documents, rebuilt on every
//! config apply. Balancers, retry budgets and rate-limit buckets are carried
//! over from the previous build so a reload never forgets endpoint health.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;

use crate::proxy::l7::balance::{Balancer, EndpointView};
use crate::proxy::l7::budget::{RetryBudget, TokenBucket};
use crate::state::MeshConfig;
use crate::state::route::{Filter, HttpRoute};
use crate::state::service::{self, PortProtocol, Selectable, Service, ServicePort, TargetPort};
use crate::state::traffic::{FaultInjection, LocalRateLimit, ServiceTraffic};

/// One port of one Service: everything a request or connection to it needs.
pub struct ServicePortState {
    /// The Service.
    pub service: Arc<Service>,
    /// The port addressed.
    pub port: ServicePort,
    /// Detection, declared HTTP, or opaque.
    pub protocol: PortProtocol,
    /// Endpoint choice and health.
    pub balancer: Arc<Balancer>,
    /// The Service's retry budget (shared by its ports).
    pub budget: Arc<RetryBudget>,
    /// Routes in the Service's namespace: they apply to every client.
    pub producer_routes: Vec<Arc<HttpRoute>>,
    /// Routes from client namespaces: they replace producer routes for that namespace.
    pub consumer_routes: HashMap<String, Vec<Arc<HttpRoute>>>,
}

impl ServicePortState {
    /// The routes a client in `namespace` sees.
    pub fn routes_for(&self, namespace: &str) -> &[Arc<HttpRoute>] {
        self.consumer_routes
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or(&self.producer_routes)
    }
}

/// A rate limiter document and its buckets.
pub struct RateLimiter {
    /// Its settings.
    pub config: LocalRateLimit,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

impl RateLimiter {
    /// Whether a request from `source` to `destination` may pass now.
    pub fn admit(&self, destination: &str, source: &str, now: Instant) -> bool {
        let key = if self.config.per_source {
            format!("{destination}|{source}")
        } else {
            destination.to_owned()
        };
        let bucket = {
            let mut buckets = self.buckets.lock().expect("rate limiter lock");
            // Bounded: one bucket per destination, or per destination and client identity.
            if buckets.len() > 10_000 {
                buckets.clear();
            }
            buckets
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(TokenBucket::new(
                        self.config.requests_per_second,
                        self.config.burst,
                        now,
                    ))
                })
                .clone()
        };
        bucket.try_take(now)
    }
}

/// The whole routing view.
#[derive(Default)]
pub struct Catalog {
    by_vip: HashMap<SocketAddr, Arc<ServicePortState>>,
    by_name: HashMap<(String, String, u16), Arc<ServicePortState>>,
    /// Endpoint address to the Service port it serves (the first Service in
    /// config order when several select it), for the destination side.
    by_endpoint: HashMap<SocketAddr, Arc<ServicePortState>>,
    faults: HashMap<(String, String), Arc<FaultInjection>>,
    rate_limits: HashMap<(String, String), Arc<RateLimiter>>,
    routes: Vec<Arc<HttpRoute>>,
}

impl Catalog {
    /// The Service port behind a VIP address, if it is one.
    pub fn resolve(&self, vip: SocketAddr) -> Option<Arc<ServicePortState>> {
        self.by_vip.get(&vip).cloned()
    }

    /// The Service port an endpoint address serves, if any: how the destination
    /// side names the Service of traffic it receives for a pod.
    pub fn serving(&self, endpoint: SocketAddr) -> Option<Arc<ServicePortState>> {
        self.by_endpoint.get(&endpoint).cloned()
    }

    /// A backend Service port by name.
    pub fn backend(&self, namespace: &str, name: &str, port: u16) -> Option<Arc<ServicePortState>> {
        self.by_name
            .get(&(namespace.to_owned(), name.to_owned(), port))
            .cloned()
    }

    /// A `FaultInjection` document.
    pub fn fault(&self, namespace: &str, name: &str) -> Option<Arc<FaultInjection>> {
        self.faults
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A `LocalRateLimit` document and its buckets.
    pub fn rate_limit(&self, namespace: &str, name: &str) -> Option<Arc<RateLimiter>> {
        self.rate_limits
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Builds the view of `config`, reusing stateful parts of `previous`.
    pub fn build(config: &MeshConfig, previous: &Catalog, selectable: &Selectable<'_>) -> Catalog {
        let routes: Vec<Arc<HttpRoute>> = {
            let mut r: Vec<Arc<HttpRoute>> =
                config.http_routes.iter().cloned().map(Arc::new).collect();
            // Without creation timestamps, ties go to the alphabetically first route.
            r.sort_by_key(|a| a.key());
            r
        };
        let mut catalog = Catalog {
            routes: routes.clone(),
            ..Catalog::default()
        };
        for f in &config.fault_injections {
            catalog
                .faults
                .insert((f.namespace.clone(), f.name.clone()), Arc::new(f.clone()));
        }
        for r in &config.local_rate_limits {
            let key = (r.namespace.clone(), r.name.clone());
            let limiter = previous
                .rate_limits
                .get(&key)
                .filter(|old| old.config == *r)
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(RateLimiter {
                        config: r.clone(),
                        buckets: Mutex::new(HashMap::new()),
                    })
                });
            catalog.rate_limits.insert(key, limiter);
        }
        let slices = service::slices_by_service(&config.endpoint_slices);
        for svc in &config.services {
            let service = Arc::new(svc.clone());
            let svc_slices = slices
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let traffic = traffic_for(config, svc);
            // Any port of the Service holds its budget.
            let budget = svc
                .ports
                .iter()
                .find_map(|p| {
                    previous
                        .by_name
                        .get(&(svc.namespace.clone(), svc.name.clone(), p.port))
                })
                .map(|s| s.budget.clone())
                .filter(|b| *b.config() == traffic.retry_budget)
                .unwrap_or_else(|| Arc::new(RetryBudget::new(traffic.retry_budget.clone())));
            for port in &svc.ports {
                let vip = svc.cluster_ips[0];
                let endpoints = service::endpoints(svc, port, vip, selectable, svc_slices);
                let endpoint_addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                let key = (svc.namespace.clone(), svc.name.clone(), port.port);
                let balancer = match previous.by_name.get(&key) {
                    Some(old) => {
                        old.balancer.update(traffic.clone(), endpoints);
                        old.balancer.clone()
                    }
                    None => Arc::new(Balancer::new(traffic.clone(), endpoints)),
                };
                let mut producer_routes = Vec::new();
                let mut consumer_routes: HashMap<String, Vec<Arc<HttpRoute>>> = HashMap::new();
                for route in &routes {
                    let attached = route.parents.iter().any(|p| {
                        p.namespace == svc.namespace
                            && p.name == svc.name
                            && p.port.is_none_or(|n| n == port.port)
                    });
                    if !attached {
                        continue;
                    }
                    if route.namespace == svc.namespace {
                        producer_routes.push(route.clone());
                    } else {
                        consumer_routes
                            .entry(route.namespace.clone())
                            .or_default()
                            .push(route.clone());
                    }
                }
                let state = Arc::new(ServicePortState {
                    service: service.clone(),
                    port: port.clone(),
                    protocol: svc.protocol(port),
                    balancer,
                    budget: budget.clone(),
                    producer_routes,
                    consumer_routes,
                });
                for ip in &svc.cluster_ips {
                    catalog
                        .by_vip
                        .insert(SocketAddr::new(*ip, port.port), state.clone());
                }
                for addr in endpoint_addrs {
                    catalog
                        .by_endpoint
                        .entry(addr)
                        .or_insert_with(|| state.clone());
                }
                catalog.by_name.insert(key, state);
            }
        }
        catalog
    }

    /// Services, their ports and routes, for `/config_dump` and `debug routes`.
    pub fn route_views(&self) -> Vec<ServiceRoutesView> {
        let mut out: Vec<ServiceRoutesView> = self
            .by_name
            .values()
            .map(|s| ServiceRoutesView {
                service: s.service.key(),
                vips: s
                    .service
                    .cluster_ips
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, s.port.port).to_string())
                    .collect(),
                port: s.port.port,
                target_port: s.port.target_port.clone(),
                protocol: s.protocol,
                load_balancer: s.balancer.policy(),
                producer_routes: s.producer_routes.iter().map(|r| r.key()).collect(),
                consumer_routes: {
                    let mut c: Vec<String> = s
                        .consumer_routes
                        .values()
                        .flatten()
                        .map(|r| r.key())
                        .collect();
                    c.sort();
                    c
                },
            })
            .collect();
        out.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        out
    }

    /// Every route in force, in precedence order.
    pub fn routes(&self) -> &[Arc<HttpRoute>] {
        &self.routes
    }

    /// Endpoints and their health per Service port.
    pub fn endpoint_views(&self) -> Vec<ServiceEndpointsView> {
        let now = Instant::now();
        let mut out: Vec<ServiceEndpointsView> = self
            .by_name
            .values()
            .map(|s| ServiceEndpointsView {
                service: s.service.key(),
                port: s.port.port,
                endpoints: s.balancer.views(now),
            })
            .collect();
        out.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        out
    }

    /// Whether any route filter names a document that does not exist (served as 500).
    pub fn dangling_filters(&self) -> Vec<String> {
        let mut out = Vec::new();
        for route in &self.routes {
            for rule in &route.rules {
                for f in &rule.filters {
                    if let Filter::ExtensionRef { kind, name } = f {
                        let found = match kind.as_str() {
                            "FaultInjection" => self.fault(&route.namespace, name).is_some(),
                            _ => self.rate_limit(&route.namespace, name).is_some(),
                        };
                        if !found {
                            out.push(format!(
                                "{} → {kind} {}/{name}",
                                route.key(),
                                route.namespace
                            ));
                        }
                    }
                }
            }
        }
        out
    }
}

/// The traffic settings for `svc`: defaults, then its `DestinationRule`, then its
/// `XBackendTrafficPolicy`.
fn traffic_for(config: &MeshConfig, svc: &Service) -> ServiceTraffic {
    let mut t = ServiceTraffic::default();
    for dr in config
        .destination_rules
        .iter()
        .filter(|d| d.host == (svc.namespace.clone(), svc.name.clone()))
    {
        if let Some(lb) = dr.load_balancer {
            t.load_balancer = lb;
        }
        if let Some(p) = dr.max_pending_per_endpoint {
            t.max_pending_per_endpoint = p;
        }
        if let Some(o) = &dr.outlier_detection {
            t.outlier_detection = o.clone();
        }
    }
    if let Some(p) = config
        .backend_traffic_policies
        .iter()
        .find(|p| p.namespace == svc.namespace && p.targets.contains(&svc.name))
    {
        t.retry_budget = p.retry_budget.clone();
    }
    t
}

/// The catalog in force, swapped whole on every apply.
#[derive(Default)]
pub struct CatalogStore {
    current: RwLock<Arc<Catalog>>,
}

impl CatalogStore {
    /// The catalog in force.
    pub fn get(&self) -> Arc<Catalog> {
        self.current.read().expect("catalog lock").clone()
    }

    /// Rebuilds from `config`, keeping endpoint state, budgets and buckets.
    pub fn apply(&self, config: &MeshConfig, selectable: &Selectable<'_>) {
        let next = Catalog::build(config, &self.get(), selectable);
        for dangling in next.dangling_filters() {
            tracing::warn!(filter = %dangling, "route filter names a missing document; its rule answers 500");
        }
        *self.current.write().expect("catalog lock") = Arc::new(next);
    }
}

/// One Service port in `debug routes`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutesView {
    /// `namespace/name`.
    pub service: String,
    /// `vip:port` addresses.
    pub vips: Vec<String>,
    /// Service port.
    pub port: u16,
    /// Endpoint port, or the container port name the EndpointSlices resolve.
    pub target_port: TargetPort,
    /// How bytes are treated.
    pub protocol: PortProtocol,
    /// Balancing, bounds, outlier detection and budget.
    pub load_balancer: ServiceTraffic,
    /// Producer routes, by precedence.
    pub producer_routes: Vec<String>,
    /// Consumer routes.
    pub consumer_routes: Vec<String>,
}

/// One Service port's endpoints in `debug endpoints`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEndpointsView {
    /// `namespace/name`.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Endpoints and health.
    pub endpoints: Vec<EndpointView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: backend, labels: {app: api}}
spec: {nodeName: n1, ips: [10.0.0.5]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec:
  clusterIP: 10.96.0.5
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: backend}
spec:
  parentRefs: [{kind: Service, name: api}]
  rules: [{backendRefs: [{name: api}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, namespace: backend, port: 80}]
  rules: [{backendRefs: [{name: api, namespace: backend}]}]
"#;

    #[test]
    fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
        let config = crate::state::parse(CONFIG).unwrap();
        let catalog = Catalog::build(
            &config,
            &Catalog::default(),
            &Selectable::of(&config.workloads),
        );
        let port80 = catalog.resolve("10.96.0.5:80".parse().unwrap()).unwrap();
        let names =
            |ns: &str| -> Vec<String> { port80.routes_for(ns).iter().map(|r| r.key()).collect() };
        assert_eq!(names("shop"), ["shop/consumer"]);
        assert_eq!(names("other"), ["backend/producer"]);
        assert_eq!(names("backend"), ["backend/producer"]);
        // The consumer route names port 80 only.
        let port81 = catalog.resolve("10.96.0.5:81".parse().unwrap()).unwrap();
        assert_eq!(port81.routes_for("shop").len(), 1);
        assert_eq!(port81.routes_for("shop")[0].key(), "backend/producer");
        let endpoints = port80.balancer.endpoints();
        assert_eq!(endpoints[0].endpoint.addr, "10.0.0.5:8080".parse().unwrap());
    }

    #[test]
    fn a_rebuild_keeps_endpoint_state_and_budgets() {
        let config = crate::state::parse(CONFIG).unwrap();
        let first = Catalog::build(
            &config,
            &Catalog::default(),
            &Selectable::of(&config.workloads),
        );
        let second = Catalog::build(&config, &first, &Selectable::of(&config.workloads));
        let vip = "10.96.0.5:80".parse().unwrap();
        let (a, b) = (first.resolve(vip).unwrap(), second.resolve(vip).unwrap());
        assert!(Arc::ptr_eq(&a.balancer, &b.balancer));
        assert!(Arc::ptr_eq(&a.budget, &b.budget));
    }
}
