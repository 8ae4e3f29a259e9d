//! Upstream (offline-root) mode end to end, and `meshca init` around an existing root. The roots
//! are made by openssl, as an operator's would be (CI installs openssl; on a laptop without it
//! these tests print SKIPPED).

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::path::Path;
use std::process::Command;

use meshca_tests::{ServerProcess, bin, http_get_blocking, openssl, openssl_root, require_tool};

fn meshca(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(bin("meshca"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

const CA_EXT: &str = "[v3]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
                      subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n";
const LEAF_EXT: &str =
    "[v3]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n";

/// Signs `csr` with root `ca` into `out` with openssl.
fn sign(tool: &Path, dir: &Path, csr: &str, ca: &str, days: &str, ext: &str, out: &str) {
    std::fs::write(dir.join("ext.cnf"), ext).unwrap();
    openssl(
        tool,
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-out",
            out,
        ],
    );
}

/// An issuer certificate for the CSR's key, signed by `ca`, valid only in the past (rcgen: openssl
/// 3.0 cannot back-date `x509 -req`).
fn expired_issuer(dir: &Path, csr: &str, ca: &str) -> String {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(
        &std::fs::read_to_string(dir.join(csr)).unwrap(),
    )
    .unwrap();
    let root = rotator::pki::CaCert::from_pem(
        &std::fs::read_to_string(dir.join(format!("{ca}.pem"))).unwrap(),
    )
    .unwrap();
    let key = rotator::pki::SecretKey::from_pem(
        &std::fs::read_to_string(dir.join(format!("{ca}.key"))).unwrap(),
    )
    .unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    p.signed_by(&csr.public_key, &root.rcgen_issuer(key).unwrap())
        .unwrap()
        .pem()
}

#[test]
fn upstream_mode_csr_out_sign_import_and_refusals() {
    let Some(tool) = require_tool("openssl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    openssl_root(&tool, w, "root", 30);
    openssl_root(&tool, w, "other-root", 30);
    let dir = w.join("state");
    let d = dir.display().to_string();
    let root = w.join("root.pem").display().to_string();
    let server = ServerProcess::spawn(&dir, &["--anchor-cert", &root], &[])
        .unwrap_or_else(|r| panic!("{}", r.stderr));
    assert!(server.banner.contains("upstream mode"), "{}", server.banner);
    let (code, body) = http_get_blocking(server.http, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no issuer"), "{body}");

    // CSR out; asking again keeps the same pending key.
    let out = meshca(
        &[
            "--output",
            "json",
            "issuer",
            "csr",
            "--state-dir",
            &d,
            "--out",
            "next.csr",
        ],
        w,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["new_key"], true);
    let out = meshca(
        &[
            "--output",
            "json",
            "issuer",
            "csr",
            "--state-dir",
            &d,
            "--out",
            "next.csr",
        ],
        w,
    );
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (again["new_key"].clone(), again["key_id"].clone()),
        (false.into(), first["key_id"].clone())
    );
    let pending_key = dir.join(format!(
        "issuers/pending-{}.key",
        first["key_id"].as_str().unwrap()
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&pending_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Wrong certificates: each refused with its reason, and nothing changes.
    openssl(
        &tool,
        w,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "stray.key",
            "-subj",
            "/CN=stray",
            "-out",
            "stray.csr",
        ],
    );
    sign(&tool, w, "stray.csr", "root", "7", CA_EXT, "other-key.crt");
    sign(&tool, w, "next.csr", "root", "7", LEAF_EXT, "not-ca.crt");
    sign(
        &tool,
        w,
        "next.csr",
        "other-root",
        "7",
        CA_EXT,
        "other-root.crt",
    );
    sign(&tool, w, "next.csr", "root", "1", CA_EXT, "too-short.crt");
    sign(
        &tool,
        w,
        "next.csr",
        "root",
        "60",
        CA_EXT,
        "outlives-root.crt",
    );
    std::fs::write(w.join("expired.crt"), expired_issuer(w, "next.csr", "root")).unwrap();
    let state_before = std::fs::read(dir.join("state.json")).unwrap();
    for (file, reason) in [
        ("other-key.crt", "not the pending issuer key"),
        ("not-ca.crt", "not a CA certificate"),
        ("other-root.crt", "not signed by any anchor in the bundle"),
        ("too-short.crt", "less than leaf_ttl_max"),
        ("outlives-root.crt", "outlives its anchor"),
        ("expired.crt", "not valid now"),
    ] {
        let out = meshca(&["issuer", "import", "--state-dir", &d, "--cert", file], w);
        assert_eq!(out.status.code(), Some(1), "{file} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{file}: {err}");
        assert_eq!(
            std::fs::read(dir.join("state.json")).unwrap(),
            state_before,
            "{file}: the state changed"
        );
    }

    // The right one.
    sign(&tool, w, "next.csr", "root", "7", CA_EXT, "next.crt");
    let out = meshca(
        &["issuer", "import", "--state-dir", &d, "--cert", "next.crt"],
        w,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(active, until"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let st = rotator::store::FileStore::read_only(&dir)
        .load_sync()
        .unwrap()
        .unwrap();
    assert!(
        st.pending_issuer_key.is_none(),
        "the pending key is consumed"
    );
    assert_eq!(
        rotator::state::key_id(&st.active_issuer().unwrap().key),
        first["key_id"].as_str().unwrap(),
        "the active issuer uses the pending key"
    );
    let (code, body) = meshca_tests::eventually_blocking(|| {
        let r = http_get_blocking(server.http, "/readyz");
        (r.0 == 200).then_some(r)
    })
    .expect("ready after the import");
    assert_eq!(code, 200, "{body}");

    // Leaves now issue and verify to the openssl root, independently.
    let out = meshca(
        &[
            "issue",
            "--server",
            &server.url,
            "--ca-bundle",
            &format!("{d}/bundle.pem"),
            "--token-file",
            &format!("{d}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/web",
            "--out",
            "web",
        ],
        w,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = meshca_tests::pem_certs(&std::fs::read_to_string(w.join("web.crt")).unwrap());
    std::fs::write(w.join("leaf.pem"), rotator::pki::pem_cert(&chain[0])).unwrap();
    std::fs::write(w.join("issuer.pem"), rotator::pki::pem_cert(&chain[1])).unwrap();
    openssl(
        &tool,
        w,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuer.pem",
            "leaf.pem",
        ],
    );

    // Status says upstream and how long the imported issuer has.
    let out = meshca(&["--output", "json", "status", "--state-dir", &d], w);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["mode"], "upstream");
    assert_eq!(s["anchors"][0]["key_held"], false);
    // In upstream mode meshca cannot rotate by itself.
    let out = meshca(&["issuer", "rotate", "--state-dir", &d], w);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("upstream mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The anchor key never reached the state dir.
    for e in walk(&dir) {
        let text = std::fs::read_to_string(&e).unwrap_or_default();
        assert!(
            !text.contains(std::fs::read_to_string(w.join("root.key")).unwrap().trim()),
            "{}",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    meshca_tests::snapshot_dir(dir)
        .into_keys()
        .map(|p| dir.join(p))
        .collect()
}

#[test]
fn init_around_an_existing_root_and_key() {
    let Some(tool) = require_tool("openssl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    openssl_root(&tool, w, "corp-root", 400);
    let dir = w.join("state");
    let d = dir.display().to_string();
    let out = meshca(
        &[
            "init",
            "--anchor-cert",
            "corp-root.pem",
            "--anchor-key",
            "corp-root.key",
            "--state-dir",
            &d,
        ],
        w,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created an authority"));
    // Twice is refused.
    let out = meshca(
        &[
            "init",
            "--anchor-cert",
            "corp-root.pem",
            "--anchor-key",
            "corp-root.key",
            "--state-dir",
            &d,
        ],
        w,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds an authority"));
    // A key that does not match the certificate is refused.
    openssl_root(&tool, w, "unrelated", 400);
    let out = meshca(
        &[
            "init",
            "--anchor-cert",
            "corp-root.pem",
            "--anchor-key",
            "unrelated.key",
            "--state-dir",
            &format!("{d}2"),
        ],
        w,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = ServerProcess::spawn(&dir, &[], &[]).unwrap_or_else(|r| panic!("{}", r.stderr));
    let out = meshca(
        &[
            "issue",
            "--server",
            &server.url,
            "--ca-bundle",
            &format!("{d}/bundle.pem"),
            "--token-file",
            &format!("{d}/bootstrap-token"),
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/web",
            "--out",
            "web",
        ],
        w,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = meshca_tests::pem_certs(&std::fs::read_to_string(w.join("web.crt")).unwrap());
    std::fs::write(w.join("leaf.pem"), rotator::pki::pem_cert(&chain[0])).unwrap();
    std::fs::write(w.join("issuer.pem"), rotator::pki::pem_cert(&chain[1])).unwrap();
    openssl(
        &tool,
        w,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "corp-root.pem",
            "-untrusted",
            "issuer.pem",
            "leaf.pem",
        ],
    );
    // meshca can rotate issuers under an imported root whose key it holds.
    let out = meshca(&["issuer", "rotate", "--state-dir", &d], w);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
