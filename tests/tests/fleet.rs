//! The fleet simulation (issue #4, proof 2) at a size the suite can afford: 2,000 workloads, 12 of
//! them holding real certificates and verifying each other every virtual hour, through a full
//! rotation and through a double rollback. Expected failed verifications: 0. N = 100,000 is a
//! benchmark: `cargo run --release -p meshca-tests --example fleet -- 100000`.
#![allow(clippy::unwrap_used, reason = "tests")]

use meshca_tests::fleet::{Params, simulate};

fn params(rollback: bool) -> Params {
    Params {
        workloads: 2000,
        sampled: 12,
        watchers: 0.3,
        offline: 0.01,
        rollback,
        seed: 0x5eed_0004,
        gates_forced_open: false,
    }
}

#[test]
fn full_rotation_in_a_fleet_breaks_no_verification() {
    let r = simulate(&params(false));
    eprintln!("{r:#?}");
    assert_eq!(r.final_phase, "steady");
    assert_eq!(r.final_bundle, 1);
    let names: Vec<&str> = r
        .steps
        .iter()
        .map(|s| s.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(names, ["stage", "activate", "finish"]);
    assert!(r.verifications > 10_000, "{}", r.verifications);
    assert_eq!(r.failed, 0, "{:?}", r.first_failure);
}

#[test]
fn double_rollback_in_a_fleet_breaks_no_verification() {
    let r = simulate(&params(true));
    eprintln!("{r:#?}");
    assert_eq!(r.final_phase, "steady");
    assert_eq!(r.final_bundle, 1);
    let names: Vec<&str> = r
        .steps
        .iter()
        .map(|s| s.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(names, ["stage", "activate", "rollback", "rollback"]);
    assert!(r.verifications > 10_000, "{}", r.verifications);
    assert_eq!(r.failed, 0, "{:?}", r.first_failure);
}

#[test]
fn negative_control_with_gates_forced_open_verifications_fail() {
    let r = simulate(&Params {
        gates_forced_open: true,
        ..params(false)
    });
    eprintln!("{r:#?}");
    let names: Vec<&str> = r
        .steps
        .iter()
        .map(|s| s.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(names, ["stage", "activate", "finish"]);
    assert!(
        r.failed > 0,
        "activating and finishing at once must break verifications; the simulation cannot see it"
    );
}

/// The soak, 60 seconds (#15; 10 minutes in docs/benchmarks.md from `examples/soak.rs`): steady
/// issuance with watchers connected on a compressed policy, during which issuers rotate and the
/// trust anchor rotates at least twice by itself. Every answer verifies against the bundle it came
/// with, no request fails, no watch stream drops, and the server's RSS and open fds end within
/// 20 % (fds: a few) of their level after warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_load_through_rotations_leaks_nothing() {
    use meshca_tests::soak::{self, Soak};
    let s = Soak {
        server_bin: meshca_tests::bin("meshca-server"),
        duration: std::time::Duration::from_secs(60),
        rate: 200,
        watchers: 20,
        leaf_ttl: std::time::Duration::from_secs(4),
        anchor_ttl: std::time::Duration::from_secs(30),
        warm_up: std::time::Duration::from_secs(20),
        verify_every: 1,
    };
    let work = tempfile::tempdir().unwrap();
    let r = soak::run(&s, work.path()).await;
    eprintln!("{r:?}");
    assert_eq!(r.errors, 0, "{:?}", r.error_samples);
    assert!(r.issued >= 60 * 150, "{} issued", r.issued);
    assert_eq!(r.watchers_lost, 0);
    assert!(
        r.bundle_version >= 5,
        "two full anchor rotations: {}",
        r.bundle_version
    );
    assert!(
        r.pushes >= 20 * 4,
        "every watcher saw the rotations: {}",
        r.pushes
    );
    assert!(r.issuer_rotation_steps > 0);
    let (rss0, _, rss1) = r.rss(s.warm_up);
    assert!(
        rss1 * 10 <= rss0 * 12,
        "RSS {rss0} KiB after warm-up, {rss1} KiB at the end"
    );
    let (fd0, _, fd1) = r.fds(s.warm_up);
    assert!(
        fd1 <= fd0 + 4,
        "open fds {fd0} after warm-up, {fd1} at the end"
    );
}
