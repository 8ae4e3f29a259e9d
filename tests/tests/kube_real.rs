//! meshca against a real kube-apiserver and etcd (issue #24; `meshca_tests::cluster`), running as
//! its own ServiceAccount with exactly the RBAC `deploy/kubernetes` renders: real bound tokens
//! from the TokenRequest API, real admission (ServiceAccount, NodeRestriction), the RBAC
//! authorizer, real mirror pods created with a node's credential.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use ca_server::config::Config;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use meshca_tests::cluster::{Cluster, ISSUER, NEWEST, OLDEST, env, kube_mode, kube_mode_as, sign};
use meshca_tests::{TestServer, istio, istio_impersonating, pem_certs, with_token};
use rotator::pki::SecretKey;
use tonic::Code;

async fn tokenreview_with_real_tokens(version: &'static str) {
    let Some(e) = env(version, None).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    c.node(&e.admin, "node-a").await;
    let web = c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    let srv = TestServer::start_with(|cfg| kube_mode(&e, cfg)).await;
    let want = format!("spiffe://cluster.local/ns/{prod}/sa/web");

    // A bound token with meshca's audience: accepted, for its own identity only.
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 600, Some(&web))
        .await;
    assert_eq!(sign(&srv, &want, &token).await.unwrap(), want);
    let other = format!("spiffe://cluster.local/ns/{prod}/sa/api");
    let (code, msg) = sign(&srv, &other, &token).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{msg}");

    // Another audience: refused.
    let istio_token = c
        .token(&e.admin, &prod, "web", &["istio-ca"], 600, Some(&web))
        .await;
    let (code, msg) = sign(&srv, &want, &istio_token).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{msg}");

    // A token bound to a pod that is gone: the API server no longer vouches for it.
    let doomed = c.pod(&e.admin, &prod, "web-2", Some("web"), "node-a").await;
    let orphan = c
        .token(&e.admin, &prod, "web", &["meshca"], 600, Some(&doomed))
        .await;
    Api::<Pod>::namespaced(e.admin.clone(), &prod)
        .delete("web-2", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let gone = meshca_tests::eventually(Duration::from_secs(10), || async {
        Api::<Pod>::namespaced(e.admin.clone(), &prod)
            .get_opt("web-2")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "web-2 deleted");
    let (code, msg) = sign(&srv, &want, &orphan).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    eprintln!("{version}: a token bound to a deleted pod: {msg}");

    // Expired (signed with the cluster's own key, as TokenRequest signs, an hour ago expiring a
    // minute ago): the API server refuses it and so does meshca. The control — the same
    // signing with an expiry ahead — is accepted by both, so the expiry is what refuses it.
    let fresh = c
        .signed_token(&e.admin, &prod, "web", &["meshca"], 600)
        .await;
    let (ok, who) = c.review(&e.admin, &fresh, &["meshca"]).await;
    assert!(ok, "the control token: {who}");
    assert_eq!(sign(&srv, &want, &fresh).await.unwrap(), want);
    let expired = c
        .signed_token(&e.admin, &prod, "web", &["meshca"], -60)
        .await;
    let (ok, why) = c.review(&e.admin, &expired, &["meshca"]).await;
    assert!(!ok, "kube-apiserver {version} accepted an expired token");
    let (code, msg) = sign(&srv, &want, &expired).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    eprintln!("{version}: an expired token: the API server says {why:?}; meshca: {msg}");

    // Garbage that looks like a token: refused.
    let (code, _) = sign(&srv, &want, "not.a.token").await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated);
}

#[tokio::test]
async fn tokenreview_with_real_tokens_v1_37() {
    tokenreview_with_real_tokens(NEWEST).await;
}

#[tokio::test]
async fn tokenreview_with_real_tokens_v1_35() {
    tokenreview_with_real_tokens(OLDEST).await;
}

/// The deploy RBAC is needed, not just sufficient: without `tokenreviews create` meshca cannot
/// authenticate a ServiceAccount (and says so as `UNAVAILABLE`, not as a bad token).
#[tokio::test]
async fn without_its_tokenreview_grant_meshca_cannot_authenticate() {
    let Some(e) = env(NEWEST, Some("ClusterRole/meshca-tokenreview")).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    c.node(&e.admin, "node-a").await;
    let web = c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    let srv = TestServer::start_with(|cfg| kube_mode(&e, cfg)).await;
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 600, Some(&web))
        .await;
    let want = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let (code, msg) = sign(&srv, &want, &token).await.unwrap_err();
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("403") || msg.contains("forbidden"), "{msg}");
}

/// Istio ambient's ztunnel as a node agent with real pods: a workload on its node is granted, one
/// on another node is not, and a mirror pod — created by the node itself, in a namespace of its
/// choosing, with no ServiceAccount — grants nothing (issue #25, item 1: it used to count as
/// `default`).
#[tokio::test]
async fn a_node_agent_gets_pods_on_its_node_and_nothing_from_mirror_pods_v1_37() {
    node_agent_and_mirror_pods(NEWEST).await;
}

/// As above on v1.35: bound tokens' node claims and NodeRestriction's mirror-pod rules differ by
/// release, so both are run.
#[tokio::test]
async fn a_node_agent_gets_pods_on_its_node_and_nothing_from_mirror_pods_v1_35() {
    node_agent_and_mirror_pods(OLDEST).await;
}

async fn node_agent_and_mirror_pods(version: &'static str) {
    let Some(e) = env(version, None).await else {
        return;
    };
    let c = e.cluster;
    let istio_ns = c.namespace(&e.admin, "istio-system").await;
    c.service_account(&e.admin, &istio_ns, "ztunnel").await;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    let other = c.namespace(&e.admin, "victim").await;
    for n in ["node-a", "node-b"] {
        c.node(&e.admin, n).await;
    }
    let zt = c
        .pod(&e.admin, &istio_ns, "ztunnel-a", Some("ztunnel"), "node-a")
        .await;
    c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    c.pod(&e.admin, &prod, "api-1", None, "node-b").await;
    // A node may create a mirror pod in any namespace; admission leaves it without an account.
    let mirror = c.mirror_pod(&other, "static-web-node-a", "node-a").await;
    let mirror = mirror.expect("a node creates a mirror pod of itself");
    assert_eq!(
        mirror
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
        None,
        "the real API server leaves a mirror pod without a ServiceAccount"
    );

    let trusted = format!("{istio_ns}/ztunnel");
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.istio.trusted_node_agents = vec![trusted.clone()];
    })
    .await;
    let token = c
        .token(
            &e.admin,
            &istio_ns,
            "ztunnel",
            &["istio-ca"],
            600,
            Some(&zt),
        )
        .await;
    let ask = |id: String| {
        let (srv, token) = (&srv, token.clone());
        async move {
            let key = SecretKey::generate_p256().unwrap();
            istio(srv, None)
                .create_certificate(with_token(istio_impersonating(&id, &id, &key), &token))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| (s.code(), s.message().to_owned()))
        }
    };
    let web = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let r = ask(web.clone()).await.unwrap();
    let leaf = &pem_certs(&r.cert_chain[0])[0];
    assert_eq!(
        rotator::client::spiffe_id_of(leaf).unwrap().to_string(),
        web
    );
    // api-1 runs on node-b (and as `default`: admission filled it in, so it is a real grant,
    // but not to node-a's agent).
    let (code, msg) = ask(format!("spiffe://cluster.local/ns/{prod}/sa/default"))
        .await
        .unwrap_err();
    assert!(
        matches!(code, Code::PermissionDenied | Code::Unavailable),
        "{code:?} {msg}"
    );
    // The mirror pod in `victim` on node-a: nothing.
    let (code, msg) = ask(format!("spiffe://cluster.local/ns/{other}/sa/default"))
        .await
        .unwrap_err();
    assert!(
        matches!(code, Code::PermissionDenied | Code::Unavailable),
        "a mirror pod must not make its namespace's default identity available: {code:?} {msg}"
    );
    eprintln!("mirror pod refused: {msg}");
}

/// Two replicas as their own ServiceAccount with the deploy RBAC: one Lease holder, one state
/// Secret both follow (real resourceVersions), the bundle ConfigMaps in every labelled namespace
/// (meshca's, Istio's and Linkerd's shapes) and in no other; a staged anchor reaches the other
/// replica and every ConfigMap; the Lease moves when the holder stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_secret_and_publish_bundles() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let selector = format!("meshca.io/bundle-for={}", e.ns);
    let labelled = format!("{}-apps", e.ns);
    c.namespace_named(
        &e.admin,
        &labelled,
        [("meshca.io/bundle-for".to_owned(), e.ns.clone())].into(),
    )
    .await;
    let plain = c.namespace(&e.admin, "plain").await;
    let replica = |name: &'static str| {
        let (e, selector) = (&e, selector.clone());
        move |cfg: &mut Config| {
            kube_mode(e, cfg);
            cfg.kubernetes.state_secret = "meshca-authority".into();
            cfg.kubernetes.identity = name.into();
            cfg.kubernetes.lease_duration = Duration::from_secs(2);
            cfg.kubernetes.bundle.namespace_selector = selector;
            cfg.kubernetes.bundle.resync = Duration::from_millis(300);
            cfg.kubernetes.bundle.istio = true;
            cfg.kubernetes.bundle.linkerd = true;
        }
    };
    let mut a = TestServer::start_with(replica("replica-a")).await;
    let mut b = TestServer::start_with(replica("replica-b")).await;
    let leader = |s: &TestServer| *s.server().leader.borrow();
    let one = meshca_tests::eventually(Duration::from_secs(20), || async {
        (leader(&a) ^ leader(&b)).then_some(())
    })
    .await;
    assert!(one.is_some(), "exactly one replica holds the Lease");
    assert_eq!(a.bundle(), b.bundle(), "one authority in the Secret");

    let cms = Api::<ConfigMap>::namespaced(e.admin.clone(), &labelled);
    let certs_in = |name: &'static str, key: &'static str| {
        let cms = cms.clone();
        async move {
            cms.get_opt(name)
                .await
                .unwrap()
                .and_then(|cm| cm.data)
                .and_then(|d| d.get(key).cloned())
                .map(|pem| pem_certs(&pem).len())
                .unwrap_or(0)
        }
    };
    for (name, key) in [
        ("meshca-trust-bundle", "ca-bundle.crt"),
        ("istio-ca-root-cert", "root-cert.pem"),
        ("linkerd-identity-trust-roots", "ca-bundle.crt"),
    ] {
        let n = meshca_tests::eventually(Duration::from_secs(20), || async {
            let n = certs_in(name, key).await;
            (n == 1).then_some(n)
        })
        .await;
        assert_eq!(n, Some(1), "{labelled}/{name} holds the one anchor");
    }
    assert!(
        Api::<ConfigMap>::namespaced(e.admin.clone(), &plain)
            .get_opt("meshca-trust-bundle")
            .await
            .unwrap()
            .is_none(),
        "a namespace without the label gets nothing"
    );

    // Stage on the leader: the other replica follows the Secret, the ConfigMaps get both anchors.
    let (lead, other) = if leader(&a) { (&a, &b) } else { (&b, &a) };
    let (code, out, err) = meshca_tests::meshca_in(&lead.state_dir(), &["anchors", "stage"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let followed = meshca_tests::eventually(Duration::from_secs(20), || async {
        (other.bundle().len() == 2).then_some(())
    })
    .await;
    assert!(followed.is_some(), "the other replica follows the Secret");
    let n = meshca_tests::eventually(Duration::from_secs(20), || async {
        let n = certs_in("istio-ca-root-cert", "root-cert.pem").await;
        (n == 2).then_some(n)
    })
    .await;
    assert_eq!(n, Some(2), "the staged anchor reaches Istio's ConfigMap");

    // The holder stops: the other takes the Lease.
    let survivor = if leader(&a) {
        a.stop().await;
        &b
    } else {
        b.stop().await;
        &a
    };
    let took = meshca_tests::eventually(Duration::from_secs(20), || async {
        leader(survivor).then_some(())
    })
    .await;
    assert!(took.is_some(), "the surviving replica takes the Lease");
}

/// The Linkerd restart gate (issue #31, item 4) reads what each pod holds: its injector's
/// `linkerd.io/trust-root-sha256` annotation against the SHA-256 of the staged trust-roots
/// ConfigMap. A pod made *after* the ConfigMap changed but injected from the kubelet's
/// minute-late copy of it (the old digest) is stale; by creation time it would have counted as
/// restarted. Only a pod without the annotation is judged by time, and the count says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_linkerd_gate_reads_each_pods_trust_root_annotation() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let l5d = format!("{}-linkerd", e.ns);
    let label = ("meshca.io/bundle-for".to_owned(), e.ns.clone());
    c.namespace_named(&e.admin, &l5d, [label.clone()].into())
        .await;
    let apps = c.namespace(&e.admin, "apps").await;
    c.node(&e.admin, "node-a").await;
    let selector = format!("meshca.io/bundle-for={}", e.ns);
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.linkerd.control_plane_namespace.clone_from(&l5d);
        cfg.kubernetes.bundle.namespace_selector = selector;
        cfg.kubernetes.bundle.resync = Duration::from_millis(300);
        cfg.kubernetes.bundle.linkerd = true;
    })
    .await;
    let roots = Api::<ConfigMap>::namespaced(e.admin.clone(), &l5d);
    let content = |want: usize| {
        let roots = roots.clone();
        async move {
            meshca_tests::eventually(Duration::from_secs(20), || async {
                let pem = roots
                    .get_opt("linkerd-identity-trust-roots")
                    .await
                    .unwrap()
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get("ca-bundle.crt").cloned())?;
                (pem_certs(&pem).len() == want).then_some(pem)
            })
            .await
            .expect("the trust-roots ConfigMap is published")
        }
    };
    let sha = |pem: &str| hex::encode(ring::digest::digest(&ring::digest::SHA256, pem.as_bytes()));
    let proxy = |name: &str, digest: Option<&str>| {
        let mut annotations = json!({"linkerd.io/proxy-version": "edge-25.1.1"});
        if let Some(d) = digest {
            annotations["linkerd.io/trust-root-sha256"] = json!(d);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": apps, "annotations": annotations,
                "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "app", "image": "registry.invalid/app:1"},
                {"name": "linkerd-proxy", "image": "registry.invalid/proxy:1"},
            ]},
        })
    };
    // A PodDisruptionBudget over the pods, its status set as the disruption controller (not
    // running here) would: no disruption allowed now. The restart order reads it.
    let pdbs = Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(
        e.admin.clone(),
        &apps,
    );
    let pdb = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"minAvailable": 4, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .unwrap();
    pdbs.create(&Default::default(), &pdb).await.unwrap();
    pdbs.patch_status(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            json!({"status": {"disruptionsAllowed": 0, "currentHealthy": 4,
            "desiredHealthy": 4, "expectedPods": 4, "observedGeneration": 1}}),
        ),
    )
    .await
    .unwrap();
    let old = content(1).await;
    c.create_pod(&e.admin, proxy("before-annotated", Some(&sha(&old))))
        .await;
    c.create_pod(&e.admin, proxy("before-bare", None)).await;

    let (code, out, err) = meshca_tests::meshca_in(&srv.state_dir(), &["anchors", "stage"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let new = content(2).await;
    // Wait a second past the change so that creation time alone would call these restarted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.create_pod(&e.admin, proxy("after-stale-volume", Some(&sha(&old))))
        .await;
    c.create_pod(&e.admin, proxy("after-new-roots", Some(&sha(&new))))
        .await;

    let bound = meshca_tests::eventually(Duration::from_secs(20), || async {
        let (_, out, _) =
            meshca_tests::meshca_in(&srv.state_dir(), &["status", "--output", "json"]).await;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let b = v["anchor_rotation"]["ledger"]["restart_bound"].clone();
        (b["state"] == "counted" && b["proxies"] == 4 && b["since"].is_string()).then_some(b)
    })
    .await
    .expect("the restart bound counts four proxies against the staged ConfigMap");
    eprintln!("restart bound: {bound}");
    assert_eq!(
        bound["stale"], 3,
        "stale: made before (2) and made after but injected with the old roots (1)"
    );
    assert_eq!(
        bound["by_creation_time"], 1,
        "only the bare pod is judged by time"
    );
    let owners: Vec<&str> = bound["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["owner"].as_str())
        .collect();
    assert!(owners.contains(&"Pod/after-stale-volume"), "{owners:?}");
    assert!(!owners.contains(&"Pod/after-new-roots"), "{owners:?}");
    // Every stale workload is under the budget, which allows no disruption now: the order puts
    // them last and says why.
    let budgets = meshca_tests::eventually(Duration::from_secs(20), || async {
        let (_, out, _) =
            meshca_tests::meshca_in(&srv.state_dir(), &["status", "--output", "json"]).await;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let ws = v["anchor_rotation"]["ledger"]["restart_bound"]["workloads"].clone();
        let ws = ws.as_array()?.clone();
        ws.iter()
            .all(|w| w["disruptions_allowed"] == 0)
            .then_some(ws.len())
    })
    .await
    .expect("the budget is read from the real API server");
    assert_eq!(budgets, 3, "three stale pods, one budget over them all");
    let (_, text, _) = meshca_tests::meshca_in(&srv.state_dir(), &["anchors", "restarts"]).await;
    assert!(
        text.contains("(PDB web allows no disruption now: last)"),
        "{text}"
    );
}

/// A rustls server with `crt`/`key` (PEM) and a client trusting exactly `roots` (PEM) that
/// connects to `name`, as a proxy connects to istiod: the handshake's outcome.
async fn serves_as(name: &str, crt: &str, key: &str, roots: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(pem_certs(crt), key)
        .map_err(|e| e.to_string())?;
    let mut store = rustls::RootCertStore::empty();
    for r in pem_certs(roots) {
        store.add(r).map_err(|e| e.to_string())?;
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("client: {e}"))?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    srv.await.map_err(|e| e.to_string())??;
    Ok(())
}

/// istiod's serving certificate (issue #31, item 2): meshca writes the `istiod-tls` Secret with
/// the RBAC of `deploy/kubernetes/overlays/istiod-certificate` (that one Secret), a DNS-only
/// certificate that a client trusting `ca.crt` accepts for istiod's name, and keeps it through a
/// rotation: `ca.crt` is the whole bundle in each phase, the certificate is re-issued by the new
/// issuer on `activate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiods_certificate_is_kept_through_a_rotation_with_rbac_for_that_secret_alone() {
    use k8s_openapi::api::core::v1::Secret;
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let istio_ns = c.namespace(&e.admin, "istio-system").await;
    c.apply_rbac(
        &e.admin,
        "deploy/kubernetes/overlays/istiod-certificate",
        &e.ns,
        &[("istio-system", istio_ns.as_str())],
        None,
    )
    .await;
    // Another Secret in istio-system that meshca must not be able to read.
    let other: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cacerts", "namespace": istio_ns},
        "stringData": {"ca-key.pem": "secret"},
    }))
    .unwrap();
    let secrets_admin = Api::<Secret>::namespaced(e.admin.clone(), &istio_ns);
    secrets_admin
        .create(&kube::api::PostParams::default(), &other)
        .await
        .unwrap();
    let dns = format!("istiod.{istio_ns}.svc");
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        let ic = &mut cfg.istio.istiod_certificate;
        ic.namespace.clone_from(&istio_ns);
        ic.dns_names = vec![dns.clone()];
    })
    .await;
    let read = |want_anchors: usize, want_issuer: String| {
        let api = secrets_admin.clone();
        async move {
            meshca_tests::eventually(Duration::from_secs(30), || async {
                let s = api.get_opt("istiod-tls").await.unwrap()?;
                let d = s.data.clone()?;
                let text = |k: &str| String::from_utf8(d.get(k)?.0.clone()).ok();
                let (crt, key, ca) = (text("tls.crt")?, text("tls.key")?, text("ca.crt")?);
                let issuer = s
                    .metadata
                    .annotations
                    .as_ref()?
                    .get("meshca.io/issuer")?
                    .clone();
                (pem_certs(&ca).len() == want_anchors && issuer == want_issuer).then_some((
                    s.type_.clone(),
                    crt,
                    key,
                    ca,
                ))
            })
            .await
        }
    };
    let active = |srv: &TestServer| {
        srv.server()
            .authority
            .snapshot()
            .issuer
            .clone()
            .unwrap()
            .id
            .to_string()
    };
    let (ty, crt, key, ca) = read(1, active(&srv)).await.expect("the Secret is written");
    assert_eq!(ty.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(pem_certs(&ca), srv.bundle(), "ca.crt is the bundle");
    let chain = pem_certs(&crt);
    assert_eq!(chain.len(), 2, "leaf and issuer");
    assert_eq!(
        meshca_tests::san_in_order(&chain[0]),
        vec![format!("DNS:{dns}")],
        "DNS names only: no SPIFFE ID"
    );
    serves_as(&dns, &crt, &key, &ca)
        .await
        .expect("a proxy trusting ca.crt accepts istiod");
    assert!(
        serves_as("istiod.other.svc", &crt, &key, &ca)
            .await
            .is_err(),
        "not for another name"
    );

    // RBAC: meshca's credential reads that Secret and nothing else there.
    let as_meshca = meshca_tests::cluster::client_from(&e.kubeconfig)
        .await
        .unwrap();
    let mine = Api::<Secret>::namespaced(as_meshca, &istio_ns);
    assert!(mine.get("istiod-tls").await.is_ok());
    let denied = mine.get("cacerts").await.unwrap_err();
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied}"
    );
    let denied = mine
        .list(&kube::api::ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied}"
    );

    // Through a rotation: staged (both anchors), activated (new issuer), finished (new anchor).
    let step = |args: &'static [&'static str]| {
        let dir = srv.state_dir();
        async move {
            let (code, out, err) = meshca_tests::meshca_in(&dir, args).await;
            assert_eq!(code, 0, "meshca {args:?}: {out}{err}");
        }
    };
    let before = active(&srv);
    step(&["anchors", "stage"]).await;
    let (_, crt, key, ca) = read(2, before.clone())
        .await
        .expect("ca.crt holds both anchors");
    assert_eq!(pem_certs(&ca), srv.bundle());
    serves_as(&dns, &crt, &key, &ca).await.unwrap();
    step(&["anchors", "activate", "--force"]).await;
    let after = active(&srv);
    assert_ne!(before, after);
    let (_, crt, key, ca) = read(2, after.clone())
        .await
        .expect("re-issued by the new issuer on activate");
    assert_eq!(
        pem_certs(&crt)[1],
        srv.server()
            .authority
            .snapshot()
            .issuer
            .clone()
            .unwrap()
            .der
    );
    serves_as(&dns, &crt, &key, &ca).await.unwrap();
    step(&["anchors", "finish", "--force"]).await;
    let (_, crt, key, ca) = read(1, after)
        .await
        .expect("ca.crt holds the new anchor alone");
    assert_eq!(pem_certs(&ca), srv.bundle());
    serves_as(&dns, &crt, &key, &ca).await.unwrap();
}

/// A token whose signature the API server's published keys do not verify — a forged payload,
/// an invented key id — is refused before any TokenReview (issue #25, item 2): a caller with no
/// credential cannot spend the shared TokenReview budget. A real token still costs one review.
#[tokio::test]
async fn forged_tokens_never_reach_the_api_server() {
    use base64::Engine as _;
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    c.node(&e.admin, "node-a").await;
    let web = c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    let srv = TestServer::start_with(|cfg| kube_mode(&e, cfg)).await;
    let reviewer = srv.server().reviewer.clone().expect("TokenReview is on");
    let want = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 600, Some(&web))
        .await;
    assert_eq!(sign(&srv, &want, &token).await.unwrap(), want);
    assert_eq!(reviewer.api_calls(), 1, "a real token: one review");
    assert_eq!(reviewer.key_fetches().await, 1, "the keys read once");

    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let parts: Vec<&str> = token.split('.').collect();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    let n = 200;
    let mut first = None;
    let t0 = std::time::Instant::now();
    for i in 0..n {
        if i == 1 {
            first = Some(t0.elapsed());
        }
        // The real header and signature over a payload of the attacker's choosing.
        let mut forged = claims.clone();
        forged["jti"] = serde_json::json!(format!("forged-{i}"));
        let token = format!(
            "{}.{}.{}",
            parts[0],
            b64(forged.to_string().as_bytes()),
            parts[2]
        );
        let (code, msg) = sign(&srv, &want, &token).await.unwrap_err();
        assert_eq!(code, Code::Unauthenticated, "{msg}");
    }
    let per = t0.elapsed() / n;
    let first = first.unwrap();
    // A key id the API server does not publish.
    let header = b64(br#"{"alg":"RS256","kid":"invented"}"#);
    let invented = format!("{header}.{}.{}", parts[1], parts[2]);
    let (code, msg) = sign(&srv, &want, &invented).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    assert!(msg.contains("does not publish"), "{msg}");
    assert_eq!(
        reviewer.api_calls(),
        1,
        "no forged token reached the API server"
    );
    assert_eq!(reviewer.forged(), n as u64 + 1);
    assert!(
        reviewer.key_fetches().await <= 2,
        "an unknown key id fetches the keys at most once per interval"
    );
    eprintln!(
        "{n} forged tokens refused locally, {per:?} per request over gRPC (debug build; the first {first:?}), 0 TokenReviews"
    );
}

/// A compromised node (issue #25, item 3): `meshca deny add --node NAME` refuses every
/// certificate its node agents ask for on anyone's behalf, while another node's agent keeps
/// working; `deny list` shows it; `deny remove --node` lifts it.
#[tokio::test]
async fn a_denied_node_gets_nothing_through_its_agent() {
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let istio_ns = c.namespace(&e.admin, "istio-system").await;
    c.service_account(&e.admin, &istio_ns, "ztunnel").await;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    c.service_account(&e.admin, &prod, "api").await;
    for n in ["node-a", "node-b"] {
        c.node(&e.admin, n).await;
    }
    let zt_a = c
        .pod(&e.admin, &istio_ns, "ztunnel-a", Some("ztunnel"), "node-a")
        .await;
    let zt_b = c
        .pod(&e.admin, &istio_ns, "ztunnel-b", Some("ztunnel"), "node-b")
        .await;
    c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    c.pod(&e.admin, &prod, "api-1", Some("api"), "node-b").await;
    let trusted = format!("{istio_ns}/ztunnel");
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.istio.trusted_node_agents = vec![trusted.clone()];
    })
    .await;
    let token_a = c
        .token(
            &e.admin,
            &istio_ns,
            "ztunnel",
            &["istio-ca"],
            600,
            Some(&zt_a),
        )
        .await;
    let token_b = c
        .token(
            &e.admin,
            &istio_ns,
            "ztunnel",
            &["istio-ca"],
            600,
            Some(&zt_b),
        )
        .await;
    let ask = |token: String, id: String| {
        let srv = &srv;
        async move {
            let key = SecretKey::generate_p256().unwrap();
            istio(srv, None)
                .create_certificate(with_token(istio_impersonating(&id, &id, &key), &token))
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned()))
        }
    };
    let web = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let api = format!("spiffe://cluster.local/ns/{prod}/sa/api");
    ask(token_a.clone(), web.clone()).await.unwrap();
    let dir = srv.state_dir();
    let (code, out, err) = meshca_tests::meshca_in(
        &dir,
        &[
            "deny",
            "add",
            "--node",
            "node-a",
            "--reason",
            "kubelet credential leaked",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, msg) = ask(token_a.clone(), web.clone()).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("node node-a is denied") && msg.contains("kubelet credential leaked"),
        "{msg}"
    );
    ask(token_b.clone(), api.clone())
        .await
        .expect("another node's agent is not affected");
    let (_, out, _) = meshca_tests::meshca_in(&dir, &["deny", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["denied_nodes"][0]["node"], "node-a", "{out}");
    let (code, out, err) =
        meshca_tests::meshca_in(&dir, &["deny", "remove", "--node", "node-a"]).await;
    assert_eq!(code, 0, "{out}{err}");
    ask(token_a, web).await.expect("lifted");
}

/// `deploy/kubernetes` and every overlay, applied with server-side dry-run as the admin: the real
/// API server admits every object (schema, defaults, admission). The monitoring overlay's
/// PrometheusRule and ServiceMonitor need prometheus-operator's CRDs, which this cluster does
/// not have: their kinds are checked by the manifests test instead.
#[tokio::test]
async fn every_manifest_is_admitted_by_a_real_api_server_v1_37() {
    every_manifest_admitted(NEWEST).await;
}

/// As above on v1.35 (validation and Pod Security's `restricted` profile change by release).
#[tokio::test]
async fn every_manifest_is_admitted_by_a_real_api_server_v1_35() {
    every_manifest_admitted(OLDEST).await;
}

async fn every_manifest_admitted(version: &'static str) {
    let Some(cluster) = Cluster::shared(version) else {
        return;
    };
    let admin = cluster.admin().await;
    for dir in [
        "deploy/kubernetes",
        "deploy/kubernetes/overlays/cert-manager",
        "deploy/kubernetes/overlays/istiod-certificate",
        "deploy/kubernetes/overlays/monitoring",
        "deploy/kubernetes/overlays/pod-certificates",
    ] {
        let Some(docs) = meshca_tests::render(dir) else {
            return;
        };
        let admitted = cluster.dry_run_apply(&admin, docs, dir).await;
        assert!(admitted.len() >= 10, "{dir}: {admitted:?}");
    }
    // Pod Security admission: the Deployment's pod, as a pod, in a namespace that enforces the
    // `restricted` profile (PodSecurity enforces on pods, not on Deployments).
    let docs = meshca_tests::render("deploy/kubernetes").unwrap();
    cluster
        .admit_pod_restricted(&admin, &docs, "deploy/kubernetes")
        .await
        .unwrap();
}

/// The pod directory with real pods on a cluster of its own: a workload deleted from the node
/// is no longer granted to its agent, one moved to another node is granted to that node's agent
/// only, and with the API server stopped the directory fails closed (`UNAVAILABLE`) once it has
/// been out of touch for `pod_directory_max_staleness`.
#[tokio::test]
async fn the_pod_directory_follows_real_pods_and_fails_closed_without_the_api_server() {
    let Some(cluster) = Cluster::private(NEWEST) else {
        return;
    };
    let c = &cluster;
    let admin = c.admin().await;
    let ns = c.namespace(&admin, "meshca").await;
    c.service_account(&admin, &ns, "meshca").await;
    c.apply_rbac(&admin, "deploy/kubernetes", &ns, &[], None)
        .await;
    let mtoken = c.token(&admin, &ns, "meshca", &[ISSUER], 3600, None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, mtoken).unwrap();
    let kubeconfig = c.token_kubeconfig("meshca-private", &file);
    let istio_ns = c.namespace(&admin, "istio-system").await;
    c.service_account(&admin, &istio_ns, "ztunnel").await;
    let prod = c.namespace(&admin, "prod").await;
    c.service_account(&admin, &prod, "web").await;
    for n in ["node-a", "node-b"] {
        c.node(&admin, n).await;
    }
    let zt_a = c
        .pod(&admin, &istio_ns, "ztunnel-a", Some("ztunnel"), "node-a")
        .await;
    let zt_b = c
        .pod(&admin, &istio_ns, "ztunnel-b", Some("ztunnel"), "node-b")
        .await;
    c.pod(&admin, &prod, "web-1", Some("web"), "node-a").await;
    let trusted = format!("{istio_ns}/ztunnel");
    let srv = TestServer::start_with(|cfg| {
        kube_mode_as(&kubeconfig, &ns, cfg);
        cfg.istio.trusted_node_agents = vec![trusted.clone()];
        cfg.istio.node_authorization_wait = Duration::from_millis(500);
        cfg.istio.pod_directory_max_staleness = Duration::from_secs(2);
    })
    .await;
    let token = |pod| c.token(&admin, &istio_ns, "ztunnel", &["istio-ca"], 600, Some(pod));
    let (token_a, token_b) = (token(&zt_a).await, token(&zt_b).await);
    let web = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let ask = |token: String| {
        let (srv, web) = (&srv, web.clone());
        async move {
            let key = SecretKey::generate_p256().unwrap();
            istio(srv, None)
                .create_certificate(with_token(istio_impersonating(&web, &web, &key), &token))
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned()))
        }
    };
    ask(token_a.clone()).await.expect("web-1 runs on node-a");
    assert!(ask(token_b.clone()).await.is_err(), "not on node-b");
    // Deleted: node-a's agent may no longer have it.
    Api::<Pod>::namespaced(admin.clone(), &prod)
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let refused = meshca_tests::eventually(Duration::from_secs(30), || async {
        ask(token_a.clone()).await.err()
    })
    .await
    .expect("a deleted pod grants nothing");
    assert!(
        matches!(refused.0, Code::PermissionDenied | Code::Unavailable),
        "{refused:?}"
    );
    // Moved: a new pod of web on node-b.
    c.pod(&admin, &prod, "web-2", Some("web"), "node-b").await;
    meshca_tests::eventually(Duration::from_secs(30), || async {
        ask(token_b.clone()).await.ok()
    })
    .await
    .expect("node-b's agent gets web once its pod runs there");
    assert!(ask(token_a.clone()).await.is_err(), "node-a has no web pod");
    // The API server goes away: cached tokens still authenticate, but the directory's picture
    // is not trusted past its staleness bound.
    c.stop();
    let (code, msg) = meshca_tests::eventually(Duration::from_secs(30), || async {
        match ask(token_b.clone()).await {
            Err((Code::Unavailable, m)) if m.contains("out of touch") => {
                Some((Code::Unavailable, m))
            }
            other => {
                eprintln!("after stop: {other:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await
    .expect("the directory fails closed once out of touch");
    eprintln!("API server stopped: {code:?} {msg}");
}

/// A bundle ConfigMap whose `meshca.io/bundle-version` someone set to the maximum (and whose
/// content they changed) is put right: no legitimate writer can be ahead of the committed state
/// (issue #25, item 6). Before, it was never rewritten again.
#[tokio::test]
async fn a_configmap_claiming_a_newer_bundle_is_put_right() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let apps = format!("{}-apps", e.ns);
    c.namespace_named(
        &e.admin,
        &apps,
        [("meshca.io/bundle-for".to_owned(), e.ns.clone())].into(),
    )
    .await;
    let selector = format!("meshca.io/bundle-for={}", e.ns);
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.kubernetes.bundle.namespace_selector = selector;
        cfg.kubernetes.bundle.resync = Duration::from_millis(300);
    })
    .await;
    let cms = Api::<ConfigMap>::namespaced(e.admin.clone(), &apps);
    let content = || {
        let cms = cms.clone();
        async move {
            cms.get_opt("meshca-trust-bundle")
                .await
                .unwrap()
                .and_then(|cm| cm.data)
                .and_then(|d| d.get("ca-bundle.crt").cloned())
        }
    };
    meshca_tests::eventually(Duration::from_secs(20), || async {
        content().await.filter(|p| pem_certs(p) == srv.bundle())
    })
    .await
    .expect("published");
    cms.patch(
        "meshca-trust-bundle",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "metadata": {"annotations": {"meshca.io/bundle-version": u64::MAX.to_string()}},
            "data": {"ca-bundle.crt": "not the bundle"},
        })),
    )
    .await
    .unwrap();
    let restored = meshca_tests::eventually(Duration::from_secs(20), || async {
        content().await.filter(|p| pem_certs(p) == srv.bundle())
    })
    .await;
    assert!(
        restored.is_some(),
        "a forged newer version must not pin the ConfigMap's content"
    );
}

/// A cached TokenReview answer goes with its bound pod (issue #25, item 8): once the pod
/// directory sees the pod deleted, its token is reviewed again and refused, instead of being
/// accepted for the rest of the cache's minute.
#[tokio::test]
async fn a_deleted_pods_token_stops_working_before_its_cache_entry_expires() {
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    c.node(&e.admin, "node-a").await;
    let web = c.pod(&e.admin, &prod, "web-1", Some("web"), "node-a").await;
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        // The pod directory runs when a node agent is trusted.
        cfg.istio.trusted_node_agents = vec!["istio-system/ztunnel".into()];
        cfg.kubernetes.token_cache_ttl = Duration::from_secs(300);
    })
    .await;
    let want = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 600, Some(&web))
        .await;
    sign(&srv, &want, &token).await.unwrap();
    sign(&srv, &want, &token).await.unwrap();
    let reviewer = srv.server().reviewer.clone().unwrap();
    assert_eq!(reviewer.api_calls(), 1, "the second request used the cache");
    Api::<Pod>::namespaced(e.admin.clone(), &prod)
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let refused = meshca_tests::eventually(Duration::from_secs(15), || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match sign(&srv, &want, &token).await {
            Err((Code::Unauthenticated, m)) => Some(m),
            _ => None,
        }
    })
    .await
    .expect("the cached answer went with the pod (the cache alone would keep it 5 minutes)");
    eprintln!("after the pod's deletion: {refused}");
}

/// A watch expired by compaction (issue #24): with watches served by etcd
/// (`--watch-cache=false`), the directory's watch ends, resumes from the last pod's
/// resourceVersion, and etcd — compacted past it meanwhile — answers `410 Gone`. The directory
/// counts it (`meshca_pod_watch_expired_total`), says so, lists again, and holds every pod that
/// changed while it was away; without compaction a resumed watch is not counted as expired.
#[tokio::test]
async fn a_pod_watch_expired_by_etcd_compaction_lists_again_and_says_so() {
    use ca_server::impersonation::PodDirectory as _;
    use ca_server::{PodIndex as Pods, PodWatching as Watching};
    let Some(cluster) = Cluster::private_with(NEWEST, &["--watch-cache=false"]) else {
        return;
    };
    let c = &cluster;
    let admin = c.admin().await;
    let ns = c.namespace(&admin, "prod").await;
    c.service_account(&admin, &ns, "web").await;
    c.node(&admin, "node-a").await;
    c.pod(&admin, &ns, "web-1", Some("web"), "node-a").await;
    // Watches of 1 s: each ends and resumes from the last pod event's resourceVersion.
    let pods = Pods::watching(
        Duration::from_secs(30),
        Watching {
            timeout: Duration::from_secs(1),
            ..Watching::default()
        },
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pods.clone().run(admin.clone(), stopped));
    let knows = |name: &str| matches!(pods.node_of(&ns, name, None), Ok(Some(n)) if n == "node-a");
    meshca_tests::eventually(Duration::from_secs(20), || async {
        knows("web-1").then_some(())
    })
    .await
    .expect("the directory lists web-1");
    // Resumed watches that nothing compacted: several ends, no expiry.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(pods.watches_expired(), 0, "a resumed watch is not expired");
    // Other writes move etcd's revision past the last pod event, then compaction removes it.
    let cms = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), &ns);
    for i in 0..3 {
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": format!("filler-{i}")}}),
        )
        .unwrap();
        cms.create(&Default::default(), &cm).await.unwrap();
    }
    let rev = c.compact_etcd().await;
    let expired = meshca_tests::eventually(Duration::from_secs(20), || async {
        (pods.watches_expired() > 0).then_some(pods.watches_expired())
    })
    .await
    .expect("the resumed watch is answered 410 Gone and counted");
    eprintln!("compacted at revision {rev}: {expired} watch(es) expired, listed again");
    // After the relist it follows again: a new pod appears, a deleted one goes.
    c.pod(&admin, &ns, "web-2", Some("web"), "node-a").await;
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    meshca_tests::eventually(Duration::from_secs(20), || async {
        (knows("web-2") && !knows("web-1")).then_some(())
    })
    .await
    .expect("the relisted directory follows new changes");
    stop.send(true).unwrap();
    run.await.unwrap();
}
