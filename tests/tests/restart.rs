//! The authority survives restarts, and a damaged state dir stops the server with a message that
//! names the file — without changing a byte of it.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::fs::Permissions;
use std::path::Path;
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

/// The uid and gid the shipped Deployment runs as (`runAsUser`, `fsGroup`).
const POD_UID: u32 = 65532;

/// Where the manifests put it (#15): the shipped Deployment runs meshca as uid 65532 with
/// `fsGroup: 65532`, `readOnlyRootFilesystem: true`, and its state dir on an emptyDir — which the
/// kubelet creates owned by root, group = fsGroup, mode 2777. The server must start there as that
/// uid, keep its files in a directory it owns (0700, keys 0600), leave the volume as the kubelet
/// made it, serve `meshca` run as the same uid, and find the same authority after a kill. Before
/// the fix it refused to start (`chmod` of the volume: Operation not permitted).
#[test]
fn starts_as_the_pod_user_on_a_kubelet_empty_dir_under_a_read_only_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (Some(_), Some(_), Some(_)) = (
        meshca_tests::require_tool("unshare"),
        meshca_tests::require_tool("setpriv"),
        meshca_tests::require_tool("findmnt"),
    ) else {
        return;
    };
    let me = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must run this test (it drops to uid {POD_UID})"
        );
        eprintln!(
            "SKIPPED: needs root to prepare the volume as the kubelet does and drop to uid {POD_UID}"
        );
        return;
    }
    let perm = |p: &Path, mode: u32| std::fs::set_permissions(p, Permissions::from_mode(mode));
    let tmp = tempfile::tempdir().unwrap();
    perm(tmp.path(), 0o755).unwrap();
    // The binaries, copied where uid 65532 may run them (the checkout may not be readable to it).
    let bins = tmp.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    perm(&bins, 0o755).unwrap();
    for name in ["meshca-server", "meshca"] {
        std::fs::copy(meshca_tests::bin(name), bins.join(name)).unwrap();
        perm(&bins.join(name), 0o755).unwrap();
    }
    // The emptyDir, as the kubelet makes it.
    let vol = tmp.path().join("scratch");
    std::fs::create_dir(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(0), Some(POD_UID)).unwrap();
    perm(&vol, 0o2777).unwrap();
    // A working dir for the CLI's outputs, owned by the pod user.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(POD_UID), Some(POD_UID)).unwrap();

    // In a private mount namespace: the volume stays writable, everything else is read-only; then
    // drop to the pod's uid and gid (no supplementary groups, as in the pod).
    let launch = r#"set -e
vol="$1"; shift
parent=$(findmnt -n -o TARGET --target "$vol")
mount --bind "$vol" "$vol"
mount -o remount,bind,ro /
[ "$parent" = / ] || mount -o remount,bind,ro "$parent"
exec setpriv --reuid 65532 --regid 65532 --clear-groups -- "$@""#;
    let argv = |vol: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "unshare".into(),
            "--mount".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            launch.into(),
            "sh".into(),
            vol.into(),
            bins.join("meshca-server").into(),
        ]
    };
    let as_pod_user = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "65532",
                "--regid",
                "65532",
                "--clear-groups",
                "--",
            ])
            .arg(bins.join("meshca"))
            .args(args)
            .current_dir(&work)
            .output()
            .unwrap()
    };

    // Another user of the shared volume cannot plant meshca's directory.
    std::os::unix::fs::symlink(&work, vol.join("meshca")).unwrap();
    let refused = ServerProcess::spawn_as(&argv(&vol), &vol, &[], &[])
        .err()
        .expect("a planted symlink is refused");
    assert!(
        refused
            .stderr
            .contains("not a directory (a symlink or a file)"),
        "{}",
        refused.stderr
    );
    std::fs::remove_file(vol.join("meshca")).unwrap();

    let first = ServerProcess::spawn_as(&argv(&vol), &vol, &[], &[])
        .unwrap_or_else(|r| panic!("meshca-server did not start as uid {POD_UID}: {r:?}"));
    assert!(
        first.banner.contains("created a new authority"),
        "{}",
        first.banner
    );
    let own = vol.join("meshca");
    let meta = std::fs::symlink_metadata(&own).unwrap();
    assert!(meta.is_dir());
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (POD_UID, 0o700),
        "meshca's own directory: the pod user's, 0700"
    );
    let volume = std::fs::metadata(&vol).unwrap();
    assert_eq!(
        (volume.uid(), volume.gid(), volume.mode() & 0o7777),
        (0, POD_UID, 0o2777),
        "the volume is left as the kubelet made it"
    );
    let files = snapshot_dir(&own);
    let keys: Vec<_> = files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "key"))
        .collect();
    assert!(
        keys.len() >= 2,
        "anchor and issuer keys: {:?}",
        files.keys()
    );
    for (path, (_, mode)) in &keys {
        assert_eq!(*mode & 0o777, 0o600, "{}", path.display());
        assert_eq!(std::fs::metadata(own.join(path)).unwrap().uid(), POD_UID);
    }
    assert!(
        !vol.join("state.json").exists(),
        "nothing private in the shared volume"
    );

    // The operator CLI, run as the pod user (as `kubectl exec` does) with the configured state dir,
    // finds the same files: the live server's status, then a certificate.
    let status = as_pod_user(&[
        "--output",
        "json",
        "status",
        "--state-dir",
        vol.to_str().unwrap(),
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(own.join("state.json")).unwrap()).unwrap();
    let anchor = state["anchors"][0]["id"].as_str().unwrap().to_owned();
    assert!(
        doc.to_string().contains(&anchor),
        "status names the anchor {anchor}: {doc}"
    );
    let o = own.display();
    let issued = as_pod_user(&[
        "issue",
        "--server",
        &first.url,
        "--ca-bundle",
        &format!("{o}/bundle.pem"),
        "--token-file",
        &format!("{o}/bootstrap-token"),
        "--spiffe-id",
        WEB,
        "--out",
        "web",
    ]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let chain = meshca_tests::pem_certs(&std::fs::read_to_string(work.join("web.crt")).unwrap());
    let roots = meshca_tests::pem_certs(&std::fs::read_to_string(own.join("bundle.pem")).unwrap());
    verify_svid(
        &chain,
        &roots,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();

    // Killed and started again the same way: the same authority, nothing generated anew.
    let authority = |d: &Path| {
        let mut f = snapshot_dir(d);
        f.retain(|p, _| p.starts_with("anchors") || p.starts_with("issuers"));
        f
    };
    let before = authority(&own);
    first.kill();
    let second = ServerProcess::spawn_as(&argv(&vol), &vol, &[], &[]).unwrap();
    assert!(
        second.banner.contains("loaded the authority"),
        "{}",
        second.banner
    );
    assert_eq!(authority(&own), before);
}
