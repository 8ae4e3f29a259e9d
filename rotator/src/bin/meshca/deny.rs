//! `meshca deny add|remove|list`: refuse a compromised workload's identity on every face, through
//! the running server's admin socket (the denial lives in the authority state: it survives
//! restarts and, on Kubernetes, reaches every replica through the Secret).

use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{AllowIdentityRequest, DenyIdentityRequest, ListDeniedRequest};
use rotator::client::admin_channel;
use serde_json::Value;

use crate::admin::AdminArgs;
use crate::{Failed, Output, runtime};

/// `meshca deny …`
#[derive(Debug, clap::Subcommand)]
pub enum DenyCommand {
    /// Refuse SPIFFE_ID (or `spiffe://<td>/ns/<ns>/sa/*`) on every face, whatever credential it
    /// presents — token, ServiceAccount or its own still-valid certificate. With `--node NAME`
    /// instead: a compromised node, whose node agents (ztunnel) may act for nobody.
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        /// The identity or pattern.
        #[arg(
            value_name = "SPIFFE_ID",
            required_unless_present = "node",
            conflicts_with = "node"
        )]
        pattern: Option<String>,
        /// A node to deny instead of an identity.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Why: said in every refusal and the audit log.
        #[arg(long)]
        reason: String,
        /// Lift it by itself at this time (RFC 3339), or after this long (e.g. `7d`).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
    },
    /// Lift the denial of exactly this identity or pattern (or of `--node NAME`).
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        /// The identity or pattern, as it was added.
        #[arg(
            value_name = "SPIFFE_ID",
            required_unless_present = "node",
            conflicts_with = "node"
        )]
        pattern: Option<String>,
        /// A node denial to lift instead.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// The denials in force (one whose `--until` has passed is not listed), each with the live
    /// leaves it matches and when they expire; the revoked issuers with theirs.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The serials of denied identities' and revoked issuers' leaves that have not expired, for
    /// data planes that can refuse peers by serial. With leaves of hours, refusing renewal is the
    /// remedy; this only closes the window until the last one expires.
    Export {
        #[command(flatten)]
        admin: AdminArgs,
        /// `pem-serials`: one lowercase hex serial per line, each after a `#` comment naming its
        /// identity and expiry; `json`: `{"serials": [{serial, spiffe_id, not_after, reason}]}`.
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
    },
}

/// `meshca deny export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One serial per line, with `#` comments.
    PemSerials,
    /// A JSON document.
    Json,
}

/// `--until`: RFC 3339, or a duration from now.
fn until_unix(text: &str) -> Result<i64, Failed> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(t.unix_timestamp());
    }
    let d = humantime::parse_duration(text).map_err(|e| {
        Failed::new(format!(
            "--until {text}: neither an RFC 3339 time nor a duration ({e})"
        ))
    })?;
    Ok((time::OffsetDateTime::now_utc() + d).unix_timestamp())
}

/// Runs a deny command.
pub fn deny(cmd: DenyCommand, output: Output) -> Result<(), Failed> {
    let admin = match &cmd {
        DenyCommand::Add { admin, .. }
        | DenyCommand::Remove { admin, .. }
        | DenyCommand::List { admin }
        | DenyCommand::Export { admin, .. } => admin.clone(),
    };
    let doc = runtime()?.block_on(async {
        let mut c = AdminServiceClient::new(
            admin_channel(&admin.socket())
                .await
                .map_err(Failed::unreachable)?,
        );
        let refused = |s: tonic::Status| Failed::refused(&s);
        let r = match &cmd {
            DenyCommand::Add {
                pattern,
                node,
                reason,
                until,
                ..
            } => {
                let until_unix = until.as_deref().map(until_unix).transpose()?.unwrap_or(0);
                c.deny_identity(DenyIdentityRequest {
                    pattern: pattern.clone().unwrap_or_default(),
                    reason: reason.clone(),
                    until_unix,
                    node: node.clone().unwrap_or_default(),
                })
                .await
            }
            DenyCommand::Remove { pattern, node, .. } => {
                c.allow_identity(AllowIdentityRequest {
                    pattern: pattern.clone().unwrap_or_default(),
                    node: node.clone().unwrap_or_default(),
                })
                .await
            }
            DenyCommand::List { .. } | DenyCommand::Export { .. } => {
                c.list_denied(ListDeniedRequest {}).await
            }
        }
        .map_err(refused)?;
        serde_json::from_str::<Value>(&r.into_inner().json)
            .map_err(|e| Failed::new(format!("the server's answer does not parse: {e}")))
    })?;
    if let DenyCommand::Export { format, .. } = cmd {
        export(&doc, format);
        return Ok(());
    }
    match output {
        Output::Json => println!("{doc}"),
        Output::Text => print_text(&doc),
    }
    Ok(())
}

/// Every live leaf of every denial in force and of every revoked issuer, once each.
fn export(doc: &Value, format: ExportFormat) {
    let mut rows = std::collections::BTreeMap::new();
    let denied = doc["denied"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["active"].as_bool() == Some(true))
        .map(|d| {
            (
                d,
                format!("denied: {}", d["reason"].as_str().unwrap_or_default()),
            )
        });
    let revoked = doc["revoked_issuers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r,
                format!(
                    "issuer {} revoked: {}",
                    r["issuer"].as_str().unwrap_or_default(),
                    r["reason"].as_str().unwrap_or_default()
                ),
            )
        });
    for (entry, why) in denied.chain(revoked) {
        for l in entry["live_leaves"].as_array().into_iter().flatten() {
            let serial = l["serial"].as_str().unwrap_or_default().to_owned();
            rows.entry(serial).or_insert_with(|| {
                (
                    l["spiffe_id"].as_str().unwrap_or_default().to_owned(),
                    l["not_after"].as_str().unwrap_or_default().to_owned(),
                    why.clone(),
                )
            });
        }
    }
    match format {
        ExportFormat::Json => println!(
            "{}",
            serde_json::json!({ "serials": rows.iter().map(|(s, (id, na, why))| serde_json::json!({
                "serial": s, "spiffe_id": id, "not_after": na, "reason": why,
            })).collect::<Vec<_>>() })
        ),
        ExportFormat::PemSerials => {
            for (s, (id, na, _)) in &rows {
                println!("# {id} until {na}\n{s}");
            }
        }
    }
}

/// `[(expired) ]since <added> by <by>[, until <until>]: <reason>` of one denial row.
fn since_line(d: &Value) -> String {
    let s = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
    format!(
        "{}since {} by {}{}: {}",
        if d["active"].as_bool() == Some(true) {
            ""
        } else {
            "(expired) "
        },
        s("added"),
        s("by"),
        d["until"]
            .as_str()
            .map(|u| format!(", until {u}"))
            .unwrap_or_default(),
        s("reason"),
    )
}

/// What `deny add` or `remove` changed (`{"changed": …}` from the server), for people.
fn print_changed(c: &Value) {
    let name = c["pattern"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| c["node"].as_str().map(|n| format!("node {n}")))
        .unwrap_or_default();
    match c["action"].as_str() {
        Some("lifted") => println!(
            "lifted the denial of {name} ({})",
            since_line(&c["previous"])
        ),
        action => {
            let d = &c["denial"];
            println!("denied {name}  {}", since_line(d));
            if let Some(live) = d["live_leaves"].as_array() {
                println!("  live leaves: {}", live.len());
            }
            if action == Some("replaced") {
                println!(
                    "  replaced the earlier denial: {}",
                    since_line(&c["previous"])
                );
            }
        }
    }
}

fn print_text(doc: &Value) {
    if doc.get("changed").is_some() {
        print_changed(&doc["changed"]);
        return;
    }
    let rows = doc["denied"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no identity is denied");
    }
    for d in doc["denied_nodes"].as_array().into_iter().flatten() {
        println!(
            "node {}  {} (its node agents act for nobody)",
            d["node"].as_str().unwrap_or("-"),
            since_line(d)
        );
    }
    for d in rows {
        println!(
            "{}  {}",
            d["pattern"].as_str().unwrap_or("-"),
            since_line(&d)
        );
        let live = d["live_leaves"].as_array().cloned().unwrap_or_default();
        println!("  live leaves: {}", live.len());
        for l in live {
            println!(
                "    {}  serial {}  expires {}",
                l["spiffe_id"].as_str().unwrap_or("-"),
                l["serial"].as_str().unwrap_or("-"),
                l["not_after"].as_str().unwrap_or("-")
            );
        }
    }
    for r in doc["revoked_issuers"].as_array().into_iter().flatten() {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let live = r["live_leaves"].as_array().map_or(0, Vec::len);
        println!(
            "issuer {}  revoked {} by {}: {}\n  live leaves: {live}",
            s("issuer"),
            s("at"),
            s("by"),
            s("reason")
        );
    }
}
