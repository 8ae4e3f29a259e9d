//! Kubernetes mode against the in-test API server (`meshca_tests::kubeapi`): real HTTP, real
//! resourceVersion conflicts and watches, but not a real cluster (see tests/README.md).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ca_server::auth::Credentials;
use ca_server::config::{AuthMethod, Config};
use ca_server::issuance::{Face, IssueError, IssueRequest, SigningCore};
use ca_server::server::Server;
use meshca_tests::kubeapi::{KubeApi, jwt};
use meshca_tests::{
    TestServer, Workload, eventually, mtls_handshake, render, sign_request, test_config, with_token,
};
use rotator::client::make_csr;
use rotator::clock::{Clock, ManualClock, SystemClock};
use rotator::pki::SecretKey;
use rotator::spiffe::SpiffeId;
use serde_json::json;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/prod/sa/web";
const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

fn kube(c: &mut Config, fake: &KubeApi) {
    c.kubernetes.enabled = true;
    c.kubernetes.api_url = fake.url.clone();
    c.kubernetes.namespace = "meshca".into();
    // One replica, state in the state dir: these tests are about authentication.
    c.kubernetes.state_secret.clear();
    c.auth.authenticators = vec![
        AuthMethod::Mtls,
        AuthMethod::Tokenreview,
        AuthMethod::Static,
    ];
}

/// Signs with the in-test ServiceAccount token named `name` ([`jwt`]).
async fn sign(
    srv: &TestServer,
    id: &str,
    name: &str,
) -> Result<(meshca_proto::v1::SignCertificateResponse, SecretKey), tonic::Status> {
    sign_raw(srv, id, &jwt(name)).await
}

/// Signs with `token` exactly as given.
async fn sign_raw(
    srv: &TestServer,
    id: &str,
    token: &str,
) -> Result<(meshca_proto::v1::SignCertificateResponse, SecretKey), tonic::Status> {
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
    let r = srv
        .client(None)
        .sign_certificate(with_token(sign_request(csr), token))
        .await?;
    Ok((r.into_inner(), key))
}

fn tokens(fake: &KubeApi) {
    fake.add_token("tok-web", "system:serviceaccount:prod:web", &["meshca"]);
    fake.add_token(
        "tok-api",
        "system:serviceaccount:prod:api",
        &["meshca", "istio-ca"],
    );
    fake.add_token(
        "tok-other-aud",
        "system:serviceaccount:prod:web",
        &["vault"],
    );
    fake.add_token("tok-alice", "alice", &["meshca"]);
    fake.add_token("tok-node", "system:node:worker-1", &["meshca"]);
}

#[tokio::test]
async fn tokenreview_authenticates_service_accounts_over_grpc() {
    let fake = KubeApi::start().await;
    tokens(&fake);
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let srv = TestServer::start_clocked(|c| kube(c, &fake), clock.clone()).await;
    let reviewer = srv
        .server()
        .reviewer
        .clone()
        .expect("TokenReview configured");

    // A valid token: the SPIFFE ID of its service account, a chain that verifies (handshake).
    let (web, wk) = sign(&srv, WEB, "tok-web")
        .await
        .expect("token for prod/web");
    assert_eq!(web.spiffe_id, WEB);
    let (api, ak) = sign(&srv, API, "tok-api")
        .await
        .expect("token for prod/api");
    let (web, api) = (
        Workload::from_response(&web, wk),
        Workload::from_response(&api, ak),
    );
    mtls_handshake(&web, &api)
        .await
        .expect("two TokenReview-issued leaves handshake");
    assert_eq!(fake.count("create", "tokenreviews"), 2);

    // Refusals, each with its code and reason.
    let cases: [(&str, &str, Code, &str); 5] = [
        (
            WEB,
            "tok-other-aud",
            Code::Unauthenticated,
            "invalid for the target audiences",
        ),
        (
            WEB,
            "tok-unknown",
            Code::Unauthenticated,
            "invalid bearer token",
        ),
        (
            WEB,
            "tok-alice",
            Code::Unauthenticated,
            "not a service account",
        ),
        (
            WEB,
            "tok-node",
            Code::Unauthenticated,
            "not a service account",
        ),
        // prod/api's token asking for prod/web: authenticated, not authorized.
        (WEB, "tok-api", Code::PermissionDenied, "may not request"),
    ];
    for (id, token, code, why) in cases {
        let e = sign(&srv, id, token).await.expect_err(token);
        assert_eq!(e.code(), code, "{token}: {e:?}");
        assert!(e.message().contains(why), "{token}: {}", e.message());
    }
    let other_ns = sign(&srv, "spiffe://cluster.local/ns/dev/sa/web", "tok-web")
        .await
        .unwrap_err();
    assert_eq!(
        other_ns.code(),
        Code::PermissionDenied,
        "ns prod token asking for ns dev"
    );

    // Cache: a repeat is answered without the API server, refusals too (briefly).
    let before = fake.count("create", "tokenreviews");
    sign(&srv, WEB, "tok-web").await.unwrap();
    sign(&srv, WEB, "tok-alice").await.unwrap_err();
    assert_eq!(
        fake.count("create", "tokenreviews"),
        before,
        "cache hits call the API server"
    );
    assert_eq!(reviewer.api_calls() as usize, before);
    // Entries expire (token_cache_ttl = 60 s; refusals 10 s), on the injected clock.
    clock.advance(Duration::from_secs(61));
    sign(&srv, WEB, "tok-web").await.unwrap();
    assert_eq!(
        fake.count("create", "tokenreviews"),
        before + 1,
        "expired entry re-reviewed"
    );

    // The API server down: a token not in the cache is Unavailable (never allowed, never a
    // plain deny); a cached one still works.
    fake.set_down(true);
    let e = sign(&srv, API, "tok-api-new").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("TokenReview"), "{}", e.message());
    sign(&srv, WEB, "tok-web")
        .await
        .expect("cached answer while the API server is down");
    fake.set_down(false);

    // The Istio face reviews for its own audience: prod/api's token carries istio-ca,
    // prod/web's does not.
    let istio = |token: &str| {
        let key = SecretKey::generate_p256().unwrap();
        let id: SpiffeId = if token == "tok-api" { API } else { WEB }.parse().unwrap();
        let csr = String::from_utf8(
            pem::encode(&pem::Pem::new(
                "CERTIFICATE REQUEST",
                make_csr(&id, &key).unwrap(),
            ))
            .into_bytes(),
        )
        .unwrap();
        let req = meshca_proto::istio::IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: None,
        };
        let tls = rotator::client::client_tls(&srv.bundle(), None).unwrap();
        let ch = rotator::client::channel(&srv.url, tls).unwrap();
        let token = token.to_owned();
        async move {
            meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(ch)
                .create_certificate(with_token(req, &jwt(&token)))
                .await
        }
    };
    istio("tok-api")
        .await
        .expect("istio-ca audience accepted on the Istio face");
    let e = istio("tok-web").await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "meshca-audience token on the Istio face: {e:?}"
    );
}

/// A JWT-shaped token with these claims (nothing the in-test API server knows).
fn jwt_with(claims: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"RS256"}"#),
        b64(claims.as_bytes())
    )
}

/// Random bearer tokens must not become a flood against the API server (istio#27945): what
/// cannot be a ServiceAccount JWT for this face is refused without a call, one token is reviewed
/// once however many ask at once, and reviews are capped per second; beyond the cap requests
/// fail Unavailable while cached tokens keep working. Negative control: unlimited, every
/// distinct token costs a review.
#[tokio::test]
async fn a_flood_of_tokens_is_kept_off_the_api_server() {
    let fake = KubeApi::start().await;
    tokens(&fake);
    let srv = TestServer::start_with(|c| {
        kube(c, &fake);
        c.limits.tokenreview_rate = 5;
        c.limits.tokenreview_burst = 5;
    })
    .await;
    sign(&srv, WEB, "tok-web").await.expect("a real token");
    let reviews = || fake.count("create", "tokenreviews");
    assert_eq!(reviews(), 1);
    // 1. Not JWTs, expired, for another audience, oversized: refused before any call.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut shapeless: Vec<String> = (0..200).map(|i| format!("random-{i}")).collect();
    shapeless.push(jwt_with(&format!(r#"{{"exp":{}}}"#, now - 60)));
    shapeless.push(jwt_with(r#"{"aud":["vault"]}"#));
    shapeless.push(format!("{}.{}.x", "e30", "e30"));
    shapeless.push("a".repeat(10_000));
    for t in &shapeless {
        let e = sign_raw(&srv, WEB, t).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{t:.40}: {e:?}");
    }
    assert_eq!(reviews(), 1, "a shapeless token reached the API server");
    // 2. Fifty at once with one unknown token: one review.
    let same = jwt_with(r#"{"sub":"unknown"}"#);
    let all = futures::future::join_all((0..50).map(|_| sign_raw(&srv, WEB, &same))).await;
    assert!(all.iter().all(Result::is_err));
    assert_eq!(
        reviews(),
        2,
        "concurrent requests with one token were reviewed separately"
    );
    // 3. Distinct unknown tokens: at most the burst plus the rate reach the API server; the
    // rest are Unavailable, and the cached real token keeps signing meanwhile.
    let start = std::time::Instant::now();
    let mut unavailable = 0;
    for i in 0..60 {
        let e = sign_raw(&srv, WEB, &jwt_with(&format!(r#"{{"sub":"x{i}"}}"#)))
            .await
            .unwrap_err();
        if e.code() == Code::Unavailable {
            assert!(e.message().contains("limits.tokenreview_rate"), "{e:?}");
            unavailable += 1;
        }
        if i % 10 == 0 {
            sign(&srv, WEB, "tok-web")
                .await
                .expect("a cached token still works");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "small"
    )]
    let allowed = 5 + (secs * 5.0).ceil() as usize;
    assert!(
        reviews() - 2 <= allowed,
        "{} reviews in {secs:.1} s, allowed {allowed}",
        reviews() - 2
    );
    assert!(unavailable > 0);
    let (_, m) = meshca_tests::http_get(srv.http, "/metrics").await;
    assert!(
        !m.contains(r#"meshca_limit_refusals_total{limit="tokenreview_rate"} 0"#),
        "{m}"
    );

    // Negative control: no rate cap, each distinct token is a review.
    let open = TestServer::start_with(|c| {
        kube(c, &fake);
        c.limits = ca_server::config::LimitsConfig::unlimited();
    })
    .await;
    let before = reviews();
    for i in 0..60 {
        let _ = sign_raw(&open, WEB, &jwt_with(&format!(r#"{{"sub":"y{i}"}}"#))).await;
    }
    assert_eq!(reviews() - before, 60);
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let srv = TestServer::start_with(|c| {
        c.kubernetes.enabled = true;
        c.kubernetes.api_url = url;
        c.kubernetes.state_secret.clear();
        c.auth.authenticators = vec![AuthMethod::Tokenreview, AuthMethod::Static];
    })
    .await;
    let e = sign(&srv, WEB, "eyJhbGciOi.e30.sig").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // The static token still works: the chain goes on past an unavailable authenticator.
    let tok = srv.token.clone();
    sign_raw(&srv, "spiffe://cluster.local/ns/default/sa/x", &tok)
        .await
        .expect("static token");
}

fn replica(dir: &std::path::Path, fake: &KubeApi, name: &str) -> Config {
    let mut c = test_config(dir);
    kube(&mut c, fake);
    c.kubernetes.state_secret = "meshca-authority".into();
    c.auth.authenticators = vec![AuthMethod::Mtls, AuthMethod::Tokenreview];
    c.kubernetes.identity = name.into();
    c.kubernetes.lease_duration = Duration::from_secs(2);
    c.kubernetes.bundle.namespace_selector = "meshca.io/trust-bundle=enabled".into();
    c.kubernetes.bundle.resync = Duration::from_millis(200);
    c.kubernetes.bundle.istio = true;
    c.kubernetes.bundle.linkerd = true;
    // As deploy/kubernetes configures it: the pod directory lists and watches pods.
    c.istio.trusted_node_agents = vec!["istio-system/ztunnel".into()];
    // Issuers rotate in seconds: prepared 18 s after notBefore, active at 24 s.
    let p = &mut c.policy;
    p.leaf_ttl_default = Duration::from_secs(5);
    p.leaf_ttl_min = Duration::from_secs(2);
    p.leaf_ttl_max = Duration::from_secs(10);
    p.clock_skew = Duration::from_secs(1);
    p.issuer_ttl = Duration::from_secs(36);
    p.propagation_allowance = Duration::from_secs(5);
    c
}

async fn issue_in_process(
    issuer: &SigningCore,
    token: &str,
    id: &str,
) -> Result<String, IssueError> {
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
    let header = format!("Bearer {}", jwt(token));
    issuer
        .issue(IssueRequest {
            api: Face::Meshca,
            csr: &csr,
            ttl: None,
            credentials: Credentials {
                authorization: Some(&header),
                client_cert: None,
                client_intermediates: &[],
            },
            peer: None,
            instance_id: None,
            dns_identity: None,
            impersonate: None,
        })
        .await
        .map(|i| i.chain[1].as_ref().len().to_string())
}

/// The prepared (next) issuer, if any.
fn prepared_issuer(st: &rotator::state::AuthorityState) -> Option<rotator::pki::CertId> {
    st.issuers
        .iter()
        .find(|i| i.status == rotator::state::IssuerStatus::Prepared)
        .map(|i| i.cert.id().clone())
}

/// How many journal entries record preparing issuer `id`.
fn times_prepared(st: &rotator::state::AuthorityState, id: &rotator::pki::CertId) -> usize {
    st.history
        .iter()
        .filter(|e| e.what.contains(id.as_str()) && e.what.contains("prepar"))
        .count()
}

fn leader(s: &Server) -> bool {
    *s.leader.borrow()
}

/// Generations recorded on the Secret in the order the API server stored them.
fn secret_generations(fake: &KubeApi) -> u64 {
    fake.get("secrets", "meshca", "meshca-authority")
        .and_then(|s| {
            s["metadata"]["annotations"]["meshca.io/generation"]
                .as_str()
                .map(str::to_owned)
        })
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_replicas_one_rotates_and_the_other_takes_over() {
    let fake = KubeApi::start().await;
    tokens(&fake);
    fake.set_namespace("prod", &[("meshca.io/trust-bundle", "enabled")]);
    fake.set_namespace("dev", &[]);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(replica(da.path(), &fake, "meshca-a"), clock.clone())
        .await
        .expect("replica a");
    let b = Server::start(replica(db.path(), &fake, "meshca-b"), clock.clone())
        .await
        .expect("replica b");
    assert!(a.created && !b.created, "b serves the authority a created");
    assert_eq!(
        a.authority.snapshot().bundle.pem,
        b.authority.snapshot().bundle.pem
    );

    // Exactly one leader.
    let first = eventually(Duration::from_secs(10), || async {
        (leader(&a) != leader(&b)).then(|| if leader(&a) { "a" } else { "b" })
    })
    .await
    .expect("one replica holds the lease");
    let lease = fake
        .get("leases", "meshca", "meshca-rotation")
        .expect("the Lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], format!("meshca-{first}"));

    // Bundle ConfigMaps: in the matching namespace, all three shapes; not in dev.
    let bundle_pem = a.authority.snapshot().bundle.pem.clone();
    eventually(Duration::from_secs(10), || async {
        fake.get("configmaps", "prod", "meshca-trust-bundle")
            .map(|_| ())
    })
    .await
    .expect("bundle ConfigMap published to prod");
    for (name, key) in [
        ("meshca-trust-bundle", "ca-bundle.crt"),
        ("istio-ca-root-cert", "root-cert.pem"),
        ("linkerd-identity-trust-roots", "ca-bundle.crt"),
    ] {
        let cm = fake
            .get("configmaps", "prod", name)
            .unwrap_or_else(|| panic!("{name} in prod"));
        assert_eq!(cm["data"][key], bundle_pem.as_str(), "{name}/{key}");
    }
    assert!(
        fake.get("configmaps", "dev", "meshca-trust-bundle")
            .is_none()
    );
    // A namespace that starts matching gets it; one that stops matching loses it.
    fake.set_namespace("dev", &[("meshca.io/trust-bundle", "enabled")]);
    fake.set_namespace("prod", &[]);
    eventually(Duration::from_secs(10), || async {
        (fake
            .get("configmaps", "dev", "meshca-trust-bundle")
            .is_some()
            && fake
                .get("configmaps", "prod", "meshca-trust-bundle")
                .is_none()
            && fake
                .get("configmaps", "prod", "istio-ca-root-cert")
                .is_none())
        .then_some(())
    })
    .await
    .expect("ConfigMaps follow the namespace selector");

    // Both replicas sign throughout (TokenReview credentials, the real signing path).
    let stop = Arc::new(AtomicBool::new(false));
    let alive = Arc::new([AtomicBool::new(true), AtomicBool::new(true)]);
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let signer = {
        let (a, b) = (a.readiness.issuer.clone(), b.readiness.issuer.clone());
        let (stop, alive, ok, failed) = (stop.clone(), alive.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for (n, s) in [&a, &b].into_iter().enumerate() {
                    if !alive[n].load(Ordering::SeqCst) {
                        continue;
                    }
                    match issue_in_process(s, "tok-web", WEB).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("signing failed: {e}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The leader prepares the next issuer (18 s after notBefore); both replicas see it.
    let (lead, other) = if first == "a" { (a, b) } else { (b, a) };
    let prepared = eventually(Duration::from_secs(40), || async {
        prepared_issuer(&other.authority.state().await)
    })
    .await
    .expect("the leader prepared an issuer and the follower adopted it");
    let active_before = other
        .authority
        .snapshot()
        .issuer
        .as_ref()
        .unwrap()
        .id
        .clone();

    // Kill the leader mid-rotation (prepared, not yet active): no Lease release.
    alive[usize::from(first == "b")].store(false, Ordering::SeqCst);
    let killed_at = tokio::time::Instant::now();
    lead.abort();
    let took_over = eventually(Duration::from_secs(10), || async {
        leader(&other).then_some(())
    })
    .await;
    assert!(took_over.is_some(), "the survivor takes the lease");
    let takeover = killed_at.elapsed();
    assert!(
        takeover <= Duration::from_secs(2) + Duration::from_millis(1500),
        "took over in {takeover:?}"
    );
    // It finishes the rotation the dead leader started: the prepared issuer becomes active.
    eventually(Duration::from_secs(30), || async {
        (other.authority.snapshot().issuer.as_ref().unwrap().id == prepared).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the survivor activated {prepared} (was {active_before})"));
    // A trust-anchor rotation staged on the survivor: the bundle ConfigMaps update to the
    // dual-anchor bundle.
    let policy = other.authority.policy().clone();
    other
        .authority
        .transition(|s, now| {
            s.stage_anchor(&policy, now, rotator::anchors::NewAnchor::Generate)
                .map(Some)
        })
        .await
        .expect("stage");
    let staged = other.authority.snapshot().bundle.clone();
    assert_eq!(staged.anchors.len(), 2);
    // Replicated, the activate gate is time-based only, and says why.
    let summary = other.authority.ledger_summary().await;
    assert!(summary.partial);
    let st = other.authority.state().await;
    let gates = rotator::anchors::gates(&st, &policy, Some(&summary), clock.now());
    let activate = gates
        .iter()
        .find(|g| g.step == rotator::anchors::Step::Activate)
        .unwrap();
    assert!(!activate.open, "{}", activate.explain());
    assert!(
        activate.explain().contains("replicas sign independently"),
        "{}",
        activate.explain()
    );
    eventually(Duration::from_secs(10), || async {
        let cm = fake.get("configmaps", "dev", "meshca-trust-bundle")?;
        (cm["data"]["ca-bundle.crt"] == staged.pem.as_str()
            && cm["metadata"]["annotations"]["meshca.io/bundle-version"]
                == staged.version.to_string().as_str())
        .then_some(())
    })
    .await
    .expect("bundle ConfigMaps updated on rotation");
    stop.store(true, Ordering::SeqCst);
    signer.await.unwrap();

    let st = other.authority.state().await;
    let prepares = times_prepared(&st, &prepared);
    assert_eq!(
        prepares, 1,
        "resumed, not prepared twice: {:#?}",
        st.history
    );
    assert_eq!(
        secret_generations(&fake),
        st.generation,
        "the Secret holds the survivor's state"
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "signing failed during the fail-over"
    );
    assert!(ok.load(Ordering::SeqCst) > 20, "signing ran throughout");

    // Bundle versions never went backwards: the Secret's generations and the ConfigMaps'
    // bundle versions, in the order the API server stored them.
    let mut last_gen = 0;
    let mut last_bundle = 0;
    for (ns, name, v) in fake.history() {
        if name == "meshca-authority" {
            let g: u64 = v["metadata"]["annotations"]["meshca.io/generation"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(g > last_gen, "generation went from {last_gen} to {g}");
            last_gen = g;
        }
        if ns == "dev" && name == "meshca-trust-bundle" {
            let bv: u64 = v["metadata"]["annotations"]["meshca.io/bundle-version"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                bv >= last_bundle,
                "bundle version went from {last_bundle} to {bv}"
            );
            last_bundle = bv;
        }
    }
    println!(
        "fail-over: took over in {takeover:?}; {} leaves signed, 0 failed; {} conflicts answered",
        ok.load(Ordering::SeqCst),
        fake.conflicts()
    );
    other.shutdown().await;
    // Everything meshca called in this run is granted by deploy/kubernetes, and nothing more.
    assert_rbac_matches(&fake);
}

/// Negative control for `kube_real_replicas.rs`'s race on the state Secret (the same checks),
/// against the one thing a real API server cannot be made to do: ignore resourceVersion. Both
/// replicas' stages "succeed" and the other writer's annotation is overwritten — the checks are
/// what catch a store without optimistic concurrency.
#[tokio::test]
#[should_panic(expected = "exactly one stage")]
async fn negative_control_without_resource_versions_updates_are_lost() {
    let fake = KubeApi::start().await;
    fake.set_ignore_resource_versions(true);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = replica(da.path(), &fake, "a");
    ca.kubernetes.bundle.namespace_selector.clear();
    let mut cb = replica(db.path(), &fake, "b");
    cb.kubernetes.bundle.namespace_selector.clear();
    let a = Server::start(ca, clock.clone()).await.unwrap();
    let b = Server::start(cb, clock.clone()).await.unwrap();

    // Another client (a backup tool, kubectl annotate) writes the Secret between meshca's read
    // and its write: meshca's replace gets 409, re-reads, decides again and keeps their change.
    let mut s = fake.get("secrets", "meshca", "meshca-authority").unwrap();
    s["metadata"]["annotations"]["backup.example.com/taken"] = json!("yes");
    fake.put("secrets", "meshca", "meshca-authority", s);
    let conflicts = fake.conflicts();
    let before = secret_generations(&fake);
    let stage = |srv: &Server| {
        let au = srv.authority.clone();
        async move {
            let policy = au.policy().clone();
            au.transition(|s, now| {
                s.stage_anchor(&policy, now, rotator::anchors::NewAnchor::Generate)
                    .map(Some)
            })
            .await
        }
    };
    // Both replicas race to stage: exactly one stage happens (the loser re-decides: a rotation
    // is already staged, which is refused, not applied twice).
    let (ra, rb) = tokio::join!(stage(&a), stage(&b));
    assert!(ra.is_ok() != rb.is_ok(), "exactly one stage: {ra:?} {rb:?}");
    let loser = if ra.is_ok() { rb } else { ra };
    assert!(
        loser.unwrap_err().to_string().contains("stag"),
        "the loser re-decided on the winner's state"
    );
    assert!(fake.conflicts() > conflicts, "the API server answered 409");
    let stored = fake.get("secrets", "meshca", "meshca-authority").unwrap();
    assert_eq!(
        stored["metadata"]["annotations"]["backup.example.com/taken"], "yes",
        "their annotation survived"
    );
    let after: u64 = stored["metadata"]["annotations"]["meshca.io/generation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        after > before,
        "committed on top of the other writer's change"
    );
    // (The leader may follow the stage with an issuer under the new anchor: more commits.)
    eventually(Duration::from_secs(5), || async {
        let g = secret_generations(&fake);
        (a.authority.state().await.generation == g && b.authority.state().await.generation == g)
            .then_some(())
    })
    .await
    .expect("both replicas hold the committed state");
    let st = a.authority.state().await;
    let stages = st
        .history
        .iter()
        .filter(|e| e.generation > before && e.what.to_lowercase().contains("stage"))
        .count();
    assert_eq!(stages, 1, "one stage in the journal: {:#?}", st.history);
    a.shutdown().await;
    b.shutdown().await;
}

/// Deserializes `v` into `T`, rejecting fields `T` does not have (a typo in the manifests).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &serde_json::Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    // Round trip: what the type kept must be what the file said (unknown fields get dropped).
    let back = serde_json::to_value(&t).unwrap();
    fn strip(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(strip).collect()),
            o => o.clone(),
        }
    }
    assert_eq!(
        strip(&back),
        strip(v),
        "{} {} has fields its type does not know",
        v["kind"],
        v["metadata"]["name"]
    );
    t
}

#[test]
fn deploy_renders_and_every_object_is_its_kubernetes_type() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    for dir in [
        "deploy/kubernetes",
        "deploy/kubernetes/overlays/monitoring",
        "deploy/kubernetes/overlays/cert-manager",
        "deploy/kubernetes/overlays/istiod-certificate",
        "deploy/kubernetes/overlays/pod-certificates",
    ] {
        let Some(docs) = render(dir) else { return };
        let mut kinds = Vec::new();
        for d in &docs {
            let kind = d["kind"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(d)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(d)),
                "ClusterRole" => drop(typed::<ClusterRole>(d)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(d)),
                "Role" => drop(typed::<Role>(d)),
                "RoleBinding" => drop(typed::<RoleBinding>(d)),
                "Service" => {
                    let s: Service = typed(d);
                    let ports: Vec<i32> = s
                        .spec
                        .unwrap()
                        .ports
                        .unwrap()
                        .iter()
                        .map(|p| p.port)
                        .collect();
                    assert_eq!(ports, [8443, 9090]);
                }
                "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(d)),
                "ConfigMap" => {
                    let cm: ConfigMap = typed(d);
                    let toml = &cm.data.unwrap()["meshca.toml"];
                    let c = Config::from_toml(toml).expect("the shipped meshca.toml parses");
                    c.validate().expect("the shipped meshca.toml validates");
                    assert!(c.kubernetes.enabled && !c.kubernetes.state_secret.is_empty());
                    assert_eq!(
                        c.auth.authenticators,
                        [AuthMethod::Mtls, AuthMethod::Tokenreview]
                    );
                }
                "Deployment" => {
                    let dep: Deployment = typed(d);
                    let spec = dep.spec;
                    assert_eq!(spec.replicas, Some(2));
                    let pod = spec.template.spec.unwrap();
                    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
                    let c = &pod.containers[0];
                    let sc = c.security_context.clone().unwrap();
                    assert_eq!(sc.read_only_root_filesystem, Some(true));
                    assert_eq!(sc.allow_privilege_escalation, Some(false));
                    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
                        p.clone().unwrap().http_get.unwrap().path.unwrap()
                    };
                    assert_eq!(path(&c.liveness_probe), "/healthz");
                    assert_eq!(path(&c.readiness_probe), "/readyz");
                    let res = c.resources.clone().unwrap();
                    assert!(res.requests.is_some() && res.limits.is_some());
                }
                "PrometheusRule" | "ServiceMonitor" => {
                    assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1");
                }
                other => panic!("{dir}: unexpected kind {other}"),
            }
            // Everything in meshca's namespace, but for the Roles (and their bindings) for one
            // Secret where it lives: cert-manager's issuer, istiod's certificate.
            let home = match d["metadata"]["name"].as_str() {
                Some("meshca-issuer-secret") => "linkerd",
                Some("meshca-istiod-tls") => "istio-system",
                _ => "meshca",
            };
            if kind != "Namespace" && !kind.starts_with("Cluster") {
                assert_eq!(
                    d["metadata"]["namespace"], home,
                    "{kind} {}",
                    d["metadata"]["name"]
                );
            }
            kinds.push(kind);
        }
        println!("{dir}: {} objects: {}", kinds.len(), kinds.join(", "));
    }
}

/// RBAC grants: (verb, group, resource, namespace).
type Grants = std::collections::BTreeSet<(String, String, String, String)>;

/// RBAC rules rendered from `dir` as (verb, group, resource, namespace): the namespace of a
/// Role, "" for a ClusterRole.
fn rbac_grants(dir: &str) -> Option<Grants> {
    let docs = render(dir)?;
    let mut out = std::collections::BTreeSet::new();
    for d in docs {
        let namespace = match d["kind"].as_str() {
            Some("Role") => d["metadata"]["namespace"].as_str().unwrap().to_owned(),
            Some("ClusterRole") => String::new(),
            _ => continue,
        };
        for r in d["rules"].as_array().unwrap() {
            for g in r["apiGroups"].as_array().unwrap() {
                for res in r["resources"].as_array().unwrap() {
                    for v in r["verbs"].as_array().unwrap() {
                        out.insert((
                            v.as_str().unwrap().to_owned(),
                            g.as_str().unwrap().to_owned(),
                            res.as_str().unwrap().to_owned(),
                            namespace.clone(),
                        ));
                    }
                }
            }
        }
    }
    Some(out)
}

/// Every call meshca made is granted by `dir`'s RBAC; the grants used, or None without kubectl.
fn rbac_used(dir: &str, fake: &KubeApi) -> Option<(Grants, Grants)> {
    let grants = rbac_grants(dir)?;
    let mut used = std::collections::BTreeSet::new();
    for c in fake.distinct_calls() {
        let grant = grants.iter().find(|(v, g, r, ns)| {
            *v == c.verb
                && *g == c.group
                && *r == c.resource
                && (ns.is_empty() || *ns == c.namespace)
        });
        let grant =
            grant.unwrap_or_else(|| panic!("meshca called {c:?}, which {dir} does not grant"));
        used.insert(grant.clone());
    }
    Some((grants, used))
}

/// Every call meshca made is granted by the base, and every grant was used.
fn assert_rbac_matches(fake: &KubeApi) {
    let Some((grants, used)) = rbac_used("deploy/kubernetes", fake) else {
        return;
    };
    let unused: Vec<_> = grants.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "rbac.yaml grants what meshca never called: {unused:?}"
    );
}
