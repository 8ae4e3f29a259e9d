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
        // Durations as people write them: days, never months (issue #30 item 7).
        "leaf_ttl_max = \"2d\"",
        "anchor_ttl = \"365d\"",
        "issuer_ttl = \"7d\"",
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
        err.contains("policy.issuer_ttl = 1d:") && err.contains("leaf_ttl_max"),
        "{err}"
    );
}

#[test]
fn limits_are_set_by_flag_and_environment_and_a_bad_one_is_named() {
    let run = print_config;
    let out = run(
        &["--limit", "max_connections=4096"],
        &[
            ("MESHCA_LIMITS_MAX_CONNECTIONS", "100"),
            ("MESHCA_LIMITS_IDLE_TIMEOUT", "90s"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("max_connections = 4096") && text.contains("idle_timeout = \"1m 30s\""),
        "the flag over the environment, the environment over the default:\n{text}"
    );
    for (args, env, want) in [
        (
            &["--limit", "max_conections=1"][..],
            &[][..],
            "limits.max_conections = 1: no such limit",
        ),
        (
            &["--limit", "max_connections"][..],
            &[][..],
            "expected NAME=VALUE",
        ),
        (
            &[][..],
            &[("MESHCA_LIMITS_IDLE_TIMEOUT", "soon")][..],
            "limits.idle_timeout = soon",
        ),
        // Said in the operator's terms, not serde's ("invalid type: string, expected u32").
        (
            &["--limit", "tokenreview_rate=2.5"][..],
            &[][..],
            "config: limits.tokenreview_rate = 2.5: not a whole number (this limit is a count",
        ),
        (
            &["--limit", "tokenreview_rate=-1"][..],
            &[][..],
            "config: limits.tokenreview_rate = -1: out of range for this limit",
        ),
    ] {
        let out = run(args, env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{want} not in: {err}");
    }
}

#[test]
fn trusted_node_agents_are_set_by_flag_or_environment_and_checked() {
    let run = print_config;
    let out = run(
        &[],
        &[(
            "MESHCA_ISTIO_TRUSTED_NODE_AGENTS",
            "istio-system/ztunnel, edge/agent",
        )],
    );
    assert!(out.status.success(), "{out:?}");
    let agents = |stdout: Vec<u8>| {
        let t: toml::Table = toml::from_str(&String::from_utf8(stdout).unwrap()).unwrap();
        t["istio"]["trusted_node_agents"].clone()
    };
    assert_eq!(
        agents(out.stdout),
        toml::Value::from(vec!["istio-system/ztunnel", "edge/agent"])
    );
    let out = run(
        &["--istio-trusted-node-agent", "istio-system/ztunnel"],
        &[("MESHCA_ISTIO_TRUSTED_NODE_AGENTS", "edge/agent")],
    );
    assert_eq!(
        agents(out.stdout),
        toml::Value::from(vec!["istio-system/ztunnel"]),
        "the flag over the environment"
    );
    let out = run(&["--istio-trusted-node-agent", "ztunnel"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("istio.trusted_node_agents") && err.contains("namespace/serviceaccount"),
        "{err}"
    );
}

/// `meshca-server --print-config <args>` with `env` set.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshca-server"));
    c.arg("--print-config").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn the_bundle_endpoint_is_set_by_flag_or_environment_and_checked() {
    let federation = |stdout: Vec<u8>| {
        let t: toml::Table = toml::from_str(&String::from_utf8(stdout).unwrap()).unwrap();
        t["federation"].clone()
    };
    // Files that exist and go together (they are checked before the configuration is printed).
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bundle.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (crt, keyf) = (dir.path().join("web.crt"), dir.path().join("web.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&keyf, key.serialize_pem()).unwrap();
    let (crt, keyf) = (crt.display().to_string(), keyf.display().to_string());
    let out = print_config(
        &[],
        &[
            ("MESHCA_FEDERATION_BUNDLE_ENDPOINT_LISTEN", "0.0.0.0:8444"),
            ("MESHCA_FEDERATION_BUNDLE_ENDPOINT_PROFILE", "https_web"),
            ("MESHCA_FEDERATION_BUNDLE_ENDPOINT_CERT", &crt),
            ("MESHCA_FEDERATION_BUNDLE_ENDPOINT_KEY", &keyf),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let f = federation(out.stdout);
    assert_eq!(f["bundle_endpoint_listen"].as_str(), Some("0.0.0.0:8444"));
    assert_eq!(f["bundle_endpoint_profile"].as_str(), Some("https_web"));
    let out = print_config(
        &["--bundle-listen", "127.0.0.1:9444"],
        &[("MESHCA_FEDERATION_BUNDLE_ENDPOINT_LISTEN", "0.0.0.0:8444")],
    );
    assert_eq!(
        federation(out.stdout)["bundle_endpoint_listen"].as_str(),
        Some("127.0.0.1:9444"),
        "the flag over the environment"
    );
    let out = print_config(
        &[
            "--bundle-listen",
            "127.0.0.1:9444",
            "--bundle-endpoint-profile",
            "https_web",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("federation.bundle_endpoint_cert"), "{err}");
    let out = print_config(&["--bundle-endpoint-profile", "http"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

/// A bad value in an environment variable is blamed on the variable, not on a flag the operator
/// never typed (issue #30 item 7); a bad flag is still the flag's.
#[test]
fn a_bad_environment_value_names_the_variable() {
    let out = print_config(&[], &[("MESHCA_LOG_FORMAT", "xml")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config: log_format = xml: MESHCA_LOG_FORMAT: expected one of text, json")
            && !err.contains("--log-format"),
        "{err}"
    );
    let out = print_config(&["--log-format", "xml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'--log-format"), "{err}");
}
