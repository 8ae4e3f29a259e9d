//! The load generator: drives `SignCertificate` over TLS with authentication on long-lived HTTP/2
//! connections and reports throughput and latency, next to the signing core's own one-core rate
//! measured in the same run. A benchmark, not a test: see docs/benchmarks.md for how it is run.
//!
//! By default it starts `target/release/meshca-server` as a child process on a temp state dir
//! (so the server's RSS can be read from /proc), or uses `--server URL --ca-bundle FILE
//! --token-file FILE`. Run: `cargo build --release --bin meshca-server && cargo run --release
//! --example loadgen -- --rounds 5 --duration 10s`. It lives here, not in `tests/`, so that its
//! release build never includes the test-only `fault-injection` feature.

#![allow(clippy::unwrap_used)] // A benchmark binary: a panic is an acceptable report.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshca_proto::v1::SignCertificateRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{channel, client_tls, make_csr, read_pem_certs, verify_svid};
use rotator::pki::SecretKey;
use rustls_pki_types::{CertificateDer, UnixTime};

mod common;
use common::{Child, LIFTED_LIMITS, cpu_secs, median, percentile, rss_kib, start_server};

struct Args {
    rounds: usize,
    connections: usize,
    concurrency: usize,
    duration: Duration,
    server: Option<(String, String, String)>,
    server_bin: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 3,
        connections: 4,
        concurrency: 64,
        duration: Duration::from_secs(10),
        server: None,
        server_bin: PathBuf::from("target/release/meshca-server"),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let (mut url, mut bundle, mut token) = (None, None, None);
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--rounds" => a.rounds = v.parse().unwrap(),
            "--connections" => a.connections = v.parse().unwrap(),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--duration" => a.duration = humantime::parse_duration(&v).unwrap(),
            "--server" => url = Some(v),
            "--ca-bundle" => bundle = Some(v),
            "--token-file" => token = Some(v),
            "--server-bin" => a.server_bin = PathBuf::from(v),
            other => panic!("unknown flag {other}; see the source for the flags"),
        }
        i += 2;
    }
    if let (Some(u), Some(b), Some(t)) = (url, bundle, token) {
        a.server = Some((u, b, t));
    }
    a
}

/// The signing core alone on this thread: CSR parse + verify, leaf sign. Certs per second.
fn core_rate(duration: Duration) -> f64 {
    use ca_server::signing::{parse_csr, sign_leaf};
    let policy = rotator::policy::Policy::default();
    let now = time::OffsetDateTime::now_utc();
    let state =
        rotator::state::AuthorityState::genesis("cluster.local".parse().unwrap(), &policy, now)
            .unwrap();
    let issuer = state.active_issuer().unwrap();
    let signer = issuer.cert.rcgen_issuer(issuer.key.clone()).unwrap();
    let id = "spiffe://cluster.local/ns/default/sa/bench"
        .parse()
        .unwrap();
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| make_csr(&id, &SecretKey::generate_p256().unwrap()).unwrap())
        .collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let csr = parse_csr(&csrs[(n % 64) as usize]).unwrap();
        let w = policy
            .leaf_window(
                now,
                None,
                issuer.cert.info.not_before,
                issuer.cert.info.not_after,
            )
            .unwrap();
        std::hint::black_box(sign_leaf(&csr, &w, &signer).unwrap());
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Target {
    url: String,
    bundle: Vec<CertificateDer<'static>>,
    token: String,
    pid: Option<u32>,
    _child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

fn target(a: &Args) -> Target {
    if let Some((url, bundle, token)) = &a.server {
        return Target {
            url: url.clone(),
            bundle: read_pem_certs(bundle).unwrap(),
            token: std::fs::read_to_string(token).unwrap().trim().to_owned(),
            pid: None,
            _child: None,
            _dir: None,
        };
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The limits one token asking for everything would meet are lifted (`LIFTED_LIMITS`);
    // `LOADGEN_LIMITS=off` turns every limit off instead (the A/B in docs/benchmarks.md).
    let limits = if std::env::var("LOADGEN_LIMITS").as_deref() == Ok("off") {
        "[limits]\nmax_connections = 0\nmax_connections_per_ip = 0\nwatch_max = 0\n\
         watch_max_unauthenticated = 0\nwatch_per_peer = 0\nhttp_max_connections = 0\n\
         tokenreview_rate = 0\ntokenreview_in_flight = 0\nissue_rate = 0\n\
         ledger_max_instances = 0\nledger_instances_per_identity = 0\n"
    } else {
        LIFTED_LIMITS
    };
    // Audit lines are written by a background thread; keep them, as production would, but off
    // the terminal.
    let p = start_server(&a.server_bin, &state, Some(limits));
    let url = p.url.clone();
    let pid = p.child.id();
    Target {
        url,
        bundle: read_pem_certs(&state.join("bundle.pem").display().to_string()).unwrap(),
        token: std::fs::read_to_string(state.join("bootstrap-token"))
            .unwrap()
            .trim()
            .to_owned(),
        pid: Some(pid),
        _child: Some(p),
        _dir: Some(dir),
    }
}

/// Closed loop (`rate = None`: as fast as possible) or open loop at `rate` req/s, where latency is
/// measured from each request's scheduled start (no coordinated omission).
async fn drive(t: &Target, a: &Args, rate: Option<f64>) -> (f64, Vec<u32>, Vec<u32>, u64) {
    let tls = client_tls(&t.bundle, None).unwrap();
    let channels: Vec<_> = (0..a.connections)
        .map(|_| channel(&t.url, tls.clone()).unwrap())
        .collect();
    let id = "spiffe://cluster.local/ns/default/sa/bench"
        .parse()
        .unwrap();
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..256)
            .map(|_| make_csr(&id, &SecretKey::generate_p256().unwrap()).unwrap())
            .collect(),
    );
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {}", t.token).parse().unwrap();
    // Warm up every connection.
    for ch in &channels {
        let mut c = IdentityServiceClient::new(ch.clone());
        let mut r = tonic::Request::new(SignCertificateRequest {
            csr: csrs[0].clone(),
            ttl: None,
            instance_id: String::new(),
        });
        r.metadata_mut().insert("authorization", auth.clone());
        let resp = c.sign_certificate(r).await.unwrap().into_inner();
        let chain: Vec<_> = resp
            .certificate_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        verify_svid(
            &chain,
            &t.bundle,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let interval = rate.map(|r| Duration::from_secs_f64(a.concurrency as f64 / r));
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let mut c = IdentityServiceClient::new(channels[w % channels.len()].clone());
        let csrs = csrs.clone();
        let auth = auth.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut service: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut n = w;
            // Open loop: stagger the workers across one interval.
            let mut next = interval
                .map(|iv| tokio::time::Instant::now() + iv.mul_f64(w as f64 / 64.0_f64.max(1.0)));
            while !stop.load(Ordering::Relaxed) {
                let scheduled = match (next, interval) {
                    (Some(at), Some(iv)) => {
                        tokio::time::sleep_until(at).await;
                        next = Some(at + iv);
                        at.into_std()
                    }
                    _ => Instant::now(),
                };
                let mut r = tonic::Request::new(SignCertificateRequest {
                    csr: csrs[n % csrs.len()].clone(),
                    ttl: None,
                    instance_id: String::new(),
                });
                r.metadata_mut().insert("authorization", auth.clone());
                let sent = Instant::now();
                match c.sign_certificate(r).await {
                    Ok(_) => {
                        lat.push(
                            u32::try_from(scheduled.elapsed().as_micros()).unwrap_or(u32::MAX),
                        );
                        service.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            (lat, service, errors)
        }));
    }
    tokio::time::sleep(a.duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let (mut all, mut svc, mut errors) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (l, s, e) = t.await.unwrap();
        all.extend(l);
        svc.extend(s);
        errors += e;
    }
    all.sort_unstable();
    svc.sort_unstable();
    (all.len() as f64 / elapsed, all, svc, errors)
}

fn main() {
    rotator::client::install_crypto_provider();
    let a = parse_args();
    let t = target(&a);
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = t.pid.and_then(rss_kib);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_pid = t.pid.map(|p| p.to_string());
    let mb =
        |k: Option<u64>| k.map_or("n/a".to_owned(), |k| format!("{:.1} MB", k as f64 / 1024.0));
    println!(
        "{} rounds; each: signing core alone on one core (3 s), then the server closed loop ({} connections, {} in flight, {:?})",
        a.rounds, a.connections, a.concurrency, a.duration
    );
    let (mut cores, mut rates, mut ratios, mut p50s, mut p99s, mut eff) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=a.rounds {
        let core = core_rate(Duration::from_secs(3));
        let (s0, l0, w0) = (
            server_pid.as_deref().map(cpu_secs),
            cpu_secs("self"),
            Instant::now(),
        );
        let (rate, lat, _, errors) = rt.block_on(drive(&t, &a, None));
        let wall = w0.elapsed().as_secs_f64();
        let server_cores = server_pid
            .as_deref()
            .map(cpu_secs)
            .zip(s0)
            .map(|(b, a)| (b - a) / wall);
        let loadgen_cores = (cpu_secs("self") - l0) / wall;
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "  round {round}: core {core:>6.0}/s | server {rate:>6.0}/s (ratio {:.2}) p50 {p50:.2} ms p99 {p99:.2} ms errors {errors} | CPU server {} load generator {loadgen_cores:.2}",
            rate / core,
            server_cores.map_or("n/a".into(), |c| format!("{c:.2}")),
        );
        cores.push(core);
        rates.push(rate);
        ratios.push(rate / core);
        p50s.push(p50);
        p99s.push(p99);
        if let Some(sc) = server_cores {
            eff.push(rate / sc / core);
        }
    }
    let loaded_rss = t.pid.and_then(rss_kib);
    let half = median(rates.clone()) / 2.0;
    let (half_rate, half_lat, half_svc, half_errors) = rt.block_on(drive(&t, &a, Some(half)));
    println!("medians:");
    println!(
        "  signing core alone, one core:     {:>7.0} certs/s",
        median(cores)
    );
    println!(
        "  server, closed loop:              {:>7.0} certs/s  p50 {:.2} ms  p99 {:.2} ms",
        median(rates),
        median(p50s),
        median(p99s)
    );
    println!(
        "  ratio server / one-core signing:  {:>7.2}",
        median(ratios)
    );
    if !eff.is_empty() {
        println!(
            "  server certs/s per CPU core it used, over the one-core signing rate: {:.2}",
            median(eff)
        );
    }
    println!(
        "  server, open loop at {half:.0} req/s: {half_rate:>7.0} certs/s  errors {half_errors}\n    \
         latency from send:               p50 {:.2} ms  p99 {:.2} ms\n    \
         from scheduled start:            p50 {:.2} ms  p99 {:.2} ms (adds the generator's 1 ms timer granularity)",
        percentile(&half_svc, 0.5),
        percentile(&half_svc, 0.99),
        percentile(&half_lat, 0.5),
        percentile(&half_lat, 0.99)
    );
    println!(
        "  server RSS idle / after load:     {} / {}",
        mb(idle_rss),
        mb(loaded_rss)
    );
}
