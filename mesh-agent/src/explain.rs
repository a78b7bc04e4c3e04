//! `debug explain`: every decision the mesh would take for one request, and
//! why, from this agent's state. The decision is a pure function of the query
//! and a [`MeshView`] (borrowed state), so it is tested table-driven; the admin
//! endpoint serves it as JSON at `/debug/explain` and the CLI as tables.
//!
//! Each decision is the one the data path takes, made by the same code: the
//! kernel's capture rules (mirrored from `mesh-ebpf`), [`route::select`], the
//! balancer's endpoint views and [`Policies`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::proxy::l7::balance::EndpointView;
use crate::proxy::l7::catalog::{Catalog, ServicePortState};
pub use crate::reason::Reason;
use crate::state::policy::{self, Decision, MtlsMode, Policies, PolicyVerdict};
use crate::state::route::{self, RequestFacts, Selection};
use crate::state::service::PortProtocol;
use crate::state::workload::{Directory, Workload, WorkloadMeta};

/// The outcome in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The request reaches its destination through the mesh.
    Allow,
    /// The mesh refuses it (a 403, 404 or 503, or a reset).
    Deny,
    /// The mesh does not see it on this side (not captured, or not ours).
    Bypass,
}

/// What to explain: a request from a source workload to a destination.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `namespace/name` of the source pod, or its IP.
    pub source: String,
    /// `ip:port` (pod or Service VIP) or `host:port` (a Service's name).
    pub destination: String,
    /// HTTP method (default `GET`).
    pub method: Option<String>,
    /// HTTP path (default `/`).
    pub path: Option<String>,
    /// Request headers, `name: value`.
    pub headers: Vec<(String, String)>,
    /// The client speaks something other than HTTP (a database protocol, a
    /// TLS stream...): only the connection is decided.
    pub tcp: bool,
}

impl Query {
    /// Reads `source`, `destination`, `method`, `path` and `header=name:value`
    /// (repeatable) from a URL query string.
    pub fn from_url_query(query: &str) -> Result<Self, String> {
        let mut q = Query::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "source" => q.source = value.into_owned(),
                "destination" => q.destination = value.into_owned(),
                "method" => q.method = Some(value.into_owned()),
                "path" => q.path = Some(value.into_owned()),
                "tcp" => q.tcp = value == "true" || value == "1",
                "header" => {
                    let (name, v) = value
                        .split_once(':')
                        .or_else(|| value.split_once('='))
                        .ok_or_else(|| format!("header {value:?}: expected name:value"))?;
                    q.headers
                        .push((name.trim().to_owned(), v.trim().to_owned()));
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        if q.source.is_empty() || q.destination.is_empty() {
            return Err("source and destination are required".into());
        }
        Ok(q)
    }

    /// The query string [`Query::from_url_query`] reads.
    pub fn to_url_query(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        out.append_pair("source", &self.source);
        out.append_pair("destination", &self.destination);
        if let Some(m) = &self.method {
            out.append_pair("method", m);
        }
        if let Some(p) = &self.path {
            out.append_pair("path", p);
        }
        for (name, value) in &self.headers {
            out.append_pair("header", &format!("{name}:{value}"));
        }
        if self.tcp {
            out.append_pair("tcp", "true");
        }
        out.finish()
    }
}

/// One decision: the stage, what was decided, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// `source`, `capture`, `destination`, `route`, `backend`, `tunnel`,
    /// `peer authentication`, `authorization`...
    pub stage: &'static str,
    /// What the mesh does there.
    pub decision: String,
    /// Why.
    pub why: String,
}

/// Everything `explain` found, in the order the mesh decides.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The outcome.
    pub verdict: Verdict,
    /// Why, as a stable code.
    pub reason: Reason,
    /// What the client sees (`200 from the application`, `403 RBAC: access denied`...).
    pub outcome: String,
    /// Each decision in order.
    pub steps: Vec<Step>,
    /// The destination's AuthorizationPolicies and whether each matched.
    pub policies: Vec<PolicyVerdict>,
    /// The backend's endpoints, with their latency estimate and ejection state.
    pub endpoints: Vec<EndpointView>,
}

/// The state `explain` reads, borrowed from the agent.
pub struct MeshView<'a> {
    /// Workloads enrolled on this node (whose connections the kernel captures).
    pub enrolled: &'a [Workload],
    /// Every known pod, by IP.
    pub directory: &'a Directory,
    /// Services, routes and endpoint state.
    pub catalog: &'a Catalog,
    /// Peer authentication and authorization in force.
    pub policies: &'a Policies,
    /// Ports never inspected (`--opaque-ports`).
    pub opaque_ports: &'a [u16],
    /// The loopback port the agent listens on in each pod.
    pub outbound_port: u16,
}

/// The source of a query, as resolved.
struct Source {
    /// Its config, when enrolled on this node.
    enrolled: Option<Workload>,
    meta: Option<Arc<WorkloadMeta>>,
    ip: Option<IpAddr>,
    label: String,
}

/// Where the request goes, as resolved.
enum Target {
    Service(Arc<ServicePortState>, SocketAddr),
    Pod(Arc<WorkloadMeta>, SocketAddr),
    Unknown(SocketAddr),
    UnknownHost(String),
}

/// Explains `q` against `view`; an error names what cannot be resolved.
pub fn explain(q: &Query, view: &MeshView<'_>) -> Result<Explanation, String> {
    let method = Method::from_bytes(q.method.as_deref().unwrap_or("GET").as_bytes())
        .map_err(|_| format!("invalid method {:?}", q.method))?;
    let path = q.path.clone().unwrap_or_else(|| "/".into());
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (path.clone(), None),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &q.headers {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("invalid header value {value:?}"))?;
        headers.append(name, value);
    }
    let source = resolve_source(&q.source, view)?;
    let target = resolve_destination(&q.destination, &source, view)?;
    let mut e = Explanation {
        verdict: Verdict::Allow,
        reason: Reason::Allowed,
        outcome: String::new(),
        steps: Vec::new(),
        policies: Vec::new(),
        endpoints: Vec::new(),
    };

    // Source.
    let source_identity = source
        .meta
        .as_ref()
        .filter(|m| m.meshed)
        .map(|m| m.identity());
    e.steps.push(Step {
        stage: "source",
        decision: source.label.clone(),
        why: match (&source.enrolled, &source.meta) {
            (Some(_), Some(m)) => format!("enrolled on this node; identity {}", m.identity()),
            (None, Some(m)) if m.meshed => {
                "meshed, but not enrolled on this node: ask its node's agent".into()
            }
            (None, Some(_)) => "known pod outside the mesh (meshed: false)".into(),
            _ => "not a known pod: outside the mesh".into(),
        },
    });

    // Destination.
    let (dst_addr, dst_label) = match &target {
        Target::Service(s, vip) => (
            Some(*vip),
            format!("Service {} port {} ({vip})", s.service.key(), s.port.port),
        ),
        Target::Pod(w, addr) => (
            Some(*addr),
            format!("pod {}/{} ({addr})", w.namespace, w.name),
        ),
        Target::Unknown(addr) => (Some(*addr), format!("{addr}: no Service, no known pod")),
        Target::UnknownHost(h) => (None, format!("{h}: no Service of that name")),
    };
    e.steps.push(Step {
        stage: "destination",
        decision: dst_label,
        why: match &target {
            Target::Service(..) => "a Service VIP: the agent balances it".into(),
            Target::Pod(..) => "a pod IP".into(),
            _ => "not in this agent's state".into(),
        },
    });
    let Some(dst_addr) = dst_addr else {
        return Err(format!("unknown destination {:?}", q.destination));
    };

    // Capture, as the kernel's connect hooks decide.
    let capture = match &source.enrolled {
        None => Err((
            Reason::NotCapturedUnmeshedSource,
            "the source's cgroup is not in the kernel's workload map on this node".to_owned(),
        )),
        Some(w) => capture_rule(w, dst_addr),
    };
    let captured = match capture {
        Ok(()) => {
            e.steps.push(Step {
                stage: "capture",
                decision: format!(
                    "captured: connect() redirected to the agent (loopback port {})",
                    view.outbound_port
                ),
                why: "meshed source; destination not loopback and not excluded".into(),
            });
            true
        }
        Err((reason, why)) => {
            e.steps.push(Step {
                stage: "capture",
                decision: "not captured: the connection goes out directly".into(),
                why,
            });
            if !matches!(target, Target::Pod(..)) {
                return Ok(finish(e, Verdict::Bypass, reason, "sent without the mesh"));
            }
            e.reason = reason;
            false
        }
    };

    // Service: protocol, route, backend, endpoints.
    let request = policy::Request {
        method: method.as_str(),
        path: &path_only,
        host: q.destination.split(':').next().unwrap_or(""),
        headers: &headers,
    };
    let (endpoint, http) = match &target {
        Target::Service(service, _) if captured => {
            let http = !q.tcp && !matches!(service.protocol, PortProtocol::Opaque);
            e.steps.push(Step {
                stage: "protocol",
                decision: if http { "HTTP (L7)" } else { "TCP (opaque)" }.into(),
                why: match service.protocol {
                    PortProtocol::Opaque => "appProtocol or --opaque-ports say opaque".into(),
                    _ if q.tcp => "the client does not speak HTTP (--tcp)".into(),
                    PortProtocol::Detect => {
                        "detected from the first bytes; this request is HTTP".into()
                    }
                    _ => "declared by the port's appProtocol".into(),
                },
            });
            let backend = if http {
                let facts = RequestFacts {
                    method: &method,
                    path: &path_only,
                    query: query.as_deref(),
                    headers: &headers,
                };
                let ns = source.meta.as_ref().map(|m| &*m.namespace).unwrap_or("");
                match route::select(service.routes_for(ns), &facts) {
                    Selection::NoMatch => {
                        e.steps.push(Step {
                            stage: "route",
                            decision: "no rule matches".into(),
                            why: format!(
                                "HTTPRoutes are attached to {}, and none of their rules matches {method} {path}",
                                service.service.key()
                            ),
                        });
                        return Ok(finish(
                            e,
                            Verdict::Deny,
                            Reason::NoRoute,
                            "404 (response_flags NR)",
                        ));
                    }
                    Selection::NoRoutes => {
                        e.steps.push(Step {
                            stage: "route",
                            decision: "default: the Service itself".into(),
                            why: "no HTTPRoute is attached".into(),
                        });
                        service.clone()
                    }
                    Selection::Rule { route, rule, index } => {
                        let backends: Vec<String> = rule
                            .backends
                            .iter()
                            .map(|b| {
                                format!(
                                    "{}/{}:{} weight {}",
                                    b.namespace,
                                    b.name,
                                    b.port.unwrap_or(service.port.port),
                                    b.weight
                                )
                            })
                            .collect();
                        e.steps.push(Step {
                            stage: "route",
                            decision: format!("{} rule {index}", route.key()),
                            why: format!(
                                "matches {method} {path}; backends {}",
                                backends.join(", ")
                            ),
                        });
                        let retry = match &rule.retry {
                            Some(r) => format!(
                                "retry {} times on {:?}, backoff {:?}",
                                r.attempts, r.codes, r.backoff
                            ),
                            None => "no retry policy (connect failures are retried)".into(),
                        };
                        e.steps.push(Step {
                            stage: "retry and timeouts",
                            decision: retry,
                            why: format!(
                                "timeouts: request {:?}, backendRequest {:?}",
                                rule.timeouts.request, rule.timeouts.backend_request
                            ),
                        });
                        let first = rule.backends.first();
                        match first.and_then(|b| {
                            view.catalog.backend(
                                &b.namespace,
                                &b.name,
                                b.port.unwrap_or(service.port.port),
                            )
                        }) {
                            Some(b) => b,
                            None if first.is_none() => service.clone(),
                            None => {
                                e.steps.push(Step {
                                    stage: "backend",
                                    decision: "unknown backend".into(),
                                    why: "the rule's backendRef is not a known Service port".into(),
                                });
                                return Ok(finish(
                                    e,
                                    Verdict::Deny,
                                    Reason::NoHealthyEndpoint,
                                    "500",
                                ));
                            }
                        }
                    }
                }
            } else {
                service.clone()
            };
            e.endpoints = backend.balancer.views(Instant::now());
            let healthy: Vec<&EndpointView> = e
                .endpoints
                .iter()
                .filter(|v| v.health == "healthy")
                .collect();
            e.steps.push(Step {
                stage: "backend",
                decision: format!(
                    "{} port {}: {} endpoints, {} healthy",
                    backend.service.key(),
                    backend.port.port,
                    e.endpoints.len(),
                    healthy.len()
                ),
                why: format!(
                    "balanced by {:?}; ejected endpoints are skipped until their time is up",
                    backend.balancer.policy().load_balancer
                ),
            });
            let chosen = healthy
                .first()
                .copied()
                .or(e.endpoints.first())
                .and_then(|v| v.address.parse::<SocketAddr>().ok());
            let Some(chosen) = chosen else {
                return Ok(finish(
                    e,
                    Verdict::Deny,
                    Reason::NoHealthyEndpoint,
                    "503 (response_flags UH)",
                ));
            };
            (chosen, http)
        }
        Target::Service(..) => unreachable!("an uncaptured Service connection returned above"),
        Target::Pod(_, addr) => {
            let http = !q.tcp && !view.opaque_ports.contains(&addr.port());
            e.steps.push(Step {
                stage: "protocol",
                decision: if http { "HTTP (L7)" } else { "TCP (opaque)" }.into(),
                why: if q.tcp {
                    "the client does not speak HTTP (--tcp)".into()
                } else if http {
                    "detected from the first bytes at the destination; this request is HTTP".into()
                } else {
                    format!("port {} is in --opaque-ports", addr.port())
                },
            });
            (*addr, http)
        }
        Target::Unknown(_) => {
            e.steps.push(Step {
                stage: "tunnel",
                decision: "direct from the pod, plaintext".into(),
                why: "the destination is outside the mesh".into(),
            });
            return Ok(finish(
                e,
                Verdict::Allow,
                Reason::Passthrough,
                "whatever the destination answers",
            ));
        }
        Target::UnknownHost(_) => unreachable!("an unknown host returned above"),
    };

    // Tunnel and identities.
    let Some(dst) = view.directory.lookup(endpoint.ip()) else {
        e.steps.push(Step {
            stage: "tunnel",
            decision: format!("direct to {endpoint}, plaintext"),
            why: "the endpoint is no known pod".into(),
        });
        return Ok(finish(
            e,
            Verdict::Allow,
            Reason::Passthrough,
            "whatever the endpoint answers",
        ));
    };
    let local = view
        .enrolled
        .iter()
        .any(|w| *w.namespace == *dst.namespace && *w.name == *dst.name);
    let mutual_tls = captured && source_identity.is_some() && dst.meshed;
    e.steps.push(Step {
        stage: "tunnel",
        decision: match (captured, dst.meshed, local) {
            (_, false, _) => format!("direct to {endpoint}, plaintext"),
            (false, true, _) => {
                format!("plaintext to {endpoint}, steered into its agent by sk_lookup")
            }
            (true, true, true) => format!(
                "same node: HBONE to {}:15008 served by this agent",
                endpoint.ip()
            ),
            (true, true, false) => format!(
                "HBONE (HTTP/2 CONNECT over mTLS) to {}:15008",
                endpoint.ip()
            ),
        },
        why: match (&source_identity, dst.meshed) {
            (_, false) => "the destination is outside the mesh".into(),
            (Some(id), true) if captured => format!("{} to {}", id, dst.identity()),
            _ => "the source has no mesh identity on this path".into(),
        },
    });
    if !dst.meshed {
        let reason = if captured { Reason::Allowed } else { e.reason };
        let verdict = if captured {
            Verdict::Allow
        } else {
            Verdict::Bypass
        };
        return Ok(finish(e, verdict, reason, "the application's answer"));
    }

    // Inbound: peer authentication, then authorization.
    let mode = view.policies.mtls_mode(&dst);
    e.steps.push(Step {
        stage: "peer authentication",
        decision: format!("{mode:?}").to_uppercase(),
        why: if mutual_tls {
            "the connection arrives over mutual TLS".into()
        } else if mode == MtlsMode::Strict {
            "plaintext arrives, and STRICT refuses it".into()
        } else {
            "plaintext arrives, and is served without an identity".into()
        },
    });
    let connection = policy::Connection {
        source: if mutual_tls {
            source_identity.clone()
        } else {
            None
        },
        source_ip: source.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        destination_ip: endpoint.ip(),
        destination_port: endpoint.port(),
    };
    e.policies = view
        .policies
        .explain(&dst, &connection, http.then_some(&request));
    let decision = if http {
        view.policies.decide_request(&dst, &connection, &request)
    } else {
        view.policies.decide_opaque(&dst, &connection)
    };
    match decision {
        Decision::Deny(denial) => {
            let reason = Reason::of_denial(&denial);
            e.steps.push(Step {
                stage: "authorization",
                decision: "deny".into(),
                why: denial.reason.clone(),
            });
            let outcome = match (reason, http) {
                (Reason::PlaintextRefusedStrict, _) | (_, false) => "connection reset",
                _ => "403 RBAC: access denied (response_flags RBAC)",
            };
            Ok(finish(e, Verdict::Deny, reason, outcome))
        }
        _ => {
            e.steps.push(Step {
                stage: "authorization",
                decision: "allow".into(),
                why: if e.policies.is_empty() {
                    "no AuthorizationPolicy applies".into()
                } else {
                    "no DENY matched, and an ALLOW matched or none exists".into()
                },
            });
            let reason = if captured { Reason::Allowed } else { e.reason };
            let verdict = if captured {
                Verdict::Allow
            } else {
                Verdict::Bypass
            };
            let outcome = if captured {
                "the application's answer, through the mesh"
            } else {
                "the application's answer, without mTLS and without an identity"
            };
            Ok(finish(e, verdict, reason, outcome))
        }
    }
}

fn finish(mut e: Explanation, verdict: Verdict, reason: Reason, outcome: &str) -> Explanation {
    e.verdict = verdict;
    e.reason = reason;
    e.outcome = outcome.to_owned();
    e
}

/// The kernel's `connect` decision for `w` reaching `dst` (see
/// `mesh-ebpf`'s `capture`): loopback first, then excluded ports and CIDRs.
fn capture_rule(w: &Workload, dst: SocketAddr) -> Result<(), (Reason, String)> {
    let ip = match dst.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(dst.ip()),
        v4 => v4,
    };
    if ip.is_loopback() || ip.is_unspecified() {
        return Err((
            Reason::NotCapturedLoopback,
            format!("{ip} is the pod itself"),
        ));
    }
    if w.excluded_ports.contains(&dst.port()) {
        return Err((
            Reason::NotCapturedExcludedPort,
            format!(
                "port {} is in {}/{}'s spec.excludedPorts",
                dst.port(),
                w.namespace,
                w.name
            ),
        ));
    }
    if let Some(cidr) = w.excluded_cidrs.iter().find(|c| c.contains(&ip)) {
        return Err((
            Reason::NotCapturedExcludedCidr,
            format!(
                "{ip} is in {cidr}, in {}/{}'s spec.excludedCidrs",
                w.namespace, w.name
            ),
        ));
    }
    Ok(())
}

fn resolve_source(text: &str, view: &MeshView<'_>) -> Result<Source, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        let meta = view.directory.lookup(ip);
        let enrolled = meta.as_ref().and_then(|m| {
            view.enrolled
                .iter()
                .find(|w| *w.namespace == *m.namespace && *w.name == *m.name)
                .cloned()
        });
        let label = match &meta {
            Some(m) => format!("{}/{} ({ip})", m.namespace, m.name),
            None => ip.to_string(),
        };
        return Ok(Source {
            enrolled,
            meta,
            ip: Some(ip),
            label,
        });
    }
    let (namespace, name) = text
        .split_once('/')
        .ok_or_else(|| format!("source {text:?}: expected namespace/name or an IP"))?;
    if let Some(w) = view
        .enrolled
        .iter()
        .find(|w| &*w.namespace == namespace && &*w.name == name)
    {
        let ip = w.ips.first().copied();
        return Ok(Source {
            meta: ip.and_then(|ip| view.directory.lookup(ip)),
            enrolled: Some(w.clone()),
            ip,
            label: text.to_owned(),
        });
    }
    match view.directory.find(namespace, name) {
        Some((ip, meta)) => Ok(Source {
            enrolled: None,
            meta: Some(meta),
            ip: Some(ip),
            label: text.to_owned(),
        }),
        None => Err(format!("unknown source workload {text:?}")),
    }
}

fn resolve_destination(text: &str, source: &Source, view: &MeshView<'_>) -> Result<Target, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if let Some(service) = view.catalog.resolve(addr) {
            return Ok(Target::Service(service, addr));
        }
        return Ok(match view.directory.lookup(addr.ip()) {
            Some(w) => Target::Pod(w, addr),
            None => Target::Unknown(addr),
        });
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("destination {text:?}: expected ip:port or host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("destination {text:?}: bad port"))?;
    let trimmed = host
        .trim_end_matches('.')
        .trim_end_matches(".cluster.local")
        .trim_end_matches(".svc");
    let own_ns = source.meta.as_ref().map(|m| m.namespace.to_string());
    let (name, namespace) = match trimmed.split_once('.') {
        Some((n, ns)) => (n.to_owned(), ns.to_owned()),
        None => (trimmed.to_owned(), own_ns.unwrap_or_default()),
    };
    match view.catalog.backend(&namespace, &name, port) {
        Some(service) => {
            let vip = service
                .service
                .cluster_ips
                .first()
                .map(|ip| SocketAddr::new(*ip, port))
                .ok_or_else(|| format!("Service {namespace}/{name} has no cluster IP"))?;
            Ok(Target::Service(service, vip))
        }
        None => Ok(Target::UnknownHost(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::service::Selectable;

    const PAGE: &str = include_str!("../../docs/debugging.md");
    const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: backend}\nspec:\n  mtls: {mode: STRICT}\n";

    /// node-a's agent with the page's config (plus `extra` documents).
    fn explain_on_node_a(extra: &str, q: &Query) -> Result<Explanation, String> {
        let yaml = PAGE
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("the page has its config");
        let config =
            crate::state::parse(&format!("{yaml}---\n{extra}")).expect("the page's config loads");
        let catalog = Catalog::build(
            &config,
            &Catalog::default(),
            &Selectable::of(&config.workloads),
        );
        let directory = Directory::default();
        directory.replace(
            config
                .workloads
                .iter()
                .flat_map(|w| {
                    let meta = Arc::new(WorkloadMeta::from_config(w));
                    w.ips.iter().map(move |ip| (*ip, meta.clone()))
                })
                .collect(),
        );
        let enrolled: Vec<Workload> = config
            .workloads
            .iter()
            .filter(|w| w.is_local_to(Some("node-a")))
            .cloned()
            .collect();
        let policies = Policies {
            peer_authentications: config.peer_authentications.clone(),
            authorization_policies: config.authorization_policies.clone(),
        };
        let view = MeshView {
            enrolled: &enrolled,
            directory: &directory,
            catalog: &catalog,
            policies: &policies,
            opaque_ports: &[3306, 5432, 6379],
            outbound_port: 15001,
        };
        explain(q, &view)
    }

    /// `mesh-agent debug explain ...` as the CLI reads it.
    fn query_of(command: &str) -> Query {
        let mut words = command.split_whitespace().skip(3);
        let mut q = Query {
            source: words.next().unwrap().into(),
            destination: words.next().unwrap().into(),
            ..Query::default()
        };
        while let Some(flag) = words.next() {
            match flag {
                "--tcp" => q.tcp = true,
                "--path" => q.path = words.next().map(str::to_owned),
                "--method" => q.method = words.next().map(str::to_owned),
                "--header" => {
                    let (k, v) = words.next().unwrap().split_once('=').unwrap();
                    q.headers.push((k.into(), v.into()));
                }
                other => panic!("flag {other} is not the CLI's"),
            }
        }
        q
    }

    /// Every command on the docs page gives the verdict, reason (and, where
    /// the page shows them, the tables) printed under it.
    #[test]
    fn every_example_on_the_debugging_page_is_what_explain_says() {
        let mut checked = 0;
        let blocks: Vec<&str> = PAGE
            .split("```\n$ ")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            // The page's `debug trace` examples are checked in `debug.rs`.
            .filter(|b| b.starts_with("mesh-agent debug explain"))
            .collect();
        for (i, block) in blocks.iter().enumerate() {
            // The page's last block is explained with its STRICT PeerAuthentication.
            let strict = i == blocks.len() - 1;
            for example in format!("$ {block}")
                .split("\n$ ")
                .filter(|e| !e.trim().is_empty())
            {
                let example = example.trim_start_matches("$ ");
                let (command, shown) = example.split_once('\n').unwrap();
                let q = query_of(command);
                let e = explain_on_node_a(if strict { STRICT } else { "" }, &q)
                    .unwrap_or_else(|err| panic!("{command}: {err}"));
                let printed = crate::debug::render_explanation(&serde_json::to_value(&e).unwrap());
                let shown = shown.trim_end();
                if i == 0 {
                    assert_eq!(printed.trim_end(), shown, "{command}");
                } else {
                    assert!(
                        printed.starts_with(shown),
                        "{command}:\n{printed}\nshown:\n{shown}"
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 7, "every example on the page was checked");
    }

    #[test]
    fn unresolvable_queries_are_clear_errors() {
        let q = |s: &str, d: &str| Query {
            source: s.into(),
            destination: d.into(),
            ..Query::default()
        };
        let cases = [
            (
                q("shop/nobody", "api.backend:80"),
                "unknown source workload",
            ),
            (
                q("web", "api.backend:80"),
                "expected namespace/name or an IP",
            ),
            (q("shop/web", "nothing.backend:80"), "unknown destination"),
            (
                q("shop/web", "api.backend"),
                "expected ip:port or host:port",
            ),
        ];
        for (query, expected) in cases {
            let err = explain_on_node_a("", &query).unwrap_err();
            assert!(err.contains(expected), "{query:?}: {err}");
        }
        assert!(Query::from_url_query("source=shop%2Fweb").is_err());
        let round =
            query_of("mesh-agent debug explain shop/web api:80 --path /a --header x-b=1 --tcp");
        let back = Query::from_url_query(&round.to_url_query()).unwrap();
        assert_eq!(
            (
                back.source,
                back.destination,
                back.path,
                back.headers,
                back.tcp
            ),
            (
                round.source,
                round.destination,
                round.path,
                round.headers,
                round.tcp
            )
        );
    }

    #[test]
    fn capture_follows_the_kernels_order() {
        let config = crate::state::parse(
            "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  cgroupPath: x\n  netns: {path: /n}\n  excludedPorts: [22]\n  excludedCidrs: [169.254.0.0/16]\n",
        )
        .unwrap();
        let w = &config.workloads[0];
        let table = [
            ("127.0.0.1:22", Some(Reason::NotCapturedLoopback)),
            ("[::1]:80", Some(Reason::NotCapturedLoopback)),
            ("[::ffff:127.0.0.1]:80", Some(Reason::NotCapturedLoopback)),
            ("0.0.0.0:80", Some(Reason::NotCapturedLoopback)),
            ("10.0.0.1:22", Some(Reason::NotCapturedExcludedPort)),
            ("169.254.169.254:80", Some(Reason::NotCapturedExcludedCidr)),
            (
                "[::ffff:169.254.1.1]:80",
                Some(Reason::NotCapturedExcludedCidr),
            ),
            ("10.0.0.1:80", None),
        ];
        for (dst, expected) in table {
            let got = capture_rule(w, dst.parse().unwrap()).err().map(|(r, _)| r);
            assert_eq!(got, expected, "{dst}");
        }
    }
}
