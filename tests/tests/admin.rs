//! The admin socket: who can reach it, and what every admin command says when no server is there.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshca_proto::v1::RotateIssuerRequest;
use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_tests::{ServerProcess, TestServer, bin};
use rustls_pki_types::ServerName;

fn meshca(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(bin("meshca"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

#[test]
fn admin_commands_without_a_server_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let dir = w.join("state");
    let d = dir.display().to_string();
    std::fs::write(w.join("x.crt"), "not used").unwrap();
    let commands: [&[&str]; 8] = [
        &["issuer", "rotate", "--state-dir", &d],
        &["issuer", "csr", "--state-dir", &d, "--out", "next.csr"],
        &["issuer", "import", "--state-dir", &d, "--cert", "x.crt"],
        &["anchors", "stage", "--state-dir", &d],
        &["anchors", "activate", "--state-dir", &d],
        &["anchors", "finish", "--state-dir", &d, "--force"],
        &["anchors", "rollback", "--state-dir", &d],
        &[
            "anchors",
            "wait",
            "--state-dir",
            &d,
            "--until",
            "finish-ready",
        ],
    ];
    // 1. A state dir no server ever ran in: no socket.
    std::fs::create_dir_all(&dir).unwrap();
    for c in commands {
        let out = meshca(c, w);
        assert_eq!(out.status.code(), Some(1), "{c:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no meshca-server is running here")
                && err.contains("admin.sock does not exist"),
            "{c:?}: {err}"
        );
    }
    // 2. A server that was killed: its socket is left behind, nobody answers.
    ServerProcess::spawn(&dir, &[], &[]).unwrap().kill();
    assert!(
        std::fs::metadata(dir.join("admin.sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    for c in commands {
        let out = meshca(c, w);
        assert_eq!(out.status.code(), Some(1), "{c:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("connection refused") && err.contains("not running"),
            "{c:?}: {err}"
        );
    }
    // 3. status falls back to the state dir (and says so), unless a socket was named.
    let out = meshca(&["status", "--state-dir", &d], w);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("read from the state dir"));
    let out = meshca(&["status", "--admin-socket", &format!("{d}/admin.sock")], w);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no meshca-server answers"));
    // 4. A restarted server replaces the stale socket and answers.
    let _server = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    let out = meshca(&["--output", "json", "status", "--state-dir", &d], w);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["server"]["ready"], true);
}

#[tokio::test]
async fn the_socket_is_owner_only_and_the_server_certificate_follows_the_issuer() {
    let ts = TestServer::start().await;
    let sock = ts.server().admin_socket.clone();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(ts.state_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let old = ts
        .server()
        .authority
        .snapshot()
        .issuer
        .as_ref()
        .unwrap()
        .id
        .clone();
    assert_eq!(ts.server().tls.current().unwrap().issuer, old);
    let mut admin = AdminServiceClient::new(rotator::client::admin_channel(&sock).await.unwrap());
    let r = admin
        .rotate_issuer(RotateIssuerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.replaced, old.to_string());
    assert_ne!(r.id, old.to_string());

    // The gRPC port's own certificate is re-issued under the new issuer, seen by a new handshake.
    let seen = meshca_tests::eventually(Duration::from_secs(10), || {
        let bundle = ts.bundle();
        let addr = ts.server().grpc_addr;
        let want = r.id.clone();
        async move {
            let tls = rotator::client::client_tls(&bundle, None).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let conn = tokio_rustls::TlsConnector::from(tls)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .ok()?;
            let chain = conn.get_ref().1.peer_certificates()?.to_vec();
            let issuer = rotator::pki::CertId::of(&chain[1]);
            (issuer.as_str() == want).then_some(issuer)
        }
    })
    .await;
    assert!(
        seen.is_some(),
        "the server certificate was not re-issued under the new issuer"
    );
    // And issuance still works over it.
    ts.issue("spiffe://cluster.local/ns/default/sa/web")
        .await
        .unwrap();
}
