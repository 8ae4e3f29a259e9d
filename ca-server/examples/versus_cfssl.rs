//! meshca against `cfssl serve` on the same machine, in the same run: throughput and p99 at the
//! same number of requests in flight, rounds interleaved (meshca, then cfssl, at each
//! concurrency). A benchmark, not a test (docs/benchmarks.md has figures):
//!
//! ```sh
//! GOBIN=/tmp/cfssl/bin go install github.com/cloudflare/cfssl/cmd/cfssl@v1.6.5
//! cargo build --release --bin meshca-server
//! cargo run --release -p meshca-server --example versus_cfssl -- --cfssl /tmp/cfssl/bin/cfssl \
//!     [--rounds 3] [--duration 10s] [--concurrency 16,64]
//! ```
//!
//! Both sign a P-256 CSR with a P-256 CA and answer with the certificate. meshca as it ships
//! (TLS, a bearer token checked on every request, the issuance ledger, its limits with
//! `issue_rate` lifted as in `loadgen`), over 4 HTTP/2 connections; cfssl's `/api/v1/cfssl/sign`
//! over plain HTTP/1.1 keep-alive, one connection per request in flight (no TLS, no
//! authentication: cfssl's default).
#![allow(clippy::unwrap_used, reason = "a benchmark binary")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshca_proto::v1::SignCertificateRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{channel, client_tls, make_csr, read_pem_certs};
use rotator::pki::SecretKey;
use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{LIFTED_LIMITS, cpu_secs, median, percentile, start_server};

struct Args {
    cfssl: PathBuf,
    rounds: usize,
    duration: Duration,
    concurrency: Vec<usize>,
    server_bin: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        cfssl: PathBuf::from("/tmp/cfssl/bin/cfssl"),
        rounds: 3,
        duration: Duration::from_secs(10),
        concurrency: vec![16, 64],
        server_bin: PathBuf::from("target/release/meshca-server"),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--cfssl" => a.cfssl = PathBuf::from(v),
            "--rounds" => a.rounds = v.parse().unwrap(),
            "--duration" => a.duration = humantime::parse_duration(&v).unwrap(),
            "--concurrency" => a.concurrency = v.split(',').map(|c| c.parse().unwrap()).collect(),
            "--server-bin" => a.server_bin = PathBuf::from(v),
            other => panic!("unknown flag {other}; see the source for the flags"),
        }
    }
    a
}

/// One closed-loop run: requests per second, sorted latencies (µs), errors.
struct Run {
    rate: f64,
    lat: Vec<u32>,
    errors: u64,
    server_cores: f64,
}

fn csrs() -> Arc<Vec<Vec<u8>>> {
    let id = "spiffe://cluster.local/ns/default/sa/bench"
        .parse()
        .unwrap();
    Arc::new(
        (0..256)
            .map(|_| make_csr(&id, &SecretKey::generate_p256().unwrap()).unwrap())
            .collect(),
    )
}

/// One worker's way of sending request `n`: whether it was answered with a certificate.
type Sender = Box<dyn FnMut(usize) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send>;

async fn closed_loop(senders: Vec<Sender>, duration: Duration, pid: u32) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_secs(&pid.to_string());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut send in senders {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut n) = (Vec::new(), 0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if send(n).await {
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Run {
        rate: lat.len() as f64 / wall,
        lat,
        errors,
        server_cores: (cpu_secs(&pid.to_string()) - cpu0) / wall,
    }
}

/// A cfssl sign request for `csr` (DER), as HTTP/1.1 bytes.
fn cfssl_request(addr: SocketAddr, csr: &[u8]) -> Vec<u8> {
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr.to_vec()));
    let body = serde_json::json!({ "certificate_request": pem }).to_string();
    format!(
        "POST /api/v1/cfssl/sign HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP/1.1 response with a Content-Length; whether it said success.
async fn cfssl_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = &buf[end + 4..end + 4 + len];
            return head.starts_with("http/1.1 200")
                && body.windows(14).any(|w| w == b"\"success\":true");
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn start_cfssl(bin: &PathBuf, dir: &std::path::Path) -> (common::Child, SocketAddr) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cfssl bench CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"signing":{"default":{"expiry":"24h","usages":["digital signature","key encipherment","server auth","client auth"]}}}"#,
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(bin)
        .arg("serve")
        .arg("-address=127.0.0.1")
        .arg(format!("-port={port}"))
        .arg(format!("-ca={}", dir.join("ca.pem").display()))
        .arg(format!("-ca-key={}", dir.join("ca-key.pem").display()))
        .arg(format!("-config={}", dir.join("config.json").display()))
        .arg("-loglevel=5")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start cfssl (see the header for how to build it)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "cfssl did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        common::Child {
            child,
            url: format!("http://{addr}"),
        },
        addr,
    )
}

/// One meshca sender per worker: `SignCertificate` with the token, over the workers' share of
/// `channels`.
fn meshca_senders(
    c: usize,
    channels: &[tonic::transport::Channel],
    csrs: &Arc<Vec<Vec<u8>>>,
    auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> Vec<Sender> {
    (0..c)
        .map(|w| {
            let client = IdentityServiceClient::new(channels[w % channels.len()].clone());
            let (csrs, auth) = (csrs.clone(), auth.clone());
            Box::new(move |n: usize| {
                let mut client = client.clone();
                let mut r = tonic::Request::new(SignCertificateRequest {
                    csr: csrs[(w * 31 + n) % csrs.len()].clone(),
                    ttl: None,
                    instance_id: String::new(),
                });
                r.metadata_mut().insert("authorization", auth.clone());
                Box::pin(async move { client.sign_certificate(r).await.is_ok() })
                    as Pin<Box<dyn Future<Output = bool> + Send>>
            }) as Sender
        })
        .collect()
}

/// One cfssl sender per worker, each on its own keep-alive connection to `addr`.
async fn cfssl_senders(c: usize, addr: SocketAddr, requests: &Arc<Vec<Vec<u8>>>) -> Vec<Sender> {
    let mut v = Vec::new();
    for w in 0..c {
        let conn = Arc::new(tokio::sync::Mutex::new((
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            Vec::new(),
        )));
        let requests = requests.clone();
        v.push(Box::new(move |n: usize| {
            let (conn, requests) = (conn.clone(), requests.clone());
            Box::pin(async move {
                let mut g = conn.lock().await;
                let (s, buf) = &mut *g;
                s.write_all(&requests[(w * 31 + n) % requests.len()])
                    .await
                    .is_ok()
                    && cfssl_response(s, buf).await
            }) as Pin<Box<dyn Future<Output = bool> + Send>>
        }) as Sender);
    }
    v
}

fn print_round(round: usize, c: usize, m: &Run, f: &Run) {
    println!(
        "  round {round} c={c}: meshca {:>6.0}/s p99 {:>6.2} ms err {} ({:.2} cores) | cfssl {:>6.0}/s p99 {:>6.2} ms err {} ({:.2} cores) | throughput {:.2}×, p99 {:.1}× lower",
        m.rate,
        percentile(&m.lat, 0.99),
        m.errors,
        m.server_cores,
        f.rate,
        percentile(&f.lat, 0.99),
        f.errors,
        f.server_cores,
        m.rate / f.rate,
        percentile(&f.lat, 0.99) / percentile(&m.lat, 0.99),
    );
}

fn print_medians(concurrency: &[usize], results: &BTreeMap<(usize, &str), Vec<Run>>) {
    println!("medians:");
    for &c in concurrency {
        let rate = |k| median(results[&(c, k)].iter().map(|r| r.rate).collect());
        let p99 = |k| {
            median(
                results[&(c, k)]
                    .iter()
                    .map(|r| percentile(&r.lat, 0.99))
                    .collect(),
            )
        };
        println!(
            "  c={c}: meshca {:.0}/s p99 {:.2} ms | cfssl {:.0}/s p99 {:.2} ms | meshca {:.2}× the throughput, p99 {:.1}× lower",
            rate("meshca"),
            p99("meshca"),
            rate("cfssl"),
            p99("cfssl"),
            rate("meshca") / rate("cfssl"),
            p99("cfssl") / p99("meshca"),
        );
    }
}

fn main() {
    rotator::client::install_crypto_provider();
    let a = parse_args();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let meshca = start_server(&a.server_bin, &state, Some(LIFTED_LIMITS));
    let meshca_pid = meshca.child.id();
    let bundle = read_pem_certs(&state.join("bundle.pem").display().to_string()).unwrap();
    let token = std::fs::read_to_string(state.join("bootstrap-token")).unwrap();
    let (cfssl, cfssl_addr) = start_cfssl(&a.cfssl, dir.path());
    let cfssl_pid = cfssl.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let csrs = csrs();
    let tls = client_tls(&bundle, None).unwrap();
    let channels: Vec<_> = (0..4)
        .map(|_| channel(&meshca.url, tls.clone()).unwrap())
        .collect();
    let auth: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().unwrap();
    let requests: Arc<Vec<Vec<u8>>> =
        Arc::new(csrs.iter().map(|c| cfssl_request(cfssl_addr, c)).collect());
    println!(
        "{} rounds of {:?} each, concurrency {:?}: meshca then cfssl at each",
        a.rounds, a.duration, a.concurrency
    );
    let mut results: BTreeMap<(usize, &str), Vec<Run>> = BTreeMap::new();
    for round in 1..=a.rounds {
        for &c in &a.concurrency {
            let senders = meshca_senders(c, &channels, &csrs, &auth);
            let m = rt.block_on(closed_loop(senders, a.duration, meshca_pid));
            let senders = rt.block_on(cfssl_senders(c, cfssl_addr, &requests));
            let f = rt.block_on(closed_loop(senders, a.duration, cfssl_pid));
            print_round(round, c, &m, &f);
            results.entry((c, "meshca")).or_default().push(m);
            results.entry((c, "cfssl")).or_default().push(f);
        }
    }
    print_medians(&a.concurrency, &results);
    drop(cfssl);
}
