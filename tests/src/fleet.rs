//! A virtual-time fleet simulation of trust-anchor rotation (issue #4, proof 2).
//!
//! N workloads renew at the `refresh_at` the signing path would hand out (50–70 % of the leaf's
//! life, jittered) with clocks skewed by up to ±5 min; a share of them also follow the bundle
//! stream; 1 % go offline for a whole day at a random moment. The authority is the real pure
//! state machine ([`rotator::state`], [`rotator::anchors`]) with the real ledger
//! ([`rotator::ledger`]), driven like the server's opt-in automation: stage on a given day, then
//! take `activate` and `finish` (or, in the rollback scenario, `rollback` twice) as soon as
//! their gates open. Issuer rotation runs as the server's driver does.
//!
//! `sampled` workloads hold real certificates (signed by the real signing core); every hour,
//! every ordered pair of online sampled workloads verifies the other's chain against its own
//! bundle at its own (skewed) clock with rustls-webpki. The others are bookkeeping only (which
//! anchor their leaf chains to, its notAfter, their bundle), so N = 100,000 stays cheap.

use std::time::Duration;

use ca_server::signing::{ValidCsr, parse_csr, sign_leaf};
use rotator::anchors::{NewAnchor, Step, gate};
use rotator::client::{make_csr, verify_svid};
use rotator::ledger::{LeafRecord, Ledger};
use rotator::pki::{CertId, SecretKey};
use rotator::policy::Policy;
use rotator::rotation::{IssuerStep, plan_issuer};
use rotator::state::AuthorityState;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Params {
    /// Workloads.
    pub workloads: usize,
    /// Of which hold real certificates and verify each other.
    pub sampled: usize,
    /// Share of workloads that follow `WatchTrustBundle` (authenticated: credited in the ledger).
    pub watchers: f64,
    /// Share of workloads that go offline for a day.
    pub offline: f64,
    /// Rollback scenario (stage, activate, rollback, rollback) instead of a full rotation.
    pub rollback: bool,
    /// Seed of the deterministic generator.
    pub seed: u64,
    /// Negative control: take every step at once, as if each gate were forced open.
    pub gates_forced_open: bool,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Sampled pair verifications attempted.
    pub verifications: u64,
    /// ... that failed.
    pub failed: u64,
    /// The first failure, if any.
    pub first_failure: Option<String>,
    /// Leaves signed (all workloads).
    pub leaves: u64,
    /// Phase changes taken, with the virtual hour and how the gate opened.
    pub steps: Vec<String>,
    /// Largest number of ledger records at once.
    pub ledger_peak: usize,
    /// Simulated hours.
    pub hours: u64,
    /// Phase at the end.
    pub final_phase: String,
    /// Anchors in the bundle at the end.
    pub final_bundle: usize,
}

struct W {
    skew: i64,
    watcher: bool,
    offline: Option<(OffsetDateTime, OffsetDateTime)>,
    anchor: CertId,
    not_after: OffsetDateTime,
    refresh_at: OffsetDateTime,
    bundle: Vec<CertId>,
    /// Sampled workloads: CSR, chain and bundle DER.
    real: Option<Real>,
}

struct Real {
    csr: ValidCsr,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    #[allow(clippy::cast_precision_loss, reason = "a uniform float")]
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    #[allow(clippy::cast_possible_wrap, reason = "small ranges")]
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

fn ids(s: &AuthorityState) -> Vec<CertId> {
    s.bundle().map(|a| a.cert.id().clone()).collect()
}

fn ders(s: &AuthorityState) -> Vec<CertificateDer<'static>> {
    s.bundle().map(|a| a.cert.der().clone()).collect()
}

fn unix(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(t.unix_timestamp()).unwrap_or(0),
    ))
}

/// Runs the simulation.
///
/// # Panics
/// On a bug in the simulation itself (a transition the state machine refuses unexpectedly).
#[allow(
    clippy::expect_used,
    reason = "a simulation: a refused step is a bug to report"
)]
pub fn simulate(p: &Params) -> Report {
    let policy = Policy::default();
    let step = time::Duration::minutes(10);
    let t0 = rotator::clock::whole_seconds(OffsetDateTime::now_utc());
    let mut now = t0;
    let mut s = AuthorityState::genesis("cluster.local".parse().expect("td"), &policy, now)
        .expect("genesis");
    let mut ledger = Ledger::new(now - Duration::from_secs(400 * 86400));
    let mut rng = Rng(p.seed | 1);
    let mut report = Report::default();
    let mut ws = fleet(p, &policy, &mut rng, t0);
    let mut op = Operator {
        stage_at: t0 + time::Duration::days(2),
        steady_since: None,
        rolled_once: false,
        activated_at: None,
    };
    let end_after_steady = time::Duration::days(2);
    let horizon = t0 + time::Duration::days(12);
    while now < horizon {
        issuer_steps(&mut s, &policy, now);
        renew(
            &mut ws,
            &s,
            &policy,
            now,
            &mut ledger,
            &mut rng,
            &mut report,
        );
        ledger.compact(now, policy.clock_skew);
        report.ledger_peak = report.ledger_peak.max(ledger.len());
        // The operator, as the opt-in automation would: take each step when its gate opens.
        let l = ledger.summary(
            now,
            policy.leaf_ttl_max,
            policy.clock_skew,
            s.bundle_version,
        );
        let hour = (now - t0).whole_hours();
        op.tick(&mut s, &l, p, &policy, now, hour, &mut report);
        if op.steady_since.is_some_and(|t| now >= t + end_after_steady) {
            break;
        }
        // Every hour: every ordered pair of online sampled workloads, at the verifier's clock.
        if (now - t0).whole_minutes() % 60 == 0 {
            verify_pairs(&ws, &s, now, hour, &mut report);
        }
        s.check().expect("consistent state");
        now += step;
    }
    report.hours = u64::try_from((now - t0).whole_hours()).unwrap_or(0);
    report.final_phase = s.phase.name().to_owned();
    report.final_bundle = s.bundle().count();
    report
}

/// The workloads: clock skew within the policy's, some offline for a day, some watchers, the
/// first `sampled` with real keys.
#[allow(clippy::expect_used, reason = "a simulation")]
fn fleet(p: &Params, policy: &Policy, rng: &mut Rng, t0: OffsetDateTime) -> Vec<W> {
    let skew_max = i64::try_from(policy.clock_skew.as_secs()).unwrap_or(300);
    (0..p.workloads)
        .map(|i| {
            let offline = (rng.unit() < p.offline).then(|| {
                // Offline for a day, starting somewhere in the rotation's busy days.
                let start = t0 + time::Duration::minutes(rng.range(36 * 60, 5 * 24 * 60));
                (start, start + time::Duration::days(1))
            });
            let real = (i < p.sampled).then(|| {
                let id = format!("spiffe://cluster.local/ns/sim/sa/w{i}")
                    .parse()
                    .expect("id");
                let key = SecretKey::generate_p256().expect("key");
                Real {
                    csr: parse_csr(&make_csr(&id, &key).expect("csr")).expect("csr"),
                    chain: Vec::new(),
                    bundle: Vec::new(),
                }
            });
            W {
                skew: rng.range(-skew_max, skew_max),
                watcher: rng.unit() < p.watchers,
                offline,
                anchor: CertId::of(b""),
                not_after: t0,
                // Everyone joins within the first hour.
                refresh_at: t0 + time::Duration::seconds(rng.range(0, 3600)),
                bundle: Vec::new(),
                real,
            }
        })
        .collect()
}

/// Issuer rotation, as the driver does it.
#[allow(clippy::expect_used, reason = "a simulation")]
fn issuer_steps(s: &mut AuthorityState, policy: &Policy, now: OffsetDateTime) {
    while let Some(st) = plan_issuer(s, policy, now).step {
        *s = match st {
            IssuerStep::Prepare { anchor } => s.prepare_issuer(policy, now, &anchor),
            IssuerStep::Activate(id) => s.activate_issuer(now, &id),
            IssuerStep::Prune => s
                .prune_expired_issuers(policy.key_retention, now)
                .ok_or_else(|| rotator::state::StateError::NotFound("nothing to prune".into())),
        }
        .expect("issuer step");
    }
}

/// Workloads: renew when due (by their own clock), follow pushes; each leaf in the ledger.
#[allow(clippy::expect_used, reason = "a simulation")]
fn renew(
    ws: &mut [W],
    s: &AuthorityState,
    policy: &Policy,
    now: OffsetDateTime,
    ledger: &mut Ledger,
    rng: &mut Rng,
    report: &mut Report,
) {
    let bundle_ids = ids(s);
    let bundle_ders = ders(s);
    let issuer = s.active_issuer().expect("active issuer").clone();
    let signer = issuer
        .cert
        .rcgen_issuer(issuer.key.clone())
        .expect("signer");
    for (i, w) in ws.iter_mut().enumerate() {
        if w.offline.is_some_and(|(a, b)| now >= a && now < b) {
            continue;
        }
        let own = now + time::Duration::seconds(w.skew);
        if own >= w.refresh_at || w.not_after <= now {
            let window = policy
                .leaf_window(
                    now,
                    None,
                    issuer.cert.info.not_before,
                    issuer.cert.info.not_after,
                )
                .expect("window");
            if let Some(r) = &mut w.real {
                let leaf = sign_leaf(&r.csr, &window, &signer).expect("sign");
                r.chain = vec![CertificateDer::from(leaf.der), issuer.cert.der().clone()];
                r.bundle.clone_from(&bundle_ders);
            }
            w.anchor = issuer.anchor.clone();
            w.not_after = window.not_after;
            w.bundle.clone_from(&bundle_ids);
            let life = (window.not_after - now).whole_seconds();
            #[allow(clippy::cast_possible_truncation, reason = "a fraction of a lifetime")]
            let frac = (life as f64 * (0.5 + 0.2 * rng.unit())) as i64;
            w.refresh_at = now + time::Duration::seconds(frac);
            ledger.record(LeafRecord {
                serial: format!("{i:x}-{}", report.leaves),
                spiffe_id: format!("spiffe://cluster.local/ns/sim/sa/w{i}"),
                instance: format!("pod-{i}"),
                anchor: issuer.anchor.clone(),
                issued: now.unix_timestamp(),
                not_after: window.not_after.unix_timestamp(),
                bundle_version: s.bundle_version,
                via: None,
                issuer: None,
                api: rotator::ledger::Api::Meshca,
            });
            report.leaves += 1;
        } else if w.watcher && w.bundle != bundle_ids {
            w.bundle.clone_from(&bundle_ids);
            if let Some(r) = &mut w.real {
                r.bundle.clone_from(&bundle_ders);
            }
            ledger.watch_opened(
                &format!("spiffe://cluster.local/ns/sim/sa/w{i}"),
                &format!("pod-{i}"),
            );
            ledger.watch_sent(
                &format!("spiffe://cluster.local/ns/sim/sa/w{i}"),
                &format!("pod-{i}"),
                s.bundle_version,
            );
            ledger.watch_closed(
                &format!("spiffe://cluster.local/ns/sim/sa/w{i}"),
                &format!("pod-{i}"),
            );
        }
    }
}

/// The operator: stage on day 2, then each step as its gate opens (or forced); with
/// `rollback`, back from activated after 12 h and from staged again.
struct Operator {
    stage_at: OffsetDateTime,
    steady_since: Option<OffsetDateTime>,
    rolled_once: bool,
    activated_at: Option<OffsetDateTime>,
}

impl Operator {
    #[allow(clippy::expect_used, reason = "a simulation")]
    #[allow(clippy::too_many_arguments, reason = "the simulation's state")]
    fn tick(
        &mut self,
        s: &mut AuthorityState,
        l: &rotator::ledger::LedgerSummary,
        p: &Params,
        policy: &Policy,
        now: OffsetDateTime,
        hour: i64,
        report: &mut Report,
    ) {
        let mut take = |s: &mut AuthorityState, st: Step| {
            let g = gate(s, policy, Some(l), now, st).expect("step applies");
            if !g.open && !p.gates_forced_open {
                return false;
            }
            *s = match st {
                Step::Stage => s.stage_anchor(policy, now, NewAnchor::Generate),
                Step::Activate => s.activate_anchor(policy, Some(l), now, p.gates_forced_open),
                Step::Finish => s.finish_anchor(policy, Some(l), now, p.gates_forced_open),
                Step::Rollback => s.rollback_anchor(policy, Some(l), now, p.gates_forced_open),
            }
            .expect("gated step");
            report.steps.push(format!(
                "h{hour:03} {} ({})",
                st.name(),
                g.opened_by.map_or("FORCED".into(), |o| format!("{o:?}"))
            ));
            true
        };
        match s.phase.name() {
            "steady" if self.steady_since.is_none() && now >= self.stage_at => {
                take(s, Step::Stage);
            }
            "steady" => {}
            "staged" if p.rollback && self.rolled_once => {
                if take(s, Step::Rollback) {
                    self.steady_since = Some(now);
                }
            }
            "staged" => {
                if take(s, Step::Activate) {
                    self.activated_at = Some(now);
                }
            }
            _ if p.rollback => {
                // Roll back 12 h after activation: leaves chain to the new anchor by then.
                if self
                    .activated_at
                    .is_some_and(|a| now >= a + time::Duration::hours(12))
                    && take(s, Step::Rollback)
                {
                    self.rolled_once = true;
                }
            }
            _ => {
                if take(s, Step::Finish) {
                    self.steady_since = Some(now);
                }
            }
        }
    }
}

/// Every ordered pair of online sampled workloads: the one's chain against the other's bundle,
/// at the verifier's clock.
#[allow(clippy::expect_used, reason = "a simulation")]
fn verify_pairs(ws: &[W], s: &AuthorityState, now: OffsetDateTime, hour: i64, report: &mut Report) {
    let online: Vec<&W> = ws
        .iter()
        .filter(|w| w.real.as_ref().is_some_and(|r| !r.chain.is_empty()))
        .filter(|w| !w.offline.is_some_and(|(a, b)| now >= a && now < b))
        .collect();
    for v in &online {
        let at = unix(now + time::Duration::seconds(v.skew));
        let vb = &v.real.as_ref().expect("sampled").bundle;
        for u in &online {
            let uc = &u.real.as_ref().expect("sampled").chain;
            report.verifications += 1;
            if let Err(e) = verify_svid(uc, vb, at, webpki::KeyUsage::client_auth()) {
                report.failed += 1;
                if report.first_failure.is_none() {
                    report.first_failure = Some(format!(
                        "h{hour} phase {}: leaf under {} vs bundle {:?}: {e}",
                        s.phase.name(),
                        u.anchor,
                        v.bundle
                    ));
                }
            }
        }
    }
}
