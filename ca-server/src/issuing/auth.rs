//! Authentication and authorization of certificate requests.
//!
//! Every credential a request carries is checked; a credential that is present but invalid
//! fails the request (`Unauthenticated`), even if another one would pass. The request is allowed
//! when any valid credential authorizes the SPIFFE ID asked for. No credential, no certificate.
//!
//! Credentials:
//! - a client certificate issued by this CA (checked against the current bundle by the TLS
//!   layer): renewal of exactly the SPIFFE ID it carries;
//! - `authorization: Bearer <token>`: a static token from `<state-dir>/tokens.json`, stored as
//!   its SHA-256 hash with the SPIFFE IDs or `/ns/<ns>/sa/*` patterns it may ask for.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ring::digest::{SHA256, digest};
use rotator::spiffe::{IdPattern, SpiffeId};
use rotator::tokens::StaticTokens;
pub use rotator::tokens::{
    BOOTSTRAP_TOKEN_FILE, TOKENS_FILE, TokensError, add_token, list_tokens, write_bootstrap_token,
};
use rustls_pki_types::CertificateDer;

use crate::process::config::{AuthConfig, AuthMethod};

/// Why a request was not authenticated or not authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential at all.
    #[error(
        "no credential: send `authorization: Bearer <token>` or a client certificate issued by this CA"
    )]
    Missing,
    /// An `authorization` header that is not `Bearer <token>`.
    #[error("authorization header is not `Bearer <token>`")]
    Malformed,
    /// A bearer token the server does not know.
    #[error("unknown token")]
    UnknownToken,
    /// A static token past its expiry.
    #[error("token {name:?} expired at {at}: make a new one with `meshca token add`")]
    TokenExpired {
        /// Its name in tokens.json.
        name: String,
        /// When it expired (RFC 3339).
        at: String,
    },
    /// A client certificate without a usable SPIFFE ID.
    #[error("client certificate: {0}")]
    BadClientCert(String),
    /// Authenticated, but not for this SPIFFE ID.
    #[error("{caller} may not request {id} (allowed: {allowed})")]
    Denied {
        /// Who asked.
        caller: String,
        /// What they asked for.
        id: String,
        /// What they may ask for.
        allowed: String,
    },
    /// The Kubernetes API server did not accept the token (unauthenticated, wrong audience, not
    /// a service account).
    #[error("token rejected: {0}")]
    TokenRejected(String),
    /// A SPIFFE ID in another trust domain than the authority's: no credential may ask for it.
    #[error(
        "a caller may not request {requested}: it is outside this authority's trust domain {ours} (meshca issues only for its own)"
    )]
    ForeignTrustDomain {
        /// The ID asked for.
        requested: String,
        /// The authority's trust domain.
        ours: String,
    },
    /// The authenticator's backend could not answer (e.g. the Kubernetes API server).
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
    /// A request for another workload (Istio's `ImpersonatedIdentity`) from a caller that is
    /// not a node agent.
    #[error(
        "{caller} may not request certificates for other workloads (ImpersonatedIdentity {requested}): {rule}"
    )]
    NotANodeAgent {
        /// Who asked.
        caller: String,
        /// The identity it asked for.
        requested: String,
        /// The rule it does not meet.
        rule: String,
    },
    /// A node agent may not have this workload's certificate.
    #[error("node agent {agent} may not request {requested}: {why}")]
    ImpersonationDenied {
        /// The agent.
        agent: String,
        /// The workload identity it asked for.
        requested: String,
        /// Why not.
        why: String,
    },
    /// The identity is denied (`meshca deny add`): refused whatever the credential.
    #[error("{id} is denied by an operator since {since}: {reason}")]
    IdentityDenied {
        /// The identity asked for.
        id: String,
        /// The operator's reason.
        reason: String,
        /// When the denial was added (RFC 3339).
        since: String,
    },
    /// A path meshca keeps for itself (`spiffe://<td>/meshca/…`): never issued to a token, a
    /// ServiceAccount or a node agent.
    #[error(
        "{id} is reserved for meshca itself (its bundle endpoint's SVID): no credential may request it"
    )]
    Reserved {
        /// The identity asked for.
        id: String,
    },
    /// A node agent asked for a workload that is not (yet) known on its node: the pod may have
    /// been scheduled a moment ago, so the answer is retryable (`UNAVAILABLE`).
    #[error("node agent {agent} may not request {requested} yet: {why}; retry shortly")]
    ImpersonationPending {
        /// The agent.
        agent: String,
        /// The workload identity it asked for.
        requested: String,
        /// What is missing.
        why: String,
    },
}

impl AuthError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownToken => "unknown_token",
            Self::TokenExpired { .. } => "token_expired",
            Self::TokenRejected(_) => "token_rejected",
            Self::BadClientCert(_) => "bad_client_cert",
            Self::Denied { .. } | Self::ForeignTrustDomain { .. } => "denied",
            Self::Unavailable(_) => "unavailable",
            Self::NotANodeAgent { .. } => "not_node_agent",
            Self::IdentityDenied { .. } => "identity_denied",
            Self::Reserved { .. } => "reserved",
            Self::ImpersonationDenied { .. } => "impersonation_denied",
            Self::ImpersonationPending { .. } => "impersonation_pending",
        }
    }
}

/// An authenticated caller and what it may ask for.
#[derive(Debug, Clone)]
pub struct Caller {
    /// For audit logs: `token:<name>`, `mtls:<spiffe id>` or `k8s:<namespace>/<name>`.
    pub name: String,
    /// The SPIFFE IDs it may request for itself.
    pub allowed: Vec<IdPattern>,
    /// The credential that proved it, and what that says beyond its own identities.
    pub kind: CallerKind,
}

/// What proved a caller. Only this decides whether it may act as a node agent
/// ([`crate::issuing::impersonation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerKind {
    /// A client certificate: renewal of its own SPIFFE ID; never a node agent.
    Certificate,
    /// A static token; a node agent for the IDs matching `may_request` (empty: not one).
    Token {
        /// `meshca token add --node-agent --may-request PATTERN`.
        may_request: Vec<IdPattern>,
    },
    /// A Kubernetes ServiceAccount (TokenReview); a node agent when `[istio]
    /// trusted_node_agents` lists it.
    ServiceAccount(ServiceAccount),
}

/// A ServiceAccount proven by a TokenReview, with the pod its token is bound to (the API
/// server's `authentication.kubernetes.io/*` extras, present for projected tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The node of the pod the token is bound to (`authentication.kubernetes.io/node-name`,
    /// Kubernetes 1.30+).
    pub node: Option<String>,
    /// The pod the token is bound to (`authentication.kubernetes.io/pod-name`), in `namespace`.
    pub pod: Option<String>,
    /// That pod's UID (`authentication.kubernetes.io/pod-uid`): names one pod for good, where a
    /// name may be reused (a StatefulSet's pods).
    pub pod_uid: Option<String>,
}

/// The credentials one request carries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The raw `authorization` metadata value, if any.
    pub authorization: Option<&'a str>,
    /// The verified client certificate (leaf), if any.
    pub client_cert: Option<&'a CertificateDer<'static>>,
    /// The certificates the client sent after its leaf.
    pub client_intermediates: &'a [CertificateDer<'static>],
}

/// A bearer-token authenticator backed by another service (Kubernetes TokenReview): the seam
/// between the chain here and its backends, which implement it in their own modules. The chain
/// asks it in its configured place (`tokenreview` in `[auth] authenticators`).
pub trait TokenAuthenticator: Send + Sync + std::fmt::Debug {
    /// The caller `token` proves for `audience` (the face's), or why not. A backend that cannot
    /// answer says [`AuthError::Unavailable`], so that the caller retries.
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;
}

/// Checks credentials with the configured chain: client certificates, TokenReview, static tokens.
#[derive(Debug)]
pub struct Authenticator {
    chain: Vec<AuthMethod>,
    reviewer: Option<Arc<dyn TokenAuthenticator>>,
    dir: PathBuf,
    tokens: ArcSwap<StaticTokens>,
    /// SHA-256 of the tokens file as last loaded (`None`: never loaded). Content, not mtime:
    /// two writes within one filesystem timestamp tick must still be seen.
    loaded: std::sync::Mutex<Option<[u8; 32]>>,
}

impl Authenticator {
    /// Loads the tokens from `dir`; the default chain (client certificates, static tokens).
    pub fn load(dir: &Path) -> Result<Self, TokensError> {
        Self::with_chain(dir, AuthConfig::default().authenticators, None)
    }

    /// Loads the tokens from `dir`; `chain` in order; `reviewer` for `tokenreview`.
    pub fn with_chain(
        dir: &Path,
        chain: Vec<AuthMethod>,
        reviewer: Option<Arc<dyn TokenAuthenticator>>,
    ) -> Result<Self, TokensError> {
        let a = Self {
            chain,
            reviewer,
            dir: dir.to_owned(),
            tokens: ArcSwap::from_pointee(StaticTokens::default()),
            loaded: Default::default(),
        };
        a.reload_if_changed()?;
        Ok(a)
    }

    /// Re-reads `tokens.json` if its content changed. On error the old tokens stay.
    pub fn reload_if_changed(&self) -> Result<bool, TokensError> {
        let path = self.dir.join(TOKENS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(TokensError {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let hash: [u8; 32] = digest(&SHA256, &bytes)
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let mut last = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(hash) {
            return Ok(false);
        }
        let t = StaticTokens::load(&self.dir)?;
        self.tokens.store(Arc::new(t));
        *last = Some(hash);
        Ok(true)
    }

    /// How many static tokens are loaded.
    pub fn token_count(&self) -> usize {
        self.tokens.load().len()
    }

    /// Every caller the credentials prove, or why none. `audience` is the TokenReview audience
    /// of the face the request came in on.
    pub async fn authenticate(
        &self,
        creds: Credentials<'_>,
        audience: &str,
    ) -> Result<Vec<Caller>, AuthError> {
        let mut callers = Vec::with_capacity(1);
        if let Some(cert) = creds.client_cert
            && self.chain.contains(&AuthMethod::Mtls)
        {
            let id = rotator::client::spiffe_id_of(cert)
                .map_err(|e| AuthError::BadClientCert(e.to_string()))?;
            callers.push(Caller {
                name: format!("mtls:{id}"),
                allowed: vec![IdPattern::Exact(id)],
                kind: CallerKind::Certificate,
            });
        }
        if let Some(value) = creds.authorization {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(AuthError::Malformed)?;
            callers.push(self.bearer(token, audience).await?);
        }
        if callers.is_empty() {
            return Err(AuthError::Missing);
        }
        Ok(callers)
    }

    /// A bearer token offered to each token authenticator in chain order; the first that
    /// accepts it decides. If none does, the API server's absence wins over a rejection (the
    /// token may be good: `Unavailable`, retry), then the last rejection.
    async fn bearer(&self, token: &str, audience: &str) -> Result<Caller, AuthError> {
        let mut refusal = AuthError::UnknownToken;
        let mut unavailable = None;
        for m in &self.chain {
            match m {
                AuthMethod::Mtls => {}
                AuthMethod::Static => {
                    let tokens = self.tokens.load();
                    if let Some(entry) = tokens.lookup(token) {
                        if let Some(at) = entry.expires
                            && entry.expired(time::OffsetDateTime::now_utc())
                        {
                            return Err(AuthError::TokenExpired {
                                name: entry.name.clone(),
                                at: rotator::clock::rfc3339(at),
                            });
                        }
                        return Ok(Caller {
                            name: format!("token:{}", entry.name),
                            allowed: entry.allow.clone(),
                            kind: CallerKind::Token {
                                may_request: entry.may_request.clone(),
                            },
                        });
                    }
                }
                AuthMethod::Tokenreview => {
                    let Some(r) = &self.reviewer else { continue };
                    match r.authenticate(token, audience).await {
                        Ok(c) => return Ok(c),
                        Err(e @ AuthError::Unavailable(_)) => unavailable = Some(e),
                        Err(e) => refusal = e,
                    }
                }
            }
        }
        Err(unavailable.unwrap_or(refusal))
    }
}

/// Re-reads the tokens file every `every` until `stop` (a token added with `meshca token add`
/// is usable within that time); a file that does not load keeps the previous tokens.
pub async fn reload_tokens(
    auth: Arc<Authenticator>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match auth.reload_if_changed() {
            Ok(true) => tracing::info!(tokens = auth.token_count(), "tokens file reloaded"),
            Ok(false) => {}
            Err(e) => tracing::error!("tokens file not reloaded, keeping the previous tokens: {e}"),
        }
    }
}

/// The caller that may request `id`, or `Denied` naming what each may request.
pub fn authorize<'c>(callers: &'c [Caller], id: &SpiffeId) -> Result<&'c Caller, AuthError> {
    callers
        .iter()
        .find(|c| c.allowed.iter().any(|p| p.matches(id)))
        .ok_or_else(|| AuthError::Denied {
            caller: callers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            id: id.to_string(),
            allowed: callers
                .iter()
                .flat_map(|c| c.allowed.iter().map(ToString::to_string))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bootstrap_token_authorizes_default_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        let td: rotator::spiffe::TrustDomain = "cluster.local".parse().unwrap();
        let path = write_bootstrap_token(dir.path(), &td, None).unwrap();
        let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();

        let auth = Authenticator::load(dir.path()).unwrap();
        let header = format!("Bearer {token}");
        let callers = auth
            .authenticate(
                Credentials {
                    authorization: Some(&header),
                    client_cert: None,
                    client_intermediates: &[],
                },
                "meshca",
            )
            .await
            .unwrap();
        let ok: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/prod/sa/web".parse().unwrap();
        assert_eq!(authorize(&callers, &ok).unwrap().name, "token:bootstrap");
        let e = authorize(&callers, &other).unwrap_err();
        assert_eq!(e.reason(), "denied");
        assert!(
            e.to_string()
                .contains("allowed: spiffe://cluster.local/ns/default/sa/*"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn credential_errors() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::load(dir.path()).unwrap();
        assert_eq!(
            auth.authenticate(Credentials::default(), "meshca")
                .await
                .unwrap_err(),
            AuthError::Missing
        );
        for (h, want) in [
            ("Basic abc", AuthError::Malformed),
            ("Bearer ", AuthError::Malformed),
            ("Bearer mca_nope", AuthError::UnknownToken),
        ] {
            let got = auth
                .authenticate(
                    Credentials {
                        authorization: Some(h),
                        client_cert: None,
                        client_intermediates: &[],
                    },
                    "meshca",
                )
                .await
                .unwrap_err();
            assert_eq!(got, want, "{h}");
        }
    }

    #[tokio::test]
    async fn tokens_reload_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::load(dir.path()).unwrap();
        assert_eq!(auth.token_count(), 0);
        let t = add_token(
            dir.path(),
            "ci",
            vec!["spiffe://cluster.local/ns/ci/sa/runner".parse().unwrap()],
            None,
        )
        .unwrap();
        assert!(auth.reload_if_changed().unwrap());
        let header = format!("Bearer {t}");
        assert!(
            auth.authenticate(
                Credentials {
                    authorization: Some(&header),
                    client_cert: None,
                    client_intermediates: &[],
                },
                "meshca"
            )
            .await
            .is_ok()
        );
        assert!(!auth.reload_if_changed().unwrap());
        // Back-to-back writes (often within one filesystem timestamp tick) are each seen.
        for n in 0..5 {
            add_token(dir.path(), &format!("t{n}"), vec![], None).unwrap();
            assert!(auth.reload_if_changed().unwrap(), "write {n} not seen");
        }
        assert_eq!(auth.token_count(), 6);
    }
}
