//! Services: a virtual IP and ports in front of the workloads its selector picks,
//! or that its EndpointSlices list. The agent balances connections to a VIP
//! itself, so no kube-proxy is needed, and a Service port's `appProtocol` or
//! opaque-port annotation decides whether the agent looks at the bytes at all.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::state::workload::Workload;
use crate::state::workload::WorkloadMeta;

/// Annotation listing ports whose traffic is never inspected (as Linkerd's
/// `config.linkerd.io/opaque-ports`): comma-separated ports.
pub const OPAQUE_PORTS_ANNOTATION: &str = "nodemesh.io/opaque-ports";

/// A Kubernetes `v1/Service`, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// The virtual IPs clients connect to (`clusterIP` and `clusterIPs`).
    pub cluster_ips: Vec<IpAddr>,
    /// Ports the Service exposes.
    pub ports: Vec<ServicePort>,
    /// Labels a workload must carry to be an endpoint.
    pub selector: BTreeMap<String, String>,
    /// Service ports that skip protocol detection.
    pub opaque_ports: Vec<u16>,
}

/// One Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name, if any: an EndpointSlice port of the same name carries its endpoints.
    pub name: Option<String>,
    /// The port on the VIP.
    pub port: u16,
    /// The port on the endpoints.
    pub target_port: TargetPort,
    /// Declared application protocol; skips detection when set.
    pub app_protocol: Option<String>,
}

/// A Service port's `targetPort`: a number, or the name of a container port,
/// which differs from pod to pod and so is resolved by the EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// The same port on every endpoint.
    Number(u16),
    /// A named container port.
    Name(String),
}

impl std::fmt::Display for TargetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(name) => write!(f, "{name}"),
        }
    }
}

/// The API version of EndpointSlices.
pub const DISCOVERY_V1: &str = "discovery.k8s.io/v1";

/// The label that names the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A `discovery.k8s.io/v1` EndpointSlice, reduced to what balancing needs. A
/// Service that has any takes its endpoints from them, as kube-proxy does: they
/// hold readiness, named target ports resolved per pod, and the addresses of
/// Services without a selector (a database outside the cluster, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Slice name.
    pub name: String,
    /// Slice namespace, which is its Service's.
    pub namespace: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: String,
    /// Ports, named as the Service's ports are, with the number on the endpoints.
    pub ports: Vec<SlicePort>,
    /// The addresses.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    /// The Service port's name (`None` for a Service's single unnamed port).
    pub name: Option<String>,
    /// The port on the endpoints.
    pub port: u16,
}

/// One endpoint of an EndpointSlice: its first address (the others are
/// fungible, by the API's definition) and its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// The address.
    pub address: IpAddr,
    /// Ready for new connections.
    pub ready: bool,
    /// Serving while terminating: used only when no endpoint is ready, as
    /// kube-proxy does, so a rollout's last pods still drain their clients.
    pub serving_terminating: bool,
}

/// What the agent does with bytes on a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PortProtocol {
    /// Look at the first bytes: HTTP/1.1, HTTP/2, or else opaque.
    Detect,
    /// HTTP/1.1, declared.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC included), declared.
    Http2,
    /// Never inspected; balanced per connection.
    Opaque,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, Istio's `destination_service`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether workload `w` is one of this Service's endpoints.
    pub fn selects(&self, w: &Workload) -> bool {
        !self.selector.is_empty()
            && *w.namespace == *self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }

    /// How traffic on `port` is treated.
    pub fn protocol(&self, port: &ServicePort) -> PortProtocol {
        if self.opaque_ports.contains(&port.port) {
            return PortProtocol::Opaque;
        }
        match port.app_protocol.as_deref() {
            None => PortProtocol::Detect,
            Some(p) => app_protocol(p),
        }
    }
}

/// Maps a Service `appProtocol` to a treatment. Kubernetes' own values and Istio's
/// port-name prefixes are both understood; anything else is opaque.
pub fn app_protocol(value: &str) -> PortProtocol {
    match value.to_ascii_lowercase().as_str() {
        "http" | "http1" | "kubernetes.io/http" => PortProtocol::Http1,
        "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" | "grpc-web" => PortProtocol::Http2,
        _ => PortProtocol::Opaque,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    ip_families: Vec<String>,
    #[serde(default)]
    ip_family_policy: Option<String>,
    #[serde(default)]
    session_affinity: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

impl Service {
    /// Validates a parsed spec; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        annotations: &BTreeMap<String, String>,
        spec: RawServiceSpec,
    ) -> Result<Service, (String, String)> {
        let _ = (spec.ip_families, spec.ip_family_policy);
        if let Some(kind) = spec.kind.as_deref()
            && kind != "ClusterIP"
        {
            return Err((
                "spec.type".into(),
                format!("{kind:?} is not supported (only ClusterIP)"),
            ));
        }
        if let Some(affinity) = spec.session_affinity.as_deref()
            && affinity != "None"
        {
            return Err((
                "spec.sessionAffinity".into(),
                format!("{affinity:?} is not supported (only None)"),
            ));
        }
        let mut cluster_ips = Vec::new();
        for (field, text) in spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip))
            .chain(
                spec.cluster_ips
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
            )
        {
            let ip: IpAddr = text
                .parse()
                .map_err(|_| (field.clone(), format!("{text:?} is not an IP address")))?;
            if ip.is_unspecified() || ip.is_loopback() {
                return Err((field, format!("{ip} cannot be a service VIP")));
            }
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        if cluster_ips.is_empty() {
            return Err((
                "spec.clusterIP".into(),
                "missing: the agent balances connections to the VIP, so it needs one".into(),
            ));
        }
        if spec.ports.is_empty() {
            return Err(("spec.ports".into(), "at least one port is required".into()));
        }
        let mut ports: Vec<ServicePort> = Vec::new();
        for (i, p) in spec.ports.into_iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            if p.port == 0 {
                return Err((format!("{field}.port"), "must be 1-65535".into()));
            }
            if let Some(proto) = p.protocol.as_deref()
                && proto != "TCP"
            {
                return Err((
                    format!("{field}.protocol"),
                    format!("{proto:?} is not supported (only TCP)"),
                ));
            }
            let target_port = match &p.target_port {
                None => TargetPort::Number(p.port),
                Some(v) => match (v.as_u64(), v.as_str()) {
                    (Some(n), _) if (1..=65535).contains(&n) => TargetPort::Number(n as u16),
                    (_, Some(name)) if is_port_name(name) => TargetPort::Name(name.to_owned()),
                    _ => {
                        return Err((
                            format!("{field}.targetPort"),
                            format!(
                                "{v:?}: use a port number (1-65535) or a container port name (at most 15 lowercase letters, digits and '-', with a letter)"
                            ),
                        ));
                    }
                },
            };
            if ports.iter().any(|q| q.port == p.port) {
                return Err((
                    format!("{field}.port"),
                    format!("port {} is listed twice", p.port),
                ));
            }
            ports.push(ServicePort {
                name: p.name,
                port: p.port,
                target_port,
                app_protocol: p.app_protocol,
            });
        }
        let opaque_ports = match annotations.get(OPAQUE_PORTS_ANNOTATION) {
            None => Vec::new(),
            Some(list) => parse_port_list(list).map_err(|message| {
                (
                    format!("metadata.annotations[{OPAQUE_PORTS_ANNOTATION}]"),
                    message,
                )
            })?,
        };
        Ok(Service {
            name,
            namespace,
            cluster_ips,
            ports,
            selector: spec.selector,
            opaque_ports,
        })
    }
}

/// Kubernetes' IANA_SVC_NAME: what a named container port may be called.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// An EndpointSlice's fields as written (they sit beside `metadata`, not in a `spec`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawEndpointSlice {
    address_type: String,
    #[serde(default)]
    endpoints: Vec<RawSliceEndpoint>,
    #[serde(default)]
    ports: Vec<RawSlicePort>,
}

// Fields the agent accepts but never reads are declared so that a misspelt one
// is still an error.
#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSliceEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawConditions,
    #[serde(default)]
    target_ref: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    node_name: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    zone: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    hostname: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    hints: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    deprecated_topology: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[allow(dead_code)] // `appProtocol` is accepted; the Service's own is used
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<serde::de::IgnoredAny>,
}

impl EndpointSlice {
    /// Validates a parsed slice; errors name the field at fault.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        labels: &BTreeMap<String, String>,
        raw: RawEndpointSlice,
    ) -> Result<EndpointSlice, (String, String)> {
        let service = labels.get(SERVICE_NAME_LABEL).cloned().ok_or_else(|| {
            (
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "missing: it names the Service the slice belongs to".to_owned(),
            )
        })?;
        let ipv4 = match raw.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            other => {
                return Err((
                    "addressType".into(),
                    format!("{other:?} is not supported (only IPv4 and IPv6)"),
                ));
            }
        };
        let mut ports = Vec::with_capacity(raw.ports.len());
        for (i, p) in raw.ports.into_iter().enumerate() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue; // the Service's UDP and SCTP ports are not the mesh's
            }
            let port = match p.port {
                Some(n) if (1..=65535).contains(&n) => n as u16,
                other => {
                    return Err((
                        format!("ports[{i}].port"),
                        format!("{other:?}: must be 1-65535"),
                    ));
                }
            };
            ports.push(SlicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port,
            });
        }
        let mut endpoints = Vec::with_capacity(raw.endpoints.len());
        for (i, e) in raw.endpoints.into_iter().enumerate() {
            let field = format!("endpoints[{i}].addresses");
            let first = e
                .addresses
                .first()
                .ok_or_else(|| (field.clone(), "at least one address is required".into()))?;
            let address: IpAddr = first.parse().map_err(|_| {
                (
                    format!("{field}[0]"),
                    format!("{first:?} is not an IP address"),
                )
            })?;
            if address.is_ipv4() != ipv4 || address.is_unspecified() {
                return Err((
                    format!("{field}[0]"),
                    format!("{address} is not a usable {} address", raw.address_type),
                ));
            }
            // Unset conditions mean ready and serving, by the API's definition.
            let c = e.conditions;
            let ready = c.ready.unwrap_or(true);
            endpoints.push(SliceEndpoint {
                address,
                ready,
                serving_terminating: c.serving.unwrap_or(ready) && c.terminating.unwrap_or(false),
            });
        }
        Ok(EndpointSlice {
            name,
            namespace,
            service,
            ports,
            endpoints,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Parses `"25, 3306,5432"`.
pub fn parse_port_list(list: &str) -> Result<Vec<u16>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("{s:?} is not a port number")),
        })
        .collect()
}

/// One backend address of a Service port, with the workload behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// The workload serving it; `None` for an address no known pod has (an
    /// EndpointSlice entry outside the cluster), which is reached directly.
    pub workload: Option<Arc<WorkloadMeta>>,
}

/// The workloads Services may select, indexed by namespace and label so that a
/// Service's selector is checked against its candidates only (1,000 Services
/// over 10,000 pods is then 10,000 label lookups, not 10 million selector
/// checks), with one shared [`WorkloadMeta`] per pod however many Services pick it.
pub struct Selectable<'a> {
    workloads: &'a [Workload],
    metas: Vec<Arc<WorkloadMeta>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    by_ip: HashMap<IpAddr, usize>,
}

impl<'a> Selectable<'a> {
    /// Indexes `workloads`; `metas[i]` is the identity of `workloads[i]`.
    pub fn new(workloads: &'a [Workload], metas: Vec<Arc<WorkloadMeta>>) -> Self {
        debug_assert_eq!(workloads.len(), metas.len());
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut by_ip = HashMap::with_capacity(workloads.len());
        for (i, w) in workloads.iter().enumerate() {
            for ip in &w.ips {
                by_ip.insert(*ip, i);
            }
            for (k, v) in w.labels.iter() {
                by_label
                    .entry((&*w.namespace, k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Selectable {
            workloads,
            metas,
            by_label,
            by_ip,
        }
    }

    /// The identity of the workload with address `ip`, if one is known.
    pub fn at(&self, ip: IpAddr) -> Option<&Arc<WorkloadMeta>> {
        self.by_ip.get(&ip).map(|i| &self.metas[*i])
    }

    /// Indexes `workloads` with a fresh identity for each.
    #[cfg(test)]
    pub fn of(workloads: &'a [Workload]) -> Self {
        let metas = workloads
            .iter()
            .map(|w| Arc::new(WorkloadMeta::from_config(w)))
            .collect();
        Self::new(workloads, metas)
    }

    /// The shared identities, in the order of the workloads.
    pub fn metas(&self) -> &[Arc<WorkloadMeta>] {
        &self.metas
    }

    /// The workloads `service` selects, with their identities.
    fn selected_by<'s>(
        &'s self,
        service: &'s Service,
    ) -> impl Iterator<Item = (&'a Workload, &'s Arc<WorkloadMeta>)> + 's {
        // Any one label of the selector finds every candidate.
        let candidates = service
            .selector
            .iter()
            .next()
            .and_then(|(k, v)| {
                self.by_label
                    .get(&(service.namespace.as_str(), k.as_str(), v.as_str()))
            })
            .map(Vec::as_slice)
            .unwrap_or_default();
        candidates
            .iter()
            .map(|i| (&self.workloads[*i], &self.metas[*i]))
            .filter(|(w, _)| service.selects(w))
    }
}

/// Each Service's EndpointSlices, by `(namespace, service name)`.
pub fn slices_by_service(slices: &[EndpointSlice]) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut out: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        out.entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    out
}

/// The endpoints of `service`'s `port`. A Service with EndpointSlices takes them
/// from its slices (ready endpoints, or serving-terminating ones when none is
/// ready); one without takes every pod its selector picks, which needs a
/// numeric target port. Addresses of `vip`'s family are preferred.
pub fn endpoints(
    service: &Service,
    port: &ServicePort,
    vip: IpAddr,
    selectable: &Selectable<'_>,
    slices: &[&EndpointSlice],
) -> Vec<Endpoint> {
    let mut out = if slices.is_empty() {
        selected_endpoints(service, port, vip, selectable)
    } else {
        slice_endpoints(port, vip, selectable, slices)
    };
    out.sort_by_key(|e| e.addr);
    // A pod moving between slices may briefly be listed twice.
    out.dedup_by_key(|e| e.addr);
    out
}

fn selected_endpoints(
    service: &Service,
    port: &ServicePort,
    vip: IpAddr,
    selectable: &Selectable<'_>,
) -> Vec<Endpoint> {
    let TargetPort::Number(target) = port.target_port else {
        // Only the EndpointSlice controller resolves a named port per pod.
        return Vec::new();
    };
    selectable
        .selected_by(service)
        .filter_map(|(w, meta)| {
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == vip.is_ipv4())
                .or(w.ips.first())?;
            Some(Endpoint {
                addr: SocketAddr::new(*ip, target),
                workload: Some(meta.clone()),
            })
        })
        .collect()
}

fn slice_endpoints(
    port: &ServicePort,
    vip: IpAddr,
    selectable: &Selectable<'_>,
    slices: &[&EndpointSlice],
) -> Vec<Endpoint> {
    // A dual-stack Service has a slice per family; use the VIP's when there is one.
    let same_family = |s: &&&EndpointSlice| {
        s.endpoints
            .first()
            .is_none_or(|e| e.address.is_ipv4() == vip.is_ipv4())
    };
    let family: Vec<&EndpointSlice> = if slices.iter().any(|s| {
        s.endpoints
            .first()
            .is_some_and(|e| e.address.is_ipv4() == vip.is_ipv4())
    }) {
        slices.iter().filter(same_family).copied().collect()
    } else {
        slices.to_vec()
    };
    let candidates = || {
        family.iter().flat_map(|slice| {
            slice
                .ports
                .iter()
                .filter(|p| p.name == port.name)
                .flat_map(move |p| slice.endpoints.iter().map(move |e| (e, p.port)))
        })
    };
    let ready = candidates().any(|(e, _)| e.ready);
    candidates()
        .filter(|(e, _)| {
            if ready {
                e.ready
            } else {
                e.serving_terminating
            }
        })
        .map(|(e, target)| Endpoint {
            addr: SocketAddr::new(e.address, target),
            workload: selectable.at(e.address).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocols() {
        let cases = [
            ("http", PortProtocol::Http1),
            ("kubernetes.io/h2c", PortProtocol::Http2),
            ("grpc", PortProtocol::Http2),
            ("GRPC", PortProtocol::Http2),
            ("mysql", PortProtocol::Opaque),
            ("tcp", PortProtocol::Opaque),
        ];
        for (value, expected) in cases {
            assert_eq!(app_protocol(value), expected, "{value}");
        }
    }

    const PODS: &str = r#"
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, ips: [10.0.0.1, "fd00::1"]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, ips: [10.0.0.2]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: other, namespace: elsewhere, labels: {app: web}}
spec: {nodeName: n2, ips: [10.0.0.3]}
"#;

    fn service(target: &str, selector: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.1\n  selector: {{{selector}}}\n  ports: [{{name: http, port: 80, targetPort: {target}}}]\n"
        )
    }

    fn slice(name: &str, family: &str, port_name: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {family}\nports: [{{name: {port_name}, port: 9090, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\nendpoints: {endpoints}\n"
        )
    }

    /// An endpoint as the table states it: address and pod name.
    type Resolved = (String, Option<String>);

    /// `(address, pod)` of each endpoint of the Service's one port.
    fn resolve(docs: &[String]) -> Vec<Resolved> {
        let config = crate::state::parse(&format!("{PODS}---\n{}", docs.join("---\n"))).unwrap();
        let selectable = Selectable::of(&config.workloads);
        let svc = &config.services[0];
        let by_service = slices_by_service(&config.endpoint_slices);
        let slices = by_service
            .get(&("shop", "web"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        endpoints(svc, &svc.ports[0], svc.cluster_ips[0], &selectable, slices)
            .into_iter()
            .map(|e| (e.addr.to_string(), e.workload.map(|w| w.name.to_string())))
            .collect()
    }

    fn at(addr: &str, pod: Option<&str>) -> Resolved {
        (addr.to_owned(), pod.map(str::to_owned))
    }

    #[test]
    fn endpoints_come_from_slices_when_a_service_has_them_and_else_from_its_selector() {
        let ready = |ip: &str| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}");
        let cases: Vec<(&str, Vec<String>, Vec<Resolved>)> = vec![
            (
                "selector, numeric target: every selected pod of the namespace, IPv4 first",
                vec![service("8080", "app: web")],
                vec![
                    at("10.0.0.1:8080", Some("web-1")),
                    at("10.0.0.2:8080", Some("web-2")),
                ],
            ),
            (
                "selector, named target and no slices: nothing can resolve the name",
                vec![service("http-alt", "app: web")],
                vec![],
            ),
            (
                "slices win over the selector, with the slice port's number; an unknown address has no pod",
                vec![
                    service("http-alt", "app: web"),
                    slice(
                        "web-a",
                        "IPv4",
                        "http",
                        &format!("[{}, {}]", ready("10.0.0.2"), ready("192.0.2.7")),
                    ),
                ],
                vec![
                    at("10.0.0.2:9090", Some("web-2")),
                    at("192.0.2.7:9090", None),
                ],
            ),
            (
                "a selector-less Service, split over two slices with a duplicate",
                vec![
                    service("5432", ""),
                    slice(
                        "web-a",
                        "IPv4",
                        "http",
                        &format!("[{}]", ready("192.0.2.7")),
                    ),
                    slice(
                        "web-b",
                        "IPv4",
                        "http",
                        &format!("[{}, {}]", ready("192.0.2.7"), ready("192.0.2.8")),
                    ),
                ],
                vec![at("192.0.2.7:9090", None), at("192.0.2.8:9090", None)],
            ),
            (
                "unready endpoints are left out while any is ready",
                vec![
                    service("8080", ""),
                    slice(
                        "web-a",
                        "IPv4",
                        "http",
                        &format!(
                            "[{}, {{addresses: [\"10.0.0.1\"], conditions: {{ready: false, serving: true, terminating: true}}}}]",
                            ready("10.0.0.2")
                        ),
                    ),
                ],
                vec![at("10.0.0.2:9090", Some("web-2"))],
            ),
            (
                "with none ready, serving-terminating ones still drain the clients",
                vec![
                    service("8080", ""),
                    slice(
                        "web-a",
                        "IPv4",
                        "http",
                        "[{addresses: [\"10.0.0.1\"], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [\"10.0.0.2\"], conditions: {ready: false, serving: false}}]",
                    ),
                ],
                vec![at("10.0.0.1:9090", Some("web-1"))],
            ),
            (
                "a slice port of another name carries another Service port",
                vec![
                    service("8080", ""),
                    slice(
                        "web-a",
                        "IPv4",
                        "metrics",
                        &format!("[{}]", ready("10.0.0.1")),
                    ),
                ],
                vec![],
            ),
            (
                "the VIP's family is preferred in a dual-stack Service",
                vec![
                    service("8080", ""),
                    slice("web-v6", "IPv6", "http", &format!("[{}]", ready("fd00::1"))),
                    slice(
                        "web-v4",
                        "IPv4",
                        "http",
                        &format!("[{}]", ready("10.0.0.1")),
                    ),
                ],
                vec![at("10.0.0.1:9090", Some("web-1"))],
            ),
        ];
        for (what, docs, expected) in cases {
            assert_eq!(resolve(&docs), expected, "{what}");
        }
    }

    #[test]
    fn endpoint_slices_are_validated_like_every_other_object() {
        let cases = [
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: shop}\naddressType: IPv4\nendpoints: []\n",
                "metadata.labels[kubernetes.io/service-name]: missing",
            ),
            (
                &slice("s", "FQDN", "http", "[]"),
                "addressType: \"FQDN\" is not supported",
            ),
            (
                &slice("s", "IPv4", "http", "[{addresses: [\"fd00::1\"]}]"),
                "endpoints[0].addresses[0]: fd00::1 is not a usable IPv4 address",
            ),
            (
                &slice("s", "IPv4", "http", "[{addresses: []}]"),
                "endpoints[0].addresses: at least one address is required",
            ),
            (
                &slice("s", "IPv4", "http", "[{adresses: [\"10.0.0.1\"]}]"),
                "unknown field `adresses`",
            ),
            (
                &service("\"Not_A_Name\"", "app: web"),
                "spec.ports[0].targetPort",
            ),
        ];
        for (doc, expected) in cases {
            let err = crate::state::parse(doc).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}\nexpected: {expected}");
        }
        // Conditions left unset mean ready; UDP ports are not the mesh's.
        let config = crate::state::parse(&slice(
            "s",
            "IPv4",
            "\"\"",
            "[{addresses: [\"10.0.0.1\", \"10.0.0.9\"], nodeName: n1, targetRef: {kind: Pod, name: web-1}}]",
        ))
        .unwrap();
        let s = &config.endpoint_slices[0];
        assert_eq!(s.service, "web");
        assert_eq!(
            s.ports,
            vec![SlicePort {
                name: None,
                port: 9090
            }]
        );
        assert_eq!(s.endpoints.len(), 1);
        assert!(s.endpoints[0].ready);
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list("25, 3306,,5432"), Ok(vec![25, 3306, 5432]));
        assert!(parse_port_list("25,x").unwrap_err().contains("\"x\""));
        assert!(parse_port_list("0").is_err());
    }
}
