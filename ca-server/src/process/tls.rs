//! The gRPC port's TLS, following rotation: the server certificate is issued by meshca's current
//! issuer and renewed before it expires or as soon as the issuer changes; client certificates are
//! verified against the current bundle. Both are read per handshake from [`LiveTls`], which a
//! background task keeps up to date. tonic is served over these tokio-rustls streams.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rotator::pki::SecretKey;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::Connected;

use crate::authority::{Authority, Snapshot};
use crate::issuing::limits::{ConnActivity, ConnSlot, Limit, Limits};
use crate::process::config::TlsConfig;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed server-certificate issuance.
const RETRY: Duration = Duration::from_secs(5);

struct Verifier(Arc<dyn ClientCertVerifier>);

/// The TLS material of the gRPC port (or of the SPIFFE bundle endpoint), swapped atomically as
/// the authority changes.
pub struct LiveTls {
    cert: ArcSwapOption<CertifiedKey>,
    verifier: ArcSwap<Verifier>,
    server_cert: ArcSwapOption<ServerCert>,
    names: Names,
}

/// What the certificate names.
enum Names {
    /// The gRPC port: `[tls]` DNS names and IPs (`profile::server`).
    Server(TlsConfig),
    /// The bundle endpoint: one SPIFFE ID (`profile::bundle_endpoint`).
    Svid(rotator::spiffe::SpiffeId),
}

/// The server certificate currently in use.
#[derive(Debug)]
pub struct ServerCert {
    /// Issued under this issuer.
    pub issuer: rotator::pki::CertId,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// When to renew it.
    pub renew_at: OffsetDateTime,
    /// Its DER.
    pub der: CertificateDer<'static>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("server_cert", &self.server_cert.load_full())
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl LiveTls {
    /// TLS material for `authority`'s current snapshot (a server certificate is issued now, if
    /// there is an issuer).
    pub fn new(authority: &Authority, names: TlsConfig) -> Result<Arc<Self>, String> {
        Self::naming(authority, Names::Server(names))
    }

    /// TLS material for the SPIFFE bundle endpoint (`https_spiffe`): an SVID for `id`, issued by
    /// the current issuer and renewed as the gRPC port's certificate is.
    pub fn svid(authority: &Authority, id: rotator::spiffe::SpiffeId) -> Result<Arc<Self>, String> {
        Self::naming(authority, Names::Svid(id))
    }

    fn naming(authority: &Authority, names: Names) -> Result<Arc<Self>, String> {
        let snap = authority.snapshot();
        let live = Arc::new(Self {
            cert: ArcSwapOption::empty(),
            verifier: ArcSwap::from_pointee(Verifier(client_verifier(&snap)?)),
            server_cert: ArcSwapOption::empty(),
            names,
        });
        if snap.issuer.is_some() {
            live.renew(authority, &snap)?;
        }
        Ok(live)
    }

    /// A rustls server config that reads this live material on every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(LiveVerifier(self.clone())))
            .with_cert_resolver(Arc::new(LiveResolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A rustls server config for the bundle endpoint: this live certificate, no client
    /// certificates, HTTP/1.1.
    pub fn endpoint_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LiveResolver(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The server certificate in use, if any.
    pub fn current(&self) -> Option<Arc<ServerCert>> {
        self.server_cert.load_full()
    }

    fn renew(&self, authority: &Authority, snap: &Snapshot) -> Result<(), String> {
        let issuer = snap.issuer.as_ref().ok_or("no issuer")?;
        let now = authority.clock().now();
        let policy = authority.policy();
        let window = policy
            .leaf_window(
                now,
                Some(policy.leaf_ttl_default),
                issuer.not_before,
                issuer.not_after,
            )
            .map_err(|e| e.to_string())?;
        let key = SecretKey::generate_p256().map_err(|e| e.to_string())?;
        let params = match &self.names {
            Names::Server(names) => rotator::profile::server(
                &names.dns_names,
                &names.ip_addresses,
                window.not_before,
                window.not_after,
            ),
            Names::Svid(id) => {
                rotator::profile::bundle_endpoint(id, window.not_before, window.not_after)
            }
        }
        .map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &issuer.signer)
            .map_err(|e| e.to_string())?;
        let der = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.pkcs8_der().map_err(|e| e.to_string())?.to_vec(),
        ));
        let signing_key = provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| e.to_string())?;
        let certified = CertifiedKey::new(vec![der.clone(), issuer.der.clone()], signing_key);
        let renew_at = rotator::profile::renew_at(now, window.not_after);
        self.cert.store(Some(Arc::new(certified)));
        self.server_cert.store(Some(Arc::new(ServerCert {
            issuer: issuer.id.clone(),
            not_after: window.not_after,
            renew_at,
            der,
        })));
        let what = match &self.names {
            Names::Server(_) => "server certificate",
            Names::Svid(_) => "bundle endpoint SVID",
        };
        tracing::info!(issuer = %issuer.id, not_after = %rotator::clock::rfc3339(window.not_after), "{what} issued");
        Ok(())
    }

    /// Keeps the certificate and verifier current until `shutdown` flips: wakes when the
    /// authority publishes a new snapshot or when the certificate is due for renewal.
    pub async fn maintain(
        self: Arc<Self>,
        authority: Arc<Authority>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut rx = authority.subscribe();
        let mut bundle_version = rx.borrow().bundle.version;
        loop {
            let snap = rx.borrow_and_update().clone();
            if snap.bundle.version != bundle_version {
                match client_verifier(&snap) {
                    Ok(v) => {
                        self.verifier.store(Arc::new(Verifier(v)));
                        bundle_version = snap.bundle.version;
                    }
                    Err(e) => {
                        tracing::error!("client verifier for bundle {}: {e}", snap.bundle.version)
                    }
                }
            }
            let now = authority.clock().now();
            let due = match (self.current(), &snap.issuer) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(c), Some(i)) => c.issuer != i.id || c.renew_at <= now,
            };
            let mut wait = self.current().map_or(RETRY, |c| {
                (c.renew_at - now)
                    .try_into()
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_secs(1))
            });
            if due {
                if let Err(e) = self.renew(&authority, &snap) {
                    tracing::error!(
                        "server certificate renewal failed, retrying in {RETRY:?}: {e}"
                    );
                    wait = RETRY;
                } else {
                    continue;
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn client_verifier(snap: &Snapshot) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for a in &snap.bundle.anchors {
        roots
            .add(a.clone())
            .map_err(|e| format!("bundle anchor: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())
}

#[derive(Debug)]
struct LiveResolver(Arc<LiveTls>);

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.cert.load_full()
    }
}

#[derive(Debug)]
struct LiveVerifier(Arc<LiveTls>);

impl LiveVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.verifier.load().0.clone()
    }
}

impl ClientCertVerifier for LiveVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[TlsDn] {
        // Hints are optional; the live roots cannot be borrowed across a swap.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The remote address.
    pub addr: SocketAddr,
    /// The client's leaf certificate, verified against the bundle during the handshake (and
    /// again on every request, against the bundle and time of that moment).
    pub client_cert: Option<CertificateDer<'static>>,
    /// The certificates the client sent after its leaf (its issuer).
    pub client_intermediates: Vec<CertificateDer<'static>>,
    /// The connection's open streams (for its idle timeout).
    pub activity: Arc<ConnActivity>,
}

/// The connection activity of a request that came on one of these connections (for
/// [`crate::issuing::limits::CountStreams`]).
pub fn activity_of(ext: &http::Extensions) -> Option<&Arc<ConnActivity>> {
    ext.get::<PeerInfo>().map(|p| &p.activity)
}

/// The caller's connection info and `authorization` metadata, as every face reads them.
pub fn caller_of<T>(request: &tonic::Request<T>) -> (Option<PeerInfo>, Option<String>) {
    let peer = request.extensions().get::<PeerInfo>().cloned();
    let authorization = request
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned());
    (peer, authorization)
}

/// A TLS connection handed to tonic. It holds its connection slot, and closes itself when it
/// opens no stream within `preface_timeout` or has none open for `idle_timeout`.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    idle: Pin<Box<tokio::time::Sleep>>,
    limits: Arc<Limits>,
    /// Closed for too many unauthenticated requests (the refusal is counted once).
    closed: bool,
    /// The client's HTTP/2 preface, read and checked on the handshake runtime, handed to HTTP/2
    /// before anything else: (bytes, how many already handed).
    head: ([u8; HEAD_LEN], usize),
    _slot: ConnSlot,
}

impl TlsConn {
    /// Pending until the connection has been idle too long (then the refusal is counted).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let cfg = self.limits.config();
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let a = &self.info.activity;
            let (limit, timeout) = if a.served() {
                (Limit::Idle, cfg.idle_timeout)
            } else {
                (Limit::Preface, cfg.preface_timeout)
            };
            match a.idle_since() {
                // Streams are open: look again one idle timeout from now.
                None => {
                    let at = tokio::time::Instant::now() + cfg.idle_timeout;
                    self.idle.as_mut().reset(at);
                }
                Some(since) if since + timeout > tokio::time::Instant::now() => {
                    self.idle.as_mut().reset(since + timeout);
                }
                Some(_) => {
                    self.limits.refused(
                        limit,
                        &format_args!(
                            "connection from {} closed: no stream for {}",
                            self.info.addr,
                            rotator::policy::written(timeout)
                        ),
                    );
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "idle connection closed",
                    ));
                }
            }
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let max = self.limits.config().unauthenticated_per_connection;
        if max != 0 && self.info.activity.unauthenticated_count() >= max {
            // Counted once, however often the closed connection is read again.
            let first = !std::mem::replace(&mut self.closed, true);
            if first {
                self.limits.refused(
                    Limit::UnauthenticatedPerConnection,
                    &format_args!(
                        "connection from {} closed: {max} requests refused as unauthenticated",
                        self.info.addr
                    ),
                );
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "too many unauthenticated requests",
            )));
        }
        let (head, handed) = self.head;
        if handed < HEAD_LEN {
            let n = buf.remaining().min(HEAD_LEN - handed);
            buf.put_slice(&head[handed..handed + n]);
            self.head.1 += n;
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => self.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface and the header of the frame that must follow it.
const HEAD_LEN: usize = PREFACE.len() + 9;

/// Whether `head` is the HTTP/2 client preface followed by the header of a SETTINGS frame (type
/// 4, not an ACK, stream 0, a whole number of 6-byte settings within the default 16 KiB frame
/// size), as every HTTP/2 client sends first without waiting for the server.
fn is_http2_preface(head: &[u8; HEAD_LEN]) -> bool {
    let (magic, frame) = head.split_at(PREFACE.len());
    let len = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]);
    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
    magic == PREFACE
        && frame[3] == 4
        && frame[4] & 1 == 0
        && stream == 0
        && len.is_multiple_of(6)
        && len <= 16_384
}

/// How much nicer than the process the threads that run TLS handshakes are (see [`handshakes`]).
pub const HANDSHAKE_NICE: i32 = 10;

/// Makes the calling thread `by` nice steps nicer than it is (at most 19), relative to its own
/// value: a process started at nice 15 must not see a thread raised to 10. Lowering one's own
/// priority needs no privilege.
pub fn lower_this_threads_priority(by: i32) -> io::Result<()> {
    let me = Some(rustix::thread::gettid());
    let own = rustix::process::getpriority_process(me)?;
    rustix::process::setpriority_process(me, (own + by).min(19))?;
    Ok(())
}

/// The runtime TLS handshakes run on: one thread per core, [`HANDSHAKE_NICE`] steps nicer than the
/// process, so that
/// when the CPU is contended, callers already connected (served on the main runtime at the
/// process's own priority) come first and a flood of new connections takes what is left. With
/// the CPU idle a niced thread runs as fast as any other. Built once per process and never
/// dropped; if it cannot be built, handshakes run on the caller's runtime.
fn handshakes() -> tokio::runtime::Handle {
    static POOL: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("meshca-handshake")
            .on_thread_start(|| {
                // If it fails the pool still works, without the priority.
                if let Err(e) = lower_this_threads_priority(HANDSHAKE_NICE) {
                    tracing::debug!("cannot lower the handshake threads' priority: {e}");
                }
            })
            .enable_all()
            .build()
            .inspect_err(|e| tracing::warn!("handshakes share the main runtime: {e}"))
            .ok()
    });
    pool.as_ref()
        .map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone())
}

/// A connection whose TLS handshake and HTTP/2 preface finished on the handshake runtime, on
/// its way back.
struct Handshaken {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    addr: SocketAddr,
    slot: ConnSlot,
    head: [u8; HEAD_LEN],
    /// When the client finished TLS: its first stream is due `preface_timeout` after it.
    since: tokio::time::Instant,
}

impl Handshaken {
    /// The connection handed to tonic, on the caller's runtime (its idle timer belongs there).
    fn into_conn(self, limits: &Arc<Limits>) -> TlsConn {
        let mut chain = self
            .tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned());
        let client_cert = chain.next();
        let client_intermediates = chain.collect();
        let first = self.since + limits.config().preface_timeout;
        TlsConn {
            inner: self.tls,
            info: PeerInfo {
                addr: self.addr,
                client_cert,
                client_intermediates,
                activity: ConnActivity::new(),
            },
            idle: Box::pin(tokio::time::sleep_until(first)),
            limits: limits.clone(),
            closed: false,
            head: (self.head, 0),
            _slot: self.slot,
        }
    }
}

/// On the handshake runtime: the TLS handshake (within [`HANDSHAKE_TIMEOUT`]), then the HTTP/2
/// client preface (within `preface_timeout`). `None`: the connection failed either and is closed
/// (a silent one is counted as [`Limit::Preface`]).
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    slot: ConnSlot,
    limits: &Limits,
) -> Option<Handshaken> {
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%addr, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            return None;
        }
    };
    let since = tokio::time::Instant::now();
    let timeout = limits.config().preface_timeout;
    let mut head = [0u8; HEAD_LEN];
    match tokio::time::timeout(timeout, tls.read_exact(&mut head)).await {
        Ok(Ok(_)) if is_http2_preface(&head) => Some(Handshaken {
            tls,
            addr,
            slot,
            head,
            since,
        }),
        Ok(Ok(_)) => {
            tracing::debug!(%addr, "not an HTTP/2 client preface: closed");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, "closed before its preface: {e}");
            None
        }
        Err(_) => {
            limits.refused(
                Limit::Preface,
                &format_args!(
                    "connection from {addr} closed: no request within {}",
                    rotator::policy::written(timeout)
                ),
            );
            None
        }
    }
}

/// Accepts TCP connections on `listener` and completes TLS handshakes concurrently (a slow
/// client never holds up another) on the handshake runtime, at a lower CPU priority than
/// established connections (see [`handshakes`]); established connections come out of the
/// returned stream, their timers on the caller's runtime. Failed handshakes are logged at debug
/// level and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let (done_tx, mut done_rx) = mpsc::channel::<Handshaken>(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let pool = handshakes();
    // Back on this runtime: wrap each connection (its idle timer belongs here) and hand it on.
    let forward_limits = limits.clone();
    tokio::spawn(async move {
        while let Some(h) = done_rx.recv().await {
            if tx.send(Ok(h.into_conn(&forward_limits))).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        loop {
            // At the cap: no accept until a slot frees (the connection waits in the backlog).
            let global = tokio::select! {
                g = limits.grpc_slot() => g,
                _ = shutdown.changed() => return,
            };
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            // Over its address's cap: closed at once, before any TLS work.
            let Some(slot) = limits.grpc_connection(addr.ip(), global) else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let done = done_tx.clone();
            let limits = limits.clone();
            // The socket stays registered with this runtime's reactor; the handshake's CPU work,
            // its timeout and the wait for the HTTP/2 preface run on the pool, so a connection
            // that never speaks HTTP/2 (silent, or garbage after TLS) costs the main runtime
            // nothing.
            pool.spawn(async move {
                if let Some(h) = handshake(&acceptor, tcp, addr, slot, &limits).await {
                    let _ = done.send(h).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(thread name, nice)` of the calling thread, from /proc.
    fn this_thread() -> (Option<String>, i32) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name (which may hold spaces) start at ") "; nice is field 19,
        // the 17th after it.
        let rest = stat.rsplit_once(") ").unwrap().1;
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        (std::thread::current().name().map(str::to_owned), nice)
    }

    #[test]
    fn only_an_http2_preface_with_settings_first_is_handed_on() {
        let head = |frame: [u8; 9]| {
            let mut h = [0u8; HEAD_LEN];
            h[..24].copy_from_slice(PREFACE);
            h[24..].copy_from_slice(&frame);
            h
        };
        // An empty SETTINGS, and one with three settings (what h2 and grpc-go send).
        assert!(is_http2_preface(&head([0, 0, 0, 4, 0, 0, 0, 0, 0])));
        assert!(is_http2_preface(&head([0, 0, 18, 4, 0, 0, 0, 0, 0])));
        for (why, frame) in [
            ("DATA first", [0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]),
            ("a SETTINGS ACK", [0, 0, 0, 4, 1, 0, 0, 0, 0]),
            ("SETTINGS on a stream", [0, 0, 6, 4, 0, 0, 0, 0, 1]),
            ("a partial setting", [0, 0, 5, 4, 0, 0, 0, 0, 0]),
            ("over 16 KiB", [0, 0x40, 0x02, 4, 0, 0, 0, 0, 0]),
        ] {
            assert!(!is_http2_preface(&head(frame)), "{why}");
        }
        let mut h1 = head([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        h1[..4].copy_from_slice(b"GET ");
        assert!(!is_http2_preface(&h1), "HTTP/1.1 is not HTTP/2");
    }

    #[tokio::test]
    async fn handshakes_run_on_their_own_threads_at_a_lower_priority() {
        let (_, own) = this_thread();
        let (name, nice) = handshakes().spawn(async { this_thread() }).await.unwrap();
        assert_eq!(name.as_deref(), Some("meshca-handshake"));
        assert_eq!(nice, (own + HANDSHAKE_NICE).min(19), "own nice {own}");
        assert_ne!(
            std::thread::current().name(),
            Some("meshca-handshake"),
            "the caller's runtime is another one"
        );
    }
}
