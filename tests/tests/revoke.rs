//! `meshca issuer revoke`: the revoked issuer stops signing (a fresh one takes over), its leaves
//! can no longer renew with their own certificate, and every `WatchTrustBundle` stream is told to
//! renew now; watching workloads renew with a token and the count under the revoked issuer
//! reaches 0. A real server, the real CLI, real TLS.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use meshca_proto::v1::WatchTrustBundleRequest;
use meshca_tests::{TestServer, Workload, http_get, instance_request, meshca_in, with_token};
use rotator::client::Identity;
use rotator::pki::{CertId, SecretKey};
use tonic::Code;

/// Workloads watching the bundle with their own certificate.
const WATCHERS: usize = 20;

fn issuer_of(w: &Workload) -> CertId {
    CertId::of(w.chain[1].as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_issuers_workloads_are_told_to_renew_and_do() {
    let srv = TestServer::start().await;
    let dir = srv.server().state_dir.clone();
    let mut watchers = Vec::new();
    for n in 0..WATCHERS {
        let id = format!("spiffe://cluster.local/ns/default/sa/w{n}");
        let w = srv.workload_instance(&id, &format!("pod-{n}")).await;
        watchers.push((id, format!("pod-{n}"), w));
    }
    let revoked = issuer_of(&watchers[0].2);

    // Each watcher: a WatchTrustBundle stream with its own certificate; on `renew_now` it renews
    // with the bootstrap token (its certificate no longer counts) and reports when.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(WATCHERS);
    let mut ready = Vec::new();
    for (id, instance, w) in watchers.clone() {
        let mut stream = srv.watch_as(&w, &instance).await;
        let first = stream.next().await.unwrap().unwrap();
        assert!(!first.renew_now, "nothing revoked yet");
        ready.push(());
        let (client, token, done) = (srv.client(None), srv.token.clone(), done_tx.clone());
        tokio::spawn(async move {
            while let Some(Ok(b)) = stream.next().await {
                if b.renew_now {
                    let key = SecretKey::generate_p256().unwrap();
                    let r = client
                        .clone()
                        .sign_certificate(with_token(
                            instance_request(&id, &key, &instance),
                            &token,
                        ))
                        .await;
                    let _ = done.send((Instant::now(), r.map(|r| r.into_inner()))).await;
                    return;
                }
            }
        });
    }
    assert_eq!(ready.len(), WATCHERS);

    let start = Instant::now();
    let (code, out, err) = meshca_in(
        &dir,
        &[
            "--output",
            "json",
            "issuer",
            "revoke",
            revoked.as_str(),
            "--reason",
            "issuer key leaked",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revoked"], revoked.as_str());
    assert_ne!(v["active"], revoked.as_str(), "a fresh issuer signs");
    assert_eq!(v["live_leaves"], WATCHERS, "{v}");

    let mut last = start;
    for _ in 0..WATCHERS {
        let (at, r) = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("every watcher is told to renew")
            .unwrap();
        let r = r.expect("renewal with a token succeeds");
        assert_ne!(
            CertId::of(&r.certificate_chain[1]),
            revoked,
            "signed by the new issuer"
        );
        last = last.max(at);
    }
    let took = last - start;
    println!("issuer revoke → {WATCHERS} watching workloads renewed in {took:?}");

    // Nothing left under the revoked issuer; status and metrics say so.
    let (code, out, _) = meshca_in(&dir, &["--output", "json", "status"]).await;
    assert_eq!(code, 0);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let left = &st["anchor_rotation"]["ledger"]["revoked_issuers"][0];
    assert_eq!(left["issuer"], revoked.as_str(), "{st}");
    assert_eq!(left["live_leaves"], 0, "{left}");
    // `deny list` in text shows the revoked issuer too (issue #30 item 7: it used to list
    // identities only).
    let (code, text, err) = meshca_in(&dir, &["deny", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("issuer {revoked}  revoked"))
            && text.contains("issuer key leaked")
            && text.contains("live leaves: 0"),
        "{text}"
    );
    let metrics = http_get(srv.server().http_addr, "/metrics").await.1;
    let line = format!("meshca_revoked_issuer_live_leaves{{issuer=\"{revoked}\"}} 0");
    assert!(metrics.contains(&line), "{line} not in /metrics");

    // A leaf of the revoked issuer cannot renew with its certificate; a new watcher holding one is
    // told to renew at once.
    let (id, instance, old) = &watchers[0];
    let me = Identity {
        chain: old.chain.clone(),
        key: old.key.clone(),
    };
    let key = SecretKey::generate_p256().unwrap();
    let e = srv
        .client(Some(&me))
        .sign_certificate(instance_request(id, &key, instance))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(
        e.message().contains("was revoked (issuer key leaked)"),
        "{}",
        e.message()
    );
    let first = srv
        .client(Some(&me))
        .watch_trust_bundle(WatchTrustBundleRequest {
            instance_id: "late".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(first.renew_now, "a watcher holding a revoked issuer's leaf");

    // Refusals: unknown id, twice, no reason; nothing changes.
    let before = std::fs::read(dir.join("state.json")).unwrap();
    for (args, says) in [
        (
            &["issuer", "revoke", "0123456789abcdef", "--reason", "x"][..],
            "no issuer",
        ),
        (
            &["issuer", "revoke", revoked.as_str(), "--reason", "x"],
            "already revoked",
        ),
        (
            &["issuer", "revoke", "nope", "--reason", "x"],
            "16 lowercase hex",
        ),
    ] {
        let (code, _, err) = meshca_in(&dir, args).await;
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(std::fs::read(dir.join("state.json")).unwrap(), before);
    }
}
