//! The soak (#15): a `meshca-server` child process under steady open-loop issuance with watchers
//! connected, on a compressed policy so that issuer rotations and full trust-anchor rotations
//! (automated: `auto_stage_before`, `auto_advance`) happen during the run. Every answer is checked
//! (its chain verifies against the bundle it came with); the server's RSS and open file
//! descriptors are sampled from /proc. Used by `examples/soak.rs` (10 minutes, figures in
//! docs/benchmarks.md) and by a 60-second run in `tests/tests/fleet.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use meshca_proto::v1::{SignCertificateRequest, WatchTrustBundleRequest};
use rotator::client::{channel, client_tls, make_csr, read_pem_certs, verify_svid};
use rotator::pki::SecretKey;
use rustls_pki_types::{CertificateDer, UnixTime};

/// How to soak.
#[derive(Debug, Clone)]
pub struct Soak {
    /// The server binary.
    pub server_bin: PathBuf,
    /// How long.
    pub duration: Duration,
    /// Requests per second, open loop.
    pub rate: u32,
    /// `WatchTrustBundle` streams held open.
    pub watchers: usize,
    /// Leaf lifetime (max); the rest of the policy is derived so that rotations happen.
    pub leaf_ttl: Duration,
    /// Trust-anchor lifetime: an automated rotation starts when it has half left.
    pub anchor_ttl: Duration,
    /// The sample taken after this long is the warm-up level RSS and fds are compared with.
    pub warm_up: Duration,
    /// Every n-th answer's chain is verified (1: all); every answer's status is checked. The
    /// verification runs on the same 2 cores as the server, so at thousands per second a sample.
    pub verify_every: u64,
}

/// What a soak measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Certificates issued (answered OK).
    pub issued: u64,
    /// Of which had their chain verified.
    pub verified: u64,
    /// Failed requests or answers that did not verify.
    pub errors: u64,
    /// The first few errors.
    pub error_samples: Vec<String>,
    /// Bundle pushes the watchers received.
    pub pushes: u64,
    /// Watch streams that ended (they should not).
    pub watchers_lost: u64,
    /// (seconds since start, RSS KiB, open fds) every 5 s.
    pub samples: Vec<(u64, u64, u64)>,
    /// `meshca_bundle_version` at the end (each anchor rotation adds 2).
    pub bundle_version: u64,
    /// `meshca_issuer_rotations_total{result="success"}` at the end.
    pub issuer_rotation_steps: u64,
    /// p50 / p99 / max latency, ms.
    pub latency_ms: (f64, f64, f64),
    /// Answers that took 250 ms or more: (seconds since the start when sent, ms taken).
    pub slow: Vec<(f64, f64)>,
    /// The server's log lines at info (audit lines excepted): (seconds since the start, line).
    pub server_log: Vec<(f64, String)>,
}

/// Slow answers sent within 2 s of each other.
#[derive(Debug, Clone)]
pub struct Stall<'a> {
    /// When the first and the last were sent (seconds since the start).
    pub sent: (f64, f64),
    /// How many.
    pub answers: usize,
    /// The slowest, ms.
    pub slowest_ms: f64,
    /// The server's log lines from 5 s before to the end of it.
    pub server_log: Vec<&'a (f64, String)>,
}

impl Report {
    /// The slow answers grouped into stalls, with what the server logged around each.
    pub fn stalls(&self) -> Vec<Stall<'_>> {
        let mut slow = self.slow.clone();
        slow.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut stalls: Vec<Stall<'_>> = Vec::new();
        for (t, ms) in slow {
            match stalls.last_mut() {
                Some(s) if t - s.sent.1 < 2.0 => {
                    s.sent.1 = t;
                    s.answers += 1;
                    s.slowest_ms = s.slowest_ms.max(ms);
                }
                _ => stalls.push(Stall {
                    sent: (t, t),
                    answers: 1,
                    slowest_ms: ms,
                    server_log: Vec::new(),
                }),
            }
        }
        for s in &mut stalls {
            let (from, to) = (s.sent.0 - 5.0, s.sent.1 + s.slowest_ms / 1000.0);
            s.server_log = self
                .server_log
                .iter()
                .filter(|(t, _)| (from..=to).contains(t))
                .collect();
        }
        stalls
    }

    /// RSS (KiB) at warm-up, peak, end.
    pub fn rss(&self, warm_up: Duration) -> (u64, u64, u64) {
        self.level(warm_up, |s| s.1)
    }

    /// Open fds at warm-up, peak, end.
    pub fn fds(&self, warm_up: Duration) -> (u64, u64, u64) {
        self.level(warm_up, |s| s.2)
    }

    fn level(&self, warm_up: Duration, f: impl Fn(&(u64, u64, u64)) -> u64) -> (u64, u64, u64) {
        let start = self
            .samples
            .iter()
            .find(|s| s.0 >= warm_up.as_secs())
            .map_or(0, &f);
        let peak = self.samples.iter().map(&f).max().unwrap_or(0);
        let end = self.samples.last().map_or(0, &f);
        (start, peak, end)
    }
}

fn proc_sample(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The server's configuration for a soak: the compressed policy, automated anchor rotation, and
/// the per-caller caps lifted: one token issues everything here (exactly what `issue_rate` exists
/// to stop), and every watcher comes from 127.0.0.1, standing in for many peers
/// (`watch_per_peer`).
pub fn config(s: &Soak) -> String {
    let leaf = s.leaf_ttl.as_secs().max(4);
    let skew = 1;
    let propagation = leaf / 2;
    // Issuers live 3 leaf lifetimes (activated with one left), anchors `anchor_ttl`; a rotation
    // starts with half of it left (≥ 2 × leaf + propagation + skew, as the policy requires).
    let issuer = 3 * leaf;
    let anchor = s.anchor_ttl.as_secs();
    let stage_before = (anchor / 2).max(2 * leaf + propagation + skew + 1);
    format!(
        "[policy]\nleaf_ttl_default = \"{leaf}s\"\nleaf_ttl_min = \"1s\"\nleaf_ttl_max = \"{leaf}s\"\n\
         clock_skew = \"{skew}s\"\nissuer_ttl = \"{issuer}s\"\nanchor_ttl = \"{anchor}s\"\n\
         propagation_allowance = \"{propagation}s\"\n\n\
         [anchor]\nauto_stage_before = \"{stage_before}s\"\nauto_advance = true\n\n\
         [limits]\nissue_rate = 1000000\nissue_burst = 1000000\nledger_instances_per_identity = 0\n\
         watch_per_peer = 0\n"
    )
}

/// Runs a soak; `work` holds the state dir and config.
pub async fn run(s: &Soak, work: &Path) -> Report {
    let cfg = work.join("soak.toml");
    std::fs::write(&cfg, config(s)).expect("write config");
    let state = work.join("state");
    let cfg_s = cfg.display().to_string();
    let mut server = crate::ServerProcess::spawn_as(
        &[s.server_bin.clone().into()],
        &state,
        &["--config", &cfg_s],
        // Rotation events, not one audit line per certificate.
        &[("MESHCA_LOG", "info,meshca::audit=warn")],
    )
    .expect("the soak server starts");
    let pid = server.child.id();
    let started = Instant::now();
    let server_log = capture_log(&mut server, started);
    let bundle = read_pem_certs(&state.join("bundle.pem").display().to_string()).expect("bundle");
    let token = std::fs::read_to_string(state.join("bootstrap-token")).expect("token");
    let auth: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().expect("header");
    // The server's own TLS certificate is re-issued as issuers and anchors rotate; channels made
    // now keep their connection, and the client trusts every anchor it has seen (the bundle the
    // watchers push is added).
    let tls = client_tls(&bundle, None).expect("tls");
    let channels: Vec<_> = (0..4)
        .map(|_| channel(&server.url, tls.clone()).expect("channel"))
        .collect();
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + s.duration;
    let watch_tasks = spawn_watchers(s.watchers, &channels, &auth, &tally, deadline);
    let sampler = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        while Instant::now() < deadline {
            tick.tick().await;
            let (rss, fds) = proc_sample(pid);
            out.push((started.elapsed().as_secs(), rss, fds));
        }
        out
    });
    let in_flight = issue_open_loop(s, &channels, &auth, &tally, started, deadline).await;
    // Let the last requests finish.
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.acquire_many(4096)).await;
    let samples = sampler.await.unwrap_or_default();
    let (_, metrics) = crate::http_get(server.http, "/metrics").await;
    for t in watch_tasks {
        t.abort();
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
    let log = std::mem::take(&mut *server_log.lock().unwrap_or_else(|p| p.into_inner()));
    tally.report(samples, &metrics, log)
}

/// Everything the soak counts, shared by its tasks.
#[derive(Debug, Default)]
struct Tally {
    issued: AtomicU64,
    verified: AtomicU64,
    errors: AtomicU64,
    pushes: AtomicU64,
    lost: AtomicU64,
    samples_err: std::sync::Mutex<Vec<String>>,
    latencies: std::sync::Mutex<Vec<u32>>,
    slow: std::sync::Mutex<Vec<(f64, f64)>>,
}

impl Tally {
    /// A failed request, its reason kept among the first ten.
    fn error(&self, why: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples_err.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < 10 {
            s.push(why);
        }
    }

    fn report(
        &self,
        samples: Vec<(u64, u64, u64)>,
        metrics: &str,
        server_log: Vec<(f64, String)>,
    ) -> Report {
        let mut lat =
            std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |v| f64::from(*v) / 1000.0)
        };
        Report {
            issued: self.issued.load(Ordering::Relaxed),
            verified: self.verified.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            error_samples: self
                .samples_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            pushes: self.pushes.load(Ordering::Relaxed),
            watchers_lost: self.lost.load(Ordering::Relaxed),
            samples,
            bundle_version: metric(metrics, "meshca_bundle_version "),
            issuer_rotation_steps: metric(
                metrics,
                "meshca_issuer_rotations_total{result=\"success\"} ",
            ),
            latency_ms: (pct(0.5), pct(0.99), pct(1.0)),
            slow: std::mem::take(&mut *self.slow.lock().unwrap_or_else(|p| p.into_inner())),
            server_log,
        }
    }
}

/// The server's stderr, line by line with the second it came (the first 100,000 lines).
fn capture_log(
    server: &mut crate::ServerProcess,
    started: Instant,
) -> Arc<std::sync::Mutex<Vec<(f64, String)>>> {
    let server_log = Arc::new(std::sync::Mutex::new(Vec::<(f64, String)>::new()));
    if let Some(stderr) = server.child.stderr.take() {
        let log = server_log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                if l.len() < 100_000 {
                    l.push((started.elapsed().as_secs_f64(), line));
                }
            }
        });
    }
    server_log
}

/// Watchers: authenticated streams, spread over the channels; a stream that ends before the
/// deadline is lost.
fn spawn_watchers(
    watchers: usize,
    channels: &[tonic::transport::Channel],
    auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tally: &Arc<Tally>,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..watchers)
        .map(|w| {
            let mut c = IdentityServiceClient::new(channels[w % channels.len()].clone());
            let (tally, auth) = (tally.clone(), auth.clone());
            tokio::spawn(async move {
                let mut req = tonic::Request::new(WatchTrustBundleRequest {
                    instance_id: format!("watcher-{w}"),
                });
                req.metadata_mut().insert("authorization", auth);
                let Ok(resp) = c.watch_trust_bundle(req).await else {
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {
                            tally.pushes.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            if Instant::now() < deadline {
                                tally.lost.fetch_add(1, Ordering::Relaxed);
                            }
                            return;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Open-loop issuance until the deadline: one request every 1/rate s, each on its own task;
/// identities and instances from a pool, as a fleet of workloads renewing. Returns the
/// semaphore of requests in flight (at most 4,096; over it, counted as errors).
async fn issue_open_loop(
    s: &Soak,
    channels: &[tonic::transport::Channel],
    auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tally: &Arc<Tally>,
    started: Instant,
    deadline: Instant,
) -> Arc<tokio::sync::Semaphore> {
    let ids: Arc<Vec<(rotator::spiffe::SpiffeId, Vec<u8>)>> = Arc::new(
        (0..64)
            .map(|i| {
                let id: rotator::spiffe::SpiffeId =
                    format!("spiffe://cluster.local/ns/default/sa/soak-{i}")
                        .parse()
                        .expect("id");
                let csr = make_csr(&id, &SecretKey::generate_p256().expect("key")).expect("csr");
                (id, csr)
            })
            .collect(),
    );
    let interval = Duration::from_secs_f64(1.0 / f64::from(s.rate.max(1)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    while Instant::now() < deadline {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // The server is not keeping up: 4,096 requests already wait for an answer.
            tally.error("backlog: 4,096 requests in flight".into());
            continue;
        };
        let verify = n.is_multiple_of(s.verify_every.max(1));
        let c = IdentityServiceClient::new(channels[(n % 4) as usize].clone());
        let (tally, auth, ids) = (tally.clone(), auth.clone(), ids.clone());
        let k = (n % 64) as usize;
        let instance = format!("pod-{}", n % 512);
        n += 1;
        tokio::spawn(async move {
            let _permit = permit;
            sign_one(c, &ids[k], instance, auth, verify, &tally, started).await;
        });
    }
    in_flight
}

/// One request, timed (slow ones kept), its answer checked when `verify`.
async fn sign_one(
    mut c: IdentityServiceClient<tonic::transport::Channel>,
    (want, csr): &(rotator::spiffe::SpiffeId, Vec<u8>),
    instance: String,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    verify: bool,
    tally: &Tally,
    started: Instant,
) {
    let t0 = Instant::now();
    let mut req = tonic::Request::new(SignCertificateRequest {
        csr: csr.clone(),
        ttl: None,
        instance_id: instance,
    });
    req.metadata_mut().insert("authorization", auth);
    let r = c.sign_certificate(req).await;
    let took = t0.elapsed();
    if took >= Duration::from_millis(250) {
        let mut s = tally.slow.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < 100_000 {
            s.push((
                t0.duration_since(started).as_secs_f64(),
                took.as_secs_f64() * 1000.0,
            ));
        }
    }
    let why = match r {
        Ok(_) if !verify => None,
        Ok(resp) => {
            let r = resp.into_inner();
            let chain: Vec<CertificateDer<'static>> = r
                .certificate_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            let bundle: Vec<CertificateDer<'static>> = r
                .trust_bundle
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            match verify_svid(
                &chain,
                &bundle,
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            ) {
                Ok(got) if &got == want => None,
                Ok(got) => Some(format!("issued {got}, asked {want}")),
                Err(e) => Some(format!("does not verify: {e}")),
            }
        }
        Err(st) => Some(format!("{:?}: {}", st.code(), st.message())),
    };
    match why {
        None => {
            tally.issued.fetch_add(1, Ordering::Relaxed);
            if verify {
                tally.verified.fetch_add(1, Ordering::Relaxed);
            }
            tally
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        }
        Some(w) => tally.error(w),
    }
}
