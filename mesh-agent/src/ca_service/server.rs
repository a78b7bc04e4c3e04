//! The gRPC handler of Istio's `CreateCertificate`: authenticate the caller,
//! decide, sign, and log and count every answer.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};

use super::authorize::{Asked, Decision, DenyCode, Policy, decide};
use super::pods::PodIndex;
use super::review;
use crate::identity::ca::{Signer, to_pem};
use crate::identity::istio_ca::{
    IstioCertificateRequest, IstioCertificateResponse, TOKEN_AUDIENCE, impersonated_identity,
    istio_certificate_service_server::IstioCertificateService,
};

/// The CA service's counters, served on its `/metrics`.
#[derive(Default)]
pub struct CaMetrics {
    /// Answers by result: signed, unauthenticated, permission_denied,
    /// invalid_argument, unavailable.
    pub requests: Family<ResultLabel, Counter>,
    /// 1 while the signing CA files are usable as last read.
    pub signer_healthy: Gauge,
    /// Running pods known to the node authorizer.
    pub pods: Gauge,
}

/// The `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// How the request was answered.
    pub result: &'static str,
}

impl CaMetrics {
    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabel { result }).inc();
    }

    /// Requests answered with `result` so far.
    pub fn answered(&self, result: &'static str) -> u64 {
        self.requests.get_or_create(&ResultLabel { result }).get()
    }

    /// Registers the metrics with their names.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "nodemesh_ca_requests",
            "Certificate requests answered by the CA service, by result",
            self.requests.clone(),
        );
        registry.register(
            "nodemesh_ca_signer_healthy",
            "1 while the signing CA files are usable as last read (0: serving with the CA loaded before)",
            self.signer_healthy.clone(),
        );
        registry.register(
            "nodemesh_ca_known_pods",
            "Running pods known to the node authorizer",
            self.pods.clone(),
        );
    }
}

/// The service: the only holder of the signing key.
pub struct CaService {
    /// Who may ask for what.
    pub policy: Policy,
    /// Longest certificate lifetime granted.
    pub max_lifetime: Duration,
    /// The signer in force; replaced on rotation.
    pub signer: Arc<RwLock<Arc<Signer>>>,
    /// Which pods run where.
    pub pods: Arc<PodIndex>,
    /// Reviews tokens.
    pub client: kube::Client,
    /// Counts answers.
    pub metrics: Arc<CaMetrics>,
}

/// Shortest certificate lifetime granted: a shorter request gets this.
const MIN_LIFETIME: Duration = Duration::from_secs(10);

fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned()).filter(|t| !t.is_empty())
}

impl CaService {
    fn refuse(
        &self,
        status: Status,
        result: &'static str,
        caller: &str,
        node: Option<&str>,
        identity: &str,
    ) -> Status {
        self.metrics.count(result);
        tracing::warn!(
            caller = %caller,
            node = %node.unwrap_or("-"),
            identity = %identity,
            result = %result,
            reason = %status.message(),
            "certificate request refused; nothing signed"
        );
        status
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let Some(token) = bearer(&request) else {
            return Err(self.refuse(
                Status::unauthenticated("no bearer token"),
                "unauthenticated",
                "-",
                None,
                "-",
            ));
        };
        let body = request.into_inner();
        let asked_for = match impersonated_identity(body.metadata.as_ref()) {
            Ok(id) => id.map(str::to_owned),
            Err(e) => {
                return Err(self.refuse(
                    Status::invalid_argument(e),
                    "invalid_argument",
                    "-",
                    None,
                    "-",
                ));
            }
        };
        let shown = asked_for.as_deref().unwrap_or("(own)");
        let caller = match review::review(&self.client, &token, TOKEN_AUDIENCE).await {
            Ok(Ok(caller)) => caller,
            Ok(Err(reason)) => {
                return Err(self.refuse(
                    Status::unauthenticated(format!("token rejected: {reason}")),
                    "unauthenticated",
                    "-",
                    None,
                    shown,
                ));
            }
            Err(e) => {
                return Err(self.refuse(
                    Status::unavailable(format!("token review failed: {e}")),
                    "unavailable",
                    "-",
                    None,
                    shown,
                ));
            }
        };
        let caller_name = caller.service_account.to_string();
        if !self.pods.synced() {
            return Err(self.refuse(
                Status::unavailable("the CA has not listed pods yet"),
                "unavailable",
                &caller_name,
                None,
                shown,
            ));
        }
        let csr = match CertificateSigningRequestParams::from_pem(&body.csr) {
            Ok(csr) => csr,
            Err(e) => {
                return Err(self.refuse(
                    Status::invalid_argument(format!("CSR unusable: {e}")),
                    "invalid_argument",
                    &caller_name,
                    None,
                    shown,
                ));
            }
        };
        let mut asked = Asked {
            impersonated: asked_for.as_deref(),
            ..Asked::default()
        };
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) => asked.csr_uris.push(uri.as_str().to_owned()),
                _ => asked.csr_other_names += 1,
            }
        }
        let mut decision = decide(&self.policy, &caller, &asked, self.pods.as_ref());
        if let (Decision::Deny(denial), Some(bound), Some(requested)) =
            (&decision, &caller.pod, asked.impersonated)
            && denial.code == DenyCode::PermissionDenied
            && self.policy.node_agents.contains(&caller.service_account)
            && let Ok(requested) = requested.parse::<crate::identity::Identity>()
        {
            // The watch may lag a pod that just started: ask the API itself.
            match self
                .pods
                .refresh(
                    &self.client,
                    &caller.service_account.namespace,
                    &bound.name,
                    &requested.namespace,
                )
                .await
            {
                Ok(()) => decision = decide(&self.policy, &caller, &asked, self.pods.as_ref()),
                Err(e) => {
                    tracing::warn!(error = %e, "re-reading pods for a refused request failed")
                }
            }
        }
        let (identity, node) = match decision {
            Decision::Sign { identity, node } => (identity, node),
            Decision::Deny(denial) => {
                let (status, result) = match denial.code {
                    DenyCode::PermissionDenied => (
                        Status::permission_denied(denial.reason),
                        "permission_denied",
                    ),
                    DenyCode::InvalidArgument => {
                        (Status::invalid_argument(denial.reason), "invalid_argument")
                    }
                };
                return Err(self.refuse(
                    status,
                    result,
                    &caller_name,
                    denial.node.as_deref(),
                    shown,
                ));
            }
        };
        let requested = u64::try_from(body.validity_duration).unwrap_or(0);
        let lifetime = match requested {
            0 => self.max_lifetime,
            secs => Duration::from_secs(secs).clamp(MIN_LIFETIME, self.max_lifetime),
        };
        let signer = self.signer.read().expect("signer lock").clone();
        let signed = signer
            .sign(&identity, &csr.public_key, lifetime)
            .map_err(|e| {
                self.refuse(
                    Status::internal(format!("signing failed: {e}")),
                    "error",
                    &caller_name,
                    node.as_deref(),
                    shown,
                )
            })?;
        self.metrics.count("signed");
        tracing::info!(
            caller = %caller_name,
            node = %node.as_deref().unwrap_or("-"),
            identity = %identity,
            serial = %signed.serial,
            lifetime = ?lifetime,
            "certificate signed"
        );
        let mut cert_chain = vec![to_pem(&signed.chain[0])];
        cert_chain.extend(signer.chain_to_root().iter().map(to_pem));
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
