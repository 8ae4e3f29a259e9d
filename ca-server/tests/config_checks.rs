//! Issue #30, item 3: every configuration the server would refuse is refused by
//! `--print-config` as well, the same way (`config: <name> = <value>: <reason>`, exit 2), and
//! starting with it writes nothing: the state dir is not even created.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::path::Path;
use std::process::Command;

/// A CA certificate (PEM) and its key (PEM): `spiffe://<td>` as its URI SAN when `td` is given.
fn ca(td: Option<&str>) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "a test CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    if let Some(td) = td {
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{td}").try_into().unwrap(),
        )];
    }
    (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// A web server certificate for `bundle.example` and its key (PEM).
fn web_cert() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p = rcgen::CertificateParams::new(vec!["bundle.example".into()]).unwrap();
    (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// Runs the server with `config` twice — `--print-config`, then to start with a state dir that
/// does not exist yet — and returns both stderr texts after checking both refused with exit 2
/// and no state dir appeared.
fn refused_twice(dir: &Path, config: &str) -> (String, String) {
    let f = dir.join("meshca.toml");
    std::fs::write(&f, config).unwrap();
    let state = dir.join("state");
    let mut out = Vec::new();
    for print in [true, false] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshca-server"));
        c.arg("--config")
            .arg(&f)
            .arg("--state-dir")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
        if print {
            c.arg("--print-config");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "print {print}: {config}\n{err}");
        assert!(
            !state.exists(),
            "print {print}: the state dir was created\n{config}"
        );
        out.push(err);
    }
    (out.remove(0), out.remove(0))
}

#[test]
fn a_config_refused_at_start_is_refused_by_print_config_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (other_ca, _) = ca(Some("other.example"));
    let other = file("other-td.pem", &other_ca);
    let (web, web_key) = web_cert();
    let web = file("web.crt", &web);
    let (_, stranger_key) = web_cert();
    let stranger_key = file("stranger.key", &stranger_key);
    let web_key = file("web.key", &web_key);
    let not_a_module = file("libnot-pkcs11.so", "not a shared library");
    let pin = file("pin", "1234");
    let missing = d.join("missing.pem").display().to_string();
    let peer = |extra: &str| {
        format!(
            "[[federation.trust_domains]]\ntrust_domain = \"b.example\"\nbundle_endpoint_url = \"https://b.example/bundle\"\nendpoint_spiffe_id = \"spiffe://b.example/meshca/server\"\n{extra}\n"
        )
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "a PKCS#11 backend with no module",
            "[keys]\nbackend = \"pkcs11\"\n".into(),
            "config: keys.pkcs11_module = : must be set with keys.backend = \"pkcs11\"".into(),
        ),
        (
            "a PKCS#11 module that is not there",
            format!(
                "[keys]\nbackend = \"pkcs11\"\npkcs11_module = \"/nonexistent/libpkcs11.so\"\npkcs11_token_label = \"meshca\"\npkcs11_pin_file = \"{pin}\"\n"
            ),
            "config: keys.pkcs11_module = /nonexistent/libpkcs11.so: no such file".into(),
        ),
        (
            "a PKCS#11 module that is not a library",
            format!(
                "[keys]\nbackend = \"pkcs11\"\npkcs11_module = \"{not_a_module}\"\npkcs11_token_label = \"meshca\"\npkcs11_pin_file = \"{pin}\"\n"
            ),
            format!("config: keys.pkcs11_module = {not_a_module}: not a loadable PKCS#11 module"),
        ),
        (
            "https_web with files that do not exist",
            format!(
                "[federation]\nbundle_endpoint_listen = \"127.0.0.1:0\"\nbundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert = \"{missing}\"\nbundle_endpoint_key = \"{web_key}\"\n"
            ),
            format!("config: federation.bundle_endpoint_cert = {missing}: "),
        ),
        (
            "https_web with a key that is not the certificate's",
            format!(
                "[federation]\nbundle_endpoint_listen = \"127.0.0.1:0\"\nbundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert = \"{web}\"\nbundle_endpoint_key = \"{stranger_key}\"\n"
            ),
            format!(
                "config: federation.bundle_endpoint_key = {stranger_key}: does not go with bundle_endpoint_cert {web}"
            ),
        ),
        (
            "https_web without its files",
            "[federation]\nbundle_endpoint_listen = \"127.0.0.1:0\"\nbundle_endpoint_profile = \"https_web\"\n".into(),
            "config: federation.bundle_endpoint_profile = https_web: ".into(),
        ),
        (
            "a refresh hint of 0s",
            "[federation]\nbundle_endpoint_refresh_hint = \"0s\"\n".into(),
            "config: federation.bundle_endpoint_refresh_hint = 0s: must be more than 0".into(),
        ),
        (
            "refresh_min of 0s",
            "[federation]\nrefresh_min = \"0s\"\n".into(),
            "config: federation.refresh_min = 0s: must be more than 0".into(),
        ),
        (
            "more connections per address than in all",
            "[limits]\nmax_connections = 100\nmax_connections_per_ip = 200\n".into(),
            "config: limits.max_connections_per_ip = 200: more than max_connections = 100".into(),
        ),
        (
            "a bootstrap bundle that is not there",
            peer(&format!("bootstrap_bundle = \"{missing}\"")),
            format!("config: federation.trust_domains = b.example: bootstrap_bundle {missing}: "),
        ),
        (
            "a bootstrap bundle of another trust domain",
            peer(&format!("bootstrap_bundle = \"{other}\"")),
            format!(
                "config: federation.trust_domains = b.example: bootstrap_bundle {other}: an anchor names spiffe://other.example, not trust domain b.example"
            ),
        ),
        (
            "an upstream anchor that is not there",
            format!("anchor_cert = \"{missing}\"\n"),
            format!("config: anchor_cert = {missing}: "),
        ),
    ];
    for (what, config, says) in cases {
        let (printed, started) = refused_twice(d, &config);
        assert!(printed.contains(&says), "{what}: {printed}");
        assert_eq!(printed, started, "{what}: the same refusal both ways");
        println!("{what}: {}", printed.trim());
    }
    // The control: the same files, used right, pass.
    let f = d.join("good.toml");
    std::fs::write(
        &f,
        format!(
            "[federation]\nbundle_endpoint_listen = \"127.0.0.1:0\"\nbundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert = \"{web}\"\nbundle_endpoint_key = \"{web_key}\"\n{}",
            peer(&format!(
                "bootstrap_bundle = \"{}\"",
                file("b.pem", &ca(Some("b.example")).0)
            ))
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_meshca-server"))
        .arg("--config")
        .arg(&f)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
