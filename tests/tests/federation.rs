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

// ---------------------------------------------------------------------------------------------
// Consuming: two trust domains federated both ways.

/// A free port on 127.0.0.1 (bound and released: the servers are given fixed bundle endpoint
/// ports so that each can name the other's before either starts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn peer(td: &str, url: String) -> ca_server::federation::Peer {
    ca_server::federation::Peer {
        trust_domain: td.parse().unwrap(),
        bundle_endpoint_url: url,
        profile: EndpointProfile::HttpsWeb,
        endpoint_spiffe_id: None,
        bootstrap_bundle: None,
        web_ca_file: None,
    }
}

/// A (`a.example`) serves `https_spiffe`; B (`b.example`) serves `https_web` with a certificate
/// for `localhost`. A fetches B's bundle (https_web, the test web CA); B fetches A's (https_spiffe,
/// bootstrapped with A's bundle file). Both serve a refresh hint of 1 s.
struct Pair {
    a: TestServer,
    b: TestServer,
    _files: tempfile::TempDir,
}

/// B's `[federation]`: its https_web endpoint on `port`.
fn b_endpoint(c: &mut ca_server::config::Config, port: u16, cert: &Path, key: &Path) {
    c.trust_domain = Some("b.example".parse().unwrap());
    let f = &mut c.federation;
    f.bundle_endpoint_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    f.bundle_endpoint_profile = EndpointProfile::HttpsWeb;
    f.bundle_endpoint_cert = Some(cert.to_owned());
    f.bundle_endpoint_key = Some(key.to_owned());
    f.bundle_endpoint_refresh_hint = Duration::from_secs(1);
    f.refresh_min = Duration::from_millis(200);
}

/// A's `[federation]`: its https_spiffe endpoint on `port`, B's at `b_port` (https_web).
fn a_endpoint(c: &mut ca_server::config::Config, port: u16, b_port: u16, web_ca_file: &Path) {
    c.trust_domain = Some("a.example".parse().unwrap());
    let f = &mut c.federation;
    f.bundle_endpoint_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    f.bundle_endpoint_refresh_hint = Duration::from_secs(1);
    f.refresh_min = Duration::from_millis(200);
    let mut b = peer("b.example", format!("https://localhost:{b_port}/"));
    b.web_ca_file = Some(web_ca_file.to_owned());
    f.trust_domains = vec![b];
}

/// The web PKI files B's endpoint serves with, and the CA file A trusts it by.
fn b_web_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (web_ca, cert, key) = web_pki(dir);
    let web_ca_file = dir.join("web-ca.pem");
    std::fs::write(
        &web_ca_file,
        pem::encode(&pem::Pem::new("CERTIFICATE", web_ca.to_vec())),
    )
    .unwrap();
    (web_ca_file, cert, key)
}

async fn federated_pair() -> Pair {
    let files = tempfile::tempdir().unwrap();
    let (web_ca_file, cert, key) = b_web_files(files.path());
    let (a_port, b_port) = (free_port(), free_port());
    // A first, so that its bundle file can bootstrap B.
    let a = TestServer::start_with(|c| a_endpoint(c, a_port, b_port, &web_ca_file)).await;
    let a_bundle = a.state_dir().join("bundle.pem");
    let b = TestServer::start_with(|c| {
        b_endpoint(c, b_port, &cert, &key);
        let mut a = peer("a.example", format!("https://127.0.0.1:{a_port}/"));
        a.profile = EndpointProfile::HttpsSpiffe;
        a.endpoint_spiffe_id = Some("spiffe://a.example/meshca/server".parse().unwrap());
        a.bootstrap_bundle = Some(a_bundle.clone());
        c.federation.trust_domains = vec![a];
    })
    .await;
    let pair = Pair {
        a,
        b,
        _files: files,
    };
    // Each holds the other's current bundle.
    for (holder, of, td) in [
        (&pair.a, &pair.b, "b.example"),
        (&pair.b, &pair.a, "a.example"),
    ] {
        let want = of.bundle();
        eventually(Duration::from_secs(20), || {
            let want = want.clone();
            async move { (foreign(holder, td) == Some(want)).then_some(()) }
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "{td}'s bundle never reached its peer: {:?}",
                holder.server().federation.statuses()
            )
        });
    }
    pair
}

/// The anchors `ts` holds for federated trust domain `td`.
fn foreign(ts: &TestServer, td: &str) -> Option<Vec<CertificateDer<'static>>> {
    ts.server()
        .authority
        .snapshot()
        .bundle
        .federated
        .iter()
        .find(|f| f.trust_domain.as_str() == td)
        .map(|f| f.anchors.clone())
}

/// A workload of `ts` for `sa`, trusting (for its peer of `peer_td`) the bundle its own server
/// handed it for that trust domain — the `federated` field of `GetTrustBundle`.
async fn workload(ts: &TestServer, td: &str, sa: &str, peer_td: &str) -> meshca_tests::Workload {
    let key = rotator::pki::SecretKey::generate_p256().unwrap();
    let id = format!("spiffe://{td}/ns/default/sa/{sa}");
    let r = ts
        .client(None)
        .sign_certificate(meshca_tests::with_token(
            meshca_tests::instance_request(&id, &key, sa),
            &ts.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let bundle = ts
        .client(None)
        .get_trust_bundle(meshca_proto::v1::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let fed = bundle
        .federated
        .iter()
        .find(|f| f.trust_domain == peer_td)
        .unwrap_or_else(|| panic!("no {peer_td} bundle in {td}'s answer"));
    let mut w = meshca_tests::Workload::from_response(&r, key);
    w.bundle = fed
        .anchors
        .iter()
        .map(|a| CertificateDer::from(a.clone()))
        .collect();
    w
}

/// B's trust-anchor rotation, stage → activate → finish (gates forced: this is about federation;
/// before `activate` the test waits, as an operator would, until A holds the staged anchor),
/// while A–B handshakes run every 20 ms with the bundles each side's server holds at that moment
/// and B's newest workload. Returns (handshakes, failures, the staged anchor's propagation time).
async fn rotate_b_under_handshakes(pair: &Pair) -> (u64, Vec<String>, Duration) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let a_w = Arc::new(workload(&pair.a, "a.example", "web", "b.example").await);
    let b_w = Arc::new(Mutex::new(Arc::new(
        workload(&pair.b, "b.example", "api", "a.example").await,
    )));
    let (done, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let failures = Arc::new(Mutex::new(Vec::new()));
    let a_srv = pair.a.server().authority.clone();
    let b_srv = pair.b.server().authority.clone();
    let held = |auth: &ca_server::authority::Authority, td: &str| {
        auth.snapshot()
            .bundle
            .federated
            .iter()
            .find(|f| f.trust_domain.as_str() == td)
            .map(|f| f.anchors.clone())
            .unwrap_or_default()
    };
    let runner = {
        let (done, count, failures, b_w, a_w) = (
            done.clone(),
            count.clone(),
            failures.clone(),
            b_w.clone(),
            a_w.clone(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                // Each side trusts what its server holds for the other right now.
                let mut a = (*a_w).clone();
                a.bundle = held(&a_srv, "b.example");
                let mut b = (*b_w.lock().unwrap().clone()).clone();
                b.bundle = held(&b_srv, "a.example");
                for (srv, cli) in [(&a, &b), (&b, &a)] {
                    count.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = meshca_tests::mtls_handshake(srv, cli).await {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{} ← {}: {e}", srv.id, cli.id));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut admin_b = admin(&pair.b).await;
    let staged_at = std::time::Instant::now();
    admin_b
        .stage_anchor(StageAnchorRequest::default())
        .await
        .unwrap();
    let staged = pair.b.bundle();
    eventually(Duration::from_secs(30), || {
        let staged = staged.clone();
        async move { (foreign(&pair.a, "b.example") == Some(staged)).then_some(()) }
    })
    .await
    .expect("A picks up B's staged anchor");
    let propagation = staged_at.elapsed();
    let step = meshca_proto::v1::AnchorStepRequest { force: true };
    admin_b.activate_anchor(step).await.unwrap();
    // B's workloads renew under the new anchor.
    *b_w.lock().unwrap() = Arc::new(workload(&pair.b, "b.example", "api", "a.example").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin_b.finish_anchor(step).await.unwrap();
    let finished = pair.b.bundle();
    eventually(Duration::from_secs(30), || {
        let finished = finished.clone();
        async move { (foreign(&pair.a, "b.example") == Some(finished)).then_some(()) }
    })
    .await
    .expect("A follows B's finish");
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    runner.await.unwrap();
    let n = count.load(Ordering::Relaxed);
    let f = failures.lock().unwrap().clone();
    (n, f, propagation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federated_both_ways_keep_handshaking_through_a_rotation() {
    let pair = federated_pair().await;
    // Bundles reach workloads: files beside the local bundle, and in every answer.
    let file = pair.a.state_dir().join("federated").join("b.example.pem");
    assert_eq!(
        rotator::client::parse_pem_certs(&std::fs::read_to_string(&file).unwrap()),
        pair.b.bundle()
    );
    let a_w = workload(&pair.a, "a.example", "web", "b.example").await;
    let b_w = workload(&pair.b, "b.example", "api", "a.example").await;
    meshca_tests::mtls_handshake(&a_w, &b_w).await.unwrap();
    meshca_tests::mtls_handshake(&b_w, &a_w).await.unwrap();
    // Without the foreign bundle, a workload cannot verify the other trust domain (control).
    let mut alone = a_w.clone();
    alone.bundle = pair.a.bundle();
    meshca_tests::mtls_handshake(&alone, &b_w)
        .await
        .expect_err("A's own anchors do not vouch for B");

    let (n, failures, propagation) = rotate_b_under_handshakes(&pair).await;
    println!(
        "{n} handshakes through B's rotation, {} failed; B's staged anchor reached A in {propagation:?}",
        failures.len()
    );
    assert!(n >= 40, "{n}");
    assert!(failures.is_empty(), "{failures:#?}");
    // A restart of A without B reachable keeps the last good bundle (it is in A's state).
    let held = foreign(&pair.a, "b.example").unwrap();
    let state = pair.a.server().authority.state().await;
    assert_eq!(
        rotator::client::parse_pem_certs(
            &state
                .federated_bundle(&"b.example".parse().unwrap())
                .unwrap()
                .anchors_pem
        ),
        held
    );
}

/// Negative control: A fetches B's bundle once (`refresh_min` = `refresh_max` = 1 h: its refresh
/// switched off). Through the same rotation of B, A's workloads cannot verify B's renewed
/// workload: the handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_refresh_a_rotation_in_the_other_trust_domain_breaks_handshakes() {
    let files = tempfile::tempdir().unwrap();
    let (web_ca_file, cert, key) = b_web_files(files.path());
    let (a_port, b_port) = (free_port(), free_port());
    let b = TestServer::start_with(|c| b_endpoint(c, b_port, &cert, &key)).await;
    let a = TestServer::start_with(|c| {
        a_endpoint(c, a_port, b_port, &web_ca_file);
        c.federation.refresh_min = Duration::from_secs(3600);
        c.federation.refresh_max = Duration::from_secs(3600);
    })
    .await;
    let first = b.bundle();
    eventually(Duration::from_secs(20), || {
        let first = first.clone();
        let a = &a;
        async move { (foreign(a, "b.example") == Some(first)).then_some(()) }
    })
    .await
    .expect("A fetched B's bundle once, at start");
    let mut admin_b = admin(&b).await;
    admin_b
        .stage_anchor(StageAnchorRequest::default())
        .await
        .unwrap();
    // Ten of B's refresh hints later, A still holds the old bundle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        foreign(&a, "b.example"),
        Some(first),
        "A must not have refreshed"
    );
    let step = meshca_proto::v1::AnchorStepRequest { force: true };
    admin_b.activate_anchor(step).await.unwrap();
    let a_w = workload(&a, "a.example", "web", "b.example").await;
    // B does not federate back in this test: its workload trusts A's bundle as given.
    let key = rotator::pki::SecretKey::generate_p256().unwrap();
    let r = b
        .client(None)
        .sign_certificate(meshca_tests::with_token(
            meshca_tests::instance_request("spiffe://b.example/ns/default/sa/api", &key, "api"),
            &b.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut b_w = meshca_tests::Workload::from_response(&r, key);
    b_w.bundle = a.bundle();
    let err = meshca_tests::mtls_handshake(&a_w, &b_w)
        .await
        .expect_err("A does not know B's new anchor");
    assert!(
        err.contains("server side"),
        "A's side refuses B's certificate: {err}"
    );
    println!("as expected: {err}");
}
