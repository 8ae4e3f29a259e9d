//! The restart storm: every workload of a mesh renews at once, as after a cluster upgrade or a
//! zone coming back. A benchmark, not a test (docs/benchmarks.md has figures and the command):
//!
//! ```sh
//! cargo build --release --bin meshca-server
//! cargo run --release -p meshca-server --example storm -- [--workloads 10000] [--per-identity 10] \
//!     [--limits "max_connections = 20000; max_connections_per_ip = 0"]
//! ```
//!
//! 1. Starts `target/release/meshca-server` with issuance limits lifted and signs every
//!    workload its first certificate (its own key; `--per-identity` workloads share a SPIFFE ID,
//!    as a Deployment's replicas share a ServiceAccount), then makes each one's renewal CSR.
//! 2. Restarts the server on the same state with **default limits** (no configuration).
//! 3. Storm: every workload at once opens its own TLS connection, presenting its current
//!    certificate (renewal by mTLS, no token), from one of 100 loopback addresses (pods have
//!    their own addresses; `max_connections_per_ip` is per address), and asks for a new
//!    certificate. A refused connection or `UNAVAILABLE`/`RESOURCE_EXHAUSTED` is retried as a
//!    proxy does: exponential back-off from 100 ms (jittered, at most 2 s, honouring
//!    `grpc-retry-pushback-ms`), giving up after 60 s (an error).
//!
//! Prints: time until the last workload was served, p50/p99/max of each workload's wait, attempts,
//! errors, the server's CPU and peak memory during the storm.
#![allow(clippy::unwrap_used, reason = "a benchmark binary")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshca_proto::v1::SignCertificateRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{Identity, client_tls, make_csr, read_pem_certs};
use rotator::pki::SecretKey;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};

mod common;
use common::{LIFTED_LIMITS, cpu_secs, percentile, rss_kib, start_server};

/// Source addresses the workloads connect from.
const ADDRESSES: usize = 100;

struct Args {
    workloads: usize,
    per_identity: usize,
    server_bin: PathBuf,
    /// `[limits]` lines for the storm's server instead of the defaults (to see what a limit
    /// costs).
    limits: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        workloads: 10_000,
        per_identity: 10,
        server_bin: PathBuf::from("target/release/meshca-server"),
        limits: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--workloads" => a.workloads = v.parse().unwrap(),
            "--per-identity" => a.per_identity = v.parse::<usize>().unwrap().max(1),
            "--server-bin" => a.server_bin = PathBuf::from(v),
            "--limits" => a.limits = Some(format!("[limits]\n{}\n", v.replace(';', "\n"))),
            other => panic!("unknown flag {other}; see the source for the flags"),
        }
    }
    a
}

/// A channel whose one connection comes from `from`, over TLS with `tls`.
fn channel_from(url: &str, from: IpAddr, tls: Arc<rustls::ClientConfig>) -> Channel {
    let target: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls);
    let connect = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from, 0))?;
            let tcp = socket.connect(target).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(target.ip().into());
            let tls = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connect)
}

struct Workload {
    id: String,
    instance: String,
    identity: Identity,
    renewal_csr: Vec<u8>,
}

/// Signs every workload its first certificate through `url` with the bootstrap token.
async fn enrol(
    url: &str,
    bundle: &[CertificateDer<'static>],
    token: &str,
    a: &Args,
) -> Vec<Workload> {
    let tls = client_tls(bundle, None).unwrap();
    let channels: Vec<Channel> = (0..4)
        .map(|_| rotator::client::channel(url, tls.clone()).unwrap())
        .collect();
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.workloads {
        let (ch, auth, sem) = (channels[i % 4].clone(), auth.clone(), sem.clone());
        let id = format!(
            "spiffe://cluster.local/ns/default/sa/svc-{}",
            i / a.per_identity
        );
        tasks.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let spiffe = id.parse().unwrap();
            let key = SecretKey::generate_p256().unwrap();
            let instance = format!("5f0c8e1a-3b7d-4c2e-9a1f-{i:012x}");
            let mut r = tonic::Request::new(SignCertificateRequest {
                csr: make_csr(&spiffe, &key).unwrap(),
                ttl: None,
                instance_id: instance.clone(),
            });
            r.metadata_mut().insert("authorization", auth);
            let resp = IdentityServiceClient::new(ch)
                .sign_certificate(r)
                .await
                .unwrap()
                .into_inner();
            let chain = resp
                .certificate_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            let next = SecretKey::generate_p256().unwrap();
            (
                i,
                Workload {
                    renewal_csr: make_csr(&spiffe, &next).unwrap(),
                    id,
                    instance,
                    identity: Identity { chain, key },
                },
            )
        });
    }
    let mut out: Vec<Option<Workload>> = (0..a.workloads).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, w) = r.unwrap();
        out[i] = Some(w);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// What one workload saw in the storm.
struct Served {
    after: Option<Duration>,
    attempts: u32,
    last_error: Option<String>,
}

async fn renew(
    url: String,
    bundle: Arc<Vec<CertificateDer<'static>>>,
    w: Workload,
    from: IpAddr,
    start: Instant,
) -> Served {
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0;
    let mut last_error = None;
    while start.elapsed() < Duration::from_secs(60) {
        attempts += 1;
        let tls = client_tls(&bundle, Some(&w.identity)).unwrap();
        let mut client = IdentityServiceClient::new(channel_from(&url, from, tls));
        let r = tonic::Request::new(SignCertificateRequest {
            csr: w.renewal_csr.clone(),
            ttl: None,
            instance_id: w.instance.clone(),
        });
        let pushback = match client.sign_certificate(r).await {
            Ok(resp) if !resp.get_ref().certificate_chain.is_empty() => {
                return Served {
                    after: Some(start.elapsed()),
                    attempts,
                    last_error,
                };
            }
            Ok(_) => {
                last_error = Some("an empty chain".to_owned());
                None
            }
            Err(s) => {
                last_error = Some(format!("{:?}: {}", s.code(), s.message()));
                if !matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::Unknown
                ) {
                    break;
                }
                s.metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_millis)
            }
        };
        let jitter = 0.5 + rand_unit();
        let wait = pushback.unwrap_or(backoff).mul_f64(jitter);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    let _ = &w.id;
    Served {
        after: None,
        attempts,
        last_error,
    }
}

/// A number in [0, 1) from the OS's randomness (jitter only).
fn rand_unit() -> f64 {
    let mut b = [0u8; 4];
    rotator::pki::random_bytes(&mut b).unwrap();
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Every workload renews at once, each from its address; what each saw, and the server's peak
/// resident memory (KiB) meanwhile.
async fn storm(
    url: &str,
    bundle: Arc<Vec<CertificateDer<'static>>>,
    workloads: Vec<Workload>,
    pid: u32,
) -> (Vec<Served>, u64) {
    let start = Instant::now();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid).unwrap_or(0)));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, w) in workloads.into_iter().enumerate() {
        let octet = u8::try_from(i % ADDRESSES + 1).unwrap();
        let from = IpAddr::V4(Ipv4Addr::new(127, 1, 0, octet));
        tasks.spawn(renew(url.to_owned(), bundle.clone(), w, from, start));
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    sampler.abort();
    (out, peak.load(std::sync::atomic::Ordering::Relaxed))
}

/// The storm's figures, and each last refusal's reason with how many workloads saw it.
fn report(results: &[Served], server_cpu: f64, rss_before: u64, peak: u64) {
    let mut waits: Vec<u32> = results
        .iter()
        .filter_map(|r| {
            r.after
                .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        })
        .collect();
    waits.sort_unstable();
    let errors = results.iter().filter(|r| r.after.is_none()).count();
    let attempts: u32 = results.iter().map(|r| r.attempts).sum();
    let retried = results.iter().filter(|r| r.attempts > 1).count();
    println!(
        "storm: {} workloads, {} served, {} errors; last served after {:.2} s; wait p50 {:.0} ms, \
         p99 {:.0} ms; {} attempts ({} workloads retried); server CPU {:.1} s, memory {:.0} → \
         peak {:.0} MiB",
        results.len(),
        waits.len(),
        errors,
        waits.last().map_or(f64::NAN, |w| f64::from(*w) / 1e6),
        percentile(&waits, 0.50),
        percentile(&waits, 0.99),
        attempts,
        retried,
        server_cpu,
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for r in results {
        if let Some(e) = &r.last_error {
            *reasons.entry(e.chars().take(120).collect()).or_default() += 1;
        }
    }
    for (e, n) in reasons {
        println!("  {n:>6} × last refusal: {e}");
    }
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = start_server(&a.server_bin, &state, Some(LIFTED_LIMITS));
    let bundle = read_pem_certs(&state.join("bundle.pem").display().to_string()).unwrap();
    let token = std::fs::read_to_string(state.join("bootstrap-token")).unwrap();
    let t = Instant::now();
    let workloads = rt.block_on(enrol(&server.url, &bundle, token.trim(), &a));
    println!(
        "enrolled {} workloads ({} identities) in {:.1} s",
        workloads.len(),
        workloads.len().div_ceil(a.per_identity),
        t.elapsed().as_secs_f64()
    );
    drop(server);

    // Default limits from here on (unless --limits says otherwise).
    let server = start_server(&a.server_bin, &state, a.limits.as_deref());
    let pid = server.child.id();
    let bundle = Arc::new(read_pem_certs(&state.join("bundle.pem").display().to_string()).unwrap());
    let cpu_before = cpu_secs(&pid.to_string());
    let rss_before = rss_kib(pid).unwrap_or(0);
    let (results, peak) = rt.block_on(storm(&server.url, bundle, workloads, pid));
    let server_cpu = cpu_secs(&pid.to_string()) - cpu_before;
    report(&results, server_cpu, rss_before, peak);
}
