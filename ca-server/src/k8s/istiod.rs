//! istiod's serving certificate (`[istio.istiod_certificate]`, issue #31). With its CA off,
//! istiod serves secure XDS and its webhooks with the certificate in the `istiod-tls` Secret
//! (`tls.crt`, `tls.key`, `ca.crt`) and proxies verify it against the mesh's roots, so it must
//! chain to meshca's anchors. The Lease holder keeps that Secret: a DNS-only server certificate
//! (`rotator::profile::dns_server`) signed by the active issuer, `tls.crt` = leaf and issuer,
//! `ca.crt` = every anchor of the bundle. It is written again when it is missing, when the
//! active issuer or the bundle changed, when the names changed, and two thirds into its life.
//!
//! The decision is [`due`], a pure function of what the Secret says and the snapshot; the loop
//! only reads, decides and writes. A Secret meshca did not write (no
//! `app.kubernetes.io/managed-by=meshca`) is never overwritten: that is an operator's choice
//! to keep, and meshca says so in its log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::MANAGED_BY;
use super::{is_conflict, stamp};
use crate::authority::{Authority, Snapshot};
use crate::process::config::IstiodCertificate;

/// The annotation naming the issuer that signed the certificate.
pub const ISSUER_ANNOTATION: &str = "meshca.io/issuer";
/// The annotation naming the bundle version in `ca.crt`.
pub const BUNDLE_ANNOTATION: &str = "meshca.io/bundle-version";
/// The annotation holding when to renew it (RFC 3339).
pub const RENEW_ANNOTATION: &str = "meshca.io/renew-at";
/// The annotation listing the certificate's DNS names.
pub const NAMES_ANNOTATION: &str = "meshca.io/dns-names";
/// How often the Secret is looked at when nothing changes (someone may delete or edit it).
pub const RESYNC: Duration = Duration::from_secs(30);

/// What the Secret holds, as far as deciding goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// No such Secret.
    Missing,
    /// A Secret meshca did not write.
    NotOurs,
    /// Ours, with what its annotations say.
    Ours {
        /// The issuer that signed it.
        issuer: String,
        /// The bundle version in `ca.crt`.
        bundle_version: u64,
        /// When to renew.
        renew_at: Option<OffsetDateTime>,
        /// Its names, comma-separated.
        names: String,
    },
}

/// Why the Secret must be written now (`None`: it is current, or not ours to write).
pub fn due(
    held: &Held,
    snap: &Snapshot,
    names: &[String],
    now: OffsetDateTime,
) -> Option<&'static str> {
    let issuer = snap.issuer.as_ref()?;
    match held {
        Held::Missing => Some("missing"),
        Held::NotOurs => None,
        Held::Ours {
            issuer: i,
            bundle_version,
            renew_at,
            names: n,
        } => {
            if *i != issuer.id.to_string() {
                Some("the active issuer changed")
            } else if *bundle_version != snap.bundle.version {
                Some("the trust bundle changed")
            } else if *n != names.join(",") {
                Some("its DNS names changed")
            } else if renew_at.is_none_or(|t| t <= now) {
                Some("due for renewal")
            } else {
                None
            }
        }
    }
}

/// Reads what the Secret says.
pub fn held(secret: Option<&Secret>) -> Held {
    let Some(s) = secret else {
        return Held::Missing;
    };
    let ours = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1);
    if !ours {
        return Held::NotOurs;
    }
    let a = s.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| a.get(k).cloned().unwrap_or_default();
    Held::Ours {
        issuer: get(ISSUER_ANNOTATION),
        bundle_version: get(BUNDLE_ANNOTATION).parse().unwrap_or(0),
        renew_at: OffsetDateTime::parse(
            &get(RENEW_ANNOTATION),
            &time::format_description::well_known::Rfc3339,
        )
        .ok(),
        names: get(NAMES_ANNOTATION),
    }
}

/// A Secret's data and the annotations that describe it.
type Written = (BTreeMap<String, ByteString>, Vec<(&'static str, String)>);

/// A new certificate for `cfg` from `snap`'s issuer, as the Secret's data and annotations.
fn issue(
    authority: &Authority,
    snap: &Snapshot,
    cfg: &IstiodCertificate,
) -> Result<Written, String> {
    let issuer = snap.issuer.as_ref().ok_or("no active issuer")?;
    let now = authority.clock().now();
    let policy = authority.policy();
    let not_before = now - policy.clock_skew;
    let not_after = (now + cfg.ttl).min(issuer.not_after);
    if not_after <= now {
        return Err(format!("issuer {} has expired", issuer.id));
    }
    let key = rotator::pki::SecretKey::generate_p256().map_err(|e| e.to_string())?;
    let cert = rotator::profile::dns_server(&cfg.dns_names, not_before, not_after)
        .and_then(|p| Ok(p.signed_by(&key, &issuer.signer)?))
        .map_err(|e| e.to_string())?;
    let tls_crt = rotator::pki::pem_cert(cert.der()) + &rotator::pki::pem_cert(&issuer.der);
    let tls_key = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        key.pkcs8_der().map_err(|e| e.to_string())?.to_vec(),
    ));
    let data = [
        ("tls.crt", tls_crt.into_bytes()),
        ("tls.key", tls_key.into_bytes()),
        ("ca.crt", snap.bundle.pem.clone().into_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v)))
    .collect();
    let annotations = vec![
        (ISSUER_ANNOTATION, issuer.id.to_string()),
        (BUNDLE_ANNOTATION, snap.bundle.version.to_string()),
        (
            RENEW_ANNOTATION,
            rotator::clock::rfc3339(rotator::profile::renew_at(now, not_after)),
        ),
        (NAMES_ANNOTATION, cfg.dns_names.join(",")),
    ];
    Ok((data, annotations))
}

/// One look at the Secret: writes it when [`due`]; returns why it wrote, if it did.
pub async fn reconcile(
    client: &kube::Client,
    authority: &Authority,
    cfg: &IstiodCertificate,
) -> Result<Option<&'static str>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let what = format!("Secret {}/{}", cfg.namespace, cfg.secret);
    let current = api
        .get_opt(&cfg.secret)
        .await
        .map_err(|e| format!("reading {what}: {e}"))?;
    let snap = authority.snapshot();
    let held = held(current.as_ref());
    if held == Held::NotOurs {
        return Err(format!(
            "{what} exists and was not written by meshca (no {}={} label): left alone; delete it \
             or drop [istio.istiod_certificate] dns_names",
            MANAGED_BY.0, MANAGED_BY.1
        ));
    }
    let Some(why) = due(&held, &snap, &cfg.dns_names, authority.clock().now()) else {
        return Ok(None);
    };
    let (data, annotations) = issue(authority, &snap, cfg)?;
    let mut meta = current.as_ref().map_or_else(
        || ObjectMeta {
            name: Some(cfg.secret.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        |s| s.metadata.clone(),
    );
    for a in annotations {
        stamp(&mut meta, a);
    }
    let secret = Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    };
    let pp = PostParams::default();
    let written = match current {
        None => api.create(&pp, &secret).await,
        Some(_) => api.replace(&cfg.secret, &pp, &secret).await,
    };
    match written {
        Ok(_) => Ok(Some(why)),
        // Another writer got there first: the next look decides again.
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(format!("writing {what}: {e}")),
    }
}

/// Keeps the Secret while this replica holds the Lease: on becoming leader, on every authority
/// change, and every [`RESYNC`] (or sooner when renewal is due).
pub async fn run(
    client: kube::Client,
    cfg: IstiodCertificate,
    authority: Arc<Authority>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut snapshots = authority.subscribe();
    loop {
        let mut wait = RESYNC;
        if *leader.borrow_and_update() {
            match reconcile(&client, &authority, &cfg).await {
                Ok(Some(why)) => tracing::info!(
                    target: "meshca::istiod",
                    namespace = %cfg.namespace, secret = %cfg.secret, reason = why,
                    "istiod serving certificate written"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target: "meshca::istiod", "istiod serving certificate: {e}");
                    wait = Duration::from_secs(5);
                }
            }
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() {
                let _ = shutdown.wait_for(|s| *s).await;
                return;
            },
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
