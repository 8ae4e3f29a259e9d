//! Replicas on a real kube-apiserver (issue #24): the state Secret under real resourceVersion
//! conflicts, Lease fail-over of two `meshca-server` processes under SIGKILL, a denial and a
//! federated bundle reaching every replica through the Secret, and the cert-manager issuer Secret
//! followed with the cert-manager overlay's RBAC alone. meshca runs as its own ServiceAccount
//! with the RBAC `deploy/kubernetes` renders (`meshca_tests::cluster::env`).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ca_server::config::{AuthMethod, Config};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use meshca_tests::cluster::{Env, NEWEST, env, env_in, kube_mode, sign};
use meshca_tests::{
    TestServer, Workload, eventually, http_get, meshca_in, sign_request, with_token,
};
use rotator::client::make_csr;
use rotator::pki::SecretKey;
use serde_json::json;
use tonic::Code;

const SECRET: &str = "meshca-authority";

/// A replica as `e`'s ServiceAccount: state in the Secret, its Lease identity `name`, bundles
/// published to namespaces labelled `meshca.io/bundle-for=<ns>`.
fn replica<'a>(e: &'a Env, name: &'static str) -> impl FnOnce(&mut Config) + 'a {
    move |c: &mut Config| {
        kube_mode(e, c);
        c.kubernetes.state_secret = SECRET.into();
        c.kubernetes.identity = name.into();
        c.kubernetes.lease_duration = Duration::from_secs(2);
        c.kubernetes.bundle.namespace_selector = format!("meshca.io/bundle-for={}", e.ns);
        c.kubernetes.bundle.resync = Duration::from_millis(300);
        c.auth.authenticators = vec![AuthMethod::Mtls, AuthMethod::Tokenreview];
    }
}

fn leader(s: &TestServer) -> bool {
    *s.server().leader.borrow()
}

/// The state Secret as the API server holds it, decoded as meshca would.
async fn stored_state(e: &Env) -> Option<rotator::state::AuthorityState> {
    let s = Api::<Secret>::namespaced(e.admin.clone(), &e.ns)
        .get_opt(SECRET)
        .await
        .unwrap()?;
    let data = s.data?.into_iter().map(|(k, v)| (k, v.0)).collect();
    rotator::store::decode_flat("test", &data).unwrap()
}

/// The generation annotation on the state Secret.
async fn secret_generation(e: &Env) -> u64 {
    Api::<Secret>::namespaced(e.admin.clone(), &e.ns)
        .get(SECRET)
        .await
        .unwrap()
        .metadata
        .annotations
        .and_then(|a| a.get("meshca.io/generation").cloned())
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// The API server's own count of `409 Conflict` answers to replacing a Secret (its `/metrics`).
async fn secret_conflicts(e: &Env) -> u64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = e.admin.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("code=\"409\"")
                && l.contains("resource=\"secrets\"")
                && l.contains("verb=\"PUT\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Another client (a backup tool, `kubectl annotate`) writes the state Secret after meshca read
/// it, and two replicas race to stage an anchor: the API server answers 409 to the stale
/// replaces, meshca reads again and decides again — exactly one stage, the other writer's
/// annotation kept, both replicas on the committed state. (The negative control, a store that
/// ignores resourceVersions, needs a server that can be made to: it stays on the in-test API
/// server, `kubernetes.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_racing_meshca_on_the_state_secret_loses_nothing() {
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let a = TestServer::start_with(replica(&e, "replica-a")).await;
    let b = TestServer::start_with(replica(&e, "replica-b")).await;
    let conflicts = secret_conflicts(&e).await;
    Api::<Secret>::namespaced(e.admin.clone(), &e.ns)
        .patch(
            SECRET,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"backup.example.com/taken": "yes"}}}),
            ),
        )
        .await
        .unwrap();
    let before = secret_generation(&e).await;
    let stage = |srv: &TestServer| {
        let au = srv.server().authority.clone();
        async move {
            let policy = au.policy().clone();
            au.transition(|s, now| {
                s.stage_anchor(&policy, now, rotator::anchors::NewAnchor::Generate)
                    .map(Some)
            })
            .await
        }
    };
    let (ra, rb) = tokio::join!(stage(&a), stage(&b));
    assert!(ra.is_ok() != rb.is_ok(), "exactly one stage: {ra:?} {rb:?}");
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(
        loser.unwrap_err().to_string().contains("stag"),
        "the loser re-decided on the winner's state"
    );
    let answered = secret_conflicts(&e).await - conflicts;
    assert!(
        answered > 0,
        "the API server answered 409 to a stale replace"
    );
    let stored = Api::<Secret>::namespaced(e.admin.clone(), &e.ns)
        .get(SECRET)
        .await
        .unwrap();
    let ann = stored.metadata.annotations.unwrap_or_default();
    assert_eq!(
        ann.get("backup.example.com/taken").map(String::as_str),
        Some("yes"),
        "their annotation survived"
    );
    let after = secret_generation(&e).await;
    assert!(
        after > before,
        "committed on top of the other writer's change"
    );
    eventually(Duration::from_secs(10), || async {
        let g = secret_generation(&e).await;
        (a.server().authority.state().await.generation == g
            && b.server().authority.state().await.generation == g)
            .then_some(())
    })
    .await
    .expect("both replicas hold the committed state");
    let st = a.server().authority.state().await;
    let stages = st
        .history
        .iter()
        .filter(|h| h.generation > before && h.what.to_lowercase().contains("stage"))
        .count();
    assert_eq!(stages, 1, "one stage in the journal: {:#?}", st.history);
    println!(
        "race: {answered} conflict(s) answered by kube-apiserver; generation {before} -> {after}"
    );
}

/// The prepared (next) issuer, if any.
fn prepared_issuer(st: &rotator::state::AuthorityState) -> Option<rotator::pki::CertId> {
    st.issuers
        .iter()
        .find(|i| i.status == rotator::state::IssuerStatus::Prepared)
        .map(|i| i.cert.id().clone())
}

/// A replica's config file: `e`'s kubeconfig, a Lease of 2 s, issuers that rotate in seconds
/// (prepared 18 s after notBefore, active at 24 s).
fn replica_toml(e: &Env, name: &str) -> String {
    format!(
        r#"
[auth]
authenticators = ["mtls", "tokenreview"]
[kubernetes]
enabled = true
kubeconfig = "{kubeconfig}"
namespace = "{ns}"
identity = "{name}"
lease_duration = "2s"
[kubernetes.bundle]
namespace_selector = "meshca.io/bundle-for={ns}"
resync = "500ms"
[policy]
leaf_ttl_default = "5s"
leaf_ttl_min = "2s"
leaf_ttl_max = "10s"
clock_skew = "1s"
issuer_ttl = "36s"
propagation_allowance = "5s"
"#,
        kubeconfig = e.kubeconfig.display(),
        ns = e.ns,
    )
}

/// Two real `meshca-server` processes as meshca's ServiceAccount; the Lease holder is SIGKILLed
/// after it prepared the next issuer; the other takes the Lease within the lease duration and
/// activates that issuer (resumed, not prepared again); signing over gRPC with a real
/// ServiceAccount token never fails on the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_fail_over_on_sigkill() {
    use meshca_tests::ServerProcess;
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 3600, None)
        .await;
    let web = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    for name in ["meshca-a", "meshca-b"] {
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, replica_toml(&e, name)).unwrap();
        let dir = tmp.path().join(name);
        let cfg = cfg.display().to_string();
        let p = tokio::task::spawn_blocking(move || {
            ServerProcess::spawn(&dir, &["--config", &cfg], &[]).expect("replica starts")
        })
        .await
        .unwrap();
        assert!(
            p.banner.contains(&format!("secret {}/{SECRET}", e.ns)),
            "{}",
            p.banner
        );
        procs.push(Some((name, p, tmp.path().join(name).join("bundle.pem"))));
    }
    let leases = Api::<Lease>::namespaced(e.admin.clone(), &e.ns);
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("meshca-rotation")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
        }
    };
    let first = eventually(Duration::from_secs(20), holder)
        .await
        .expect("a replica holds the Lease");
    let leader_ix = procs
        .iter()
        .position(|p| p.as_ref().unwrap().0 == first)
        .unwrap();

    // Signers: one per replica, over gRPC/TLS, with prod/web's ServiceAccount token.
    let stop = Arc::new(AtomicBool::new(false));
    let mut signers = Vec::new();
    // (signed, failed, alive)
    let counts: Vec<_> = (0..2)
        .map(|_| Arc::new((AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(true))))
        .collect();
    for (ix, p) in procs.iter().enumerate() {
        let (_, proc_, bundle) = p.as_ref().unwrap();
        let url = proc_.url.clone();
        let roots = meshca_tests::pem_certs(&std::fs::read_to_string(bundle).unwrap());
        let (stop, count, token, web) =
            (stop.clone(), counts[ix].clone(), token.clone(), web.clone());
        signers.push(tokio::spawn(async move {
            let tls = rotator::client::client_tls(&roots, None).unwrap();
            let mut client = meshca_proto::v1::identity_service_client::IdentityServiceClient::new(
                rotator::client::channel(&url, tls).unwrap(),
            );
            while !stop.load(Ordering::SeqCst) && count.2.load(Ordering::SeqCst) {
                let key = SecretKey::generate_p256().unwrap();
                let csr = make_csr(&web.parse().unwrap(), &key).unwrap();
                match client
                    .sign_certificate(with_token(sign_request(csr), &token))
                    .await
                {
                    Ok(_) => count.0.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("replica {ix}: {e:?}");
                        count.1.fetch_add(1, Ordering::SeqCst)
                    }
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    let prepared = eventually(Duration::from_secs(40), || async {
        prepared_issuer(&stored_state(&e).await?)
    })
    .await
    .expect("the leader prepared the next issuer");
    // SIGKILL the leader; its signer stops (its failures from here on are expected).
    let (name, leader, _) = procs[leader_ix].take().unwrap();
    counts[leader_ix].2.store(false, Ordering::SeqCst);
    let killed_at = tokio::time::Instant::now();
    tokio::task::spawn_blocking(move || leader.kill())
        .await
        .unwrap();
    let before_kill = counts[leader_ix].0.load(Ordering::SeqCst);
    let other = procs.iter().flatten().next().unwrap().0;
    eventually(Duration::from_secs(15), || async {
        (holder().await.as_deref() == Some(other)).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{other} takes the Lease after {name} is killed"));
    let takeover = killed_at.elapsed();
    eventually(Duration::from_secs(30), || async {
        let st = stored_state(&e).await?;
        (st.active_issuer()?.cert.id() == &prepared).then_some(())
    })
    .await
    .expect("the survivor activated the issuer the dead leader prepared");
    tokio::time::sleep(Duration::from_millis(500)).await; // let the survivor sign under it
    stop.store(true, Ordering::SeqCst);
    for s in signers {
        s.await.unwrap();
    }
    let survivor = &counts[1 - leader_ix];
    let (ok, failed) = (
        survivor.0.load(Ordering::SeqCst),
        survivor.1.load(Ordering::SeqCst),
    );
    println!(
        "processes on kube-apiserver {NEWEST}: {name} SIGKILLed, {other} held the Lease {takeover:?} later; \
         survivor signed {ok}, failed {failed}; the leader signed {before_kill} before it died"
    );
    // The Lease is 2 s; a real API server adds the renew period and a round trip or two.
    assert!(
        takeover <= Duration::from_secs(5),
        "took over in {takeover:?} (lease 2 s)"
    );
    assert_eq!(failed, 0, "the survivor failed to sign");
    assert!(
        ok > 20 && before_kill > 5,
        "both signed: survivor {ok}, leader {before_kill}"
    );
    let st = stored_state(&e).await.unwrap();
    let prepares = st
        .history
        .iter()
        .filter(|h| h.what.contains(prepared.as_str()) && h.what.contains("prepar"))
        .count();
    assert_eq!(
        prepares, 1,
        "resumed, not prepared again: {:#?}",
        st.history
    );
}

/// `meshca deny` on one replica: the other refuses the identity as soon as it follows the
/// Secret (the deny list is part of the authority state), with the reason given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_reaches_every_replica_through_the_secret() {
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let c = e.cluster;
    let prod = c.namespace(&e.admin, "prod").await;
    c.service_account(&e.admin, &prod, "web").await;
    let token = c
        .token(&e.admin, &prod, "web", &["meshca"], 3600, None)
        .await;
    let web = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let a = TestServer::start_with(replica(&e, "meshca-a")).await;
    let b = TestServer::start_with(replica(&e, "meshca-b")).await;
    assert_eq!(sign(&b, &web, &token).await.unwrap(), web, "signs on b");
    let (code, _, err) = meshca_in(
        &a.state_dir(),
        &["deny", "add", &web, "--reason", "token leaked"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, _) = sign(&a, &web, &token).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "on the replica that took it");
    let followed = eventually(Duration::from_secs(10), || async {
        sign(&b, &web, &token)
            .await
            .err()
            .filter(|(c, m)| *c == Code::PermissionDenied && m.contains("token leaked"))
    })
    .await;
    assert!(followed.is_some(), "replica b never refused {web}");
    assert!(
        stored_state(&e)
            .await
            .unwrap()
            .denial_for(&web.parse().unwrap(), time::OffsetDateTime::now_utc())
            .is_some(),
        "the Secret holds the denial"
    );
}

/// Federation on Kubernetes: the leader holds a federated trust domain's bundle (here its
/// bootstrap bundle; the endpoint is down) in the state Secret, the other replica follows it,
/// only the leader refreshes it, and it is published as `<configmap>-federated-<td>` beside the
/// local bundle ConfigMap in each labelled namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_reaches_the_secret_every_replica_and_a_configmap() {
    let Some(e) = env(NEWEST, None).await else {
        return;
    };
    let apps = format!("{}-apps", e.ns);
    e.cluster
        .namespace_named(
            &e.admin,
            &apps,
            [("meshca.io/bundle-for".to_owned(), e.ns.clone())].into(),
        )
        .await;
    let files = tempfile::tempdir().unwrap();
    let (down, anchor) = meshca_tests::unreachable_peer(files.path(), "b.example");
    let federated = |name: &'static str| {
        let (e, down) = (&e, down.clone());
        move |c: &mut Config| {
            replica(e, name)(c);
            c.federation.refresh_min = Duration::from_millis(200);
            c.federation.trust_domains = vec![down];
        }
    };
    let a = TestServer::start_with(federated("meshca-a")).await;
    let b = TestServer::start_with(federated("meshca-b")).await;
    let want = vec![anchor.clone()];
    for s in [&a, &b] {
        eventually(Duration::from_secs(15), || async {
            s.server()
                .authority
                .snapshot()
                .bundle
                .federated
                .iter()
                .any(|f| f.trust_domain.as_str() == "b.example" && f.anchors == want)
                .then_some(())
        })
        .await
        .expect("every replica holds b.example's bundle");
    }
    assert!(
        stored_state(&e)
            .await
            .unwrap()
            .federated_bundle(&"b.example".parse().unwrap())
            .is_some(),
        "the Secret holds it"
    );
    let refreshing = |s: &TestServer| {
        s.server()
            .federation
            .statuses()
            .values()
            .next()
            .is_some_and(|st| st.refreshing)
    };
    eventually(Duration::from_secs(15), || async {
        (refreshing(&a) != refreshing(&b) && refreshing(&a) == leader(&a)).then_some(())
    })
    .await
    .expect("the leader refreshes, the other does not");
    let cms = Api::<ConfigMap>::namespaced(e.admin.clone(), &apps);
    let cm = eventually(Duration::from_secs(15), || async {
        cms.get_opt("meshca-trust-bundle-federated-b.example")
            .await
            .unwrap()
    })
    .await
    .expect("published beside the bundle");
    let data = cm.data.unwrap_or_default();
    assert_eq!(
        data.get("ca-bundle.crt").map(String::as_str),
        Some(pem::encode(&pem::Pem::new("CERTIFICATE", anchor.to_vec())).as_str())
    );
    assert_eq!(
        cm.metadata
            .annotations
            .unwrap_or_default()
            .get("meshca.io/bundle-version")
            .map(String::as_str),
        Some("0")
    );
}

/// A CA certificate for tests: `cn`, valid from `from` ago to `until` from now, signed by
/// `parent` (self-signed when `None`). Returns its PEM and key.
fn ca(
    cn: &str,
    parent: Option<(&rotator::pki::CaCert, &SecretKey)>,
    from: Duration,
    until: Duration,
) -> (String, SecretKey) {
    let key = SecretKey::generate_p256().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - from;
    p.not_after = now + until;
    let pem = match parent {
        None => p.self_signed(&key).unwrap().pem(),
        Some((c, k)) => p
            .signed_by(&key, &c.rcgen_issuer(k.clone()).unwrap())
            .unwrap()
            .pem(),
    };
    (pem, key)
}

/// cert-manager's Secret, written by server-side apply as cert-manager writes it: `tls.crt`,
/// `tls.key`, `ca.crt`. A real API server refuses a `kubernetes.io/tls` Secret without both
/// `tls.crt` and `tls.key`; an empty `tls.key` is what "no key" can look like here.
async fn tls_secret(e: &Env, crt: &str, key: Option<&SecretKey>, ca: &str) {
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let doc = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "linkerd-identity-issuer"},
        "type": "kubernetes.io/tls",
        "data": {
            "ca.crt": b(ca),
            "tls.crt": b(crt),
            "tls.key": b(&key.map(SecretKey::to_pem).unwrap_or_default()),
        },
    });
    Api::<Secret>::namespaced(e.admin.clone(), e.other("linkerd"))
        .patch(
            "linkerd-identity-issuer",
            &PatchParams::apply("cert-manager").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap();
}

/// cert-manager renews Linkerd's identity issuer in a `kubernetes.io/tls` Secret: meshca (with
/// the cert-manager overlay's RBAC: get and watch of that one Secret) adopts each good renewal,
/// refuses each bad one (counted; the last good issuer keeps signing), and adopts a good one
/// after bad ones. A Secret without `tls.key` cannot be written to a real API server: the test
/// shows that too.
#[tokio::test]
async fn a_cert_manager_issuer_secret_is_followed_and_a_bad_renewal_is_refused() {
    const DAY: Duration = Duration::from_secs(86400);
    let Some(e) = env_in(
        NEWEST,
        "deploy/kubernetes/overlays/cert-manager",
        &["linkerd"],
        None,
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, root_key) = ca("root", None, DAY, DAY * 3650);
    let root = rotator::pki::CaCert::from_pem(&root_pem).unwrap();
    std::fs::write(dir.path().join("root.pem"), &root_pem).unwrap();
    let issuer = |days: u32| {
        let (pem, key) = ca(
            "identity.linkerd.cluster.local",
            Some((&root, &root_key)),
            DAY,
            DAY * days,
        );
        let id = rotator::pki::CaCert::from_pem(&pem)
            .unwrap()
            .id()
            .to_string();
        (pem, key, id)
    };
    let (crt1, key1, id1) = issuer(365);
    tls_secret(&e, &crt1, Some(&key1), &root_pem).await;
    // What a real API server refuses outright: a TLS Secret with no key at all.
    let bare = Api::<Secret>::namespaced(e.admin.clone(), e.other("linkerd"))
        .patch(
            "linkerd-identity-issuer-bare",
            &PatchParams::apply("cert-manager").force(),
            &Patch::Apply(&json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "linkerd-identity-issuer-bare"},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": "eA=="},
            })),
        )
        .await;
    assert!(bare.is_err(), "a kubernetes.io/tls Secret needs tls.key");
    let anchor = dir.path().join("root.pem");
    let secret = format!("{}/linkerd-identity-issuer", e.other("linkerd"));
    let srv = TestServer::start_with(|c| {
        kube_mode(&e, c);
        c.anchor_cert = Some(anchor.clone());
        c.kubernetes.issuer_secret = secret.clone();
        c.auth.authenticators = vec![AuthMethod::Mtls, AuthMethod::Static];
    })
    .await;
    let active = || async {
        srv.server()
            .authority
            .read(|s| s.active_issuer().map(|i| i.cert.id().to_string()))
            .await
    };
    let became = |want: String| {
        let active = &active;
        async move {
            eventually(Duration::from_secs(10), || {
                let want = want.clone();
                async move { (active().await.as_deref() == Some(want.as_str())).then_some(()) }
            })
            .await
            .is_some()
        }
    };
    assert!(
        became(id1.clone()).await,
        "the issuer in the Secret is adopted at start"
    );
    let leaf = || {
        let token = srv.token.clone();
        let client = srv.client(None);
        async move {
            let key = SecretKey::generate_p256().unwrap();
            let csr = make_csr(
                &"spiffe://cluster.local/ns/default/sa/web".parse().unwrap(),
                &key,
            )
            .unwrap();
            let mut c = client;
            let r = c
                .sign_certificate(with_token(sign_request(csr), &token))
                .await
                .unwrap()
                .into_inner();
            Workload::from_response(&r, key)
        }
    };
    let w = leaf().await;
    assert_eq!(rotator::pki::CertId::of(&w.chain[1]).to_string(), id1);
    rotator::client::verify_svid(
        &w.chain,
        &[root.der().clone()],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("chains to the anchor");

    // A renewal with a new key: adopted through the watch.
    let (crt2, key2, id2) = issuer(365);
    tls_secret(&e, &crt2, Some(&key2), &root_pem).await;
    assert!(became(id2.clone()).await, "the renewal is adopted");

    // Bad renewals: each refused and counted; the last good issuer keeps signing.
    let (other_pem, other_key) = ca("someone else", None, DAY, DAY * 3650);
    let other = rotator::pki::CaCert::from_pem(&other_pem).unwrap();
    let (foreign, foreign_key) = ca("foreign", Some((&other, &other_key)), DAY, DAY * 365);
    let (short, short_key, _) = issuer(1);
    let (crt3, _, _) = issuer(365);
    let cases: [(&str, &str, Option<&SecretKey>); 4] = [
        ("does not chain to an anchor", &foreign, Some(&foreign_key)),
        ("an empty key", &crt3, None),
        ("the key is not the certificate's", &crt3, Some(&key2)),
        ("less than leaf_ttl_max", &short, Some(&short_key)),
    ];
    for (n, (what, crt, key)) in cases.into_iter().enumerate() {
        tls_secret(&e, crt, key, &root_pem).await;
        let want = format!("meshca_issuer_source_refusals_total {}", n + 1);
        let counted = eventually(Duration::from_secs(10), || async {
            http_get(srv.server().http_addr, "/metrics")
                .await
                .1
                .contains(&want)
                .then_some(())
        })
        .await;
        assert!(counted.is_some(), "{what}: not refused");
        assert_eq!(
            active().await,
            Some(id2.clone()),
            "{what}: the old issuer keeps signing"
        );
    }
    assert_eq!(
        rotator::pki::CertId::of(&leaf().await.chain[1]).to_string(),
        id2
    );
    let (crt4, key4, id4) = issuer(365);
    tls_secret(&e, &crt4, Some(&key4), &root_pem).await;
    assert!(became(id4).await, "a good renewal after bad ones");
}
