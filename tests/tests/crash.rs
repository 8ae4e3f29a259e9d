//! Crash safety of issuer rotation: the real server process is aborted at each journal step of
//! `meshca issuer rotate` (compiled-in fault points, `MESHCA_FAULT_POINT=<point>@<n>`), then
//! restarted on the same state. Every time: it starts, the state is consistent, the active issuer
//! is either the old one or the new one fully activated, a prepared issuer is never lost, no key
//! is lost, the bundle is unchanged, and it signs.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshca_tests::{ServerProcess, bin};
use rotator::state::IssuerStatus;
use rotator::store::FileStore;

/// Which issuer is active after the crash and restart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Active {
    Old,
    New,
}

fn meshca(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(bin("meshca"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn crash_and_recover(point: &str, want_active: Active, want_prepared: bool) {
    for rep in 0..3 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let d = dir.display().to_string();
        ServerProcess::spawn(&dir, &[], &[]).unwrap().kill();
        let before = FileStore::read_only(&dir).load_sync().unwrap().unwrap();
        let old = before.active_issuer().unwrap().cert.id().clone();
        let bundle = std::fs::read(dir.join("bundle.pem")).unwrap();
        let anchor_key = std::fs::read(dir.join(format!(
            "anchors/{}.key",
            before.active_anchor().unwrap().cert.id()
        )))
        .unwrap();

        // The crash.
        let mut faulty = ServerProcess::spawn(&dir, &[], &[("MESHCA_FAULT_POINT", point)]).unwrap();
        let out = meshca(&["issuer", "rotate", "--state-dir", &d], tmp.path());
        assert!(
            !out.status.success(),
            "{point}: rotate succeeded although the server was to crash"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = faulty.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{point}: the server did not crash"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.signal(),
            Some(6),
            "{point}: expected SIGABRT at the fault point, got {status:?}"
        );

        // The recovery.
        let server = ServerProcess::spawn(&dir, &[], &[])
            .unwrap_or_else(|r| panic!("{point} (rep {rep}): no restart: {}", r.stderr));
        let after = FileStore::read_only(&dir).load_sync().unwrap().unwrap();
        after.check().unwrap();
        let active = after.active_issuer().unwrap().cert.id().clone();
        let prepared: Vec<_> = after
            .issuers
            .iter()
            .filter(|i| i.status == IssuerStatus::Prepared)
            .collect();
        let got = if active == old {
            Active::Old
        } else {
            Active::New
        };
        assert_eq!(got, want_active, "{point} (rep {rep}): active issuer");
        assert_eq!(
            !prepared.is_empty(),
            want_prepared,
            "{point} (rep {rep}): prepared issuer"
        );
        if got == Active::New {
            assert_eq!(
                after.issuer(&old).unwrap().status,
                IssuerStatus::Retired,
                "{point}: the old issuer is kept, retired"
            );
        }
        assert_eq!(
            std::fs::read(dir.join("bundle.pem")).unwrap(),
            bundle,
            "{point}: the bundle changed"
        );
        assert_eq!(
            std::fs::read(dir.join(format!(
                "anchors/{}.key",
                after.active_anchor().unwrap().cert.id()
            )))
            .unwrap(),
            anchor_key,
            "{point}: the anchor key changed"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("issuers"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{point}: temp files left after restart: {leftovers:?}"
        );

        // It signs.
        let out = meshca(
            &[
                "issue",
                "--server",
                &server.url,
                "--ca-bundle",
                &format!("{d}/bundle.pem"),
                "--token-file",
                &format!("{d}/bootstrap-token"),
                "--spiffe-id",
                "spiffe://cluster.local/ns/default/sa/after-crash",
                "--out",
                "leaf",
            ],
            tmp.path(),
        );
        assert!(
            out.status.success(),
            "{point}: no signing after restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chain =
            meshca_tests::pem_certs(&std::fs::read_to_string(tmp.path().join("leaf.crt")).unwrap());
        assert_eq!(
            rotator::pki::CertId::of(&chain[1]),
            active,
            "{point}: signed by the active issuer"
        );
        server.kill();
    }
}

// `meshca issuer rotate` commits twice: 1 = the new issuer prepared, 2 = it activated.
// Atomic writes are counted from the restarted server's start, whose first is its ledger file.

#[test]
fn crash_after_new_files_before_the_state_file() {
    crash_and_recover("commit:after-files@1", Active::Old, false);
}

#[test]
fn crash_with_the_first_new_file_not_yet_renamed() {
    crash_and_recover("write:before-rename@2", Active::Old, false);
}

#[test]
fn crash_with_the_state_file_written_but_not_renamed() {
    // Writes: ledger.log at start, then the prepare commit's issuer .crt, issuer .key, state.json.
    crash_and_recover("write:before-rename@4", Active::Old, false);
}

#[test]
fn crash_right_after_the_prepared_issuer_is_committed() {
    crash_and_recover("commit:after-state@1", Active::Old, true);
}

#[test]
fn crash_after_the_prepare_commit_before_it_is_published() {
    crash_and_recover("transition:after-commit@1", Active::Old, true);
}

#[test]
fn crash_during_activation_before_the_state_file() {
    crash_and_recover("commit:after-files@2", Active::Old, true);
}

#[test]
fn crash_right_after_activation_is_committed() {
    crash_and_recover("commit:after-state@2", Active::New, false);
}

#[test]
fn crash_after_activation_before_it_is_published() {
    crash_and_recover("transition:after-commit@2", Active::New, false);
}

fn pair_matches(dir: &Path) -> bool {
    meshca_tests::key_matches_certificate(dir, "web")
}

/// `meshca issue` replaces a credential atomically (#15): killed at each step of writing a renewal,
/// the key on disk matches the certificate beside it, and that credential renews again over mTLS.
/// (Before: the key was written, then the certificate; a kill between left a new key beside the old
/// certificate, and the credential used to renew was gone.) Old credentials' directories, keys
/// included, are deleted once a new one is live.
#[test]
fn a_killed_meshca_issue_never_leaves_a_key_beside_a_certificate_it_does_not_match() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let server = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    meshca_tests::cli_issue(&server.url, &dir, "web", &work);
    assert!(pair_matches(&work));
    // The check can fail: the same certificate beside another key does not match.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(work.join("web.crt"), other.join("web.crt")).unwrap();
    let stranger = rotator::pki::SecretKey::generate_p256().unwrap();
    std::fs::write(other.join("web.key"), stranger.to_pem().as_bytes()).unwrap();
    assert!(!pair_matches(&other));
    let bundle = dir.join("bundle.pem").display().to_string();
    let renew = |fault: Option<&str>| {
        let mut cmd = Command::new(bin("meshca"));
        if let Some(f) = fault {
            cmd.env("MESHCA_FAULT_POINT", f);
        }
        cmd.args([
            "issue",
            "--server",
            &server.url,
            "--ca-bundle",
            &bundle,
            "--cert",
            "web.crt",
            "--key",
            "web.key",
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/web",
            "--out",
            "web",
        ])
        .current_dir(&work)
        .output()
        .unwrap()
    };
    let serial = |w: &Path| std::fs::read_link(w.join(".web.live")).unwrap();
    for point in [
        "write:before-rename@1",
        "write:before-rename@2",
        "issue:before-swap",
        "issue:after-swap",
    ] {
        let before = serial(&work);
        let out = renew(Some(point));
        assert_eq!(
            out.status.signal(),
            Some(libc_sigabrt()),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            pair_matches(&work),
            "{point}: the key matches the certificate"
        );
        let committed = serial(&work) != before;
        assert_eq!(committed, point == "issue:after-swap", "{point}");
        let out = renew(None);
        assert!(
            out.status.success(),
            "{point}: renews again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(pair_matches(&work), "{point}");
        let versions: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            versions.len(),
            1,
            "{point}: old credentials deleted: {versions:?}"
        );
    }
    for name in ["web.crt", "web.key", "web.bundle.pem"] {
        assert!(
            std::fs::symlink_metadata(work.join(name))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name}"
        );
    }
}

/// SIGABRT, which `std::process::abort` raises at a fault point.
fn libc_sigabrt() -> i32 {
    6
}

/// kill -9 trials, a short run (#15; 100 per backend in docs/benchmarks.md from
/// `examples/kill_trials.rs`): the real server under issuance load and a rotation cycle through
/// the CLI, SIGKILLed at a random moment, restarted; every restart loads a consistent state that
/// lost no reported commit, with `bundle.pem` equal to it, the ledger said incomplete, and issuance
/// working — on the file store and on a Secret of the in-test API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_committed() {
    use meshca_tests::trials::{self, Backend};
    let fake = meshca_tests::kubeapi::KubeApi::start().await;
    let work = tempfile::tempdir().unwrap();
    let read = {
        let f = fake.clone();
        std::sync::Arc::new(move |name: &str| f.secret_data("meshca", name))
    };
    for backend in [
        Backend::Files,
        Backend::Secret {
            api_url: fake.url.clone(),
            read,
        },
    ] {
        let w = work.path().to_owned();
        let report = tokio::task::spawn_blocking(move || trials::run(8, 42, &backend, &w, &|_| {}))
            .await
            .unwrap();
        assert_eq!(report.trials, 8);
        assert!(report.inconsistent.is_empty(), "{:#?}", report.inconsistent);
        assert!(
            report.steps_total > 0,
            "rotation steps committed before the kills"
        );
        assert_eq!(
            report.ledger_incomplete, 8,
            "an unclosed ledger is said after each kill"
        );
    }
}
