//! `meshca init` (an authority around an existing root) and `meshca token add|list|revoke`.

use std::io::IsTerminal;
use std::path::PathBuf;

use rotator::clock::rfc3339;
use rotator::pki::{CaCert, SecretKey};
use rotator::policy::Policy;
use rotator::spiffe::{IdPattern, TrustDomain};
use rotator::state::{AuthorityState, human};
use rotator::store::{FileStore, Store};
use rotator::tokens::{
    TokenGrant, add_token_granting, list_tokens, new_token, register_token, revoke_token,
    write_bootstrap_token, write_token_file,
};
use time::OffsetDateTime;

use crate::{Failed, Output, default_state_dir, runtime};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The existing root CA certificate (PEM), e.g. from `step certificate create --profile root-ca`.
    #[arg(long, value_name = "FILE")]
    anchor_cert: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1; not encrypted).
    #[arg(long, value_name = "FILE")]
    anchor_key: PathBuf,
    /// State directory to create [default: $MESHCA_STATE_DIR or ./meshca-data].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// How long the bootstrap token is accepted; 0s: until revoked.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    bootstrap_token_ttl: std::time::Duration,
}

/// `meshca token list`.
#[derive(Debug, clap::Args)]
pub struct TokenListArgs {
    /// State directory [default: $MESHCA_STATE_DIR or ./meshca-data].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// `meshca token revoke`.
#[derive(Debug, clap::Args)]
pub struct TokenRevokeArgs {
    /// The token's name, or the first 8+ hex digits of its SHA-256 (`meshca token list`).
    name: String,
    /// State directory [default: $MESHCA_STATE_DIR or ./meshca-data].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct TokenAddArgs {
    /// A name for audit logs.
    #[arg(long)]
    name: String,
    /// A SPIFFE ID or `spiffe://<td>/ns/<ns>/sa/*` the token may request (repeatable).
    #[arg(long = "allow", required = true, value_name = "PATTERN")]
    allow: Vec<IdPattern>,
    /// State directory [default: $MESHCA_STATE_DIR or ./meshca-data].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Write the token to this new file (0600, the token's bytes only, no trailing newline: a
    /// client may send the file unchanged as a header value) instead of printing it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Accept the token for this long only, e.g. 30d [default: until revoked].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    ttl: Option<std::time::Duration>,
    /// A node agent (Istio ambient's ztunnel outside Kubernetes): it may request certificates
    /// for other workloads (`ImpersonatedIdentity`), only those matching `--may-request`.
    #[arg(long, requires = "may_request")]
    node_agent: bool,
    /// A SPIFFE ID or `spiffe://<td>/ns/<ns>/sa/*` a node agent may request for the workloads
    /// it serves (repeatable; needs `--node-agent`).
    #[arg(long = "may-request", value_name = "PATTERN", requires = "node_agent")]
    may_request: Vec<IdPattern>,
}

pub fn init(a: InitArgs, output: Output) -> Result<(), Failed> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| Failed::new(format!("{}: {e}", p.display())))
    };
    let cert = CaCert::from_pem(&read(&a.anchor_cert)?)
        .map_err(|e| Failed::new(format!("{}: {e}", a.anchor_cert.display())))?;
    let key_text = zeroize::Zeroizing::new(read(&a.anchor_key)?);
    let key = SecretKey::from_pem(&key_text)
        .map_err(|e| Failed::new(format!("{}: {e}", a.anchor_key.display())))?;
    let dir = a.state_dir.unwrap_or_else(default_state_dir);
    let store = FileStore::open(&dir)?;
    // Where the files go: the dir, or meshca's own directory in it (another user's dir).
    let dir = store.dir().to_owned();
    let _lock = store.lock()?;
    if store.load_sync()?.is_some() {
        return Err(Failed::new(format!(
            "{} already holds an authority; init only creates new ones",
            dir.display()
        )));
    }
    let now = OffsetDateTime::now_utc();
    let policy = Policy::default();
    let state = AuthorityState::with_anchor(a.trust_domain.clone(), cert, Some(key), &policy, now)
        .map_err(|e| Failed::new(format!("{}: {e}", a.anchor_cert.display())))?;
    runtime()?.block_on(store.commit(None, &state))?;
    store.write_bundle(&state)?;
    let expires = (!a.bootstrap_token_ttl.is_zero()).then(|| now + a.bootstrap_token_ttl);
    let token = write_bootstrap_token(&dir, &a.trust_domain, expires)?;
    let anchor = state
        .active_anchor()
        .ok_or_else(|| Failed::new("internal: no active anchor"))?;
    let issuer = state
        .active_issuer()
        .ok_or_else(|| Failed::new("internal: no issuer"))?;
    let left = anchor.cert.info.remaining(now);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "state_dir": dir, "anchor": anchor.cert.id(), "anchor_not_after": rfc3339(anchor.cert.info.not_after),
                "issuer": issuer.cert.id(), "issuer_not_after": rfc3339(issuer.cert.info.not_after), "bootstrap_token": token,
            })
        ),
        Output::Text => {
            println!(
                "created an authority for {} in {} around anchor {} ({}, expires {}, in {})",
                a.trust_domain,
                dir.display(),
                anchor.cert.id(),
                anchor.cert.info.subject,
                rfc3339(anchor.cert.info.not_after),
                human(left)
            );
            println!(
                "  issuer {} until {}",
                issuer.cert.id(),
                rfc3339(issuer.cert.info.not_after)
            );
            println!("  bootstrap token {}", token.display());
            println!("Start it: meshca-server --state-dir {}", dir.display());
            if left < policy.issuer_ttl {
                println!(
                    "WARNING: the anchor expires in {}, before one issuer lifetime ({}): plan its rotation now",
                    human(left),
                    human(policy.issuer_ttl)
                );
            }
        }
    }
    Ok(())
}

pub fn token_add(a: TokenAddArgs, output: Output) -> Result<(), Failed> {
    let dir = crate::state_dir(a.state_dir);
    if !dir.join("state.json").exists() {
        return Err(Failed::new(format!("{}: no authority here", dir.display())));
    }
    let list = |p: &[IdPattern]| {
        p.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut allowed = list(&a.allow);
    if a.node_agent {
        allowed.push_str(&format!(
            " and, as a node agent, for others: {}",
            list(&a.may_request)
        ));
    }
    let grant = TokenGrant {
        allow: a.allow.clone(),
        may_request: a.may_request.clone(),
        expires: a.ttl.map(|t| OffsetDateTime::now_utc() + t),
    };
    if let Some(e) = grant.expires {
        allowed.push_str(&format!(" until {}", rfc3339(e)));
    }
    let Some(out) = &a.out else {
        let token = zeroize::Zeroizing::new(add_token_granting(&dir, &a.name, grant)?);
        match output {
            Output::Json => println!(
                "{}",
                serde_json::json!({ "name": a.name, "token": token.as_str() })
            ),
            Output::Text => {
                // On a terminal, a line; redirected (`> file`), the token's bytes alone, so that
                // the file can be sent unchanged as a header value.
                if std::io::stdout().is_terminal() {
                    println!("{}", token.as_str());
                } else {
                    print!("{}", token.as_str());
                }
                eprintln!(
                    "token {:?} may request {allowed}; only its hash is stored, so this is the only time it is shown. \
                     A running server picks it up within 2 s.",
                    a.name,
                );
            }
        }
        return Ok(());
    };
    // The file first, then the registration: a token is never registered without its only copy.
    if out.exists() {
        return Err(Failed::new(format!(
            "{}: already exists; meshca does not overwrite a token file (remove it first, or pick another path)",
            out.display()
        )));
    }
    let token = zeroize::Zeroizing::new(
        new_token().map_err(|_| Failed::new("random number generator failed"))?,
    );
    write_token_file(out, &token).map_err(|e| Failed::new(format!("{}: {e}", out.display())))?;
    if let Err(e) = register_token(&dir, &a.name, grant, &token) {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "name": a.name, "file": out.display().to_string() })
        ),
        Output::Text => eprintln!(
            "token {:?} may request {allowed}; written to {} (0600, no trailing newline); only its hash is stored. \
             A running server picks it up within 2 s.",
            a.name,
            out.display()
        ),
    }
    Ok(())
}

pub fn token_list(a: TokenListArgs, output: Output) -> Result<(), Failed> {
    let dir = crate::state_dir(a.state_dir);
    let tokens = list_tokens(&dir)?;
    let now = OffsetDateTime::now_utc();
    match output {
        Output::Json => {
            let rows: Vec<_> = tokens
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name, "sha256": t.sha256,
                        "allow": t.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "node_agent_may_request": t.may_request.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "expires": t.expires.map(rfc3339), "expired": t.expired(now),
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "tokens": rows }));
        }
        Output::Text => {
            if tokens.is_empty() {
                println!("no tokens in {}", dir.display());
            }
            for t in &tokens {
                let expiry = match t.expires {
                    None => "never expires".to_owned(),
                    Some(e) if t.expired(now) => format!("EXPIRED {}", rfc3339(e)),
                    Some(e) => format!("expires {}", rfc3339(e)),
                };
                let agent = if t.may_request.is_empty() {
                    String::new()
                } else {
                    format!(
                        "  node agent for: {}",
                        t.may_request
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                println!(
                    "{:<16} {}  {expiry}  {}{agent}",
                    t.name,
                    &t.sha256[..t.sha256.len().min(12)],
                    t.allow
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    Ok(())
}

pub fn token_revoke(a: TokenRevokeArgs, output: Output) -> Result<(), Failed> {
    let dir = crate::state_dir(a.state_dir);
    if !dir.join("state.json").exists() {
        return Err(Failed::new(format!("{}: no authority here", dir.display())));
    }
    let n = revoke_token(&dir, &a.name)?;
    match output {
        Output::Json => println!("{}", serde_json::json!({ "revoked": a.name, "count": n })),
        Output::Text => eprintln!(
            "revoked {n} token(s) {:?}; a running server refuses it within 2 s",
            a.name
        ),
    }
    Ok(())
}
