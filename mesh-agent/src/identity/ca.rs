//! The mesh CA as the agent sees it: files in Istio's `cacerts` layout, a signer
//! built from them, and `mesh-agent ca init` for local and development use.
//!
//! The agent signs with the *intermediate* (`ca-cert.pem` / `ca-key.pem`); the
//! root key never needs to be on a node. Peers trust `root-cert.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Identity, TrustBundle, WorkloadCert};

/// Signing certificate (the intermediate).
pub const CA_CERT: &str = "ca-cert.pem";
/// Its private key.
pub const CA_KEY: &str = "ca-key.pem";
/// The trust anchor peers verify against.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The signing certificate's chain up to the root: sent after each leaf.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Only written by `ca init`; an agent never reads it.
pub const ROOT_KEY: &str = "root-key.pem";

/// Why the CA files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file has no usable PEM content.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Signing failed.
    #[error("signing a certificate: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Issues workload certificates with the intermediate CA.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates to send after the leaf (the chain file without the root).
    intermediates: Vec<CertificateDer<'static>>,
    /// The signing certificate up to and including its root: what Istio's
    /// certificate API returns after the leaf.
    chain_to_root: Vec<CertificateDer<'static>>,
}

/// A certificate the signer made for a key it was given.
#[derive(Debug, Clone)]
pub struct SignedCert {
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// Hex serial number, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

fn read(dir: &Path, name: &str) -> Result<String, CaError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|source| CaError::Read { path, source })
}

fn certs(dir: &Path, name: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    certs_in(&dir.join(name), pem.as_bytes())
}

/// Every certificate of the PEM read from `path` (named in errors); at least one.
fn certs_in(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let invalid = |what: String| CaError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Reads the trust bundle (`root-cert.pem`, which may hold several roots during a root rotation).
pub fn load_trust_bundle(dir: &Path) -> Result<TrustBundle, CaError> {
    let pem = read(dir, ROOT_CERT)?;
    trust_bundle_from_pem(&dir.join(ROOT_CERT), pem.as_bytes())
}

/// A trust bundle from the PEM roots read from `path` (named in errors).
pub fn trust_bundle_from_pem(path: &Path, pem: &[u8]) -> Result<TrustBundle, CaError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_in(path, pem)? {
        roots.add(cert).map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            what: format!("not a usable trust anchor: {e}"),
        })?;
    }
    Ok(TrustBundle {
        roots: Arc::new(roots),
    })
}

impl Signer {
    /// Loads the signing CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_pem = read(dir, CA_CERT)?;
        let key_pem = read(dir, CA_KEY)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: dir.join(CA_KEY),
            what: format!("not a usable private key: {e}"),
        })?;
        let signing = certs(dir, CA_CERT, &cert_pem)?;
        // A rotation writes several files: a key read beside the previous
        // certificate must be refused, not used to sign certificates no peer accepts.
        let spki = x509_parser::parse_x509_certificate(&signing[0])
            .map(|(_, c)| c.public_key().raw.to_vec())
            .map_err(|e| CaError::Invalid {
                path: dir.join(CA_CERT),
                what: format!("not a parsable certificate: {e}"),
            })?;
        if spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(CaError::Invalid {
                path: dir.join(CA_KEY),
                what: format!("does not belong to the certificate in {CA_CERT}"),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&signing[0], key).map_err(|e| CaError::Invalid {
            path: dir.join(CA_CERT),
            what: format!("not a usable CA certificate: {e}"),
        })?;
        // The chain file lists the signing certificate up to the root. Peers have the
        // root already, so send everything but self-signed certificates.
        let chain = match read(dir, CERT_CHAIN) {
            Ok(pem) => certs(dir, CERT_CHAIN, &pem)?,
            Err(CaError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                signing
            }
            Err(e) => return Err(e),
        };
        let mut chain_to_root = chain.clone();
        if !chain_to_root.last().is_some_and(self_signed) {
            // Without a chain file, the root comes from the trust bundle's file.
            let roots = read(dir, ROOT_CERT)?;
            chain_to_root.extend(certs(dir, ROOT_CERT, &roots)?.into_iter().take(1));
        }
        let intermediates = chain.into_iter().filter(|c| !self_signed(c)).collect();
        Ok(Signer {
            issuer,
            intermediates,
            chain_to_root,
        })
    }

    /// The signing certificate up to and including its root.
    pub fn chain_to_root(&self) -> &[CertificateDer<'static>] {
        &self.chain_to_root
    }

    /// A fresh key and a certificate for `identity`, valid from now for `lifetime`.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = self.sign(identity, &key, lifetime)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: signed.chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            serial: signed.serial,
            not_before: signed.not_before,
            not_after: signed.not_after,
        })
    }

    /// A workload certificate for someone else's key (a CSR's): the signer, not
    /// the request, decides the name, usages and lifetime.
    pub fn sign(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<SignedCert, CaError> {
        let now = SystemTime::now();
        // Tolerate a little clock skew between nodes.
        let not_before = now - Duration::from_secs(60);
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(SignedCert {
            chain,
            serial: hex(&serial),
            not_before,
            not_after,
        })
    }

    /// A TLS server certificate for the CA service itself, for `dns_names`, with
    /// a fresh key: callers verify it with the mesh root, as they do peers.
    pub fn server_certificate(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())))
    }
}

/// A certificate as one PEM block, as Istio's certificate API carries it.
pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()))
}

/// Whether a certificate is its own issuer (a root).
pub fn self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

fn random_serial() -> [u8; 16] {
    use rustls::crypto::ring::default_provider;
    let mut serial = [0u8; 16];
    default_provider()
        .secure_random
        .fill(&mut serial)
        .expect("system randomness");
    // A positive INTEGER with no leading zero byte.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

/// Upper-case hex, as `openssl x509 -serial` prints serial numbers.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Lifetimes `ca init` gives the root and the intermediate.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Creates a root and an intermediate CA in `dir` for local and development use.
/// Refuses to overwrite an existing CA.
pub fn init(dir: &Path, trust_domain: &str) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context;
    for name in [CA_CERT, CA_KEY, ROOT_CERT, ROOT_KEY, CERT_CHAIN] {
        anyhow::ensure!(
            !dir.join(name).exists(),
            "{} already exists; refusing to replace a CA",
            dir.join(name).display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_params = |cn: String, lifetime: Duration, path_len: u8| {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nodemesh");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let root_params = ca_params(format!("{trust_domain} root CA"), ROOT_LIFETIME, 1);
    let root_cert = root_params.self_signed(&root_key)?;
    let root_pem = root_cert.pem();
    let root_key_pem = root_key.serialize_pem();
    let root = Issuer::new(root_params, root_key);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = ca_params(
        format!("{trust_domain} intermediate CA"),
        INTERMEDIATE_LIFETIME,
        0,
    );
    ca.use_authority_key_identifier_extension = true;
    let ca_cert = ca.signed_by(&ca_key, &root)?;
    let files = [
        (CA_CERT, ca_cert.pem()),
        (CA_KEY, ca_key.serialize_pem()),
        (ROOT_CERT, root_pem.clone()),
        (ROOT_KEY, root_key_pem),
        (CERT_CHAIN, format!("{}{}", ca_cert.pem(), root_pem)),
    ];
    let mut written = Vec::new();
    for (name, contents) in files {
        let path = dir.join(name);
        write_private(&path, &contents, name.ends_with("key.pem"))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn write_private(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_of;

    #[test]
    fn issued_certificates_chain_to_the_root_and_carry_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "cluster.local").unwrap();
        assert!(
            init(dir.path(), "cluster.local").is_err(),
            "must not overwrite"
        );
        let signer = Signer::load(dir.path()).unwrap();
        let bundle = load_trust_bundle(dir.path()).unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let cert = signer.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf and intermediate, no root");
        assert_eq!(identity_of(&cert.chain[0]).unwrap(), id);
        assert_eq!(cert.serial.len(), 32);

        // A rustls client verifier built on the bundle accepts it as a client certificate.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            bundle.roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(
                &cert.chain[0],
                &cert.chain[1..],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();

        // A CA from another `ca init` is not trusted.
        let other = tempfile::tempdir().unwrap();
        init(other.path(), "cluster.local").unwrap();
        let stranger = Signer::load(other.path())
            .unwrap()
            .issue(&id, Duration::from_secs(3600))
            .unwrap();
        assert!(
            verifier
                .verify_client_cert(
                    &stranger.chain[0],
                    &stranger.chain[1..],
                    rustls::pki_types::UnixTime::now()
                )
                .is_err()
        );
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(one.path(), "cluster.local").unwrap();
        init(two.path(), "cluster.local").unwrap();
        std::fs::copy(two.path().join(CA_KEY), one.path().join(CA_KEY)).unwrap();
        let err = Signer::load(one.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong to the certificate"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Signer::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ca-cert.pem"), "{err}");
    }
}
