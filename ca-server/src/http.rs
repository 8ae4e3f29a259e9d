//! The HTTP face (axum): `/healthz`, `/readyz`, `/metrics`, `/bundle.pem`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::issuance::Issuer;
use crate::metrics::Metrics;
use crate::signing::ValidCsr;

/// What the handlers read.
pub struct HttpState {
    /// Signs the readiness probe.
    pub issuer: Arc<Issuer>,
    /// Exposed on /metrics.
    pub metrics: Arc<Metrics>,
    /// The readiness probe's CSR (made once at start-up).
    pub probe: ValidCsr,
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
    match s.issuer.probe(&s.probe) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: cannot sign a probe leaf: {e}\n"),
        ),
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
