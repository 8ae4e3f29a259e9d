//! The workload side of meshca: make a CSR, connect to the server over TLS verified with the
//! trust bundle, verify what comes back. Used by the `meshca` CLI and by the end-to-end tests.
//!
//! tonic's own TLS checks DNS names only; here a connector does the TLS itself with a rustls
//! config built from the bundle, so servers are verified against meshca's anchors and a client
//! can present its SPIFFE leaf (renewal over mTLS).

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::{CertInfo, SecretKey};
use crate::spiffe::SpiffeId;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// No certificates in a PEM bundle.
    #[error("{0}: no PEM certificates found")]
    EmptyBundle(String),
    /// The server URL is not usable.
    #[error("bad server URL {0:?}: {1}")]
    Url(String, String),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A CSR could not be built.
    #[error("CSR: {0}")]
    Csr(String),
    /// The certificate chain does not verify, or carries the wrong identity.
    #[error("certificate: {0}")]
    Verify(String),
}

/// Installs rustls' ring provider as the process default (idempotent). Call once at start-up.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates in a PEM file, DER.
pub fn read_pem_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Read {
        path: path.into(),
        source,
    })?;
    let certs = parse_pem_certs(&text);
    if certs.is_empty() {
        return Err(ClientError::EmptyBundle(path.into()));
    }
    Ok(certs)
}

/// All `CERTIFICATE` blocks in `text`, DER.
pub fn parse_pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    pem::parse_many(text)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect()
}

/// A client identity: a certificate chain (leaf first) and its key.
#[derive(Clone)]
pub struct Identity {
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: SecretKey,
}

impl Identity {
    fn key_der(&self) -> Result<PrivateKeyDer<'static>, ClientError> {
        let der = self
            .key
            .pkcs8_der()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec())))
    }
}

/// A rustls client config that trusts exactly `bundle` (meshca's anchors), speaks h2, and
/// presents `identity` when given.
pub fn client_tls(
    bundle: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(bundle.iter().cloned());
    if added == 0 {
        return Err(ClientError::Tls(
            "no usable trust anchor in the bundle".into(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key_der()?)
            .map_err(|e| ClientError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A lazily connecting gRPC channel to `url` (`https://host:port`) over TLS with `tls`.
pub fn channel(url: &str, tls: Arc<ClientConfig>) -> Result<Channel, ClientError> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Url(url.into(), e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::Url(
            url.into(),
            "the scheme must be https (meshca serves gRPC over TLS only)".into(),
        ));
    }
    if uri.host().is_none() {
        return Err(ClientError::Url(url.into(), "no host".into()));
    }
    let endpoint = Endpoint::from(uri).connect_timeout(std::time::Duration::from_secs(5));
    Ok(endpoint.connect_with_connector_lazy(TlsConnect {
        tls: TlsConnector::from(tls),
    }))
}

/// A tower connector: TCP, then TLS with the server name taken from the URI's host.
#[derive(Clone)]
pub struct TlsConnect {
    tls: TlsConnector,
}

impl TlsConnect {
    /// A connector using `tls`.
    pub fn new(tls: Arc<ClientConfig>) -> Self {
        Self {
            tls: TlsConnector::from(tls),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_owned());
            let host = uri
                .host()
                .ok_or_else(|| bad("no host"))?
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = match host.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => {
                    ServerName::try_from(host.clone()).map_err(|_| bad("invalid server name"))?
                }
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

/// Why the admin socket could not be reached, worded for an operator.
pub fn admin_unreachable(socket: &std::path::Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "no meshca-server is running here: {} does not exist (start meshca-server with this --state-dir, or pass --admin-socket)",
            socket.display()
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "no meshca-server answers on {}: connection refused (the server that made it is not running; a crash leaves the socket behind)",
            socket.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied (run as the user that runs meshca-server)",
            socket.display()
        ),
        _ => format!("{}: {e}", socket.display()),
    }
}

/// A gRPC channel to the admin socket. Connects now, so that an absent server is reported
/// before any request is built.
pub async fn admin_channel(socket: &std::path::Path) -> Result<Channel, String> {
    // Fail fast, with the reason, before tonic wraps the error.
    tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| admin_unreachable(socket, &e))?;
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(TokioIo::new)
        }
    });
    Endpoint::from_static("http://admin.sock")
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))
}

/// A DER CSR for `id` with `key`: empty subject, exactly one URI SAN, nothing else.
pub fn make_csr(id: &SpiffeId, key: &SecretKey) -> Result<Vec<u8>, ClientError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .as_str()
        .try_into()
        .map_err(|e: rcgen::Error| ClientError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    Ok(params
        .serialize_request(key)
        .map_err(|e| ClientError::Csr(e.to_string()))?
        .der()
        .to_vec())
}

/// Verifies `chain` (leaf first) up to one of `bundle`'s anchors at `at` for `usage`, and returns
/// the leaf's single SPIFFE ID. This is an independent check (rustls-webpki), not meshca's own
/// bookkeeping.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &[CertificateDer<'_>],
    at: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, ClientError> {
    let leaf = chain
        .first()
        .ok_or_else(|| ClientError::Verify("empty chain".into()))?;
    let (anchors, ee) = webpki_view(leaf, bundle)?;
    let algs: &WebPkiSupportedAlgorithms =
        &rustls::crypto::ring::default_provider().signature_verification_algorithms;
    ee.verify_for_usage(algs.all, &anchors, &chain[1..], at, usage, None, None)
        .map_err(verify_error)?;
    spiffe_id_of(leaf)
}

fn verify_error(e: webpki::Error) -> ClientError {
    ClientError::Verify(format!("{e:?}"))
}

/// webpki's view of a chain to check: the bundle as trust anchors, the leaf as an end entity.
fn webpki_view<'a>(
    leaf: &'a CertificateDer<'a>,
    bundle: &'a [CertificateDer<'a>],
) -> Result<(Vec<TrustAnchor<'a>>, webpki::EndEntityCert<'a>), ClientError> {
    let anchors = bundle
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map_err(verify_error))
        .collect::<Result<_, _>>()?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(verify_error)?;
    Ok((anchors, ee))
}

/// Verifies `leaf` through `issuer` to `bundle` at `at`, and says whether the path webpki built
/// went through `issuer` (`false`: an anchor signed the leaf directly, and `issuer` played no
/// part). One path build: two signature checks for a leaf → issuer → anchor path.
pub fn verify_through(
    leaf: &CertificateDer<'_>,
    issuer: &CertificateDer<'_>,
    bundle: &[CertificateDer<'_>],
    at: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<bool, ClientError> {
    let (anchors, ee) = webpki_view(leaf, bundle)?;
    let algs: &WebPkiSupportedAlgorithms =
        &rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let intermediates = std::slice::from_ref(issuer);
    let path = ee
        .verify_for_usage(algs.all, &anchors, intermediates, at, usage, None, None)
        .map_err(verify_error)?;
    let mut through = path.intermediate_certificates();
    Ok(matches!(
        (through.next(), through.next()),
        (Some(c), None) if c.der().as_ref() == issuer.as_ref()
    ))
}

/// The one SPIFFE ID a leaf carries (exactly one URI SAN, of scheme spiffe).
pub fn spiffe_id_of(leaf: &[u8]) -> Result<SpiffeId, ClientError> {
    let info = CertInfo::parse(leaf).map_err(|e| ClientError::Verify(e.to_string()))?;
    match info.uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e| ClientError::Verify(format!("URI SAN {one:?}: {e}"))),
        other => Err(ClientError::Verify(format!(
            "{} URI SANs; an SVID has exactly one",
            other.len()
        ))),
    }
}

/// A rustls server-certificate verifier for SPIFFE peers: the chain must verify to the bundle
/// and the leaf must carry `expected` (no DNS name check: SVIDs have none).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Vec<CertificateDer<'static>>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Trusts `bundle`, accepts only `expected`.
    pub fn new(bundle: Vec<CertificateDer<'static>>, expected: SpiffeId) -> Arc<Self> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Arc::new(Self {
            bundle,
            expected,
            algs,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = verify_svid(&chain, &self.bundle, now, webpki::KeyUsage::server_auth())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "peer is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
