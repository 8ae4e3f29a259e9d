//! Leader election over a coordination.k8s.io/v1 Lease: the holder rotates, every replica signs.
//!
//! [`decide`] is pure: given the Lease as read, who we are and the time, it says whether to take
//! the Lease, renew it, or wait. [`run`] reads, decides, and writes with the `resourceVersion` it
//! read (a replace, like client-go's leader election; a 409 means another replica moved first and
//! we read again). A replica counts itself leader only until `renewTime + 2/3 × duration` of its
//! own last successful renewal, so it stops acting before anybody else may take over, even if the
//! API server became unreachable. Two leaders at once are still harmless: every state write is
//! conditional on the resourceVersion (see `k8s::store`), so the slower one's write is refused
//! and re-decided.
//!
//! (The `kube-lease-manager` crate does the same with strategic-merge and server-side-apply
//! patches; this uses only get/create/replace, the calls the state Secret already needs.)

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use rotator::clock::Clock;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::is_conflict;

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (absent, released or expired): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it until then.
    Wait {
        /// Its holder.
        holder: String,
        /// When it expires unless renewed.
        until: OffsetDateTime,
    },
}

/// The pure decision.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: OffsetDateTime) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(micro_to_time);
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    match renewed {
        Some(t) if t + time::Duration::seconds(secs) > now => Decision::Wait {
            holder,
            until: t + time::Duration::seconds(secs),
        },
        _ => Decision::Acquire,
    }
}

fn micro_to_time(t: &MicroTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(t.0.as_nanosecond())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn time_to_micro(t: OffsetDateTime) -> MicroTime {
    let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(t.unix_timestamp_nanos())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    MicroTime(ts)
}

/// The next Lease for `decision` (`None` for `Wait`).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    me: &str,
    duration: Duration,
    now: OffsetDateTime,
) -> Option<LeaseSpec> {
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    match decision {
        Decision::Wait { .. } => None,
        Decision::Renew => {
            let mut s = current.cloned().unwrap_or_default();
            s.renew_time = Some(time_to_micro(now));
            s.lease_duration_seconds = Some(secs);
            Some(s)
        }
        Decision::Acquire => Some(LeaseSpec {
            holder_identity: Some(me.to_owned()),
            acquire_time: Some(time_to_micro(now)),
            renew_time: Some(time_to_micro(now)),
            lease_duration_seconds: Some(secs),
            lease_transitions: Some(
                current
                    .and_then(|c| c.lease_transitions)
                    .unwrap_or(0)
                    .saturating_add(i32::from(current.is_some())),
            ),
            ..Default::default()
        }),
    }
}

/// One election round: read, decide, write. `Ok(true)`: we hold the Lease as of `now`.
pub async fn round(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
    now: OffsetDateTime,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let decision = decide(spec, me, now);
    let Some(next) = next_spec(spec, &decision, me, duration, now) else {
        return Ok(false);
    };
    let pp = PostParams {
        field_manager: Some("meshca".into()),
        ..Default::default()
    };
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(
                        [(
                            super::MANAGED_BY.0.to_owned(),
                            super::MANAGED_BY.1.to_owned(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                spec: Some(next),
            };
            api.create(&pp, &lease).await
        }
        Some(mut l) => {
            l.spec = Some(next);
            api.replace(name, &pp, &l).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One replica's campaign for the rotation Lease.
pub struct Campaign {
    /// The Leases API in meshca's namespace.
    pub api: Api<Lease>,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity in it.
    pub me: String,
    /// How long a Lease is held without renewal.
    pub duration: Duration,
    /// Wall time for the Lease's renew times (the injected clock, as everywhere).
    pub clock: Arc<dyn Clock>,
}

/// Campaigns until `shutdown`; `leader` says whether this replica may act as leader now. On
/// shutdown a held Lease is released (holder cleared) so another replica takes over at once.
pub async fn run(
    campaign: Campaign,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Campaign {
        api,
        name,
        me,
        duration,
        clock,
    } = campaign;
    let every = duration / 3;
    let mut held_until: Option<tokio::time::Instant> = None;
    loop {
        let started = tokio::time::Instant::now();
        match round(&api, &name, &me, duration, clock.now()).await {
            Ok(true) => {
                // Act for 2/3 of the lease from when the renewal was sent.
                held_until = Some(started + duration * 2 / 3);
                if !*leader.borrow() {
                    tracing::info!(target: "meshca::lease", lease = %name, identity = %me, "acquired the rotation lease: this replica rotates");
                }
            }
            Ok(false) => held_until = None,
            Err(e) => {
                tracing::warn!(target: "meshca::lease", lease = %name, "lease round failed: {e}");
            }
        }
        let is_leader = held_until.is_some_and(|t| tokio::time::Instant::now() < t);
        if *leader.borrow() && !is_leader {
            tracing::warn!(target: "meshca::lease", lease = %name, identity = %me, "lost the rotation lease: this replica stops rotating");
        }
        leader.send_if_modified(|l| std::mem::replace(l, is_leader) != is_leader);
        // Wake to renew, or exactly when our hold lapses (to step down on time).
        let mut wait = every;
        if let Some(t) = held_until {
            wait = wait.min(t.saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            _ = shutdown.changed() => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Ok(Some(mut l)) = api.get_opt(&name).await
            && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(me.as_str())
        {
            if let Some(s) = l.spec.as_mut() {
                s.holder_identity = None;
            }
            let _ = api.replace(&name, &PostParams::default(), &l).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: OffsetDateTime, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(time_to_micro(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_at_the_boundaries() {
        let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let s = time::Duration::seconds;
        assert_eq!(decide(None, "a", t0), Decision::Acquire);
        assert_eq!(
            decide(Some(&spec("a", t0, 15)), "a", t0 + s(60)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&spec("b", t0, 15)), "a", t0 + s(14)),
            Decision::Wait {
                holder: "b".into(),
                until: t0 + s(15)
            }
        );
        // Expires at exactly renew + duration.
        assert_eq!(
            decide(Some(&spec("b", t0, 15)), "a", t0 + s(15)),
            Decision::Acquire
        );
        // Released (holder cleared).
        assert_eq!(decide(Some(&spec("", t0, 15)), "a", t0), Decision::Acquire);
        // Take-over counts a transition; a renewal keeps the acquire time.
        let cur = spec("b", t0, 15);
        let next = next_spec(
            Some(&cur),
            &Decision::Acquire,
            "a",
            Duration::from_secs(15),
            t0 + s(20),
        )
        .unwrap();
        assert_eq!(next.holder_identity.as_deref(), Some("a"));
        assert_eq!(next.lease_transitions, Some(1));
        assert_eq!(micro_to_time(next.renew_time.as_ref().unwrap()), t0 + s(20));
        let renewed = next_spec(
            Some(&next),
            &Decision::Renew,
            "a",
            Duration::from_secs(15),
            t0 + s(25),
        )
        .unwrap();
        assert_eq!(renewed.acquire_time, next.acquire_time);
        assert_eq!(
            micro_to_time(renewed.renew_time.as_ref().unwrap()),
            t0 + s(25)
        );
        assert!(
            next_spec(
                Some(&cur),
                &decide(Some(&cur), "a", t0),
                "a",
                Duration::from_secs(15),
                t0
            )
            .is_none()
        );
    }
}
