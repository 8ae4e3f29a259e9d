//! A real Kubernetes API server for the tests (issue #24): `etcd` and `kube-apiserver` built
//! from their Go modules by `tests/kube/build.sh` (cached under `target/kube/<version>/`) and
//! started on loopback, configured as a cluster is: ServiceAccount token signing (the
//! TokenRequest API mints real bound tokens), `Node,RBAC` authorization, NodeRestriction and the
//! default admission plugins, the PodCertificateRequest and ClusterTrustBundle APIs, and a
//! certificate authority for clients (an admin in `system:masters`, nodes as
//! `system:node:<name>`).
//!
//! One API server per test binary and version ([`Cluster::shared`]), a namespace per test. The
//! processes run under a `sh` that kills them when the test binary's end of a pipe closes, so
//! they stop with the binary however it ends (a panic, a failed assertion, a kill).
//!
//! There is no kubelet: pods are bound to a node by `spec.nodeName` and their phase set through
//! the status subresource; mirror pods are created with a node's own credential.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// The newest pinned release.
pub const NEWEST: &str = "v1.37.2";
/// The oldest pinned release (PodCertificateRequest in beta).
pub const OLDEST: &str = "v1.35.4";

/// The ServiceAccount token issuer the API server signs with.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running etcd and kube-apiserver.
pub struct Cluster {
    /// The release.
    pub version: &'static str,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// etcd's client URL, `http://127.0.0.1:<port>`.
    pub etcd_url: String,
    /// Where its files are (certificates, kubeconfigs, etcd's data).
    pub dir: PathBuf,
    ca_pem: String,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// Keeps the processes' watch pipes open (closing them stops the servers).
    procs: Mutex<Vec<Child>>,
    /// How long start-up took.
    pub started_in: Duration,
    counter: std::sync::atomic::AtomicU32,
}

static CLUSTERS: OnceLock<Mutex<BTreeMap<&'static str, &'static Cluster>>> = OnceLock::new();

impl Cluster {
    /// The API server of `version` this test binary shares, started (and built, on first use)
    /// now if needed. `None` on a laptop without Go, after printing why; in CI (`CI` set) a
    /// missing toolchain or a failed build fails the test.
    pub fn shared(version: &'static str) -> Option<&'static Cluster> {
        let all = CLUSTERS.get_or_init(|| Mutex::new(BTreeMap::new()));
        let mut all = all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = all.get(version) {
            return Some(c);
        }
        let bin = binaries(version)?;
        let c: &'static Cluster = Box::leak(Box::new(Cluster::start(version, &bin, &[])));
        all.insert(version, c);
        Some(c)
    }

    /// A cluster of `version` for one test alone (one that stops it), started now; `None` as
    /// for [`Cluster::shared`]. It stops when dropped, or when the test binary ends.
    pub fn private(version: &'static str) -> Option<Cluster> {
        Self::private_with(version, &[])
    }

    /// As [`Cluster::private`], the API server started with `extra` flags as well (for example
    /// `--watch-cache=false`, so that watches are served by etcd and see its compactions).
    pub fn private_with(version: &'static str, extra: &[&str]) -> Option<Cluster> {
        let bin = binaries(version)?;
        Some(Cluster::start(version, &bin, extra))
    }

    /// Starts a cluster, trying again (new ports, new files) when one does not become ready: a
    /// free port picked here may be taken by another process before the server binds it.
    fn start(version: &'static str, bin: &Path, extra: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(version, bin, extra) {
                Ok(c) => return c,
                Err(e) => {
                    eprintln!("cluster: {e}; starting again");
                    failures.push(e);
                }
            }
        }
        panic!(
            "kube-apiserver {version} did not start in 3 attempts:\n{}",
            failures.join("\n")
        );
    }

    fn try_start(version: &'static str, bin: &Path, extra: &[&str]) -> Result<Self, String> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let begin = Instant::now();
        let dir = std::env::temp_dir().join(format!(
            "meshca-kube-{version}-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let (ca, ca_pem) = new_ca();
        let serving = leaf(&ca, "kube-apiserver", &[], true);
        write(&dir.join("ca.pem"), &ca_pem);
        write(&dir.join("serving.pem"), &serving.0);
        write(&dir.join("serving.key"), &serving.1);
        let sa_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        write(&dir.join("sa.key"), &sa_key.serialize_pem());
        write(&dir.join("sa.pub"), &sa_key.public_key_pem());

        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = supervised(
            &bin.join("etcd"),
            &[
                "--data-dir".into(),
                dir.join("etcd").display().to_string(),
                "--listen-client-urls".into(),
                etcd_url.clone(),
                "--advertise-client-urls".into(),
                etcd_url.clone(),
                "--listen-peer-urls".into(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                peer_url.clone(),
                "--initial-cluster".into(),
                format!("default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level".into(),
                "error".into(),
            ],
            &dir.join("etcd.log"),
            None,
        );
        let mut args = apiserver_args(version, &dir, &etcd_url, api_port);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let apiserver = supervised(
            &bin.join("kube-apiserver"),
            &args,
            &dir.join("kube-apiserver.log"),
            Some(&dir),
        );
        let admin = leaf(&ca, "meshca-test-admin", &["system:masters"], false);
        let mut c = Self {
            version,
            url: format!("https://127.0.0.1:{api_port}"),
            etcd_url,
            dir,
            ca_pem,
            ca,
            procs: Mutex::new(vec![etcd, apiserver]),
            started_in: Duration::ZERO,
            counter: std::sync::atomic::AtomicU32::new(0),
        };
        c.write_kubeconfig("admin", &KubeUser::Cert(admin.0, admin.1));
        c.started_in = c.wait_ready(begin)?;
        eprintln!(
            "cluster: kube-apiserver {version} ready at {} in {:.1} s",
            c.url,
            c.started_in.as_secs_f64()
        );
        Ok(c)
    }

    /// Polls `/readyz` as the admin until it answers `ok` (at most 60 s), on a thread of its
    /// own (the caller may be inside a test's runtime); on failure, why, with the logs' tails.
    fn wait_ready(&self, begin: Instant) -> Result<Duration, String> {
        std::thread::scope(|s| {
            s.spawn(|| self.poll_ready(begin))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn poll_ready(&self, begin: Instant) -> Result<Duration, String> {
        let kubeconfig = self.dir.join("admin.kubeconfig");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            loop {
                if let Ok(c) = client_from(&kubeconfig).await {
                    let req = http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("request");
                    if let Ok(t) = c.request_text(req).await
                        && t.trim() == "ok"
                    {
                        return Ok(begin.elapsed());
                    }
                }
                if begin.elapsed() > Duration::from_secs(60) {
                    let tail = |f: &str| {
                        let t = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                        let lines: Vec<&str> = t.lines().collect();
                        lines[lines.len().saturating_sub(8)..].join("\n")
                    };
                    return Err(format!(
                        "kube-apiserver {} not ready after 60 s\n--- kube-apiserver.log\n{}\n--- etcd.log\n{}",
                        self.version,
                        tail("kube-apiserver.log"),
                        tail("etcd.log")
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// A client acting as the cluster admin (`system:masters`).
    pub async fn admin(&self) -> kube::Client {
        client_from(&self.dir.join("admin.kubeconfig"))
            .await
            .expect("admin client")
    }

    /// A client acting as node `name` (`system:node:<name>` in `system:nodes`), as a kubelet.
    pub async fn node_client(&self, name: &str) -> kube::Client {
        let (crt, key) = leaf(
            &self.ca,
            &format!("system:node:{name}"),
            &["system:nodes"],
            false,
        );
        let path = self.write_kubeconfig(&format!("node-{name}"), &KubeUser::Cert(crt, key));
        client_from(&path).await.expect("node client")
    }

    /// A kubeconfig that authenticates with the token in `token_file` (re-read as it changes):
    /// what meshca is given to run as its ServiceAccount.
    pub fn token_kubeconfig(&self, name: &str, token_file: &Path) -> PathBuf {
        self.write_kubeconfig(name, &KubeUser::TokenFile(token_file.to_owned()))
    }

    fn write_kubeconfig(&self, name: &str, user: &KubeUser) -> PathBuf {
        let b64 = |s: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(s)
        };
        let user = match user {
            KubeUser::Cert(crt, key) => json!({
                "client-certificate-data": b64(crt),
                "client-key-data": b64(key),
            }),
            KubeUser::TokenFile(p) => json!({ "tokenFile": p.display().to_string() }),
        };
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url,
                "certificate-authority-data": b64(&self.ca_pem),
            }}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
            "current-context": name,
        });
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write(&path, &doc.to_string());
        path
    }

    /// A new namespace for one test (`<prefix>-<n>`), with its `default` ServiceAccount (no
    /// controller-manager runs to create it, and ServiceAccount admission needs it).
    pub async fn namespace(&self, client: &kube::Client, prefix: &str) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        self.namespace_named(client, &name, BTreeMap::new()).await;
        name
    }

    /// Namespace `name` with `labels` (and its `default` ServiceAccount).
    pub async fn namespace_named(
        &self,
        client: &kube::Client,
        name: &str,
        labels: BTreeMap<String, String>,
    ) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        self.service_account(client, name, "default").await;
    }

    /// ServiceAccount `ns/name`.
    pub async fn service_account(&self, client: &kube::Client, ns: &str, name: &str) {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create ServiceAccount {ns}/{name}: {e}"),
        }
    }

    /// Node `name` (created by the admin; it is never Ready: there is no kubelet).
    pub async fn node(&self, client: &kube::Client, name: &str) {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        match Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create Node {name}: {e}"),
        }
    }

    /// Pod `ns/name` bound to `node`, running as ServiceAccount `sa` (`None`: what admission
    /// fills in), its phase set to Running through the status subresource.
    pub async fn pod(
        &self,
        client: &kube::Client,
        ns: &str,
        name: &str,
        sa: Option<&str>,
        node: &str,
    ) -> Pod {
        let mut spec = json!({
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        });
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        self.create_pod(
            client,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            }),
        )
        .await
    }

    /// Creates the pod `doc` describes (a JSON Pod with its namespace) and sets it Running.
    pub async fn create_pod(&self, client: &kube::Client, doc: serde_json::Value) -> Pod {
        let pod: Pod = serde_json::from_value(doc).expect("a pod");
        let ns = pod.metadata.namespace.clone().expect("a namespace");
        let name = pod.metadata.name.clone().expect("a name");
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        api.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create Pod {ns}/{name}: {e}"));
        set_running(&api, &name).await
    }

    /// A mirror pod `ns/name` on `node`, created with the node's own credential (as a kubelet
    /// does for a static pod): annotated `kubernetes.io/config.mirror`, owned by the Node, and
    /// with no ServiceAccount (NodeRestriction refuses one).
    pub async fn mirror_pod(&self, ns: &str, name: &str, node: &str) -> Result<Pod, kube::Error> {
        let admin = self.admin().await;
        let node_obj = Api::<Node>::all(admin).get(node).await?;
        let client = self.node_client(node).await;
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns,
                "annotations": {
                    "kubernetes.io/config.mirror": "mirror-hash",
                    "kubernetes.io/config.source": "file",
                },
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": node,
                    "uid": node_obj.metadata.uid, "controller": true,
                }],
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "registry.invalid/static:1"}],
            },
        }))
        .expect("a pod");
        let api = Api::<Pod>::namespaced(client, ns);
        api.create(&PostParams::default(), &pod).await?;
        Ok(set_running(&api, name).await)
    }

    /// A token for ServiceAccount `ns/sa` from the TokenRequest API: `audiences`, `seconds` of
    /// life (the API server's minimum is 600), bound to `pod` if given.
    pub async fn token(
        &self,
        client: &kube::Client,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        seconds: i64,
        pod: Option<&Pod>,
    ) -> String {
        let mut spec = json!({"audiences": audiences, "expirationSeconds": seconds});
        if let Some(p) = pod {
            spec["boundObjectRef"] = json!({
                "apiVersion": "v1", "kind": "Pod",
                "name": p.metadata.name, "uid": p.metadata.uid,
            });
        }
        let req: TokenRequest =
            serde_json::from_value(json!({"spec": spec})).expect("a TokenRequest");
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"))
            .status
            .and_then(|s| s.token)
            .expect("a token in the TokenRequest status")
    }

    /// A ServiceAccount token for `ns/sa` signed with this cluster's own signing key exactly as
    /// the TokenRequest API signs one (ES256, its key id, its claims) but expiring
    /// `expires_in` seconds from now, which may be in the past: TokenRequest will not mint one
    /// shorter than 600 s.
    pub async fn signed_token(
        &self,
        client: &kube::Client,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        expires_in: i64,
    ) -> String {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let account = Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get(sa)
            .await
            .unwrap_or_else(|e| panic!("ServiceAccount {ns}/{sa}: {e}"));
        let spki = pem::parse(std::fs::read(self.dir.join("sa.pub")).expect("sa.pub"))
            .expect("the signing key's public half");
        let kid = b64(ring::digest::digest(&ring::digest::SHA256, spki.contents()).as_ref());
        let key = pem::parse(std::fs::read(self.dir.join("sa.key")).expect("sa.key"))
            .expect("the signing key");
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            key.contents(),
            &rng,
        )
        .expect("a P-256 key");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let iat = now.min(now + expires_in) - 600;
        let claims = json!({
            "aud": audiences,
            "exp": now + expires_in,
            "iat": iat,
            "nbf": iat,
            "iss": ISSUER,
            "jti": format!("meshca-test-{}", self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": account.metadata.uid},
            },
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        });
        let header = json!({"alg": "ES256", "kid": kid});
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = signer
            .sign(&rng, signing_input.as_bytes())
            .expect("a signature");
        format!("{signing_input}.{}", b64(sig.as_ref()))
    }

    /// What the API server's TokenReview says of `token` for `audiences`: (authenticated,
    /// username or error).
    pub async fn review(
        &self,
        client: &kube::Client,
        token: &str,
        audiences: &[&str],
    ) -> (bool, String) {
        use k8s_openapi::api::authentication::v1::TokenReview;
        let tr: TokenReview =
            serde_json::from_value(json!({"spec": {"token": token, "audiences": audiences}}))
                .expect("a TokenReview");
        let st = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &tr)
            .await
            .expect("TokenReview")
            .status
            .unwrap_or_default();
        let ok = st.authenticated.unwrap_or(false);
        let who = if ok {
            st.user.and_then(|u| u.username).unwrap_or_default()
        } else {
            st.error.unwrap_or_default()
        };
        (ok, who)
    }

    /// Applies the RBAC objects `kubectl kustomize <dir>` renders (a `deploy/kubernetes`
    /// directory) for a meshca whose namespace is `ns` instead of `meshca`: Roles and
    /// RoleBindings in `meshca` move to `ns` (those in another namespace to what `elsewhere`
    /// maps it to), cluster-scoped names get `ns` as a prefix (tests share one API server),
    /// subjects name `ns`. `skip` leaves out the rules of one object (`Kind/name`, as rendered)
    /// to show a grant is needed. Returns the objects applied.
    pub async fn apply_rbac(
        &self,
        client: &kube::Client,
        dir: &str,
        ns: &str,
        elsewhere: &[(&str, &str)],
        skip: Option<&str>,
    ) -> Vec<String> {
        let docs = crate::render(dir).expect("kubectl renders deploy/kubernetes");
        self.apply_rbac_docs(client, docs, ns, elsewhere, skip)
            .await
    }

    /// As [`Cluster::apply_rbac`], with the objects given (rendered by helm, say).
    pub async fn apply_rbac_docs(
        &self,
        client: &kube::Client,
        docs: Vec<serde_json::Value>,
        ns: &str,
        elsewhere: &[(&str, &str)],
        skip: Option<&str>,
    ) -> Vec<String> {
        let mut applied = Vec::new();
        for mut d in docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_owned();
            if !matches!(
                kind.as_str(),
                "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            ) {
                continue;
            }
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if skip == Some(format!("{kind}/{name}").as_str()) {
                d["rules"] = json!([]);
            }
            let target = match d["metadata"]["namespace"].as_str() {
                Some(n) if n != "meshca" => elsewhere
                    .iter()
                    .find(|(from, _)| *from == n)
                    .map_or(n, |(_, to)| *to)
                    .to_owned(),
                _ => ns.to_owned(),
            };
            rebase(&mut d, ns, &target);
            let ar = kube::discovery::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", &kind),
                &format!("{}s", kind.to_lowercase()),
            );
            let obj: kube::api::DynamicObject = serde_json::from_value(d).expect("RBAC object");
            let api: Api<kube::api::DynamicObject> = if kind.starts_with("Cluster") {
                Api::all_with(client.clone(), &ar)
            } else {
                Api::namespaced_with(client.clone(), &target, &ar)
            };
            let name = obj.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("meshca-tests").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
            applied.push(format!("{kind}/{name}"));
        }
        applied
    }

    /// Namespace `ns` with `labels`, created unless it exists (shared clusters: another test may
    /// have made it).
    async fn ensure_namespace(
        &self,
        admin: &kube::Client,
        ns: &str,
        labels: BTreeMap<String, String>,
    ) {
        let namespaces = Api::<Namespace>::all(admin.clone());
        if namespaces.get_opt(ns).await.ok().flatten().is_none() {
            self.namespace_named(admin, ns, labels).await;
        }
    }

    /// Applies every object in `docs` with a server-side dry run (each is validated and admitted
    /// as it would be, nothing is stored); `PrometheusRule` and `ServiceMonitor` (CRDs this API
    /// server does not have) are skipped. Objects without a namespace go to `meshca`; the
    /// namespaces they name are created for real first (a dry-run object needs its namespace).
    /// Returns `Kind/name` of each admitted; panics naming `label` and the object refused.
    pub async fn dry_run_apply(
        &self,
        admin: &kube::Client,
        docs: Vec<serde_json::Value>,
        label: &str,
    ) -> Vec<String> {
        use kube::api::{DynamicObject, GroupVersionKind};
        let discovery = kube::Discovery::new(admin.clone())
            .run()
            .await
            .expect("API discovery");
        let mut namespaces: std::collections::BTreeSet<&str> = docs
            .iter()
            .filter_map(|d| d["metadata"]["namespace"].as_str())
            .collect();
        namespaces.insert("meshca");
        for ns in namespaces {
            self.ensure_namespace(admin, ns, BTreeMap::new()).await;
        }
        let mut admitted = Vec::new();
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_owned();
            let api_version = d["apiVersion"].as_str().unwrap_or_default();
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let gvk = GroupVersionKind::gvk(group, version, &kind);
            let Some((ar, caps)) = discovery.resolve_gvk(&gvk) else {
                assert!(
                    matches!(kind.as_str(), "PrometheusRule" | "ServiceMonitor"),
                    "{label}: the API server does not serve {gvk:?}"
                );
                continue;
            };
            let obj: DynamicObject = serde_json::from_value(d.clone()).expect("an object");
            let name = obj.metadata.name.clone().unwrap_or_default();
            let api: Api<DynamicObject> = match caps.scope {
                kube::discovery::Scope::Cluster => Api::all_with(admin.clone(), &ar),
                kube::discovery::Scope::Namespaced => Api::namespaced_with(
                    admin.clone(),
                    obj.metadata.namespace.as_deref().unwrap_or("meshca"),
                    &ar,
                ),
            };
            let pp = PatchParams::apply("meshca-tests").force().dry_run();
            api.patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap_or_else(|e| {
                    panic!("{label}: {kind}/{name} refused by the API server: {e}")
                });
            admitted.push(format!("{kind}/{name}"));
        }
        eprintln!(
            "{label}: {} objects admitted (dry run): {}",
            admitted.len(),
            admitted.join(", ")
        );
        admitted
    }

    /// The pod of the Deployment among `docs`, as a pod, created with a dry run in a namespace
    /// that enforces Pod Security `restricted` (admission enforces on pods, not Deployments):
    /// the API server's refusal, naming `label`, if it violates the profile.
    pub async fn admit_pod_restricted(
        &self,
        admin: &kube::Client,
        docs: &[serde_json::Value],
        label: &str,
    ) -> Result<(), String> {
        let psa = "meshca-psa-restricted";
        let enforce = "pod-security.kubernetes.io/enforce".to_owned();
        self.ensure_namespace(admin, psa, [(enforce, "restricted".to_owned())].into())
            .await;
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap_or_else(|| panic!("{label}: no Deployment"));
        let mut spec = deployment["spec"]["template"]["spec"].clone();
        spec["serviceAccountName"] = json!("default");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "meshca-psa", "namespace": psa},
            "spec": spec,
        }))
        .expect("a pod");
        let pp = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        Api::<Pod>::namespaced(admin.clone(), psa)
            .create(&pp, &pod)
            .await
            .map(|_| ())
            .map_err(|e| format!("{label}: the pod violates Pod Security `restricted`: {e}"))
    }

    /// Compacts etcd at its current revision, as the API server does every five minutes (and
    /// etcd's own auto-compaction would): every older resourceVersion is gone, so a watch from
    /// one is answered `410 Gone` (when watches reach etcd: `--watch-cache=false`). Through
    /// etcd's JSON gateway; returns the revision compacted at.
    pub async fn compact_etcd(&self) -> u64 {
        let range = etcd_post(&self.etcd_url, "/v3/kv/range", r#"{"key":"AA=="}"#).await;
        let rev: u64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("etcd's revision in {range}"));
        let body = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        let done = etcd_post(&self.etcd_url, "/v3/kv/compaction", &body).await;
        assert!(done.get("header").is_some(), "etcd compaction: {done}");
        rev
    }

    /// etcd's and kube-apiserver's logs, for a failing test's message.
    pub fn logs_at(&self) -> String {
        self.dir.display().to_string()
    }

    /// Stops the API server and etcd (a test that needs an unreachable API server uses its own
    /// cluster, [`Cluster::private`]): closes each supervisor's pipe, so that it kills its server
    /// (a killed supervisor would leave its server running), API server first, and waits.
    pub fn stop(&self) {
        let mut procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in procs.iter_mut().rev() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

enum KubeUser {
    Cert(String, String),
    TokenFile(PathBuf),
}

/// Moves a rendered RBAC object for a meshca in `ns`: a namespaced one to `target`.
fn rebase(d: &mut serde_json::Value, ns: &str, target: &str) {
    let kind = d["kind"].as_str().unwrap_or_default().to_owned();
    let meta = &mut d["metadata"];
    if kind.starts_with("Cluster") {
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        meta["name"] = json!(format!("{ns}-{name}"));
    } else {
        meta["namespace"] = json!(target);
    }
    if kind.ends_with("Binding") {
        let r = d["roleRef"]["name"].as_str().unwrap_or_default().to_owned();
        // Built-in roles (`system:…`) keep their names; the rendered ones get the prefix.
        if d["roleRef"]["kind"] == "ClusterRole" && !r.starts_with("system:") {
            d["roleRef"]["name"] = json!(format!("{ns}-{r}"));
        }
        if let Some(subjects) = d["subjects"].as_array_mut() {
            for s in subjects {
                if s["namespace"] == "meshca" {
                    s["namespace"] = json!(ns);
                }
            }
        }
    }
}

/// POSTs `body` to etcd's JSON gateway at `base` + `path` (plain HTTP/1.1 on loopback) and
/// returns the JSON it answers.
async fn etcd_post(base: &str, path: &str, body: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("etcd at {host}: {e}"));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("etcd request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("etcd answer");
    let json = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked answer: the JSON object is between the first `{` and the last `}`.
    let json = json
        .find('{')
        .zip(json.rfind('}'))
        .map_or("", |(a, b)| &json[a..=b]);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd answered {out:?}: {e}"))
}

async fn set_running(api: &Api<Pod>, name: &str) -> Pod {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap_or_else(|e| panic!("set Pod {name} Running: {e}"))
}

/// kube-apiserver's flags, configured as a cluster is (see the module's docs).
fn apiserver_args(version: &str, dir: &Path, etcd_url: &str, api_port: u16) -> Vec<String> {
    let mut args = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        format!("--cert-dir={}", dir.join("certs").display()),
        format!("--tls-cert-file={}", dir.join("serving.pem").display()),
        format!(
            "--tls-private-key-file={}",
            dir.join("serving.key").display()
        ),
        format!("--client-ca-file={}", dir.join("ca.pem").display()),
        format!("--service-account-issuer={ISSUER}"),
        format!(
            "--service-account-key-file={}",
            dir.join("sa.pub").display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            dir.join("sa.key").display()
        ),
        format!("--api-audiences={ISSUER}"),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--service-cluster-ip-range=10.96.0.0/24".into(),
        "--endpoint-reconciler-type=none".into(),
        "--enable-priority-and-fairness=false".into(),
        "--profiling=false".into(),
        "--v=0".into(),
    ];
    // PodCertificateRequest (KEP-4317) and ClusterTrustBundle (KEP-3257): beta behind their
    // gates on 1.35; v1 on 1.37.
    match version {
        OLDEST => {
            args.push("--feature-gates=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true".into());
            args.push("--runtime-config=certificates.k8s.io/v1beta1/podcertificaterequests=true,certificates.k8s.io/v1beta1/clustertrustbundles=true".into());
        }
        _ => {
            args.push("--runtime-config=certificates.k8s.io/v1beta1=true".into());
        }
    }
    args
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<kube::Client, String> {
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let c = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(c).map_err(|e| e.to_string())
}

/// The directory holding `etcd` and `kube-apiserver` of `version`, built by
/// `tests/kube/build.sh` if not yet cached.
fn binaries(version: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("MESHCA_KUBE_CACHE")
        .map_or_else(|| root.join("target/kube"), PathBuf::from)
        .join(version);
    if dir.join("kube-apiserver").exists() && dir.join("etcd").exists() {
        return Some(dir);
    }
    let ci = std::env::var_os("CI").is_some();
    if crate::require_tool("go").is_none() {
        assert!(
            !ci,
            "CI: Go is needed to build kube-apiserver {version} (tests/kube/build.sh)"
        );
        eprintln!(
            "skipped: no Go toolchain to build kube-apiserver {version} (tests/kube/build.sh)"
        );
        return None;
    }
    eprintln!("building kube-apiserver and etcd {version} (tests/kube/build.sh; cached after)");
    let status = Command::new("bash")
        .arg(root.join("tests/kube/build.sh"))
        .arg(version)
        .status()
        .expect("run tests/kube/build.sh");
    assert!(status.success(), "tests/kube/build.sh {version} failed");
    Some(dir)
}

/// Starts `bin args` under a `sh` that kills it once its stdin (a pipe this process holds for
/// as long as it lives) reaches end of file, then removes `cleanup` (the cluster's files; the
/// API server is started last and so stopped last).
fn supervised(bin: &Path, args: &[String], log: &Path, cleanup: Option<&Path>) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new("sh")
        .arg("-c")
        .arg(
            r#""$@" </dev/null & p=$!; cat >/dev/null; kill -9 $p 2>/dev/null; wait $p
               sleep 1; [ -n "$MESHCA_CLUSTER_DIR" ] && rm -rf "$MESHCA_CLUSTER_DIR""#,
        )
        .env(
            "MESHCA_CLUSTER_DIR",
            cleanup.map(|d| d.display().to_string()).unwrap_or_default(),
        )
        .arg("sh")
        .arg(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn new_ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "meshca test cluster CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).expect("CA");
    (rcgen::Issuer::new(p, key), cert.pem())
}

/// A certificate from the cluster CA: a serving one for 127.0.0.1 and localhost, or a client
/// one for user `cn` in `groups` (organizations). Returns (certificate PEM, key PEM).
fn leaf(
    ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
    cn: &str,
    groups: &[&str],
    serving: bool,
) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    for g in groups {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, *g);
    }
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    if serving {
        p.subject_alt_names = vec![
            rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            rcgen::SanType::DnsName("localhost".try_into().expect("a DNS name")),
        ];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = p.signed_by(&key, ca).expect("a certificate");
    (cert.pem(), key.serialize_pem())
}

/// What one real-server test gets: the shared cluster, an admin client, meshca's namespace (with its
/// ServiceAccount and the deploy RBAC moved there) and the kubeconfig meshca runs with.
pub struct Env {
    /// The shared cluster.
    pub cluster: &'static Cluster,
    /// An admin client.
    pub admin: kube::Client,
    /// meshca's namespace.
    pub ns: String,
    /// The kubeconfig meshca runs with (its ServiceAccount's token).
    pub kubeconfig: PathBuf,
    /// (namespace in the manifests, namespace here) for namespaces other than meshca's.
    pub elsewhere: Vec<(String, String)>,
    _token_dir: tempfile::TempDir,
}

/// `version`'s shared cluster with a fresh namespace for meshca, its ServiceAccount and the
/// deploy RBAC (less `skip_rule`, see [`Cluster::apply_rbac`]); `None` when the cluster cannot
/// run here (see [`Cluster::shared`]).
pub async fn env(version: &'static str, skip_rule: Option<&str>) -> Option<Env> {
    env_in(version, "deploy/kubernetes", &[], skip_rule).await
}

/// As [`env()`], with the RBAC `dir` renders (an overlay); each namespace in `others` (as the
/// overlay names it, e.g. `linkerd`) is created as `<ns>-<name>` and its Roles go there
/// ([`Env::elsewhere`]).
pub async fn env_in(
    version: &'static str,
    dir: &str,
    others: &[&str],
    skip_rule: Option<&str>,
) -> Option<Env> {
    let cluster = Cluster::shared(version)?;
    Some(env_on(cluster, dir, others, skip_rule).await)
}

/// As [`env_in`], on a cluster of this test's own ([`Cluster::private`], kept until the test
/// binary ends): for tests whose cluster-wide objects (a signer's requests, its
/// ClusterTrustBundle) must not meet another test's meshca.
pub async fn env_private(
    version: &'static str,
    dir: &str,
    others: &[&str],
    skip_rule: Option<&str>,
) -> Option<Env> {
    let cluster: &'static Cluster = Box::leak(Box::new(Cluster::private(version)?));
    Some(env_on(cluster, dir, others, skip_rule).await)
}

async fn env_on(
    cluster: &'static Cluster,
    dir: &str,
    others: &[&str],
    skip_rule: Option<&str>,
) -> Env {
    let docs = crate::render(dir).expect("kubectl renders deploy/kubernetes");
    env_on_docs(cluster, docs, others, skip_rule).await
}

/// As [`env()`], with the RBAC among `docs` (the Helm chart's rendering, say).
pub async fn env_with(
    version: &'static str,
    docs: Vec<serde_json::Value>,
    others: &[&str],
) -> Option<Env> {
    let cluster = Cluster::shared(version)?;
    Some(env_on_docs(cluster, docs, others, None).await)
}

async fn env_on_docs(
    cluster: &'static Cluster,
    docs: Vec<serde_json::Value>,
    others: &[&str],
    skip_rule: Option<&str>,
) -> Env {
    let admin = cluster.admin().await;
    let ns = cluster.namespace(&admin, "meshca").await;
    cluster.service_account(&admin, &ns, "meshca").await;
    let mut elsewhere = Vec::new();
    for o in others {
        let name = format!("{ns}-{o}");
        cluster
            .namespace_named(&admin, &name, BTreeMap::new())
            .await;
        elsewhere.push(((*o).to_owned(), name));
    }
    let map: Vec<(&str, &str)> = elsewhere
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let applied = cluster
        .apply_rbac_docs(&admin, docs, &ns, &map, skip_rule)
        .await;
    assert!(applied.len() >= 6, "the deploy RBAC: {applied:?}");
    // meshca's own token, as a projected ServiceAccount token volume gives it (audience: the
    // API server).
    let token = cluster
        .token(&admin, &ns, "meshca", &[ISSUER], 3600, None)
        .await;
    let tdir = tempfile::tempdir().expect("a temp dir");
    let file = tdir.path().join("token");
    std::fs::write(&file, token).expect("token file");
    let kubeconfig = cluster.token_kubeconfig(&format!("{ns}-meshca"), &file);
    Env {
        cluster,
        admin,
        ns,
        kubeconfig,
        elsewhere,
        _token_dir: tdir,
    }
}

impl Env {
    /// The namespace standing in for `name` (a namespace the overlay names), see [`env_in`].
    pub fn other(&self, name: &str) -> &str {
        self.elsewhere.iter().find(|(a, _)| a == name).map_or_else(
            || panic!("no namespace {name} in this env"),
            |(_, b)| b.as_str(),
        )
    }
}

/// A meshca in Kubernetes mode as `e`'s ServiceAccount: TokenReview, state in the state dir.
pub fn kube_mode(e: &Env, c: &mut ca_server::config::Config) {
    kube_mode_as(&e.kubeconfig, &e.ns, c);
}

/// As [`kube_mode`], with this kubeconfig and namespace.
pub fn kube_mode_as(kubeconfig: &Path, ns: &str, c: &mut ca_server::config::Config) {
    c.kubernetes.enabled = true;
    c.kubernetes.kubeconfig = kubeconfig.display().to_string();
    c.kubernetes.namespace = ns.to_owned();
    c.kubernetes.state_secret.clear();
    c.auth.authenticators = vec![
        ca_server::config::AuthMethod::Mtls,
        ca_server::config::AuthMethod::Tokenreview,
        ca_server::config::AuthMethod::Static,
    ];
}

/// Asks `srv` for `id` (meshca.v1 over gRPC/TLS) with the bearer `token`: the SPIFFE ID signed,
/// or the refusal's code and message.
pub async fn sign(
    srv: &crate::TestServer,
    id: &str,
    token: &str,
) -> Result<String, (tonic::Code, String)> {
    let key = rotator::pki::SecretKey::generate_p256().expect("a key");
    let id = id.parse().expect("a SPIFFE ID");
    let csr = rotator::client::make_csr(&id, &key).expect("a CSR");
    srv.client(None)
        .sign_certificate(crate::with_token(crate::sign_request(csr), token))
        .await
        .map(|r| {
            rotator::client::spiffe_id_of(&r.into_inner().certificate_chain[0])
                .expect("a SPIFFE ID in the leaf")
                .to_string()
        })
        .map_err(|s| (s.code(), s.message().to_owned()))
}
