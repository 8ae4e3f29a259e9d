//! Linkerd's proxies read trust anchors only when they start: on Kubernetes (the in-test API
//! server, see tests/README.md) the activate gate counts the proxies whose pods were made
//! before the staged anchors reached Linkerd's trust-roots ConfigMap, and `meshca anchors
//! restarts` lists their workloads. The negative control forces the gate and shows such a
//! proxy's real TLS verification failing.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca_server::config::AuthMethod;
use meshca_tests::kubeapi::KubeApi;
use meshca_tests::{
    TestServer, Workload, eventually, mtls_handshake, pem_certs, sign_request, with_token,
};
use rotator::client::make_csr;
use rotator::clock::ManualClock;
use rotator::pki::SecretKey;
use serde_json::{Value, json};
use time::OffsetDateTime;

const ROOTS: &str = "linkerd-identity-trust-roots";

/// A pod as Linkerd's injector and a controller would make it: `owner` (kind, name) and, for a
/// Deployment's ReplicaSet, its pod-template-hash; `proxy`: injected.
fn pod(
    fake: &KubeApi,
    ns: &str,
    name: &str,
    owner: (&str, &str),
    proxy: bool,
    created: OffsetDateTime,
) {
    let (kind, oname) = owner;
    let (kind, oname, labels) = match kind {
        "Deployment" => (
            "ReplicaSet",
            format!("{oname}-7d9f"),
            json!({"pod-template-hash": "7d9f", "app": oname}),
        ),
        k => (k, oname.to_owned(), json!({"app": oname})),
    };
    let annotations = if proxy {
        json!({"linkerd.io/proxy-version": "edge-25.1.1"})
    } else {
        json!({})
    };
    fake.put(
        "pods",
        ns,
        name,
        json!({
            "metadata": {
                "creationTimestamp": rotator::clock::rfc3339(created),
                "labels": labels, "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": oname,
                    "uid": "u", "controller": true}],
            },
            "spec": {"nodeName": "node-a", "serviceAccountName": "default",
                "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        }),
    );
}

/// `meshca <args> --state-dir <dir>`: (exit code, stdout, stderr).
async fn meshca(dir: &Path, args: &[&str]) -> (i32, String, String) {
    meshca_tests::meshca_in(dir, args).await
}

/// The trust-roots ConfigMap once it holds `n` anchors: (its PEM, its content-since).
async fn roots_with(fake: &KubeApi, n: usize) -> (String, String) {
    eventually(Duration::from_secs(10), || async {
        let cm = fake.get("configmaps", "linkerd", ROOTS)?;
        let pem = cm["data"]["ca-bundle.crt"].as_str()?.to_owned();
        let since = cm["metadata"]["annotations"]["meshca.io/content-since"]
            .as_str()?
            .to_owned();
        (pem_certs(&pem).len() == n).then_some((pem, since))
    })
    .await
    .unwrap_or_else(|| panic!("{ROOTS} never held {n} anchors"))
}

/// A mesh on the in-test API server: Linkerd's control plane and two workloads, all started an
/// hour ago; meshca publishes Linkerd's trust roots. The authority's clock is manual, so the
/// time fallback can be passed at once.
async fn mesh() -> (KubeApi, TestServer, Arc<ManualClock>) {
    let fake = KubeApi::start().await;
    fake.set_namespace("linkerd", &[("meshca.io/trust-bundle", "enabled")]);
    fake.set_namespace("prod", &[("meshca.io/trust-bundle", "enabled")]);
    let hour_ago = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let d = ("Deployment", "linkerd-destination");
    pod(
        &fake,
        "linkerd",
        "linkerd-destination-7d9f-a",
        d,
        true,
        hour_ago,
    );
    for n in ["web-7d9f-a", "web-7d9f-b"] {
        pod(&fake, "prod", n, ("Deployment", "web"), true, hour_ago);
    }
    pod(&fake, "prod", "db-0", ("StatefulSet", "db"), true, hour_ago);
    pod(&fake, "prod", "batch-1", ("Job", "batch"), false, hour_ago);
    // web's budget lets no pod go now; db's lets one.
    for (name, app, allowed) in [("web", "web", 0), ("db", "db", 1)] {
        fake.put(
            "poddisruptionbudgets",
            "prod",
            name,
            json!({"metadata": {}, "spec": {"selector": {"matchLabels": {"app": app}}},
                "status": {"disruptionsAllowed": allowed, "currentHealthy": 2, "desiredHealthy": 2,
                    "expectedPods": 2, "observedGeneration": 1}}),
        );
    }
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let srv = TestServer::start_clocked(
        |c| {
            c.kubernetes.enabled = true;
            c.kubernetes.api_url = fake.url.clone();
            c.kubernetes.namespace = "meshca".into();
            c.kubernetes.state_secret.clear();
            c.kubernetes.bundle.namespace_selector = "meshca.io/trust-bundle=enabled".into();
            c.kubernetes.bundle.resync = Duration::from_millis(200);
            c.kubernetes.bundle.linkerd = true;
            c.auth.authenticators = vec![AuthMethod::Mtls, AuthMethod::Static];
            // A time fallback of seconds (passed by moving the manual clock, less than the
            // clock skew allowance so that certificates stay valid for real-time peers).
            c.policy.leaf_ttl_default = Duration::from_secs(5);
            c.policy.leaf_ttl_min = Duration::from_secs(2);
            c.policy.leaf_ttl_max = Duration::from_secs(10);
            c.policy.propagation_allowance = Duration::from_secs(5);
        },
        clock.clone(),
    )
    .await;
    roots_with(&fake, 1).await;
    (fake, srv, clock)
}

/// Stages, waits for the two-anchor roots, and passes the time fallback of the activate gate.
async fn stage_and_wait(fake: &KubeApi, srv: &TestServer, clock: &ManualClock) -> String {
    let dir = srv.server().state_dir.clone();
    let (code, _, err) = meshca(&dir, &["anchors", "stage"]).await;
    assert_eq!(code, 0, "{err}");
    let (_, since) = roots_with(fake, 2).await;
    let p = srv.server().authority.policy().clone();
    clock.advance(p.leaf_ttl_max + p.propagation_allowance + Duration::from_secs(1));
    since
}

async fn sign(srv: &TestServer, id: &str) -> Workload {
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
    let r = srv
        .client(None)
        .sign_certificate(with_token(sign_request(csr), &srv.token))
        .await
        .unwrap()
        .into_inner();
    Workload::from_response(&r, key)
}

#[tokio::test]
async fn activation_waits_for_every_linkerd_proxy_started_before_the_new_anchors() {
    let (fake, srv, clock) = mesh().await;
    let dir = srv.server().state_dir.clone();
    let since = stage_and_wait(&fake, &srv, &clock).await;
    let since =
        OffsetDateTime::parse(&since, &time::format_description::well_known::Rfc3339).unwrap();

    // The time fallback has passed, but four proxies hold only the old anchor.
    let (code, _, err) = meshca(&dir, &["anchors", "activate"]).await;
    assert_ne!(code, 0, "activate must be refused");
    assert!(
        err.contains("4 Linkerd proxies read trust anchors only at start"),
        "{err}"
    );
    let (code, out, _) = meshca(&dir, &["status"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("Linkerd proxies started with the current anchors: 0 of 4"),
        "{out}"
    );
    // The restart list: the control plane first, each workload once, with its command; web,
    // whose budget lets no pod go now, last. (The budgets are read every 2 s: wait for them.)
    let rows = eventually(Duration::from_secs(10), || async {
        let (code, out, err) = meshca(&dir, &["--output", "json", "anchors", "restarts"]).await;
        assert_eq!(code, 1, "stale proxies left: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let rows: Vec<(String, u64, Value, String)> = v["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    format!(
                        "{}/{}",
                        w["namespace"].as_str().unwrap(),
                        w["owner"].as_str().unwrap()
                    ),
                    w["stale_pods"].as_u64().unwrap(),
                    w["disruptions_allowed"].clone(),
                    w["command"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        rows.iter()
            .all(|r| r.0.starts_with("linkerd/") || !r.2.is_null())
            .then_some(rows)
    })
    .await
    .expect("the budgets are read");
    assert_eq!(
        rows,
        vec![
            (
                "linkerd/Deployment/linkerd-destination".into(),
                1,
                Value::Null,
                "kubectl -n linkerd rollout restart deployment/linkerd-destination".into()
            ),
            (
                "prod/StatefulSet/db".into(),
                1,
                json!(1),
                "kubectl -n prod rollout restart statefulset/db".into()
            ),
            (
                "prod/Deployment/web".into(),
                2,
                json!(0),
                "kubectl -n prod rollout restart deployment/web".into()
            ),
        ]
    );
    let (_, text, _) = meshca(&dir, &["anchors", "restarts"]).await;
    assert!(
        text.contains("(PDB web allows no disruption now: last)"),
        "{text}"
    );

    // The rollouts: new pods (made after the roots changed) replace the old, one workload at a
    // time; the gate stays closed until the last old proxy is gone.
    let after = since + Duration::from_secs(2);
    let d = ("Deployment", "linkerd-destination");
    fake.remove("pods", "linkerd", "linkerd-destination-7d9f-a");
    pod(
        &fake,
        "linkerd",
        "linkerd-destination-7d9f-c",
        d,
        true,
        after,
    );
    for (old, new) in [("web-7d9f-a", "web-7d9f-c"), ("web-7d9f-b", "web-7d9f-d")] {
        fake.remove("pods", "prod", old);
        pod(&fake, "prod", new, ("Deployment", "web"), true, after);
    }
    let one_left = eventually(Duration::from_secs(5), || async {
        let (code, _, err) = meshca(&dir, &["anchors", "activate"]).await;
        (code != 0 && err.contains("1 Linkerd proxies")).then_some(())
    })
    .await;
    assert!(one_left.is_some(), "db-0 alone keeps the gate closed");
    fake.remove("pods", "prod", "db-0");
    pod(&fake, "prod", "db-0", ("StatefulSet", "db"), true, after);
    let activated = eventually(Duration::from_secs(5), || async {
        (meshca(&dir, &["anchors", "activate"]).await.0 == 0).then_some(())
    })
    .await;
    assert!(
        activated.is_some(),
        "every proxy replaced: activate goes through"
    );
    println!(
        "the gate followed the pods: closed for 4, then 1 stale proxy; opened once none was left"
    );
}

/// Negative control: with the gate forced, the new anchor signs while a proxy started before
/// staging still trusts only the old one — its real TLS verification of a new leaf fails (and a
/// proxy started after the roots changed verifies it).
#[tokio::test]
async fn negative_control_forced_activation_breaks_old_proxies() {
    let (fake, srv, clock) = mesh().await;
    let dir = srv.server().state_dir.clone();
    // What an old proxy holds: the roots when its pod was made.
    let (old_roots, _) = roots_with(&fake, 1).await;
    let old_proxy = sign(&srv, "spiffe://cluster.local/ns/default/sa/web").await;
    stage_and_wait(&fake, &srv, &clock).await;
    let (new_roots, _) = roots_with(&fake, 2).await;
    let (code, _, err) = meshca(&dir, &["anchors", "activate", "--force"]).await;
    assert_eq!(code, 0, "{err}");
    let new_leaf = sign(&srv, "spiffe://cluster.local/ns/default/sa/api").await;
    let stale = Workload {
        bundle: pem_certs(&old_roots),
        ..old_proxy.clone()
    };
    let fresh = Workload {
        bundle: pem_certs(&new_roots),
        ..old_proxy
    };
    let e = mtls_handshake(&stale, &new_leaf)
        .await
        .expect_err("a proxy holding only the old anchor must not verify a new-anchor leaf");
    println!("old proxy verifying a new-anchor leaf: {e}");
    mtls_handshake(&fresh, &new_leaf)
        .await
        .expect("a proxy started after the roots changed verifies it");
}
