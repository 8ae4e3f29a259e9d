//! `istio.v1.auth.IstioCertificateService`: Istio's CSR API (what istio-agent calls), translated
//! into an [`IssueRequest`] on the same signing core, authorization, ledger and audit path as
//! `meshca.v1`.

use std::sync::Arc;
use std::time::Duration;

use meshca_proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::grpc::caller_of;
use crate::issuance::{Face, IssueRequest, SigningCore};

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
            })
            .await
            .map_err(|e| crate::codes::issue(&e, Face::Istio))?;
        // Leaf, issuer, then the root the chain ends at.
        let root = issued
            .bundle
            .ids
            .iter()
            .position(|id| *id == issued.anchor)
            .and_then(|i| issued.bundle.anchors.get(i))
            .ok_or_else(|| Status::internal("the issuing anchor is not in the bundle"))?;
        let cert_chain = issued
            .chain
            .iter()
            .chain(std::iter::once(root))
            .map(|c| rotator::pki::pem_cert(c))
            .collect();
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
