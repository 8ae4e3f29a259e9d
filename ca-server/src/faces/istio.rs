//! `istio.v1.auth.IstioCertificateService`: Istio's CSR API (what istio-agent calls), translated
//! into an [`IssueRequest`] on the same signing core, authorization, ledger and audit path as
//! `meshca.v1`.

use std::sync::Arc;
use std::time::Duration;

use meshca_proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use crate::issuing::auth::Credentials;
use crate::issuing::issuance::{Face, IssueRequest, SigningCore};
use crate::process::tls::caller_of;

/// The request metadata key a node agent (ztunnel) names the workload with.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The workload a node agent asks for: `metadata.ImpersonatedIdentity`, a string field of the
/// request's `google.protobuf.Struct` (empty or absent: the caller asks for itself). Any other
/// kind of value is refused, not ignored.
fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<&str>, Status> {
    use prost_types::value::Kind;
    let Some(v) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &v.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s)),
        Some(Kind::NullValue(_)) | None => Ok(None),
        Some(_) => Err(Status::invalid_argument(format!(
            "metadata.{IMPERSONATED_IDENTITY} must be a string (a SPIFFE ID)"
        ))),
    }
}

/// The Istio face.
pub struct Istio {
    issuer: Arc<SigningCore>,
}

impl Istio {
    /// A face issuing through `issuer`.
    pub fn new(issuer: Arc<SigningCore>) -> Self {
        Self { issuer }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Istio {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let (peer, authorization) = caller_of(&request);
        let req = request.into_inner();
        let impersonate = impersonated_identity(req.metadata.as_ref())?;
        // Istio: 0 or less means the CA's default.
        let ttl = u64::try_from(req.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let issued = self
            .issuer
            .issue(IssueRequest {
                api: Face::Istio,
                csr: req.csr.as_bytes(),
                ttl,
                credentials: Credentials {
                    authorization: authorization.as_deref(),
                    client_cert: peer.as_ref().and_then(|p| p.client_cert.as_ref()),
                    client_intermediates: peer
                        .as_ref()
                        .map_or(&[][..], |p| &p.client_intermediates),
                },
                peer: peer.as_ref().map(|p| p.addr),
                instance_id: None,
                dns_identity: None,
                impersonate,
            })
            .await
            .map_err(|e| crate::faces::codes::issue(&e, Face::Istio))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: cert_chain(&issued)?,
        }))
    }
}

/// Leaf, issuer, then every anchor of the bundle at signing time in one element, in bundle
/// order. istio-agent and ztunnel take the last element as the workload's trust roots (istiod
/// puts its whole root bundle there), so a staged anchor must be in it: with only the issuing
/// anchor, workloads renewed under the new anchor and those still on the old one would refuse
/// each other after `activate`.
pub fn cert_chain(issued: &crate::issuing::issuance::Issued) -> Result<Vec<String>, Status> {
    if !issued.bundle.ids.contains(&issued.anchor) {
        return Err(Status::internal("the issuing anchor is not in the bundle"));
    }
    let roots: String = issued
        .bundle
        .anchors
        .iter()
        .map(|a| rotator::pki::pem_cert(a))
        .collect();
    Ok(issued
        .chain
        .iter()
        .map(|c| rotator::pki::pem_cert(c))
        .chain(std::iter::once(roots))
        .collect())
}
