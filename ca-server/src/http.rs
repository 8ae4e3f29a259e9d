//! The HTTP face (axum): `/healthz`, `/readyz`, `/metrics`, `/bundle.pem`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::issuance::Issuer;
use crate::metrics::Metrics;
use crate::rotation::RotationHealth;
use crate::signing::ValidCsr;

/// The readiness check: a probe leaf can be signed with the current issuer right now, and issuer
/// rotation has not failed too often in a row.
pub struct Readiness {
    /// Signs the probe.
    pub issuer: Arc<Issuer>,
    /// The probe's CSR (made once at start-up).
    pub probe: ValidCsr,
    /// The rotation driver's health.
    pub health: Arc<RotationHealth>,
}

impl Readiness {
    /// `Ok(detail)` when ready (detail: what an operator should know, if anything), `Err(why)`.
    pub fn check(&self) -> Result<Option<String>, String> {
        self.issuer
            .probe(&self.probe)
            .map_err(|e| format!("cannot sign a probe leaf: {e}"))?;
        if !self.health.healthy() {
            return Err(format!(
                "issuer rotation failed {} times in a row: {}",
                self.health.consecutive_failures(),
                self.health.last_error().unwrap_or_default()
            ));
        }
        Ok(self.health.attention().map(|a| match a.deadline {
            Some(d) => format!("{} (deadline {})", a.message, rotator::clock::rfc3339(d)),
            None => a.message,
        }))
    }
}

/// What the handlers read.
pub struct HttpState {
    /// Serves the bundle.
    pub issuer: Arc<Issuer>,
    /// Exposed on /metrics.
    pub metrics: Arc<Metrics>,
    /// `/readyz`.
    pub readiness: Arc<Readiness>,
}

/// The router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/bundle.pem", get(bundle))
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
    let snap = s.issuer.authority().snapshot();
    s.metrics
        .bundle_version
        .set(i64::try_from(snap.bundle.version).unwrap_or(i64::MAX));
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
