//! The status document: one typed description of an authority at `now`, built from the state
//! alone (so `meshca status` can read a state dir when no server runs) and extended by a running
//! server with its health. The server sends it as JSON over the admin socket; `meshca status
//! --output json` prints it; [`render`] turns it into the text view, so both views always agree.
//! The CLI reads it back into the same types: a renamed field fails to compile, not to print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::anchors::Gate;
use crate::clock::{rfc3339_utc, rfc3339_utc::option as rfc3339_opt};
use crate::ledger::LedgerSummary;
use crate::pki::CertId;
use crate::policy::Policy;
use crate::rotation::{IssuerStep, plan_issuer, schedule};
use crate::state::{AnchorStatus, AuthorityState, IssuerStatus, Phase, human, key_id};

/// The whole document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// When it was made.
    #[serde(with = "rfc3339_utc")]
    pub now: OffsetDateTime,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The committed state's generation.
    pub generation: u64,
    /// The bundle version.
    pub bundle_version: u64,
    /// The trust-anchor rotation phase.
    pub phase: Phase,
    /// Whether meshca makes its own issuers.
    pub mode: Mode,
    /// Every anchor, oldest first.
    pub anchors: Vec<AnchorEntry>,
    /// Every issuer, oldest first.
    pub issuers: Vec<IssuerEntry>,
    /// Upstream mode: the key waiting for `meshca issuer import`.
    pub pending_issuer_key: Option<PendingKeyEntry>,
    /// The issuer rotation's next step, if one is scheduled.
    pub next_issuer_rotation: Option<NextStep>,
    /// What an operator must do, and by when.
    pub attention: Vec<AttentionEntry>,
    /// Expired certificates that still matter.
    pub problems: Vec<String>,
    /// The trust-anchor rotation: phase, gates, ledger.
    pub anchor_rotation: AnchorRotation,
    /// When each rotation must have happened at the latest.
    pub rotation_deadlines: Deadlines,
    /// The policy the times were computed with.
    pub policy: PolicyEntry,
    /// The running server's health (absent when read from a state dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerEntry>,
    /// Federated trust domains: the bundle held for each, and (from a running server) how its
    /// refreshes go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federation: Vec<FederationEntry>,
}

/// A federated trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationEntry {
    /// The trust domain.
    pub trust_domain: String,
    /// Its endpoint's `spiffe_sequence` (0: the bootstrap bundle).
    pub sequence: u64,
    /// How many anchors are held for it.
    pub anchors: usize,
    /// When the held bundle was fetched (or bootstrapped).
    #[serde(with = "rfc3339_utc")]
    pub fetched: OffsetDateTime,
    /// From the running server that refreshes it: seconds since its last successful refresh
    /// (none yet: since `fetched`). Absent offline and on a replica that does not refresh it
    /// (when the held bundle was last confirmed is not known there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<i64>,
    /// From a running server that refreshes it: failed or refused fetches in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// The last failure's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A federated bundle older than this (no successful refresh) is stale for `meshca check` and the
/// `MeshcaFederatedBundleStale` alert: six refreshes at the default 5-minute hint.
pub const FEDERATION_STALE_SECONDS: i64 = 1800;

/// Whether meshca holds the active anchor's key (`local`) or issuers come from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// meshca signs its own issuers.
    Local,
    /// The anchor's key is elsewhere: `meshca issuer csr` / `import`.
    Upstream,
}

/// One anchor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnchorEntry {
    /// Its id.
    pub id: CertId,
    /// Its status.
    pub status: AnchorStatus,
    /// Whether its key is here.
    pub key_held: bool,
    /// Where the key lives when it is in a key store: its reference (`pkcs11:token=…;id=…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_store: Option<String>,
    /// Its key was here and has been destroyed after archival (`policy.key_retention`), as
    /// the journal records.
    #[serde(default)]
    pub key_destroyed: bool,
    /// Serial, hex.
    pub serial: String,
    /// Subject.
    pub subject: String,
    /// notBefore.
    #[serde(with = "rfc3339_utc")]
    pub not_before: OffsetDateTime,
    /// notAfter.
    #[serde(with = "rfc3339_utc")]
    pub not_after: OffsetDateTime,
    /// Seconds from `now` to notAfter (negative: expired).
    pub expires_in_seconds: i64,
}

/// One issuer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuerEntry {
    /// Its id.
    pub id: CertId,
    /// Its status.
    pub status: IssuerStatus,
    /// The anchor it chains to.
    pub anchor: CertId,
    /// Where its key lives when it is in a key store: its reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_store: Option<String>,
    /// Serial, hex.
    pub serial: String,
    /// notBefore.
    #[serde(with = "rfc3339_utc")]
    pub not_before: OffsetDateTime,
    /// notAfter.
    #[serde(with = "rfc3339_utc")]
    pub not_after: OffsetDateTime,
    /// Seconds from `now` to notAfter (negative: expired).
    pub expires_in_seconds: i64,
    /// The active issuer: when its successor is prepared.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub prepare_next_at: Option<OffsetDateTime>,
    /// The active issuer: when its successor takes over.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub activate_next_at: Option<OffsetDateTime>,
}

/// The pending issuer key (upstream mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingKeyEntry {
    /// The key's id.
    pub id: String,
    /// When it was made.
    #[serde(with = "rfc3339_utc")]
    pub created: OffsetDateTime,
}

/// The issuer rotation's next step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NextStep {
    /// `prepare`, `activate` or `prune`.
    pub step: String,
    /// The issuer to activate, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<CertId>,
    /// When.
    #[serde(with = "rfc3339_utc")]
    pub at: OffsetDateTime,
}

/// Something an operator must do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttentionEntry {
    /// What to do.
    pub message: String,
    /// By when (`None`: overdue already).
    #[serde(with = "rfc3339_opt")]
    pub deadline: Option<OffsetDateTime>,
    /// Seconds from `now` to the deadline.
    pub deadline_in_seconds: Option<i64>,
}

/// The trust-anchor rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnchorRotation {
    /// The phase's name.
    pub phase: String,
    /// The gate of every step.
    pub gates: Vec<GateEntry>,
    /// The running server's issuance ledger (`None` from a state dir).
    pub ledger: Option<LedgerEntry>,
}

/// One gate, with its one-line explanation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateEntry {
    /// The gate.
    #[serde(flatten)]
    pub gate: Gate,
    /// [`Gate::explain`].
    pub explain: String,
    /// Seconds from `now` to when the time fallback opens it.
    pub opens_in_seconds: Option<i64>,
}

/// What the issuance ledger measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// It knows every leaf signed since then.
    #[serde(with = "rfc3339_utc")]
    pub complete_since: OffsetDateTime,
    /// Its measurements count from then.
    #[serde(with = "rfc3339_utc")]
    pub trustworthy_at: OffsetDateTime,
    /// Whether they count now.
    pub trustworthy: bool,
    /// Other replicas sign too: it never sees every leaf.
    pub partial: bool,
    /// Live leaves by the anchor they chain to.
    pub live_leaves_by_anchor: BTreeMap<CertId, u64>,
    /// Live workloads (instances).
    pub live_workloads: u64,
    /// Of which hold the current bundle version or newer.
    pub workloads_with_current_bundle: u64,
    /// The version counted against.
    pub current_bundle_version: u64,
    /// `workloads_with_current_bundle` in percent of `live_workloads` (100 when none).
    pub convergence_percent: f64,
    /// The same counts by the face each workload's newest leaf came in on (`meshca`, `istio`,
    /// `linkerd`); faces without live workloads are left out.
    #[serde(default)]
    pub by_api: BTreeMap<crate::ledger::Api, crate::ledger::ApiConvergence>,
    /// Workloads that read trust anchors only at start (Linkerd's proxies), counted from pods.
    #[serde(default)]
    pub restart_bound: crate::ledger::RestartBound,
    /// Live leaves under each revoked issuer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_issuers: Vec<crate::ledger::RevokedLive>,
}

/// The latest moment each rotation must happen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deadlines {
    /// The active anchor's.
    pub anchor: Option<Deadline>,
    /// The active issuer's.
    pub issuer: Option<Deadline>,
}

/// One deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deadline {
    /// The certificate it is for.
    pub id: CertId,
    /// When.
    #[serde(with = "rfc3339_utc")]
    pub at: OffsetDateTime,
    /// Seconds from `now`.
    pub in_seconds: i64,
}

/// The policy's times, in seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// Longest leaf lifetime.
    pub leaf_ttl_max_seconds: u64,
    /// Default leaf lifetime.
    pub leaf_ttl_default_seconds: u64,
    /// notBefore back-dating.
    pub clock_skew_seconds: u64,
    /// Time allowed for a bundle to reach every workload.
    pub propagation_allowance_seconds: u64,
    /// Issuer lifetime.
    pub issuer_ttl_seconds: u64,
}

/// A running server's health.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerEntry {
    /// meshca's version.
    pub version: String,
    /// Whether `/readyz` answers ready.
    pub ready: bool,
    /// Issuer rotation failures in a row.
    pub rotation_failures_consecutive: u32,
    /// The last one's error.
    pub last_rotation_error: Option<String>,
}

impl Status {
    /// The active issuer's entry.
    pub fn active_issuer(&self) -> Option<&IssuerEntry> {
        self.issuers
            .iter()
            .find(|i| i.status == IssuerStatus::Active)
    }

    /// The active anchor's entry.
    pub fn active_anchor(&self) -> Option<&AnchorEntry> {
        self.anchors
            .iter()
            .find(|a| a.status == AnchorStatus::Active)
    }
}

/// A key store's reference for `k`, if it lives in one.
fn stored_at(k: &crate::pki::SecretKey) -> Option<String> {
    match k.location() {
        crate::pki::KeyLocation::Stored(r) => Some(r),
        crate::pki::KeyLocation::State => None,
    }
}

/// The TRUST-ANCHOR ROTATION section's ledger lines: convergence (by face), revoked issuers'
/// leaves, Linkerd proxies, live leaves by anchor.
fn render_ledger(o: &mut String, l: &LedgerEntry) {
    use std::fmt::Write;
    let at = |t: OffsetDateTime| crate::clock::rfc3339(t);
    let _ = writeln!(
        o,
        "  bundle convergence: {} of {} live workloads ({:.1} %) hold bundle v{} or newer",
        l.workloads_with_current_bundle,
        l.live_workloads,
        l.convergence_percent,
        l.current_bundle_version,
    );
    if l.by_api.keys().any(|a| *a != crate::ledger::Api::Meshca) {
        for (api, c) in &l.by_api {
            let _ = writeln!(
                o,
                "    {:<8} {} of {} live workloads{}",
                api.label(),
                c.workloads_current,
                c.live_workloads,
                match api {
                    crate::ledger::Api::Linkerd => {
                        " (proxies take anchors from their pod spec, not from meshca)"
                    }
                    crate::ledger::Api::Pod => {
                        " (pods read anchors from the ClusterTrustBundle: counted as current 2 min + the propagation allowance after it is written)"
                    }
                    _ => "",
                }
            );
        }
    }
    for r in &l.revoked_issuers {
        let _ = writeln!(
            o,
            "  revoked issuer {}: {} live leaves{}",
            r.issuer,
            r.live_leaves,
            r.last_expires
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                .map(|t| format!(", the last expires {}", at(t)))
                .unwrap_or_default()
        );
    }
    match &l.restart_bound {
        crate::ledger::RestartBound::NotTracked => {}
        crate::ledger::RestartBound::Unknown { reason } => {
            let _ = writeln!(o, "  Linkerd proxies: not counted ({reason})");
        }
        crate::ledger::RestartBound::Counted {
            proxies,
            stale,
            by_creation_time,
            ..
        } => {
            let _ = writeln!(
                o,
                "  Linkerd proxies started with the current anchors: {} of {proxies} ({stale} to restart: meshca anchors restarts){}",
                proxies - (*stale).min(*proxies),
                if *by_creation_time > 0 {
                    format!(
                        "; {by_creation_time} without the linkerd.io/trust-root-sha256 annotation, judged by creation time"
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    let by: Vec<String> = l
        .live_leaves_by_anchor
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    let _ = writeln!(
        o,
        "  live leaves by anchor: {}",
        if by.is_empty() {
            "none".into()
        } else {
            by.join(", ")
        }
    );
}

/// The status of `s` at `now` under `policy`; `ledger` is the running server's issuance ledger
/// (`None` when read from a state dir: gates are then time-based only).
pub fn document(
    s: &AuthorityState,
    policy: &Policy,
    ledger: Option<&LedgerSummary>,
    now: OffsetDateTime,
) -> Status {
    let secs = |t: OffsetDateTime| (t - now).whole_seconds();
    let gates = crate::anchors::gates(s, policy, ledger, now)
        .into_iter()
        .map(|g| GateEntry {
            explain: g.explain(),
            opens_in_seconds: g.opens_at.map(secs),
            gate: g,
        })
        .collect();
    let ledger = ledger.map(|l| ledger_entry(l, now));
    let plan = plan_issuer(s, policy, now);
    let next_issuer_rotation = next_issuer_step(&plan, now);
    Status {
        now,
        trust_domain: s.trust_domain.to_string(),
        generation: s.generation,
        bundle_version: s.bundle_version,
        phase: s.phase.clone(),
        mode: if crate::rotation::can_make_issuers(s) {
            Mode::Local
        } else {
            Mode::Upstream
        },
        anchors: anchor_entries(s, now),
        issuers: issuer_entries(s, policy, now),
        pending_issuer_key: s.pending_issuer_key.as_ref().map(|p| PendingKeyEntry {
            id: key_id(&p.key),
            created: p.created,
        }),
        next_issuer_rotation,
        attention: plan
            .attention
            .iter()
            .map(|a| AttentionEntry {
                message: a.message.clone(),
                deadline: a.deadline,
                deadline_in_seconds: a.deadline.map(secs),
            })
            .collect(),
        problems: s.expiry_problems(now),
        anchor_rotation: AnchorRotation {
            phase: s.phase.name().into(),
            gates,
            ledger,
        },
        rotation_deadlines: deadlines(s, policy, now),
        policy: PolicyEntry {
            leaf_ttl_max_seconds: policy.leaf_ttl_max.as_secs(),
            leaf_ttl_default_seconds: policy.leaf_ttl_default.as_secs(),
            clock_skew_seconds: policy.clock_skew.as_secs(),
            propagation_allowance_seconds: policy.propagation_allowance.as_secs(),
            issuer_ttl_seconds: policy.issuer_ttl.as_secs(),
        },
        server: None,
        federation: federation_entries(s),
    }
}

/// The ledger's view, as the status document says it.
fn ledger_entry(l: &LedgerSummary, now: OffsetDateTime) -> LedgerEntry {
    LedgerEntry {
        complete_since: l.complete_since,
        trustworthy_at: l.trustworthy_at,
        trustworthy: l.trustworthy(now),
        partial: l.partial,
        live_leaves_by_anchor: l.live_leaves.clone(),
        live_workloads: l.live_workloads,
        workloads_with_current_bundle: l.workloads_current,
        current_bundle_version: l.min_version,
        convergence_percent: if l.live_workloads == 0 {
            100.0
        } else {
            #[allow(clippy::cast_precision_loss, reason = "a percentage")]
            let p = l.workloads_current as f64 * 100.0 / l.live_workloads as f64;
            p
        },
        by_api: l.by_api.clone(),
        restart_bound: l.restart_bound.clone(),
        revoked_issuers: l.revoked_issuers.clone(),
    }
}

/// The next issuer step: due now, or when it is scheduled.
fn next_issuer_step(plan: &crate::rotation::IssuerPlan, now: OffsetDateTime) -> Option<NextStep> {
    let step = |step: &str, issuer: Option<CertId>, at| {
        Some(NextStep {
            step: step.into(),
            issuer,
            at,
        })
    };
    match &plan.step {
        Some(IssuerStep::Prepare { .. }) => step("prepare", None, now),
        Some(IssuerStep::Activate(id)) => step("activate", Some(id.clone()), now),
        Some(IssuerStep::Prune) => step("prune", None, now),
        None => match (&plan.schedule, plan.wake_at) {
            (Some(sc), Some(_)) if now < sc.prepare_at => step("prepare", None, sc.prepare_at),
            (Some(sc), Some(_)) if now < sc.activate_at => step("activate", None, sc.activate_at),
            _ => None,
        },
    }
}

/// Every anchor held, with where its key is.
fn anchor_entries(s: &AuthorityState, now: OffsetDateTime) -> Vec<AnchorEntry> {
    let secs = |t: OffsetDateTime| (t - now).whole_seconds();
    s.anchors
        .iter()
        .map(|a| AnchorEntry {
            id: a.cert.id().clone(),
            status: a.status,
            key_held: a.key.is_some(),
            key_store: a.key.as_ref().and_then(stored_at),
            key_destroyed: a.key.is_none()
                && s.history.iter().any(|e| {
                    e.what
                        .split_whitespace()
                        .skip_while(|w| *w != "anchor_keys_destroyed")
                        .nth(1)
                        .is_some_and(|ids| ids.split(',').any(|id| id == a.cert.id().as_str()))
                }),
            serial: a.cert.info.serial.clone(),
            subject: a.cert.info.subject.clone(),
            not_before: a.cert.info.not_before,
            not_after: a.cert.info.not_after,
            expires_in_seconds: secs(a.cert.info.not_after),
        })
        .collect()
}

/// Every issuer held, with the active one's schedule.
fn issuer_entries(s: &AuthorityState, policy: &Policy, now: OffsetDateTime) -> Vec<IssuerEntry> {
    let secs = |t: OffsetDateTime| (t - now).whole_seconds();
    s.issuers
        .iter()
        .map(|i| {
            let sc = (i.status == IssuerStatus::Active).then(|| schedule(&i.cert.info, policy));
            IssuerEntry {
                id: i.cert.id().clone(),
                status: i.status,
                anchor: i.anchor.clone(),
                key_store: stored_at(&i.key),
                serial: i.cert.info.serial.clone(),
                not_before: i.cert.info.not_before,
                not_after: i.cert.info.not_after,
                expires_in_seconds: secs(i.cert.info.not_after),
                prepare_next_at: sc.as_ref().map(|sc| sc.prepare_at),
                activate_next_at: sc.as_ref().map(|sc| sc.activate_at),
            }
        })
        .collect()
}

/// The rotation deadlines of the active anchor and issuer.
fn deadlines(s: &AuthorityState, policy: &Policy, now: OffsetDateTime) -> Deadlines {
    let deadline = |id: &CertId, at: OffsetDateTime| Deadline {
        id: id.clone(),
        at,
        in_seconds: (at - now).whole_seconds(),
    };
    Deadlines {
        anchor: s.active_anchor().map(|a| {
            deadline(
                a.cert.id(),
                crate::anchors::anchor_rotation_deadline(a.cert.info.not_after, policy),
            )
        }),
        issuer: s.active_issuer().map(|i| {
            deadline(
                i.cert.id(),
                crate::anchors::issuer_rotation_deadline(i.cert.info.not_after, policy),
            )
        }),
    }
}

/// The federated bundles the state holds (how their refreshes go is the running server's to add).
fn federation_entries(s: &AuthorityState) -> Vec<FederationEntry> {
    s.federated
        .iter()
        .map(|f| FederationEntry {
            trust_domain: f.trust_domain.to_string(),
            sequence: f.sequence,
            anchors: crate::client::parse_pem_certs(&f.anchors_pem).len(),
            fetched: f.fetched,
            age_seconds: None,
            consecutive_failures: None,
            last_error: None,
        })
        .collect()
}

/// The FEDERATION section of [`render`]: one line per federated trust domain.
fn render_federation(v: &Status, o: &mut String) {
    use std::fmt::Write;
    if v.federation.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nFEDERATION\n  {:<24}  {:>8}  {:>7}  {:<18}  REFRESH",
        "TRUST DOMAIN", "SEQUENCE", "ANCHORS", "LAST REFRESH"
    );
    for f in &v.federation {
        let age = f.age_seconds.map_or_else(
            || "-".to_owned(),
            |a| {
                let stale = if a > FEDERATION_STALE_SECONDS {
                    " STALE"
                } else {
                    ""
                };
                format!(
                    "{} ago{stale}",
                    human(std::time::Duration::from_secs(a.unsigned_abs()))
                )
            },
        );
        let refresh = match (f.consecutive_failures, &f.last_error) {
            (Some(0) | None, _) => "ok".to_owned(),
            (Some(n), e) => format!("FAILING ({n} in a row): {}", e.clone().unwrap_or_default()),
        };
        let _ = writeln!(
            o,
            "  {:<24}  {:>8}  {:>7}  {:<18}  {refresh}",
            f.trust_domain, f.sequence, f.anchors, age
        );
    }
}

/// The text view of a status document.
pub fn render(v: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "trust domain {}   phase {}   bundle version {}   generation {}   mode {}",
        v.trust_domain,
        v.phase.name(),
        v.bundle_version,
        v.generation,
        match v.mode {
            Mode::Local => "local",
            Mode::Upstream => "upstream",
        },
    );
    render_certificates(v, &mut o);
    render_issuer_rotation(v, &mut o);
    render_anchor_rotation(v, &mut o);
    if let Some(srv) = &v.server {
        let _ = writeln!(
            o,
            "\nSERVER\n  ready: {}   issuer rotation failures in a row: {}{}",
            srv.ready,
            srv.rotation_failures_consecutive,
            srv.last_rotation_error
                .as_ref()
                .map(|e| format!("   last error: {e}"))
                .unwrap_or_default()
        );
    }
    for a in &v.attention {
        let _ = writeln!(o, "\nATTENTION: {}", a.message);
    }
    for p in &v.problems {
        let _ = writeln!(o, "\nPROBLEM: {p}");
    }
    render_federation(v, &mut o);
    o
}

/// `EXPIRES IN` of a countdown in seconds.
fn countdown(s: i64) -> String {
    let d = human(std::time::Duration::from_secs(s.unsigned_abs()));
    if s >= 0 {
        d
    } else {
        format!("EXPIRED {d} ago")
    }
}

fn at(t: OffsetDateTime) -> String {
    crate::clock::rfc3339(t)
}

/// The ANCHORS and ISSUERS tables (and a pending issuer key).
fn render_certificates(v: &Status, o: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        o,
        "\nANCHORS\n  {:<16}  {:<9}  {:<8}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "KEY", "NOT AFTER"
    );
    for a in &v.anchors {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<8}  {:<20}  {}",
            a.id.as_str(),
            a.status,
            match (a.key_held, &a.key_store, a.key_destroyed) {
                (true, Some(_), _) => "token",
                (true, None, _) => "here",
                (false, _, true) => "destroyed",
                (false, _, false) => "upstream",
            },
            at(a.not_after),
            countdown(a.expires_in_seconds)
        );
    }
    let _ = writeln!(
        o,
        "\nISSUERS\n  {:<16}  {:<9}  {:<16}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "ANCHOR", "NOT AFTER"
    );
    for i in &v.issuers {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<16}  {:<20}  {}",
            i.id.as_str(),
            i.status,
            i.anchor.as_str(),
            at(i.not_after),
            countdown(i.expires_in_seconds)
        );
    }
    if let Some(p) = &v.pending_issuer_key {
        let _ = writeln!(
            o,
            "  pending issuer key {} (made {}), waiting for `meshca issuer import`",
            p.id,
            at(p.created)
        );
    }
}

/// NEXT ISSUER ROTATION: the active issuer's schedule and the next step.
fn render_issuer_rotation(v: &Status, o: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(o, "\nNEXT ISSUER ROTATION");
    if let Some(i) = v.active_issuer() {
        let opt = |t: Option<OffsetDateTime>| t.map_or_else(|| "-".into(), at);
        let _ = writeln!(
            o,
            "  prepare the next issuer at   {}",
            opt(i.prepare_next_at)
        );
        let _ = writeln!(
            o,
            "  activate it at               {}",
            opt(i.activate_next_at)
        );
    }
    match &v.next_issuer_rotation {
        Some(n) => {
            let _ = writeln!(o, "  next step: {} at {}", n.step, at(n.at));
        }
        None => {
            let _ = writeln!(o, "  next step: none scheduled");
        }
    }
}

/// TRUST-ANCHOR ROTATION: the phase, the ledger, each gate.
fn render_anchor_rotation(v: &Status, o: &mut String) {
    use std::fmt::Write;
    let r = &v.anchor_rotation;
    let _ = writeln!(o, "\nTRUST-ANCHOR ROTATION   phase {}", r.phase);
    match &r.ledger {
        Some(l) => render_ledger(o, l),
        None => {
            let _ = writeln!(
                o,
                "  no ledger (no running server): gates are time-based only"
            );
        }
    }
    for g in &r.gates {
        let left = match g.opens_in_seconds {
            Some(s) if s > 0 && !g.gate.open => {
                format!(
                    " (in {})",
                    human(std::time::Duration::from_secs(s.unsigned_abs()))
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(o, "  {:<9} {}{left}", g.gate.step.name(), g.explain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_and_text_agree() {
        let p = Policy::default();
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis("cluster.local".parse().unwrap(), &p, now).unwrap();
        let v = document(&s, &p, None, now);
        assert_eq!(v.mode, Mode::Local);
        let next = v.next_issuer_rotation.as_ref().unwrap();
        assert_eq!(next.step, "prepare");
        let active = &v.issuers[0];
        assert_eq!(active.status, IssuerStatus::Active);
        assert_eq!(Some(next.at), active.prepare_next_at);
        let text = render(&v);
        assert!(text.contains("phase steady"), "{text}");
        assert!(
            text.contains(&format!(
                "prepare the next issuer at   {}",
                crate::clock::rfc3339(active.prepare_next_at.unwrap())
            )),
            "{text}"
        );
        assert!(!text.contains("ATTENTION"), "{text}");
    }

    /// An archived anchor whose key was destroyed after `key_retention` shows KEY `destroyed`,
    /// not `upstream` (issue #30 item 7); the active one, `here`.
    #[test]
    fn a_destroyed_anchor_key_says_so() {
        use crate::anchors::NewAnchor;
        let p = Policy::default();
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis("cluster.local".parse().unwrap(), &p, now).unwrap();
        let old = s.active_anchor().unwrap().cert.id().clone();
        let s = s.stage_anchor(&p, now, NewAnchor::Generate).unwrap();
        let s = s.activate_anchor(&p, None, now, true).unwrap();
        let s = s.finish_anchor(&p, None, now, true).unwrap();
        let held = document(&s, &p, None, now);
        let row = |v: &Status| {
            render(v)
                .lines()
                .find(|l| l.contains(old.as_str()))
                .unwrap()
                .to_owned()
        };
        assert!(row(&held).contains("here"), "{}", row(&held));
        let later = now + time::Duration::seconds(1);
        let s = s.prune_expired_issuers(p.key_retention, later).unwrap();
        let v = document(&s, &p, None, later);
        let a = v.anchors.iter().find(|a| a.id == old).unwrap();
        assert!(a.key_destroyed && !a.key_held);
        assert!(
            row(&v).contains("destroyed") && !row(&v).contains("upstream"),
            "{}",
            row(&v)
        );
    }

    /// The JSON keeps the field names and shapes the untyped document had (scripts read it), and
    /// reads back into the same types.
    #[test]
    fn json_keeps_its_fields_and_round_trips() {
        let p = Policy::default();
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis("cluster.local".parse().unwrap(), &p, now).unwrap();
        let ledger = LedgerSummary {
            complete_since: now,
            trustworthy_at: now,
            live_leaves: BTreeMap::new(),
            live_workloads: 0,
            workloads_current: 0,
            min_version: 1,
            by_api: BTreeMap::new(),
            partial: false,
            restart_bound: crate::ledger::RestartBound::NotTracked,
            revoked_issuers: Vec::new(),
        };
        let mut doc = document(&s, &p, Some(&ledger), now);
        doc.server = Some(ServerEntry {
            version: "0.1.0".into(),
            ready: true,
            rotation_failures_consecutive: 0,
            last_rotation_error: None,
        });
        let v = serde_json::to_value(&doc).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k.join(",")
        };
        assert_eq!(
            keys(&v),
            "anchor_rotation,anchors,attention,bundle_version,generation,issuers,mode,next_issuer_rotation,\
             now,pending_issuer_key,phase,policy,problems,rotation_deadlines,server,trust_domain"
        );
        assert_eq!(
            keys(&v["anchors"][0]),
            "expires_in_seconds,id,key_destroyed,key_held,not_after,not_before,serial,status,subject"
        );
        assert_eq!(
            keys(&v["issuers"][0]),
            "activate_next_at,anchor,expires_in_seconds,id,not_after,not_before,prepare_next_at,serial,status"
        );
        assert_eq!(
            keys(&v["anchor_rotation"]["gates"][0]),
            "at_risk,condition,explain,measured,open,opened_by,opens_at,opens_in_seconds,risk,step"
        );
        assert_eq!(
            keys(&v["anchor_rotation"]["ledger"]),
            "by_api,complete_since,convergence_percent,current_bundle_version,live_leaves_by_anchor,\
             live_workloads,partial,restart_bound,trustworthy,trustworthy_at,workloads_with_current_bundle"
        );
        assert_eq!(v["phase"]["name"], "steady");
        assert_eq!(v["mode"], "local");
        assert_eq!(v["anchors"][0]["status"], "active");
        assert_eq!(v["now"], crate::clock::rfc3339(now));
        assert!(v["pending_issuer_key"].is_null());
        let back: Status = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
        // Read from a state dir: no `server` key at all.
        let offline = serde_json::to_value(document(&s, &p, None, now)).unwrap();
        assert!(offline.get("server").is_none());
        assert!(offline["anchor_rotation"]["ledger"].is_null());
    }
}
