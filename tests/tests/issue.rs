//! Issuance end to end: a real server on 127.0.0.1:0, real TLS, and validators that are not
//! meshca's own code (rustls-webpki, the spiffe crate, `openssl verify`, rustls handshakes).

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::time::Duration;

use meshca_proto::v1::{GetTrustBundleRequest, WatchTrustBundleRequest};
use meshca_tests::{
    TestServer, Workload, bundle_of, chain_of, eventually, http_get, mtls_handshake, pem_certs,
    require_tool, sign_request, with_token,
};
use rotator::client::{Identity, make_csr, verify_svid};
use rotator::pki::{CertInfo, SecretKey};
use rustls_pki_types::UnixTime;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

#[tokio::test]
async fn issued_leaf_verifies_with_independent_validators() {
    let ts = TestServer::start().await;
    let (r, key) = ts.issue(WEB).await.expect("issued");
    let chain = chain_of(&r);
    let bundle = bundle_of(&r);
    assert_eq!(chain.len(), 2, "leaf then issuer");
    assert_eq!(bundle, ts.bundle());
    assert_eq!(r.bundle_version, 1);
    assert_eq!(r.spiffe_id, WEB);

    // rustls-webpki, as both a client and a server certificate.
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        let id = verify_svid(&chain, &bundle, UnixTime::now(), usage)
            .expect("webpki verifies the chain");
        assert_eq!(id.as_str(), WEB);
    }
    // ... and not against some other authority's bundle.
    let other = TestServer::start().await;
    assert!(
        verify_svid(
            &chain,
            &other.bundle(),
            UnixTime::now(),
            webpki::KeyUsage::client_auth()
        )
        .is_err()
    );

    // The spiffe crate's X.509-SVID parser (it checks the SVID profile rules).
    let concat: Vec<u8> = chain.iter().flat_map(|c| c.to_vec()).collect();
    let svid = spiffe::X509Svid::parse_from_der(&concat, &key.key_pair().unwrap().serialize_der())
        .expect("valid X509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), WEB);

    // Times: notBefore back-dated 5 min, 24 h default, refresh_at 50-70 % in.
    let info = CertInfo::parse(&chain[0]).unwrap();
    let not_after = r.not_after.unwrap().seconds;
    assert_eq!(info.not_after.unix_timestamp(), not_after);
    let life = info.not_after - info.not_before;
    assert_eq!(life, time::Duration::hours(24) + time::Duration::minutes(5));
    let issued_at = info.not_before.unix_timestamp() + 300;
    let refresh = r.refresh_at.unwrap().seconds;
    let span = not_after - issued_at;
    assert!(
        refresh >= issued_at + span / 2 - 1 && refresh <= issued_at + span * 7 / 10 + 1,
        "refresh_at {refresh} outside 50-70 %"
    );
    assert_eq!(info.serial, r.serial);

    // openssl verify (CI installs openssl).
    if let Some(openssl) = require_tool("openssl") {
        let d = tempfile::tempdir().unwrap();
        let pem = |certs: &[rustls_pki_types::CertificateDer<'_>]| {
            certs
                .iter()
                .map(|c| rotator::pki::pem_cert(c))
                .collect::<String>()
        };
        std::fs::write(d.path().join("bundle.pem"), pem(&bundle)).unwrap();
        std::fs::write(d.path().join("issuer.pem"), pem(&chain[1..])).unwrap();
        std::fs::write(d.path().join("leaf.pem"), pem(&chain[..1])).unwrap();
        let out = std::process::Command::new(&openssl)
            .current_dir(d.path())
            .args([
                "verify",
                "-x509_strict",
                "-purpose",
                "sslclient",
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                "issuer.pem",
                "leaf.pem",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "leaf.pem: OK");
        // Negative control: the same leaf against another authority's bundle fails.
        std::fs::write(d.path().join("other.pem"), pem(&other.bundle())).unwrap();
        let bad = std::process::Command::new(&openssl)
            .current_dir(d.path())
            .args([
                "verify",
                "-CAfile",
                "other.pem",
                "-untrusted",
                "issuer.pem",
                "leaf.pem",
            ])
            .output()
            .unwrap();
        assert!(!bad.status.success());
    }
}

#[tokio::test]
async fn two_workloads_complete_an_mtls_handshake() {
    let ts = TestServer::start().await;
    let (r1, k1) = ts.issue(WEB).await.unwrap();
    let (r2, k2) = ts.issue(DB).await.unwrap();
    let web = Workload::from_response(&r1, k1);
    let db = Workload::from_response(&r2, k2);
    mtls_handshake(&web, &db).await.expect("db -> web");
    mtls_handshake(&db, &web).await.expect("web -> db");

    // The SPIFFE ID check is real: a client expecting someone else is refused ...
    let mut impostor = web.clone();
    impostor.id = "spiffe://cluster.local/ns/default/sa/other"
        .parse()
        .unwrap();
    let e = mtls_handshake(&impostor, &db).await.unwrap_err();
    assert!(
        e.contains("expected spiffe://cluster.local/ns/default/sa/other"),
        "{e}"
    );
    // ... and a workload from another authority cannot connect.
    let other = TestServer::start().await;
    let (r3, k3) = other.issue(WEB).await.unwrap();
    let stranger = Workload::from_response(&r3, k3);
    assert!(mtls_handshake(&web, &stranger).await.is_err());
}

#[tokio::test]
async fn renewal_over_mtls_needs_no_token_and_keeps_the_identity() {
    let ts = TestServer::start().await;
    let (r, key) = ts.issue(WEB).await.unwrap();
    let identity = Identity {
        chain: chain_of(&r),
        key,
    };
    let new_key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&WEB.parse().unwrap(), &new_key).unwrap();
    let renewed = ts
        .client(Some(&identity))
        .sign_certificate(sign_request(csr))
        .await
        .expect("renewed")
        .into_inner();
    assert_eq!(renewed.spiffe_id, WEB);
    assert_ne!(renewed.serial, r.serial);

    // The client certificate authorizes its own identity only.
    let csr = make_csr(&DB.parse().unwrap(), &new_key).unwrap();
    let e = ts
        .client(Some(&identity))
        .sign_certificate(sign_request(csr))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("mtls:spiffe://cluster.local/ns/default/sa/web may not request"),
        "{}",
        e.message()
    );

    // A leaf from another authority is rejected by the TLS layer itself.
    let other = TestServer::start().await;
    let (r2, k2) = other.issue(WEB).await.unwrap();
    let foreign = Identity {
        chain: chain_of(&r2),
        key: k2,
    };
    let csr = make_csr(&WEB.parse().unwrap(), &new_key).unwrap();
    assert!(
        ts.client(Some(&foreign))
            .sign_certificate(sign_request(csr))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn ttl_is_clamped_and_reported() {
    let ts = TestServer::start().await;
    let key = SecretKey::generate_p256().unwrap();
    for (asked, granted) in [
        (Some(100 * 3600), 48 * 3600),
        (Some(60), 3600),
        (Some(0), 24 * 3600),
        (None, 24 * 3600),
        (Some(5 * 3600), 5 * 3600),
    ] {
        let mut req = sign_request(make_csr(&WEB.parse().unwrap(), &key).unwrap());
        req.ttl = asked.map(|s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        });
        let r = ts
            .client(None)
            .sign_certificate(meshca_tests::with_token(req, &ts.token))
            .await
            .unwrap()
            .into_inner();
        let info = CertInfo::parse(&r.certificate_chain[0]).unwrap();
        let lifetime = (info.not_after - info.not_before).whole_seconds() - 300;
        assert_eq!(lifetime, granted, "asked {asked:?}");
        assert_eq!(
            r.not_after.unwrap().seconds,
            info.not_after.unix_timestamp()
        );
    }
}

#[tokio::test]
async fn bundle_apis_and_http_face_agree() {
    let ts = TestServer::start().await;
    let b = ts
        .client(None)
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.trust_domain, "cluster.local");
    assert_eq!(b.version, 1);
    assert_eq!(
        b.anchors,
        ts.bundle().iter().map(|c| c.to_vec()).collect::<Vec<_>>()
    );

    let mut watch = ts
        .client(None)
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, b);

    let (status, body) = http_get(ts.http, "/bundle.pem").await;
    assert_eq!(status, 200);
    assert_eq!(pem_certs(&body), ts.bundle());
    let on_disk = std::fs::read_to_string(ts.state_dir().join("bundle.pem")).unwrap();
    assert_eq!(
        on_disk, body,
        "<state-dir>/bundle.pem holds the current bundle"
    );

    assert_eq!(http_get(ts.http, "/healthz").await.0, 200);
    let (status, body) = http_get(ts.http, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    ts.issue(WEB).await.unwrap();
    ts.issue("spiffe://cluster.local/ns/prod/sa/web")
        .await
        .unwrap_err();
    let (_, metrics) = http_get(ts.http, "/metrics").await;
    assert!(
        metrics.contains("meshca_certificates_issued_total{api=\"meshca\",result=\"ok\",impersonated=\"false\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshca_certificates_issued_total{api=\"meshca\",result=\"denied\",impersonated=\"false\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("meshca_build_info{version="), "{metrics}");
}

#[tokio::test]
async fn new_tokens_are_picked_up_without_a_restart() {
    let ts = TestServer::start().await;
    let token = ca_server::auth::add_token(
        &ts.state_dir(),
        "team-a",
        vec!["spiffe://cluster.local/ns/a/sa/*".parse().unwrap()],
        None,
    )
    .unwrap();
    let key = SecretKey::generate_p256().unwrap();
    let ok = meshca_tests::eventually(Duration::from_secs(10), || {
        let csr = make_csr(&"spiffe://cluster.local/ns/a/sa/api".parse().unwrap(), &key).unwrap();
        let mut c = ts.client(None);
        let token = token.clone();
        async move {
            c.sign_certificate(meshca_tests::with_token(sign_request(csr), &token))
                .await
                .ok()
        }
    })
    .await;
    assert!(ok.is_some(), "the new token was never accepted");
    // ... and it is scoped to its namespace.
    let csr = make_csr(&"spiffe://cluster.local/ns/b/sa/api".parse().unwrap(), &key).unwrap();
    let e = ts
        .client(None)
        .sign_certificate(meshca_tests::with_token(sign_request(csr), &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

/// Static tokens carry an expiry (the bootstrap token one of 24 h by default), are listed and
/// revoked with `meshca token list|revoke`, and a running server follows both without a restart.
#[tokio::test]
async fn tokens_expire_and_are_revoked_while_the_server_runs() {
    let ts = TestServer::start().await;
    let dir = ts.state_dir();
    let now = time::OffsetDateTime::now_utc();
    let listed = rotator::tokens::list_tokens(&dir).unwrap();
    let bootstrap = listed.iter().find(|t| t.name == "bootstrap").unwrap();
    let left = bootstrap.expires.expect("the bootstrap token expires") - now;
    assert!(
        left > time::Duration::hours(23) && left <= time::Duration::hours(24),
        "{left}"
    );

    let pattern = || vec!["spiffe://cluster.local/ns/a/sa/*".parse().unwrap()];
    let old = ca_server::auth::add_token(
        &dir,
        "old",
        pattern(),
        Some(now - time::Duration::seconds(1)),
    )
    .unwrap();
    let fresh = ca_server::auth::add_token(
        &dir,
        "fresh",
        pattern(),
        Some(now + time::Duration::hours(1)),
    )
    .unwrap();
    let ask = |token: String| {
        let ts = &ts;
        async move {
            let key = rotator::pki::SecretKey::generate_p256().unwrap();
            let id = "spiffe://cluster.local/ns/a/sa/x".parse().unwrap();
            let csr = rotator::client::make_csr(&id, &key).unwrap();
            ts.client(None)
                .sign_certificate(with_token(sign_request(csr), &token))
                .await
        }
    };
    let ok = eventually(Duration::from_secs(10), || {
        let f = ask(fresh.clone());
        async move { f.await.ok() }
    })
    .await;
    assert!(ok.is_some(), "a token before its expiry works");
    let e = ask(old).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("\"old\" expired at"), "{e:?}");

    // The CLI lists them (JSON) and revokes the bootstrap token.
    let d = dir.display().to_string();
    let meshca = |args: &[&str]| {
        std::process::Command::new(meshca_tests::bin("meshca"))
            .args(args)
            .args(["--state-dir", &d])
            .output()
            .unwrap()
    };
    let out = meshca(&["--output", "json", "token", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["tokens"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{v}");
    assert!(
        rows.iter()
            .any(|r| r["name"] == "old" && r["expired"] == true),
        "{v}"
    );
    let out = meshca(&["token", "revoke", "bootstrap"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = eventually(Duration::from_secs(10), || async {
        ts.issue(WEB).await.err()
    })
    .await
    .expect("the revoked bootstrap token is refused without a restart");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let out = meshca(&["token", "revoke", "bootstrap"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no token named \"bootstrap\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
