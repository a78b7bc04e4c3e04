//! Workload identities and their certificates.
//!
//! An identity is a SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
//! The agent holds short-lived ECDSA P-256 certificates for the workloads on its
//! node. In a cluster it gets them from the mesh CA service (or istiod) over
//! Istio's certificate API ([`remote`]): keys are made here, only CSRs leave,
//! and the signing key never reaches a node. For VMs and development it can
//! sign them itself ([`ca`]) with CA files in Istio's `cacerts` layout
//! (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
//!
//! One task ([`manager`]) owns all certificate state. It renews each certificate
//! at half its lifetime, and on failure keeps the valid one and retries with
//! per-identity backoff.

pub mod ca;
pub mod istio_ca;
pub mod manager;
pub mod node;
pub mod remote;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A SPIFFE workload identity in Istio's Kubernetes shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

impl Identity {
    /// The identity of a service account in a trust domain.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a SPIFFE workload identity (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")]
pub struct IdentityParseError {
    uri: String,
}

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = || IdentityParseError {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(err()),
        }
    }
}

/// A workload certificate with its key, ready for rustls.
pub struct WorkloadCert {
    /// Whose certificate this is.
    pub identity: Identity,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Hex serial number, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The roots every peer certificate must chain to; swapped whole on reload.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    /// Root certificates.
    pub roots: Arc<rustls::RootCertStore>,
}

/// Reads the SPIFFE identity from a certificate's URI SAN. A certificate with
/// no SPIFFE URI, or with more than one, has no identity.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PeerIdentityError::Unparsable(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::Unparsable(e.to_string()))?
        .ok_or(PeerIdentityError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse().map_err(PeerIdentityError::Malformed),
        [] => Err(PeerIdentityError::NoSpiffeId),
        _ => Err(PeerIdentityError::SeveralSpiffeIds),
    }
}

/// Why a peer's certificate yields no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// Not valid X.509.
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// No `spiffe://` URI SAN.
    #[error("certificate carries no SPIFFE ID")]
    NoSpiffeId,
    /// Ambiguous identity.
    #[error("certificate carries more than one SPIFFE ID")]
    SeveralSpiffeIds,
    /// A `spiffe://` URI that is not a workload identity.
    #[error(transparent)]
    Malformed(IdentityParseError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_and_print() {
        let cases = [
            (
                "spiffe://cluster.local/ns/a/sa/b",
                Some(("cluster.local", "a", "b")),
            ),
            (
                "spiffe://td/ns/default/sa/default",
                Some(("td", "default", "default")),
            ),
            ("spiffe://cluster.local/ns/a/sa/", None),
            ("spiffe://cluster.local/ns/a", None),
            ("spiffe://cluster.local/ns/a/sa/b/extra", None),
            ("https://cluster.local/ns/a/sa/b", None),
            ("spiffe:///ns/a/sa/b", None),
        ];
        for (uri, expected) in cases {
            let parsed = uri.parse::<Identity>().ok();
            let expected = expected.map(|(td, ns, sa)| Identity::new(td, ns, sa));
            assert_eq!(parsed, expected, "{uri}");
            if let Some(id) = parsed {
                assert_eq!(id.to_string(), uri);
            }
        }
    }
}
