//! Issue #30, item 2: with `--output json` every command prints exactly one JSON document on
//! stdout whatever happens — on failure `{"ok": false, "error": {"code", "message",
//! "exit_code"}}`, the exit status being `exit_code` — and the messages an operator reads
//! (item 7) say what happened once, in the words of the command they ran.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::Path;

use meshca_tests::{TestServer, bin};
use serde_json::Value;

/// Runs `meshca --output json <args>`: (exit code, the one JSON document on stdout, stderr).
/// Fails the test unless stdout holds exactly one JSON document.
async fn json(args: Vec<String>) -> (i32, Value, String) {
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let o = std::process::Command::new(bin("meshca"))
            .args(["--output", "json"])
            .args(&args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}\nstderr: {err}"));
    assert_eq!(docs.len(), 1, "one document: {out}\nstderr: {err}");
    (code, docs.into_iter().next().unwrap(), err)
}

fn args(a: &[&str], dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(ToString::to_string).collect();
    v.push("--state-dir".into());
    v.push(dir.display().to_string());
    v
}

/// A failure document with `code`, exiting as it says.
fn failed(what: &str, (exit, doc, err): &(i32, Value, String), code: &str) -> String {
    assert_eq!(doc["ok"], false, "{what}: {doc}");
    assert_eq!(doc["error"]["code"], code, "{what}: {doc}\nstderr: {err}");
    assert_eq!(
        Some(i64::from(*exit)),
        doc["error"]["exit_code"].as_i64(),
        "{what}: the exit status is the document's"
    );
    let msg = doc["error"]["message"].as_str().unwrap().to_owned();
    assert!(!msg.is_empty(), "{what}: a message");
    assert!(
        err.contains(&msg),
        "{what}: the same message on stderr for people: {err}"
    );
    assert!(!msg.contains("refused: refused"), "{what}: {msg}");
    println!("{what}: exit {exit} {code}: {msg}");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_one_json_document_when_it_fails() {
    let srv = TestServer::start().await;
    let sd = srv.state_dir();
    let empty = tempfile::tempdir().unwrap();
    let nothing = empty.path().join("nothing-here");
    let id = "spiffe://cluster.local/ns/default/sa/web";

    // A usage error: the document too, exit 2.
    let r = json(args(&["anchors", "wait", "--until", "nope"], &sd)).await;
    failed("usage", &r, "usage");
    assert_eq!(r.0, 2);

    // No server behind the state dir.
    for a in [
        &["issuer", "rotate"][..],
        &["anchors", "stage"],
        &["deny", "list"],
        &["federation", "reset", "b.example"],
    ] {
        failed(
            &a.join(" "),
            &json(args(a, empty.path())).await,
            "unreachable",
        );
    }
    // No authority in the state dir.
    for a in [&["status"][..], &["bundle"], &["plan"]] {
        failed(&a.join(" "), &json(args(a, &nothing)).await, "failed");
    }
    failed(
        "init with files that are not there",
        &json(args(
            &[
                "init",
                "--anchor-cert",
                "/nonexistent/root.pem",
                "--anchor-key",
                "/nonexistent/root.key",
            ],
            &nothing,
        ))
        .await,
        "failed",
    );
    failed(
        "token revoke of no token",
        &json(args(&["token", "revoke", "nobody"], &sd)).await,
        "failed",
    );

    // The server refuses, each with its code.
    let r = json(args(&["anchors", "finish"], &sd)).await;
    failed("anchors finish in steady", &r, "failed_precondition");
    let r = json(args(
        &[
            "anchors",
            "wait",
            "--until",
            "activate-ready",
            "--timeout",
            "1s",
        ],
        &sd,
    ))
    .await;
    let m = failed("anchors wait in the wrong phase", &r, "wrong_phase");
    assert_eq!(r.0, 2, "not the exit of a timeout");
    assert!(m.contains("does not apply in phase steady"), "{m}");
    // A live workload on the current bundle keeps the activate gate closed after staging.
    let token = empty.path().join("token");
    std::fs::write(&token, &srv.token).unwrap();
    let issue = |id: &str, out: &str| {
        vec![
            "issue".into(),
            "--server".into(),
            srv.url.clone(),
            "--ca-bundle".into(),
            sd.join("bundle.pem").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--spiffe-id".into(),
            id.to_owned(),
            "--out".into(),
            empty.path().join(out).display().to_string(),
        ]
    };
    let (code, doc, err) = json(issue("spiffe://cluster.local/ns/default/sa/api", "api")).await;
    assert_eq!(code, 0, "{doc} {err}");
    let (code, doc, err) = json(args(&["anchors", "stage"], &sd)).await;
    assert_eq!(code, 0, "{doc} {err}");
    let r = json(args(
        &[
            "anchors",
            "wait",
            "--until",
            "activate-ready",
            "--timeout",
            "1s",
        ],
        &sd,
    ))
    .await;
    failed("anchors wait timed out", &r, "timeout");
    assert_eq!(r.0, 1);
    let r = json(args(&["anchors", "emergency", "--reason", "drill"], &sd)).await;
    let m = failed("anchors emergency mid-rotation", &r, "failed_precondition");
    assert!(
        m.contains("`emergency`") && !m.contains("`stage`"),
        "named as the command run: {m}"
    );
    let r = json(args(&["deny", "add", id, "--reason", " "], &sd)).await;
    let m = failed("deny add without a reason", &r, "invalid_argument");
    assert_eq!(
        m, "the server refused: InvalidArgument: a denial needs a reason (--reason)",
        "said once"
    );
    let r = json(args(
        &["deny", "remove", "spiffe://cluster.local/ns/none/sa/none"],
        &sd,
    ))
    .await;
    failed("deny remove of nothing denied", &r, "failed_precondition");
    let r = json(args(&["federation", "reset", "b.example"], &sd)).await;
    failed("federation reset of no peer", &r, "failed_precondition");

    // issue, denied.
    let (code, doc, err) = json(args(&["deny", "add", id, "--reason", "leaked"], &sd)).await;
    assert_eq!(code, 0, "{doc} {err}");
    let r = json(issue(id, "web")).await;
    let m = failed("issue for a denied identity", &r, "permission_denied");
    assert!(m.contains("leaked"), "{m}");
}
