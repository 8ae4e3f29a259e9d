//! Helpers for meshca's end-to-end tests: start a real server on `127.0.0.1:0` with a temp state
//! dir, talk to it over real TLS, run workloads that handshake with each other over rustls mTLS,
//! find the built binaries and the external tools (openssl, promtool) the tests use.
//!
//! See `tests/README.md` for the tiers.

pub mod chart;
pub mod cluster;
pub mod fleet;
pub mod kubeapi;
pub mod soak;
pub mod trials;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ca_server::config::Config;
use ca_server::server::Server;
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use meshca_proto::v1::{SignCertificateRequest, SignCertificateResponse};
use rotator::client::{
    Identity, SpiffeServerVerifier, channel, client_tls, make_csr, parse_pem_certs,
};
use rotator::clock::{Clock, SystemClock};
use rotator::pki::SecretKey;
use rotator::spiffe::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

/// A config for tests: state in `dir`, both ports on `127.0.0.1:0`.
pub fn test_config(dir: &Path) -> Config {
    Config {
        state_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().expect("literal address"),
        http_listen: "127.0.0.1:0".parse().expect("literal address"),
        ..Config::default()
    }
}

/// A running in-process server with its temp state dir.
pub struct TestServer {
    /// The server (None once stopped).
    pub server: Option<Server>,
    /// The state dir (kept alive with the server).
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The HTTP address.
    pub http: SocketAddr,
    /// The bootstrap token (empty for a replica that adopted an existing authority).
    pub token: String,
}

impl TestServer {
    /// Starts a server on the embedded default (new state dir).
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `f` adjusts the config.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        Self::start_clocked(f, Arc::new(SystemClock)).await
    }

    /// Starts a server with an injected clock.
    pub async fn start_clocked(f: impl FnOnce(&mut Config), clock: Arc<dyn Clock>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(&dir.path().join("state"));
        f(&mut config);
        let server = Server::start(config, clock).await.expect("server starts");
        // A replica that adopts an authority another created has no bootstrap token of its own.
        let token = server
            .bootstrap_token
            .as_ref()
            .map(|t| {
                std::fs::read_to_string(t)
                    .expect("bootstrap token")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        Self {
            url: format!("https://{}", server.grpc_addr),
            http: server.http_addr,
            server: Some(server),
            dir,
            token,
        }
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    /// The current bundle as the server serves it.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.server().authority.snapshot().bundle.anchors.clone()
    }

    /// A gRPC client trusting the current bundle, presenting `identity` if given.
    pub fn client(&self, identity: Option<&Identity>) -> IdentityServiceClient<Channel> {
        let tls = client_tls(&self.bundle(), identity).expect("client TLS config");
        IdentityServiceClient::new(channel(&self.url, tls).expect("channel"))
    }

    /// Asks for `id` with the bootstrap token; returns the response and the key.
    pub async fn issue(
        &self,
        id: &str,
    ) -> Result<(SignCertificateResponse, SecretKey), tonic::Status> {
        let id: SpiffeId = id.parse().expect("valid SPIFFE ID");
        let key = SecretKey::generate_p256().expect("key");
        let csr = make_csr(&id, &key).expect("CSR");
        let r = self
            .client(None)
            .sign_certificate(with_token(sign_request(csr), &self.token))
            .await?;
        Ok((r.into_inner(), key))
    }

    /// A `WatchTrustBundle` stream opened by workload `w` with its own certificate, as
    /// `instance`.
    pub async fn watch_as(
        &self,
        w: &Workload,
        instance: &str,
    ) -> tonic::Streaming<meshca_proto::v1::TrustBundle> {
        let me = Identity {
            chain: w.chain.clone(),
            key: w.key.clone(),
        };
        self.client(Some(&me))
            .watch_trust_bundle(meshca_proto::v1::WatchTrustBundleRequest {
                instance_id: instance.to_owned(),
            })
            .await
            .expect("the workload may watch")
            .into_inner()
    }

    /// A workload for `id` as instance `instance` (the bootstrap token asks for it).
    pub async fn workload_instance(&self, id: &str, instance: &str) -> Workload {
        let key = SecretKey::generate_p256().expect("key");
        let r = self
            .client(None)
            .sign_certificate(with_token(
                instance_request(id, &key, instance),
                &self.token,
            ))
            .await
            .expect("the bootstrap token may ask for it")
            .into_inner();
        Workload::from_response(&r, key)
    }

    /// Stops the server, keeping the state dir.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// A request for `csr` with the default TTL.
pub fn sign_request(csr: Vec<u8>) -> SignCertificateRequest {
    SignCertificateRequest {
        csr,
        ttl: None,
        instance_id: String::new(),
    }
}

/// A request for `id` with `key`'s CSR as instance `instance`, default TTL.
pub fn instance_request(id: &str, key: &SecretKey, instance: &str) -> SignCertificateRequest {
    SignCertificateRequest {
        csr: make_csr(&id.parse().expect("a SPIFFE ID"), key).expect("a CSR"),
        ttl: None,
        instance_id: instance.to_owned(),
    }
}

/// An Istio face client (`istio.v1.auth.IstioCertificateService`), with `identity` as its
/// client certificate if given.
pub fn istio(
    srv: &TestServer,
    identity: Option<&Identity>,
) -> IstioCertificateServiceClient<Channel> {
    let tls = client_tls(&srv.bundle(), identity).expect("client TLS from the bundle");
    IstioCertificateServiceClient::new(channel(&srv.url, tls).expect("a channel to the server"))
}

/// An Istio CSR request for `id` with `key`, asking for `ttl` seconds.
pub fn istio_request(id: &str, key: &SecretKey, ttl: i64) -> IstioCertificateRequest {
    let csr = make_csr(&id.parse().expect("a SPIFFE ID"), key).expect("a CSR");
    IstioCertificateRequest {
        csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
        validity_duration: ttl,
        metadata: None,
    }
}

/// What ztunnel sends for a pod on its node: a CSR for `workload` and
/// `metadata.ImpersonatedIdentity` = `impersonated` (usually the same ID).
pub fn istio_impersonating(
    workload: &str,
    impersonated: &str,
    key: &SecretKey,
) -> IstioCertificateRequest {
    use prost_types::value::Kind;
    let mut r = istio_request(workload, key, 0);
    r.metadata = Some(prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue(impersonated.to_owned())),
            },
        )]
        .into(),
    });
    r
}

/// Wraps `msg` with `authorization: Bearer <token>`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII token"),
    );
    r
}

/// The chain of a response as DER certificates.
pub fn chain_of(r: &SignCertificateResponse) -> Vec<CertificateDer<'static>> {
    r.certificate_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect()
}

/// The bundle of a response as DER certificates.
pub fn bundle_of(r: &SignCertificateResponse) -> Vec<CertificateDer<'static>> {
    r.trust_bundle
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect()
}

/// A workload: an SVID (chain and key) it can serve and connect with.
#[derive(Clone)]
pub struct Workload {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: SecretKey,
    /// The bundle it trusts.
    pub bundle: Vec<CertificateDer<'static>>,
}

impl Workload {
    /// A workload from a sign response.
    pub fn from_response(r: &SignCertificateResponse, key: SecretKey) -> Self {
        let chain = chain_of(r);
        let id = rotator::client::spiffe_id_of(&chain[0]).expect("SVID");
        Self {
            id,
            chain,
            key,
            bundle: bundle_of(r),
        }
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            self.key
                .key_pair()
                .expect("a workload's key is in memory")
                .serialize_der(),
        ))
    }

    /// A rustls server config that requires a client certificate chaining to this workload's
    /// bundle.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let mut roots = RootCertStore::empty();
        for a in &self.bundle {
            roots.add(a.clone()).map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key_der())
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(cfg))
    }

    /// A rustls client config presenting this workload's SVID and accepting only `peer`.
    pub fn client_config(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(SpiffeServerVerifier::new(
                self.bundle.clone(),
                peer.clone(),
            ))
            .with_client_auth_cert(self.chain.clone(), self.key_der())
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(cfg))
    }
}

/// One real mTLS handshake over loopback: `server` listens, `client` connects; each checks the
/// other's SPIFFE ID (the client via its verifier, the server after the handshake) and they
/// exchange a byte. `Err` says which side failed and why.
pub async fn mtls_handshake(server: &Workload, client: &Workload) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config()?);
    let connector = tokio_rustls::TlsConnector::from(client.client_config(&server.id)?);
    let expect_client = client.id.clone();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server side: {e}"))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("server side: no client certificate")?;
        let id = rotator::client::spiffe_id_of(peer).map_err(|e| format!("server side: {e}"))?;
        if id != expect_client {
            return Err(format!(
                "server side: client is {id}, expected {expect_client}"
            ));
        }
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("server side read: {e}"))?;
        tls.write_all(&b)
            .await
            .map_err(|e| format!("server side write: {e}"))?;
        tls.shutdown().await.ok();
        Ok::<_, String>(())
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("workload.invalid").map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client side: {e}"))?;
        tls.write_all(b"x")
            .await
            .map_err(|e| format!("client side write: {e}"))?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("client side read: {e}"))?;
        Ok::<_, String>(())
    };
    let (c, s) = tokio::join!(client_side, srv);
    let s = s.map_err(|e| e.to_string()).and_then(|r| r);
    // When one side fails the other usually sees only an alert: report both.
    match (c, s) {
        (Ok(()), Ok(())) => Ok(()),
        (c, s) => Err([c.err(), s.err()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Runs the `meshca` CLI with `args`, then `--state-dir dir`, off the async runtime:
/// (exit code, stdout, stderr).
pub async fn meshca_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut a: Vec<String> = args.iter().map(ToString::to_string).collect();
    a.push("--state-dir".into());
    a.push(dir.display().to_string());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin("meshca"))
            .args(&a)
            .output()
            .expect("run meshca");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("the meshca thread")
}

/// A built binary of this workspace (`meshca-server`, `meshca`), next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the whole suite with `cargo test --workspace` (it builds every binary), or `cargo build --bins` first",
        path.display()
    );
    path
}

/// The path of an external tool, or `None` with a printed reason when it is missing on a
/// developer machine. In CI (`CI` set) a missing tool fails the test: CI installs it.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed, and CI must run this test (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed on this machine; install it to run this check");
    }
    found
}

/// A plain HTTP/1.1 GET on loopback: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect HTTP");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write HTTP");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read HTTP");
    http_response(&buf)
}

/// An HTTP/1.1 response's status and body (0 and empty when there is none).
pub fn http_response(buf: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A federated trust domain `td` whose bundle endpoint is down (`https://127.0.0.1:1/`), held
/// from a bootstrap bundle: a fresh anchor of `td`, written as PEM under `dir`. Returns the peer
/// and the anchor.
pub fn unreachable_peer(
    dir: &Path,
    td: &str,
) -> (ca_server::federation::Peer, CertificateDer<'static>) {
    let key = SecretKey::generate_p256().expect("key");
    let anchor = rotator::profile::new_anchor(
        &td.parse().expect("trust domain"),
        &key,
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
        Duration::ZERO,
    )
    .expect("anchor");
    let bootstrap = dir.join(format!("{td}-bundle.pem"));
    std::fs::write(&bootstrap, anchor.pem()).expect("write the bootstrap bundle");
    let peer = ca_server::federation::Peer {
        trust_domain: td.parse().expect("trust domain"),
        bundle_endpoint_url: "https://127.0.0.1:1/".into(),
        profile: ca_server::federation::EndpointProfile::HttpsSpiffe,
        endpoint_spiffe_id: Some(
            format!("spiffe://{td}/meshca/server")
                .parse()
                .expect("SPIFFE ID"),
        ),
        bootstrap_bundle: Some(bootstrap),
        web_ca_file: None,
    };
    (peer, anchor.der().clone())
}

/// PEM certificates in `text` (re-exported for tests).
pub fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    parse_pem_certs(text)
}

/// Polls `f` every 20 ms until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `meshca-server` child process.
pub struct ServerProcess {
    /// The child.
    pub child: std::process::Child,
    /// Everything it printed on stdout up to and including the banner.
    pub banner: String,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The HTTP address.
    pub http: SocketAddr,
}

/// How a `meshca-server` process that was expected to start ended instead.
#[derive(Debug)]
pub struct Refused {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// What it printed on stderr.
    pub stderr: String,
}

impl ServerProcess {
    /// Starts `meshca-server --state-dir dir` on `127.0.0.1:0` with `extra` args and `env`,
    /// and waits (polling its output, at most 30 s) for the banner — or for it to exit.
    pub fn spawn(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Self, Refused> {
        Self::spawn_as(&[bin("meshca-server").into()], dir, extra, env)
    }

    /// As [`ServerProcess::spawn`], started through `argv`: a launcher and its arguments, ending
    /// with the `meshca-server` binary (e.g. `unshare … setpriv … meshca-server`).
    pub fn spawn_as(
        argv: &[std::ffi::OsString],
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Refused> {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let (program, launcher_args) = argv.split_first().expect("a program");
        let mut cmd = Command::new(program);
        cmd.args(launcher_args)
            .arg("--state-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(extra);
        cmd.env("MESHCA_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshca-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = String::new();
            let mut header_seen = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                banner.push_str(&line);
                banner.push('\n');
                // The banner ends with the line after "Issue a certificate:".
                if header_seen {
                    let _ = tx.send(banner.clone());
                }
                header_seen = line.starts_with("Issue a certificate");
            }
            // Keep draining so the child never blocks on a full pipe.
        });
        let banner = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                return Err(Refused {
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        };
        let field = |prefix: &str| {
            banner
                .lines()
                .find_map(|l| {
                    l.trim()
                        .strip_prefix(prefix)
                        .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
                })
                .expect("banner field")
        };
        let url = field("gRPC (TLS)");
        let http = field("HTTP")
            .trim_start_matches("http://")
            .parse()
            .expect("HTTP address");
        Ok(Self {
            child,
            banner,
            url,
            http,
        })
    }

    /// Kills the process (SIGKILL, as a crash) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every regular file under `dir` with its bytes and mode, for before/after comparisons.
pub fn snapshot_dir(dir: &Path) -> std::collections::BTreeMap<PathBuf, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("dir entry").path();
            let meta = std::fs::metadata(&p).expect("metadata");
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                // Regular files only: the admin socket is not state.
                out.insert(
                    p.strip_prefix(dir).expect("under dir").to_owned(),
                    (std::fs::read(&p).expect("read"), meta.permissions().mode()),
                );
            }
        }
    }
    out
}

/// A plain blocking HTTP/1.1 GET on loopback: `(status, body)`.
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect HTTP");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write HTTP");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read HTTP");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
pub fn openssl(openssl: &Path, dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(openssl)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a self-signed P-256 root CA with openssl in `dir` as `<name>.pem` and `<name>.key`
/// (SEC1 key, as `openssl ecparam` writes it), valid for `days`.
pub fn openssl_root(tool: &Path, dir: &Path, name: &str, days: u32) {
    openssl(
        tool,
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
    );
    openssl(
        tool,
        dir,
        &[
            "req",
            "-x509",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            &days.to_string(),
            "-subj",
            &format!("/O=Example Corp/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// Polls `f` every 20 ms for up to 10 s (blocking).
pub fn eventually_blocking<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the real `meshca issue` against `server_url` with the bootstrap token of `state_dir`, for
/// `spiffe://cluster.local/ns/default/sa/<name>`, writing `<cwd>/<name>.crt|.key`; panics with the
/// CLI's message if it fails.
pub fn cli_issue(server_url: &str, state_dir: &Path, name: &str, cwd: &Path) {
    let d = state_dir.display().to_string();
    let out = std::process::Command::new(bin("meshca"))
        .args([
            "issue",
            "--server",
            server_url,
            "--ca-bundle",
            &format!("{d}/bundle.pem"),
            "--token-file",
            &format!("{d}/bootstrap-token"),
            "--spiffe-id",
            &format!("spiffe://cluster.local/ns/default/sa/{name}"),
            "--out",
            name,
        ])
        .current_dir(cwd)
        .output()
        .expect("run meshca");
    assert!(
        out.status.success(),
        "meshca issue {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The subject alternative names of a certificate, in the order they are encoded, as
/// `DNS:<name>`, `URI:<uri>` or `other:<kind>` (x509-parser reads the GeneralNames sequence in
/// order; nothing here sorts or deduplicates).
pub fn san_in_order(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    let Some(san) = x.subject_alternative_name().expect("one SAN extension") else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("other:{other:?}"),
        })
        .collect()
}

/// A peer's identity as linkerd2-proxy derives it (its rustls verifier's `client_identity`): the
/// DNS and URI SANs of the end-entity certificate in encoded order, other kinds skipped, and the
/// **first** of them names the peer. Linkerd's authorization policies then match that name
/// against Linkerd identities (`<sa>.<ns>.serviceaccount.identity.<cp-ns>.<td>`).
pub fn linkerd_peer_identity(end_entity: &[u8]) -> Option<String> {
    san_in_order(end_entity)
        .into_iter()
        .find(|n| n.starts_with("DNS:") || n.starts_with("URI:"))
}

/// Whether `<dir>/<name>.key` is the key of the leaf in `<dir>/<name>.crt` (what `meshca issue
/// --out <name>` writes).
pub fn key_matches_certificate(dir: &Path, name: &str) -> bool {
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).expect("read");
    let chain = pem_certs(&read("crt"));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("a certificate");
    let key = SecretKey::from_pem(&read("key")).expect("a key");
    leaf.public_key().raw == key.spki_der().as_slice()
}

/// The repository root.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize <dir>` as JSON values (None: kubectl missing on a laptop).
pub fn render(dir: &str) -> Option<Vec<serde_json::Value>> {
    let kubectl = require_tool("kubectl")?;
    let out = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .collect();
    assert!(!docs.is_empty(), "{dir} rendered nothing");
    Some(docs)
}
