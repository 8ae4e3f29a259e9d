//! `meshca`: the operator's and workload's command line for a meshca certificate authority.
//!
//! Exit codes: 0 success; 1 the operation failed (the message says why); 2 bad usage.

mod admin;
mod anchors;
mod check;
mod deny;
mod federation;
mod init;
mod issue;
mod plan;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "meshca",
    version,
    about = "Operate a meshca certificate authority, or get a certificate from one"
)]
struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Output format of every subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Get a SPIFFE certificate: make a key and CSR, send them with a credential, write the result.
    Issue(issue::IssueArgs),
    /// Print the current trust bundle (PEM).
    Bundle(status::BundleArgs),
    /// Show the authority: anchors and issuers with their expiry countdowns and the next rotation.
    Status(status::StatusArgs),
    /// Issuer operations on a running server: rotate now; upstream mode: csr and import.
    #[command(subcommand)]
    Issuer(admin::IssuerCommand),
    /// Trust-anchor rotation on a running server: stage, activate, finish, rollback, wait.
    #[command(subcommand)]
    Anchors(anchors::AnchorsCommand),
    /// Fail-closed expiry check for cron and CI: exit 0 ok, 1 warning, 2 critical, 3 unreachable.
    Check(check::CheckArgs),
    /// Draw the rotation timeline: anchors, issuers, the phase, when each gate opens, today.
    Plan(plan::PlanArgs),
    /// Create an authority around an existing root CA certificate and key (offline).
    Init(init::InitArgs),
    /// Static bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// A compromised workload: refuse its identity on every face (add, remove, list).
    #[command(subcommand)]
    Deny(deny::DenyCommand),
    /// Federated trust domains: reset a peer's sequence.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a new token and print it (once).
    Add(init::TokenAddArgs),
    /// The tokens: name, hash prefix, expiry, what each may request.
    List(init::TokenListArgs),
    /// Remove a token (by name or hash prefix): a running server refuses it within 2 s.
    Revoke(init::TokenRevokeArgs),
}

/// A failed command: the message, already worded for the user; a short code for scripts
/// (`--output json` prints `{"ok": false, "error": {"code", "message", "exit_code"}}`); the exit
/// status (1 unless said otherwise).
#[derive(Debug)]
pub struct Failed {
    /// What went wrong, for people.
    pub message: String,
    /// What kind of failure, for scripts: `failed`, `timeout`, `wrong_phase`, `usage`, or a
    /// server's refusal as its gRPC code in snake case (`failed_precondition`, …).
    pub code: &'static str,
    /// The exit status.
    pub exit: u8,
    /// The command already printed its own document (with `--output json`, no second one).
    pub said: bool,
}

impl Failed {
    /// A failure with code `failed` and exit status 1.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: "failed",
            exit: 1,
            said: false,
        }
    }

    /// The command printed its document already; only the exit status says it failed (`meshca
    /// anchors restarts` while proxies remain).
    pub fn said(mut self) -> Self {
        self.said = true;
        self
    }

    /// The server could not be reached (code `unreachable`).
    pub fn unreachable(message: String) -> Self {
        Self::new(message).code("unreachable")
    }

    /// The same failure, with this code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    /// The same failure, with this exit status.
    pub fn exit(mut self, exit: u8) -> Self {
        self.exit = exit;
        self
    }

    /// The server's refusal: its gRPC code and reason (without the `refused: ` the reason may
    /// start with: this says it already), coded by its gRPC status for scripts.
    pub fn refused(s: &tonic::Status) -> Self {
        let reason = s.message();
        let reason = reason.strip_prefix("refused: ").unwrap_or(reason);
        Self::new(format!("the server refused: {:?}: {reason}", s.code()))
            .code(status_code(s.code()))
    }

    /// The JSON document `--output json` prints for it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": false,
            "error": {"code": self.code, "message": self.message, "exit_code": self.exit},
        })
    }
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Self::new(e.to_string())
    }
}

/// A gRPC status code in snake case, as `--output json` names a server's refusal.
fn status_code(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown",
        C::InvalidArgument => "invalid_argument",
        C::DeadlineExceeded => "deadline_exceeded",
        C::NotFound => "not_found",
        C::AlreadyExists => "already_exists",
        C::PermissionDenied => "permission_denied",
        C::ResourceExhausted => "resource_exhausted",
        C::FailedPrecondition => "failed_precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out_of_range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal",
        C::Unavailable => "unavailable",
        C::DataLoss => "data_loss",
        C::Unauthenticated => "unauthenticated",
    }
}

/// The state dir when none is given: `$MESHCA_STATE_DIR`, else `./meshca-data`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("MESHCA_STATE_DIR")
        .map_or_else(|| PathBuf::from("./meshca-data"), PathBuf::from)
}

/// Where the files of the state dir `given` (or the default) are: the dir itself, or meshca's own
/// `<dir>/meshca` when the dir belongs to another user (see `rotator::store::resolve_state_dir`).
pub fn state_dir(given: Option<PathBuf>) -> PathBuf {
    rotator::store::locate_state_dir(&given.unwrap_or_else(default_state_dir))
}

/// With a state whose keys live in a PKCS#11 token, commands that read the state dir offline
/// need the token too: the same `MESHCA_KEYS_*` variables as the server
/// (`MESHCA_KEYS_BACKEND=pkcs11`, `_PKCS11_MODULE`, `_PKCS11_TOKEN_LABEL`, `_PKCS11_PIN_FILE`).
fn keys_from_env() -> Result<(), String> {
    let var = |n: &str| std::env::var_os(format!("MESHCA_KEYS_{n}"));
    let backend = match var("BACKEND").as_deref().and_then(|v| v.to_str()) {
        None | Some("" | "file") => return Ok(()),
        Some("pkcs11") => rotator::keys::Backend::Pkcs11,
        Some(other) => {
            return Err(format!(
                "MESHCA_KEYS_BACKEND={other}: expected file or pkcs11"
            ));
        }
    };
    let cfg = rotator::keys::KeysConfig {
        backend,
        pkcs11_module: var("PKCS11_MODULE").map(Into::into).unwrap_or_default(),
        pkcs11_token_label: var("PKCS11_TOKEN_LABEL")
            .and_then(|v| v.into_string().ok())
            .unwrap_or_default(),
        pkcs11_pin_file: var("PKCS11_PIN_FILE").map(Into::into).unwrap_or_default(),
    };
    rotator::keys::set_ca_key_store(rotator::pkcs11::open_configured(&cfg)?);
    Ok(())
}

/// Whether the raw arguments ask for `--output json` (for failures before they are parsed).
fn json_asked() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| w[0] == "--output" && w[1] == "json")
        || args.iter().any(|a| a == "--output=json")
}

/// Says `f` the way `output` asks (one JSON document on stdout, and the message on stderr) and
/// returns its exit status.
fn report(f: &Failed, output: Output) -> ExitCode {
    if output == Output::Json && !f.said {
        println!("{}", f.json());
    }
    eprintln!("meshca: {}", f.message);
    ExitCode::from(f.exit)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if json_asked() && e.use_stderr() => {
            // A usage error: the JSON document as well, exit 2 as clap would.
            let f = Failed::new(e.to_string().trim().to_owned())
                .code("usage")
                .exit(2);
            return report(&f, Output::Json);
        }
        Err(e) => e.exit(),
    };
    rotator::client::install_crypto_provider();
    if let Err(e) = keys_from_env() {
        // For `check`, keys that cannot be used are critical.
        let exit = if matches!(cli.command, Command::Check(_)) {
            2
        } else {
            1
        };
        return report(&Failed::new(e).exit(exit), cli.output);
    }
    if let Command::Check(a) = &cli.command {
        return ExitCode::from(check::check(a, cli.output));
    }
    let result = match cli.command {
        Command::Check(_) => Ok(()),
        Command::Issue(a) => issue::run(a, cli.output),
        Command::Bundle(a) => status::bundle(a, cli.output),
        Command::Status(a) => status::status(a, cli.output),
        Command::Issuer(c) => admin::issuer(c, cli.output),
        Command::Anchors(c) => anchors::anchors(c, cli.output),
        Command::Plan(a) => plan::plan(a, cli.output),
        Command::Init(a) => init::init(a, cli.output),
        Command::Deny(c) => deny::deny(c, cli.output),
        Command::Federation(c) => federation::federation(c, cli.output),
        Command::Token(TokenCommand::Add(a)) => init::token_add(a, cli.output),
        Command::Token(TokenCommand::List(a)) => init::token_list(a, cli.output),
        Command::Token(TokenCommand::Revoke(a)) => init::token_revoke(a, cli.output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(&f, cli.output),
    }
}

/// A current-thread runtime for the network commands.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(format!("runtime: {e}")))
}

/// Words a gRPC failure for the user: the code and the server's reason.
pub fn grpc_failure(server: &str, s: &tonic::Status) -> Failed {
    // A status made on this side from a transport error (connection refused, TLS failure) has
    // the transport error as its source; one sent by the server has none.
    let local = std::error::Error::source(s)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    if local {
        // The innermost error says what actually went wrong (refused, reset, unknown issuer).
        let mut inner: &dyn std::error::Error = s;
        while let Some(e) = inner.source() {
            inner = e;
        }
        return Failed::new(format!("cannot reach {server}: {inner}")).code("unreachable");
    }
    let reason = s.message();
    let reason = reason.strip_prefix("refused: ").unwrap_or(reason);
    Failed::new(format!("{server} refused: {:?}: {reason}", s.code())).code(status_code(s.code()))
}
