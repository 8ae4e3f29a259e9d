//! `meshca anchors emergency`: the anchor key is compromised. A new anchor signs at once, the old
//! anchor's issuers are revoked, and every bundle watcher gets the new bundle with `renew_now`;
//! watchers renew and keep completing real mTLS handshakes with each other. Negative control: a
//! workload that received no push (it holds only the old bundle) fails to verify the new leaves.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use meshca_tests::{TestServer, Workload, instance_request, meshca_in, mtls_handshake, with_token};
use rotator::pki::SecretKey;

const WATCHERS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_rotation_pushes_the_new_anchor_to_every_watcher() {
    let srv = TestServer::start().await;
    let dir = srv.server().state_dir.clone();
    let old_bundle = srv.bundle();
    // A workload that never watches: it holds the old bundle only.
    let silent = srv
        .workload_instance("spiffe://cluster.local/ns/default/sa/silent", "silent")
        .await;

    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(WATCHERS);
    for n in 0..WATCHERS {
        let (id, instance) = (
            format!("spiffe://cluster.local/ns/default/sa/w{n}"),
            format!("pod-{n}"),
        );
        let w = srv.workload_instance(&id, &instance).await;
        let mut stream = srv.watch_as(&w, &instance).await;
        let first = stream.next().await.unwrap().unwrap();
        let (url, token, done) = (srv.url.clone(), srv.token.clone(), done_tx.clone());
        tokio::spawn(async move {
            let mut version = first.version;
            while let Some(Ok(b)) = stream.next().await {
                // The new bundle and the order to renew (one message or two). meshca's own
                // certificate is under the new anchor now: connect with the bundle just pushed.
                if b.version > version && b.renew_now {
                    let bundle: Vec<_> = b
                        .anchors
                        .iter()
                        .map(|a| rustls_pki_types::CertificateDer::from(a.clone()))
                        .collect();
                    let tls = rotator::client::client_tls(&bundle, None).unwrap();
                    let mut client =
                        meshca_proto::v1::identity_service_client::IdentityServiceClient::new(
                            rotator::client::channel(&url, tls).unwrap(),
                        );
                    let key = SecretKey::generate_p256().unwrap();
                    let r = client
                        .sign_certificate(with_token(
                            instance_request(&id, &key, &instance),
                            &token,
                        ))
                        .await
                        .unwrap()
                        .into_inner();
                    let _ = done
                        .send((Instant::now(), Workload::from_response(&r, key)))
                        .await;
                    return;
                }
                version = version.max(b.version);
            }
        });
    }

    let start = Instant::now();
    let (code, out, err) = meshca_in(
        &dir,
        &[
            "--output",
            "json",
            "anchors",
            "emergency",
            "--reason",
            "anchor key leaked",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["phase"], "activated");
    let risk = v["risk"].as_str().unwrap();
    assert!(
        risk.contains(&format!("{} live workloads", WATCHERS + 1)),
        "{risk}"
    );

    let mut renewed = Vec::new();
    let mut last = start;
    for _ in 0..WATCHERS {
        let (at, w) = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("every watcher renews")
            .unwrap();
        assert_eq!(w.bundle.len(), 2, "the new bundle holds both anchors");
        last = last.max(at);
        renewed.push(w);
    }
    println!(
        "anchors emergency → {WATCHERS} watching workloads on the new anchor in {:?}",
        last - start
    );
    // Everyone who got the push verifies everyone else: 0 failed handshakes.
    let mut handshakes = 0;
    for a in &renewed {
        for b in renewed.iter().take(3) {
            mtls_handshake(a, b).await.unwrap();
            handshakes += 1;
        }
    }
    assert_eq!(handshakes, WATCHERS * 3);
    // Negative control: the workload that got no push holds the old bundle only and cannot
    // verify a leaf of the new anchor; with the new bundle it can.
    assert_eq!(silent.bundle, old_bundle);
    let e = mtls_handshake(&silent, &renewed[0])
        .await
        .expect_err("a workload without the new bundle must fail");
    println!("without the push: {e}");
    let told = Workload {
        bundle: renewed[0].bundle.clone(),
        ..silent.clone()
    };
    mtls_handshake(&told, &renewed[0]).await.unwrap();

    // For data planes: the leaf of the revoked issuer that has not renewed (silent's) is in the
    // export, the renewed ones are not.
    let (code, out, err) = meshca_in(&dir, &["deny", "export", "--format", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let exported: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = exported["serials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://cluster.local/ns/default/sa/silent"],
        "{out}"
    );
    // A rollback would go back to the compromised anchor: it never reuses a revoked issuer.
    let st = srv.server().authority.read(|s| s.clone()).await;
    let revoked: Vec<_> = st.revoked.iter().map(|r| r.issuer.clone()).collect();
    assert!(!revoked.is_empty(), "the old anchor's issuers are revoked");
    assert!(
        st.issuers
            .iter()
            .filter(|i| revoked.contains(i.cert.id()))
            .all(|i| i.status == rotator::state::IssuerStatus::Retired)
    );
    // The old anchor stays until the operator finishes: its leaves (silent's) still live.
    let (code, _, err) = meshca_in(&dir, &["anchors", "finish"]).await;
    assert_ne!(code, 0, "finish waits for the old anchor's leaves");
    assert!(err.contains("gate closed"), "{err}");
    let (code, _, err) = meshca_in(&dir, &["anchors", "finish", "--force"]).await;
    assert_eq!(code, 0, "{err}");
    // Refused outside steady? Now steady again: a second emergency is allowed; refused with no
    // reason.
    let (code, _, err) = meshca_in(&dir, &["anchors", "emergency", "--reason", " "]).await;
    assert_ne!(code, 0);
    assert!(err.contains("needs a reason"), "{err}");
}
