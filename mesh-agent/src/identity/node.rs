//! The node's identity machinery: the certificate manager for its workloads and
//! the trust bundle peers must chain to, loaded from the mesh CA directory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::identity::TrustBundle;
use crate::identity::ca::{CaError, ROOT_CERT, Signer, load_trust_bundle};
use crate::identity::manager::{CertManager, CertPolicy};
use crate::metrics::Metrics;

/// Where the mesh CA lives and how workload certificates are made.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Directory in Istio's `cacerts` layout.
    pub ca_dir: PathBuf,
    /// Requested certificate lifetime and retry policy.
    pub policy: CertPolicy,
}

/// The node's identity machinery: certificates and the roots peers must chain to.
pub struct IdentityState {
    /// Owns every workload certificate.
    pub certs: CertManager,
    /// Current trust bundle; replaced when `root-cert.pem` changes.
    pub trust: RwLock<TrustBundle>,
    /// Where the CA files are, for reloads.
    pub ca_dir: PathBuf,
    /// The trust bundle file as last loaded: a reload that finds the same bytes
    /// changes nothing (the directory sees writes that do not change it).
    loaded_roots: Mutex<Vec<u8>>,
}

impl IdentityState {
    /// Loads the CA and trust bundle and starts the certificate manager.
    pub fn start(settings: &IdentitySettings, metrics: Arc<Metrics>) -> Result<Self, CaError> {
        let signer = Signer::load(&settings.ca_dir)?;
        let loaded = std::fs::read(settings.ca_dir.join(ROOT_CERT)).unwrap_or_default();
        let trust = load_trust_bundle(&settings.ca_dir)?;
        Ok(IdentityState {
            certs: CertManager::spawn(Arc::new(signer), settings.policy.clone(), metrics),
            trust: RwLock::new(trust),
            ca_dir: settings.ca_dir.clone(),
            loaded_roots: Mutex::new(loaded),
        })
    }

    /// Re-reads the trust bundle if its file changed; a bad file is logged and
    /// the previous bundle kept.
    pub fn reload_trust(&self) {
        let current = std::fs::read(self.ca_dir.join(ROOT_CERT)).ok();
        let mut loaded = self.loaded_roots.lock().expect("roots lock");
        if current.as_ref() == Some(&*loaded) {
            tracing::debug!("trust bundle file unchanged; nothing to reload");
            return;
        }
        match load_trust_bundle(&self.ca_dir) {
            Ok(bundle) => {
                tracing::info!(roots = bundle.roots.len(), "trust bundle reloaded");
                *self.trust.write().expect("trust lock") = bundle;
                *loaded = current.unwrap_or_default();
            }
            Err(e) => {
                tracing::error!(error = %e, "trust bundle not reloaded; keeping the previous one")
            }
        }
    }

    /// The current trust bundle.
    pub fn trust(&self) -> TrustBundle {
        self.trust.read().expect("trust lock").clone()
    }
}
