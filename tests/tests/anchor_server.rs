//! Trust-anchor rotation through the server's faces: `/spiffe-bundle.json`, the issuance ledger
//! across clean and unclean restarts, refusals of the admin API, and the opt-in automation in
//! virtual time.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ca_server::authority::{Authority, OpenOptions, Storage};
use ca_server::driver::{self, RotationHealth};
use ca_server::metrics::Metrics;
use meshca_tests::{ServerProcess, TestServer, bin, http_get};
use rotator::anchors::Automation;
use rotator::clock::{Clock, TokioClock};
use rotator::policy::Policy;
use rotator::store::FileStore;
use serde_json::Value;
use tokio::sync::watch;

fn meshca(args: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(bin("meshca"))
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .current_dir(dir.parent().unwrap())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(dir: &Path) -> Value {
    let (code, out, err) = meshca(&["status", "--output", "json"], dir);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test]
async fn spiffe_bundle_json_follows_the_rotation() {
    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let doc = |body: &str| serde_json::from_str::<Value>(body).unwrap();
    let (code, body) = http_get(srv.http, "/spiffe-bundle.json").await;
    assert_eq!(code, 200);
    let v1 = doc(&body);
    assert_eq!(v1["spiffe_sequence"], 1);
    assert_eq!(v1["spiffe_refresh_hint"], 300);
    assert_eq!(v1["keys"].as_array().unwrap().len(), 1);

    let d = dir.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || meshca(&["anchors", "stage"], &d))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (_, body) = http_get(srv.http, "/spiffe-bundle.json").await;
    let v2 = doc(&body);
    assert_eq!(v2["spiffe_sequence"], 2);
    let keys = v2["keys"].as_array().unwrap();
    let bundle = srv.bundle();
    assert_eq!(keys.len(), 2);
    for (k, der) in keys.iter().zip(&bundle) {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        let x5c = STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap();
        assert_eq!(&x5c, der.as_ref(), "x5c is the anchor");
        // x and y are the certificate's public point (checked against an independent parse).
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(k["y"].as_str().unwrap()).unwrap();
        assert_eq!(point, [&[4u8][..], &x, &y].concat());
    }
}

#[tokio::test]
async fn admin_refusals_say_why_and_change_nothing() {
    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let w = dir.parent().unwrap().to_owned();
    std::fs::write(w.join("junk.pem"), "not a certificate").unwrap();
    let issuer_pem = srv
        .server()
        .authority
        .read(|s| s.active_issuer().unwrap().cert.pem())
        .await;
    std::fs::write(w.join("issuer.pem"), issuer_pem).unwrap();
    let gen_before = srv.server().authority.read(|s| s.generation).await;
    let d = dir.clone();
    let cases = tokio::task::spawn_blocking(move || {
        [
            meshca(&["anchors", "activate"], &d),
            meshca(&["anchors", "finish", "--force"], &d),
            meshca(&["anchors", "rollback"], &d),
            meshca(&["anchors", "stage", "--cert", "junk.pem"], &d),
            meshca(&["anchors", "stage", "--cert", "issuer.pem"], &d),
            meshca(&["anchors", "wait", "--until", "activate-ready"], &d),
            meshca(&["anchors", "stage", "--key", "issuer.pem"], &d),
        ]
    })
    .await
    .unwrap();
    let want = [
        "does not apply in phase steady",
        "does not apply in phase steady",
        "does not apply in phase steady",
        "InvalidArgument: the anchor certificate is unusable",
        "InvalidArgument: the anchor certificate is not self-signed",
        "does not apply in phase steady",
        "--cert",
    ];
    for ((code, _, err), w) in cases.iter().zip(want) {
        assert_ne!(*code, Some(0), "{err}");
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
    assert_eq!(cases[6].0, Some(2), "usage errors exit 2");
    assert_eq!(
        srv.server().authority.read(|s| s.generation).await,
        gen_before,
        "refusals change nothing"
    );
}

fn issue(server: &ServerProcess, dir: &Path, name: &str) {
    meshca_tests::cli_issue(&server.url, dir, name, dir.parent().unwrap());
}

#[test]
fn the_ledger_survives_a_clean_restart_and_falls_back_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut s = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    for n in ["a", "b", "c"] {
        issue(&s, &dir, n);
    }
    let l = &status(&dir)["anchor_rotation"]["ledger"];
    assert_eq!(
        l["trustworthy"], true,
        "a new authority's ledger is complete"
    );
    assert_eq!(l["live_workloads"], 3);

    // Clean stop (SIGTERM): the ledger is closed and trusted on the next start.
    Command::new("kill")
        .arg(s.child.id().to_string())
        .status()
        .unwrap();
    s.child.wait().unwrap();
    let bytes = std::fs::read(dir.join("ledger.log")).unwrap();
    assert!(
        bytes.ends_with(&rotator::ledger::file::closed_frame()),
        "the ledger ends with its closing frame"
    );
    let s = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    let l = &status(&dir)["anchor_rotation"]["ledger"];
    assert_eq!(l["trustworthy"], true);
    assert_eq!(l["live_workloads"], 3, "records survived the restart");
    issue(&s, &dir, "d");
    // Once the batch with "d" is on disk, crash: the ledger was not closed.
    meshca_tests::eventually_blocking(|| {
        let bytes = std::fs::read(dir.join("ledger.log")).ok()?;
        // A new SPIFFE ID is written (once) before the first leaf that names it.
        bytes.windows(5).any(|w| w == b"/sa/d").then_some(())
    })
    .expect("the ledger is flushed within its interval");
    s.kill();
    let _s = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    let doc = status(&dir);
    let l = &doc["anchor_rotation"]["ledger"];
    assert_eq!(
        l["trustworthy"], false,
        "after a crash the ledger may miss a batch"
    );
    assert_eq!(l["live_workloads"], 4, "what was flushed still counts");
    let (code, _, _) = meshca(&["anchors", "stage"], &dir);
    assert_eq!(code, Some(0));
    let (code, _, err) = meshca(&["anchors", "activate"], &dir);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("complete only since") && err.contains("time-based"),
        "the refusal says the gate fell back to time: {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn automation_stages_and_advances_a_rotation_before_the_anchor_expires() {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let store = FileStore::open(dir.path().join("state")).unwrap();
    let how = OpenOptions {
        trust_domain: None,
        default_trust_domain: "cluster.local".parse().unwrap(),
        upstream_anchor: None,
    };
    let policy = Policy::default();
    let (authority, _) = Authority::open(Storage::files(store), how, policy, clock.clone())
        .await
        .unwrap();
    let authority = Arc::new(authority);
    let first = authority
        .read(|s| s.active_anchor().unwrap().cert.clone())
        .await;
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(driver::drive(
        authority.clone(),
        Arc::new(RotationHealth::default()),
        Arc::new(Metrics::new()),
        Automation {
            auto_stage_before: Some(Duration::from_secs(90 * 86400)),
            auto_advance: true,
        },
        stop_rx,
    ));
    let stage_at = first.info.not_after - Duration::from_secs(90 * 86400);
    // Up to a day before the stage point: nothing but issuer rotations.
    let until = |t: time::OffsetDateTime| (t - clock.now()).try_into().unwrap_or_default();
    tokio::time::sleep(until(stage_at - Duration::from_secs(86400))).await;
    assert_eq!(authority.read(|s| s.phase.name()).await, "steady");
    assert_eq!(authority.read(|s| s.bundle_version).await, 1);
    // Past it, plus both gates (no workload: measured open at once) and a margin.
    tokio::time::sleep(Duration::from_secs(2 * 86400)).await;
    let (phase, version, anchor, history) = authority
        .read(|s| {
            (
                s.phase.name(),
                s.bundle_version,
                s.active_anchor().unwrap().cert.clone(),
                s.history.iter().map(|e| e.what.clone()).collect::<Vec<_>>(),
            )
        })
        .await;
    assert_eq!(phase, "steady", "{history:#?}");
    assert_eq!(version, 3, "staged (v2) and finished (v3)");
    assert_ne!(anchor.id(), first.id(), "a new anchor signs");
    assert!(anchor.info.not_after > first.info.not_after);
    for step in ["anchor_staged", "anchor_activated", "anchor_finished"] {
        assert!(
            history.iter().any(|h| h.starts_with(step)),
            "{step}: {history:#?}"
        );
    }
}

#[test]
fn plan_draws_the_gates_as_text_svg_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let s = ServerProcess::spawn(&dir, &[], &[]).unwrap();
    // In steady (issue #30 item 5): the rotation deadline, and when each gate would open by
    // time if staged now (48 h + 1 h; then 48 h + 5 min).
    let (code, json, err) = meshca(&["plan", "--output", "json"], &dir);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let at = |label: &str| {
        let m = v["marks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["label"].as_str().unwrap().starts_with(label))
            .unwrap_or_else(|| panic!("no mark {label:?}: {v}"));
        time::OffsetDateTime::parse(
            m["at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let now = time::OffsetDateTime::parse(
        v["now"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let activate = at("if staged now: activate gate");
    assert_eq!(activate - now, time::Duration::hours(49));
    assert_eq!(
        at("if staged now: finish gate") - activate,
        time::Duration::hours(48) + time::Duration::minutes(5)
    );
    let deadline = at("rotation deadline");
    assert!(deadline > now + time::Duration::days(300), "{v}");
    let (_, text, _) = meshca(&["plan"], &dir);
    assert!(
        text.contains("rotation deadline: stage by then") && text.contains("◀ not after this"),
        "{text}"
    );
    // One live workload holding the old bundle keeps the measured activate gate closed.
    issue(&s, &dir, "web");
    let (code, _, err) = meshca(&["anchors", "stage"], &dir);
    assert_eq!(code, Some(0), "{err}");
    let svg = tmp.path().join("plan.svg");
    let (code, text, err) = meshca(&["plan", "--svg", svg.to_str().unwrap()], &dir);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("phase staged"), "{text}");
    assert!(
        text.contains("activate gate opens (time fallback)"),
        "{text}"
    );
    assert!(
        text.contains("(staged)") && text.contains("(prepared, under"),
        "{text}"
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    assert!(picture.contains("activate gate opens") && picture.contains(">now<"));
    // The time fallback with the defaults: 48 h + 1 h after staging.
    let (code, json, _) = meshca(&["plan", "--output", "json"], &dir);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&json).unwrap();
    let t = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    };
    let marks = v["marks"].as_array().unwrap();
    let since = marks.iter().find(|m| m["label"] == "staged since").unwrap();
    let opens = marks
        .iter()
        .find(|m| m["label"] == "activate gate opens (time fallback)")
        .unwrap();
    assert_eq!(
        t(opens["at"].as_str().unwrap()) - t(since["at"].as_str().unwrap()),
        time::Duration::hours(49)
    );
}
