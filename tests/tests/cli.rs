//! The `meshca` CLI against a real `meshca-server` process, as a user would run them.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::process::Command;

use meshca_tests::{ServerProcess, bin, pem_certs};

fn meshca(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(bin("meshca"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run meshca")
}

#[test]
fn the_banner_command_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = ServerProcess::spawn(&state, &[], &[]).unwrap();
    for want in [
        "bundle.pem",
        "bootstrap-token",
        "trust domain cluster.local",
    ] {
        assert!(
            server.banner.contains(want),
            "banner lacks {want}:\n{}",
            server.banner
        );
    }
    // Run the printed command exactly (it names the meshca binary beside meshca-server).
    let line = server
        .banner
        .lines()
        .skip_while(|l| !l.starts_with("Issue a certificate"))
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        words[0].ends_with("/meshca") && words[1] == "issue",
        "{line}"
    );
    let out = Command::new(words[0])
        .args(&words[1..])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("issued spiffe://cluster.local/ns/default/sa/demo"),
        "{stdout}"
    );
    let chain = pem_certs(&std::fs::read_to_string(dir.path().join("demo.crt")).unwrap());
    assert_eq!(chain.len(), 2);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.path().join("demo.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(dir.path().join("demo.bundle.pem")).unwrap(),
        std::fs::read(state.join("bundle.pem")).unwrap()
    );

    // Renewal over mTLS with the certificate just issued, JSON output.
    let s = state.display().to_string();
    let out = meshca(
        &[
            "--output",
            "json",
            "issue",
            "--server",
            &server.url,
            "--ca-bundle",
            &format!("{s}/bundle.pem"),
            "--cert",
            "demo.crt",
            "--key",
            "demo.key",
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/demo",
            "--out",
            "renewed",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["spiffe_id"], "spiffe://cluster.local/ns/default/sa/demo");
    assert_eq!(j["bundle_version"], 1);

    // A refusal exits 1 and says why.
    let out = meshca(
        &[
            "issue",
            "--server",
            &server.url,
            "--ca-bundle",
            &format!("{s}/bundle.pem"),
            "--token-file",
            &format!("{s}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/prod/sa/x",
            "--out",
            "x",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied")
            && err.contains("may not request spiffe://cluster.local/ns/prod/sa/x"),
        "{err}"
    );
    assert!(
        !dir.path().join("x.key").exists(),
        "nothing written on failure"
    );

    // status and bundle.
    let out = meshca(
        &["--output", "json", "status", "--state-dir", &s],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["trust_domain"], "cluster.local");
    assert_eq!(j["anchors"][0]["status"], "active");
    assert_eq!(j["issuers"][0]["status"], "active");
    let left = j["issuers"][0]["expires_in_seconds"].as_u64().unwrap();
    assert!(left > 6 * 86400 && left <= 7 * 86400 + 300, "{left}");
    let text = meshca(&["status", "--state-dir", &s], dir.path());
    assert!(String::from_utf8_lossy(&text.stdout).contains("phase steady"));

    let out = meshca(
        &[
            "bundle",
            "--server",
            &server.url,
            "--ca-bundle",
            &format!("{s}/bundle.pem"),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, std::fs::read(state.join("bundle.pem")).unwrap());
}

#[test]
fn unreachable_server_and_bad_usage_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    ServerProcess::spawn(&state, &[], &[]).unwrap().kill();
    let s = state.display().to_string();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = meshca(
        &[
            "issue",
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "--ca-bundle",
            &format!("{s}/bundle.pem"),
            "--token-file",
            &format!("{s}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/a",
            "--out",
            "a",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach https://127.0.0.1:{port}")) && err.contains("refused"),
        "{err}"
    );

    let out = meshca(
        &[
            "issue",
            "--server",
            "https://x",
            "--ca-bundle",
            "b.pem",
            "--spiffe-id",
            "not-an-id",
            "--out",
            "a",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("scheme must be spiffe://"));

    let out = meshca(
        &["status", "--state-dir", "/nonexistent/meshca"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no authority here"));
}

/// Runs the README's mTLS walkthrough with openssl: `s_server` demands a client certificate and
/// echoes reversed; `s_client` connects with another workload's certificate. A client holding a
/// certificate from another authority is the negative control.
#[test]
fn readme_walkthrough_openssl_mtls() {
    let Some(openssl) = meshca_tests::require_tool("openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = ServerProcess::spawn(&state, &[], &[]).unwrap();
    let s = state.display().to_string();
    for w in ["web", "db"] {
        let out = meshca(
            &[
                "issue",
                "--server",
                &server.url,
                "--ca-bundle",
                &format!("{s}/bundle.pem"),
                "--token-file",
                &format!("{s}/bootstrap-token"),
                "--spiffe-id",
                &format!("spiffe://cluster.local/ns/default/sa/{w}"),
                "--out",
                w,
            ],
            dir.path(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A workload of a different authority.
    let other_state = dir.path().join("other");
    let other = ServerProcess::spawn(&other_state, &[], &[]).unwrap();
    let o = other_state.display().to_string();
    let out = meshca(
        &[
            "issue",
            "--server",
            &other.url,
            "--ca-bundle",
            &format!("{o}/bundle.pem"),
            "--token-file",
            &format!("{o}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/db",
            "--out",
            "stranger",
        ],
        dir.path(),
    );
    assert!(out.status.success());

    let echo = |client: &str| -> (bool, String) {
        use std::io::{BufRead, BufReader, Write};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut srv = Command::new(&openssl)
            .current_dir(dir.path())
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                "web.crt",
                "-cert_chain",
                "web.crt",
                "-key",
                "web.key",
                "-CAfile",
                "web.bundle.pem",
                "-Verify",
                "2",
                "-verify_return_error",
                "-naccept",
                "1",
                "-rev",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // s_server prints ACCEPT once it listens.
        let mut lines = BufReader::new(srv.stdout.take().unwrap()).lines();
        assert!(
            lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains("ACCEPT")),
            "s_server did not start"
        );
        let mut cli = Command::new(&openssl)
            .current_dir(dir.path())
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-cert",
                &format!("{client}.crt"),
                "-cert_chain",
                &format!("{client}.crt"),
                "-key",
                &format!("{client}.key"),
                "-CAfile",
                "db.bundle.pem",
                "-verify_return_error",
                "-ign_eof",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        cli.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
        // Read until the echo arrives or the client ends (refused); then stop both.
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = cli.stdout.take().unwrap();
        let stderr = cli.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(Some(line));
                }
                let _ = tx.send(None);
            });
        }
        let mut text = String::new();
        let mut ended = 0;
        loop {
            match rx.recv_timeout(std::time::Duration::from_secs(20)) {
                Ok(Some(line)) => {
                    text.push_str(&line);
                    text.push('\n');
                    if line.contains("olleh") {
                        break;
                    }
                }
                Ok(None) => {
                    ended += 1;
                    if ended == 2 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = cli.kill();
        let _ = cli.wait();
        let _ = srv.kill();
        let _ = srv.wait();
        (text.contains("olleh"), text)
    };
    let (ok, text) = echo("db");
    assert!(
        ok && text.contains("Verify return code: 0 (ok)"),
        "mTLS between web and db failed:\n{text}"
    );
    let (ok, text) = echo("stranger");
    assert!(
        !ok,
        "a certificate from another authority was accepted:\n{text}"
    );
}

/// Token files hold the token's bytes and nothing else: ztunnel (and other clients) send a token
/// file unchanged as the `authorization` value, where a trailing newline is not a valid header
/// byte. The bootstrap token, `meshca token add --out` and `meshca token add > file` all write
/// such files, and each one's raw bytes authenticate a request as they are.
#[tokio::test]
async fn token_files_are_usable_as_raw_header_values() {
    use meshca_tests::{TestServer, sign_request};
    use rotator::client::make_csr;
    use rotator::pki::SecretKey;
    use std::os::unix::fs::PermissionsExt;
    use tonic::metadata::MetadataValue;

    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let work = tempfile::tempdir().unwrap();
    // Sends `Bearer ` + the file's bytes, unchanged (as ztunnel does), asking for `id`.
    let sign_with_file = |path: std::path::PathBuf, id: &'static str| {
        let srv = &srv;
        async move {
            let raw = std::fs::read(&path).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                path.display()
            );
            let mut header = b"Bearer ".to_vec();
            header.extend_from_slice(&raw);
            let value = MetadataValue::try_from(header.as_slice())
                .unwrap_or_else(|e| panic!("{}: not a valid header value: {e}", path.display()));
            let key = SecretKey::generate_p256().unwrap();
            let csr = make_csr(&id.parse().unwrap(), &key).unwrap();
            let mut req = tonic::Request::new(sign_request(csr));
            req.metadata_mut().insert("authorization", value);
            srv.client(None).sign_certificate(req).await.map(|_| ())
        }
    };
    let bootstrap = dir.join("bootstrap-token");
    assert!(!std::fs::read(&bootstrap).unwrap().ends_with(b"\n"));
    sign_with_file(bootstrap, "spiffe://cluster.local/ns/default/sa/a")
        .await
        .unwrap();

    // `meshca token add --out FILE`.
    let file = work.path().join("ztunnel-token");
    let state = dir.to_str().unwrap();
    let args = |out: &str| {
        vec![
            "token".to_owned(),
            "add".into(),
            "--name".into(),
            "ztunnel".into(),
            "--allow".into(),
            "spiffe://cluster.local/ns/istio-system/sa/*".into(),
            "--state-dir".into(),
            state.into(),
            "--out".into(),
            out.into(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        meshca(&a, work.path())
    };
    let out = run(args(file.to_str().unwrap()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "the token goes to the file only");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no trailing newline"));
    // The server picks a new token up within its reload interval (2 s): poll, never sleep.
    let accepted = |path: std::path::PathBuf| {
        let sign = &sign_with_file;
        async move {
            meshca_tests::eventually(std::time::Duration::from_secs(10), || {
                let p = path.clone();
                async move {
                    sign(p, "spiffe://cluster.local/ns/istio-system/sa/ztunnel")
                        .await
                        .ok()
                }
            })
            .await
            .is_some()
        }
    };
    assert!(
        accepted(file.clone()).await,
        "the --out token file authenticates"
    );
    // An existing file is not overwritten, and nothing is registered.
    let tokens_before = std::fs::read(dir.join("tokens.json")).unwrap();
    let bytes_before = std::fs::read(&file).unwrap();
    let out = run(args(file.to_str().unwrap()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.join("tokens.json")).unwrap(),
        tokens_before
    );
    assert_eq!(std::fs::read(&file).unwrap(), bytes_before);

    // `meshca token add > file`: stdout is not a terminal, so it carries the bytes alone.
    let mut a = args("unused");
    a.truncate(a.len() - 2);
    let out = run(a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redirected = work.path().join("redirected");
    std::fs::write(&redirected, &out.stdout).unwrap();
    std::fs::set_permissions(&redirected, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(out.stdout.starts_with(b"mca_") && !out.stdout.ends_with(b"\n"));
    assert!(
        accepted(redirected).await,
        "the redirected token authenticates"
    );
}

/// `meshca issue` without `--instance-id` renews the same output as the same workload (issue
/// #30, item 4): three renewals of `web` and one of `db` are two live workloads, not four, so the
/// measured gates do not wait for superseded leaves to expire.
#[tokio::test]
async fn renewing_the_same_output_is_the_same_workload() {
    let srv = meshca_tests::TestServer::start().await;
    let work = tempfile::tempdir().unwrap();
    let (url, dir, cwd) = (srv.url.clone(), srv.state_dir(), work.path().to_owned());
    tokio::task::spawn_blocking(move || {
        for name in ["web", "web", "web", "db"] {
            meshca_tests::cli_issue(&url, &dir, name, &cwd);
        }
    })
    .await
    .unwrap();
    let (code, out, err) =
        meshca_tests::meshca_in(&srv.state_dir(), &["status", "--output", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["anchor_rotation"]["ledger"]["live_workloads"], 2,
        "web renewed three times is one workload: {out}"
    );
}
