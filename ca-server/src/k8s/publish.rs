//! The trust bundle as ConfigMaps: `<configmap>` (key `ca-bundle.crt`) in every namespace whose
//! labels match `[kubernetes.bundle] namespace_selector`, optionally also Istio's
//! `istio-ca-root-cert` (`root-cert.pem`) and Linkerd's `linkerd-identity-trust-roots`
//! (`ca-bundle.crt`) shapes. Published by the Lease holder on every bundle change and every
//! `resync`; removed (only ours: label `app.kubernetes.io/managed-by=meshca`) from namespaces
//! that stop matching. Each ConfigMap carries `meshca.io/bundle-version`; one already at a newer
//! version is never overwritten with an older bundle (a deposed leader cannot roll it back).
//! Each federated trust domain's bundle goes beside it as `<configmap>-federated-<td>` (key
//! `ca-bundle.crt`, versioned by the peer's `spiffe_sequence`), removed once no longer federated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use tokio::sync::watch;

use super::MANAGED_BY;
use super::{BundlePublication, is_conflict, is_not_found};
use crate::authority::{Authority, Bundle};

/// The annotation holding the bundle version a ConfigMap was written from.
pub const VERSION_ANNOTATION: &str = "meshca.io/bundle-version";
/// The annotation holding when a ConfigMap's content (the anchors) last changed, RFC 3339: a
/// pod made from it after that moment holds these anchors (Linkerd's proxies read them once).
pub const CONTENT_SINCE_ANNOTATION: &str = "meshca.io/content-since";

/// The (name, key) pairs published in each matching namespace.
pub fn shapes(cfg: &BundlePublication) -> Vec<(String, &'static str)> {
    let mut v = vec![(cfg.configmap.clone(), "ca-bundle.crt")];
    if cfg.istio {
        v.push(("istio-ca-root-cert".into(), "root-cert.pem"));
    }
    if cfg.linkerd {
        v.push(("linkerd-identity-trust-roots".into(), "ca-bundle.crt"));
    }
    v
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// ConfigMaps created or updated.
    pub written: usize,
    /// ConfigMaps already current.
    pub unchanged: usize,
    /// ConfigMaps left alone because they hold a newer bundle.
    pub newer: usize,
    /// ConfigMaps removed from namespaces that no longer match.
    pub removed: usize,
}

fn version_of(cm: &ConfigMap) -> u64 {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One reconcile: publish `bundle` to every matching namespace, remove from the others. A
/// ConfigMap annotated with a newer version than `bundle`'s is left alone (a deposed leader must
/// not roll it back) unless `distrust_newer`: the caller re-read the committed state and found
/// nothing newer, so that annotation was written by someone else and its content is rewritten.
/// One object's failure does not stop the others: the first error is returned at the end.
pub async fn reconcile(
    client: &kube::Client,
    cfg: &BundlePublication,
    bundle: &Bundle,
    distrust_newer: bool,
) -> Result<Published, kube::Error> {
    let mut done = Published::default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = cfg.namespace_selector.clone();
    let matching: BTreeSet<String> = namespaces
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| n.metadata.name)
        .collect();
    let mut shapes = shapes(cfg);
    // Federated trust domains' bundles beside the local one, versioned by their sequence.
    let federated: Vec<(String, Bundle)> = bundle
        .federated
        .iter()
        .map(|f| {
            (
                federated_name(cfg, f.trust_domain.as_str()),
                Bundle {
                    trust_domain: f.trust_domain.clone(),
                    version: f.sequence,
                    anchors: f.anchors.clone(),
                    ids: Vec::new(),
                    pem: f
                        .anchors
                        .iter()
                        .map(|a| pem::encode(&pem::Pem::new("CERTIFICATE", a.to_vec())))
                        .collect(),
                    federated: Vec::new(),
                },
            )
        })
        .collect();
    let mut first_error = None;
    for ns in &matching {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let all = shapes
            .iter()
            .map(|(name, key)| (name, *key, bundle))
            .chain(federated.iter().map(|(name, b)| (name, "ca-bundle.crt", b)));
        for (name, key, b) in all {
            if let Err(e) = write_one(&api, name, key, b, distrust_newer, &mut done).await {
                tracing::warn!(target: "meshca::publish", "ConfigMap {ns}/{name}: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    shapes.extend(federated.iter().map(|(n, _)| (n.clone(), "ca-bundle.crt")));
    if let Err(e) = remove_unmatched(
        client,
        &matching,
        &shapes,
        &federated_name(cfg, ""),
        &mut done,
    )
    .await
    {
        first_error.get_or_insert(e);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// The ConfigMap holding federated trust domain `td`'s bundle: `<configmap>-federated-<td>`, a
/// valid object name whatever the trust domain (SPIFFE allows `_`, object names do not: it
/// becomes `-`, and a short hash of the trust domain keeps two such names apart).
pub fn federated_name(cfg: &BundlePublication, td: &str) -> String {
    let clean: String = td.chars().map(|c| if c == '_' { '-' } else { c }).collect();
    if clean == td {
        return format!("{}-federated-{td}", cfg.configmap);
    }
    let h = ring::digest::digest(&ring::digest::SHA256, td.as_bytes());
    format!(
        "{}-federated-{clean}-{}",
        cfg.configmap,
        hex::encode(&h.as_ref()[..4])
    )
}

/// Writes one bundle ConfigMap (`name`, the bundle under `key`) unless it already holds this
/// bundle or a newer one. A conflict is left to the next round.
async fn write_one(
    api: &Api<ConfigMap>,
    name: &str,
    key: &str,
    bundle: &Bundle,
    distrust_newer: bool,
    done: &mut Published,
) -> Result<(), kube::Error> {
    let pp = PostParams {
        field_manager: Some("meshca".into()),
        ..Default::default()
    };
    let data: BTreeMap<String, String> = [(key.to_owned(), bundle.pem.clone())].into();
    let version = (VERSION_ANNOTATION, bundle.version.to_string());
    let written = match api.get_opt(name).await? {
        None => {
            let mut cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            super::stamp(&mut cm.metadata, version);
            super::stamp(&mut cm.metadata, (CONTENT_SINCE_ANNOTATION, now()));
            api.create(&pp, &cm).await
        }
        Some(cm) => {
            let v = version_of(&cm);
            if v > bundle.version && !(distrust_newer && cm.data.as_ref() != Some(&data)) {
                done.newer += 1;
                return Ok(());
            }
            if v == bundle.version && cm.data.as_ref() == Some(&data) {
                done.unchanged += 1;
                return Ok(());
            }
            // Over what was read: conditional on its resourceVersion, keeping other labels and
            // annotations (e.g. a mesh's own).
            let mut next = cm;
            super::stamp(&mut next.metadata, version);
            let kept = next
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CONTENT_SINCE_ANNOTATION))
                .filter(|_| next.data.as_ref() == Some(&data))
                .cloned();
            super::stamp(
                &mut next.metadata,
                (CONTENT_SINCE_ANNOTATION, kept.unwrap_or_else(now)),
            );
            next.data = Some(data);
            api.replace(name, &pp, &next).await
        }
    };
    match written {
        Ok(_) => done.written += 1,
        // Written by someone else meanwhile: the next round looks again.
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The wall-clock time, RFC 3339: what the annotation is compared with is the API server's
/// creationTimestamp of pods, wall-clock too.
fn now() -> String {
    rotator::clock::rfc3339(time::OffsetDateTime::now_utc())
}

/// Deletes ours in namespaces that stopped matching, and everywhere the ConfigMaps of trust
/// domains no longer federated (named `federated_prefix…` but not among `shapes`).
async fn remove_unmatched(
    client: &kube::Client,
    matching: &BTreeSet<String>,
    shapes: &[(String, &'static str)],
    federated_prefix: &str,
    done: &mut Published,
) -> Result<(), kube::Error> {
    let all: Api<ConfigMap> = Api::all(client.clone());
    let ours = all
        .list(&ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)))
        .await?;
    for cm in ours.items {
        let (Some(ns), Some(name)) = (cm.metadata.namespace.clone(), cm.metadata.name.clone())
        else {
            continue;
        };
        let shaped = shapes.iter().any(|(n, _)| *n == name);
        let stale_federated = name.starts_with(federated_prefix) && !shaped;
        if !stale_federated && (matching.contains(&ns) || !shaped) {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => done.removed += 1,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Publishes while this replica holds the Lease: at once on becoming leader and on every bundle
/// change, and every `resync`.
pub async fn run(
    client: kube::Client,
    cfg: BundlePublication,
    authority: Arc<Authority>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut snapshots = authority.subscribe();
    let mut last_version = None;
    loop {
        if *leader.borrow_and_update() {
            let snap = authority.snapshot();
            let bundle = snap.bundle.clone();
            let mut round = reconcile(&client, &cfg, &bundle, false).await;
            // A ConfigMap claims a newer bundle: adopt the committed state if it is newer;
            // if it is not, nobody legitimately wrote that version (the leader commits before it
            // publishes), so the claim is someone's edit and the content is put right.
            if round.as_ref().is_ok_and(|p| p.newer > 0)
                && let Ok(false) = authority.resync().await
                && authority.snapshot().generation == snap.generation
            {
                tracing::warn!(target: "meshca::publish", version = bundle.version,
                    "a bundle ConfigMap claims a newer version than the committed state: rewriting its content");
                round = reconcile(&client, &cfg, &bundle, true).await;
            }
            match round {
                Ok(p) => {
                    if p.written + p.removed > 0 || last_version != Some(bundle.version) {
                        tracing::info!(target: "meshca::publish", version = bundle.version, written = p.written,
                            unchanged = p.unchanged, removed = p.removed, newer = p.newer, "trust bundle ConfigMaps published");
                    }
                    last_version = Some(bundle.version);
                }
                Err(e) => {
                    tracing::warn!(target: "meshca::publish", "publishing the trust bundle ConfigMaps failed (retrying): {e}");
                }
            }
        }
        let wait = if last_version.is_some() {
            cfg.resync
        } else {
            cfg.resync.min(std::time::Duration::from_secs(2))
        };
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() {
                // The campaigner ended (shutdown): keep the last value, stop watching it.
                let _ = shutdown.wait_for(|s| *s).await;
                return;
            },
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federated_configmap_names_are_object_names_for_any_trust_domain() {
        let cfg = BundlePublication::default();
        assert_eq!(
            federated_name(&cfg, "b.example"),
            "meshca-trust-bundle-federated-b.example"
        );
        let a = federated_name(&cfg, "team_a.example");
        let b = federated_name(&cfg, "team-a.example");
        assert_ne!(a, b, "`_` and `-` do not collide");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'),
            "{a}"
        );
    }
}
