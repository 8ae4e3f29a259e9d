//! Kubernetes-native pod certificates on a real kube-apiserver (issue #27): meshca, as its own
//! ServiceAccount with the `pod-certificates` overlay's RBAC, answers PodCertificateRequests
//! that a node files for its pods (as the kubelet would: `system:node:<name>`, so
//! NodeRestriction checks the binding; a real key and its proof), and keeps the signer's
//! ClusterTrustBundle equal to its bundle through a rotation and a rollback. On 1.37 the
//! requests are `certificates.k8s.io/v1` with a stub PKCS#10 request; on 1.35 `v1beta1` with a
//! PKIX key and proof of possession. There is no kubelet here: nothing mounts the volume.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use meshca_tests::cluster::{Env, NEWEST, OLDEST, env_in, env_private, kube_mode};
use meshca_tests::{TestServer, meshca_in};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

const SIGNER: &str = "meshca.io/spiffe";
const BUNDLE: &str = "meshca.io:spiffe:bundle";

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// The served certificates.k8s.io version on `version`'s API server.
fn api_version(version: &str) -> &'static str {
    if version == OLDEST { "v1beta1" } else { "v1" }
}

fn resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("certificates.k8s.io", api_version(version), kind),
        plural,
    )
}

/// A P-256 key as a kubelet makes one: (PKCS#8 DER, SPKI DER).
fn p256() -> (Vec<u8>, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp = rcgen::KeyPair::try_from(pkcs8.as_ref()).unwrap();
    (
        pkcs8.as_ref().to_vec(),
        rcgen::PublicKeyData::subject_public_key_info(&kp),
    )
}

/// What the kubelet puts in a request's key fields: on v1 a stub PKCS#10 request (empty
/// subject, signed by the key); on v1beta1 the PKIX key and an ECDSA-SHA256 signature over the
/// pod's UID.
fn key_fields(version: &str, pkcs8: &[u8], pod_uid: &str) -> Value {
    if version == OLDEST {
        let rng = ring::rand::SystemRandom::new();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).unwrap();
        let proof = kp.sign(&rng, pod_uid.as_bytes()).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(
            &rcgen::KeyPair::try_from(pkcs8).unwrap(),
        );
        let _ = kp.public_key();
        json!({"pkixPublicKey": b64(&spki), "proofOfPossession": b64(proof.as_ref())})
    } else {
        let kp = rcgen::KeyPair::try_from(pkcs8).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let csr = p.serialize_request(&kp).unwrap();
        json!({"stubPKCS10Request": b64(csr.der())})
    }
}

/// A pod of ServiceAccount `web` on `node` that mounts a certificate from `signer` and the
/// signer's trust bundle, as docs/kubernetes.md shows (the API server lets a node file a request
/// only for a pod that mounts one).
fn pod_spec(ns: &str, pod: &str, node: &str, signer: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "registry.invalid/app:1",
                "volumeMounts": [{"name": "spiffe", "mountPath": "/var/run/spiffe", "readOnly": true}],
            }],
            "volumes": [{
                "name": "spiffe",
                "projected": {"sources": [
                    {"podCertificate": {
                        "signerName": signer, "keyType": "ECDSAP256",
                        "credentialBundlePath": "credentials.pem",
                    }},
                    {"clusterTrustBundle": {
                        "signerName": signer, "labelSelector": {"matchLabels": {}},
                        "path": "bundle.pem",
                    }},
                ]},
            }],
        },
    })
}

/// One pod of `ns/sa` on `node`, and the request its kubelet files for it (as the node).
struct Filed {
    name: String,
    spki: Vec<u8>,
    created: Instant,
}

async fn file_request(
    e: &Env,
    version: &str,
    ns: &str,
    pod: &str,
    node: &str,
    signer: &str,
    key: Option<Value>,
) -> Filed {
    let c = e.cluster;
    let p = c
        .create_pod(&e.admin, pod_spec(ns, pod, node, signer))
        .await;
    let sa = Api::<ServiceAccount>::namespaced(e.admin.clone(), ns)
        .get("web")
        .await
        .unwrap();
    let n = Api::<Node>::all(e.admin.clone()).get(node).await.unwrap();
    let pod_uid = p.metadata.uid.clone().unwrap();
    let (pkcs8, spki) = p256();
    let fields = key.unwrap_or_else(|| key_fields(version, &pkcs8, &pod_uid));
    let mut spec = json!({
        "signerName": signer,
        "podName": pod, "podUID": pod_uid,
        "serviceAccountName": "web", "serviceAccountUID": sa.metadata.uid,
        "nodeName": node, "nodeUID": n.metadata.uid,
        "maxExpirationSeconds": 86400,
    });
    for (k, v) in fields.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let name = format!("{pod}-pcr");
    let doc = json!({
        "apiVersion": format!("certificates.k8s.io/{}", api_version(version)),
        "kind": "PodCertificateRequest",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    });
    let obj: DynamicObject = serde_json::from_value(doc).unwrap();
    let as_node = c.node_client(node).await;
    let api = Api::<DynamicObject>::namespaced_with(
        as_node,
        ns,
        &resource(version, "PodCertificateRequest", "podcertificaterequests"),
    );
    // Admission reads the pod from the API server's cache, which may not hold a pod created
    // a moment ago ("pod … not found", 500): a kubelet files only for pods it has watched, and
    // retries; so does this.
    let mut tries = 0;
    let created = loop {
        let at = Instant::now();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => break at,
            Err(kube::Error::Api(s))
                if s.code == 500 && s.message.contains("not found") && tries < 50 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the node files {ns}/{name}: {err}"),
        }
    };
    Filed {
        name,
        spki,
        created,
    }
}

/// The request's terminal condition (type, reason) and its status, once it has one.
async fn answered(
    e: &Env,
    version: &str,
    ns: &str,
    name: &str,
    within: Duration,
) -> Option<(String, String, Value)> {
    let api = Api::<DynamicObject>::namespaced_with(
        e.admin.clone(),
        ns,
        &resource(version, "PodCertificateRequest", "podcertificaterequests"),
    );
    meshca_tests::eventually(within, || async {
        let r = api.get(name).await.ok()?;
        let c = r.data["status"]["conditions"].as_array()?.first()?.clone();
        Some((
            c["type"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
            r.data["status"].clone(),
        ))
    })
    .await
}

/// The signer's ClusterTrustBundle's certificates (DER).
async fn trust_bundle(e: &Env, version: &str) -> Option<Vec<Vec<u8>>> {
    let api = Api::<DynamicObject>::all_with(
        e.admin.clone(),
        &resource(version, "ClusterTrustBundle", "clustertrustbundles"),
    );
    let ctb = api.get_opt(BUNDLE).await.ok()??;
    assert_eq!(ctb.data["spec"]["signerName"], SIGNER);
    let pem = ctb.data["spec"]["trustBundle"].as_str()?;
    Some(
        meshca_tests::pem_certs(pem)
            .into_iter()
            .map(|c| c.to_vec())
            .collect(),
    )
}

fn rfc3339(t: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        t.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// The overlay whose RBAC every test here runs meshca with.
const OVERLAY: &str = "deploy/kubernetes/overlays/pod-certificates";

/// What every test here starts from: a namespace `prod` with ServiceAccount `web` (the workload
/// the pods run as), and `nodes`. Returns the namespace.
async fn workloads(e: &Env, nodes: &[&str]) -> String {
    let prod = e.cluster.namespace(&e.admin, "prod").await;
    e.cluster.service_account(&e.admin, &prod, "web").await;
    for n in nodes {
        e.cluster.node(&e.admin, n).await;
    }
    prod
}

async fn pod_certificates(version: &'static str) {
    let Some(e) = env_in(version, OVERLAY, &[], None).await else {
        return;
    };
    let prod = workloads(&e, &["node-a"]).await;
    let srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.kubernetes.pod_certificates.enabled = true;
    })
    .await;

    // Issued: the chain verifies against the ClusterTrustBundle, for the pod's identity and key,
    // with the times the status states.
    let f = file_request(&e, version, &prod, "web-1", "node-a", SIGNER, None).await;
    let (kind, reason, status) = answered(&e, version, &prod, &f.name, Duration::from_secs(30))
        .await
        .expect("meshca answers the request");
    let took = f.created.elapsed();
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Issued", "Issued"),
        "{status}"
    );
    let chain = meshca_tests::pem_certs(status["certificateChain"].as_str().unwrap());
    assert_eq!(chain.len(), 2, "leaf, then issuer");
    let anchors: Vec<_> = trust_bundle(&e, version)
        .await
        .expect("the ClusterTrustBundle is published")
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    let want = format!("spiffe://cluster.local/ns/{prod}/sa/web");
    let got = rotator::client::verify_svid(
        &chain,
        &anchors,
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the chain verifies against the ClusterTrustBundle");
    assert_eq!(got.to_string(), want);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        f.spki.as_slice(),
        "the requester's key"
    );
    let nb = rfc3339(&status["notBefore"]);
    let na = rfc3339(&status["notAfter"]);
    assert_eq!(nb.unix_timestamp(), leaf.validity().not_before.timestamp());
    assert_eq!(na.unix_timestamp(), leaf.validity().not_after.timestamp());
    assert!(
        na - nb <= time::Duration::seconds(86400),
        "within maxExpirationSeconds"
    );
    let refresh = rfc3339(&status["beginRefreshAt"]);
    assert!(refresh > nb && refresh < na);
    println!("{version}: one request issued {took:?} after it was filed");

    // Another signer's request is left alone; a denied identity is Denied.
    let other = file_request(
        &e,
        version,
        &prod,
        "web-2",
        "node-a",
        "example.com/other",
        None,
    )
    .await;
    let (code, _, err) = meshca_in(
        &srv.state_dir(),
        &["deny", "add", &want, "--reason", "key leaked"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let d = file_request(&e, version, &prod, "web-3", "node-a", SIGNER, None).await;
    let (kind, reason, status) = answered(&e, version, &prod, &d.name, Duration::from_secs(30))
        .await
        .expect("the denied identity's request is answered");
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Denied", "IdentityDenied"),
        "{status}"
    );
    assert!(status["certificateChain"].is_null());
    assert!(
        answered(&e, version, &prod, &other.name, Duration::from_secs(1))
            .await
            .is_none(),
        "another signer's request is not meshca's to answer"
    );
    let (code, _, err) = meshca_in(&srv.state_dir(), &["deny", "remove", &want]).await;
    assert_eq!(code, 0, "{err}");

    // A key Kubernetes allows and meshca does not sign: P-521 (1.37 lets kubelets make one;
    // 1.35's admission refuses it before any signer sees it). Made by openssl.
    if version == NEWEST
        && let Some(tool) = meshca_tests::require_tool("openssl")
    {
        let dir = tempfile::tempdir().unwrap();
        meshca_tests::openssl(
            &tool,
            dir.path(),
            &[
                "ecparam",
                "-name",
                "secp521r1",
                "-genkey",
                "-noout",
                "-out",
                "k.pem",
            ],
        );
        meshca_tests::openssl(
            &tool,
            dir.path(),
            &[
                "req", "-new", "-key", "k.pem", "-subj", "/", "-outform", "DER", "-out", "r.der",
            ],
        );
        let csr = std::fs::read(dir.path().join("r.der")).unwrap();
        let key = json!({"stubPKCS10Request": b64(&csr)});
        let u = file_request(&e, version, &prod, "web-4", "node-a", SIGNER, Some(key)).await;
        let (kind, reason, status) = answered(&e, version, &prod, &u.name, Duration::from_secs(30))
            .await
            .expect("the P-521 request is answered");
        assert_eq!(
            (kind.as_str(), reason.as_str()),
            ("Denied", "UnsupportedKeyType"),
            "{status}"
        );
        let msg = status["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            msg.contains("P-256"),
            "the message says what meshca signs: {msg}"
        );
    }

    // The ClusterTrustBundle through stage → activate → finish, and a stage rolled back.
    let equal = |n: usize| {
        let (e, srv) = (&e, &srv);
        async move {
            meshca_tests::eventually(Duration::from_secs(20), || async {
                let ctb = trust_bundle(e, version).await?;
                let ours: Vec<Vec<u8>> = srv.bundle().iter().map(|c| c.to_vec()).collect();
                (ctb.len() == n && ctb == ours).then_some(())
            })
            .await
            .is_some()
        }
    };
    for (step, n) in [
        (&["anchors", "stage"][..], 2),
        (&["anchors", "activate", "--force"], 2),
        (&["anchors", "finish", "--force"], 1),
        (&["anchors", "stage"], 2),
        (&["anchors", "rollback"], 1),
    ] {
        let (code, _, err) = meshca_in(&srv.state_dir(), step).await;
        assert_eq!(code, 0, "{step:?}: {err}");
        assert!(
            equal(n).await,
            "after {step:?} the ClusterTrustBundle holds the {n} anchors of the bundle"
        );
    }

    // A node's restart storm: 110 pods' requests at once, each answered once.
    storm(&e, version, &prod).await;
}

/// 110 pods on one node file at once (a kubelet restarting with a full node): every request
/// is Issued; creation-to-Issued p50/p99 printed.
async fn storm(e: &Env, version: &'static str, ns: &str) {
    e.cluster.node(&e.admin, "node-storm").await;
    let filed = futures::future::join_all((0..110).map(|i| async move {
        let pod = format!("storm-{i}");
        file_request(e, version, ns, &pod, "node-storm", SIGNER, None).await
    }))
    .await;
    let mut took = Vec::new();
    for f in &filed {
        let (kind, _, status) = answered(e, version, ns, &f.name, Duration::from_secs(120))
            .await
            .expect("every request of the storm is answered");
        assert_eq!(kind, "Issued", "{status}");
        took.push(f.created.elapsed());
    }
    took.sort();
    println!(
        "{version}: a storm of 110 requests: all Issued; creation to Issued p50 {:?}, p99 {:?} (upper bounds: polled)",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_certificates_are_signed_and_the_trust_bundle_kept_v1_37() {
    pod_certificates(NEWEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_certificates_are_signed_and_the_trust_bundle_kept_v1_35() {
    pod_certificates(OLDEST).await;
}

/// Negative control: without the overlay's grants (the base RBAC only) the request stays
/// pending: meshca cannot list requests nor write their status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_rbac_a_pod_certificate_request_stays_pending() {
    let Some(e) = env_private(
        NEWEST,
        OVERLAY,
        &[],
        Some("ClusterRole/meshca-pod-certificates"),
    )
    .await
    else {
        return;
    };
    let prod = workloads(&e, &["node-b"]).await;
    // The signer the overlay names, on a cluster of its own (no other meshca answers there).
    let _srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.kubernetes.pod_certificates.enabled = true;
    })
    .await;
    let f = file_request(&e, NEWEST, &prod, "web-1", "node-b", SIGNER, None).await;
    let answer = answered(&e, NEWEST, &prod, &f.name, Duration::from_secs(8)).await;
    assert!(answer.is_none(), "answered without the grants: {answer:?}");
    println!("without meshca-pod-certificates: the request is still pending after 8 s");
}

/// The pod-certificate leaves a replica's ledger holds (live ones: they live a day).
fn pod_leaves(a: &ca_server::authority::Authority) -> u64 {
    a.ledger().with(|l| {
        l.summary_by_scan(
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(86400),
            Duration::ZERO,
            0,
        )
        .by_api
        .get(&rotator::ledger::Api::Pod)
        .map_or(0, |c| c.live_workloads)
    })
}

/// Two replicas on one state Secret: only the Lease holder answers (the other's ledger records
/// no pod certificate), every request once. Then the holder is stopped mid-storm and the other
/// takes over: every request of the storm ends `Issued`, and the two ledgers together hold one
/// leaf per request (a graceful stop finishes the answer under way; a SIGKILL between signing
/// and writing the status could sign one twice — only one is ever written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_each_request_once_through_a_failover() {
    let Some(e) = env_private(NEWEST, OVERLAY, &[], None).await else {
        return;
    };
    let prod = workloads(&e, &["node-r"]).await;
    // On a cluster of its own: the signer the overlay's RBAC names, and no other meshca.
    let signer = SIGNER;
    let replica = |name: &'static str| {
        let e = &e;
        move |cfg: &mut ca_server::config::Config| {
            kube_mode(e, cfg);
            cfg.kubernetes.state_secret = "meshca-authority".into();
            cfg.kubernetes.identity = name.into();
            cfg.kubernetes.lease_duration = Duration::from_secs(2);
            cfg.kubernetes.pod_certificates.enabled = true;
        }
    };
    let mut a = TestServer::start_with(replica("replica-a")).await;
    let mut b = TestServer::start_with(replica("replica-b")).await;
    let leader = |s: &TestServer| *s.server().leader.borrow();
    meshca_tests::eventually(Duration::from_secs(20), || async {
        (leader(&a) ^ leader(&b)).then_some(())
    })
    .await
    .expect("one Lease holder");
    let pods_signed = |s: &TestServer| pod_leaves(&s.server().authority);
    let first = file_request(&e, NEWEST, &prod, "one", "node-r", signer, None).await;
    let (kind, _, status) = answered(&e, NEWEST, &prod, &first.name, Duration::from_secs(30))
        .await
        .expect("answered");
    assert_eq!(kind, "Issued", "{status}");
    let (holder, other) = if leader(&a) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(
        (pods_signed(holder), pods_signed(other)),
        (1, 0),
        "only the Lease holder signs"
    );

    // A storm, and the holder stopped in the middle of it (its ledger kept to count after).
    let holder_authority = holder.server().authority.clone();
    let names: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    let filing = futures::future::join_all(
        names
            .iter()
            .map(|n| file_request(&e, NEWEST, &prod, n, "node-r", signer, None)),
    );
    let (filed, ()) = tokio::join!(filing, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.stop().await;
    });
    for f in &filed {
        let (kind, _, status) = answered(&e, NEWEST, &prod, &f.name, Duration::from_secs(60))
            .await
            .expect("every request of the storm is answered after the fail-over");
        assert_eq!(kind, "Issued", "{status}");
    }
    let survivor = pods_signed(other);
    let stopped = pod_leaves(&holder_authority);
    println!(
        "fail-over mid-storm: all {} Issued; the stopped holder signed {}, the survivor {}",
        filed.len(),
        stopped.saturating_sub(1),
        survivor
    );
    assert_eq!(
        stopped + survivor,
        1 + filed.len() as u64,
        "each request signed once across the two replicas"
    );
}

/// A thousand requests across ten nodes (a cluster-wide restart), on a cluster of its own: all
/// `Issued`; creation-to-Issued p50/p99 printed (upper bounds: polled), and the time until the
/// last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_across_nodes_are_all_issued() {
    let Some(e) = env_private(NEWEST, OVERLAY, &[], None).await else {
        return;
    };
    let nodes: Vec<String> = (0..10).map(|n| format!("node-{n}")).collect();
    let prod = workloads(&e, &nodes.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let _srv = TestServer::start_with(|cfg| {
        kube_mode(&e, cfg);
        cfg.kubernetes.pod_certificates.enabled = true;
    })
    .await;
    let start = Instant::now();
    let filed = futures::stream::iter(0..1000)
        .map(|i| {
            let (e, prod) = (&e, &prod);
            async move {
                let (pod, node) = (format!("p-{i}"), format!("node-{}", i % 10));
                file_request(e, NEWEST, prod, &pod, &node, SIGNER, None).await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let filed_in = start.elapsed();
    let mut took = Vec::new();
    for f in &filed {
        let (kind, _, status) = answered(&e, NEWEST, &prod, &f.name, Duration::from_secs(300))
            .await
            .expect("every request is answered");
        assert_eq!(kind, "Issued", "{status}");
        took.push(f.created.elapsed());
    }
    let all = start.elapsed();
    took.sort();
    println!(
        "1000 requests across 10 nodes: filed in {filed_in:?}, all Issued {all:?} after the first was filed; \
         creation to Issued p50 {:?}, p99 {:?} (upper bounds: polled in filing order)",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
}
