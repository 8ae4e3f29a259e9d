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
    let (status, body) = meshca_tests::http_response(&buf);
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
    assert!(err.contains("are for https_web"), "{err}");
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
        err.contains("federation.bundle_endpoint_key = ") && err.contains("does not go with"),
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

    // A workload of A watching its bundle is told of each change of B's.
    let mut watch = pair
        .a
        .client(None)
        .watch_trust_bundle(meshca_proto::v1::WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    let seq_of = |m: &meshca_proto::v1::TrustBundle| {
        m.federated
            .iter()
            .find(|f| f.trust_domain == "b.example")
            .map(|f| (f.sequence, f.anchors.len()))
    };
    let before = seq_of(&first).unwrap();

    let (n, failures, propagation) = rotate_b_under_handshakes(&pair).await;
    let mut seen = vec![before];
    let final_version = pair.b.server().authority.snapshot().bundle.version;
    while seen.last().unwrap().0 < final_version {
        let m = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a push for each of B's changes")
            .unwrap()
            .unwrap();
        seen.push(seq_of(&m).unwrap());
    }
    println!("A's watcher saw b.example's (sequence, anchors): {seen:?}");
    assert!(
        seen.iter().any(|(_, n)| *n == 2),
        "the staged bundle (two anchors) was pushed: {seen:?}"
    );
    println!(
        "{n} handshakes through B's rotation, {} failed; B's staged anchor reached A in {propagation:?}",
        failures.len()
    );
    assert!(n >= 40, "{n}");
    assert!(failures.is_empty(), "{failures:#?}");
    // The operator's view: `meshca bundle --trust-domain`, `meshca status`.
    let (code, out) = meshca(&pair.a, &["bundle", "--trust-domain", "b.example"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rotator::client::parse_pem_certs(&out), pair.b.bundle());
    let (code, out) = meshca(&pair.a, &["bundle", "--trust-domain", "c.example"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no bundle of trust domain c.example is held (federated: b.example)"),
        "{out}"
    );
    let (code, out) = meshca(&pair.a, &["status"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("FEDERATION") && out.contains("b.example"),
        "{out}"
    );
    let (_, out) = meshca(&pair.a, &["--output", "json", "status"]).await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["federation"][0]["trust_domain"], "b.example");
    assert_eq!(doc["federation"][0]["consecutive_failures"], 0);
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

// ---------------------------------------------------------------------------------------------
// Refusals: a peer endpoint the test controls.

/// An HTTPS endpoint serving whatever document is set (TLS with the given config), until dropped.
struct FakeEndpoint {
    addr: SocketAddr,
    body: Arc<std::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeEndpoint {
    async fn start(tls: Arc<rustls::ServerConfig>, port: u16) -> Self {
        // The port of an endpoint just dropped is free once its task has been cancelled.
        let listener = eventually(Duration::from_secs(5), || async {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .ok()
        })
        .await
        .expect("the port is free again");
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = body.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, b) = (acceptor.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = b.lock().unwrap().clone();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, body, task }
    }

    fn serve(&self, body: impl Into<Vec<u8>>) {
        *self.body.lock().unwrap() = body.into();
    }
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rustls server config presenting `cert`/`key` (PEM files).
fn web_tls(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// A SPIFFE bundle document with `anchors`, `sequence` and a 1 s refresh hint.
fn document(anchors: &[CertificateDer<'static>], sequence: u64) -> String {
    let keys: Vec<_> = anchors
        .iter()
        .map(|a| {
            serde_json::json!({"use": "x509-svid", "kty": "EC",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(a.as_ref())]})
        })
        .collect();
    serde_json::json!({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 1})
        .to_string()
}

/// A fresh anchor of `td`, as meshca makes them.
fn anchor_of(td: &str) -> CertificateDer<'static> {
    let key = rotator::pki::SecretKey::generate_p256().unwrap();
    rotator::profile::new_anchor(
        &td.parse().unwrap(),
        &key,
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
        Duration::ZERO,
    )
    .unwrap()
    .der()
    .clone()
}

/// The status of `td` once its last error contains `says` (and the failures counted).
async fn refused(
    ts: &TestServer,
    td: &str,
    says: &str,
) -> ca_server::federation::fetch::PeerStatus {
    eventually(Duration::from_secs(15), || async {
        let s = ts.server().federation.statuses();
        let st = s.iter().find(|(t, _)| t.as_str() == td)?.1.clone();
        (st.consecutive_failures > 0 && st.last_error.as_deref().is_some_and(|e| e.contains(says)))
            .then_some(st)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "never refused with {says:?}: {:?}",
            ts.server().federation.statuses()
        )
    })
}

/// Every refusal keeps the last good bundle and says why: a sequence going back, the anchors
/// changed without a new sequence, not JSON, too large, another trust domain's anchors, no anchor,
/// the endpoint down, and a TLS failure (another web CA). Then a good document is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_peer_bundle_is_refused_and_the_last_good_one_kept() {
    let files = tempfile::tempdir().unwrap();
    let (web_ca_file, cert, key) = b_web_files(files.path());
    let fake = FakeEndpoint::start(web_tls(&cert, &key), 0).await;
    let port = fake.addr.port();
    let ts = TestServer::start_with(|c| {
        c.trust_domain = Some("a.example".parse().unwrap());
        let f = &mut c.federation;
        f.refresh_min = Duration::from_millis(100);
        f.refresh_max = Duration::from_millis(300);
        f.max_bundle_bytes = 8192;
        f.max_anchors = 4;
        let mut b = peer("b.example", format!("https://localhost:{port}/"));
        b.web_ca_file = Some(web_ca_file.clone());
        f.trust_domains = vec![b];
    })
    .await;
    let (b1, b2) = (anchor_of("b.example"), anchor_of("b.example"));
    fake.serve(document(std::slice::from_ref(&b1), 5));
    let good = vec![b1.clone()];
    eventually(Duration::from_secs(15), || {
        let good = good.clone();
        let ts = &ts;
        async move { (foreign(ts, "b.example") == Some(good)).then_some(()) }
    })
    .await
    .expect("the first document is accepted");
    let scrape = http_get(ts.http, "/metrics").await.1;
    assert!(
        scrape.contains("meshca_federation_bundle_sequence{trust_domain=\"b.example\"} 5"),
        "{scrape}"
    );
    let huge = format!("{{\"keys\": [], \"padding\": \"{}\"}}", "x".repeat(10_000));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "sequence back",
            document(std::slice::from_ref(&b2), 3),
            "went back from 5 to 3",
        ),
        (
            "same sequence, other anchors",
            document(std::slice::from_ref(&b2), 5),
            "sequence stayed at 5",
        ),
        ("not JSON", "{\"keys\": [".into(), "not a SPIFFE bundle"),
        (
            "too large",
            huge,
            "larger than federation.max_bundle_bytes (8192)",
        ),
        (
            "too many anchors",
            document(&vec![b2.clone(); 5], 6),
            "5 anchors, more than federation.max_anchors (4)",
        ),
        (
            "another trust domain",
            document(&[anchor_of("c.example")], 6),
            "trust domain c.example, not b.example",
        ),
        ("no anchor", document(&[], 6), "no x509-svid anchor"),
    ];
    for (what, body, says) in cases {
        fake.serve(body);
        let st = refused(&ts, "b.example", says).await;
        println!("{what}: {}", st.last_error.unwrap());
        assert_eq!(
            foreign(&ts, "b.example"),
            Some(good.clone()),
            "{what}: kept"
        );
        let scrape = http_get(ts.http, "/metrics").await.1;
        assert!(
            !scrape.contains("meshca_federation_refresh_failures{trust_domain=\"b.example\"} 0"),
            "{what}: counted"
        );
    }
    // The endpoint down, then up with a certificate from another web CA.
    drop(fake);
    let st = refused(&ts, "b.example", "connecting to localhost").await;
    println!("down: {}", st.last_error.unwrap());
    let other = tempfile::tempdir().unwrap();
    let (_, cert2, key2) = b_web_files(other.path());
    let fake = FakeEndpoint::start(web_tls(&cert2, &key2), port).await;
    fake.serve(document(std::slice::from_ref(&b2), 6));
    let st = refused(&ts, "b.example", "TLS with localhost").await;
    println!("TLS: {}", st.last_error.unwrap());
    assert_eq!(foreign(&ts, "b.example"), Some(good.clone()), "kept");
    // Three failures in a row: `meshca check` warns (exit 1) with the reason.
    eventually(Duration::from_secs(15), || async {
        let s = ts.server().federation.statuses();
        (s.values().next()?.consecutive_failures >= 3).then_some(())
    })
    .await
    .unwrap();
    let (code, out) = meshca(&ts, &["check"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("fetches of b.example's bundle in a row failed: TLS with localhost"),
        "{out}"
    );
    // Back to the right certificate: the new document is accepted, the failures reset.
    drop(fake);
    let fake = FakeEndpoint::start(web_tls(&cert, &key), port).await;
    fake.serve(document(std::slice::from_ref(&b2), 6));
    eventually(Duration::from_secs(15), || {
        let ts = &ts;
        let b2 = b2.clone();
        async move { (foreign(ts, "b.example") == Some(vec![b2])).then_some(()) }
    })
    .await
    .expect("a good document is accepted again");
    // The refresher commits the bundle, then records its success: the status follows at once.
    let reset = eventually(Duration::from_secs(5), || async {
        let st = ts.server().federation.statuses();
        let st = st.values().next()?.clone();
        (st.consecutive_failures == 0 && st.last_error.is_none()).then_some(())
    })
    .await;
    assert!(reset.is_some(), "the failures reset after the success");
}

/// `https_spiffe` with the wrong `endpoint_spiffe_id`: the endpoint is refused, and only the
/// bootstrap bundle is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_endpoint_spiffe_id_is_refused() {
    let a_port = free_port();
    let a = TestServer::start_with(|c| {
        c.trust_domain = Some("a.example".parse().unwrap());
        c.federation.bundle_endpoint_listen = Some(format!("127.0.0.1:{a_port}").parse().unwrap());
    })
    .await;
    let bootstrap = a.state_dir().join("bundle.pem");
    let c = TestServer::start_with(|c| {
        c.trust_domain = Some("c.example".parse().unwrap());
        c.federation.refresh_min = Duration::from_millis(100);
        let mut p = peer("a.example", format!("https://127.0.0.1:{a_port}/"));
        p.profile = EndpointProfile::HttpsSpiffe;
        p.endpoint_spiffe_id = Some("spiffe://a.example/not-meshca".parse().unwrap());
        p.bootstrap_bundle = Some(bootstrap.clone());
        c.federation.trust_domains = vec![p];
    })
    .await;
    let st = refused(&c, "a.example", "expected spiffe://a.example/not-meshca").await;
    println!("{}", st.last_error.unwrap());
    let held = c.server().authority.state().await;
    let held = held
        .federated_bundle(&"a.example".parse().unwrap())
        .unwrap();
    assert_eq!(held.sequence, 0, "the bootstrap bundle only");
    assert_eq!(
        rotator::client::parse_pem_certs(&held.anchors_pem),
        a.bundle()
    );
}

/// The real `meshca` CLI on `ts`'s state dir (its admin socket when the server runs): (exit
/// code, stdout + stderr).
async fn meshca(ts: &TestServer, args: &[&str]) -> (Option<i32>, String) {
    let (code, out, err) = meshca_tests::meshca_in(&ts.state_dir(), args).await;
    (Some(code), out + &err)
}

/// The last good foreign bundle is in the state: a restart with the peer unreachable still hands
/// it to workloads (GetTrustBundle, the file) from the first moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_peer_keeps_the_federated_bundle() {
    let files = tempfile::tempdir().unwrap();
    let (web_ca_file, cert, key) = b_web_files(files.path());
    let fake = FakeEndpoint::start(web_tls(&cert, &key), 0).await;
    let b1 = anchor_of("b.example");
    fake.serve(document(std::slice::from_ref(&b1), 4));
    let port = fake.addr.port();
    let configure = move |c: &mut ca_server::config::Config| {
        c.trust_domain = Some("a.example".parse().unwrap());
        c.federation.refresh_min = Duration::from_millis(100);
        let mut b = peer("b.example", format!("https://localhost:{port}/"));
        b.web_ca_file = Some(web_ca_file.clone());
        c.federation.trust_domains = vec![b];
    };
    let mut ts = TestServer::start_with(configure.clone()).await;
    eventually(Duration::from_secs(15), || {
        let (ts, b1) = (&ts, b1.clone());
        async move { (foreign(ts, "b.example") == Some(vec![b1])).then_some(()) }
    })
    .await
    .expect("fetched");
    drop(fake);
    ts.server.take().unwrap().shutdown().await;
    let mut config = meshca_tests::test_config(&ts.state_dir());
    configure(&mut config);
    let srv = ca_server::server::Server::start(config, Arc::new(rotator::clock::SystemClock))
        .await
        .unwrap();
    let url = format!("https://{}", srv.grpc_addr);
    let roots = srv.authority.snapshot().bundle.anchors.clone();
    let mut client = meshca_proto::v1::identity_service_client::IdentityServiceClient::new(
        rotator::client::channel(&url, rotator::client::client_tls(&roots, None).unwrap()).unwrap(),
    );
    let tb = client
        .get_trust_bundle(meshca_proto::v1::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tb.federated.len(), 1);
    assert_eq!(tb.federated[0].trust_domain, "b.example");
    assert_eq!(tb.federated[0].sequence, 4);
    assert_eq!(tb.federated[0].anchors, vec![b1.to_vec()]);
    let file = ts.state_dir().join("federated").join("b.example.pem");
    assert_eq!(
        rotator::client::parse_pem_certs(&std::fs::read_to_string(&file).unwrap()),
        vec![b1]
    );
    srv.shutdown().await;
    // No longer federated: the bundle and its file go.
    let mut config = meshca_tests::test_config(&ts.state_dir());
    config.trust_domain = Some("a.example".parse().unwrap());
    let srv = ca_server::server::Server::start(config, Arc::new(rotator::clock::SystemClock))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        srv.authority
            .snapshot()
            .bundle
            .federated
            .is_empty()
            .then_some(())
    })
    .await
    .expect("dropped");
    assert!(!file.exists(), "its file is removed");
    srv.shutdown().await;
}

/// A foreign bundle not refreshed for over 30 minutes (its endpoint down) is stale: `meshca check`
/// warns (exit 1), `meshca status` marks it, and the age metric passes the alert's threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_foreign_bundle_is_reported() {
    let files = tempfile::tempdir().unwrap();
    let (down, _) = meshca_tests::unreachable_peer(files.path(), "b.example");
    let clock = Arc::new(rotator::clock::ManualClock::new(
        time::OffsetDateTime::now_utc(),
    ));
    let ts = TestServer::start_clocked(
        |c| {
            c.trust_domain = Some("a.example".parse().unwrap());
            c.federation.trust_domains = vec![down.clone()];
        },
        clock.clone(),
    )
    .await;
    refused(&ts, "b.example", "connecting to 127.0.0.1:1").await;
    let (code, out) = meshca(&ts, &["check"]).await;
    assert_eq!(code, Some(0), "fresh: {out}");
    clock.advance(Duration::from_secs(31 * 60));
    let (code, out) = meshca(&ts, &["check"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "the bundle of federated trust domain b.example was last refreshed 0.5 hours ago"
        ),
        "{out}"
    );
    let (_, out) = meshca(&ts, &["status"]).await;
    assert!(out.contains("STALE"), "{out}");
    let scrape = http_get(ts.http, "/metrics").await.1;
    let age: i64 = scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix("meshca_federation_bundle_age_seconds{trust_domain=\"b.example\"} ")
        })
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(age > 1800, "{age}");
}

/// A peer that reset its `spiffe_sequence` is refused until the operator runs `meshca federation
/// reset` (issue #25, item 6): then its next bundle is accepted, and the anchors held meanwhile
/// stayed. Resetting a trust domain no bundle is held for is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reset_its_sequence_is_accepted_after_federation_reset() {
    let files = tempfile::tempdir().unwrap();
    let (web_ca_file, cert, key) = b_web_files(files.path());
    let fake = FakeEndpoint::start(web_tls(&cert, &key), 0).await;
    let port = fake.addr.port();
    let ts = TestServer::start_with(|c| {
        c.trust_domain = Some("a.example".parse().unwrap());
        let f = &mut c.federation;
        f.refresh_min = Duration::from_millis(100);
        f.refresh_max = Duration::from_millis(300);
        let mut b = peer("b.example", format!("https://localhost:{port}/"));
        b.web_ca_file = Some(web_ca_file.clone());
        f.trust_domains = vec![b];
    })
    .await;
    let (b1, b2) = (anchor_of("b.example"), anchor_of("b.example"));
    fake.serve(document(std::slice::from_ref(&b1), 1_000_000));
    eventually(Duration::from_secs(15), || async {
        (foreign(&ts, "b.example") == Some(vec![b1.clone()])).then_some(())
    })
    .await
    .expect("accepted at a huge sequence");
    fake.serve(document(std::slice::from_ref(&b2), 1));
    refused(&ts, "b.example", "went back from 1000000 to 1").await;
    let (code, out) = meshca(&ts, &["federation", "reset", "c.example"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no bundle is held for federated trust domain c.example"),
        "{out}"
    );
    let (code, out) = meshca(&ts, &["federation", "reset", "b.example"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("sequence 1000000 forgotten"), "{out}");
    eventually(Duration::from_secs(15), || async {
        (foreign(&ts, "b.example") == Some(vec![b2.clone()])).then_some(())
    })
    .await
    .expect("the peer's bundle at sequence 1 is accepted after the reset");
}
