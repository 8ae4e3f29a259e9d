//! kill -9 trials (#15): start the real `meshca-server`, drive issuance load and a random rotation
//! step through the real `meshca` CLI, SIGKILL the server at a random moment, restart it on the
//! same state, and check that nothing committed was lost and nothing is half-done. Used by
//! `examples/kill_trials.rs` (100 trials, figures in docs/benchmarks.md) and by a short run in
//! `tests/tests/crash.rs`.
//!
//! The state is either the state dir (file store) or a Kubernetes Secret on the in-test API
//! server ([`crate::kubeapi::KubeApi`], which must be served by a runtime that outlives the run).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rotator::state::AuthorityState;
use rotator::store::FileStore;

use crate::{ServerProcess, bin};

/// The rotation cycles a trial repeats, each step forced past its gate, until it is killed: every
/// cycle ends in the phase it started from, so it can run again at once.
pub const CYCLES: [&[&str]; 4] = [
    &["issuer rotate"],
    &["anchors stage", "anchors rollback"],
    &["anchors stage", "anchors activate", "anchors finish"],
    &[
        "anchors stage",
        "anchors activate",
        "anchors rollback",
        "anchors rollback",
    ],
];

/// Reads a Secret's `data` (decoded) from the fake API server, by name.
pub type ReadSecret = Arc<dyn Fn(&str) -> Option<BTreeMap<String, Vec<u8>>> + Send + Sync>;

/// Where a trial's authority state lives.
#[derive(Clone)]
pub enum Backend {
    /// The state dir (the embedded default).
    Files,
    /// A Secret on the in-test API server at this URL.
    Secret {
        /// The fake API server's URL.
        api_url: String,
        /// Reads a Secret's `data` from the fake API server.
        read: ReadSecret,
    },
}

/// What the trials found.
#[derive(Debug, Default)]
pub struct Report {
    /// Trials run.
    pub trials: usize,
    /// By rotation cycle: how many trials ran it.
    pub sequences: BTreeMap<String, usize>,
    /// Rotation steps committed before the kills, in all.
    pub steps_total: usize,
    /// Trials in which at least one rotation step had committed before the kill.
    pub steps_committed: usize,
    /// Trials killed while a rotation step was running (its CLI call failed: the server died
    /// under it).
    pub killed_mid_step: usize,
    /// Certificates issued by the load before the kills, in all.
    pub issued_before_kill: u64,
    /// Restarts whose ledger said it was incomplete (an unclosed ledger after SIGKILL).
    pub ledger_incomplete: usize,
    /// Every inconsistency found: trial number and what.
    pub inconsistent: Vec<String>,
}

/// A small deterministic generator (xorshift64*): trials are reproducible from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn meshca(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(bin("meshca"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run meshca")
}

/// Runs `n` trials from `seed` in `work` (each in its own directory), calling `progress` after
/// each with its number.
pub fn run(
    n: usize,
    seed: u64,
    backend: &Backend,
    work: &Path,
    progress: &dyn Fn(usize),
) -> Report {
    let mut rng = Rng(seed | 1);
    let mut report = Report::default();
    for t in 0..n {
        let seq = CYCLES[usize::try_from(rng.below(CYCLES.len() as u64)).unwrap_or(0)];
        let kill_after = Duration::from_millis(rng.below(400));
        *report.sequences.entry(seq.join(" → ")).or_default() += 1;
        if let Err(e) = trial(t, seq, kill_after, backend, work, &mut report) {
            report
                .inconsistent
                .push(format!("trial {t} ({}): {e}", seq.join(" → ")));
        }
        report.trials += 1;
        progress(t + 1);
    }
    report
}

fn trial(
    t: usize,
    seq: &[&str],
    kill_after: Duration,
    backend: &Backend,
    work: &Path,
    report: &mut Report,
) -> Result<(), String> {
    let base = work.join(format!("trial-{t}"));
    let dir = base.join("state");
    let out = base.join("out");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let secret = format!("meshca-authority-{t}");
    let extra = server_args(backend, &base, t, &secret)?;
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = ServerProcess::spawn(&dir, &extra, &[])
        .map_err(|r| format!("first start: {}", r.stderr))?;
    let d = dir.display().to_string();
    let url = server.url.clone();
    let start_gen = committed_generation(backend, &dir, &secret)
        .ok_or("no committed state after the first start")?;

    // Load: certificates issued with the bootstrap token until the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let load = spawn_load(&stop, &issued, &url, &d, &out);
    // The rotation steps, in order, each forced past its gate; the generation committed after
    // each step that reported success.
    let done = Arc::new(Mutex::new((0usize, start_gen, false)));
    let steps = spawn_steps(&done, &d, seq, &dir, backend, &secret, &stop);
    std::thread::sleep(kill_after);
    server.kill();
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let _ = steps.join();
    report.issued_before_kill += issued.load(Ordering::Relaxed);
    let (steps_ok, committed_gen, failed) = *done.lock().unwrap_or_else(|p| p.into_inner());
    report.steps_total += steps_ok;
    if steps_ok > 0 {
        report.steps_committed += 1;
    }
    if failed {
        report.killed_mid_step += 1;
    }

    // Restart on the same state and check everything.
    let again =
        ServerProcess::spawn(&dir, &extra, &[]).map_err(|r| format!("no restart: {}", r.stderr))?;
    check_restarted(
        backend,
        &dir,
        &secret,
        committed_gen,
        &base,
        &out,
        &again.url,
        report,
    )?;
    again.kill();
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// The server's extra arguments: on the Secret backend, a config naming this trial's Secret and
/// Lease.
fn server_args(
    backend: &Backend,
    base: &Path,
    t: usize,
    secret: &str,
) -> Result<Vec<String>, String> {
    Ok(match backend {
        Backend::Files => Vec::new(),
        Backend::Secret { api_url, .. } => {
            let cfg = base.join("meshca.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[kubernetes]\nenabled = true\napi_url = \"{api_url}\"\nnamespace = \"meshca\"\n\
                     state_secret = \"{secret}\"\nlease = \"meshca-rotation-{t}\"\nidentity = \"trial-{t}\"\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            vec!["--config".into(), cfg.display().to_string()]
        }
    })
}

/// Load: certificates issued with the bootstrap token until `stop`, counted in `issued`.
fn spawn_load(
    stop: &Arc<AtomicBool>,
    issued: &Arc<AtomicU64>,
    url: &str,
    d: &str,
    out: &Path,
) -> std::thread::JoinHandle<()> {
    let (stop, issued, url, d, out) = (
        stop.clone(),
        issued.clone(),
        url.to_owned(),
        d.to_owned(),
        out.to_owned(),
    );
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let o = meshca(
                &[
                    "issue",
                    "--server",
                    &url,
                    "--ca-bundle",
                    &format!("{d}/bundle.pem"),
                    "--token-file",
                    &format!("{d}/bootstrap-token"),
                    "--spiffe-id",
                    &format!("spiffe://cluster.local/ns/default/sa/w{}", i % 8),
                    "--instance-id",
                    &format!("pod-{}", i % 8),
                    "--out",
                    &format!("w{}", i % 8),
                ],
                &out,
            );
            if o.status.success() {
                issued.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
    })
}

/// The rotation steps, in order, each forced past its gate, until `stop` or a step fails;
/// `done` holds (steps that succeeded, the generation committed after them, whether one failed).
#[allow(clippy::type_complexity, reason = "one shared tuple")]
fn spawn_steps(
    done: &Arc<Mutex<(usize, u64, bool)>>,
    d: &str,
    seq: &[&str],
    dir: &Path,
    backend: &Backend,
    secret: &str,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (done, d, seq) = (
        done.clone(),
        d.to_owned(),
        seq.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    );
    let dir = dir.to_owned();
    let backend = backend.clone();
    let secret = secret.to_owned();
    let stop = stop.clone();
    std::thread::spawn(move || {
        for step in seq.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let mut args: Vec<&str> = step.split(' ').collect();
            args.extend(["--state-dir", &d]);
            if step.starts_with("anchors") && step != "anchors stage" {
                args.push("--force");
            }
            let o = meshca(&args, dir.parent().unwrap_or(&dir));
            if !o.status.success() {
                done.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
                return;
            }
            let g = committed_generation(&backend, &dir, &secret);
            let mut dn = done.lock().unwrap_or_else(|p| p.into_inner());
            dn.0 += 1;
            dn.1 = dn.1.max(g.unwrap_or(0));
        }
    })
}

/// After the restart: the state loads, is consistent, lost no reported commit; `bundle.pem`
/// is the state's bundle; status speaks of the ledger; issuance works.
#[allow(clippy::too_many_arguments, reason = "a trial's facts")]
fn check_restarted(
    backend: &Backend,
    dir: &Path,
    secret: &str,
    committed_gen: u64,
    base: &Path,
    out: &Path,
    url: &str,
    report: &mut Report,
) -> Result<(), String> {
    let d = dir.display().to_string();
    let state: AuthorityState = match backend {
        Backend::Files => FileStore::read_only(dir)
            .load_sync()
            .map_err(|e| format!("state does not load: {e}"))?
            .ok_or("state is gone")?,
        Backend::Secret { read, .. } => {
            let data = read(secret).ok_or("the Secret is gone")?;
            rotator::store::decode_flat(secret, &data)
                .map_err(|e| format!("Secret does not decode: {e}"))?
                .ok_or("the Secret holds no state")?
        }
    };
    // Keys present and matching their certificates: `load_sync`/`decode_flat` read every key the
    // state names and `check` verifies each matches its certificate and chains.
    state
        .check()
        .map_err(|e| format!("inconsistent state: {e}"))?;
    if state.generation < committed_gen {
        return Err(format!(
            "lost a commit: generation {} after restart, {committed_gen} was reported committed",
            state.generation
        ));
    }
    let bundle: String = state.bundle().map(|a| a.cert.pem()).collect();
    let on_disk = std::fs::read_to_string(dir.join("bundle.pem")).map_err(|e| e.to_string())?;
    if on_disk != bundle {
        return Err("bundle.pem is not the state's bundle".into());
    }
    let status = meshca(&["--output", "json", "status", "--state-dir", &d], base);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)
        .map_err(|e| format!("status: {e}: {}", String::from_utf8_lossy(&status.stderr)))?;
    match doc["anchor_rotation"]["ledger"]["trustworthy"].as_bool() {
        Some(false) => report.ledger_incomplete += 1,
        Some(true) => {}
        None => return Err("status says nothing of the ledger".into()),
    }
    // Issuance works, and verifies against the bundle.
    let o = meshca(
        &[
            "issue",
            "--server",
            url,
            "--ca-bundle",
            &format!("{d}/bundle.pem"),
            "--token-file",
            &format!("{d}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/after",
            "--out",
            "after",
        ],
        out,
    );
    if !o.status.success() {
        return Err(format!(
            "no issuance after restart: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// The generation the store holds now: `state.json` in `dir`, or the Secret `secret`.
fn committed_generation(backend: &Backend, dir: &Path, secret: &str) -> Option<u64> {
    match backend {
        Backend::Files => FileStore::read_only(dir)
            .load_sync()
            .ok()
            .flatten()
            .map(|s| s.generation),
        Backend::Secret { read, .. } => {
            read(secret).and_then(|d| rotator::store::flat_generation(&d))
        }
    }
}
