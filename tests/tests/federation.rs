//! SPIFFE federation, the serving half (#19): the SPIFFE bundle endpoint over HTTPS, in the
//! `https_spiffe` profile (an SVID for `spiffe://<td>/meshca/server` from meshca's own issuer,
//! verified here with rustls-webpki and a SPIFFE-ID check, as a federated peer does) and the
//! `https_web` profile (the operator's certificate, verified by its web CA and host name).

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ca_server::federation::EndpointProfile;
use meshca_proto::v1::admin_service_client::AdminServiceClient;
use meshca_proto::v1::{RotateIssuerRequest, StageAnchorRequest};
use meshca_tests::{TestServer, eventually, http_get};
use rotator::client::SpiffeServerVerifier;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENDPOINT_ID: &str = "spiffe://cluster.local/meshca/server";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that authenticates the endpoint as a federated peer does in `https_spiffe`: its chain
/// to `bundle`, and the SPIFFE ID `expected` — no host name.
fn spiffe_client(bundle: &[CertificateDer<'static>], expected: &str) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            bundle.to_vec(),
            expected.parse().unwrap(),
        ))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// A web PKI client trusting `roots` only.
fn web_client(roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

/// `GET path` over TLS as `name`: (status, body, the endpoint's certificate chain), or the TLS
/// error.
async fn fetch(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    name: &str,
    path: &str,
) -> Result<(u16, String, Vec<CertificateDer<'static>>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let chain = s.get_ref().1.peer_certificates().unwrap().to_vec();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
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
    Ok((status, body, chain))
}

/// The anchors (DER) a SPIFFE bundle document carries, and its sequence.
fn anchors_of(doc: &str) -> (Vec<Vec<u8>>, u64) {
    let v: serde_json::Value = serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let ders = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["use"], "x509-svid");
            base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap()
        })
        .collect();
    (ders, v["spiffe_sequence"].as_u64().unwrap())
}

fn ders(certs: &[CertificateDer<'static>]) -> Vec<Vec<u8>> {
    certs.iter().map(|c| c.to_vec()).collect()
}

async fn admin(ts: &TestServer) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::new(
        rotator::client::admin_channel(&ts.server().admin_socket)
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_spiffe_serves_the_bundle_under_an_svid_that_follows_rotation() {
    let ts = TestServer::start_with(|c| {
        c.federation.bundle_endpoint_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = ts.server().bundle_endpoint_addr.expect("served");
    let bundle = ts.bundle();
    let (status, body, chain) = fetch(addr, spiffe_client(&bundle, ENDPOINT_ID), "meshca", "/")
        .await
        .expect("a federated peer authenticates the endpoint by its SPIFFE ID");
    assert_eq!(status, 200, "{body}");
    let (anchors, sequence) = anchors_of(&body);
    assert_eq!(anchors, ders(&bundle));
    assert_eq!(sequence, ts.server().authority.snapshot().bundle.version);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_refresh_hint"], 300);
    // The same document as the HTTP port's, at /spiffe-bundle.json too.
    let (_, plain) = http_get(ts.http, "/spiffe-bundle.json").await;
    assert_eq!(plain, body);
    let (_, again, _) = fetch(
        addr,
        spiffe_client(&bundle, ENDPOINT_ID),
        "meshca",
        "/spiffe-bundle.json",
    )
    .await
    .unwrap();
    assert_eq!(again, body);
    // The SVID, checked independently: one URI SAN, chaining to the bundle (rustls-webpki).
    let id = rotator::client::verify_svid(
        &chain,
        &bundle,
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::server_auth(),
    )
    .unwrap();
    assert_eq!(id.to_string(), ENDPOINT_ID);

    // Refused: another SPIFFE ID expected, or another trust bundle.
    let err = fetch(
        addr,
        spiffe_client(&bundle, "spiffe://cluster.local/other"),
        "meshca",
        "/",
    )
    .await
    .expect_err("the wrong SPIFFE ID is refused");
    assert!(
        err.contains("expected spiffe://cluster.local/other"),
        "{err}"
    );
    let stranger = TestServer::start().await;
    let err = fetch(
        addr,
        spiffe_client(&stranger.bundle(), ENDPOINT_ID),
        "meshca",
        "/",
    )
    .await
    .expect_err("a bundle that does not hold this authority's anchor is refused");
    println!("refused: {err}");

    // A staged anchor is served at once, with a higher sequence.
    let mut a = admin(&ts).await;
    a.stage_anchor(StageAnchorRequest::default()).await.unwrap();
    let (_, body, _) = fetch(addr, spiffe_client(&bundle, ENDPOINT_ID), "meshca", "/")
        .await
        .unwrap();
    let (staged, seq2) = anchors_of(&body);
    assert_eq!(staged.len(), 2);
    assert!(seq2 > sequence, "{seq2} > {sequence}");
    assert_eq!(staged, ders(&ts.bundle()));

    // A new issuer: the endpoint's SVID is re-issued under it.
    let before = chain[1].to_vec();
    a.rotate_issuer(RotateIssuerRequest {}).await.unwrap();
    a.rotate_issuer(RotateIssuerRequest {}).await.unwrap();
    let issuer = ts
        .server()
        .authority
        .snapshot()
        .issuer
        .clone()
        .unwrap()
        .der
        .to_vec();
    assert_ne!(issuer, before);
    let now = ts.bundle();
    eventually(Duration::from_secs(10), || {
        let (now, issuer) = (now.clone(), issuer.clone());
        async move {
            let (_, _, chain) = fetch(addr, spiffe_client(&now, ENDPOINT_ID), "meshca", "/")
                .await
                .ok()?;
            (chain[1].as_ref() == issuer.as_slice()).then_some(())
        }
    })
    .await
    .expect("the SVID follows the issuer");
}

/// A web CA and a certificate for `localhost` it signs, written as PEM files under `dir`:
/// (the CA's DER, the certificate file, the key file).
fn web_pki(
    dir: &Path,
) -> (
    CertificateDer<'static>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test web CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.join("web.crt"), dir.join("web.key"));
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (ca_cert.der().clone(), cert_file, key_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_web_serves_the_bundle_under_the_operators_certificate() {
    let files = tempfile::tempdir().unwrap();
    let (web_ca, cert, key) = web_pki(files.path());
    let ts = TestServer::start_with(|c| {
        let f = &mut c.federation;
        f.bundle_endpoint_listen = Some("127.0.0.1:0".parse().unwrap());
        f.bundle_endpoint_profile = EndpointProfile::HttpsWeb;
        f.bundle_endpoint_cert = Some(cert.clone());
        f.bundle_endpoint_key = Some(key.clone());
    })
    .await;
    let addr = ts.server().bundle_endpoint_addr.unwrap();
    let (status, body, _) = fetch(
        addr,
        web_client(std::slice::from_ref(&web_ca)),
        "localhost",
        "/",
    )
    .await
    .expect("verified by the web CA and the host name");
    assert_eq!(status, 200, "{body}");
    assert_eq!(anchors_of(&body).0, ders(&ts.bundle()));
    // Not this web CA's name, or not this web CA: refused.
    let err = fetch(addr, web_client(&[web_ca]), "meshca.example", "/")
        .await
        .expect_err("another host name");
    assert!(err.contains("not valid for name"), "{err}");
    fetch(addr, web_client(&ts.bundle()), "localhost", "/")
        .await
        .expect_err("meshca's own anchor does not vouch for the web certificate");
}

#[tokio::test]
async fn a_bad_endpoint_setting_is_refused_at_start() {
    let files = tempfile::tempdir().unwrap();
    let (_, cert, key) = web_pki(files.path());
    let start = |f: &dyn Fn(&mut ca_server::federation::FederationConfig)| {
        let dir = files.path().join(format!("state-{}", rand_suffix()));
        let mut c = meshca_tests::test_config(&dir);
        c.federation.bundle_endpoint_listen = Some("127.0.0.1:0".parse().unwrap());
        f(&mut c.federation);
        async move {
            ca_server::server::Server::start(c, Arc::new(rotator::clock::SystemClock))
                .await
                .err()
                .expect("refused")
                .to_string()
        }
    };
    let err = start(&|f| f.bundle_endpoint_profile = EndpointProfile::HttpsWeb).await;
    assert!(
        err.contains("needs both federation.bundle_endpoint_cert"),
        "{err}"
    );
    let err = start(&|f| f.bundle_endpoint_cert = Some("web.crt".into())).await;
    assert!(err.contains("are for the \"https_web\" profile"), "{err}");
    // A key that is not the certificate's.
    let other = files.path().join("other.key");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let (c, o) = (cert.clone(), other.clone());
    let err = start(&move |f| {
        f.bundle_endpoint_profile = EndpointProfile::HttpsWeb;
        f.bundle_endpoint_cert = Some(c.clone());
        f.bundle_endpoint_key = Some(o.clone());
    })
    .await;
    assert!(
        err.contains("federation.bundle_endpoint_cert/_key"),
        "{err}"
    );
    // A missing file, named.
    let missing = files.path().join("missing.crt");
    let (m, k) = (missing.clone(), key.clone());
    let err = start(&move |f| {
        f.bundle_endpoint_profile = EndpointProfile::HttpsWeb;
        f.bundle_endpoint_cert = Some(m.clone());
        f.bundle_endpoint_key = Some(k.clone());
    })
    .await;
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    rotator::pki::random_bytes(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}
