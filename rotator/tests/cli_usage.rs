//! `meshca` usage (this also makes `cargo test --workspace` build `meshca` for the end-to-end
//! tests in `tests/`).

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::process::Command;

#[test]
fn help_lists_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["issue", "bundle", "status"] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
