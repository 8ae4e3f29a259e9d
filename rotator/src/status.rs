//! The status document: one JSON value describing an authority at `now`, built from the state
//! alone (so `meshca status` can read a state dir when no server runs) and extended by a running
//! server with its health. `meshca status --output json` prints it; [`render`] turns it into the
//! text view, so both views always agree.

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::ledger::LedgerSummary;
use crate::policy::Policy;
use crate::rotation::{IssuerStep, plan_issuer, schedule};
use crate::state::{AuthorityState, IssuerStatus, human, key_id};

/// The status of `s` at `now` under `policy`; `ledger` is the running server's issuance ledger
/// (`None` when read from a state dir: gates are then time-based only).
pub fn document(
    s: &AuthorityState,
    policy: &Policy,
    ledger: Option<&LedgerSummary>,
    now: OffsetDateTime,
) -> Value {
    let secs = |t: OffsetDateTime| (t - now).whole_seconds();
    let gates: Vec<Value> = crate::anchors::gates(s, policy, ledger, now)
        .into_iter()
        .map(|g| {
            let mut v = serde_json::to_value(&g).unwrap_or(Value::Null);
            v["explain"] = g.explain().into();
            v["opens_in_seconds"] = g.opens_at.map(secs).into();
            v
        })
        .collect();
    let rotation = json!({
        "phase": s.phase.name(),
        "gates": gates,
        "ledger": ledger.map(|l| json!({
            "complete_since": rfc3339(l.complete_since),
            "trustworthy_at": rfc3339(l.trustworthy_at),
            "trustworthy": l.trustworthy(now),
            "partial": l.partial,
            "live_leaves_by_anchor": l.live_leaves,
            "live_workloads": l.live_workloads,
            "workloads_with_current_bundle": l.workloads_current,
            "current_bundle_version": l.min_version,
            "convergence_percent": if l.live_workloads == 0 { 100.0 } else {
                #[allow(clippy::cast_precision_loss, reason = "a percentage")]
                let p = l.workloads_current as f64 * 100.0 / l.live_workloads as f64;
                p
            },
        })),
    });
    let plan = plan_issuer(s, policy, now);
    let next = match &plan.step {
        Some(IssuerStep::Prepare { .. }) => json!({ "step": "prepare", "at": rfc3339(now) }),
        Some(IssuerStep::Activate(id)) => {
            json!({ "step": "activate", "issuer": id, "at": rfc3339(now) })
        }
        Some(IssuerStep::Prune) => json!({ "step": "prune", "at": rfc3339(now) }),
        None => match (&plan.schedule, plan.wake_at) {
            (Some(sc), Some(_)) if now < sc.prepare_at => {
                json!({ "step": "prepare", "at": rfc3339(sc.prepare_at) })
            }
            (Some(sc), Some(_)) if now < sc.activate_at => {
                json!({ "step": "activate", "at": rfc3339(sc.activate_at) })
            }
            _ => Value::Null,
        },
    };
    json!({
        "now": rfc3339(now),
        "trust_domain": s.trust_domain.to_string(),
        "generation": s.generation,
        "bundle_version": s.bundle_version,
        "phase": s.phase,
        "mode": if crate::rotation::can_make_issuers(s) { "local" } else { "upstream" },
        "anchors": s.anchors.iter().map(|a| json!({
            "id": a.cert.id(), "status": a.status.to_string(), "key_held": a.key.is_some(),
            "serial": a.cert.info.serial, "subject": a.cert.info.subject,
            "not_before": rfc3339(a.cert.info.not_before), "not_after": rfc3339(a.cert.info.not_after),
            "expires_in_seconds": secs(a.cert.info.not_after),
        })).collect::<Vec<_>>(),
        "issuers": s.issuers.iter().map(|i| {
            let mut v = json!({
                "id": i.cert.id(), "status": i.status.to_string(), "anchor": i.anchor,
                "serial": i.cert.info.serial,
                "not_before": rfc3339(i.cert.info.not_before), "not_after": rfc3339(i.cert.info.not_after),
                "expires_in_seconds": secs(i.cert.info.not_after),
            });
            if i.status == IssuerStatus::Active {
                let sc = schedule(&i.cert.info, policy);
                v["prepare_next_at"] = rfc3339(sc.prepare_at).into();
                v["activate_next_at"] = rfc3339(sc.activate_at).into();
            }
            v
        }).collect::<Vec<_>>(),
        "pending_issuer_key": s.pending_issuer_key.as_ref().map(|p| json!({ "id": key_id(&p.key), "created": rfc3339(p.created) })),
        "next_issuer_rotation": next,
        "attention": plan.attention.iter().map(|a| json!({
            "message": a.message, "deadline": a.deadline.map(rfc3339),
            "deadline_in_seconds": a.deadline.map(secs),
        })).collect::<Vec<_>>(),
        "problems": s.expiry_problems(now),
        "anchor_rotation": rotation,
        "rotation_deadlines": {
            "anchor": s.active_anchor().map(|a| {
                let d = crate::anchors::anchor_rotation_deadline(a.cert.info.not_after, policy);
                json!({ "id": a.cert.id(), "at": rfc3339(d), "in_seconds": secs(d) })
            }),
            "issuer": s.active_issuer().map(|i| {
                let d = crate::anchors::issuer_rotation_deadline(i.cert.info.not_after, policy);
                json!({ "id": i.cert.id(), "at": rfc3339(d), "in_seconds": secs(d) })
            }),
        },
        "policy": {
            "leaf_ttl_max_seconds": policy.leaf_ttl_max.as_secs(),
            "leaf_ttl_default_seconds": policy.leaf_ttl_default.as_secs(),
            "clock_skew_seconds": policy.clock_skew.as_secs(),
            "propagation_allowance_seconds": policy.propagation_allowance.as_secs(),
            "issuer_ttl_seconds": policy.issuer_ttl.as_secs(),
        },
    })
}

/// The text view of a status document.
pub fn render(v: &Value) -> String {
    use std::fmt::Write;
    let str_of = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let countdown = |v: &Value| match v.as_i64() {
        Some(s) if s >= 0 => human(std::time::Duration::from_secs(s.unsigned_abs())),
        Some(s) => format!(
            "EXPIRED {} ago",
            human(std::time::Duration::from_secs(s.unsigned_abs()))
        ),
        None => "-".into(),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "trust domain {}   phase {}   bundle version {}   generation {}   mode {}",
        str_of(&v["trust_domain"]),
        str_of(&v["phase"]["name"]),
        v["bundle_version"],
        v["generation"],
        str_of(&v["mode"]),
    );
    let _ = writeln!(
        o,
        "\nANCHORS\n  {:<16}  {:<9}  {:<8}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "KEY", "NOT AFTER"
    );
    for a in v["anchors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<8}  {:<20}  {}",
            str_of(&a["id"]),
            str_of(&a["status"]),
            if a["key_held"].as_bool() == Some(true) {
                "here"
            } else {
                "upstream"
            },
            str_of(&a["not_after"]),
            countdown(&a["expires_in_seconds"])
        );
    }
    let _ = writeln!(
        o,
        "\nISSUERS\n  {:<16}  {:<9}  {:<16}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "ANCHOR", "NOT AFTER"
    );
    for i in v["issuers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<16}  {:<20}  {}",
            str_of(&i["id"]),
            str_of(&i["status"]),
            str_of(&i["anchor"]),
            str_of(&i["not_after"]),
            countdown(&i["expires_in_seconds"])
        );
    }
    if let Some(p) = v["pending_issuer_key"].as_object() {
        let _ = writeln!(
            o,
            "  pending issuer key {} (made {}), waiting for `meshca issuer import`",
            str_of(&p["id"]),
            str_of(&p["created"])
        );
    }
    let _ = writeln!(o, "\nNEXT ISSUER ROTATION");
    for i in v["issuers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["status"] == "active")
    {
        let _ = writeln!(
            o,
            "  prepare the next issuer at   {}",
            str_of(&i["prepare_next_at"])
        );
        let _ = writeln!(
            o,
            "  activate it at               {}",
            str_of(&i["activate_next_at"])
        );
    }
    match v["next_issuer_rotation"].as_object() {
        Some(n) => {
            let _ = writeln!(
                o,
                "  next step: {} at {}",
                str_of(&n["step"]),
                str_of(&n["at"])
            );
        }
        None => {
            let _ = writeln!(o, "  next step: none scheduled");
        }
    }
    let r = &v["anchor_rotation"];
    let _ = writeln!(o, "\nTRUST-ANCHOR ROTATION   phase {}", str_of(&r["phase"]));
    match r["ledger"].as_object() {
        Some(l) => {
            let _ = writeln!(
                o,
                "  bundle convergence: {} of {} live workloads ({:.1} %) hold bundle v{} or newer",
                l.get("workloads_with_current_bundle")
                    .unwrap_or(&Value::Null),
                l.get("live_workloads").unwrap_or(&Value::Null),
                l.get("convergence_percent")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                l.get("current_bundle_version").unwrap_or(&Value::Null),
            );
            let by: Vec<String> = l
                .get("live_leaves_by_anchor")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
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
        None => {
            let _ = writeln!(
                o,
                "  no ledger (no running server): gates are time-based only"
            );
        }
    }
    for g in r["gates"].as_array().into_iter().flatten() {
        let left = match g["opens_in_seconds"].as_i64() {
            Some(s) if s > 0 && g["open"] != true => {
                format!(
                    " (in {})",
                    human(std::time::Duration::from_secs(s.unsigned_abs()))
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "  {:<9} {}{left}",
            str_of(&g["step"]),
            str_of(&g["explain"])
        );
    }
    if let Some(srv) = v["server"].as_object() {
        let _ = writeln!(
            o,
            "\nSERVER\n  ready: {}   issuer rotation failures in a row: {}{}",
            srv.get("ready").and_then(Value::as_bool).unwrap_or(false),
            srv.get("rotation_failures_consecutive")
                .unwrap_or(&Value::Null),
            srv.get("last_rotation_error")
                .and_then(Value::as_str)
                .map(|e| format!("   last error: {e}"))
                .unwrap_or_default()
        );
    }
    for a in v["attention"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "\nATTENTION: {}", str_of(&a["message"]));
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "\nPROBLEM: {}", str_of(p));
    }
    o
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
        assert_eq!(v["mode"], "local");
        assert_eq!(v["next_issuer_rotation"]["step"], "prepare");
        let active = &v["issuers"][0];
        assert_eq!(active["status"], "active");
        assert_eq!(v["next_issuer_rotation"]["at"], active["prepare_next_at"]);
        let text = render(&v);
        assert!(text.contains("phase steady"), "{text}");
        assert!(
            text.contains(&format!(
                "prepare the next issuer at   {}",
                active["prepare_next_at"].as_str().unwrap()
            )),
            "{text}"
        );
        assert!(!text.contains("ATTENTION"), "{text}");
    }
}
