//! Istio-face workloads through a trust-anchor rotation (issue #31): each trusts exactly what
//! istio-agent and ztunnel trust — the last element of its `CreateCertificate` answer, split into
//! certificates — and renews as istio-agent does: a new key at half its leaf's lifetime, no bundle
//! stream, over a connection to the CA that trusts the mesh's root file (`istio-ca-root-cert`,
//! which meshca publishes: the current bundle). Workloads handshake with each other
//! over rustls mTLS all the time while the real `meshca` CLI stages, activates, rolls back,
//! activates again and finishes with its gates: zero failures. The negative control keeps only
//! the issuing anchor of each answer (what meshca's Istio face handed out before the fix) and must
//! see failures after `activate`.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_tests::{TestServer, Workload, meshca_in, mtls_handshake, pem_certs, with_token};
use rotator::client::{channel, client_tls, make_csr, verify_svid};
use rotator::pki::SecretKey;
use rotator::spiffe::SpiffeId;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::RwLock;

const WORKLOADS: usize = 12;
const HANDSHAKERS: usize = 3;

fn compressed(c: &mut ca_server::config::Config) {
    let p = &mut c.policy;
    p.leaf_ttl_default = Duration::from_secs(16);
    p.leaf_ttl_min = Duration::from_secs(5);
    p.leaf_ttl_max = Duration::from_secs(16);
    p.clock_skew = Duration::from_secs(1);
    p.issuer_ttl = Duration::from_secs(600);
    p.propagation_allowance = Duration::from_secs(8);
}

/// Which roots a workload takes from an answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Roots {
    /// istio-agent and ztunnel: every certificate of the last element.
    LastElement,
    /// The negative control: only the anchor the chain ends at.
    IssuingAnchorOnly,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    failed: AtomicU64,
    renewals: AtomicU64,
    renew_failures: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

/// One answer read as istio-agent reads it: the leaf and its intermediates (every element but the
/// last), the roots (the last element), and when to renew (`ratio` of the lifetime).
struct Answer {
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    renew_at: std::time::SystemTime,
}

fn read_answer(cert_chain: &[String], which: Roots, ratio: f64) -> Result<Answer, String> {
    let (last, rest) = cert_chain.split_last().ok_or("an empty answer")?;
    let chain: Vec<_> = rest.iter().flat_map(|p| pem_certs(p)).collect();
    let mut roots = pem_certs(last);
    if roots.is_empty() {
        return Err("no root in the last element".into());
    }
    if which == Roots::IssuingAnchorOnly {
        roots.retain(|r| {
            verify_svid(
                &chain,
                std::slice::from_ref(r),
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .is_ok()
        });
    }
    let leaf = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| e.to_string())?
        .1;
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    // notBefore is back-dated by the clock skew (1 s here).
    let issued = nb + 1;
    let renew_at = std::time::UNIX_EPOCH
        + Duration::from_secs_f64(issued as f64 + (na - issued) as f64 * ratio);
    Ok(Answer {
        chain,
        roots,
        renew_at,
    })
}

/// Asks for `id`; the workload renews at `ratio` of its leaf's lifetime (istio-agent's grace
/// ratio is 0.5 with jitter: the fleet spreads its workloads over 0.5–0.9, as pods started at
/// different times would be, so that renewals do not all fall in the same second).
async fn create(
    url: &str,
    ca_roots: &[CertificateDer<'static>],
    token: &str,
    id: &SpiffeId,
    which: Roots,
    ratio: f64,
) -> Result<(Workload, std::time::SystemTime), String> {
    // A new key for every request, as istio-agent makes.
    let key = SecretKey::generate_p256().map_err(|e| e.to_string())?;
    let csr = make_csr(id, &key).map_err(|e| e.to_string())?;
    let tls = client_tls(ca_roots, None).map_err(|e| e.to_string())?;
    let mut c = IstioCertificateServiceClient::new(channel(url, tls).map_err(|e| e.to_string())?);
    let req = IstioCertificateRequest {
        csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
        validity_duration: 0,
        metadata: None,
    };
    let r = c
        .create_certificate(with_token(req, token))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let a = read_answer(&r.cert_chain, which, ratio)?;
    Ok((
        Workload {
            id: id.clone(),
            chain: a.chain,
            key,
            bundle: a.roots,
        },
        a.renew_at,
    ))
}

struct Fleet {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(srv: &TestServer, which: Roots) -> Self {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workloads = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..WORKLOADS {
            let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/istio-w{i}")
                .parse()
                .unwrap();
            #[allow(clippy::cast_precision_loss, reason = "a small count")]
            let ratio = 0.5 + 0.4 * i as f64 / WORKLOADS as f64;
            let (w, mut renew_at) = create(&srv.url, &srv.bundle(), &srv.token, &id, which, ratio)
                .await
                .unwrap();
            let w = Arc::new(RwLock::new(w));
            workloads.push(w.clone());
            let (url, token, c, st) = (
                srv.url.clone(),
                srv.token.clone(),
                counters.clone(),
                stop.clone(),
            );
            let authority = srv.server().authority.clone();
            tasks.push(tokio::spawn(async move {
                while !st.load(Ordering::Relaxed) {
                    let wait = renew_at
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
                    if std::time::SystemTime::now() < renew_at {
                        continue;
                    }
                    let ca_roots = authority.snapshot().bundle.anchors.clone();
                    match create(&url, &ca_roots, &token, &id, which, ratio).await {
                        Ok((next, at)) => {
                            *w.write().await = next;
                            renew_at = at;
                            c.renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            c.renew_failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("renewal of {id} failed: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }));
        }
        for h in 0..HANDSHAKERS {
            let (ws, c, st) = (workloads.clone(), counters.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n: usize = h * 7919 + 1;
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
                            *f = Some(format!("istio-w{a} serving istio-w{b}: {e}"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        Self {
            counters,
            stop,
            tasks,
        }
    }

    async fn stop(self, name: &str) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let c = &self.counters;
        let (a, f) = (
            c.attempted.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        );
        eprintln!(
            "{name}: handshakes attempted {a}, failed {f}; renewals {} (failed {}); first failure: {:?}",
            c.renewals.load(Ordering::Relaxed),
            c.renew_failures.load(Ordering::Relaxed),
            c.first_failure.lock().unwrap()
        );
        (a, f)
    }
}

async fn step(srv: &TestServer, args: &[&str]) -> String {
    let (code, out, err) = meshca_in(&srv.state_dir(), args).await;
    eprintln!("$ meshca {}\n{out}{err}", args.join(" "));
    assert_eq!(code, 0, "meshca {args:?} failed: {out}{err}");
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

/// The Istio face's convergence as `meshca status --output json` reports it.
async fn istio_convergence(srv: &TestServer) -> (u64, u64) {
    let out = step(srv, &["status", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v["anchor_rotation"]["ledger"]["by_api"]["istio"];
    (
        c["workloads_with_current_bundle"].as_u64().unwrap_or(0),
        c["live_workloads"].as_u64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_workloads_trusting_the_last_element_pass_a_rotation_and_a_rollback() {
    let srv = TestServer::start_with(compressed).await;
    let fleet = Fleet::start(&srv, Roots::LastElement).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(istio_convergence(&srv).await.1, WORKLOADS as u64);

    step(&srv, &["anchors", "stage"]).await;
    // Staged: an answer's last element holds both anchors, in bundle order.
    let key = SecretKey::generate_p256().unwrap();
    let probe_id: SpiffeId = "spiffe://cluster.local/ns/default/sa/probe"
        .parse()
        .unwrap();
    let mut c = IstioCertificateServiceClient::new(
        channel(&srv.url, client_tls(&srv.bundle(), None).unwrap()).unwrap(),
    );
    let r = c
        .create_certificate(with_token(
            IstioCertificateRequest {
                csr: pem::encode(&pem::Pem::new(
                    "CERTIFICATE REQUEST",
                    make_csr(&probe_id, &key).unwrap(),
                )),
                validity_duration: 0,
                metadata: None,
            },
            &srv.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pem_certs(r.cert_chain.last().unwrap()),
        srv.bundle(),
        "while staged, the last element is every anchor of the bundle, in its order"
    );
    assert_eq!(srv.bundle().len(), 2);

    // Istio workloads that renewed after staging are counted as holding the new bundle.
    let (current, live) = meshca_tests::eventually(Duration::from_secs(30), || async {
        let (c, l) = istio_convergence(&srv).await;
        (c > 0).then_some((c, l))
    })
    .await
    .expect("Istio workloads renewed after staging count as holding the staged bundle");
    eprintln!("istio convergence after staging: {current} of {live}");

    wait_gate(&srv, "activate-ready").await;
    step(&srv, &["anchors", "activate"]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = step(&srv, &["anchors", "rollback"]).await;
    assert!(out.contains("rolled back to staged"), "{out}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_gate(&srv, "activate-ready").await;
    step(&srv, &["anchors", "activate"]).await;
    wait_gate(&srv, "finish-ready").await;
    let out = step(&srv, &["anchors", "finish"]).await;
    assert!(out.contains("finished"), "{out}");
    // After finish: the new anchor alone.
    assert_eq!(srv.bundle().len(), 1);
    tokio::time::sleep(Duration::from_secs(10)).await;

    let (attempted, failed) = fleet.stop("istio rotation").await;
    assert!(
        attempted > 100,
        "too few handshakes to mean anything: {attempted}"
    );
    assert_eq!(
        failed, 0,
        "Istio-face workloads refused each other during a gated rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_only_the_issuing_anchor_breaks_handshakes_after_activate() {
    let srv = TestServer::start_with(compressed).await;
    let fleet = Fleet::start(&srv, Roots::IssuingAnchorOnly).await;
    step(&srv, &["anchors", "stage"]).await;
    wait_gate(&srv, "activate-ready").await;
    step(&srv, &["anchors", "activate"]).await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    let (attempted, failed) = fleet.stop("istio negative control").await;
    assert!(attempted > 50, "too few handshakes: {attempted}");
    assert!(
        failed > 0,
        "workloads trusting only their issuing anchor must refuse each other after activate; \
         the test cannot see the bug it guards against"
    );
}
