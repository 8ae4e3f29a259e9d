//! `io.linkerd.proxy.identity.Identity/Certify`: Linkerd's identity API (what linkerd2-proxy
//! calls), translated into an [`IssueRequest`] on the same signing core, authorization, ledger and
//! audit path as `meshca.v1`.
//!
//! A Linkerd identity is DNS-form: `<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<td>`.
//! It maps to the SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`, which authorization checks (a token
//! for `ns/<ns>/sa/*` may certify that workload). The leaf carries both: the DNS SAN Linkerd
//! proxies verify by, and the SPIFFE URI SAN (so the same leaf is a valid X.509-SVID for
//! SPIFFE-aware peers; Linkerd ignores it).
//!
//! Status codes as Linkerd's identity controller uses them ([`crate::faces::codes::Mapping::Linkerd`]):
//! `InvalidArgument` for a malformed request (no identity, no token, no CSR, a CSR that does not
//! parse or verify, a key that is not ECDSA, a CA requested), `FailedPrecondition` when the CSR's
//! names do not match the identity (another DNS name, a URI/IP/email SAN, two names) or
//! authentication/authorization fails, `Unavailable` when no issuer can sign.

use std::sync::Arc;
use std::time::SystemTime;

use linkerd2_proxy_api::identity::identity_server::Identity;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use rotator::spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use crate::issuing::auth::Credentials;
use crate::issuing::issuance::{Face, IssueRequest, SigningCore};
use crate::process::tls::PeerInfo;

/// The Linkerd face.
pub struct Linkerd {
    issuer: Arc<SigningCore>,
    control_plane_ns: String,
}

impl Linkerd {
    /// A face issuing through `issuer`, for identities under `control_plane_ns`.
    pub fn new(issuer: Arc<SigningCore>, control_plane_ns: String) -> Self {
        Self {
            issuer,
            control_plane_ns,
        }
    }
}

/// The SPIFFE ID of a Linkerd identity in trust domain `td`, or why it is not one.
pub fn spiffe_id_of(identity: &str, control_plane_ns: &str, td: &str) -> Result<SpiffeId, String> {
    let suffix = format!(".serviceaccount.identity.{control_plane_ns}.{td}");
    let lower = identity.to_ascii_lowercase();
    let head = lower
        .strip_suffix(&suffix)
        .ok_or_else(|| format!("identity {identity:?} is not <sa>.<ns>{suffix}"))?;
    // Namespaces are DNS labels (no dots); service-account names may hold dots.
    let (sa, ns) = head
        .rsplit_once('.')
        .ok_or_else(|| format!("identity {identity:?} has no <sa>.<ns> before {suffix}"))?;
    format!("spiffe://{td}/ns/{ns}/sa/{sa}")
        .parse()
        .map_err(|e| format!("identity {identity:?}: {e}"))
}

#[tonic::async_trait]
impl Identity for Linkerd {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        if req.identity.is_empty() {
            return Err(Status::invalid_argument("missing identity"));
        }
        if req.token.is_empty() {
            return Err(Status::invalid_argument("missing token"));
        }
        if req.certificate_signing_request.is_empty() {
            return Err(Status::invalid_argument(
                "missing certificate signing request",
            ));
        }
        let token = std::str::from_utf8(&req.token)
            .map_err(|_| Status::invalid_argument("the token is not UTF-8"))?
            .trim();
        let td = self
            .issuer
            .authority()
            .snapshot()
            .bundle
            .trust_domain
            .to_string();
        let id = spiffe_id_of(&req.identity, &self.control_plane_ns, &td)
            .map_err(Status::invalid_argument)?;
        let authorization = format!("Bearer {token}");
        let issued = self
            .issuer
            .issue(IssueRequest {
                api: Face::Linkerd,
                csr: &req.certificate_signing_request,
                ttl: None,
                credentials: Credentials {
                    authorization: Some(&authorization),
                    client_cert: None,
                    client_intermediates: &[],
                },
                peer: peer.as_ref().map(|p| p.addr),
                instance_id: None,
                dns_identity: Some((&req.identity, &id)),
                impersonate: None,
            })
            .await
            .map_err(|e| crate::faces::codes::issue(&e, Face::Linkerd))?;
        let mut chain = issued.chain.into_iter();
        let leaf = chain
            .next()
            .ok_or_else(|| Status::internal("empty chain"))?;
        Ok(Response::new(CertifyResponse {
            leaf_certificate: leaf.to_vec(),
            intermediate_certificates: chain.map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp::from(SystemTime::from(
                issued.not_after,
            ))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linkerd_identities_map_to_spiffe_ids() {
        let ok = |i: &str| spiffe_id_of(i, "linkerd", "cluster.local").map(|s| s.to_string());
        assert_eq!(
            ok("web.emojivoto.serviceaccount.identity.linkerd.cluster.local").unwrap(),
            "spiffe://cluster.local/ns/emojivoto/sa/web"
        );
        assert_eq!(
            ok("my.dotted.sa.prod.serviceaccount.identity.linkerd.cluster.local").unwrap(),
            "spiffe://cluster.local/ns/prod/sa/my.dotted.sa"
        );
        for bad in [
            "web.emojivoto.serviceaccount.identity.other.cluster.local",
            "web.serviceaccount.identity.linkerd.cluster.local",
            "web.emojivoto.cluster.local",
            "",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }
}
