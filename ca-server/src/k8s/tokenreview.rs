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

pub use crate::issuing::auth::ServiceAccount;
use crate::issuing::auth::{AuthError, Caller, CallerKind, TokenAuthenticator};
use crate::issuing::limits::Limits;

/// The TokenReview `user.extra` key naming the node of the pod a token is bound to.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The TokenReview `user.extra` key naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview `user.extra` key holding that pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How long a gone pod's UID is remembered: longer than the API server's own caches take to see
/// the deletion (its answers for that pod's tokens are refused meanwhile), short enough to
/// bound the memory (at most [`GONE_PODS_MAX`] UIDs).
pub const GONE_PODS_TTL: Duration = Duration::from_secs(300);
/// At most this many gone pods are remembered (the oldest go first): ~100 bytes each.
pub const GONE_PODS_MAX: usize = 10_000;

type Answer = Result<ServiceAccount, AuthError>;

struct Entry {
    answer: Answer,
    until: OffsetDateTime,
}

/// Whether `answer` accepts a token bound to the pod `ns/name` (with UID `uid`, when known on
/// both sides).
fn bound_to(answer: &Answer, ns: &str, name: &str, uid: Option<&str>) -> bool {
    match answer {
        Ok(sa) => match (sa.pod_uid.as_deref(), uid) {
            (Some(a), Some(b)) => a == b,
            _ => sa.namespace == ns && sa.pod.as_deref() == Some(name),
        },
        Err(_) => false,
    }
}

/// Reviews tokens, with a bounded cache. A token that cannot be a ServiceAccount JWT for this
/// face is refused before any API call ([`precheck`]); concurrent requests with the same token
/// share one review; the reviews sent are capped in rate and in flight (`[limits]`), and beyond
/// a cap a request fails `Unavailable` while cached answers keep serving.
pub struct TokenReviewer {
    client: kube::Client,
    trust_domain: TrustDomain,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    capacity: usize,
    cache: std::sync::Mutex<HashMap<[u8; 32], Entry>>,
    in_flight: Flights,
    limits: Arc<Limits>,
    calls: AtomicU64,
    keys: super::jwks::SigningKeys,
    forged: AtomicU64,
    /// Pods the pod directory saw go, by UID, with when: a review that still accepts a token
    /// bound to one (the API server's caches lag its own deletion) is refused, not cached.
    gone: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

type Flights = std::sync::Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<Answer>>>>;

/// A caller's share of a review in flight: when it ends — answered, or dropped because its
/// caller went away — the flight's entry goes (if it is still this flight's), so an abandoned
/// review leaves nothing behind.
struct Flight<'a> {
    flights: &'a Flights,
    key: [u8; 32],
    cell: Arc<tokio::sync::OnceCell<Answer>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            flights.remove(&self.key);
        }
    }
}

/// The largest token reviewed. Projected ServiceAccount tokens are about 1 KiB; anything over
/// this is refused before the API server sees it.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
        limits: Arc<Limits>,
    ) -> Self {
        Self {
            trust_domain,
            clock,
            ttl,
            capacity: capacity.max(1),
            cache: Default::default(),
            in_flight: Default::default(),
            limits,
            calls: AtomicU64::new(0),
            keys: super::jwks::SigningKeys::new(client.clone()),
            forged: AtomicU64::new(0),
            gone: Default::default(),
            client,
        }
    }

    /// Tokens refused because their signature did not verify with the API server's keys (they
    /// never reached a TokenReview).
    pub fn forged(&self) -> u64 {
        self.forged.load(Ordering::Relaxed)
    }

    /// Fetches of the API server's signing keys so far.
    pub async fn key_fetches(&self) -> u64 {
        self.keys.fetches().await
    }

    /// Reviews in flight (each shared by every caller with the same token).
    pub fn in_flight(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// TokenReviews sent to the API server so far.
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Cached answers.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    /// Pod `ns/name` (UID `uid`) is gone: the cached answers for tokens bound to it are
    /// dropped, and for [`GONE_PODS_TTL`] an answer that still accepts one (the API server's own
    /// caches see the deletion a moment later) is refused instead of used or cached.
    pub fn forget_pod(&self, ns: &str, name: &str, uid: Option<&str>) -> usize {
        if let Some(uid) = uid {
            let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
            gone.retain(|_, t| t.elapsed() < GONE_PODS_TTL);
            if gone.len() >= GONE_PODS_MAX
                && let Some(oldest) = gone.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone())
            {
                gone.remove(&oldest);
            }
            gone.insert(uid.to_owned(), std::time::Instant::now());
        }
        let mut cache = self.lock();
        let before = cache.len();
        cache.retain(|_, e| !bound_to(&e.answer, ns, name, uid));
        before - cache.len()
    }

    /// `answer`, or a refusal when it accepts a token bound to a pod seen gone.
    fn unless_gone(&self, answer: Answer) -> Answer {
        let Ok(sa) = &answer else { return answer };
        let Some(uid) = sa.pod_uid.as_deref() else {
            return answer;
        };
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        match gone.get(uid) {
            Some(t) if t.elapsed() < GONE_PODS_TTL => Err(AuthError::TokenRejected(format!(
                "the pod the token is bound to, {}/{}, was deleted",
                sa.namespace,
                sa.pod.as_deref().unwrap_or("?")
            ))),
            _ => answer,
        }
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
            kind: CallerKind::ServiceAccount(sa),
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
        precheck(token, audience, now)?;
        // A signature the API server's keys do not verify is no ServiceAccount token: refused
        // here, it costs no TokenReview (unknown keys were fetched again first).
        match self.keys.check(token).await {
            Some(super::jwks::Verdict::Invalid(why) | super::jwks::Verdict::UnknownKey(why)) => {
                self.forged.fetch_add(1, Ordering::Relaxed);
                return Err(AuthError::TokenRejected(format!(
                    "not a token of this cluster: {why}"
                )));
            }
            Some(super::jwks::Verdict::Valid) | None => {}
        }
        // One review per token at a time: later callers wait for the first one's answer.
        let cell = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let _flight = Flight {
            flights: &self.in_flight,
            key,
            cell: cell.clone(),
        };
        // The flight that asks also caches the answer, before the flight ends: a caller that
        // comes after it finds the cache, and the waiters only read.
        // `_flight` ends (and the entry goes) after this, or when the caller goes away.
        cell.get_or_init(|| async {
            let answer = self.unless_gone(self.ask_within_limits(token, audience).await);
            self.remember(key, token, &answer, now);
            answer
        })
        .await
        .clone()
    }

    /// Caches `answer` for `token` (never the API server's absence, or a limit): accepted ones
    /// for the TTL, refusals for [`NEGATIVE_TTL`], never past the token's own `exp`; at most
    /// `capacity` entries, the soonest-expiring going first.
    fn remember(&self, key: [u8; 32], token: &str, answer: &Answer, now: OffsetDateTime) {
        if matches!(answer, Err(AuthError::Unavailable(_))) {
            return;
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
        if until <= now {
            return;
        }
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

    /// A review within `[limits]`: `Unavailable` (not cached) when a cap is reached.
    async fn ask_within_limits(&self, token: &str, audience: &str) -> Answer {
        let _slot = self.limits.token_review().map_err(|l| {
            AuthError::Unavailable(format!(
                "TokenReview refused by limits.{}: the API server is being spared; retry shortly",
                l.label()
            ))
        })?;
        self.ask(token, audience).await
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
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let mut sa = parse_service_account(&name).ok_or_else(|| {
            AuthError::TokenRejected(format!(
                "{name:?} is not a service account (system:serviceaccount:<namespace>:<name>)"
            ))
        })?;
        // The bound pod and its node, when the token is a projected one (one value each).
        let extra = |k: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(k))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        sa.node = extra(EXTRA_NODE_NAME);
        sa.pod = extra(EXTRA_POD_NAME);
        sa.pod_uid = extra(EXTRA_POD_UID);
        Ok(sa)
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

/// Whether `token` can be a ServiceAccount JWT for `audience` at `now`, judged from its shape
/// alone (nothing is verified here: the API server does that). Refuses what no API server would
/// accept, before any call: too long, not three base64url parts, a header or payload that is not
/// a JSON object, an unsigned (`alg: none`) token, an `exp` in the past, an `aud` that does not
/// name this face's audience. A token without `exp` or `aud` (a legacy Secret token) goes on
/// to the API server, which decides.
pub fn precheck(token: &str, audience: &str, now: OffsetDateTime) -> Result<(), AuthError> {
    let bad = |why: &str| {
        Err(AuthError::TokenRejected(format!(
            "not a ServiceAccount token: {why}"
        )))
    };
    if token.len() > MAX_TOKEN_BYTES {
        return bad(&format!("longer than {MAX_TOKEN_BYTES} bytes"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return bad("a JWT has three non-empty dot-separated parts");
    }
    let json = |part: &str| -> Option<serde_json::Map<String, serde_json::Value>> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let Some(header) = json(parts[0]) else {
        return bad("its header is not base64url JSON");
    };
    let Some(claims) = json(parts[1]) else {
        return bad("its payload is not base64url JSON");
    };
    match header.get("alg").and_then(|a| a.as_str()) {
        None => return bad("its header names no algorithm"),
        Some(a) if a.eq_ignore_ascii_case("none") => return bad("it is unsigned (alg none)"),
        Some(_) => {}
    }
    if let Some(exp) = claims.get("exp") {
        match exp.as_i64() {
            Some(e) if e <= now.unix_timestamp() => {
                return Err(AuthError::TokenRejected(format!(
                    "the token expired at {}",
                    OffsetDateTime::from_unix_timestamp(e)
                        .map_or_else(|_| e.to_string(), rotator::clock::rfc3339)
                )));
            }
            Some(_) => {}
            None => return bad("its exp is not a number"),
        }
    }
    let names = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s == audience,
        serde_json::Value::Array(a) => a.iter().any(|x| x.as_str() == Some(audience)),
        _ => false,
    };
    if let Some(aud) = claims.get("aud")
        && !names(aud)
    {
        return Err(AuthError::TokenRejected(format!(
            "the token is not valid for audience {audience:?}"
        )));
    }
    Ok(())
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
pub fn parse_service_account(user: &str) -> Option<ServiceAccount> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| ServiceAccount {
        namespace: ns.to_owned(),
        name: sa.to_owned(),
        node: None,
        pod: None,
        pod_uid: None,
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

    /// A review whose caller goes away leaves no in-flight entry (issue #25, item 2): the API
    /// server here answers 404 to the key set and never answers the TokenReview.
    #[tokio::test]
    async fn an_abandoned_review_leaves_nothing_in_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if buf[..n].starts_with(b"GET /openid") {
                        let _ = s
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                    // Anything else: hold the connection, never answer.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let client =
            kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
                .unwrap();
        let r = TokenReviewer::new(
            client,
            "cluster.local".parse().unwrap(),
            Arc::new(rotator::clock::SystemClock),
            Duration::from_secs(60),
            10,
            Arc::new(Limits::new(
                crate::process::config::LimitsConfig::unlimited(),
                prometheus_client::metrics::family::Family::default(),
            )),
        );
        let token = jwt(r#"{"alg":"RS256","kid":"k"}"#, r#"{"aud":["meshca"]}"#);
        let gave_up = tokio::time::timeout(Duration::from_millis(300), r.review(&token, "meshca"))
            .await
            .is_err();
        assert!(gave_up, "the review was still waiting");
        assert_eq!(r.in_flight(), 0, "the abandoned flight's entry is gone");
    }

    fn jwt(header: &str, claims: &str) -> String {
        let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.c2ln", b(header), b(claims))
    }

    #[test]
    fn precheck_refuses_what_no_api_server_would_accept() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let ok = |t: &str| precheck(t, "meshca", now).is_ok();
        let h = r#"{"alg":"RS256","kid":"k"}"#;
        assert!(ok(&jwt(h, r#"{"aud":["meshca"],"exp":1800000001}"#)));
        assert!(ok(&jwt(h, r#"{"aud":"meshca"}"#)));
        assert!(ok(&jwt(h, r#"{"sub":"legacy, no aud or exp"}"#)));
        for bad in [
            "mca_static-token".to_owned(),
            "a.b".to_owned(),
            "a..c".to_owned(),
            jwt("not json", "{}"),
            jwt(h, "[1]"),
            jwt(r#"{"typ":"JWT"}"#, "{}"),
            jwt(r#"{"alg":"none"}"#, "{}"),
            jwt(h, r#"{"exp":1800000000}"#),
            jwt(h, r#"{"exp":"soon"}"#),
            jwt(h, r#"{"aud":["istio-ca"]}"#),
            format!("{}{}", jwt(h, "{}"), "A".repeat(MAX_TOKEN_BYTES)),
        ] {
            assert!(
                matches!(
                    precheck(&bad, "meshca", now),
                    Err(AuthError::TokenRejected(_))
                ),
                "{bad:.60}"
            );
        }
    }

    #[test]
    fn service_account_users() {
        assert_eq!(
            parse_service_account("system:serviceaccount:prod:web"),
            Some(ServiceAccount {
                namespace: "prod".into(),
                name: "web".into(),
                node: None,
                pod: None,
                pod_uid: None,
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
