//! `meshca anchors …`: trust-anchor rotation over the admin socket, and `meshca anchors wait`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{AnchorResponse, AnchorStepRequest, GetStatusRequest, StageAnchorRequest};
use serde_json::Value;
use tonic::transport::Channel;

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
    /// activated → steady: the old anchor leaves the bundle (archived on disk).
    Finish(StepArgs),
    /// One phase back: activated → staged, or staged → steady.
    Rollback(StepArgs),
    /// Block until a gate opens (exit 0), with a progress bar; exit 1 on timeout.
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
            .map_err(Failed)?,
    ))
}

fn refused(s: tonic::Status) -> Failed {
    Failed(format!(
        "the server refused: {:?}: {}",
        s.code(),
        s.message()
    ))
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
                "finish" => format!(
                    "finished: anchor {} left the bundle and is archived on disk; bundle v{} holds only the new anchor",
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
                std::fs::read_to_string(p).map_err(|e| Failed(format!("{}: {e}", p.display())))
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

async fn status(c: &mut AdminServiceClient<Channel>) -> Result<Value, Failed> {
    let r = c.get_status(GetStatusRequest {}).await.map_err(refused)?;
    Ok(serde_json::from_str(&r.get_ref().json)?)
}

/// How far a gate is from opening, 0.0 to 1.0: the larger of the measured progress and the
/// elapsed share of the time fallback.
fn progress(doc: &Value, gate: &Value) -> f64 {
    let by_time = (|| {
        let since = time::OffsetDateTime::parse(
            doc["phase"]["since"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let now = time::OffsetDateTime::parse(
            doc["now"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let left = gate["opens_in_seconds"].as_f64()?;
        let done = (now - since).as_seconds_f64();
        Some(done / (done + left.max(0.0)))
    })()
    .unwrap_or(0.0);
    let l = &doc["anchor_rotation"]["ledger"];
    let measured = if l["trustworthy"] == true && gate["step"] == "activate" {
        l["convergence_percent"].as_f64().unwrap_or(0.0) / 100.0
    } else {
        0.0
    };
    by_time.max(measured).clamp(0.0, 1.0)
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
    let tty = std::io::stderr().is_terminal() && output == Output::Text;
    let mut last_line = String::new();
    loop {
        let doc = status(&mut c).await?;
        let phase = doc["anchor_rotation"]["phase"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let gate = doc["anchor_rotation"]["gates"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["step"] == until.step())
            .cloned()
            .ok_or_else(|| {
                Failed(format!(
                    "`{}` does not apply in phase {phase}: {}",
                    until.step(),
                    next_hint(&phase)
                ))
            })?;
        let explain = gate["explain"].as_str().unwrap_or("").to_owned();
        if gate["open"] == true {
            if tty {
                eprintln!();
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
            if tty {
                eprintln!();
            }
            return Err(Failed(format!(
                "timed out after {} waiting for the {} gate: {explain}",
                humantime::format_duration(timeout),
                until.step()
            )));
        }
        let p = progress(&doc, &gate);
        if tty {
            let width = 30;
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "0..=30"
            )]
            let filled = (p * f64::from(width)).round() as usize;
            let opens = gate["opens_in_seconds"]
                .as_u64()
                .map(|s| {
                    format!(
                        " time fallback in {}",
                        humantime::format_duration(Duration::from_secs(s))
                    )
                })
                .unwrap_or_default();
            let measured = gate["measured"].as_str().unwrap_or("");
            eprint!(
                "\r\x1b[2K{} [{}{}] {:>3.0}%  {measured};{opens}",
                until.step(),
                "#".repeat(filled),
                "-".repeat(30 - filled.min(30)),
                p * 100.0
            );
            let _ = std::io::stderr().flush();
        } else if explain != last_line && output == Output::Text {
            eprintln!("waiting: {} gate {explain}", until.step());
            last_line = explain;
        }
        tokio::time::sleep(interval).await;
    }
}
