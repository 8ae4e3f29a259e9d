//! `meshca-server`: runs a meshca certificate authority. With no flags it serves the embedded
//! default: state in `./meshca-data`, trust domain `cluster.local`, gRPC on 127.0.0.1:8443,
//! HTTP on 127.0.0.1:9090.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ca_server::config::{Config, ENV_STATE_DIR, LogFormat};
use ca_server::server::Server;
use clap::Parser;
use rotator::clock::SystemClock;
use rotator::spiffe::TrustDomain;

/// jemalloc, with its background thread purging freed pages on a decay timer (10 s by default):
/// after a burst of connections the server's RSS returns near idle, where glibc's malloc keeps
/// the peak (measured in docs/benchmarks.md, "Abuse"). `MALLOC_CONF`-style tuning goes through
/// `_RJEM_MALLOC_CONF` (this build prefixes jemalloc's symbols).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "meshca-server",
    version,
    about = "A certificate authority for service meshes"
)]
struct Args {
    /// TOML file with any of the settings (see docs/configuration.md); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (anchors, issuers, tokens, bundle).
    #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// SPIFFE trust domain [default for a new authority: cluster.local].
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", value_name = "DOMAIN")]
    trust_domain: Option<TrustDomain>,
    /// Upstream mode: the trust anchor certificate (PEM) whose key lives elsewhere (an HSM, a
    /// vault, an offline laptop). meshca never holds that key; issuers are imported.
    #[arg(long, env = "MESHCA_ANCHOR_CERT", value_name = "FILE")]
    anchor_cert: Option<PathBuf>,
    /// gRPC (TLS) listen address [default: 127.0.0.1:8443].
    #[arg(long, env = "MESHCA_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// HTTP listen address for /healthz, /readyz, /metrics, /bundle.pem [default: 127.0.0.1:9090].
    #[arg(long, env = "MESHCA_HTTP_LISTEN", value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// How long a new authority's bootstrap token is accepted, e.g. 24h; 0s: until revoked
    /// [default: 24h].
    #[arg(long, env = "MESHCA_BOOTSTRAP_TOKEN_TTL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    bootstrap_token_ttl: Option<std::time::Duration>,
    /// Log format [default: text].
    #[arg(long, env = "MESHCA_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Set one of `[limits]`, e.g. `--limit max_connections=4096` (repeatable; also
    /// `MESHCA_LIMITS_<NAME>=VALUE`; see docs/configuration.md, Limits).
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// A ServiceAccount (`namespace/name`) trusted as a node agent: Istio ambient's ztunnel,
    /// `istio-system/ztunnel` (repeatable; comma-separated in the variable). Replaces
    /// `[istio] trusted_node_agents`.
    #[arg(
        long = "istio-trusted-node-agent",
        env = "MESHCA_ISTIO_TRUSTED_NODE_AGENTS",
        value_delimiter = ',',
        value_name = "NS/SA"
    )]
    istio_trusted_node_agents: Option<Vec<String>>,
    /// Where anchor and issuer keys live: `file` (the state) or `pkcs11` (a token) [default: file].
    #[arg(long, env = "MESHCA_KEYS_BACKEND", value_enum)]
    key_backend: Option<KeyBackendArg>,
    /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "MESHCA_KEYS_PKCS11_MODULE", value_name = "FILE")]
    pkcs11_module: Option<PathBuf>,
    /// The label of the PKCS#11 token.
    #[arg(long, env = "MESHCA_KEYS_PKCS11_TOKEN_LABEL", value_name = "LABEL")]
    pkcs11_token_label: Option<String>,
    /// A file holding the token's user PIN.
    #[arg(long, env = "MESHCA_KEYS_PKCS11_PIN_FILE", value_name = "FILE")]
    pkcs11_pin_file: Option<PathBuf>,
    /// Serve the SPIFFE bundle endpoint (HTTPS) on this address, for federated trust domains
    /// (`[federation] bundle_endpoint_listen`; docs/federation.md).
    #[arg(
        long = "bundle-listen",
        env = "MESHCA_FEDERATION_BUNDLE_ENDPOINT_LISTEN",
        value_name = "ADDR"
    )]
    bundle_listen: Option<SocketAddr>,
    /// The bundle endpoint's profile: `https_spiffe` (an SVID meshca issues itself) or
    /// `https_web` (with --bundle-endpoint-cert/--bundle-endpoint-key) [default: https_spiffe].
    #[arg(
        long,
        env = "MESHCA_FEDERATION_BUNDLE_ENDPOINT_PROFILE",
        value_name = "PROFILE"
    )]
    bundle_endpoint_profile: Option<ca_server::federation::EndpointProfile>,
    /// `https_web`: the bundle endpoint's certificate chain (PEM).
    #[arg(
        long,
        env = "MESHCA_FEDERATION_BUNDLE_ENDPOINT_CERT",
        value_name = "FILE"
    )]
    bundle_endpoint_cert: Option<PathBuf>,
    /// `https_web`: the bundle endpoint's private key (PEM).
    #[arg(
        long,
        env = "MESHCA_FEDERATION_BUNDLE_ENDPOINT_KEY",
        value_name = "FILE"
    )]
    bundle_endpoint_key: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// `--key-backend`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeyBackendArg {
    File,
    Pkcs11,
}

impl Args {
    /// `[keys]` and `[federation]` from their flags (and variables).
    fn apply_keys_and_federation(&self, c: &mut Config) {
        if let Some(v) = self.key_backend {
            c.keys.backend = match v {
                KeyBackendArg::File => rotator::keys::Backend::File,
                KeyBackendArg::Pkcs11 => rotator::keys::Backend::Pkcs11,
            };
        }
        if let Some(v) = &self.pkcs11_module {
            c.keys.pkcs11_module.clone_from(v);
        }
        if let Some(v) = &self.pkcs11_token_label {
            c.keys.pkcs11_token_label.clone_from(v);
        }
        if let Some(v) = &self.pkcs11_pin_file {
            c.keys.pkcs11_pin_file.clone_from(v);
        }
        if let Some(v) = self.bundle_listen {
            c.federation.bundle_endpoint_listen = Some(v);
        }
        if let Some(v) = self.bundle_endpoint_profile {
            c.federation.bundle_endpoint_profile = v;
        }
        if let Some(v) = &self.bundle_endpoint_cert {
            c.federation.bundle_endpoint_cert = Some(v.clone());
        }
        if let Some(v) = &self.bundle_endpoint_key {
            c.federation.bundle_endpoint_key = Some(v.clone());
        }
    }

    fn config(&self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = &self.trust_domain {
            c.trust_domain = Some(v.clone());
        }
        if let Some(v) = &self.anchor_cert {
            c.anchor_cert = Some(v.clone());
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = self.bootstrap_token_ttl {
            c.auth.bootstrap_token_ttl = v;
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        self.apply_keys_and_federation(&mut c);
        if let Some(v) = &self.istio_trusted_node_agents {
            c.istio.trusted_node_agents = v
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect();
        }
        // Environment, then flags, as for every other setting.
        // Variables that are not UTF-8 cannot be ours: skipped rather than a panic.
        let env = ca_server::config::LimitsConfig::env_overrides(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        );
        let mut flags = Vec::new();
        for l in &self.limits {
            let Some((name, value)) = l.split_once('=') else {
                return Err(format!("--limit {l}: expected NAME=VALUE"));
            };
            flags.push((name.trim(), value));
        }
        c.limits = c
            .limits
            .with_overrides(
                env.iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .chain(flags),
            )
            .map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        // The files and modules it names too: what `--print-config` accepts, the server
        // accepts, and a refusal comes before anything is written.
        ca_server::server::check_files(&c).map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// A bad value clap found in an environment variable, said as the variable (clap names the flag,
/// which the operator did not use): `config: <setting> = <value>: <VAR>: …`. `None` when the value
/// came from the command line, or the error is not about a value.
fn env_value_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.clone(),
        _ => return None,
    };
    let long = arg
        .split_whitespace()
        .next()?
        .strip_prefix("--")?
        .to_owned();
    let given =
        std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if given {
        return None;
    }
    let cmd = <Args as clap::CommandFactory>::command();
    let var = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))?
        .get_env()?
        .to_string_lossy()
        .into_owned();
    let value = std::env::var(&var).ok()?;
    let valid = match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(v)) => format!("expected one of {}", v.join(", ")),
        _ => std::error::Error::source(e)
            .map_or_else(|| "not a valid value".to_owned(), ToString::to_string),
    };
    Some(format!(
        "config: {} = {value}: {var}: {valid}",
        long.replace('-', "_")
    ))
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            if let Some(m) = env_value_error(&e) {
                eprintln!("meshca-server: {m}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshca-server: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    // Buffered: the appender's worker thread flushes whenever its queue is empty, so lines are
    // never held back, but a burst goes out in one write instead of one per line.
    let (writer, _guard) = tracing_appender::non_blocking(std::io::BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    ));
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESHCA_LOG").unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: escape codes do not belong in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshca-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let server = match Server::start(config, Arc::new(SystemClock)).await {
        Ok(s) => s,
        Err(e) => {
            // Printed directly as well as logged: this is what an operator must read.
            eprintln!("meshca-server: refusing to start: {e}");
            tracing::error!("refusing to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_banner(&server);
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

fn print_banner(server: &Server) {
    let snap = server.authority.snapshot();
    let dir = server.state_dir.display();
    let td = &snap.bundle.trust_domain;
    let what = if server.created {
        "created a new authority"
    } else {
        "loaded the authority"
    };
    let meshca = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("meshca")))
        .filter(|p| p.exists())
        .map_or_else(
            || "cargo run --release --bin meshca --".to_owned(),
            |p| p.display().to_string(),
        );
    let token = server
        .bootstrap_token
        .clone()
        .unwrap_or_else(|| server.state_dir.join(ca_server::auth::BOOTSTRAP_TOKEN_FILE));
    // Said from tokens.json: expired, revoked or good until when.
    let now = time::OffsetDateTime::now_utc();
    let bootstrap = ca_server::auth::list_tokens(&server.state_dir)
        .ok()
        .and_then(|ts| ts.into_iter().find(|t| t.name == "bootstrap"))
        .map_or_else(
            || "revoked".to_owned(),
            |t| match t.expires {
                None => "until revoked".to_owned(),
                Some(e) if t.expired(now) => format!("EXPIRED {}", rotator::clock::rfc3339(e)),
                Some(e) => format!("until {}", rotator::clock::rfc3339(e)),
            },
        );
    let store = &server.authority.storage().state;
    let shared = if store.shared() {
        format!(
            "  authority state  {} (shared by every replica; the rotation Lease holder rotates)\n",
            store.origin()
        )
    } else {
        String::new()
    };
    let issuer = snap.issuer.as_ref().map_or_else(
        || {
            format!(
                "none: upstream mode, nothing can be signed yet. Run\n\
                 \x20                  {meshca} issuer csr --state-dir {dir} --out next.csr\n\
                 \x20                  (have your root CA sign next.csr as a CA with pathlen 0), then\n\
                 \x20                  {meshca} issuer import --state-dir {dir} --cert next.crt"
            )
        },
        |i| format!("{} (until {})", i.id, rotator::clock::rfc3339(i.not_after)),
    );
    let endpoint = server.bundle_endpoint_addr.map_or_else(String::new, |a| {
        format!("  bundle endpoint  https://{a}/  (SPIFFE bundle for federated trust domains)\n")
    });
    println!(
        "meshca-server {ver}: {what} for trust domain {td}\n\
         {shared}\
         \x20 state dir        {dir}\n\
         \x20 gRPC (TLS)       https://{grpc}\n\
         \x20 HTTP             http://{http}  (/healthz /readyz /metrics /bundle.pem)\n\
         {endpoint}\
         \x20 trust bundle     {dir}/bundle.pem  (version {bv}, {n} anchor(s))\n\
         \x20 active issuer    {issuer}\n\
         \x20 bootstrap token  {token}  (may request spiffe://{td}/ns/default/sa/*, {bootstrap})\n\
         \n\
         Issue a certificate:\n\
         \x20 {meshca} issue --server https://{grpc} --ca-bundle {dir}/bundle.pem --token-file {tok} --spiffe-id spiffe://{td}/ns/default/sa/demo --out demo\n",
        ver = env!("CARGO_PKG_VERSION"),
        grpc = server.grpc_addr,
        http = server.http_addr,
        bv = snap.bundle.version,
        n = snap.bundle.anchors.len(),
        token = token.display(),
        tok = token.display(),
    );
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
