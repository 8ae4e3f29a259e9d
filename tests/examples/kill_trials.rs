//! kill -9 trials (#15): `cargo run --release -p meshca-tests --example kill_trials -- [N] [SEED]`
//! runs N trials (default 100) on the file store, then N on a Kubernetes Secret (the in-test API
//! server): start `meshca-server`, drive issuance load and a random rotation step through the
//! `meshca` CLI, SIGKILL at a random moment, restart, check (see `meshca_tests::trials`). Needs
//! the release binaries: `cargo build --release --bins` first.

#![allow(clippy::unwrap_used)] // A benchmark program: a panic is how a broken setup is reported.

use std::sync::Arc;

use meshca_tests::kubeapi::KubeApi;
use meshca_tests::trials::{self, Backend};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(100, |a| a.parse().unwrap());
    let seed: u64 = args.next().map_or(1, |a| a.parse().unwrap());
    let fake = KubeApi::start().await;
    let work = tempfile::tempdir().unwrap();
    for (name, backend) in [
        ("file store", Backend::Files),
        (
            "Kubernetes Secret",
            Backend::Secret {
                api_url: fake.url.clone(),
                read: {
                    let f = fake.clone();
                    Arc::new(move |name: &str| f.secret_data("meshca", name))
                },
            },
        ),
    ] {
        let w = work.path().join(name.replace(' ', "-"));
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            trials::run(n, seed, &backend, &w, &|i| {
                if i % 10 == 0 {
                    eprintln!("  {i}/{n}");
                }
            })
        })
        .await
        .unwrap();
        println!(
            "{name}: {} trials in {:.0?}, {} inconsistent; {} killed mid-step, {} rotation steps committed before the kills \
             (in {} trials), {} certificates issued before the kills, {} restarts said their ledger was incomplete",
            report.trials,
            started.elapsed(),
            report.inconsistent.len(),
            report.killed_mid_step,
            report.steps_total,
            report.steps_committed,
            report.issued_before_kill,
            report.ledger_incomplete
        );
        for (seq, count) in &report.sequences {
            println!("  {count:>3} × {seq}");
        }
        for i in &report.inconsistent {
            println!("  INCONSISTENT: {i}");
        }
    }
}
