//! Linkerd's proxies read their trust anchors once, when they start
//! (`LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`, put in the pod spec by Linkerd's proxy injector from
//! the `linkerd-identity-trust-roots` ConfigMap of its control-plane namespace; linkerd2#9313):
//! a proxy started before `meshca anchors stage` holds only the old anchor until its pod is
//! replaced, however long one waits. This counts them for the activate gate.
//!
//! The moment the staged anchors reached that ConfigMap is its `meshca.io/content-since`
//! annotation, written by meshca's bundle publisher when the content changes
//! (`[kubernetes.bundle] linkerd = true`, the control-plane namespace matching its selector).
//! The ConfigMap is read every [`REFRESH`]; pods come from the pod directory. A proxy counts as
//! holding the new anchors when its pod's `linkerd.io/trust-root-sha256` annotation (the SHA-256
//! of the anchors the injector gave it) is the SHA-256 of the ConfigMap's content: the injector
//! reads the ConfigMap through a volume the kubelet refreshes about a minute late, so a pod made
//! just after the change can still carry the old anchors. Only a pod without the annotation is
//! judged by time: made after that moment (a container restarted in an old pod keeps the old
//! value), and the count says how many were judged so.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams};
use rotator::ledger::{RestartBound, StaleWorkload};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::pods::Pods;
use super::publish::CONTENT_SINCE_ANNOTATION;
use crate::authority::RestartBoundSource;

/// Linkerd's trust-roots ConfigMap and its key.
pub const TRUST_ROOTS: (&str, &str) = ("linkerd-identity-trust-roots", "ca-bundle.crt");

/// How often the ConfigMap is read.
pub const REFRESH: Duration = Duration::from_secs(2);

/// What the ConfigMap held when last read.
#[derive(Debug, Clone)]
struct Roots {
    anchors: Vec<CertificateDer<'static>>,
    since: OffsetDateTime,
    /// SHA-256 (hex) of `ca-bundle.crt` as stored, and of it without surrounding whitespace:
    /// what the injector's `linkerd.io/trust-root-sha256` annotation carries.
    digests: Vec<String>,
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// A PodDisruptionBudget, as far as ordering restarts needs it.
#[derive(Debug, Clone)]
struct Budget {
    namespace: String,
    name: String,
    selector: LabelSelector,
    disruptions_allowed: i32,
}

/// Whether `sel` selects a pod labelled `labels` (an empty selector selects every pod, as a
/// policy/v1 PodDisruptionBudget's does).
fn selects(sel: &LabelSelector, labels: &[(String, String)]) -> bool {
    let get = |k: &str| labels.iter().find(|(l, _)| l == k).map(|(_, v)| v.as_str());
    let by_label = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| get(k) == Some(v.as_str()));
    let by_expr = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match (e.operator.as_str(), get(&e.key)) {
            ("In", Some(v)) => values.iter().any(|x| x == v),
            ("NotIn", v) => v.is_none_or(|v| !values.iter().any(|x| x == v)),
            ("Exists", v) => v.is_some(),
            ("DoesNotExist", v) => v.is_none(),
            _ => false,
        }
    });
    by_label && by_expr
}

/// Counts Linkerd proxies against the anchors in Linkerd's trust roots.
#[derive(Debug)]
pub struct LinkerdRoots {
    pods: Arc<Pods>,
    namespace: String,
    roots: RwLock<Result<Roots, String>>,
    budgets: RwLock<Vec<Budget>>,
}

impl LinkerdRoots {
    /// Counts the proxies in `pods` against `namespace`'s trust-roots ConfigMap.
    pub fn new(pods: Arc<Pods>, namespace: &str) -> Arc<Self> {
        Arc::new(Self {
            pods,
            namespace: namespace.to_owned(),
            roots: RwLock::new(Err(format!("{namespace}/{} not read yet", TRUST_ROOTS.0))),
            budgets: RwLock::default(),
        })
    }

    /// Reads the ConfigMap and the PodDisruptionBudgets every [`REFRESH`] until `stop`.
    pub async fn run(self: Arc<Self>, client: kube::Client, mut stop: watch::Receiver<bool>) {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        let pdbs: Api<PodDisruptionBudget> = Api::all(client);
        loop {
            let read = self.read(&api).await;
            *self.roots.write().unwrap_or_else(|p| p.into_inner()) = read;
            match pdbs.list(&ListParams::default()).await {
                Ok(l) => {
                    let b = l.items.iter().filter_map(|p| {
                        Some(Budget {
                            namespace: p.metadata.namespace.clone()?,
                            name: p.metadata.name.clone()?,
                            selector: p.spec.as_ref()?.selector.clone().unwrap_or_default(),
                            // No status yet: counted as allowing none.
                            disruptions_allowed: p
                                .status
                                .as_ref()
                                .and_then(|s| s.disruptions_allowed)
                                .unwrap_or(0),
                        })
                    });
                    *self.budgets.write().unwrap_or_else(|p| p.into_inner()) = b.collect();
                }
                Err(e) => {
                    tracing::warn!("listing PodDisruptionBudgets to order Linkerd restarts: {e}")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn read(&self, api: &Api<ConfigMap>) -> Result<Roots, String> {
        let what = format!("{}/{}", self.namespace, TRUST_ROOTS.0);
        let cm = api
            .get_opt(TRUST_ROOTS.0)
            .await
            .map_err(|e| format!("reading {what}: {e}"))?
            .ok_or_else(|| format!("no ConfigMap {what}"))?;
        let pem = cm
            .data
            .as_ref()
            .and_then(|d| d.get(TRUST_ROOTS.1))
            .ok_or_else(|| format!("{what} has no {}", TRUST_ROOTS.1))?;
        let anchors = rotator::client::parse_pem_certs(pem);
        if anchors.is_empty() {
            return Err(format!("{what}/{} holds no certificate", TRUST_ROOTS.1));
        }
        let since = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTENT_SINCE_ANNOTATION))
            .ok_or_else(|| {
                format!(
                    "{what} has no {CONTENT_SINCE_ANNOTATION} annotation (meshca did not write it), so when its anchors arrived is unknown"
                )
            })?;
        let since = OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("{what}: {CONTENT_SINCE_ANNOTATION} {since:?}: {e}"))?;
        let mut digests = vec![sha256_hex(pem), sha256_hex(pem.trim())];
        digests.dedup();
        Ok(Roots {
            anchors,
            since,
            digests,
        })
    }
}

impl RestartBoundSource for LinkerdRoots {
    fn count(&self, anchors: &[CertificateDer<'static>]) -> RestartBound {
        let unknown = |reason: String| RestartBound::Unknown { reason };
        // No proxy at all: nothing to wait for, whatever the ConfigMap says.
        let all = match self.pods.linkerd_proxies(None) {
            Ok(c) => c,
            Err(e) => return unknown(e),
        };
        if all.proxies == 0 {
            return RestartBound::Counted {
                proxies: 0,
                stale: 0,
                since: None,
                not_reached: None,
                workloads: Vec::new(),
                by_creation_time: 0,
            };
        }
        // A ConfigMap that cannot be read (or lacks meshca's annotation) is counted as not
        // reached: meshca publishes it, so until it is seen holding the anchors, no proxy can
        // have them. Only pods that cannot be listed leave the gate to time.
        let (current, not_reached) = match &*self.roots.read().unwrap_or_else(|p| p.into_inner()) {
            Ok(r) if anchors.iter().all(|a| r.anchors.contains(a)) => {
                (Some((r.since, r.digests.clone())), None)
            }
            Ok(_) => (
                None,
                Some(format!(
                    "{}/{} does not hold every anchor of the bundle yet",
                    self.namespace, TRUST_ROOTS.0
                )),
            ),
            Err(e) => (None, Some(e.clone())),
        };
        let since = current.as_ref().map(|(t, _)| *t);
        let count = match &current {
            Some((t, digests)) => match self
                .pods
                .linkerd_proxies(Some((t.unix_timestamp(), digests.as_slice())))
            {
                Ok(c) => c,
                Err(e) => return unknown(e),
            },
            None => all,
        };
        RestartBound::Counted {
            proxies: count.proxies,
            stale: count.stale,
            by_creation_time: count.by_creation_time,
            since,
            not_reached,
            workloads: {
                let budgets = self.budgets.read().unwrap_or_else(|p| p.into_inner());
                count
                    .stale_by_owner
                    .into_iter()
                    .map(|((namespace, owner), (n, labels))| {
                        let b = budgets
                            .iter()
                            .find(|b| b.namespace == namespace && selects(&b.selector, &labels));
                        StaleWorkload {
                            namespace,
                            owner,
                            stale_pods: n,
                            pdb: b.map(|b| b.name.clone()),
                            disruptions_allowed: b.map(|b| b.disruptions_allowed),
                        }
                    })
                    .collect()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn budgets_select_pods_by_labels_and_expressions() {
        let labels = vec![
            ("app".to_owned(), "web".to_owned()),
            ("tier".to_owned(), "a".to_owned()),
        ];
        let sel = |l: &[(&str, &str)], e: &[(&str, &str, &[&str])]| LabelSelector {
            match_labels: Some(l.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()),
            match_expressions: Some(
                e.iter()
                    .map(|(k, op, v)| LabelSelectorRequirement {
                        key: (*k).into(),
                        operator: (*op).into(),
                        values: Some(v.iter().map(|x| (*x).into()).collect()),
                    })
                    .collect(),
            ),
        };
        assert!(
            selects(&LabelSelector::default(), &labels),
            "empty selects all"
        );
        assert!(selects(&sel(&[("app", "web")], &[]), &labels));
        assert!(!selects(&sel(&[("app", "db")], &[]), &labels));
        assert!(selects(&sel(&[], &[("tier", "In", &["a", "b"])]), &labels));
        assert!(!selects(&sel(&[], &[("tier", "NotIn", &["a"])]), &labels));
        assert!(selects(
            &sel(&[], &[("zone", "DoesNotExist", &[])]),
            &labels
        ));
        assert!(!selects(&sel(&[], &[("zone", "Exists", &[])]), &labels));
        assert!(
            !selects(&sel(&[], &[("tier", "Gt", &["1"])]), &labels),
            "unknown operator"
        );
    }
}
