//! SPIFFE federation, the consuming half: for each `[[federation.trust_domains]]` entry, fetch
//! the peer's bundle from its bundle endpoint on the peer's refresh hint (bounded by
//! `federation.refresh_min`/`refresh_max`, ±10 % jitter), accept it only when it is well-formed,
//! of the declared trust domain, not empty and not going back in sequence, and commit it to the
//! authority state — so that it reaches every replica, survives restarts without the network, and
//! is handed to workloads with the local bundle. A refused or failed fetch keeps the last good
//! bundle and says why (log, `/metrics`, `meshca status`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http_body_util::BodyExt;
use rotator::spiffe::TrustDomain;
use rotator::state::FederatedBundle;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::process::config::federation::{EndpointProfile, FederationConfig, Peer, SYSTEM_ROOTS};

/// How long one fetch (connect, TLS, answer) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What is known of one federated trust domain's refreshes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerStatus {
    /// The last fetch that succeeded (accepted, or unchanged).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success: Option<OffsetDateTime>,
    /// Failed or refused fetches since the last success.
    pub consecutive_failures: u32,
    /// Why the last fetch failed, if it did.
    pub last_error: Option<String>,
    /// Whether this replica refreshes it (the rotation leader; every process with a state dir).
    pub refreshing: bool,
}

/// The refreshers' shared view, read by `/metrics` and the admin status.
#[derive(Debug, Default)]
pub struct Federation {
    peers: Mutex<BTreeMap<TrustDomain, PeerStatus>>,
}

impl Federation {
    /// The status of every configured trust domain.
    pub fn statuses(&self) -> BTreeMap<TrustDomain, PeerStatus> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, td: &TrustDomain, f: impl FnOnce(&mut PeerStatus)) {
        f(self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(td.clone())
            .or_default());
    }
}

/// Starts one refresher per configured trust domain (they act only while `leader`); drops the
/// held bundles of trust domains no longer configured first.
pub fn spawn(
    federation: &Arc<Federation>,
    cfg: &FederationConfig,
    authority: &Arc<Authority>,
    leader: &watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    stop: &watch::Receiver<bool>,
) {
    for peer in &cfg.trust_domains {
        federation.update(&peer.trust_domain, |_| {});
    }
    let keep: Vec<TrustDomain> = cfg
        .trust_domains
        .iter()
        .map(|p| p.trust_domain.clone())
        .collect();
    {
        let (authority, mut leader, keep) = (authority.clone(), leader.clone(), keep.clone());
        let mut stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = leader.wait_for(|l| *l) => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = authority
                .transition(|s, now| Ok(s.retain_federated(now, &keep)))
                .await
            {
                tracing::warn!("dropping the bundles of trust domains no longer federated: {e}");
            }
        });
    }
    for peer in cfg.trust_domains.clone() {
        tasks.spawn(refresh(
            peer,
            cfg.clone(),
            authority.clone(),
            federation.clone(),
            leader.clone(),
            stop.clone(),
        ));
    }
}

/// Refreshes one trust domain's bundle until `stop`.
async fn refresh(
    peer: Peer,
    cfg: FederationConfig,
    authority: Arc<Authority>,
    federation: Arc<Federation>,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let td = peer.trust_domain.clone();
    loop {
        if !*leader.borrow_and_update() {
            // Another replica refreshes now: what this one last saw is no longer current.
            federation.update(&td, |s| s.refreshing = false);
        }
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        federation.update(&td, |s| s.refreshing = true);
        let wait = match refresh_once(&peer, &cfg, &authority).await {
            Ok((hint, accepted)) => {
                if let Some(seq) = accepted {
                    tracing::info!(trust_domain = %td, sequence = seq, "federated bundle accepted");
                }
                federation.update(&td, |s| {
                    s.last_success = Some(authority.clock().now());
                    s.consecutive_failures = 0;
                    s.last_error = None;
                });
                hint.unwrap_or(cfg.refresh_max)
                    .clamp(cfg.refresh_min, cfg.refresh_max)
            }
            Err(why) => {
                let mut failures = 0;
                federation.update(&td, |s| {
                    s.consecutive_failures += 1;
                    failures = s.consecutive_failures;
                    s.last_error = Some(why.clone());
                });
                // Said once per failure streak and then every tenth time: a peer that is down
                // for a day must not flood the log.
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(trust_domain = %td, failures, "federated bundle not refreshed, the last good one is kept: {why}");
                }
                let backoff = cfg.refresh_min.saturating_mul(1 << (failures - 1).min(10));
                backoff.min(cfg.refresh_max)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(jitter(wait)) => {}
            // Leadership lost: back to the top, which says so at once (the campaigner gone:
            // shutting down).
            r = leader.wait_for(|l| !*l) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// `d` ± 10 %.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    if rotator::pki::random_bytes(&mut b).is_err() {
        return d;
    }
    d.mul_f64(0.9 + 0.2 * f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX))
}

/// One refresh: the bootstrap bundle if nothing is held, then a fetch. `Ok((refresh hint, the
/// sequence accepted if the bundle changed))`, or why nothing was accepted.
async fn refresh_once(
    peer: &Peer,
    cfg: &FederationConfig,
    authority: &Authority,
) -> Result<(Option<Duration>, Option<u64>), String> {
    let td = &peer.trust_domain;
    let mut held = authority.read(|s| s.federated_bundle(td).cloned()).await;
    if held.is_none()
        && let Some(path) = &peer.bootstrap_bundle
    {
        hold(authority, td, bootstrap(path, td)?, 0, true)
            .await
            .map_err(|e| format!("holding the bootstrap bundle: {e}"))?;
        held = authority.read(|s| s.federated_bundle(td).cloned()).await;
    }
    let body = fetch(peer, cfg, held.as_ref()).await?;
    let doc = parse(&body, td, cfg.max_anchors)?;
    let hint = doc.refresh_hint;
    let sequence = match (&held, doc.sequence) {
        (Some(h), Some(seq)) if seq < h.sequence => {
            return Err(format!(
                "refused: the sequence went back from {} to {seq}",
                h.sequence
            ));
        }
        (Some(h), Some(seq)) if seq == h.sequence => {
            if same_anchors(&h.anchors_pem, &doc.anchors_pem) {
                return Ok((hint, None));
            }
            return Err(format!(
                "refused: the anchors changed but the sequence stayed at {seq}"
            ));
        }
        (_, Some(seq)) => seq,
        // No sequence in the document: a change is taken at the held sequence.
        (Some(h), None) if same_anchors(&h.anchors_pem, &doc.anchors_pem) => {
            return Ok((hint, None));
        }
        (Some(h), None) => h.sequence,
        (None, None) => 0,
    };
    hold(authority, td, doc.anchors_pem, sequence, false)
        .await
        .map_err(|e| format!("committing the bundle: {e}"))?;
    Ok((hint, Some(sequence)))
}

/// Commits `anchors_pem` at `sequence` as the bundle held for `td`, fetched now (`if_none`: only
/// when none is held — a bootstrap bundle never replaces a fetched one).
async fn hold(
    authority: &Authority,
    td: &TrustDomain,
    anchors_pem: String,
    sequence: u64,
    if_none: bool,
) -> Result<bool, crate::authority::TransitionError> {
    authority
        .transition(|s, now| {
            if if_none && s.federated_bundle(td).is_some() {
                return Ok(None);
            }
            let b = FederatedBundle {
                trust_domain: td.clone(),
                anchors_pem: anchors_pem.clone(),
                sequence,
                fetched: now,
            };
            s.set_federated(now, b).map(Some)
        })
        .await
}

fn same_anchors(a: &str, b: &str) -> bool {
    rotator::client::parse_pem_certs(a) == rotator::client::parse_pem_certs(b)
}

/// The bootstrap bundle's anchors (PEM), each a CA of `td` or naming no trust domain.
pub(crate) fn bootstrap(path: &Path, td: &TrustDomain) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("bootstrap_bundle {}: {e}", path.display()))?;
    let certs = rotator::client::parse_pem_certs(&text);
    if certs.is_empty() {
        return Err(format!(
            "bootstrap_bundle {}: no CERTIFICATE in it",
            path.display()
        ));
    }
    for c in &certs {
        check_anchor(c, td).map_err(|e| format!("bootstrap_bundle {}: {e}", path.display()))?;
    }
    Ok(certs.iter().map(|c| pem_of(c)).collect())
}

fn pem_of(c: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec()))
}

/// A peer's bundle document, checked.
struct Doc {
    anchors_pem: String,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Parses a SPIFFE bundle (a JWK Set): its `x509-svid` keys, each one CA certificate of `td` (or
/// naming no trust domain); at least one.
fn parse(body: &[u8], td: &TrustDomain, max_anchors: usize) -> Result<Doc, String> {
    let jwks: Jwks =
        serde_json::from_slice(body).map_err(|e| format!("refused: not a SPIFFE bundle: {e}"))?;
    let keys: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| k.usage.as_deref() == Some("x509-svid"))
        .collect();
    if keys.len() > max_anchors {
        return Err(format!(
            "refused: {} anchors, more than federation.max_anchors ({max_anchors})",
            keys.len()
        ));
    }
    let mut pem = String::new();
    for k in keys {
        let [one] = k.x5c.as_slice() else {
            return Err(format!(
                "refused: an x509-svid key has {} certificates in x5c, not one",
                k.x5c.len()
            ));
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(one)
            .map_err(|e| format!("refused: x5c is not base64: {e}"))?;
        let cert = CertificateDer::from(der);
        check_anchor(&cert, td).map_err(|e| format!("refused: {e}"))?;
        pem.push_str(&pem_of(&cert));
    }
    if pem.is_empty() {
        return Err("refused: the bundle holds no x509-svid anchor".into());
    }
    Ok(Doc {
        anchors_pem: pem,
        sequence: jwks.spiffe_sequence,
        refresh_hint: jwks.spiffe_refresh_hint.map(Duration::from_secs),
    })
}

/// The anchors (PEM) of an accepted document, for the fuzz target.
#[doc(hidden)]
pub fn parse_anchors(body: &[u8], td: &TrustDomain) -> Result<String, String> {
    parse(body, td, 32).map(|d| d.anchors_pem)
}

/// An anchor must be a CA certificate; one that names a trust domain — a SPIFFE URI SAN, as
/// SPIRE's do, or the organisation of a meshca anchor — must name `td`.
fn check_anchor(cert: &CertificateDer<'_>, td: &TrustDomain) -> Result<(), String> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("an anchor is not an X.509 certificate: {e}"))?;
    if !c.is_ca() {
        return Err(format!("{} is not a CA certificate", c.subject()));
    }
    let own = format!("spiffe://{td}");
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n
                && u.starts_with("spiffe://")
                && u.trim_end_matches('/') != own
            {
                return Err(format!("an anchor names {u}, not trust domain {td}"));
            }
        }
    }
    let meshca = c.subject().iter_common_name().any(|cn| {
        cn.as_str()
            .is_ok_and(|s| s.starts_with("meshca trust anchor"))
    });
    if meshca {
        for o in c.subject().iter_organization() {
            if let Ok(o) = o.as_str()
                && o != td.as_str()
            {
                return Err(format!("a meshca anchor of trust domain {o}, not {td}"));
            }
        }
    }
    Ok(())
}

/// `GET` the peer's bundle endpoint, authenticated as its profile says; the body, at most
/// `max_bundle_bytes`.
async fn fetch(
    peer: &Peer,
    cfg: &FederationConfig,
    held: Option<&FederatedBundle>,
) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = peer
        .bundle_endpoint_url
        .parse()
        .map_err(|e| format!("bundle_endpoint_url: {e}"))?;
    let host = uri
        .host()
        .ok_or("bundle_endpoint_url has no host")?
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tls = client_tls(peer, held)?;
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| format!("bundle_endpoint_url host {host:?}: {e}"))?;
    let max = cfg.max_bundle_bytes;
    let work = async move {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP with {host}:{port}: {e}"))?;
        let driver = tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = hyper::Request::get(path)
            .header(
                hyper::header::HOST,
                uri.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {}: {e}", uri))?;
        if res.status() != hyper::StatusCode::OK {
            driver.abort();
            return Err(format!("GET {uri}: HTTP {}", res.status()));
        }
        let body = http_body_util::Limited::new(res.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!(
                        "refused: the bundle is larger than federation.max_bundle_bytes ({max})"
                    )
                } else {
                    format!("GET {uri}: {e}")
                }
            })?
            .to_bytes();
        driver.abort();
        Ok(body.to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!(
                "GET {}: no answer within {FETCH_TIMEOUT:?}",
                peer.bundle_endpoint_url
            )
        })?
}

/// The TLS a peer's profile calls for: `https_spiffe` — its chain to the bundle held for it or to
/// the bootstrap bundle file, and the declared SPIFFE ID; `https_web` — its host name under
/// `web_ca_file`'s roots (default: the system's).
fn client_tls(peer: &Peer, held: Option<&FederatedBundle>) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut cfg = match peer.profile {
        EndpointProfile::HttpsSpiffe => {
            let held = held.ok_or_else(|| {
                format!(
                    "no bundle of {} is held yet to authenticate its endpoint: set bootstrap_bundle",
                    peer.trust_domain
                )
            })?;
            let id = peer
                .endpoint_spiffe_id
                .clone()
                .ok_or("https_spiffe needs endpoint_spiffe_id")?;
            // The held bundle, and the bootstrap file as it is now: an operator recovers from a
            // peer that rotated past the held bundle by putting its current bundle there.
            let mut roots = rotator::client::parse_pem_certs(&held.anchors_pem);
            if let Some(path) = &peer.bootstrap_bundle
                && let Ok(text) = std::fs::read_to_string(path)
            {
                roots.extend(rotator::client::parse_pem_certs(&text));
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(rotator::client::SpiffeServerVerifier::new(
                    roots, id,
                ))
                .with_no_client_auth()
        }
        EndpointProfile::HttpsWeb => {
            let file = peer
                .web_ca_file
                .clone()
                .unwrap_or_else(|| SYSTEM_ROOTS.into());
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("web_ca_file {}: {e}", file.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) =
                roots.add_parsable_certificates(rotator::client::parse_pem_certs(&text));
            if added == 0 {
                return Err(format!(
                    "web_ca_file {}: no usable certificate",
                    file.display()
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(td: &str) -> CertificateDer<'static> {
        let key = rotator::pki::SecretKey::generate_p256().unwrap();
        let td: TrustDomain = td.parse().unwrap();
        let now = OffsetDateTime::now_utc();
        let a =
            rotator::profile::new_anchor(&td, &key, now, Duration::from_secs(3600), Duration::ZERO)
                .unwrap();
        a.der().clone()
    }

    fn doc(certs: &[&CertificateDer<'_>], seq: u64) -> Vec<u8> {
        let keys: Vec<_> = certs
            .iter()
            .map(|c| {
                serde_json::json!({"use": "x509-svid", "kty": "EC",
                    "x5c": [base64::engine::general_purpose::STANDARD.encode(c.as_ref())]})
            })
            .collect();
        serde_json::json!({"keys": keys, "spiffe_sequence": seq, "spiffe_refresh_hint": 60})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_bundle_is_parsed_and_checked() {
        let td: TrustDomain = "b.example".parse().unwrap();
        let b = anchor("b.example");
        let d = parse(&doc(&[&b], 7), &td, 32).unwrap();
        assert_eq!(d.sequence, Some(7));
        assert_eq!(d.refresh_hint, Some(Duration::from_secs(60)));
        assert_eq!(
            rotator::client::parse_pem_certs(&d.anchors_pem),
            vec![b.clone()]
        );
        // Another trust domain's anchor, nothing, not JSON, not a CA.
        let a = anchor("a.example");
        let e = parse(&doc(&[&b, &a], 8), &td, 32).err().unwrap();
        assert!(e.contains("trust domain a.example, not b.example"), "{e}");
        let e = parse(&doc(&[], 8), &td, 32).err().unwrap();
        assert!(e.contains("no x509-svid anchor"), "{e}");
        let e = parse(&doc(&[&b, &b], 8), &td, 1).err().unwrap();
        assert!(
            e.contains("2 anchors, more than federation.max_anchors (1)"),
            "{e}"
        );
        let e = parse(b"{\"keys\": [", &td, 32).err().unwrap();
        assert!(e.contains("not a SPIFFE bundle"), "{e}");
        let e = parse(br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#, &td, 32)
            .err()
            .unwrap();
        assert!(e.contains("not an X.509 certificate"), "{e}");
    }
}
