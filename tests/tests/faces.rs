//! The Istio and Linkerd faces (issue #7): real clients over TLS against a running server — the
//! `linkerd2-proxy-api` crate's own `Identity` client, and an Istio client generated from
//! `istio.v1.auth`'s proto — on the same signing core, authorization, ledger and rotation.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;

use linkerd2_proxy_api::identity::CertifyRequest;
use linkerd2_proxy_api::identity::identity_client::IdentityClient as LinkerdClient;
use meshca_tests::{
    TestServer, bin, http_get, istio, istio_request, linkerd_peer_identity, pem_certs,
    san_in_order, with_token,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rotator::client::{Identity, channel, client_tls, verify_svid};
use rotator::pki::{CertInfo, SecretKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const WEB: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
const API: &str = "api.default.serviceaccount.identity.linkerd.cluster.local";

/// Runs the `meshca` CLI on `dir` (off the async runtime): (success, stdout + stderr).
async fn meshca_cli(dir: std::path::PathBuf, args: &'static [&'static str]) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin("meshca"))
            .args(args)
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    })
    .await
    .unwrap()
}

fn linkerd(srv: &TestServer) -> LinkerdClient<tonic::transport::Channel> {
    let tls = client_tls(&srv.bundle(), None).unwrap();
    LinkerdClient::new(channel(&srv.url, tls).unwrap())
}

fn dns_csr(names: &[SanType], key: &KeyPair) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = names.to_vec();
    p.serialize_request(key).unwrap().der().to_vec()
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

async fn certify(
    srv: &TestServer,
    identity: &str,
    token: &str,
    csr: Vec<u8>,
) -> Result<linkerd2_proxy_api::identity::CertifyResponse, tonic::Status> {
    linkerd(srv)
        .certify(CertifyRequest {
            identity: identity.into(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn chain_of(r: &linkerd2_proxy_api::identity::CertifyResponse) -> Vec<CertificateDer<'static>> {
    std::iter::once(&r.leaf_certificate)
        .chain(&r.intermediate_certificates)
        .map(|d| CertificateDer::from(d.clone()))
        .collect()
}

/// One rustls handshake between two Linkerd leaves, the client verifying the server by its
/// Linkerd DNS identity (standard WebPKI name verification, as linkerd2-proxy does). Returns the
/// client's identity as the server proxy derives it for its authorization policy (the first SAN
/// of the client's end-entity certificate, [`linkerd_peer_identity`]).
async fn linkerd_handshake(
    bundle: &[CertificateDer<'static>],
    server: (&[CertificateDer<'static>], &KeyPair, &str),
    client: (&[CertificateDer<'static>], &KeyPair),
) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    for a in bundle {
        roots.add(a.clone()).unwrap();
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = |k: &KeyPair| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()));
    let scfg = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .unwrap(),
        )
        .with_single_cert(server.0.to_vec(), key(server.1))
        .unwrap();
    let ccfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client.0.to_vec(), key(client.1))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|ee| linkerd_peer_identity(ee))
            .ok_or("the client presented no named certificate")?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let name = ServerName::try_from(server.2.to_owned()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("client: {e}"))?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    srv.await.unwrap().map_err(|e| format!("server: {e}"))
}

#[tokio::test]
async fn linkerd_certify_with_the_real_client() {
    let srv = TestServer::start().await;
    let (kw, ka) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let web = certify(&srv, WEB, &srv.token, dns_csr(&[dns(WEB)], &kw))
        .await
        .unwrap();
    let api = certify(&srv, API, &srv.token, dns_csr(&[dns(API)], &ka))
        .await
        .unwrap();
    let bundle = srv.bundle();
    for (r, name) in [(&web, WEB), (&api, API)] {
        let chain = chain_of(r);
        // The chain verifies to the bundle (independent validator), and the leaf is an SVID too.
        let id = verify_svid(
            &chain,
            &bundle,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
        assert_eq!(
            id.to_string(),
            format!("spiffe://cluster.local/ns/default/sa/{}", &name[..3])
        );
        let info = CertInfo::parse(&chain[0]).unwrap();
        assert_eq!(info.dns_names, [name]);
        let valid_until = r.valid_until.unwrap();
        assert_eq!(valid_until.seconds, info.not_after.unix_timestamp());
    }
    // A handshake between the two, the client checking the server's Linkerd DNS identity.
    // The server proxy names the client by its Linkerd identity (what authorization matches).
    let seen = linkerd_handshake(&bundle, (&chain_of(&web), &kw, WEB), (&chain_of(&api), &ka))
        .await
        .unwrap();
    assert_eq!(seen, format!("DNS:{API}"));
    // The same, expecting another name: refused (the check is real).
    let e = linkerd_handshake(&bundle, (&chain_of(&web), &kw, API), (&chain_of(&api), &ka))
        .await
        .unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
    // Counted under its own API label.
    let (_, metrics) = http_get(srv.http, "/metrics").await;
    assert!(
        metrics.contains(
            r#"meshca_certificates_issued_total{api="linkerd",result="ok",impersonated="false"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn linkerd_refusals_use_linkerds_codes() {
    let srv = TestServer::start().await;
    let k = KeyPair::generate().unwrap();
    let other_ns = "web.other.serviceaccount.identity.linkerd.cluster.local";
    let rsa = KeyPair::from_pem(
        &std::fs::read_to_string(format!(
            "{}/fixtures/rsa-pkcs1.pkcs8.key",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let cases: Vec<(&str, Result<_, _>, Code, &str)> = vec![
        (
            "identity the token does not cover",
            certify(&srv, other_ns, &srv.token, dns_csr(&[dns(other_ns)], &k)).await,
            Code::FailedPrecondition,
            "may not request",
        ),
        (
            "CSR for another identity",
            certify(&srv, WEB, &srv.token, dns_csr(&[dns(API)], &k)).await,
            Code::FailedPrecondition,
            "CSR is for",
        ),
        (
            "a URI SAN",
            certify(
                &srv,
                WEB,
                &srv.token,
                dns_csr(
                    &[
                        dns(WEB),
                        SanType::URI(
                            "spiffe://cluster.local/ns/default/sa/web"
                                .try_into()
                                .unwrap(),
                        ),
                    ],
                    &k,
                ),
            )
            .await,
            Code::FailedPrecondition,
            "URI SAN",
        ),
        (
            "an RSA key",
            certify(&srv, WEB, &srv.token, dns_csr(&[dns(WEB)], &rsa)).await,
            Code::InvalidArgument,
            "ECDSA",
        ),
        (
            "a missing token",
            certify(&srv, WEB, "", dns_csr(&[dns(WEB)], &k)).await,
            Code::InvalidArgument,
            "missing token",
        ),
        (
            "an unknown token",
            certify(&srv, WEB, "mca_not-a-token", dns_csr(&[dns(WEB)], &k)).await,
            Code::FailedPrecondition,
            "token",
        ),
        (
            "an identity outside the control plane's",
            certify(
                &srv,
                "web.default.svc.cluster.local",
                &srv.token,
                dns_csr(&[dns("web.default.svc.cluster.local")], &k),
            )
            .await,
            Code::InvalidArgument,
            "serviceaccount.identity.linkerd",
        ),
    ];
    for (what, r, code, msg) in cases {
        let s = r.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(s.message().contains(msg), "{what}: {}", s.message());
    }
    // Still serving.
    certify(&srv, WEB, &srv.token, dns_csr(&[dns(WEB)], &k))
        .await
        .unwrap();
}

#[tokio::test]
async fn istio_create_certificate_with_a_generated_client() {
    let srv = TestServer::start().await;
    let key = SecretKey::generate_p256().unwrap();
    let id = "spiffe://cluster.local/ns/default/sa/productpage";
    let r = istio(&srv, None)
        .create_certificate(with_token(istio_request(id, &key, 3600), &srv.token))
        .await
        .unwrap()
        .into_inner();
    // One PEM certificate per element: leaf, issuer, root.
    assert_eq!(r.cert_chain.len(), 3);
    let ders: Vec<CertificateDer<'static>> = r
        .cert_chain
        .iter()
        .map(|p| {
            let v = pem_certs(p);
            assert_eq!(v.len(), 1, "one certificate per element");
            v[0].clone()
        })
        .collect();
    let bundle = srv.bundle();
    assert!(
        bundle.contains(&ders[2]),
        "the root is last, and it is the trust anchor"
    );
    let got = verify_svid(
        &ders[..2],
        &bundle,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();
    assert_eq!(got.to_string(), id);
    let leaf = CertInfo::parse(&ders[0]).unwrap();
    assert_eq!(
        (leaf.not_after - leaf.not_before).whole_seconds(),
        3600 + 300,
        "validity_duration"
    );

    // Renewal with the client certificate instead of a token.
    let me = Identity {
        chain: ders[..2].to_vec(),
        key: key.clone(),
    };
    let r2 = istio(&srv, Some(&me))
        .create_certificate(istio_request(id, &key, 0))
        .await
        .unwrap()
        .into_inner();
    let leaf2 = CertInfo::parse(&pem_certs(&r2.cert_chain[0])[0]).unwrap();
    assert_eq!(
        (leaf2.not_after - leaf2.not_before).whole_seconds(),
        24 * 3600 + 300,
        "0 means the default TTL"
    );
    // A CSR for another namespace: refused, with either credential.
    let other = "spiffe://cluster.local/ns/kube-system/sa/productpage";
    let e = istio(&srv, None)
        .create_certificate(with_token(istio_request(other, &key, 0), &srv.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = istio(&srv, Some(&me))
        .create_certificate(istio_request(other, &key, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = istio(&srv, None)
        .create_certificate(istio_request(id, &key, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let (_, metrics) = http_get(srv.http, "/metrics").await;
    assert!(metrics.contains(
        r#"meshca_certificates_issued_total{api="istio",result="ok",impersonated="false"} 2"#
    ));
    assert!(metrics.contains(
        r#"meshca_certificates_issued_total{api="istio",result="denied",impersonated="false"} 2"#
    ));
}

#[tokio::test]
async fn faces_can_be_turned_off() {
    let srv = TestServer::start_with(|c| {
        c.istio.enabled = false;
        c.linkerd.enabled = false;
    })
    .await;
    let key = SecretKey::generate_p256().unwrap();
    let e = istio(&srv, None)
        .create_certificate(with_token(
            istio_request("spiffe://cluster.local/ns/default/sa/a", &key, 0),
            &srv.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = certify(
        &srv,
        WEB,
        &srv.token,
        dns_csr(&[dns(WEB)], &KeyPair::generate().unwrap()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

/// Leaves from both faces go through the same ledger and rotation: they verify through a full
/// trust-anchor rotation, and the finish gate waits for them like for any other leaf.
#[tokio::test]
async fn face_leaves_verify_through_an_anchor_rotation() {
    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let meshca = |args: &'static [&'static str]| meshca_cli(dir.clone(), args);
    let lk = KeyPair::generate().unwrap();
    let ik = SecretKey::generate_p256().unwrap();
    let iid = "spiffe://cluster.local/ns/default/sa/reviews";
    let issue_both = || async {
        let l = chain_of(
            &certify(&srv, WEB, &srv.token, dns_csr(&[dns(WEB)], &lk))
                .await
                .unwrap(),
        );
        let r = istio(&srv, None)
            .create_certificate(with_token(istio_request(iid, &ik, 0), &srv.token))
            .await
            .unwrap()
            .into_inner();
        let i: Vec<CertificateDer<'static>> = r.cert_chain[..2]
            .iter()
            .map(|p| pem_certs(p)[0].clone())
            .collect();
        (l, i)
    };
    let verify = |chains: &[&Vec<CertificateDer<'static>>], bundle: &[CertificateDer<'static>]| {
        for c in chains {
            verify_svid(c, bundle, UnixTime::now(), webpki::KeyUsage::server_auth()).unwrap();
        }
    };
    let (l1, i1) = issue_both().await;
    assert!(meshca(&["anchors", "stage"]).await.0);
    verify(&[&l1, &i1], &srv.bundle());
    // Neither face hands out the whole bundle (Istio returns the signing root, Linkerd none), so
    // their workloads are not counted as having the new anchor: the measured gate stays closed.
    let (ok, out) = meshca(&["anchors", "activate"]).await;
    assert!(!ok && out.contains("0 of 2 live workloads"), "{out}");
    let (ok, out) = meshca(&["anchors", "activate", "--force"]).await;
    assert!(ok, "{out}");
    // The finish gate counts their leaves under the old anchor.
    let (ok, out) = meshca(&["anchors", "finish"]).await;
    assert!(!ok && out.contains("2 live leaves chain to"), "{out}");
    // Renewed (same keys): the new leaves chain to the new anchor and supersede the old ones.
    let (l2, i2) = issue_both().await;
    verify(&[&l1, &i1, &l2, &i2], &srv.bundle());
    let (ok, out) = meshca(&["anchors", "finish"]).await;
    assert!(ok && out.contains("open (measured)"), "{out}");
    let bundle = srv.bundle();
    assert_eq!(bundle.len(), 1);
    verify(&[&l2, &i2], &bundle);
}

/// linkerd2-proxy names a peer by the first SAN of its end-entity certificate and authorizes that
/// name against Linkerd identities (`all-authenticated`, `MeshTLSAuthentication`): a leaf whose
/// URI SAN comes first is named `spiffe://…` and refused with 403. Every leaf from the Linkerd
/// face — fresh, renewed, before, during and after a trust-anchor rotation — must be named by
/// its Linkerd identity, in a real handshake, and still be an X.509-SVID (one URI SAN, second).
#[tokio::test]
async fn linkerd_peers_are_named_by_their_linkerd_identity_through_a_rotation() {
    let srv = TestServer::start().await;
    let dir = srv.state_dir();
    let meshca = |args: &'static [&'static str]| {
        let d = dir.clone();
        async move {
            let (ok, text) = meshca_cli(d, args).await;
            assert!(ok, "meshca {args:?}: {text}");
        }
    };
    let (kw, ka) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let spiffe = |n: &str| format!("URI:spiffe://cluster.local/ns/default/sa/{}", &n[..3]);
    // Certify both workloads (the same keys each time, as a proxy renewing), check the encoded
    // SAN order and a real handshake's view of the client, and return the chains.
    let round = |stage: &'static str| {
        let (kw, ka, srv) = (&kw, &ka, &srv);
        async move {
            let mut chains = Vec::new();
            for (name, key) in [(WEB, kw), (API, ka)] {
                let r = certify(srv, name, &srv.token, dns_csr(&[dns(name)], key))
                    .await
                    .unwrap();
                let chain = chain_of(&r);
                assert_eq!(
                    san_in_order(&chain[0]),
                    [format!("DNS:{name}"), spiffe(name)],
                    "{stage}: DNS identity first, then the one URI SAN"
                );
                assert_eq!(
                    linkerd_peer_identity(&chain[0]).unwrap(),
                    format!("DNS:{name}"),
                    "{stage}"
                );
                // Still an X.509-SVID for SPIFFE-aware peers (the spiffe crate's parser).
                let svid = spiffe::X509Svid::parse_from_der(
                    &chain.iter().flat_map(|c| c.to_vec()).collect::<Vec<u8>>(),
                    &key.serialize_der(),
                )
                .unwrap_or_else(|e| panic!("{stage}: {name}: not an X.509-SVID: {e}"));
                assert_eq!(format!("URI:{}", svid.spiffe_id()), spiffe(name), "{stage}");
                chains.push(chain);
            }
            let bundle = srv.bundle();
            let seen = linkerd_handshake(&bundle, (&chains[0], kw, WEB), (&chains[1], ka))
                .await
                .unwrap_or_else(|e| panic!("{stage}: {e}"));
            assert_eq!(
                seen,
                format!("DNS:{API}"),
                "{stage}: the server's view of the client"
            );
            let seen = linkerd_handshake(&bundle, (&chains[1], ka, API), (&chains[0], kw))
                .await
                .unwrap_or_else(|e| panic!("{stage}: {e}"));
            assert_eq!(
                seen,
                format!("DNS:{WEB}"),
                "{stage}: the server's view of the client"
            );
            chains
        }
    };
    let first = round("fresh").await;
    let renewed = round("renewal").await;
    assert_ne!(first[0], renewed[0], "a renewal is a new leaf");
    meshca(&["anchors", "stage"]).await;
    round("staged").await;
    // Linkerd proxies are never counted as holding the new bundle: the gate needs --force here.
    meshca(&["anchors", "activate", "--force"]).await;
    let active = round("activated (new anchor)").await;
    meshca(&["anchors", "finish"]).await;
    assert_eq!(srv.bundle().len(), 1, "finished: one anchor");
    let after = round("after the rotation").await;
    // The leaves after the rotation chain to the new anchor, the one left in the bundle.
    for c in [&active, &after] {
        verify_svid(
            &c[0],
            &srv.bundle(),
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    }
}

/// The native and Istio faces are unchanged by the Linkerd ordering: exactly one SAN, the URI.
#[tokio::test]
async fn native_and_istio_leaves_carry_exactly_one_uri_san() {
    let srv = TestServer::start().await;
    let key = SecretKey::generate_p256().unwrap();
    let id = "spiffe://cluster.local/ns/default/sa/productpage";
    let istio_leaf = istio(&srv, None)
        .create_certificate(with_token(istio_request(id, &key, 0), &srv.token))
        .await
        .unwrap()
        .into_inner()
        .cert_chain[0]
        .clone();
    assert_eq!(
        san_in_order(&pem_certs(&istio_leaf)[0]),
        [format!("URI:{id}")]
    );
    let (native, _) = srv.issue(id).await.unwrap();
    assert_eq!(
        san_in_order(&meshca_tests::chain_of(&native)[0]),
        [format!("URI:{id}")]
    );
}

/// Linkerd's identity client offers no ALPN (it speaks h2 with prior knowledge); meshca's TLS
/// accepts that and serves it. The handshake is checked to have negotiated no protocol, then a
/// `Certify` goes over a client with the same no-ALPN config.
#[tokio::test]
async fn a_tls_client_without_alpn_gets_its_certificate() {
    let srv = TestServer::start().await;
    let mut cfg = (*client_tls(&srv.bundle(), None).unwrap()).clone();
    cfg.alpn_protocols.clear();
    let cfg = Arc::new(cfg);
    // The handshake alone: no ALPN offered, none negotiated, and the server did not refuse.
    let addr = srv.url.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    drop(tls);
    // The request.
    let k = KeyPair::generate().unwrap();
    let r = LinkerdClient::new(channel(&srv.url, cfg).unwrap())
        .certify(CertifyRequest {
            identity: WEB.into(),
            token: srv.token.as_bytes().to_vec(),
            certificate_signing_request: dns_csr(&[dns(WEB)], &k),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        linkerd_peer_identity(&r.leaf_certificate).unwrap(),
        format!("DNS:{WEB}")
    );
}
