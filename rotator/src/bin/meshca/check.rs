//! `meshca check`: a fail-closed expiry check for cron jobs and CI pipelines.
//!
//! Exit codes: 0 all good, 1 a warning, 2 something critical, 3 nothing to check (no server
//! answers and the state dir holds no readable authority). One line per finding, with the number
//! of days and the command that fixes it.
//!
//! The rule (issue #30): `meshca check` checks the running CA. When no server answers on the
//! admin socket, that is itself a **critical** finding (exit 2) — a cron job or CI gate must not
//! stay green while the CA is down — and the state dir is still judged and reported, with the
//! default policy's rotation times (the server's configuration is not read; the output says so).
//! `--offline` asks for the state dir alone: no server is expected then.

use std::time::Duration;

use rotator::clock::rfc3339;
use rotator::state::{AnchorStatus, Phase};
use rotator::status::Status;
use serde_json::json;

use crate::Output;
use crate::status::{StatusArgs, document};

/// Thresholds.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    status: StatusArgs,
    /// Warn when the active trust anchor has less than this left.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90days")]
    anchor_warning: Duration,
    /// Critical when the active trust anchor has less than this left.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
    anchor_critical: Duration,
    /// Warn this long before the anchor's rotation deadline (the last moment to start a rotation
    /// that finishes by its gates before the anchor expires) when no rotation is under way.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "14days")]
    deadline_warning: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Severity {
    Ok,
    Warning,
    Critical,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

struct Finding {
    severity: Severity,
    what: String,
    days: Option<f64>,
    fix: String,
}

#[allow(clippy::cast_precision_loss, reason = "days for display")]
fn days(secs: i64) -> f64 {
    secs as f64 / 86400.0
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn findings(doc: &Status, a: &CheckArgs) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |severity, what: String, d: Option<i64>, fix: &str| {
        out.push(Finding {
            severity,
            what,
            days: d.map(days),
            fix: fix.to_owned(),
        });
    };
    anchors(doc, a, &mut push);
    rotation_deadline(doc, a, &mut push);
    issuer(doc, &mut push);
    server(doc, &mut push);
    federation(doc, &mut push);
    for att in &doc.attention {
        push(
            Severity::Warning,
            att.message.clone(),
            att.deadline_in_seconds,
            "see the message",
        );
    }
    out
}

/// Anchors in the bundle: expired, or expiring within the thresholds.
fn anchors(
    doc: &Status,
    a: &CheckArgs,
    push: &mut impl FnMut(Severity, String, Option<i64>, &str),
) {
    for an in &doc.anchors {
        let status = an.status;
        if status == AnchorStatus::Archived {
            continue;
        }
        let id = &an.id;
        let left = an.expires_in_seconds;
        if left <= 0 {
            push(
                Severity::Critical,
                format!(
                    "trust anchor {id} ({status}) EXPIRED {:.1} days ago: nothing chaining to it verifies",
                    days(-left)
                ),
                Some(left),
                "start a new authority and restart workloads; see docs/runbooks/alerts.md#meshcatrustanchorexpiringcritical",
            );
        } else if status == AnchorStatus::Active && left < secs(a.anchor_critical) {
            push(
                Severity::Critical,
                format!("trust anchor {id} expires in {:.1} days", days(left)),
                Some(left),
                "meshca anchors stage  (then follow docs/runbooks/trust-anchor-rotation.md)",
            );
        } else if status == AnchorStatus::Active && left < secs(a.anchor_warning) {
            push(
                Severity::Warning,
                format!("trust anchor {id} expires in {:.1} days", days(left)),
                Some(left),
                "meshca anchors stage  (plan it: meshca plan --svg plan.svg)",
            );
        }
    }
}

/// The trust-anchor rotation deadline: passed, or near in steady.
fn rotation_deadline(
    doc: &Status,
    a: &CheckArgs,
    push: &mut impl FnMut(Severity, String, Option<i64>, &str),
) {
    let phase = doc.phase.name();
    if let Some(d) = &doc.rotation_deadlines.anchor {
        let left = d.in_seconds;
        let at = rfc3339(d.at);
        let steady = doc.phase == Phase::Steady;
        if !matches!(doc.phase, Phase::Activated { .. }) && left < 0 {
            push(
                Severity::Critical,
                format!(
                    "the trust-anchor rotation deadline passed {:.1} days ago ({at}); phase {phase}: a rotation can no longer finish by its gates before the anchor expires",
                    days(-left)
                ),
                Some(left),
                if steady {
                    "meshca anchors stage  (now; expect to need --force near expiry)"
                } else {
                    "meshca anchors wait --until activate-ready && meshca anchors activate"
                },
            );
        } else if steady && left < secs(a.deadline_warning) {
            push(
                Severity::Warning,
                format!(
                    "the trust-anchor rotation must start within {:.1} days ({at}) to finish by its gates before the anchor expires",
                    days(left)
                ),
                Some(left),
                "meshca anchors stage",
            );
        }
    }
}

/// The active issuer: none, expired, or not rotated in time.
fn issuer(doc: &Status, push: &mut impl FnMut(Severity, String, Option<i64>, &str)) {
    let leaf_max = i64::try_from(doc.policy.leaf_ttl_max_seconds).unwrap_or(i64::MAX);
    match doc.active_issuer() {
        None => push(
            Severity::Critical,
            "no active issuer: nothing can be signed".into(),
            None,
            "meshca issuer rotate  (upstream mode: meshca issuer csr / meshca issuer import)",
        ),
        Some(i) => {
            let id = &i.id;
            let left = i.expires_in_seconds;
            if left <= 0 {
                push(
                    Severity::Critical,
                    format!("the active issuer {id} EXPIRED {:.1} days ago", days(-left)),
                    Some(left),
                    "meshca issuer rotate  (see docs/runbooks/issuer-rotation.md)",
                );
            } else if left < 2 * leaf_max {
                push(
                    Severity::Critical,
                    format!(
                        "the active issuer {id} expires in {:.1} days, less than twice the max leaf TTL: automatic rotation is failing",
                        days(left)
                    ),
                    Some(left),
                    "meshca status; meshca issuer rotate  (see docs/runbooks/issuer-rotation.md)",
                );
            }
        }
    }
}

/// The running server: not ready, or failing to rotate.
fn server(doc: &Status, push: &mut impl FnMut(Severity, String, Option<i64>, &str)) {
    if let Some(srv) = &doc.server {
        if !srv.ready {
            push(
                Severity::Critical,
                "the server is not ready (it cannot sign, or rotation failed 10 times in a row)"
                    .into(),
                None,
                "curl <http-listen>/readyz; meshca status",
            );
        }
        let n = srv.rotation_failures_consecutive;
        if n > 0 {
            push(
                Severity::Warning,
                format!("issuer rotation failed {n} times in a row"),
                None,
                "meshca status  (last error), then docs/runbooks/issuer-rotation.md",
            );
        }
    }
}

/// Federated trust domains whose bundle is stale or whose refreshes keep failing.
fn federation(doc: &Status, push: &mut impl FnMut(Severity, String, Option<i64>, &str)) {
    for f in &doc.federation {
        let td = &f.trust_domain;
        if let Some(age) = f
            .age_seconds
            .filter(|a| *a > rotator::status::FEDERATION_STALE_SECONDS)
        {
            push(
                Severity::Warning,
                format!(
                    "the bundle of federated trust domain {td} was last refreshed {:.1} hours ago{}",
                    age as f64 / 3600.0,
                    f.last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                None,
                "docs/runbooks/alerts.md#meshcafederatedbundlestale",
            );
        } else if f.consecutive_failures.is_some_and(|n| n >= 3) {
            push(
                Severity::Warning,
                format!(
                    "{} fetches of {td}'s bundle in a row failed: {}",
                    f.consecutive_failures.unwrap_or_default(),
                    f.last_error.clone().unwrap_or_default()
                ),
                None,
                "docs/runbooks/alerts.md#meshcafederationrefreshfailing",
            );
        }
    }
}

/// Runs `meshca check`; returns the exit code.
pub fn check(a: &CheckArgs, output: Output) -> u8 {
    let doc = match document(&a.status, Output::Json) {
        Ok(d) => d,
        Err(e) => {
            match output {
                Output::Json => println!(
                    "{}",
                    json!({ "status": "unreachable", "exit_code": 3, "error": e.message })
                ),
                Output::Text => println!("UNREACHABLE {}", e.message),
            }
            return 3;
        }
    };
    let mut found = findings(&doc, a);
    let from_server = doc.server.is_some();
    if !from_server && !a.status.offline {
        found.insert(
            0,
            Finding {
                severity: Severity::Critical,
                what: format!(
                    "no meshca-server answers on {}: the CA may be down (the state dir was read instead, judged with the default policy, not the server's)",
                    a.status.admin.socket().display()
                ),
                days: None,
                fix: "start meshca-server (or pass --offline to judge the state dir alone)".into(),
            },
        );
    }
    let worst = found
        .iter()
        .map(|f| f.severity)
        .max()
        .unwrap_or(Severity::Ok);
    let code = match worst {
        Severity::Ok => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "status": worst.name(),
                "exit_code": code,
                "source": if from_server { "server" } else { "state-dir" },
                "policy": if from_server { "server" } else { "default" },
                "findings": found.iter().map(|f| json!({
                    "severity": f.severity.name(), "what": f.what, "days": f.days, "fix": f.fix,
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            for f in &found {
                println!(
                    "{} {} — fix: {}",
                    f.severity.name().to_uppercase(),
                    f.what,
                    f.fix
                );
            }
            if found.is_empty() {
                let anchor = doc.active_anchor().map_or(0, |x| x.expires_in_seconds);
                let deadline = doc
                    .rotation_deadlines
                    .anchor
                    .as_ref()
                    .map_or(0, |d| d.in_seconds);
                println!(
                    "OK trust anchor expires in {:.0} days; its rotation must start within {:.0} days",
                    days(anchor),
                    days(deadline)
                );
            }
        }
    }
    code
}
