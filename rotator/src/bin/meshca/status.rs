//! `meshca status` and `meshca bundle`.

use std::path::PathBuf;

use meshca_proto::v1::GetTrustBundleRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{channel, client_tls, read_pem_certs};
use rotator::clock::rfc3339;
use rotator::pki::pem_cert;
use rotator::state::{AuthorityState, human};
use rotator::store::FileStore;
use serde_json::json;
use time::OffsetDateTime;

use crate::{Failed, Output, default_state_dir, grpc_failure, runtime};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// State directory of the authority [default: $MESHCA_STATE_DIR or ./meshca-data].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// Read the bundle from this state directory ...
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    state_dir: Option<PathBuf>,
    /// ... or ask a running server (https://host:port) ...
    #[arg(long, requires = "ca_bundle")]
    server: Option<String>,
    /// ... verifying it with this PEM bundle.
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
}

fn load(dir: Option<PathBuf>) -> Result<AuthorityState, Failed> {
    let dir = dir.unwrap_or_else(default_state_dir);
    FileStore::read_only(&dir).load_sync()?.ok_or_else(|| {
        Failed(format!(
            "{}: no authority here (start meshca-server with --state-dir {0})",
            dir.display()
        ))
    })
}

pub fn status(a: StatusArgs, output: Output) -> Result<(), Failed> {
    let s = load(a.state_dir)?;
    let now = OffsetDateTime::now_utc();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status_json(&s, now))?),
        Output::Text => print!("{}", status_text(&s, now)),
    }
    Ok(())
}

fn status_json(s: &AuthorityState, now: OffsetDateTime) -> serde_json::Value {
    json!({
        "trust_domain": s.trust_domain.to_string(),
        "generation": s.generation,
        "bundle_version": s.bundle_version,
        "phase": s.phase,
        "anchors": s.anchors.iter().map(|a| json!({
            "id": a.cert.id(), "status": a.status.to_string(), "key_held": a.key.is_some(),
            "serial": a.cert.info.serial, "subject": a.cert.info.subject,
            "not_before": rfc3339(a.cert.info.not_before), "not_after": rfc3339(a.cert.info.not_after),
            "expires_in_seconds": a.cert.info.remaining(now).as_secs(),
        })).collect::<Vec<_>>(),
        "issuers": s.issuers.iter().map(|i| json!({
            "id": i.cert.id(), "status": i.status.to_string(), "anchor": i.anchor,
            "serial": i.cert.info.serial,
            "not_before": rfc3339(i.cert.info.not_before), "not_after": rfc3339(i.cert.info.not_after),
            "expires_in_seconds": i.cert.info.remaining(now).as_secs(),
        })).collect::<Vec<_>>(),
        "problems": s.expiry_problems(now),
    })
}

fn status_text(s: &AuthorityState, now: OffsetDateTime) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "trust domain {}   phase {}   bundle version {}   generation {}",
        s.trust_domain,
        s.phase.name(),
        s.bundle_version,
        s.generation
    );
    let _ = writeln!(
        o,
        "\nANCHORS\n  {:<16}  {:<9}  {:<8}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "KEY", "NOT AFTER"
    );
    for a in &s.anchors {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<8}  {:<20}  {}",
            a.cert.id(),
            a.status,
            if a.key.is_some() { "here" } else { "upstream" },
            rfc3339(a.cert.info.not_after),
            countdown(a.cert.info.not_after, now)
        );
    }
    let _ = writeln!(
        o,
        "\nISSUERS\n  {:<16}  {:<9}  {:<16}  {:<20}  EXPIRES IN",
        "ID", "STATUS", "ANCHOR", "NOT AFTER"
    );
    for i in &s.issuers {
        let _ = writeln!(
            o,
            "  {:<16}  {:<9}  {:<16}  {:<20}  {}",
            i.cert.id(),
            i.status,
            i.anchor,
            rfc3339(i.cert.info.not_after),
            countdown(i.cert.info.not_after, now)
        );
    }
    for p in s.expiry_problems(now) {
        let _ = writeln!(o, "\nPROBLEM: {p}");
    }
    o
}

fn countdown(t: OffsetDateTime, now: OffsetDateTime) -> String {
    if t <= now {
        format!(
            "EXPIRED {} ago",
            human((now - t).try_into().unwrap_or_default())
        )
    } else {
        human((t - now).try_into().unwrap_or_default())
    }
}

pub fn bundle(a: BundleArgs, output: Output) -> Result<(), Failed> {
    let (version, td, pems): (u64, String, Vec<String>) = match (&a.server, &a.ca_bundle) {
        (Some(server), Some(ca)) => {
            let roots = read_pem_certs(&ca.display().to_string())?;
            let tls = client_tls(&roots, None)?;
            let b = runtime()?
                .block_on(async {
                    let ch = channel(server, tls)?;
                    IdentityServiceClient::new(ch)
                        .get_trust_bundle(GetTrustBundleRequest {})
                        .await
                        .map_err(|s| grpc_failure(server, &s))
                })?
                .into_inner();
            (
                b.version,
                b.trust_domain,
                b.anchors.iter().map(|d| pem_cert(d)).collect(),
            )
        }
        _ => {
            let s = load(a.state_dir)?;
            (
                s.bundle_version,
                s.trust_domain.to_string(),
                s.bundle().map(|a| a.cert.pem()).collect(),
            )
        }
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({ "trust_domain": td, "version": version, "anchors_pem": pems })
        ),
        Output::Text => print!("{}", pems.concat()),
    }
    Ok(())
}
