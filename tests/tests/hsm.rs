//! Anchor and issuer keys in a PKCS#11 token (SoftHSM2, each test its own token directory via
//! `SOFTHSM2_CONF`), with real `meshca-server` processes: the token is process-wide state, so
//! every server here is its own process.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use meshca_tests::{
    ServerProcess, Workload, bin, eventually, http_get, mtls_handshake, require_tool, sign_request,
    snapshot_dir, with_token,
};
use rotator::client::{channel, client_tls, make_csr, parse_pem_certs, verify_svid};
use rotator::pki::SecretKey;

const PIN: &str = "1234";
const INIT_TOKEN: &[&str] = &[
    "--init-token",
    "--free",
    "--label",
    "meshca",
    "--pin",
    PIN,
    "--so-pin",
    "5678",
];

/// `softhsm2-util <args>` on the token directory `conf` names; it must succeed.
fn softhsm_util(util: &Path, conf: &Path, args: &[&str]) {
    let out = std::process::Command::new(util)
        .args(args)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A SoftHSM2 token of its own: a config file pointing at a fresh token directory, a token
/// labelled `meshca`, its PIN in a 0600 file.
struct Hsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    module: PathBuf,
    pin_file: PathBuf,
}

fn softhsm() -> Option<Hsm> {
    let util = require_tool("softhsm2-util")?;
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("softhsm2-util is installed but libsofthsm2.so is not where Debian puts it");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().join("tokens").display()
        ),
    )
    .unwrap();
    softhsm_util(&util, &conf, INIT_TOKEN);
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    Some(Hsm {
        dir,
        conf,
        module,
        pin_file,
    })
}

impl Hsm {
    fn args(&self, label: &str, pin_file: &Path) -> Vec<String> {
        vec![
            "--key-backend".into(),
            "pkcs11".into(),
            "--pkcs11-module".into(),
            self.module.display().to_string(),
            "--pkcs11-token-label".into(),
            label.into(),
            "--pkcs11-pin-file".into(),
            pin_file.display().to_string(),
        ]
    }

    fn spawn(&self, state: &Path) -> Result<ServerProcess, meshca_tests::Refused> {
        self.spawn_with(state, "meshca", &self.pin_file, &self.module)
    }

    fn spawn_with(
        &self,
        state: &Path,
        label: &str,
        pin_file: &Path,
        module: &Path,
    ) -> Result<ServerProcess, meshca_tests::Refused> {
        let mut a = self.args(label, pin_file);
        a[3] = module.display().to_string();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let conf = self.conf.display().to_string();
        ServerProcess::spawn(state, &a, &[("SOFTHSM2_CONF", conf.as_str())])
    }

    /// The token's private keys as (id hex, sensitive, extractable), read by a child process
    /// (this test binary, running [`token_probe`] with `SOFTHSM2_CONF` set: the module reads
    /// the variable once, at C_Initialize, so each token needs its own process).
    fn private_keys(&self) -> Vec<(String, bool, bool)> {
        self.private_keys_with(&self.conf)
    }

    /// As [`Hsm::private_keys`], for the token directory another config file names.
    fn private_keys_with(&self, conf: &Path) -> Vec<(String, bool, bool)> {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "token_probe",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SOFTHSM2_CONF", conf)
            .env("MESHCA_TOKEN_PROBE_MODULE", &self.module)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "probe: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            // libtest prints "test token_probe ... " before the first line of output.
            .filter_map(|l| l.find("KEY ").map(|i| &l[i + 4..]))
            .map(|l| {
                let v: Vec<&str> = l.split(' ').collect();
                (v[0].to_owned(), v[1] == "true", v[2] == "true")
            })
            .collect()
    }
}

/// Not a test of its own: [`Hsm::private_keys`] runs it in a child process.
#[test]
#[ignore = "run by Hsm::private_keys with SOFTHSM2_CONF set"]
fn token_probe() {
    let Some(module) = std::env::var_os("MESHCA_TOKEN_PROBE_MODULE") else {
        return;
    };
    let ctx = Pkcs11::new(PathBuf::from(module)).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_ro_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::from(PIN.to_owned())))
        .unwrap();
    for h in s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
    {
        let (mut id, mut sens, mut ext) = (String::new(), false, true);
        for x in s
            .get_attributes(
                h,
                &[
                    AttributeType::Id,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .unwrap()
        {
            match x {
                Attribute::Id(v) => id = hex_of(&v),
                Attribute::Sensitive(v) => sens = v,
                Attribute::Extractable(v) => ext = v,
                _ => {}
            }
        }
        // The scalar itself: the token does not give it, to anyone (so no process, meshca
        // included, can have written it anywhere).
        assert!(
            !has_value(&s, h),
            "the token revealed the value of private key {id}"
        );
        println!("KEY {id} {sens} {ext}");
    }
    // Control: the same read does return the value of a key that is not sensitive (a session
    // object, gone with the session).
    let (_, control) = s
        .generate_key_pair(
            &cryptoki::mechanism::Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(vec![
                    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
                ]),
            ],
            &[
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    assert!(
        has_value(&s, control),
        "the control key's value is readable"
    );
}

/// Whether the token returns CKA_VALUE (the private scalar) of `h`.
fn has_value(s: &cryptoki::session::Session, h: cryptoki::object::ObjectHandle) -> bool {
    s.get_attributes(h, &[AttributeType::Value]).is_ok_and(|a| {
        a.iter()
            .any(|x| matches!(x, Attribute::Value(v) if !v.is_empty()))
    })
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `meshca <args> --state-dir <state>`: (success, stdout + stderr).
async fn meshca(state: &Path, args: &[&str]) -> (bool, String) {
    let (code, out, err) = meshca_tests::meshca_in(state, args).await;
    (code == 0, out + &err)
}

/// Signs a leaf for default/web with the bootstrap token and checks its chain against the bundle
/// (rustls-webpki); the issuer's certificate, DER.
async fn issue_and_verify(srv: &ServerProcess, state: &Path) -> Vec<u8> {
    issue(srv, state, "web").await.chain[1].to_vec()
}

/// Signs a leaf for default/`sa` and checks its chain against the bundle (rustls-webpki): the
/// workload, with the bundle the response handed it.
async fn issue(srv: &ServerProcess, state: &Path, sa: &str) -> Workload {
    try_issue(srv, state, sa).await.unwrap()
}

/// As [`issue`], the server's refusal as it came.
async fn try_issue(srv: &ServerProcess, state: &Path, sa: &str) -> Result<Workload, tonic::Status> {
    let bundle = parse_pem_certs(&std::fs::read_to_string(state.join("bundle.pem")).unwrap());
    let token = std::fs::read_to_string(state.join("bootstrap-token")).unwrap();
    let key = SecretKey::generate_p256().unwrap();
    let csr = make_csr(
        &format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap(),
        &key,
    )
    .unwrap();
    let mut c =
        IdentityServiceClient::new(channel(&srv.url, client_tls(&bundle, None).unwrap()).unwrap());
    let r = c
        .sign_certificate(with_token(sign_request(csr), token.trim()))
        .await?
        .into_inner();
    let chain: Vec<_> = r
        .certificate_chain
        .iter()
        .map(|d| rustls_pki_types::CertificateDer::from(d.clone()))
        .collect();
    verify_svid(
        &chain,
        &bundle,
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the token-signed chain verifies");
    Ok(Workload::from_response(&r, key))
}

/// The files under `state` that hold a private key (PEM, or a DER PKCS#8/SEC1 EC key's header),
/// and how many key files hold only a token reference.
fn key_material(state: &Path) -> (Vec<PathBuf>, usize) {
    let mut found = Vec::new();
    let mut refs = 0;
    for (path, (bytes, _)) in snapshot_dir(state) {
        let text = String::from_utf8_lossy(&bytes);
        // PEM, or the start of a DER EC private key (SEC1: version 1 then a 32-byte scalar).
        let der_ec = bytes
            .windows(5)
            .any(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]);
        if text.contains("PRIVATE KEY") || der_ec {
            found.push(path.clone());
        }
        if text.trim().starts_with("pkcs11:token=meshca;id=") {
            refs += 1;
        }
    }
    (found, refs)
}

/// No private key anywhere in the state dir; the number of token references.
fn assert_no_key_material(state: &Path) -> usize {
    let (found, refs) = key_material(state);
    assert!(found.is_empty(), "private keys in the state dir: {found:?}");
    refs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_made_in_the_token_and_every_flow_signs_there() {
    let Some(hsm) = softhsm() else { return };
    let state = hsm.dir.path().join("state");
    let srv = hsm.spawn(&state).unwrap();
    let issuer1 = issue_and_verify(&srv, &state).await;
    // Anchor and issuer: two keys in the token, sensitive and not extractable; the state holds
    // references only.
    let keys = hsm.private_keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|(_, sens, ext)| *sens && !*ext), "{keys:?}");
    assert_eq!(assert_no_key_material(&state), 2);
    let (ok, status) = meshca(&state, &["status"]).await;
    assert!(ok, "{status}");
    // Negative control: the same scan finds the keys of a file-backend authority.
    let files = hsm.dir.path().join("file-backend");
    let plain = ServerProcess::spawn(&files, &[], &[]).unwrap();
    drop(plain);
    let (found, refs) = key_material(&files);
    assert!(found.len() >= 2 && refs == 0, "{found:?}");

    // Issuer rotation: a new key in the token signs.
    let (ok, out) = meshca(&state, &["issuer", "rotate"]).await;
    assert!(ok, "{out}");
    let (ok, out) = meshca(&state, &["issuer", "rotate"]).await;
    assert!(ok, "{out}");
    let issuer2 = issue_and_verify(&srv, &state).await;
    assert_ne!(issuer1, issuer2, "the rotated issuer signs");

    // A full anchor rotation (forced through its gates: this test is about keys). Workloads
    // issued in each phase, holding the bundle they were handed, complete real mTLS handshakes
    // with every workload still live: 0 failures.
    let mut live = vec![issue(&srv, &state, "w0").await];
    let mut handshakes = 0;
    for (n, step) in [
        &["anchors", "stage"][..],
        &["anchors", "activate", "--force"],
        &["anchors", "finish", "--force"],
    ]
    .into_iter()
    .enumerate()
    {
        let (ok, out) = meshca(&state, step).await;
        assert!(ok, "{step:?}: {out}");
        let fresh = issue(&srv, &state, &format!("w{}", n + 1)).await;
        // Every earlier workload holds the current bundle (it watches it, as the gates this
        // test forces would have waited for); after `finish`, those whose leaf chains to the
        // removed anchor have renewed (the finish gate's condition).
        live = live
            .into_iter()
            .map(|w| Workload {
                bundle: fresh.bundle.clone(),
                ..w
            })
            .filter(|w| {
                verify_svid(
                    &w.chain,
                    &fresh.bundle,
                    rustls_pki_types::UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                )
                .is_ok()
            })
            .collect();
        for w in &live {
            mtls_handshake(w, &fresh)
                .await
                .unwrap_or_else(|e| panic!("{step:?}: {e}"));
            mtls_handshake(&fresh, w)
                .await
                .unwrap_or_else(|e| panic!("{step:?}: {e}"));
            handshakes += 2;
        }
        live.push(fresh);
    }
    assert!(handshakes >= 6, "{handshakes}");
    // The token holds exactly the keys the state names: the old anchor's key, released at
    // `finish` (key_retention 0), was destroyed with it.
    let named = assert_no_key_material(&state);
    let held = hsm.private_keys();
    assert_eq!(held.len(), named, "{held:?}");
    let refs: std::collections::BTreeSet<String> = meshca_tests::snapshot_dir(&state)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "key"))
        .map(|(_, (b, _))| {
            String::from_utf8_lossy(&b)
                .trim()
                .rsplit("id=")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    let ids: std::collections::BTreeSet<String> = held.into_iter().map(|k| k.0).collect();
    assert_eq!(refs, ids);

    // Rollback: a staged anchor (a new key in the token) rolled back is archived, and its key
    // destroyed (key_retention 0); the bundle and the issuer are as before.
    let bundle = std::fs::read(state.join("bundle.pem")).unwrap();
    let issuer = issue_and_verify(&srv, &state).await;
    let (ok, out) = meshca(&state, &["anchors", "stage"]).await;
    assert!(ok, "{out}");
    let staged = hsm.private_keys().len();
    assert!(staged > ids.len(), "the staged anchor's key: {staged}");
    println!("staged: {} new keys in the token", staged - ids.len());
    let (ok, out) = meshca(&state, &["anchors", "rollback"]).await;
    assert!(ok, "{out}");
    let after: std::collections::BTreeSet<String> =
        hsm.private_keys().into_iter().map(|k| k.0).collect();
    assert_eq!(
        after, ids,
        "the keys made for the rolled-back anchor are destroyed"
    );
    assert_eq!(issue_and_verify(&srv, &state).await, issuer);
    let now = std::fs::read(state.join("bundle.pem")).unwrap();
    assert_eq!(
        parse_pem_certs(&String::from_utf8_lossy(&now)),
        parse_pem_certs(&String::from_utf8_lossy(&bundle)),
        "the bundle holds the same anchors again"
    );

    // Restart: the keys the state names are found again in the token.
    srv.kill();
    let srv = hsm.spawn(&state).expect("restarts on the same token");
    issue_and_verify(&srv, &state).await;
    println!(
        "token keys after the rotations: {}",
        hsm.private_keys().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_setting_is_refused_and_changes_nothing() {
    let Some(hsm) = softhsm() else { return };
    let state = hsm.dir.path().join("state");
    let refused = |r: Result<ServerProcess, meshca_tests::Refused>| match r {
        Ok(_) => panic!("started"),
        Err(e) => e.stderr,
    };
    let bad_pin = hsm.dir.path().join("bad-pin");
    std::fs::write(&bad_pin, "0000").unwrap();
    for (what, err, says) in [
        (
            "wrong PIN",
            refused(hsm.spawn_with(&state, "meshca", &bad_pin, &hsm.module)),
            "wrong PIN",
        ),
        (
            "unknown token",
            refused(hsm.spawn_with(&state, "nope", &hsm.pin_file, &hsm.module)),
            "no PKCS#11 token labelled \"nope\"",
        ),
        (
            "no module",
            refused(hsm.spawn_with(
                &state,
                "meshca",
                &hsm.pin_file,
                Path::new("/nonexistent/libpkcs11.so"),
            )),
            "no such file",
        ),
    ] {
        assert!(err.contains(says), "{what}: {err}");
        assert!(
            !state.join("state.json").exists(),
            "{what}: nothing created"
        );
    }
    assert!(hsm.private_keys().is_empty(), "no key made in the token");

    // The state names keys the token no longer has: refused, naming one, nothing overwritten.
    let srv = hsm.spawn(&state).unwrap();
    srv.kill();
    // Offline, with the token: status says where each key lives, check passes; a wrong PIN is
    // critical.
    let offline = |args: &[&str], pin: &Path| {
        let out = std::process::Command::new(bin("meshca"))
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .env("SOFTHSM2_CONF", &hsm.conf)
            .env("MESHCA_KEYS_BACKEND", "pkcs11")
            .env("MESHCA_KEYS_PKCS11_MODULE", &hsm.module)
            .env("MESHCA_KEYS_PKCS11_TOKEN_LABEL", "meshca")
            .env("MESHCA_KEYS_PKCS11_PIN_FILE", pin)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, out) = offline(&["status"], &hsm.pin_file);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("token"), "{out}");
    let (code, out) = offline(&["--output", "json", "status"], &hsm.pin_file);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"key_store\": \"pkcs11:token=meshca;id="),
        "{out}"
    );
    let (code, out) = offline(&["check", "--offline"], &hsm.pin_file);
    assert!(matches!(code, Some(0 | 1)), "{out}");
    let (code, out) = offline(&["check", "--offline"], &bad_pin);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("wrong PIN"), "{out}");
    let before = snapshot_dir(&state);
    let util = require_tool("softhsm2-util").unwrap();
    softhsm_util(&util, &hsm.conf, &["--delete-token", "--token", "meshca"]);
    softhsm_util(&util, &hsm.conf, INIT_TOKEN);
    let err = refused(hsm.spawn(&state));
    assert!(err.contains("has no key with id"), "{err}");
    let (code, out) = offline(&["check", "--offline"], &hsm.pin_file);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("has no key with id"), "{out}");
    assert_eq!(snapshot_dir(&state), before, "the state is untouched");
    assert!(
        hsm.private_keys().is_empty(),
        "no new anchor over the missing one"
    );
}

/// Upstream mode on the token: the pending issuer key is made in the token, `meshca issuer csr`
/// signs the CSR there, and the imported certificate is bound to that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mode_csr_is_signed_in_the_token_and_the_import_bound_to_it() {
    let Some(hsm) = softhsm() else { return };
    let w = hsm.dir.path();
    // The root lives elsewhere (here: a key in this test, never given to meshca).
    let root_key = SecretKey::generate_p256().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(365);
    let root_pem = p.self_signed(&root_key).unwrap().pem();
    std::fs::write(w.join("root.pem"), &root_pem).unwrap();
    let root = rotator::pki::CaCert::from_pem(&root_pem).unwrap();

    let state = w.join("state");
    let mut args = hsm.args("meshca", &hsm.pin_file);
    args.extend([
        "--anchor-cert".into(),
        w.join("root.pem").display().to_string(),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let conf = hsm.conf.display().to_string();
    let srv = ServerProcess::spawn(&state, &a, &[("SOFTHSM2_CONF", conf.as_str())])
        .unwrap_or_else(|r| panic!("{}", r.stderr));
    assert!(
        hsm.private_keys().is_empty(),
        "no anchor key: it is upstream"
    );

    let csr_path = w.join("next.csr");
    let (ok, out) = meshca(
        &state,
        &["issuer", "csr", "--out", &csr_path.display().to_string()],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        hsm.private_keys().len(),
        1,
        "the pending key is in the token"
    );
    assert_no_key_material(&state);
    // The upstream CA signs the CSR (its signature was made by the token: rcgen checks it).
    let csr = rcgen::CertificateSigningRequestParams::from_pem(
        &std::fs::read_to_string(&csr_path).unwrap(),
    )
    .expect("a CSR whose self-signature verifies");
    let mut ip = rcgen::CertificateParams::default();
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "issuer");
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ip.not_before = now - time::Duration::hours(1);
    ip.not_after = now + time::Duration::days(30);
    let issuer = ip
        .signed_by(&csr.public_key, &root.rcgen_issuer(root_key).unwrap())
        .unwrap()
        .pem();
    std::fs::write(w.join("next.crt"), issuer).unwrap();
    let (ok, out) = meshca(
        &state,
        &[
            "issuer",
            "import",
            "--cert",
            &w.join("next.crt").display().to_string(),
        ],
    )
    .await;
    assert!(ok, "{out}");
    issue_and_verify(&srv, &state).await;
    assert_eq!(
        assert_no_key_material(&state),
        1,
        "the issuer's reference only"
    );
}

/// Kubernetes mode on the token (the in-test API server): the state Secret holds certificates
/// and key references, never a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_the_secret_holds_references_only() {
    let Some(hsm) = softhsm() else { return };
    let fake = meshca_tests::kubeapi::KubeApi::start().await;
    let config = hsm.dir.path().join("meshca.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nauthenticators = [\"mtls\", \"static\"]\n[kubernetes]\nenabled = true\n\
             api_url = \"{}\"\nnamespace = \"meshca\"\nidentity = \"meshca-a\"\nlease_duration = \"2s\"\n",
            fake.url
        ),
    )
    .unwrap();
    let state = hsm.dir.path().join("state");
    let mut args = hsm.args("meshca", &hsm.pin_file);
    args.extend(["--config".into(), config.display().to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let conf = hsm.conf.display().to_string();
    let srv = tokio::task::block_in_place(|| {
        ServerProcess::spawn(&state, &a, &[("SOFTHSM2_CONF", conf.as_str())])
    })
    .unwrap_or_else(|r| panic!("{}", r.stderr));
    issue_and_verify(&srv, &state).await;
    let data = fake
        .secret_data("meshca", "meshca-authority")
        .expect("the state Secret");
    let keys: Vec<_> = data.iter().filter(|(k, _)| k.ends_with(".key")).collect();
    assert_eq!(keys.len(), 2, "{:?}", data.keys().collect::<Vec<_>>());
    for (k, v) in &keys {
        let v = String::from_utf8_lossy(v);
        assert!(v.trim().starts_with("pkcs11:token=meshca;id="), "{k}: {v}");
    }
    for (k, v) in &data {
        assert!(
            !String::from_utf8_lossy(v).contains("PRIVATE KEY"),
            "{k} holds a private key"
        );
    }
    assert_eq!(hsm.private_keys().len(), 2);
}

/// A token lost mid-run (the server logged out behind its back, as a restarted HSM forgets its
/// login: the compiled-in `MESHCA_FAULT_PKCS11_LOGOUT` hook, then the module's own answers):
/// issuance answers UNAVAILABLE and `/readyz` says why while the store reconnects with backoff;
/// once the token is back, the same keys sign again — no new anchor, no new key in the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_token_is_reconnected_and_readyz_says_why_meanwhile() {
    let Some(hsm) = softhsm() else { return };
    let state = hsm.dir.path().join("state");
    let lost = hsm.dir.path().join("logout");
    let (label, pin, module) = ("meshca", hsm.pin_file.clone(), hsm.module.clone());
    let mut a = hsm.args(label, &pin);
    a[3] = module.display().to_string();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let conf = hsm.conf.display().to_string();
    let lost_env = lost.display().to_string();
    let srv = ServerProcess::spawn(
        &state,
        &a,
        &[
            ("SOFTHSM2_CONF", conf.as_str()),
            ("MESHCA_FAULT_PKCS11_LOGOUT", lost_env.as_str()),
        ],
    )
    .unwrap();
    let issuer = issue_and_verify(&srv, &state).await;
    let bundle = std::fs::read(state.join("bundle.pem")).unwrap();
    let keys = hsm.private_keys();
    let (code, body) = http_get(srv.http, "/readyz").await;
    assert_eq!(code, 200, "{body}");

    std::fs::write(&lost, "").unwrap();
    let refused = try_issue(&srv, &state, "web")
        .await
        .err()
        .expect("no signature while the token is lost");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("key store") && refused.message().contains("token \"meshca\""),
        "{refused:?}"
    );
    let (code, body) = http_get(srv.http, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("key store: token \"meshca\" unreachable since"),
        "{body}"
    );
    // Reconnect attempts fail while the token stays lost, and say so.
    let failing = eventually(Duration::from_secs(10), || async {
        let (code, body) = http_get(srv.http, "/readyz").await;
        (code == 503 && body.contains("reconnect attempt")).then_some(body)
    })
    .await
    .expect("readyz reports the failed reconnect attempts");
    assert!(failing.contains("next attempt in"), "{failing}");
    println!("while lost: {}", failing.trim());

    std::fs::remove_file(&lost).unwrap();
    let back = std::time::Instant::now();
    eventually(Duration::from_secs(20), || async {
        (http_get(srv.http, "/readyz").await.0 == 200).then_some(())
    })
    .await
    .expect("ready again once the token is back");
    println!("ready {:?} after the token came back", back.elapsed());
    assert_eq!(
        issue_and_verify(&srv, &state).await,
        issuer,
        "the same issuer signs"
    );
    assert_eq!(
        std::fs::read(state.join("bundle.pem")).unwrap(),
        bundle,
        "no new anchor"
    );
    assert_eq!(hsm.private_keys(), keys, "no key made or lost in the token");
}

/// A full token: the server's token directory is a small tmpfs in its own mount namespace
/// (`unshare`, as root), filled up while it runs. A new issuer's key cannot be made: `meshca
/// issuer rotate` fails saying so, the state, the bundle and the token's keys are unchanged, and
/// the current issuer keeps signing; once there is room again, the same command succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_token_refuses_a_new_key_and_changes_nothing() {
    let Some(hsm) = softhsm() else { return };
    let (Some(_), Some(_)) = (require_tool("unshare"), require_tool("mount")) else {
        return;
    };
    let me = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must run this test (it mounts a small tmpfs for the token)"
        );
        eprintln!("SKIPPED: needs root to mount a small tmpfs for the token in a mount namespace");
        return;
    }
    let tokens = hsm.dir.path().join("tokens");
    // The token as softhsm2-util made it, copied onto a 256 KiB tmpfs over the token directory,
    // seen only by the server's mount namespace.
    let launch = r#"set -e
dir="$1"; shift
cp -a "$dir" "$dir.seed"
mount -t tmpfs -o size=256k,mode=0700 meshca-token "$dir"
cp -a "$dir.seed/." "$dir/"
exec "$@""#;
    let argv: Vec<std::ffi::OsString> = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        launch.into(),
        "sh".into(),
        tokens.clone().into(),
        bin("meshca-server").into(),
    ];
    let state = hsm.dir.path().join("state");
    let a = hsm.args("meshca", &hsm.pin_file);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let conf = hsm.conf.display().to_string();
    let srv =
        ServerProcess::spawn_as(&argv, &state, &a, &[("SOFTHSM2_CONF", conf.as_str())]).unwrap();
    // The server's view of its token directory, and a config for the probe to read it there.
    let seen = PathBuf::from(format!("/proc/{}/root", srv.child.id()))
        .join(tokens.strip_prefix("/").unwrap());
    let probe_conf = hsm.dir.path().join("probe.conf");
    std::fs::write(
        &probe_conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            seen.display()
        ),
    )
    .unwrap();
    let issuer = issue_and_verify(&srv, &state).await;
    let keys = hsm.private_keys_with(&probe_conf);
    assert_eq!(
        keys.len(),
        2,
        "anchor and issuer keys, in the tmpfs: {keys:?}"
    );
    assert!(
        hsm.private_keys().is_empty(),
        "the token outside the namespace is untouched"
    );

    // Fill the token's file system.
    let fill = seen.join("fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let block = vec![0u8; 4096];
        let err = loop {
            if let Err(e) = f.write_all(&block) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(28), "{err}");
    }
    let before = snapshot_dir(&state);
    let (ok, out) = meshca(&state, &["issuer", "rotate"]).await;
    assert!(
        !ok,
        "a rotation needing a new key succeeded on a full token: {out}"
    );
    println!("refused: {}", out.trim());
    assert!(out.contains("token \"meshca\""), "{out}");
    assert!(out.contains("full"), "{out}");
    assert!(out.contains("Unavailable: nothing changed"), "{out}");
    assert_eq!(snapshot_dir(&state), before, "the state is unchanged");
    assert_eq!(
        hsm.private_keys_with(&probe_conf),
        keys,
        "no key added in the token"
    );
    assert_eq!(
        issue_and_verify(&srv, &state).await,
        issuer,
        "the current issuer still signs"
    );

    // Room again: the same step succeeds.
    std::fs::remove_file(&fill).unwrap();
    let (ok, out) = meshca(&state, &["issuer", "rotate"]).await;
    assert!(ok, "{out}");
    assert_eq!(
        hsm.private_keys_with(&probe_conf).len(),
        3,
        "the new issuer's key"
    );
}
