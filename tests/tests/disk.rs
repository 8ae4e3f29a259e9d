//! Disk faults (#15): ENOSPC and EIO injected at the writes of the state, the keys, the bundle file
//! and the ledger (compiled-in `rotator::store::io_faults`, scoped to each test's state dir). Each
//! time: the state on disk is never half-written, memory and disk never disagree, the error reaches
//! the log, `/readyz` and `meshca_disk_write_failures_total`, and once the fault clears the next
//! step succeeds without a restart.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::path::Path;
use std::time::Duration;

use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{RotateIssuerRequest, StageAnchorRequest};
use meshca_tests::{TestServer, eventually, http_get, snapshot_dir};
use rotator::store::FileStore;
use rotator::store::io_faults::{self, Stage};
use tonic::transport::Channel;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

async fn admin(ts: &TestServer) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(
        rotator::client::admin_channel(&ts.server().admin_socket)
            .await
            .unwrap(),
    )
}

/// `meshca_disk_write_failures_total{file}` as served on /metrics.
async fn failures(ts: &TestServer, file: &str) -> u64 {
    let (_, body) = http_get(ts.http, "/metrics").await;
    let line = format!("meshca_disk_write_failures_total{{file=\"{file}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// The authority's files: what a failed commit must leave byte for byte.
fn authority_files(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, (Vec<u8>, u32)> {
    let mut f = snapshot_dir(dir);
    f.retain(|p, _| p == Path::new("state.json") || p == Path::new("bundle.pem"));
    f
}

fn stored_generation(dir: &Path) -> u64 {
    FileStore::read_only(dir)
        .load_sync()
        .unwrap()
        .unwrap()
        .generation
}

#[tokio::test]
async fn a_failed_commit_changes_nothing_and_the_next_one_succeeds_once_the_disk_recovers() {
    for (file, errno) in [
        ("state.json", ENOSPC),
        ("state.json", EIO),
        (".key", ENOSPC),
    ] {
        let ts = TestServer::start().await;
        let dir = ts.state_dir();
        let mut admin = admin(&ts).await;
        let before = authority_files(&dir);
        let generation = ts.server().authority.snapshot().generation;

        io_faults::inject(&dir, file, Stage::Write, errno);
        let refused = admin
            .rotate_issuer(RotateIssuerRequest {})
            .await
            .expect_err("the commit fails");
        let said = std::io::Error::from_raw_os_error(errno).to_string();
        assert!(refused.message().contains(&said), "{file}: {refused:?}");
        assert_eq!(
            authority_files(&dir),
            before,
            "{file}: nothing half-written"
        );
        assert_eq!(ts.server().authority.snapshot().generation, generation);
        assert_eq!(stored_generation(&dir), generation, "disk = memory");
        assert!(failures(&ts, "state").await >= 1, "{file}: counted");
        let (code, body) = http_get(ts.http, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("cannot write state"), "{file}: {body}");
        // Still signs under the old issuer.
        ts.issue(WEB).await.unwrap();

        io_faults::clear(&dir);
        let r = admin
            .rotate_issuer(RotateIssuerRequest {})
            .await
            .unwrap()
            .into_inner();
        let after = ts.server().authority.snapshot();
        assert_eq!(after.issuer.as_ref().unwrap().id.to_string(), r.id);
        assert_eq!(after.generation, generation + 2, "prepared, activated");
        assert_eq!(stored_generation(&dir), after.generation, "disk = memory");
        let (_, body) = http_get(ts.http, "/readyz").await;
        assert!(!body.contains("cannot write"), "recovered: {body}");
    }
}

/// A write that fails after `state.json` was renamed into place (its directory's fsync fails) has
/// committed. Before #15 it was reported as "nothing changed" while disk held the new state, and
/// every later step failed with a conflict until a restart.
#[tokio::test]
async fn a_failure_after_the_commit_point_is_taken_as_the_commit_it_was() {
    let ts = TestServer::start().await;
    let dir = ts.state_dir();
    let mut admin = admin(&ts).await;
    let generation = ts.server().authority.snapshot().generation;
    io_faults::inject(&dir, "state.json", Stage::AfterRename, EIO);
    let r = admin
        .rotate_issuer(RotateIssuerRequest {})
        .await
        .expect("committed on disk, so committed")
        .into_inner();
    let now = ts.server().authority.snapshot();
    assert_eq!(now.issuer.as_ref().unwrap().id.to_string(), r.id);
    assert_eq!(now.generation, generation + 2);
    assert_eq!(stored_generation(&dir), now.generation, "disk = memory");
    assert!(
        failures(&ts, "state").await >= 2,
        "each fsync failure counted"
    );

    io_faults::clear(&dir);
    admin.rotate_issuer(RotateIssuerRequest {}).await.unwrap();
    assert_eq!(
        stored_generation(&dir),
        ts.server().authority.snapshot().generation
    );
    let (_, body) = http_get(ts.http, "/readyz").await;
    assert!(!body.contains("cannot write"), "{body}");
}

/// The bundle file is an output: a failed write of it keeps the committed anchor step, is said on
/// `/readyz` (still 200: the CA signs) and in the metric, never leaves a torn file, and is
/// repaired by the next tick once the disk recovers.
#[tokio::test]
async fn a_bundle_file_that_cannot_be_written_is_repaired_without_a_restart() {
    let ts = TestServer::start().await;
    let dir = ts.state_dir();
    let mut admin = admin(&ts).await;
    let old = std::fs::read(dir.join("bundle.pem")).unwrap();
    io_faults::inject(&dir, "bundle.pem", Stage::Write, ENOSPC);
    admin
        .stage_anchor(StageAnchorRequest::default())
        .await
        .expect("the stage is committed; only the bundle file lags");
    let state = FileStore::read_only(&dir).load_sync().unwrap().unwrap();
    assert_eq!(state.bundle().count(), 2, "staged: two anchors");
    assert_eq!(
        std::fs::read(dir.join("bundle.pem")).unwrap(),
        old,
        "old file, whole"
    );
    assert!(failures(&ts, "bundle").await >= 1);
    let (code, body) = http_get(ts.http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("cannot write bundle"), "{body}");

    io_faults::clear(&dir);
    let want: String = state.bundle().map(|a| a.cert.pem()).collect();
    let repaired = eventually(Duration::from_secs(10), || {
        let (dir, want) = (dir.clone(), want.clone());
        async move { (std::fs::read_to_string(dir.join("bundle.pem")).ok()? == want).then_some(()) }
    })
    .await;
    assert!(
        repaired.is_some(),
        "bundle.pem rewritten after the disk recovered"
    );
    let (_, body) = http_get(ts.http, "/readyz").await;
    assert!(!body.contains("cannot write"), "{body}");
}

/// The issuance ledger cannot be written: signing goes on (its records stay queued in memory), the
/// failure is said, and the records reach the file once the disk recovers.
#[tokio::test]
async fn a_ledger_that_cannot_be_written_does_not_stop_signing() {
    let ts = TestServer::start().await;
    let dir = ts.state_dir();
    io_faults::inject(&dir, "ledger.log", Stage::Write, ENOSPC);
    for i in 0..5 {
        ts.issue(&format!("{WEB}-{i}")).await.unwrap();
    }
    let counted = eventually(Duration::from_secs(10), || async {
        (failures(&ts, "ledger").await >= 1).then_some(())
    })
    .await;
    assert!(counted.is_some(), "the failed ledger write is counted");
    let (code, body) = http_get(ts.http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("cannot write ledger"), "{body}");

    io_faults::clear(&dir);
    let written = eventually(Duration::from_secs(10), || {
        let dir = dir.clone();
        async move {
            let bytes = std::fs::read(dir.join("ledger.log")).ok()?;
            let held: Vec<String> = rotator::ledger::file::read(&bytes)
                .ok()?
                .ledger
                .records()
                .map(|r| r.spiffe_id)
                .collect();
            (0..5)
                .all(|i| held.contains(&format!("{WEB}-{i}")))
                .then_some(())
        }
    })
    .await;
    assert!(written.is_some(), "queued records written after recovery");
    let (_, body) = http_get(ts.http, "/readyz").await;
    assert!(!body.contains("cannot write"), "{body}");
}

/// The CLI's outputs on a full or failing disk (`MESHCA_IO_FAULT` in the `meshca` process):
/// `meshca issue` says why and exits non-zero, and the credential it was renewing stays whole — its
/// key still matches its certificate, and it renews once the disk recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshca_issue_on_a_failing_disk_keeps_the_credential_it_renews() {
    let ts = TestServer::start().await;
    let (url, state) = (ts.url.clone(), ts.state_dir());
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_owned();
    tokio::task::spawn_blocking(move || {
        meshca_tests::cli_issue(&url, &state, "web", &w);
        let renew = |fault: Option<&str>| {
            let mut cmd = std::process::Command::new(meshca_tests::bin("meshca"));
            if let Some(f) = fault {
                cmd.env("MESHCA_IO_FAULT", f);
            }
            cmd.args([
                "issue",
                "--server",
                &url,
                "--ca-bundle",
                &state.join("bundle.pem").display().to_string(),
                "--cert",
                "web.crt",
                "--key",
                "web.key",
                "--spiffe-id",
                WEB,
                "--out",
                "web",
            ])
            .current_dir(&w)
            .output()
            .unwrap()
        };
        let live = || std::fs::read_link(w.join(".web.live")).unwrap();
        for (fault, said) in [
            ("key:write:28", "No space left on device"),
            ("crt:write:5", "Input/output error"),
            ("bundle.pem:write:28", "No space left on device"),
        ] {
            let before = live();
            let out = renew(Some(fault));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{fault}");
            assert!(stderr.contains(said), "{fault}: {stderr}");
            assert_eq!(
                live(),
                before,
                "{fault}: the old credential is still the live one"
            );
            assert!(meshca_tests::key_matches_certificate(&w, "web"), "{fault}");
        }
        let out = renew(None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(meshca_tests::key_matches_certificate(&w, "web"));
    })
    .await
    .unwrap();
}
