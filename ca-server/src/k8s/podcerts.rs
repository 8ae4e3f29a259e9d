//! Kubernetes-native pod certificates (KEP-4317): the Lease holder answers every
//! PodCertificateRequest naming meshca's signer, and keeps the signer's ClusterTrustBundle
//! (KEP-3257) equal to the trust bundle through every anchor phase.
//!
//! A request is answered once: `Issued` (the chain, `notBefore`, `notAfter`, `beginRefreshAt`),
//! `Denied` (a reason an operator can act on: `UnsupportedKeyType`, `IdentityDenied`,
//! `NodeDenied`, `NoServiceAccount`, …) or `Failed`. The status is written with the request's
//! resourceVersion, so a second writer (another replica, a restarted one) gets 409 and leaves it;
//! a request refused for a passing reason (an issue budget, no issuer) is left pending and tried
//! again at the next list. The served API version is discovered: `v1` where the server has it
//! (1.37), else `v1beta1` (1.35, 1.36).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::MANAGED_BY;
use crate::issuing::issuance::{IssueError, PodRequest, SigningCore};
use crate::issuing::signing::pod_request_key;
use crate::process::config::PodCertificates;

/// How long after a ClusterTrustBundle changes every kubelet has refreshed the pods that project
/// it, at the latest (kubelets resync projected volumes about every minute; twice that here).
/// With `policy.propagation_allowance` on top, the pod-certificate workloads count as holding
/// that bundle version in the activate gate.
pub const KUBELET_REFRESH: Duration = Duration::from_secs(120);

/// Every request is listed again this often (a request left pending is retried then), and a
/// watch ends after it.
const RESYNC: Duration = Duration::from_secs(10);

/// The served version of `resource` in certificates.k8s.io: `v1` if served, else `v1beta1`.
async fn served(client: &kube::Client, resource: &str) -> Result<ApiResource, String> {
    for version in ["v1", "v1beta1"] {
        let list = match client
            .list_api_group_resources(&format!("certificates.k8s.io/{version}"))
            .await
        {
            Ok(l) => l,
            Err(_) => continue,
        };
        if let Some(r) = list.resources.iter().find(|r| r.name == resource) {
            return Ok(ApiResource {
                group: "certificates.k8s.io".into(),
                version: version.into(),
                api_version: format!("certificates.k8s.io/{version}"),
                kind: r.kind.clone(),
                plural: resource.into(),
            });
        }
    }
    Err(format!(
        "the API server serves no certificates.k8s.io {resource} (v1 from Kubernetes 1.37; \
         v1beta1 behind the PodCertificateRequest and ClusterTrustBundle feature gates before)"
    ))
}

/// Runs until `shutdown`: while this replica holds the Lease, signs and publishes.
pub async fn run(
    client: kube::Client,
    cfg: PodCertificates,
    core: Arc<SigningCore>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *leader.borrow_and_update() {
            match serve(&client, &cfg, &core, &mut leader, &mut shutdown).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(target: "meshca::podcerts", "pod certificates: {e}"),
            }
        }
        // (serve may have seen the shutdown already: its change is not seen twice.)
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// While leader: the ClusterTrustBundle kept, every request answered (list, then watch, again
/// every [`RESYNC`]). Returns when the Lease is lost or at shutdown; `Err` on an API failure.
async fn serve(
    client: &kube::Client,
    cfg: &PodCertificates,
    core: &Arc<SigningCore>,
    leader: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let pcr = served(client, "podcertificaterequests").await?;
    let ctb = if cfg.trust_bundle {
        Some(served(client, "clustertrustbundles").await?)
    } else {
        None
    };
    let requests: Api<DynamicObject> = Api::all_with(client.clone(), &pcr);
    let mut snapshots = core.authority().subscribe();
    // (bundle version, when its ClusterTrustBundle was written)
    let mut published: Option<(u64, std::time::Instant)> = None;
    let settle = KUBELET_REFRESH + core.authority().policy().propagation_allowance;
    loop {
        if let Some(ar) = &ctb {
            let version = core.authority().snapshot().bundle.version;
            if published.is_none_or(|(v, _)| v != version) {
                publish(client, ar, cfg, core).await?;
                published = Some((version, std::time::Instant::now()));
            }
        }
        // Pods read anchors from the ClusterTrustBundle: once every kubelet has had time to
        // refresh and the allowance has passed, they all hold this version.
        if let Some((v, at)) = published
            && at.elapsed() >= settle
        {
            core.authority()
                .ledger()
                .with(|l| l.set_delivered(rotator::ledger::Api::Pod, v));
        }
        let list = requests
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing PodCertificateRequests: {e}"))?;
        for r in &list.items {
            answer(&requests, &pcr, cfg, core, r).await;
        }
        let rv = list.metadata.resource_version.unwrap_or_default();
        let secs = u32::try_from(RESYNC.as_secs()).unwrap_or(10);
        let stream = requests
            .watch(&WatchParams::default().timeout(secs), &rv)
            .await
            .map_err(|e| format!("watching PodCertificateRequests: {e}"))?;
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(WatchEvent::Added(r) | WatchEvent::Modified(r))) => {
                        answer(&requests, &pcr, cfg, core, &r).await;
                    }
                    Some(Ok(_)) => {}
                    // Ended, failed or expired: list again.
                    Some(Err(_)) | None => break,
                },
                r = snapshots.changed() => {
                    if r.is_err() { return Ok(()) }
                    // A new bundle: publish it now, then carry on from a fresh list.
                    if ctb.is_some() { break }
                },
                _ = leader.changed() => if !*leader.borrow() { return Ok(()) },
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// The ClusterTrustBundle of the signer: the trust bundle's anchors, server-side applied.
async fn publish(
    client: &kube::Client,
    ar: &ApiResource,
    cfg: &PodCertificates,
    core: &SigningCore,
) -> Result<(), String> {
    let bundle = core.authority().snapshot().bundle.clone();
    let name = cfg.trust_bundle_name();
    let doc = json!({
        "apiVersion": ar.api_version, "kind": ar.kind,
        "metadata": {
            "name": name,
            "labels": {
                MANAGED_BY.0: MANAGED_BY.1,
                "meshca.io/trust-domain": bundle.trust_domain.to_string(),
            },
            "annotations": {"meshca.io/bundle-version": bundle.version.to_string()},
        },
        "spec": {"signerName": cfg.signer_name, "trustBundle": bundle.pem},
    });
    let obj: DynamicObject =
        serde_json::from_value(doc).map_err(|e| format!("ClusterTrustBundle: {e}"))?;
    Api::<DynamicObject>::all_with(client.clone(), ar)
        .patch(
            &name,
            &PatchParams::apply("meshca").force(),
            &Patch::Apply(&obj),
        )
        .await
        .map_err(|e| format!("writing ClusterTrustBundle {name}: {e}"))?;
    tracing::info!(
        target: "meshca::podcerts",
        cluster_trust_bundle = %name, bundle_version = bundle.version, "trust bundle published"
    );
    Ok(())
}

/// The outcome written into a request's status.
enum Answer {
    Issued(Box<crate::issuing::issuance::Issued>),
    /// (`Denied` or `Failed`, reason, message).
    Refused(&'static str, &'static str, String),
}

/// Answers `r` if it names this signer and has no answer yet; leaves it pending when the
/// refusal may pass (an issue budget, no issuer).
async fn answer(
    requests: &Api<DynamicObject>,
    ar: &ApiResource,
    cfg: &PodCertificates,
    core: &SigningCore,
    r: &DynamicObject,
) {
    let spec = &r.data["spec"];
    if spec["signerName"].as_str() != Some(cfg.signer_name.as_str()) || answered(&r.data) {
        return;
    }
    let Some(outcome) = decide(core, r) else {
        return;
    };
    let name = r.metadata.name.clone().unwrap_or_default();
    let ns = r.metadata.namespace.clone().unwrap_or_default();
    let status = match status_of(&outcome, r.metadata.generation) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(target: "meshca::podcerts", request = %crate::issuing::issuance::log_safe(&format!("{ns}/{name}")), "{e}");
            return;
        }
    };
    let mut obj = r.clone();
    obj.data["status"] = status;
    // List items come without apiVersion and kind; the PUT carries them.
    obj.types = Some(kube::api::TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    });
    let api: Api<DynamicObject> = Api::namespaced_with(requests.clone().into_client(), &ns, ar);
    match api
        .replace_status(&name, &PostParams::default(), &obj)
        .await
    {
        Ok(_) => {}
        // Answered meanwhile (another replica, or this one before a restart): leave it.
        Err(e) if super::is_conflict(&e) => {}
        Err(e) => tracing::warn!(
            target: "meshca::podcerts",
            request = %crate::issuing::issuance::log_safe(&format!("{ns}/{name}")), "writing the answer: {e}"
        ),
    }
}

/// Whether a request already has its terminal condition.
fn answered(data: &Value) -> bool {
    data["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| matches!(c["type"].as_str(), Some("Issued" | "Denied" | "Failed")))
    })
}

/// What to answer, or `None` to leave the request pending for now.
fn decide(core: &SigningCore, r: &DynamicObject) -> Option<Answer> {
    use base64::Engine as _;
    let spec = &r.data["spec"];
    let ns = r.metadata.namespace.as_deref().unwrap_or_default();
    let sa = spec["serviceAccountName"].as_str().unwrap_or_default();
    if sa.is_empty() {
        return Some(Answer::Refused(
            "Denied",
            "NoServiceAccount",
            "the pod runs as no ServiceAccount: meshca's identities are spiffe://<td>/ns/<ns>/sa/<sa>"
                .into(),
        ));
    }
    let td = core.authority().snapshot().bundle.trust_domain.clone();
    let Ok(id) = format!("spiffe://{td}/ns/{ns}/sa/{sa}").parse() else {
        return Some(Answer::Refused(
            "Denied",
            "InvalidIdentity",
            format!("spiffe://{td}/ns/{ns}/sa/{sa} is not a SPIFFE ID meshca can issue"),
        ));
    };
    let b64 = |v: &Value| {
        v.as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let (spki, stub) = (b64(&spec["pkixPublicKey"]), b64(&spec["stubPKCS10Request"]));
    let key = match pod_request_key(spki.as_deref(), stub.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            return Some(Answer::Refused(
                "Denied",
                "UnsupportedKeyType",
                format!(
                    "{e}; meshca signs ECDSA P-256 or P-384, Ed25519, or RSA of 3072 bits or more"
                ),
            ));
        }
    };
    let max = spec["maxExpirationSeconds"].as_u64().unwrap_or(86_400);
    let pod = format!("{ns}/{}", spec["podName"].as_str().unwrap_or_default());
    let req = PodRequest {
        id,
        namespace: ns,
        pod: &pod,
        pod_uid: spec["podUID"].as_str().unwrap_or_default(),
        node: spec["nodeName"].as_str().unwrap_or_default(),
        key,
        max_ttl: Duration::from_secs(max),
    };
    match core.issue_for_pod(&req) {
        Ok(i) => Some(Answer::Issued(Box::new(i))),
        Err(e) => refusal(&e),
    }
}

/// How a refused issuance is answered: `Denied` for what the operator decided (a denial, a
/// reserved identity), `Failed` for what meshca could not do; `None` (pending) for what passes.
fn refusal(e: &IssueError) -> Option<Answer> {
    use crate::issuing::auth::AuthError;
    let msg = e.to_string();
    match e {
        IssueError::Auth(AuthError::IdentityDenied { .. }) => {
            Some(Answer::Refused("Denied", "IdentityDenied", msg))
        }
        IssueError::Auth(AuthError::ImpersonationDenied { .. }) => {
            Some(Answer::Refused("Denied", "NodeDenied", msg))
        }
        IssueError::Auth(_) => Some(Answer::Refused("Denied", "NotAllowed", msg)),
        IssueError::Limited(_) | IssueError::Unavailable(_) => None,
        _ => Some(Answer::Refused("Failed", "SigningFailed", msg)),
    }
}

/// The status an answer writes.
fn status_of(a: &Answer, generation: Option<i64>) -> Result<Value, String> {
    let now = rotator::clock::rfc3339(time::OffsetDateTime::now_utc());
    let condition = |kind: &str, reason: &str, message: &str| {
        json!({
            "type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": now, "observedGeneration": generation.unwrap_or(0),
        })
    };
    Ok(match a {
        Answer::Refused(kind, reason, message) => {
            json!({"conditions": [condition(kind, reason, message)]})
        }
        Answer::Issued(i) => {
            let (_, leaf) = x509_parser::parse_x509_certificate(i.chain[0].as_ref())
                .map_err(|e| format!("the leaf just signed does not parse: {e}"))?;
            let not_before =
                time::OffsetDateTime::from_unix_timestamp(leaf.validity().not_before.timestamp())
                    .map_err(|e| e.to_string())?;
            let chain: String = i
                .chain
                .iter()
                .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
                .collect();
            json!({
                "certificateChain": chain,
                "notBefore": rotator::clock::rfc3339(not_before),
                "notAfter": rotator::clock::rfc3339(i.not_after),
                "beginRefreshAt": rotator::clock::rfc3339(i.refresh_at),
                "conditions": [condition(
                    "Issued",
                    "Issued",
                    &format!("{} signed by meshca issuer {}", i.id, i.issuer),
                )],
            })
        }
    })
}
