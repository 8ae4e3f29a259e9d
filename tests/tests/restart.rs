//! The authority survives restarts, and a damaged state dir stops the server with a message that
//! names the file — without changing a byte of it.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::sync::Arc;

use ca_server::server::Server;
use meshca_tests::{ServerProcess, TestServer, chain_of, snapshot_dir, test_config};
use rotator::client::verify_svid;
use rotator::clock::SystemClock;
use rustls_pki_types::UnixTime;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

#[tokio::test]
async fn restart_keeps_anchor_issuer_and_bundle() {
    let mut ts = TestServer::start().await;
    let before = ts.server().authority.snapshot();
    let issuer_before = before.issuer.as_ref().unwrap().id.clone();
    let (r, _) = ts.issue(WEB).await.unwrap();
    let token = ts.token.clone();
    ts.stop().await;

    let again = Server::start(test_config(&ts.state_dir()), Arc::new(SystemClock))
        .await
        .unwrap();
    assert!(!again.created, "loaded, not created");
    assert!(again.bootstrap_token.is_none(), "no new bootstrap token");
    let after = again.authority.snapshot();
    assert_eq!(
        after.bundle.anchors, before.bundle.anchors,
        "same trust anchor"
    );
    assert_eq!(after.bundle.version, before.bundle.version);
    assert_eq!(
        after.issuer.as_ref().unwrap().id,
        issuer_before,
        "same issuer"
    );
    assert_eq!(after.generation, before.generation);
    // A leaf from before the restart still verifies against the bundle after it.
    verify_svid(
        &chain_of(&r),
        &after.bundle.anchors,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();
    // The old bootstrap token still works.
    ts.server = Some(again);
    ts.url = format!("https://{}", ts.server().grpc_addr);
    ts.token = token;
    ts.issue(WEB).await.expect("issued after restart");
    ts.stop().await;
}

#[test]
fn a_killed_server_restarts_on_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = ServerProcess::spawn(&state, &[], &[]).unwrap();
    assert!(
        first.banner.contains("created a new authority"),
        "{}",
        first.banner
    );
    let bundle = std::fs::read(state.join("bundle.pem")).unwrap();
    // The issuance ledger is a journal, rewritten at every start (and after a kill it restarts
    // its completeness from now); the authority's files are what must not change.
    let authority_files = |d: &std::path::Path| {
        let mut f = snapshot_dir(d);
        f.retain(|p, _| p != std::path::Path::new("ledger.log"));
        f
    };
    let files = authority_files(&state);
    first.kill();
    let second = ServerProcess::spawn(&state, &[], &[]).unwrap();
    assert!(
        second.banner.contains("loaded the authority"),
        "{}",
        second.banner
    );
    assert_eq!(std::fs::read(state.join("bundle.pem")).unwrap(), bundle);
    assert_eq!(
        authority_files(&state),
        files,
        "a plain restart changes no authority file"
    );
}

#[test]
fn a_damaged_state_dir_refuses_to_start_and_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    ServerProcess::spawn(&state, &[], &[]).unwrap().kill();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
    let anchor = json["anchors"][0]["id"].as_str().unwrap().to_owned();
    let issuer = json["issuers"][0]["id"].as_str().unwrap().to_owned();
    let pristine = snapshot_dir(&state);

    type Damage = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, String, &str, Damage)> = vec![
        (
            "truncated state.json",
            "state.json".into(),
            "not valid state JSON",
            Box::new(|d| {
                let b = std::fs::read(d.join("state.json")).unwrap();
                std::fs::write(d.join("state.json"), &b[..b.len() / 2]).unwrap();
            }),
        ),
        (
            "deleted state.json",
            "state.json".into(),
            "refusing to generate a new trust anchor",
            Box::new(|d| std::fs::remove_file(d.join("state.json")).unwrap()),
        ),
        (
            "garbage anchor certificate",
            format!("anchors/{anchor}.crt"),
            "not PEM",
            Box::new({
                let a = anchor.clone();
                move |d| std::fs::write(d.join(format!("anchors/{a}.crt")), "garbage").unwrap()
            }),
        ),
        (
            "missing issuer key",
            format!("issuers/{issuer}.key"),
            "missing",
            Box::new({
                let i = issuer.clone();
                move |d| std::fs::remove_file(d.join(format!("issuers/{i}.key"))).unwrap()
            }),
        ),
        (
            "issuer key swapped for the anchor key",
            format!("issuers/{issuer}.key"),
            "does not belong",
            Box::new({
                let (a, i) = (anchor.clone(), issuer.clone());
                move |d| {
                    std::fs::copy(
                        d.join(format!("anchors/{a}.key")),
                        d.join(format!("issuers/{i}.key")),
                    )
                    .map(|_| ())
                    .unwrap()
                }
            }),
        ),
    ];
    for (name, file, problem, damage) in cases {
        // Fresh copy of the pristine state for each case.
        let case_dir = tempfile::tempdir().unwrap();
        let d = case_dir.path().join("state");
        for (rel, (bytes, mode)) in &pristine {
            let p = d.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        damage(&d);
        let damaged = snapshot_dir(&d);
        let refused = match ServerProcess::spawn(&d, &[], &[]) {
            Ok(p) => panic!("{name}: the server started:\n{}", p.banner),
            Err(r) => r,
        };
        assert_eq!(refused.status.code(), Some(1), "{name}: {refused:?}");
        assert!(
            refused.stderr.contains("refusing to start"),
            "{name}: {}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains(&file),
            "{name}: stderr does not name {file}: {}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains(problem),
            "{name}: stderr does not say {problem:?}: {}",
            refused.stderr
        );
        assert_eq!(
            snapshot_dir(&d),
            damaged,
            "{name}: the state dir was changed"
        );
    }
}
