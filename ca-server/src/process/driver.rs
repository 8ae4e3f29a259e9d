//! The rotation driver, of both rotations: issuers (always) and, when automation is opted into,
//! trust anchors. It decides nothing: it asks `rotator::rotation::plan_issuer` (and
//! `rotator::anchors::plan_anchor`) what to do, performs that one step as a committed
//! transition, and sleeps until the plan's next deadline, a state change, or a retry. Failures keep the current issuer signing (nothing is
//! published unless committed), back off exponentially, and after
//! [`UNREADY_AFTER_FAILURES`] in a row turn `/readyz` unready.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rotator::anchors::{Automation, NewAnchor, Step, plan_anchor};
use rotator::clock::rfc3339;
use rotator::rotation::{Attention, IssuerStep, plan_issuer};
use rotator::state::human;
use tokio::sync::watch;

use crate::authority::{Authority, TransitionError};
use crate::process::metrics::Metrics;

/// Consecutive failures after which the server reports itself unready (as SPIRE does).
pub const UNREADY_AFTER_FAILURES: u32 = 10;
/// First retry delay after a failure; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Longest sleep without looking again. The driver wakes at its deadlines; this only bounds how
/// late it can be if the wall clock jumps while it sleeps on the monotonic clock.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How often a standing attention message is logged again.
pub const ATTENTION_EVERY: Duration = Duration::from_secs(3600);

/// What the driver reports to readiness, status and metrics.
#[derive(Debug, Default)]
pub struct RotationHealth {
    failures: AtomicU32,
    last_error: Mutex<Option<String>>,
    attention: Mutex<Option<Attention>>,
}

impl RotationHealth {
    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last failure's message, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What an operator must do, if anything.
    pub fn attention(&self) -> Option<Attention> {
        self.attention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// False after [`UNREADY_AFTER_FAILURES`] consecutive failures.
    pub fn healthy(&self) -> bool {
        self.consecutive_failures() < UNREADY_AFTER_FAILURES
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn failure(&self, e: &TransitionError) -> u32 {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records the current attention; returns true when it changed.
    fn set_attention(&self, a: Option<Attention>) -> bool {
        let mut cur = self.attention.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *cur != a;
        *cur = a;
        changed
    }
}

/// Performs the plan's step for now, if any, as one committed transition.
pub async fn step(authority: &Authority) -> Result<Option<IssuerStep>, TransitionError> {
    let policy = authority.policy().clone();
    let mut taken = None;
    authority
        .transition(|s, now| {
            let Some(step) = plan_issuer(s, &policy, now).step else {
                return Ok(None);
            };
            let next = match &step {
                IssuerStep::Prepare { anchor } => s.prepare_issuer(&policy, now, anchor)?,
                IssuerStep::Activate(id) => s.activate_issuer(now, id)?,
                IssuerStep::Prune => match s.prune_expired_issuers(policy.key_retention, now) {
                    Some(n) => n,
                    None => return Ok(None),
                },
            };
            taken = Some(step);
            Ok(Some(next))
        })
        .await?;
    Ok(taken)
}

/// How often the driver looks at the ledger while an automated anchor rotation waits for a
/// measured gate (measurements change without a state change).
pub const GATE_POLL: Duration = Duration::from_secs(5);

/// The opt-in anchor automation's step for now, if any, as one committed transition. Returns the
/// step taken and when to look again.
pub async fn anchor_step(
    authority: &Authority,
    auto: &Automation,
) -> Result<(Option<Step>, Option<Duration>), TransitionError> {
    if auto.auto_stage_before.is_none() && !auto.auto_advance {
        return Ok((None, None));
    }
    let policy = authority.policy().clone();
    let summary = authority.ledger_summary().await;
    let mut taken = None;
    let mut wake = None;
    authority
        .transition(|s, now| {
            let plan = plan_anchor(s, &policy, auto, Some(&summary), now);
            wake = plan
                .wake_at
                .map(|t| (t - now).try_into().unwrap_or(Duration::ZERO));
            if auto.auto_advance && !matches!(s.phase, rotator::state::Phase::Steady) {
                wake = Some(wake.map_or(GATE_POLL, |w| w.min(GATE_POLL)));
            }
            let Some(step) = plan.step else {
                return Ok(None);
            };
            let l = Some(&summary);
            let next = match step {
                Step::Stage => s.stage_anchor(&policy, now, NewAnchor::Generate)?,
                Step::Activate => s.activate_anchor(&policy, l, now, false)?,
                Step::Finish => s.finish_anchor(&policy, l, now, false)?,
                Step::Rollback => return Ok(None),
            };
            taken = Some(step);
            Ok(Some(next))
        })
        .await?;
    if let Some(st) = taken {
        tracing::info!(target: "meshca::audit", step = st.name(), "anchor rotation step taken by the opt-in automation");
    }
    Ok((taken, wake))
}

/// Runs every step that is due now (at start-up, before serving). At most `limit` steps.
pub async fn catch_up(authority: &Authority, limit: usize) -> Result<usize, TransitionError> {
    let mut n = 0;
    while n < limit && step(authority).await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Runs [`drive`] while `leader` is true (the Lease holder on Kubernetes; always, with a state
/// dir): on becoming leader it first re-reads the committed state, so a rotation another replica
/// left half-done is resumed from its journal, not restarted.
pub async fn drive_while_leader(
    authority: Arc<Authority>,
    health: Arc<RotationHealth>,
    metrics: Arc<Metrics>,
    auto: Automation,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Err(e) = authority.resync().await {
            tracing::warn!(target: "meshca::rotation", "re-reading the state on becoming leader: {e}");
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drive(
            authority.clone(),
            health.clone(),
            metrics.clone(),
            auto.clone(),
            stop_rx,
        ));
        let deposed = tokio::select! {
            r = leader.wait_for(|l| !*l) => r.is_ok(),
            _ = shutdown.wait_for(|s| *s) => false,
        };
        if !deposed {
            // Shutdown, or nobody can depose us any more (the campaigner ended): run until
            // shutdown.
            let _ = shutdown.wait_for(|s| *s).await;
        }
        stop.send_replace(true);
        let _ = task.await;
        if *shutdown.borrow() {
            return;
        }
    }
}

/// The driver loop; returns when `shutdown` flips.
pub async fn drive(
    authority: Arc<Authority>,
    health: Arc<RotationHealth>,
    metrics: Arc<Metrics>,
    auto: Automation,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = authority.subscribe();
    let mut backoff = BACKOFF_START;
    let mut last_attention_log: Option<tokio::time::Instant> = None;
    loop {
        changes.borrow_and_update();
        let wait = match step(&authority).await {
            Ok(Some(_)) => {
                health.success();
                metrics.rotation(true, 0);
                backoff = BACKOFF_START;
                continue;
            }
            Ok(None) => {
                let anchor_wake = match anchor_step(&authority, &auto).await {
                    Ok((Some(_), _)) => continue,
                    Ok((None, w)) => w,
                    Err(e) => {
                        tracing::error!(target: "meshca::rotation", "automated anchor rotation step failed: {e}");
                        Some(BACKOFF_MAX)
                    }
                };
                health.success();
                metrics.rotation_failures.set(0);
                backoff = BACKOFF_START;
                let policy = authority.policy().clone();
                let now = authority.clock().now();
                let plan = authority.read(|s| plan_issuer(s, &policy, now)).await;
                let changed = health.set_attention(plan.attention.clone());
                if let Some(a) = &plan.attention {
                    let due = last_attention_log.is_none_or(|t| t.elapsed() >= ATTENTION_EVERY);
                    if changed || due {
                        let left = a.deadline.map(|d| {
                            format!(
                                " (deadline {}, in {})",
                                rfc3339(d),
                                human((d - now).try_into().unwrap_or_default())
                            )
                        });
                        tracing::warn!(target: "meshca::rotation", "{}{}", a.message, left.unwrap_or_default());
                        last_attention_log = Some(tokio::time::Instant::now());
                    }
                }
                plan.wake_at
                    .map_or(MAX_SLEEP, |t| {
                        (t - now).try_into().unwrap_or(Duration::ZERO)
                    })
                    .min(MAX_SLEEP)
                    .min(anchor_wake.unwrap_or(MAX_SLEEP))
                    // Whole-second certificate times: never spin on a deadline a fraction away.
                    .max(Duration::from_millis(200))
            }
            Err(e) => {
                let n = health.failure(&e);
                metrics.rotation(false, n);
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tracing::error!(target: "meshca::rotation", failures = n, retry_in = ?wait, "issuer rotation step failed, still signing with the current issuer: {e}");
                wait
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
