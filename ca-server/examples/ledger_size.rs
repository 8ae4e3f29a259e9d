//! How big the issuance ledger gets: `cargo run --release -p meshca-server --example ledger_size
//! -- [LEAVES] [INSTANCES_PER_IDENTITY]` (defaults 100,000 and 1) records that many live leaves
//! (one per instance, realistic field sizes: 16-byte serials, pod-UID instance ids, SPIFFE IDs
//! like `spiffe://cluster.local/ns/team-7/sa/service-12345`, each shared by
//! `INSTANCES_PER_IDENTITY` instances: 1 is the worst case, every pod its own service account),
//! flushes as the server does, and prints the file size and the process's resident memory
//! growth per leaf, then closes the file and times a start-up replay of it.
#![allow(clippy::unwrap_used, reason = "a benchmark binary")]

use std::time::{Duration, Instant};

use ca_server::ledger::LedgerHandle;
use rotator::ledger::LeafRecord;
use rotator::pki::CertId;
use time::OffsetDateTime;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(100_000, |a| a.parse().unwrap());
    let per_identity: usize = args.next().map_or(1, |a| a.parse().unwrap()).max(1);
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let skew = Duration::from_secs(300);
    let before = rss_kb();
    let (l, _) = LedgerHandle::open(dir.path(), true, now, skew).unwrap();
    let start = Instant::now();
    for i in 0..n {
        let service = i / per_identity;
        l.record(LeafRecord {
            serial: format!(
                "{:032x}",
                (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835
            ),
            spiffe_id: format!(
                "spiffe://cluster.local/ns/team-{}/sa/service-{service}",
                service % 50
            ),
            instance: format!("5f0c8e1a-3b7d-4c2e-9a1f-{i:012x}"),
            anchor: CertId::of(b"anchor"),
            issued: now.unix_timestamp(),
            not_after: (now + Duration::from_secs(86400)).unix_timestamp(),
            bundle_version: 7,
            via: None,
            issuer: Some(CertId::of(b"issuer")),
            api: rotator::ledger::Api::Meshca,
        });
        // The server flushes every 500 ms; at 10,000 leaves/s that is batches of 5,000.
        if i % 5_000 == 4_999 {
            l.flush(now, skew).unwrap();
        }
    }
    let record_time = start.elapsed();
    let t = Instant::now();
    l.flush(now, skew).unwrap();
    let flush_time = t.elapsed();
    let grown = rss_kb().saturating_sub(before);
    let size = std::fs::metadata(l.path()).unwrap().len();
    let t = Instant::now();
    let s = l.summary(now, Duration::from_secs(48 * 3600), skew, 7);
    let summary_time = t.elapsed();
    let identities = l.with(|l| l.identities());
    l.close(now, skew).unwrap();
    drop(l);
    let t = Instant::now();
    let (again, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
    let replay_time = t.elapsed();
    assert_eq!(again.len(), n, "{loaded:?}");
    println!(
        "{n} live leaves, {identities} identities: file {:.1} MB ({:.0} B/leaf), memory +{:.1} MB \
         ({:.0} B/leaf), record {:.0} ns/leaf, flush {:.0} ms, gate summary {:.1} ms \
         ({} live workloads), replay at start {:.2} s",
        size as f64 / 1e6,
        size as f64 / n as f64,
        grown as f64 / 1024.0,
        grown as f64 * 1024.0 / n as f64,
        record_time.as_nanos() as f64 / n as f64,
        flush_time.as_secs_f64() * 1e3,
        summary_time.as_secs_f64() * 1e3,
        s.live_workloads,
        replay_time.as_secs_f64(),
    );
}
