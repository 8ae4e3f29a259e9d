//! `meshca deny`: a compromised workload's identity is refused on every face, whatever the
//! credential, while every other workload keeps renewing; patterns, expiry, removal, refusals of
//! bad input, and persistence across a restart. A real server, the real CLI over the admin socket.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use ca_server::server::Server;
use meshca_tests::{
    TestServer, Workload, http_get, istio, istio_request, sign_request, test_config, with_token,
};
use rotator::client::{Identity, make_csr};
use rotator::clock::ManualClock;
use rotator::pki::SecretKey;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/default/sa/api";

/// `meshca <args> --state-dir <dir>`: (exit code, stdout, stderr).
async fn meshca(dir: std::path::PathBuf, args: &[&str]) -> (i32, String, String) {
    meshca_tests::meshca_in(&dir, args).await
}

/// Renews `w` with its own certificate (mTLS, no token).
async fn renew(srv: &TestServer, w: &Workload) -> Result<Workload, tonic::Status> {
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(&w.id, &key).unwrap();
    let me = Identity {
        chain: w.chain.clone(),
        key: w.key.clone(),
    };
    let r = srv
        .client(Some(&me))
        .sign_certificate(sign_request(csr))
        .await?
        .into_inner();
    Ok(Workload::from_response(&r, key))
}

async fn workload(srv: &TestServer, id: &str) -> Workload {
    let (r, key) = srv.issue(id).await.unwrap();
    Workload::from_response(&r, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_identity_is_refused_whatever_its_credential_while_others_renew() {
    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let mut srv = TestServer::start_clocked(|_| {}, clock.clone()).await;
    let dir = srv.server().state_dir.clone();
    let web = workload(&srv, WEB).await;
    let api = workload(&srv, API).await;

    let (code, out, err) = meshca(
        dir.clone(),
        &[
            "--output",
            "json",
            "deny",
            "add",
            WEB,
            "--reason",
            "exfiltration seen on node-3",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The one denial changed, not the whole list (issue #30 item 7).
    assert_eq!(v["changed"]["action"], "denied", "{v}");
    assert!(v["changed"]["previous"].is_null(), "{v}");
    let d = &v["changed"]["denial"];
    assert_eq!(d["pattern"], WEB);
    assert!(d["by"].as_str().unwrap().starts_with("uid "), "{d}");
    // Its live leaf is listed, with its expiry.
    let live = d["live_leaves"].as_array().unwrap();
    assert_eq!(live.len(), 1, "{d}");
    assert_eq!(live[0]["spiffe_id"], WEB);
    assert!(live[0]["not_after"].as_str().is_some());

    // Refused on every path, each saying why; the other workload renews meanwhile, 0 failures.
    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {}", e.message());
        assert!(
            e.message().contains("exfiltration seen on node-3"),
            "{what}: {}",
            e.message()
        );
    };
    refused(renew(&srv, &web).await.map(drop), "its own certificate");
    refused(
        srv.issue(WEB).await.map(drop),
        "a token that may request it",
    );
    let key = SecretKey::generate_p256().unwrap();
    refused(
        istio(&srv, None)
            .create_certificate(with_token(istio_request(WEB, &key, 0), &srv.token))
            .await
            .map(drop),
        "the Istio face",
    );
    let mut api = api;
    for _ in 0..20 {
        api = renew(&srv, &api).await.expect("api renews: 0 failures");
    }
    let metrics = http_get(srv.server().http_addr, "/metrics").await.1;
    assert!(
        metrics.contains(r#"meshca_authentication_failures_total{reason="identity_denied"} 3"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("authentication_failures"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The denial survives a restart (it is in the authority state).
    srv.stop().await;
    let restarted = Server::start(test_config(&dir), clock.clone())
        .await
        .unwrap();
    let srv = TestServer {
        url: format!("https://{}", restarted.grpc_addr),
        http: restarted.http_addr,
        server: Some(restarted),
        ..srv
    };
    refused(srv.issue(WEB).await.map(drop), "after a restart");
    let (code, out, _) = meshca(dir.clone(), &["deny", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(WEB) && out.contains("live leaves: 1"), "{out}");
    // For data planes: the live serial of the denied identity, in both formats.
    let serial = live[0]["serial"].as_str().unwrap().to_owned();
    let (code, out, _) = meshca(dir.clone(), &["deny", "export", "--format", "pem-serials"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        [serial.as_str()],
        "{out}"
    );
    let (_, out, _) = meshca(dir.clone(), &["deny", "export", "--format", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["serials"][0]["serial"], serial.as_str());
    assert_eq!(v["serials"][0]["spiffe_id"], WEB);

    // A namespace pattern, and a denial that lifts itself (asked for with a token that may
    // request prod/*).
    let ops = rotator::tokens::add_token(
        &dir,
        "ops",
        vec!["spiffe://cluster.local/ns/prod/sa/*".parse().unwrap()],
        None,
    )
    .unwrap();
    let prod = |sa: &str| {
        let (srv, ops) = (&srv, ops.clone());
        let id = format!("spiffe://cluster.local/ns/prod/sa/{sa}");
        async move {
            let key = SecretKey::generate_p256().unwrap();
            let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
            srv.client(None)
                .sign_certificate(with_token(sign_request(csr), &ops))
                .await
                .map(drop)
        }
    };
    meshca_tests::eventually(Duration::from_secs(5), || async { prod("x").await.ok() })
        .await
        .expect("the ops token is loaded");
    let (code, _, err) = meshca(
        dir.clone(),
        &[
            "deny",
            "add",
            "spiffe://cluster.local/ns/prod/sa/*",
            "--reason",
            "ns compromised",
            "--until",
            "1h",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    for sa in ["x", "y"] {
        let e = prod(sa).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("ns compromised"), "{}", e.message());
    }
    srv.issue(API)
        .await
        .expect("default/api is not in the pattern");
    // (`--until 1h` is an hour from the CLI's wall clock; the server's clock is moved past it.)
    clock.advance(Duration::from_secs(3700));
    prod("x").await.expect("the denial expired");
    // A lapsed denial is not listed any more; the one in force is.
    let (code, out, err) = meshca(dir.clone(), &["--output", "json", "deny", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed: Vec<&str> = v["denied"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["pattern"].as_str())
        .collect();
    assert_eq!(listed, vec![WEB], "the lapsed pattern is gone: {v}");
    // Denying an identity again replaces its denial, and says so, naming the old reason; the
    // text shows the one denial changed.
    let (code, text, err) = meshca(
        dir.clone(),
        &["deny", "add", WEB, "--reason", "confirmed by forensics"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with(&format!("denied {WEB}"))
            && text.contains("confirmed by forensics")
            && text.contains("replaced the earlier denial")
            && text.contains("exfiltration seen on node-3"),
        "{text}"
    );
    assert!(!text.contains("prod/sa/*"), "only the one changed: {text}");

    // Bad input: refused, nothing changes.
    let state_before = std::fs::read(dir.join("state.json")).unwrap();
    for (args, says) in [
        (
            &[
                "deny",
                "add",
                "spiffe://other.example/ns/a/sa/b",
                "--reason",
                "x",
            ][..],
            "trust domain",
        ),
        (&["deny", "add", API, "--reason", "  "], "needs a reason"),
        (
            &[
                "deny",
                "add",
                API,
                "--reason",
                "x",
                "--until",
                "2000-01-01T00:00:00Z",
            ],
            "not in the future",
        ),
        (
            &["deny", "add", "not-a-spiffe-id", "--reason", "x"],
            "a SPIFFE ID",
        ),
        (&["deny", "remove", API], "is not denied"),
    ] {
        let (code, _, err) = meshca(dir.clone(), args).await;
        assert_ne!(code, 0, "{args:?} accepted");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(
            std::fs::read(dir.join("state.json")).unwrap(),
            state_before,
            "{args:?}"
        );
    }

    // Lifted: it renews again; the text names what was lifted.
    let (code, text, err) = meshca(dir.clone(), &["deny", "remove", WEB]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with(&format!("lifted the denial of {WEB}"))
            && text.contains("confirmed by forensics"),
        "{text}"
    );
    srv.issue(WEB).await.expect("allowed again");
}
