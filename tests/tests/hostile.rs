//! Hostile requests: each is answered with the right status code and a reason, and the server
//! keeps serving afterwards.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use meshca_proto::v1::SignCertificateRequest;
use meshca_tests::{TestServer, sign_request, with_token};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rotator::client::make_csr;
use rotator::pki::SecretKey;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn rcgen_csr(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
    f(&mut p);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn good_csr() -> Vec<u8> {
    make_csr(&WEB.parse().unwrap(), &SecretKey::generate_p256().unwrap()).unwrap()
}

#[tokio::test]
async fn hostile_requests_get_precise_codes_and_the_server_keeps_serving() {
    let ts = TestServer::start().await;
    let tok = ts.token.clone();
    let bad_sig = {
        let mut d = good_csr();
        let n = d.len();
        d[n - 5] ^= 0x55;
        d
    };
    let pem_fixture = |name: &str| {
        std::fs::read(format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    type Case = (
        &'static str,
        tonic::Request<SignCertificateRequest>,
        Code,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "no token",
            tonic::Request::new(sign_request(good_csr())),
            Code::Unauthenticated,
            "no credential",
        ),
        (
            "unknown token",
            with_token(sign_request(good_csr()), "mca_not-a-real-token"),
            Code::Unauthenticated,
            "unknown token",
        ),
        (
            "malformed authorization",
            {
                let mut r = tonic::Request::new(sign_request(good_csr()));
                r.metadata_mut()
                    .insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
                r
            },
            Code::Unauthenticated,
            "not `Bearer <token>`",
        ),
        (
            "token for ns/default asking for ns/b",
            with_token(
                sign_request(
                    make_csr(
                        &"spiffe://cluster.local/ns/b/sa/web".parse().unwrap(),
                        &SecretKey::generate_p256().unwrap(),
                    )
                    .unwrap(),
                ),
                &tok,
            ),
            Code::PermissionDenied,
            "may not request spiffe://cluster.local/ns/b/sa/web",
        ),
        (
            "another trust domain",
            with_token(
                sign_request(
                    make_csr(
                        &"spiffe://evil.org/ns/default/sa/web".parse().unwrap(),
                        &SecretKey::generate_p256().unwrap(),
                    )
                    .unwrap(),
                ),
                &tok,
            ),
            Code::PermissionDenied,
            "may not request spiffe://evil.org",
        ),
        (
            "garbage CSR",
            with_token(sign_request(b"this is not a CSR at all".to_vec()), &tok),
            Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            "empty CSR",
            with_token(sign_request(Vec::new()), &tok),
            Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            "bad signature",
            with_token(sign_request(bad_sig), &tok),
            Code::InvalidArgument,
            "signature does not verify",
        ),
        (
            "two URI SANs",
            with_token(
                sign_request(rcgen_csr(|p| {
                    p.subject_alt_names.push(SanType::URI(
                        "spiffe://cluster.local/ns/default/sa/x".try_into().unwrap(),
                    ))
                })),
                &tok,
            ),
            Code::InvalidArgument,
            "2 URI SANs",
        ),
        (
            "DNS SAN",
            with_token(
                sign_request(rcgen_csr(|p| {
                    p.subject_alt_names
                        .push(SanType::DnsName("web.default.svc".try_into().unwrap()))
                })),
                &tok,
            ),
            Code::InvalidArgument,
            "DNS SAN",
        ),
        (
            "CA requested",
            with_token(
                sign_request(rcgen_csr(|p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
                })),
                &tok,
            ),
            Code::InvalidArgument,
            "requests a CA",
        ),
        (
            "RSA-1024",
            with_token(sign_request(pem_fixture("rsa1024.csr")), &tok),
            Code::InvalidArgument,
            "too weak",
        ),
        (
            "SHA-1 signature",
            with_token(sign_request(pem_fixture("sha1.csr")), &tok),
            Code::InvalidArgument,
            "not accepted",
        ),
        (
            "1 MiB request",
            with_token(sign_request(vec![0x30; 1024 * 1024]), &tok),
            Code::InvalidArgument,
            "request over 64 KiB",
        ),
        (
            "negative TTL",
            with_token(
                SignCertificateRequest {
                    ttl: Some(prost_types::Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    ..sign_request(good_csr())
                },
                &tok,
            ),
            Code::InvalidArgument,
            "negative",
        ),
        (
            "instance id with control characters",
            with_token(
                SignCertificateRequest {
                    instance_id: "pod\n1".into(),
                    ..sign_request(good_csr())
                },
                &tok,
            ),
            Code::InvalidArgument,
            "instance_id",
        ),
    ];
    for (name, req, code, reason) in cases {
        let e = ts.client(None).sign_certificate(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(
            e.message().contains(reason),
            "{name}: {:?} lacks {reason:?}",
            e.message()
        );
        // Still serving.
        ts.issue(WEB)
            .await
            .unwrap_or_else(|e| panic!("after {name}: {e:?}"));
    }
}

#[tokio::test]
async fn a_csr_just_under_the_limit_is_judged_on_its_content() {
    let ts = TestServer::start().await;
    // 60 KiB of junk: under the size limit, so the CSR parser answers (not the size check).
    let e = ts
        .client(None)
        .sign_certificate(with_token(sign_request(vec![0x30; 60 * 1024]), &ts.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("malformed CSR"), "{}", e.message());
}

/// The fuzz corpus (#15), replayed through the same target bodies cargo fuzz runs
/// (`ca_server::fuzzing`): the committed seeds (`fuzz/seeds/<target>/`) and every input a fuzzer
/// ever crashed on (`fuzz/regressions/<target>/`, kept as regression tests). Each target has a
/// `fuzz/fuzz_targets/<target>.rs`, and the seeds reach the accepting paths (a seed that every
/// parser refused would fuzz nothing but error handling).
#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (name, target) in ca_server::fuzzing::TARGETS {
        assert!(
            root.join(format!("fuzz_targets/{name}.rs")).is_file(),
            "fuzz/fuzz_targets/{name}.rs"
        );
        let mut inputs = Vec::new();
        for dir in ["seeds", "regressions"] {
            for e in std::fs::read_dir(root.join(dir).join(name))
                .into_iter()
                .flatten()
            {
                inputs.push(e.unwrap().path());
            }
        }
        assert!(!inputs.is_empty(), "{name}: no seeds");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let r = std::panic::catch_unwind(|| target(&data));
            assert!(r.is_ok(), "{name}: {} panics", input.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 16, "{replayed}");
    // The seeds are accepted where they should be.
    let seed = |t: &str, f: &str| std::fs::read(root.join("seeds").join(t).join(f)).unwrap();
    ca_server::signing::parse_csr(&seed("csr", "der")).unwrap();
    ca_server::signing::parse_csr(&seed("csr", "pem")).unwrap();
    let flat = seed("state_flat", "flat");
    let mut map = std::collections::BTreeMap::new();
    let mut parts = flat.split(|b| *b == 0xFF);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        map.insert(String::from_utf8(k.to_vec()).unwrap(), v.to_vec());
    }
    assert!(rotator::store::decode_flat("seed", &map).unwrap().is_some());
    let tokens = String::from_utf8(seed("tokens_json", "tokens.json")).unwrap();
    assert_eq!(
        rotator::tokens::StaticTokens::parse(&tokens).unwrap().len(),
        2
    );
    let b: rotator::spiffe::TrustDomain = "b.example".parse().unwrap();
    ca_server::federation::fetch::parse_anchors(&seed("federated_bundle", "bundle.json"), &b)
        .unwrap();
    let ledger = rotator::ledger::file::read(&seed("ledger_log", "v2-two-leaves-closed")).unwrap();
    assert!(ledger.closed && ledger.records == 2 && ledger.ledger.len() == 2);
    for f in ["defaults.toml", "kubernetes.toml"] {
        let text = String::from_utf8(seed("config_toml", f)).unwrap();
        ca_server::config::Config::from_toml(&text)
            .unwrap()
            .validate()
            .unwrap();
    }
}
