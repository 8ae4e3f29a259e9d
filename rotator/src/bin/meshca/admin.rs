//! Commands that talk to a running server over its admin socket: `meshca issuer …`, and the
//! live side of `meshca status`.

use std::path::PathBuf;

use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{
    CreateIssuerCsrRequest, GetStatusRequest, ImportIssuerRequest, IssuerResponse,
    RevokeIssuerRequest, RotateIssuerRequest,
};
use rotator::client::admin_channel;
use rotator::store::write_atomic;
use tonic::transport::Channel;

use crate::{Failed, Output, runtime};

/// Where the admin socket is.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// State directory of the server [default: $MESHCA_STATE_DIR or ./meshca-data]; its
    /// admin socket is `<dir>/admin.sock`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The admin socket, when it is not in the state dir.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

impl AdminArgs {
    /// The state dir.
    pub fn dir(&self) -> PathBuf {
        crate::state_dir(self.state_dir.clone())
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.dir().join("admin.sock"))
    }
}

/// `meshca issuer …`
#[derive(Debug, clap::Subcommand)]
pub enum IssuerCommand {
    /// Prepare and activate a new issuer now (signed by the active anchor).
    Rotate {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Upstream mode: write a CSR for the next issuer (its key stays in the server's store).
    Csr {
        #[command(flatten)]
        admin: AdminArgs,
        /// Where to write the CSR (PEM).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Upstream mode: install the issuer certificate signed for the pending CSR.
    Import {
        #[command(flatten)]
        admin: AdminArgs,
        /// The signed issuer certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
    },
    /// A compromised issuer: it signs nothing more (an active one is replaced at once), its
    /// leaves can no longer renew with their own certificate, and every bundle watcher is told
    /// to renew now.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        /// The issuer's id, as `meshca status` shows it.
        #[arg(value_name = "ID")]
        id: String,
        /// Why (audit log, history, status).
        #[arg(long)]
        reason: String,
    },
}

async fn client(a: &AdminArgs) -> Result<AdminServiceClient<Channel>, Failed> {
    Ok(AdminServiceClient::new(
        admin_channel(&a.socket())
            .await
            .map_err(Failed::unreachable)?,
    ))
}

fn refused(s: tonic::Status) -> Failed {
    Failed::refused(&s)
}

fn print_issuer(r: &IssuerResponse, what: &str, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "issuer": r.id, "status": r.status, "not_after": r.not_after, "replaced": r.replaced })
        ),
        Output::Text => {
            println!(
                "{what} issuer {} ({}, until {})",
                r.id, r.status, r.not_after
            );
            if !r.replaced.is_empty() {
                println!(
                    "  replaces {} (retired: its leaves stay valid, the bundle is unchanged)",
                    r.replaced
                );
            }
        }
    }
}

/// Runs an issuer command.
pub fn issuer(cmd: IssuerCommand, output: Output) -> Result<(), Failed> {
    let rt = runtime()?;
    match cmd {
        IssuerCommand::Revoke { admin, id, reason } => {
            let r = rt
                .block_on(async {
                    client(&admin)
                        .await?
                        .revoke_issuer(RevokeIssuerRequest { id, reason })
                        .await
                        .map_err(refused)
                })?
                .into_inner();
            let v: serde_json::Value = serde_json::from_str(&r.json)
                .map_err(|e| Failed::new(format!("the server's answer does not parse: {e}")))?;
            match output {
                Output::Json => println!("{v}"),
                Output::Text => println!(
                    "revoked issuer {}; {} signs now. {} live leaves remain under it{} and cannot renew with \
                     their certificate: every bundle watcher was told to renew now (with a token or ServiceAccount)",
                    v["revoked"].as_str().unwrap_or("-"),
                    v["active"].as_str().unwrap_or("no issuer"),
                    v["live_leaves"],
                    v["last_expires"]
                        .as_str()
                        .map(|t| format!(" (the last expires {t})"))
                        .unwrap_or_default()
                ),
            }
        }
        IssuerCommand::Rotate { admin } => {
            let r = rt.block_on(async {
                client(&admin)
                    .await?
                    .rotate_issuer(RotateIssuerRequest {})
                    .await
                    .map_err(refused)
            })?;
            print_issuer(r.get_ref(), "rotated: new", output);
        }
        IssuerCommand::Csr { admin, out } => {
            let r = rt
                .block_on(async {
                    client(&admin)
                        .await?
                        .create_issuer_csr(CreateIssuerCsrRequest {})
                        .await
                        .map_err(refused)
                })?
                .into_inner();
            write_atomic(&out, r.csr_pem.as_bytes(), 0o644)?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "csr": out, "key_id": r.key_id, "new_key": r.new_key })
                ),
                Output::Text => println!(
                    "wrote {} for {} key {} (the key stays in the server's store)\n\
                     Have your root CA sign it as an issuer: CA:true, pathlen:0, keyUsage keyCertSign, lasting at least\n\
                     the max leaf TTL and no longer than the root. Then: meshca issuer import --cert <signed>.crt",
                    out.display(),
                    if r.new_key { "a new" } else { "the pending" },
                    r.key_id
                ),
            }
        }
        IssuerCommand::Import { admin, cert } => {
            let pem = std::fs::read_to_string(&cert)
                .map_err(|e| Failed::new(format!("{}: {e}", cert.display())))?;
            let r = rt.block_on(async {
                client(&admin)
                    .await?
                    .import_issuer(ImportIssuerRequest { cert_pem: pem })
                    .await
                    .map_err(refused)
            })?;
            print_issuer(r.get_ref(), "imported", output);
        }
    }
    Ok(())
}

/// The live status document, if a server answers on the socket. `Err` only when the server
/// answered with an error; `Ok(None)` when none is running.
pub fn live_status(a: &AdminArgs) -> Result<Option<rotator::status::Status>, Failed> {
    let rt = runtime()?;
    rt.block_on(async {
        let Ok(mut c) = client(a).await else {
            return Ok(None);
        };
        let r = c.get_status(GetStatusRequest {}).await.map_err(refused)?;
        let doc = serde_json::from_str(&r.get_ref().json).map_err(|e| {
            Failed::new(format!("the server's status document does not parse: {e}"))
        })?;
        Ok(Some(doc))
    })
}
