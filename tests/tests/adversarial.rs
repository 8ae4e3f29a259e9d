//! What the adversarial review found (issue #25), each with the attack that worked before its fix:
//! a token for meshca's own reserved path, a denied node agent still acting for its node's
//! workloads, a leaf an anchor signed directly passing the per-request mTLS check.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use meshca_tests::{
    TestServer, eventually, istio, istio_impersonating, meshca_in, sign_request, with_token,
};
use rotator::client::{Identity, make_csr};
use rotator::pki::SecretKey;
use tonic::Code;

const TD: &str = "spiffe://cluster.local";

/// `meshca token add …` against `srv`'s state dir: the token.
async fn token(srv: &TestServer, args: &[&str]) -> String {
    let mut a = vec!["token", "add", "--output", "json"];
    a.extend_from_slice(args);
    let (code, out, err) = meshca_in(&srv.state_dir(), &a).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

async fn sign(srv: &TestServer, id: &str, token: &str) -> Result<(), (Code, String)> {
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
    srv.client(None)
        .sign_certificate(with_token(sign_request(csr), token))
        .await
        .map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// Item 9: `spiffe://<td>/meshca/…` (the bundle endpoint's SVID) is never issued, even to a
/// token made for exactly that ID.
#[tokio::test]
async fn meshcas_own_paths_are_never_issued() {
    let srv = TestServer::start().await;
    let reserved = format!("{TD}/meshca/server");
    let t = token(&srv, &["--name", "sneaky", "--allow", &reserved]).await;
    let (code, msg) = eventually(Duration::from_secs(5), || async {
        match sign(&srv, &reserved, &t).await {
            Err((Code::Unauthenticated, _)) => None, // the tokens file not read yet
            r => Some(r),
        }
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("reserved for meshca"), "{msg}");
    let (code, _) = sign(&srv, &format!("{TD}/meshca"), &t).await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied);
}

/// Item 3: denying a node agent's own identity stops it acting for every workload on its node,
/// not only its own renewal.
#[tokio::test]
async fn a_denied_node_agent_acts_for_nobody() {
    let srv = TestServer::start().await;
    let ztunnel = format!("{TD}/ns/istio-system/sa/ztunnel");
    let prod = format!("{TD}/ns/prod/sa/*");
    let agent = token(
        &srv,
        &[
            "--name",
            "ztunnel",
            "--allow",
            &ztunnel,
            "--node-agent",
            "--may-request",
            &prod,
        ],
    )
    .await;
    let web = format!("{TD}/ns/prod/sa/web");
    let ask = || async {
        let key = SecretKey::generate_p256().unwrap();
        istio(&srv, None)
            .create_certificate(with_token(istio_impersonating(&web, &web, &key), &agent))
            .await
            .map(|_| ())
            .map_err(|s| (s.code(), s.message().to_owned()))
    };
    eventually(Duration::from_secs(5), || async { ask().await.ok() })
        .await
        .expect("the node agent gets prod/web");
    let (code, out, err) = meshca_in(
        &srv.state_dir(),
        &["deny", "add", &ztunnel, "--reason", "node-a compromised"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, msg) = ask().await.unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains(&ztunnel) && msg.contains("node-a compromised"),
        "{msg}"
    );
    // prod/web itself is not denied: with its own credential it still renews.
    let own = token(&srv, &["--name", "web", "--allow", &web]).await;
    eventually(Duration::from_secs(5), || async {
        sign(&srv, &web, &own).await.ok()
    })
    .await
    .expect("the workload itself is not denied");
}

/// Item 4: the per-request check pins the path leaf → the issuer it came with → an anchor. A leaf
/// the anchor signed directly, sent with one of meshca's issuers, passes the handshake (a path
/// to the anchor exists) but must not renew.
#[tokio::test]
async fn a_leaf_signed_by_the_anchor_directly_does_not_authenticate() {
    let srv = TestServer::start().await;
    let id = format!("{TD}/ns/default/sa/web");
    let state = srv.server().authority.state().await;
    let anchor = state.active_anchor().unwrap();
    let issuer = state.active_issuer().unwrap();
    let signer = anchor
        .cert
        .rcgen_issuer(anchor.key.clone().unwrap())
        .unwrap();
    let key = SecretKey::generate_p256().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into().unwrap())];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(3600);
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&key, &signer).unwrap();
    let me = Identity {
        chain: vec![leaf.der().clone(), issuer.cert.der().clone()],
        key: key.clone(),
    };
    let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
    let e = srv
        .client(Some(&me))
        .sign_certificate(sign_request(csr))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(
        e.message()
            .contains("not signed by the issuer it came with"),
        "{}",
        e.message()
    );
}

/// The ledger's `live_workloads` and `workloads_with_current_bundle`, from `meshca status`.
async fn convergence(srv: &TestServer) -> (u64, u64) {
    let (code, out, err) = meshca_in(&srv.state_dir(), &["status", "--output", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let l = &v["anchor_rotation"]["ledger"];
    (
        l["live_workloads"].as_u64().unwrap(),
        l["workloads_with_current_bundle"].as_u64().unwrap(),
    )
}

/// Item 5: a bundle stream counts toward convergence only while its certificate passes the checks
/// a renewal with it would: a denied workload's stream is served the bundle but does not mark its
/// instance as holding it. A workload that is not denied is counted (the control).
#[tokio::test]
async fn a_watch_counts_only_with_a_certificate_that_still_passes() {
    let srv = TestServer::start().await;
    let web = format!("{TD}/ns/default/sa/web");
    let api = format!("{TD}/ns/default/sa/api");
    let w = srv.workload_instance(&web, "web-1").await;
    let a = srv.workload_instance(&api, "api-1").await;
    let (code, out, err) = meshca_in(&srv.state_dir(), &["anchors", "stage"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = meshca_in(
        &srv.state_dir(),
        &["deny", "add", &web, "--reason", "compromised"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let mut denied = srv.watch_as(&w, "web-1").await;
    let mut fine = srv.watch_as(&a, "api-1").await;
    let v = |b: Option<meshca_proto::v1::TrustBundle>| b.unwrap().version;
    assert_eq!(
        v(denied.message().await.unwrap()),
        2,
        "it is served the bundle"
    );
    assert_eq!(v(fine.message().await.unwrap()), 2);
    let (live, current) = convergence(&srv).await;
    assert_eq!(live, 2);
    assert_eq!(
        current, 1,
        "only api-1 holds v2: the denied workload's stream does not count"
    );
}

/// Item 7: a caller-supplied value cannot forge an audit line. An Istio request whose
/// `ImpersonatedIdentity` carries a newline and a fake `issued` line is refused, and the real
/// server's text log holds it escaped on the refusal's own line.
#[tokio::test]
async fn a_newline_in_a_request_cannot_forge_an_audit_line() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut p = meshca_tests::ServerProcess::spawn(&state, &[], &[("MESHCA_LOG", "info")]).unwrap();
    let token = std::fs::read_to_string(state.join("bootstrap-token")).unwrap();
    let bundle =
        meshca_tests::pem_certs(&std::fs::read_to_string(state.join("bundle.pem")).unwrap());
    let tls = rotator::client::client_tls(&bundle, None).unwrap();
    let mut c =
        meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
            rotator::client::channel(&p.url, tls).unwrap(),
        );
    let forged = "spiffe://cluster.local/ns/x/sa/y\n2026-12-06T00:00:00.000000Z  INFO meshca::audit: api=\"istio\" caller=token:admin spiffe_id=spiffe://cluster.local/ns/kube-system/sa/admin issued";
    let key = SecretKey::generate_p256().unwrap();
    let web = format!("{TD}/ns/default/sa/web");
    let e = c
        .create_certificate(with_token(
            istio_impersonating(&web, forged, &key),
            token.trim(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // The log writer is a thread of its own: read until the refusal is there, then stop.
    let mut stderr = p.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut bytes = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&bytes).contains("refused")
        && std::time::Instant::now() < deadline
    {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
            bytes.extend(b);
        }
    }
    let _ = p.child.kill();
    let _ = p.child.wait();
    while let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
        bytes.extend(b);
    }
    let log = String::from_utf8_lossy(&bytes).into_owned();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert!(!refused.is_empty(), "the refusal is logged:\n{log}");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-06T00:00:00.000000Z")),
        "a forged line reached the log:\n{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("\\n2026-12-06")),
        "the newline is escaped on the refusal's line:\n{log}"
    );
}
