//! Expiry alerting (issue #5): the shipped rules checked and unit-tested by Prometheus' own
//! `promtool`; every metric the rules and the dashboard name is exported by a real server; a real
//! Prometheus scraping a real meshca fires exactly the expected alert; the expiry metrics follow
//! rotations within one scrape; `meshca check` exit codes.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshca_tests::{
    ServerProcess, TestServer, bin, eventually, http_get, http_get_blocking, require_tool,
};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn rules() -> PathBuf {
    repo().join("deploy/prometheus/meshca-rules.yaml")
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(rules())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo().join("deploy/prometheus/meshca-rules.test.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every alert in the rules has a unit test that fires it, and a runbook section.
#[test]
fn every_alert_has_a_test_and_a_runbook_section() {
    let rules = std::fs::read_to_string(rules()).unwrap();
    let tests =
        std::fs::read_to_string(repo().join("deploy/prometheus/meshca-rules.test.yaml")).unwrap();
    let runbook = std::fs::read_to_string(repo().join("docs/runbooks/alerts.md")).unwrap();
    let alerts: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for a in &alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {a}\n        exp_alerts:\n          - exp_labels"
            )),
            "{a}: no promtool case where it fires"
        );
        assert!(
            runbook.contains(&format!("## {a}")),
            "{a}: no section in docs/runbooks/alerts.md"
        );
        assert!(
            rules.contains(&format!("alerts.md#{}", a.to_lowercase())),
            "{a}: no runbook_url"
        );
    }
}

/// The PrometheusRule carries exactly the rules file's groups.
#[test]
fn the_prometheusrule_matches_the_rules_file() {
    let rules = std::fs::read_to_string(rules()).unwrap();
    let pr = std::fs::read_to_string(
        repo().join("deploy/kubernetes/overlays/monitoring/meshca-prometheusrule.yaml"),
    )
    .unwrap();
    let body = &rules[rules.find("groups:").unwrap()..];
    let spec = &pr[pr.find("spec:\n").unwrap() + "spec:\n".len()..];
    let dedented: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(dedented.trim_end(), body.trim_end());
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("meshca_") {
        let start = i + p;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[tokio::test]
async fn every_metric_in_the_rules_and_the_dashboard_is_exported() {
    // Federated with a trust domain whose endpoint is down: its bootstrap bundle is held, its
    // fetches fail (the federation metrics exist only for a configured trust domain).
    let files = tempfile::tempdir().unwrap();
    let (down, _) = meshca_tests::unreachable_peer(files.path(), "b.example");
    let srv = TestServer::start_with(|c| c.federation.trust_domains = vec![down]).await;
    eventually(std::time::Duration::from_secs(10), || async {
        let (_, m) = http_get(srv.http, "/metrics").await;
        m.contains("meshca_federation_refresh_failures{trust_domain=\"b.example\"} 1")
            .then_some(())
    })
    .await
    .expect("the first fetch fails");
    srv.issue("spiffe://cluster.local/ns/default/sa/one")
        .await
        .unwrap();
    let (code, steady) = http_get(srv.http, "/metrics").await;
    assert_eq!(code, 200);
    // The gate metrics exist only while a rotation is under way: scrape during one too.
    let d = srv.state_dir();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin("meshca"))
            .args(["anchors", "stage", "--state-dir"])
            .arg(&d)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let (_, staged) = http_get(srv.http, "/metrics").await;
    let scrape = format!("{steady}{staged}");
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for file in [
        "deploy/prometheus/meshca-rules.yaml",
        "deploy/grafana/meshca-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let named = metric_names(&text);
        assert!(named.len() >= 5, "{file}: {named:?}");
        for m in named {
            assert!(
                exported.contains(&m),
                "{file} names {m}, which the server does not export:\n{scrape}"
            );
        }
    }
}

fn expiring(scrape: &str, role: &str) -> BTreeSet<(String, String)> {
    scrape
        .lines()
        .filter(|l| l.starts_with("meshca_certificate_expiration_timestamp_seconds{"))
        .filter(|l| l.contains(&format!("role=\"{role}\"")))
        .map(|l| {
            let field = |k: &str| {
                let s = &l[l.find(&format!("{k}=\"")).unwrap() + k.len() + 2..];
                s[..s.find('"').unwrap()].to_owned()
            };
            (field("id"), field("state"))
        })
        .collect()
}

#[tokio::test]
async fn expiry_metrics_follow_rotations_within_one_scrape() {
    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let scrape = || async { http_get(srv.http, "/metrics").await.1 };
    let before = scrape().await;
    let (old_issuer, _) = expiring(&before, "issuer").into_iter().next().unwrap();
    let (old_anchor, _) = expiring(&before, "anchor").into_iter().next().unwrap();
    let run = |args: &'static [&'static str]| {
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin("meshca"))
                .args(args)
                .arg("--state-dir")
                .arg(&d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    };
    run(&["issuer", "rotate"]).await.unwrap();
    let after = expiring(&scrape().await, "issuer");
    assert!(
        after.contains(&(old_issuer.clone(), "retired".into())),
        "{after:?}"
    );
    let new_issuer = after
        .iter()
        .find(|(_, st)| st == "active")
        .map(|(id, _)| id.clone())
        .unwrap();
    assert_ne!(
        new_issuer, old_issuer,
        "the active issuer's metric is the new one"
    );

    run(&["anchors", "stage"]).await.unwrap();
    let staged = expiring(&scrape().await, "anchor");
    assert_eq!(staged.len(), 2, "{staged:?}");
    assert!(staged.contains(&(old_anchor.clone(), "active".into())));
    // No workload holds a leaf: both gates are measured open at once.
    run(&["anchors", "activate"]).await.unwrap();
    run(&["anchors", "finish"]).await.unwrap();
    let text = scrape().await;
    let done = expiring(&text, "anchor");
    assert_eq!(
        done.len(),
        1,
        "the archived anchor is gone from the metrics: {done:?}"
    );
    assert!(!done.iter().any(|(id, _)| *id == old_anchor));
    assert!(text.contains("meshca_anchor_rotation_phase{phase=\"steady\"} 1"));
    assert!(text.contains("meshca_bundle_version 3"));
}

fn meshca_check(args: &[&str]) -> (i32, Value) {
    let out = Command::new(bin("meshca"))
        .args(["check", "--output", "json"])
        .args(args)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap(), v)
}

fn config(dir: &Path, anchor_ttl: &str) -> PathBuf {
    let p = dir.join("meshca.toml");
    std::fs::write(&p, format!("[policy]\nanchor_ttl = \"{anchor_ttl}\"\n")).unwrap();
    p
}

#[test]
fn meshca_check_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, anchor_ttl: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, anchor_ttl);
        let s = ServerProcess::spawn(
            &dir.join("state"),
            &["--config", cfg.to_str().unwrap()],
            &[],
        )
        .unwrap();
        let live = meshca_check(&["--state-dir", dir.join("state").to_str().unwrap()]);
        s.kill();
        let offline = meshca_check(&[
            "--offline",
            "--state-dir",
            dir.join("state").to_str().unwrap(),
        ]);
        (live, offline)
    };
    let ((code, v), (off_code, _)) = case("fresh", "365days");
    assert_eq!((code, off_code), (0, 0), "{v}");
    assert_eq!(v["source"], "server");
    // Fail-closed (issue #30): the server stopped and no --offline: the CA being down is itself
    // critical, whatever the state dir says.
    let (code, v) = meshca_check(&[
        "--state-dir",
        tmp.path().join("fresh/state").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{v}");
    assert_eq!(
        (v["source"].as_str(), v["policy"].as_str()),
        (Some("state-dir"), Some("default"))
    );
    assert!(
        v["findings"][0]["what"]
            .as_str()
            .unwrap()
            .contains("no meshca-server answers"),
        "{v}"
    );
    let ((code, v), (off_code, _)) = case("warning", "60days");
    assert_eq!((code, off_code), (1, 1), "{v}");
    assert!(
        v["findings"][0]["what"]
            .as_str()
            .unwrap()
            .contains("expires in 60.0 days"),
        "{v}"
    );
    assert!(
        v["findings"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("meshca anchors stage")
    );
    let ((code, v), _) = case("critical", "20days");
    assert_eq!(code, 2, "{v}");
    // Thresholds are flags.
    let dir = tmp.path().join("critical/state");
    let (code, _) = meshca_check(&[
        "--offline",
        "--state-dir",
        dir.to_str().unwrap(),
        "--anchor-critical",
        "10d",
        "--anchor-warning",
        "15d",
        "--deadline-warning",
        "1d",
    ]);
    assert_eq!(code, 0);

    // Expired: an authority whose anchor ended yesterday (made with the library, at a past time).
    let dir = tmp.path().join("expired");
    let policy = rotator::policy::Policy {
        anchor_ttl: Duration::from_secs(30 * 86400),
        ..rotator::policy::Policy::default()
    };
    let past = time::OffsetDateTime::now_utc() - Duration::from_secs(31 * 86400);
    let s =
        rotator::state::AuthorityState::genesis("cluster.local".parse().unwrap(), &policy, past)
            .unwrap();
    rotator::store::FileStore::open(&dir)
        .unwrap()
        .commit_sync(None, &s)
        .unwrap();
    let (code, v) = meshca_check(&["--offline", "--state-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{v}");
    let text = v.to_string();
    assert!(text.contains("EXPIRED"), "{text}");

    // Unreachable: nothing there.
    let (code, v) = meshca_check(&["--state-dir", tmp.path().join("nothing").to_str().unwrap()]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["status"], "unreachable");
}

/// A real Prometheus (Debian's package) scraping a real meshca whose anchor expires in 60 days,
/// with the shipped rules and 1 s intervals: the 90-day warning fires, nothing else does.
#[test]
fn a_real_prometheus_fires_the_expected_alert_only() {
    let Some(prometheus) = require_tool("prometheus") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "60days");
    let meshca = ServerProcess::spawn(
        &tmp.path().join("state"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom_cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: meshca\n    static_configs:\n      - targets: ['{}']\n",
            rules().display(),
            meshca.http
        ),
    )
    .unwrap();
    let mut prom = Command::new(prometheus)
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let firing = || -> Option<BTreeSet<String>> {
        std::net::TcpStream::connect(addr).ok()?;
        let (code, body) = http_get_blocking(addr, "/api/v1/alerts");
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        Some(
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| a["labels"]["alertname"].as_str().unwrap_or("").to_owned())
                .collect(),
        )
    };
    let mut seen = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(f) = firing()
            && f.contains("MeshcaTrustAnchorExpiringSoon")
        {
            seen = Some(f);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // A few more evaluations, so anything else that would fire has had its chance.
    std::thread::sleep(Duration::from_secs(3));
    let last = firing();
    let _ = prom.kill();
    let out = prom.wait_with_output().unwrap();
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "MeshcaTrustAnchorExpiringSoon never fired; prometheus said:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let last = last.unwrap();
    for f in [&seen, &last] {
        assert_eq!(
            f.iter().map(String::as_str).collect::<Vec<_>>(),
            ["MeshcaTrustAnchorExpiringSoon"],
            "only the 90-day warning may fire for a 60-day anchor"
        );
    }
    meshca.kill();
}

/// The alert table in docs/runbooks/alerts.md names exactly the alerts the rules file ships, and
/// each has its runbook section (issue #30: the table had drifted to 12 of 15).
#[test]
fn the_runbook_table_lists_every_shipped_alert() {
    let root = meshca_tests::repo();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/meshca-rules.yaml")).unwrap();
    let shipped: std::collections::BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    let runbook = std::fs::read_to_string(root.join("docs/runbooks/alerts.md")).unwrap();
    let table: std::collections::BTreeSet<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("| Meshca"))
        .filter_map(|l| l.split('|').next())
        .map(str::trim)
        .collect();
    let table: std::collections::BTreeSet<String> =
        table.iter().map(|t| format!("Meshca{t}")).collect();
    let shipped: std::collections::BTreeSet<String> =
        shipped.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        table, shipped,
        "the runbook's table and the rules file differ"
    );
    for a in &shipped {
        assert!(
            runbook.contains(&format!("## {a}")),
            "no runbook section for {a}"
        );
    }
}
