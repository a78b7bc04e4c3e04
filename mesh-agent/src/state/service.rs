//! Services: a virtual IP and ports in front of the workloads its selector picks.
//! The agent balances connections to a VIP itself, so no kube-proxy is needed, and
//! a Service port's `appProtocol` or opaque-port annotation decides whether the
//! agent looks at the bytes at all.

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
    /// Port name, if any.
    pub name: Option<String>,
    /// The port on the VIP.
    pub port: u16,
    /// The port on the endpoints.
    pub target_port: u16,
    /// Declared application protocol; skips detection when set.
    pub app_protocol: Option<String>,
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
            && w.namespace == self.namespace
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
                None => p.port,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=65535).contains(&n) => n as u16,
                    _ => {
                        return Err((
                            format!("{field}.targetPort"),
                            format!(
                                "{v:?}: use a port number (named target ports are not supported)"
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
    /// The workload serving it.
    pub workload: Arc<WorkloadMeta>,
}

/// The workloads Services may select, indexed by namespace and label so that a
/// Service's selector is checked against its candidates only (1,000 Services
/// over 10,000 pods is then 10,000 label lookups, not 10 million selector
/// checks), with one shared [`WorkloadMeta`] per pod however many Services pick it.
pub struct Selectable<'a> {
    workloads: &'a [Workload],
    metas: Vec<Arc<WorkloadMeta>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> Selectable<'a> {
    /// Indexes `workloads`; `metas[i]` is the identity of `workloads[i]`.
    pub fn new(workloads: &'a [Workload], metas: Vec<Arc<WorkloadMeta>>) -> Self {
        debug_assert_eq!(workloads.len(), metas.len());
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            for (k, v) in w.labels.iter() {
                by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Selectable {
            workloads,
            metas,
            by_label,
        }
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

/// The endpoints of `service`'s `port`: one per selected pod, using the pod IP
/// of the VIP's family when the pod has one.
pub fn endpoints(
    service: &Service,
    port: &ServicePort,
    vip: IpAddr,
    selectable: &Selectable<'_>,
) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = selectable
        .selected_by(service)
        .filter_map(|(w, meta)| {
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == vip.is_ipv4())
                .or(w.ips.first())?;
            Some(Endpoint {
                addr: SocketAddr::new(*ip, port.target_port),
                workload: meta.clone(),
            })
        })
        .collect();
    out.sort_by_key(|e| e.addr);
    out
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

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list("25, 3306,,5432"), Ok(vec![25, 3306, 5432]));
        assert!(parse_port_list("25,x").unwrap_err().contains("\"x\""));
        assert!(parse_port_list("0").is_err());
    }
}
