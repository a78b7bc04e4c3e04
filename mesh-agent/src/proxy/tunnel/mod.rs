//! The agent-to-agent tunnel: HTTP/2 CONNECT over mutual TLS 1.3 to the
//! destination pod's port 15008, the HBONE wire format of Istio ambient.
//!
//! - The client side presents the *source workload's* certificate and accepts
//!   the server only if its chain leads to the trust bundle and its SPIFFE ID is
//!   the destination workload's identity.
//! - The server side requires a client certificate that chains to the bundle and
//!   takes the client's SPIFFE ID as the source identity for policy and metrics.
//! - `:authority` of each CONNECT stream is the original destination `ip:port`.
//!
//! [`pool`] keeps client connections, many streams each; [`server`] is the
//! in-pod listener on 15008.

pub mod pool;
pub mod read_ahead;
pub mod server;

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::identity::manager::CertManager;
use crate::identity::{Identity, TrustBundle, WorkloadCert, identity_of};

/// The HBONE port on every meshed pod.
pub const HBONE_PORT: u16 = 15008;
/// HTTP/2 flow-control windows: large enough that one bulk stream is not held
/// back by window updates on a fast link, small enough to bound memory per stream.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// CONNECT header by which this agent's own client side tells its own server
/// side that it has already served the stream's requests (same node): the
/// value is a secret of the agent process, so no peer can claim it.
pub const PARSED_BY_HEADER: &str = "x-nodemesh-parsed-by";

const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Larger DATA frames mean fewer frame headers and wake-ups per byte.
const MAX_FRAME: u32 = 256 * 1024;
/// ALPN protocol of the tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider the agent uses (ring: builds with a C compiler only).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a tunnel could not be set up; each maps to a log line and a metric label.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// This node has no certificate for the source workload.
    #[error("source certificate: {0}")]
    Certificate(#[from] crate::identity::manager::CertError),
    /// TCP connect to the peer's port 15008 failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed (bad or unexpected peer certificate, protocol error).
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause, as rustls reports it.
        source: std::io::Error,
    },
    /// HTTP/2 failed on the tunnel connection.
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    /// The peer agent answered the CONNECT with an error status.
    #[error("peer refused CONNECT {authority}: {status}")]
    Refused {
        /// The requested destination.
        authority: String,
        /// The peer's answer.
        status: hyper::StatusCode,
    },
    /// Timed out.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

impl TunnelError {
    /// Short label for the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Certificate(_) => "source_certificate",
            TunnelError::Connect { .. } => "connect",
            TunnelError::Tls { .. } => "handshake",
            TunnelError::Http(_) => "http2",
            TunnelError::Refused { .. } => "refused",
            TunnelError::Timeout(_) => "timeout",
        }
    }

    /// The Istio `response_flags` value recorded for this failure.
    pub fn response_flags(&self) -> &'static str {
        match self {
            TunnelError::Refused { status, .. } if *status == hyper::StatusCode::FORBIDDEN => {
                "DENY"
            }
            // Upstream connection failure, as Envoy reports it.
            _ => "UF",
        }
    }
}

/// TLS for a tunnel from `source` (whose certificate is presented) to a server
/// that must prove it is `destination`.
pub fn client_config(
    source: &WorkloadCert,
    destination: Identity,
    trust: &TrustBundle,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        roots: trust.roots.clone(),
        expected: destination,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(source.chain.clone(), source.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// TLS for a workload's inbound tunnel listener: its current certificate, and
/// mandatory client certificates chaining to the trust bundle.
pub fn server_config(
    certs: Arc<ServingCert>,
    trust: &TrustBundle,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Verifies a tunnel server: chain to the bundle, then the exact SPIFFE ID. The
/// TLS server name plays no part (workload certificates carry no DNS names).
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<rustls::RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .inspect_err(|e| {
            tracing::warn!(expected = %self.expected, error = %e, "peer certificate rejected: it does not chain to the trust bundle");
        })?;
        let actual = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if actual != self.expected {
            tracing::warn!(
                "peer certificate rejected: peer is {actual}, expected {}",
                self.expected
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.to_string(),
                    actual: actual.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The peer proved an identity, but not the one the destination workload has.
#[derive(Debug, thiserror::Error)]
#[error("peer is {actual}, expected {expected}")]
struct IdentityMismatch {
    expected: String,
    actual: String,
}

/// Serves one workload's current certificate to TLS handshakes, picking up
/// rotations as they happen; existing connections keep the one they started with.
#[derive(Debug)]
pub struct ServingCert {
    identity: Identity,
    certs: CertManager,
    cached: Mutex<Option<(String, Arc<CertifiedKey>)>>,
}

impl ServingCert {
    /// The certificate of `identity` from `certs`.
    pub fn new(identity: Identity, certs: CertManager) -> Self {
        ServingCert {
            identity,
            certs,
            cached: Mutex::new(None),
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.certs.snapshot();
        let current = snapshot.get(&self.identity)?.current.clone()?;
        let mut cached = self.cached.lock().expect("serving cert lock");
        if let Some((serial, key)) = cached.as_ref()
            && *serial == current.serial
        {
            return Some(key.clone());
        }
        let key = certified_key(&current)
            .inspect_err(
                |e| tracing::error!(identity = %self.identity, error = %e, "unusable workload key"),
            )
            .ok()?;
        *cached = Some((current.serial.clone(), key.clone()));
        Some(key)
    }
}

/// rustls' form of a workload certificate and key.
pub fn certified_key(cert: &WorkloadCert) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = provider()
        .key_provider
        .load_private_key(cert.key.clone_key())?;
    Ok(Arc::new(CertifiedKey::new(cert.chain.clone(), key)))
}
