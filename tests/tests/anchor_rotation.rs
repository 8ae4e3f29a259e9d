//! Trust-anchor rotation end to end (issue #4, proofs 3 and 4): a real server with compressed
//! TTLs (leaves live 20 s), 20 workloads in separate tasks renewing over gRPC/TLS at the
//! `refresh_at` the server hands out and following `WatchTrustBundle`, handshaking with each other
//! over rustls mTLS all the time, while an operator drives the rotation with the real `meshca`
//! CLI and its gates (`meshca anchors wait`). Zero failed handshakes is asserted; the negative
//! control forces `finish` right after `activate` and must see failures.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshca_proto::v1::WatchTrustBundleRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use meshca_tests::{TestServer, Workload, bin, mtls_handshake, sign_request, with_token};
use rotator::client::{channel, client_tls, make_csr};
use rotator::pki::SecretKey;
use rotator::spiffe::SpiffeId;
use rustls_pki_types::CertificateDer;
use tokio::sync::RwLock;

const WORKLOADS: usize = 20;
const HANDSHAKERS: usize = 4;

fn compressed(c: &mut ca_server::config::Config) {
    let p = &mut c.policy;
    p.leaf_ttl_default = Duration::from_secs(20);
    p.leaf_ttl_min = Duration::from_secs(5);
    p.leaf_ttl_max = Duration::from_secs(20);
    p.clock_skew = Duration::from_secs(1);
    p.issuer_ttl = Duration::from_secs(600);
    p.propagation_allowance = Duration::from_secs(10);
}

/// What the fleet saw.
#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    failed: AtomicU64,
    renewals: AtomicU64,
    renew_failures: AtomicU64,
    bundle_pushes: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

struct Fleet {
    workloads: Vec<Arc<RwLock<Workload>>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn sign(
    url: &str,
    bundle: &[CertificateDer<'static>],
    token: &str,
    id: &SpiffeId,
    instance: &str,
) -> Result<(meshca_proto::v1::SignCertificateResponse, SecretKey), String> {
    let key = SecretKey::generate_p256().map_err(|e| e.to_string())?;
    let csr = make_csr(id, &key).map_err(|e| e.to_string())?;
    // A fresh connection trusting the bundle this workload holds now: the server's own
    // certificate follows the rotation too.
    let tls = client_tls(bundle, None).map_err(|e| e.to_string())?;
    let mut c = IdentityServiceClient::new(channel(url, tls).map_err(|e| e.to_string())?);
    let mut req = sign_request(csr);
    req.instance_id = instance.to_owned();
    let r = c
        .sign_certificate(with_token(req, token))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok((r.into_inner(), key))
}

impl Fleet {
    async fn start(srv: &TestServer) -> Self {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workloads = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..WORKLOADS {
            let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/w{i}")
                .parse()
                .unwrap();
            let instance = format!("pod-{i}");
            let (r, key) = sign(&srv.url, &srv.bundle(), &srv.token, &id, &instance)
                .await
                .unwrap();
            let mut refresh = r.refresh_at.unwrap();
            let w = Arc::new(RwLock::new(Workload::from_response(&r, key)));
            workloads.push(w.clone());
            // Renewal loop: at refresh_at, sign again and swap in the new leaf and bundle.
            let (url, token, c, st) = (
                srv.url.clone(),
                srv.token.clone(),
                counters.clone(),
                stop.clone(),
            );
            let w2 = w.clone();
            let (id2, inst2) = (id.clone(), instance.clone());
            tasks.push(tokio::spawn(async move {
                while !st.load(Ordering::Relaxed) {
                    let at = std::time::SystemTime::try_from(refresh).unwrap();
                    let wait = at
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
                    if std::time::SystemTime::now() < at {
                        continue;
                    }
                    let bundle = w2.read().await.bundle.clone();
                    match sign(&url, &bundle, &token, &id2, &inst2).await {
                        Ok((r, key)) => {
                            refresh = r.refresh_at.unwrap();
                            *w2.write().await = Workload::from_response(&r, key);
                            c.renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            c.renew_failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("renewal of {id2} failed: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }));
            // Bundle watch: every pushed bundle replaces the one the workload verifies with.
            let (url, c, st, w3) = (srv.url.clone(), counters.clone(), stop.clone(), w.clone());
            let bundle0 = srv.bundle();
            tasks.push(tokio::spawn(async move {
                let tls = client_tls(&bundle0, None).unwrap();
                let mut client = IdentityServiceClient::new(channel(&url, tls).unwrap());
                let mut stream = client
                    .watch_trust_bundle(WatchTrustBundleRequest {
                        instance_id: instance,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                while !st.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                        Ok(Ok(Some(b))) => {
                            w3.write().await.bundle =
                                b.anchors.into_iter().map(CertificateDer::from).collect();
                            c.bundle_pushes.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => return,
                        Err(_) => {}
                    }
                }
            }));
        }
        // Handshakers: random pairs, back to back.
        for h in 0..HANDSHAKERS {
            let (ws, c, st) = (workloads.clone(), counters.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n: usize = h * 7919;
                while !st.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let a = (n >> 33) % WORKLOADS;
                    let b = (a + 1 + (n >> 13) % (WORKLOADS - 1)) % WORKLOADS;
                    let (server, client) = (ws[a].read().await.clone(), ws[b].read().await.clone());
                    c.attempted.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = mtls_handshake(&server, &client).await {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                        let mut f = c.first_failure.lock().unwrap();
                        if f.is_none() {
                            *f = Some(format!("w{a} serving w{b}: {e}"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        Self {
            workloads,
            counters,
            stop,
            tasks,
        }
    }

    async fn stop(self) -> Arc<Counters> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.counters
    }
}

/// Runs the real `meshca` CLI against the server's admin socket; returns (success, stdout).
async fn meshca(srv: &TestServer, args: &[&str]) -> (bool, String) {
    let dir = srv.state_dir();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin("meshca"))
            .args(&args)
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("$ meshca {}\n{stdout}{stderr}", args.join(" "));
        (out.status.success(), stdout + &stderr)
    })
    .await
    .unwrap()
}

async fn step(srv: &TestServer, args: &[&str]) -> String {
    let (ok, out) = meshca(srv, args).await;
    assert!(ok, "meshca {args:?} failed: {out}");
    out
}

async fn wait_gate(srv: &TestServer, until: &str) -> String {
    step(
        srv,
        &[
            "anchors",
            "wait",
            "--until",
            until,
            "--interval",
            "200ms",
            "--timeout",
            "90s",
        ],
    )
    .await
}

fn anchor_ids(b: &[CertificateDer<'_>]) -> Vec<String> {
    b.iter()
        .map(|c| rotator::pki::CertId::of(c).to_string())
        .collect()
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

fn report(name: &str, c: &Counters) -> (u64, u64) {
    let (a, f) = (
        c.attempted.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "{name}: handshakes attempted {a}, failed {f}; renewals {} (failed {}), bundle pushes {}; first failure: {:?}",
        c.renewals.load(Ordering::Relaxed),
        c.renew_failures.load(Ordering::Relaxed),
        c.bundle_pushes.load(Ordering::Relaxed),
        c.first_failure.lock().unwrap()
    );
    (a, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rotation_with_twenty_workloads_fails_no_handshake() {
    let srv = TestServer::start_with(compressed).await;
    let old = anchor_ids(&srv.bundle());
    let fleet = Fleet::start(&srv).await;
    settle(Duration::from_secs(2)).await;

    let out = step(&srv, &["anchors", "stage"]).await;
    assert!(out.contains("staged: anchor"), "{out}");
    // The gate is measured: it cannot be open before every workload renewed with the new bundle
    // (watch streams without a client certificate are not credited).
    let (ok, refused) = meshca(&srv, &["anchors", "activate"]).await;
    assert!(!ok && refused.contains("gate closed"), "{refused}");
    let out = wait_gate(&srv, "activate-ready").await;
    assert!(out.contains("open (measured)"), "{out}");
    step(&srv, &["anchors", "activate"]).await;
    let (ok, refused) = meshca(&srv, &["anchors", "finish"]).await;
    assert!(
        !ok && refused.contains("live leaves chain to"),
        "finish right after activate must be refused: {refused}"
    );
    let out = wait_gate(&srv, "finish-ready").await;
    assert!(out.contains("open (measured)"), "{out}");
    let out = step(&srv, &["anchors", "finish"]).await;
    assert!(out.contains("finished"), "{out}");
    // One more renewal cycle on the new anchor alone.
    settle(Duration::from_secs(15)).await;
    let new = anchor_ids(&srv.bundle());
    let counters = fleet.workloads.clone();
    let c = fleet.stop().await;
    let (attempted, failed) = report("full rotation", &c);
    assert_eq!(new.len(), 1);
    assert!(!old.contains(&new[0]), "the anchor changed");
    for w in &counters {
        let w = w.read().await;
        assert_eq!(
            anchor_ids(&w.bundle),
            new,
            "every workload holds the new bundle"
        );
        rotator::client::verify_svid(
            &w.chain,
            &w.bundle,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    }
    assert!(
        attempted >= 200,
        "too few handshakes to mean anything: {attempted}"
    );
    assert_eq!(failed, 0, "handshakes failed during a gated rotation");
    // WatchTrustBundle pushed every version to every watcher: v1 at start, v2 (stage), v3 (finish).
    assert_eq!(
        c.bundle_pushes.load(Ordering::Relaxed),
        3 * WORKLOADS as u64
    );
    assert_eq!(c.renew_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_twice_with_twenty_workloads_fails_no_handshake() {
    let srv = TestServer::start_with(compressed).await;
    let old = anchor_ids(&srv.bundle());
    let fleet = Fleet::start(&srv).await;
    settle(Duration::from_secs(2)).await;
    step(&srv, &["anchors", "stage"]).await;
    wait_gate(&srv, "activate-ready").await;
    step(&srv, &["anchors", "activate"]).await;
    // Let some leaves chain to the new anchor before going back.
    settle(Duration::from_secs(8)).await;
    let out = step(&srv, &["anchors", "rollback"]).await;
    assert!(out.contains("rolled back to staged"), "{out}");
    let (ok, refused) = meshca(&srv, &["anchors", "rollback"]).await;
    assert!(
        !ok && refused.contains("gate closed"),
        "leaves chain to the new anchor: the second rollback must wait: {refused}"
    );
    let out = wait_gate(&srv, "rollback-ready").await;
    assert!(out.contains("open (measured)"), "{out}");
    let out = step(&srv, &["anchors", "rollback"]).await;
    assert!(out.contains("rolled back to steady"), "{out}");
    settle(Duration::from_secs(15)).await;
    let workloads = fleet.workloads.clone();
    let c = fleet.stop().await;
    let (attempted, failed) = report("rollback twice", &c);
    assert_eq!(
        anchor_ids(&srv.bundle()),
        old,
        "back on the old anchor alone"
    );
    for w in &workloads {
        assert_eq!(anchor_ids(&w.read().await.bundle), old);
    }
    assert!(attempted >= 200, "too few handshakes: {attempted}");
    assert_eq!(failed, 0, "handshakes failed during a gated rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_forced_finish_breaks_handshakes() {
    let srv = TestServer::start_with(compressed).await;
    let fleet = Fleet::start(&srv).await;
    settle(Duration::from_secs(2)).await;
    step(&srv, &["anchors", "stage"]).await;
    wait_gate(&srv, "activate-ready").await;
    step(&srv, &["anchors", "activate"]).await;
    let out = step(&srv, &["anchors", "finish", "--force"]).await;
    assert!(
        out.contains("FORCED") && out.contains("live leaves chain to"),
        "--force must say what it risks: {out}"
    );
    settle(Duration::from_secs(6)).await;
    let c = fleet.stop().await;
    let (attempted, failed) = report("negative control", &c);
    assert!(attempted > 0);
    assert!(
        failed > 0,
        "finishing while leaves still chain to the old anchor must break handshakes; the test cannot see a broken rotation"
    );
}
