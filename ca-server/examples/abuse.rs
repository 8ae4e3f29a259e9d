//! The abuse program (issue #14): starts `target/release/meshca-server` on its defaults (a temp
//! state dir) and attacks it the ways a pod inside the mesh could, one scenario at a time, while a
//! legitimate caller keeps signing on its own connection. For each scenario it reports the
//! legitimate caller's failures and p50/p99 (against the quiet p99), the server's peak and
//! after-RSS (from /proc), and what the attack got. A benchmark, not a test: figures go to
//! docs/benchmarks.md. Run:
//!
//! ```sh
//! cargo build --release --bin meshca-server
//! cargo run --release --example abuse
//! ```
//!
//! `ABUSE_ONLY=<text>` runs only the scenarios whose name contains it; `ABUSE_SERVER=<path>` runs
//! another server binary.
//!
//! Attackers use the loopback addresses 127.0.0.2 and up (all of 127.0.0.0/8 is this host), as
//! pods would each have their own; the legitimate caller uses 127.0.0.1. Nothing leaves the host.

#![allow(clippy::unwrap_used)] // A benchmark binary: a panic is an acceptable report.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use meshca_proto::v1::{SignCertificateRequest, WatchTrustBundleRequest};
use rotator::client::{channel, client_tls, make_csr, read_pem_certs};
use rotator::pki::SecretKey;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Server {
    child: std::process::Child,
    url: String,
    http: SocketAddr,
    addr: SocketAddr,
    bundle: Vec<CertificateDer<'static>>,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // `ABUSE_SERVER=<path>` runs another build (e.g. to compare allocators).
    let bin =
        std::env::var("ABUSE_SERVER").unwrap_or_else(|_| "target/release/meshca-server".into());
    let mut child = std::process::Command::new(bin)
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("build it first: cargo build --release --bin meshca-server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut http) = (String::new(), String::new());
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(u) = l.trim().strip_prefix("gRPC (TLS)") {
            url = u.trim().to_owned();
        }
        if let Some(u) = l.trim().strip_prefix("HTTP") {
            http = u
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_start_matches("http://")
                .to_owned();
        }
        if l.starts_with("Issue a certificate") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Server {
        http: http.parse().unwrap(),
        addr: url.trim_start_matches("https://").parse().unwrap(),
        url,
        bundle: read_pem_certs(&state.join("bundle.pem").display().to_string()).unwrap(),
        token: std::fs::read_to_string(state.join("bootstrap-token")).unwrap(),
        child,
        _dir: dir,
    }
}

/// `GET /readyz`'s status line.
async fn ready(srv: &Server) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = TcpStream::connect(srv.http).await else {
        return "unreachable".into();
    };
    let _ = s
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.lines().next().unwrap_or("").to_owned()
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The legitimate caller: signs in a loop on one connection until stopped. It runs on its own OS
/// thread and runtime, as a real caller is its own process: on the attackers' runtime its requests
/// would queue behind thousands of attacker tasks in this program, measuring the client, not the
/// server.
struct Legit {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<u32>, u64)>,
}

fn legit(srv: &Server) -> Legit {
    let stop = Arc::new(AtomicBool::new(false));
    let (bundle, url, token) = (srv.bundle.clone(), srv.url.clone(), srv.token.clone());
    let st = stop.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tls = client_tls(&bundle, None).unwrap();
            let mut client = IdentityServiceClient::new(channel(&url, tls).unwrap());
            let key = SecretKey::generate_p256().unwrap();
            let csr = make_csr(
                &"spiffe://cluster.local/ns/default/sa/legit"
                    .parse()
                    .unwrap(),
                &key,
            )
            .unwrap();
            let (mut lat, mut failed) = (Vec::new(), 0u64);
            while !st.load(Ordering::Relaxed) {
                let mut req = tonic::Request::new(SignCertificateRequest {
                    csr: csr.clone(),
                    ttl: None,
                    instance_id: "legit".into(),
                });
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let t = Instant::now();
                match client.sign_certificate(req).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u32),
                    Err(e) => {
                        failed += 1;
                        eprintln!("  legit failure: {e:?}");
                    }
                }
                // About 15 requests per second: under the default per-caller issue_rate (20/s),
                // and enough answers in a scenario for a p99 that is not simply the slowest one.
                tokio::time::sleep(Duration::from_millis(66)).await;
            }
            (lat, failed)
        })
    });
    Legit { stop, thread }
}

impl Legit {
    async fn finish(self) -> (f64, f64, u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let (mut lat, failed) = tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        lat.sort_unstable();
        let p = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
                .map_or(f64::NAN, |v| f64::from(*v) / 1000.0)
        };
        (p(0.5), p(0.99), failed, lat.len())
    }
}

/// Samples the server's RSS every 100 ms until stopped; returns the peak.
fn sampler(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let h = std::thread::spawn(move || {
        let mut peak = 0.0f64;
        while !st.load(Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    (stop, h)
}

async fn tcp_from(ip: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind((ip, 0).into())?;
    s.connect(to).await
}

fn attacker(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, (2 + i / 250) as u8, (2 + i % 250) as u8)
}

/// `n` connections that finish TLS and then send nothing, from `n / per_addr` addresses.
/// Returns (opened, seconds until the server closed the last one).
async fn idle_tls(srv: &Server, n: usize, per_addr: usize) -> (usize, f64) {
    let cfg = client_tls(&srv.bundle, None).unwrap();
    let opened = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (cfg, opened, to) = (cfg.clone(), opened.clone(), srv.addr);
        tasks.push(tokio::spawn(async move {
            let tcp = tcp_from(attacker(i / per_addr), to).await.ok()?;
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .ok()?;
            opened.fetch_add(1, Ordering::Relaxed);
            // Wait for the server to close it.
            let mut b = [0u8; 256];
            loop {
                match tokio::time::timeout(
                    Duration::from_secs(120),
                    tokio::io::AsyncReadExt::read(&mut tls, &mut b),
                )
                .await
                {
                    Ok(Ok(0) | Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
            Some(())
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (
        opened.load(Ordering::Relaxed) as usize,
        start.elapsed().as_secs_f64(),
    )
}

/// `n` credential-free watch streams over `conns` connections, each held `hold`. Returns how
/// many got a stream.
async fn watch_flood(srv: &Server, n: usize, conns: usize, hold: Duration) -> usize {
    let clients: Vec<_> = (0..conns)
        .map(|_| {
            let tls = client_tls(&srv.bundle, None).unwrap();
            IdentityServiceClient::new(channel(&srv.url, tls).unwrap())
        })
        .collect();
    let got = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = clients[i % conns].clone();
        let got = got.clone();
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                c.watch_trust_bundle(WatchTrustBundleRequest::default()),
            )
            .await;
            if let Ok(Ok(s)) = r {
                got.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(hold).await;
                drop(s);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    got.load(Ordering::Relaxed) as usize
}

/// Requests with random bearer tokens for `secs`, 64 at a time over 4 connections; how many were
/// sent and refused.
async fn random_tokens(srv: &Server, secs: u64) -> (usize, usize) {
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let tls = client_tls(&srv.bundle, None).unwrap();
            IdentityServiceClient::new(channel(&srv.url, tls).unwrap())
        })
        .collect();
    let csr = make_csr(
        &"spiffe://cluster.local/ns/default/sa/x".parse().unwrap(),
        &SecretKey::generate_p256().unwrap(),
    )
    .unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let (mut c, csr, refused) = (clients[i % 4].clone(), csr.clone(), refused.clone());
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(SignCertificateRequest {
                csr,
                ttl: None,
                instance_id: String::new(),
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer mca_random{i:032}").parse().unwrap(),
            );
            if c.sign_certificate(req).await.is_err() {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (i, refused.load(Ordering::Relaxed) as usize)
}

/// `n` TCP connections that send a few bytes of a ClientHello and stop.
async fn slow_handshakes(srv: &Server, n: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let to = srv.addr;
        tasks.push(tokio::spawn(async move {
            let Ok(mut tcp) = tcp_from(attacker(i / 100), to).await else {
                return;
            };
            let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02]).await;
            let mut b = [0u8; 16];
            let _ = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::io::AsyncReadExt::read(&mut tcp, &mut b),
            )
            .await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    start.elapsed().as_secs_f64()
}

/// `n` connections that finish TLS and send garbage and oversized HTTP/2 frames.
async fn bad_frames(srv: &Server, n: usize) -> usize {
    let cfg = client_tls(&srv.bundle, None).unwrap();
    let closed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (cfg, closed, to) = (cfg.clone(), closed.clone(), srv.addr);
        tasks.push(tokio::spawn(async move {
            let tcp = tcp_from(attacker(i / 100), to).await.ok()?;
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .ok()?;
            let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            if i % 2 == 0 {
                // A DATA frame claiming 16 MiB on stream 1.
                bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1]);
                bytes.extend(std::iter::repeat_n(0xAB, 64 * 1024));
            } else {
                bytes.extend((0..4096u32).map(|x| (x * 7919 % 251) as u8));
            }
            let _ = tls.write_all(&bytes).await;
            let mut b = [0u8; 256];
            loop {
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    tokio::io::AsyncReadExt::read(&mut tls, &mut b),
                )
                .await
                {
                    Ok(Ok(0) | Err(_)) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
            Some(())
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    closed.load(Ordering::Relaxed) as usize
}

/// Runs `attack` against a fresh server while the legitimate caller signs; prints one row.
async fn scenario<F, Fut>(name: &str, attack: F)
where
    F: FnOnce(Arc<Server>) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    // `ABUSE_ONLY=<text>` runs only the scenarios whose name contains it.
    if let Ok(only) = std::env::var("ABUSE_ONLY")
        && !name.contains(&only)
    {
        return;
    }
    let srv = Arc::new(start());
    let pid = srv.child.id();
    // The legitimate caller alone first: its quiet p99 on this server, over ~180 answers (as many
    // as the longer attacks give it).
    let l = legit(&srv);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (_, q99, _, _) = l.finish().await;
    let idle = rss_mib(pid);
    let (stop, peak) = sampler(pid);
    let l = legit(&srv);
    let got = attack(srv.clone()).await;
    let (p50, p99, fail, n) = l.finish().await;
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(pid);
    let ready = ready(&srv).await;
    // The allocator returns freed pages on a decay timer (10 s): the level a while after.
    tokio::time::sleep(Duration::from_secs(28)).await;
    println!(
        "| {name} | {got} | {n} / {fail} | {p50:.2} / {p99:.2} ms ({:.1}× quiet {q99:.2}) | {idle:.1} / {peak:.1} / {after:.1} / {:.1} MiB | {ready} |",
        p99 / q99,
        rss_mib(pid),
    );
}

/// Puts the calling thread in the `SCHED_IDLE` class: it runs only on CPU that no normal thread
/// wants, and yields a core at once to a normal thread that wakes — the closest this one host
/// comes to attackers on other machines.
fn idle_this_thread() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
    .unwrap();
}

/// The attackers' runtime. Its threads run `ABUSE_ATTACKER_NICE` (default 10) nice steps below
/// this program, standing in for attackers on other machines: on one 2-core host the attackers'
/// own TLS and HTTP/2 work otherwise takes CPU from the legitimate caller's thread and the server
/// alike, and the caller's p99 measures this host's scheduler. `ABUSE_ATTACKER_NICE=0` shares the
/// CPU equally; `ABUSE_ATTACKER_NICE=idle` puts them in `SCHED_IDLE` (figures for each are in
/// docs/benchmarks.md).
fn main() {
    let setting = std::env::var("ABUSE_ATTACKER_NICE").unwrap_or_else(|_| "10".into());
    let nice: Option<i32> = (setting != "idle").then(|| setting.parse().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || match nice {
            Some(n) => ca_server::lower_this_threads_priority(n).unwrap(),
            None => idle_this_thread(),
        })
        .build()
        .unwrap();
    println!("attackers at {setting} (ABUSE_ATTACKER_NICE)\n");
    rt.block_on(run());
}

async fn run() {
    rotator::client::install_crypto_provider();
    println!(
        "| scenario | what the attack got | legit requests / failed | legit p50 / p99 during it | RSS idle / peak / 2 s after / 30 s after | /readyz after |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    scenario(
        "1,000 silent TLS connections (8 addresses)",
        |srv| async move {
            let (opened, secs) = idle_tls(&srv, 1000, 125).await;
            format!("{opened} opened; the last closed by the server after {secs:.1} s")
        },
    )
    .await;
    scenario(
        "10,000 silent TLS connections (80 addresses)",
        |srv| async move {
            let (opened, secs) = idle_tls(&srv, 10_000, 125).await;
            format!("{opened} completed TLS; all closed after {secs:.1} s")
        },
    )
    .await;
    scenario(
        "20,000 credential-free watch streams over 4 connections",
        |srv| async move {
            let got = watch_flood(&srv, 20_000, 4, Duration::from_secs(5)).await;
            format!("{got} streams opened, {} refused", 20_000 - got)
        },
    )
    .await;
    scenario(
        "5 s of requests with random bearer tokens",
        |srv| async move {
            let (sent, refused) = random_tokens(&srv, 5).await;
            format!("{sent} sent, {refused} refused")
        },
    )
    .await;
    scenario(
        "2,000 stalled TLS handshakes (20 addresses)",
        |srv| async move {
            let secs = slow_handshakes(&srv, 2000).await;
            format!("all dropped by the server within {secs:.1} s")
        },
    )
    .await;
    scenario(
        "waves of 1,000 connections sending malformed or oversized HTTP/2",
        |srv| async move {
            // Twenty waves (`ABUSE_MALFORMED_WAVES`), so that the legitimate caller's p99 rests
            // on ~150 answers rather than on the slowest of ~40.
            let waves: usize = std::env::var("ABUSE_MALFORMED_WAVES")
                .ok()
                .map_or(20, |v| v.parse().unwrap());
            let mut closed = 0;
            for _ in 0..waves {
                closed += bad_frames(&srv, 1000).await;
            }
            format!("{closed} closed by the server")
        },
    )
    .await;
}
