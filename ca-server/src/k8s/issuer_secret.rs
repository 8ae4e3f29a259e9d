//! Upstream mode with cert-manager: the issuer lives in a `kubernetes.io/tls` Secret (`tls.crt`,
//! `tls.key`, `ca.crt`) that cert-manager renews (the seeds' Linkerd set-up keeps Linkerd's
//! identity issuer this way). meshca watches that Secret and adopts every renewal — a new
//! certificate, usually a new key — through the same checks as `meshca issuer import`: the key
//! is the certificate's, it chains to an anchor in the bundle, is valid now, has at least
//! `leaf_ttl_max` left and does not outlive its anchor. A renewal that fails a check is refused
//! with the numbers (log, `meshca_issuer_source_refusals_total`) and the last good issuer keeps
//! signing. Only the replica that rotates (the Lease holder) adopts; the others follow the
//! state it commits.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, WatchEvent, WatchParams};
use prometheus_client::metrics::counter::Counter;
use rotator::pki::{CaCert, SecretKey};
use tokio::sync::watch;

use crate::authority::Authority;

/// Why a Secret's issuer was not adopted.
fn unusable(what: &str, why: impl std::fmt::Display) -> String {
    format!("{what}: {why}")
}

/// Adopts the issuer in `secret` unless it is installed already. `Ok(Some(id))`: adopted;
/// `Ok(None)`: nothing new.
pub async fn adopt(
    authority: &Authority,
    what: &str,
    secret: &Secret,
) -> Result<Option<String>, String> {
    let data = secret.data.as_ref();
    let field = |k: &str| {
        data.and_then(|d| d.get(k))
            .ok_or_else(|| unusable(what, format!("no {k}")))
            .and_then(|v| {
                String::from_utf8(v.0.clone())
                    .map_err(|_| unusable(what, format!("{k} is not PEM text")))
            })
    };
    let cert = CaCert::from_pem(&field("tls.crt")?)
        .map_err(|e| unusable(what, format!("tls.crt: {e}")))?;
    let id = cert.id().clone();
    if authority.read(|s| s.issuer(&id).is_some()).await {
        return Ok(None);
    }
    let key_pem = zeroize::Zeroizing::new(field("tls.key")?);
    let key = SecretKey::from_pem(&key_pem).map_err(|e| unusable(what, format!("tls.key: {e}")))?;
    let policy = authority.policy().clone();
    authority
        .transition(|s, now| {
            s.adopt_issuer(&policy, now, cert.clone(), key.clone())
                .map(Some)
        })
        .await
        .map_err(|e| unusable(what, e))?;
    Ok(Some(id.to_string()))
}

/// Watches `namespace/name` and adopts each new issuer while this replica leads, until `stop`.
/// The Secret is read in full at start, whenever this replica becomes the leader, and whenever
/// the watch ends.
pub async fn follow(
    client: kube::Client,
    (namespace, name): (String, String),
    authority: Arc<Authority>,
    mut leader: watch::Receiver<bool>,
    refusals: Counter,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let what = format!("Secret {namespace}/{name}");
    loop {
        match api.get_opt(&name).await {
            Ok(Some(s)) => {
                let leading = *leader.borrow();
                consider(&authority, &what, &refusals, leading, s).await;
            }
            Ok(None) => {
                tracing::warn!("{what} does not exist (yet): the current issuer keeps signing")
            }
            Err(e) => tracing::warn!("reading {what}: {e}"),
        }
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let stream = match api.watch(&wp, "0").await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("watching {what}: {e}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                // A new leader reads the Secret in full.
                _ = leader.changed() => break,
                _ = stop.changed() => return,
            };
            match ev {
                Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                    let leading = *leader.borrow();
                    consider(&authority, &what, &refusals, leading, s).await;
                }
                Some(Ok(WatchEvent::Deleted(_))) => tracing::error!(
                    "{what} was deleted: the current issuer keeps signing until it expires"
                ),
                Some(Ok(WatchEvent::Bookmark(_))) => {}
                Some(Ok(WatchEvent::Error(_)) | Err(_)) | None => break,
            }
        }
    }
}

/// Adopts `s`'s issuer if this replica leads; logs and counts the outcome.
async fn consider(authority: &Authority, what: &str, refusals: &Counter, leading: bool, s: Secret) {
    if !leading {
        return;
    }
    let active = authority
        .read(|s| s.active_issuer().map(|i| i.cert.id().to_string()))
        .await
        .unwrap_or_else(|| "none".into());
    match adopt(authority, what, &s).await {
        Ok(Some(id)) => tracing::info!(
            target: "meshca::audit", issuer = %id, replaced = %active, source = %what,
            "issuer adopted from the Secret"
        ),
        Ok(None) => {}
        Err(e) => {
            refusals.inc();
            tracing::error!(
                target: "meshca::audit", source = %what, keeping = %active,
                "issuer from the Secret refused, the last good issuer keeps signing: {e}"
            );
        }
    }
}
