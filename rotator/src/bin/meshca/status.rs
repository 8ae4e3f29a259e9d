//! `meshca status` and `meshca bundle`.

use std::path::PathBuf;

use meshca_proto::v1::GetTrustBundleRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{channel, client_tls, read_pem_certs};
use rotator::pki::pem_cert;
use rotator::policy::Policy;
use rotator::state::AuthorityState;
use rotator::store::FileStore;
use serde_json::json;
use time::OffsetDateTime;

use crate::admin::{AdminArgs, live_status};
use crate::{Failed, Output, grpc_failure, runtime};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Read the state dir even if a server is running (its health is then not shown).
    #[arg(long)]
    pub offline: bool,
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
    /// A federated trust domain's bundle instead of this one's (as last fetched from its bundle
    /// endpoint; `version` is then its `spiffe_sequence`).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
}

/// (version, trust domain, anchors PEM) of `want` among the federated bundles `held` (trust
/// domain, sequence, PEMs), or which ones there are.
fn federated(
    want: &str,
    held: Vec<(String, u64, Vec<String>)>,
) -> Result<(u64, String, Vec<String>), Failed> {
    let names: Vec<String> = held.iter().map(|h| h.0.clone()).collect();
    held.into_iter()
        .find(|h| h.0 == want)
        .map(|(td, seq, pems)| (seq, td, pems))
        .ok_or_else(|| {
            Failed::new(format!(
                "no bundle of trust domain {want} is held (federated: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        })
}

fn load(dir: Option<PathBuf>) -> Result<AuthorityState, Failed> {
    let dir = crate::state_dir(dir);
    FileStore::read_only(&dir).load_sync()?.ok_or_else(|| {
        Failed::new(format!(
            "{}: no authority here (start meshca-server with --state-dir {0})",
            dir.display()
        ))
    })
}

/// The status document: from the running server when one answers (with its ledger and health),
/// else read from the state dir.
pub fn document(a: &StatusArgs, output: Output) -> Result<rotator::status::Status, Failed> {
    let live = if a.offline {
        None
    } else {
        live_status(&a.admin)?
    };
    Ok(match live {
        Some(doc) => doc,
        None => {
            if a.admin.admin_socket.is_some() && !a.offline {
                return Err(Failed::new(format!(
                    "no meshca-server answers on {}",
                    a.admin.socket().display()
                )));
            }
            let s = load(Some(a.admin.dir()))?;
            if output == Output::Text && !a.offline {
                eprintln!(
                    "(no server answers on {}: read from the state dir, with the default policy's rotation times)",
                    a.admin.socket().display()
                );
            }
            rotator::status::document(&s, &Policy::default(), None, OffsetDateTime::now_utc())
        }
    })
}

pub fn status(a: StatusArgs, output: Output) -> Result<(), Failed> {
    let doc = document(&a, output)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Text => print!("{}", rotator::status::render(&doc)),
    }
    Ok(())
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
            match &a.trust_domain {
                Some(td) if *td != b.trust_domain => federated(
                    td,
                    b.federated
                        .iter()
                        .map(|f| {
                            (
                                f.trust_domain.clone(),
                                f.sequence,
                                f.anchors.iter().map(|d| pem_cert(d)).collect(),
                            )
                        })
                        .collect(),
                )?,
                _ => (
                    b.version,
                    b.trust_domain,
                    b.anchors.iter().map(|d| pem_cert(d)).collect(),
                ),
            }
        }
        _ => {
            let s = load(a.state_dir)?;
            match &a.trust_domain {
                Some(td) if td != s.trust_domain.as_str() => federated(
                    td,
                    s.federated
                        .iter()
                        .map(|f| {
                            (
                                f.trust_domain.to_string(),
                                f.sequence,
                                rotator::client::parse_pem_certs(&f.anchors_pem)
                                    .iter()
                                    .map(|d| pem_cert(d))
                                    .collect(),
                            )
                        })
                        .collect(),
                )?,
                _ => (
                    s.bundle_version,
                    s.trust_domain.to_string(),
                    s.bundle().map(|a| a.cert.pem()).collect(),
                ),
            }
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
