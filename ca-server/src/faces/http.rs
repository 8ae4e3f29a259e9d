//! The HTTP face (axum): `/healthz`, `/readyz`, `/metrics`, `/bundle.pem`, and
//! `/spiffe-bundle.json` (the SPIFFE trust bundle format, for federation with SPIRE).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::issuing::issuance::SigningCore;
use crate::issuing::limits::Limits;
use crate::issuing::signing::ValidCsr;
use crate::process::driver::RotationHealth;
use crate::process::metrics::Metrics;

/// A probe's answer: when, for which state generation, and what it said.
type Probed = (tokio::time::Instant, u64, Result<(), String>);

/// The readiness check: a probe leaf can be signed with the current issuer right now, and issuer
/// rotation has not failed too often in a row. `/readyz` is unauthenticated, so the probe's
/// result is reused for `cache` (and while the authority's generation is unchanged): a flood of
/// probes signs at most one leaf per `cache`.
pub struct Readiness {
    /// Signs the probe.
    pub issuer: Arc<SigningCore>,
    /// The probe's CSR (made once at start-up).
    pub probe: ValidCsr,
    /// The rotation driver's health.
    pub health: Arc<RotationHealth>,
    cache: Duration,
    last: Mutex<Option<Probed>>,
    signed: AtomicU64,
}

impl Readiness {
    /// A readiness check signing a probe leaf for `spiffe://<td>/meshca/readiness-probe` (its
    /// key and CSR made once, here) through `issuer`, and reading the rotation driver's health.
    pub fn new(
        issuer: Arc<SigningCore>,
        health: Arc<RotationHealth>,
        cache: Duration,
    ) -> Result<Self, String> {
        let key = rotator::pki::SecretKey::generate_p256().map_err(|e| e.to_string())?;
        let id = format!(
            "spiffe://{}/meshca/readiness-probe",
            issuer.authority().snapshot().bundle.trust_domain
        )
        .parse()
        .map_err(|e: rotator::spiffe::IdError| e.to_string())?;
        let csr = rotator::client::make_csr(&id, &key).map_err(|e| e.to_string())?;
        let probe = crate::issuing::signing::parse_csr(&csr).map_err(|e| e.to_string())?;
        Ok(Self {
            issuer,
            probe,
            health,
            cache,
            last: Mutex::default(),
            signed: AtomicU64::new(0),
        })
    }

    /// Probe leaves signed so far.
    pub fn probes_signed(&self) -> u64 {
        self.signed.load(Ordering::Relaxed)
    }

    /// Whether a probe leaf can be signed: the last answer if it is younger than `cache` and
    /// the authority has not changed since, else a new probe.
    fn probe(&self) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        let generation = self.issuer.authority().snapshot().generation;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, g, r)) = last.as_ref()
            && *g == generation
            && now.duration_since(*at) < self.cache
        {
            return r.clone();
        }
        self.signed.fetch_add(1, Ordering::Relaxed);
        let r = self
            .issuer
            .probe(&self.probe)
            .map(|_| ())
            .map_err(|e| format!("cannot sign a probe leaf: {e}"));
        *last = Some((now, generation, r.clone()));
        r
    }

    /// `Ok(detail)` when ready (detail: what an operator should know, if anything), `Err(why)`.
    pub fn check(&self) -> Result<Option<String>, String> {
        // A lost token first: the cached probe may predate it.
        if let Some(keys) = rotator::keys::ca_key_store() {
            keys.health().map_err(|why| format!("key store: {why}"))?;
        }
        self.probe()?;
        if !self.health.healthy() {
            return Err(format!(
                "issuer rotation failed {} times in a row: {}",
                self.health.consecutive_failures(),
                self.health.last_error().unwrap_or_default()
            ));
        }
        let attention = self.health.attention().map(|a| match a.deadline {
            Some(d) => format!("{} (deadline {})", a.message, rotator::clock::rfc3339(d)),
            None => a.message,
        });
        // A failing local write (bundle file, ledger) is said, but does not take the CA out of
        // service: it still signs, and every replica on a full disk going unready is an outage.
        let disk = self.issuer.authority().disk().describe();
        Ok(match (attention, disk) {
            (Some(a), Some(d)) => Some(format!("{a}; {d}")),
            (a, d) => a.or(d),
        })
    }
}

/// What the handlers read.
pub struct HttpState {
    /// Serves the bundle.
    pub issuer: Arc<SigningCore>,
    /// Exposed on /metrics.
    pub metrics: Arc<Metrics>,
    /// `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Federated trust domains' refreshes, for `/metrics`.
    pub federation: Arc<crate::federation::fetch::Federation>,
}

/// Serves the HTTP port until `stop`: HTTP/1.1, at most `limits.http_max_connections` open
/// connections (one over it is closed at once), request headers within
/// `limits.http_header_timeout` (a slow client is dropped).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    limits: Arc<Limits>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    serve_app(listener, router(Arc::new(state)), None, limits, stop).await;
}

/// Serves `app` over HTTP/1.1 on `listener` until `stop` — in TLS when `tls` is given (the
/// handshake within [`crate::process::tls::HANDSHAKE_TIMEOUT`]) — under the HTTP port's limits: at most
/// `limits.http_max_connections` open connections (shared by every port served so), request
/// headers within `limits.http_header_timeout`.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<Limits>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let Some(slot) = limits.http_connection(addr.ip()) else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_timeout = limits.config().http_header_timeout;
        let mut stop = stop.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _slot = slot;
            let io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout(
                        crate::process::tls::HANDSHAKE_TIMEOUT,
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, "TLS handshake: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%addr, "HTTP connection: {e}");
                    }
                }
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}

/// The router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/bundle.pem", get(bundle))
        .route("/spiffe-bundle.json", get(spiffe_bundle))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    match s.readiness.check() {
        Ok(None) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Some(detail)) => (StatusCode::OK, format!("ready\nattention: {detail}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let authority = s.issuer.authority();
    let snap = authority.snapshot();
    s.metrics
        .bundle_version
        .set(i64::try_from(snap.bundle.version).unwrap_or(i64::MAX));
    // From the committed state at scrape time: never stale after a rotation.
    let summary = authority.ledger_summary_for_scrape().await;
    let (policy, now) = (authority.policy().clone(), authority.clock().now());
    let federation = s
        .federation
        .statuses()
        .into_iter()
        .map(|(td, st)| {
            let seen = crate::process::metrics::PeerRefresh {
                refreshing: st.refreshing,
                last_success: st.last_success,
                consecutive_failures: st.consecutive_failures,
            };
            (td, seen)
        })
        .collect();
    authority
        .read(|st| {
            s.metrics.authority.observe(st, &summary, &policy, now);
            s.metrics.authority.observe_federation(st, &federation, now);
        })
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn bundle(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let snap = s.issuer.authority().snapshot();
    (
        [
            (header::CONTENT_TYPE, "application/x-pem-file".to_owned()),
            (
                header::HeaderName::from_static("x-meshca-bundle-version"),
                snap.bundle.version.to_string(),
            ),
        ],
        snap.bundle.pem.clone(),
    )
}

/// A byte stream a connection is served over: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// `spiffe_refresh_hint` in `/spiffe-bundle.json`: how often federated peers should fetch it.
/// Five minutes, as SPIRE's default, so a staged anchor reaches federated peers well within the
/// propagation allowance.
pub const SPIFFE_REFRESH_HINT_SECONDS: u64 = 300;

async fn spiffe_bundle(State(s): State<Arc<HttpState>>) -> axum::response::Response {
    crate::federation::document::spiffe_bundle_response(
        &s.issuer.authority().snapshot().bundle,
        SPIFFE_REFRESH_HINT_SECONDS,
    )
}
