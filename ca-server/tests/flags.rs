//! The binary's flags (this also makes `cargo test --workspace` build `meshca-server` for the
//! end-to-end tests in `tests/`).

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::process::Command;

#[test]
fn print_config_shows_the_embedded_default_and_flags_override_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshca-server"))
        .arg("--print-config")
        .env_remove("MESHCA_STATE_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "state_dir = \"./meshca-data\"",
        "listen = \"127.0.0.1:8443\"",
        "http_listen = \"127.0.0.1:9090\"",
        "leaf_ttl_max = \"2days\"",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshca-server"))
        .args(["--print-config", "--listen", "0.0.0.0:9443"])
        .env("MESHCA_STATE_DIR", "/var/lib/meshca")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("listen = \"0.0.0.0:9443\"")
            && text.contains("state_dir = \"/var/lib/meshca\""),
        "{text}"
    );
}

#[test]
fn a_bad_config_file_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("meshca.toml");
    std::fs::write(&f, "[policy]\nissuer_ttl = \"1day\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshca-server"))
        .arg("--config")
        .arg(&f)
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.issuer_ttl = 1day") && err.contains("leaf_ttl_max"),
        "{err}"
    );
}
