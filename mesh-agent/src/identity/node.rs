//! The node's identity machinery: the certificate manager for its workloads,
//! where their certificates come from (the mesh CA service, or local CA files),
//! and the trust bundle peers must chain to.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::identity::ca::{
    CA_CERT, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT, Signer, trust_bundle_from_pem,
};
use crate::identity::manager::{CertManager, CertPolicy, CertState, CertificateSource, IssueError};
use crate::identity::remote::{CaServiceSettings, RemoteCa};
use crate::identity::{Identity, TrustBundle, WorkloadCert};
use crate::metrics::Metrics;

/// Where workload certificates come from and how they are requested.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// The issuer.
    pub issuer: IssuerSettings,
    /// Requested certificate lifetime and retry policy.
    pub policy: CertPolicy,
}

/// Who signs the node's workload certificates.
#[derive(Debug, Clone)]
pub enum IssuerSettings {
    /// The agent signs them itself with the CA files in this directory (Istio's
    /// `cacerts` layout): for VMs and development, as the key is then on the node.
    Local {
        /// The directory.
        ca_dir: PathBuf,
    },
    /// The mesh CA service (or istiod) signs them; the node holds only the roots.
    Service(CaServiceSettings),
}

impl IssuerSettings {
    /// The file holding the roots peers must chain to.
    pub fn root_file(&self) -> PathBuf {
        match self {
            IssuerSettings::Local { ca_dir } => ca_dir.join(ROOT_CERT),
            IssuerSettings::Service(s) => s.root_file.clone(),
        }
    }

    /// The directory to watch for changes (a Secret or ConfigMap mount swaps
    /// its files through a `..data` link, so the directory is what changes).
    pub fn watched_dir(&self) -> PathBuf {
        match self {
            IssuerSettings::Local { ca_dir } => ca_dir.clone(),
            IssuerSettings::Service(s) => s
                .root_file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        }
    }
}

/// The signing CA in force; replaced when its files change (a rotation).
struct CurrentSigner(RwLock<Arc<Signer>>);

impl CertificateSource for CurrentSigner {
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> BoxFuture<'static, Result<WorkloadCert, IssueError>> {
        let signer = self.0.read().expect("signer lock").clone();
        CertificateSource::issue(signer.as_ref(), identity, lifetime)
    }
}

/// The issuer in use, kept to apply reloads to it.
enum Issuer {
    Local(Arc<CurrentSigner>),
    Service(Arc<RemoteCa>),
}

/// The node's identity machinery: certificates and the roots peers must chain to.
pub struct IdentityState {
    /// Owns every workload certificate.
    pub certs: CertManager,
    /// Current trust bundle; replaced when the root file changes.
    pub trust: RwLock<TrustBundle>,
    settings: IssuerSettings,
    issuer: Issuer,
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

/// Reads the trust bundle from a root file (several roots during a rotation).
fn load_roots(file: &Path) -> Result<(Vec<u8>, TrustBundle), CaError> {
    let bytes = std::fs::read(file).map_err(|source| CaError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let bundle = trust_bundle_from_pem(file, &bytes)?;
    Ok((bytes, bundle))
}

impl IdentityState {
    /// Loads the trust bundle and the issuer, and starts the certificate manager.
    pub fn start(settings: &IdentitySettings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let root_file = settings.issuer.root_file();
        let (roots, trust) = load_roots(&root_file)?;
        let (issuer, source, signing): (Issuer, Arc<dyn CertificateSource>, Vec<u8>) =
            match &settings.issuer {
                IssuerSettings::Local { ca_dir } => {
                    let signer =
                        Arc::new(CurrentSigner(RwLock::new(Arc::new(Signer::load(ca_dir)?))));
                    let signing = signing_bytes(ca_dir).unwrap_or_default();
                    (Issuer::Local(signer.clone()), signer, signing)
                }
                IssuerSettings::Service(service) => {
                    let remote = Arc::new(RemoteCa::new(
                        service.clone(),
                        &roots,
                        trust.clone(),
                        metrics.clone(),
                    )?);
                    (Issuer::Service(remote.clone()), remote, Vec::new())
                }
            };
        metrics.ca_healthy.set(1);
        Ok(IdentityState {
            certs: CertManager::spawn(source, settings.policy.clone(), metrics.clone()),
            trust: RwLock::new(trust),
            settings: settings.issuer.clone(),
            issuer,
            loaded: Mutex::new(Loaded { roots, signing }),
            error: Mutex::new(None),
            metrics,
        })
    }

    /// The directory whose changes call for a [`IdentityState::reload`].
    pub fn watched_dir(&self) -> PathBuf {
        self.settings.watched_dir()
    }

    /// Re-reads the root file (and the local CA files), changing only what
    /// changed: a new trust bundle (a root rotation's overlap adds a root, its
    /// end removes one) is used for new handshakes, and every workload
    /// certificate is requested again, so the node follows a CA that moved on; a
    /// new local signing CA re-issues every certificate. Files that are missing
    /// or bad are reported (log, metric, readiness body) and what was loaded
    /// before stays in use: traffic never stops for it.
    pub fn reload(&self) {
        let mut loaded = self.loaded.lock().expect("loaded lock");
        let mut problems = Vec::new();
        let mut renew = false;
        let root_file = self.settings.root_file();
        match std::fs::read(&root_file) {
            Ok(roots) if roots == loaded.roots => {}
            Ok(roots) => match trust_bundle_from_pem(&root_file, &roots) {
                Ok(bundle) => {
                    let applied = match &self.issuer {
                        Issuer::Service(remote) => remote.set_roots(&roots, bundle.clone()),
                        Issuer::Local(_) => Ok(()),
                    };
                    match applied {
                        Ok(()) => {
                            tracing::info!(roots = bundle.roots.len(), "trust bundle reloaded");
                            *self.trust.write().expect("trust lock") = bundle;
                            loaded.roots = roots;
                            renew = matches!(self.issuer, Issuer::Service(_));
                        }
                        Err(e) => problems.push(format!("{e:#}")),
                    }
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(format!("{}: {e}", root_file.display())),
        }
        if let (Issuer::Local(signer), IssuerSettings::Local { ca_dir }) =
            (&self.issuer, &self.settings)
        {
            match signing_bytes(ca_dir) {
                Ok(bytes) if bytes == loaded.signing => {}
                Ok(bytes) => match Signer::load(ca_dir) {
                    Ok(new) => {
                        *signer.0.write().expect("signer lock") = Arc::new(new);
                        loaded.signing = bytes;
                        tracing::info!(
                            "signing CA reloaded; re-issuing every workload certificate"
                        );
                        renew = true;
                    }
                    Err(e) => problems.push(e.to_string()),
                },
                Err(e) => problems.push(format!("signing CA in {}: {e}", ca_dir.display())),
            }
        }
        if renew {
            self.certs.renew_all();
        }
        let mut error = self.error.lock().expect("CA error lock");
        if problems.is_empty() {
            if error.take().is_some() {
                tracing::info!("mesh CA files usable again");
            }
            if matches!(self.issuer, Issuer::Local(_)) {
                self.metrics.ca_healthy.set(1);
            }
        } else {
            let message = problems.join("; ");
            tracing::error!(error = %message, "mesh CA files unusable; serving on with the roots and certificates loaded before");
            self.metrics.ca_healthy.set(0);
            *error = Some(message);
        }
    }

    /// What is wrong with the node's identity supply, if anything: unusable CA
    /// files, an unreachable CA service, or certificates that fail to renew.
    pub fn error(&self) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(e) = self.error.lock().expect("CA error lock").clone() {
            problems.push(e);
        }
        if let Issuer::Service(remote) = &self.issuer
            && let Some(e) = remote.unreachable()
        {
            problems.push(format!("CA service unreachable: {e}"));
        }
        let snapshot = self.certs.snapshot();
        let failing: Vec<_> = snapshot
            .iter()
            .filter(|(_, s)| matches!(s.state, CertState::RenewalFailing | CertState::Failed))
            .collect();
        if let Some((id, status)) = failing.first() {
            problems.push(format!(
                "{} certificate(s) failing to renew (e.g. {id}: {})",
                failing.len(),
                status.last_error.as_deref().unwrap_or("unknown")
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// The current trust bundle.
    pub fn trust(&self) -> TrustBundle {
        self.trust.read().expect("trust lock").clone()
    }
}
