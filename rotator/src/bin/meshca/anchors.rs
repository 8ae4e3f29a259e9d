//! `meshca anchors …`: trust-anchor rotation over the admin socket, and `meshca anchors wait`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{AnchorResponse, AnchorStepRequest, GetStatusRequest, StageAnchorRequest};
use rotator::anchors::Step;
use rotator::clock::rfc3339;
use rotator::state::Phase;
use rotator::status::{GateEntry, Status};
use tonic::transport::Channel;

/// The progress bar's resolution.
const BAR_STEPS: u64 = 1000;

use crate::admin::AdminArgs;
use crate::{Failed, Output, runtime};

/// `meshca anchors …`
#[derive(Debug, clap::Subcommand)]
pub enum AnchorsCommand {
    /// steady → staged: put a new anchor in the bundle beside the current one.
    Stage {
        #[command(flatten)]
        admin: AdminArgs,
        /// Use this anchor certificate (PEM) instead of generating one.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Its private key (PEM). Omit with --cert in upstream mode (issuers are then imported).
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
    },
    /// staged → activated: the new anchor's issuer signs from now on.
    Activate(StepArgs),
    /// activated → steady: the old anchor leaves the bundle (archived; its key destroyed after
    /// policy.key_retention).
    Finish(StepArgs),
    /// One phase back: activated → staged, or staged → steady.
    Rollback(StepArgs),
    /// The anchor key is compromised: stage a new anchor and activate it at once, skipping the
    /// convergence gate (the risk is printed), and revoke the old anchor's issuers. The old
    /// anchor stays trusted until you run `finish` (with --force while its leaves live).
    Emergency {
        #[command(flatten)]
        admin: AdminArgs,
        /// Why (audit log, history, the revoked issuers' reason).
        #[arg(long)]
        reason: String,
    },
    /// While staged on Kubernetes with Linkerd: the workloads whose pods started before the new
    /// anchors reached Linkerd's trust roots (their proxies hold only the old anchor until
    /// replaced), with the `kubectl rollout restart` commands. Exit 0 when none is left.
    Restarts {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Block until a gate opens (exit 0), with a progress bar; exit 1 on timeout, 2 when the
    /// gate does not apply in the current phase (waiting would never end).
    Wait {
        #[command(flatten)]
        admin: AdminArgs,
        /// The gate to wait for.
        #[arg(long, value_enum)]
        until: Until,
        /// Give up after this long (e.g. `30m`, `2d`).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "72h")]
        timeout: Duration,
        /// How often to ask the server.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        interval: Duration,
    },
}

/// Arguments of a gated step.
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Take the step even though its gate is closed. Prints what that risks.
    #[arg(long)]
    force: bool,
}

/// Which gate `wait` waits for (named as typed: `activate-ready`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(
    clippy::enum_variant_names,
    reason = "the CLI values are activate-ready, finish-ready, rollback-ready"
)]
pub enum Until {
    /// `activate` may be taken.
    ActivateReady,
    /// `finish` may be taken.
    FinishReady,
    /// `rollback` may be taken.
    RollbackReady,
}

impl Until {
    fn step(self) -> &'static str {
        match self {
            Self::ActivateReady => "activate",
            Self::FinishReady => "finish",
            Self::RollbackReady => "rollback",
        }
    }
}

async fn client(a: &AdminArgs) -> Result<AdminServiceClient<Channel>, Failed> {
    Ok(AdminServiceClient::new(
        rotator::client::admin_channel(&a.socket())
            .await
            .map_err(Failed::unreachable)?,
    ))
}

fn refused(s: tonic::Status) -> Failed {
    Failed::refused(&s)
}

fn next_hint(phase: &str) -> &'static str {
    match phase {
        "staged" => {
            "next: `meshca anchors wait --until activate-ready`, then `meshca anchors activate` (or `rollback`)"
        }
        "activated" => {
            "next: `meshca anchors wait --until finish-ready`, then `meshca anchors finish` (or `rollback`)"
        }
        _ => "the rotation is complete: one anchor in the bundle",
    }
}

fn print_step(what: &str, r: &AnchorResponse, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "step": what, "phase": r.phase, "bundle_version": r.bundle_version,
                "anchor": r.anchor, "issuer": r.issuer, "gate": r.gate,
                "forced": !r.risk.is_empty(), "risk": r.risk,
            })
        ),
        Output::Text => {
            println!("gate: {}", r.gate);
            if !r.risk.is_empty() {
                println!("FORCED past a closed gate. Risk: {}", r.risk);
                eprintln!("meshca: warning: forced past a closed gate: {}", r.risk);
            }
            let line = match what {
                "stage" => format!(
                    "staged: anchor {} is in the bundle beside the current one (bundle v{}); the current anchor still signs",
                    r.anchor, r.bundle_version
                ),
                "activate" => format!(
                    "activated: anchor {} signs from now on (issuer {}); the old anchor stays in the bundle (v{})",
                    r.anchor, r.issuer, r.bundle_version
                ),
                "emergency" => format!(
                    "EMERGENCY: anchor {} signs from now on (issuer {}); the old anchor's issuers are revoked and every \
                     bundle watcher was told to renew; the old anchor stays in the bundle (v{}) until `meshca anchors finish`",
                    r.anchor, r.issuer, r.bundle_version
                ),
                "finish" => format!(
                    "finished: anchor {} left the bundle and is archived (its key is destroyed after policy.key_retention); bundle v{} holds only the new anchor",
                    r.anchor, r.bundle_version
                ),
                _ => format!(
                    "rolled back to {}: issuer {} signs; bundle v{}",
                    r.phase, r.issuer, r.bundle_version
                ),
            };
            println!("{line}");
            println!("{}", next_hint(&r.phase));
        }
    }
}

/// Runs an anchors command.
pub fn anchors(cmd: AnchorsCommand, output: Output) -> Result<(), Failed> {
    let rt = runtime()?;
    match cmd {
        AnchorsCommand::Stage { admin, cert, key } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| Failed::new(format!("{}: {e}", p.display())))
            };
            let req = StageAnchorRequest {
                cert_pem: cert.as_ref().map(read).transpose()?.unwrap_or_default(),
                key_pem: key.as_ref().map(read).transpose()?.unwrap_or_default(),
            };
            let r = rt.block_on(async {
                client(&admin)
                    .await?
                    .stage_anchor(req)
                    .await
                    .map_err(refused)
            })?;
            print_step("stage", r.get_ref(), output);
        }
        AnchorsCommand::Activate(a) => step(&rt, "activate", &a, output)?,
        AnchorsCommand::Finish(a) => step(&rt, "finish", &a, output)?,
        AnchorsCommand::Rollback(a) => step(&rt, "rollback", &a, output)?,
        AnchorsCommand::Wait {
            admin,
            until,
            timeout,
            interval,
        } => rt.block_on(wait(&admin, until, timeout, interval, output))?,
        AnchorsCommand::Emergency { admin, reason } => {
            let r = rt.block_on(async {
                client(&admin)
                    .await?
                    .emergency_anchor(meshca_proto::v1::EmergencyAnchorRequest { reason })
                    .await
                    .map_err(refused)
            })?;
            print_step("emergency", r.get_ref(), output);
        }
        AnchorsCommand::Restarts { admin } => {
            let doc = rt.block_on(async { status(&mut client(&admin).await?).await })?;
            restarts(&doc, output)?;
        }
    }
    Ok(())
}

/// `meshca anchors restarts` as text: the count, then one line per workload with its command.
fn print_restarts(
    proxies: u64,
    stale: u64,
    since: Option<time::OffsetDateTime>,
    workloads: &[rotator::ledger::StaleWorkload],
) {
    match since {
        Some(t) => println!(
            "{} of {proxies} Linkerd proxies started after the new anchors reached their trust roots ({}).",
            proxies - stale.min(proxies),
            rfc3339(t)
        ),
        None => println!(
            "the new anchors have not reached Linkerd's trust roots yet: all {proxies} proxies hold only the old anchor"
        ),
    }
    for w in workloads {
        let budget = match (&w.pdb, w.disruptions_allowed) {
            (Some(p), Some(0)) => format!("  (PDB {p} allows no disruption now: last)"),
            (Some(p), Some(n)) => format!("  (PDB {p}: {n} may go now)"),
            _ => String::new(),
        };
        println!(
            "{:<12} {:<40} {:>4} stale pods   {}{budget}",
            w.namespace,
            w.owner,
            w.stale_pods,
            rollout(&w.namespace, &w.owner)
        );
    }
    if workloads.is_empty() {
        println!("nothing to restart: the activate gate does not wait for Linkerd");
    } else {
        println!("one at a time, in this order; `kubectl rollout status` between");
    }
}

/// The restart command for a workload (`Kind/name`); for a bare pod, deleting it.
fn rollout(namespace: &str, owner: &str) -> String {
    match owner.split_once('/') {
        Some((kind @ ("Deployment" | "StatefulSet" | "DaemonSet"), name)) => format!(
            "kubectl -n {namespace} rollout restart {}/{name}",
            kind.to_ascii_lowercase()
        ),
        Some(("Pod", name)) => format!("kubectl -n {namespace} delete pod {name}"),
        _ => format!("# {owner} in {namespace}: replace its pods with its own controller"),
    }
}

fn restarts(doc: &Status, output: Output) -> Result<(), Failed> {
    use rotator::ledger::RestartBound;
    let rb = doc
        .anchor_rotation
        .ledger
        .as_ref()
        .map(|l| l.restart_bound.clone())
        .unwrap_or_default();
    let RestartBound::Counted {
        proxies,
        stale,
        since,
        mut workloads,
        ..
    } = rb
    else {
        let why = match rb {
            RestartBound::Unknown { reason } => reason,
            _ => format!(
                "nothing to count in phase {}: Linkerd proxies are counted while an anchor is staged, on Kubernetes with \
                 [kubernetes.bundle] linkerd = true",
                doc.anchor_rotation.phase
            ),
        };
        return Err(Failed::new(format!("no restart list: {why}")));
    };
    // Linkerd's control plane first (its default namespace; its proxies verify everyone), then
    // workloads whose PodDisruptionBudget lets a pod go now (or that have none), then those
    // whose budget allows no disruption at the moment; by namespace and name within each.
    // Each command is a rolling restart paced by the workload's own strategy: run them one at
    // a time, `kubectl rollout status` between.
    workloads.sort_by_key(|w| {
        (
            w.namespace != "linkerd",
            w.disruptions_allowed == Some(0),
            w.namespace.clone(),
            w.owner.clone(),
        )
    });
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "proxies": proxies, "stale": stale,
                "since": since.map(rfc3339),
                "workloads": workloads.iter().map(|w| serde_json::json!({
                    "namespace": w.namespace, "owner": w.owner, "stale_pods": w.stale_pods,
                    "pdb": w.pdb, "disruptions_allowed": w.disruptions_allowed,
                    "command": rollout(&w.namespace, &w.owner),
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Text => print_restarts(proxies, stale, since, &workloads),
    }
    if stale > 0 {
        return Err(Failed::new(format!(
            "{stale} Linkerd proxies still hold only the old anchor"
        ))
        .code("stale_proxies")
        .said());
    }
    Ok(())
}

fn step(
    rt: &tokio::runtime::Runtime,
    what: &'static str,
    a: &StepArgs,
    output: Output,
) -> Result<(), Failed> {
    let req = AnchorStepRequest { force: a.force };
    let r = rt.block_on(async {
        let mut c = client(&a.admin).await?;
        match what {
            "activate" => c.activate_anchor(req).await,
            "finish" => c.finish_anchor(req).await,
            _ => c.rollback_anchor(req).await,
        }
        .map_err(refused)
    })?;
    print_step(what, r.get_ref(), output);
    Ok(())
}

async fn status(c: &mut AdminServiceClient<Channel>) -> Result<Status, Failed> {
    let r = c.get_status(GetStatusRequest {}).await.map_err(refused)?;
    serde_json::from_str(&r.get_ref().json)
        .map_err(|e| Failed::new(format!("the server's status document does not parse: {e}")))
}

/// How far a gate is from opening, 0.0 to 1.0: the larger of the measured progress and the
/// elapsed share of the time fallback.
fn progress(doc: &Status, gate: &GateEntry) -> f64 {
    let by_time = match (&doc.phase, gate.opens_in_seconds) {
        (Phase::Staged { since, .. } | Phase::Activated { since, .. }, Some(left)) => {
            let done = (doc.now - *since).as_seconds_f64();
            #[allow(clippy::cast_precision_loss, reason = "a fraction")]
            let left = left.max(0) as f64;
            done / (done + left)
        }
        _ => 0.0,
    };
    let measured = match &doc.anchor_rotation.ledger {
        Some(l) if l.trustworthy && gate.gate.step == Step::Activate => {
            l.convergence_percent / 100.0
        }
        _ => 0.0,
    };
    let p = by_time.max(measured);
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

async fn wait(
    admin: &AdminArgs,
    until: Until,
    timeout: Duration,
    interval: Duration,
    output: Output,
) -> Result<(), Failed> {
    let mut c = client(admin).await?;
    let start = Instant::now();
    // A bar on a terminal (indicatif draws nothing when stderr is not one); otherwise one line
    // each time the gate's explanation changes.
    let bar = (std::io::stderr().is_terminal() && output == Output::Text).then(|| {
        let bar = ProgressBar::new(BAR_STEPS);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}%  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-"),
        );
        bar.set_prefix(until.step());
        bar
    });
    let mut last_line = String::new();
    loop {
        let doc = status(&mut c).await?;
        let phase = doc.anchor_rotation.phase.clone();
        let gate = doc
            .anchor_rotation
            .gates
            .iter()
            .find(|g| g.gate.step.name() == until.step())
            .ok_or_else(|| {
                Failed::new(format!(
                    "`{}` does not apply in phase {phase}: {}",
                    until.step(),
                    next_hint(&phase)
                ))
                .code("wrong_phase")
                .exit(2)
            })?;
        let explain = gate.explain.clone();
        if gate.gate.open {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "gate": until.step(), "open": true, "explain": explain, "waited_seconds": start.elapsed().as_secs() })
                ),
                Output::Text => println!("{} gate {explain}", until.step()),
            }
            return Ok(());
        }
        if start.elapsed() >= timeout {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(Failed::new(format!(
                "timed out after {} waiting for the {} gate: {explain}",
                rotator::policy::written(timeout),
                until.step()
            ))
            .code("timeout"));
        }
        if let Some(b) = &bar {
            let opens = gate
                .opens_in_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| {
                    format!(
                        " time fallback in {}",
                        rotator::state::human(Duration::from_secs(s))
                    )
                })
                .unwrap_or_default();
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "0..=BAR_STEPS"
            )]
            b.set_position((progress(&doc, gate) * BAR_STEPS as f64).round() as u64);
            b.set_message(format!("{};{opens}", gate.gate.measured));
        } else if explain != last_line && output == Output::Text {
            eprintln!("waiting: {} gate {explain}", until.step());
            last_line = explain;
        }
        tokio::time::sleep(interval).await;
    }
}
