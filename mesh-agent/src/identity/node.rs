//! The node's identity machinery: the certificate manager for its workloads and
//! the trust bundle peers must chain to, loaded from the mesh CA directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::identity::ca::{
    CA_CERT, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT, Signer, load_trust_bundle,
};
use crate::identity::manager::{CertManager, CertPolicy, CertificateSource};
use crate::identity::{Identity, TrustBundle, WorkloadCert};
use crate::metrics::Metrics;

/// Where the mesh CA lives and how workload certificates are made.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Directory in Istio's `cacerts` layout.
    pub ca_dir: PathBuf,
    /// Requested certificate lifetime and retry policy.
    pub policy: CertPolicy,
}

/// The signing CA in force; replaced when its files change (a rotation).
struct CurrentSigner(RwLock<Arc<Signer>>);

impl CertificateSource for CurrentSigner {
    fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let signer = self.0.read().expect("signer lock").clone();
        signer.issue(identity, lifetime)
    }
}

/// The node's identity machinery: certificates and the roots peers must chain to.
pub struct IdentityState {
    /// Owns every workload certificate.
    pub certs: CertManager,
    /// Current trust bundle; replaced when `root-cert.pem` changes.
    pub trust: RwLock<TrustBundle>,
    /// Where the CA files are, for reloads.
    pub ca_dir: PathBuf,
    signer: Arc<CurrentSigner>,
    /// The files as last loaded: a reload that finds the same bytes changes
    /// nothing (the directory sees writes that do not change it).
    loaded: Mutex<Loaded>,
    /// Why the CA files could not be used at the last reload (shown by
    /// `/healthz/ready`); the agent serves on with what it loaded before.
    error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Loaded {
    roots: Vec<u8>,
    signing: Vec<u8>,
}

/// The signing CA's files, concatenated: what decides whether the signer changed.
fn signing_bytes(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(dir.join(CA_CERT))?;
    bytes.extend(std::fs::read(dir.join(CA_KEY))?);
    // The chain file is optional: the certificate alone is then the chain.
    match std::fs::read(dir.join(CERT_CHAIN)) {
        Ok(chain) => bytes.extend(chain),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(bytes)
}

impl IdentityState {
    /// Loads the CA and trust bundle and starts the certificate manager.
    pub fn start(settings: &IdentitySettings, metrics: Arc<Metrics>) -> Result<Self, CaError> {
        let signer = Arc::new(CurrentSigner(RwLock::new(Arc::new(Signer::load(
            &settings.ca_dir,
        )?))));
        let loaded = Loaded {
            roots: std::fs::read(settings.ca_dir.join(ROOT_CERT)).unwrap_or_default(),
            signing: signing_bytes(&settings.ca_dir).unwrap_or_default(),
        };
        let trust = load_trust_bundle(&settings.ca_dir)?;
        metrics.ca_healthy.set(1);
        Ok(IdentityState {
            certs: CertManager::spawn(signer.clone(), settings.policy.clone(), metrics.clone()),
            trust: RwLock::new(trust),
            ca_dir: settings.ca_dir.clone(),
            signer,
            loaded: Mutex::new(loaded),
            error: Mutex::new(None),
            metrics,
        })
    }

    /// Re-reads the CA directory, changing only what changed: a new trust bundle
    /// (a root rotation's overlap adds a root, its end removes one) is used for
    /// new handshakes; a new signing CA re-issues every workload certificate.
    /// Files that are missing or bad are reported (log, metric, readiness body)
    /// and what was loaded before stays in use: traffic never stops for it.
    pub fn reload(&self) {
        let mut loaded = self.loaded.lock().expect("loaded lock");
        let mut problems = Vec::new();
        match std::fs::read(self.ca_dir.join(ROOT_CERT)) {
            Ok(roots) if roots == loaded.roots => {}
            Ok(roots) => match load_trust_bundle(&self.ca_dir) {
                Ok(bundle) => {
                    tracing::info!(roots = bundle.roots.len(), "trust bundle reloaded");
                    *self.trust.write().expect("trust lock") = bundle;
                    loaded.roots = roots;
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(format!("{}: {e}", self.ca_dir.join(ROOT_CERT).display())),
        }
        match signing_bytes(&self.ca_dir) {
            Ok(bytes) if bytes == loaded.signing => {}
            Ok(bytes) => match Signer::load(&self.ca_dir) {
                Ok(signer) => {
                    *self.signer.0.write().expect("signer lock") = Arc::new(signer);
                    loaded.signing = bytes;
                    tracing::info!("signing CA reloaded; re-issuing every workload certificate");
                    self.certs.renew_all();
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(format!("signing CA in {}: {e}", self.ca_dir.display())),
        }
        let mut error = self.error.lock().expect("CA error lock");
        if problems.is_empty() {
            if error.take().is_some() {
                tracing::info!("mesh CA files usable again");
            }
            self.metrics.ca_healthy.set(1);
        } else {
            let message = problems.join("; ");
            tracing::error!(error = %message, "mesh CA files unusable; serving on with the CA and certificates loaded before");
            self.metrics.ca_healthy.set(0);
            *error = Some(message);
        }
    }

    /// Why the CA files were unusable at the last reload, if they were.
    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("CA error lock").clone()
    }

    /// The current trust bundle.
    pub fn trust(&self) -> TrustBundle {
        self.trust.read().expect("trust lock").clone()
    }
}
