//! Trust-anchor rotation: the phase transitions (pure, like every transition in [`crate::state`])
//! and the gates that say when each may be taken (pure functions of the state, the ledger's
//! summary, the policy and `now`).
//!
//! ```text
//!            stage                activate                 finish
//!  steady {A} ────▶ staged {A,B} ─────────▶ activated {A,B} ─────▶ steady {B}
//!     ▲     A signs   │      ▲   A signs            B signs
//!     └───────────────┘      └──────────────────────┘
//!      rollback (gate: no live     rollback (no gate: the bundle
//!      leaf chains to B)           does not change)
//! ```
//!
//! Gates (measured from the ledger, with a time-based fallback that needs no ledger):
//! - **activate**: every live workload has been handed a bundle containing B, or
//!   `leaf_ttl_max + propagation_allowance` has passed since staging.
//! - **finish**: no live leaf chains to A, or `leaf_ttl_max + clock_skew` has passed since
//!   activation (a leaf signed by A just before activation is accepted by a verifier whose clock
//!   is `clock_skew` behind until then).
//! - **rollback staged → steady**: no live leaf chains to B, or `leaf_ttl_max + clock_skew` has
//!   passed since B stopped signing (open at once when B never signed).
//! - **rollback activated → staged**: always open; both anchors stay in the bundle.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::ledger::{LedgerSummary, RestartBound};
use crate::pki::{CaCert, CertId, SecretKey};
use crate::policy::Policy;
use crate::state::{
    AnchorStatus, AuthorityState, Issuer, IssuerStatus, Phase, StateError, human, no_active_anchor,
};

pub use crate::gate::{Gate, OpenedBy, Step};

fn ledger_note(l: Option<&LedgerSummary>, now: OffsetDateTime) -> Option<String> {
    match l {
        None => Some("no ledger here (ask the running server): time-based only".into()),
        Some(l) if l.partial => Some(
            "replicas sign independently and each ledger sees only its own leaves: measured gates are \
             off, time-based only"
                .into(),
        ),
        Some(l) if !l.trustworthy(now) => Some(format!(
            "the ledger is complete only since {}, so leaves signed before may be unknown; measured gates \
             are off until {} (time-based until then)",
            rfc3339(l.complete_since),
            rfc3339(l.trustworthy_at)
        )),
        Some(_) => None,
    }
}

/// The gate of `step` in state `s`. `Err` when the step does not apply to the phase.
pub fn gate(
    s: &AuthorityState,
    policy: &Policy,
    ledger: Option<&LedgerSummary>,
    now: OffsetDateTime,
    step: Step,
) -> Result<Gate, StateError> {
    let j = Judge {
        step,
        now,
        note: ledger_note(ledger, now),
        usable: ledger.filter(|l| l.trustworthy(now)),
    };
    match (&s.phase, step) {
        (Phase::Steady, Step::Stage) => Ok(j.always("staging only adds an anchor to the bundle")),
        (Phase::Staged { since, .. }, Step::Activate) => Ok(with_restart_bound(
            activate_gate(&j, policy, *since),
            ledger.map(|l| &l.restart_bound),
        )),
        (Phase::Activated { previous, since }, Step::Finish) => {
            Ok(finish_gate(&j, policy, previous, *since))
        }
        (Phase::Activated { .. }, Step::Rollback) => {
            Ok(j.always("both anchors stay in the bundle, so every live leaf keeps verifying"))
        }
        (
            Phase::Staged {
                anchor,
                signed_until,
                ..
            },
            Step::Rollback,
        ) => Ok(match signed_until {
            None => j.always(&format!(
                "the new anchor {anchor} never signed, so no leaf chains to it"
            )),
            Some(until) => rollback_staged_gate(&j, policy, anchor, *until),
        }),
        _ => Err(wrong_phase(s, step)),
    }
}

/// What every gate of one step at one instant shares: the ledger as far as it can be trusted,
/// and the note saying when it cannot.
struct Judge<'a> {
    step: Step,
    now: OffsetDateTime,
    note: Option<String>,
    usable: Option<&'a LedgerSummary>,
}

/// A gate's case: what it measures and what forcing it risks.
struct Case {
    /// The measurement's verdict (`None`: no trustworthy ledger).
    open_measured: Option<bool>,
    /// When the time fallback opens it.
    opens_at: OffsetDateTime,
    condition: String,
    measured: String,
    risk: String,
    at_risk: Option<u64>,
}

impl Judge<'_> {
    /// A step that is safe in itself.
    fn always(&self, condition: &str) -> Gate {
        Gate {
            step: self.step,
            open: true,
            opened_by: Some(OpenedBy::Always),
            condition: condition.to_owned(),
            measured: String::new(),
            opens_at: None,
            risk: String::new(),
            at_risk: None,
        }
    }

    /// Open when measured open, else when its time fallback has passed.
    fn judge(&self, c: Case) -> Gate {
        let opened_by = if c.open_measured == Some(true) {
            Some(OpenedBy::Measured)
        } else if self.now >= c.opens_at {
            Some(OpenedBy::Time)
        } else {
            None
        };
        let open = opened_by.is_some();
        Gate {
            step: self.step,
            open,
            opened_by,
            condition: c.condition,
            measured: self.note.clone().unwrap_or(c.measured),
            opens_at: Some(c.opens_at),
            risk: if open { String::new() } else { c.risk },
            at_risk: if open { None } else { c.at_risk },
        }
    }
}

/// staged → activated: every live workload holds a bundle with the new anchor, or the time
/// fallback since staging.
fn activate_gate(j: &Judge<'_>, policy: &Policy, since: OffsetDateTime) -> Gate {
    let (ok, measured, behind) = match j.usable {
        Some(l) => {
            let behind = l.live_workloads - l.workloads_current.min(l.live_workloads);
            (
                Some(behind == 0),
                format!(
                    "{} of {} live workloads ({}) hold bundle v{} or newer{}",
                    l.workloads_current,
                    l.live_workloads,
                    percent(l.workloads_current, l.live_workloads),
                    l.min_version,
                    by_face(l)
                ),
                Some(behind),
            )
        }
        None => (None, String::new(), None),
    };
    let risk = match behind {
        Some(n) => format!(
            "{n} live workloads have not been handed a bundle containing the new anchor: leaves it \
             signs will not verify there until they fetch one"
        ),
        None => "an unknown number of workloads may not hold the new anchor yet: leaves it signs \
                 will not verify there until they fetch it"
            .into(),
    };
    j.judge(Case {
        open_measured: ok,
        opens_at: since + policy.leaf_ttl_max + policy.propagation_allowance,
        condition: format!(
            "every live workload has a bundle with the new anchor, or max leaf TTL {} + propagation \
             allowance {} has passed since staging",
            human(policy.leaf_ttl_max),
            human(policy.propagation_allowance)
        ),
        measured,
        risk,
        at_risk: behind,
    })
}

/// activated → steady: no live leaf chains to the old anchor, or the time fallback since
/// activation.
fn finish_gate(j: &Judge<'_>, policy: &Policy, previous: &CertId, since: OffsetDateTime) -> Gate {
    let opens_at = since + policy.leaf_ttl_max + policy.clock_skew;
    let live = j.usable.map(|l| l.live_under(previous));
    j.judge(Case {
        open_measured: live.map(|n| n == 0),
        opens_at,
        condition: format!(
            "no live leaf chains to the old anchor {previous}, or max leaf TTL {} + clock skew {} has \
             passed since activation",
            human(policy.leaf_ttl_max),
            human(policy.clock_skew)
        ),
        measured: live
            .map(|n| format!("{n} live leaves chain to {previous}"))
            .unwrap_or_default(),
        risk: match live {
            Some(n) => format!(
                "{n} live leaves chain to {previous} and will stop verifying wherever the new bundle \
                 (without {previous}) arrives"
            ),
            None => format!(
                "leaves signed under {previous} until {} may live until {} and will stop verifying",
                rfc3339(since),
                rfc3339(opens_at)
            ),
        },
        at_risk: live,
    })
}

/// staged → steady after the new anchor signed: no live leaf chains to it, or the time fallback
/// since it stopped signing.
fn rollback_staged_gate(
    j: &Judge<'_>,
    policy: &Policy,
    anchor: &CertId,
    until: OffsetDateTime,
) -> Gate {
    let opens_at = until + policy.leaf_ttl_max + policy.clock_skew;
    let live = j.usable.map(|l| l.live_under(anchor));
    j.judge(Case {
        open_measured: live.map(|n| n == 0),
        opens_at,
        condition: format!(
            "no live leaf chains to the new anchor {anchor}, or max leaf TTL {} + clock skew {} has \
             passed since it stopped signing",
            human(policy.leaf_ttl_max),
            human(policy.clock_skew)
        ),
        measured: live
            .map(|n| format!("{n} live leaves chain to {anchor}"))
            .unwrap_or_default(),
        risk: match live {
            Some(n) => format!("{n} live leaves chain to {anchor} and will stop verifying"),
            None => format!(
                "leaves signed under {anchor} until {} may live until {} and will stop verifying",
                rfc3339(until),
                rfc3339(opens_at)
            ),
        },
        at_risk: live,
    })
}

/// The activate gate where some workloads read anchors only when they start (Linkerd's
/// proxies): closed while any of them was started before the new anchors reached it, whatever
/// the time — the time fallback assumes workloads fetch bundles, and these never do. When they
/// cannot be counted, the gate is left to time and says so.
fn with_restart_bound(mut g: Gate, rb: Option<&RestartBound>) -> Gate {
    let also = |a: &str, b: String| {
        if a.is_empty() { b } else { format!("{a}; {b}") }
    };
    match rb {
        None | Some(RestartBound::NotTracked | RestartBound::Counted { proxies: 0, .. }) => g,
        Some(RestartBound::Unknown { reason }) => {
            g.measured = also(
                &g.measured,
                format!(
                    "Linkerd proxies not counted ({reason}): only the time fallback guards them"
                ),
            );
            g
        }
        Some(RestartBound::Counted {
            proxies,
            stale,
            since,
            not_reached,
            ..
        }) => {
            g.condition.push_str(
                "; and every Linkerd proxy was started after the new anchors reached its trust roots",
            );
            g.measured = also(
                &g.measured,
                match since {
                    Some(t) => format!(
                        "{} of {proxies} Linkerd proxies were started after the new anchors reached their trust roots ({})",
                        proxies - stale.min(proxies),
                        rfc3339(*t)
                    ),
                    None => format!(
                        "the new anchors have not reached Linkerd's trust roots yet{}: none of {proxies} Linkerd proxies holds them",
                        not_reached
                            .as_deref()
                            .map(|w| format!(" ({w})"))
                            .unwrap_or_default()
                    ),
                },
            );
            if *stale > 0 {
                g.open = false;
                g.opened_by = None;
                g.risk = format!(
                    "{stale} Linkerd proxies read trust anchors only at start and hold only the old anchor: leaves the \
                     new anchor signs will not verify there until their pods are replaced (`meshca anchors restarts`)"
                );
                g.at_risk = Some(*stale);
            }
            g
        }
    }
}

/// The gates of the steps that apply in the current phase.
pub fn gates(
    s: &AuthorityState,
    policy: &Policy,
    ledger: Option<&LedgerSummary>,
    now: OffsetDateTime,
) -> Vec<Gate> {
    [Step::Stage, Step::Activate, Step::Finish, Step::Rollback]
        .into_iter()
        .filter_map(|st| gate(s, policy, ledger, now, st).ok())
        .collect()
}

/// ` (meshca 18 of 18, istio 4 of 6)`: the count per face when more than one face (or another
/// face than meshca.v1) has live workloads; empty otherwise.
pub fn by_face(l: &LedgerSummary) -> String {
    if l.by_api.keys().all(|a| *a == crate::ledger::Api::Meshca) {
        return String::new();
    }
    let parts: Vec<String> = l
        .by_api
        .iter()
        .map(|(a, c)| format!("{a} {} of {}", c.workloads_current, c.live_workloads))
        .collect();
    format!(" ({})", parts.join(", "))
}

fn percent(n: u64, of: u64) -> String {
    if of == 0 {
        return "100 %".into();
    }
    #[allow(clippy::cast_precision_loss, reason = "a percentage for display")]
    let p = n as f64 * 100.0 / of as f64;
    format!("{p:.1} %")
}

/// A new anchor for `stage`: generated here, or imported (a certificate, with its key unless it
/// lives upstream).
#[derive(Debug, Clone)]
pub enum NewAnchor {
    /// Make a new P-256 anchor with the policy's anchor TTL.
    Generate,
    /// Use this certificate (and key, when held here).
    Import(Box<CaCert>, Option<SecretKey>),
}

impl AuthorityState {
    /// The anchor key is compromised: steady → activated in one step. A new anchor is generated
    /// and staged, its issuer activated at once (the convergence gate is skipped: `force`), and
    /// every issuer of the old anchor is revoked (`reason`), so their leaves cannot renew with
    /// their certificates and watchers are told to renew now. The old anchor stays in the bundle
    /// until the operator runs `finish` (forced, if leaves under it still live). Refused outside
    /// steady, and in upstream mode (meshca cannot make an anchor whose key it does not hold).
    pub fn emergency_anchor_rotation(
        &self,
        policy: &Policy,
        ledger: Option<&LedgerSummary>,
        now: OffsetDateTime,
        reason: &str,
        by: &str,
    ) -> Result<Self, StateError> {
        if reason.trim().is_empty() {
            return Err(StateError::Unusable(
                "an emergency rotation needs a reason (--reason)".into(),
            ));
        }
        if !matches!(self.phase, Phase::Steady) {
            return Err(StateError::WrongPhase {
                step: "emergency",
                phase: self.phase.name(),
                next: ": it starts from steady; finish or roll back the rotation in progress \
                       first (both can be forced), or revoke the compromised anchor's issuers \
                       with `meshca issuer revoke`",
            });
        }
        let old = self.active_anchor().ok_or_else(no_active_anchor)?;
        if old.key.is_none() {
            return Err(StateError::Upstream(
                "upstream mode: the anchor is held upstream; have your upstream CA make a new anchor, then \
                 `meshca anchors stage --cert NEW.pem`, import its issuer, and `activate --force`"
                    .into(),
            ));
        }
        let old_id = old.cert.id().clone();
        let staged = self.stage_anchor(policy, now, NewAnchor::Generate)?;
        let mut s = staged.activate_anchor(policy, ledger, now, true)?;
        let under_old: Vec<CertId> = s
            .issuers
            .iter()
            .filter(|i| i.anchor == old_id && !s.revoked.iter().any(|r| r.issuer == *i.cert.id()))
            .map(|i| i.cert.id().clone())
            .collect();
        for id in under_old {
            s = s.revoke_issuer(
                policy,
                now,
                &id,
                format!("anchor {old_id} compromised: {reason}"),
                by.to_owned(),
            )?;
        }
        s.record(now, format!("anchor_emergency {old_id}: {reason}"));
        Ok(s)
    }

    /// steady → staged: the new anchor joins the bundle (new bundle version); an issuer under it
    /// is prepared at once when its key is held, so activation is instant.
    pub fn stage_anchor(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        new: NewAnchor,
    ) -> Result<Self, StateError> {
        gate(self, policy, None, now, Step::Stage)?;
        let current = self.active_anchor().ok_or_else(no_active_anchor)?;
        let (cert, key) = match new {
            NewAnchor::Generate => {
                let key = SecretKey::generate_ca()?;
                let cert = crate::profile::new_anchor(
                    &self.trust_domain,
                    &key,
                    now,
                    policy.anchor_ttl,
                    policy.clock_skew,
                )?;
                (cert, Some(key))
            }
            NewAnchor::Import(cert, key) => {
                let cert = *cert;
                if let Some(k) = &key
                    && !cert.matches_key(k)
                {
                    return Err(StateError::Unusable(
                        "the key does not match the anchor certificate".into(),
                    ));
                }
                if !cert.info.self_signed {
                    return Err(StateError::Unusable(
                        "the anchor certificate is not self-signed (a trust anchor is a root)"
                            .into(),
                    ));
                }
                if !cert.info.is_ca || !cert.info.key_cert_sign {
                    return Err(StateError::Unusable(
                        "the anchor certificate is not a CA allowed to sign certificates \
                         (basicConstraints CA and keyUsage keyCertSign are required)"
                            .into(),
                    ));
                }
                if !cert.info.valid_at(now) {
                    return Err(StateError::Unusable(format!(
                        "the anchor certificate is not valid now (valid {} to {})",
                        rfc3339(cert.info.not_before),
                        rfc3339(cert.info.not_after)
                    )));
                }
                if self.anchor(cert.id()).is_some() {
                    return Err(StateError::Unusable(format!(
                        "anchor {} is already known to this authority (a rotation needs a new anchor)",
                        cert.id()
                    )));
                }
                (cert, key)
            }
        };
        if cert.info.not_after < current.cert.info.not_after {
            return Err(StateError::Unusable(format!(
                "the new anchor expires {} — before the current anchor {} ({}): rotating to it shortens the trust chain's life",
                rfc3339(cert.info.not_after),
                current.cert.id(),
                rfc3339(current.cert.info.not_after)
            )));
        }
        let id = cert.id().clone();
        let has_key = key.is_some();
        let mut s = self.clone();
        s.anchors.push(crate::state::Anchor {
            cert,
            key,
            status: AnchorStatus::Staged,
            archived: None,
        });
        s.bundle_version += 1;
        s.phase = Phase::Staged {
            anchor: id.clone(),
            since: crate::clock::whole_seconds(now),
            signed_until: None,
        };
        s.record(
            now,
            format!("anchor_staged {id} bundle_version {}", s.bundle_version),
        );
        if has_key {
            s = s.prepare_issuer(policy, now, &id)?;
        }
        Ok(s)
    }

    /// staged → activated: the new anchor's prepared issuer signs from now on; the old anchor
    /// stays in the bundle (retiring). Refused when the gate is closed unless `force`.
    pub fn activate_anchor(
        &self,
        policy: &Policy,
        ledger: Option<&LedgerSummary>,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<Self, StateError> {
        let g = gate(self, policy, ledger, now, Step::Activate)?;
        refuse_closed(&g, force)?;
        let Phase::Staged { anchor: new, .. } = &self.phase else {
            return Err(wrong_phase(self, Step::Activate));
        };
        let old = self
            .active_anchor()
            .map(|a| a.cert.id().clone())
            .ok_or_else(no_active_anchor)?;
        let mut s = self.clone();
        let issuer = s.issuer_for(policy, now, new)?;
        set_status(&mut s, &old, AnchorStatus::Retiring);
        set_status(&mut s, new, AnchorStatus::Active);
        switch_issuer(&mut s, &issuer);
        s.phase = Phase::Activated {
            previous: old.clone(),
            since: crate::clock::whole_seconds(now),
        };
        s.record(
            now,
            format!(
                "anchor_activated {new} issuer {issuer} previous {old}{}",
                forced(&g, force)
            ),
        );
        Ok(s)
    }

    /// activated → steady: the old anchor leaves the bundle (new bundle version) and is archived
    /// (its certificate kept; its key destroyed after `policy.key_retention`). Refused when the gate is closed unless `force`.
    pub fn finish_anchor(
        &self,
        policy: &Policy,
        ledger: Option<&LedgerSummary>,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<Self, StateError> {
        let g = gate(self, policy, ledger, now, Step::Finish)?;
        refuse_closed(&g, force)?;
        let Phase::Activated { previous, .. } = &self.phase else {
            return Err(wrong_phase(self, Step::Finish));
        };
        let mut s = self.clone();
        archive(&mut s, previous, now);
        s.bundle_version += 1;
        s.phase = Phase::Steady;
        s.record(
            now,
            format!(
                "anchor_finished archived {previous} bundle_version {}{}",
                s.bundle_version,
                forced(&g, force)
            ),
        );
        Ok(s)
    }

    /// activated → staged (the old anchor's issuer signs again), or staged → steady (the new
    /// anchor leaves the bundle and is archived). Refused when the gate is closed unless `force`.
    pub fn rollback_anchor(
        &self,
        policy: &Policy,
        ledger: Option<&LedgerSummary>,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<Self, StateError> {
        let g = gate(self, policy, ledger, now, Step::Rollback)?;
        refuse_closed(&g, force)?;
        let mut s = self.clone();
        match &self.phase {
            Phase::Activated { previous, .. } => {
                let new = self
                    .active_anchor()
                    .map(|a| a.cert.id().clone())
                    .ok_or_else(no_active_anchor)?;
                let issuer = s.issuer_for(policy, now, previous)?;
                set_status(&mut s, &new, AnchorStatus::Staged);
                set_status(&mut s, previous, AnchorStatus::Active);
                switch_issuer(&mut s, &issuer);
                let now_s = crate::clock::whole_seconds(now);
                s.phase = Phase::Staged {
                    anchor: new.clone(),
                    since: now_s,
                    signed_until: Some(now_s),
                };
                s.record(
                    now,
                    format!(
                        "anchor_rolled_back_to_staged {new} issuer {issuer} signs under {previous}"
                    ),
                );
            }
            Phase::Staged { anchor, .. } => {
                archive(&mut s, anchor, now);
                // Prepared issuers under it will never sign: forget them (their files stay).
                s.issuers
                    .retain(|i| !(i.anchor == *anchor && i.status == IssuerStatus::Prepared));
                s.bundle_version += 1;
                s.phase = Phase::Steady;
                s.record(
                    now,
                    format!(
                        "anchor_rolled_back_to_steady archived {anchor} bundle_version {}{}",
                        s.bundle_version,
                        forced(&g, force)
                    ),
                );
            }
            Phase::Steady => return Err(wrong_phase(self, Step::Rollback)),
        }
        Ok(s)
    }

    /// An issuer under `anchor` able to sign now for at least `leaf_ttl_max` (newest first; a
    /// prepared or a retired one), or a new one prepared here when the anchor's key is held.
    fn issuer_for(
        &mut self,
        policy: &Policy,
        now: OffsetDateTime,
        anchor: &CertId,
    ) -> Result<CertId, StateError> {
        let revoked: Vec<CertId> = self.revoked.iter().map(|r| r.issuer.clone()).collect();
        let usable = |i: &&Issuer| {
            i.anchor == *anchor
                && !revoked.contains(i.cert.id())
                && i.status != IssuerStatus::Active
                && i.cert.info.valid_at(now)
                && i.cert.info.remaining(now) >= policy.leaf_ttl_max
        };
        if let Some(i) = self
            .issuers
            .iter()
            .filter(usable)
            .max_by_key(|i| i.cert.info.not_after)
        {
            return Ok(i.cert.id().clone());
        }
        let a = self
            .anchor(anchor)
            .ok_or_else(|| StateError::NotFound(format!("no anchor {anchor}")))?;
        if a.key.is_none() {
            return Err(StateError::Upstream(format!(
                "anchor {anchor} is held upstream and no issuer under it can sign for {} from now: \
                 run `meshca issuer csr`, have it signed by {anchor}, `meshca issuer import` it, then retry",
                human(policy.leaf_ttl_max)
            )));
        }
        *self = self.prepare_issuer(policy, now, anchor)?;
        self.issuers
            .last()
            .map(|i| i.cert.id().clone())
            .ok_or_else(|| StateError::Invariant("no issuer was prepared".into()))
    }
}

fn refuse_closed(g: &Gate, force: bool) -> Result<(), StateError> {
    if g.open || force {
        return Ok(());
    }
    Err(StateError::GateClosed(Box::new(g.clone())))
}

/// `step` refused in the current phase, naming the steps that apply.
fn wrong_phase(s: &AuthorityState, step: Step) -> StateError {
    StateError::WrongPhase {
        step: step.name(),
        phase: s.phase.name(),
        next: match &s.phase {
            Phase::Steady => ": the next step is `stage`",
            Phase::Staged { .. } => ": the next steps are `activate` or `rollback`",
            Phase::Activated { .. } => ": the next steps are `finish` or `rollback`",
        },
    }
}

fn forced(g: &Gate, force: bool) -> String {
    if force && !g.open {
        format!(" FORCED past a closed gate (risk: {})", g.risk)
    } else {
        String::new()
    }
}

fn set_status(s: &mut AuthorityState, id: &CertId, status: AnchorStatus) {
    for a in &mut s.anchors {
        if a.cert.id() == id {
            a.status = status;
        }
    }
}

/// Archives anchor `id` at `now`: out of the bundle; its key is destroyed after
/// `policy.key_retention` (`AuthorityState::prune_expired_issuers`).
fn archive(s: &mut AuthorityState, id: &CertId, now: OffsetDateTime) {
    set_status(s, id, AnchorStatus::Archived);
    for a in &mut s.anchors {
        if a.cert.id() == id {
            a.archived = Some(crate::clock::whole_seconds(now));
        }
    }
}

fn switch_issuer(s: &mut AuthorityState, id: &CertId) {
    for i in &mut s.issuers {
        if i.cert.id() == id {
            i.status = IssuerStatus::Active;
        } else if i.status == IssuerStatus::Active {
            i.status = IssuerStatus::Retired;
        }
    }
}

/// How long a whole trust-anchor rotation takes when every gate opens only by time:
/// stage → activate (`leaf_ttl_max + propagation_allowance`), activate → finish
/// (`leaf_ttl_max + clock_skew`).
pub fn rotation_duration(policy: &Policy) -> Duration {
    2 * policy.leaf_ttl_max + policy.propagation_allowance + policy.clock_skew
}

/// The last safe moment to *start* rotating an anchor expiring at `not_after`: after it, a
/// rotation cannot finish by its gates before the anchor expires.
pub fn anchor_rotation_deadline(not_after: OffsetDateTime, policy: &Policy) -> OffsetDateTime {
    not_after - rotation_duration(policy)
}

/// The last moment by which an issuer expiring at `not_after` must have been replaced: after it,
/// leaves it signs are cut short of the max leaf TTL.
pub fn issuer_rotation_deadline(not_after: OffsetDateTime, policy: &Policy) -> OffsetDateTime {
    not_after - policy.leaf_ttl_max
}

/// Opt-in automation of anchor rotation (both off by default).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Automation {
    /// Stage a rotation by itself when the active anchor has this long left.
    #[serde(
        with = "crate::policy::duration_opt_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_stage_before: Option<Duration>,
    /// Take `activate` and `finish` by themselves as soon as their gates open.
    pub auto_advance: bool,
}

/// What the automation would do now, and when to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorPlan {
    /// The step to take now.
    pub step: Option<Step>,
    /// When to look again (a time fallback opening, the auto-stage point).
    pub wake_at: Option<OffsetDateTime>,
}

/// The automation's decision at `now`. Only forward steps, never forced, never a rollback.
pub fn plan_anchor(
    s: &AuthorityState,
    policy: &Policy,
    auto: &Automation,
    ledger: Option<&LedgerSummary>,
    now: OffsetDateTime,
) -> AnchorPlan {
    let none = AnchorPlan {
        step: None,
        wake_at: None,
    };
    match &s.phase {
        Phase::Steady => {
            let (Some(before), Some(a)) = (auto.auto_stage_before, s.active_anchor()) else {
                return none;
            };
            let at = a.cert.info.not_after - before;
            if now >= at {
                AnchorPlan {
                    step: Some(Step::Stage),
                    wake_at: None,
                }
            } else {
                AnchorPlan {
                    step: None,
                    wake_at: Some(at),
                }
            }
        }
        Phase::Staged { .. } | Phase::Activated { .. } if auto.auto_advance => {
            let step = if matches!(s.phase, Phase::Staged { .. }) {
                Step::Activate
            } else {
                Step::Finish
            };
            match gate(s, policy, ledger, now, step) {
                Ok(g) if g.open => AnchorPlan {
                    step: Some(step),
                    wake_at: None,
                },
                Ok(g) => AnchorPlan {
                    step: None,
                    wake_at: g.opens_at,
                },
                Err(_) => none,
            }
        }
        _ => none,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn t0() -> OffsetDateTime {
        crate::clock::whole_seconds(OffsetDateTime::now_utc())
    }

    fn genesis(p: &Policy, now: OffsetDateTime) -> AuthorityState {
        AuthorityState::genesis("cluster.local".parse().unwrap(), p, now).unwrap()
    }

    fn ledger(
        now: OffsetDateTime,
        live: &[(&CertId, u64)],
        workloads: u64,
        current: u64,
        version: u64,
    ) -> LedgerSummary {
        LedgerSummary {
            complete_since: now - Duration::from_secs(400 * 86400),
            trustworthy_at: now - Duration::from_secs(300 * 86400),
            live_leaves: live
                .iter()
                .map(|(a, n)| ((*a).clone(), *n))
                .collect::<BTreeMap<_, _>>(),
            live_workloads: workloads,
            workloads_current: current,
            min_version: version,
            by_api: BTreeMap::new(),
            partial: false,
            restart_bound: RestartBound::NotTracked,
            revoked_issuers: Vec::new(),
        }
    }

    #[test]
    fn linkerd_proxies_started_before_the_new_anchors_hold_the_activate_gate_past_its_time() {
        let p = Policy::default();
        let now = t0();
        let s1 = genesis(&p, now)
            .stage_anchor(&p, now, NewAnchor::Generate)
            .unwrap();
        let late = now + p.leaf_ttl_max + p.propagation_allowance;
        let with = |rb: RestartBound| LedgerSummary {
            partial: true,
            restart_bound: rb,
            ..ledger(late, &[], 0, 0, 2)
        };
        let counted = |proxies, stale, since: Option<OffsetDateTime>| RestartBound::Counted {
            proxies,
            stale,
            since,
            not_reached: since.is_none().then(|| "no ConfigMap linkerd/x".to_owned()),
            workloads: vec![],
            by_creation_time: 0,
        };
        // Time has passed; 3 of 5 proxies predate the anchors in their trust roots: closed.
        let g = gate(
            &s1,
            &p,
            Some(&with(counted(5, 3, Some(now)))),
            late,
            Step::Activate,
        )
        .unwrap();
        assert!(!g.open, "{}", g.explain());
        assert_eq!(g.at_risk, Some(3));
        assert!(
            g.measured.contains("2 of 5 Linkerd proxies"),
            "{}",
            g.measured
        );
        assert!(g.risk.contains("meshca anchors restarts"), "{}", g.risk);
        assert!(
            s1.activate_anchor(&p, Some(&with(counted(5, 3, Some(now)))), late, false)
                .is_err()
        );
        // The anchors never reached the ConfigMap: closed, saying why.
        let g = gate(
            &s1,
            &p,
            Some(&with(counted(5, 5, None))),
            late,
            Step::Activate,
        )
        .unwrap();
        assert!(
            !g.open && g.measured.contains("no ConfigMap linkerd/x"),
            "{}",
            g.measured
        );
        // None stale: the time fallback decides again; no proxies: as if untracked.
        for rb in [
            counted(5, 0, Some(now)),
            counted(0, 0, None),
            RestartBound::NotTracked,
        ] {
            assert!(
                gate(&s1, &p, Some(&with(rb.clone())), late, Step::Activate)
                    .unwrap()
                    .open,
                "{rb:?}"
            );
            assert!(
                !gate(&s1, &p, Some(&with(rb.clone())), late - SEC, Step::Activate)
                    .unwrap()
                    .open,
                "{rb:?}"
            );
        }
        // Pods that cannot be listed: time, and it says so.
        let g = gate(
            &s1,
            &p,
            Some(&with(RestartBound::Unknown {
                reason: "pods not listed".into(),
            })),
            late,
            Step::Activate,
        )
        .unwrap();
        assert!(
            g.open && g.measured.contains("only the time fallback guards them"),
            "{}",
            g.measured
        );
        // Other gates are untouched.
        let s2 = s1.activate_anchor(&p, None, late, false).unwrap();
        let fin = late + p.leaf_ttl_max + p.clock_skew;
        assert!(
            gate(&s2, &p, Some(&with(counted(5, 5, None))), fin, Step::Finish)
                .unwrap()
                .open
        );
    }

    #[test]
    fn a_full_rotation_moves_the_bundle_and_the_signer() {
        let p = Policy::default();
        let now = t0();
        let s = genesis(&p, now);
        let a = s.active_anchor().unwrap().cert.id().clone();
        let s1 = s.stage_anchor(&p, now, NewAnchor::Generate).unwrap();
        s1.check().unwrap();
        let Phase::Staged { anchor: b, .. } = s1.phase.clone() else {
            panic!("not staged")
        };
        assert_eq!(s1.bundle_version, 2);
        assert_eq!(s1.bundle().count(), 2);
        assert_eq!(s1.active_issuer().unwrap().anchor, a, "A still signs");
        assert!(
            s1.issuers
                .iter()
                .any(|i| i.anchor == b && i.status == IssuerStatus::Prepared),
            "an issuer under B is prepared at stage time"
        );
        let later = now + p.leaf_ttl_max + p.propagation_allowance;
        let s2 = s1.activate_anchor(&p, None, later, false).unwrap();
        s2.check().unwrap();
        assert_eq!(s2.active_issuer().unwrap().anchor, b);
        assert_eq!(s2.anchor(&a).unwrap().status, AnchorStatus::Retiring);
        assert_eq!(
            s2.bundle_version, 2,
            "activation does not change the bundle"
        );
        let end = later + p.leaf_ttl_max + p.clock_skew;
        let s3 = s2.finish_anchor(&p, None, end, false).unwrap();
        s3.check().unwrap();
        assert_eq!(s3.phase, Phase::Steady);
        assert_eq!(s3.bundle_version, 3);
        assert_eq!(
            s3.bundle().map(|x| x.cert.id().clone()).collect::<Vec<_>>(),
            vec![b.clone()]
        );
        assert!(
            s3.anchor(&a).unwrap().key.is_some(),
            "the old anchor is archived, key kept"
        );
    }

    #[test]
    fn time_gates_open_exactly_at_their_second() {
        let p = Policy::default();
        let now = t0();
        let s1 = genesis(&p, now)
            .stage_anchor(&p, now, NewAnchor::Generate)
            .unwrap();
        let open_at = now + p.leaf_ttl_max + p.propagation_allowance;
        let g = gate(&s1, &p, None, open_at - SEC, Step::Activate).unwrap();
        assert!(!g.open);
        assert_eq!(g.opens_at, Some(open_at));
        assert!(g.measured.contains("time-based only"), "{}", g.measured);
        assert!(s1.activate_anchor(&p, None, open_at - SEC, false).is_err());
        let g = gate(&s1, &p, None, open_at, Step::Activate).unwrap();
        assert_eq!((g.open, g.opened_by), (true, Some(OpenedBy::Time)));

        let s2 = s1.activate_anchor(&p, None, open_at, false).unwrap();
        let fin = open_at + p.leaf_ttl_max + p.clock_skew;
        assert!(!gate(&s2, &p, None, fin - SEC, Step::Finish).unwrap().open);
        assert!(gate(&s2, &p, None, fin, Step::Finish).unwrap().open);
        let e = s2.finish_anchor(&p, None, fin - SEC, false).unwrap_err();
        assert!(
            matches!(&e, StateError::GateClosed(g) if g.step == Step::Finish),
            "{e}"
        );
        assert!(
            e.to_string().contains("gate closed") && e.to_string().contains("--force"),
            "{e}"
        );
        // Forced: taken, and the history says so.
        let forced = s2.finish_anchor(&p, None, fin - SEC, true).unwrap();
        assert!(forced.history.last().unwrap().what.contains("FORCED"));

        // Rollback from activated is always open; from staged after that it waits for B's leaves.
        let back = s2.rollback_anchor(&p, None, open_at + SEC, false).unwrap();
        back.check().unwrap();
        assert_eq!(back.phase.name(), "staged");
        let until = open_at + SEC + p.leaf_ttl_max + p.clock_skew;
        assert!(
            !gate(&back, &p, None, until - SEC, Step::Rollback)
                .unwrap()
                .open
        );
        assert!(gate(&back, &p, None, until, Step::Rollback).unwrap().open);
        let steady = back.rollback_anchor(&p, None, until, false).unwrap();
        steady.check().unwrap();
        assert_eq!(steady.bundle().count(), 1);
        assert_eq!(steady.bundle_version, 3);
    }

    #[test]
    fn measured_gates_follow_the_ledger() {
        let p = Policy::default();
        let now = t0();
        let s = genesis(&p, now);
        let a = s.active_anchor().unwrap().cert.id().clone();
        let s1 = s.stage_anchor(&p, now, NewAnchor::Generate).unwrap();
        let l = ledger(now, &[(&a, 5)], 5, 4, 2);
        let g = gate(&s1, &p, Some(&l), now, Step::Activate).unwrap();
        assert!(!g.open);
        assert_eq!(g.at_risk, Some(1));
        assert!(
            g.measured.contains("4 of 5 live workloads (80.0 %)"),
            "{}",
            g.measured
        );
        let l = ledger(now, &[(&a, 5)], 5, 5, 2);
        let g = gate(&s1, &p, Some(&l), now, Step::Activate).unwrap();
        assert_eq!((g.open, g.opened_by), (true, Some(OpenedBy::Measured)));
        let s2 = s1.activate_anchor(&p, Some(&l), now, false).unwrap();
        let g = gate(&s2, &p, Some(&l), now, Step::Finish).unwrap();
        assert!(!g.open);
        assert!(g.risk.starts_with("5 live leaves chain to"), "{}", g.risk);
        let none = ledger(now, &[], 5, 5, 2);
        assert!(gate(&s2, &p, Some(&none), now, Step::Finish).unwrap().open);
        // An untrustworthy ledger is ignored: time only, and said.
        let mut young = none.clone();
        young.trustworthy_at = now + SEC;
        let g = gate(&s2, &p, Some(&young), now, Step::Finish).unwrap();
        assert!(
            !g.open && g.measured.contains("complete only since"),
            "{}",
            g.measured
        );
        assert_eq!(g.at_risk, None, "the risk is unknown, not zero");
    }

    #[test]
    fn steps_out_of_phase_and_bad_imports_are_refused() {
        let p = Policy::default();
        let now = t0();
        let s = genesis(&p, now);
        for st in [Step::Activate, Step::Finish, Step::Rollback] {
            let e = gate(&s, &p, None, now, st).unwrap_err();
            assert!(
                e.to_string().contains("does not apply in phase steady"),
                "{e}"
            );
        }
        let s1 = s.stage_anchor(&p, now, NewAnchor::Generate).unwrap();
        assert!(s1.stage_anchor(&p, now, NewAnchor::Generate).is_err());
        // Import: the issuer, not a root.
        let i = s.active_issuer().unwrap();
        let e = s
            .stage_anchor(&p, now, NewAnchor::Import(Box::new(i.cert.clone()), None))
            .unwrap_err();
        assert!(e.to_string().contains("not self-signed"), "{e}");
        // The same anchor again.
        let a = s.active_anchor().unwrap();
        let e = s
            .stage_anchor(
                &p,
                now,
                NewAnchor::Import(Box::new(a.cert.clone()), a.key.clone()),
            )
            .unwrap_err();
        assert!(e.to_string().contains("already known"), "{e}");
        // A key for another certificate.
        let other = genesis(&p, now);
        let oa = other.active_anchor().unwrap();
        let e = s
            .stage_anchor(
                &p,
                now,
                NewAnchor::Import(
                    Box::new(oa.cert.clone()),
                    Some(SecretKey::generate_p256().unwrap()),
                ),
            )
            .unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        // Upstream B (no key): staged, but activation needs an imported issuer under it.
        let up = s
            .stage_anchor(&p, now, NewAnchor::Import(Box::new(oa.cert.clone()), None))
            .unwrap();
        let later = now + p.leaf_ttl_max + p.propagation_allowance;
        let e = up.activate_anchor(&p, None, later, false).unwrap_err();
        assert!(e.to_string().contains("meshca issuer import"), "{e}");
    }

    #[test]
    fn automation_stages_before_expiry_and_advances_on_open_gates() {
        let p = Policy::default();
        let now = t0();
        let s = genesis(&p, now);
        let off = Automation::default();
        assert_eq!(plan_anchor(&s, &p, &off, None, now).step, None);
        let auto = Automation {
            auto_stage_before: Some(Duration::from_secs(90 * 86400)),
            auto_advance: true,
        };
        let at = s.active_anchor().unwrap().cert.info.not_after - Duration::from_secs(90 * 86400);
        let plan = plan_anchor(&s, &p, &auto, None, at - SEC);
        assert_eq!((plan.step, plan.wake_at), (None, Some(at)));
        assert_eq!(plan_anchor(&s, &p, &auto, None, at).step, Some(Step::Stage));
        let s1 = s.stage_anchor(&p, at, NewAnchor::Generate).unwrap();
        let open = at + p.leaf_ttl_max + p.propagation_allowance;
        let plan = plan_anchor(&s1, &p, &auto, None, open - SEC);
        assert_eq!((plan.step, plan.wake_at), (None, Some(open)));
        assert_eq!(
            plan_anchor(&s1, &p, &auto, None, open).step,
            Some(Step::Activate)
        );
        let only_stage = Automation {
            auto_advance: false,
            ..auto
        };
        assert_eq!(plan_anchor(&s1, &p, &only_stage, None, open).step, None);
    }
}
