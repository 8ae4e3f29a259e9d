//! `meshca.v1.IdentityService`: translates gRPC requests into [`IssueRequest`]s and results into
//! responses (errors become statuses in [`crate::faces::codes`]); [`serve`] runs every face on the
//! TLS port.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use meshca_proto::v1::identity_service_server::IdentityService;
use meshca_proto::v1::{
    GetTrustBundleRequest, SignCertificateRequest, SignCertificateResponse, TrustBundle,
    WatchTrustBundleRequest,
};
use tonic::{Request, Response, Status};

use http_body_util::BodyExt;
use linkerd2_proxy_api::identity::identity_server::IdentityServer;
use meshca_proto::istio::istio_certificate_service_server::IstioCertificateServiceServer;
use meshca_proto::v1::identity_service_server::IdentityServiceServer;

use crate::authority::{Authority, Bundle};
use crate::issuing::auth::Credentials;
use crate::issuing::issuance::{Face, IssueRequest, SigningCore};
use crate::issuing::limits::{CountStreams, Limits, WatchPeer};
use crate::process::config::{Config, LimitsConfig, MAX_REQUEST_BYTES};
use crate::process::tls::{PeerInfo, TlsConn, caller_of};

/// Longest accepted `instance_id`.
pub const MAX_INSTANCE_ID: usize = 128;

/// The meshca.v1 identity service.
pub struct MeshcaV1 {
    issuer: Arc<SigningCore>,
    authority: Arc<Authority>,
    limits: Arc<Limits>,
}

impl MeshcaV1 {
    /// A service issuing through `issuer`, its watch streams bounded by `limits`.
    pub fn new(issuer: Arc<SigningCore>, limits: Arc<Limits>) -> Self {
        let authority = issuer.authority().clone();
        Self {
            issuer,
            authority,
            limits,
        }
    }
}

/// The gRPC services on the one TLS port: `meshca.v1` always, the Istio and Linkerd faces
/// when enabled.
pub struct Faces {
    native: IdentityServiceServer<MeshcaV1>,
    istio: Option<IstioCertificateServiceServer<crate::faces::istio::Istio>>,
    linkerd: Option<IdentityServer<crate::faces::linkerd::Linkerd>>,
}

impl Faces {
    /// The faces `config` enables, all issuing through `issuer`.
    pub fn of(config: &Config, issuer: &Arc<SigningCore>, limits: &Arc<Limits>) -> Self {
        Self {
            native: IdentityServiceServer::new(MeshcaV1::new(issuer.clone(), limits.clone())),
            istio: config.istio.enabled.then(|| {
                IstioCertificateServiceServer::new(crate::faces::istio::Istio::new(issuer.clone()))
            }),
            linkerd: config.linkerd.enabled.then(|| {
                IdentityServer::new(crate::faces::linkerd::Linkerd::new(
                    issuer.clone(),
                    config.linkerd.control_plane_namespace.clone(),
                ))
            }),
        }
    }
}

/// Serves `faces` over the TLS connections `conns` until `stop`, with the HTTP/2 limits of
/// `[limits]`: streams per connection, keepalive pings, a maximum connection age (with grace)
/// so that long-lived connections re-handshake, and a deadline on every request.
pub async fn serve(
    conns: impl Stream<Item = Result<TlsConn, std::io::Error>> + Send + 'static,
    faces: Faces,
    limits: &LimitsConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let r = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.max_connection_age_grace)
        .timeout(limits.request_timeout)
        .layer(CountStreams(crate::process::tls::activity_of))
        .layer(tower::util::MapRequestLayer::new(limit_request_body))
        .add_service(faces.native)
        .add_optional_service(faces.istio)
        .add_optional_service(faces.linkerd)
        .serve_with_incoming_shutdown(conns, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!("gRPC server stopped: {e}");
    }
}

fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::from(t))
}

fn trust_bundle(b: &Bundle) -> TrustBundle {
    TrustBundle {
        trust_domain: b.trust_domain.to_string(),
        anchors: b.anchors.iter().map(|a| a.to_vec()).collect(),
        version: b.version,
        renew_now: false,
        federated: b
            .federated
            .iter()
            .map(|f| meshca_proto::v1::FederatedBundle {
                trust_domain: f.trust_domain.to_string(),
                anchors: f.anchors.iter().map(|a| a.to_vec()).collect(),
                sequence: f.sequence,
            })
            .collect(),
    }
}

fn check_instance_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_INSTANCE_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "instance_id must be at most {MAX_INSTANCE_ID} bytes of printable ASCII"
        )));
    }
    Ok(())
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl IdentityService for MeshcaV1 {
    async fn sign_certificate(
        &self,
        request: Request<SignCertificateRequest>,
    ) -> Result<Response<SignCertificateResponse>, Status> {
        let (peer, authorization) = caller_of(&request);
        let req = request.into_inner();
        check_instance_id(&req.instance_id)?;
        let ttl = match req.ttl {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument("ttl must not be negative"));
            }
            Some(d) => Some(Duration::new(
                u64::try_from(d.seconds).unwrap_or(0),
                u32::try_from(d.nanos).unwrap_or(0),
            )),
        };
        let issued = self
            .issuer
            .issue(IssueRequest {
                api: Face::Meshca,
                csr: &req.csr,
                ttl,
                credentials: Credentials {
                    authorization: authorization.as_deref(),
                    client_cert: peer.as_ref().and_then(|p| p.client_cert.as_ref()),
                    client_intermediates: peer
                        .as_ref()
                        .map_or(&[][..], |p| &p.client_intermediates),
                },
                peer: peer.as_ref().map(|p| p.addr),
                instance_id: Some(req.instance_id.as_str()),
                dns_identity: None,
                impersonate: None,
            })
            .await
            .map_err(|e| crate::faces::codes::issue(&e, Face::Meshca))?;
        Ok(Response::new(SignCertificateResponse {
            certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: issued.bundle.anchors.iter().map(|a| a.to_vec()).collect(),
            bundle_version: issued.bundle.version,
            not_after: Some(timestamp(issued.not_after)),
            refresh_at: Some(timestamp(issued.refresh_at)),
            serial: issued.serial,
            spiffe_id: issued.id.to_string(),
        }))
    }

    async fn get_trust_bundle(
        &self,
        _: Request<GetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        Ok(Response::new(trust_bundle(
            &self.authority.snapshot().bundle,
        )))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        check_instance_id(&request.get_ref().instance_id)?;
        let peer = request.extensions().get::<PeerInfo>();
        let spiffe_id = peer
            .and_then(|p| p.client_cert.as_ref())
            .and_then(|c| rotator::client::spiffe_id_of(c).ok())
            .map(|id| id.to_string());
        let permit = self
            .limits
            .watch(WatchPeer {
                ip: peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.addr.ip()),
                spiffe_id: spiffe_id.clone(),
            })
            .map_err(|e| crate::faces::codes::limit(&e))?;
        // A stream counts toward bundle convergence only when the watcher is known: it sent an
        // instance id and authenticated with a certificate that still passes (`may_count`), so
        // nobody can mark another SPIFFE ID's instances as up to date.
        let may_count = self.may_count(peer);
        let who = spiffe_id
            .filter(|_| !request.get_ref().instance_id.is_empty() && may_count())
            .map(|id| {
                WatchGuard::new(
                    self.authority.clone(),
                    id,
                    request.get_ref().instance_id.clone(),
                )
            });
        // Whether the watcher's own certificate was signed by a revoked issuer (it must renew
        // now, with another credential).
        let own_issuer = peer
            .and_then(|p| p.client_intermediates.first())
            .map(|i| rotator::pki::CertId::of(i.as_ref()));
        let rx = self.authority.subscribe();
        Ok(Response::new(bundle_stream(
            rx, who, permit, own_issuer, may_count,
        )))
    }
}

impl MeshcaV1 {
    /// Whether a bundle stream from `peer` may count toward convergence, asked when it opens
    /// and again before each message counted (a stream outlives its certificate): its client
    /// certificate passes the checks a renewal with it would (not expired, its issuer not
    /// revoked, the path pinned, not denied).
    fn may_count(&self, peer: Option<&PeerInfo>) -> impl Fn() -> bool + Clone + Send + 'static {
        let creds = peer.and_then(|p| {
            p.client_cert
                .clone()
                .map(|c| (c, p.client_intermediates.clone()))
        });
        let core = self.issuer.clone();
        move || {
            creds
                .as_ref()
                .is_some_and(|(c, i)| core.watcher_may_count(c, i).is_ok())
        }
    }
}

/// Ledger bookkeeping of one authenticated bundle stream; the stream is closed when dropped.
struct WatchGuard {
    authority: Arc<Authority>,
    spiffe_id: String,
    instance: String,
}

impl WatchGuard {
    fn new(authority: Arc<Authority>, spiffe_id: String, instance: String) -> Self {
        authority
            .ledger()
            .with(|l| l.watch_opened(&spiffe_id, &instance));
        Self {
            authority,
            spiffe_id,
            instance,
        }
    }

    fn sent(&self, version: u64) {
        self.authority
            .ledger()
            .with(|l| l.watch_sent(&self.spiffe_id, &self.instance, version));
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.authority
            .ledger()
            .with(|l| l.watch_closed(&self.spiffe_id, &self.instance));
    }
}

/// Caps every gRPC request body at [`MAX_REQUEST_BYTES`] (plus the 5-byte frame header). A
/// larger one fails while it is being read, with `InvalidArgument`, before it is buffered.
fn limit_request_body(req: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    req.map(|body| {
        let limited = http_body_util::Limited::new(body, MAX_REQUEST_BYTES + 5).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Box::new(tonic::Status::invalid_argument(format!(
                    "request over {} KiB",
                    MAX_REQUEST_BYTES / 1024
                ))) as Box<dyn std::error::Error + Send + Sync>
            } else {
                e
            }
        });
        tonic::body::Body::new(limited)
    })
}

/// The bundle stream of one watcher: the current bundle first, then one message per new bundle
/// version (or federated sequence), and one telling the watcher to renew now whenever an issuer
/// is revoked — or at once when its own certificate's issuer already is. The stream holds its
/// watch slot (`permit`) until it is dropped; `who` records what it was handed while
/// `may_count` still holds.
fn bundle_stream(
    rx: tokio::sync::watch::Receiver<std::sync::Arc<crate::authority::Snapshot>>,
    who: Option<WatchGuard>,
    permit: crate::issuing::limits::WatchPermit,
    own_issuer: Option<rotator::pki::CertId>,
    may_count: impl Fn() -> bool + Clone + Send + 'static,
) -> BundleStream {
    type Seen = Option<(u64, Vec<rotator::pki::CertId>, Vec<u64>)>;
    let state = (rx, Seen::None, who, permit, own_issuer);
    let stream =
        futures::stream::unfold(state, move |(mut rx, last, mut who, permit, own_issuer)| {
            let may_count = may_count.clone();
            async move {
                loop {
                    let snap = rx.borrow_and_update().clone();
                    let bundle = snap.bundle.clone();
                    let revoked: Vec<_> = snap.revoked.iter().map(|r| r.issuer.clone()).collect();
                    let renew_now = match &last {
                        None => own_issuer.as_ref().is_some_and(|i| revoked.contains(i)),
                        Some((_, seen, _)) => revoked.iter().any(|r| !seen.contains(r)),
                    };
                    // Federated bundles change on their own schedule: a new sequence is news.
                    let federated: Vec<u64> = bundle.federated.iter().map(|f| f.sequence).collect();
                    let changed = last
                        .as_ref()
                        .is_none_or(|(v, _, f)| *v != bundle.version || *f != federated);
                    if changed || renew_now {
                        // A certificate that no longer passes stops counting (its stream is
                        // no longer a live workload in the ledger).
                        if who.is_some() && !may_count() {
                            who = None;
                        }
                        if let Some(w) = &who {
                            w.sent(bundle.version);
                        }
                        let msg = TrustBundle {
                            renew_now,
                            ..trust_bundle(&bundle)
                        };
                        let next = (
                            rx,
                            Some((bundle.version, revoked, federated)),
                            who,
                            permit,
                            own_issuer,
                        );
                        return Some((Ok(msg), next));
                    }
                    rx.changed().await.ok()?;
                }
            }
        });
    Box::pin(stream)
}
