//! SPIFFE federation, the serving half: meshca's trust bundle at a SPIFFE bundle endpoint over
//! HTTPS (`[federation]`, `--bundle-listen`), for another trust domain's SPIRE or meshca to fetch.
//! The document is the one `/spiffe-bundle.json` serves on the HTTP port (a JWK Set: one
//! `x509-svid` key per anchor, `spiffe_sequence` = the bundle version, `spiffe_refresh_hint`),
//! served at `/` and `/spiffe-bundle.json`, in one of the two profiles of the SPIFFE Trust Domain
//! and Bundle specification:
//!
//! - `https_spiffe` (the default): the endpoint presents an X.509-SVID for
//!   `spiffe://<trust-domain>/meshca/server`, issued by meshca's own issuer and renewed as the
//!   gRPC port's certificate is (at 2/3 of its life, and at once when the issuer changes). A peer
//!   authenticates it with the bundle it already trusts and checks that SPIFFE ID.
//! - `https_web`: the operator's certificate and key (a public web PKI name), read at start-up.
//!
//! Consuming other trust domains' bundles is [`fetch`]'s.

pub mod document;
pub mod fetch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use rotator::spiffe::{SpiffeId, TrustDomain};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::authority::Authority;
use crate::issuing::issuance::SigningCore;
use crate::process::tls::LiveTls;

pub use crate::process::config::federation::{
    EndpointProfile, FederationConfig, Peer, SYSTEM_ROOTS,
};

/// The files `[federation]` names, read and checked as they will be used (see
/// `Config::check_files`); or (setting under `federation.`, its value, why).
pub fn check_files(cfg: &FederationConfig) -> Result<(), (String, String, String)> {
    if let (EndpointProfile::HttpsWeb, Some(cert), Some(key)) = (
        cfg.bundle_endpoint_profile,
        &cfg.bundle_endpoint_cert,
        &cfg.bundle_endpoint_key,
    ) {
        web_config(cert, key)?;
    }
    for p in &cfg.trust_domains {
        let td = p.trust_domain.to_string();
        if let Some(path) = &p.bootstrap_bundle {
            fetch::bootstrap(path, &p.trust_domain)
                .map_err(|reason| ("trust_domains".to_owned(), td.clone(), reason))?;
        }
        if let Some(path) = &p.web_ca_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                (
                    "trust_domains".to_owned(),
                    td.clone(),
                    format!("web_ca_file {}: {e}", path.display()),
                )
            })?;
            if rotator::client::parse_pem_certs(&text).is_empty() {
                return Err((
                    "trust_domains".into(),
                    td,
                    format!("web_ca_file {}: no CERTIFICATE in it", path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// The bundle endpoint's SPIFFE ID in the `https_spiffe` profile.
pub fn endpoint_id(td: &TrustDomain) -> Result<SpiffeId, String> {
    format!("spiffe://{td}/meshca/server")
        .parse()
        .map_err(|e: rotator::spiffe::IdError| e.to_string())
}

/// The bundle endpoint's TLS: its rustls config, and the live SVID to keep renewed
/// (`https_spiffe`).
pub struct EndpointTls {
    /// What the listener serves with.
    pub config: Arc<ServerConfig>,
    /// `https_spiffe`: the SVID, to be kept renewed (`LiveTls::maintain`).
    pub live: Option<Arc<LiveTls>>,
}

/// The TLS the configured profile calls for, or why it cannot be had (a file unreadable, not
/// PEM, a key that does not match the certificate).
pub fn endpoint_tls(cfg: &FederationConfig, authority: &Authority) -> Result<EndpointTls, String> {
    match (
        cfg.bundle_endpoint_profile,
        &cfg.bundle_endpoint_cert,
        &cfg.bundle_endpoint_key,
    ) {
        (EndpointProfile::HttpsWeb, Some(cert), Some(key)) => Ok(EndpointTls {
            config: web_config(cert, key)
                .map_err(|(name, file, why)| format!("federation.{name} {file}: {why}"))?,
            live: None,
        }),
        (EndpointProfile::HttpsWeb, _, _) => Err("https_web needs a certificate and a key".into()),
        (EndpointProfile::HttpsSpiffe, _, _) => {
            let td = &authority.snapshot().bundle.trust_domain;
            let live = LiveTls::svid(authority, endpoint_id(td)?)?;
            Ok(EndpointTls {
                config: live.endpoint_config()?,
                live: Some(live),
            })
        }
    }
}

/// The `https_web` endpoint's TLS from its files; or (setting, file, why).
fn web_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, (String, String, String)> {
    let bad = |name: &str, path: &Path, reason: String| {
        (name.to_owned(), path.display().to_string(), reason)
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| bad("bundle_endpoint_cert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(
            "bundle_endpoint_cert",
            cert,
            "no CERTIFICATE in it".into(),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad("bundle_endpoint_key", key, e.to_string()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("bundle_endpoint_cert", cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                bad(
                    "bundle_endpoint_key",
                    key,
                    format!(
                        "does not go with bundle_endpoint_cert {}: {e}",
                        cert.display()
                    ),
                )
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `GET /` and `GET /spiffe-bundle.json`: the SPIFFE bundle, with `refresh_hint`.
pub fn router(core: Arc<SigningCore>, refresh_hint: Duration) -> Router {
    Router::new()
        .route("/", get(bundle))
        .route("/spiffe-bundle.json", get(bundle))
        .with_state((core, refresh_hint.as_secs().max(1)))
}

async fn bundle(State((core, hint)): State<(Arc<SigningCore>, u64)>) -> impl IntoResponse {
    document::spiffe_bundle_response(&core.authority().snapshot().bundle, hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_and_its_files_must_agree() {
        let mut c = FederationConfig::default();
        assert!(c.validate().is_ok());
        c.bundle_endpoint_cert = Some("web.crt".into());
        assert!(c.validate().unwrap_err().contains("https_web"));
        c.bundle_endpoint_profile = EndpointProfile::HttpsWeb;
        assert!(c.validate().unwrap_err().contains("bundle_endpoint_key"));
        c.bundle_endpoint_key = Some("web.key".into());
        assert!(c.validate().is_ok());
        assert_eq!(
            "https_web".parse::<EndpointProfile>(),
            Ok(EndpointProfile::HttpsWeb)
        );
        assert!("http".parse::<EndpointProfile>().is_err());
    }
}
