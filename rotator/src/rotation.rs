//! Issuer rotation decisions: pure functions of (state, policy, now). The server's driver asks
//! [`plan_issuer`] what to do, does it through a committed transition, and sleeps until
//! [`IssuerPlan::wake_at`]; it never decides anything itself.
//!
//! Schedule, for an active issuer living `L` (notBefore to notAfter):
//!
//! ```text
//! notBefore ──────────── prepare_at ─────── activate_at ─────────── notAfter
//!                 (L × prepare_remaining left)  (L × activate_remaining left)
//! ```
//!
//! At `prepare_at` the next issuer is made and stored as prepared; at `activate_at` it becomes
//! the active one. With the defaults (7 d, ½, ⅓): prepared 3.5 d in, active 4 d 16 h in, with
//! 56 h of the old issuer left — more than the 48 h max leaf TTL, so no leaf is ever cut short.
//! Issuer rotation never changes the bundle: every issuer chains to the same active anchor.

use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::pki::{CertId, CertInfo};
use crate::policy::Policy;
use crate::state::{AnchorStatus, AuthorityState, IssuerStatus};

/// When the successor of an issuer is prepared and activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerSchedule {
    /// Prepare the next issuer from here on.
    pub prepare_at: OffsetDateTime,
    /// Activate it from here on.
    pub activate_at: OffsetDateTime,
    /// The issuer's notAfter.
    pub expires_at: OffsetDateTime,
}

/// The schedule of an issuer under `policy`.
pub fn schedule(issuer: &CertInfo, policy: &Policy) -> IssuerSchedule {
    let life = issuer.lifetime();
    IssuerSchedule {
        prepare_at: issuer.not_after - policy.issuer_prepare_remaining.of(life),
        activate_at: issuer.not_after - policy.issuer_activate_remaining.of(life),
        expires_at: issuer.not_after,
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerStep {
    /// Make a new issuer signed by this anchor and store it as prepared.
    Prepare {
        /// The active anchor.
        anchor: CertId,
    },
    /// Make this prepared issuer the active one.
    Activate(CertId),
    /// Forget retired issuers that have expired (their files stay on disk).
    Prune,
}

/// The decision for `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerPlan {
    /// What to do now, if anything.
    pub step: Option<IssuerStep>,
    /// When to look again if nothing is to be done now (`None`: only when the state changes).
    pub wake_at: Option<OffsetDateTime>,
    /// The active issuer's schedule, if there is a valid active issuer.
    pub schedule: Option<IssuerSchedule>,
    /// Something only an operator can fix (upstream mode, an anchor about to expire), with the
    /// time by which it must be done. Said loudly: logs, status, readiness detail.
    pub attention: Option<Attention>,
}

/// A condition that needs an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    /// What to do.
    pub message: String,
    /// By when (`None`: already overdue, nothing can sign).
    pub deadline: Option<OffsetDateTime>,
}

/// Decides the issuer step for `now`.
pub fn plan_issuer(s: &AuthorityState, policy: &Policy, now: OffsetDateTime) -> IssuerPlan {
    let Some(anchor) = s.active_anchor() else {
        // `check()` guarantees an active anchor; a state without one has nothing to plan.
        return IssuerPlan {
            step: None,
            wake_at: None,
            schedule: None,
            attention: None,
        };
    };
    let anchor_id = anchor.cert.id().clone();
    let upstream = anchor.key.is_none();
    let active = s.active_issuer().filter(|i| i.cert.info.valid_at(now));
    let active_expiry = active.map(|i| i.cert.info.not_after);
    let candidate = candidate(s, &anchor_id, active_expiry, now);
    // Would a new issuer made now outlive the active one? Not when the anchor ends first.
    let worth_preparing =
        active_expiry.is_none_or(|e| (now + policy.issuer_ttl).min(anchor.cert.info.not_after) > e);
    let prune = s.prune_due(policy.key_retention, now);
    let plan = |step, wake_at, schedule, attention| IssuerPlan {
        step,
        wake_at,
        schedule,
        attention,
    };

    let Some(active) = active else {
        return match (candidate, upstream) {
            (Some(c), _) => plan(Some(IssuerStep::Activate(c)), None, None, None),
            (None, false) => plan(
                Some(IssuerStep::Prepare { anchor: anchor_id }),
                None,
                None,
                None,
            ),
            (None, true) => plan(None, None, None, Some(upstream_attention(None))),
        };
    };
    let sched = schedule(&active.cert.info, policy);
    if now >= sched.activate_at
        && let Some(c) = candidate
    {
        return plan(Some(IssuerStep::Activate(c)), None, Some(sched), None);
    }
    if now >= sched.prepare_at && candidate.is_none() {
        if upstream {
            let step = prune.then_some(IssuerStep::Prune);
            return plan(
                step,
                Some(sched.expires_at),
                Some(sched),
                Some(upstream_attention(Some(sched.expires_at))),
            );
        }
        if worth_preparing {
            return plan(
                Some(IssuerStep::Prepare { anchor: anchor_id }),
                None,
                Some(sched),
                None,
            );
        }
        return plan(
            prune.then_some(IssuerStep::Prune),
            Some(sched.expires_at),
            Some(sched),
            Some(anchor_attention(
                &anchor_id,
                anchor.cert.info.not_after,
                sched.expires_at,
            )),
        );
    }
    if prune {
        return plan(Some(IssuerStep::Prune), None, Some(sched), None);
    }
    let wake_at = if now < sched.prepare_at {
        sched.prepare_at
    } else {
        sched.activate_at
    };
    // The next retired issuer to expire (or retired key to destroy) also needs a wake-up.
    let next_prune = s.next_prune(policy.key_retention);
    let wake_at = next_prune.map_or(wake_at, |p| p.min(wake_at));
    let attention =
        (upstream && now >= sched.prepare_at).then(|| upstream_attention(Some(sched.expires_at)));
    plan(None, Some(wake_at), Some(sched), attention)
}

/// A prepared issuer worth switching to: under the active anchor, valid now, and outliving the
/// active issuer (newest first).
fn candidate(
    s: &AuthorityState,
    anchor_id: &CertId,
    active_expiry: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<CertId> {
    s.issuers
        .iter()
        .rev()
        .find(|i| {
            i.status == IssuerStatus::Prepared
                && &i.anchor == anchor_id
                && i.cert.info.valid_at(now)
                && active_expiry.is_none_or(|e| i.cert.info.not_after > e)
        })
        .map(|i| i.cert.id().clone())
}

/// Upstream mode: what the operator must do, by `deadline` (the active issuer's expiry), or
/// now when there is no valid issuer.
fn upstream_attention(deadline: Option<OffsetDateTime>) -> Attention {
    Attention {
        message: match deadline {
            Some(d) => format!(
                "upstream mode: meshca cannot make issuers; run `meshca issuer csr`, have it signed, and \
                 `meshca issuer import` it before {} (the active issuer expires then)",
                rfc3339(d)
            ),
            None => "upstream mode: there is no valid issuer, nothing can be signed; run `meshca issuer csr`, \
                     have it signed, and `meshca issuer import` it now"
                .into(),
        },
        deadline,
    }
}

/// The anchor ends before a new issuer could outlive the active one.
fn anchor_attention(
    anchor_id: &CertId,
    not_after: OffsetDateTime,
    deadline: OffsetDateTime,
) -> Attention {
    Attention {
        message: format!(
            "trust anchor {anchor_id} expires {}: new issuers cannot outlive it, so the active issuer cannot \
             be replaced; rotate the trust anchor",
            rfc3339(not_after)
        ),
        deadline: Some(deadline),
    }
}

/// Whether an anchor in the state can sign issuers here (its key is held).
pub fn can_make_issuers(s: &AuthorityState) -> bool {
    s.anchors
        .iter()
        .any(|a| a.status == AnchorStatus::Active && a.key.is_some())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::AuthorityState;

    const SEC: Duration = Duration::from_secs(1);

    fn genesis(policy: &Policy, now: OffsetDateTime) -> AuthorityState {
        AuthorityState::genesis("cluster.local".parse().unwrap(), policy, now).unwrap()
    }

    fn apply(
        s: &AuthorityState,
        p: &Policy,
        now: OffsetDateTime,
        step: &IssuerStep,
    ) -> AuthorityState {
        match step {
            IssuerStep::Prepare { anchor } => s.prepare_issuer(p, now, anchor).unwrap(),
            IssuerStep::Activate(id) => s.activate_issuer(now, id).unwrap(),
            IssuerStep::Prune => s.prune_expired_issuers(p.key_retention, now).unwrap(),
        }
    }

    #[test]
    fn default_schedule_in_plain_numbers() {
        let p = Policy::default();
        let t0 = crate::clock::whole_seconds(OffsetDateTime::now_utc());
        let s = genesis(&p, t0);
        let i = &s.active_issuer().unwrap().cert.info;
        let sc = schedule(i, &p);
        // The issuer is back-dated by the 5 min clock skew: life = 7 d 5 min.
        assert_eq!(i.not_after - t0, time::Duration::days(7));
        assert_eq!(
            sc.expires_at - sc.prepare_at,
            time::Duration::seconds((7 * 86400 + 300) / 2)
        );
        assert_eq!(
            sc.expires_at - sc.activate_at,
            time::Duration::seconds((7 * 86400 + 300) / 3)
        );
        assert!(sc.expires_at - sc.activate_at >= time::Duration::hours(48));
    }

    #[test]
    fn boundaries_one_second_either_side() {
        let p = Policy::default();
        let t0 = crate::clock::whole_seconds(OffsetDateTime::now_utc());
        let s = genesis(&p, t0);
        let sc = schedule(&s.active_issuer().unwrap().cert.info, &p);
        let anchor = s.active_anchor().unwrap().cert.id().clone();

        // Prepare: nothing one second before, Prepare at and after.
        let before = plan_issuer(&s, &p, sc.prepare_at - SEC);
        assert_eq!(before.step, None);
        assert_eq!(before.wake_at, Some(sc.prepare_at));
        assert_eq!(
            plan_issuer(&s, &p, sc.prepare_at).step,
            Some(IssuerStep::Prepare {
                anchor: anchor.clone()
            })
        );
        assert_eq!(
            plan_issuer(&s, &p, sc.prepare_at + SEC).step,
            Some(IssuerStep::Prepare {
                anchor: anchor.clone()
            })
        );

        // Prepared: nothing until activate_at, Activate at and after.
        let s2 = apply(&s, &p, sc.prepare_at, &IssuerStep::Prepare { anchor });
        let next = s2
            .issuers
            .iter()
            .find(|i| i.status == IssuerStatus::Prepared)
            .unwrap()
            .cert
            .id()
            .clone();
        let waiting = plan_issuer(&s2, &p, sc.activate_at - SEC);
        assert_eq!(waiting.step, None);
        assert_eq!(waiting.wake_at, Some(sc.activate_at));
        assert_eq!(
            plan_issuer(&s2, &p, sc.activate_at).step,
            Some(IssuerStep::Activate(next.clone()))
        );
        assert_eq!(
            plan_issuer(&s2, &p, sc.activate_at + SEC).step,
            Some(IssuerStep::Activate(next.clone()))
        );

        // Activated: the next prepare point is the new issuer's.
        let s3 = apply(&s2, &p, sc.activate_at, &IssuerStep::Activate(next));
        let sc3 = schedule(&s3.active_issuer().unwrap().cert.info, &p);
        let after = plan_issuer(&s3, &p, sc.activate_at + SEC);
        assert_eq!(after.step, None);
        assert_eq!(
            after.wake_at,
            Some(sc.expires_at.min(sc3.prepare_at)),
            "wakes to prune the retired one or to prepare"
        );
        assert_eq!(
            s3.bundle_version, s.bundle_version,
            "issuer rotation never changes the bundle"
        );

        // The retired issuer is pruned once it has expired, not a second before. (Other steps
        // may come first: the successor's own prepare point is 5 min before this.)
        let old = s.active_issuer().unwrap().cert.id().clone();
        let settle = |mut st: AuthorityState, t: OffsetDateTime| {
            let mut pruned = false;
            while let Some(step) = plan_issuer(&st, &p, t).step {
                pruned |= step == IssuerStep::Prune;
                st = apply(&st, &p, t, &step);
            }
            (st, pruned)
        };
        let (st, pruned) = settle(s3.clone(), sc.expires_at - SEC);
        assert!(!pruned && st.issuer(&old).is_some());
        let (st, pruned) = settle(st, sc.expires_at);
        assert!(pruned && st.issuer(&old).is_none());
        st.check().unwrap();
    }

    #[test]
    fn a_late_driver_prepares_then_activates_at_once() {
        let p = Policy::default();
        let t0 = OffsetDateTime::now_utc();
        let s = genesis(&p, t0);
        let sc = schedule(&s.active_issuer().unwrap().cert.info, &p);
        let late = sc.activate_at + Duration::from_secs(3600);
        let step = plan_issuer(&s, &p, late).step.unwrap();
        assert!(matches!(step, IssuerStep::Prepare { .. }));
        let s2 = apply(&s, &p, late, &step);
        assert!(matches!(
            plan_issuer(&s2, &p, late).step,
            Some(IssuerStep::Activate(_))
        ));
    }

    #[test]
    fn expired_or_missing_issuer_is_replaced_immediately() {
        let p = Policy::default();
        let t0 = OffsetDateTime::now_utc();
        let s = genesis(&p, t0);
        let dead = s.active_issuer().unwrap().cert.info.not_after + SEC;
        assert!(matches!(
            plan_issuer(&s, &p, dead).step,
            Some(IssuerStep::Prepare { .. })
        ));
    }

    #[test]
    fn upstream_mode_asks_for_an_import_with_a_deadline() {
        let p = Policy::default();
        let t0 = OffsetDateTime::now_utc();
        let s = genesis(&p, t0);
        let mut up = s.clone();
        up.anchors[0].key = None;
        let sc = schedule(&up.active_issuer().unwrap().cert.info, &p);
        let quiet = plan_issuer(&up, &p, sc.prepare_at - SEC);
        assert_eq!((quiet.step, quiet.attention), (None, None));
        let loud = plan_issuer(&up, &p, sc.prepare_at);
        assert_eq!(loud.step, None);
        let a = loud.attention.unwrap();
        assert_eq!(a.deadline, Some(sc.expires_at));
        assert!(a.message.contains("meshca issuer import"), "{}", a.message);
        // No issuer at all: overdue.
        up.issuers.clear();
        let none = plan_issuer(&up, &p, t0);
        assert_eq!(none.step, None);
        assert_eq!(none.attention.unwrap().deadline, None);
    }

    #[test]
    fn no_pointless_issuers_when_the_anchor_ends_first() {
        let p = Policy {
            anchor_ttl: Duration::from_secs(8 * 86400),
            ..Policy::default()
        };
        let t0 = OffsetDateTime::now_utc();
        let s = genesis(&p, t0);
        let sc = schedule(&s.active_issuer().unwrap().cert.info, &p);
        // At prepare time a new issuer would end with the anchor, later than the active one: ok.
        assert!(matches!(
            plan_issuer(&s, &p, sc.prepare_at).step,
            Some(IssuerStep::Prepare { .. })
        ));
        // An anchor ending with the active issuer: nothing to gain, so say so instead.
        let p2 = Policy {
            anchor_ttl: Duration::from_secs(7 * 86400),
            ..Policy::default()
        };
        let s2 = genesis(&p2, t0);
        let sc2 = schedule(&s2.active_issuer().unwrap().cert.info, &p2);
        let plan = plan_issuer(&s2, &p2, sc2.prepare_at);
        assert_eq!(plan.step, None);
        assert!(
            plan.attention
                .unwrap()
                .message
                .contains("rotate the trust anchor")
        );
    }
}
