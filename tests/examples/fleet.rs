//! The fleet simulation as a benchmark: `cargo run --release -p meshca-tests --example fleet --
//! [WORKLOADS] [SAMPLED]` (default 100,000 and 24). Prints wall time, peak RSS and the report.
#![allow(clippy::unwrap_used, reason = "a benchmark binary")]

use std::time::Instant;

use meshca_tests::fleet::{Params, simulate};

fn rss_peak_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    rotator::client::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let workloads = args.get(1).map_or(100_000, |a| a.parse().unwrap());
    let sampled = args.get(2).map_or(24, |a| a.parse().unwrap());
    for rollback in [false, true] {
        let start = Instant::now();
        let r = simulate(&Params {
            workloads,
            sampled,
            watchers: 0.3,
            offline: 0.01,
            rollback,
            seed: 0x5eed_0004,
            gates_forced_open: false,
        });
        println!(
            "{} N={workloads} sampled={sampled}: wall {:.1} s, peak RSS {} MB, leaves {}, ledger peak {} records, \
             {} h simulated, verifications {} failed {}, steps {:?}",
            if rollback {
                "rollback x2"
            } else {
                "full rotation"
            },
            start.elapsed().as_secs_f64(),
            rss_peak_kb() / 1024,
            r.leaves,
            r.ledger_peak,
            r.hours,
            r.verifications,
            r.failed,
            r.steps
        );
        assert_eq!(r.failed, 0, "{:?}", r.first_failure);
    }
}
