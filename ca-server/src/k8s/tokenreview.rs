//! ServiceAccount tokens checked with a Kubernetes TokenReview.
//!
//! A proxy sends its projected ServiceAccount token (`authorization: Bearer <jwt>`, or Linkerd's
//! `token` field). meshca creates a TokenReview for the face's audience and requires the API
//! server to answer `authenticated` as `system:serviceaccount:<ns>:<sa>` with that audience; the
//! caller may then request exactly `spiffe://<td>/ns/<ns>/sa/<sa>`.
//!
//! Answers, accepted or refused, are cached by the SHA-256 of (audience, token) for
//! `token_cache_ttl`, never past the token's own `exp`, at most `token_cache_size` entries (the
//! soonest-expiring goes first). The token itself is never stored or logged. When the API server
//! cannot answer, the request fails `Unavailable`: neither a silent deny nor an allow.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use ring::digest::{SHA256, digest};
use rotator::clock::Clock;
use rotator::spiffe::{IdPattern, SpiffeId, TrustDomain};
use time::OffsetDateTime;

use crate::auth::{AuthError, Caller, TokenAuthenticator};

/// A ServiceAccount proven by a TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

type Answer = Result<ServiceAccount, AuthError>;

struct Entry {
    answer: Answer,
    until: OffsetDateTime,
}

/// Reviews tokens, with a bounded cache.
pub struct TokenReviewer {
    client: kube::Client,
    trust_domain: TrustDomain,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    capacity: usize,
    cache: std::sync::Mutex<HashMap<[u8; 32], Entry>>,
    calls: AtomicU64,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// How long a refusal is remembered (a fixed token that is wrong stays wrong; a short memory
/// keeps a flood of bad tokens off the API server without pinning a mistake for long).
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// A TokenReview the API server has not answered by then fails the request `Unavailable`.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

impl TokenReviewer {
    /// A reviewer using `client`, for SPIFFE IDs in `trust_domain`.
    pub fn new(
        client: kube::Client,
        trust_domain: TrustDomain,
        clock: Arc<dyn Clock>,
        ttl: Duration,
        capacity: usize,
    ) -> Self {
        Self {
            client,
            trust_domain,
            clock,
            ttl,
            capacity: capacity.max(1),
            cache: Default::default(),
            calls: AtomicU64::new(0),
        }
    }

    /// TokenReviews sent to the API server so far.
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Cached answers.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller `token` proves for `audience`, or why not: the token's ServiceAccount, which
    /// may request its own SPIFFE ID.
    pub async fn caller_of(&self, token: &str, audience: &str) -> Result<Caller, AuthError> {
        let sa = self.review(token, audience).await?;
        let id: SpiffeId = format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, sa.namespace, sa.name
        )
        .parse()
        .map_err(|e| {
            AuthError::TokenRejected(format!(
                "service account {}/{} is not a valid SPIFFE path: {e}",
                sa.namespace, sa.name
            ))
        })?;
        Ok(Caller {
            name: format!("k8s:{}/{}", sa.namespace, sa.name),
            allowed: vec![IdPattern::Exact(id)],
        })
    }

    /// The ServiceAccount `token` belongs to (audience `audience`), from the cache or the API.
    pub async fn review(&self, token: &str, audience: &str) -> Answer {
        let key = cache_key(token, audience);
        let now = self.clock.now();
        if let Some(e) = self.lock().get(&key)
            && e.until > now
        {
            return e.answer.clone();
        }
        let answer = self.ask(token, audience).await;
        if matches!(answer, Err(AuthError::Unavailable(_))) {
            return answer; // never cache the API server's absence
        }
        let ttl = if answer.is_ok() {
            self.ttl
        } else {
            NEGATIVE_TTL.min(self.ttl)
        };
        let mut until = now + ttl;
        if let Some(exp) = jwt_expiry(token) {
            until = until.min(exp);
        }
        if until > now {
            let mut cache = self.lock();
            cache.retain(|_, e| e.until > now);
            if cache.len() >= self.capacity
                && let Some(k) = cache.iter().min_by_key(|(_, e)| e.until).map(|(k, _)| *k)
            {
                cache.remove(&k);
            }
            cache.insert(
                key,
                Entry {
                    answer: answer.clone(),
                    until,
                },
            );
        }
        answer
    }

    async fn ask(&self, token: &str, audience: &str) -> Answer {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![audience.to_owned()]),
            },
            ..Default::default()
        };
        let done =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    AuthError::Unavailable(format!(
                        "TokenReview: no answer from the API server within {REVIEW_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::TokenRejected(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "the API server did not authenticate the token".into()),
            ));
        }
        // An API server that ignores spec.audiences answers without status.audiences; one that
        // honours it lists the audiences the token is valid for. Either way ours must be there.
        if !status
            .audiences
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|a| a == audience)
        {
            return Err(AuthError::TokenRejected(format!(
                "the token is not valid for audience {audience:?}"
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        parse_service_account(&user).ok_or_else(|| {
            AuthError::TokenRejected(format!(
                "{user:?} is not a service account (system:serviceaccount:<namespace>:<name>)"
            ))
        })
    }
}

fn cache_key(token: &str, audience: &str) -> [u8; 32] {
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(audience.len() + 1 + token.len()));
    buf.extend_from_slice(audience.as_bytes());
    buf.push(0);
    buf.extend_from_slice(token.as_bytes());
    digest(&SHA256, &buf).as_ref().try_into().unwrap_or([0; 32])
}

impl TokenAuthenticator for TokenReviewer {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>> {
        Box::pin(self.caller_of(token, audience))
    }
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
pub fn parse_service_account(user: &str) -> Option<ServiceAccount> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| ServiceAccount {
        namespace: ns.to_owned(),
        name: sa.to_owned(),
    })
}

/// The `exp` claim of a JWT, read without verifying anything: it only bounds how long an answer
/// is cached (the API server did the verifying).
pub fn jwt_expiry(token: &str) -> Option<OffsetDateTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    OffsetDateTime::from_unix_timestamp(v.get("exp")?.as_i64()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_users() {
        assert_eq!(
            parse_service_account("system:serviceaccount:prod:web"),
            Some(ServiceAccount {
                namespace: "prod".into(),
                name: "web".into()
            })
        );
        for bad in [
            "alice",
            "system:serviceaccount:prod",
            "system:serviceaccount::web",
            "system:serviceaccount:prod:",
            "system:serviceaccount:a:b:c",
            "system:node:worker-1",
        ] {
            assert_eq!(parse_service_account(bad), None, "{bad}");
        }
    }

    #[test]
    fn jwt_exp_is_read_without_verification() {
        let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let t = format!(
            "{}.{}.sig",
            b("{\"alg\":\"RS256\"}"),
            b("{\"exp\":1700000000}")
        );
        assert_eq!(jwt_expiry(&t).unwrap().unix_timestamp(), 1_700_000_000);
        assert_eq!(jwt_expiry("mca_static"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_ne!(cache_key("t", "a"), cache_key("t", "b"));
    }
}
