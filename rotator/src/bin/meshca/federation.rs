//! `meshca federation reset TD`: forget the sequence held for a federated trust domain, through
//! the running server's admin socket, so that a peer that reset its `spiffe_sequence` (or once
//! published a huge one) is accepted again. Its anchors stay held meanwhile; the change is an
//! audit line and a history entry.

use meshca_proto::v1::ResetFederationRequest;
use meshca_proto::v1::admin_service_client::AdminServiceClient;
use rotator::client::admin_channel;

use crate::admin::AdminArgs;
use crate::{Failed, Output, runtime};

/// `meshca federation …`
#[derive(Debug, clap::Subcommand)]
pub enum FederationCommand {
    /// Forget the sequence held for TRUST_DOMAIN: its endpoint's next bundle is accepted
    /// whatever its sequence (its anchors stay held until then).
    Reset {
        #[command(flatten)]
        admin: AdminArgs,
        /// The federated trust domain, e.g. `b.example`.
        #[arg(value_name = "TRUST_DOMAIN")]
        trust_domain: String,
    },
}

/// Runs a federation command.
pub fn federation(cmd: FederationCommand, output: Output) -> Result<(), Failed> {
    let FederationCommand::Reset {
        admin,
        trust_domain,
    } = cmd;
    let json = runtime()?.block_on(async {
        let mut c = AdminServiceClient::new(
            admin_channel(&admin.socket())
                .await
                .map_err(Failed::unreachable)?,
        );
        c.reset_federation(ResetFederationRequest {
            trust_domain: trust_domain.clone(),
        })
        .await
        .map(|r| r.into_inner().json)
        .map_err(|s| Failed::refused(&s))
    })?;
    let doc: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| Failed::new(format!("the server's answer does not parse: {e}")))?;
    match output {
        Output::Json => println!("{doc}"),
        Output::Text => println!(
            "federation reset: {}'s sequence {} forgotten; the next bundle its endpoint publishes is accepted whatever its sequence",
            doc["trust_domain"].as_str().unwrap_or_default(),
            doc["previous_sequence"]
        ),
    }
    Ok(())
}
