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
