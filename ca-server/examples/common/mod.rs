//! What the benchmark binaries share: the server child process, and reading its CPU and memory.
#![allow(dead_code, reason = "each example uses its part")]

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// CPU seconds (user + system) used so far by `pid` ("self" for this process).
pub fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name; 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The server child process; killed when dropped.
pub struct Child {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_server(mut cmd: std::process::Command) -> Child {
    use std::io::{BufRead, BufReader};
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd
        .spawn()
        .expect("start meshca-server (build it with cargo build --release first)");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        banner.push_str(&l);
        banner.push('\n');
        if l.starts_with("Issue a certificate") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let field = |p: &str| {
        banner
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(p)
                    .map(|r| r.split_whitespace().next().unwrap().to_owned())
            })
            .unwrap()
    };
    let url = field("gRPC (TLS)");
    Child { child, url }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `[limits]` for a benchmark where one credential asks for every certificate, at thousands per
/// second, for one SPIFFE ID: exactly what `issue_rate` and `ledger_instances_per_identity` exist
/// to stop. They are lifted (every other limit stays at its default), so a run measures what the
/// limit checks cost, not the limits doing their job.
pub const LIFTED_LIMITS: &str =
    "[limits]\nissue_rate = 1000000\nissue_burst = 1000000\nledger_instances_per_identity = 0\n";

/// Starts `bin` on `state` (loopback ports chosen by the kernel), with `config` written beside
/// the state dir when given.
pub fn start_server(bin: &std::path::Path, state: &std::path::Path, config: Option<&str>) -> Child {
    let mut cmd = std::process::Command::new(bin);
    if let Some(c) = config {
        let path = state.with_extension("toml");
        std::fs::write(&path, c).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.arg("--state-dir").arg(state).args([
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    spawn_server(cmd)
}
