//! The soak (#15): `cargo build --release --bin meshca-server && cargo run --release -p
//! meshca-tests --example soak -- [DURATION] [RATE]` (default 10m at 4500/s, half the measured
//! maximum in docs/benchmarks.md). See `meshca_tests::soak`.

#![allow(clippy::unwrap_used)] // A benchmark program: a panic is how a broken setup is reported.

use std::time::Duration;

use meshca_tests::soak::{self, Soak};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let duration = args.next().map_or(Duration::from_secs(600), |a| {
        humantime::parse_duration(&a).unwrap()
    });
    let rate: u32 = args.next().map_or(4500, |a| a.parse().unwrap());
    let s = Soak {
        server_bin: "target/release/meshca-server".into(),
        duration,
        rate,
        watchers: 200,
        leaf_ttl: Duration::from_secs(20),
        anchor_ttl: Duration::from_secs(240),
        warm_up: Duration::from_secs(60),
        verify_every: 16,
    };
    println!("policy:\n{}", soak::config(&s));
    let work = tempfile::tempdir().unwrap();
    let r = soak::run(&s, work.path()).await;
    let (rs, rp, re) = r.rss(s.warm_up);
    let (fs, fp, fe) = r.fds(s.warm_up);
    println!(
        "{:?} at {rate}/s with {} watchers: {} issued ({} chains verified), {} errors {:?}; p50/p99/max {:.2}/{:.2}/{:.1} ms; \
         {} bundle pushes, {} watch streams lost; bundle version {} ({} anchor rotations), {} issuer rotation steps",
        duration,
        s.watchers,
        r.issued,
        r.verified,
        r.errors,
        r.error_samples,
        r.latency_ms.0,
        r.latency_ms.1,
        r.latency_ms.2,
        r.pushes,
        r.watchers_lost,
        r.bundle_version,
        r.bundle_version.saturating_sub(1) / 2,
        r.issuer_rotation_steps
    );
    println!(
        "RSS after warm-up / peak / end: {:.1} / {:.1} / {:.1} MiB (end {:+.0} %); open fds {fs} / {fp} / {fe}",
        rs as f64 / 1024.0,
        rp as f64 / 1024.0,
        re as f64 / 1024.0,
        (re as f64 / rs.max(1) as f64 - 1.0) * 100.0
    );
    for (t, rss, fds) in &r.samples {
        println!(
            "  t={t:>4}s rss={:>6.1} MiB fds={fds}",
            *rss as f64 / 1024.0
        );
    }
    // Where answers stalled, and what the server logged around it.
    for st in r.stalls() {
        println!(
            "stall: sent t={:.1}..{:.1}s, {} answers >= 250 ms, slowest {:.0} ms",
            st.sent.0, st.sent.1, st.answers, st.slowest_ms
        );
        for (t, l) in st.server_log {
            println!("    t={t:.1}s {l}");
        }
    }
}
