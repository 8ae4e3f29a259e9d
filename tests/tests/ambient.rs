//! Istio ambient: a node agent (ztunnel) asks for the certificates of the pods on its node
//! (`ImpersonatedIdentity`). On Kubernetes against the in-test API server (pods, bound tokens,
//! watches: not a real cluster, see tests/README.md); outside it with static node-agent tokens.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};

use ca_server::config::AuthMethod;
use ca_server::impersonation::PodDirectory;
use meshca_proto::istio::IstioCertificateResponse;
use meshca_tests::kubeapi::{KubeApi, jwt};
use meshca_tests::{
    TestServer, bin, eventually, http_get, istio, istio_impersonating, istio_request, pem_certs,
    with_token,
};
use rotator::client::{Identity, spiffe_id_of, verify_svid};
use rotator::pki::SecretKey;
use tonic::Code;

const TD: &str = "spiffe://cluster.local";

fn id(path: &str) -> String {
    format!("{TD}{path}")
}

/// The leaf of an Istio answer verifies (rustls-webpki, the server's bundle, client auth) and
/// carries exactly `want`.
fn assert_leaf_for(srv: &TestServer, r: &IstioCertificateResponse, want: &str) {
    let chain: Vec<_> = r.cert_chain.iter().flat_map(|p| pem_certs(p)).collect();
    assert_eq!(chain.len(), 3, "leaf, issuer, root");
    verify_svid(
        &chain[..2],
        &srv.bundle(),
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the leaf verifies against the bundle");
    assert_eq!(spiffe_id_of(&chain[0]).unwrap().to_string(), want);
}

/// ztunnel's request for `workload` with `token`: (status code, message) or the answer.
async fn ask(
    srv: &TestServer,
    token: &str,
    workload: &str,
    impersonated: Option<&str>,
) -> Result<IstioCertificateResponse, (Code, String)> {
    let key = SecretKey::generate_p256().unwrap();
    let req = match impersonated {
        Some(i) => istio_impersonating(workload, i, &key),
        None => istio_request(workload, &key, 0),
    };
    istio(srv, None)
        .create_certificate(with_token(req, token))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// How long the pod directory takes to show `want` for (node, ns, sa) after `change` ran
/// (woken by the directory's own change notification, not by polling).
async fn directory_delay(
    srv: &TestServer,
    (node, ns, sa): (&str, &str, &str),
    want: bool,
    change: impl FnOnce(),
) -> Duration {
    let pods = srv.server().pods.clone().expect("the pod directory runs");
    let t = Instant::now();
    change();
    loop {
        // Subscribed before the check: a change between the two is not missed.
        let next = pods.changed();
        if pods.on_node(node, ns, sa) == Ok(want) {
            return t.elapsed();
        }
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .unwrap_or_else(|_| panic!("the directory never showed {sa} on {node} = {want}"));
    }
}

#[tokio::test]
async fn ztunnel_gets_certificates_for_pods_on_its_own_node_only() {
    let fake = KubeApi::start().await;
    let sa = |ns: &str, name: &str| format!("system:serviceaccount:{ns}:{name}");
    // ztunnel on node-a (a 1.30+ API server names the node); on node-b (an older one names only
    // the pod: meshca finds its node in the pod directory).
    fake.add_bound_token(
        "ztunnel-a",
        &sa("istio-system", "ztunnel"),
        &["istio-ca"],
        "ztunnel-a",
        Some("node-a"),
    );
    fake.add_bound_token(
        "ztunnel-b",
        &sa("istio-system", "ztunnel"),
        &["istio-ca"],
        "ztunnel-b",
        None,
    );
    fake.add_bound_token(
        "rogue",
        &sa("prod", "rogue"),
        &["istio-ca"],
        "rogue-1",
        Some("node-a"),
    );
    fake.add_token("web", &sa("prod", "web"), &["istio-ca"]);
    fake.put_pod(
        "istio-system",
        "ztunnel-a",
        Some("node-a"),
        "ztunnel",
        "Running",
    );
    fake.put_pod(
        "istio-system",
        "ztunnel-b",
        Some("node-b"),
        "ztunnel",
        "Running",
    );
    fake.put_pod("prod", "web-1", Some("node-a"), "web", "Running");
    fake.put_pod("prod", "api-1", Some("node-b"), "api", "Running");
    fake.put_pod("prod", "rogue-1", Some("node-a"), "rogue", "Running");
    let srv = TestServer::start_with(|c| {
        c.kubernetes.enabled = true;
        c.kubernetes.api_url = fake.url.clone();
        c.kubernetes.namespace = "meshca".into();
        c.kubernetes.state_secret.clear();
        c.auth.authenticators = vec![AuthMethod::Mtls, AuthMethod::Tokenreview];
        c.istio.trusted_node_agents = vec!["istio-system/ztunnel".into()];
        c.istio.node_authorization_wait = Duration::from_millis(500);
    })
    .await;
    let pods = srv.server().pods.clone().expect("the pod directory runs");
    eventually(Duration::from_secs(5), || {
        let pods = pods.clone();
        async move { (pods.len() == 5).then_some(()) }
    })
    .await
    .expect("the pod directory lists the cluster's pods");
    let (za, zb, web, api) = (
        jwt("ztunnel-a"),
        jwt("ztunnel-b"),
        id("/ns/prod/sa/web"),
        id("/ns/prod/sa/api"),
    );

    // Pods on its own node: granted, whichever way its node is known.
    let r = ask(&srv, &za, &web, Some(&web))
        .await
        .expect("web is on node-a");
    assert_leaf_for(&srv, &r, &web);
    let r = ask(&srv, &zb, &api, Some(&api))
        .await
        .expect("api is on node-b");
    assert_leaf_for(&srv, &r, &api);

    // Refusals, each with its code and the rule.
    let nopod = id("/ns/prod/sa/batch");
    // (token, what, CSR identity, ImpersonatedIdentity, code, what the message says)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Code, &'a str);
    let cases: [Case; 7] = [
        // A pod on another node; a ServiceAccount with no pod: retryable, naming the node.
        (
            &za,
            "api on node-b",
            &api,
            Some(&api),
            Code::Unavailable,
            "on its node node-a",
        ),
        (
            &za,
            "no pod",
            &nopod,
            Some(&nopod),
            Code::Unavailable,
            "prod/batch",
        ),
        // Not a trusted agent, though its token is bound to a pod on node-a.
        (
            &jwt("rogue"),
            "rogue",
            &web,
            Some(&web),
            Code::PermissionDenied,
            "trusted_node_agents",
        ),
        // A workload naming itself is still not an agent.
        (
            &jwt("web"),
            "self",
            &web,
            Some(&web),
            Code::PermissionDenied,
            "trusted_node_agents",
        ),
        // The metadata must name the CSR's identity.
        (
            &za,
            "mismatch",
            &api,
            Some(&web),
            Code::PermissionDenied,
            "must equal the CSR's URI SAN",
        ),
        // Without the metadata an agent is an ordinary caller: its own identity only.
        (
            &za,
            "no metadata",
            &web,
            None,
            Code::PermissionDenied,
            "may not request",
        ),
        // Another trust domain, never.
        (
            &za,
            "foreign",
            "spiffe://evil.example/ns/prod/sa/web",
            Some("spiffe://evil.example/ns/prod/sa/web"),
            Code::PermissionDenied,
            "outside this authority's trust domain",
        ),
    ];
    for (token, what, workload, imp, code, says) in cases {
        let (c, m) = ask(&srv, token, workload, imp)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(c, code, "{what}: {m}");
        assert!(m.contains(says), "{what}: {m:?} does not say {says:?}");
    }
    // A workload's own token works as before.
    let r = ask(&srv, &jwt("web"), &web, None)
        .await
        .expect("web for itself");
    assert_leaf_for(&srv, &r, &web);

    // The directory follows pods created, moved and deleted; each delay measured.
    let late = id("/ns/prod/sa/late");
    let created = directory_delay(&srv, ("node-a", "prod", "late"), true, || {
        fake.put_pod("prod", "late-1", Some("node-a"), "late", "Pending");
    })
    .await;
    ask(&srv, &za, &late, Some(&late))
        .await
        .expect("a pod starting on node-a");
    let moved = directory_delay(&srv, ("node-a", "prod", "late"), false, || {
        fake.remove("pods", "prod", "late-1");
        fake.put_pod("prod", "late-2", Some("node-b"), "late", "Running");
    })
    .await;
    assert_eq!(
        ask(&srv, &za, &late, Some(&late))
            .await
            .map(|_| ())
            .unwrap_err()
            .0,
        Code::Unavailable,
        "moved away from node-a"
    );
    ask(&srv, &zb, &late, Some(&late))
        .await
        .expect("now on node-b");
    let deleted = directory_delay(&srv, ("node-b", "prod", "api"), false, || {
        fake.remove("pods", "prod", "api-1");
    })
    .await;
    assert_eq!(
        ask(&srv, &zb, &api, Some(&api))
            .await
            .map(|_| ())
            .unwrap_err()
            .0,
        Code::Unavailable,
        "api-1 deleted"
    );
    // Pod churn: a request that arrives before the directory has seen the pod waits for it.
    let fresh = id("/ns/prod/sa/fresh");
    let t = Instant::now();
    let asked = ask(&srv, &za, &fresh, Some(&fresh));
    fake.put_pod("prod", "fresh-1", Some("node-a"), "fresh", "Pending");
    asked
        .await
        .expect("a pod scheduled a moment ago is not refused");
    println!(
        "pod directory delay: created {created:?}, moved {moved:?}, deleted {deleted:?}; a request racing a new pod answered in {:?}",
        t.elapsed()
    );

    // Audit trail: the ledger records who asked for whom and from which node; metrics say so.
    let records = srv
        .server()
        .authority
        .ledger()
        .with(|l| l.records().collect::<Vec<_>>());
    let via = |w: &str| {
        records
            .iter()
            .filter(|r| r.spiffe_id == w)
            .map(|r| r.via.clone().unwrap_or_else(|| "itself".into()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let z = |node: &str| format!("k8s:istio-system/ztunnel@{node}");
    assert_eq!(via(&api), [z("node-b")].into());
    assert_eq!(via(&late), [z("node-a"), z("node-b")].into());
    assert_eq!(via(&fresh), [z("node-a")].into());
    assert_eq!(via(&web), [z("node-a"), "itself".to_owned()].into());
    let metrics = http_get(srv.server().http_addr, "/metrics").await.1;
    for line in [
        r#"meshca_certificates_issued_total{api="istio",result="ok",impersonated="true"} 5"#,
        r#"meshca_certificates_issued_total{api="istio",result="ok",impersonated="false"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in /metrics");
    }
    // No TokenReview per request beyond the cached answers, no pod lookup per request.
    assert_eq!(fake.count("create", "tokenreviews"), 4);
    assert_eq!(fake.count("get", "pods"), 0);
}

/// Runs the `meshca` CLI (off the async runtime): (success, stdout, stderr).
async fn meshca(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin("meshca"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn outside_kubernetes_a_static_token_is_a_node_agent_only_when_declared() {
    let srv = TestServer::start_with(|c| {
        // Ordinary callers: a burst of 3; node agents: their own, larger budget.
        c.limits.issue_rate = 1;
        c.limits.issue_burst = 3;
        c.limits.node_agent_issue_rate = 1;
        c.limits.node_agent_issue_burst = 10;
    })
    .await;
    let dir = srv.server().state_dir.display().to_string();
    let add = |extra: &[&str]| {
        let mut a: Vec<String> = ["token", "add", "--state-dir", &dir, "--output", "json"]
            .iter()
            .map(ToString::to_string)
            .collect();
        a.extend(extra.iter().map(ToString::to_string));
        meshca(a)
    };
    let ztunnel = id("/ns/istio-system/sa/ztunnel");
    let prod = id("/ns/prod/sa/*");
    // Never implicitly: each flag needs the other.
    for bad in [
        vec!["--name", "z", "--allow", &ztunnel, "--node-agent"],
        vec!["--name", "z", "--allow", &ztunnel, "--may-request", &prod],
    ] {
        let (ok, _, err) = add(&bad).await;
        assert!(!ok, "{bad:?} was accepted");
        assert!(
            err.contains("--node-agent") || err.contains("--may-request"),
            "{err}"
        );
    }
    let (ok, out, err) = add(&[
        "--name",
        "ztunnel",
        "--allow",
        &ztunnel,
        "--node-agent",
        "--may-request",
        &prod,
    ])
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v.as_object().unwrap().len(),
        2,
        "{out}: name and token only"
    );
    let agent = v["token"].as_str().unwrap().to_owned();
    let (ok, out, _) = meshca(vec![
        "token".into(),
        "list".into(),
        "--state-dir".into(),
        dir.clone(),
        "--output".into(),
        "json".into(),
    ])
    .await;
    assert!(ok && out.contains(&prod), "{out}");

    let web = id("/ns/prod/sa/web");
    let r = eventually(Duration::from_secs(5), || async {
        ask(&srv, &agent, &web, Some(&web)).await.ok()
    })
    .await
    .expect("the node agent token gets prod/web once the server has read it");
    assert_leaf_for(&srv, &r, &web);
    // Outside its patterns; without the metadata; its own identity as ever.
    let admin = id("/ns/kube-system/sa/admin");
    let (c, m) = ask(&srv, &agent, &admin, Some(&admin))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("--may-request patterns are"), "{m}");
    assert_eq!(
        ask(&srv, &agent, &web, None)
            .await
            .map(|_| ())
            .unwrap_err()
            .0,
        Code::PermissionDenied,
        "without ImpersonatedIdentity it asks for itself"
    );
    ask(&srv, &agent, &ztunnel, None)
        .await
        .expect("its own identity");
    // The bootstrap token may request all of default/*, but is no node agent.
    let d = id("/ns/default/sa/web");
    let (c, m) = ask(&srv, &srv.token, &d, Some(&d))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("--node-agent"), "{m}");
    // Neither is a client certificate.
    let leaf_key = SecretKey::generate_p256().unwrap();
    let own = istio(&srv, None)
        .create_certificate(with_token(istio_request(&d, &leaf_key, 0), &srv.token))
        .await
        .unwrap()
        .into_inner();
    let me = Identity {
        chain: own
            .cert_chain
            .iter()
            .flat_map(|p| pem_certs(p))
            .take(2)
            .collect(),
        key: leaf_key,
    };
    let k2 = SecretKey::generate_p256().unwrap();
    let e = istio(&srv, Some(&me))
        .create_certificate(istio_impersonating(&d, &d, &k2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());

    // The node agent's budget is its own: 8 quick requests pass where an ordinary caller's
    // burst of 3 is spent.
    for n in 0..8 {
        let w = id(&format!("/ns/prod/sa/w{n}"));
        ask(&srv, &agent, &w, Some(&w))
            .await
            .unwrap_or_else(|e| panic!("node agent request {n}: {e:?}"));
    }
    let mut limited = 0;
    for _ in 0..5 {
        if let Err((Code::ResourceExhausted, m)) = ask(&srv, &srv.token, &d, None).await {
            assert!(m.contains("limits.issue_rate"), "{m}");
            limited += 1;
        }
    }
    assert!(limited >= 1, "the ordinary caller's burst is smaller");
    let metrics = http_get(srv.server().http_addr, "/metrics").await.1;
    assert!(
        metrics.contains(
            r#"meshca_certificates_issued_total{api="istio",result="ok",impersonated="true"} 9"#
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("certificates_issued"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
