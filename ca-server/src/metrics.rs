//! Prometheus metrics (prometheus-client). Names are fixed: dashboards and the shipped alert
//! rules depend on them.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `api` and `result` of one issuance attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// `meshca`, `istio` or `linkerd`.
    pub api: &'static str,
    /// `ok`, `unauthenticated`, `denied`, `invalid`, `unavailable`, `error`.
    pub result: &'static str,
}

/// A failure reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The server's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `meshca_certificates_issued_total{api,result}`.
    pub issued: Family<IssuedLabels, Counter>,
    /// `meshca_sign_duration_seconds`.
    pub sign_duration: Histogram,
    /// `meshca_authentication_failures_total{reason}`.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// `meshca_bundle_version`.
    pub bundle_version: Gauge,
    /// `meshca_issuer_rotations_total{result}`: issuer rotation steps (prepare, activate, prune).
    pub rotations: Family<ResultLabels, Counter>,
    /// `meshca_rotation_failures_consecutive`.
    pub rotation_failures: Gauge,
}

/// `success` or `failure`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The result.
    pub result: &'static str,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshca");
        let issued = Family::<IssuedLabels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Certificate requests by API and result",
            issued.clone(),
        );
        let sign_duration = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
        ]);
        registry.register_with_unit(
            "sign_duration",
            "Time to authenticate, validate and sign one request",
            prometheus_client::registry::Unit::Seconds,
            sign_duration.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "authentication_failures",
            "Refused credentials by reason",
            auth_failures.clone(),
        );
        let bundle_version = Gauge::default();
        registry.register(
            "bundle_version",
            "Version of the trust bundle being served",
            bundle_version.clone(),
        );
        let build = Family::<VersionLabels, Gauge>::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "meshca build information", build);
        let rotations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "issuer_rotations",
            "Issuer rotation steps by result",
            rotations.clone(),
        );
        let rotation_failures = Gauge::default();
        registry.register(
            "rotation_failures_consecutive",
            "Rotation failures since the last success",
            rotation_failures.clone(),
        );
        Self {
            registry,
            issued,
            sign_duration,
            auth_failures,
            bundle_version,
            rotations,
            rotation_failures,
        }
    }

    /// Counts one issuance attempt.
    pub fn count(&self, api: &'static str, result: &'static str, took: Duration) {
        self.issued
            .get_or_create(&IssuedLabels { api, result })
            .inc();
        self.sign_duration.observe(took.as_secs_f64());
    }

    /// Counts one rotation step and sets the consecutive failure count.
    pub fn rotation(&self, ok: bool, consecutive_failures: u32) {
        self.rotations
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        self.rotation_failures.set(i64::from(consecutive_failures));
    }

    /// The registry, for metrics defined elsewhere.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
