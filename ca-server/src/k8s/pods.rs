//! Pods by node, from a list and a watch of every pod in the cluster: the
//! [`PodDirectory`] node-agent authorization asks (no API call per certificate request).
//!
//! Only what authorization needs is kept per pod (namespace, name, node, ServiceAccount, whether
//! it finished): ~200 bytes, so 10,000 pods are ~2 MiB. The list is read in pages of
//! [`PAGE`] so that a large cluster never arrives as one response. A watch that ends is resumed
//! from its last resourceVersion; one that fails (or a 410 Gone) starts over with a list.
//! While the directory is out of touch with the API server for more than `stale_after`, it
//! answers "cannot say" (requests fail `UNAVAILABLE`) rather than from an old picture.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use tokio::sync::watch;

use crate::issuing::impersonation::PodDirectory;

/// Pods per list page.
pub const PAGE: u32 = 500;

/// A pod: (namespace, name).
type PodKey = (Box<str>, Box<str>);
/// Where pods of one ServiceAccount run: (node, namespace, ServiceAccount).
type NodeAccount = (Box<str>, Box<str>, Box<str>);
/// A pod's labels.
pub type Labels = Vec<(String, String)>;
/// A workload: (namespace, owner).
pub type Workload = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Placed {
    node: Option<Box<str>>,
    /// The ServiceAccount it runs as, when one was set explicitly and it is not a mirror pod
    /// ([`identity_account`]); `None` grants nothing.
    service_account: Option<Box<str>>,
    /// Not Succeeded or Failed.
    running: bool,
    /// creationTimestamp, Unix seconds.
    created: i64,
    /// It runs a Linkerd proxy (injected: the `linkerd.io/proxy-version` annotation, or a
    /// container named `linkerd-proxy`).
    linkerd: bool,
    /// `Deployment/<name>`, `StatefulSet/<name>`, `DaemonSet/<name>`, `<Kind>/<name>` of its
    /// controller, or `Pod/<name>`.
    owner: Box<str>,
    /// Its labels, kept for Linkerd pods only (matched against PodDisruptionBudgets).
    labels: Box<[(Box<str>, Box<str>)]>,
    /// Linkerd pods: the injector's `linkerd.io/trust-root-sha256` annotation, the SHA-256 (hex)
    /// of the trust roots it put in the proxy's environment.
    trust_root: Option<Box<str>>,
    /// Its UID.
    uid: Option<Box<str>>,
}

/// The annotation Linkerd's proxy injector puts on every injected pod: the SHA-256 (lowercase
/// hex) of the trust anchors PEM it gave the proxy (`charts/partials/templates/_metadata.tpl`:
/// `identityTrustAnchorsPEM | sha256sum`).
pub const TRUST_ROOT_ANNOTATION: &str = "linkerd.io/trust-root-sha256";

/// The workload that owns a pod: its controller, a ReplicaSet read as its Deployment (the
/// ReplicaSet's name is the Deployment's plus `-<pod-template-hash>`).
fn owner_of(p: &Pod) -> String {
    let name = p.metadata.name.as_deref().unwrap_or_default();
    let Some(c) = p
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        return format!("Pod/{name}");
    };
    let hash = p
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (c.kind.as_str(), hash) {
        ("ReplicaSet", Some(h)) => match c.name.strip_suffix(&format!("-{h}")) {
            Some(d) => format!("Deployment/{d}"),
            None => format!("ReplicaSet/{}", c.name),
        },
        (kind, _) => format!("{kind}/{}", c.name),
    }
}

/// The annotation a kubelet puts on the mirror pod of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The ServiceAccount whose identity a pod's presence on a node lets a node agent request: the
/// one its spec names, never a default. A mirror pod (a static pod's API copy) has none and is
/// made by the node itself, in any namespace it likes: were it counted as `default`, whoever
/// holds a node's credentials could obtain `spiffe://<td>/ns/<any>/sa/default` through that
/// node's ztunnel. ServiceAccount admission fills `serviceAccountName` for every other pod, so an
/// empty one means a pod meshca cannot vouch for.
pub fn identity_account(p: &Pod) -> Option<&str> {
    let mirror = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    if mirror {
        return None;
    }
    p.spec
        .as_ref()?
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
}

impl Placed {
    fn of(p: &Pod) -> Option<(PodKey, Self)> {
        let (key, mut placed) = Self::without_labels(p)?;
        if placed.linkerd {
            placed.trust_root = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRUST_ROOT_ANNOTATION))
                .map(|v| v.trim().to_ascii_lowercase().into());
            placed.labels = p
                .metadata
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect();
        }
        Some((key, placed))
    }

    fn without_labels(p: &Pod) -> Option<(PodKey, Self)> {
        let ns = p.metadata.namespace.as_deref()?;
        let name = p.metadata.name.as_deref()?;
        let spec = p.spec.as_ref()?;
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        Some((
            (ns.into(), name.into()),
            Self {
                node: spec
                    .node_name
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .map(Into::into),
                service_account: identity_account(p).map(Into::into),
                running: !matches!(phase, Some("Succeeded" | "Failed")),
                created: p
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second()),
                linkerd: p
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key("linkerd.io/proxy-version"))
                    || spec
                        .containers
                        .iter()
                        .chain(spec.init_containers.iter().flatten())
                        .any(|c| c.name == "linkerd-proxy"),
                owner: owner_of(p).into(),
                labels: Box::default(),
                trust_root: None,
                uid: p.metadata.uid.as_deref().map(Into::into),
            },
        ))
    }
}

#[derive(Debug, Default)]
struct Index {
    pods: HashMap<PodKey, Placed>,
    /// (node, namespace, ServiceAccount) → pods there that have not finished.
    running: HashMap<NodeAccount, u32>,
    synced: bool,
    /// When the directory lost touch with the API server (`None`: in touch).
    lost_at: Option<Instant>,
    /// When the API server last said anything on the watch (an event or a bookmark).
    heard_at: Option<Instant>,
}

impl Index {
    fn count(&mut self, key: &PodKey, p: &Placed, delta: i64) {
        let (Some(node), Some(sa)) = (p.node.clone().filter(|_| p.running), &p.service_account)
        else {
            return;
        };
        let k = (node, key.0.clone(), sa.clone());
        let n = self.running.entry(k.clone()).or_default();
        *n = u32::try_from(i64::from(*n) + delta).unwrap_or(0);
        if *n == 0 {
            self.running.remove(&k);
        }
    }

    fn put(&mut self, key: PodKey, p: Option<Placed>) {
        if let Some(old) = self.pods.remove(&key) {
            self.count(&key, &old, -1);
        }
        if let Some(p) = p {
            self.count(&key, &p, 1);
            self.pods.insert(key, p);
        }
    }
}

/// A watch that hears nothing — no event, no bookmark — for this long is taken as hung: the API
/// server sends a bookmark about every minute to a watch that asks for them, so a silent minute
/// and a half means the connection is gone without a word (a partition, a dead load balancer).
/// The directory is then out of touch since the last time it heard anything (so it stops
/// answering at once when `pod_directory_max_staleness` is shorter), and lists again.
pub const WATCH_IDLE: Duration = Duration::from_secs(90);

/// Someone to tell when a pod is gone (deleted, or missing from a relist): its namespace, name
/// and UID (when known).
pub type GoneHook = Box<dyn Fn(&str, &str, Option<&str>) + Send + Sync>;

/// How the directory watches, and where it counts what went wrong.
#[derive(Debug, Clone)]
pub struct Watching {
    /// Each watch request's `timeoutSeconds` (the API server ends it then; it resumes from the
    /// last resourceVersion seen). 290 s by default.
    pub timeout: Duration,
    /// `meshca_pod_watch_stalls_total`: watches given up after `WATCH_IDLE` (90 s) of silence.
    pub stalls: prometheus_client::metrics::counter::Counter,
    /// `meshca_pod_watch_expired_total`: watches answered `410 Gone` (the resourceVersion they
    /// resumed from was compacted away), after which the directory lists again.
    pub expired: prometheus_client::metrics::counter::Counter,
}

impl Default for Watching {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(290),
            stalls: prometheus_client::metrics::counter::Counter::default(),
            expired: prometheus_client::metrics::counter::Counter::default(),
        }
    }
}

/// The directory. [`Pods::run`] keeps it current.
pub struct Pods {
    index: RwLock<Index>,
    changes: watch::Sender<u64>,
    stale_after: Duration,
    gone: RwLock<Vec<GoneHook>>,
    watching: Watching,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods")
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

impl Pods {
    /// An empty directory that answers "cannot say" until synced, and again when out of touch
    /// with the API server for longer than `stale_after`.
    pub fn new(stale_after: Duration) -> Arc<Self> {
        Self::watching(stale_after, Watching::default())
    }

    /// As [`Pods::new`], watching as `watching` says.
    pub fn watching(stale_after: Duration, watching: Watching) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(Index::default()),
            changes: watch::channel(0).0,
            stale_after,
            gone: RwLock::default(),
            watching,
        })
    }

    /// Calls `f(namespace, name)` for every pod that goes (a TokenReview cache drops answers for
    /// tokens bound to it).
    pub fn on_gone(&self, f: GoneHook) {
        self.gone.write().unwrap_or_else(|p| p.into_inner()).push(f);
    }

    /// Watches given up because they had been silent for `WATCH_IDLE` (90 s).
    pub fn watch_stalls(&self) -> u64 {
        self.watching.stalls.get()
    }

    /// Watches answered `410 Gone`, each followed by a list.
    pub fn watches_expired(&self) -> u64 {
        self.watching.expired.get()
    }

    /// A watch that ended in `410 Gone`: counted and said (at info: it is routine after etcd
    /// compacts, but an operator looking at a relist should find why).
    fn expired(&self, rv: &str, what: &dyn std::fmt::Display) {
        self.watching.expired.inc();
        tracing::info!(
            "the pod watch from resourceVersion {rv} expired ({what}): listing every pod again"
        );
    }

    fn tell_gone(&self, pods: &[(PodKey, Option<Box<str>>)]) {
        let hooks = self.gone.read().unwrap_or_else(|p| p.into_inner());
        for ((ns, name), uid) in pods {
            for h in hooks.iter() {
                h(ns, name, uid.as_deref());
            }
        }
    }

    /// Pods known.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn changed_now(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn usable(&self, ix: &Index) -> Result<(), String> {
        if !ix.synced {
            return Err("the pod directory has not listed the cluster's pods yet".into());
        }
        // Out of touch since it lost the watch, or since it last heard anything on a watch that
        // has been silent for longer than the API server's bookmarks allow.
        let silent = ix
            .heard_at
            .filter(|h| h.elapsed() > WATCH_IDLE)
            .filter(|_| ix.lost_at.is_none());
        match ix.lost_at.or(silent) {
            Some(t) if t.elapsed() > self.stale_after => Err(format!(
                "the pod directory has been out of touch with the API server for {}s (more than {}s)",
                t.elapsed().as_secs(),
                self.stale_after.as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// Lists every pod (in pages) and replaces the index; the resourceVersion to watch from.
    async fn relist(&self, api: &Api<Pod>) -> Result<String, kube::Error> {
        let mut fresh = Index::default();
        let mut lp = ListParams::default().limit(PAGE);
        let rv = loop {
            let page = api.list(&lp).await?;
            for p in &page.items {
                if let Some((k, v)) = Placed::of(p) {
                    fresh.put(k, Some(v));
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break page.metadata.resource_version.unwrap_or_default(),
            }
        };
        fresh.synced = true;
        fresh.heard_at = Some(Instant::now());
        let gone: Vec<(PodKey, Option<Box<str>>)> = {
            let mut ix = self.write();
            let gone = ix
                .pods
                .iter()
                .filter(|(k, _)| !fresh.pods.contains_key(*k))
                .map(|(k, p)| (k.clone(), p.uid.clone()))
                .collect();
            *ix = fresh;
            gone
        };
        self.tell_gone(&gone);
        self.changed_now();
        Ok(rv)
    }

    fn apply(&self, ev: &WatchEvent<Pod>) {
        let (p, gone) = match ev {
            WatchEvent::Added(p) | WatchEvent::Modified(p) => (p, false),
            WatchEvent::Deleted(p) => (p, true),
            _ => return,
        };
        let Some((k, v)) = Placed::of(p) else { return };
        let uid = v.uid.clone();
        self.write().put(k.clone(), (!gone).then_some(v));
        if gone {
            self.tell_gone(&[(k, uid)]);
        }
        self.changed_now();
    }

    fn heard(&self) {
        self.write().heard_at = Some(Instant::now());
    }

    fn lost_touch(&self) {
        let mut ix = self.write();
        // Out of touch since it last heard the API server (a silent watch) or from now.
        let since = ix
            .heard_at
            .filter(|h| h.elapsed() > WATCH_IDLE)
            .unwrap_or_else(Instant::now);
        ix.lost_at.get_or_insert(since);
    }

    /// Keeps the directory current until `shutdown`: list, then watch from there; a watch that
    /// fails starts over with a list after a pause (1 s, doubling to 30 s while it keeps failing).
    pub async fn run(self: Arc<Self>, client: kube::Client, mut shutdown: watch::Receiver<bool>) {
        let api: Api<Pod> = Api::all(client);
        let mut pause = Duration::from_secs(1);
        loop {
            match self.relist(&api).await {
                Ok(rv) => {
                    self.write().lost_at = None;
                    pause = Duration::from_secs(1);
                    if self.follow(&api, rv, &mut shutdown).await {
                        return;
                    }
                }
                Err(e) => tracing::warn!("listing pods for node-agent authorization: {e}"),
            }
            self.lost_touch();
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    /// Watches from `rv`, resuming where each watch ended; returns on a failure (`false`: list
    /// again) or at shutdown (`true`).
    async fn follow(
        &self,
        api: &Api<Pod>,
        mut rv: String,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        loop {
            // Bookmarks are on by default: the API server sends one about every minute.
            let secs = u32::try_from(self.watching.timeout.as_secs().max(1)).unwrap_or(290);
            let wp = WatchParams::default().timeout(secs);
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 410 => {
                    self.expired(&rv, &e);
                    return false;
                }
                Err(e) => {
                    tracing::warn!("watching pods: {e}; listing again");
                    return false;
                }
            };
            let mut stream = std::pin::pin!(stream);
            loop {
                let ev = tokio::select! {
                    ev = tokio::time::timeout(WATCH_IDLE, stream.next()) => match ev {
                        Ok(ev) => ev,
                        Err(_) => {
                            self.watching.stalls.inc();
                            tracing::warn!("the pod watch has been silent for {}s (no event, no bookmark): listing again", WATCH_IDLE.as_secs());
                            return false;
                        }
                    },
                    _ = shutdown.changed() => return true,
                };
                self.heard();
                match ev {
                    Some(Ok(WatchEvent::Error(e))) if e.code == 410 => {
                        self.expired(&rv, &e);
                        return false;
                    }
                    Some(Ok(WatchEvent::Error(e))) => {
                        tracing::debug!("pod watch ended: {e}; listing again");
                        return false;
                    }
                    Some(Ok(ev)) => {
                        if let Some(v) = match &ev {
                            WatchEvent::Added(p)
                            | WatchEvent::Modified(p)
                            | WatchEvent::Deleted(p) => p.metadata.resource_version.clone(),
                            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
                            WatchEvent::Error(_) => None,
                        } {
                            rv = v;
                        }
                        self.apply(&ev);
                    }
                    Some(Err(e)) => {
                        tracing::debug!("pod watch failed: {e}; listing again");
                        return false;
                    }
                    // Ended (its timeout): resume from the last resourceVersion seen.
                    None => break,
                }
            }
        }
    }
}

/// Linkerd proxies counted against the moment the current anchors reached their ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyCount {
    /// Proxies running.
    pub proxies: u64,
    /// Of which hold only older anchors.
    pub stale: u64,
    /// Of `proxies`, those judged by creation time (no trust-root annotation).
    pub by_creation_time: u64,
    /// Stale pods by (namespace, owner): how many, and the labels of one of them.
    pub stale_by_owner: std::collections::BTreeMap<Workload, (u64, Labels)>,
}

impl Pods {
    /// The running Linkerd proxies, and those among them that hold only older anchors. With
    /// `current` — the moment the current anchors reached the trust-roots ConfigMap (Unix
    /// seconds) and the SHA-256s (hex) its content is known by — a pod is current when its
    /// `linkerd.io/trust-root-sha256` annotation is one of them, or, without the annotation, when
    /// it was made after that moment (a pod made in the same second counts as stale: the API
    /// server's timestamps have one-second resolution). `None`: all of them are stale.
    ///
    /// The annotation decides because the injector reads the ConfigMap through a volume the
    /// kubelet refreshes about a minute late: a pod made just after the ConfigMap changed can
    /// still carry the old anchors.
    pub fn linkerd_proxies(&self, current: Option<(i64, &[String])>) -> Result<ProxyCount, String> {
        let ix = self.read();
        self.usable(&ix)?;
        let mut c = ProxyCount::default();
        for ((ns, _), p) in &ix.pods {
            if !(p.linkerd && p.running) {
                continue;
            }
            c.proxies += 1;
            let stale = match (current, p.trust_root.as_deref()) {
                (None, _) => true,
                (Some((_, digests)), Some(d)) => !digests.iter().any(|x| x == d),
                (Some((since, _)), None) => {
                    c.by_creation_time += 1;
                    p.created <= since
                }
            };
            if stale {
                c.stale += 1;
                let e = c
                    .stale_by_owner
                    .entry((ns.to_string(), p.owner.to_string()))
                    .or_insert_with(|| {
                        let labels = p.labels.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                        (0, labels.collect())
                    });
                e.0 += 1;
            }
        }
        Ok(c)
    }
}

impl PodDirectory for Pods {
    fn node_of(
        &self,
        namespace: &str,
        pod: &str,
        uid: Option<&str>,
    ) -> Result<Option<String>, String> {
        let ix = self.read();
        self.usable(&ix)?;
        Ok(ix
            .pods
            .get(&(namespace.into(), pod.into()))
            // A pod by that name but another UID is not the one the token is bound to.
            .filter(|p| match (uid, p.uid.as_deref()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .and_then(|p| p.node.as_deref().map(str::to_owned)))
    }

    fn on_node(&self, node: &str, namespace: &str, service_account: &str) -> Result<bool, String> {
        let ix = self.read();
        self.usable(&ix)?;
        Ok(ix
            .running
            .contains_key(&(node.into(), namespace.into(), service_account.into())))
    }

    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.changes.subscribe();
        Box::pin(async move {
            // The subscription sees only changes after this call.
            let _ = rx.changed().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: Option<&str>, sa: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"containers": [], "nodeName": node, "serviceAccountName": sa},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn the_index_follows_pods_being_scheduled_moved_finished_and_deleted() {
        let d = Pods::new(Duration::from_secs(30));
        let gone = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = gone.clone();
        d.on_gone(Box::new(move |ns, name, _| {
            g.lock().unwrap().push(format!("{ns}/{name}"));
        }));
        assert!(d.on_node("a", "prod", "web").is_err(), "not synced yet");
        d.write().synced = true;
        let ev = |e: WatchEvent<Pod>| d.apply(&e);
        ev(WatchEvent::Added(pod(
            "prod", "web-1", None, "web", "Pending",
        )));
        assert_eq!(d.on_node("a", "prod", "web"), Ok(false), "not scheduled");
        ev(WatchEvent::Modified(pod(
            "prod",
            "web-1",
            Some("a"),
            "web",
            "Pending",
        )));
        assert_eq!(
            d.on_node("a", "prod", "web"),
            Ok(true),
            "scheduled, starting"
        );
        ev(WatchEvent::Added(pod(
            "prod",
            "web-2",
            Some("a"),
            "web",
            "Running",
        )));
        ev(WatchEvent::Deleted(pod(
            "prod",
            "web-1",
            Some("a"),
            "web",
            "Running",
        )));
        assert_eq!(d.on_node("a", "prod", "web"), Ok(true), "web-2 still there");
        assert_eq!(*gone.lock().unwrap(), vec!["prod/web-1".to_owned()], "told");
        ev(WatchEvent::Modified(pod(
            "prod",
            "web-2",
            Some("a"),
            "web",
            "Succeeded",
        )));
        assert_eq!(d.on_node("a", "prod", "web"), Ok(false), "finished");
        ev(WatchEvent::Added(pod(
            "prod",
            "api-1",
            Some("b"),
            "api",
            "Running",
        )));
        assert_eq!(d.on_node("a", "prod", "api"), Ok(false));
        assert_eq!(d.node_of("prod", "api-1", None), Ok(Some("b".into())));
        // The test pods carry no UID: a token's UID cannot be compared, the name decides.
        assert_eq!(
            d.node_of("prod", "api-1", Some("uid-1")),
            Ok(Some("b".into()))
        );
        let mut again = pod("prod", "api-1", Some("c"), "api", "Running");
        again.metadata.uid = Some("uid-2".into());
        ev(WatchEvent::Modified(again));
        assert_eq!(
            d.node_of("prod", "api-1", Some("uid-1")),
            Ok(None),
            "another pod of the same name is not the token's"
        );
        assert_eq!(
            d.node_of("prod", "api-1", Some("uid-2")),
            Ok(Some("c".into()))
        );
        // Back as it was (on node b, no UID) for what follows.
        ev(WatchEvent::Modified(pod(
            "prod",
            "api-1",
            Some("b"),
            "api",
            "Running",
        )));
        assert_eq!(d.read().running.len(), 1, "no empty counts are kept");
        // A pod with no ServiceAccount, and a mirror pod naming one, grant nothing.
        let mut bare = pod("other", "static-1", Some("a"), "", "Running");
        bare.spec.as_mut().unwrap().service_account_name = None;
        ev(WatchEvent::Added(bare));
        assert_eq!(d.on_node("a", "other", "default"), Ok(false));
        assert_eq!(d.on_node("a", "other", ""), Ok(false));
        let mut mirror = pod("other", "static-2", Some("a"), "web", "Running");
        mirror.metadata.annotations = Some([(MIRROR_ANNOTATION.to_owned(), "h".to_owned())].into());
        ev(WatchEvent::Added(mirror));
        assert_eq!(d.on_node("a", "other", "web"), Ok(false));
        // A watch silent past WATCH_IDLE (no event, no bookmark) is out of touch from the last
        // time it heard anything: a quiet minute between bookmarks still answers, a hung watch
        // stops answering WATCH_IDLE after its last word (not at the client's read timeout).
        d.write().heard_at = Some(Instant::now() - Duration::from_secs(60));
        assert_eq!(d.on_node("b", "prod", "api"), Ok(true), "between bookmarks");
        d.write().heard_at = Some(Instant::now() - WATCH_IDLE - Duration::from_secs(1));
        assert!(
            d.on_node("b", "prod", "api")
                .unwrap_err()
                .contains("out of touch"),
            "a hung watch is bounded"
        );
        d.write().heard_at = Some(Instant::now());
        // Out of touch for longer than the bound: no answer.
        d.write().lost_at = Some(Instant::now() - Duration::from_secs(31));
        assert!(
            d.on_node("b", "prod", "api")
                .unwrap_err()
                .contains("out of touch")
        );
    }
}
