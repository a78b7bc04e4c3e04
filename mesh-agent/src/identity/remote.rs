//! Certificates from the mesh CA service (or istiod) over Istio's certificate
//! API: the agent makes each workload's key here, sends only a CSR, and keeps
//! the key in memory. The signing key never reaches the node.
//!
//! Each request carries the agent's own Kubernetes token (audience `istio-ca`,
//! re-read from its file every time, as the kubelet rotates it) and names the
//! workload in `ImpersonatedIdentity`; the service signs only for pods on this
//! node. An answer is used only if it is for our key and name and chains to the
//! trust bundle the agent already has: a CA that rotated its signer before the
//! roots were distributed is refused, and the current certificate stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::ca::{hex, self_signed};
use super::istio_ca::{
    CLUSTER_ID_HEADER, IstioCertificateRequest, impersonation_metadata,
    istio_certificate_service_client::IstioCertificateServiceClient,
};
use super::manager::{CertificateSource, IssueError};
use super::{Identity, TrustBundle, WorkloadCert, identity_of};
use crate::metrics::Metrics;

/// How the agent reaches the CA service.
#[derive(Debug, Clone)]
pub struct CaServiceSettings {
    /// `https://host:port` of the CA service or istiod (port 15012).
    pub address: String,
    /// Name the service's certificate must carry; default: the address's host.
    pub server_name: Option<String>,
    /// The mesh root(s): verifies the service, and is the agent's trust bundle.
    pub root_file: PathBuf,
    /// The agent's projected service-account token (audience `istio-ca`).
    pub token_file: PathBuf,
    /// Sent as the `ClusterID` header (istiod picks the cluster's API server by it).
    pub cluster_id: String,
    /// Upper bound on one request, connection included.
    pub timeout: Duration,
}

/// The CA service as a certificate source for the manager.
pub struct RemoteCa {
    settings: CaServiceSettings,
    /// A channel built with the roots in force; replaced when they change.
    channel: RwLock<Channel>,
    roots: RwLock<TrustBundle>,
    metrics: Arc<Metrics>,
    /// The last failure to reach the service, for `/healthz/ready`.
    last_unreachable: Arc<Mutex<Option<String>>>,
}

impl RemoteCa {
    /// A client of the service at `settings.address`, trusting `roots` (the PEM
    /// of `settings.root_file`, already parsed into `bundle`). Connects lazily.
    pub fn new(
        settings: CaServiceSettings,
        roots_pem: &[u8],
        bundle: TrustBundle,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let channel = channel(&settings, roots_pem)?;
        Ok(RemoteCa {
            settings,
            channel: RwLock::new(channel),
            roots: RwLock::new(bundle),
            metrics,
            last_unreachable: Arc::default(),
        })
    }

    /// New roots (a rotation): the service is verified, and answers checked, with them.
    pub fn set_roots(&self, roots_pem: &[u8], bundle: TrustBundle) -> anyhow::Result<()> {
        let channel = channel(&self.settings, roots_pem)?;
        *self.channel.write().expect("channel lock") = channel;
        *self.roots.write().expect("roots lock") = bundle;
        Ok(())
    }

    /// Why the service could not be reached at the last attempt, if it could not.
    pub fn unreachable(&self) -> Option<String> {
        self.last_unreachable.lock().expect("status lock").clone()
    }
}

fn channel(settings: &CaServiceSettings, roots_pem: &[u8]) -> anyhow::Result<Channel> {
    use anyhow::Context;
    let endpoint = Endpoint::from_shared(settings.address.clone())
        .with_context(|| format!("--ca-address {:?}", settings.address))?;
    let host = endpoint.uri().host().unwrap_or_default().to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name(settings.server_name.clone().unwrap_or(host));
    Ok(endpoint
        .tls_config(tls)
        .context("CA service TLS settings")?
        .connect_timeout(settings.timeout)
        // A replica that went away is noticed between requests, not in one.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy())
}

impl CertificateSource for RemoteCa {
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
        let channel = self.channel.read().expect("channel lock").clone();
        let roots = self.roots.read().expect("roots lock").clone();
        let settings = self.settings.clone();
        let identity = identity.clone();
        let metrics = self.metrics.clone();
        let status = self.last_unreachable.clone();
        Box::pin(async move {
            let result = request(channel, &settings, &roots, &identity, lifetime).await;
            let mut status = status.lock().expect("status lock");
            match &result {
                Err(IssueError::Unreachable(e)) => {
                    metrics.ca_healthy.set(0);
                    *status = Some(e.clone());
                }
                _ => {
                    metrics.ca_healthy.set(1);
                    *status = None;
                }
            }
            result
        })
    }
}

/// Attempts per request while the connection fails (the manager's backoff
/// takes over after them).
const CONNECTION_ATTEMPTS: u64 = 3;

/// One certificate request, retried at once if the connection failed: a CA
/// replica that died leaves a broken connection that the retry replaces.
async fn request(
    channel: Channel,
    settings: &CaServiceSettings,
    roots: &TrustBundle,
    identity: &Identity,
    lifetime: Duration,
) -> Result<WorkloadCert, IssueError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssueError::BadResponse(format!("making a key: {e}")))?;
    let csr = csr(identity, &key)?;
    let token = tokio::fs::read_to_string(&settings.token_file)
        .await
        .map_err(|e| {
            IssueError::Unreachable(format!(
                "reading the token {}: {e}",
                settings.token_file.display()
            ))
        })?;
    let body = IstioCertificateRequest {
        csr,
        validity_duration: lifetime.as_secs().try_into().unwrap_or(i64::MAX),
        metadata: Some(impersonation_metadata(&identity.to_string())),
    };
    let mut attempt = 0;
    let response = loop {
        attempt += 1;
        let mut request = tonic::Request::new(body.clone());
        request.set_timeout(settings.timeout);
        let headers = request.metadata_mut();
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| IssueError::Unreachable("the token is not a valid header".into()))?;
        headers.insert("authorization", bearer);
        if let Ok(cluster) = settings.cluster_id.parse() {
            headers.insert(CLUSTER_ID_HEADER, cluster);
        }
        let mut client = IstioCertificateServiceClient::new(channel.clone());
        match tokio::time::timeout(settings.timeout, client.create_certificate(request)).await {
            Ok(Ok(response)) => break response.into_inner(),
            Ok(Err(status)) if unreachable(&status) && attempt < CONNECTION_ATTEMPTS => {
                tracing::info!(%identity, error = %status.message(), "CA request failed; retrying at once on a new connection");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Ok(Err(status)) if unreachable(&status) => {
                return Err(IssueError::Unreachable(status.message().to_owned()));
            }
            Ok(Err(status)) => {
                return Err(IssueError::Refused {
                    code: status.code(),
                    message: status.message().to_owned(),
                });
            }
            Err(_) => {
                return Err(IssueError::Unreachable(format!(
                    "no answer within {:?}",
                    settings.timeout
                )));
            }
        }
    };
    accept(identity, key, &response.cert_chain, roots)
}

/// Whether a status means "try again elsewhere" rather than "no".
fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// A PEM CSR for `identity`'s new key: the name is all it asks for.
fn csr(identity: &Identity, key: &KeyPair) -> Result<String, IssueError> {
    let bad = |e: rcgen::Error| IssueError::BadResponse(format!("making a CSR: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().map_err(bad)?)];
    params
        .serialize_request(key)
        .map_err(bad)?
        .pem()
        .map_err(bad)
}

/// Checks an answer and makes it the workload's certificate: the leaf must be
/// for our key and name, and chain to the roots the agent trusts.
pub fn accept(
    identity: &Identity,
    key: KeyPair,
    cert_chain: &[String],
    roots: &TrustBundle,
) -> Result<WorkloadCert, IssueError> {
    let bad = IssueError::BadResponse;
    let mut certs = Vec::new();
    for pem in cert_chain {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| bad(format!("bad PEM: {e}")))?);
        }
    }
    let Some(leaf) = certs.first().cloned() else {
        return Err(bad("empty certificate chain".into()));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| bad(format!("leaf does not parse: {e}")))?;
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
        return Err(bad("the leaf is not for the key this agent sent".into()));
    }
    match identity_of(&leaf) {
        Ok(id) if &id == identity => {}
        Ok(other) => return Err(bad(format!("the leaf names {other}, not {identity}"))),
        Err(e) => return Err(bad(format!("the leaf has no usable identity: {e}"))),
    }
    let intermediates: Vec<CertificateDer<'static>> = certs[1..]
        .iter()
        .filter(|c| !self_signed(c))
        .cloned()
        .collect();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.roots.clone(),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| bad(format!("trust bundle unusable: {e}")))?;
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;
    let validity = parsed.validity();
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let serial = hex(parsed.raw_serial());
    let (not_before, not_after) = (time(validity.not_before), time(validity.not_after));
    let mut chain = vec![leaf];
    chain.extend(intermediates);
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain,
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        serial,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{Signer, init, load_trust_bundle, to_pem as pem};

    #[test]
    fn answers_are_checked_for_key_name_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "cluster.local").unwrap();
        let signer = Signer::load(dir.path()).unwrap();
        let roots = load_trust_bundle(dir.path()).unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let answer = |key: &KeyPair, name: &Identity, signer: &Signer| -> Vec<String> {
            let signed = signer.sign(name, key, Duration::from_secs(3600)).unwrap();
            let mut chain: Vec<String> = signed.chain.iter().map(pem).collect();
            chain.extend(
                signer
                    .chain_to_root()
                    .iter()
                    .filter(|c| self_signed(c))
                    .map(pem),
            );
            chain
        };
        let new_key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

        let key = new_key();
        let chain = answer(&key, &id, &signer);
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        let cert = accept(&id, key, &chain, &roots).unwrap();
        assert_eq!(cert.chain.len(), 2, "the root is not sent to peers");
        assert_eq!(identity_of(&cert.chain[0]).unwrap(), id);
        assert!(cert.not_after > SystemTime::now() + Duration::from_secs(3500));

        // Someone else's key.
        let key = new_key();
        let chain = answer(&new_key(), &id, &signer);
        let err = accept(&id, key, &chain, &roots).unwrap_err().to_string();
        assert!(err.contains("not for the key"), "{err}");

        // Another name.
        let key = new_key();
        let other = Identity::new("cluster.local", "shop", "admin");
        let chain = answer(&key, &other, &signer);
        let err = accept(&id, key, &chain, &roots).unwrap_err().to_string();
        assert!(
            err.contains("names spiffe://cluster.local/ns/shop/sa/admin"),
            "{err}"
        );

        // A CA the agent does not trust (yet).
        let stranger_dir = tempfile::tempdir().unwrap();
        init(stranger_dir.path(), "cluster.local").unwrap();
        let stranger = Signer::load(stranger_dir.path()).unwrap();
        let key = new_key();
        let chain = answer(&key, &id, &stranger);
        let err = accept(&id, key, &chain, &roots).unwrap_err().to_string();
        assert!(err.contains("does not chain to the trust bundle"), "{err}");

        assert!(accept(&id, new_key(), &[], &roots).is_err());
    }
}
