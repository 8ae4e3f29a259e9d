//! Node agents: a caller that asks for *another* workload's certificate.
//!
//! Istio's ambient mode runs one proxy per node, ztunnel, which asks the CA for the certificate
//! of every pod on its node: its own credential, a CSR carrying the workload's SPIFFE ID, and
//! the request metadata `ImpersonatedIdentity` naming that ID. meshca grants this only to
//!
//! - a Kubernetes ServiceAccount listed in `[istio] trusted_node_agents`, and then only for a
//!   workload that has a pod (not finished) with that ServiceAccount on the agent's own node,
//!   answered from a watch-backed [`PodDirectory`] (no API call per request). The agent's node
//!   is the one its token is bound to (TokenReview's `authentication.kubernetes.io/node-name`,
//!   or the node of its bound pod in the directory);
//! - a static token made with `meshca token add --node-agent --may-request PATTERN`, for the
//!   IDs matching its patterns (outside Kubernetes there is no node to check).
//!
//! Nobody else, however broad its own grant: a client certificate never, an ordinary token
//! never. A workload not (yet) seen on the node is waited for briefly (a pod scheduled a moment
//! ago), then refused with a retryable code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rotator::spiffe::SpiffeId;

use crate::issuing::auth::{AuthError, Caller, CallerKind, ServiceAccount};

/// Where pods run, as far as the directory knows. `Err` is a directory that cannot answer now
/// (not synced, or out of touch with the API server for too long), saying why.
pub trait PodDirectory: Send + Sync + std::fmt::Debug {
    /// The node pod `namespace/name` is on, if the directory knows the pod and it is scheduled —
    /// and, when `uid` is given, it is that pod (not another one given the same name since).
    fn node_of(
        &self,
        namespace: &str,
        pod: &str,
        uid: Option<&str>,
    ) -> Result<Option<String>, String>;
    /// Whether a pod of ServiceAccount `namespace/service_account` that has not finished
    /// (phase neither Succeeded nor Failed) is on `node`.
    fn on_node(&self, node: &str, namespace: &str, service_account: &str) -> Result<bool, String>;
    /// Resolves at the directory's first change after this call (not after the first poll: a
    /// caller that asks for it before checking misses no change in between).
    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A granted impersonation: who asked, from which node, for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// The agent's caller name (`k8s:istio-system/ztunnel`, `token:ztunnel`).
    pub agent: String,
    /// The agent's node (Kubernetes only).
    pub node: Option<String>,
}

impl Impersonation {
    /// `agent@node` (or the agent alone): the ledger's `via`, and the key of the node agent's
    /// issue budget — one budget per node, though every ztunnel shares one ServiceAccount.
    pub fn via(&self) -> String {
        match &self.node {
            Some(n) => format!("{}@{n}", self.agent),
            None => self.agent.clone(),
        }
    }
}

/// Decides who may act as a node agent for whom.
#[derive(Debug, Clone, Default)]
pub struct NodeAgents {
    /// `namespace/serviceaccount` of trusted node agents (`[istio] trusted_node_agents`).
    trusted: Vec<String>,
    /// Pods by node (Kubernetes mode with trusted agents).
    pods: Option<Arc<dyn PodDirectory>>,
    /// How long a workload not yet seen on the agent's node is waited for.
    wait: Duration,
}

impl NodeAgents {
    /// Agents `trusted` (`namespace/serviceaccount`), checked against `pods`; a workload not on
    /// the node is waited for up to `wait`.
    pub fn new(trusted: Vec<String>, pods: Option<Arc<dyn PodDirectory>>, wait: Duration) -> Self {
        Self {
            trusted,
            pods,
            wait,
        }
    }

    /// May one of `callers` request `workload`'s certificate on its behalf? The first caller
    /// that is a node agent decides.
    pub async fn authorize(
        &self,
        callers: &[Caller],
        workload: &SpiffeId,
    ) -> Result<Impersonation, AuthError> {
        for c in callers {
            match &c.kind {
                CallerKind::Token { may_request } if !may_request.is_empty() => {
                    if may_request.iter().any(|p| p.matches(workload)) {
                        return Ok(Impersonation {
                            agent: c.name.clone(),
                            node: None,
                        });
                    }
                    return Err(AuthError::ImpersonationDenied {
                        agent: c.name.clone(),
                        requested: workload.to_string(),
                        why: format!(
                            "its --may-request patterns are {}",
                            may_request
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                CallerKind::ServiceAccount(sa)
                    if self
                        .trusted
                        .contains(&format!("{}/{}", sa.namespace, sa.name)) =>
                {
                    return self.on_agents_node(c, sa, workload).await;
                }
                _ => {}
            }
        }
        Err(AuthError::NotANodeAgent {
            caller: callers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            requested: workload.to_string(),
            rule: format!(
                "node agents are the ServiceAccounts in [istio] trusted_node_agents ({}) and static tokens made with \
                 `meshca token add --node-agent --may-request PATTERN`; a client certificate never is one",
                if self.trusted.is_empty() {
                    "none set".to_owned()
                } else {
                    self.trusted.join(", ")
                }
            ),
        })
    }

    /// A trusted ServiceAccount agent: `workload` must have a pod on the agent's node.
    async fn on_agents_node(
        &self,
        agent: &Caller,
        sa: &ServiceAccount,
        workload: &SpiffeId,
    ) -> Result<Impersonation, AuthError> {
        let denied = |why: String| AuthError::ImpersonationDenied {
            agent: agent.name.clone(),
            requested: workload.to_string(),
            why,
        };
        let pending = |why: String| AuthError::ImpersonationPending {
            agent: agent.name.clone(),
            requested: workload.to_string(),
            why,
        };
        let Some((ns, wsa)) = workload.service_account() else {
            return Err(denied(
                "a node agent may request only Kubernetes workload identities (spiffe://<td>/ns/<namespace>/sa/<serviceaccount>)".into(),
            ));
        };
        let Some(pods) = &self.pods else {
            return Err(pending(
                "the pod directory is not running (Kubernetes mode is off)".into(),
            ));
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            // Before the checks, so that a change while they run is not missed.
            let next = pods.changed();
            // The node: from the token, else from the bound pod in the directory.
            let node = match (&sa.node, &sa.pod) {
                (Some(n), _) => Ok(Some(n.clone())),
                (None, Some(pod)) => pods.node_of(&sa.namespace, pod, sa.pod_uid.as_deref()),
                (None, None) => {
                    return Err(denied(
                        "its token is bound to no pod (no node-name or pod-name in the TokenReview answer): \
                         a node agent must send its pod's projected ServiceAccount token"
                            .into(),
                    ));
                }
            };
            let why = match node {
                Ok(Some(node)) => match pods.on_node(&node, ns, wsa) {
                    Ok(true) => {
                        return Ok(Impersonation {
                            agent: agent.name.clone(),
                            node: Some(node),
                        });
                    }
                    Ok(false) => {
                        format!("no running pod of ServiceAccount {ns}/{wsa} is on its node {node}")
                    }
                    Err(e) => e,
                },
                Ok(None) => format!(
                    "its own pod {}/{} is not scheduled on any node the pod directory knows",
                    sa.namespace,
                    sa.pod.as_deref().unwrap_or_default()
                ),
                Err(e) => e,
            };
            // Wait for the directory to change (a pod scheduled a moment ago), up to the
            // deadline; then refuse, retryably.
            if tokio::time::timeout_at(deadline, next).await.is_err() {
                return Err(pending(format!("{why} (waited {:?})", self.wait)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rotator::spiffe::IdPattern;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// A directory that never changes: pods as (namespace, name, node, serviceaccount).
    #[derive(Debug)]
    struct Fixed(Vec<(&'static str, &'static str, &'static str, &'static str)>);

    impl PodDirectory for Fixed {
        fn node_of(
            &self,
            namespace: &str,
            pod: &str,
            _uid: Option<&str>,
        ) -> Result<Option<String>, String> {
            Ok(self
                .0
                .iter()
                .find(|p| p.0 == namespace && p.1 == pod)
                .map(|p| p.2.to_owned()))
        }
        fn on_node(&self, node: &str, namespace: &str, sa: &str) -> Result<bool, String> {
            Ok(self
                .0
                .iter()
                .any(|p| p.2 == node && p.0 == namespace && p.3 == sa))
        }
        fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(std::future::pending())
        }
    }

    fn sa_caller(ns: &str, name: &str, node: Option<&str>, pod: Option<&str>) -> Caller {
        Caller {
            name: format!("k8s:{ns}/{name}"),
            allowed: vec![IdPattern::Exact(id(&format!(
                "spiffe://td/ns/{ns}/sa/{name}"
            )))],
            kind: CallerKind::ServiceAccount(ServiceAccount {
                namespace: ns.into(),
                name: name.into(),
                node: node.map(Into::into),
                pod: pod.map(Into::into),
                pod_uid: None,
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_declared_agents_for_workloads_on_their_node() {
        let pods = Arc::new(Fixed(vec![
            ("prod", "web-1", "node-a", "web"),
            ("prod", "api-1", "node-b", "api"),
            ("istio-system", "ztunnel-a", "node-a", "ztunnel"),
        ]));
        let agents = NodeAgents::new(
            vec!["istio-system/ztunnel".into()],
            Some(pods),
            Duration::from_secs(2),
        );
        let web = id("spiffe://td/ns/prod/sa/web");
        let api = id("spiffe://td/ns/prod/sa/api");
        // Node from the token, or from its bound pod.
        for z in [
            sa_caller("istio-system", "ztunnel", Some("node-a"), None),
            sa_caller("istio-system", "ztunnel", None, Some("ztunnel-a")),
        ] {
            let ok = agents
                .authorize(std::slice::from_ref(&z), &web)
                .await
                .unwrap();
            assert_eq!(ok.via(), "k8s:istio-system/ztunnel@node-a");
            let started = tokio::time::Instant::now();
            let e = agents.authorize(&[z], &api).await.unwrap_err();
            assert_eq!(e.reason(), "impersonation_pending", "{e}");
            assert!(e.to_string().contains("node-a"), "{e}");
            assert_eq!(
                started.elapsed(),
                Duration::from_secs(2),
                "waited, then refused"
            );
        }
        // Not trusted; no bound pod; not a Kubernetes identity.
        let e = agents
            .authorize(&[sa_caller("prod", "web", Some("node-a"), None)], &web)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "not_node_agent");
        assert!(e.to_string().contains("istio-system/ztunnel"), "{e}");
        let e = agents
            .authorize(&[sa_caller("istio-system", "ztunnel", None, None)], &web)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "impersonation_denied");
        let e = agents
            .authorize(
                &[sa_caller("istio-system", "ztunnel", Some("node-a"), None)],
                &id("spiffe://td/vm/web"),
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "impersonation_denied");
    }

    #[tokio::test]
    async fn static_tokens_are_agents_only_when_declared() {
        let agents = NodeAgents::default();
        let web = id("spiffe://td/ns/prod/sa/web");
        let broad = Caller {
            name: "token:admin".into(),
            allowed: vec!["spiffe://td/ns/prod/sa/*".parse().unwrap()],
            kind: CallerKind::Token {
                may_request: vec![],
            },
        };
        let cert = Caller {
            name: "mtls:spiffe://td/ns/prod/sa/web".into(),
            allowed: vec![IdPattern::Exact(web.clone())],
            kind: CallerKind::Certificate,
        };
        for c in [broad, cert] {
            let e = agents.authorize(&[c], &web).await.unwrap_err();
            assert_eq!(e.reason(), "not_node_agent", "{e}");
        }
        let agent = Caller {
            name: "token:ztunnel".into(),
            allowed: vec![],
            kind: CallerKind::Token {
                may_request: vec!["spiffe://td/ns/prod/sa/*".parse().unwrap()],
            },
        };
        assert_eq!(
            agents
                .authorize(std::slice::from_ref(&agent), &web)
                .await
                .unwrap()
                .via(),
            "token:ztunnel"
        );
        let e = agents
            .authorize(&[agent], &id("spiffe://td/ns/kube-system/sa/admin"))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "impersonation_denied");
    }
}
