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
    /// `ok`, `unauthenticated`, `denied`, `invalid`, `unavailable`, `limited`, `error`.
    pub result: &'static str,
    /// `true` when a node agent asked on a workload's behalf (Istio's `ImpersonatedIdentity`).
    pub impersonated: &'static str,
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

/// One CA certificate the authority holds.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `anchor` or `issuer`.
    pub role: &'static str,
    /// Its status: anchors `active`, `staged`, `retiring`; issuers `active`, `prepared`, `retired`.
    pub state: String,
    /// Serial, hex.
    pub serial: String,
    /// meshca's id (first 8 bytes of the SHA-256 of the DER, hex).
    pub id: String,
}

/// `anchor` or `issuer`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// The role.
    pub role: &'static str,
}

/// A rotation phase.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `steady`, `staged`, `activated`.
    pub phase: &'static str,
}

/// A phase step.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// `activate`, `finish`, `rollback`.
    pub step: &'static str,
}

/// An anchor.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnchorLabels {
    /// Its id.
    pub anchor: String,
}

/// What the authority looks like, set from the committed state at every scrape (so it can never
/// be stale after a rotation).
#[derive(Debug, Default)]
pub struct AuthorityMetrics {
    /// `meshca_certificate_expiration_timestamp_seconds{role,state,serial,id}`.
    pub expiration: Family<CertLabels, Gauge>,
    /// `meshca_certificate_not_before_timestamp_seconds{role,state,serial,id}`.
    pub not_before: Family<CertLabels, Gauge>,
    /// `meshca_rotation_deadline_timestamp_seconds{role}`.
    pub deadline: Family<RoleLabels, Gauge>,
    /// `meshca_anchor_rotation_phase{phase}`: 1 for the current phase, 0 for the others.
    pub phase: Family<PhaseLabels, Gauge>,
    /// `meshca_anchor_phase_since_timestamp_seconds` (absent in steady).
    pub phase_since: Family<PhaseLabels, Gauge>,
    /// `meshca_anchor_gate_open{step}` for the steps of the current phase.
    pub gate_open: Family<StepLabels, Gauge>,
    /// `meshca_anchor_gate_fallback_timestamp_seconds{step}`: when the time fallback opens it.
    pub gate_fallback: Family<StepLabels, Gauge>,
    /// `meshca_bundle_convergence_ratio`.
    pub convergence: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `meshca_live_leaves{anchor}`.
    pub live_leaves: Family<AnchorLabels, Gauge>,
    /// `meshca_live_workloads`.
    pub live_workloads: Gauge,
    /// `meshca_ledger_trustworthy`: 1 when measured gates may be used.
    pub ledger_trustworthy: Gauge,
    /// `meshca_policy_leaf_ttl_max_seconds`.
    pub leaf_ttl_max: Gauge,
    /// `meshca_revoked_issuer_live_leaves{issuer}`: leaves of a revoked issuer not yet expired.
    pub revoked_live: Family<IssuerLabels, Gauge>,
    /// `meshca_revoked_issuer_last_expiry_timestamp_seconds{issuer}`.
    pub revoked_last_expiry: Family<IssuerLabels, Gauge>,
    /// `meshca_federation_bundle_sequence{trust_domain}`: the held bundle's `spiffe_sequence`.
    pub federation_sequence: Family<TrustDomainLabels, Gauge>,
    /// `meshca_federation_bundle_age_seconds{trust_domain}`, on the replica that refreshes it:
    /// since its last successful refresh (none yet: since the held bundle was fetched).
    pub federation_age: Family<TrustDomainLabels, Gauge>,
    /// `meshca_federation_last_refresh_timestamp_seconds{trust_domain}` (after a first success).
    pub federation_last_refresh: Family<TrustDomainLabels, Gauge>,
    /// `meshca_federation_refresh_failures{trust_domain}`: failed or refused fetches in a row.
    pub federation_failures: Family<TrustDomainLabels, Gauge>,
}

/// A federated trust domain.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    /// Its name.
    pub trust_domain: String,
}

/// An issuer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    /// Its id.
    pub issuer: String,
}

fn ts(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

impl AuthorityMetrics {
    /// Sets every gauge from the state and the ledger's view at `now`; label sets of
    /// certificates that are gone disappear.
    pub fn observe(
        &self,
        s: &rotator::state::AuthorityState,
        l: &rotator::ledger::LedgerSummary,
        policy: &rotator::policy::Policy,
        now: time::OffsetDateTime,
    ) {
        self.observe_certificates(s, policy);
        self.observe_phase(s, l, policy, now);
        #[allow(clippy::cast_precision_loss, reason = "a ratio")]
        let ratio = if l.live_workloads == 0 {
            1.0
        } else {
            l.workloads_current as f64 / l.live_workloads as f64
        };
        self.convergence.set(ratio);
        self.live_leaves.clear();
        for a in s.bundle() {
            self.live_leaves
                .get_or_create(&AnchorLabels {
                    anchor: a.cert.id().to_string(),
                })
                .set(i64::try_from(l.live_under(a.cert.id())).unwrap_or(i64::MAX));
        }
        self.live_workloads
            .set(i64::try_from(l.live_workloads).unwrap_or(i64::MAX));
        self.ledger_trustworthy.set(i64::from(l.trustworthy(now)));
        self.leaf_ttl_max
            .set(i64::try_from(policy.leaf_ttl_max.as_secs()).unwrap_or(i64::MAX));
        self.revoked_live.clear();
        self.revoked_last_expiry.clear();
        for r in &l.revoked_issuers {
            let labels = IssuerLabels {
                issuer: r.issuer.to_string(),
            };
            self.revoked_live
                .get_or_create(&labels)
                .set(i64::try_from(r.live_leaves).unwrap_or(i64::MAX));
            if let Some(t) = r.last_expires {
                self.revoked_last_expiry.get_or_create(&labels).set(t);
            }
        }
    }

    /// The federated trust domains: what the state holds for each, and how this replica's
    /// refreshes went (`statuses`: empty on a replica that does not refresh).
    pub fn observe_federation(
        &self,
        s: &rotator::state::AuthorityState,
        statuses: &std::collections::BTreeMap<rotator::spiffe::TrustDomain, PeerRefresh>,
        now: time::OffsetDateTime,
    ) {
        for f in [
            &self.federation_sequence,
            &self.federation_age,
            &self.federation_last_refresh,
            &self.federation_failures,
        ] {
            f.clear();
        }
        for b in &s.federated {
            let labels = TrustDomainLabels {
                trust_domain: b.trust_domain.to_string(),
            };
            self.federation_sequence
                .get_or_create(&labels)
                .set(i64::try_from(b.sequence).unwrap_or(i64::MAX));
            // The age only where it is known: on the replica that refreshes it (since its last
            // success, or since the held bundle was fetched if none yet).
            if let Some(st) = statuses.get(&b.trust_domain).filter(|st| st.refreshing) {
                let last = st.last_success.map_or(b.fetched, |t| t.max(b.fetched));
                self.federation_age
                    .get_or_create(&labels)
                    .set((now - last).whole_seconds().max(0));
            }
        }
        for (td, st) in statuses {
            let labels = TrustDomainLabels {
                trust_domain: td.to_string(),
            };
            if let Some(t) = st.last_success {
                self.federation_last_refresh
                    .get_or_create(&labels)
                    .set(ts(t));
            }
            self.federation_failures
                .get_or_create(&labels)
                .set(i64::from(st.consecutive_failures));
        }
    }

    /// Expiry and not-before of every anchor (archived ones excepted) and issuer held, and the
    /// rotation deadlines of the active ones.
    fn observe_certificates(
        &self,
        s: &rotator::state::AuthorityState,
        policy: &rotator::policy::Policy,
    ) {
        use rotator::state::AnchorStatus;
        self.expiration.clear();
        self.not_before.clear();
        let anchors = s
            .anchors
            .iter()
            .filter(|a| a.status != AnchorStatus::Archived)
            .map(|a| ("anchor", a.status.to_string(), &a.cert));
        let issuers = s
            .issuers
            .iter()
            .map(|i| ("issuer", i.status.to_string(), &i.cert));
        for (role, state, cert) in anchors.chain(issuers) {
            let labels = CertLabels {
                role,
                state,
                serial: cert.info.serial.clone(),
                id: cert.id().to_string(),
            };
            self.expiration
                .get_or_create(&labels)
                .set(ts(cert.info.not_after));
            self.not_before
                .get_or_create(&labels)
                .set(ts(cert.info.not_before));
        }
        self.deadline.clear();
        if let Some(a) = s.active_anchor() {
            let d = rotator::anchors::anchor_rotation_deadline(a.cert.info.not_after, policy);
            self.deadline
                .get_or_create(&RoleLabels { role: "anchor" })
                .set(ts(d));
        }
        if let Some(i) = s.active_issuer() {
            let d = rotator::anchors::issuer_rotation_deadline(i.cert.info.not_after, policy);
            self.deadline
                .get_or_create(&RoleLabels { role: "issuer" })
                .set(ts(d));
        }
    }

    /// The trust-anchor rotation: the phase, since when, and each gate of it.
    fn observe_phase(
        &self,
        s: &rotator::state::AuthorityState,
        l: &rotator::ledger::LedgerSummary,
        policy: &rotator::policy::Policy,
        now: time::OffsetDateTime,
    ) {
        let current = s.phase.name();
        for p in ["steady", "staged", "activated"] {
            self.phase
                .get_or_create(&PhaseLabels { phase: p })
                .set(i64::from(p == current));
        }
        self.phase_since.clear();
        match &s.phase {
            rotator::state::Phase::Staged { since, .. }
            | rotator::state::Phase::Activated { since, .. } => {
                self.phase_since
                    .get_or_create(&PhaseLabels { phase: current })
                    .set(ts(*since));
            }
            rotator::state::Phase::Steady => {}
        }
        self.gate_open.clear();
        self.gate_fallback.clear();
        for g in rotator::anchors::gates(s, policy, Some(l), now) {
            let step = g.step.name();
            if step == "stage" {
                continue;
            }
            self.gate_open
                .get_or_create(&StepLabels { step })
                .set(i64::from(g.open));
            if let Some(t) = g.opens_at {
                self.gate_fallback
                    .get_or_create(&StepLabels { step })
                    .set(ts(t));
            }
        }
    }

    fn register(&self, r: &mut Registry) {
        self.register_certificates(r);
        self.register_rotation(r);
        self.register_revocations(r);
        self.register_federation(r);
    }

    /// The certificates held: expiry, notBefore, and the rotation deadlines.
    fn register_certificates(&self, r: &mut Registry) {
        r.register(
            "certificate_expiration_timestamp_seconds",
            "notAfter of every anchor and issuer the authority holds (archived anchors excepted), Unix seconds",
            self.expiration.clone(),
        );
        r.register(
            "certificate_not_before_timestamp_seconds",
            "notBefore of every anchor and issuer the authority holds, Unix seconds",
            self.not_before.clone(),
        );
        r.register(
            "rotation_deadline_timestamp_seconds",
            "anchor: the last moment to start a rotation that finishes by its time gates before the active anchor expires; issuer: the moment the active issuer must be replaced by",
            self.deadline.clone(),
        );
    }

    /// The trust-anchor rotation and what its gates measure: phase, gates, convergence, the ledger.
    fn register_rotation(&self, r: &mut Registry) {
        r.register(
            "anchor_rotation_phase",
            "1 for the current trust-anchor rotation phase",
            self.phase.clone(),
        );
        r.register(
            "anchor_phase_since_timestamp_seconds",
            "When the current staged/activated phase began",
            self.phase_since.clone(),
        );
        r.register(
            "anchor_gate_open",
            "1 when the gate of a step of the current phase is open",
            self.gate_open.clone(),
        );
        r.register(
            "anchor_gate_fallback_timestamp_seconds",
            "When the time-based fallback opens the gate of a step of the current phase",
            self.gate_fallback.clone(),
        );
        r.register(
            "bundle_convergence_ratio",
            "Share of live workloads that have been handed the current bundle version",
            self.convergence.clone(),
        );
        r.register(
            "live_leaves",
            "Live leaves (newest per workload instance) by the anchor they chain to",
            self.live_leaves.clone(),
        );
        r.register(
            "live_workloads",
            "Live workload instances known to the issuance ledger",
            self.live_workloads.clone(),
        );
        r.register(
            "ledger_trustworthy",
            "1 when the issuance ledger has known every live leaf (measured gates in use)",
            self.ledger_trustworthy.clone(),
        );
        r.register(
            "policy_leaf_ttl_max_seconds",
            "The longest leaf lifetime granted",
            self.leaf_ttl_max.clone(),
        );
    }

    /// Revoked issuers and their leaves still out there.
    fn register_revocations(&self, r: &mut Registry) {
        r.register(
            "revoked_issuer_live_leaves",
            "Leaves of a revoked issuer that have not expired (they cannot renew with their certificate)",
            self.revoked_live.clone(),
        );
        r.register(
            "revoked_issuer_last_expiry_timestamp_seconds",
            "When the last leaf of a revoked issuer expires, Unix seconds",
            self.revoked_last_expiry.clone(),
        );
    }

    /// Federated trust domains: the bundle held for each and how its refreshes go.
    fn register_federation(&self, r: &mut Registry) {
        r.register(
            "federation_bundle_sequence",
            "The spiffe_sequence of the bundle held for a federated trust domain",
            self.federation_sequence.clone(),
        );
        r.register(
            "federation_bundle_age_seconds",
            "Seconds since a federated trust domain's bundle was last refreshed successfully",
            self.federation_age.clone(),
        );
        r.register(
            "federation_last_refresh_timestamp_seconds",
            "When a federated trust domain's bundle was last refreshed successfully, Unix seconds",
            self.federation_last_refresh.clone(),
        );
        r.register(
            "federation_refresh_failures",
            "Failed or refused fetches of a federated trust domain's bundle in a row",
            self.federation_failures.clone(),
        );
    }
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
    /// The authority's certificates, deadlines, phase and ledger view.
    pub authority: AuthorityMetrics,
    /// `meshca_limit_refusals_total{limit}`: requests and connections refused by `[limits]`.
    pub limit_refusals: Family<crate::issuing::limits::LimitLabels, Counter>,
    /// `meshca_issuer_source_refusals_total`: issuers from `kubernetes.issuer_secret`
    /// (cert-manager) that were not adopted (the last good issuer keeps signing).
    pub issuer_source_refusals: Counter,
    /// `meshca_pod_watch_stalls_total`: pod watches given up after hearing nothing (no event,
    /// no bookmark) for `k8s::pods::WATCH_IDLE`.
    pub pod_watch_stalls: Counter,
    /// `meshca_pod_watch_expired_total`: pod watches answered `410 Gone` (listed again).
    pub pod_watch_expired: Counter,
}

/// How this replica's refreshes of one federated trust domain went, as the federation metrics
/// need it (the federation module's status, seen from here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRefresh {
    /// Whether this replica refreshes it.
    pub refreshing: bool,
    /// The last fetch that succeeded.
    pub last_success: Option<time::OffsetDateTime>,
    /// Failed or refused fetches since.
    pub consecutive_failures: u32,
}

/// The Kubernetes counters: issuers refused from `kubernetes.issuer_secret`, pod watches stalled
/// and expired.
fn register_kubernetes(registry: &mut Registry) -> (Counter, Counter, Counter) {
    let issuer_source_refusals = Counter::default();
    registry.register(
        "issuer_source_refusals",
        "Issuers read from kubernetes.issuer_secret and refused (the last good one keeps signing)",
        issuer_source_refusals.clone(),
    );
    let pod_watch_stalls = Counter::default();
    registry.register(
        "pod_watch_stalls",
        "Pod watches given up after hearing nothing, not even a bookmark, for 90 s (listed again)",
        pod_watch_stalls.clone(),
    );
    let pod_watch_expired = Counter::default();
    registry.register(
        "pod_watch_expired",
        "Pod watches answered 410 Gone (their resourceVersion was compacted; listed again)",
        pod_watch_expired.clone(),
    );
    (issuer_source_refusals, pod_watch_stalls, pod_watch_expired)
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
        let limit_refusals = Family::<crate::issuing::limits::LimitLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Connections and requests refused by a [limits] cap, by limit",
            limit_refusals.clone(),
        );
        let (issuer_source_refusals, pod_watch_stalls, pod_watch_expired) =
            register_kubernetes(&mut registry);
        let authority = AuthorityMetrics::default();
        authority.register(&mut registry);
        let m = Self {
            registry,
            authority,
            issued,
            sign_duration,
            auth_failures,
            bundle_version,
            rotations,
            rotation_failures,
            limit_refusals,
            issuer_source_refusals,
            pod_watch_stalls,
            pod_watch_expired,
        };
        m.start_at_zero();
        m
    }

    /// Every counter exists from the start at 0, so rate() and the alert rules see it before
    /// the first event.
    fn start_at_zero(&self) {
        for l in crate::issuing::limits::Limit::ALL {
            self.limit_refusals
                .get_or_create(&crate::issuing::limits::LimitLabels { limit: l.label() })
                .inc_by(0);
        }
        for result in [
            "ok",
            "unauthenticated",
            "denied",
            "invalid",
            "unavailable",
            "limited",
            "error",
        ] {
            self.issued
                .get_or_create(&IssuedLabels {
                    api: "meshca",
                    result,
                    impersonated: "false",
                })
                .inc_by(0);
        }
        for reason in [
            "missing",
            "malformed",
            "unknown_token",
            "bad_client_cert",
            "denied",
            "unavailable",
            "identity_denied",
        ] {
            self.auth_failures
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        for result in ["success", "failure"] {
            self.rotations
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
    }

    /// Counts one issuance attempt.
    pub fn count(
        &self,
        api: &'static str,
        result: &'static str,
        impersonated: bool,
        took: Duration,
    ) {
        self.issued
            .get_or_create(&IssuedLabels {
                api,
                result,
                impersonated: if impersonated { "true" } else { "false" },
            })
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
