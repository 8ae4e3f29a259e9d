//! The one place that decides whether, for whom and for how long a leaf is signed. Every API
//! face (meshca.v1 today) translates its request into an [`IssueRequest`] and the result back;
//! authentication, authorization, CSR checks, TTL policy, audit logging and metrics happen here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rotator::ledger::{LeafRecord, Recorded};
use rotator::spiffe::SpiffeId;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::authority::{Authority, Bundle};
use crate::issuing::auth::{AuthError, Authenticator, Credentials, authorize};
use crate::issuing::impersonation::{Impersonation, NodeAgents};
use crate::issuing::limits::{Limit, Limits, Refusal};
use crate::issuing::signing::{CsrError, ValidCsr, parse_csr, parse_dns_csr, sign_leaf};
use crate::process::metrics::Metrics;

/// The wire API a request came in on. All faces share one signing core, ledger and audit line;
/// they differ in their TokenReview audience, their status codes and what their responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Face {
    /// `meshca.v1.IdentityService`.
    Meshca,
    /// `istio.v1.auth.IstioCertificateService`.
    Istio,
    /// `io.linkerd.proxy.identity.Identity`.
    Linkerd,
    /// A Kubernetes PodCertificateRequest (`k8s::podcerts`).
    Pod,
}

impl Face {
    /// Every face, for metrics initialised at 0.
    pub const ALL: [Face; 4] = [Face::Meshca, Face::Istio, Face::Linkerd, Face::Pod];

    /// The name in metrics (`api` label) and audit lines.
    pub fn label(self) -> &'static str {
        match self {
            Face::Meshca => "meshca",
            Face::Istio => "istio",
            Face::Linkerd => "linkerd",
            Face::Pod => "pod",
        }
    }

    /// Whether its responses hand the workload the whole bundle: meshca.v1's carry it beside
    /// the chain, Istio's as the chain's last element (every anchor, which istio-agent and
    /// ztunnel take as their roots). Linkerd's carry none (its proxies read trust anchors from
    /// their pod spec), so those workloads never count as having received a new anchor.
    pub fn delivers_bundle(self) -> bool {
        matches!(self, Face::Meshca | Face::Istio)
    }

    /// The ledger's name for it.
    pub fn api(self) -> rotator::ledger::Api {
        match self {
            Face::Meshca => rotator::ledger::Api::Meshca,
            Face::Istio => rotator::ledger::Api::Istio,
            Face::Linkerd => rotator::ledger::Api::Linkerd,
            Face::Pod => rotator::ledger::Api::Pod,
        }
    }
}

impl std::fmt::Display for Face {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How far a pod certificate's notBefore is back-dated (Kubernetes refuses more than five
/// minutes from its own clock).
const POD_BACKDATE: Duration = Duration::from_secs(60);

/// A PodCertificateRequest's facts, as `SigningCore::issue_for_pod` needs them.
#[derive(Debug, Clone)]
pub struct PodRequest<'a> {
    /// `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>`.
    pub id: SpiffeId,
    /// The pod's namespace.
    pub namespace: &'a str,
    /// `namespace/name` of the pod (for the audit line).
    pub pod: &'a str,
    /// The pod's UID: the workload instance.
    pub pod_uid: &'a str,
    /// The node the kubelet that asked runs on.
    pub node: &'a str,
    /// The subject key.
    pub key: crate::issuing::signing::CsrKey,
    /// `maxExpirationSeconds`: the leaf lives at most this long (and as policy allows).
    pub max_ttl: Duration,
}

/// One certificate request, whatever API it came in on.
#[derive(Debug, Clone, Copy)]
pub struct IssueRequest<'a> {
    /// The face it came in on.
    pub api: Face,
    /// CSR, DER or PEM.
    pub csr: &'a [u8],
    /// Requested lifetime; `None` or zero for the default.
    pub ttl: Option<Duration>,
    /// The credentials.
    pub credentials: Credentials<'a>,
    /// Where the request came from, for audit logs.
    pub peer: Option<std::net::SocketAddr>,
    /// The client's instance id, if it sent one (see `rotator::ledger` for what it is for).
    pub instance_id: Option<&'a str>,
    /// A DNS-identity request (Linkerd): the identity the CSR must carry as its one DNS SAN, and
    /// the SPIFFE ID it maps to (what authorization checks). `None`: a SPIFFE URI SAN CSR.
    pub dns_identity: Option<(&'a str, &'a SpiffeId)>,
    /// A node agent asking on a workload's behalf (Istio's `ImpersonatedIdentity`): the
    /// workload's SPIFFE ID, which the CSR must carry. `None`: the caller asks for itself.
    pub impersonate: Option<&'a str>,
}

/// A signed leaf with everything a response needs.
#[derive(Debug)]
pub struct Issued {
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// The bundle at signing time.
    pub bundle: Arc<Bundle>,
    /// The SPIFFE ID in the leaf.
    pub id: SpiffeId,
    /// Serial, lowercase hex.
    pub serial: String,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// When to renew: 50-70 % into the lifetime, jittered.
    pub refresh_at: OffsetDateTime,
    /// The anchor the leaf chains to.
    pub anchor: rotator::pki::CertId,
    /// The issuer that signed it.
    pub issuer: rotator::pki::CertId,
}

/// Why a request got no certificate. The faces map each variant to their status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// Not authenticated or not authorized.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The CSR is unacceptable.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// No valid issuer can sign now.
    #[error("{0}")]
    Unavailable(String),
    /// A `[limits]` cap: the caller's issue rate, its identity's instances in the ledger.
    #[error(transparent)]
    Limited(#[from] Refusal),
    /// A bug or an RNG failure.
    #[error("{0}")]
    Internal(String),
}

impl IssueError {
    fn result_label(&self) -> &'static str {
        match self {
            Self::Limited(_) => "limited",
            // A node agent's request for a workload not on its node is answered `UNAVAILABLE`
            // (retryable: the pod may have been scheduled a moment ago), but it is a refusal,
            // not meshca failing: it counts as denied, outside the issuance-error alert.
            Self::Auth(
                AuthError::Denied { .. }
                | AuthError::ForeignTrustDomain { .. }
                | AuthError::NotANodeAgent { .. }
                | AuthError::ImpersonationDenied { .. }
                | AuthError::ImpersonationPending { .. }
                | AuthError::IdentityDenied { .. }
                | AuthError::Reserved { .. },
            ) => "denied",
            Self::Auth(AuthError::Unavailable(_)) | Self::Unavailable(_) => "unavailable",
            Self::Auth(_) => "unauthenticated",
            Self::Csr(_) => "invalid",
            Self::Internal(_) => "error",
        }
    }
}

/// The workload instance a request's credential implies when the client names none (Istio's
/// and Linkerd's clients cannot): a node agent keeps one certificate per identity on its node
/// (ztunnel), so `node:<node>`; a ServiceAccount token bound to a pod (istio-agent's) names its
/// pod, `pod:<name>` (the SPIFFE ID carries the namespace). `None`: nothing stable is known,
/// and the leaf's public key names the instance, so a client that makes a new key for every
/// renewal counts as a new instance each time (the gates then open later, never earlier).
pub fn implied_instance(
    via: Option<&Impersonation>,
    caller: Option<&crate::issuing::auth::Caller>,
) -> Option<String> {
    if let Some(v) = via {
        return v.node.as_ref().map(|n| format!("node:{n}"));
    }
    match caller.map(|c| &c.kind) {
        Some(crate::issuing::auth::CallerKind::ServiceAccount(sa)) => {
            sa.pod.as_ref().map(|p| format!("pod:{p}"))
        }
        _ => None,
    }
}

/// `s` fit for one log line: control characters (a newline that would start a forged line, a
/// terminal escape) written as escapes. Every caller-supplied text in a log field goes through
/// it; the JSON log format escapes them anyway.
pub fn log_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// The SPIFFE IDs a node agent is known by: a ServiceAccount's own ID, and the exact IDs a
/// token is allowed for itself (its patterns name more than one workload and are not checked).
fn agent_identities(callers: &[crate::issuing::auth::Caller], agent: &str) -> Vec<SpiffeId> {
    callers
        .iter()
        .filter(|c| c.name == agent)
        .flat_map(|c| c.allowed.iter())
        .filter_map(|p| match p {
            rotator::spiffe::IdPattern::Exact(id) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// The TokenReview audience each face's tokens must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audiences {
    /// meshca.v1.
    pub meshca: String,
    /// Istio's face.
    pub istio: String,
    /// Linkerd's face.
    pub linkerd: String,
}

impl Audiences {
    /// The audiences `config` sets.
    pub fn of(c: &crate::process::config::Config) -> Self {
        Self {
            meshca: c.kubernetes.token_audience.clone(),
            istio: c.istio.token_audience.clone(),
            linkerd: c.linkerd.token_audience.clone(),
        }
    }
}

impl Default for Audiences {
    fn default() -> Self {
        Self::of(&crate::process::config::Config::default())
    }
}

/// The signing core every face shares: authenticates, checks the CSR, signs with the current
/// issuer, records the leaf in the ledger, and writes one audit line and one metric either way.
pub struct SigningCore {
    authority: Arc<Authority>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    audiences: Audiences,
    limits: Arc<Limits>,
    agents: NodeAgents,
}

impl SigningCore {
    /// An issuer over `authority`, checking credentials with `auth`, without limits (the
    /// server sets them with [`with_limits`](Self::with_limits)).
    pub fn new(authority: Arc<Authority>, auth: Arc<Authenticator>, metrics: Arc<Metrics>) -> Self {
        let limits = Arc::new(Limits::new(
            crate::process::config::LimitsConfig::unlimited(),
            metrics.limit_refusals.clone(),
        ));
        Self {
            authority,
            auth,
            metrics,
            audiences: Audiences::default(),
            limits,
            agents: NodeAgents::default(),
        }
    }

    /// With node agents (who may ask for other workloads' certificates, and for which).
    #[must_use]
    pub fn with_node_agents(mut self, agents: NodeAgents) -> Self {
        self.agents = agents;
        self
    }

    /// With `[limits]`: the issue rate per caller and the ledger's caps.
    #[must_use]
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = limits;
        self
    }

    /// With the configured TokenReview audiences.
    #[must_use]
    pub fn with_audiences(mut self, audiences: Audiences) -> Self {
        self.audiences = audiences;
        self
    }

    /// Authenticates, checks, signs; logs one audit line and counts the result either way.
    pub async fn issue(&self, req: IssueRequest<'_>) -> Result<Issued, IssueError> {
        let start = Instant::now();
        let mut who = String::from("-");
        let mut via = None;
        let checked = match self.reverify_client_cert(&req.credentials) {
            Ok(()) => {
                self.auth
                    .authenticate(req.credentials, self.audience(req.api))
                    .await
            }
            Err(e) => Err(e),
        };
        let result = match checked {
            Ok(callers) => self.issue_inner(&req, &callers, &mut who, &mut via).await,
            Err(e) => Err(e.into()),
        };
        self.metrics.count(
            req.api.label(),
            result
                .as_ref()
                .map_or_else(IssueError::result_label, |_| "ok"),
            req.impersonate.is_some(),
            start.elapsed(),
        );
        let peer = req.peer.map(|p| p.to_string()).unwrap_or_default();
        // A node agent's request: `caller` is the agent, `spiffe_id` the workload, `node` the
        // agent's node (Kubernetes).
        let node = via.as_ref().and_then(|v: &Impersonation| v.node.as_deref());
        match &result {
            Ok(i) => tracing::info!(
                target: "meshca::audit",
                api = req.api.label(), caller = %who, peer = %peer, spiffe_id = %i.id, serial = %i.serial,
                not_after = %rotator::clock::rfc3339(i.not_after), impersonated = req.impersonate.is_some(),
                node, "issued"
            ),
            Err(e) => {
                if let IssueError::Auth(a) = e {
                    self.metrics
                        .auth_failures
                        .get_or_create(&crate::process::metrics::ReasonLabels {
                            reason: a.reason(),
                        })
                        .inc();
                }
                tracing::warn!(
                    target: "meshca::audit",
                    api = req.api.label(), caller = %log_safe(&who), peer = %peer, reason = %log_safe(&e.to_string()),
                    impersonated = req.impersonate, node, "refused"
                );
            }
        }
        result
    }

    /// Signs for a PodCertificateRequest the API server admitted: the kubelet of `req.node`
    /// asked, for a pod of ServiceAccount `namespace/sa` (NodeRestriction and the request's
    /// admission checked the binding and the key's possession). The same rules as every face:
    /// a reserved or denied identity and a denied node are refused; the node's and the
    /// namespace's issue budgets apply; the leaf is recorded in the ledger (instance `pod:<uid>`,
    /// via `kubelet@<node>`); one audit line and the metrics either way.
    pub fn issue_for_pod(&self, req: &PodRequest<'_>) -> Result<Issued, IssueError> {
        let start = Instant::now();
        let via = format!("kubelet@{}", req.node);
        let result = self.issue_for_pod_inner(req, &via);
        self.metrics.count(
            Face::Pod.label(),
            result
                .as_ref()
                .map_or_else(IssueError::result_label, |_| "ok"),
            false,
            start.elapsed(),
        );
        match &result {
            Ok(i) => tracing::info!(
                target: "meshca::audit",
                api = "pod", caller = %log_safe(&via), pod = %log_safe(req.pod), spiffe_id = %i.id,
                serial = %i.serial, not_after = %rotator::clock::rfc3339(i.not_after), "issued"
            ),
            Err(e) => tracing::warn!(
                target: "meshca::audit",
                api = "pod", caller = %log_safe(&via), pod = %log_safe(req.pod),
                spiffe_id = %req.id, reason = %log_safe(&e.to_string()), "refused"
            ),
        }
        result
    }

    fn issue_for_pod_inner(&self, req: &PodRequest<'_>, via: &str) -> Result<Issued, IssueError> {
        if req.id.is_reserved() {
            return Err(IssueError::Auth(AuthError::Reserved {
                id: req.id.to_string(),
            }));
        }
        self.refuse_denied(&req.id)?;
        let now = self.authority.clock().now();
        if let Some(d) = self
            .authority
            .snapshot()
            .denied_nodes
            .iter()
            .find(|d| d.active(now) && d.node == req.node)
        {
            return Err(IssueError::Auth(AuthError::ImpersonationDenied {
                agent: via.to_owned(),
                requested: req.id.to_string(),
                why: format!(
                    "node {} is denied by an operator since {}: {}",
                    req.node,
                    rotator::clock::rfc3339(d.added),
                    d.reason
                ),
            }));
        }
        self.limits.node_agent_issue(via)?;
        self.limits.issue(&format!("namespace:{}", req.namespace))?;
        let spiffe_id = req.id.to_string();
        let instance = format!("pod:{}", req.pod_uid);
        self.admit(&spiffe_id, &instance)?;
        let csr = ValidCsr {
            id: req.id.clone(),
            key: req.key.clone(),
            dns: None,
        };
        // Kubernetes checks what the kubelet will be handed: notBefore within 5 minutes of the
        // API server's clock (so back-dated by one minute here, not by policy.clock_skew), and
        // notAfter − notBefore at most maxExpirationSeconds.
        let issued = self.sign_in(&csr, |policy, now, nb, na| {
            let mut w = policy.leaf_window(now, Some(req.max_ttl), nb, na)?;
            w.not_before = rotator::clock::whole_seconds(now) - POD_BACKDATE.min(policy.clock_skew);
            w.not_after = w.not_after.min(w.not_before + req.max_ttl);
            Ok(w)
        })?;
        let recorded = self.authority.ledger().record(LeafRecord {
            serial: issued.serial.clone(),
            spiffe_id,
            instance,
            anchor: issued.anchor.clone(),
            issued: now.unix_timestamp(),
            not_after: issued.not_after.unix_timestamp(),
            bundle_version: 0,
            via: Some(via.to_owned()),
            issuer: Some(issued.issuer.clone()),
            api: rotator::ledger::Api::Pod,
        });
        if recorded == Recorded::DroppedFull {
            self.limits.refused(
                Limit::LedgerFull,
                &format_args!(
                    "the issuance ledger is full: {} signed but not recorded",
                    issued.id
                ),
            );
        }
        Ok(issued)
    }

    /// Whether a bundle stream's client certificate may count toward bundle convergence now:
    /// the same checks as a renewal with it (still valid through one of this authority's
    /// issuers, that issuer not revoked, the path pinned) and its identity not denied. Checked
    /// when the stream opens and again before every message counted.
    pub fn watcher_may_count(
        &self,
        leaf: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
    ) -> Result<(), AuthError> {
        self.reverify_client_cert(&Credentials {
            authorization: None,
            client_cert: Some(leaf),
            client_intermediates: intermediates,
        })?;
        let id = rotator::client::spiffe_id_of(leaf)
            .map_err(|e| AuthError::BadClientCert(e.to_string()))?;
        match self.refuse_denied(&id) {
            Err(IssueError::Auth(a)) => Err(a),
            _ => Ok(()),
        }
    }

    /// A client certificate is checked at the handshake, but a connection (or a resumed TLS
    /// session) may outlive that moment: on every request it must still verify against the
    /// bundle and the time of *now*, through one of this authority's issuers.
    fn reverify_client_cert(&self, creds: &Credentials<'_>) -> Result<(), AuthError> {
        let Some(leaf) = creds.client_cert else {
            return Ok(());
        };
        let snap = self.authority.snapshot();
        let bad = |why: String| AuthError::BadClientCert(format!("no longer valid: {why}"));
        // The first certificate after the leaf is its issuer; anything after that (a client that
        // also sends the root) plays no part.
        let Some(issuer) = creds.client_intermediates.first() else {
            return Err(bad(
                "it came without its issuer; meshca's leaves chain through one of its issuers"
                    .into(),
            ));
        };
        if !snap.issuers.contains(issuer) {
            return Err(bad(
                "its issuer is not one of this authority's issuers".into()
            ));
        }
        let issuer_id = rotator::pki::CertId::of(issuer.as_ref());
        if let Some(r) = snap.revoked.iter().find(|r| r.issuer == issuer_id) {
            return Err(AuthError::BadClientCert(format!(
                "its issuer {issuer_id} was revoked ({}): renew with a token or ServiceAccount credential, \
                 on a connection without this certificate",
                r.reason
            )));
        }
        let now = self.authority.clock().now();
        let at = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap_or(0),
        ));
        let through = rotator::client::verify_through(
            leaf,
            issuer,
            &snap.bundle.anchors,
            at,
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| bad(format!("{e} (expired, or its anchor left the bundle)")))?;
        if through {
            // The path built was leaf → that issuer → an anchor: the issuer signed the leaf.
            return Ok(());
        }
        // The path must be exactly leaf → that issuer → an anchor: a leaf an anchor signed
        // directly (an upstream CA that also signs end entities) verifies above without the
        // issuer it came with, so the leaf must also verify with that issuer as its only root.
        rotator::client::verify_svid(
            std::slice::from_ref(leaf),
            std::slice::from_ref(issuer),
            at,
            webpki::KeyUsage::client_auth(),
        )
        .map(|_| ())
        .map_err(|e| {
            bad(format!(
                "it was not signed by the issuer it came with, {issuer_id} ({e}): meshca's leaves chain leaf → issuer → anchor"
            ))
        })
    }

    /// The TokenReview audience of a face.
    fn audience(&self, face: Face) -> &str {
        match face {
            Face::Meshca => &self.audiences.meshca,
            Face::Istio => &self.audiences.istio,
            Face::Linkerd => &self.audiences.linkerd,
            // Pod certificate requests carry no token: the API server authenticated the kubelet.
            Face::Pod => &self.audiences.meshca,
        }
    }

    async fn issue_inner(
        &self,
        req: &IssueRequest<'_>,
        callers: &[crate::issuing::auth::Caller],
        who: &mut String,
        via: &mut Option<Impersonation>,
    ) -> Result<Issued, IssueError> {
        *who = callers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let csr = match req.dns_identity {
            Some((dns, id)) => parse_dns_csr(req.csr, dns, id.clone())?,
            None => parse_csr(req.csr)?,
        };
        let implied = self.check_caller(req, &csr.id, callers, who, via).await?;
        let instance = match req.instance_id.filter(|i| !i.is_empty()) {
            Some(i) => i.to_owned(),
            None => implied.unwrap_or_else(|| {
                use rcgen::PublicKeyData;
                let h = ring::digest::digest(&ring::digest::SHA256, csr.key.der_bytes());
                format!("key:{}", hex::encode(&h.as_ref()[..12]))
            }),
        };
        let spiffe_id = csr.id.to_string();
        self.admit(&spiffe_id, &instance)?;
        let issued = self.sign(&csr, req.ttl)?;
        let recorded = self.authority.ledger().record(LeafRecord {
            serial: issued.serial.clone(),
            spiffe_id,
            instance,
            anchor: issued.anchor.clone(),
            issued: self.authority.clock().now().unix_timestamp(),
            not_after: issued.not_after.unix_timestamp(),
            bundle_version: if req.api.delivers_bundle() {
                issued.bundle.version
            } else {
                0
            },
            via: via.as_ref().map(Impersonation::via),
            issuer: Some(issued.issuer.clone()),
            api: req.api.api(),
        });
        if recorded == Recorded::DroppedFull {
            self.limits.refused(
                Limit::LedgerFull,
                &format_args!(
                    "the issuance ledger holds limits.ledger_max_instances instances: {} signed but not recorded; \
                     the trust-anchor gates use their time fallback until every unrecorded leaf has expired",
                    issued.id
                ),
            );
        }
        Ok(issued)
    }

    /// Who may have `id`: refuses a denied identity (whatever the credential), another trust
    /// domain, and a caller the credentials do not allow — for itself, or as a node agent for
    /// the workload named in `ImpersonatedIdentity` — then takes one from the caller's issue
    /// budget (a node agent's own, per node). `who` becomes the deciding caller's name. Returns
    /// the workload instance the credential implies ([`implied_instance`]), if any.
    async fn check_caller(
        &self,
        req: &IssueRequest<'_>,
        id: &SpiffeId,
        callers: &[crate::issuing::auth::Caller],
        who: &mut String,
        via: &mut Option<Impersonation>,
    ) -> Result<Option<String>, IssueError> {
        // meshca's own paths are never a workload's, however broad a token's patterns.
        if id.is_reserved() {
            return Err(IssueError::Auth(AuthError::Reserved { id: id.to_string() }));
        }
        // A denied identity is refused before anything else looks at the credential: its own
        // certificate, a token or a ServiceAccount are all the same to a compromised workload.
        self.refuse_denied(id)?;
        let ours = self.authority.snapshot().bundle.trust_domain.to_string();
        if id.trust_domain_str() != ours {
            return Err(IssueError::Auth(AuthError::ForeignTrustDomain {
                requested: id.to_string(),
                ours,
            }));
        }
        match req.impersonate {
            None => {
                let caller = authorize(callers, id)?;
                *who = caller.name.clone();
                self.limits.issue(&caller.name)?;
                Ok(implied_instance(None, Some(caller)))
            }
            Some(claimed) => {
                if claimed != id.as_str() {
                    return Err(IssueError::Auth(AuthError::ImpersonationDenied {
                        agent: who.clone(),
                        requested: claimed.to_owned(),
                        why: format!(
                            "ImpersonatedIdentity must equal the CSR's URI SAN, which is {}",
                            id
                        ),
                    }));
                }
                let granted = self.agents.authorize(callers, id).await?;
                // A denied node (`meshca deny add --node`): its agents act for nobody.
                if let Some(node) = &granted.node {
                    let now = self.authority.clock().now();
                    if let Some(d) = self
                        .authority
                        .snapshot()
                        .denied_nodes
                        .iter()
                        .find(|d| d.active(now) && d.node == *node)
                    {
                        return Err(IssueError::Auth(AuthError::ImpersonationDenied {
                            agent: granted.agent.clone(),
                            requested: id.to_string(),
                            why: format!(
                                "node {node} is denied by an operator since {}: {}",
                                rotator::clock::rfc3339(d.added),
                                d.reason
                            ),
                        }));
                    }
                }
                // A denied node agent acts for nobody: denying ztunnel's own identity must stop
                // it impersonating every workload on its node, not only renewing itself.
                for agent_id in agent_identities(callers, &granted.agent) {
                    self.refuse_denied(&agent_id)?;
                }
                who.clone_from(&granted.agent);
                let key = granted.via();
                let implied = implied_instance(Some(&granted), None);
                *via = Some(granted);
                self.limits.node_agent_issue(&key)?;
                Ok(implied)
            }
        }
    }

    /// `IdentityDenied` when an active denial matches `id`.
    fn refuse_denied(&self, id: &SpiffeId) -> Result<(), IssueError> {
        let now = self.authority.clock().now();
        match self
            .authority
            .snapshot()
            .denied
            .iter()
            .find(|d| d.active(now) && d.pattern.matches(id))
        {
            Some(d) => Err(IssueError::Auth(AuthError::IdentityDenied {
                id: id.to_string(),
                reason: d.reason.clone(),
                since: rotator::clock::rfc3339(d.added),
            })),
            None => Ok(()),
        }
    }

    /// Whether the ledger takes one more instance of `spiffe_id`
    /// (`limits.ledger_instances_per_identity`); a refusal is counted.
    fn admit(&self, spiffe_id: &str, instance: &str) -> Result<(), IssueError> {
        self.authority
            .ledger()
            .admit(spiffe_id, instance)
            .map_err(|e| {
                let message = e.to_string();
                self.limits.refused(Limit::LedgerPerIdentity, &message);
                IssueError::Limited(Refusal {
                    limit: Limit::LedgerPerIdentity,
                    message,
                    retry_after: None,
                })
            })
    }

    /// Signs `csr` (already authorized) with the current issuer.
    pub fn sign(&self, csr: &ValidCsr, ttl: Option<Duration>) -> Result<Issued, IssueError> {
        self.sign_in(csr, |policy, now, nb, na| {
            policy.leaf_window(now, ttl, nb, na)
        })
    }

    /// Signs `csr` over the window `window_of(policy, now, issuer notBefore, issuer notAfter)`.
    fn sign_in(
        &self,
        csr: &ValidCsr,
        window_of: impl FnOnce(
            &rotator::policy::Policy,
            OffsetDateTime,
            OffsetDateTime,
            OffsetDateTime,
        )
            -> Result<rotator::policy::LeafWindow, rotator::policy::IssuerNotValid>,
    ) -> Result<Issued, IssueError> {
        let snap = self.authority.snapshot();
        let issuer = snap.issuer.as_ref().ok_or_else(|| {
            IssueError::Unavailable(
                "no issuer: this authority has none yet (upstream mode: import one)".into(),
            )
        })?;
        let now = self.authority.clock().now();
        let window = window_of(
            self.authority.policy(),
            now,
            issuer.not_before,
            issuer.not_after,
        )
        .map_err(|e| IssueError::Unavailable(format!("issuer {}: {e}", issuer.id)))?;
        let leaf = sign_leaf(csr, &window, &issuer.signer).map_err(|e| {
            // A key store that lost its token says so (and is reconnecting): retryable.
            match rotator::keys::ca_key_store().map(|k| k.health()) {
                Some(Err(why)) => IssueError::Unavailable(format!("key store: {why}")),
                _ => IssueError::Internal(e.to_string()),
            }
        })?;
        let refresh_at = self.refresh_at(now, window.not_after)?;
        Ok(Issued {
            chain: vec![CertificateDer::from(leaf.der), issuer.der.clone()],
            bundle: snap.bundle.clone(),
            id: csr.id.clone(),
            serial: leaf.serial,
            not_after: window.not_after,
            refresh_at,
            anchor: issuer.anchor.clone(),
            issuer: issuer.id.clone(),
        })
    }

    /// A uniformly random point between 50 % and 70 % of the remaining lifetime.
    fn refresh_at(
        &self,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<OffsetDateTime, IssueError> {
        let mut b = [0u8; 4];
        rotator::pki::random_bytes(&mut b)
            .map_err(|_| IssueError::Internal("random number generator failed".into()))?;
        let frac = 0.5 + 0.2 * (f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX));
        let life = (not_after - now).as_seconds_f64().max(0.0);
        Ok(rotator::clock::whole_seconds(
            now + Duration::from_secs_f64(life * frac),
        ))
    }

    /// The readiness probe: can a leaf be signed with the current issuer right now?
    pub fn probe(&self, probe_csr: &ValidCsr) -> Result<(), IssueError> {
        self.sign(probe_csr, None).map(|_| ())
    }

    /// The authority served.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuing::auth::{Caller, CallerKind, ServiceAccount};

    fn sa(pod: Option<&str>) -> Caller {
        Caller {
            name: "k8s:default/web".into(),
            allowed: Vec::new(),
            kind: CallerKind::ServiceAccount(ServiceAccount {
                namespace: "default".into(),
                name: "web".into(),
                node: Some("node-a".into()),
                pod: pod.map(str::to_owned),
                pod_uid: None,
            }),
        }
    }

    #[test]
    fn log_fields_cannot_start_a_line() {
        assert_eq!(log_safe("plain text"), "plain text");
        let forged = "x\n2026-12-06T00:00:00Z  INFO meshca::audit: issued\r\u{1b}[2J";
        let safe = log_safe(forged);
        assert!(!safe.chars().any(char::is_control), "{safe}");
        assert!(safe.contains("\\n2026"), "{safe}");
    }

    #[test]
    fn the_credential_names_the_instance_where_it_can() {
        let ztunnel = Impersonation {
            agent: "k8s:istio-system/ztunnel".into(),
            node: Some("node-a".into()),
        };
        assert_eq!(
            implied_instance(Some(&ztunnel), Some(&sa(Some("web-1")))).as_deref(),
            Some("node:node-a"),
            "a node agent holds one certificate per identity on its node"
        );
        let unplaced = Impersonation {
            node: None,
            ..ztunnel
        };
        assert_eq!(implied_instance(Some(&unplaced), None), None);
        assert_eq!(
            implied_instance(None, Some(&sa(Some("web-1")))).as_deref(),
            Some("pod:web-1")
        );
        assert_eq!(implied_instance(None, Some(&sa(None))), None);
        let token = Caller {
            name: "token:ci".into(),
            allowed: Vec::new(),
            kind: CallerKind::Token {
                may_request: Vec::new(),
            },
        };
        assert_eq!(implied_instance(None, Some(&token)), None);
        assert!(Face::Istio.delivers_bundle() && Face::Meshca.delivers_bundle());
        assert!(!Face::Linkerd.delivers_bundle());
    }
}
